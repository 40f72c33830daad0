//! etcd v3 backend through etcd's JSON gRPC gateway (`/v3/...` over HTTP/1.1).
//!
//! Keys and values travel base64-encoded and int64 fields arrive as JSON strings. Every write
//! is a `/v3/kv/txn`, so the [`Store`] semantics (one revision per successful write txn,
//! create/mod revisions, versions) are etcd's own. Watches read the gateway's streaming
//! response (one JSON object per message) and resume transparently after a broken stream.

use crate::{
    Compare, Event, EventKind, KeyValue, Op, Result, Revision, Store, StoreError, TxnResult, Watch, WatchEvent,
};
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};

const WATCH_BUFFER: usize = 64;
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// gRPC status codes the gateway reports in `code`.
const GRPC_INVALID_ARGUMENT: i32 = 3;
const GRPC_UNAVAILABLE: i32 = 14;

#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Limit for one unary call (and for creating a watch).
    pub request_timeout: Duration,
    /// Limit for establishing a TCP connection to one endpoint before trying the next.
    pub connect_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Pooled keep-alive connections: a call costs one request on a warm connection.
    client: reqwest::Client,
    endpoints: Vec<String>,
    /// Endpoint that answered last; calls start there.
    current: AtomicUsize,
    opts: EtcdOptions,
}

/// Failure of one gateway call, keeping etcd's gRPC status for callers that care.
enum CallError {
    Grpc { code: i32, message: String },
    Store(StoreError),
}

impl From<CallError> for StoreError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Grpc {
                code: GRPC_INVALID_ARGUMENT,
                message,
            } => StoreError::Invalid(message),
            CallError::Grpc { code, message } => StoreError::Unavailable(format!("etcd: {message} (grpc code {code})")),
            CallError::Store(e) => e,
        }
    }
}

/// reqwest's Display hides the cause (refused, reset, ...); include the chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// JSON shapes

fn de_i64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Num(i64),
        Str(String),
    }
    match Repr::deserialize(d)? {
        Repr::Num(n) => Ok(n),
        Repr::Str(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

#[derive(Deserialize, Default)]
struct Header {
    #[serde(default, deserialize_with = "de_i64")]
    revision: i64,
}

#[derive(Deserialize)]
struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "de_i64")]
    create_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    mod_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    version: i64,
}

#[derive(Deserialize)]
struct RangeResponse {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    kvs: Vec<RawKv>,
}

#[derive(Deserialize)]
struct TxnResponse {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    succeeded: bool,
}

#[derive(Deserialize)]
struct GatewayError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: i32,
}

impl GatewayError {
    fn text(self) -> String {
        if self.message.is_empty() {
            self.error
        } else {
            self.message
        }
    }
}

#[derive(Deserialize)]
struct WatchMessage {
    result: Option<WatchResult>,
    error: Option<GatewayError>,
}

#[derive(Deserialize)]
struct WatchResult {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "de_i64")]
    compact_revision: i64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<RawEvent>,
}

#[derive(Deserialize)]
struct RawEvent {
    /// Absent for PUT: the gateway omits enum defaults.
    #[serde(rename = "type", default)]
    kind: String,
    kv: Option<RawKv>,
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

fn convert_kv(raw: RawKv) -> Result<KeyValue> {
    let key = B64
        .decode(raw.key.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("etcd key is not base64: {e}")))?;
    let key = String::from_utf8(key).map_err(|e| StoreError::Corrupt(format!("etcd key is not UTF-8: {e}")))?;
    let value = B64
        .decode(raw.value.as_bytes())
        .map_err(|e| StoreError::Corrupt(format!("etcd value of {key:?} is not base64: {e}")))?;
    Ok(KeyValue {
        key,
        value,
        create_revision: raw.create_revision,
        mod_revision: raw.mod_revision,
        version: raw.version,
    })
}

fn convert_event(raw: RawEvent) -> Result<Event> {
    let kind = match raw.kind.as_str() {
        "" | "PUT" => EventKind::Put,
        "DELETE" => EventKind::Delete,
        other => return Err(StoreError::Corrupt(format!("unknown etcd event type {other:?}"))),
    };
    let kv = raw
        .kv
        .ok_or_else(|| StoreError::Corrupt("etcd event without kv".into()))?;
    Ok(Event {
        kind,
        kv: convert_kv(kv)?,
    })
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
fn prefix_range(prefix: &str) -> (String, String) {
    if prefix.is_empty() {
        (b64(&[0]), b64(&[0]))
    } else {
        (b64(prefix.as_bytes()), b64(&prefix_end(prefix.as_bytes())))
    }
}

fn compare_json(c: &Compare, out: &mut Vec<Value>) {
    match c {
        Compare::Absent(k) => out.push(json!({
            "key": b64(k.as_bytes()), "target": "CREATE", "result": "EQUAL",
            "create_revision": "0",
        })),
        Compare::Exists(k) => out.push(json!({
            "key": b64(k.as_bytes()), "target": "CREATE", "result": "GREATER",
            "create_revision": "0",
        })),
        Compare::ModRevision(k, rev) => {
            out.push(json!({
                "key": b64(k.as_bytes()), "target": "MOD", "result": "EQUAL",
                "mod_revision": rev.to_string(),
            }));
            // etcd sees an absent key as mod_revision 0; our contract says the key must exist.
            if *rev <= 0 {
                compare_json(&Compare::Exists(k.clone()), out);
            }
        }
    }
}

fn op_json(op: &Op) -> Value {
    match op {
        Op::Put { key, value } => {
            json!({"request_put": {"key": b64(key.as_bytes()), "value": b64(value)}})
        }
        Op::Delete { key } => json!({"request_delete_range": {"key": b64(key.as_bytes())}}),
    }
}

// ---------------------------------------------------------------------------------------------
// Calls

impl Inner {
    /// POSTs `body` to `path`, starting at the last good endpoint and moving on when one cannot
    /// be reached. A request that may have reached etcd is retried elsewhere only if
    /// `idempotent`.
    async fn send(
        &self,
        path: &str,
        body: &Value,
        timeout: Option<Duration>,
        idempotent: bool,
    ) -> std::result::Result<reqwest::Response, CallError> {
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut last_err = String::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let url = format!("{}{}", self.endpoints[idx], path);
            let mut req = self.client.post(&url).json(body);
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            // Bound the wait for response headers even when the body is a long-lived stream.
            let sent = tokio::time::timeout(self.opts.request_timeout, req.send()).await;
            let resp = match sent {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) => {
                    let msg = format!("{url}: {}", error_chain(&e));
                    if e.is_connect() || idempotent {
                        debug!(error = %msg, "etcd endpoint failed, trying the next");
                        last_err = msg;
                        continue;
                    }
                    return Err(CallError::Store(StoreError::Unavailable(msg)));
                }
                Err(_) => {
                    let msg = format!("{url}: no response within {:?}", self.opts.request_timeout);
                    if idempotent {
                        last_err = msg;
                        continue;
                    }
                    return Err(CallError::Store(StoreError::Unavailable(msg)));
                }
            };
            if idx != start {
                self.current.store(idx, Ordering::Relaxed);
            }
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            let bytes = resp.bytes().await.unwrap_or_default();
            let err = match serde_json::from_slice::<GatewayError>(&bytes) {
                Ok(g) => CallError::Grpc {
                    code: g.code,
                    message: g.text(),
                },
                Err(_) => {
                    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(512)]).into_owned();
                    CallError::Store(StoreError::Unavailable(format!("{url}: HTTP {status}: {text}")))
                }
            };
            // A member without a leader may be partitioned; another may serve the read.
            if idempotent
                && matches!(
                    err,
                    CallError::Grpc {
                        code: GRPC_UNAVAILABLE,
                        ..
                    }
                )
            {
                if let CallError::Grpc { message, .. } = &err {
                    last_err = format!("{url}: {message}");
                }
                continue;
            }
            return Err(err);
        }
        Err(CallError::Store(StoreError::Unavailable(format!(
            "no etcd endpoint reachable (last error: {last_err})"
        ))))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
        idempotent: bool,
    ) -> std::result::Result<T, CallError> {
        let resp = self
            .send(path, body, Some(self.opts.request_timeout), idempotent)
            .await?;
        let url = resp.url().to_string();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CallError::Store(StoreError::Unavailable(format!("{url}: {}", error_chain(&e)))))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| CallError::Store(StoreError::Unavailable(format!("malformed response from {url}: {e}"))))
    }

    /// Starts a watch stream and waits for etcd to confirm it, so that "from now" (0) really
    /// starts before this returns. Returns the stream and the revision it was created at.
    async fn open_watch(&self, prefix: &str, from: Revision) -> Result<(WatchStream, Revision)> {
        let (key, range_end) = prefix_range(prefix);
        let mut create = json!({"key": key, "range_end": range_end});
        if from > 0 {
            create["start_revision"] = json!(from.to_string());
        }
        let resp = self
            .send("/v3/watch", &json!({ "create_request": create }), None, true)
            .await?;
        let mut stream = WatchStream {
            resp,
            buf: Vec::new(),
            pending: VecDeque::new(),
        };
        let first = tokio::time::timeout(self.opts.request_timeout, stream.next_message())
            .await
            .map_err(|_| StoreError::Unavailable("etcd did not confirm the watch".into()))??;
        match first {
            Some(WatchMessage { result: Some(r), .. }) if r.created => {
                let rev = r.header.revision;
                // It may also carry a cancellation; let the follower see it.
                stream.pending.push_front(WatchMessage {
                    result: Some(r),
                    error: None,
                });
                Ok((stream, rev))
            }
            Some(WatchMessage { error: Some(e), .. }) => {
                Err(StoreError::Unavailable(format!("etcd watch failed: {}", e.text())))
            }
            Some(_) => Err(StoreError::Unavailable("unexpected first etcd watch message".into())),
            None => Err(StoreError::Unavailable("etcd closed the watch stream".into())),
        }
    }
}

/// Incremental parser over the gateway's streamed JSON objects.
struct WatchStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
    pending: VecDeque<WatchMessage>,
}

impl WatchStream {
    /// Next message, or `None` once the server ended the stream.
    async fn next_message(&mut self) -> Result<Option<WatchMessage>> {
        loop {
            if let Some(m) = self.pending.pop_front() {
                return Ok(Some(m));
            }
            let chunk = self
                .resp
                .chunk()
                .await
                .map_err(|e| StoreError::Unavailable(format!("etcd watch stream: {}", error_chain(&e))))?;
            let Some(chunk) = chunk else {
                return Ok(None);
            };
            self.buf.extend_from_slice(&chunk);
            let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter();
            let mut consumed = 0;
            loop {
                match values.next() {
                    Some(Ok(m)) => {
                        consumed = values.byte_offset();
                        self.pending.push_back(m);
                    }
                    // An object cut between two chunks: wait for the rest.
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => return Err(StoreError::Unavailable(format!("malformed etcd watch message: {e}"))),
                    None => {
                        consumed = values.byte_offset();
                        break;
                    }
                }
            }
            self.buf.drain(..consumed);
        }
    }
}

enum FollowEnd {
    /// The watch is over for good (receiver gone, compaction, cancellation).
    Done,
    /// The stream broke; reconnect from the next revision.
    Broken(String),
}

async fn follow(stream: &mut WatchStream, next: &mut Revision, tx: &mpsc::Sender<Result<WatchEvent>>) -> FollowEnd {
    loop {
        let msg = tokio::select! {
            m = stream.next_message() => m,
            _ = tx.closed() => return FollowEnd::Done,
        };
        let r = match msg {
            Err(e) => return FollowEnd::Broken(e.to_string()),
            Ok(None) => return FollowEnd::Broken("stream ended".into()),
            Ok(Some(WatchMessage { error: Some(e), .. })) => return FollowEnd::Broken(e.text()),
            Ok(Some(WatchMessage { result: Some(r), .. })) => r,
            Ok(Some(_)) => continue,
        };
        if r.compact_revision > 0 {
            let _ = tx
                .send(Ok(WatchEvent::Compacted {
                    compact_revision: r.compact_revision,
                }))
                .await;
            return FollowEnd::Done;
        }
        if r.canceled {
            let why = format!("etcd canceled the watch: {}", r.cancel_reason);
            let _ = tx.send(Err(StoreError::Unavailable(why))).await;
            return FollowEnd::Done;
        }
        if r.events.is_empty() {
            continue;
        }
        let mut events = Vec::with_capacity(r.events.len());
        for raw in r.events {
            match convert_event(raw) {
                // Skip anything already delivered before a reconnect.
                Ok(e) if e.kv.mod_revision < *next => {}
                Ok(e) => events.push(e),
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return FollowEnd::Done;
                }
            }
        }
        let Some(last) = events.last() else { continue };
        *next = last.kv.mod_revision + 1;
        if tx.send(Ok(WatchEvent::Events(events))).await.is_err() {
            return FollowEnd::Done;
        }
    }
}

/// Drives one watch until its receiver is dropped or etcd ends it, reconnecting (with backoff,
/// across endpoints) from the revision after the last delivered one.
async fn run_watch(
    inner: Arc<Inner>,
    prefix: String,
    mut next: Revision,
    mut stream: Option<WatchStream>,
    tx: mpsc::Sender<Result<WatchEvent>>,
) {
    let mut backoff = RECONNECT_MIN;
    loop {
        let mut s = match stream.take() {
            Some(s) => s,
            None => {
                let opened = tokio::select! {
                    r = inner.open_watch(&prefix, next) => r,
                    _ = tx.closed() => return,
                };
                match opened {
                    Ok((s, _)) => {
                        debug!(prefix = %prefix, from = next, "etcd watch resumed");
                        backoff = RECONNECT_MIN;
                        s
                    }
                    Err(e) => {
                        warn!(prefix = %prefix, error = %e, "etcd watch reconnect failed");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = tx.closed() => return,
                        }
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                        continue;
                    }
                }
            }
        };
        match follow(&mut s, &mut next, &tx).await {
            FollowEnd::Done => return,
            FollowEnd::Broken(why) => {
                warn!(prefix = %prefix, next_revision = next, reason = %why, "etcd watch broke, resuming");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------

impl EtcdStore {
    /// Connects to the first reachable endpoint (e.g. `http://127.0.0.1:2379`); later calls fail
    /// over to the others when one cannot be reached.
    pub async fn connect(endpoints: Vec<String>) -> Result<Arc<EtcdStore>> {
        Self::connect_with(endpoints, EtcdOptions::default()).await
    }

    pub async fn connect_with(endpoints: Vec<String>, opts: EtcdOptions) -> Result<Arc<EtcdStore>> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoints given".into()));
        }
        let mut norm = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            let e = e.trim().trim_end_matches('/');
            if e.starts_with("https://") {
                return Err(StoreError::Invalid(format!("{e}: TLS endpoints are not supported")));
            }
            norm.push(if e.starts_with("http://") {
                e.to_string()
            } else {
                format!("http://{e}")
            });
        }
        let client = reqwest::Client::builder()
            .connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .http1_only()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("HTTP client: {}", error_chain(&e))))?;
        let store = EtcdStore {
            inner: Arc::new(Inner {
                client,
                endpoints: norm,
                current: AtomicUsize::new(0),
                opts,
            }),
        };
        store.revision().await?;
        Ok(Arc::new(store))
    }

    async fn range(&self, body: Value) -> Result<(Vec<KeyValue>, Revision)> {
        let resp: RangeResponse = self.inner.call("/v3/kv/range", &body, true).await?;
        let kvs = resp.kvs.into_iter().map(convert_kv).collect::<Result<Vec<_>>>()?;
        Ok((kvs, resp.header.revision))
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        if key.is_empty() {
            return Ok(None);
        }
        let (kvs, _) = self.range(json!({"key": b64(key.as_bytes())})).await?;
        Ok(kvs.into_iter().find(|kv| kv.key == key))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        let (key, range_end) = prefix_range(prefix);
        // etcd returns keys in byte order, which is what String ordering is.
        self.range(json!({"key": key, "range_end": range_end})).await
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnResult> {
        // Same checks as the embedded store, so both refuse the same requests (etcd would
        // refuse them too, less clearly). etcd enforces its own size limit.
        crate::embedded::validate_txn(&compares, &ops, usize::MAX)?;
        let mut compare = Vec::with_capacity(compares.len());
        for c in &compares {
            compare_json(c, &mut compare);
        }
        let success: Vec<Value> = ops.iter().map(op_json).collect();
        let body = json!({"compare": compare, "success": success});
        let resp: TxnResponse = self.inner.call("/v3/kv/txn", &body, false).await?;
        Ok(TxnResult {
            succeeded: resp.succeeded,
            revision: resp.header.revision,
        })
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<Watch> {
        if from_revision < 0 {
            return Err(StoreError::Invalid(format!("negative watch revision {from_revision}")));
        }
        let (stream, created) = self.inner.open_watch(prefix, from_revision).await?;
        let next = if from_revision == 0 { created + 1 } else { from_revision };
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(run_watch(
            self.inner.clone(),
            prefix.to_string(),
            next,
            Some(stream),
            tx,
        ));
        Ok(Watch { rx })
    }

    async fn revision(&self) -> Result<Revision> {
        // A count-only range of one key: the cheapest linearizable read that carries a header.
        let (_, rev) = self.range(json!({"key": b64(&[0]), "count_only": true})).await?;
        Ok(rev)
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        if revision <= 0 {
            return Ok(());
        }
        let body = json!({"revision": revision.to_string()});
        match self.inner.call::<IgnoredAny>("/v3/kv/compaction", &body, true).await {
            Ok(_) => Ok(()),
            // Idempotent like the embedded store: already compacted that far is fine.
            Err(CallError::Grpc { message, .. }) if message.contains("has been compacted") => Ok(()),
            Err(CallError::Grpc { message, .. }) if message.contains("future revision") => {
                Err(StoreError::Invalid(message))
            }
            Err(e) => Err(e.into()),
        }
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
    fn parses_gateway_shapes() {
        let m: WatchMessage = serde_json::from_str(
            r#"{"result":{"header":{"revision":"4"},"events":[
                {"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"4"}},
                {"kv":{"key":"YQ==","create_revision":"3","mod_revision":"4","version":"2","value":"YmFy"}}]}}"#,
        )
        .expect("parse");
        let r = m.result.expect("result");
        assert_eq!(r.header.revision, 4);
        let evs: Vec<Event> = r.events.into_iter().map(|e| convert_event(e).expect("event")).collect();
        assert_eq!(evs[0].kind, EventKind::Delete);
        assert_eq!(evs[0].kv.key, "foo");
        assert_eq!(evs[1].kind, EventKind::Put);
        assert_eq!(evs[1].kv.value, b"bar");
        assert_eq!((evs[1].kv.create_revision, evs[1].kv.version), (3, 2));
        let bad = RawKv {
            key: "!!".into(),
            value: String::new(),
            create_revision: 0,
            mod_revision: 0,
            version: 0,
        };
        assert!(matches!(convert_kv(bad), Err(StoreError::Corrupt(_))));
    }
}
