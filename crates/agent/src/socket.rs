//! The local attach API: newline-delimited JSON on a unix socket (0600, so root only).
//!
//! Requests, one per line:
//! `{"op":"attach","port_id":ID,"netns":PATH,"ifname":"eth0"}`, `{"op":"detach","port_id":ID}`
//! and `{"op":"status"}` (whether the agent has the server's view, its ports and networks).
//! The CNI plugin's requests: `cni_add`, `cni_del`, `cni_check`, `cni_gc`, `cni_status`
//! (see [`crate::cni`]); their errors also carry `cni_code`, the CNI error code.
//! Each gets one line back: `{"ok":true,...}` or `{"ok":false,"code":N,"message":"..."}`.

use crate::kernel::Kernel;
use crate::runtime::{Agent, AttachRequest, OpError};
use isthmus_wire::socket::{CniAdd, ErrorReply, Request};
use serde_json::Value;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

/// Longest accepted request line.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Binds the socket: parent directory created (0700), a stale socket replaced, mode 0600.
///
/// The socket never exists at `path` with a wider mode: it is bound inside a private 0700
/// directory next to `path`, restricted there, then renamed into place (the listener follows
/// the inode). No process-wide umask is touched.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::DirBuilderExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    let private = dir.join(format!(".{name}.{}.bind", std::process::id()));
    // A leftover of an earlier run with this pid (only ever our own socket inside).
    let _ = std::fs::remove_file(private.join("s"));
    let _ = std::fs::remove_dir(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .with_context(|| format!("creating {}", private.display()))?;
    let bound = (|| {
        let tmp = private.join("s");
        let l = UnixListener::bind(&tmp).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("moving the socket to {}", path.display()))?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(private.join("s"));
    let _ = std::fs::remove_dir(&private);
    bound
}

pub async fn serve<K: Kernel + 'static>(agent: Arc<Agent<K>>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(agent, stream).await {
                        debug!(error = %e, "socket connection ended with an error");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

fn error(e: OpError) -> Value {
    let reply = ErrorReply {
        ok: false,
        code: e.code,
        message: e.message,
        cni_code: e.cni,
    };
    serde_json::to_value(reply).unwrap_or(Value::Null)
}

async fn connection<K: Kernel + 'static>(agent: Arc<Agent<K>>, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut reader = BufReader::new(r);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = line.last() != Some(&b'\n') && line.len() > MAX_REQUEST;
        let answer = if too_long {
            error(OpError::new(413, format!("request longer than {MAX_REQUEST} bytes")))
        } else if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        } else {
            match handle(&agent, &line).await {
                Ok(v) => v,
                Err(e) => error(e),
            }
        };
        let mut out = answer.to_string();
        out.push('\n');
        w.write_all(out.as_bytes()).await?;
        if too_long {
            return Ok(());
        }
    }
}

fn reply(v: impl serde::Serialize) -> Result<Value, OpError> {
    serde_json::to_value(v).map_err(|e| OpError::new(500, format!("cannot encode the reply: {e}")))
}

/// Parses and performs one request.
pub async fn handle<K: Kernel + 'static>(agent: &Agent<K>, line: &[u8]) -> Result<Value, OpError> {
    let req: Value =
        serde_json::from_slice(line).map_err(|e| OpError::new(400, format!("request is not valid JSON: {e}")))?;
    let req = Request::from_json(&req).map_err(|e| {
        let err = OpError::new(400, e.message);
        if e.cni {
            cni_config(err)
        } else {
            err
        }
    })?;
    match req {
        Request::Attach { port_id, netns, ifname } => {
            let r = AttachRequest::new(&port_id, PathBuf::from(netns), ifname.as_deref().unwrap_or("eth0"));
            reply(agent.attach(&r).await?)
        }
        Request::Detach { port_id } => reply(agent.detach(&port_id).await?),
        Request::Status => reply(agent.status()),
        Request::CniAdd(add) => {
            let r = cni_request(add)?;
            reply(agent.cni_add(&r).await?)
        }
        Request::CniDel(del) => reply(agent.cni_del(&del.container_id, &del.ifname).await?),
        Request::CniCheck(check) => {
            let (netns, _) = cni_netns(&check.netns, check.netns_fd.as_deref())?;
            reply(agent.cni_check(&check.container_id, &check.ifname, &netns).await?)
        }
        Request::CniGc(gc) => {
            let valid = gc.valid.into_iter().map(|v| (v.container_id, v.ifname)).collect();
            reply(agent.cni_gc(&gc.project, &gc.network, &valid).await?)
        }
        Request::CniStatus => reply(agent.cni_status()?),
    }
}

fn cni_config(e: OpError) -> OpError {
    e.with_cni(crate::cni::code::INVALID_CONFIG)
}

/// The namespace to work in — `netns_fd` (the plugin's `/proc/<pid>/fd/<n>`, valid whatever
/// mount namespace this agent is in) if given, else `netns` — and the path to record.
fn cni_netns(recorded: &str, netns_fd: Option<&str>) -> Result<(PathBuf, String), OpError> {
    let netns = PathBuf::from(netns_fd.unwrap_or(recorded));
    crate::runtime::check_netns(&netns).map_err(|e| OpError {
        message: e.message.replace(&netns.display().to_string(), recorded),
        ..e
    })?;
    Ok((netns, recorded.to_string()))
}

fn cni_request(req: CniAdd) -> Result<crate::cni::AddRequest, OpError> {
    if !crate::kernel::valid_ifname(&req.ifname) {
        return Err(cni_config(OpError::new(
            400,
            format!("invalid ifname {:?}", req.ifname),
        )));
    }
    let (netns, recorded) = cni_netns(&req.netns, req.netns_fd.as_deref())?;
    Ok(crate::cni::AddRequest {
        container_id: req.container_id,
        ifname: req.ifname,
        netns,
        recorded_netns: recorded,
        network: req.network,
        project: req.project,
        ips: req.ips,
        mac: req.mac,
        pool_size: req.pool_size.and_then(|n| usize::try_from(n).ok()),
    })
}

/// A client for the socket: sends one request, returns the answer (tests and tools).
pub async fn request(path: &Path, req: &Value) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(path).await?;
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes()).await?;
    let mut reader = BufReader::new(s);
    let mut answer = String::new();
    reader.read_line(&mut answer).await?;
    serde_json::from_str(&answer).map_err(|e| std::io::Error::other(format!("bad answer {answer:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::FakeKernel;
    use crate::runtime::AgentConfig;
    use serde_json::json;

    fn agent(dir: &Path) -> Arc<Agent<FakeKernel>> {
        let mut c = AgentConfig::new(
            "n1",
            "http://127.0.0.1:9",
            "http://127.0.0.1:9/v3",
            "pw",
            "192.0.2.1".parse().unwrap(),
        );
        c.socket = dir.join("agent.sock");
        Agent::new(c, FakeKernel::new()).unwrap()
    }

    #[tokio::test]
    async fn bad_requests_get_clear_errors_on_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let path = a.config.socket.clone();
        let l = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        tokio::spawn(serve(a.clone(), l));
        for (req, code, needle) in [
            (json!("x"), 400, "JSON object"),
            (json!({}), 400, "'op' is required"),
            (json!({"op": 5}), 400, "must be a string"),
            (json!({"op": "fly"}), 400, "unknown op"),
            (json!({"op": "attach"}), 400, "'port_id' is required"),
            (json!({"op": "attach", "port_id": "p1"}), 400, "'netns' is required"),
            (
                json!({"op": "attach", "port_id": "../p", "netns": "/proc/self/ns/net"}),
                400,
                "invalid port_id",
            ),
            (json!({"op": "attach", "port_id": "p1", "netns": "rel"}), 400, "netns"),
            (
                json!({"op": "attach", "port_id": "p1", "netns": "/proc/self/ns/net", "ifname": "a/b"}),
                400,
                "ifname",
            ),
            (json!({"op": "detach", "port_id": "a b"}), 400, "invalid port_id"),
            // Valid, but the server is not there.
            (
                json!({"op": "attach", "port_id": "p1", "netns": "/proc/self/ns/net"}),
                503,
                "unreachable",
            ),
        ] {
            let got = request(&path, &req).await.unwrap();
            assert_eq!(got["ok"], json!(false), "{req}: {got}");
            assert_eq!(got["code"], json!(code), "{req}: {got}");
            assert!(got["message"].as_str().unwrap().contains(needle), "{req}: {got}");
        }
        // Not JSON at all, then a second request on the same connection.
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"garbage\n{\"op\":\"nope\"}\n").await.unwrap();
        let mut r = BufReader::new(s);
        for needle in ["not valid JSON", "unknown op"] {
            let mut l = String::new();
            r.read_line(&mut l).await.unwrap();
            assert!(l.contains(needle), "{l}");
        }
    }

    /// The socket is 0600 from the moment it appears at its path, in a directory the agent
    /// made 0700; a stale socket is replaced.
    #[tokio::test]
    async fn the_socket_is_never_open_to_others() {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().join("run").join("isthmus");
        let path = parent.join("agent.sock");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (path, stop) = (path.clone(), stop.clone());
            // Stats the path as fast as it can: the first mode seen is the one others could use.
            std::thread::spawn(move || loop {
                if let Ok(m) = std::fs::symlink_metadata(&path) {
                    return Some(m.permissions().mode() & 0o777);
                }
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return None;
                }
            })
        };
        let l = bind(&path).unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            watcher.join().unwrap(),
            Some(0o600),
            "first mode seen at the socket path"
        );
        for d in [&parent, &dir.path().join("run")] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        // Nothing else is left in the directory, and the listener is reachable at the path.
        let names: Vec<_> = std::fs::read_dir(&parent)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("agent.sock")]);
        let (accepted, connected) = tokio::join!(l.accept(), UnixStream::connect(&path));
        accepted.unwrap();
        connected.unwrap();
        // Rebinding over the stale socket works and keeps the mode.
        drop(l);
        let _l = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A file that is not a socket is never replaced.
        let file = parent.join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(bind(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    /// A namespace path that is a FIFO, a device, a directory or a plain file is refused at
    /// once (CNI 4), before any port is taken: opening a FIFO used to block the agent.
    #[tokio::test]
    async fn netns_paths_that_are_not_namespaces_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let paths = [
            fifo.clone(),
            plain,
            dir.path().to_path_buf(),
            PathBuf::from("/dev/null"),
        ];
        for p in &paths {
            for req in [
                json!({"op": "cni_add", "container_id": "c1", "ifname": "eth0", "netns": p,
                       "network": "n", "project": "p"}),
                json!({"op": "cni_add", "container_id": "c1", "ifname": "eth0", "netns": "/run/netns/x",
                       "netns_fd": p, "network": "n", "project": "p"}),
                json!({"op": "attach", "port_id": "p1", "netns": p}),
            ] {
                let line = req.to_string();
                let got = tokio::time::timeout(std::time::Duration::from_secs(5), handle(&a, line.as_bytes()))
                    .await
                    .unwrap_or_else(|_| panic!("{req} blocked"));
                let e = got.expect_err(&req.to_string());
                assert_eq!((e.code, e.cni), (400, Some(4)), "{req}: {e:?}");
                assert!(e.message.contains("not a network namespace"), "{req}: {e:?}");
            }
        }
        let missing = json!({"op": "cni_add", "container_id": "c1", "ifname": "eth0",
                             "netns": dir.path().join("gone"), "network": "n", "project": "p"});
        let e = handle(&a, missing.to_string().as_bytes()).await.unwrap_err();
        assert_eq!((e.code, e.cni), (400, Some(3)), "{e:?}");
    }

    #[tokio::test]
    async fn detach_is_idempotent_without_a_server() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        for _ in 0..2 {
            let v = handle(&a, br#"{"op":"detach","port_id":"p1"}"#).await.unwrap();
            assert_eq!(v["ok"], json!(true));
        }
    }

    #[tokio::test]
    async fn nothing_is_reconciled_before_the_first_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        assert_eq!(a.sync().await.unwrap(), None);
        let st = handle(&a, br#"{"op":"status"}"#).await.unwrap();
        assert_eq!((st["synced"].clone(), st["node"].clone()), (json!(false), json!("n1")));
        a.apply_message(&json!({"type": "snapshot", "revision": 7, "objects": []}))
            .unwrap();
        assert!(a.sync().await.unwrap().is_some());
        let st = handle(&a, br#"{"op":"status"}"#).await.unwrap();
        assert_eq!((st["synced"].clone(), st["revision"].clone()), (json!(true), json!(7)));
    }
}
