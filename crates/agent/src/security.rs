//! Security groups and port security as nftables objects: the desired firewall of a node as a
//! pure function of its view, its rendering as one nft ruleset, and the patch that turns one
//! desired state into another in a single transaction.
//!
//! Layout (see ARCHITECTURE.md, "Firewall"):
//! - `table bridge isthmus`: every bridged frame passes `from_ports` (forward, priority 10),
//!   which dispatches on the input interface through the verdict map `port_out` to the port's
//!   egress chain, then `to_ports` (priority 20), which dispatches on the output interface
//!   through `port_in` to its ingress chain. A port chain checks anti-spoofing (sets `mac`,
//!   `src4`, `src6` keyed by interface), lets what Neutron always allows pass, then jumps to one
//!   chain per security group and direction (`g-<id>-in`/`-out`, shared by every local port in
//!   the group); a matching rule accepts, and the port chain ends in drop. Remote groups are
//!   named sets (`r4-<id>`, `r6-<id>`) patched element by element.
//! - `table inet isthmus`: the kernel here has no conntrack for the bridge family, so bridged
//!   IP traffic goes through the inet hooks (`bridge-nf-call-iptables`), where `zone` puts each
//!   network's traffic in its own conntrack zone and `state` copies the connection's state into
//!   two bits of the packet mark, which the bridge chains read.
//!
//! Established connections (ARCHITECTURE.md, "Fast path and generations"): a reply (or
//! related) packet passes. A packet in the original direction is checked against the rules
//! until one has passed under the current [`Generation`] of the firewall: that packet stamps
//! the generation into the connection's conntrack mark (chain `post`), and later packets of the
//! connection, in both directions, skip the rules (anti-spoofing still applies: the fast path
//! matches the port's exact addresses). Every change to the firewall starts a new generation,
//! so after any change each connection is checked once more: one a removed rule allowed is
//! dropped at its next original-direction packet, and one still allowed goes on. Stateless
//! ports never take the fast path.

use crate::names;
use crate::objects::Objects;
use ipnet::IpNet;
use isthmus_wire::stream::{ObjectValue, Port};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;

pub use crate::kernel::FIREWALL_TABLE as TABLE;
/// Mark bits carrying the connection state from the inet hooks to the bridge chains.
const CT_MASK: u32 = 0x3000_0000;
const CT_REPLY: u32 = 0x1000_0000;
const CT_INVALID: u32 = 0x2000_0000;
/// Packet mark: an established connection whose verdict was reached under this generation.
const FAST: u32 = 0x4000_0000;
/// Packet mark: the parity of the generation the `state` chain saw. `post` stamps a connection
/// only if its own generation has the same parity, so a packet that met the old rules while a
/// transaction committed cannot stamp the new generation.
const SEEN_EVEN: u32 = 0x0400_0000;
const SEEN_ODD: u32 = 0x0800_0000;
/// Every packet mark bit of ours (cleared on entry to `state`).
const MARK_OURS: u32 = CT_MASK | FAST | SEEN_EVEN | SEEN_ODD;
/// Conntrack mark bits holding the generation (the top byte is left to others).
const GEN_MASK: u32 = 0x00ff_ffff;

/// A firewall generation: the conntrack mark value of connections whose verdict is current.
/// Consecutive generations differ in parity; a fresh one comes from the clock (10 ms steps, so
/// a restarted agent does not reuse a recent value: it wraps after about 46 hours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u32);

impl Generation {
    pub fn first(unix_ms: u128) -> Generation {
        let g = ((unix_ms / 10) as u32) & GEN_MASK;
        Generation(if g == 0 { 1 } else { g })
    }

    /// The generation after this one: from the clock, but never equal and never of the same
    /// parity.
    pub fn next(self, unix_ms: u128) -> Generation {
        let mut g = Generation::first(unix_ms).0;
        if g & 1 == self.0 & 1 {
            g = (g + 1) & GEN_MASK;
        }
        if g == 0 {
            g = if self.0 & 1 == 1 { 2 } else { 1 };
        }
        Generation(g)
    }

    pub fn value(self) -> u32 {
        self.0
    }

    fn seen(self) -> u32 {
        if self.0 & 1 == 0 {
            SEEN_EVEN
        } else {
            SEEN_ODD
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Remote {
    Any,
    Prefix(IpNet),
    Group(String),
}

/// One rule, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub id: String,
    pub direction: Direction,
    pub v6: bool,
    pub protocol: Option<u8>,
    /// Destination ports (TCP, UDP, SCTP, UDP-Lite, DCCP).
    pub ports: Option<(u16, u16)>,
    /// ICMP type and code.
    pub icmp: Option<(u8, Option<u8>)>,
    pub remote: Remote,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub stateful: bool,
    pub rules: Vec<Rule>,
}

/// A local port the firewall applies to (port security on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwPort {
    pub port_id: String,
    pub dev: String,
    pub stateful: bool,
    pub groups: Vec<String>,
    /// MACs the port may send from.
    pub macs: BTreeSet<String>,
    /// (MAC, source prefix) pairs the port may send IP from.
    pub src4: BTreeSet<(String, IpNet)>,
    pub src6: BTreeSet<(String, IpNet)>,
}

/// What a node's firewall must be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Whether the tables exist at all (the node has ports).
    pub present: bool,
    pub ports: BTreeMap<String, FwPort>,
    pub groups: BTreeMap<String, Group>,
    /// Remote group → its members' addresses (IPv4, IPv6).
    pub remotes: BTreeMap<String, (BTreeSet<IpNet>, BTreeSet<IpNet>)>,
    /// Bridges and VXLAN devices → conntrack zone of their network.
    pub zones: BTreeMap<String, u16>,
}

fn proto_number(p: &str) -> Option<u8> {
    Some(match p.to_ascii_lowercase().as_str() {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "ipv6-icmp" | "icmpv6" => 58,
        "sctp" => 132,
        "udplite" => 136,
        "dccp" => 33,
        "gre" => 47,
        "esp" => 50,
        "ah" => 51,
        "igmp" => 2,
        "vrrp" | "112" => 112,
        "any" => return None,
        other => other.parse().ok()?,
    })
}

fn has_ports(p: u8) -> bool {
    matches!(p, 6 | 17 | 33 | 132 | 136)
}

/// A rule as the node enforces it; `None` for one it cannot read (logged by the caller as
/// skipped — a rule that cannot be read allows nothing).
pub fn parse_rule(r: &isthmus_wire::stream::SecurityGroupRule) -> Option<Rule> {
    let direction = match r.direction.as_str() {
        "ingress" => Direction::Ingress,
        "egress" => Direction::Egress,
        _ => return None,
    };
    let v6 = match r.ethertype.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        _ => return None,
    };
    let protocol = match r.protocol.as_deref() {
        None | Some("") => None,
        Some(p) => Some(proto_number(p)?),
    };
    // ICMP of the other family is the same rule (Neutron canonicalises it too).
    let protocol = match (protocol, v6) {
        (Some(1), true) => Some(58),
        (Some(58), false) => Some(1),
        (p, _) => p,
    };
    let (mut ports, mut icmp) = (None, None);
    match protocol {
        Some(p) if has_ports(p) => {
            if let Some(min) = r.port_range_min {
                let max = r.port_range_max.unwrap_or(min);
                let (min, max) = (u16::try_from(min).ok()?, u16::try_from(max).ok()?);
                if min > max {
                    return None;
                }
                if !(min == 1 && max == 65535) {
                    ports = Some((min, max));
                }
            }
        }
        Some(1 | 58) => {
            if let Some(t) = r.port_range_min {
                let code = match r.port_range_max {
                    Some(c) => Some(u8::try_from(c).ok()?),
                    None => None,
                };
                icmp = Some((u8::try_from(t).ok()?, code));
            }
        }
        _ => {}
    }
    let remote = match (&r.remote_ip_prefix, &r.remote_group_id) {
        (Some(p), _) if !p.is_empty() => {
            let net: IpNet = p
                .parse()
                .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                .ok()?
                .trunc();
            if net.addr().is_ipv6() != v6 {
                return None;
            }
            if net.prefix_len() == 0 {
                Remote::Any
            } else {
                Remote::Prefix(net)
            }
        }
        (_, Some(g)) if !g.is_empty() => Remote::Group(g.clone()),
        _ => Remote::Any,
    };
    Some(Rule {
        id: r.id.clone(),
        direction,
        v6,
        protocol,
        ports,
        icmp,
        remote,
    })
}

fn parse_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .ok()
}

/// Ports whose traffic the firewall checks: bound here, with a MAC, port security on.
fn secured(p: &Port, node: &str) -> bool {
    !p.id.is_empty() && p.host_id == node && !p.mac_address.is_empty() && p.port_security_enabled.unwrap_or(true)
}

/// The node's firewall, from its objects.
pub fn desired(objects: &Objects, node: &str) -> Desired {
    let mut d = Desired::default();
    let mut group_state: BTreeMap<String, bool> = BTreeMap::new();
    let mut rules: BTreeMap<String, Vec<Rule>> = BTreeMap::new();
    let mut members: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for o in objects.by_key.values() {
        match &o.value {
            ObjectValue::SecurityGroup(g) if !g.id.is_empty() => {
                group_state.insert(g.id.clone(), g.stateful.unwrap_or(true));
            }
            ObjectValue::SecurityGroupRule(r) => match parse_rule(r) {
                Some(rule) => rules.entry(r.security_group_id.clone()).or_default().push(rule),
                None => tracing::warn!(rule = %r.id, "security group rule skipped: cannot be enforced as given"),
            },
            ObjectValue::GroupMember(m) => {
                members
                    .entry(m.security_group_id.clone())
                    .or_default()
                    .extend(m.addresses.iter().map(String::as_str));
            }
            _ => {}
        }
    }
    let mut has_local = false;
    let mut local_nets = BTreeSet::new();
    for p in objects.ports() {
        if p.host_id != node || p.id.is_empty() {
            continue;
        }
        has_local = true;
        local_nets.insert(p.network_id.clone());
        if !secured(p, node) {
            continue;
        }
        let mac = p.mac_address.to_ascii_lowercase();
        let mut fp = FwPort {
            port_id: p.id.clone(),
            dev: names::tap(&p.id),
            stateful: false,
            groups: vec![],
            macs: BTreeSet::from([mac.clone()]),
            src4: BTreeSet::new(),
            src6: BTreeSet::new(),
        };
        // DHCP discovery, ARP probes and IPv6 duplicate address detection send from the
        // unspecified address; IPv6 link-local addresses are the port's own to use.
        fp.src4.insert((mac.clone(), IpNet::from(IpAddr::from([0, 0, 0, 0]))));
        fp.src6.insert((mac.clone(), IpNet::from(IpAddr::from([0u16; 8]))));
        if let Ok(ll) = "fe80::/64".parse() {
            fp.src6.insert((mac.clone(), ll));
        }
        for f in &p.fixed_ips {
            if let Some(n) = parse_net(&f.ip_address) {
                let set = if n.addr().is_ipv6() { &mut fp.src6 } else { &mut fp.src4 };
                set.insert((mac.clone(), n));
            }
        }
        for pair in &p.allowed_address_pairs {
            let pm = if pair.mac_address.is_empty() {
                mac.clone()
            } else {
                pair.mac_address.to_ascii_lowercase()
            };
            if let Some(n) = parse_net(&pair.ip_address) {
                fp.macs.insert(pm.clone());
                let set = if n.addr().is_ipv6() { &mut fp.src6 } else { &mut fp.src4 };
                set.insert((pm, n));
            }
        }
        let mut groups: Vec<String> = p.security_groups.clone();
        groups.sort();
        groups.dedup();
        // A group not in the view (yet) allows nothing, as an empty one would.
        groups.retain(|g| group_state.contains_key(g));
        fp.stateful = groups.iter().any(|g| group_state.get(g).copied().unwrap_or(true));
        if groups.is_empty() {
            // No group: only what is always allowed; keep connection tracking for replies.
            fp.stateful = true;
        }
        fp.groups = groups;
        d.ports.insert(fp.dev.clone(), fp);
    }
    d.present = has_local;
    for fp in d.ports.values() {
        for g in &fp.groups {
            if d.groups.contains_key(g) {
                continue;
            }
            let mut rs = rules.get(g).cloned().unwrap_or_default();
            rs.sort();
            d.groups.insert(
                g.clone(),
                Group {
                    stateful: group_state.get(g).copied().unwrap_or(true),
                    rules: rs,
                },
            );
        }
    }
    for g in d.groups.values() {
        for r in &g.rules {
            if let Remote::Group(rg) = &r.remote {
                let e = d.remotes.entry(rg.clone()).or_default();
                for a in members.get(rg).into_iter().flatten() {
                    if let Some(n) = parse_net(a) {
                        if n.addr().is_ipv6() {
                            e.1.insert(n);
                        } else {
                            e.0.insert(n);
                        }
                    }
                }
            }
        }
    }
    // Networks a local router routes into have bridges here too: zone them the same way.
    for nets in crate::objects::router_networks(objects).into_values() {
        if nets.iter().any(|n| local_nets.contains(n)) {
            local_nets.extend(nets);
        }
    }
    for n in &local_nets {
        if let Some(vni) = objects.network(n).and_then(|n| n.segmentation_id) {
            if let Ok(vni) = u32::try_from(vni) {
                let zone = zone_of(vni);
                d.zones.insert(names::bridge(vni), zone);
            }
        }
    }
    d
}

/// Conntrack zone of a network: its VNI folded into 1..=65535 (zone 0 is the host's).
pub fn zone_of(vni: u32) -> u16 {
    (vni % 65535 + 1) as u16
}

fn short(id: &str) -> String {
    // Chain and set names are at most 256 characters; ids are UUIDs. Keep them readable.
    id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect()
}

fn group_chain(g: &str, dir: Direction) -> String {
    format!(
        "g-{}-{}",
        short(g),
        if dir == Direction::Ingress { "in" } else { "out" }
    )
}

/// The chain of ports with exactly these groups: shared by all of them.
fn set_chain(groups: &[String], dir: Direction) -> String {
    // FNV-1a: stable across runs and versions, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in groups.join(",").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("s-{h:016x}-{}", if dir == Direction::Ingress { "in" } else { "out" })
}

fn remote_set(g: &str, v6: bool) -> String {
    format!("r{}-{}", if v6 { 6 } else { 4 }, short(g))
}

/// One rule as nft statements (ending in accept).
fn rule_text(r: &Rule) -> String {
    let mut s = String::new();
    s.push_str(if r.v6 { "ether type ip6 " } else { "ether type ip " });
    let fam = if r.v6 { "ip6" } else { "ip" };
    // Ingress rules are about where a packet comes from, egress about where it goes.
    let addr = if r.direction == Direction::Ingress {
        "saddr"
    } else {
        "daddr"
    };
    match &r.remote {
        Remote::Any => {}
        Remote::Prefix(n) => {
            let _ = write!(s, "{fam} {addr} {n} ");
        }
        Remote::Group(g) => {
            let _ = write!(s, "{fam} {addr} @{} ", remote_set(g, r.v6));
        }
    }
    if let Some(p) = r.protocol {
        let _ = write!(s, "meta l4proto {p} ");
        if let Some((min, max)) = r.ports {
            if min == max {
                let _ = write!(s, "th dport {min} ");
            } else {
                let _ = write!(s, "th dport {min}-{max} ");
            }
        }
        if let Some((t, code)) = r.icmp {
            let kw = if r.v6 { "icmpv6" } else { "icmp" };
            let _ = write!(s, "{kw} type {t} ");
            if let Some(c) = code {
                let _ = write!(s, "{kw} code {c} ");
            }
        }
    }
    s.push_str("accept");
    s
}

/// An element of a group's `protocol . address . port` lookup set.
type Lookup = (u8, IpNet, (u16, u16));

/// A rule that fits a lookup: a port protocol, remote anywhere or a prefix. As an element of
/// the group's `protocol . address . port` set.
fn lookup_elem(r: &Rule) -> Option<Lookup> {
    let p = r.protocol.filter(|p| has_ports(*p))?;
    let net = match &r.remote {
        Remote::Any if r.v6 => "::/0".parse().ok()?,
        Remote::Any => "0.0.0.0/0".parse().ok()?,
        Remote::Prefix(n) => *n,
        Remote::Group(_) => return None,
    };
    Some((p, net, r.ports.unwrap_or((0, 65535))))
}

fn overlap(a: &Lookup, b: &Lookup) -> bool {
    a.0 == b.0 && (a.1.contains(&b.1) || b.1.contains(&a.1)) && a.2 .0 <= b.2 .1 && b.2 .0 <= a.2 .1
}

/// A group's rules of one direction, split: elements of its lookup sets (IPv4, IPv6), and the
/// rest as rules. The kernel refuses overlapping elements in such a set, so a rule overlapping
/// one already in the set stays a rule of its own.
fn split_rules(g: &Group, dir: Direction) -> ([Vec<Lookup>; 2], Vec<&Rule>) {
    let mut sets: [Vec<Lookup>; 2] = [vec![], vec![]];
    let mut rest = vec![];
    for r in g.rules.iter().filter(|r| r.direction == dir) {
        match lookup_elem(r) {
            Some(e) if !sets[usize::from(r.v6)].iter().any(|x| overlap(x, &e)) => sets[usize::from(r.v6)].push(e),
            _ => rest.push(r),
        }
    }
    (sets, rest)
}

fn lookup_set(g: &str, dir: Direction, v6: bool) -> String {
    format!(
        "l{}-{}-{}",
        if v6 { 6 } else { 4 },
        short(g),
        if dir == Direction::Ingress { "in" } else { "out" }
    )
}

/// The lookup sets of every group in use, with their elements.
fn lookup_elems(d: &Desired) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for (id, g) in &d.groups {
        for dir in [Direction::Ingress, Direction::Egress] {
            let (sets, _) = split_rules(g, dir);
            for (i, elems) in sets.iter().enumerate() {
                if elems.is_empty() {
                    continue;
                }
                let set = elems
                    .iter()
                    .map(|(p, n, (a, b))| {
                        if a == b {
                            format!("{p} . {n} . {a}")
                        } else {
                            format!("{p} . {n} . {a}-{b}")
                        }
                    })
                    .collect();
                out.insert(lookup_set(id, dir, i == 1), set);
            }
        }
    }
    out
}

fn group_rules(id: &str, g: &Group, dir: Direction) -> Vec<String> {
    let (sets, rest) = split_rules(g, dir);
    let addr = if dir == Direction::Ingress { "saddr" } else { "daddr" };
    let mut out = vec![];
    for (i, elems) in sets.iter().enumerate() {
        if !elems.is_empty() {
            let (et, fam) = if i == 1 { ("ip6", "ip6") } else { ("ip", "ip") };
            out.push(format!(
                "ether type {et} meta l4proto . {fam} {addr} . th dport @{} accept",
                lookup_set(id, dir, i == 1)
            ));
        }
    }
    out.extend(rest.into_iter().map(rule_text));
    out
}

/// The checks every secured port gets, keyed by interface: anti-spoofing, what Neutron always
/// allows, and connection state for stateful ports. Shared by all ports; split by ethertype so
/// a packet only meets the checks of its own kind. (`goto`: a sub-chain that ends without a
/// verdict returns to the base chain, which goes on to the port's groups.)
fn common_chains() -> Vec<(&'static str, Vec<String>)> {
    let reply = format!("meta mark & {CT_MASK:#x} == {CT_REPLY:#x} accept comment \"reply or related\"");
    let invalid = format!("meta mark & {CT_MASK:#x} == {CT_INVALID:#x} drop comment \"invalid\"");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    vec![
        (
            "common_out",
            s(&[
                "iifname . ether saddr != @mac drop comment \"spoofed MAC\"",
                "ether type vmap { ip : goto out_ip, ip6 : goto out_ip6, arp : goto out_arp }",
                "drop comment \"only IPv4, IPv6 and ARP\"",
            ]),
        ),
        (
            "out_ip",
            vec![
                "iifname . ether saddr . ip saddr != @src4 drop comment \"spoofed IPv4 source\"".into(),
                "meta l4proto udp jump out_udp".into(),
                format!("iifname @stateful {reply}"),
                format!("iifname @stateful {invalid}"),
            ],
        ),
        (
            "out_udp",
            s(&[
                "udp sport 67 drop comment \"no DHCP server in a workload\"",
                "udp sport 68 udp dport 67 accept",
            ]),
        ),
        (
            "out_ip6",
            vec![
                "iifname . ether saddr . ip6 saddr != @src6 drop comment \"spoofed IPv6 source\"".into(),
                "udp sport 547 drop comment \"no DHCPv6 server in a workload\"".into(),
                "icmpv6 type { nd-router-advert, nd-redirect } drop comment \"no router advertisements from a workload\"".into(),
                "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-report, mld2-listener-report } accept".into(),
                format!("iifname @stateful {reply}"),
                format!("iifname @stateful {invalid}"),
            ],
        ),
        (
            "out_arp",
            s(&[
                "iifname . arp saddr ether . arp saddr ip != @src4 drop comment \"spoofed ARP\"",
                "accept",
            ]),
        ),
        (
            "common_in",
            vec![
                format!("oifname @stateful {reply}"),
                format!("oifname @stateful {invalid}"),
                "ether type arp accept".into(),
                "ether type ip6 icmpv6 type { nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, mld-listener-query } accept".into(),
            ],
        ),
    ]
}

/// A group set's chain: each group's chain in turn (a matching rule accepts), then drop.
fn set_rules(groups: &[String], dir: Direction) -> Vec<String> {
    let mut v: Vec<String> = groups.iter().map(|g| format!("jump {}", group_chain(g, dir))).collect();
    v.push("drop".into());
    v
}

fn set_elems_mac(d: &Desired) -> BTreeSet<String> {
    d.ports
        .values()
        .flat_map(|p| p.macs.iter().map(move |m| format!("\"{}\" . {m}", p.dev)))
        .collect()
}

fn set_elems_src(d: &Desired, v6: bool) -> BTreeSet<String> {
    d.ports
        .values()
        .flat_map(|p| {
            let s = if v6 { &p.src6 } else { &p.src4 };
            s.iter().map(move |(m, n)| format!("\"{}\" . {m} . {n}", p.dev))
        })
        .collect()
}

/// The exact source addresses of stateful ports, for the fast path (a CIDR pair's traffic
/// takes the full path).
fn set_elems_fast(d: &Desired, v6: bool) -> BTreeSet<String> {
    d.ports
        .values()
        .filter(|p| p.stateful)
        .flat_map(|p| {
            let s = if v6 { &p.src6 } else { &p.src4 };
            s.iter()
                .filter(|(_, n)| n.prefix_len() == n.max_prefix_len() && !n.addr().is_unspecified())
                .map(move |(m, n)| format!("\"{}\" . {m} . {}", p.dev, n.addr()))
        })
        .collect()
}

fn map_elems(d: &Desired, dir: Direction) -> BTreeSet<String> {
    d.ports
        .values()
        .map(|p| format!("\"{}\" : jump {}", p.dev, set_chain(&p.groups, dir)))
        .collect()
}

fn port_names(d: &Desired, only_stateful: bool) -> BTreeSet<String> {
    d.ports
        .values()
        .filter(|p| !only_stateful || p.stateful)
        .map(|p| format!("\"{}\"", p.dev))
        .collect()
}

fn zone_elems(d: &Desired) -> BTreeSet<String> {
    d.zones.iter().map(|(dev, z)| format!("\"{dev}\" : {z}")).collect()
}

fn remote_elems(d: &Desired) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for (g, (v4, v6)) in &d.remotes {
        out.insert(remote_set(g, false), v4.iter().map(|n| n.to_string()).collect());
        out.insert(remote_set(g, true), v6.iter().map(|n| n.to_string()).collect());
    }
    out
}

/// Every chain of the bridge table but the base chains, with its rules.
fn chains(d: &Desired) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for (id, g) in &d.groups {
        for dir in [Direction::Ingress, Direction::Egress] {
            out.insert(group_chain(id, dir), group_rules(id, g, dir));
        }
    }
    for p in d.ports.values() {
        for dir in [Direction::Ingress, Direction::Egress] {
            out.entry(set_chain(&p.groups, dir))
                .or_insert_with(|| set_rules(&p.groups, dir));
        }
    }
    if d.present {
        for (name, rules) in common_chains() {
            out.insert(name.to_string(), rules);
        }
    }
    out
}

fn elems(e: &BTreeSet<String>) -> String {
    e.iter().cloned().collect::<Vec<_>>().join(", ")
}

fn base_bridge() -> String {
    let fast = format!("meta mark & {FAST:#x} == {FAST:#x}");
    format!(
        r#"    chain from_ports {{
        type filter hook forward priority 10; policy accept;
        {fast} iifname . ether saddr . ip saddr @fast4 accept comment "established, verdict current"
        {fast} iifname . ether saddr . ip6 saddr @fast6 accept comment "established, verdict current"
        iifname "tap*" udp dport 67 drop comment "DHCP requests are answered on the node"
        iifname "tap*" udp sport 67 drop comment "workloads do not serve DHCP"
        iifname @secured jump common_out
        iifname vmap @port_out
    }}
    chain to_ports {{
        type filter hook forward priority 20; policy accept;
        {fast} oifname @stateful accept comment "established, verdict current"
        oifname @secured jump common_in
        oifname vmap @port_in
    }}
"#
    )
}

/// The rules of the inet chains that name the generation (replaced on every change).
fn generation_rules(gen: Generation) -> [(&'static str, Vec<String>); 2] {
    let g = gen.value();
    let seen = gen.seen();
    [
        (
            "state",
            vec![
                format!("meta mark set meta mark & {:#x} | {seen:#x}", !MARK_OURS),
                format!("ct state established,related ct direction reply meta mark set meta mark | {CT_REPLY:#x}"),
                format!("ct state related meta mark set meta mark | {CT_REPLY:#x}"),
                format!("ct state invalid meta mark set meta mark | {CT_INVALID:#x}"),
                // Not for DHCP servers' ports: the DHCP guard must see every such packet.
                format!(
                    "meta l4proto {{ tcp, udp, sctp }} th sport != {{ 67, 547 }} ct state established \
                     ct mark & {GEN_MASK:#x} == {g:#x} meta mark set meta mark | {FAST:#x}"
                ),
            ],
        ),
        (
            "post",
            vec![format!(
                "meta mark & {seen:#x} == {seen:#x} ct direction original ct mark & {GEN_MASK:#x} != {g:#x} \
                 oifname @zoned ct mark set ct mark & {:#x} | {g:#x}",
                !GEN_MASK
            )],
        ),
    ]
}

fn base_inet() -> &'static str {
    r#"    chain zone {
        type filter hook prerouting priority -300; policy accept;
        iifname @zoned ct zone set iifname map @zones
    }
    chain state {
        type filter hook forward priority 0; policy accept;
    }
    chain post {
        type filter hook postrouting priority 0; policy accept;
    }
"#
}

fn generation_ops(gen: Generation, flush: bool) -> String {
    let mut out = String::new();
    for (chain, rules) in generation_rules(gen) {
        if flush {
            let _ = writeln!(out, "flush chain inet {TABLE} {chain}");
        }
        for r in rules {
            let _ = writeln!(out, "add rule inet {TABLE} {chain} {r}");
        }
    }
    out
}

/// Set and map declarations (without elements): name → (kind, body).
fn declarations(d: &Desired) -> BTreeMap<String, (&'static str, String)> {
    let mut out = BTreeMap::new();
    let mut add = |name: String, kind: &'static str, body: &str| {
        out.insert(name, (kind, format!("{{ {body} }}")));
    };
    add("secured".into(), "set", "type ifname;");
    add("stateful".into(), "set", "type ifname;");
    add("mac".into(), "set", "type ifname . ether_addr;");
    add(
        "src4".into(),
        "set",
        "type ifname . ether_addr . ipv4_addr; flags interval;",
    );
    add(
        "src6".into(),
        "set",
        "type ifname . ether_addr . ipv6_addr; flags interval;",
    );
    add("fast4".into(), "set", "type ifname . ether_addr . ipv4_addr;");
    add("fast6".into(), "set", "type ifname . ether_addr . ipv6_addr;");
    add("port_out".into(), "map", "type ifname : verdict;");
    add("port_in".into(), "map", "type ifname : verdict;");
    for name in lookup_elems(d).keys() {
        let ty = if name.starts_with("l6") {
            "ipv6_addr"
        } else {
            "ipv4_addr"
        };
        add(
            name.clone(),
            "set",
            &format!("type inet_proto . {ty} . inet_service; flags interval;"),
        );
    }
    for g in d.remotes.keys() {
        add(remote_set(g, false), "set", "type ipv4_addr; flags interval;");
        add(remote_set(g, true), "set", "type ipv6_addr; flags interval;");
    }
    out
}

/// Removes both tables (absent already is fine: each is declared first).
pub fn removal() -> String {
    format!("table bridge {TABLE}\ndelete table bridge {TABLE}\ntable inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// The whole firewall, replacing whatever the tables held, in one transaction.
pub fn full(d: &Desired, gen: Generation) -> String {
    if !d.present {
        return removal();
    }
    let mut s = removal();
    let _ = writeln!(s, "table bridge {TABLE} {{");
    for (name, (kind, body)) in declarations(d) {
        let _ = writeln!(s, "    {kind} {name} {body}");
    }
    // Chains first (empty), so jumps between them resolve whatever the order.
    let cs = chains(d);
    for name in cs.keys() {
        let _ = writeln!(s, "    chain {name} {{\n    }}");
    }
    s.push_str(&base_bridge());
    s.push_str("}\n");
    for (name, rules) in &cs {
        for r in rules {
            let _ = writeln!(s, "add rule bridge {TABLE} {name} {r}");
        }
    }
    s.push_str(&element_ops(&Desired::default(), d, true));
    let _ = writeln!(s, "table inet {TABLE} {{");
    let _ = writeln!(s, "    set zoned {{ type ifname; }}");
    let _ = writeln!(s, "    map zones {{ typeof iifname : ct zone; }}");
    s.push_str(base_inet());
    s.push_str("}\n");
    s.push_str(&zone_ops(&Desired::default(), d));
    s.push_str(&generation_ops(gen, false));
    s
}

fn set_diff(table_fam: &str, set: &str, old: &BTreeSet<String>, new: &BTreeSet<String>, out: &mut String) {
    let gone: BTreeSet<String> = old.difference(new).cloned().collect();
    let added: BTreeSet<String> = new.difference(old).cloned().collect();
    if !gone.is_empty() {
        let _ = writeln!(out, "delete element {table_fam} {TABLE} {set} {{ {} }}", elems(&gone));
    }
    if !added.is_empty() {
        let _ = writeln!(out, "add element {table_fam} {TABLE} {set} {{ {} }}", elems(&added));
    }
}

/// Every element of the bridge table's sets and maps, by set.
fn all_elems(d: &Desired) -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    out.insert("mac".to_string(), set_elems_mac(d));
    out.insert("secured".into(), port_names(d, false));
    out.insert("stateful".into(), port_names(d, true));
    out.insert("src4".into(), set_elems_src(d, false));
    out.insert("src6".into(), set_elems_src(d, true));
    out.insert("fast4".into(), set_elems_fast(d, false));
    out.insert("fast6".into(), set_elems_fast(d, true));
    out.insert("port_out".into(), map_elems(d, Direction::Egress));
    out.insert("port_in".into(), map_elems(d, Direction::Ingress));
    out.extend(remote_elems(d));
    // Lookup sets: a set that goes is deleted whole, after the chains stop naming it.
    out.extend(lookup_elems(d));
    out
}

/// Element changes of the bridge table's sets and maps. Map keys are replaced by deleting the
/// old element first (a changed verdict for the same interface).
fn element_ops(old: &Desired, new: &Desired, fresh: bool) -> String {
    let mut out = String::new();
    let before = if fresh { BTreeMap::new() } else { all_elems(old) };
    let none = BTreeSet::new();
    for (set, n) in all_elems(new) {
        set_diff("bridge", &set, before.get(&set).unwrap_or(&none), &n, &mut out);
    }
    out
}

fn zone_ops(old: &Desired, new: &Desired) -> String {
    let mut out = String::new();
    let zoned = |d: &Desired| d.zones.keys().map(|k| format!("\"{k}\"")).collect::<BTreeSet<_>>();
    set_diff("inet", "zones", &zone_elems(old), &zone_elems(new), &mut out);
    set_diff("inet", "zoned", &zoned(old), &zoned(new), &mut out);
    out
}

/// The changes that turn the firewall built for `old` into the one for `new`, as one nft
/// transaction that also moves to generation `gen`; empty if there is nothing to do. Both
/// must be present (otherwise use [`full`]).
pub fn patch(old: &Desired, new: &Desired, gen: Generation) -> String {
    let mut out = String::new();
    let (oc, nc) = (chains(old), chains(new));
    let (od, nd) = (declarations(old), declarations(new));
    // New sets and chains first, so rules and map elements can name them.
    for (name, (kind, body)) in &nd {
        if !od.contains_key(name) {
            let _ = writeln!(out, "add {kind} bridge {TABLE} {name} {body}");
        }
    }
    for name in nc.keys() {
        if !oc.contains_key(name) {
            let _ = writeln!(out, "add chain bridge {TABLE} {name}");
        }
    }
    for (name, rules) in &nc {
        if oc.get(name) == Some(rules) {
            continue;
        }
        if oc.contains_key(name) {
            let _ = writeln!(out, "flush chain bridge {TABLE} {name}");
        }
        for r in rules {
            let _ = writeln!(out, "add rule bridge {TABLE} {name} {r}");
        }
    }
    out.push_str(&element_ops(old, new, false));
    out.push_str(&zone_ops(old, new));
    // Then what nothing refers to any more.
    for name in oc.keys() {
        if !nc.contains_key(name) {
            let _ = writeln!(out, "flush chain bridge {TABLE} {name}");
        }
    }
    for name in oc.keys() {
        if !nc.contains_key(name) {
            let _ = writeln!(out, "delete chain bridge {TABLE} {name}");
        }
    }
    for name in od.keys() {
        if !nd.contains_key(name) {
            let _ = writeln!(out, "delete set bridge {TABLE} {name}");
        }
    }
    if !out.is_empty() {
        out.push_str(&generation_ops(gen, true));
    }
    out
}

/// Objects the firewall holds in the kernel (chains, rules, set and map elements), and what
/// one rule per rule per port (with remote groups expanded per member) would have made.
pub fn object_counts(d: &Desired) -> (usize, usize) {
    let cs = chains(d);
    let rules: usize = cs.values().map(Vec::len).sum();
    let elements: usize = all_elems(d).values().map(BTreeSet::len).sum();
    let ours = cs.len() + rules + elements;
    let mut product = 0usize;
    for p in d.ports.values() {
        for g in &p.groups {
            for r in d.groups.get(g).map(|g| g.rules.as_slice()).unwrap_or_default() {
                product += match &r.remote {
                    Remote::Group(rg) => d
                        .remotes
                        .get(rg)
                        .map_or(0, |(a, b)| if r.v6 { b.len() } else { a.len() }),
                    _ => 1,
                };
            }
        }
    }
    (ours, product)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::Objects;
    use isthmus_wire::stream::{Message, Object};
    use serde_json::json;

    fn obj(key: &str, kind: &str, value: serde_json::Value) -> Object {
        serde_json::from_value(json!({"key": key, "kind": kind, "revision": 1, "value": value})).unwrap()
    }

    pub(crate) fn sample(extra_rule: bool, member: Option<&str>) -> Objects {
        let mut objects = vec![
            obj(
                "/n/networks/n1",
                "network",
                json!({"id": "n1", "provider:segmentation_id": 42}),
            ),
            obj(
                "/n/ports/p1",
                "port",
                json!({"id": "p1aaaaaaaaaaaa", "network_id": "n1", "binding:host_id": "h1",
                "mac_address": "FA:16:3E:00:00:01", "fixed_ips": [{"subnet_id": "s", "ip_address": "10.0.0.5"}],
                "security_groups": ["g1", "g2"],
                "allowed_address_pairs": [{"ip_address": "10.0.0.100/32", "mac_address": "fa:16:3e:00:00:99"}]}),
            ),
            obj(
                "/n/ports/p2",
                "port",
                json!({"id": "p2bbbbbbbbbbbb", "network_id": "n1", "binding:host_id": "h1",
                "mac_address": "fa:16:3e:00:00:02", "fixed_ips": [{"subnet_id": "s", "ip_address": "10.0.0.6"}],
                "port_security_enabled": false}),
            ),
            obj("/n/security_groups/g1", "security_group", json!({"id": "g1"})),
            obj(
                "/n/security_groups/g2",
                "security_group",
                json!({"id": "g2", "stateful": false}),
            ),
            obj(
                "/n/security_group_rules/r1",
                "security_group_rule",
                json!({"id": "r1", "security_group_id": "g1", "direction": "ingress", "ethertype": "IPv4",
                "protocol": "tcp", "port_range_min": 22, "port_range_max": 22, "remote_group_id": "g1"}),
            ),
            obj(
                "/n/security_group_rules/r2",
                "security_group_rule",
                json!({"id": "r2", "security_group_id": "g1", "direction": "egress", "ethertype": "IPv6"}),
            ),
            obj(
                "/n/security_group_rules/r3",
                "security_group_rule",
                json!({"id": "r3", "security_group_id": "g2", "direction": "ingress", "ethertype": "IPv4",
                "protocol": "icmp", "port_range_min": 8, "remote_ip_prefix": "192.0.2.0/24"}),
            ),
        ];
        if extra_rule {
            objects.push(obj(
                "/n/security_group_rules/r4",
                "security_group_rule",
                json!({"id": "r4", "security_group_id": "g2", "direction": "ingress", "ethertype": "IPv4",
                "protocol": "udp", "port_range_min": 1000, "port_range_max": 2000}),
            ));
        }
        if let Some(m) = member {
            objects.push(obj(
                &format!("/n/group_members/g1/{m}"),
                "group_member",
                json!({"security_group_id": "g1", "port_id": m, "addresses": [m]}),
            ));
        }
        let mut o = Objects::default();
        o.apply(Message::Snapshot { revision: 1, objects });
        o
    }

    #[test]
    fn ports_groups_and_members_come_from_the_view() {
        let d = desired(&sample(false, Some("10.0.0.9")), "h1");
        assert!(d.present);
        assert_eq!(d.ports.len(), 1, "port security off: not filtered");
        let p = &d.ports["tapp1aaaaaaaaa"];
        assert!(p.stateful, "one stateful group makes the port stateful");
        assert_eq!(p.groups, vec!["g1".to_string(), "g2".to_string()]);
        assert!(p.macs.contains("fa:16:3e:00:00:01") && p.macs.contains("fa:16:3e:00:00:99"));
        assert!(p
            .src4
            .contains(&("fa:16:3e:00:00:99".into(), "10.0.0.100/32".parse().unwrap())));
        assert_eq!(d.remotes["g1"].0.len(), 1);
        assert_eq!(d.zones["isbr-42"], 43);
        assert!(!desired(&sample(false, None), "h2").present);
    }

    const G: Generation = Generation(7);

    #[test]
    fn a_patch_touches_only_what_changed() {
        let a = desired(&sample(false, Some("10.0.0.9")), "h1");
        assert_eq!(patch(&a, &a, G), "");
        let b = desired(&sample(true, Some("10.0.0.9")), "h1");
        let p = patch(&a, &b, G);
        assert!(p.contains("flush chain bridge isthmus g-g2-in"), "{p}");
        assert!(
            p.contains("add element bridge isthmus l4-g2-in { 17 . 0.0.0.0/0 . 1000-2000 }"),
            "{p}"
        );
        assert!(!p.contains("g-g1"), "{p}");
        let c = desired(&sample(false, Some("10.0.0.10")), "h1");
        let p = patch(&a, &c, G);
        assert!(
            p.starts_with(
                "delete element bridge isthmus r4-g1 { 10.0.0.9/32 }\nadd element bridge isthmus r4-g1 { 10.0.0.10/32 }\n"
            ),
            "{p}"
        );
        // Every change moves to the given generation, and nothing else changes.
        assert!(p.contains("flush chain inet isthmus state\n") && p.contains("flush chain inet isthmus post\n"));
        assert_eq!(p.lines().count(), 2 + 2 + 5 + 1, "{p}");
        assert!(p.contains("ct mark & 0xffffff == 0x7 meta mark set"), "{p}");
    }

    #[test]
    fn generations_alternate_in_parity_and_never_repeat() {
        let mut g = Generation::first(1_796_080_000_000);
        for step in 0..1000u128 {
            // The clock may stand still or step back: the next generation still differs.
            let n = g.next(1_796_080_000_000 + (step % 3) * 10);
            assert_ne!(n.value() & 1, g.value() & 1);
            assert!(n.value() != 0 && n.value() <= GEN_MASK);
            g = n;
        }
        assert_eq!(Generation::first(0).value(), 1);
        assert_ne!(Generation(GEN_MASK).next(u128::from(GEN_MASK) * 10).value(), 0);
    }

    #[test]
    fn only_stateful_ports_exact_addresses_take_the_fast_path() {
        let d = desired(&sample(false, Some("10.0.0.9")), "h1");
        let fast = set_elems_fast(&d, false);
        assert!(fast.iter().any(|e| e.ends_with(". 10.0.0.100")), "{fast:?}");
        assert!(!fast.iter().any(|e| e.ends_with("0.0.0.0")), "{fast:?}");
        let mut stateless = d.clone();
        for p in stateless.ports.values_mut() {
            p.stateful = false;
        }
        assert!(set_elems_fast(&stateless, false).is_empty());
    }

    #[test]
    fn rules_render_as_neutron_means_them() {
        let r = |v: serde_json::Value| parse_rule(&serde_json::from_value(v).unwrap());
        let tcp = r(json!({"direction": "ingress", "ethertype": "IPv4", "protocol": "6", "port_range_min": 80, "port_range_max": 81})).unwrap();
        assert_eq!(rule_text(&tcp), "ether type ip meta l4proto 6 th dport 80-81 accept");
        let icmp6 = r(json!({"direction": "egress", "ethertype": "IPv6", "protocol": "icmp", "port_range_min": 128, "port_range_max": 0, "remote_ip_prefix": "2001:db8::1/64"})).unwrap();
        assert_eq!(
            rule_text(&icmp6),
            "ether type ip6 ip6 daddr 2001:db8::/64 meta l4proto 58 icmpv6 type 128 icmpv6 code 0 accept"
        );
        assert!(r(json!({"direction": "sideways", "ethertype": "IPv4"})).is_none());
        assert!(r(json!({"direction": "ingress", "ethertype": "IPv4", "remote_ip_prefix": "2001:db8::/64"})).is_none());
        assert!(
            r(json!({"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 70000}))
                .is_none()
        );
        let any = r(json!({"direction": "ingress", "ethertype": "IPv4", "remote_ip_prefix": "0.0.0.0/0"})).unwrap();
        assert_eq!(any.remote, Remote::Any);
    }

    #[test]
    fn port_rules_become_one_lookup_and_overlaps_stay_rules() {
        let r = |id: &str, port: u32, prefix: Option<&str>| {
            parse_rule(
                &serde_json::from_value(json!({"id": id, "direction": "ingress", "ethertype": "IPv4",
                    "protocol": "tcp", "port_range_min": port, "port_range_max": port, "remote_ip_prefix": prefix}))
                .unwrap(),
            )
            .unwrap()
        };
        let g = Group {
            stateful: true,
            rules: vec![
                r("a", 22, None),
                r("b", 22, Some("10.0.0.0/8")),
                r("c", 80, Some("10.0.0.0/8")),
            ],
        };
        let rules = group_rules("g", &g, Direction::Ingress);
        assert_eq!(
            rules,
            vec![
                "ether type ip meta l4proto . ip saddr . th dport @l4-g-in accept".to_string(),
                "ether type ip ip saddr 10.0.0.0/8 meta l4proto 6 th dport 22 accept".to_string(),
            ]
        );
        let (sets, _) = split_rules(&g, Direction::Ingress);
        assert_eq!(sets[0].len(), 2);
        assert!(group_rules("g", &g, Direction::Egress).is_empty());
    }

    #[test]
    fn counts_grow_with_the_sum_not_the_product() {
        let d = desired(&sample(true, Some("10.0.0.9")), "h1");
        let (ours, product) = object_counts(&d);
        assert!(ours > 0 && product > 0);
    }

    #[test]
    #[ignore = "prints a ruleset to check by hand with nft -c"]
    fn print_full() {
        let d = desired(&sample(true, Some("10.0.0.9")), "h1");
        println!("{}", full(&d, G));
        let b = desired(&sample(false, Some("10.0.0.10")), "h1");
        println!("---\n{}", patch(&d, &b, G));
    }
}
