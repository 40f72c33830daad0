//! The one list of Neutron resources: routes, the API index, tags and list handling find a
//! collection here.

use super::networks::Networks;
use super::ports::Ports;
use super::resource::Resource;
use super::routers::Routers;
use super::security_groups::{SecurityGroupRules, SecurityGroups};
use super::subnets::Subnets;

static RESOURCES: &[&dyn Resource] = &[
    &Networks,
    &Subnets,
    &Ports,
    &Routers,
    &SecurityGroups,
    &SecurityGroupRules,
];

/// Every resource, in the order the API index lists them.
pub fn all() -> &'static [&'static dyn Resource] {
    RESOURCES
}

/// The resource served at `/v2.0/<collection>`.
pub fn find(collection: &str) -> Option<&'static dyn Resource> {
    RESOURCES.iter().copied().find(|r| r.meta().collection == collection)
}
