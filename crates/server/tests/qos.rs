//! QoS policies and bandwidth limit rules through the Neutron API (`qos`,
//! `qos-bw-limit-direction`, `qos-default`), on both stores: admin-only writes, visibility,
//! validation, one rule per direction, the project default, attaching to ports and networks,
//! deleting a policy in use, and what a node's stream carries.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{assert_neutron_error, id_of, Backend, TestServer};

async fn scenario(backend: Backend) {
    let server = TestServer::start(backend).await;
    let admin = server.api(&server.admin_token().await);
    let a = server.member("qa").await;
    let b = server.member("qb").await;

    // Advertised.
    for alias in ["qos", "qos-bw-limit-direction", "qos-default"] {
        let (s, body) = a.api.get(&format!("/v2.0/extensions/{alias}")).await;
        assert_eq!(s, StatusCode::OK, "{alias}: {body}");
    }
    let (s, body) = a.api.get("/v2.0/qos/rule-types").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body["rule_types"], json!([{"type": "bandwidth_limit"}]));

    // Members may not create policies (Neutron's default policy: admin only).
    let (s, body) = a
        .api
        .post("/v2.0/qos/policies", json!({"policy": {"name": "mine"}}))
        .await;
    assert_neutron_error(s, &body, StatusCode::FORBIDDEN, None);

    // The admin makes one for project A, one shared, one for project B.
    let pa = admin
        .post(
            "/v2.0/qos/policies",
            json!({"policy": {"name": "a-pol", "project_id": a.project_id, "description": "for a"}}),
        )
        .await;
    assert_eq!(pa.0, StatusCode::CREATED, "{}", pa.1);
    let pa = pa.1["policy"].clone();
    assert_eq!(pa["shared"], false);
    assert_eq!(pa["is_default"], false);
    assert_eq!(pa["rules"], json!([]));
    assert_eq!(pa["project_id"], a.project_id.as_str());
    let pa_id = id_of(&pa);
    let (s, shared) = admin
        .post(
            "/v2.0/qos/policies",
            json!({"policy": {"name": "gold", "shared": true}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{shared}");
    let shared_id = id_of(&shared["policy"]);
    let (s, pb) = admin
        .post(
            "/v2.0/qos/policies",
            json!({"policy": {"name": "b-pol", "project_id": b.project_id}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{pb}");
    let pb_id = id_of(&pb["policy"]);

    // Visibility: own and shared; another project's is a 404.
    let mut seen = a.api.ids("/v2.0/qos/policies", "policies").await;
    seen.sort();
    let mut want = vec![pa_id.clone(), shared_id.clone()];
    want.sort();
    assert_eq!(seen, want);
    let (s, body) = a.api.get(&format!("/v2.0/qos/policies/{pb_id}")).await;
    assert_neutron_error(s, &body, StatusCode::NOT_FOUND, Some("QosPolicyNotFound"));
    let named = a.api.list("/v2.0/qos/policies?name=gold", "policies").await;
    assert_eq!(named.len(), 1);

    // Members may read but not change what they see.
    let (s, body) = a
        .api
        .put(&format!("/v2.0/qos/policies/{pa_id}"), json!({"policy": {"name": "x"}}))
        .await;
    assert_neutron_error(s, &body, StatusCode::FORBIDDEN, None);
    let (s, body) = a.api.delete(&format!("/v2.0/qos/policies/{shared_id}")).await;
    assert_neutron_error(s, &body, StatusCode::FORBIDDEN, None);

    // Rules: validation, one per direction, admin only.
    let rules = format!("/v2.0/qos/policies/{pa_id}/bandwidth_limit_rules");
    for (attrs, why) in [
        (json!({"max_kbps": 1000, "direction": "sideways"}), "unknown direction"),
        (json!({"max_kbps": -1}), "negative max_kbps"),
        (json!({"max_kbps": 1000, "max_burst_kbps": -5}), "negative burst"),
        (json!({"max_kbps": "lots"}), "not an integer"),
        (json!({"max_kbps": 3_000_000_000u64}), "too large"),
        (json!({"max_burst_kbps": 100}), "max_kbps missing"),
        (json!({"max_kbps": 100, "colour": "red"}), "unknown attribute"),
    ] {
        let (s, body) = admin.post(&rules, json!({"bandwidth_limit_rule": attrs})).await;
        assert_neutron_error(s, &body, StatusCode::BAD_REQUEST, None);
        let _ = why;
    }
    let (s, body) = a
        .api
        .post(&rules, json!({"bandwidth_limit_rule": {"max_kbps": 1000}}))
        .await;
    assert_neutron_error(s, &body, StatusCode::FORBIDDEN, None);
    let (s, egress) = admin
        .post(
            &rules,
            json!({"bandwidth_limit_rule": {"max_kbps": 20000, "max_burst_kbps": 400}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{egress}");
    let egress = egress["bandwidth_limit_rule"].clone();
    assert_eq!(egress["direction"], "egress", "egress is the default");
    assert_eq!(egress["qos_policy_id"], pa_id.as_str());
    let (s, body) = admin
        .post(
            &rules,
            json!({"bandwidth_limit_rule": {"max_kbps": 5000, "direction": "egress"}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("QoSRulesConflict"));
    let (s, ingress) = admin
        .post(
            &rules,
            json!({"bandwidth_limit_rule": {"max_kbps": "30000", "direction": "ingress"}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{ingress}");
    let ingress_id = id_of(&ingress["bandwidth_limit_rule"]);
    // Turning the ingress rule into a second egress rule conflicts too.
    let (s, body) = admin
        .put(
            &format!("{rules}/{ingress_id}"),
            json!({"bandwidth_limit_rule": {"direction": "egress"}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("QoSRulesConflict"));
    let (s, body) = admin
        .put(
            &format!("{rules}/{ingress_id}"),
            json!({"bandwidth_limit_rule": {"max_kbps": 25000}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["bandwidth_limit_rule"]["max_kbps"], 25000);
    assert_eq!(a.api.list(&rules, "bandwidth_limit_rules").await.len(), 2);
    let (s, body) = a.api.get(&format!("{rules}/{ingress_id}")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = a
        .api
        .get(&format!("{rules}/{}", "0b5c9f9e-1d7e-4a4e-9a55-2f8f6d1b2c3d"))
        .await;
    assert_neutron_error(s, &body, StatusCode::NOT_FOUND, Some("QosRuleNotFound"));
    let (s, pol) = a.api.get(&format!("/v2.0/qos/policies/{pa_id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(pol["policy"]["rules"].as_array().map(Vec::len), Some(2), "{pol}");
    let (s, body) = b.api.get(&rules).await;
    assert_neutron_error(s, &body, StatusCode::NOT_FOUND, Some("QosPolicyNotFound"));

    // Wrong methods.
    for (m, path) in [
        (Method::PUT, "/v2.0/qos/policies".to_string()),
        (Method::DELETE, rules.clone()),
        (Method::POST, format!("/v2.0/qos/policies/{pa_id}")),
        (Method::POST, "/v2.0/qos/rule-types".to_string()),
    ] {
        let (s, body) = admin.call(m.clone(), &path, Some(json!({}))).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{m} {path}: {body}");
    }

    // Attaching: own policy and shared ones to own ports and networks; others' are 404.
    let net = id_of(&a.api.network("qnet").await);
    a.api.subnet(&net, "10.77.0.0/24").await;
    let (s, body) = a
        .api
        .post(
            "/v2.0/ports",
            json!({"port": {"network_id": net, "qos_policy_id": pa_id}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let port = id_of(&body["port"]);
    assert_eq!(body["port"]["qos_policy_id"], pa_id.as_str());
    let (s, body) = a
        .api
        .put(
            &format!("/v2.0/networks/{net}"),
            json!({"network": {"qos_policy_id": shared_id}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["network"]["qos_policy_id"], shared_id.as_str());
    let (s, body) = a
        .api
        .put(
            &format!("/v2.0/ports/{port}"),
            json!({"port": {"qos_policy_id": pb_id}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::NOT_FOUND, Some("QosPolicyNotFound"));
    let (s, body) = a
        .api
        .put(
            &format!("/v2.0/ports/{port}"),
            json!({"port": {"qos_policy_id": "not-a-uuid"}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::BAD_REQUEST, None);

    // Unsharing is refused while another project uses it.
    let (s, body) = admin
        .put(
            &format!("/v2.0/qos/policies/{shared_id}"),
            json!({"policy": {"shared": false}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("QosPolicyInUse"));

    // In use: refused while the port or the network names it.
    let (s, body) = admin.delete(&format!("/v2.0/qos/policies/{pa_id}")).await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("QosPolicyInUse"));
    let (s, body) = admin.delete(&format!("/v2.0/qos/policies/{shared_id}")).await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("QosPolicyInUse"));
    // The refused delete left the policy attachable.
    let (s, body) = a
        .api
        .put(
            &format!("/v2.0/ports/{port}"),
            json!({"port": {"qos_policy_id": shared_id}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = admin.delete(&format!("/v2.0/qos/policies/{pa_id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    let (s, _) = admin.get(&format!("/v2.0/qos/policies/{pa_id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    for (path, body) in [
        (format!("/v2.0/ports/{port}"), json!({"port": {"qos_policy_id": null}})),
        (
            format!("/v2.0/networks/{net}"),
            json!({"network": {"qos_policy_id": null}}),
        ),
    ] {
        let (s, b2) = a.api.put(&path, body).await;
        assert_eq!(s, StatusCode::OK, "{b2}");
    }
    let (s, body) = admin.delete(&format!("/v2.0/qos/policies/{shared_id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");

    // qos-default: one per project, given to the project's new networks.
    let (s, d) = admin
        .post(
            "/v2.0/qos/policies",
            json!({"policy": {"name": "default", "project_id": b.project_id, "is_default": true}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{d}");
    let d_id = id_of(&d["policy"]);
    let (s, body) = admin
        .post(
            "/v2.0/qos/policies",
            json!({"policy": {"name": "another", "project_id": b.project_id, "is_default": true}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("QoSPolicyDefaultAlreadyExists"));
    let (s, body) = admin
        .put(
            &format!("/v2.0/qos/policies/{pb_id}"),
            json!({"policy": {"is_default": true}}),
        )
        .await;
    assert_neutron_error(s, &body, StatusCode::CONFLICT, Some("QoSPolicyDefaultAlreadyExists"));
    let bn = b.api.network("bnet").await;
    assert_eq!(bn["qos_policy_id"], d_id.as_str(), "{bn}");
    let explicit = b
        .api
        .create("networks", "network", json!({"name": "none", "qos_policy_id": null}))
        .await;
    assert_eq!(explicit["qos_policy_id"], Value::Null);
    let an = a.api.network("anet").await;
    assert_eq!(
        an["qos_policy_id"],
        Value::Null,
        "another project's default is not ours"
    );
    // Moving the default: unset, then set on another policy.
    let (s, body) = admin
        .put(
            &format!("/v2.0/qos/policies/{d_id}"),
            json!({"policy": {"is_default": false}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = admin
        .put(
            &format!("/v2.0/qos/policies/{pb_id}"),
            json!({"policy": {"is_default": true}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["policy"]["is_default"], true);

    // A node's stream carries the policy of its port's network.
    let host = "qos-node";
    let node_api = server.api(&server.node_token(host).await);
    let (s, body) = admin
        .put(
            &format!("/v2.0/ports/{port}"),
            json!({"port": {"binding:host_id": host}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = admin
        .put(
            &format!("/v2.0/networks/{net}"),
            json!({"network": {"qos_policy_id": d_id}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let resp = server.watch(host, None).await;
    let first = first_line(resp).await;
    let kinds: Vec<&str> = first["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"qos_policy"), "{first}");
    drop(node_api);
}

async fn first_line(resp: reqwest::Response) -> Value {
    let mut resp = resp;
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.expect("stream") {
        buf.extend_from_slice(&chunk);
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            return serde_json::from_slice(&buf[..i]).expect("json line");
        }
    }
    panic!("stream ended");
}

#[tokio::test]
async fn qos_policies_rules_and_attachments_embedded() {
    scenario(Backend::Embedded).await;
}

#[tokio::test]
async fn qos_policies_rules_and_attachments_etcd() {
    scenario(Backend::Etcd).await;
}
