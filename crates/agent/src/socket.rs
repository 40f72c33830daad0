//! The local attach API: newline-delimited JSON on a unix socket (0600, so root only).
//!
//! Requests, one per line:
//! `{"op":"attach","port_id":ID,"netns":PATH,"ifname":"eth0"}`, `{"op":"detach","port_id":ID}`
//! and `{"op":"status"}` (whether the agent has the server's view, its ports and networks).
//! The CNI plugin's requests: `cni_add`, `cni_del`, `cni_check`, `cni_gc`, `cni_status`
//! (see [`crate::cni`]); their errors also carry `cni_code`, the CNI error code.
//! Each gets one line back: `{"ok":true,...}` or `{"ok":false,"code":N,"message":"..."}`.

use crate::attach::{AttachRequest, OpError};
use crate::cni::AddRequest;
use isthmus_wire::socket::{
    AttachReply, CheckReply, CniAdd, DelReply, DetachReply, ErrorReply, GcReply, OkReply, Request, StatusReply,
};
use serde_json::Value;
use std::collections::HashSet;
use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

/// What the socket's operations do; the runtime implements it over its controllers, so this
/// module is only the transport.
pub trait Ops: Send + Sync + 'static {
    fn attach(&self, req: &AttachRequest) -> impl Future<Output = Result<AttachReply, OpError>> + Send;
    fn detach(&self, port_id: &str) -> impl Future<Output = Result<DetachReply, OpError>> + Send;
    fn status(&self) -> StatusReply;
    fn cni_add(&self, req: &AddRequest) -> impl Future<Output = Result<AttachReply, OpError>> + Send;
    fn cni_del(&self, container_id: &str, ifname: &str) -> impl Future<Output = Result<DelReply, OpError>> + Send;
    fn cni_check(
        &self,
        container_id: &str,
        ifname: &str,
        netns: &Path,
    ) -> impl Future<Output = Result<CheckReply, OpError>> + Send;
    fn cni_gc(
        &self,
        project: &str,
        network: &str,
        valid: &HashSet<(String, String)>,
    ) -> impl Future<Output = Result<GcReply, OpError>> + Send;
    fn cni_status(&self) -> Result<OkReply, OpError>;
}

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

pub async fn serve<O: Ops>(agent: Arc<O>, listener: UnixListener) {
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

async fn connection<O: Ops>(agent: Arc<O>, stream: UnixStream) -> std::io::Result<()> {
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
            match handle(&*agent, &line).await {
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
pub async fn handle<O: Ops>(agent: &O, line: &[u8]) -> Result<Value, OpError> {
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
    crate::attach::check_netns(&netns).map_err(|e| OpError {
        message: e.message.replace(&netns.display().to_string(), recorded),
        ..e
    })?;
    Ok((netns, recorded.to_string()))
}

fn cni_request(req: CniAdd) -> Result<AddRequest, OpError> {
    if !crate::kernel::valid_ifname(&req.ifname) {
        return Err(cni_config(OpError::new(
            400,
            format!("invalid ifname {:?}", req.ifname),
        )));
    }
    let (netns, recorded) = cni_netns(&req.netns, req.netns_fd.as_deref())?;
    Ok(AddRequest {
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
