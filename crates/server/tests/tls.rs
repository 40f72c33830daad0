//! HTTPS on both listeners: clients that trust the server's CA get through, the `openstack`
//! CLI with `--os-cacert` too; a client with another CA is refused with an error that says
//! why; a client that never finishes its handshake is cut at the header timeout; SIGHUP makes
//! a running `isthmus server` serve new certificate files.

#[path = "support/certs.rs"]
mod certs;
mod support;

use certs::TestCa;
use isthmus_client::{Auth, Client, Config as ClientConfig};
use isthmus_server::{Config, ServerHandle};
use isthmus_store::testing::isthmus_bin;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{ADMIN_PASSWORD, ADMIN_PROJECT, ADMIN_USER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct TlsServer {
    handle: ServerHandle,
    ca: TestCa,
    identity_url: String,
    _dir: tempfile::TempDir,
}

async fn start(tweak: impl FnOnce(&mut Config)) -> TlsServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("isthmus test CA");
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server-key.pem"));
    ca.issue(&cert, &key);
    let mut config = support::test_config();
    config.tls_cert_file = Some(cert);
    config.tls_key_file = Some(key);
    tweak(&mut config);
    let store = isthmus_store::embedded::EmbeddedStore::open(&dir.path().join("store")).expect("store");
    let handle = isthmus_server::start(config, store).await.expect("server starts");
    TlsServer {
        identity_url: handle.state.identity_url.clone(),
        handle,
        ca,
        _dir: dir,
    }
}

fn admin_client(identity_url: &str, ca: Option<&Path>) -> Client {
    let config = ClientConfig::new(identity_url, Auth::password(ADMIN_USER, ADMIN_PASSWORD, ADMIN_PROJECT)).ca_file(ca);
    Client::new(config).expect("client")
}

#[tokio::test]
async fn https_with_the_servers_ca_and_a_clear_refusal_with_another() {
    let s = start(|_| {}).await;
    assert!(s.identity_url.starts_with("https://127.0.0.1:"), "{}", s.identity_url);

    // The CA that signed the server's certificate: the whole API works, and the catalog
    // sends the client on to the network API over https.
    let client = admin_client(&s.identity_url, Some(&s.ca.ca_file));
    client.token(None).await.expect("token over https");
    assert!(client.network_url().starts_with("https://"), "{}", client.network_url());
    let created = client
        .neutron_create("networks", "network", &serde_json::json!({"name": "over-tls"}))
        .await
        .expect("create over https");
    let listed = client.neutron_get("networks").await.expect("list over https");
    assert!(
        listed["networks"]
            .as_array()
            .expect("networks")
            .iter()
            .any(|n| n["id"] == created["id"]),
        "{listed}"
    );

    // Another CA: refused during the handshake, quickly, saying so.
    let other = TestCa::new("some other CA");
    let t = Instant::now();
    let e = admin_client(&s.identity_url, Some(&other.ca_file))
        .token(None)
        .await
        .expect_err("a server the CA did not sign was trusted");
    let msg = e.to_string();
    assert!(
        msg.contains("invalid peer certificate") && msg.contains("UnknownIssuer"),
        "unclear error: {msg}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "refusal took {:?}", t.elapsed());

    // A CA file that is not one: a clear error before any request.
    let bogus = s._dir.path().join("not-a-ca.pem");
    std::fs::write(&bogus, "hello").expect("write");
    let e = Client::new(
        ClientConfig::new(
            &s.identity_url,
            Auth::password(ADMIN_USER, ADMIN_PASSWORD, ADMIN_PROJECT),
        )
        .ca_file(Some(&bogus)),
    )
    .expect_err("a CA file without certificates was accepted");
    assert!(e.to_string().contains("no PEM certificate"), "{e}");

    // Plain HTTP to the https listener: an error, not a hang.
    let plain = s.identity_url.replace("https://", "http://");
    let r = tokio::time::timeout(Duration::from_secs(5), reqwest::Client::new().get(&plain).send())
        .await
        .expect("plain HTTP to an https listener hung");
    assert!(r.is_err(), "plain HTTP answered: {r:?}");
    s.handle.stop().await;
}

/// A client that connects and never sends its ClientHello (or sends half of one) holds its
/// connection slot only until the header timeout; then a real client gets the slot.
#[tokio::test]
async fn a_silent_or_slow_tls_client_is_cut_at_the_header_timeout() {
    let s = start(|c| {
        c.header_read_timeout_secs = 1;
        c.max_connections = 1;
    })
    .await;
    let addr = s.handle.identity_addr;
    // A TLS record header promising 512 bytes of handshake, then nothing.
    for opening in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00][..]] {
        let mut silent = tokio::net::TcpStream::connect(addr).await.expect("connect");
        silent.write_all(opening).await.expect("write");
        let t = Instant::now();
        // The one slot is taken: a real client waits until the silent one is cut.
        let client = admin_client(&s.identity_url, Some(&s.ca.ca_file));
        let real = tokio::spawn(async move { client.token(None).await.map(|_| Instant::now()) });
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .expect("the silent connection was not closed within 5 s")
            .unwrap_or(0);
        let cut = t.elapsed();
        assert_eq!(n, 0, "the server sent something to a client that said nothing");
        assert!(
            cut >= Duration::from_millis(800) && cut < Duration::from_secs(3),
            "cut after {cut:?}, header timeout 1 s"
        );
        let served = real.await.expect("join").expect("the real client was not served");
        assert!(served.duration_since(t) < Duration::from_secs(4));
    }
    s.handle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openstack_cli_with_os_cacert() {
    const OPENSTACK: &str = "/usr/bin/openstack";
    assert!(
        Path::new(OPENSTACK).exists(),
        "{OPENSTACK} not found: install python3-openstackclient (scripts/setup.sh --test)"
    );
    let s = start(|_| {}).await;
    let home = tempfile::tempdir().expect("home");
    let run = |args: Vec<String>| {
        let mut cmd = tokio::process::Command::new(OPENSTACK);
        cmd.args(&args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", home.path())
            .env("LANG", "C.UTF-8")
            .env("OS_AUTH_URL", &s.identity_url)
            .env("OS_IDENTITY_API_VERSION", "3")
            .env("OS_USERNAME", ADMIN_USER)
            .env("OS_PASSWORD", ADMIN_PASSWORD)
            .env("OS_PROJECT_NAME", ADMIN_PROJECT)
            .env("OS_USER_DOMAIN_NAME", "Default")
            .env("OS_PROJECT_DOMAIN_NAME", "Default")
            .env("OS_REGION_NAME", "RegionOne")
            .kill_on_drop(true);
        async move {
            let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
                .await
                .expect("openstack timed out")
                .expect("running openstack");
            let text = format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                text,
            )
        }
    };
    let ca = s.ca.ca_file.display().to_string();
    let with_ca = |rest: &[&str]| {
        let mut a = vec!["--os-cacert".to_string(), ca.clone()];
        a.extend(rest.iter().map(|s| s.to_string()));
        a
    };
    let (ok, out, text) = run(with_ca(&["network", "create", "cli-tls", "-f", "json"])).await;
    assert!(ok, "openstack --os-cacert network create failed:\n{text}");
    let net: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(net["name"], "cli-tls");
    let (ok, out, text) = run(with_ca(&["network", "list", "-f", "json"])).await;
    assert!(ok, "openstack --os-cacert network list failed:\n{text}");
    assert!(out.contains("cli-tls"), "{out}");

    // Without the CA the CLI refuses the server.
    let (ok, _, text) = run(vec!["network".into(), "list".into()]).await;
    assert!(!ok, "the CLI trusted an unknown CA:\n{text}");
    assert!(text.contains("CERTIFICATE_VERIFY_FAILED"), "{text}");
    s.handle.stop().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether a fresh connection to `url` with `ca` gets an answer.
async fn trusted_with(url: &str, ca: &Path) -> Result<(), String> {
    let http = isthmus_client::http_client_with_ca(Some(ca)).map_err(|e| e.to_string())?;
    http.get(url).send().await.map(|_| ()).map_err(|e| format!("{:?}", e))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_makes_new_connections_get_the_new_certificate() {
    let bin = tokio::task::spawn_blocking(isthmus_bin).await.expect("build task");
    let work = tempfile::tempdir().expect("tempdir");
    let (cert, key): (PathBuf, PathBuf) = (work.path().join("server.pem"), work.path().join("server-key.pem"));
    let (first, second) = (TestCa::new("first CA"), TestCa::new("second CA"));
    first.issue(&cert, &key);
    let config = work.path().join("isthmus.toml");
    std::fs::write(&config, "password_hash_kib = 64\n").expect("config");
    let (id_port, net_port) = (free_port(), free_port());
    let log_path = work.path().join("server.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let child = Command::new(&bin)
        .arg("server")
        .arg("--config")
        .arg(&config)
        .args(["--store", "embedded", "--data-dir"])
        .arg(work.path().join("data"))
        .args(["--admin-password", ADMIN_PASSWORD])
        .args(["--identity-listen", &format!("127.0.0.1:{id_port}")])
        .args(["--network-listen", &format!("127.0.0.1:{net_port}")])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .env("ISTHMUS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn isthmus server");
    let mut server = Proc(child);
    let url = format!("https://127.0.0.1:{id_port}/v3");
    let server_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while trusted_with(&url, &first.ca_file).await.is_err() {
        if let Some(st) = server.0.try_wait().expect("try_wait") {
            panic!("isthmus server exited ({st}):\n{}", server_log());
        }
        assert!(Instant::now() < deadline, "not serving within 60 s:\n{}", server_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(trusted_with(&url, &second.ca_file).await.is_err());

    let hup = |pid: u32| {
        let pid = libc::pid_t::try_from(pid).expect("pid");
        // SAFETY: kill with a valid signal number on our own child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    };
    // New files from another CA, then SIGHUP: new connections see the new certificate.
    second.issue(&cert, &key);
    hup(server.0.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = trusted_with(&url, &second.ca_file).await {
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served after SIGHUP: {e}\n{}",
            server_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = trusted_with(&url, &first.ca_file)
        .await
        .expect_err("the old certificate is still served");
    assert!(e.contains("UnknownIssuer"), "{e}");

    // A broken file: logged, and the certificate served so far stays.
    std::fs::write(&cert, "not a certificate").expect("write");
    hup(server.0.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server_log().contains("keeping the current TLS certificate") {
        assert!(Instant::now() < deadline, "no error logged:\n{}", server_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    trusted_with(&url, &second.ca_file)
        .await
        .expect("the server stopped serving its certificate after a bad reload");
    assert!(server.0.try_wait().expect("try_wait").is_none(), "the server exited");
}
