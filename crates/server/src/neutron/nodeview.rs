//! What one node needs to know, and the stream that keeps it informed (selective distribution).
//!
//! A node receives its own ports; for each network it has a port on, that network, its subnets,
//! its other ports and the nodes hosting them. About any other network it receives nothing.
//! For the security groups its own ports use: those groups, their rules, and for every group a
//! rule names as remote group, one `group_member` object per port in it (its addresses),
//! wherever that port is.
//!
//! `GET /isthmus/v1/nodes/{host}/watch` answers newline-delimited JSON: first
//! `{"type":"snapshot","revision":R,"objects":[...]}` with every object the node needs, then
//! `{"type":"update","revision":R,"put":[...],"delete":[keys]}` whenever that set changes, and
//! `{"type":"ping","revision":R}` every 15 s so either side notices a dead connection.
//!
//! Resuming: the agent reconnects with `?since=R`, the last revision it applied. The server
//! remembers, per node, what it last sent and which keys each recent update touched; if that
//! record reaches back to R, it answers `{"type":"resume","since":R,"revision":R2,"put":[...],
//! "delete":[...]}` with only the keys that changed for this node since R. Otherwise (a server
//! restart, another server, or R older than the last 1,024 updates: the analogue of etcd's
//! compaction) it answers with a full snapshot, and the agent relists.
//!
//! One task ([`run_fanout`]) follows the cache's change feed, keeps a [`ViewIndex`], and sends
//! each batch's updates to the streams it concerns, and only to them: a write costs what it
//! touches, not a view computation per open stream. Streams only start (snapshot or resume,
//! computed from the index) and ping.

use super::agents::require_node;
use super::http::{authenticate, ApiResult, HeadRequest};
use super::viewindex::{Change, Source, ViewIndex, ViewObject};
use crate::cache::{Cache, Feed, FeedItem, Typed};
use crate::metrics::{NodeLabels, ServerMetrics, StreamOpen};
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use isthmus_model::{FloatingIp, Network, Node, Port, QosPolicy, Router, SecurityGroup, SecurityGroupRule, Subnet};
use isthmus_store::Revision;
use isthmus_wire::stream::{Message, Object};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Often enough for an agent to notice a dead connection within a minute (it gives up after
/// three silent periods), rarely enough that a thousand idle nodes cost little.
const PING_EVERY: Duration = Duration::from_secs(15);
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

type View = BTreeMap<String, Arc<ViewObject>>;

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keys that may differ between what the node had at `since` and `now`, if the record
    /// reaches back that far.
    fn changed_since(&self, host: &str, since: Revision, now: &View) -> Option<BTreeSet<String>> {
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
        view: &View,
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

    /// The update for stream `gen` of `host` at `revision`, looking at `candidates`, recorded
    /// as sent; `None` when nothing changed for it (or the stream is no longer the owner).
    fn update(
        &self,
        index: &ViewIndex,
        host: &str,
        gen: u64,
        revision: Revision,
        candidates: &BTreeSet<String>,
    ) -> Option<Message> {
        let mut m = self.lock();
        let s = m.get_mut(host).filter(|s| s.gen == gen)?;
        s.revision = revision;
        let (put, delete) = index.delta(host, candidates, &s.view);
        if put.is_empty() && delete.is_empty() {
            return None;
        }
        let mut touched = Vec::with_capacity(put.len() + delete.len());
        for (k, o) in &put {
            s.view.insert(k.clone(), o.revision);
            touched.push(k.clone());
        }
        for k in &delete {
            s.view.remove(k);
            touched.push(k.clone());
        }
        s.log.push_back((revision, touched));
        trim(s);
        Some(Message::Update {
            revision: Some(revision),
            put: put.iter().map(|(k, o)| object(k, o)).collect(),
            delete,
        })
    }

    /// The keys `host` was last sent.
    fn sent_keys(&self, host: &str) -> Vec<String> {
        self.lock()
            .get(host)
            .map(|s| s.view.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Stream `gen` of `host` is known to be current as of `revision` (a ping went out).
    fn touch(&self, host: &str, gen: u64, revision: Revision) {
        if let Some(s) = self.lock().get_mut(host).filter(|s| s.gen == gen) {
            s.revision = s.revision.max(revision);
        }
    }

    /// Stream `gen` of `host` ended (or fell behind and is ended): it no longer owns the
    /// record, which stays for the resume.
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

/// A stream's way out: where the fan-out task writes its updates.
struct Slot {
    gen: u64,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>,
}

#[derive(Default)]
struct FanoutInner {
    index: ViewIndex,
    /// The cache revision the index reflects.
    revision: Revision,
    streams: HashMap<String, Slot>,
}

/// The node views of all nodes, kept by one task from the cache's change feed.
#[derive(Default)]
pub struct Fanout {
    inner: Mutex<FanoutInner>,
}

/// The typed collections node views are made of.
const VIEW_COLLECTIONS: [&str; 9] = [
    isthmus_model::QosPolicy::COLLECTION,
    isthmus_model::Port::COLLECTION,
    isthmus_model::Network::COLLECTION,
    isthmus_model::Subnet::COLLECTION,
    isthmus_model::Node::COLLECTION,
    isthmus_model::SecurityGroup::COLLECTION,
    isthmus_model::SecurityGroupRule::COLLECTION,
    isthmus_model::Router::COLLECTION,
    isthmus_model::FloatingIp::COLLECTION,
];

fn change(item: &FeedItem) -> Option<Change> {
    if !super::viewindex::is_view_key(&item.key) {
        return None;
    }
    let value = item.decoded.as_ref().and_then(|d| {
        let d = d.clone();
        d.clone()
            .downcast::<Port>()
            .map(Source::Port)
            .or_else(|_| d.clone().downcast::<Network>().map(Source::Network))
            .or_else(|_| d.clone().downcast::<Subnet>().map(Source::Subnet))
            .or_else(|_| d.clone().downcast::<Node>().map(Source::Node))
            .or_else(|_| d.clone().downcast::<SecurityGroup>().map(Source::SecurityGroup))
            .or_else(|_| d.clone().downcast::<Router>().map(Source::Router))
            .or_else(|_| d.clone().downcast::<FloatingIp>().map(Source::FloatingIp))
            .or_else(|_| d.clone().downcast::<QosPolicy>().map(Source::QosPolicy))
            .or_else(|_| d.downcast::<SecurityGroupRule>().map(Source::SecurityGroupRule))
            .ok()
    });
    Some(Change {
        key: item.key.clone(),
        revision: item.revision,
        value,
    })
}

impl Fanout {
    fn lock(&self) -> std::sync::MutexGuard<'_, FanoutInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuilds the index from the cache and brings every open stream up to it (at start,
    /// and when the feed was lost: the cache reloaded, or this task fell behind).
    fn rebuild(&self, cache: &Cache, sessions: &Sessions, metrics: &ServerMetrics) {
        let (items, revision) = cache.typed_state(&VIEW_COLLECTIONS);
        let mut index = ViewIndex::new();
        index.load(items.iter().filter_map(change).collect());
        let mut f = self.lock();
        // Each open stream: what it was sent, against its view now.
        let hosts: Vec<String> = f.streams.keys().cloned().collect();
        for host in hosts {
            let mut cand = index.view_keys(&host);
            cand.extend(sessions.sent_keys(&host));
            f.send(&index, sessions, metrics, &host, revision, &cand);
        }
        f.index = index;
        f.revision = revision;
        tracing::info!(revision, objects = f.index.len(), "node views rebuilt");
    }

    fn apply(&self, sessions: &Sessions, metrics: &ServerMetrics, revision: Revision, items: &[FeedItem]) {
        let changes: Vec<Change> = items.iter().filter_map(change).collect();
        let mut f = self.lock();
        if revision <= f.revision {
            return; // already in the index (a rebuild read it)
        }
        f.revision = revision;
        if changes.is_empty() {
            return;
        }
        let affected = f.index.apply(changes);
        let index = std::mem::take(&mut f.index);
        for (host, cand) in &affected {
            f.send(&index, sessions, metrics, host, revision, cand);
        }
        f.index = index;
    }
}

impl FanoutInner {
    /// Sends `host`'s stream (if open) what changed for it among `cand`. A stream that cannot
    /// take it (its client reads too slowly) is ended; the node resumes when it reconnects.
    fn send(
        &mut self,
        index: &ViewIndex,
        sessions: &Sessions,
        metrics: &ServerMetrics,
        host: &str,
        revision: Revision,
        cand: &BTreeSet<String>,
    ) {
        let Some(slot) = self.streams.get(host) else { return };
        let Some(msg) = sessions.update(index, host, slot.gen, revision, cand) else {
            return;
        };
        let sent = slot.tx.try_send(line(&msg));
        if sent.is_ok() {
            metrics
                .node_updates
                .get_or_create(&NodeLabels { node: host.to_string() })
                .inc();
        }
        if let Err(e) = sent {
            let full = matches!(e, tokio::sync::mpsc::error::TrySendError::Full(_));
            if full {
                tracing::warn!(
                    host,
                    revision,
                    "node stream fell behind; ending it (the node resumes on reconnect)"
                );
            }
            sessions.end(host, slot.gen);
            self.streams.remove(host);
        }
    }
}

/// Builds every node's view from the cache now, then follows the cache in a task of its own
/// and fans each change out to the node streams it concerns.
pub fn start_fanout(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    let mut feed = state.cache.feed();
    state
        .neutron
        .fanout
        .rebuild(&state.cache, &state.neutron.node_sessions, &state.metrics);
    tokio::spawn(async move {
        let cache = state.cache.clone();
        let sessions = &state.neutron.node_sessions;
        let fanout = &state.neutron.fanout;
        let metrics = &*state.metrics;
        loop {
            match feed.recv().await {
                Ok(ev) => match ev.as_ref() {
                    Feed::Batch { revision, items } => {
                        let started = std::time::Instant::now();
                        fanout.apply(sessions, metrics, *revision, items);
                        metrics.fanout_duration.observe(started.elapsed().as_secs_f64());
                    }
                    Feed::Reset => {
                        feed = cache.feed();
                        fanout.rebuild(&cache, sessions, metrics);
                    }
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "node view fan-out fell behind the cache; rebuilding");
                    feed = cache.feed();
                    fanout.rebuild(&cache, sessions, metrics);
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    })
}

fn object(key: &str, o: &ViewObject) -> Object {
    Object {
        key: key.to_string(),
        revision: o.revision,
        value: o.value.clone(),
    }
}

fn line(m: &Message) -> Result<Bytes, Infallible> {
    // Serializing these types cannot fail (string keys, no non-finite floats).
    let mut s = serde_json::to_vec(m).unwrap_or_default();
    s.push(b'\n');
    Ok(Bytes::from(s))
}

/// The first message of a stream: a resume if the node's record reaches back to `since`,
/// else a snapshot. Returns the message and the keys it touched (for a resume).
fn first_message(
    sessions: &Sessions,
    host: &str,
    since: Option<Revision>,
    rev: Revision,
    now: &View,
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

/// Turned on when the server shuts down: open streams end, so their nodes reconnect (to another
/// server) instead of holding the shutdown up.
pub struct Stopping(tokio::sync::watch::Sender<bool>);

impl Default for Stopping {
    fn default() -> Self {
        Stopping(tokio::sync::watch::channel(false).0)
    }
}

impl Stopping {
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
    fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.0.subscribe()
    }
}

/// Lines a stream may have queued before it counts as fallen behind.
const STREAM_QUEUE: usize = 256;

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
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(STREAM_QUEUE);
    let (stop_tx, mut stop) = tokio::sync::oneshot::channel();
    let sessions = &state.neutron.node_sessions;
    // Under the fan-out's lock: the first message and the registration happen at one
    // revision, so the stream misses no update and gets none twice.
    let gen = {
        let mut f = state.neutron.fanout.lock();
        let rev = f.revision;
        let now = f.index.view(&host);
        let (first, touched) = first_message(sessions, &host, since, rev, &now);
        let gen = sessions.start(&host, &now, rev, touched, stop_tx);
        // The queue is new and empty: this cannot fail.
        let _ = tx.try_send(line(&first));
        f.streams.insert(host.clone(), Slot { gen, tx: tx.clone() });
        gen
    };
    let st = state.clone();
    let open = StreamOpen::new(&state.metrics.node_streams_open);
    let mut server_stopping = state.neutron.stopping.subscribe();
    tokio::spawn(async move {
        let _open = open;
        let sessions = &st.neutron.node_sessions;
        // One ticker for the stream's life: a busy cache must not keep postponing pings. Often
        // enough that the connection's idle timeout never sees a quiet stream.
        let every = PING_EVERY.min(Duration::from_secs(st.config.idle_timeout_secs) / 3);
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // A newer stream of this node took over, or this one fell behind: end it.
                _ = &mut stop => {
                    tracing::info!(host = %host, "node watch replaced by a newer one or fell behind");
                    break;
                }
                _ = tx.closed() => break,
                Ok(_) = server_stopping.wait_for(|s| *s) => {
                    tracing::info!(host = %host, "closing the node watch: the server is shutting down");
                    break;
                }
                _ = ping.tick() => {
                    // Under the fan-out's lock, so a ping never overtakes an update of an
                    // older revision still being written.
                    let f = st.neutron.fanout.lock();
                    let rev = f.revision;
                    match tx.try_send(line(&Message::Ping { revision: Some(rev) })) {
                        Ok(()) => sessions.touch(&host, gen, rev),
                        Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {}
                        Err(_) => break,
                    }
                }
            }
        }
        {
            let mut f = st.neutron.fanout.lock();
            if f.streams.get(&host).is_some_and(|s| s.gen == gen) {
                f.streams.remove(&host);
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
