//! The server on etcd through the gRPC store: its cache recovers when its watch is compacted
//! under it, and lost compare-and-swap races (network and identity writes alike) cost no more
//! than a re-plan even while another application writes to the same etcd outside `/isthmus/`.

mod support;

use isthmus_server::ServerHandle;
use isthmus_store::etcd::{EtcdOptions, EtcdStore};
use isthmus_store::testing::{EtcdProcess, TcpRelay};
use isthmus_store::{DynStore, Store};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{eventually, id_of, issue_token, test_config, Api, ADMIN_PASSWORD, ADMIN_PROJECT, ADMIN_USER};

async fn start_etcd() -> EtcdProcess {
    tokio::task::spawn_blocking(EtcdProcess::start)
        .await
        .expect("etcd start task")
}

/// A server on `store`, and the network API as the admin.
async fn server_on(store: DynStore) -> (ServerHandle, Api) {
    let (handle, api, _) = server_with_identity(store).await;
    (handle, api)
}

/// A server on `store`, and its network and identity APIs as the admin.
async fn server_with_identity(store: DynStore) -> (ServerHandle, Api, Api) {
    let handle = isthmus_server::start(test_config(), store)
        .await
        .expect("server starts");
    let http = reqwest::Client::new();
    let identity_url = format!("http://{}/v3", handle.identity_addr);
    let token = issue_token(&http, &identity_url, ADMIN_USER, ADMIN_PASSWORD, ADMIN_PROJECT).await;
    let api = Api {
        http: http.clone(),
        base: format!("http://{}", handle.network_addr),
        token: token.clone(),
    };
    let identity = Api {
        http,
        base: format!("http://{}", handle.identity_addr),
        token,
    };
    (handle, api, identity)
}

/// The server's cache watch is cut off from etcd (its connection goes through a relay we
/// cut); meanwhile another client changes a network and compacts the history the watch has
/// not seen. When the connection comes back the watch cannot resume (compacted): the cache
/// relists, shows the change, and writes through the API work and read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_recovers_when_its_watch_is_compacted_under_it() {
    let etcd = start_etcd().await;
    let relay = TcpRelay::start(&etcd.endpoint()).await;
    let opts = EtcdOptions {
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let store: DynStore = EtcdStore::connect_with(vec![relay.endpoint()], opts)
        .await
        .expect("connect through the relay");
    let direct = EtcdStore::connect(vec![etcd.endpoint()]).await.expect("connect");
    let (handle, api) = server_on(store).await;

    let net = api.network("before").await;
    let id = id_of(&net);
    let key = isthmus_model::keys::resource("networks", &id);

    relay.cut();
    // Written while the cache cannot see it, then the history compacted away.
    let kv = direct.get(&key).await.expect("get").expect("network in etcd");
    let mut stored: Value = serde_json::from_slice(&kv.value).expect("network JSON");
    stored["name"] = json!("renamed-while-away");
    direct
        .put(&key, serde_json::to_vec(&stored).expect("json"))
        .await
        .expect("put");
    let behind = handle.state.cache.revision();
    for i in 0..5 {
        direct
            .put(&format!("/other-app/{i}"), b"x".to_vec())
            .await
            .expect("put");
    }
    let now = direct.revision().await.expect("revision");
    direct.compact(now).await.expect("compact");
    assert!(behind < now);
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.reopen();

    // The cache relisted: it shows the write it never saw as an event.
    eventually(Duration::from_secs(15), "the cache to relist", || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let (s, b) = api.get(&format!("/v2.0/networks/{id}")).await;
            (s == StatusCode::OK && b["network"]["name"] == "renamed-while-away").then_some(())
        }
    })
    .await;
    assert!(handle.state.cache.revision() >= now);

    // Writes go through and read back (each waits for the cache to show it).
    let (s, b) = api
        .put(&format!("/v2.0/networks/{id}"), json!({"network": {"name": "after"}}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = api.get(&format!("/v2.0/networks/{id}")).await;
    assert_eq!(
        (s, b["network"]["name"].clone()),
        (StatusCode::OK, json!("after")),
        "{b}"
    );
    let other = api.network("created-after").await;
    let names: Vec<String> = api
        .list("/v2.0/networks", "networks")
        .await
        .iter()
        .map(|n| n["name"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        names.contains(&"after".to_string()) && names.contains(&"created-after".to_string()),
        "{names:?}"
    );
    let (s, _) = api.delete(&format!("/v2.0/networks/{}", id_of(&other))).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    handle.stop().await;
}

/// Latencies of one contended phase.
#[derive(Default, Debug)]
struct Stats {
    requests: usize,
    max: Duration,
    total: Duration,
}

impl Stats {
    fn add(&mut self, d: Duration) {
        self.requests += 1;
        self.max = self.max.max(d);
        self.total += d;
    }
    fn mean(&self) -> Duration {
        self.total / self.requests.max(1) as u32
    }
}

/// Rounds of concurrent updates of one network, concurrent port creates on one small subnet
/// (they compete for the same addresses), then concurrent updates of one project through the
/// identity API: every request must succeed, quickly.
async fn contend(api: &Api, identity: &Api, project_id: &str, net_id: &str, subnet_net: &str, rounds: usize) -> Stats {
    let mut stats = Stats::default();
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for client in 0..4 {
            let api = api.clone();
            let path = format!("/v2.0/networks/{net_id}");
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                let (s, b) = api
                    .put(&path, json!({"network": {"name": format!("r{round}-c{client}")}}))
                    .await;
                (start.elapsed(), s, b, StatusCode::OK)
            }));
        }
        for _ in 0..2 {
            let api = api.clone();
            let net = subnet_net.to_string();
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                let (s, b) = api.post("/v2.0/ports", json!({"port": {"network_id": net}})).await;
                (start.elapsed(), s, b, StatusCode::CREATED)
            }));
        }
        for t in tasks.drain(..) {
            let (took, s, b, want) = t.await.expect("request task");
            assert_eq!(s, want, "round {round}: {b}");
            stats.add(took);
        }
        // Identity writes on their own, so no network write moves the cache on while a lost
        // race waits.
        for client in 0..3 {
            let identity = identity.clone();
            let path = format!("/v3/projects/{project_id}");
            tasks.push(tokio::spawn(async move {
                let start = Instant::now();
                let body = json!({"project": {"description": format!("r{round}-c{client}")}});
                let (s, b) = identity.call(reqwest::Method::PATCH, &path, Some(body)).await;
                (start.elapsed(), s, b, StatusCode::OK)
            }));
        }
        for t in tasks {
            let (took, s, b, want) = t.await.expect("request task");
            assert_eq!(s, want, "round {round}: {b}");
            stats.add(took);
        }
    }
    stats
}

/// Another application hammers the same etcd outside `/isthmus/` while clients race on the
/// same network and the same addresses. The lost races wait only for the revisions of the
/// keys they compared, not for the store's global revision (which the cache, watching only
/// `/isthmus/`, would never reach): no request ends in 503 or takes more than about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_stay_fast_with_a_foreign_writer_on_the_same_etcd() {
    const ROUNDS: usize = 5;
    let etcd = start_etcd().await;
    let store: DynStore = EtcdStore::connect(vec![etcd.endpoint()]).await.expect("connect");
    let (handle, api, identity) = server_with_identity(store).await;
    let (s, b) = identity
        .post(
            "/v3/projects",
            json!({"project": {"name": "contended", "domain_id": "default"}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let project_id = b["project"]["id"].as_str().unwrap_or_default().to_string();
    let net = api.network("contended").await;
    let net_id = id_of(&net);
    let pnet = api.network("ports").await;
    let pnet_id = id_of(&pnet);
    // A /27: 29 addresses for the 2 x 2 x ROUNDS ports, so creates compete for the lowest ones.
    api.subnet(&pnet_id, "10.9.0.0/27").await;

    let quiet = contend(&api, &identity, &project_id, &net_id, &pnet_id, ROUNDS).await;

    let foreign = EtcdStore::connect(vec![etcd.endpoint()]).await.expect("connect");
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..2 {
        let (foreign, stop, written) = (foreign.clone(), stop.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                foreign
                    .put(&format!("/other-app/w{w}/{}", i % 64), i.to_string().into_bytes())
                    .await
                    .expect("foreign put");
                written.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    // Let it get going: the global revision runs ahead of anything under /isthmus/.
    eventually(Duration::from_secs(10), "the foreign writer", || {
        let written = written.clone();
        async move { (written.load(Ordering::Relaxed) > 50).then_some(()) }
    })
    .await;
    let busy = contend(&api, &identity, &project_id, &net_id, &pnet_id, ROUNDS).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    eprintln!(
        "conflict latency without a foreign writer: {} requests, mean {:?}, max {:?}; with one \
         ({} foreign writes): {} requests, mean {:?}, max {:?}",
        quiet.requests,
        quiet.mean(),
        quiet.max,
        written.load(Ordering::Relaxed),
        busy.requests,
        busy.mean(),
        busy.max
    );
    assert!(
        busy.max < Duration::from_millis(1500),
        "a request took {:?} with a foreign writer on the same etcd",
        busy.max
    );
    // All of them landed: 4 x ROUNDS x 2 updates bumped the network's revision, and the ports
    // have distinct addresses.
    let (_, b) = api.get(&format!("/v2.0/networks/{net_id}")).await;
    assert!(
        b["network"]["revision_number"].as_u64().unwrap_or(0) >= (2 * 4 * ROUNDS) as u64,
        "{b}"
    );
    let ports = api.list(&format!("/v2.0/ports?network_id={pnet_id}"), "ports").await;
    let mut ips: Vec<String> = ports
        .iter()
        .map(|p| p["fixed_ips"][0]["ip_address"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(ips.len(), 2 * 2 * ROUNDS);
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 2 * 2 * ROUNDS, "duplicate addresses");
    handle.stop().await;
}
