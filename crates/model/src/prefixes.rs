//! Subnet pool arithmetic: prefix sets, free space, allocation, prefix-length bounds and
//! quota units, as Neutron's subnet allocator computes them. The store transaction that
//! records an allocation is what makes it stick; this module only decides.

use crate::error::{NResult, NeutronError};
use crate::ipam::{from_u128, to_u128};
use ipnet::IpNet;

/// An inclusive range of addresses as integers.
type Range = (u128, u128);

fn bits(v6: bool) -> u8 {
    if v6 {
        128
    } else {
        32
    }
}

/// Parses one pool prefix (or a requested CIDR). Host bits must be zero, as Neutron's subnet
/// validator insists.
pub fn parse_prefix(attr: &str, s: &str) -> NResult<IpNet> {
    let net: IpNet = s
        .trim()
        .parse()
        .map_err(|_| NeutronError::invalid_attr(attr, format!("'{s}' is not a valid IP subnet")))?;
    if net.trunc() != net {
        return Err(NeutronError::invalid_attr(
            attr,
            format!(
                "'{s}' isn't a recognized IP subnet cidr, '{}' is recommended",
                net.trunc()
            ),
        ));
    }
    Ok(net)
}

fn range(n: &IpNet) -> Range {
    (to_u128(n.network()), to_u128(n.broadcast()))
}

/// Sorted, merged ranges covering `nets`.
fn merged(nets: &[IpNet]) -> Vec<Range> {
    let mut r: Vec<Range> = nets.iter().map(range).collect();
    r.sort();
    let mut out: Vec<Range> = Vec::with_capacity(r.len());
    for (a, b) in r {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// `a` minus `b`, both sorted and merged.
fn minus(a: &[Range], b: &[Range]) -> Vec<Range> {
    let mut out = vec![];
    for &(mut lo, hi) in a {
        let mut done = false;
        for &(x, y) in b {
            if y < lo || x > hi {
                continue;
            }
            if x > lo {
                out.push((lo, x - 1));
            }
            if y >= hi {
                done = true;
                break;
            }
            lo = y + 1;
        }
        if !done {
            out.push((lo, hi));
        }
    }
    out
}

/// The fewest CIDRs covering exactly `lo..=hi`, in address order.
fn range_cidrs(mut lo: u128, hi: u128, v6: bool) -> Vec<IpNet> {
    let width = bits(v6) as u32;
    let last_offset = |k: u32| if k >= 128 { u128::MAX } else { (1u128 << k) - 1 };
    let mut out = vec![];
    loop {
        let mut k = if lo == 0 { width } else { lo.trailing_zeros().min(width) };
        while last_offset(k) > hi - lo {
            k -= 1;
        }
        if let Ok(n) = IpNet::new(from_u128(lo, v6), (width - k) as u8) {
            out.push(n);
        }
        let end = lo + last_offset(k);
        if end >= hi {
            return out;
        }
        lo = end + 1;
    }
}

fn cidrs(ranges: &[Range], v6: bool) -> Vec<IpNet> {
    ranges.iter().flat_map(|&(a, b)| range_cidrs(a, b, v6)).collect()
}

/// Neutron keeps a pool's prefixes compacted: overlapping and adjacent prefixes merged into
/// the fewest CIDRs.
pub fn compact(nets: &[IpNet]) -> Vec<IpNet> {
    let v6 = nets.first().is_some_and(|n| matches!(n, IpNet::V6(_)));
    cidrs(&merged(nets), v6)
}

/// The CIDRs of `pool` not covered by `used`.
pub fn free(pool: &[IpNet], used: &[IpNet]) -> Vec<IpNet> {
    let v6 = pool.first().is_some_and(|n| matches!(n, IpNet::V6(_)));
    cidrs(&minus(&merged(pool), &merged(used)), v6)
}

/// Whether any address is in both sets.
pub fn overlap(a: &[IpNet], b: &[IpNet]) -> bool {
    let b = merged(b);
    merged(a).iter().any(|&(x, y)| b.iter().any(|&(p, q)| x <= q && p <= y))
}

/// Whether `inner` lies entirely within the set `outer`.
pub fn covers(outer: &[IpNet], inner: &IpNet) -> bool {
    let (a, b) = range(inner);
    merged(outer).iter().any(|&(x, y)| x <= a && b <= y)
}

/// The first `/prefixlen` of the smallest free block that holds one (lowest address among
/// equals), as Neutron's allocator picks it so large blocks stay whole.
pub fn allocate_any(pool: &[IpNet], used: &[IpNet], prefixlen: u8) -> Option<IpNet> {
    let block = free(pool, used)
        .into_iter()
        .filter(|b| b.prefix_len() <= prefixlen)
        .min_by_key(|b| (std::cmp::Reverse(b.prefix_len()), to_u128(b.network())))?;
    IpNet::new(block.network(), prefixlen).ok()
}

/// Whether `cidr` is wholly free in the pool.
pub fn can_allocate(pool: &[IpNet], used: &[IpNet], cidr: &IpNet) -> bool {
    let (a, b) = range(cidr);
    minus(&merged(pool), &merged(used))
        .iter()
        .any(|&(x, y)| x <= a && b <= y)
}

/// Quota units of a prefix: addresses for IPv4, /64s for IPv6 (Neutron's `quota_units`).
pub fn quota_units(prefixlen: u8, v6: bool) -> u128 {
    let unit: u8 = if v6 { 64 } else { 32 };
    if prefixlen > unit {
        0
    } else {
        1u128 << (unit - prefixlen)
    }
}

/// A pool's prefix-length bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub min: u8,
    pub max: u8,
    pub default: u8,
}

fn bound_err(kind: &str, len: i64, base: &str, base_len: i64) -> NeutronError {
    NeutronError::new(
        400,
        "IllegalSubnetPoolPrefixBounds",
        format!("Illegal prefix bounds: {kind}={len}, {base}={base_len}."),
    )
}

/// Fills in Neutron's defaults (min 8 for IPv4 and 64 for IPv6, max the address width,
/// default the min) and checks min <= default <= max <= width.
pub fn bounds(v6: bool, min: Option<i64>, max: Option<i64>, default: Option<i64>) -> NResult<Bounds> {
    for (attr, v) in [
        ("min_prefixlen", min),
        ("max_prefixlen", max),
        ("default_prefixlen", default),
    ] {
        if let Some(v) = v {
            if v < 0 {
                return Err(NeutronError::invalid_attr(
                    attr,
                    format!("'{v}' should be non-negative"),
                ));
            }
        }
    }
    let width = bits(v6) as i64;
    let min = min.unwrap_or(if v6 { 64 } else { 8 });
    let max = max.unwrap_or(width);
    let default = default.unwrap_or(min);
    if min > max {
        return Err(bound_err("min_prefixlen", min, "max_prefixlen", max));
    }
    if max > width {
        return Err(bound_err("max_prefixlen", max, "ip_version_max", width));
    }
    if default < min {
        return Err(bound_err("default_prefixlen", default, "min_prefixlen", min));
    }
    if default > max {
        return Err(bound_err("default_prefixlen", default, "max_prefixlen", max));
    }
    // All three are within 0..=128 now.
    Ok(Bounds {
        min: min as u8,
        max: max as u8,
        default: default as u8,
    })
}

/// A pool's prefixes from a request: parsed, one IP version, compacted. Returns them with
/// their version.
pub fn pool_prefixes(list: &[String]) -> NResult<(Vec<IpNet>, u8)> {
    if list.is_empty() {
        return Err(NeutronError::new(
            400,
            "EmptySubnetPoolPrefixList",
            "Empty subnet pool prefix list.",
        ));
    }
    let nets = list
        .iter()
        .map(|s| parse_prefix("prefixes", s))
        .collect::<NResult<Vec<_>>>()?;
    let v6 = matches!(nets[0], IpNet::V6(_));
    if nets.iter().any(|n| matches!(n, IpNet::V6(_)) != v6) {
        return Err(NeutronError::new(
            400,
            "PrefixVersionMismatch",
            "Cannot mix IPv4 and IPv6 prefixes in a subnet pool.",
        ));
    }
    Ok((compact(&nets), if v6 { 6 } else { 4 }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }
    fn strs(v: &[IpNet]) -> Vec<String> {
        v.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn compacting_merges_overlaps_and_neighbours() {
        assert_eq!(
            strs(&compact(&nets(&[
                "10.0.0.0/24",
                "10.0.1.0/24",
                "10.0.0.128/25",
                "10.0.3.0/24"
            ]))),
            ["10.0.0.0/23", "10.0.3.0/24"]
        );
        assert_eq!(strs(&compact(&nets(&["::/1", "8000::/1"]))), ["::/0"]);
        assert_eq!(strs(&compact(&nets(&["0.0.0.0/0"]))), ["0.0.0.0/0"]);
    }

    #[test]
    fn free_space_is_the_pool_minus_allocations() {
        let pool = nets(&["10.0.0.0/24"]);
        assert_eq!(
            strs(&free(&pool, &nets(&["10.0.0.0/26"]))),
            ["10.0.0.64/26", "10.0.0.128/25"]
        );
        assert!(free(&pool, &pool).is_empty());
        assert_eq!(strs(&free(&nets(&["::/0"]), &[])), ["::/0"]);
    }

    #[test]
    fn allocation_takes_the_smallest_fitting_block() {
        let pool = nets(&["10.0.0.0/16", "192.168.0.0/28"]);
        // The /28 is the smallest block that holds a /28.
        assert_eq!(allocate_any(&pool, &[], 28).unwrap().to_string(), "192.168.0.0/28");
        let used = nets(&["10.0.0.0/24"]);
        assert_eq!(allocate_any(&pool, &used, 24).unwrap().to_string(), "10.0.1.0/24");
        assert_eq!(allocate_any(&pool, &used, 25).unwrap().to_string(), "10.0.1.0/25");
        assert!(allocate_any(&pool, &used, 15).is_none());
        let full = nets(&["10.0.0.0/16", "192.168.0.0/28"]);
        assert!(allocate_any(&pool, &full, 32).is_none());
    }

    #[test]
    fn allocations_never_overlap() {
        let pool = nets(&["10.1.0.0/22"]);
        let mut used: Vec<IpNet> = vec![];
        for len in [24, 26, 25, 24, 26, 24, 28] {
            if let Some(n) = allocate_any(&pool, &used, len) {
                assert!(!overlap(&[n], &used), "{n} overlaps {used:?}");
                assert!(covers(&pool, &n));
                used.push(n);
            }
        }
        assert_eq!(
            used.iter().map(|n| quota_units(n.prefix_len(), false)).sum::<u128>(),
            1024
        );
    }

    #[test]
    fn specific_requests_must_be_free() {
        let pool = nets(&["10.0.0.0/24"]);
        let used = nets(&["10.0.0.0/26"]);
        assert!(can_allocate(&pool, &used, &"10.0.0.64/26".parse().unwrap()));
        assert!(!can_allocate(&pool, &used, &"10.0.0.0/27".parse().unwrap()));
        assert!(!can_allocate(&pool, &used, &"10.0.1.0/26".parse().unwrap()));
        assert!(!can_allocate(&pool, &[], &"10.0.0.0/23".parse().unwrap()));
    }

    #[test]
    fn bounds_default_and_check() {
        assert_eq!(
            bounds(false, None, None, None).unwrap(),
            Bounds {
                min: 8,
                max: 32,
                default: 8
            }
        );
        assert_eq!(bounds(true, None, None, None).unwrap().min, 64);
        assert_eq!(bounds(false, Some(24), None, Some(26)).unwrap().default, 26);
        for (min, max, def) in [
            (Some(30), Some(24), None),
            (None, Some(33), None),
            (Some(24), None, Some(20)),
            (None, Some(24), Some(28)),
        ] {
            let e = bounds(false, min, max, def).unwrap_err();
            assert_eq!((e.status, e.kind.as_str()), (400, "IllegalSubnetPoolPrefixBounds"));
        }
        assert_eq!(bounds(false, Some(-1), None, None).unwrap_err().status, 400);
    }

    #[test]
    fn quota_units_follow_neutron() {
        assert_eq!(quota_units(24, false), 256);
        assert_eq!(quota_units(64, true), 1);
        assert_eq!(quota_units(48, true), 65536);
        assert_eq!(quota_units(80, true), 0);
    }

    #[test]
    fn pool_prefixes_are_checked() {
        let (p, v) = pool_prefixes(&["10.0.0.0/24".into(), "10.0.1.0/24".into()]).unwrap();
        assert_eq!((strs(&p), v), (vec!["10.0.0.0/23".to_string()], 4));
        assert_eq!(pool_prefixes(&[]).unwrap_err().kind, "EmptySubnetPoolPrefixList");
        assert_eq!(
            pool_prefixes(&["10.0.0.0/24".into(), "2001:db8::/64".into()])
                .unwrap_err()
                .kind,
            "PrefixVersionMismatch"
        );
        assert_eq!(pool_prefixes(&["10.0.0.1/24".into()]).unwrap_err().status, 400);
    }
}
