//! The incremental node views end to end: three nodes hold real watch streams while networks,
//! subnets and ports come, move and go; each node's copy (built only from what its stream
//! said) must equal its view computed from the API, and must never have held anything about a
//! network it had no port on. Then a reconnect resumes, a node dies (its liveness lease runs
//! out) without disturbing the others, and (on etcd) the server is replaced by a new one.
//! Views include security groups (the groups a node's ports use, their rules, and member
//! objects of remote groups), checked the same way and on their own.

mod support;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{Backend, TestServer};

const ROOT: &str = "/isthmus/v1/";

#[derive(Default)]
struct Copy {
    objects: BTreeMap<String, Value>,
    revision: i64,
    /// Every key any non-ping message ever named.
    seen: BTreeSet<String>,
    /// Non-ping messages, by type.
    messages: Vec<String>,
    ended: bool,
}

/// A node's stream, applied to a copy by a background reader.
struct Node {
    host: String,
    copy: Arc<Mutex<Copy>>,
    reader: tokio::task::JoinHandle<()>,
}

fn lock(c: &Arc<Mutex<Copy>>) -> std::sync::MutexGuard<'_, Copy> {
    c.lock().unwrap_or_else(|p| p.into_inner())
}

async fn open(server: &TestServer, host: &str, since: Option<i64>, copy: Arc<Mutex<Copy>>) -> Node {
    let resp = server.watch(host, since).await;
    lock(&copy).ended = false;
    let c = copy.clone();
    let reader = tokio::spawn(async move {
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = vec![];
        while let Some(Ok(chunk)) = stream.next().await {
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let m: Value = serde_json::from_slice(&line).expect("a JSON line");
                let mut c = lock(&c);
                let kind = m["type"].as_str().unwrap_or_default().to_string();
                if let Some(r) = m["revision"].as_i64() {
                    c.revision = r;
                }
                let put_field = match kind.as_str() {
                    "snapshot" => {
                        c.objects.clear();
                        "objects"
                    }
                    "update" | "resume" => "put",
                    _ => continue,
                };
                for o in m[put_field].as_array().into_iter().flatten() {
                    let k = o["key"].as_str().expect("key").to_string();
                    c.seen.insert(k.clone());
                    c.objects.insert(k, o["value"].clone());
                }
                for k in m["delete"].as_array().into_iter().flatten() {
                    let k = k.as_str().expect("key").to_string();
                    c.seen.insert(k.clone());
                    c.objects.remove(&k);
                }
                c.messages.push(kind);
            }
        }
        lock(&c).ended = true;
    });
    Node {
        host: host.to_string(),
        copy,
        reader,
    }
}

/// Every node's view as the API describes the world: key → the name (ports, networks,
/// subnets) or host (nodes) it must carry.
async fn expected(server: &TestServer, hosts: &[&str]) -> BTreeMap<String, BTreeMap<String, String>> {
    let ports = server.admin.list("/v2.0/ports", "ports").await;
    let nets = server.admin.list("/v2.0/networks", "networks").await;
    let subnets = server.admin.list("/v2.0/subnets", "subnets").await;
    let groups = server.admin.list("/v2.0/security-groups", "security_groups").await;
    let rules = server
        .admin
        .list("/v2.0/security-group-rules", "security_group_rules")
        .await;
    let s = |v: &Value, f: &str| v[f].as_str().unwrap_or_default().to_string();
    let router_names: BTreeMap<String, String> = server
        .admin
        .list("/v2.0/routers", "routers")
        .await
        .iter()
        .map(|r| (s(r, "id"), s(r, "name")))
        .collect();
    let mut out = BTreeMap::new();
    // Routers' networks, from their interface ports.
    let mut routed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in ports
        .iter()
        .filter(|p| s(p, "device_owner").starts_with("network:router_interface"))
    {
        routed.entry(s(p, "device_id")).or_default().insert(s(p, "network_id"));
    }
    for h in hosts {
        let local: BTreeSet<String> = ports
            .iter()
            .filter(|p| s(p, "binding:host_id") == *h)
            .map(|p| s(p, "network_id"))
            .collect();
        // A node also sees every network a router connects to one of its own.
        let mut mine = local.clone();
        for nets in routed.values().filter(|ns| ns.iter().any(|n| local.contains(n))) {
            mine.extend(nets.iter().cloned());
        }
        let mut view = BTreeMap::new();
        let mut peers = BTreeSet::new();
        for p in ports.iter().filter(|p| mine.contains(&s(p, "network_id"))) {
            view.insert(format!("{ROOT}ports/{}", s(p, "id")), s(p, "name"));
            let host = s(p, "binding:host_id");
            if !host.is_empty() {
                peers.insert(host);
            }
        }
        for n in nets.iter().filter(|n| mine.contains(&s(n, "id"))) {
            view.insert(format!("{ROOT}networks/{}", s(n, "id")), s(n, "name"));
        }
        // Routers with a port on a network it sees.
        for (r, name) in &router_names {
            if routed.get(r).is_some_and(|ns| ns.iter().any(|n| mine.contains(n))) {
                view.insert(format!("{ROOT}routers/{r}"), name.clone());
            }
        }
        for sn in subnets.iter().filter(|sn| mine.contains(&s(sn, "network_id"))) {
            view.insert(format!("{ROOT}subnets/{}", s(sn, "id")), s(sn, "name"));
        }
        for p in peers {
            view.insert(format!("{ROOT}nodes/{p}"), p);
        }
        // The groups its own ports use, their rules, and the members of their remote groups.
        let used: BTreeSet<String> = ports
            .iter()
            .filter(|p| s(p, "binding:host_id") == *h)
            .flat_map(|p| strings(&p["security_groups"]))
            .collect();
        for g in groups.iter().filter(|g| used.contains(&s(g, "id"))) {
            view.insert(format!("{ROOT}security_groups/{}", s(g, "id")), s(g, "name"));
        }
        let mut remotes = BTreeSet::new();
        for r in rules.iter().filter(|r| used.contains(&s(r, "security_group_id"))) {
            view.insert(format!("{ROOT}security_group_rules/{}", s(r, "id")), s(r, "id"));
            remotes.extend(r["remote_group_id"].as_str().map(str::to_string));
        }
        for p in &ports {
            for g in strings(&p["security_groups"]).iter().filter(|g| remotes.contains(*g)) {
                view.insert(format!("{ROOT}group_members/{g}/{}", s(p, "id")), addresses(p));
            }
        }
        out.insert(h.to_string(), view);
    }
    out
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect()
}

/// A port's addresses as its member objects carry them, joined.
fn addresses(p: &Value) -> String {
    let fixed = p["fixed_ips"].as_array().into_iter().flatten();
    let pairs = p["allowed_address_pairs"].as_array().into_iter().flatten();
    let a: BTreeSet<String> = fixed
        .chain(pairs)
        .filter_map(|x| x["ip_address"].as_str().map(str::to_string))
        .collect();
    a.into_iter().collect::<Vec<_>>().join(",")
}

fn summary(c: &Copy) -> BTreeMap<String, String> {
    c.objects
        .iter()
        .map(|(k, v)| {
            let tag = if k.starts_with(&format!("{ROOT}nodes/")) {
                v["host"].as_str().unwrap_or_default().to_string()
            } else if k.starts_with(&format!("{ROOT}security_group_rules/")) {
                v["id"].as_str().unwrap_or_default().to_string()
            } else if k.starts_with(&format!("{ROOT}group_members/")) {
                strings(&v["addresses"]).join(",")
            } else {
                v["name"].as_str().unwrap_or_default().to_string()
            };
            (k.clone(), tag)
        })
        .collect()
}

/// Waits until every node's copy equals its expected view.
async fn converge(server: &TestServer, nodes: &[&Node], what: &str) {
    let hosts: Vec<&str> = nodes.iter().map(|n| n.host.as_str()).collect();
    let want = expected(server, &hosts).await;
    for _ in 0..100 {
        if nodes.iter().all(|n| summary(&lock(&n.copy)) == want[&n.host]) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for n in nodes {
        let have = summary(&lock(&n.copy));
        assert_eq!(
            have, want[&n.host],
            "{what}: node {}'s copy differs from its view",
            n.host
        );
    }
}

fn all(n: &[Node]) -> Vec<&Node> {
    n.iter().collect()
}

async fn heartbeat(server: &TestServer, host: &str, ip: &str) {
    let (s, b) = server
        .admin
        .put(
            &format!("/isthmus/v1/nodes/{host}"),
            json!({"node": {"underlay_ip": ip}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

fn id(v: &Value) -> String {
    v["id"].as_str().expect("id").to_string()
}

async fn port(server: &TestServer, net: &str, host: &str, name: &str) -> String {
    id(&server
        .admin
        .create(
            "ports",
            "port",
            json!({"network_id": net, "binding:host_id": host, "name": name}),
        )
        .await)
}

/// Nodes h1, h2 and h3 registered (a heartbeat each), each holding its view stream.
async fn three_nodes(server: &TestServer) -> Vec<Node> {
    let hosts = [("h1", "192.0.2.1"), ("h2", "192.0.2.2"), ("h3", "192.0.2.3")];
    for (h, ip) in hosts {
        heartbeat(server, h, ip).await;
    }
    let mut nodes = vec![];
    for (h, _) in hosts {
        nodes.push(open(server, h, None, Arc::default()).await);
    }
    nodes
}

async fn scenario(backend: Backend) {
    let mut server = TestServer::start_with(backend, |c| c.agent_down_secs = 3).await;
    let mut nodes = three_nodes(&server).await;

    let a = id(&server.admin.network("net-a").await);
    let b = id(&server.admin.network("net-b").await);
    let c = id(&server.admin.network("net-c").await);
    for (n, cidr) in [(&a, "10.1.0.0/24"), (&b, "10.2.0.0/24"), (&c, "10.3.0.0/24")] {
        server.admin.subnet(n, cidr).await;
    }
    let a1 = port(&server, &a, "h1", "a1").await;
    port(&server, &a, "h2", "a2").await;
    port(&server, &a, "", "a-unbound").await;
    let b2 = port(&server, &b, "h2", "b2").await;
    port(&server, &b, "h3", "b3").await;
    port(&server, &c, "h3", "c3").await;
    converge(&server, &all(&nodes), "after building").await;

    // Renames, a move (h1 leaves net-a, h3 joins it), a departure (h2 leaves net-b), a
    // subnet that comes and goes.
    let (s, r) = server
        .admin
        .put(&format!("/v2.0/ports/{a1}"), json!({"port": {"name": "a1-renamed"}}))
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let (s, r) = server
        .admin
        .put(&format!("/v2.0/networks/{c}"), json!({"network": {"name": "net-c2"}}))
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let (s, r) = server
        .admin
        .put(&format!("/v2.0/ports/{a1}"), json!({"port": {"binding:host_id": "h3"}}))
        .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let (s, _) = server.admin.delete(&format!("/v2.0/ports/{b2}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let extra = id(&server.admin.subnet(&a, "10.4.0.0/24").await);
    converge(&server, &all(&nodes), "after the moves").await;
    let (s, _) = server.admin.delete(&format!("/v2.0/subnets/{extra}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    converge(&server, &all(&nodes), "after the subnet went").await;

    // h2 goes away; while it is gone h1 comes back to net-a; it resumes from where it was.
    let h2 = nodes.remove(1);
    h2.reader.abort();
    let (copy2, since) = (h2.copy.clone(), lock(&h2.copy).revision);
    port(&server, &a, "h1", "a1-again").await;
    let h2 = open(&server, "h2", Some(since), copy2).await;
    nodes.insert(1, h2);
    converge(&server, &all(&nodes), "after h2 resumed").await;
    let m = lock(&nodes[1].copy).messages.clone();
    assert_eq!(
        m.iter().filter(|t| *t == "resume").count(),
        1,
        "h2 resumed instead of relisting: {m:?}"
    );

    // Nothing about networks a node never had a port on.
    let h1_seen = lock(&nodes[0].copy).seen.clone();
    assert!(
        !h1_seen.iter().any(|k| k.contains(&c)),
        "h1 was told about net-c: {h1_seen:?}"
    );
    let c_subnets: Vec<String> = server
        .admin
        .list(&format!("/v2.0/subnets?network_id={c}"), "subnets")
        .await
        .iter()
        .map(id)
        .collect();
    assert!(!c_subnets.is_empty());
    for s in &c_subnets {
        assert!(
            !h1_seen.iter().any(|k| k.ends_with(s)),
            "h1 was told about net-c's subnet"
        );
    }

    // h3 dies (stops heartbeating): its lease runs out and the agents API says so; h1 and h2,
    // which keep beating, stay alive and are told nothing about it.
    let before: Vec<usize> = nodes.iter().map(|n| lock(&n.copy).messages.len()).collect();
    for _ in 0..5 {
        heartbeat(&server, "h1", "192.0.2.1").await;
        heartbeat(&server, "h2", "192.0.2.2").await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let agents = server.admin.list("/v2.0/agents", "agents").await;
    let alive: BTreeMap<String, bool> = agents
        .iter()
        .map(|a| (a["host"].as_str().unwrap_or_default().to_string(), a["alive"] == true))
        .collect();
    assert_eq!(
        alive,
        BTreeMap::from([("h1".into(), true), ("h2".into(), true), ("h3".into(), false)]),
        "{agents:?}"
    );
    let after: Vec<usize> = nodes.iter().map(|n| lock(&n.copy).messages.len()).collect();
    assert_eq!(before, after, "heartbeats and a death sent view updates");
    // It comes back with one heartbeat.
    heartbeat(&server, "h3", "192.0.2.3").await;
    let (_, listed) = server.admin.get("/v2.0/agents").await;
    assert!(
        listed["agents"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|a| a["alive"] == true),
        "{listed}"
    );

    // A new server takes over (same etcd): every node reconnects from where it was and ends
    // with its exact view.
    if backend == Backend::Etcd {
        let etcd = server.etcd().expect("etcd");
        server.stop().await;
        for n in &nodes {
            n.reader.abort();
        }
        let fresh = TestServer::start_on_etcd(etcd, |c| c.agent_down_secs = 3).await;
        let mut again = vec![];
        for n in nodes.drain(..) {
            let since = lock(&n.copy).revision;
            again.push(open(&fresh, &n.host, Some(since), n.copy.clone()).await);
        }
        port(&fresh, &b, "h1", "b1").await;
        converge(&fresh, &all(&again), "after the server was replaced").await;
        let h1_seen = lock(&again[0].copy).seen.clone();
        assert!(!h1_seen.iter().any(|k| k.contains(&c)), "h1 was told about net-c");
        for n in &again {
            n.reader.abort();
        }
    } else {
        for n in &nodes {
            n.reader.abort();
        }
    }
}

/// A router connecting two networks brings each into the views of the nodes on the other (the
/// node routes locally, so it needs the far side's ports and nodes); its interface going takes
/// the network away again.
#[tokio::test]
async fn routers_bring_the_networks_they_connect() {
    let server = TestServer::start(Backend::Embedded).await;
    let nodes = three_nodes(&server).await;
    let a = id(&server.admin.network("r-net-a").await);
    let b = id(&server.admin.network("r-net-b").await);
    let c = id(&server.admin.network("r-net-c").await);
    let mut subnets = vec![];
    for (n, cidr) in [(&a, "10.11.0.0/24"), (&b, "10.12.0.0/24"), (&c, "10.13.0.0/24")] {
        subnets.push(id(&server.admin.subnet(n, cidr).await));
    }
    port(&server, &a, "h1", "a1").await;
    port(&server, &b, "h2", "b2").await;
    port(&server, &c, "h3", "c3").await;
    converge(&server, &all(&nodes), "before the router").await;
    let (st, r) = server
        .admin
        .post("/v2.0/routers", json!({"router": {"name": "r"}}))
        .await;
    assert_eq!(st, StatusCode::CREATED, "{r}");
    let router = id(&r["router"]);
    let iface = |subnet: &str, add: bool| {
        let path = format!(
            "/v2.0/routers/{router}/{}_router_interface",
            if add { "add" } else { "remove" }
        );
        let body = json!({"subnet_id": subnet});
        let server = &server;
        async move {
            let (st, r) = server.admin.put(&path, body).await;
            assert_eq!(st, StatusCode::OK, "{path}: {r}");
        }
    };
    iface(&subnets[0], true).await;
    iface(&subnets[2], true).await;
    converge(&server, &all(&nodes), "with net-a and net-c on the router").await;
    let h1 = summary(&lock(&nodes[0].copy));
    assert!(
        h1.contains_key(&format!("{ROOT}networks/{c}")),
        "h1 does not see net-c: {h1:?}"
    );
    assert!(
        h1.contains_key(&format!("{ROOT}nodes/h3")),
        "h1 lacks h3's node record: {h1:?}"
    );
    let h2 = summary(&lock(&nodes[1].copy));
    assert!(
        !h2.keys().any(|k| k.contains(&c) || k.contains(&a)),
        "h2 is not on the router: {h2:?}"
    );
    iface(&subnets[2], false).await;
    converge(&server, &all(&nodes), "after net-c left the router").await;
    let h1 = summary(&lock(&nodes[0].copy));
    assert!(!h1.keys().any(|k| k.contains(&c)), "h1 still sees net-c: {h1:?}");
    for n in &nodes {
        n.reader.abort();
    }
}

#[tokio::test]
async fn every_node_gets_exactly_its_view_on_the_embedded_store() {
    scenario(Backend::Embedded).await;
}

#[tokio::test]
async fn every_node_gets_exactly_its_view_on_etcd_across_a_server_replacement() {
    scenario(Backend::Etcd).await;
}

/// Heartbeats of nodes that change nothing are not store writes: the store's revision stays
/// where their registration left it.
#[tokio::test]
async fn idle_heartbeats_do_not_write_the_store() {
    let server = TestServer::start(Backend::Embedded).await;
    let state = server.handle.as_ref().expect("running").state.clone();
    for i in 0..10 {
        heartbeat(&server, &format!("idle-{i}"), &format!("192.0.2.{}", 10 + i)).await;
    }
    let rev = state.cache.revision();
    for _ in 0..5 {
        for i in 0..10 {
            heartbeat(&server, &format!("idle-{i}"), &format!("192.0.2.{}", 10 + i)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        state.cache.revision(),
        rev,
        "50 heartbeats of 10 unchanged nodes wrote to the store"
    );
    // A heartbeat that says something new is written.
    heartbeat(&server, "idle-0", "192.0.2.99").await;
    assert!(state.cache.revision() > rev);
}

/// Security groups reach exactly the nodes whose ports use them: a node with a port in group
/// G (ingress from G itself) gets G, its rules and one member object per port in G, wherever
/// that port is; a node with no port in G hears nothing of it. Members come and go with the
/// ports, and with the rules that name G.
#[tokio::test]
async fn security_groups_reach_the_nodes_whose_ports_use_them() {
    let server = TestServer::start(Backend::Embedded).await;
    let hosts = [
        ("sa", "192.0.2.11"),
        ("sb", "192.0.2.12"),
        ("sc", "192.0.2.13"),
        ("sd", "192.0.2.14"),
    ];
    for (h, ip) in hosts {
        heartbeat(&server, h, ip).await;
    }
    let mut nodes = vec![];
    for (h, _) in hosts {
        nodes.push(open(&server, h, None, Arc::default()).await);
    }
    let net1 = id(&server.admin.network("sg-net-1").await);
    let net2 = id(&server.admin.network("sg-net-2").await);
    server.admin.subnet(&net1, "10.5.0.0/24").await;
    server.admin.subnet(&net2, "10.6.0.0/24").await;
    let g = id(&server
        .admin
        .create("security-groups", "security_group", json!({"name": "web"}))
        .await);
    let rule = id(&server
        .admin
        .create(
            "security-group-rules",
            "security_group_rule",
            json!({"security_group_id": g, "direction": "ingress", "ethertype": "IPv4",
                   "protocol": "tcp", "port_range_min": 80, "port_range_max": 80,
                   "remote_group_id": g}),
        )
        .await);
    let in_g = |net: &str, host: &str, name: &str| {
        json!({"network_id": net, "binding:host_id": host, "name": name, "security_groups": [g],
               "allowed_address_pairs": [{"ip_address": "10.9.0.0/28"}]})
    };
    let pa = id(&server.admin.create("ports", "port", in_g(&net1, "sa", "pa")).await);
    // Another node, another network.
    let pb = server.admin.create("ports", "port", in_g(&net2, "sb", "pb")).await;
    // sc shares sa's network, but its port is only in the default group.
    port(&server, &net1, "sc", "pc").await;
    converge(&server, &all(&nodes), "after building").await;

    let member = |p: &str| format!("{ROOT}group_members/{g}/{p}");
    let (group_key, rule_key) = (
        format!("{ROOT}security_groups/{g}"),
        format!("{ROOT}security_group_rules/{rule}"),
    );
    {
        let a = lock(&nodes[0].copy);
        assert!(a.objects.contains_key(&group_key), "{:?}", a.objects.keys());
        assert!(a.objects.contains_key(&rule_key), "{:?}", a.objects.keys());
        assert!(a.objects.contains_key(&member(&pa)));
        let mb = &a.objects[&member(&id(&pb))];
        let pb_ip = pb["fixed_ips"][0]["ip_address"].as_str().expect("an address");
        assert!(pb_ip.starts_with("10.6.0."), "{pb}");
        assert_eq!(mb["addresses"], json!([pb_ip, "10.9.0.0/28"]), "{mb}");
        assert_eq!(mb["security_group_id"], json!(g));
    }

    // A port joins G on a third node: its member object reaches sa; then it goes.
    let pd = id(&server.admin.create("ports", "port", in_g(&net2, "sd", "pd")).await);
    converge(&server, &all(&nodes), "after a port joined the group").await;
    assert!(lock(&nodes[0].copy).objects.contains_key(&member(&pd)));
    let (s, _) = server.admin.delete(&format!("/v2.0/ports/{pd}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    converge(&server, &all(&nodes), "after the port went").await;
    assert!(!lock(&nodes[0].copy).objects.contains_key(&member(&pd)));
    assert!(lock(&nodes[0].copy).seen.contains(&member(&pd)));

    // The rule goes: sa loses it, and with it the members (no rule names G any more).
    let (s, _) = server.admin.delete(&format!("/v2.0/security-group-rules/{rule}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    converge(&server, &all(&nodes), "after the rule went").await;
    {
        let a = lock(&nodes[0].copy);
        assert!(!a.objects.contains_key(&rule_key));
        assert!(a.objects.contains_key(&group_key));
        assert!(!a
            .objects
            .keys()
            .any(|k| k.starts_with(&format!("{ROOT}group_members/{g}/"))));
    }

    // sc never heard of G.
    let c_seen = lock(&nodes[2].copy).seen.clone();
    assert!(
        !c_seen.iter().any(|k| k.contains(&g)),
        "sc was told about G: {c_seen:?}"
    );
    assert!(!c_seen.contains(&rule_key));
    for n in &nodes {
        n.reader.abort();
    }
}
