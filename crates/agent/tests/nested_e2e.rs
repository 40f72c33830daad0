//! Containers nested in a VM, end to end: a QEMU guest (TCG) whose port is a trunk's parent
//! runs three containers (network namespaces in the guest) attached by `isthmus-cni` in its
//! nested modes, with a credential scoped to its trunk: two on subports of two other networks
//! (`nested-vlan`) and one on the VM's own network (`nested-macvlan`). On the other node sit a
//! bare-metal container on each network and a second VM that reaches the two subport networks
//! through its own trunk. Each nested container reaches its network's container and VM and
//! nothing else; the VM's own untagged traffic keeps working; removing one subport through the
//! API cuts that container only. Needs root, qemu-system-x86, busybox-static and a release
//! `isthmus-cni` (the guest image carries it), like `vm_e2e.rs`.
//!
//! Also `nested_bench` (`#[ignore]`d, `scripts/bench-nested.sh`).

mod support;
mod testbed;
mod vm;

use reqwest::Method;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::Ns;
use testbed::Testbed;
use vm::{Forwarder, Options, Vm};

const TEST_TIMEOUT: Duration = Duration::from_secs(420);

struct Bed {
    tb: Testbed,
    project: String,
    token: String,
    /// Networks: the VMs' own (p) and the two subport networks (a, b).
    nets: [(String, String); 3],
}

/// A network with one /24 subnet whose automatic addresses start at .100: the test's fixed
/// addresses (.10, .50, .60) are never taken first by a CNI pool refill racing the test.
async fn network(tb: &Testbed, t: &str, name: &str, cidr: &str) -> (String, String) {
    let base = cidr.strip_suffix("0/24").expect("a /24 ending in .0");
    let pool = json!([{"start": format!("{base}100"), "end": format!("{base}250")}]);
    tb.network_with(t, name, cidr, json!({ "allocation_pools": pool }))
        .await
}

async fn bed(project: &str) -> Bed {
    let tb = Testbed::start(2).await;
    let token = tb.member(project).await;
    let p = network(&tb, &token, "vmnet", "10.90.0.0/24").await;
    let a = network(&tb, &token, "net-a", "10.91.0.0/24").await;
    let b = network(&tb, &token, "net-b", "10.92.0.0/24").await;
    Bed {
        tb,
        project: project.to_string(),
        token,
        nets: [p, a, b],
    }
}

/// A trunk on `parent` with a credential for it: (trunk id, `<id>.<secret>`).
async fn trunk_with_credential(b: &Bed, parent: &Value, sub_ports: Value) -> (String, String) {
    let trunk =
        b.tb.create(
            &b.token,
            "trunks",
            "trunk",
            json!({"port_id": parent["id"], "sub_ports": sub_ports}),
        )
        .await;
    let id = trunk["id"].as_str().expect("id").to_string();
    let secret = b.tb.trunk_credential(&b.token, &id).await;
    (id, secret)
}

/// The second VM's subport on `net` with `ip`: its port.
async fn subport(b: &Bed, net: usize, ip: &str) -> Value {
    b.tb.create(
        &b.token,
        "ports",
        "port",
        json!({"network_id": b.nets[net].0, "fixed_ips": [{"subnet_id": b.nets[net].1, "ip_address": ip}]}),
    )
    .await
}

/// The guest's shell functions: `cni CMD MODE NETWORK ID PID` runs the nested plugin for
/// container ID (namespace of PID), its result in /tmp/out.ID; `pg ID ADDR` pings ADDR from
/// container ID (`R` reached, `N` not).
fn guest_prelude(secret: &str, api_port: u16) -> String {
    format!(
        "mkdir -p /etc/isthmus;echo {secret}>/etc/isthmus/c;chmod 600 /etc/isthmus/c\n\
         cni(){{ echo \"{{\\\"cniVersion\\\":\\\"1.0.0\\\",\\\"name\\\":\\\"n\\\",\\\"type\\\":\\\"isthmus-cni\\\",\\\"mode\\\":\\\"nested-$2\\\",\
\\\"nested\\\":{{\\\"api_url\\\":\\\"http://10.0.2.2:{api_port}\\\",\\\"credential_file\\\":\\\"/etc/isthmus/c\\\",\\\"network_id\\\":\\\"$3\\\",\
\\\"parent_interface\\\":\\\"eth0\\\"}}}}\"|CNI_COMMAND=$1 CNI_CONTAINERID=$4 CNI_NETNS=/proc/$5/ns/net CNI_IFNAME=eth0 isthmus-cni>/tmp/out.$4;\
         echo \"CNI $1 $4 rc=$?\"; }}\n\
         pg(){{ eval pid=\\$$1;if nsenter -n -t $pid ping -c 2 -W 2 $2 >/dev/null 2>&1;then echo \"R $1 $2\";else echo \"N $1 $2\";fi; }}\n\
         unshare -n sleep 9999 & c1=$!\nunshare -n sleep 9999 & c2=$!\nunshare -n sleep 9999 & c3=$!\nsleep 1\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_containers_reach_their_networks_only() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let b = bed("nested-e2e").await;
        let tb = &b.tb;
        let [(pnet, psub), (anet, _), (bnet, _)] = b.nets.clone();

        // The second VM, on node 1: its own trunk with subports on a and b.
        let vm2 = tb.vm_port(&pnet, &psub, "10.90.0.60", 1).await;
        let s2a = subport(&b, 1, "10.91.0.60").await;
        let s2b = subport(&b, 2, "10.92.0.60").await;
        trunk_with_credential(
            &b,
            &vm2,
            json!([{"port_id": s2a["id"], "segmentation_type": "vlan", "segmentation_id": 10},
                   {"port_id": s2b["id"], "segmentation_type": "vlan", "segmentation_id": 20}]),
        )
        .await;
        let cmd2 = format!(
            "for v in 'a 10 {} 10.91.0.60' 'b 20 {} 10.92.0.60';do set -- $v;\
             ip link add link eth0 name $1 type vlan id $2;ip link set $1 address $3;\
             ip addr add $4/24 dev $1;ip link set $1 up;done;echo VM2-READY;sleep 900",
            s2a["mac_address"].as_str().expect("mac"),
            s2b["mac_address"].as_str().expect("mac"),
        );
        let vm2 = Vm::start(
            &tb.nodes[1].ns.name,
            &isthmus_agent::names::tap(vm2["id"].as_str().expect("id")),
            vm2["mac_address"].as_str().expect("mac"),
            &cmd2,
            20,
        );

        // Bare-metal containers on node 1, one per network.
        let peers: Vec<Ns> = tokio::task::block_in_place(|| {
            [("vmnet", "10.90.0.50"), ("net-a", "10.91.0.50"), ("net-b", "10.92.0.50")]
                .into_iter()
                .map(|(n, ip)| tb.nodes[1].cni_container(&b.project, n, ip))
                .collect()
        });

        // The VM with the nested containers, on node 0.
        let vm1 = tb.vm_port(&pnet, &psub, "10.90.0.10", 0).await;
        let (trunk1, secret) = trunk_with_credential(&b, &vm1, json!([])).await;
        let server = tb.network_url.trim_start_matches("http://").parse().expect("server address");
        let fwd = Forwarder::start(&tb.nodes[0].ns.path(), server);
        let cmd1 = format!(
            "{}cni ADD vlan {anet} c1 $c1\ncni ADD vlan {bnet} c2 $c2\ncni ADD macvlan {pnet} c3 $c3\n\
             for t in 'c1 10.91.0.50' 'c1 10.91.0.60' 'c1 10.92.0.50' 'c1 10.90.0.50' 'c2 10.92.0.50' 'c2 10.92.0.60' \
             'c2 10.91.0.50' 'c3 10.90.0.50' 'c3 10.90.0.60' 'c3 10.91.0.50';do pg $t;done\n\
             vm=1;pg vm 10.90.0.50\necho PHASE1-DONE\n\
             i=0;while [ $i -lt 30 ]&&nsenter -n -t $c2 ping -c 1 -W 1 10.92.0.50 >/dev/null 2>&1;do i=$((i+1));sleep 1;done\n\
             echo CUT-AFTER $i\npg c2 10.92.0.50;pg c1 10.91.0.50;pg c3 10.90.0.50\n\
             cni DEL vlan {anet} c1 $c1\ncni DEL vlan {bnet} c2 $c2\ncni DEL macvlan {pnet} c3 $c3\n\
             for c in c1 c3;do eval pid=\\$$c;nsenter -n -t $pid ip link|grep -q eth0||echo GONE $c;done\n",
            guest_prelude(&secret, fwd.port)
        );
        vm2.wait_for("VM2-READY", Duration::from_secs(150)).await;
        let vm1 = Vm::start_with(
            &tb.nodes[0].ns.name,
            &isthmus_agent::names::tap(vm1["id"].as_str().expect("id")),
            vm1["mac_address"].as_str().expect("mac"),
            &cmd1,
            20,
            &Options { management: true },
        );
        vm1.wait_for("PHASE1-DONE", Duration::from_secs(240)).await;
        let out = vm1.cmd_output();
        println!("guest, phase 1:\n{out}");
        for c in ["c1", "c2", "c3"] {
            assert!(out.contains(&format!("CNI ADD {c} rc=0")), "ADD {c}:\n{}", vm1.log());
        }
        // Each container reaches its own network's container and VM on the other node, and
        // nothing of the other networks; the VM's own traffic is untouched.
        for (c, ip, reach) in [
            ("c1", "10.91.0.50", true),
            ("c1", "10.91.0.60", true),
            ("c1", "10.92.0.50", false),
            ("c1", "10.90.0.50", false),
            ("c2", "10.92.0.50", true),
            ("c2", "10.92.0.60", true),
            ("c2", "10.91.0.50", false),
            ("c3", "10.90.0.50", true),
            ("c3", "10.90.0.60", true),
            ("c3", "10.91.0.50", false),
            ("vm", "10.90.0.50", true),
        ] {
            let line = format!("{} {c} {ip}", if reach { "R" } else { "N" });
            assert!(out.contains(&line), "expected {line:?}:\n{out}");
        }
        let (s, t) = tb.net(Method::GET, &format!("/v2.0/trunks/{trunk1}"), None).await;
        assert_eq!(s, 200, "{t}");
        assert_eq!(t["trunk"]["status"], "ACTIVE", "{t}");
        assert_eq!(t["trunk"]["sub_ports"].as_array().map(Vec::len), Some(2), "{t}");

        // Removing c2's subport through the API cuts c2 only.
        let mut c2_port = None;
        for s in t["trunk"]["sub_ports"].as_array().expect("sub_ports") {
            let id = s["port_id"].as_str().expect("port_id");
            if tb.port(id).await["network_id"] == bnet.as_str() {
                c2_port = Some(id.to_string());
            }
        }
        let c2_port = c2_port.expect("c2's subport on net-b");
        b.tb.expect_as(
            &b.token,
            Method::PUT,
            &format!("/v2.0/trunks/{trunk1}/remove_subports"),
            json!({"sub_ports": [{"port_id": c2_port}]}),
            200,
        )
        .await;
        vm1.wait_for("ISTHMUS-CMD-END", Duration::from_secs(120)).await;
        let out = vm1.cmd_output();
        println!("guest, all:\n{out}");
        let cut = out
            .lines()
            .find_map(|l| l.strip_prefix("CUT-AFTER "))
            .and_then(|n| n.trim().parse::<u32>().ok())
            .expect("CUT-AFTER");
        assert!(cut < 30, "c2 was never cut off:\n{out}");
        println!("c2 cut off after {cut} one-second pings");
        let phase2 = &out[out.find("CUT-AFTER").unwrap_or(0)..];
        for line in ["N c2 10.92.0.50", "R c1 10.91.0.50", "R c3 10.90.0.50"] {
            assert!(phase2.contains(line), "expected {line:?} after the removal:\n{out}");
        }
        for c in ["c1", "c2", "c3"] {
            assert!(out.contains(&format!("CNI DEL {c} rc=0")), "DEL {c}:\n{out}");
        }
        assert!(out.contains("GONE c1") && out.contains("GONE c3"), "{out}");
        drop(peers);
    })
    .await
    .expect("test timed out");
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

/// Numbers after `prefix` on the lines that start with it.
fn figures(out: &str, prefix: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

/// `scripts/bench-nested.sh`: a nested container's throughput to a bare-metal container on
/// another node against the VM's own untagged traffic on the same path (interleaved iperf3
/// rounds inside the guest), and the nested plugin's ADD latency inside the VM (spawn to
/// exit, 20 sequential and 10 parallel ADDs; /proc/uptime, so 10 ms steps), next to the
/// plugin's bare start (`VERSION`, which it answers without I/O). Prints one
/// `BENCH_JSON` line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-nested.sh"]
async fn nested_bench() {
    support::require_root();
    let rounds: usize = std::env::var("ISTHMUS_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let secs: u32 = std::env::var("ISTHMUS_BENCH_IPERF_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let b = bed("nested-bench").await;
    let tb = &b.tb;
    let [(pnet, psub), (anet, _), _] = b.nets.clone();
    let peers: Vec<Ns> = tokio::task::block_in_place(|| {
        [("vmnet", "10.90.0.50"), ("net-a", "10.91.0.50")]
            .into_iter()
            .map(|(n, ip)| tb.nodes[1].cni_container(&b.project, n, ip))
            .collect()
    });
    let servers: Vec<std::process::Child> = peers
        .iter()
        .map(|ns| {
            Command::new("ip")
                .args(["netns", "exec", &ns.name, "iperf3", "-s"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("iperf3 -s")
        })
        .collect();
    let vm1 = tb.vm_port(&pnet, &psub, "10.90.0.10", 0).await;
    let (_trunk, secret) = trunk_with_credential(&b, &vm1, json!([])).await;
    let server = tb
        .network_url
        .trim_start_matches("http://")
        .parse()
        .expect("server address");
    let fwd = Forwarder::start(&tb.nodes[0].ns.path(), server);
    let cmd = format!(
        "{}cni ADD vlan {anet} c1 $c1\nsleep 3\n\
         for r in $(seq {rounds});do \
         iperf3 -c 10.90.0.50 -t {secs} -f m|awk '/sender/{{print \"TPUT-VM\",$(NF-3)}}';\
         nsenter -n -t $c1 iperf3 -c 10.91.0.50 -t {secs} -f m|awk '/sender/{{print \"TPUT-NESTED\",$(NF-3)}}';done\n\
         ms(){{ awk '{{printf \"%d\", $1*1000}}' /proc/uptime; }}\n\
         for i in $(seq 20);do s=$(ms);CNI_COMMAND=VERSION isthmus-cni</dev/null>/dev/null;echo SPAWN $(( $(ms)-s ));done\n\
         for i in $(seq 20);do unshare -n sleep 9999 & p=$!;sleep 0.2;s=$(ms);cni ADD vlan {anet} s$i $p>/dev/null;\
         echo ADD-SEQ $(( $(ms)-s ));done\n\
         for i in $(seq 10);do unshare -n sleep 9999 & eval q$i=$!;done;sleep 1\n\
         for i in $(seq 10);do eval p=\\$q$i;(s=$(ms);cni ADD vlan {anet} p$i $p>/dev/null;echo ADD-PAR $(( $(ms)-s ))>/tmp/par.$i) & done\n\
         n=0;while [ $(cat /tmp/par.* 2>/dev/null|wc -l) -lt 10 ]&&[ $n -lt 120 ];do n=$((n+1));sleep 1;done;cat /tmp/par.*\n",
        guest_prelude(&secret, fwd.port)
    );
    let vm = Vm::start_with(
        &tb.nodes[0].ns.name,
        &isthmus_agent::names::tap(vm1["id"].as_str().expect("id")),
        vm1["mac_address"].as_str().expect("mac"),
        &cmd,
        20,
        &Options { management: true },
    );
    vm.wait_for("ISTHMUS-CMD-END", Duration::from_secs(900)).await;
    let out = vm.cmd_output();
    println!("guest:\n{out}");
    let vm_t = figures(&out, "TPUT-VM ");
    let nested_t = figures(&out, "TPUT-NESTED ");
    let mut seq = figures(&out, "ADD-SEQ ");
    let mut par = figures(&out, "ADD-PAR ");
    let mut spawn = figures(&out, "SPAWN ");
    assert_eq!((vm_t.len(), nested_t.len()), (rounds, rounds), "iperf3 rounds:\n{out}");
    assert_eq!((seq.len(), par.len()), (20, 10), "ADD timings:\n{out}");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let ratio = mean(&nested_t) / mean(&vm_t);
    println!("untagged (VM) Mbit/s: {vm_t:?}\nnested (VLAN) Mbit/s: {nested_t:?}");
    println!(
        "BENCH_JSON {}",
        json!({
            "throughput_ratio": (ratio * 1000.0).round() / 1000.0,
            "vm_mbps": mean(&vm_t).round(),
            "nested_mbps": mean(&nested_t).round(),
            "add_seq_p50_ms": percentile(&mut seq, 0.5),
            "add_seq_p99_ms": percentile(&mut seq, 0.99),
            "add_par_p50_ms": percentile(&mut par, 0.5),
            "add_par_p99_ms": percentile(&mut par, 0.99),
            "spawn_p50_ms": percentile(&mut spawn, 0.5),
        })
    );
    for mut s in servers {
        let _ = s.kill();
        let _ = s.wait();
    }
    drop(peers);
}
