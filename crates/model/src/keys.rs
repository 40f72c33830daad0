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
/// Held while a subnet has `cidr` from pool `pool_id`; value is a `PoolAllocation`.
pub fn pool_alloc(pool_id: &str, cidr: &str) -> String {
    format!("{ROOT}subnetpool_alloc/{pool_id}/{}", cidr.replace('/', "_"))
}
pub fn pool_alloc_prefix(pool_id: &str) -> String {
    format!("{ROOT}subnetpool_alloc/{pool_id}/")
}
/// Rewritten by every allocation from a pool and every change of its prefixes, so that
/// these serialize (two allocations of different sizes could otherwise overlap).
pub fn pool_guard(pool_id: &str) -> String {
    format!("{ROOT}subnetpool_guard/{pool_id}")
}
/// Held by the default subnet pool of an IP version; value is its id.
pub fn default_pool(ip_version: u8) -> String {
    format!("{ROOT}default_subnetpool/{ip_version}")
}
/// Rewritten by every change to the prefixes of pools in an address scope, so that the
/// no-overlap check within a scope holds across servers.
pub fn scope_guard(scope_id: &str) -> String {
    format!("{ROOT}address_scope_guard/{scope_id}")
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
/// Held while an RBAC policy grants `action` on an object to `target` (a project or `*`);
/// value is the policy id. One policy per (type, object, action, target).
pub fn rbac_grant(object_type: &str, object_id: &str, action: &str, target: &str) -> String {
    format!("{ROOT}rbac/{object_type}/{object_id}/{action}/{target}")
}
/// Held while port `port_id` is in a trunk, as its parent or a subport; value is the trunk
/// id. A port is in one trunk at most.
pub fn trunk_port(port_id: &str) -> String {
    format!("{ROOT}trunk_port/{port_id}")
}
/// A trunk credential (`nested` API): its record, holding the SHA-256 of its secret.
pub fn trunk_credential(id: &str) -> String {
    format!("{ROOT}trunk_credentials/{id}")
}
pub const TRUNK_CREDENTIAL_PREFIX: &str = "/isthmus/v1/trunk_credentials/";
/// Rewritten by every credential created for a trunk, deleted with the trunk: a trunk delete
/// that compares it sees every credential, and creates serialize against the per-trunk bound.
pub fn trunk_credential_guard(trunk_id: &str) -> String {
    format!("{ROOT}trunk_credential_guard/{trunk_id}")
}
/// A nested container's attachment on trunk `trunk_id`; value: its record (the port id).
pub fn nested_attachment(trunk_id: &str, container_id: &str, ifname: &str) -> String {
    format!("{ROOT}nested/{trunk_id}/{container_id}/{ifname}")
}
pub fn nested_attachment_prefix(trunk_id: &str) -> String {
    format!("{ROOT}nested/{trunk_id}/")
}
