//! The node's slice of the topology as the server last sent it, shared read-mostly by every
//! part of the agent: the node stream writes it, controllers and the attach path read it.

use crate::names;
use crate::objects::{to_view, Applied, Objects};
use crate::view::NodeView;
use isthmus_wire::stream::Message;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

pub struct ViewState {
    pub objects: Objects,
    /// A snapshot arrived at least once: the map is the server's word, not just empty.
    pub synced: bool,
}

/// One consistent look at the view, shared by the controllers that reconcile against it.
#[derive(Debug)]
pub struct Snapshot {
    /// Bumped on every change of the object map.
    pub generation: u64,
    /// The server revision the map reflects.
    pub revision: i64,
    pub view: NodeView,
    /// What the node's firewall must be (security groups, port security).
    pub firewall: Arc<crate::security::Desired>,
    /// The routers the node must run.
    pub l3: Arc<crate::l3::L3Desired>,
    /// The bandwidth limits of its port devices.
    pub qos: Arc<crate::qos::Desired>,
}

pub struct NodeState {
    pub node: String,
    pub underlay_ip: IpAddr,
    /// Physical network name → host bridge (external and provider networks).
    pub physical: crate::l3::PhysicalNetworks,
    view: Mutex<ViewState>,
    generation: watch::Sender<u64>,
    /// The node stream is up (a message arrived on the current connection).
    connected: AtomicBool,
    /// The last snapshot built, reused until the map changes.
    snapshot: Mutex<Option<Arc<Snapshot>>>,
}

impl NodeState {
    pub fn new(node: &str, underlay_ip: IpAddr) -> Arc<Self> {
        Self::with_physical(node, underlay_ip, Default::default())
    }

    pub fn with_physical(node: &str, underlay_ip: IpAddr, physical: crate::l3::PhysicalNetworks) -> Arc<Self> {
        Arc::new(NodeState {
            node: node.to_string(),
            underlay_ip,
            physical,
            view: Mutex::new(ViewState {
                objects: Objects::default(),
                synced: false,
            }),
            generation: watch::channel(0).0,
            connected: AtomicBool::new(false),
            snapshot: Mutex::new(None),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, ViewState> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one typed message of the node stream to the object map.
    pub fn apply(&self, msg: Message) -> Applied {
        let applied = {
            let mut v = self.lock();
            let a = v.objects.apply(msg);
            if a == Applied::Snapshot {
                v.synced = true;
            }
            a
        };
        if applied != Applied::Ping {
            self.generation.send_modify(|g| *g += 1);
        }
        applied
    }

    /// Follows changes of the object map.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    pub fn synced(&self) -> bool {
        self.lock().synced
    }

    pub fn revision(&self) -> i64 {
        self.lock().objects.revision
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }

    /// The node's view; `None` before the first snapshot.
    pub fn view(&self) -> Option<NodeView> {
        self.snapshot().map(|s| s.view.clone())
    }

    /// The current view as one shared snapshot; `None` before the first snapshot.
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        let generation = self.generation();
        if let Some(s) = self.snapshot.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            if s.generation == generation {
                return Some(s.clone());
            }
        }
        let snap = {
            let v = self.lock();
            if !v.synced {
                return None;
            }
            // Read under the map's lock, so generation and contents agree.
            Arc::new(Snapshot {
                generation: self.generation(),
                revision: v.objects.revision,
                view: to_view(&v.objects, &self.node, Some(self.underlay_ip)),
                firewall: Arc::new(crate::security::desired(&v.objects, &self.node)),
                l3: Arc::new(crate::l3::desired(&v.objects, &self.node, &self.physical)),
                qos: Arc::new(crate::qos::desired(&v.objects, &self.node)),
            })
        };
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = Some(snap.clone());
        Some(snap)
    }

    /// Whether the current map still has a local port whose host device is `dev`. Deletions
    /// planned from an older snapshot check this first, so a port attached since is kept.
    pub fn wants_device(&self, dev: &str) -> bool {
        let v = self.lock();
        let wanted = v
            .objects
            .ports()
            .any(|p| p.host_id == self.node && names::tap(&p.id) == dev);
        wanted
    }

    /// Whether the current map still has a local port (or a local router) on a network with
    /// VNI `vni`.
    pub fn wants_vni(&self, vni: u32) -> bool {
        self.view().is_some_and(|v| {
            v.local_ports
                .iter()
                .map(|lp| &lp.network_id)
                .chain(&v.routed)
                .any(|n| v.networks.get(n).is_some_and(|n| n.vni == vni))
        })
    }
}
