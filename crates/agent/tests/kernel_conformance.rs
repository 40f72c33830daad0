//! One conformance suite for every kernel backend: each check runs against the fake kernel (no
//! root) and against the real one (netlink and nft inside a fresh network namespace, root). A
//! fake that passes these behaves like the kernel where the agent's controllers can tell.
//!
//! Property tests for the planner live next to it (`plan(actual, desired)` applied to the fake
//! gives `desired`; `plan(desired, desired)` is empty): `src/plan.rs`.

mod support;

use isthmus_agent::desired::{Bridge, Datapath, Fdb, MacAddr, PortDevice, Vxlan, FLOOD_MAC};
use isthmus_agent::kernel::{FakeKernel, Kernel, KernelError, Links, NetlinkKernel, VethAttach};
use isthmus_agent::plan::{plan_l2, plan_ports, Action};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;
use support::{require_root, Ns};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const LOCAL: &str = "192.0.2.1";

fn bridge(vni: u32, mtu: u32) -> Bridge {
    Bridge {
        name: format!("isbr-{vni}"),
        mtu,
    }
}

fn vxlan(vni: u32, mtu: u32) -> Vxlan {
    Vxlan {
        name: format!("isvx-{vni}"),
        vni,
        local: ip(LOCAL),
        bridge: format!("isbr-{vni}"),
        mtu,
    }
}

fn fdb(vni: u32, mac: &str, dst: &str) -> Fdb {
    Fdb {
        dev: format!("isvx-{vni}"),
        mac: mac.into(),
        dst: ip(dst),
    }
}

/// Two networks, remote MACs and flood entries to two nodes.
fn l2_desired() -> Datapath {
    let mut d = Datapath::default();
    for (vni, mtu) in [(101, 1450), (102, 1400)] {
        d.bridges.insert(format!("isbr-{vni}"), bridge(vni, mtu));
        d.vxlans.insert(format!("isvx-{vni}"), vxlan(vni, mtu));
    }
    for f in [
        fdb(101, "fa:16:3e:00:01:01", "192.0.2.2"),
        fdb(101, "fa:16:3e:00:01:02", "192.0.2.3"),
        fdb(101, FLOOD_MAC, "192.0.2.2"),
        fdb(101, FLOOD_MAC, "192.0.2.3"),
        fdb(102, "fa:16:3e:00:02:01", "192.0.2.2"),
        fdb(102, FLOOD_MAC, "192.0.2.2"),
    ] {
        d.fdb.insert(f);
    }
    d
}

async fn converge_l2<K: Links>(k: &K, want: &Datapath) {
    let actual = k.observe_l2().await.expect("observe");
    let actions = plan_l2(&actual, want);
    let (fdb, devices): (Vec<Action>, Vec<Action>) = actions.into_iter().partition(Action::is_fdb);
    for a in &devices {
        // Creations first, removals last: as the plan orders them.
        if !matches!(a, Action::DeleteVxlan(_) | Action::DeleteBridge(_)) {
            k.apply_l2(a).await.unwrap_or_else(|e| panic!("{a:?}: {e}"));
        }
    }
    for (a, r) in fdb.iter().zip(k.apply_fdb(&fdb).await) {
        r.unwrap_or_else(|e| panic!("{a:?}: {e}"));
    }
    for a in devices
        .iter()
        .filter(|a| matches!(a, Action::DeleteVxlan(_) | Action::DeleteBridge(_)))
    {
        k.apply_l2(a).await.unwrap_or_else(|e| panic!("{a:?}: {e}"));
    }
}

/// What a check gets: the backend, and a way to make workload namespaces it can plug into.
struct Bed<K> {
    kernel: K,
    /// Keeps the node namespace (real backend) alive.
    _node: Option<Ns>,
    workloads: Vec<Ns>,
}

impl<K> Bed<K> {
    fn workload(&mut self) -> PathBuf {
        let ns = Ns::new();
        let p = ns.path();
        self.workloads.push(ns);
        p
    }
}

async fn fake() -> Bed<FakeKernel> {
    Bed {
        kernel: FakeKernel::new(),
        _node: None,
        workloads: vec![],
    }
}

async fn real() -> Bed<NetlinkKernel> {
    require_root();
    let node = Ns::new();
    // The VXLAN devices' source address must exist in the namespace.
    node.ip(&["link", "add", "und0", "type", "veth", "peer", "name", "und1"]);
    node.ip(&["addr", "add", &format!("{LOCAL}/24"), "dev", "und0"]);
    node.ip(&["link", "set", "und0", "up"]);
    let kernel = NetlinkKernel::in_netns(node.path())
        .await
        .expect("netlink in the node namespace");
    Bed {
        kernel,
        _node: Some(node),
        workloads: vec![],
    }
}

async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("conformance check timed out");
}

// ---- the checks, generic over the backend ----

/// L2 state converges to what was asked, reads back equal, and then plans nothing.
async fn l2_converges_and_reads_back<K: Kernel>(bed: Bed<K>) {
    let k = &bed.kernel;
    assert_eq!(
        k.observe_l2().await.unwrap(),
        Datapath::default(),
        "a fresh node has none of our devices"
    );
    let want = l2_desired();
    converge_l2(k, &want).await;
    let got = k.observe_l2().await.unwrap();
    assert_eq!(got, want);
    assert!(plan_l2(&got, &want).is_empty());
    // Applying what exists again is harmless (idempotent actions).
    for a in plan_l2(&Datapath::default(), &want) {
        k.apply_l2(&a).await.unwrap_or_else(|e| panic!("again {a:?}: {e}"));
    }
    assert_eq!(k.observe_l2().await.unwrap(), want);
}

/// What is no longer wanted goes: entries, then devices; a changed MTU and a changed tunnel
/// source are repaired; a rebuilt VXLAN device gets its entries back.
async fn l2_repairs_and_removes<K: Kernel>(bed: Bed<K>) {
    let k = &bed.kernel;
    let mut want = l2_desired();
    converge_l2(k, &want).await;
    want.fdb.retain(|f| f.dst != ip("192.0.2.3"));
    if let Some(b) = want.bridges.get_mut("isbr-102") {
        b.mtu = 1300;
    }
    if let Some(v) = want.vxlans.get_mut("isvx-102") {
        v.mtu = 1300;
    }
    converge_l2(k, &want).await;
    assert_eq!(k.observe_l2().await.unwrap(), want);
    want.bridges.remove("isbr-101");
    want.vxlans.remove("isvx-101");
    want.fdb.retain(|f| f.dev != "isvx-101");
    converge_l2(k, &want).await;
    assert_eq!(k.observe_l2().await.unwrap(), want);
    converge_l2(k, &Datapath::default()).await;
    assert_eq!(k.observe_l2().await.unwrap(), Datapath::default());
}

/// Bulk forwarding-entry changes answer per entry: one on a missing device fails, the others
/// land; deleting what is gone succeeds.
async fn fdb_bulk_reports_each_entry<K: Kernel>(bed: Bed<K>) {
    let k = &bed.kernel;
    let mut want = l2_desired();
    want.fdb.clear();
    converge_l2(k, &want).await;
    let good = fdb(101, "fa:16:3e:00:09:01", "192.0.2.9");
    let missing = fdb(999, "fa:16:3e:00:09:02", "192.0.2.9");
    let gone = fdb(102, "fa:16:3e:00:09:03", "192.0.2.9");
    let res = k
        .apply_fdb(&[
            Action::AddFdb(good.clone()),
            Action::AddFdb(missing),
            Action::DelFdb(gone),
        ])
        .await;
    assert!(res[0].is_ok(), "{res:?}");
    assert!(res[1].is_err(), "an entry on a missing device: {res:?}");
    assert!(res[2].is_ok(), "deleting an absent entry: {res:?}");
    let got = k.observe_l2().await.unwrap();
    assert_eq!(got.fdb.into_iter().collect::<Vec<_>>(), vec![good]);
}

/// Taps: created in their bridge, moved, deleted; detaching what is gone is fine.
async fn tap_devices<K: Kernel>(bed: Bed<K>) {
    let k = &bed.kernel;
    let mut want = l2_desired();
    want.fdb.clear();
    converge_l2(k, &want).await;
    let tap = PortDevice {
        name: "tapconform01".into(),
        bridge: "isbr-101".into(),
        mtu: 1450,
        veth: false,
    };
    let mac: MacAddr = "fe:16:3e:00:07:01".parse().unwrap();
    let desired: BTreeMap<String, PortDevice> = [(tap.name.clone(), tap.clone())].into();
    let taps = [(tap.name.clone(), Some(mac))].into();
    let actual = k.observe_ports().await.unwrap();
    let actions = plan_ports(&actual, &desired, &taps);
    assert_eq!(actions, vec![Action::CreateTap(tap.clone(), Some(mac))]);
    for a in &actions {
        k.apply_port(a).await.unwrap_or_else(|e| panic!("{a:?}: {e}"));
    }
    assert_eq!(k.observe_ports().await.unwrap(), desired);
    assert!(plan_ports(&k.observe_ports().await.unwrap(), &desired, &taps).is_empty());
    // A DHCP socket opens on it; none on a device that does not exist.
    assert!(k.dhcp_socket(&tap.name).await.is_ok());
    assert!(k.dhcp_socket("tapnosuchdev0").await.is_err());
    // Moved to the other network's bridge with its MTU.
    let moved = PortDevice {
        bridge: "isbr-102".into(),
        mtu: 1400,
        ..tap.clone()
    };
    let desired2: BTreeMap<String, PortDevice> = [(moved.name.clone(), moved.clone())].into();
    let actions = plan_ports(&k.observe_ports().await.unwrap(), &desired2, &taps);
    assert_eq!(actions, vec![Action::FixPort(moved.clone())]);
    k.apply_port(&actions[0]).await.unwrap();
    assert_eq!(k.observe_ports().await.unwrap(), desired2);
    // Not wanted any more: deleted.
    let actions = plan_ports(&k.observe_ports().await.unwrap(), &BTreeMap::new(), &BTreeMap::new());
    assert_eq!(actions, vec![Action::DeletePort(tap.name.clone())]);
    k.apply_port(&actions[0]).await.unwrap();
    assert!(k.observe_ports().await.unwrap().is_empty());
    k.detach(&tap.name).await.expect("detaching a gone device is fine");
}

/// A container's veth: plugged into its bridge, seen from inside the workload with its MAC and
/// addresses, and gone (both ends) after detach.
async fn veth_attach_inspect_detach<K: Kernel>(mut bed: Bed<K>) {
    let mut want = l2_desired();
    want.fdb.clear();
    converge_l2(&bed.kernel, &want).await;
    let netns = bed.workload();
    let other = bed.workload();
    let k = &bed.kernel;
    let port = PortDevice {
        name: "tapconform02".into(),
        bridge: "isbr-101".into(),
        mtu: 1450,
        veth: true,
    };
    let req = VethAttach {
        port: port.clone(),
        mac: "fa:16:3e:00:07:02".parse().unwrap(),
        netns: netns.clone(),
        ifname: "eth0".into(),
        addresses: vec!["10.7.0.5/24".parse().unwrap()],
        gateway: Some(ip("10.7.0.1")),
        routes: vec![],
        mtu: 1450,
    };
    k.attach_veth(&req).await.expect("attach");
    assert_eq!(k.observe_ports().await.unwrap().get(&port.name), Some(&port));
    let seen = k.inspect(&netns, "eth0").await.unwrap().expect("eth0 in the workload");
    assert_eq!(seen.mac, req.mac);
    assert!(seen.addresses.contains(&req.addresses[0]), "{seen:?}");
    assert_eq!(k.inspect(&netns, "eth9").await.unwrap(), None);
    // Attached again (a restarted workload): the stale pair is replaced, not an error.
    let again = VethAttach {
        netns: other.clone(),
        ..req.clone()
    };
    k.attach_veth(&again).await.expect("attach over a stale host end");
    assert!(k.inspect(&other, "eth0").await.unwrap().is_some());
    assert_eq!(k.inspect(&netns, "eth0").await.unwrap(), None, "the old pair is gone");
    k.attach_veth(&req).await.expect("and back");
    // Into a bridge that does not exist: refused, nothing left behind.
    let bad = VethAttach {
        port: PortDevice {
            name: "tapconform03".into(),
            bridge: "isbr-999".into(),
            ..port.clone()
        },
        ifname: "eth1".into(),
        ..req.clone()
    };
    assert!(matches!(k.attach_veth(&bad).await, Err(KernelError::NoDevice(_))));
    assert!(!k.observe_ports().await.unwrap().contains_key("tapconform03"));
    k.detach(&port.name).await.unwrap();
    assert!(k.observe_ports().await.unwrap().is_empty());
    assert_eq!(
        k.inspect(&netns, "eth0").await.unwrap(),
        None,
        "the workload end goes with it"
    );
}

/// The firewall tables: absent, installed (twice is fine), removed (twice is fine).
async fn firewall_guard<K: Kernel>(bed: Bed<K>) {
    let k = &bed.kernel;
    let mut want = l2_desired();
    want.fdb.clear();
    converge_l2(k, &want).await;
    let d = isthmus_agent::security::Desired {
        present: true,
        ..Default::default()
    };
    let g = isthmus_agent::security::Generation::first(1);
    assert!(!k.firewall_present().await.unwrap());
    k.apply_firewall(isthmus_agent::security::full(&d, g)).await.unwrap();
    k.apply_firewall(isthmus_agent::security::full(&d, g.next(2)))
        .await
        .unwrap();
    assert!(k.firewall_present().await.unwrap());
    k.apply_firewall(isthmus_agent::security::removal()).await.unwrap();
    assert!(!k.firewall_present().await.unwrap());
    k.apply_firewall(isthmus_agent::security::removal()).await.unwrap();
    assert!(!k.firewall_present().await.unwrap());
}

/// QoS limits on a port device: set, read back (nothing more to plan), changed in place,
/// taken off with the IFB gone; a stray IFB of ours is removed; devices that do not exist
/// are left alone.
async fn qos_limits<K: Kernel>(bed: Bed<K>) {
    use isthmus_agent::shaping::{ifb_of, plan, Desired, PortLimits, QosAction, Rate};
    let k = &bed.kernel;
    let mut want = l2_desired();
    want.fdb.clear();
    converge_l2(k, &want).await;
    let tap = PortDevice {
        name: "tapconformq1".into(),
        bridge: "isbr-101".into(),
        mtu: 1450,
        veth: false,
    };
    k.create_tap(&tap, None).await.unwrap();
    let devices = &vec![tap.name.clone(), "tapnosuchdev0".to_string()];
    let limits = PortLimits {
        to_port: Rate::from_rule(30_000, 1_000),
        from_port: Rate::from_rule(20_000, 0),
    };
    let mut desired: Desired = [(tap.name.clone(), limits), ("tapnosuchdev0".to_string(), limits)].into();
    // A stray IFB of ours (as a crashed agent may leave).
    k.apply_qos(&QosAction::LimitFromPort {
        dev: tap.name.clone(),
        ifb: "ifqstray000001".into(),
        rate: Rate::from_rule(1_000, 0).unwrap(),
    })
    .await
    .unwrap();
    let converge = |desired: Desired| async move {
        for _ in 0..3 {
            let seen = k.observe_qos(devices.clone()).await.unwrap();
            let actions = plan(&seen, &desired);
            if actions.is_empty() {
                return seen;
            }
            for a in &actions {
                k.apply_qos(a).await.unwrap_or_else(|e| panic!("{a:?}: {e}"));
            }
        }
        panic!("QoS limits did not converge");
    };
    let seen = converge(desired.clone()).await;
    assert!(!seen.ports.contains_key("tapnosuchdev0"));
    let got = seen.ports[&tap.name];
    assert!(limits.to_port.unwrap().matches(&got.to_port.unwrap()), "{got:?}");
    assert!(limits.from_port.unwrap().matches(&got.from_port.unwrap()), "{got:?}");
    assert_eq!(seen.ifbs.iter().cloned().collect::<Vec<_>>(), vec![ifb_of(&tap.name)]);
    // A new rate: only that direction changes.
    let faster = PortLimits {
        to_port: Rate::from_rule(50_000, 1_000),
        ..limits
    };
    desired.insert(tap.name.clone(), faster);
    let seen = k.observe_qos(devices.clone()).await.unwrap();
    let actions = plan(&seen, &desired);
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert!(matches!(actions[0], QosAction::LimitToPort { .. }), "{actions:?}");
    converge(desired.clone()).await;
    // Off.
    desired.insert(tap.name.clone(), PortLimits::default());
    let seen = converge(desired).await;
    assert_eq!(seen.ports[&tap.name], PortLimits::default());
    assert!(seen.ifbs.is_empty(), "{:?}", seen.ifbs);
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod on_fake {
            $(
                #[tokio::test]
                async fn $check() {
                    super::bounded(super::$check(super::fake().await)).await;
                }
            )*
        }
        mod on_netlink {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    super::bounded(super::$check(super::real().await)).await;
                }
            )*
        }
    };
}

conformance!(
    l2_converges_and_reads_back,
    l2_repairs_and_removes,
    fdb_bulk_reports_each_entry,
    tap_devices,
    veth_attach_inspect_detach,
    firewall_guard,
    qos_limits,
);
