//! The guest side of containers nested in a VM: the test VM has what `isthmus-cni`'s nested
//! modes need (802.1Q and macvlan modules, network namespaces made with busybox `unshare`, the
//! plugin itself) and reaches the API server over its management NIC; then the whole path, a
//! container in the VM on a subport (vlan) or an address pair (macvlan) pinging a container on
//! another node. Needs root,
//! qemu-system-x86, busybox-static and a release `isthmus-cni` (`cargo build --release -p
//! isthmus-cni`, or `ISTHMUS_GUEST_CNI`), like `vm_e2e.rs`.

mod support;
mod testbed;
mod vm;

use serde_json::json;

use std::time::Duration;
use testbed::Testbed;
use vm::{Forwarder, Options, Vm};

const TEST_TIMEOUT: Duration = Duration::from_secs(240);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_has_the_nested_tools_and_reaches_the_api() {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tb = Testbed::start(1).await;
        let t = tb.member("nested").await;
        let n = tb.create(&t, "networks", "network", json!({"name": "vmnet"})).await;
        let net = n["id"].as_str().expect("id").to_string();
        let s = tb
            .create(
                &t,
                "subnets",
                "subnet",
                json!({"network_id": net, "cidr": "10.83.0.0/24", "ip_version": 4}),
            )
            .await;
        let port = tb
            .vm_port(&net, s["id"].as_str().expect("id"), "10.83.0.10", 0)
            .await;
        let server = tb
            .network_url
            .trim_start_matches("http://")
            .parse()
            .expect("server address");
        let fwd = Forwarder::start(&tb.nodes[0].ns.path(), server);
        let p = fwd.port;

        // Kept under the kernel command line's 2 KiB once in base64. (Debian's busybox wget
        // crashes on -T, hence `timeout`.)
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"isthmus-cni","mode":"nested-macvlan","nested":{{"api_url":"http://10.0.2.2:{p}","credential_file":"/etc/isthmus/c","network_id":"{net}","parent_interface":"eth0"}}}}"#
        );
        let cmd = format!(
            "lsmod|grep -q '^8021q'&&lsmod|grep -q '^macvlan'&&echo MODS-OK\n\
             ip link add link eth0 name v101 type vlan id 101&&grep -q 'VID: 101' /proc/net/vlan/v101&&ip link del v101&&echo VLAN-OK\n\
             ip link add link eth0 name mv0 type macvlan&&ip link del mv0&&echo MACVLAN-OK\n\
             unshare -n sleep 1000 & c=$!;sleep 1\n\
             nsenter -n -t $c ip link|grep -q LOOPBACK&&! nsenter -n -t $c ip link|grep -q eth0&&echo NETNS-OK\n\
             echo VERSION=$(CNI_COMMAND=VERSION isthmus-cni</dev/null)\n\
             echo API=$(timeout 20 wget -q -O - http://10.0.2.2:{p}/)\n\
             mkdir -p /etc/isthmus;echo c1.s3cr3t>/etc/isthmus/c;chmod 644 /etc/isthmus/c\n\
             add(){{ echo '{conf}'|CNI_COMMAND=ADD CNI_CONTAINERID=c1 CNI_NETNS=/proc/$c/ns/net CNI_IFNAME=eth0 isthmus-cni;echo \" rc=$?\"; }}\n\
             echo OPEN=$(add)\n\
             chmod 600 /etc/isthmus/c\n\
             echo ADD=$(add)\n"
        );
        let vm = Vm::start_with(
            &tb.nodes[0].ns.name,
            &isthmus_agent::names::tap(port["id"].as_str().expect("id")),
            port["mac_address"].as_str().expect("mac"),
            &cmd,
            20,
            &Options { management: true },
        );
        vm.wait_for("ISTHMUS-MGMT up", Duration::from_secs(120)).await;
        // eth0 still gets its port's address by DHCP next to the management NIC.
        vm.wait_for("ISTHMUS-STATE-END", Duration::from_secs(60)).await;
        let st = vm.state();
        assert!(st.contains("inet 10.83.0.10/24"), "{st}");
        vm.wait_for("ISTHMUS-CMD-END", Duration::from_secs(90)).await;
        let log = vm.log();
        let out = vm.cmd_output();
        println!("guest:\n{out}");
        for marker in ["MODS-OK", "VLAN-OK", "MACVLAN-OK", "NETNS-OK"] {
            assert!(out.contains(marker), "{marker} missing:\n{log}");
        }
        assert!(
            out.contains(r#"VERSION={"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#),
            "{log}"
        );
        // The server's version document, through eth1, QEMU's user network and the forwarder.
        assert!(out.contains(r#"API={"versions":[{"id":"v2.0""#), "{log}");
        // The nested mode runs in the guest: it refuses a credential everyone can read...
        let open = out.lines().find(|l| l.starts_with("OPEN=")).unwrap_or_default();
        assert!(open.contains(r#""code":7"#) && open.contains("readable by everyone"), "{open}");
        assert!(open.trim_end().ends_with("rc=1"), "{open}");
        // ...and with a private one asks the API, which (without the nested API here) refuses.
        let add = out.lines().find(|l| l.starts_with("ADD=")).unwrap_or_default();
        assert!(add.contains("nested API: attaching failed (status 4"), "{add}");
        assert!(
            !open.contains("s3cr3t") && !add.contains("s3cr3t"),
            "the credential must never be printed:\n{out}"
        );
    })
    .await
    .expect("test timed out");
}

/// The whole path: a container in a VM joins another network through the VM's trunk (a
/// subport or an allowed address pair) and reaches a container on another node; DEL undoes it.
async fn nested_container_reaches_a_node_container(mode: &str) {
    support::require_root();
    tokio::time::timeout(TEST_TIMEOUT, async {
        let tb = Testbed::start(2).await;
        let project = format!("nested-{mode}");
        let t = tb.member(&project).await;
        let vmnet = tb.create(&t, "networks", "network", json!({"name": "vmnet"})).await;
        let vmnet = vmnet["id"].as_str().expect("id").to_string();
        let vmsub = tb
            .create(&t, "subnets", "subnet", json!({"network_id": vmnet, "cidr": "10.83.0.0/24", "ip_version": 4}))
            .await;
        let cnet = tb.create(&t, "networks", "network", json!({"name": "cnet"})).await;
        let cnet = cnet["id"].as_str().expect("id").to_string();
        tb.create(&t, "subnets", "subnet", json!({"network_id": cnet, "cidr": "10.86.0.0/24", "ip_version": 4}))
            .await;
        let port = tb
            .vm_port(&vmnet, vmsub["id"].as_str().expect("id"), "10.83.0.10", 0)
            .await;
        let trunk = tb
            .create(&t, "trunks", "trunk", json!({"port_id": port["id"], "name": "vm"}))
            .await;
        let trunk = trunk["id"].as_str().expect("id");
        let secret = tb.trunk_credential(&t, trunk).await;
        // A subport may be on any network; a macvlan container is on the VM's own (an
        // address pair of its port).
        let (cnet, cname, peer_ip) = match mode {
            "vlan" => (cnet, "cnet", "10.86.0.50"),
            _ => (vmnet.clone(), "vmnet", "10.83.0.50"),
        };
        let peer = tokio::task::block_in_place(|| tb.nodes[1].cni_container(&project, cname, peer_ip));
        let server = tb.network_url.trim_start_matches("http://").parse().expect("server address");
        let fwd = Forwarder::start(&tb.nodes[0].ns.path(), server);
        let p = fwd.port;
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"isthmus-cni","mode":"nested-{mode}","nested":{{"api_url":"http://10.0.2.2:{p}","credential_file":"/etc/isthmus/c","network_id":"{cnet}","parent_interface":"eth0"}}}}"#
        );
        let cmd = format!(
            "mkdir -p /etc/isthmus;echo {secret}>/etc/isthmus/c;chmod 600 /etc/isthmus/c\n\
             unshare -n sleep 1000 & c=$!;sleep 1\n\
             cni(){{ echo '{conf}'|CNI_COMMAND=$1 CNI_CONTAINERID=c1 CNI_NETNS=/proc/$c/ns/net CNI_IFNAME=eth0 isthmus-cni;echo \" rc=$?\"; }}\n\
             echo ADD=$(cni ADD)\n\
             nsenter -n -t $c ping -c 3 -W 3 {peer_ip} >/dev/null&&echo PING-OK||echo PING-FAIL\n\
             echo CHECK=$(cni CHECK)\n\
             echo DEL=$(cni DEL)\n\
             nsenter -n -t $c ip link|grep -q eth0||echo GONE-OK\n"
        );
        let vm = Vm::start_with(
            &tb.nodes[0].ns.name,
            &isthmus_agent::names::tap(port["id"].as_str().expect("id")),
            port["mac_address"].as_str().expect("mac"),
            &cmd,
            20,
            &Options { management: true },
        );
        vm.wait_for("ISTHMUS-CMD-END", Duration::from_secs(180)).await;
        let log = vm.log();
        let out = vm.cmd_output();
        println!("guest:\n{out}");
        let add = out.lines().find(|l| l.starts_with("ADD=")).unwrap_or_default();
        assert!(add.trim_end().ends_with("rc=0"), "{log}");
        assert!(out.contains("PING-OK"), "{log}");
        assert!(out.contains("CHECK= rc=0"), "{log}");
        assert!(out.contains("DEL= rc=0") && out.contains("GONE-OK"), "{log}");
        drop(peer);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_vlan_container_reaches_a_node_container() {
    nested_container_reaches_a_node_container("vlan").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_macvlan_container_reaches_a_node_container() {
    nested_container_reaches_a_node_container("macvlan").await;
}
