//! A container's veth pair, made in two netlink writes on one thread.
//!
//! Every CNI ADD lands here, often twenty at once. Going through the async handle cost seven
//! request/response round trips per pair, a connection task for the namespace's socket and a
//! tokio wake-up for each answer, all competing for two cores with the plugins themselves.
//! Here one short-lived thread (it needs `setns` anyway) does the whole job with blocking
//! sockets: one write in the node's namespace (create the pair, mark the host end, read back
//! the peer's index), then one inside the workload's (addresses, links up, routes).

use super::super::inside::{setup_inside, Inside};
use super::super::nltxn::{Answer, Txn};
use super::{KernelError, Link, VethAttach, PORT_ALIAS};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};
use std::fs::File;
use std::os::fd::AsRawFd;
use tracing::warn;

const EEXIST: i32 = libc::EEXIST;
const ENODEV: i32 = libc::ENODEV;

/// Runs on a dedicated thread already in the node's namespace; `workload` is the workload's
/// namespace file (checked by the caller). On error nothing of the pair is left behind.
pub(super) fn attach_blocking(req: &VethAttach, workload: &File) -> Result<(), KernelError> {
    let mut host = Txn::open()?;
    let bridge = bridge_index(&mut host, &req.port.bridge)?;
    let peer = make_pair(&mut host, req, workload, bridge)?;
    if let Err(e) = setup_inside(&Inside::of_veth(req), workload, peer) {
        delete_host_end(&mut host, &req.port.name);
        return Err(e);
    }
    Ok(())
}

/// Deleting one end removes the pair; a failure here is logged, the caller reports the first.
fn delete_host_end(txn: &mut Txn, host: &str) {
    let del = LinkUnspec::new_with_name(host).build();
    let res = txn
        .run(vec![(RouteNetlinkMessage::DelLink(del), 0)], "delete")
        .and_then(|a| match a.into_iter().next() {
            Some(a) => a.check(|| format!("deleting {host}"), &[ENODEV]).map(|_| ()),
            None => Ok(()),
        });
    if let Err(e) = res {
        warn!(dev = %host, error = %e, "cleanup after failed attach");
    }
}

fn bridge_index(txn: &mut Txn, name: &str) -> Result<u32, KernelError> {
    let get = LinkUnspec::new_with_name(name).build();
    let mut answers = txn.run(vec![(RouteNetlinkMessage::GetLink(get), 0)], "get link")?;
    let answer = answers.pop().unwrap_or_default();
    if answer.errno() == Some(ENODEV) {
        return Err(KernelError::NoDevice(name.to_string()));
    }
    let link = answer
        .check(|| format!("looking up {name}"), &[])?
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Link::parse(l),
            _ => None,
        })
        .ok_or_else(|| KernelError::NoDevice(name.to_string()))?;
    link.bridge_index()
}

/// Creates the pair (host end in its bridge, up; workload end born in the workload's
/// namespace, so it never exists in the node's), marks the host end as ours, and returns the
/// workload end's index (0 when the kernel did not say).
fn make_pair(txn: &mut Txn, req: &VethAttach, workload: &File, bridge: u32) -> Result<u32, KernelError> {
    let host = &req.port.name;
    let batch = || {
        let peer = LinkUnspec::new_with_name(&req.ifname)
            .mtu(req.mtu)
            .address(req.mac.0.to_vec())
            .setns_by_fd(workload.as_raw_fd())
            .build();
        let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host.clone())
            .mtu(req.port.mtu)
            .controller(bridge)
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        // The kernel takes an alias only in a change, not at creation; by name, no lookup.
        let mark = LinkUnspec::new_with_name(host).alias(PORT_ALIAS).build();
        let get = LinkUnspec::new_with_name(host).build();
        vec![
            (RouteNetlinkMessage::NewLink(pair), NLM_F_CREATE | NLM_F_EXCL),
            (RouteNetlinkMessage::SetLink(mark), 0),
            (RouteNetlinkMessage::GetLink(get), 0),
        ]
    };
    let mut answers = txn.run(batch(), "create veth")?;
    if answers.first().and_then(Answer::errno) == Some(EEXIST) {
        // A host end left from an earlier attach of this port blocks the new pair.
        let del = LinkUnspec::new_with_name(host).build();
        let gone = txn.run(vec![(RouteNetlinkMessage::DelLink(del), 0)], "delete")?;
        if let Some(a) = gone.into_iter().next() {
            a.check(|| format!("deleting stale {host}"), &[ENODEV])?;
        }
        warn!(dev = %host, "replaced a stale port device");
        answers = txn.run(batch(), "create veth")?;
    }
    let mut answers = answers.into_iter();
    let created = answers.next().unwrap_or_default();
    created.check(
        || format!("creating veth {host} / {} in {}", req.ifname, req.netns.display()),
        &[],
    )?;
    if let Err(e) = answers
        .next()
        .unwrap_or_default()
        .check(|| format!("marking {host}"), &[])
    {
        delete_host_end(txn, host);
        return Err(e);
    }
    let peer = answers
        .next()
        .unwrap_or_default()
        .replies
        .into_iter()
        .find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => l.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::Link(i) => Some(i),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or(0);
    Ok(peer)
}
