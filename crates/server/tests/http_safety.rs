//! HTTP-level safety of both APIs: every route dispatches on the exact method (HEAD and
//! unexpected methods change nothing), slow or silent clients cannot stall a listener, a node
//! has one watch stream at a time, wildcard listen addresses are never advertised, and a
//! failed `If-Match` answers 412.

mod support;

use isthmus_store::testing::isthmus_bin;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{
    assert_neutron_error, id_of, issue_token, Backend, TestServer, ADMIN_PASSWORD, ADMIN_PROJECT, ADMIN_USER,
    MEMBER_PASSWORD,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One request with full control: method, optional token, optional JSON body.
async fn raw(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, String) {
    let mut req = http.request(method.clone(), url);
    if let Some(t) = token {
        req = req.header("X-Auth-Token", t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    (status, headers, text)
}

/// A 405 naming the allowed methods, which do not include the refused one.
fn assert_405(what: &str, method: &Method, status: StatusCode, headers: &HeaderMap, text: &str) -> Value {
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {what}: {text}");
    let allow = headers
        .get("allow")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("{method} {what}: 405 without Allow"));
    assert!(
        !allow.split(',').any(|m| m.trim() == method.as_str()),
        "{method} {what}: Allow {allow:?} names the refused method"
    );
    serde_json::from_str(text).unwrap_or_else(|_| panic!("{method} {what}: body is not JSON: {text}"))
}

#[tokio::test]
async fn network_api_dispatches_on_the_exact_method() {
    let server = TestServer::start(Backend::Embedded).await;
    let admin = &server.admin;
    let http = &server.http;
    let tok = admin.token.clone();
    let url = |p: &str| format!("{}{p}", server.network_url);

    let net = id_of(&admin.network("keep-net").await);
    let sub = id_of(&admin.subnet(&net, "10.9.0.0/24").await);
    let port = id_of(&admin.port(&net).await);
    let sg = id_of(
        &admin
            .create("security-groups", "security_group", json!({"name": "keep-sg"}))
            .await,
    );
    let rule = id_of(
        &admin
            .create(
                "security-group-rules",
                "security_group_rule",
                json!({"security_group_id": sg, "direction": "ingress", "protocol": "tcp",
                       "port_range_min": 22, "port_range_max": 22, "ethertype": "IPv4"}),
            )
            .await,
    );
    let router = id_of(&admin.create("routers", "router", json!({"name": "keep-router"})).await);
    let (s, b) = admin.put_empty(&format!("/v2.0/networks/{net}/tags/keep")).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let node_tok = server.node_token("n1").await;
    let node = server.api(&node_tok);
    let (s, b) = node
        .put("/isthmus/v1/nodes/n1", json!({"node": {"underlay_ip": "192.0.2.10"}}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let agents = admin.list("/v2.0/agents", "agents").await;
    assert_eq!(agents.len(), 1, "{agents:?}");
    let agent = id_of(&agents[0]);

    let members = [
        ("networks", &net),
        ("subnets", &sub),
        ("ports", &port),
        ("security-groups", &sg),
        ("security-group-rules", &rule),
        ("routers", &router),
    ];
    for (coll, id) in members {
        let path = format!("/v2.0/{coll}/{id}");
        // HEAD is a GET without its body: 200, nothing deleted.
        let (s, _, text) = raw(http, Method::HEAD, &url(&path), Some(&tok), None).await;
        assert_eq!(s, StatusCode::OK, "HEAD {path}: {text}");
        assert!(text.is_empty(), "HEAD {path} sent a body: {text}");
        for m in [Method::POST, Method::PATCH] {
            let (s, h, text) = raw(http, m.clone(), &url(&path), Some(&tok), Some(json!({}))).await;
            let body = assert_405(&path, &m, s, &h, &text);
            assert_neutron_error(s, &body, StatusCode::METHOD_NOT_ALLOWED, None);
        }
    }
    let mut counts = vec![];
    for (coll, _) in members {
        counts.push(
            admin
                .list(&format!("/v2.0/{coll}"), &coll.replace('-', "_"))
                .await
                .len(),
        );
    }
    for (coll, _) in members {
        let path = format!("/v2.0/{coll}");
        let singular = coll.trim_end_matches('s').replace('-', "_");
        let create = json!({ singular: {"name": "made-by-head", "network_id": net} });
        let (s, _, text) = raw(http, Method::HEAD, &url(&path), Some(&tok), Some(create)).await;
        assert_eq!(s, StatusCode::OK, "HEAD {path}: {text}");
        for m in [Method::DELETE, Method::PUT, Method::PATCH] {
            let (s, h, text) = raw(http, m.clone(), &url(&path), Some(&tok), Some(json!({}))).await;
            let body = assert_405(&path, &m, s, &h, &text);
            assert_neutron_error(s, &body, StatusCode::METHOD_NOT_ALLOWED, None);
        }
    }

    // Tags: HEAD reads, nothing else but GET/PUT/DELETE is served.
    let tags = format!("/v2.0/networks/{net}/tags");
    let (s, _, text) = raw(http, Method::HEAD, &url(&tags), Some(&tok), None).await;
    assert_eq!(s, StatusCode::OK, "HEAD {tags}: {text}");
    let (s, _, text) = raw(http, Method::HEAD, &url(&format!("{tags}/keep")), Some(&tok), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "HEAD {tags}/keep: {text}");
    // POST on the collection adds tags (`tag-creation`); on one tag it is not a method.
    for (path, methods) in [
        (tags.clone(), vec![Method::PATCH]),
        (format!("{tags}/keep"), vec![Method::POST, Method::PATCH]),
    ] {
        for m in methods {
            let (s, h, text) = raw(http, m.clone(), &url(&path), Some(&tok), Some(json!({"tags": []}))).await;
            assert_405(&path, &m, s, &h, &text);
        }
    }

    // Agents: HEAD reads the node record; the collection is read-only.
    let path = format!("/v2.0/agents/{agent}");
    let (s, _, text) = raw(http, Method::HEAD, &url(&path), Some(&tok), None).await;
    assert_eq!(s, StatusCode::OK, "HEAD {path}: {text}");
    for m in [Method::POST, Method::PATCH] {
        let (s, h, text) = raw(http, m.clone(), &url(&path), Some(&tok), Some(json!({}))).await;
        assert_405(&path, &m, s, &h, &text);
    }
    for m in [Method::POST, Method::DELETE, Method::PUT] {
        let (s, h, text) = raw(http, m.clone(), &url("/v2.0/agents"), Some(&tok), Some(json!({}))).await;
        assert_405("/v2.0/agents", &m, s, &h, &text);
    }

    // The node API: only the methods it names.
    let node_routes: [(String, &[Method]); 4] = [
        (
            "/isthmus/v1/nodes/n1".into(),
            &[Method::HEAD, Method::GET, Method::DELETE, Method::POST, Method::PATCH],
        ),
        (
            "/isthmus/v1/nodes/n1/watch".into(),
            &[Method::POST, Method::PUT, Method::DELETE],
        ),
        (
            "/isthmus/v1/nodes/n1/ports".into(),
            &[Method::HEAD, Method::GET, Method::DELETE, Method::PUT],
        ),
        (
            format!("/isthmus/v1/nodes/n1/ports/{port}"),
            &[Method::HEAD, Method::GET, Method::POST, Method::PATCH],
        ),
    ];
    for (path, methods) in &node_routes {
        for m in methods.iter() {
            let (s, h, text) = raw(http, m.clone(), &url(path), Some(&node_tok), Some(json!({}))).await;
            let body = if *m == Method::HEAD {
                assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "HEAD {path}");
                assert!(h.contains_key("allow"), "HEAD {path}: no Allow");
                continue;
            } else {
                assert_405(path, m, s, &h, &text)
            };
            assert_neutron_error(s, &body, StatusCode::METHOD_NOT_ALLOWED, None);
        }
    }
    // HEAD on the watch answers without opening a stream.
    let (s, _, _) = raw(
        http,
        Method::HEAD,
        &url("/isthmus/v1/nodes/n1/watch"),
        Some(&node_tok),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let state = &server.handle.as_ref().expect("running").state;
    assert_eq!(state.neutron.node_sessions.open_streams(), 0, "HEAD opened a stream");

    for verb in ["add_router_interface", "remove_router_interface"] {
        let path = format!("/v2.0/routers/{router}/{verb}");
        for m in [Method::HEAD, Method::GET, Method::POST, Method::DELETE] {
            let (s, h, _) = raw(
                http,
                m.clone(),
                &url(&path),
                Some(&tok),
                Some(json!({"subnet_id": sub})),
            )
            .await;
            assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
            assert!(h.contains_key("allow"), "{m} {path}: no Allow");
        }
    }
    for path in ["/", "/v2.0", "/v2.0/extensions", "/v2.0/extensions/tag"] {
        let (s, _, text) = raw(http, Method::HEAD, &url(path), Some(&tok), None).await;
        assert_eq!(s, StatusCode::OK, "HEAD {path}: {text}");
        for m in [Method::POST, Method::DELETE] {
            let (s, h, text) = raw(http, m.clone(), &url(path), Some(&tok), Some(json!({}))).await;
            assert_405(path, &m, s, &h, &text);
        }
    }

    // Everything is still there, as it was.
    for (coll, id) in members {
        let (s, b) = admin.get(&format!("/v2.0/{coll}/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{coll}/{id} is gone: {b}");
    }
    let (s, b) = admin.get(&tags).await;
    assert_eq!((s, &b["tags"]), (StatusCode::OK, &json!(["keep"])), "{b}");
    assert_eq!(admin.ids("/v2.0/agents", "agents").await, vec![agent]);
    for ((coll, _), before) in members.iter().zip(counts) {
        let now = admin
            .list(&format!("/v2.0/{coll}"), &coll.replace('-', "_"))
            .await
            .len();
        assert_eq!(now, before, "HEAD created or deleted {coll}");
    }
    let (s, b) = admin.get(&format!("/v2.0/ports/{port}")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["port"]["binding:host_id"], "", "{b}");
}

#[tokio::test]
async fn identity_api_dispatches_on_the_exact_method() {
    let server = TestServer::start(Backend::Embedded).await;
    let http = &server.http;
    let url = |p: &str| format!("{}{p}", server.identity_url);
    let tok = server.admin.token.clone();
    let project = server.create_project("keep-project").await;
    let user = server.create_user("keep-user", MEMBER_PASSWORD).await;
    server.grant(&project, &user, "member").await;
    let role = server.role_id("member").await;
    let user_tok = server.token("keep-user", MEMBER_PASSWORD, "keep-project").await;

    // Keystone's HEAD /v3/auth/tokens validates a token and changes nothing.
    let check = |t: &str| {
        http.request(Method::HEAD, url("/auth/tokens"))
            .header("X-Auth-Token", &tok)
            .header("X-Subject-Token", t.to_string())
            .send()
    };
    let r = check(&user_tok).await.expect("HEAD auth/tokens");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap_or_default(), "");

    let grant = format!("/projects/{project}/users/{user}/roles/{role}");
    for path in [
        format!("/projects/{project}"),
        format!("/users/{user}"),
        format!("/roles/{role}"),
        "/projects".to_string(),
        "/users".to_string(),
        "/role_assignments".to_string(),
        "/domains/default".to_string(),
        "/auth/catalog".to_string(),
    ] {
        let (s, _, text) = raw(http, Method::HEAD, &url(&path), Some(&tok), None).await;
        assert_eq!(s, StatusCode::OK, "HEAD {path}: {text}");
        assert!(text.is_empty(), "HEAD {path} sent a body");
    }
    let (s, _, _) = raw(http, Method::HEAD, &url(&grant), Some(&tok), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "HEAD {grant}");

    let refused: Vec<(String, Method)> = vec![
        (format!("/projects/{project}"), Method::POST),
        (format!("/projects/{project}"), Method::PUT),
        (format!("/users/{user}"), Method::POST),
        (format!("/users/{user}"), Method::PUT),
        (format!("/roles/{role}"), Method::POST),
        (format!("/users/{user}/password"), Method::GET),
        (format!("/users/{user}/password"), Method::HEAD),
        (format!("/users/{user}/password"), Method::DELETE),
        (grant.clone(), Method::POST),
        (grant.clone(), Method::PATCH),
        ("/users".into(), Method::DELETE),
        ("/projects".into(), Method::PATCH),
        ("/roles".into(), Method::DELETE),
        ("/role_assignments".into(), Method::DELETE),
        ("/domains/default".into(), Method::DELETE),
        ("/auth/tokens".into(), Method::PATCH),
        ("/auth/tokens".into(), Method::PUT),
        ("/auth/catalog".into(), Method::POST),
    ];
    for (path, m) in refused {
        let (s, h, text) = raw(http, m.clone(), &url(&path), Some(&tok), Some(json!({}))).await;
        if m == Method::HEAD {
            assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "HEAD {path}");
            assert!(h.contains_key("allow"), "HEAD {path}: no Allow");
            continue;
        }
        let body = assert_405(&path, &m, s, &h, &text);
        assert_eq!(body["error"]["code"], 405, "Keystone-style error: {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }

    // Nothing changed: the project, user, role, grant and token are all still there.
    for path in [
        format!("/projects/{project}"),
        format!("/users/{user}"),
        format!("/roles/{role}"),
    ] {
        let (s, b) = server.identity(Method::GET, &path, None).await;
        assert_eq!(s, StatusCode::OK, "{path}: {b}");
    }
    let (s, _, _) = raw(http, Method::GET, &url(&grant), Some(&tok), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "grant is gone");
    let r = check(&user_tok).await.expect("HEAD auth/tokens");
    assert_eq!(r.status(), StatusCode::OK, "the token was revoked");
}

#[tokio::test]
async fn a_failed_if_match_answers_412() {
    let server = TestServer::start(Backend::Embedded).await;
    let admin = &server.admin;
    let net = admin.network("if-match").await;
    let id = id_of(&net);
    let rev = net["revision_number"].as_u64().expect("revision_number");
    let path = format!("/v2.0/networks/{id}");
    let stale = format!("revision_number={}", rev + 7);
    for value in [
        "revision_number=-1",
        "revision_number=abc",
        "revision_number=",
        stale.as_str(),
    ] {
        for m in [Method::PUT, Method::DELETE] {
            let resp = admin
                .request(m.clone(), &path)
                .header("If-Match", value)
                .json(&json!({"network": {"name": "changed"}}))
                .send()
                .await
                .expect("request");
            let (s, b) = support::read(resp).await;
            assert_neutron_error(s, &b, StatusCode::PRECONDITION_FAILED, None);
        }
    }
    let (s, b) = admin.get(&path).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["network"]["name"], "if-match", "{b}");
    // The current revision still matches.
    let resp = admin
        .request(Method::PUT, &path)
        .header("If-Match", format!("revision_number={rev}"))
        .json(&json!({"network": {"name": "changed"}}))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Reads until the peer closes; `None` if it is still open after `within`.
async fn closed_within(conn: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = vec![];
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn slow_and_silent_clients_are_cut_off_and_idle_ones_kept_until_the_idle_timeout() {
    let server = TestServer::start_with(Backend::Embedded, |c| {
        c.header_read_timeout_secs = 1;
        c.body_read_timeout_secs = 1;
        c.idle_timeout_secs = 3;
    })
    .await;
    for addr in [server.identity_addr, server.network_addr] {
        // A request line and part of the headers, never finished: closed after ~1 s.
        let mut half = TcpStream::connect(addr).await.expect("connect");
        half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.expect("write");
        // A connection that sends nothing at all.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let t = Instant::now();
        assert!(
            closed_within(&mut half, Duration::from_secs(4)).await.is_some(),
            "{addr}: a half-sent request was kept open"
        );
        assert!(t.elapsed() >= Duration::from_millis(800), "{addr}: closed too early");
        assert!(
            closed_within(&mut silent, Duration::from_secs(2)).await.is_some(),
            "{addr}: a silent connection was kept open"
        );

        // A body that never arrives in full: 408 in the API's error shape, then closed.
        let path = if addr == server.identity_addr {
            "/v3/auth/tokens"
        } else {
            "/v2.0/networks"
        };
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nX-Auth-Token: {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"netw",
            server.admin.token
        );
        slow.write_all(head.as_bytes()).await.expect("write");
        let got = closed_within(&mut slow, Duration::from_secs(4))
            .await
            .unwrap_or_else(|| panic!("{addr}: a slow body was kept open"));
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408"), "{addr}: {text}");
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{addr}: {text}"));
        if addr == server.identity_addr {
            assert_eq!(v["error"]["code"], 408, "{v}");
        } else {
            assert_neutron_error(StatusCode::REQUEST_TIMEOUT, &v, StatusCode::REQUEST_TIMEOUT, None);
        }

        // A kept-alive connection may stay quiet longer than the header timeout, and is
        // closed after the idle timeout.
        let mut keep = TcpStream::connect(addr).await.expect("connect");
        let get: &[u8] = if addr == server.identity_addr {
            b"GET /v3 HTTP/1.1\r\nHost: x\r\n\r\n"
        } else {
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        };
        keep.write_all(get).await.expect("write");
        let mut buf = [0u8; 4096];
        let n = keep.read(&mut buf).await.expect("response");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{addr}: {}",
            String::from_utf8_lossy(&buf[..n])
        );
        tokio::time::sleep(Duration::from_millis(1800)).await;
        keep.write_all(get)
            .await
            .expect("second request on a kept-alive connection");
        let n = keep.read(&mut buf).await.expect("response");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{addr}: kept-alive connection closed before the idle timeout"
        );
        let t = Instant::now();
        assert!(
            closed_within(&mut keep, Duration::from_secs(6)).await.is_some(),
            "{addr}: an idle connection was kept open"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(2500),
            "{addr}: idle connection closed early"
        );
    }

    // A node watch stream outlives the idle timeout: it pings.
    let mut w = watch(&server, "n1").await;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(7) {
        let v = w
            .next(Duration::from_secs(3))
            .await
            .expect("a message: the stream was cut");
        assert!(v["type"] == "snapshot" || v["type"] == "ping", "{v}");
    }
}

/// Soft open-file limit of this process up to the hard one (2,000+ sockets below).
fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `isthmus server` on a fresh embedded store with `args`, stderr to `log`, started with the
/// common soft open-file limit of 1024 (the binary raises it itself).
fn spawn_server(work: &Path, args: &[String]) -> Child {
    use std::os::unix::process::CommandExt;
    let config = work.join("isthmus.toml");
    std::fs::write(&config, "password_hash_kib = 64\n").expect("write config");
    let log = std::fs::File::create(work.join("server.log")).expect("log");
    let mut cmd = Command::new(isthmus_bin());
    cmd.arg("server")
        .arg("--config")
        .arg(&config)
        .args(["--store", "embedded", "--data-dir"])
        .arg(work.join("data"))
        .args(["--admin-password", ADMIN_PASSWORD])
        .args(args)
        .env("ISTHMUS_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    // SAFETY: only setrlimit between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = lim.rlim_max.min(1024);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("spawn isthmus server")
}

async fn wait_ready(child: &mut Child, work: &Path, identity_url: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let log = std::fs::read_to_string(work.join("server.log")).unwrap_or_default();
            panic!("isthmus server exited ({status}):\n{log}");
        }
        if http.get(format!("{identity_url}/")).send().await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "server not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_thousand_half_open_connections_per_listener_do_not_stall_real_clients() {
    raise_nofile_limit();
    let work = tempfile::tempdir().expect("tempdir");
    let (id_port, net_port) = (free_port(), free_port());
    let identity_url = format!("http://127.0.0.1:{id_port}/v3");
    let network_url = format!("http://127.0.0.1:{net_port}");
    let mut child = spawn_server(
        work.path(),
        &[
            "--identity-listen".into(),
            format!("127.0.0.1:{id_port}"),
            "--network-listen".into(),
            format!("127.0.0.1:{net_port}"),
        ],
    );
    wait_ready(&mut child, work.path(), &identity_url).await;

    let mut half_open = Vec::with_capacity(2000);
    for port in [id_port, net_port] {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        for i in 0..1000 {
            let mut c = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| panic!("{addr} stopped accepting: connection {i} not accepted within 5 s"))
                .unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
            c.write_all(b"POST /v3/auth/tokens HTTP/1.1\r\nHost: x\r\nContent-Le")
                .await
                .expect("partial request");
            half_open.push(c);
        }
    }

    // A real client, while all of those are open: a token and a network list, promptly.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .expect("client");
    let started = Instant::now();
    let token = issue_token(&http, &identity_url, ADMIN_USER, ADMIN_PASSWORD, ADMIN_PROJECT).await;
    let (s, _, text) = raw(
        &http,
        Method::GET,
        &format!("{network_url}/v2.0/networks"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    drop(half_open);
    let _ = child.kill();
    let _ = child.wait();
}

/// Node watch stream lines, pings included.
struct Lines {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: Vec<u8>,
}

impl Lines {
    /// The next message; `None` when the stream ended (or failed) or nothing came in `within`.
    async fn next(&mut self, within: Duration) -> Option<Value> {
        use futures::StreamExt;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return serde_json::from_slice(&line).ok();
            }
            match tokio::time::timeout(within, self.stream.next()).await {
                Ok(Some(Ok(chunk))) => self.buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }

    /// Whether the stream ends within `within` (pings are skipped).
    async fn ends_within(&mut self, within: Duration) -> bool {
        use futures::StreamExt;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

async fn watch(server: &TestServer, host: &str) -> Lines {
    let resp = server
        .admin
        .request(Method::GET, &format!("/isthmus/v1/nodes/{host}/watch"))
        .send()
        .await
        .expect("watch");
    assert_eq!(resp.status(), StatusCode::OK);
    Lines {
        stream: Box::pin(resp.bytes_stream()),
        buf: vec![],
    }
}

#[tokio::test]
async fn a_node_has_one_watch_stream_and_closed_streams_leave_nothing_behind() {
    let server = TestServer::start(Backend::Embedded).await;
    let admin = &server.admin;
    let net = id_of(&admin.network("streams").await);
    admin.subnet(&net, "10.8.0.0/24").await;
    let state = server.handle.as_ref().expect("running").state.clone();

    let mut previous: Option<Lines> = None;
    for i in 0..20 {
        let mut w = watch(&server, "n1").await;
        let first = w.next(Duration::from_secs(5)).await.expect("first message");
        assert_eq!(first["type"], "snapshot", "{first}");
        if let Some(mut old) = previous.take() {
            assert!(
                old.ends_within(Duration::from_secs(2)).await,
                "stream {} still open after stream {i} started",
                i - 1
            );
        }
        assert_eq!(state.neutron.node_sessions.open_streams(), 1);
        previous = Some(w);
    }
    // The newest stream is live.
    let mut live = previous.take().expect("a stream");
    let bound = id_of(
        &admin
            .create("ports", "port", json!({"network_id": net, "binding:host_id": "n1"}))
            .await,
    );
    let mut saw_update = false;
    for _ in 0..5 {
        match live.next(Duration::from_secs(6)).await {
            Some(v) if v["type"] == "update" => {
                saw_update = true;
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert!(saw_update, "the newest stream got no update for {bound}");

    drop(live);
    let deadline = Instant::now() + Duration::from_secs(5);
    while state.neutron.node_sessions.open_streams() != 0 {
        assert!(Instant::now() < deadline, "a closed stream is still counted as open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state.neutron.node_sessions.nodes(), 1, "one resume record for the node");

    let t = Instant::now();
    admin.port(&net).await;
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "port create took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_wildcard_listen_address_is_never_advertised() {
    // The README's multi-node example names both public URLs.
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md")).expect("README.md");
    let example = readme
        .split("isthmus server --store etcd")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README's multi-node server example");
    for flag in [
        "--identity-listen 0.0.0.0",
        "--tls-cert ",
        "--identity-public-url https://",
        "--network-public-url https://",
    ] {
        assert!(example.contains(flag), "README example lacks {flag}: {example}");
    }

    // Refused, with a message naming the flag.
    let work = tempfile::tempdir().expect("tempdir");
    let (id_port, net_port) = (free_port(), free_port());
    let listen = [
        "--identity-listen".to_string(),
        format!("0.0.0.0:{id_port}"),
        "--network-listen".to_string(),
        format!("0.0.0.0:{net_port}"),
    ];
    let mut child = spawn_server(work.path(), &listen);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a wildcard listen without a public URL started and kept running");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success(), "a wildcard listen without a public URL started");
    let log = std::fs::read_to_string(work.path().join("server.log")).unwrap_or_default();
    assert!(log.contains("--identity-public-url"), "{log}");

    // With the public URLs (as in the README): the catalog and version documents use them.
    let work = tempfile::tempdir().expect("tempdir");
    let identity_public = format!("http://127.0.0.1:{id_port}/v3");
    let network_public = format!("http://127.0.0.1:{net_port}/");
    let mut args = listen.to_vec();
    args.extend([
        // Plain HTTP keeps this test about the URLs (the README's example has TLS).
        "--insecure-http".to_string(),
        "--identity-public-url".to_string(),
        identity_public.clone(),
        "--network-public-url".to_string(),
        network_public.clone(),
    ]);
    let mut child = spawn_server(work.path(), &args);
    wait_ready(&mut child, work.path(), &identity_public).await;
    let http = reqwest::Client::new();
    let body = json!({"auth": {
        "identity": {"methods": ["password"], "password": {"user": {
            "name": ADMIN_USER, "domain": {"name": "Default"}, "password": ADMIN_PASSWORD}}},
        "scope": {"project": {"name": ADMIN_PROJECT, "domain": {"name": "Default"}}}}});
    let resp = http
        .post(format!("{identity_public}/auth/tokens"))
        .json(&body)
        .send()
        .await
        .expect("token");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let v: Value = resp.json().await.expect("token body");
    let mut seen = 0;
    for svc in v["token"]["catalog"].as_array().expect("catalog") {
        for e in svc["endpoints"].as_array().expect("endpoints") {
            let u = e["url"].as_str().expect("url");
            assert!(!u.contains("0.0.0.0"), "wildcard advertised: {v}");
            match svc["type"].as_str() {
                Some("identity") => assert_eq!(u, identity_public),
                Some("network") => assert_eq!(u, network_public),
                _ => {}
            }
            seen += 1;
        }
    }
    assert!(seen >= 2, "{v}");
    let (s, _, text) = raw(&http, Method::GET, &network_public, None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(text.contains(&format!("{network_public}v2.0/")), "{text}");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_a_slot_frees() {
    let server = TestServer::start_with(Backend::Embedded, |c| {
        c.max_connections = 3;
        c.header_read_timeout_secs = 2;
    })
    .await;
    let addr = server.network_addr;
    let mut silent = vec![];
    for _ in 0..3 {
        silent.push(TcpStream::connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = TcpStream::connect(addr).await.expect("connect (kernel queue)");
    fourth
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 4096];
    let early = tokio::time::timeout(Duration::from_millis(1000), fourth.read(&mut buf)).await;
    assert!(early.is_err(), "a connection beyond the cap was served");
    // The silent ones hit the header timeout, and the waiting one gets its turn.
    let n = tokio::time::timeout(Duration::from_secs(5), fourth.read(&mut buf))
        .await
        .expect("served once a slot freed")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}
