//! QoS limits through `tc` and `ip` processes, run in the calling thread's namespace (the
//! caller puts it in the node's: see `run_in_netns`).
//!
//! Reading: one `ip -j link show` (which devices exist, our IFBs by prefix), one `tc -j qdisc
//! show` (every device's root bucket and ingress qdisc), and per device with an ingress qdisc
//! one `tc -j filter show` (where its redirect goes).

use super::KernelError;
use crate::names;
use crate::shaping::{ifb_of, Observed, PortLimits, QosAction, Rate};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};

/// Queueing delay a token bucket allows before dropping: Neutron's linuxbridge agent uses
/// the same order of magnitude.
const LATENCY: &str = "50ms";

fn run(program: &str, args: &[&str]) -> Result<String, KernelError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| KernelError::io(format!("running {program} (is iproute2 installed?)"), e))?;
    if !out.status.success() {
        return Err(KernelError::io(
            format!("{program} {}", args.join(" ")),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`], but "already absent" answers count as success.
fn run_absent_ok(program: &str, args: &[&str]) -> Result<(), KernelError> {
    match run(program, args) {
        Ok(_) => Ok(()),
        Err(KernelError::Io { source, .. })
            if [
                "handle of zero",
                "No such file or directory",
                "Cannot find device",
                "Cannot find specified qdisc",
                "Invalid handle",
            ]
            .iter()
            .any(|m| source.to_string().contains(m)) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn json(text: &str, what: &str) -> Result<Vec<Value>, KernelError> {
    if text.trim().is_empty() {
        return Ok(vec![]);
    }
    serde_json::from_str(text).map_err(|e| KernelError::io(format!("reading {what}"), std::io::Error::other(e)))
}

/// A token bucket as `tc -j` shows it.
fn bucket(q: &Value) -> Option<Rate> {
    (q["kind"] == "tbf").then(|| Rate {
        bytes_per_sec: q["options"]["rate"].as_u64().unwrap_or(0),
        burst_bytes: q["options"]["burst"].as_u64().unwrap_or(0),
    })
}

/// The limits on those of `devices` that exist, and our IFB devices.
pub fn observe(devices: &[String]) -> Result<Observed, KernelError> {
    let links = json(&run("ip", &["-j", "link", "show"])?, "ip link")?;
    let names: BTreeSet<String> = links
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect();
    let ifbs: BTreeSet<String> = names
        .iter()
        .filter(|n| n.starts_with(names::IFB_PREFIX))
        .cloned()
        .collect();
    let qdiscs = json(&run("tc", &["-j", "qdisc", "show"])?, "tc qdisc")?;
    let mut roots: BTreeMap<&str, Rate> = BTreeMap::new();
    let mut ingress: BTreeSet<&str> = BTreeSet::new();
    for q in &qdiscs {
        let Some(dev) = q["dev"].as_str() else { continue };
        if q["kind"] == "ingress" {
            ingress.insert(dev);
        } else if q["root"] == true {
            if let Some(r) = bucket(q) {
                roots.insert(dev, r);
            }
        }
    }
    let mut out = Observed {
        ifbs: ifbs.clone(),
        ..Default::default()
    };
    for dev in devices.iter().filter(|d| names.contains(*d)) {
        let mut l = PortLimits {
            to_port: roots.get(dev.as_str()).copied(),
            from_port: None,
        };
        let ifb = ifb_of(dev);
        if ingress.contains(dev.as_str()) && ifbs.contains(&ifb) {
            let filters = json(
                &run("tc", &["-j", "filter", "show", "dev", dev, "ingress"])?,
                "tc filter",
            )?;
            let redirected = filters.iter().any(|f| {
                f["options"]["actions"].as_array().is_some_and(|acts| {
                    acts.iter()
                        .any(|a| a["kind"] == "mirred" && a["to_dev"] == ifb.as_str())
                })
            });
            if redirected {
                l.from_port = roots.get(ifb.as_str()).copied();
            }
        }
        out.ports.insert(dev.clone(), l);
    }
    Ok(out)
}

fn set_bucket(dev: &str, rate: &Rate) -> Result<(), KernelError> {
    let bits = format!("{}bit", rate.bytes_per_sec.saturating_mul(8));
    let burst = rate.burst_bytes.to_string();
    let args = [
        "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &bits, "burst", &burst, "latency", LATENCY,
    ];
    run("tc", &args).map(|_| ())
}

/// Performs one QoS change.
pub fn apply(a: &QosAction) -> Result<(), KernelError> {
    match a {
        QosAction::LimitToPort { dev, rate } => set_bucket(dev, rate),
        QosAction::UnlimitToPort { dev } => run_absent_ok("tc", &["qdisc", "del", "dev", dev, "root"]),
        QosAction::LimitFromPort { dev, ifb, rate } => {
            if let Err(e) = run("ip", &["link", "add", ifb, "type", "ifb"]) {
                if !e.to_string().contains("File exists") {
                    return Err(e);
                }
            }
            run("ip", &["link", "set", ifb, "up"])?;
            set_bucket(ifb, rate)?;
            // A fresh ingress qdisc, so exactly one redirect hangs under it.
            run_absent_ok("tc", &["qdisc", "del", "dev", dev, "ingress"])?;
            run("tc", &["qdisc", "add", "dev", dev, "handle", "ffff:", "ingress"])?;
            run(
                "tc",
                &[
                    "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "prio", "1", "u32", "match",
                    "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb,
                ],
            )
            .map(|_| ())
        }
        QosAction::UnlimitFromPort { dev } => run_absent_ok("tc", &["qdisc", "del", "dev", dev, "ingress"]),
        QosAction::DeleteIfb { ifb } => run_absent_ok("ip", &["link", "del", ifb]),
    }
}
