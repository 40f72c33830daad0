//! What one node needs to know, and the stream that keeps it informed (selective distribution).
//!
//! A node receives its own ports; for each network it has a port on, that network, its subnets,
//! its other ports and the nodes hosting them. About any other network it receives nothing.
//!
//! `GET /isthmus/v1/nodes/{host}/watch` answers newline-delimited JSON: first
//! `{"type":"snapshot","revision":R,"objects":[...]}` with every object the node needs, then
//! `{"type":"update","revision":R,"put":[...],"delete":[keys]}` whenever that set changes, and
//! `{"type":"ping"}` every few seconds so either side notices a dead connection. After a
//! disconnect the agent reconnects and gets a fresh snapshot, which it reconciles against.

use super::agents::require_node;
use super::{authenticate, ApiResult};
use crate::cache::Cache;
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use isthmus_model::{keys, Network, Node, Port, Subnet};
use isthmus_store::Revision;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

const PING_EVERY: Duration = Duration::from_secs(5);

/// One object of a node's view: its store key, the revision it was written at, and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewObject {
    pub kind: &'static str,
    pub revision: Revision,
    pub value: Value,
}

/// The node's view as of the cache's current state, keyed by store key.
pub fn compute(cache: &Cache, host: &str) -> BTreeMap<String, ViewObject> {
    let mut out = BTreeMap::new();
    let ports: Vec<(String, Port, Revision)> = cache
        .list(&keys::collection("ports"))
        .iter()
        .filter_map(|kv| {
            serde_json::from_slice::<Port>(&kv.value)
                .ok()
                .map(|p| (kv.key.clone(), p, kv.mod_revision))
        })
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
            out.insert(
                k.clone(),
                ViewObject {
                    kind: "port",
                    revision: *rev,
                    value: p.to_api(true),
                },
            );
        }
    }
    for net in &nets {
        let k = keys::resource("networks", net);
        if let Some((n, rev)) = cache.get_json::<Network>(&k) {
            out.insert(
                k,
                ViewObject {
                    kind: "network",
                    revision: rev,
                    value: n.to_api(true),
                },
            );
        }
    }
    for kv in cache.list(&keys::collection("subnets")) {
        if let Ok(s) = serde_json::from_slice::<Subnet>(&kv.value) {
            if nets.contains(s.network_id.as_str()) {
                out.insert(
                    kv.key.clone(),
                    ViewObject {
                        kind: "subnet",
                        revision: kv.mod_revision,
                        value: s.to_api(),
                    },
                );
            }
        }
    }
    for h in hosts {
        let k = keys::resource("nodes", h);
        if let Some((n, rev)) = cache.get_json::<Node>(&k) {
            let value = json!({"host": n.host, "underlay_ip": n.underlay_ip, "capabilities": n.capabilities});
            out.insert(
                k,
                ViewObject {
                    kind: "node",
                    revision: rev,
                    value,
                },
            );
        }
    }
    out
}

fn object_json(key: &str, o: &ViewObject) -> Value {
    json!({"key": key, "kind": o.kind, "revision": o.revision, "value": o.value})
}

/// Changes from `old` to `new`: objects to put (new or rewritten) and keys to delete.
pub fn diff(old: &BTreeMap<String, ViewObject>, new: &BTreeMap<String, ViewObject>) -> (Vec<Value>, Vec<String>) {
    let put = new
        .iter()
        .filter(|(k, o)| old.get(*k).is_none_or(|x| x.revision != o.revision))
        .map(|(k, o)| object_json(k, o))
        .collect();
    let delete = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
    (put, delete)
}

fn line(v: &Value) -> Result<Bytes, Infallible> {
    let mut s = v.to_string();
    s.push('\n');
    Ok(Bytes::from(s))
}

pub async fn watch(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(host): Path<String>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    require_node(&auth, &host, &format!("watch {host}'s view"))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let cache = state.cache.clone();
    tokio::spawn(async move {
        let mut changes = cache.subscribe();
        let mut rev = *changes.borrow_and_update();
        let mut sent = compute(&cache, &host);
        let objects: Vec<Value> = sent.iter().map(|(k, o)| object_json(k, o)).collect();
        tracing::info!(host = %host, objects = objects.len(), revision = rev, "node watch started");
        if tx
            .send(line(&json!({"type": "snapshot", "revision": rev, "objects": objects})))
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    rev = *changes.borrow_and_update();
                    let now = compute(&cache, &host);
                    let (put, delete) = diff(&sent, &now);
                    sent = now;
                    if put.is_empty() && delete.is_empty() {
                        continue;
                    }
                    let msg = json!({"type": "update", "revision": rev, "put": put, "delete": delete});
                    if tx.send(line(&msg)).await.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep(PING_EVERY) => {
                    if tx.send(line(&json!({"type": "ping", "revision": rev}))).await.is_err() {
                        break;
                    }
                }
            }
        }
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
