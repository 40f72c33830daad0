//! Which node needs which object, kept up to date one change at a time.
//!
//! A node's view is: for each network it sees, that network, its subnets, all its ports, and
//! the node records of every host with a port on it; and for the security
//! groups its own ports use, those groups, their rules, and one member object (the port's
//! addresses) per port, anywhere, of every group those rules name as remote group. A node sees
//! the networks it has a bound port on, and every network a router connects to one of those
//! (through the router's interface ports): it routes for that router locally, so it needs the
//! far side's ports and their nodes.
//! Recomputing that from the whole cache for every open stream on every write costs
//! O(nodes × ports) per write; here reverse indexes (port → network and host, network →
//! hosts, ports and subnets, host → networks; host → groups, group → rules → remote groups,
//! group → member ports) turn a change into the hosts it concerns and the keys to look at for
//! each, so a write costs what it touches.
//!
//! Pure: no I/O, no clocks. The caller keeps what each node was sent (key → revision) and
//! turns [`ViewIndex::apply`]'s answer into puts and deletes with [`ViewIndex::delta`].

use isthmus_model::{
    keys, FloatingIp, Network, Node, Port, QosPolicy, Router, SecurityGroup, SecurityGroupRule, Subnet,
};
use isthmus_store::Revision;
use isthmus_wire::stream::{GroupMember, NodeInfo, ObjectValue};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// One object of a node's view: the revision it was written at, and its value as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewObject {
    pub revision: Revision,
    pub value: ObjectValue,
}

/// A stored object the views are made of, decoded.
#[derive(Debug, Clone)]
pub enum Source {
    Port(Arc<Port>),
    Network(Arc<Network>),
    Subnet(Arc<Subnet>),
    Node(Arc<Node>),
    SecurityGroup(Arc<SecurityGroup>),
    SecurityGroupRule(Arc<SecurityGroupRule>),
    Router(Arc<Router>),
    FloatingIp(Arc<FloatingIp>),
    QosPolicy(Arc<QosPolicy>),
}

/// A change to one key (`None`: deleted).
#[derive(Debug, Clone)]
pub struct Change {
    pub key: String,
    pub revision: Revision,
    pub value: Option<Source>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Port,
    Network,
    Subnet,
    Node,
    Group,
    Rule,
    Router,
    FloatingIp,
    Policy,
    /// Made by the index, never stored: id is `<group id>/<port id>`.
    Member,
}

/// Where member objects live in views (not a stored collection).
const MEMBERS: &str = "group_members";

/// The key of port `port`'s member object in group `group`.
pub fn member_key(group: &str, port: &str) -> String {
    keys::resource(MEMBERS, &format!("{group}/{port}"))
}

/// The kind and id of a view key, `None` for keys views never hold.
fn parse(key: &str) -> Option<(Kind, &str)> {
    let rest = key.strip_prefix(keys::ROOT)?;
    if let Some(id) = rest.strip_prefix(MEMBERS).and_then(|r| r.strip_prefix('/')) {
        let (g, p) = id.split_once('/')?;
        return (!g.is_empty() && !p.is_empty() && !p.contains('/')).then_some((Kind::Member, id));
    }
    let (coll, id) = rest.rsplit_once('/')?;
    if id.is_empty() {
        return None;
    }
    let kind = match coll {
        "ports" => Kind::Port,
        "networks" => Kind::Network,
        "subnets" => Kind::Subnet,
        "nodes" => Kind::Node,
        "security_groups" => Kind::Group,
        "security_group_rules" => Kind::Rule,
        "routers" => Kind::Router,
        "floatingips" => Kind::FloatingIp,
        "qos_policies" => Kind::Policy,
        _ => return None,
    };
    Some((kind, id))
}

/// Whether a view may hold this stored key (a port, network, subnet, node record, security
/// group or rule).
pub fn is_view_key(key: &str) -> bool {
    parse(key).is_some_and(|(k, _)| k != Kind::Member)
}

/// The Neutron rendering, typed for the stream (lossless: attributes nodes do not use are
/// carried as they are).
fn typed<T: serde::de::DeserializeOwned>(key: &str, rendered: serde_json::Value) -> Option<T> {
    serde_json::from_value(rendered)
        .inspect_err(|e| tracing::warn!(key, error = %e, "left out of node views: unexpected rendering"))
        .ok()
}

/// What a stored object looks like in a view (`None` if it cannot be rendered).
pub fn render(key: &str, source: &Source) -> Option<ObjectValue> {
    Some(match source {
        Source::Port(p) => {
            let mut v = p.to_api(true);
            if let (Some(s), Some(m)) = (&p.subport_of, v.as_object_mut()) {
                m.insert("isthmus:subport".into(), serde_json::json!(s));
            }
            ObjectValue::Port(typed(key, v)?)
        }
        Source::Network(n) => ObjectValue::Network(typed(key, n.to_api(true))?),
        Source::Subnet(s) => ObjectValue::Subnet(typed(key, s.to_api())?),
        Source::Node(n) => ObjectValue::Node(NodeInfo {
            host: n.host.clone(),
            underlay_ip: n.underlay_ip.clone(),
            capabilities: n.capabilities.clone(),
        }),
        // Rules travel as objects of their own.
        Source::SecurityGroup(g) => ObjectValue::SecurityGroup(typed(key, g.to_api(vec![]))?),
        Source::SecurityGroupRule(r) => ObjectValue::SecurityGroupRule(typed(key, r.to_api())?),
        Source::Router(r) => ObjectValue::Router(typed(key, r.to_api())?),
        Source::FloatingIp(f) => ObjectValue::FloatingIp(typed(key, f.to_api())?),
        Source::QosPolicy(p) => ObjectValue::QosPolicy(typed(key, p.to_api())?),
    })
}

/// A port's addresses as a group member: fixed IPs and allowed-address-pair addresses (as
/// given, CIDRs included), sorted, without duplicates.
pub fn member_addresses(p: &Port) -> Vec<String> {
    let mut a: Vec<String> = p
        .fixed_ips
        .iter()
        .map(|f| f.ip_address.clone())
        .chain(p.allowed_address_pairs.iter().map(|x| x.ip_address.clone()))
        .collect();
    a.sort();
    a.dedup();
    a
}

/// A stored object the index holds: the cache's own decoded value (shared, not copied) and
/// its revision. It is rendered for the stream only when sent.
#[derive(Debug, Clone)]
struct Held {
    revision: Revision,
    source: Source,
}

/// An object of a view as the index has it: stored, or a member object it makes.
enum Found<'a> {
    Stored(&'a Held),
    Member {
        revision: Revision,
        group: &'a str,
        port: &'a str,
        addresses: &'a [String],
    },
}

impl Found<'_> {
    fn revision(&self) -> Revision {
        match self {
            Found::Stored(h) => h.revision,
            Found::Member { revision, .. } => *revision,
        }
    }

    fn rendered(&self, key: &str) -> Option<Arc<ViewObject>> {
        let value = match self {
            Found::Stored(h) => render(key, &h.source)?,
            Found::Member {
                group, port, addresses, ..
            } => ObjectValue::GroupMember(GroupMember {
                security_group_id: group.to_string(),
                port_id: port.to_string(),
                addresses: addresses.to_vec(),
            }),
        };
        Some(Arc::new(ViewObject {
            revision: self.revision(),
            value,
        }))
    }
}

/// Whether two values of one key look the same in a view.
fn same(a: &Source, b: &Source) -> bool {
    match (a, b) {
        (Source::Port(x), Source::Port(y)) => x == y,
        (Source::Network(x), Source::Network(y)) => x == y,
        (Source::Subnet(x), Source::Subnet(y)) => x == y,
        // A heartbeat rewrites a node's record (times, converged revision) without changing
        // what a peer sees of it.
        (Source::Node(x), Source::Node(y)) => {
            x.host == y.host && x.underlay_ip == y.underlay_ip && x.capabilities == y.capabilities
        }
        (Source::SecurityGroup(x), Source::SecurityGroup(y)) => x == y,
        (Source::SecurityGroupRule(x), Source::SecurityGroupRule(y)) => x == y,
        (Source::Router(x), Source::Router(y)) => x == y,
        (Source::FloatingIp(x), Source::FloatingIp(y)) => x == y,
        // The deleting mark is not part of what a node sees.
        (Source::QosPolicy(x), Source::QosPolicy(y)) => {
            x.bandwidth_limit_rules == y.bandwidth_limit_rules
                && x.std == y.std
                && x.name == y.name
                && x.shared == y.shared
                && x.is_default == y.is_default
        }
        _ => false,
    }
}

/// Adds one to a counter; `true` if it was absent.
fn inc<K: Ord>(m: &mut BTreeMap<K, usize>, k: K, by: usize) -> bool {
    let c = m.entry(k).or_default();
    *c += by;
    *c == by
}

/// Takes `by` off a counter, dropping it at zero; `true` if it went.
fn dec<K: Ord>(m: &mut BTreeMap<K, usize>, k: &K, by: usize) -> bool {
    let Some(c) = m.get_mut(k) else { return false };
    *c = c.saturating_sub(by);
    if *c == 0 {
        m.remove(k);
        return true;
    }
    false
}

/// The router a port belongs to, if it is one of its interfaces or its gateway (a gateway
/// makes the external network one of the router's networks: whoever routes for the router
/// sees it, and the gateway's host sees the router's networks).
fn interface_of(p: &Port) -> Option<&str> {
    (is_router_port(&p.device_owner) && !p.device_id.is_empty()).then_some(p.device_id.as_str())
}

pub fn is_router_port(device_owner: &str) -> bool {
    device_owner.starts_with("network:router_interface") || device_owner == "network:router_gateway"
}

/// What the security part of a view knows of one port.
#[derive(Debug, Clone, Default, PartialEq)]
struct PortGroups {
    host: String,
    groups: BTreeSet<String>,
    addresses: Vec<String>,
}

/// What the index keeps of a port's groups (`None`: in no group).
fn port_groups(p: &Port) -> Option<PortGroups> {
    (!p.security_groups.is_empty()).then(|| PortGroups {
        host: p.binding_host_id.clone(),
        groups: p.security_groups.iter().cloned().collect(),
        addresses: member_addresses(p),
    })
}

#[derive(Default)]
pub struct ViewIndex {
    /// Every renderable view object, by key (renderability checked when it arrives).
    objects: HashMap<String, Held>,
    /// Port key → (network id, binding host; empty when unbound).
    port_loc: HashMap<String, (String, String)>,
    net_ports: HashMap<String, BTreeSet<String>>,
    /// Network id → host → number of its ports bound there.
    net_hosts: HashMap<String, BTreeMap<String, usize>>,
    /// Subnet key → network id, and back.
    subnet_net: HashMap<String, String>,
    net_subnets: HashMap<String, BTreeSet<String>>,
    /// Host → networks it has a bound port on.
    host_nets: HashMap<String, BTreeSet<String>>,
    /// Router interface port key → router id.
    port_router: HashMap<String, String>,
    /// Router id → network → its interface ports there, and network → routers there.
    router_nets: HashMap<String, BTreeMap<String, usize>>,
    net_routers: HashMap<String, BTreeSet<String>>,
    /// Floating IP key → its external network, and back.
    fip_net: HashMap<String, String>,
    net_fips: HashMap<String, BTreeSet<String>>,
    /// Port id → its groups, host and member addresses (ports with groups only).
    port_groups: HashMap<String, PortGroups>,
    /// Host → group → number of its bound ports using the group, and back.
    host_groups: HashMap<String, BTreeMap<String, usize>>,
    group_hosts: HashMap<String, BTreeSet<String>>,
    /// Group id → keys of its rules; rule key → (group, remote group).
    group_rules: HashMap<String, BTreeSet<String>>,
    rule_of: HashMap<String, (String, Option<String>)>,
    /// Group id → remote group → number of its rules naming it.
    group_remotes: HashMap<String, BTreeMap<String, usize>>,
    /// Host → remote group → number of (used group, rule) pairs naming it, and back.
    host_remotes: HashMap<String, BTreeMap<String, usize>>,
    remote_hosts: HashMap<String, BTreeSet<String>>,
    /// Group id → member port id → revision of its member object (when the port joined or
    /// its addresses last changed).
    group_ports: HashMap<String, BTreeMap<String, Revision>>,
    /// Port key → (binding host, its own QoS policy), bound ports with a policy only; host →
    /// policy → number of its ports naming it.
    port_qos: HashMap<String, (String, String)>,
    host_port_qos: HashMap<String, BTreeMap<String, usize>>,
    /// Network id → its QoS policy.
    net_qos: HashMap<String, String>,
}

/// The security part of a host's state that decides its view: groups used, remote groups.
type HostSec = (BTreeSet<String>, BTreeSet<String>);

impl ViewIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Objects held (shared by all views; member objects are made when sent).
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Applies a batch of changes and answers, for every host whose view may have changed,
    /// the keys to look at (see [`ViewIndex::delta`]).
    pub fn apply(&mut self, changes: Vec<Change>) -> BTreeMap<String, BTreeSet<String>> {
        let sec = self.sec_before(&changes);
        let qos = self.qos_before(&changes);
        // Networks whose members or contents change, and the networks each changed key
        // belongs to (before and after; a node record: the networks its host is on).
        let mut nets: BTreeSet<String> = BTreeSet::new();
        let mut key_nets: Vec<(String, BTreeSet<String>)> = Vec::with_capacity(changes.len());
        let mut node_hosts: Vec<(String, String)> = vec![];
        // Routers whose interfaces or gateway change: their object goes to whoever sees one of
        // their networks (a first interface changes no host's networks, but its router's
        // visibility).
        let mut routers: Vec<(String, BTreeSet<String>)> = vec![];
        for c in &changes {
            let Some((kind, id)) = parse(&c.key) else { continue };
            let mut mine = BTreeSet::new();
            match kind {
                Kind::Port => {
                    if let Some((n, _)) = self.port_loc.get(&c.key) {
                        mine.insert(n.clone());
                    }
                    // A router interface changes who sees its router's other networks:
                    // exactly the hosts that see this one, before or after.
                    if let Some(Source::Port(p)) = &c.value {
                        mine.insert(p.network_id.clone());
                    }
                    let new = match &c.value {
                        Some(Source::Port(p)) => interface_of(p),
                        _ => None,
                    };
                    for r in self.port_router.get(&c.key).map(String::as_str).into_iter().chain(new) {
                        routers.push((keys::resource("routers", r), mine.clone()));
                    }
                }
                Kind::Router => {
                    mine.extend(self.router_nets.get(id).into_iter().flat_map(|m| m.keys()).cloned());
                }
                Kind::FloatingIp => {
                    if let Some(n) = self.fip_net.get(&c.key) {
                        mine.insert(n.clone());
                    }
                    if let Some(Source::FloatingIp(f)) = &c.value {
                        mine.insert(f.floating_network_id.clone());
                    }
                }
                Kind::Network => {
                    mine.insert(id.to_string());
                }
                Kind::Subnet => {
                    if let Some(n) = self.subnet_net.get(&c.key) {
                        mine.insert(n.clone());
                    }
                    if let Some(Source::Subnet(s)) = &c.value {
                        mine.insert(s.network_id.clone());
                    }
                }
                Kind::Node => {
                    mine.extend(self.host_nets.get(id).into_iter().flatten().cloned());
                    node_hosts.push((c.key.clone(), id.to_string()));
                }
                Kind::Group | Kind::Rule | Kind::Member | Kind::Policy => continue,
            }
            nets.extend(mine.iter().cloned());
            key_nets.push((c.key.clone(), mine));
        }
        // The hosts that saw those networks before, with the networks they saw then, and each
        // network's hosts (with bound ports) then.
        let mut before: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut hosts_before: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for n in &nets {
            for h in self.viewers(n) {
                if let std::collections::btree_map::Entry::Vacant(e) = before.entry(h) {
                    let seen = self.seen_nets(e.key());
                    e.insert(seen);
                }
            }
            hosts_before.insert(n.clone(), self.bound(n).cloned().collect());
        }
        let mut changed: BTreeSet<String> = BTreeSet::new();
        for c in changes {
            if self.set(c.key.clone(), c.revision, c.value) {
                changed.insert(c.key);
            }
        }
        for (k, mut ns) in routers {
            if let Some((_, r)) = parse(&k) {
                ns.extend(self.router_nets.get(r).into_iter().flat_map(|m| m.keys()).cloned());
            }
            nets.extend(ns.iter().cloned());
            changed.insert(k.clone());
            key_nets.push((k, ns));
        }
        // A node record also concerns the networks its host is on now.
        for (key, host) in &node_hosts {
            if let Some(entry) = key_nets.iter_mut().find(|(k, _)| k == key) {
                entry.1.extend(self.host_nets.get(host).into_iter().flatten().cloned());
            }
        }
        // Each touched network's hosts before and after; who saw or sees one.
        let mut on_net: BTreeMap<&String, BTreeSet<String>> = BTreeMap::new();
        let mut hosts: BTreeSet<String> = before.keys().cloned().collect();
        for n in &nets {
            let mut hs = hosts_before.remove(n).unwrap_or_default();
            hs.extend(self.bound(n).cloned());
            on_net.insert(n, hs);
            hosts.extend(self.viewers(n));
        }
        let mut out = BTreeMap::new();
        for h in hosts {
            let old = before.get(&h).cloned().unwrap_or_default();
            let new = self.seen_nets(&h);
            let rel: BTreeSet<&String> = old.iter().chain(new.iter()).collect();
            let mut cand: BTreeSet<String> = BTreeSet::new();
            // Changed keys of networks this host is or was on.
            for (k, ns) in &key_nets {
                if changed.contains(k) && ns.iter().any(|n| rel.contains(n)) {
                    cand.insert(k.clone());
                }
            }
            // Node records of hosts sharing a touched network with it, before or after.
            for (n, hs) in &on_net {
                if rel.contains(n) {
                    cand.extend(hs.iter().map(|x| keys::resource("nodes", x)));
                }
            }
            for n in old.symmetric_difference(&new) {
                self.net_keys(n, &mut cand);
            }
            out.insert(h, cand);
        }
        self.sec_after(sec, &changed, &mut out);
        self.qos_after(qos, &changed, &mut out);
        out
    }

    /// The QoS policies `host` needs: those its bound ports name, and those of the networks
    /// it has a bound port on.
    fn host_policies(&self, host: &str) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .host_port_qos
            .get(host)
            .into_iter()
            .flat_map(|m| m.keys().cloned())
            .collect();
        for n in self.host_nets.get(host).into_iter().flatten() {
            out.extend(self.net_qos.get(n).cloned());
        }
        out
    }

    /// The hosts needing policy `p` now.
    fn policy_hosts(&self, p: &str) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self
            .host_port_qos
            .iter()
            .filter(|(_, m)| m.contains_key(p))
            .map(|(h, _)| h.clone())
            .collect();
        for (n, q) in &self.net_qos {
            if q == p {
                out.extend(self.bound(n).cloned());
            }
        }
        out
    }

    /// Before a batch: the policies of every host whose set of policies it may change.
    fn qos_before(&self, changes: &[Change]) -> BTreeMap<String, BTreeSet<String>> {
        let mut hosts: BTreeSet<String> = BTreeSet::new();
        for c in changes {
            let Some((kind, id)) = parse(&c.key) else { continue };
            match kind {
                Kind::Port => {
                    if let Some((_, h)) = self.port_loc.get(&c.key) {
                        hosts.insert(h.clone());
                    }
                    if let Some(Source::Port(p)) = &c.value {
                        hosts.insert(p.binding_host_id.clone());
                    }
                }
                Kind::Network => hosts.extend(self.bound(id).cloned()),
                _ => {}
            }
        }
        hosts.remove("");
        hosts
            .into_iter()
            .map(|h| {
                let ps = self.host_policies(&h);
                (h, ps)
            })
            .collect()
    }

    /// After a batch: policies that entered or left a host's view, and changed policies to
    /// the hosts needing them.
    fn qos_after(
        &self,
        before: BTreeMap<String, BTreeSet<String>>,
        changed: &BTreeSet<String>,
        out: &mut BTreeMap<String, BTreeSet<String>>,
    ) {
        for (h, old) in before {
            let new = self.host_policies(&h);
            let moved: Vec<String> = old
                .symmetric_difference(&new)
                .map(|p| keys::resource("qos_policies", p))
                .collect();
            if !moved.is_empty() {
                out.entry(h).or_default().extend(moved);
            }
        }
        for k in changed {
            if let Some((Kind::Policy, p)) = parse(k) {
                for h in self.policy_hosts(p) {
                    out.entry(h).or_default().insert(k.clone());
                }
            }
        }
    }

    /// Records port `key`'s own policy where it is bound (`None`: none, unbound or gone).
    fn set_port_qos(&mut self, key: &str, new: Option<(String, String)>) {
        if let Some((h, p)) = self.port_qos.remove(key) {
            if let Some(m) = self.host_port_qos.get_mut(&h) {
                dec(m, &p, 1);
                if m.is_empty() {
                    self.host_port_qos.remove(&h);
                }
            }
        }
        if let Some((h, p)) = new {
            inc(self.host_port_qos.entry(h.clone()).or_default(), p.clone(), 1);
            self.port_qos.insert(key.to_string(), (h, p));
        }
    }

    /// What the security part of the views looked like, where `changes` may change it.
    fn sec_before(&self, changes: &[Change]) -> SecBefore {
        let mut b = SecBefore::default();
        // Groups a port joins or leaves, each port as the batch leaves it so far: only their
        // referrers are copied (a port's status change must not copy the hosts of every group
        // it is in). New addresses alone need no copy: whoever names the group as remote
        // before but not after gets all its members from the host diff.
        let mut remotes: BTreeSet<String> = BTreeSet::new();
        let mut so_far: HashMap<&str, Option<PortGroups>> = HashMap::new();
        for c in changes {
            let Some((kind, id)) = parse(&c.key) else { continue };
            match kind {
                Kind::Port => {
                    let mut old = BTreeMap::new();
                    if let Some(o) = self.port_groups.get(id) {
                        b.hosts.insert(o.host.clone());
                        for g in &o.groups {
                            if let Some(r) = self.group_ports.get(g).and_then(|ps| ps.get(id)) {
                                old.insert(g.clone(), *r);
                            }
                        }
                    }
                    b.ports.entry(id.to_string()).or_insert(old);
                    let new = match &c.value {
                        Some(Source::Port(p)) => port_groups(p),
                        _ => None,
                    };
                    if let Some(n) = &new {
                        b.hosts.insert(n.host.clone());
                    }
                    let prev = match so_far.get(id) {
                        Some(p) => p.as_ref(),
                        None => self.port_groups.get(id),
                    };
                    let pg = prev.map(|p| &p.groups);
                    let ng = new.as_ref().map(|n| &n.groups);
                    for g in pg.into_iter().chain(ng).flatten() {
                        let was = pg.is_some_and(|x| x.contains(g));
                        let is = ng.is_some_and(|x| x.contains(g));
                        if was != is {
                            remotes.insert(g.clone());
                        }
                    }
                    so_far.insert(id, new);
                }
                Kind::Rule => {
                    let mut groups: Vec<&str> = vec![];
                    let mut remote = false;
                    if let Some((g, r)) = self.rule_of.get(&c.key) {
                        groups.push(g);
                        remote |= r.is_some();
                    }
                    if let Some(Source::SecurityGroupRule(r)) = &c.value {
                        groups.push(&r.security_group_id);
                        remote |= r.remote_group_id.is_some();
                    }
                    let hs: BTreeSet<String> = groups
                        .into_iter()
                        .flat_map(|g| self.group_hosts.get(g).into_iter().flatten().cloned())
                        .collect();
                    // Only a rule naming a remote group changes its hosts' remote groups.
                    if remote {
                        b.hosts.extend(hs.iter().cloned());
                    }
                    b.rules.entry(c.key.clone()).or_default().extend(hs);
                }
                _ => {}
            }
        }
        b.hosts.remove("");
        for h in &b.hosts {
            b.host_sec.insert(h.clone(), self.host_sec(h));
        }
        for r in remotes {
            let hs = self.remote_hosts.get(&r).cloned().unwrap_or_default();
            b.remote_hosts.insert(r, hs);
        }
        b
    }

    /// Adds the security candidates of a batch to `out`, given the state before it.
    fn sec_after(&self, b: SecBefore, changed: &BTreeSet<String>, out: &mut BTreeMap<String, BTreeSet<String>>) {
        // Hosts whose groups or remote groups changed: everything of what entered or left.
        for (h, (groups, remotes)) in &b.host_sec {
            let (g2, r2) = self.host_sec(h);
            let mut cand = BTreeSet::new();
            for g in groups.symmetric_difference(&g2) {
                cand.insert(keys::resource("security_groups", g));
                cand.extend(self.group_rules.get(g).into_iter().flatten().cloned());
            }
            for r in remotes.symmetric_difference(&r2) {
                for p in self.group_ports.get(r).into_iter().flat_map(|m| m.keys()) {
                    cand.insert(member_key(r, p));
                }
            }
            if !cand.is_empty() {
                out.entry(h.clone()).or_default().extend(cand);
            }
        }
        // A changed rule: hosts using its group, before or after.
        for (k, hs) in &b.rules {
            if !changed.contains(k) {
                continue;
            }
            let now = self.rule_of.get(k).and_then(|(g, _)| self.group_hosts.get(g));
            for h in hs.iter().chain(now.into_iter().flatten()) {
                out.entry(h.clone()).or_default().insert(k.clone());
            }
        }
        // A changed group: hosts using it.
        for k in changed {
            if let Some((Kind::Group, g)) = parse(k) {
                for h in self.group_hosts.get(g).into_iter().flatten() {
                    out.entry(h.clone()).or_default().insert(k.clone());
                }
            }
        }
        // Member objects that came, went or changed: hosts naming the group as remote,
        // before or after.
        for (p, old) in &b.ports {
            let now: BTreeMap<&String, Revision> = self
                .port_groups
                .get(p)
                .into_iter()
                .flat_map(|n| &n.groups)
                .filter_map(|g| Some((g, *self.group_ports.get(g)?.get(p)?)))
                .collect();
            let groups: BTreeSet<&String> = old.keys().chain(now.keys().copied()).collect();
            for r in groups {
                // Same revision: the same object (addresses unchanged), nothing to send.
                if old.get(r) == now.get(r) {
                    continue;
                }
                let key = member_key(r, p);
                let then = b.remote_hosts.get(r.as_str()).into_iter().flatten();
                for h in then.chain(self.remote_hosts.get(r.as_str()).into_iter().flatten()) {
                    out.entry(h.clone()).or_default().insert(key.clone());
                }
            }
        }
    }

    /// The groups `host`'s ports use and the remote groups their rules name.
    fn host_sec(&self, host: &str) -> HostSec {
        let g = self.host_groups.get(host).into_iter().flat_map(|m| m.keys().cloned());
        let r = self.host_remotes.get(host).into_iter().flat_map(|m| m.keys().cloned());
        (g.collect(), r.collect())
    }

    /// Loads objects without working out who they concern (a fresh index).
    pub fn load(&mut self, changes: Vec<Change>) {
        for c in changes {
            self.set(c.key, c.revision, c.value);
        }
    }

    /// The keys `host`'s view may hold (a superset: [`ViewIndex::member`] decides).
    fn all_keys(&self, host: &str) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for n in self.seen_nets(host) {
            self.net_keys(&n, &mut keys);
        }
        for g in self.host_groups.get(host).into_iter().flat_map(|m| m.keys()) {
            keys.insert(keys::resource("security_groups", g));
            keys.extend(self.group_rules.get(g).into_iter().flatten().cloned());
        }
        for r in self.host_remotes.get(host).into_iter().flat_map(|m| m.keys()) {
            for p in self.group_ports.get(r).into_iter().flat_map(|m| m.keys()) {
                keys.insert(member_key(r, p));
            }
        }
        for p in self.host_policies(host) {
            keys.insert(keys::resource("qos_policies", &p));
        }
        keys
    }

    /// The keys of `host`'s whole view, without rendering anything.
    pub fn view_keys(&self, host: &str) -> BTreeSet<String> {
        let mut keys = self.all_keys(host);
        keys.retain(|k| self.member(host, k).is_some());
        keys
    }

    /// Every key of network `n`'s part of a view (network, subnets, ports, node records).
    fn net_keys(&self, n: &str, out: &mut BTreeSet<String>) {
        out.insert(keys::resource("networks", n));
        out.extend(self.net_subnets.get(n).into_iter().flatten().cloned());
        out.extend(self.net_ports.get(n).into_iter().flatten().cloned());
        out.extend(self.net_fips.get(n).into_iter().flatten().cloned());
        for r in self.net_routers.get(n).into_iter().flatten() {
            out.insert(keys::resource("routers", r));
        }
        for h in self.net_hosts.get(n).into_iter().flat_map(|m| m.keys()) {
            out.insert(keys::resource("nodes", h));
        }
    }

    /// Hosts with a bound port on network `n`.
    fn bound<'a>(&'a self, n: &str) -> impl Iterator<Item = &'a String> + 'a {
        self.net_hosts.get(n).into_iter().flat_map(|m| m.keys())
    }

    /// Networks sharing a router with `n` (`n` itself included once it has a router).
    fn routed<'a>(&'a self, n: &str) -> impl Iterator<Item = &'a String> + 'a {
        self.net_routers
            .get(n)
            .into_iter()
            .flatten()
            .flat_map(|r| self.router_nets.get(r).into_iter().flat_map(|m| m.keys()))
    }

    /// Whether `host` sees network `n`: a bound port there, or on a network routed to it.
    fn sees(&self, host: &str, n: &str) -> bool {
        let Some(local) = self.host_nets.get(host) else {
            return false;
        };
        local.contains(n) || self.routed(n).any(|m| local.contains(m))
    }

    /// The networks `host` sees.
    fn seen_nets(&self, host: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for l in self.host_nets.get(host).into_iter().flatten() {
            out.insert(l.clone());
            out.extend(self.routed(l).cloned());
        }
        out
    }

    /// The hosts that see network `n`.
    fn viewers(&self, n: &str) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self.bound(n).cloned().collect();
        for m in self.routed(n) {
            out.extend(self.bound(m).cloned());
        }
        out
    }

    /// Records one more (`add`) or one fewer interface port of router `r` on network `n`.
    fn link_router(&mut self, r: &str, n: &str, add: bool) {
        let nets = self.router_nets.entry(r.to_string()).or_default();
        let (first, last) = if add {
            (inc(nets, n.to_string(), 1), false)
        } else {
            (false, dec(nets, &n.to_string(), 1))
        };
        if nets.is_empty() {
            self.router_nets.remove(r);
        }
        if first {
            self.net_routers.entry(n.to_string()).or_default().insert(r.to_string());
        }
        if last {
            if let Some(rs) = self.net_routers.get_mut(n) {
                rs.remove(r);
                if rs.is_empty() {
                    self.net_routers.remove(n);
                }
            }
        }
    }

    /// Records one change; `true` if what a view shows of the key changed.
    fn set(&mut self, key: String, revision: Revision, value: Option<Source>) -> bool {
        let Some((kind, id)) = parse(&key) else { return false };
        let id = id.to_string();
        match kind {
            Kind::Port => {
                if let Some((n, h)) = self.port_loc.remove(&key) {
                    self.unbind(&key, &n, &h);
                    if let Some(r) = self.port_router.remove(&key) {
                        self.link_router(&r, &n, false);
                    }
                }
                if let Some(Source::Port(p)) = &value {
                    let (n, h) = (p.network_id.clone(), p.binding_host_id.clone());
                    if let Some(r) = interface_of(p) {
                        self.link_router(r, &n, true);
                        self.port_router.insert(key.clone(), r.to_string());
                    }
                    self.net_ports.entry(n.clone()).or_default().insert(key.clone());
                    if !h.is_empty() {
                        *self
                            .net_hosts
                            .entry(n.clone())
                            .or_default()
                            .entry(h.clone())
                            .or_default() += 1;
                        self.host_nets.entry(h.clone()).or_default().insert(n.clone());
                    }
                    self.port_loc.insert(key.clone(), (n, h));
                }
                let groups = match &value {
                    Some(Source::Port(p)) => port_groups(p),
                    _ => None,
                };
                self.set_port_groups(&id, revision, groups);
                let qos = match &value {
                    Some(Source::Port(p)) if !p.binding_host_id.is_empty() => {
                        p.qos_policy_id.clone().map(|q| (p.binding_host_id.clone(), q))
                    }
                    _ => None,
                };
                self.set_port_qos(&key, qos);
            }
            Kind::Subnet => {
                if let Some(n) = self.subnet_net.remove(&key) {
                    if let Some(s) = self.net_subnets.get_mut(&n) {
                        s.remove(&key);
                        if s.is_empty() {
                            self.net_subnets.remove(&n);
                        }
                    }
                }
                if let Some(Source::Subnet(s)) = &value {
                    self.subnet_net.insert(key.clone(), s.network_id.clone());
                    self.net_subnets
                        .entry(s.network_id.clone())
                        .or_default()
                        .insert(key.clone());
                }
            }
            Kind::FloatingIp => {
                if let Some(n) = self.fip_net.remove(&key) {
                    if let Some(s) = self.net_fips.get_mut(&n) {
                        s.remove(&key);
                        if s.is_empty() {
                            self.net_fips.remove(&n);
                        }
                    }
                }
                if let Some(Source::FloatingIp(f)) = &value {
                    self.fip_net.insert(key.clone(), f.floating_network_id.clone());
                    self.net_fips
                        .entry(f.floating_network_id.clone())
                        .or_default()
                        .insert(key.clone());
                }
            }
            Kind::Rule => {
                if let Some((g, r)) = self.rule_of.remove(&key) {
                    self.remove_rule(&key, &g, r.as_deref());
                }
                if let Some(Source::SecurityGroupRule(r)) = &value {
                    let (g, rg) = (r.security_group_id.clone(), r.remote_group_id.clone());
                    self.add_rule(&key, &g, rg.as_deref());
                    self.rule_of.insert(key.clone(), (g, rg));
                }
            }
            // Made here, never stored: a stored key of that shape is ignored.
            Kind::Member => return false,
            Kind::Network => match &value {
                Some(Source::Network(n)) if n.qos_policy_id.is_some() => {
                    self.net_qos
                        .insert(id.clone(), n.qos_policy_id.clone().unwrap_or_default());
                }
                _ => {
                    self.net_qos.remove(&id);
                }
            },
            Kind::Node | Kind::Group | Kind::Router | Kind::Policy => {}
        }
        match value.filter(|v| render(&key, v).is_some()) {
            None => self.objects.remove(&key).is_some(),
            Some(v) => {
                // Unchanged as a view shows it: keep the old revision, nothing to send.
                if self.objects.get(&key).is_some_and(|o| same(&o.source, &v)) {
                    return false;
                }
                self.objects.insert(key, Held { revision, source: v });
                true
            }
        }
    }

    /// Records port `id`'s groups, host and addresses (`None`: none, or the port is gone).
    fn set_port_groups(&mut self, id: &str, revision: Revision, new: Option<PortGroups>) {
        let old = self.port_groups.remove(id);
        if let Some(o) = &old {
            for g in &o.groups {
                if !o.host.is_empty() {
                    self.drop_host_group(&o.host, g);
                }
                if !new.as_ref().is_some_and(|n| n.groups.contains(g)) {
                    if let Some(ps) = self.group_ports.get_mut(g) {
                        ps.remove(id);
                        if ps.is_empty() {
                            self.group_ports.remove(g);
                        }
                    }
                }
            }
        }
        let Some(n) = new else { return };
        let same_addresses = old.as_ref().is_some_and(|o| o.addresses == n.addresses);
        for g in &n.groups {
            if !n.host.is_empty() {
                self.add_host_group(&n.host, g);
            }
            let ps = self.group_ports.entry(g.clone()).or_default();
            // An unchanged member object keeps its revision: nothing to send again.
            let kept = same_addresses && old.as_ref().is_some_and(|o| o.groups.contains(g));
            if !kept {
                ps.insert(id.to_string(), revision);
            }
        }
        self.port_groups.insert(id.to_string(), n);
    }

    fn add_host_group(&mut self, h: &str, g: &str) {
        if !inc(self.host_groups.entry(h.to_string()).or_default(), g.to_string(), 1) {
            return;
        }
        self.group_hosts.entry(g.to_string()).or_default().insert(h.to_string());
        for (r, c) in self.remotes_of(g) {
            self.remote_inc(h, &r, c);
        }
    }

    /// The remote groups `g`'s rules name, with how many rules name each.
    fn remotes_of(&self, g: &str) -> Vec<(String, usize)> {
        self.group_remotes
            .get(g)
            .into_iter()
            .flatten()
            .map(|(r, c)| (r.clone(), *c))
            .collect()
    }

    fn drop_host_group(&mut self, h: &str, g: &str) {
        let Some(gs) = self.host_groups.get_mut(h) else { return };
        if !dec(gs, &g.to_string(), 1) {
            return;
        }
        if gs.is_empty() {
            self.host_groups.remove(h);
        }
        if let Some(hs) = self.group_hosts.get_mut(g) {
            hs.remove(h);
            if hs.is_empty() {
                self.group_hosts.remove(g);
            }
        }
        for (r, c) in self.remotes_of(g) {
            self.remote_dec(h, &r, c);
        }
    }

    fn add_rule(&mut self, key: &str, g: &str, remote: Option<&str>) {
        self.group_rules
            .entry(g.to_string())
            .or_default()
            .insert(key.to_string());
        let Some(r) = remote else { return };
        inc(self.group_remotes.entry(g.to_string()).or_default(), r.to_string(), 1);
        let hosts: Vec<String> = self.group_hosts.get(g).into_iter().flatten().cloned().collect();
        for h in hosts {
            self.remote_inc(&h, r, 1);
        }
    }

    fn remove_rule(&mut self, key: &str, g: &str, remote: Option<&str>) {
        if let Some(rs) = self.group_rules.get_mut(g) {
            rs.remove(key);
            if rs.is_empty() {
                self.group_rules.remove(g);
            }
        }
        let Some(r) = remote else { return };
        if let Some(m) = self.group_remotes.get_mut(g) {
            dec(m, &r.to_string(), 1);
            if m.is_empty() {
                self.group_remotes.remove(g);
            }
        }
        let hosts: Vec<String> = self.group_hosts.get(g).into_iter().flatten().cloned().collect();
        for h in hosts {
            self.remote_dec(&h, r, 1);
        }
    }

    fn remote_inc(&mut self, h: &str, r: &str, by: usize) {
        if inc(self.host_remotes.entry(h.to_string()).or_default(), r.to_string(), by) {
            self.remote_hosts
                .entry(r.to_string())
                .or_default()
                .insert(h.to_string());
        }
    }

    fn remote_dec(&mut self, h: &str, r: &str, by: usize) {
        let Some(m) = self.host_remotes.get_mut(h) else { return };
        if !dec(m, &r.to_string(), by) {
            return;
        }
        if m.is_empty() {
            self.host_remotes.remove(h);
        }
        if let Some(hs) = self.remote_hosts.get_mut(r) {
            hs.remove(h);
            if hs.is_empty() {
                self.remote_hosts.remove(r);
            }
        }
    }

    fn unbind(&mut self, key: &str, n: &str, h: &str) {
        if let Some(ps) = self.net_ports.get_mut(n) {
            ps.remove(key);
            if ps.is_empty() {
                self.net_ports.remove(n);
            }
        }
        if h.is_empty() {
            return;
        }
        if let Some(hs) = self.net_hosts.get_mut(n) {
            if let Some(c) = hs.get_mut(h) {
                *c -= 1;
                if *c == 0 {
                    hs.remove(h);
                    if let Some(ns) = self.host_nets.get_mut(h) {
                        ns.remove(n);
                        if ns.is_empty() {
                            self.host_nets.remove(h);
                        }
                    }
                }
            }
            if hs.is_empty() {
                self.net_hosts.remove(n);
            }
        }
    }

    /// Whether `host`'s view holds `key` now, and the object if so.
    fn member<'a>(&'a self, host: &str, key: &'a str) -> Option<Found<'a>> {
        let (kind, id) = parse(key)?;
        let uses = |g: &str| self.host_groups.get(host).is_some_and(|m| m.contains_key(g));
        let inside = match kind {
            Kind::Member => {
                let (g, p) = id.split_once('/')?;
                if !self.host_remotes.get(host).is_some_and(|m| m.contains_key(g)) {
                    return None;
                }
                let revision = *self.group_ports.get(g)?.get(p)?;
                return Some(Found::Member {
                    revision,
                    group: g,
                    port: p,
                    addresses: &self.port_groups.get(p)?.addresses,
                });
            }
            Kind::Group => uses(id),
            Kind::Policy => self.host_policies(host).contains(id),
            Kind::Rule => self.rule_of.get(key).is_some_and(|(g, _)| uses(g)),
            Kind::Network => self.sees(host, id),
            Kind::Subnet => self.subnet_net.get(key).is_some_and(|n| self.sees(host, n)),
            Kind::FloatingIp => self.fip_net.get(key).is_some_and(|n| self.sees(host, n)),
            Kind::Router => self
                .router_nets
                .get(id)
                .is_some_and(|ns| ns.keys().any(|n| self.sees(host, n))),
            Kind::Port => self.port_loc.get(key).is_some_and(|(n, _)| self.sees(host, n)),
            Kind::Node => self
                .host_nets
                .get(id)
                .is_some_and(|theirs| theirs.iter().any(|n| self.sees(host, n))),
        };
        let obj = self.objects.get(key)?;
        inside.then_some(Found::Stored(obj))
    }

    /// What `host` must be sent so that what it has (`sent`: key → revision) matches its
    /// view, looking only at `candidates`: objects to put, keys to delete.
    pub fn delta(
        &self,
        host: &str,
        candidates: &BTreeSet<String>,
        sent: &BTreeMap<String, Revision>,
    ) -> (Vec<(String, Arc<ViewObject>)>, Vec<String>) {
        let mut put = vec![];
        let mut delete = vec![];
        for k in candidates {
            match self.member(host, k) {
                Some(o) if sent.get(k) != Some(&o.revision()) => match o.rendered(k) {
                    Some(r) => put.push((k.clone(), r)),
                    None if sent.contains_key(k) => delete.push(k.clone()),
                    None => {}
                },
                Some(_) => {}
                None if sent.contains_key(k) => delete.push(k.clone()),
                None => {}
            }
        }
        (put, delete)
    }

    /// `host`'s whole view.
    pub fn view(&self, host: &str) -> BTreeMap<String, Arc<ViewObject>> {
        self.all_keys(host)
            .into_iter()
            .filter_map(|k| {
                let o = self.member(host, &k)?.rendered(&k)?;
                Some((k, o))
            })
            .collect()
    }
}

/// The security part of the index before a batch, where the batch may change it.
#[derive(Default)]
struct SecBefore {
    /// Hosts whose groups or remote groups may change, with both before.
    hosts: BTreeSet<String>,
    host_sec: BTreeMap<String, HostSec>,
    /// Changed ports (id) → their member objects' revisions, by group.
    ports: BTreeMap<String, BTreeMap<String, Revision>>,
    /// Changed rules (key) → hosts using their group before.
    rules: BTreeMap<String, BTreeSet<String>>,
    /// Groups of changed ports → hosts naming them as remote before.
    remote_hosts: BTreeMap<String, BTreeSet<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NETS: [&str; 3] = ["n1", "n2", "n3"];
    const HOSTS: [&str; 4] = ["", "h1", "h2", "h3"];

    const GROUPS: [&str; 3] = ["g0", "g1", "g2"];

    /// A port; `sec` bits: 0-2 its groups, 3 an address pair with a CIDR, 4 an address pair
    /// repeating its fixed IP, 5 which fixed IP. `name` 2: an (unbound) interface of router
    /// `R<host % 2>` instead.
    fn port(id: usize, net: usize, host: usize, name: u8, sec: u8) -> Source {
        let (host, device_id, device_owner) = if name == 2 {
            (0, format!("R{}", host % 2), "network:router_interface")
        } else {
            (host, String::new(), "")
        };
        let groups: Vec<&str> = (0..3).filter(|i| sec & (1 << i) != 0).map(|i| GROUPS[i]).collect();
        let ip = format!("10.0.{id}.{}", 1 + (sec >> 5 & 1));
        let mut pairs = vec![];
        if sec & 8 != 0 {
            pairs.push(serde_json::json!({"ip_address": "10.9.0.0/24", "mac_address": ""}));
        }
        if sec & 16 != 0 {
            pairs.push(serde_json::json!({"ip_address": ip, "mac_address": ""}));
        }
        let v = serde_json::json!({
            "id": format!("p{id}"), "network_id": NETS[net], "binding_host_id": HOSTS[host],
            "name": format!("v{name}"), "project_id": "t", "tenant_id": "t",
            "mac_address": format!("fa:16:3e:00:00:{id:02x}"),
            "fixed_ips": [{"subnet_id": "s0", "ip_address": ip}],
            "admin_state_up": true, "status": "DOWN", "device_id": device_id, "device_owner": device_owner,
            "binding_vif_type": "", "binding_vif_details": {}, "binding_profile": {},
            "binding_vnic_type": "normal", "allowed_address_pairs": pairs,
            "security_groups": groups, "port_security_enabled": true,
            "qos_policy_id": policy_of(id + sec as usize),
            "created_at": "t", "updated_at": "t", "revision_number": 0
        });
        Source::Port(Arc::new(serde_json::from_value(v).expect("test port")))
    }

    /// Policy `q0`, `q1` or none, spread over the ports and networks.
    fn policy_of(n: usize) -> Option<&'static str> {
        ["q0", "q1", ""].get(n % 4).copied().filter(|s| !s.is_empty())
    }

    fn policy(q: usize, name: u8) -> Source {
        let v = serde_json::json!({
            "id": format!("q{q}"), "name": format!("v{name}"), "project_id": "t", "shared": false,
            "is_default": false, "bandwidth_limit_rules": [{"id": "b", "max_kbps": 100 + name as u64,
            "max_burst_kbps": 0, "direction": "egress"}],
            "created_at": "t", "updated_at": "t", "revision_number": 0
        });
        Source::QosPolicy(Arc::new(serde_json::from_value(v).expect("test policy")))
    }

    fn group(g: usize, name: u8) -> Source {
        let v = serde_json::json!({
            "id": GROUPS[g], "name": format!("v{name}"), "project_id": "t", "stateful": true,
            "created_at": "t", "updated_at": "t", "revision_number": 0
        });
        Source::SecurityGroup(Arc::new(serde_json::from_value(v).expect("test group")))
    }

    /// A rule of group `g`; `remote` 0: none, else group `remote - 1` (itself included).
    fn rule(id: usize, g: usize, remote: usize, port: u8) -> Source {
        let remote = (remote > 0).then(|| GROUPS[(remote - 1) % 3]);
        let v = serde_json::json!({
            "id": format!("r{id}"), "project_id": "t", "security_group_id": GROUPS[g],
            "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
            "port_range_min": 20 + port, "port_range_max": 20 + port,
            "remote_ip_prefix": null, "remote_group_id": remote,
            "created_at": "t", "updated_at": "t", "revision_number": 0
        });
        Source::SecurityGroupRule(Arc::new(serde_json::from_value(v).expect("test rule")))
    }

    fn network(net: usize, name: u8) -> Source {
        let v = serde_json::json!({
            "id": NETS[net], "name": format!("v{name}"), "project_id": "t", "tenant_id": "t",
            "admin_state_up": true, "status": "ACTIVE", "shared": false, "external": false,
            "mtu": 1450, "subnets": [], "segmentation_id": 100 + net, "port_security_enabled": true,
            "qos_policy_id": policy_of(name as usize + 1),
            "created_at": "t", "updated_at": "t", "revision_number": 0
        });
        Source::Network(Arc::new(serde_json::from_value(v).expect("test network")))
    }

    fn subnet(id: usize, net: usize, name: u8) -> Source {
        let v = serde_json::json!({
            "id": format!("s{id}"), "network_id": NETS[net], "name": format!("v{name}"),
            "project_id": "t", "tenant_id": "t", "ip_version": 4,
            "cidr": format!("10.{id}.0.0/24"), "gateway_ip": null, "enable_dhcp": true,
            "ipv6_ra_mode": null, "ipv6_address_mode": null,
            "allocation_pools": [], "dns_nameservers": [], "host_routes": [],
            "created_at": "t", "updated_at": "t", "revision_number": 0
        });
        Source::Subnet(Arc::new(serde_json::from_value(v).expect("test subnet")))
    }

    fn node(host: usize, ip: u8) -> Source {
        let v = serde_json::json!({
            "id": HOSTS[host], "host": HOSTS[host], "underlay_ip": format!("192.0.2.{ip}"),
            "capabilities": [], "admin_state_up": true,
            "created_unix": 0, "started_unix": 0, "heartbeat_unix": ip
        });
        Source::Node(Arc::new(serde_json::from_value(v).expect("test node")))
    }

    type Spec = (u8, usize, usize, usize, u8, u8, bool);

    /// A random change: (kind, which, attribute a, attribute b, name, port security bits,
    /// delete?).
    fn change() -> impl Strategy<Value = Spec> {
        (
            0u8..7,
            0usize..6,
            0usize..3,
            0usize..4,
            0u8..3,
            0u8..64,
            prop::bool::weighted(0.2),
        )
    }

    fn to_change(rev: Revision, (kind, which, a, b, v, sec, del): Spec) -> Change {
        let (key, value) = match kind {
            0 => (keys::resource("ports", &format!("p{which}")), port(which, a, b, v, sec)),
            1 => (keys::resource("networks", NETS[which % 3]), network(which % 3, v)),
            2 => (
                keys::resource("subnets", &format!("s{}", which % 4)),
                subnet(which % 4, a, v),
            ),
            3 => (keys::resource("nodes", HOSTS[1 + which % 3]), node(1 + which % 3, v)),
            4 => (
                keys::resource("security_groups", GROUPS[which % 3]),
                group(which % 3, v),
            ),
            5 => (
                keys::resource("security_group_rules", &format!("r{which}")),
                rule(which, a, b, v),
            ),
            _ => (
                keys::resource("qos_policies", &format!("q{}", which % 2)),
                policy(which % 2, v),
            ),
        };
        Change {
            key,
            revision: rev,
            value: (!del).then_some(value),
        }
    }

    /// The views computed from scratch, the way the server did before the index: the reference.
    fn reference(current: &BTreeMap<String, (Revision, Source)>, host: &str) -> BTreeMap<String, ObjectValue> {
        let ports: Vec<(&String, &Port)> = current
            .iter()
            .filter_map(|(k, (_, s))| match s {
                Source::Port(p) => Some((k, p.as_ref())),
                _ => None,
            })
            .collect();
        let local: BTreeSet<&str> = ports
            .iter()
            .filter(|(_, p)| p.binding_host_id == host && !host.is_empty())
            .map(|(_, p)| p.network_id.as_str())
            .collect();
        // Routers' networks, from their interface ports; a host also sees every network a
        // router connects to one of its own.
        let mut router_nets: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (_, p) in &ports {
            if is_router_port(&p.device_owner) && !p.device_id.is_empty() {
                router_nets
                    .entry(p.device_id.as_str())
                    .or_default()
                    .insert(p.network_id.as_str());
            }
        }
        let mut nets = local.clone();
        for rn in router_nets.values() {
            if rn.iter().any(|n| local.contains(n)) {
                nets.extend(rn.iter().copied());
            }
        }
        let groups: BTreeSet<&str> = ports
            .iter()
            .filter(|(_, p)| p.binding_host_id == host && !host.is_empty())
            .flat_map(|(_, p)| p.security_groups.iter().map(String::as_str))
            .collect();
        // QoS policies of the host's bound ports and of the networks it has one on.
        let mut policies: BTreeSet<&str> = ports
            .iter()
            .filter(|(_, p)| p.binding_host_id == host && !host.is_empty())
            .filter_map(|(_, p)| p.qos_policy_id.as_deref())
            .collect();
        for (_, s) in current.values() {
            if let Source::Network(n) = s {
                if local.contains(n.id.as_str()) {
                    policies.extend(n.qos_policy_id.as_deref());
                }
            }
        }
        let mut hosts = BTreeSet::new();
        let mut out = BTreeMap::new();
        for (k, p) in &ports {
            if nets.contains(p.network_id.as_str()) {
                if !p.binding_host_id.is_empty() {
                    hosts.insert(p.binding_host_id.clone());
                }
                out.insert((*k).clone(), render(k, &current[*k].1).expect("renders"));
            }
        }
        for (k, (_, s)) in current {
            let keep = match s {
                Source::Network(n) => nets.contains(n.id.as_str()),
                Source::Subnet(sn) => nets.contains(sn.network_id.as_str()),
                Source::Node(n) => hosts.contains(&n.host),
                Source::Port(_) => false,
                Source::SecurityGroup(g) => groups.contains(g.id.as_str()),
                Source::SecurityGroupRule(r) => groups.contains(r.security_group_id.as_str()),
                Source::Router(r) => router_nets
                    .get(r.id.as_str())
                    .is_some_and(|ns| ns.iter().any(|n| nets.contains(n))),
                Source::FloatingIp(f) => nets.contains(f.floating_network_id.as_str()),
                Source::QosPolicy(q) => policies.contains(q.id.as_str()),
            };
            if keep {
                out.insert(k.clone(), render(k, s).expect("renders"));
            }
        }
        // Members of the remote groups the local groups' rules name, ports anywhere.
        let remotes: BTreeSet<&str> = current
            .values()
            .filter_map(|(_, s)| match s {
                Source::SecurityGroupRule(r) if groups.contains(r.security_group_id.as_str()) => {
                    r.remote_group_id.as_deref()
                }
                _ => None,
            })
            .collect();
        for (_, p) in &ports {
            for g in &p.security_groups {
                if remotes.contains(g.as_str()) {
                    let m = GroupMember {
                        security_group_id: g.clone(),
                        port_id: p.id.clone(),
                        addresses: member_addresses(p),
                    };
                    out.insert(member_key(g, &p.id), ObjectValue::GroupMember(m));
                }
            }
        }
        out
    }

    /// A port change that leaves its addresses alone sends no member object again; one that
    /// changes them sends it with the port change's revision.
    #[test]
    fn member_objects_follow_addresses_only() {
        let mut idx = ViewIndex::new();
        idx.load(vec![
            Change {
                key: keys::resource("ports", "p0"),
                revision: 1,
                value: Some(port(0, 0, 1, 0, 1)),
            },
            Change {
                key: keys::resource("ports", "p1"),
                revision: 2,
                value: Some(port(1, 1, 2, 0, 1)),
            },
            Change {
                key: keys::resource("security_group_rules", "r0"),
                revision: 3,
                value: Some(rule(0, 0, 1, 0)),
            },
        ]);
        let view = idx.view("h1");
        let m = member_key("g0", "p1");
        assert_eq!(view[&m].revision, 2, "{view:?}");
        let sent: BTreeMap<String, Revision> = view.iter().map(|(k, o)| (k.clone(), o.revision)).collect();
        // A rename: the port is not on h1's network, its member object is unchanged.
        let rename = Change {
            key: keys::resource("ports", "p1"),
            revision: 4,
            value: Some(port(1, 1, 2, 1, 1)),
        };
        let affected = idx.apply(vec![rename]);
        let (put, delete) = idx.delta("h1", affected.get("h1").unwrap_or(&BTreeSet::new()), &sent);
        assert!(put.is_empty() && delete.is_empty(), "{put:?} {delete:?}");
        // A new address pair: the member object again, at that revision.
        let pair = Change {
            key: keys::resource("ports", "p1"),
            revision: 5,
            value: Some(port(1, 1, 2, 1, 1 | 8)),
        };
        let affected = idx.apply(vec![pair]);
        let (put, delete) = idx.delta("h1", &affected["h1"], &sent);
        assert_eq!(put.len(), 1, "{put:?}");
        assert!(delete.is_empty());
        assert_eq!((put[0].0.as_str(), put[0].1.revision), (m.as_str(), 5));
        let ObjectValue::GroupMember(g) = &put[0].1.value else {
            panic!("{put:?}")
        };
        assert_eq!(g.addresses, ["10.0.1.1", "10.9.0.0/24"]);
    }

    proptest! {
        // PROPTEST_CASES, when set, for a longer run.
        #![proptest_config(ProptestConfig::with_cases(
            std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(400)
        ))]
        /// After every batch, applying each affected host's delta to what it has yields
        /// exactly its view computed from scratch, for every host; and hosts not named are
        /// ones whose view did not change.
        #[test]
        fn deltas_keep_every_view_exact(batches in prop::collection::vec(prop::collection::vec(change(), 1..4), 1..40)) {
            let mut idx = ViewIndex::new();
            let mut current: BTreeMap<String, (Revision, Source)> = BTreeMap::new();
            let mut sent: BTreeMap<&str, BTreeMap<String, Revision>> =
                HOSTS[1..].iter().map(|h| (*h, BTreeMap::new())).collect();
            let mut rev = 0;
            for batch in batches {
                let mut changes = vec![];
                for c in batch {
                    rev += 1;
                    let ch = to_change(rev, c);
                    match &ch.value {
                        Some(v) => { current.insert(ch.key.clone(), (rev, v.clone())); }
                        None => { current.remove(&ch.key); }
                    }
                    changes.push(ch);
                }
                let affected = idx.apply(changes);
                for (h, cand) in &affected {
                    let Some(have) = sent.get_mut(h.as_str()) else { continue };
                    let (put, delete) = idx.delta(h, cand, have);
                    for (k, o) in put { have.insert(k, o.revision); }
                    for k in delete { have.remove(&k); }
                }
                for h in &HOSTS[1..] {
                    let want = reference(&current, h);
                    let have = &sent[h];
                    prop_assert_eq!(
                        have.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(),
                        "host {} after revision {}", h, rev
                    );
                    let view = idx.view(h);
                    for (k, v) in &want {
                        prop_assert_eq!(&view[k].value, v);
                        prop_assert_eq!(have[k], view[k].revision);
                    }
                }
            }
        }
    }
}
