//! Security groups and port security, end to end: the API server, two nodes with real agents,
//! workloads in namespaces, real packets. Needs root (CI runs as root).
//!
//! One bed, in steps: rules by protocol, port range, ICMP type and remote prefix; remote
//! groups gaining and losing a member on another node; stateful return traffic vs unsolicited
//! packets; a stateless group doing exactly what its rules say; a removed rule cutting a flow
//! that is already running; spoofed IP, MAC and ARP, forged DHCP answers; an allowed address
//! pair (a VIP moved between two ports); port security off; an agent restart that keeps
//! enforcing throughout.

mod support;
mod testbed;

use reqwest::Method;
use serde_json::{json, Value};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use support::{in_ns, tcp_ok, udp_in, until, Ns};
use testbed::Testbed;

const TEST_TIMEOUT: Duration = Duration::from_secs(240);

/// UDP to `to:port` from `from`: (an answer came back, datagrams the server saw).
fn udp(src: &Ns, from: &str, dst: &Ns, to: &str, port: u16) -> (bool, usize) {
    let server = udp_in(dst, SocketAddr::new(to.parse().unwrap(), port));
    server.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let client = udp_in(src, SocketAddr::new(from.parse().unwrap(), 0));
    client.set_read_timeout(Some(Duration::from_millis(250))).unwrap();
    let srv = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut seen = 0;
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            if let Ok((n, peer)) = server.recv_from(&mut buf) {
                seen += 1;
                let _ = server.send_to(&buf[..n], peer);
            }
        }
        seen
    });
    let mut got = false;
    let mut buf = [0u8; 64];
    for _ in 0..4 {
        let _ = client.send_to(b"hello", SocketAddr::new(to.parse().unwrap(), port));
        if client.recv(&mut buf).is_ok() {
            got = true;
            break;
        }
    }
    (got, srv.join().unwrap())
}

/// One UDP flow (same ports throughout) for `run`: a datagram every 20 ms, echoed by a server
/// in `dst`. The thread answers when each echo came back.
fn udp_flow(
    src: &Ns,
    from: &str,
    dst: &Ns,
    to: &str,
    port: u16,
    run: Duration,
) -> std::thread::JoinHandle<Vec<Instant>> {
    let to_addr = SocketAddr::new(to.parse().unwrap(), port);
    let server = udp_in(dst, to_addr);
    server.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let client = udp_in(src, SocketAddr::new(from.parse().unwrap(), 0));
    client.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    std::thread::spawn(move || {
        let end = Instant::now() + run;
        let srv = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while Instant::now() < end + Duration::from_millis(300) {
                if let Ok((n, peer)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], peer);
                }
            }
        });
        let mut echoes = vec![];
        let mut buf = [0u8; 64];
        while Instant::now() < end {
            let _ = client.send_to(b"flow", to_addr);
            if client.recv(&mut buf).is_ok() {
                echoes.push(Instant::now());
            }
        }
        let _ = srv.join();
        echoes
    })
}

fn ping(src: &Ns, to: &str) -> bool {
    support::run(&["ip", "netns", "exec", &src.name, "ping", "-c", "1", "-W", "1", to]).0
}

/// Sends a gratuitous ARP from `ns`'s eth0 claiming `ip` for the interface's MAC, and answers
/// whether a capture on `dst`'s eth0 saw it.
fn arp_claim_seen(ns: &Ns, ip: [u8; 4], dst: &Ns) -> bool {
    const ETH_P_ARP: u16 = 0x0806;
    let raw = |n: &Ns| {
        let path = n.path();
        in_ns(&path, || {
            // SAFETY: plain socket(2) call; the fd is owned below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (ETH_P_ARP.to_be()) as i32) };
            assert!(fd >= 0, "packet socket: {}", std::io::Error::last_os_error());
            // SAFETY: fd is a fresh socket we own.
            let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let name = std::ffi::CString::new("eth0").unwrap();
            // SAFETY: name is a valid C string.
            let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert!(idx > 0);
            // SAFETY: sockaddr_ll is plain data; zeroed is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ARP.to_be();
            sll.sll_ifindex = idx as i32;
            // SAFETY: binding our own socket to a valid sockaddr_ll.
            let rc = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0);
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            // SAFETY: valid timeval for SO_RCVTIMEO.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            sock
        })
    };
    let mac_text = ns.ip(&["-br", "link", "show", "eth0"]);
    let mac: Vec<u8> = mac_text
        .split_whitespace()
        .nth(2)
        .unwrap_or("")
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    assert_eq!(mac.len(), 6, "{mac_text}");
    let capture = raw(dst);
    let sender = raw(ns);
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&ip);
    for _ in 0..3 {
        // SAFETY: sending a buffer we own on a bound packet socket.
        unsafe {
            libc::send(
                sender.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
    }
    let deadline = Instant::now() + Duration::from_millis(800);
    let mut buf = [0u8; 128];
    while Instant::now() < deadline {
        // SAFETY: receiving into a buffer we own.
        let n = unsafe { libc::recv(capture.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n >= 42 && buf[28..32] == ip && buf[6..12] == mac[..] {
            return true;
        }
    }
    false
}

struct Bed {
    tb: Testbed,
    token: String,
    net: String,
    subnet: String,
}

impl Bed {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.tb.net_as(&self.token, method, path, body).await
    }

    async fn group(&self, name: &str, stateful: bool) -> String {
        let g = self
            .tb
            .create(
                &self.token,
                "security-groups",
                "security_group",
                json!({"name": name, "stateful": stateful}),
            )
            .await;
        g["id"].as_str().unwrap().to_string()
    }

    async fn rule(&self, attrs: Value) -> String {
        let r = self
            .tb
            .create(&self.token, "security-group-rules", "security_group_rule", attrs)
            .await;
        r["id"].as_str().unwrap().to_string()
    }

    async fn delete_rule(&self, id: &str) {
        let (s, b) = self
            .call(Method::DELETE, &format!("/v2.0/security-group-rules/{id}"), None)
            .await;
        assert_eq!(s, 204, "{b}");
    }

    /// A workload on `node` with address `ip`, and extra port attributes.
    async fn workload(&self, ip: &str, node: usize, extra: Value) -> (String, Ns) {
        let mut attrs = json!({"network_id": self.net, "fixed_ips": [{"subnet_id": self.subnet, "ip_address": ip}]});
        if let (Some(a), Some(e)) = (attrs.as_object_mut(), extra.as_object()) {
            a.extend(e.clone());
        }
        let p = self.tb.create(&self.token, "ports", "port", attrs).await;
        let id = p["id"].as_str().unwrap().to_string();
        let (ns, _) = self.tb.nodes[node].attach(&id).await;
        (id, ns)
    }

    async fn set_groups(&self, port: &str, groups: &[&str]) {
        let (s, b) = self
            .call(
                Method::PUT,
                &format!("/v2.0/ports/{port}"),
                Some(json!({"port": {"security_groups": groups}})),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_groups_and_port_security_are_enforced_on_real_packets() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        // Changes must work as patches: no full sync comes along to repair them.
        let tb = Testbed::start_opts(2, false, 600).await;
        let token = tb.member("sg-one").await;
        let n = tb.create(&token, "networks", "network", json!({"name": "sg-net"})).await;
        let net = n["id"].as_str().unwrap().to_string();
        let s = tb
            .create(&token, "subnets", "subnet", json!({"network_id": net, "cidr": "10.20.0.0/24", "ip_version": 4}))
            .await;
        let subnet = s["id"].as_str().unwrap().to_string();
        let bed = Bed { tb, token, net, subnet };

        // web: TCP 8000-8001 from anywhere, ping (type 8 only) from the subnet, UDP 5353 from
        // members of `clients`. New groups get Neutron's two egress-anywhere rules.
        let web = bed.group("web", true).await;
        let clients = bed.group("clients", true).await;
        let other = bed.group("other", true).await;
        for r in [
            json!({"security_group_id": web, "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 8000, "port_range_max": 8001}),
            json!({"security_group_id": web, "direction": "ingress", "ethertype": "IPv4", "protocol": "icmp", "port_range_min": 8, "remote_ip_prefix": "10.20.0.0/24"}),
        ] {
            bed.rule(r).await;
        }
        let udp_rule = bed
            .rule(json!({"security_group_id": web, "direction": "ingress", "ethertype": "IPv4", "protocol": "udp", "port_range_min": 5353, "port_range_max": 5353, "remote_group_id": clients}))
            .await;
        let (_s, srv) = bed.workload("10.20.0.10", 1, json!({"security_groups": [web]})).await;
        let (_c, cli) = bed.workload("10.20.0.20", 0, json!({"security_groups": [clients]})).await;
        let (d, dd) = bed.workload("10.20.0.30", 0, json!({"security_groups": [other]})).await;

        // Allowed and denied by protocol, range and type, in both directions.
        until(20, "the client reaches the server on TCP 8000", true, || {
            tcp_ok(&cli, "10.20.0.20", &srv, "10.20.0.10", 8000)
        })
        .await;
        assert!(tcp_ok(&cli, "10.20.0.20", &srv, "10.20.0.10", 8001), "8001 is in the range");
        assert!(!tcp_ok(&cli, "10.20.0.20", &srv, "10.20.0.10", 8002), "8002 is not in the range");
        assert!(!tcp_ok(&cli, "10.20.0.20", &srv, "10.20.0.10", 22), "no rule for 22");
        assert!(ping(&cli, "10.20.0.10"), "echo requests from the subnet are allowed, replies return");
        // Stateful: the client's group has no ingress rule; its own connections' replies pass
        // (above), unsolicited packets to it do not.
        assert!(!ping(&srv, "10.20.0.20"), "unsolicited echo request reached the client");
        assert!(!tcp_ok(&srv, "10.20.0.10", &cli, "10.20.0.20", 8000), "unsolicited TCP reached the client");
        // Remote group: only members of `clients` reach UDP 5353.
        assert!(udp(&cli, "10.20.0.20", &srv, "10.20.0.10", 5353).0, "a member of clients");
        let (got, seen) = udp(&dd, "10.20.0.30", &srv, "10.20.0.10", 5353);
        assert!(!got && seen == 0, "a non-member reached UDP 5353 ({seen} seen)");
        // d (node 0) joins `clients`: the server's node (1) learns the member and opens.
        bed.set_groups(&d, &[&other, &clients]).await;
        until(10, "a new member of clients reaches UDP 5353", true, || {
            udp(&dd, "10.20.0.30", &srv, "10.20.0.10", 5353).0
        })
        .await;
        bed.set_groups(&d, &[&other]).await;
        until(10, "a former member of clients is cut off", false, || {
            udp(&dd, "10.20.0.30", &srv, "10.20.0.10", 5353).1 > 0
        })
        .await;

        // The fast path of established connections still checks addresses: another port on
        // the client's node, sending from the client's address and port into the client's
        // established flow (a static neighbour entry, as its ARP would be refused), is
        // dropped; the client's own datagrams go on.
        {
            let to: SocketAddr = "10.20.0.10:5353".parse().unwrap();
            let server = udp_in(&srv, to);
            server.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let client = udp_in(&cli, "10.20.0.20:45353".parse().unwrap());
            client.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = [0u8; 64];
            let mut echoed = 0;
            for _ in 0..20 {
                let _ = client.send_to(b"mine", to);
                if let Ok((n, peer)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], peer);
                    if client.recv(&mut buf).is_ok() {
                        echoed += 1;
                    }
                }
                if echoed == 3 {
                    break;
                }
            }
            assert_eq!(echoed, 3, "the client's flow to UDP 5353 did not get established");
            let srv_mac = srv.ip(&["-br", "link", "show", "eth0"]);
            let srv_mac = srv_mac.split_whitespace().nth(2).unwrap().to_string();
            dd.ip(&["addr", "add", "10.20.0.20/32", "dev", "eth0"]);
            dd.ip(&["neigh", "replace", "10.20.0.10", "lladdr", &srv_mac, "dev", "eth0"]);
            let forger = udp_in(&dd, "10.20.0.20:45353".parse().unwrap());
            for _ in 0..5 {
                let _ = forger.send_to(b"forged", to);
            }
            let _ = client.send_to(b"mine", to);
            let mut got = vec![];
            while let Ok((n, _)) = server.recv_from(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            dd.ip(&["addr", "del", "10.20.0.20/32", "dev", "eth0"]);
            dd.try_ip(&["neigh", "del", "10.20.0.10", "dev", "eth0"]);
            assert!(!got.iter().any(|p| p == "forged"), "a forged datagram joined an established flow: {got:?}");
            assert!(got.iter().any(|p| p == "mine"), "the client's own datagram was lost: {got:?}");
        }

        // A change leaves a running flow that is still allowed alone, and a removed rule stops
        // a flow already running (the fast path for established connections is re-checked
        // after every change): one socket pair, a datagram every 20 ms; an unrelated rule
        // added after 1 s, the flow's rule deleted after 2 s.
        let flow = udp_flow(&cli, "10.20.0.20", &srv, "10.20.0.10", 5353, Duration::from_millis(4000));
        tokio::time::sleep(Duration::from_millis(1000)).await;
        bed.rule(json!({"security_group_id": web, "direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": 9999, "port_range_max": 9999}))
            .await;
        let changed = Instant::now();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        bed.delete_rule(&udp_rule).await;
        let cut = Instant::now();
        let echoes = flow.join().expect("flow");
        let between: Vec<Instant> = echoes.iter().copied().filter(|t| *t > changed && *t < cut).collect();
        let gap = between.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(Duration::MAX);
        assert!(
            between.len() > 20 && gap < Duration::from_millis(300),
            "an unrelated change disturbed a running flow: {} echoes, longest gap {gap:?}",
            between.len()
        );
        let before = echoes.iter().filter(|t| **t < cut).count();
        let late = echoes.iter().filter(|t| **t > cut + Duration::from_millis(500)).count();
        assert!(before > 10, "the flow did not run before the delete ({before} echoes)");
        assert_eq!(late, 0, "{late} echoes more than 0.5 s after the rule was deleted");
        let (got, seen) = udp(&cli, "10.20.0.20", &srv, "10.20.0.10", 5353);
        assert!(!got && seen == 0, "the deleted rule still lets UDP 5353 through");

        // Stateless: ingress UDP 7000 and no egress rule. Requests arrive, answers are dropped
        // as written (a stateful group would have let them back).
        let sl = bed.group("stateless", false).await;
        let (_e, ee) = bed.workload("10.20.0.40", 1, json!({"security_groups": [sl]})).await;
        bed.rule(json!({"security_group_id": sl, "direction": "ingress", "ethertype": "IPv4", "protocol": "udp", "port_range_min": 7000, "port_range_max": 7000}))
            .await;
        let (s, rules) = bed
            .call(Method::GET, &format!("/v2.0/security-group-rules?security_group_id={sl}&direction=egress"), None)
            .await;
        assert_eq!(s, 200);
        for r in rules["security_group_rules"].as_array().cloned().unwrap_or_default() {
            bed.delete_rule(r["id"].as_str().unwrap()).await;
        }
        until(10, "UDP 7000 reaches the stateless port", true, || {
            udp(&cli, "10.20.0.20", &ee, "10.20.0.40", 7000).1 > 0
        })
        .await;
        let (got, seen) = udp(&cli, "10.20.0.20", &ee, "10.20.0.40", 7000);
        assert!(seen > 0 && !got, "stateless: the answer must need an egress rule ({got}, {seen})");
        bed.rule(json!({"security_group_id": sl, "direction": "egress", "ethertype": "IPv4", "protocol": "udp"}))
            .await;
        until(10, "with an egress rule the stateless port answers", true, || {
            udp(&cli, "10.20.0.20", &ee, "10.20.0.40", 7000).0
        })
        .await;

        // Spoofing: another source address, another MAC, an ARP claim for someone else's
        // address, a DHCP answer from a workload.
        cli.ip(&["addr", "add", "10.20.0.99/24", "dev", "eth0"]);
        assert!(!tcp_ok(&cli, "10.20.0.99", &srv, "10.20.0.10", 8000), "a spoofed source got through");
        assert!(!arp_claim_seen(&cli, [10, 20, 0, 10], &dd), "a spoofed ARP claim got through");
        assert!(arp_claim_seen(&cli, [10, 20, 0, 20], &dd), "the client's own ARP must pass");
        let (got, seen) = udp(&cli, "10.20.0.20", &srv, "10.20.0.10", 8000);
        assert!(!got && seen == 0);
        {
            let dhcp = in_ns(&cli.path(), || UdpSocket::bind("10.20.0.20:67").expect("bind 67"));
            let watch = udp_in(&srv, "10.20.0.10:68".parse().unwrap());
            watch.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            let _ = dhcp.send_to(b"\x02forged offer", "10.20.0.10:68");
            let mut buf = [0u8; 64];
            assert!(watch.recv(&mut buf).is_err(), "a forged DHCP answer got through");
        }
        let mac_before = cli.ip(&["-br", "link", "show", "eth0"]);
        cli.ip(&["link", "set", "eth0", "address", "fa:16:3e:12:34:56"]);
        assert!(!tcp_ok(&cli, "10.20.0.20", &srv, "10.20.0.10", 8000), "a spoofed MAC got through");
        let mac = mac_before.split_whitespace().nth(2).unwrap().to_string();
        cli.ip(&["link", "set", "eth0", "address", &mac]);
        cli.ip(&["addr", "del", "10.20.0.99/24", "dev", "eth0"]);
        until(10, "the client works again with its own MAC", true, || {
            tcp_ok(&cli, "10.20.0.20", &srv, "10.20.0.10", 8000)
        })
        .await;

        // Allowed address pair: a VIP that either of two ports may hold (VRRP style). The VIP
        // works from the port that holds it; from a port without the pair it is a spoof.
        let vip = "10.20.0.200";
        let pair = json!({"security_groups": [clients], "allowed_address_pairs": [{"ip_address": vip}]});
        let (_v1, v1) = bed.workload("10.20.0.50", 0, pair.clone()).await;
        let (_v2, v2) = bed.workload("10.20.0.51", 1, pair).await;
        v1.ip(&["addr", "add", &format!("{vip}/24"), "dev", "eth0"]);
        until(10, "the VIP on the first holder", true, || tcp_ok(&v1, vip, &srv, "10.20.0.10", 8000)).await;
        v1.ip(&["addr", "del", &format!("{vip}/24"), "dev", "eth0"]);
        v2.ip(&["addr", "add", &format!("{vip}/24"), "dev", "eth0"]);
        // The server's neighbour entry for the VIP still points at the first holder: the new
        // holder announces itself (its gratuitous ARP is allowed by the pair).
        assert!(arp_claim_seen(&v2, [10, 20, 0, 200], &srv), "the pair allows the VIP's ARP");
        srv.try_ip(&["neigh", "flush", "dev", "eth0"]);
        until(10, "the VIP moved to the second holder", true, || tcp_ok(&v2, vip, &srv, "10.20.0.10", 8000)).await;
        cli.ip(&["addr", "add", &format!("{vip}/24"), "dev", "eth0"]);
        assert!(!arp_claim_seen(&cli, [10, 20, 0, 200], &srv), "a port without the pair claimed the VIP");
        cli.ip(&["addr", "del", &format!("{vip}/24"), "dev", "eth0"]);

        // Port security off: nothing filtered, spoofing included.
        let (_o, open) = bed.workload("10.20.0.60", 0, json!({"port_security_enabled": false, "security_groups": []})).await;
        until(10, "the server reaches an unfiltered port on any port", true, || {
            tcp_ok(&srv, "10.20.0.10", &open, "10.20.0.60", 4444)
        })
        .await;
        open.ip(&["addr", "add", "10.20.0.98/24", "dev", "eth0"]);
        assert!(tcp_ok(&open, "10.20.0.98", &srv, "10.20.0.10", 8000), "an unfiltered port may use any source");
        // Neutron refuses to turn port security off on a port with groups.
        let (s, b) = bed
            .call(Method::PUT, &format!("/v2.0/ports/{d}"), Some(json!({"port": {"port_security_enabled": false}})))
            .await;
        assert_eq!(s, 409, "{b}");

        // Agent restart: enforcement holds while it is down and after it adopts the table.
        let mut tb = bed.tb;
        tb.nodes[1].kill_agent();
        assert!(!tcp_ok(&cli, "10.20.0.20", &srv, "10.20.0.10", 22), "open while the agent was down");
        assert!(tcp_ok(&cli, "10.20.0.20", &srv, "10.20.0.10", 8000), "closed while the agent was down");
        tb.nodes[1].start_agent();
        tb.nodes[1].wait_socket().await;
        let node = &tb.nodes[1];
        testbed::eventually(20, "the restarted agent replaces its table whole", || {
            node.log_count("firewall replaced whole") >= 2
        })
        .await;
        assert!(!tcp_ok(&cli, "10.20.0.20", &srv, "10.20.0.10", 22), "open after the restart");
        assert!(tcp_ok(&cli, "10.20.0.20", &srv, "10.20.0.10", 8000), "closed after the restart");
    })
    .await
    .expect("test timed out");
}
