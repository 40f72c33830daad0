//! What one node needs to know, and the stream that keeps it informed (selective distribution).
//!
//! A node receives its own ports; for each network it has a port on, that network, its subnets,
//! its other ports and the nodes hosting them. About any other network it receives nothing.
//!
//! `GET /isthmus/v1/nodes/{host}/watch` answers newline-delimited JSON: first
//! `{"type":"snapshot","revision":R,"objects":[...]}` with every object the node needs, then
//! `{"type":"update","revision":R,"put":[...],"delete":[keys]}` whenever that set changes, and
//! `{"type":"ping","revision":R}` every few seconds so either side notices a dead connection.
//!
//! Resuming: the agent reconnects with `?since=R`, the last revision it applied. The server
//! remembers, per node, what it last sent and which keys each recent update touched; if that
//! record reaches back to R, it answers `{"type":"resume","since":R,"revision":R2,"put":[...],
//! "delete":[...]}` with only the keys that changed for this node since R. Otherwise (a server
//! restart, another server, or R older than the last 1,024 updates: the analogue of etcd's
//! compaction) it answers with a full snapshot, and the agent relists.

use super::agents::require_node;
use super::http::{authenticate, ApiResult, HeadRequest};
use crate::cache::{Cache, Typed};
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use isthmus_model::{keys, Network, Node, Port, Subnet};
use isthmus_store::Revision;
use isthmus_wire::stream::{Message, NodeInfo, Object, ObjectValue};
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PING_EVERY: Duration = Duration::from_secs(5);
/// Updates remembered per node for resuming; older revisions get a snapshot instead.
const RESUME_LOG: usize = 1024;

/// What the server last sent each node, so a reconnect can resume instead of relisting.
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<String, Session>>,
    next_gen: std::sync::atomic::AtomicU64,
}

struct Session {
    /// The stream that owns this record; an older stream of the same node must not write.
    gen: u64,
    /// Key → revision of everything sent, as of `revision`.
    view: BTreeMap<String, Revision>,
    revision: Revision,
    /// The oldest revision a resume can start from.
    floor: Revision,
    /// Keys each update touched, oldest first.
    log: VecDeque<(Revision, Vec<String>)>,
    /// Held by the stream that owns the record; dropping it ends that stream, so a node has
    /// at most one stream (each costs a view computation per change).
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys that may differ between what the node had at `since` and `now`, if the record
    /// reaches back that far.
    fn changed_since(
        &self,
        host: &str,
        since: Revision,
        now: &BTreeMap<String, ViewObject>,
    ) -> Option<BTreeSet<String>> {
        let m = self.lock();
        let s = m.get(host)?;
        if since < s.floor || since > s.revision {
            return None;
        }
        let mut touched: BTreeSet<String> = s
            .log
            .iter()
            .filter(|(r, _)| *r > since)
            .flat_map(|(_, ks)| ks.iter().cloned())
            .collect();
        for (k, o) in now {
            if s.view.get(k) != Some(&o.revision) {
                touched.insert(k.clone());
            }
        }
        touched.extend(s.view.keys().filter(|k| !now.contains_key(*k)).cloned());
        Some(touched)
    }

    /// A new stream for `host` took over: it owns the record from now on.
    /// `resumed` carries the keys the resume message touched; `None` after a snapshot.
    /// The node's previous stream, if any, ends.
    fn start(
        &self,
        host: &str,
        view: &BTreeMap<String, ViewObject>,
        revision: Revision,
        resumed: Option<Vec<String>>,
        stop: tokio::sync::oneshot::Sender<()>,
    ) -> u64 {
        let gen = self.next_gen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut m = self.lock();
        let keys = view.iter().map(|(k, o)| (k.clone(), o.revision)).collect();
        match (m.get_mut(host), resumed) {
            (Some(s), Some(touched)) => {
                // Keep the log: the new stream continues the old one's history.
                s.log.push_back((revision, touched));
                s.gen = gen;
                s.view = keys;
                s.revision = revision;
                s.stop = Some(stop);
                trim(s);
            }
            _ => {
                m.insert(
                    host.to_string(),
                    Session {
                        gen,
                        view: keys,
                        revision,
                        floor: revision,
                        log: VecDeque::new(),
                        stop: Some(stop),
                    },
                );
            }
        }
        gen
    }

    fn record(
        &self,
        host: &str,
        gen: u64,
        view: &BTreeMap<String, ViewObject>,
        revision: Revision,
        touched: Vec<String>,
    ) {
        let mut m = self.lock();
        let Some(s) = m.get_mut(host).filter(|s| s.gen == gen) else {
            return;
        };
        if !touched.is_empty() {
            s.log.push_back((revision, touched));
            s.view = view.iter().map(|(k, o)| (k.clone(), o.revision)).collect();
        }
        s.revision = revision;
        trim(s);
    }
}

impl Sessions {
    /// The stream `gen` of `host` ended: it no longer owns the record (kept for resuming).
    fn end(&self, host: &str, gen: u64) {
        if let Some(s) = self.lock().get_mut(host).filter(|s| s.gen == gen) {
            s.stop = None;
        }
    }

    /// Streams open now, over all nodes: at most one per node.
    pub fn open_streams(&self) -> usize {
        self.lock().values().filter(|s| s.stop.is_some()).count()
    }

    /// Nodes with a resume record (one per node that ever streamed, whatever the streams).
    pub fn nodes(&self) -> usize {
        self.lock().len()
    }
}

fn trim(s: &mut Session) {
    while s.log.len() > RESUME_LOG {
        if let Some((r, _)) = s.log.pop_front() {
            s.floor = s.floor.max(r);
        }
    }
}

/// One object of a node's view: its store key, the revision it was written at, and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewObject {
    pub revision: Revision,
    pub value: ObjectValue,
}

/// The Neutron rendering, typed for the stream (lossless: attributes nodes do not use are
/// carried as they are).
fn typed<T: DeserializeOwned>(key: &str, rendered: serde_json::Value) -> Option<T> {
    serde_json::from_value(rendered)
        .inspect_err(|e| tracing::warn!(key, error = %e, "left out of node views: unexpected rendering"))
        .ok()
}

/// The node's view as of the cache's current state, keyed by store key.
pub fn compute(cache: &Cache, host: &str) -> BTreeMap<String, ViewObject> {
    let mut out = BTreeMap::new();
    let ports: Vec<(String, Arc<Port>, Revision)> = cache
        .list_typed::<Port>()
        .into_iter()
        .map(|(p, rev)| (keys::resource(Port::COLLECTION, &p.id), p, rev))
        .collect();
    let nets: BTreeSet<&str> = ports
        .iter()
        .filter(|(_, p, _)| p.binding_host_id == host)
        .map(|(_, p, _)| p.network_id.as_str())
        .collect();
    if nets.is_empty() {
        return out;
    }
    let mut hosts: BTreeSet<&str> = BTreeSet::new();
    for (k, p, rev) in &ports {
        if nets.contains(p.network_id.as_str()) {
            if !p.binding_host_id.is_empty() {
                hosts.insert(&p.binding_host_id);
            }
            if let Some(v) = typed(k, p.to_api(true)) {
                out.insert(
                    k.clone(),
                    ViewObject {
                        revision: *rev,
                        value: ObjectValue::Port(v),
                    },
                );
            }
        }
    }
    for net in &nets {
        let k = keys::resource("networks", net);
        if let Some((n, rev)) = cache.get_typed::<Network>(&k) {
            if let Some(v) = typed(&k, n.to_api(true)) {
                out.insert(
                    k,
                    ViewObject {
                        revision: rev,
                        value: ObjectValue::Network(v),
                    },
                );
            }
        }
    }
    for (s, rev) in cache.list_typed::<Subnet>() {
        if nets.contains(s.network_id.as_str()) {
            let k = keys::resource(Subnet::COLLECTION, &s.id);
            if let Some(v) = typed(&k, s.to_api()) {
                out.insert(
                    k,
                    ViewObject {
                        revision: rev,
                        value: ObjectValue::Subnet(v),
                    },
                );
            }
        }
    }
    for h in hosts {
        let k = keys::resource("nodes", h);
        if let Some((n, rev)) = cache.get_typed::<Node>(&k) {
            let value = ObjectValue::Node(NodeInfo {
                host: n.host,
                underlay_ip: n.underlay_ip,
                capabilities: n.capabilities,
            });
            out.insert(k, ViewObject { revision: rev, value });
        }
    }
    out
}

fn object(key: &str, o: &ViewObject) -> Object {
    Object {
        key: key.to_string(),
        revision: o.revision,
        value: o.value.clone(),
    }
}

/// Changes from `old` to `new`: objects to put (new or rewritten) and keys to delete.
pub fn diff(old: &BTreeMap<String, ViewObject>, new: &BTreeMap<String, ViewObject>) -> (Vec<Object>, Vec<String>) {
    let put = new
        .iter()
        // By value: a node's heartbeat rewrites its record (new revision) without changing
        // what a peer sees of it, and that must not reach every peer.
        .filter(|(k, o)| old.get(*k).is_none_or(|x| x.value != o.value))
        .map(|(k, o)| object(k, o))
        .collect();
    let delete = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
    (put, delete)
}

fn line(m: &Message) -> Result<Bytes, Infallible> {
    // Serializing these types cannot fail (string keys, no non-finite floats).
    let mut s = serde_json::to_vec(m).unwrap_or_default();
    s.push(b'\n');
    Ok(Bytes::from(s))
}

/// The first message of a stream: a resume if the node's record reaches back to `since`,
/// else a snapshot. Returns the message, the keys it touched (for a resume) and a log line.
fn first_message(
    sessions: &Sessions,
    host: &str,
    since: Option<Revision>,
    rev: Revision,
    now: &BTreeMap<String, ViewObject>,
) -> (Message, Option<Vec<String>>) {
    if let Some(since) = since {
        if let Some(touched) = sessions.changed_since(host, since, now) {
            let put: Vec<Object> = touched
                .iter()
                .filter_map(|k| now.get(k).map(|o| object(k, o)))
                .collect();
            let delete: Vec<String> = touched.iter().filter(|k| !now.contains_key(*k)).cloned().collect();
            tracing::info!(host = %host, since, revision = rev, put = put.len(), delete = delete.len(), "node watch resumed");
            let msg = Message::Resume {
                since: Some(since),
                revision: Some(rev),
                put,
                delete,
            };
            return (msg, Some(touched.into_iter().collect()));
        }
        tracing::info!(host = %host, since, "cannot resume from that revision; sending a snapshot");
    }
    let objects: Vec<Object> = now.iter().map(|(k, o)| object(k, o)).collect();
    tracing::info!(host = %host, objects = objects.len(), revision = rev, "node watch started");
    (Message::Snapshot { revision: rev, objects }, None)
}

pub async fn watch(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(host): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    head: Option<axum::Extension<HeadRequest>>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    require_node(&auth, &host, &format!("watch {host}'s view"))?;
    if head.is_some() {
        // A HEAD must not start a stream: that would end the node's real one.
        return Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/x-ndjson")]).into_response());
    }
    let since = match query.get("since") {
        None => None,
        Some(s) => Some(
            s.parse::<Revision>()
                .map_err(|_| isthmus_model::NeutronError::invalid_attr("since", format!("'{s}' is not a revision")))?,
        ),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let cache = state.cache.clone();
    let st = state.clone();
    tokio::spawn(async move {
        let sessions = &st.neutron.node_sessions;
        let mut changes = cache.subscribe();
        let mut rev = *changes.borrow_and_update();
        let mut sent = compute(&cache, &host);
        let (first, touched) = first_message(sessions, &host, since, rev, &sent);
        let (stop_tx, mut stop) = tokio::sync::oneshot::channel();
        let gen = sessions.start(&host, &sent, rev, touched, stop_tx);
        if tx.send(line(&first)).await.is_err() {
            sessions.end(&host, gen);
            return;
        }
        // One ticker for the stream's life: a busy cache must not keep postponing pings. Often
        // enough that the connection's idle timeout never sees a quiet stream.
        let every = PING_EVERY.min(Duration::from_secs(st.config.idle_timeout_secs) / 3);
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // A newer stream of this node took over (or the client left): end this one.
                _ = &mut stop => {
                    tracing::info!(host = %host, "node watch replaced by a newer one");
                    break;
                }
                _ = tx.closed() => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    rev = *changes.borrow_and_update();
                    let now = compute(&cache, &host);
                    let (put, delete) = diff(&sent, &now);
                    sent = now;
                    if put.is_empty() && delete.is_empty() {
                        continue;
                    }
                    let touched: Vec<String> = put
                        .iter()
                        .map(|o| o.key.clone())
                        .chain(delete.iter().cloned())
                        .collect();
                    let msg = Message::Update {
                        revision: Some(rev),
                        put,
                        delete,
                    };
                    if tx.send(line(&msg)).await.is_err() {
                        break;
                    }
                    sessions.record(&host, gen, &sent, rev, touched);
                }
                _ = ping.tick() => {
                    if tx.send(line(&Message::Ping { revision: Some(rev) })).await.is_err() {
                        break;
                    }
                    sessions.record(&host, gen, &sent, rev, vec![]);
                }
            }
        }
        sessions.end(&host, gen);
        tracing::info!(host = %host, "node watch ended");
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}
