//! The agent runtime against an in-process server, with the fake kernel: no root needed.
//! Binding, the wait for the node's view, status reports, token expiry, foreign ports.

#[path = "../../server/tests/support/certs.rs"]
mod certs;

use isthmus_agent::kernel::FakeKernel;
use isthmus_agent::plan::Action;
use isthmus_agent::runtime::{Agent, AgentConfig};
use isthmus_agent::socket::request;
use isthmus_server::Config;
use serde_json::{json, Value};
use std::time::Duration;

const ADMIN_PASSWORD: &str = "admin-secret-Pw1";
const NODE_PASSWORD: &str = "node-secret-Pw1";

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = http.request(method, url).header("X-Auth-Token", token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn token(http: &reqwest::Client, identity_url: &str, user: &str, password: &str, project: &str) -> String {
    let config = isthmus_client::Config::new(identity_url, isthmus_client::Auth::password(user, password, project))
        .identity_only();
    let client = isthmus_client::Client::with_http(http.clone(), config);
    match client.token(None).await {
        Ok(t) => t.secret().to_string(),
        Err(e) => panic!("token for {user}/{project}: {e}"),
    }
}

/// The id of the identity object (`projects`, `roles`, ...) named `name`.
async fn id_by_name(http: &reqwest::Client, id_url: &str, token: &str, collection: &str, name: &str) -> String {
    let url = format!("{id_url}/{collection}?name={name}");
    let (s, b) = call(http, reqwest::Method::GET, &url, token, None).await;
    assert_eq!(s, 200, "{url}: {b}");
    b[collection][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{url}: no {name}: {b}"))
        .to_string()
}

/// An in-process server (embedded store) with a node user `n1`, a network with a subnet.
struct Bed {
    _dir: tempfile::TempDir,
    _server: isthmus_server::ServerHandle,
    dir: std::path::PathBuf,
    net_url: String,
    id_url: String,
    http: reqwest::Client,
    net: String,
    vni: u64,
    /// With HTTPS: the CA that signed the server's certificate.
    ca: Option<certs::TestCa>,
}

impl Bed {
    async fn new(token_ttl_secs: u64) -> Bed {
        Bed::start(token_ttl_secs, false).await
    }

    /// `tls`: the server serves HTTPS with a certificate from a test CA.
    async fn start(token_ttl_secs: u64, tls: bool) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            identity_listen: "127.0.0.1:0".parse().unwrap(),
            network_listen: "127.0.0.1:0".parse().unwrap(),
            admin_password: Some(ADMIN_PASSWORD.into()),
            password_hash_kib: 64,
            token_ttl_secs,
            ..Config::default()
        };
        config.unlimited_quotas();
        let ca = tls.then(|| {
            let ca = certs::TestCa::new("agent test CA");
            let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server-key.pem"));
            ca.issue(&cert, &key);
            config.tls_cert_file = Some(cert);
            config.tls_key_file = Some(key);
            ca
        });
        let store = isthmus_store::embedded::EmbeddedStore::open(&dir.path().join("store")).unwrap();
        let server = isthmus_server::start(config, store).await.unwrap();
        let net_url = server.state.network_url.trim_end_matches('/').to_string();
        let id_url = server.state.identity_url.clone();
        let http = isthmus_client::http_client_with_ca(ca.as_ref().map(|c| c.ca_file.as_path())).unwrap();
        let t = token(&http, &id_url, "admin", ADMIN_PASSWORD, "admin").await;
        // The node user.
        let (s, b) = call(
            &http,
            reqwest::Method::POST,
            &format!("{id_url}/users"),
            &t,
            Some(json!({"user": {"name": "n1", "password": NODE_PASSWORD, "domain_id": "default"}})),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        let uid = b["user"]["id"].as_str().unwrap().to_string();
        let service = id_by_name(&http, &id_url, &t, "projects", "service").await;
        let role = id_by_name(&http, &id_url, &t, "roles", "node").await;
        // The node role on the service project, and on the admin project, whose ports it
        // claims (that project's grant).
        let admin_project = id_by_name(&http, &id_url, &t, "projects", "admin").await;
        for project in [&service, &admin_project] {
            let (s, b) = call(
                &http,
                reqwest::Method::PUT,
                &format!("{id_url}/projects/{project}/users/{uid}/roles/{role}"),
                &t,
                None,
            )
            .await;
            assert_eq!(s, 204, "{b}");
        }
        // A network and a subnet with a host route.
        let url = format!("{net_url}/v2.0/networks");
        let (s, n) = call(
            &http,
            reqwest::Method::POST,
            &url,
            &t,
            Some(json!({"network": {"name": "n"}})),
        )
        .await;
        assert_eq!(s, 201, "{n}");
        let net = n["network"]["id"].as_str().unwrap().to_string();
        let vni = n["network"]["provider:segmentation_id"].as_u64().unwrap();
        let (s, b) = call(
            &http,
            reqwest::Method::POST,
            &format!("{net_url}/v2.0/subnets"),
            &t,
            Some(
                json!({"subnet": {"network_id": net, "cidr": "10.5.0.0/24", "ip_version": 4,
                "host_routes": [{"destination": "172.16.0.0/16", "nexthop": "10.5.0.254"}]}}),
            ),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        Bed {
            dir: dir.path().to_path_buf(),
            _dir: dir,
            _server: server,
            net_url,
            id_url,
            http,
            net,
            vni,
            ca,
        }
    }

    async fn admin(&self) -> String {
        token(&self.http, &self.id_url, "admin", ADMIN_PASSWORD, "admin").await
    }

    fn agent_config(&self) -> AgentConfig {
        let mut cfg = AgentConfig::new(
            "n1",
            &self.net_url,
            &self.id_url,
            NODE_PASSWORD,
            "192.0.2.1".parse().unwrap(),
        );
        cfg.socket = self.dir.join("agent.sock");
        cfg.resync = Duration::from_secs(1);
        cfg.heartbeat = Duration::from_secs(1);
        cfg.ca_file = self.ca.as_ref().map(|c| c.ca_file.clone());
        cfg
    }

    /// The node's agent record as the agents API shows it.
    async fn node_agent(&self) -> Value {
        let t = self.admin().await;
        let (_, b) = call(
            &self.http,
            reqwest::Method::GET,
            &format!("{}/v2.0/agents", self.net_url),
            &t,
            None,
        )
        .await;
        b["agents"][0].clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_and_detach_through_the_socket_with_expiring_tokens() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("isthmus_agent=debug"))
        .with_test_writer()
        .try_init();
    tokio::time::timeout(Duration::from_secs(60), async {
        // Tokens expire during the test: the agent must re-authenticate.
        let bed = Bed::new(2).await;
        let (net_url, http, net, vni) = (bed.net_url.clone(), bed.http.clone(), bed.net.clone(), bed.vni);
        let admin = || bed.admin();
        let t = admin().await;
        // A port, and a port bound elsewhere.
        let post = |path: &'static str, body: Value| {
            let (http, t, url) = (http.clone(), t.clone(), format!("{net_url}{path}"));
            async move { call(&http, reqwest::Method::POST, &url, &t, Some(body)).await }
        };
        let (s, p) = post("/v2.0/ports", json!({"port": {"network_id": net}})).await;
        assert_eq!(s, 201, "{p}");
        let port = p["port"]["id"].as_str().unwrap().to_string();
        let (s, other) = post(
            "/v2.0/ports",
            json!({"port": {"network_id": net, "binding:host_id": "elsewhere"}}),
        )
        .await;
        assert_eq!(s, 201, "{other}");
        let other = other["port"]["id"].as_str().unwrap().to_string();

        let cfg = bed.agent_config();
        let sock = cfg.socket.clone();
        let agent = Agent::new(cfg, FakeKernel::new()).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(agent.clone().run(async {
            let _ = stop_rx.await;
        }));
        while tokio::net::UnixStream::connect(&sock).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let attach = json!({"op": "attach", "port_id": port, "netns": "/proc/self/ns/net", "ifname": "eth1"});
        let a = request(&sock, &attach).await.unwrap();
        assert_eq!(a["ok"], json!(true), "{a}");
        assert_eq!(a["interface"], json!("eth1"));
        assert_eq!(a["mtu"], json!(1450));
        assert_eq!(a["ips"][0]["gateway"], json!("10.5.0.1"), "{a}");
        assert!(a["ips"][0]["address"].as_str().unwrap().ends_with("/24"), "{a}");
        assert_eq!(
            a["routes"],
            json!([{"destination": "172.16.0.0/16", "nexthop": "10.5.0.254"}])
        );
        let state = agent.kernel().state();
        assert!(state.bridges.contains_key(&format!("isbr-{vni}")), "{state:?}");
        assert!(state.ports.contains_key(&isthmus_agent::names::tap(&port)), "{state:?}");
        let attached = agent.kernel().attached();
        assert_eq!(attached.len(), 1);
        assert_eq!(attached[0].routes.len(), 1);
        assert_eq!(attached[0].gateway, Some("10.5.0.1".parse().unwrap()));

        let get_port = |id: String| {
            let (http, url) = (http.clone(), format!("{net_url}/v2.0/ports/{id}"));
            let admin_tok = admin();
            async move {
                let t = admin_tok.await;
                call(&http, reqwest::Method::GET, &url, &t, None).await.1["port"].clone()
            }
        };
        let p = get_port(port.clone()).await;
        assert_eq!(
            (p["status"].clone(), p["binding:host_id"].clone()),
            (json!("ACTIVE"), json!("n1")),
            "{p}"
        );
        assert_eq!(
            p["binding:vif_details"]["bridge_name"],
            json!(format!("isbr-{vni}")),
            "{p}"
        );

        // A port bound to another node cannot be claimed.
        let e = request(
            &sock,
            &json!({"op": "attach", "port_id": other, "netns": "/proc/self/ns/net"}),
        )
        .await
        .unwrap();
        assert_eq!((e["ok"].clone(), e["code"].clone()), (json!(false), json!(404)), "{e}");

        // Past the token lifetime: the agent re-authenticates for its reports.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let d = request(&sock, &json!({"op": "detach", "port_id": port})).await.unwrap();
        assert_eq!(d["ok"], json!(true), "{d}");
        assert_eq!(get_port(port.clone()).await["status"], json!("DOWN"));
        assert!(agent.kernel().state().ports.is_empty());
        // Heartbeats kept going: the node is alive.
        let t = admin().await;
        let (_, b) = call(&http, reqwest::Method::GET, &format!("{net_url}/v2.0/agents"), &t, None).await;
        assert_eq!(b["agents"][0]["alive"], json!(true), "{b}");

        // A VM port bound to this node (as Nova does): the agent creates its TAP device and
        // reports it ACTIVE; deleting the port removes the device.
        let t = admin().await;
        let (s, vm) = call(
            &http,
            reqwest::Method::POST,
            &format!("{net_url}/v2.0/ports"),
            &t,
            Some(json!({"port": {"network_id": net, "device_owner": "compute:nova", "binding:host_id": "n1"}})),
        )
        .await;
        assert_eq!(s, 201, "{vm}");
        let vm = vm["port"]["id"].as_str().unwrap().to_string();
        let tap = isthmus_agent::names::tap(&vm);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while get_port(vm.clone()).await["status"] != json!("ACTIVE") {
            assert!(
                std::time::Instant::now() < deadline,
                "the VM port never went ACTIVE: {:?} {}",
                agent.kernel().state(),
                get_port(vm.clone()).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let dev = agent.kernel().state().ports.get(&tap).cloned();
        assert!(dev.is_some_and(|d| !d.veth), "no tap device for the VM port");
        let (s, _) = call(
            &http,
            reqwest::Method::DELETE,
            &format!("{net_url}/v2.0/ports/{vm}"),
            &t,
            None,
        )
        .await;
        assert_eq!(s, 204);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while agent.kernel().state().ports.contains_key(&tap) {
            assert!(
                std::time::Instant::now() < deadline,
                "the VM port's tap outlived the port"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let _ = stop_tx.send(());
        run.await.unwrap().unwrap();
        assert!(!sock.exists(), "the socket is removed on shutdown");
    })
    .await
    .expect("test timed out");
}

/// What the datapath cannot do is retried and reported: a bridge the kernel refuses shows up
/// in the node's heartbeat (agents API, `configurations.failures`) with no converged revision
/// past it; once the kernel accepts it, the failure clears and the revision advances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datapath_failures_are_retried_and_reported_in_the_heartbeat() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let bed = Bed::new(3600).await;
        let kernel = FakeKernel::new();
        let bridge = format!("isbr-{}", bed.vni);
        {
            let bridge = bridge.clone();
            kernel.fail_on(move |a| matches!(a, Action::CreateBridge(b) if b.name == bridge));
        }
        let agent = Agent::new(bed.agent_config(), kernel).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(agent.clone().run(async {
            let _ = stop_rx.await;
        }));
        // A VM port bound to this node: its network needs the refused bridge.
        let t = bed.admin().await;
        let (s, vm) = call(
            &bed.http,
            reqwest::Method::POST,
            &format!("{}/v2.0/ports", bed.net_url),
            &t,
            Some(json!({"port": {"network_id": bed.net, "device_owner": "compute:nova", "binding:host_id": "n1"}})),
        )
        .await;
        assert_eq!(s, 201, "{vm}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let failing = loop {
            let a = bed.node_agent().await;
            let failures = a["configurations"]["failures"].as_array().cloned().unwrap_or_default();
            if failures.iter().any(|f| f.as_str().is_some_and(|f| f.contains(&bridge))) {
                break a;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the failure was never reported: {a}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // Converged, if at all, only to a revision from before the port (the first snapshot
        // may converge at once): the failing revision is never reported as converged.
        let stuck = failing["configurations"]["converged_revision"].as_i64();
        assert!(!agent.kernel().state().bridges.contains_key(&bridge));

        // The kernel accepts it now: the retry makes it, the report clears.
        agent.kernel().clear_failures();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let a = bed.node_agent().await;
            let clear = a["configurations"]["failures"].as_array().is_none_or(|f| f.is_empty());
            if clear && a["configurations"]["converged_revision"].as_i64() > stuck {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never converged past {stuck:?}: {a}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(agent.kernel().state().bridges.contains_key(&bridge));
        let _ = stop_tx.send(());
        run.await.unwrap().unwrap();
    })
    .await
    .expect("test timed out");
}

/// The firewall is only counted as changed once it is: a failing `nft` is retried and
/// reported, and the change comes as soon as the firewall works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_firewall_change_is_retried_not_assumed() {
    use isthmus_agent::controller::firewall::FirewallController;
    use isthmus_agent::state::NodeState;
    use std::sync::Arc;
    let kernel = Arc::new(FakeKernel::new());
    let state = NodeState::new("n1", "192.0.2.1".parse().unwrap());
    state.apply(serde_json::from_value(json!({"type": "snapshot", "revision": 1, "objects": []})).unwrap());
    let fw = FirewallController::new(kernel.clone(), Duration::from_secs(3600));
    // An earlier run left the tables; the node has nothing now: they must go.
    kernel.install_firewall_by_hand();
    kernel.fail_firewall(true);
    let snap = state.snapshot().unwrap();
    let o = fw.pass(&snap).await.unwrap();
    assert_eq!(o.failures.len(), 1, "{o:?}");
    assert!(kernel.firewall_installed(), "the failed removal changed nothing");
    // Still failing: still reported, not assumed done.
    let o = fw.pass(&snap).await.unwrap();
    assert_eq!(o.failures.len(), 1, "{o:?}");
    kernel.fail_firewall(false);
    let o = fw.pass(&snap).await.unwrap();
    assert!(o.failures.is_empty(), "{o:?}");
    assert!(!kernel.firewall_installed());
    // Converged: nothing to do, nothing asked of the kernel.
    assert_eq!(fw.pass(&snap).await.unwrap().planned, 0);
}

/// The agent against an HTTPS server, trusting its CA: it registers, follows its node
/// stream and programs a bound port's network. With another CA its client is refused, saying
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_works_over_https_with_the_servers_ca() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let bed = Bed::start(3600, true).await;
        assert!(bed.id_url.starts_with("https://"), "{}", bed.id_url);
        let agent = Agent::new(bed.agent_config(), FakeKernel::new()).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(agent.clone().run(async {
            let _ = stop_rx.await;
        }));
        let t = bed.admin().await;
        let (s, vm) = call(
            &bed.http,
            reqwest::Method::POST,
            &format!("{}/v2.0/ports", bed.net_url),
            &t,
            Some(json!({"port": {"network_id": bed.net, "device_owner": "compute:nova", "binding:host_id": "n1"}})),
        )
        .await;
        assert_eq!(s, 201, "{vm}");
        let bridge = format!("isbr-{}", bed.vni);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let a = bed.node_agent().await;
            if a["alive"] == true && agent.kernel().state().bridges.contains_key(&bridge) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent never registered and programmed {bridge} over https: {a}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = stop_tx.send(());
        run.await.unwrap().unwrap();

        let other = certs::TestCa::new("not the server's CA");
        let creds = isthmus_agent::client::Credentials {
            user: "n1".into(),
            password: NODE_PASSWORD.into(),
            project: "service".into(),
        };
        let client =
            isthmus_agent::client::Client::new(&bed.net_url, &bed.id_url, "n1", creds, Some(&other.ca_file)).unwrap();
        let hb = isthmus_wire::node::Heartbeat {
            underlay_ip: "192.0.2.1".into(),
            capabilities: vec![],
            restarted: true,
            converged_revision: None,
            failures: vec![],
        };
        let e = client.heartbeat(hb).await.expect_err("heartbeat trusted another CA");
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    })
    .await
    .expect("test timed out");
}
/// The sum of the samples of `name` whose labels include all of `labels` (0 if none).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The agent's metrics endpoint, scraped over HTTP: reconcile passes, an attach and the
/// datapath's objects show up as they happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_follows_reconciles_and_attaches() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let bed = Bed::new(3600).await;
        let t = bed.admin().await;
        let (s, p) = call(
            &bed.http,
            reqwest::Method::POST,
            &format!("{}/v2.0/ports", bed.net_url),
            &t,
            Some(json!({"port": {"network_id": bed.net}})),
        )
        .await;
        assert_eq!(s, 201, "{p}");
        let port = p["port"]["id"].as_str().unwrap().to_string();

        let mut registry = isthmus_server::metrics::Registry::default();
        let mut cfg = bed.agent_config();
        cfg.metrics = isthmus_agent::metrics::AgentMetrics::new(&mut registry);
        let endpoint = isthmus_server::metrics::listen("127.0.0.1:0".parse().unwrap(), std::sync::Arc::new(registry))
            .await
            .unwrap();
        let url = format!("http://{}/metrics", endpoint.addr);
        let scrape = || {
            let (http, url) = (bed.http.clone(), url.clone());
            async move { http.get(&url).send().await.unwrap().text().await.unwrap() }
        };
        let before = scrape().await;
        assert_eq!(
            sample(&before, "isthmus_agent_reconcile_duration_seconds_count", &[]),
            0.0
        );
        assert!(before.contains("isthmus_agent_build_info{version=\""), "{before}");

        let sock = cfg.socket.clone();
        let agent = Agent::new(cfg, FakeKernel::new()).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(agent.clone().run(async {
            let _ = stop_rx.await;
        }));
        while tokio::net::UnixStream::connect(&sock).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let a = request(
            &sock,
            &json!({"op": "attach", "port_id": port, "netns": "/proc/self/ns/net", "ifname": "eth1"}),
        )
        .await
        .unwrap();
        assert_eq!(a["ok"], json!(true), "{a}");
        let e = request(
            &sock,
            &json!({"op": "attach", "port_id": "no-such-port", "netns": "/proc/self/ns/net"}),
        )
        .await
        .unwrap();
        assert_eq!(e["ok"], json!(false), "{e}");

        // Passes run, the L2 pass planned the network's devices, the objects are counted.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let text = loop {
            let text = scrape().await;
            let l2 = [("controller", "l2")];
            if sample(&text, "isthmus_agent_reconcile_duration_seconds_count", &l2) >= 1.0
                && sample(&text, "isthmus_agent_datapath_objects", &[("kind", "bridges")]) == 1.0
                && sample(&text, "isthmus_agent_datapath_objects", &[("kind", "port_devices")]) == 1.0
            {
                break text;
            }
            assert!(std::time::Instant::now() < deadline, "metrics never caught up:\n{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for c in ["ports", "dhcp", "firewall", "l3", "qos"] {
            assert!(
                sample(
                    &text,
                    "isthmus_agent_reconcile_duration_seconds_count",
                    &[("controller", c)]
                ) >= 1.0,
                "{c}: {text}"
            );
        }
        assert!(
            sample(&text, "isthmus_agent_reconcile_actions_total", &[]) >= 1.0,
            "{text}"
        );
        let ok = [("op", "attach"), ("outcome", "ok")];
        let failed = [("op", "attach"), ("outcome", "error")];
        assert_eq!(sample(&text, "isthmus_agent_attach_duration_seconds_count", &ok), 1.0);
        assert_eq!(
            sample(&text, "isthmus_agent_attach_duration_seconds_count", &failed),
            1.0
        );
        assert!(sample(&text, "isthmus_agent_attach_duration_seconds_sum", &ok) > 0.0);

        let _ = stop_tx.send(());
        run.await.unwrap().unwrap();
        endpoint.stop().await;
    })
    .await
    .expect("test timed out");
}
