//! Runs the built `isthmus-cni` binary against a fake agent socket served from a test thread. This checks the
//! plugin's own side of the protocol (what it sends, how it prints replies and errors); the real agent is exercised
//! by the end-to-end tests elsewhere.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A scratch directory removed on drop (std only, to keep the crate's dependencies minimal).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "isthmus-cni-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("agent.sock")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Serves one connection: reads one request line, answers `reply`, returns the parsed request.
fn fake_agent(socket: &Path, reply: Value) -> JoinHandle<Value> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        assert!(
            line.ends_with('\n'),
            "request must be one newline-terminated line: {line:?}"
        );
        (&stream).write_all(format!("{reply}\n").as_bytes()).unwrap();
        let mut req: Value = serde_json::from_str(&line).unwrap();
        // ADD and CHECK pass the opened namespace as /proc/<plugin pid>/fd/<n>.
        if let Some(fd) = req.as_object_mut().and_then(|o| o.remove("netns_fd")) {
            assert!(fd.as_str().is_some_and(|f| f.starts_with("/proc/")), "{fd}");
            assert!(matches!(req["op"].as_str(), Some("cni_add" | "cni_check")), "{req}");
        }
        req
    })
}

fn config(version: &str, socket: &Path) -> Value {
    json!({"cniVersion": version, "name": "isthmus-net1", "type": "isthmus", "network": "net1", "project": "demo",
           "socket": socket, "timeout_secs": 5,
           "runtimeConfig": {"ips": ["10.0.0.7/24"], "mac": "fa:16:3e:00:00:01"}})
}

/// Longest any plugin run may take in these tests (their configs say 5 s at most).
const RUN_BOUND: Duration = Duration::from_secs(10);

fn run(command: &str, env: &[(&str, &str)], stdin: &Value) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_isthmus-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_PATH", "/opt/cni/bin")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.to_string().as_bytes())
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > RUN_BOUND {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("isthmus-cni {command} still running after {RUN_BOUND:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

type Var = (&'static str, &'static str);

const ATTACH: [Var; 4] = [
    ("CNI_CONTAINERID", "c0ffee"),
    // A real network namespace (the plugin's own), which the plugin opens and checks.
    ("CNI_NETNS", "/proc/self/ns/net"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web-0"),
];

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn add_prints_a_result() {
    let dir = Scratch::new();
    let agent = fake_agent(
        &dir.socket(),
        json!({"ok": true, "port_id": "p1", "interface": "eth0", "host_interface": "tap1234567890a",
               "mac": "fa:16:3e:00:00:01", "sandbox": "/proc/self/ns/net",
               "ips": [{"address": "10.0.0.7/24", "gateway": "10.0.0.1"}],
               "routes": [{"destination": "0.0.0.0/0", "nexthop": "10.0.0.1"}],
               "dns_nameservers": ["8.8.8.8"], "mtu": 1450}),
    );
    let out = run("ADD", &ATTACH, &config("1.1.0", &dir.socket()));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        agent.join().unwrap(),
        json!({"op": "cni_add", "container_id": "c0ffee", "ifname": "eth0", "netns": "/proc/self/ns/net",
               "network": "net1", "project": "demo", "ips": ["10.0.0.7"], "mac": "fa:16:3e:00:00:01"})
    );
    assert_eq!(
        stdout_json(&out),
        json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "tap1234567890a"},
                {"name": "eth0", "mac": "fa:16:3e:00:00:01", "mtu": 1450, "sandbox": "/proc/self/ns/net"}
            ],
            "ips": [{"address": "10.0.0.7/24", "gateway": "10.0.0.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}],
            "dns": {"nameservers": ["8.8.8.8"]}
        })
    );
}

#[test]
fn add_in_an_old_version_carries_ip_versions() {
    let dir = Scratch::new();
    let agent = fake_agent(
        &dir.socket(),
        json!({"ok": true, "interface": "eth0", "host_interface": "tap1", "mac": "fa:16:3e:00:00:01",
               "ips": [{"address": "10.0.0.7/24", "gateway": null}], "routes": [], "dns_nameservers": [],
               "mtu": 1450}),
    );
    let out = run("ADD", &ATTACH, &config("0.3.1", &dir.socket()));
    assert!(out.status.success(), "{out:?}");
    agent.join().unwrap();
    let r = stdout_json(&out);
    assert_eq!(r["cniVersion"], "0.3.1");
    assert_eq!(
        r["ips"],
        json!([{"version": "4", "address": "10.0.0.7/24", "interface": 1}])
    );
    assert_eq!(r["interfaces"][1].get("mtu"), None);
}

#[test]
fn agent_error_becomes_a_cni_error() {
    let dir = Scratch::new();
    let agent = fake_agent(
        &dir.socket(),
        json!({"ok": false, "code": 422, "message": "unknown network net1"}),
    );
    let out = run("ADD", &ATTACH, &config("1.0.0", &dir.socket()));
    agent.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let e = stdout_json(&out);
    assert_eq!(e["cniVersion"], "1.0.0");
    assert_eq!(e["code"], 7);
    assert_eq!(e["msg"], "unknown network net1");

    let agent = {
        std::fs::remove_file(dir.socket()).unwrap();
        fake_agent(
            &dir.socket(),
            json!({"ok": false, "code": 503, "message": "no view from the server yet"}),
        )
    };
    let out = run(
        "DEL",
        &[("CNI_CONTAINERID", "c0ffee"), ("CNI_IFNAME", "eth0")],
        &config("1.0.0", &dir.socket()),
    );
    assert_eq!(
        agent.join().unwrap(),
        json!({"op": "cni_del", "container_id": "c0ffee", "ifname": "eth0", "netns": null,
               "network": "net1", "project": "demo"})
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["code"], 11);
}

#[test]
fn success_without_output_for_del_check_gc_status() {
    let dir = Scratch::new();
    let mut check = config("1.1.0", &dir.socket());
    check["prevResult"] = json!({"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}]});
    let mut gc = config("1.1.0", &dir.socket());
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "c0ffee", "ifname": "eth0"}]);
    let cases: [(&str, &[Var], Value, &str); 4] = [
        ("DEL", &ATTACH, config("1.1.0", &dir.socket()), "cni_del"),
        ("CHECK", &ATTACH, check, "cni_check"),
        ("GC", &[], gc, "cni_gc"),
        ("STATUS", &[], config("1.1.0", &dir.socket()), "cni_status"),
    ];
    for (command, env, stdin, op) in cases {
        let _ = std::fs::remove_file(dir.socket());
        let agent = fake_agent(&dir.socket(), json!({"ok": true}));
        let out = run(command, env, &stdin);
        assert!(out.status.success(), "{command}: {out:?}");
        assert!(
            out.stdout.is_empty(),
            "{command} printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        let request = agent.join().unwrap();
        assert_eq!(request["op"], op);
        if command == "GC" {
            assert_eq!(request["valid"], json!([{"container_id": "c0ffee", "ifname": "eth0"}]));
        }
        if command == "CHECK" {
            assert_eq!(request["prev_result"], stdin["prevResult"]);
        }
    }
}

#[test]
fn missing_socket() {
    let dir = Scratch::new();
    let out = run("STATUS", &[], &config("1.1.0", &dir.socket()));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["code"], 50);

    let out = run("ADD", &ATTACH, &config("1.1.0", &dir.socket()));
    assert_eq!(out.status.code(), Some(1));
    let e = stdout_json(&out);
    assert_eq!(e["code"], 11);
    let socket = dir.socket().display().to_string();
    assert!(e["msg"].as_str().unwrap().contains(&socket), "{e}");
}

#[test]
fn version_and_bad_input_need_no_agent() {
    let out = run("VERSION", &[], &json!({"cniVersion": "1.0.0"}));
    assert!(out.status.success());
    assert_eq!(
        stdout_json(&out),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_isthmus-cni"))
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .envs(ATTACH)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{not json").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout_json(&out)["code"], 6);

    let out = run("ADD", &ATTACH[..2], &config("1.1.0", Path::new("/nonexistent")));
    assert_eq!(stdout_json(&out)["code"], 4);
    let out = run("ADD", &ATTACH, &config("0.2.0", Path::new("/nonexistent")));
    assert_eq!(stdout_json(&out)["code"], 1);
}

/// ADD and CHECK with a CNI_NETNS that is no network namespace: the spec's error JSON (code 4,
/// naming the variable) in bounded time, and the agent is never asked. A FIFO used to block the
/// plugin forever in open().
#[test]
fn netns_that_is_not_a_network_namespace_is_refused() {
    let dir = Scratch::new();
    let fifo = dir.0.join("fifo");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success(), "mkfifo");
    let file = dir.0.join("plain");
    std::fs::write(&file, b"not a namespace").unwrap();
    let subdir = dir.0.join("dir");
    std::fs::create_dir(&subdir).unwrap();
    // No agent listens: a request sent anyway would answer 11, not 4.
    let conf = config("1.1.0", &dir.socket());
    let mut check = conf.clone();
    check["prevResult"] = json!({"cniVersion": "1.1.0", "interfaces": [{"name": "eth0"}]});
    for path in [&fifo, &file, &subdir, Path::new("/dev/null")] {
        let p = path.display().to_string();
        let env = [
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", p.as_str()),
            ("CNI_IFNAME", "eth0"),
        ];
        for (command, stdin) in [("ADD", &conf), ("CHECK", &check)] {
            let started = Instant::now();
            let out = run(command, &env, stdin);
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{command} {p} took {:?}",
                started.elapsed()
            );
            assert_eq!(out.status.code(), Some(1), "{command} {p}: {out:?}");
            let e = stdout_json(&out);
            assert_eq!(e["cniVersion"], "1.1.0", "{e}");
            assert_eq!(e["code"], 4, "{command} {p}: {e}");
            assert!(e["msg"].as_str().unwrap().contains("CNI_NETNS"), "{e}");
        }
    }
    // A path that does not exist: the container is unknown.
    let gone = dir.0.join("gone").display().to_string();
    let env = [
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", gone.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let out = run("ADD", &env, &conf);
    assert_eq!(stdout_json(&out)["code"], 3, "{out:?}");
}

/// An agent that answers a byte at a time never resets the plugin's clock: the whole exchange
/// ends at the config's timeout with a retryable error.
#[test]
fn a_trickling_agent_is_cut_off_at_the_timeout() {
    let dir = Scratch::new();
    let listener = UnixListener::bind(dir.socket()).unwrap();
    let agent = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        for _ in 0..60 {
            if (&stream).write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut conf = config("1.1.0", &dir.socket());
    conf["timeout_secs"] = json!(1);
    let started = Instant::now();
    let out = run("ADD", &ATTACH, &conf);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the plugin took {took:?} with a 1 s timeout"
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(stdout_json(&out)["code"], 11);
    agent.join().unwrap();
}

/// A timeout beyond the bound is a config error, before any socket is touched.
#[test]
fn a_huge_timeout_is_refused() {
    let dir = Scratch::new();
    let mut conf = config("1.1.0", &dir.socket());
    conf["timeout_secs"] = json!(100_000);
    let out = run("ADD", &ATTACH, &conf);
    assert_eq!(out.status.code(), Some(1));
    let e = stdout_json(&out);
    assert_eq!(e["code"], 7, "{e}");
    assert!(e["msg"].as_str().unwrap().contains("timeout_secs"), "{e}");
}
