//! Work in other network namespaces without ever moving a tokio worker.
//!
//! `setns` changes the namespace of the calling thread only. A tokio worker that did so would
//! run every later task in that namespace, so namespace switches happen only on a dedicated,
//! short-lived OS thread that exits when its work is done. Netlink sockets stay bound to the
//! namespace they were created in, so such a thread only needs to create the socket; all the
//! netlink traffic then runs on the caller's runtime from whatever thread.

use super::KernelError;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, TokioSocket};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};

/// Runs `f` on a fresh OS thread that first enters the network namespace at `netns` (when
/// given), and waits for it without blocking the runtime.
pub async fn run_in_netns<T, F>(netns: Option<&Path>, f: F) -> Result<T, KernelError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, KernelError> + Send + 'static,
{
    let ns = match netns {
        Some(p) => Some(open_netns(p)?),
        None => None,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("isthmus-netns".into())
        .spawn(move || {
            let res = match &ns {
                Some((path, file)) => enter(path, file).and_then(|()| f()),
                None => f(),
            };
            // The receiver may have given up; nothing to do then.
            let _ = tx.send(res);
        })
        .map_err(|e| KernelError::io("spawning a netns worker thread", e))?;
    rx.await
        .map_err(|_| KernelError::io("netns worker thread", std::io::Error::other("it panicked")))?
}

fn open_netns(path: &Path) -> Result<(PathBuf, File), KernelError> {
    Ok((path.to_path_buf(), open_netns_file(path)?))
}

/// nsfs's `statfs` magic (linux/magic.h).
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `NS_GET_NSTYPE`, `_IO(0xb7, 0x3)` (linux/nsfs.h).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Opens a network namespace file without ever blocking (a FIFO or device at that path must
/// not hang the caller) and checks that it is one: a regular file on nsfs whose namespace
/// type is `CLONE_NEWNET`. Anything else is an `InvalidInput` error; a missing path keeps its
/// `NotFound`.
pub fn open_netns_file(path: &Path) -> Result<File, KernelError> {
    use std::os::unix::fs::OpenOptionsExt;
    let ctx = || format!("opening netns {}", path.display());
    let not_netns = |why: &str| {
        KernelError::io(
            ctx(),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("not a network namespace ({why})"),
            ),
        )
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| KernelError::io(ctx(), e))?;
    let meta = file.metadata().map_err(|e| KernelError::io(ctx(), e))?;
    if !meta.file_type().is_file() {
        return Err(not_netns("not a regular file"));
    }
    // SAFETY: zeroed statfs is valid; fstatfs fills it for an fd we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(KernelError::io(ctx(), std::io::Error::last_os_error()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    if st.f_type as i64 != NSFS_MAGIC {
        return Err(not_netns("not on nsfs"));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(not_netns("another kind of namespace"));
    }
    Ok(file)
}

fn enter(path: &Path, ns: &File) -> Result<(), KernelError> {
    // SAFETY: plain syscall on an fd we own; it only changes this (dedicated) thread.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(KernelError::io(
            format!("entering netns {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// A route-netlink socket in `netns` (the caller's own namespace when `None`), ready for the
/// current tokio runtime.
pub async fn route_socket(netns: Option<&Path>) -> Result<TokioSocket, KernelError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(KernelError::io(
            "netlink socket",
            std::io::Error::other("must be created inside a tokio runtime"),
        ));
    }
    let sock = match netns {
        None => Socket::new(NETLINK_ROUTE).map_err(|e| KernelError::io("opening netlink socket", e))?,
        Some(_) => {
            run_in_netns(netns, || {
                Socket::new(NETLINK_ROUTE).map_err(|e| KernelError::io("opening netlink socket", e))
            })
            .await?
        }
    };
    // Fail here with an error rather than inside `from_raw_fd`, which unwraps.
    sock.set_non_blocking(true)
        .map_err(|e| KernelError::io("netlink socket non-blocking", e))?;
    // SAFETY: the fd comes from a socket we own and is handed over exactly once.
    Ok(unsafe { TokioSocket::from_raw_fd(sock.into_raw_fd()) })
}

/// A netlink handle on a socket in `netns`. Its connection task ends once the handle and all
/// its clones are dropped.
pub async fn route_handle(netns: Option<&Path>) -> Result<rtnetlink::Handle, KernelError> {
    let sock = route_socket(netns).await?;
    let (conn, handle, _unsolicited) = rtnetlink::from_socket(sock);
    tokio::spawn(conn);
    Ok(handle)
}

// linux/if_tun.h
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` with the flags member of its union; 40 bytes like the kernel's.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates (or re-opens) a persistent TAP device named `name` in the calling thread's netns,
/// like `ip tuntap add mode tap`. Blocking; run it through [`run_in_netns`].
pub fn create_persistent_tap(name: &str) -> Result<(), KernelError> {
    let tun = open_tap(name)?;
    // SAFETY: TUNSETPERSIST takes an integer argument.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) };
    if rc != 0 {
        return Err(KernelError::io(
            format!("creating tap {name}: TUNSETPERSIST"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Opens (creating it if absent) TAP device `name` in the calling thread's netns and attaches
/// to it as its guest side, as a hypervisor does: frames written to the file enter the node as
/// if the guest sent them. Blocking.
pub fn open_tap(name: &str) -> Result<File, KernelError> {
    super::check_ifname(name)?;
    let ctx = |what: &str| format!("opening tap {name}: {what}");
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| KernelError::io(ctx("/dev/net/tun"), e))?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    // check_ifname guarantees at most 15 bytes, leaving the terminating NUL.
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req` lays out exactly.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReqFlags) };
    if rc != 0 {
        return Err(KernelError::io(ctx("TUNSETIFF"), std::io::Error::last_os_error()));
    }
    Ok(tun)
}

/// A raw packet socket bound to interface `dev`, receiving only IPv4 UDP to port 67 (a classic
/// BPF filter in the kernel, so the guest's other traffic never reaches userspace). Created in
/// the calling thread's namespace. Returns the socket (non-blocking) and the interface index.
pub fn dhcp_packet_socket(dev: &str) -> Result<(std::os::fd::OwnedFd, u32), KernelError> {
    use std::os::fd::OwnedFd;
    let err = |what: &str| KernelError::io(format!("{what} for {dev}"), std::io::Error::last_os_error());
    let cname =
        std::ffi::CString::new(dev).map_err(|_| KernelError::io("interface name", std::io::Error::other("NUL")))?;
    // SAFETY: plain syscalls with valid arguments; results are checked.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(err("if_nametoindex"));
    }
    // ETH_P_ALL, not ETH_P_IP: the tap is a bridge port, and the bridge consumes its frames
    // before protocol-specific sockets would see them; "all" sockets see them first. The
    // filter below does the selecting.
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // Protocol 0 first: the socket receives nothing until bound, so no frame of another
    // interface is queued before the filter and the binding are in place.
    // SAFETY: as above.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(err("socket(AF_PACKET)"));
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // IPv4, UDP, not a fragment, destination port 67 (tcpdump's `udp dst port 67`, IPv4 part),
    // or IPv6 with UDP as its first next header to port 547 (DHCPv6).
    let mut code: Vec<libc::sock_filter> = vec![
        bpf(0x28, 0, 0, 12),          // 0: ldh [12]
        bpf(0x15, 0, 7, 0x0800),      // 1: jeq IPv4, else 9
        bpf(0x30, 0, 0, 23),          // 2: ldb [23]
        bpf(0x15, 0, 11, 17),         // 3: jeq UDP, else drop
        bpf(0x28, 0, 0, 20),          // 4: ldh [20]
        bpf(0x45, 9, 0, 0x1fff),      // 5: jset fragment offset → drop
        bpf(0xb1, 0, 0, 14),          // 6: ldxb 4*([14]&0xf)
        bpf(0x48, 0, 0, 16),          // 7: ldh [x+16]
        bpf(0x15, 5, 6, 67),          // 8: jeq 67 → accept, else drop
        bpf(0x15, 0, 5, 0x86dd),      // 9: jeq IPv6, else drop
        bpf(0x30, 0, 0, 20),          // 10: ldb [20] (next header)
        bpf(0x15, 0, 3, 17),          // 11: jeq UDP, else drop
        bpf(0x28, 0, 0, 56),          // 12: ldh [56] (UDP destination port)
        bpf(0x15, 0, 1, 547),         // 13: jeq 547 → accept, else drop
        bpf(0x06, 0, 0, 0x0004_0000), // 14: accept
    ];
    code.push(bpf(0x06, 0, 0, 0)); // 15: drop
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: prog points at `code`, alive across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &prog as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as u32,
        )
    };
    if rc != 0 {
        return Err(err("SO_ATTACH_FILTER"));
    }
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(err("bind(AF_PACKET)"));
    }
    Ok((fd, ifindex))
}

fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Whether the agent's bridge-family table exists in the calling thread's namespace.
/// Blocking; run it through [`run_in_netns`].
pub fn firewall_present() -> Result<bool, KernelError> {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "bridge", super::FIREWALL_TABLE])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| KernelError::io("running nft (is nftables installed?)", e))?;
    if out.status.success() {
        return Ok(true);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("No such file or directory") || err.contains("does not exist") {
        return Ok(false);
    }
    Err(KernelError::io(
        "nft list table bridge isthmus",
        std::io::Error::other(err.trim().to_string()),
    ))
}

/// Sends bridged IPv4 and IPv6 through the inet hooks of the calling thread's namespace, where
/// conntrack sees them (this kernel has no conntrack for the bridge family).
fn bridge_through_inet_hooks() -> Result<(), KernelError> {
    for f in ["bridge-nf-call-iptables", "bridge-nf-call-ip6tables"] {
        let path = format!("/proc/sys/net/bridge/{f}");
        let now =
            std::fs::read_to_string(&path).map_err(|e| KernelError::io(format!("reading {path} (br_netfilter)"), e))?;
        if now.trim() != "1" {
            std::fs::write(&path, "1").map_err(|e| KernelError::io(format!("writing {path}"), e))?;
        }
    }
    Ok(())
}

/// Applies one nft script, atomically, in the calling thread's namespace (a child process
/// inherits the thread's namespaces). Blocking; run it through [`run_in_netns`].
pub fn apply_firewall(script: &str) -> Result<(), KernelError> {
    bridge_through_inet_hooks()?;
    nft(script)
}

/// Runs one nft script as one transaction in the calling thread's namespace.
pub fn nft(script: &str) -> Result<(), KernelError> {
    piped("nft", &["-f", "-"], script, "nft -f (firewall)")
}

/// Runs `program` with `input` on its standard input (in the calling thread's namespace); its
/// error output becomes the error, labelled `what`.
pub fn piped(program: &str, args: &[&str], input: &str, what: &str) -> Result<(), KernelError> {
    use std::io::Write;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| KernelError::io(format!("running {program} (is it installed?)"), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| KernelError::io(format!("writing to {program}"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| KernelError::io(format!("waiting for {program}"), e))?;
    if !out.status.success() {
        return Err(KernelError::io(
            what.to_string(),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(())
}

/// Announces `ip` at `mac` on `dev` inside the namespace at `netns`: one gratuitous ARP
/// request, broadcast. Neighbours that already hold an entry for `ip` (even an unresolved one,
/// left over from while the address was gone) take the new MAC at once instead of at their
/// next probe, up to a second later. Blocking: runs on its own short-lived thread.
pub fn gratuitous_arp(netns: &Path, dev: &str, ip: std::net::Ipv4Addr, mac: [u8; 6]) -> Result<(), KernelError> {
    let ns = open_netns(netns)?;
    let dev = dev.to_string();
    std::thread::Builder::new()
        .name("isthmus-garp".into())
        .spawn(move || {
            enter(&ns.0, &ns.1)?;
            send_garp(&dev, ip, mac)
        })
        .map_err(|e| KernelError::io("spawning a netns worker thread", e))?
        .join()
        .map_err(|_| KernelError::io("gratuitous ARP", std::io::Error::other("worker panicked")))?
}

/// The frame of a gratuitous ARP request for `ip` at `mac`.
pub fn garp_frame(ip: std::net::Ipv4Addr, mac: [u8; 6]) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // Ethernet, IPv4, 6-byte and 4-byte addresses, request.
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip.octets());
    // Target hardware address zero, target protocol address the sender's own.
    f[38..42].copy_from_slice(&ip.octets());
    f
}

fn send_garp(dev: &str, ip: std::net::Ipv4Addr, mac: [u8; 6]) -> Result<(), KernelError> {
    use std::os::fd::OwnedFd;
    let err = |what: &str| KernelError::io(format!("{what} for {dev}"), std::io::Error::last_os_error());
    let cname =
        std::ffi::CString::new(dev).map_err(|_| KernelError::io("interface name", std::io::Error::other("NUL")))?;
    // SAFETY: plain syscalls with valid arguments; results are checked.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(err("if_nametoindex"));
    }
    // SAFETY: as above.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err("socket(AF_PACKET)"));
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: zeroed sockaddr_ll is valid; fields set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let frame = garp_frame(ip, mac);
    // SAFETY: frame and sll are valid for the lengths given.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(err("sendto(AF_PACKET)"));
    }
    Ok(())
}

/// A raw ICMPv6 socket bound to `dev` inside the namespace at `netns`, for router
/// advertisements: hop limit 255 (hosts ignore neighbour discovery with less), non-blocking.
/// Returns the socket and the interface index.
pub fn icmpv6_socket_in(netns: &Path, dev: &str) -> Result<(std::os::fd::OwnedFd, u32), KernelError> {
    let ns = open_netns(netns)?;
    let dev = dev.to_string();
    std::thread::Builder::new()
        .name("isthmus-ra".into())
        .spawn(move || {
            enter(&ns.0, &ns.1)?;
            icmpv6_socket(&dev)
        })
        .map_err(|e| KernelError::io("spawning a netns worker thread", e))?
        .join()
        .map_err(|_| KernelError::io("ICMPv6 socket", std::io::Error::other("worker panicked")))?
}

fn icmpv6_socket(dev: &str) -> Result<(std::os::fd::OwnedFd, u32), KernelError> {
    use std::os::fd::OwnedFd;
    let err = |what: &str| KernelError::io(format!("{what} for {dev}"), std::io::Error::last_os_error());
    let cname =
        std::ffi::CString::new(dev).map_err(|_| KernelError::io("interface name", std::io::Error::other("NUL")))?;
    // SAFETY: plain syscalls with valid arguments; results are checked.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(err("if_nametoindex"));
    }
    // SAFETY: as above.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET6,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMPV6,
        )
    };
    if fd < 0 {
        return Err(err("socket(ICMPv6)"));
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let hops: libc::c_int = 255;
    for opt in [libc::IPV6_MULTICAST_HOPS, libc::IPV6_UNICAST_HOPS] {
        // SAFETY: a pointer to a live c_int of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_IPV6,
                opt,
                &hops as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if rc != 0 {
            return Err(err("setsockopt(hop limit)"));
        }
    }
    // SAFETY: the name's bytes, alive across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            cname.as_ptr() as *const libc::c_void,
            cname.as_bytes().len() as u32,
        )
    };
    if rc != 0 {
        return Err(err("SO_BINDTODEVICE"));
    }
    Ok((fd, ifindex))
}
