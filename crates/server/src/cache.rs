//! A watch-fed, in-memory copy of everything under the Isthmus key root.
//!
//! Reads are served from here; writes go to the store and then wait until the cache has seen
//! their revision, so a client reads its own writes from the server it wrote through.
//!
//! Values of the typed collections (see [`Typed`]) are decoded once, when they arrive, so
//! reads hand out the decoded objects instead of parsing JSON on every call.

use crate::identity::model::{Project, Role, User};
use isthmus_model::{
    keys, AddressScope, FloatingIp, Network, Node, Port, QosPolicy, RbacPolicy, Router, SecurityGroup,
    SecurityGroupRule, Subnet, SubnetPool, Trunk,
};
use isthmus_store::{DynStore, EventKind, KeyValue, Revision, TxnResult, WatchEvent};
use prometheus_client::metrics::histogram::Histogram;
use serde::de::DeserializeOwned;
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// A stored object type the cache keeps decoded: every key `<root><COLLECTION>/<id>` holds one.
pub trait Typed: DeserializeOwned + Clone + Send + Sync + 'static {
    /// The collection's path under the key root (e.g. `networks`, `identity/users`).
    const COLLECTION: &'static str;
}

impl Typed for Project {
    const COLLECTION: &'static str = "identity/projects";
}
impl Typed for User {
    const COLLECTION: &'static str = "identity/users";
}
impl Typed for Role {
    const COLLECTION: &'static str = "identity/roles";
}

impl Typed for Network {
    const COLLECTION: &'static str = "networks";
}
impl Typed for Subnet {
    const COLLECTION: &'static str = "subnets";
}
impl Typed for Port {
    const COLLECTION: &'static str = "ports";
}
impl Typed for Router {
    const COLLECTION: &'static str = "routers";
}
impl Typed for FloatingIp {
    const COLLECTION: &'static str = "floatingips";
}
impl Typed for SecurityGroup {
    const COLLECTION: &'static str = "security_groups";
}
impl Typed for SecurityGroupRule {
    const COLLECTION: &'static str = "security_group_rules";
}
impl Typed for SubnetPool {
    const COLLECTION: &'static str = "subnetpools";
}
impl Typed for AddressScope {
    const COLLECTION: &'static str = "address_scopes";
}
impl Typed for QosPolicy {
    const COLLECTION: &'static str = "qos_policies";
}
impl Typed for RbacPolicy {
    const COLLECTION: &'static str = "rbac_policies";
}
impl Typed for Trunk {
    const COLLECTION: &'static str = "trunks";
}
impl Typed for Node {
    const COLLECTION: &'static str = "nodes";
}

type Decoded = Arc<dyn Any + Send + Sync>;
type Decoder = fn(&[u8]) -> serde_json::Result<Decoded>;

fn decode_as<T: Typed>(bytes: &[u8]) -> serde_json::Result<Decoded> {
    Ok(Arc::new(serde_json::from_slice::<T>(bytes)?))
}

/// The typed collections and their decoders.
const DECODERS: &[(&str, Decoder)] = &[
    (Network::COLLECTION, decode_as::<Network>),
    (Subnet::COLLECTION, decode_as::<Subnet>),
    (Port::COLLECTION, decode_as::<Port>),
    (Router::COLLECTION, decode_as::<Router>),
    (FloatingIp::COLLECTION, decode_as::<FloatingIp>),
    (SecurityGroup::COLLECTION, decode_as::<SecurityGroup>),
    (SecurityGroupRule::COLLECTION, decode_as::<SecurityGroupRule>),
    (SubnetPool::COLLECTION, decode_as::<SubnetPool>),
    (AddressScope::COLLECTION, decode_as::<AddressScope>),
    (QosPolicy::COLLECTION, decode_as::<QosPolicy>),
    (RbacPolicy::COLLECTION, decode_as::<RbacPolicy>),
    (Trunk::COLLECTION, decode_as::<Trunk>),
    (Node::COLLECTION, decode_as::<Node>),
    (Project::COLLECTION, decode_as::<Project>),
    (User::COLLECTION, decode_as::<User>),
    (Role::COLLECTION, decode_as::<Role>),
];

/// One key's value as the store has it, and decoded if its collection is typed.
struct Entry {
    kv: Arc<KeyValue>,
    decoded: Option<Decoded>,
}

impl Entry {
    fn new(kv: KeyValue) -> Self {
        let decoded = kv
            .key
            .strip_prefix(keys::ROOT)
            .and_then(|rest| rest.rsplit_once('/'))
            .filter(|(_, id)| !id.is_empty())
            .and_then(|(coll, _)| DECODERS.iter().find(|(c, _)| *c == coll))
            .and_then(|(_, decode)| match decode(&kv.value) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "undecodable value in store; ignoring it");
                    None
                }
            });
        Self {
            kv: Arc::new(kv),
            decoded,
        }
    }

    /// The decoded object, if this entry holds a `T`; else decoded now (a key outside the
    /// typed collections), `None` if it cannot be.
    fn typed<T: Typed>(&self) -> Option<Arc<T>> {
        if let Some(d) = &self.decoded {
            if let Ok(t) = d.clone().downcast::<T>() {
                return Some(t);
            }
        }
        match serde_json::from_slice::<T>(&self.kv.value) {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => {
                tracing::error!(key = %self.kv.key, error = %e, "undecodable value in store; ignoring it");
                None
            }
        }
    }
}

fn entries(kvs: Vec<KeyValue>) -> BTreeMap<String, Entry> {
    kvs.into_iter().map(|kv| (kv.key.clone(), Entry::new(kv))).collect()
}

pub struct Cache {
    inner: RwLock<BTreeMap<String, Entry>>,
    revision: watch::Sender<Revision>,
    feed: broadcast::Sender<Arc<Feed>>,
    /// How long writers wait for the watch to show their revision.
    lag: Histogram,
}

/// One change to a key, decoded if its collection is typed (`None`: deleted).
pub struct FeedItem {
    pub key: String,
    pub revision: Revision,
    pub decoded: Option<Arc<dyn Any + Send + Sync>>,
}

/// What the cache tells its followers, in order: the changes of each watch batch (whole
/// transactions), or that it was reloaded and they must start over from [`Cache::typed_state`].
pub enum Feed {
    Batch { revision: Revision, items: Vec<FeedItem> },
    Reset,
}

/// Batches a follower may fall behind by before it is told to start over (`Lagged`).
const FEED_CAPACITY: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache did not reach revision {0} in time")]
    Timeout(Revision),
}

impl Cache {
    /// Lists the store and keeps following it in a background task.
    pub async fn start(store: DynStore) -> isthmus_store::Result<Arc<Self>> {
        Self::start_with_lag(store, Histogram::new(crate::metrics::latency_buckets())).await
    }

    /// [`Cache::start`], timing in `lag` how long writers wait for the watch to show them.
    pub async fn start_with_lag(store: DynStore, lag: Histogram) -> isthmus_store::Result<Arc<Self>> {
        let (kvs, rev) = store.list(isthmus_model::keys::ROOT).await?;
        let cache = Arc::new(Self {
            inner: RwLock::new(entries(kvs)),
            revision: watch::channel(rev).0,
            feed: broadcast::channel(FEED_CAPACITY).0,
            lag,
        });
        let c = cache.clone();
        tokio::spawn(async move { c.follow(store).await });
        Ok(cache)
    }

    async fn follow(self: Arc<Self>, store: DynStore) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let from = *self.revision.borrow() + 1;
            let mut w = match store.watch(isthmus_model::keys::ROOT, from).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "cache watch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(50);
            while let Some(ev) = w.rx.recv().await {
                match ev {
                    Ok(WatchEvent::Events(events)) => self.apply(events),
                    Ok(WatchEvent::Compacted { compact_revision }) => {
                        tracing::warn!(compact_revision, "cache fell behind compaction; relisting");
                        if let Err(e) = self.relist(&store).await {
                            tracing::warn!(error = %e, "cache relist failed");
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cache watch error; resuming");
                        break;
                    }
                }
            }
        }
    }

    async fn relist(&self, store: &DynStore) -> isthmus_store::Result<()> {
        let (kvs, rev) = store.list(isthmus_model::keys::ROOT).await?;
        let mut m = self.inner.write().unwrap_or_else(|p| p.into_inner());
        *m = entries(kvs);
        // Under the lock, so a reader sees the map and its revision agree.
        self.revision.send_replace(rev);
        let _ = self.feed.send(Arc::new(Feed::Reset));
        Ok(())
    }

    fn apply(&self, events: Vec<isthmus_store::Event>) {
        let mut max = *self.revision.borrow();
        let mut items = Vec::with_capacity(events.len());
        let mut m = self.inner.write().unwrap_or_else(|p| p.into_inner());
        for ev in events {
            max = max.max(ev.kv.mod_revision);
            let (key, revision) = (ev.kv.key.clone(), ev.kv.mod_revision);
            let decoded = match ev.kind {
                EventKind::Put => {
                    let e = Entry::new(ev.kv);
                    let d = e.decoded.clone();
                    m.insert(key.clone(), e);
                    d
                }
                EventKind::Delete => {
                    m.remove(&key);
                    None
                }
            };
            items.push(FeedItem { key, revision, decoded });
        }
        // Under the lock, so a reader sees the map and its revision agree, and followers get
        // batches in the order they were applied.
        self.revision.send_replace(max);
        if self.feed.receiver_count() > 0 {
            let _ = self.feed.send(Arc::new(Feed::Batch { revision: max, items }));
        }
    }

    /// Follows every change from now on (see [`Feed`]).
    pub fn feed(&self) -> broadcast::Receiver<Arc<Feed>> {
        self.feed.subscribe()
    }

    /// Every object of the typed collections `colls` with its revision, and the revision
    /// they are all as of, read at one instant.
    pub fn typed_state(&self, colls: &[&str]) -> (Vec<FeedItem>, Revision) {
        let m = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut out = vec![];
        for c in colls {
            let prefix = keys::collection(c);
            out.extend(
                m.range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .filter_map(|(k, e)| {
                        Some(FeedItem {
                            key: k.clone(),
                            revision: e.kv.mod_revision,
                            decoded: Some(e.decoded.clone()?),
                        })
                    }),
            );
        }
        (out, *self.revision.borrow())
    }

    /// Notified whenever the cache moves to a new revision.
    pub fn subscribe(&self) -> watch::Receiver<Revision> {
        self.revision.subscribe()
    }

    pub fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// Waits until the cache reflects `rev` (bounded, so a stuck watch shows up as an error).
    pub async fn wait_for(&self, rev: Revision) -> Result<(), CacheError> {
        let mut rx = self.revision.subscribe();
        let started = std::time::Instant::now();
        let reached = async move { rx.wait_for(|r| *r >= rev).await.is_ok() };
        match tokio::time::timeout(Duration::from_secs(10), reached).await {
            Ok(true) => {
                self.lag.observe(started.elapsed().as_secs_f64());
                Ok(())
            }
            _ => Err(CacheError::Timeout(rev)),
        }
    }

    /// After a failed compare-and-swap: waits until the cache shows every key the
    /// transaction compared as the store had it then — up to the highest revision among them
    /// that exist, and past the delete of those that did not exist but are still cached.
    /// Unlike waiting for the store's global revision, this does not depend on writes
    /// outside the cache's prefix (which it never sees). Bounded like [`Cache::wait_for`].
    pub async fn wait_for_conflict(&self, res: &TxnResult) -> Result<(), CacheError> {
        let mut rx = self.revision.subscribe();
        let target = res.compared_revision;
        // Keys the store no longer has but the cache still shows (at this revision): their
        // delete is on its way.
        let stale: Vec<(&str, Revision)> = res
            .compared_absent
            .iter()
            .filter_map(|k| self.get(k).map(|kv| (k.as_str(), kv.mod_revision)))
            .collect();
        let caught_up = |c: &Self| {
            c.revision() >= target
                && stale
                    .iter()
                    .all(|(k, m)| c.get(k).map(|kv| kv.mod_revision) != Some(*m))
        };
        let reached = async {
            loop {
                if caught_up(self) {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), reached).await {
            Ok(true) => Ok(()),
            _ => Err(CacheError::Timeout(target)),
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<KeyValue>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|e| e.kv.clone())
    }

    /// Everything under `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Vec<Arc<KeyValue>> {
        let m = self.inner.read().unwrap_or_else(|p| p.into_inner());
        m.range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e.kv.clone())
            .collect()
    }

    /// The object at `key`, decoded when it arrived (cloned out of the cache).
    pub fn get_typed<T: Typed>(&self, key: &str) -> Option<(T, Revision)> {
        let (t, rev) = {
            let m = self.inner.read().unwrap_or_else(|p| p.into_inner());
            let e = m.get(key)?;
            (e.typed::<T>()?, e.kv.mod_revision)
        };
        Some((Arc::unwrap_or_clone(t), rev))
    }

    /// The object `id` of `T`'s collection.
    pub fn get_object<T: Typed>(&self, id: &str) -> Option<(T, Revision)> {
        self.get_typed(&keys::resource(T::COLLECTION, id))
    }

    /// Every object of `T`'s collection, in key order, shared with the cache (no copies).
    /// Undecodable values are left out (logged when they arrived).
    pub fn list_typed<T: Typed>(&self) -> Vec<(Arc<T>, Revision)> {
        let prefix = keys::collection(T::COLLECTION);
        let m = self.inner.read().unwrap_or_else(|p| p.into_inner());
        m.range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(_, e)| e.decoded.clone()?.downcast::<T>().ok().map(|t| (t, e.kv.mod_revision)))
            .collect()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).contains_key(key)
    }

    /// Decodes a JSON value stored at `key`.
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<(T, Revision)> {
        let kv = self.get(key)?;
        match serde_json::from_slice(&kv.value) {
            Ok(v) => Some((v, kv.mod_revision)),
            Err(e) => {
                tracing::error!(key, error = %e, "undecodable value in store; ignoring it");
                None
            }
        }
    }

    /// Decodes every JSON value under `prefix`, skipping (and logging) undecodable ones.
    pub fn list_json<T: serde::de::DeserializeOwned>(&self, prefix: &str) -> Vec<(T, Revision)> {
        self.list(prefix)
            .iter()
            .filter_map(|kv| match serde_json::from_slice(&kv.value) {
                Ok(v) => Some((v, kv.mod_revision)),
                Err(e) => {
                    tracing::error!(key = %kv.key, error = %e, "undecodable value in store; ignoring it");
                    None
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::model;

    /// The typed collections' keys are the ones their writers use.
    #[test]
    fn typed_collections_match_key_layout() {
        assert_eq!(keys::resource(Project::COLLECTION, "x"), model::project("x"));
        assert_eq!(keys::resource(User::COLLECTION, "x"), model::user("x"));
        assert_eq!(keys::resource(Role::COLLECTION, "x"), model::role("x"));
        assert_eq!(keys::collection(User::COLLECTION), model::users());
    }

    #[test]
    fn values_are_decoded_once_on_arrival() {
        let net = serde_json::json!({
            "id": "n1", "project_id": "p", "name": "a", "admin_state_up": true, "shared": false,
            "external": false, "mtu": 1450, "status": "ACTIVE", "segmentation_id": 7,
            "port_security_enabled": true, "created_at": "t", "updated_at": "t", "revision_number": 0
        });
        let kv = |key: String, value: Vec<u8>| KeyValue {
            key,
            value,
            create_revision: 1,
            mod_revision: 1,
            version: 1,
        };
        let good = Entry::new(kv(keys::resource("networks", "n1"), net.to_string().into_bytes()));
        assert!(good.decoded.is_some());
        assert_eq!(good.typed::<Network>().map(|n| n.segmentation_id), Some(7));
        let bad = Entry::new(kv(keys::resource("networks", "n2"), b"{".to_vec()));
        assert!(bad.decoded.is_none() && bad.typed::<Network>().is_none());
        let index = Entry::new(kv(keys::ip_alloc("s", "10.0.0.2"), b"port".to_vec()));
        assert!(index.decoded.is_none());
    }
}
