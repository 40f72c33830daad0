//! Distributed routing benchmarks, `#[ignore]`d so that CI does not run them; they print their
//! figures, each also as `L3_FIGURE <key> <value>`. Run them with `scripts/bench-l3.sh` (root;
//! iperf3). See docs/benchmarks.md, "Routers".
//!
//! - `l3_throughput`: TCP throughput (iperf3, 1 stream) between two nodes of the test bed,
//!   routed (a workload on subnet A on node0 to one on subnet B on node1, through the router
//!   on node0) against bridged (the same node0 workload to one on subnet A on node1), in
//!   interleaved rounds; `routed_ratio` = routed / bridged (medians).
//! - `l3_convergence`: N nodes (default 10), a workload on subnet A on every node and one on
//!   subnet B on node0. Per round, the router's interface on B is added; from the API's
//!   answer, every node's workload probes B's workload (a UDP datagram every 2 ms) until an
//!   echo comes back. Latency per node and round; p50/p99 over all. Then the interface is
//!   removed and the next round waits until no node reaches B.
//!
//! - `l3_fip_throughput`: TCP throughput (iperf3, 1 stream) from the external host (outside
//!   namespace) to a workload on node0 through its floating IP (DNAT in node0's router
//!   namespace) against routed east-west (a workload on subnet B on node1 to the same
//!   workload), interleaved; `fip_ratio` = floating IP / routed (medians).
//!
//! Knobs: `ISTHMUS_BENCH_NODES` (10), `ISTHMUS_BENCH_ROUNDS` (3 throughput rounds; 10
//! convergence rounds), `ISTHMUS_BENCH_IPERF_SECS` (3), `ISTHMUS_BENCH_HOLD` (seconds to pause
//! before measuring, for profiling by hand).

mod support;
mod testbed;

use reqwest::Method;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::bench::{env_usize, iperf, iperf_to, median, percentile};
use support::{reaches, udp_in, until, Ns};
use testbed::{Opts, Testbed};

fn figure(key: &str, value: f64) {
    println!("L3_FIGURE {key} {value:.3}");
}

/// `ISTHMUS_BENCH_HOLD=<secs>`: pause once the paths are up, so that the test bed can be
/// inspected or profiled by hand before the measurement.
fn hold() {
    let secs = env_usize("ISTHMUS_BENCH_HOLD", 0);
    if secs > 0 {
        println!("holding {secs} s (ISTHMUS_BENCH_HOLD)");
        std::thread::sleep(Duration::from_secs(secs as u64));
    }
}

/// A workload in no security group (the benchmark measures routing, not the firewall).
async fn workload(tb: &Testbed, net: &str, subnet: &str, ip: &str, node: usize) -> Ns {
    let open = json!({"port_security_enabled": false, "security_groups": []});
    tb.workload_as(&tb.admin_token, net, subnet, ip, node, open).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-l3.sh"]
async fn l3_throughput() {
    support::require_root();
    let rounds = env_usize("ISTHMUS_BENCH_ROUNDS", 3);
    let secs = env_usize("ISTHMUS_BENCH_IPERF_SECS", 3);
    let tb = Testbed::start(2).await;
    let (na, sa) = tb.network_as(&tb.admin_token, "bench-a", "10.50.1.0/24").await;
    let (nb, sb) = tb.network_as(&tb.admin_token, "bench-b", "10.50.2.0/24").await;
    let src = workload(&tb, &na, &sa, "10.50.1.10", 0).await;
    let bridged = workload(&tb, &na, &sa, "10.50.1.20", 1).await;
    let routed = workload(&tb, &nb, &sb, "10.50.2.20", 1).await;
    let router = tb.router_as(&tb.admin_token, &[]).await;
    tb.interface_as(&tb.admin_token, &router, &sa, true).await;
    tb.interface_as(&tb.admin_token, &router, &sb, true).await;
    until(20, "routed path up", true, || {
        reaches(&src, "10.50.1.10", &routed, "10.50.2.20")
    })
    .await;
    until(20, "bridged path up", true, || {
        reaches(&src, "10.50.1.10", &bridged, "10.50.1.20")
    })
    .await;
    hold();

    let (mut r, mut b) = (vec![], vec![]);
    for round in 0..rounds {
        for routed_first in [round % 2 == 0, round % 2 == 1] {
            let gbps = if routed_first {
                iperf(&routed, "10.50.2.20", &src, secs)
            } else {
                iperf(&bridged, "10.50.1.20", &src, secs)
            };
            println!(
                "round {round}: {} {gbps:.2} Gbit/s",
                if routed_first { "routed" } else { "bridged" }
            );
            if routed_first {
                r.push(gbps);
            } else {
                b.push(gbps);
            }
        }
    }
    let (mr, mb) = (median(&r), median(&b));
    println!(
        "TCP throughput node0 -> node1, iperf3 -t {secs}, 1 stream, median of {rounds} interleaved rounds: \
         routed {mr:.2} Gbit/s, bridged {mb:.2} Gbit/s, ratio {:.3}",
        mr / mb
    );
    figure("routed_gbps", mr);
    figure("bridged_gbps", mb);
    figure("routed_ratio", mr / mb);
}

/// Probes `to` from `from` in `src` (a datagram every 2 ms, an echo server in `dst`) until an
/// echo comes back or `give_up` passes; the time from `t0` to the first echo.
fn first_echo(src: &Ns, from: &str, dst: &Ns, to: &str, t0: Instant, give_up: Duration) -> Option<Duration> {
    let server = udp_in(dst, SocketAddr::new(to.parse().unwrap(), 0));
    let server_addr = server.local_addr().unwrap();
    server.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let client = udp_in(src, SocketAddr::new(from.parse().unwrap(), 0));
    client.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !s2.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], peer);
            }
        }
    });
    let mut buf = [0u8; 64];
    let mut got = None;
    while t0.elapsed() < give_up {
        let _ = client.send_to(b"probe", server_addr);
        if client.recv(&mut buf).is_ok() {
            got = Some(t0.elapsed());
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-l3.sh"]
async fn l3_convergence() {
    support::require_root();
    let n = env_usize("ISTHMUS_BENCH_NODES", 10).max(2);
    let rounds = env_usize("ISTHMUS_BENCH_ROUNDS", 3) * 10 / 3;
    // The agents' default full-sync period (30 s), not the test bed's 3 s: ten agents
    // re-reading everything every 3 s on two cores would be measured, not the change.
    let tb = Testbed::start_opts(n, false, 30).await;
    let (na, sa) = tb.network_as(&tb.admin_token, "conv-a", "10.60.0.0/16").await;
    let (nb, sb) = tb.network_as(&tb.admin_token, "conv-b", "10.61.0.0/24").await;
    let mut sources = vec![];
    for i in 0..n {
        let ip = format!("10.60.0.{}", 10 + i);
        sources.push((workload(&tb, &na, &sa, &ip, i).await, ip));
    }
    let target = workload(&tb, &nb, &sb, "10.61.0.10", 0).await;
    let router = tb.router_as(&tb.admin_token, &[]).await;
    tb.interface_as(&tb.admin_token, &router, &sa, true).await;
    // Every node runs the router before the first round: a round measures an interface added
    // to a router the nodes already route for, not the router's creation on every node.
    for (src, _) in &sources {
        until(30, "every node answers for subnet A's gateway", true, || {
            support::run(&["ip", "netns", "exec", &src.name, "ping", "-c1", "-W1", "10.60.0.1"]).0
        })
        .await;
    }
    let sources = Arc::new(sources);
    let target = Arc::new(target);

    let mut all = vec![];
    for round in 0..rounds {
        let asked = std::time::SystemTime::now();
        tb.interface_as(&tb.admin_token, &router, &sb, true).await;
        let t0 = Instant::now();
        // Wall-clock times, to line the rounds up with the agents' and the server's logs.
        println!(
            "round {round}: asked at {:?}, answered after {:.1} ms",
            asked.duration_since(std::time::UNIX_EPOCH).unwrap_or_default(),
            asked.elapsed().unwrap_or_default().as_secs_f64() * 1000.0
        );
        let mut probes = vec![];
        for i in 0..n {
            let (s, t) = (sources.clone(), target.clone());
            probes.push(std::thread::spawn(move || {
                first_echo(&s[i].0, &s[i].1, &t, "10.61.0.10", t0, Duration::from_secs(10))
            }));
        }
        let lat: Vec<f64> = probes
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let d = p
                    .join()
                    .expect("probe")
                    .unwrap_or_else(|| panic!("round {round}: node{i} never reached B"));
                d.as_secs_f64() * 1000.0
            })
            .collect();
        let worst = lat.iter().cloned().fold(0.0, f64::max);
        println!(
            "round {round}: slowest node {worst:.1} ms (all: {:?})",
            lat.iter().map(|x| x.round()).collect::<Vec<_>>()
        );
        all.extend(lat);
        tb.interface_as(&tb.admin_token, &router, &sb, false).await;
        for (src, ip) in sources.iter() {
            until(20, "B unreachable again", false, || {
                reaches(src, ip, &target, "10.61.0.10")
            })
            .await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (p50, p99) = (percentile(&all, 50.0), percentile(&all, 99.0));
    println!(
        "{n} nodes, {rounds} rounds: from the answer to add_router_interface until each node's workload \
         reaches the new subnet: p50 {p50:.1} ms p99 {p99:.1} ms max {:.1} ms",
        percentile(&all, 100.0)
    );
    figure("converge_p50_ms", p50);
    figure("converge_p99_ms", p99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-l3.sh"]
async fn l3_fip_throughput() {
    support::require_root();
    let rounds = env_usize("ISTHMUS_BENCH_ROUNDS", 3);
    let secs = env_usize("ISTHMUS_BENCH_IPERF_SECS", 3);
    let tb = Testbed::start_full(
        2,
        Opts {
            outside: Some(vec![1]),
            ..Default::default()
        },
    )
    .await;
    let admin = tb.admin_token.clone();
    let ext_id = tb.external_network(json!({})).await;
    let (na, sa) = tb.network_as(&admin, "bench-a", "10.50.1.0/24").await;
    let (nb, sb) = tb.network_as(&admin, "bench-b", "10.50.2.0/24").await;
    let open = json!({"port_security_enabled": false, "security_groups": []});
    let (port, dst) = tb.workload_as(&admin, &na, &sa, "10.50.1.10", 0, open).await;
    let routed_src = workload(&tb, &nb, &sb, "10.50.2.20", 1).await;
    let router = tb.router_as(&admin, &[&sa, &sb]).await;
    tb.expect_as(
        &admin,
        Method::PUT,
        &format!("/v2.0/routers/{router}"),
        json!({"router": {"external_gateway_info": {"network_id": ext_id}}}),
        200,
    )
    .await;
    let fip = tb
        .create(
            &admin,
            "floatingips",
            "floatingip",
            json!({"floating_network_id": ext_id, "port_id": port}),
        )
        .await;
    let fip_ip = fip["floating_ip_address"].as_str().unwrap().to_string();
    let host = &tb.outside.as_ref().unwrap().host;
    until(20, "routed path up", true, || {
        reaches(&routed_src, "10.50.2.20", &dst, "10.50.1.10")
    })
    .await;
    // Warm-up (iperf_to retries while the floating IP is being set up).
    iperf_to(&dst, "10.50.1.10", host, &fip_ip, 1);
    let (mut f, mut r) = (vec![], vec![]);
    for round in 0..rounds {
        for fip_first in [round % 2 == 0, round % 2 == 1] {
            let gbps = if fip_first {
                iperf_to(&dst, "10.50.1.10", host, &fip_ip, secs)
            } else {
                iperf(&dst, "10.50.1.10", &routed_src, secs)
            };
            println!(
                "round {round}: {} {gbps:.2} Gbit/s",
                if fip_first { "floating IP" } else { "routed" }
            );
            if fip_first {
                f.push(gbps);
            } else {
                r.push(gbps);
            }
        }
    }
    let (mf, mr) = (median(&f), median(&r));
    println!(
        "TCP throughput into a workload on node0, iperf3 -t {secs}, 1 stream, median of {rounds} interleaved rounds: \
         from the external host through its floating IP {mf:.2} Gbit/s, routed from node1 {mr:.2} Gbit/s, ratio {:.3}",
        mf / mr
    );
    figure("fip_gbps", mf);
    figure("fip_routed_gbps", mr);
    figure("fip_ratio", mf / mr);
}
