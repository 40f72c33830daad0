//! Firewall programming cost: a node with many local ports in a few security groups with many
//! rules, one of them referencing a large remote group. Renders the agent's nftables tables
//! from that view and applies them with nft in a fresh network namespace, the way the agent
//! does: the whole table from empty, then one rule added (a patch), then one member added to
//! the remote group (a patch). Prints the object counts next to what one rule per rule per
//! port (remote groups expanded) would have been. Needs root.

use isthmus_agent::objects::Objects;
use isthmus_agent::security;
use isthmus_wire::stream::{Message, Object};
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(clap::Args)]
pub struct FirewallArgs {
    /// Local ports.
    #[arg(long, default_value_t = 1000)]
    ports: usize,
    /// Security groups (ports spread over them).
    #[arg(long, default_value_t = 20)]
    groups: usize,
    /// Rules per group.
    #[arg(long, default_value_t = 50)]
    rules: usize,
    /// Members of the remote group every group's first rule references.
    #[arg(long, default_value_t = 5000)]
    members: usize,
    /// Repetitions of each patch (p50/p99 over them).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
}

fn obj(key: String, kind: &str, value: serde_json::Value) -> anyhow::Result<Object> {
    Ok(serde_json::from_value(
        json!({"key": key, "kind": kind, "revision": 1, "value": value}),
    )?)
}

fn view(a: &FirewallArgs, extra_rules: usize, extra_members: usize) -> anyhow::Result<Objects> {
    let mut objs = vec![obj(
        "/b/networks/n".into(),
        "network",
        json!({"id": "n", "provider:segmentation_id": 100}),
    )?];
    let gid = |g: usize| format!("{g:08x}-0000-4000-8000-000000000000");
    let remote = "ffffffff-0000-4000-8000-000000000000";
    objs.push(obj(
        format!("/b/security_groups/{remote}"),
        "security_group",
        json!({"id": remote}),
    )?);
    for g in 0..a.groups {
        objs.push(obj(
            format!("/b/security_groups/{}", gid(g)),
            "security_group",
            json!({"id": gid(g)}),
        )?);
        for r in 0..a.rules + if g == 0 { extra_rules } else { 0 } {
            let mut rule = json!({"id": format!("r{g}-{r}"), "security_group_id": gid(g), "direction": "ingress",
                "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 1000 + r, "port_range_max": 1000 + r});
            if r == 0 {
                rule["remote_group_id"] = json!(remote);
            } else {
                rule["remote_ip_prefix"] = json!(format!("10.{}.{}.0/24", g % 250, r % 250));
            }
            objs.push(obj(
                format!("/b/security_group_rules/r{g}-{r}"),
                "security_group_rule",
                rule,
            )?);
        }
    }
    for m in 0..a.members + extra_members {
        let ip = format!("172.16.{}.{}", m / 250, m % 250 + 1);
        objs.push(obj(
            format!("/b/group_members/{remote}/m{m}"),
            "group_member",
            json!({"security_group_id": remote, "port_id": format!("m{m}"), "addresses": [ip]}),
        )?);
    }
    for p in 0..a.ports {
        let id = format!("{p:08x}-1111-4000-8000-000000000000");
        objs.push(obj(
            format!("/b/ports/{id}"),
            "port",
            json!({"id": id, "network_id": "n", "binding:host_id": "bench", "mac_address": format!("fa:16:3e:00:{:02x}:{:02x}", p / 256, p % 256),
                "fixed_ips": [{"subnet_id": "s", "ip_address": format!("10.200.{}.{}", p / 250, p % 250 + 1)}],
                "security_groups": [gid(p % a.groups)]}),
        )?);
    }
    let mut o = Objects::default();
    o.apply(Message::Snapshot {
        revision: 1,
        objects: objs,
    });
    Ok(o)
}

/// A fresh generation for each transaction, as the agent's controller makes them.
fn gen() -> security::Generation {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    security::Generation::first(ms)
}

fn nft(ns: &str, script: &str) -> anyhow::Result<f64> {
    use std::io::Write;
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p / 100.0).round() as usize;
    v.get(i).copied().unwrap_or(0.0)
}

pub fn run(a: &FirewallArgs) -> anyhow::Result<bool> {
    let ns = format!("isbench-fw-{}", std::process::id());
    let ok = Command::new("ip").args(["netns", "add", &ns]).status()?.success();
    anyhow::ensure!(ok, "ip netns add {ns} (root needed)");
    let res = (|| -> anyhow::Result<bool> {
        let base = security::desired(&view(a, 0, 0)?, "bench");
        let rule = security::desired(&view(a, 1, 0)?, "bench");
        let member = security::desired(&view(a, 0, 1)?, "bench");
        let t = Instant::now();
        let script = security::full(&base, gen());
        let render_ms = t.elapsed().as_secs_f64() * 1000.0;
        let program_ms = nft(&ns, &script)? + render_ms;
        let (mut rule_ms, mut member_ms) = (vec![], vec![]);
        for _ in 0..a.rounds {
            let t = Instant::now();
            let p = security::patch(&base, &rule, gen());
            let r = t.elapsed().as_secs_f64() * 1000.0;
            rule_ms.push(nft(&ns, &p)? + r);
            nft(&ns, &security::patch(&rule, &base, gen()))?;
            let t = Instant::now();
            let p = security::patch(&base, &member, gen());
            let r = t.elapsed().as_secs_f64() * 1000.0;
            member_ms.push(nft(&ns, &p)? + r);
            nft(&ns, &security::patch(&member, &base, gen()))?;
        }
        let (objects, product) = security::object_counts(&base);
        println!(
            "firewall: {} ports, {} groups x {} rules, remote group of {} members: full programming {:.0} ms \
             (render {:.0} ms); patch one rule p50 {:.1} ms p99 {:.1} ms; one member p50 {:.1} ms p99 {:.1} ms; \
             nft objects {} vs rule x port product {}",
            a.ports,
            a.groups,
            a.rules,
            a.members,
            program_ms,
            render_ms,
            pct(&mut rule_ms, 50.0),
            pct(&mut rule_ms, 99.0),
            pct(&mut member_ms, 50.0),
            pct(&mut member_ms, 99.0),
            objects,
            product
        );
        println!(
            "{}",
            json!({"ports": a.ports, "groups": a.groups, "rules": a.rules, "members": a.members,
                "program_ms": (program_ms * 10.0).round() / 10.0,
                "rule_patch_p99_ms": (pct(&mut rule_ms, 99.0) * 10.0).round() / 10.0,
                "member_patch_p99_ms": (pct(&mut member_ms, 99.0) * 10.0).round() / 10.0,
                "nft_objects": objects, "product_objects": product})
        );
        Ok(true)
    })();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    res
}
