//! The processes a benchmark runs against: a real `isthmus server` child (and, for the etcd
//! backend, a throwaway etcd), each killed when its value is dropped — on success, on error, and
//! when `main` drops the benchmark future after a signal.

use anyhow::{anyhow, bail, Context, Result};
use isthmus_store::testing::EtcdProcess;
use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const START_ATTEMPTS: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Embedded,
    Etcd,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Embedded => "embedded",
            Backend::Etcd => "etcd",
        })
    }
}

/// How to start the server.
pub struct ServerOptions<'a> {
    pub bin: &'a Path,
    pub admin_password: &'a str,
    /// `ISTHMUS_LOG` for the server.
    pub log_filter: &'a str,
    /// Parent of the temp data dir (None: the system temp dir).
    pub tmp_dir: Option<&'a Path>,
    /// Serve HTTPS with a CA and certificate made for the run.
    pub tls: bool,
}

/// The server plus whatever store process it needs. Fields drop in order: the server goes
/// before etcd.
pub struct Deployment {
    pub server: ServerProcess,
    pub etcd: Option<EtcdProcess>,
    pub backend: Backend,
}

impl Deployment {
    pub async fn start(backend: Backend, opts: &ServerOptions<'_>) -> Result<Deployment> {
        let etcd = match backend {
            Backend::Embedded => None,
            // Blocks this (main) thread for the second or two etcd takes to get healthy.
            Backend::Etcd => Some(EtcdProcess::try_start().map_err(|e| anyhow!("starting etcd: {e}"))?),
        };
        let endpoint = etcd.as_ref().map(EtcdProcess::endpoint);
        let server = ServerProcess::start(opts, endpoint.as_deref()).await?;
        Ok(Deployment { server, etcd, backend })
    }

    /// The etcd process id, found by its unique client URL (EtcdProcess does not expose it).
    pub fn etcd_pid(&self) -> Option<u32> {
        let endpoint = self.etcd.as_ref()?.endpoint();
        find_pid_with_arg(&format!("--listen-client-urls={endpoint}"))
    }
}

/// A running `isthmus server` on loopback ports with a fresh data dir.
pub struct ServerProcess {
    child: Option<Child>,
    pub identity: SocketAddr,
    pub network: SocketAddr,
    log_path: PathBuf,
    /// With HTTPS: the CA, server certificate and key (in `dir`).
    tls: Option<crate::tls::TlsFiles>,
    // Declared last: removed after the process is gone.
    dir: tempfile::TempDir,
}

impl ServerProcess {
    async fn start(opts: &ServerOptions<'_>, etcd_endpoint: Option<&str>) -> Result<ServerProcess> {
        if !opts.bin.is_file() {
            bail!(
                "server binary {} not found (build it: cargo build --release -p isthmus-cli, or pass --isthmus-bin)",
                opts.bin.display()
            );
        }
        let mut builder = tempfile::Builder::new();
        builder.prefix("isthmus-bench-");
        let dir = match opts.tmp_dir {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .context("creating the server's temp dir")?;
        let log_path = dir.path().join("server.log");
        let tls = if opts.tls {
            Some(crate::tls::TlsFiles::make(dir.path())?)
        } else {
            None
        };
        let mut proc = ServerProcess {
            child: None,
            identity: SocketAddr::from(([127, 0, 0, 1], 0)),
            network: SocketAddr::from(([127, 0, 0, 1], 0)),
            log_path,
            tls,
            dir,
        };
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            let (id_port, net_port) = (free_port()?, free_port()?);
            if id_port == net_port {
                continue;
            }
            proc.identity.set_port(id_port);
            proc.network.set_port(net_port);
            proc.spawn(opts, etcd_endpoint)?;
            match proc.wait_ready().await {
                Ok(()) => return Ok(proc),
                Err(e) => {
                    proc.kill();
                    // Another process may have taken a port between our probe and the bind.
                    let log = proc.log_tail();
                    if !log.contains("binding") {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no free ports")))
            .with_context(|| format!("server did not start after {START_ATTEMPTS} attempts"))
    }

    fn spawn(&mut self, opts: &ServerOptions<'_>, etcd_endpoint: Option<&str>) -> Result<()> {
        let log =
            std::fs::File::create(&self.log_path).with_context(|| format!("creating {}", self.log_path.display()))?;
        let log_err = log.try_clone().context("server log file")?;
        let data = self.dir.path().join("data");
        let mut cmd = Command::new(opts.bin);
        cmd.arg("server")
            .arg("--store")
            .arg(if etcd_endpoint.is_some() { "etcd" } else { "embedded" })
            .arg("--data-dir")
            .arg(&data)
            .arg("--identity-listen")
            .arg(self.identity.to_string())
            .arg("--network-listen")
            .arg(self.network.to_string())
            .arg("--admin-password")
            .arg(opts.admin_password)
            // Benchmarks make far more objects in one project than Neutron's default quotas.
            .arg("--quota-default")
            .arg("all=-1")
            .env("ISTHMUS_LOG", opts.log_filter)
            .env_remove("ISTHMUS_CONFIG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(ep) = etcd_endpoint {
            cmd.arg("--etcd-endpoints").arg(ep);
        }
        if let Some(t) = &self.tls {
            cmd.arg("--tls-cert").arg(&t.cert).arg("--tls-key").arg(&t.key);
        }
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (prctl, getppid). The kernel then kills the server if this
        // process dies without running its destructors (e.g. SIGKILL).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("parent exited"));
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", opts.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until both listeners answer, or fails with the server's log if it exits.
    async fn wait_ready(&mut self) -> Result<()> {
        let http = isthmus_client::with_ca(reqwest::Client::builder(), self.ca())
            .map_err(|e| anyhow!("{e}"))?
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .context("building the readiness client")?;
        let urls = [self.identity_url(), format!("{}/", self.network_url())];
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut ready = true;
            for u in &urls {
                let ok = matches!(http.get(u).send().await, Ok(r) if r.status().is_success());
                ready &= ok;
                if !ok {
                    break;
                }
            }
            if ready {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().context("waiting for the server")? {
                    self.child = None;
                    bail!(
                        "server exited ({status}) before it was ready; log:\n{}",
                        self.log_tail()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("server not ready within {READY_TIMEOUT:?}; log:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The CA that signed the server's certificate, when it serves HTTPS.
    pub fn ca(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca.as_path())
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// `http(s)://<identity>/v3`.
    pub fn identity_url(&self) -> String {
        format!("{}://{}/v3", self.scheme(), self.identity)
    }

    /// `http(s)://<network>` (no trailing slash).
    pub fn network_url(&self) -> String {
        format!("{}://{}", self.scheme(), self.network)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last couple of KB of the server's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let start = log.len().saturating_sub(3000);
        let start = (start..log.len()).find(|&i| log.is_char_boundary(i)).unwrap_or(start);
        log.get(start..).unwrap_or("").to_string()
    }

    /// Kills (SIGKILL) and reaps the server; its data is thrown away anyway.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("picking a free port")?
        .port())
}

/// User + system CPU time a process has used so far, from /proc.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    Some(Duration::from_secs_f64((utime + stime) as f64 / ticks as f64))
}

/// CPU time of this (benchmark client) process.
pub fn own_cpu_time() -> Option<Duration> {
    cpu_time(std::process::id())
}

fn find_pid_with_arg(arg: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes()).then_some(pid)
    })
}
