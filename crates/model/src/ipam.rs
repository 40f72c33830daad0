//! Address arithmetic and IP/MAC choice. The store transaction that claims the chosen address is
//! what makes it unique; this module only proposes candidates.

use crate::error::{NResult, NeutronError};
use crate::resources::AllocationPool;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

pub fn from_u128(v: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(v))
    } else {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    }
}

/// Parses a subnet CIDR. Host bits must be zero, as Neutron insists.
pub fn parse_cidr(s: &str, ip_version: u8) -> NResult<IpNet> {
    let net: IpNet = s
        .parse()
        .map_err(|_| NeutronError::invalid_attr("cidr", format!("'{s}' is not a valid IP subnet")))?;
    let is_v6 = matches!(net, IpNet::V6(_));
    if (ip_version == 6) != is_v6 {
        return Err(NeutronError::bad_request(
            "Invalid input for operation: ip_version and cidr do not match.".to_string(),
        ));
    }
    if net.trunc() != net {
        return Err(NeutronError::invalid_attr(
            "cidr",
            format!(
                "'{s}' isn't a recognized IP subnet cidr, '{}' is recommended",
                net.trunc()
            ),
        ));
    }
    let max = if is_v6 { 128 } else { 32 };
    if net.prefix_len() > max {
        return Err(NeutronError::invalid_attr(
            "cidr",
            format!("'{s}' is not a valid IP subnet"),
        ));
    }
    Ok(net)
}

/// The CIDR checks Neutron makes on a new subnet (or when DHCP is turned on), in its order and
/// words. `dhcp_check`: DHCP is enabled and was not before, which is when DHCP's constraints
/// (no loopback, multicast or 0.0.0.0 range, room for a DHCP port) apply.
pub fn check_subnet_cidr(net: &IpNet, dhcp_check: bool, creating: bool) -> NResult<()> {
    let v6 = net_is_v6(net);
    if creating && v6 && net.network() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        return Err(NeutronError::invalid_input("IPv6 subnet '::' is not supported"));
    }
    if dhcp_check {
        if (!v6 && net.prefix_len() > 30) || (v6 && net.prefix_len() > 126) {
            return Err(NeutronError::invalid_input(
                "Subnet has a prefix length that is incompatible with DHCP service enabled",
            ));
        }
        let (multicast, loopback) = if v6 {
            (is_within(net, "ff00::/8"), is_within(net, "::1/128"))
        } else {
            (is_within(net, "224.0.0.0/4"), is_within(net, "127.0.0.0/8"))
        };
        if multicast {
            return Err(NeutronError::invalid_input(
                "Multicast IP subnet is not supported if enable_dhcp is True",
            ));
        }
        if loopback {
            return Err(NeutronError::invalid_input(
                "Loopback IP subnet is not supported if enable_dhcp is True",
            ));
        }
        if !v6 && to_u128(net.network()) == 0 {
            // Neutron's message ends with its own full stop.
            return Err(NeutronError::new(
                400,
                "InvalidInput",
                "Invalid input for operation: First IP '0.0.0.0' of network is not supported if enable_dhcp is True.",
            ));
        }
    }
    if creating && net.prefix_len() == 0 {
        return Err(NeutronError::invalid_input("0 is not allowed as CIDR prefix length"));
    }
    Ok(())
}

/// Whether `net` lies entirely inside the block `within`.
fn is_within(net: &IpNet, within: &str) -> bool {
    within.parse::<IpNet>().is_ok_and(|w| w.contains(net))
}

/// First and last address of a network, as integers.
pub fn bounds(net: &IpNet) -> (u128, u128) {
    (to_u128(net.network()), to_u128(net.broadcast()))
}

/// The default gateway: the first address after the network address.
pub fn default_gateway(net: &IpNet) -> Option<IpAddr> {
    let (first, last) = bounds(net);
    (last > first).then(|| from_u128(first + 1, net_is_v6(net)))
}

pub fn net_is_v6(net: &IpNet) -> bool {
    matches!(net, IpNet::V6(_))
}

/// Neutron's default pools: every usable address except the gateway (and, for IPv4, the
/// network and broadcast addresses).
pub fn default_pools(net: &IpNet, gateway: Option<IpAddr>) -> Vec<AllocationPool> {
    let v6 = net_is_v6(net);
    let (first, last) = bounds(net);
    if first == last {
        let a = from_u128(first, v6).to_string();
        return vec![AllocationPool {
            start: a.clone(),
            end: a,
        }];
    }
    let lo = first + 1;
    let hi = if v6 { last } else { last - 1 };
    if lo >= hi {
        return vec![];
    }
    let mut ranges = vec![(lo, hi)];
    if let Some(gw) = gateway.map(to_u128) {
        ranges = ranges
            .into_iter()
            .flat_map(|(a, b)| {
                if gw < a || gw > b {
                    vec![(a, b)]
                } else {
                    let mut v = vec![];
                    if gw > a {
                        v.push((a, gw - 1));
                    }
                    if gw < b {
                        v.push((gw + 1, b));
                    }
                    v
                }
            })
            .collect();
    }
    ranges
        .into_iter()
        .map(|(a, b)| AllocationPool {
            start: from_u128(a, v6).to_string(),
            end: from_u128(b, v6).to_string(),
        })
        .collect()
}

/// Parsed pools as integer ranges, validated against the subnet and the gateway.
pub fn validate_pools(net: &IpNet, gateway: Option<IpAddr>, pools: &[AllocationPool]) -> NResult<Vec<(u128, u128)>> {
    let v6 = net_is_v6(net);
    let (first, last) = bounds(net);
    let mut ranges = Vec::with_capacity(pools.len());
    for p in pools {
        let bad = || {
            NeutronError::new(
                400,
                "InvalidAllocationPool",
                format!("The allocation pool {}-{} is not valid.", p.start, p.end),
            )
        };
        let s: IpAddr = p.start.parse().map_err(|_| bad())?;
        let e: IpAddr = p.end.parse().map_err(|_| bad())?;
        if s.is_ipv6() != v6 || e.is_ipv6() != v6 {
            return Err(bad());
        }
        let (a, b) = (to_u128(s), to_u128(e));
        if a > b {
            return Err(bad());
        }
        // IPv4 pools may not include the network or broadcast address.
        let (lo, hi) = if v6 || first == last {
            (first, last)
        } else {
            (first + 1, last - 1)
        };
        if a < lo || b > hi {
            return Err(NeutronError::new(
                400,
                "OutOfBoundsAllocationPool",
                format!(
                    "The allocation pool {}-{} spans beyond the subnet cidr {}.",
                    p.start, p.end, net
                ),
            ));
        }
        ranges.push((a, b));
    }
    let mut sorted = ranges.clone();
    sorted.sort();
    for w in sorted.windows(2) {
        if w[1].0 <= w[0].1 {
            return Err(NeutronError::conflict(
                "OverlappingAllocationPools",
                format!(
                    "Found overlapping allocation pools: {}-{} and {}-{} for subnet {}.",
                    from_u128(w[0].0, v6),
                    from_u128(w[0].1, v6),
                    from_u128(w[1].0, v6),
                    from_u128(w[1].1, v6),
                    net
                ),
            ));
        }
    }
    if let Some(gw) = gateway {
        let g = to_u128(gw);
        if ranges.iter().any(|(a, b)| *a <= g && g <= *b) {
            return Err(NeutronError::conflict(
                "GatewayConflictWithAllocationPools",
                format!("Gateway ip {gw} conflicts with allocation pool {pools:?}"),
            ));
        }
    }
    Ok(ranges)
}

/// Whether `ip` falls in one of the pools.
pub fn in_pools(pools: &[AllocationPool], ip: IpAddr) -> bool {
    let v = to_u128(ip);
    pools
        .iter()
        .any(|p| match (p.start.parse::<IpAddr>(), p.end.parse::<IpAddr>()) {
            (Ok(s), Ok(e)) => to_u128(s) <= v && v <= to_u128(e) && s.is_ipv6() == ip.is_ipv6(),
            _ => false,
        })
}

/// Up to `want` free addresses from the pools, lowest first, skipping those `used` reports.
/// Scans lazily so a large, mostly-free pool costs only `want` probes.
pub fn free_candidates(pools: &[AllocationPool], want: usize, used: impl FnMut(IpAddr) -> bool) -> Vec<IpAddr> {
    free_candidates_from(pools, 0, want, used)
}

/// Like [`free_candidates`], but starting at address `start` (as an integer) and wrapping
/// around to the beginning of the pools. Starting after the last allocation keeps the cost of
/// an allocation independent of how many addresses are already taken.
pub fn free_candidates_from(
    pools: &[AllocationPool],
    start: u128,
    want: usize,
    mut used: impl FnMut(IpAddr) -> bool,
) -> Vec<IpAddr> {
    let mut ranges: Vec<(u128, u128, bool)> = pools
        .iter()
        .filter_map(|p| match (p.start.parse::<IpAddr>(), p.end.parse::<IpAddr>()) {
            (Ok(s), Ok(e)) if s.is_ipv6() == e.is_ipv6() && to_u128(s) <= to_u128(e) => {
                Some((to_u128(s), to_u128(e), s.is_ipv6()))
            }
            _ => None,
        })
        .collect();
    ranges.sort();
    let mut out = Vec::new();
    // First from `start` upwards, then the part below `start`.
    let passes = [(start, u128::MAX), (0, start.saturating_sub(1))];
    for (i, (lo, hi)) in passes.iter().enumerate() {
        if i == 1 && start == 0 {
            break;
        }
        for (a, b, v6) in &ranges {
            let (from, to) = ((*a).max(*lo), (*b).min(*hi));
            let mut x = from;
            while x <= to {
                let ip = from_u128(x, *v6);
                if !used(ip) {
                    out.push(ip);
                    if out.len() >= want {
                        return out;
                    }
                }
                if x == u128::MAX {
                    break;
                }
                x += 1;
            }
        }
    }
    out
}

/// The SLAAC address of `mac` in a /64: modified EUI-64.
pub fn eui64(net: &IpNet, mac: &str) -> Option<IpAddr> {
    let bytes = parse_mac(mac)?;
    if !net_is_v6(net) || net.prefix_len() > 64 {
        return None;
    }
    let iid: [u8; 8] = [
        bytes[0] ^ 0x02,
        bytes[1],
        bytes[2],
        0xff,
        0xfe,
        bytes[3],
        bytes[4],
        bytes[5],
    ];
    let prefix = to_u128(net.network()) & !((1u128 << 64) - 1);
    Some(from_u128(prefix | u64::from_be_bytes(iid) as u128, true))
}

/// Parses `aa:bb:cc:dd:ee:ff` (or `-` separated).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut out = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        out[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(out)
}

/// A MAC usable for a port: unicast and not all zeros. Returned lower-case, colon-separated.
pub fn normalize_mac(s: &str) -> Option<String> {
    let b = parse_mac(s)?;
    if b[0] & 1 == 1 || b == [0; 6] {
        return None;
    }
    Some(format_mac(b))
}

pub fn format_mac(b: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4], b[5]
    )
}

/// A random MAC under Neutron's default base `fa:16:3e`.
pub fn random_mac(rng: &mut impl rand::Rng) -> String {
    format_mac([0xfa, 0x16, 0x3e, rng.gen(), rng.gen(), rng.gen()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn default_pools_skip_gateway_and_broadcast() {
        let n = net("10.0.0.0/24");
        let gw = default_gateway(&n);
        assert_eq!(gw, Some("10.0.0.1".parse().unwrap()));
        let p = default_pools(&n, gw);
        assert_eq!(
            p,
            vec![AllocationPool {
                start: "10.0.0.2".into(),
                end: "10.0.0.254".into()
            }]
        );
        let p6 = default_pools(&net("2001:db8::/64"), None);
        assert_eq!(p6[0].start, "2001:db8::1");
        assert_eq!(p6[0].end, "2001:db8::ffff:ffff:ffff:ffff");
    }

    #[test]
    fn gateway_in_middle_splits_pool() {
        let n = net("10.0.0.0/29");
        let p = default_pools(&n, Some("10.0.0.4".parse().unwrap()));
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].start.as_str(), p[0].end.as_str()), ("10.0.0.1", "10.0.0.3"));
        assert_eq!((p[1].start.as_str(), p[1].end.as_str()), ("10.0.0.5", "10.0.0.6"));
    }

    #[test]
    fn cidr_with_host_bits_rejected() {
        assert!(parse_cidr("10.0.0.1/24", 4).is_err());
        assert!(parse_cidr("10.0.0.0/33", 4).is_err());
        assert!(parse_cidr("10.0.0.0/24", 6).is_err());
        assert!(parse_cidr("10.0.0.0/24", 4).is_ok());
    }

    #[test]
    fn subnet_cidr_checks_follow_neutron() {
        let check = |c: &str, dhcp: bool| check_subnet_cidr(&c.parse().unwrap(), dhcp, true).map_err(|e| e.message);
        for (c, why) in [
            ("127.0.0.0/8", "Loopback"),
            ("127.1.0.0/16", "Loopback"),
            ("224.0.0.0/4", "Multicast"),
            ("239.1.0.0/16", "Multicast"),
            ("ff00::/8", "Multicast"),
            ("ff02::/64", "Multicast"),
            ("::1/128", "prefix length"),
            ("10.0.0.0/31", "prefix length"),
            ("0.0.0.0/8", "First IP '0.0.0.0'"),
            ("0.0.0.0/0", "First IP '0.0.0.0'"),
            ("::/0", "IPv6 subnet '::'"),
        ] {
            let msg = check(c, true).expect_err(c);
            assert!(msg.starts_with("Invalid input for operation: "), "{c}: {msg}");
            assert!(msg.contains(why), "{c}: {msg}");
        }
        assert!(check("0.0.0.0/0", false)
            .unwrap_err()
            .contains("0 is not allowed as CIDR prefix length"));
        for ok in ["127.0.0.0/8", "224.0.0.0/4", "10.0.0.0/31"] {
            assert!(check(ok, false).is_ok(), "{ok} without DHCP");
        }
        for ok in ["10.0.0.0/24", "2001:db8::/64", "126.0.0.0/8", "fe80::/64"] {
            assert!(check(ok, true).is_ok(), "{ok}");
        }
    }

    #[test]
    fn pools_validated() {
        let n = net("10.0.0.0/24");
        let gw = Some("10.0.0.1".parse().unwrap());
        let ok = [AllocationPool {
            start: "10.0.0.10".into(),
            end: "10.0.0.20".into(),
        }];
        assert!(validate_pools(&n, gw, &ok).is_ok());
        let overlap = [
            AllocationPool {
                start: "10.0.0.10".into(),
                end: "10.0.0.20".into(),
            },
            AllocationPool {
                start: "10.0.0.20".into(),
                end: "10.0.0.30".into(),
            },
        ];
        assert_eq!(validate_pools(&n, gw, &overlap).unwrap_err().status, 409);
        let out = [AllocationPool {
            start: "10.0.0.10".into(),
            end: "10.0.1.20".into(),
        }];
        assert_eq!(validate_pools(&n, gw, &out).unwrap_err().status, 400);
        let gwc = [AllocationPool {
            start: "10.0.0.1".into(),
            end: "10.0.0.20".into(),
        }];
        assert_eq!(
            validate_pools(&n, gw, &gwc).unwrap_err().kind,
            "GatewayConflictWithAllocationPools"
        );
    }

    #[test]
    fn candidates_skip_used_and_stop_early() {
        let pools = [AllocationPool {
            start: "10.0.0.2".into(),
            end: "10.0.0.254".into(),
        }];
        let c = free_candidates(&pools, 3, |ip| ip.to_string() == "10.0.0.3");
        let c: Vec<String> = c.iter().map(|i| i.to_string()).collect();
        assert_eq!(c, ["10.0.0.2", "10.0.0.4", "10.0.0.5"]);
        assert!(free_candidates(&pools, 3, |_| true).is_empty());
    }

    #[test]
    fn candidates_from_a_start_wrap_around() {
        let pools = [AllocationPool {
            start: "10.0.0.2".into(),
            end: "10.0.0.6".into(),
        }];
        let start = to_u128("10.0.0.5".parse().unwrap());
        let c: Vec<String> = free_candidates_from(&pools, start, 10, |ip| ip.to_string() == "10.0.0.3")
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(c, ["10.0.0.5", "10.0.0.6", "10.0.0.2", "10.0.0.4"]);
        let past_end = to_u128("10.0.0.200".parse().unwrap());
        assert_eq!(
            free_candidates_from(&pools, past_end, 1, |_| false)[0].to_string(),
            "10.0.0.2"
        );
    }

    #[test]
    fn eui64_matches_rfc4291_example() {
        let ip = eui64(&net("2001:db8::/64"), "fa:16:3e:12:34:56").unwrap();
        assert_eq!(ip.to_string(), "2001:db8::f816:3eff:fe12:3456");
    }

    #[test]
    fn macs() {
        assert_eq!(normalize_mac("FA:16:3E:00:00:01").as_deref(), Some("fa:16:3e:00:00:01"));
        assert!(normalize_mac("01:00:5e:00:00:01").is_none());
        assert!(normalize_mac("00:00:00:00:00:00").is_none());
        assert!(normalize_mac("zz:00:00:00:00:00").is_none());
        assert!(normalize_mac("fa:16:3e:00:00").is_none());
    }
}
