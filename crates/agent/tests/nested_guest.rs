//! The guest side of containers nested in a VM: the test VM has what `isthmus-cni`'s nested
//! modes need (802.1Q and macvlan modules, network namespaces made with busybox `unshare`, the
//! plugin itself) and reaches the API server over its management NIC. Needs root,
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

/// Between `ISTHMUS-CMD-BEGIN` and `-END`: what the command printed.
fn cmd_output(log: &str) -> &str {
    let start = log
        .find("ISTHMUS-CMD-BEGIN")
        .map_or(0, |i| i + "ISTHMUS-CMD-BEGIN".len());
    let end = log.find("ISTHMUS-CMD-END").unwrap_or(log.len());
    log.get(start..end).unwrap_or("")
}

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
        let out = cmd_output(&log);
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
