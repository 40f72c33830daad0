//! QoS bandwidth limits end to end: the API server, two nodes with real agents, a workload on
//! each, TCP throughput measured with iperf3. Needs root and iperf3.
//!
//! A policy with an egress rule (what the workload sends) on node0's port limits node0 → node1
//! to the rule's rate; an ingress rule (what it receives) limits node1 → node0; the same
//! policy on the network instead of the port limits the port too; taking the policy off lifts
//! both limits, and the agent leaves nothing behind (no IFB device, no token bucket).

mod support;
mod testbed;

use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;
use support::Ns;
use testbed::{eventually, Testbed};

const TEST_TIMEOUT: Duration = Duration::from_secs(240);
/// Seconds measured per run, after one second left out (slow start, the bucket's burst).
const SECS: usize = 3;
const EGRESS_KBPS: u64 = 20_000;
const INGRESS_KBPS: u64 = 30_000;
/// A small bucket, so its burst does not count in a few seconds' average (125 kB).
const BURST_KBIT: u64 = 1_000;

/// TCP throughput (one stream) from `client` to `ip` in `server`, in Mbit/s as received.
fn iperf_mbps(server: &Ns, ip: &str, client: &Ns) -> f64 {
    support::bench::iperf_bps(server, ip, client, ip, SECS, 1) / 1e6
}

/// `tc -j qdisc show dev <dev>` in a node's namespace (empty when the device is absent).
fn qdiscs(node: &Ns, dev: &str) -> Vec<Value> {
    let (_, out, _) = support::run(&[
        "ip", "netns", "exec", &node.name, "tc", "-j", "qdisc", "show", "dev", dev,
    ]);
    serde_json::from_str(&out).unwrap_or_default()
}

/// The root token bucket's rate (bytes/s) on `dev`, if there is one.
fn bucket_rate(node: &Ns, dev: &str) -> Option<u64> {
    qdiscs(node, dev)
        .into_iter()
        .find(|q| q["kind"] == "tbf" && q["root"] == true)
        .and_then(|q| q["options"]["rate"].as_u64())
}

/// Whether `dev`'s incoming traffic is redirected (to its IFB).
fn redirected(node: &Ns, dev: &str) -> bool {
    let (_, out, _) = support::run(&[
        "ip", "netns", "exec", &node.name, "tc", "-j", "filter", "show", "dev", dev, "ingress",
    ]);
    out.contains("\"mirred\"")
}

fn within(measured: f64, limit_mbps: f64, what: &str) {
    let err = (measured - limit_mbps).abs() / limit_mbps;
    println!(
        "QOS_FIGURE {what} {measured:.2} Mbit/s (limit {limit_mbps:.0}, off by {:.1} %)",
        err * 100.0
    );
    assert!(
        err <= 0.10,
        "{what}: {measured:.2} Mbit/s is not within 10 % of {limit_mbps} Mbit/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_limits_hold_in_both_directions_and_lift() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tb = Testbed::start(2).await;
        let token = tb.member("qos-e2e").await;
        let (net, subnet) = tb.network_as(&token, "qos-net", "10.31.0.0/24").await;
        // No firewall in the way: this measures shaping.
        let open = json!({"port_security_enabled": false});
        let (pa, a) = tb.workload_as(&token, &net, &subnet, "10.31.0.10", 0, open.clone()).await;
        let (_pb, b) = tb.workload_as(&token, &net, &subnet, "10.31.0.20", 1, open).await;
        let dev = isthmus_agent::names::tap(&pa);
        let ifb = isthmus_agent::qos::ifb_of(&dev);
        let node0 = &tb.nodes[0].ns;
        eventually(20, "the workloads reach each other", || {
            support::reaches(&a, "10.31.0.10", &b, "10.31.0.20")
        })
        .await;

        let free_out = iperf_mbps(&b, "10.31.0.20", &a);
        let free_in = iperf_mbps(&a, "10.31.0.10", &b);
        println!("QOS_FIGURE unlimited node0->node1 {free_out:.0} Mbit/s, node1->node0 {free_in:.0} Mbit/s");

        // The policy (admin only), an egress rule, attached by the port's owner.
        let project = tb.port(&pa).await["project_id"].clone();
        let (s, p) = tb
            .net(Method::POST, "/v2.0/qos/policies", Some(json!({"policy": {"name": "limited", "project_id": project}})))
            .await;
        assert_eq!(s, 201, "{p}");
        let policy = p["policy"]["id"].as_str().expect("policy id").to_string();
        let rules = format!("/v2.0/qos/policies/{policy}/bandwidth_limit_rules");
        let rule = json!({"bandwidth_limit_rule": {"max_kbps": EGRESS_KBPS, "max_burst_kbps": BURST_KBIT, "direction": "egress"}});
        let (s, r) = tb.net(Method::POST, &rules, Some(rule)).await;
        assert_eq!(s, 201, "{r}");
        tb.expect_as(&token, Method::PUT, &format!("/v2.0/ports/{pa}"), json!({"port": {"qos_policy_id": policy}}), 200)
            .await;
        eventually(15, "the port's traffic goes through its IFB's bucket", || {
            bucket_rate(node0, &ifb) == Some(EGRESS_KBPS * 125) && redirected(node0, &dev)
        })
        .await;
        let out = iperf_mbps(&b, "10.31.0.20", &a);
        within(out, EGRESS_KBPS as f64 / 1000.0, "egress-limited node0->node1");
        let back = iperf_mbps(&a, "10.31.0.10", &b);
        assert!(back > 3.0 * INGRESS_KBPS as f64 / 1000.0, "the other direction is not limited: {back:.1} Mbit/s");

        // An ingress rule on the same policy: traffic to the workload.
        let rule = json!({"bandwidth_limit_rule": {"max_kbps": INGRESS_KBPS, "max_burst_kbps": BURST_KBIT, "direction": "ingress"}});
        let (s, r) = tb.net(Method::POST, &rules, Some(rule)).await;
        assert_eq!(s, 201, "{r}");
        eventually(15, "the port's device gets its bucket", || bucket_rate(node0, &dev) == Some(INGRESS_KBPS * 125)).await;
        let inbound = iperf_mbps(&a, "10.31.0.10", &b);
        within(inbound, INGRESS_KBPS as f64 / 1000.0, "ingress-limited node1->node0");

        // The policy moves from the port to its network: the port keeps both limits.
        tb.expect_as(&token, Method::PUT, &format!("/v2.0/ports/{pa}"), json!({"port": {"qos_policy_id": null}}), 200)
            .await;
        tb.expect_as(&token, Method::PUT, &format!("/v2.0/networks/{net}"), json!({"network": {"qos_policy_id": policy}}), 200)
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        eventually(15, "the network's policy limits the port", || {
            bucket_rate(node0, &dev) == Some(INGRESS_KBPS * 125)
                && bucket_rate(node0, &ifb) == Some(EGRESS_KBPS * 125)
                && redirected(node0, &dev)
        })
        .await;

        // Off: both limits lift, nothing of ours stays.
        tb.expect_as(&token, Method::PUT, &format!("/v2.0/networks/{net}"), json!({"network": {"qos_policy_id": null}}), 200)
            .await;
        eventually(15, "the limits are taken off", || {
            bucket_rate(node0, &dev).is_none() && !tb.nodes[0].has_link(&ifb) && !redirected(node0, &dev)
        })
        .await;
        let out = iperf_mbps(&b, "10.31.0.20", &a);
        let inbound = iperf_mbps(&a, "10.31.0.10", &b);
        println!("QOS_FIGURE lifted node0->node1 {out:.0} Mbit/s, node1->node0 {inbound:.0} Mbit/s");
        assert!(out > 3.0 * EGRESS_KBPS as f64 / 1000.0, "egress still limited: {out:.1} Mbit/s");
        assert!(inbound > 3.0 * INGRESS_KBPS as f64 / 1000.0, "ingress still limited: {inbound:.1} Mbit/s");
        let (s, body) = tb.net(Method::DELETE, &format!("/v2.0/qos/policies/{policy}"), None).await;
        assert_eq!(s, 204, "{body}");
    })
    .await
    .expect("test timed out");
}
