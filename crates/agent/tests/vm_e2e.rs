//! VMs and containers on one network: real QEMU guests (TCG) on VM ports of test-bed nodes get
//! their address from their node's agent by DHCP and talk to a container attached through the
//! CNI plugin on another node. Needs root, qemu-system-x86 and busybox-static
//! (`scripts/setup.sh --test`); the guest image comes from `scripts/vm-image.sh`.
//!
//! Also `vm_boot_to_ip` (`#[ignore]`d, `scripts/bench-vm.sh`).

mod support;
mod testbed;
mod vm;

use serde_json::{json, Value};
use std::time::Duration;
use support::{run, Ns};
use testbed::Testbed;
use vm::Vm;

const TEST_TIMEOUT: Duration = Duration::from_secs(240);

async fn network(tb: &Testbed, token: &str, name: &str, cidr: &str, dhcp: bool) -> (String, String) {
    let n = tb.create(token, "networks", "network", json!({"name": name})).await;
    let id = n["id"].as_str().expect("id").to_string();
    let s = tb
        .create(
            token,
            "subnets",
            "subnet",
            json!({"network_id": id, "cidr": cidr, "ip_version": 4, "enable_dhcp": dhcp,
                   "dns_nameservers": ["10.1.1.1"],
                   "host_routes": [{"destination": "172.16.0.0/12", "nexthop": "10.80.0.254"}]}),
        )
        .await;
    (id, s["id"].as_str().expect("id").to_string())
}

fn start_vm(tb: &Testbed, node: usize, port: &Value, mac: Option<&str>, cmd: &str, tries: u32) -> Vm {
    let tap = isthmus_agent::names::tap(port["id"].as_str().expect("id"));
    let mac = mac.unwrap_or_else(|| port["mac_address"].as_str().expect("mac"));
    Vm::start(&tb.nodes[node].ns.name, &tap, mac, cmd, tries)
}

fn ping_from(ns: &Ns, ip: &str) -> bool {
    run(&["ip", "netns", "exec", &ns.name, "ping", "-c", "2", "-W", "2", ip]).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_and_containers_share_a_network() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut tb = Testbed::start(2).await;
        let t = tb.member("mixed").await;
        let (net1, sub1) = network(&tb, &t, "mixed", "10.80.0.0/24", true).await;
        let (net2, sub2) = network(&tb, &t, "other", "10.80.0.0/24", true).await;
        let (net3, sub3) = network(&tb, &t, "static", "10.82.0.0/24", false).await;

        // VM a on node 0 (the container's network), VM b on node 0 on another network with the
        // same CIDR, VM d on a subnet without DHCP, VM e with a MAC that is not its port's.
        let a = tb.vm_port(&net1, &sub1, "10.80.0.10", 0).await;
        let b = tb.vm_port(&net2, &sub2, "10.80.0.11", 0).await;
        let d = tb.vm_port(&net3, &sub3, "10.82.0.10", 1).await;
        let e = tb.vm_port(&net1, &sub1, "10.80.0.12", 1).await;
        // The container on node 1, after the VM ports: its node then fills a pool of ready
        // ports on the network, which must not take the addresses fixed above.
        let c = tokio::task::block_in_place(|| tb.nodes[1].cni_container("mixed", "mixed", "10.80.0.50"));
        let cmd_a = "ping -c 3 -W 3 10.80.0.50 >/dev/null && echo REACH-OK || echo REACH-FAIL; \
                     echo STREAM-START; ping -c 60 -i 0.2 -W 2 10.80.0.50 | grep transmitted; sleep 60";
        let cmd_b = "ping -c 3 -W 2 10.80.0.50 >/dev/null && echo REACH-OK || echo REACH-FAIL; sleep 30";
        let vm_a = start_vm(&tb, 0, &a, None, cmd_a, 20);
        let vm_b = start_vm(&tb, 0, &b, None, cmd_b, 20);
        let vm_d = start_vm(&tb, 1, &d, None, "true", 4);
        let vm_e = start_vm(&tb, 1, &e, Some("02:00:00:80:00:12"), "true", 4);

        // a gets its port's address by DHCP, with the subnet's options, MTU 1450.
        let boot_to_ip = vm_a.wait_for("ISTHMUS-LEASE bound", Duration::from_secs(120)).await;
        vm_a.wait_for("ISTHMUS-STATE-END", Duration::from_secs(30)).await;
        let st = vm_a.state();
        assert!(st.contains("inet 10.80.0.10/24"), "{st}");
        assert!(st.contains("mtu 1450"), "{st}");
        assert!(st.contains("default via 10.80.0.1"), "{st}");
        assert!(st.contains("172.16.0.0/12 via 10.80.0.254"), "{st}");
        assert!(st.contains("nameserver 10.1.1.1"), "{st}");
        println!("VM a: boot to IP {:.1} s", boot_to_ip.as_secs_f64());

        // a and the container on the other node reach each other.
        vm_a.wait_for("REACH-", Duration::from_secs(60)).await;
        assert!(
            vm_a.log().contains("REACH-OK"),
            "VM a cannot ping the container:\n{}",
            vm_a.log()
        );
        assert!(ping_from(&c, "10.80.0.10"), "the container cannot ping VM a");

        // Agent restarts while a pings the container every 200 ms: no reply lost.
        vm_a.wait_for("STREAM-START", Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        for i in [0, 1] {
            tb.nodes[i].kill_agent();
            tokio::time::sleep(Duration::from_millis(300)).await;
            tb.nodes[i].start_agent();
            tb.nodes[i].wait_socket().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        vm_a.wait_for("packets transmitted", Duration::from_secs(60)).await;
        assert!(
            vm_a.log().contains("60 packets transmitted, 60 packets received"),
            "replies lost across agent restarts:\n{}",
            vm_a.log()
        );

        // Security groups apply to the VM's tap: in a group with no ingress rule the guest
        // cannot be pinged; back in the default group (ingress from its members) it can.
        let a_id = a["id"].as_str().expect("id");
        let closed = tb
            .create(&t, "security-groups", "security_group", json!({"name": "closed"}))
            .await;
        let set_groups = |groups: Value| {
            let tb = &tb;
            async move {
                let (s, b) = tb
                    .net(
                        reqwest::Method::PUT,
                        &format!("/v2.0/ports/{a_id}"),
                        Some(json!({"port": {"security_groups": groups}})),
                    )
                    .await;
                assert_eq!(s, 200, "{b}");
            }
        };
        let default_groups = a["security_groups"].clone();
        set_groups(json!([closed["id"]])).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ping_from(&c, "10.80.0.10") {
            assert!(
                std::time::Instant::now() < deadline,
                "the guest stays reachable without an ingress rule"
            );
        }
        set_groups(default_groups).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !ping_from(&c, "10.80.0.10") {
            assert!(
                std::time::Instant::now() < deadline,
                "the guest stays closed in its default group"
            );
        }

        // b has its lease on its own network, and cannot reach the container.
        vm_b.wait_for("REACH-", Duration::from_secs(120)).await;
        assert!(vm_b.state().contains("inet 10.80.0.11/24"), "{}", vm_b.state());
        assert!(
            vm_b.log().contains("REACH-FAIL"),
            "VM b reached another network:\n{}",
            vm_b.log()
        );
        // No DHCP subnet, unknown MAC: no lease.
        vm_d.wait_for("ISTHMUS-DHCP", Duration::from_secs(120)).await;
        assert!(vm_d.log().contains("ISTHMUS-DHCP failed"), "{}", vm_d.log());
        vm_e.wait_for("ISTHMUS-DHCP", Duration::from_secs(120)).await;
        assert!(vm_e.log().contains("ISTHMUS-DHCP failed"), "{}", vm_e.log());
        // Ports report ACTIVE once plumbed, with the tap binding.
        let (_, port) = tb
            .net(
                reqwest::Method::GET,
                &format!("/v2.0/ports/{}", a["id"].as_str().expect("id")),
                None,
            )
            .await;
        assert_eq!(port["port"]["status"], "ACTIVE", "{port}");
        assert_eq!(port["port"]["binding:vif_type"], "tap", "{port}");
    })
    .await
    .expect("test timed out");
}

/// A dual-stack network: an IPv4 subnet with DHCP and a SLAAC IPv6 subnet.
async fn dual_stack(tb: &Testbed, token: &str, name: &str, v4: &str, v6: &str) -> (String, String, String) {
    let n = tb.create(token, "networks", "network", json!({"name": name})).await;
    let net = n["id"].as_str().expect("id").to_string();
    let s4 = tb
        .create(
            token,
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": v4, "ip_version": 4}),
        )
        .await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let s6 = tb
        .create(
            token,
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": v6, "ip_version": 6,
                "ipv6_ra_mode": "slaac", "ipv6_address_mode": "slaac"}),
        )
        .await;
    (net, s4, s6["id"].as_str().expect("id").to_string())
}

fn v6_of(port: &Value) -> String {
    port["fixed_ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["ip_address"].as_str())
        .find(|a| a.contains(':'))
        .expect("an IPv6 address")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_and_a_container_on_two_subnets_reach_each_other_through_the_router() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tb = Testbed::start(2).await;
        let t = tb.member("routed").await;
        let (na, sa4, sa6) = dual_stack(&tb, &t, "vm-side", "10.84.0.0/24", "2001:db8:84::/64").await;
        let (nb, sb4, sb6) = dual_stack(&tb, &t, "ctr-side", "10.85.0.0/24", "2001:db8:85::/64").await;
        tb.router_as(&t, &[&sa4, &sa6, &sb4, &sb6]).await;
        // A VM port as Nova makes it, with an address on each subnet (SLAAC: from its MAC).
        let (_, n) = tb
            .net(reqwest::Method::GET, &format!("/v2.0/networks/{na}"), None)
            .await;
        let body = json!({"port": {"network_id": na, "device_owner": "compute:nova",
            "project_id": n["network"]["project_id"], "binding:host_id": tb.nodes[0].name,
            "fixed_ips": [{"subnet_id": sa4, "ip_address": "10.84.0.10"}, {"subnet_id": sa6}]}});
        let (st, b) = tb.net(reqwest::Method::POST, "/v2.0/ports", Some(body)).await;
        assert_eq!(st, 201, "{b}");
        let vm_port = b["port"].clone();
        let tap = isthmus_agent::names::tap(vm_port["id"].as_str().expect("id"));
        testbed::eventually(15, "the agent makes the VM's tap", || tb.nodes[0].has_link(&tap)).await;
        let vm_v6 = v6_of(&vm_port);
        // The container: its port has an address on each subnet, its IPv6 default route
        // comes from the router's advertisements.
        let fixed = json!({"fixed_ips": [{"subnet_id": sb4, "ip_address": "10.85.0.50"}, {"subnet_id": sb6}]});
        let (ctr_port, c) = tb.workload_as(&t, &nb, &sb4, "10.85.0.50", 1, fixed).await;
        let ctr_v6 = v6_of(&tb.port(&ctr_port).await);
        // The guest takes IPv4 by DHCP (gateway: the router) and IPv6 by SLAAC from the
        // router's advertisements, then pings the container on the other subnet both ways.
        let cmd = format!(
            "ping -c 3 -W 3 10.85.0.50 >/dev/null && echo REACH4-OK || echo REACH4-FAIL; \
             for i in 1 2 3 4 5 6 7 8 9 10; do ip -6 route show default | grep -q fe80 && break; sleep 1; done; \
             for i in 1 2 3 4 5 6 7 8 9 10; do ip -6 addr show dev eth0 | grep -q tentative || break; sleep 1; done; \
             ip -6 addr show dev eth0; ip -6 route show; \
             ping6 -c 3 -W 3 {ctr_v6} >/dev/null && echo REACH6-OK || echo REACH6-FAIL; sleep 20"
        );
        let vm = start_vm(&tb, 0, &vm_port, None, &cmd, 20);
        vm.wait_for("ISTHMUS-LEASE bound", Duration::from_secs(120)).await;
        vm.wait_for("REACH6-", Duration::from_secs(90)).await;
        let log = vm.log();
        assert!(log.contains("default via 10.84.0.1"), "{log}");
        assert!(
            log.contains("REACH4-OK"),
            "the VM cannot reach the container over IPv4:\n{log}"
        );
        assert!(
            log.contains(&vm_v6),
            "the VM has not its port's SLAAC address {vm_v6}:\n{log}"
        );
        assert!(
            log.contains("REACH6-OK"),
            "the VM cannot reach the container over IPv6:\n{log}"
        );
        assert!(
            ping_from(&c, "10.84.0.10"),
            "the container cannot ping the VM over IPv4"
        );
        assert!(
            run(&["ip", "netns", "exec", &c.name, "ping", "-6", "-c", "2", "-W", "2", &vm_v6]).0,
            "the container cannot ping the VM over IPv6"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-vm.sh"]
async fn vm_boot_to_ip() {
    support::require_root();
    let rounds: usize = std::env::var("ISTHMUS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let tb = Testbed::start(1).await;
    let t = tb.member("boot").await;
    let (net, sub) = network(&tb, &t, "boot", "10.80.0.0/24", true).await;
    let mut boots = vec![];
    let mut leases = vec![];
    for i in 0..rounds {
        let p = tb.vm_port(&net, &sub, &format!("10.80.0.{}", 20 + i), 0).await;
        let vm = start_vm(&tb, 0, &p, None, "true", 20);
        let booted = vm.wait_for("ISTHMUS-BOOTED", Duration::from_secs(120)).await;
        let leased = vm.wait_for("ISTHMUS-LEASE bound", Duration::from_secs(60)).await;
        boots.push(booted.as_secs_f64());
        leases.push(leased.as_secs_f64());
        vm.wait_for("ISTHMUS-DONE", Duration::from_secs(30)).await;
    }
    println!();
    println!("VM boot to IP (QEMU -accel tcg, 1 vCPU, 192 MiB; s from spawning QEMU)");
    for (i, (b, l)) in boots.iter().zip(&leases).enumerate() {
        println!(
            "run {}: init started {:.2} s, DHCP lease applied {:.2} s (DHCP part {:.2} s)",
            i + 1,
            b,
            l,
            l - b
        );
    }
}
