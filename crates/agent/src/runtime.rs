//! The running agent: heartbeats, the node stream feeding the node's object map, reconciling
//! the datapath on every change (bursts coalesced) and periodically (drift repair), and the
//! attach/detach operations behind the local socket.
//!
//! The datapath is only ever changed from a view the server sent. Before the first snapshot
//! nothing is reconciled (what exists is kept), and while the server is unreachable the last
//! view stays in force: a lost server never tears anything down.

use crate::client::{ApiError, Client, Credentials};
use crate::desired::{compute, Datapath};
use crate::kernel::{Kernel, KernelError, MacAddr, VethAttach};
use crate::names;
use crate::objects::{parse_message, port_plan, status_fixes, to_view, Applied, Objects, PlanError, PortPlan};
use crate::reconcile::{reconcile, Report};
use crate::view::{NodeView, PortKind};
use futures::StreamExt;
use isthmus_wire::node::PortReport;
use isthmus_wire::socket::{AttachReply, DetachReply, ReplyIp, ReplyRoute, StatusReply};
use isthmus_wire::stream::Message;
use serde_json::{json, Value};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

#[derive(Clone)]
pub struct AgentConfig {
    /// This node's name (its ports' `binding:host_id`, and its user's name).
    pub node: String,
    /// Unversioned network API URL, e.g. `http://192.0.2.254:9696`; empty: the network
    /// endpoint of the identity catalog.
    pub network_url: String,
    /// Identity v3 URL, e.g. `http://192.0.2.254:5000/v3`.
    pub auth_url: String,
    /// Never logged.
    pub password: String,
    pub project: String,
    pub underlay_ip: IpAddr,
    pub socket: PathBuf,
    pub resync: Duration,
    pub heartbeat: Duration,
    /// How long an attach waits for the port to show up in the node's view.
    pub attach_timeout: Duration,
    /// Ready ports kept per network in use for CNI ADD; 0 turns pools off.
    pub pool_size: usize,
    /// A network's pool is drained after this long without an ADD or attachment.
    pub pool_idle: Duration,
    /// Lease time the node's DHCP service gives VM ports.
    pub dhcp_lease_secs: u32,
    /// How often CNI leftovers (pool ports left plumbed, ports of failed ADDs) are swept.
    pub orphan_sweep: Duration,
}

impl AgentConfig {
    pub fn new(node: &str, network_url: &str, auth_url: &str, password: &str, underlay_ip: IpAddr) -> Self {
        AgentConfig {
            node: node.into(),
            network_url: network_url.into(),
            auth_url: auth_url.into(),
            password: password.into(),
            project: "service".into(),
            underlay_ip,
            socket: PathBuf::from("/run/isthmus/agent.sock"),
            resync: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            attach_timeout: Duration::from_secs(20),
            pool_size: 3,
            pool_idle: Duration::from_secs(600),
            dhcp_lease_secs: 86400,
            orphan_sweep: Duration::from_secs(60),
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("node", &self.node)
            .field("network_url", &self.network_url)
            .field("auth_url", &self.auth_url)
            .field("password", &"<redacted>")
            .field("project", &self.project)
            .field("underlay_ip", &self.underlay_ip)
            .field("socket", &self.socket)
            .field("resync", &self.resync)
            .field("heartbeat", &self.heartbeat)
            .field("pool_size", &self.pool_size)
            .field("orphan_sweep", &self.orphan_sweep)
            .finish()
    }
}

pub(crate) struct ViewState {
    pub(crate) objects: Objects,
    /// A snapshot arrived at least once: the map is the server's word, not just empty.
    pub(crate) synced: bool,
}

/// An error of an attach or detach, with an HTTP-like code for the socket's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: u16,
    pub message: String,
    /// The CNI error code, for requests from the CNI plugin.
    pub cni: Option<u32>,
}

impl OpError {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        OpError {
            code,
            message: message.into(),
            cni: None,
        }
    }

    pub fn with_cni(mut self, code: u32) -> Self {
        self.cni = Some(code);
        self
    }
}

impl From<ApiError> for OpError {
    fn from(e: ApiError) -> Self {
        // Neutron's own message says it best ("IP address 10.0.0.7 already allocated ...").
        let neutron = match &e {
            ApiError::Status { status, body } => serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|v| v["NeutronError"]["message"].as_str().map(str::to_string))
                .map(|m| format!("server answered {status}: {m}")),
            _ => None,
        };
        let msg = neutron.unwrap_or_else(|| e.to_string());
        match e.status() {
            None => OpError::new(503, msg),
            Some(s) => OpError::new(if s >= 500 { 502 } else { s }, msg),
        }
    }
}

impl From<KernelError> for OpError {
    fn from(e: KernelError) -> Self {
        OpError::new(500, format!("datapath: {e}"))
    }
}

/// What an attach request asks for.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    pub port_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// Claim the port for this node first (an unbound port). False when it is bound here
    /// already (CNI), which saves a round trip.
    pub bind: bool,
    /// Extra port fields written with the ACTIVE report (a CNI attachment's record), so a
    /// pooled port costs one write.
    pub record: Option<PortReport>,
}

impl AttachRequest {
    pub fn new(port_id: &str, netns: PathBuf, ifname: &str) -> Self {
        AttachRequest {
            port_id: port_id.to_string(),
            netns,
            ifname: ifname.to_string(),
            bind: true,
            record: None,
        }
    }
}

/// A port id as it may appear in an API path.
pub fn valid_port_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub struct Agent<K: Kernel> {
    pub config: AgentConfig,
    pub(crate) client: Client,
    kernel: K,
    view: Mutex<ViewState>,
    /// Bumped whenever the object map changes.
    pub(crate) generation: watch::Sender<u64>,
    changed: Notify,
    /// Serialises datapath changes: reconcile passes, attaches, detaches.
    pub(crate) datapath: tokio::sync::Mutex<()>,
    pub(crate) pools: crate::cni::Pools,
    pub(crate) dhcp: crate::dhcp::DhcpState,
    /// The node stream is up (a message arrived on the current connection).
    connected: std::sync::atomic::AtomicBool,
}

impl<K: Kernel + 'static> Agent<K> {
    pub fn new(config: AgentConfig, kernel: K) -> Result<Arc<Self>, ApiError> {
        let client = Client::new(
            &config.network_url,
            &config.auth_url,
            &config.node,
            Credentials {
                user: config.node.clone(),
                password: config.password.clone(),
                project: config.project.clone(),
            },
        )?;
        Ok(Arc::new(Agent {
            config,
            client,
            kernel,
            view: Mutex::new(ViewState {
                objects: Objects::default(),
                synced: false,
            }),
            generation: watch::channel(0).0,
            changed: Notify::new(),
            datapath: tokio::sync::Mutex::new(()),
            pools: crate::cni::Pools::default(),
            dhcp: crate::dhcp::DhcpState::default(),
            connected: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The kernel the agent drives.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// Whether the agent currently hears from the server.
    pub fn connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn lock_view(&self) -> std::sync::MutexGuard<'_, ViewState> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one message of the node stream to the object map.
    pub fn apply_message(&self, msg: &Value) -> Result<Applied, crate::objects::BadMessage> {
        let msg = <Message as serde::Deserialize>::deserialize(msg)
            .map_err(|e| crate::objects::BadMessage(format!("{e} in {msg}")))?;
        Ok(self.apply(msg))
    }

    /// Applies one typed message of the node stream to the object map.
    pub fn apply(&self, msg: Message) -> Applied {
        let applied = {
            let mut v = self.lock_view();
            let a = v.objects.apply(msg);
            if a == Applied::Snapshot {
                v.synced = true;
            }
            a
        };
        if applied != Applied::Ping {
            self.generation.send_modify(|g| *g += 1);
            self.changed.notify_one();
        }
        applied
    }

    /// What the agent knows, for the socket's `status` op: whether it has the server's view
    /// yet, at which revision, and this node's ports and networks.
    pub fn status(&self) -> StatusReply {
        let (synced, revision) = {
            let v = self.lock_view();
            (v.synced, v.objects.revision)
        };
        let view = self.view().unwrap_or_default();
        StatusReply {
            ok: true,
            node: self.config.node.clone(),
            underlay_ip: self.config.underlay_ip.to_string(),
            synced,
            revision,
            local_ports: view.local_ports.iter().map(|p| p.id.clone()).collect(),
            networks: view.networks.keys().cloned().collect(),
            remote_ports: view.remote_ports.len(),
        }
    }

    /// The node's view; `None` before the first snapshot.
    pub fn view(&self) -> Option<NodeView> {
        let v = self.lock_view();
        v.synced
            .then(|| to_view(&v.objects, &self.config.node, Some(self.config.underlay_ip)))
    }

    /// The datapath the current view asks for; `None` before the first snapshot.
    pub fn desired(&self) -> Option<Datapath> {
        self.view().map(|v| compute(&v))
    }

    /// One reconciliation pass against the current view (nothing before the first snapshot).
    pub async fn sync(&self) -> Result<Option<Report>, KernelError> {
        let _g = self.datapath.lock().await;
        let Some(want) = self.desired() else {
            debug!("no snapshot yet, keeping the datapath as it is");
            return Ok(None);
        };
        reconcile(&self.kernel, &want).await.map(Some)
    }

    /// A reconcile pass, TAP devices for this node's VM ports, then port statuses brought in
    /// line with the devices present.
    async fn sync_and_report(&self) {
        // Held through the reports too, so an attach or detach cannot slip in between what was
        // observed and what gets reported (the reports are bounded in time below).
        let _g = self.datapath.lock().await;
        let fixes = {
            let Some(view) = self.view() else {
                debug!("no snapshot yet, keeping the datapath as it is");
                return;
            };
            let want = compute(&view);
            match reconcile(&self.kernel, &want).await {
                Ok(r) if !r.ok() => warn!(failed = r.failed.len(), "reconcile pass had failures"),
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "reconcile failed: cannot read the datapath");
                    return;
                }
            }
            let Ok(observed) = self.kernel.observe().await else {
                return;
            };
            let mut devices: std::collections::BTreeSet<String> = observed.ports.into_keys().collect();
            // VM ports: the TAP device a hypervisor opens by name, created here.
            for lp in view.local_ports.iter().filter(|p| p.kind == PortKind::Tap) {
                let name = names::tap(&lp.id);
                let Some(dev) = want.ports.get(&name) else { continue };
                if devices.contains(&name) {
                    continue;
                }
                match self.kernel.create_tap(dev, tap_mac(&lp.mac)).await {
                    Ok(()) => {
                        info!(port = %lp.id, dev = %name, "tap device created");
                        devices.insert(name);
                    }
                    Err(e) => warn!(port = %lp.id, dev = %name, error = %e, "creating the tap device failed"),
                }
            }
            // VM ports are bound as taps: the hypervisor needs the bridge and MTU.
            let v = self.lock_view();
            let mut reports: Vec<(String, PortReport)> = vec![];
            let mut taps: std::collections::HashMap<String, PortReport> = std::collections::HashMap::new();
            for lp in view.local_ports.iter().filter(|p| p.kind == PortKind::Tap) {
                let name = names::tap(&lp.id);
                let (Some(dev), true) = (want.ports.get(&name), devices.contains(&name)) else {
                    continue;
                };
                let details = json!({"bridge_name": dev.bridge, "mtu": dev.mtu});
                let current = v.objects.port(&lp.id);
                let bound = current.is_some_and(|p| p.vif_type == "tap" && p.vif_details == details);
                let binding = PortReport {
                    vif_type: Some("tap".into()),
                    vif_details: Some(details),
                    ..Default::default()
                };
                if !bound {
                    reports.push((lp.id.clone(), binding.clone()));
                }
                taps.insert(lp.id.clone(), binding);
            }
            for (port, status) in status_fixes(&v.objects, &self.config.node, &devices) {
                // A failed ADD's port is being deleted: nothing is reported for it.
                if self.pools.doomed(&port) {
                    reports.retain(|(p, _)| *p != port);
                    continue;
                }
                let mut body = PortReport::status(status);
                if status == "ACTIVE" {
                    if let Some(b) = taps.get(&port) {
                        body.vif_type = b.vif_type.clone();
                        body.vif_details = b.vif_details.clone();
                    }
                }
                reports.retain(|(p, _)| *p != port);
                reports.push((port, body));
            }
            reports
        };
        if fixes.is_empty() {
            return;
        }
        let report = async {
            for (port, body) in fixes {
                match self.client.report_port(&port, &body).await {
                    Ok(_) => {
                        info!(port = %port, report = %serde_json::to_string(&body).unwrap_or_default(), "port status/binding reported")
                    }
                    Err(e) => debug!(port = %port, error = %e, "could not report port status"),
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), report).await.is_err() {
            debug!("status reports cut short; the next sync retries");
        }
    }

    /// Runs everything until `shutdown` completes.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        info!(node = %self.config.node, underlay = %self.config.underlay_ip, "agent starting");
        let listener = crate::socket::bind(&self.config.socket)?;
        let tasks = [
            tokio::spawn(self.clone().heartbeat_loop()),
            tokio::spawn(self.clone().watch_loop()),
            tokio::spawn(self.clone().reconcile_loop()),
            tokio::spawn({
                let a = self.clone();
                async move { a.pool_loop().await }
            }),
            tokio::spawn(self.clone().dhcp_loop()),
            tokio::spawn(crate::socket::serve(self.clone(), listener)),
        ];
        shutdown.await;
        info!("agent stopping (the datapath stays as it is)");
        for t in &tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.config.socket);
        Ok(())
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut restarted = true;
        let mut failing = false;
        loop {
            match self.client.heartbeat(self.config.underlay_ip, &[], restarted).await {
                Ok(()) => {
                    if restarted {
                        info!("registered with the server");
                    }
                    if failing {
                        info!("the server answers heartbeats again");
                        self.pools.retry_refills_now();
                    }
                    restarted = false;
                    failing = false;
                }
                Err(e) => {
                    failing = true;
                    warn!(error = %e, "heartbeat failed");
                }
            }
            // Until registered, retry sooner.
            let wait = if restarted {
                Duration::from_secs(1).min(self.config.heartbeat)
            } else {
                self.config.heartbeat
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn watch_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let res = self.watch_once(&mut backoff).await;
            self.connected.store(false, std::sync::atomic::Ordering::Relaxed);
            match res {
                Ok(()) => warn!("node stream ended, reconnecting"),
                Err(e) => warn!(error = %e, "node stream failed, reconnecting"),
            }
            let wait = backoff.next_wait();
            debug!(?wait, "backing off");
            tokio::time::sleep(wait).await;
        }
    }

    /// One connection of the node stream, until it ends or fails.
    async fn watch_once(&self, backoff: &mut Backoff) -> anyhow::Result<()> {
        let since = {
            let v = self.lock_view();
            v.synced.then_some(v.objects.revision)
        };
        let resp = self.client.watch(since).await?;
        info!(?since, "node stream connected");
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        // The server pings every 5 s; silence for much longer means a dead connection.
        let silence = Duration::from_secs(15);
        loop {
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let msg = parse_message(line).map_err(|e| anyhow::anyhow!("node stream: {e}"))?;
                self.connected.store(true, std::sync::atomic::Ordering::Relaxed);
                match &msg {
                    Message::Snapshot { revision, .. } => info!(revision, "snapshot received"),
                    Message::Resume {
                        since,
                        revision,
                        put,
                        delete,
                    } => info!(
                        since,
                        revision,
                        put = put.len(),
                        delete = delete.len(),
                        "node stream resumed"
                    ),
                    Message::Update { revision, .. } => debug!(revision, "update received"),
                    Message::Ping { .. } => {}
                }
                if matches!(self.apply(msg), Applied::Snapshot | Applied::Resume) {
                    backoff.reset();
                }
            }
            if buf.len() > 64 << 20 {
                anyhow::bail!("node stream: a line longer than 64 MiB");
            }
            match tokio::time::timeout(silence, stream.next()).await {
                Err(_) => anyhow::bail!("node stream silent for {silence:?}"),
                Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => anyhow::bail!("node stream: {}", e.without_url()),
                Ok(Some(Ok(chunk))) => buf.extend_from_slice(&chunk),
            }
        }
    }

    /// Keeps DHCP served on exactly the VM ports that need it (on change, and every few
    /// seconds for taps that appear later).
    async fn dhcp_loop(self: Arc<Self>) {
        let mut gen = self.generation.subscribe();
        loop {
            let mut empty = false;
            let wanted: Vec<(String, String)> = {
                let v = self.lock_view();
                if v.synced {
                    let view = to_view(&v.objects, &self.config.node, None);
                    empty = view.local_ports.is_empty() && view.networks.is_empty();
                    view.local_ports
                        .iter()
                        .filter(|p| p.kind == PortKind::Tap)
                        .filter(|p| {
                            crate::dhcp::lease_for(&v.objects, &self.config.node, &p.id, self.config.dhcp_lease_secs)
                                .is_some()
                        })
                        .map(|p| (names::tap(&p.id), p.id.clone()))
                        .collect()
                } else {
                    vec![]
                }
            };
            self.sync_dhcp(wanted).await;
            if empty {
                self.drop_dhcp_guard().await;
            }
            tokio::select! {
                _ = gen.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    async fn reconcile_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.changed.notified() => {
                    // Let a burst of updates land, then reconcile once.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ = tokio::time::sleep(self.config.resync) => debug!("periodic full sync"),
            }
            self.sync_and_report().await;
        }
    }

    /// Waits until the port, its network and subnets are in the view.
    async fn wait_for_plan(&self, port_id: &str) -> Result<PortPlan, OpError> {
        let mut gen = self.generation.subscribe();
        let deadline = tokio::time::Instant::now() + self.config.attach_timeout;
        loop {
            let res = {
                let v = self.lock_view();
                port_plan(&v.objects, &self.config.node, port_id)
            };
            match res {
                Ok(p) => return Ok(p),
                Err(e) if !e.transient() => return Err(OpError::new(422, e.to_string())),
                Err(e) => {
                    gen.borrow_and_update();
                    if tokio::time::timeout_at(deadline, gen.changed()).await.is_err() {
                        return Err(OpError::new(504, format!("timed out waiting for the node's view: {e}")));
                    }
                }
            }
        }
    }

    /// Plugs port `req.port_id` into the workload namespace `req.netns`.
    pub async fn attach(&self, req: &AttachRequest) -> Result<AttachReply, OpError> {
        if !valid_port_id(&req.port_id) {
            return Err(OpError::new(400, format!("invalid port_id {:?}", req.port_id)));
        }
        if !crate::kernel::valid_ifname(&req.ifname) {
            return Err(OpError::new(400, format!("invalid ifname {:?}", req.ifname)));
        }
        check_netns(&req.netns)?;
        // Claim the port (or confirm it is ours).
        if req.bind {
            match self
                .client
                .report_port(
                    &req.port_id,
                    &PortReport {
                        bind: true,
                        ..Default::default()
                    },
                )
                .await
            {
                Ok(_) => {}
                Err(e) if e.status() == Some(404) => {
                    return Err(OpError::new(
                        404,
                        format!("port {} does not exist or is bound to another node", req.port_id),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        }
        let t0 = std::time::Instant::now();
        let plan = self.wait_for_plan(&req.port_id).await?;
        let t_plan = t0.elapsed();
        let mac: MacAddr = plan
            .mac
            .parse()
            .map_err(|_| OpError::new(422, format!("port has an invalid MAC {}", plan.mac)))?;
        let dev = names::tap(&req.port_id);
        let bridge = names::bridge(plan.vni);
        let (t_lock, t_reconcile);
        {
            let _g = self.datapath.lock().await;
            t_lock = t0.elapsed();
            let want = self
                .desired()
                .ok_or_else(|| OpError::new(503, "no view from the server yet"))?;
            let report = reconcile(&self.kernel, &want).await?;
            t_reconcile = t0.elapsed();
            if !report.ok() {
                warn!(failed = ?report.failed, "reconcile before attach had failures");
            }
            let port = want
                .ports
                .get(&dev)
                .cloned()
                .ok_or_else(|| OpError::new(500, format!("port device {dev} is not in the desired datapath")))?;
            let va = VethAttach {
                port,
                mac,
                netns: req.netns.clone(),
                ifname: req.ifname.clone(),
                addresses: plan.addresses.iter().map(|a| a.address).collect(),
                gateway: plan.gateway,
                routes: plan.routes.clone(),
                mtu: plan.mtu,
            };
            self.kernel.attach_veth(&va).await?;
        }
        let t_veth = t0.elapsed();
        let details = json!({"bridge_name": bridge, "mtu": plan.mtu});
        let mut report = PortReport {
            status: Some("ACTIVE".into()),
            vif_type: Some("veth".into()),
            vif_details: Some(details),
            ..Default::default()
        };
        if let Some(record) = &req.record {
            report.device_id = record.device_id.clone();
            report.name = record.name.clone();
            report.profile = record.profile.clone();
            // The record must land: without it the port would look free (pool) or unowned.
            self.client.report_port(&req.port_id, &report).await?;
        } else if let Err(e) = self.client.report_port(&req.port_id, &report).await {
            // The workload is plumbed; the status catches up with the next attach or sync.
            warn!(port = %req.port_id, error = %e, "could not report the port ACTIVE");
        }
        // Cumulative milliseconds, so a slow attach shows where it waited.
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        info!(port = %req.port_id, dev = %dev, netns = %req.netns.display(),
            plan_ms = ms(t_plan), lock_ms = ms(t_lock), reconcile_ms = ms(t_reconcile),
            veth_ms = ms(t_veth), reported_ms = ms(t0.elapsed()), "port attached");
        let ips = plan
            .addresses
            .iter()
            .map(|a| ReplyIp {
                address: a.address.to_string(),
                gateway: a.gateway.map(|g| g.to_string()),
            })
            .collect();
        let routes = plan
            .routes
            .iter()
            .map(|r| ReplyRoute {
                destination: r.destination.to_string(),
                nexthop: Some(r.nexthop.to_string()),
            })
            .collect();
        Ok(AttachReply {
            ok: true,
            port_id: Some(req.port_id.clone()),
            interface: Some(req.ifname.clone()),
            host_interface: Some(dev),
            mac: Some(plan.mac),
            ips: Some(ips),
            gateway: plan.gateway.map(|g| g.to_string()),
            mtu: Some(plan.mtu),
            routes: Some(routes),
            dns_nameservers: Some(plan.dns),
            sandbox: None,
        })
    }

    /// Unplugs a port: its host device goes (with the workload end), its status goes DOWN.
    /// Idempotent; a port already deleted from the API is fine.
    pub async fn detach(&self, port_id: &str) -> Result<DetachReply, OpError> {
        if !valid_port_id(port_id) {
            return Err(OpError::new(400, format!("invalid port_id {port_id:?}")));
        }
        let dev = names::tap(port_id);
        {
            let _g = self.datapath.lock().await;
            self.kernel.detach(&dev).await?;
        }
        info!(port = %port_id, dev = %dev, "port detached");
        match self.client.report_port(port_id, &PortReport::status("DOWN")).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => debug!(port = %port_id, "port gone from the API already"),
            Err(e) => warn!(port = %port_id, error = %e, "could not report the port DOWN"),
        }
        Ok(DetachReply {
            ok: true,
            port_id: port_id.to_string(),
            host_interface: dev,
        })
    }
}

/// Checks, without blocking, that `path` is an absolute path to a network namespace. A missing
/// one is an unknown container (CNI 3); anything else there (FIFO, device, file) is refused
/// as an invalid CNI_NETNS (CNI 4) before any port is taken or created.
pub(crate) fn check_netns(path: &std::path::Path) -> Result<(), OpError> {
    if !path.is_absolute() {
        return Err(OpError::new(
            400,
            format!("netns {} is not an existing absolute path", path.display()),
        )
        .with_cni(crate::cni::code::INVALID_ENV));
    }
    match crate::kernel::netns::open_netns_file(path) {
        Ok(_) => Ok(()),
        Err(KernelError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Err(OpError::new(400, format!("netns {} does not exist", path.display()))
                .with_cni(crate::cni::code::UNKNOWN_CONTAINER))
        }
        Err(e) => Err(OpError::new(400, e.to_string()).with_cni(crate::cni::code::INVALID_ENV)),
    }
}

/// The host-side MAC of a VM's TAP device: the VM's MAC with the first byte `fe` (libvirt's
/// convention), so the bridge never confuses the two.
pub fn tap_mac(vm_mac: &str) -> Option<MacAddr> {
    let mut m: MacAddr = vm_mac.parse().ok()?;
    m.0[0] = 0xfe;
    Some(m)
}

/// Runs the agent on this process's network namespace until `shutdown` completes.
pub async fn run(config: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let kernel = crate::kernel::NetlinkKernel::current()
        .await
        .map_err(|e| anyhow::anyhow!("opening netlink: {e}"))?;
    let agent = Agent::new(config, kernel)?;
    agent.run(shutdown).await
}

/// Bounded exponential backoff.
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            next: first,
        }
    }
    pub fn next_wait(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

impl From<PlanError> for OpError {
    fn from(e: PlanError) -> Self {
        OpError::new(if e.transient() { 409 } else { 422 }, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_bound_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let got: Vec<_> = (0..5).map(|_| b.next_wait().as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_wait().as_millis(), 100);
    }

    #[test]
    fn tap_macs_are_the_vm_mac_with_fe() {
        assert_eq!(tap_mac("FA:16:3e:01:02:03").unwrap().to_string(), "fe:16:3e:01:02:03");
        assert_eq!(tap_mac("bogus"), None);
    }

    #[test]
    fn port_ids_are_checked() {
        assert!(valid_port_id("0b7e0f4c-2a6e-4b8e-9d3f-3c7f6e2a1b00"));
        for bad in ["", "../x", "a b", "a/b", &"x".repeat(65)] {
            assert!(!valid_port_id(bad), "{bad}");
        }
    }

    #[test]
    fn the_password_is_never_in_debug_output() {
        let c = AgentConfig::new(
            "n1",
            "http://x",
            "http://y/v3",
            "s3cret-pw",
            "192.0.2.1".parse().unwrap(),
        );
        assert!(!format!("{c:?}").contains("s3cret-pw"));
    }
}
