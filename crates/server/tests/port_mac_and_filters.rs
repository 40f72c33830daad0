//! `empty-string-filtering` (`?name=` lists what has an empty name) and
//! `port-mac-address-regenerate` (`mac_address: null` on an unbound port gives it a fresh
//! MAC; admin only, as any MAC change; refused on a bound port), on both store backends.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use support::{assert_neutron_error, id_of, Backend, TestServer};

async fn check(backend: Backend) {
    let s = TestServer::start(backend).await;
    let (_, exts) = s.admin.get("/v2.0/extensions").await;
    for alias in ["empty-string-filtering", "port-mac-address-regenerate"] {
        assert!(
            exts["extensions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["alias"] == alias),
            "{alias}"
        );
    }
    let m = s.member("filters").await;
    let named = id_of(&m.api.network("named").await);
    let unnamed = id_of(&m.api.create("networks", "network", json!({})).await);
    assert_eq!(
        m.api.ids("/v2.0/networks?name=", "networks").await,
        vec![unnamed.clone()]
    );
    assert_eq!(
        m.api.ids("/v2.0/networks?name=named", "networks").await,
        vec![named.clone()]
    );
    let mut both = m.api.ids("/v2.0/networks?description=", "networks").await;
    both.sort();
    let mut want = vec![named.clone(), unnamed];
    want.sort();
    assert_eq!(both, want);

    // A fresh MAC for an unbound port: new, valid, and the old one free again.
    m.api.subnet(&named, "10.40.0.0/24").await;
    let port = m.api.port(&named).await;
    let (id, old) = (id_of(&port), port["mac_address"].as_str().unwrap().to_string());
    let path = format!("/v2.0/ports/{id}");
    let (st, b) = m.api.put(&path, json!({"port": {"mac_address": null}})).await;
    assert_neutron_error(st, &b, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    let (st, b) = s.admin.put(&path, json!({"port": {"mac_address": null}})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let new = b["port"]["mac_address"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(new.len(), 17, "{new}");
    assert_eq!(b["port"]["revision_number"], 1, "{b}");
    let (st, b) = s
        .admin
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": named, "mac_address": old}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "the old MAC is free again: {b}");
    // Created with null: a MAC is chosen as if none was given.
    let (st, b) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": named, "mac_address": null}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    assert_eq!(b["port"]["mac_address"].as_str().map(str::len), Some(17));

    // Bound: the MAC stays.
    let (st, b) = s.admin.put(&path, json!({"port": {"binding:host_id": "node-1"}})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    if b["port"]["binding:vif_type"] != "unbound" {
        let (st, b) = s.admin.put(&path, json!({"port": {"mac_address": null}})).await;
        assert_neutron_error(st, &b, StatusCode::CONFLICT, Some("PortBound"));
    }
}

#[tokio::test]
async fn on_the_embedded_store() {
    check(Backend::Embedded).await;
}

#[tokio::test]
async fn on_etcd() {
    check(Backend::Etcd).await;
}
