//! The agent's metrics. Made once per agent (in its `AgentConfig`) and
//! registered in a registry the caller owns and serves (`isthmus agent --metrics-listen`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttachLabels {
    /// `attach` (socket attach by port) or `cni_add`.
    pub op: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DhcpLabels {
    /// `v4` or `v6`.
    pub family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// Bucket bounds, seconds (as the server's).
const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Every metric the agent keeps.
pub struct AgentMetrics {
    pub reconcile_duration: Family<ControllerLabels, Histogram, fn() -> Histogram>,
    pub reconcile_actions: Family<ControllerLabels, Counter>,
    pub reconcile_failures: Family<ControllerLabels, Counter>,
    pub attach_duration: Family<AttachLabels, Histogram, fn() -> Histogram>,
    pub dhcp_answers: Family<DhcpLabels, Counter>,
    pub datapath_objects: Family<KindLabels, Gauge>,
}

impl AgentMetrics {
    /// Makes the agent's metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = AgentMetrics {
            reconcile_duration: Family::new_with_constructor(latency_histogram),
            reconcile_actions: Family::default(),
            reconcile_failures: Family::default(),
            attach_duration: Family::new_with_constructor(latency_histogram),
            dhcp_answers: Family::default(),
            datapath_objects: Family::default(),
        };
        let r = registry;
        r.register(
            "isthmus_agent_reconcile_duration_seconds",
            "Reconcile passes and their time, by controller",
            m.reconcile_duration.clone(),
        );
        r.register(
            "isthmus_agent_reconcile_actions",
            "Changes planned by reconcile passes, by controller",
            m.reconcile_actions.clone(),
        );
        r.register(
            "isthmus_agent_reconcile_failures",
            "Reconcile passes that failed or left failures, by controller",
            m.reconcile_failures.clone(),
        );
        r.register(
            "isthmus_agent_attach_duration_seconds",
            "Attach requests (socket attach, CNI ADD) and their time, by outcome",
            m.attach_duration.clone(),
        );
        r.register(
            "isthmus_agent_dhcp_answers",
            "DHCP answers sent to local VM ports, by IP version",
            m.dhcp_answers.clone(),
        );
        r.register(
            "isthmus_agent_datapath_objects",
            "Datapath objects the node's current view asks for, by kind",
            m.datapath_objects.clone(),
        );
        let info = Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", option_env!("ISTHMUS_GIT_COMMIT").unwrap_or("unknown")),
        ]);
        r.register("isthmus_agent_build", "Version of this build", info);
        Arc::new(m)
    }

    /// Metrics in a registry nobody serves (an agent without a metrics listener).
    pub fn unserved() -> Arc<Self> {
        Self::new(&mut Registry::default())
    }

    /// Records one reconcile pass of `controller`.
    pub fn pass(&self, controller: &'static str, secs: f64, planned: usize, failed: bool) {
        let l = ControllerLabels { controller };
        self.reconcile_duration.get_or_create(&l).observe(secs);
        self.reconcile_actions.get_or_create(&l).inc_by(planned as u64);
        if failed {
            self.reconcile_failures.get_or_create(&l).inc();
        }
    }

    /// Sets the datapath object gauges.
    pub fn set_objects(&self, counts: &[(&'static str, usize)]) {
        for (kind, n) in counts {
            self.datapath_objects
                .get_or_create(&KindLabels { kind })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
}
