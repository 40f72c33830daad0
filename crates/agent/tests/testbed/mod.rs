//! A test bed for end-to-end tests: an in-process API server, N "node" network namespaces on
//! an underlay bridge, one real `isthmus agent` process per node (inside its namespace), and
//! workload namespaces attached through each agent's socket.
//!
//! The underlay is a bridge in the root namespace with a per-test /24 out of 198.18.0.0/15
//! (the benchmarking range); the server listens on the bridge's .254 address only. Everything
//! else lives in namespaces named uniquely per test. Dropping the bed kills the agents, deletes
//! the namespaces (with every device in them) and the bridge, also when a test fails; agent
//! logs are printed when a test fails.
//!
//! Which binary: `$ISTHMUS_BIN` if set, else `cargo build -p isthmus-cli --bin isthmus` (a
//! no-op when up to date) in the test's profile.
#![allow(dead_code)]

use crate::support::{in_ns, must, run, Ns};
use isthmus_server::{Config, ServerHandle};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_PASSWORD: &str = "admin-secret-Pw1";
pub const NODE_PASSWORD: &str = "node-secret-Pw1";
pub const MEMBER_PASSWORD: &str = "member-secret-Pw1";

pub use isthmus_store::testing::isthmus_bin;

/// The root-namespace underlay bridge; deleted on drop.
pub struct Underlay {
    pub bridge: String,
    /// First three octets, e.g. `198.18.37`.
    pub prefix: String,
}

static UNDERLAYS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Underlay {
    /// A /24 out of 198.18.0.0/15 that no interface of the host uses yet, starting from one
    /// derived from the pid (so concurrent test processes start apart).
    fn new() -> Underlay {
        let n = UNDERLAYS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let pid = std::process::id() as usize;
        let bridge = format!("isu{}x{}", pid % 10_000_000, n % 100);
        // A fixed address: otherwise the bridge takes the lowest address of its ports and
        // changes it as nodes join, leaving the nodes with a stale neighbour entry for the
        // server (seconds of silence until it expires).
        let mac = format!(
            "02:15:{:02x}:{:02x}:{:02x}:{:02x}",
            (pid >> 16) & 0xff,
            (pid >> 8) & 0xff,
            pid & 0xff,
            n & 0xff
        );
        must(&["ip", "link", "add", &bridge, "address", &mac, "type", "bridge"]);
        let mut u = Underlay {
            bridge,
            prefix: String::new(),
        };
        let start = (pid % 128) * 4 + n;
        for i in 0..512 {
            let k = (start + i * 7) % 512;
            let prefix = format!("198.{}.{}", 18 + k / 256, k % 256);
            let used = must(&["ip", "-4", "-o", "addr", "show"]);
            if used.contains(&format!(" {prefix}.")) {
                continue;
            }
            u.prefix = prefix;
            break;
        }
        assert!(!u.prefix.is_empty(), "no free /24 in 198.18.0.0/15");
        must(&["ip", "addr", "add", &format!("{}/24", u.server_ip()), "dev", &u.bridge]);
        must(&["ip", "link", "set", &u.bridge, "up"]);
        u
    }

    pub fn server_ip(&self) -> String {
        format!("{}.254", self.prefix)
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for args in [
                vec!["ip", "-br", "addr"],
                vec!["ip", "neigh", "show", "dev", &self.bridge],
                vec!["bridge", "fdb", "show", "br", &self.bridge],
            ] {
                let (_, out, err) = run(&args);
                eprintln!("{args:?}:\n{out}{err}");
            }
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}

/// Where every node's agent serves its metrics, in the node's namespace.
const NODE_METRICS: &str = "127.0.0.1:9100";

/// One node: its namespace on the underlay and its agent process.
pub struct Node {
    pub name: String,
    pub underlay_ip: String,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// The root-namespace end of the node's underlay link.
    root_end: String,
    child: Option<Child>,
    args: Vec<String>,
    /// Extra environment for the agent process (e.g. `ISTHMUS_POOL_SIZE`), applied on restart.
    pub env: Vec<(String, String)>,
    // Last: the namespace goes after the agent is killed.
    pub ns: Ns,
}

impl Node {
    /// Starts (or restarts) the agent process.
    pub fn start_agent(&mut self) {
        assert!(self.child.is_none(), "agent of {} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .args(&self.args)
            .env("ISTHMUS_NODE_PASSWORD", NODE_PASSWORD)
            .env("ISTHMUS_LOG", "info,isthmus_agent=debug")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawning the agent");
        self.child = Some(child);
    }

    /// SIGKILLs the agent (the datapath stays).
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the agent's socket to accept connections.
    pub async fn wait_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::UnixStream::connect(&self.socket).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent of {} never opened its socket",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The agent's metrics, scraped over HTTP inside the node's namespace.
    pub fn metrics(&self) -> String {
        in_ns(&self.ns.path(), || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(NODE_METRICS).expect("metrics endpoint");
            s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")
                .expect("send");
            let mut out = String::new();
            s.read_to_string(&mut out).expect("read");
            assert!(out.starts_with("HTTP/1.1 200"), "{out}");
            out
        })
    }

    /// One request on the agent's socket.
    pub async fn request(&self, req: Value) -> Value {
        tokio::time::timeout(
            Duration::from_secs(30),
            isthmus_agent::socket::request(&self.socket, &req),
        )
        .await
        .unwrap_or_else(|_| panic!("{req} on {} timed out", self.name))
        .unwrap_or_else(|e| panic!("{req} on {}: {e}", self.name))
    }

    /// A new workload namespace with `port_id` attached as eth0; the attach answer must be ok.
    pub async fn attach(&self, port_id: &str) -> (Ns, Value) {
        let wl = Ns::new();
        let path = wl.path();
        let answer = self
            .request(json!({"op": "attach", "port_id": port_id, "netns": path, "ifname": "eth0"}))
            .await;
        assert_eq!(answer["ok"], json!(true), "attach {port_id} on {}: {answer}", self.name);
        (wl, answer)
    }

    /// A new container namespace attached by the real `isthmus-cni` plugin through this node's
    /// agent, with `ip` requested (`CNI_ARGS=IP=`); the ADD must succeed.
    pub fn cni_container(&self, project: &str, network: &str, ip: &str) -> Ns {
        let ns = Ns::new();
        let conf = json!({"cniVersion": "1.0.0", "name": "test", "type": "isthmus-cni", "network": network,
                          "project": project, "socket": self.socket});
        let mut cmd = Command::new(isthmus_store::testing::cni_bin());
        cmd.env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("ctr-{}", ns.name))
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env("CNI_ARGS", format!("IP={ip}"));
        let out = crate::support::output_with_stdin(&mut cmd, conf.to_string().as_bytes());
        assert!(
            out.status.success(),
            "CNI ADD on {}: {} {}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ns
    }

    pub async fn detach(&self, port_id: &str) -> Value {
        self.request(json!({"op": "detach", "port_id": port_id})).await
    }

    /// How many lines of the agent's log contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn has_link(&self, dev: &str) -> bool {
        self.ns.link(dev).is_some()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        if std::thread::panicking() {
            for args in [
                vec!["ip", "-n", &self.ns.name, "-br", "addr"],
                vec!["ip", "-n", &self.ns.name, "neigh"],
                vec!["ip", "-n", &self.ns.name, "route"],
                vec!["ip", "-d", "link", "show", &self.root_end],
            ] {
                let (_, out, err) = run(&args);
                eprintln!("{args:?}:\n{out}{err}");
            }
        }
        // Deleting the namespace would take this link along, but only once the kernel lets the
        // namespace go, which lingering sockets can delay; delete it now.
        let _ = run(&["ip", "link", "del", &self.root_end]);
        // The node's router namespaces are global names; they go with the node.
        let prefix = isthmus_agent::l3::netns_prefix(&self.name);
        for ns in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
            if let Some(n) = ns.file_name().to_str().filter(|n| n.starts_with(&prefix)) {
                let _ = run(&["ip", "netns", "delete", n]);
            }
        }
        if std::env::var_os("ISTHMUS_KEEP_LOGS").is_some() && !std::thread::panicking() {
            let keep = std::env::temp_dir().join("isthmus-test-logs");
            let kept = keep.join(format!("{}-{}.log", self.name, std::process::id()));
            if std::fs::create_dir_all(&keep).is_ok() && std::fs::copy(&self.log, &kept).is_ok() {
                eprintln!("agent log of {} kept in {}", self.name, kept.display());
            }
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            // Keep the whole log of a failed test; the tail below is only the start of a story.
            let keep = std::env::temp_dir().join("isthmus-test-logs");
            let kept = keep.join(format!("{}-{}.log", self.name, std::process::id()));
            if std::fs::create_dir_all(&keep).is_ok() && std::fs::write(&kept, &log).is_ok() {
                eprintln!("full agent log of {} kept in {}", self.name, kept.display());
            }
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("----- agent log of {} (last lines) -----", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// The API server: in this process, or a real `isthmus server` process (which a test can
/// SIGKILL and restart on the same data directory and addresses).
pub enum Server {
    InProcess(InProcess),
    Process(ServerProcess),
    Stopped,
}

/// A server in this process, on a runtime of its own: the test's own runtime may block its
/// threads (namespace helpers, echo probes) without ever stalling the server.
pub struct InProcess {
    pub handle: ServerHandle,
    runtime: Option<tokio::runtime::Runtime>,
}

impl InProcess {
    async fn start(config: Config, store: isthmus_store::DynStore) -> InProcess {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("testbed-server")
            .enable_all()
            .build()
            .expect("server runtime");
        let handle = runtime
            .spawn(isthmus_server::start(config, store))
            .await
            .expect("server start task")
            .expect("server starts");
        InProcess {
            handle,
            runtime: Some(runtime),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Allowed inside async code, unlike dropping the runtime.
            rt.shutdown_background();
        }
    }
}

pub struct ServerProcess {
    child: Child,
    args: Vec<String>,
    log: PathBuf,
}

impl ServerProcess {
    fn spawn(args: &[String], log: &Path) -> ServerProcess {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("server log");
        let child = Command::new(&args[0])
            .args(&args[1..])
            .env("ISTHMUS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawning the server");
        ServerProcess {
            child,
            args: args.to_vec(),
            log: log.to_path_buf(),
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The world outside the tenant networks: an "outside" namespace with a bridge every node's
/// `br-ext` is plugged into (the flat physical network `public`, 203.0.113.0/24 with the
/// upstream router at .1) and an external host (198.51.100.10) behind that router.
pub struct Outside {
    pub ns: Ns,
    pub host: Ns,
}

pub const PHYSNET: &str = "public";
pub const EXT_BRIDGE: &str = "br-ext";
pub const UPSTREAM: &str = "203.0.113.1";
pub const EXT_CIDR: &str = "203.0.113.0/24";
pub const EXTERNAL_HOST: &str = "198.51.100.10";

impl Outside {
    fn new() -> Outside {
        let ns = Ns::new();
        let host = Ns::new();
        ns.ip(&["link", "add", "ext", "type", "bridge"]);
        ns.ip(&["addr", "add", &format!("{UPSTREAM}/24"), "dev", "ext"]);
        ns.ip(&["link", "set", "ext", "up"]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&[
            "link", "add", "tohost", "type", "veth", "peer", "name", "eth0", "netns", &host.name,
        ]);
        ns.ip(&["addr", "add", "198.51.100.1/24", "dev", "tohost"]);
        ns.ip(&["link", "set", "tohost", "up"]);
        must(&[
            "ip",
            "netns",
            "exec",
            &ns.name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        host.ip(&["addr", "add", &format!("{EXTERNAL_HOST}/24"), "dev", "eth0"]);
        host.ip(&["link", "set", "eth0", "up"]);
        host.ip(&["link", "set", "lo", "up"]);
        host.ip(&["route", "add", "default", "via", "198.51.100.1"]);
        Outside { ns, host }
    }

    /// Plugs node namespace `node` (index `i`) into the physical network: its `br-ext`.
    fn plug(&self, node: &Ns, i: usize) {
        node.ip(&["link", "add", EXT_BRIDGE, "type", "bridge"]);
        node.ip(&["link", "set", EXT_BRIDGE, "up"]);
        let outer = format!("n{i}");
        node.ip(&[
            "link",
            "add",
            "ext0",
            "type",
            "veth",
            "peer",
            "name",
            &outer,
            "netns",
            &self.ns.name,
        ]);
        node.ip(&["link", "set", "ext0", "master", EXT_BRIDGE, "up"]);
        self.ns.ip(&["link", "set", &outer, "master", "ext", "up"]);
    }
}

/// What a test bed starts with beyond its nodes.
#[derive(Debug, Clone, Default)]
pub struct Opts {
    pub server_process: bool,
    /// The agents' full sync period (3 s when 0).
    pub resync_secs: u64,
    /// An outside world (see [`Outside`]), every node plugged into it, and these nodes
    /// offered as SNAT gateways. Agents heartbeat every second and the server takes a node
    /// for dead after 4 s, so a gateway's death is noticed quickly.
    pub outside: Option<Vec<usize>>,
}

pub struct Testbed {
    // Drop order matters: nodes (agents, namespaces), then the bridge, the server, the store.
    pub nodes: Vec<Node>,
    pub outside: Option<Outside>,
    pub underlay: Underlay,
    pub server: Server,
    pub http: reqwest::Client,
    pub network_url: String,
    pub identity_url: String,
    pub admin_token: String,
    pub dir: tempfile::TempDir,
    /// How to start the server process again (process mode).
    server_args: Vec<String>,
    /// Makes this test bed's node names unique on the host.
    tag: String,
}

impl Testbed {
    /// An in-process server and `n` nodes with running, registered agents.
    pub async fn start(n: usize) -> Testbed {
        Self::start_with(n, false).await
    }

    /// Like [`Testbed::start`]; with `server_process` the server is a real process.
    pub async fn start_with(n: usize, server_process: bool) -> Testbed {
        Self::start_opts(n, server_process, 3).await
    }

    /// Like [`Testbed::start_with`], the agents' periodic full sync every `resync_secs` (3 s
    /// elsewhere, for drift repair; a test of what a change alone does wants it rare, or the
    /// change could be applied by a full sync instead).
    pub async fn start_opts(n: usize, server_process: bool, resync_secs: u64) -> Testbed {
        Self::start_full(
            n,
            Opts {
                server_process,
                resync_secs,
                outside: None,
            },
        )
        .await
    }

    /// A test bed as `opts` says.
    pub async fn start_full(n: usize, opts: Opts) -> Testbed {
        let Opts {
            server_process,
            resync_secs,
            outside,
        } = opts;
        let resync_secs = if resync_secs == 0 { 3 } else { resync_secs };
        crate::support::require_root();
        let bin = tokio::task::spawn_blocking(isthmus_bin).await.expect("build task");
        let underlay = Underlay::new();
        let dir = tempfile::Builder::new()
            .prefix("isthmus-testbed-")
            .tempdir()
            .expect("tempdir");
        let http = reqwest::Client::new();
        let (server, network_url, identity_url, server_args) = if server_process {
            let ip = underlay.server_ip();
            let (id_port, net_port) = (free_port(&ip), free_port(&ip));
            let config = dir.path().join("server.toml");
            std::fs::write(&config, "password_hash_kib = 64\n").expect("server config");
            let args: Vec<String> = [
                bin.to_str().unwrap(),
                "server",
                "--config",
                config.to_str().unwrap(),
                "--store",
                "embedded",
                "--data-dir",
                dir.path().join("data").to_str().unwrap(),
                "--identity-listen",
                &format!("{ip}:{id_port}"),
                "--network-listen",
                &format!("{ip}:{net_port}"),
                "--admin-password",
                ADMIN_PASSWORD,
                // Test beds make more objects in one project than Neutron's default quotas.
                "--quota-default",
                "all=-1",
                // The underlay is the test bed's own namespaces.
                "--insecure-http",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let p = ServerProcess::spawn(&args, &dir.path().join("server.log"));
            (
                Server::Process(p),
                format!("http://{ip}:{net_port}"),
                format!("http://{ip}:{id_port}/v3"),
                args,
            )
        } else {
            let listen: std::net::SocketAddr = format!("{}:0", underlay.server_ip()).parse().unwrap();
            let mut config = Config {
                identity_listen: listen,
                network_listen: listen,
                admin_password: Some(ADMIN_PASSWORD.into()),
                password_hash_kib: 64,
                insecure_http: true,
                agent_down_secs: if outside.is_some() {
                    4
                } else {
                    Config::default().agent_down_secs
                },
                ..Config::default()
            };
            config.unlimited_quotas();
            let store = isthmus_store::embedded::EmbeddedStore::open(&dir.path().join("store")).expect("store");
            let h = InProcess::start(config, store).await;
            let urls = (
                format!("http://{}", h.handle.network_addr),
                format!("http://{}/v3", h.handle.identity_addr),
            );
            (Server::InProcess(h), urls.0, urls.1, vec![])
        };
        wait_ready(&http, &identity_url, &network_url).await;
        let admin_token = token(&http, &identity_url, "admin", ADMIN_PASSWORD, "admin").await;
        let gateways = outside.clone().unwrap_or_default();
        let mut tb = Testbed {
            nodes: vec![],
            outside: outside.map(|_| Outside::new()),
            underlay,
            server,
            http,
            network_url,
            identity_url,
            admin_token,
            dir,
            server_args,
            tag: format!("{:x}{:x}", std::process::id() % 0xfff, crate::support::unique()),
        };
        let service = tb.id_of("/projects?name=service", "projects").await;
        let role = tb.id_of("/roles?name=node", "roles").await;
        for i in 0..n {
            // Unique per test bed: router namespaces are named after their node, and test beds
            // of one test binary run side by side.
            let name = format!("node{i}-{}", tb.tag);
            let (s, b) = tb
                .identity(
                    Method::POST,
                    "/users",
                    Some(json!({"user": {"name": name, "password": NODE_PASSWORD, "domain_id": "default"}})),
                )
                .await;
            assert_eq!(s, 201, "{b}");
            let uid = b["user"]["id"].as_str().unwrap().to_string();
            let (s, b) = tb
                .identity(
                    Method::PUT,
                    &format!("/projects/{service}/users/{uid}/roles/{role}"),
                    None,
                )
                .await;
            assert_eq!(s, 204, "{b}");
            let ns = Ns::new();
            let root_end = format!("{}n{i}", tb.underlay.bridge);
            must(&[
                "ip", "link", "add", &root_end, "type", "veth", "peer", "name", "und0", "netns", &ns.name,
            ]);
            must(&["ip", "link", "set", &root_end, "master", &tb.underlay.bridge]);
            must(&["ip", "link", "set", &root_end, "up"]);
            let ip = format!("{}.{}", tb.underlay.prefix, i + 1);
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "und0"]);
            ns.ip(&["link", "set", "und0", "up"]);
            let socket = tb.dir.path().join(format!("{name}.sock"));
            let mut args: Vec<String> = [
                bin.to_str().unwrap(),
                "agent",
                "--node",
                &name,
                "--underlay-ip",
                &ip,
                "--auth-url",
                &tb.identity_url,
                "--socket",
                socket.to_str().unwrap(),
                "--resync-secs",
                &resync_secs.to_string(),
                "--heartbeat-secs",
                if tb.outside.is_some() { "1" } else { "2" },
                // On the node namespace's own loopback: the same address on every node.
                "--metrics-listen",
                NODE_METRICS,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            // With the in-process server the agents find the network API in the identity
            // catalog; with a server process they are told.
            if server_process {
                args.extend(["--network-url".to_string(), tb.network_url.clone()]);
            }
            if let Some(o) = &tb.outside {
                o.plug(&ns, i);
                args.extend(["--physical-network".to_string(), format!("{PHYSNET}={EXT_BRIDGE}")]);
                if gateways.contains(&i) {
                    args.push("--gateway".to_string());
                }
            }
            let mut node = Node {
                root_end,
                log: tb.dir.path().join(format!("{name}.log")),
                name,
                underlay_ip: ip,
                socket,
                child: None,
                args,
                env: vec![],
                ns,
            };
            node.start_agent();
            tb.nodes.push(node);
        }
        // The admin project (where the tests' admin-made networks live) lets every node plug
        // its ports; projects made by `member` do the same.
        let admin_project = tb.id_of("/projects?name=admin", "projects").await;
        tb.grant_nodes(&admin_project).await;
        for node in &tb.nodes {
            node.wait_socket().await;
        }
        tb.wait_registered().await;
        tb
    }

    /// Project `project_id` grants every node of the test bed the right to plug its ports
    /// (the node role on the project).
    pub async fn grant_nodes(&self, project_id: &str) {
        let role = self.id_of("/roles?name=node", "roles").await;
        for n in &self.nodes {
            let uid = self.id_of(&format!("/users?name={}", n.name), "users").await;
            let path = format!("/projects/{project_id}/users/{uid}/roles/{role}");
            let (s, b) = self.identity(Method::PUT, &path, None).await;
            assert_eq!(s, 204, "{b}");
        }
    }

    /// Waits until every node is listed as an alive agent.
    pub async fn wait_registered(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (s, b) = self.net(Method::GET, "/v2.0/agents", None).await;
            assert_eq!(s, 200, "{b}");
            let alive = b["agents"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["alive"] == json!(true))
                .count();
            if alive >= self.nodes.len() {
                return;
            }
            assert!(Instant::now() < deadline, "agents did not register: {b}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn id_of(&self, path: &str, plural: &str) -> String {
        let (s, b) = self.identity(Method::GET, path, None).await;
        assert_eq!(s, 200, "{b}");
        b[plural][0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: {b}"))
            .to_string()
    }

    pub async fn identity(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        call(
            &self.http,
            method,
            &format!("{}{path}", self.identity_url),
            &self.admin_token,
            body,
        )
        .await
    }

    /// The network API as the admin.
    pub async fn net(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.net_as(&self.admin_token, method, path, body).await
    }

    pub async fn net_as(&self, token: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        call(&self.http, method, &format!("{}{path}", self.network_url), token, body).await
    }

    /// A network API call as `token` that must answer `want`: the body.
    pub async fn expect_as(&self, token: &str, method: Method, path: &str, body: Value, want: u16) -> Value {
        let (s, b) = self.net_as(token, method.clone(), path, Some(body)).await;
        assert_eq!(s, want, "{method} {path}: {b}");
        b
    }

    /// A network with one IPv4 subnet, as `token`: (network id, subnet id).
    pub async fn network_as(&self, token: &str, name: &str, cidr: &str) -> (String, String) {
        self.network_with(token, name, cidr, json!({})).await
    }

    /// [`Self::network_as`] with `extra` attributes on the subnet (e.g. `allocation_pools`).
    pub async fn network_with(&self, token: &str, name: &str, cidr: &str, extra: Value) -> (String, String) {
        let n = self
            .expect_as(
                token,
                Method::POST,
                "/v2.0/networks",
                json!({"network": {"name": name}}),
                201,
            )
            .await;
        let net = n["network"]["id"].as_str().expect("network id").to_string();
        let subnet = merged(json!({"network_id": net, "cidr": cidr, "ip_version": 4}), extra);
        let body = json!({ "subnet": subnet });
        let s = self.expect_as(token, Method::POST, "/v2.0/subnets", body, 201).await;
        (net, s["subnet"]["id"].as_str().expect("subnet id").to_string())
    }

    /// The external network `public` (flat, on [`PHYSNET`]) with a subnet of [`EXT_CIDR`]
    /// whose gateway is [`UPSTREAM`], without DHCP, plus `extra` subnet attributes: its id.
    pub async fn external_network(&self, extra: Value) -> String {
        let admin = &self.admin_token;
        let ext = self
            .create(
                admin,
                "networks",
                "network",
                json!({"name": "public", "router:external": true,
                    "provider:network_type": "flat", "provider:physical_network": PHYSNET}),
            )
            .await;
        let id = ext["id"].as_str().expect("network id").to_string();
        let subnet = json!({"network_id": id, "cidr": EXT_CIDR, "ip_version": 4, "gateway_ip": UPSTREAM,
                            "enable_dhcp": false});
        self.create(admin, "subnets", "subnet", merged(subnet, extra)).await;
        id
    }

    /// A new credential of trunk `trunk` (as `token`), as the nested plugin takes it: `id.secret`.
    pub async fn trunk_credential(&self, token: &str, trunk: &str) -> String {
        let cred = self
            .expect_as(
                token,
                Method::POST,
                &format!("/isthmus/v1/trunks/{trunk}/credentials"),
                json!({"credential": {}}),
                201,
            )
            .await;
        format!(
            "{}.{}",
            cred["credential"]["id"].as_str().expect("id"),
            cred["credential"]["secret"].as_str().expect("secret")
        )
    }

    /// A router (as `token`) with interfaces on `subnets`: its id.
    pub async fn router_as(&self, token: &str, subnets: &[&str]) -> String {
        let body = json!({"router": {"name": "r"}});
        let r = self.expect_as(token, Method::POST, "/v2.0/routers", body, 201).await;
        let router = r["router"]["id"].as_str().expect("router id").to_string();
        for s in subnets {
            self.interface_as(token, &router, s, true).await;
        }
        router
    }

    /// Adds (or removes) router `router`'s interface on `subnet`, as `token`.
    pub async fn interface_as(&self, token: &str, router: &str, subnet: &str, add: bool) {
        let op = if add { "add" } else { "remove" };
        let path = format!("/v2.0/routers/{router}/{op}_router_interface");
        self.expect_as(token, Method::PUT, &path, json!({"subnet_id": subnet}), 200)
            .await;
    }

    /// A port (as `token`) with fixed address `ip` and `extra` attributes, attached as a
    /// workload on node `node`: (port id, the workload's namespace).
    pub async fn workload_as(
        &self,
        token: &str,
        net: &str,
        subnet: &str,
        ip: &str,
        node: usize,
        extra: Value,
    ) -> (String, Ns) {
        let mut attrs = json!({"network_id": net, "fixed_ips": [{"subnet_id": subnet, "ip_address": ip}]});
        if let (Some(a), Some(e)) = (attrs.as_object_mut(), extra.as_object()) {
            a.extend(e.clone());
        }
        let p = self
            .expect_as(token, Method::POST, "/v2.0/ports", json!({ "port": attrs }), 201)
            .await;
        let id = p["port"]["id"].as_str().expect("port id").to_string();
        let (ns, _) = self.nodes[node].attach(&id).await;
        (id, ns)
    }

    /// A VM port on `net` with fixed IP `ip` bound to node `node`, as a compute service makes
    /// it (admin sets the host); returns once the node's agent has made its tap.
    /// The port belongs to the network's project, as an instance of that project's would (and
    /// so gets that project's default security group).
    pub async fn vm_port(&self, net: &str, subnet: &str, ip: &str, node: usize) -> Value {
        let (s, n) = self.net(Method::GET, &format!("/v2.0/networks/{net}"), None).await;
        assert_eq!(s, 200, "{n}");
        let project = n["network"]["project_id"].clone();
        let body = json!({"port": {"network_id": net, "device_owner": "compute:nova", "project_id": project,
            "binding:host_id": self.nodes[node].name, "fixed_ips": [{"subnet_id": subnet, "ip_address": ip}]}});
        let (s, b) = self.net(Method::POST, "/v2.0/ports", Some(body)).await;
        assert_eq!(s, 201, "{b}");
        let port = b["port"].clone();
        let tap = isthmus_agent::names::tap(port["id"].as_str().expect("id"));
        let n = &self.nodes[node];
        eventually(15, "the agent makes the VM's tap", || n.has_link(&tap)).await;
        port
    }

    /// A project `tag` with a member user, whose nodes may plug its ports; returns that
    /// user's token.
    pub async fn member(&self, tag: &str) -> String {
        let (s, b) = self
            .identity(
                Method::POST,
                "/projects",
                Some(json!({"project": {"name": tag, "domain_id": "default"}})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let pid = b["project"]["id"].as_str().unwrap().to_string();
        let user = format!("user-{tag}");
        let (s, b) = self
            .identity(
                Method::POST,
                "/users",
                Some(json!({"user": {"name": user, "password": MEMBER_PASSWORD, "domain_id": "default"}})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let uid = b["user"]["id"].as_str().unwrap().to_string();
        let role = self.id_of("/roles?name=member", "roles").await;
        let (s, b) = self
            .identity(Method::PUT, &format!("/projects/{pid}/users/{uid}/roles/{role}"), None)
            .await;
        assert_eq!(s, 204, "{b}");
        self.grant_nodes(&pid).await;
        token(&self.http, &self.identity_url, &user, MEMBER_PASSWORD, tag).await
    }

    /// Creates `singular` in `collection` with `token`; asserts 201.
    pub async fn create(&self, token: &str, collection: &str, singular: &str, attrs: Value) -> Value {
        let (s, b) = self
            .net_as(
                token,
                Method::POST,
                &format!("/v2.0/{collection}"),
                Some(json!({ singular: attrs })),
            )
            .await;
        assert_eq!(s, 201, "create {singular} {attrs}: {b}");
        b[singular].clone()
    }

    /// A port as the admin sees it (binding attributes included).
    pub async fn port(&self, id: &str) -> Value {
        let (s, b) = self.net(Method::GET, &format!("/v2.0/ports/{id}"), None).await;
        assert_eq!(s, 200, "{b}");
        b["port"].clone()
    }

    /// SIGKILLs the server process (process mode); agents keep running.
    pub fn kill_server(&mut self) {
        assert!(
            matches!(self.server, Server::Process(_)),
            "kill_server needs a server process"
        );
        self.server = Server::Stopped;
    }

    /// SIGSTOPs (`true`) or SIGCONTs (`false`) the server process: it keeps its sockets, so
    /// clients connect and send, and get no answer until it resumes.
    pub fn pause_server(&self, pause: bool) {
        let Server::Process(p) = &self.server else {
            panic!("pause_server needs a server process");
        };
        let sig = if pause { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: plain syscall on our own child's pid.
        let rc = unsafe { libc::kill(p.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "signalling the server");
    }

    /// Starts the server process again on the same data directory and addresses.
    pub async fn restart_server(&mut self) {
        assert!(matches!(self.server, Server::Stopped), "the server is running");
        let p = ServerProcess::spawn(&self.server_args, &self.dir.path().join("server.log"));
        self.server = Server::Process(p);
        wait_ready(&self.http, &self.identity_url, &self.network_url).await;
        self.admin_token = token(&self.http, &self.identity_url, "admin", ADMIN_PASSWORD, "admin").await;
    }
}

async fn wait_ready(http: &reqwest::Client, identity_url: &str, network_url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let id_ok = http.get(format!("{identity_url}/")).send().await.is_ok();
        let net_ok = http
            .get(format!("{network_url}/"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if id_ok && net_ok {
            return;
        }
        assert!(Instant::now() < deadline, "the server did not come up within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `base` with the attributes of `extra` (both JSON objects) added or replaced.
fn merged(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(extra)) = (base.as_object_mut(), extra) {
        b.extend(extra);
    }
    base
}

/// Polls `f` every 100 ms until it holds; panics with `what` after `secs`.
pub async fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn token(http: &reqwest::Client, identity_url: &str, user: &str, password: &str, project: &str) -> String {
    let config = isthmus_client::Config::new(identity_url, isthmus_client::Auth::password(user, password, project))
        .identity_only();
    let client = isthmus_client::Client::with_http(http.clone(), config);
    match client.token(None).await {
        Ok(t) => t.secret().to_string(),
        Err(e) => panic!("token for {user}/{project}: {e}"),
    }
}

pub async fn call(http: &reqwest::Client, method: Method, url: &str, token: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = http
        .request(method.clone(), url)
        .header("X-Auth-Token", token)
        .timeout(Duration::from_secs(10));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, v)
}
