//! Router advertisements from router namespaces, as Neutron's radvd sends them: on every leg
//! with an IPv6 subnet in a router-advertisement mode, unsolicited every [`PERIOD`] and at
//! once in answer to a router solicitation or when the leg appears.
//!
//! One thread serves every leg of the node: each leg has a raw ICMPv6 socket made inside its
//! router's namespace (on a short-lived thread, see [`super::netns`]) and used from here.

use super::netns::icmpv6_socket_in;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often each leg advertises unsolicited.
pub const PERIOD: Duration = Duration::from_secs(10);

/// One leg to advertise on: its router namespace, device and the advertisement.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Advert {
    pub netns: String,
    pub dev: String,
    pub packet: Vec<u8>,
}

#[derive(Default)]
struct Shared {
    wanted: Vec<Advert>,
    generation: u64,
}

/// The advertising thread's handle; the thread starts with the first legs to serve.
#[derive(Default)]
pub struct RaService {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    started: Mutex<bool>,
}

impl RaService {
    /// Replaces the set of legs advertised on.
    pub fn set(&self, mut ads: Vec<Advert>) {
        ads.sort();
        {
            let mut s = self.shared.0.lock().unwrap_or_else(|p| p.into_inner());
            if s.wanted == ads {
                return;
            }
            s.wanted = ads;
            s.generation += 1;
        }
        self.shared.1.notify_all();
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        if !*started {
            let shared = self.shared.clone();
            match std::thread::Builder::new()
                .name("isthmus-ra".into())
                .spawn(move || serve(shared))
            {
                Ok(_) => *started = true,
                Err(e) => tracing::warn!(error = %e, "starting the router advertisement thread failed"),
            }
        }
    }
}

struct Leg {
    fd: OwnedFd,
    ifindex: u32,
    packet: Vec<u8>,
}

fn serve(shared: Arc<(Mutex<Shared>, Condvar)>) {
    let mut legs: BTreeMap<(String, String), Leg> = BTreeMap::new();
    let mut seen = u64::MAX;
    let mut next = Instant::now();
    let mut retry_open = Instant::now();
    loop {
        let (wanted, generation) = {
            let s = shared.0.lock().unwrap_or_else(|p| p.into_inner());
            (s.wanted.clone(), s.generation)
        };
        if generation != seen || (legs.len() < wanted.len() && Instant::now() >= retry_open) {
            seen = generation;
            legs.retain(|k, _| wanted.iter().any(|a| (&a.netns, &a.dev) == (&k.0, &k.1)));
            for a in &wanted {
                let key = (a.netns.clone(), a.dev.clone());
                if let Some(l) = legs.get_mut(&key) {
                    if l.packet != a.packet {
                        l.packet = a.packet.clone();
                        send(&key, l);
                    }
                    continue;
                }
                match icmpv6_socket_in(&Path::new("/run/netns").join(&a.netns), &a.dev) {
                    Ok((fd, ifindex)) => {
                        let l = Leg {
                            fd,
                            ifindex,
                            packet: a.packet.clone(),
                        };
                        send(&key, &l);
                        legs.insert(key, l);
                    }
                    Err(e) => {
                        tracing::debug!(netns = %a.netns, dev = %a.dev, error = %e, "no advertising socket yet");
                        retry_open = Instant::now() + Duration::from_secs(1);
                    }
                }
            }
        }
        if legs.is_empty() {
            let s = shared.0.lock().unwrap_or_else(|p| p.into_inner());
            let _ = shared.1.wait_timeout(s, Duration::from_secs(1));
            continue;
        }
        if Instant::now() >= next {
            let mut gone = vec![];
            for (k, l) in &legs {
                if !send(k, l) {
                    gone.push(k.clone());
                }
            }
            for k in gone {
                legs.remove(&k);
            }
            next = Instant::now() + PERIOD;
        }
        // Solicitations: wait on every socket, at most until the next round or 500 ms (so
        // a change of legs is seen soon).
        let mut fds: Vec<libc::pollfd> = legs
            .values()
            .map(|l| libc::pollfd {
                fd: l.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(500));
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.as_millis() as i32) };
        if n <= 0 {
            continue;
        }
        for (pfd, (k, l)) in fds.iter().zip(legs.iter()) {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            let mut buf = [0u8; 1500];
            loop {
                // SAFETY: buf is valid for its length; a non-blocking read.
                let r = unsafe { libc::recv(pfd.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                if r <= 0 {
                    break;
                }
                // ICMPv6 type 133: router solicitation.
                if buf[0] == 133 {
                    send(k, l);
                }
            }
        }
    }
}

/// Sends `l`'s advertisement to all nodes (ff02::1) on its leg; false if the leg is gone.
fn send(key: &(String, String), l: &Leg) -> bool {
    // SAFETY: zeroed sockaddr_in6 is valid; fields set below.
    let mut to: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    to.sin6_family = libc::AF_INET6 as u16;
    to.sin6_addr.s6_addr = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    to.sin6_scope_id = l.ifindex;
    // SAFETY: packet and `to` are valid for the lengths given.
    let rc = unsafe {
        libc::sendto(
            l.fd.as_raw_fd(),
            l.packet.as_ptr() as *const libc::c_void,
            l.packet.len(),
            0,
            &to as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in6>() as u32,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        tracing::debug!(netns = %key.0, dev = %key.1, error = %e, "router advertisement not sent");
        return e.raw_os_error() != Some(libc::ENODEV) && e.raw_os_error() != Some(libc::ENXIO);
    }
    true
}
