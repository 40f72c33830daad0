//! Neutron's default policy: who may write what (reader, member, admin, node), attribute
//! policy on other projects' shared networks, and the bounds on list attributes.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::{assert_neutron_error, error_message, id_of, Api, Backend, TestServer, MEMBER_PASSWORD};

/// A user `name` holding only `role` on `project_id` (named `project`), and its network API.
async fn user_with_role(server: &TestServer, name: &str, role: &str, project_id: &str, project: &str) -> Api {
    let user = server.create_user(name, MEMBER_PASSWORD).await;
    server.grant(project_id, &user, role).await;
    server.api(&server.token(name, MEMBER_PASSWORD, project).await)
}

/// A node agent's user: the `node` role on the service project.
async fn node_api(server: &TestServer, name: &str) -> Api {
    server.api(&server.node_token(name).await)
}

/// 403 with Neutron's PolicyNotAuthorized body.
fn assert_policy_denied(status: StatusCode, body: &Value, what: &str) {
    assert_neutron_error(status, body, StatusCode::FORBIDDEN, Some("PolicyNotAuthorized"));
    assert!(
        error_message(body).ends_with("is disallowed by policy"),
        "{what}: {body}"
    );
}

/// Everything a project can hold, made by its member: network, subnet, port, security group
/// and rule, router with an interface. Returns the ids.
struct Estate {
    net: String,
    subnet: String,
    port: String,
    sg: String,
    rule: String,
    router: String,
}

async fn estate(api: &Api) -> Estate {
    let net = id_of(&api.network("n").await);
    let subnet = id_of(&api.subnet(&net, "10.1.0.0/24").await);
    let port = id_of(&api.port(&net).await);
    let sg = id_of(
        &api.create("security-groups", "security_group", json!({"name": "web"}))
            .await,
    );
    let rule = id_of(
        &api.create(
            "security-group-rules",
            "security_group_rule",
            json!({"security_group_id": sg, "direction": "ingress", "protocol": "tcp",
                   "port_range_min": 80, "port_range_max": 80}),
        )
        .await,
    );
    let router = id_of(&api.create("routers", "router", json!({"name": "r"})).await);
    let (s, b) = api
        .put(
            &format!("/v2.0/routers/{router}/add_router_interface"),
            json!({"subnet_id": subnet}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    Estate {
        net,
        subnet,
        port,
        sg,
        rule,
        router,
    }
}

/// Every write the Neutron API offers on `e`, each expected to be refused with 403.
/// `hidden`: the caller cannot read the objects either, so writes to existing ones may also
/// answer 404 (they do not exist for it), as Neutron does.
async fn assert_every_write_refused(api: &Api, e: &Estate, who: &str, hidden: bool) {
    let writes: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::POST,
            "/v2.0/networks".into(),
            Some(json!({"network": {"name": "x"}})),
        ),
        (
            Method::POST,
            "/v2.0/networks".into(),
            Some(json!({"networks": [{"name": "x"}]})),
        ),
        (
            Method::PUT,
            format!("/v2.0/networks/{}", e.net),
            Some(json!({"network": {"name": "x"}})),
        ),
        (Method::DELETE, format!("/v2.0/networks/{}", e.net), None),
        (
            Method::POST,
            "/v2.0/subnets".into(),
            Some(json!({"subnet": {"network_id": e.net, "cidr": "10.2.0.0/24", "ip_version": 4}})),
        ),
        (
            Method::PUT,
            format!("/v2.0/subnets/{}", e.subnet),
            Some(json!({"subnet": {"name": "x"}})),
        ),
        (Method::DELETE, format!("/v2.0/subnets/{}", e.subnet), None),
        (
            Method::POST,
            "/v2.0/ports".into(),
            Some(json!({"port": {"network_id": e.net}})),
        ),
        (
            Method::PUT,
            format!("/v2.0/ports/{}", e.port),
            Some(json!({"port": {"name": "x"}})),
        ),
        (Method::DELETE, format!("/v2.0/ports/{}", e.port), None),
        (
            Method::POST,
            "/v2.0/security-groups".into(),
            Some(json!({"security_group": {"name": "x"}})),
        ),
        (
            Method::PUT,
            format!("/v2.0/security-groups/{}", e.sg),
            Some(json!({"security_group": {"name": "x"}})),
        ),
        (Method::DELETE, format!("/v2.0/security-groups/{}", e.sg), None),
        (
            Method::POST,
            "/v2.0/security-group-rules".into(),
            Some(json!({"security_group_rule": {"security_group_id": e.sg, "direction": "egress", "protocol": "udp"}})),
        ),
        (Method::DELETE, format!("/v2.0/security-group-rules/{}", e.rule), None),
        (
            Method::POST,
            "/v2.0/routers".into(),
            Some(json!({"router": {"name": "x"}})),
        ),
        (
            Method::PUT,
            format!("/v2.0/routers/{}", e.router),
            Some(json!({"router": {"name": "x"}})),
        ),
        (Method::DELETE, format!("/v2.0/routers/{}", e.router), None),
        (
            Method::PUT,
            format!("/v2.0/routers/{}/add_router_interface", e.router),
            Some(json!({"port_id": e.port})),
        ),
        (
            Method::PUT,
            format!("/v2.0/routers/{}/remove_router_interface", e.router),
            Some(json!({"subnet_id": e.subnet})),
        ),
        (
            Method::PUT,
            format!("/v2.0/networks/{}/tags", e.net),
            Some(json!({"tags": ["x"]})),
        ),
        (Method::PUT, format!("/v2.0/ports/{}/tags/x", e.port), None),
        (Method::DELETE, format!("/v2.0/subnets/{}/tags", e.subnet), None),
        (Method::DELETE, format!("/v2.0/routers/{}/tags/keep", e.router), None),
    ];
    for (method, path, body) in writes {
        let (s, b) = api.call(method.clone(), &path, body).await;
        if hidden && s == StatusCode::NOT_FOUND {
            assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);
            continue;
        }
        assert_policy_denied(s, &b, &format!("{who}: {method} {path}"));
    }
}

/// What a project holds, to compare before and after refused writes.
async fn snapshot(api: &Api) -> Vec<Value> {
    let mut out = vec![];
    for (path, plural) in [
        ("/v2.0/networks", "networks"),
        ("/v2.0/subnets", "subnets"),
        ("/v2.0/ports", "ports"),
        ("/v2.0/security-groups", "security_groups"),
        ("/v2.0/security-group-rules", "security_group_rules"),
        ("/v2.0/routers", "routers"),
    ] {
        let mut items = api.list(path, plural).await;
        items.sort_by_key(id_of);
        out.push(Value::Array(items));
    }
    out
}

#[tokio::test]
async fn a_reader_reads_and_every_write_is_403() {
    let s = TestServer::start(Backend::Embedded).await;
    let owner = s.member("owner").await;
    let e = estate(&owner.api).await;
    let (st, b) = owner
        .api
        .put_empty(&format!("/v2.0/routers/{}/tags/keep", e.router))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let reader = user_with_role(&s, "auditor", "reader", &owner.project_id, &owner.project).await;

    // Reads: the project's resources, as the member sees them.
    let before = snapshot(&owner.api).await;
    assert_eq!(snapshot(&reader).await, before);
    let (st, b) = reader.get(&format!("/v2.0/ports/{}", e.port)).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let (st, b) = reader.get(&format!("/v2.0/networks/{}/tags", e.net)).await;
    assert_eq!(st, StatusCode::OK, "{b}");

    // Neutron's own words for a reader creating a network.
    let (st, b) = reader.post("/v2.0/networks", json!({"network": {"name": "x"}})).await;
    assert_policy_denied(st, &b, "create network");
    assert_eq!(error_message(&b), "rule:create_network is disallowed by policy");

    assert_every_write_refused(&reader, &e, "reader", false).await;
    assert_eq!(snapshot(&owner.api).await, before, "nothing changed");

    // The member of the same project still writes.
    let (st, b) = owner
        .api
        .put(
            &format!("/v2.0/networks/{}", e.net),
            json!({"network": {"name": "renamed"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn a_node_user_uses_the_node_api_and_never_reads_or_writes_through_neutron() {
    let s = TestServer::start(Backend::Embedded).await;
    let node = node_api(&s, "node-a").await;
    // The node's own project (service) holds resources an admin made there.
    let (_, b) = s.identity(Method::GET, "/projects?name=service", None).await;
    let service = b["projects"][0]["id"].as_str().expect("service").to_string();
    let admin = &s.admin;
    let net = id_of(
        &admin
            .create("networks", "network", json!({"name": "svc", "project_id": service}))
            .await,
    );
    let subnet = id_of(
        &admin
            .create(
                "subnets",
                "subnet",
                json!({"network_id": net, "cidr": "10.1.0.0/24", "ip_version": 4, "project_id": service}),
            )
            .await,
    );
    let port = id_of(
        &admin
            .create("ports", "port", json!({"network_id": net, "project_id": service}))
            .await,
    );
    let sg = id_of(
        &admin
            .create(
                "security-groups",
                "security_group",
                json!({"name": "web", "project_id": service}),
            )
            .await,
    );
    let rule = id_of(
        &admin
            .create(
                "security-group-rules",
                "security_group_rule",
                json!({"security_group_id": sg, "direction": "ingress", "project_id": service}),
            )
            .await,
    );
    let router = id_of(
        &admin
            .create("routers", "router", json!({"name": "r", "project_id": service}))
            .await,
    );
    let e = Estate {
        net,
        subnet,
        port,
        sg,
        rule,
        router,
    };

    // It reads nothing through Neutron, not even its own project (a project granting a node
    // the right to plug its ports does not let it read the project), and writes nothing.
    assert!(snapshot(&node).await.iter().all(|l| l == &json!([])));
    let before = snapshot(admin).await;
    assert_every_write_refused(&node, &e, "node", true).await;
    assert_eq!(snapshot(admin).await, before, "nothing changed");

    // The node API is still open to it.
    let (st, b) = node
        .put(
            "/isthmus/v1/nodes/node-a",
            json!({"node": {"underlay_ip": "192.0.2.10"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let owner = s.member("tenant").await;
    s.grant_node("node-a", &owner.project_id).await;
    let tnet = id_of(&owner.api.network("blue").await);
    owner.api.subnet(&tnet, "10.5.0.0/24").await;
    let (st, b) = node
        .post(
            "/isthmus/v1/nodes/node-a/ports",
            json!({"port": {"project": owner.project, "network": "blue", "device_owner": "isthmus:cni"}}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let pid = id_of(&b["port"]);
    let (st, b) = node.delete(&format!("/isthmus/v1/nodes/node-a/ports/{pid}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{b}");
}

/// A network of `owner`'s project, shared by the admin, with subnet 10.9.0.0/24.
async fn shared_network(s: &TestServer, owner: &Api) -> (String, String) {
    let net = id_of(&owner.network("shared").await);
    let (st, b) = s
        .admin
        .put(&format!("/v2.0/networks/{net}"), json!({"network": {"shared": true}}))
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let sub = id_of(&owner.subnet(&net, "10.9.0.0/24").await);
    (net, sub)
}

async fn ports_on(s: &TestServer, net: &str) -> Vec<Value> {
    s.admin.list(&format!("/v2.0/ports?network_id={net}"), "ports").await
}

#[tokio::test]
async fn others_on_a_shared_network_may_not_choose_addresses_macs_pairs_security_or_owner() {
    let s = TestServer::start(Backend::Embedded).await;
    let owner = s.member("owner").await;
    let guest = s.member("guest").await;
    let third = s.member("third").await;
    let (net, sub) = shared_network(&s, &owner.api).await;

    let forbidden = [
        (
            "gateway ip",
            json!({"fixed_ips": [{"subnet_id": sub, "ip_address": "10.9.0.1"}]}),
            "fixed_ips:ip_address",
        ),
        (
            "chosen ip",
            json!({"fixed_ips": [{"ip_address": "10.9.0.50"}]}),
            "fixed_ips:ip_address",
        ),
        ("mac", json!({"mac_address": "fa:16:3e:00:00:01"}), "mac_address"),
        (
            "address pairs",
            json!({"allowed_address_pairs": [{"ip_address": "0.0.0.0/0"}]}),
            "allowed_address_pairs",
        ),
        (
            "port security off",
            json!({"port_security_enabled": false}),
            "port_security_enabled",
        ),
        ("network owner", json!({"device_owner": "network:dhcp"}), "device_owner"),
    ];
    for (what, attrs, rule) in &forbidden {
        let mut port = attrs.clone();
        port["network_id"] = json!(net);
        let (st, b) = guest.api.post("/v2.0/ports", json!({ "port": port })).await;
        assert_policy_denied(st, &b, what);
        assert_eq!(
            error_message(&b),
            format!("(rule:create_port and rule:create_port:{rule}) is disallowed by policy"),
            "{what}"
        );
        assert!(ports_on(&s, &net).await.is_empty(), "{what}: nothing created");
    }
    // A router interface by subnet would take the gateway address: refused too.
    let router = id_of(&guest.api.create("routers", "router", json!({"name": "r"})).await);
    let (st, b) = guest
        .api
        .put(
            &format!("/v2.0/routers/{router}/add_router_interface"),
            json!({"subnet_id": sub}),
        )
        .await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, None);
    assert!(ports_on(&s, &net).await.is_empty(), "no interface port");

    // What a guest may do: a port with a subnet picked, a plain one, a compute owner.
    for attrs in [
        json!({"fixed_ips": [{"subnet_id": sub}]}),
        json!({}),
        json!({"device_owner": "compute:nova", "name": "vm"}),
    ] {
        let mut port = attrs.clone();
        port["network_id"] = json!(net);
        guest.api.create("ports", "port", port).await;
    }
    assert_eq!(ports_on(&s, &net).await.len(), 3);

    // The network's owner may do each of the forbidden things.
    for (what, attrs, _) in &forbidden {
        let mut port = attrs.clone();
        port["network_id"] = json!(net);
        let (st, b) = owner.api.post("/v2.0/ports", json!({ "port": port })).await;
        assert_eq!(st, StatusCode::CREATED, "owner, {what}: {b}");
        // Free the address and MAC for the next one.
        let (st, _) = owner.api.delete(&format!("/v2.0/ports/{}", id_of(&b["port"]))).await;
        assert_eq!(st, StatusCode::NO_CONTENT);
    }
    // And so may an admin, for anyone.
    s.admin
        .create(
            "ports",
            "port",
            json!({"network_id": net, "project_id": guest.project_id, "mac_address": "fa:16:3e:00:00:09",
                   "fixed_ips": [{"ip_address": "10.9.0.209"}]}),
        )
        .await;

    // Updates of the guest's own port follow the same rules.
    let gport = id_of(&guest.api.port(&net).await);
    let path = format!("/v2.0/ports/{gport}");
    let (_, before) = s.admin.get(&path).await;
    for (what, attrs, rule) in [
        (
            "chosen ip",
            json!({"fixed_ips": [{"subnet_id": sub, "ip_address": "10.9.0.60"}]}),
            "fixed_ips:ip_address",
        ),
        (
            "address pairs",
            json!({"allowed_address_pairs": [{"ip_address": "0.0.0.0/0"}]}),
            "allowed_address_pairs",
        ),
        (
            "port security off",
            json!({"port_security_enabled": false, "security_groups": []}),
            "port_security_enabled",
        ),
        (
            "network owner",
            json!({"device_owner": "network:router_interface"}),
            "device_owner",
        ),
    ] {
        let (st, b) = guest.api.put(&path, json!({ "port": attrs })).await;
        assert_policy_denied(st, &b, what);
        assert_eq!(
            error_message(&b),
            format!("(rule:update_port and rule:update_port:{rule}) is disallowed by policy"),
            "{what}"
        );
    }
    let (st, b) = guest
        .api
        .put(&path, json!({"port": {"mac_address": "fa:16:3e:00:00:02"}}))
        .await;
    assert_policy_denied(st, &b, "mac change");
    assert_eq!(s.admin.get(&path).await.1, before, "the port is unchanged");
    let (st, b) = guest
        .api
        .put(
            &path,
            json!({"port": {"name": "mine", "fixed_ips": [{"subnet_id": sub}]}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");

    // The network's owner sees the guest's port but may not change it (403, as Neutron);
    // a third project does not see it at all (404).
    let (st, _) = owner.api.get(&path).await;
    assert_eq!(st, StatusCode::OK);
    let (st, b) = owner.api.put(&path, json!({"port": {"name": "taken"}})).await;
    assert_policy_denied(st, &b, "owner updates a guest port");
    assert_eq!(error_message(&b), "rule:update_port is disallowed by policy");
    let (st, b) = owner
        .api
        .put(
            &path,
            json!({"port": {"allowed_address_pairs": [{"ip_address": "0.0.0.0/0"}]}}),
        )
        .await;
    assert_policy_denied(st, &b, "owner sets pairs on a guest port");
    let (st, b) = third.api.put(&path, json!({"port": {"name": "taken"}})).await;
    assert_neutron_error(st, &b, StatusCode::NOT_FOUND, Some("PortNotFound"));
    let (st, b) = third.api.delete(&path).await;
    assert_neutron_error(st, &b, StatusCode::NOT_FOUND, Some("PortNotFound"));
    let (_, after) = s.admin.get(&path).await;
    assert_eq!(after["port"]["name"], "mine");
    assert_eq!(after["port"]["allowed_address_pairs"], json!([]));
    // Neutron's delete_port lets the network's owner remove ports from its network.
    let (st, b) = owner.api.delete(&path).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{b}");
}

/// `n` distinct short tags.
fn tags(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t{i}")).collect()
}

#[tokio::test]
async fn huge_lists_are_refused_at_once() {
    let s = TestServer::start_with(Backend::Embedded, |c| c.max_body_bytes = 16 << 20).await;
    let m = s.member("big").await;
    let net = id_of(&m.api.network("n").await);
    m.api.subnet(&net, "10.3.0.0/24").await;
    let port = id_of(&m.api.port(&net).await);
    let huge = tags(115_000);
    let ids: Vec<String> = (0..115_000)
        .map(|i| format!("00000000-0000-4000-8000-{i:012}"))
        .collect();
    let pairs: Vec<Value> = (0..115_000u32)
        .map(|i| json!({"ip_address": format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)}))
        .collect();
    let cases: Vec<(&str, Method, String, Value, StatusCode, &str)> = vec![
        (
            "network tags",
            Method::POST,
            "/v2.0/networks".into(),
            json!({"network": {"name": "x", "tags": huge}}),
            StatusCode::BAD_REQUEST,
            "TagLimitExceeded",
        ),
        (
            "tags API",
            Method::PUT,
            format!("/v2.0/networks/{net}/tags"),
            json!({"tags": huge}),
            StatusCode::BAD_REQUEST,
            "TagLimitExceeded",
        ),
        (
            "port tags",
            Method::PUT,
            format!("/v2.0/ports/{port}"),
            json!({"port": {"tags": huge}}),
            StatusCode::BAD_REQUEST,
            "TagLimitExceeded",
        ),
        (
            "security groups",
            Method::PUT,
            format!("/v2.0/ports/{port}"),
            json!({"port": {"security_groups": ids}}),
            StatusCode::NOT_FOUND,
            "SecurityGroupNotFound",
        ),
        (
            "address pairs",
            Method::PUT,
            format!("/v2.0/ports/{port}"),
            json!({"port": {"allowed_address_pairs": pairs}}),
            StatusCode::BAD_REQUEST,
            "AllowedAddressPairExhausted",
        ),
    ];
    // Not a benchmark: the quadratic scan took ~19 s for 115k tags in a release build; a few
    // seconds leave room for a debug build on a busy machine and still catch it.
    let bound = Duration::from_secs(5);
    for (what, method, path, body, want, kind) in cases {
        let started = Instant::now();
        let (st, b) = m.api.call(method, &path, Some(body)).await;
        let took = started.elapsed();
        assert_neutron_error(st, &b, want, Some(kind));
        assert!(took < bound, "{what}: answered in {took:?}");
    }
    // The same tag 115,000 times: refused at once as a list with duplicates, named once.
    let started = Instant::now();
    let (st, b) = m
        .api
        .put(
            &format!("/v2.0/networks/{net}/tags"),
            json!({"tags": vec!["same"; 115_000]}),
        )
        .await;
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    assert_eq!(
        error_message(&b),
        "Invalid input for operation: Duplicate items in the list: 'same'."
    );
}

#[tokio::test]
async fn limits_hold_exactly_at_the_bound() {
    let s = TestServer::start(Backend::Embedded).await;
    let m = s.member("limits").await;
    let net = id_of(&m.api.network("n").await);
    let sub = id_of(&m.api.subnet(&net, "10.4.0.0/24").await);

    // Fixed IPs: 5 per port.
    let ips = |n: usize| -> Vec<Value> { (0..n).map(|_| json!({"subnet_id": sub})).collect() };
    let p = m
        .api
        .create("ports", "port", json!({"network_id": net, "fixed_ips": ips(5)}))
        .await;
    assert_eq!(p["fixed_ips"].as_array().map(Vec::len), Some(5));
    let (st, b) = m
        .api
        .post("/v2.0/ports", json!({"port": {"network_id": net, "fixed_ips": ips(6)}}))
        .await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    assert_eq!(
        error_message(&b),
        "Invalid input for operation: Exceeded maximum amount of fixed ips per port.."
    );
    let path = format!("/v2.0/ports/{}", id_of(&p));
    let (st, b) = m.api.put(&path, json!({"port": {"fixed_ips": ips(6)}})).await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    assert_eq!(m.api.list("/v2.0/ports", "ports").await.len(), 1);

    // Allowed address pairs: 10 per port.
    let pairs = |n: usize| -> Vec<Value> { (0..n).map(|i| json!({"ip_address": format!("192.0.2.{i}")})).collect() };
    let (st, b) = m
        .api
        .put(&path, json!({"port": {"allowed_address_pairs": pairs(10)}}))
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let (st, b) = m
        .api
        .put(&path, json!({"port": {"allowed_address_pairs": pairs(11)}}))
        .await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some("AllowedAddressPairExhausted"));
    assert_eq!(
        error_message(&b),
        "The number of allowed address pair exceeds the maximum 10."
    );
    let (st, b) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net, "allowed_address_pairs": pairs(11)}}),
        )
        .await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some("AllowedAddressPairExhausted"));
    let (_, got) = m.api.get(&path).await;
    assert_eq!(got["port"]["allowed_address_pairs"].as_array().map(Vec::len), Some(10));

    // Tags: 50 per resource, 255 characters each (Neutron's limits), in bodies and the tags API.
    let n50 = m
        .api
        .create("networks", "network", json!({"name": "t", "tags": tags(50)}))
        .await;
    assert_eq!(n50["tags"], json!(tags(50)), "order kept");
    let (st, b) = m
        .api
        .post("/v2.0/networks", json!({"network": {"tags": tags(51)}}))
        .await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some("TagLimitExceeded"));
    let long = "x".repeat(255);
    let too_long = "x".repeat(256);
    let (st, b) = m.api.post("/v2.0/networks", json!({"network": {"tags": [long]}})).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let (st, b) = m
        .api
        .post("/v2.0/networks", json!({"network": {"tags": [too_long]}}))
        .await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    assert_eq!(m.api.list("/v2.0/networks", "networks").await.len(), 3);

    let tpath = format!("/v2.0/networks/{net}/tags");
    let (st, b) = m.api.put(&tpath, json!({"tags": tags(51)})).await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some("TagLimitExceeded"));
    let (st, b) = m.api.put(&tpath, json!({"tags": tags(50)})).await;
    assert_eq!((st, &b), (StatusCode::OK, &json!({"tags": tags(50)})));
    // One more by name: refused; one already there: fine; over-long: refused.
    let (st, b) = m.api.put_empty(&format!("{tpath}/extra")).await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some("TagLimitExceeded"));
    let (st, b) = m.api.put_empty(&format!("{tpath}/t7")).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let (st, b) = m.api.delete(&format!("{tpath}/t7")).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "{b}");
    let (st, b) = m.api.put_empty(&format!("{tpath}/{}", "y".repeat(256))).await;
    assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    let (st, b) = m.api.put_empty(&format!("{tpath}/{}", "y".repeat(255))).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let (_, b) = m.api.get(&tpath).await;
    assert_eq!(b["tags"].as_array().map(Vec::len), Some(50));
}

#[tokio::test]
async fn limits_come_from_the_config() {
    let s = TestServer::start_with(Backend::Embedded, |c| {
        c.max_tags_per_resource = 2;
        c.max_tag_length = 3;
        c.max_fixed_ips_per_port = 1;
        c.max_allowed_address_pair = 1;
    })
    .await;
    let m = s.member("cfg").await;
    let net = id_of(&m.api.network("n").await);
    let sub = id_of(&m.api.subnet(&net, "10.4.0.0/24").await);
    for (body, kind) in [
        (json!({"network": {"tags": ["a", "b", "c"]}}), "TagLimitExceeded"),
        (json!({"network": {"tags": ["abcd"]}}), "InvalidInput"),
    ] {
        let (st, b) = m.api.post("/v2.0/networks", body).await;
        assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some(kind));
    }
    m.api
        .create("networks", "network", json!({"tags": ["a", "abc", "a"]}))
        .await;
    for (port, kind) in [
        (
            json!({"network_id": net, "fixed_ips": [{"subnet_id": sub}, {"subnet_id": sub}]}),
            "InvalidInput",
        ),
        (
            json!({"network_id": net, "allowed_address_pairs": [{"ip_address": "192.0.2.1"}, {"ip_address": "192.0.2.2"}]}),
            "AllowedAddressPairExhausted",
        ),
    ] {
        let (st, b) = m.api.post("/v2.0/ports", json!({ "port": port })).await;
        assert_neutron_error(st, &b, StatusCode::BAD_REQUEST, Some(kind));
    }
}
