//! Trunk VLAN demultiplexing with tc eBPF in real network namespaces. Needs root.
//!
//! "host" holds the trunk's devices: `tap0` (stand-in for the VM's tap, a veth whose peer
//! `vm0` is in "vm"), `sp100`/`sp200` (subport devices, peers `n100`/`n200` in "net100" and
//! "net200") and a bridge joining `tap0` with a veth into "parentnet" (the parent's network).
//! The kernel here has no 802.1Q devices, so the "VM" sends hand-made tagged frames from a
//! packet socket, and captures read the tag from the packet metadata or the frame. One test
//! uses a real tap instead, read and written through its file as a hypervisor does.

use isthmus_agent::kernel::vlan::{self, Subport, TrunkWiring};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};
use support::*;

mod support;

/// Local experimental ethertype: nothing else in the namespaces sends it.
const ETHERTYPE: u16 = 0x88b5;
const VM_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const BROADCAST: [u8; 6] = [0xff; 6];

/// A raw packet socket on `dev` (in the namespace of the calling thread), with VLAN metadata.
fn packet_socket(dev: &str) -> (OwnedFd, i32) {
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: plain syscalls on values we own; results checked.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        assert!(ifindex > 0, "no {dev}");
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        );
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let rc = libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
        assert_eq!(rc, 0);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex;
        let rc = libc::bind(
            fd.as_raw_fd(),
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        (fd, ifindex)
    }
}

/// Opens a capture on `dev` inside `ns`; the socket works from any thread afterwards.
fn capture(ns: &Ns, dev: &str) -> OwnedFd {
    let dev = dev.to_string();
    in_ns(&ns.path(), move || packet_socket(&dev).0)
}

/// An Ethernet frame carrying `marker`, with an 802.1Q tag when `vlan` is given.
fn frame(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, marker: &str) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(v) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(marker.as_bytes());
    f.resize(f.len().max(60), 0);
    f
}

fn send(ns: &Ns, dev: &str, bytes: Vec<u8>) {
    let dev = dev.to_string();
    in_ns(&ns.path(), move || {
        let (fd, ifindex) = packet_socket(&dev);
        // SAFETY: sendto with a buffer and address we own.
        unsafe {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&bytes[..6]);
            let n = libc::sendto(
                fd.as_raw_fd(),
                bytes.as_ptr() as *const libc::c_void,
                bytes.len(),
                0,
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(n, bytes.len() as isize, "sendto: {}", std::io::Error::last_os_error());
        }
    });
}

/// Where a captured frame's tag was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    None,
    /// In the packet metadata (hardware-accelerated tag), as PACKET_AUXDATA reports it.
    Metadata(u16),
    /// Still in the frame bytes.
    InFrame(u16),
}

/// Frames carrying `marker` seen on `fd` until `until` (then whatever is already queued).
fn seen(fd: &OwnedFd, marker: &str, until: Instant) -> Vec<Tag> {
    let mut out = Vec::new();
    loop {
        let mut buf = [0u8; 2048];
        let mut cbuf = [0u64; 64];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: recvmsg into buffers we own; cmsg walked with the libc macros.
        let (n, tag) = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = std::mem::size_of_val(&cbuf);
            let n = libc::recvmsg(fd.as_raw_fd(), &mut msg, 0);
            if n < 0 {
                if Instant::now() >= until {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let mut tag = None;
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                    let aux = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::tpacket_auxdata);
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                        tag = Some(aux.tp_vlan_tci & 0x0fff);
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
            (n as usize, tag)
        };
        let f = &buf[..n];
        if !f.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            continue;
        }
        out.push(match (tag, f.get(12..16)) {
            (Some(v), _) => Tag::Metadata(v),
            (None, Some([0x81, 0x00, hi, lo])) => Tag::InFrame(u16::from_be_bytes([*hi, *lo]) & 0x0fff),
            _ => Tag::None,
        });
    }
    out
}

struct Bed {
    host: Ns,
    vm: Ns,
    net100: Ns,
    net200: Ns,
    parentnet: Ns,
}

fn veth(a: &Ns, a_dev: &str, b: &Ns, b_dev: &str) {
    a.ip(&[
        "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", &b.name,
    ]);
    a.ip(&["link", "set", a_dev, "up"]);
    b.ip(&["link", "set", b_dev, "up"]);
}

fn bed() -> Bed {
    let b = Bed {
        host: Ns::new(),
        vm: Ns::new(),
        net100: Ns::new(),
        net200: Ns::new(),
        parentnet: Ns::new(),
    };
    veth(&b.host, "tap0", &b.vm, "vm0");
    b.vm.ip(&["link", "set", "vm0", "address", "02:00:00:00:00:01"]);
    veth(&b.host, "sp100", &b.net100, "n100");
    veth(&b.host, "sp200", &b.net200, "n200");
    veth(&b.host, "hp0", &b.parentnet, "p0");
    b.host.ip(&["link", "add", "br0", "type", "bridge"]);
    b.host.ip(&["link", "set", "tap0", "master", "br0"]);
    b.host.ip(&["link", "set", "hp0", "master", "br0"]);
    b.host.ip(&["link", "set", "br0", "up"]);
    b
}

fn wiring() -> TrunkWiring {
    TrunkWiring {
        parent_dev: "tap0".into(),
        subports: vec![
            Subport {
                vlan: 100,
                dev: "sp100".into(),
                bridged: "n100".into(),
            },
            Subport {
                vlan: 200,
                dev: "sp200".into(),
                bridged: "n200".into(),
            },
        ],
    }
}

fn in_host<T: Send + 'static>(b: &Bed, f: impl FnOnce() -> T + Send + 'static) -> T {
    in_ns(&b.host.path(), f)
}

const WAIT: Duration = Duration::from_millis(300);

/// Sends a frame from the VM (tagged with `vlan` if given); returns what each network saw.
fn from_vm(b: &Bed, vlan: Option<u16>, marker: &str) -> [Vec<Tag>; 3] {
    let caps = [
        capture(&b.net100, "n100"),
        capture(&b.net200, "n200"),
        capture(&b.parentnet, "p0"),
    ];
    send(&b.vm, "vm0", frame(BROADCAST, VM_MAC, vlan, marker));
    let until = Instant::now() + WAIT;
    caps.map(|c| seen(&c, marker, until))
}

#[test]
fn vlans_reach_only_their_subport_networks_and_come_back_tagged() {
    require_root();
    let b = bed();
    // Twice: the second must replace, not fail or stack.
    for _ in 0..2 {
        in_host(&b, || vlan::apply(&wiring())).expect("apply");
    }
    let counts = in_host(&b, || {
        ["tap0", "sp100", "sp200"].map(|d| vlan::attached(d).expect("query"))
    });
    assert_eq!(counts, [1, 1, 1], "one program per device after two applies");

    let [n100, n200, parent] = from_vm(&b, Some(100), "to-vlan-100");
    assert_eq!(n100, vec![Tag::None], "VLAN 100 reaches net100 once, untagged");
    assert!(
        n200.is_empty() && parent.is_empty(),
        "VLAN 100 leaked: {n200:?} {parent:?}"
    );

    let [n100, n200, parent] = from_vm(&b, Some(200), "to-vlan-200");
    assert_eq!(n200, vec![Tag::None], "VLAN 200 reaches net200 once, untagged");
    assert!(
        n100.is_empty() && parent.is_empty(),
        "VLAN 200 leaked: {n100:?} {parent:?}"
    );

    let [n100, n200, parent] = from_vm(&b, None, "untagged");
    assert_eq!(parent, vec![Tag::None], "untagged frames reach the parent network");
    assert!(n100.is_empty() && n200.is_empty(), "untagged leaked: {n100:?} {n200:?}");

    let [n100, n200, parent] = from_vm(&b, Some(300), "to-vlan-300");
    assert!(
        n100.is_empty() && n200.is_empty() && parent.is_empty(),
        "unknown VLAN must be dropped: {n100:?} {n200:?} {parent:?}"
    );

    // QoS policing on the tap (a tc filter redirecting to an IFB, as the agent's QoS does):
    // frames coming back from the IFB skip tc, so the demultiplexing must already be done.
    let h = b.host.name.clone();
    b.host.ip(&["link", "add", "ifb0", "type", "ifb"]);
    b.host.ip(&["link", "set", "ifb0", "up"]);
    let tc = |args: &[&str]| {
        let mut full = vec!["ip", "netns", "exec", &h, "tc"];
        full.extend_from_slice(args);
        must(&full);
    };
    tc(&[
        "qdisc", "add", "dev", "ifb0", "root", "tbf", "rate", "100mbit", "burst", "64k", "latency", "50ms",
    ]);
    tc(&["qdisc", "add", "dev", "tap0", "ingress"]);
    tc(&[
        "filter", "add", "dev", "tap0", "parent", "ffff:", "protocol", "all", "prio", "1", "u32", "match", "u32", "0",
        "0", "action", "mirred", "egress", "redirect", "dev", "ifb0",
    ]);
    let [n100, n200, parent] = from_vm(&b, Some(100), "policed-vlan-100");
    assert_eq!(
        n100,
        vec![Tag::None],
        "VLAN 100 with QoS on the tap: {n200:?} {parent:?}"
    );
    assert!(
        n200.is_empty() && parent.is_empty(),
        "VLAN 100 leaked with QoS: {n200:?} {parent:?}"
    );
    let [n100, _, parent] = from_vm(&b, None, "policed-untagged");
    assert_eq!(parent, vec![Tag::None], "untagged with QoS on the tap: {n100:?}");

    // Back toward the VM: each subport network's frames arrive tagged with its VLAN.
    for (net, dev, vlan) in [(&b.net100, "n100", 100u16), (&b.net200, "n200", 200)] {
        let cap = capture(&b.vm, "vm0");
        let marker = format!("from-{vlan}");
        send(net, dev, frame(VM_MAC, PEER_MAC, None, &marker));
        let got = seen(&cap, &marker, Instant::now() + WAIT);
        assert_eq!(got.len(), 1, "one frame from net{vlan} at the VM, got {got:?}");
        assert!(
            matches!(got[0], Tag::Metadata(v) | Tag::InFrame(v) if v == vlan),
            "tagged {vlan}: {got:?}"
        );
        eprintln!("frame from net{vlan} at the VM: {:?}", got[0]);
    }

    in_host(&b, || vlan::remove(&wiring())).expect("remove");
    let [n100, _, _] = from_vm(&b, Some(100), "after-remove");
    assert!(
        n100.is_empty(),
        "after remove, VLAN 100 must not reach net100: {n100:?}"
    );
    let counts = in_host(&b, || {
        ["tap0", "sp100", "sp200"].map(|d| vlan::attached(d).expect("query"))
    });
    assert_eq!(counts, [0, 0, 0], "programs left behind");
    // Removing again is fine.
    in_host(&b, || vlan::remove(&wiring())).expect("remove twice");
}

#[test]
fn missing_device_is_a_clear_error() {
    require_root();
    let b = bed();
    let mut w = wiring();
    w.subports[1].dev = "nope0".into();
    let err = in_host(&b, move || vlan::apply(&w)).expect_err("must fail");
    assert!(err.to_string().contains("nope0"), "{err}");
}

/// The tag-in-the-frame path, which the receive path above never takes (it moves the tag into
/// the packet metadata before tc runs): the program pops it from the data itself.
#[test]
fn tag_still_in_the_frame_is_popped_from_the_data() {
    require_root();
    const REDIRECT: i32 = 7;
    const SHOT: i32 = 2;
    const UNSPEC: i32 = -1;
    let prog = vlan::parent_program(&[(100, 7), (200, 9)]);

    let tagged = frame(BROADCAST, VM_MAC, Some(100), "in-frame");
    let (verdict, out) = vlan::test_run(&prog, &tagged).expect("test run");
    assert_eq!(verdict, REDIRECT);
    let untagged = frame(BROADCAST, VM_MAC, None, "in-frame");
    assert_eq!(out.len(), tagged.len() - 4, "4 bytes shorter");
    assert_eq!(out[..], untagged[..out.len()], "tag removed, rest intact");

    let (verdict, _) = vlan::test_run(&prog, &frame(BROADCAST, VM_MAC, Some(300), "x")).expect("test run");
    assert_eq!(verdict, SHOT, "unknown VLAN");
    let (verdict, out) = vlan::test_run(&prog, &untagged).expect("test run");
    assert_eq!((verdict, &out), (UNSPEC, &untagged), "untagged passes unchanged");

    // A subport program tags; with the frame in the data the tag lands in the metadata, so the
    // data is unchanged and the verdict is a redirect.
    let (verdict, _) = vlan::test_run(&vlan::subport_program(100, 7), &untagged).expect("test run");
    assert_eq!(verdict, REDIRECT);
}

/// With a real tap as the parent, as a hypervisor has it: frames the "VM" writes to the tap
/// carry the tag in the data, and frames it reads come with the tag written into the data.
#[test]
fn a_real_tap_trunk_carries_tags_in_the_frames() {
    use std::io::{Read, Write};
    require_root();
    let host = Ns::new();
    let net100 = Ns::new();
    let mut tap = in_ns(&host.path(), || {
        isthmus_agent::kernel::netns::open_tap("vmtap0").expect("tap")
    });
    host.ip(&["link", "set", "vmtap0", "up"]);
    veth(&host, "sp100", &net100, "n100");
    let w = TrunkWiring {
        parent_dev: "vmtap0".into(),
        subports: vec![Subport {
            vlan: 100,
            dev: "sp100".into(),
            bridged: "n100".into(),
        }],
    };
    in_ns(&host.path(), move || vlan::apply(&w)).expect("apply");

    for (vlan, marker, arrives) in [(100, "tap-vlan-100", true), (300, "tap-vlan-300", false)] {
        let cap = capture(&net100, "n100");
        tap.write_all(&frame(BROADCAST, VM_MAC, Some(vlan), marker))
            .expect("write to tap");
        let got = seen(&cap, marker, Instant::now() + WAIT);
        let want = if arrives { vec![Tag::None] } else { vec![] };
        assert_eq!(got, want, "VLAN {vlan} from the tap at net100");
    }

    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fd = tap.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        assert_eq!(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK), 0);
    }
    send(&net100, "n100", frame(VM_MAC, PEER_MAC, None, "to-the-tap"));
    let until = Instant::now() + WAIT;
    let mut found = None;
    while found.is_none() && Instant::now() < until {
        let mut buf = [0u8; 2048];
        match tap.read(&mut buf) {
            Ok(n) if buf[..n].windows(10).any(|w| w == b"to-the-tap") => found = Some(buf[..n].to_vec()),
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    let f = found.expect("the frame from net100 reaches the VM");
    assert_eq!(
        f[12..16],
        [0x81, 0x00, 0x00, 100],
        "tagged 100 in the frame the VM reads"
    );
}

/// The routing shortcut's program, run by the kernel on frames: IPv4 and IPv6 TCP/UDP frames
/// for a listed MAC are redirected; other MACs, ARP and ICMPv6 continue. (The kernel refuses
/// to test-run IP frames too short for their header, and the verifier refuses a program that
/// reads beyond what it checked.)
#[test]
fn shortcut_program_sends_only_routed_unicast_for_listed_macs() {
    use isthmus_agent::kernel::bpf::TC_ACT_REDIRECT;
    use isthmus_agent::kernel::shortcut;
    support::require_root();
    let listed = [0xfa, 0x16, 0x3e, 0x80, 0x01, 0xff];
    let other = [0xfa, 0x16, 0x3e, 0x80, 0x01, 0xfe];
    let leg = [0xf6, 0, 0, 0, 0, 1];
    let prog = shortcut::program(&[[0xfa, 0x16, 0x3e, 0, 0, 9], listed], 1);
    let frame = |dst: [u8; 6], ethertype: u16, next: u8| {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&leg);
        f.extend_from_slice(&ethertype.to_be_bytes());
        // Enough of an IP header for the kernel to take the frame.
        let mut payload = vec![0u8; 60];
        if ethertype == 0x0800 {
            payload[0] = 0x45;
            payload[3] = 60;
            payload[8] = 64;
            payload[9] = 17;
        } else {
            payload[0] = 0x60;
            payload[5] = 20;
            payload[6] = next; // next header
            payload[7] = 64;
        }
        f.extend_from_slice(&payload);
        f
    };
    let verdict = |f: &[u8]| {
        shortcut::test_run(&prog, f)
            .unwrap_or_else(|e| panic!("test run on {:02x?}: {e}", &f[..16]))
            .0
    };
    assert_eq!(verdict(&frame(listed, 0x0800, 0)), TC_ACT_REDIRECT, "IPv4");
    assert_eq!(verdict(&frame(listed, 0x86dd, 6)), TC_ACT_REDIRECT, "IPv6 TCP");
    assert_eq!(verdict(&frame(listed, 0x86dd, 17)), TC_ACT_REDIRECT, "IPv6 UDP");
    assert_eq!(verdict(&frame(listed, 0x86dd, 58)), -1, "ICMPv6 takes the bridge");
    assert_eq!(verdict(&frame(listed, 0x0806, 0)), -1, "ARP takes the bridge");
    assert_eq!(
        verdict(&frame(other, 0x0800, 0)),
        -1,
        "an unlisted MAC takes the bridge"
    );
    assert_eq!(verdict(&frame([0xff; 6], 0x0800, 0)), -1, "broadcast takes the bridge");
    // No MAC at all: everything continues.
    let none = shortcut::program(&[], 1);
    assert_eq!(shortcut::test_run(&none, &frame(listed, 0x0800, 0)).unwrap().0, -1);
}
