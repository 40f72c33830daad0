//! What the benchmark tests share: knobs from the environment, medians and percentiles, and
//! iperf3 between two namespaces.

use super::Ns;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A positive whole number from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Nearest-rank percentile (`p` in 0..=100).
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// An iperf3 server in a namespace (one test, then it exits); killed on drop.
struct IperfServer(Child);

impl IperfServer {
    fn start(ns: &Ns, ip: &str) -> IperfServer {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "iperf3", "-s", "-1", "-B", ip, "-p", "5201"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning iperf3 -s (apt-get install -y iperf3)");
        IperfServer(child)
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One iperf3 run (TCP, 1 stream, `secs` seconds) from `client` to `ip` in `server`: Gbit/s
/// received. Prints the sender's retransmits, which tell drops from CPU cost.
pub fn iperf(server: &Ns, ip: &str, client: &Ns, secs: usize) -> f64 {
    iperf_to(server, ip, client, ip, secs)
}

/// Like [`iperf`], the server listening on `bind` and the client connecting to `ip` (an
/// address translated to `bind` on the way, e.g. a floating IP).
pub fn iperf_to(server: &Ns, bind: &str, client: &Ns, ip: &str, secs: usize) -> f64 {
    iperf_bps(server, bind, client, ip, secs, 0) / 1e9
}

/// The run behind [`iperf_to`], in bit/s received, leaving the first `omit` seconds out of
/// the figure (slow start, a shaper's burst); retried up to five times.
pub fn iperf_bps(server: &Ns, bind: &str, client: &Ns, ip: &str, secs: usize, omit: usize) -> f64 {
    let (secs, omit) = (secs.to_string(), omit.to_string());
    let mut last = String::new();
    for _attempt in 0..5 {
        let _srv = IperfServer::start(server, bind);
        // The server needs a moment to listen; a refused connection is retried below.
        std::thread::sleep(Duration::from_millis(300));
        let out = Command::new("timeout")
            .args([
                "60",
                "ip",
                "netns",
                "exec",
                &client.name,
                "iperf3",
                "-c",
                ip,
                "-p",
                "5201",
                "-t",
                &secs,
                "-O",
                &omit,
                "-P",
                "1",
                "-J",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("running iperf3 -c");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = serde_json::from_str::<Value>(&text).ok();
        let received = json
            .as_ref()
            .and_then(|v| v["end"]["sum_received"]["bits_per_second"].as_f64());
        match received {
            Some(bps) if out.status.success() && bps > 0.0 => {
                if let Some(r) = json.as_ref().and_then(|v| v["end"]["sum_sent"]["retransmits"].as_u64()) {
                    println!("  iperf3: {r} retransmits");
                }
                return bps;
            }
            _ => {
                last = format!(
                    "status {}: {}{}",
                    out.status,
                    text.chars().take(400).collect::<String>(),
                    String::from_utf8_lossy(&out.stderr)
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
    panic!("iperf3 to {ip} in {} failed 5 times; last: {last}", server.name);
}
