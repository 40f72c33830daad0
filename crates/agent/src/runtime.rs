//! The running agent, wired from its parts: the node stream feeding the shared view, one
//! controller per datapath domain driven by its runner, heartbeats carrying what the node has
//! converged to, and the local socket's operations. The datapath is only ever changed from a
//! view the server sent. Before the first snapshot nothing is reconciled (what exists is
//! kept), and while the server is unreachable the last view stays in force: a lost server
//! never tears anything down.

pub use crate::attach::{check_netns, valid_port_id, AttachRequest, OpError};
pub use crate::controller::ports::tap_mac;
pub use crate::controller::Backoff;

use crate::attach::Attacher;
use crate::client::{ApiError, Client, Credentials};
use crate::cni::{AddRequest, Cni, CniConfig, Pools};
use crate::controller::dhcp::{Dhcp, DhcpController};
use crate::controller::firewall::FirewallController;
use crate::controller::l2::L2Controller;
use crate::controller::l3::L3Controller;
use crate::controller::ports::PortsController;
use crate::controller::qos::QosController;
use crate::controller::{self, Health, Schedule};
use crate::desired::{compute, Datapath};
use crate::kernel::{Kernel, KernelError};
use crate::metrics::{AgentMetrics, AttachLabels};
use crate::objects::Applied;
use crate::reconcile::Report;
use crate::socket::Ops;
use crate::state::NodeState;
use crate::view::NodeView;
use isthmus_wire::node::Heartbeat;
use isthmus_wire::socket::{AttachReply, CheckReply, DelReply, DetachReply, GcReply, OkReply, StatusReply};
use isthmus_wire::stream::Message;
use serde_json::Value;
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
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
    /// Physical network name → host bridge.
    pub physical_networks: crate::l3::PhysicalNetworks,
    /// Offer this node as a SNAT gateway (the `gateway` capability).
    pub gateway: bool,
    /// Where the agent counts; registered wherever the caller serves metrics.
    pub metrics: Arc<AgentMetrics>,
    /// CA bundle (PEM) that verifies an https server; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
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
            heartbeat: Duration::from_secs(20),
            attach_timeout: Duration::from_secs(20),
            pool_size: 3,
            pool_idle: Duration::from_secs(600),
            dhcp_lease_secs: 86400,
            orphan_sweep: Duration::from_secs(60),
            physical_networks: Default::default(),
            gateway: false,
            metrics: AgentMetrics::unserved(),
            ca_file: None,
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

/// The agent: its parts, wired. It holds no state of its own.
pub struct Agent<K> {
    pub config: AgentConfig,
    pub state: Arc<NodeState>,
    client: Arc<Client>,
    kernel: Arc<K>,
    health: Arc<Health>,
    pools: Arc<Pools>,
    l2: Arc<L2Controller<K>>,
    ports: Arc<PortsController<K, K>>,
    dhcp: Arc<DhcpController<K>>,
    firewall: Arc<FirewallController<K>>,
    l3: Arc<L3Controller<K>>,
    attacher: Arc<Attacher<K, K>>,
    cni: Cni<K>,
}

impl<K: Kernel + 'static> Agent<K> {
    pub fn new(config: AgentConfig, kernel: K) -> Result<Arc<Self>, ApiError> {
        let client = Arc::new(Client::new(
            &config.network_url,
            &config.auth_url,
            &config.node,
            Credentials {
                user: config.node.clone(),
                password: config.password.clone(),
                project: config.project.clone(),
            },
            config.ca_file.as_deref(),
        )?);
        let kernel = Arc::new(kernel);
        let state = NodeState::with_physical(&config.node, config.underlay_ip, config.physical_networks.clone());
        let pools = Arc::new(Pools::default());
        let l2 = L2Controller::new(kernel.clone(), state.clone());
        let doomed = {
            let pools = pools.clone();
            Arc::new(move |port: &str| pools.doomed(port))
        };
        let ports = PortsController::new(kernel.clone(), l2.clone(), state.clone(), Some(client.clone()), doomed);
        let dhcp = DhcpController::new(
            kernel.clone(),
            state.clone(),
            config.dhcp_lease_secs,
            config.metrics.clone(),
        );
        let firewall = FirewallController::new(kernel.clone(), config.resync);
        let l3 = L3Controller::new(kernel.clone(), l2.clone(), &config.node, config.resync);
        let attacher = Arc::new(Attacher::new(
            state.clone(),
            client.clone(),
            ports.clone(),
            config.attach_timeout,
        ));
        let cni = Cni::new(
            CniConfig {
                pool_size: config.pool_size,
                pool_idle: config.pool_idle,
                orphan_sweep: config.orphan_sweep,
            },
            state.clone(),
            client.clone(),
            attacher.clone(),
            kernel.clone(),
            pools.clone(),
        );
        Ok(Arc::new(Agent {
            config,
            state,
            client,
            kernel,
            health: Arc::new(Health::default()),
            pools,
            l2,
            ports,
            dhcp,
            firewall,
            l3,
            attacher,
            cni,
        }))
    }

    /// The kernel the agent drives.
    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    /// Whether the agent currently hears from the server.
    pub fn connected(&self) -> bool {
        self.state.connected()
    }

    /// Applies one message of the node stream to the object map.
    pub fn apply_message(&self, msg: &Value) -> Result<Applied, crate::objects::BadMessage> {
        let msg = <Message as serde::Deserialize>::deserialize(msg)
            .map_err(|e| crate::objects::BadMessage(format!("{e} in {msg}")))?;
        Ok(self.state.apply(msg))
    }

    /// The node's view; `None` before the first snapshot.
    pub fn view(&self) -> Option<NodeView> {
        self.state.view()
    }

    /// The datapath the current view asks for; `None` before the first snapshot.
    pub fn desired(&self) -> Option<Datapath> {
        self.view().map(|v| compute(&v))
    }

    /// What every controller has converged to, and what failed: the heartbeat's report.
    pub fn health(&self) -> (Option<i64>, Vec<String>) {
        self.health.summary()
    }

    /// One L2 and one port-device pass against the current view (nothing before the first
    /// snapshot).
    pub async fn sync(&self) -> Result<Option<Report>, KernelError> {
        let Some(snap) = self.state.snapshot() else {
            debug!("no snapshot yet, keeping the datapath as it is");
            return Ok(None);
        };
        let mut r = self.l2.pass(&snap).await?;
        r.merge(self.ports.pass(&snap).await?);
        Ok(Some(r))
    }

    /// Runs everything until `shutdown` completes.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
        info!(node = %self.config.node, underlay = %self.config.underlay_ip, "agent starting");
        let listener = crate::socket::bind(&self.config.socket)?;
        let resync = Schedule::new(self.config.resync);
        // DHCP and the firewall look again every few seconds: a VM's tap may appear (the
        // hypervisor opens it) without any change to the view.
        let quick = Schedule::new(Duration::from_secs(2).min(self.config.resync));
        let (st, h, m) = (&self.state, &self.health, &self.config.metrics);
        let tasks = [
            tokio::spawn(self.clone().heartbeat_loop()),
            tokio::spawn({
                let a = self.clone();
                async move { crate::stream::follow(&a.state, &a.client).await }
            }),
            tokio::spawn(controller::run(
                self.l2.clone(),
                st.clone(),
                h.clone(),
                m.clone(),
                resync,
            )),
            tokio::spawn(controller::run(
                self.ports.clone(),
                st.clone(),
                h.clone(),
                m.clone(),
                resync,
            )),
            tokio::spawn(controller::run(
                Arc::new(Dhcp(self.dhcp.clone())),
                st.clone(),
                h.clone(),
                m.clone(),
                quick,
            )),
            tokio::spawn(controller::run(
                self.firewall.clone(),
                st.clone(),
                h.clone(),
                m.clone(),
                quick,
            )),
            tokio::spawn(controller::run(
                self.l3.clone(),
                st.clone(),
                h.clone(),
                m.clone(),
                resync,
            )),
            // Quick: a port's device may appear after the view names it.
            tokio::spawn(controller::run(
                Arc::new(QosController::new(self.kernel.clone())),
                st.clone(),
                h.clone(),
                m.clone(),
                quick,
            )),
            tokio::spawn({
                let a = self.clone();
                async move { a.cni.pool_loop().await }
            }),
            tokio::spawn(crate::socket::serve(self.clone(), listener)),
            tokio::spawn(self.clone().count_objects()),
        ];
        shutdown.await;
        info!("agent stopping (the datapath stays as it is)");
        for t in &tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.config.socket);
        Ok(())
    }

    /// Keeps the datapath object gauges at what the current view asks for (at most one
    /// count a second).
    async fn count_objects(self: Arc<Self>) {
        let mut changes = self.state.subscribe();
        loop {
            if let Some(snap) = self.state.snapshot() {
                let dp = compute(&snap.view);
                self.config.metrics.set_objects(&[
                    ("bridges", dp.bridges.len()),
                    ("vxlans", dp.vxlans.len()),
                    ("fdb_entries", dp.fdb.len()),
                    ("port_devices", dp.ports.len()),
                    ("routers", snap.l3.routers.len()),
                    ("firewall_ports", snap.firewall.ports.len()),
                    ("dhcp_served_taps", self.dhcp.serving()),
                ]);
            }
            let wait = tokio::time::sleep(Duration::from_secs(1));
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                // DHCP taps come and go without a view change.
                _ = tokio::time::sleep(self.config.resync) => {}
            }
            wait.await;
        }
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let mut restarted = true;
        let mut failing = false;
        let mut last_failures: Vec<String> = vec![];
        loop {
            let (converged_revision, failures) = self.health.summary();
            if failures != last_failures && !failures.is_empty() {
                warn!(failures = ?failures, "the datapath is not converged; reporting it");
            }
            last_failures = failures.clone();
            let hb = Heartbeat {
                underlay_ip: self.config.underlay_ip.to_string(),
                capabilities: if self.config.gateway {
                    vec!["gateway".to_string()]
                } else {
                    vec![]
                },
                restarted,
                converged_revision,
                failures,
            };
            match self.client.heartbeat(hb).await {
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
}

impl<K: Kernel + 'static> Agent<K> {
    fn timed(&self, op: &'static str, started: std::time::Instant, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.config
            .metrics
            .attach_duration
            .get_or_create(&AttachLabels { op, outcome })
            .observe(started.elapsed().as_secs_f64());
    }
}

impl<K: Kernel + 'static> Ops for Agent<K> {
    async fn attach(&self, req: &AttachRequest) -> Result<AttachReply, OpError> {
        let started = std::time::Instant::now();
        let r = self.attacher.attach(req).await;
        self.timed("attach", started, r.is_ok());
        r
    }

    async fn detach(&self, port_id: &str) -> Result<DetachReply, OpError> {
        self.attacher.detach(port_id).await
    }

    /// What the agent knows: whether it has the server's view yet, at which revision, and this
    /// node's ports and networks.
    fn status(&self) -> StatusReply {
        let (synced, revision) = {
            let v = self.state.lock();
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

    async fn cni_add(&self, req: &AddRequest) -> Result<AttachReply, OpError> {
        let started = std::time::Instant::now();
        let r = self.cni.cni_add(req).await;
        self.timed("cni_add", started, r.is_ok());
        r
    }

    async fn cni_del(&self, container_id: &str, ifname: &str) -> Result<DelReply, OpError> {
        self.cni.cni_del(container_id, ifname).await
    }

    async fn cni_check(&self, container_id: &str, ifname: &str, netns: &Path) -> Result<CheckReply, OpError> {
        self.cni.cni_check(container_id, ifname, netns).await
    }

    async fn cni_gc(
        &self,
        project: &str,
        network: &str,
        valid: &HashSet<(String, String)>,
    ) -> Result<GcReply, OpError> {
        self.cni.cni_gc(project, network, valid).await
    }

    fn cni_status(&self) -> Result<OkReply, OpError> {
        self.cni.cni_status()
    }
}

/// Runs the agent on this process's network namespace until `shutdown` completes.
pub async fn run(config: AgentConfig, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let kernel = crate::kernel::NetlinkKernel::current()
        .await
        .map_err(|e| anyhow::anyhow!("opening netlink: {e}"))?;
    let agent = Agent::new(config, kernel)?;
    agent.run(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

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

#[cfg(test)]
mod socket_tests {
    use super::*;
    use crate::kernel::FakeKernel;
    use crate::socket::{bind, handle, request, serve};
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;
    #[allow(unused_imports)]
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixStream;

    fn agent(dir: &Path) -> Arc<Agent<FakeKernel>> {
        let mut c = AgentConfig::new(
            "n1",
            "http://127.0.0.1:9",
            "http://127.0.0.1:9/v3",
            "pw",
            "192.0.2.1".parse().unwrap(),
        );
        c.socket = dir.join("agent.sock");
        Agent::new(c, FakeKernel::new()).unwrap()
    }

    #[tokio::test]
    async fn bad_requests_get_clear_errors_on_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let path = a.config.socket.clone();
        let l = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        tokio::spawn(serve(a.clone(), l));
        for (req, code, needle) in [
            (json!("x"), 400, "JSON object"),
            (json!({}), 400, "'op' is required"),
            (json!({"op": 5}), 400, "must be a string"),
            (json!({"op": "fly"}), 400, "unknown op"),
            (json!({"op": "attach"}), 400, "'port_id' is required"),
            (json!({"op": "attach", "port_id": "p1"}), 400, "'netns' is required"),
            (
                json!({"op": "attach", "port_id": "../p", "netns": "/proc/self/ns/net"}),
                400,
                "invalid port_id",
            ),
            (json!({"op": "attach", "port_id": "p1", "netns": "rel"}), 400, "netns"),
            (
                json!({"op": "attach", "port_id": "p1", "netns": "/proc/self/ns/net", "ifname": "a/b"}),
                400,
                "ifname",
            ),
            (json!({"op": "detach", "port_id": "a b"}), 400, "invalid port_id"),
            // Valid, but the server is not there.
            (
                json!({"op": "attach", "port_id": "p1", "netns": "/proc/self/ns/net"}),
                503,
                "unreachable",
            ),
        ] {
            let got = request(&path, &req).await.unwrap();
            assert_eq!(got["ok"], json!(false), "{req}: {got}");
            assert_eq!(got["code"], json!(code), "{req}: {got}");
            assert!(got["message"].as_str().unwrap().contains(needle), "{req}: {got}");
        }
        // Not JSON at all, then a second request on the same connection.
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"garbage\n{\"op\":\"nope\"}\n").await.unwrap();
        let mut r = BufReader::new(s);
        for needle in ["not valid JSON", "unknown op"] {
            let mut l = String::new();
            r.read_line(&mut l).await.unwrap();
            assert!(l.contains(needle), "{l}");
        }
    }

    /// The socket is 0600 from the moment it appears at its path, in a directory the agent
    /// made 0700; a stale socket is replaced.
    #[tokio::test]
    async fn the_socket_is_never_open_to_others() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("run").join("isthmus");
        let path = parent.join("agent.sock");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (path, stop) = (path.clone(), stop.clone());
            // Stats the path as fast as it can: the first mode seen is the one others could use.
            std::thread::spawn(move || loop {
                if let Ok(m) = std::fs::symlink_metadata(&path) {
                    return Some(m.permissions().mode() & 0o777);
                }
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return None;
                }
            })
        };
        let l = bind(&path).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            watcher.join().unwrap(),
            Some(0o600),
            "first mode seen at the socket path"
        );
        for d in [&parent, &dir.path().join("run")] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        // Nothing else is left in the directory, and the listener is reachable at the path.
        let names: Vec<_> = std::fs::read_dir(&parent)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("agent.sock")]);
        let (accepted, connected) = tokio::join!(l.accept(), UnixStream::connect(&path));
        accepted.unwrap();
        connected.unwrap();
        // Rebinding over the stale socket works and keeps the mode.
        drop(l);
        let _l = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A file that is not a socket is never replaced.
        let file = parent.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    /// A namespace path that is a FIFO, a device, a directory or a plain file is refused at
    /// once (CNI 4), before any port is taken: opening a FIFO used to block the agent.
    #[tokio::test]
    async fn netns_paths_that_are_not_namespaces_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let paths = [
            fifo.clone(),
            plain,
            dir.path().to_path_buf(),
            PathBuf::from("/dev/null"),
        ];
        for p in &paths {
            for req in [
                json!({"op": "cni_add", "container_id": "c1", "ifname": "eth0", "netns": p,
                       "network": "n", "project": "p"}),
                json!({"op": "cni_add", "container_id": "c1", "ifname": "eth0", "netns": "/run/netns/x",
                       "netns_fd": p, "network": "n", "project": "p"}),
                json!({"op": "attach", "port_id": "p1", "netns": p}),
            ] {
                let line = req.to_string();
                let got = tokio::time::timeout(std::time::Duration::from_secs(5), handle(&*a, line.as_bytes()))
                    .await
                    .unwrap_or_else(|_| panic!("{req} blocked"));
                let e = got.expect_err(&req.to_string());
                assert_eq!((e.code, e.cni), (400, Some(4)), "{req}: {e:?}");
                assert!(e.message.contains("not a network namespace"), "{req}: {e:?}");
            }
        }
        let missing = json!({"op": "cni_add", "container_id": "c1", "ifname": "eth0",
                             "netns": dir.path().join("gone"), "network": "n", "project": "p"});
        let e = handle(&*a, missing.to_string().as_bytes()).await.unwrap_err();
        assert_eq!((e.code, e.cni), (400, Some(3)), "{e:?}");
    }

    #[tokio::test]
    async fn detach_is_idempotent_without_a_server() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        for _ in 0..2 {
            let v = handle(&*a, br#"{"op":"detach","port_id":"p1"}"#).await.unwrap();
            assert_eq!(v["ok"], json!(true));
        }
    }

    #[tokio::test]
    async fn nothing_is_reconciled_before_the_first_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        assert_eq!(a.sync().await.unwrap(), None);
        let st = handle(&*a, br#"{"op":"status"}"#).await.unwrap();
        assert_eq!((st["synced"].clone(), st["node"].clone()), (json!(false), json!("n1")));
        a.apply_message(&json!({"type": "snapshot", "revision": 7, "objects": []}))
            .unwrap();
        assert!(a.sync().await.unwrap().is_some());
        let st = handle(&*a, br#"{"op":"status"}"#).await.unwrap();
        assert_eq!((st["synced"].clone(), st["revision"].clone()), (json!(true), json!(7)));
    }
}
