//! Security group benchmarks, `#[ignore]`d so that CI does not run them; they print their
//! figures, each also as a machine-readable line `SG_FIGURE <key> <value>`. Run them with
//! `scripts/bench-sg.sh` (root; iperf3 installed). See docs/benchmarks.md.
//!
//! - `sg_throughput`: TCP throughput (iperf3, 1 stream, 3 s) between two workloads on one
//!   network on two nodes of the test bed, (a) with both ports in one stateful group of 100
//!   rules (97 TCP/UDP rules on other ports with remote prefixes, the rule for iperf's port
//!   5201, Neutron's two egress defaults) and (b) with port security off and no group. The same
//!   two ports are switched between the modes with `PUT /v2.0/ports/{id}`, each switch waited
//!   for with packets; interleaved rounds, medians; `throughput_ratio` = (a) / (b).
//! - `sg_propagation`: N nodes (default 10), one port per node in a stateful group G whose
//!   rules include one with a remote group R. The time from the answer to `POST
//!   /v2.0/security-group-rules` (a new rule in G), and to `POST /v2.0/ports` (a new unbound
//!   port in R), until every node's agent has changed its firewall for it, read from the
//!   agents' logs (the first `firewall patched` / `firewall replaced whole` line of the
//!   firewall controller with `reason="view changed"` after the answer; its timestamp, same
//!   clock). Before timing, a rule and a membership change are checked with real packets.
//!
//! Knobs: `ISTHMUS_BENCH_NODES` (propagation nodes, default 10), `ISTHMUS_BENCH_ROUNDS`
//! (throughput rounds, default 3; propagation rounds are ten times as many),
//! `ISTHMUS_BENCH_IPERF_SECS` (seconds per iperf3 run, default 3).

mod support;
mod testbed;

use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::bench::{env_usize, iperf, median, percentile};
use support::{tcp_ok, until};
use testbed::{eventually, Testbed};

fn figure(key: &str, value: f64) {
    println!("SG_FIGURE {key} {value:.3}");
}

async fn group(tb: &Testbed, name: &str) -> String {
    let g = tb
        .expect_as(
            &tb.admin_token,
            Method::POST,
            "/v2.0/security-groups",
            json!({"security_group": {"name": name, "stateful": true}}),
            201,
        )
        .await;
    g["security_group"]["id"].as_str().unwrap().to_string()
}

async fn rule(tb: &Testbed, attrs: Value) -> String {
    let r = tb
        .expect_as(
            &tb.admin_token,
            Method::POST,
            "/v2.0/security-group-rules",
            json!({ "security_group_rule": attrs }),
            201,
        )
        .await;
    r["security_group_rule"]["id"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------------
// Throughput
// ---------------------------------------------------------------------------------------------

/// Seconds per iperf3 run (`ISTHMUS_BENCH_IPERF_SECS`, default 3; longer runs help profiling).
fn iperf_secs() -> usize {
    env_usize("ISTHMUS_BENCH_IPERF_SECS", 3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-sg.sh"]
async fn sg_throughput() {
    support::require_root();
    let rounds = env_usize("ISTHMUS_BENCH_ROUNDS", 3);
    let tb = Testbed::start(2).await;
    let (net, subnet) = tb.network_as(&tb.admin_token, "sg-bench", "10.30.0.0/24").await;
    let g = group(&tb, "hundred").await;
    // New groups come with Neutron's two egress rules: 97 + 1 + 2 = 100.
    for r in 0..97u16 {
        let proto = if r % 2 == 0 { "tcp" } else { "udp" };
        let port = 6000 + r;
        rule(
            &tb,
            json!({"security_group_id": g, "direction": "ingress", "ethertype": "IPv4", "protocol": proto,
                "port_range_min": port, "port_range_max": port,
                "remote_ip_prefix": format!("172.{}.{}.0/24", 16 + r % 16, r)}),
        )
        .await;
    }
    rule(
        &tb,
        json!({"security_group_id": g, "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
            "port_range_min": 5201, "port_range_max": 5201}),
    )
    .await;
    let (s, b) = tb
        .net(
            Method::GET,
            &format!("/v2.0/security-group-rules?security_group_id={g}"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let nrules = b["security_group_rules"].as_array().map_or(0, |a| a.len());
    assert_eq!(nrules, 100, "rules in the group");

    let ips = ["10.30.0.10", "10.30.0.20"];
    let sg = json!({"security_groups": [g]});
    let (p0, a) = tb
        .workload_as(&tb.admin_token, &net, &subnet, ips[0], 0, sg.clone())
        .await;
    let (p1, b) = tb.workload_as(&tb.admin_token, &net, &subnet, ips[1], 1, sg).await;
    let ports = [p0, p1];

    // Both modes are checked with packets both ways: with the group, 5201 passes and 4444
    // does not; with port security off, 4444 passes too.
    let set_mode = |filtered: bool| {
        let body = if filtered {
            json!({"port": {"port_security_enabled": true, "security_groups": [g]}})
        } else {
            json!({"port": {"port_security_enabled": false, "security_groups": []}})
        };
        let tb = &tb;
        let ports = &ports;
        async move {
            for p in ports {
                tb.expect_as(
                    &tb.admin_token,
                    Method::PUT,
                    &format!("/v2.0/ports/{p}"),
                    body.clone(),
                    200,
                )
                .await;
            }
        }
    };
    let (a, b) = (&a, &b);
    let wait_mode = |filtered: bool| async move {
        let what = if filtered {
            "the group is enforced"
        } else {
            "port security is off"
        };
        until(20, what, !filtered, || {
            tcp_ok(a, ips[0], b, ips[1], 4444) && tcp_ok(b, ips[1], a, ips[0], 4444)
        })
        .await;
        assert!(tcp_ok(a, ips[0], b, ips[1], 5201), "{what}: 5201 must pass");
        if filtered {
            assert!(!tcp_ok(b, ips[1], a, ips[0], 4444), "{what}: 4444 must not pass");
        }
    };
    wait_mode(true).await;

    let (mut with_sg, mut off) = (vec![], vec![]);
    for round in 0..rounds {
        // Alternate which mode goes first.
        for filtered in [round % 2 == 0, round % 2 == 1] {
            set_mode(filtered).await;
            wait_mode(filtered).await;
            let started = now_secs();
            let gbps = iperf(b, ips[1], a, iperf_secs());
            println!(
                "round {round} ({started:.1}..{:.1} s since the epoch): {} {gbps:.2} Gbit/s",
                now_secs(),
                if filtered {
                    "group of 100 rules"
                } else {
                    "port security off"
                }
            );
            if filtered {
                with_sg.push(gbps);
            } else {
                off.push(gbps);
            }
        }
    }
    let (m_sg, m_off) = (median(&with_sg), median(&off));
    println!(
        "TCP throughput, iperf3 -t {}, 1 stream, median of {rounds} interleaved rounds: \
         group of 100 rules {m_sg:.2} Gbit/s, port security off {m_off:.2} Gbit/s, ratio {:.3}",
        iperf_secs(),
        m_sg / m_off
    );
    figure("throughput_sg_gbps", m_sg);
    figure("throughput_off_gbps", m_off);
    figure("throughput_ratio", m_sg / m_off);
}

// ---------------------------------------------------------------------------------------------
// Propagation
// ---------------------------------------------------------------------------------------------

/// Seconds since the epoch of an RFC 3339 UTC timestamp as the agent logs it
/// (`2026-11-30T20:07:07.778366Z`).
fn parse_ts(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

fn log_len(node: &testbed::Node) -> u64 {
    std::fs::metadata(&node.log).map_or(0, |m| m.len())
}

/// One firewall change the agent logged: a patch or a whole replacement, whatever the pass's
/// reason.
struct FirewallChange {
    at: f64,
    objects: u64,
    took_ms: f64,
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(name))
}

/// The firewall changes in `node`'s log, from byte `from` on (up to `to` if given).
fn firewall_changes(node: &testbed::Node, from: u64, to: Option<u64>) -> Vec<FirewallChange> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(&node.log) else {
        return vec![];
    };
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_err() || f.read_to_end(&mut buf).is_err() {
        return vec![];
    }
    if let Some(to) = to {
        buf.truncate(to.saturating_sub(from) as usize);
    }
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .filter(|l| {
            l.contains("controller=\"firewall\"")
                && (l.contains("firewall patched") || l.contains("firewall replaced whole"))
        })
        .filter_map(|l| {
            Some(FirewallChange {
                at: parse_ts(l.split_whitespace().next()?)?,
                objects: field(l, "objects=")?.parse().ok()?,
                took_ms: field(l, "took_ms=")?.parse().ok()?,
            })
        })
        .collect()
}

/// Runs `change` (an API call that answers when the change is stored), then waits until
/// every node has logged its firewall change: (the latest node's delay after the answer, the
/// slowest node's nft transaction), ms.
///
/// A node's change is the first firewall change logged after the call whose object count
/// differs from the last one logged before it. Not only `reason="view changed"`: a view change
/// that lands while a periodic pass starts is applied by that pass (`reason="resync"`); and
/// not every line: drift repair replaces the tables whole, unchanged, every few seconds.
async fn propagation<F, Fut>(tb: &Testbed, change: F) -> (f64, f64)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let from: Vec<u64> = tb.nodes.iter().map(log_len).collect();
    let before: Vec<Option<u64>> = tb
        .nodes
        .iter()
        .zip(&from)
        .map(|(n, to)| firewall_changes(n, 0, Some(*to)).last().map(|c| c.objects))
        .collect();
    change().await;
    let t0 = now_secs();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen: Vec<Option<(f64, f64)>> = vec![None; tb.nodes.len()];
    loop {
        for (i, node) in tb.nodes.iter().enumerate() {
            if seen[i].is_none() {
                seen[i] = firewall_changes(node, from[i], None)
                    .into_iter()
                    .find(|c| Some(c.objects) != before[i])
                    .map(|c| (c.at, c.took_ms));
            }
        }
        if seen.iter().all(Option::is_some) {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<&str> = tb
                .nodes
                .iter()
                .zip(&seen)
                .filter(|(_, s)| s.is_none())
                .map(|(n, _)| n.name.as_str())
                .collect();
            panic!("no firewall change logged within 15 s by {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen: Vec<(f64, f64)> = seen.into_iter().flatten().collect();
    let latest = seen.iter().map(|s| s.0).fold(f64::NEG_INFINITY, f64::max);
    let nft = seen.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
    ((latest - t0) * 1000.0, nft)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-sg.sh"]
async fn sg_propagation() {
    support::require_root();
    let nodes = env_usize("ISTHMUS_BENCH_NODES", 10).max(2);
    let rounds = env_usize("ISTHMUS_BENCH_ROUNDS", 3) * 10;
    let tb = Testbed::start(nodes).await;
    let (net, subnet) = tb.network_as(&tb.admin_token, "sg-prop", "10.40.0.0/16").await;
    let g = group(&tb, "g").await;
    let r = group(&tb, "r").await;
    // G: TCP 7000 from members of R (and the egress defaults).
    rule(
        &tb,
        json!({"security_group_id": g, "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
            "port_range_min": 7000, "port_range_max": 7000, "remote_group_id": r}),
    )
    .await;
    // Workloads on node0 and node1 (for the packet checks), a VM port (a tap) on every other.
    let (srv_ip, cli_ip) = ("10.40.0.10", "10.40.0.20");
    let (_s, srv) = tb
        .workload_as(
            &tb.admin_token,
            &net,
            &subnet,
            srv_ip,
            0,
            json!({"security_groups": [g]}),
        )
        .await;
    let (cli_port, cli) = tb
        .workload_as(
            &tb.admin_token,
            &net,
            &subnet,
            cli_ip,
            1,
            json!({"security_groups": [g]}),
        )
        .await;
    for i in 2..nodes {
        let body = json!({"port": {"network_id": net, "device_owner": "compute:nova", "security_groups": [g],
            "binding:host_id": tb.nodes[i].name,
            "fixed_ips": [{"subnet_id": subnet, "ip_address": format!("10.40.1.{i}")}]}});
        let p = tb
            .expect_as(&tb.admin_token, Method::POST, "/v2.0/ports", body, 201)
            .await;
        let tap = isthmus_agent::names::tap(p["port"]["id"].as_str().unwrap());
        let n = &tb.nodes[i];
        eventually(20, "the agent makes the VM's tap", || n.has_link(&tap)).await;
    }
    until(
        20,
        "the client reaches the server's 7000 only as a member of R",
        false,
        || tcp_ok(&cli, cli_ip, &srv, srv_ip, 7000),
    )
    .await;

    // Sanity, with packets: a new rule opens its port; a new member of R gets in.
    assert!(!tcp_ok(&cli, cli_ip, &srv, srv_ip, 7100), "7100 open before its rule");
    let (ms, _) = propagation(&tb, || async {
        rule(
            &tb,
            json!({"security_group_id": g, "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp",
                "port_range_min": 7100, "port_range_max": 7100}),
        )
        .await;
    })
    .await;
    assert!(
        tcp_ok(&cli, cli_ip, &srv, srv_ip, 7100),
        "7100 closed after its rule was logged as applied"
    );
    println!("sanity: a rule for TCP 7100 applied on all nodes after {ms:.1} ms; packets pass");
    let (ms, _) = propagation(&tb, || async {
        tb.expect_as(
            &tb.admin_token,
            Method::PUT,
            &format!("/v2.0/ports/{cli_port}"),
            json!({"port": {"security_groups": [g, r]}}),
            200,
        )
        .await;
    })
    .await;
    assert!(
        tcp_ok(&cli, cli_ip, &srv, srv_ip, 7000),
        "a new member of R was refused on 7000"
    );
    println!("sanity: the client joined R on all nodes after {ms:.1} ms; packets pass");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (mut rule_ms, mut member_ms, mut rule_nft, mut member_nft) = (vec![], vec![], vec![], vec![]);
    for k in 0..rounds {
        let port = 20_000 + k as u16;
        let (ms, nft) = propagation(&tb, || async {
            rule(
                &tb,
                json!({"security_group_id": g, "direction": "ingress", "ethertype": "IPv4", "protocol": "udp",
                    "port_range_min": port, "port_range_max": port, "remote_ip_prefix": "192.0.2.0/24"}),
            )
            .await;
        })
        .await;
        rule_ms.push(ms);
        rule_nft.push(nft);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (ms, nft) = propagation(&tb, || async {
            tb.expect_as(
                &tb.admin_token,
                Method::POST,
                "/v2.0/ports",
                json!({"port": {"network_id": net, "security_groups": [r]}}),
                201,
            )
            .await;
        })
        .await;
        member_ms.push(ms);
        member_nft.push(nft);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    println!(
        "{nodes} nodes, {rounds} rounds, from the API's answer until every node's firewall has the change: \
         new rule p50 {:.1} ms p99 {:.1} ms max {:.1} ms; new member of the remote group p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
        percentile(&rule_ms, 50.0),
        percentile(&rule_ms, 99.0),
        percentile(&rule_ms, 100.0),
        percentile(&member_ms, 50.0),
        percentile(&member_ms, 99.0),
        percentile(&member_ms, 100.0),
    );
    println!(
        "the nft transaction alone (agent's took_ms, slowest node; it may start before the API's answer \
         arrives): new rule p50 {:.0} ms p99 {:.0} ms; new member p50 {:.0} ms p99 {:.0} ms",
        percentile(&rule_nft, 50.0),
        percentile(&rule_nft, 99.0),
        percentile(&member_nft, 50.0),
        percentile(&member_nft, 99.0),
    );
    figure("nodes", nodes as f64);
    figure("rule_p50_ms", percentile(&rule_ms, 50.0));
    figure("rule_p99_ms", percentile(&rule_ms, 99.0));
    figure("member_p50_ms", percentile(&member_ms, 50.0));
    figure("member_p99_ms", percentile(&member_ms, 99.0));
}
