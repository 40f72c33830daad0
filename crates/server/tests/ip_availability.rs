//! `network-ip-availability`: used and total addresses per network and subnet, counted from
//! the allocations every holder makes (ports, router interfaces), on both store backends;
//! admin only, GET only.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use support::{assert_neutron_error, id_of, Backend, TestServer};

async fn check(backend: Backend) {
    let server = TestServer::start(backend).await;
    let m = server.member("avail").await;
    let net = id_of(&m.api.network("counted").await);
    let v4 = m.api.subnet(&net, "10.9.0.0/24").await;
    let v6 = m
        .api
        .create(
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": "2001:db8:9::/64", "ip_version": 6}),
        )
        .await;
    for _ in 0..3 {
        m.api.port(&net).await;
    }
    let admin = &server.admin;
    let (s, b) = admin.get(&format!("/v2.0/network-ip-availabilities/{net}")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let a = &b["network_ip_availability"];
    assert_eq!(a["network_name"], "counted", "{b}");
    let by_subnet = |id: &str| {
        a["subnet_ip_availability"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["subnet_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("subnet {id} missing: {b}"))
    };
    let s4 = by_subnet(&id_of(&v4));
    // .2–.254 (the gateway .1 is outside the pool); three ports, one address each per subnet.
    assert_eq!(
        (s4["total_ips"].as_u64(), s4["used_ips"].as_u64()),
        (Some(253), Some(3)),
        "{s4}"
    );
    let s6 = by_subnet(&id_of(&v6));
    assert_eq!(s6["used_ips"].as_u64(), Some(3), "{s6}");
    assert_eq!(a["used_ips"].as_u64(), Some(6), "{b}");

    // Filters: by network, and by IP version (subnets of that version only).
    let list = admin
        .list(
            &format!("/v2.0/network-ip-availabilities?network_id={net}&ip_version=4"),
            "network_ip_availabilities",
        )
        .await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["subnet_ip_availability"].as_array().unwrap().len(), 1);
    let (s, b) = admin.get("/v2.0/network-ip-availabilities?bogus=1").await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let (s, b) = admin.get("/v2.0/network-ip-availabilities?ip_version=5").await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);

    // Admin only; read only; unknown networks are 404.
    let (s, b) = m.api.get("/v2.0/network-ip-availabilities").await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);
    let (s, b) = m.api.get(&format!("/v2.0/network-ip-availabilities/{net}")).await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);
    let (s, b) = admin.delete(&format!("/v2.0/network-ip-availabilities/{net}")).await;
    assert_neutron_error(s, &b, StatusCode::METHOD_NOT_ALLOWED, None);
    let (s, b) = admin
        .post(
            "/v2.0/network-ip-availabilities",
            json!({"network_ip_availability": {}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::METHOD_NOT_ALLOWED, None);
    let (s, b) = admin.get("/v2.0/network-ip-availabilities/no-such-network").await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);
}

#[tokio::test]
async fn availability_on_the_embedded_store() {
    check(Backend::Embedded).await;
}

#[tokio::test]
async fn availability_on_etcd() {
    check(Backend::Etcd).await;
}
