//! Router namespaces through `ip` (iproute2), run on a thread inside the node's namespace: a
//! router's legs are veth pairs created there, one end moved into the router's namespace.
//!
//! Each call reads what is there (`ip -j`) and changes only what differs.

use super::KernelError;
use crate::routing::{leg_names, DefaultRoute, RouterNs, FIP_TABLE, SNAT_NEXTHOP};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};

const NETNS_DIR: &str = "/run/netns";

fn ip(args: &[&str]) -> Result<String, KernelError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KernelError::io("running ip (is iproute2 installed?)", e))?;
    if !out.status.success() {
        return Err(KernelError::io(
            format!("ip {}", args.join(" ")),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_json(args: &[&str]) -> Result<Vec<Value>, KernelError> {
    let text = ip(args)?;
    if text.trim().is_empty() {
        return Ok(vec![]);
    }
    serde_json::from_str::<Vec<Value>>(&text).map_err(|e| {
        KernelError::io(
            format!("reading the output of ip {}", args.join(" ")),
            std::io::Error::other(e.to_string()),
        )
    })
}

/// Router namespaces whose names start with `prefix`.
pub fn router_namespaces(prefix: &str) -> Result<BTreeSet<String>, KernelError> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(KernelError::io(format!("listing {NETNS_DIR}"), e)),
    };
    Ok(dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect())
}

pub fn remove_router(netns: &str) -> Result<(), KernelError> {
    if !Path::new(NETNS_DIR).join(netns).exists() {
        return Ok(());
    }
    // The legs' outer ends go with their peers.
    ip(&["netns", "delete", netns]).map(|_| ())
}

/// One veth leg of a router namespace as the kernel must have it.
struct VethLeg<'a> {
    dev: &'a str,
    outer: String,
    bridge: &'a str,
    mac: &'a str,
    mtu: u32,
    addresses: Option<&'a BTreeSet<ipnet::IpNet>>,
    /// The bridge is told the leg's MAC (it never sends, so would never learn it).
    static_fdb: bool,
}

fn veth_legs(r: &RouterNs) -> Vec<VethLeg<'_>> {
    let mut out: Vec<VethLeg<'_>> = r
        .legs
        .iter()
        .map(|(dev, l)| VethLeg {
            dev,
            outer: leg_names(&l.port_id).1,
            bridge: &l.bridge,
            mac: &l.mac,
            mtu: l.mtu,
            addresses: Some(&l.addresses),
            static_fdb: false,
        })
        .collect();
    out.extend(r.snat_legs.iter().map(|(dev, l)| VethLeg {
        dev,
        outer: l.outer.clone(),
        bridge: &l.bridge,
        mac: &l.mac,
        mtu: l.mtu,
        addresses: None,
        static_fdb: true,
    }));
    if let Some(e) = &r.external {
        out.push(VethLeg {
            dev: &e.dev,
            outer: e.outer.clone(),
            bridge: &e.bridge,
            mac: &e.mac,
            mtu: e.mtu,
            addresses: Some(&e.addresses),
            static_fdb: false,
        });
    }
    out
}

/// Router-end device name prefixes this module owns inside a router namespace.
const LEG_PREFIXES: [&str; 3] = ["qr-", "qg-", "sg-"];

/// Brings router namespace `r.netns` to `r`: the namespace, forwarding on, a leg per interface
/// (address, MAC, MTU, in its bridge), SNAT legs, the external leg, permanent neighbours,
/// default and static routes, floating IP rules and the NAT table.
pub fn apply_router(r: &RouterNs) -> Result<(), KernelError> {
    let ns = r.netns.as_str();
    let links = if Path::new(NETNS_DIR).join(ns).exists() {
        ip_json(&["-j", "-n", ns, "link", "show"])?
    } else {
        vec![]
    };
    // A namespace is set up once (every process spawned here delays routing on a busy node);
    // one that lost its loopback or settings is remade by removing it.
    if links.is_empty() {
        let _ = ip(&["netns", "add", ns]);
        setup_namespace(ns)?;
    }
    let had_external = links
        .iter()
        .any(|l| l["ifname"].as_str().is_some_and(|n| n.starts_with("qg-")));
    apply_legs(r, &links)?;
    apply_neighbours_and_addresses(r)?;
    if north_south(r) || had_external || has_static_routes(ns)? {
        apply_north_south(r, had_external)?;
    }
    Ok(())
}

/// Whether routes this module owns are left in the namespace (a router that lost its
/// gateway or static routes).
fn has_static_routes(ns: &str) -> Result<bool, KernelError> {
    Ok(!ip_json(&["-j", "-n", ns, "route", "show", "table", "all", "proto", "static"])?.is_empty())
}

fn setup_namespace(ns: &str) -> Result<(), KernelError> {
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    // Reverse-path filtering off: traffic for the SNAT node arrives on a leg that is not the
    // way back to its source.
    ip(&[
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.default.send_redirects=0",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
        // IPv6 routing; gateway addresses usable at once (no duplicate detection: every
        // node's leg carries the same gateway address by design).
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ])
    .map(|_| ())
}

fn apply_legs(r: &RouterNs, links: &[Value]) -> Result<(), KernelError> {
    let ns = r.netns.as_str();
    let legs = veth_legs(r);
    let have: BTreeMap<String, &Value> = links
        .iter()
        .filter_map(|l| Some((l["ifname"].as_str()?.to_string(), l)))
        .filter(|(n, _)| LEG_PREFIXES.iter().any(|p| n.starts_with(p)))
        .collect();
    for dev in have.keys().filter(|d| !legs.iter().any(|l| l.dev == d.as_str())) {
        ip(&["-n", ns, "link", "delete", dev])?;
    }
    // The outer ends, read once: (bridge, up) by name.
    let outers: BTreeMap<String, (String, bool)> = if legs.iter().any(|l| have.contains_key(l.dev)) {
        ip_json(&["-j", "link", "show", "type", "veth"])?
            .iter()
            .filter_map(|l| {
                Some((
                    l["ifname"].as_str()?.to_string(),
                    (
                        l["master"].as_str().unwrap_or_default().to_string(),
                        l["flags"].to_string().contains("\"UP\""),
                    ),
                ))
            })
            .collect()
    } else {
        BTreeMap::new()
    };
    for leg in &legs {
        let (dev, outer) = (leg.dev, leg.outer.as_str());
        let mtu = leg.mtu.to_string();
        match have.get(dev) {
            None => {
                let add = [
                    "link", "add", outer, "mtu", &mtu, "type", "veth", "peer", "name", dev, "netns", ns,
                ];
                if ip(&add).is_err() {
                    // A leftover outer end (its namespace was deleted by hand) is in the way.
                    let _ = ip(&["link", "delete", outer]);
                    ip(&add)?;
                }
            }
            Some(l) => {
                let addr = l["address"].as_str().unwrap_or_default();
                let up = l["operstate"].as_str() == Some("UP") || l["flags"].to_string().contains("\"UP\"");
                let mtu_now = l["mtu"].as_u64().unwrap_or_default();
                let outer_ok = outers.get(outer).is_some_and(|(m, up)| m == leg.bridge && *up);
                if addr == leg.mac && up && mtu_now == u64::from(leg.mtu) && outer_ok {
                    continue;
                }
            }
        }
        // The outer end is a bridge port and nothing more: no IPv6 chatter from it.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{outer}/disable_ipv6"), "1");
        ip(&["link", "set", outer, "master", leg.bridge, "mtu", &mtu, "up"])?;
        ip(&["-n", ns, "link", "set", dev, "address", leg.mac, "mtu", &mtu, "up"])?;
        if leg.static_fdb {
            Command::new("bridge")
                .args(["fdb", "replace", leg.mac, "dev", outer, "master", "static"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| KernelError::io("running bridge fdb", e))?;
        }
    }

    Ok(())
}

fn apply_neighbours_and_addresses(r: &RouterNs) -> Result<(), KernelError> {
    let ns = r.netns.as_str();
    let legs = veth_legs(r);
    // Permanent neighbours, one batch of changes, before the addresses: once an address
    // brings its route, a packet must not find the neighbour unresolved and ARP for it.
    let now: BTreeSet<(String, String, String)> = ip_json(&["-j", "-n", ns, "neigh", "show", "nud", "permanent"])?
        .iter()
        .filter_map(|n| {
            Some((
                n["dev"].as_str()?.to_string(),
                n["dst"].as_str()?.to_string(),
                n["lladdr"].as_str()?.to_ascii_lowercase(),
            ))
        })
        .collect();
    let want: BTreeSet<(String, String, String)> = r
        .neighbors
        .iter()
        .filter(|n| r.legs.contains_key(&n.dev))
        .map(|n| (n.dev.clone(), n.ip.to_string(), n.mac.clone()))
        .collect();
    let mut batch = String::new();
    for (dev, dst, _) in now.difference(&want) {
        if !want.iter().any(|(d, i, _)| d == dev && i == dst) {
            batch.push_str(&format!("neigh del {dst} dev {dev}\n"));
        }
    }
    for (dev, dst, mac) in want.difference(&now) {
        batch.push_str(&format!("neigh replace {dst} lladdr {mac} dev {dev} nud permanent\n"));
    }
    if !batch.is_empty() {
        ip_batch(ns, &batch)?;
    }

    // Addresses on each leg; a gateway or floating IP that (re)appears is announced: a host
    // whose entry for it went stale while it was gone (or points at another node) would
    // otherwise wait for its next ARP probe.
    let all = ip_json(&["-j", "-n", ns, "addr", "show"])?;
    for leg in &legs {
        let Some(want_addrs) = leg.addresses else { continue };
        let dev = leg.dev;
        let now: BTreeSet<String> = all
            .iter()
            .filter(|i| i["ifname"].as_str() == Some(dev))
            .flat_map(|i| i["addr_info"].as_array().cloned().unwrap_or_default())
            .filter(|a| a["scope"].as_str() == Some("global"))
            .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"].as_u64()?)))
            .collect();
        let want: BTreeSet<String> = want_addrs.iter().map(|a| a.to_string()).collect();
        for a in now.difference(&want) {
            ip(&["-n", ns, "addr", "del", a, "dev", dev])?;
        }
        for a in want.difference(&now) {
            ip(&["-n", ns, "addr", "add", a, "dev", dev])?;
        }
        let mac = leg.mac.parse::<crate::desired::MacAddr>().ok().map(|m| m.0);
        for addr in want.difference(&now) {
            let v4 = addr
                .split('/')
                .next()
                .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok());
            if let (Some(v4), Some(mac)) = (v4, mac) {
                if let Err(e) = super::netns::gratuitous_arp(&Path::new(NETNS_DIR).join(ns), dev, v4, mac) {
                    tracing::warn!(netns = ns, dev, error = %e, "announcing a router address failed");
                }
            }
        }
    }

    Ok(())
}

/// Whether the router has anything beyond east-west legs here.
fn north_south(r: &RouterNs) -> bool {
    r.external.is_some() || r.default.is_some() || !r.routes.is_empty() || !r.fips.is_empty()
}

fn apply_north_south(r: &RouterNs, had_external: bool) -> Result<(), KernelError> {
    let ns = r.netns.as_str();
    routes(r)?;
    // The NAT table only ever exists with an external leg.
    if r.external.is_some() || had_external {
        super::netns::piped(
            "ip",
            &["netns", "exec", ns, "nft", "-f", "-"],
            &crate::routing::nat_script(r),
            &format!("nft in {ns}"),
        )?;
    }
    Ok(())
}

/// Routes this module owns carry `proto static`: the default route, static routes, and the
/// floating IP table; floating IPs' sources are steered by rules at [`RULE_PRIORITY`].
const RULE_PRIORITY: u32 = 1000;

fn routes(r: &RouterNs) -> Result<(), KernelError> {
    let ns = r.netns.as_str();
    let table = FIP_TABLE.to_string();
    // What should be there, as `ip route` arguments keyed by (table, destination).
    let mut want: BTreeMap<(String, String), String> = BTreeMap::new();
    match &r.default {
        Some(DefaultRoute::External(gw)) => {
            if let Some(e) = &r.external {
                want.insert(
                    ("main".into(), "default".into()),
                    format!("default via {gw} dev {} onlink proto static", e.dev),
                );
            }
        }
        Some(DefaultRoute::SnatNode { dev }) => {
            want.insert(
                ("main".into(), "default".into()),
                format!("default via {SNAT_NEXTHOP} dev {dev} onlink proto static"),
            );
        }
        None => {}
    }
    for (dst, via) in &r.routes {
        // `ip -j` shows a host route without its /32 (or /128).
        let d = dst.trunc();
        let key = if d.prefix_len() == d.max_prefix_len() {
            d.addr().to_string()
        } else {
            d.to_string()
        };
        want.insert(("main".into(), key), format!("{d} via {via} proto static"));
    }
    if let (Some(e), false) = (&r.external, r.fips.is_empty()) {
        if let Some(gw) = e.gateway {
            want.insert(
                (table.clone(), "default".into()),
                format!("default via {gw} dev {} onlink proto static table {table}", e.dev),
            );
        }
    }
    let mut batch = String::new();
    // One read of every table (a table that never had a route does not exist to be shown).
    for route in ip_json(&["-j", "-n", ns, "route", "show", "table", "all", "proto", "static"])? {
        let dst = route["dst"].as_str().unwrap_or_default().to_string();
        let t = route["table"].as_str().unwrap_or("main").to_string();
        if !want.contains_key(&(t.clone(), dst.clone())) {
            batch.push_str(&format!("route del {dst} table {t}\n"));
        }
    }
    for args in want.values() {
        batch.push_str(&format!("route replace {args}\n"));
    }
    // Floating IP sources: their own table, after the main table's specific routes.
    let rules = ip_json(&["-j", "-n", ns, "rule", "show"])?;
    let have: BTreeSet<String> = rules
        .iter()
        .filter(|x| x["priority"].as_u64() == Some(u64::from(RULE_PRIORITY)))
        .filter_map(|x| x["src"].as_str().map(str::to_string))
        .collect();
    let want_src: BTreeSet<String> = r.fips.iter().map(|(_, fixed)| fixed.to_string()).collect();
    let suppress = rules
        .iter()
        .any(|x| x["priority"].as_u64() == Some(u64::from(RULE_PRIORITY - 1)));
    if !want_src.is_empty() && !suppress {
        batch.push_str(&format!(
            "rule add priority {} lookup main suppress_prefixlength 0\n",
            RULE_PRIORITY - 1
        ));
    }
    for src in have.difference(&want_src) {
        batch.push_str(&format!("rule del priority {RULE_PRIORITY} from {src}\n"));
    }
    for src in want_src.difference(&have) {
        batch.push_str(&format!(
            "rule add priority {RULE_PRIORITY} from {src} lookup {table}\n"
        ));
    }
    if batch.is_empty() {
        return Ok(());
    }
    ip_batch(ns, &batch)
}

fn ip_batch(ns: &str, batch: &str) -> Result<(), KernelError> {
    super::netns::piped("ip", &["-n", ns, "-batch", "-"], batch, &format!("ip -n {ns} -batch"))
}
