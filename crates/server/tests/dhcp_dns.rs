//! The `extra_dhcp_opt` and `dns-integration` extensions through the Neutron API: ports'
//! `extra_dhcp_opts`, `dns_name` and `dns_assignment`, networks' `dns_domain`.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{assert_neutron_error, id_of, Backend, TestServer};

fn opts_sorted(port: &Value) -> Vec<(String, String, u64)> {
    let mut v: Vec<(String, String, u64)> = port["extra_dhcp_opts"]
        .as_array()
        .unwrap_or_else(|| panic!("no extra_dhcp_opts in {port}"))
        .iter()
        .map(|o| {
            (
                o["opt_name"].as_str().expect("opt_name").to_string(),
                o["opt_value"].as_str().expect("opt_value").to_string(),
                o["ip_version"].as_u64().expect("ip_version"),
            )
        })
        .collect();
    v.sort();
    v
}

fn opt(name: &str, value: &str, v: u64) -> (String, String, u64) {
    (name.to_string(), value.to_string(), v)
}

#[tokio::test]
async fn extensions_are_listed() {
    let s = TestServer::start(Backend::Embedded).await;
    for alias in ["extra_dhcp_opt", "dns-integration"] {
        let (st, b) = s.admin.get(&format!("/v2.0/extensions/{alias}")).await;
        assert_eq!(st, StatusCode::OK, "{alias}: {b}");
        assert_eq!(b["extension"]["alias"], json!(alias));
    }
}

#[tokio::test]
async fn extra_dhcp_opts_create_update_clear() {
    let s = TestServer::start(Backend::Embedded).await;
    let a = s.member("alice").await;
    let net = id_of(&a.api.network("n").await);
    a.api.subnet(&net, "10.9.0.0/24").await;
    // None asked: an empty list.
    let plain = a.api.port(&net).await;
    assert_eq!(plain["extra_dhcp_opts"], json!([]));

    let p = a
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net, "extra_dhcp_opts": [
                {"opt_name": "bootfile-name", "opt_value": "pxelinux.0"},
                {"opt_name": "tftp-server", "opt_value": "10.9.0.5", "ip_version": 4},
                {"opt_name": "66", "opt_value": "10.9.0.6", "ip_version": "4"},
                {"opt_name": "dns-server", "opt_value": "[2001:db8::1]", "ip_version": 6},
                {"opt_name": "mtu", "opt_value": null}]}),
        )
        .await;
    let id = id_of(&p);
    // A null value on create adds nothing.
    assert_eq!(
        opts_sorted(&p),
        vec![
            opt("66", "10.9.0.6", 4),
            opt("bootfile-name", "pxelinux.0", 4),
            opt("dns-server", "[2001:db8::1]", 6),
            opt("tftp-server", "10.9.0.5", 4),
        ]
    );
    let path = format!("/v2.0/ports/{id}");
    let (st, got) = a.api.get(&path).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(opts_sorted(&got["port"]), opts_sorted(&p));

    // Update merges: a new value replaces, a new option is added, null removes, others stay.
    let (st, b) = a
        .api
        .put(
            &path,
            json!({"port": {"extra_dhcp_opts": [
                {"opt_name": "bootfile-name", "opt_value": "grub.efi"},
                {"opt_name": "server-ip-address", "opt_value": "10.9.0.5"},
                {"opt_name": "66", "opt_value": null},
                {"opt_name": "dns-server", "opt_value": null, "ip_version": 6}]}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(
        opts_sorted(&b["port"]),
        vec![
            opt("bootfile-name", "grub.efi", 4),
            opt("server-ip-address", "10.9.0.5", 4),
            opt("tftp-server", "10.9.0.5", 4),
        ]
    );
    // Other updates leave them alone.
    let (st, b) = a.api.put(&path, json!({"port": {"name": "renamed"}})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(opts_sorted(&b["port"]).len(), 3);
    // Clearing every option, one null value each.
    let (st, b) = a
        .api
        .put(
            &path,
            json!({"port": {"extra_dhcp_opts": [
                {"opt_name": "bootfile-name", "opt_value": null},
                {"opt_name": "server-ip-address", "opt_value": null},
                {"opt_name": "tftp-server", "opt_value": null}]}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["port"]["extra_dhcp_opts"], json!([]));
}

#[tokio::test]
async fn bad_extra_dhcp_opts_are_400() {
    let s = TestServer::start(Backend::Embedded).await;
    let a = s.member("alice").await;
    let net = id_of(&a.api.network("n").await);
    a.api.subnet(&net, "10.9.0.0/24").await;
    let id = id_of(&a.api.port(&net).await);
    let bad = [
        json!("bootfile-name"),
        json!([{"opt_name": "no-such-option", "opt_value": "x"}]),
        json!([{"opt_name": "", "opt_value": "x"}]),
        json!([{"opt_value": "x"}]),
        json!([{"opt_name": "mtu", "opt_value": "huge"}]),
        json!([{"opt_name": "router", "opt_value": "10.9.0"}]),
        json!([{"opt_name": "server-ip-address", "opt_value": "nowhere"}]),
        json!([{"opt_name": "mtu", "opt_value": "1400", "ip_version": 5}]),
        json!([{"opt_name": "mtu", "opt_value": 1400}]),
        json!([{"opt_name": "mtu", "opt_value": "1400", "color": "red"}]),
        json!([{"opt_name": "mtu", "opt_value": "1400"}, {"opt_name": "mtu", "opt_value": "1300"}]),
        json!([{"opt_name": "no-such-v6-option", "opt_value": "x", "ip_version": 6}]),
        json!([{"opt_name": "dns-server", "opt_value": "10.0.0.1", "ip_version": 6}]),
        json!(["mtu"]),
    ];
    for b in &bad {
        let (st, body) = a
            .api
            .post(
                "/v2.0/ports",
                json!({"port": {"network_id": net, "extra_dhcp_opts": b}}),
            )
            .await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
        let (st, body) = a
            .api
            .put(&format!("/v2.0/ports/{id}"), json!({"port": {"extra_dhcp_opts": b}}))
            .await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    }
    let (st, body) = a.api.get(&format!("/v2.0/ports/{id}")).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(body["port"]["extra_dhcp_opts"], json!([]));
}

#[tokio::test]
async fn dns_names_and_domains() {
    let s = TestServer::start(Backend::Embedded).await;
    let a = s.member("alice").await;
    let n = a
        .api
        .create(
            "networks",
            "network",
            json!({"name": "n", "dns_domain": "example.org."}),
        )
        .await;
    assert_eq!(n["dns_domain"], json!("example.org."));
    let net = id_of(&n);
    let sub = id_of(&a.api.subnet(&net, "10.9.0.0/24").await);
    let plain = a.api.network("plain").await;
    assert_eq!(plain["dns_domain"], json!(""));

    // Without a dns_name: the generated host name.
    let p = a
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net, "fixed_ips": [{"subnet_id": sub, "ip_address": "10.9.0.7"}]}),
        )
        .await;
    assert_eq!(p["dns_name"], json!(""));
    assert_eq!(
        p["dns_assignment"],
        json!([{"hostname": "host-10-9-0-7", "ip_address": "10.9.0.7", "fqdn": "host-10-9-0-7.openstacklocal."}])
    );
    let path = format!("/v2.0/ports/{}", id_of(&p));
    let (st, b) = a.api.put(&path, json!({"port": {"dns_name": "web-1"}})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["port"]["dns_name"], json!("web-1"));
    assert_eq!(b["port"]["dns_assignment"][0]["hostname"], json!("web-1"));
    assert_eq!(b["port"]["dns_assignment"][0]["ip_address"], json!("10.9.0.7"));
    // Cleared with null or "".
    let (st, b) = a.api.put(&path, json!({"port": {"dns_name": null}})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["port"]["dns_name"], json!(""));
    assert_eq!(b["port"]["dns_assignment"][0]["hostname"], json!("host-10-9-0-7"));
    // On create too.
    let q = a
        .api
        .create("ports", "port", json!({"network_id": net, "dns_name": "db-1"}))
        .await;
    assert_eq!(q["dns_name"], json!("db-1"));

    // The network's domain changes and clears.
    let npath = format!("/v2.0/networks/{net}");
    let (st, b) = a
        .api
        .put(&npath, json!({"network": {"dns_domain": "corp.example."}}))
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["network"]["dns_domain"], json!("corp.example."));
    let (st, b) = a.api.put(&npath, json!({"network": {"dns_domain": ""}})).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["network"]["dns_domain"], json!(""));

    // Bad names and domains: 400, nothing changed.
    for bad in [
        json!("-web"),
        json!("web_1"),
        json!("a..b"),
        json!("web.123"),
        json!(7),
        json!("x".repeat(64)),
    ] {
        let (st, body) = a.api.put(&path, json!({"port": {"dns_name": bad}})).await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
        let (st, body) = a
            .api
            .post("/v2.0/ports", json!({"port": {"network_id": net, "dns_name": bad}}))
            .await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    }
    for bad in [json!("example.org"), json!("-x.org."), json!(["a."])] {
        let (st, body) = a.api.put(&npath, json!({"network": {"dns_domain": bad}})).await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
        let (st, body) = a
            .api
            .post("/v2.0/networks", json!({"network": {"name": "x", "dns_domain": bad}}))
            .await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    }
    let (_, b) = a.api.get(&path).await;
    assert_eq!(b["port"]["dns_name"], json!(""));
    // dns_assignment is read-only.
    let (st, body) = a
        .api
        .put(&path, json!({"port": {"dns_assignment": [{"hostname": "x"}]}}))
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
}

#[tokio::test]
async fn another_projects_port_is_404() {
    let s = TestServer::start(Backend::Embedded).await;
    let a = s.member("alice").await;
    let bob = s.member("bob").await;
    let net = id_of(&a.api.network("n").await);
    a.api.subnet(&net, "10.9.0.0/24").await;
    let id = id_of(&a.api.port(&net).await);
    let path = format!("/v2.0/ports/{id}");
    for body in [
        json!({"port": {"extra_dhcp_opts": [{"opt_name": "bootfile-name", "opt_value": "evil.0"}]}}),
        json!({"port": {"dns_name": "evil"}}),
    ] {
        let (st, b) = bob.api.put(&path, body).await;
        assert_neutron_error(st, &b, StatusCode::NOT_FOUND, None);
    }
    let (st, b) = bob
        .api
        .put(
            &format!("/v2.0/networks/{net}"),
            json!({"network": {"dns_domain": "evil.org."}}),
        )
        .await;
    assert_neutron_error(st, &b, StatusCode::NOT_FOUND, None);
    let (_, b) = a.api.get(&path).await;
    assert_eq!(b["port"]["extra_dhcp_opts"], json!([]));
    assert_eq!(b["port"]["dns_name"], json!(""));
    // The admin may.
    let (st, b) = s
        .admin
        .put(
            &path,
            json!({"port": {"dns_name": "ok", "extra_dhcp_opts": [{"opt_name": "mtu", "opt_value": "1400"}]}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["port"]["dns_name"], json!("ok"));
    assert_eq!(opts_sorted(&b["port"]), vec![opt("mtu", "1400", 4)]);
}
