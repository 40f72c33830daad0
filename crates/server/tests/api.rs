//! The Neutron v2.0 API end to end, against both store backends: every test here runs once on
//! the embedded store (`<test>::embedded`) and once on a real etcd (`<test>::etcd`).
//!
//! Error tests also check that the server keeps serving after the bad request.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::HashSet;
use support::{assert_neutron_error, error_message, id_of, read, send, Api, Backend, TestServer};

support::on_both_backends!(
    malformed_json_is_400,
    wrong_types_are_400,
    unknown_attribute_is_400,
    invalid_cidr_is_400,
    invalid_ip_is_400,
    invalid_mac_is_400,
    overlapping_allocation_pools_are_409,
    gateway_outside_cidr_is_400,
    fixed_ip_outside_subnet_is_400,
    exhausted_subnet_is_409,
    oversized_body_is_413,
    bad_or_missing_token_is_401,
    expired_token_is_401,
    other_projects_resources_are_invisible,
    network_lifecycle,
    subnet_defaults,
    ipv6_subnets,
    port_with_explicit_ip_and_mac,
    duplicate_fixed_ip_is_409,
    duplicate_mac_is_409,
    network_delete_refused_while_ports_exist,
    subnet_delete_refused_while_ports_exist,
    list_filters,
    fields_selection,
    pagination,
    sorting,
    tags_sub_api,
    if_match_revision,
    default_security_group,
    duplicate_security_group_rule_is_409,
    bulk_port_create,
    binding_host_id_is_admin_only,
    segmentation_id_is_admin_only_and_unique,
);

/// After a refused request the server must still answer normally.
async fn assert_serving(api: &Api) {
    let (s, b) = api.get("/v2.0/networks").await;
    assert_eq!(s, StatusCode::OK, "server no longer serving after a bad request: {b}");
    assert!(b["networks"].is_array(), "{b}");
}

/// POST with a raw body.
async fn post_raw(api: &Api, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
    let resp = api
        .request(Method::POST, path)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request sent");
    read(resp).await
}

fn ips_of(port: &Value) -> Vec<String> {
    port["fixed_ips"]
        .as_array()
        .unwrap_or_else(|| panic!("no fixed_ips in {port}"))
        .iter()
        .map(|f| f["ip_address"].as_str().expect("ip_address").to_string())
        .collect()
}

fn names(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["name"].as_str().expect("name").to_string())
        .collect()
}

/// A member's network with a 10.0.0.0/24 subnet: (network id, subnet id).
async fn net_with_subnet(api: &Api, name: &str) -> (String, String) {
    let net = api.network(name).await;
    let sub = api.subnet(&id_of(&net), "10.0.0.0/24").await;
    (id_of(&net), id_of(&sub))
}

// ---------------------------------------------------------------------------------------------
// Bad requests
// ---------------------------------------------------------------------------------------------

async fn malformed_json_is_400(b: Backend) {
    let s = TestServer::start(b).await;
    for raw in [
        "{\"network\": {\"name\": ",
        "{network: {}}",
        "not json at all",
        "[1, 2]",
        "{\"network\": [1]}",
        "",
    ] {
        let (st, body) = post_raw(&s.admin, "/v2.0/networks", raw).await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
        assert_serving(&s.admin).await;
    }
    assert!(s.admin.list("/v2.0/networks", "networks").await.is_empty());
}

async fn wrong_types_are_400(b: Backend) {
    let s = TestServer::start(b).await;
    for (attrs, attr) in [
        (json!({"name": 5}), "name"),
        (json!({"admin_state_up": "maybe"}), "admin_state_up"),
        (json!({"shared": [true]}), "shared"),
        (json!({"mtu": "big"}), "mtu"),
        (json!({"tags": "red"}), "tags"),
    ] {
        let (st, body) = s.admin.post("/v2.0/networks", json!({ "network": attrs })).await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
        assert!(
            error_message(&body).contains(attr),
            "message should name {attr}: {body}"
        );
        assert_serving(&s.admin).await;
    }
    assert!(
        s.admin.list("/v2.0/networks", "networks").await.is_empty(),
        "a refused create must not create anything"
    );
    // Same on a port and a subnet.
    let net = id_of(&s.admin.network("n").await);
    let (st, body) = s
        .admin
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": net, "cidr": "10.0.0.0/24", "ip_version": "four"}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    let (st, body) = s
        .admin
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net, "fixed_ips": "10.0.0.5"}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    let (st, body) = s.admin.post("/v2.0/ports", json!({"port": {"network_id": 42}})).await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert_serving(&s.admin).await;
}

async fn unknown_attribute_is_400(b: Backend) {
    let s = TestServer::start(b).await;
    let (st, body) = s
        .admin
        .post("/v2.0/networks", json!({"network": {"name": "a", "bogus": 1}}))
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    let msg = error_message(&body);
    assert!(msg.contains("Unrecognized attribute(s)"), "{body}");
    assert!(msg.contains("bogus"), "{body}");
    assert_serving(&s.admin).await;
    assert!(s.admin.list("/v2.0/networks", "networks").await.is_empty());

    // On update too, and the resource is left alone.
    let net = s.admin.network("kept").await;
    let (st, body) = s
        .admin
        .put(
            &format!("/v2.0/networks/{}", id_of(&net)),
            json!({"network": {"name": "changed", "flavour": "x"}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert!(error_message(&body).contains("Unrecognized attribute(s)"), "{body}");
    let (st, got) = s.admin.get(&format!("/v2.0/networks/{}", id_of(&net))).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(got["network"]["name"], "kept");
}

async fn invalid_cidr_is_400(b: Backend) {
    let s = TestServer::start(b).await;
    let net = id_of(&s.admin.network("n").await);
    for (cidr, version) in [
        ("10.0.0.0/33", 4),
        ("banana", 4),
        ("300.1.2.0/24", 4),
        ("10.0.0.1/24", 4),
        ("10.0.0.0/24", 6),
        ("2001:db8::/129", 6),
    ] {
        let (st, body) = s
            .admin
            .post(
                "/v2.0/subnets",
                json!({"subnet": {"network_id": net, "cidr": cidr, "ip_version": version}}),
            )
            .await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
        assert_serving(&s.admin).await;
    }
    assert!(s.admin.list("/v2.0/subnets", "subnets").await.is_empty());
}

async fn invalid_ip_is_400(b: Backend) {
    let s = TestServer::start(b).await;
    let net = id_of(&s.admin.network("n").await);
    let (st, body) = s
        .admin
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": net, "cidr": "10.0.0.0/24", "ip_version": 4, "gateway_ip": "not-an-ip"}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert!(error_message(&body).contains("not-an-ip"), "{body}");
    assert_serving(&s.admin).await;
    let (st, body) = s
        .admin
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": net, "cidr": "10.0.0.0/24", "ip_version": 4, "dns_nameservers": ["8.8.8"]}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert!(s.admin.list("/v2.0/subnets", "subnets").await.is_empty());

    let sub = s.admin.subnet(&net, "10.0.0.0/24").await;
    let (st, body) = s
        .admin
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net, "fixed_ips": [{"subnet_id": id_of(&sub), "ip_address": "10.0.0.300"}]}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert_serving(&s.admin).await;
    assert!(s.admin.list("/v2.0/ports", "ports").await.is_empty());
}

async fn invalid_mac_is_400(b: Backend) {
    let s = TestServer::start(b).await;
    let net = id_of(&s.admin.network("n").await);
    for mac in [
        "not-a-mac",
        "00:11:22:33:44",
        "00:11:22:33:44:gg",
        "00:11:22:33:44:55:66",
    ] {
        let (st, body) = s
            .admin
            .post("/v2.0/ports", json!({"port": {"network_id": net, "mac_address": mac}}))
            .await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
        assert!(error_message(&body).contains("mac_address"), "{body}");
        assert_serving(&s.admin).await;
    }
    assert!(s.admin.list("/v2.0/ports", "ports").await.is_empty());
}

async fn overlapping_allocation_pools_are_409(b: Backend) {
    let s = TestServer::start(b).await;
    let net = id_of(&s.admin.network("n").await);
    let (st, body) = s
        .admin
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": net, "cidr": "10.0.0.0/24", "ip_version": 4, "allocation_pools": [
                {"start": "10.0.0.10", "end": "10.0.0.20"},
                {"start": "10.0.0.15", "end": "10.0.0.30"}]}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("OverlappingAllocationPools"));
    assert_serving(&s.admin).await;
    assert!(s.admin.list("/v2.0/subnets", "subnets").await.is_empty());
    // Adjacent, non-overlapping pools are fine.
    let (st, body) = s
        .admin
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": net, "cidr": "10.0.0.0/24", "ip_version": 4, "allocation_pools": [
                {"start": "10.0.0.10", "end": "10.0.0.20"},
                {"start": "10.0.0.21", "end": "10.0.0.30"}]}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
}

async fn gateway_outside_cidr_is_400(b: Backend) {
    let s = TestServer::start(b).await;
    let net = id_of(&s.admin.network("n").await);
    for gw in ["10.0.1.1", "10.0.0.255", "10.0.0.0"] {
        let (st, body) = s
            .admin
            .post(
                "/v2.0/subnets",
                json!({"subnet": {"network_id": net, "cidr": "10.0.0.0/24", "ip_version": 4, "gateway_ip": gw}}),
            )
            .await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
        assert_serving(&s.admin).await;
    }
    assert!(s.admin.list("/v2.0/subnets", "subnets").await.is_empty());
    // A gateway inside the CIDR but not .1 is fine, and the default pool avoids it.
    let sub = s
        .admin
        .create(
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": "10.0.0.0/24", "ip_version": 4, "gateway_ip": "10.0.0.254"}),
        )
        .await;
    assert_eq!(sub["gateway_ip"], "10.0.0.254");
    assert_eq!(
        sub["allocation_pools"],
        json!([{"start": "10.0.0.1", "end": "10.0.0.253"}])
    );
}

async fn fixed_ip_outside_subnet_is_400(b: Backend) {
    let s = TestServer::start(b).await;
    let (net, sub) = net_with_subnet(&s.admin, "n").await;
    for ip in ["10.0.1.5", "192.168.0.1", "10.0.0.0", "10.0.0.255"] {
        let (st, body) = s
            .admin
            .post(
                "/v2.0/ports",
                json!({"port": {"network_id": net, "fixed_ips": [{"subnet_id": sub, "ip_address": ip}]}}),
            )
            .await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, Some("InvalidIpForSubnet"));
        assert_serving(&s.admin).await;
    }
    assert!(s.admin.list("/v2.0/ports", "ports").await.is_empty());
}

async fn exhausted_subnet_is_409(b: Backend) {
    let s = TestServer::start(b).await;
    let net = id_of(&s.admin.network("small").await);
    let sub = s
        .admin
        .create(
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": "10.9.0.0/29", "ip_version": 4,
                   "allocation_pools": [{"start": "10.9.0.2", "end": "10.9.0.4"}]}),
        )
        .await;
    assert_eq!(sub["gateway_ip"], "10.9.0.1");
    let mut got = vec![];
    let mut ports = vec![];
    for _ in 0..3 {
        let p = s.admin.port(&net).await;
        got.extend(ips_of(&p));
        ports.push(id_of(&p));
    }
    got.sort();
    assert_eq!(got, ["10.9.0.2", "10.9.0.3", "10.9.0.4"], "the whole pool, once each");
    for _ in 0..2 {
        let (st, body) = s.admin.post("/v2.0/ports", json!({"port": {"network_id": net}})).await;
        assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("IpAddressGenerationFailure"));
        assert_serving(&s.admin).await;
    }
    assert_eq!(s.admin.list("/v2.0/ports", "ports").await.len(), 3);
    // Freeing an address makes it available again.
    let (st, _) = s.admin.delete(&format!("/v2.0/ports/{}", ports[1])).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let p = s.admin.port(&net).await;
    assert_eq!(ips_of(&p).len(), 1);
    assert!(
        ["10.9.0.2", "10.9.0.3", "10.9.0.4"].contains(&ips_of(&p)[0].as_str()),
        "{p}"
    );
}

async fn oversized_body_is_413(b: Backend) {
    let s = TestServer::start(b).await;
    // A well-formed request, ~2 MiB (the default limit is 1 MiB).
    let big = "x".repeat(2 * 1024 * 1024);
    let body = serde_json::to_vec(&json!({"network": {"name": "big", "description": big}})).expect("json");
    let (st, resp) = post_raw(&s.admin, "/v2.0/networks", body).await;
    assert_neutron_error(st, &resp, StatusCode::PAYLOAD_TOO_LARGE, None);
    assert_serving(&s.admin).await;
    // Also on PUT.
    let net = s.admin.network("small").await;
    let body = serde_json::to_vec(&json!({"network": {"name": "x".repeat(2 * 1024 * 1024)}})).expect("json");
    let resp = s
        .admin
        .request(Method::PUT, &format!("/v2.0/networks/{}", id_of(&net)))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent");
    let (st, resp) = read(resp).await;
    assert_neutron_error(st, &resp, StatusCode::PAYLOAD_TOO_LARGE, None);
    assert_serving(&s.admin).await;
    assert_eq!(names(&s.admin.list("/v2.0/networks", "networks").await), ["small"]);
}

async fn bad_or_missing_token_is_401(b: Backend) {
    let s = TestServer::start(b).await;
    let url = s.admin.url("/v2.0/networks");
    let (st, body) = send(&s.http, Method::GET, &url, None, None).await;
    assert_neutron_error(st, &body, StatusCode::UNAUTHORIZED, None);
    let (st, body) = send(
        &s.http,
        Method::POST,
        &url,
        None,
        Some(json!({"network": {"name": "x"}})),
    )
    .await;
    assert_neutron_error(st, &body, StatusCode::UNAUTHORIZED, None);
    // A forged token: the admin's with its signature altered.
    let mut forged = s.admin.token.clone();
    let last = forged.pop().expect("non-empty token");
    forged.push(if last == 'A' { 'B' } else { 'A' });
    for bad in ["garbage", "a.b", "", forged.as_str(), &"A".repeat(5000)] {
        let (st, body) = send(&s.http, Method::GET, &url, Some(bad), None).await;
        assert_neutron_error(st, &body, StatusCode::UNAUTHORIZED, None);
        let (st, body) = send(
            &s.http,
            Method::POST,
            &url,
            Some(bad),
            Some(json!({"network": {"name": "x"}})),
        )
        .await;
        assert_neutron_error(st, &body, StatusCode::UNAUTHORIZED, None);
        assert_serving(&s.admin).await;
    }
    assert!(
        s.admin.list("/v2.0/networks", "networks").await.is_empty(),
        "an unauthenticated create must not create anything"
    );
}

async fn expired_token_is_401(b: Backend) {
    let s = TestServer::start_with(b, |c| c.token_ttl_secs = 1).await;
    let m = s.member("expiry").await;
    let (st, body) = m.api.get("/v2.0/networks").await;
    assert_eq!(st, StatusCode::OK, "a fresh token works: {body}");
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (st, body) = m.api.get("/v2.0/networks").await;
    assert_neutron_error(st, &body, StatusCode::UNAUTHORIZED, None);
    let (st, body) = m.api.post("/v2.0/networks", json!({"network": {"name": "late"}})).await;
    assert_neutron_error(st, &body, StatusCode::UNAUTHORIZED, None);
    // A new token works again.
    let fresh = s.token(&m.user, support::MEMBER_PASSWORD, &m.project).await;
    assert_serving(&s.api(&fresh)).await;
    assert!(s
        .api(&s.admin_token().await)
        .list("/v2.0/networks", "networks")
        .await
        .is_empty());
}

async fn other_projects_resources_are_invisible(b: Backend) {
    let s = TestServer::start(b).await;
    let a = s.member("alice").await;
    let bob = s.member("bob").await;
    let (net, sub) = net_with_subnet(&a.api, "alice-net").await;
    let port = id_of(&a.api.port(&net).await);
    let sg = id_of(
        &a.api
            .create("security-groups", "security_group", json!({"name": "alice-sg"}))
            .await,
    );
    let bob_net = id_of(&bob.api.network("bob-net").await);

    let resources = [
        ("networks", "network", net.clone()),
        ("subnets", "subnet", sub.clone()),
        ("ports", "port", port.clone()),
        ("security-groups", "security_group", sg.clone()),
    ];
    for (coll, singular, id) in &resources {
        let path = format!("/v2.0/{coll}/{id}");
        let (st, body) = bob.api.get(&path).await;
        assert_neutron_error(st, &body, StatusCode::NOT_FOUND, None);
        let (st, body) = bob.api.put(&path, json!({ *singular: {"name": "mine-now"} })).await;
        assert_neutron_error(st, &body, StatusCode::NOT_FOUND, None);
        let (st, body) = bob.api.delete(&path).await;
        assert_neutron_error(st, &body, StatusCode::NOT_FOUND, None);
        assert!(
            !bob.api
                .ids(&format!("/v2.0/{coll}"), &coll.replace('-', "_"))
                .await
                .contains(id),
            "{coll} {id} listed for another project"
        );
        // Filtering by id does not reveal it either.
        assert!(bob
            .api
            .list(&format!("/v2.0/{coll}?id={id}"), &coll.replace('-', "_"))
            .await
            .is_empty());
        // Still there, unchanged, for its owner and the admin.
        for who in [&a.api, &s.admin] {
            let (st, body) = who.get(&path).await;
            assert_eq!(st, StatusCode::OK, "{body}");
            assert_ne!(body[*singular]["name"], "mine-now");
        }
        assert!(s
            .admin
            .ids(&format!("/v2.0/{coll}"), &coll.replace('-', "_"))
            .await
            .contains(id));
    }
    // Alice's rules are not Bob's either.
    let alice_rules = a.api.ids("/v2.0/security-group-rules", "security_group_rules").await;
    let bob_rules = bob.api.ids("/v2.0/security-group-rules", "security_group_rules").await;
    assert!(!alice_rules.is_empty() && !bob_rules.is_empty());
    assert!(alice_rules.iter().all(|r| !bob_rules.contains(r)));
    for r in &alice_rules {
        let (st, body) = bob.api.get(&format!("/v2.0/security-group-rules/{r}")).await;
        assert_neutron_error(st, &body, StatusCode::NOT_FOUND, None);
    }
    // Bob cannot put a port on Alice's network or use her security group.
    let (st, body) = bob.api.post("/v2.0/ports", json!({"port": {"network_id": net}})).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, None);
    let (st, body) = bob
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": bob_net, "security_groups": [sg]}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, None);
    // Alice sees only her own network; the admin sees everyone's.
    assert_eq!(
        a.api.ids("/v2.0/networks", "networks").await,
        std::slice::from_ref(&net)
    );
    let all: HashSet<String> = s.admin.ids("/v2.0/networks", "networks").await.into_iter().collect();
    assert_eq!(all, HashSet::from([net, bob_net]));
    let groups = s.admin.list("/v2.0/security-groups", "security_groups").await;
    let projects: HashSet<&str> = groups.iter().filter_map(|g| g["project_id"].as_str()).collect();
    assert!(
        projects.contains(a.project_id.as_str()) && projects.contains(bob.project_id.as_str()),
        "{groups:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Core behaviour
// ---------------------------------------------------------------------------------------------

async fn network_lifecycle(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("net").await;
    let net = m
        .api
        .create(
            "networks",
            "network",
            json!({"name": "web", "description": "front end"}),
        )
        .await;
    let id = id_of(&net);
    assert_eq!(net["name"], "web");
    assert_eq!(net["description"], "front end");
    assert_eq!(net["admin_state_up"], true);
    assert_eq!(net["status"], "ACTIVE");
    assert_eq!(net["shared"], false);
    assert_eq!(net["mtu"], 1450, "VXLAN overhead off a 1500 underlay");
    assert_eq!(net["project_id"], json!(m.project_id));
    assert_eq!(net["tenant_id"], json!(m.project_id));
    assert_eq!(net["subnets"], json!([]));
    let rev0 = net["revision_number"].as_u64().expect("revision_number");

    let (st, got) = m.api.get(&format!("/v2.0/networks/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(got["network"], net, "show returns what create returned");
    assert_eq!(m.api.ids("/v2.0/networks", "networks").await, std::slice::from_ref(&id));

    let (st, upd) = m
        .api
        .put(
            &format!("/v2.0/networks/{id}"),
            json!({"network": {"name": "web2", "admin_state_up": false}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{upd}");
    assert_eq!(upd["network"]["name"], "web2");
    assert_eq!(upd["network"]["admin_state_up"], false);
    assert!(upd["network"]["revision_number"].as_u64().expect("rev") > rev0);
    let (_, got) = m.api.get(&format!("/v2.0/networks/{id}")).await;
    assert_eq!(got["network"]["name"], "web2");

    // A member may not share a network.
    let (st, body) = m
        .api
        .put(&format!("/v2.0/networks/{id}"), json!({"network": {"shared": true}}))
        .await;
    assert_neutron_error(st, &body, StatusCode::FORBIDDEN, None);

    let (st, body) = m.api.delete(&format!("/v2.0/networks/{id}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (st, body) = m.api.get(&format!("/v2.0/networks/{id}")).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, Some("NetworkNotFound"));
    let (st, body) = m.api.delete(&format!("/v2.0/networks/{id}")).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, None);
    assert!(m.api.list("/v2.0/networks", "networks").await.is_empty());
}

async fn subnet_defaults(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("sub").await;
    let net = id_of(&m.api.network("n").await);
    let sub = m.api.subnet(&net, "10.1.2.0/24").await;
    assert_eq!(sub["cidr"], "10.1.2.0/24");
    assert_eq!(sub["ip_version"], 4);
    assert_eq!(sub["gateway_ip"], "10.1.2.1");
    assert_eq!(
        sub["allocation_pools"],
        json!([{"start": "10.1.2.2", "end": "10.1.2.254"}])
    );
    assert_eq!(sub["enable_dhcp"], true);
    assert_eq!(sub["network_id"], json!(net));
    assert_eq!(sub["project_id"], json!(m.project_id));
    assert_eq!(sub["dns_nameservers"], json!([]));
    assert_eq!(sub["host_routes"], json!([]));
    let (_, got) = m.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(got["network"]["subnets"], json!([id_of(&sub)]));
    let (_, got) = m.api.get(&format!("/v2.0/subnets/{}", id_of(&sub))).await;
    assert_eq!(got["subnet"], sub);
    // No gateway: the pool then starts at .1.
    let net2 = id_of(&m.api.network("n2").await);
    let sub2 = m
        .api
        .create(
            "subnets",
            "subnet",
            json!({"network_id": net2, "cidr": "192.168.7.0/24", "ip_version": 4, "gateway_ip": null}),
        )
        .await;
    assert_eq!(sub2["gateway_ip"], Value::Null);
    assert_eq!(
        sub2["allocation_pools"],
        json!([{"start": "192.168.7.1", "end": "192.168.7.254"}])
    );
    // Overlapping CIDRs on one network are refused.
    let (st, body) = m
        .api
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": net, "cidr": "10.1.2.128/25", "ip_version": 4}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    // A port gets an address from the pool, never the gateway.
    let p = m.api.port(&net).await;
    let ip: std::net::Ipv4Addr = ips_of(&p)[0].parse().expect("ipv4");
    assert!(
        ip.octets()[..3] == [10, 1, 2] && (2..=254).contains(&ip.octets()[3]),
        "{p}"
    );
    assert_eq!(p["fixed_ips"][0]["subnet_id"], json!(id_of(&sub)));
}

async fn ipv6_subnets(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("v6").await;
    let net = id_of(&m.api.network("n").await);
    let sub = m
        .api
        .create(
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": "2001:db8:1::/64", "ip_version": 6}),
        )
        .await;
    assert_eq!(sub["ip_version"], 6);
    assert_eq!(sub["gateway_ip"], "2001:db8:1::1");
    assert_eq!(
        sub["allocation_pools"],
        json!([{"start": "2001:db8:1::2", "end": "2001:db8:1:0:ffff:ffff:ffff:ffff"}])
    );
    let p = m.api.port(&net).await;
    let ips = ips_of(&p);
    assert_eq!(ips.len(), 1, "{p}");
    let ip: std::net::Ipv6Addr = ips[0].parse().expect("an IPv6 address");
    assert_eq!(&ip.segments()[..4], &[0x2001, 0xdb8, 1, 0], "{ip} inside the /64");
    assert_ne!(ips[0], "2001:db8:1::1", "not the gateway");

    // SLAAC: the address is EUI-64 from the MAC.
    let net2 = id_of(&m.api.network("slaac").await);
    m.api
        .create(
            "subnets",
            "subnet",
            json!({"network_id": net2, "cidr": "2001:db8:2::/64", "ip_version": 6,
                   "ipv6_address_mode": "slaac", "ipv6_ra_mode": "slaac"}),
        )
        .await;
    let p = m
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net2, "mac_address": "fa:16:3e:11:22:33"}),
        )
        .await;
    assert_eq!(ips_of(&p), ["2001:db8:2:0:f816:3eff:fe11:2233"], "{p}");
    // Dual stack: one address per family.
    let net3 = id_of(&m.api.network("dual").await);
    m.api.subnet(&net3, "10.3.0.0/24").await;
    m.api
        .create(
            "subnets",
            "subnet",
            json!({"network_id": net3, "cidr": "2001:db8:3::/64", "ip_version": 6}),
        )
        .await;
    let p = m.api.port(&net3).await;
    let ips = ips_of(&p);
    assert_eq!(ips.len(), 2, "{p}");
    assert!(ips.iter().any(|i| i.starts_with("10.3.0.")) && ips.iter().any(|i| i.starts_with("2001:db8:3::")));
}

async fn port_with_explicit_ip_and_mac(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("port").await;
    let (net, sub) = net_with_subnet(&m.api, "n").await;
    let p = m
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net, "name": "vm1", "mac_address": "FA:16:3E:AA:BB:CC",
                   "fixed_ips": [{"subnet_id": sub, "ip_address": "10.0.0.50"}]}),
        )
        .await;
    assert_eq!(p["mac_address"], "fa:16:3e:aa:bb:cc");
    assert_eq!(p["fixed_ips"], json!([{"subnet_id": sub, "ip_address": "10.0.0.50"}]));
    assert_eq!(p["name"], "vm1");
    assert_eq!(p["network_id"], json!(net));
    assert_eq!(p["project_id"], json!(m.project_id));
    assert_eq!(p["admin_state_up"], true);
    assert_eq!(p["status"], "DOWN");
    let (st, got) = m.api.get(&format!("/v2.0/ports/{}", id_of(&p))).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(got["port"], p);
    // By IP alone (the subnet is found from it).
    let q = m
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net, "fixed_ips": [{"ip_address": "10.0.0.51"}]}),
        )
        .await;
    assert_eq!(q["fixed_ips"], json!([{"subnet_id": sub, "ip_address": "10.0.0.51"}]));
    // Moving the port to another address frees the old one.
    let (st, upd) = m
        .api
        .put(
            &format!("/v2.0/ports/{}", id_of(&p)),
            json!({"port": {"fixed_ips": [{"subnet_id": sub, "ip_address": "10.0.0.60"}]}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{upd}");
    assert_eq!(ips_of(&upd["port"]), ["10.0.0.60"]);
    let r = m
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net, "fixed_ips": [{"subnet_id": sub, "ip_address": "10.0.0.50"}]}),
        )
        .await;
    assert_eq!(ips_of(&r), ["10.0.0.50"]);
}

async fn duplicate_fixed_ip_is_409(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("dupip").await;
    let (net, sub) = net_with_subnet(&m.api, "n").await;
    let body = json!({"port": {"network_id": net, "fixed_ips": [{"subnet_id": sub, "ip_address": "10.0.0.77"}]}});
    let (st, first) = m.api.post("/v2.0/ports", body.clone()).await;
    assert_eq!(st, StatusCode::CREATED, "{first}");
    let (st, err) = m.api.post("/v2.0/ports", body).await;
    assert_neutron_error(st, &err, StatusCode::CONFLICT, Some("IpAddressAlreadyAllocated"));
    assert_serving(&m.api).await;
    // Nor may another port be moved onto it.
    let other = id_of(&m.api.port(&net).await);
    let (st, err) = m
        .api
        .put(
            &format!("/v2.0/ports/{other}"),
            json!({"port": {"fixed_ips": [{"subnet_id": sub, "ip_address": "10.0.0.77"}]}}),
        )
        .await;
    assert_neutron_error(st, &err, StatusCode::CONFLICT, Some("IpAddressAlreadyAllocated"));
    let hits = m
        .api
        .list("/v2.0/ports?fixed_ips=ip_address%3D10.0.0.77", "ports")
        .await;
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0]["id"], first["port"]["id"]);
    assert_eq!(m.api.list("/v2.0/ports", "ports").await.len(), 2);
}

async fn duplicate_mac_is_409(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("dupmac").await;
    let (net, _) = net_with_subnet(&m.api, "n").await;
    let body = json!({"port": {"network_id": net, "mac_address": "fa:16:3e:01:02:03"}});
    let (st, first) = m.api.post("/v2.0/ports", body.clone()).await;
    assert_eq!(st, StatusCode::CREATED, "{first}");
    let (st, err) = m.api.post("/v2.0/ports", body).await;
    assert_neutron_error(st, &err, StatusCode::CONFLICT, Some("MacAddressInUse"));
    // Spelled differently, still the same MAC.
    let (st, err) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net, "mac_address": "FA:16:3E:01:02:03"}}),
        )
        .await;
    assert_neutron_error(st, &err, StatusCode::CONFLICT, Some("MacAddressInUse"));
    assert_serving(&m.api).await;
    assert_eq!(m.api.list("/v2.0/ports", "ports").await.len(), 1);
    // The same MAC on another network is fine.
    let (other, _) = net_with_subnet(&m.api, "other").await;
    let (st, body) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": other, "mac_address": "fa:16:3e:01:02:03"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    // Once the first port is gone its MAC is free again.
    let (st, _) = m.api.delete(&format!("/v2.0/ports/{}", id_of(&first["port"]))).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net, "mac_address": "fa:16:3e:01:02:03"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
}

async fn network_delete_refused_while_ports_exist(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("netdel").await;
    let (net, sub) = net_with_subnet(&m.api, "n").await;
    let port = id_of(&m.api.port(&net).await);
    let (st, body) = m.api.delete(&format!("/v2.0/networks/{net}")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("NetworkInUse"));
    assert_serving(&m.api).await;
    // Nothing was removed, and the network is still usable.
    let (st, _) = m.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = m.api.get(&format!("/v2.0/subnets/{sub}")).await;
    assert_eq!(st, StatusCode::OK);
    let second = id_of(&m.api.port(&net).await);
    for p in [port, second] {
        let (st, _) = m.api.delete(&format!("/v2.0/ports/{p}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
    }
    let (st, body) = m.api.delete(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (st, _) = m.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (st, _) = m.api.get(&format!("/v2.0/subnets/{sub}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "the network's subnets go with it");
    assert!(m.api.list("/v2.0/subnets", "subnets").await.is_empty());
}

async fn subnet_delete_refused_while_ports_exist(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("subdel").await;
    let (net, sub) = net_with_subnet(&m.api, "n").await;
    let port = id_of(&m.api.port(&net).await);
    let (st, body) = m.api.delete(&format!("/v2.0/subnets/{sub}")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("SubnetInUse"));
    assert_serving(&m.api).await;
    // The subnet still works after the refused delete.
    let p2 = m.api.port(&net).await;
    assert_eq!(p2["fixed_ips"][0]["subnet_id"], json!(sub));
    for p in [port, id_of(&p2)] {
        let (st, _) = m.api.delete(&format!("/v2.0/ports/{p}")).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
    }
    let (st, body) = m.api.delete(&format!("/v2.0/subnets/{sub}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{body}");
    let (st, _) = m.api.get(&format!("/v2.0/subnets/{sub}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    let (_, got) = m.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(got["network"]["subnets"], json!([]));
}

async fn list_filters(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("filters").await;
    let mut ids = vec![];
    for name in ["alpha", "beta", "gamma"] {
        ids.push(id_of(&m.api.network(name).await));
    }
    let (st, body) = m
        .api
        .put(
            &format!("/v2.0/networks/{}", ids[2]),
            json!({"network": {"admin_state_up": false}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let mut got = names(&m.api.list("/v2.0/networks?name=alpha&name=gamma", "networks").await);
    got.sort();
    assert_eq!(got, ["alpha", "gamma"], "a repeated key is OR");
    assert_eq!(
        names(
            &m.api
                .list("/v2.0/networks?name=alpha&name=gamma&admin_state_up=True", "networks")
                .await
        ),
        ["alpha"],
        "different keys are AND"
    );
    assert_eq!(
        names(&m.api.list("/v2.0/networks?admin_state_up=false", "networks").await),
        ["gamma"]
    );
    assert!(m.api.list("/v2.0/networks?name=delta", "networks").await.is_empty());
    assert_eq!(
        m.api.ids(&format!("/v2.0/networks?id={}", ids[1]), "networks").await,
        std::slice::from_ref(&ids[1])
    );

    // Ports by network and by fixed IP.
    let sub = id_of(&m.api.subnet(&ids[0], "10.0.0.0/24").await);
    m.api.subnet(&ids[1], "10.0.1.0/24").await;
    let mut on_alpha = vec![];
    for ip in ["10.0.0.10", "10.0.0.11", "10.0.0.12"] {
        let p = m
            .api
            .create(
                "ports",
                "port",
                json!({"network_id": ids[0], "fixed_ips": [{"subnet_id": sub, "ip_address": ip}]}),
            )
            .await;
        on_alpha.push(id_of(&p));
    }
    let on_beta = id_of(&m.api.port(&ids[1]).await);
    let mut got = m.api.ids(&format!("/v2.0/ports?network_id={}", ids[0]), "ports").await;
    got.sort();
    on_alpha.sort();
    assert_eq!(got, on_alpha);
    assert_eq!(
        m.api.ids(&format!("/v2.0/ports?network_id={}", ids[1]), "ports").await,
        [on_beta]
    );
    for path in [
        "/v2.0/ports?fixed_ips=ip_address=10.0.0.11",
        "/v2.0/ports?fixed_ips=ip_address%3D10.0.0.11",
    ] {
        let hits = m.api.list(path, "ports").await;
        assert_eq!(hits.len(), 1, "{path}");
        assert_eq!(ips_of(&hits[0]), ["10.0.0.11"]);
    }
    assert!(m
        .api
        .list("/v2.0/ports?fixed_ips=ip_address%3D10.0.0.99", "ports")
        .await
        .is_empty());
    let mut got = m
        .api
        .ids(
            "/v2.0/ports?fixed_ips=ip_address%3D10.0.0.10&fixed_ips=ip_address%3D10.0.0.10",
            "ports",
        )
        .await;
    got.dedup();
    assert_eq!(got.len(), 1);
    assert_eq!(
        m.api
            .list(&format!("/v2.0/ports?fixed_ips=subnet_id%3D{sub}"), "ports")
            .await
            .len(),
        3
    );
}

async fn fields_selection(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("fields").await;
    for name in ["a", "b"] {
        m.api.network(name).await;
    }
    let items = m.api.list("/v2.0/networks?fields=id&fields=name", "networks").await;
    assert_eq!(items.len(), 2);
    for i in &items {
        let mut keys: Vec<&String> = i.as_object().expect("object").keys().collect();
        keys.sort();
        assert_eq!(keys, ["id", "name"], "{i}");
    }
    let items = m.api.list("/v2.0/networks?fields=id,status", "networks").await;
    for i in &items {
        let mut keys: Vec<&String> = i.as_object().expect("object").keys().collect();
        keys.sort();
        assert_eq!(keys, ["id", "status"], "{i}");
    }
    let id = id_of(&items[0]);
    let (st, got) = m.api.get(&format!("/v2.0/networks/{id}?fields=name")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(got["network"].as_object().expect("object").len(), 1, "{got}");
    assert!(got["network"]["name"].is_string());
}

async fn pagination(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("pages").await;
    let (net, _) = net_with_subnet(&m.api, "n").await;
    let (other, _) = net_with_subnet(&m.api, "other").await;
    let mut all = vec![];
    for _ in 0..5 {
        all.push(id_of(&m.api.port(&net).await));
    }
    m.api.port(&other).await;
    all.sort();

    let (st, first) = m.api.get(&format!("/v2.0/ports?network_id={net}&limit=2")).await;
    assert_eq!(st, StatusCode::OK, "{first}");
    assert_eq!(first["ports"].as_array().expect("ports").len(), 2);
    let mut seen: Vec<String> = first["ports"].as_array().expect("ports").iter().map(id_of).collect();
    let mut page = first;
    let mut pages = 1;
    loop {
        let links = page["ports_links"].as_array().cloned().unwrap_or_default();
        let Some(next) = links.iter().find(|l| l["rel"] == "next") else {
            break;
        };
        let href = next["href"].as_str().expect("href");
        assert!(href.contains("limit=2") && href.contains("marker="), "{href}");
        let (st, body) = send(&s.http, Method::GET, href, Some(&m.token), None).await;
        assert_eq!(st, StatusCode::OK, "{href}: {body}");
        let items = body["ports"].as_array().expect("ports");
        assert!(items.len() <= 2);
        assert!(
            body["ports_links"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l["rel"] == "previous")),
            "a later page links back: {body}"
        );
        seen.extend(items.iter().map(id_of));
        page = body;
        pages += 1;
        assert!(pages <= 5, "pagination does not end");
    }
    assert_eq!(pages, 3, "5 ports by 2");
    assert_eq!(
        seen, all,
        "every port once, in id order, only from the filtered network"
    );

    // limit + marker by hand.
    let (_, body) = m
        .api
        .get(&format!("/v2.0/ports?network_id={net}&limit=3&marker={}", all[1]))
        .await;
    let ids: Vec<String> = body["ports"].as_array().expect("ports").iter().map(id_of).collect();
    assert_eq!(ids, all[2..5]);
    // A full page links on, as Neutron's do, even when nothing follows: to an empty page.
    let next = body["ports_links"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["rel"] == "next"))
        .and_then(|l| l["href"].as_str())
        .unwrap_or_else(|| panic!("no next link on a full page: {body}"))
        .to_string();
    let (_, body) = send(&s.http, Method::GET, &next, Some(&m.token), None).await;
    assert_eq!(body["ports"].as_array().map(Vec::len), Some(0), "{body}");
    assert!(
        body["ports_links"]
            .as_array()
            .is_none_or(|l| l.iter().all(|l| l["rel"] != "next")),
        "no next link after the last page: {body}"
    );
    let (st, body) = m.api.get("/v2.0/ports?limit=-1").await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    let (st, body) = m.api.get("/v2.0/ports?limit=lots").await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert_serving(&m.api).await;
}

async fn sorting(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("sort").await;
    for name in ["bravo", "alpha", "delta", "charlie"] {
        m.api.network(name).await;
    }
    assert_eq!(
        names(
            &m.api
                .list("/v2.0/networks?sort_key=name&sort_dir=asc", "networks")
                .await
        ),
        ["alpha", "bravo", "charlie", "delta"]
    );
    assert_eq!(
        names(
            &m.api
                .list("/v2.0/networks?sort_key=name&sort_dir=desc", "networks")
                .await
        ),
        ["delta", "charlie", "bravo", "alpha"]
    );
    // Sorting and paging together.
    assert_eq!(
        names(
            &m.api
                .list("/v2.0/networks?sort_key=name&sort_dir=desc&limit=2", "networks")
                .await
        ),
        ["delta", "charlie"]
    );
    let (st, body) = m.api.get("/v2.0/networks?sort_key=name&sort_dir=sideways").await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert_serving(&m.api).await;
}

async fn tags_sub_api(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("tags").await;
    let net = id_of(&m.api.network("tagged").await);
    let untagged = id_of(&m.api.network("plain").await);
    let base = format!("/v2.0/networks/{net}/tags");

    let (st, body) = m.api.put_empty(&format!("{base}/red")).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let (st, _) = m.api.get(&format!("{base}/red")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "the tag exists");
    let (st, body) = m.api.get(&format!("{base}/blue")).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, None);
    let (st, body) = m.api.get(&base).await;
    assert_eq!((st, &body), (StatusCode::OK, &json!({"tags": ["red"]})));
    let (_, got) = m.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(got["network"]["tags"], json!(["red"]));

    // Replace all.
    let (st, body) = m.api.put(&base, json!({"tags": ["a", "b"]})).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (_, body) = m.api.get(&base).await;
    let mut tags: Vec<String> = serde_json::from_value(body["tags"].clone()).expect("tags");
    tags.sort();
    assert_eq!(tags, ["a", "b"], "red was replaced");
    assert_eq!(
        m.api.ids("/v2.0/networks?tags=a", "networks").await,
        std::slice::from_ref(&net),
        "filter by tag"
    );
    assert_eq!(
        m.api.ids("/v2.0/networks?not-tags=a", "networks").await,
        std::slice::from_ref(&untagged)
    );
    assert!(m.api.list("/v2.0/networks?tags=red", "networks").await.is_empty());

    // Delete one, then all.
    let (st, _) = m.api.delete(&format!("{base}/a")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = m.api.delete(&format!("{base}/a")).await;
    assert_neutron_error(st, &body, StatusCode::NOT_FOUND, None);
    let (_, body) = m.api.get(&base).await;
    assert_eq!(body, json!({"tags": ["b"]}));
    let (st, _) = m.api.delete(&base).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (_, body) = m.api.get(&base).await;
    assert_eq!(body, json!({"tags": []}));

    // Tags on ports too; bad tags are refused.
    let (pnet, _) = net_with_subnet(&m.api, "pn").await;
    let port = id_of(&m.api.port(&pnet).await);
    let (st, body) = m.api.put_empty(&format!("/v2.0/ports/{port}/tags/web")).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(m.api.ids("/v2.0/ports?tags=web", "ports").await, [port]);
    let (st, body) = m.api.put(&base, json!({"tags": ["ok", "not,ok"]})).await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    let (st, body) = m.api.put(&base, json!({"tags": "nope"})).await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert_serving(&m.api).await;
}

async fn if_match_revision(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("ifmatch").await;
    let net = m.api.network("n").await;
    let id = id_of(&net);
    let path = format!("/v2.0/networks/{id}");
    let rev = net["revision_number"].as_u64().expect("revision_number");

    let put = |if_match: String, name: &'static str| {
        m.api
            .request(Method::PUT, &path)
            .header("If-Match", if_match)
            .json(&json!({"network": {"name": name}}))
            .send()
    };
    let (st, body) = read(
        put(format!("revision_number={}", rev + 7), "stale")
            .await
            .expect("sent"),
    )
    .await;
    assert_neutron_error(st, &body, StatusCode::PRECONDITION_FAILED, None);
    let (_, got) = m.api.get(&path).await;
    assert_eq!(got["network"]["name"], "n", "a failed precondition changes nothing");
    assert_eq!(got["network"]["revision_number"], json!(rev));

    let (st, body) = read(put(format!("revision_number={rev}"), "fresh").await.expect("sent")).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["network"]["name"], "fresh");
    let new_rev = body["network"]["revision_number"].as_u64().expect("rev");
    assert!(new_rev > rev);
    // The old revision is stale now.
    let (st, body) = read(put(format!("revision_number={rev}"), "again").await.expect("sent")).await;
    assert_neutron_error(st, &body, StatusCode::PRECONDITION_FAILED, None);

    // DELETE honours it too.
    let resp = m
        .api
        .request(Method::DELETE, &path)
        .header("If-Match", format!("revision_number={rev}"))
        .send()
        .await
        .expect("sent");
    let (st, body) = read(resp).await;
    assert_neutron_error(st, &body, StatusCode::PRECONDITION_FAILED, None);
    let (st, _) = m.api.get(&path).await;
    assert_eq!(st, StatusCode::OK, "still there");
    let resp = m
        .api
        .request(Method::DELETE, &path)
        .header("If-Match", format!("revision_number={new_rev}"))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
}

async fn default_security_group(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("sg").await;
    let groups = m.api.list("/v2.0/security-groups", "security_groups").await;
    assert_eq!(groups.len(), 1, "exactly one group, the default: {groups:?}");
    let g = &groups[0];
    let gid = id_of(g);
    assert_eq!(g["name"], "default");
    assert_eq!(g["project_id"], json!(m.project_id));
    let rules = g["security_group_rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 4, "{g}");
    let mut shapes: Vec<(String, String, Value)> = rules
        .iter()
        .map(|r| {
            assert_eq!(r["protocol"], Value::Null, "{r}");
            assert_eq!(r["remote_ip_prefix"], Value::Null, "{r}");
            assert_eq!(r["port_range_min"], Value::Null, "{r}");
            assert_eq!(r["security_group_id"], json!(gid), "{r}");
            (
                r["direction"].as_str().expect("direction").to_string(),
                r["ethertype"].as_str().expect("ethertype").to_string(),
                r["remote_group_id"].clone(),
            )
        })
        .collect();
    shapes.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    assert_eq!(
        shapes,
        [
            ("egress".into(), "IPv4".into(), Value::Null),
            ("egress".into(), "IPv6".into(), Value::Null),
            ("ingress".into(), "IPv4".into(), json!(gid)),
            ("ingress".into(), "IPv6".into(), json!(gid)),
        ]
    );
    // Listing again does not create another; the rules list agrees.
    assert_eq!(
        m.api.ids("/v2.0/security-groups", "security_groups").await,
        std::slice::from_ref(&gid)
    );
    assert_eq!(
        m.api
            .list("/v2.0/security-group-rules", "security_group_rules")
            .await
            .len(),
        4
    );
    // A port gets the default group; it cannot be deleted by its member, nor another made.
    let (net, _) = net_with_subnet(&m.api, "n").await;
    let p = m.api.port(&net).await;
    assert_eq!(p["security_groups"], json!([gid]));
    let (st, body) = m.api.delete(&format!("/v2.0/security-groups/{gid}")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, None);
    let (st, body) = m
        .api
        .post("/v2.0/security-groups", json!({"security_group": {"name": "default"}}))
        .await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, None);
    // Each project has its own.
    let other = s.member("sg2").await;
    let theirs = other.api.list("/v2.0/security-groups", "security_groups").await;
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0]["name"], "default");
    assert_ne!(id_of(&theirs[0]), gid);
}

async fn duplicate_security_group_rule_is_409(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("rules").await;
    let groups = m
        .api
        .list("/v2.0/security-groups?name=default", "security_groups")
        .await;
    let gid = id_of(&groups[0]);
    let rule = json!({"security_group_rule": {"security_group_id": gid, "direction": "ingress",
        "protocol": "tcp", "port_range_min": 22, "port_range_max": 22, "remote_ip_prefix": "0.0.0.0/0"}});
    let (st, body) = m.api.post("/v2.0/security-group-rules", rule.clone()).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let r = &body["security_group_rule"];
    assert_eq!(r["protocol"], "tcp");
    assert_eq!(r["port_range_min"], 22);
    assert_eq!(r["port_range_max"], 22);
    assert_eq!(r["ethertype"], "IPv4");
    let (st, err) = m.api.post("/v2.0/security-group-rules", rule).await;
    assert_neutron_error(st, &err, StatusCode::CONFLICT, Some("SecurityGroupRuleExists"));
    assert!(
        error_message(&err).contains(&id_of(r)),
        "names the existing rule: {err}"
    );
    assert_serving(&m.api).await;
    let (_, g) = m.api.get(&format!("/v2.0/security-groups/{gid}")).await;
    assert_eq!(
        g["security_group"]["security_group_rules"].as_array().map(Vec::len),
        Some(5)
    );
    // A different port is a different rule; deleting the rule allows it again.
    let (st, body) = m
        .api
        .post(
            "/v2.0/security-group-rules",
            json!({"security_group_rule": {"security_group_id": gid, "direction": "ingress",
                "protocol": "tcp", "port_range_min": 80, "port_range_max": 80, "remote_ip_prefix": "0.0.0.0/0"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let (st, _) = m.api.delete(&format!("/v2.0/security-group-rules/{}", id_of(r))).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = m
        .api
        .post(
            "/v2.0/security-group-rules",
            json!({"security_group_rule": {"security_group_id": gid, "direction": "ingress",
                "protocol": "tcp", "port_range_min": 22, "port_range_max": 22, "remote_ip_prefix": "0.0.0.0/0"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
}

async fn bulk_port_create(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("bulk").await;
    let (net, sub) = net_with_subnet(&m.api, "n").await;
    let (st, body) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"ports": [
                {"network_id": net, "name": "b1"},
                {"network_id": net, "name": "b2"},
                {"network_id": net, "name": "b3", "fixed_ips": [{"subnet_id": sub, "ip_address": "10.0.0.99"}]},
            ]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let ports = body["ports"].as_array().expect("ports");
    assert_eq!(names(ports), ["b1", "b2", "b3"]);
    assert_eq!(ips_of(&ports[2]), ["10.0.0.99"]);
    let ids: HashSet<String> = ports.iter().map(id_of).collect();
    let ips: HashSet<String> = ports.iter().flat_map(ips_of).collect();
    assert_eq!((ids.len(), ips.len()), (3, 3), "distinct ports and addresses");
    let listed: HashSet<String> = m.api.ids("/v2.0/ports", "ports").await.into_iter().collect();
    assert_eq!(listed, ids);

    // All or nothing: one bad item and none is created.
    let (st, err) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"ports": [
                {"network_id": net, "name": "c1"},
                {"network_id": net, "name": "c2", "fixed_ips": [{"subnet_id": sub, "ip_address": "10.0.0.99"}]},
            ]}),
        )
        .await;
    assert_neutron_error(st, &err, StatusCode::CONFLICT, Some("IpAddressAlreadyAllocated"));
    assert_eq!(m.api.list("/v2.0/ports", "ports").await.len(), 3);
    assert!(m.api.list("/v2.0/ports?name=c1", "ports").await.is_empty());

    // Bulk networks as well.
    let (st, body) = m
        .api
        .post("/v2.0/networks", json!({"networks": [{"name": "x1"}, {"name": "x2"}]}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(names(body["networks"].as_array().expect("networks")), ["x1", "x2"]);
}

async fn binding_host_id_is_admin_only(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("binding").await;
    let (net, _) = net_with_subnet(&m.api, "n").await;
    let (st, body) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net, "binding:host_id": "compute-1"}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::FORBIDDEN, None);
    assert!(m.api.list("/v2.0/ports", "ports").await.is_empty());
    let port = id_of(&m.api.port(&net).await);
    let (st, body) = m
        .api
        .put(
            &format!("/v2.0/ports/{port}"),
            json!({"port": {"binding:host_id": "compute-1"}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::FORBIDDEN, None);
    assert_serving(&m.api).await;

    // The admin may bind, and sees the binding; the member does not see binding details.
    let (st, body) = s
        .admin
        .put(
            &format!("/v2.0/ports/{port}"),
            json!({"port": {"binding:host_id": "compute-1"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (_, got) = s.admin.get(&format!("/v2.0/ports/{port}")).await;
    assert_eq!(got["port"]["binding:host_id"], "compute-1");
    let (_, got) = m.api.get(&format!("/v2.0/ports/{port}")).await;
    assert!(got["port"].get("binding:host_id").is_none(), "{got}");
    let p = s
        .admin
        .create(
            "ports",
            "port",
            json!({"network_id": net, "binding:host_id": "compute-2"}),
        )
        .await;
    assert_eq!(p["binding:host_id"], "compute-2");
}

async fn segmentation_id_is_admin_only_and_unique(b: Backend) {
    let s = TestServer::start(b).await;
    let m = s.member("seg").await;
    let mut ids = vec![];
    for i in 0..6 {
        let net = m.api.network(&format!("n{i}")).await;
        assert!(
            net.get("provider:segmentation_id").is_none(),
            "members do not see provider attributes: {net}"
        );
        ids.push(id_of(&net));
    }
    for n in m.api.list("/v2.0/networks", "networks").await {
        assert!(n.get("provider:segmentation_id").is_none(), "{n}");
    }
    let (st, body) = m
        .api
        .post(
            "/v2.0/networks",
            json!({"network": {"name": "mine", "provider:segmentation_id": 4242}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::FORBIDDEN, None);

    let listed = s.admin.list("/v2.0/networks", "networks").await;
    assert_eq!(listed.len(), 6);
    let mut vnis = HashSet::new();
    for n in &listed {
        assert_eq!(n["provider:network_type"], "vxlan", "{n}");
        let v = n["provider:segmentation_id"].as_u64().expect("segmentation id");
        assert!((1000..=999_999).contains(&v), "{v} in the configured range");
        assert!(vnis.insert(v), "segmentation id {v} used twice");
    }
    let (_, got) = s.admin.get(&format!("/v2.0/networks/{}", ids[0])).await;
    let taken = got["network"]["provider:segmentation_id"].as_u64().expect("vni");
    let (st, body) = s
        .admin
        .post(
            "/v2.0/networks",
            json!({"network": {"name": "clash", "provider:network_type": "vxlan", "provider:segmentation_id": taken}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, None);
    let free = (1000..).find(|v| !vnis.contains(v)).expect("a free vni");
    let n = s
        .admin
        .create(
            "networks",
            "network",
            json!({"name": "chosen", "provider:network_type": "vxlan", "provider:segmentation_id": free}),
        )
        .await;
    assert_eq!(n["provider:segmentation_id"], json!(free));
    // Deleting a network frees its id.
    let (st, _) = s.admin.delete(&format!("/v2.0/networks/{}", id_of(&n))).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let n = s
        .admin
        .create(
            "networks",
            "network",
            json!({"name": "again", "provider:segmentation_id": free}),
        )
        .await;
    assert_eq!(n["provider:segmentation_id"], json!(free));
}
