//! Neutron behaviours real clients rely on: subnets Neutron refuses, pagination links with
//! filters, filter validation, bulk creates, security group details, the owner of a new
//! resource, and subnets' `shared` filter. Real server on loopback, embedded store.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{assert_neutron_error, error_message, id_of, Backend, TestServer};

async fn server() -> TestServer {
    TestServer::start(Backend::Embedded).await
}

// ----- subnets Neutron refuses -----

#[tokio::test]
async fn loopback_multicast_and_zero_subnets_are_refused() {
    let s = server().await;
    let m = s.member("cidr").await;
    let net = id_of(&m.api.network("n").await);
    let cases = [
        (
            "127.0.0.0/8",
            4,
            "Loopback IP subnet is not supported if enable_dhcp is True",
        ),
        (
            "127.10.0.0/16",
            4,
            "Loopback IP subnet is not supported if enable_dhcp is True",
        ),
        (
            "224.0.0.0/4",
            4,
            "Multicast IP subnet is not supported if enable_dhcp is True",
        ),
        (
            "239.1.2.0/24",
            4,
            "Multicast IP subnet is not supported if enable_dhcp is True",
        ),
        (
            "0.0.0.0/8",
            4,
            "First IP '0.0.0.0' of network is not supported if enable_dhcp is True.",
        ),
        (
            "0.0.0.0/0",
            4,
            "First IP '0.0.0.0' of network is not supported if enable_dhcp is True.",
        ),
        (
            "ff00::/8",
            6,
            "Multicast IP subnet is not supported if enable_dhcp is True",
        ),
        (
            "ff02::/64",
            6,
            "Multicast IP subnet is not supported if enable_dhcp is True",
        ),
        (
            "::1/128",
            6,
            "Subnet has a prefix length that is incompatible with DHCP service enabled",
        ),
        ("::/64", 6, "IPv6 subnet '::' is not supported"),
    ];
    for (cidr, v, msg) in cases {
        let (st, body) = m
            .api
            .post(
                "/v2.0/subnets",
                json!({"subnet": {"network_id": net, "cidr": cidr, "ip_version": v}}),
            )
            .await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, Some("InvalidInput"));
        let got = error_message(&body);
        assert!(got.starts_with("Invalid input for operation: "), "{cidr}: {got}");
        assert!(got.contains(msg), "{cidr}: {got}");
    }
    // Without DHCP, Neutron takes loopback and multicast ranges but never a /0.
    let (st, body) = m
        .api
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": net, "cidr": "0.0.0.0/0", "ip_version": 4, "enable_dhcp": false}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    assert!(
        error_message(&body).contains("0 is not allowed as CIDR prefix length"),
        "{body}"
    );
    let sub = m
        .api
        .create(
            "subnets",
            "subnet",
            json!({"network_id": net, "cidr": "127.0.0.0/8", "ip_version": 4, "enable_dhcp": false}),
        )
        .await;
    // Turning DHCP on then meets the same rule.
    let (st, body) = m
        .api
        .put(
            &format!("/v2.0/subnets/{}", id_of(&sub)),
            json!({"subnet": {"enable_dhcp": true}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, Some("InvalidInput"));
    assert!(error_message(&body).contains("Loopback"), "{body}");
    // Nothing was left behind by the refused creates.
    assert_eq!(m.api.list("/v2.0/subnets", "subnets").await.len(), 1);
}

// ----- pagination links and filters -----

#[tokio::test]
async fn page_links_survive_filters() {
    let s = server().await;
    let m = s.member("pages").await;
    let mut nets = vec![];
    for i in 0..3 {
        let n = id_of(&m.api.network(&format!("n{i}")).await);
        m.api.subnet(&n, &format!("10.{i}.0.0/24")).await;
        m.api.port(&n).await;
        m.api.port(&n).await;
        nets.push(n);
    }
    for (coll, query, total) in [
        ("networks", "shared=False&router:external=False&limit=2", 3),
        (
            "networks",
            "admin_state_up=True&status=ACTIVE&limit=2&sort_key=name&sort_dir=asc",
            3,
        ),
        ("subnets", "ip_version=4&enable_dhcp=True&limit=2", 3),
        ("ports", "admin_state_up=True&limit=2", 6),
        ("ports", "device_owner=&limit=4", 6),
    ] {
        let mut seen: Vec<String> = vec![];
        let mut url = format!("/v2.0/{coll}?{query}");
        for page in 0..10 {
            let (st, body) = m.api.get(&url).await;
            assert_eq!(st, StatusCode::OK, "{url}: {body}");
            let items = body[coll].as_array().expect("items").clone();
            seen.extend(items.iter().map(id_of));
            let next = body[format!("{coll}_links")]
                .as_array()
                .and_then(|l| l.iter().find(|x| x["rel"] == "next"))
                .and_then(|x| x["href"].as_str())
                .map(str::to_string);
            if seen.len() < total {
                let next = next.unwrap_or_else(|| panic!("{coll}?{query} page {page}: no next link: {body}"));
                let (_, rest) = next.split_once("/v2.0/").expect("link path");
                url = format!("/v2.0/{rest}");
            } else {
                break;
            }
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), total, "{coll}?{query}: {seen:?}");
    }
}

/// The walk tempest's pagination tests make: one item per page following `next` links (the
/// last full page has one, leading to an empty page without), then back with `previous`.
#[tokio::test]
async fn page_links_walk_both_ways_like_neutron() {
    let s = server().await;
    let m = s.member("walk").await;
    for i in 0..3 {
        m.api.network(&format!("w{i}")).await;
    }
    // Shared by the admin, so the filter has something to leave out.
    s.admin
        .create("networks", "network", json!({"name": "pub", "shared": true}))
        .await;
    let filters = "shared=False&router:external=False&sort_key=name&sort_dir=asc";
    let links = |body: &Value, rel: &str| -> Option<String> {
        body["networks_links"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["rel"] == rel))
            .and_then(|x| x["href"].as_str())
            .map(|h| format!("/v2.0/{}", h.split_once("/v2.0/").expect("link path").1))
    };
    let mut forward = vec![];
    let mut url = format!("/v2.0/networks?limit=1&{filters}");
    for i in 0..3 {
        let (st, body) = m.api.get(&url).await;
        assert_eq!(st, StatusCode::OK, "{url}: {body}");
        let items = body["networks"].as_array().expect("items");
        assert_eq!(items.len(), 1, "page {i}: {body}");
        forward.push(items[0]["name"].as_str().expect("name").to_string());
        url = links(&body, "next").unwrap_or_else(|| panic!("page {i} (full) has no next link: {body}"));
    }
    assert_eq!(forward, ["w0", "w1", "w2"]);
    let (_, mut current) = m.api.get(&url).await;
    assert_eq!(current["networks"].as_array().map(Vec::len), Some(0), "{current}");
    assert!(
        links(&current, "next").is_none(),
        "the empty page has a next link: {current}"
    );
    let mut backward = vec![];
    for i in 0..3 {
        url = links(&current, "previous").unwrap_or_else(|| panic!("step {i}: no previous link: {current}"));
        let (st, page) = m.api.get(&url).await;
        assert_eq!(st, StatusCode::OK, "{url}: {page}");
        let items = page["networks"].as_array().expect("items");
        assert_eq!(items.len(), 1, "{url}: {page}");
        backward.push(items[0]["name"].as_str().expect("name").to_string());
        current = page;
    }
    backward.reverse();
    assert_eq!(backward, forward);

    // The filter leaves 3 of the 4 visible networks: a page of 3 is full, so it links on.
    let (_, body) = m.api.get(&format!("/v2.0/networks?limit=3&{filters}")).await;
    assert_eq!(body["networks"].as_array().map(Vec::len), Some(3), "{body}");
    assert!(links(&body, "next").is_some(), "{body}");
}

#[tokio::test]
async fn unknown_filters_are_refused_as_neutron_does() {
    let s = server().await;
    let m = s.member("filters").await;
    m.api.network("n").await;
    let (st, body) = m.api.get("/v2.0/networks?bogus=1&limit=1").await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert_eq!(
        error_message(&body),
        "['bogus'] is invalid attribute for filtering",
        "{body}"
    );
    // Known filters, pagination, sorting, fields and tag filters are all fine.
    for q in [
        "name=n&fields=id&fields=name",
        "tags=a&not-tags-any=b&sort_key=name&sort_dir=desc",
        "project_id=x&tenant_id=x&description=&revision_number=1",
        "provider:network_type=vxlan",
    ] {
        let (st, body) = m.api.get(&format!("/v2.0/networks?{q}")).await;
        assert_eq!(st, StatusCode::OK, "{q}: {body}");
    }
    let (st, body) = m.api.get("/v2.0/ports?fixed_ips=subnet_id%3Dx&mac_address=aa").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, body) = m.api.get("/v2.0/subnets?shared=True&cidr=10.0.0.0/24").await;
    assert_eq!(st, StatusCode::OK, "{body}");
}

// ----- bulk creates -----

#[tokio::test]
async fn bulk_create_security_groups_and_rules() {
    let s = server().await;
    let m = s.member("bulk").await;
    let (st, body) = m
        .api
        .post(
            "/v2.0/security-groups",
            json!({"security_groups": [{"name": "web"}, {"name": "db", "description": "d"}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let groups = body["security_groups"].as_array().expect("list").clone();
    assert_eq!(groups.len(), 2, "{body}");
    assert_eq!(groups[0]["name"], "web");
    assert_eq!(groups[1]["description"], "d");
    let web = id_of(&groups[0]);

    let (st, body) = m
        .api
        .post(
            "/v2.0/security-group-rules",
            json!({"security_group_rules": [
                {"security_group_id": web, "direction": "ingress", "protocol": "tcp",
                 "port_range_min": 80, "port_range_max": 80},
                {"security_group_id": web, "direction": "ingress", "ethertype": "IPv6",
                 "protocol": "ipv6-icmp"},
            ]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["security_group_rules"].as_array().map(Vec::len), Some(2), "{body}");
    let (_, g) = m.api.get(&format!("/v2.0/security-groups/{web}")).await;
    // Two egress defaults plus the two new rules.
    assert_eq!(
        g["security_group"]["security_group_rules"].as_array().map(Vec::len),
        Some(4),
        "{g}"
    );

    // All or nothing: a bad item leaves nothing behind.
    let before = m.api.list("/v2.0/security-groups", "security_groups").await.len();
    let (st, body) = m
        .api
        .post(
            "/v2.0/security-groups",
            json!({"security_groups": [{"name": "ok"}, {"name": "bad", "bogus": 1}]}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert_eq!(
        m.api.list("/v2.0/security-groups", "security_groups").await.len(),
        before
    );

    // Items wrapped in their singular name are taken too, as Neutron takes them.
    let (st, body) = m
        .api
        .post(
            "/v2.0/security-groups",
            json!({"security_groups": [{"security_group": {"name": "wrapped"}}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["security_groups"][0]["name"], "wrapped", "{body}");
    let (st, body) = m
        .api
        .post(
            "/v2.0/security-group-rules",
            json!({"security_group_rules": [{"security_group_rule": {
                "security_group_id": web, "direction": "egress", "protocol": "udp",
                "port_range_min": 53, "port_range_max": 53}}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    // An empty list, and routers (Neutron has no bulk for them): 400.
    let (st, body) = m
        .api
        .post("/v2.0/security-groups", json!({"security_groups": []}))
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert_eq!(error_message(&body), "Resources required");
    let (st, body) = m
        .api
        .post("/v2.0/routers", json!({"routers": [{"name": "r1"}, {"name": "r2"}]}))
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert_eq!(error_message(&body), "Bulk operation not supported");
    assert!(m.api.list("/v2.0/routers", "routers").await.is_empty());

    // Other bulk-capable collections.
    let (st, body) = m
        .api
        .post("/v2.0/networks", json!({"networks": [{"name": "a"}, {"name": "b"}]}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let a = id_of(&body["networks"][0]);
    let (st, body) = m
        .api
        .post(
            "/v2.0/subnets",
            json!({"subnets": [{"network_id": a, "cidr": "10.1.0.0/24", "ip_version": 4},
                               {"network_id": a, "cidr": "fd00:1::/64", "ip_version": 6}]}),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let (st, body) = m
        .api
        .post("/v2.0/ports", json!({"ports": [{"network_id": a}, {"network_id": a}]}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    assert_eq!(body["ports"].as_array().map(Vec::len), Some(2), "{body}");
}

// ----- security group details -----

#[tokio::test]
async fn port_with_the_same_security_group_twice_is_400() {
    let s = server().await;
    let m = s.member("dupsg").await;
    let net = id_of(&m.api.network("n").await);
    m.api.subnet(&net, "10.0.0.0/24").await;
    let sg = id_of(
        &m.api
            .create("security-groups", "security_group", json!({"name": "g"}))
            .await,
    );
    let port = id_of(&m.api.port(&net).await);
    let (st, body) = m
        .api
        .put(
            &format!("/v2.0/ports/{port}"),
            json!({"port": {"security_groups": [sg, sg]}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    assert_eq!(
        error_message(&body),
        format!("Invalid input for security_groups. Reason: Duplicate items in the list: '{sg}'.")
    );
    let (st, body) = m
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net, "security_groups": [sg, sg]}}),
        )
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
    let (st, body) = m
        .api
        .put(
            &format!("/v2.0/ports/{port}"),
            json!({"port": {"security_groups": [sg]}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
}

async fn rule(api: &support::Api, sg: &str, ethertype: &str, protocol: Value) -> (StatusCode, Value) {
    api.post(
        "/v2.0/security-group-rules",
        json!({"security_group_rule": {"security_group_id": sg, "direction": "ingress",
                                       "ethertype": ethertype, "protocol": protocol}}),
    )
    .await
}

#[tokio::test]
async fn ipv6_rule_protocols_follow_neutron() {
    let s = server().await;
    let m = s.member("v6proto").await;
    // A group per spelling: more than Neutron's default of ten groups.
    let (st, b) = s
        .admin
        .put(
            &format!("/v2.0/quotas/{}", m.project_id),
            json!({"quota": {"security_group": -1}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let mut created = 0;
    // Each spelling Neutron takes for ICMPv6 on an IPv6 rule, and what it stores.
    for (given, stored) in [
        (json!("ipv6-icmp"), "ipv6-icmp"),
        (json!("icmpv6"), "ipv6-icmp"),
        (json!("ICMP"), "ipv6-icmp"),
        (json!("58"), "58"),
        (json!(58), "58"),
        (json!("1"), "58"),
        (json!("ipv6-frag"), "ipv6-frag"),
        (json!("ipv6-route"), "ipv6-route"),
        (json!("ipv6-nonxt"), "ipv6-nonxt"),
        (json!("ipv6-opts"), "ipv6-opts"),
        (json!("ipv6-encap"), "ipv6-encap"),
        (json!("ip"), "ip"),
        (json!("tcp"), "tcp"),
    ] {
        // A fresh group each time: several spellings are the same rule.
        let sg = id_of(
            &m.api
                .create("security-groups", "security_group", json!({"name": "g"}))
                .await,
        );
        let (st, body) = rule(&m.api, &sg, "IPv6", given.clone()).await;
        assert_eq!(st, StatusCode::CREATED, "{given}: {body}");
        assert_eq!(body["security_group_rule"]["protocol"], stored, "{given}: {body}");
        created += 1;
    }
    assert!(created > 0);

    // The spellings of one protocol are one rule: a second is a duplicate.
    let sg = id_of(
        &m.api
            .create("security-groups", "security_group", json!({"name": "dups"}))
            .await,
    );
    let (st, body) = rule(&m.api, &sg, "IPv6", json!("icmp")).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    for again in [json!("ipv6-icmp"), json!("icmpv6"), json!("58")] {
        let (st, body) = rule(&m.api, &sg, "IPv6", again.clone()).await;
        assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("SecurityGroupRuleExists"));
    }
    let (st, body) = rule(&m.api, &sg, "IPv4", json!("tcp")).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let (st, body) = rule(&m.api, &sg, "IPv4", json!("6")).await;
    assert_neutron_error(st, &body, StatusCode::CONFLICT, Some("SecurityGroupRuleExists"));

    // IPv6-only protocols on an IPv4 rule are refused.
    for p in [
        json!("ipv6-icmp"),
        json!("icmpv6"),
        json!("58"),
        json!("ipv6-frag"),
        json!(43),
    ] {
        let (st, body) = rule(&m.api, &sg, "IPv4", p.clone()).await;
        assert_neutron_error(
            st,
            &body,
            StatusCode::BAD_REQUEST,
            Some("SecurityGroupEthertypeConflictWithProtocol"),
        );
        assert!(
            error_message(&body).contains("Invalid ethertype IPv4 for protocol"),
            "{p}: {body}"
        );
    }
    // Unknown names and numbers out of range stay refused.
    for p in [json!("bogus"), json!(256), json!("-1")] {
        let (st, body) = rule(&m.api, &sg, "IPv6", p.clone()).await;
        assert_neutron_error(
            st,
            &body,
            StatusCode::BAD_REQUEST,
            Some("SecurityGroupRuleInvalidProtocol"),
        );
    }
}

// ----- who owns a new resource -----

#[tokio::test]
async fn admin_create_project_null_unknown_and_other() {
    let s = server().await;
    let m = s.member("owner").await;
    for attr in ["project_id", "tenant_id"] {
        let (st, body) = s
            .admin
            .post("/v2.0/networks", json!({"network": {"name": "x", attr: null}}))
            .await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
        assert_eq!(
            error_message(&body),
            "Invalid input for tenant_id. Reason: 'None' is not a valid string.",
            "{attr}: {body}"
        );
    }
    // A project identity does not know: 400, for every kind of resource.
    let ghost = "0123456789abcdef0123456789abcdef";
    let net_of_member = id_of(&m.api.network("mine").await);
    m.api.subnet(&net_of_member, "10.0.0.0/24").await;
    for (coll, singular, attrs) in [
        ("networks", "network", json!({"name": "g"})),
        ("ports", "port", json!({"network_id": net_of_member})),
        ("security-groups", "security_group", json!({"name": "g"})),
        ("routers", "router", json!({"name": "g"})),
    ] {
        let mut attrs = attrs;
        attrs["project_id"] = json!(ghost);
        let (st, body) = s.admin.post(&format!("/v2.0/{coll}"), json!({ singular: attrs })).await;
        assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
        assert!(error_message(&body).contains(ghost), "{coll}: {body}");
    }
    // An existing project: created there.
    let net = s
        .admin
        .create(
            "networks",
            "network",
            json!({"name": "for-member", "project_id": m.project_id}),
        )
        .await;
    assert_eq!(net["project_id"], json!(m.project_id));
    assert_eq!(net["tenant_id"], json!(m.project_id));
    // A member naming another project: 400, as in Neutron.
    let (st, body) = m
        .api
        .post("/v2.0/networks", json!({"network": {"name": "x", "project_id": ghost}}))
        .await;
    assert_neutron_error(st, &body, StatusCode::BAD_REQUEST, None);
}

// ----- subnets' shared filter -----

#[tokio::test]
async fn subnets_filter_on_their_networks_shared_flag() {
    let s = server().await;
    let m = s.member("sharedf").await;
    let shared_net = id_of(
        &s.admin
            .create("networks", "network", json!({"name": "pub", "shared": true}))
            .await,
    );
    let shared_sub = id_of(&s.admin.subnet(&shared_net, "10.9.0.0/24").await);
    let own_net = id_of(&m.api.network("own").await);
    let own_sub = id_of(&m.api.subnet(&own_net, "10.8.0.0/24").await);

    assert_eq!(
        m.api.ids("/v2.0/subnets?shared=True", "subnets").await,
        vec![shared_sub.clone()]
    );
    assert_eq!(
        m.api.ids("/v2.0/subnets?shared=False", "subnets").await,
        vec![own_sub.clone()]
    );
    let mut both = m.api.ids("/v2.0/subnets", "subnets").await;
    both.sort();
    let mut want = vec![shared_sub.clone(), own_sub];
    want.sort();
    assert_eq!(both, want);
    // Like Neutron, the attribute filters but is not shown.
    let subs = m.api.list("/v2.0/subnets?shared=True", "subnets").await;
    assert!(subs[0].get("shared").is_none(), "{subs:?}");
    // It follows the network: unsharing it moves the subnet.
    let (st, body) = s
        .admin
        .put(
            &format!("/v2.0/networks/{shared_net}"),
            json!({"network": {"shared": false}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(s.admin.ids("/v2.0/subnets?shared=True", "subnets").await.is_empty());
    assert!(s
        .admin
        .ids("/v2.0/subnets?shared=False", "subnets")
        .await
        .contains(&shared_sub));
}
