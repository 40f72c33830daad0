//! The client against a real server on loopback (embedded store): catalog lookup, token
//! renewal after expiry, refused credentials, retries that give up, typed Neutron calls.

use isthmus_client::{Auth, Client, Config, Error};
use serde_json::json;
use std::time::Duration;

const ADMIN_PASSWORD: &str = "admin-secret-Pw1";

async fn server(dir: &std::path::Path) -> isthmus_server::ServerHandle {
    let config = isthmus_server::Config {
        identity_listen: "127.0.0.1:0".parse().unwrap(),
        network_listen: "127.0.0.1:0".parse().unwrap(),
        admin_password: Some(ADMIN_PASSWORD.into()),
        password_hash_kib: 64,
        // Tokens expire during the test: the client must renew them.
        token_ttl_secs: 2,
        ..isthmus_server::Config::default()
    };
    let store = isthmus_store::embedded::EmbeddedStore::open(&dir.join("store")).unwrap();
    isthmus_server::start(config, store).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_renewal_refusal_and_neutron_calls() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let s = server(dir.path()).await;
        let id_url = format!("http://{}/v3", s.identity_addr);

        // No network URL given: it comes from the token's catalog.
        let admin = Client::new(Config::new(&id_url, Auth::password("admin", ADMIN_PASSWORD, "admin"))).unwrap();
        let net = admin
            .neutron_create("networks", "network", &json!({"name": "client-net"}))
            .await
            .unwrap();
        assert_eq!(net["name"], "client-net");
        assert_eq!(admin.network_url(), format!("http://{}", s.network_addr));
        let first = admin.token(None).await.unwrap();

        // The token expires; the next call is refused once, renews it and succeeds.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let id = net["id"].as_str().unwrap();
        let got = admin.neutron_get(&format!("networks/{id}")).await.unwrap();
        assert_eq!(got["network"]["id"], id);
        assert_ne!(admin.token(None).await.unwrap(), first, "a new token after expiry");

        // Neutron's errors come back with their status and message.
        let e = admin.neutron_get("networks/nope").await.unwrap_err();
        assert_eq!(e.status(), Some(404), "{e}");
        assert!(e.api_message().is_some_and(|m| m.contains("nope")), "{e}");
        admin.neutron_delete("networks", id).await.unwrap();

        // A wrong password: an authentication error that does not repeat the password.
        let wrong = Client::new(Config::new(&id_url, Auth::password("admin", "wrong-Pw-9876", "admin"))).unwrap();
        let e = wrong.neutron_get("networks").await.unwrap_err();
        assert!(matches!(e, Error::Auth { status: 401, .. }), "{e}");
        assert!(!format!("{e} {e:?} {wrong:?}").contains("wrong-Pw-9876"));
        assert!(!format!("{admin:?}").contains(ADMIN_PASSWORD));
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn no_server_is_unreachable_after_retries() {
    // A port nothing listens on (bound, then closed).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let c = Client::new(Config::new(&format!("http://{addr}/v3"), Auth::password("a", "b", "c"))).unwrap();
    let started = std::time::Instant::now();
    let e = c.neutron_get("networks").await.unwrap_err();
    assert!(matches!(e, Error::Unreachable(_)), "{e}");
    assert_eq!(e.status(), None);
    // Three attempts with 100 ms and 200 ms pauses between them.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

/// A server that issues a token, then reads each API request and closes the connection
/// without answering (as a server that dies mid-request does). Counts the API requests.
fn dropping_server() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // The head, then as much body as Content-Length says.
            let body_len = loop {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break None,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    break Some(end + 4 + len);
                }
            };
            let Some(total) = body_len else { continue };
            while req.len() < total {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            if req.starts_with(b"POST /v3/auth/tokens") {
                let _ = c.write_all(
                    b"HTTP/1.1 201 Created\r\nX-Subject-Token: t1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                );
            } else {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn only_idempotent_calls_are_sent_again_after_a_lost_answer() {
    let (addr, seen) = dropping_server();
    let config =
        Config::new(&format!("http://{addr}/v3"), Auth::password("a", "b", "c")).network_url(&format!("http://{addr}"));
    let c = Client::new(config).unwrap();
    // A create may have been done by the server: sending it again could create a second one.
    let e = c
        .neutron_create("networks", "network", &json!({"name": "x"}))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unreachable(_)), "{e}");
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1, "POST sent once");
    // A read is safe to repeat.
    let e = c.neutron_get("networks").await.unwrap_err();
    assert!(matches!(e, Error::Unreachable(_)), "{e}");
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "GET sent three times"
    );
}
