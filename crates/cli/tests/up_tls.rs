//! `isthmus up --tls` as a user runs it: it serves HTTPS with the CA it made, and the openrc
//! it writes is all the `openstack` CLI needs; a restart keeps the same CA.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const OPENSTACK: &str = "/usr/bin/openstack";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

struct Up(Child);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `isthmus up --tls --no-agent` in `data` and waits for its openrc.
fn up(data: &Path, id_port: u16, net_port: u16) -> Up {
    let _ = std::fs::remove_file(data.join("openrc"));
    let log = std::fs::File::create(data.with_extension("log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_isthmus"))
        .arg("up")
        .arg("--tls")
        .arg("--no-agent")
        .arg("--data-dir")
        .arg(data)
        .args(["--identity-listen", &format!("127.0.0.1:{id_port}")])
        .args(["--network-listen", &format!("127.0.0.1:{net_port}")])
        .env("ISTHMUS_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn isthmus up");
    let mut up = Up(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !data.join("openrc").exists() {
        if let Some(st) = up.0.try_wait().expect("try_wait") {
            let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
            panic!("isthmus up exited ({st}):\n{log}");
        }
        assert!(Instant::now() < deadline, "no openrc within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    up
}

/// `source openrc; openstack ...` in a clean environment; (success, output).
fn openstack_with_openrc(openrc: &Path, home: &Path, args: &str) -> (bool, String) {
    let out = Command::new("/bin/bash")
        .arg("-c")
        .arg(format!(". {} && {OPENSTACK} {args}", openrc.display()))
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", home)
        .env("LANG", "C.UTF-8")
        .stdin(Stdio::null())
        .output()
        .expect("run openstack");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn up_with_tls_serves_https_and_its_openrc_works_with_the_openstack_cli() {
    assert!(
        Path::new(OPENSTACK).exists(),
        "{OPENSTACK} not found: install python3-openstackclient (scripts/setup.sh --test)"
    );
    let work = tempfile::tempdir().expect("tempdir");
    let data = work.path().join("data");
    let (id_port, net_port) = (free_port(), free_port());
    let first = up(&data, id_port, net_port);
    let openrc = std::fs::read_to_string(data.join("openrc")).expect("openrc");
    assert!(
        openrc.contains(&format!("OS_AUTH_URL=https://127.0.0.1:{id_port}/v3")),
        "{openrc}"
    );
    let ca_line = format!("OS_CACERT={}", data.join("ca.pem").display());
    assert!(openrc.contains(&ca_line), "{openrc}");
    let ca = std::fs::read_to_string(data.join("ca.pem")).expect("ca.pem");

    let (ok, text) = openstack_with_openrc(&data.join("openrc"), work.path(), "network create up-tls");
    assert!(ok, "openstack network create with the openrc:\n{text}");
    let (ok, text) = openstack_with_openrc(&data.join("openrc"), work.path(), "network list -f value -c Name");
    assert!(
        ok && text.contains("up-tls"),
        "openstack network list with the openrc:\n{text}"
    );
    let (ok, text) = openstack_with_openrc(&data.join("openrc"), work.path(), "catalog list -f json");
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("https://127.0.0.1:{net_port}/")) && !text.contains("http://"),
        "the catalog does not advertise https only:\n{text}"
    );
    // Without OS_CACERT the CLI does not trust the server.
    let (ok, text) = openstack_with_openrc(&data.join("openrc"), work.path(), "--os-cacert '' network list");
    assert!(
        !ok && text.contains("CERTIFICATE_VERIFY_FAILED"),
        "trusted without the CA:\n{text}"
    );
    drop(first);

    // Restarted on the same data dir: the same CA, and the old openrc still works.
    let _second = up(&data, id_port, net_port);
    assert_eq!(std::fs::read_to_string(data.join("ca.pem")).expect("ca.pem"), ca);
    let (ok, text) = openstack_with_openrc(&data.join("openrc"), work.path(), "network list -f value -c Name");
    assert!(ok && text.contains("up-tls"), "after a restart:\n{text}");
}
