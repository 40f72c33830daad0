//! North-south routing with real packets: an "outside" namespace plays the upstream router of
//! the flat external network `public` (203.0.113.0/24) and an external host behind it
//! (198.51.100.10). A router with a gateway on it SNATs a port without a floating IP through
//! its gateway address on one gateway node, and that moves to another gateway node when the
//! first dies; a floating IP reaches its port from the external host, the port's replies come
//! from the floating IP, disassociating stops it and re-associating with a port on another
//! node moves it.
//!
//! Needs root; `ISTHMUS_BIN` as for the other test-bed tests.

mod support;
mod testbed;

use reqwest::Method;
use serde_json::{json, Value};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use support::{udp_in, Ns};
use testbed::{Opts, Testbed, EXTERNAL_HOST};

/// Sends datagrams from `from` in `src` to `to`, with an echo server bound to `bind` in `dst`
/// (`to` differs from `bind` when an address is translated on the way): the source address
/// the server saw, and the address the echo came back from.
fn probe(src: &Ns, from: &str, dst: &Ns, bind: &str, to: &str) -> Option<(IpAddr, IpAddr)> {
    let server = udp_in(dst, SocketAddr::new(bind.parse().unwrap(), 0));
    let port = server.local_addr().unwrap().port();
    let client = udp_in(src, SocketAddr::new(from.parse().unwrap(), 0));
    server.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    client.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let target = SocketAddr::new(to.parse().unwrap(), port);
    let srv = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut buf = [0u8; 64];
        let mut seen = None;
        while Instant::now() < deadline {
            if let Ok((n, peer)) = server.recv_from(&mut buf) {
                seen = Some(peer.ip());
                let _ = server.send_to(&buf[..n], peer);
                if n == 1 {
                    break;
                }
            }
        }
        seen
    });
    let mut reply = None;
    let mut buf = [0u8; 64];
    for _ in 0..5 {
        let _ = client.send_to(b"probe", target);
        if let Ok((_, peer)) = client.recv_from(&mut buf) {
            reply = Some(peer.ip());
            break;
        }
    }
    // Tells the server it may stop.
    let _ = client.send_to(b"x", target);
    let seen = srv.join().unwrap();
    Some((seen?, reply?))
}

async fn until_probe(
    secs: u64,
    what: &str,
    f: impl Fn() -> Option<(IpAddr, IpAddr)>,
    want: Option<(IpAddr, IpAddr)>,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let got = f();
        if got == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "{what}: got {got:?}, want {want:?} after {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floating_ips_and_snat_with_failover() {
    support::require_root();
    let tb = Testbed::start_full(
        3,
        Opts {
            outside: Some(vec![1, 2]),
            ..Default::default()
        },
    )
    .await;
    let admin = tb.admin_token.clone();
    let outside = tb.outside.as_ref().unwrap();
    let ext_id = tb
        .external_network(json!({"allocation_pools": [{"start": "203.0.113.10", "end": "203.0.113.99"}]}))
        .await;
    // A project network on a router with a gateway; the default group lets the outside in.
    let (na, sa) = tb.network_as(&admin, "ns-a", "10.70.1.0/24").await;
    let (_, groups) = tb.net(Method::GET, "/v2.0/security-groups?name=default", None).await;
    let (_, net) = tb.net(Method::GET, &format!("/v2.0/networks/{na}"), None).await;
    let project = str_of(&net["network"]["project_id"]);
    let group = groups["security_groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["project_id"] == project.as_str())
        .map(|g| str_of(&g["id"]))
        .expect("admin's default group");
    tb.create(
        &admin,
        "security-group-rules",
        "security_group_rule",
        json!({"security_group_id": group, "direction": "ingress", "ethertype": "IPv4",
            "protocol": "udp", "remote_ip_prefix": "0.0.0.0/0"}),
    )
    .await;
    let (p0, w0) = tb.workload_as(&admin, &na, &sa, "10.70.1.10", 0, json!({})).await;
    let (p2, w2) = tb.workload_as(&admin, &na, &sa, "10.70.1.12", 2, json!({})).await;
    let router = tb.router_as(&admin, &[&sa]).await;
    let r = tb
        .expect_as(
            &admin,
            Method::PUT,
            &format!("/v2.0/routers/{router}"),
            json!({"router": {"external_gateway_info": {"network_id": ext_id}}}),
            200,
        )
        .await;
    let gw_ip = str_of(&r["router"]["external_gateway_info"]["external_fixed_ips"][0]["ip_address"]);
    assert!(gw_ip.starts_with("203.0.113."), "{r}");

    // SNAT: w0 (node0, no floating IP) reaches the external host as the gateway address.
    let host = &outside.host;
    let snat = || probe(&w0, "10.70.1.10", host, EXTERNAL_HOST, EXTERNAL_HOST);
    let want_snat = Some((ip(&gw_ip), ip(EXTERNAL_HOST)));
    until_probe(30, "w0 reaches the external host through SNAT", snat, want_snat).await;

    // A floating IP for w0: the external host reaches it, w0's replies and its own traffic
    // come from the floating IP.
    let fip = tb
        .create(
            &admin,
            "floatingips",
            "floatingip",
            json!({"floating_network_id": ext_id, "port_id": p0}),
        )
        .await;
    let fip_id = str_of(&fip["id"]);
    let fip_ip = str_of(&fip["floating_ip_address"]);
    let inbound = |w: &Ns, fixed: &str| probe(host, EXTERNAL_HOST, w, fixed, &fip_ip);
    let want_in = Some((ip(EXTERNAL_HOST), ip(&fip_ip)));
    until_probe(
        20,
        "the external host reaches w0's floating IP",
        || inbound(&w0, "10.70.1.10"),
        want_in,
    )
    .await;
    until_probe(
        10,
        "w0 goes out as its floating IP",
        snat,
        Some((ip(&fip_ip), ip(EXTERNAL_HOST))),
    )
    .await;
    // The upstream router resolved the floating IP to node0's router: ARP is answered there.
    let neigh = outside.ns.ip(&["neigh", "show", &fip_ip]);
    assert!(neigh.contains("lladdr"), "{neigh}");

    // Disassociated: nothing reaches w0 through it any more; w0 is back to SNAT.
    tb.expect_as(
        &admin,
        Method::PUT,
        &format!("/v2.0/floatingips/{fip_id}"),
        json!({"floatingip": {"port_id": null}}),
        200,
    )
    .await;
    until_probe(
        10,
        "the floating IP stops reaching w0",
        || inbound(&w0, "10.70.1.10"),
        None,
    )
    .await;
    until_probe(10, "w0 is back to SNAT", snat, want_snat).await;

    // Re-associated with w2 on node2: it moves there (announced to the upstream router).
    tb.expect_as(
        &admin,
        Method::PUT,
        &format!("/v2.0/floatingips/{fip_id}"),
        json!({"floatingip": {"port_id": p2}}),
        200,
    )
    .await;
    until_probe(
        10,
        "the floating IP reaches w2 on node2",
        || inbound(&w2, "10.70.1.12"),
        want_in,
    )
    .await;
    assert!(
        inbound(&w0, "10.70.1.10").is_none(),
        "w0 still reached through the moved floating IP"
    );

    // SNAT failover: kill the gateway node's agent and its router namespace; SNAT comes back
    // through the other gateway node within 10 s.
    let gw_port = {
        let (s, b) = tb
            .net(
                Method::GET,
                &format!("/v2.0/ports?device_id={router}&device_owner=network:router_gateway"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{b}");
        b["ports"][0].clone()
    };
    let first = str_of(&gw_port["binding:host_id"]);
    let dead = tb
        .nodes
        .iter()
        .position(|n| n.name == first)
        .expect("gateway bound to a test-bed node");
    assert!(dead == 1 || dead == 2, "SNAT on a node that is no gateway: {first}");
    let gw_port_id = str_of(&gw_port["id"]);
    let mut tb = tb;
    let t0 = Instant::now();
    tb.nodes[dead].kill_agent();
    let prefix = isthmus_agent::l3::netns_prefix(&first);
    for ns in support::must(&["ip", "netns", "list"]).lines() {
        let name = ns.split_whitespace().next().unwrap_or_default();
        if name.starts_with(&prefix) {
            support::must(&["ip", "netns", "delete", name]);
        }
    }
    let w0 = &w0;
    let host = &tb.outside.as_ref().unwrap().host;
    let back = until_probe(
        15,
        "SNAT back through the other gateway node",
        || probe(w0, "10.70.1.10", host, EXTERNAL_HOST, EXTERNAL_HOST),
        want_snat,
    )
    .await;
    let failover = t0.elapsed();
    let moved = tb.port(&gw_port_id).await;
    assert_ne!(str_of(&moved["binding:host_id"]), first, "{moved}");
    println!(
        "SNAT failover: back after {:.1} s (probing {:.1} s)",
        failover.as_secs_f64(),
        back.as_secs_f64()
    );
    assert!(
        failover < Duration::from_secs(10),
        "SNAT took {failover:?} to come back"
    );
}
