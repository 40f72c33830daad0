//! `isthmus-bench fleet`: one server, many nodes.
//!
//! A real release server (and etcd) and `--nodes` simulated nodes, each holding a real node
//! stream and heartbeating every `--heartbeat-secs` (20, the agent's default). `--ports` ports are spread over
//! `--ports / --ports-per-network` networks, each network spanning `--nodes-per-network`
//! random nodes (ports bound to them). Then, under a steady `--rate` port creates per second
//! for `--seconds`: fan-out latency (the create's 201 → every node with a port on that network
//! has the new port in its stream), the server's CPU per write and RSS; then, with nothing
//! changing for `--idle-seconds`, the server's CPU and the store writes per minute (counted
//! from the store revision the streams' pings carry). Prints a table and one JSON line.

use crate::api::{http_client, Neutron};
use crate::proc::{cpu_time, Backend, Deployment, ServerOptions};
use crate::stats::{ms, percentile, round3};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct FleetArgs {
    /// Simulated nodes, each with a node stream and heartbeats.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Ports created before measuring.
    #[arg(long, default_value_t = 10_000)]
    ports: usize,
    #[arg(long, value_enum, default_value_t = Backend::Embedded)]
    store: Backend,
    #[arg(long, default_value_t = 100)]
    ports_per_network: usize,
    #[arg(long, default_value_t = 10)]
    nodes_per_network: usize,
    /// Port creates per second in the measured phase.
    #[arg(long, default_value_t = 200)]
    rate: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Seconds between one node's heartbeats (the agent's default).
    #[arg(long, default_value_t = 20)]
    heartbeat_secs: u64,
    /// Concurrent clients while loading the ports.
    #[arg(long, default_value_t = 8)]
    load_clients: usize,
    /// The `isthmus` binary to run (a release build).
    #[arg(long, default_value = "target/release/isthmus")]
    isthmus_bin: PathBuf,
    #[arg(long, default_value = "warn")]
    server_log: String,
    /// `default`: ports get the project's default group, whose rule names the group itself,
    /// so every node with a port in the project also receives every other port's addresses
    /// (one project: the worst case). `none`: ports in no group (port security still on).
    #[arg(long, value_enum, default_value_t = Groups::Default)]
    security_groups: Groups,
    /// Serve and measure over HTTPS (a CA and certificate made for the run).
    #[arg(long)]
    tls: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Groups {
    Default,
    None,
}

/// What the simulated nodes saw: when each measured port reached each node.
#[derive(Default)]
struct Seen {
    /// Port name → node index → first time seen.
    at: HashMap<String, HashMap<usize, Instant>>,
}

struct Shared {
    seen: Mutex<Seen>,
    /// Highest store revision any stream reported.
    revision: AtomicI64,
    streams_open: AtomicUsize,
    /// Streams the server ended (fell behind) and the node resumed.
    reconnects: AtomicUsize,
    lines: AtomicUsize,
}

/// Tiny deterministic generator (the benchmark must not need a seed crate).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A measured create: port name, network index, when it was sent, when the 201 came.
type Created = (String, usize, Instant, Instant);

fn host(i: usize) -> String {
    format!("sim-{i:05}")
}

fn rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Port names in a stream line that start with the measured prefix.
fn measured_names(line: &[u8]) -> Vec<String> {
    const PAT: &[u8] = b"\"name\":\"fm-";
    let mut out = vec![];
    let mut i = 0;
    while i + PAT.len() <= line.len() {
        if &line[i..i + PAT.len()] == PAT {
            let start = i + PAT.len() - 3;
            let end = line[start..].iter().position(|b| *b == b'"').map(|p| start + p);
            if let Some(end) = end {
                out.push(String::from_utf8_lossy(&line[start..end]).into_owned());
                i = end;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// One node's stream, read until the benchmark ends. Like an agent, it reconnects when the
/// server ends the stream (it fell behind), resuming from the last revision it read.
async fn stream(http: reqwest::Client, base: String, token: String, node: usize, shared: Arc<Shared>) {
    let mut since: Option<i64> = None;
    loop {
        let q = since.map(|r| format!("?since={r}")).unwrap_or_default();
        let url = format!("{base}/isthmus/v1/nodes/{}/watch{q}", host(node));
        let resp = http
            .get(&url)
            .header("X-Auth-Token", &token)
            .timeout(Duration::from_secs(86_400))
            .send()
            .await;
        let mut resp = match resp {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                eprintln!("fleet: watch {} answered {}", host(node), r.status());
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                eprintln!("fleet: watch {}: {e}", host(node));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if since.is_some() {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.streams_open.fetch_add(1, Ordering::Relaxed);
        }
        let mut buf: Vec<u8> = vec![];
        while let Ok(Some(chunk)) = resp.chunk().await {
            let now = Instant::now();
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                shared.lines.fetch_add(1, Ordering::Relaxed);
                if let Some(r) = revision_of(&line) {
                    shared.revision.fetch_max(r, Ordering::Relaxed);
                    since = Some(since.map_or(r, |s| s.max(r)));
                }
                let names = measured_names(&line);
                if !names.is_empty() {
                    let mut s = shared.seen.lock().unwrap_or_else(|p| p.into_inner());
                    for n in names {
                        s.at.entry(n).or_default().entry(node).or_insert(now);
                    }
                }
            }
        }
    }
}

/// The `"revision":N` of a stream message (the first one in the line: the message's own).
fn revision_of(line: &[u8]) -> Option<i64> {
    const PAT: &[u8] = b"\"revision\":";
    let i = line.windows(PAT.len()).position(|w| w == PAT)? + PAT.len();
    let digits: Vec<u8> = line[i..].iter().take_while(|b| b.is_ascii_digit()).copied().collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

async fn heartbeats(
    http: reqwest::Client,
    base: String,
    token: String,
    nodes: usize,
    period: Duration,
    stop: Arc<AtomicUsize>,
) {
    // Every node once per period, spread evenly.
    let every = period.div_f64(nodes.max(1) as f64);
    let mut tick = tokio::time::interval(every);
    let mut i = 0;
    while stop.load(Ordering::Relaxed) == 0 {
        tick.tick().await;
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        let n = i % nodes;
        tokio::spawn(async move {
            let body = json!({"node": {"underlay_ip": underlay(n)}});
            let _ = http
                .put(format!("{base}/isthmus/v1/nodes/{}", host(n)))
                .header("X-Auth-Token", &token)
                .json(&body)
                .send()
                .await;
        });
        i += 1;
    }
}

fn underlay(n: usize) -> String {
    format!("10.{}.{}.{}", 100 + n / 65_536 % 100, n / 256 % 256, n % 256)
}

async fn put_ok(http: &reqwest::Client, url: String, token: &str, body: &Value) -> Result<Value> {
    let r = http.put(&url).header("X-Auth-Token", token).json(body).send().await?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("PUT {url}: {status}: {v}");
    }
    Ok(v)
}

async fn post_ok(http: &reqwest::Client, url: &str, token: &str, body: &Value) -> Result<Value> {
    let r = http.post(url).header("X-Auth-Token", token).json(body).send().await?;
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("POST {url}: {status}: {v}");
    }
    Ok(v)
}

pub async fn run(args: &FleetArgs) -> Result<bool> {
    let no_groups = args.security_groups == Groups::None;
    if args.nodes == 0 || args.ports_per_network == 0 || args.nodes_per_network == 0 {
        bail!("--nodes, --ports-per-network and --nodes-per-network must be positive");
    }
    let password = "fleet-bench-Pw1";
    let opts = ServerOptions {
        bin: &args.isthmus_bin,
        admin_password: password,
        log_filter: &args.server_log,
        tmp_dir: None,
        tls: args.tls,
    };
    let dep = Deployment::start(args.store, &opts).await?;
    let pid = dep.server.pid().ok_or_else(|| anyhow!("server has no pid"))?;
    let api = Neutron::login(&dep.server, password).await?;
    let base = dep.server.network_url();
    let token = api.token.clone();
    let http = http_client(dep.server.ca())?;
    let t_all = Instant::now();

    // Nodes register, then open their streams.
    for i in 0..args.nodes {
        put_ok(
            &http,
            format!("{base}/isthmus/v1/nodes/{}", host(i)),
            &token,
            &json!({"node": {"underlay_ip": underlay(i), "restarted": true}}),
        )
        .await?;
    }
    let shared = Arc::new(Shared {
        seen: Mutex::default(),
        revision: AtomicI64::new(0),
        streams_open: AtomicUsize::new(0),
        reconnects: AtomicUsize::new(0),
        lines: AtomicUsize::new(0),
    });
    let streams_http = isthmus_client::with_ca(reqwest::Client::builder(), dep.server.ca())
        .map_err(|e| anyhow!("{e}"))?
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(args.nodes + 16)
        .build()?;
    let mut readers = vec![];
    for i in 0..args.nodes {
        readers.push(tokio::spawn(stream(
            streams_http.clone(),
            base.clone(),
            token.clone(),
            i,
            shared.clone(),
        )));
    }
    while shared.streams_open.load(Ordering::Relaxed) < args.nodes {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stop = Arc::new(AtomicUsize::new(0));
    let beats = tokio::spawn(heartbeats(
        http.clone(),
        base.clone(),
        token.clone(),
        args.nodes,
        Duration::from_secs(args.heartbeat_secs.max(1)),
        stop.clone(),
    ));
    eprintln!(
        "fleet: {} nodes registered and streaming ({:.1} s)",
        args.nodes,
        t_all.elapsed().as_secs_f64()
    );

    // Networks, each over a few random nodes, and the ports.
    let networks = args.ports.div_ceil(args.ports_per_network).max(1);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut nets: Vec<(String, String, Vec<usize>)> = vec![];
    for n in 0..networks {
        let net = post_ok(
            &http,
            &format!("{base}/v2.0/networks"),
            &token,
            &json!({"network": {"name": format!("fleet-{n}")}}),
        )
        .await?;
        let net_id = net["network"]["id"].as_str().unwrap_or_default().to_string();
        let sub = post_ok(
            &http,
            &format!("{base}/v2.0/subnets"),
            &token,
            &json!({"subnet": {"network_id": net_id, "ip_version": 4,
                    "cidr": format!("10.{}.{}.0/20", n / 16 % 256, n % 16 * 16), "gateway_ip": null}}),
        )
        .await?;
        let sub_id = sub["subnet"]["id"].as_str().unwrap_or_default().to_string();
        let mut hosts: Vec<usize> = vec![];
        while hosts.len() < args.nodes_per_network.min(args.nodes) {
            let h = rng.below(args.nodes);
            if !hosts.contains(&h) {
                hosts.push(h);
            }
        }
        nets.push((net_id, sub_id, hosts));
    }
    let t_load = Instant::now();
    let bound: Arc<Vec<Mutex<HashSet<usize>>>> = Arc::new(nets.iter().map(|_| Mutex::default()).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let mut loaders = vec![];
    for c in 0..args.load_clients.max(1) {
        let (http, base, token, nets, next, bound) = (
            http_client(dep.server.ca())?,
            base.clone(),
            token.clone(),
            nets.clone(),
            next.clone(),
            bound.clone(),
        );
        let total = args.ports;
        loaders.push(tokio::spawn(async move {
            let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (c as u64 + 1));
            const BULK: usize = 50;
            loop {
                let start = next.fetch_add(BULK, Ordering::Relaxed);
                if start >= total {
                    return Ok::<(), anyhow::Error>(());
                }
                let end = (start + BULK).min(total);
                let mut items = vec![];
                for i in start..end {
                    let n = i % nets.len();
                    let (net_id, _, hosts) = &nets[n];
                    let h = hosts[rng.below(hosts.len())];
                    bound[n].lock().unwrap_or_else(|p| p.into_inner()).insert(h);
                    let mut item = json!({"network_id": net_id, "binding:host_id": host(h), "name": format!("fl-{i}")});
                    if no_groups {
                        item["security_groups"] = json!([]);
                    }
                    items.push(item);
                }
                post_ok(&http, &format!("{base}/v2.0/ports"), &token, &json!({ "ports": items })).await?;
            }
        }));
    }
    for l in loaders {
        l.await.context("loader task")??;
    }
    eprintln!(
        "fleet: {} ports on {} networks loaded in {:.1} s",
        args.ports,
        networks,
        t_load.elapsed().as_secs_f64()
    );
    // Let the streams drain the load: measure from a quiet start, not behind a backlog (with
    // security groups every loaded port also reaches each node naming its group as remote).
    let t_drain = Instant::now();
    let mut last = shared.lines.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = shared.lines.load(Ordering::Relaxed);
        if now == last || t_drain.elapsed() > Duration::from_secs(300) {
            break;
        }
        last = now;
    }
    eprintln!("fleet: streams drained in {:.1} s", t_drain.elapsed().as_secs_f64());

    // Measured: a steady rate of creates, each on a random network, bound to one of its hosts.
    let total = args.rate * args.seconds as usize;
    let created: Arc<Mutex<Vec<Created>>> = Arc::default();
    let failures = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_time(pid);
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1).div_f64(args.rate as f64));
    let mut tasks = vec![];
    for i in 0..total {
        tick.tick().await;
        let n = rng.below(nets.len());
        let h = nets[n].2[rng.below(nets[n].2.len())];
        bound[n].lock().unwrap_or_else(|p| p.into_inner()).insert(h);
        let (http, url, token, net_id) = (
            http.clone(),
            format!("{base}/v2.0/ports"),
            token.clone(),
            nets[n].0.clone(),
        );
        let (created, failures) = (created.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let name = format!("fm-{i}");
            let mut body = json!({"port": {"network_id": net_id, "binding:host_id": host(h), "name": name}});
            if no_groups {
                body["port"]["security_groups"] = json!([]);
            }
            let sent = Instant::now();
            match post_ok(&http, &url, &token, &body).await {
                Ok(_) => created
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((name, n, sent, Instant::now())),
                Err(e) => {
                    if failures.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("fleet: create failed: {e:#}");
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let write_secs = t0.elapsed().as_secs_f64();
    let cpu_write = cpu_time(pid).zip(cpu0).map(|(a, b)| a.saturating_sub(b));
    // Wait for the stragglers (at most 10 s).
    let created = created.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let wanted = |n: usize| bound[n].lock().unwrap_or_else(|p| p.into_inner()).clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let done = {
            let s = shared.seen.lock().unwrap_or_else(|p| p.into_inner());
            created.iter().all(|(name, n, _, _)| {
                s.at.get(name)
                    .is_some_and(|m| wanted(*n).iter().all(|h| m.contains_key(h)))
            })
        };
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Per create, the last node to see it: after the 201 (0 when every node had it before the
    // client had its answer), and after the request was sent.
    let mut lat: Vec<Duration> = vec![];
    let mut lat_sent: Vec<Duration> = vec![];
    let mut missing = 0usize;
    {
        let s = shared.seen.lock().unwrap_or_else(|p| p.into_inner());
        for (name, n, sent, t201) in &created {
            let hosts = wanted(*n);
            let got = s.at.get(name);
            let mut last: Option<Instant> = None;
            for h in &hosts {
                match got.and_then(|m| m.get(h)) {
                    Some(t) => last = Some(last.map_or(*t, |l| l.max(*t))),
                    None => missing += 1,
                }
            }
            if let Some(l) = last {
                lat.push(l.saturating_duration_since(*t201));
                lat_sent.push(l.saturating_duration_since(*sent));
            }
        }
    }
    lat.sort();
    lat_sent.sort();
    let rss = rss_mib(pid);

    // Idle: nothing changes but heartbeats.
    tokio::time::sleep(Duration::from_secs(6)).await; // one ping interval, for a fresh revision
    let rev0 = shared.revision.load(Ordering::Relaxed);
    let cpu_i0 = cpu_time(pid);
    let ti = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_seconds)).await;
    let cpu_idle = cpu_time(pid).zip(cpu_i0).map(|(a, b)| a.saturating_sub(b));
    let idle_secs = ti.elapsed().as_secs_f64();
    let rev1 = shared.revision.load(Ordering::Relaxed);
    stop.store(1, Ordering::Relaxed);
    let _ = beats.await;
    for r in readers {
        r.abort();
    }

    let pct = |v: &[Duration], q: f64| {
        if v.is_empty() {
            f64::NAN
        } else {
            round3(ms(percentile(v, q)))
        }
    };
    let p = |q: f64| pct(&lat, q);
    let n_created = created.len().max(1);
    let out = json!({
        "bench": "fleet",
        "nodes": args.nodes,
        "ports": args.ports,
        "security_groups": if no_groups { "none" } else { "default" },
        "networks": networks,
        "nodes_per_network": args.nodes_per_network,
        "store": args.store.to_string(),
        "rate": args.rate,
        "achieved_rate": round3(created.len() as f64 / write_secs),
        "create_failures": failures.load(Ordering::Relaxed),
        "fanout_missing": missing,
        "rss_mib": rss.map(round3),
        "fanout_p50_ms": p(0.50),
        "fanout_p99_ms": p(0.99),
        "fanout_max_ms": p(1.0),
        "from_post_p50_ms": pct(&lat_sent, 0.50),
        "from_post_p99_ms": pct(&lat_sent, 0.99),
        "cpu_ms_per_write": cpu_write.map(|c| round3(ms(c) / n_created as f64)),
        "idle_cpu_pct": cpu_idle.map(|c| round3(c.as_secs_f64() / idle_secs * 100.0)),
        "idle_writes_per_min": round3((rev1 - rev0) as f64 / idle_secs * 60.0),
        "stream_lines": shared.lines.load(Ordering::Relaxed),
        "stream_reconnects": shared.reconnects.load(Ordering::Relaxed),
    });
    println!(
        "fleet: {} nodes, {} ports ({} store): fan-out after the 201 p50 {} ms, p99 {} ms (after the POST was sent: p50 {} ms, p99 {} ms); RSS {} MiB; CPU/write {} ms; idle CPU {} %; idle writes/min {}",
        args.nodes,
        args.ports,
        args.store,
        out["fanout_p50_ms"],
        out["fanout_p99_ms"],
        out["from_post_p50_ms"],
        out["from_post_p99_ms"],
        out["rss_mib"],
        out["cpu_ms_per_write"],
        out["idle_cpu_pct"],
        out["idle_writes_per_min"]
    );
    println!("{out}");
    Ok(failures.load(Ordering::Relaxed) == 0 && missing == 0)
}
