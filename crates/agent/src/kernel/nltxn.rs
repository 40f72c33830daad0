//! Several route-netlink requests in one write on a blocking socket, for work that runs on a
//! dedicated thread anyway (a container's veth, made from inside its namespace's thread).
//!
//! The kernel handles the requests of one write in order and answers each (its data replies,
//! then an acknowledgement carrying the same sequence number), so a chain such as "address,
//! link up, route" costs one system call pair instead of one per step. A request that fails
//! does not stop the ones after it; callers read each answer. A dump (`NLM_F_DUMP`) counts as
//! answered at its DONE message.

use super::KernelError;
use rtnetlink::packet_core::{ErrorMessage, NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// How long one exchange may take before the caller gets an error instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(5);
const NLMSG_HDRLEN: usize = 16;

/// One request's answer: its error (if the kernel refused it) and any data it returned.
#[derive(Debug, Default)]
pub struct Answer {
    pub error: Option<ErrorMessage>,
    pub replies: Vec<RouteNetlinkMessage>,
}

impl Answer {
    /// The kernel's errno, positive (`EEXIST`, ...), if it refused the request.
    pub fn errno(&self) -> Option<i32> {
        self.error.as_ref().and_then(|e| e.code).map(|c| -c.get())
    }

    /// `Ok` unless the kernel refused the request with an errno other than `tolerated`.
    pub fn check(
        self,
        op: impl FnOnce() -> String,
        tolerated: &[i32],
    ) -> Result<Vec<RouteNetlinkMessage>, KernelError> {
        match self.errno() {
            Some(code) if !tolerated.contains(&code) => Err(KernelError::Netlink {
                op: op(),
                source: rtnetlink::Error::NetlinkError(self.error.unwrap_or_default()),
            }),
            _ => Ok(self.replies),
        }
    }
}

/// A route-netlink socket bound in the network namespace of the thread that opened it.
pub struct Txn {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Txn {
    /// Opens the socket in the calling thread's current network namespace.
    pub fn open() -> Result<Txn, KernelError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| KernelError::io("opening netlink socket", e))?;
        sock.bind_auto()
            .map_err(|e| KernelError::io("binding netlink socket", e))?;
        let tv = libc::timeval {
            tv_sec: TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt reads a timeval from a valid pointer of the given size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(KernelError::io(
                "netlink socket timeout",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Txn {
            sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Sends every request (message and `NLM_F_*` flags beyond REQUEST|ACK) in one write and
    /// returns their answers in the same order.
    pub fn run(&mut self, reqs: Vec<(RouteNetlinkMessage, u16)>, what: &str) -> Result<Vec<Answer>, KernelError> {
        let first = self.seq.wrapping_add(1);
        let mut out = Vec::new();
        for (i, (msg, flags)) in reqs.into_iter().enumerate() {
            let mut nl = NetlinkMessage::from(msg);
            nl.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
            nl.header.sequence_number = first.wrapping_add(i as u32);
            nl.finalize();
            let len = nl.buffer_len();
            let start = out.len();
            out.resize(start + ((len + 3) & !3), 0);
            nl.serialize(&mut out[start..start + len]);
            self.seq = nl.header.sequence_number;
        }
        let count = self.seq.wrapping_sub(first).wrapping_add(1) as usize;
        let io = |e: std::io::Error| KernelError::io(format!("netlink {what}"), e);
        let sent = self.sock.send(&out, 0).map_err(io)?;
        if sent != out.len() {
            return Err(io(std::io::Error::other("short netlink write")));
        }
        let mut answers: Vec<Answer> = (0..count).map(|_| Answer::default()).collect();
        let mut acked = 0;
        let deadline = Instant::now() + TIMEOUT;
        while acked < count {
            if Instant::now() >= deadline {
                return Err(io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer from the kernel",
                )));
            }
            let n = self.sock.recv(&mut &mut self.buf[..], 0).map_err(io)?;
            let mut data = &self.buf[..n.min(self.buf.len())];
            while data.len() >= NLMSG_HDRLEN {
                let hdr = NetlinkBuffer::new(data);
                let mlen = hdr.length() as usize;
                if mlen < NLMSG_HDRLEN || mlen > data.len() {
                    return Err(io(std::io::Error::other("malformed netlink answer")));
                }
                let idx = hdr.sequence_number().wrapping_sub(first) as usize;
                if idx < count {
                    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[..mlen])
                        .map_err(|e| io(std::io::Error::other(format!("malformed netlink answer: {e}"))))?;
                    match msg.payload {
                        NetlinkPayload::Error(e) => {
                            answers[idx].error = e.code.map(|_| e);
                            acked += 1;
                        }
                        // A dump ends with DONE and no acknowledgement.
                        NetlinkPayload::Done(_) => acked += 1,
                        NetlinkPayload::InnerMessage(m) => answers[idx].replies.push(m),
                        _ => {}
                    }
                }
                let step = (mlen + 3) & !3;
                data = data.get(step..).unwrap_or(&[]);
            }
        }
        Ok(answers)
    }
}
