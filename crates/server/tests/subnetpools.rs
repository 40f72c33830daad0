//! Subnet pools (`subnet_allocation`, `default-subnetpools`, `subnetpool-prefix-ops`) on both
//! store backends: pool validation, subnets cut from pools by length or by CIDR, quotas,
//! shared and default pools, prefix operations, visibility and policy, and allocation under
//! concurrency (one server, and two servers on one etcd).

mod support;

use ipnet::IpNet;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{assert_neutron_error, id_of, Api, Backend, TestServer};

async fn pool(api: &Api, attrs: Value) -> Value {
    api.create("subnetpools", "subnetpool", attrs).await
}

async fn from_pool(api: &Api, net: &str, pool: &str, extra: Value) -> (StatusCode, Value) {
    let mut body = json!({"network_id": net, "ip_version": 4, "subnetpool_id": pool});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    api.post("/v2.0/subnets", json!({ "subnet": body })).await
}

async fn check(backend: Backend) {
    let server = TestServer::start(backend).await;
    let admin = &server.admin;
    let m = server.member("pools").await;
    let o = server.member("others").await;

    let p = pool(
        &m.api,
        json!({"name": "p", "prefixes": ["10.10.0.0/24", "10.10.1.0/24"],
               "default_prefixlen": 26, "min_prefixlen": 24, "max_prefixlen": 28}),
    )
    .await;
    let pid = id_of(&p);
    assert_eq!(p["prefixes"], json!(["10.10.0.0/23"]), "{p}");
    assert_eq!(p["ip_version"], 4);
    assert_eq!(
        (
            &p["shared"],
            &p["is_default"],
            &p["address_scope_id"],
            &p["default_quota"]
        ),
        (&json!(false), &json!(false), &Value::Null, &Value::Null)
    );
    assert_eq!(p["revision_number"], 0);
    assert_eq!(p["project_id"], m.project_id.as_str());

    // Bad pools.
    for (attrs, status, kind) in [
        (json!({"name": "x"}), StatusCode::BAD_REQUEST, None),
        (
            json!({"prefixes": []}),
            StatusCode::BAD_REQUEST,
            Some("EmptySubnetPoolPrefixList"),
        ),
        (
            json!({"prefixes": ["10.0.0.0/8", "2001:db8::/32"]}),
            StatusCode::BAD_REQUEST,
            Some("PrefixVersionMismatch"),
        ),
        (json!({"prefixes": ["10.0.0.1/8"]}), StatusCode::BAD_REQUEST, None),
        (json!({"prefixes": ["nonsense"]}), StatusCode::BAD_REQUEST, None),
        (
            json!({"prefixes": ["10.0.0.0/8"], "min_prefixlen": 28, "max_prefixlen": 24}),
            StatusCode::BAD_REQUEST,
            Some("IllegalSubnetPoolPrefixBounds"),
        ),
        (
            json!({"prefixes": ["10.0.0.0/8"], "max_prefixlen": 33}),
            StatusCode::BAD_REQUEST,
            Some("IllegalSubnetPoolPrefixBounds"),
        ),
        (
            json!({"prefixes": ["10.0.0.0/8"], "min_prefixlen": 16, "default_prefixlen": 12}),
            StatusCode::BAD_REQUEST,
            Some("IllegalSubnetPoolPrefixBounds"),
        ),
        (
            json!({"prefixes": ["10.0.0.0/8"], "default_quota": -1}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            json!({"prefixes": ["10.0.0.0/8"], "ip_version": 4}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            json!({"prefixes": ["10.0.0.0/8"], "shared": true}),
            StatusCode::FORBIDDEN,
            None,
        ),
        (
            json!({"prefixes": ["10.0.0.0/8"], "is_default": true}),
            StatusCode::FORBIDDEN,
            None,
        ),
    ] {
        let (s, b) = m.api.post("/v2.0/subnetpools", json!({ "subnetpool": attrs })).await;
        assert_neutron_error(s, &b, status, kind);
    }

    // Other projects see nothing of a pool that is not shared.
    let path = format!("/v2.0/subnetpools/{pid}");
    let (s, b) = o.api.get(&path).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("SubnetPoolNotFound"));
    let (s, b) = o.api.put(&path, json!({"subnetpool": {"name": "mine"}})).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);
    let (s, b) = o.api.delete(&path).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);
    assert!(o.api.ids("/v2.0/subnetpools", "subnetpools").await.is_empty());
    let (s, b) = o
        .api
        .put(&format!("{path}/add_prefixes"), json!({"prefixes": ["10.99.0.0/24"]}))
        .await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);
    let onet = id_of(&o.api.network("o").await);
    let (s, b) = from_pool(&o.api, &onet, &pid, json!({})).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("SubnetPoolNotFound"));

    // Subnets from the pool: by length, by the pool's default, by CIDR.
    let net = id_of(&m.api.network("n").await);
    let (s, b) = from_pool(&m.api, &net, &pid, json!({"prefixlen": 26})).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["subnet"]["cidr"], "10.10.0.0/26", "{b}");
    assert_eq!(b["subnet"]["subnetpool_id"], pid.as_str());
    assert_eq!(b["subnet"]["gateway_ip"], "10.10.0.1");
    let first = id_of(&b["subnet"]);
    let (s, b) = from_pool(&m.api, &net, &pid, json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["subnet"]["cidr"], "10.10.0.64/26", "{b}");
    let (s, b) = from_pool(
        &m.api,
        &net,
        &pid,
        json!({"cidr": "10.10.1.0/24", "allocation_pools": [{"start": "10.10.1.10", "end": "10.10.1.20"}]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["subnet"]["allocation_pools"][0]["start"], "10.10.1.10", "{b}");
    let (s, b) = m.api.get(&format!("/v2.0/subnets?subnetpool_id={pid}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["subnets"].as_array().map(Vec::len), Some(3), "{b}");

    // Requests the pool cannot serve.
    for (extra, status, kind) in [
        (
            json!({"cidr": "10.10.0.0/25"}),
            StatusCode::CONFLICT,
            Some("SubnetAllocationError"),
        ),
        (
            json!({"cidr": "10.20.0.0/24"}),
            StatusCode::CONFLICT,
            Some("SubnetAllocationError"),
        ),
        (
            json!({"prefixlen": 30}),
            StatusCode::BAD_REQUEST,
            Some("MaxPrefixSubnetAllocationError"),
        ),
        (
            json!({"prefixlen": 20}),
            StatusCode::BAD_REQUEST,
            Some("MinPrefixSubnetAllocationError"),
        ),
        (
            json!({"cidr": "10.10.0.128/25", "prefixlen": 25}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (json!({"prefixlen": -1}), StatusCode::BAD_REQUEST, None),
        (json!({"ip_version": 6}), StatusCode::BAD_REQUEST, None),
        (
            json!({"allocation_pools": [{"start": "10.10.0.130", "end": "10.10.0.140"}]}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (json!({"use_default_subnetpool": true}), StatusCode::BAD_REQUEST, None),
    ] {
        let (s, b) = from_pool(&m.api, &net, &pid, extra.clone()).await;
        assert_neutron_error(s, &b, status, kind);
    }
    let (s, b) = m
        .api
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": net, "ip_version": 4, "prefixlen": 24}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    // One pool per IP version on a network.
    let (s, b) = m
        .api
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": net, "ip_version": 4, "cidr": "192.168.7.0/24"}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, Some("NetworkSubnetPoolAffinityError"));
    // The last /25, then nothing.
    let (s, b) = from_pool(&m.api, &net, &pid, json!({"prefixlen": 25})).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["subnet"]["cidr"], "10.10.0.128/25", "{b}");
    let (s, b) = from_pool(&m.api, &net, &pid, json!({"prefixlen": 28})).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("SubnetAllocationError"));

    // Prefix operations: only unused space goes; updates only grow.
    let (s, b) = m
        .api
        .put(
            &format!("{path}/remove_prefixes"),
            json!({"prefixes": ["10.10.1.0/24"]}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, Some("IllegalSubnetPoolUpdate"));
    let (s, b) = m
        .api
        .put(&format!("{path}/add_prefixes"), json!({"prefixes": ["10.10.2.0/24"]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, json!({"prefixes": ["10.10.0.0/23", "10.10.2.0/24"]}));
    let (s, b) = m
        .api
        .put(&format!("{path}/add_prefixes"), json!({"prefixes": ["2001:db8::/64"]}))
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let (s, b) = m
        .api
        .put(
            &format!("{path}/remove_prefixes"),
            json!({"prefixes": ["10.10.2.0/25"]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b, json!({"prefixes": ["10.10.0.0/23", "10.10.2.128/25"]}));
    let (s, b) = m.api.put(&format!("{path}/add_prefixes"), json!({})).await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    for method in [Method::GET, Method::POST, Method::DELETE] {
        let (s, b) = m.api.call(method, &format!("{path}/add_prefixes"), None).await;
        assert_neutron_error(s, &b, StatusCode::METHOD_NOT_ALLOWED, None);
    }
    let (s, b) = m
        .api
        .put(&path, json!({"subnetpool": {"prefixes": ["10.10.0.0/23"]}}))
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, Some("IllegalSubnetPoolPrefixUpdate"));
    let (s, b) = m
        .api
        .put(
            &path,
            json!({"subnetpool": {"prefixes": ["10.10.0.0/22"], "name": "grown", "max_prefixlen": 27}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["subnetpool"]["prefixes"], json!(["10.10.0.0/22"]), "{b}");
    assert_eq!(b["subnetpool"]["max_prefixlen"], 27, "{b}");
    assert_eq!(b["subnetpool"]["revision_number"], 3, "{b}");
    for body in [
        json!({"max_prefixlen": 20}),
        json!({"ip_version": 6}),
        json!({"shared": true}),
        json!({"is_default": false}),
    ] {
        let (s, b) = m.api.put(&path, json!({ "subnetpool": body })).await;
        assert!(
            s == StatusCode::BAD_REQUEST || s == StatusCode::FORBIDDEN,
            "{body}: {s} {b}"
        );
    }

    // Tags.
    let (s, b) = m.api.put_empty(&format!("{path}/tags/blue")).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(
        m.api.ids("/v2.0/subnetpools?tags=blue", "subnetpools").await,
        vec![pid.clone()]
    );

    // In use: no delete until its subnets are gone (one by itself, the rest with the network).
    let (s, b) = m.api.delete(&path).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("SubnetPoolInUse"));
    let (s, b) = m.api.delete(&format!("/v2.0/subnets/{first}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b) = from_pool(&m.api, &net, &pid, json!({"cidr": "10.10.0.0/26"})).await;
    assert_eq!(s, StatusCode::CREATED, "space freed by a deleted subnet is reused: {b}");
    let (s, b) = m.api.delete(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b) = m.api.delete(&path).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b) = m.api.get(&path).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("SubnetPoolNotFound"));

    // A shared pool with a quota: visible to all, 512 addresses per project, admin's to change.
    let shared = pool(
        admin,
        json!({"prefixes": ["10.30.0.0/16"], "shared": true, "default_quota": 512,
               "min_prefixlen": 24, "max_prefixlen": 28}),
    )
    .await;
    let sid = id_of(&shared);
    assert_eq!(shared["default_quota"], 512);
    assert!(o.api.ids("/v2.0/subnetpools", "subnetpools").await.contains(&sid));
    let mnet = id_of(&m.api.network("q").await);
    for _ in 0..2 {
        let (s, b) = from_pool(&o.api, &onet, &sid, json!({})).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    let (s, b) = from_pool(&o.api, &onet, &sid, json!({"prefixlen": 28})).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("SubnetPoolQuotaExceeded"));
    let (s, b) = from_pool(&m.api, &mnet, &sid, json!({})).await;
    assert_eq!(s, StatusCode::CREATED, "the quota is per project: {b}");
    let spath = format!("/v2.0/subnetpools/{sid}");
    let (s, b) = o.api.put(&spath, json!({"subnetpool": {"name": "taken"}})).await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);
    let (s, b) = o.api.delete(&spath).await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);
    let (s, b) = o
        .api
        .put(&format!("{spath}/add_prefixes"), json!({"prefixes": ["10.31.0.0/16"]}))
        .await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);

    // Default pools: one per IP version, used by `use_default_subnetpool`.
    let d6 = pool(
        admin,
        json!({"prefixes": ["2001:db8:100::/48"], "shared": true, "is_default": true}),
    )
    .await;
    assert_eq!((&d6["ip_version"], &d6["default_prefixlen"]), (&json!(6), &json!(64)));
    let (s, b) = admin
        .post(
            "/v2.0/subnetpools",
            json!({"subnetpool": {"prefixes": ["2001:db8:200::/48"], "is_default": true}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    let other6 = id_of(&pool(admin, json!({"prefixes": ["2001:db8:200::/48"]})).await);
    let (s, b) = admin
        .put(
            &format!("/v2.0/subnetpools/{other6}"),
            json!({"subnetpool": {"is_default": true}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    let (s, b) = m
        .api
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": mnet, "ip_version": 6, "use_default_subnetpool": true}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["subnet"]["cidr"], "2001:db8:100::/64", "{b}");
    assert_eq!(b["subnet"]["subnetpool_id"], d6["id"]);
    let (s, b) = m
        .api
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": onet, "ip_version": 4, "use_default_subnetpool": true}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    // Handing the default over: unset one, set the other.
    let (s, b) = admin
        .put(
            &format!("/v2.0/subnetpools/{}", id_of(&d6)),
            json!({"subnetpool": {"is_default": false}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = admin
        .put(
            &format!("/v2.0/subnetpools/{other6}"),
            json!({"subnetpool": {"is_default": true}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let list = admin.list("/v2.0/subnetpools?is_default=true", "subnetpools").await;
    assert_eq!(list.iter().map(id_of).collect::<Vec<_>>(), vec![other6.clone()]);
    let v6 = admin.ids("/v2.0/subnetpools?ip_version=6", "subnetpools").await;
    assert_eq!(v6.len(), 2, "{v6:?}");
    let (s, b) = admin.get("/v2.0/subnetpools?bogus=1").await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let (s, b) = admin.delete(&format!("/v2.0/subnetpools/{other6}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b) = admin
        .post(
            "/v2.0/subnetpools",
            json!({"subnetpool": {"prefixes": ["2001:db8:300::/48"], "is_default": true}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "deleting the default frees the place: {b}");
}

#[tokio::test]
async fn pools_on_the_embedded_store() {
    check(Backend::Embedded).await;
}

#[tokio::test]
async fn pools_on_etcd() {
    check(Backend::Etcd).await;
}

/// Many parallel creates of mixed sizes from one small pool (through `apis`, one per server):
/// the successes never overlap and stay inside the pool, the rest fail with a clean 409.
async fn race(apis: &[Api], admin: &Api) {
    let p = pool(
        admin,
        json!({"prefixes": ["10.77.0.0/26"], "shared": true, "min_prefixlen": 26, "max_prefixlen": 29,
               "default_prefixlen": 28}),
    )
    .await;
    let pid = id_of(&p);
    let mut nets = vec![];
    for i in 0..16 {
        nets.push(id_of(&admin.network(&format!("race-{i}")).await));
    }
    let tasks: Vec<_> = nets
        .iter()
        .enumerate()
        .map(|(i, net)| {
            let api = apis[i % apis.len()].clone();
            let (net, pid) = (net.clone(), pid.clone());
            let len = [27, 28, 29][i % 3];
            tokio::spawn(async move { from_pool(&api, &net, &pid, json!({"prefixlen": len})).await })
        })
        .collect();
    let mut got: Vec<IpNet> = vec![];
    let mut refused = 0;
    for t in tasks {
        let (s, b) = t.await.expect("task");
        if s == StatusCode::CREATED {
            got.push(b["subnet"]["cidr"].as_str().unwrap().parse().unwrap());
        } else {
            assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("SubnetAllocationError"));
            refused += 1;
        }
    }
    let pool_net: IpNet = "10.77.0.0/26".parse().unwrap();
    for (i, a) in got.iter().enumerate() {
        assert!(pool_net.contains(a), "{a} outside the pool");
        for b in &got[i + 1..] {
            assert!(
                !a.contains(&b.network()) && !b.contains(&a.network()),
                "{a} overlaps {b}"
            );
        }
    }
    let used: u32 = got.iter().map(|n| 1u32 << (32 - n.prefix_len())).sum();
    assert!(used <= 64 && refused > 0, "{got:?}, {refused} refused");
    // Whatever is left is too small for every size asked, or exactly what the refusals missed.
    assert_eq!(got.len() + refused, 16);
}

#[tokio::test]
async fn parallel_allocations_on_the_embedded_store() {
    let server = TestServer::start(Backend::Embedded).await;
    race(std::slice::from_ref(&server.admin), &server.admin).await;
}

#[tokio::test]
async fn parallel_allocations_across_two_servers_on_etcd() {
    let a = TestServer::start(Backend::Etcd).await;
    let b = TestServer::start_on_etcd(a.etcd().expect("etcd"), |_| {}).await;
    let other = b.api(&a.admin.token);
    race(&[a.admin.clone(), other], &a.admin).await;
}
