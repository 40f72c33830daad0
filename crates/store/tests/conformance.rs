//! The shared conformance suite against both backends, plus etcd-specific behaviour.

use isthmus_store::etcd::EtcdStore;
use isthmus_store::testing::{EtcdProcess, TempEmbedded};
use isthmus_store::{conformance, DynStore, Store, StoreError, WatchEvent};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_resumes_after_restart() {
    let mut etcd = start_etcd().await;
    let store = EtcdStore::connect(vec![etcd.endpoint()]).await.expect("connect");
    let mut w = store.watch("/resume/", 0).await.expect("watch");
    let r1 = store.put("/resume/a", b"1".to_vec()).await.expect("put");
    let first = conformance::collect_events(&mut w, 1).await;
    assert_eq!(first[0][0].kv.mod_revision, r1);

    etcd = tokio::task::spawn_blocking(move || {
        etcd.restart();
        etcd
    })
    .await
    .expect("restart");

    // Pooled connections died with the old process; the first call may still see that.
    let mut r2 = None;
    for _ in 0..50 {
        match store.put("/resume/b", b"2".to_vec()).await {
            Ok(r) => {
                r2 = Some(r);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let r2 = r2.expect("put after restart");
    assert_eq!(r2, r1 + 1, "etcd kept its data");
    let evs: Vec<_> = conformance::collect_events(&mut w, 1)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(evs.len(), 1, "no duplicate of the event before the restart: {evs:?}");
    assert_eq!((evs[0].kv.key.as_str(), evs[0].kv.mod_revision), ("/resume/b", r2));

    // Resuming from a compacted revision says so instead of skipping.
    let mut w2 = store.watch("/resume/", r1).await.expect("watch");
    assert_eq!(conformance::collect_events(&mut w2, 2).await.concat().len(), 2);
    store.compact(r2).await.expect("compact");
    let mut w3 = store.watch("/resume/", r1).await.expect("watch");
    match conformance::next_message(&mut w3).await {
        WatchEvent::Compacted { compact_revision } => assert_eq!(compact_revision, r2),
        other => panic!("expected Compacted, got {other:?}"),
    }
    drop(etcd);
}
