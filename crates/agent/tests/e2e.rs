//! End to end: the API server, nodes with real agent processes, workloads attached through the
//! agents' sockets (see `testbed`). Needs root (CI runs as root).
//!
//! - three nodes, two projects, three networks (two with the same CIDR): reachability within a
//!   network, isolation between them, port status, and state removed when ports go;
//! - agents SIGKILLed and restarted: devices adopted (same ifindexes), no echo lost, drift
//!   repaired by the periodic sync;
//! - the server SIGKILLed and restarted on its data directory: the datapath stays (even across
//!   an agent restart meanwhile), no echo lost, changes flow again afterwards.

mod support;
mod testbed;

use reqwest::Method;
use serde_json::json;
use std::time::Duration;
use support::{echo, reaches, Ns, UdpStream};
use testbed::{eventually, Testbed};

const TEST_TIMEOUT: Duration = Duration::from_secs(80);

struct Workload {
    port: String,
    ip: &'static str,
    node: usize,
    ns: Option<Ns>,
}

async fn network(tb: &Testbed, token: &str, name: &str, cidr: &str) -> (String, String, u32) {
    let n = tb.create(token, "networks", "network", json!({"name": name})).await;
    let id = n["id"].as_str().unwrap().to_string();
    let s = tb
        .create(
            token,
            "subnets",
            "subnet",
            json!({"network_id": id, "cidr": cidr, "ip_version": 4}),
        )
        .await;
    let (st, full) = tb.net(Method::GET, &format!("/v2.0/networks/{id}"), None).await;
    assert_eq!(st, 200, "{full}");
    let vni = full["network"]["provider:segmentation_id"].as_u64().expect("vni") as u32;
    (id, s["id"].as_str().unwrap().to_string(), vni)
}

async fn port(tb: &Testbed, token: &str, net: &str, subnet: &str, ip: &'static str, node: usize) -> Workload {
    let p = tb
        .create(
            token,
            "ports",
            "port",
            json!({"network_id": net, "fixed_ips": [{"subnet_id": subnet, "ip_address": ip}]}),
        )
        .await;
    Workload {
        port: p["id"].as_str().unwrap().to_string(),
        ip,
        node,
        ns: None,
    }
}

fn ns(w: &Workload) -> &Ns {
    w.ns.as_ref().expect("attached")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_two_projects_three_networks() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tb = Testbed::start(3).await;
        let t1 = tb.member("proj-one").await;
        let t2 = tb.member("proj-two").await;
        // Two networks with the same CIDR in different projects, and a third one.
        let (na, sa, vni_a) = network(&tb, &t1, "net-a", "10.0.0.0/24").await;
        let (nb, sb, vni_b) = network(&tb, &t2, "net-b", "10.0.0.0/24").await;
        let (nc, sc, _vni_c) = network(&tb, &t1, "net-c", "10.1.0.0/24").await;
        let mut w = vec![
            port(&tb, &t1, &na, &sa, "10.0.0.10", 0).await, // a0
            port(&tb, &t1, &na, &sa, "10.0.0.11", 1).await, // a1
            port(&tb, &t2, &nb, &sb, "10.0.0.12", 1).await, // b1
            port(&tb, &t2, &nb, &sb, "10.0.0.13", 2).await, // b2
            port(&tb, &t1, &nc, &sc, "10.1.0.10", 2).await, // c2
            port(&tb, &t1, &nc, &sc, "10.1.0.11", 0).await, // c0
        ];
        for wl in &w {
            let p = tb.port(&wl.port).await;
            assert_eq!(p["status"], json!("DOWN"), "{p}");
        }
        for wl in w.iter_mut() {
            let node = &tb.nodes[wl.node];
            let (ns, answer) = node.attach(&wl.port).await;
            assert_eq!(answer["mtu"], json!(1450), "{answer}");
            assert_eq!(answer["interface"], json!("eth0"), "{answer}");
            let prefix = if wl.ip.starts_with("10.0.") {
                "10.0.0.1"
            } else {
                "10.1.0.1"
            };
            assert_eq!(
                answer["ips"],
                json!([{"address": format!("{}/24", wl.ip), "gateway": prefix}]),
                "{answer}"
            );
            assert_eq!(ns.mtu("eth0"), 1450);
            let p = tb.port(&wl.port).await;
            assert_eq!(p["status"], json!("ACTIVE"), "{p}");
            assert_eq!(p["binding:host_id"], json!(node.name), "{p}");
            assert_eq!(p["binding:vif_type"], json!("veth"), "{p}");
            assert_eq!(p["binding:vif_details"]["mtu"], json!(1450), "{p}");
            wl.ns = Some(ns);
        }

        let st = tb.nodes[0].request(json!({"op": "status"})).await;
        assert_eq!(st["synced"], json!(true), "{st}");
        let ports = st["local_ports"].as_array().cloned().unwrap_or_default();
        assert!(
            ports.contains(&json!(w[0].port)) && ports.contains(&json!(w[5].port)),
            "{st}"
        );
        assert_eq!(st["networks"].as_array().map(Vec::len), Some(2), "{st}");

        // Same network, different nodes: they talk.
        for (x, y) in [(0, 1), (2, 3), (4, 5)] {
            let (a, b) = (&w[x], &w[y]);
            let mut ok = false;
            // The first packets may race the remote FDB entries of the last attach.
            for _ in 0..10 {
                if reaches(ns(a), a.ip, ns(b), b.ip) {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            assert!(ok, "{} ({}) cannot reach {} ({})", a.ip, a.port, b.ip, b.port);
            assert!(reaches(ns(b), b.ip, ns(a), a.ip), "{} cannot reach back {}", b.ip, a.ip);
        }
        // Different networks: nothing gets through, not even one way, overlapping CIDRs
        // included, on the same node or across nodes.
        for (x, y, what) in [
            (0, 3, "net-a reached net-b across nodes"),
            (1, 2, "net-a reached net-b on the same node"),
            (3, 1, "net-b reached net-a across nodes"),
            (5, 0, "net-c reached net-a on the same node"),
            (4, 3, "net-c reached net-b on the same node"),
        ] {
            let (a, b) = (&w[x], &w[y]);
            let (got, seen) = echo(ns(a), a.ip, ns(b), b.ip, 64);
            assert!(!got && seen == 0, "{what} (echo {got}, {seen} datagrams seen)");
        }

        // a1 leaves: detach, then delete the port. node1 loses net-a entirely (b1 keeps net-b
        // there), node0 loses its forwarding entries towards node1 on net-a.
        let a1 = w.remove(1);
        let node1 = &tb.nodes[1];
        let d = node1.detach(&a1.port).await;
        assert_eq!(d["ok"], json!(true), "{d}");
        assert!(ns(&a1).link("eth0").is_none(), "the workload kept its interface");
        assert_eq!(tb.port(&a1.port).await["status"], json!("DOWN"));
        // Idempotent.
        assert_eq!(node1.detach(&a1.port).await["ok"], json!(true));
        let (s, b) = tb
            .net_as(&t1, Method::DELETE, &format!("/v2.0/ports/{}", a1.port), None)
            .await;
        assert_eq!(s, 204, "{b}");
        let (bra, vxa) = (format!("isbr-{vni_a}"), format!("isvx-{vni_a}"));
        eventually(10, "node1 drops net-a's bridge and VXLAN device", || {
            !node1.has_link(&bra) && !node1.has_link(&vxa)
        })
        .await;
        assert!(node1.has_link(&format!("isbr-{vni_b}")), "node1 lost net-b");
        let node0 = &tb.nodes[0];
        let node1_ip = node1.underlay_ip.clone();
        eventually(10, "node0 drops its net-a entries towards node1", || {
            !node0.ns.fdb(&vxa).contains(&node1_ip)
        })
        .await;
        assert!(node0.has_link(&bra), "node0 still hosts a0 on net-a");
        // The other networks still work.
        let (b1, b2) = (&w[1], &w[2]);
        assert!(reaches(ns(b1), b1.ip, ns(b2), b2.ip), "net-b broke");
        // Errors on the socket are answers, not hangs.
        let e = node1.detach("no such/port").await;
        assert_eq!((e["ok"].clone(), e["code"].clone()), (json!(false), json!(400)), "{e}");
        let e = node1
            .request(
                json!({"op": "attach", "port_id": "00000000-0000-0000-0000-000000000000",
                "netns": ns(b1).path()}),
            )
            .await;
        assert_eq!(e["code"], json!(404), "{e}");
        // A workload that vanishes without a detach (its namespace deleted): the agent notices
        // on its next sync and reports the port DOWN.
        let c0 = w.pop().expect("c0");
        drop(c0.ns);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tb.port(&c0.port).await["status"] != json!("DOWN") {
            assert!(
                std::time::Instant::now() < deadline,
                "port of a vanished workload stays ACTIVE"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("test timed out");
}

/// Two nodes, one network, a workload on each, attached and talking.
async fn pair(tb: &Testbed) -> (Workload, Workload, u32) {
    let t = tb.member("proj").await;
    let (net, sub, vni) = network(tb, &t, "net", "10.0.0.0/24").await;
    let mut a = port(tb, &t, &net, &sub, "10.0.0.10", 0).await;
    let mut b = port(tb, &t, &net, &sub, "10.0.0.11", 1).await;
    a.ns = Some(tb.nodes[0].attach(&a.port).await.0);
    b.ns = Some(tb.nodes[1].attach(&b.port).await.0);
    let mut ok = false;
    for _ in 0..10 {
        if reaches(ns(&a), a.ip, ns(&b), b.ip) {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "the pair cannot talk");
    (a, b, vni)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_agents_adopt_the_datapath_without_losing_a_packet() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut tb = Testbed::start(2).await;
        let (a, b, vni) = pair(&tb).await;
        let devs = [
            format!("isbr-{vni}"),
            format!("isvx-{vni}"),
            isthmus_agent::names::tap(&a.port),
        ];
        let before: Vec<u32> = devs.iter().map(|d| tb.nodes[0].ns.ifindex(d)).collect();
        let stream = UdpStream::start(ns(&a), a.ip, ns(&b), b.ip, Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..2 {
            let node = &mut tb.nodes[i];
            let snapshots = node.log_count("snapshot received");
            node.kill_agent();
            tokio::time::sleep(Duration::from_millis(300)).await;
            node.start_agent();
            node.wait_socket().await;
            let node = &tb.nodes[i];
            eventually(15, "the restarted agent gets a snapshot", || {
                node.log_count("snapshot received") > snapshots
            })
            .await;
        }
        // Let a few reconcile passes (and a periodic full sync) run on the adopted state.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let (sent, echoed) = tokio::task::spawn_blocking(move || stream.finish()).await.unwrap();
        assert!(sent >= 30, "only {sent} datagrams sent");
        assert_eq!(
            echoed,
            sent,
            "lost {} of {sent} echoes across agent restarts",
            sent - echoed
        );
        let after: Vec<u32> = devs.iter().map(|d| tb.nodes[0].ns.ifindex(d)).collect();
        assert_eq!(before, after, "devices were rebuilt instead of adopted ({devs:?})");
        assert_eq!(tb.port(&a.port).await["status"], json!("ACTIVE"));
        // Drift: the bridge deleted by hand comes back with the next periodic sync, with the
        // VXLAN device and the port device back in it, and traffic resumes.
        let node0 = &tb.nodes[0];
        node0.ns.ip(&["link", "del", &devs[0]]);
        eventually(10, "the periodic sync rebuilds the bridge", || {
            node0
                .ns
                .link(&devs[2])
                .is_some_and(|l| l.contains(&format!("master {}", devs[0])))
                && node0
                    .ns
                    .link(&devs[1])
                    .is_some_and(|l| l.contains(&format!("master {}", devs[0])))
        })
        .await;
        assert!(
            reaches(ns(&a), a.ip, ns(&b), b.ip),
            "traffic did not resume after the repair"
        );
        // The restarted agent still serves attaches.
        let t = tb.member("proj2").await;
        let (net, sub, _) = network(&tb, &t, "net2", "10.9.0.0/24").await;
        let c = port(&tb, &t, &net, &sub, "10.9.0.5", 0).await;
        let (_wl, answer) = tb.nodes[0].attach(&c.port).await;
        assert_eq!(answer["ips"][0]["address"], json!("10.9.0.5/24"), "{answer}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_datapath_outlives_the_server_and_catches_up_after_it() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut tb = Testbed::start_with(2, true).await;
        let (a, b, vni) = pair(&tb).await;
        let vx = format!("isvx-{vni}");
        let before = tb.nodes[0].ns.ifindex(&vx);
        let stream = UdpStream::start(ns(&a), a.ip, ns(&b), b.ip, Duration::from_millis(100));
        let snapshots: Vec<usize> = tb.nodes.iter().map(|n| n.log_count("snapshot received")).collect();
        tb.kill_server();
        // An agent restarted while the server is away has no view at all: it must keep the
        // datapath as it is rather than tear it down.
        tb.nodes[0].kill_agent();
        tb.nodes[0].start_agent();
        tb.nodes[0].wait_socket().await;
        // Longer than a full-sync period: the agents keep the last view in force.
        tokio::time::sleep(Duration::from_millis(4000)).await;
        let e = tb.nodes[0]
            .request(json!({"op": "attach", "port_id": "p-while-down", "netns": ns(&a).path()}))
            .await;
        assert_eq!((e["ok"].clone(), e["code"].clone()), (json!(false), json!(503)), "{e}");
        tb.restart_server().await;
        for (node, before) in tb.nodes.iter().zip(snapshots) {
            eventually(15, "the agent reconnects and gets a new snapshot", || {
                node.log_count("snapshot received") > before
            })
            .await;
        }
        let (sent, echoed) = tokio::task::spawn_blocking(move || stream.finish()).await.unwrap();
        assert!(sent >= 40, "only {sent} datagrams sent");
        assert_eq!(
            echoed,
            sent,
            "lost {} of {sent} echoes while the server was away",
            sent - echoed
        );
        assert_eq!(tb.nodes[0].ns.ifindex(&vx), before, "the VXLAN device was rebuilt");
        // Changes flow again: a new port on node1 shows up in node0's forwarding entries. It
        // is the pair's project's (its default group lets the pair in).
        let p = tb.port(&b.port).await;
        let net = p["network_id"].as_str().unwrap().to_string();
        let sub = p["fixed_ips"][0]["subnet_id"].as_str().unwrap().to_string();
        let (s, c) = tb
            .net(
                Method::POST,
                "/v2.0/ports",
                Some(json!({"port": {"network_id": net, "project_id": p["project_id"],
                        "fixed_ips": [{"subnet_id": sub, "ip_address": "10.0.0.12"}]}})),
            )
            .await;
        assert_eq!(s, 201, "{c}");
        let c_id = c["port"]["id"].as_str().unwrap().to_string();
        let mac = c["port"]["mac_address"].as_str().unwrap().to_string();
        let (wc, _) = tb.nodes[1].attach(&c_id).await;
        let node0 = &tb.nodes[0];
        eventually(10, "node0 learns the new port's MAC", || {
            node0.ns.fdb(&vx).contains(&mac)
        })
        .await;
        assert!(
            reaches(ns(&a), a.ip, &wc, "10.0.0.12"),
            "the new workload is unreachable"
        );
    })
    .await
    .expect("test timed out");
}
