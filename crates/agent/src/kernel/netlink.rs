//! The kernel backends over route netlink (rtnetlink on tokio), and nft for the firewall.

use super::netns::{create_persistent_tap, route_handle, run_in_netns};
use super::vlan;
use super::{
    check_ifname, Firewall, Inspect, KernelError, Links, MacAddr, PacketIo, PortDevices, VethAttach, PORT_ALIAS,
    VXLAN_PORT,
};
use crate::desired::{Bridge, Datapath, Fdb, PortDevice, Vxlan};
use crate::names;
use crate::plan::Action;
use crate::trunk::TrunkWiring;
use futures::{Stream, StreamExt, TryStreamExt};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use tracing::{debug, warn};

mod veth;

const EEXIST: i32 = libc::EEXIST;
const ENOENT: i32 = libc::ENOENT;
const ENODEV: i32 = libc::ENODEV;

/// The real kernel, through a netlink socket bound to one network namespace: the agent's own
/// ([`NetlinkKernel::current`]) or another one ([`NetlinkKernel::in_netns`], used when the
/// node's datapath lives in a namespace the agent process is not in, e.g. in tests).
/// Trunks wired, by parent device: the wiring and the interface indexes its programs hold.
type WiredTrunks = BTreeMap<String, (TrunkWiring, Vec<u32>)>;
type WiredShortcuts = BTreeMap<String, (crate::routing::Shortcut, (u32, u32))>;

pub struct NetlinkKernel {
    handle: Handle,
    /// Where TAP devices get created (an ioctl, so it needs a thread inside that netns).
    netns: Option<PathBuf>,
    /// Interface indexes of VXLAN devices, so a burst of forwarding-entry changes does not look
    /// each device up again. Cleared by every action that may create or delete a device; a
    /// stale entry (a device rebuilt by hand) shows up as ENODEV and is looked up afresh.
    fdb_devs: std::sync::Mutex<HashMap<String, u32>>,
    /// The kernel runs one dump at a time per netlink socket (a second one gets EBUSY), and
    /// controllers observe concurrently: dumps take turns, single requests do not wait.
    dumps: tokio::sync::Mutex<()>,
    /// A socket of its own for the port devices' link dumps, so the L2 and ports controllers
    /// never wait for each other's dumps.
    ports: Handle,
    port_dumps: tokio::sync::Mutex<()>,
    /// Bulk forwarding-entry writes on a socket of their own, opened on first use.
    batch: tokio::sync::OnceCell<super::batch::FdbBatcher>,
    /// Router advertisements on router legs (a thread, started with the first leg).
    ra: super::ra::RaService,
    /// Trunks wired by this agent, by parent device, with the interface indexes their
    /// programs hold: a device recreated under the same name needs new programs.
    trunks: Arc<std::sync::Mutex<WiredTrunks>>,
    /// Routing shortcuts as last wired, by leg end, with the interface indexes they hold.
    shortcuts: Arc<std::sync::Mutex<WiredShortcuts>>,
}

/// The parts of a link message the agent cares about.
#[derive(Debug, Clone)]
struct Link {
    index: u32,
    name: String,
    mtu: u32,
    master: Option<u32>,
    kind: Option<InfoKind>,
    alias: Option<String>,
    vxlan: Vec<InfoVxlan>,
}

impl Link {
    /// The index of this link if it is a bridge; a port is never plugged into anything else.
    fn bridge_index(&self) -> Result<u32, KernelError> {
        if !self.is(&InfoKind::Bridge) {
            return Err(KernelError::WrongDevice {
                name: self.name.clone(),
                what: format!("not a bridge ({:?})", self.kind),
            });
        }
        Ok(self.index)
    }

    fn parse(msg: LinkMessage) -> Option<Link> {
        let mut name = None;
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mtu: 0,
            master: None,
            kind: None,
            alias: None,
            vxlan: vec![],
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n),
                LinkAttribute::Mtu(m) => link.mtu = m,
                LinkAttribute::Controller(m) if m != 0 => link.master = Some(m),
                LinkAttribute::IfAlias(a) => link.alias = Some(a),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(k),
                            LinkInfo::Data(InfoData::Vxlan(v)) => link.vxlan = v,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        link.name = name?;
        Some(link)
    }

    fn is(&self, kind: &InfoKind) -> bool {
        self.kind.as_ref() == Some(kind)
    }

    /// VNI and source of a VXLAN device, with the source reported as unspecified when the
    /// device has settings the agent never uses (another port, learning, a group/remote,
    /// metadata mode): such a device cannot match a desired one, so the plan rebuilds it.
    fn vxlan_params(&self) -> (u32, IpAddr) {
        let mut vni = 0;
        let mut local = None;
        let mut port = None;
        let mut learning = None;
        let mut odd = false;
        for i in &self.vxlan {
            match i {
                InfoVxlan::Id(v) => vni = *v,
                InfoVxlan::Local(a) => local = Some(IpAddr::V4(*a)),
                InfoVxlan::Local6(a) => local = Some(IpAddr::V6(*a)),
                InfoVxlan::Port(p) => port = Some(*p),
                InfoVxlan::Learning(l) => learning = Some(*l),
                InfoVxlan::Group(a) if !a.is_unspecified() => odd = true,
                InfoVxlan::Group6(a) if !a.is_unspecified() => odd = true,
                InfoVxlan::CollectMetadata(true) => odd = true,
                _ => {}
            }
        }
        let conforming = !odd && port == Some(VXLAN_PORT) && learning == Some(false);
        match local {
            Some(ip) if conforming => (vni, ip),
            _ => (vni, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        }
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn nl(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    let op = op.into();
    move |source| KernelError::Netlink { op, source }
}

fn ip_of(addr: &NeighbourAddress) -> Option<IpAddr> {
    match addr {
        NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
        NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        // AF_BRIDGE messages carry the VXLAN destination as raw bytes.
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice())
                .ok()
                .map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            16 => <[u8; 16]>::try_from(b.as_slice())
                .ok()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
            _ => None,
        },
        _ => None,
    }
}

impl NetlinkKernel {
    /// Bound to the calling thread's namespace. Must be called inside a tokio runtime, whose
    /// tasks then carry the netlink traffic.
    pub async fn current() -> Result<Self, KernelError> {
        Ok(NetlinkKernel {
            handle: route_handle(None).await?,
            ports: route_handle(None).await?,
            port_dumps: Default::default(),
            netns: None,
            fdb_devs: Default::default(),
            dumps: Default::default(),
            batch: Default::default(),
            ra: Default::default(),
            trunks: Default::default(),
            shortcuts: Default::default(),
        })
    }

    /// Bound to the namespace at `netns` (e.g. `/var/run/netns/X`). The socket is made on a
    /// short-lived thread inside it; no tokio thread ever changes namespace.
    pub async fn in_netns(netns: impl Into<PathBuf>) -> Result<Self, KernelError> {
        let netns = netns.into();
        Ok(NetlinkKernel {
            handle: route_handle(Some(&netns)).await?,
            ports: route_handle(Some(&netns)).await?,
            port_dumps: Default::default(),
            netns: Some(netns),
            fdb_devs: Default::default(),
            dumps: Default::default(),
            batch: Default::default(),
            ra: Default::default(),
            trunks: Default::default(),
            shortcuts: Default::default(),
        })
    }

    /// One request that only needs an acknowledgement.
    async fn request(&self, msg: RouteNetlinkMessage, flags: u16) -> Result<(), rtnetlink::Error> {
        request(&self.handle, msg, flags).await
    }

    async fn links(&self, handle: &Handle, turn: &tokio::sync::Mutex<()>) -> Result<Vec<Link>, KernelError> {
        let _turn = turn.lock().await;
        let msgs: Vec<LinkMessage> = handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing links"))?;
        Ok(msgs.into_iter().filter_map(Link::parse).collect())
    }

    async fn del_link(&self, name: &str) -> Result<bool, KernelError> {
        del_link(&self.handle, name).await
    }

    async fn bridge_index(&self, name: &str) -> Result<u32, KernelError> {
        let link = link_by_name(&self.handle, name)
            .await?
            .ok_or_else(|| KernelError::NoDevice(name.to_string()))?;
        link.bridge_index()
    }

    /// Creates a device; if one of that name exists and `fits` it, keeps it (adoption), else
    /// replaces it (the name has our prefix, so the device is ours to replace).
    async fn create_link(
        &self,
        name: &str,
        build: impl Fn() -> LinkMessage,
        fits: impl Fn(&Link) -> bool,
    ) -> Result<(), KernelError> {
        check_ifname(name)?;
        let op = || format!("creating {name}");
        match self
            .request(RouteNetlinkMessage::NewLink(build()), NLM_F_CREATE | NLM_F_EXCL)
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if errno(&e) == Some(EEXIST) => {}
            Err(e) => return Err(nl(op())(e)),
        }
        match link_by_name(&self.handle, name).await? {
            Some(l) if fits(&l) => {
                debug!(name, "device exists as wanted, adopting it");
                return Ok(());
            }
            Some(l) => warn!(name, kind = ?l.kind, "device exists with other settings, replacing it"),
            None => {}
        }
        self.del_link(name).await?;
        self.request(RouteNetlinkMessage::NewLink(build()), NLM_F_CREATE | NLM_F_EXCL)
            .await
            .map_err(nl(op()))
    }

    /// Sets MTU, master (when given), alias (when given) and up on an existing device.
    async fn configure(
        &self,
        name: &str,
        mtu: Option<u32>,
        master: Option<u32>,
        alias: Option<&str>,
    ) -> Result<(), KernelError> {
        configure(&self.handle, name, mtu, master, alias, None).await
    }

    async fn create_bridge(&self, b: &Bridge) -> Result<(), KernelError> {
        self.create_link(
            &b.name,
            || LinkBridge::new(&b.name).build(),
            |l| l.is(&InfoKind::Bridge),
        )
        .await?;
        // A network's bridge is an L2 device of the tenant's, never an IP interface of the
        // node: no IPv6 on it (it would take tenant routers' advertisements as the node's).
        let path = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", b.name);
        let write = move || std::fs::write(&path, "1").map_err(|e| KernelError::io(format!("writing {path}"), e));
        match self.netns.as_deref() {
            None => write()?,
            Some(ns) => run_in_netns(Some(ns), write).await?,
        }
        // Set the MTU after creation: set this way the bridge keeps it instead of following
        // its ports' MTUs.
        self.configure(&b.name, Some(b.mtu), None, None).await
    }

    async fn create_vxlan(&self, v: &Vxlan) -> Result<(), KernelError> {
        let bridge = self.bridge_index(&v.bridge).await?;
        let build = || {
            let mut m = LinkVxlan::new(&v.name, v.vni)
                .port(VXLAN_PORT)
                .learning(false)
                .mtu(v.mtu);
            m = match v.local {
                IpAddr::V4(a) => m.local(a),
                IpAddr::V6(a) => m.local6(a),
            };
            m.build()
        };
        self.create_link(&v.name, build, |l| {
            l.is(&InfoKind::Vxlan) && l.vxlan_params() == (v.vni, v.local)
        })
        .await?;
        self.configure(&v.name, Some(v.mtu), Some(bridge), None).await
    }

    fn fdb_message(&self, f: &Fdb, index: u32) -> Result<NeighbourMessage, KernelError> {
        let mac: MacAddr = f.mac.parse()?;
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        // NTF_SELF: the entry belongs to the VXLAN device itself, not to its bridge.
        msg.header.flags = NeighbourFlags::Own;
        msg.header.kind = RouteType::Unspec;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        msg.attributes.push(NeighbourAttribute::Destination(f.dst.into()));
        Ok(msg)
    }

    async fn dev_index(&self, name: &str) -> Result<u32, KernelError> {
        link_by_name(&self.handle, name)
            .await?
            .map(|l| l.index)
            .ok_or_else(|| KernelError::NoDevice(name.to_string()))
    }

    async fn fdb_dev_index(&self, name: &str) -> Result<u32, KernelError> {
        if let Some(i) = self.fdb_devs.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(*i);
        }
        let i = self.dev_index(name).await?;
        self.fdb_devs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), i);
        Ok(i)
    }

    fn forget_devs(&self) {
        self.fdb_devs.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    async fn add_fdb(&self, f: &Fdb) -> Result<(), KernelError> {
        // Append, like `bridge fdb append`: one MAC may have several destinations (the flood
        // entry has one per remote node), and appending an existing one is a no-op.
        let flags = NLM_F_CREATE | NLM_F_APPEND;
        let msg = self.fdb_message(f, self.fdb_dev_index(&f.dev).await?)?;
        match self.request(RouteNetlinkMessage::NewNeighbour(msg), flags).await {
            Err(e) if errno(&e) == Some(ENODEV) => {
                // The cached index went stale: look the device up again, once.
                self.forget_devs();
                let msg = self.fdb_message(f, self.fdb_dev_index(&f.dev).await?)?;
                self.request(RouteNetlinkMessage::NewNeighbour(msg), flags)
                    .await
                    .map_err(nl(format!("adding fdb {} dst {} on {}", f.mac, f.dst, f.dev)))
            }
            other => other.map_err(nl(format!("adding fdb {} dst {} on {}", f.mac, f.dst, f.dev))),
        }
    }

    async fn del_fdb(&self, f: &Fdb) -> Result<(), KernelError> {
        let index = match self.dev_index(&f.dev).await {
            Ok(i) => i,
            // The entry went with its device.
            Err(KernelError::NoDevice(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let msg = self.fdb_message(f, index)?;
        match self.request(RouteNetlinkMessage::DelNeighbour(msg), 0).await {
            Err(e) if errno(&e) != Some(ENOENT) => {
                Err(nl(format!("deleting fdb {} dst {} on {}", f.mac, f.dst, f.dev))(e))
            }
            _ => Ok(()),
        }
    }

    async fn fdb_entries(&self, vxlans: &HashMap<u32, String>) -> Result<Vec<Fdb>, KernelError> {
        let _turn = self.dumps.lock().await;
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing fdb"))?;
        let mut out = vec![];
        for m in msgs {
            let Some(dev) = vxlans.get(&m.header.ifindex) else {
                continue;
            };
            let mut mac = None;
            let mut dst = None;
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(l) => mac = MacAddr::try_from(l.as_slice()).ok(),
                    NeighbourAttribute::Destination(d) => dst = ip_of(d),
                    _ => {}
                }
            }
            // Entries without a destination are the bridge's own view of the port.
            if let (Some(mac), Some(dst)) = (mac, dst) {
                out.push(Fdb {
                    dev: dev.clone(),
                    mac: mac.to_string(),
                    dst,
                });
            }
        }
        Ok(out)
    }
}

async fn request(handle: &Handle, msg: RouteNetlinkMessage, flags: u16) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut resp = handle.clone().request(req)?;
    while let Some(m) = resp.next().await {
        if let NetlinkPayload::Error(e) = m.payload {
            if e.code.is_some() {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
    }
    Ok(())
}

async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>, KernelError> {
    check_ifname(name)?;
    let mut s = handle.link().get().match_name(name).execute();
    match first(&mut s).await {
        Ok(Some(m)) => Ok(Link::parse(m)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("looking up {name}"))(e)),
    }
}

async fn first<S>(s: &mut S) -> Result<Option<LinkMessage>, rtnetlink::Error>
where
    S: Stream<Item = Result<LinkMessage, rtnetlink::Error>> + Unpin,
{
    s.next().await.transpose()
}

async fn del_link(handle: &Handle, name: &str) -> Result<bool, KernelError> {
    check_ifname(name)?;
    let msg = LinkUnspec::new_with_name(name).build();
    match handle.link().del_with_message(msg).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(false),
        Err(e) => Err(nl(format!("deleting {name}"))(e)),
    }
}

async fn configure(
    handle: &Handle,
    name: &str,
    mtu: Option<u32>,
    master: Option<u32>,
    alias: Option<&str>,
    mac: Option<MacAddr>,
) -> Result<(), KernelError> {
    let index = link_by_name(handle, name)
        .await?
        .map(|l| l.index)
        .ok_or_else(|| KernelError::NoDevice(name.to_string()))?;
    let mut m = LinkUnspec::new_with_index(index).up();
    if let Some(mtu) = mtu {
        m = m.mtu(mtu);
    }
    if let Some(master) = master {
        m = m.controller(master);
    }
    if let Some(alias) = alias {
        m = m.alias(alias);
    }
    if let Some(mac) = mac {
        m = m.address(mac.0.to_vec());
    }
    handle
        .link()
        .set(m.build())
        .execute()
        .await
        .map_err(nl(format!("configuring {name}")))
}

/// Our devices among `links`: bridges, VXLAN devices (with their index) and port devices.
fn classify(links: &[Link]) -> (Datapath, HashMap<u32, String>) {
    let by_index: HashMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();
    let master_name = |l: &Link| {
        l.master
            .and_then(|m| by_index.get(&m))
            .map(|m| m.name.clone())
            .unwrap_or_default()
    };
    let mut dp = Datapath::default();
    let mut bridge_idx = HashSet::new();
    for l in links {
        if l.name.starts_with(names::BRIDGE_PREFIX) && names::vni_of(&l.name).is_some() && l.is(&InfoKind::Bridge) {
            bridge_idx.insert(l.index);
            dp.bridges.insert(
                l.name.clone(),
                Bridge {
                    name: l.name.clone(),
                    mtu: l.mtu,
                },
            );
        }
    }
    let mut vxlan_idx = HashMap::new();
    for l in links {
        if l.name.starts_with(names::VXLAN_PREFIX) && names::vni_of(&l.name).is_some() && l.is(&InfoKind::Vxlan) {
            let (vni, local) = l.vxlan_params();
            vxlan_idx.insert(l.index, l.name.clone());
            dp.vxlans.insert(
                l.name.clone(),
                Vxlan {
                    name: l.name.clone(),
                    vni,
                    local,
                    bridge: master_name(l),
                    mtu: l.mtu,
                },
            );
        }
    }
    for l in links {
        let in_ours = l.master.is_some_and(|m| bridge_idx.contains(&m));
        let marked = l.alias.as_deref() == Some(PORT_ALIAS);
        if l.name.starts_with(names::TAP_PREFIX) && (in_ours || marked) {
            dp.ports.insert(
                l.name.clone(),
                PortDevice {
                    name: l.name.clone(),
                    bridge: master_name(l),
                    mtu: l.mtu,
                    veth: l.is(&InfoKind::Veth),
                },
            );
        }
    }
    (dp, vxlan_idx)
}

impl NetlinkKernel {
    async fn batcher(&self) -> Result<&super::batch::FdbBatcher, KernelError> {
        self.batch
            .get_or_try_init(|| super::batch::FdbBatcher::open(self.netns.as_deref()))
            .await
    }
}

/// A stale or unknown interface index.
fn is_enodev(e: &KernelError) -> bool {
    matches!(e, KernelError::Netlink { source, .. } if errno(source) == Some(ENODEV))
}

impl Links for NetlinkKernel {
    /// All changes in as few writes as the socket buffers allow (see [`super::batch`]). An entry
    /// whose device index turns out stale is retried on its own with a fresh lookup.
    async fn apply_fdb(&self, actions: &[Action]) -> Vec<Result<(), KernelError>> {
        use super::batch::{FdbEntry, FdbOp};
        let batcher = match self.batcher().await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "no bulk netlink socket; forwarding entries go one by one");
                return super::apply_fdb_each(self, actions).await;
            }
        };
        let mut results: Vec<Option<Result<(), KernelError>>> = Vec::with_capacity(actions.len());
        let mut ops = vec![];
        let mut at = vec![];
        for (i, a) in actions.iter().enumerate() {
            let (f, add) = match a {
                Action::AddFdb(f) => (f, true),
                Action::DelFdb(f) => (f, false),
                other => {
                    results.push(Some(Err(KernelError::Simulated(format!(
                        "not a forwarding entry: {other:?}"
                    )))));
                    continue;
                }
            };
            let mac = match f.mac.parse::<MacAddr>() {
                Ok(m) => m,
                Err(e) => {
                    results.push(Some(Err(e.into())));
                    continue;
                }
            };
            let ifindex = match self.fdb_dev_index(&f.dev).await {
                Ok(i) => i,
                // The entry went with its device.
                Err(KernelError::NoDevice(_)) if !add => {
                    results.push(Some(Ok(())));
                    continue;
                }
                Err(e) => {
                    results.push(Some(Err(e)));
                    continue;
                }
            };
            let entry = FdbEntry {
                ifindex,
                mac: mac.0,
                dst: f.dst,
            };
            ops.push(if add { FdbOp::Add(entry) } else { FdbOp::Del(entry) });
            at.push(i);
            results.push(None);
        }
        let done = batcher.apply(&ops).await;
        let mut stale = vec![];
        for (i, r) in at.into_iter().zip(done) {
            match r {
                Err(e) if is_enodev(&e) => stale.push(i),
                r => results[i] = Some(r),
            }
        }
        if !stale.is_empty() {
            self.forget_devs();
            for i in stale {
                results[i] = Some(self.apply_l2(&actions[i]).await);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(KernelError::Simulated("forwarding entry not applied".into()))))
            .collect()
    }

    async fn observe_l2(&self) -> Result<Datapath, KernelError> {
        let (mut dp, vxlan_idx) = classify(&self.links(&self.handle, &self.dumps).await?);
        dp.ports.clear();
        dp.fdb = self.fdb_entries(&vxlan_idx).await?.into_iter().collect();
        Ok(dp)
    }

    async fn apply_l2(&self, action: &Action) -> Result<(), KernelError> {
        if !action.is_fdb() {
            self.forget_devs();
        }
        match action {
            Action::CreateBridge(b) => self.create_bridge(b).await,
            Action::SetBridgeMtu(b) => self.configure(&b.name, Some(b.mtu), None, None).await,
            Action::CreateVxlan(v) => self.create_vxlan(v).await,
            Action::ReplaceVxlan(v) => {
                self.del_link(&v.name).await?;
                self.create_vxlan(v).await
            }
            Action::FixVxlan(v) => {
                let bridge = self.bridge_index(&v.bridge).await?;
                self.configure(&v.name, Some(v.mtu), Some(bridge), None).await
            }
            Action::AddFdb(f) => self.add_fdb(f).await,
            Action::DelFdb(f) => self.del_fdb(f).await,
            Action::DeleteVxlan(name) | Action::DeleteBridge(name) => self.del_link(name).await.map(|_| ()),
            other => Err(KernelError::Simulated(format!("not an L2 action: {other:?}"))),
        }
    }
}

impl PortDevices for NetlinkKernel {
    async fn observe_ports(&self) -> Result<BTreeMap<String, PortDevice>, KernelError> {
        Ok(classify(&self.links(&self.ports, &self.port_dumps).await?).0.ports)
    }

    async fn apply_port(&self, action: &Action) -> Result<(), KernelError> {
        self.forget_devs();
        match action {
            Action::CreateTap(p, mac) => self.new_tap(p, *mac).await,
            Action::CreateSubport(p) => self.new_subport(p).await,
            Action::FixPort(p) => {
                let bridge = self.bridge_index(&p.bridge).await?;
                self.configure(&p.name, Some(p.mtu), Some(bridge), Some(PORT_ALIAS))
                    .await
            }
            Action::DeletePort(name) => self.del_link(name).await.map(|_| ()),
            other => Err(KernelError::Simulated(format!("not a port action: {other:?}"))),
        }
    }

    async fn attach_veth(&self, req: &VethAttach) -> Result<(), KernelError> {
        check_ifname(&req.port.name)?;
        check_ifname(&req.ifname)?;
        let ns = super::netns::open_netns_file(&req.netns)?;
        let req = req.clone();
        let host = req.port.name.clone();
        let netns = req.netns.clone();
        run_in_netns(self.netns.as_deref(), move || veth::attach_blocking(&req, &ns)).await?;
        debug!(dev = %host, netns = %netns.display(), "veth attached");
        Ok(())
    }

    async fn detach(&self, name: &str) -> Result<(), KernelError> {
        self.del_link(name).await.map(|_| ())
    }

    async fn wire_trunk(&self, w: &TrunkWiring) -> Result<bool, KernelError> {
        let w = w.clone();
        let memo = self.trunks.clone();
        // Interface names resolve in the calling thread's namespace: the node's.
        run_in_netns(self.netns.as_deref(), move || {
            let idx = vlan::indexes(&w)?;
            let before = memo
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&w.parent_dev)
                .cloned();
            if before.as_ref() == Some(&(w.clone(), idx.clone())) && vlan::attached(&w.parent_dev)? > 0 {
                return Ok(false);
            }
            vlan::apply(&w)?;
            if let Some((old, _)) = before {
                let gone: Vec<_> = old.subports.into_iter().filter(|s| !w.subports.contains(s)).collect();
                if !gone.is_empty() {
                    let stale = TrunkWiring {
                        parent_dev: String::new(),
                        subports: gone,
                    };
                    vlan::remove_subports(&stale)?;
                }
            }
            memo.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(w.parent_dev.clone(), (w, idx));
            Ok(true)
        })
        .await
    }

    async fn unwire_trunk(&self, parent_dev: &str) -> Result<(), KernelError> {
        let memo = self.trunks.clone();
        let parent_dev = parent_dev.to_string();
        run_in_netns(self.netns.as_deref(), move || {
            let old = memo
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&parent_dev)
                .map(|(w, _)| w.subports.clone())
                .unwrap_or_default();
            vlan::remove(&TrunkWiring {
                parent_dev: parent_dev.clone(),
                subports: old,
            })?;
            memo.lock().unwrap_or_else(|p| p.into_inner()).remove(&parent_dev);
            Ok(())
        })
        .await
    }
}

impl NetlinkKernel {
    /// A subport's veth pair: the port's end in its bridge (marked ours), the peer outside any
    /// bridge; both up with the network's MTU.
    async fn new_subport(&self, port: &PortDevice) -> Result<(), KernelError> {
        check_ifname(&port.name)?;
        let peer = crate::names::subport_peer_of_tap(&port.name);
        check_ifname(&peer)?;
        let bridge = self.bridge_index(&port.bridge).await?;
        // A leftover pair (agent killed between the two steps) is replaced.
        self.del_link(&peer).await?;
        let msg = rtnetlink::LinkVeth::new(&port.name, &peer).mtu(port.mtu).build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl(format!("creating veth {} / {peer}", port.name)))?;
        let res = async {
            configure(&self.handle, &peer, Some(port.mtu), None, None, None).await?;
            configure(
                &self.handle,
                &port.name,
                Some(port.mtu),
                Some(bridge),
                Some(PORT_ALIAS),
                None,
            )
            .await
        }
        .await;
        if let Err(e) = res {
            if let Err(e2) = self.del_link(&port.name).await {
                warn!(dev = %port.name, error = %e2, "cleanup after failed subport creation");
            }
            return Err(e);
        }
        Ok(())
    }

    async fn new_tap(&self, port: &PortDevice, mac: Option<MacAddr>) -> Result<(), KernelError> {
        let name = port.name.clone();
        check_ifname(&name)?;
        let bridge = self.bridge_index(&port.bridge).await?;
        // TUNSETIFF creates the device in the netns of the calling thread.
        run_in_netns(self.netns.as_deref(), move || create_persistent_tap(&name)).await?;
        let res = configure(
            &self.handle,
            &port.name,
            Some(port.mtu),
            Some(bridge),
            Some(PORT_ALIAS),
            mac,
        )
        .await;
        if let Err(e) = res {
            if let Err(e2) = self.del_link(&port.name).await {
                warn!(dev = %port.name, error = %e2, "cleanup after failed tap creation");
            }
            return Err(e);
        }
        Ok(())
    }
}

impl PacketIo for NetlinkKernel {
    async fn dhcp_socket(&self, dev: &str) -> Result<(std::os::fd::OwnedFd, u32), KernelError> {
        check_ifname(dev)?;
        let dev = dev.to_string();
        run_in_netns(self.netns.as_deref(), move || super::netns::dhcp_packet_socket(&dev)).await
    }
}

impl Firewall for NetlinkKernel {
    async fn firewall_present(&self) -> Result<bool, KernelError> {
        run_in_netns(self.netns.as_deref(), super::netns::firewall_present).await
    }

    async fn apply_firewall(&self, script: String) -> Result<(), KernelError> {
        run_in_netns(self.netns.as_deref(), move || super::netns::apply_firewall(&script)).await
    }
}

impl super::Routers for NetlinkKernel {
    async fn router_namespaces(&self, prefix: &str) -> Result<std::collections::BTreeSet<String>, KernelError> {
        let prefix = prefix.to_string();
        run_in_netns(self.netns.as_deref(), move || {
            super::routers::router_namespaces(&prefix)
        })
        .await
    }

    async fn apply_router(&self, r: &crate::routing::RouterNs) -> Result<(), KernelError> {
        let r = r.clone();
        run_in_netns(self.netns.as_deref(), move || super::routers::apply_router(&r)).await
    }

    async fn remove_router(&self, netns: &str) -> Result<(), KernelError> {
        let netns = netns.to_string();
        run_in_netns(self.netns.as_deref(), move || super::routers::remove_router(&netns)).await
    }

    async fn apply_dvr(&self, script: String) -> Result<(), KernelError> {
        run_in_netns(self.netns.as_deref(), move || super::netns::nft(&script)).await
    }

    fn advertise(&self, ads: Vec<super::ra::Advert>) {
        self.ra.set(ads);
    }

    async fn wire_shortcuts(
        &self,
        want: std::collections::BTreeMap<String, crate::routing::Shortcut>,
    ) -> (usize, Vec<(String, KernelError)>) {
        use super::shortcut;
        let memo = self.shortcuts.clone();
        // Interface names resolve in the calling thread's namespace: the node's.
        let run = run_in_netns(self.netns.as_deref(), move || {
            let mut memo = memo.lock().unwrap_or_else(|p| p.into_inner());
            memo.retain(|dev, _| want.contains_key(dev));
            let (mut changed, mut failed) = (0, vec![]);
            for (dev, s) in want {
                // The indexes are read on every pass, not only on a full resync: a VXLAN device
                // that L2 recreated has a new one, and the old program would drop what it sends.
                let step = || -> Result<(bool, (u32, u32)), KernelError> {
                    let idx = shortcut::indexes(&dev, &s)?;
                    let same = memo.get(&dev) == Some(&(s.clone(), idx));
                    if same && (s.macs.is_empty() || shortcut::attached(&dev)?) {
                        return Ok((false, idx));
                    }
                    shortcut::apply(&dev, &s)?;
                    Ok((true, idx))
                };
                match step() {
                    Ok((c, idx)) => {
                        if c {
                            changed += 1;
                            debug!(dev = %dev, vxlan = %s.vxlan, macs = s.macs.len(), "routing shortcut wired");
                        }
                        memo.insert(dev, (s, idx));
                    }
                    Err(e) => {
                        memo.remove(&dev);
                        failed.push((dev, e));
                    }
                }
            }
            Ok((changed, failed))
        });
        match run.await {
            Ok(r) => r,
            Err(e) => (0, vec![("(all legs)".to_string(), e)]),
        }
    }
}

impl super::Shaping for NetlinkKernel {
    async fn observe_qos(&self, devices: Vec<String>) -> Result<crate::shaping::Observed, KernelError> {
        run_in_netns(self.netns.as_deref(), move || super::tc::observe(&devices)).await
    }

    async fn apply_qos(&self, action: &crate::shaping::QosAction) -> Result<(), KernelError> {
        let a = action.clone();
        run_in_netns(self.netns.as_deref(), move || super::tc::apply(&a)).await
    }
}

impl Inspect for NetlinkKernel {
    async fn inspect(&self, netns: &std::path::Path, ifname: &str) -> Result<Option<super::Inspected>, KernelError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        check_ifname(ifname)?;
        if !netns.exists() {
            return Ok(None);
        }
        let h = route_handle(Some(netns)).await?;
        let mut links = h.link().get().match_name(ifname.to_string()).execute();
        let msg = match links.next().await.transpose() {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(None),
            Err(e) if errno(&e) == Some(ENODEV) => return Ok(None),
            Err(e) => return Err(nl(format!("looking up {ifname} in {}", netns.display()))(e)),
        };
        let index = msg.header.index;
        let mac = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(b) => MacAddr::try_from(b.as_slice()).ok(),
                _ => None,
            })
            .unwrap_or(MacAddr([0; 6]));
        let mut addrs = h.address().get().set_link_index_filter(index).execute();
        let mut addresses = vec![];
        while let Some(a) = addrs
            .try_next()
            .await
            .map_err(nl(format!("listing addresses of {ifname}")))?
        {
            let prefix = a.header.prefix_len;
            for attr in &a.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    if let Ok(n) = ipnet::IpNet::new(*ip, prefix) {
                        addresses.push(n);
                    }
                }
            }
        }
        Ok(Some(super::Inspected { mac, addresses }))
    }
}
