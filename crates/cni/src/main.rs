//! `isthmus-cni` binary: environment + stdin in, one exchange with the agent socket, CNI result out.
//! In the nested modes (inside a VM) the nested API and the container's device instead.

mod nested_run;

use isthmus_cni::{
    code, finish, start, transport_error, Call, CniError, Env, Outcome, Step, TransportError, CURRENT_VERSION,
    MAX_REPLY,
};
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set by whichever thread prints the outcome first: the main thread or the deadline watchdog.
static DECIDED: AtomicBool = AtomicBool::new(false);

fn main() {
    let env = Env::from_os();
    let outcome = match read_stdin(&env) {
        Ok(stdin) => match nested(&env, &stdin) {
            Some(config) => nested_run::run(&env, config),
            None => agent_path(&env, &stdin),
        },
        Err(e) => CniError::new(code::IO_FAILURE, "cannot read the network config from stdin")
            .with_details(e.to_string())
            .outcome(CURRENT_VERSION),
    };
    if DECIDED.swap(true, Ordering::SeqCst) {
        // The watchdog has answered and is exiting the process.
        loop {
            std::thread::park();
        }
    }
    emit(&outcome);
    std::process::exit(outcome.exit_code);
}

/// A config with `mode` (VERSION always answers the same, whatever the mode).
fn nested(env: &Env, stdin: &[u8]) -> Option<Result<isthmus_cni::nested::NestedConfig, CniError>> {
    if env.command.as_deref() == Some("VERSION") {
        return None;
    }
    isthmus_cni::nested::detect(stdin)
}

fn agent_path(env: &Env, stdin: &[u8]) -> Outcome {
    match start(env, stdin) {
        Step::Done(outcome) => outcome,
        Step::Call(mut call) => {
            watchdog(&call);
            let deadline = Instant::now() + call.timeout;
            match pass_netns(&mut call) {
                // Held open until the reply is in: the agent opens it through /proc.
                Ok(_ns) => finish(&call, exchange(&call, deadline)),
                Err(e) => e.outcome(call.version.as_str()),
            }
        }
    }
}

/// The nested modes' deadline: whatever blocks (the API, the kernel), the runtime gets error
/// 11 once `timeout` has passed.
pub(crate) fn watchdog_for(timeout: Duration, version: &'static str) {
    let spawned = std::thread::Builder::new().name("deadline".into()).spawn(move || {
        std::thread::sleep(timeout);
        if DECIDED.swap(true, Ordering::SeqCst) {
            return;
        }
        let outcome = CniError::new(
            code::TRY_AGAIN_LATER,
            format!("no answer within {}s", timeout.as_secs()),
        )
        .outcome(version);
        emit(&outcome);
        std::process::exit(outcome.exit_code);
    });
    // Without the thread each request's own timeout still bounds it.
    drop(spawned);
}

/// Whatever blocks (a namespace path that is a FIFO on a stuck filesystem, a connect to a
/// stopped agent whose backlog is full, a reply trickling in), the runtime gets the spec's
/// error JSON once the config's timeout has passed.
fn watchdog(call: &Call) {
    let call = call.clone();
    let spawned = std::thread::Builder::new().name("deadline".into()).spawn(move || {
        std::thread::sleep(call.timeout);
        if DECIDED.swap(true, Ordering::SeqCst) {
            return;
        }
        let e = TransportError::exchange(&std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no complete reply before the deadline",
        ));
        let outcome = transport_error(&call, &e).outcome(call.version.as_str());
        emit(&outcome);
        std::process::exit(outcome.exit_code);
    });
    // Without the thread the socket timeouts still bound each step.
    drop(spawned);
}

fn read_stdin(env: &Env) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let stdin = std::io::stdin();
    // A VERSION probe typed at a shell must not wait for a config nobody will send.
    if env.command.as_deref() == Some("VERSION") && stdin.is_terminal() {
        return Ok(buf);
    }
    stdin.lock().read_to_end(&mut buf)?;
    Ok(buf)
}

/// `O_NONBLOCK` (std already opens with `O_CLOEXEC`): opening a FIFO must not wait for a writer.
#[cfg(any(target_arch = "mips", target_arch = "mips64"))]
const O_NONBLOCK: i32 = 0o200;
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const O_NONBLOCK: i32 = 0x4000;
#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
const O_NONBLOCK: i32 = 0o4000;

/// Opens CNI_NETNS without blocking and checks that it is a namespace: a regular file on nsfs
/// (the file system of `/proc/self/ns/*`, one superblock, so the same device). A FIFO, a
/// device, a directory or an ordinary file is refused here; that it is a *network* namespace
/// the agent checks (`NS_GET_NSTYPE`), which needs no more than std here.
fn open_netns(path: &str) -> Result<std::fs::File, CniError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let io_error = |what: &str, e: std::io::Error| {
        CniError::new(code::IO_FAILURE, format!("cannot {what} CNI_NETNS {path}")).with_details(e.to_string())
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                CniError::new(code::UNKNOWN_CONTAINER, format!("CNI_NETNS {path} does not exist"))
            }
            _ => io_error("open", e),
        })?;
    let meta = file.metadata().map_err(|e| io_error("stat", e))?;
    let nsfs = std::fs::metadata("/proc/self/ns/net").map_err(|e| io_error("compare with /proc/self/ns/net", e))?;
    if !meta.file_type().is_file() || meta.dev() != nsfs.dev() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {path} is not a network namespace"),
        )
        .with_details(format!("it is a {:?}, not a namespace file", meta.file_type())));
    }
    Ok(file)
}

/// The agent may run in another mount namespace (started by `ip netns exec`, say), where the
/// runtime's `/run/netns/...` bind mount is not visible. So the plugin opens the namespace and
/// adds `netns_fd`, a `/proc/<pid>/fd/<n>` path that reaches it through this process.
fn pass_netns(call: &mut Call) -> Result<Option<std::fs::File>, CniError> {
    use isthmus_cni::Request;
    use std::os::fd::AsRawFd;
    let Some(mut req) = serde_json::from_str(&call.request)
        .ok()
        .and_then(|v| Request::from_json(&v).ok())
    else {
        return Ok(None);
    };
    let (netns, netns_fd) = match &mut req {
        Request::CniAdd(a) => (&a.netns, &mut a.netns_fd),
        Request::CniCheck(c) => (&c.netns, &mut c.netns_fd),
        _ => return Ok(None),
    };
    let file = open_netns(netns)?;
    *netns_fd = Some(format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd()));
    call.request = serde_json::to_string(&req).map_err(|e| {
        CniError::new(
            isthmus_cni::code::DECODE_FAILURE,
            format!("cannot encode the agent request: {e}"),
        )
    })? + "\n";
    Ok(Some(file))
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed")
}

/// The only socket I/O: connect, send the request line, read one reply line (bounded by the
/// deadline and size).
fn exchange(call: &Call, deadline: Instant) -> Result<String, TransportError> {
    let stream = UnixStream::connect(&call.socket).map_err(|e| TransportError::connect(&e))?;
    let io = |e: std::io::Error| TransportError::exchange(&e);
    // Each read and write gets what is left of the deadline, so a slow trickle cannot extend it.
    let left = || {
        let d = deadline.saturating_duration_since(Instant::now());
        if d < Duration::from_millis(1) {
            Err(timed_out())
        } else {
            Ok(d)
        }
    };
    stream.set_write_timeout(Some(left().map_err(io)?)).map_err(io)?;
    (&stream).write_all(call.request.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new((&stream).take(MAX_REPLY));
    let mut line = Vec::new();
    loop {
        stream.set_read_timeout(Some(left().map_err(io)?)).map_err(io)?;
        let buf = reader.fill_buf().map_err(io)?;
        if buf.is_empty() {
            break;
        }
        let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        line.extend_from_slice(chunk);
        let n = chunk.len();
        reader.consume(n);
        if done {
            break;
        }
    }
    String::from_utf8(line)
        .map_err(|e| TransportError::exchange(&std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error())))
}

fn emit(outcome: &Outcome) {
    if outcome.stdout.is_empty() {
        return;
    }
    // Nothing sensible is left to do if stdout is gone; the exit code still tells the runtime.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", outcome.stdout).and_then(|()| out.flush());
}
