//! Nodes: an agent registers and heartbeats as itself; admins see it in the agents API.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use support::{Backend, TestServer};

#[tokio::test]
async fn node_registers_heartbeats_and_is_listed_as_an_agent() {
    let server = TestServer::start_with(Backend::Embedded, |c| c.agent_down_secs = 2).await;
    let node = server.api(&server.node_token("node-a").await);

    let (s, b) = node
        .put(
            "/isthmus/v1/nodes/node-a",
            json!({"node": {"underlay_ip": "192.0.2.10", "restarted": true}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["node"]["host"], "node-a");
    assert_eq!(b["node"]["alive"], true);

    // A node may not speak for another node, nor use the admin-only agents API.
    let (s, _) = node
        .put(
            "/isthmus/v1/nodes/node-b",
            json!({"node": {"underlay_ip": "192.0.2.11"}}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The admin-only agents API shows a node nothing.
    let (s, b) = node.get("/v2.0/agents").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["agents"], json!([]));

    // Bad input: a clear 400, nothing stored.
    let (s, _) = node
        .put(
            "/isthmus/v1/nodes/node-a",
            json!({"node": {"underlay_ip": "not-an-ip"}}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = node.put("/isthmus/v1/nodes/node-a", json!({"node": {}})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let agents = server.admin.list("/v2.0/agents", "agents").await;
    assert_eq!(agents.len(), 1);
    let a = &agents[0];
    assert_eq!(a["host"], "node-a");
    assert_eq!(a["configurations"]["underlay_ip"], "192.0.2.10");
    assert_eq!(a["alive"], true);
    let id = a["id"].as_str().expect("agent id").to_string();

    // Without heartbeats it is reported dead; one heartbeat brings it back, same id.
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let (_, b) = server.admin.get(&format!("/v2.0/agents/{id}")).await;
    assert_eq!(b["agent"]["alive"], false, "{b}");
    let (s, b) = node
        .put(
            "/isthmus/v1/nodes/node-a",
            json!({"node": {"underlay_ip": "192.0.2.10"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["node"]["id"], id.as_str());
    assert_eq!(b["node"]["alive"], true);

    // To anyone but an admin, agents do not exist.
    let (s, _) = node.get(&format!("/v2.0/agents/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = node.delete(&format!("/v2.0/agents/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Admins may disable and remove agents.
    let (s, b) = server
        .admin
        .put(
            &format!("/v2.0/agents/{id}"),
            json!({"agent": {"admin_state_up": false}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["agent"]["admin_state_up"], false);
    let (s, _) = server.admin.delete(&format!("/v2.0/agents/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = server.admin.get(&format!("/v2.0/agents/{id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_member_cannot_register_a_node() {
    let server = TestServer::start(Backend::Embedded).await;
    let m = server.member("nodes").await;
    let (s, _) = m
        .api
        .put(
            &format!("/isthmus/v1/nodes/{}", m.user),
            json!({"node": {"underlay_ip": "192.0.2.1"}}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_node_reports_status_of_its_own_ports_only() {
    let server = TestServer::start(Backend::Embedded).await;
    let node = server.api(&server.node_token("node-a").await);
    let user = server.member("owner").await;
    let net = user.api.network("n").await["id"].as_str().expect("id").to_string();
    user.api.subnet(&net, "10.0.0.0/24").await;
    let port = user.api.port(&net).await;
    let pid = port["id"].as_str().expect("id").to_string();
    assert_eq!(port["status"], "DOWN");

    // Unbound: the node cannot claim it.
    let report = json!({"port": {"status": "ACTIVE", "vif_type": "tap", "vif_details": {"bridge_name": "isbr-1"}}});
    let (s, _) = node
        .put(&format!("/isthmus/v1/nodes/node-a/ports/{pid}"), report.clone())
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A node may claim an unbound port explicitly (the attach path) once the port's project
    // granted it...
    let claim = json!({"port": {"bind": true}});
    let (s, _) = node
        .put(&format!("/isthmus/v1/nodes/node-a/ports/{pid}"), claim.clone())
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    server.grant_node("node-a", &user.project_id).await;
    let (s, b) = node
        .put(&format!("/isthmus/v1/nodes/node-a/ports/{pid}"), claim.clone())
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["port"]["binding:host_id"], "node-a");
    // ...but not one bound elsewhere.
    let (s, _) = server
        .admin
        .put(
            &format!("/v2.0/ports/{pid}"),
            json!({"port": {"binding:host_id": "node-z"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = node.put(&format!("/isthmus/v1/nodes/node-a/ports/{pid}"), claim).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Bound to node-a by an admin: now it can, and the owner sees ACTIVE.
    let (s, b) = server
        .admin
        .put(
            &format!("/v2.0/ports/{pid}"),
            json!({"port": {"binding:host_id": "node-a"}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = node
        .put(&format!("/isthmus/v1/nodes/node-a/ports/{pid}"), report.clone())
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (_, b) = user.api.get(&format!("/v2.0/ports/{pid}")).await;
    assert_eq!(b["port"]["status"], "ACTIVE");
    let (_, b) = server.admin.get(&format!("/v2.0/ports/{pid}")).await;
    assert_eq!(b["port"]["binding:vif_type"], "tap");
    assert_eq!(b["port"]["binding:vif_details"]["bridge_name"], "isbr-1");

    // Another node cannot report it; the owner cannot set status through the Neutron API.
    let other = server.api(&server.node_token("node-b").await);
    let (s, _) = other
        .put(&format!("/isthmus/v1/nodes/node-b/ports/{pid}"), report)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = user
        .api
        .put(&format!("/v2.0/ports/{pid}"), json!({"port": {"status": "DOWN"}}))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = node
        .put(
            &format!("/isthmus/v1/nodes/node-a/ports/{pid}"),
            json!({"port": {"status": "WEIRD"}}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_node_creates_and_deletes_ports_bound_to_itself_in_a_named_project() {
    let server = TestServer::start(Backend::Embedded).await;
    let node = server.api(&server.node_token("node-a").await);
    let owner = server.member("owner").await;
    let stranger = server.member("stranger").await;
    let net = owner.api.network("blue").await["id"].as_str().expect("id").to_string();
    owner.api.subnet(&net, "10.0.0.0/24").await;
    let other = stranger.api.network("blue").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    stranger.api.subnet(&other, "10.0.0.0/24").await;
    server.grant_node("node-a", &owner.project_id).await;

    // Project and network by name; a requested address and MAC are honoured.
    let (s, b) = node
        .post(
            "/isthmus/v1/nodes/node-a/ports",
            json!({"port": {"project": owner.project, "network": "blue", "device_owner": "isthmus:cni",
                   "fixed_ips": [{"ip_address": "10.0.0.42"}], "mac_address": "fa:16:3e:00:00:42",
                   "binding:profile": {"cni": {"container_id": "c1", "ifname": "eth0"}}}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let pid = b["port"]["id"].as_str().expect("id").to_string();
    assert_eq!(b["port"]["network_id"], net.as_str());
    assert_eq!(b["port"]["binding:host_id"], "node-a");
    assert_eq!(b["port"]["fixed_ips"][0]["ip_address"], "10.0.0.42");
    assert_eq!(b["port"]["mac_address"], "fa:16:3e:00:00:42");
    // The owner sees it as its own; the other project does not.
    let (s, b) = owner.api.get(&format!("/v2.0/ports/{pid}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["port"]["project_id"], owner.project_id.as_str());
    let (s, _) = stranger.api.get(&format!("/v2.0/ports/{pid}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The same address again: Neutron's conflict, nothing created.
    let (s, b) = node
        .post(
            "/isthmus/v1/nodes/node-a/ports",
            json!({"port": {"project": owner.project_id, "network": net, "fixed_ips": [{"ip_address": "10.0.0.42"}]}}),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(owner.api.list("/v2.0/ports", "ports").await.len(), 1);

    // Another project's network is not there for this project, by id or by name.
    let (s, _) = node
        .post(
            "/isthmus/v1/nodes/node-a/ports",
            json!({"port": {"project": owner.project, "network": other}}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = node
        .post(
            "/isthmus/v1/nodes/node-a/ports",
            json!({"port": {"project": "no-such-project", "network": "blue"}}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Bad input: clear 400s.
    for bad in [
        json!({"port": {"network": "blue"}}),
        json!({"port": {"project": owner.project}}),
        json!({"port": {"project": owner.project, "network": "blue", "binding:host_id": "node-b"}}),
        json!({"port": {"project": owner.project, "network": "blue", "binding:profile": "x"}}),
        json!({"nope": {}}),
    ] {
        let (s, b) = node.post("/isthmus/v1/nodes/node-a/ports", bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {b}");
    }

    // Only as itself; members cannot use the node API at all.
    let (s, _) = node
        .post(
            "/isthmus/v1/nodes/node-b/ports",
            json!({"port": {"project": owner.project, "network": "blue"}}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = owner
        .api
        .post(
            &format!("/isthmus/v1/nodes/{}/ports", owner.user),
            json!({"port": {"project": owner.project, "network": "blue"}}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // The node updates the attachment record of its own port.
    let (s, b) = node
        .put(
            &format!("/isthmus/v1/nodes/node-a/ports/{pid}"),
            json!({"port": {"device_id": "c2", "name": "c2-eth0", "binding:profile": {"cni": {"container_id": "c2"}}}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["port"]["device_id"], "c2");
    assert_eq!(b["port"]["binding:profile"]["cni"]["container_id"], "c2");

    // Deleting: another node cannot; this node can, once; the address is free again.
    let other_node = server.api(&server.node_token("node-b").await);
    let (s, _) = other_node
        .delete(&format!("/isthmus/v1/nodes/node-b/ports/{pid}"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = node.delete(&format!("/isthmus/v1/nodes/node-a/ports/{pid}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = node.delete(&format!("/isthmus/v1/nodes/node-a/ports/{pid}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = owner.api.get(&format!("/v2.0/ports/{pid}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = node
        .post(
            "/isthmus/v1/nodes/node-a/ports",
            json!({"port": {"project": owner.project, "network": "blue", "fixed_ips": [{"ip_address": "10.0.0.42"}]}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
}

#[tokio::test]
async fn deleting_a_network_takes_its_unused_pool_ports_but_not_attachments() {
    let server = TestServer::start(Backend::Embedded).await;
    let node = server.api(&server.node_token("node-a").await);
    let owner = server.member("pools").await;
    server.grant_node("node-a", &owner.project_id).await;
    let net = owner.api.network("p").await["id"].as_str().expect("id").to_string();
    owner.api.subnet(&net, "10.0.0.0/24").await;
    let pool_port = |device_id: &'static str| {
        json!({"port": {"project": owner.project, "network": "p", "device_owner": "isthmus:cni",
               "device_id": device_id}})
    };
    let (s, free) = node.post("/isthmus/v1/nodes/node-a/ports", pool_port("")).await;
    assert_eq!(s, StatusCode::CREATED, "{free}");
    let (s, used) = node
        .post("/isthmus/v1/nodes/node-a/ports", pool_port("container-1"))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{used}");
    // A port given to a container keeps the network in use.
    let (s, _) = owner.api.delete(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(s, StatusCode::CONFLICT);
    let used_id = used["port"]["id"].as_str().expect("id");
    let (s, _) = node.delete(&format!("/isthmus/v1/nodes/node-a/ports/{used_id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    // Only the unused pool port is left: it goes with the network, addresses and all.
    let (s, b) = owner.api.delete(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let free_id = free["port"]["id"].as_str().expect("id");
    let (s, _) = owner.api.get(&format!("/v2.0/ports/{free_id}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(owner.api.list("/v2.0/ports", "ports").await.is_empty());
}
