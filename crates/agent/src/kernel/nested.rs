//! A container's interface inside a VM (the nested modes of the CNI plugin): an 802.1Q device
//! (a trunk subport's VLAN) or a macvlan device (an allowed address pair of the VM's port) on
//! the VM's NIC, born in the container's namespace and configured there.
//!
//! Everything runs blocking on one dedicated thread per call (it `setns`es, which must never
//! happen to a tokio worker): one write in the caller's namespace (the parent up, the device
//! created directly in the container's namespace), then one inside (addresses, links up,
//! routes), as for a node's veth.

use super::inside::{enter, link_index, setup_inside, Inside};
use super::netns::open_netns_file;
use super::nltxn::Txn;
use super::{check_ifname, HostRoute, KernelError, MacAddr};
use ipnet::IpNet;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, MacVlanMode};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{LinkMacVlan, LinkMessageBuilder, LinkUnspec, LinkVlan};
use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use tracing::warn;

/// The device that carries the container's traffic on the VM's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NestedDevice {
    /// 802.1Q with this VLAN id (a trunk subport's segmentation id).
    Vlan(u16),
    /// macvlan in `bridge` mode.
    Macvlan,
}

/// Everything needed to plug a container inside a VM into its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestedAttach {
    /// The VM's NIC, in the caller's namespace (e.g. `eth0`).
    pub parent: String,
    pub device: NestedDevice,
    /// The container's network namespace file.
    pub netns: PathBuf,
    /// Name of the interface inside the container.
    pub ifname: String,
    /// The container port's MAC.
    pub mac: MacAddr,
    /// The network's MTU.
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
    pub gateway: Option<IpAddr>,
    pub routes: Vec<HostRoute>,
}

/// What CHECK compares with the attachment: the interface as it is in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NestedState {
    pub mac: Option<MacAddr>,
    pub up: bool,
    pub mtu: Option<u32>,
    pub addresses: Vec<IpNet>,
}

/// Creates and configures the container's interface. On error nothing of it is left behind.
pub fn attach_nested(req: &NestedAttach) -> Result<(), KernelError> {
    check_ifname(&req.parent)?;
    check_ifname(&req.ifname)?;
    if let NestedDevice::Vlan(id) = req.device {
        if !(1..=4094).contains(&id) {
            return Err(KernelError::WrongDevice {
                name: req.ifname.clone(),
                what: format!("asked for VLAN {id}, outside 1-4094"),
            });
        }
    }
    let workload = open_netns_file(&req.netns)?;
    let req = req.clone();
    on_thread("isthmus-nested", move || attach_blocking(&req, &workload))
}

/// Deletes the container's interface; an interface (or namespace) already gone is success.
pub fn detach_nested(netns: &Path, ifname: &str) -> Result<(), KernelError> {
    check_ifname(ifname)?;
    let workload = match open_netns_file(netns) {
        Ok(f) => f,
        Err(KernelError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let (netns, ifname) = (netns.to_path_buf(), ifname.to_string());
    on_thread("isthmus-nested", move || {
        enter(&workload, &netns)?;
        delete_here(&mut Txn::open()?, &ifname, &netns)
    })
}

/// The container's interface as the kernel has it; `None` if it does not exist.
pub fn inspect_nested(netns: &Path, ifname: &str) -> Result<Option<NestedState>, KernelError> {
    check_ifname(ifname)?;
    let workload = open_netns_file(netns)?;
    let (netns, ifname) = (netns.to_path_buf(), ifname.to_string());
    on_thread("isthmus-nested", move || {
        enter(&workload, &netns)?;
        inspect_here(&mut Txn::open()?, &ifname, &netns)
    })
}

fn on_thread<T: Send + 'static>(
    name: &str,
    job: impl FnOnce() -> Result<T, KernelError> + Send + 'static,
) -> Result<T, KernelError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(job)
        .map_err(|e| KernelError::io("spawning a netns thread", e))?
        .join()
        .map_err(|_| KernelError::io("netns thread", std::io::Error::other("panicked")))?
}

fn attach_blocking(req: &NestedAttach, workload: &File) -> Result<(), KernelError> {
    let mut here = Txn::open()?;
    // The kernel looks a new link's name up in the caller's namespace first, where `ifname`
    // is often the parent itself (`eth0`): the device is born under a name of its own and
    // renamed inside the container.
    let tmp = temp_name();
    let (parent, parent_up) = parent_link(&mut here, &req.parent)?;
    let mut batch = Vec::new();
    if !parent_up {
        // The container's device carries nothing while the VM's NIC is down.
        let up = LinkUnspec::new_with_index(parent).up().build();
        batch.push((RouteNetlinkMessage::SetLink(up), 0));
    }
    let new = match req.device {
        NestedDevice::Vlan(id) => LinkMessageBuilder::<LinkVlan>::new(&tmp)
            .link(parent)
            .id(id)
            .mtu(req.mtu)
            .address(req.mac.0.to_vec())
            .setns_by_fd(workload.as_raw_fd())
            .build(),
        // Bridge mode: containers of one VM on one network reach each other inside the VM.
        // VEPA would send that traffic to the node's bridge, which does not hairpin it back to
        // the VM's tap; private would forbid it; passthru allows a single container.
        NestedDevice::Macvlan => LinkMessageBuilder::<LinkMacVlan>::new(&tmp)
            .link(parent)
            .mode(MacVlanMode::Bridge)
            .mtu(req.mtu)
            .address(req.mac.0.to_vec())
            .setns_by_fd(workload.as_raw_fd())
            .build(),
    };
    batch.push((RouteNetlinkMessage::NewLink(new), NLM_F_CREATE | NLM_F_EXCL));
    let what = match req.device {
        NestedDevice::Vlan(id) => format!("vlan {id}"),
        NestedDevice::Macvlan => "macvlan".to_string(),
    };
    let answers = here.run(batch, "create nested device")?;
    let ns = req.netns.display();
    let mut answers = answers.into_iter();
    if !parent_up {
        answers
            .next()
            .unwrap_or_default()
            .check(|| format!("bringing {} up", req.parent), &[])?;
    }
    let created = answers.next().unwrap_or_default();
    if created.errno() == Some(libc::EEXIST) {
        return Err(KernelError::WrongDevice {
            name: format!("{tmp} (temporary name)"),
            what: "taken".into(),
        });
    }
    created.check(|| format!("creating {what} {tmp} on {} in {ns}", req.parent), &[])?;
    let inside = Inside {
        netns: &req.netns,
        ifname: &req.ifname,
        addresses: &req.addresses,
        gateway: req.gateway,
        routes: &req.routes,
    };
    // This thread is in the container's namespace from here on (if it got there).
    let mut index = 0;
    let res = enter(workload, &req.netns)
        .and_then(|()| Txn::open())
        .and_then(|mut txn| {
            index = link_index(&mut txn, &tmp, &req.netns)?;
            rename(&mut txn, index, &req.ifname, &req.netns)
        })
        .and_then(|()| setup_inside(&inside, workload, index));
    if let Err(e) = res {
        let cleanup = enter(workload, &req.netns)
            .and_then(|()| Txn::open())
            .and_then(|mut txn| match index {
                0 => delete_here(&mut txn, &tmp, &req.netns),
                i => delete_index(&mut txn, i, &req.netns),
            });
        if let Err(e2) = cleanup {
            warn!(dev = %req.ifname, netns = %ns, error = %e2, "cleanup after failed nested attach");
        }
        return Err(e);
    }
    Ok(())
}

/// `isn` and 8 hex digits: unique enough among the links of one VM at one moment.
fn temp_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("isn{:08x}", nanos ^ std::process::id().rotate_left(16))
}

/// Renames the (still down) device; an `ifname` already in the container is an error.
fn rename(txn: &mut Txn, index: u32, ifname: &str, netns: &Path) -> Result<(), KernelError> {
    let set = LinkUnspec::new_with_index(index).name(ifname).build();
    let answer = txn
        .run(vec![(RouteNetlinkMessage::SetLink(set), 0)], "rename link")?
        .pop()
        .unwrap_or_default();
    if answer.errno() == Some(libc::EEXIST) {
        return Err(KernelError::WrongDevice {
            name: format!("{ifname} in {}", netns.display()),
            what: "already there".into(),
        });
    }
    answer
        .check(|| format!("naming the device {ifname} in {}", netns.display()), &[])
        .map(|_| ())
}

fn delete_index(txn: &mut Txn, index: u32, netns: &Path) -> Result<(), KernelError> {
    let del = LinkUnspec::new_with_index(index).build();
    if let Some(a) = txn
        .run(vec![(RouteNetlinkMessage::DelLink(del), 0)], "delete link")?
        .into_iter()
        .next()
    {
        a.check(
            || format!("deleting link {index} in {}", netns.display()),
            &[libc::ENODEV],
        )?;
    }
    Ok(())
}

/// The parent's index and whether it is up.
fn parent_link(txn: &mut Txn, name: &str) -> Result<(u32, bool), KernelError> {
    let get = LinkUnspec::new_with_name(name).build();
    let answer = txn
        .run(vec![(RouteNetlinkMessage::GetLink(get), 0)], "get link")?
        .pop()
        .unwrap_or_default();
    if answer.errno() == Some(libc::ENODEV) {
        return Err(KernelError::NoDevice(name.to_string()));
    }
    answer
        .check(|| format!("looking up {name}"), &[])?
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some((l.header.index, l.header.flags.contains(LinkFlags::Up))),
            _ => None,
        })
        .ok_or_else(|| KernelError::NoDevice(name.to_string()))
}

fn delete_here(txn: &mut Txn, ifname: &str, netns: &Path) -> Result<(), KernelError> {
    let del = LinkUnspec::new_with_name(ifname).build();
    if let Some(a) = txn
        .run(vec![(RouteNetlinkMessage::DelLink(del), 0)], "delete link")?
        .into_iter()
        .next()
    {
        a.check(|| format!("deleting {ifname} in {}", netns.display()), &[libc::ENODEV])?;
    }
    Ok(())
}

fn inspect_here(txn: &mut Txn, ifname: &str, netns: &Path) -> Result<Option<NestedState>, KernelError> {
    let index = match link_index(txn, ifname, netns) {
        Ok(i) => i,
        Err(KernelError::NoDevice(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let get = LinkUnspec::new_with_index(index).build();
    let mut dump = AddressMessage::default();
    dump.header.index = index;
    let mut answers = txn
        .run(
            vec![
                (RouteNetlinkMessage::GetLink(get), 0),
                (RouteNetlinkMessage::GetAddress(dump), NLM_F_DUMP),
            ],
            "inspect link",
        )?
        .into_iter();
    let mut state = NestedState {
        mac: None,
        up: false,
        mtu: None,
        addresses: Vec::new(),
    };
    for m in answers
        .next()
        .unwrap_or_default()
        .check(|| format!("reading {ifname}"), &[])?
    {
        if let RouteNetlinkMessage::NewLink(l) = m {
            state.up = l.header.flags.contains(LinkFlags::Up);
            for a in l.attributes {
                match a {
                    LinkAttribute::Address(b) => {
                        state.mac = <[u8; 6]>::try_from(b.as_slice()).ok().map(MacAddr);
                    }
                    LinkAttribute::Mtu(m) => state.mtu = Some(m),
                    _ => {}
                }
            }
        }
    }
    let addrs = answers
        .next()
        .unwrap_or_default()
        .check(|| format!("reading the addresses of {ifname}"), &[])?;
    for m in addrs {
        // The kernel may ignore the index filter of a dump; keep only this interface's.
        let RouteNetlinkMessage::NewAddress(a) = m else {
            continue;
        };
        if a.header.index != index {
            continue;
        }
        let len = a.header.prefix_len;
        let ip = a.attributes.iter().find_map(|at| match at {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(net) = ip.and_then(|ip| IpNet::new(ip, len).ok()) {
            state.addresses.push(net);
        }
    }
    Ok(Some(state))
}
