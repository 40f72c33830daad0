//! Which node needs which object, kept up to date one change at a time.
//!
//! A node's view is: for each network it has a bound port on, that network, its subnets, all
//! its ports, and the node records of every host with a port on it. Recomputing that from the
//! whole cache for every open stream on every write costs O(nodes × ports) per write; here
//! reverse indexes (port → network and host, network → hosts, ports and subnets, host →
//! networks) turn a change into the hosts it concerns and the keys to look at for each, so a
//! write costs what it touches.
//!
//! Pure: no I/O, no clocks. The caller keeps what each node was sent (key → revision) and
//! turns [`ViewIndex::affected`]'s answer into puts and deletes with [`ViewIndex::delta`].

use isthmus_model::{keys, Network, Node, Port, Subnet};
use isthmus_store::Revision;
use isthmus_wire::stream::{NodeInfo, ObjectValue};
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
}

/// The kind and id of a view key, `None` for keys views never hold.
fn parse(key: &str) -> Option<(Kind, &str)> {
    let (coll, id) = key.strip_prefix(keys::ROOT)?.rsplit_once('/')?;
    if id.is_empty() {
        return None;
    }
    let kind = match coll {
        "ports" => Kind::Port,
        "networks" => Kind::Network,
        "subnets" => Kind::Subnet,
        "nodes" => Kind::Node,
        _ => return None,
    };
    Some((kind, id))
}

/// Whether a view may hold this key (a port, network, subnet or node record).
pub fn is_view_key(key: &str) -> bool {
    parse(key).is_some()
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
        Source::Port(p) => ObjectValue::Port(typed(key, p.to_api(true))?),
        Source::Network(n) => ObjectValue::Network(typed(key, n.to_api(true))?),
        Source::Subnet(s) => ObjectValue::Subnet(typed(key, s.to_api())?),
        Source::Node(n) => ObjectValue::Node(NodeInfo {
            host: n.host.clone(),
            underlay_ip: n.underlay_ip.clone(),
            capabilities: n.capabilities.clone(),
        }),
    })
}

/// A stored object the index holds: the cache's own decoded value (shared, not copied) and
/// its revision. It is rendered for the stream only when sent.
#[derive(Debug, Clone)]
struct Held {
    revision: Revision,
    source: Source,
}

impl Held {
    fn rendered(&self, key: &str) -> Option<Arc<ViewObject>> {
        Some(Arc::new(ViewObject {
            revision: self.revision,
            value: render(key, &self.source)?,
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
        _ => false,
    }
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
}

impl ViewIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Objects held (shared by all views).
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Applies a batch of changes and answers, for every host whose view may have changed,
    /// the keys to look at (see [`ViewIndex::delta`]).
    pub fn apply(&mut self, changes: Vec<Change>) -> BTreeMap<String, BTreeSet<String>> {
        // Networks whose members or contents change, and the networks each changed key
        // belongs to (before and after; a node record: the networks its host is on).
        let mut nets: BTreeSet<String> = BTreeSet::new();
        let mut key_nets: Vec<(String, BTreeSet<String>)> = Vec::with_capacity(changes.len());
        let mut node_hosts: Vec<(String, String)> = vec![];
        for c in &changes {
            let Some((kind, id)) = parse(&c.key) else { continue };
            let mut mine = BTreeSet::new();
            match kind {
                Kind::Port => {
                    if let Some((n, _)) = self.port_loc.get(&c.key) {
                        mine.insert(n.clone());
                    }
                    if let Some(Source::Port(p)) = &c.value {
                        mine.insert(p.network_id.clone());
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
            }
            nets.extend(mine.iter().cloned());
            key_nets.push((c.key.clone(), mine));
        }
        // The hosts on those networks before, with their networks then and each network's
        // hosts then.
        let mut before: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut hosts_before: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for n in &nets {
            let hs: BTreeSet<String> = self
                .net_hosts
                .get(n)
                .into_iter()
                .flat_map(|m| m.keys().cloned())
                .collect();
            for h in &hs {
                before
                    .entry(h.clone())
                    .or_insert_with(|| self.host_nets.get(h).cloned().unwrap_or_default());
            }
            hosts_before.insert(n.clone(), hs);
        }
        let mut changed: BTreeSet<String> = BTreeSet::new();
        for c in changes {
            if self.set(c.key.clone(), c.revision, c.value) {
                changed.insert(c.key);
            }
        }
        // A node record also concerns the networks its host is on now.
        for (key, host) in &node_hosts {
            if let Some(entry) = key_nets.iter_mut().find(|(k, _)| k == key) {
                entry.1.extend(self.host_nets.get(host).into_iter().flatten().cloned());
            }
        }
        // Each touched network's hosts before and after.
        let mut on_net: BTreeMap<&String, BTreeSet<String>> = BTreeMap::new();
        for n in &nets {
            let mut hs = hosts_before.remove(n).unwrap_or_default();
            hs.extend(self.net_hosts.get(n).into_iter().flat_map(|m| m.keys().cloned()));
            on_net.insert(n, hs);
        }
        let hosts: BTreeSet<String> = on_net.values().flatten().cloned().collect();
        let mut out = BTreeMap::new();
        for h in hosts {
            let old = before.get(&h).cloned().unwrap_or_default();
            let new = self.host_nets.get(&h).cloned().unwrap_or_default();
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
        out
    }

    /// Loads objects without working out who they concern (a fresh index).
    pub fn load(&mut self, changes: Vec<Change>) {
        for c in changes {
            self.set(c.key, c.revision, c.value);
        }
    }

    /// The keys of `host`'s whole view, without rendering anything.
    pub fn view_keys(&self, host: &str) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        for n in self.host_nets.get(host).into_iter().flatten() {
            self.net_keys(n, &mut keys);
        }
        keys.retain(|k| self.member(host, k).is_some());
        keys
    }

    /// Every key of network `n`'s part of a view (network, subnets, ports, node records).
    fn net_keys(&self, n: &str, out: &mut BTreeSet<String>) {
        out.insert(keys::resource("networks", n));
        out.extend(self.net_subnets.get(n).into_iter().flatten().cloned());
        out.extend(self.net_ports.get(n).into_iter().flatten().cloned());
        for h in self.net_hosts.get(n).into_iter().flat_map(|m| m.keys()) {
            out.insert(keys::resource("nodes", h));
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
                }
                if let Some(Source::Port(p)) = &value {
                    let (n, h) = (p.network_id.clone(), p.binding_host_id.clone());
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
            Kind::Network | Kind::Node => {}
        }
        let _ = id;
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
    fn member(&self, host: &str, key: &str) -> Option<&Held> {
        let nets = self.host_nets.get(host)?;
        let obj = self.objects.get(key)?;
        let (kind, id) = parse(key)?;
        let inside = match kind {
            Kind::Network => nets.contains(id),
            Kind::Subnet => self.subnet_net.get(key).is_some_and(|n| nets.contains(n)),
            Kind::Port => self.port_loc.get(key).is_some_and(|(n, _)| nets.contains(n)),
            Kind::Node => self
                .host_nets
                .get(id)
                .is_some_and(|theirs| theirs.iter().any(|n| nets.contains(n))),
        };
        inside.then_some(obj)
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
                Some(o) if sent.get(k) != Some(&o.revision) => match o.rendered(k) {
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
        let mut keys = BTreeSet::new();
        for n in self.host_nets.get(host).into_iter().flatten() {
            self.net_keys(n, &mut keys);
        }
        keys.into_iter()
            .filter_map(|k| {
                let o = self.member(host, &k)?.rendered(&k)?;
                Some((k, o))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NETS: [&str; 3] = ["n1", "n2", "n3"];
    const HOSTS: [&str; 4] = ["", "h1", "h2", "h3"];

    fn port(id: usize, net: usize, host: usize, name: u8) -> Source {
        let v = serde_json::json!({
            "id": format!("p{id}"), "network_id": NETS[net], "binding_host_id": HOSTS[host],
            "name": format!("v{name}"), "project_id": "t", "tenant_id": "t",
            "mac_address": format!("fa:16:3e:00:00:{id:02x}"), "fixed_ips": [],
            "admin_state_up": true, "status": "DOWN", "device_id": "", "device_owner": "",
            "binding_vif_type": "", "binding_vif_details": {}, "binding_profile": {},
            "binding_vnic_type": "normal", "allowed_address_pairs": [],
            "security_groups": [], "port_security_enabled": true,
            "created_at": "t", "updated_at": "t", "revision_number": 0
        });
        Source::Port(Arc::new(serde_json::from_value(v).expect("test port")))
    }

    fn network(net: usize, name: u8) -> Source {
        let v = serde_json::json!({
            "id": NETS[net], "name": format!("v{name}"), "project_id": "t", "tenant_id": "t",
            "admin_state_up": true, "status": "ACTIVE", "shared": false, "external": false,
            "mtu": 1450, "subnets": [], "segmentation_id": 100 + net, "port_security_enabled": true,
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

    /// A random change: (kind, which, attribute a, attribute b, delete?).
    fn change() -> impl Strategy<Value = (u8, usize, usize, usize, u8, bool)> {
        (
            0u8..4,
            0usize..6,
            0usize..3,
            0usize..4,
            0u8..3,
            prop::bool::weighted(0.2),
        )
    }

    fn to_change(rev: Revision, (kind, which, a, b, v, del): (u8, usize, usize, usize, u8, bool)) -> Change {
        let (key, value) = match kind {
            0 => (keys::resource("ports", &format!("p{which}")), port(which, a, b, v)),
            1 => (keys::resource("networks", NETS[which % 3]), network(which % 3, v)),
            2 => (
                keys::resource("subnets", &format!("s{}", which % 4)),
                subnet(which % 4, a, v),
            ),
            _ => (keys::resource("nodes", HOSTS[1 + which % 3]), node(1 + which % 3, v)),
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
        let nets: BTreeSet<&str> = ports
            .iter()
            .filter(|(_, p)| p.binding_host_id == host && !host.is_empty())
            .map(|(_, p)| p.network_id.as_str())
            .collect();
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
            };
            if keep {
                out.insert(k.clone(), render(k, s).expect("renders"));
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
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
