//! Tags on every taggable resource (`standard-attr-tag`, `tag-ext`, `tag-creation`,
//! `tag-ports-during-bulk-creation`): the sub-API, the four list filters, tags in port
//! creates, Neutron's errors and policy, on both store backends.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{assert_neutron_error, error_message, id_of, Api, Backend, TestServer, MEMBER_PASSWORD};

/// One object of every taggable collection, owned by the member: (collection, plural, id).
async fn one_of_each(server: &TestServer, api: &Api, project: &str) -> Vec<(&'static str, &'static str, String)> {
    let admin = &server.admin;
    let ext = admin
        .create(
            "networks",
            "network",
            json!({"name": "ext", "router:external": true, "provider:network_type": "flat",
                   "provider:physical_network": "public"}),
        )
        .await;
    let ext_id = id_of(&ext);
    admin
        .create(
            "subnets",
            "subnet",
            json!({"network_id": ext_id, "cidr": "203.0.113.0/24", "ip_version": 4, "enable_dhcp": false}),
        )
        .await;
    let net = id_of(&api.network("tagged").await);
    let subnet = id_of(&api.subnet(&net, "10.20.0.0/24").await);
    let port = id_of(&api.port(&net).await);
    let sg = id_of(
        &api.create("security-groups", "security_group", json!({"name": "web"}))
            .await,
    );
    let router = id_of(&api.create("routers", "router", json!({"name": "r"})).await);
    let fip = id_of(
        &api.create("floatingips", "floatingip", json!({"floating_network_id": ext_id}))
            .await,
    );
    // QoS policies are made by admins, for a project that then owns them.
    let qos = id_of(
        &admin
            .create("qos/policies", "policy", json!({"name": "gold", "project_id": project}))
            .await,
    );
    let trunk = id_of(&api.create("trunks", "trunk", json!({"port_id": port})).await);
    vec![
        ("qos/policies", "policies", qos),
        ("trunks", "trunks", trunk),
        ("networks", "networks", net),
        ("subnets", "subnets", subnet),
        ("ports", "ports", port),
        ("security-groups", "security_groups", sg),
        ("routers", "routers", router),
        ("floatingips", "floatingips", fip),
    ]
}

fn tags_of(body: &Value) -> Vec<String> {
    let mut t: Vec<String> = serde_json::from_value(body["tags"].clone()).unwrap_or_default();
    t.sort();
    t
}

async fn every_resource(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (_, exts) = s.admin.get("/v2.0/extensions").await;
    for alias in [
        "tag",
        "standard-attr-tag",
        "tag-ext",
        "tag-creation",
        "tag-ports-during-bulk-creation",
    ] {
        assert!(
            exts["extensions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["alias"] == alias),
            "{alias} advertised: {exts}"
        );
    }
    let m = s.member("tagger").await;
    for (coll, plural, id) in one_of_each(&s, &m.api, &m.project_id).await {
        let base = format!("/v2.0/{coll}/{id}/tags");
        let what = format!("{coll} {id}");

        // One tag: PUT is 201 without a body, GET on it 204, and it shows on the resource.
        let (st, b) = m.api.put_empty(&format!("{base}/red")).await;
        assert_eq!(st, StatusCode::CREATED, "{what}: {b}");
        let (st, _) = m.api.get(&format!("{base}/red")).await;
        assert_eq!(st, StatusCode::NO_CONTENT, "{what}");
        let (st, b) = m.api.get(&format!("/v2.0/{coll}/{id}")).await;
        assert_eq!(st, StatusCode::OK, "{what}: {b}");
        let singular = b.as_object().unwrap().keys().next().unwrap().clone();
        assert_eq!(b[&singular]["tags"], json!(["red"]), "{what}: {b}");
        // Adding it again changes nothing.
        let (st, _) = m.api.put_empty(&format!("{base}/red")).await;
        assert_eq!(st, StatusCode::CREATED, "{what}");

        // POST adds (tag-creation), PUT replaces.
        let (st, b) = m.api.post(&base, json!({"tags": ["green", "blue"]})).await;
        assert_eq!(st, StatusCode::CREATED, "{what}: {b}");
        let (_, b) = m.api.get(&base).await;
        assert_eq!(tags_of(&b), ["blue", "green", "red"], "{what}");
        let (st, b) = m.api.put(&base, json!({"tags": ["a", "b", "c"]})).await;
        assert_eq!(
            (st, tags_of(&b)),
            (StatusCode::OK, vec!["a".into(), "b".into(), "c".into()])
        );
        let (st, _) = m.api.get(&format!("{base}/red")).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{what}: red was replaced");

        // The four filters, comma-separated, on this collection.
        let listed = |q: &str| {
            let api = &m.api;
            let path = format!("/v2.0/{coll}?{q}");
            async move { api.ids(&path, plural).await }
        };
        assert!(listed("tags=a,b").await.contains(&id), "{what}");
        assert!(!listed("tags=a,z").await.contains(&id), "{what}");
        assert!(listed("tags-any=z,c").await.contains(&id), "{what}");
        assert!(!listed("tags-any=y,z").await.contains(&id), "{what}");
        assert!(!listed("not-tags=a,b").await.contains(&id), "{what}");
        assert!(listed("not-tags=a,z").await.contains(&id), "{what}");
        assert!(!listed("not-tags-any=z,c").await.contains(&id), "{what}");
        assert!(listed("not-tags-any=y,z").await.contains(&id), "{what}");

        // Removing one, then a missing one, then all.
        let (st, _) = m.api.delete(&format!("{base}/a")).await;
        assert_eq!(st, StatusCode::NO_CONTENT, "{what}");
        let (st, b) = m.api.delete(&format!("{base}/a")).await;
        assert_neutron_error(st, &b, StatusCode::NOT_FOUND, Some("TagNotFound"));
        assert_eq!(error_message(&b), "Tag a could not be found.");
        let (st, b) = m.api.get(&format!("{base}/a")).await;
        assert_neutron_error(st, &b, StatusCode::NOT_FOUND, Some("TagNotFound"));
        let (st, _) = m.api.delete(&base).await;
        assert_eq!(st, StatusCode::NO_CONTENT, "{what}");
        let (_, b) = m.api.get(&base).await;
        assert_eq!(b, json!({"tags": []}), "{what}");
    }
}

#[tokio::test]
async fn every_resource_on_the_embedded_store() {
    every_resource(Backend::Embedded).await;
}

#[tokio::test]
async fn every_resource_on_etcd() {
    every_resource(Backend::Etcd).await;
}

async fn bad_input_and_policy(backend: Backend) {
    let s = TestServer::start(backend).await;
    let m = s.member("owner").await;
    let net = id_of(&m.api.network("n").await);
    let base = format!("/v2.0/networks/{net}/tags");

    // Bad tags and bodies: Neutron's InvalidInput (400).
    let long = "x".repeat(256);
    for path in [format!("{base}/{long}"), format!("{base}/a,b"), format!("{base}/%20")] {
        let (st, b) = m.api.put_empty(&path).await;
        if path.ends_with("%20") {
            // A space is a valid tag.
            assert_eq!(st, StatusCode::CREATED, "{path}: {b}");
            continue;
        }
        assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    }
    let (st, _) = m.api.put_empty(&format!("{base}/{}", "y".repeat(255))).await;
    assert_eq!(st, StatusCode::CREATED, "255 characters is the limit");
    for body in [
        json!({"tags": [long.clone()]}),
        json!({"tags": ["ok", "not,ok"]}),
        json!({"tags": ["dup", "dup"]}),
        json!({"tags": [1]}),
        json!({"tags": "nope"}),
        json!({"labels": ["a"]}),
    ] {
        for method in [Method::PUT, Method::POST] {
            let (st, b) = m.api.call(method.clone(), &base, Some(body.clone())).await;
            assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, None);
            if body["tags"] == json!(["dup", "dup"]) {
                assert!(error_message(&b).contains("Duplicate items in the list: 'dup'"), "{b}");
            }
        }
    }
    let fifty_one: Vec<String> = (0..51).map(|i| format!("t{i}")).collect();
    let (st, b) = m.api.put(&base, json!({ "tags": fifty_one })).await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, None);
    let fifty: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
    let (st, b) = m.api.put(&base, json!({ "tags": fifty })).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let (st, b) = m.api.put_empty(&format!("{base}/one-more")).await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, None);

    // Wrong methods, untaggable collections, unknown resources.
    let (st, b) = m.api.call(Method::PATCH, &base, Some(json!({"tags": []}))).await;
    assert_neutron_error(st, &b, StatusCode::METHOD_NOT_ALLOWED, None);
    let (st, b) = m.api.call(Method::POST, &format!("{base}/t1"), None).await;
    assert_neutron_error(st, &b, StatusCode::METHOD_NOT_ALLOWED, None);
    let rules = m.api.list("/v2.0/security-group-rules", "security_group_rules").await;
    let rule = id_of(&rules[0]);
    let (st, b) = m
        .api
        .put_empty(&format!("/v2.0/security-group-rules/{rule}/tags/x"))
        .await;
    assert_neutron_error(st, &b, StatusCode::NOT_FOUND, None);
    let (st, b) = m
        .api
        .get("/v2.0/networks/00000000-0000-4000-8000-000000000000/tags")
        .await;
    assert_neutron_error(st, &b, StatusCode::NOT_FOUND, Some("NetworkNotFound"));

    // Another project's resource does not exist for the caller.
    let other = s.member("other").await;
    for (method, path) in [
        (Method::GET, base.clone()),
        (Method::PUT, format!("{base}/x")),
        (Method::DELETE, base.clone()),
        (Method::GET, format!("{base}/t1")),
    ] {
        let (st, b) = other.api.call(method.clone(), &path, None).await;
        assert_neutron_error(st, &b, StatusCode::NOT_FOUND, Some("NetworkNotFound"));
    }
    // A reader of the project reads tags and may not change them.
    let user = s.create_user("auditor", MEMBER_PASSWORD).await;
    s.grant(&m.project_id, &user, "reader").await;
    let reader = s.api(&s.token("auditor", MEMBER_PASSWORD, &m.project).await);
    let (st, b) = reader.get(&base).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let (st, b) = reader.put_empty(&format!("{base}/x")).await;
    assert_neutron_error(st, &b, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    assert_eq!(error_message(&b), "rule:update_network:tags is disallowed by policy");
    let (st, b) = reader.delete(&base).await;
    assert_neutron_error(st, &b, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    assert_eq!(error_message(&b), "rule:delete_network:tags is disallowed by policy");
    let (st, b) = reader.post(&base, json!({"tags": ["x"]})).await;
    assert_eq!(error_message(&b), "rule:create_network:tags is disallowed by policy");
    assert_eq!(st, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn bad_input_and_policy_on_the_embedded_store() {
    bad_input_and_policy(Backend::Embedded).await;
}

#[tokio::test]
async fn bad_input_and_policy_on_etcd() {
    bad_input_and_policy(Backend::Etcd).await;
}

#[tokio::test]
async fn ports_take_tags_when_created_alone_and_in_bulk() {
    let s = TestServer::start(Backend::Embedded).await;
    let m = s.member("bulk").await;
    let net = id_of(&m.api.network("n").await);
    m.api.subnet(&net, "10.21.0.0/24").await;
    let (st, b) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net, "tags": ["solo", "web"]}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    assert_eq!(tags_of(&b["port"]), ["solo", "web"]);
    let (st, b) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"ports": [
                {"network_id": net, "tags": ["bulk", "a"]},
                {"network_id": net, "tags": ["bulk", "b"]},
                {"network_id": net},
            ]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let ports = b["ports"].as_array().unwrap();
    assert_eq!(tags_of(&ports[0]), ["a", "bulk"]);
    assert_eq!(tags_of(&ports[1]), ["b", "bulk"]);
    assert_eq!(ports[2]["tags"], json!([]));
    assert_eq!(m.api.ids("/v2.0/ports?tags=bulk", "ports").await.len(), 2);
    assert_eq!(m.api.ids("/v2.0/ports?tags-any=a,solo", "ports").await.len(), 2);
    // A bad tag in one item fails the whole bulk request; nothing is left behind.
    let before = m.api.ids("/v2.0/ports", "ports").await.len();
    let (st, b) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"ports": [{"network_id": net, "tags": ["fine"]}, {"network_id": net, "tags": ["a,b"]}]}),
        )
        .await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, None);
    assert_eq!(m.api.ids("/v2.0/ports", "ports").await.len(), before);
}
