//! Two servers on one etcd: both bootstrap (the second idempotently), then eight clients, four
//! per server, create 2,000 ports on one /21 concurrently. Every create must succeed, and both
//! servers must then list the same 2,000 ports with unique addresses from the pool.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};
use support::{eventually, id_of, Api, Backend, TestServer};

const CLIENTS_PER_SERVER: usize = 4;
const PORTS_PER_CLIENT: usize = 250;
const TOTAL: usize = 2 * CLIENTS_PER_SERVER * PORTS_PER_CLIENT;

async fn count_named(api: &Api, path: &str, plural: &str) -> usize {
    api.list(path, plural).await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_one_etcd_2000_concurrent_ports() {
    // 2000 ports in one project: more than Neutron's default port quota.
    let a = TestServer::start_with(Backend::Etcd, |c| c.unlimited_quotas()).await;
    let etcd = a.etcd().expect("etcd backend");
    // The second server bootstraps against an already bootstrapped store.
    let b = TestServer::start_on_etcd(etcd, |c| c.unlimited_quotas()).await;

    // Bootstrap was idempotent: one admin, one admin project, one of each built-in role, and
    // tokens from either server work on both.
    for s in [&a, &b] {
        let (st, users) = s.identity(Method::GET, "/users?name=admin", None).await;
        assert_eq!(st, StatusCode::OK, "{users}");
        assert_eq!(users["users"].as_array().map(Vec::len), Some(1), "{users}");
        let (_, projects) = s.identity(Method::GET, "/projects?name=admin", None).await;
        assert_eq!(projects["projects"].as_array().map(Vec::len), Some(1), "{projects}");
        for role in ["admin", "member", "reader"] {
            s.role_id(role).await;
        }
    }
    let (st, body) = b.api(&a.admin.token).get("/v2.0/networks").await;
    assert_eq!(st, StatusCode::OK, "a token from server A on server B: {body}");
    let (st, body) = a.api(&b.admin.token).get("/v2.0/networks").await;
    assert_eq!(st, StatusCode::OK, "a token from server B on server A: {body}");

    // A member project (created through A) with one network and a /21.
    let m = a.member("ha").await;
    let net = id_of(&m.api.network("ha-net").await);
    let sub = m
        .api
        .create(
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": "10.20.0.0/21", "ip_version": 4}),
        )
        .await;
    assert_eq!(sub["gateway_ip"], "10.20.0.1");
    assert_eq!(
        sub["allocation_pools"],
        json!([{"start": "10.20.0.2", "end": "10.20.7.254"}]),
        "2045 usable addresses"
    );
    let sub_id = id_of(&sub);
    let api_b = b.api(&m.token);
    eventually(Duration::from_secs(10), "server B to see the subnet", || {
        let api_b = api_b.clone();
        let path = format!("/v2.0/subnets/{sub_id}");
        async move { (api_b.get(&path).await.0 == StatusCode::OK).then_some(()) }
    })
    .await;

    // 8 clients, 4 per server, each with its own connection pool.
    let started = Instant::now();
    let mut tasks = vec![];
    for (server, base) in [(0usize, &a.network_url), (1, &b.network_url)] {
        for c in 0..CLIENTS_PER_SERVER {
            let api = Api {
                http: reqwest::Client::new(),
                base: base.clone(),
                token: m.token.clone(),
            };
            let net = net.clone();
            tasks.push(tokio::spawn(async move {
                let mut made: Vec<Value> = Vec::with_capacity(PORTS_PER_CLIENT);
                let mut failures: Vec<String> = vec![];
                for i in 0..PORTS_PER_CLIENT {
                    let body = json!({"port": {"network_id": net, "name": format!("s{server}-c{c}-{i}")}});
                    let (st, resp) = api.post("/v2.0/ports", body).await;
                    if st == StatusCode::CREATED {
                        made.push(resp["port"].clone());
                    } else {
                        failures.push(format!("server {server} client {c} port {i}: {st} {resp}"));
                    }
                }
                (made, failures)
            }));
        }
    }
    let mut created: Vec<Value> = Vec::with_capacity(TOTAL);
    let mut failures = vec![];
    for t in tasks {
        let (made, failed) = t.await.expect("client task");
        created.extend(made);
        failures.extend(failed);
    }
    let elapsed = started.elapsed();
    println!(
        "ha: {} ports created through 2 servers by 8 clients in {:.2?} ({:.0} ports/s)",
        created.len(),
        elapsed,
        created.len() as f64 / elapsed.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} creates did not answer 201; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(created.len(), TOTAL);

    // What the clients were told is consistent by itself.
    let pool_lo = u32::from(Ipv4Addr::new(10, 20, 0, 2));
    let pool_hi = u32::from(Ipv4Addr::new(10, 20, 7, 254));
    let check = |ports: &[Value], who: &str| {
        let mut ids = HashSet::new();
        let mut ips = HashSet::new();
        let mut macs = HashSet::new();
        for p in ports {
            assert!(ids.insert(id_of(p)), "{who}: port id twice: {p}");
            let fixed = p["fixed_ips"].as_array().expect("fixed_ips");
            assert_eq!(fixed.len(), 1, "{who}: one address per port: {p}");
            assert_eq!(fixed[0]["subnet_id"], json!(sub_id), "{who}: {p}");
            let ip: Ipv4Addr = fixed[0]["ip_address"].as_str().expect("ip").parse().expect("IPv4");
            assert!(
                (pool_lo..=pool_hi).contains(&u32::from(ip)),
                "{who}: {ip} outside the allocation pool"
            );
            assert!(ips.insert(ip), "{who}: IP {ip} given to two ports");
            let mac = p["mac_address"].as_str().expect("mac").to_string();
            assert!(macs.insert(mac.clone()), "{who}: MAC {mac} given to two ports");
        }
        ids
    };
    let answered = check(&created, "create responses");

    // Both servers converge on exactly those 2,000 ports.
    for (name, s) in [("A", &a), ("B", &b)] {
        let api = s.api(&m.token);
        let path = format!("/v2.0/ports?network_id={net}");
        eventually(
            Duration::from_secs(30),
            &format!("server {name} to list {TOTAL} ports"),
            || {
                let api = api.clone();
                let path = path.clone();
                async move { (count_named(&api, &path, "ports").await == TOTAL).then_some(()) }
            },
        )
        .await;
        let listed = api.list(&path, "ports").await;
        assert_eq!(listed.len(), TOTAL, "server {name}");
        let ids = check(&listed, &format!("server {name} list"));
        assert_eq!(ids, answered, "server {name} lists exactly the ports that were created");
        // The admin view agrees.
        assert_eq!(
            s.admin.list(&path, "ports").await.len(),
            TOTAL,
            "server {name} admin list"
        );
    }
}
