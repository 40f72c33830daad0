//! CNI end to end: the real `isthmus-cni` plugin binary, run as a container runtime runs it,
//! against real agents on the namespace test bed. Needs root (CI runs as root).
//!
//! - the spec's behaviour over the version matrix: ADD results, ADD onto an existing
//!   interface, CHECK catching a removed address or interface, DEL twice and without a
//!   namespace, GC of stale attachments only, error codes for bad input, STATUS without server;
//! - port pools: refilled after first use, used by ADD, no leak across an agent restart;
//! - containers on two nodes and a directly attached workload reach each other.

mod support;
mod testbed;

use reqwest::Method;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::{reaches, Ns};
use testbed::Testbed;

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

struct Plugin {
    bin: PathBuf,
    socket: PathBuf,
    project: String,
    network: String,
}

/// One plugin run: exit code and stdout parsed as JSON (Null when empty).
struct Run {
    code: i32,
    out: Value,
}

impl Plugin {
    fn config(&self, version: &str) -> Value {
        json!({"cniVersion": version, "name": "isthmus-test", "type": "isthmus",
               "network": self.network, "project": self.project, "socket": self.socket})
    }

    fn run_raw(&self, env: &[(&str, String)], stdin: &[u8]) -> Run {
        let mut cmd = Command::new(&self.bin);
        cmd.env_clear().env("CNI_PATH", "/usr/lib/cni");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = support::output_with_stdin(&mut cmd, stdin);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let parsed = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}): {text:?}"))
        };
        Run {
            code: out.status.code().unwrap_or(-1),
            out: parsed,
        }
    }

    fn run(&self, command: &str, container: &str, netns: Option<&Path>, conf: &Value) -> Run {
        let mut env = vec![
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", container.to_string()),
            ("CNI_IFNAME", "eth0".to_string()),
        ];
        if let Some(n) = netns {
            env.push(("CNI_NETNS", n.display().to_string()));
        }
        self.run_raw(&env, conf.to_string().as_bytes())
    }
}

fn ok(r: &Run, what: &str) {
    assert_eq!(r.code, 0, "{what}: {}", r.out);
}

fn err_code(r: &Run) -> u64 {
    assert_ne!(r.code, 0, "expected an error, got {}", r.out);
    r.out["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("error without code: {}", r.out))
}

/// A project with a network `net` on `cidr`; returns the member token.
async fn project_net(tb: &Testbed, project: &str, net: &str, cidr: &str) -> String {
    let t = tb.member(project).await;
    let n = tb.create(&t, "networks", "network", json!({"name": net})).await;
    let id = n["id"].as_str().expect("id");
    tb.create(
        &t,
        "subnets",
        "subnet",
        json!({"network_id": id, "cidr": cidr, "ip_version": 4, "dns_nameservers": ["10.1.1.1"]}),
    )
    .await;
    t
}

/// Every port, as an admin sees it (with binding details).
async fn all_ports(tb: &Testbed) -> Vec<Value> {
    let (s, b) = tb.net(Method::GET, "/v2.0/ports", None).await;
    assert_eq!(s, 200, "{b}");
    b["ports"].as_array().cloned().unwrap_or_default()
}

async fn ports_of(tb: &Testbed, token: &str) -> Vec<Value> {
    let (s, b) = tb.net_as(token, Method::GET, "/v2.0/ports", None).await;
    assert_eq!(s, 200, "{b}");
    b["ports"].as_array().cloned().unwrap_or_default()
}

fn addr_of(result: &Value) -> String {
    let a = result["ips"][0]["address"].as_str().expect("an address");
    a.split('/').next().expect("address").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_spec_behaviour_over_the_version_matrix() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut tb = Testbed::start_with(1, true).await;
        let token = project_net(&tb, "cni", "blue", "10.30.0.0/24").await;
        let p = Plugin {
            bin: tokio::task::spawn_blocking(isthmus_store::testing::cni_bin)
                .await
                .expect("build"),
            socket: tb.nodes[0].socket.clone(),
            project: "cni".into(),
            network: "blue".into(),
        };

        // VERSION.
        let v = p.run_raw(&[("CNI_COMMAND", "VERSION".into())], br#"{"cniVersion":"1.1.0"}"#);
        ok(&v, "VERSION");
        for ver in VERSIONS {
            assert!(
                v.out["supportedVersions"]
                    .as_array()
                    .expect("list")
                    .contains(&json!(ver)),
                "{}",
                v.out
            );
        }

        // ADD for every version: a valid result, the address really on eth0 in the namespace.
        let mut attached = vec![];
        for ver in VERSIONS {
            let ns = Ns::new();
            let cid = format!("c-{}", ver.replace('.', ""));
            let r = p.run("ADD", &cid, Some(&ns.path()), &p.config(ver));
            ok(&r, &format!("ADD {ver}"));
            let res = &r.out;
            assert_eq!(res["cniVersion"], ver, "{res}");
            let ip = addr_of(res);
            assert!(ip.starts_with("10.30.0."), "{res}");
            assert_eq!(res["ips"][0]["gateway"], "10.30.0.1", "{res}");
            if ver.starts_with("0.") {
                assert_eq!(res["ips"][0]["version"], "4", "{ver}: {res}");
            } else {
                assert!(res["ips"][0].get("version").is_none(), "{ver}: {res}");
            }
            let ifs = res["interfaces"].as_array().expect("interfaces");
            let idx = res["ips"][0]["interface"].as_u64().expect("interface index") as usize;
            assert_eq!(ifs[idx]["name"], "eth0", "{res}");
            assert_eq!(ifs[idx]["sandbox"], json!(ns.path()), "{res}");
            assert_eq!(res["dns"]["nameservers"], json!(["10.1.1.1"]), "{res}");
            assert!(ns.ip(&["addr", "show", "eth0"]).contains(&format!("{ip}/24")));
            assert_eq!(ns.mtu("eth0"), 1450);
            attached.push((ver, cid, ns, res.clone()));
        }
        // The API shows them ACTIVE, owned by the project, bound to the node.
        let ports = ports_of(&tb, &token).await;
        for (_, cid, _, _) in &attached {
            let port = ports
                .iter()
                .find(|x| x["device_id"] == cid.as_str())
                .expect("port of container");
            assert_eq!(port["status"], "ACTIVE", "{port}");
        }

        // ADD onto an interface that already exists is an error, and leaves no port behind.
        let (ver, cid, ns, _) = &attached[4];
        let before = ports_of(&tb, &token).await.len();
        let r = p.run("ADD", &format!("{cid}-again"), Some(&ns.path()), &p.config(ver));
        err_code(&r);
        assert!(r.out["msg"].as_str().unwrap_or("").contains("eth0"), "{}", r.out);
        let after = ports_of(&tb, &token).await;
        assert!(
            after.iter().all(|x| x["device_id"] != format!("{cid}-again").as_str()),
            "failed ADD left a port: {before} -> {}",
            after.len()
        );

        // CHECK (0.4.0 and later): passes, then catches a removed address, then a removed link.
        for (ver, cid, ns, res) in attached.iter().filter(|a| a.0 != "0.3.0" && a.0 != "0.3.1") {
            let mut conf = p.config(ver);
            conf["prevResult"] = res.clone();
            ok(&p.run("CHECK", cid, Some(&ns.path()), &conf), &format!("CHECK {ver}"));
        }
        let (ver, cid, ns, res) = &attached[3];
        let mut conf = p.config(ver);
        conf["prevResult"] = res.clone();
        let ip = addr_of(res);
        ns.ip(&["addr", "del", &format!("{ip}/24"), "dev", "eth0"]);
        let r = p.run("CHECK", cid, Some(&ns.path()), &conf);
        err_code(&r);
        assert!(r.out["msg"].as_str().unwrap_or("").contains(&ip), "{}", r.out);
        let (ver, cid, ns, res) = &attached[2];
        let mut conf = p.config(ver);
        conf["prevResult"] = res.clone();
        ns.ip(&["link", "del", "eth0"]);
        err_code(&p.run("CHECK", cid, Some(&ns.path()), &conf));

        // DEL twice succeeds; DEL without a namespace (it is gone) succeeds and frees the port.
        let (ver, cid, ns, _) = &attached[0];
        ok(&p.run("DEL", cid, Some(&ns.path()), &p.config(ver)), "DEL");
        ok(&p.run("DEL", cid, Some(&ns.path()), &p.config(ver)), "DEL again");
        let (ver, cid, ns, _) = attached.remove(1);
        drop(ns);
        ok(&p.run("DEL", &cid, None, &p.config(ver)), "DEL without netns");
        let ports = ports_of(&tb, &token).await;
        for gone in ["c-030", "c-031"] {
            assert!(ports.iter().all(|x| x["device_id"] != gone), "{gone} still has a port");
        }

        // GC: only attachments missing from the valid list go; pool ports stay.
        let stale_port = ports_of(&tb, &token)
            .await
            .iter()
            .find(|x| x["device_id"] == "c-100")
            .and_then(|x| x["id"].as_str().map(str::to_string))
            .expect("c-100's port");
        let pool_before: Vec<String> = ports_of(&tb, &token)
            .await
            .iter()
            .filter(|x| x["device_id"] == "")
            .map(|x| x["id"].as_str().unwrap_or("").to_string())
            .collect();
        // Another config (same network name, another project) never touches these attachments.
        let mut other = p.config("1.1.0");
        other["project"] = json!("someone-else");
        other["cni.dev/valid-attachments"] = json!([]);
        ok(
            &p.run_raw(&[("CNI_COMMAND", "GC".into())], other.to_string().as_bytes()),
            "GC other",
        );
        assert!(
            ports_of(&tb, &token)
                .await
                .iter()
                .any(|x| x["id"] == stale_port.as_str()),
            "GC of another config removed this config's attachment"
        );
        let mut conf = p.config("1.1.0");
        conf["cni.dev/valid-attachments"] = json!([{"containerID": "c-110", "ifname": "eth0"},
                                                   {"containerID": "c-040", "ifname": "eth0"}]);
        ok(
            &p.run_raw(&[("CNI_COMMAND", "GC".into())], conf.to_string().as_bytes()),
            "GC",
        );
        let ports = ports_of(&tb, &token).await;
        let cids: Vec<&str> = ports
            .iter()
            .filter_map(|x| x["device_id"].as_str())
            .filter(|c| !c.is_empty())
            .collect();
        assert!(cids.contains(&"c-110") && cids.contains(&"c-040"), "{cids:?}");
        assert!(!cids.contains(&"c-100"), "GC left a stale attachment: {cids:?}");
        for id in &pool_before {
            assert!(
                ports.iter().any(|x| x["id"] == id.as_str()),
                "GC removed pool port {id}"
            );
        }
        assert!(!tb.nodes[0].has_link(&isthmus_agent::names::tap(&stale_port)));

        // Bad input: decoding errors 6, bad config 7, bad environment 4, unknown version 1.
        let env_add = |ns: &Ns| {
            vec![
                ("CNI_COMMAND", "ADD".to_string()),
                ("CNI_CONTAINERID", "c-bad".to_string()),
                ("CNI_IFNAME", "eth0".to_string()),
                ("CNI_NETNS", ns.path().display().to_string()),
            ]
        };
        let ns = Ns::new();
        assert_eq!(err_code(&p.run_raw(&env_add(&ns), b"{not json")), 6);
        let mut no_net = p.config("1.0.0");
        no_net.as_object_mut().expect("object").remove("network");
        assert_eq!(err_code(&p.run_raw(&env_add(&ns), no_net.to_string().as_bytes())), 7);
        let mut wrong = p.config("1.0.0");
        wrong["network"] = json!("no-such-network");
        assert_eq!(err_code(&p.run_raw(&env_add(&ns), wrong.to_string().as_bytes())), 7);
        // A project that did not grant this node the node role, or does not exist: the same
        // refusal, and nothing created there.
        let (s, b) = tb
            .identity(
                Method::POST,
                "/projects",
                Some(json!({"project": {"name": "ungranted", "domain_id": "default"}})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        let mut refusals = vec![];
        for project in ["ungranted", "no-such-project"] {
            let mut conf = p.config("1.0.0");
            conf["project"] = json!(project);
            let r = p.run_raw(&env_add(&ns), conf.to_string().as_bytes());
            err_code(&r);
            assert!(r.out.to_string().contains("node role"), "{project}: {}", r.out);
            refusals.push(r.out["msg"].clone());
        }
        assert_eq!(refusals[0], refusals[1]);
        assert_eq!(
            err_code(&p.run_raw(&env_add(&ns), p.config("9.9.9").to_string().as_bytes())),
            1
        );
        let mut bad_env = env_add(&ns);
        bad_env.retain(|(k, _)| *k != "CNI_CONTAINERID");
        assert_eq!(
            err_code(&p.run_raw(&bad_env, p.config("1.0.0").to_string().as_bytes())),
            4
        );
        let mut bad_env = env_add(&ns);
        bad_env[0].1 = "FLY".into();
        assert_eq!(
            err_code(&p.run_raw(&bad_env, p.config("1.0.0").to_string().as_bytes())),
            4
        );
        assert!(ports_of(&tb, &token).await.iter().all(|x| x["device_id"] != "c-bad"));

        // STATUS: fine with the server, 50 without it, fine again when it is back.
        let status = |p: &Plugin| {
            p.run_raw(
                &[("CNI_COMMAND", "STATUS".into())],
                p.config("1.1.0").to_string().as_bytes(),
            )
        };
        ok(&status(&p), "STATUS");
        tb.kill_server();
        let mut code = 0;
        for _ in 0..100 {
            let r = status(&p);
            if r.code != 0 {
                code = err_code(&r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(code, 50, "STATUS without a server");
        tb.restart_server().await;
        let mut back = false;
        for _ in 0..100 {
            if status(&p).code == 0 {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(back, "STATUS never recovered after the server returned");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_serve_adds_and_do_not_leak_across_restarts() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut tb = Testbed::start(2).await;
        let token = project_net(&tb, "pool", "green", "10.31.0.0/24").await;
        let bin = tokio::task::spawn_blocking(isthmus_store::testing::cni_bin)
            .await
            .expect("build");
        let sockets: Vec<PathBuf> = tb.nodes.iter().map(|n| n.socket.clone()).collect();
        let node0 = tb.nodes[0].name.clone();
        let plugin = |node: usize| Plugin {
            bin: bin.clone(),
            socket: sockets[node].clone(),
            project: "pool".into(),
            network: "green".into(),
        };
        // First ADD on node 0 creates its port; the pool then fills to its size (3).
        let a = Ns::new();
        let r = plugin(0).run("ADD", "ca", Some(&a.path()), &plugin(0).config("1.0.0"));
        ok(&r, "ADD ca");
        let free = |ports: &[Value]| -> Vec<String> {
            ports
                .iter()
                .filter(|x| x["device_id"] == "" && x["binding:host_id"] == node0.as_str())
                .filter_map(|x| x["id"].as_str().map(str::to_string))
                .collect()
        };
        let mut pool = vec![];
        for _ in 0..100 {
            pool = free(&all_ports(&tb).await);
            if pool.len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(pool.len(), 3, "pool never filled");
        // The next ADD takes a pool port, and the pool is topped up again.
        let b = Ns::new();
        let r = plugin(0).run("ADD", "cb", Some(&b.path()), &plugin(0).config("1.0.0"));
        ok(&r, "ADD cb");
        let ports = all_ports(&tb).await;
        let cb = ports.iter().find(|x| x["device_id"] == "cb").expect("cb's port");
        assert!(
            pool.contains(&cb["id"].as_str().unwrap_or("").to_string()),
            "ADD did not use the pool"
        );
        let mut total = 0;
        for _ in 0..100 {
            let ports = all_ports(&tb).await;
            total = ports.len();
            if free(&ports).len() == 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(total, 5, "2 attachments + 3 pool ports");
        // A restarted agent adopts its pool: no new ports, none lost, and it serves ADD.
        tb.nodes[0].kill_agent();
        tb.nodes[0].start_agent();
        tb.nodes[0].wait_socket().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(all_ports(&tb).await.len(), 5, "ports leaked or lost across a restart");
        // An ADD cut short by a crash leaves a pool port plumbed but unrecorded (simulated:
        // plumbed through the attach op, then the agent killed). The restarted agent releases
        // it and refills the pool.
        let orphan = free(&all_ports(&tb).await)[0].clone();
        let (_orphan_ns, _) = tb.nodes[0].attach(&orphan).await;
        tb.nodes[0].kill_agent();
        tb.nodes[0].start_agent();
        tb.nodes[0].wait_socket().await;
        let mut swept = false;
        for _ in 0..100 {
            let ports = all_ports(&tb).await;
            if ports.iter().all(|x| x["id"] != orphan.as_str()) && free(&ports).len() == 3 && ports.len() == 5 {
                swept = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(swept, "the orphaned pool port was not released and replaced");
        assert!(!tb.nodes[0].has_link(&isthmus_agent::names::tap(&orphan)));
        // Node 1 (no pool yet) and node 0 containers reach each other and a directly attached
        // workload.
        let c = Ns::new();
        let r1 = plugin(1).run("ADD", "cc", Some(&c.path()), &plugin(1).config("1.1.0"));
        ok(&r1, "ADD cc on node 1");
        let direct = tb
            .create(
                &token,
                "ports",
                "port",
                json!({"network_id": ports[0]["network_id"], "fixed_ips": [{"ip_address": "10.31.0.200"}]}),
            )
            .await;
        let (d, _) = tb.nodes[1].attach(direct["id"].as_str().expect("id")).await;
        let (ipa, ipb, ipc) = (
            addr_of(&ports_to_result(&all_ports(&tb).await, "ca")),
            addr_of(&ports_to_result(&all_ports(&tb).await, "cb")),
            addr_of(&r1.out),
        );
        let mut all = false;
        for _ in 0..20 {
            all = reaches(&a, &ipa, &c, &ipc)
                && reaches(&b, &ipb, &c, &ipc)
                && reaches(&c, &ipc, &d, "10.31.0.200")
                && reaches(&a, &ipa, &d, "10.31.0.200");
            if all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            all,
            "containers on two nodes and a direct workload do not all reach each other"
        );
        // DEL releases the ports; the pool stays at its size.
        for (cid, ns) in [("ca", &a), ("cb", &b)] {
            ok(
                &plugin(0).run("DEL", cid, Some(&ns.path()), &plugin(0).config("1.0.0")),
                "DEL",
            );
        }
        ok(
            &plugin(1).run("DEL", "cc", Some(&c.path()), &plugin(1).config("1.1.0")),
            "DEL cc",
        );
        let ports = all_ports(&tb).await;
        assert!(ports
            .iter()
            .all(|x| !["ca", "cb", "cc"].contains(&x["device_id"].as_str().unwrap_or(""))));
        assert_eq!(free(&ports).len(), 3);
    })
    .await
    .expect("test timed out");
}

/// A result-shaped value with the address of `container`'s port (for `addr_of`).
fn ports_to_result(ports: &[Value], container: &str) -> Value {
    let p = ports
        .iter()
        .find(|x| x["device_id"] == container)
        .expect("port of container");
    json!({"ips": [{"address": p["fixed_ips"][0]["ip_address"]}]})
}

/// Free pool ports of `node` on network `net_id`, as the API shows them.
async fn pool_of(tb: &Testbed, node: &str, net_id: &str) -> Vec<Value> {
    all_ports(tb)
        .await
        .into_iter()
        .filter(|x| x["device_id"] == "" && x["binding:host_id"] == node && x["network_id"] == net_id)
        .collect()
}

/// Waits until `node` keeps `n` free pool ports on `net_id`; returns them.
async fn pool_filled(tb: &Testbed, node: &str, net_id: &str, n: usize) -> Vec<Value> {
    for _ in 0..150 {
        let pool = pool_of(tb, node, net_id).await;
        if pool.len() == n {
            return pool;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the pool of {net_id} on {node} never reached {n}");
}

/// What a failed ADD of `cid` left, as the API shows it: ports recorded for it, and pool
/// ports reported ACTIVE (plugged somewhere).
async fn leftovers(tb: &Testbed, node: &str, cid: &str) -> Vec<Value> {
    all_ports(tb)
        .await
        .into_iter()
        .filter(|x| x["binding:host_id"] == node)
        .filter(|x| x["device_id"] == cid || (x["device_id"] == "" && x["status"] == "ACTIVE"))
        .collect()
}

/// An ADD that fails because the server stops answering (SIGSTOP) or cannot be reached (the
/// node's underlay link down) mid-ADD leaves nothing: no interface in the container, no
/// plugged host device, and once the server is back no port claimed by the container or
/// ACTIVE in the pool; DEL then answers 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_add_leaves_nothing_behind() {
    support::require_root();
    tokio::time::timeout(Duration::from_secs(300), async {
        let tb = Testbed::start_with(1, true).await;
        let token = project_net(&tb, "fail", "red", "10.32.0.0/24").await;
        let p = Plugin {
            bin: tokio::task::spawn_blocking(isthmus_store::testing::cni_bin)
                .await
                .expect("build"),
            socket: tb.nodes[0].socket.clone(),
            project: "fail".into(),
            network: "red".into(),
        };
        let node = tb.nodes[0].name.clone();
        let first = Ns::new();
        ok(
            &p.run("ADD", "c-first", Some(&first.path()), &p.config("1.1.0")),
            "ADD c-first",
        );
        let net_id = ports_of(&tb, &token).await[0]["network_id"]
            .as_str()
            .expect("network id")
            .to_string();

        for (cid, how) in [("c-stopped", "server stopped"), ("c-unreachable", "underlay down")] {
            // The ADD will take a pool port: the node has its view, the server just cannot
            // record the attachment.
            let pool: Vec<String> = pool_filled(&tb, &node, &net_id, 3)
                .await
                .iter()
                .filter_map(|x| x["id"].as_str().map(str::to_string))
                .collect();
            let ns = Ns::new();
            match how {
                "server stopped" => tb.pause_server(true),
                _ => drop(tb.nodes[0].ns.ip(&["link", "set", "und0", "down"])),
            }
            let r = tokio::task::block_in_place(|| p.run("ADD", cid, Some(&ns.path()), &p.config("1.1.0")));
            let code = err_code(&r);
            assert_eq!(code, 11, "{how}: {}", r.out);
            assert!(
                ns.link("eth0").is_none(),
                "{how}: the failed ADD left eth0 in the container"
            );
            for id in &pool {
                assert!(
                    !tb.nodes[0].has_link(&isthmus_agent::names::tap(id)),
                    "{how}: the failed ADD left pool port {id} plugged"
                );
            }
            match how {
                "server stopped" => tb.pause_server(false),
                _ => drop(tb.nodes[0].ns.ip(&["link", "set", "und0", "up"])),
            }
            // Whatever the stopped server still had queued lands now; the agent's delete wins.
            let mut clean = false;
            for _ in 0..300 {
                if leftovers(&tb, &node, cid).await.is_empty() {
                    clean = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(clean, "{how}: {:?}", leftovers(&tb, &node, cid).await);
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(
                leftovers(&tb, &node, cid).await,
                Vec::<Value>::new(),
                "{how}: came back"
            );
            ok(
                &p.run("DEL", cid, Some(&ns.path()), &p.config("1.1.0")),
                "DEL after a failed ADD",
            );
            ok(&p.run("DEL", cid, None, &p.config("1.1.0")), "DEL again");
            assert!(ns.link("eth0").is_none());
        }
        // The first container was never touched.
        let r = p.run("DEL", "c-first", Some(&first.path()), &p.config("1.1.0"));
        ok(&r, "DEL c-first");
    })
    .await
    .expect("test timed out");
}

/// `poolSize` in the network config: 0 keeps no pool ports for that network; other networks
/// keep theirs, named after the node. Pool ports left plumbed are swept periodically (here
/// every 2 s), not only when the agent starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_size_per_network_names_and_periodic_sweep() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let mut tb = Testbed::start(1).await;
        tb.nodes[0].env.push(("ISTHMUS_ORPHAN_SWEEP_SECS".into(), "2".into()));
        tb.nodes[0].kill_agent();
        tb.nodes[0].start_agent();
        tb.nodes[0].wait_socket().await;
        let token = project_net(&tb, "sizes", "pooled", "10.33.0.0/24").await;
        let t2 = tb.member("sizes2").await;
        let n = tb.create(&t2, "networks", "network", json!({"name": "unpooled"})).await;
        let unpooled = n["id"].as_str().expect("id").to_string();
        tb.create(
            &t2,
            "subnets",
            "subnet",
            json!({"network_id": unpooled, "cidr": "10.34.0.0/24", "ip_version": 4}),
        )
        .await;
        let bin = tokio::task::spawn_blocking(isthmus_store::testing::cni_bin)
            .await
            .expect("build");
        let node = tb.nodes[0].name.clone();
        let plugin = |project: &str, network: &str| Plugin {
            bin: bin.clone(),
            socket: tb.nodes[0].socket.clone(),
            project: project.into(),
            network: network.into(),
        };
        let off = plugin("sizes2", "unpooled");
        let mut conf = off.config("1.1.0");
        conf["poolSize"] = json!(0);
        let a = Ns::new();
        ok(&off.run("ADD", "c-off", Some(&a.path()), &conf), "ADD with poolSize 0");
        let on = plugin("sizes", "pooled");
        let b = Ns::new();
        ok(&on.run("ADD", "c-on", Some(&b.path()), &on.config("1.1.0")), "ADD");
        let pooled = ports_of(&tb, &token).await[0]["network_id"]
            .as_str()
            .expect("network id")
            .to_string();
        let pool = pool_filled(&tb, &node, &pooled, 3).await;
        for x in &pool {
            assert_eq!(x["name"], format!("isthmus-pool-{node}"), "{x}");
            assert_eq!(x["device_owner"], "isthmus:cni", "{x}");
        }
        // Several pool rounds later, still none on the network that turned its pool off.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(pool_of(&tb, &node, &unpooled).await, Vec::<Value>::new());
        let b = Ns::new();
        ok(
            &off.run("ADD", "c-off2", Some(&b.path()), &conf),
            "second ADD with poolSize 0",
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(pool_of(&tb, &node, &unpooled).await, Vec::<Value>::new());
        // A pool port left plumbed while the agent runs (as by an ADD cut short) is released
        // by the periodic sweep, and the pool refilled.
        let orphan = pool[0]["id"].as_str().expect("id").to_string();
        let (_orphan_ns, _) = tb.nodes[0].attach(&orphan).await;
        let mut swept = false;
        for _ in 0..150 {
            let ports = pool_of(&tb, &node, &pooled).await;
            if ports.iter().all(|x| x["id"] != orphan.as_str()) && ports.len() == 3 {
                swept = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(swept, "the plumbed pool port was not swept while the agent ran");
        assert!(!tb.nodes[0].has_link(&isthmus_agent::names::tap(&orphan)));
    })
    .await
    .expect("test timed out");
}
