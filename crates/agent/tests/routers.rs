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

async fn ok(tb: &Testbed, method: Method, path: &str, body: Value, want: u16) -> Value {
    let (s, b) = tb.net(method.clone(), path, Some(body)).await;
    assert_eq!(s, want, "{method} {path}: {b}");
    b
}

async fn network(tb: &Testbed, name: &str, cidr: &str) -> (String, String) {
    let n = ok(
        tb,
        Method::POST,
        "/v2.0/networks",
        json!({"network": {"name": name}}),
        201,
    )
    .await;
    let net = n["network"]["id"].as_str().unwrap().to_string();
    let s = ok(
        tb,
        Method::POST,
        "/v2.0/subnets",
        json!({"subnet": {"network_id": net, "cidr": cidr, "ip_version": 4}}),
        201,
    )
    .await;
    (net, s["subnet"]["id"].as_str().unwrap().to_string())
}

async fn workload(tb: &Testbed, net: &str, subnet: &str, ip: &str, node: usize) -> Ns {
    let attrs = json!({"network_id": net, "fixed_ips": [{"subnet_id": subnet, "ip_address": ip}]});
    let p = ok(tb, Method::POST, "/v2.0/ports", json!({ "port": attrs }), 201).await;
    let id = p["port"]["id"].as_str().unwrap().to_string();
    tb.nodes[node].attach(&id).await.0
}

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
    let (na, sa) = network(&tb, "l3-a", "10.40.1.0/24").await;
    let (nb, sb) = network(&tb, "l3-b", "10.40.2.0/24").await;
    // a0 on node0, b1 on node1, a2 and b2 on node2.
    let a0 = workload(&tb, &na, &sa, "10.40.1.10", 0).await;
    let b1 = workload(&tb, &nb, &sb, "10.40.2.11", 1).await;
    let a2 = workload(&tb, &na, &sa, "10.40.1.12", 2).await;
    let b2 = workload(&tb, &nb, &sb, "10.40.2.12", 2).await;
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

    let r = ok(
        &tb,
        Method::POST,
        "/v2.0/routers",
        json!({"router": {"name": "r"}}),
        201,
    )
    .await;
    let router = r["router"]["id"].as_str().unwrap().to_string();
    for s in [&sa, &sb] {
        ok(
            &tb,
            Method::PUT,
            &format!("/v2.0/routers/{router}/add_router_interface"),
            json!({"subnet_id": s}),
            200,
        )
        .await;
    }
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
    // chatter of interfaces just brought up settles first.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (before2, before1) = (vxlan_rx(&tb, 2), vxlan_rx(&tb, 1));
    for _ in 0..300 {
        assert!(reaches(&a0, "10.40.1.10", &b1, "10.40.2.11"));
    }
    let (to_node2, to_node1) = (vxlan_rx(&tb, 2) - before2, vxlan_rx(&tb, 1) - before1);
    println!("300 echoes node0 -> node1: VXLAN packets received by node1 {to_node1}, by node2 {to_node2}");
    assert!(to_node1 >= 300, "node1 received only {to_node1} VXLAN packets");
    assert!(
        to_node2 < 60,
        "node2 received {to_node2} VXLAN packets for 300 echoes between node0 and node1"
    );

    // No bridge learned a gateway MAC on its VXLAN port (the gateway stays local everywhere).
    let ports = tb
        .net(Method::GET, &format!("/v2.0/ports?device_id={router}"), None)
        .await
        .1;
    let gw_macs: Vec<String> = ports["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["mac_address"].as_str().map(str::to_string))
        .collect();
    assert_eq!(gw_macs.len(), 2, "{ports}");
    for n in &tb.nodes {
        let (_, fdb, _) = support::run(&["ip", "netns", "exec", &n.ns.name, "bridge", "fdb", "show"]);
        for line in fdb
            .lines()
            .filter(|l| gw_macs.iter().any(|m| l.starts_with(m.as_str())))
        {
            assert!(
                !line.contains("isvx-"),
                "{}: gateway MAC learned from another node: {line}",
                n.name
            );
        }
    }

    // Subnet B leaves the router: routing stops; node0, whose only network is A, keeps the
    // router (it still has an interface on A), and no longer has B's bridge.
    ok(
        &tb,
        Method::PUT,
        &format!("/v2.0/routers/{router}/remove_router_interface"),
        json!({"subnet_id": sb}),
        200,
    )
    .await;
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
