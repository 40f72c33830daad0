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
        })
        .collect();
    out.extend(r.snat_legs.iter().map(|(dev, l)| VethLeg {
        dev,
        outer: l.outer.clone(),
        bridge: &l.bridge,
        mac: &l.mac,
        mtu: l.mtu,
        addresses: None,
    }));
    if let Some(e) = &r.external {
        out.push(VethLeg {
            dev: &e.dev,
            outer: e.outer.clone(),
            bridge: &e.bridge,
            mac: &e.mac,
            mtu: e.mtu,
            addresses: Some(&e.addresses),
        });
    }
    out
}

/// Router-end device name prefixes this module owns inside a router namespace.
const LEG_PREFIXES: [&str; 3] = ["qr-", "qg-", "sg-"];

/// What a router namespace holds, read in one `ip -batch`.
struct Seen {
    links: Vec<Value>,
    neighbours: Vec<Value>,
    addresses: Vec<Value>,
    routes: Vec<Value>,
    rules: Vec<Value>,
}

fn read(ns: &str) -> Result<Seen, KernelError> {
    let script = "link show\nneigh show nud permanent\naddr show\nroute show table all proto static\nrule show\n";
    let out = Command::new("ip")
        .args(["-j", "-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            if let Some(mut i) = c.stdin.take() {
                i.write_all(script.as_bytes())?;
            }
            c.wait_with_output()
        })
        .map_err(|e| KernelError::io("running ip (is iproute2 installed?)", e))?;
    let bad = |why: String| KernelError::io(format!("reading router namespace {ns}"), std::io::Error::other(why));
    if !out.status.success() {
        return Err(bad(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts: Vec<Vec<Value>> = serde_json::Deserializer::from_str(&text)
        .into_iter::<Vec<Value>>()
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if parts.len() != 5 {
        return Err(bad(format!("{} answers to 5 questions", parts.len())));
    }
    let rules = parts.pop().unwrap_or_default();
    let routes = parts.pop().unwrap_or_default();
    let addresses = parts.pop().unwrap_or_default();
    let neighbours = parts.pop().unwrap_or_default();
    let links = parts.pop().unwrap_or_default();
    Ok(Seen {
        links,
        neighbours,
        addresses,
        routes,
        rules,
    })
}

/// Brings router namespace `r.netns` to `r`: the namespace, forwarding on, a leg per interface
/// (address, MAC, MTU, in its bridge), SNAT legs, the external leg, permanent neighbours,
/// default and static routes, floating IP rules and the NAT table.
///
/// A busy node applies many routers at once, and every process costs: one `ip -batch` reads
/// the namespace, one makes the legs' outer ends, one changes everything inside.
pub fn apply_router(r: &RouterNs) -> Result<(), KernelError> {
    let ns = r.netns.as_str();
    if !Path::new(NETNS_DIR).join(ns).exists() {
        let _ = ip(&["netns", "add", ns]);
        setup_namespace(ns)?;
    }
    let seen = read(ns)?;
    if !seen
        .links
        .iter()
        .any(|l| l["ifname"].as_str() == Some("lo") && l["flags"].to_string().contains("\"UP\""))
    {
        // A namespace made by hand or half set up: set it up (again).
        setup_namespace(ns)?;
    }
    let had_external = seen
        .links
        .iter()
        .any(|l| l["ifname"].as_str().is_some_and(|n| n.starts_with("qg-")));
    let mut inside = String::new();
    let pin = legs(r, &seen, &mut inside)?;
    neighbours(r, &seen, &mut inside);
    let fresh = addresses(r, &seen, &mut inside);
    if north_south(r) || had_external || !seen.routes.is_empty() {
        routes(r, &seen, &mut inside);
    }
    let changed = if inside.is_empty() {
        Ok(())
    } else {
        ip_batch(ns, &inside)
    };
    if changed.is_ok() {
        announce(ns, &fresh);
    }
    // After the announcement: the bridge has learnt the leg from it, and a new gateway should
    // not wait for one more process. Even when the batch failed: the legs exist, and the
    // next pass finds them as they should be.
    if !pin.is_empty() {
        super::netns::piped("bridge", &["-batch", "-"], &pin, "bridge -batch (router legs' MACs)")?;
    }
    changed?;
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

/// Makes missing legs and fixes wrong ones: their outer ends in the node's namespace (one
/// batch), their inner ends' MAC, MTU and state into `inside`. Returns the `bridge -batch`
/// script that pins every leg's MAC in its bridge.
fn legs(r: &RouterNs, seen: &Seen, inside: &mut String) -> Result<String, KernelError> {
    let ns = r.netns.as_str();
    let legs = veth_legs(r);
    let have: BTreeMap<&str, &Value> = seen
        .links
        .iter()
        .filter_map(|l| Some((l["ifname"].as_str()?, l)))
        .filter(|(n, _)| LEG_PREFIXES.iter().any(|p| n.starts_with(p)))
        .collect();
    for dev in have.keys().filter(|d| !legs.iter().any(|l| l.dev == **d)) {
        inside.push_str(&format!("link delete {dev}\n"));
    }
    let mut create = String::new();
    let mut outside = String::new();
    let mut static_fdb = String::new();
    for leg in &legs {
        let (dev, outer) = (leg.dev, leg.outer.as_str());
        // The bridge is told every leg's MAC, whenever the router is applied (a change, or a
        // full resync): a leg sends little on its own bridge (the replies it routes leave
        // through another), so a learned entry would age out, and from then on every frame to
        // the gateway would be flooded to every node of the network. Legs made before the pin
        // existed, or whose entry someone removed, get it back on the next resync.
        static_fdb.push_str(&format!("fdb replace {} dev {outer} master static\n", leg.mac));
        match have.get(dev) {
            None => {
                create.push_str(&format!(
                    "link add {outer} mtu {} type veth peer name {dev} netns {ns}\n",
                    leg.mtu
                ));
            }
            Some(l) => {
                let addr = l["address"].as_str().unwrap_or_default();
                let up = l["flags"].to_string().contains("\"UP\"");
                let mtu_now = l["mtu"].as_u64().unwrap_or_default();
                let outer_ok = outer_state(outer).is_some_and(|(m, up)| m == leg.bridge && up);
                if addr == leg.mac && up && mtu_now == u64::from(leg.mtu) && outer_ok {
                    continue;
                }
            }
        }
        // No IPv6 address of its own on the outer end (no chatter into the tenant's network
        // from the moment it is up; disable_ipv6 below only applies once it exists).
        outside.push_str(&format!(
            "link set {outer} addrgenmode none master {} mtu {} up\n",
            leg.bridge, leg.mtu
        ));
        inside.push_str(&format!("link set {dev} address {} mtu {} up\n", leg.mac, leg.mtu));
    }
    // New legs and fixed outer ends in one process; a leftover outer end (its namespace was
    // deleted by hand) makes the batch fail: then one at a time, removing what blocks.
    let batch = format!("{create}{outside}");
    if !batch.is_empty() && super::netns::piped("ip", &["-batch", "-"], &batch, "ip -batch (router legs)").is_err() {
        for line in create.lines() {
            let args: Vec<&str> = line.split_whitespace().collect();
            if ip(&args).is_err() {
                let _ = ip(&["link", "delete", args[2]]);
                ip(&args)?;
            }
        }
        if !outside.is_empty() {
            super::netns::piped("ip", &["-batch", "-"], &outside, "ip -batch (router legs)")?;
        }
    }
    for leg in &legs {
        // The outer end is a bridge port and nothing more: no IPv6 chatter from it.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", leg.outer), "1");
    }
    Ok(static_fdb)
}

/// A leg's outer end in the node's namespace: (its bridge, whether it is up), from sysfs (a
/// process listing every veth of the node would cost more the more ports the node has).
fn outer_state(dev: &str) -> Option<(String, bool)> {
    let base = Path::new("/sys/class/net").join(dev);
    let flags = std::fs::read_to_string(base.join("flags")).ok()?;
    let up = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).ok()? & 1 == 1;
    let master = std::fs::read_link(base.join("master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    Some((master, up))
}

/// Permanent neighbours, before the addresses in the batch: once an address brings its
/// route, a packet must not find the neighbour unresolved and ask for it.
fn neighbours(r: &RouterNs, seen: &Seen, inside: &mut String) {
    let now: BTreeSet<(String, String, String)> = seen
        .neighbours
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
    for (dev, dst, _) in now.difference(&want) {
        // Entries of a leg being deleted go with it (the batch deletes links first).
        if r.legs.contains_key(dev) && !want.iter().any(|(d, i, _)| d == dev && i == dst) {
            inside.push_str(&format!("neigh del {dst} dev {dev}\n"));
        }
    }
    for (dev, dst, mac) in want.difference(&now) {
        inside.push_str(&format!("neigh replace {dst} lladdr {mac} dev {dev} nud permanent\n"));
    }
}

/// Global addresses on each leg as they are now, by device.
fn addresses_now(seen: &Seen, dev: &str) -> BTreeSet<String> {
    seen.addresses
        .iter()
        .filter(|i| i["ifname"].as_str() == Some(dev))
        .flat_map(|i| i["addr_info"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["scope"].as_str() == Some("global"))
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"].as_u64()?)))
        .collect()
}

/// Adds and removes leg addresses; returns the IPv4 addresses that appear, to be announced
/// once the batch has run: (leg, its outer end, its MAC, address).
fn addresses(r: &RouterNs, seen: &Seen, inside: &mut String) -> Vec<Fresh> {
    let mut fresh = vec![];
    for leg in veth_legs(r) {
        let Some(want_addrs) = leg.addresses else { continue };
        let now = addresses_now(seen, leg.dev);
        let want: BTreeSet<String> = want_addrs.iter().map(|a| a.to_string()).collect();
        for a in now.difference(&want) {
            inside.push_str(&format!("addr del {a} dev {}\n", leg.dev));
        }
        for a in want.difference(&now) {
            inside.push_str(&format!("addr add {a} dev {}\n", leg.dev));
        }
        let Some(mac) = leg.mac.parse::<crate::desired::MacAddr>().ok().map(|m| m.0) else {
            continue;
        };
        for a in want_addrs.iter().filter(|a| !now.contains(&a.to_string())) {
            if let std::net::IpAddr::V4(v4) = a.addr() {
                fresh.push(Fresh {
                    dev: leg.dev.to_string(),
                    outer: leg.outer.clone(),
                    mac,
                    ip: v4,
                });
            }
        }
    }
    fresh
}

/// An IPv4 address that appeared on a leg.
struct Fresh {
    dev: String,
    outer: String,
    mac: [u8; 6],
    ip: std::net::Ipv4Addr,
}

/// How long an announcement waits for its leg's bridge port to forward.
const PORT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// A gateway or floating IP that (re)appeared is announced: a host whose entry for it went
/// stale while it was gone (or points at another node), or that asked for it before this
/// node's leg existed, would otherwise wait for its next ARP probe (a second or more).
/// The bridge only forwards from a new port once the kernel has noticed its carrier (done
/// asynchronously), so the announcement waits for that first; sent earlier it is dropped.
fn announce(ns: &str, fresh: &[Fresh]) {
    let mut ready = BTreeSet::new();
    for f in fresh {
        if ready.insert(f.outer.as_str()) && !wait_forwarding(&f.outer, PORT_WAIT) {
            tracing::debug!(netns = ns, dev = %f.outer, "bridge port not forwarding yet; announcing anyway");
        }
        if let Err(e) = super::netns::gratuitous_arp(&Path::new(NETNS_DIR).join(ns), &f.dev, f.ip, f.mac) {
            tracing::warn!(netns = ns, dev = %f.dev, error = %e, "announcing a router address failed");
        }
    }
}

/// Waits until bridge port `dev` is in the forwarding state (3); false on timeout or when it
/// is no bridge port.
fn wait_forwarding(dev: &str, limit: std::time::Duration) -> bool {
    let path = format!("/sys/class/net/{dev}/brport/state");
    let start = std::time::Instant::now();
    loop {
        match std::fs::read_to_string(&path) {
            Ok(s) if s.trim() == "3" => return true,
            Ok(_) if start.elapsed() < limit => std::thread::sleep(std::time::Duration::from_millis(1)),
            _ => return false,
        }
    }
}

/// Whether the router has anything beyond east-west legs here.
fn north_south(r: &RouterNs) -> bool {
    r.external.is_some() || r.default.is_some() || !r.routes.is_empty() || !r.fips.is_empty()
}

/// Routes this module owns carry `proto static`: the default route, static routes, and the
/// floating IP table; floating IPs' sources are steered by rules at [`RULE_PRIORITY`].
const RULE_PRIORITY: u32 = 1000;

fn routes(r: &RouterNs, seen: &Seen, inside: &mut String) {
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
    for route in &seen.routes {
        let dst = route["dst"].as_str().unwrap_or_default().to_string();
        let t = route["table"].as_str().unwrap_or("main").to_string();
        if !want.contains_key(&(t.clone(), dst.clone())) {
            inside.push_str(&format!("route del {dst} table {t}\n"));
        }
    }
    for args in want.values() {
        inside.push_str(&format!("route replace {args}\n"));
    }
    // Floating IP sources: their own table, after the main table's specific routes.
    let have: BTreeSet<String> = seen
        .rules
        .iter()
        .filter(|x| x["priority"].as_u64() == Some(u64::from(RULE_PRIORITY)))
        .filter_map(|x| x["src"].as_str().map(str::to_string))
        .collect();
    let want_src: BTreeSet<String> = r.fips.iter().map(|(_, fixed)| fixed.to_string()).collect();
    let suppress = seen
        .rules
        .iter()
        .any(|x| x["priority"].as_u64() == Some(u64::from(RULE_PRIORITY - 1)));
    if !want_src.is_empty() && !suppress {
        inside.push_str(&format!(
            "rule add priority {} lookup main suppress_prefixlength 0\n",
            RULE_PRIORITY - 1
        ));
    }
    for src in have.difference(&want_src) {
        inside.push_str(&format!("rule del priority {RULE_PRIORITY} from {src}\n"));
    }
    for src in want_src.difference(&have) {
        inside.push_str(&format!(
            "rule add priority {RULE_PRIORITY} from {src} lookup {table}\n"
        ));
    }
}

fn ip_batch(ns: &str, batch: &str) -> Result<(), KernelError> {
    super::netns::piped("ip", &["-n", ns, "-batch", "-"], batch, &format!("ip -n {ns} -batch"))
}
