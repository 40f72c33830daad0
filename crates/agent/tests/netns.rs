//! The real datapath in real network namespaces. Needs root: without it these tests fail (they
//! do not skip), since CI runs them as root.
//!
//! Each test makes its own uniquely named namespaces: "node" namespaces joined by a veth
//! underlay (192.0.2.0/24), and workload namespaces attached through the agent's kernel layer.
//! Traffic stays inside them. A guard deletes every namespace even when a test fails, which
//! also removes every device the test made (none is made in the root namespace).

use isthmus_agent::desired::{compute, Datapath};
use isthmus_agent::kernel::{Kernel, MacAddr, NetlinkKernel, PortDevices, VethAttach};
use isthmus_agent::reconcile::{reconcile, Report};
use isthmus_agent::view::{LocalPort, NetworkInfo, NodeView, PortKind, RemotePort};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;
use support::*;

mod support;

const TEST_TIMEOUT: Duration = Duration::from_secs(45);
const MTU: u32 = 1450;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// One tenant network, one workload on each of two nodes.
struct Net {
    id: &'static str,
    vni: u32,
    /// (port id, MAC, address) on node 1 and node 2.
    ports: [(&'static str, &'static str, &'static str); 2],
}

const NET_A: Net = Net {
    id: "net-a",
    vni: 100,
    ports: [
        ("port-a1", "fa:16:3e:00:01:01", "10.0.0.1"),
        ("port-a2", "fa:16:3e:00:01:02", "10.0.0.2"),
    ],
};
// Same CIDR as NET_A on purpose: only the VNI keeps them apart.
const NET_B: Net = Net {
    id: "net-b",
    vni: 200,
    ports: [
        ("port-b1", "fa:16:3e:00:02:03", "10.0.0.3"),
        ("port-b2", "fa:16:3e:00:02:04", "10.0.0.4"),
    ],
};

const UNDERLAY: [&str; 2] = ["192.0.2.1", "192.0.2.2"];

/// What node `i` (0 or 1) must have for `nets`.
fn view(i: usize, nets: &[&Net]) -> Datapath {
    let mut v = NodeView {
        underlay_ip: Some(ip(UNDERLAY[i])),
        ..Default::default()
    };
    for n in nets {
        v.networks.insert(
            n.id.into(),
            NetworkInfo {
                id: n.id.into(),
                vni: n.vni,
                mtu: MTU,
            },
        );
        let (id, mac, _) = n.ports[i];
        v.local_ports.push(LocalPort {
            id: id.into(),
            network_id: n.id.into(),
            mac: mac.into(),
            kind: PortKind::Veth,
        });
        let (id, mac, _) = n.ports[1 - i];
        v.remote_ports.push(RemotePort {
            id: id.into(),
            network_id: n.id.into(),
            mac: mac.into(),
            node_ip: ip(UNDERLAY[1 - i]),
        });
    }
    compute(&v)
}

struct Node {
    ns: Ns,
    kernel: NetlinkKernel,
}

/// Two node namespaces joined by a veth underlay.
async fn two_nodes() -> [Node; 2] {
    let a = Ns::new();
    let b = Ns::new();
    a.ip(&[
        "link", "add", "und0", "type", "veth", "peer", "name", "und0", "netns", &b.name,
    ]);
    for (ns, addr) in [(&a, UNDERLAY[0]), (&b, UNDERLAY[1])] {
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "und0"]);
        ns.ip(&["link", "set", "und0", "up"]);
    }
    let ka = NetlinkKernel::in_netns(a.path()).await.expect("kernel in node a");
    let kb = NetlinkKernel::in_netns(b.path()).await.expect("kernel in node b");
    [Node { ns: a, kernel: ka }, Node { ns: b, kernel: kb }]
}

async fn converge(kernel: &NetlinkKernel, want: &Datapath) -> Report {
    let r = reconcile(kernel, want).await.expect("reconcile");
    assert!(r.ok(), "reconcile failed: {:?}", r.failed);
    r
}

/// Attaches workload `i` of `net` to node `i`; returns the workload namespace.
async fn attach(node: &Node, i: usize, net: &Net, want: &Datapath) -> Ns {
    let wl = Ns::new();
    let (id, mac, addr) = net.ports[i];
    let port = want
        .ports
        .get(&isthmus_agent::names::tap(id))
        .unwrap_or_else(|| panic!("{id} not in desired ports"))
        .clone();
    let req = VethAttach {
        port,
        mac: mac.parse::<MacAddr>().unwrap(),
        netns: wl.path(),
        ifname: "eth0".into(),
        addresses: vec![format!("{addr}/24").parse().unwrap()],
        gateway: None,
        routes: vec![],
        mtu: MTU,
    };
    node.kernel.attach_veth(&req).await.expect("attach_veth");
    wl
}

/// Nodes with NET_A converged and one workload each.
async fn net_a_setup() -> ([Node; 2], [Ns; 2]) {
    let nodes = two_nodes().await;
    let mut wls = vec![];
    for (i, node) in nodes.iter().enumerate() {
        let want = view(i, &[&NET_A]);
        let r = converge(&node.kernel, &want).await;
        // Bridge, VXLAN device, unicast and flood entries; ports come from attach.
        assert_eq!(r.applied, 4, "{r:?}");
        wls.push(attach(node, i, &NET_A, &want).await);
    }
    let [w0, w1]: [Ns; 2] = wls.try_into().unwrap_or_else(|_| unreachable!());
    (nodes, [w0, w1])
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f).await.expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_on_two_nodes_talk_over_vxlan_and_vnis_are_isolated() {
    require_root();
    bounded(async {
        let (nodes, [wa1, wa2]) = net_a_setup().await;
        let (a1, a2) = (NET_A.ports[0].2, NET_A.ports[1].2);
        assert!(reaches(&wa1, a1, &wa2, a2), "VNI 100 workloads cannot talk");
        assert!(reaches(&wa2, a2, &wa1, a1), "VNI 100 workloads cannot talk back");

        // A second network with the same CIDR on the same nodes.
        let mut wbs = vec![];
        for (i, node) in nodes.iter().enumerate() {
            let want = view(i, &[&NET_A, &NET_B]);
            let r = converge(&node.kernel, &want).await;
            assert_eq!(r.applied, 4, "only VNI 200's devices and entries are new: {r:?}");
            wbs.push(attach(node, i, &NET_B, &want).await);
        }
        let (wb1, wb2) = (&wbs[0], &wbs[1]);
        let (b1, b2) = (NET_B.ports[0].2, NET_B.ports[1].2);
        assert!(reaches(wb1, b1, wb2, b2), "VNI 200 workloads cannot talk (control)");
        for (src, from, dst, to, what) in [
            (wb1, b1, &wa2, a2, "VNI 200 reached VNI 100 on the other node"),
            (wb1, b1, &wa1, a1, "VNI 200 reached VNI 100 on the same node"),
            (&wa1, a1, wb2, b2, "VNI 100 reached VNI 200 on the other node"),
        ] {
            let (got, seen) = echo(src, from, dst, to, 64);
            assert!(!got && seen == 0, "{what} (echo {got}, {seen} datagrams seen)");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_is_idempotent_and_adopts_what_exists() {
    require_root();
    bounded(async {
        let (nodes, _wls) = net_a_setup().await;
        let node = &nodes[0];
        let want = view(0, &[&NET_A]);
        let before = (node.ns.ifindex("isbr-100"), node.ns.ifindex("isvx-100"));
        let r = converge(&node.kernel, &want).await;
        assert_eq!(r, Report::default(), "a converged node must need nothing");
        // A fresh kernel handle (like a restarted agent) adopts rather than rebuilds.
        let restarted = NetlinkKernel::in_netns(node.ns.path()).await.unwrap();
        let observed = restarted.observe().await.unwrap();
        assert_eq!(observed, want, "observed state differs from desired");
        let r = reconcile(&restarted, &want).await.unwrap();
        assert_eq!(r, Report::default());
        assert_eq!((node.ns.ifindex("isbr-100"), node.ns.ifindex("isvx-100")), before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_repaired_exactly() {
    require_root();
    bounded(async {
        let (nodes, [wa1, wa2]) = net_a_setup().await;
        let node = &nodes[0];
        let want = view(0, &[&NET_A]);
        let (a1, a2) = (NET_A.ports[0].2, NET_A.ports[1].2);
        assert!(reaches(&wa1, a1, &wa2, a2));
        let vx = node.ns.ifindex("isvx-100");

        // The bridge deleted by hand: traffic stops, reconcile puts back the bridge and
        // re-enslaves the VXLAN device and the port, without rebuilding them.
        node.ns.ip(&["link", "del", "isbr-100"]);
        assert!(!reaches(&wa1, a1, &wa2, a2), "traffic flowed without the bridge");
        let r = converge(&node.kernel, &want).await;
        assert_eq!(r.applied, 3, "{r:?}");
        assert_eq!(node.ns.ifindex("isvx-100"), vx, "VXLAN device was rebuilt");
        assert!(node.ns.link("isvx-100").unwrap().contains("master isbr-100"));
        let tap = isthmus_agent::names::tap(NET_A.ports[0].0);
        assert!(node.ns.link(&tap).unwrap().contains("master isbr-100"));
        assert!(reaches(&wa1, a1, &wa2, a2), "traffic did not come back");

        // A forwarding entry deleted by hand: exactly that entry comes back.
        let peer_mac = NET_A.ports[1].1;
        must(&[
            "bridge",
            "-n",
            &node.ns.name,
            "fdb",
            "del",
            peer_mac,
            "dev",
            "isvx-100",
            "dst",
            UNDERLAY[1],
        ]);
        let entry = format!("{peer_mac} dst {}", UNDERLAY[1]);
        assert!(!node.ns.fdb("isvx-100").contains(&entry));
        let r = reconcile(&node.kernel, &want).await.unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.planned, 1, "{r:?}");
        let fdb = node.ns.fdb("isvx-100");
        assert!(fdb.contains(&entry), "{fdb}");
        assert_eq!(reconcile(&node.kernel, &want).await.unwrap(), Report::default());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_go_foreign_devices_stay_and_misbuilt_devices_are_rebuilt() {
    require_root();
    bounded(async {
        let ns = Ns::new();
        // Ours but not desired.
        ns.ip(&["link", "add", "isbr-999", "type", "bridge"]);
        ns.ip(&[
            "link",
            "add",
            "isvx-999",
            "type",
            "vxlan",
            "id",
            "999",
            "dstport",
            "4789",
            "nolearning",
        ]);
        ns.ip(&["link", "set", "isvx-999", "master", "isbr-999"]);
        // Someone else's, including tap-named devices outside our bridges.
        ns.ip(&["link", "add", "br-other", "type", "bridge"]);
        // (This kernel has no dummy devices; veth pairs stand in.)
        ns.ip(&["link", "add", "tapforeign", "type", "veth", "peer", "name", "xforeign"]);
        ns.ip(&["link", "add", "tapother", "type", "veth", "peer", "name", "xother"]);
        ns.ip(&["link", "set", "tapother", "master", "br-other"]);
        // Desired names, wrong make: a veth where our bridge goes, a learning VXLAN device.
        ns.ip(&["link", "add", "isbr-100", "type", "veth", "peer", "name", "xbr"]);
        ns.ip(&[
            "link",
            "add",
            "isvx-100",
            "type",
            "vxlan",
            "id",
            "100",
            "dstport",
            "4789",
            "local",
            "192.0.2.1",
        ]);

        let kernel = NetlinkKernel::in_netns(ns.path()).await.unwrap();
        let want = view(0, &[&NET_A]);
        let r = reconcile(&kernel, &want).await.unwrap();
        assert!(r.ok(), "{r:?}");
        for gone in ["isbr-999", "isvx-999"] {
            assert!(ns.link(gone).is_none(), "{gone} was left behind");
        }
        for kept in ["br-other", "tapforeign", "tapother"] {
            assert!(ns.link(kept).is_some(), "{kept} was removed");
        }
        assert!(ns.link("tapother").unwrap().contains("master br-other"));
        let br = ns.link("isbr-100").unwrap();
        assert!(br.contains("bridge forward_delay"), "isbr-100 is not a bridge: {br}");
        let vx = ns.link("isvx-100").unwrap();
        assert!(vx.contains("nolearning") && vx.contains("master isbr-100"), "{vx}");
        assert_eq!(reconcile(&kernel, &want).await.unwrap(), Report::default());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtu_is_1450_end_to_end() {
    require_root();
    bounded(async {
        let (nodes, [wa1, wa2]) = net_a_setup().await;
        let tap = isthmus_agent::names::tap(NET_A.ports[0].0);
        for dev in ["isbr-100", "isvx-100", tap.as_str()] {
            assert_eq!(nodes[0].ns.mtu(dev), MTU, "{dev}");
        }
        assert_eq!(wa1.mtu("eth0"), MTU);
        let (a1, a2) = (NET_A.ports[0].2, NET_A.ports[1].2);
        // A full-size datagram (1450 - 20 IP - 8 UDP) crosses the tunnel unfragmented...
        let (got, _) = echo(&wa1, a1, &wa2, a2, MTU as usize - 28);
        assert!(got, "a full-MTU datagram did not cross the tunnel");
        // ...and one byte more does not even leave the workload with DF set.
        let client = udp_in(&wa1, SocketAddr::new(a1.parse().unwrap(), 0));
        let pmtu_do: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: setsockopt with a pointer to a live c_int of the right size.
        let rc = unsafe {
            libc::setsockopt(
                client.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                &pmtu_do as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let too_big = vec![0u8; MTU as usize - 27];
        let err = client
            .send_to(&too_big, SocketAddr::new(a2.parse().unwrap(), 9))
            .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EMSGSIZE), "{err}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_tap_ports_are_created_adopted_and_removed() {
    require_root();
    bounded(async {
        let ns = Ns::new();
        let kernel = NetlinkKernel::in_netns(ns.path()).await.unwrap();
        let mut v = NodeView {
            underlay_ip: Some(ip(UNDERLAY[0])),
            ..Default::default()
        };
        v.networks.insert(
            "n".into(),
            NetworkInfo {
                id: "n".into(),
                vni: 300,
                mtu: MTU,
            },
        );
        v.local_ports.push(LocalPort {
            id: "vm-port-0001".into(),
            network_id: "n".into(),
            mac: "fa:16:3e:00:03:01".into(),
            kind: PortKind::Tap,
        });
        let want = compute(&v);
        converge(&kernel, &want).await;
        let port = want.ports.values().next().unwrap().clone();
        let mac: MacAddr = "fe:16:3e:00:03:01".parse().unwrap();
        kernel.create_tap(&port, Some(mac)).await.expect("create_tap");
        let link = ns.link(&port.name).unwrap();
        assert!(
            link.contains("tun type tap") && link.contains("master isbr-300"),
            "{link}"
        );
        assert!(link.contains(&mac.to_string()), "{link}");
        assert_eq!(ns.mtu(&port.name), MTU);
        assert_eq!(kernel.observe().await.unwrap(), want);
        assert_eq!(reconcile(&kernel, &want).await.unwrap(), Report::default());

        // The port goes away from the view: its device, then the network's devices go.
        v.local_ports.clear();
        let r = reconcile(&kernel, &compute(&v)).await.unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.applied, 3, "{r:?}");
        assert!(ns.link(&port.name).is_none());
        assert!(!ns.try_ip(&["link", "show", "isbr-300"]));
        // Detaching what is already gone is fine.
        kernel.detach(&port.name).await.unwrap();
    })
    .await;
}
