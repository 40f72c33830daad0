//! Agent datapath sync: how long the agent takes to program, and to re-verify after a restart,
//! a node whose view holds many remote ports — against iproute2's batch mode programming the
//! same forwarding entries, in the same run.
//!
//! Runs in a fresh network namespace (root required); nothing leaves it.

use anyhow::{bail, Context, Result};
use clap::Args;
use isthmus_agent::desired::{compute, Datapath};
use isthmus_agent::kernel::NetlinkKernel;
use isthmus_agent::reconcile::reconcile;
use isthmus_agent::view::{LocalPort, NetworkInfo, NodeView, PortKind, RemotePort};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct ResyncArgs {
    /// Remote ports in the node's view (one static FDB entry each).
    #[arg(long, default_value_t = 10_000)]
    ports: usize,
    /// Networks they are spread over (one bridge + VXLAN device each on this node).
    #[arg(long, default_value_t = 10)]
    networks: usize,
    /// Remote nodes hosting them (one head-end replication entry per network and node).
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Restart resyncs to time.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

/// A network namespace that is deleted when dropped.
struct Netns(String);

impl Netns {
    fn create(name: &str) -> Result<Netns> {
        run("ip", &["netns", "add", name])?;
        Ok(Netns(name.to_string()))
    }
    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
    fn exec(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", &self.0];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

const LOCAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

fn remote_node(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250 + 1) as u8))
}

fn mac(i: usize) -> String {
    format!(
        "fa:16:3e:{:02x}:{:02x}:{:02x}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

fn view(a: &ResyncArgs) -> NodeView {
    let mut v = NodeView {
        underlay_ip: Some(IpAddr::V4(LOCAL)),
        ..Default::default()
    };
    for n in 0..a.networks {
        let id = format!("net-{n}");
        v.networks.insert(
            id.clone(),
            NetworkInfo {
                id: id.clone(),
                vni: 5000 + n as u32,
                mtu: 1450,
            },
        );
        v.local_ports.push(LocalPort {
            id: format!("local-{n:08}"),
            network_id: id,
            mac: mac(0xf00000 + n),
            kind: PortKind::Veth,
        });
    }
    for p in 0..a.ports {
        v.remote_ports.push(RemotePort {
            id: format!("remote-{p}"),
            network_id: format!("net-{}", p % a.networks),
            mac: mac(p),
            node_ip: remote_node(p % a.nodes),
        });
    }
    v
}

/// The same devices, and the same forwarding entries through `bridge -batch`, by hand.
fn reference(ns: &Netns, want: &Datapath) -> Result<f64> {
    let mut links = String::new();
    for b in want.bridges.values() {
        links.push_str(&format!(
            "link add {} type bridge\nlink set {} mtu {} up\n",
            b.name, b.name, b.mtu
        ));
    }
    for v in want.vxlans.values() {
        links.push_str(&format!(
            "link add {} type vxlan id {} local {} dstport 4789 nolearning\nlink set {} master {} mtu {} up\n",
            v.name, v.vni, v.local, v.name, v.bridge, v.mtu
        ));
    }
    let mut fdb = String::new();
    for f in &want.fdb {
        fdb.push_str(&format!(
            "fdb append {} dev {} dst {} self permanent\n",
            f.mac, f.dev, f.dst
        ));
    }
    let started = Instant::now();
    batch(ns, "ip", &links)?;
    batch(ns, "bridge", &fdb)?;
    Ok(started.elapsed().as_secs_f64())
}

fn batch(ns: &Netns, tool: &str, input: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, tool, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {tool} -batch"))?;
    child.stdin.take().context("batch stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{tool} -batch failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn underlay(ns: &Netns) -> Result<()> {
    // An address for the VXLAN devices' source, on a link of this namespace only.
    ns.exec(&["ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1"])?;
    ns.exec(&["ip", "addr", "add", "192.0.2.1/24", "dev", "u0"])?;
    ns.exec(&["ip", "link", "set", "u0", "up"])?;
    ns.exec(&["ip", "link", "set", "u1", "up"])
}

pub async fn run_bench(a: &ResyncArgs) -> Result<()> {
    if a.networks == 0 || a.nodes == 0 {
        bail!("--networks and --nodes must be at least 1");
    }
    let pid = std::process::id();
    let v = view(a);
    let t = Instant::now();
    let want = compute(&v);
    let compute_s = t.elapsed().as_secs_f64();
    println!(
        "view: {} remote ports, {} networks, {} remote nodes -> {} bridges, {} vxlan devices, {} fdb entries (computed in {:.1} ms)",
        a.ports,
        a.networks,
        a.nodes,
        want.bridges.len(),
        want.vxlans.len(),
        want.fdb.len(),
        compute_s * 1000.0
    );

    // Reference first, in its own namespace.
    let ref_ns = Netns::create(&format!("isbench-ref-{pid}"))?;
    underlay(&ref_ns)?;
    let ref_s = reference(&ref_ns, &want)?;
    drop(ref_ns);

    let ns = Netns::create(&format!("isbench-agent-{pid}"))?;
    underlay(&ns)?;
    let kernel = NetlinkKernel::in_netns(ns.path()).await?;
    let t = Instant::now();
    let first = reconcile(&kernel, &want).await?;
    let first_s = t.elapsed().as_secs_f64();
    if !first.ok() {
        bail!("initial sync failed: {first:?}");
    }
    let mut resyncs = vec![];
    for _ in 0..a.repeats.max(1) {
        // A restarted agent: a new kernel handle, a fresh observation, an empty plan expected.
        let k = NetlinkKernel::in_netns(ns.path()).await?;
        let t = Instant::now();
        let r = reconcile(&k, &want).await?;
        resyncs.push(t.elapsed().as_secs_f64());
        if r.planned != 0 {
            bail!("resync on a converged node planned {} actions", r.planned);
        }
    }
    resyncs.sort_by(|x, y| x.total_cmp(y));
    let median = resyncs[resyncs.len() / 2];
    let worst = resyncs[resyncs.len() - 1];
    println!();
    println!("{:<52} {:>10}", "what", "seconds");
    println!(
        "{:<52} {:>10.3}",
        "reference: ip -batch + bridge -batch, initial program", ref_s
    );
    println!(
        "{:<52} {:>10.3}",
        format!("isthmus: initial sync ({} actions)", first.applied),
        first_s
    );
    println!("{:<52} {:>10.3}", "isthmus: restart resync, median (0 actions)", median);
    println!("{:<52} {:>10.3}", "isthmus: restart resync, worst", worst);
    println!(
        "{}",
        serde_json::json!({"benchmark": "agent.resync", "ports": a.ports, "networks": a.networks, "nodes": a.nodes,
            "fdb_entries": want.fdb.len(), "compute_s": compute_s, "reference_initial_s": ref_s,
            "initial_s": first_s, "resync_median_s": median, "resync_worst_s": worst, "repeats": resyncs.len()})
    );
    Ok(())
}
