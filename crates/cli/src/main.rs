//! `isthmus`: the server, the all-in-one `up`, and client commands for daily use.

mod client;
mod keys;
mod local_node;
mod secrets;
mod signals;
mod tls;

/// Server and agent are long-running with large, long-lived heaps (cache, node views); glibc
/// malloc spent most of an idle server's CPU walking its fragmented free lists.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use isthmus_server::Config;
use isthmus_store::DynStore;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "isthmus", version, about = "One network for virtual machines and containers")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the API server (identity + network API) against a store.
    Server(Box<ServerArgs>),
    /// All-in-one: the server on the embedded store in a data directory.
    Up(UpArgs),
    /// Networks.
    Network(client::ResourceCmd),
    /// Subnets.
    Subnet(client::ResourceCmd),
    /// Ports.
    Port(client::ResourceCmd),
    /// Run the node agent: programs this node's datapath and serves the local attach socket.
    Agent(AgentArgs),
    /// Token signing keys: rotate, list.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
}

#[derive(Args)]
struct AgentArgs {
    /// This node's name (its user's name, and the ports' binding:host_id).
    #[arg(long, env = "ISTHMUS_NODE")]
    node: String,
    /// This node's underlay address (VXLAN source).
    #[arg(long, env = "ISTHMUS_UNDERLAY_IP")]
    underlay_ip: std::net::IpAddr,
    /// Identity v3 URL.
    #[arg(long, env = "ISTHMUS_AUTH_URL", default_value = "http://127.0.0.1:5000/v3")]
    auth_url: String,
    /// Network API URL (unversioned); by default the one in the identity catalog.
    #[arg(long, env = "ISTHMUS_NETWORK_URL")]
    network_url: Option<String>,
    /// The node user's password (prefer --password-file or the environment variable).
    #[arg(
        long,
        env = "ISTHMUS_NODE_PASSWORD",
        hide_env_values = true,
        required_unless_present = "password_file"
    )]
    password: Option<String>,
    /// File holding the node user's password (not readable by other users).
    #[arg(long, env = "ISTHMUS_NODE_PASSWORD_FILE", conflicts_with = "password")]
    password_file: Option<PathBuf>,
    /// Project the node user is scoped to.
    #[arg(long, env = "ISTHMUS_NODE_PROJECT", default_value = "service")]
    project: String,
    /// Local attach socket.
    #[arg(long, env = "ISTHMUS_SOCKET", default_value = "/run/isthmus/agent.sock")]
    socket: PathBuf,
    /// Seconds between full syncs of the datapath (drift repair).
    #[arg(long, env = "ISTHMUS_RESYNC_SECS", default_value_t = 30)]
    resync_secs: u64,
    /// Seconds between heartbeats (the server's agent_down_secs, 60 by default, should be at
    /// least twice this).
    #[arg(long, env = "ISTHMUS_HEARTBEAT_SECS", default_value_t = 20)]
    heartbeat_secs: u64,
    /// Ready ports kept per network in use, so CNI ADD need not create one (0: no pools).
    #[arg(long, env = "ISTHMUS_POOL_SIZE", default_value_t = 3)]
    pool_size: usize,
    /// Seconds between sweeps for CNI leftovers (pool ports left plumbed, ports of failed ADDs).
    #[arg(long, env = "ISTHMUS_ORPHAN_SWEEP_SECS", default_value_t = 60)]
    orphan_sweep_secs: u64,
    /// A physical network and the host bridge it is on, `NAME=BRIDGE` (repeatable), e.g.
    /// `public=br-ext`: external (flat) networks on NAME reach the outside through BRIDGE.
    #[arg(long = "physical-network", env = "ISTHMUS_PHYSICAL_NETWORKS", value_delimiter = ',')]
    physical_networks: Vec<String>,
    /// This node may be chosen as routers' SNAT gateway (it needs the external networks'
    /// physical networks mapped).
    #[arg(long, env = "ISTHMUS_GATEWAY")]
    gateway: bool,
    /// CA bundle (PEM) that verifies the server's https certificate; by default the
    /// system's trusted roots.
    #[arg(long, env = "ISTHMUS_CA_FILE")]
    ca_file: Option<PathBuf>,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// The metrics endpoint: off unless asked for, and on loopback unless said otherwise.
#[derive(Args, Clone)]
struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default). With `up`, one
    /// endpoint serves the server's and the local agent's metrics.
    #[arg(long, env = "ISTHMUS_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Allow --metrics-listen on an address other than loopback.
    #[arg(long, env = "ISTHMUS_METRICS_PUBLIC")]
    metrics_public: bool,
}

impl MetricsArgs {
    /// Refuses a public address not explicitly allowed, before anything starts.
    fn check(&self) -> Result<()> {
        if let Some(a) = self.metrics_listen {
            isthmus_server::metrics::check_listen(a, self.metrics_public).map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    /// Serves `registry` if an address was given.
    async fn serve(
        &self,
        registry: isthmus_server::metrics::Registry,
    ) -> Result<Option<isthmus_server::metrics::MetricsHandle>> {
        let Some(addr) = self.metrics_listen else {
            return Ok(None);
        };
        let h = isthmus_server::metrics::listen(addr, std::sync::Arc::new(registry)).await?;
        Ok(Some(h))
    }
}

async fn stop_metrics(h: Option<isthmus_server::metrics::MetricsHandle>) {
    if let Some(h) = h {
        h.stop().await;
    }
}

async fn run_agent(a: AgentArgs) -> Result<()> {
    a.metrics.check()?;
    let password = match (&a.password, &a.password_file) {
        (_, Some(f)) => secrets::read_secret_file(f, "the node password")?,
        (Some(p), None) => p.clone(),
        (None, None) => bail!("give the node password with --password-file or ISTHMUS_NODE_PASSWORD"),
    };
    let mut c = isthmus_agent::runtime::AgentConfig::new(
        &a.node,
        a.network_url.as_deref().unwrap_or(""),
        &a.auth_url,
        &password,
        a.underlay_ip,
    );
    c.project = a.project;
    c.socket = a.socket;
    c.resync = std::time::Duration::from_secs(a.resync_secs.max(1));
    c.heartbeat = std::time::Duration::from_secs(a.heartbeat_secs.max(1));
    c.pool_size = a.pool_size.min(64);
    c.orphan_sweep = std::time::Duration::from_secs(a.orphan_sweep_secs.max(1));
    for m in &a.physical_networks {
        let (name, bridge) = m
            .split_once('=')
            .filter(|(n, b)| !n.is_empty() && isthmus_agent::kernel::valid_ifname(b))
            .ok_or_else(|| {
                anyhow::anyhow!("--physical-network {m:?}: expected NAME=BRIDGE with a valid bridge name")
            })?;
        c.physical_networks.insert(name.to_string(), bridge.to_string());
    }
    c.gateway = a.gateway;
    c.ca_file = a.ca_file;
    let mut registry = isthmus_server::metrics::Registry::default();
    c.metrics = isthmus_agent::metrics::AgentMetrics::new(&mut registry);
    // Installed before anything starts, so a SIGHUP never kills the agent. On SIGTERM the
    // agent stops its loops and removes its socket; the datapath stays, and workloads keep
    // their network until the next agent takes over.
    let mut signals = signals::Signals::new().context("installing signal handlers")?;
    let metrics = a.metrics.serve(registry).await?;
    let res = isthmus_agent::runtime::run(c, async move { signals.until_stop(|| {}).await }).await;
    stop_metrics(metrics).await;
    res
}

#[derive(Args, Clone)]
struct StoreArgs {
    /// Store backend: `embedded` (one node) or `etcd` (clusters, several servers).
    #[arg(long, env = "ISTHMUS_STORE", default_value = "embedded")]
    store: String,
    /// Data directory of the embedded store.
    #[arg(long, env = "ISTHMUS_DATA_DIR", default_value = "/var/lib/isthmus")]
    data_dir: PathBuf,
    /// etcd endpoints, comma-separated (for --store etcd).
    #[arg(
        long,
        env = "ISTHMUS_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,
    /// CA certificate (PEM) that signed etcd's server certificate; turns TLS on (endpoints
    /// without a scheme then use https).
    #[arg(long, env = "ISTHMUS_ETCD_CA_FILE")]
    etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication.
    #[arg(long, env = "ISTHMUS_ETCD_CERT_FILE", requires = "etcd_key_file")]
    etcd_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert-file.
    #[arg(long, env = "ISTHMUS_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    etcd_key_file: Option<PathBuf>,
    /// etcd user, when etcd has authentication enabled (with --etcd-password).
    #[arg(long, env = "ISTHMUS_ETCD_USER", requires = "etcd_password")]
    etcd_user: Option<String>,
    /// Password of --etcd-user (prefer the environment variable to the flag).
    #[arg(long, env = "ISTHMUS_ETCD_PASSWORD", hide_env_values = true, requires = "etcd_user")]
    etcd_password: Option<String>,
    /// Limit for one etcd call, seconds.
    #[arg(long, env = "ISTHMUS_ETCD_TIMEOUT", default_value_t = 10)]
    etcd_timeout: u64,
    /// Store revisions of history kept for watches; older history is compacted
    /// (default 10000, or the config file's store_compact_window).
    #[arg(long, env = "ISTHMUS_STORE_COMPACT_WINDOW")]
    store_compact_window: Option<i64>,
    /// How often the compactor runs, seconds (default 60, or the config file's
    /// store_compact_interval_secs).
    #[arg(long, env = "ISTHMUS_STORE_COMPACT_INTERVAL")]
    store_compact_interval: Option<u64>,
}

impl StoreArgs {
    fn embedded(data_dir: PathBuf) -> Self {
        StoreArgs {
            store: "embedded".into(),
            data_dir,
            etcd_endpoints: vec![],
            etcd_ca_file: None,
            etcd_cert_file: None,
            etcd_key_file: None,
            etcd_user: None,
            etcd_password: None,
            etcd_timeout: 10,
            store_compact_window: None,
            store_compact_interval: None,
        }
    }

    fn etcd_options(&self) -> isthmus_store::etcd::EtcdOptions {
        let tls =
            (self.etcd_ca_file.is_some() || self.etcd_cert_file.is_some()).then(|| isthmus_store::etcd::EtcdTls {
                ca_file: self.etcd_ca_file.clone(),
                cert_file: self.etcd_cert_file.clone(),
                key_file: self.etcd_key_file.clone(),
            });
        isthmus_store::etcd::EtcdOptions {
            request_timeout: std::time::Duration::from_secs(self.etcd_timeout.max(1)),
            tls,
            user: self.etcd_user.clone(),
            password: self.etcd_password.clone(),
            ..Default::default()
        }
    }

    /// Flags over the config file's compaction settings.
    fn apply(&self, config: &mut Config) {
        if let Some(w) = self.store_compact_window {
            config.store_compact_window = w;
        }
        if let Some(i) = self.store_compact_interval {
            config.store_compact_interval_secs = i;
        }
    }
}

#[derive(Args)]
struct ServerArgs {
    /// TOML configuration file; flags and environment override it.
    #[arg(long, short, env = "ISTHMUS_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArgs,
    /// Identity (Keystone v3) listen address.
    #[arg(long, env = "ISTHMUS_IDENTITY_LISTEN")]
    identity_listen: Option<std::net::SocketAddr>,
    /// Network (Neutron v2.0) listen address.
    #[arg(long, env = "ISTHMUS_NETWORK_LISTEN")]
    network_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    public: PublicUrls,
    /// Password of the bootstrap admin user (used only when it does not exist yet).
    #[arg(long, env = "ISTHMUS_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// Token lifetime, seconds.
    #[arg(long, env = "ISTHMUS_TOKEN_TTL")]
    token_ttl: Option<u64>,
    #[command(flatten)]
    quotas: QuotaArgs,
    #[command(flatten)]
    tls: tls::TlsArgs,
    #[command(flatten)]
    ops: OpsArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
}

/// Token keys and shutdown.
#[derive(Args)]
struct OpsArgs {
    /// Directory of token signing keys, shared by all servers (default: DATA_DIR/token-keys;
    /// created with a first key on the embedded store; see `isthmus keys rotate`).
    #[arg(long, env = "ISTHMUS_TOKEN_KEY_DIR")]
    token_key_dir: Option<PathBuf>,
    /// On SIGTERM, seconds requests in flight may take before the server exits anyway
    /// (default 30, or the config file's shutdown_drain_secs).
    #[arg(long, env = "ISTHMUS_SHUTDOWN_DRAIN_SECS")]
    shutdown_drain: Option<u64>,
}

/// Default quota limits other than Neutron's.
#[derive(Args)]
struct QuotaArgs {
    /// Default quota limit of a resource for projects without their own, RESOURCE=LIMIT
    /// (-1: unlimited; `all=-1` for every resource); repeatable. Neutron's defaults otherwise
    /// (network 100, subnet 100, port 500, router 10, floatingip 50, security_group 10,
    /// security_group_rule 100).
    #[arg(long = "quota-default", env = "ISTHMUS_QUOTA_DEFAULTS", value_delimiter = ',', value_parser = parse_quota_default)]
    quota_default: Vec<(String, i64)>,
}

fn parse_quota_default(s: &str) -> Result<(String, i64), String> {
    let (r, l) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}': expected RESOURCE=LIMIT, e.g. port=-1"))?;
    let l: i64 = l
        .trim()
        .parse()
        .map_err(|_| format!("'{s}': the limit must be an integer (-1: unlimited)"))?;
    Ok((r.trim().to_string(), l))
}

impl QuotaArgs {
    fn apply(&self, config: &mut Config) {
        for (r, l) in &self.quota_default {
            if r == "all" {
                for (name, _) in isthmus_server::config::NEUTRON_QUOTA_DEFAULTS {
                    config.quota_defaults.insert((*name).to_string(), *l);
                }
            } else {
                config.quota_defaults.insert(r.clone(), *l);
            }
        }
    }
}

/// The URLs the catalog advertises. Required with a wildcard listen address (0.0.0.0, ::),
/// which clients and agents cannot connect to.
#[derive(Args)]
struct PublicUrls {
    /// Identity URL clients and agents use, e.g. http://10.0.0.5:5000/v3 (`/v3` is added if
    /// missing). Default: derived from --identity-listen.
    #[arg(long, env = "ISTHMUS_IDENTITY_PUBLIC_URL")]
    identity_public_url: Option<String>,
    /// Network API URL clients and agents use, e.g. http://10.0.0.5:9696/. Default: derived
    /// from --network-listen.
    #[arg(long, env = "ISTHMUS_NETWORK_PUBLIC_URL")]
    network_public_url: Option<String>,
}

impl PublicUrls {
    fn apply(self, config: &mut Config) {
        if let Some(u) = self.identity_public_url {
            config.identity_public_url = Some(u);
        }
        if let Some(u) = self.network_public_url {
            config.network_public_url = Some(u);
        }
    }
}

#[derive(Args)]
struct UpArgs {
    /// Data directory: the embedded store, plus an `openrc` for the openstack CLI.
    #[arg(long, env = "ISTHMUS_DATA_DIR", default_value = "/var/lib/isthmus")]
    data_dir: PathBuf,
    /// Password of the bootstrap admin user; generated and kept in the data dir if not given.
    #[arg(long, env = "ISTHMUS_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    #[arg(long, env = "ISTHMUS_IDENTITY_LISTEN", default_value = "127.0.0.1:5000")]
    identity_listen: std::net::SocketAddr,
    #[arg(long, env = "ISTHMUS_NETWORK_LISTEN", default_value = "127.0.0.1:9696")]
    network_listen: std::net::SocketAddr,
    #[command(flatten)]
    public: PublicUrls,
    /// Do not run a node agent for this machine (by default, as root, `up` runs one).
    #[arg(long)]
    no_agent: bool,
    /// This machine's node name (its ports' binding:host_id).
    #[arg(long, env = "ISTHMUS_NODE", default_value = "local")]
    node: String,
    /// The agent's socket, for the CNI plugin and attach requests.
    #[arg(long, env = "ISTHMUS_SOCKET", default_value = "/run/isthmus/agent.sock")]
    socket: PathBuf,
    #[command(flatten)]
    quotas: QuotaArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    /// Serve HTTPS with a private CA and server certificate made once in the data dir
    /// (`ca.pem` is the openrc's OS_CACERT).
    #[arg(long, env = "ISTHMUS_UP_TLS")]
    tls: bool,
    /// Serve plain HTTP on a non-loopback address (passwords and tokens in clear).
    #[arg(long, env = "ISTHMUS_INSECURE_HTTP", conflicts_with = "tls")]
    insecure_http: bool,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ISTHMUS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: log files and journals get plain text.
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// The data directory holds the store (password hashes), the token keys and the admin's openrc:
/// made 0700, so no other local user can read them whatever the umask.
fn private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))
}

async fn open_store(args: &StoreArgs) -> Result<DynStore> {
    match args.store.as_str() {
        "embedded" => {
            private_dir(&args.data_dir)?;
            let dir = args.data_dir.join("store");
            let s = isthmus_store::embedded::EmbeddedStore::open(&dir)
                .with_context(|| format!("opening the embedded store in {}", dir.display()))?;
            Ok(s)
        }
        "etcd" => {
            let s = isthmus_store::etcd::EtcdStore::connect_with(args.etcd_endpoints.clone(), args.etcd_options())
                .await
                .with_context(|| format!("connecting to etcd at {}", args.etcd_endpoints.join(",")))?;
            Ok(s)
        }
        other => bail!("unknown store backend '{other}' (use 'embedded' or 'etcd')"),
    }
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    let Some(path) = path else { return Ok(Config::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
    let config: Config = toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
    if config.admin_password.is_some() {
        secrets::refuse_world_readable(path, "admin_password")?;
    }
    Ok(config)
}

async fn run_server(args: ServerArgs) -> Result<()> {
    let mut config = load_config(args.config.as_deref())?;
    if let Some(a) = args.identity_listen {
        config.identity_listen = a;
    }
    if let Some(a) = args.network_listen {
        config.network_listen = a;
    }
    if let Some(p) = args.admin_password {
        config.admin_password = Some(p);
    }
    if let Some(t) = args.token_ttl {
        config.token_ttl_secs = t;
    }
    args.public.apply(&mut config);
    args.store.apply(&mut config);
    args.quotas.apply(&mut config);
    args.tls.apply(&mut config);
    if let Some(d) = args.ops.token_key_dir {
        config.token_key_dir = Some(d);
    }
    if config.token_key_dir.is_none() {
        config.token_key_dir = Some(args.store.data_dir.join("token-keys"));
    }
    if let Some(d) = args.ops.shutdown_drain {
        config.shutdown_drain_secs = d;
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    if let Some(f) = &args.store.etcd_key_file {
        secrets::refuse_world_readable(f, "etcd's client private key")?;
    }
    if args.store.store != "embedded" {
        // Servers sharing a store must share keys: a server must not invent its own.
        if let Some(dir) = &config.token_key_dir {
            require_keys(dir)?;
        }
    }
    args.metrics.check()?;
    let mut signals = signals::Signals::new().context("installing signal handlers")?;
    let drain = std::time::Duration::from_secs(config.shutdown_drain_secs);
    let store = open_store(&args.store).await?;
    let compactor = isthmus_store::spawn_compactor(&store, config.compaction());
    let mut registry = isthmus_server::metrics::Registry::default();
    let server_metrics = isthmus_server::metrics::ServerMetrics::new(&mut registry);
    let handle = isthmus_server::start_with_metrics(config, store, server_metrics).await?;
    let metrics = args.metrics.serve(registry).await?;
    signals.until_stop(|| handle.reload()).await;
    tracing::info!(
        drain_secs = drain.as_secs(),
        "shutting down: finishing requests in flight"
    );
    stop_metrics(metrics).await;
    handle.stop_within(drain).await;
    compactor.abort();
    tracing::info!("stopped");
    Ok(())
}

/// A server on a shared store starts only with keys the other servers also have.
fn require_keys(dir: &Path) -> Result<()> {
    use isthmus_server::identity::keys::{load_dir, KeyDirError};
    match load_dir(dir) {
        Ok(r) if !r.is_empty() => Ok(()),
        Ok(_) => Err(KeyDirError::Empty {
            path: dir.to_path_buf(),
        }
        .into()),
        Err(KeyDirError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Err(KeyDirError::Empty {
                path: dir.to_path_buf(),
            }
            .into())
        }
        Err(e) => Err(e.into()),
    }
}

/// The admin password for `up`: given, or generated once and kept (0600) in the data dir.
fn up_password(data_dir: &Path, given: Option<String>) -> Result<String> {
    match given {
        Some(p) => Ok(p),
        None => secret_file(&data_dir.join("admin-password")),
    }
}

/// A secret kept in `file` (0600): read if present, else generated and written.
pub(crate) fn secret_file(file: &Path) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    if file.exists() {
        secrets::refuse_world_readable(file, "a password")?;
    }
    if let Ok(p) = std::fs::read_to_string(file) {
        let p = p.trim().to_string();
        if !p.is_empty() {
            return Ok(p);
        }
    }
    let p = uuid::Uuid::new_v4().simple().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("writing {}", file.display()))?;
    std::io::Write::write_all(&mut f, p.as_bytes())?;
    Ok(p)
}

async fn run_up(args: UpArgs) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut signals = signals::Signals::new().context("installing signal handlers")?;
    private_dir(&args.data_dir)?;
    let password = up_password(&args.data_dir, args.admin_password)?;
    let mut config = Config {
        identity_listen: args.identity_listen,
        network_listen: args.network_listen,
        admin_password: Some(password.clone()),
        // This machine's own agent heartbeats with 127.0.0.1.
        allow_loopback_underlay: true,
        insecure_http: args.insecure_http,
        token_key_dir: Some(args.data_dir.join("token-keys")),
        ..Config::default()
    };
    args.public.apply(&mut config);
    args.quotas.apply(&mut config);
    let ca_file = if args.tls {
        let hosts = tls::up_hosts(
            &[config.identity_listen, config.network_listen],
            &[
                config.identity_public_url.as_deref(),
                config.network_public_url.as_deref(),
            ],
        );
        let certs = tls::up_certs(&args.data_dir, &hosts).context("making the all-in-one certificates")?;
        config.tls_cert_file = Some(certs.cert);
        config.tls_key_file = Some(certs.key);
        Some(certs.ca)
    } else {
        None
    };
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    args.metrics.check()?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let run_agent = root && !args.no_agent;
    let store = open_store(&StoreArgs::embedded(args.data_dir.clone())).await?;
    let _compactor = isthmus_store::spawn_compactor(&store, config.compaction());
    // One registry, one endpoint: the server's metrics and the local agent's.
    let mut registry = isthmus_server::metrics::Registry::default();
    let server_metrics = isthmus_server::metrics::ServerMetrics::new(&mut registry);
    let agent_metrics = run_agent.then(|| isthmus_agent::metrics::AgentMetrics::new(&mut registry));
    let handle = isthmus_server::start_with_metrics(config, store, server_metrics).await?;
    let metrics = args.metrics.serve(registry).await?;
    let openrc = args.data_dir.join("openrc");
    let mut rc = format!(
        "export OS_AUTH_URL={}\nexport OS_IDENTITY_API_VERSION=3\nexport OS_USERNAME=admin\nexport OS_PASSWORD={}\nexport OS_PROJECT_NAME=admin\nexport OS_USER_DOMAIN_NAME=Default\nexport OS_PROJECT_DOMAIN_NAME=Default\nexport OS_REGION_NAME=RegionOne\n",
        handle.state.identity_url, password
    );
    if let Some(ca) = &ca_file {
        rc.push_str(&format!("export OS_CACERT={}\n", ca.display()));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&openrc)
        .with_context(|| format!("writing {}", openrc.display()))?;
    std::io::Write::write_all(&mut f, rc.as_bytes())?;
    println!(
        "Isthmus is up (all-in-one, embedded store in {}).",
        args.data_dir.display()
    );
    println!("  identity: {}", handle.state.identity_url);
    println!("  network:  {}", handle.state.network_url);
    if let Some(m) = &metrics {
        println!("  metrics:  http://{}/metrics", m.addr);
    }
    println!("Use it with the openstack CLI:");
    println!("  source {}", openrc.display());
    println!("  openstack network create demo");
    println!("  openstack subnet create --network demo --subnet-range 10.0.0.0/24 demo-subnet");
    println!("  openstack port create --network demo demo-port");
    println!("Or with this binary: isthmus network list (same environment). Ctrl-C stops it.");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let agent = if !run_agent {
        if !args.no_agent {
            println!("Not root: no node agent (workloads on this machine get no datapath).");
        }
        None
    } else {
        let pw = local_node::ensure_node_user(
            &handle.state.identity_url,
            ca_file.as_deref(),
            &password,
            &args.node,
            &args.data_dir,
        )
        .await
        .context("creating this machine's node user")?;
        let mut c = isthmus_agent::runtime::AgentConfig::new(
            &args.node,
            &handle.state.network_url,
            &handle.state.identity_url,
            &pw,
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        );
        c.socket = args.socket.clone();
        c.ca_file = ca_file.clone();
        if let Some(m) = agent_metrics {
            c.metrics = m;
        }
        println!("Node agent: node {:?}, socket {}.", args.node, args.socket.display());
        let mut rx = stop_rx.clone();
        Some(tokio::spawn(async move {
            let stopped = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = isthmus_agent::runtime::run(c, stopped).await {
                tracing::error!(error = %e, "node agent failed");
            }
        }))
    };
    signals.until_stop(|| handle.reload()).await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    if let Some(a) = agent {
        let _ = a.await;
    }
    stop_metrics(metrics).await;
    handle
        .stop_within(std::time::Duration::from_secs(Config::default().shutdown_drain_secs))
        .await;
    Ok(())
}

/// Raises the soft open-file limit to the hard one: every connection is a descriptor, and the
/// usual soft default (1024) would cap the server far below its connection limit.
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "reading the open-file limit");
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "raising the open-file limit");
            } else {
                tracing::debug!(from = old, to = lim.rlim_cur, "raised the open-file limit");
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let needs_logs = matches!(cli.cmd, Cmd::Server(_) | Cmd::Up(_) | Cmd::Agent(_));
    if needs_logs {
        init_logging();
        raise_nofile_limit();
    }
    let res = match cli.cmd {
        Cmd::Server(a) => run_server(*a).await,
        Cmd::Up(a) => run_up(a).await,
        Cmd::Network(c) => client::run("networks", c).await,
        Cmd::Subnet(c) => client::run("subnets", c).await,
        Cmd::Port(c) => client::run("ports", c).await,
        Cmd::Agent(a) => run_agent(a).await,
        Cmd::Keys(c) => keys::run(c),
    };
    if let Err(e) = res {
        eprintln!("isthmus: {e:#}");
        std::process::exit(1);
    }
}
