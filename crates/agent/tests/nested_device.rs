//! `kernel::nested` on this host's kernel, in network namespaces: a "VM" namespace whose NIC is
//! one end of a veth (its peer a "node" namespace), a container namespace, and the macvlan
//! device the CNI plugin's nested mode makes. (This host has no 802.1Q; the VLAN path runs in
//! the test VM, `nested_guest.rs`.) Needs root.

mod support;

use isthmus_agent::kernel::nested::{attach_nested, detach_nested, inspect_nested, NestedAttach, NestedDevice};
use isthmus_agent::kernel::{HostRoute, KernelError, MacAddr};
use support::{in_ns, run, Ns};

fn request(container: &Ns, parent: &str) -> NestedAttach {
    NestedAttach {
        parent: parent.into(),
        device: NestedDevice::Macvlan,
        netns: container.path(),
        ifname: "eth0".into(),
        mac: "fa:16:3e:12:34:56".parse::<MacAddr>().expect("mac"),
        mtu: 1400,
        addresses: vec!["10.84.0.5/24".parse().expect("net")],
        gateway: Some("10.84.0.1".parse().expect("ip")),
        routes: vec![HostRoute {
            destination: "172.16.0.0/12".parse().expect("net"),
            nexthop: "10.84.0.254".parse().expect("ip"),
        }],
    }
}

/// A "VM" namespace with `eth0` (down, MTU 1450; the container's interface gets the same
/// name) whose peer `wire` is in `node`, addressed as the network's gateway.
fn vm_and_node() -> (Ns, Ns) {
    let (vm, node) = (Ns::new(), Ns::new());
    vm.ip(&[
        "link", "add", "eth0", "mtu", "1450", "type", "veth", "peer", "name", "wire",
    ]);
    vm.ip(&["link", "set", "wire", "netns", &node.name]);
    node.ip(&["addr", "add", "10.84.0.1/24", "dev", "wire"]);
    node.ip(&["link", "set", "wire", "up"]);
    (vm, node)
}

#[test]
fn macvlan_device_in_a_container_reaches_the_vms_network() {
    support::require_root();
    let (vm, node) = vm_and_node();
    let container = Ns::new();
    let req = request(&container, "eth0");
    in_ns(&vm.path(), {
        let req = req.clone();
        move || attach_nested(&req)
    })
    .expect("attach");

    // The parent was brought up; the device exists only inside the container, as asked.
    let nic = vm.link("eth0").expect("the VM's eth0");
    assert!(nic.contains(",UP"), "{nic}");
    assert!(!nic.contains("macvlan"), "{nic}");
    assert!(
        !vm.ip(&["-o", "link"]).contains("isn"),
        "a temporary device is left in the VM"
    );
    let link = container.link("eth0").expect("eth0 in the container");
    assert!(link.contains("macvlan mode bridge"), "{link}");
    assert!(link.contains("fa:16:3e:12:34:56"), "{link}");
    assert_eq!(container.mtu("eth0"), 1400);
    let addrs = container.ip(&["-4", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains("inet 10.84.0.5/24"), "{addrs}");
    let routes = container.ip(&["-4", "route"]);
    assert!(routes.contains("default via 10.84.0.1 dev eth0"), "{routes}");
    assert!(routes.contains("172.16.0.0/12 via 10.84.0.254 dev eth0"), "{routes}");

    // Frames leave through the VM's NIC and come back to the container's MAC.
    let (ok, out, err) = run(&[
        "ip",
        "netns",
        "exec",
        &container.name,
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "10.84.0.1",
    ]);
    assert!(ok, "container cannot reach the gateway: {out}{err}");
    let neigh = node.ip(&["neigh", "show", "10.84.0.5"]);
    assert!(neigh.contains("fa:16:3e:12:34:56"), "{neigh}");

    let seen = inspect_nested(&container.path(), "eth0")
        .expect("inspect")
        .expect("present");
    assert_eq!(seen.mac, Some(req.mac));
    assert!(seen.up);
    assert_eq!(seen.mtu, Some(1400));
    assert!(
        seen.addresses.contains(&"10.84.0.5/24".parse().expect("net")),
        "{seen:?}"
    );

    // A second attach of the same interface is refused and leaves the first alone.
    let again = in_ns(&vm.path(), {
        let req = req.clone();
        move || attach_nested(&req)
    });
    assert!(matches!(again, Err(KernelError::WrongDevice { .. })), "{again:?}");
    assert!(container.link("eth0").is_some());

    detach_nested(&container.path(), "eth0").expect("detach");
    assert!(container.link("eth0").is_none());
    assert_eq!(inspect_nested(&container.path(), "eth0").expect("inspect"), None);
    // Gone already, or the namespace itself gone: still fine.
    detach_nested(&container.path(), "eth0").expect("detach again");
    detach_nested(std::path::Path::new("/var/run/netns/ist-no-such-ns"), "eth0").expect("no namespace");
}

#[test]
fn failed_attach_leaves_nothing_behind() {
    support::require_root();
    let (vm, _node) = vm_and_node();
    let container = Ns::new();

    let missing = in_ns(&vm.path(), {
        let req = request(&container, "nope0");
        move || attach_nested(&req)
    });
    assert!(
        matches!(&missing, Err(KernelError::NoDevice(d)) if d == "nope0"),
        "{missing:?}"
    );

    // A host route whose next hop is not on the subnet: the kernel refuses it inside.
    let mut req = request(&container, "eth0");
    req.routes[0].nexthop = "192.0.2.1".parse().expect("ip");
    let res = in_ns(&vm.path(), move || attach_nested(&req));
    assert!(res.is_err(), "{res:?}");
    assert!(container.link("eth0").is_none(), "the half-made device was left behind");
    assert!(
        !container.ip(&["-o", "link"]).contains("isn"),
        "the half-made device was left behind"
    );
    assert!(!vm.ip(&["-o", "link"]).contains("isn"));

    // An interface of that name already in the container: refused, nothing added.
    container.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "other"]);
    let taken = in_ns(&vm.path(), {
        let req = request(&container, "eth0");
        move || attach_nested(&req)
    });
    assert!(matches!(taken, Err(KernelError::WrongDevice { .. })), "{taken:?}");
    assert!(
        !container.ip(&["-o", "link"]).contains("isn"),
        "the temporary device was left behind"
    );
}
