//! An in-memory kernel for tests of everything above the kernel layer. It follows the kernel's
//! rules that matter to the agent: enslaving needs the bridge, deleting a bridge frees its
//! ports, forwarding entries live and die with their VXLAN device, devices keep their index
//! unless rebuilt.

use super::{check_ifname, Firewall, Inspect, KernelError, Links, MacAddr, PacketIo, PortDevices, VethAttach};
use crate::desired::{Bridge, Datapath, Fdb, PortDevice, Vxlan};
use crate::plan::Action;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

type FailFn = Box<dyn Fn(&Action) -> bool + Send + Sync>;

#[derive(Default)]
struct State {
    dp: Datapath,
    index: BTreeMap<String, u32>,
    next_index: u32,
    applied: Vec<Action>,
    attached: Vec<VethAttach>,
    /// Host-side MACs of the taps created.
    tap_macs: BTreeMap<String, Option<MacAddr>>,
    /// The last firewall script applied, if the tables exist.
    firewall: Option<String>,
    firewall_scripts: usize,
    /// Firewall changes fail (as a missing or broken `nft` would).
    firewall_fails: bool,
    /// Router namespaces as last applied.
    routers: BTreeMap<String, crate::routing::RouterNs>,
    pub adverts: Vec<super::ra::Advert>,
    /// Limits on port devices and our IFB devices, as a real kernel would read back.
    qos: crate::shaping::Observed,
    /// Trunks wired, by parent device, with the device indexes their programs hold.
    trunks: BTreeMap<String, (crate::trunk::TrunkWiring, Vec<u32>)>,
    shortcuts: BTreeMap<String, crate::routing::Shortcut>,
}

impl State {
    fn new_index(&mut self, name: &str) {
        self.next_index += 1;
        self.index.insert(name.to_string(), self.next_index);
    }

    fn need_bridge(&self, name: &str) -> Result<(), KernelError> {
        if self.dp.bridges.contains_key(name) {
            Ok(())
        } else {
            Err(KernelError::NoDevice(name.to_string()))
        }
    }

    fn exists(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// `ip link del`, with what the kernel does to related state.
    fn remove(&mut self, name: &str) {
        self.index.remove(name);
        self.qos.ports.remove(name);
        if self.dp.bridges.remove(name).is_some() {
            for v in self.dp.vxlans.values_mut().filter(|v| v.bridge == name) {
                v.bridge.clear();
            }
            for p in self.dp.ports.values_mut().filter(|p| p.bridge == name) {
                p.bridge.clear();
            }
        }
        if self.dp.vxlans.remove(name).is_some() {
            self.dp.fdb.retain(|f| f.dev != name);
        }
        self.dp.ports.remove(name);
    }

    fn create_vxlan(&mut self, v: &Vxlan) -> Result<(), KernelError> {
        self.need_bridge(&v.bridge)?;
        let adopt = self
            .dp
            .vxlans
            .get(&v.name)
            .is_some_and(|a| a.vni == v.vni && a.local == v.local);
        if !adopt {
            self.remove(&v.name);
            self.new_index(&v.name);
        }
        self.dp.vxlans.insert(v.name.clone(), v.clone());
        Ok(())
    }

    fn apply(&mut self, action: &Action) -> Result<(), KernelError> {
        match action {
            Action::CreateBridge(b) => {
                if !self.dp.bridges.contains_key(&b.name) {
                    if self.exists(&b.name) {
                        self.remove(&b.name);
                    }
                    self.new_index(&b.name);
                }
                self.dp.bridges.insert(b.name.clone(), b.clone());
            }
            Action::SetBridgeMtu(b) => {
                let have = self
                    .dp
                    .bridges
                    .get_mut(&b.name)
                    .ok_or_else(|| KernelError::NoDevice(b.name.clone()))?;
                have.mtu = b.mtu;
            }
            Action::CreateVxlan(v) => self.create_vxlan(v)?,
            Action::ReplaceVxlan(v) => {
                self.need_bridge(&v.bridge)?;
                self.remove(&v.name);
                self.create_vxlan(v)?;
            }
            Action::FixVxlan(v) => {
                self.need_bridge(&v.bridge)?;
                let have = self
                    .dp
                    .vxlans
                    .get_mut(&v.name)
                    .ok_or_else(|| KernelError::NoDevice(v.name.clone()))?;
                have.bridge = v.bridge.clone();
                have.mtu = v.mtu;
            }
            Action::AddFdb(f) => {
                f.mac.parse::<MacAddr>()?;
                if !self.dp.vxlans.contains_key(&f.dev) {
                    return Err(KernelError::NoDevice(f.dev.clone()));
                }
                self.dp.fdb.insert(f.clone());
            }
            Action::DelFdb(f) => {
                self.dp.fdb.remove(f);
            }
            Action::FixPort(p) => {
                self.need_bridge(&p.bridge)?;
                let have = self
                    .dp
                    .ports
                    .get_mut(&p.name)
                    .ok_or_else(|| KernelError::NoDevice(p.name.clone()))?;
                have.bridge = p.bridge.clone();
                have.mtu = p.mtu;
            }
            Action::CreateTap(p, mac) => {
                self.add_port(p, false)?;
                self.tap_macs.insert(p.name.clone(), *mac);
            }
            Action::CreateSubport(p) => self.add_port(p, true)?,
            Action::WireTrunk(n) => return Err(KernelError::Simulated(format!("not a port action: wiring {n}"))),
            Action::DeletePort(n) | Action::DeleteVxlan(n) | Action::DeleteBridge(n) => self.remove(n),
        }
        Ok(())
    }

    fn add_port(&mut self, port: &PortDevice, veth: bool) -> Result<(), KernelError> {
        check_ifname(&port.name)?;
        self.need_bridge(&port.bridge)?;
        self.remove(&port.name);
        self.new_index(&port.name);
        let mut p = port.clone();
        p.veth = veth;
        self.dp.ports.insert(p.name.clone(), p);
        Ok(())
    }
}

#[derive(Default)]
pub struct FakeKernel {
    state: Mutex<State>,
    fail: Mutex<Option<FailFn>>,
}

impl FakeKernel {
    pub fn new() -> Self {
        Self::default()
    }

    /// The trunks wired, by parent device.
    pub fn trunks(&self) -> BTreeMap<String, crate::trunk::TrunkWiring> {
        self.lock()
            .trunks
            .iter()
            .map(|(k, (w, _))| (k.clone(), w.clone()))
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the state from the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `apply` fail (without effect) for every action `f` selects.
    pub fn fail_on(&self, f: impl Fn(&Action) -> bool + Send + Sync + 'static) {
        *self.fail.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(f));
    }

    pub fn clear_failures(&self) {
        *self.fail.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The current simulated state (what `observe` returns).
    pub fn state(&self) -> Datapath {
        self.lock().dp.clone()
    }

    /// Every action applied successfully, in order.
    pub fn applied(&self) -> Vec<Action> {
        self.lock().applied.clone()
    }

    /// Every successful `attach_veth` request, in order.
    pub fn attached(&self) -> Vec<VethAttach> {
        self.lock().attached.clone()
    }

    /// The simulated interface index, to tell adoption from rebuilding.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.lock().index.get(name).copied()
    }

    /// Simulates `ip link del NAME` done behind the agent's back.
    pub fn delete_by_hand(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Simulates state made by hand or by an earlier agent (e.g. leftovers).
    pub fn add_bridge_by_hand(&self, b: Bridge) {
        let mut s = self.lock();
        s.new_index(&b.name);
        s.dp.bridges.insert(b.name.clone(), b);
    }

    pub fn edit_fdb_by_hand(&self, f: impl FnOnce(&mut std::collections::BTreeSet<Fdb>)) {
        f(&mut self.lock().dp.fdb);
    }
}

impl FakeKernel {
    fn run(&self, action: &Action) -> Result<(), KernelError> {
        let injected = self
            .fail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|f| f(action));
        if injected {
            return Err(KernelError::Simulated(format!("injected failure: {action:?}")));
        }
        let mut s = self.lock();
        s.apply(action)?;
        s.applied.push(action.clone());
        Ok(())
    }

    /// Makes every firewall change fail (or work again).
    pub fn fail_firewall(&self, fail: bool) {
        self.lock().firewall_fails = fail;
    }

    /// Simulates a firewall left by an earlier run.
    pub fn install_firewall_by_hand(&self) {
        self.lock().firewall = Some(String::new());
    }

    /// Whether the simulated firewall tables exist.
    pub fn firewall_installed(&self) -> bool {
        self.lock().firewall.is_some()
    }

    /// How many firewall scripts were applied.
    pub fn firewall_scripts(&self) -> usize {
        self.lock().firewall_scripts
    }

    /// The host-side MAC a tap was created with.
    pub fn tap_mac(&self, name: &str) -> Option<MacAddr> {
        self.lock().tap_macs.get(name).copied().flatten()
    }
}

impl Links for FakeKernel {
    async fn observe_l2(&self) -> Result<Datapath, KernelError> {
        let mut dp = self.state();
        dp.ports.clear();
        Ok(dp)
    }

    async fn apply_l2(&self, action: &Action) -> Result<(), KernelError> {
        if action.is_port() {
            return Err(KernelError::Simulated(format!("not an L2 action: {action:?}")));
        }
        self.run(action)
    }
}

impl PortDevices for FakeKernel {
    async fn observe_ports(&self) -> Result<BTreeMap<String, PortDevice>, KernelError> {
        Ok(self.lock().dp.ports.clone())
    }

    async fn apply_port(&self, action: &Action) -> Result<(), KernelError> {
        if !action.is_port() {
            return Err(KernelError::Simulated(format!("not a port action: {action:?}")));
        }
        self.run(action)
    }

    async fn attach_veth(&self, req: &VethAttach) -> Result<(), KernelError> {
        check_ifname(&req.ifname)?;
        let mut s = self.lock();
        s.add_port(&req.port, true)?;
        // A stale pair of the same host end goes, its workload end with it.
        s.attached.retain(|a| a.port.name != req.port.name);
        s.attached.push(req.clone());
        Ok(())
    }

    async fn detach(&self, name: &str) -> Result<(), KernelError> {
        check_ifname(name)?;
        let mut s = self.lock();
        s.remove(name);
        s.attached.retain(|a| a.port.name != name);
        Ok(())
    }

    async fn wire_trunk(&self, w: &crate::trunk::TrunkWiring) -> Result<bool, KernelError> {
        let mut s = self.lock();
        let mut idx = vec![];
        // The subport's peer is not tracked apart: it lives and dies with its bridged end.
        for d in std::iter::once(&w.parent_dev).chain(w.subports.iter().map(|p| &p.bridged)) {
            idx.push(*s.index.get(d).ok_or_else(|| KernelError::NoDevice(d.clone()))?);
        }
        let want = (w.clone(), idx);
        if s.trunks.get(&w.parent_dev) == Some(&want) {
            return Ok(false);
        }
        s.trunks.insert(w.parent_dev.clone(), want);
        Ok(true)
    }

    async fn unwire_trunk(&self, parent_dev: &str) -> Result<(), KernelError> {
        self.lock().trunks.remove(parent_dev);
        Ok(())
    }
}

impl super::Routers for FakeKernel {
    async fn router_namespaces(&self, prefix: &str) -> Result<std::collections::BTreeSet<String>, KernelError> {
        Ok(self
            .lock()
            .routers
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }

    async fn apply_router(&self, r: &crate::routing::RouterNs) -> Result<(), KernelError> {
        self.lock().routers.insert(r.netns.clone(), r.clone());
        Ok(())
    }

    async fn remove_router(&self, netns: &str) -> Result<(), KernelError> {
        self.lock().routers.remove(netns);
        Ok(())
    }

    async fn apply_dvr(&self, _script: String) -> Result<(), KernelError> {
        Ok(())
    }

    fn advertise(&self, ads: Vec<super::ra::Advert>) {
        self.lock().adverts = ads;
    }

    /// Keeps what it is given for legs that exist (as devices or as router legs).
    async fn wire_shortcuts(
        &self,
        want: BTreeMap<String, crate::routing::Shortcut>,
    ) -> (usize, Vec<(String, KernelError)>) {
        let mut st = self.lock();
        let before = std::mem::take(&mut st.shortcuts);
        let changed = want.iter().filter(|(d, s)| before.get(*d) != Some(*s)).count();
        st.shortcuts = want;
        (changed, vec![])
    }
}

impl FakeKernel {
    /// The routing shortcuts as last wired.
    pub fn shortcuts(&self) -> BTreeMap<String, crate::routing::Shortcut> {
        self.lock().shortcuts.clone()
    }

    /// The router namespaces the fake holds.
    pub fn routers(&self) -> BTreeMap<String, crate::routing::RouterNs> {
        self.lock().routers.clone()
    }
}

impl Firewall for FakeKernel {
    async fn firewall_present(&self) -> Result<bool, KernelError> {
        Ok(self.lock().firewall.is_some())
    }

    /// Tracks only whether the tables exist: a script that ends by deleting the inet table
    /// removes them (as the agent's removal script does).
    async fn apply_firewall(&self, script: String) -> Result<(), KernelError> {
        let mut s = self.lock();
        if s.firewall_fails {
            return Err(KernelError::Simulated("injected failure: nft".into()));
        }
        s.firewall_scripts += 1;
        if script
            .trim_end()
            .ends_with(&format!("delete table inet {}", super::FIREWALL_TABLE))
        {
            s.firewall = None;
        } else {
            s.firewall = Some(script);
        }
        Ok(())
    }
}

impl super::Shaping for FakeKernel {
    async fn observe_qos(&self, devices: Vec<String>) -> Result<crate::shaping::Observed, KernelError> {
        let st = self.lock();
        let mut out = crate::shaping::Observed {
            ifbs: st.qos.ifbs.clone(),
            ..Default::default()
        };
        for d in devices.iter().filter(|d| st.exists(d)) {
            let l = st.qos.ports.get(d).copied().unwrap_or_default();
            out.ports.insert(d.clone(), l);
        }
        Ok(out)
    }

    async fn apply_qos(&self, action: &crate::shaping::QosAction) -> Result<(), KernelError> {
        let mut st = self.lock();
        let dev = match action {
            crate::shaping::QosAction::LimitToPort { dev, .. }
            | crate::shaping::QosAction::UnlimitToPort { dev }
            | crate::shaping::QosAction::LimitFromPort { dev, .. }
            | crate::shaping::QosAction::UnlimitFromPort { dev } => Some(dev.clone()),
            crate::shaping::QosAction::DeleteIfb { .. } => None,
        };
        if let Some(d) = &dev {
            if !st.exists(d) {
                return Err(KernelError::NoDevice(d.clone()));
            }
            st.qos.ports.entry(d.clone()).or_default();
        }
        crate::shaping::apply_to(&mut st.qos, action);
        Ok(())
    }
}

impl PacketIo for FakeKernel {
    /// A socket that never receives a frame (one end of a datagram pair) for a port device
    /// that exists; no such device is an error, as with the kernel.
    async fn dhcp_socket(&self, dev: &str) -> Result<(std::os::fd::OwnedFd, u32), KernelError> {
        let index = {
            let s = self.lock();
            match (s.dp.ports.contains_key(dev), s.index.get(dev)) {
                (true, Some(i)) => *i,
                _ => return Err(KernelError::NoDevice(dev.to_string())),
            }
        };
        let (a, _b) = std::os::unix::net::UnixDatagram::pair()
            .map_err(|e| KernelError::io(format!("dhcp socket for {dev}"), e))?;
        Ok((a.into(), index))
    }
}

impl Inspect for FakeKernel {
    async fn inspect(&self, netns: &std::path::Path, ifname: &str) -> Result<Option<super::Inspected>, KernelError> {
        let s = self.lock();
        Ok(s.attached
            .iter()
            .find(|a| a.netns == netns && a.ifname == ifname)
            .map(|a| super::Inspected {
                mac: a.mac,
                addresses: a.addresses.clone(),
            }))
    }
}
