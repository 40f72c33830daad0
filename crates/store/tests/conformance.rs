//! The shared conformance suite against both backends, plus etcd-specific behaviour.

use isthmus_store::embedded::EmbeddedStore;
use isthmus_store::etcd::{EtcdOptions, EtcdStore, EtcdTls};
use isthmus_store::testing::{EtcdProcess, TcpRelay, TempEmbedded};
use isthmus_store::{conformance, DynStore, EventKind, Op, Revision, Store, StoreError, WatchEvent};
use std::time::Duration;

async fn start_etcd() -> EtcdProcess {
    // Fails (panics) with a clear message if /usr/bin/etcd is missing: never a silent pass.
    tokio::task::spawn_blocking(EtcdProcess::start)
        .await
        .expect("etcd start panicked")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_conformance() {
    let tmp = TempEmbedded::new();
    conformance::run_all(tmp.dyn_store()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_conformance() {
    let etcd = start_etcd().await;
    let store: DynStore = EtcdStore::connect(vec![etcd.endpoint()]).await.expect("connect");
    conformance::run_all(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_fails_over_to_a_live_endpoint() {
    let etcd = start_etcd().await;
    // A port nobody listens on: connection refused, so the client moves on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let store = EtcdStore::connect(vec![dead.clone(), etcd.endpoint()])
        .await
        .expect("connect");
    let r = store.put("/failover/k", b"v".to_vec()).await.expect("put");
    assert_eq!(
        store.get("/failover/k").await.expect("get").map(|kv| kv.mod_revision),
        Some(r)
    );

    match EtcdStore::connect(vec![dead]).await {
        Err(StoreError::Unavailable(msg)) => assert!(msg.contains("no etcd endpoint"), "{msg}"),
        Err(e) => panic!("expected Unavailable, got {e}"),
        Ok(_) => panic!("connect to a dead endpoint succeeded"),
    }
}

/// Puts until one succeeds (the first calls after an etcd restart may still fail).
async fn put_retrying(store: &EtcdStore, key: &str, value: &[u8]) -> Revision {
    for _ in 0..100 {
        match store.put(key, value.to_vec()).await {
            Ok(r) => return r,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("put {key} kept failing");
}

/// Every event of `w` until `n` arrived, as (key, revision), checking nothing repeats.
async fn drain(w: &mut isthmus_store::Watch, n: usize) -> Vec<(String, Revision)> {
    let evs: Vec<(String, Revision)> = conformance::collect_events(w, n)
        .await
        .into_iter()
        .flatten()
        .map(|e| (e.kv.key, e.kv.mod_revision))
        .collect();
    assert_eq!(evs.len(), n, "more events than written (duplicates?): {evs:?}");
    evs
}

/// Several watches share one etcd stream; etcd restarts (same data dir) under them while
/// events are still undelivered. Each watch resumes where it was: every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_survives_restart_without_loss_or_duplicates() {
    let mut etcd = start_etcd().await;
    let store = EtcdStore::connect(vec![etcd.endpoint()]).await.expect("connect");
    let mut all = store.watch("/resume/", 0).await.expect("watch");
    let mut only_b = store.watch("/resume/b/", 0).await.expect("watch");
    let mut revs = Vec::new();
    for i in 0..20 {
        let key = if i % 2 == 0 {
            format!("/resume/a/{i}")
        } else {
            format!("/resume/b/{i}")
        };
        revs.push((key.clone(), store.put(&key, b"1".to_vec()).await.expect("put")));
    }
    // Read some, leave the rest in flight across the restart.
    let first = drain(&mut all, 5).await;
    assert_eq!(first, revs[..5].to_vec());
    // A watch created from the past, replaying.
    let mut replay = store.watch("/resume/a/", revs[0].1).await.expect("watch");

    etcd = tokio::task::spawn_blocking(move || {
        etcd.restart();
        etcd
    })
    .await
    .expect("restart");

    for i in 20..30 {
        let key = if i % 2 == 0 {
            format!("/resume/a/{i}")
        } else {
            format!("/resume/b/{i}")
        };
        let r = put_retrying(&store, &key, b"2").await;
        revs.push((key, r));
    }
    assert_eq!(revs[20].1, revs[19].1 + 1, "etcd kept its data");
    let rest = drain(&mut all, 25).await;
    assert_eq!(rest, revs[5..].to_vec());
    conformance::expect_quiet(&mut all).await;
    let bs: Vec<_> = revs
        .iter()
        .filter(|(k, _)| k.starts_with("/resume/b/"))
        .cloned()
        .collect();
    assert_eq!(drain(&mut only_b, bs.len()).await, bs);
    conformance::expect_quiet(&mut only_b).await;
    let as_: Vec<_> = revs
        .iter()
        .filter(|(k, _)| k.starts_with("/resume/a/"))
        .cloned()
        .collect();
    assert_eq!(drain(&mut replay, as_.len()).await, as_);
    conformance::expect_quiet(&mut replay).await;

    // Resuming from a compacted revision says so instead of skipping.
    let last = revs.last().expect("revs").1;
    store.compact(last).await.expect("compact");
    let mut w3 = store.watch("/resume/", revs[0].1).await.expect("watch");
    match conformance::next_message(&mut w3).await {
        WatchEvent::Compacted { compact_revision } => assert_eq!(compact_revision, last),
        other => panic!("expected Compacted, got {other:?}"),
    }
    drop(etcd);
}

/// The watch stream breaks; while it is down, history it has not delivered yet is written
/// and compacted. On reconnect the watch says Compacted (it cannot resume) instead of
/// skipping, and a watch that had delivered everything resumes without loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_compaction_while_the_watch_is_away_gives_compacted() {
    let etcd = start_etcd().await;
    let relay = TcpRelay::start(&etcd.endpoint()).await;
    let opts = EtcdOptions {
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let through_relay = EtcdStore::connect_with(vec![relay.endpoint()], opts)
        .await
        .expect("connect");
    let direct = EtcdStore::connect(vec![etcd.endpoint()]).await.expect("connect");
    let mut behind = through_relay.watch("/cw/x/", 0).await.expect("watch");
    let mut current = through_relay.watch("/cw/y/", 0).await.expect("watch");
    let r1 = direct.put("/cw/x/1", b"1".to_vec()).await.expect("put");
    assert_eq!(drain(&mut behind, 1).await, vec![("/cw/x/1".to_string(), r1)]);

    relay.cut();
    let r2 = direct.put("/cw/x/2", b"2".to_vec()).await.expect("put");
    let r3 = direct.put("/cw/other", b"3".to_vec()).await.expect("put");
    direct.compact(r3).await.expect("compact");
    assert!(r2 < r3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.reopen();

    match conformance::next_message(&mut behind).await {
        WatchEvent::Compacted { compact_revision } => assert_eq!(compact_revision, r3),
        other => panic!("expected Compacted, got {other:?}"),
    }
    match tokio::time::timeout(Duration::from_secs(5), behind.rx.recv()).await {
        Ok(None) => {}
        other => panic!("watch should end after Compacted, got {other:?}"),
    }
    // The /cw/y/ watch had nothing pending before r3... but resumes from its own next
    // revision, which is compacted too: it must say so as well, or carry on without loss.
    let r4 = direct.put("/cw/y/1", b"4".to_vec()).await.expect("put");
    match conformance::next_message(&mut current).await {
        WatchEvent::Compacted { compact_revision } => assert_eq!(compact_revision, r3),
        WatchEvent::Events(evs) => {
            assert_eq!(evs.len(), 1);
            assert_eq!((evs[0].kv.key.as_str(), evs[0].kv.mod_revision), ("/cw/y/1", r4));
        }
    }
}

/// The compactor keeps a window of history and compacts the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compactor_keeps_a_window() {
    let etcd = start_etcd().await;
    let store: DynStore = EtcdStore::connect(vec![etcd.endpoint()]).await.expect("connect");
    for i in 0..30 {
        store.put(&format!("/compactor/{i}"), b"v".to_vec()).await.expect("put");
    }
    let now = store.revision().await.expect("revision");
    let task = isthmus_store::spawn_compactor(
        &store,
        isthmus_store::CompactionPolicy {
            window: 10,
            interval: Duration::from_millis(100),
        },
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut old = store.watch("/compactor/", now - 12).await.expect("watch");
    match conformance::next_message(&mut old).await {
        WatchEvent::Compacted { compact_revision } => assert_eq!(compact_revision, now - 10),
        other => panic!("expected Compacted, got {other:?}"),
    }
    let mut inside = store.watch("/compactor/", now - 9).await.expect("watch");
    assert_eq!(conformance::collect_events(&mut inside, 10).await.concat().len(), 10);
    task.abort();
}

/// Embedded leases do not survive the process: reopening deletes their keys in one write,
/// which a watch from before sees; plain keys stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_leased_keys_go_on_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before;
    {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let lease = store.grant_lease(3600).await.expect("grant");
        store
            .txn(
                vec![],
                vec![
                    Op::put_with_lease("/l/a", "1", lease),
                    Op::put_with_lease("/l/b", "2", lease),
                    Op::put("/l/plain", "3"),
                ],
            )
            .await
            .expect("put");
        // Detached again by a plain put: stays.
        store
            .txn(vec![], vec![Op::put_with_lease("/l/c", "4", lease)])
            .await
            .expect("put");
        store.put("/l/c", b"5".to_vec()).await.expect("put");
        before = store.revision().await.expect("revision");
    }
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    assert_eq!(store.revision().await.expect("revision"), before + 1, "one write");
    let (kvs, _) = store.list("/l/").await.expect("list");
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, vec!["/l/c", "/l/plain"]);
    let mut w = store.watch("/l/", before + 1).await.expect("watch");
    let evs = conformance::collect_events(&mut w, 2).await;
    assert_eq!(evs.len(), 1, "one batch: {evs:?}");
    assert!(evs[0]
        .iter()
        .all(|e| e.kind == EventKind::Delete && e.kv.mod_revision == before + 1));
    drop(w);
    drop(store);
    // And a third open finds nothing more to delete.
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    assert_eq!(store.revision().await.expect("revision"), before + 1);
}

/// The same, across a log rotation: the snapshot keeps the lease marks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_leased_keys_go_on_reopen_after_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = isthmus_store::embedded::EmbeddedOptions {
        snapshot_after_bytes: 4096,
        ..Default::default()
    };
    {
        let store = EmbeddedStore::open_with(dir.path(), opts.clone()).expect("open");
        let lease = store.grant_lease(3600).await.expect("grant");
        store
            .txn(vec![], vec![Op::put_with_lease("/s/leased", "1", lease)])
            .await
            .expect("put");
        for i in 0..40 {
            store.put(&format!("/s/{i}"), vec![b'v'; 200]).await.expect("put");
        }
    }
    assert!(
        dir.path().join(isthmus_store::embedded::SNAPSHOT_FILE).exists(),
        "rotated"
    );
    let store = EmbeddedStore::open_with(dir.path(), opts).expect("reopen");
    assert_eq!(store.get("/s/leased").await.expect("get"), None);
    assert_eq!(store.list("/s/").await.expect("list").0.len(), 40);
}

/// etcd with TLS and client-certificate authentication: the store connects with the CA and a
/// client certificate, and everything works over it (including the watch stream); without
/// the client certificate, or without TLS, it does not connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_a_client_certificate() {
    let etcd = tokio::task::spawn_blocking(EtcdProcess::start_tls)
        .await
        .expect("etcd start panicked");
    let files = etcd.tls_files().expect("tls files").clone();
    assert!(etcd.endpoint().starts_with("https://"));
    let opts = |cert: bool| EtcdOptions {
        request_timeout: Duration::from_secs(3),
        tls: Some(EtcdTls {
            ca_file: Some(files.ca.clone()),
            cert_file: cert.then(|| files.client_cert.clone()),
            key_file: cert.then(|| files.client_key.clone()),
        }),
        ..Default::default()
    };
    let store = EtcdStore::connect_with(vec![etcd.endpoint()], opts(true))
        .await
        .expect("connect over TLS");
    let mut w = store.watch("/tls/", 0).await.expect("watch");
    let r = store.put("/tls/k", b"v".to_vec()).await.expect("put");
    assert_eq!(drain(&mut w, 1).await, vec![("/tls/k".to_string(), r)]);
    // Endpoint without a scheme: https, because TLS is configured.
    let bare = etcd.endpoint().trim_start_matches("https://").to_string();
    let store2 = EtcdStore::connect_with(vec![bare], opts(true)).await.expect("connect");
    assert_eq!(
        store2.get("/tls/k").await.expect("get").map(|kv| kv.value),
        Some(b"v".to_vec())
    );

    match EtcdStore::connect_with(vec![etcd.endpoint()], opts(false)).await {
        Err(StoreError::Unavailable(_)) => {}
        Err(e) => panic!("expected Unavailable without a client certificate, got {e}"),
        Ok(_) => panic!("connected without the client certificate etcd requires"),
    }
    let plain = etcd.endpoint().replace("https://", "http://");
    assert!(
        EtcdStore::connect_with(vec![plain.clone()], opts(true)).await.is_err(),
        "http with TLS options"
    );
    let no_tls = EtcdOptions {
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    assert!(
        EtcdStore::connect_with(vec![etcd.endpoint()], no_tls.clone())
            .await
            .is_err(),
        "https without CA"
    );
    assert!(
        EtcdStore::connect_with(vec![plain], no_tls).await.is_err(),
        "plain HTTP to a TLS etcd"
    );
}

/// etcd with authentication on: the store logs in with user and password; a wrong password
/// is refused, and the password shows up in no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_user_and_password() {
    const PASSWORD: &str = "etcd-Secret-42";
    let etcd = start_etcd().await;
    {
        let mut admin = etcd_client::Client::connect([etcd.endpoint()], None)
            .await
            .expect("connect");
        admin.role_add("root").await.expect("role");
        admin.user_add("root", PASSWORD, None).await.expect("user");
        admin.user_grant_role("root", "root").await.expect("grant");
        admin.auth_enable().await.expect("auth enable");
    }
    let opts = |password: &str| EtcdOptions {
        request_timeout: Duration::from_secs(3),
        user: Some("root".into()),
        password: Some(password.into()),
        ..Default::default()
    };
    let store = EtcdStore::connect_with(vec![etcd.endpoint()], opts(PASSWORD))
        .await
        .expect("connect with the password");
    let mut w = store.watch("/auth/", 0).await.expect("watch");
    let lease = store.grant_lease(30).await.expect("grant");
    let res = store
        .txn(vec![], vec![Op::put_with_lease("/auth/k", "v", lease)])
        .await
        .expect("txn");
    assert_eq!(drain(&mut w, 1).await, vec![("/auth/k".to_string(), res.revision)]);
    assert!(format!("{:?}", opts(PASSWORD)).contains("redacted"));
    assert!(!format!("{:?}", opts(PASSWORD)).contains(PASSWORD));

    match EtcdStore::connect_with(vec![etcd.endpoint()], opts("wrong-Password-1")).await {
        Err(e) => assert!(!e.to_string().contains("wrong-Password-1"), "{e}"),
        Ok(_) => panic!("connected with a wrong password"),
    }
    let anonymous = EtcdOptions {
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    assert!(
        EtcdStore::connect_with(vec![etcd.endpoint()], anonymous).await.is_err(),
        "connected without credentials to an etcd with auth on"
    );
}
