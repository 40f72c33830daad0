//! Distributed routers as data: a router namespace with its legs and neighbours, the names
//! of the namespaces and devices, and the DVR table. Computed by the `l3` module, applied by the
//! kernel backend.

use crate::names;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

/// One interface of a router on this node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Leg {
    /// The interface port's id.
    pub port_id: String,
    pub network_id: String,
    /// The network's VXLAN id and bridge (the leg's outer end joins it).
    pub vni: u32,
    pub bridge: String,
    pub mtu: u32,
    /// The interface port's MAC, on the router's end.
    pub mac: String,
    /// Gateway addresses with their subnets' prefix lengths.
    pub addresses: BTreeSet<IpNet>,
    /// IPv6 prefixes advertised on this leg (subnets with an `ipv6_ra_mode`).
    pub ra: BTreeSet<(IpNet, RaMode)>,
}

/// A subnet's `ipv6_ra_mode`: what router advertisements tell hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RaMode {
    /// Addresses by SLAAC (prefix "autonomous").
    Slaac,
    /// SLAAC, and other configuration by DHCPv6 ("O").
    Stateless,
    /// Addresses by DHCPv6 ("M", prefix not autonomous).
    Stateful,
}

impl RaMode {
    pub fn parse(s: &str) -> Option<RaMode> {
        match s {
            "slaac" => Some(RaMode::Slaac),
            "dhcpv6-stateless" => Some(RaMode::Stateless),
            "dhcpv6-stateful" => Some(RaMode::Stateful),
            _ => None,
        }
    }
}

/// A router advertisement for a leg with MAC `mac` and MTU `mtu` announcing `prefixes`: the
/// ICMPv6 message (type 134) without its checksum, which the kernel fills in for raw ICMPv6
/// sockets. Router lifetime 1800 s, prefixes valid 2592000 s and preferred 604800 s (radvd's
/// defaults).
pub fn router_advertisement(mac: [u8; 6], mtu: u32, prefixes: &[(IpNet, RaMode)]) -> Vec<u8> {
    let managed = prefixes.iter().any(|(_, m)| *m == RaMode::Stateful);
    let other = managed || prefixes.iter().any(|(_, m)| *m == RaMode::Stateless);
    let mut p = vec![134, 0, 0, 0, 64];
    p.push(if managed { 0x80 } else { 0 } | if other { 0x40 } else { 0 });
    p.extend_from_slice(&1800u16.to_be_bytes());
    p.extend_from_slice(&[0; 8]); // reachable time, retransmission timer: unspecified
                                  // Source link-layer address.
    p.extend_from_slice(&[1, 1]);
    p.extend_from_slice(&mac);
    // MTU.
    p.extend_from_slice(&[5, 1, 0, 0]);
    p.extend_from_slice(&mtu.to_be_bytes());
    for (net, mode) in prefixes {
        let IpNet::V6(v6) = net.trunc() else { continue };
        p.extend_from_slice(&[3, 4, v6.prefix_len()]);
        // On-link; autonomous unless addresses come from DHCPv6.
        p.push(0x80 | if *mode == RaMode::Stateful { 0 } else { 0x40 });
        p.extend_from_slice(&2_592_000u32.to_be_bytes());
        p.extend_from_slice(&604_800u32.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
        p.extend_from_slice(&v6.addr().octets());
    }
    p
}

/// A permanent neighbour entry in a router namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neighbor {
    /// The leg device (router end) it is on.
    pub dev: String,
    pub ip: IpAddr,
    pub mac: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterNs {
    pub id: String,
    /// The namespace's name (unique per node and router).
    pub netns: String,
    /// By router-end device name.
    pub legs: BTreeMap<String, Leg>,
    pub neighbors: BTreeSet<Neighbor>,
    /// The leg on the external network (a host bridge), when this node serves the router's
    /// gateway or one of its floating IPs.
    pub external: Option<ExternalLeg>,
    /// On the router's SNAT node: one address-less leg per internal network (by device), the
    /// next hop other nodes send outbound traffic to (by MAC, over VXLAN).
    pub snat_legs: BTreeMap<String, SnatLeg>,
    /// Source address for SNAT (this node is the router's SNAT node and SNAT is on).
    pub snat: Option<Ipv4Addr>,
    /// Floating IPs of local ports: (floating, fixed).
    pub fips: BTreeSet<(Ipv4Addr, Ipv4Addr)>,
    /// Where traffic for outside the router's subnets goes by default.
    pub default: Option<DefaultRoute>,
    /// Static routes (`extraroute`): destination, next hop.
    pub routes: BTreeSet<(IpNet, IpAddr)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalLeg {
    pub dev: String,
    pub outer: String,
    /// The host bridge the physical network is mapped to.
    pub bridge: String,
    pub mac: String,
    pub mtu: u32,
    pub addresses: BTreeSet<IpNet>,
    /// The external subnet's gateway (the upstream router).
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnatLeg {
    pub outer: String,
    pub bridge: String,
    pub mac: String,
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefaultRoute {
    /// Through the external leg to the upstream router (on the SNAT node).
    External(Ipv4Addr),
    /// To the SNAT node's leg on one internal network: [`SNAT_NEXTHOP`] on this leg device,
    /// a permanent neighbour at that leg's MAC.
    SnatNode { dev: String },
}

/// The next hop other nodes use for the SNAT node (link-local; only a neighbour entry and a
/// route in each router namespace, never on a wire).
pub const SNAT_NEXTHOP: Ipv4Addr = Ipv4Addr::new(169, 254, 95, 1);

/// The routing table floating IPs' sources use (their default route is the external leg).
pub const FIP_TABLE: u32 = 95;

/// The MAC of router `router`'s SNAT leg on network `network` (the same on every node, so
/// other nodes can send to it before they hear anything from it).
pub fn snat_mac(router: &str, network: &str) -> String {
    hashed_mac(&format!("snat/{router}/{network}"))
}

/// The MAC of router `router`'s external leg on node `node` when it only carries floating IPs.
pub fn fip_mac(router: &str, node: &str) -> String {
    hashed_mac(&format!("fip/{router}/{node}"))
}

/// Names of router `router`'s external leg (inside, outside).
pub fn external_names(router: &str) -> (String, String) {
    let id: String = router.chars().take(11).collect();
    (format!("qg-{id}"), format!("rg-{id}"))
}

/// Names of the SNAT leg beside interface port `port` (inside, outside).
pub fn snat_names(port: &str) -> (String, String) {
    let id: String = port.chars().take(11).collect();
    (format!("sg-{id}"), format!("rs-{id}"))
}

/// The routers of one node, by namespace name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct L3Desired {
    pub routers: BTreeMap<String, RouterNs>,
    /// By leg's outer end (`rl-…`): where routed frames leaving that leg may skip its bridge.
    pub shortcuts: BTreeMap<String, Shortcut>,
}

/// Routed frames leaving a router leg for a port on another node go from the leg's outer end
/// straight to the network's VXLAN device (a tc program on the outer end), not through the
/// bridge: that bridge pass would only run the node's firewall hooks for a frame that no local
/// port sends or receives. Anything else (local ports, ARP, neighbour discovery, multicast,
/// MACs not listed) still takes the bridge.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shortcut {
    pub vxlan: String,
    /// Ports of the network bound to other nodes. Empty: no program.
    pub macs: BTreeSet<crate::desired::MacAddr>,
}

/// Beyond this many remote ports on one network the leg keeps to its bridge (the program
/// compares MACs one after another).
pub const SHORTCUT_MAX_MACS: usize = 4096;

/// The agent's bridge table for distributed routing.
pub const DVR_TABLE: &str = "isthmus-dvr";

/// First octet of every router leg's MAC (locally administered, unicast; apart from ports'
/// `fa:16:3e` and the `fa:16:3f` SNAT and floating IP legs).
pub const LEG_MAC_PREFIX: u8 = 0xf6;

/// The MAC of interface port `port`'s leg on node `node`: each node's copy of a gateway has
/// its own, so a routed frame from another node teaches a bridge nothing about its local
/// gateway, and local workloads resolve the gateway to their own node's leg. 40 bits of a
/// hash of both.
pub fn leg_mac(node: &str, port: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([b'/']).chain(port.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    format!(
        "{LEG_MAC_PREFIX:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[3], b[4], b[5], b[6], b[7]
    )
}

fn hashed_mac(name: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    let [_, a, b, c] = h.to_be_bytes();
    format!("fa:16:3f:{a:02x}:{b:02x}:{c:02x}")
}

/// The DVR table as one nft transaction (replacing what was there). Every node answers for
/// its own copy of a gateway: what a leg says about itself (ARP, router and neighbour
/// advertisements, a gratuitous announcement) never leaves for another node, or workloads
/// there would send their outbound traffic here. Static (legs are known by their MAC
/// prefix), so router changes never touch it; no legs: the table goes.
pub fn dvr_script(d: &L3Desired) -> String {
    let mut s = format!("table bridge {DVR_TABLE}\ndelete table bridge {DVR_TABLE}\n");
    if d.routers.values().all(|r| r.legs.is_empty()) {
        return s;
    }
    let vx = names::VXLAN_PREFIX;
    let legs = format!("ether saddr & ff:00:00:00:00:00 == {LEG_MAC_PREFIX:02x}:00:00:00:00:00");
    s.push_str(&format!("table bridge {DVR_TABLE} {{\n"));
    s.push_str("    chain out {\n        type filter hook postrouting priority 0; policy accept;\n");
    s.push_str(&format!(
        "        oifname \"{vx}*\" {legs} ether type arp drop comment \"a gateway is answered on each node\"\n"
    ));
    s.push_str(&format!(
        "        oifname \"{vx}*\" {legs} icmpv6 type {{ nd-router-advert, nd-neighbor-advert }} drop comment \"each node advertises its own legs\"\n"
    ));
    s.push_str("    }\n}\n");
    s
}

pub fn netns_prefix(node: &str) -> String {
    format!("isr-{}-", short(node))
}

pub(crate) fn short(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect()
}

/// The router end of a leg (Neutron's `qr-` convention) and the bridge end.
pub fn leg_names(port_id: &str) -> (String, String) {
    let id: String = port_id.chars().take(11).collect();
    (format!("qr-{id}"), format!("rl-{id}"))
}

/// The router namespace's NAT table: floating IPs both ways, then SNAT of everything else
/// leaving by the external leg (SNAT node only). A whole replacement, applied in one go.
pub const NAT_TABLE: &str = "isthmus-nat";

pub fn nat_script(r: &RouterNs) -> String {
    let mut s = format!("table ip {NAT_TABLE}\ndelete table ip {NAT_TABLE}\n");
    let Some(ext) = &r.external else { return s };
    if r.fips.is_empty() && r.snat.is_none() {
        return s;
    }
    s.push_str(&format!("table ip {NAT_TABLE} {{\n"));
    s.push_str("    chain pre {\n        type nat hook prerouting priority dstnat; policy accept;\n");
    for (floating, fixed) in &r.fips {
        s.push_str(&format!("        ip daddr {floating} dnat to {fixed}\n"));
    }
    s.push_str("    }\n    chain post {\n        type nat hook postrouting priority srcnat; policy accept;\n");
    for (floating, fixed) in &r.fips {
        s.push_str(&format!(
            "        oifname \"{}\" ip saddr {fixed} snat to {floating}\n",
            ext.dev
        ));
    }
    if let Some(gw) = r.snat {
        s.push_str(&format!(
            "        oifname \"{}\" ip saddr != {gw} snat to {gw}\n",
            ext.dev
        ));
    }
    s.push_str("    }\n}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisements_carry_flags_mtu_and_prefixes_per_mode() {
        let mac = [0xfa, 0x16, 0x3e, 0, 0, 1];
        let p = router_advertisement(mac, 1450, &[("2001:db8:1::1/64".parse().unwrap(), RaMode::Slaac)]);
        assert_eq!((p[0], p[4], p[5]), (134, 64, 0));
        assert_eq!(u16::from_be_bytes([p[6], p[7]]), 1800);
        assert_eq!(&p[16..24], &[1, 1, 0xfa, 0x16, 0x3e, 0, 0, 1]);
        assert_eq!(u32::from_be_bytes([p[28], p[29], p[30], p[31]]), 1450);
        // Prefix information: /64, on-link and autonomous, the prefix itself (host bits off).
        assert_eq!(&p[32..36], &[3, 4, 64, 0xc0]);
        assert_eq!(&p[48..56], &[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0]);
        assert!(p[56..64].iter().all(|b| *b == 0));
        assert_eq!(p.len(), 64);
        let stateful = router_advertisement(mac, 1450, &[("2001:db8:2::/64".parse().unwrap(), RaMode::Stateful)]);
        assert_eq!(stateful[5], 0xc0, "managed and other");
        assert_eq!(stateful[35], 0x80, "on-link, not autonomous");
        let stateless = router_advertisement(mac, 1450, &[("2001:db8:3::/64".parse().unwrap(), RaMode::Stateless)]);
        assert_eq!(stateless[5], 0x40, "other only");
        assert_eq!(stateless[35], 0xc0);
    }
}
