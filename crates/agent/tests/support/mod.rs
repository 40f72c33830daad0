//! Helpers shared by the root tests: commands with deadlines, uniquely named network namespaces
//! deleted on drop, work inside a namespace on a dedicated thread, and a UDP echo probe.
#![allow(dead_code)]

pub mod bench;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const CMD_TIMEOUT: Duration = Duration::from_secs(10);

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the netns tests need root (they create network namespaces); run `cargo test` as root"
    );
}

/// Runs a command with a deadline; returns (success, stdout, stderr).
pub fn run(args: &[&str]) -> (bool, String, String) {
    let mut child = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > CMD_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{args:?} timed out");
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for {args:?}: {e}"),
        }
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd` with `input` on its stdin, its stdout and stderr captured.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let what = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .unwrap_or_else(|e| panic!("writing to {what}: {e}"));
    child.wait_with_output().unwrap_or_else(|e| panic!("{what}: {e}"))
}

pub fn must(args: &[&str]) -> String {
    let (ok, out, err) = run(args);
    assert!(ok, "{args:?} failed: {err}");
    out
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A number unique within this test process (for names).
pub fn unique() -> usize {
    NEXT.fetch_add(1, Ordering::SeqCst)
}

/// A network namespace that is deleted when dropped.
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new() -> Ns {
        let name = format!("ist-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        must(&["ip", "netns", "add", &name]);
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        must(&full)
    }

    /// Runs one `nft` command (or script) in the namespace; its output.
    pub fn nft(&self, script: &str) -> String {
        must(&["ip", "netns", "exec", &self.name, "nft", script])
    }

    pub fn try_ip(&self, args: &[&str]) -> bool {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full).0
    }

    /// `ip -o link show dev` output, if the device exists.
    pub fn link(&self, dev: &str) -> Option<String> {
        let (ok, out, _) = run(&["ip", "-n", &self.name, "-d", "-o", "link", "show", "dev", dev]);
        ok.then_some(out)
    }

    pub fn mtu(&self, dev: &str) -> u32 {
        let line = self
            .link(dev)
            .unwrap_or_else(|| panic!("{dev} missing in {}", self.name));
        let mut words = line.split_whitespace();
        words
            .by_ref()
            .find(|w| *w == "mtu")
            .and_then(|_| words.next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("no mtu in {line}"))
    }

    pub fn ifindex(&self, dev: &str) -> u32 {
        let line = self
            .link(dev)
            .unwrap_or_else(|| panic!("{dev} missing in {}", self.name));
        line.split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .unwrap_or_else(|| panic!("no index in {line}"))
    }

    pub fn fdb(&self, dev: &str) -> String {
        must(&["bridge", "-n", &self.name, "fdb", "show", "dev", dev])
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        // Deleting the namespace deletes every device in it, and veth peers elsewhere.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `f` on a thread inside `ns` (the test's own threads never change namespace).
pub fn in_ns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(ns).unwrap_or_else(|e| panic!("{}: {e}", ns.display()));
    std::thread::spawn(move || {
        // SAFETY: setns on an fd we own; affects this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|_| panic!("thread in {} panicked", ns.display()))
}

pub fn udp_in(ns: &Ns, addr: SocketAddr) -> UdpSocket {
    in_ns(&ns.path(), move || {
        UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
    })
}

/// Sends UDP datagrams of `len` bytes (with DF) from `from` in `src` to an echo server at `to`
/// in `dst`; true if an echo came back. Also returns how many datagrams the server saw, so a
/// negative result can be checked to have leaked nothing one-way either.
pub fn echo(src: &Ns, from: &str, dst: &Ns, to: &str, len: usize) -> (bool, usize) {
    let server = udp_in(dst, SocketAddr::new(to.parse().unwrap(), 0));
    let server_addr = server.local_addr().unwrap();
    let client = udp_in(src, SocketAddr::new(from.parse().unwrap(), 0));
    let pmtu_do: libc::c_int = libc::IP_PMTUDISC_DO;
    // SAFETY: setsockopt with a pointer to a live c_int of the right size.
    let rc = unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            &pmtu_do as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let deadline = Instant::now() + Duration::from_millis(1800);
    server.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    // Set once the client has its echo: the server need not wait out the window then.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let srv_done = done.clone();
    let srv = std::thread::spawn(move || {
        let mut seen = 0;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline && !srv_done.load(Ordering::SeqCst) {
            if let Ok((n, peer)) = server.recv_from(&mut buf) {
                seen += 1;
                let _ = server.send_to(&buf[..n], peer);
            }
        }
        seen
    });
    client.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let mut got = false;
    let mut buf = vec![0u8; 65536];
    for _ in 0..5 {
        if let Err(e) = client.send_to(&payload, server_addr) {
            panic!("send of {len} bytes from {from}: {e}");
        }
        if let Ok(n) = client.recv(&mut buf) {
            if buf[..n] == payload[..] {
                got = true;
                break;
            }
        }
    }
    if got {
        done.store(true, Ordering::SeqCst);
    }
    let seen = srv.join().unwrap();
    (got, seen)
}

pub fn reaches(src: &Ns, from: &str, dst: &Ns, to: &str) -> bool {
    echo(src, from, dst, to, 64).0
}

/// A steady stream of UDP echoes (one every `every`) from `from` in `src` to `to` in `dst`;
/// [`UdpStream::finish`] says how many were sent and how many came back.
pub struct UdpStream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop_server: std::sync::Arc<std::sync::atomic::AtomicBool>,
    client: Option<std::thread::JoinHandle<(u64, u64)>>,
    server: Option<std::thread::JoinHandle<()>>,
}

impl UdpStream {
    pub fn start(src: &Ns, from: &str, dst: &Ns, to: &str, every: Duration) -> UdpStream {
        use std::sync::atomic::AtomicBool;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let server = udp_in(dst, SocketAddr::new(to.parse().unwrap(), 0));
        let server_addr = server.local_addr().unwrap();
        server.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let stop_server = std::sync::Arc::new(AtomicBool::new(false));
        let s_stop = stop_server.clone();
        let server = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s_stop.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], peer);
                }
            }
        });
        let client = udp_in(src, SocketAddr::new(from.parse().unwrap(), 0));
        client.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let c_stop = stop.clone();
        let client = std::thread::spawn(move || {
            let mut got = std::collections::BTreeSet::new();
            let mut sent = 0u64;
            let mut buf = [0u8; 64];
            let mut recv_until = |until: Instant, got: &mut std::collections::BTreeSet<u64>| {
                while Instant::now() < until {
                    if let Ok(n) = client.recv(&mut buf) {
                        if n == 8 {
                            got.insert(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                        }
                    }
                }
            };
            while !c_stop.load(Ordering::SeqCst) {
                let _ = client.send_to(&sent.to_be_bytes(), server_addr);
                sent += 1;
                recv_until(Instant::now() + every, &mut got);
            }
            // Late echoes of the last datagrams.
            recv_until(Instant::now() + Duration::from_millis(500), &mut got);
            (sent, got.len() as u64)
        });
        UdpStream {
            stop,
            stop_server,
            client: Some(client),
            server: Some(server),
        }
    }

    /// Stops the stream: (sent, echoed).
    pub fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        let res = self
            .client
            .take()
            .map(|c| c.join().expect("client thread"))
            .unwrap_or((0, 0));
        self.stop_server.store(true, Ordering::SeqCst);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        res
    }
}

impl Drop for UdpStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.stop_server.store(true, Ordering::SeqCst);
    }
}

/// A TCP connection from `from` in `src` to `to:port` in `dst` (a listener there) completes
/// within a second.
pub fn tcp_ok(src: &Ns, from: &str, dst: &Ns, to: &str, port: u16) -> bool {
    let addr = SocketAddr::new(to.parse().expect("address"), port);
    let listener = in_ns(&dst.path(), move || std::net::TcpListener::bind(addr).expect("bind"));
    let from: std::net::IpAddr = from.parse().expect("address");
    in_ns(&src.path(), move || {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        sock.bind(&SocketAddr::new(from, 0).into()).expect("bind source");
        let ok = sock.connect_timeout(&addr.into(), Duration::from_millis(1000)).is_ok();
        drop(listener);
        ok
    })
}

/// Polls `f` (a blocking packet check) until it answers `want`, for up to `secs`.
pub async fn until(secs: u64, what: &str, want: bool, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f() == want {
            return;
        }
        assert!(Instant::now() < deadline, "timed out: {what} (wanted {want})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
