//! Address scopes (`address-scope`) on both store backends: scopes, pools joining them (one
//! IP version, no overlap within a scope), networks reporting their subnets' scopes, deletes
//! refused while pools use a scope, visibility and policy.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{assert_neutron_error, id_of, Api, Backend, TestServer};

async fn scope(api: &Api, attrs: Value) -> Value {
    api.create("address-scopes", "address_scope", attrs).await
}

async fn pool(api: &Api, attrs: Value) -> (StatusCode, Value) {
    api.post("/v2.0/subnetpools", json!({ "subnetpool": attrs })).await
}

async fn check(backend: Backend) {
    let server = TestServer::start(backend).await;
    let admin = &server.admin;
    let m = server.member("scopes").await;
    let o = server.member("strangers").await;

    let s4 = scope(&m.api, json!({"name": "s4", "ip_version": 4})).await;
    let sid = id_of(&s4);
    assert_eq!(
        (&s4["name"], &s4["ip_version"], &s4["shared"]),
        (&json!("s4"), &json!(4), &json!(false))
    );
    assert_eq!(s4["project_id"], m.project_id.as_str());
    for (attrs, status) in [
        (json!({"name": "x"}), StatusCode::BAD_REQUEST),
        (json!({"ip_version": 5}), StatusCode::BAD_REQUEST),
        (json!({"ip_version": 4, "bogus": 1}), StatusCode::BAD_REQUEST),
        (json!({"ip_version": 4, "shared": true}), StatusCode::FORBIDDEN),
    ] {
        let (s, b) = m
            .api
            .post("/v2.0/address-scopes", json!({ "address_scope": attrs }))
            .await;
        assert_neutron_error(s, &b, status, None);
    }
    let shared = scope(admin, json!({"name": "everyone", "ip_version": 4, "shared": true})).await;
    let shared_id = id_of(&shared);

    // Visibility: own and shared ones.
    let path = format!("/v2.0/address-scopes/{sid}");
    let (s, b) = o.api.get(&path).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("AddressScopeNotFound"));
    let (s, b) = o.api.delete(&path).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);
    assert_eq!(
        o.api.ids("/v2.0/address-scopes", "address_scopes").await,
        vec![shared_id.clone()]
    );
    let (s, b) = o
        .api
        .put(
            &format!("/v2.0/address-scopes/{shared_id}"),
            json!({"address_scope": {"name": "mine"}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);
    let (s, b) = m.api.put(&path, json!({"address_scope": {"shared": true}})).await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);
    let (s, b) = m.api.put(&path, json!({"address_scope": {"ip_version": 6}})).await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let (s, b) = m.api.put(&path, json!({"address_scope": {"name": "renamed"}})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["address_scope"]["name"], "renamed");
    let (s, b) = m.api.call(Method::PATCH, &path, None).await;
    assert_neutron_error(s, &b, StatusCode::METHOD_NOT_ALLOWED, None);
    let (s, b) = m.api.put_empty(&format!("{path}/tags/red")).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);

    // Pools in a scope: same IP version, no overlap, the scope's owner (or admin) only.
    let (s, a) = pool(
        &m.api,
        json!({"prefixes": ["10.60.0.0/24"], "address_scope_id": sid, "min_prefixlen": 24}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    assert_eq!(a["subnetpool"]["address_scope_id"], sid.as_str());
    let a_id = id_of(&a["subnetpool"]);
    let (s, b) = pool(&m.api, json!({"prefixes": ["10.60.0.128/25"], "address_scope_id": sid})).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("AddressScopePrefixConflict"));
    let (s, b) = pool(
        &m.api,
        json!({"prefixes": ["2001:db8:60::/48"], "address_scope_id": sid}),
    )
    .await;
    assert_neutron_error(
        s,
        &b,
        StatusCode::BAD_REQUEST,
        Some("IllegalSubnetPoolIpVersionAssociationToAddressScope"),
    );
    let (s, b) = pool(&o.api, json!({"prefixes": ["10.62.0.0/24"], "address_scope_id": sid})).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("AddressScopeNotFound"));
    // A shared scope is usable by every project (`rbac-address-scope`).
    let (s, b) = pool(
        &o.api,
        json!({"prefixes": ["10.62.0.0/24"], "address_scope_id": shared_id}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["subnetpool"]["address_scope_id"], shared_id.as_str());
    // Overlapping pools outside the scope are fine; they cannot join it.
    let (s, outside) = pool(&m.api, json!({"prefixes": ["10.60.0.0/25"]})).await;
    assert_eq!(s, StatusCode::CREATED, "{outside}");
    let out_id = id_of(&outside["subnetpool"]);
    let (s, b) = m
        .api
        .put(
            &format!("/v2.0/subnetpools/{out_id}"),
            json!({"subnetpool": {"address_scope_id": sid}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("AddressScopePrefixConflict"));
    let (s, b) = pool(&m.api, json!({"prefixes": ["10.61.0.0/24"], "address_scope_id": sid})).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let b_id = id_of(&b["subnetpool"]);
    let (s, b) = m
        .api
        .put(
            &format!("/v2.0/subnetpools/{b_id}/add_prefixes"),
            json!({"prefixes": ["10.60.0.0/26"]}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("AddressScopePrefixConflict"));

    // Networks report the scope of their subnets' pools.
    let net = id_of(&m.api.network("scoped").await);
    let (s, b) = m
        .api
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": net, "ip_version": 4, "subnetpool_id": a_id}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = m.api.get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["network"]["ipv4_address_scope"], sid.as_str(), "{b}");
    assert_eq!(b["network"]["ipv6_address_scope"], Value::Null, "{b}");
    assert_eq!(
        m.api
            .ids(&format!("/v2.0/networks?ipv4_address_scope={sid}"), "networks")
            .await,
        vec![net.clone()]
    );
    let plain = id_of(&m.api.network("plain").await);
    let (_, b) = m.api.get(&format!("/v2.0/networks/{plain}")).await;
    assert_eq!(b["network"]["ipv4_address_scope"], Value::Null);

    // In use: pools keep their scope.
    let (s, b) = m.api.delete(&path).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("AddressScopeInUse"));
    let (s, b) = m.api.delete(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b) = m
        .api
        .put(
            &format!("/v2.0/subnetpools/{b_id}"),
            json!({"subnetpool": {"address_scope_id": null}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["subnetpool"]["address_scope_id"], Value::Null);
    let (s, b) = m.api.delete(&format!("/v2.0/subnetpools/{a_id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b) = m.api.delete(&path).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b) = m.api.get(&path).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("AddressScopeNotFound"));
    let (s, b) = m
        .api
        .put(
            &format!("/v2.0/subnetpools/{b_id}"),
            json!({"subnetpool": {"address_scope_id": sid}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("AddressScopeNotFound"));
}

#[tokio::test]
async fn scopes_on_the_embedded_store() {
    check(Backend::Embedded).await;
}

#[tokio::test]
async fn scopes_on_etcd() {
    check(Backend::Etcd).await;
}
