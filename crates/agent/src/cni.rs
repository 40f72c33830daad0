//! The agent's half of CNI: ADD, DEL, CHECK, GC and STATUS as the `isthmus-cni` plugin
//! forwards them over the local socket, and the per-network pools of ready ports.
//!
//! An attachment is a port bound to this node with `device_owner` [`CNI_OWNER`], `device_id`
//! the container id, and `binding:profile.cni` recording the interface name and namespace.
//! The API is the record: after a restart the agent finds its attachments and pool ports in
//! its view, so nothing leaks and nothing is kept in local files.
//!
//! Pools: a pool port is a [`CNI_OWNER`] port with an empty `device_id`, created and bound
//! ahead of time (so remote nodes already have its forwarding entry). ADD claims one by writing
//! the container id on it, then plumbs it. A background task tops pools up in bounded batches
//! with backoff, for networks used recently, and drains pools of networks left idle.

use crate::attach::{AttachRequest, Attacher, OpError};
use crate::client::Client;
use crate::kernel::{Kernel, MacAddr};
use crate::objects::Objects;
use crate::state::NodeState;
use isthmus_wire::node::{PortCreate, PortReport, RequestedIp};
use isthmus_wire::socket::{AttachReply, CheckReply, DelReply, GcReply, OkReply, Removed};
use isthmus_wire::stream::CniProfile;
#[cfg(test)]
use serde_json::json;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

pub const CNI_OWNER: &str = "isthmus:cni";

/// CNI error codes the agent gives (the plugin passes them on).
pub use isthmus_wire::cni_code as code;

/// An ADD as the plugin forwards it.
#[derive(Debug, Clone)]
pub struct AddRequest {
    pub container_id: String,
    pub ifname: String,
    /// Where to plumb (may be a `/proc/<pid>/fd/<n>` path from the plugin).
    pub netns: PathBuf,
    /// The runtime's own name for the namespace, recorded on the port.
    pub recorded_netns: String,
    pub network: String,
    pub project: String,
    pub ips: Vec<IpAddr>,
    pub mac: Option<String>,
    /// The config's `poolSize`: ready ports kept for this network (0: none); `None`: the
    /// agent's `--pool-size`.
    pub pool_size: Option<usize>,
}

/// One CNI-owned port of this node, as the view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniPort {
    pub id: String,
    pub network_id: String,
    pub project_id: String,
    /// Empty for a free pool port.
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    /// The CNI config's `project` and `network` strings, as recorded at ADD.
    pub config: (String, String),
    pub mac: String,
    pub ips: Vec<String>,
    /// The `poolSize` the attachment's config asked for, if any.
    pub pool_size: Option<usize>,
}

/// This node's CNI ports in the view.
pub fn cni_ports(objects: &Objects, node: &str) -> Vec<CniPort> {
    objects
        .ports()
        .filter(|p| p.host_id == node && p.device_owner == CNI_OWNER)
        .filter(|p| !p.id.is_empty())
        .map(|p| {
            let cni = p.cni_profile();
            CniPort {
                id: p.id.clone(),
                network_id: p.network_id.clone(),
                project_id: p.project_id.clone(),
                container_id: p.device_id.clone(),
                ifname: cni.ifname,
                netns: cni.netns,
                config: (cni.project, cni.network),
                mac: p.mac_address.clone(),
                ips: p.fixed_ips.iter().map(|f| f.ip_address.clone()).collect(),
                pool_size: cni.pool_size.and_then(|n| usize::try_from(n).ok()),
            }
        })
        .collect()
}

/// Network ids in the view that a config's `network` (a name or an id) may mean.
pub fn networks_named(objects: &Objects, network: &str) -> BTreeSet<String> {
    objects
        .networks()
        .filter(|n| !n.id.is_empty() && (n.id == network || n.name == network))
        .map(|n| n.id.clone())
        .collect()
}

/// Pool bookkeeping that is not in the API: what is being claimed right now, which
/// (project, network) names mean which ids, and when each network was last used.
#[derive(Default)]
pub struct Pools {
    inner: Mutex<PoolsInner>,
    pub(crate) wake: tokio::sync::Notify,
    /// ADDs running now; refills give way to them while the pool still has ports.
    adds: std::sync::atomic::AtomicUsize,
}

/// Counts an ADD in flight for as long as it lives.
struct AddGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> AddGuard<'a> {
    fn new(c: &'a std::sync::atomic::AtomicUsize) -> Self {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        AddGuard(c)
    }
}

impl Drop for AddGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// ADDs closer together than this count as a burst that refills wait out.
const LULL: Duration = Duration::from_millis(100);

/// (project id, network id); in `names`, the config's (project, network) strings.
type PoolKey = (String, String);

#[derive(Default)]
struct PoolsInner {
    /// Pool ports being attached right now.
    claiming: HashSet<String>,
    /// Pool ports this process handed out. A pool port is handed out once (it is deleted when
    /// its container goes), and the view may lag behind the write that records its new owner,
    /// so these are never free again — nor mistaken for a crashed ADD's leftovers.
    mine: HashSet<String>,
    names: HashMap<PoolKey, PoolKey>,
    last_used: HashMap<PoolKey, Instant>,
    backoff: HashMap<PoolKey, (Instant, Duration)>,
    last_add: Option<Instant>,
    /// Pool sizes the configs asked for (`poolSize`), per network; others get the default.
    sizes: HashMap<PoolKey, usize>,
    /// ADDs running now, by (container, ifname).
    adding: HashSet<(String, String)>,
    /// What failed ADDs may have left in the API, until it is gone.
    failed: Vec<Failed>,
    last_sweep: Option<Instant>,
}

/// A failed ADD's leftover: its port (deleted as soon as the server answers), or — when a
/// create went unanswered and may still land — any port recorded for (container, ifname).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failed {
    container_id: String,
    ifname: String,
    port: Option<String>,
    since: Instant,
}

/// How long an unanswered create is watched for: a server that was stopped may still commit
/// it when it resumes.
const UNANSWERED_CREATE_TTL: Duration = Duration::from_secs(600);

/// How long a failed ADD waits for its port's deletion before leaving it to the sweep.
const INLINE_DELETE: Duration = Duration::from_secs(3);

impl Pools {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An ADD is running or ran within the last [`LULL`].
    /// The server answers again: refills that backed off while it did not are due at once,
    /// rather than after a back-off that grew during the outage (up to a minute).
    pub(crate) fn retry_refills_now(&self) {
        self.lock().backoff.clear();
        self.wake.notify_one();
    }

    fn busy(&self) -> bool {
        self.adds.load(std::sync::atomic::Ordering::Relaxed) > 0
            || self.lock().last_add.is_some_and(|t| t.elapsed() < LULL)
    }

    fn used(&self, ids: PoolKey) {
        self.lock().last_used.insert(ids, Instant::now());
        self.wake.notify_one();
    }

    /// The port belongs to a failed ADD and is on its way out: no status is reported for it.
    pub(crate) fn doomed(&self, port_id: &str) -> bool {
        self.lock().failed.iter().any(|f| f.port.as_deref() == Some(port_id))
    }
}

/// Marks (container, ifname) as being added for as long as it lives.
struct Adding<'a> {
    pools: &'a Pools,
    key: (String, String),
}

impl Drop for Adding<'_> {
    fn drop(&mut self) {
        self.pools.lock().adding.remove(&self.key);
    }
}

fn attach_error(e: OpError) -> OpError {
    if e.cni.is_some() {
        return e;
    }
    let cni = match e.code {
        400 | 404 | 409 | 422 => code::INVALID_CONFIG,
        503 | 504 => code::TRY_AGAIN_LATER,
        _ => code::ATTACH_FAILED,
    };
    e.with_cni(cni)
}

/// What CNI needs of the agent's configuration.
#[derive(Debug, Clone)]
pub struct CniConfig {
    /// Ready ports kept per network in use for CNI ADD; 0 turns pools off.
    pub pool_size: usize,
    /// A network's pool is drained after this long without an ADD or attachment.
    pub pool_idle: Duration,
    /// How often CNI leftovers (pool ports left plumbed, ports of failed ADDs) are swept.
    pub orphan_sweep: Duration,
}

/// The agent's CNI service: attachments as ports, per-network pools, leftovers swept.
pub struct Cni<K> {
    config: CniConfig,
    state: Arc<NodeState>,
    client: Arc<Client>,
    attacher: Arc<Attacher<K, K>>,
    kernel: Arc<K>,
    pools: Arc<Pools>,
}

impl<K: Kernel + 'static> Cni<K> {
    pub fn new(
        config: CniConfig,
        state: Arc<NodeState>,
        client: Arc<Client>,
        attacher: Arc<Attacher<K, K>>,
        kernel: Arc<K>,
        pools: Arc<Pools>,
    ) -> Self {
        Cni {
            config,
            state,
            client,
            attacher,
            kernel,
            pools,
        }
    }

    /// Reserves a free pool port of (project, network). The attachment is written on it
    /// together with the ACTIVE report, once plumbed.
    fn reserve_from_pool(&self, req: &AddRequest) -> Option<String> {
        if self.pool_size(req) == 0 || !req.ips.is_empty() || req.mac.is_some() {
            return None;
        }
        let v = self.state.lock();
        let mut pools = self.pools.lock();
        let ids = pools.names.get(&(req.project.clone(), req.network.clone())).cloned()?;
        if let Some(n) = req.pool_size {
            pools.sizes.insert(ids.clone(), n);
        }
        let c = cni_ports(&v.objects, &self.state.node).into_iter().find(|p| {
            p.container_id.is_empty()
                && p.project_id == ids.0
                && p.network_id == ids.1
                && !pools.claiming.contains(&p.id)
                && !pools.mine.contains(&p.id)
        })?;
        pools.claiming.insert(c.id.clone());
        pools.mine.insert(c.id.clone());
        pools.last_used.insert(ids, Instant::now());
        self.pools.wake.notify_one();
        Some(c.id)
    }

    /// CNI ADD: a port (from the pool, else created bound to this node), plumbed into the
    /// container, ACTIVE before this returns.
    pub async fn cni_add(&self, req: &AddRequest) -> Result<AttachReply, OpError> {
        if req.container_id.is_empty() {
            return Err(OpError::new(400, "container_id is required").with_cni(code::INVALID_CONFIG));
        }
        let _busy = AddGuard::new(&self.pools.adds);
        let key = (req.container_id.clone(), req.ifname.clone());
        {
            let mut pools = self.pools.lock();
            pools.last_add = Some(Instant::now());
            pools.adding.insert(key.clone());
            // A retried ADD: ports recorded for it from now on are its own (an earlier failed
            // ADD's port with a known id is still deleted).
            pools
                .failed
                .retain(|f| f.port.is_some() || (&f.container_id, &f.ifname) != (&key.0, &key.1));
        }
        let _adding = Adding {
            pools: &self.pools,
            key: key.clone(),
        };
        // The config's own words for project and network, so GC of one config never touches
        // another's attachments (same network name in another project, or named by id).
        let cni = CniProfile {
            ifname: req.ifname.clone(),
            netns: req.recorded_netns.clone(),
            project: req.project.clone(),
            network: req.network.clone(),
            // Recorded, so a restarted agent keeps this network's pool at the asked size.
            pool_size: req.pool_size.map(|n| n as u64),
        };
        let profile = serde_json::json!({ "cni": cni });
        let started = Instant::now();
        let record = PortReport {
            device_id: Some(req.container_id.clone()),
            name: Some(port_name(req)),
            profile: Some(profile.clone()),
            ..Default::default()
        };
        let (port_id, pooled) = match self.reserve_from_pool(req) {
            Some(id) => (id, true),
            None => {
                let body = PortCreate {
                    project: req.project.clone(),
                    network: req.network.clone(),
                    device_owner: Some(CNI_OWNER.into()),
                    device_id: Some(req.container_id.clone()),
                    name: Some(port_name(req)),
                    profile: Some(profile),
                    fixed_ips: (!req.ips.is_empty()).then(|| {
                        req.ips
                            .iter()
                            .map(|ip| RequestedIp {
                                ip_address: ip.to_string(),
                            })
                            .collect()
                    }),
                    mac_address: req.mac.clone(),
                };
                let port = match self.client.create_port(&body).await {
                    Ok(p) => p,
                    Err(e) => {
                        // No answer (or a server error): the create may still be committed.
                        if e.status().is_none_or(|s| s >= 500) {
                            self.remember_failed(&key, None);
                        }
                        return Err(attach_error(e.into()));
                    }
                };
                let id = port["id"].as_str().unwrap_or("").to_string();
                let ids = (
                    port["project_id"].as_str().unwrap_or("").to_string(),
                    port["network_id"].as_str().unwrap_or("").to_string(),
                );
                {
                    let mut pools = self.pools.lock();
                    pools
                        .names
                        .insert((req.project.clone(), req.network.clone()), ids.clone());
                    if let Some(n) = req.pool_size {
                        pools.sizes.insert(ids.clone(), n);
                    }
                }
                self.pools.used(ids);
                (id, false)
            }
        };
        let attach = AttachRequest {
            port_id: port_id.clone(),
            netns: req.netns.clone(),
            ifname: req.ifname.clone(),
            // Bound here already (pool or node API).
            bind: false,
            record: pooled.then_some(record),
        };
        let res = self.attacher.attach(&attach).await;
        self.pools.lock().claiming.remove(&port_id);
        match res {
            Ok(mut v) => {
                v.sandbox = Some(req.recorded_netns.clone());
                info!(container = %req.container_id, port = %port_id, pooled, ms = started.elapsed().as_millis() as u64, "CNI ADD done");
                Ok(v)
            }
            Err(e) => {
                warn!(container = %req.container_id, port = %port_id, error = %e.message, "CNI ADD failed; releasing the port");
                self.undo_add(&key, &port_id).await;
                Err(attach_error(e))
            }
        }
    }

    /// What an ADD that failed after its port existed leaves: nothing. The host device goes
    /// (and the container's end with it), then the port; if the server does not answer, the
    /// port is remembered and deleted by DEL or the sweep once it does (the ACTIVE report with
    /// the attachment may still land when a stopped server resumes; the delete wins).
    async fn undo_add(&self, key: &(String, String), port_id: &str) {
        let dev = crate::names::tap(port_id);
        if let Err(e) = self.attacher.unplug(&dev).await {
            warn!(dev = %dev, error = %e, "could not unplug a failed ADD");
        }
        match tokio::time::timeout(INLINE_DELETE, self.client.delete_port(port_id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(port = %port_id, error = %e, "could not delete the port of a failed ADD; retrying later");
                self.remember_failed(key, Some(port_id));
            }
            Err(_) => {
                warn!(port = %port_id, "deleting the port of a failed ADD timed out; retrying later");
                self.remember_failed(key, Some(port_id));
            }
        }
    }

    fn remember_failed(&self, key: &(String, String), port: Option<&str>) {
        let mut pools = self.pools.lock();
        let f = Failed {
            container_id: key.0.clone(),
            ifname: key.1.clone(),
            port: port.map(str::to_string),
            since: Instant::now(),
        };
        if !pools
            .failed
            .iter()
            .any(|x| (&x.container_id, &x.ifname, &x.port) == (&f.container_id, &f.ifname, &f.port))
        {
            pools.failed.push(f);
        }
        self.pools.wake.notify_one();
    }

    /// Deletes what failed ADDs left (all of them, or those of one (container, ifname)): host
    /// devices, then ports. A leftover is forgotten once its port is gone — or, for an
    /// unanswered create, once it has had time to land. Errs if some port could not be deleted.
    async fn clean_failed(&self, only: Option<(&str, &str)>) -> Result<(), OpError> {
        let now = Instant::now();
        let (work, busy): (Vec<Failed>, HashSet<(String, String)>) = {
            let pools = self.pools.lock();
            let work = pools
                .failed
                .iter()
                .filter(|f| only.is_none_or(|(c, i)| f.container_id == c && f.ifname == i))
                .cloned()
                .collect();
            (work, pools.adding.clone())
        };
        let mut result = Ok(());
        for f in work {
            let key = (f.container_id.clone(), f.ifname.clone());
            let targets: Vec<String> = match &f.port {
                Some(id) => vec![id.clone()],
                // A new ADD of the same attachment owns what is recorded for it.
                None if busy.contains(&key) => vec![],
                None => self
                    .attachments_of(&f.container_id, &f.ifname)
                    .into_iter()
                    .map(|p| p.id)
                    .collect(),
            };
            let mut gone = true;
            for id in &targets {
                let dev = crate::names::tap(id);
                if let Err(e) = self.attacher.unplug(&dev).await {
                    warn!(dev = %dev, error = %e, "could not unplug a failed ADD's device");
                }
                match self.client.delete_port(id).await {
                    Ok(()) => info!(port = %id, container = %f.container_id, "port of a failed ADD deleted"),
                    Err(e) => {
                        debug!(port = %id, error = %e, "port of a failed ADD not deleted yet");
                        gone = false;
                        result = Err(OpError::from(e));
                    }
                }
            }
            let done = gone && (f.port.is_some() || now.duration_since(f.since) > UNANSWERED_CREATE_TTL);
            if done {
                self.pools.lock().failed.retain(|x| *x != f);
            }
        }
        result
    }

    /// The pool size for a request's network: the config's `poolSize`, else the agent's.
    fn pool_size(&self, req: &AddRequest) -> usize {
        req.pool_size.unwrap_or(self.config.pool_size)
    }

    /// The CNI ports of this node that belong to (container, ifname).
    fn attachments_of(&self, container_id: &str, ifname: &str) -> Vec<CniPort> {
        let v = self.state.lock();
        cni_ports(&v.objects, &self.state.node)
            .into_iter()
            .filter(|p| !container_id.is_empty() && p.container_id == container_id && p.ifname == ifname)
            .collect()
    }

    /// Unplugs and deletes one attachment's port.
    async fn release(&self, p: &CniPort) -> Result<(), OpError> {
        let dev = crate::names::tap(&p.id);
        self.attacher.unplug(&dev).await.map_err(OpError::from)?;
        self.client.delete_port(&p.id).await.map_err(OpError::from)?;
        info!(port = %p.id, container = %p.container_id, ifname = %p.ifname, "CNI attachment released");
        Ok(())
    }

    /// CNI DEL: idempotent, and fine when the namespace is already gone.
    pub async fn cni_del(&self, container_id: &str, ifname: &str) -> Result<DelReply, OpError> {
        if !self.state.lock().synced {
            // Without the server's view "nothing attached" would be a guess that leaks ports.
            return Err(
                OpError::new(503, "the agent has no view from the server yet; retry").with_cni(code::TRY_AGAIN_LATER)
            );
        }
        // What a failed ADD of this attachment left goes first; if the server cannot be
        // told yet, the runtime retries (and the sweep keeps at it meanwhile).
        self.clean_failed(Some((container_id, ifname)))
            .await
            .map_err(|e| e.with_cni(code::TRY_AGAIN_LATER))?;
        let found = self.attachments_of(container_id, ifname);
        if found.is_empty() {
            debug!(container = %container_id, ifname, "CNI DEL: nothing attached");
        }
        for p in &found {
            self.release(p).await.map_err(|e| {
                let c = if e.code >= 500 {
                    code::TRY_AGAIN_LATER
                } else {
                    code::ATTACH_FAILED
                };
                e.with_cni(c)
            })?;
        }
        Ok(DelReply {
            ok: true,
            released: found.iter().map(|p| p.id.clone()).collect(),
        })
    }

    /// CNI CHECK: the interface is there with the port's MAC and addresses.
    pub async fn cni_check(
        &self,
        container_id: &str,
        ifname: &str,
        netns: &std::path::Path,
    ) -> Result<CheckReply, OpError> {
        let Some(p) = self.attachments_of(container_id, ifname).into_iter().next() else {
            return Err(OpError::new(
                404,
                format!("no attachment for container {container_id} interface {ifname}"),
            )
            .with_cni(code::UNKNOWN_CONTAINER));
        };
        let failed = |m: String| OpError::new(409, m).with_cni(code::CHECK_FAILED);
        let seen = self
            .kernel
            .inspect(netns, ifname)
            .await
            .map_err(|e| failed(e.to_string()))?
            .ok_or_else(|| failed(format!("interface {ifname} is missing from {}", netns.display())))?;
        if p.mac.parse::<MacAddr>().ok() != Some(seen.mac) {
            return Err(failed(format!(
                "interface {ifname} has MAC {}, the port has {}",
                seen.mac, p.mac
            )));
        }
        for ip in &p.ips {
            if !seen.addresses.iter().any(|a| a.addr().to_string() == *ip) {
                return Err(failed(format!("interface {ifname} lacks the port's address {ip}")));
            }
        }
        let dev = crate::names::tap(&p.id);
        let observed = self.kernel.observe_ports().await.map_err(|e| failed(e.to_string()))?;
        if !observed.contains_key(&dev) {
            return Err(failed(format!("host device {dev} of port {} is missing", p.id)));
        }
        Ok(CheckReply {
            ok: true,
            port_id: p.id,
        })
    }

    /// CNI GC: releases this network's attachments that are not in `valid`.
    pub async fn cni_gc(
        &self,
        project: &str,
        network: &str,
        valid: &HashSet<(String, String)>,
    ) -> Result<GcReply, OpError> {
        if !self.state.lock().synced {
            return Err(
                OpError::new(503, "the agent has no view from the server yet; retry").with_cni(code::TRY_AGAIN_LATER)
            );
        }
        let stale: Vec<CniPort> = {
            let v = self.state.lock();
            cni_ports(&v.objects, &self.state.node)
                .into_iter()
                .filter(|p| !p.container_id.is_empty() && p.config == (project.to_string(), network.to_string()))
                .filter(|p| !valid.contains(&(p.container_id.clone(), p.ifname.clone())))
                .collect()
        };
        let mut removed = vec![];
        for p in &stale {
            self.release(p).await.map_err(|e| e.with_cni(code::TRY_AGAIN_LATER))?;
            removed.push(Removed {
                port_id: p.id.clone(),
                container_id: p.container_id.clone(),
                ifname: p.ifname.clone(),
            });
        }
        if !removed.is_empty() {
            info!(network, removed = removed.len(), "CNI GC released stale attachments");
        }
        Ok(GcReply { ok: true, removed })
    }

    /// CNI STATUS: ready only with a live stream from the server.
    pub fn cni_status(&self) -> Result<OkReply, OpError> {
        if self.state.connected() {
            Ok(OkReply { ok: true })
        } else {
            Err(OpError::new(503, "the agent cannot reach the Isthmus server").with_cni(code::NOT_AVAILABLE))
        }
    }

    /// Keeps pools topped up for networks used recently and drains the others. Runs forever.
    pub async fn pool_loop(&self) {
        let mut seeded = false;
        loop {
            tokio::select! {
                _ = self.pools.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
            let ports = {
                let v = self.state.lock();
                if !v.synced {
                    continue;
                }
                cni_ports(&v.objects, &self.state.node)
            };
            if !seeded {
                // After a restart: every network with CNI ports here counts as just used (so
                // pools left from before are kept, or drained once idle).
                let mut pools = self.pools.lock();
                for p in &ports {
                    pools
                        .last_used
                        .insert((p.project_id.clone(), p.network_id.clone()), Instant::now());
                }
                seeded = true;
            }
            // Leftovers are looked for at start and then periodically, not only after a
            // restart: an ADD can fail while the agent keeps running. Deletes need the server.
            if self.state.connected() {
                let due = self
                    .pools
                    .lock()
                    .last_sweep
                    .is_none_or(|t| t.elapsed() >= self.config.orphan_sweep);
                if due {
                    self.pools.lock().last_sweep = Some(Instant::now());
                    self.sweep_orphans(&ports).await;
                }
                if !self.pools.lock().failed.is_empty() {
                    let _ = self.clean_failed(None).await;
                }
            }
            self.pool_round(&ports).await;
        }
    }

    /// Free pool ports with a host device: an ADD was cut short by a crash (its caller got an
    /// error), so the port and device go.
    async fn sweep_orphans(&self, ports: &[CniPort]) {
        let Ok(observed) = self.kernel.observe_ports().await else {
            return;
        };
        let orphans: Vec<&CniPort> = {
            let pools = self.pools.lock();
            ports
                .iter()
                .filter(|p| p.container_id.is_empty() && observed.contains_key(&crate::names::tap(&p.id)))
                .filter(|p| !pools.claiming.contains(&p.id) && !pools.mine.contains(&p.id))
                .collect()
        };
        for p in orphans {
            warn!(port = %p.id, "pool port left plumbed by an interrupted ADD; releasing it");
            if let Err(e) = self.release(p).await {
                warn!(port = %p.id, error = %e.message, "releasing an orphaned pool port failed");
            }
        }
    }

    async fn pool_round(&self, ports: &[CniPort]) {
        let now = Instant::now();
        let (wanted, idle): (Vec<PoolKey>, Vec<PoolKey>) = {
            let mut pools = self.pools.lock();
            // Networks with attachments stay in use, with the pool size their configs asked
            // for (recorded on the attachments, so it survives a restart).
            for p in ports.iter().filter(|p| !p.container_id.is_empty()) {
                let key = (p.project_id.clone(), p.network_id.clone());
                if let Some(n) = p.pool_size {
                    pools.sizes.entry(key.clone()).or_insert(n);
                }
                pools.last_used.insert(key, now);
            }
            let keys: Vec<_> = pools.last_used.keys().cloned().collect();
            // A network whose config turned its pool off drains like an idle one.
            let (w, i): (Vec<_>, Vec<_>) = keys.into_iter().partition(|k| {
                now.duration_since(pools.last_used[k]) < self.config.pool_idle
                    && pools.sizes.get(k).copied().unwrap_or(self.config.pool_size) > 0
            });
            (w, i)
        };
        for key in idle {
            let free: Vec<&CniPort> = {
                let pools = self.pools.lock();
                ports
                    .iter()
                    .filter(|p| p.container_id.is_empty() && (p.project_id.clone(), p.network_id.clone()) == key)
                    .filter(|p| !pools.claiming.contains(&p.id) && !pools.mine.contains(&p.id))
                    .collect()
            };
            let mut all_gone = true;
            for p in &free {
                if let Err(e) = self.client.delete_port(&p.id).await {
                    debug!(port = %p.id, error = %e, "draining an idle pool failed; retrying later");
                    all_gone = false;
                    break;
                }
            }
            if !free.is_empty() && all_gone {
                info!(project = %key.0, network = %key.1, drained = free.len(), "pool drained: network idle");
            }
            if all_gone {
                self.pools.lock().last_used.remove(&key);
            }
        }
        // A stale view would make every pool look empty: refill only while the stream is up.
        if !self.state.connected() {
            return;
        }
        for key in wanted {
            let waiting = self
                .pools
                .lock()
                .backoff
                .get(&key)
                .is_some_and(|(until, _)| now < *until);
            if waiting {
                continue;
            }
            let size = self
                .pools
                .lock()
                .sizes
                .get(&key)
                .copied()
                .unwrap_or(self.config.pool_size);
            let busy = self.pools.busy();
            let (free, surplus) = {
                let mut pools = self.pools.lock();
                let free: Vec<&CniPort> = ports
                    .iter()
                    .filter(|p| p.container_id.is_empty() && p.project_id == key.0 && p.network_id == key.1)
                    .filter(|p| !pools.mine.contains(&p.id) && !pools.claiming.contains(&p.id))
                    .collect();
                // More than the pool's size: a refill whose answer was lost (a stopped or
                // unreachable server may still commit it). Taken out of reach of ADDs before
                // they are deleted, so none is handed out and deleted at once.
                let surplus: Vec<String> = if free.len() > size && !busy {
                    free[size..].iter().map(|p| p.id.clone()).collect()
                } else {
                    vec![]
                };
                pools.mine.extend(surplus.iter().cloned());
                (free.len(), surplus)
            };
            for id in &surplus {
                match self.client.delete_port(id).await {
                    Ok(()) => info!(network = %key.1, port = %id, "surplus pool port deleted"),
                    Err(e) => {
                        // Free again, so a later round retries.
                        self.pools.lock().mine.remove(id);
                        warn!(network = %key.1, port = %id, error = %e, "deleting a surplus pool port failed");
                    }
                }
            }
            let missing = size.saturating_sub(free);
            if missing == 0 {
                continue;
            }
            let mut created = vec![];
            let mut failed = None;
            for _ in 0..missing {
                // Refills wait for a lull in ADDs (bounded): on a busy node they would
                // otherwise compete with the very ADDs they are meant to speed up.
                let mut waited = Duration::ZERO;
                while self.pools.busy() && waited < Duration::from_secs(2) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    waited += Duration::from_millis(20);
                }
                // Named for the node that keeps it, so tenants can tell what these ports are.
                let body = PortCreate {
                    project: key.0.clone(),
                    network: key.1.clone(),
                    device_owner: Some(CNI_OWNER.into()),
                    name: Some(pool_port_name(&self.state.node)),
                    ..Default::default()
                };
                match self.client.create_port(&body).await {
                    Ok(p) => created.push(p["id"].as_str().unwrap_or("").to_string()),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            {
                let mut pools = self.pools.lock();
                match failed {
                    Some(e) if e.status() == Some(404) => {
                        // The network (or project) is gone: nothing to keep a pool for.
                        info!(network = %key.1, "pool dropped: the network no longer exists");
                        pools.last_used.remove(&key);
                        pools.backoff.remove(&key);
                    }
                    Some(e) => {
                        let wait = pools
                            .backoff
                            .get(&key)
                            .map_or(Duration::from_secs(1), |(_, d)| (*d * 2).min(Duration::from_secs(60)));
                        warn!(network = %key.1, error = %e, retry_in = ?wait, "pool refill failed");
                        pools.backoff.insert(key.clone(), (now + wait, wait));
                    }
                    None => {
                        pools.backoff.remove(&key);
                    }
                }
            }
            if !created.is_empty() {
                debug!(network = %key.1, created = created.len(), "pool refilled");
                // Count them only once the view shows them, so the next round does not
                // create them again.
                self.wait_for_ports(&created, Duration::from_secs(5)).await;
            }
        }
    }

    async fn wait_for_ports(&self, ids: &[String], timeout: Duration) {
        let mut gen = self.state.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let all = {
                let v = self.state.lock();
                ids.iter().all(|id| v.objects.port(id).is_some())
            };
            if all {
                return;
            }
            gen.borrow_and_update();
            if tokio::time::timeout_at(deadline, gen.changed()).await.is_err() {
                return;
            }
        }
    }
}

/// The name of a pool port kept by `node`.
pub fn pool_port_name(node: &str) -> String {
    format!("isthmus-pool-{node}")
}

fn port_name(req: &AddRequest) -> String {
    let short: String = req.container_id.chars().take(12).collect();
    format!("cni-{short}-{}", req.ifname)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects() -> Objects {
        let mut o = Objects::default();
        let port = |id: &str, host: &str, owner: &str, dev: &str, ifname: &str| {
            json!({"key": format!("/p/{id}"), "kind": "port", "revision": 1, "value": {
                "id": id, "network_id": "n1", "project_id": "pr", "binding:host_id": host,
                "device_owner": owner, "device_id": dev, "mac_address": "fa:16:3e:00:00:01",
                "fixed_ips": [{"ip_address": "10.0.0.5"}],
                "binding:profile": {"cni": {"ifname": ifname, "netns": "/run/netns/x"}}}})
        };
        o.apply_json(&json!({"type": "snapshot", "revision": 3, "objects": [
            {"key": "/n/n1", "kind": "network", "revision": 1, "value": {"id": "n1", "name": "blue"}},
            port("a", "me", CNI_OWNER, "c1", "eth0"),
            port("b", "me", CNI_OWNER, "", ""),
            port("c", "other", CNI_OWNER, "c2", "eth0"),
            port("d", "me", "compute:nova", "vm", ""),
        ]}))
        .unwrap();
        o
    }

    #[test]
    fn only_this_nodes_cni_ports_count_and_free_ones_are_the_pool() {
        let ports = cni_ports(&objects(), "me");
        let ids: Vec<&str> = ports.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(ports[0].container_id, "c1");
        assert_eq!(ports[0].ifname, "eth0");
        assert_eq!(ports[0].ips, ["10.0.0.5"]);
        assert!(ports[1].container_id.is_empty());
    }

    #[test]
    fn networks_are_found_by_name_or_id() {
        let o = objects();
        assert_eq!(networks_named(&o, "blue").into_iter().collect::<Vec<_>>(), ["n1"]);
        assert_eq!(networks_named(&o, "n1").len(), 1);
        assert!(networks_named(&o, "red").is_empty());
    }

    #[test]
    fn errors_map_to_cni_codes() {
        assert_eq!(attach_error(OpError::new(404, "x")).cni, Some(code::INVALID_CONFIG));
        assert_eq!(attach_error(OpError::new(503, "x")).cni, Some(code::TRY_AGAIN_LATER));
        assert_eq!(attach_error(OpError::new(500, "x")).cni, Some(code::ATTACH_FAILED));
        // An explicit code survives.
        let e = OpError::new(500, "x").with_cni(code::CHECK_FAILED);
        assert_eq!(attach_error(e).cni, Some(code::CHECK_FAILED));
    }
}
