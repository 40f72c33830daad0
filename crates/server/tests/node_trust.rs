//! What a node may do is what the projects it serves granted it: the node role on a project
//! lets the node plug that project's ports (create them bound to itself, claim unbound ones).
//! Without it a node gets one 403 that says nothing of the project. And a node cannot take
//! an underlay address another living node holds.

mod support;

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;
use support::{Api, Backend, TestServer};

const CREATE: &str = "/isthmus/v1/nodes/node-a/ports";

fn cni_port(project: &str, network: &str) -> Value {
    json!({"port": {"project": project, "network": network, "device_owner": "isthmus:cni"}})
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id").to_string()
}

/// The keys of the first message (the snapshot) of node `host`'s view stream, opened with
/// the node's own token.
async fn view_keys(node: &Api, host: &str) -> Vec<String> {
    let resp = node
        .request(Method::GET, &format!("/isthmus/v1/nodes/{host}/watch"))
        .send()
        .await
        .expect("watch");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.bytes_stream();
    let mut buf = vec![];
    while !buf.contains(&b'\n') {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("a snapshot within 10 s")
            .expect("stream open")
            .expect("chunk");
        buf.extend_from_slice(&chunk);
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let v: Value = serde_json::from_slice(line).expect("a JSON line");
    v["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["key"].as_str().map(str::to_string))
        .collect()
}

async fn a_node_plugs_only_ports_of_projects_that_granted_it(backend: Backend) {
    let s = TestServer::start(backend).await;
    let node = s.api(&s.node_token("node-a").await);
    let owner = s.member("owner").await;
    let net = id_of(&owner.api.network("blue").await);
    owner.api.subnet(&net, "10.0.0.0/24").await;
    let unbound = id_of(&owner.api.port(&net).await);
    let claim = json!({"port": {"bind": true}});
    let claim_path = |id: &str| format!("/isthmus/v1/nodes/node-a/ports/{id}");

    // No grant: the same 403 whether the network exists or not, the project exists or not,
    // named or by id.
    let (st, refused) = node.post(CREATE, cni_port(&owner.project, "blue")).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{refused}");
    assert_eq!(refused["NeutronError"]["type"], "PolicyNotAuthorized", "{refused}");
    for (project, network) in [
        (owner.project.as_str(), "no-such-network"),
        (owner.project_id.as_str(), net.as_str()),
        ("no-such-project", "blue"),
    ] {
        let (st, b) = node.post(CREATE, cni_port(project, network)).await;
        assert_eq!((st, &b), (StatusCode::FORBIDDEN, &refused), "{project}/{network}");
    }
    // Nor may it claim the project's unbound port: 403, nothing about the port.
    let (st, b) = node.put(&claim_path(&unbound), claim.clone()).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{b}");
    assert!(b.get("port").is_none() && !b.to_string().contains(&net), "{b}");
    let (_, p) = s.admin.get(&format!("/v2.0/ports/{unbound}")).await;
    assert_eq!(p["port"]["binding:host_id"], "", "{p}");
    // It created nothing, and its view holds nothing of the project.
    assert_eq!(owner.api.list("/v2.0/ports", "ports").await.len(), 1);
    let keys = view_keys(&node, "node-a").await;
    assert!(
        !keys.iter().any(|k| k.contains(&net) || k.contains(&unbound)),
        "{keys:?}"
    );
    // Its own token reads nothing through the Neutron API either.
    assert!(node.list("/v2.0/networks", "networks").await.is_empty());

    // Granted (`openstack role add --user node-a --project proj-owner node`): both work.
    s.grant_node("node-a", &owner.project_id).await;
    let (st, b) = node.post(CREATE, cni_port(&owner.project, "blue")).await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    assert_eq!(b["port"]["binding:host_id"], "node-a");
    assert_eq!(b["port"]["project_id"], owner.project_id.as_str());
    let created = id_of(&b["port"]);
    let (st, b) = node.put(&claim_path(&unbound), claim.clone()).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    assert_eq!(b["port"]["binding:host_id"], "node-a");
    // The grant does not let the node read the project through the Neutron API.
    let as_project = s.token("node-a", support::MEMBER_PASSWORD, &owner.project).await;
    assert!(s.api(&as_project).list("/v2.0/ports", "ports").await.is_empty());
    let (st, _) = s.api(&as_project).get(&format!("/v2.0/networks/{net}")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);

    // Revoked: refused again, with the same body; what it already holds stays usable until
    // deleted (a status report on a port bound to it still works).
    s.revoke_node("node-a", &owner.project_id).await;
    let (st, b) = node.post(CREATE, cni_port(&owner.project, "blue")).await;
    assert_eq!((st, &b), (StatusCode::FORBIDDEN, &refused));
    let another = id_of(&owner.api.port(&net).await);
    let (st, _) = node.put(&claim_path(&another), claim.clone()).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, b) = node
        .put(&claim_path(&created), json!({"port": {"status": "ACTIVE"}}))
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let (st, _) = node.delete(&claim_path(&created)).await;
    assert_eq!(st, StatusCode::NO_CONTENT);

    // A VM port an admin bound to the node (as a compute service does) needs no grant: the
    // binding is the grant. The node claims it and reports it ACTIVE.
    let vm = s
        .admin
        .create(
            "ports",
            "port",
            json!({"network_id": net, "project_id": owner.project_id, "device_owner": "compute:nova",
                   "binding:host_id": "node-a"}),
        )
        .await;
    let vm = id_of(&vm);
    let (st, b) = node.put(&claim_path(&vm), claim.clone()).await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let (st, b) = node
        .put(
            &claim_path(&vm),
            json!({"port": {"status": "ACTIVE", "vif_type": "tap"}}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let (_, b) = owner.api.get(&format!("/v2.0/ports/{vm}")).await;
    assert_eq!(b["port"]["status"], "ACTIVE");
    let keys = view_keys(&node, "node-a").await;
    assert!(keys.iter().any(|k| k.ends_with(&format!("/ports/{vm}"))), "{keys:?}");

    // Admins keep plugging anywhere through the node API.
    let (st, b) = s
        .admin
        .post("/isthmus/v1/nodes/node-b/ports", cni_port(&owner.project, "blue"))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let (st, _) = s
        .admin
        .post("/isthmus/v1/nodes/node-b/ports", cni_port("no-such-project", "blue"))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_node_plugs_only_ports_of_projects_that_granted_it_embedded() {
    a_node_plugs_only_ports_of_projects_that_granted_it(Backend::Embedded).await;
}

#[tokio::test]
async fn a_node_plugs_only_ports_of_projects_that_granted_it_etcd() {
    a_node_plugs_only_ports_of_projects_that_granted_it(Backend::Etcd).await;
}

async fn beat(api: &Api, host: &str, ip: &str) -> (StatusCode, Value) {
    api.put(
        &format!("/isthmus/v1/nodes/{host}"),
        json!({"node": {"underlay_ip": ip}}),
    )
    .await
}

async fn a_living_nodes_underlay_address_cannot_be_taken(backend: Backend) {
    let s = TestServer::start_with(backend, |c| c.agent_down_secs = 2).await;
    let a = s.api(&s.node_token("node-a").await);
    let b = s.api(&s.node_token("node-b").await);
    let (st, body) = beat(&a, "node-a", "192.0.2.10").await;
    assert_eq!(st, StatusCode::OK, "{body}");

    // node-a is alive: node-b cannot register its address; nothing of node-b is stored.
    let (st, body) = beat(&b, "node-b", "192.0.2.10").await;
    assert_eq!(st, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["NeutronError"]["type"], "UnderlayAddressInUse", "{body}");
    assert!(
        body["NeutronError"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("192.0.2.10") && m.contains("alive")),
        "{body}"
    );
    let agents = s.admin.list("/v2.0/agents", "agents").await;
    assert_eq!(agents.len(), 1, "{agents:?}");
    // The same address written another way is the same address.
    let (st, _) = beat(&b, "node-b", "::ffff:192.0.2.10").await;
    assert_eq!(st, StatusCode::CONFLICT);
    // node-b takes another one; node-a keeps beating with its own.
    let (st, body) = beat(&b, "node-b", "192.0.2.11").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, body) = beat(&a, "node-a", "192.0.2.10").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    // node-a moves to a new address: its old one is free at once.
    let (st, body) = beat(&a, "node-a", "192.0.2.12").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, body) = beat(&b, "node-b", "192.0.2.10").await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, _) = beat(&a, "node-a", "192.0.2.10").await;
    assert_eq!(st, StatusCode::CONFLICT);

    // node-a stops beating: once its lease is gone (dead), node-b may take its address, and
    // then node-a, back, may not.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (st, body) = beat(&b, "node-b", "192.0.2.12").await;
        if st == StatusCode::OK {
            break;
        }
        assert_eq!(st, StatusCode::CONFLICT, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "node-a's claim outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let agents = s.admin.list("/v2.0/agents", "agents").await;
    let a_alive = agents
        .iter()
        .find(|x| x["host"] == "node-a")
        .map(|x| x["alive"].clone());
    assert_eq!(a_alive, Some(json!(false)), "{agents:?}");
    let (st, _) = beat(&a, "node-a", "192.0.2.12").await;
    assert_eq!(st, StatusCode::CONFLICT);

    // Deleting a node through the agents API frees its address for another node at once.
    let b_id = s
        .admin
        .list("/v2.0/agents", "agents")
        .await
        .iter()
        .find(|x| x["host"] == "node-b")
        .map(id_of)
        .expect("node-b listed");
    let (st, _) = s.admin.delete(&format!("/v2.0/agents/{b_id}")).await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let (st, body) = beat(&a, "node-a", "192.0.2.12").await;
    assert_eq!(st, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_living_nodes_underlay_address_cannot_be_taken_embedded() {
    a_living_nodes_underlay_address_cannot_be_taken(Backend::Embedded).await;
}

#[tokio::test]
async fn a_living_nodes_underlay_address_cannot_be_taken_etcd() {
    a_living_nodes_underlay_address_cannot_be_taken(Backend::Etcd).await;
}

/// Two servers on one etcd, two nodes registering one address at once through different
/// servers: exactly one wins.
#[tokio::test]
async fn two_nodes_racing_for_one_address_through_two_servers_one_wins() {
    let s1 = TestServer::start(Backend::Etcd).await;
    let etcd = s1.etcd().expect("etcd");
    let s2 = TestServer::start_on_etcd(etcd, |_| {}).await;
    for round in 0..5 {
        let (ha, hb) = (format!("ra-{round}"), format!("rb-{round}"));
        let a = s1.api(&s1.node_token(&ha).await);
        let b = s2.api(&s1.node_token(&hb).await);
        let ip = format!("198.51.100.{}", round + 1);
        let (ra, rb) = tokio::join!(beat(&a, &ha, &ip), beat(&b, &hb, &ip));
        let mut got = [ra.0, rb.0];
        got.sort();
        assert_eq!(got, [StatusCode::OK, StatusCode::CONFLICT], "{ra:?} {rb:?}");
    }
}
