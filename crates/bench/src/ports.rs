//! `isthmus-bench ports`: how fast the network API creates ports.
//!
//! Per backend: a fresh server (and etcd), an admin token, a warm-up. Per client count: a fresh
//! network with one IPv4 subnet; `--ports` POST /v2.0/ports split across that many concurrent
//! clients (one tokio task and one keep-alive connection each); then every port, the subnet and
//! the network are deleted, so each run starts from the same state.

use crate::api::{snippet, Neutron};
use crate::proc::{cpu_time, own_cpu_time, Backend, Deployment, ServerOptions};
use crate::stats::{ms, percentile, round3, table};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Barrier;

/// Concurrency of the untimed cleanup.
const CLEANUP_CLIENTS: usize = 8;
/// Failed requests printed in full per run (all are counted).
const ERRORS_SHOWN: usize = 20;

#[derive(clap::Args)]
pub struct PortsArgs {
    /// Store backends to measure, comma-separated.
    #[arg(long = "backend", value_enum, value_delimiter = ',', default_values_t = [Backend::Embedded, Backend::Etcd])]
    backends: Vec<Backend>,
    /// Concurrent clients, comma-separated; one measured run per value.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    clients: Vec<usize>,
    /// Ports created per run, split evenly across the clients.
    #[arg(long, default_value_t = 2000)]
    ports: usize,
    /// Ports created and deleted per backend before measuring (also creates the project's
    /// default security group, which the first port of a project otherwise pays for).
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// The `isthmus` binary to run (a release build).
    #[arg(long, default_value = "target/release/isthmus")]
    isthmus_bin: PathBuf,
    /// ISTHMUS_LOG for the server.
    #[arg(long, default_value = "info")]
    server_log: String,
    /// Where the server's temp data dir goes (default: $TMPDIR or /tmp). etcd's data goes to
    /// the system temp dir.
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Serve and measure over HTTPS (a CA and certificate made for the run).
    #[arg(long)]
    tls: bool,
}

/// One measured run.
struct Run {
    backend: Backend,
    clients: usize,
    ports: usize,
    created: usize,
    total: Duration,
    /// Latencies of the 201 responses, sorted.
    latencies: Vec<Duration>,
    /// Median latency of the first and last tenth of requests, by completion time: shows
    /// whether requests get slower as the subnet fills up.
    p50_first_tenth: Duration,
    p50_last_tenth: Duration,
    errors: Vec<String>,
    server_cpu: Option<Duration>,
    etcd_cpu: Option<Duration>,
    bench_cpu: Option<Duration>,
    load_1m: Option<f64>,
}

impl Run {
    fn rate(&self) -> f64 {
        let s = self.total.as_secs_f64();
        if s > 0.0 {
            self.created as f64 / s
        } else {
            0.0
        }
    }

    fn cpu_ms_per_port(&self, cpu: Option<Duration>) -> Option<f64> {
        let cpu = cpu?;
        (self.created > 0).then(|| ms(cpu) / self.created as f64)
    }

    fn table_row(&self) -> Vec<String> {
        let f = |d: Duration| format!("{:.2}", ms(d));
        let opt = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"));
        vec![
            self.backend.to_string(),
            self.clients.to_string(),
            self.ports.to_string(),
            format!("{:.2}", self.total.as_secs_f64()),
            format!("{:.0}", self.rate()),
            f(percentile(&self.latencies, 50.0)),
            f(percentile(&self.latencies, 90.0)),
            f(percentile(&self.latencies, 99.0)),
            f(percentile(&self.latencies, 100.0)),
            self.errors.len().to_string(),
            opt(self.cpu_ms_per_port(self.server_cpu)),
            opt(self.cpu_ms_per_port(self.etcd_cpu)),
            opt(self.cpu_ms_per_port(self.bench_cpu)),
            opt(self.load_1m),
        ]
    }

    fn json(&self) -> Value {
        let m = |d: Duration| round3(ms(d));
        let opt_s = |d: Option<Duration>| d.map(|d| round3(d.as_secs_f64()));
        json!({
            "benchmark": "api.ports",
            "backend": self.backend.to_string(),
            "clients": self.clients,
            "ports": self.ports,
            "created": self.created,
            "errors": self.errors.len(),
            "total_s": round3(self.total.as_secs_f64()),
            "ports_per_s": round3(self.rate()),
            "p50_ms": m(percentile(&self.latencies, 50.0)),
            "p90_ms": m(percentile(&self.latencies, 90.0)),
            "p99_ms": m(percentile(&self.latencies, 99.0)),
            "max_ms": m(percentile(&self.latencies, 100.0)),
            "mean_ms": round3(
                self.latencies.iter().map(|d| ms(*d)).sum::<f64>() / self.latencies.len().max(1) as f64
            ),
            "p50_first_tenth_ms": m(self.p50_first_tenth),
            "p50_last_tenth_ms": m(self.p50_last_tenth),
            "server_cpu_s": opt_s(self.server_cpu),
            "etcd_cpu_s": opt_s(self.etcd_cpu),
            "bench_cpu_s": opt_s(self.bench_cpu),
            "load_1m": self.load_1m,
            "nproc": std::thread::available_parallelism().map(|n| n.get()).ok(),
        })
    }
}

const HEADER: &[&str] = &[
    "backend",
    "clients",
    "ports",
    "total s",
    "ports/s",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "max ms",
    "errors",
    "srv cpu ms/port",
    "etcd cpu ms/port",
    "bench cpu ms/port",
    "load 1m",
];

/// Runs the benchmark and prints its results; `Ok(false)` when any request failed.
pub async fn run(args: &PortsArgs) -> Result<bool> {
    if args.ports == 0 || args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--ports and every --clients value must be at least 1");
    }
    if args.backends.is_empty() {
        bail!("no --backend given");
    }
    let prefix = subnet_prefix(args.ports.max(args.warmup))?;
    let password = format!("bench-{}", std::process::id());
    let opts = ServerOptions {
        bin: &args.isthmus_bin,
        admin_password: &password,
        log_filter: &args.server_log,
        tmp_dir: args.tmp_dir.as_deref(),
        tls: args.tls,
    };
    eprintln!(
        "isthmus-bench ports: backends {:?}, clients {:?}, {} ports per run on a /{prefix}, {} warm-up ports; {} CPUs, load {}",
        args.backends.iter().map(ToString::to_string).collect::<Vec<_>>(),
        args.clients,
        args.ports,
        args.warmup,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    );

    let mut runs = Vec::new();
    for &backend in &args.backends {
        eprintln!("[{backend}] starting the server");
        let dep = Deployment::start(backend, &opts).await?;
        let result = bench_backend(&dep, args, &password, prefix, &mut runs).await;
        if result.is_err() {
            eprintln!("[{backend}] server log (tail):\n{}", dep.server.log_tail());
        }
        result.with_context(|| format!("benchmarking the {backend} backend"))?;
        drop(dep);
    }

    println!();
    println!("API port creation (POST /v2.0/ports), {} ports per run", args.ports);
    print!(
        "{}",
        table(HEADER, &runs.iter().map(Run::table_row).collect::<Vec<_>>())
    );
    for r in &runs {
        println!("{}", r.json());
    }
    Ok(runs.iter().all(|r| r.errors.is_empty()))
}

async fn bench_backend(
    dep: &Deployment,
    args: &PortsArgs,
    password: &str,
    prefix: u8,
    runs: &mut Vec<Run>,
) -> Result<()> {
    let backend = dep.backend;
    let api = Neutron::login(&dep.server, password).await?;

    if args.warmup > 0 {
        let clients = args.clients.iter().copied().max().unwrap_or(1);
        let (net, subnet) = fresh_network(&api, "bench-warmup", prefix).await?;
        let run = create_ports(&api, &net, clients, args.warmup, "warmup").await?;
        if let Some(e) = run.errors.first() {
            bail!("warm-up port creation failed ({} errors), first: {e}", run.errors.len());
        }
        cleanup(&api, &net, &subnet).await?;
        eprintln!("[{backend}] warm-up: {} ports created and deleted", args.warmup);
    }

    for &clients in &args.clients {
        let (net, subnet) = fresh_network(&api, &format!("bench-{clients}"), prefix).await?;
        let pids = (dep.server.pid(), dep.etcd_pid());
        let cpu_before = (pids.0.and_then(cpu_time), pids.1.and_then(cpu_time), own_cpu_time());
        let load_1m = load_1m();
        let m = create_ports(&api, &net, clients, args.ports, "bench").await?;
        let cpu_after = (pids.0.and_then(cpu_time), pids.1.and_then(cpu_time), own_cpu_time());
        let diff = |a: Option<Duration>, b: Option<Duration>| Some(b?.saturating_sub(a?));
        let run = Run {
            backend,
            clients,
            ports: args.ports,
            created: m.latencies.len(),
            total: m.total,
            p50_first_tenth: m.p50_tenth(false),
            p50_last_tenth: m.p50_tenth(true),
            latencies: m.sorted_latencies(),
            errors: m.errors,
            server_cpu: diff(cpu_before.0, cpu_after.0),
            etcd_cpu: diff(cpu_before.1, cpu_after.1),
            bench_cpu: diff(cpu_before.2, cpu_after.2),
            load_1m,
        };
        eprintln!(
            "[{backend}] {clients} clients: {} ports in {:.2} s = {:.0} ports/s; p50 {:.2} ms, p99 {:.2} ms; {} errors",
            run.created,
            run.total.as_secs_f64(),
            run.rate(),
            ms(percentile(&run.latencies, 50.0)),
            ms(percentile(&run.latencies, 99.0)),
            run.errors.len(),
        );
        report_errors(&run.errors);
        cleanup(&api, &net, &subnet).await?;
        runs.push(run);
    }
    Ok(())
}

/// The longest IPv4 prefix (at most /20) whose subnet holds `ports` addresses besides the
/// network, broadcast and gateway addresses.
fn subnet_prefix(ports: usize) -> Result<u8> {
    let mut prefix = 20u8;
    while (1u64 << (32 - u32::from(prefix))) < ports as u64 + 3 {
        prefix -= 1;
        if prefix < 8 {
            bail!("--ports {ports} does not fit in a 10.0.0.0/8 subnet");
        }
    }
    Ok(prefix)
}

async fn fresh_network(api: &Neutron, name: &str, prefix: u8) -> Result<(String, String)> {
    let net = api.create("networks", "network", json!({"name": name})).await?;
    let subnet = api
        .create(
            "subnets",
            "subnet",
            json!({"name": name, "network_id": net, "ip_version": 4, "cidr": format!("10.0.0.0/{prefix}")}),
        )
        .await?;
    Ok((net, subnet))
}

/// Deletes every port on the network (found by listing, so ports whose response was lost go
/// too), then the subnet and the network.
async fn cleanup(api: &Neutron, net: &str, subnet: &str) -> Result<()> {
    let ids = port_ids(api, net).await?;
    let mut tasks = Vec::new();
    for chunk in ids.chunks(ids.len().div_ceil(CLEANUP_CLIENTS).max(1)) {
        let api = api.with_own_client()?;
        let chunk = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for id in chunk {
                api.delete("ports", &id).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("cleanup task")??;
    }
    let left = port_ids(api, net).await?;
    if !left.is_empty() {
        bail!("{} ports still on network {net} after cleanup", left.len());
    }
    api.delete("subnets", subnet).await?;
    api.delete("networks", net).await?;
    Ok(())
}

async fn port_ids(api: &Neutron, net: &str) -> Result<Vec<String>> {
    let v = api.get(&format!("ports?network_id={net}&fields=id")).await?;
    let ports = v
        .get("ports")
        .and_then(Value::as_array)
        .context("GET /v2.0/ports: no ports list")?;
    ports
        .iter()
        .map(|p| {
            p.get("id")
                .and_then(Value::as_str)
                .map(str::to_string)
                .context("GET /v2.0/ports: port without id")
        })
        .collect()
}

/// What the clients of one run saw.
struct Measured {
    total: Duration,
    /// (completion time since start, latency) of every 201.
    samples: Vec<(Duration, Duration)>,
    latencies: Vec<Duration>,
    errors: Vec<String>,
}

impl Measured {
    fn sorted_latencies(&self) -> Vec<Duration> {
        let mut l = self.latencies.clone();
        l.sort_unstable();
        l
    }

    fn p50_tenth(&self, last: bool) -> Duration {
        let mut by_time = self.samples.clone();
        by_time.sort_unstable_by_key(|(at, _)| *at);
        let n = (by_time.len() / 10).max(1).min(by_time.len());
        let tenth = if last {
            &by_time[by_time.len() - n..]
        } else {
            &by_time[..n]
        };
        let mut l: Vec<Duration> = tenth.iter().map(|(_, l)| *l).collect();
        l.sort_unstable();
        percentile(&l, 50.0)
    }
}

struct ClientOutcome {
    samples: Vec<(Instant, Duration)>,
    errors: Vec<String>,
    end: Instant,
}

/// Creates `ports` ports on `net` from `clients` concurrent clients and times every request.
async fn create_ports(api: &Neutron, net: &str, clients: usize, ports: usize, tag: &str) -> Result<Measured> {
    let barrier = Arc::new(Barrier::new(clients + 1));
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let n = ports / clients + usize::from(c < ports % clients);
        let api = api.with_own_client()?;
        let barrier = barrier.clone();
        let net = net.to_string();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move { client(api, net, tag, c, n, barrier).await }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut m = Measured {
        total: Duration::ZERO,
        samples: Vec::with_capacity(ports),
        latencies: Vec::with_capacity(ports),
        errors: vec![],
    };
    let mut end = start;
    for t in tasks {
        let out = t.await.context("client task")??;
        end = end.max(out.end);
        for (at, lat) in out.samples {
            m.samples.push((at.saturating_duration_since(start), lat));
            m.latencies.push(lat);
        }
        m.errors.extend(out.errors);
    }
    m.total = end.saturating_duration_since(start);
    Ok(m)
}

/// One client: opens its connection, waits for the others, then creates its ports one by one.
async fn client(
    api: Neutron,
    net: String,
    tag: String,
    index: usize,
    count: usize,
    barrier: Arc<Barrier>,
) -> Result<ClientOutcome> {
    // Opens the keep-alive connection outside the timed part. Reaches the barrier even on
    // failure, or the other clients would wait forever.
    let warm = api.get(&format!("networks/{net}")).await;
    barrier.wait().await;
    warm.context("opening the client connection")?;

    let url = format!("{}/ports", api.base);
    let mut out = ClientOutcome {
        samples: Vec::with_capacity(count),
        errors: vec![],
        end: Instant::now(),
    };
    for i in 0..count {
        let body = json!({"port": {"network_id": net, "name": format!("{tag}-{index}-{i}")}});
        let body = serde_json::to_vec(&body).context("encoding the request")?;
        let t = Instant::now();
        let sent = api
            .http
            .post(&url)
            .header("x-auth-token", &api.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let result = match sent {
            Ok(resp) => {
                let status = resp.status();
                match resp.bytes().await {
                    Ok(_) if status == reqwest::StatusCode::CREATED => Ok(()),
                    Ok(b) => Err(format!("HTTP {status}: {}", snippet(&String::from_utf8_lossy(&b)))),
                    Err(e) => Err(format!("HTTP {status}, reading the body: {e}")),
                }
            }
            Err(e) => Err(format!("request failed: {e}")),
        };
        let done = Instant::now();
        match result {
            Ok(()) => out.samples.push((done, done - t)),
            Err(e) => out.errors.push(format!("client {index} request {i}: {e}")),
        }
        out.end = done;
    }
    Ok(out)
}

/// Prints the first failures in full and a count per distinct message.
fn report_errors(errors: &[String]) {
    if errors.is_empty() {
        return;
    }
    for e in errors.iter().take(ERRORS_SHOWN) {
        eprintln!("  error: {e}");
    }
    if errors.len() > ERRORS_SHOWN {
        eprintln!("  ... and {} more", errors.len() - ERRORS_SHOWN);
    }
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for e in errors {
        // Drop the "client C request I: " prefix to group by cause.
        let cause = e.split_once(": ").map_or(e.as_str(), |(_, c)| c);
        *kinds.entry(cause).or_default() += 1;
    }
    for (cause, n) in kinds {
        eprintln!("  {n} x {cause}");
    }
}

fn load_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(subnet_prefix(2000).ok(), Some(20));
        assert_eq!(subnet_prefix(4093).ok(), Some(20));
        assert_eq!(subnet_prefix(4094).ok(), Some(19));
        assert_eq!(subnet_prefix(100_000).ok(), Some(15));
        assert!(subnet_prefix(1 << 25).is_err());
    }
}
