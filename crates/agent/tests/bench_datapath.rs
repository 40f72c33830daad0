//! Datapath benchmarks, `#[ignore]`d so that CI does not run them; they print their figures.
//! Run them with `scripts/bench-datapath.sh` (root; iperf3 installed). See docs/benchmarks.md.
//!
//! - `throughput`: TCP throughput (iperf3, 1 stream, 5 s) between two workloads on one
//!   network on two nodes of the test bed (agents' bridge + VXLAN), over the same kernel
//!   constructs built by hand with `ip`/`bridge`, and over a bare veth pair; three rounds,
//!   interleaved, medians reported.
//! - `convergence`: with N nodes (default 10), the time from `POST /v2.0/ports` (bound to
//!   node0) until the port's MAC is a forwarding entry on the VXLAN device of every other node,
//!   watched through netlink neighbour notifications in each node namespace.
//!
//! Knobs: `ISTHMUS_BENCH_NODES` (convergence nodes, default 10), `ISTHMUS_BENCH_PORTS` (ports
//! timed, default 40), `ISTHMUS_BENCH_ROUNDS` (throughput rounds, default 3).

mod support;
mod testbed;

use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::bench::{env_usize, iperf, median, percentile};
use support::{must, reaches, Ns};
use testbed::{eventually, Testbed};

// ---------------------------------------------------------------------------------------------
// Throughput
// ---------------------------------------------------------------------------------------------

/// The same kernel constructs the agent builds, by hand: two "node" namespaces joined by a
/// veth underlay, in each a bridge and a VXLAN device (VNI 4242, nolearning, port 4789, static
/// forwarding entries including the all-zero flood entry), and a workload namespace attached
/// by a veth to the bridge; MTU 1450 inside. Everything goes with the namespaces.
///
/// With `bridged`, the underlay has the test bed's shape instead: each node namespace reaches a
/// bridge in the root namespace through a veth (deleted on drop), so that the comparison with
/// the test bed isolates what the agent builds from the shape of the underlay.
struct HandBuilt {
    // Workloads first: their veth peers live in the node namespaces.
    workloads: Vec<Ns>,
    nodes: Vec<Ns>,
    root_links: Vec<String>,
}

impl Drop for HandBuilt {
    fn drop(&mut self) {
        // The root ends of the veths first, then the bridge.
        for l in self.root_links.iter().rev() {
            let _ = support::run(&["ip", "link", "del", l]);
        }
    }
}

const HB_UNDERLAY: [&str; 2] = ["10.250.0.1", "10.250.0.2"];
const HB_MACS: [&str; 2] = ["02:00:00:aa:00:01", "02:00:00:aa:00:02"];
const HB_IPS: [&str; 2] = ["10.251.0.1", "10.251.0.2"];

impl HandBuilt {
    fn new(bridged: bool) -> HandBuilt {
        let nodes = vec![Ns::new(), Ns::new()];
        let workloads = vec![Ns::new(), Ns::new()];
        let mut hb = HandBuilt {
            workloads,
            nodes,
            root_links: vec![],
        };
        if bridged {
            let br = format!("isbh{}x{}", std::process::id() % 10_000_000, support::unique() % 100);
            must(&["ip", "link", "add", &br, "type", "bridge"]);
            hb.root_links.push(br.clone());
            for i in 0..2 {
                let end = format!("{br}{i}");
                must(&[
                    "ip",
                    "link",
                    "add",
                    &end,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "und0",
                    "netns",
                    &hb.nodes[i].name,
                ]);
                hb.root_links.push(end.clone());
                must(&["ip", "link", "set", &end, "master", &br]);
                must(&["ip", "link", "set", &end, "up"]);
            }
            must(&["ip", "link", "set", &br, "up"]);
        } else {
            let (n0, n1) = (&hb.nodes[0], &hb.nodes[1]);
            n0.ip(&[
                "link", "add", "und0", "type", "veth", "peer", "name", "und0", "netns", &n1.name,
            ]);
        }
        for i in 0..2 {
            let (node, wl) = (&hb.nodes[i], &hb.workloads[i]);
            let other = HB_UNDERLAY[1 - i];
            node.ip(&["addr", "add", &format!("{}/24", HB_UNDERLAY[i]), "dev", "und0"]);
            node.ip(&["link", "set", "und0", "up"]);
            node.ip(&["link", "add", "br0", "mtu", "1450", "type", "bridge"]);
            node.ip(&[
                "link",
                "add",
                "vx0",
                "mtu",
                "1450",
                "type",
                "vxlan",
                "id",
                "4242",
                "local",
                HB_UNDERLAY[i],
                "dstport",
                "4789",
                "nolearning",
            ]);
            node.ip(&["link", "set", "vx0", "master", "br0"]);
            node.ip(&["link", "set", "vx0", "up"]);
            node.ip(&["link", "set", "br0", "up"]);
            must(&[
                "bridge",
                "-n",
                &node.name,
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                "vx0",
                "dst",
                other,
            ]);
            must(&[
                "bridge",
                "-n",
                &node.name,
                "fdb",
                "append",
                HB_MACS[1 - i],
                "dev",
                "vx0",
                "dst",
                other,
            ]);
            node.ip(&[
                "link", "add", "wl0", "mtu", "1450", "type", "veth", "peer", "name", "eth0", "netns", &wl.name,
            ]);
            node.ip(&["link", "set", "wl0", "master", "br0"]);
            node.ip(&["link", "set", "wl0", "up"]);
            wl.ip(&["link", "set", "eth0", "address", HB_MACS[i], "mtu", "1450"]);
            wl.ip(&["addr", "add", &format!("{}/24", HB_IPS[i]), "dev", "eth0"]);
            wl.ip(&["link", "set", "eth0", "up"]);
        }
        hb
    }
}

/// Two namespaces joined by one veth pair (MTU 1500).
struct Bare {
    a: Ns,
    b: Ns,
}

const BARE_IPS: [&str; 2] = ["10.252.0.1", "10.252.0.2"];

impl Bare {
    fn new() -> Bare {
        let bare = Bare {
            a: Ns::new(),
            b: Ns::new(),
        };
        bare.a.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &bare.b.name,
        ]);
        for (ns, ip) in [(&bare.a, BARE_IPS[0]), (&bare.b, BARE_IPS[1])] {
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        bare
    }
}

async fn until_reaches(what: &str, src: &Ns, from: &str, dst: &Ns, to: &str) {
    for _ in 0..20 {
        if reaches(src, from, dst, to) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{what}: {from} cannot reach {to}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-datapath.sh"]
async fn throughput() {
    support::require_root();
    let rounds = env_usize("ISTHMUS_BENCH_ROUNDS", 3);
    let budget = Duration::from_secs(60 + 50 * rounds as u64);
    tokio::time::timeout(budget, async {
        // (i) Isthmus: two workloads on one network, on two nodes.
        let tb = Testbed::start(2).await;
        let n = tb
            .create(&tb.admin_token, "networks", "network", json!({"name": "bench"}))
            .await;
        let net = n["id"].as_str().expect("network id").to_string();
        let s = tb
            .create(
                &tb.admin_token,
                "subnets",
                "subnet",
                json!({"network_id": net, "cidr": "10.20.0.0/24", "ip_version": 4}),
            )
            .await;
        let subnet = s["id"].as_str().expect("subnet id").to_string();
        let ips = ["10.20.0.10", "10.20.0.11"];
        let mut wls = vec![];
        for (i, ip) in ips.iter().enumerate() {
            let p = tb
                .create(
                    &tb.admin_token,
                    "ports",
                    "port",
                    json!({"network_id": net, "fixed_ips": [{"subnet_id": subnet, "ip_address": ip}]}),
                )
                .await;
            let id = p["id"].as_str().expect("port id").to_string();
            let (ns, answer) = tb.nodes[i].attach(&id).await;
            assert_eq!(answer["mtu"], json!(1450), "{answer}");
            wls.push(ns);
        }
        until_reaches("isthmus", &wls[0], ips[0], &wls[1], ips[1]).await;

        // (ii) the hand-built kernel path (veth underlay), (ii-b) the same on an underlay of
        // the test bed's shape (root-namespace bridge), (iii) the bare underlay.
        let hb = HandBuilt::new(false);
        until_reaches("hand-built", &hb.workloads[0], HB_IPS[0], &hb.workloads[1], HB_IPS[1]).await;
        let hbb = HandBuilt::new(true);
        until_reaches(
            "hand-built (bridged)",
            &hbb.workloads[0],
            HB_IPS[0],
            &hbb.workloads[1],
            HB_IPS[1],
        )
        .await;
        let bare = Bare::new();
        until_reaches("bare", &bare.a, BARE_IPS[0], &bare.b, BARE_IPS[1]).await;

        let names = ["isthmus", "hand-built", "hand-built/bridged", "bare veth"];
        let mut res: [Vec<f64>; 4] = Default::default();
        for round in 0..rounds {
            // Blocking runs: on the blocking pool, so the in-process server stays responsive.
            let r = tokio::task::block_in_place(|| {
                [
                    iperf(&wls[1], ips[1], &wls[0], 5),
                    iperf(&hb.workloads[1], HB_IPS[1], &hb.workloads[0], 5),
                    iperf(&hbb.workloads[1], HB_IPS[1], &hbb.workloads[0], 5),
                    iperf(&bare.b, BARE_IPS[1], &bare.a, 5),
                ]
            });
            let line: Vec<String> = names.iter().zip(&r).map(|(n, x)| format!("{n} {x:.2}")).collect();
            println!("round {}: {} Gbit/s", round + 1, line.join("  "));
            for (v, x) in res.iter_mut().zip(r) {
                v.push(x);
            }
        }
        let m: Vec<f64> = res.iter().map(|v| median(v)).collect();
        println!();
        println!("TCP throughput, iperf3 -t 5, 1 stream, median of {rounds} interleaved rounds");
        println!("{:<58} {:>8}", "path", "Gbit/s");
        for (what, x) in [
            ("(i) isthmus: agents' bridge + VXLAN, test bed underlay", m[0]),
            ("(ii) hand-built bridge + VXLAN, veth underlay", m[1]),
            ("(ii-b) hand-built bridge + VXLAN, test bed-shaped underlay", m[2]),
            ("(iii) bare veth underlay", m[3]),
        ] {
            println!("{what:<58} {x:>8.2}");
        }
        // Like for like: the hand-built path on the same (bridged) underlay as the test bed's
        // nodes, so the ratio measures the datapath Isthmus builds, not the test bed.
        println!(
            "ratio isthmus / hand-built, same underlay: {:.3} (target >= 0.95)",
            m[0] / m[2]
        );
        println!("ratio isthmus / hand-built, veth underlay: {:.3}", m[0] / m[1]);
        println!("ratio isthmus / bare:               {:.3}", m[0] / m[3]);
        println!(
            "BENCH_JSON {}",
            json!({"bench": "throughput", "rounds": rounds, "isthmus_gbps": res[0],
                "handbuilt_gbps": res[1], "handbuilt_bridged_gbps": res[2], "bare_gbps": res[3],
                "median": {"isthmus": m[0], "handbuilt": m[1], "handbuilt_bridged": m[2], "bare": m[3]},
                "ratio_handbuilt": m[0] / m[1], "ratio_handbuilt_bridged": m[0] / m[2],
                "ratio_bare": m[0] / m[3]})
        );
        drop(hbb);
        drop(bare);
        drop(hb);
        drop(wls);
    })
    .await
    .expect("throughput benchmark timed out");
}

// ---------------------------------------------------------------------------------------------
// Convergence
// ---------------------------------------------------------------------------------------------

/// MAC -> when a forwarding entry with a remote destination for it first appeared on the
/// watched VXLAN device.
type Seen = Arc<Mutex<HashMap<String, Instant>>>;

/// A thread in a node namespace listening to netlink neighbour notifications (RTNLGRP_NEIGH)
/// and recording bridge forwarding entries added on one device. Stopped and joined on drop.
struct FdbWatch {
    seen: Seen,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const RTM_NEWNEIGH: u16 = 28;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const RTMGRP_NEIGH: u32 = 4;

impl FdbWatch {
    fn start(ns: &Ns, ifindex: i32) -> FdbWatch {
        let seen: Seen = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let file = std::fs::File::open(ns.path()).expect("opening the node namespace");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (t_seen, t_stop) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let sock = match open_neigh_socket(&file) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let mut buf = vec![0u8; 1 << 16];
            while !t_stop.load(Ordering::Relaxed) {
                // SAFETY: recv into a buffer we own, of the length given.
                let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                let now = Instant::now();
                if n <= 0 {
                    // Timeout (checks the stop flag), EINTR, or ENOBUFS (an overrun: later
                    // entries are still reported; a missed one shows as a timeout in the
                    // benchmark). Anything else would repeat at once: back off.
                    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    if n == 0 || ![libc::EAGAIN, libc::EINTR, libc::ENOBUFS].contains(&errno) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    continue;
                }
                for mac in parse_fdb_adds(&buf[..n as usize], ifindex) {
                    if let Ok(mut m) = t_seen.lock() {
                        m.entry(mac).or_insert(now);
                    }
                }
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("netlink watch in {}: {e}", ns.name),
            Err(e) => panic!("netlink watch in {} did not start: {e}", ns.name),
        }
        FdbWatch {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn get(&self, mac: &str) -> Option<Instant> {
        self.seen.lock().ok().and_then(|m| m.get(mac).copied())
    }
}

impl Drop for FdbWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// In the namespace of `ns_file` (this thread only): a NETLINK_ROUTE socket subscribed to
/// neighbour notifications, with a 50 ms receive timeout.
fn open_neigh_socket(ns_file: &std::fs::File) -> Result<OwnedFd, String> {
    let os_err = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: setns on an fd we own; affects this thread only.
    if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(os_err("setns"));
    }
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(os_err("socket"));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; all zeros is valid.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = RTMGRP_NEIGH;
    // SAFETY: a valid sockaddr_nl of the given size.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(os_err("bind"));
    }
    let rcvbuf: libc::c_int = 4 << 20;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: setsockopt with pointers to live values of the sizes given.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&rcvbuf as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        if libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        ) != 0
        {
            return Err(os_err("SO_RCVTIMEO"));
        }
    }
    Ok(sock)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// MACs of RTM_NEWNEIGH messages in `buf` that are bridge forwarding entries (AF_BRIDGE) on
/// `ifindex` with a remote destination (NDA_DST). Malformed input ends the parse.
fn parse_fdb_adds(buf: &[u8], ifindex: i32) -> Vec<String> {
    const NLMSG_HDR: usize = 16;
    const NDMSG: usize = 12;
    let mut out = vec![];
    let mut off = 0;
    while let Some(len) = u32_at(buf, off) {
        let len = len as usize;
        if len < NLMSG_HDR || off + len > buf.len() {
            break;
        }
        let msg = &buf[off..off + len];
        off += (len + 3) & !3;
        if u16_at(msg, 4) != Some(RTM_NEWNEIGH) || msg.len() < NLMSG_HDR + NDMSG {
            continue;
        }
        let nd = &msg[NLMSG_HDR..];
        let family = nd[0];
        let idx = u32_at(nd, 4).map(|v| v as i32);
        if family != libc::AF_BRIDGE as u8 || idx != Some(ifindex) {
            continue;
        }
        let (mut mac, mut has_dst) = (None, false);
        let mut a = NLMSG_HDR + NDMSG;
        while let (Some(alen), Some(atype)) = (u16_at(msg, a), u16_at(msg, a + 2)) {
            let alen = alen as usize;
            if alen < 4 || a + alen > msg.len() {
                break;
            }
            let payload = &msg[a + 4..a + alen];
            match atype & 0x3fff {
                NDA_DST => has_dst = true,
                NDA_LLADDR if payload.len() == 6 => {
                    mac = Some(payload.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"))
                }
                _ => {}
            }
            a += (alen + 3) & !3;
        }
        if let (Some(m), true) = (mac, has_dst) {
            out.push(m);
        }
    }
    out
}

async fn bound_port(tb: &Testbed, net: &str, node: &str) -> Value {
    let (s, b) = tb
        .net(
            Method::POST,
            "/v2.0/ports",
            Some(json!({"port": {"network_id": net, "binding:host_id": node}})),
        )
        .await;
    assert_eq!(s, 201, "POST /v2.0/ports bound to {node}: {b}");
    b["port"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-datapath.sh"]
async fn convergence() {
    support::require_root();
    let n_nodes = env_usize("ISTHMUS_BENCH_NODES", 10).max(2);
    let n_ports = env_usize("ISTHMUS_BENCH_PORTS", 40);
    let budget = Duration::from_secs(120 + n_ports as u64 * 2);
    tokio::time::timeout(budget, async {
        let t = Instant::now();
        let tb = Testbed::start(n_nodes).await;
        println!(
            "test bed: {n_nodes} nodes with agents up in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let n = tb
            .create(&tb.admin_token, "networks", "network", json!({"name": "conv"}))
            .await;
        let net = n["id"].as_str().expect("network id").to_string();
        let (s, full) = tb.net(Method::GET, &format!("/v2.0/networks/{net}"), None).await;
        assert_eq!(s, 200, "{full}");
        let vni = full["network"]["provider:segmentation_id"]
            .as_u64()
            .expect("segmentation id");
        tb.create(
            &tb.admin_token,
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": "10.30.0.0/20", "ip_version": 4}),
        )
        .await;
        // One port on every node (B..J host the network; A warms up).
        for node in &tb.nodes {
            bound_port(&tb, &net, &node.name).await;
        }
        let vx = format!("isvx-{vni}");
        let others = &tb.nodes[1..];
        for node in others {
            eventually(20, &format!("{vx} on {}", node.name), || node.has_link(&vx)).await;
        }
        let watches: Vec<FdbWatch> = others
            .iter()
            .map(|node| FdbWatch::start(&node.ns, node.ns.ifindex(&vx) as i32))
            .collect();
        // Warm-up port on node0 (not counted): every watch must see it.
        let warm = bound_port(&tb, &net, &tb.nodes[0].name).await;
        let warm_mac = warm["mac_address"].as_str().expect("mac").to_ascii_lowercase();
        eventually(20, "the warm-up port on every node", || {
            watches.iter().all(|w| w.get(&warm_mac).is_some())
        })
        .await;

        let mut all_nodes = vec![]; // per port: until the last node has it (ms)
        let mut per_node: Vec<Vec<f64>> = vec![vec![]; others.len()];
        let mut post_ms = vec![];
        for k in 0..n_ports {
            let t0 = Instant::now();
            let p = bound_port(&tb, &net, &tb.nodes[0].name).await;
            post_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            let mac = p["mac_address"].as_str().expect("mac").to_ascii_lowercase();
            let deadline = Instant::now() + Duration::from_secs(10);
            let times = loop {
                let got: Vec<Option<Instant>> = watches.iter().map(|w| w.get(&mac)).collect();
                if got.iter().all(Option::is_some) {
                    break got.into_iter().flatten().collect::<Vec<_>>();
                }
                if Instant::now() > deadline {
                    let missing: Vec<&str> = others
                        .iter()
                        .zip(&got)
                        .filter(|(_, g)| g.is_none())
                        .map(|(n, _)| n.name.as_str())
                        .collect();
                    panic!("port {k} ({mac}) not on {missing:?} after 10 s");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            let ms: Vec<f64> = times
                .iter()
                .map(|t| t.saturating_duration_since(t0).as_secs_f64() * 1e3)
                .collect();
            for (v, x) in per_node.iter_mut().zip(&ms) {
                v.push(*x);
            }
            all_nodes.push(ms.iter().copied().fold(0.0, f64::max));
            // Let the nodes settle (status reports etc.) before the next port.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Cross-check the netlink view with iproute2 for the last port.
        for node in others {
            let fdb = node.ns.fdb(&vx);
            assert!(
                fdb.contains(&tb.nodes[0].underlay_ip),
                "{}: no entry towards node0 in {fdb}",
                node.name
            );
        }
        drop(watches);

        println!();
        println!(
            "convergence: {n_ports} ports POSTed bound to node0; FDB entry on {vx} of {} other nodes",
            others.len()
        );
        println!("{:<28} {:>9} {:>9} {:>9}", "", "p50 ms", "p99 ms", "max ms");
        let row = |what: &str, v: &[f64]| {
            println!(
                "{what:<28} {:>9.1} {:>9.1} {:>9.1}",
                percentile(v, 50.0),
                percentile(v, 99.0),
                percentile(v, 100.0)
            );
        };
        row("POST /v2.0/ports (201)", &post_ms);
        row("all other nodes", &all_nodes);
        let flat: Vec<f64> = per_node.iter().flatten().copied().collect();
        row("any node (all samples)", &flat);
        for (node, v) in others.iter().zip(&per_node) {
            row(&format!("  {}", node.name), v);
        }
        println!(
            "target: all {} other nodes within 100 ms at p99: {}",
            others.len(),
            if percentile(&all_nodes, 99.0) <= 100.0 {
                "met"
            } else {
                "NOT met"
            }
        );
        println!(
            "BENCH_JSON {}",
            json!({"bench": "convergence", "nodes": n_nodes, "ports": n_ports,
                "post_ms": post_ms, "all_nodes_ms": all_nodes,
                "p50_ms": percentile(&all_nodes, 50.0), "p99_ms": percentile(&all_nodes, 99.0)})
        );
    })
    .await
    .expect("convergence benchmark timed out");
}
