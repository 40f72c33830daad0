//! The real OpenStack CLI (`/usr/bin/openstack`, python3-openstackclient) against an in-process
//! server on the embedded store, typed as a new project member would type it.

mod support;

use reqwest::StatusCode;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use support::{Backend, Member, TestServer, MEMBER_PASSWORD};

const OPENSTACK: &str = "/usr/bin/openstack";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

struct Cli<'a> {
    server: &'a TestServer,
    member: &'a Member,
    home: tempfile::TempDir,
}

struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

impl Cli<'_> {
    /// Runs `openstack <args>` with only OS_* credentials in the environment and Debian's
    /// python first in PATH.
    async fn run(&self, args: &[&str]) -> Run {
        let mut cmd = tokio::process::Command::new(OPENSTACK);
        cmd.args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", self.home.path())
            .env("LANG", "C.UTF-8")
            .env("OS_AUTH_URL", &self.server.identity_url)
            .env("OS_IDENTITY_API_VERSION", "3")
            .env("OS_AUTH_TYPE", "password")
            .env("OS_USERNAME", &self.member.user)
            .env("OS_PASSWORD", MEMBER_PASSWORD)
            .env("OS_PROJECT_NAME", &self.member.project)
            .env("OS_USER_DOMAIN_NAME", "Default")
            .env("OS_PROJECT_DOMAIN_NAME", "Default")
            .env("OS_REGION_NAME", "RegionOne")
            .env("OS_INTERFACE", "public")
            .kill_on_drop(true);
        let out = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("openstack {} took longer than {COMMAND_TIMEOUT:?}", args.join(" ")))
            .unwrap_or_else(|e| panic!("running {OPENSTACK}: {e}"));
        let run = Run {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        println!(
            "$ openstack {}\n[exit {:?}]\n{}",
            args.join(" "),
            run.code,
            run.output().trim()
        );
        run
    }

    /// Runs a command that must succeed.
    async fn ok(&self, args: &[&str]) -> Run {
        let run = self.run(args).await;
        assert!(
            run.ok,
            "openstack {} failed (exit {:?}):\n{}",
            args.join(" "),
            run.code,
            run.output()
        );
        run
    }

    /// Runs a command with `-f json` that must succeed, and parses its output.
    async fn json(&self, args: &[&str]) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-f", "json"]);
        let run = self.ok(&all).await;
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("openstack {}: output is not JSON ({e}):\n{}", all.join(" "), run.stdout))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openstack_cli_walkthrough() {
    assert!(
        Path::new(OPENSTACK).exists(),
        "{OPENSTACK} not found: install python3-openstackclient (scripts/setup.sh --test)"
    );
    let server = TestServer::start(Backend::Embedded).await;
    let member = server.member("cli").await;
    let cli = Cli {
        server: &server,
        member: &member,
        home: tempfile::tempdir().expect("tempdir"),
    };

    let run = cli.ok(&["network", "create", "cli-net"]).await;
    assert!(run.stdout.contains("cli-net"), "{}", run.stdout);
    let run = cli
        .ok(&[
            "subnet",
            "create",
            "--network",
            "cli-net",
            "--subnet-range",
            "10.0.0.0/24",
            "cli-subnet",
        ])
        .await;
    assert!(run.stdout.contains("10.0.0.0/24"), "{}", run.stdout);
    assert!(run.stdout.contains("10.0.0.1"), "gateway shown: {}", run.stdout);
    let run = cli
        .ok(&[
            "port",
            "create",
            "--network",
            "cli-net",
            "--fixed-ip",
            "subnet=cli-subnet,ip-address=10.0.0.50",
            "cli-port",
        ])
        .await;
    assert!(run.stdout.contains("10.0.0.50"), "{}", run.stdout);

    // The port appears in the listing with its address, as a table and as JSON.
    let run = cli.ok(&["port", "list", "--network", "cli-net"]).await;
    assert!(
        run.stdout.contains("cli-port") && run.stdout.contains("10.0.0.50"),
        "port list shows the port and its IP:\n{}",
        run.stdout
    );
    let ports = cli.json(&["port", "list", "--network", "cli-net"]).await;
    let ports = ports.as_array().expect("a JSON list");
    assert_eq!(ports.len(), 1, "{ports:?}");
    assert_eq!(ports[0]["Name"], "cli-port");
    assert!(
        ports[0]["Fixed IP Addresses"].to_string().contains("10.0.0.50"),
        "{}",
        ports[0]
    );

    let run = cli
        .ok(&[
            "security",
            "group",
            "rule",
            "create",
            "--protocol",
            "tcp",
            "--dst-port",
            "22",
            "default",
        ])
        .await;
    assert!(run.stdout.contains("tcp"), "{}", run.stdout);

    // The server agrees with what the CLI said.
    let api = &member.api;
    let nets = api.list("/v2.0/networks?name=cli-net", "networks").await;
    assert_eq!(nets.len(), 1);
    let hits = api.list("/v2.0/ports?fixed_ips=ip_address%3D10.0.0.50", "ports").await;
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0]["name"], "cli-port");
    assert_eq!(hits[0]["network_id"], nets[0]["id"]);
    let groups = api.list("/v2.0/security-groups?name=default", "security_groups").await;
    assert_eq!(groups.len(), 1);
    let ssh: Vec<&Value> = groups[0]["security_group_rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter(|r| r["protocol"] == "tcp")
        .collect();
    assert_eq!(ssh.len(), 1, "{groups:?}");
    assert_eq!(ssh[0]["port_range_min"], 22);
    assert_eq!(ssh[0]["port_range_max"], 22);
    assert_eq!(ssh[0]["direction"], "ingress");

    // The network cannot go while its port exists.
    let run = cli.run(&["network", "delete", "cli-net"]).await;
    assert!(
        !run.ok,
        "network delete must fail while a port exists:\n{}",
        run.output()
    );
    let out = run.output();
    assert!(
        out.contains("409") || out.to_lowercase().contains("in use"),
        "the failure says why:\n{out}"
    );
    assert_eq!(api.list("/v2.0/networks?name=cli-net", "networks").await.len(), 1);

    cli.ok(&["port", "delete", "cli-port"]).await;
    cli.ok(&["network", "delete", "cli-net"]).await;
    let run = cli.ok(&["network", "list"]).await;
    assert!(!run.stdout.contains("cli-net"), "{}", run.stdout);
    assert!(api.list("/v2.0/networks", "networks").await.is_empty());
    assert!(api.list("/v2.0/subnets", "subnets").await.is_empty());
    assert!(api.list("/v2.0/ports", "ports").await.is_empty());
    let (st, _) = api.get("/v2.0/networks").await;
    assert_eq!(st, StatusCode::OK);
}

/// Trunks as a user makes them for a VM with nested containers: `network trunk create` with a
/// subport, `trunk set --subport`, `subport list`, `trunk unset --subport`, `trunk delete`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openstack_cli_trunks() {
    let server = TestServer::start(Backend::Embedded).await;
    let member = server.member("cli-trunks").await;
    let cli = Cli {
        server: &server,
        member: &member,
        home: tempfile::tempdir().expect("tempdir"),
    };
    for (net, cidr) in [("vm-net", "10.1.0.0/24"), ("pod-net", "10.2.0.0/24")] {
        cli.ok(&["network", "create", net]).await;
        cli.ok(&[
            "subnet",
            "create",
            "--network",
            net,
            "--subnet-range",
            cidr,
            &format!("{net}-v4"),
        ])
        .await;
    }
    for (port, net) in [("vm", "vm-net"), ("pod-a", "pod-net"), ("pod-b", "pod-net")] {
        cli.ok(&["port", "create", "--network", net, port]).await;
    }
    let t = cli
        .json(&[
            "network",
            "trunk",
            "create",
            "--parent-port",
            "vm",
            "--subport",
            "port=pod-a,segmentation-type=vlan,segmentation-id=101",
            "vm-trunk",
        ])
        .await;
    assert_eq!(t["status"], "DOWN", "{t}");
    cli.ok(&[
        "network",
        "trunk",
        "set",
        "--subport",
        "port=pod-b,segmentation-type=vlan,segmentation-id=102",
        "vm-trunk",
    ])
    .await;
    let subs = cli.json(&["network", "subport", "list", "--trunk", "vm-trunk"]).await;
    let mut vlans: Vec<i64> = subs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["Segmentation ID"].as_i64())
        .collect();
    vlans.sort_unstable();
    assert_eq!(vlans, vec![101, 102], "{subs}");
    // The parent cannot be its own subport; Neutron's reason reaches the user.
    let run = cli
        .run(&[
            "network",
            "trunk",
            "set",
            "--subport",
            "port=vm,segmentation-type=vlan,segmentation-id=103",
            "vm-trunk",
        ])
        .await;
    assert!(!run.ok && run.output().contains("parent port"), "{}", run.output());
    let pod_a = cli.json(&["port", "show", "pod-a"]).await;
    assert_eq!(pod_a["device_owner"], "trunk:subport", "{pod_a}");
    cli.ok(&["network", "trunk", "unset", "--subport", "pod-a", "vm-trunk"])
        .await;
    let subs = cli.json(&["network", "subport", "list", "--trunk", "vm-trunk"]).await;
    assert_eq!(subs.as_array().map(Vec::len), Some(1), "{subs}");
    let run = cli.run(&["port", "delete", "vm"]).await;
    assert!(!run.ok, "a trunk's parent port was deleted: {}", run.output());
    cli.ok(&["network", "trunk", "delete", "vm-trunk"]).await;
    cli.ok(&["port", "delete", "vm", "pod-a", "pod-b"]).await;
    let trunks = cli.json(&["network", "trunk", "list"]).await;
    assert_eq!(trunks, serde_json::json!([]));
}
