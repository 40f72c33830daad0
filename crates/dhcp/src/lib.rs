//! DHCPv4 for one port at a time, as pure functions: parse a client's frame, decide the answer
//! from the port's lease, build the answer frame.
//!
//! The agent serves each local VM port on its own tap device (it reads the guest's frames
//! there and writes answers straight back to the guest), so there is exactly one client MAC
//! and one lease per conversation; no pool, no lease database. Addresses come from the port's
//! fixed IP, so a renewal always gets the same answer and an agent restart loses nothing.

use std::net::Ipv4Addr;

pub mod opts;
pub mod v6;

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const ETH_IP: u16 = 0x0800;
const BOOTP_MIN: usize = 236 + 4;

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }
    fn code(self) -> u8 {
        match self {
            Self::Discover => 1,
            Self::Offer => 2,
            Self::Request => 3,
            Self::Decline => 4,
            Self::Ack => 5,
            Self::Nak => 6,
            Self::Release => 7,
            Self::Inform => 8,
        }
    }
}

/// Why a frame is not a DHCP request we can read. Callers just drop such frames.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("frame too short")]
    Short,
    #[error("not IPv4 UDP to port 67")]
    NotDhcp,
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// A client's request, as far as answering it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: MessageType,
    pub xid: u32,
    /// The source MAC of the frame.
    pub src_mac: [u8; 6],
    /// The client hardware address in the BOOTP header.
    pub chaddr: [u8; 6],
    pub ciaddr: Ipv4Addr,
    pub flags: u16,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
    /// Option 55, in the client's order.
    pub params: Vec<u8>,
}

/// What a port's DHCP answer carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: u16,
    /// Host routes (option 121): destination, prefix length, next hop.
    pub routes: Vec<(Ipv4Addr, u8, Ipv4Addr)>,
    pub lease_secs: u32,
    /// Server identifier (option 54) and the answer's source address.
    pub server_id: Ipv4Addr,
    pub server_mac: [u8; 6],
    pub domain: Option<String>,
    /// The guest's host name (option 12).
    pub hostname: Option<String>,
    /// `siaddr` when it is not the server itself (a boot server).
    pub next_server: Option<Ipv4Addr>,
    /// Further options by code, sent as given; they replace any option the lease would
    /// otherwise send with the same code.
    pub extra: Vec<(u8, Vec<u8>)>,
}

impl Lease {
    /// Applies the port's extra options over the defaults: the ones the lease models (router,
    /// DNS servers, domain, MTU, host name, next server) change those fields, so dependent
    /// options stay consistent (the default route in option 121 follows an overridden
    /// router); the rest are sent as given. A later option with the same code wins.
    pub fn apply(&mut self, extras: impl IntoIterator<Item = opts::Extra>) {
        for e in extras {
            let (code, val) = match e {
                opts::Extra::NextServer(a) => {
                    self.next_server = Some(a);
                    continue;
                }
                opts::Extra::Option(c, v) => (c, v),
            };
            let addrs: Vec<Ipv4Addr> = val.chunks_exact(4).map(|a| ip_at(a, 0)).collect();
            match code {
                3 if val.len() >= 4 && val.len().is_multiple_of(4) => self.router = addrs.first().copied(),
                6 if val.len().is_multiple_of(4) => self.dns = addrs,
                15 => self.domain = Some(String::from_utf8_lossy(&val).into_owned()),
                12 => self.hostname = Some(String::from_utf8_lossy(&val).into_owned()),
                26 if val.len() == 2 => self.mtu = be16(&val, 0),
                _ => {
                    self.extra.retain(|(c, _)| *c != code);
                    self.extra.push((code, val));
                }
            }
        }
    }

    fn overridden(&self, code: u8) -> bool {
        self.extra.iter().any(|(c, _)| *c == code)
    }
}

/// The answer to send, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Offer,
    Ack,
    /// INFORM: configuration without an address or lease time.
    AckInform,
    Nak,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Parses an Ethernet frame holding a DHCP request (BOOTREQUEST to UDP port 67).
pub fn parse(frame: &[u8]) -> Result<Request, ParseError> {
    if frame.len() < 14 + 20 + 8 {
        return Err(ParseError::Short);
    }
    if be16(frame, 12) != ETH_IP {
        return Err(ParseError::NotDhcp);
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl + 8 {
        return Err(ParseError::Malformed("IPv4 header"));
    }
    if ip[9] != 17 {
        return Err(ParseError::NotDhcp);
    }
    // Fragments never carry a whole DHCP message we would want.
    if be16(ip, 6) & 0x3fff != 0 {
        return Err(ParseError::NotDhcp);
    }
    let udp = &ip[ihl..];
    if be16(udp, 2) != SERVER_PORT {
        return Err(ParseError::NotDhcp);
    }
    let udp_len = usize::from(be16(udp, 4));
    if udp_len < 8 || udp_len > udp.len() {
        return Err(ParseError::Malformed("UDP length"));
    }
    let b = &udp[8..udp_len];
    if b.len() < BOOTP_MIN {
        return Err(ParseError::Short);
    }
    if b[0] != 1 {
        return Err(ParseError::NotDhcp);
    }
    if b[1] != 1 || b[2] != 6 {
        return Err(ParseError::Malformed("hardware type"));
    }
    if b[236..240] != MAGIC {
        return Err(ParseError::Malformed("magic cookie"));
    }
    let mut src_mac = [0u8; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    let mut chaddr = [0u8; 6];
    chaddr.copy_from_slice(&b[28..34]);
    let mut kind = None;
    let mut requested_ip = None;
    let mut server_id = None;
    let mut params = vec![];
    let mut i = 240;
    while i < b.len() {
        let code = b[i];
        if code == 0 {
            i += 1;
            continue;
        }
        if code == 255 {
            break;
        }
        let len = *b.get(i + 1).ok_or(ParseError::Malformed("option length"))? as usize;
        let val = b
            .get(i + 2..i + 2 + len)
            .ok_or(ParseError::Malformed("option overruns"))?;
        match (code, len) {
            (53, 1) => kind = MessageType::from_u8(val[0]),
            (50, 4) => requested_ip = Some(ip_at(val, 0)),
            (54, 4) => server_id = Some(ip_at(val, 0)),
            (55, _) => params = val.to_vec(),
            _ => {}
        }
        i += 2 + len;
    }
    Ok(Request {
        kind: kind.ok_or(ParseError::Malformed("no message type"))?,
        xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        src_mac,
        chaddr,
        ciaddr: ip_at(b, 12),
        flags: be16(b, 10),
        requested_ip,
        server_id,
        params,
    })
}

/// RFC 2131's server side for a client that owns exactly one address.
pub fn decide(req: &Request, lease: &Lease) -> Option<Answer> {
    match req.kind {
        MessageType::Discover => Some(Answer::Offer),
        MessageType::Request => {
            // SELECTING names a server: another server's offer is none of our business.
            if req.server_id.is_some_and(|s| s != lease.server_id) {
                return None;
            }
            // SELECTING/INIT-REBOOT carry option 50; RENEWING/REBINDING carry ciaddr.
            let asked = req.requested_ip.unwrap_or(req.ciaddr);
            if asked == lease.ip {
                Some(Answer::Ack)
            } else {
                Some(Answer::Nak)
            }
        }
        MessageType::Inform => Some(Answer::AckInform),
        _ => None,
    }
}

fn mask(prefix_len: u8) -> Ipv4Addr {
    let p = u32::from(prefix_len.min(32));
    Ipv4Addr::from(if p == 0 { 0 } else { u32::MAX << (32 - p) })
}

/// Option 121 payload (RFC 3442). With classless routes present a client ignores option 3, so
/// the default route goes in here too.
fn classless_routes(lease: &Lease) -> Vec<u8> {
    let mut routes = lease.routes.clone();
    if let Some(r) = lease.router {
        if !routes.iter().any(|(_, len, _)| *len == 0) {
            routes.push((Ipv4Addr::UNSPECIFIED, 0, r));
        }
    }
    let mut out = vec![];
    for (dst, len, via) in routes {
        let len = len.min(32);
        out.push(len);
        let significant = usize::from(len).div_ceil(8);
        out.extend_from_slice(&dst.octets()[..significant]);
        out.extend_from_slice(&via.octets());
    }
    out
}

fn push_opt(out: &mut Vec<u8>, code: u8, val: &[u8]) {
    // Options longer than 255 bytes are split (RFC 3396); ours never are, but stay correct.
    for chunk in val.chunks(255) {
        out.push(code);
        out.push(chunk.len() as u8);
        out.extend_from_slice(chunk);
    }
}

fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The answer frame: Ethernet + IPv4 + UDP 67→68 + BOOTREPLY.
pub fn build(answer: Answer, req: &Request, lease: &Lease) -> Vec<u8> {
    let kind = match answer {
        Answer::Offer => MessageType::Offer,
        Answer::Ack | Answer::AckInform => MessageType::Ack,
        Answer::Nak => MessageType::Nak,
    };
    let mut b = vec![0u8; 236];
    b[0] = 2;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&req.xid.to_be_bytes());
    b[10..12].copy_from_slice(&req.flags.to_be_bytes());
    if answer == Answer::AckInform {
        b[12..16].copy_from_slice(&req.ciaddr.octets());
    }
    if matches!(answer, Answer::Offer | Answer::Ack) {
        b[16..20].copy_from_slice(&lease.ip.octets());
    }
    // siaddr: zero in a NAK (RFC 2131, table 3).
    if answer != Answer::Nak {
        b[20..24].copy_from_slice(&lease.next_server.unwrap_or(lease.server_id).octets());
    }
    b[28..34].copy_from_slice(&req.chaddr);
    b.extend_from_slice(&MAGIC);
    push_opt(&mut b, 53, &[kind.code()]);
    push_opt(&mut b, 54, &lease.server_id.octets());
    if answer != Answer::Nak {
        let put = |b: &mut Vec<u8>, code: u8, val: &[u8]| {
            if !lease.overridden(code) {
                push_opt(b, code, val);
            }
        };
        if answer != Answer::AckInform {
            put(&mut b, 51, &lease.lease_secs.to_be_bytes());
            // Renew at half, rebind at 7/8 (RFC 2131's defaults, stated explicitly).
            put(&mut b, 58, &(lease.lease_secs / 2).to_be_bytes());
            put(&mut b, 59, &(lease.lease_secs / 8 * 7).to_be_bytes());
        }
        put(&mut b, 1, &mask(lease.prefix_len).octets());
        if let Some(r) = lease.router {
            put(&mut b, 3, &r.octets());
        }
        if !lease.dns.is_empty() {
            let v: Vec<u8> = lease.dns.iter().flat_map(|d| d.octets()).collect();
            put(&mut b, 6, &v);
        }
        if let Some(h) = lease.hostname.as_deref().filter(|h| !h.is_empty()) {
            put(&mut b, 12, h.as_bytes());
        }
        if let Some(d) = lease.domain.as_deref().filter(|d| !d.is_empty()) {
            put(&mut b, 15, d.as_bytes());
        }
        put(&mut b, 26, &lease.mtu.to_be_bytes());
        let routes = classless_routes(lease);
        if !lease.routes.is_empty() && !routes.is_empty() {
            put(&mut b, 121, &routes);
        }
        for (code, val) in &lease.extra {
            // The message type and server identifier are the protocol's, never a port's.
            if !matches!(code, 53 | 54) {
                push_opt(&mut b, *code, val);
            }
        }
    }
    b.push(255);
    // Some clients drop replies shorter than a minimal BOOTP packet.
    while b.len() < 300 {
        b.push(0);
    }

    // The guest may have no address yet: answer to its MAC, and to the broadcast address when
    // it asked for that (or for NAKs, which it must see whatever its state).
    let broadcast = req.flags & 0x8000 != 0 || answer == Answer::Nak;
    let dst_ip = if broadcast {
        Ipv4Addr::BROADCAST
    } else if answer == Answer::AckInform {
        req.ciaddr
    } else {
        lease.ip
    };
    let dst_mac = if broadcast { [0xff; 6] } else { req.src_mac };
    let udp_len = (8 + b.len()) as u16;
    let mut udp = Vec::with_capacity(usize::from(udp_len));
    udp.extend_from_slice(&SERVER_PORT.to_be_bytes());
    udp.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&b);
    let src = lease.server_id.octets();
    let dst = dst_ip.octets();
    let pseudo: u32 = [
        u16::from_be_bytes([src[0], src[1]]),
        u16::from_be_bytes([src[2], src[3]]),
        u16::from_be_bytes([dst[0], dst[1]]),
        u16::from_be_bytes([dst[2], dst[3]]),
        17,
        udp_len,
    ]
    .iter()
    .map(|w| u32::from(*w))
    .sum();
    let c = checksum(&udp, pseudo);
    udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());

    let total = 20 + udp.len() as u16;
    let mut ip = vec![0x45, 0x00];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0x00, 64, 17, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());

    let mut frame = Vec::with_capacity(14 + ip.len() + udp.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&lease.server_mac);
    frame.extend_from_slice(&ETH_IP.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&udp);
    frame
}

/// A client's frame (for tests and benchmarks): DISCOVER, or REQUEST for `requested`.
pub fn client_frame(
    kind: MessageType,
    xid: u32,
    mac: [u8; 6],
    requested: Option<Ipv4Addr>,
    ciaddr: Ipv4Addr,
) -> Vec<u8> {
    let mut b = vec![0u8; 236];
    b[0] = 1;
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&xid.to_be_bytes());
    b[12..16].copy_from_slice(&ciaddr.octets());
    b[28..34].copy_from_slice(&mac);
    b.extend_from_slice(&MAGIC);
    push_opt(&mut b, 53, &[kind.code()]);
    if let Some(r) = requested {
        push_opt(&mut b, 50, &r.octets());
    }
    push_opt(&mut b, 55, &[1, 3, 6, 15, 26, 51, 121]);
    b.push(255);
    let udp_len = (8 + b.len()) as u16;
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETH_IP.to_be_bytes());
    let total = 20 + udp_len;
    let src = if ciaddr.is_unspecified() {
        [0; 4]
    } else {
        ciaddr.octets()
    };
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&[255, 255, 255, 255]);
    let c = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&CLIENT_PORT.to_be_bytes());
    frame.extend_from_slice(&SERVER_PORT.to_be_bytes());
    frame.extend_from_slice(&udp_len.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&b);
    frame
}

/// What a client reads from an answer frame (for tests and benchmarks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: MessageType,
    pub xid: u32,
    pub yiaddr: Ipv4Addr,
    /// The next server (`siaddr`).
    pub siaddr: Ipv4Addr,
    pub dst_mac: [u8; 6],
    /// Options by code (first occurrence).
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Reply {
    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options.iter().find(|(c, _)| *c == code).map(|(_, v)| v.as_slice())
    }
}

/// Parses an answer frame (BOOTREPLY from port 67 to 68), checking the IP and UDP checksums.
pub fn parse_reply(frame: &[u8]) -> Option<Reply> {
    if frame.len() < 14 + 20 + 8 + BOOTP_MIN || be16(frame, 12) != ETH_IP {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 || ip[9] != 17 || checksum(&ip[..ihl], 0) != 0 {
        return None;
    }
    let udp = &ip[ihl..];
    if be16(udp, 0) != SERVER_PORT || be16(udp, 2) != CLIENT_PORT {
        return None;
    }
    let udp_len = usize::from(be16(udp, 4));
    if udp_len > udp.len() {
        return None;
    }
    let pseudo: u32 = [
        be16(ip, 12),
        be16(ip, 14),
        be16(ip, 16),
        be16(ip, 18),
        17,
        udp_len as u16,
    ]
    .iter()
    .map(|w| u32::from(*w))
    .sum();
    if checksum(&udp[..udp_len], pseudo) != 0 {
        return None;
    }
    let b = &udp[8..udp_len];
    if b.len() < BOOTP_MIN || b[0] != 2 || b[236..240] != MAGIC {
        return None;
    }
    let mut options = vec![];
    let mut i = 240;
    while i + 1 < b.len() && b[i] != 255 {
        if b[i] == 0 {
            i += 1;
            continue;
        }
        let len = usize::from(b[i + 1]);
        let val = b.get(i + 2..i + 2 + len)?;
        if !options.iter().any(|(c, _)| *c == b[i]) {
            options.push((b[i], val.to_vec()));
        }
        i += 2 + len;
    }
    let kind = options
        .iter()
        .find(|(c, v)| *c == 53 && v.len() == 1)
        .and_then(|(_, v)| MessageType::from_u8(v[0]))?;
    let mut dst_mac = [0u8; 6];
    dst_mac.copy_from_slice(&frame[..6]);
    Some(Reply {
        kind,
        xid: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        yiaddr: ip_at(b, 16),
        siaddr: ip_at(b, 20),
        dst_mac,
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0xfa, 0x16, 0x3e, 0, 0, 7];

    fn lease() -> Lease {
        Lease {
            ip: Ipv4Addr::new(10, 0, 0, 7),
            prefix_len: 24,
            router: Some(Ipv4Addr::new(10, 0, 0, 1)),
            dns: vec![Ipv4Addr::new(10, 1, 1, 1), Ipv4Addr::new(10, 1, 1, 2)],
            mtu: 1450,
            routes: vec![(Ipv4Addr::new(172, 16, 0, 0), 12, Ipv4Addr::new(10, 0, 0, 254))],
            lease_secs: 86400,
            server_id: Ipv4Addr::new(10, 0, 0, 1),
            server_mac: [0xfe, 0x16, 0x3e, 0, 0, 7],
            domain: None,
            hostname: None,
            next_server: None,
            extra: vec![],
        }
    }

    #[test]
    fn discover_gets_an_offer_with_every_option() {
        let f = client_frame(MessageType::Discover, 42, MAC, None, Ipv4Addr::UNSPECIFIED);
        let req = parse(&f).unwrap();
        assert_eq!((req.kind, req.xid, req.chaddr), (MessageType::Discover, 42, MAC));
        let l = lease();
        let a = decide(&req, &l).unwrap();
        assert_eq!(a, Answer::Offer);
        let r = parse_reply(&build(a, &req, &l)).expect("a valid reply with good checksums");
        assert_eq!(r.kind, MessageType::Offer);
        assert_eq!(r.xid, 42);
        assert_eq!(r.yiaddr, l.ip);
        assert_eq!(r.dst_mac, MAC);
        assert_eq!(r.option(1), Some(&[255, 255, 255, 0][..]));
        assert_eq!(r.option(3), Some(&[10, 0, 0, 1][..]));
        assert_eq!(r.option(6), Some(&[10, 1, 1, 1, 10, 1, 1, 2][..]));
        assert_eq!(r.option(26), Some(&1450u16.to_be_bytes()[..]));
        assert_eq!(r.option(51), Some(&86400u32.to_be_bytes()[..]));
        assert_eq!(r.option(54), Some(&[10, 0, 0, 1][..]));
        // 172.16/12 via .254 (2 significant octets), then the default route via the gateway.
        assert_eq!(r.option(121), Some(&[12, 172, 16, 10, 0, 0, 254, 0, 10, 0, 0, 1][..]));
    }

    #[test]
    fn requests_are_acked_for_the_port_address_only() {
        let l = lease();
        let ok = client_frame(MessageType::Request, 1, MAC, Some(l.ip), Ipv4Addr::UNSPECIFIED);
        assert_eq!(decide(&parse(&ok).unwrap(), &l), Some(Answer::Ack));
        // Renewal: no option 50, the address in ciaddr.
        let renew = client_frame(MessageType::Request, 2, MAC, None, l.ip);
        let req = parse(&renew).unwrap();
        assert_eq!(decide(&req, &l), Some(Answer::Ack));
        assert_eq!(parse_reply(&build(Answer::Ack, &req, &l)).unwrap().yiaddr, l.ip);
        // Another address: NAK, broadcast so the client hears it.
        let wrong = client_frame(
            MessageType::Request,
            3,
            MAC,
            Some(Ipv4Addr::new(10, 0, 0, 9)),
            Ipv4Addr::UNSPECIFIED,
        );
        let req = parse(&wrong).unwrap();
        assert_eq!(decide(&req, &l), Some(Answer::Nak));
        let r = parse_reply(&build(Answer::Nak, &req, &l)).unwrap();
        assert_eq!((r.kind, r.dst_mac), (MessageType::Nak, [0xff; 6]));
        assert_eq!(r.option(51), None);
        // Choosing another server's offer: silence.
        let mut other = parse(&ok).unwrap();
        other.server_id = Some(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(decide(&other, &l), None);
        // Releases and declines get no answer.
        let rel = client_frame(MessageType::Release, 4, MAC, None, l.ip);
        assert_eq!(decide(&parse(&rel).unwrap(), &l), None);
    }

    #[test]
    fn without_host_routes_there_is_no_option_121() {
        let mut l = lease();
        l.routes.clear();
        let req = parse(&client_frame(
            MessageType::Discover,
            5,
            MAC,
            None,
            Ipv4Addr::UNSPECIFIED,
        ))
        .unwrap();
        let r = parse_reply(&build(Answer::Offer, &req, &l)).unwrap();
        assert_eq!(r.option(121), None);
        assert_eq!(r.option(3), Some(&[10, 0, 0, 1][..]));
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        assert_eq!(parse(&[]), Err(ParseError::Short));
        assert_eq!(parse(&[0u8; 60]), Err(ParseError::NotDhcp));
        let good = client_frame(MessageType::Discover, 6, MAC, None, Ipv4Addr::UNSPECIFIED);
        // Every truncation and a flipped byte at every position: an error or a parse, never a panic.
        for n in 0..good.len() {
            let _ = parse(&good[..n]);
        }
        for i in 0..good.len() {
            let mut g = good.clone();
            g[i] ^= 0xff;
            let _ = parse(&g);
            let _ = parse_reply(&g);
        }
        // An option that runs past the end.
        let mut bad = good.clone();
        let end = bad.len() - 1;
        bad[end] = 60;
        bad.push(200);
        let _ = parse(&bad);
    }

    fn offer(l: &Lease) -> Reply {
        let req = parse(&client_frame(
            MessageType::Discover,
            8,
            MAC,
            None,
            Ipv4Addr::UNSPECIFIED,
        ))
        .unwrap();
        parse_reply(&build(Answer::Offer, &req, l)).unwrap()
    }

    #[test]
    fn extra_options_are_sent_and_override_the_defaults() {
        let mut l = lease();
        let extras = [
            ("tftp-server", "10.0.0.9"),
            ("bootfile-name", "pxelinux.0"),
            ("server-ip-address", "10.0.0.9"),
            ("mtu", "1400"),
            ("dns-server", "9.9.9.9"),
            ("domain-name", "example.org"),
            ("router", "10.0.0.254"),
            ("150", "10.0.0.10"),
            ("200", "01:02"),
        ]
        .iter()
        .map(|(n, v)| opts::encode(n, v).unwrap())
        .collect::<Vec<_>>();
        l.apply(extras);
        let req = parse(&client_frame(
            MessageType::Discover,
            9,
            MAC,
            None,
            Ipv4Addr::UNSPECIFIED,
        ))
        .unwrap();
        let r = parse_reply(&build(Answer::Offer, &req, &l)).unwrap();
        assert_eq!(r.option(66), Some(&b"10.0.0.9"[..]));
        assert_eq!(r.option(67), Some(&b"pxelinux.0"[..]));
        assert_eq!(r.option(26), Some(&1400u16.to_be_bytes()[..]));
        assert_eq!(r.option(6), Some(&[9, 9, 9, 9][..]));
        assert_eq!(r.option(15), Some(&b"example.org"[..]));
        assert_eq!(r.option(3), Some(&[10, 0, 0, 254][..]));
        assert_eq!(r.option(150), Some(&[10, 0, 0, 10][..]));
        assert_eq!(r.option(200), Some(&[1, 2][..]));
        // The default route in option 121 follows the overridden router.
        assert_eq!(r.option(121), Some(&[12, 172, 16, 10, 0, 0, 254, 0, 10, 0, 0, 254][..]));
        assert_eq!(r.siaddr, Ipv4Addr::new(10, 0, 0, 9));
        // The server identifier stays the server's.
        assert_eq!(r.option(54), Some(&[10, 0, 0, 1][..]));
        // Options appear once each.
        assert_eq!(r.options.iter().filter(|(c, _)| *c == 26).count(), 1);
    }

    #[test]
    fn an_explicit_option_121_replaces_the_computed_one() {
        let mut l = lease();
        l.apply([opts::encode("121", "169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.1").unwrap()]);
        let r = offer(&l);
        assert_eq!(
            r.option(121),
            Some(&[32, 169, 254, 169, 254, 10, 0, 0, 2, 0, 10, 0, 0, 1][..])
        );
        // Without a next server, siaddr is the server itself.
        assert_eq!(r.siaddr, l.server_id);
    }

    #[test]
    fn hostname_and_domain() {
        let mut l = lease();
        assert_eq!(offer(&l).option(12), None);
        assert_eq!(offer(&l).option(15), None);
        l.hostname = Some("vm-1".into());
        l.domain = Some("example.org".into());
        let r = offer(&l);
        assert_eq!(r.option(12), Some(&b"vm-1"[..]));
        assert_eq!(r.option(15), Some(&b"example.org"[..]));
    }

    #[test]
    fn masks() {
        assert_eq!(mask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(mask(20), Ipv4Addr::new(255, 255, 240, 0));
        assert_eq!(mask(32), Ipv4Addr::new(255, 255, 255, 255));
    }
}
