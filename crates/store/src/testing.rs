//! Helpers for tests (this crate's and others'): a throwaway etcd server and throwaway
//! embedded stores. They panic on setup failure, as test fixtures do.

use crate::embedded::{EmbeddedOptions, EmbeddedStore};
use crate::DynStore;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where Debian's `etcd-server` package puts the binary; `ISTHMUS_ETCD_BIN` overrides it.
pub const ETCD_BIN: &str = "/usr/bin/etcd";
const START_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 5;

/// A single-member etcd on loopback ports with its data in a temp dir. Dropping it kills the
/// process, reaps it and removes the data.
pub struct EtcdProcess {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    /// Plain-HTTP `/health` (and metrics) listener, probed when clients must use TLS.
    metrics_port: u16,
    tls: Option<EtcdTlsFiles>,
    bin: PathBuf,
    // Declared last: dropped after the process is gone.
    dir: tempfile::TempDir,
}

fn etcd_bin() -> PathBuf {
    std::env::var_os("ISTHMUS_ETCD_BIN").map_or_else(|| PathBuf::from(ETCD_BIN), PathBuf::from)
}

/// A port the kernel just handed out. Another process may grab it before etcd binds it; the
/// caller retries with fresh ports when etcd fails to start.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn healthy(port: u16) -> bool {
    let probe = || -> std::io::Result<String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    probe().is_ok_and(|body| body.contains("\"health\":\"true\""))
}

/// Certificates of a TLS test etcd (all PEM, made with the `openssl` command for one test).
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    /// The CA that signed the server's and the client's certificates.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate etcd accepts (it requires one).
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn make_certs(dir: &Path) -> Result<EtcdTlsFiles, String> {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("client.ext"),
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .map_err(|e| e.to_string())?;
    let rsa = "rsa:2048";
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            rsa,
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=isthmus-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )?;
    for who in ["server", "client"] {
        let (key, csr, crt, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.crt"),
            format!("{who}.ext"),
        );
        let subj = format!(
            "/CN={}",
            if who == "server" {
                "127.0.0.1"
            } else {
                "isthmus-test-client"
            }
        );
        openssl(
            dir,
            &[
                "req", "-newkey", rsa, "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subj,
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        )?;
    }
    Ok(EtcdTlsFiles {
        ca: dir.join("ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.crt"),
        client_key: dir.join("client.key"),
    })
}

impl EtcdProcess {
    /// Starts etcd and waits until it serves requests. Panics with the reason (including a
    /// missing binary) if it cannot.
    pub fn start() -> EtcdProcess {
        match Self::try_start_with(false) {
            Ok(p) => p,
            Err(e) => panic!("cannot start etcd for tests: {e}"),
        }
    }

    /// Like [`EtcdProcess::start`], but clients must use TLS with a client certificate (see
    /// [`EtcdProcess::tls_files`]; needs the `openssl` command).
    pub fn start_tls() -> EtcdProcess {
        match Self::try_start_with(true) {
            Ok(p) => p,
            Err(e) => panic!("cannot start etcd with TLS for tests: {e}"),
        }
    }

    /// This etcd's scratch directory (private, removed with it): where tests keep files that
    /// every server on this etcd shares, such as token keys.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The certificates, for an etcd started with [`EtcdProcess::start_tls`].
    pub fn tls_files(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref()
    }

    pub fn try_start() -> Result<EtcdProcess, String> {
        Self::try_start_with(false)
    }

    fn try_start_with(tls: bool) -> Result<EtcdProcess, String> {
        let bin = etcd_bin();
        if !bin.exists() {
            return Err(format!(
                "etcd binary not found at {} (install it: apt-get install -y etcd-server, or set \
                 ISTHMUS_ETCD_BIN)",
                bin.display()
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("isthmus-etcd-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let tls = if tls { Some(make_certs(dir.path())?) } else { None };
        let mut proc = EtcdProcess {
            child: None,
            client_port: 0,
            peer_port: 0,
            metrics_port: 0,
            tls,
            bin,
            dir,
        };
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let ports = free_port().and_then(|c| Ok((c, free_port()?, free_port()?)));
            let (client, peer, metrics) = ports.map_err(|e| format!("picking ports: {e}"))?;
            if client == peer || client == metrics || peer == metrics {
                continue;
            }
            proc.metrics_port = metrics;
            // A failed attempt may have bootstrapped a member with other peer URLs.
            let _ = std::fs::remove_dir_all(proc.dir.path().join("data"));
            proc.client_port = client;
            proc.peer_port = peer;
            match proc.launch() {
                Ok(()) => return Ok(proc),
                // Most likely a port taken in between; try others.
                Err(e) => last = e,
            }
        }
        Err(format!("etcd did not start after {START_ATTEMPTS} attempts: {last}"))
    }

    /// Spawns etcd on the current ports and data dir and waits for health.
    fn launch(&mut self) -> Result<(), String> {
        let data = self.dir.path().join("data");
        let log_path = self.dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).map_err(|e| format!("log file: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("log file: {e}"))?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.bin);
        cmd.arg(format!("--listen-metrics-urls=http://127.0.0.1:{}", self.metrics_port));
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cert-file={}", t.server_cert.display()))
                .arg(format!("--key-file={}", t.server_key.display()))
                .arg(format!("--trusted-ca-file={}", t.ca.display()))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .arg("--name=test")
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--quota-backend-bytes=1073741824")
            .arg("--logger=zap")
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if healthy(self.metrics_port) {
                return Ok(());
            }
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(status) = exited {
                self.child = None;
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let start = log.len().saturating_sub(2000);
                let start = (start..log.len()).find(|&i| log.is_char_boundary(i)).unwrap_or(start);
                return Err(format!("etcd exited ({status}): {}", log.get(start..).unwrap_or("")));
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!("etcd not healthy within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Client URL, e.g. `http://127.0.0.1:40123` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL) and reaps it; data stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills etcd and starts it again on the same ports and data (to test reconnects).
    pub fn restart(&mut self) {
        self.kill();
        // The ports were ours a moment ago; retry briefly in case the kernel lingers.
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            match self.launch() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("cannot restart etcd: {last}");
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP relay on loopback to another address (an etcd), which can cut every connection and
/// refuse new ones: breaks a client's streams while the server itself stays up.
pub struct TcpRelay {
    addr: std::net::SocketAddr,
    open: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpRelay {
    /// Relays to `target` (`host:port`, or a URL like `http://127.0.0.1:2379`).
    pub async fn start(target: &str) -> TcpRelay {
        use std::sync::atomic::Ordering;
        let target = target.trim_start_matches("http://").trim_end_matches('/').to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("relay bind: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("relay addr: {e}"));
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let o = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !o.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut cut_rx = cut_rx.clone();
                cut_rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        TcpRelay { addr, open, cut, task }
    }

    /// `http://127.0.0.1:P` of the relay.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts every relayed connection and refuses new ones until [`TcpRelay::reopen`].
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn reopen(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// An embedded store in a temp dir that lives as long as this value.
pub struct TempEmbedded {
    pub store: Arc<EmbeddedStore>,
    // Declared last: the store (and its writer) go first.
    pub dir: tempfile::TempDir,
}

impl TempEmbedded {
    pub fn new() -> TempEmbedded {
        Self::with_options(EmbeddedOptions::default())
    }

    pub fn with_options(opts: EmbeddedOptions) -> TempEmbedded {
        let dir = tempfile::Builder::new()
            .prefix("isthmus-store-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        let store = EmbeddedStore::open_with(dir.path(), opts).unwrap_or_else(|e| panic!("open embedded store: {e}"));
        TempEmbedded { store, dir }
    }

    pub fn dyn_store(&self) -> DynStore {
        self.store.clone()
    }
}

impl Default for TempEmbedded {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `f` against a fresh embedded store in a temp dir, removed afterwards.
pub async fn with_embedded_store<F, Fut, T>(f: F) -> T
where
    F: FnOnce(DynStore) -> Fut,
    Fut: Future<Output = T>,
{
    let tmp = TempEmbedded::new();
    f(tmp.dyn_store()).await
}

/// The `isthmus` executable for tests that run it as a process: `$ISTHMUS_BIN` if set, else
/// built by [`workspace_bin`].
pub fn isthmus_bin() -> PathBuf {
    workspace_bin("isthmus-cli", "isthmus", "ISTHMUS_BIN")
}

/// The `isthmus-cni` plugin executable: `$ISTHMUS_CNI_BIN` if set, else built.
pub fn cni_bin() -> PathBuf {
    workspace_bin("isthmus-cni", "isthmus-cni", "ISTHMUS_CNI_BIN")
}

/// A workspace executable: `$env` if set, else `cargo build -p package --bin bin` in the
/// caller's profile (a no-op when up to date; follows `CARGO_TARGET_DIR`) and the executable
/// cargo reports.
pub fn workspace_bin(package: &str, bin: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} does not exist", p.display());
        return p;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&workspace)
        .args([
            "build",
            "-p",
            package,
            "--bin",
            bin,
            "--message-format=json-render-diagnostics",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    // What cargo set for this test binary must not reach the inner cargo: build scripts that
    // watch those variables (ring's watches CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...) would
    // otherwise rebuild, with everything above them, on every switch between the two.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let from_cargo = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_EXE_"]
            .iter()
            .any(|p| key.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&key.as_ref());
        if from_cargo {
            cmd.env_remove(key.as_ref());
        }
    }
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cargo:?} build -p {package}: {e} (or set {env})"));
    assert!(
        out.status.success(),
        "cargo build -p {package} failed ({}); set {env} to test a prebuilt binary",
        out.status
    );
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == bin)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo reported no {bin} executable"));
    assert!(exe.is_file(), "{} missing after the build", exe.display());
    exe
}
