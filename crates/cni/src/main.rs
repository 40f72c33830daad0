//! `isthmus-cni` binary: environment + stdin in, one exchange with the agent socket, CNI result out.

use isthmus_cni::{
    code, finish, start, Call, CniError, Env, Outcome, Step, TransportError, CURRENT_VERSION, MAX_REPLY,
};
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;

fn main() {
    let env = Env::from_os();
    let outcome = match read_stdin(&env) {
        Ok(stdin) => match start(&env, &stdin) {
            Step::Done(outcome) => outcome,
            Step::Call(mut call) => {
                // Held open until the reply is in: the agent opens it through /proc.
                let _ns = pass_netns(&mut call);
                finish(&call, exchange(&call))
            }
        },
        Err(e) => CniError::new(code::IO_FAILURE, "cannot read the network config from stdin")
            .with_details(e.to_string())
            .outcome(CURRENT_VERSION),
    };
    emit(&outcome);
    std::process::exit(outcome.exit_code);
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

/// The agent may run in another mount namespace (started by `ip netns exec`, say), where the
/// runtime's `/run/netns/...` bind mount is not visible. So the plugin opens the namespace and
/// adds `netns_fd`, a `/proc/<pid>/fd/<n>` path that reaches it through this process.
fn pass_netns(call: &mut Call) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    let mut req: serde_json::Value = serde_json::from_str(&call.request).ok()?;
    if !matches!(req["op"].as_str(), Some("cni_add" | "cni_check")) {
        return None;
    }
    let file = std::fs::File::open(req["netns"].as_str()?).ok()?;
    req["netns_fd"] = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd()).into();
    call.request = format!("{req}\n");
    Some(file)
}

/// The only socket I/O: connect, send the request line, read one reply line (bounded by timeout and size).
fn exchange(call: &Call) -> Result<String, TransportError> {
    let stream = UnixStream::connect(&call.socket).map_err(|e| TransportError::connect(&e))?;
    let io = |e: std::io::Error| TransportError::exchange(&e);
    stream.set_read_timeout(Some(call.timeout)).map_err(io)?;
    stream.set_write_timeout(Some(call.timeout)).map_err(io)?;
    (&stream).write_all(call.request.as_bytes()).map_err(io)?;
    let mut line = Vec::new();
    BufReader::new((&stream).take(MAX_REPLY))
        .read_until(b'\n', &mut line)
        .map_err(io)?;
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
