//! QoS bandwidth limits of the node's ports from its view: what each local port device must
//! be limited to (its own policy, else its network's). The data, the plan and the device
//! layout are in [`crate::shaping`].

use crate::names;
use crate::objects::Objects;
pub use crate::shaping::{ifb_of, plan, Desired, Observed, PortLimits, QosAction, Rate};
use isthmus_wire::stream::ObjectValue;
use std::collections::BTreeMap;

/// The limits each local port's device must have, from the view.
pub fn desired(objects: &Objects, node: &str) -> Desired {
    let policies: BTreeMap<&str, &isthmus_wire::stream::QosPolicy> = objects
        .by_key
        .values()
        .filter_map(|o| match &o.value {
            ObjectValue::QosPolicy(p) if !p.id.is_empty() => Some((p.id.as_str(), p)),
            _ => None,
        })
        .collect();
    let mut out = Desired::new();
    for p in objects.ports() {
        if p.id.is_empty() || p.host_id != node || crate::objects::router_of(p).is_some() {
            continue;
        }
        let policy = p
            .qos_policy_id()
            .or_else(|| objects.network(&p.network_id).and_then(|n| n.qos_policy_id()))
            .and_then(|id| policies.get(id));
        let mut limits = PortLimits::default();
        for r in policy.into_iter().flat_map(|pol| &pol.rules) {
            if r.kind != "bandwidth_limit" {
                continue;
            }
            let rate = Rate::from_rule(r.max_kbps.unwrap_or(0), r.max_burst_kbps.unwrap_or(0));
            match r.direction.as_str() {
                "ingress" => limits.to_port = rate,
                // Neutron's default direction.
                _ => limits.from_port = rate,
            }
        }
        out.insert(names::tap(&p.id), limits);
    }
    out
}
