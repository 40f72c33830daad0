//! The one list of Neutron resources: routes, the API index, tags and list handling find a
//! collection here.

use super::address_scopes::AddressScopes;
use super::floatingips::FloatingIps;
use super::networks::Networks;
use super::ports::Ports;
use super::rbac_policies::RbacPolicies;
use super::resource::Resource;
use super::routers::Routers;
use super::security_groups::{SecurityGroupRules, SecurityGroups};
use super::subnetpools::SubnetPools;
use super::subnets::Subnets;
use super::trunks::Trunks;

static RESOURCES: &[&dyn Resource] = &[
    &Networks,
    &Subnets,
    &SubnetPools,
    &AddressScopes,
    &Ports,
    &Routers,
    &FloatingIps,
    &SecurityGroups,
    &SecurityGroupRules,
    &RbacPolicies,
    &Trunks,
];

/// Every resource, in the order the API index lists them.
pub fn all() -> &'static [&'static dyn Resource] {
    RESOURCES
}

/// The resource served at `/v2.0/<collection>`.
pub fn find(collection: &str) -> Option<&'static dyn Resource> {
    RESOURCES.iter().copied().find(|r| r.meta().collection == collection)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_unique_and_found() {
        let mut seen = HashSet::new();
        for r in all() {
            let m = r.meta();
            assert!(seen.insert(m.collection), "{} twice", m.collection);
            assert!(std::ptr::eq(find(m.collection).map(|f| f.meta()).unwrap(), m));
            assert_eq!(m.plural.replace('_', "-"), m.collection);
        }
        assert!(find("floatingip").is_none());
    }

    #[test]
    fn index_and_tags_are_as_neutron_lists_them() {
        let indexed: Vec<&str> = all()
            .iter()
            .map(|r| r.meta())
            .filter(|m| m.indexed)
            .map(|m| m.collection)
            .collect();
        assert_eq!(
            indexed,
            [
                "networks",
                "subnets",
                "subnetpools",
                "address-scopes",
                "ports",
                "security-groups",
                "security-group-rules",
                "rbac-policies"
            ]
        );
        let untagged: Vec<&str> = all()
            .iter()
            .map(|r| r.meta())
            .filter(|m| !m.tags)
            .map(|m| m.collection)
            .collect();
        assert_eq!(untagged, ["address-scopes", "security-group-rules", "rbac-policies"]);
        let no_bulk: Vec<&str> = all()
            .iter()
            .map(|r| r.meta())
            .filter(|m| !m.bulk)
            .map(|m| m.collection)
            .collect();
        assert_eq!(no_bulk, ["routers", "floatingips"]);
        let quotas: Vec<&str> = all().iter().filter_map(|r| r.meta().quota).collect();
        assert_eq!(
            quotas,
            [
                "network",
                "subnet",
                "subnetpool",
                "port",
                "router",
                "floatingip",
                "security_group",
                "security_group_rule",
                "rbac_policy"
            ]
        );
    }
}
