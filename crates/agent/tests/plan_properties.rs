//! Property tests of the planner against the fake kernel: from any state the agent may find,
//! applying `plan(actual, desired)` yields `desired`, and a converged node plans nothing.

use isthmus_agent::desired::{Bridge, Datapath, Fdb, MacAddr, PortDevice, Vxlan, FLOOD_MAC};
use isthmus_agent::kernel::{FakeKernel, Kernel, PortDevices, VethAttach};
use isthmus_agent::plan::{plan, plan_l2, plan_ports, Action};
use isthmus_agent::reconcile::reconcile;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::net::IpAddr;

const LOCALS: [&str; 2] = ["192.0.2.1", "192.0.2.7"];
const REMOTES: [&str; 3] = ["192.0.2.2", "192.0.2.3", "2001:db8::4"];
const MTUS: [u32; 3] = [1400, 1450, 1500];

/// Raw choices, turned into a consistent datapath (entries only on devices that exist, ports
/// only in bridges that exist).
type Raw = (
    BTreeMap<u32, (usize, usize)>,
    Vec<(u32, u8, usize)>,
    Vec<(u8, u32, usize, bool)>,
);

fn build((nets, fdbs, ports): Raw) -> Datapath {
    let mut d = Datapath::default();
    for (vni, (mtu, local)) in &nets {
        let br = format!("isbr-{vni}");
        d.bridges.insert(
            br.clone(),
            Bridge {
                name: br.clone(),
                mtu: MTUS[*mtu],
            },
        );
        d.vxlans.insert(
            format!("isvx-{vni}"),
            Vxlan {
                name: format!("isvx-{vni}"),
                vni: *vni,
                local: LOCALS[*local].parse().unwrap(),
                bridge: br,
                mtu: MTUS[*mtu],
            },
        );
    }
    for (vni, mac, dst) in fdbs {
        if nets.contains_key(&vni) {
            let mac = if mac == 0 {
                FLOOD_MAC.to_string()
            } else {
                format!("fa:16:3e:00:00:{mac:02x}")
            };
            d.fdb.insert(Fdb {
                dev: format!("isvx-{vni}"),
                mac,
                dst: REMOTES[dst].parse::<IpAddr>().unwrap(),
            });
        }
    }
    for (n, vni, mtu, veth) in ports {
        if nets.contains_key(&vni) {
            let name = format!("tapprop{n}");
            d.ports.insert(
                name.clone(),
                PortDevice {
                    name,
                    bridge: format!("isbr-{vni}"),
                    mtu: MTUS[mtu],
                    veth,
                },
            );
        }
    }
    d
}

fn datapath() -> impl Strategy<Value = Datapath> {
    (
        prop::collection::btree_map(1u32..6, (0usize..3, 0usize..2), 0..4),
        prop::collection::vec((1u32..6, 0u8..6, 0usize..3), 0..14),
        prop::collection::vec((0u8..5, 1u32..6, 0usize..3, any::<bool>()), 0..5),
    )
        .prop_map(build)
}

/// A fake kernel holding exactly `state` (devices made the way the agent makes them).
fn kernel_with(state: &Datapath) -> FakeKernel {
    futures::executor::block_on(async {
        let k = FakeKernel::new();
        let mut l2 = state.clone();
        l2.ports.clear();
        for a in plan(&Datapath::default(), &l2) {
            k.apply(&a).await.expect("setting up");
        }
        for p in state.ports.values() {
            if p.veth {
                k.attach_veth(&VethAttach {
                    port: p.clone(),
                    mac: MacAddr([0xfa, 0x16, 0x3e, 0, 0, 1]),
                    netns: "/proc/self/ns/net".into(),
                    ifname: "eth0".into(),
                    addresses: vec![],
                    gateway: None,
                    routes: vec![],
                    mtu: p.mtu,
                })
                .await
                .expect("setting up a veth");
            } else {
                k.apply_port(&Action::CreateTap(p.clone(), None))
                    .await
                    .expect("setting up a tap");
            }
        }
        assert_eq!(k.state(), *state, "the fake was set up as asked");
        k
    })
}

fn taps_of(d: &Datapath) -> BTreeMap<String, Option<MacAddr>> {
    d.ports
        .values()
        .filter(|p| !p.veth)
        .map(|p| (p.name.clone(), None))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// One reconcile pass (the combined plan, as `reconcile` applies it) takes any state to the
    /// desired L2 state, with every desired port device that existed fixed in place and every
    /// other one gone; a second pass plans nothing.
    #[test]
    fn one_pass_reaches_the_desired_state(actual in datapath(), desired in datapath()) {
        let k = kernel_with(&actual);
        let report = futures::executor::block_on(reconcile(&k, &desired)).unwrap();
        prop_assert!(report.ok(), "{:?}", report);
        let got = k.state();
        prop_assert_eq!(&got.bridges, &desired.bridges);
        prop_assert_eq!(&got.vxlans, &desired.vxlans);
        prop_assert_eq!(&got.fdb, &desired.fdb);
        for (name, p) in &got.ports {
            let want = desired.ports.get(name);
            prop_assert!(want.is_some(), "{} should be gone", name);
            let want = want.unwrap();
            prop_assert_eq!((&p.bridge, p.mtu), (&want.bridge, want.mtu));
        }
        for name in desired.ports.keys() {
            prop_assert_eq!(got.ports.contains_key(name), actual.ports.contains_key(name));
        }
        prop_assert!(plan(&got, &desired).is_empty());
    }

    /// The two controllers' plans, applied one after the other (L2, then ports with the VM taps
    /// to create), reach the desired state, veths aside (only an attach makes those).
    #[test]
    fn l2_then_ports_reach_the_desired_state(actual in datapath(), desired in datapath()) {
        let k = kernel_with(&actual);
        futures::executor::block_on(async {
            for a in plan_l2(&k.state(), &desired) {
                k.apply(&a).await.unwrap();
            }
            let taps = taps_of(&desired);
            for a in plan_ports(&k.state().ports, &desired.ports, &taps) {
                k.apply(&a).await.unwrap();
            }
        });
        let got = k.state();
        let mut want = desired.clone();
        // A veth exists only if some device of that name did (the planner keeps a device
        // whatever its kind; an attach replaces it).
        want.ports.retain(|name, p| !p.veth || actual.ports.contains_key(name));
        prop_assert_eq!(&got.bridges, &want.bridges);
        prop_assert_eq!(&got.vxlans, &want.vxlans);
        prop_assert_eq!(&got.fdb, &want.fdb);
        prop_assert_eq!(
            got.ports.iter().map(|(n, p)| (n.clone(), p.bridge.clone(), p.mtu)).collect::<Vec<_>>(),
            want.ports.iter().map(|(n, p)| (n.clone(), p.bridge.clone(), p.mtu)).collect::<Vec<_>>()
        );
    }

    /// A converged node needs nothing, whichever planner looks.
    #[test]
    fn a_converged_node_plans_nothing(d in datapath()) {
        prop_assert!(plan(&d, &d).is_empty());
        prop_assert!(plan_l2(&d, &d).is_empty());
        prop_assert!(plan_ports(&d.ports, &d.ports, &taps_of(&d)).is_empty());
    }
}
