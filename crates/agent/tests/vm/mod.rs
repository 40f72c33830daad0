//! The test VM: QEMU (`-accel tcg`) booting Debian's kernel with the busybox initramfs that
//! `scripts/vm-image.sh` builds, its NIC on a port's tap in a node namespace, with the port's
//! MAC, its serial console in a file. The guest runs udhcpc, prints what it got between
//! `ISTHMUS-STATE-BEGIN`/`-END`, runs the given command, and powers off.
//!
//! With [`Options::management`] the guest also has a second NIC (eth1, 10.0.2.15/24) on QEMU's
//! user network: 10.0.2.2:P there is 127.0.0.1:P of the node namespace QEMU runs in, where a
//! [`Forwarder`] passes connections on to the server in the root namespace.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Kernel and initramfs, built once per test process.
fn image() -> &'static (PathBuf, PathBuf) {
    static IMAGE: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = root.join("target/vm");
        let mut script = Command::new("bash");
        // The guest's isthmus-cni: $ISTHMUS_GUEST_CNI, else the release build; when there is
        // none yet, the one this test profile builds.
        if std::env::var_os("ISTHMUS_GUEST_CNI").is_none() && !root.join("target/release/isthmus-cni").is_file() {
            script.env("ISTHMUS_GUEST_CNI", isthmus_store::testing::cni_bin());
        }
        let st = script
            .arg(root.join("scripts/vm-image.sh"))
            .arg(&out)
            .stdin(Stdio::null())
            .status()
            .expect("running scripts/vm-image.sh");
        assert!(st.success(), "scripts/vm-image.sh failed");
        (out.join("vmlinuz"), out.join("initramfs.gz"))
    })
}

/// How to start a VM beyond its port's NIC.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A second NIC on QEMU's user network (the guest's eth1, 10.0.2.15/24, host 10.0.2.2).
    pub management: bool,
}

pub struct Vm {
    child: Option<Child>,
    pub console: PathBuf,
    pub started: Instant,
    _dir: tempfile::TempDir,
}

impl Vm {
    /// Boots a VM in node namespace `node_ns` on tap `tap` with MAC `mac`, running `cmd` (a
    /// shell command line) after DHCP; `dhcp_tries` DISCOVERs, one a second.
    pub fn start(node_ns: &str, tap: &str, mac: &str, cmd: &str, dhcp_tries: u32) -> Vm {
        Vm::start_with(node_ns, tap, mac, cmd, dhcp_tries, &Options::default())
    }

    /// [`Vm::start`] with [`Options`].
    pub fn start_with(node_ns: &str, tap: &str, mac: &str, cmd: &str, dhcp_tries: u32, opts: &Options) -> Vm {
        let (kernel, initrd) = image();
        // After the port's NIC, so that one stays eth0.
        let management: Vec<&str> = if opts.management {
            vec![
                "-netdev",
                "user,id=m0,net=10.0.2.0/24,host=10.0.2.2",
                "-device",
                "virtio-net-pci,netdev=m0,mac=52:54:00:0a:00:0f",
            ]
        } else {
            vec![]
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let console = dir.path().join("console.log");
        // Long commands go gzipped: the kernel command line holds 2 KiB.
        let arg = if cmd.len() > 1200 {
            format!("isthmus.cmdz={}", base64_encode(&gzip(cmd.as_bytes())))
        } else {
            format!("isthmus.cmd={}", base64_encode(cmd.as_bytes()))
        };
        assert!(
            arg.len() < 1900,
            "guest command too long for the kernel command line ({} bytes)",
            arg.len()
        );
        let append = format!("console=ttyS0 quiet panic=-1 isthmus.tries={dhcp_tries} {arg}");
        let started = Instant::now();
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                node_ns,
                "qemu-system-x86_64",
                "-accel",
                "tcg",
                "-m",
                "192",
            ])
            .args(["-nographic", "-no-reboot", "-display", "none", "-monitor", "none"])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append])
            .args(["-netdev", &format!("tap,id=n0,ifname={tap},script=no,downscript=no")])
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")])
            .args(&management)
            .args(["-serial", &format!("file:{}", console.display())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning qemu-system-x86_64 (is qemu-system-x86 installed?)");
        Vm {
            child: Some(child),
            console,
            started,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the console shows `needle`; returns the time since start. Panics with the
    /// console on timeout.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return self.started.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "VM console never showed {needle:?} within {timeout:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the guest's command printed (between `ISTHMUS-CMD-BEGIN` and `-END`).
    pub fn cmd_output(&self) -> String {
        let log = self.log();
        let start = log
            .find("ISTHMUS-CMD-BEGIN")
            .map_or(0, |i| i + "ISTHMUS-CMD-BEGIN".len());
        let end = log.find("ISTHMUS-CMD-END").unwrap_or(log.len());
        log.get(start..end).unwrap_or("").to_string()
    }

    /// What the guest reported after DHCP (between the state markers).
    pub fn state(&self) -> String {
        let log = self.log();
        let start = log.find("ISTHMUS-STATE-BEGIN").map(|i| i + "ISTHMUS-STATE-BEGIN".len());
        let end = log.find("ISTHMUS-STATE-END");
        match (start, end) {
            (Some(s), Some(e)) if s <= e => log[s..e].to_string(),
            _ => String::new(),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TCP listener on 127.0.0.1 inside a node namespace whose connections are passed on to
/// `target` (reached from the test's own namespace): the guest's way to the server.
pub struct Forwarder {
    /// The listening port, the same inside the guest (10.0.2.2:port).
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    pub fn start(node_ns: &Path, target: SocketAddr) -> Forwarder {
        let ns = std::fs::File::open(node_ns).unwrap_or_else(|e| panic!("{}: {e}", node_ns.display()));
        // The socket belongs to the namespace it was made in; only that thread moves.
        let listener = std::thread::spawn(move || {
            // SAFETY: setns on an fd we own; affects this thread only.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind in the node namespace")
        })
        .join()
        .expect("listener thread");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("local addr").port();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Forwarder { port, task }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .arg("-9c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip");
    child.stdin.take().expect("stdin").write_all(data).expect("gzip stdin");
    let out = child.wait_with_output().expect("gzip");
    assert!(out.status.success(), "gzip failed");
    out.stdout
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
