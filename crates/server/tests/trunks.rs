//! Trunks (`trunk`, `trunk-details`) on both store backends: a parent and subports on VLAN
//! ids, Neutron's in-use and validation rules, subports' ownership, `trunk_details` on the
//! parent, other projects kept out, and concurrent adds that may not share a VLAN id or a port.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use support::{assert_neutron_error, id_of, Api, Backend, TestServer};

async fn trunk(api: &Api, attrs: Value) -> (StatusCode, Value) {
    api.post("/v2.0/trunks", json!({ "trunk": attrs })).await
}

fn sub(port: &str, vlan: u32) -> Value {
    json!({"port_id": port, "segmentation_type": "vlan", "segmentation_id": vlan})
}

async fn check(backend: Backend) {
    let server = TestServer::start(backend).await;
    let m = server.member("trunks").await;
    let o = server.member("others").await;
    let net = id_of(&m.api.network("parent-net").await);
    m.api.subnet(&net, "10.70.0.0/24").await;
    let net2 = id_of(&m.api.network("sub-net").await);
    m.api.subnet(&net2, "10.71.0.0/24").await;
    let parent = id_of(&m.api.port(&net).await);
    let s1 = id_of(&m.api.port(&net2).await);
    let s2 = id_of(&m.api.port(&net2).await);
    let s3 = id_of(&m.api.port(&net2).await);

    // Create with one subport.
    let (s, b) = trunk(
        &m.api,
        json!({"name": "t", "port_id": parent, "sub_ports": [sub(&s1, 100)]}),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let t = &b["trunk"];
    let tid = id_of(t);
    assert_eq!(
        (&t["status"], &t["admin_state_up"], &t["port_id"]),
        (&json!("DOWN"), &json!(true), &json!(parent))
    );
    assert_eq!(t["sub_ports"], json!([sub(&s1, 100)]));
    let (_, p) = m.api.get(&format!("/v2.0/ports/{s1}")).await;
    assert_eq!(
        (&p["port"]["device_owner"], &p["port"]["device_id"]),
        (&json!("trunk:subport"), &json!(tid))
    );
    let (_, p) = m.api.get(&format!("/v2.0/ports/{parent}")).await;
    assert_eq!(p["port"]["trunk_details"]["trunk_id"], tid.as_str());
    assert_eq!(p["port"]["trunk_details"]["sub_ports"][0]["segmentation_id"], 100);
    assert!(p["port"]["trunk_details"]["sub_ports"][0]["mac_address"]
        .as_str()
        .is_some_and(|m| m.len() == 17));
    let (_, p) = m.api.get(&format!("/v2.0/ports/{s2}")).await;
    assert!(p["port"].get("trunk_details").is_none(), "{p}");

    // A port is in one trunk at most, as parent or subport.
    let (s, b) = trunk(&m.api, json!({"port_id": parent})).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("TrunkPortInUse"));
    let (s, b) = trunk(&m.api, json!({"port_id": s1})).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("TrunkPortInUse"));
    let add = format!("/v2.0/trunks/{tid}/add_subports");
    let remove = format!("/v2.0/trunks/{tid}/remove_subports");
    let (s, b) = m.api.put(&add, json!({"sub_ports": [sub(&parent, 7)]})).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("PortInUseAsTrunkParent"));
    let (s, b) = m.api.put(&add, json!({"sub_ports": [sub(&s1, 7)]})).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("PortInUseAsSubPort"));
    // VLAN ids are unique per trunk.
    let (s, b) = m.api.put(&add, json!({"sub_ports": [sub(&s2, 100)]})).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("DuplicateSubPort"));
    // Bad input.
    for body in [
        json!({"sub_ports": [{"port_id": s2}]}),
        json!({"sub_ports": [{"port_id": s2, "segmentation_type": "vlan", "segmentation_id": 4095}]}),
        json!({"sub_ports": [{"port_id": s2, "segmentation_type": "vxlan", "segmentation_id": 5}]}),
        json!({"sub_ports": [{"port_id": "nope", "segmentation_type": "vlan", "segmentation_id": 5}]}),
        json!({"sub_ports": [sub(&s2, 5), sub(&s3, 5)]}),
        json!({"sub_ports": "x"}),
        json!({"nothing": []}),
        // This kernel's networks are VXLAN: nothing to inherit a VLAN id from.
        json!({"sub_ports": [{"port_id": s2, "segmentation_type": "inherit"}]}),
    ] {
        let (s, b) = m.api.put(&add, body.clone()).await;
        assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    }
    let (s, b) = trunk(&m.api, json!({"name": "no parent"})).await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let (s, b) = trunk(&m.api, json!({"port_id": s2, "bogus": 1})).await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let (s, b) = m
        .api
        .put(&format!("/v2.0/trunks/{tid}"), json!({"trunk": {"port_id": s2}}))
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    // A failed add changed nothing.
    let (_, b) = m.api.get(&format!("/v2.0/trunks/{tid}/get_subports")).await;
    assert_eq!(b["sub_ports"], json!([sub(&s1, 100)]));

    // Add two, remove one; the removed port is released.
    let (s, b) = m
        .api
        .put(&add, json!({"sub_ports": [sub(&s2, 200), sub(&s3, 300)]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["sub_ports"].as_array().map(Vec::len), Some(3), "{b}");
    let (s, b) = m.api.put(&remove, json!({"sub_ports": [{"port_id": s2}]})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["sub_ports"], json!([sub(&s1, 100), sub(&s3, 300)]));
    let (_, p) = m.api.get(&format!("/v2.0/ports/{s2}")).await;
    assert_eq!(
        (&p["port"]["device_owner"], &p["port"]["device_id"]),
        (&json!(""), &json!(""))
    );
    let (s, b) = m.api.put(&remove, json!({"sub_ports": [{"port_id": s2}]})).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("SubPortNotFound"));

    // Ports in a trunk cannot be deleted.
    let (s, b) = m.api.delete(&format!("/v2.0/ports/{parent}")).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("PortInUseAsTrunkParent"));
    let (s, b) = m.api.delete(&format!("/v2.0/ports/{s3}")).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("PortInUseAsSubPort"));

    // A disabled trunk takes no subport changes.
    let (s, b) = m
        .api
        .put(
            &format!("/v2.0/trunks/{tid}"),
            json!({"trunk": {"admin_state_up": false, "name": "off"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = m.api.put(&add, json!({"sub_ports": [sub(&s2, 400)]})).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("TrunkDisabled"));
    m.api
        .put(
            &format!("/v2.0/trunks/{tid}"),
            json!({"trunk": {"admin_state_up": true}}),
        )
        .await;

    // Another project sees none of it and cannot use the ports.
    let path = format!("/v2.0/trunks/{tid}");
    for (method, p) in [
        (Method::GET, path.clone()),
        (Method::DELETE, path.clone()),
        (Method::GET, format!("{path}/get_subports")),
    ] {
        let (s, b) = o.api.call(method, &p, None).await;
        assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("TrunkNotFound"));
    }
    let (s, b) = o.api.put(&add, json!({"sub_ports": [sub(&s2, 9)]})).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("TrunkNotFound"));
    assert!(o.api.ids("/v2.0/trunks", "trunks").await.is_empty());
    let onet = id_of(&o.api.network("theirs").await);
    o.api.subnet(&onet, "10.72.0.0/24").await;
    let oport = id_of(&o.api.port(&onet).await);
    let (s, b) = trunk(&o.api, json!({"port_id": s2})).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("PortNotFound"));
    let (s, b) = m.api.put(&add, json!({"sub_ports": [sub(&oport, 9)]})).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("PortNotFound"));
    assert_eq!(m.api.ids("/v2.0/trunks", "trunks").await, vec![tid.clone()]);
    let (s, b) = m.api.get(&format!("/v2.0/trunks?port_id={parent}")).await;
    assert_eq!(
        (s, b["trunks"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(1)),
        "{b}"
    );

    // Concurrent adds of different ports on one VLAN id: exactly one wins.
    let racers: Vec<String> = {
        let mut v = vec![];
        for _ in 0..6 {
            v.push(id_of(&m.api.port(&net2).await));
        }
        v
    };
    let mut tasks = vec![];
    for p in &racers {
        let api = m.api.clone();
        let (add, body) = (add.clone(), json!({"sub_ports": [sub(p, 999)]}));
        tasks.push(tokio::spawn(async move { api.put(&add, body).await.0 }));
    }
    let mut ok = 0;
    for t in tasks {
        let s = t.await.expect("task");
        assert!(s == StatusCode::OK || s == StatusCode::CONFLICT, "{s}");
        ok += usize::from(s == StatusCode::OK);
    }
    assert_eq!(ok, 1);
    let (_, b) = m.api.get(&format!("/v2.0/trunks/{tid}/get_subports")).await;
    let on_999: Vec<&Value> = b["sub_ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["segmentation_id"] == 999)
        .collect();
    assert_eq!(on_999.len(), 1, "{b}");

    // Deleting the trunk releases its ports; then they can go.
    let (s, b) = m.api.delete(&path).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    for p in [&parent, &s1, &s3] {
        let (s, b) = m.api.delete(&format!("/v2.0/ports/{p}")).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "{p}: {b}");
    }
    let (s, b) = m.api.get(&path).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("TrunkNotFound"));
}

#[tokio::test]
async fn trunks_on_the_embedded_store() {
    check(Backend::Embedded).await;
}

#[tokio::test]
async fn trunks_on_etcd() {
    check(Backend::Etcd).await;
}
