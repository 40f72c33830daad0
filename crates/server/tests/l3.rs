//! External networks, router gateways, static routes and floating IPs through the Neutron
//! API, including what a member of another project (or a member without admin) tries.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashSet;
use support::{assert_neutron_error, id_of, Api, Backend, TestServer};

/// An external flat network `public` on 203.0.113.0/24, made by the admin; its id.
async fn public_net(admin: &Api) -> String {
    let net = admin
        .create(
            "networks",
            "network",
            json!({"name": "public", "router:external": true,
                   "provider:network_type": "flat", "provider:physical_network": "physnet1"}),
        )
        .await;
    assert_eq!(net["provider:network_type"], "flat", "{net}");
    assert_eq!(net["provider:segmentation_id"], Value::Null, "{net}");
    let id = id_of(&net);
    admin
        .create(
            "subnets",
            "subnet",
            json!({"network_id": id, "cidr": "203.0.113.0/24", "ip_version": 4,
                   "gateway_ip": "203.0.113.1", "enable_dhcp": false}),
        )
        .await;
    id
}

/// A member's network with a subnet, a router with a gateway on `public` and an interface on
/// the subnet, and a port on it: (network, subnet, router, port).
async fn routed_estate(api: &Api, public: &str, cidr: &str) -> (String, String, String, Value) {
    let net = id_of(&api.network("inside").await);
    let subnet = id_of(&api.subnet(&net, cidr).await);
    let router = id_of(
        &api.create(
            "routers",
            "router",
            json!({"name": "r", "external_gateway_info": {"network_id": public}}),
        )
        .await,
    );
    let (s, b) = api
        .put(
            &format!("/v2.0/routers/{router}/add_router_interface"),
            json!({"subnet_id": subnet}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let port = api.port(&net).await;
    (net, subnet, router, port)
}

fn fixed_ip(port: &Value) -> String {
    port["fixed_ips"][0]["ip_address"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn members_cannot_make_provider_or_external_networks() {
    let server = TestServer::start(Backend::Embedded).await;
    let m = server.member("a").await;
    for attrs in [
        json!({"name": "x", "router:external": true}),
        json!({"name": "x", "provider:network_type": "flat", "provider:physical_network": "physnet1"}),
    ] {
        let (s, b) = m.api.post("/v2.0/networks", json!({ "network": attrs })).await;
        assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);
    }
    let own = id_of(&m.api.network("mine").await);
    let (s, b) = m
        .api
        .put(
            &format!("/v2.0/networks/{own}"),
            json!({"network": {"router:external": true}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);

    // Flat networks: a physical network is required and carries only one; no VNI.
    let admin = &server.admin;
    let (s, b) = admin
        .post("/v2.0/networks", json!({"network": {"provider:network_type": "flat"}}))
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let (s, b) = admin
        .post(
            "/v2.0/networks",
            json!({"network": {"provider:network_type": "flat", "provider:physical_network": "p1",
                               "provider:segmentation_id": 7}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let (s, b) = admin
        .post(
            "/v2.0/networks",
            json!({"network": {"provider:network_type": "flat", "provider:physical_network": "bad name!"}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let public = public_net(admin).await;
    let (s, b) = admin
        .post(
            "/v2.0/networks",
            json!({"network": {"provider:network_type": "flat", "provider:physical_network": "physnet1"}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("FlatNetworkInUse"));

    // External networks are visible to every project, their subnets are not, and nobody but
    // the admin puts ports on them.
    let (s, b) = m.api.get(&format!("/v2.0/networks/{public}")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["network"]["router:external"], true);
    assert!(m
        .api
        .list(&format!("/v2.0/subnets?network_id={public}"), "subnets")
        .await
        .is_empty());
    let (s, b) = m.api.post("/v2.0/ports", json!({"port": {"network_id": public}})).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);
    let (s, b) = m
        .api
        .put(
            &format!("/v2.0/networks/{public}"),
            json!({"network": {"name": "mine-now"}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);

    // Once deleted, the physical network is free again.
    let (s, b) = admin.delete(&format!("/v2.0/networks/{public}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    public_net(admin).await;
}

#[tokio::test]
async fn gateways_are_admin_owned_ports_removed_with_the_gateway() {
    let server = TestServer::start(Backend::Embedded).await;
    let admin = &server.admin;
    let public = public_net(admin).await;
    let m = server.member("a").await;
    let private = id_of(&m.api.network("private").await);

    // Only external networks, and snat / fixed addresses only for admins.
    let gw = |body: Value| json!({"router": {"name": "r", "external_gateway_info": body}});
    let (s, b) = m.api.post("/v2.0/routers", gw(json!({"network_id": private}))).await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let (s, b) = m
        .api
        .post("/v2.0/routers", gw(json!({"network_id": public, "enable_snat": false})))
        .await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);
    let (s, b) = m
        .api
        .post(
            "/v2.0/routers",
            gw(json!({"network_id": public, "external_fixed_ips": [{"ip_address": "203.0.113.9"}]})),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);
    assert!(
        m.api.list("/v2.0/routers", "routers").await.is_empty(),
        "refused creates left routers"
    );

    let r = m
        .api
        .create(
            "routers",
            "router",
            json!({"name": "r", "external_gateway_info": {"network_id": public}}),
        )
        .await;
    let router = id_of(&r);
    let info = &r["external_gateway_info"];
    assert_eq!(info["network_id"], json!(public));
    assert_eq!(info["enable_snat"], true);
    let gw_ip = info["external_fixed_ips"][0]["ip_address"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(gw_ip.starts_with("203.0.113."), "{r}");
    let ports = admin
        .list(
            &format!("/v2.0/ports?device_id={router}&device_owner=network:router_gateway"),
            "ports",
        )
        .await;
    assert_eq!(ports.len(), 1, "{ports:?}");
    let gw_port = id_of(&ports[0]);
    assert_eq!(ports[0]["project_id"], "");
    assert_eq!(fixed_ip(&ports[0]), gw_ip);
    // The member does not see the gateway port, and nobody deletes it through the port API.
    let (s, _) = m.api.get(&format!("/v2.0/ports/{gw_port}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = admin.delete(&format!("/v2.0/ports/{gw_port}")).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, None);

    // Another address on the same network is someone else's: taking the gateway's is refused.
    let (s, b) = admin
        .post(
            "/v2.0/routers",
            gw(json!({"network_id": public, "external_fixed_ips": [{"ip_address": gw_ip}]})),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("IpAddressAlreadyAllocated"));

    // Clearing the gateway removes the port and frees the address.
    let (s, b) = m
        .api
        .put(
            &format!("/v2.0/routers/{router}"),
            json!({"router": {"external_gateway_info": {}}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["router"]["external_gateway_info"], Value::Null);
    let (s, _) = admin.get(&format!("/v2.0/ports/{gw_port}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "the gateway port stayed");
    let again = admin
        .create(
            "routers",
            "router",
            json!({"name": "r2", "external_gateway_info": {"network_id": public,
                   "external_fixed_ips": [{"ip_address": gw_ip}], "enable_snat": false}}),
        )
        .await;
    assert_eq!(again["external_gateway_info"]["enable_snat"], false);
    // Deleting a router deletes its gateway port.
    let (s, b) = admin.delete(&format!("/v2.0/routers/{}", id_of(&again))).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let left = admin.list(&format!("/v2.0/ports?network_id={public}"), "ports").await;
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn external_addresses_stay_unique_across_gateways_and_floating_ips() {
    let server = TestServer::start(Backend::Embedded).await;
    let admin = &server.admin;
    let public = id_of(
        &admin
            .create("networks", "network", json!({"name": "small", "router:external": true}))
            .await,
    );
    // Thirteen usable addresses: .2 to .14 (.1 is the gateway).
    admin
        .create(
            "subnets",
            "subnet",
            json!({"network_id": public, "cidr": "198.51.100.0/28", "ip_version": 4, "enable_dhcp": false}),
        )
        .await;
    let m = server.member("a").await;
    let mut taken = HashSet::new();
    let mut tasks = vec![];
    for i in 0..3 {
        let api = m.api.clone();
        let net = public.clone();
        tasks.push(tokio::spawn(async move {
            api.create(
                "routers",
                "router",
                json!({"name": format!("r{i}"), "external_gateway_info": {"network_id": net}}),
            )
            .await["external_gateway_info"]["external_fixed_ips"][0]["ip_address"]
                .as_str()
                .unwrap()
                .to_string()
        }));
        let api = m.api.clone();
        let net = public.clone();
        tasks.push(tokio::spawn(async move {
            api.create("floatingips", "floatingip", json!({"floating_network_id": net}))
                .await["floating_ip_address"]
                .as_str()
                .unwrap()
                .to_string()
        }));
    }
    for t in tasks {
        let ip = t.await.unwrap();
        assert!(taken.insert(ip.clone()), "{ip} given twice");
    }
    // The rest one by one, alternating, until the range is used up.
    for i in 0..7 {
        let ip = if i % 2 == 0 {
            m.api
                .create("floatingips", "floatingip", json!({"floating_network_id": public}))
                .await["floating_ip_address"]
                .as_str()
                .unwrap()
                .to_string()
        } else {
            m.api
                .create(
                    "routers",
                    "router",
                    json!({"name": "more", "external_gateway_info": {"network_id": public}}),
                )
                .await["external_gateway_info"]["external_fixed_ips"][0]["ip_address"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert!(taken.insert(ip.clone()), "{ip} given twice");
    }
    assert_eq!(taken.len(), 13);
    let (s, b) = m
        .api
        .post(
            "/v2.0/floatingips",
            json!({"floatingip": {"floating_network_id": public}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("IpAddressGenerationFailure"));
    let (s, b) = m
        .api
        .post(
            "/v2.0/routers",
            json!({"router": {"name": "late", "external_gateway_info": {"network_id": public}}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("IpAddressGenerationFailure"));
}

#[tokio::test]
async fn floating_ip_association_rules() {
    let server = TestServer::start(Backend::Embedded).await;
    let admin = &server.admin;
    let public = public_net(admin).await;
    let a = server.member("a").await;
    let b_member = server.member("b").await;
    let (_, subnet, router, port) = routed_estate(&a.api, &public, "10.0.0.0/24").await;
    let port_id = id_of(&port);

    // Only admins pick the address; the network must be external.
    let (s, b) = a
        .api
        .post(
            "/v2.0/floatingips",
            json!({"floatingip": {"floating_network_id": public, "floating_ip_address": "203.0.113.50"}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::FORBIDDEN, None);
    let private = id_of(&a.api.network("p2").await);
    let (s, b) = a
        .api
        .post(
            "/v2.0/floatingips",
            json!({"floatingip": {"floating_network_id": private}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);

    let fip = a
        .api
        .create(
            "floatingips",
            "floatingip",
            json!({"floating_network_id": public, "port_id": port_id}),
        )
        .await;
    let fip_id = id_of(&fip);
    assert_eq!(fip["router_id"], json!(router), "{fip}");
    assert_eq!(fip["fixed_ip_address"], json!(fixed_ip(&port)));
    assert_eq!(fip["status"], "ACTIVE");
    assert_eq!(fip["port_details"]["network_id"], port["network_id"]);
    let fip_port = admin.list(&format!("/v2.0/ports?device_id={fip_id}"), "ports").await;
    assert_eq!(fip_port.len(), 1);
    assert_eq!(fip_port[0]["device_owner"], "network:floatingip");
    assert_eq!(fixed_ip(&fip_port[0]), fip["floating_ip_address"].as_str().unwrap());

    // A second floating IP on the same fixed address: 409.
    let (s, b) = a
        .api
        .post(
            "/v2.0/floatingips",
            json!({"floatingip": {"floating_network_id": public, "port_id": port_id}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("FloatingIPPortAlreadyAssociated"));
    // A fixed address the port does not have: 400.
    let second = id_of(
        &a.api
            .create("floatingips", "floatingip", json!({"floating_network_id": public}))
            .await,
    );
    let (s, b) = a
        .api
        .put(
            &format!("/v2.0/floatingips/{second}"),
            json!({"floatingip": {"port_id": port_id, "fixed_ip_address": "10.0.0.250"}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);

    // Another project neither sees the floating IP nor associates with the port.
    let other = &b_member.api;
    for path in [format!("/v2.0/floatingips/{fip_id}"), format!("/v2.0/ports/{port_id}")] {
        let (s, _) = other.get(&path).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{path}");
    }
    assert!(other.list("/v2.0/floatingips", "floatingips").await.is_empty());
    let (s, b) = other
        .put(
            &format!("/v2.0/floatingips/{fip_id}"),
            json!({"floatingip": {"port_id": null}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);
    let (s, b) = other.delete(&format!("/v2.0/floatingips/{fip_id}")).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);
    let theirs = id_of(
        &other
            .create("floatingips", "floatingip", json!({"floating_network_id": public}))
            .await,
    );
    let (s, b) = other
        .put(
            &format!("/v2.0/floatingips/{theirs}"),
            json!({"floatingip": {"port_id": port_id}}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("PortNotFound"));
    // Nor does it associate its own port through a router that has no gateway.
    let (_, _, _, their_port) = {
        let net = id_of(&other.network("n").await);
        let sub = id_of(&other.subnet(&net, "10.9.0.0/24").await);
        let r = id_of(&other.create("routers", "router", json!({"name": "nogw"})).await);
        let (s, b) = other
            .put(
                &format!("/v2.0/routers/{r}/add_router_interface"),
                json!({"subnet_id": sub}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let p = other.port(&net).await;
        (net, sub, r, p)
    };
    let (s, b) = other
        .put(
            &format!("/v2.0/floatingips/{theirs}"),
            json!({"floatingip": {"port_id": id_of(&their_port)}}),
        )
        .await;
    assert_neutron_error(
        s,
        &b,
        StatusCode::NOT_FOUND,
        Some("ExternalGatewayForFloatingIPNotFound"),
    );

    // The router interface, and the gateway, stay while the floating IP relies on them.
    let (s, b) = a
        .api
        .put(
            &format!("/v2.0/routers/{router}/remove_router_interface"),
            json!({"subnet_id": subnet}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("RouterInterfaceInUseByFloatingIP"));
    let (s, b) = a
        .api
        .put(
            &format!("/v2.0/routers/{router}"),
            json!({"router": {"external_gateway_info": null}}),
        )
        .await;
    assert_neutron_error(
        s,
        &b,
        StatusCode::CONFLICT,
        Some("RouterExternalGatewayInUseByFloatingIp"),
    );
    // The floating IP's port is not deletable through the port API.
    let (s, b) = admin.delete(&format!("/v2.0/ports/{}", id_of(&fip_port[0]))).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, None);

    // Disassociate, then associate again, then delete the port: the floating IP stays,
    // disassociated.
    let (s, b) = a
        .api
        .put(
            &format!("/v2.0/floatingips/{fip_id}"),
            json!({"floatingip": {"port_id": null}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["floatingip"]["status"], "DOWN");
    assert_eq!(b["floatingip"]["router_id"], Value::Null);
    let (s, b) = a
        .api
        .put(
            &format!("/v2.0/floatingips/{second}"),
            json!({"floatingip": {"port_id": port_id}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = a.api.delete(&format!("/v2.0/ports/{port_id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b) = a.api.get(&format!("/v2.0/floatingips/{second}")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    for k in ["port_id", "fixed_ip_address", "router_id", "port_details"] {
        assert_eq!(b["floatingip"][k], Value::Null, "{k}: {b}");
    }
    // Now the interface may go; deleting the floating IPs frees their ports.
    let (s, b) = a
        .api
        .put(
            &format!("/v2.0/routers/{router}/remove_router_interface"),
            json!({"subnet_id": subnet}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    for f in [&fip_id, &second] {
        let (s, b) = a.api.delete(&format!("/v2.0/floatingips/{f}")).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    }
    let left = admin
        .list(
            &format!("/v2.0/ports?network_id={public}&device_owner=network:floatingip"),
            "ports",
        )
        .await;
    assert_eq!(
        left.len(),
        1,
        "only the other project's floating IP port is left: {left:?}"
    );
}

#[tokio::test]
async fn routes_are_validated_and_hold_their_interface() {
    let server = TestServer::start(Backend::Embedded).await;
    let m = server.member("a").await;
    let api = &m.api;
    let net = id_of(&api.network("n").await);
    let subnet = id_of(&api.subnet(&net, "10.0.0.0/24").await);
    let router = id_of(&api.create("routers", "router", json!({"name": "r"})).await);
    let (s, b) = api
        .put(
            &format!("/v2.0/routers/{router}/add_router_interface"),
            json!({"subnet_id": subnet}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let path = format!("/v2.0/routers/{router}");
    let set = |routes: Value| json!({"router": {"routes": routes}});
    for bad in [
        json!([{"destination": "10.5.0.0/16", "nexthop": "10.1.0.5"}]),
        json!([{"destination": "10.5.0.0/16", "nexthop": "10.0.0.1"}]),
        json!([{"destination": "not-a-cidr", "nexthop": "10.0.0.5"}]),
        json!([{"destination": "10.5.0.0/16", "nexthop": "10.0.0.300"}]),
        json!([{"destination": "10.5.0.0/16"}]),
        json!([{"destination": "10.5.0.0/16", "nexthop": "10.0.0.5", "extra": 1}]),
    ] {
        let (s, b) = api.put(&path, set(bad.clone())).await;
        assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    }
    let too_many: Vec<Value> = (0..31)
        .map(|i| json!({"destination": format!("10.{}.0.0/16", 100 + i), "nexthop": "10.0.0.5"}))
        .collect();
    let (s, b) = api.put(&path, set(json!(too_many))).await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let (_, shown) = api.get(&path).await;
    assert_eq!(
        shown["router"]["routes"],
        json!([]),
        "refused updates changed the routes"
    );

    let route = json!({"destination": "10.5.0.0/16", "nexthop": "10.0.0.5"});
    let (s, b) = api.put(&path, set(json!([route, route]))).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["router"]["routes"], json!([route]), "duplicates are removed");
    let (s, b) = api
        .put(
            &format!("/v2.0/routers/{router}/remove_router_interface"),
            json!({"subnet_id": subnet}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("RouterInterfaceInUseByRoute"));
    // extraroute-atomic: add and remove against the stored routes.
    let other = json!({"destination": "10.6.0.0/16", "nexthop": "10.0.0.6"});
    let (s, b) = api
        .put(&format!("{path}/add_extraroutes"), set(json!([other, route])))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["router"]["routes"], json!([route, other]));
    let (s, b) = api
        .put(
            &format!("{path}/add_extraroutes"),
            set(json!([{"destination": "10.7.0.0/16", "nexthop": "10.3.0.1"}])),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, Some("InvalidRoutes"));
    let (s, b) = api
        .put(&format!("{path}/remove_extraroutes"), set(json!([route])))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["router"]["routes"], json!([other]));
    let (s, b) = api.put(&path, set(Value::Null)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["router"]["routes"], json!([]));
    let (s, b) = api
        .put(
            &format!("/v2.0/routers/{router}/remove_router_interface"),
            json!({"subnet_id": subnet}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn giving_up_the_fixed_address_disassociates() {
    let server = TestServer::start(Backend::Embedded).await;
    let public = public_net(&server.admin).await;
    let a = server.member("a").await;
    let (_, subnet, router, port) = routed_estate(&a.api, &public, "10.0.0.0/24").await;
    let port_id = id_of(&port);
    let fip = id_of(
        &a.api
            .create(
                "floatingips",
                "floatingip",
                json!({"floating_network_id": public, "port_id": port_id}),
            )
            .await,
    );
    // Another address on the same subnet: the floating IP's one is gone, so is the association.
    let (s, b) = a
        .api
        .put(
            &format!("/v2.0/ports/{port_id}"),
            json!({"port": {"fixed_ips": [{"subnet_id": subnet, "ip_address": "10.0.0.200"}]}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (_, b) = a.api.get(&format!("/v2.0/floatingips/{fip}")).await;
    assert_eq!(b["floatingip"]["port_id"], Value::Null, "{b}");
    assert_eq!(b["floatingip"]["status"], "DOWN");
    // The new address may take it, and the interface is held again.
    let (s, b) = a
        .api
        .put(
            &format!("/v2.0/floatingips/{fip}"),
            json!({"floatingip": {"port_id": port_id}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["floatingip"]["fixed_ip_address"], "10.0.0.200");
    let (s, b) = a
        .api
        .put(
            &format!("/v2.0/routers/{router}/remove_router_interface"),
            json!({"subnet_id": subnet}),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("RouterInterfaceInUseByFloatingIP"));
}
