//! Stored resources and their Neutron API rendering.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Attributes every Neutron resource carries (the `standard-attr-*` extensions).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct StandardAttrs {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
    pub revision_number: u64,
}

impl StandardAttrs {
    pub fn new(now: &str) -> Self {
        Self {
            description: String::new(),
            tags: vec![],
            created_at: now.to_string(),
            updated_at: now.to_string(),
            revision_number: 0,
        }
    }
    /// Records one more change to the resource.
    pub fn bump(&mut self, now: &str) {
        self.revision_number += 1;
        self.updated_at = now.to_string();
    }
    fn render(&self, out: &mut serde_json::Map<String, Value>) {
        out.insert("description".into(), json!(self.description));
        out.insert("tags".into(), json!(self.tags));
        out.insert("created_at".into(), json!(self.created_at));
        out.insert("updated_at".into(), json!(self.updated_at));
        out.insert("revision_number".into(), json!(self.revision_number));
    }
}

/// The attributes every project-owned resource starts with (`tenant_id` is the old name).
fn owned(id: &str, name: &str, project_id: &str) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("id".into(), json!(id));
    m.insert("name".into(), json!(name));
    m.insert("project_id".into(), json!(project_id));
    m.insert("tenant_id".into(), json!(project_id));
    m
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Network {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub admin_state_up: bool,
    pub shared: bool,
    pub external: bool,
    /// `vxlan` (the default: an overlay segment with `segmentation_id` as its VNI) or `flat`
    /// (a provider network on `physical_network`, mapped on each node to a host bridge).
    #[serde(default = "vxlan")]
    pub network_type: String,
    #[serde(default)]
    pub physical_network: Option<String>,
    pub mtu: u32,
    pub status: String,
    pub segmentation_id: u32,
    pub port_security_enabled: bool,
    #[serde(default)]
    pub subnets: Vec<String>,
    /// The `dns-integration` domain (an FQDN with its trailing dot, or empty).
    #[serde(default)]
    pub dns_domain: String,
    /// The network's QoS policy (`qos` extension): applies to its ports that have none.
    #[serde(default)]
    pub qos_policy_id: Option<String>,
    /// Set while a delete checks for ports; creates that read the network before fail their CAS.
    #[serde(default)]
    pub deleting: bool,
    #[serde(flatten)]
    pub std: StandardAttrs,
}

impl Network {
    /// The API view. Provider attributes only for admins.
    pub fn to_api(&self, admin: bool) -> Value {
        let mut m = owned(&self.id, &self.name, &self.project_id);
        m.insert("admin_state_up".into(), json!(self.admin_state_up));
        m.insert("shared".into(), json!(self.shared));
        m.insert("router:external".into(), json!(self.external));
        m.insert("mtu".into(), json!(self.mtu));
        m.insert("status".into(), json!(self.status));
        m.insert("subnets".into(), json!(self.subnets));
        m.insert("port_security_enabled".into(), json!(self.port_security_enabled));
        m.insert("availability_zone_hints".into(), json!([]));
        m.insert("availability_zones".into(), json!([]));
        m.insert("ipv4_address_scope".into(), Value::Null);
        m.insert("ipv6_address_scope".into(), Value::Null);
        m.insert("is_default".into(), json!(false));
        m.insert("dns_domain".into(), json!(self.dns_domain));
        m.insert("qos_policy_id".into(), json!(self.qos_policy_id));
        if admin {
            m.insert("provider:network_type".into(), json!(self.network_type));
            if self.network_type == "flat" {
                m.insert("provider:segmentation_id".into(), Value::Null);
            } else {
                m.insert("provider:segmentation_id".into(), json!(self.segmentation_id));
            }
            m.insert("provider:physical_network".into(), json!(self.physical_network));
        }
        self.std.render(&mut m);
        Value::Object(m)
    }
}

fn vxlan() -> String {
    "vxlan".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AllocationPool {
    pub start: String,
    pub end: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRoute {
    pub destination: String,
    pub nexthop: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Subnet {
    pub id: String,
    pub project_id: String,
    pub network_id: String,
    pub name: String,
    pub ip_version: u8,
    pub cidr: String,
    pub gateway_ip: Option<String>,
    pub allocation_pools: Vec<AllocationPool>,
    pub host_routes: Vec<HostRoute>,
    pub dns_nameservers: Vec<String>,
    pub enable_dhcp: bool,
    pub ipv6_ra_mode: Option<String>,
    pub ipv6_address_mode: Option<String>,
    /// The subnet pool its CIDR was allocated from.
    #[serde(default)]
    pub subnetpool_id: Option<String>,
    #[serde(default)]
    pub deleting: bool,
    #[serde(flatten)]
    pub std: StandardAttrs,
}

impl Subnet {
    pub fn to_api(&self) -> Value {
        let mut m = owned(&self.id, &self.name, &self.project_id);
        m.insert("network_id".into(), json!(self.network_id));
        m.insert("ip_version".into(), json!(self.ip_version));
        m.insert("cidr".into(), json!(self.cidr));
        m.insert("gateway_ip".into(), json!(self.gateway_ip));
        m.insert("allocation_pools".into(), json!(self.allocation_pools));
        m.insert("host_routes".into(), json!(self.host_routes));
        m.insert("dns_nameservers".into(), json!(self.dns_nameservers));
        m.insert("enable_dhcp".into(), json!(self.enable_dhcp));
        m.insert("ipv6_ra_mode".into(), json!(self.ipv6_ra_mode));
        m.insert("ipv6_address_mode".into(), json!(self.ipv6_address_mode));
        m.insert("subnetpool_id".into(), json!(self.subnetpool_id));
        m.insert("service_types".into(), json!([]));
        m.insert("segment_id".into(), Value::Null);
        self.std.render(&mut m);
        Value::Object(m)
    }
}

/// A subnet pool (`subnet_allocation`): prefixes subnets are cut from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubnetPool {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub ip_version: u8,
    /// Compacted CIDRs.
    pub prefixes: Vec<String>,
    pub default_prefixlen: u8,
    pub min_prefixlen: u8,
    pub max_prefixlen: u8,
    /// Per-project limit in quota units (addresses for IPv4, /64s for IPv6).
    pub default_quota: Option<u64>,
    pub shared: bool,
    pub is_default: bool,
    pub address_scope_id: Option<String>,
    #[serde(flatten)]
    pub std: StandardAttrs,
}

impl SubnetPool {
    pub fn to_api(&self) -> Value {
        let mut m = owned(&self.id, &self.name, &self.project_id);
        m.insert("ip_version".into(), json!(self.ip_version));
        m.insert("prefixes".into(), json!(self.prefixes));
        m.insert("default_prefixlen".into(), json!(self.default_prefixlen));
        m.insert("min_prefixlen".into(), json!(self.min_prefixlen));
        m.insert("max_prefixlen".into(), json!(self.max_prefixlen));
        m.insert("default_quota".into(), json!(self.default_quota));
        m.insert("shared".into(), json!(self.shared));
        m.insert("is_default".into(), json!(self.is_default));
        m.insert("address_scope_id".into(), json!(self.address_scope_id));
        self.std.render(&mut m);
        Value::Object(m)
    }
}

/// An address scope: subnet pools in one scope never overlap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AddressScope {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub ip_version: u8,
    pub shared: bool,
    #[serde(flatten)]
    pub std: StandardAttrs,
}

impl AddressScope {
    pub fn to_api(&self) -> Value {
        let mut m = owned(&self.id, &self.name, &self.project_id);
        m.insert("ip_version".into(), json!(self.ip_version));
        m.insert("shared".into(), json!(self.shared));
        self.std.render(&mut m);
        // Neutron's address scopes take no tags.
        m.remove("tags");
        Value::Object(m)
    }
}

/// What a subnet pool's allocation index key holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolAllocation {
    pub subnet_id: String,
    pub project_id: String,
    pub cidr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FixedIp {
    pub subnet_id: String,
    pub ip_address: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddressPair {
    pub ip_address: String,
    pub mac_address: String,
}

/// One of a port's `extra_dhcp_opts`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExtraDhcpOpt {
    pub opt_name: String,
    pub opt_value: String,
    pub ip_version: u8,
}

/// The domain Neutron's `dns_assignment` uses when none is configured.
pub const DEFAULT_DNS_DOMAIN: &str = "openstacklocal.";

/// A port's host name for `ip`: its `dns_name`, else `host-` and the address with dashes.
pub fn dns_hostname(dns_name: &str, ip: &str) -> String {
    if dns_name.is_empty() {
        format!("host-{}", ip.replace(['.', ':'], "-"))
    } else {
        dns_name.trim_end_matches('.').to_string()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Port {
    pub id: String,
    pub project_id: String,
    pub network_id: String,
    pub name: String,
    pub admin_state_up: bool,
    pub mac_address: String,
    pub fixed_ips: Vec<FixedIp>,
    pub device_id: String,
    pub device_owner: String,
    pub status: String,
    pub binding_host_id: String,
    pub binding_vif_type: String,
    pub binding_vif_details: Value,
    pub binding_profile: Value,
    pub binding_vnic_type: String,
    pub allowed_address_pairs: Vec<AddressPair>,
    pub port_security_enabled: bool,
    pub security_groups: Vec<String>,
    #[serde(default)]
    pub extra_dhcp_opts: Vec<ExtraDhcpOpt>,
    /// The `dns-integration` name (a label or an FQDN), or empty.
    #[serde(default)]
    pub dns_name: String,
    /// The port's own QoS policy; it wins over its network's.
    #[serde(default)]
    pub qos_policy_id: Option<String>,
    /// Set while the port is a trunk's subport: the parent and VLAN its node wires it on.
    /// Not rendered by the Neutron API; node views carry it (`isthmus:subport`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subport_of: Option<SubportOf>,
    #[serde(flatten)]
    pub std: StandardAttrs,
}

/// Where a subport rides: its trunk's parent port and its VLAN id there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubportOf {
    pub trunk_id: String,
    pub parent_port_id: String,
    pub segmentation_id: u32,
}

impl Port {
    /// Neutron's `dns_assignment`: one entry per fixed IP.
    pub fn dns_assignment(&self) -> Value {
        let entries: Vec<Value> = self
            .fixed_ips
            .iter()
            .map(|f| {
                let hostname = dns_hostname(&self.dns_name, &f.ip_address);
                let fqdn = if self.dns_name.ends_with('.') {
                    self.dns_name.clone()
                } else {
                    format!("{hostname}.{DEFAULT_DNS_DOMAIN}")
                };
                json!({"hostname": hostname, "ip_address": f.ip_address, "fqdn": fqdn})
            })
            .collect();
        Value::Array(entries)
    }

    /// The API view. Binding attributes only for admins (Neutron's default policy).
    pub fn to_api(&self, admin: bool) -> Value {
        let mut m = owned(&self.id, &self.name, &self.project_id);
        m.insert("network_id".into(), json!(self.network_id));
        m.insert("admin_state_up".into(), json!(self.admin_state_up));
        m.insert("mac_address".into(), json!(self.mac_address));
        m.insert("fixed_ips".into(), json!(self.fixed_ips));
        m.insert("device_id".into(), json!(self.device_id));
        m.insert("device_owner".into(), json!(self.device_owner));
        m.insert("status".into(), json!(self.status));
        m.insert("allowed_address_pairs".into(), json!(self.allowed_address_pairs));
        m.insert("port_security_enabled".into(), json!(self.port_security_enabled));
        m.insert("security_groups".into(), json!(self.security_groups));
        m.insert("extra_dhcp_opts".into(), json!(self.extra_dhcp_opts));
        m.insert("dns_name".into(), json!(self.dns_name));
        m.insert("dns_assignment".into(), self.dns_assignment());
        m.insert("qos_policy_id".into(), json!(self.qos_policy_id));
        m.insert("binding:vnic_type".into(), json!(self.binding_vnic_type));
        if admin {
            m.insert("binding:host_id".into(), json!(self.binding_host_id));
            m.insert("binding:vif_type".into(), json!(self.binding_vif_type));
            m.insert("binding:vif_details".into(), self.binding_vif_details.clone());
            m.insert("binding:profile".into(), self.binding_profile.clone());
        }
        self.std.render(&mut m);
        Value::Object(m)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SecurityGroup {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub stateful: bool,
    #[serde(flatten)]
    pub std: StandardAttrs,
}

impl SecurityGroup {
    /// The API view; rules are passed in because they are stored separately.
    pub fn to_api(&self, rules: Vec<Value>) -> Value {
        let mut m = owned(&self.id, &self.name, &self.project_id);
        m.insert("stateful".into(), json!(self.stateful));
        m.insert("security_group_rules".into(), Value::Array(rules));
        self.std.render(&mut m);
        Value::Object(m)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SecurityGroupRule {
    pub id: String,
    pub project_id: String,
    pub security_group_id: String,
    pub direction: String,
    pub ethertype: String,
    pub protocol: Option<String>,
    pub port_range_min: Option<u32>,
    pub port_range_max: Option<u32>,
    pub remote_ip_prefix: Option<String>,
    pub remote_group_id: Option<String>,
    #[serde(flatten)]
    pub std: StandardAttrs,
}

impl SecurityGroupRule {
    pub fn to_api(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("project_id".into(), json!(self.project_id));
        m.insert("tenant_id".into(), json!(self.project_id));
        m.insert("security_group_id".into(), json!(self.security_group_id));
        m.insert("direction".into(), json!(self.direction));
        m.insert("ethertype".into(), json!(self.ethertype));
        m.insert("protocol".into(), json!(self.protocol));
        m.insert("port_range_min".into(), json!(self.port_range_min));
        m.insert("port_range_max".into(), json!(self.port_range_max));
        m.insert("remote_ip_prefix".into(), json!(self.remote_ip_prefix));
        m.insert("remote_group_id".into(), json!(self.remote_group_id));
        m.insert("remote_address_group_id".into(), Value::Null);
        m.insert("normalized_cidr".into(), json!(self.remote_ip_prefix));
        m.insert("belongs_to_default_sg".into(), Value::Null);
        self.std.render(&mut m);
        // Rules have no tags in Neutron's API.
        m.remove("tags");
        Value::Object(m)
    }

    /// Fields that make two rules "the same rule" (SecurityGroupRuleExists).
    pub fn identity(&self) -> impl PartialEq + '_ {
        (
            &self.security_group_id,
            &self.direction,
            &self.ethertype,
            &self.protocol,
            self.port_range_min,
            self.port_range_max,
            &self.remote_ip_prefix,
            &self.remote_group_id,
        )
    }
}

/// A QoS policy (`qos`). Its rules are stored inside it: a rule change is a change of the
/// policy, so one transaction settles "one rule per type and direction".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QosPolicy {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub shared: bool,
    /// The project's default policy (`qos-default`), given to its new networks.
    pub is_default: bool,
    #[serde(default)]
    pub bandwidth_limit_rules: Vec<BandwidthLimitRule>,
    /// Set while a delete checks for users; attaching it then fails its compare.
    #[serde(default)]
    pub deleting: bool,
    #[serde(flatten)]
    pub std: StandardAttrs,
}

/// A bandwidth limit rule (`qos-bw-limit-direction`): `egress` is what the port's workload
/// sends, `ingress` what it receives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BandwidthLimitRule {
    pub id: String,
    pub max_kbps: u64,
    pub max_burst_kbps: u64,
    pub direction: String,
}

impl BandwidthLimitRule {
    pub fn to_api(&self, policy_id: &str) -> Value {
        json!({
            "id": self.id,
            "qos_policy_id": policy_id,
            "max_kbps": self.max_kbps,
            "max_burst_kbps": self.max_burst_kbps,
            "direction": self.direction,
            "type": "bandwidth_limit",
        })
    }
}

impl QosPolicy {
    pub fn to_api(&self) -> Value {
        let mut m = owned(&self.id, &self.name, &self.project_id);
        m.insert("shared".into(), json!(self.shared));
        m.insert("is_default".into(), json!(self.is_default));
        let rules: Vec<Value> = self.bandwidth_limit_rules.iter().map(|r| r.to_api(&self.id)).collect();
        m.insert("rules".into(), Value::Array(rules));
        self.std.render(&mut m);
        Value::Object(m)
    }
}

/// A router. Interfaces are ports it owns (`network:router_interface*`); the gateway is a
/// port on an external network (`network:router_gateway`), copied here with its addresses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Router {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub admin_state_up: bool,
    pub status: String,
    #[serde(default)]
    pub gateway: Option<RouterGateway>,
    /// Static routes (`extraroute`).
    #[serde(default)]
    pub routes: Vec<HostRoute>,
    #[serde(flatten)]
    pub std: StandardAttrs,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouterGateway {
    pub network_id: String,
    pub enable_snat: bool,
    /// The gateway port (`device_owner` `network:router_gateway`, `device_id` the router).
    pub port_id: String,
    pub fixed_ips: Vec<FixedIp>,
}

/// A floating IP: an address on an external network, owned by its own port
/// (`network:floatingip`), translated to `fixed_ip_address` of `port_id` when associated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FloatingIp {
    pub id: String,
    pub project_id: String,
    pub floating_network_id: String,
    pub floating_ip_address: String,
    /// The port holding the floating address on the external network.
    pub floating_port_id: String,
    pub port_id: Option<String>,
    pub fixed_ip_address: Option<String>,
    /// The router that connects the associated port's subnet to the external network.
    pub router_id: Option<String>,
    pub status: String,
    #[serde(flatten)]
    pub std: StandardAttrs,
}

impl FloatingIp {
    pub fn to_api(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("project_id".into(), json!(self.project_id));
        m.insert("tenant_id".into(), json!(self.project_id));
        m.insert("floating_network_id".into(), json!(self.floating_network_id));
        m.insert("floating_ip_address".into(), json!(self.floating_ip_address));
        m.insert("port_id".into(), json!(self.port_id));
        m.insert("fixed_ip_address".into(), json!(self.fixed_ip_address));
        m.insert("router_id".into(), json!(self.router_id));
        m.insert("status".into(), json!(self.status));
        m.insert("port_details".into(), Value::Null);
        m.insert("port_forwardings".into(), json!([]));
        self.std.render(&mut m);
        Value::Object(m)
    }
}

impl Router {
    pub fn to_api(&self) -> Value {
        let mut m = owned(&self.id, &self.name, &self.project_id);
        m.insert("admin_state_up".into(), json!(self.admin_state_up));
        m.insert("status".into(), json!(self.status));
        m.insert(
            "external_gateway_info".into(),
            match &self.gateway {
                Some(g) => json!({
                    "network_id": g.network_id,
                    "enable_snat": g.enable_snat,
                    "external_fixed_ips": g.fixed_ips,
                }),
                None => Value::Null,
            },
        );
        m.insert("routes".into(), json!(self.routes));
        m.insert("availability_zone_hints".into(), json!([]));
        m.insert("availability_zones".into(), json!([]));
        m.insert("distributed".into(), json!(true));
        m.insert("ha".into(), json!(false));
        m.insert("flavor_id".into(), Value::Null);
        self.std.render(&mut m);
        Value::Object(m)
    }
}

/// A node running an agent: registered and kept alive by its heartbeats.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Node {
    /// Agent id (what the agents API calls `id`).
    pub id: String,
    /// The node's name; ports are bound to it through `binding:host_id`.
    pub host: String,
    pub underlay_ip: String,
    #[serde(default)]
    pub capabilities: Vec<String>,
    pub admin_state_up: bool,
    #[serde(default)]
    pub description: String,
    /// Seconds since the Unix epoch: registration, last agent start, last heartbeat.
    pub created_unix: i64,
    pub started_unix: i64,
    pub heartbeat_unix: i64,
    /// The view revision the node's agent last reported fully converged to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converged_revision: Option<i64>,
    /// Datapath changes the node's agent reported it could not make.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<String>,
}

/// Neutron's agent timestamps: `2026-11-22 03:44:17`.
fn agent_time(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil-from-days (proleptic Gregorian), so the model needs no clock crate.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// An RBAC policy (`rbac-policies`): `target_project` (a project id or `*`) may do `action`
/// with object `object_id` of type `object_type`, which belongs to `project_id`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RbacPolicy {
    pub id: String,
    pub project_id: String,
    pub object_type: String,
    pub object_id: String,
    pub action: String,
    pub target_project: String,
}

impl RbacPolicy {
    /// The API view; `target_tenant` is the name clients still use for `target_project`.
    pub fn to_api(&self) -> Value {
        json!({
            "id": self.id,
            "project_id": self.project_id,
            "tenant_id": self.project_id,
            "object_type": self.object_type,
            "object_id": self.object_id,
            "action": self.action,
            "target_project": self.target_project,
            "target_tenant": self.target_project,
        })
    }
}

impl Node {
    /// Alive while the last heartbeat is younger than `down_after` seconds.
    pub fn alive(&self, now_unix: i64, down_after: i64) -> bool {
        now_unix - self.heartbeat_unix < down_after
    }

    /// The Neutron agents-API view.
    pub fn to_api(&self, now_unix: i64, down_after: i64) -> Value {
        json!({
            "id": self.id,
            "agent_type": "Isthmus agent",
            "binary": "isthmus-agent",
            "host": self.host,
            "topic": "isthmus",
            "admin_state_up": self.admin_state_up,
            "alive": self.alive(now_unix, down_after),
            "availability_zone": Value::Null,
            "description": self.description,
            "configurations": {
                "underlay_ip": self.underlay_ip,
                "capabilities": self.capabilities,
                "converged_revision": self.converged_revision,
                "failures": self.failures,
            },
            "created_at": agent_time(self.created_unix),
            "started_at": agent_time(self.started_unix),
            "heartbeat_timestamp": agent_time(self.heartbeat_unix),
            "resources_synced": Value::Null,
        })
    }
}

#[cfg(test)]
mod node_tests {
    use super::*;

    #[test]
    fn agent_time_formats_civil_dates() {
        assert_eq!(agent_time(0), "1970-01-01 00:00:00");
        assert_eq!(agent_time(1_795_318_657), "2026-11-22 03:37:37");
        assert_eq!(agent_time(951_782_400), "2000-02-29 00:00:00");
    }

    #[test]
    fn liveness_follows_heartbeats() {
        let n = Node {
            id: "a".into(),
            host: "h".into(),
            underlay_ip: "192.0.2.1".into(),
            capabilities: vec![],
            admin_state_up: true,
            description: String::new(),
            created_unix: 900,
            started_unix: 900,
            heartbeat_unix: 1000,
            converged_revision: None,
            failures: vec![],
        };
        assert!(n.alive(1010, 30));
        assert!(!n.alive(1030, 30));
        assert_eq!(n.to_api(1010, 30)["alive"], json!(true));
    }
}

/// A trunk (`trunk`): a parent port whose untagged traffic is its own network's, and subports
/// each carried on a VLAN of the parent's device. Subports are stored inside the trunk, so
/// "one VLAN id per trunk" is settled by one transaction on the trunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trunk {
    pub id: String,
    pub project_id: String,
    pub name: String,
    pub admin_state_up: bool,
    /// The parent port.
    pub port_id: String,
    /// DOWN until the parent's node has wired the trunk; ACTIVE, DEGRADED or ERROR after.
    pub status: String,
    #[serde(default)]
    pub sub_ports: Vec<SubPort>,
    #[serde(flatten)]
    pub std: StandardAttrs,
}

/// One subport of a trunk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubPort {
    pub port_id: String,
    pub segmentation_type: String,
    pub segmentation_id: u32,
}

impl SubPort {
    pub fn to_api(&self) -> Value {
        json!({
            "port_id": self.port_id,
            "segmentation_type": self.segmentation_type,
            "segmentation_id": self.segmentation_id,
        })
    }
}

impl Trunk {
    pub fn to_api(&self) -> Value {
        let mut m = owned(&self.id, &self.name, &self.project_id);
        m.insert("admin_state_up".into(), json!(self.admin_state_up));
        m.insert("port_id".into(), json!(self.port_id));
        m.insert("status".into(), json!(self.status));
        m.insert(
            "sub_ports".into(),
            Value::Array(self.sub_ports.iter().map(SubPort::to_api).collect()),
        );
        self.std.render(&mut m);
        Value::Object(m)
    }
}
