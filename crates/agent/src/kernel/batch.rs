//! Forwarding-entry changes in bulk: many route-netlink requests per `send` on a raw netlink
//! socket of our own, each acknowledged separately.
//!
//! Going through the rtnetlink connection task costs a request, a response stream and a system
//! call pair per entry. Here requests are packed back to back into one buffer (up to
//! [`BatchConfig::max_send_bytes`] each), every one with its own sequence number and
//! `NLM_F_ACK`, and the kernel's acknowledgements are matched back to their operations by that
//! number. The kernel handles a netlink write synchronously: when `send` returns, every request
//! in it has been processed and its acknowledgement queued on our socket (or dropped, if the
//! receive queue was full, which the next read reports as `ENOBUFS`). So the number of requests
//! per send is also bounded by what the receive buffer can hold, and the buffer is made large.
//!
//! Socket I/O runs on a blocking-pool thread (`spawn_blocking`) with a non-blocking socket and
//! `poll`, under an overall deadline ([`BatchConfig::timeout`]): a tokio worker never blocks,
//! and a kernel that does not answer cannot hang the caller.

use super::netns::run_in_netns;
use super::KernelError;
use rtnetlink::packet_core::{
    ErrorBuffer, ErrorMessage, NetlinkBuffer, NetlinkMessage, Parseable, NLMSG_ERROR, NLM_F_ACK, NLM_F_APPEND,
    NLM_F_CREATE, NLM_F_REQUEST,
};
use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket};
use std::fmt;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One static forwarding entry of a VXLAN device: frames for `mac` go to the remote VTEP
/// `dst` (`mac` all-zero: the flood list, one entry per destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FdbEntry {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub dst: IpAddr,
}

/// A change to one forwarding entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FdbOp {
    /// Like `bridge fdb append ... self permanent`: adding an entry that exists is a no-op.
    Add(FdbEntry),
    /// Like `bridge fdb del ... self`: an entry that is already gone counts as deleted.
    Del(FdbEntry),
}

impl FdbOp {
    pub fn entry(&self) -> &FdbEntry {
        match self {
            FdbOp::Add(e) | FdbOp::Del(e) => e,
        }
    }
}

impl fmt::Display for FdbOp {
    /// As the per-entry path names them in errors, with the device's index for its name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (verb, e) = match self {
            FdbOp::Add(e) => ("adding", e),
            FdbOp::Del(e) => ("deleting", e),
        };
        write!(
            f,
            "{verb} fdb {} dst {} on ifindex {}",
            super::MacAddr(e.mac),
            e.dst,
            e.ifindex
        )
    }
}

/// Limits of a [`FdbBatcher`]. The defaults suit the agent; tests shrink them to provoke the
/// overflow path.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Receive buffer asked for (`SO_RCVBUFFORCE`, falling back to `SO_RCVBUF`, which
    /// `net.core.rmem_max` caps). The kernel doubles it for its bookkeeping.
    pub rcvbuf: usize,
    /// Most bytes of requests per `send`.
    pub max_send_bytes: usize,
    /// Most requests per `send`. `None`: derived from the receive buffer the kernel granted,
    /// so their acknowledgements fit in it.
    pub max_in_flight: Option<usize>,
    /// Bound on one [`FdbBatcher::apply`] call; operations without an answer by then fail.
    pub timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            rcvbuf: 8 << 20,
            max_send_bytes: 64 << 10,
            max_in_flight: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Room one queued acknowledgement takes in the receive buffer (the kernel counts the skb's
/// truesize, about 768 bytes for an ack; a refusal that echoes the request is a little more).
const ACK_COST: usize = 1024;

/// Writes forwarding-entry changes in batches on its own route-netlink socket, bound to the
/// network namespace it was opened in. Calls to [`FdbBatcher::apply`] may come from several
/// tasks; they take turns on the socket.
pub struct FdbBatcher {
    inner: Arc<Mutex<Inner>>,
    timeout: Duration,
}

struct Inner {
    sock: Socket,
    /// Sequence number of the next request. Answers to earlier, abandoned batches carry numbers
    /// outside the current window and are ignored.
    next_seq: u32,
    max_send_bytes: usize,
    max_in_flight: usize,
}

impl FdbBatcher {
    /// A batcher for the namespace at `netns` (the caller's own when `None`), with the default
    /// limits.
    pub async fn open(netns: Option<&Path>) -> Result<FdbBatcher, KernelError> {
        Self::open_with(netns, BatchConfig::default()).await
    }

    pub async fn open_with(netns: Option<&Path>, config: BatchConfig) -> Result<FdbBatcher, KernelError> {
        let sock = match netns {
            None => new_socket()?,
            Some(_) => run_in_netns(netns, new_socket).await?,
        };
        sock.set_non_blocking(true)
            .map_err(|e| KernelError::io("fdb batch socket non-blocking", e))?;
        // Refusals need only the request's header echoed (the index says which op it was).
        let _ = sock.set_cap_ack(true);
        set_buf(&sock, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, config.rcvbuf)
            .map_err(|e| KernelError::io("fdb batch socket receive buffer", e))?;
        let rcvbuf = sock
            .get_rx_buf_sz()
            .map_err(|e| KernelError::io("fdb batch socket receive buffer", e))?;
        // A netlink write larger than the send buffer fails with EMSGSIZE.
        let want_snd = config.max_send_bytes.clamp(4 << 10, 4 << 20) + (16 << 10);
        let _ = set_buf(&sock, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, want_snd);
        let sndbuf = get_int(&sock, libc::SO_SNDBUF).unwrap_or(200 << 10);
        let max_send_bytes = config.max_send_bytes.min(sndbuf.saturating_sub(1 << 10)).max(1 << 10);
        let max_in_flight = config.max_in_flight.unwrap_or(rcvbuf / ACK_COST).max(1);
        tracing::debug!(rcvbuf, sndbuf, max_send_bytes, max_in_flight, "fdb batch socket");
        Ok(FdbBatcher {
            inner: Arc::new(Mutex::new(Inner {
                sock,
                next_seq: 1,
                max_send_bytes,
                max_in_flight,
            })),
            timeout: config.timeout,
        })
    }

    /// Performs `ops` in order and returns one result per op, in the same order. A refusal by
    /// the kernel is [`KernelError::Netlink`] carrying its `NLMSG_ERROR` (so its errno is read
    /// as for the per-entry path, e.g. `ENODEV` for a stale ifindex); a delete refused with
    /// `ENOENT` is a success. An op whose answer never came (receive queue overflow, the
    /// overall deadline, a failed send) is [`KernelError::Io`]: it may or may not have been
    /// applied.
    pub async fn apply(&self, ops: &[FdbOp]) -> Vec<Result<(), KernelError>> {
        if ops.is_empty() {
            return vec![];
        }
        let deadline = Instant::now() + self.timeout;
        let timeout = self.timeout;
        let inner = Arc::clone(&self.inner);
        let owned = ops.to_vec();
        let task = tokio::task::spawn_blocking(move || {
            let mut inner = inner.lock().unwrap_or_else(|p| p.into_inner());
            inner.apply(&owned, deadline, timeout)
        });
        match task.await {
            Ok(results) => results,
            Err(e) => {
                let why = if e.is_panic() { "panicked" } else { "was cancelled" };
                ops.iter()
                    .map(|op| {
                        Err(KernelError::io(
                            op.to_string(),
                            std::io::Error::other(format!("fdb batch worker {why}")),
                        ))
                    })
                    .collect()
            }
        }
    }
}

fn new_socket() -> Result<Socket, KernelError> {
    Socket::new(NETLINK_ROUTE).map_err(|e| KernelError::io("opening fdb batch netlink socket", e))
}

/// Sets a socket buffer size with the `*FORCE` option (root may exceed the sysctl maximum),
/// else with the plain one.
fn set_buf(sock: &Socket, force: libc::c_int, plain: libc::c_int, size: usize) -> std::io::Result<()> {
    let v = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    set_int(sock, force, v).or_else(|_| set_int(sock, plain, v))
}

fn set_int(sock: &Socket, opt: libc::c_int, v: libc::c_int) -> std::io::Result<()> {
    // SAFETY: setsockopt reads an int from a valid pointer of the given size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn get_int(sock: &Socket, opt: libc::c_int) -> std::io::Result<usize> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(usize::try_from(v).unwrap_or(0))
}

/// The request for `op` with sequence number `seq`, serialized (padded to netlink alignment).
fn encode(op: &FdbOp, seq: u32, out: &mut Vec<u8>) {
    let e = op.entry();
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = e.ifindex;
    msg.header.state = NeighbourState::Permanent;
    // NTF_SELF: the entry belongs to the VXLAN device itself, not to its bridge.
    msg.header.flags = NeighbourFlags::Own;
    msg.header.kind = RouteType::Unspec;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(e.mac.to_vec()));
    msg.attributes.push(NeighbourAttribute::Destination(e.dst.into()));
    let (payload, flags) = match op {
        // Append, like `bridge fdb append`: one MAC may have several destinations.
        FdbOp::Add(_) => (
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
        ),
        FdbOp::Del(_) => (RouteNetlinkMessage::DelNeighbour(msg), NLM_F_REQUEST | NLM_F_ACK),
    };
    let mut nl = NetlinkMessage::from(payload);
    nl.header.flags = flags;
    nl.header.sequence_number = seq;
    nl.finalize();
    let len = nl.buffer_len();
    let start = out.len();
    out.resize(start + align(len), 0);
    nl.serialize(&mut out[start..start + len]);
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Why an op got no answer.
enum Lost {
    Overflow,
    Deadline,
    Read(std::io::Error),
}

impl Inner {
    fn apply(&mut self, ops: &[FdbOp], deadline: Instant, timeout: Duration) -> Vec<Result<(), KernelError>> {
        let mut results: Vec<Option<Result<(), KernelError>>> = ops.iter().map(|_| None).collect();
        let mut buf = Vec::with_capacity(self.max_send_bytes + 256);
        let mut rx = Receiver::new();
        let mut i = 0;
        while i < ops.len() {
            if Instant::now() >= deadline {
                fail_unanswered(&mut results[i..], &ops[i..], &Lost::Deadline, timeout);
                break;
            }
            // Pack the next chunk.
            buf.clear();
            let first = i;
            let first_seq = self.next_seq;
            while i < ops.len() && i - first < self.max_in_flight {
                let before = buf.len();
                encode(&ops[i], first_seq.wrapping_add((i - first) as u32), &mut buf);
                if buf.len() > self.max_send_bytes && i > first {
                    buf.truncate(before);
                    break;
                }
                i += 1;
            }
            let count = i - first;
            self.next_seq = first_seq.wrapping_add(count as u32);
            if let Err(e) = self.send_all(&buf, deadline) {
                for (r, op) in results[first..i].iter_mut().zip(&ops[first..i]) {
                    let source = match e.raw_os_error() {
                        Some(code) => std::io::Error::from_raw_os_error(code),
                        None => std::io::Error::new(e.kind(), e.to_string()),
                    };
                    *r = Some(Err(KernelError::io(format!("{op}: sending the batch"), source)));
                }
                continue;
            }
            let lost = self.collect(&ops[first..i], &mut results[first..i], first_seq, deadline, &mut rx);
            if let Some(why) = lost {
                fail_unanswered(&mut results[first..i], &ops[first..i], &why, timeout);
                if matches!(why, Lost::Overflow) && self.max_in_flight > 1 {
                    // Fewer answers per write from now on.
                    self.max_in_flight = (count / 2).max(1);
                }
            }
        }
        results
            .into_iter()
            .zip(ops)
            .map(|(r, op)| {
                r.unwrap_or_else(|| {
                    Err(KernelError::io(
                        op.to_string(),
                        std::io::Error::other("no answer from the kernel"),
                    ))
                })
            })
            .collect()
    }

    /// Sends the packed requests in one write, waiting (until the deadline) while the socket
    /// cannot take it.
    fn send_all(&self, buf: &[u8], deadline: Instant) -> std::io::Result<()> {
        loop {
            match self.sock.send(buf, 0) {
                Ok(n) if n == buf.len() => return Ok(()),
                Ok(n) => {
                    return Err(std::io::Error::other(format!(
                        "short netlink write: {n} of {} bytes",
                        buf.len()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !self.wait(libc::POLLOUT, deadline)? {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "netlink socket not writable before the deadline",
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads acknowledgements until every op of the chunk (sequence numbers from `first_seq`)
    /// has one. Returns why some have none, if so.
    fn collect(
        &self,
        ops: &[FdbOp],
        results: &mut [Option<Result<(), KernelError>>],
        first_seq: u32,
        deadline: Instant,
        rx: &mut Receiver,
    ) -> Option<Lost> {
        let mut pending = ops.len();
        let mut overflowed = false;
        while pending > 0 {
            let count = match rx.recv(&self.sock) {
                Ok(n) => n,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        // The kernel queued every answer it could during `send`: after an
                        // overflow an empty queue means the rest were dropped.
                        if overflowed {
                            return Some(Lost::Overflow);
                        }
                        match self.wait(libc::POLLIN, deadline) {
                            Ok(true) => continue,
                            Ok(false) => return Some(Lost::Deadline),
                            Err(e) => return Some(Lost::Read(e)),
                        }
                    }
                    Some(libc::ENOBUFS) => {
                        tracing::warn!("fdb batch: netlink receive queue overflowed, acknowledgements lost");
                        overflowed = true;
                        continue;
                    }
                    _ => return Some(Lost::Read(e)),
                },
            };
            for k in 0..count {
                rx.answers(k, |seq, payload| {
                    let idx = seq.wrapping_sub(first_seq) as usize;
                    if idx < ops.len() && results[idx].is_none() {
                        results[idx] = Some(outcome(&ops[idx], payload));
                        pending -= 1;
                    }
                });
            }
        }
        None
    }

    /// Waits until the socket is ready for `events` or the deadline passes (`false`).
    fn wait(&self, events: libc::c_short, deadline: Instant) -> std::io::Result<bool> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            let mut pfd = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if rc > 0 {
                // POLLERR (a pending ENOBUFS) counts as ready: the read reports it.
                return Ok(true);
            }
        }
    }
}

/// Datagrams read per `recvmmsg`.
const RECV_BATCH: usize = 64;
/// Room per datagram. An acknowledgement is 36 bytes (with `NETLINK_CAP_ACK`; a kernel without
/// it echoes the whole request in a refusal, still far below this).
const RECV_SLOT: usize = 4096;
const NLMSG_HDRLEN: usize = 16;

/// Buffers to read many datagrams per system call (one acknowledgement is one datagram).
struct Receiver {
    data: Vec<u8>,
    addrs: Vec<libc::sockaddr_nl>,
    /// Per datagram of the last read: its length, whether it was cut short, whether it came
    /// from the kernel.
    got: Vec<(usize, bool, bool)>,
}

impl Receiver {
    fn new() -> Receiver {
        Receiver {
            data: vec![0; RECV_BATCH * RECV_SLOT],
            // SAFETY: an all-zero sockaddr_nl is valid.
            addrs: vec![unsafe { std::mem::zeroed() }; RECV_BATCH],
            got: Vec::with_capacity(RECV_BATCH),
        }
    }

    /// Reads what is queued, without waiting; returns how many datagrams (at least one) or
    /// the error (`EAGAIN` when nothing is queued).
    fn recv(&mut self, sock: &Socket) -> std::io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = self
            .data
            .chunks_mut(RECV_SLOT)
            .map(|c| libc::iovec {
                iov_base: c.as_mut_ptr() as *mut libc::c_void,
                iov_len: c.len(),
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(self.addrs.iter_mut())
            .map(|(iov, addr)| {
                // SAFETY: an all-zero mmsghdr is valid; the pointers set below outlive the call.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = addr as *mut libc::sockaddr_nl as *mut libc::c_void;
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: `hdrs` holds RECV_BATCH headers, each pointing at its own slot of `data` and
        // its own address, all alive and unaliased for the duration of the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        self.got.clear();
        for (h, addr) in hdrs.iter().zip(&self.addrs).take(n) {
            self.got.push((
                (h.msg_len as usize).min(RECV_SLOT),
                h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                // Another process may write to our port; only the kernel answers.
                addr.nl_pid == 0,
            ));
        }
        Ok(n)
    }

    /// Calls `f(sequence number, NLMSG_ERROR payload)` for each error/ack message in datagram
    /// `k` of the last read. A datagram cut short still yields its first message's header and
    /// error code.
    fn answers(&self, k: usize, mut f: impl FnMut(u32, &[u8])) {
        let Some(&(len, truncated, from_kernel)) = self.got.get(k) else {
            return;
        };
        if !from_kernel {
            return;
        }
        let mut data = &self.data[k * RECV_SLOT..k * RECV_SLOT + len];
        while data.len() >= NLMSG_HDRLEN {
            let msg = NetlinkBuffer::new(data);
            let mlen = msg.length() as usize;
            let whole = (NLMSG_HDRLEN..=data.len()).contains(&mlen);
            if !whole && !truncated {
                return; // malformed
            }
            let end = if whole { mlen } else { data.len() };
            if msg.message_type() == NLMSG_ERROR {
                f(msg.sequence_number(), &data[NLMSG_HDRLEN..end]);
            }
            if !whole {
                return;
            }
            let step = align(mlen);
            if step >= data.len() {
                return;
            }
            data = &data[step..];
        }
    }
}

/// The result an `NLMSG_ERROR` payload means for `op`.
fn outcome(op: &FdbOp, payload: &[u8]) -> Result<(), KernelError> {
    let parsed = ErrorBuffer::new_checked(&payload).and_then(|b| ErrorMessage::parse(&b));
    let err = match parsed {
        Ok(e) => e,
        Err(e) => {
            return Err(KernelError::io(
                op.to_string(),
                std::io::Error::other(format!("malformed netlink acknowledgement: {e}")),
            ))
        }
    };
    match err.code {
        None => Ok(()),
        Some(c) if matches!(op, FdbOp::Del(_)) && -c.get() == libc::ENOENT => Ok(()),
        Some(_) => Err(KernelError::Netlink {
            op: op.to_string(),
            source: rtnetlink::Error::NetlinkError(err),
        }),
    }
}

fn fail_unanswered(results: &mut [Option<Result<(), KernelError>>], ops: &[FdbOp], why: &Lost, timeout: Duration) {
    for (r, op) in results.iter_mut().zip(ops) {
        if r.is_none() {
            let source = match why {
                Lost::Overflow => std::io::Error::other(
                    "acknowledgement lost: the netlink receive queue overflowed (ENOBUFS); \
                     the change may or may not have been applied",
                ),
                Lost::Deadline => std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no acknowledgement within {timeout:?}; the change may or may not have been applied"),
                ),
                Lost::Read(e) => std::io::Error::new(
                    e.kind(),
                    format!("reading acknowledgements: {e}; the change may or may not have been applied"),
                ),
            };
            *r = Some(Err(KernelError::io(op.to_string(), source)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> FdbEntry {
        FdbEntry {
            ifindex: 7,
            mac: [0xfa, 0x16, 0x3e, 0, 0, 1],
            dst: "192.0.2.9".parse().unwrap(),
        }
    }

    #[test]
    fn requests_are_packed_back_to_back_with_their_own_sequence_numbers() {
        let mut buf = vec![];
        encode(&FdbOp::Add(entry()), 41, &mut buf);
        let first = buf.len();
        encode(&FdbOp::Del(entry()), 42, &mut buf);
        assert_eq!(first % 4, 0);
        let a = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..first]).unwrap();
        let d = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[first..]).unwrap();
        assert_eq!(a.header.sequence_number, 41);
        assert_eq!(a.header.flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND);
        assert_eq!(d.header.sequence_number, 42);
        assert_eq!(d.header.flags, NLM_F_REQUEST | NLM_F_ACK);
        let rtnetlink::packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) = a.payload
        else {
            panic!("not a new-neighbour request: {a:?}");
        };
        assert_eq!(n.header.family, AddressFamily::Bridge);
        assert_eq!(n.header.ifindex, 7);
        assert_eq!(n.header.state, NeighbourState::Permanent);
        assert_eq!(n.header.flags, NeighbourFlags::Own);
        assert!(n
            .attributes
            .contains(&NeighbourAttribute::LinkLayerAddress(entry().mac.to_vec())));
        assert!(matches!(
            d.payload,
            rtnetlink::packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(_))
        ));
    }

    /// An NLMSG_ERROR datagram: header, error code, echoed request header.
    fn ack(seq: u32, code: i32) -> Vec<u8> {
        let mut v = vec![];
        v.extend_from_slice(&36u32.to_ne_bytes());
        v.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        v.extend_from_slice(&0u16.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&code.to_ne_bytes());
        v.extend_from_slice(&[0; 16]);
        v
    }

    #[test]
    fn acknowledgements_map_to_results() {
        let mut rx = Receiver::new();
        let datagrams = [
            (ack(5, 0), false),
            (ack(6, -libc::ENOENT), false),
            (ack(7, -libc::ENODEV)[..24].to_vec(), true),
        ];
        for (k, (d, truncated)) in datagrams.iter().enumerate() {
            rx.data[k * RECV_SLOT..k * RECV_SLOT + d.len()].copy_from_slice(d);
            rx.got.push((d.len(), *truncated, true));
        }
        // A datagram from another process is ignored.
        rx.data[3 * RECV_SLOT..3 * RECV_SLOT + 36].copy_from_slice(&ack(8, 0));
        rx.got.push((36, false, false));
        let ops = [
            FdbOp::Add(entry()),
            FdbOp::Del(entry()),
            FdbOp::Add(entry()),
            FdbOp::Add(entry()),
        ];
        let mut results: Vec<Option<Result<(), KernelError>>> = ops.iter().map(|_| None).collect();
        for k in 0..4 {
            rx.answers(k, |seq, payload| {
                let idx = (seq - 5) as usize;
                results[idx] = Some(outcome(&ops[idx], payload));
            });
        }
        assert!(matches!(results[0], Some(Ok(()))));
        assert!(matches!(results[1], Some(Ok(()))), "ENOENT on delete is success");
        let Some(Err(KernelError::Netlink {
            op,
            source: rtnetlink::Error::NetlinkError(m),
        })) = &results[2]
        else {
            panic!("{:?}", results[2]);
        };
        assert_eq!(m.raw_code(), -libc::ENODEV);
        assert_eq!(op, "adding fdb fa:16:3e:00:00:01 dst 192.0.2.9 on ifindex 7");
        assert!(results[3].is_none());
        assert!(matches!(
            outcome(&ops[0], &ack(9, -libc::ENOENT)[16..]),
            Err(KernelError::Netlink { .. })
        ));
    }
}
