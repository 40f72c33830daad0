//! Extra DHCPv4 options a port asks for (Neutron's `extra_dhcp_opts`), by dnsmasq's option
//! names or by number, turned into what an answer carries.
//!
//! Values are written as for dnsmasq: addresses as dotted quads separated by commas, numbers
//! in decimal, text as is, classless routes as `dest/len,router,...`. A number whose option
//! this table does not know gets its value as an address list if it reads as one, raw bytes
//! if written as hex pairs (`01:02:0a`), else as text.

use std::net::Ipv4Addr;

/// How an option's value is written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Addr,
    Addrs,
    Text,
    U8,
    U16,
    U32,
    Routes,
}

/// dnsmasq's names for DHCPv4 options this server can encode, with their codes.
const NAMED: &[(&str, u8, Kind)] = &[
    ("netmask", 1, Kind::Addr),
    ("time-offset", 2, Kind::U32),
    ("router", 3, Kind::Addrs),
    ("dns-server", 6, Kind::Addrs),
    ("log-server", 7, Kind::Addrs),
    ("lpr-server", 9, Kind::Addrs),
    ("hostname", 12, Kind::Text),
    ("boot-file-size", 13, Kind::U16),
    ("domain-name", 15, Kind::Text),
    ("swap-server", 16, Kind::Addr),
    ("root-path", 17, Kind::Text),
    ("extension-path", 18, Kind::Text),
    ("ip-forward-enable", 19, Kind::U8),
    ("non-local-source-routing", 20, Kind::U8),
    ("default-ttl", 23, Kind::U8),
    ("mtu", 26, Kind::U16),
    ("all-subnets-local", 27, Kind::U8),
    ("broadcast", 28, Kind::Addr),
    ("router-discovery", 31, Kind::U8),
    ("router-solicitation", 32, Kind::Addr),
    ("trailer-encapsulation", 34, Kind::U8),
    ("arp-timeout", 35, Kind::U32),
    ("ethernet-encap", 36, Kind::U8),
    ("tcp-ttl", 37, Kind::U8),
    ("tcp-keepalive", 38, Kind::U32),
    ("nis-domain", 40, Kind::Text),
    ("nis-server", 41, Kind::Addrs),
    ("ntp-server", 42, Kind::Addrs),
    ("netbios-ns", 44, Kind::Addrs),
    ("netbios-dd", 45, Kind::Addrs),
    ("netbios-nodetype", 46, Kind::U8),
    ("netbios-scope", 47, Kind::Text),
    ("x-windows-fs", 48, Kind::Addrs),
    ("x-windows-dm", 49, Kind::Addrs),
    ("nis+-domain", 64, Kind::Text),
    ("nis+-server", 65, Kind::Addrs),
    ("tftp-server", 66, Kind::Text),
    ("bootfile-name", 67, Kind::Text),
    ("mobile-ip-home", 68, Kind::Addrs),
    ("smtp-server", 69, Kind::Addrs),
    ("pop3-server", 70, Kind::Addrs),
    ("nntp-server", 71, Kind::Addrs),
    ("irc-server", 74, Kind::Addrs),
    ("user-class", 77, Kind::Text),
    ("classless-static-route", 121, Kind::Routes),
    ("tftp-server-address", 150, Kind::Addrs),
];

/// The address that goes in the BOOTP header's `siaddr` (next server), not in an option.
pub const SERVER_IP_ADDRESS: &str = "server-ip-address";

/// What one extra option puts in an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extra {
    /// An option: code and payload.
    Option(u8, Vec<u8>),
    /// The next server address (`siaddr`).
    NextServer(Ipv4Addr),
}

/// The option code `name` stands for: a dnsmasq name this module knows, `option:<name>`, or
/// a number from 1 to 254. `None` for anything else.
pub fn code(name: &str) -> Option<u8> {
    let name = name.strip_prefix("option:").unwrap_or(name);
    if let Ok(n) = name.parse::<u8>() {
        return (1..=254).contains(&n).then_some(n);
    }
    NAMED.iter().find(|(n, _, _)| *n == name).map(|(_, c, _)| *c)
}

/// Whether `name` is an option this module can encode.
pub fn known(name: &str) -> bool {
    name == SERVER_IP_ADDRESS || code(name).is_some()
}

fn addrs(value: &str) -> Option<Vec<Ipv4Addr>> {
    let v: Option<Vec<Ipv4Addr>> = value.split(',').map(|a| a.trim().parse().ok()).collect();
    v.filter(|v| !v.is_empty())
}

fn hex_bytes(value: &str) -> Option<Vec<u8>> {
    if !value.contains(':') {
        return None;
    }
    value
        .split(':')
        .map(|b| (b.len() == 2).then(|| u8::from_str_radix(b, 16).ok()).flatten())
        .collect()
}

fn routes(value: &str) -> Option<Vec<u8>> {
    let parts: Vec<&str> = value.split(',').map(str::trim).collect();
    if parts.is_empty() || !parts.len().is_multiple_of(2) {
        return None;
    }
    let mut out = vec![];
    for pair in parts.chunks(2) {
        let (dst, len) = pair[0].split_once('/')?;
        let dst: Ipv4Addr = dst.parse().ok()?;
        let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
        let via: Ipv4Addr = pair[1].parse().ok()?;
        out.push(len);
        out.extend_from_slice(&dst.octets()[..usize::from(len).div_ceil(8)]);
        out.extend_from_slice(&via.octets());
    }
    Some(out)
}

fn encode_kind(kind: Kind, value: &str) -> Option<Vec<u8>> {
    let v = value.trim();
    match kind {
        Kind::Addr => v.parse::<Ipv4Addr>().ok().map(|a| a.octets().to_vec()),
        Kind::Addrs => addrs(v).map(|a| a.iter().flat_map(|a| a.octets()).collect()),
        Kind::Text => (!value.is_empty() && value.len() <= 255).then(|| value.as_bytes().to_vec()),
        Kind::U8 => v.parse::<u8>().ok().map(|n| vec![n]),
        Kind::U16 => v.parse::<u16>().ok().map(|n| n.to_be_bytes().to_vec()),
        Kind::U32 => v.parse::<u32>().ok().map(|n| n.to_be_bytes().to_vec()),
        Kind::Routes => routes(v),
    }
}

/// Encodes option `name` with `value`, or says why it cannot be.
pub fn encode(name: &str, value: &str) -> Result<Extra, String> {
    if name == SERVER_IP_ADDRESS {
        return value
            .trim()
            .parse()
            .map(Extra::NextServer)
            .map_err(|_| format!("'{value}' is not an IPv4 address for {name}"));
    }
    let c = code(name).ok_or_else(|| format!("'{name}' is not a known DHCP option"))?;
    let kind = NAMED.iter().find(|(_, n, _)| *n == c).map(|(_, _, k)| *k);
    let bytes = match kind {
        Some(k) => encode_kind(k, value),
        None => addrs(value.trim())
            .map(|a| a.iter().flat_map(|a| a.octets()).collect())
            .or_else(|| hex_bytes(value.trim()))
            .or_else(|| encode_kind(Kind::Text, value)),
    };
    bytes
        .map(|b| Extra::Option(c, b))
        .ok_or_else(|| format!("'{value}' is not a valid value for DHCP option {name}"))
}

/// Whether a DHCPv6 option name (`ip_version` 6) is the DNS servers option (23), the one
/// DHCPv6 answers take from a port's options.
pub fn is_dns_server_v6(name: &str) -> bool {
    let name = name.strip_prefix("option6:").unwrap_or(name);
    name == "dns-server" || name == "23"
}

/// DHCPv6 DNS server addresses as Neutron writes them: comma-separated, each optionally in
/// brackets (`[2001:db8::1],[2001:db8::2]`).
pub fn dns_servers_v6(value: &str) -> Option<Vec<std::net::Ipv6Addr>> {
    let v: Option<Vec<std::net::Ipv6Addr>> = value
        .split(',')
        .map(|a| {
            let a = a.trim();
            let a = a.strip_prefix('[').and_then(|a| a.strip_suffix(']')).unwrap_or(a);
            a.parse().ok()
        })
        .collect();
    v.filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(code("tftp-server"), Some(66));
        assert_eq!(code("option:bootfile-name"), Some(67));
        assert_eq!(code("tftp-server-address"), Some(150));
        assert_eq!(code("66"), Some(66));
        assert_eq!(code("0"), None);
        assert_eq!(code("255"), None);
        assert_eq!(code("300"), None);
        assert_eq!(code("no-such-option"), None);
        assert!(known(SERVER_IP_ADDRESS));
        assert!(!known("bogus"));
    }

    #[test]
    fn values_by_kind() {
        assert_eq!(encode("mtu", "1400"), Ok(Extra::Option(26, vec![5, 120])));
        assert_eq!(
            encode("dns-server", "8.8.8.8, 1.1.1.1"),
            Ok(Extra::Option(6, vec![8, 8, 8, 8, 1, 1, 1, 1]))
        );
        assert_eq!(
            encode("bootfile-name", "pxelinux.0"),
            Ok(Extra::Option(67, b"pxelinux.0".to_vec()))
        );
        assert_eq!(
            encode("tftp-server", "10.0.0.9"),
            Ok(Extra::Option(66, b"10.0.0.9".to_vec()))
        );
        assert_eq!(
            encode("tftp-server-address", "10.0.0.9"),
            Ok(Extra::Option(150, vec![10, 0, 0, 9]))
        );
        assert_eq!(
            encode("server-ip-address", "10.0.0.9"),
            Ok(Extra::NextServer(Ipv4Addr::new(10, 0, 0, 9)))
        );
        assert_eq!(
            encode(
                "classless-static-route",
                "169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.1"
            ),
            Ok(Extra::Option(
                121,
                vec![32, 169, 254, 169, 254, 10, 0, 0, 2, 0, 10, 0, 0, 1]
            ))
        );
        // A number this table knows takes its kind; one it does not, a guess from the value.
        assert_eq!(encode("26", "9000"), Ok(Extra::Option(26, vec![0x23, 0x28])));
        assert_eq!(encode("200", "10.0.0.1"), Ok(Extra::Option(200, vec![10, 0, 0, 1])));
        assert_eq!(encode("200", "01:ff"), Ok(Extra::Option(200, vec![1, 255])));
        assert_eq!(encode("200", "hello"), Ok(Extra::Option(200, b"hello".to_vec())));
    }

    #[test]
    fn dhcpv6_dns_servers() {
        assert!(is_dns_server_v6("dns-server") && is_dns_server_v6("option6:dns-server") && is_dns_server_v6("23"));
        assert!(!is_dns_server_v6("domain-search"));
        let want: Vec<std::net::Ipv6Addr> = vec!["2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap()];
        assert_eq!(dns_servers_v6("[2001:db8::1],[2001:db8::2]"), Some(want.clone()));
        assert_eq!(dns_servers_v6("2001:db8::1, 2001:db8::2"), Some(want));
        assert_eq!(dns_servers_v6("10.0.0.1"), None);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(encode("mtu", "big").is_err());
        assert!(encode("mtu", "70000").is_err());
        assert!(encode("router", "10.0.0").is_err());
        assert!(encode("classless-static-route", "10.0.0.0/8").is_err());
        assert!(encode("classless-static-route", "10.0.0.0/33,10.0.0.1").is_err());
        assert!(encode("server-ip-address", "x").is_err());
        assert!(encode("bootfile-name", "").is_err());
        assert!(encode("nonsense", "1").is_err());
    }
}
