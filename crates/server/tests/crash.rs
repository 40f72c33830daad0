//! Crash safety of the real `isthmus` binary on the embedded store: SIGKILL it while four
//! clients create ports as fast as they can, restart it on the same data directory, and check
//! that every port it acknowledged (201) is still there with its address, and that addresses
//! are still unique.
//!
//! Which binary: `$ISTHMUS_BIN` if set; otherwise the test runs
//! `cargo build -p isthmus-cli --bin isthmus` (same profile as the test: `--release` when the
//! test itself is built without debug assertions) and uses the executable cargo reports. That
//! is a no-op when the binary is up to date, always tests the current sources, and follows
//! `CARGO_TARGET_DIR`. It may wait for the build lock while others build.

mod support;

use isthmus_store::testing::isthmus_bin;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::process::ServerProcess;
use support::{id_of, issue_token, send, ADMIN_PASSWORD, ADMIN_PROJECT, ADMIN_USER};

const CLIENTS: usize = 4;
const RUN_BEFORE_KILL: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone)]
struct Acked {
    id: String,
    ip: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_port_creation_loses_nothing_acknowledged() {
    let bin = tokio::task::spawn_blocking(isthmus_bin).await.expect("build task");
    let work = tempfile::Builder::new()
        .prefix("isthmus-crash-")
        .tempdir()
        .expect("tempdir");
    let data = work.path().join("data");
    let on_disk = ["--store", "embedded", "--data-dir", data.to_str().expect("utf-8 path")];
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("http client");

    // First run: a network with a /16, then ports as fast as possible until SIGKILL.
    let mut first = ServerProcess::start(&bin, work.path(), "server-1", "", &on_disk).await;
    let token = issue_token(&http, &first.identity_url, ADMIN_USER, ADMIN_PASSWORD, ADMIN_PROJECT).await;
    let (st, net) = send(
        &http,
        Method::POST,
        &format!("{}/v2.0/networks", first.network_url),
        Some(&token),
        Some(json!({"network": {"name": "crash-net"}})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{net}");
    let net_id = id_of(&net["network"]);
    let (st, sub) = send(
        &http,
        Method::POST,
        &format!("{}/v2.0/subnets", first.network_url),
        Some(&token),
        Some(json!({"subnet": {"network_id": net_id, "cidr": "10.77.0.0/16", "ip_version": 4}})),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{sub}");
    let sub_id = id_of(&sub["subnet"]);

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = vec![];
    for c in 0..CLIENTS {
        let url = format!("{}/v2.0/ports", first.network_url);
        let (token, net_id, stop) = (token.clone(), net_id.clone(), stop.clone());
        // Own client per task: separate connections, as separate users would have.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .expect("http client");
        clients.push(tokio::spawn(async move {
            let mut acked = vec![];
            let mut other = vec![];
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let req = http
                    .post(&url)
                    .header("X-Auth-Token", &token)
                    .json(&json!({"port": {"network_id": net_id, "name": format!("c{c}-{i}")}}));
                // A request cut off by the kill has no answer; it is simply not acknowledged.
                let Ok(resp) = req.send().await else { break };
                let status = resp.status();
                let Ok(body) = resp.json::<Value>().await else { break };
                if status == StatusCode::CREATED {
                    let p = &body["port"];
                    acked.push(Acked {
                        id: id_of(p),
                        ip: p["fixed_ips"][0]["ip_address"]
                            .as_str()
                            .expect("an address")
                            .to_string(),
                    });
                } else {
                    other.push(format!("{status} {body}"));
                }
            }
            (acked, other)
        }));
    }
    tokio::time::sleep(RUN_BEFORE_KILL).await;
    // SIGKILL (what Child::kill sends on Unix) with requests in flight.
    first.child.kill().expect("SIGKILL the server");
    let status = first.child.wait().expect("reap the server");
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status}");
    }
    stop.store(true, Ordering::Relaxed);
    let mut acked: Vec<Acked> = vec![];
    for c in clients {
        let (a, other) = c.await.expect("client task");
        assert!(other.is_empty(), "creates before the kill must all succeed: {other:?}");
        acked.extend(a);
    }
    println!(
        "crash: {} ports acknowledged in {RUN_BEFORE_KILL:?} before SIGKILL",
        acked.len()
    );
    assert!(
        acked.len() >= 8,
        "too few ports before the kill to mean anything: {}",
        acked.len()
    );
    drop(first);

    // Second run on the same data directory.
    let second = ServerProcess::start(&bin, work.path(), "server-2", "", &on_disk).await;
    let token = issue_token(&http, &second.identity_url, ADMIN_USER, ADMIN_PASSWORD, ADMIN_PROJECT).await;
    let get = |path: String| {
        let (http, token, base) = (http.clone(), token.clone(), second.network_url.clone());
        async move { send(&http, Method::GET, &format!("{base}{path}"), Some(&token), None).await }
    };
    let (st, body) = get(format!("/v2.0/networks/{net_id}")).await;
    assert_eq!(st, StatusCode::OK, "the network survived: {body}");
    let (st, body) = get(format!("/v2.0/subnets/{sub_id}")).await;
    assert_eq!(st, StatusCode::OK, "the subnet survived: {body}");

    let (st, body) = get(format!("/v2.0/ports?network_id={net_id}")).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let listed = body["ports"].as_array().expect("ports").clone();
    let by_id: HashMap<String, &Value> = listed.iter().map(|p| (id_of(p), p)).collect();
    let mut lost = vec![];
    for a in &acked {
        match by_id.get(&a.id) {
            None => lost.push(a.id.clone()),
            Some(p) => assert_eq!(
                p["fixed_ips"][0]["ip_address"],
                json!(a.ip),
                "port {} kept the address it was given",
                a.id
            ),
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged ports are gone after the crash: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    // GET each one as well (a sample suffices for the single-item path).
    for a in acked.iter().step_by((acked.len() / 20).max(1)) {
        let (st, body) = get(format!("/v2.0/ports/{}", a.id)).await;
        assert_eq!(st, StatusCode::OK, "port {}: {body}", a.id);
    }
    // Possibly some unacknowledged ports made it too, but no address or MAC is doubled.
    assert!(listed.len() >= acked.len());
    let mut ips = HashSet::new();
    let mut macs = HashSet::new();
    for p in &listed {
        for f in p["fixed_ips"].as_array().expect("fixed_ips") {
            let ip = f["ip_address"].as_str().expect("ip").to_string();
            assert!(ips.insert(ip.clone()), "IP {ip} held by two ports after restart");
        }
        let mac = p["mac_address"].as_str().expect("mac").to_string();
        assert!(macs.insert(mac.clone()), "MAC {mac} held by two ports after restart");
    }
    println!(
        "crash: after restart {} ports listed ({} acknowledged), all addresses unique",
        listed.len(),
        acked.len()
    );

    // The restarted server serves writes, and its address index survived: a taken address is
    // refused and a new port gets a fresh one.
    let post = |body: Value| {
        let (http, token, base) = (http.clone(), token.clone(), second.network_url.clone());
        async move {
            send(
                &http,
                Method::POST,
                &format!("{base}/v2.0/ports"),
                Some(&token),
                Some(body),
            )
            .await
        }
    };
    let taken = &acked[0].ip;
    let (st, body) = post(json!({"port": {"network_id": net_id,
        "fixed_ips": [{"subnet_id": sub_id, "ip_address": taken}]}}))
    .await;
    assert_eq!(st, StatusCode::CONFLICT, "{taken} is still allocated: {body}");
    assert_eq!(body["NeutronError"]["type"], "IpAddressAlreadyAllocated", "{body}");
    for _ in 0..5 {
        let (st, body) = post(json!({"port": {"network_id": net_id}})).await;
        assert_eq!(st, StatusCode::CREATED, "create after restart: {body}");
        let ip = body["port"]["fixed_ips"][0]["ip_address"]
            .as_str()
            .expect("ip")
            .to_string();
        assert!(ips.insert(ip.clone()), "new port got {ip}, which an old port holds");
    }
    let (st, body) = get(format!("/v2.0/ports?network_id={net_id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["ports"].as_array().map(Vec::len), Some(listed.len() + 5));
}
