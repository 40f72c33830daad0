//! CNI ADD latency, `#[ignore]`d so that CI does not run it; it prints its figures. Run it with
//! `scripts/bench-cni.sh` (root). See docs/benchmarks.md.
//!
//! One node of the test bed (agent and server real processes). Three setups, side by side in
//! one run, each timed the way a runtime sees it: from spawning the plugin process until it
//! exits, its stdout a valid result:
//! - `isthmus, pool`: `isthmus-cni` with the agent's port pool (size `ISTHMUS_BENCH_POOL`,
//!   default 24, filled before each phase);
//! - `isthmus, no pool`: the same with pools off (every ADD creates its port through the API);
//! - `bridge + host-local`: the reference plugins from Debian's containernetworking-plugins,
//!   plumbing a veth into a bridge and allocating from a local file: no control plane at all.
//!
//! Each setup: 100 sequential ADDs, then 20 parallel ADDs (all released at once). Workload
//! namespaces are made beforehand and DELs run afterwards, untimed. Plugins run inside the
//! node's network namespace (setns before exec), as a runtime on that node would run them.

mod support;
mod testbed;

use serde_json::{json, Value};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use support::bench::{env_usize, percentile as pct};
use support::Ns;
use testbed::Testbed;

const SEQUENTIAL: usize = 100;
const PARALLEL: usize = 20;

#[derive(Clone)]
struct Setup {
    plugin: PathBuf,
    conf: Value,
    node_ns: PathBuf,
}

/// Runs one plugin command in the node's namespace; returns (ms, success, stdout).
fn cni(s: &Setup, command: &str, container: &str, netns: &Path) -> (f64, bool, String) {
    let ns = std::fs::File::open(&s.node_ns).expect("node netns");
    let fd = ns.as_raw_fd();
    let mut cmd = Command::new(&s.plugin);
    cmd.env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni");
    // SAFETY: setns is async-signal-safe and touches nothing of the parent's memory.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t0 = Instant::now();
    let out = support::output_with_stdin(&mut cmd, s.conf.to_string().as_bytes());
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(ns);
    (
        ms,
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn add_ok(s: &Setup, cid: &str, ns: &Ns) -> f64 {
    let (ms, ok, out) = cni(s, "ADD", cid, &ns.path());
    assert!(ok, "ADD {cid} failed: {out}");
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    assert!(v["ips"][0]["address"].is_string(), "ADD {cid}: no address in {out}");
    ms
}

fn del_all(s: &Setup, tag: &str, nss: &[Ns]) {
    for (i, ns) in nss.iter().enumerate() {
        let (_, ok, out) = cni(s, "DEL", &format!("{tag}-{i}"), &ns.path());
        assert!(ok, "DEL failed: {out}");
    }
}

/// (sequential ms, parallel ms)
fn measure(s: &Setup, tag: &str, before_phase: &dyn Fn()) -> (Vec<f64>, Vec<f64>) {
    // Warm-up (and, for the pool, the first use that starts it).
    let w = Ns::new();
    add_ok(s, &format!("{tag}-warm"), &w);
    let _ = cni(s, "DEL", &format!("{tag}-warm"), &w.path());
    before_phase();
    let nss: Vec<Ns> = (0..SEQUENTIAL).map(|_| Ns::new()).collect();
    let seq: Vec<f64> = nss
        .iter()
        .enumerate()
        .map(|(i, ns)| add_ok(s, &format!("{tag}-s-{i}"), ns))
        .collect();
    if std::env::var_os("ISTHMUS_BENCH_SAMPLES").is_some() {
        println!(
            "{tag} sequential samples (ms): {:?}",
            seq.iter().map(|x| x.round() as u64).collect::<Vec<_>>()
        );
    }
    del_all(s, &format!("{tag}-s"), &nss);
    drop(nss);
    before_phase();
    let nss: Vec<Arc<Ns>> = (0..PARALLEL).map(|_| Arc::new(Ns::new())).collect();
    let barrier = Arc::new(Barrier::new(PARALLEL));
    let handles: Vec<_> = nss
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let (s, ns, barrier, cid) = (s.clone(), ns.clone(), barrier.clone(), format!("{tag}-p-{i}"));
            std::thread::spawn(move || {
                barrier.wait();
                add_ok(&s, &cid, &ns)
            })
        })
        .collect();
    let par: Vec<f64> = handles.into_iter().map(|h| h.join().expect("ADD thread")).collect();
    let plain: Vec<Ns> = nss.into_iter().map(|n| Arc::try_unwrap(n).ok().expect("ns")).collect();
    del_all(s, &format!("{tag}-p"), &plain);
    (seq, par)
}

/// One request line to the agent's socket and its answer (blocking).
fn socket_call(path: &Path, req: &Value) -> Value {
    use std::io::{BufRead, BufReader};
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("agent socket");
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).expect("request");
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).expect("answer");
    serde_json::from_str(&answer).unwrap_or(Value::Null)
}

/// Parallel ADDs over the socket, released together; then their DELs, untimed.
fn over_socket(socket: &Path, tag: &str) -> Vec<f64> {
    let nss: Vec<Ns> = (0..PARALLEL).map(|_| Ns::new()).collect();
    let barrier = Barrier::new(PARALLEL);
    let add = |i: usize, ns: &Ns| {
        json!({"op": "cni_add", "container_id": format!("{tag}-p-{i}"), "ifname": "eth0",
               "netns": ns.path(), "network": "bench", "project": "bench"})
    };
    let par: Vec<f64> = std::thread::scope(|sc| {
        let handles: Vec<_> = nss
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let (barrier, req) = (&barrier, add(i, ns));
                sc.spawn(move || {
                    barrier.wait();
                    let t0 = Instant::now();
                    let v = socket_call(socket, &req);
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    assert_eq!(v["ok"], json!(true), "socket ADD: {v}");
                    ms
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("ADD thread")).collect()
    });
    for (i, ns) in nss.iter().enumerate() {
        let v = socket_call(
            socket,
            &json!({"op": "cni_del", "container_id": format!("{tag}-p-{i}"), "ifname": "eth0",
                    "netns": ns.path(), "network": "bench", "project": "bench"}),
        );
        assert_eq!(v["ok"], json!(true), "socket DEL: {v}");
    }
    par
}

/// (sequential ms, parallel ms) of `VERSION`, spawned exactly as the ADDs are.
fn floor(s: &Setup) -> (Vec<f64>, Vec<f64>) {
    let ns = Ns::new();
    let version = |cid: &str| {
        let (ms, ok, out) = cni(s, "VERSION", cid, &ns.path());
        assert!(ok, "VERSION failed: {out}");
        ms
    };
    let seq = (0..SEQUENTIAL).map(|i| version(&format!("floor-s-{i}"))).collect();
    let barrier = Barrier::new(PARALLEL);
    let par = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..PARALLEL)
            .map(|i| {
                let (barrier, version) = (&barrier, &version);
                sc.spawn(move || {
                    barrier.wait();
                    version(&format!("floor-p-{i}"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("VERSION thread")).collect()
    });
    (seq, par)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-cni.sh"]
async fn cni_add_latency() {
    support::require_root();
    let pool = env_usize("ISTHMUS_BENCH_POOL", 24);
    let mut tb = Testbed::start_with(1, true).await;
    let plugin = tokio::task::spawn_blocking(isthmus_store::testing::cni_bin)
        .await
        .expect("build");
    let t = tb.member("bench").await;
    let net = tb.create(&t, "networks", "network", json!({"name": "bench"})).await;
    tb.create(
        &t,
        "subnets",
        "subnet",
        json!({"network_id": net["id"], "cidr": "10.50.0.0/22", "ip_version": 4}),
    )
    .await;
    let node_ns = tb.nodes[0].ns.path();
    let isthmus = Setup {
        plugin: plugin.clone(),
        conf: json!({"cniVersion": "1.0.0", "name": "bench", "type": "isthmus-cni", "network": "bench",
                     "project": "bench", "socket": tb.nodes[0].socket}),
        node_ns: node_ns.clone(),
    };
    let data = tempfile::tempdir().expect("tempdir");
    let reference = Setup {
        plugin: PathBuf::from("/usr/lib/cni/bridge"),
        conf: json!({"cniVersion": "1.0.0", "name": "refnet", "type": "bridge", "bridge": "refbr0",
                     "isGateway": true, "ipMasq": false, "mtu": 1450,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.60.0.0/22"}]],
                              "dataDir": data.path()}}),
        node_ns,
    };
    assert!(
        reference.plugin.exists(),
        "containernetworking-plugins is not installed"
    );

    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![];
    // Pool on.
    tb.nodes[0].kill_agent();
    tb.nodes[0].env = vec![("ISTHMUS_POOL_SIZE".into(), pool.to_string())];
    tb.nodes[0].start_agent();
    tb.nodes[0].wait_socket().await;
    let (tbr, tr) = (&tb, &t);
    let rt = tokio::runtime::Handle::current();
    let fill = || {
        // Wait until the pool holds `pool` free ports.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let free = rt.block_on(async {
                let (_, b) = tbr.net_as(tr, reqwest::Method::GET, "/v2.0/ports", None).await;
                b["ports"]
                    .as_array()
                    .map_or(0, |ps| ps.iter().filter(|p| p["device_id"] == "").count())
            });
            if free >= pool {
                return;
            }
            assert!(Instant::now() < deadline, "pool stuck at {free} of {pool}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let (seq, par) = tokio::task::block_in_place(|| measure(&isthmus, "pool", &fill));
    rows.push(("isthmus, pool", seq, par));
    if std::env::var_os("ISTHMUS_BENCH_SAMPLES").is_some() {
        // The agent's own account of its slowest attaches.
        let log = std::fs::read_to_string(&tb.nodes[0].log).unwrap_or_default();
        for l in log.lines().filter(|l| l.contains("port attached")) {
            let total = l
                .split("reported_ms=")
                .nth(1)
                .and_then(|x| x.split_whitespace().next())
                .and_then(|x| x.parse::<f64>().ok())
                .unwrap_or(0.0);
            if total > 12.0 {
                println!("slow attach: {}", l.split("isthmus_agent").nth(1).unwrap_or(l));
            }
        }
    }
    // The same parallel ADDs sent straight to the agent's socket from threads of this process:
    // no plugin process, so no spawning; what the agent (and the server behind it) take alone.
    let socket = tb.nodes[0].socket.clone();
    let par = tokio::task::block_in_place(|| {
        fill();
        over_socket(&socket, "sock")
    });
    rows.push(("isthmus, pool, socket only", vec![], par));
    // Pool off.
    tb.nodes[0].kill_agent();
    tb.nodes[0].env = vec![("ISTHMUS_POOL_SIZE".into(), "0".into())];
    tb.nodes[0].start_agent();
    tb.nodes[0].wait_socket().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (seq, par) = tokio::task::block_in_place(|| measure(&isthmus, "nopool", &|| {}));
    rows.push(("isthmus, no pool", seq, par));
    let (seq, par) = tokio::task::block_in_place(|| measure(&reference, "ref", &|| {}));
    rows.push(("bridge + host-local", seq, par));
    // What spawning a plugin costs here with no work at all (VERSION, answered by the plugin
    // itself): the floor under every row above.
    let (seq, par) = tokio::task::block_in_place(|| floor(&isthmus));
    rows.push(("floor: plugin VERSION", seq, par));

    println!();
    println!("CNI ADD latency, ms (plugin spawn to exit), 1 node; pool size {pool}");
    println!(
        "{:<22} {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}",
        "setup", "seq p50", "seq p99", "seq max", "par p50", "par p99", "par max"
    );
    let cell = |v: &[f64], p: f64| {
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{:.1}", pct(v, p))
        }
    };
    for (name, s, p) in &rows {
        println!(
            "{:<22} {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}",
            name,
            cell(s, 50.0),
            cell(s, 99.0),
            cell(s, 100.0),
            cell(p, 50.0),
            cell(p, 99.0),
            cell(p, 100.0)
        );
    }
    let r = rows
        .iter()
        .find(|(n, _, _)| *n == "bridge + host-local")
        .expect("reference row");
    for (name, s, p) in rows
        .iter()
        .filter(|(n, _, _)| *n == "isthmus, pool" || *n == "isthmus, no pool")
    {
        println!(
            "{name} / reference: seq p50 {:.2}x p99 {:.2}x; par p50 {:.2}x p99 {:.2}x (target <= 1.5x; par p50 < 50 ms, p99 < 200 ms)",
            pct(s, 50.0) / pct(&r.1, 50.0),
            pct(s, 99.0) / pct(&r.1, 99.0),
            pct(p, 50.0) / pct(&r.2, 50.0),
            pct(p, 99.0) / pct(&r.2, 99.0)
        );
    }
    // The agent's own account (socket request in, answer out), without process spawning.
    let log = std::fs::read_to_string(&tb.nodes[0].log).unwrap_or_default();
    let agent_ms = |prefix: &str| -> Vec<f64> {
        log.lines()
            .filter(|l| l.contains("CNI ADD done") && l.contains(&format!("container={prefix}")))
            .filter_map(|l| l.rsplit("ms=").next()?.split_whitespace().next()?.parse::<f64>().ok())
            .collect()
    };
    for (name, tag) in [("isthmus, pool", "pool"), ("isthmus, no pool", "nopool")] {
        let (s, p) = (agent_ms(&format!("{tag}-s-")), agent_ms(&format!("{tag}-p-")));
        println!(
            "{name}, inside the agent: seq p50 {:.0} p99 {:.0}; par p50 {:.0} p99 {:.0} ms (whole ms)",
            pct(&s, 50.0),
            pct(&s, 99.0),
            pct(&p, 50.0),
            pct(&p, 99.0)
        );
    }
    let summary = json!({"pool": pool, "rows": rows.iter().map(|(n, s, p)| json!({"setup": n,
        "seq_p50": pct(s, 50.0), "seq_p99": pct(s, 99.0), "par_p50": pct(p, 50.0), "par_p99": pct(p, 99.0)})).collect::<Vec<_>>()});
    println!("json: {summary}");
}
