//! Distributed DHCP end to end: VM ports bound to test-bed nodes, their taps made by the real
//! agents, and a DHCP client speaking through the tap exactly as a guest would (the test opens
//! the tap's guest side, like QEMU). Needs root.
//!
//! Also `dhcp_latency` (`#[ignore]`d, `scripts/bench-dhcp.sh`): 1,000 DISCOVER/REQUEST
//! exchanges, p50/p99.

mod support;
mod testbed;

use isthmus_dhcp::v6::{client_frame6, parse_reply6, Kind, Reply6};
use isthmus_dhcp::{client_frame, parse_reply, MessageType, Reply};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};
use support::in_ns;
use testbed::{eventually, Testbed};

const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// The guest side of a tap, in a node namespace.
struct Guest {
    tap: std::fs::File,
    mac: [u8; 6],
}

impl Guest {
    fn open(node_ns: &Path, tap: &str, mac: &str) -> Guest {
        let name = tap.to_string();
        let file = in_ns(node_ns, move || isthmus_agent::kernel::netns::open_tap(&name)).expect("open tap");
        let m: isthmus_agent::kernel::MacAddr = mac.parse().expect("mac");
        Guest { tap: file, mac: m.0 }
    }

    fn send(&mut self, frame: &[u8]) {
        self.tap.write_all(frame).expect("write to tap");
    }

    /// The first frame from the tap that `pick` maps to something, within `timeout`; other
    /// frames are skipped.
    fn next_frame<T>(&mut self, timeout: Duration, mut pick: impl FnMut(&[u8]) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().clamp(1, 50) as i32) } <= 0 {
                continue;
            }
            let len = self.tap.read(&mut buf).expect("read tap");
            if let Some(t) = pick(&buf[..len]) {
                return Some(t);
            }
        }
    }

    /// The next DHCP reply for `xid` within `timeout`; other frames are skipped.
    fn reply(&mut self, xid: u32, timeout: Duration) -> Option<Reply> {
        self.next_frame(timeout, |f| parse_reply(f).filter(|r| r.xid == xid))
    }

    /// Whether a DHCP request with `xid` shows up on this tap within `timeout`.
    fn sees_request(&mut self, xid: u32, timeout: Duration) -> bool {
        self.next_frame(timeout, |f| isthmus_dhcp::parse(f).ok().filter(|r| r.xid == xid))
            .is_some()
    }

    /// The next DHCPv6 answer for `xid` within `timeout`; other frames are skipped.
    fn reply6(&mut self, xid: [u8; 3], timeout: Duration) -> Option<Reply6> {
        self.next_frame(timeout, |f| parse_reply6(f).filter(|r| r.xid == xid))
    }

    fn exchange(
        &mut self,
        kind: MessageType,
        xid: u32,
        requested: Option<Ipv4Addr>,
        ciaddr: Ipv4Addr,
    ) -> Option<Reply> {
        let frame = client_frame(kind, xid, self.mac, requested, ciaddr);
        self.send(&frame);
        self.reply(xid, Duration::from_secs(2))
    }

    /// DISCOVERs (xids from `first_xid`) until an OFFER satisfies `ok`: the agent may still be
    /// opening its socket on a new tap, or not yet have the latest view. The last OFFER seen.
    fn offer_until(&mut self, first_xid: u32, ok: impl Fn(&Reply) -> bool) -> Option<Reply> {
        let mut last = None;
        for i in 0..50 {
            if let Some(r) = self.exchange(MessageType::Discover, first_xid + i, None, Ipv4Addr::UNSPECIFIED) {
                let done = ok(&r);
                last = Some(r);
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        last
    }
}

struct Setup {
    tb: Testbed,
    net: String,
    dhcp_subnet: String,
    nodhcp_net: String,
    nodhcp_subnet: String,
}

async fn setup(nodes: usize) -> Setup {
    let tb = Testbed::start(nodes).await;
    let t = tb.member("dhcp").await;
    let net = tb.create(&t, "networks", "network", json!({"name": "vms"})).await;
    let net = net["id"].as_str().expect("id").to_string();
    let s = tb
        .create(
            &t,
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": "10.70.0.0/24", "ip_version": 4,
                   "dns_nameservers": ["10.1.1.1", "10.1.1.2"],
                   "host_routes": [{"destination": "172.16.0.0/12", "nexthop": "10.70.0.254"}]}),
        )
        .await;
    let n2 = tb.create(&t, "networks", "network", json!({"name": "static"})).await;
    let n2 = n2["id"].as_str().expect("id").to_string();
    let s2 = tb
        .create(
            &t,
            "subnets",
            "subnet",
            json!({"network_id": n2, "cidr": "10.71.0.0/24", "ip_version": 4, "enable_dhcp": false}),
        )
        .await;
    Setup {
        tb,
        net,
        dhcp_subnet: s["id"].as_str().expect("id").to_string(),
        nodhcp_net: n2,
        nodhcp_subnet: s2["id"].as_str().expect("id").to_string(),
    }
}

fn tap_of(port: &Value) -> String {
    isthmus_agent::names::tap(port["id"].as_str().expect("id"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_ports_get_their_address_and_options_from_their_own_node() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let s = setup(2).await;
        let tb = &s.tb;
        let a = tb.vm_port(&s.net, &s.dhcp_subnet, "10.70.0.10", 0).await;
        let b = tb.vm_port(&s.net, &s.dhcp_subnet, "10.70.0.11", 1).await;
        let c = tb.vm_port(&s.nodhcp_net, &s.nodhcp_subnet, "10.71.0.10", 0).await;
        let node0 = tb.nodes[0].ns.path();
        let node1 = tb.nodes[1].ns.path();
        let mut ga = Guest::open(&node0, &tap_of(&a), a["mac_address"].as_str().expect("mac"));
        let mut gb = Guest::open(&node1, &tap_of(&b), b["mac_address"].as_str().expect("mac"));
        let mut gc = Guest::open(&node0, &tap_of(&c), c["mac_address"].as_str().expect("mac"));
        let ip = Ipv4Addr::new(10, 70, 0, 10);

        // DISCOVER → OFFER of the port's fixed IP with every option (the agent may still be
        // opening its socket on the new tap: retry for a while).
        let mut offer = None;
        for i in 0..50 {
            offer = ga.exchange(MessageType::Discover, 100 + i, None, Ipv4Addr::UNSPECIFIED);
            if offer.is_some() {
                break;
            }
        }
        let Some(offer) = offer else {
            let log = std::fs::read_to_string(&tb.nodes[0].log).unwrap_or_default();
            let dhcp: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("DHCP") || l.contains("tap"))
                .collect();
            panic!("no OFFER for a VM port; agent log:\n{}", dhcp.join("\n"));
        };
        assert_eq!(offer.kind, MessageType::Offer);
        assert_eq!(offer.yiaddr, ip);
        assert_eq!(offer.option(1), Some(&[255, 255, 255, 0][..]), "mask");
        assert_eq!(offer.option(3), Some(&[10, 70, 0, 1][..]), "router");
        assert_eq!(offer.option(6), Some(&[10, 1, 1, 1, 10, 1, 1, 2][..]), "dns");
        assert_eq!(offer.option(26), Some(&1450u16.to_be_bytes()[..]), "mtu");
        assert_eq!(offer.option(51), Some(&86400u32.to_be_bytes()[..]), "lease");
        assert_eq!(
            offer.option(121),
            Some(&[12, 172, 16, 10, 70, 0, 254, 0, 10, 70, 0, 1][..]),
            "classless routes"
        );
        // REQUEST → ACK; a renewal (ciaddr) → ACK; another address → NAK.
        let ack = ga
            .exchange(MessageType::Request, 200, Some(ip), Ipv4Addr::UNSPECIFIED)
            .expect("ACK");
        assert_eq!((ack.kind, ack.yiaddr), (MessageType::Ack, ip));
        let renew = ga.exchange(MessageType::Request, 201, None, ip).expect("renewal ACK");
        assert_eq!((renew.kind, renew.yiaddr), (MessageType::Ack, ip));
        let nak = ga
            .exchange(
                MessageType::Request,
                202,
                Some(Ipv4Addr::new(10, 70, 0, 99)),
                Ipv4Addr::UNSPECIFIED,
            )
            .expect("NAK");
        assert_eq!(nak.kind, MessageType::Nak);
        // The agent counted its answers (OFFER, ACK, ACK, NAK at least) on its metrics endpoint.
        let m = tb.nodes[0].metrics();
        let answers: f64 = m
            .lines()
            .filter(|l| l.starts_with("isthmus_agent_dhcp_answers_total{family=\"v4\"}"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        assert!(answers >= 4.0, "{m}");

        // The VM on node 1 gets its own address from node 1's agent.
        let mut offer_b = None;
        for i in 0..50 {
            offer_b = gb.exchange(MessageType::Discover, 300 + i, None, Ipv4Addr::UNSPECIFIED);
            if offer_b.is_some() {
                break;
            }
        }
        assert_eq!(offer_b.expect("OFFER on node 1").yiaddr, Ipv4Addr::new(10, 70, 0, 11));

        // An unknown MAC on the tap gets nothing; a subnet without DHCP gets nothing.
        let stranger = client_frame(
            MessageType::Discover,
            400,
            [0x02, 0, 0, 0, 0, 9],
            None,
            Ipv4Addr::UNSPECIFIED,
        );
        ga.send(&stranger);
        assert!(
            ga.reply(400, Duration::from_secs(1)).is_none(),
            "an unknown MAC got an answer"
        );
        assert!(
            gc.exchange(MessageType::Discover, 500, None, Ipv4Addr::UNSPECIFIED)
                .is_none(),
            "a subnet with DHCP disabled got an answer"
        );
        // Nothing leaks: node 1's guest never saw an answer meant for node 0's (xids 100–202),
        // and node 1's agent did not answer node 0's guest (it would have used node 1's tap).
        ga.exchange(MessageType::Discover, 600, None, Ipv4Addr::UNSPECIFIED)
            .expect("OFFER");
        assert!(
            gb.reply(600, Duration::from_millis(500)).is_none(),
            "an answer for node 0's VM reached node 1"
        );
        // Nor do the guest's requests: the node's bridge filter keeps them local.
        ga.send(&client_frame(MessageType::Discover, 601, ga.mac, None, Ipv4Addr::UNSPECIFIED));
        if gb.sees_request(601, Duration::from_millis(700)) {
            let rules = support::run(&["ip", "netns", "exec", &tb.nodes[0].ns.name, "nft", "list", "ruleset"]).1;
            let rules1 = support::run(&["ip", "netns", "exec", &tb.nodes[1].ns.name, "nft", "list", "ruleset"]).1;
            let links = support::run(&["bridge", "-n", &tb.nodes[0].ns.name, "link"]).1;
            let links1 = support::run(&["bridge", "-n", &tb.nodes[1].ns.name, "link"]).1;
            panic!("node 0's DHCP request reached node 1's VM; node 0's rules:\n{rules}\nnode1:\n{rules1}\n{links}\n{links1}");
        }
        // A guest posing as a DHCP server reaches nobody: the bridge drops its answer.
        let bogus = isthmus_dhcp::Lease {
            ip: Ipv4Addr::new(10, 70, 0, 99),
            prefix_len: 24,
            router: None,
            dns: vec![],
            mtu: 1450,
            routes: vec![],
            lease_secs: 60,
            server_id: Ipv4Addr::new(10, 70, 0, 10),
            server_mac: ga.mac,
            domain: None,
            hostname: None,
            next_server: None,
            extra: vec![],
        };
        let asked = isthmus_dhcp::parse(&client_frame(MessageType::Discover, 602, gb.mac, None, Ipv4Addr::UNSPECIFIED))
            .expect("parse");
        let mut fake = isthmus_dhcp::build(isthmus_dhcp::Answer::Offer, &asked, &bogus);
        fake[..6].copy_from_slice(&[0xff; 6]);
        ga.send(&fake);
        assert!(gb.reply(602, Duration::from_millis(700)).is_none(), "a guest's fake DHCP answer reached another guest");

        // Deleting the port stops the service (the tap goes with it).
        let (st, _) = tb
            .net(
                reqwest::Method::DELETE,
                &format!("/v2.0/ports/{}", a["id"].as_str().expect("id")),
                None,
            )
            .await;
        assert_eq!(st, 204);
        let n0 = &tb.nodes[0];
        let tap = tap_of(&a);
        eventually(15, "the VM's tap is removed", || !n0.has_link(&tap)).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_dhcp_opts_and_dns_names_reach_the_guest() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let s = setup(1).await;
        let tb = &s.tb;
        let (st, b) = tb
            .net(
                reqwest::Method::PUT,
                &format!("/v2.0/networks/{}", s.net),
                Some(json!({"network": {"dns_domain": "example.org."}})),
            )
            .await;
        assert_eq!(st, 200, "{b}");
        let p = tb.vm_port(&s.net, &s.dhcp_subnet, "10.70.0.20", 0).await;
        let id = p["id"].as_str().expect("id").to_string();
        let mut g = Guest::open(
            &tb.nodes[0].ns.path(),
            &tap_of(&p),
            p["mac_address"].as_str().expect("mac"),
        );
        // Before any option: the defaults, the generated host name and the network's domain.
        let first = g.offer_until(700, |_| true).expect("OFFER");
        assert_eq!(first.option(12), Some(&b"host-10-70-0-20"[..]), "hostname");
        assert_eq!(first.option(15), Some(&b"example.org"[..]), "domain");
        assert_eq!(first.option(67), None);

        let (st, b) = tb
            .net(
                reqwest::Method::PUT,
                &format!("/v2.0/ports/{id}"),
                Some(json!({"port": {"dns_name": "web-1", "extra_dhcp_opts": [
                    {"opt_name": "tftp-server", "opt_value": "10.70.0.5"},
                    {"opt_name": "bootfile-name", "opt_value": "pxelinux.0"},
                    {"opt_name": "server-ip-address", "opt_value": "10.70.0.5"},
                    {"opt_name": "mtu", "opt_value": "1400"},
                    {"opt_name": "dns-server", "opt_value": "9.9.9.9"},
                    {"opt_name": "150", "opt_value": "10.70.0.6"}]}})),
            )
            .await;
        assert_eq!(st, 200, "{b}");
        let r = g
            .offer_until(800, |r| r.option(67).is_some() && r.option(12) == Some(b"web-1"))
            .expect("OFFER");
        assert_eq!(r.option(66), Some(&b"10.70.0.5"[..]), "tftp-server");
        assert_eq!(r.option(67), Some(&b"pxelinux.0"[..]), "bootfile-name");
        assert_eq!(r.siaddr, Ipv4Addr::new(10, 70, 0, 5), "server-ip-address");
        assert_eq!(r.option(26), Some(&1400u16.to_be_bytes()[..]), "mtu overridden");
        assert_eq!(r.option(6), Some(&[9, 9, 9, 9][..]), "dns overridden");
        assert_eq!(r.option(150), Some(&[10, 70, 0, 6][..]), "numeric option");
        assert_eq!(r.option(12), Some(&b"web-1"[..]), "hostname from dns_name");
        assert_eq!(r.option(3), Some(&[10, 70, 0, 1][..]), "router untouched");
        let ack = g
            .exchange(
                MessageType::Request,
                900,
                Some(Ipv4Addr::new(10, 70, 0, 20)),
                Ipv4Addr::UNSPECIFIED,
            )
            .expect("ACK");
        assert_eq!((ack.kind, ack.option(67)), (MessageType::Ack, Some(&b"pxelinux.0"[..])));

        // A null value removes one option: the MTU goes back to the network's.
        let (st, b) = tb
            .net(
                reqwest::Method::PUT,
                &format!("/v2.0/ports/{id}"),
                Some(json!({"port": {"extra_dhcp_opts": [{"opt_name": "mtu", "opt_value": null}]}})),
            )
            .await;
        assert_eq!(st, 200, "{b}");
        let r = g
            .offer_until(1000, |r| r.option(26) == Some(&1450u16.to_be_bytes()[..]))
            .expect("OFFER");
        assert_eq!(
            r.option(26),
            Some(&1450u16.to_be_bytes()[..]),
            "mtu back to the default"
        );
        assert_eq!(r.option(67), Some(&b"pxelinux.0"[..]), "other options kept");
    })
    .await
    .expect("test timed out");
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-dhcp.sh"]
async fn dhcp_latency() {
    support::require_root();
    let n: u32 = std::env::var("ISTHMUS_BENCH_EXCHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let s = setup(1).await;
    let a = s.tb.vm_port(&s.net, &s.dhcp_subnet, "10.70.0.10", 0).await;
    let mut g = Guest::open(
        &s.tb.nodes[0].ns.path(),
        &tap_of(&a),
        a["mac_address"].as_str().expect("mac"),
    );
    let ip = Ipv4Addr::new(10, 70, 0, 10);
    for i in 0..100 {
        if g.exchange(MessageType::Discover, i, None, Ipv4Addr::UNSPECIFIED)
            .is_some()
        {
            break;
        }
    }
    let (mut discover, mut request, mut both) = (vec![], vec![], vec![]);
    let r = tokio::task::block_in_place(|| {
        for i in 0..n {
            let t0 = Instant::now();
            let o = g.exchange(MessageType::Discover, 10_000 + 2 * i, None, Ipv4Addr::UNSPECIFIED);
            let t1 = Instant::now();
            let a = g.exchange(MessageType::Request, 10_001 + 2 * i, Some(ip), Ipv4Addr::UNSPECIFIED);
            let t2 = Instant::now();
            if o.map(|o| o.kind) != Some(MessageType::Offer) || a.map(|a| a.kind) != Some(MessageType::Ack) {
                return Err(i);
            }
            discover.push((t1 - t0).as_secs_f64() * 1e3);
            request.push((t2 - t1).as_secs_f64() * 1e3);
            both.push((t2 - t0).as_secs_f64() * 1e3);
        }
        Ok(())
    });
    assert_eq!(r, Ok(()), "an exchange got no answer");
    println!();
    println!("DHCP latency over {n} DISCOVER/REQUEST exchanges on a VM tap, ms (frame written → answer read)");
    println!("{:<22} {:>8} {:>8} {:>8}", "", "p50", "p99", "max");
    for (name, v) in [
        ("DISCOVER → OFFER", &discover),
        ("REQUEST → ACK", &request),
        ("whole exchange", &both),
    ] {
        println!(
            "{:<22} {:>8.3} {:>8.3} {:>8.3}",
            name,
            pct(v, 50.0),
            pct(v, 99.0),
            pct(v, 100.0)
        );
    }
}

/// The node's bridge-family `isthmus` table (the DHCP guard) is there while the node has a VM
/// port, and goes once its last port and network are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dhcp_guard_goes_with_the_last_network() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let s = setup(1).await;
        let tb = &s.tb;
        let ns = tb.nodes[0].ns.name.clone();
        let has_table =
            move || support::run(&["ip", "netns", "exec", &ns, "nft", "list", "table", "bridge", "isthmus"]).0;
        let port = tb.vm_port(&s.net, &s.dhcp_subnet, "10.70.0.40", 0).await;
        eventually(15, "the DHCP guard is installed", has_table.clone()).await;
        let id = port["id"].as_str().expect("id");
        let (st, b) = tb
            .net(reqwest::Method::DELETE, &format!("/v2.0/ports/{id}"), None)
            .await;
        assert_eq!(st, 204, "{b}");
        // The node's view drops the network with its last port there; the network goes too.
        let (st, b) = tb
            .net(reqwest::Method::DELETE, &format!("/v2.0/networks/{}", s.net), None)
            .await;
        assert_eq!(st, 204, "{b}");
        eventually(15, "the DHCP guard is removed", || !has_table()).await;
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dhcpv6_gives_stateful_addresses_and_stateless_options() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tb = Testbed::start(1).await;
        let t = tb.member("dhcp6").await;
        let mut ports = vec![];
        for (name, cidr, mode) in [
            ("v6-stateful", "2001:db8:60::/64", "dhcpv6-stateful"),
            ("v6-stateless", "2001:db8:61::/64", "dhcpv6-stateless"),
        ] {
            let n = tb.create(&t, "networks", "network", json!({"name": name})).await;
            let net = n["id"].as_str().expect("id").to_string();
            let s = tb
                .create(
                    &t,
                    "subnets",
                    "subnet",
                    json!({"network_id": net, "cidr": cidr, "ip_version": 6,
                        "ipv6_ra_mode": mode, "ipv6_address_mode": mode,
                        "dns_nameservers": ["2001:db8::53"]}),
                )
                .await;
            let sid = s["id"].as_str().expect("id").to_string();
            let (_, n) = tb
                .net(reqwest::Method::GET, &format!("/v2.0/networks/{net}"), None)
                .await;
            let body = json!({"port": {"network_id": net, "device_owner": "compute:nova",
                "project_id": n["network"]["project_id"], "binding:host_id": tb.nodes[0].name,
                "fixed_ips": [{"subnet_id": sid}]}});
            let (st, b) = tb.net(reqwest::Method::POST, "/v2.0/ports", Some(body)).await;
            assert_eq!(st, 201, "{b}");
            let port = b["port"].clone();
            let tap = tap_of(&port);
            eventually(15, "the agent makes the VM's tap", || tb.nodes[0].has_link(&tap)).await;
            ports.push(port);
        }
        let node_ns = tb.nodes[0].ns.path();
        // Stateful: Solicit → Advertise with the port's address; Request → Reply with it.
        let p = &ports[0];
        let want: std::net::Ipv6Addr = p["fixed_ips"][0]["ip_address"].as_str().unwrap().parse().unwrap();
        let mut g = Guest::open(&node_ns, &tap_of(p), p["mac_address"].as_str().unwrap());
        let mut adv = None;
        for i in 0..40u8 {
            g.send(&client_frame6(Kind::Solicit, g.mac, [6, 0, i], Some(1), None));
            adv = g.reply6([6, 0, i], Duration::from_millis(500));
            if adv.is_some() {
                break;
            }
        }
        let adv = adv.expect("no Advertise for the stateful port");
        assert!(adv.checksum_ok);
        assert_eq!((adv.kind, adv.address), (Kind::Advertise, Some(want)));
        assert_eq!(adv.dns, vec!["2001:db8::53".parse::<std::net::Ipv6Addr>().unwrap()]);
        g.send(&client_frame6(
            Kind::Request,
            g.mac,
            [6, 1, 0],
            Some(1),
            Some(&adv.server_id),
        ));
        let rep = g
            .reply6([6, 1, 0], Duration::from_secs(2))
            .expect("no Reply to Request");
        assert_eq!((rep.kind, rep.address), (Kind::Reply, Some(want)));
        // Another MAC on that tap gets nothing.
        let mut spoof = client_frame6(Kind::Solicit, [2, 0, 0, 0, 0, 9], [6, 2, 0], Some(1), None);
        spoof[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
        g.send(&spoof);
        assert!(
            g.reply6([6, 2, 0], Duration::from_secs(1)).is_none(),
            "answered a foreign MAC"
        );
        // Stateless: no address offered; an Information-request gets the DNS servers.
        let p = &ports[1];
        let mut g = Guest::open(&node_ns, &tap_of(p), p["mac_address"].as_str().unwrap());
        let mut info = None;
        for i in 0..40u8 {
            g.send(&client_frame6(Kind::InformationRequest, g.mac, [7, 0, i], None, None));
            info = g.reply6([7, 0, i], Duration::from_millis(500));
            if info.is_some() {
                break;
            }
        }
        let info = info.expect("no Reply to Information-request");
        assert_eq!((info.kind, info.address), (Kind::Reply, None));
        assert_eq!(info.dns.len(), 1);
        g.send(&client_frame6(Kind::Solicit, g.mac, [7, 1, 0], Some(1), None));
        assert!(
            g.reply6([7, 1, 0], Duration::from_secs(1)).is_none(),
            "a stateless subnet offered an address"
        );
    })
    .await
    .expect("test timed out");
}
