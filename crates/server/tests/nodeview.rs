//! Selective distribution: a node's watch carries its own ports and, for the networks it has
//! ports on, their subnets, other ports and hosting nodes — and nothing about other networks.

mod support;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use support::{Backend, TestServer};

/// Reads newline-delimited JSON messages off a streaming response, skipping pings.
struct Lines {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: Vec<u8>,
}

impl Lines {
    async fn next(&mut self) -> Value {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let v: Value = serde_json::from_slice(&line).expect("a JSON line");
                if v["type"] != "ping" {
                    return v;
                }
                continue;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.stream.next())
                .await
                .expect("a message within 10 s")
                .expect("stream open")
                .expect("chunk");
            self.buf.extend_from_slice(&chunk);
        }
    }
}

async fn watch(server: &TestServer, host: &str) -> Lines {
    watch_from(server, host, None).await
}

async fn watch_from(server: &TestServer, host: &str, since: Option<i64>) -> Lines {
    let resp = server.watch(host, since).await;
    Lines {
        stream: Box::pin(resp.bytes_stream()),
        buf: vec![],
    }
}

fn keys_of(objects: &Value) -> Vec<String> {
    objects
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["key"].as_str().map(str::to_string))
        .collect()
}

fn has(keys: &[String], kind: &str, id: &str) -> bool {
    keys.iter().any(|k| k.ends_with(&format!("/{kind}/{id}")))
}

/// A port in no security group: these tests are about networks (a port in the default group
/// would bring every other port of that group into each view as a member object; see
/// `fanout.rs` for security groups).
async fn bound_port(server: &TestServer, net: &str, host: &str) -> String {
    let p = server
        .admin
        .create(
            "ports",
            "port",
            json!({"network_id": net, "binding:host_id": host, "security_groups": []}),
        )
        .await;
    p["id"].as_str().expect("port id").to_string()
}

#[tokio::test]
async fn a_node_sees_only_the_networks_it_has_ports_on() {
    let server = TestServer::start(Backend::Embedded).await;
    for (h, ip) in [("n1", "192.0.2.1"), ("n2", "192.0.2.2"), ("n3", "192.0.2.3")] {
        let (s, b) = server
            .admin
            .put(&format!("/isthmus/v1/nodes/{h}"), json!({"node": {"underlay_ip": ip}}))
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    let a = server.admin.network("net-a").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let b = server.admin.network("net-b").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let sa = server.admin.subnet(&a, "10.0.0.0/24").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let sb = server.admin.subnet(&b, "10.0.0.0/24").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let p1 = bound_port(&server, &a, "n1").await;
    let p2 = bound_port(&server, &a, "n2").await;
    let p3 = bound_port(&server, &b, "n3").await;

    let mut w = watch(&server, "n1").await;
    let snap = w.next().await;
    assert_eq!(snap["type"], "snapshot");
    let k = keys_of(&snap["objects"]);
    assert!(has(&k, "networks", &a) && has(&k, "subnets", &sa), "{k:?}");
    assert!(has(&k, "ports", &p1) && has(&k, "ports", &p2), "{k:?}");
    assert!(has(&k, "nodes", "n1") && has(&k, "nodes", "n2"), "{k:?}");
    assert!(
        !has(&k, "networks", &b) && !has(&k, "subnets", &sb) && !has(&k, "ports", &p3),
        "{k:?}"
    );
    assert!(!has(&k, "nodes", "n3"), "n3 hosts nothing on net-a: {k:?}");

    // A port on net-b changes nothing for n1; a port on net-a on n3 brings it and n3 in.
    let p4 = bound_port(&server, &b, "n2").await;
    let p5 = bound_port(&server, &a, "n3").await;
    let up = w.next().await;
    assert_eq!(up["type"], "update");
    let k = keys_of(&up["put"]);
    assert!(has(&k, "ports", &p5) && has(&k, "nodes", "n3"), "{up}");
    assert!(
        !has(&k, "ports", &p4) && k.iter().all(|k| !k.contains(&b)),
        "net-b leaked into n1's view: {up}"
    );

    // n1's last port on net-a goes: everything about net-a leaves n1's view.
    let (s, _) = server.admin.delete(&format!("/v2.0/ports/{p1}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let up = w.next().await;
    let gone = up["delete"].as_array().expect("deletes").len();
    assert!(gone >= 5, "expected net-a, its subnet, ports and nodes to go: {up}");
    assert!(keys_of(&up["put"]).is_empty(), "{up}");
}

#[tokio::test]
async fn only_the_node_itself_or_an_admin_may_watch() {
    let server = TestServer::start(Backend::Embedded).await;
    let m = server.member("watcher").await;
    let resp = m
        .api
        .request(reqwest::Method::GET, "/isthmus/v1/nodes/n1/watch")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_server_stops_even_with_node_watches_open() {
    let mut server = TestServer::start(Backend::Embedded).await;
    let mut w = watch(&server, "n1").await;
    assert_eq!(w.next().await["type"], "snapshot");
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.stop()).await;
    assert!(stopped.is_ok(), "server did not stop while a node watch was open");
}

#[tokio::test]
async fn a_reconnecting_node_resumes_with_only_what_changed() {
    let server = TestServer::start(Backend::Embedded).await;
    for (h, ip) in [("n1", "192.0.2.1"), ("n2", "192.0.2.2")] {
        let (s, b) = server
            .admin
            .put(&format!("/isthmus/v1/nodes/{h}"), json!({"node": {"underlay_ip": ip}}))
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    let a = server.admin.network("net-a").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    let b = server.admin.network("net-b").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    server.admin.subnet(&a, "10.0.0.0/24").await;
    server.admin.subnet(&b, "10.0.0.0/24").await;
    let keep = bound_port(&server, &a, "n1").await;
    let gone = bound_port(&server, &a, "n2").await;
    for _ in 0..20 {
        bound_port(&server, &a, "n2").await;
    }

    let mut w = watch(&server, "n1").await;
    let snap = w.next().await;
    assert_eq!(snap["type"], "snapshot");
    let snap_rev = snap["revision"].as_i64().expect("revision");
    let snap_len = keys_of(&snap["objects"]).len();
    assert!(snap_len >= 25, "{snap_len}");
    drop(w);

    // While n1 is away: one port goes, one arrives, another network changes.
    let (s, _) = server.admin.delete(&format!("/v2.0/ports/{gone}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let new = bound_port(&server, &a, "n2").await;
    bound_port(&server, &b, "n2").await;

    let mut w = watch_from(&server, "n1", Some(snap_rev)).await;
    let r = w.next().await;
    assert_eq!(r["type"], "resume", "{r}");
    assert_eq!(r["since"], snap_rev);
    let put = keys_of(&r["put"]);
    assert_eq!(put.len(), 1, "only the new port is sent again: {r}");
    assert!(has(&put, "ports", &new), "{r}");
    let del: Vec<String> = r["delete"]
        .as_array()
        .expect("delete")
        .iter()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    assert!(has(&del, "ports", &gone) && del.len() == 1, "{r}");
    let rev2 = r["revision"].as_i64().expect("revision");

    // Live updates continue on the resumed stream, and a later resume covers them too.
    let (s, _) = server.admin.delete(&format!("/v2.0/ports/{keep}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let up = w.next().await;
    assert_eq!(up["type"], "update");
    drop(w);
    let mut w = watch_from(&server, "n1", Some(rev2)).await;
    let r = w.next().await;
    assert_eq!(r["type"], "resume", "{r}");
    assert!(keys_of(&r["put"]).is_empty(), "{r}");
    assert!(
        r["delete"].as_array().expect("delete").len() >= 20,
        "n1 left net-a: {r}"
    );
    drop(w);

    // A revision the server has no record reaching back to: a full snapshot (relist).
    let mut w = watch_from(&server, "n1", Some(1)).await;
    assert_eq!(w.next().await["type"], "snapshot");
    drop(w);
    let mut w = watch_from(&server, "n2", Some(snap_rev)).await;
    assert_eq!(w.next().await["type"], "snapshot", "n2 never watched before");
    let resp = server
        .admin
        .request(reqwest::Method::GET, "/isthmus/v1/nodes/n1/watch?since=yesterday")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

/// A network shared with another project through an RBAC policy: that project's ports go to
/// every node with a port on the network, like the owner's, and leave with the policy's
/// object untouched by it.
#[tokio::test]
async fn ports_of_a_project_the_network_is_shared_with_reach_every_node_on_it() {
    let server = TestServer::start(Backend::Embedded).await;
    for (h, ip) in [("n1", "192.0.2.1"), ("n2", "192.0.2.2")] {
        let (s, b) = server
            .admin
            .put(&format!("/isthmus/v1/nodes/{h}"), json!({"node": {"underlay_ip": ip}}))
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    let owner = server.member("owner").await;
    let guest = server.member("guest").await;
    let net = owner.api.network("shared").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    owner.api.subnet(&net, "10.0.0.0/24").await;
    let (s, b) = owner
        .api
        .post(
            "/v2.0/rbac-policies",
            json!({"rbac_policy": {"object_type": "network", "object_id": net,
                                   "action": "access_as_shared", "target_tenant": guest.project_id}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let own = owner
        .api
        .create("ports", "port", json!({"network_id": net, "security_groups": []}))
        .await;
    let theirs = guest
        .api
        .create("ports", "port", json!({"network_id": net, "security_groups": []}))
        .await;
    let (own, theirs) = (
        own["id"].as_str().expect("id").to_string(),
        theirs["id"].as_str().expect("id").to_string(),
    );
    for (port, host) in [(&own, "n1"), (&theirs, "n2")] {
        let (s, b) = server
            .admin
            .put(
                &format!("/v2.0/ports/{port}"),
                json!({"port": {"binding:host_id": host}}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    for (host, other) in [("n1", &theirs), ("n2", &own)] {
        let mut w = watch(&server, host).await;
        let snap = w.next().await;
        let k = keys_of(&snap["objects"]);
        assert!(has(&k, "networks", &net), "{host}: {k:?}");
        assert!(has(&k, "ports", &own) && has(&k, "ports", &theirs), "{host}: {k:?}");
        assert!(has(&k, "nodes", "n1") && has(&k, "nodes", "n2"), "{host}: {k:?}");
        assert!(has(&k, "ports", other));
    }
}
