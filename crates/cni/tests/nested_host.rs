//! The real `isthmus-cni` binary in `nested-macvlan` mode on this host's kernel: a "VM"
//! namespace (its NIC a veth), a container namespace, and a small stand-in for the nested API
//! listening inside the VM namespace. ADD, CHECK and DEL against it. Needs root (skipped
//! otherwise). Also the API over https with the config's CA file (no root needed).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) -> (bool, String) {
    let out = Command::new("ip").args(args).output().expect("ip");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("cni-nested-{tag}-{}", std::process::id());
        let (ok, out) = ip(&["netns", "add", &name]);
        assert!(ok, "{out}");
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Ns(name)
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }

    fn ip(&self, args: &[&str]) -> (bool, String) {
        let mut full = vec!["-n", &self.0];
        full.extend_from_slice(args);
        ip(&full)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.0]);
    }
}

/// One request as the stand-in API saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    credential: Option<String>,
    body: String,
}

fn attachment() -> Value {
    json!({"port_id": "p-1", "network_id": "net-1", "mode": "macvlan", "mac_address": "fa:16:3e:aa:bb:01",
           "mtu": 1400,
           "addresses": [{"ip_address": "10.85.0.7", "prefix_len": 24, "gateway": "10.85.0.1"}],
           "routes": [{"destination": "172.16.0.0/12", "nexthop": "10.85.0.254"}],
           "dns_nameservers": ["10.85.0.2"]})
}

/// Serves the nested API's three calls for one attachment, from a listener made inside `ns`.
fn stand_in_api(ns: &Ns) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let file = std::fs::File::open(ns.path()).expect("netns file");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: setns on an fd we own; only this thread moves.
        assert_eq!(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        tx.send(listener.local_addr().expect("addr").port()).expect("port");
        let mut attached = false;
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            reader.read_line(&mut line).expect("request line");
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or("").to_string(),
                parts.next().unwrap_or("").to_string(),
            );
            let (mut len, mut credential) = (0usize, None);
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).expect("header");
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap_or((h, ""));
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    "x-isthmus-trunk-credential" => credential = Some(v.trim().to_string()),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).expect("body");
            log.lock().expect("log").push(Seen {
                method: method.clone(),
                path,
                credential,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            let (status, body) = match method.as_str() {
                "PUT" => {
                    attached = true;
                    ("200 OK", json!({"attachment": attachment()}).to_string())
                }
                "GET" if attached => ("200 OK", json!({"attachment": attachment()}).to_string()),
                "DELETE" => {
                    attached = false;
                    ("204 No Content", String::new())
                }
                _ => (
                    "404 Not Found",
                    json!({"NeutronError": {"type": "NotFound", "message": "no such attachment", "detail": ""}})
                        .to_string(),
                ),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (rx.recv().expect("port"), seen)
}

/// Runs the plugin inside `vm`: (exit code, stdout).
fn cni(vm: &Ns, command: &str, netns: &str, config: &Value) -> (i32, String) {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &vm.0, env!("CARGO_BIN_EXE_isthmus-cni")])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "ctr1")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0");
    with_config(cmd, config)
}

/// Runs `cmd` with `config` on its stdin: (exit code, stdout).
fn with_config(mut cmd: Command, config: &Value) -> (i32, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("isthmus-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(config.to_string().as_bytes())
        .expect("stdin");
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

fn config(port: u16, credential: &str) -> Value {
    json!({"cniVersion": "1.0.0", "name": "n", "type": "isthmus-cni", "mode": "nested-macvlan",
           "timeout_secs": 10,
           "nested": {"api_url": format!("http://127.0.0.1:{port}"), "credential_file": credential,
                      "network_id": "net-1", "parent_interface": "nic", "ca_file": null}})
}

#[test]
fn nested_macvlan_add_check_del() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (vm, node, container) = (Ns::new("vm"), Ns::new("node"), Ns::new("ctr"));
    assert!(vm.ip(&["link", "add", "nic", "type", "veth", "peer", "name", "wire"]).0);
    assert!(vm.ip(&["link", "set", "wire", "netns", &node.0]).0);
    node.ip(&["addr", "add", "10.85.0.1/24", "dev", "wire"]);
    node.ip(&["link", "set", "wire", "up"]);
    let (port, seen) = stand_in_api(&vm);
    let dir = std::env::temp_dir().join(format!("cni-nested-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cred = dir.join("credential");
    std::fs::write(&cred, "cred-1.s3cr3t\n").expect("credential");
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let conf = config(port, cred.to_str().expect("path"));
    let netns = container.path();

    let (rc, out) = cni(&vm, "ADD", &netns, &conf);
    assert_eq!(rc, 0, "{out}");
    let result: Value = serde_json::from_str(&out).expect("result JSON");
    assert_eq!(
        result,
        json!({"cniVersion": "1.0.0",
               "interfaces": [{"name": "eth0", "mac": "fa:16:3e:aa:bb:01", "sandbox": netns}],
               "ips": [{"address": "10.85.0.7/24", "gateway": "10.85.0.1", "interface": 0}],
               "routes": [{"dst": "172.16.0.0/12", "gw": "10.85.0.254"}],
               "dns": {"nameservers": ["10.85.0.2"]}})
    );
    let put = seen.lock().expect("log")[0].clone();
    assert_eq!(put.method, "PUT");
    assert_eq!(put.path, "/isthmus/v1/nested/attachments/ctr1/eth0");
    assert_eq!(put.credential.as_deref(), Some("cred-1.s3cr3t"));
    let body: Value = serde_json::from_str(&put.body).expect("body");
    assert_eq!(body, json!({"attachment": {"mode": "macvlan", "network_id": "net-1"}}));
    let (_, link) = container.ip(&["-d", "-o", "link", "show", "eth0"]);
    assert!(
        link.contains("macvlan mode bridge") && link.contains("fa:16:3e:aa:bb:01"),
        "{link}"
    );
    let (_, addr) = container.ip(&["-4", "-o", "addr", "show", "eth0"]);
    assert!(addr.contains("10.85.0.7/24"), "{addr}");
    let (ok, ping) = ip(&["netns", "exec", &container.0, "ping", "-c", "1", "-W", "2", "10.85.0.1"]);
    assert!(ok, "{ping}");

    let (rc, out) = cni(&vm, "CHECK", &netns, &conf);
    assert_eq!((rc, out.as_str()), (0, ""));
    // Someone removed the address: CHECK says so.
    container.ip(&["addr", "del", "10.85.0.7/24", "dev", "eth0"]);
    let (rc, out) = cni(&vm, "CHECK", &netns, &conf);
    assert_eq!(rc, 1);
    assert!(
        out.contains(r#""code":100"#) && out.contains("lacks 10.85.0.7/24"),
        "{out}"
    );

    let (rc, out) = cni(&vm, "DEL", &netns, &conf);
    assert_eq!((rc, out.as_str()), (0, ""));
    assert!(!container.ip(&["link", "show", "eth0"]).0, "eth0 is still there");
    assert!(seen.lock().expect("log").iter().any(|s| s.method == "DELETE"));
    // DEL is idempotent; CHECK now finds no attachment.
    let (rc, out) = cni(&vm, "DEL", &netns, &conf);
    assert_eq!((rc, out.as_str()), (0, ""));
    let (rc, out) = cni(&vm, "CHECK", &netns, &conf);
    assert!(rc == 1 && out.contains(r#""code":100"#), "{out}");

    // A credential everyone can read is refused before any request, without showing it.
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let before = seen.lock().expect("log").len();
    let (rc, out) = cni(&vm, "ADD", &netns, &conf);
    assert!(
        rc == 1 && out.contains(r#""code":7"#) && out.contains("readable by everyone"),
        "{out}"
    );
    assert!(!out.contains("s3cr3t"), "{out}");
    assert_eq!(seen.lock().expect("log").len(), before);

    // Nothing listening: try again later.
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let closed = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let (rc, out) = cni(&vm, "ADD", &netns, &config(closed, cred.to_str().expect("path")));
    assert!(rc == 1 && out.contains(r#""code":11"#), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An https stand-in answering every request with 204, its certificate signed by a CA written
/// to `dir/ca.pem`; returns the port.
fn tls_stand_in(dir: &std::path::Path) -> u16 {
    use tokio_rustls::rustls;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("ca.pem");
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .expect("server config");
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            // The request head; DEL has no body.
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match tls.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            if head.ends_with(b"\r\n\r\n") {
                let _ = tls.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
    });
    port
}

#[test]
fn nested_api_over_https_trusts_the_configured_ca() {
    let dir = std::env::temp_dir().join(format!("cni-nested-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let port = tls_stand_in(&dir);
    let cred = dir.join("credential");
    std::fs::write(&cred, "cred-1.s3cr3t\n").expect("credential");
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let conf = |ca: Option<&std::path::Path>| {
        json!({"cniVersion": "1.0.0", "name": "n", "type": "isthmus-cni", "mode": "nested-vlan",
               "timeout_secs": 10,
               "nested": {"api_url": format!("https://127.0.0.1:{port}"), "credential_file": cred,
                          "network_id": "net-1", "parent_interface": "eth0", "ca_file": ca}})
    };
    // DEL without CNI_NETNS: only the API call.
    let del = |config: &Value| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_isthmus-cni"));
        cmd.env_clear()
            .env("CNI_COMMAND", "DEL")
            .env("CNI_CONTAINERID", "ctr1")
            .env("CNI_IFNAME", "eth0");
        with_config(cmd, config)
    };
    let (rc, out) = del(&conf(Some(&dir.join("ca.pem"))));
    assert_eq!((rc, out.as_str()), (0, ""));
    // Without the CA the server's certificate is not trusted.
    let (rc, out) = del(&conf(None));
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("certificate") || out.contains("Certificate"), "{out}");
    // A CA file that is not PEM is a config error.
    std::fs::write(dir.join("bad.pem"), "not a certificate").expect("bad.pem");
    let (rc, out) = del(&conf(Some(&dir.join("bad.pem"))));
    assert!(rc == 1 && out.contains(r#""code":7"#), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
