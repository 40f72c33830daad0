//! The server's metrics (OpenMetrics text, which Prometheus scrapes) and the listener that
//! serves a registry on `/metrics`. Metrics are made once per server and reach the code that
//! counts through [`crate::AppState`]; the registry they are in belongs to the caller, so one
//! endpoint can serve the server's and a local agent's metrics together.

use crate::serve;
use async_trait::async_trait;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use isthmus_store::{Compare, DynStore, KeyValue, LeaseId, Op, Revision, Store, TxnResult, Watch};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
pub use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The content type of what `/metrics` answers.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bucket bounds, seconds, for request, transaction and lag times.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub fn latency_buckets() -> impl Iterator<Item = f64> {
    LATENCY_BUCKETS.into_iter()
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `identity` or `network`.
    pub api: &'static str,
    pub method: &'static str,
    /// The matched route template (`/v2.0/networks/{id}`), or `unmatched`.
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TxnLabels {
    /// `committed`, `conflict` (a comparison failed) or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

/// Every metric the server keeps.
pub struct ServerMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub txn_duration: Family<TxnLabels, Histogram, fn() -> Histogram>,
    pub txn_conflicts: Counter,
    /// How long a write waits for the cache's watch to show its revision.
    pub watch_lag: Histogram,
    pub node_streams_open: Gauge,
    pub node_updates: Family<NodeLabels, Counter>,
    /// One cache batch turned into every concerned node's update.
    pub fanout_duration: Histogram,
}

impl ServerMetrics {
    /// Makes the server's metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = ServerMetrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            txn_duration: Family::new_with_constructor(latency_histogram),
            txn_conflicts: Counter::default(),
            watch_lag: latency_histogram(),
            node_streams_open: Gauge::default(),
            node_updates: Family::default(),
            fanout_duration: latency_histogram(),
        };
        let r = registry;
        r.register(
            "isthmus_http_requests",
            "API requests answered, by API, method, route template and status",
            m.requests.clone(),
        );
        r.register(
            "isthmus_http_request_duration_seconds",
            "Time to answer an API request, by API, method, route template and status",
            m.request_duration.clone(),
        );
        r.register(
            "isthmus_store_txn_duration_seconds",
            "Store transactions by outcome (committed, conflict, error) and their time",
            m.txn_duration.clone(),
        );
        r.register(
            "isthmus_store_txn_conflicts",
            "Store transactions refused because a comparison failed (another writer won)",
            m.txn_conflicts.clone(),
        );
        r.register(
            "isthmus_cache_watch_lag_seconds",
            "Time from a committed write until the cache's watch shows it",
            m.watch_lag.clone(),
        );
        r.register(
            "isthmus_node_streams_open",
            "Node view streams open now",
            m.node_streams_open.clone(),
        );
        r.register(
            "isthmus_node_stream_updates",
            "Updates sent on node view streams, by node",
            m.node_updates.clone(),
        );
        r.register(
            "isthmus_node_fanout_duration_seconds",
            "Time to turn one cache change into every concerned node's update",
            m.fanout_duration.clone(),
        );
        register_build_info(r, "isthmus_server_build");
        Arc::new(m)
    }

    /// Metrics in a registry nobody serves (a server started without a metrics listener).
    pub fn unserved() -> Arc<Self> {
        Self::new(&mut Registry::default())
    }
}

/// `NAME_info{version, commit} 1`. The commit is `ISTHMUS_GIT_COMMIT` at build time, if set.
pub fn register_build_info(registry: &mut Registry, name: &str) {
    let info = Info::new(vec![
        ("version", env!("CARGO_PKG_VERSION")),
        ("commit", option_env!("ISTHMUS_GIT_COMMIT").unwrap_or("unknown")),
    ]);
    registry.register(name, "Version of this build", info);
}

/// The label for a request method: the standard ones, else `other` (clients may send any token).
pub fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    for (known, name) in [
        (Method::GET, "GET"),
        (Method::HEAD, "HEAD"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::PATCH, "PATCH"),
        (Method::DELETE, "DELETE"),
        (Method::OPTIONS, "OPTIONS"),
    ] {
        if m == known {
            return name;
        }
    }
    "other"
}

/// A store that times every transaction and counts conflicts; everything else passes through.
pub struct MeteredStore {
    inner: DynStore,
    metrics: Arc<ServerMetrics>,
}

impl MeteredStore {
    pub fn wrap(inner: DynStore, metrics: Arc<ServerMetrics>) -> DynStore {
        Arc::new(MeteredStore { inner, metrics })
    }
}

#[async_trait]
impl Store for MeteredStore {
    async fn get(&self, key: &str) -> isthmus_store::Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> isthmus_store::Result<(Vec<KeyValue>, Revision)> {
        self.inner.list(prefix).await
    }
    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> isthmus_store::Result<TxnResult> {
        let started = Instant::now();
        let res = self.inner.txn(compares, ops).await;
        let outcome = match &res {
            Ok(r) if r.succeeded => "committed",
            Ok(_) => {
                self.metrics.txn_conflicts.inc();
                "conflict"
            }
            Err(_) => "error",
        };
        self.metrics
            .txn_duration
            .get_or_create(&TxnLabels { outcome })
            .observe(started.elapsed().as_secs_f64());
        res
    }
    async fn watch(&self, prefix: &str, from_revision: Revision) -> isthmus_store::Result<Watch> {
        self.inner.watch(prefix, from_revision).await
    }
    async fn revision(&self) -> isthmus_store::Result<Revision> {
        self.inner.revision().await
    }
    async fn compact(&self, revision: Revision) -> isthmus_store::Result<()> {
        self.inner.compact(revision).await
    }
    async fn grant_lease(&self, ttl_secs: i64) -> isthmus_store::Result<LeaseId> {
        self.inner.grant_lease(ttl_secs).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> isthmus_store::Result<bool> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> isthmus_store::Result<()> {
        self.inner.revoke_lease(lease).await
    }
}

/// Counts an open node stream for as long as it lives.
pub struct StreamOpen(Gauge);

impl StreamOpen {
    pub fn new(g: &Gauge) -> Self {
        g.inc();
        StreamOpen(g.clone())
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Whether `addr` may serve metrics: loopback always, anything else only when `public`.
pub fn check_listen(addr: SocketAddr, public: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || public {
        Ok(())
    } else {
        Err(format!(
            "metrics listen address {addr} is not a loopback address; metrics tell a lot about \
             the deployment, so serving them beyond this machine needs --metrics-public"
        ))
    }
}

/// A running metrics listener.
pub struct MetricsHandle {
    pub addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsHandle {
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let mut t = self.task;
        if tokio::time::timeout(Duration::from_secs(3), &mut t).await.is_err() {
            t.abort();
        }
    }
}

/// Limits of the metrics listener: scrapers are few and quick.
const LIMITS: serve::Limits = serve::Limits {
    header_read: Duration::from_secs(10),
    body_read: Duration::from_secs(10),
    idle: Duration::from_secs(60),
    max_connections: 16,
};

/// Serves `registry` on `GET /metrics` (and HEAD) at `addr`; other methods get 405, other
/// paths 404.
pub async fn listen(addr: SocketAddr, registry: Arc<Registry>) -> anyhow::Result<MetricsHandle> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding metrics listener {addr}"))?;
    let addr = listener.local_addr()?;
    let router = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let r = registry.clone();
                async move { render(&r) }
            }),
        )
        .fallback(|| async { StatusCode::NOT_FOUND });
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    // Plain HTTP: metrics stay on loopback unless the operator says otherwise.
    let task = tokio::spawn(serve::serve(
        listener,
        router,
        LIMITS,
        body_timeout,
        rx,
        "metrics",
        None,
    ));
    tracing::info!(%addr, "metrics listening");
    Ok(MetricsHandle { addr, shutdown, task })
}

fn render(registry: &Registry) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], out).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn body_timeout() -> Response {
    StatusCode::REQUEST_TIMEOUT.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_unless_public() {
        for a in ["127.0.0.1:9100", "[::1]:9100"] {
            assert!(check_listen(a.parse().unwrap(), false).is_ok(), "{a}");
        }
        for a in ["0.0.0.0:9100", "192.0.2.1:9100", "[::]:9100"] {
            let e = check_listen(a.parse().unwrap(), false).unwrap_err();
            assert!(e.contains("--metrics-public"), "{e}");
            assert!(check_listen(a.parse().unwrap(), true).is_ok(), "{a}");
        }
    }

    #[test]
    fn odd_methods_share_one_label() {
        let m = axum::http::Method::from_bytes(b"FROBNICATE").unwrap();
        assert_eq!(method_label(&m), "other");
        assert_eq!(method_label(&axum::http::Method::POST), "POST");
    }
}
