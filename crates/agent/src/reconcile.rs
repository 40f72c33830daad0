//! Applying plans: one full pass (observe, plan, apply) over a whole [`Kernel`], and the
//! appliers the controllers share.

use crate::desired::Datapath;
use crate::kernel::{Kernel, KernelError, Links};
use crate::plan::{plan, Action};
use std::future::Future;
use tracing::{debug, info, warn};

/// What one pass did. A failed action does not stop the pass (later actions may not depend on
/// it); the next pass plans it again from what the kernel then has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Actions the plan contained.
    pub planned: usize,
    /// Actions that succeeded.
    pub applied: usize,
    pub failed: Vec<Failure>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub action: Action,
    pub error: String,
}

impl Report {
    /// Nothing failed.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }

    fn record(&mut self, action: &Action, result: Result<(), KernelError>) {
        match result {
            Ok(()) => {
                debug!(?action, "applied");
                self.applied += 1;
            }
            Err(e) => {
                warn!(?action, error = %e, "action failed");
                self.failed.push(Failure {
                    action: action.clone(),
                    error: e.to_string(),
                });
            }
        }
    }

    /// One log line with the counts.
    pub fn log(&self, what: &str) {
        info!(
            planned = self.planned,
            applied = self.applied,
            failed = self.failed.len(),
            "{what}"
        );
    }

    /// Adds another pass's counts to this one.
    pub fn merge(&mut self, other: Report) {
        self.planned += other.planned;
        self.applied += other.applied;
        self.failed.extend(other.failed);
    }
}

/// How a device action is applied (a controller may lock or re-check first).
pub trait ApplyOne: Send + Sync {
    fn apply_one(&self, action: &Action) -> impl Future<Output = Result<(), KernelError>> + Send;
}

/// A whole kernel applies each action directly.
struct Direct<'a, K>(&'a K);

impl<K: Kernel> ApplyOne for Direct<'_, K> {
    async fn apply_one(&self, action: &Action) -> Result<(), KernelError> {
        self.0.apply(action).await
    }
}

/// Applies `actions` in order: each device action on its own (through `one`), each run of
/// forwarding-entry changes at once through `links` (they are independent of each other once
/// their devices exist, and the plan orders device changes first).
pub async fn apply_in_order<L: Links, A: ApplyOne>(links: &L, actions: &[Action], one: &A) -> Report {
    let mut report = Report {
        planned: actions.len(),
        ..Default::default()
    };
    let mut rest = actions;
    while let Some(first) = rest.first() {
        if first.is_fdb() {
            let run = rest.iter().position(|a| !a.is_fdb()).unwrap_or(rest.len());
            let (now, later) = rest.split_at(run);
            rest = later;
            for (a, r) in now.iter().zip(links.apply_fdb(now).await) {
                report.record(a, r);
            }
        } else {
            report.record(first, one.apply_one(first).await);
            rest = &rest[1..];
        }
    }
    report
}

/// Brings the kernel's datapath to `desired` in one pass. Errors only when the kernel cannot
/// even be read; individual action failures are in the report.
pub async fn reconcile<K: Kernel>(kernel: &K, desired: &Datapath) -> Result<Report, KernelError> {
    let actual = kernel.observe().await?;
    let actions = plan(&actual, desired);
    if actions.is_empty() {
        debug!("datapath converged, nothing to do");
        return Ok(Report::default());
    }
    let report = apply_in_order(kernel, &actions, &Direct(kernel)).await;
    report.log("reconcile pass done");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{compute, Bridge, FLOOD_MAC};
    use crate::kernel::{FakeKernel, MacAddr, PortDevices, VethAttach};
    use crate::view::{LocalPort, NetworkInfo, NodeView, PortKind, RemotePort};
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Node 192.0.2.1 with one local port on each of VNI 100 and 200; peers on 192.0.2.2.
    fn desired() -> Datapath {
        let mut v = NodeView {
            underlay_ip: Some(ip("192.0.2.1")),
            ..Default::default()
        };
        for (n, vni) in [("n1", 100), ("n2", 200)] {
            v.networks.insert(
                n.into(),
                NetworkInfo {
                    id: n.into(),
                    vni,
                    mtu: 1450,
                },
            );
            v.local_ports.push(LocalPort {
                id: format!("port-{n}-local"),
                network_id: n.into(),
                mac: "fa:16:3e:00:00:01".into(),
                kind: PortKind::Veth,
            });
            v.remote_ports.push(RemotePort {
                id: format!("port-{n}-remote"),
                network_id: n.into(),
                mac: format!("fa:16:3e:00:{vni:02x}:02"),
                node_ip: ip("192.0.2.2"),
            });
        }
        compute(&v)
    }

    fn same_devices(a: &Datapath, b: &Datapath) -> bool {
        a.bridges == b.bridges && a.vxlans == b.vxlans && a.fdb == b.fdb
    }

    async fn attach_all(k: &FakeKernel, want: &Datapath) {
        for p in want.ports.values() {
            let req = VethAttach {
                port: p.clone(),
                mac: "fa:16:3e:00:00:01".parse::<MacAddr>().unwrap(),
                netns: "/var/run/netns/x".into(),
                ifname: "eth0".into(),
                addresses: vec![],
                gateway: None,
                routes: vec![],
                mtu: p.mtu,
            };
            k.attach_veth(&req).await.unwrap();
        }
    }

    #[tokio::test]
    async fn converges_then_does_nothing() {
        let k = FakeKernel::new();
        let want = desired();
        let r = reconcile(&k, &want).await.unwrap();
        assert!(r.ok(), "{r:?}");
        // 2 bridges, 2 vxlans, 2 x (unicast + flood) entries.
        assert_eq!((r.planned, r.applied), (8, 8));
        assert!(same_devices(&k.state(), &want));
        attach_all(&k, &want).await;
        assert_eq!(k.state(), want);
        let again = reconcile(&k, &want).await.unwrap();
        assert_eq!(again, Report::default());
    }

    #[tokio::test]
    async fn keeps_going_past_failures_and_recovers_next_pass() {
        let k = FakeKernel::new();
        let want = desired();
        k.fail_on(|a| matches!(a, Action::CreateBridge(b) if b.name == "isbr-100"));
        let r = reconcile(&k, &want).await.unwrap();
        // The bridge, then its VXLAN device (no bridge to join) and its two entries fail.
        assert_eq!(r.failed.len(), 4, "{r:?}");
        assert_eq!(r.applied, 4);
        assert!(k.state().bridges.contains_key("isbr-200"));
        assert!(k.state().vxlans.contains_key("isvx-200"));
        k.clear_failures();
        let r = reconcile(&k, &want).await.unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.applied, 4);
        assert!(same_devices(&k.state(), &want));
    }

    #[tokio::test]
    async fn a_deleted_bridge_is_rebuilt_without_rebuilding_the_rest() {
        let k = FakeKernel::new();
        let want = desired();
        reconcile(&k, &want).await.unwrap();
        attach_all(&k, &want).await;
        let vx = k.index_of("isvx-100");
        k.delete_by_hand("isbr-100");
        let r = reconcile(&k, &want).await.unwrap();
        assert!(r.ok(), "{r:?}");
        // Bridge back, VXLAN device and port re-enslaved; entries were never lost.
        assert_eq!(r.applied, 3, "{:?}", k.applied());
        assert_eq!(k.index_of("isvx-100"), vx);
        assert_eq!(k.state(), want);
        assert_eq!(reconcile(&k, &want).await.unwrap().planned, 0);
    }

    #[tokio::test]
    async fn a_lost_fdb_entry_is_re_added_alone() {
        let k = FakeKernel::new();
        let want = desired();
        reconcile(&k, &want).await.unwrap();
        k.edit_fdb_by_hand(|fdb| fdb.retain(|f| !(f.dev == "isvx-100" && f.mac == FLOOD_MAC)));
        let r = reconcile(&k, &want).await.unwrap();
        assert_eq!(r.applied, 1);
        assert!(matches!(&k.applied()[8], Action::AddFdb(f) if f.mac == FLOOD_MAC && f.dev == "isvx-100"));
    }

    #[tokio::test]
    async fn leftovers_are_removed() {
        let k = FakeKernel::new();
        k.add_bridge_by_hand(Bridge {
            name: "isbr-999".into(),
            mtu: 1500,
        });
        let r = reconcile(&k, &desired()).await.unwrap();
        assert!(r.ok());
        assert!(!k.state().bridges.contains_key("isbr-999"));
        assert!(k.applied().contains(&Action::DeleteBridge("isbr-999".into())));
    }

    #[tokio::test]
    async fn nothing_desired_means_everything_of_ours_goes() {
        let k = FakeKernel::new();
        let want = desired();
        reconcile(&k, &want).await.unwrap();
        attach_all(&k, &want).await;
        let r = reconcile(&k, &Datapath::default()).await.unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(k.state(), Datapath::default());
    }
}
