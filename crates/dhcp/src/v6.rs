//! DHCPv6 (RFC 8415) for one port at a time, as pure functions, like the IPv4 side: stateful
//! subnets get the port's fixed IPv6 address in an IA_NA, stateless ones only the other
//! configuration (DNS servers). No lease database: the address is the port's.

use std::net::Ipv6Addr;

pub const SERVER_PORT: u16 = 547;
pub const CLIENT_PORT: u16 = 546;
const ETH_IPV6: u16 = 0x86dd;
const UDP: u8 = 17;

const OPT_CLIENTID: u16 = 1;
const OPT_SERVERID: u16 = 2;
const OPT_IA_NA: u16 = 3;
const OPT_IAADDR: u16 = 5;
const OPT_STATUS: u16 = 13;
const OPT_RAPID_COMMIT: u16 = 14;
const OPT_DNS: u16 = 23;

/// DHCPv6 message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Solicit,
    Advertise,
    Request,
    Confirm,
    Renew,
    Rebind,
    Reply,
    Release,
    Decline,
    InformationRequest,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Solicit,
            2 => Kind::Advertise,
            3 => Kind::Request,
            4 => Kind::Confirm,
            5 => Kind::Renew,
            6 => Kind::Rebind,
            7 => Kind::Reply,
            8 => Kind::Release,
            9 => Kind::Decline,
            11 => Kind::InformationRequest,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            Kind::Solicit => 1,
            Kind::Advertise => 2,
            Kind::Request => 3,
            Kind::Confirm => 4,
            Kind::Renew => 5,
            Kind::Rebind => 6,
            Kind::Reply => 7,
            Kind::Release => 8,
            Kind::Decline => 9,
            Kind::InformationRequest => 11,
        }
    }
}

/// A client's message, as far as answering needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request6 {
    pub src_mac: [u8; 6],
    pub src_ip: Ipv6Addr,
    pub kind: Kind,
    pub xid: [u8; 3],
    pub client_id: Vec<u8>,
    pub server_id: Option<Vec<u8>>,
    /// The IA_NA's identifier, if the client asked for an address.
    pub iaid: Option<u32>,
    pub rapid_commit: bool,
}

/// What a port gets over DHCPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease6 {
    /// The port's address on a stateful subnet; `None` for stateless configuration only.
    pub address: Option<Ipv6Addr>,
    pub dns: Vec<Ipv6Addr>,
    pub preferred_secs: u32,
    pub valid_secs: u32,
    /// The server's MAC (frame source and DUID).
    pub server_mac: [u8; 6],
}

/// Why a frame was not taken as a DHCPv6 client message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError6 {
    #[error("not IPv6 UDP to port 547")]
    NotDhcp6,
    #[error("truncated or malformed message")]
    Malformed,
    #[error("not a client message")]
    NotClient,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Options of a DHCPv6 message body: (code, value), in order; `None` if one overruns.
fn options(mut b: &[u8]) -> Option<Vec<(u16, &[u8])>> {
    let mut out = vec![];
    while !b.is_empty() {
        let code = be16(b, 0)?;
        let len = usize::from(be16(b, 2)?);
        let v = b.get(4..4 + len)?;
        out.push((code, v));
        b = &b[4 + len..];
    }
    Some(out)
}

/// Reads a guest's frame: Ethernet, IPv6 (no extension headers), UDP to 547, a client message.
pub fn parse6(frame: &[u8]) -> Result<Request6, ParseError6> {
    if frame.len() < 14 + 40 + 8 + 4 || be16(frame, 12) != Some(ETH_IPV6) {
        return Err(ParseError6::NotDhcp6);
    }
    let ip = &frame[14..];
    if ip[0] >> 4 != 6 || ip[6] != UDP {
        return Err(ParseError6::NotDhcp6);
    }
    let udp = &ip[40..];
    if be16(udp, 2) != Some(SERVER_PORT) {
        return Err(ParseError6::NotDhcp6);
    }
    let ulen = usize::from(be16(udp, 4).ok_or(ParseError6::Malformed)?);
    if ulen < 12 || ulen > udp.len() {
        return Err(ParseError6::Malformed);
    }
    let msg = &udp[8..ulen];
    let kind = Kind::from_u8(msg[0]).ok_or(ParseError6::NotClient)?;
    if matches!(kind, Kind::Advertise | Kind::Reply) {
        return Err(ParseError6::NotClient);
    }
    let opts = options(&msg[4..]).ok_or(ParseError6::Malformed)?;
    let mut src_ip = [0u8; 16];
    src_ip.copy_from_slice(&ip[8..24]);
    let mut src_mac = [0u8; 6];
    src_mac.copy_from_slice(&frame[6..12]);
    let find = |c: u16| opts.iter().find(|(k, _)| *k == c).map(|(_, v)| *v);
    let client_id = find(OPT_CLIENTID).ok_or(ParseError6::Malformed)?.to_vec();
    if client_id.is_empty() || client_id.len() > 130 {
        return Err(ParseError6::Malformed);
    }
    let iaid = match find(OPT_IA_NA) {
        Some(v) if v.len() >= 12 => Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
        Some(_) => return Err(ParseError6::Malformed),
        None => None,
    };
    Ok(Request6 {
        src_mac,
        src_ip: Ipv6Addr::from(src_ip),
        kind,
        xid: [msg[1], msg[2], msg[3]],
        client_id,
        server_id: find(OPT_SERVERID).map(<[u8]>::to_vec),
        iaid,
        rapid_commit: find(OPT_RAPID_COMMIT).is_some(),
    })
}

/// The server's DUID: DUID-LL (type 3, Ethernet) of its MAC.
pub fn duid(mac: [u8; 6]) -> Vec<u8> {
    let mut d = vec![0, 3, 0, 1];
    d.extend_from_slice(&mac);
    d
}

/// The answer to a request, if any: its message type and whether it carries the address.
pub fn decide6(req: &Request6, lease: &Lease6) -> Option<(Kind, bool)> {
    // A message meant for another server is not ours to answer.
    if let Some(sid) = &req.server_id {
        if *sid != duid(lease.server_mac) {
            return None;
        }
    }
    let addr = req.iaid.is_some() && lease.address.is_some();
    match req.kind {
        Kind::Solicit if addr => Some((if req.rapid_commit { Kind::Reply } else { Kind::Advertise }, true)),
        // Stateless: a client soliciting an address gets none here.
        Kind::Solicit => None,
        Kind::Request | Kind::Renew | Kind::Rebind if addr => Some((Kind::Reply, true)),
        Kind::Request | Kind::Renew | Kind::Rebind => None,
        Kind::Confirm | Kind::Release | Kind::Decline | Kind::InformationRequest => Some((Kind::Reply, false)),
        Kind::Advertise | Kind::Reply => None,
    }
}

fn push_opt(b: &mut Vec<u8>, code: u16, v: &[u8]) {
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(v.len() as u16).to_be_bytes());
    b.extend_from_slice(v);
}

/// The link-local address of `mac` (modified EUI-64), the answers' source.
pub fn link_local(mac: [u8; 6]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o[0] = 0xfe;
    o[1] = 0x80;
    o[8..16].copy_from_slice(&[mac[0] ^ 2, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]]);
    Ipv6Addr::from(o)
}

/// The answer frame: Ethernet + IPv6 + UDP 547→546 + the message, to the client's address.
pub fn build6(kind: Kind, with_address: bool, req: &Request6, lease: &Lease6) -> Vec<u8> {
    let mut msg = vec![kind.code(), req.xid[0], req.xid[1], req.xid[2]];
    push_opt(&mut msg, OPT_SERVERID, &duid(lease.server_mac));
    push_opt(&mut msg, OPT_CLIENTID, &req.client_id);
    if let (true, Some(iaid), Some(a)) = (with_address, req.iaid, lease.address) {
        let mut ia = vec![];
        ia.extend_from_slice(&iaid.to_be_bytes());
        ia.extend_from_slice(&(lease.preferred_secs / 2).to_be_bytes()); // T1
        ia.extend_from_slice(&(lease.preferred_secs / 5 * 4).to_be_bytes()); // T2
        let mut ad = a.octets().to_vec();
        ad.extend_from_slice(&lease.preferred_secs.to_be_bytes());
        ad.extend_from_slice(&lease.valid_secs.to_be_bytes());
        push_opt(&mut ia, OPT_IAADDR, &ad);
        push_opt(&mut msg, OPT_IA_NA, &ia);
    }
    if req.rapid_commit && kind == Kind::Reply && req.kind == Kind::Solicit {
        push_opt(&mut msg, OPT_RAPID_COMMIT, &[]);
    }
    if matches!(req.kind, Kind::Confirm | Kind::Release | Kind::Decline) {
        // Success: the address is the port's for good.
        push_opt(&mut msg, OPT_STATUS, &[0, 0]);
    }
    if !lease.dns.is_empty() {
        let v: Vec<u8> = lease.dns.iter().flat_map(|d| d.octets()).collect();
        push_opt(&mut msg, OPT_DNS, &v);
    }
    frame6(
        lease.server_mac,
        link_local(lease.server_mac),
        req.src_mac,
        req.src_ip,
        SERVER_PORT,
        CLIENT_PORT,
        &msg,
    )
}

/// An Ethernet + IPv6 + UDP frame with a correct UDP checksum.
pub fn frame6(
    src_mac: [u8; 6],
    src: Ipv6Addr,
    dst_mac: [u8; 6],
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let ulen = (8 + payload.len()) as u16;
    let mut f = Vec::with_capacity(14 + 40 + usize::from(ulen));
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&ulen.to_be_bytes());
    f.extend_from_slice(&[UDP, 64]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let mut udp = vec![];
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&ulen.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    // Pseudo-header: addresses, length, next header.
    let mut pseudo = vec![];
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::from(ulen).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, UDP]);
    pseudo.extend_from_slice(&udp);
    let mut sum = super::checksum(&pseudo, 0);
    if sum == 0 {
        sum = 0xffff;
    }
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// A client's message as a guest would send it (for tests and tools): from `mac`'s
/// link-local address to all DHCP servers (ff02::1:2).
pub fn client_frame6(kind: Kind, mac: [u8; 6], xid: [u8; 3], iaid: Option<u32>, server_id: Option<&[u8]>) -> Vec<u8> {
    let mut msg = vec![kind.code(), xid[0], xid[1], xid[2]];
    push_opt(&mut msg, OPT_CLIENTID, &duid(mac));
    if let Some(s) = server_id {
        push_opt(&mut msg, OPT_SERVERID, s);
    }
    if let Some(i) = iaid {
        let mut ia = i.to_be_bytes().to_vec();
        ia.extend_from_slice(&[0; 8]);
        push_opt(&mut msg, OPT_IA_NA, &ia);
    }
    let dst: Ipv6Addr = "ff02::1:2".parse().expect("constant");
    let dst_mac = [0x33, 0x33, 0, 1, 0, 2];
    frame6(mac, link_local(mac), dst_mac, dst, CLIENT_PORT, SERVER_PORT, &msg)
}

/// A server's answer as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply6 {
    pub kind: Kind,
    pub xid: [u8; 3],
    pub server_id: Vec<u8>,
    pub address: Option<Ipv6Addr>,
    pub dns: Vec<Ipv6Addr>,
    /// The UDP checksum verified.
    pub checksum_ok: bool,
}

/// Reads a server's answer frame (UDP to 546).
pub fn parse_reply6(frame: &[u8]) -> Option<Reply6> {
    if frame.len() < 14 + 40 + 8 + 4 || be16(frame, 12)? != ETH_IPV6 || frame[14 + 6] != UDP {
        return None;
    }
    let ip = &frame[14..];
    let udp = &ip[40..];
    if be16(udp, 2)? != CLIENT_PORT {
        return None;
    }
    let ulen = usize::from(be16(udp, 4)?);
    let msg = udp.get(8..ulen)?;
    if msg.len() < 4 {
        return None;
    }
    let kind = Kind::from_u8(msg[0])?;
    let opts = options(&msg[4..])?;
    let find = |c: u16| opts.iter().find(|(k, _)| *k == c).map(|(_, v)| *v);
    let address = find(OPT_IA_NA).and_then(|ia| {
        let inner = options(ia.get(12..)?)?;
        let (_, a) = inner.into_iter().find(|(k, _)| *k == OPT_IAADDR)?;
        let b: [u8; 16] = a.get(..16)?.try_into().ok()?;
        Some(Ipv6Addr::from(b))
    });
    let dns = find(OPT_DNS)
        .map(|v| {
            v.chunks_exact(16)
                .filter_map(|c| <[u8; 16]>::try_from(c).ok().map(Ipv6Addr::from))
                .collect()
        })
        .unwrap_or_default();
    let mut pseudo = vec![];
    pseudo.extend_from_slice(&ip[8..40]);
    pseudo.extend_from_slice(&(ulen as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, UDP]);
    pseudo.extend_from_slice(&udp[..ulen]);
    Some(Reply6 {
        kind,
        xid: [msg[1], msg[2], msg[3]],
        server_id: find(OPT_SERVERID)?.to_vec(),
        address,
        dns,
        checksum_ok: super::checksum(&pseudo, 0) == 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: [u8; 6] = [0xfa, 0x16, 0x3e, 1, 2, 3];
    const SERVER: [u8; 6] = [0xfe, 0x16, 0x3e, 1, 2, 3];

    fn lease(stateful: bool) -> Lease6 {
        Lease6 {
            address: stateful.then(|| "2001:db8::5".parse().unwrap()),
            dns: vec!["2001:db8::53".parse().unwrap()],
            preferred_secs: 3600,
            valid_secs: 7200,
            server_mac: SERVER,
        }
    }

    #[test]
    fn stateful_exchange_gives_the_port_address_with_a_valid_checksum() {
        let f = client_frame6(Kind::Solicit, GUEST, [1, 2, 3], Some(7), None);
        let req = parse6(&f).unwrap();
        assert_eq!((req.kind, req.iaid, req.src_mac), (Kind::Solicit, Some(7), GUEST));
        let l = lease(true);
        let (kind, with) = decide6(&req, &l).unwrap();
        assert_eq!((kind, with), (Kind::Advertise, true));
        let r = parse_reply6(&build6(kind, with, &req, &l)).unwrap();
        assert!(r.checksum_ok);
        assert_eq!(r.kind, Kind::Advertise);
        assert_eq!(r.xid, [1, 2, 3]);
        assert_eq!(r.address, Some("2001:db8::5".parse().unwrap()));
        assert_eq!(r.dns, vec!["2001:db8::53".parse::<Ipv6Addr>().unwrap()]);
        // Request to this server: Reply with the address; to another server: nothing.
        let req = parse6(&client_frame6(
            Kind::Request,
            GUEST,
            [4, 5, 6],
            Some(7),
            Some(&r.server_id),
        ))
        .unwrap();
        assert_eq!(decide6(&req, &l), Some((Kind::Reply, true)));
        let other = duid([2, 0, 0, 0, 0, 1]);
        let req = parse6(&client_frame6(Kind::Request, GUEST, [4, 5, 6], Some(7), Some(&other))).unwrap();
        assert_eq!(decide6(&req, &l), None);
    }

    #[test]
    fn stateless_subnets_answer_information_requests_only() {
        let l = lease(false);
        let sol = parse6(&client_frame6(Kind::Solicit, GUEST, [1, 1, 1], Some(1), None)).unwrap();
        assert_eq!(decide6(&sol, &l), None);
        let info = parse6(&client_frame6(Kind::InformationRequest, GUEST, [2, 2, 2], None, None)).unwrap();
        let (k, with) = decide6(&info, &l).unwrap();
        let r = parse_reply6(&build6(k, with, &info, &l)).unwrap();
        assert_eq!((r.kind, r.address), (Kind::Reply, None));
        assert_eq!(r.dns.len(), 1);
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let good = client_frame6(Kind::Solicit, GUEST, [1, 2, 3], Some(7), None);
        for cut in 0..good.len() {
            let _ = parse6(&good[..cut]);
        }
        let mut bad = good.clone();
        // An option length running past the end.
        let at = 14 + 40 + 8 + 4 + 2;
        bad[at] = 0xff;
        assert!(parse6(&bad).is_err());
        assert!(parse6(&[0u8; 100]).is_err());
    }
}
