//! Distributed DHCP: every agent answers the DHCP requests of its own VM ports, on their tap
//! devices, from the node's view. No central server, no lease database: a port's address is its
//! fixed IP.
//!
//! One raw packet socket per served tap, with a kernel filter that passes only IPv4 UDP to port
//! 67, so the guest's other traffic never reaches the agent. Answers are written to the same tap
//! (straight to the guest), so they never enter the bridge or reach another node. Frames whose
//! source MAC is not the port's get nothing, nor do subnets with `enable_dhcp` false.

use super::{Controller, Outcome};
use crate::kernel::{MacAddr, PacketIo};
use crate::metrics::{AgentMetrics, DhcpLabels};
use crate::names;
use crate::objects::Objects;
use crate::state::{NodeState, Snapshot};
use crate::view::PortKind;
use isthmus_dhcp::{build, decide, parse, Lease};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};

/// The server identifier when a subnet has no gateway: link-local, never a guest's address.
const NO_GATEWAY_SERVER_ID: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Port `port_id` if it is bound to `node`, with its MAC and the MAC the DHCP server answers
/// from: the host side of the tap (libvirt's convention), never the guest's own MAC.
fn local_port<'a>(objects: &'a Objects, node: &str, port_id: &str) -> Option<(&'a crate::objects::Port, [u8; 6])> {
    let p = objects.port(port_id)?;
    if p.host_id != node {
        return None;
    }
    let mut server_mac = p.mac_address.parse::<MacAddr>().ok()?.0;
    server_mac[0] = 0xfe;
    Some((p, server_mac))
}

/// The lease of VM port `port_id` (bound to `node`), if it has an IPv4 address on a subnet
/// with DHCP enabled. Pure.
pub fn lease_for(objects: &Objects, node: &str, port_id: &str, lease_secs: u32) -> Option<Lease> {
    let (p, server_mac) = local_port(objects, node, port_id)?;
    let net = objects.network(&p.network_id)?;
    let mtu = net.mtu.and_then(|m| u16::try_from(m).ok()).unwrap_or(1450);
    for f in &p.fixed_ips {
        let Ok(ip) = f.ip_address.parse::<Ipv4Addr>() else {
            continue;
        };
        let Some(s) = objects.subnet(&f.subnet_id) else {
            continue;
        };
        if s.enable_dhcp == Some(false) {
            continue;
        }
        let Ok(cidr) = s.cidr.parse::<ipnet::Ipv4Net>() else {
            continue;
        };
        let router = s.gateway_ip.as_deref().and_then(|g| g.parse::<Ipv4Addr>().ok());
        let v4 = |v: &str| v.parse::<Ipv4Addr>().ok();
        let dns = s.dns_nameservers.iter().filter_map(|d| v4(d)).collect();
        let routes = s
            .host_routes
            .iter()
            .filter_map(|r| {
                let dst = r.destination.parse::<ipnet::Ipv4Net>().ok()?;
                Some((dst.network(), dst.prefix_len(), v4(&r.nexthop)?))
            })
            .collect();
        let text = |m: &serde_json::Map<String, serde_json::Value>, k: &str| {
            m.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_string()
        };
        // dns-integration: the port's name (first label of an FQDN), the network's domain.
        let dns_name = text(&p.other, "dns_name");
        let hostname = match dns_name.split('.').next().filter(|h| !h.is_empty()) {
            Some(h) => h.to_string(),
            None => format!("host-{}", f.ip_address.replace('.', "-")),
        };
        let domain = text(&net.other, "dns_domain");
        let domain = domain.trim_end_matches('.');
        let mut lease = Lease {
            ip,
            prefix_len: cidr.prefix_len(),
            router,
            dns,
            mtu,
            routes,
            lease_secs,
            server_id: router.unwrap_or(NO_GATEWAY_SERVER_ID),
            server_mac,
            domain: (!domain.is_empty()).then(|| domain.to_string()),
            hostname: Some(hostname),
            next_server: None,
            extra: vec![],
        };
        lease.apply(extra_dhcp_opts(&p.other));
        return Some(lease);
    }
    None
}

/// The port's DHCPv4 `extra_dhcp_opts` (from its API rendering), encoded; options that do not
/// encode (the API refuses them, so only from an older server) are skipped.
fn extra_dhcp_opts(port: &serde_json::Map<String, serde_json::Value>) -> Vec<isthmus_dhcp::opts::Extra> {
    let Some(opts) = port.get("extra_dhcp_opts").and_then(|v| v.as_array()) else {
        return vec![];
    };
    opts.iter()
        .filter(|o| o.get("ip_version").and_then(|v| v.as_u64()).unwrap_or(4) == 4)
        .filter_map(|o| {
            let name = o.get("opt_name")?.as_str()?;
            let value = o.get("opt_value")?.as_str()?;
            isthmus_dhcp::opts::encode(name, value)
                .map_err(|e| debug!(option = name, error = %e, "extra DHCP option skipped"))
                .ok()
        })
        .collect()
}

/// The DNS servers a port's `extra_dhcp_opts` give DHCPv6 (`dns-server`, IP version 6), if any.
fn dns_servers_v6(port: &serde_json::Map<String, serde_json::Value>) -> Option<Vec<std::net::Ipv6Addr>> {
    port.get("extra_dhcp_opts")?
        .as_array()?
        .iter()
        .filter(|o| o.get("ip_version").and_then(|v| v.as_u64()) == Some(6))
        .filter(|o| {
            o.get("opt_name")
                .and_then(|v| v.as_str())
                .is_some_and(isthmus_dhcp::opts::is_dns_server_v6)
        })
        .find_map(|o| isthmus_dhcp::opts::dns_servers_v6(o.get("opt_value")?.as_str()?))
}

/// What VM port `port_id` gets over DHCPv6, if it has an IPv6 address on a subnet with DHCP
/// in a DHCPv6 address mode: its address (stateful) or only the other configuration
/// (stateless). Pure.
pub fn lease6_for(objects: &Objects, node: &str, port_id: &str, lease_secs: u32) -> Option<isthmus_dhcp::v6::Lease6> {
    let (p, server_mac) = local_port(objects, node, port_id)?;
    for f in &p.fixed_ips {
        let Ok(ip) = f.ip_address.parse::<std::net::Ipv6Addr>() else {
            continue;
        };
        let Some(s) = objects.subnet(&f.subnet_id) else {
            continue;
        };
        if s.enable_dhcp == Some(false) {
            continue;
        }
        let stateful = match s.other.get("ipv6_address_mode").and_then(|v| v.as_str()) {
            Some("dhcpv6-stateful") => true,
            Some("dhcpv6-stateless") => false,
            _ => continue,
        };
        return Some(isthmus_dhcp::v6::Lease6 {
            address: stateful.then_some(ip),
            dns: dns_servers_v6(&p.other)
                .unwrap_or_else(|| s.dns_nameservers.iter().filter_map(|d| d.parse().ok()).collect()),
            preferred_secs: lease_secs,
            valid_secs: lease_secs.saturating_mul(2),
            server_mac,
        });
    }
    None
}

/// One served tap's task.
struct Served {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves DHCP on exactly the VM ports that need it: desired = this node's tap ports with a
/// lease; actual = the taps with a live serving task.
pub struct DhcpController<B> {
    backend: Arc<B>,
    state: Arc<NodeState>,
    lease_secs: u32,
    /// Served taps by device name: (port id, task).
    served: std::sync::Mutex<HashMap<String, (String, Served)>>,
    metrics: Arc<AgentMetrics>,
}

impl<B: PacketIo + 'static> DhcpController<B> {
    pub fn new(backend: Arc<B>, state: Arc<NodeState>, lease_secs: u32, metrics: Arc<AgentMetrics>) -> Arc<Self> {
        Arc::new(DhcpController {
            backend,
            state,
            lease_secs,
            served: Default::default(),
            metrics,
        })
    }

    fn served(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Served)>> {
        self.served.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Taps served right now.
    pub fn serving(&self) -> usize {
        self.served().len()
    }

    /// (tap device, port id) of every local VM port with a lease.
    fn wanted(&self, snap: &Snapshot) -> HashMap<String, String> {
        let v = self.state.lock();
        snap.view
            .local_ports
            .iter()
            .filter(|p| p.kind == PortKind::Tap)
            .filter(|p| {
                lease_for(&v.objects, &self.state.node, &p.id, self.lease_secs).is_some()
                    || lease6_for(&v.objects, &self.state.node, &p.id, self.lease_secs).is_some()
            })
            .map(|p| (names::tap(&p.id), p.id.clone()))
            .collect()
    }

    /// Starts serving the VM ports that need it and stops the rest. A tap not there yet is
    /// not a failure: the next pass (every few seconds) tries again.
    async fn sync(self: &Arc<Self>, wanted: HashMap<String, String>) {
        self.served().retain(|dev, (port, s)| {
            let keep = wanted.get(dev) == Some(port) && !s.task.is_finished();
            if !keep {
                debug!(dev = %dev, "DHCP: no longer serving");
            }
            keep
        });
        for (dev, port) in wanted {
            // A served tap keeps its task; if the device goes (or is rebuilt), the task ends
            // on the socket error and the next pass opens a new one.
            if self.served().contains_key(&dev) {
                continue;
            }
            let (fd, ifindex) = match self.backend.dhcp_socket(&dev).await {
                Ok(x) => x,
                Err(e) => {
                    debug!(dev = %dev, error = %e, "DHCP: tap not ready");
                    continue;
                }
            };
            let me = self.clone();
            let (p, d) = (port.clone(), dev.clone());
            let task = tokio::spawn(async move {
                if let Err(e) = me.serve_dhcp(&p, &d, fd, ifindex).await {
                    warn!(dev = %d, port = %p, error = %e, "DHCP service on tap stopped");
                }
            });
            info!(dev = %dev, port = %port, "DHCP: serving");
            self.served().insert(dev, (port, Served { task }));
        }
    }

    async fn serve_dhcp(&self, port_id: &str, dev: &str, fd: OwnedFd, ifindex: u32) -> std::io::Result<()> {
        // SAFETY: the AsyncFd owns `fd` (an OwnedFd) for its whole life, so the descriptor stays
        // open and the same.
        let afd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        let mut buf = vec![0u8; 2048];
        loop {
            let mut guard = afd.readable().await?;
            loop {
                match recv(afd.get_ref(), &mut buf) {
                    Ok((n, pkttype, from_if)) => {
                        // Frames the bridge sends to the guest pass by too; only the guest's count.
                        if pkttype == libc::PACKET_OUTGOING || from_if != ifindex {
                            continue;
                        }
                        if let Some(answer) = self.answer(port_id, dev, &buf[..n]) {
                            if let Err(e) = send(afd.get_ref(), ifindex, &answer) {
                                warn!(dev, error = %e, "DHCP: sending the answer failed");
                            }
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    // The device went down or away: end here, the next sync starts afresh.
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Port `port_id`'s lease (by `lease`) and its MAC, read under one lock of the map: the
    /// caller answers only a client that is that MAC.
    fn lease_with_mac<L>(
        &self,
        port_id: &str,
        lease: fn(&Objects, &str, &str, u32) -> Option<L>,
    ) -> (Option<L>, Option<MacAddr>) {
        let v = self.state.lock();
        let l = lease(&v.objects, &self.state.node, port_id, self.lease_secs);
        let mac = v
            .objects
            .port(port_id)
            .and_then(|p| p.mac_address.parse::<MacAddr>().ok());
        (l, mac)
    }

    /// The answer frame to one frame from the guest, if it deserves one.
    fn answer(&self, port_id: &str, dev: &str, frame: &[u8]) -> Option<Vec<u8>> {
        if frame.get(12..14) == Some(&[0x86, 0xdd]) {
            return self.answer6(port_id, dev, frame);
        }
        let req = match parse(frame) {
            Ok(r) => r,
            Err(e) => {
                debug!(dev, error = %e, "DHCP: ignoring a frame");
                return None;
            }
        };
        let lease = match self.lease_with_mac(port_id, lease_for) {
            (Some(l), Some(m)) if req.src_mac == m.0 && req.chaddr == m.0 => l,
            (_, m) => {
                debug!(dev, src = %MacAddr(req.src_mac), port_mac = ?m.map(|m| m.to_string()),
                    "DHCP: no lease for this client (unknown MAC or no DHCP subnet)");
                return None;
            }
        };
        let answer = decide(&req, &lease)?;
        debug!(dev, kind = ?req.kind, ?answer, ip = %lease.ip, xid = req.xid, "DHCP: answering");
        self.metrics
            .dhcp_answers
            .get_or_create(&DhcpLabels { family: "v4" })
            .inc();
        Some(build(answer, &req, &lease))
    }
}

impl<B: PacketIo + 'static> DhcpController<B> {
    /// The DHCPv6 answer to one frame from the guest, if it deserves one.
    fn answer6(&self, port_id: &str, dev: &str, frame: &[u8]) -> Option<Vec<u8>> {
        use isthmus_dhcp::v6::{build6, decide6, parse6};
        let req = match parse6(frame) {
            Ok(r) => r,
            Err(e) => {
                debug!(dev, error = %e, "DHCPv6: ignoring a frame");
                return None;
            }
        };
        let lease = match self.lease_with_mac(port_id, lease6_for) {
            (Some(l), Some(m)) if req.src_mac == m.0 => l,
            _ => {
                debug!(dev, src = %MacAddr(req.src_mac), "DHCPv6: no lease for this client");
                return None;
            }
        };
        let (kind, with_address) = decide6(&req, &lease)?;
        debug!(dev, request = ?req.kind, answer = ?kind, address = ?lease.address, "DHCPv6: answering");
        self.metrics
            .dhcp_answers
            .get_or_create(&DhcpLabels { family: "v6" })
            .inc();
        Some(build6(kind, with_address, &req, &lease))
    }
}

/// Holds the controller in an `Arc` (serving tasks keep it alive).
pub struct Dhcp<B>(pub Arc<DhcpController<B>>);

impl<B: PacketIo + 'static> Controller for Dhcp<B> {
    const NAME: &'static str = "dhcp";

    async fn reconcile(&self, snap: &Snapshot) -> Result<Outcome, String> {
        let wanted = self.0.wanted(snap);
        let planned = wanted.len();
        self.0.sync(wanted).await;
        Ok(Outcome {
            planned,
            failures: vec![],
        })
    }
}

/// One frame: (length, packet type, interface index).
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<(usize, u8, u32)> {
    // SAFETY: zeroed sockaddr_ll is valid; recvfrom writes at most `len` bytes into each.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
            &mut sll as *mut _ as *mut libc::sockaddr,
            &mut len,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((n as usize, sll.sll_pkttype, sll.sll_ifindex as u32))
}

fn send(fd: &OwnedFd, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
    // SAFETY: as in `recv`; the frame carries its own Ethernet header.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&frame[..6]);
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn objects(enable_dhcp: bool, host: &str) -> Objects {
        let mut o = Objects::default();
        o.apply_json(&json!({"type": "snapshot", "revision": 1, "objects": [
            {"key": "/n/n1", "kind": "network", "revision": 1, "value": {"id": "n1", "mtu": 1450}},
            {"key": "/s/s1", "kind": "subnet", "revision": 1, "value": {"id": "s1", "network_id": "n1",
                "cidr": "10.0.0.0/24", "gateway_ip": "10.0.0.1", "enable_dhcp": enable_dhcp, "ip_version": 4,
                "dns_nameservers": ["10.1.1.1"], "host_routes": [{"destination": "172.16.0.0/12", "nexthop": "10.0.0.254"}]}},
            {"key": "/p/p1", "kind": "port", "revision": 1, "value": {"id": "p1", "network_id": "n1",
                "binding:host_id": host, "device_owner": "compute:nova", "mac_address": "fa:16:3e:00:00:07",
                "fixed_ips": [{"subnet_id": "s1", "ip_address": "10.0.0.7"}]}},
        ]}))
        .unwrap();
        o
    }

    #[test]
    fn a_vm_port_gets_its_fixed_ip_and_the_subnet_options() {
        let l = lease_for(&objects(true, "me"), "me", "p1", 600).expect("a lease");
        assert_eq!(l.ip, Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(l.prefix_len, 24);
        assert_eq!(l.router, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(l.dns, vec![Ipv4Addr::new(10, 1, 1, 1)]);
        assert_eq!(
            l.routes,
            vec![(Ipv4Addr::new(172, 16, 0, 0), 12, Ipv4Addr::new(10, 0, 0, 254))]
        );
        assert_eq!((l.mtu, l.lease_secs), (1450, 600));
        assert_eq!(l.server_mac, [0xfe, 0x16, 0x3e, 0, 0, 7]);
        assert_eq!(l.hostname.as_deref(), Some("host-10-0-0-7"));
        assert_eq!(l.domain, None);
    }

    #[test]
    fn dns_names_and_extra_options_come_from_the_rendered_port_and_network() {
        let mut o = objects(true, "me");
        o.apply_json(&json!({"type": "update", "revision": 2, "put": [
            {"key": "/n/n1", "kind": "network", "revision": 2, "value": {"id": "n1", "mtu": 1450,
                "dns_domain": "example.org."}},
            {"key": "/p/p1", "kind": "port", "revision": 2, "value": {"id": "p1", "network_id": "n1",
                "binding:host_id": "me", "device_owner": "compute:nova", "mac_address": "fa:16:3e:00:00:07",
                "fixed_ips": [{"subnet_id": "s1", "ip_address": "10.0.0.7"}], "dns_name": "web-1",
                "extra_dhcp_opts": [
                    {"opt_name": "mtu", "opt_value": "1400", "ip_version": 4},
                    {"opt_name": "bootfile-name", "opt_value": "pxelinux.0", "ip_version": 4},
                    {"opt_name": "server-ip-address", "opt_value": "10.0.0.9", "ip_version": 4},
                    {"opt_name": "dns-server", "opt_value": "2001:db8::1", "ip_version": 6}]}},
        ]}))
        .unwrap();
        let l = lease_for(&o, "me", "p1", 600).expect("a lease");
        assert_eq!(l.hostname.as_deref(), Some("web-1"));
        assert_eq!(l.domain.as_deref(), Some("example.org"));
        assert_eq!(l.mtu, 1400);
        assert_eq!(l.next_server, Some(Ipv4Addr::new(10, 0, 0, 9)));
        assert_eq!(l.extra, vec![(67, b"pxelinux.0".to_vec())]);
    }

    #[test]
    fn dhcpv6_dns_servers_come_from_the_ports_ipv6_options() {
        let mut o = Objects::default();
        o.apply_json(&json!({"type": "snapshot", "revision": 1, "objects": [
            {"key": "/n/n1", "kind": "network", "revision": 1, "value": {"id": "n1"}},
            {"key": "/s/s6", "kind": "subnet", "revision": 1, "value": {"id": "s6", "network_id": "n1",
                "cidr": "2001:db8::/64", "enable_dhcp": true, "ip_version": 6,
                "ipv6_address_mode": "dhcpv6-stateful", "dns_nameservers": ["2001:db8::53"]}},
            {"key": "/p/p1", "kind": "port", "revision": 1, "value": {"id": "p1", "network_id": "n1",
                "binding:host_id": "me", "device_owner": "compute:nova", "mac_address": "fa:16:3e:00:00:07",
                "fixed_ips": [{"subnet_id": "s6", "ip_address": "2001:db8::7"}]}},
        ]}))
        .unwrap();
        let subnet_dns: Vec<std::net::Ipv6Addr> = vec!["2001:db8::53".parse().unwrap()];
        assert_eq!(lease6_for(&o, "me", "p1", 600).expect("lease").dns, subnet_dns);
        o.apply_json(&json!({"type": "update", "revision": 2, "put": [
            {"key": "/p/p1", "kind": "port", "revision": 2, "value": {"id": "p1", "network_id": "n1",
                "binding:host_id": "me", "device_owner": "compute:nova", "mac_address": "fa:16:3e:00:00:07",
                "fixed_ips": [{"subnet_id": "s6", "ip_address": "2001:db8::7"}],
                "extra_dhcp_opts": [
                    {"opt_name": "dns-server", "opt_value": "10.0.0.1", "ip_version": 4},
                    {"opt_name": "dns-server", "opt_value": "[2001:db8::99]", "ip_version": 6}]}},
        ]}))
        .unwrap();
        let ours: Vec<std::net::Ipv6Addr> = vec!["2001:db8::99".parse().unwrap()];
        assert_eq!(lease6_for(&o, "me", "p1", 600).expect("lease").dns, ours);
    }

    #[test]
    fn no_lease_without_dhcp_or_for_another_node() {
        assert_eq!(lease_for(&objects(false, "me"), "me", "p1", 600), None);
        assert_eq!(lease_for(&objects(true, "other"), "me", "p1", 600), None);
        assert_eq!(lease_for(&objects(true, "me"), "me", "nope", 600), None);
    }
}
