//! Cross-project abuse of the network API: router ports, error answers about other projects'
//! subnets, and what a node may claim in its heartbeat.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{assert_neutron_error, error_message, id_of, Backend, Member, TestServer};

const IFACE: &str = "network:router_interface";

async fn router(m: &Member, name: &str) -> String {
    id_of(&m.api.create("routers", "router", json!({"name": name})).await)
}

/// A network with one subnet; returns (network id, subnet id).
async fn net_with_subnet(m: &Member, name: &str, cidr: &str) -> (String, String) {
    let net = id_of(&m.api.network(name).await);
    let sub = id_of(&m.api.subnet(&net, cidr).await);
    (net, sub)
}

async fn add_subnet_interface(m: &Member, router: &str, subnet: &str) -> Value {
    let (s, b) = m
        .api
        .put(
            &format!("/v2.0/routers/{router}/add_router_interface"),
            json!({ "subnet_id": subnet }),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "add interface: {b}");
    b
}

#[tokio::test]
async fn a_project_cannot_attach_ports_to_another_projects_router() {
    let server = TestServer::start(Backend::Embedded).await;
    let a = server.member("ra").await;
    let b = server.member("rb").await;
    let (net_a, _) = net_with_subnet(&a, "net-a", "10.1.0.0/24").await;
    let router_b = router(&b, "router-b").await;
    let router_a = router(&a, "router-a").await;

    // Create: a router interface naming B's router is refused.
    let (s, body) = a
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net_a, "device_owner": IFACE, "device_id": router_b}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("DeviceIDNotOwnedByTenant"));
    assert_eq!(
        error_message(&body),
        format!("The following device_id {router_b} is not owned by your tenant or matches another tenants router.")
    );
    // The other router owner variants too.
    for owner in [
        "network:router_interface_distributed",
        "network:ha_router_replicated_interface",
    ] {
        let (s, body) = a
            .api
            .post(
                "/v2.0/ports",
                json!({"port": {"network_id": net_a, "device_owner": owner, "device_id": router_b}}),
            )
            .await;
        assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("DeviceIDNotOwnedByTenant"));
    }
    // B's router is still deletable: nothing of A's holds it.
    let (s, body) = b.api.delete(&format!("/v2.0/routers/{router_b}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let router_b = router(&b, "router-b2").await;

    // Own router, or a device id that is no router: fine, as in Neutron.
    let own = a
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net_a, "device_owner": IFACE, "device_id": router_a}),
        )
        .await;
    let plain = a
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net_a, "device_owner": IFACE, "device_id": "00000000-0000-4000-8000-000000000001"}),
        )
        .await;

    // Update: moving a port onto B's router, by device id or by owner, is refused.
    let (s, body) = a
        .api
        .put(
            &format!("/v2.0/ports/{}", id_of(&own)),
            json!({"port": {"device_id": router_b}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("DeviceIDNotOwnedByTenant"));
    let other = a
        .api
        .create("ports", "port", json!({"network_id": net_a, "device_id": router_b}))
        .await;
    let (s, body) = a
        .api
        .put(
            &format!("/v2.0/ports/{}", id_of(&other)),
            json!({"port": {"device_owner": IFACE}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("DeviceIDNotOwnedByTenant"));
    let (s, body) = a
        .api
        .put(
            &format!("/v2.0/ports/{}", id_of(&plain)),
            json!({"port": {"device_owner": IFACE, "device_id": router_b}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("DeviceIDNotOwnedByTenant"));
    // Unrelated updates of such ports still work.
    let (s, body) = a
        .api
        .put(
            &format!("/v2.0/ports/{}", id_of(&other)),
            json!({"port": {"name": "renamed"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // B can still delete its router.
    let (s, body) = b.api.delete(&format!("/v2.0/routers/{router_b}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");

    // An admin may (Neutron exempts admins).
    let router_b = router(&b, "router-b3").await;
    let (s, body) = server
        .admin
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net_a, "device_owner": IFACE, "device_id": router_b}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn router_ports_are_deleted_only_through_the_router() {
    let server = TestServer::start(Backend::Embedded).await;
    let a = server.member("da").await;
    let b = server.member("db").await;
    // A shared network of B's, with a subnet B plugs into its router.
    let net_b = id_of(
        &server
            .admin
            .create(
                "networks",
                "network",
                json!({"name": "shared-b", "shared": true, "project_id": b.project_id}),
            )
            .await,
    );
    let sub_b = id_of(&b.api.subnet(&net_b, "10.2.0.0/24").await);
    let sub_b2 = id_of(&b.api.subnet(&net_b, "10.2.1.0/24").await);
    let router_b = router(&b, "router-b").await;
    let info = add_subnet_interface(&b, &router_b, &sub_b).await;
    let port = info["port_id"].as_str().expect("port_id").to_string();

    // Neither the router's project, the shared network's users, nor an admin deletes it via
    // /ports.
    for (who, api) in [("owner", &b.api), ("admin", &server.admin)] {
        let (s, body) = api.delete(&format!("/v2.0/ports/{port}")).await;
        assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("ServicePortInUse"));
        assert_eq!(
            error_message(&body),
            format!("Port {port} cannot be deleted directly via the port API: has device owner {IFACE}."),
            "{who}"
        );
    }
    let (s, _) = a.api.delete(&format!("/v2.0/ports/{port}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, body) = b.api.get(&format!("/v2.0/ports/{port}")).await;
    assert_eq!(s, StatusCode::OK, "the interface is still there: {body}");

    // An interface added by port is protected the same way.
    let p = b
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net_b, "fixed_ips": [{"subnet_id": sub_b2}]}),
        )
        .await;
    let (s, body) = b
        .api
        .put(
            &format!("/v2.0/routers/{router_b}/add_router_interface"),
            json!({"port_id": id_of(&p)}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = b.api.delete(&format!("/v2.0/ports/{}", id_of(&p))).await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("ServicePortInUse"));
    let (s, body) = b
        .api
        .put(
            &format!("/v2.0/routers/{router_b}/remove_router_interface"),
            json!({"port_id": id_of(&p)}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // The router API still removes it, and then the router goes.
    let (s, body) = b
        .api
        .put(
            &format!("/v2.0/routers/{router_b}/remove_router_interface"),
            json!({"subnet_id": sub_b}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, _) = b.api.get(&format!("/v2.0/ports/{port}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, body) = b.api.delete(&format!("/v2.0/routers/{router_b}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");

    // A port made a router interface through the port API is a router port like any other.
    let (net_a, _) = net_with_subnet(&a, "net-a", "10.3.0.0/24").await;
    let router_a = router(&a, "router-a").await;
    let own = a
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net_a, "device_owner": IFACE, "device_id": router_a}),
        )
        .await;
    let (s, body) = a.api.delete(&format!("/v2.0/ports/{}", id_of(&own))).await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("ServicePortInUse"));
    let (s, body) = a
        .api
        .put(
            &format!("/v2.0/routers/{router_a}/remove_router_interface"),
            json!({"port_id": id_of(&own)}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // One whose router does not exist is stale and may go, as in Neutron; so may a router
    // port without addresses.
    let stale = a
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net_a, "device_owner": IFACE, "device_id": "00000000-0000-4000-8000-000000000002"}),
        )
        .await;
    let (s, body) = a.api.delete(&format!("/v2.0/ports/{}", id_of(&stale))).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let bare = a
        .api
        .create(
            "ports",
            "port",
            json!({"network_id": net_a, "device_owner": IFACE, "device_id": router_a, "fixed_ips": []}),
        )
        .await;
    let (s, body) = a.api.delete(&format!("/v2.0/ports/{}", id_of(&bare))).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
}

#[tokio::test]
async fn errors_do_not_reveal_other_projects_subnets() {
    let server = TestServer::start(Backend::Embedded).await;
    let a = server.member("sa").await;
    let b = server.member("sb").await;
    let (net_a, sub_a) = net_with_subnet(&a, "net-a", "10.4.0.0/24").await;
    let (_, sub_b) = net_with_subnet(&b, "net-b", "10.5.0.0/24").await;
    let (_, sub_a2) = net_with_subnet(&a, "net-a2", "10.6.0.0/24").await;
    let random = "8b2d0e4e-7c7c-4f4e-9a43-6a1b4c3f2e10";

    // Create: B's private subnet answers exactly like one that does not exist.
    for sid in [sub_b.as_str(), random] {
        let (s, body) = a
            .api
            .post(
                "/v2.0/ports",
                json!({"port": {"network_id": net_a, "fixed_ips": [{"subnet_id": sid}]}}),
            )
            .await;
        assert_neutron_error(s, &body, StatusCode::NOT_FOUND, Some("SubnetNotFound"));
        assert_eq!(error_message(&body), format!("Subnet {sid} could not be found."));
    }
    // A subnet the caller sees, on another network: still the 400 naming it.
    let (s, body) = a
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net_a, "fixed_ips": [{"subnet_id": sub_a2}]}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::BAD_REQUEST, None);

    // Update: the same.
    let port = a.api.port(&net_a).await;
    for sid in [sub_b.as_str(), random] {
        let (s, body) = a
            .api
            .put(
                &format!("/v2.0/ports/{}", id_of(&port)),
                json!({"port": {"fixed_ips": [{"subnet_id": sid}]}}),
            )
            .await;
        assert_neutron_error(s, &body, StatusCode::NOT_FOUND, Some("SubnetNotFound"));
    }
    let (s, body) = a
        .api
        .put(
            &format!("/v2.0/ports/{}", id_of(&port)),
            json!({"port": {"fixed_ips": [{"subnet_id": sub_a}]}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // Router interfaces by subnet or by port: B's are as unknown as random ids.
    let router_a = router(&a, "router-a").await;
    let port_b = b.api.port(&id_of(&b.api.network("net-b2").await)).await;
    for (target, want) in [
        (json!({"subnet_id": sub_b}), "SubnetNotFound"),
        (json!({"subnet_id": random}), "SubnetNotFound"),
        (json!({"port_id": id_of(&port_b)}), "PortNotFound"),
        (json!({"port_id": random}), "PortNotFound"),
    ] {
        let (s, body) = a
            .api
            .put(&format!("/v2.0/routers/{router_a}/add_router_interface"), target)
            .await;
        assert_neutron_error(s, &body, StatusCode::NOT_FOUND, Some(want));
    }
}

#[tokio::test]
async fn a_node_heartbeat_needs_a_reachable_underlay_and_bounded_fields() {
    let server = TestServer::start(Backend::Embedded).await;
    let node = server.api(&server.node_token("hb-1").await);
    let path = "/isthmus/v1/nodes/hb-1";
    for bad in [
        "127.0.0.1",
        "127.1.2.3",
        "0.0.0.0",
        "0.1.2.3",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "::1",
        "::",
        "ff02::1",
        "ff0e::1",
        "fe80::1",
        "::ffff:127.0.0.1",
    ] {
        let (s, body) = node.put(path, json!({"node": {"underlay_ip": bad}})).await;
        assert_neutron_error(s, &body, StatusCode::BAD_REQUEST, Some("HTTPBadRequest"));
        assert!(error_message(&body).contains("underlay_ip"), "{bad}: {body}");
    }
    // Nothing was registered by the refused heartbeats.
    let (_, agents) = server.admin.get("/v2.0/agents").await;
    assert_eq!(agents["agents"], json!([]), "{agents}");

    for good in ["192.0.2.10", "10.0.0.1", "169.254.10.1", "2001:db8::1", "fd00::10"] {
        let (s, body) = node.put(path, json!({"node": {"underlay_ip": good}})).await;
        assert_eq!(s, StatusCode::OK, "{good}: {body}");
    }

    // Capabilities: at most 64, each 1..=64 characters.
    let ok: Vec<String> = (0..64).map(|i| format!("{i:064}")).collect();
    let (s, body) = node
        .put(path, json!({"node": {"underlay_ip": "192.0.2.10", "capabilities": ok}}))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let too_many: Vec<String> = (0..65).map(|i| format!("cap-{i}")).collect();
    let too_long = vec!["x".repeat(65)];
    let empty = vec![String::new()];
    for caps in [too_many, too_long, empty] {
        let (s, body) = node
            .put(
                path,
                json!({"node": {"underlay_ip": "192.0.2.10", "capabilities": caps}}),
            )
            .await;
        assert_neutron_error(s, &body, StatusCode::BAD_REQUEST, Some("HTTPBadRequest"));
        assert!(error_message(&body).contains("capabilities"), "{body}");
    }

    // What the node converged to and what failed: bounded, shown to admins.
    let failures: Vec<String> = (0..64).map(|i| format!("l2: CreateBridge isbr-{i}: refused")).collect();
    let (s, body) = node
        .put(
            path,
            json!({"node": {"underlay_ip": "192.0.2.10", "converged_revision": 41, "failures": failures}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, agents) = server.admin.get("/v2.0/agents").await;
    let conf = &agents["agents"][0]["configurations"];
    assert_eq!(conf["converged_revision"], json!(41), "{agents}");
    assert_eq!(conf["failures"].as_array().map(Vec::len), Some(64), "{agents}");
    let too_many: Vec<String> = (0..65).map(|i| format!("f{i}")).collect();
    for (field, value) in [
        ("failures", json!(too_many)),
        ("failures", json!(["x".repeat(1025)])),
        ("failures", json!("not a list")),
        ("converged_revision", json!(-1)),
        ("converged_revision", json!("seven")),
    ] {
        let (s, body) = node
            .put(path, json!({"node": {"underlay_ip": "192.0.2.10", field: value}}))
            .await;
        assert_neutron_error(s, &body, StatusCode::BAD_REQUEST, Some("HTTPBadRequest"));
        assert!(error_message(&body).contains(field), "{field}: {body}");
    }

    // Port reports: strings and dictionaries bounded too.
    let m = server.member("hbm").await;
    let (net, _) = net_with_subnet(&m, "net-hb", "10.7.0.0/24").await;
    let port = server
        .admin
        .create("ports", "port", json!({"network_id": net, "binding:host_id": "hb-1"}))
        .await;
    let ppath = format!("/isthmus/v1/nodes/hb-1/ports/{}", id_of(&port));
    for report in [
        json!({"device_id": "d".repeat(256)}),
        json!({"name": "n".repeat(256)}),
        json!({"vif_type": "v".repeat(256)}),
        json!({"binding:profile": {"k": "p".repeat(5000)}}),
        json!({"vif_details": {"k": "p".repeat(5000)}}),
    ] {
        let (s, body) = node.put(&ppath, json!({ "port": report })).await;
        assert_neutron_error(s, &body, StatusCode::BAD_REQUEST, Some("HTTPBadRequest"));
    }
    let (s, body) = node
        .put(
            &ppath,
            json!({"port": {"status": "ACTIVE", "binding:profile": {"k": "v"}}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // A node may not point a router port bound to it at another project's router.
    let other = server.member("hbo").await;
    let router_other = router(&other, "router-o").await;
    let router_m = router(&m, "router-m").await;
    let iface = server
        .admin
        .create(
            "ports",
            "port",
            json!({"network_id": net, "project_id": m.project_id, "device_owner": IFACE,
                   "device_id": router_m, "binding:host_id": "hb-1"}),
        )
        .await;
    let (s, body) = node
        .put(
            &format!("/isthmus/v1/nodes/hb-1/ports/{}", id_of(&iface)),
            json!({"port": {"device_id": router_other}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("DeviceIDNotOwnedByTenant"));
    let (s, body) = other.api.delete(&format!("/v2.0/routers/{router_other}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
}

#[tokio::test]
async fn a_single_machine_deployment_may_use_a_loopback_underlay() {
    let server = TestServer::start_with(Backend::Embedded, |c| c.allow_loopback_underlay = true).await;
    let node = server.api(&server.node_token("local").await);
    let (s, body) = node
        .put("/isthmus/v1/nodes/local", json!({"node": {"underlay_ip": "127.0.0.1"}}))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // Multicast and unspecified addresses stay refused.
    for bad in ["0.0.0.0", "224.0.0.1"] {
        let (s, body) = node
            .put("/isthmus/v1/nodes/local", json!({"node": {"underlay_ip": bad}}))
            .await;
        assert_neutron_error(s, &body, StatusCode::BAD_REQUEST, None);
    }
}
