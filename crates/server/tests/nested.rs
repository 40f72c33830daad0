//! The nested API on both store backends: trunk credentials (secret shown once, other
//! projects kept out, revocation, refusals that all look alike), attachments in `vlan` mode
//! (lowest free VLAN, idempotent, released, confined to the credential's trunk, concurrent
//! containers on distinct VLANs through two servers on etcd) and `macvlan` mode (address
//! pairs on the parent), ports deleted through Neutron, and the trunk's derived status.

mod support;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use support::{assert_neutron_error, id_of, read, Api, Backend, TestServer};

const HEADER: &str = "X-Isthmus-Trunk-Credential";

/// The nested API as one credential (or none, or a raw header value).
#[derive(Clone)]
struct Nested {
    http: reqwest::Client,
    base: String,
    header: Option<String>,
}

impl Nested {
    fn new(server_url: &str, http: &reqwest::Client, header: Option<&str>) -> Nested {
        Nested {
            http: http.clone(),
            base: server_url.to_string(),
            header: header.map(str::to_string),
        }
    }
    async fn call(&self, method: Method, cid: &str, ifname: &str, body: Option<Value>) -> (StatusCode, Value) {
        let url = format!("{}/isthmus/v1/nested/attachments/{cid}/{ifname}", self.base);
        let mut req = self.http.request(method, url);
        if let Some(h) = &self.header {
            req = req.header(HEADER, h);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        read(req.send().await.expect("nested request")).await
    }
    async fn put(&self, cid: &str, ifname: &str, mode: &str, network: &str) -> (StatusCode, Value) {
        let body = json!({"attachment": {"mode": mode, "network_id": network}});
        self.call(Method::PUT, cid, ifname, Some(body)).await
    }
    /// PUT that must succeed; the attachment.
    async fn attach(&self, cid: &str, ifname: &str, mode: &str, network: &str) -> Value {
        let (s, b) = self.put(cid, ifname, mode, network).await;
        assert_eq!(s, StatusCode::OK, "attach {cid}/{ifname}: {b}");
        b["attachment"].clone()
    }
    async fn get(&self, cid: &str, ifname: &str) -> (StatusCode, Value) {
        self.call(Method::GET, cid, ifname, None).await
    }
    async fn delete(&self, cid: &str, ifname: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, cid, ifname, None).await
    }
}

async fn credential(api: &Api, trunk: &str) -> (StatusCode, Value) {
    api.post(&format!("/isthmus/v1/trunks/{trunk}/credentials"), json!({}))
        .await
}

/// A new credential of `trunk`, as the header value.
async fn header_for(api: &Api, trunk: &str) -> String {
    let (s, b) = credential(api, trunk).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let c = &b["credential"];
    format!("{}.{}", c["id"].as_str().unwrap(), c["secret"].as_str().unwrap())
}

async fn trunk_of(api: &Api, parent: &str) -> String {
    let (s, b) = api.post("/v2.0/trunks", json!({"trunk": {"port_id": parent}})).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    id_of(&b["trunk"])
}

async fn subports(api: &Api, trunk: &str) -> Vec<(String, u64)> {
    let (s, b) = api.get(&format!("/v2.0/trunks/{trunk}/get_subports")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let mut v: Vec<(String, u64)> = b["sub_ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["port_id"].as_str().unwrap().to_string(),
                s["segmentation_id"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort_by_key(|(_, vlan)| *vlan);
    v
}

async fn pairs_of(api: &Api, port: &str) -> Vec<Value> {
    let (s, b) = api.get(&format!("/v2.0/ports/{port}")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["port"]["allowed_address_pairs"].as_array().unwrap().clone()
}

async fn trunk_status(api: &Api, trunk: &str) -> String {
    let (_, b) = api.get(&format!("/v2.0/trunks/{trunk}")).await;
    b["trunk"]["status"].as_str().unwrap().to_string()
}

async fn set_status(admin: &Api, port: &str, status: &str) {
    let (s, b) = admin
        .put(&format!("/v2.0/ports/{port}"), json!({"port": {"status": status}}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

async fn check(backend: Backend) {
    let server = TestServer::start(backend).await;
    let m = server.member("nest").await;
    let o = server.member("other").await;
    let vm_net = id_of(&m.api.network("vm-net").await);
    m.api.subnet(&vm_net, "10.80.0.0/24").await;
    let c_net = id_of(&m.api.network("containers").await);
    let (s, b) = m
        .api
        .post(
            "/v2.0/subnets",
            json!({"subnet": {"network_id": c_net, "cidr": "10.81.0.0/24", "ip_version": 4,
                "dns_nameservers": ["10.81.0.53"],
                "host_routes": [{"destination": "192.0.2.0/24", "nexthop": "10.81.0.254"}]}}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let parent = id_of(&m.api.port(&vm_net).await);
    let trunk = trunk_of(&m.api, &parent).await;
    let parent_b = id_of(&m.api.port(&vm_net).await);
    let trunk_b = trunk_of(&m.api, &parent_b).await;

    // Credentials: the secret once, never in a list; other projects see no trunk.
    let creds = format!("/isthmus/v1/trunks/{trunk}/credentials");
    let (s, b) = credential(&m.api, &trunk).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let c = &b["credential"];
    let secret = c["secret"].as_str().expect("secret in the POST answer");
    assert!(secret.len() >= 43, "{secret}");
    assert_eq!(
        (&c["trunk_id"], &c["project_id"]),
        (&json!(trunk), &json!(m.project_id))
    );
    let header = format!("{}.{secret}", c["id"].as_str().unwrap());
    let (s, b) = m.api.get(&creds).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["credentials"].as_array().map(Vec::len), Some(1), "{b}");
    assert!(b["credentials"][0].get("secret").is_none(), "{b}");
    assert!(!b.to_string().contains(secret));
    for (method, path) in [
        (Method::GET, creds.clone()),
        (Method::POST, creds.clone()),
        (Method::DELETE, format!("{creds}/{}", c["id"].as_str().unwrap())),
    ] {
        let body = (method == Method::POST).then(|| json!({}));
        let (s, b) = o.api.call(method, &path, body).await;
        assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("TrunkNotFound"));
    }
    let (s, b) = server.admin.get(&creds).await;
    assert_eq!(
        (s, b["credentials"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(1))
    );

    let a = Nested::new(&server.network_url, &server.http, Some(&header));

    // vlan: VLAN 1, then 2; idempotent; everything the plugin needs.
    let c1 = a.attach("c1", "eth0", "vlan", &c_net).await;
    assert_eq!(c1["vlan"], 1, "{c1}");
    assert_eq!(c1["mode"], "vlan");
    assert_eq!(c1["network_id"], json!(c_net));
    assert!(c1["mtu"].as_u64().is_some_and(|m| m > 1000), "{c1}");
    assert_eq!(c1["addresses"][0]["prefix_len"], 24, "{c1}");
    assert_eq!(c1["addresses"][0]["gateway"], "10.81.0.1", "{c1}");
    assert!(c1["addresses"][0]["ip_address"]
        .as_str()
        .unwrap()
        .starts_with("10.81.0."));
    assert_eq!(c1["dns_nameservers"], json!(["10.81.0.53"]));
    assert_eq!(
        c1["routes"],
        json!([{"destination": "192.0.2.0/24", "nexthop": "10.81.0.254"}])
    );
    let again = a.attach("c1", "eth0", "vlan", &c_net).await;
    assert_eq!(again, c1);
    let c2 = a.attach("c2", "eth0", "vlan", &c_net).await;
    assert_eq!(c2["vlan"], 2, "{c2}");
    let p1 = c1["port_id"].as_str().unwrap().to_string();
    let p2 = c2["port_id"].as_str().unwrap().to_string();
    assert_eq!(subports(&m.api, &trunk).await, vec![(p1.clone(), 1), (p2.clone(), 2)]);
    let (s, b) = a.get("c1", "eth0").await;
    assert_eq!((s, &b["attachment"]), (StatusCode::OK, &c1));
    // The port is the project's own, a subport as Neutron shows one.
    let (_, p) = server.admin.get(&format!("/v2.0/ports/{p1}")).await;
    let p = &p["port"];
    assert_eq!(
        (&p["project_id"], &p["device_owner"], &p["device_id"], &p["name"]),
        (
            &json!(m.project_id),
            &json!("trunk:subport"),
            &json!(trunk),
            &json!("nested-c1-eth0")
        )
    );
    assert_eq!(p["binding:profile"]["nested"]["container_id"], "c1", "{p}");
    // A different mode or network for the same interface is refused.
    let (s, b) = a.put("c1", "eth0", "vlan", &vm_net).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, None);

    // Release: VLAN and port free; nothing to release is fine too.
    let (s, b) = a.delete("c1", "eth0").await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, _) = m.api.get(&format!("/v2.0/ports/{p1}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(subports(&m.api, &trunk).await, vec![(p2.clone(), 2)]);
    let (s, b) = a.get("c1", "eth0").await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);
    let (s, b) = a.delete("c1", "eth0").await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let c3 = a.attach("c3", "net1", "vlan", &c_net).await;
    assert_eq!(c3["vlan"], 1, "{c3}");

    // A subport taken off the trunk through Neutron goes back on at the next PUT.
    let (s, b) = m
        .api
        .put(
            &format!("/v2.0/trunks/{trunk}/remove_subports"),
            json!({"sub_ports": [{"port_id": c3["port_id"]}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, _) = a.get("c3", "net1").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let back = a.attach("c3", "net1", "vlan", &c_net).await;
    assert_eq!((&back["port_id"], &back["vlan"]), (&c3["port_id"], &json!(1)));

    // A record whose port went without telling it (its profile cleared by an admin first):
    // the next PUT replaces it.
    let s1 = a.attach("s1", "eth0", "vlan", &c_net).await;
    let s1_port = s1["port_id"].as_str().unwrap().to_string();
    let (s, b) = m
        .api
        .put(
            &format!("/v2.0/trunks/{trunk}/remove_subports"),
            json!({"sub_ports": [{"port_id": s1_port}]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = server
        .admin
        .put(
            &format!("/v2.0/ports/{s1_port}"),
            json!({"port": {"binding:profile": {}}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = m.api.delete(&format!("/v2.0/ports/{s1_port}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let s1b = a.attach("s1", "eth0", "vlan", &c_net).await;
    assert_ne!(s1b["port_id"], s1["port_id"]);
    assert_eq!(s1b["vlan"], s1["vlan"]);
    let (s, _) = a.delete("s1", "eth0").await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    // The project's port quota holds; a disabled trunk takes no new attachment.
    let quota = format!("/v2.0/quotas/{}", m.project_id);
    let (_, b) = m.api.get(&format!("{quota}/details")).await;
    let used = b["quota"]["port"]["used"].as_u64().unwrap();
    let (s, b) = server.admin.put(&quota, json!({"quota": {"port": used}})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = a.put("q1", "eth0", "vlan", &c_net).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("OverQuota"));
    let (s, b) = server.admin.put(&quota, json!({"quota": {"port": -1}})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let set_trunk = |up: bool| {
        let api = m.api.clone();
        let path = format!("/v2.0/trunks/{trunk}");
        async move {
            let (s, b) = api.put(&path, json!({"trunk": {"admin_state_up": up}})).await;
            assert_eq!(s, StatusCode::OK, "{b}");
        }
    };
    set_trunk(false).await;
    let (s, b) = a.put("q1", "eth0", "vlan", &c_net).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, Some("TrunkDisabled"));
    // What is there still answers, and can be released.
    assert_eq!(a.attach("c3", "net1", "vlan", &c_net).await, back);
    set_trunk(true).await;

    // Another trunk's credential reaches none of this trunk's attachments.
    let b_header = header_for(&m.api, &trunk_b).await;
    let bn = Nested::new(&server.network_url, &server.http, Some(&b_header));
    let (s, b) = bn.get("c2", "eth0").await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);
    let (s, _) = bn.delete("c2", "eth0").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = a.get("c2", "eth0").await;
    assert_eq!(s, StatusCode::OK, "trunk B's credential released trunk A's attachment");
    assert_eq!(subports(&m.api, &trunk).await.len(), 2);

    // Networks the project cannot see are missing networks.
    let theirs = id_of(&o.api.network("theirs").await);
    o.api.subnet(&theirs, "10.82.0.0/24").await;
    let (s, b) = a.put("c9", "eth0", "vlan", &theirs).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("NetworkNotFound"));
    let (s, b) = a.put("c9", "eth0", "macvlan", &theirs).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("NetworkNotFound"));
    let (s, b) = a
        .put("c9", "eth0", "vlan", "4a1f5c7e-0000-4000-8000-000000000000")
        .await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("NetworkNotFound"));
    // A bad body or name: 400.
    let (s, b) = a
        .call(
            Method::PUT,
            "c9",
            "eth0",
            Some(json!({"attachment": {"mode": "vxlan", "network_id": c_net}})),
        )
        .await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    for (cid, ifname) in [
        ("bad%20id", "eth0"),
        ("c9", "0123456789abcdef"),
        ("c9", "a:b"),
        (&*"x".repeat(129), "eth0"),
    ] {
        let (s, b) = a.put(cid, ifname, "vlan", &c_net).await;
        assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    }

    // macvlan: on the parent's network only; the pair comes and goes on the parent.
    let (s, b) = a.put("m1", "eth0", "macvlan", &c_net).await;
    assert_neutron_error(s, &b, StatusCode::BAD_REQUEST, None);
    let m1 = a.attach("m1", "eth0", "macvlan", &vm_net).await;
    assert!(m1.get("vlan").is_none(), "{m1}");
    let pair = json!({"ip_address": m1["addresses"][0]["ip_address"], "mac_address": m1["mac_address"]});
    assert_eq!(pairs_of(&m.api, &parent).await, vec![pair.clone()]);
    assert_eq!(a.attach("m1", "eth0", "macvlan", &vm_net).await, m1);
    let (_, p) = m
        .api
        .get(&format!("/v2.0/ports/{}", m1["port_id"].as_str().unwrap()))
        .await;
    assert_eq!(
        (&p["port"]["device_owner"], &p["port"]["device_id"]),
        (&json!("isthmus:nested"), &json!(trunk))
    );
    // Its port deleted through Neutron: the pair goes with it; the next PUT makes a new one.
    let (s, b) = m
        .api
        .delete(&format!("/v2.0/ports/{}", m1["port_id"].as_str().unwrap()))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, _) = a.get("m1", "eth0").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        pairs_of(&m.api, &parent).await.is_empty(),
        "the deleted port's pair stayed"
    );
    let m1b = a.attach("m1", "eth0", "macvlan", &vm_net).await;
    assert_ne!(m1b["port_id"], m1["port_id"]);
    let pair_b = json!({"ip_address": m1b["addresses"][0]["ip_address"], "mac_address": m1b["mac_address"]});
    assert_eq!(pairs_of(&m.api, &parent).await, vec![pair_b]);
    let (s, _) = a.delete("m1", "eth0").await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(pairs_of(&m.api, &parent).await.is_empty());
    let (s, _) = m
        .api
        .get(&format!("/v2.0/ports/{}", m1b["port_id"].as_str().unwrap()))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Refusals: all one 401, whatever is wrong; a Keystone token counts for nothing here.
    let (cred_id, _) = header.split_once('.').unwrap();
    let long = "a".repeat(5000);
    let refused: Vec<Option<String>> = vec![
        None,
        Some(String::new()),
        Some("garbage".into()),
        Some(format!("{cred_id}.")),
        Some(format!(".{secret}")),
        Some(format!("{cred_id}.{secret}x")),
        Some(format!("{cred_id}.wrong")),
        Some(format!("00000000-0000-4000-8000-000000000000.{secret}")),
        Some(format!("{cred_id}.{long}")),
        Some(b_header.replace('.', ".x")),
    ];
    let mut bodies = BTreeSet::new();
    for h in &refused {
        let n = Nested::new(&server.network_url, &server.http, h.as_deref());
        for (s, b) in [
            n.get("c2", "eth0").await,
            n.put("c5", "eth0", "vlan", &c_net).await,
            n.delete("c2", "eth0").await,
        ] {
            assert_neutron_error(s, &b, StatusCode::UNAUTHORIZED, None);
            bodies.insert(b.to_string());
        }
    }
    // A header value that is not text.
    let resp = server
        .http
        .get(format!("{}/isthmus/v1/nested/attachments/c2/eth0", server.network_url))
        .header(
            HEADER,
            reqwest::header::HeaderValue::from_bytes(b"\xff\xfe.\x80").unwrap(),
        )
        .send()
        .await
        .unwrap();
    let (s, b) = read(resp).await;
    assert_neutron_error(s, &b, StatusCode::UNAUTHORIZED, None);
    bodies.insert(b.to_string());
    for token in [&m.token, &server.admin.token] {
        for method in [Method::GET, Method::PUT, Method::DELETE] {
            let body = (method == Method::PUT).then(|| json!({"attachment": {"mode": "vlan", "network_id": c_net}}));
            let (s, b) = Api {
                token: token.clone(),
                ..m.api.clone()
            }
            .call(method, "/isthmus/v1/nested/attachments/c6/eth0", body)
            .await;
            assert_neutron_error(s, &b, StatusCode::UNAUTHORIZED, None);
            bodies.insert(b.to_string());
        }
    }
    assert_eq!(bodies.len(), 1, "refusals differ: {bodies:?}");
    assert_eq!(
        subports(&m.api, &trunk).await.len(),
        2,
        "a refused request changed something"
    );

    // At most 16 credentials per trunk; a deleted one stops working at once.
    let (_, b) = m.api.get(&format!("/isthmus/v1/trunks/{trunk_b}/credentials")).await;
    let held = b["credentials"].as_array().unwrap().len();
    for _ in held..16 {
        header_for(&m.api, &trunk_b).await;
    }
    let (s, b) = credential(&m.api, &trunk_b).await;
    assert_neutron_error(s, &b, StatusCode::CONFLICT, None);
    let (b_id, _) = b_header.split_once('.').unwrap();
    let (s, b) = m
        .api
        .delete(&format!("/isthmus/v1/trunks/{trunk_b}/credentials/{b_id}"))
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b) = bn.get("c2", "eth0").await;
    assert_neutron_error(s, &b, StatusCode::UNAUTHORIZED, None);
    let (s, b) = m
        .api
        .delete(&format!("/isthmus/v1/trunks/{trunk_b}/credentials/{b_id}"))
        .await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, None);

    // Ten containers at once (through two servers on etcd): ten distinct VLANs.
    let second = match server.etcd() {
        Some(etcd) => Some(TestServer::start_on_etcd(etcd, |_| {}).await),
        None => None,
    };
    let urls: Vec<String> = std::iter::once(server.network_url.clone())
        .chain(second.iter().map(|s| s.network_url.clone()))
        .collect();
    let mut tasks = vec![];
    for i in 0..10 {
        let n = Nested::new(&urls[i % urls.len()], &server.http, Some(&header));
        let net = c_net.clone();
        tasks.push(tokio::spawn(async move {
            n.put(&format!("many-{i}"), "eth0", "vlan", &net).await
        }));
    }
    let mut vlans = BTreeSet::new();
    for t in tasks {
        let (s, b) = t.await.expect("task");
        assert_eq!(s, StatusCode::OK, "{b}");
        vlans.insert(b["attachment"]["vlan"].as_u64().unwrap());
    }
    assert_eq!(vlans.len(), 10, "{vlans:?}");
    let subs = subports(&m.api, &trunk).await;
    assert_eq!(subs.len(), 12);
    let all: BTreeSet<u64> = subs.iter().map(|(_, v)| *v).collect();
    assert_eq!(all, (1..=12).collect::<BTreeSet<u64>>());

    // The trunk's status follows its ports'.
    assert_eq!(trunk_status(&m.api, &trunk).await, "DOWN");
    set_status(&server.admin, &parent, "ACTIVE").await;
    assert_eq!(trunk_status(&m.api, &trunk).await, "DEGRADED");
    for (p, _) in &subs {
        set_status(&server.admin, p, "ACTIVE").await;
    }
    assert_eq!(trunk_status(&m.api, &trunk).await, "ACTIVE");

    // Deleting the trunk ends its credentials.
    let (s, b) = m.api.delete(&format!("/v2.0/trunks/{trunk}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b) = a.get("c2", "eth0").await;
    assert_neutron_error(s, &b, StatusCode::UNAUTHORIZED, None);
    let (s, b) = m.api.get(&creds).await;
    assert_neutron_error(s, &b, StatusCode::NOT_FOUND, Some("TrunkNotFound"));
    // Nothing of it is left in the store.
    let cache = &server.handle.as_ref().unwrap().state.cache;
    assert!(cache
        .list(&isthmus_model::keys::nested_attachment_prefix(&trunk))
        .is_empty());
    let left: Vec<_> = cache
        .list(isthmus_model::keys::TRUNK_CREDENTIAL_PREFIX)
        .into_iter()
        .filter(|kv| String::from_utf8_lossy(&kv.value).contains(&trunk))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    if let Some(mut s2) = second {
        s2.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_on_the_embedded_store() {
    check(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_on_etcd() {
    check(Backend::Etcd).await;
}
