//! Bandwidth limits on port devices as data, and the changes between what the kernel has
//! and what is wanted (pure; no view types, so the kernel backends use it: the view side is
//! the `qos` module).
//!
//! Directions are Neutron's, seen from the workload: `egress` is what it sends, `ingress` what
//! it receives. On the host-side device (veth host end or tap) the workload's traffic arrives
//! as the device's ingress: this kernel has no police action, so it is redirected to an IFB
//! device (`ifq<port>`) whose root qdisc is a token bucket. Traffic to the workload leaves by
//! the device's egress, shaped by a token bucket as its root qdisc.

use crate::names;
use std::collections::{BTreeMap, BTreeSet};

/// A token bucket: rate and bucket size, both in bytes (the kernel's units).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rate {
    pub bytes_per_sec: u64,
    pub burst_bytes: u64,
}

/// Neutron's default burst when a rule gives none: 80 % of a second at the rate.
const DEFAULT_BURST_PERCENT: u64 = 80;
/// A bucket must hold a few full frames, or nothing passes smoothly.
const MIN_BURST_BYTES: u64 = 16_000;

impl Rate {
    /// The bucket for a rule: `max_kbps` (kbit/s, 1000 bit) with `max_burst_kbps` (kbit; 0
    /// for Neutron's default). `None` for 0: no limit.
    pub fn from_rule(max_kbps: u64, max_burst_kbps: u64) -> Option<Rate> {
        if max_kbps == 0 {
            return None;
        }
        let burst_kbit = if max_burst_kbps == 0 {
            max_kbps.saturating_mul(DEFAULT_BURST_PERCENT) / 100
        } else {
            max_burst_kbps
        };
        Some(Rate {
            bytes_per_sec: max_kbps.saturating_mul(125),
            burst_bytes: burst_kbit.saturating_mul(125).max(MIN_BURST_BYTES),
        })
    }

    /// Whether what the kernel reports is this bucket: the kernel keeps the burst as a time
    /// at the rate, so it reads back rounded.
    pub fn matches(&self, seen: &Rate) -> bool {
        self.bytes_per_sec == seen.bytes_per_sec && self.burst_bytes.abs_diff(seen.burst_bytes) * 50 <= self.burst_bytes
    }
}

/// The limits on one port device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortLimits {
    /// What the workload receives (Neutron `ingress`): root token bucket on the device.
    pub to_port: Option<Rate>,
    /// What the workload sends (Neutron `egress`): via the port's IFB device.
    pub from_port: Option<Rate>,
}

/// Every local port device with its limits (none for ports without a policy, so that limits
/// left from an earlier policy are taken off).
pub type Desired = BTreeMap<String, PortLimits>;

/// What the kernel has: limits of the port devices that exist, and our IFB devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub ports: BTreeMap<String, PortLimits>,
    pub ifbs: BTreeSet<String>,
}

/// The IFB device that carries port device `dev`'s incoming traffic through its bucket.
pub fn ifb_of(dev: &str) -> String {
    let rest = dev.strip_prefix(names::TAP_PREFIX).unwrap_or(dev);
    let mut name = format!("{}{rest}", names::IFB_PREFIX);
    name.truncate(15);
    name
}

/// One change to the node's shaping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QosAction {
    /// Root token bucket on `dev` (replacing what is there).
    LimitToPort { dev: String, rate: Rate },
    /// `dev`'s root qdisc back to the default.
    UnlimitToPort { dev: String },
    /// IFB `ifb` with a token bucket, and `dev`'s incoming traffic redirected through it.
    LimitFromPort { dev: String, ifb: String, rate: Rate },
    /// `dev`'s incoming traffic no longer redirected.
    UnlimitFromPort { dev: String },
    /// An IFB device nothing needs any more.
    DeleteIfb { ifb: String },
}

/// The changes that take `seen` to `want`. Devices not there yet are left for a later pass
/// (the port controller makes them); only the parts that differ change.
pub fn plan(seen: &Observed, want: &Desired) -> Vec<QosAction> {
    let mut out = vec![];
    for (dev, w) in want {
        let Some(s) = seen.ports.get(dev) else { continue };
        match (w.to_port, s.to_port) {
            (Some(r), Some(h)) if r.matches(&h) => {}
            (Some(rate), _) => out.push(QosAction::LimitToPort { dev: dev.clone(), rate }),
            (None, Some(_)) => out.push(QosAction::UnlimitToPort { dev: dev.clone() }),
            (None, None) => {}
        }
        match (w.from_port, s.from_port) {
            (Some(r), Some(h)) if r.matches(&h) && seen.ifbs.contains(&ifb_of(dev)) => {}
            (Some(rate), _) => out.push(QosAction::LimitFromPort {
                dev: dev.clone(),
                ifb: ifb_of(dev),
                rate,
            }),
            (None, Some(_)) => out.push(QosAction::UnlimitFromPort { dev: dev.clone() }),
            (None, None) => {}
        }
    }
    // Observed devices no longer local keep nothing of ours (a port moved away while its
    // device lingers).
    for (dev, s) in &seen.ports {
        if want.contains_key(dev) {
            continue;
        }
        if s.to_port.is_some() {
            out.push(QosAction::UnlimitToPort { dev: dev.clone() });
        }
        if s.from_port.is_some() {
            out.push(QosAction::UnlimitFromPort { dev: dev.clone() });
        }
    }
    let needed: BTreeSet<String> = want
        .iter()
        .filter(|(_, l)| l.from_port.is_some())
        .map(|(d, _)| ifb_of(d))
        .collect();
    for ifb in seen.ifbs.difference(&needed) {
        out.push(QosAction::DeleteIfb { ifb: ifb.clone() });
    }
    out
}

/// What `a` leaves behind when applied to `seen` (the model the fake kernel and the plan's
/// property test share).
pub fn apply_to(seen: &mut Observed, a: &QosAction) {
    match a {
        QosAction::LimitToPort { dev, rate } => {
            if let Some(p) = seen.ports.get_mut(dev) {
                p.to_port = Some(*rate);
            }
        }
        QosAction::UnlimitToPort { dev } => {
            if let Some(p) = seen.ports.get_mut(dev) {
                p.to_port = None;
            }
        }
        QosAction::LimitFromPort { dev, ifb, rate } => {
            if let Some(p) = seen.ports.get_mut(dev) {
                p.from_port = Some(*rate);
                seen.ifbs.insert(ifb.clone());
            }
        }
        QosAction::UnlimitFromPort { dev } => {
            if let Some(p) = seen.ports.get_mut(dev) {
                p.from_port = None;
            }
        }
        QosAction::DeleteIfb { ifb } => {
            seen.ifbs.remove(ifb);
            // The redirect into it goes with it.
            for (dev, p) in seen.ports.iter_mut() {
                if ifb_of(dev) == *ifb {
                    p.from_port = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rate() -> impl Strategy<Value = Option<Rate>> {
        prop::option::of((1u64..4, 0u64..3).prop_map(|(k, b)| Rate::from_rule(k * 10_000, b * 1_000).unwrap()))
    }

    fn limits() -> impl Strategy<Value = PortLimits> {
        (rate(), rate()).prop_map(|(to_port, from_port)| PortLimits { to_port, from_port })
    }

    fn dev(i: u8) -> String {
        format!("tap{i:011}")
    }

    #[test]
    fn rules_become_buckets() {
        let r = Rate::from_rule(20_000, 0).unwrap();
        assert_eq!(r.bytes_per_sec, 2_500_000);
        assert_eq!(r.burst_bytes, 2_000_000);
        assert_eq!(Rate::from_rule(20_000, 400).unwrap().burst_bytes, 50_000);
        assert_eq!(Rate::from_rule(1_000, 8).unwrap().burst_bytes, MIN_BURST_BYTES);
        assert!(Rate::from_rule(0, 100).is_none());
        // Read back rounded: the same bucket.
        let seen = Rate {
            bytes_per_sec: 2_500_000,
            burst_bytes: 49_999,
        };
        assert!(Rate::from_rule(20_000, 400).unwrap().matches(&seen));
        assert_eq!(ifb_of("tap0123456789a"), "ifq0123456789a");
    }

    proptest! {
        /// Applying the plan reaches the desired limits on every device that exists, leaves
        /// exactly the IFBs they need, and a second plan is empty.
        #[test]
        fn plan_converges_and_then_plans_nothing(
            have in prop::collection::btree_map(0u8..6, limits(), 0..6),
            want in prop::collection::btree_map(0u8..6, limits(), 0..6),
            stray in prop::collection::btree_set(0u8..8, 0..3),
        ) {
            let mut seen = Observed::default();
            for (i, l) in &have {
                seen.ports.insert(dev(*i), *l);
                if l.from_port.is_some() {
                    seen.ifbs.insert(ifb_of(&dev(*i)));
                }
            }
            seen.ifbs.extend(stray.iter().map(|i| ifb_of(&dev(*i))));
            let want: Desired = want.into_iter().map(|(i, l)| (dev(i), l)).collect();
            for a in plan(&seen, &want) {
                apply_to(&mut seen, &a);
            }
            for (d, l) in &seen.ports {
                let w = want.get(d).copied().unwrap_or_default();
                prop_assert_eq!(l.to_port.is_some(), w.to_port.is_some());
                prop_assert_eq!(l.from_port.is_some(), w.from_port.is_some());
                if let (Some(a), Some(b)) = (w.to_port, l.to_port) { prop_assert!(a.matches(&b)); }
                if let (Some(a), Some(b)) = (w.from_port, l.from_port) { prop_assert!(a.matches(&b)); }
            }
            let needed: BTreeSet<String> = want.iter()
                .filter(|(d, l)| l.from_port.is_some() && seen.ports.contains_key(*d))
                .map(|(d, _)| ifb_of(d)).collect();
            let allowed: BTreeSet<String> = want.iter()
                .filter(|(_, l)| l.from_port.is_some())
                .map(|(d, _)| ifb_of(d)).collect();
            prop_assert!(seen.ifbs.is_subset(&allowed));
            prop_assert!(needed.is_subset(&seen.ifbs));
            prop_assert_eq!(plan(&seen, &want), vec![]);
        }
    }
}
