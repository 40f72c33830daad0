//! What an attacker without the right role or credentials tries: reading with a role that
//! grants nothing, reading identity's role list, making the server hold request bodies without
//! a token, and cutting the connection in the middle of a write.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};
use support::*;

/// A user whose only role on a project is one Neutron's policy does not know sees nothing of
/// it (empty lists, 404s) and may write nothing.
#[tokio::test]
async fn a_role_that_grants_nothing_reads_nothing() {
    let s = TestServer::start(Backend::Embedded).await;
    let owner = s.member("owner").await;
    let net = id_of(&owner.api.network("private").await);
    owner.api.subnet(&net, "10.5.0.0/24").await;

    let (st, b) = s
        .identity(Method::POST, "/roles", Some(json!({"role": {"name": "observer"}})))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let user = s.create_user("watcher", MEMBER_PASSWORD).await;
    s.grant(&owner.project_id, &user, "observer").await;
    let api = s.api(&s.token("watcher", MEMBER_PASSWORD, &owner.project).await);

    for coll in [
        "networks",
        "subnets",
        "ports",
        "security-groups",
        "security-group-rules",
        "routers",
    ] {
        let (st, b) = api.get(&format!("/v2.0/{coll}")).await;
        assert_eq!(st, StatusCode::OK, "{coll}: {b}");
        let plural = coll.replace('-', "_");
        assert_eq!(b[&plural], json!([]), "{coll} listed for a role that grants nothing");
    }
    let (st, b) = api.get(&format!("/v2.0/networks/{net}")).await;
    assert_neutron_error(st, &b, StatusCode::NOT_FOUND, Some("NetworkNotFound"));
    let (st, b) = api.post("/v2.0/networks", json!({"network": {"name": "x"}})).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{b}");
    let (st, _) = api
        .put(&format!("/v2.0/networks/{net}"), json!({"network": {"name": "y"}}))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = api.delete(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(owner.api.list("/v2.0/networks", "networks").await.len(), 1);

    // A reader of the same project does see it.
    let reader = s.create_user("reader-1", MEMBER_PASSWORD).await;
    s.grant(&owner.project_id, &reader, "reader").await;
    let rapi = s.api(&s.token("reader-1", MEMBER_PASSWORD, &owner.project).await);
    assert_eq!(rapi.ids("/v2.0/networks", "networks").await, vec![net]);
}

/// Keystone's default policy: only admins list or read roles.
#[tokio::test]
async fn roles_are_listed_by_admins_only() {
    let s = TestServer::start(Backend::Embedded).await;
    let m = s.member("m").await;
    let url = format!("{}/roles", s.identity_url);
    let (st, b) = send(&s.http, Method::GET, &url, Some(&m.token), None).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{b}");
    let member_role = s.role_id("member").await;
    let (st, _) = send(
        &s.http,
        Method::GET,
        &format!("{url}/{member_role}"),
        Some(&m.token),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, b) = s.identity(Method::GET, "/roles", None).await;
    assert_eq!(st, StatusCode::OK, "{b}");
}

/// Sends `head` (a request head announcing a body) and no body; returns the status line of
/// the answer and how long it took.
fn answer_without_body(addr: std::net::SocketAddr, head: &str) -> (String, Duration) {
    let started = Instant::now();
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    c.write_all(head.as_bytes()).expect("write head");
    let mut buf = [0u8; 512];
    let n = c.read(&mut buf).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    (text.lines().next().unwrap_or("").to_string(), started.elapsed())
}

/// A request with a body and no valid token is refused before its body is read: the server
/// neither waits for nor holds bodies of anonymous clients. Identity's token requests (which
/// come without a token) are bounded at Keystone's body size.
#[tokio::test]
async fn anonymous_bodies_are_refused_before_they_are_read() {
    let s = TestServer::start(Backend::Embedded).await;
    for token in ["", "X-Auth-Token: forged\r\n"] {
        let head = format!(
            "POST /v2.0/networks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             {token}Content-Length: 1000000\r\n\r\n"
        );
        let addr = s.network_addr;
        let (status, took) = tokio::task::spawn_blocking(move || answer_without_body(addr, &head))
            .await
            .expect("join");
        assert!(status.contains(" 401 "), "{token:?}: {status:?}");
        assert!(took < Duration::from_secs(5), "{token:?}: answered after {took:?}");
    }
    // With a valid token the server does wait for the body (and gets it here).
    let (st, _) = s.admin.post("/v2.0/networks", json!({"network": {"name": "ok"}})).await;
    assert_eq!(st, StatusCode::CREATED);

    let big = json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": "admin", "domain": {"id": "default"}, "password": "x".repeat(200_000)}}}}});
    let (st, _) = send(
        &s.http,
        Method::POST,
        &format!("{}/auth/tokens", s.identity_url),
        None,
        Some(big),
    )
    .await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
}

/// A client that sends a bulk create and goes away at once does not cut it in half: the
/// request runs to its end (all of it is created, or none), as Neutron's does.
#[tokio::test]
async fn a_vanished_client_does_not_cut_a_bulk_create_in_half() {
    // 150 networks: more than Neutron's default network quota.
    let s = TestServer::start_with(Backend::Embedded, |c| c.unlimited_quotas()).await;
    let m = s.member("bulk").await;
    let items: Vec<Value> = (0..150).map(|i| json!({"name": format!("n{i}")})).collect();
    let body = json!({ "networks": items }).to_string();
    let head = format!(
        "POST /v2.0/networks HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        m.token,
        body.len()
    );
    let addr = s.network_addr;
    tokio::task::spawn_blocking(move || {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(head.as_bytes()).expect("head");
        c.write_all(body.as_bytes()).expect("body");
        // Gone before the first network is made.
        let _ = c.shutdown(Shutdown::Both);
    })
    .await
    .expect("join");

    // The items are made one after another, so the count climbs; how soon it starts depends
    // on the machine's load (once, it had not started after a second). A cut request stops
    // climbing short of 150 for good.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while tokio::time::Instant::now() < deadline {
        n = m.api.list("/v2.0/networks", "networks").await.len();
        if n == 150 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(n, 150, "a bulk create whose client vanished was cut at {n} of 150");
}
