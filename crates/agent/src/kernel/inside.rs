//! Configuring a workload's interface from inside its namespace, in one netlink write: shared
//! by the veth of a container on a node and the VLAN/macvlan device of a container inside a VM.

use super::nltxn::Txn;
use super::{HostRoute, KernelError, VethAttach};
use ipnet::IpNet;
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{AddressMessageBuilder, LinkUnspec, RouteMessageBuilder};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

const EEXIST: i32 = libc::EEXIST;

/// What goes on the interface once it is in the workload's namespace.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Inside<'a> {
    /// For messages only (the namespace is entered through the file).
    pub netns: &'a Path,
    pub ifname: &'a str,
    pub addresses: &'a [IpNet],
    /// Default route via this address.
    pub gateway: Option<IpAddr>,
    pub routes: &'a [HostRoute],
}

impl<'a> Inside<'a> {
    pub(crate) fn of_veth(req: &'a VethAttach) -> Self {
        Inside {
            netns: &req.netns,
            ifname: &req.ifname,
            addresses: &req.addresses,
            gateway: req.gateway,
            routes: &req.routes,
        }
    }
}

/// Moves the calling thread into `workload`'s network namespace, for good: callers run on a
/// dedicated thread that ends with the job.
pub(crate) fn enter(workload: &File, netns: &Path) -> Result<(), KernelError> {
    // SAFETY: plain syscall on an fd we hold; it moves only this dedicated thread.
    if unsafe { libc::setns(workload.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(KernelError::io(
            format!("entering netns {}", netns.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The index of `ifname` in the calling thread's namespace.
pub(crate) fn link_index(txn: &mut Txn, ifname: &str, netns: &Path) -> Result<u32, KernelError> {
    let get = LinkUnspec::new_with_name(ifname).build();
    let answer = txn
        .run(vec![(RouteNetlinkMessage::GetLink(get), 0)], "get link")?
        .pop()
        .unwrap_or_default();
    if answer.errno() == Some(libc::ENODEV) {
        return Err(KernelError::NoDevice(format!("{ifname} in {}", netns.display())));
    }
    answer
        .check(|| format!("looking up {ifname} in {}", netns.display()), &[])?
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(l.header.index),
            _ => None,
        })
        .ok_or_else(|| KernelError::NoDevice(format!("{ifname} in {}", netns.display())))
}

/// Inside the workload's namespace (entered here): addresses, loopback and the interface up,
/// routes. `index` is the interface's index there, 0 to look it up by name.
pub(crate) fn setup_inside(req: &Inside<'_>, workload: &File, mut index: u32) -> Result<(), KernelError> {
    let ns = || req.netns.display().to_string();
    enter(workload, req.netns)?;
    let mut txn = Txn::open()?;
    let ifname = req.ifname;
    if index == 0 {
        index = link_index(&mut txn, ifname, req.netns)?;
    }
    let mut reqs = Vec::new();
    let mut ops: Vec<(String, Vec<i32>)> = Vec::new();
    for a in req.addresses {
        let msg = match a.addr() {
            IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(index)
                .address(v4, a.prefix_len())
                .build(),
            IpAddr::V6(v6) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(index)
                .address(v6, a.prefix_len())
                .build(),
        };
        reqs.push((RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_EXCL));
        ops.push((format!("adding {a} to {ifname}"), vec![EEXIST]));
    }
    // Loopback is interface 1 in every namespace. (A veth's workload end cannot come up with
    // the pair: the kernel opens it before the pair is joined, and refuses.)
    for (i, what) in [(1, "lo"), (index, ifname)] {
        reqs.push((
            RouteNetlinkMessage::SetLink(LinkUnspec::new_with_index(i).up().build()),
            0,
        ));
        ops.push((format!("bringing {what} up in {}", ns()), vec![]));
    }
    let mut routes: Vec<(IpAddr, u8, IpAddr)> = vec![];
    if let Some(gw) = req.gateway {
        let any = match gw {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        routes.push((any, 0, gw));
    }
    for r in req.routes {
        routes.push((r.destination.network(), r.destination.prefix_len(), r.nexthop));
    }
    for (dst, len, via) in routes {
        let op = format!("adding route {dst}/{len} via {via} in {}", ns());
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, len)
            .and_then(|b| b.gateway(via))
            .map_err(|e| KernelError::io(op.clone(), std::io::Error::other(e.to_string())))?
            .output_interface(index)
            .build();
        reqs.push((RouteNetlinkMessage::NewRoute(msg), NLM_F_CREATE | NLM_F_EXCL));
        ops.push((op, vec![EEXIST]));
    }
    let answers = txn.run(reqs, "configure workload interface")?;
    for (answer, (op, tolerated)) in answers.into_iter().zip(ops) {
        answer.check(|| op, &tolerated)?;
    }
    Ok(())
}
