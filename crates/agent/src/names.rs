//! Kernel interface names. Linux allows 15 characters. Bridges and VXLAN devices carry the
//! agent's own prefixes so a restarted agent can recognise (adopt or remove) exactly what it
//! made and nothing else.

pub const BRIDGE_PREFIX: &str = "isbr-";
pub const VXLAN_PREFIX: &str = "isvx-";
/// Neutron's convention for a port's host-side device: `tap` + the first 11 characters of the id.
pub const TAP_PREFIX: &str = "tap";
/// IFB devices carrying a port's incoming traffic through its QoS limit (`qos`).
pub const IFB_PREFIX: &str = "ifq";
/// A subport's veth end outside the bridge ([`subport_peer`]).
pub const SUBPORT_PEER_PREFIX: &str = "tsp";

pub fn bridge(vni: u32) -> String {
    format!("{BRIDGE_PREFIX}{vni}")
}

pub fn vxlan(vni: u32) -> String {
    format!("{VXLAN_PREFIX}{vni}")
}

pub fn tap(port_id: &str) -> String {
    let short: String = port_id.chars().take(11).collect();
    format!("{TAP_PREFIX}{short}")
}

/// The unbridged end of a subport's veth pair (its bridged end is [`tap`] of the port): the
/// device the trunk's VLAN programs redirect the subport's frames to and from.
pub fn subport_peer(port_id: &str) -> String {
    let short: String = port_id.chars().take(11).collect();
    format!("{SUBPORT_PEER_PREFIX}{short}")
}

/// The [`subport_peer`] of the subport whose bridged end is `tap` (both are named after the
/// same port id).
pub fn subport_peer_of_tap(tap: &str) -> String {
    format!("{SUBPORT_PEER_PREFIX}{}", tap.strip_prefix(TAP_PREFIX).unwrap_or(tap))
}

/// The VNI of one of our bridge or VXLAN devices, if `name` is one.
pub fn vni_of(name: &str) -> Option<u32> {
    name.strip_prefix(BRIDGE_PREFIX)
        .or_else(|| name.strip_prefix(VXLAN_PREFIX))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit() {
        assert!(bridge(16_777_215).len() <= 15);
        assert!(vxlan(16_777_215).len() <= 15);
        assert_eq!(tap("0123456789abcdef-xyz"), "tap0123456789a");
        assert!(tap("0123456789abcdef").len() <= 15);
    }

    #[test]
    fn recognises_only_its_own_devices() {
        assert_eq!(vni_of("isbr-42"), Some(42));
        assert_eq!(vni_of("isvx-1000"), Some(1000));
        assert_eq!(vni_of("br0"), None);
        assert_eq!(vni_of("isbr-x"), None);
    }
}
