//! The side-effecting datapath layer: reading and changing the node's kernel state.
//!
//! Everything above this (reconcile, the attach path) talks to the [`Kernel`] trait only, so it
//! can be tested against [`FakeKernel`]; [`NetlinkKernel`] is the real one.

pub mod batch;
mod fake;
mod netlink;
pub mod netns;

pub use fake::FakeKernel;
pub use netlink::NetlinkKernel;

use crate::desired::{Datapath, PortDevice};
use crate::plan::Action;
use ipnet::IpNet;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

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

/// An Ethernet address. Parses `aa:bb:cc:dd:ee:ff` in either case, prints lowercase (the form
/// the desired state uses, so observed and desired entries compare equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || KernelError::InvalidMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl TryFrom<&[u8]> for MacAddr {
    type Error = KernelError;

    fn try_from(v: &[u8]) -> Result<Self, Self::Error> {
        <[u8; 6]>::try_from(v)
            .map(MacAddr)
            .map_err(|_| KernelError::InvalidMac(format!("{v:02x?}")))
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

/// The node's kernel datapath. Methods return `Send` futures so generic callers can run them
/// in spawned tokio tasks.
pub trait Kernel: Send + Sync {
    /// The actual state of the agent's own devices: `isbr-*` bridges, `isvx-*` VXLAN devices,
    /// their static forwarding entries, and `tap*` port devices in one of our bridges or marked
    /// with [`PORT_ALIAS`]. Nothing else on the node is reported (so nothing else is touched).
    fn observe(&self) -> impl Future<Output = Result<Datapath, KernelError>> + Send;

    /// Performs one plan action. Already-done work (the device exists as wanted, the entry to
    /// delete is gone) counts as success.
    fn apply(&self, action: &Action) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Creates the veth pair of a container port: host end in its bridge and up, the other end
    /// in `req.netns` named, addressed and routed. On failure nothing is left behind.
    fn attach_veth(&self, req: &VethAttach) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Creates a persistent TAP device for a VM port (a hypervisor opens it by name), in its
    /// bridge and up.
    fn create_tap(
        &self,
        port: &PortDevice,
        mac: Option<MacAddr>,
    ) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Deletes a port's host device (for a veth, the pair). Absent already is success.
    fn detach(&self, name: &str) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// A raw packet socket on port device `dev` that receives the guest's DHCP requests and
    /// sends answers straight back to it (distributed DHCP). Returns it with `dev`'s ifindex.
    fn dhcp_socket(&self, dev: &str) -> impl Future<Output = Result<(std::os::fd::OwnedFd, u32), KernelError>> + Send;

    /// Installs (idempotently, atomically) the node's bridge filter that keeps DHCP local:
    /// requests from workloads are answered on the node and never forwarded, and workloads
    /// cannot answer DHCP for others.
    fn ensure_dhcp_guard(&self) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// Removes that filter (absent already is success): the node has no network left.
    fn remove_dhcp_guard(&self) -> impl Future<Output = Result<(), KernelError>> + Send;

    /// The MAC and addresses of interface `ifname` inside `netns`; `None` if there is no such
    /// interface (CNI CHECK).
    fn inspect(
        &self,
        netns: &std::path::Path,
        ifname: &str,
    ) -> impl Future<Output = Result<Option<Inspected>, KernelError>> + Send;
}

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
    fn mac_round_trips_and_rejects_garbage() {
        let m: MacAddr = "FA:16:3e:00:0A:ff".parse().unwrap();
        assert_eq!(m.to_string(), "fa:16:3e:00:0a:ff");
        for bad in [
            "",
            "fa:16:3e:00:0a",
            "fa:16:3e:00:0a:ff:00",
            "fa:16:3e:00:0a:zz",
            "fa:16:3e:00:0a:f",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(MacAddr::try_from(&[1u8, 2, 3][..]).is_err());
    }

    #[test]
    fn interface_names() {
        assert!(valid_ifname("eth0"));
        assert!(valid_ifname("tap0123456789a"));
        for bad in ["", "a/b", "a b", "..", "0123456789abcdef", "a:1"] {
            assert!(!valid_ifname(bad), "{bad}");
        }
    }
}
