//! Store key layout. One place so every component agrees on it.

pub const ROOT: &str = "/isthmus/v1/";

pub fn collection(kind: &str) -> String {
    format!("{ROOT}{kind}/")
}
pub fn resource(kind: &str, id: &str) -> String {
    format!("{ROOT}{kind}/{id}")
}
/// Held while an IP is allocated; value is the owning port id. Guarantees uniqueness per subnet.
pub fn ip_alloc(subnet_id: &str, ip: &str) -> String {
    format!("{ROOT}ipam/{subnet_id}/{ip}")
}
pub fn ip_alloc_prefix(subnet_id: &str) -> String {
    format!("{ROOT}ipam/{subnet_id}/")
}
/// Held while a MAC is used on a network; value is the owning port id.
pub fn mac_alloc(network_id: &str, mac: &str) -> String {
    format!("{ROOT}macs/{network_id}/{mac}")
}
/// Held while a segmentation id is used; value is the network id.
pub fn vni_alloc(vni: u32) -> String {
    format!("{ROOT}vni/{vni}")
}
pub const VNI_PREFIX: &str = "/isthmus/v1/vni/";
/// Held while a physical network carries a flat network; value is the network id.
pub fn flat_alloc(physical_network: &str) -> String {
    format!("{ROOT}flat/{physical_network}")
}
/// Held while a floating IP is associated with `fixed_ip` of port `port_id`; value is the
/// floating IP's id. One floating IP per (port, fixed address).
pub fn fip_assoc(port_id: &str, fixed_ip: &str) -> String {
    format!("{ROOT}fip_assoc/{port_id}/{fixed_ip}")
}
/// Held while an RBAC policy grants `action` on an object to `target` (a project or `*`);
/// value is the policy id. One policy per (type, object, action, target).
pub fn rbac_grant(object_type: &str, object_id: &str, action: &str, target: &str) -> String {
    format!("{ROOT}rbac/{object_type}/{object_id}/{action}/{target}")
}
