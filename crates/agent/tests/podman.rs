//! A real container runtime: Debian's podman (CNI backend) runs containers on an Isthmus
//! network through `isthmus-cni`, on two nodes of the test bed, with podman started inside
//! each node's network namespace. Needs root, podman, runc and busybox-static (`scripts/setup.sh
//! --test` installs them).

mod support;
mod testbed;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::{must, run, unique};
use testbed::Testbed;

const TEST_TIMEOUT: Duration = Duration::from_secs(150);
const IMAGE: &str = "localhost/isthmus-busybox:latest";

/// A tiny image from Debian's static busybox (no registry needed).
fn ensure_image() {
    if run(&["podman", "image", "exists", IMAGE]).0 {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("rootfs");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).expect("rootfs dir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    for tool in ["sh", "ip", "ping", "sleep", "cat", "nc", "hostname", "true"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).expect("symlink");
    }
    let tar = dir.path().join("rootfs.tar");
    must(&["tar", "-C", root.to_str().unwrap(), "-cf", tar.to_str().unwrap(), "."]);
    must(&["podman", "import", tar.to_str().unwrap(), IMAGE]);
}

/// Podman as a node runs it: in the node's namespace, with a CNI config dir holding the
/// Isthmus network that points at that node's agent socket.
struct NodePodman {
    ns: String,
    conf: PathBuf,
    network: String,
    containers: Vec<String>,
}

impl NodePodman {
    fn new(dir: &Path, ns: &str, socket: &Path, cni_bin: &Path, network: &str, project: &str) -> NodePodman {
        let conf_dir = dir.join(ns);
        let net_d = conf_dir.join("net.d");
        let bin = conf_dir.join("bin");
        std::fs::create_dir_all(&net_d).expect("net.d");
        std::fs::create_dir_all(&bin).expect("bin");
        std::fs::copy(cni_bin, bin.join("isthmus-cni")).expect("plugin copy");
        let name = format!("isthmus-{network}-{}", unique());
        let conflist = json!({"cniVersion": "1.0.0", "name": name, "plugins": [
            {"type": "isthmus-cni", "network": network, "project": project, "socket": socket,
             "capabilities": {"ips": true, "mac": true}}]});
        std::fs::write(net_d.join(format!("{name}.conflist")), conflist.to_string()).expect("conflist");
        let conf = conf_dir.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n",
                bin.display(),
                net_d.display()
            ),
        )
        .expect("containers.conf");
        NodePodman {
            ns: ns.to_string(),
            conf,
            network: name,
            containers: vec![],
        }
    }

    fn podman(&self, args: &[&str]) -> (bool, String, String) {
        // nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mounts runc needs.
        let conf = format!("CONTAINERS_CONF={}", self.conf.display());
        let net = format!("--net=/run/netns/{}", self.ns);
        let mut full = vec!["nsenter", &net, "env", &conf, "podman"];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Starts a container on the Isthmus network (with extra `podman run` flags); returns its id.
    fn start(&mut self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["run", "-d", "--name", name, "--runtime", "/usr/sbin/runc"];
        args.extend(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]);
        args.extend(["--cap-add", "NET_RAW", "--network", &self.network]);
        args.extend_from_slice(extra);
        args.extend([IMAGE, "sleep", "600"]);
        let (ok, out, err) = self.podman(&args);
        // Even a failed run may leave a created container behind.
        self.containers.push(name.to_string());
        assert!(ok, "podman run {name}: {err}");
        out.trim().to_string()
    }

    fn exec(&self, name: &str, args: &[&str]) -> (bool, String) {
        let mut full = vec!["exec", name];
        full.extend_from_slice(args);
        let (ok, out, err) = self.podman(&full);
        (ok, format!("{out}{err}"))
    }

    fn ipv4(&self, name: &str) -> String {
        let (ok, out) = self.exec(name, &["ip", "-4", "-o", "addr", "show", "eth0"]);
        assert!(ok, "{out}");
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("no IPv4 on eth0 of {name}: {out}"))
            .to_string()
    }

    fn pings(&self, name: &str, ip: &str) -> bool {
        self.exec(name, &["ping", "-c", "2", "-W", "2", ip]).0
    }

    fn remove(&mut self, name: &str) {
        let (ok, _, err) = self.podman(&["rm", "-f", "-t", "0", name]);
        assert!(ok, "podman rm {name}: {err}");
        self.containers.retain(|c| c != name);
    }
}

impl Drop for NodePodman {
    fn drop(&mut self) {
        for c in self.containers.clone() {
            let _ = self.podman(&["rm", "-f", "-t", "0", &c]);
        }
    }
}

async fn ports(tb: &Testbed) -> Vec<Value> {
    let (s, b) = tb.net(reqwest::Method::GET, "/v2.0/ports", None).await;
    assert_eq!(s, 200, "{b}");
    b["ports"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_containers_on_two_nodes_talk_over_isthmus() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        tokio::task::spawn_blocking(ensure_image).await.expect("image");
        let tb = Testbed::start(2).await;
        let cni_bin = tokio::task::spawn_blocking(isthmus_store::testing::cni_bin)
            .await
            .expect("build");
        let project = format!("podman{}", unique());
        let t = tb.member(&project).await;
        let net = tb.create(&t, "networks", "network", json!({"name": "pods"})).await;
        let net_id = net["id"].as_str().expect("id").to_string();
        tb.create(
            &t,
            "subnets",
            "subnet",
            json!({"network_id": net_id, "cidr": "10.40.0.0/24", "ip_version": 4}),
        )
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut pm: Vec<NodePodman> = tb
            .nodes
            .iter()
            .map(|n| NodePodman::new(dir.path(), &n.ns.name, &n.socket, &cni_bin, "pods", &project))
            .collect();
        let tag = format!("{}-{}", std::process::id(), unique());
        let (a, b) = (format!("isthmus-a-{tag}"), format!("isthmus-b-{tag}"));
        let id_a = tokio::task::block_in_place(|| pm[0].start(&a, &[]));
        // b asks for its address and MAC (podman's --ip/--mac-address: the CNI capabilities).
        let id_b = tokio::task::block_in_place(|| {
            pm[1].start(&b, &["--ip", "10.40.0.77", "--mac-address", "fa:16:3e:40:00:77"])
        });
        let (ip_a, ip_b) = (pm[0].ipv4(&a), pm[1].ipv4(&b));
        assert!(ip_a.starts_with("10.40.0."), "{ip_a}");
        assert_eq!(ip_b, "10.40.0.77");
        let (_, link) = pm[1].exec(&b, &["ip", "link", "show", "eth0"]);
        assert!(link.contains("fa:16:3e:40:00:77"), "{link}");

        // The API shows each container's port, ACTIVE, bound to its node, with its address.
        let all = ports(&tb).await;
        for (id, ip, node) in [(&id_a, &ip_a, 0), (&id_b, &ip_b, 1)] {
            let p = all
                .iter()
                .find(|p| p["device_id"] == id.as_str())
                .expect("container's port");
            assert_eq!(p["status"], "ACTIVE", "{p}");
            assert_eq!(p["binding:host_id"], tb.nodes[node].name.as_str(), "{p}");
            assert_eq!(p["fixed_ips"][0]["ip_address"], ip.as_str(), "{p}");
        }

        // A workload attached directly (no container runtime) on node 0.
        let direct = tb
            .create(
                &t,
                "ports",
                "port",
                json!({"network_id": net_id, "fixed_ips": [{"ip_address": "10.40.0.200"}]}),
            )
            .await;
        let (d, _) = tb.nodes[0].attach(direct["id"].as_str().expect("id")).await;

        let mut ok = false;
        for _ in 0..10 {
            ok = tokio::task::block_in_place(|| {
                pm[0].pings(&a, &ip_b) && pm[1].pings(&b, &ip_a) && pm[1].pings(&b, "10.40.0.200")
            });
            if ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(
            ok,
            "containers across nodes (and the direct workload) do not ping each other"
        );
        let (pinged, out, _) = run(&["ip", "netns", "exec", &d.name, "ping", "-c", "2", "-W", "2", &ip_a]);
        assert!(pinged, "the direct workload cannot ping container a: {out}");

        // A container on another project's network cannot reach them.
        let other = format!("podmanx{}", unique());
        let t2 = tb.member(&other).await;
        let net2 = tb.create(&t2, "networks", "network", json!({"name": "pods"})).await;
        tb.create(
            &t2,
            "subnets",
            "subnet",
            json!({"network_id": net2["id"], "cidr": "10.40.0.0/24", "ip_version": 4}),
        )
        .await;
        let mut pm2 = NodePodman::new(
            &dir.path().join("x"),
            &tb.nodes[1].ns.name,
            &tb.nodes[1].socket,
            &cni_bin,
            "pods",
            &other,
        );
        let c = format!("isthmus-c-{tag}");
        // An address a cannot have (a's comes from the start of the pool): with the same CIDR,
        // c could otherwise get a's very address and "reach" it by pinging itself.
        tokio::task::block_in_place(|| pm2.start(&c, &["--ip", "10.40.0.250"]));
        assert!(
            !tokio::task::block_in_place(|| pm2.pings(&c, &ip_a)),
            "another project's container reached a"
        );

        // podman rm releases the port.
        tokio::task::block_in_place(|| pm[0].remove(&a));
        let all = ports(&tb).await;
        assert!(
            all.iter().all(|p| p["device_id"] != id_a.as_str()),
            "podman rm left the port"
        );
        assert!(all.iter().any(|p| p["device_id"] == id_b.as_str()));
        drop(d);
    })
    .await
    .expect("test timed out");
}
