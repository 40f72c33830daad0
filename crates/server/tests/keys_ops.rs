//! Operations on the real `isthmus` binary: token key rotation across two servers sharing a
//! key directory on one etcd, refusing a key directory others can read, and a SIGTERM that
//! lets a request in flight finish (and keeps it), closes node streams and exits 0 within its drain bound.
//!
//! The binary: `$ISTHMUS_BIN`, or built as in `crash.rs`.

mod support;

use isthmus_store::testing::{isthmus_bin, EtcdProcess};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::process::ServerProcess;
use support::{id_of, send};

/// Runs `isthmus keys ...`; its stdout, or a panic with its output.
fn keys_cmd(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("keys")
        .args(args)
        .output()
        .expect("run isthmus keys");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "isthmus keys {}: {text}", args.join(" "));
    text
}

/// The key id a token carries.
fn kid(token: &str) -> &str {
    token.split('.').next().unwrap_or_default()
}

/// The id of the key `keys rotate` reported writing.
fn new_key(output: &str) -> String {
    output
        .split_whitespace()
        .skip_while(|w| *w != "key")
        .nth(1)
        .map(|w| w.trim_end_matches(':').to_string())
        .unwrap_or_else(|| panic!("no key id in: {output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_across_two_servers_without_downtime() {
    let bin = tokio::task::spawn_blocking(isthmus_bin).await.expect("build task");
    let etcd = tokio::task::spawn_blocking(EtcdProcess::start).await.expect("etcd");
    let work = tempfile::Builder::new()
        .prefix("isthmus-keys-")
        .tempdir()
        .expect("tempdir");
    let keys = work.path().join("keys");
    let keys_s = keys.to_str().expect("utf-8 path");
    let http = reqwest::Client::new();
    let endpoint = etcd.endpoint();
    let on_etcd = |dir: &str| -> Vec<String> {
        ["--store", "etcd", "--etcd-endpoints", &endpoint, "--token-key-dir", dir]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };

    // No key yet: a server on a shared store refuses to invent its own.
    let mut none = ServerProcess::spawn(
        &bin,
        work.path(),
        "no-keys",
        "",
        &on_etcd(keys_s).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!none.wait_exit(Duration::from_secs(30)).await.success());
    assert!(none.log_text().contains("keys rotate --dir"), "{}", none.log_text());

    let first = new_key(&keys_cmd(&bin, &["rotate", "--dir", keys_s, "--activate-now"]));
    // A re-reads the directory every second; B only on SIGHUP (its period is an hour).
    let args = on_etcd(keys_s);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = ServerProcess::start(&bin, work.path(), "a", "token_key_reload_secs = 1\n", &args).await;
    let b = ServerProcess::start(&bin, work.path(), "b", "token_key_reload_secs = 3600\n", &args).await;

    let from_a = a.token(&http).await;
    assert_eq!(kid(&from_a), first);
    assert_eq!(a.check(&http, &from_a).await, StatusCode::OK);
    assert_eq!(b.check(&http, &from_a).await, StatusCode::OK);

    // Rotate with a short staging period: the new key verifies at once, signs later.
    let out = keys_cmd(&bin, &["rotate", "--dir", keys_s, "--stage-secs", "4"]);
    let second = new_key(&out);
    let staged_until = Instant::now() + Duration::from_secs(4);
    b.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Still staged: both servers sign with the first key, and old tokens stay good.
    let from_b = b.token(&http).await;
    assert_eq!(kid(&from_b), first, "a staged key must not sign yet");
    for s in [&a, &b] {
        assert_eq!(s.check(&http, &from_a).await, StatusCode::OK);
        assert_eq!(s.check(&http, &from_b).await, StatusCode::OK);
    }

    tokio::time::sleep(staged_until.saturating_duration_since(Instant::now()) + Duration::from_millis(1100)).await;
    let new_from_b = b.token(&http).await;
    assert_eq!(
        kid(&new_from_b),
        second,
        "B read the new key on SIGHUP and signs with it"
    );
    let new_from_a = a.token(&http).await;
    assert_eq!(kid(&new_from_a), second, "A read the new key by itself");
    for s in [&a, &b] {
        for t in [&from_a, &from_b, &new_from_a, &new_from_b] {
            assert_eq!(s.check(&http, t).await, StatusCode::OK, "token of key {}", kid(t));
        }
    }
    // A key id nobody has: 401, on the network and the identity API.
    let forged = new_from_a.replacen(&second, "1-0000000000000000", 1);
    assert_eq!(a.check(&http, &forged).await, StatusCode::UNAUTHORIZED);
    let (st, _) = send(
        &http,
        Method::GET,
        &format!("{}/auth/projects", a.identity_url),
        Some(&forged),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    // A token of the format before key ids: 401 too.
    let (_, rest) = from_a.split_once('.').expect("kid");
    assert_eq!(a.check(&http, rest).await, StatusCode::UNAUTHORIZED);

    let listed = keys_cmd(&bin, &["list", "--dir", keys_s]);
    assert!(listed.contains(&format!("{second}  signing")), "{listed}");
    assert!(listed.contains(&format!("{first}  verifying only")), "{listed}");

    // A key directory other users can read: refused at start, saying how to fix it.
    let open = work.path().join("open-keys");
    let open_s = open.to_str().expect("utf-8 path");
    keys_cmd(&bin, &["rotate", "--dir", open_s, "--activate-now"]);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let mut refused = ServerProcess::spawn(
        &bin,
        work.path(),
        "open-keys",
        "",
        &on_etcd(open_s).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(!refused.wait_exit(Duration::from_secs(30)).await.success());
    let log = refused.log_text();
    assert!(
        log.contains(&format!("chmod 0700 {open_s}")) && log.contains("mode 0755"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight_closes_streams_and_exits_0() {
    let bin = tokio::task::spawn_blocking(isthmus_bin).await.expect("build task");
    let work = tempfile::Builder::new()
        .prefix("isthmus-drain-")
        .tempdir()
        .expect("tempdir");
    let data = work.path().join("data");
    let data_s = data.to_str().expect("utf-8 path");
    let args = ["--store", "embedded", "--data-dir", data_s, "--shutdown-drain", "3"];
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http");
    let mut server = ServerProcess::start(&bin, work.path(), "drain-1", "", &args).await;
    let token = server.token(&http).await;
    let url = |p: &str| format!("{}{p}", server.network_url);
    let (st, net) = send(
        &http,
        Method::POST,
        &url("/v2.0/networks"),
        Some(&token),
        Some(json!({"network": {"name": "drain"}})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{net}");
    let net_id = id_of(&net["network"]);
    let (st, sub) = send(
        &http,
        Method::POST,
        &url("/v2.0/subnets"),
        Some(&token),
        Some(json!({"subnet": {"network_id": net_id, "cidr": "10.9.0.0/16", "ip_version": 4}})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{sub}");

    // A node's watch stream, open while the server stops.
    let watch = http
        .get(url("/isthmus/v1/nodes/drain-node/watch"))
        .header("X-Auth-Token", &token)
        .send()
        .await
        .expect("watch");
    assert_eq!(watch.status(), StatusCode::OK);

    // A port create in flight when the signal comes: its headers and half its body are sent
    // before, the rest after (a slow client, or a handler still working: either way a request
    // the server has begun). Deterministic, unlike racing a long request against the signal.
    let body = json!({"port": {"network_id": net_id, "name": "in-flight"}}).to_string();
    let (head, tail) = body.split_at(body.len() / 2);
    let addr = server.network_url.trim_start_matches("http://").to_string();
    let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
    write!(
        conn,
        "POST /v2.0/ports HTTP/1.1\r\nHost: {addr}\r\nX-Auth-Token: {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{head}",
        body.len()
    )
    .expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.write_all(tail.as_bytes()).expect("write the rest");
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut conn, &mut answer);
    let answered = signalled.elapsed();
    assert!(
        answer.starts_with("HTTP/1.1 201"),
        "the request in flight was not finished: {answer:?}"
    );
    // The stream ends instead of holding the shutdown (its agent would reconnect elsewhere).
    let streamed = tokio::time::timeout(Duration::from_secs(10), watch.bytes())
        .await
        .expect("the node stream was not closed");
    assert!(streamed.is_ok_and(|b| !b.is_empty()));
    let status = server.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}:\n{}", server.log_text());
    println!("a request in flight answered {answered:?} after SIGTERM; server exited {status}");

    // Restarted on the same data: the port created in flight is there. Then a request that
    // never completes (a body that stops half way) cannot hold the shutdown past its bound.
    let mut server = ServerProcess::start(&bin, work.path(), "drain-2", "", &args).await;
    let token = server.token(&http).await;
    let (st, list) = send(
        &http,
        Method::GET,
        &format!("{}/v2.0/ports?network_id={net_id}&name=in-flight", server.network_url),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(list["ports"].as_array().map(Vec::len), Some(1), "{list}");

    let addr = server.network_url.trim_start_matches("http://").to_string();
    let mut stuck = std::net::TcpStream::connect(&addr).expect("connect");
    write!(
        stuck,
        "POST /v2.0/networks HTTP/1.1\r\nHost: {addr}\r\nX-Auth-Token: {token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"network\":"
    )
    .expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}:\n{}", server.log_text());
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(6),
        "exited {took:?} after SIGTERM with a 3 s drain bound"
    );
    assert!(
        server.log_text().contains("end of the shutdown drain"),
        "{}",
        server.log_text()
    );
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn world_readable_config_with_a_password_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let bin = tokio::task::spawn_blocking(isthmus_bin).await.expect("build task");
    let work = tempfile::tempdir().expect("tempdir");
    let config = work.path().join("isthmus.toml");
    std::fs::write(&config, "admin_password = \"do-not-print-me\"\n").expect("write");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = Command::new(&bin)
        .arg("server")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(work.path().join("data"))
        .output()
        .expect("run isthmus server");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("mode 0644") && err.contains("chmod 0600"), "{err}");
    assert!(!err.contains("do-not-print-me"), "{err}");
    assert!(
        !work.path().join("data").exists(),
        "nothing may start before the refusal"
    );
}
