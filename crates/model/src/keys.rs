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
/// A project's quota limits that differ from the defaults (JSON object: resource → limit).
pub fn quota(project_id: &str) -> String {
    format!("{ROOT}quotas/{project_id}")
}
pub const QUOTA_PREFIX: &str = "/isthmus/v1/quotas/";
/// Rewritten by every create of `resource` in a project under a finite limit, and by quota
/// changes: its revision orders those writes, so two creates counted against the same usage
/// cannot both commit.
pub fn quota_guard(project_id: &str, resource: &str) -> String {
    format!("{ROOT}quota_guard/{project_id}/{resource}")
}
