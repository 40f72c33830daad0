//! Quotas (`quotas`, `quota_details`): the API with Neutron's defaults, policy and errors;
//! enforcement on create (single and bulk) with capacity given back by deletes; configured
//! defaults; concurrent creates never exceeding a limit, on one server and on two sharing etcd.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{assert_neutron_error, error_message, id_of, Api, Backend, TestServer, MEMBER_PASSWORD};

fn over_quota(st: StatusCode, b: &Value, resource: &str) {
    assert_neutron_error(st, b, StatusCode::CONFLICT, Some("OverQuota"));
    assert_eq!(
        error_message(b),
        format!("Quota exceeded for resources: ['{resource}'].")
    );
}

async fn api_and_enforcement(backend: Backend) {
    let s = TestServer::start(backend).await;
    let admin = &s.admin;
    let m = s.member("quota").await;
    let p = m.project_id.clone();
    let (_, exts) = admin.get("/v2.0/extensions").await;
    for alias in ["quotas", "quota_details"] {
        assert!(
            exts["extensions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["alias"] == alias),
            "{alias}"
        );
    }

    // Neutron's defaults, for the project itself.
    let defaults = json!({"network": 100, "subnet": 100, "port": 500, "router": 10,
        "floatingip": 50, "security_group": 10, "security_group_rule": 100, "subnetpool": -1, "rbac_policy": 10});
    let (st, b) = m.api.get(&format!("/v2.0/quotas/{p}")).await;
    assert_eq!((st, &b["quota"]), (StatusCode::OK, &defaults), "{b}");
    let (st, b) = m.api.get(&format!("/v2.0/quotas/{p}/default")).await;
    assert_eq!((st, &b["quota"]), (StatusCode::OK, &defaults), "{b}");
    let (_, b) = m.api.get("/v2.0/quotas/tenant").await;
    assert_eq!(b, json!({"tenant": {"tenant_id": p}}));
    let (_, b) = m.api.get("/v2.0/quotas/project").await;
    assert_eq!(b, json!({"project": {"project_id": p}}));

    // Usage in the details (also with the `.json` suffix tempest uses).
    let net = id_of(&m.api.network("n").await);
    m.api.subnet(&net, "10.30.0.0/24").await;
    m.api.port(&net).await;
    for path in [
        format!("/v2.0/quotas/{p}/details"),
        format!("/v2.0/quotas/{p}/details.json"),
    ] {
        let (st, b) = m.api.get(&path).await;
        assert_eq!(st, StatusCode::OK, "{b}");
        assert_eq!(
            b["quota"]["network"],
            json!({"limit": 100, "used": 1, "reserved": 0}),
            "{b}"
        );
        assert_eq!(
            b["quota"]["port"],
            json!({"limit": 500, "used": 1, "reserved": 0}),
            "{b}"
        );
        // The project's default group (made with its first port) and its four rules count.
        assert_eq!(b["quota"]["security_group"]["used"], 1, "{b}");
        assert_eq!(b["quota"]["security_group_rule"]["used"], 4, "{b}");
    }

    // Policy: members read their own; only admins change, list, or read others'.
    let other = s.member("other").await;
    let (st, b) = other.api.get(&format!("/v2.0/quotas/{p}")).await;
    assert_neutron_error(st, &b, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    let (st, b) = other.api.get(&format!("/v2.0/quotas/{p}/default")).await;
    assert_neutron_error(st, &b, StatusCode::FORBIDDEN, None);
    let (st, b) = other.api.get(&format!("/v2.0/quotas/{p}/details")).await;
    assert_neutron_error(st, &b, StatusCode::FORBIDDEN, Some("AdminRequired"));
    let (st, b) = m.api.get("/v2.0/quotas").await;
    assert_neutron_error(st, &b, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    let (st, b) = m
        .api
        .put(&format!("/v2.0/quotas/{p}"), json!({"quota": {"network": 500}}))
        .await;
    assert_neutron_error(st, &b, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    assert_eq!(error_message(&b), "rule:update_quota is disallowed by policy");
    let (st, b) = m.api.delete(&format!("/v2.0/quotas/{p}")).await;
    assert_neutron_error(st, &b, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    let (st, b) = admin.post("/v2.0/quotas", json!({"quota": {}})).await;
    assert_neutron_error(st, &b, StatusCode::NOT_IMPLEMENTED, None);

    // Bad bodies.
    let path = format!("/v2.0/quotas/{p}");
    for body in [
        json!({"quota": {"network": "many"}}),
        json!({"quota": {"network": -2}}),
        json!({"quota": {"network": 2_147_483_648_i64}}),
        json!({"quota": {"network": true}}),
        json!({"quota": {"widgets": 1}}),
        json!({"quota": 5}),
        json!({"network": 5}),
    ] {
        let (st, b) = admin.put(&path, body.clone()).await;
        assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, None);
    }
    // A project id past 255 characters is refused, not stored.
    let long = "x".repeat(256);
    let (st, b) = admin
        .put(&format!("/v2.0/quotas/{long}"), json!({"quota": {"network": 5}}))
        .await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, None);
    let (_, b) = admin.get("/v2.0/quotas").await;
    assert!(!b.to_string().contains(&long), "{b}");
    // Below what is used: refused unless forced.
    let (st, b) = admin.put(&path, json!({"quota": {"network": 0}})).await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, None);
    assert_eq!(
        error_message(&b),
        "Quota limit 0 for network must be greater than or equal to already used 1"
    );

    // Admin sets limits; the project is listed with them; strings convert as Neutron's do.
    let (st, b) = admin.put(&path, json!({"quota": {"network": "2", "port": 3}})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(
        (b["quota"]["network"].clone(), b["quota"]["port"].clone()),
        (json!(2), json!(3))
    );
    assert_eq!(b["quota"]["subnet"], 100, "others keep the defaults");
    let (_, b) = admin.get("/v2.0/quotas").await;
    let listed: Vec<&Value> = b["quotas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["project_id"] == p)
        .collect();
    assert_eq!(listed.len(), 1, "{b}");
    assert_eq!(
        (listed[0]["network"].clone(), listed[0]["tenant_id"].clone()),
        (json!(2), json!(p))
    );
    let (_, b) = m.api.get(&path).await;
    assert_eq!(b["quota"]["network"], 2);

    // Enforced: one more network fits, then OverQuota; a delete gives the capacity back.
    let second = id_of(&m.api.network("second").await);
    let (st, b) = m
        .api
        .post("/v2.0/networks", json!({"network": {"name": "third"}}))
        .await;
    over_quota(st, &b, "network");
    let (st, _) = m.api.delete(&format!("/v2.0/networks/{second}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, b) = m
        .api
        .post("/v2.0/networks", json!({"network": {"name": "third"}}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    // An admin creating in the project is held to the project's quota.
    let (st, b) = admin
        .post(
            "/v2.0/networks",
            json!({"network": {"name": "fourth", "project_id": p}}),
        )
        .await;
    over_quota(st, &b, "network");

    // Bulk: all or nothing against the limit (one port used, three allowed).
    let ports = |n: usize| json!({"ports": (0..n).map(|_| json!({"network_id": net})).collect::<Vec<_>>()});
    let (st, b) = m.api.post("/v2.0/ports", ports(3)).await;
    over_quota(st, &b, "port");
    assert_eq!(
        m.api.ids("/v2.0/ports", "ports").await.len(),
        1,
        "nothing left of the bulk"
    );
    let (st, b) = m.api.post("/v2.0/ports", ports(2)).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");

    // Forced below usage; then every create of that resource is refused.
    let (st, b) = admin.put(&path, json!({"quota": {"port": 1, "force": true}})).await;
    assert_eq!((st, b["quota"]["port"].clone()), (StatusCode::OK, json!(1)), "{b}");
    let (st, b) = m.api.post("/v2.0/ports", json!({"port": {"network_id": net}})).await;
    over_quota(st, &b, "port");

    // Other resources: routers, security groups and rules, subnets.
    let (st, _) = admin
        .put(
            &path,
            json!({"quota": {"router": 0, "security_group": 1, "security_group_rule": 4, "subnet": 1}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (st, b) = m.api.post("/v2.0/routers", json!({"router": {"name": "r"}})).await;
    over_quota(st, &b, "router");
    let (st, b) = m
        .api
        .post("/v2.0/security-groups", json!({"security_group": {"name": "g"}}))
        .await;
    over_quota(st, &b, "security_group");
    let sg = m.api.list("/v2.0/security-groups", "security_groups").await;
    let (st, b) = m
        .api
        .post(
            "/v2.0/security-group-rules",
            json!({"security_group_rule": {"security_group_id": id_of(&sg[0]), "direction": "ingress"}}),
        )
        .await;
    over_quota(st, &b, "security_group_rule");
    let (st, b) = m
        .api
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": net, "cidr": "10.31.0.0/24", "ip_version": 4}}),
        )
        .await;
    over_quota(st, &b, "subnet");

    // Unlimited is -1.
    let (st, _) = admin.put(&path, json!({"quota": {"router": -1}})).await;
    assert_eq!(st, StatusCode::OK);
    let (st, b) = m.api.post("/v2.0/routers", json!({"router": {"name": "r"}})).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");

    // Reset: the defaults again, the project no longer listed; a second reset is 404.
    let (st, _) = admin.delete(&path).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, b) = admin.get(&path).await;
    assert_eq!(b["quota"], defaults);
    let (_, b) = admin.get("/v2.0/quotas").await;
    assert!(
        !b["quotas"].as_array().unwrap().iter().any(|q| q["project_id"] == p),
        "{b}"
    );
    let (st, b) = admin.delete(&path).await;
    assert_neutron_error(st, &b, StatusCode::NOT_FOUND, Some("TenantQuotaNotFound"));
    let (st, b) = m.api.post("/v2.0/ports", json!({"port": {"network_id": net}})).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
}

#[tokio::test]
async fn api_and_enforcement_on_the_embedded_store() {
    api_and_enforcement(Backend::Embedded).await;
}

#[tokio::test]
async fn api_and_enforcement_on_etcd() {
    api_and_enforcement(Backend::Etcd).await;
}

#[tokio::test]
async fn defaults_come_from_the_configuration() {
    let s = TestServer::start_with(Backend::Embedded, |c| {
        c.quota_defaults.insert("router".into(), 1);
        c.quota_defaults.insert("port".into(), -1);
    })
    .await;
    let m = s.member("conf").await;
    let (_, b) = m.api.get(&format!("/v2.0/quotas/{}/default", m.project_id)).await;
    assert_eq!(
        (b["quota"]["router"].clone(), b["quota"]["port"].clone()),
        (json!(1), json!(-1))
    );
    assert_eq!(b["quota"]["network"], 100);
    m.api.create("routers", "router", json!({"name": "one"})).await;
    let (st, b) = m.api.post("/v2.0/routers", json!({"router": {"name": "two"}})).await;
    over_quota(st, &b, "router");
}

/// `tries` creates of one port at once, spread over `apis`; returns how many were created,
/// after checking every refusal is OverQuota.
async fn race_ports(apis: &[Api], net: &str, tries: usize) -> usize {
    let mut tasks = vec![];
    for i in 0..tries {
        let api = apis[i % apis.len()].clone();
        let net = net.to_string();
        tasks.push(tokio::spawn(async move {
            api.post("/v2.0/ports", json!({"port": {"network_id": net}})).await
        }));
    }
    let mut created = 0;
    for t in tasks {
        let (st, b) = t.await.expect("task");
        if st == StatusCode::CREATED {
            created += 1;
        } else {
            over_quota(st, &b, "port");
        }
    }
    created
}

async fn concurrent(backend: Backend) {
    let s = TestServer::start(backend).await;
    let m = s.member("race").await;
    let net = id_of(&m.api.network("n").await);
    m.api.subnet(&net, "10.32.0.0/24").await;
    let path = format!("/v2.0/quotas/{}", m.project_id);
    let (st, _) = s.admin.put(&path, json!({"quota": {"port": 5}})).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(race_ports(std::slice::from_ref(&m.api), &net, 16).await, 5);
    assert_eq!(m.api.ids("/v2.0/ports", "ports").await.len(), 5);
    // Deleting two gives two back, under the same race.
    let ids = m.api.ids("/v2.0/ports", "ports").await;
    for id in &ids[..2] {
        let (st, _) = m.api.delete(&format!("/v2.0/ports/{id}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
    }
    assert_eq!(race_ports(std::slice::from_ref(&m.api), &net, 10).await, 2);
    let (_, b) = m.api.get(&format!("{path}/details")).await;
    assert_eq!(b["quota"]["port"], json!({"limit": 5, "used": 5, "reserved": 0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_stay_within_the_limit_on_the_embedded_store() {
    concurrent(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_stay_within_the_limit_on_etcd() {
    concurrent(Backend::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_etcd_share_the_limit() {
    let a = TestServer::start(Backend::Etcd).await;
    let b = TestServer::start_on_etcd(a.etcd().expect("etcd"), |_| {}).await;
    let m = a.member("shared").await;
    let net = id_of(&m.api.network("n").await);
    m.api.subnet(&net, "10.33.0.0/24").await;
    let (st, _) = a
        .admin
        .put(&format!("/v2.0/quotas/{}", m.project_id), json!({"quota": {"port": 6}}))
        .await;
    assert_eq!(st, StatusCode::OK);
    let on_b = b.api(&b.token(&m.user, MEMBER_PASSWORD, &m.project).await);
    let apis = [m.api.clone(), on_b.clone()];
    assert_eq!(race_ports(&apis, &net, 20).await, 6);
    // Both servers see the same six.
    for api in [&m.api, &on_b] {
        support::eventually(
            std::time::Duration::from_secs(5),
            "six ports on both servers",
            || async { (api.ids("/v2.0/ports", "ports").await.len() == 6).then_some(()) },
        )
        .await;
    }
}
