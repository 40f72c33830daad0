//! The Isthmus API server: a Keystone v3 identity subset and the Neutron v2.0 network API,
//! stateless over a [`isthmus_store::Store`]. Reads are served from a watch-fed cache; every
//! write is a store transaction, so several servers can share one etcd cluster.

mod access_log;
pub mod cache;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod neutron;
mod serve;
pub mod time;
pub mod tls;

use anyhow::Context;
use std::sync::Arc;

pub use config::Config;

/// What every request handler shares.
pub struct AppState {
    pub store: isthmus_store::DynStore,
    pub cache: Arc<cache::Cache>,
    pub config: Arc<Config>,
    pub identity: Arc<identity::Identity>,
    /// Unversioned network endpoint URL, as advertised in the catalog.
    pub network_url: String,
    /// Identity v3 URL.
    pub identity_url: String,
    /// Network API state that is per server, not per store.
    pub neutron: neutron::NeutronState,
    pub metrics: Arc<metrics::ServerMetrics>,
}

/// A running server: its bound addresses, and a way to stop it.
pub struct ServerHandle {
    pub identity_addr: std::net::SocketAddr,
    pub network_addr: std::net::SocketAddr,
    pub state: Arc<AppState>,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Follows the cache for the node streams; stopped with the server.
    fanout: tokio::task::JoinHandle<()>,
    /// Binds routers' gateways to living gateway nodes; stopped with the server.
    snat_scheduler: tokio::task::JoinHandle<()>,
    /// The certificate both listeners serve, when they serve HTTPS.
    tls: Option<Arc<tls::ServerTls>>,
    /// Re-reads the token key directory now and then; stopped with the server.
    key_reloader: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// [`ServerHandle::stop_within`] with a short drain (3 s), for tests and embedding.
    pub async fn stop(self) {
        self.stop_within(std::time::Duration::from_secs(3)).await;
    }

    /// Stops accepting new connections and requests, ends the node streams (their agents
    /// reconnect elsewhere), and waits for requests in flight to be answered, for at most
    /// `drain`; connections still open then are closed.
    pub async fn stop_within(self, drain: std::time::Duration) {
        let _ = self.shutdown.send(true);
        self.state.neutron.stopping.stop();
        let deadline = tokio::time::Instant::now() + drain;
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                tracing::warn!(
                    drain_secs = drain.as_secs_f64(),
                    "closing connections still busy at the end of the shutdown drain"
                );
                t.abort();
                let _ = t.await;
            }
        }
        self.fanout.abort();
        self.snat_scheduler.abort();
        self.key_reloader.abort();
    }
    /// Reads the certificate and key files again (SIGHUP): new connections get the new
    /// certificate; if the files are bad, the old one stays and the error is returned.
    /// `Ok(false)`: the server serves plain HTTP.
    pub fn reload_tls(&self) -> Result<bool, tls::TlsError> {
        match &self.tls {
            Some(t) => t.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// Reloads what can change under a running server (SIGHUP): the token keys. A failure is
    /// logged and leaves the old state in place.
    pub fn reload(&self) {
        if let Err(e) = self.state.identity.reload_keys() {
            tracing::error!(error = %e, "reading the token key directory failed; keeping the keys loaded before");
        }
        match self.reload_tls() {
            Ok(true) => tracing::info!("TLS certificate reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "reading the TLS certificate failed; keeping the current TLS certificate")
            }
        }
    }

    /// Waits until the server stops by itself (it normally does not).
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts the cache, bootstraps identity and serves both APIs.
pub async fn start(config: Config, store: isthmus_store::DynStore) -> anyhow::Result<ServerHandle> {
    start_with_metrics(config, store, metrics::ServerMetrics::unserved()).await
}

/// [`start`], counting into `metrics` (registered where the caller serves them).
pub async fn start_with_metrics(
    config: Config,
    store: isthmus_store::DynStore,
    metrics: Arc<metrics::ServerMetrics>,
) -> anyhow::Result<ServerHandle> {
    let store = metrics::MeteredStore::wrap(store, metrics.clone());
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let server_tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(Arc::new(tls::ServerTls::load(cert, key)?)),
        _ => None,
    };
    let config = Arc::new(config);
    let cache = cache::Cache::start_with_lag(store.clone(), metrics.watch_lag.clone())
        .await
        .context("loading the store into the cache")?;
    let identity = Arc::new(identity::Identity::new(store.clone(), cache.clone(), config.clone()));
    identity.bootstrap().await.context("bootstrapping identity")?;

    let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
    let id_listener = tokio::net::TcpListener::bind(config.identity_listen)
        .await
        .with_context(|| format!("binding identity listener {}", config.identity_listen))?;
    let net_listener = tokio::net::TcpListener::bind(config.network_listen)
        .await
        .with_context(|| format!("binding network listener {}", config.network_listen))?;
    let identity_addr = id_listener.local_addr()?;
    let network_addr = net_listener.local_addr()?;
    let state = Arc::new(AppState {
        store,
        cache,
        identity,
        network_url: config.network_url(Some(network_addr)),
        identity_url: config.identity_url(Some(identity_addr)),
        neutron: Default::default(),
        config: config.clone(),
        metrics: metrics.clone(),
    });

    // Node views are built before any stream can open.
    let fanout = neutron::nodeview::start_fanout(state.clone());
    let snat_scheduler = neutron::l3sched::start(state.clone());
    let key_reloader = spawn_key_reloader(
        state.identity.clone(),
        std::time::Duration::from_secs(config.token_key_reload_secs),
    );
    // Requests run to completion even when their client goes away: see `serve`.
    let id_router = access_logged(identity::router(state.clone()), "identity", &metrics, |_| false);
    let net_router = access_logged(
        neutron::router(state.clone()),
        "network",
        &metrics,
        neutron::is_collection,
    );
    let limits = serve::Limits {
        header_read: std::time::Duration::from_secs(config.header_read_timeout_secs),
        body_read: std::time::Duration::from_secs(config.body_read_timeout_secs),
        idle: std::time::Duration::from_secs(config.idle_timeout_secs),
        max_connections: config.max_connections,
    };
    let mut tasks = Vec::new();
    for (listener, router, on_body_timeout, name) in [
        (
            id_listener,
            id_router,
            identity_body_timeout as serve::TimeoutResponse,
            "identity",
        ),
        (net_listener, net_router, network_body_timeout, "network"),
    ] {
        let rx = shutdown_rx.clone();
        tasks.push(tokio::spawn(serve::serve(
            listener,
            router,
            limits,
            on_body_timeout,
            rx,
            name,
            server_tls.as_ref().map(|t| t.acceptor()),
        )));
    }
    tracing::info!(%identity_addr, %network_addr, "isthmus server listening");
    Ok(ServerHandle {
        identity_addr,
        network_addr,
        state,
        shutdown,
        tasks,
        fanout,
        snat_scheduler,
        tls: server_tls,
        key_reloader,
    })
}

/// Re-reads the token keys every `every`, so servers sharing a key directory pick up a
/// rotation without a signal.
fn spawn_key_reloader(identity: Arc<identity::Identity>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = identity.reload_keys() {
                tracing::error!(error = %e, "reading the token key directory failed; keeping the keys loaded before");
            }
        }
    })
}

/// Request ids, access log and request metrics around `router`, the matched route noted
/// inside it.
fn access_logged(
    router: axum::Router,
    api: &'static str,
    metrics: &Arc<metrics::ServerMetrics>,
    known_collection: fn(&str) -> bool,
) -> axum::Router {
    let a = access_log::AccessLog {
        api,
        metrics: metrics.clone(),
        known_collection,
    };
    router
        .route_layer(axum::middleware::from_fn_with_state(a.clone(), access_log::note_route))
        .layer(axum::middleware::from_fn_with_state(a, access_log::log))
}

const BODY_TIMEOUT_MESSAGE: &str = "The request body was not received in time.";

fn identity_body_timeout() -> axum::response::Response {
    use axum::response::IntoResponse;
    identity::error::ApiError::new(axum::http::StatusCode::REQUEST_TIMEOUT, BODY_TIMEOUT_MESSAGE).into_response()
}

fn network_body_timeout() -> axum::response::Response {
    use axum::response::IntoResponse;
    neutron::ApiError(isthmus_model::NeutronError::new(
        408,
        "HTTPRequestTimeout",
        BODY_TIMEOUT_MESSAGE,
    ))
    .into_response()
}
