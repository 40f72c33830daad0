//! Distributed routing, with real packets in the namespace test bed: two subnets on one
//! router, workloads on three nodes. Every cross-subnet pair reaches the other; a routed
//! packet goes from the source node straight to the destination node (a third node's VXLAN
//! devices stay quiet); no bridge learns a gateway MAC from another node; an interface removed
//! stops the routing and tears the router down where nothing needs it.
//!
//! Needs root; `ISTHMUS_BIN` as for the other test-bed tests.

mod support;
mod testbed;

use reqwest::Method;
use serde_json::{json, Value};
use support::{reaches, until, Ns};
use testbed::Testbed;

/// Packets received by the VXLAN devices of a node.
fn vxlan_rx(tb: &Testbed, node: usize) -> u64 {
    let out = tb.nodes[node].ns.ip(&["-s", "-j", "link", "show", "type", "vxlan"]);
    let links: Vec<Value> = serde_json::from_str(&out).unwrap_or_default();
    links
        .iter()
        .filter_map(|l| l["stats64"]["rx"]["packets"].as_u64())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_route_on_the_source_node() {
    support::require_root();
    let tb = Testbed::start(3).await;
    let admin = tb.admin_token.clone();
    let (na, sa) = tb.network_as(&admin, "l3-a", "10.40.1.0/24").await;
    let (nb, sb) = tb.network_as(&admin, "l3-b", "10.40.2.0/24").await;
    // a0 on node0, b1 on node1, a2 and b2 on node2.
    let a0 = tb.workload_as(&admin, &na, &sa, "10.40.1.10", 0, json!({})).await.1;
    let b1 = tb.workload_as(&admin, &nb, &sb, "10.40.2.11", 1, json!({})).await.1;
    let a2 = tb.workload_as(&admin, &na, &sa, "10.40.1.12", 2, json!({})).await.1;
    let b2 = tb.workload_as(&admin, &nb, &sb, "10.40.2.12", 2, json!({})).await.1;
    let wl = [
        (&a0, "10.40.1.10"),
        (&b1, "10.40.2.11"),
        (&a2, "10.40.1.12"),
        (&b2, "10.40.2.12"),
    ];
    assert!(
        !reaches(&a0, "10.40.1.10", &b1, "10.40.2.11"),
        "routed before any router"
    );
    let router = tb.router_as(&admin, &[&sa, &sb]).await;
    until(20, "a0 reaches b1 through the router", true, || {
        reaches(&a0, "10.40.1.10", &b1, "10.40.2.11")
    })
    .await;
    // Every cross-subnet pair, both ways.
    for (s, sip) in wl {
        for (d, dip) in wl {
            if sip[..8] != dip[..8] && sip != dip {
                until(10, &format!("{sip} reaches {dip}"), true, || reaches(s, sip, d, dip)).await;
            }
        }
    }

    // node0 → node1 only: node2 (on both networks) gets only the workloads' multicast and
    // broadcast, far fewer than the echoes (a path through it would carry every one). The
    // chatter of interfaces just brought up settles first. Every bridge forgets what it learnt
    // after a second (the default is five minutes): a bridge that only learnt its gateway
    // would flood the routed frames to every node once the entry aged out.
    for node in &tb.nodes {
        let out = node.ns.ip(&["-j", "link", "show", "type", "bridge"]);
        let bridges: Vec<Value> = serde_json::from_str(&out).unwrap_or_default();
        for b in bridges.iter().filter_map(|b| b["ifname"].as_str()) {
            node.ns.ip(&["link", "set", b, "type", "bridge", "ageing_time", "100"]);
        }
    }
    std::thread::sleep(std::time::Duration::from_secs(3));
    // Routed UDP for another node skips the bridge on its way out of the router (the routing
    // shortcut): a counter in every bridge's forward hook for UDP from router legs.
    for node in &tb.nodes[..2] {
        node.ns.nft(
            "add table bridge leg_count { chain from_legs { type filter hook forward priority -500; \
             iifname \"rl-*\" meta l4proto udp counter; }; }",
        );
    }
    let (before2, before1) = (vxlan_rx(&tb, 2), vxlan_rx(&tb, 1));
    for _ in 0..300 {
        assert!(reaches(&a0, "10.40.1.10", &b1, "10.40.2.11"));
    }
    let (to_node2, to_node1) = (vxlan_rx(&tb, 2) - before2, vxlan_rx(&tb, 1) - before1);
    println!("300 echoes node0 -> node1: VXLAN packets received by node1 {to_node1}, by node2 {to_node2}");
    for node in &tb.nodes[..2] {
        let out = node.ns.nft("list table bridge leg_count");
        let bridged: u64 = out
            .split("packets ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX);
        println!(
            "{}: routed UDP frames through a bridge from a leg: {bridged}",
            node.name
        );
        assert!(
            bridged < 30,
            "{}: {bridged} routed UDP frames took the bridge from a leg",
            node.name
        );
        node.ns.nft("delete table bridge leg_count");
    }
    assert!(to_node1 >= 300, "node1 received only {to_node1} VXLAN packets");
    assert!(
        to_node2 < 60,
        "node2 received {to_node2} VXLAN packets for 300 echoes between node0 and node1"
    );

    // Every workload resolved its gateway to its own node's leg, and no bridge learned its
    // own node's legs on a VXLAN port (the gateway stays local everywhere).
    let ports = tb
        .net(Method::GET, &format!("/v2.0/ports?device_id={router}"), None)
        .await
        .1;
    let interfaces: Vec<(String, String)> = ports["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["id"].as_str()?.to_string(),
                p["fixed_ips"][0]["ip_address"].as_str()?.to_string(),
            ))
        })
        .collect();
    assert_eq!(interfaces.len(), 2, "{ports}");
    for (w, node) in [(&a0, 0), (&b1, 1), (&a2, 2), (&b2, 2)] {
        let name = &tb.nodes[node].name;
        let neigh = w.ip(&["neigh", "show"]);
        for (port, gw) in &interfaces {
            let mine = isthmus_agent::routing::leg_mac(name, port);
            for line in neigh.lines().filter(|l| l.starts_with(&format!("{gw} "))) {
                assert!(
                    line.contains(&mine),
                    "{name}: a workload resolved {gw} elsewhere: {line}"
                );
            }
            let (_, fdb, _) = support::run(&["ip", "netns", "exec", &tb.nodes[node].ns.name, "bridge", "fdb", "show"]);
            for line in fdb.lines().filter(|l| l.starts_with(&mine)) {
                assert!(
                    !line.contains("isvx-"),
                    "{name}: its own leg learned from another node: {line}"
                );
            }
        }
    }

    // A leg's pinned MAC removed by hand (or never pinned, by an older agent) is pinned again
    // by the next full resync.
    let ns1 = tb.nodes[1].ns.name.clone();
    let fdb1 = || support::run(&["ip", "netns", "exec", &ns1, "bridge", "fdb", "show"]).1;
    let macs1: Vec<String> = interfaces
        .iter()
        .map(|(p, _)| isthmus_agent::routing::leg_mac(&tb.nodes[1].name, p))
        .collect();
    let pin = fdb1()
        .lines()
        .find(|l| macs1.iter().any(|m| l.starts_with(m.as_str())) && l.contains(" master ") && l.ends_with(" static"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("node1: no pinned leg MAC in:\n{}", fdb1()));
    let words: Vec<&str> = pin.split_whitespace().collect();
    let dev = words.iter().skip_while(|w| **w != "dev").nth(1).expect("dev");
    support::must(&[
        "ip", "netns", "exec", &ns1, "bridge", "fdb", "del", words[0], "dev", dev, "master",
    ]);
    until(20, "the leg's MAC pinned again", true, || {
        fdb1().lines().any(|l| l == pin)
    })
    .await;

    // Another project with the same CIDRs behind its own router, its workloads on the other
    // nodes: each project's traffic is routed within it (an echo answered is one from that
    // project's workload: the other's has no server listening).
    let other = tb.member("l3-other").await;
    let (pa, psa) = tb.network_as(&other, "l3-a", "10.40.1.0/24").await;
    let (pb, psb) = tb.network_as(&other, "l3-b", "10.40.2.0/24").await;
    let pa0 = tb.workload_as(&other, &pa, &psa, "10.40.1.10", 1, json!({})).await.1;
    let pb1 = tb.workload_as(&other, &pb, &psb, "10.40.2.11", 0, json!({})).await.1;
    tb.router_as(&other, &[&psa, &psb]).await;
    until(20, "the other project's a0 reaches its b1", true, || {
        reaches(&pa0, "10.40.1.10", &pb1, "10.40.2.11")
    })
    .await;
    assert!(reaches(&pb1, "10.40.2.11", &pa0, "10.40.1.10"));
    assert!(reaches(&a0, "10.40.1.10", &b1, "10.40.2.11"), "the first project broke");
    assert!(
        !reaches(&pa0, "10.40.1.10", &b1, "10.40.2.11"),
        "crossed into the first project"
    );
    assert!(
        !reaches(&a0, "10.40.1.10", &pb1, "10.40.2.11"),
        "crossed into the other project"
    );

    // Subnet B leaves the router: routing stops; node0, whose only network is A, keeps the
    // router (it still has an interface on A), and no longer has B's bridge.
    tb.interface_as(&admin, &router, &sb, false).await;
    until(20, "a0 no longer reaches b1", false, || {
        reaches(&a0, "10.40.1.10", &b1, "10.40.2.11")
    })
    .await;
    let vni_b = {
        let n = tb.net(Method::GET, &format!("/v2.0/networks/{nb}"), None).await.1;
        n["network"]["provider:segmentation_id"].as_u64().unwrap()
    };
    until(20, "node0 drops net-b's bridge", false, || {
        tb.nodes[0].has_link(&format!("isbr-{vni_b}"))
    })
    .await;
}

/// An IPv6-only network with one SLAAC subnet, as admin: (network id, subnet id).
async fn v6_network(tb: &Testbed, name: &str, cidr: &str) -> (String, String) {
    let admin = tb.admin_token.clone();
    let n = tb.create(&admin, "networks", "network", json!({"name": name})).await;
    let net = n["id"].as_str().unwrap().to_string();
    let s = tb
        .create(
            &admin,
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": cidr, "ip_version": 6,
                "ipv6_ra_mode": "slaac", "ipv6_address_mode": "slaac"}),
        )
        .await;
    (net, s["id"].as_str().unwrap().to_string())
}

/// A workload on `net` on node `node` (SLAAC: the address comes from the port's MAC): its
/// namespace and IPv6 address.
async fn v6_workload(tb: &Testbed, net: &str, node: usize) -> (Ns, String) {
    let p = tb
        .create(&tb.admin_token, "ports", "port", json!({"network_id": net}))
        .await;
    let id = p["id"].as_str().unwrap().to_string();
    let addr = p["fixed_ips"][0]["ip_address"].as_str().unwrap().to_string();
    let (ns, _) = tb.nodes[node].attach(&id).await;
    (ns, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_hosts_learn_their_router_from_advertisements() {
    support::require_root();
    let tb = Testbed::start(2).await;
    let (na, sa) = v6_network(&tb, "v6-a", "2001:db8:a::/64").await;
    let (nb, sb) = v6_network(&tb, "v6-b", "2001:db8:b::/64").await;
    let (wa, ipa) = v6_workload(&tb, &na, 0).await;
    let (wb, ipb) = v6_workload(&tb, &nb, 1).await;
    let default_v6 = |ns: &Ns| ns.ip(&["-6", "route", "show", "default"]);
    assert!(
        default_v6(&wa).is_empty(),
        "a default route before any router: {}",
        default_v6(&wa)
    );
    tb.router_as(&tb.admin_token, &[&sa, &sb]).await;
    // Each host takes its default route from its local router leg's advertisements.
    for (w, what) in [(&wa, "wa"), (&wb, "wb")] {
        until(
            30,
            &format!("{what} has a default route from an advertisement"),
            true,
            || {
                let r = default_v6(w);
                r.contains("proto ra") && r.contains("via fe80::")
            },
        )
        .await;
    }
    // The address is the port's (SLAAC from its MAC), usable once duplicate detection is done.
    for (w, ip) in [(&wa, &ipa), (&wb, &ipb)] {
        until(20, &format!("{ip} configured and usable"), true, || {
            let a = w.ip(&["-6", "addr", "show", "scope", "global"]);
            a.contains(ip.as_str()) && !a.contains("tentative")
        })
        .await;
    }
    until(20, "wa reaches wb over IPv6 through the router", true, || {
        reaches(&wa, &ipa, &wb, &ipb)
    })
    .await;
    until(10, "wb reaches wa over IPv6", true, || reaches(&wb, &ipb, &wa, &ipa)).await;
}
