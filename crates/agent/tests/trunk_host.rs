//! Trunks on the host, through the whole control plane: a VM port bound to node 0 is a trunk's
//! parent, its subports are on two other networks, and containers on node 1 sit on those
//! networks. The test plays the VM on the agent's own tap (opened as a hypervisor opens it) and
//! sends 802.1Q-tagged ARP and ICMP: each VLAN reaches its own network's container across the
//! VXLAN and the answer comes back tagged with that VLAN; other VLANs, and untagged frames for
//! a subport network's address, reach nothing; a removed subport is cut off while the other
//! keeps working. Needs root.

mod support;
mod testbed;

use reqwest::Method;
use serde_json::{json, Value};
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use support::in_ns;
use testbed::{eventually, Testbed};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);
const WAIT: Duration = Duration::from_secs(3);

fn mac_of(s: &str) -> [u8; 6] {
    let m: isthmus_agent::kernel::MacAddr = s.parse().expect("mac");
    m.0
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ether(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(v) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// "Who has `target`? Tell `sender_ip`" from `sender`.
fn arp_request(sender: [u8; 6], sender_ip: Ipv4Addr, target: Ipv4Addr, vlan: Option<u16>) -> Vec<u8> {
    let mut f = ether([0xff; 6], sender, vlan, 0x0806);
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sender);
    f.extend_from_slice(&sender_ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f.resize(f.len().max(60), 0);
    f
}

fn echo_request(src: ([u8; 6], Ipv4Addr), dst: ([u8; 6], Ipv4Addr), vlan: Option<u16>, id: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(b"isthmus-trunk-test");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.1.octets());
    ip.extend_from_slice(&dst.1.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = ether(dst.0, src.0, vlan, 0x0800);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// What the VM reads: (VLAN in the frame, ethertype, payload after the Ethernet header).
fn parse(frame: &[u8]) -> Option<(Option<u16>, u16, &[u8])> {
    let et = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if et == 0x8100 {
        let tci = u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?]);
        let inner = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        Some((Some(tci & 0x0fff), inner, frame.get(18..)?))
    } else {
        Some((None, et, frame.get(14..)?))
    }
}

/// The VM's side of its tap.
struct Guest {
    tap: File,
}

impl Guest {
    fn send(&mut self, f: &[u8]) {
        self.tap.write_all(f).expect("write to the tap");
    }

    /// The first frame read within `WAIT` that `want` accepts.
    fn expect<T>(&mut self, mut want: impl FnMut(Option<u16>, u16, &[u8]) -> Option<T>) -> Option<T> {
        let until = Instant::now() + WAIT;
        while Instant::now() < until {
            let mut buf = [0u8; 2048];
            match self.tap.read(&mut buf) {
                Ok(n) => {
                    if let Some(t) = parse(&buf[..n]).and_then(|(v, et, p)| want(v, et, p)) {
                        return Some(t);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        None
    }

    /// Asks for `target`'s MAC on `vlan` as `me`; the VLAN the answer came back on and the MAC.
    fn arp(&mut self, me: ([u8; 6], Ipv4Addr), target: Ipv4Addr, vlan: Option<u16>) -> Option<(Option<u16>, [u8; 6])> {
        self.send(&arp_request(me.0, me.1, target, vlan));
        self.expect(|v, et, p| {
            (et == 0x0806 && p.len() >= 28 && p[7] == 2 && p[14..18] == target.octets() && p[18..24] == me.0)
                .then(|| (v, <[u8; 6]>::try_from(&p[8..14]).expect("6 bytes")))
        })
    }

    fn ping(
        &mut self,
        me: ([u8; 6], Ipv4Addr),
        to: ([u8; 6], Ipv4Addr),
        vlan: Option<u16>,
        id: u16,
    ) -> Option<Option<u16>> {
        self.send(&echo_request(me, to, vlan, id));
        self.expect(|v, et, p| {
            (et == 0x0800
                && p.len() >= 28
                && p[9] == 1
                && p[12..16] == to.1.octets()
                && p[20] == 0
                && p[24..26] == id.to_be_bytes())
            .then_some(v)
        })
    }
}

async fn port_status(tb: &Testbed, id: &str) -> String {
    tb.port(id).await["status"].as_str().unwrap_or_default().to_string()
}

fn ip4(p: &Value) -> Ipv4Addr {
    p["fixed_ips"][0]["ip_address"]
        .as_str()
        .expect("ip")
        .parse()
        .expect("ipv4")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subports_carry_their_vlans_to_their_networks_only() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tb = Testbed::start(2).await;
        let t = tb.member("trunkhost").await;
        let (pnet, psub) = tb.network_as(&t, "parent", "10.90.0.0/24").await;
        let (anet, asub) = tb.network_as(&t, "net-a", "10.91.0.0/24").await;
        let (bnet, bsub) = tb.network_as(&t, "net-b", "10.92.0.0/24").await;
        let vm = tb.vm_port(&pnet, &psub, "10.90.0.10", 0).await;
        let vm_id = vm["id"].as_str().expect("id").to_string();
        // net-a's container and subport take ICMP from anywhere (the subport's group changes
        // later); net-b's stay in the default group.
        let icmp_in = tb
            .create(&t, "security-groups", "security_group", json!({"name": "icmp-in"}))
            .await;
        tb.create(
            &t,
            "security-group-rules",
            "security_group_rule",
            json!({"security_group_id": icmp_in["id"], "direction": "ingress", "ethertype": "IPv4",
                   "protocol": "icmp", "remote_ip_prefix": "0.0.0.0/0"}),
        )
        .await;
        let open = json!({"security_groups": [icmp_in["id"]]});
        // The containers the subports must reach, on the other node.
        let (ca, _ca_ns) = tb.workload_as(&t, &anet, &asub, "10.91.0.50", 1, open.clone()).await;
        let (cb, _cb_ns) = tb.workload_as(&t, &bnet, &bsub, "10.92.0.50", 1, json!({})).await;
        let ca = tb.port(&ca).await;
        let cb = tb.port(&cb).await;
        let sa = tb
            .create(
                &t,
                "ports",
                "port",
                json!({"network_id": anet, "fixed_ips": [{"ip_address": "10.91.0.10"}],
                       "security_groups": [icmp_in["id"]]}),
            )
            .await;
        let sb = tb
            .create(
                &t,
                "ports",
                "port",
                json!({"network_id": bnet, "fixed_ips": [{"ip_address": "10.92.0.10"}]}),
            )
            .await;
        let (sa_id, sb_id) = (sa["id"].as_str().expect("id"), sb["id"].as_str().expect("id"));
        let trunk = tb
            .create(
                &t,
                "trunks",
                "trunk",
                json!({"port_id": vm_id, "sub_ports": [
                    {"port_id": sa_id, "segmentation_type": "vlan", "segmentation_id": 100},
                    {"port_id": sb_id, "segmentation_type": "vlan", "segmentation_id": 200}]}),
            )
            .await;
        let trunk_id = trunk["id"].as_str().expect("id").to_string();

        // The node makes each subport's devices, wires the tap and reports the subports ACTIVE.
        let node = &tb.nodes[0];
        for id in [sa_id, sb_id] {
            let (bridged, peer) = (isthmus_agent::names::tap(id), isthmus_agent::names::subport_peer(id));
            eventually(15, "the subport's devices exist", || {
                node.has_link(&bridged) && node.has_link(&peer)
            })
            .await;
        }
        let tap = isthmus_agent::names::tap(&vm_id);
        let t2 = tap.clone();
        let programs = in_ns(&node.ns.path(), move || isthmus_agent::kernel::vlan::attached(&t2)).expect("query");
        assert_eq!(programs, 1, "one VLAN program on the VM's tap");
        let deadline = Instant::now() + Duration::from_secs(15);
        while port_status(&tb, sa_id).await != "ACTIVE" || port_status(&tb, sb_id).await != "ACTIVE" {
            assert!(Instant::now() < deadline, "subports never became ACTIVE");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let tap_name = tap.clone();
        let file = in_ns(&node.ns.path(), move || {
            isthmus_agent::kernel::netns::open_tap(&tap_name)
        })
        .expect("open tap");
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fd = file.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            assert_eq!(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK), 0);
        }
        let mut g = Guest { tap: file };
        let me_a = (mac_of(sa["mac_address"].as_str().expect("mac")), ip4(&sa));
        let me_b = (mac_of(sb["mac_address"].as_str().expect("mac")), ip4(&sb));
        let peer_a = (mac_of(ca["mac_address"].as_str().expect("mac")), ip4(&ca));
        let peer_b = (mac_of(cb["mac_address"].as_str().expect("mac")), ip4(&cb));

        tokio::task::block_in_place(|| {
            // Each VLAN reaches its own network's container on the other node, and the answer
            // comes back on that VLAN.
            let mut ok_a = None;
            for _ in 0..5 {
                ok_a = g.arp(me_a, peer_a.1, Some(100));
                if ok_a.is_some() {
                    break;
                }
            }
            assert_eq!(
                ok_a,
                Some((Some(100), peer_a.0)),
                "ARP on VLAN 100 answered by net-a's container"
            );
            assert_eq!(
                g.arp(me_b, peer_b.1, Some(200)),
                Some((Some(200), peer_b.0)),
                "ARP on VLAN 200"
            );
            assert_eq!(g.ping(me_a, peer_a, Some(100), 1), Some(Some(100)), "ping on VLAN 100");
            assert_eq!(g.ping(me_b, peer_b, Some(200), 2), Some(Some(200)), "ping on VLAN 200");
            // Nothing else: VLAN 100 does not lead to net-b, an unknown VLAN leads nowhere, and
            // the parent's untagged network does not hold the subport networks' addresses.
            assert_eq!(g.arp(me_a, peer_b.1, Some(100)), None, "net-b's address on VLAN 100");
            assert_eq!(g.arp(me_a, peer_a.1, Some(300)), None, "an unknown VLAN");
            assert_eq!(g.arp(me_a, peer_a.1, None), None, "net-a's address untagged");
            // The subport's own anti-spoofing: another source address gets nothing back.
            let spoofed = (me_a.0, Ipv4Addr::new(10, 91, 0, 99));
            assert_eq!(
                g.ping(spoofed, peer_a, Some(100), 3),
                None,
                "spoofed source on VLAN 100"
            );
        });

        // The subport's own security groups: the container's pings reach the VM on VLAN 100
        // while the subport's group takes ICMP, and stop when it is in one without ingress
        // rules; the VM's own pings out still get their replies (tracked connections).
        let ca_ns = _ca_ns.name.clone();
        let sa_mac = sa["mac_address"].as_str().expect("mac").to_string();
        support::must(&[
            "ip",
            "netns",
            "exec",
            &ca_ns,
            "ip",
            "neigh",
            "replace",
            "10.91.0.10",
            "lladdr",
            &sa_mac,
            "dev",
            "eth0",
        ]);
        let pings_arrive = |g: &mut Guest| {
            let mut child = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ca_ns,
                    "ping",
                    "-c",
                    "3",
                    "-i",
                    "0.3",
                    "-W",
                    "1",
                    "10.91.0.10",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("ping");
            let got = g.expect(|v, et, p| (et == 0x0800 && p.len() >= 28 && p[9] == 1 && p[20] == 8).then_some(v));
            let _ = child.kill();
            let _ = child.wait();
            got
        };
        tokio::task::block_in_place(|| {
            let r = pings_arrive(&mut g);
            assert_eq!(r, Some(Some(100)), "the container's echo request, tagged 100");
        });
        let closed = tb
            .create(&t, "security-groups", "security_group", json!({"name": "no-ingress"}))
            .await;
        tb.expect_as(
            &t,
            Method::PUT,
            &format!("/v2.0/ports/{sa_id}"),
            json!({"port": {"security_groups": [closed["id"]]}}),
            200,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::task::block_in_place(|| pings_arrive(&mut g)).is_none() {
                break;
            }
            assert!(Instant::now() < deadline, "the subport's group never took effect");
        }
        tokio::task::block_in_place(|| {
            // Egress is still allowed by the new group, and replies come back.
            let r = g.ping(me_a, peer_a, Some(100), 4);
            assert_eq!(r, Some(Some(100)), "ping out of VLAN 100");
        });

        // Removing subport b cuts it off; a keeps working.
        let (s, b) = tb
            .net_as(
                &t,
                Method::PUT,
                &format!("/v2.0/trunks/{trunk_id}/remove_subports"),
                Some(json!({"sub_ports": [{"port_id": sb_id}]})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        let peer = isthmus_agent::names::subport_peer(sb_id);
        eventually(15, "the removed subport's devices go", || !node.has_link(&peer)).await;
        tokio::task::block_in_place(|| {
            assert_eq!(g.arp(me_b, peer_b.1, Some(200)), None, "removed subport b");
            assert_eq!(
                g.arp(me_a, peer_a.1, Some(100)),
                Some((Some(100), peer_a.0)),
                "subport a still works"
            );
        });
        let st = tb.port(sb_id).await;
        assert_eq!(st["binding:host_id"], "", "a released subport is unbound: {st}");
    })
    .await
    .expect("test timed out");
}
