//! etcd v3 backend through etcd's gRPC API (the `etcd-client` crate).
//!
//! Every write is one etcd `Txn`, so the [`Store`] semantics (one revision per successful
//! write txn, create/mod revisions, versions) are etcd's own. A failed txn reads the compared
//! keys in its failure branch, so the caller learns which revision to wait for.
//!
//! Watches: one etcd watch stream per store handle carries every [`Watch`] handed out (one
//! etcd watcher each, with progress notifications). When the stream breaks, a background task
//! reconnects with back-off and re-creates each watcher from the revision after the last one
//! it delivered (or the last progress notification), dropping anything already delivered, so
//! nothing is lost or duplicated; a watcher whose resume point has been compacted meanwhile
//! gets [`WatchEvent::Compacted`].
//!
//! Every unary call is bounded by [`EtcdOptions::request_timeout`]; failures are
//! [`StoreError::Unavailable`] with their cause chain.

use crate::{
    Compare, Event, EventKind, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError, TxnResult, Watch, WatchEvent,
};
use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream,
};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

const WATCH_BUFFER: usize = 64;
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Limit for opening the watch stream (connection, TLS, HTTP/2, response headers).
const WATCH_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response accepted (a list of everything under a prefix comes in one message).
const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Client TLS for etcd (`https://` endpoints).
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// CA certificate(s) (PEM) that signed etcd's server certificate (required; the system
    /// roots are not used).
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for etcd's `--client-cert-auth`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key_file: Option<PathBuf>,
}

#[derive(Clone)]
pub struct EtcdOptions {
    /// Limit for one unary call (and for creating a watch).
    pub request_timeout: Duration,
    /// Limit for establishing a connection to one endpoint.
    pub connect_timeout: Duration,
    /// TLS settings; endpoints without a scheme then use `https://`.
    pub tls: Option<EtcdTls>,
    /// etcd user (with `password`), when etcd has authentication enabled.
    pub user: Option<String>,
    /// Never logged nor shown by `Debug`.
    pub password: Option<String>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            tls: None,
            user: None,
            password: None,
        }
    }
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

pub struct EtcdStore {
    client: Client,
    opts: EtcdOptions,
    /// How many endpoints the client balances over.
    endpoints: usize,
    hub: mpsc::UnboundedSender<HubCmd>,
}

/// The error and every cause under it (tonic's Display hides why a connection failed).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s
}

/// etcd-client's error does not expose its cause; unwrap the ones that have one.
fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let mut out = format!("{:?}: {}", s.code(), s.message());
            if let Some(src) = std::error::Error::source(s) {
                out.push_str(": ");
                out.push_str(&error_chain(src));
            }
            out
        }
        etcd_client::Error::TransportError(t) => format!("transport error: {}", error_chain(t)),
        etcd_client::Error::IoError(io) => format!("I/O error: {}", error_chain(io)),
        other => other.to_string(),
    }
}

fn grpc_message(e: &etcd_client::Error) -> Option<(tonic::Code, &str)> {
    match e {
        etcd_client::Error::GRpcStatus(s) => Some((s.code(), s.message())),
        _ => None,
    }
}

/// The call failed before any request left: no connection could be made.
fn not_sent(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable && describe(e).contains("connect error")
        }
        _ => false,
    }
}

fn map_err(what: &str, e: etcd_client::Error) -> StoreError {
    match grpc_message(&e) {
        Some((tonic::Code::InvalidArgument, msg)) => StoreError::Invalid(format!("etcd {what}: {msg}")),
        Some((tonic::Code::NotFound, msg)) if msg.contains("lease not found") => {
            StoreError::Invalid(format!("etcd {what}: {msg}"))
        }
        _ => StoreError::Unavailable(format!("etcd {what}: {}", describe(&e))),
    }
}

fn utf8_key(raw: &[u8]) -> Result<String> {
    String::from_utf8(raw.to_vec()).map_err(|e| StoreError::Corrupt(format!("etcd key is not UTF-8: {e}")))
}

fn convert_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: utf8_key(kv.key())?,
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
    })
}

fn convert_event(ev: &etcd_client::Event) -> Result<Event> {
    let kv = ev
        .kv()
        .ok_or_else(|| StoreError::Corrupt("etcd event without kv".into()))?;
    let kind = match ev.event_type() {
        etcd_client::EventType::Put => EventKind::Put,
        etcd_client::EventType::Delete => EventKind::Delete,
    };
    let mut kv = convert_kv(kv)?;
    if kind == EventKind::Delete {
        // etcd's delete events carry the key and the delete's revision only; say so plainly.
        kv.value.clear();
        kv.create_revision = 0;
        kv.version = 0;
    }
    Ok(Event { kind, kv })
}

/// Smallest key greater than every key starting with `prefix` (etcd's `range_end`).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): "\0" means "to the end of the keyspace".
    vec![0]
}

/// `key`/`range_end` selecting every key under `prefix`; the empty prefix selects all keys.
fn prefix_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        (vec![0], vec![0])
    } else {
        (prefix.as_bytes().to_vec(), prefix_end(prefix.as_bytes()))
    }
}

fn compare_key(c: &Compare) -> &str {
    match c {
        Compare::Absent(k) | Compare::Exists(k) | Compare::ModRevision(k, _) => k,
    }
}

fn etcd_compares(c: &Compare, out: &mut Vec<EtcdCompare>) {
    match c {
        Compare::Absent(k) => out.push(EtcdCompare::create_revision(k.as_str(), CompareOp::Equal, 0)),
        Compare::Exists(k) => out.push(EtcdCompare::create_revision(k.as_str(), CompareOp::Greater, 0)),
        Compare::ModRevision(k, rev) => {
            out.push(EtcdCompare::mod_revision(k.as_str(), CompareOp::Equal, *rev));
            // etcd sees an absent key as mod_revision 0; our contract says the key must exist.
            if *rev <= 0 {
                etcd_compares(&Compare::Exists(k.clone()), out);
            }
        }
    }
}

fn etcd_op(op: Op) -> TxnOp {
    match op {
        Op::Put { key, value } => TxnOp::put(key, value, None),
        Op::PutWithLease { key, value, lease } => TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease))),
        Op::Delete { key } => TxnOp::delete(key, None),
    }
}

// ---------------------------------------------------------------------------------------------
// The multiplexed watch

/// Requests to the task that owns the watch stream.
enum HubCmd {
    Register {
        id: u64,
        prefix: String,
        from: Revision,
        out: mpsc::UnboundedSender<Result<WatchEvent>>,
        created: oneshot::Sender<Result<()>>,
    },
    Cancel {
        id: u64,
    },
}

/// One [`Watch`] as the hub tracks it.
struct HubWatch {
    prefix: String,
    /// Revision to (re)start the etcd watcher from; 0 until the first creation answered
    /// ("from now").
    next: Revision,
    /// Highest revision whose events were handed on: anything at or below it is a repeat.
    delivered: Revision,
    out: mpsc::UnboundedSender<Result<WatchEvent>>,
    /// Answered once etcd confirmed the watcher the first time.
    created: Option<oneshot::Sender<Result<()>>>,
    /// etcd's id for it on the current stream, once created there.
    etcd_id: Option<i64>,
}

struct Hub {
    client: Client,
    watches: HashMap<u64, HubWatch>,
    by_etcd: HashMap<i64, u64>,
    /// Watches whose create request is on the current stream, awaiting `created` (etcd
    /// answers creates in order).
    pending: VecDeque<u64>,
    /// Local ids cancelled while their create was pending: cancel them on etcd once created.
    cancel_on_create: HashSet<u64>,
    sender: Option<WatchRequestSender>,
    stream: Option<WatchResponseStream>,
    backoff: Duration,
    /// When the stream is down: when to try again.
    retry_at: Option<tokio::time::Instant>,
    connect_timeout: Duration,
}

fn watch_options(w: &HubWatch) -> WatchOptions {
    let (_, end) = prefix_range(&w.prefix);
    WatchOptions::new()
        .with_range(end)
        .with_start_revision(w.next)
        .with_progress_notify()
}

fn watch_key(w: &HubWatch) -> Vec<u8> {
    prefix_range(&w.prefix).0
}

async fn next_response(
    stream: &mut Option<WatchResponseStream>,
) -> Option<std::result::Result<Option<WatchResponse>, etcd_client::Error>> {
    match stream {
        Some(s) => Some(s.message().await),
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Hub {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<HubCmd>) {
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => {
                        debug!("etcd watch hub stopped");
                        return;
                    }
                },
                resp = next_response(&mut self.stream) => match resp {
                    Some(Ok(Some(r))) => self.response(r).await,
                    Some(Ok(None)) => self.broken("etcd ended the watch stream".into()),
                    Some(Err(e)) => self.broken(describe(&e)),
                    None => {}
                },
                _ = sleep_until(self.retry_at) => {
                    self.retry_at = None;
                    self.connect().await;
                }
            }
        }
    }

    async fn command(&mut self, cmd: HubCmd) {
        match cmd {
            HubCmd::Register {
                id,
                prefix,
                from,
                out,
                created,
            } => {
                let w = HubWatch {
                    prefix,
                    next: from,
                    delivered: from.saturating_sub(1).max(0),
                    out,
                    created: Some(created),
                    etcd_id: None,
                };
                self.watches.insert(id, w);
                if self.sender.is_some() {
                    self.create(id).await;
                } else if self.retry_at.is_none() {
                    self.connect().await;
                }
            }
            HubCmd::Cancel { id } => {
                let Some(w) = self.watches.remove(&id) else { return };
                match w.etcd_id {
                    Some(eid) => {
                        self.by_etcd.remove(&eid);
                        if let Some(s) = self.sender.as_mut() {
                            // If this fails the stream is breaking anyway, and the watch is
                            // not re-created on the next one.
                            let _ = tokio::time::timeout(WATCH_OPEN_TIMEOUT, s.cancel(eid)).await;
                        }
                    }
                    None if self.pending.contains(&id) => {
                        self.cancel_on_create.insert(id);
                    }
                    None => {}
                }
            }
        }
    }

    /// Sends the create request for watch `id` on the current stream.
    async fn create(&mut self, id: u64) {
        let Some(w) = self.watches.get(&id) else { return };
        let (key, opts) = (watch_key(w), watch_options(w));
        let Some(s) = self.sender.as_mut() else { return };
        // A request stream that stays full belongs to a stuck connection.
        match tokio::time::timeout(WATCH_OPEN_TIMEOUT, s.watch(key, Some(opts))).await {
            Ok(Ok(())) => self.pending.push_back(id),
            Ok(Err(e)) => self.broken(describe(&e)),
            Err(_) => self.broken("watch request stream stuck".into()),
        }
    }

    /// Opens a new stream and creates every watch on it.
    async fn connect(&mut self) {
        if self.watches.is_empty() {
            return;
        }
        let mut client = self.client.watch_client().max_decoding_message_size(MAX_MESSAGE_BYTES);
        // The stream opens with a create request; use the first watch's.
        let mut ids: Vec<u64> = self.watches.keys().copied().collect();
        ids.sort_unstable();
        let first = ids[0];
        let (key, opts) = {
            let w = &self.watches[&first];
            (watch_key(w), watch_options(w))
        };
        let opened = tokio::time::timeout(
            self.connect_timeout.max(WATCH_OPEN_TIMEOUT),
            client.watch(key, Some(opts)),
        )
        .await;
        let stream = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return self.retry_later(describe(&e)),
            Err(_) => return self.retry_later("no answer when opening the watch stream".into()),
        };
        let (sender, stream) = stream.split();
        self.sender = Some(sender);
        self.stream = Some(stream);
        self.pending.push_back(first);
        for id in ids.into_iter().skip(1) {
            self.create(id).await;
            if self.sender.is_none() {
                return;
            }
        }
    }

    fn retry_later(&mut self, why: String) {
        warn!(error = %why, retry_in = ?self.backoff, "etcd watch stream: cannot connect");
        self.retry_at = Some(tokio::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
    }

    /// The stream broke: forget it and everything etcd knew about it; reconnect later.
    fn broken(&mut self, why: String) {
        if self.sender.is_none() && self.stream.is_none() {
            return;
        }
        self.sender = None;
        self.stream = None;
        self.by_etcd.clear();
        self.pending.clear();
        for id in self.cancel_on_create.drain() {
            self.watches.remove(&id);
        }
        for w in self.watches.values_mut() {
            w.etcd_id = None;
        }
        warn!(
            reason = %why,
            watches = self.watches.len(),
            "etcd watch stream broke; resuming each watch after its last delivered revision"
        );
        self.retry_later(why);
    }

    async fn response(&mut self, r: WatchResponse) {
        let rev = r.header().map_or(0, |h| h.revision());
        if r.created() {
            let Some(id) = self.pending.pop_front() else {
                warn!(watch_id = r.watch_id(), "etcd confirmed a watch nobody asked for");
                return;
            };
            if self.cancel_on_create.remove(&id) {
                self.watches.remove(&id);
                if let Some(s) = self.sender.as_mut() {
                    let _ = tokio::time::timeout(WATCH_OPEN_TIMEOUT, s.cancel(r.watch_id())).await;
                }
                return;
            }
            let Some(w) = self.watches.get_mut(&id) else { return };
            if r.canceled() {
                // Refused at creation (bad range, ...).
                let why = format!("etcd refused the watch: {}", r.cancel_reason());
                if let Some(c) = w.created.take() {
                    let _ = c.send(Err(StoreError::Unavailable(why)));
                } else {
                    let _ = w.out.send(Err(StoreError::Unavailable(why)));
                }
                self.watches.remove(&id);
                return;
            }
            w.etcd_id = Some(r.watch_id());
            if w.next == 0 {
                // "From now": now is the revision etcd created it at.
                w.next = rev + 1;
                w.delivered = rev;
            }
            if let Some(c) = w.created.take() {
                let _ = c.send(Ok(()));
            } else {
                debug!(prefix = %w.prefix, from = w.next, "etcd watch resumed");
            }
            self.backoff = RECONNECT_MIN;
            self.by_etcd.insert(r.watch_id(), id);
            // A creation can carry events or a cancellation too; fall through.
        }
        let Some(&id) = self.by_etcd.get(&r.watch_id()) else {
            return;
        };
        let Some(w) = self.watches.get_mut(&id) else { return };
        if r.compact_revision() > 0 {
            let _ = w.out.send(Ok(WatchEvent::Compacted {
                compact_revision: r.compact_revision(),
            }));
            self.by_etcd.remove(&r.watch_id());
            self.watches.remove(&id);
            return;
        }
        if r.canceled() {
            let why = format!("etcd canceled the watch: {}", r.cancel_reason());
            let _ = w.out.send(Err(StoreError::Unavailable(why)));
            self.by_etcd.remove(&r.watch_id());
            self.watches.remove(&id);
            return;
        }
        if r.events().is_empty() {
            if !r.created() && rev > 0 {
                // Progress notification: everything up to `rev` has been sent. Resume from
                // `rev` itself, not after it: etcd may report progress just before the events
                // of that revision (those are then dropped as repeats if they did arrive).
                w.next = w.next.max(rev);
            }
            return;
        }
        let mut events = Vec::with_capacity(r.events().len());
        for raw in r.events() {
            match convert_event(raw) {
                Ok(e) if e.kv.mod_revision <= w.delivered => {}
                Ok(e) => events.push(e),
                Err(e) => {
                    let _ = w.out.send(Err(e));
                    self.by_etcd.remove(&r.watch_id());
                    self.watches.remove(&id);
                    return;
                }
            }
        }
        let Some(last) = events.last().map(|e| e.kv.mod_revision) else {
            return;
        };
        w.delivered = last;
        w.next = w.next.max(last + 1);
        // If the forwarder is gone, its Cancel is on the way.
        let _ = w.out.send(Ok(WatchEvent::Events(events)));
    }
}

/// Hands a watch's messages to its bounded receiver, and tells the hub when the receiver is
/// dropped.
async fn forward(
    id: u64,
    mut from_hub: mpsc::UnboundedReceiver<Result<WatchEvent>>,
    to_watcher: mpsc::Sender<Result<WatchEvent>>,
    hub: mpsc::UnboundedSender<HubCmd>,
) {
    loop {
        tokio::select! {
            m = from_hub.recv() => match m {
                Some(m) => {
                    let end = matches!(m, Err(_) | Ok(WatchEvent::Compacted { .. }));
                    tokio::select! {
                        sent = to_watcher.send(m) => if sent.is_err() { break },
                        _ = to_watcher.closed() => break,
                    }
                    if end {
                        // The hub has dropped this watch already.
                        return;
                    }
                }
                // The hub is gone (store dropped and stream closed).
                None => return,
            },
            _ = to_watcher.closed() => break,
        }
    }
    let _ = hub.send(HubCmd::Cancel { id });
}

// ---------------------------------------------------------------------------------------------

fn read_file(what: &str, path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| StoreError::Invalid(format!("etcd {what} {}: {e}", path.display())))
}

impl EtcdStore {
    /// Connects to etcd (e.g. `http://127.0.0.1:2379`); calls are balanced over the endpoints
    /// that answer.
    pub async fn connect(endpoints: Vec<String>) -> Result<Arc<EtcdStore>> {
        Self::connect_with(endpoints, EtcdOptions::default()).await
    }

    pub async fn connect_with(endpoints: Vec<String>, opts: EtcdOptions) -> Result<Arc<EtcdStore>> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoints given".into()));
        }
        let mut norm = Vec::with_capacity(endpoints.len());
        for e in &endpoints {
            let e = e.trim().trim_end_matches('/');
            let https = e.starts_with("https://");
            if https && opts.tls.is_none() {
                return Err(StoreError::Invalid(format!(
                    "{e}: an https endpoint needs the TLS options (CA file)"
                )));
            }
            if e.starts_with("http://") && opts.tls.is_some() {
                return Err(StoreError::Invalid(format!("{e}: TLS is configured; use https://")));
            }
            norm.push(if https || e.starts_with("http://") {
                e.to_string()
            } else if opts.tls.is_some() {
                format!("https://{e}")
            } else {
                format!("http://{e}")
            });
        }
        let mut co = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            // Finds a dead connection under an idle watch stream.
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &opts.tls {
            if tls.ca_file.is_none() {
                // No system roots are compiled in: an etcd's CA is always named.
                return Err(StoreError::Invalid(
                    "etcd TLS needs the CA file that signed etcd's certificate".into(),
                ));
            }
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca_file {
                t = t.ca_certificate(Certificate::from_pem(read_file("CA file", ca)?));
            }
            match (&tls.cert_file, &tls.key_file) {
                (Some(c), Some(k)) => {
                    t = t.identity(Identity::from_pem(
                        read_file("client certificate", c)?,
                        read_file("client key", k)?,
                    ));
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::Invalid(
                        "etcd client certificate and key go together".into(),
                    ))
                }
            }
            co = co.with_tls(t);
        }
        match (&opts.user, &opts.password) {
            (Some(u), Some(p)) => co = co.with_user(u.clone(), p.clone()).with_auto_token_refresh(true),
            (None, None) => {}
            _ => return Err(StoreError::Invalid("etcd user and password go together".into())),
        }
        let unreachable = |cause: String| {
            StoreError::Unavailable(format!("no etcd endpoint reachable ({}): {cause}", norm.join(", ")))
        };
        // With a user, connecting authenticates (a call); bound it.
        let client = match tokio::time::timeout(opts.request_timeout, Client::connect(norm.clone(), Some(co))).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(unreachable(describe(&e))),
            Err(_) => return Err(unreachable(format!("no answer within {:?}", opts.request_timeout))),
        };
        let (hub_tx, hub_rx) = mpsc::unbounded_channel();
        let hub = Hub {
            client: client.clone(),
            watches: HashMap::new(),
            by_etcd: HashMap::new(),
            pending: VecDeque::new(),
            cancel_on_create: HashSet::new(),
            sender: None,
            stream: None,
            backoff: RECONNECT_MIN,
            retry_at: None,
            connect_timeout: opts.connect_timeout,
        };
        tokio::spawn(hub.run(hub_rx));
        let store = EtcdStore {
            client,
            opts,
            endpoints: norm.len(),
            hub: hub_tx,
        };
        if let Err(e) = store.revision().await {
            return Err(unreachable(e.to_string()));
        }
        info!(endpoints = %norm.join(","), "connected to etcd");
        Ok(Arc::new(store))
    }

    /// Runs one call within the request timeout. A call that never reached etcd (connection
    /// refused: the balancer tried an endpoint that is down) is tried again, on the next
    /// endpoint; one that may have reached it only if `idempotent`.
    async fn call<T, F, Fut>(&self, what: &str, idempotent: bool, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.opts.request_timeout;
        let mut attempt: u32 = 0;
        loop {
            let r = tokio::time::timeout_at(deadline, f()).await;
            match r {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let retry = attempt < 2 * self.endpoints as u32 + 2
                        && (not_sent(&e)
                            || (idempotent && grpc_message(&e).is_some_and(|(c, _)| c == tonic::Code::Unavailable)));
                    if !retry {
                        return Err(map_err(what, e));
                    }
                    attempt += 1;
                    debug!(what, attempt, error = %describe(&e), "etcd call failed; trying again");
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
                }
                Err(_) => {
                    return Err(StoreError::Unavailable(format!(
                        "etcd {what}: no answer within {:?}",
                        self.opts.request_timeout
                    )))
                }
            }
        }
    }

    fn kv(&self) -> etcd_client::KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        if key.is_empty() {
            return Ok(None);
        }
        let resp = self
            .call("get", true, || {
                let mut kv = self.kv();
                async move { kv.get(key, None).await }
            })
            .await?;
        resp.kvs()
            .iter()
            .find(|kv| kv.key() == key.as_bytes())
            .map(convert_kv)
            .transpose()
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let (key, end) = prefix_range(prefix);
        // etcd returns keys in byte order, which is what String ordering is.
        let resp = self
            .call("list", true, || {
                let (mut kv, key, end) = (self.kv(), key.clone(), end.clone());
                async move { kv.get(key, Some(GetOptions::new().with_range(end))).await }
            })
            .await?;
        let kvs = resp.kvs().iter().map(convert_kv).collect::<Result<Vec<_>>>()?;
        Ok((kvs, resp.header().map_or(0, |h| h.revision())))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        // Same checks as the embedded store, so both refuse the same requests (etcd would
        // refuse them too, less clearly). etcd enforces its own size limit.
        crate::embedded::validate_txn(&compares, &ops, usize::MAX)?;
        let mut cmp = Vec::with_capacity(compares.len());
        for c in &compares {
            etcd_compares(c, &mut cmp);
        }
        // On failure, read the compared keys in the same transaction: their revisions are
        // what the caller must wait for before planning again.
        let mut compared: Vec<String> = Vec::new();
        for c in &compares {
            let k = compare_key(c);
            if !compared.iter().any(|x| x == k) {
                compared.push(k.to_string());
            }
        }
        let failure: Vec<TxnOp> = compared
            .iter()
            .map(|k| TxnOp::get(k.as_str(), Some(GetOptions::new().with_keys_only())))
            .collect();
        let txn = Txn::new()
            .when(cmp)
            .and_then(ops.into_iter().map(etcd_op).collect::<Vec<_>>())
            .or_else(failure);
        let resp = self
            .call("txn", false, || {
                let (mut kv, txn) = (self.kv(), txn.clone());
                async move { kv.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        if resp.succeeded() {
            return Ok(TxnResult::applied(revision));
        }
        let mut result = TxnResult {
            succeeded: false,
            revision,
            ..Default::default()
        };
        let mut found = HashSet::new();
        for r in resp.op_responses() {
            if let TxnOpResponse::Get(g) = r {
                for kv in g.kvs() {
                    result.compared_revision = result.compared_revision.max(kv.mod_revision());
                    found.insert(kv.key().to_vec());
                }
            }
        }
        result.compared_absent = compared.into_iter().filter(|k| !found.contains(k.as_bytes())).collect();
        Ok(result)
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<Watch> {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        if from_revision < 0 {
            return Err(StoreError::Invalid(format!("negative watch revision {from_revision}")));
        }
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (out, from_hub) = mpsc::unbounded_channel();
        let (created, confirmed) = oneshot::channel();
        let gone = || StoreError::Unavailable("etcd watch task has stopped".into());
        self.hub
            .send(HubCmd::Register {
                id,
                prefix: prefix.to_string(),
                from: from_revision,
                out,
                created,
            })
            .map_err(|_| gone())?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        // Started before the confirmation so a failed wait still cancels the registration.
        tokio::spawn(forward(id, from_hub, tx, self.hub.clone()));
        match tokio::time::timeout(self.opts.request_timeout, confirmed).await {
            Ok(Ok(Ok(()))) => Ok(Watch { rx }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(StoreError::Unavailable(format!(
                "etcd did not confirm the watch within {:?}",
                self.opts.request_timeout
            ))),
        }
    }

    async fn revision(&self) -> Result<Revision> {
        // A count-only range of one key: the cheapest linearizable read that carries a header.
        let resp = self
            .call("revision", true, || {
                let mut kv = self.kv();
                async move { kv.get(vec![0u8], Some(GetOptions::new().with_count_only())).await }
            })
            .await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        if revision <= 0 {
            return Ok(());
        }
        let r = self
            .call("compact", true, || {
                let mut kv = self.kv();
                async move {
                    match kv.compact(revision, None).await {
                        // Idempotent like the embedded store: already compacted that far is fine.
                        Err(e) if grpc_message(&e).is_some_and(|(_, m)| m.contains("has been compacted")) => Ok(None),
                        Err(e) if grpc_message(&e).is_some_and(|(_, m)| m.contains("future revision")) => {
                            Ok(Some(grpc_message(&e).map_or(String::new(), |(_, m)| m.to_string())))
                        }
                        Err(e) => Err(e),
                        Ok(_) => Ok(None),
                    }
                }
            })
            .await?;
        match r {
            None => Ok(()),
            Some(msg) => Err(StoreError::Invalid(format!("etcd compact: {msg}"))),
        }
    }

    async fn grant_lease(&self, ttl_secs: i64) -> Result<LeaseId> {
        if ttl_secs < 1 {
            return Err(StoreError::Invalid(format!("lease TTL {ttl_secs} s is below 1 s")));
        }
        let resp = self
            .call("lease grant", false, || {
                let mut lc = self.client.lease_client();
                async move { lc.grant(ttl_secs, None).await }
            })
            .await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Unavailable(format!("etcd lease grant: {}", resp.error())));
        }
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        self.call("lease keep-alive", true, || {
            let mut lc = self.client.lease_client();
            async move {
                match lc.keep_alive(lease).await {
                    // The client opened a keep-alive stream, sent one request, read a TTL > 0.
                    Ok(_) => Ok(true),
                    Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(false),
                    Err(e) if grpc_message(&e).is_some_and(|(_, m)| m.contains("lease not found")) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.call("lease revoke", true, || {
            let mut lc = self.client.lease_client();
            async move {
                match lc.revoke(lease).await {
                    Err(e) if grpc_message(&e).is_some_and(|(_, m)| m.contains("lease not found")) => Ok(()),
                    Err(e) => Err(e),
                    Ok(_) => Ok(()),
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn debug_hides_the_password() {
        let o = EtcdOptions {
            user: Some("isthmus".into()),
            password: Some("s3cret-pw".into()),
            ..Default::default()
        };
        let shown = format!("{o:?}");
        assert!(shown.contains("isthmus") && shown.contains("redacted"), "{shown}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
    }
}
