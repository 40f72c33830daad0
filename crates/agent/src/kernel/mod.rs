//! The side-effecting datapath layer: reading and changing the node's kernel state.
//!
//! One narrow trait per area: [`Links`] (bridges, VXLAN, forwarding entries), [`PortDevices`]
//! (veth and tap host ends), [`PacketIo`] (DHCP sockets), [`Firewall`] (nftables),
//! [`Shaping`] (QoS limits with tc) and [`Inspect`] (looking into workload namespaces). Each controller uses only its own; each has a
//! real implementation ([`NetlinkKernel`], nft through a subprocess) and a stateful fake
//! ([`FakeKernel`]), and `tests/kernel_conformance.rs` runs the same checks against both.

pub mod batch;
pub mod bpf;
mod fake;
mod inside;
pub mod nested;
mod netlink;
pub mod netns;
mod nltxn;
pub mod ra;
pub mod routers;
pub mod shortcut;
pub mod tc;
pub mod vlan;

pub use fake::FakeKernel;
pub use netlink::NetlinkKernel;

use crate::desired::{Datapath, PortDevice};
use crate::plan::Action;
use ipnet::IpNet;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;

/// UDP port of our VXLAN devices (the IANA one).
pub const VXLAN_PORT: u16 = 4789;

/// Alias the agent puts on the port devices it creates. A port device outside any bridge (for
/// example after its bridge was deleted by hand) is still recognisable as ours by it, while
/// `tap*` devices made by someone else are never touched.
pub const PORT_ALIAS: &str = "isthmus-port";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("device {0} does not exist")]
    NoDevice(String),
    #[error("device {name} exists but is {what}")]
    WrongDevice { name: String, what: String },
    #[error("invalid MAC address {0:?}")]
    InvalidMac(String),
    #[error("invalid interface name {0:?}")]
    InvalidName(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Only produced by [`FakeKernel`] (injected failures, simulated kernel refusals).
    #[error("{0}")]
    Simulated(String),
}

impl KernelError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        KernelError::Io {
            context: context.into(),
            source,
        }
    }
}

pub use crate::desired::{InvalidMac, MacAddr};

impl From<InvalidMac> for KernelError {
    fn from(e: InvalidMac) -> Self {
        KernelError::InvalidMac(e.0)
    }
}

/// A route inside a workload: `destination` via `nexthop` (a subnet's host route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub destination: IpNet,
    pub nexthop: IpAddr,
}

/// Everything needed to plug a container into its network with a veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethAttach {
    /// Host end: its name (`names::tap`), bridge and MTU.
    pub port: PortDevice,
    /// MAC of the workload end (the port's MAC, so remote FDB entries point at it).
    pub mac: MacAddr,
    /// The workload's network namespace, e.g. `/var/run/netns/X` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
    /// Name of the interface inside the workload, e.g. `eth0`.
    pub ifname: String,
    /// Addresses with their prefix length, e.g. `10.0.0.5/24`.
    pub addresses: Vec<IpNet>,
    /// Default route via this address, if the subnet has a gateway.
    pub gateway: Option<IpAddr>,
    pub routes: Vec<HostRoute>,
    /// MTU of the workload end (the host end takes `port.mtu`).
    pub mtu: u32,
}

/// How many single-entry forwarding changes a backend without a batch path keeps in flight.
pub const FDB_IN_FLIGHT: usize = 64;

/// L2 plumbing: the agent's `isbr-*` bridges, `isvx-*` VXLAN devices and their static
/// forwarding entries. Methods return `Send` futures so generic callers can spawn them.
pub trait Links: Send + Sync {
    /// The bridges, VXLAN devices and forwarding entries of ours (`ports` is left empty).
    /// Nothing else on the node is reported, so nothing else is touched.
    fn observe_l2(&self) -> impl Future<Output = Result<Datapath, KernelError>> + Send;

    /// Performs one L2 action (bridges, VXLAN devices, forwarding entries). Already-done work
    /// (the device exists as wanted, the entry to delete is gone) counts as success.
    fn apply_l2(&self, action: &Action) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Forwarding-entry changes (`AddFdb`/`DelFdb` only), all of them at once as far as the
    /// backend can: one result per action, in order.
    fn apply_fdb(&self, actions: &[Action]) -> impl Future<Output = Vec<Result<(), KernelError>>> + Send {
        apply_fdb_each(self, actions)
    }
}

/// Forwarding-entry changes one request each, [`FDB_IN_FLIGHT`] at a time.
pub async fn apply_fdb_each<L: Links + ?Sized>(links: &L, actions: &[Action]) -> Vec<Result<(), KernelError>> {
    let mut out = Vec::with_capacity(actions.len());
    for chunk in actions.chunks(FDB_IN_FLIGHT) {
        out.extend(futures::future::join_all(chunk.iter().map(|a| links.apply_l2(a))).await);
    }
    out
}

/// Port devices: the host ends of container veths and VM taps (`tap*`).
pub trait PortDevices: Send + Sync {
    /// `tap*` devices in one of our bridges or marked with [`PORT_ALIAS`].
    fn observe_ports(&self) -> impl Future<Output = Result<BTreeMap<String, PortDevice>, KernelError>> + Send;

    /// Performs one port action (`CreateTap`, `FixPort`, `DeletePort`).
    fn apply_port(&self, action: &Action) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Creates the veth pair of a container port: host end in its bridge and up, the other end
    /// in `req.netns` named, addressed and routed. On failure nothing is left behind.
    fn attach_veth(&self, req: &VethAttach) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Deletes a port's host device (for a veth, the pair). Absent already is success.
    fn detach(&self, name: &str) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Puts trunk `w`'s VLAN programs on its devices (see [`vlan`]) unless they are there as
    /// wanted already (same subports, same devices); `true` if it changed anything. Programs
    /// on subport devices no longer in `w` are taken off.
    fn wire_trunk(&self, w: &crate::trunk::TrunkWiring) -> impl Future<Output = Result<bool, KernelError>> + Send;

    /// Takes the VLAN programs off a trunk's devices (those that still exist).
    fn unwire_trunk(&self, parent_dev: &str) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Creates a persistent TAP device for a VM port (a hypervisor opens it by name), in its
    /// bridge and up.
    fn create_tap(
        &self,
        port: &PortDevice,
        mac: Option<MacAddr>,
    ) -> impl Future<Output = Result<(), KernelError>> + Send {
        let action = Action::CreateTap(port.clone(), mac);
        async move { self.apply_port(&action).await }
    }
}

/// Packet I/O on port devices (distributed DHCP).
pub trait PacketIo: Send + Sync {
    /// A raw packet socket on port device `dev` that receives the guest's DHCP requests and
    /// sends answers straight back to it. Returns it with `dev`'s ifindex.
    fn dhcp_socket(&self, dev: &str) -> impl Future<Output = Result<(std::os::fd::OwnedFd, u32), KernelError>> + Send;
}

/// The name of the agent's nftables tables (bridge and inet family).
pub const FIREWALL_TABLE: &str = "isthmus";

/// The node's packet filter: the agent's nftables tables (rendered by the `security` module).
pub trait Firewall: Send + Sync {
    /// Whether the agent's bridge table exists.
    fn firewall_present(&self) -> impl Future<Output = Result<bool, KernelError>> + Send;

    /// Runs one nft script as one transaction: all of it takes effect or none. Before the
    /// first script, bridged IP traffic is sent through the inet hooks (conntrack).
    fn apply_firewall(&self, script: String) -> impl Future<Output = Result<(), KernelError>> + Send;
}

/// Router namespaces (distributed routing: the `l3` and `routing` modules).
pub trait Routers: Send + Sync {
    /// The router namespaces whose names start with `prefix` (this node's).
    fn router_namespaces(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<std::collections::BTreeSet<String>, KernelError>> + Send;

    /// Brings one router namespace to what `r` says, creating it if needed; changes only what
    /// differs.
    fn apply_router(&self, r: &crate::routing::RouterNs) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Removes a router namespace and its legs (absent already is fine).
    fn remove_router(&self, netns: &str) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Runs the DVR table's nft script (one transaction) in the node's namespace.
    fn apply_dvr(&self, script: String) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Replaces the router legs that send router advertisements (and what they send).
    fn advertise(&self, ads: Vec<ra::Advert>);

    /// Brings the routing shortcuts on legs' outer ends to `want`, by outer end. A program is
    /// replaced only when its MACs or the interface indexes it holds changed; a leg not listed
    /// is left alone (it goes with its router). How many were changed, and what failed.
    fn wire_shortcuts(
        &self,
        want: std::collections::BTreeMap<String, crate::routing::Shortcut>,
    ) -> impl Future<Output = (usize, Vec<(String, KernelError)>)> + Send;
}

/// Bandwidth limits on port devices (`qos`): token buckets through `tc`, IFB devices for
/// what workloads send.
pub trait Shaping: Send + Sync {
    /// The limits on those of `devices` that exist, and every IFB device of ours.
    fn observe_qos(
        &self,
        devices: Vec<String>,
    ) -> impl Future<Output = Result<crate::shaping::Observed, KernelError>> + Send;

    /// Performs one change; already-done work (nothing to remove) counts as success.
    fn apply_qos(&self, action: &crate::shaping::QosAction) -> impl Future<Output = Result<(), KernelError>> + Send;
}

/// Looking into workload namespaces (CNI CHECK).
pub trait Inspect: Send + Sync {
    /// The MAC and addresses of interface `ifname` inside `netns`; `None` if there is no such
    /// interface.
    fn inspect(
        &self,
        netns: &std::path::Path,
        ifname: &str,
    ) -> impl Future<Output = Result<Option<Inspected>, KernelError>> + Send;
}

/// A whole node datapath: every capability. Implemented for whatever has them all; the agent's
/// controllers each use only their own.
pub trait Kernel: Links + PortDevices + PacketIo + Firewall + Inspect + Routers + Shaping {
    /// L2 devices, forwarding entries and port devices together.
    fn observe(&self) -> impl Future<Output = Result<Datapath, KernelError>> + Send {
        async move {
            let mut dp = self.observe_l2().await?;
            dp.ports = self.observe_ports().await?;
            Ok(dp)
        }
    }

    /// Performs one plan action through the backend it belongs to.
    fn apply(&self, action: &Action) -> impl Future<Output = Result<(), KernelError>> + Send {
        async move {
            if action.is_port() {
                self.apply_port(action).await
            } else {
                self.apply_l2(action).await
            }
        }
    }
}

impl<T: Links + PortDevices + PacketIo + Firewall + Inspect + Routers + Shaping> Kernel for T {}

/// What a workload interface looks like from inside its namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    pub mac: MacAddr,
    pub addresses: Vec<ipnet::IpNet>,
}

/// Linux interface names: 1 to 15 bytes, no `/`, whitespace or `:`, not `.` or `..`.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

pub(crate) fn check_ifname(name: &str) -> Result<(), KernelError> {
    if valid_ifname(name) {
        Ok(())
    } else {
        Err(KernelError::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        assert!(valid_ifname("eth0"));
        assert!(valid_ifname("tap0123456789a"));
        for bad in ["", "a/b", "a b", "..", "0123456789abcdef", "a:1"] {
            assert!(!valid_ifname(bad), "{bad}");
        }
    }
}
