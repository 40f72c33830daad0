//! Router namespaces through `ip` (iproute2), run on a thread inside the node's namespace: a
//! router's legs are veth pairs created there, one end moved into the router's namespace.
//!
//! Each call reads what is there (`ip -j`) and changes only what differs.

use super::KernelError;
use crate::routing::{leg_names, RouterNs};
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

/// Brings router namespace `r.netns` to `r`: the namespace, forwarding on, a leg per interface
/// (address, MAC, MTU, in its bridge), the permanent neighbour entries.
pub fn apply_router(r: &RouterNs) -> Result<(), KernelError> {
    let ns = r.netns.as_str();
    if !Path::new(NETNS_DIR).join(ns).exists() {
        ip(&["netns", "add", ns])?;
    }
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.default.send_redirects=0",
    ])?;

    // Legs: router ends present in the namespace, by name.
    let links = ip_json(&["-j", "-n", ns, "link", "show"])?;
    let have: BTreeMap<String, &Value> = links
        .iter()
        .filter_map(|l| Some((l["ifname"].as_str()?.to_string(), l)))
        .filter(|(n, _)| n.starts_with("qr-"))
        .collect();
    for dev in have.keys().filter(|d| !r.legs.contains_key(*d)) {
        ip(&["-n", ns, "link", "delete", dev])?;
    }
    for (dev, leg) in &r.legs {
        let (_, outer) = leg_names(&leg.port_id);
        let mtu = leg.mtu.to_string();
        match have.get(dev) {
            None => {
                // A leftover outer end (its namespace was deleted by hand) is in the way.
                let _ = ip(&["link", "delete", &outer]);
                ip(&[
                    "link", "add", &outer, "mtu", &mtu, "type", "veth", "peer", "name", dev, "netns", ns,
                ])?;
            }
            Some(l) => {
                let addr = l["address"].as_str().unwrap_or_default();
                let up = l["operstate"].as_str() == Some("UP") || l["flags"].to_string().contains("\"UP\"");
                let mtu_now = l["mtu"].as_u64().unwrap_or_default();
                if addr == leg.mac && up && mtu_now == u64::from(leg.mtu) && outer_ok(&outer, &leg.bridge) {
                    continue;
                }
            }
        }
        // The outer end is a bridge port and nothing more: no IPv6 chatter from it.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{outer}/disable_ipv6"), "1");
        ip(&["link", "set", &outer, "master", &leg.bridge, "mtu", &mtu, "up"])?;
        ip(&["-n", ns, "link", "set", dev, "address", &leg.mac, "mtu", &mtu, "up"])?;
    }

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
    // Addresses on each leg.
    for (dev, leg) in &r.legs {
        let now: BTreeSet<String> = ip_json(&["-j", "-n", ns, "addr", "show", "dev", dev])?
            .iter()
            .flat_map(|i| i["addr_info"].as_array().cloned().unwrap_or_default())
            .filter(|a| a["scope"].as_str() == Some("global"))
            .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"].as_u64()?)))
            .collect();
        let want: BTreeSet<String> = leg.addresses.iter().map(|a| a.to_string()).collect();
        for a in now.difference(&want) {
            ip(&["-n", ns, "addr", "del", a, "dev", dev])?;
        }
        for a in want.difference(&now) {
            ip(&["-n", ns, "addr", "add", a, "dev", dev])?;
        }
        // A gateway that (re)appears is announced: a workload whose entry for it went stale
        // while it was gone would otherwise wait for its next ARP probe, up to a second.
        let mac = leg.mac.parse::<crate::desired::MacAddr>().ok().map(|m| m.0);
        for addr in want.difference(&now) {
            let v4 = addr.split('/').next().and_then(|a| a.parse::<std::net::Ipv4Addr>().ok());
            if let (Some(v4), Some(mac)) = (v4, mac) {
                if let Err(e) = super::netns::gratuitous_arp(&Path::new(NETNS_DIR).join(ns), dev, v4, mac) {
                    tracing::warn!(netns = ns, dev, error = %e, "announcing a router address failed");
                }
            }
        }
    }

    Ok(())
}

/// Whether a leg's outer end exists, is up and is a port of `bridge`.
fn outer_ok(outer: &str, bridge: &str) -> bool {
    ip_json(&["-j", "link", "show", "dev", outer]).is_ok_and(|l| {
        l.first()
            .is_some_and(|l| l["master"].as_str() == Some(bridge) && l["flags"].to_string().contains("\"UP\""))
    })
}

fn ip_batch(ns: &str, batch: &str) -> Result<(), KernelError> {
    super::netns::piped("ip", &["-n", ns, "-batch", "-"], batch, &format!("ip -n {ns} -batch"))
}
