//! One behavioural suite every [`Store`](crate::Store) backend must pass.
//!
//! Each case works under its own fresh key prefix, but several assert exact global revision
//! steps and one compacts the store, so run the suite on a store nobody else writes to at the
//! same time. Cases panic (assert) on a deviation, like test code.

use crate::{Compare, DynStore, Event, EventKind, KeyValue, Op, Revision, StoreError, TxnResult, Watch, WatchEvent};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long a case waits for an expected watch message.
const WAIT: Duration = Duration::from_secs(10);
/// How long a case waits to be sure no (further) message arrives.
const QUIET: Duration = Duration::from_millis(300);

/// Runs every case in order.
pub async fn run_all(store: DynStore) {
    crud(store.clone()).await;
    list_prefix(store.clone()).await;
    revisions(store.clone()).await;
    compares(store.clone()).await;
    atomicity(store.clone()).await;
    invalid_requests(store.clone()).await;
    concurrent_cas(store.clone()).await;
    watch_from_now(store.clone()).await;
    watch_replay(store.clone()).await;
    watch_prefix_filter(store.clone()).await;
    watch_delete_event(store.clone()).await;
    watch_txn_batch(store.clone()).await;
    watch_future_revision(store.clone()).await;
    watch_compacted(store.clone()).await;
    watch_receiver_drop(store.clone()).await;
    failed_txn_reports_compared_revision(store.clone()).await;
    lease_expiry_deletes_keys(store.clone()).await;
    lease_keep_alive_keeps_keys(store.clone()).await;
    lease_revoke_deletes_at_once(store.clone()).await;
}

/// A key prefix no other case (or earlier run against the same store) uses.
pub fn fresh_prefix(case: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "/conformance/{}-{nanos}-{}/{case}/",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn must_get(store: &DynStore, key: &str) -> KeyValue {
    match store.get(key).await.expect("get") {
        Some(kv) => kv,
        None => panic!("{key} should exist"),
    }
}

async fn rev(store: &DynStore) -> Revision {
    store.revision().await.expect("revision")
}

/// Next watch message; panics on timeout, error or end of the watch.
pub async fn next_message(w: &mut Watch) -> WatchEvent {
    match tokio::time::timeout(WAIT, w.rx.recv()).await {
        Ok(Some(Ok(m))) => m,
        Ok(Some(Err(e))) => panic!("watch error: {e}"),
        Ok(None) => panic!("watch ended unexpectedly"),
        Err(_) => panic!("no watch message within {WAIT:?}"),
    }
}

/// Batches until at least `n` events arrived; checks that no revision spans two batches.
pub async fn collect_events(w: &mut Watch, n: usize) -> Vec<Vec<Event>> {
    let mut batches: Vec<Vec<Event>> = Vec::new();
    let mut total = 0;
    while total < n {
        match next_message(w).await {
            WatchEvent::Events(evs) => {
                assert!(!evs.is_empty(), "empty event batch");
                total += evs.len();
                batches.push(evs);
            }
            WatchEvent::Compacted { compact_revision } => {
                panic!("unexpected Compacted({compact_revision}) after {total}/{n} events")
            }
        }
    }
    let revs: Vec<Vec<Revision>> = batches
        .iter()
        .map(|b| b.iter().map(|e| e.kv.mod_revision).collect())
        .collect();
    for b in &revs {
        assert!(
            b.windows(2).all(|p| p[0] <= p[1]),
            "batch out of revision order: {revs:?}"
        );
    }
    for pair in revs.windows(2) {
        assert!(
            pair[0].last() < pair[1].first(),
            "a revision is split across batches: {revs:?}"
        );
    }
    batches
}

async fn collect_flat(w: &mut Watch, n: usize) -> Vec<Event> {
    let evs: Vec<Event> = collect_events(w, n).await.into_iter().flatten().collect();
    assert_eq!(evs.len(), n, "more events than expected: {evs:?}");
    evs
}

/// Asserts nothing arrives for a short while.
pub async fn expect_quiet(w: &mut Watch) {
    if let Ok(m) = tokio::time::timeout(QUIET, w.rx.recv()).await {
        panic!("unexpected watch message: {m:?}");
    }
}

fn put_event(kv: &KeyValue) -> Event {
    Event {
        kind: EventKind::Put,
        kv: kv.clone(),
    }
}

fn delete_event(key: &str, rev: Revision) -> Event {
    Event {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: key.to_string(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: rev,
            version: 0,
        },
    }
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

/// get/put/delete, create/mod revisions and versions.
pub async fn crud(store: DynStore) {
    let k = format!("{}key", fresh_prefix("crud"));
    assert_eq!(store.get(&k).await.expect("get"), None);

    let r1 = store.put(&k, b"v1".to_vec()).await.expect("put");
    let kv = must_get(&store, &k).await;
    assert_eq!(
        kv,
        KeyValue {
            key: k.clone(),
            value: b"v1".to_vec(),
            create_revision: r1,
            mod_revision: r1,
            version: 1
        }
    );

    let r2 = store.put(&k, b"v2".to_vec()).await.expect("put");
    assert_eq!(r2, r1 + 1);
    let kv = must_get(&store, &k).await;
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision, kv.version),
        (&b"v2"[..], r1, r2, 2)
    );

    let r3 = store.delete(&k).await.expect("delete");
    assert_eq!(r3, r2 + 1);
    assert_eq!(store.get(&k).await.expect("get"), None);
    // Deleting an absent key is a no-op that leaves the revision alone.
    assert_eq!(store.delete(&k).await.expect("delete"), r3);
    assert_eq!(rev(&store).await, r3);

    // Re-creation starts a new life: fresh create revision, version 1.
    let r4 = store.put(&k, Vec::new()).await.expect("put");
    assert_eq!(r4, r3 + 1);
    let kv = must_get(&store, &k).await;
    assert_eq!(
        (kv.value.len(), kv.create_revision, kv.mod_revision, kv.version),
        (0, r4, r4, 1)
    );

    // Values are bytes, not text.
    let bin: Vec<u8> = (0..=255u8).rev().collect();
    store.put(&k, bin.clone()).await.expect("put");
    assert_eq!(must_get(&store, &k).await.value, bin);
}

/// Prefix listing: sorted, complete, no neighbours.
pub async fn list_prefix(store: DynStore) {
    let p = fresh_prefix("list");
    for (i, k) in ["a/2", "a/10", "ab", "a", "a/", "b/1", "a/1", "a/x/y"]
        .iter()
        .enumerate()
    {
        store.put(&format!("{p}{k}"), vec![i as u8]).await.expect("put");
    }
    let now = rev(&store).await;

    let (kvs, at) = store.list(&format!("{p}a/")).await.expect("list");
    let want: Vec<String> = ["a/", "a/1", "a/10", "a/2", "a/x/y"]
        .iter()
        .map(|k| format!("{p}{k}"))
        .collect();
    assert_eq!(keys(&kvs), want);
    assert_eq!(at, now, "list revision");
    assert_eq!(kvs[1].value, vec![6u8]);
    for kv in &kvs {
        assert_eq!(Some(kv), store.get(&kv.key).await.expect("get").as_ref());
    }

    let (kvs, _) = store.list(&format!("{p}ab")).await.expect("list");
    assert_eq!(keys(&kvs), vec![format!("{p}ab")]);
    let (kvs, at) = store.list(&format!("{p}zz/")).await.expect("list");
    assert!(kvs.is_empty());
    assert_eq!(at, now);
    let (kvs, _) = store.list(&p).await.expect("list");
    assert_eq!(kvs.len(), 8);
    assert!(
        kvs.windows(2).all(|w| w[0].key < w[1].key),
        "not sorted: {:?}",
        keys(&kvs)
    );
}

/// Exactly +1 per successful write txn; nothing for failed or write-free txns.
pub async fn revisions(store: DynStore) {
    let p = fresh_prefix("rev");
    let mut last = rev(&store).await;
    for i in 0..5 {
        let r = store.put(&format!("{p}{i}"), b"x".to_vec()).await.expect("put");
        assert_eq!(r, last + 1, "put {i}");
        last = r;
    }
    assert_eq!(rev(&store).await, last);

    let ops = vec![
        Op::put(format!("{p}m1"), "1"),
        Op::put(format!("{p}m2"), "2"),
        Op::delete(format!("{p}0")),
    ];
    let res = store.txn(vec![], ops).await.expect("txn");
    assert!(res.succeeded);
    assert_eq!(res.revision, last + 1, "multi-op txn bumps once");
    last = res.revision;

    let res = store.txn(vec![], vec![]).await.expect("empty txn");
    assert_eq!((res.succeeded, res.revision), (true, last));
    let res = store
        .txn(vec![], vec![Op::delete(format!("{p}absent"))])
        .await
        .expect("txn");
    assert_eq!((res.succeeded, res.revision), (true, last), "delete of absent key");
    let res = store
        .txn(
            vec![Compare::Exists(format!("{p}absent"))],
            vec![Op::put(format!("{p}1"), "y")],
        )
        .await
        .expect("txn");
    assert_eq!((res.succeeded, res.revision), (false, last), "failed txn");
    assert_eq!(rev(&store).await, last);
    assert_eq!(store.list(&p).await.expect("list").1, last);
}

/// Absent / Exists / ModRevision, alone and combined.
pub async fn compares(store: DynStore) {
    let p = fresh_prefix("cmp");
    let (k, missing) = (format!("{p}k"), format!("{p}missing"));
    let put = |v: &str| vec![Op::put(k.clone(), v.to_string())];

    let res = store
        .txn(vec![Compare::Absent(k.clone())], put("1"))
        .await
        .expect("txn");
    assert!(res.succeeded, "Absent on a missing key");
    let created = must_get(&store, &k).await;
    assert_eq!(created.mod_revision, res.revision);

    let cases: Vec<(Vec<Compare>, &str)> = vec![
        (vec![Compare::Absent(k.clone())], "Absent on an existing key"),
        (vec![Compare::Exists(missing.clone())], "Exists on a missing key"),
        (
            vec![Compare::ModRevision(k.clone(), created.mod_revision - 1)],
            "stale ModRevision",
        ),
        (
            vec![Compare::ModRevision(k.clone(), created.mod_revision + 1)],
            "future ModRevision",
        ),
        (
            vec![Compare::ModRevision(missing.clone(), 0)],
            "ModRevision 0 on a missing key",
        ),
        (
            vec![Compare::ModRevision(k.clone(), 0)],
            "ModRevision 0 on an existing key",
        ),
        (
            vec![Compare::Exists(k.clone()), Compare::Exists(missing.clone())],
            "one of two compares false",
        ),
    ];
    for (cmp, what) in cases {
        let before = rev(&store).await;
        let res = store.txn(cmp, put("changed")).await.expect("txn");
        assert!(!res.succeeded, "{what} must fail");
        assert_eq!(res.revision, before, "{what}: revision");
        assert_eq!(must_get(&store, &k).await, created, "{what} changed the key");
    }

    let res = store
        .txn(vec![Compare::Exists(k.clone())], put("2"))
        .await
        .expect("txn");
    assert!(res.succeeded, "Exists on an existing key");
    let res = store
        .txn(
            vec![
                Compare::ModRevision(k.clone(), res.revision),
                Compare::Absent(missing.clone()),
            ],
            put("3"),
        )
        .await
        .expect("txn");
    assert!(res.succeeded, "current ModRevision + Absent");
    let kv = must_get(&store, &k).await;
    assert_eq!(
        (kv.value.as_slice(), kv.version, kv.create_revision),
        (&b"3"[..], 3, created.create_revision)
    );
}

/// All ops of a txn apply together at one revision, or none do.
pub async fn atomicity(store: DynStore) {
    let p = fresh_prefix("atomic");
    let (a, b, c, guard) = (format!("{p}a"), format!("{p}b"), format!("{p}c"), format!("{p}guard"));
    store.put(&c, b"old".to_vec()).await.expect("put");
    store.put(&guard, b"g".to_vec()).await.expect("put");

    let ops = || vec![Op::put(a.clone(), "A"), Op::put(b.clone(), "B"), Op::delete(c.clone())];
    let before = rev(&store).await;
    let res = store
        .txn(vec![Compare::Absent(guard.clone())], ops())
        .await
        .expect("txn");
    assert!(!res.succeeded);
    assert_eq!(store.get(&a).await.expect("get"), None);
    assert_eq!(store.get(&b).await.expect("get"), None);
    assert_eq!(must_get(&store, &c).await.value, b"old");
    assert_eq!(rev(&store).await, before);

    let res = store
        .txn(vec![Compare::Exists(guard.clone())], ops())
        .await
        .expect("txn");
    assert!(res.succeeded);
    assert_eq!(res.revision, before + 1);
    let (kvs, _) = store.list(&p).await.expect("list");
    assert_eq!(keys(&kvs), vec![a.as_str(), b.as_str(), guard.as_str()]);
    assert!(kvs[..2]
        .iter()
        .all(|kv| kv.mod_revision == res.revision && kv.create_revision == res.revision));
}

/// Requests both backends refuse the same way.
pub async fn invalid_requests(store: DynStore) {
    let p = fresh_prefix("invalid");
    let before = rev(&store).await;
    let dup = vec![Op::put(format!("{p}k"), "1"), Op::put(format!("{p}k"), "2")];
    assert!(
        matches!(store.txn(vec![], dup).await, Err(StoreError::Invalid(_))),
        "duplicate key"
    );
    let mixed = vec![Op::put(format!("{p}k"), "1"), Op::delete(format!("{p}k"))];
    assert!(
        matches!(store.txn(vec![], mixed).await, Err(StoreError::Invalid(_))),
        "put+delete"
    );
    assert!(
        matches!(
            store.txn(vec![], vec![Op::put("", "x")]).await,
            Err(StoreError::Invalid(_))
        ),
        "empty key"
    );
    assert!(
        matches!(store.watch(&p, -1).await, Err(StoreError::Invalid(_))),
        "negative watch revision"
    );
    assert_eq!(store.get(&format!("{p}k")).await.expect("get"), None);
    assert_eq!(rev(&store).await, before);
}

/// Many tasks incrementing one counter with ModRevision retries lose no update.
pub async fn concurrent_cas(store: DynStore) {
    const TASKS: usize = 50;
    const EACH: usize = 2;
    let k = format!("{}counter", fresh_prefix("cas"));
    let res = store
        .txn(vec![Compare::Absent(k.clone())], vec![Op::put(k.clone(), "0")])
        .await
        .expect("create");
    assert!(res.succeeded);
    let start = res.revision;

    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (store, k) = (store.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let mut retries = 0u64;
            for _ in 0..EACH {
                loop {
                    let kv = must_get(&store, &k).await;
                    let n: u64 = std::str::from_utf8(&kv.value).expect("utf8").parse().expect("number");
                    let res = store
                        .txn(
                            vec![Compare::ModRevision(k.clone(), kv.mod_revision)],
                            vec![Op::put(k.clone(), (n + 1).to_string())],
                        )
                        .await
                        .expect("txn");
                    if res.succeeded {
                        break;
                    }
                    retries += 1;
                }
            }
            retries
        }));
    }
    for t in tasks {
        t.await.expect("cas task panicked");
    }
    let kv = must_get(&store, &k).await;
    let total = (TASKS * EACH) as i64;
    assert_eq!(kv.value, total.to_string().into_bytes(), "lost updates");
    assert_eq!(kv.version, total + 1);
    assert_eq!(kv.mod_revision, start + total, "one revision per successful increment");
    assert_eq!(
        rev(&store).await,
        start + total,
        "failed CAS attempts must not bump the revision"
    );
}

/// Watch from 0 sees what happens after it started, not before.
pub async fn watch_from_now(store: DynStore) {
    let p = fresh_prefix("wnow");
    store.put(&format!("{p}before"), b"0".to_vec()).await.expect("put");
    let mut w = store.watch(&p, 0).await.expect("watch");
    let k = format!("{p}after");
    store.put(&k, b"1".to_vec()).await.expect("put");
    let evs = collect_flat(&mut w, 1).await;
    assert_eq!(evs, vec![put_event(&must_get(&store, &k).await)]);
    expect_quiet(&mut w).await;
}

/// Watch from a past revision replays exactly the history under the prefix, then follows.
pub async fn watch_replay(store: DynStore) {
    let p = fresh_prefix("wreplay");
    let other = format!("{}x", p.trim_end_matches('/'));
    let (a, b, c) = (format!("{p}a"), format!("{p}b"), format!("{p}c"));
    let r1 = store.put(&a, b"1".to_vec()).await.expect("put");
    let kv_a = must_get(&store, &a).await;
    store.put(&other, b"noise".to_vec()).await.expect("put");
    store.put(&b, b"2".to_vec()).await.expect("put");
    let kv_b = must_get(&store, &b).await;
    let r3 = store.delete(&a).await.expect("delete");
    store.put(&c, b"3".to_vec()).await.expect("put");
    let kv_c = must_get(&store, &c).await;

    let mut w = store.watch(&p, r1).await.expect("watch");
    let want = vec![
        put_event(&kv_a),
        put_event(&kv_b),
        delete_event(&a, r3),
        put_event(&kv_c),
    ];
    assert_eq!(collect_flat(&mut w, 4).await, want);
    expect_quiet(&mut w).await;

    // ...and keeps following live writes.
    let d = format!("{p}d");
    store.put(&d, b"4".to_vec()).await.expect("put");
    assert_eq!(
        collect_flat(&mut w, 1).await,
        vec![put_event(&must_get(&store, &d).await)]
    );

    // A later start replays only the tail.
    let mut w2 = store.watch(&p, r3).await.expect("watch");
    let got = collect_flat(&mut w2, 3).await;
    assert_eq!(got[..2], want[2..]);
    assert_eq!(got[2].kv.key, d);
}

/// Only keys under the prefix; "p/a/" does not see "p/ab" or "p/a".
pub async fn watch_prefix_filter(store: DynStore) {
    let p = fresh_prefix("wprefix");
    let mut w = store.watch(&format!("{p}a/"), 0).await.expect("watch");
    for k in ["ab", "a", "b/a/", "ab/1"] {
        store.put(&format!("{p}{k}"), b"n".to_vec()).await.expect("put");
    }
    let inside = format!("{p}a/1");
    store.put(&inside, b"y".to_vec()).await.expect("put");
    assert_eq!(
        collect_flat(&mut w, 1).await,
        vec![put_event(&must_get(&store, &inside).await)]
    );
    expect_quiet(&mut w).await;
}

/// Delete events carry the key, an empty value and the delete's revision.
pub async fn watch_delete_event(store: DynStore) {
    let p = fresh_prefix("wdel");
    let k = format!("{p}k");
    store.put(&k, b"value".to_vec()).await.expect("put");
    let mut w = store.watch(&p, 0).await.expect("watch");
    let r = store.delete(&k).await.expect("delete");
    // A no-op delete produces no event.
    store.delete(&k).await.expect("delete");
    assert_eq!(collect_flat(&mut w, 1).await, vec![delete_event(&k, r)]);
    expect_quiet(&mut w).await;
}

/// All events of one txn arrive in one batch, in op order.
pub async fn watch_txn_batch(store: DynStore) {
    let p = fresh_prefix("wtxn");
    let d = format!("{p}d");
    store.put(&d, b"old".to_vec()).await.expect("put");
    let mut w = store.watch(&p, 0).await.expect("watch");
    let mut want = Vec::new();
    for round in 0..3 {
        let ks: Vec<String> = (0..3).map(|i| format!("{p}r{round}k{i}")).collect();
        let mut ops: Vec<Op> = ks.iter().map(|k| Op::put(k.clone(), "v")).collect();
        if round == 0 {
            ops.push(Op::delete(d.clone()));
        }
        let res = store.txn(vec![], ops).await.expect("txn");
        for k in &ks {
            want.push(put_event(&must_get(&store, k).await));
        }
        if round == 0 {
            want.push(delete_event(&d, res.revision));
        }
    }
    // collect_events checks no revision is split across batches.
    let got: Vec<Event> = collect_events(&mut w, want.len()).await.into_iter().flatten().collect();
    assert_eq!(got, want);
}

/// A watch may start at a revision not yet written.
pub async fn watch_future_revision(store: DynStore) {
    let p = fresh_prefix("wfuture");
    let start = rev(&store).await + 2;
    let mut w = store.watch(&p, start).await.expect("watch");
    store.put(&format!("{p}first"), b"1".to_vec()).await.expect("put");
    let k = format!("{p}second");
    let r = store.put(&k, b"2".to_vec()).await.expect("put");
    assert_eq!(r, start);
    assert_eq!(
        collect_flat(&mut w, 1).await,
        vec![put_event(&must_get(&store, &k).await)]
    );
}

/// After compact(r), a watch from before r gets Compacted{r} and ends; from r it works.
pub async fn watch_compacted(store: DynStore) {
    let p = fresh_prefix("wcompact");
    let r1 = store.put(&format!("{p}1"), b"1".to_vec()).await.expect("put");
    let r2 = store.put(&format!("{p}2"), b"2".to_vec()).await.expect("put");
    store.put(&format!("{p}3"), b"3".to_vec()).await.expect("put");
    store.compact(r2).await.expect("compact");
    // Idempotent for older revisions.
    store.compact(r1).await.expect("compact older");
    let future = rev(&store).await + 10;
    assert!(
        matches!(store.compact(future).await, Err(StoreError::Invalid(_))),
        "compact to the future"
    );

    let mut w = store.watch(&p, r1).await.expect("watch");
    match next_message(&mut w).await {
        WatchEvent::Compacted { compact_revision } => assert_eq!(compact_revision, r2),
        other => panic!("expected Compacted, got {other:?}"),
    }
    match tokio::time::timeout(WAIT, w.rx.recv()).await {
        Ok(None) => {}
        other => panic!("watch should end after Compacted, got {other:?}"),
    }

    let mut w = store.watch(&p, r2).await.expect("watch");
    let got = collect_flat(&mut w, 2).await;
    assert_eq!(
        keys(&got.iter().map(|e| e.kv.clone()).collect::<Vec<_>>()),
        vec![format!("{p}2"), format!("{p}3")]
    );
    // Data itself is untouched by compaction.
    assert_eq!(store.list(&p).await.expect("list").0.len(), 3);
}

/// Dropping a watch's receiver ends it without harming the store or other watches.
pub async fn watch_receiver_drop(store: DynStore) {
    let p = fresh_prefix("wdrop");
    let mut keep = store.watch(&p, 0).await.expect("watch");
    for _ in 0..5 {
        drop(store.watch(&p, 0).await.expect("watch"));
    }
    let from = rev(&store).await + 1;
    drop(store.watch(&p, from).await.expect("watch"));
    for i in 0..20 {
        store
            .put(&format!("{p}{i}"), vec![i as u8])
            .await
            .expect("put after drop");
    }
    assert_eq!(collect_flat(&mut keep, 20).await.len(), 20);
    let mut again = store.watch(&p, from).await.expect("watch");
    assert_eq!(collect_flat(&mut again, 20).await.len(), 20);
}

/// A failed txn says which revision shows every compared key as it was when it failed, and
/// which compared keys were absent; writes elsewhere do not move that revision.
pub async fn failed_txn_reports_compared_revision(store: DynStore) {
    let p = fresh_prefix("conflict");
    let (a, b, gone) = (format!("{p}a"), format!("{p}b"), format!("{p}gone"));
    store.put(&a, b"1".to_vec()).await.expect("put");
    let rb = store.put(&b, b"1".to_vec()).await.expect("put");
    let rg = store.put(&gone, b"1".to_vec()).await.expect("put");
    store.delete(&gone).await.expect("delete");
    // Unrelated writes after: the revision to wait for must not include them.
    for i in 0..3 {
        store.put(&format!("{p}other{i}"), b"x".to_vec()).await.expect("put");
    }
    let res = store
        .txn(
            vec![
                Compare::ModRevision(a.clone(), 1),
                Compare::Exists(b.clone()),
                Compare::ModRevision(gone.clone(), rg),
            ],
            vec![Op::put(a.clone(), "2")],
        )
        .await
        .expect("txn");
    assert!(!res.succeeded);
    assert_eq!(
        res.compared_revision, rb,
        "highest mod_revision of the compared keys: {res:?}"
    );
    assert_eq!(res.compared_absent, vec![gone.clone()]);

    let res = store
        .txn(vec![Compare::Absent(a.clone())], vec![Op::put(a.clone(), "2")])
        .await
        .expect("txn");
    assert_eq!(res.compared_revision, must_get(&store, &a).await.mod_revision);
    assert!(res.compared_absent.is_empty());

    let ok = store
        .txn(vec![Compare::Exists(a.clone())], vec![Op::put(a.clone(), "3")])
        .await
        .expect("txn");
    assert_eq!(ok, TxnResult::applied(ok.revision));
}

/// Waits up to `WAIT` for `key` to be gone.
async fn wait_gone(store: &DynStore, key: &str) -> std::time::Duration {
    let start = std::time::Instant::now();
    while store.get(key).await.expect("get").is_some() {
        assert!(start.elapsed() < WAIT, "{key} still there after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// A lease nobody renews expires: its keys are deleted in one transaction the watch sees, a
/// put with it is refused afterwards, and keep-alive says it is gone.
pub async fn lease_expiry_deletes_keys(store: DynStore) {
    let p = fresh_prefix("lexpire");
    let (k1, k2, plain) = (format!("{p}k1"), format!("{p}k2"), format!("{p}plain"));
    assert!(matches!(store.grant_lease(0).await, Err(StoreError::Invalid(_))));
    // etcd's minimum TTL is about 2 s whatever is asked; ask for that.
    let lease = store.grant_lease(2).await.expect("grant");
    assert!(lease > 0);
    store
        .txn(
            vec![],
            vec![
                Op::put_with_lease(k1.clone(), "1", lease),
                Op::put_with_lease(k2.clone(), "2", lease),
                Op::put(plain.clone(), "3"),
            ],
        )
        .await
        .expect("put with lease");
    let mut w = store.watch(&p, 0).await.expect("watch");
    let started = std::time::Instant::now();
    wait_gone(&store, &k1).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "expired after {took:?}, before its TTL"
    );
    assert_eq!(store.get(&k2).await.expect("get"), None);
    assert!(
        store.get(&plain).await.expect("get").is_some(),
        "a key without the lease stays"
    );
    let batches = collect_events(&mut w, 2).await;
    assert_eq!(batches.len(), 1, "both keys go in one transaction: {batches:?}");
    let evs = &batches[0];
    assert!(evs.iter().all(|e| e.kind == EventKind::Delete));
    assert_eq!(evs[0].kv.mod_revision, evs[1].kv.mod_revision);
    let mut ks: Vec<&str> = evs.iter().map(|e| e.kv.key.as_str()).collect();
    ks.sort();
    assert_eq!(ks, vec![k1.as_str(), k2.as_str()]);
    expect_quiet(&mut w).await;

    assert!(
        !store.keep_alive(lease).await.expect("keep_alive"),
        "expired lease kept alive"
    );
    assert!(
        matches!(
            store
                .txn(vec![], vec![Op::put_with_lease(k1.clone(), "x", lease)])
                .await,
            Err(StoreError::Invalid(_))
        ),
        "put with an expired lease"
    );
    assert_eq!(store.get(&k1).await.expect("get"), None);
}

/// Renewing a lease keeps its keys well past its TTL.
pub async fn lease_keep_alive_keeps_keys(store: DynStore) {
    let p = fresh_prefix("lkeep");
    let k = format!("{p}k");
    let lease = store.grant_lease(2).await.expect("grant");
    store
        .txn(vec![], vec![Op::put_with_lease(k.clone(), "v", lease)])
        .await
        .expect("put");
    let mut w = store.watch(&p, 0).await.expect("watch");
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        assert!(
            store.keep_alive(lease).await.expect("keep_alive"),
            "lease died while renewed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        store.get(&k).await.expect("get").is_some(),
        "key gone although its lease was renewed"
    );
    expect_quiet(&mut w).await;
    // A plain put detaches the key from the lease.
    store.put(&k, b"plain".to_vec()).await.expect("put");
    store.revoke_lease(lease).await.expect("revoke");
    assert_eq!(must_get(&store, &k).await.value, b"plain");
    assert!(!store.keep_alive(lease).await.expect("keep_alive"));
    assert!(!store.keep_alive(123_456_789).await.expect("keep_alive unknown"));
}

/// Revoking deletes the lease's keys at once, in one transaction.
pub async fn lease_revoke_deletes_at_once(store: DynStore) {
    let p = fresh_prefix("lrevoke");
    let lease = store.grant_lease(60).await.expect("grant");
    let other = store.grant_lease(60).await.expect("grant");
    assert_ne!(lease, other);
    let keys: Vec<String> = (0..3).map(|i| format!("{p}k{i}")).collect();
    let ops = keys.iter().map(|k| Op::put_with_lease(k.clone(), "v", lease)).collect();
    store.txn(vec![], ops).await.expect("put");
    let kept = format!("{p}other");
    store
        .txn(vec![], vec![Op::put_with_lease(kept.clone(), "v", other)])
        .await
        .expect("put");
    let mut w = store.watch(&p, 0).await.expect("watch");
    let before = rev(&store).await;
    store.revoke_lease(lease).await.expect("revoke");
    for k in &keys {
        assert_eq!(store.get(k).await.expect("get"), None, "{k} survived the revoke");
    }
    assert_eq!(rev(&store).await, before + 1, "one transaction");
    let evs = collect_flat(&mut w, 3).await;
    assert!(evs
        .iter()
        .all(|e| e.kind == EventKind::Delete && e.kv.mod_revision == before + 1));
    assert!(store.get(&kept).await.expect("get").is_some());
    // Idempotent, and the other lease is untouched.
    store.revoke_lease(lease).await.expect("revoke again");
    assert!(store.keep_alive(other).await.expect("keep_alive"));
    store.revoke_lease(other).await.expect("revoke other");
    assert_eq!(store.get(&kept).await.expect("get"), None);
}
