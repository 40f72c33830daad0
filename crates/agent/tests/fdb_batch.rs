//! The batched forwarding-entry writer against the real kernel, each test in fresh network
//! namespaces (deleted with everything in them when the test ends). Needs root.

use isthmus_agent::kernel::batch::{BatchConfig, FdbBatcher, FdbEntry, FdbOp};
use isthmus_agent::kernel::KernelError;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use support::*;

mod support;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const VX: &str = "vx0";

/// One test at a time: the timing comparison must not share the machine with the others.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A namespace with a bridge and a learning-off VXLAN device in it, as the agent makes them.
/// Returns it with the VXLAN device's ifindex.
fn node() -> (Ns, u32) {
    let ns = Ns::new();
    ns.ip(&["addr", "add", "192.0.2.254/32", "dev", "lo"]);
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&[
        "link",
        "add",
        VX,
        "type",
        "vxlan",
        "id",
        "100",
        "local",
        "192.0.2.254",
        "dstport",
        "4789",
        "nolearning",
    ]);
    ns.ip(&["link", "set", VX, "master", "br0"]);
    ns.ip(&["link", "set", VX, "up"]);
    ns.ip(&["link", "set", "br0", "up"]);
    let index = ns.ifindex(VX);
    (ns, index)
}

fn mac(i: usize) -> [u8; 6] {
    [0xfa, 0x16, 0x3e, (i >> 16) as u8, (i >> 8) as u8, i as u8]
}

fn dst(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 51, (i / 250) as u8 % 4, (i % 250) as u8 + 1))
}

/// `n` entries: `flood` destinations for the all-zero MAC (the flood list), the rest unicast
/// MACs spread over remote nodes.
fn entries(ifindex: u32, n: usize, flood: usize) -> Vec<FdbEntry> {
    let mut out: Vec<FdbEntry> = (0..flood)
        .map(|i| FdbEntry {
            ifindex,
            mac: [0; 6],
            dst: dst(i),
        })
        .collect();
    out.extend((flood..n).map(|i| FdbEntry {
        ifindex,
        mac: mac(i),
        dst: dst(i % 97),
    }));
    out
}

fn key(e: &FdbEntry) -> (String, String) {
    (isthmus_agent::kernel::MacAddr(e.mac).to_string(), e.dst.to_string())
}

/// The static entries with a destination on `dev`, per `bridge fdb show`. (Not `Ns::fdb`:
/// its runner reads the output only after the command exits, and thousands of lines fill the
/// pipe first.)
fn kernel_entries(ns: &Ns, dev: &str) -> BTreeSet<(String, String)> {
    let out = std::process::Command::new("bridge")
        .args(["-n", &ns.name, "fdb", "show", "dev", dev])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running bridge fdb show");
    assert!(
        out.status.success(),
        "bridge fdb show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 3 && w[1] == "dst").then(|| (w[0].to_string(), w[2].to_string()))
        })
        .collect()
}

fn expect_all_ok(results: &[Result<(), KernelError>], what: &str) {
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .take(5)
        .collect();
    assert!(failed.is_empty(), "{what}: failures, e.g. {failed:?}");
}

fn errno(e: &KernelError) -> Option<i32> {
    match e {
        KernelError::Netlink {
            source: rtnetlink::Error::NetlinkError(m),
            ..
        } => m.code.map(|c| -c.get()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_deletes_and_partial_failures() {
    require_root();
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (ns, ifindex) = node();
        let batcher = FdbBatcher::open(Some(&ns.path())).await.expect("open batcher");

        // 1. 5,000 entries, 12 of them destinations of the flood entry.
        let all = entries(ifindex, 5_000, 12);
        let adds: Vec<FdbOp> = all.iter().copied().map(FdbOp::Add).collect();
        let t = Instant::now();
        let results = batcher.apply(&adds).await;
        println!("5,000 adds: {:.3} s", t.elapsed().as_secs_f64());
        assert_eq!(results.len(), adds.len());
        expect_all_ok(&results, "adding 5,000 entries");
        let want: BTreeSet<_> = all.iter().map(key).collect();
        assert_eq!(want.len(), 5_000);
        assert_eq!(
            kernel_entries(&ns, VX),
            want,
            "the kernel must hold exactly the added entries"
        );
        // Appending what exists is a no-op, not an error.
        expect_all_ok(&batcher.apply(&adds[..100]).await, "adding existing entries again");

        // 2. Delete every other one (flood destinations included), then check again.
        let gone: Vec<FdbEntry> = all.iter().step_by(2).copied().collect();
        let kept: Vec<FdbEntry> = all.iter().skip(1).step_by(2).copied().collect();
        let dels: Vec<FdbOp> = gone.iter().copied().map(FdbOp::Del).collect();
        let results = batcher.apply(&dels).await;
        assert_eq!(results.len(), dels.len());
        expect_all_ok(&results, "deleting half");
        let want: BTreeSet<_> = kept.iter().map(key).collect();
        assert_eq!(kernel_entries(&ns, VX), want, "exactly the other half must remain");
        // Deleting what is gone (again, or never there) succeeds.
        let absent = FdbOp::Del(FdbEntry {
            ifindex,
            mac: [0x02, 0, 0, 0, 0, 1],
            dst: "203.0.113.9".parse().unwrap(),
        });
        let results = batcher.apply(&[dels[0], absent, dels[1]]).await;
        expect_all_ok(&results, "deleting absent entries");

        // 3. An op on a device that does not exist fails alone; its neighbours are applied.
        let a = FdbEntry {
            ifindex,
            mac: [0x02, 0, 0, 0, 0, 0xa],
            dst: "203.0.113.1".parse().unwrap(),
        };
        let c = FdbEntry {
            mac: [0x02, 0, 0, 0, 0, 0xc],
            ..a
        };
        let nodev = FdbEntry {
            ifindex: 999_999,
            mac: [0x02, 0, 0, 0, 0, 0xb],
            ..a
        };
        let ops = [FdbOp::Add(a), FdbOp::Add(nodev), FdbOp::Add(c), FdbOp::Del(nodev)];
        let results = batcher.apply(&ops).await;
        assert_eq!(results.len(), 4);
        assert!(results[0].is_ok(), "{:?}", results[0]);
        assert!(results[2].is_ok(), "{:?}", results[2]);
        for r in [&results[1], &results[3]] {
            let e = r.as_ref().expect_err("an op on ifindex 999999 must fail");
            assert_eq!(errno(e), Some(libc::ENODEV), "{e}");
            assert!(e.to_string().contains("ifindex 999999"), "{e}");
        }
        println!("unknown device: {}", results[1].as_ref().unwrap_err());
        let now = kernel_entries(&ns, VX);
        assert!(now.contains(&key(&a)) && now.contains(&key(&c)));
        assert_eq!(now.len(), want.len() + 2);

        assert!(batcher.apply(&[]).await.is_empty());
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_acknowledgements_fail_their_ops_instead_of_hanging() {
    require_root();
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let (ns, ifindex) = node();
        // A receive buffer for a handful of answers and 2,000 requests per write: the kernel
        // has to drop most acknowledgements.
        let config = BatchConfig {
            rcvbuf: 4096,
            max_in_flight: Some(2_000),
            ..Default::default()
        };
        let batcher = FdbBatcher::open_with(Some(&ns.path()), config)
            .await
            .expect("open batcher");
        let all = entries(ifindex, 3_000, 3);
        let adds: Vec<FdbOp> = all.iter().copied().map(FdbOp::Add).collect();
        let t = Instant::now();
        let results = batcher.apply(&adds).await;
        let took = t.elapsed();
        assert_eq!(results.len(), adds.len());
        let lost: Vec<&KernelError> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        println!(
            "tiny receive buffer: {} of {} acknowledgements lost, {:.3} s; e.g. {}",
            lost.len(),
            adds.len(),
            took.as_secs_f64(),
            lost.first().map(|e| e.to_string()).unwrap_or_default()
        );
        assert!(!lost.is_empty(), "the tiny receive buffer should have overflowed");
        assert!(
            took < Duration::from_secs(5),
            "overflow must not wait for the deadline: {took:?}"
        );
        for e in &lost {
            assert!(matches!(e, KernelError::Io { .. }), "{e}");
            assert!(e.to_string().contains("ENOBUFS"), "{e}");
        }
        // What was acknowledged is there (the kernel applied the rest too: only answers were lost).
        let now = kernel_entries(&ns, VX);
        for (op, r) in adds.iter().zip(&results) {
            if r.is_ok() {
                assert!(now.contains(&key(op.entry())), "acknowledged but absent: {op}");
            }
        }
        assert_eq!(now.len(), 3_000);
        // The socket stays usable, and smaller writes get every answer.
        let dels: Vec<FdbOp> = all[..5].iter().copied().map(FdbOp::Del).collect();
        expect_all_ok(&batcher.apply(&dels).await, "a small batch after an overflow");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_adds_next_to_bridge_batch() {
    require_root();
    let _serial = SERIAL.lock().await;
    tokio::time::timeout(TEST_TIMEOUT, async {
        const N: usize = 10_000;
        const FLOOD: usize = 50;

        let (ns, ifindex) = node();
        let t = Instant::now();
        let batcher = FdbBatcher::open(Some(&ns.path())).await.expect("open batcher");
        let opened = t.elapsed();
        let adds: Vec<FdbOp> = entries(ifindex, N, FLOOD).into_iter().map(FdbOp::Add).collect();
        let t = Instant::now();
        let results = batcher.apply(&adds).await;
        let ours = t.elapsed();
        expect_all_ok(&results, "adding 10,000 entries");
        assert_eq!(kernel_entries(&ns, VX).len(), N);

        // The same entries through iproute2 in another fresh namespace.
        let (ref_ns, _) = node();
        let mut script = tempfile::NamedTempFile::new().expect("temp file");
        for op in &adds {
            let e = op.entry();
            writeln!(
                script,
                "fdb append {} dev {VX} dst {} self permanent",
                isthmus_agent::kernel::MacAddr(e.mac),
                e.dst
            )
            .expect("writing the batch file");
        }
        script.flush().expect("writing the batch file");
        let path = script.path().to_str().expect("utf-8 temp path").to_string();
        let t = Instant::now();
        must(&["bridge", "-n", &ref_ns.name, "-batch", &path]);
        let theirs = t.elapsed();
        assert_eq!(kernel_entries(&ref_ns, VX).len(), N);

        println!(
            "10,000 fdb adds: FdbBatcher {:.3} s (socket setup {:.3} s), bridge -batch {:.3} s (incl. process start)",
            ours.as_secs_f64(),
            opened.as_secs_f64(),
            theirs.as_secs_f64()
        );
    })
    .await
    .expect("test timed out");
}
