//! `isthmus-cni`: a CNI plugin (spec 1.1.0, also 0.3.0–1.0.0) that attaches containers to Isthmus networks.
//!
//! The plugin holds no state and touches no kernel objects. It validates the CNI environment and the network
//! configuration, sends one JSON request line to the node agent's unix socket (`socket`, default
//! `/run/isthmus/agent.sock`), reads one reply line, and turns the reply into a CNI result or CNI error for the
//! spec version the runtime asked for. The agent does the actual work (port, tap/veth, addresses, routes).
//!
//! With `"mode": "nested-vlan"` or `"nested-macvlan"` the plugin runs inside a VM instead and talks to the control
//! plane's nested API itself ([`nested`]).
//!
//! This library is pure: [`start`] turns environment + stdin into either an immediate [`Outcome`] or a [`Call`];
//! the binary performs the socket exchange and hands the reply to [`finish`].

use serde::Serialize;
use serde_json::{Map, Value};
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Spec versions this plugin can read configs for and write results in, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Version used for output when the input does not name a supported one.
pub const CURRENT_VERSION: &str = "1.1.0";
pub const DEFAULT_SOCKET: &str = "/run/isthmus/agent.sock";
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;
/// Longest `timeout_secs` accepted: a runtime must get an answer from every call in bounded time.
pub const MAX_TIMEOUT_SECS: u64 = 300;
/// Largest `poolSize` accepted (the agent's own `--pool-size` is capped the same way).
pub const MAX_POOL_SIZE: u64 = 64;
/// Longest reply line read from the agent; a longer one is a broken agent, not a result.
pub const MAX_REPLY: u64 = 1024 * 1024;

pub mod nested;

/// CNI error codes (SPEC.md "Error"), shared with the agent.
pub use isthmus_wire::cni_code as code;

/// A CNI error: printed on stdout as `{"cniVersion","code","msg","details"}` with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let wire = Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        };
        serde_json::to_string(&wire).unwrap_or_else(|_| format!("{{\"code\":{}}}", self.code))
    }

    pub fn outcome(&self, cni_version: &str) -> Outcome {
        Outcome {
            stdout: self.to_json(cni_version),
            exit_code: 1,
        }
    }
}

/// What the process prints on stdout (possibly nothing) and exits with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

impl Outcome {
    fn success(stdout: String) -> Self {
        Outcome { stdout, exit_code: 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpecVersion {
    V030,
    V031,
    V040,
    V100,
    V110,
}

impl SpecVersion {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "0.3.0" => SpecVersion::V030,
            "0.3.1" => SpecVersion::V031,
            "0.4.0" => SpecVersion::V040,
            "1.0.0" => SpecVersion::V100,
            "1.1.0" => SpecVersion::V110,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SpecVersion::V030 => "0.3.0",
            SpecVersion::V031 => "0.3.1",
            SpecVersion::V040 => "0.4.0",
            SpecVersion::V100 => "1.0.0",
            SpecVersion::V110 => "1.1.0",
        }
    }

    /// `ips[].version` exists up to 0.4.0 and was dropped in 1.0.0.
    fn ip_version_field(self) -> bool {
        self < SpecVersion::V100
    }

    /// `interfaces[].mtu` was added in 1.1.0.
    fn interface_mtu(self) -> bool {
        self >= SpecVersion::V110
    }
}

/// The CNI_* environment variables; empty values count as unset, as in libcni's skel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl Env {
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        Env {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
            path: var("CNI_PATH"),
        }
    }

    pub fn from_os() -> Self {
        Env::from_lookup(|name| std::env::var(name).ok())
    }
}

/// The per-attachment parameters of ADD and CHECK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `cni_args` is CNI_ARGS split into pairs; only ADD reads it (IP=, MAC=).
    Add {
        attachment: Attachment,
        cni_args: Vec<(String, String)>,
    },
    /// CNI_NETNS is optional for DEL: the namespace may already be gone.
    Del {
        container_id: String,
        ifname: String,
        netns: Option<String>,
    },
    Check(Attachment),
    Gc,
    Status,
    Version,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Add { .. } => "ADD",
            Command::Del { .. } => "DEL",
            Command::Check(_) => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }
}

/// Reads CNI_COMMAND and the variables it requires. CNI_PATH is never required: this plugin delegates to nothing.
pub fn parse_command(env: &Env) -> Result<Command, CniError> {
    let Some(command) = env.command.as_deref() else {
        return Err(CniError::new(
            code::INVALID_ENV,
            "required env variables [CNI_COMMAND] missing",
        ));
    };
    let (need_id, need_netns, need_ifname) = match command {
        "ADD" | "CHECK" => (true, true, true),
        "DEL" => (true, false, true),
        "GC" => return Ok(Command::Gc),
        "STATUS" => return Ok(Command::Status),
        "VERSION" => return Ok(Command::Version),
        other => {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND: {other}"),
            ))
        }
    };
    let mut missing = Vec::new();
    if need_id && env.container_id.is_none() {
        missing.push("CNI_CONTAINERID");
    }
    if need_netns && env.netns.is_none() {
        missing.push("CNI_NETNS");
    }
    if need_ifname && env.ifname.is_none() {
        missing.push("CNI_IFNAME");
    }
    if !missing.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("required env variables [{}] missing", missing.join(",")),
        ));
    }
    let container_id = env.container_id.clone().unwrap_or_default();
    let ifname = env.ifname.clone().unwrap_or_default();
    validate_container_id(&container_id)?;
    validate_ifname(&ifname)?;
    let netns = env.netns.clone();
    Ok(match command {
        "ADD" => Command::Add {
            attachment: Attachment {
                container_id,
                ifname,
                netns: netns.unwrap_or_default(),
            },
            cni_args: parse_cni_args(env.args.as_deref().unwrap_or(""))?,
        },
        "CHECK" => Command::Check(Attachment {
            container_id,
            ifname,
            netns: netns.unwrap_or_default(),
        }),
        _ => Command::Del {
            container_id,
            ifname,
            netns,
        },
    })
}

/// SPEC: starts with an alphanumeric, then alphanumerics, `_`, `.` or `-`.
fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        Ok(())
    } else {
        Err(CniError::new(code::INVALID_ENV, "invalid characters in CNI_CONTAINERID").with_details(id.to_string()))
    }
}

/// SPEC: a Linux interface name: 1-15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = |why: &str| Err(CniError::new(code::INVALID_ENV, format!("CNI_IFNAME {name:?} {why}")));
    if name.len() > 15 {
        return bad("is longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("is . or ..");
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return bad("contains / or : or whitespace");
    }
    Ok(())
}

/// Splits CNI_ARGS (`K=V;K2=V2`). Empty items are skipped; an item without `=` or with an empty key is an error.
/// Values may contain `=`; unknown keys are kept and ignored by the caller.
pub fn parse_cni_args(raw: &str) -> Result<Vec<(String, String)>, CniError> {
    let mut out = Vec::new();
    for item in raw.split(';').filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => out.push((k.to_string(), v.to_string())),
            _ => {
                return Err(
                    CniError::new(code::INVALID_ENV, format!("CNI_ARGS: invalid pair {item:?}"))
                        .with_details("CNI_ARGS must be K=V pairs separated by ';'"),
                )
            }
        }
    }
    Ok(out)
}

/// The network configuration read from stdin. Unknown keys are ignored (they may be for other plugins).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub cni_version: SpecVersion,
    pub name: String,
    pub network: String,
    pub project: String,
    pub socket: PathBuf,
    pub timeout: Duration,
    /// `poolSize`: ready ports the agent keeps for this network (0: none); `None`: the agent's default.
    pub pool_size: Option<u64>,
    /// The whole object, for the optional keys each command reads.
    pub raw: Map<String, Value>,
}

pub(crate) fn invalid_config(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

pub(crate) fn required_str(raw: &Map<String, Value>, key: &str) -> Result<String, CniError> {
    match raw.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => Err(invalid_config(format!("network config is missing '{key}'"))),
        Some(other) => Err(invalid_config(format!(
            "network config '{key}' must be a non-empty string, not {other}"
        ))),
    }
}

pub fn parse_config(stdin: &[u8]) -> Result<Config, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(code::DECODE_FAILURE, "network config on stdin is not valid JSON").with_details(e.to_string())
    })?;
    let Value::Object(raw) = value else {
        return Err(CniError::new(
            code::DECODE_FAILURE,
            "network config on stdin is not a JSON object",
        ));
    };
    let version = required_str(&raw, "cniVersion")?;
    let cni_version = SpecVersion::parse(&version).ok_or_else(|| {
        CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {version:?}"),
        )
        .with_details(format!("supported versions: {}", SUPPORTED_VERSIONS.join(", ")))
    })?;
    let name = required_str(&raw, "name")?;
    let network = required_str(&raw, "network")?;
    let project = required_str(&raw, "project")?;
    let socket = match raw.get("socket") {
        None | Some(Value::Null) => PathBuf::from(DEFAULT_SOCKET),
        Some(_) => PathBuf::from(required_str(&raw, "socket")?),
    };
    let timeout_secs = match raw.get("timeout_secs") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT_SECS,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=MAX_TIMEOUT_SECS).contains(n))
            .ok_or_else(|| {
                invalid_config(format!(
                    "network config 'timeout_secs' must be an integer from 1 to {MAX_TIMEOUT_SECS}, not {v}"
                ))
            })?,
    };
    let pool_size = match raw.get("poolSize") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().filter(|n| *n <= MAX_POOL_SIZE).ok_or_else(|| {
            invalid_config(format!(
                "network config 'poolSize' must be an integer from 0 to {MAX_POOL_SIZE}, not {v}"
            ))
        })?),
    };
    Ok(Config {
        cni_version,
        name,
        network,
        project,
        socket,
        timeout: Duration::from_secs(timeout_secs),
        pool_size,
        raw,
    })
}

/// Parses `ip` or `ip/prefix` and returns the address alone: the agent allocates within the network's subnet.
fn parse_requested_ip(s: &str) -> Result<IpAddr, CniError> {
    let bad = || invalid_config(format!("requested IP {s:?} is not an IP address"));
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let ip: IpAddr = addr.trim().parse().map_err(|_| bad())?;
    if let Some(p) = prefix {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        p.parse::<u8>().ok().filter(|n| *n <= max).ok_or_else(bad)?;
    }
    Ok(ip)
}

fn string_list(v: &Value, what: &str) -> Result<Vec<String>, CniError> {
    let err = || invalid_config(format!("{what} must be a list of strings, not {v}"));
    let Value::Array(items) = v else { return Err(err()) };
    items
        .iter()
        .map(|i| i.as_str().map(str::to_string).ok_or_else(err))
        .collect()
}

fn nested<'a>(raw: &'a Map<String, Value>, path: &[&str]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    rest.iter()
        .try_fold(raw.get(*first)?, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

fn cni_arg<'a>(args: &'a [(String, String)], key: &str) -> Option<&'a str> {
    args.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Requested addresses, first source wins: `runtimeConfig.ips` (capability), `args.cni.ips`, then CNI_ARGS `IP`
/// (comma-separated allowed). CONVENTIONS.md: when `args` carries the key, CNI_ARGS must be ignored.
pub fn requested_ips(config: &Config, cni_args: &[(String, String)]) -> Result<Vec<IpAddr>, CniError> {
    let raw = if let Some(v) = nested(&config.raw, &["runtimeConfig", "ips"]) {
        string_list(v, "runtimeConfig.ips")?
    } else if let Some(v) = nested(&config.raw, &["args", "cni", "ips"]) {
        string_list(v, "args.cni.ips")?
    } else if let Some(v) = cni_arg(cni_args, "IP") {
        v.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
    } else {
        Vec::new()
    };
    raw.iter().map(|s| parse_requested_ip(s)).collect()
}

/// Requested MAC: `runtimeConfig.mac` (capability), else CNI_ARGS `MAC`. Returned lower-case.
pub fn requested_mac(config: &Config, cni_args: &[(String, String)]) -> Result<Option<String>, CniError> {
    let raw = match nested(&config.raw, &["runtimeConfig", "mac"]) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(invalid_config(format!(
                "runtimeConfig.mac must be a string, not {other}"
            )))
        }
        None => match cni_arg(cni_args, "MAC") {
            Some(s) => s.to_string(),
            None => return Ok(None),
        },
    };
    validate_mac(&raw).map(Some)
}

/// Six `:`-separated hex octets, unicast and not all-zero: anything else cannot be an interface address.
fn validate_mac(s: &str) -> Result<String, CniError> {
    let bad = |why: &str| Err(invalid_config(format!("requested MAC {s:?} {why}")));
    let octets: Vec<&str> = s.split(':').collect();
    if octets.len() != 6
        || octets
            .iter()
            .any(|o| o.len() != 2 || !o.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return bad("is not a MAC address (want xx:xx:xx:xx:xx:xx)");
    }
    let first = u8::from_str_radix(octets[0], 16).unwrap_or(0);
    if first & 1 == 1 {
        return bad("is a multicast address");
    }
    if octets.iter().all(|o| *o == "00") {
        return bad("is all zeros");
    }
    Ok(s.to_ascii_lowercase())
}

pub use isthmus_wire::socket::ValidAttachment;

/// Reads `cni.dev/valid-attachments` (also the pre-release name `cni.dev/attachments`, which libcni still sends).
/// `null` means "none valid" (libcni encodes an empty list that way); a missing key is refused, because treating it
/// as empty would make the agent delete every attachment of the network.
pub fn valid_attachments(config: &Config) -> Result<Vec<ValidAttachment>, CniError> {
    let value = ["cni.dev/valid-attachments", "cni.dev/attachments"]
        .iter()
        .find_map(|k| config.raw.get(*k))
        .ok_or_else(|| invalid_config("GC config is missing 'cni.dev/valid-attachments'"))?;
    let items = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Array(items) => items,
        other => {
            return Err(invalid_config(format!(
                "'cni.dev/valid-attachments' must be a list, not {other}"
            )))
        }
    };
    items
        .iter()
        .map(|item| {
            let field = |k: &str| item.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
            match (field("containerID"), field("ifname")) {
                (Some(c), Some(i)) => Ok(ValidAttachment {
                    container_id: c.to_string(),
                    ifname: i.to_string(),
                }),
                _ => Err(invalid_config(format!(
                    "invalid entry in 'cni.dev/valid-attachments': {item}"
                ))),
            }
        })
        .collect()
}

pub use isthmus_wire::socket::{CniAdd, CniCheck, CniDel, CniGc, Request};

/// Builds the agent request for `command`, enforcing which commands each spec version defines.
pub fn build_request(command: &Command, config: &Config) -> Result<Request, CniError> {
    let v = config.cni_version;
    let too_old = |min: SpecVersion| {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("config version {} does not allow {}", v.as_str(), command.name()),
        )
        .with_details(format!("{} needs cniVersion {} or later", command.name(), min.as_str())))
    };
    let (network, project) = (config.network.clone(), config.project.clone());
    Ok(match command {
        Command::Add {
            attachment: a,
            cni_args,
        } => Request::CniAdd(CniAdd {
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
            netns: a.netns.clone(),
            netns_fd: None,
            network,
            project,
            ips: requested_ips(config, cni_args)?,
            mac: requested_mac(config, cni_args)?,
            pool_size: config.pool_size,
        }),
        Command::Del {
            container_id,
            ifname,
            netns,
        } => Request::CniDel(CniDel {
            container_id: container_id.clone(),
            ifname: ifname.clone(),
            netns: netns.clone(),
            network,
            project,
        }),
        Command::Check(a) => {
            if v < SpecVersion::V040 {
                return too_old(SpecVersion::V040);
            }
            let prev_result = nested(&config.raw, &["prevResult"])
                .cloned()
                .ok_or_else(|| invalid_config("CHECK config is missing 'prevResult'"))?;
            Request::CniCheck(CniCheck {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
                netns: a.netns.clone(),
                netns_fd: None,
                network,
                project,
                prev_result,
            })
        }
        Command::Gc => {
            if v < SpecVersion::V110 {
                return too_old(SpecVersion::V110);
            }
            Request::CniGc(CniGc {
                network,
                project,
                valid: valid_attachments(config)?,
            })
        }
        Command::Status => {
            if v < SpecVersion::V110 {
                return too_old(SpecVersion::V110);
            }
            Request::CniStatus
        }
        Command::Version => return Err(CniError::new(code::INVALID_ENV, "VERSION does not talk to the agent")),
    })
}

/// The VERSION answer. Echoes the input `cniVersion` when it is one we support (SPEC "VERSION Success"), else the
/// newest; stdin is otherwise ignored, like libcni's skel, so a VERSION probe never fails on its input.
pub fn version_output(stdin: &[u8]) -> String {
    #[derive(Serialize)]
    struct Wire {
        #[serde(rename = "cniVersion")]
        cni_version: &'static str,
        #[serde(rename = "supportedVersions")]
        supported_versions: [&'static str; 5],
    }
    let wire = Wire {
        cni_version: input_version(stdin),
        supported_versions: SUPPORTED_VERSIONS,
    };
    serde_json::to_string(&wire).unwrap_or_default()
}

/// The config's `cniVersion` if supported, else [`CURRENT_VERSION`]; used for VERSION and error output.
fn input_version(stdin: &[u8]) -> &'static str {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).and_then(SpecVersion::parse))
        .map_or(CURRENT_VERSION, SpecVersion::as_str)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Del,
    Check,
    Gc,
    Status,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Add => "ADD",
            Op::Del => "DEL",
            Op::Check => "CHECK",
            Op::Gc => "GC",
            Op::Status => "STATUS",
        }
    }
}

/// A prepared exchange with the agent: send `request`, read one line, pass it to [`finish`].
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub op: Op,
    pub version: SpecVersion,
    pub socket: PathBuf,
    pub timeout: Duration,
    /// The JSON request, newline-terminated.
    pub request: String,
    ifname: String,
    netns: String,
    prev_result: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Nothing to ask the agent (VERSION, or invalid input): print and exit.
    Done(Outcome),
    Call(Call),
}

/// First half of an invocation: everything up to the socket.
pub fn start(env: &Env, stdin: &[u8]) -> Step {
    match prepare(env, stdin) {
        Ok(step) => step,
        Err(e) => Step::Done(e.outcome(input_version(stdin))),
    }
}

fn prepare(env: &Env, stdin: &[u8]) -> Result<Step, CniError> {
    let command = parse_command(env)?;
    if command == Command::Version {
        return Ok(Step::Done(Outcome::success(version_output(stdin))));
    }
    let config = parse_config(stdin)?;
    let request = build_request(&command, &config)?;
    let line = serde_json::to_string(&request)
        .map_err(|e| CniError::new(code::DECODE_FAILURE, format!("cannot encode the agent request: {e}")))?;
    let (op, ifname, netns) = match &command {
        Command::Add { attachment: a, .. } => (Op::Add, a.ifname.clone(), a.netns.clone()),
        Command::Check(a) => (Op::Check, a.ifname.clone(), a.netns.clone()),
        Command::Del { ifname, .. } => (Op::Del, ifname.clone(), String::new()),
        Command::Gc => (Op::Gc, String::new(), String::new()),
        Command::Status | Command::Version => (Op::Status, String::new(), String::new()),
    };
    Ok(Step::Call(Call {
        op,
        version: config.cni_version,
        socket: config.socket.clone(),
        timeout: config.timeout,
        request: line + "\n",
        ifname,
        netns,
        prev_result: nested(&config.raw, &["prevResult"]).cloned(),
    }))
}

/// Why no reply line came back from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportError {
    /// The failure happened in connect(), i.e. nothing was sent.
    pub connecting: bool,
    pub kind: io::ErrorKind,
    pub detail: String,
}

impl TransportError {
    pub fn connect(e: &io::Error) -> Self {
        TransportError {
            connecting: true,
            kind: e.kind(),
            detail: e.to_string(),
        }
    }

    pub fn exchange(e: &io::Error) -> Self {
        TransportError {
            connecting: false,
            kind: e.kind(),
            detail: e.to_string(),
        }
    }
}

/// Transport failures. STATUS always answers 50 (SPEC: cannot service ADD). For the others a missing or refusing
/// socket, a timeout or a dropped connection is 11 (agent down or restarting: the runtime retries, and DEL must be
/// retried rather than dropped); another connect error (e.g. permission denied) is 5, retrying will not help; a
/// reply that is not UTF-8 is 6.
pub fn transport_error(call: &Call, e: &TransportError) -> CniError {
    let socket = call.socket.display();
    let (code, msg) = match (call.op, e.connecting, e.kind) {
        (Op::Status, true, _) => (
            code::NOT_AVAILABLE,
            format!("isthmus agent socket {socket} is not available"),
        ),
        (Op::Status, false, _) => (
            code::NOT_AVAILABLE,
            format!("no reply from the isthmus agent on {socket}"),
        ),
        (_, true, io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => (
            code::TRY_AGAIN_LATER,
            format!("isthmus agent socket {socket} is not available (is the agent running?)"),
        ),
        (_, true, _) => (
            code::IO_FAILURE,
            format!("cannot connect to the isthmus agent socket {socket}"),
        ),
        (_, false, io::ErrorKind::InvalidData) => (
            code::DECODE_FAILURE,
            format!("the isthmus agent on {socket} sent a reply that is not UTF-8"),
        ),
        (_, false, io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => (
            code::TRY_AGAIN_LATER,
            format!(
                "no reply from the isthmus agent on {socket} within {}s",
                call.timeout.as_secs()
            ),
        ),
        (_, false, _) => (
            code::TRY_AGAIN_LATER,
            format!("lost the connection to the isthmus agent on {socket}"),
        ),
    };
    CniError::new(code, msg).with_details(e.detail.clone())
}

/// Agent failure → CNI code. An explicit `cni_code` from the agent always wins. Otherwise, by HTTP-ish status:
/// - STATUS: any failure → 50 (not available to service ADD).
/// - DEL 404 → success: the attachment is already gone and SPEC requires DEL to be idempotent.
/// - 400, 404, 413, 422 and other 4xx → 7: the request/config names something invalid or unknown. 404 is not
///   mapped to 3 because 3 tells the runtime to skip cleanup; only the agent can know that, via `cni_code`.
/// - 409, 429, 502, 503, 504 → 11: transient (the agent's plan is changing, server unreachable, no view yet).
/// - 500 and anything else → 101 (plugin-specific: the agent failed to set the attachment up).
pub fn map_agent_error(op: Op, status: Option<u64>, cni_code: Option<u64>) -> u32 {
    if let Some(c) = cni_code.and_then(|c| u32::try_from(c).ok()) {
        return c;
    }
    if op == Op::Status {
        return code::NOT_AVAILABLE;
    }
    match status {
        Some(409 | 429 | 502 | 503 | 504) => code::TRY_AGAIN_LATER,
        Some(400..=499) => code::INVALID_CONFIG,
        _ => code::ATTACH_FAILED,
    }
}

fn decode_error(msg: impl Into<String>) -> CniError {
    CniError::new(code::DECODE_FAILURE, msg)
}

/// Second half of an invocation: the agent's reply (or why there is none) → what to print and the exit code.
pub fn finish(call: &Call, reply: Result<String, TransportError>) -> Outcome {
    match finish_inner(call, reply) {
        Ok(stdout) => Outcome::success(stdout),
        Err(e) => e.outcome(call.version.as_str()),
    }
}

fn finish_inner(call: &Call, reply: Result<String, TransportError>) -> Result<String, CniError> {
    let line = reply.map_err(|e| transport_error(call, &e))?;
    if line.trim().is_empty() {
        let eof = TransportError {
            connecting: false,
            kind: io::ErrorKind::UnexpectedEof,
            detail: "connection closed without a reply".into(),
        };
        return Err(transport_error(call, &eof));
    }
    let reply: Map<String, Value> = serde_json::from_str(line.trim())
        .map_err(|e| decode_error("the isthmus agent's reply is not a JSON object").with_details(e.to_string()))?;
    match reply.get("ok") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            let status = reply.get("code").and_then(Value::as_u64);
            if call.op == Op::Del && status == Some(404) && reply.get("cni_code").is_none() {
                return Ok(String::new());
            }
            let code = map_agent_error(call.op, status, reply.get("cni_code").and_then(Value::as_u64));
            let message = reply
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("isthmus agent error");
            let status = status.map_or_else(|| "no status".to_string(), |s| s.to_string());
            return Err(CniError::new(code, message)
                .with_details(format!("isthmus agent refused {} (status {status})", call.op.name())));
        }
        _ => return Err(decode_error("the isthmus agent's reply has no boolean 'ok'")),
    }
    match call.op {
        Op::Add => {
            let result = add_result(
                call.version,
                &reply,
                &call.ifname,
                &call.netns,
                call.prev_result.as_ref(),
            )?;
            serde_json::to_string(&result).map_err(|e| decode_error(format!("cannot encode the result: {e}")))
        }
        // SPEC: DEL, CHECK, GC and STATUS print nothing on success.
        Op::Del | Op::Check | Op::Gc | Op::Status => Ok(String::new()),
    }
}

use isthmus_wire::socket::AttachReply;

#[derive(Serialize)]
struct ResultInterface {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sandbox: Option<String>,
}

#[derive(Serialize)]
struct ResultIp {
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'static str>,
    address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway: Option<String>,
    interface: usize,
}

#[derive(Serialize)]
struct ResultRoute {
    dst: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    gw: Option<String>,
}

#[derive(Serialize)]
struct AddResult {
    #[serde(rename = "cniVersion")]
    cni_version: &'static str,
    interfaces: Vec<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ips: Vec<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    routes: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<Value>,
}

/// `a.b.c.d/n` or `x::y/n` → "4" or "6"; the agent must answer in CIDR form.
fn cidr_family(cidr: &str) -> Result<&'static str, CniError> {
    let bad = || decode_error(format!("the isthmus agent returned an invalid CIDR address {cidr:?}"));
    let (addr, prefix) = cidr.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?;
    Ok(if ip.is_ipv4() { "4" } else { "6" })
}

fn to_value<T: Serialize>(t: T) -> Result<Value, CniError> {
    serde_json::to_value(t).map_err(|e| decode_error(format!("cannot encode the result: {e}")))
}

fn array_of(prev: Option<&Value>, key: &str) -> Vec<Value> {
    prev.and_then(|p| p.get(key))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// Builds the ADD result for `version` from the agent's reply. A chained `prevResult` is extended, not replaced
/// (SPEC: a plugin must pass it through or modify it), so our `interface` indexes are offset past its interfaces.
pub(crate) fn add_result(
    version: SpecVersion,
    reply: &Map<String, Value>,
    ifname: &str,
    netns: &str,
    prev: Option<&Value>,
) -> Result<Value, CniError> {
    let agent: AttachReply = serde_json::from_value(Value::Object(reply.clone()))
        .map_err(|e| decode_error("the isthmus agent's ADD reply is malformed").with_details(e.to_string()))?;
    let mut interfaces = array_of(prev, "interfaces");
    if let Some(host) = non_empty(agent.host_interface) {
        interfaces.push(to_value(ResultInterface {
            name: host,
            mac: None,
            mtu: None,
            sandbox: None,
        })?);
    }
    let container_index = interfaces.len();
    interfaces.push(to_value(ResultInterface {
        name: non_empty(agent.interface).unwrap_or_else(|| ifname.to_string()),
        mac: non_empty(agent.mac),
        mtu: agent.mtu.filter(|m| *m > 0 && version.interface_mtu()),
        // SPEC: the sandbox of a container interface is the CNI_NETNS value as passed.
        sandbox: Some(netns.to_string()),
    })?);

    let mut ips = array_of(prev, "ips");
    for ip in agent.ips.unwrap_or_default() {
        let family = cidr_family(&ip.address)?;
        ips.push(to_value(ResultIp {
            version: version.ip_version_field().then_some(family),
            address: ip.address,
            gateway: non_empty(ip.gateway),
            interface: container_index,
        })?);
    }

    let mut routes = array_of(prev, "routes");
    for r in agent.routes.unwrap_or_default() {
        routes.push(to_value(ResultRoute {
            dst: r.destination,
            gw: non_empty(r.nexthop),
        })?);
    }

    let mut dns = prev.and_then(|p| p.get("dns")).filter(|d| d.is_object()).cloned();
    let ours = agent.dns_nameservers.unwrap_or_default();
    if !ours.is_empty() {
        let obj = dns.get_or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(map) = obj {
            let list = map.entry("nameservers").or_insert_with(|| Value::Array(Vec::new()));
            if !list.is_array() {
                *list = Value::Array(Vec::new());
            }
            if let Value::Array(list) = list {
                for ns in ours {
                    if !list.iter().any(|v| v.as_str() == Some(ns.as_str())) {
                        list.push(Value::String(ns));
                    }
                }
            }
        }
    }
    let dns = dns.filter(|d| d.as_object().is_some_and(|m| !m.is_empty()));

    to_value(AddResult {
        cni_version: version.as_str(),
        interfaces,
        ips,
        routes,
        dns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn env(command: &str) -> Env {
        Env {
            command: Some(command.into()),
            container_id: Some("c0ffee".into()),
            netns: Some("/var/run/netns/x".into()),
            ifname: Some("eth0".into()),
            args: None,
            path: Some("/opt/cni/bin".into()),
        }
    }

    fn conf(version: &str) -> Value {
        json!({"cniVersion": version, "name": "isthmus-net1", "type": "isthmus", "network": "net1",
               "project": "demo", "socket": "/tmp/agent.sock"})
    }

    fn bytes(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    fn call(env: &Env, config: &Value) -> Call {
        match start(env, &bytes(config)) {
            Step::Call(c) => c,
            Step::Done(o) => panic!("expected a call, got {o:?}"),
        }
    }

    fn request(env: &Env, config: &Value) -> Value {
        serde_json::from_str(&call(env, config).request).unwrap()
    }

    /// The error an invocation ends with, as (code, parsed JSON).
    fn failure(env: &Env, stdin: &[u8]) -> (u32, Value) {
        match start(env, stdin) {
            Step::Done(o) => {
                assert_eq!(o.exit_code, 1, "{o:?}");
                let v: Value = serde_json::from_str(&o.stdout).unwrap();
                (v["code"].as_u64().unwrap() as u32, v)
            }
            Step::Call(c) => panic!("expected an error, got a call {c:?}"),
        }
    }

    fn add_reply() -> String {
        json!({"ok": true, "port_id": "p1", "interface": "eth0", "host_interface": "tap1234567890a",
               "mac": "fa:16:3e:00:00:01", "sandbox": "/var/run/netns/x",
               "ips": [{"address": "10.0.0.7/24", "gateway": "10.0.0.1"},
                       {"address": "2001:db8::7/64", "gateway": null}],
               "routes": [{"destination": "0.0.0.0/0", "nexthop": "10.0.0.1"}],
               "dns_nameservers": ["8.8.8.8"], "mtu": 1450})
        .to_string()
    }

    fn add_result_for(version: &str) -> Value {
        let c = call(&env("ADD"), &conf(version));
        let out = finish(&c, Ok(add_reply()));
        assert_eq!(out.exit_code, 0, "{out:?}");
        serde_json::from_str(&out.stdout).unwrap()
    }

    #[test]
    fn add_result_shape_per_version() {
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let r = add_result_for(v);
            assert_eq!(r["cniVersion"], v);
            assert_eq!(
                r["ips"][0],
                json!({"version": "4", "address": "10.0.0.7/24", "gateway": "10.0.0.1", "interface": 1})
            );
            assert_eq!(
                r["ips"][1],
                json!({"version": "6", "address": "2001:db8::7/64", "interface": 1})
            );
            assert_eq!(r["interfaces"][1].get("mtu"), None, "{v}: mtu is a 1.1.0 field");
        }
        let r = add_result_for("1.0.0");
        assert_eq!(
            r["ips"][0],
            json!({"address": "10.0.0.7/24", "gateway": "10.0.0.1", "interface": 1})
        );
        assert_eq!(r["interfaces"][1].get("mtu"), None);

        let r = add_result_for("1.1.0");
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [
                    {"name": "tap1234567890a"},
                    {"name": "eth0", "mac": "fa:16:3e:00:00:01", "mtu": 1450, "sandbox": "/var/run/netns/x"}
                ],
                "ips": [
                    {"address": "10.0.0.7/24", "gateway": "10.0.0.1", "interface": 1},
                    {"address": "2001:db8::7/64", "interface": 1}
                ],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}],
                "dns": {"nameservers": ["8.8.8.8"]}
            })
        );
    }

    #[test]
    fn add_result_minimal_reply_omits_empty_parts() {
        let c = call(&env("ADD"), &conf("1.1.0"));
        let reply = json!({"ok": true, "interface": "eth0", "ips": [{"address": "10.0.0.7/24"}],
                           "routes": [], "dns_nameservers": []});
        let r: Value = serde_json::from_str(&finish(&c, Ok(reply.to_string())).stdout).unwrap();
        assert_eq!(
            r,
            json!({"cniVersion": "1.1.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                   "ips": [{"address": "10.0.0.7/24", "interface": 0}]})
        );
    }

    #[test]
    fn add_result_extends_prev_result() {
        let mut config = conf("1.0.0");
        config["prevResult"] = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "lo0"}],
                                      "ips": [{"address": "192.0.2.1/32", "interface": 0}],
                                      "dns": {"nameservers": ["8.8.8.8"], "search": ["a"]}});
        let c = call(&env("ADD"), &config);
        let r: Value = serde_json::from_str(&finish(&c, Ok(add_reply())).stdout).unwrap();
        assert_eq!(r["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(r["ips"][0]["address"], "192.0.2.1/32");
        assert_eq!(r["ips"][1]["interface"], 2);
        assert_eq!(r["dns"], json!({"nameservers": ["8.8.8.8"], "search": ["a"]}));
    }

    #[test]
    fn add_reply_with_bad_address_is_a_decode_error() {
        let c = call(&env("ADD"), &conf("1.1.0"));
        let out = finish(
            &c,
            Ok(r#"{"ok":true,"interface":"eth0","ips":[{"address":"10.0.0.7"}]}"#.into()),
        );
        assert_eq!(out.exit_code, 1);
        assert!(out.stdout.contains("\"code\":6"), "{}", out.stdout);
        let out = finish(&c, Ok("not json\n".into()));
        assert!(out.stdout.contains("\"code\":6"), "{}", out.stdout);
    }

    #[test]
    fn version_output_echoes_supported_input() {
        let expected = r#"{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}"#;
        assert_eq!(version_output(b""), expected);
        assert_eq!(version_output(b"garbage"), expected);
        assert_eq!(version_output(br#"{"cniVersion":"9.9.9"}"#), expected);
        assert!(version_output(br#"{"cniVersion":"0.4.0"}"#).starts_with(r#"{"cniVersion":"0.4.0","#));
        // VERSION needs no other variable.
        let only = Env {
            command: Some("VERSION".into()),
            ..Env::default()
        };
        assert_eq!(
            start(&only, b""),
            Step::Done(Outcome {
                stdout: expected.into(),
                exit_code: 0
            })
        );
    }

    #[test]
    fn cni_args_parsing() {
        let args = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web-0;IP=10.0.0.7;;X=a=b").unwrap();
        assert_eq!(
            args,
            vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAME".into(), "web-0".into()),
                ("IP".into(), "10.0.0.7".into()),
                ("X".into(), "a=b".into())
            ]
        );
        assert_eq!(parse_cni_args("").unwrap(), vec![]);
        assert_eq!(parse_cni_args("IP=1.2.3.4;oops").unwrap_err().code, 4);
        assert_eq!(parse_cni_args("=x").unwrap_err().code, 4);

        let mut e = env("ADD");
        e.args = Some("IgnoreUnknown=1;broken".into());
        assert_eq!(failure(&e, &bytes(&conf("1.1.0"))).0, 4);
        // Only ADD reads CNI_ARGS: a malformed value must not block DEL.
        e.command = Some("DEL".into());
        call(&e, &conf("1.1.0"));
    }

    #[test]
    fn stdin_not_json_is_6() {
        let (code, v) = failure(&env("ADD"), b"{not json");
        assert_eq!(code, 6);
        assert_eq!(v["cniVersion"], CURRENT_VERSION);
        assert_eq!(failure(&env("ADD"), b"[1,2]").0, 6);
    }

    #[test]
    fn missing_config_keys_are_7() {
        for key in ["cniVersion", "name", "network", "project"] {
            let mut c = conf("1.0.0");
            c.as_object_mut().unwrap().remove(key);
            assert_eq!(failure(&env("ADD"), &bytes(&c)).0, 7, "without {key}");
        }
        let mut c = conf("1.0.0");
        c["network"] = json!(5);
        assert_eq!(failure(&env("ADD"), &bytes(&c)).0, 7);
        let mut c = conf("1.0.0");
        c["timeout_secs"] = json!(0);
        assert_eq!(failure(&env("ADD"), &bytes(&c)).0, 7);
        // No unbounded waits: a huge timeout is refused, the largest allowed one is taken.
        for huge in [json!(301), json!(u64::MAX), json!(1e30), json!(-1)] {
            c["timeout_secs"] = huge.clone();
            let (code, v) = failure(&env("ADD"), &bytes(&c));
            assert_eq!(code, 7, "{huge}");
            assert!(v["msg"].as_str().unwrap().contains("timeout_secs"), "{v}");
        }
        c["timeout_secs"] = json!(300);
        assert_eq!(parse_config(&bytes(&c)).unwrap().timeout, Duration::from_secs(300));
        for bad in [json!(-1), json!(65), json!("3"), json!(1.5)] {
            let mut c = conf("1.0.0");
            c["poolSize"] = bad.clone();
            assert_eq!(failure(&env("ADD"), &bytes(&c)).0, 7, "poolSize {bad}");
        }
    }

    #[test]
    fn pool_size_is_passed_with_add() {
        let mut c = conf("1.1.0");
        assert_eq!(request(&env("ADD"), &c).get("pool_size"), None);
        c["poolSize"] = json!(0);
        assert_eq!(request(&env("ADD"), &c)["pool_size"], json!(0));
        c["poolSize"] = json!(5);
        assert_eq!(request(&env("ADD"), &c)["pool_size"], json!(5));
    }

    #[test]
    fn config_defaults() {
        let mut c = conf("1.0.0");
        c.as_object_mut().unwrap().remove("socket");
        let cfg = parse_config(&bytes(&c)).unwrap();
        assert_eq!(cfg.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(cfg.timeout, Duration::from_secs(30));
        c["timeout_secs"] = json!(5);
        assert_eq!(parse_config(&bytes(&c)).unwrap().timeout, Duration::from_secs(5));
    }

    #[test]
    fn unsupported_version_is_1() {
        for v in ["0.2.0", "0.1.0", "2.0.0", "1.1"] {
            let (code, out) = failure(&env("ADD"), &bytes(&conf(v)));
            assert_eq!(code, 1, "{v}");
            assert_eq!(out["cniVersion"], CURRENT_VERSION);
        }
    }

    #[test]
    fn commands_gated_by_version() {
        let mut c = conf("0.3.1");
        c["prevResult"] = json!({});
        assert_eq!(failure(&env("CHECK"), &bytes(&c)).0, 1);
        c["cniVersion"] = json!("0.4.0");
        call(&env("CHECK"), &c);
        let mut g = conf("1.0.0");
        g["cni.dev/valid-attachments"] = json!([]);
        assert_eq!(failure(&env("GC"), &bytes(&g)).0, 1);
        assert_eq!(failure(&env("STATUS"), &bytes(&conf("1.0.0"))).0, 1);
        call(&env("STATUS"), &conf("1.1.0"));
    }

    #[test]
    fn env_validation_is_4() {
        let mut e = env("ADD");
        e.netns = None;
        e.ifname = None;
        let (code, v) = failure(&e, &bytes(&conf("1.1.0")));
        assert_eq!(code, 4);
        assert_eq!(v["msg"], "required env variables [CNI_NETNS,CNI_IFNAME] missing");
        assert_eq!(v["cniVersion"], "1.1.0");

        assert_eq!(failure(&Env::default(), b"").0, 4);
        assert_eq!(failure(&env("FROB"), &bytes(&conf("1.1.0"))).0, 4);
        let mut e = env("CHECK");
        e.container_id = None;
        assert_eq!(failure(&e, &bytes(&conf("1.1.0"))).0, 4);
        let mut e = env("ADD");
        e.container_id = Some("-bad".into());
        assert_eq!(failure(&e, &bytes(&conf("1.1.0"))).0, 4);
        for bad in ["this-is-too-long0", "..", "a:b", "a b", "a/b"] {
            let mut e = env("ADD");
            e.ifname = Some(bad.into());
            assert_eq!(failure(&e, &bytes(&conf("1.1.0"))).0, 4, "{bad}");
        }
        // GC and STATUS need no attachment variables.
        let only = |c: &str| Env {
            command: Some(c.into()),
            ..Env::default()
        };
        assert!(matches!(parse_command(&only("GC")), Ok(Command::Gc)));
        assert!(matches!(parse_command(&only("STATUS")), Ok(Command::Status)));
    }

    #[test]
    fn del_does_not_need_netns() {
        let mut e = env("DEL");
        e.netns = None;
        let req = request(&e, &conf("0.3.1"));
        assert_eq!(
            req,
            json!({"op": "cni_del", "container_id": "c0ffee", "ifname": "eth0", "netns": null,
                   "network": "net1", "project": "demo"})
        );
    }

    #[test]
    fn add_request_with_requested_ip_and_mac() {
        let mut c = conf("1.1.0");
        c["runtimeConfig"] = json!({"ips": ["10.0.0.7/24", "2001:db8::7"], "mac": "FA:16:3E:00:00:01"});
        c["args"] = json!({"cni": {"ips": ["10.9.9.9"]}});
        let mut e = env("ADD");
        e.args = Some("IP=10.8.8.8;MAC=fa:16:3e:00:00:02".into());
        let req = request(&e, &c);
        assert_eq!(
            req,
            json!({"op": "cni_add", "container_id": "c0ffee", "ifname": "eth0", "netns": "/var/run/netns/x",
                   "network": "net1", "project": "demo", "ips": ["10.0.0.7", "2001:db8::7"],
                   "mac": "fa:16:3e:00:00:01"})
        );
        // Without the request keys, none are sent.
        let req = request(&env("ADD"), &conf("1.1.0"));
        assert_eq!(req.get("ips"), None);
        assert_eq!(req.get("mac"), None);
    }

    #[test]
    fn requested_ip_and_mac_sources() {
        let cfg = |extra: Value| {
            let mut c = conf("1.0.0");
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            parse_config(&bytes(&c)).unwrap()
        };
        let args = parse_cni_args("IgnoreUnknown=1;IP=10.0.0.8/24,10.0.0.9;MAC=fa:16:3e:00:00:02").unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();

        let c = cfg(json!({"args": {"cni": {"ips": ["10.0.0.7"]}}}));
        assert_eq!(requested_ips(&c, &args).unwrap(), vec![ip("10.0.0.7")]);
        let c = cfg(json!({}));
        assert_eq!(requested_ips(&c, &args).unwrap(), vec![ip("10.0.0.8"), ip("10.0.0.9")]);
        assert_eq!(requested_mac(&c, &args).unwrap().as_deref(), Some("fa:16:3e:00:00:02"));
        assert_eq!(requested_ips(&c, &[]).unwrap(), Vec::<IpAddr>::new());
        assert_eq!(requested_mac(&c, &[]).unwrap(), None);

        for bad in [
            json!({"runtimeConfig": {"ips": ["10.0.0.300"]}}),
            json!({"runtimeConfig": {"ips": ["10.0.0.1/33"]}}),
            json!({"runtimeConfig": {"ips": "10.0.0.1"}}),
            json!({"args": {"cni": {"ips": [1]}}}),
        ] {
            assert_eq!(requested_ips(&cfg(bad.clone()), &[]).unwrap_err().code, 7, "{bad}");
        }
        for bad in [
            "fa:16:3e:00:00",
            "zz:16:3e:00:00:01",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "fa-16-3e-00-00-01",
        ] {
            let c = cfg(json!({"runtimeConfig": {"mac": bad}}));
            assert_eq!(requested_mac(&c, &[]).unwrap_err().code, 7, "{bad}");
        }
        // A bad requested MAC fails ADD with 7.
        let mut e = env("ADD");
        e.args = Some("MAC=nope".into());
        assert_eq!(failure(&e, &bytes(&conf("1.1.0"))).0, 7);
    }

    #[test]
    fn check_forwards_prev_result() {
        let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
                          "ips": [{"address": "10.0.0.7/24", "interface": 0}]});
        let mut c = conf("1.0.0");
        c["prevResult"] = prev.clone();
        let req = request(&env("CHECK"), &c);
        assert_eq!(
            req,
            json!({"op": "cni_check", "container_id": "c0ffee", "ifname": "eth0", "netns": "/var/run/netns/x",
                   "network": "net1", "project": "demo", "prev_result": prev})
        );
        assert_eq!(
            failure(&env("CHECK"), &bytes(&conf("1.0.0"))).0,
            7,
            "CHECK needs prevResult"
        );
        let out = finish(&call(&env("CHECK"), &c), Ok("{\"ok\":true}\n".into()));
        assert_eq!(
            out,
            Outcome {
                stdout: String::new(),
                exit_code: 0
            }
        );
    }

    #[test]
    fn gc_valid_attachments() {
        let gc = Env {
            command: Some("GC".into()),
            path: Some("/opt/cni/bin".into()),
            ..Env::default()
        };
        let mut c = conf("1.1.0");
        c["cni.dev/valid-attachments"] = json!([{"containerID": "a1", "ifname": "eth0"},
                                                {"containerID": "b2", "ifname": "net1"}]);
        assert_eq!(
            request(&gc, &c),
            json!({"op": "cni_gc", "network": "net1", "project": "demo",
                   "valid": [{"container_id": "a1", "ifname": "eth0"}, {"container_id": "b2", "ifname": "net1"}]})
        );
        c["cni.dev/valid-attachments"] = Value::Null;
        assert_eq!(request(&gc, &c)["valid"], json!([]));
        let mut old = conf("1.1.0");
        old["cni.dev/attachments"] = json!([{"containerID": "a1", "ifname": "eth0"}]);
        assert_eq!(
            request(&gc, &old)["valid"],
            json!([{"container_id": "a1", "ifname": "eth0"}])
        );

        assert_eq!(
            failure(&gc, &bytes(&conf("1.1.0"))).0,
            7,
            "missing list must not mean 'delete all'"
        );
        c["cni.dev/valid-attachments"] = json!([{"containerID": "a1"}]);
        assert_eq!(failure(&gc, &bytes(&c)).0, 7);
    }

    #[test]
    fn status_request() {
        let st = Env {
            command: Some("STATUS".into()),
            ..Env::default()
        };
        let c = call(&st, &conf("1.1.0"));
        assert_eq!(c.request, "{\"op\":\"cni_status\"}\n");
        assert_eq!(c.socket, PathBuf::from("/tmp/agent.sock"));
    }

    #[test]
    fn agent_error_mapping() {
        for (status, want) in [
            (400, 7),
            (404, 7),
            (413, 7),
            (422, 7),
            (409, 11),
            (429, 11),
            (502, 11),
            (503, 11),
            (504, 11),
            (500, 101),
        ] {
            assert_eq!(map_agent_error(Op::Add, Some(status), None), want, "{status}");
        }
        assert_eq!(map_agent_error(Op::Add, None, None), 101);
        assert_eq!(map_agent_error(Op::Add, Some(404), Some(3)), 3);
        assert_eq!(map_agent_error(Op::Status, Some(503), None), 50);
        assert_eq!(map_agent_error(Op::Status, Some(503), Some(51)), 51);

        let c = call(&env("ADD"), &conf("0.4.0"));
        let out = finish(
            &c,
            Ok(r#"{"ok":false,"code":422,"message":"no such network net1"}"#.into()),
        );
        assert_eq!(out.exit_code, 1);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "no such network net1");

        // DEL of something already gone succeeds; other DEL errors do not.
        let d = call(&env("DEL"), &conf("1.1.0"));
        assert_eq!(
            finish(&d, Ok(r#"{"ok":false,"code":404,"message":"gone"}"#.into())).exit_code,
            0
        );
        let out = finish(&d, Ok(r#"{"ok":false,"code":503,"message":"no view"}"#.into()));
        assert!(out.stdout.contains("\"code\":11"), "{}", out.stdout);
        let out = finish(&d, Ok(r#"{"ok":"yes"}"#.into()));
        assert!(out.stdout.contains("\"code\":6"), "{}", out.stdout);
    }

    #[test]
    fn transport_error_mapping() {
        let refused = TransportError::connect(&io::Error::from(io::ErrorKind::ConnectionRefused));
        let missing = TransportError::connect(&io::Error::from(io::ErrorKind::NotFound));
        let denied = TransportError::connect(&io::Error::from(io::ErrorKind::PermissionDenied));
        let timeout = TransportError::exchange(&io::Error::from(io::ErrorKind::WouldBlock));
        let st = Env {
            command: Some("STATUS".into()),
            ..Env::default()
        };
        let status = call(&st, &conf("1.1.0"));
        let add = call(&env("ADD"), &conf("1.1.0"));
        let del = call(&env("DEL"), &conf("1.1.0"));
        for e in [&refused, &missing, &denied, &timeout] {
            assert_eq!(transport_error(&status, e).code, 50);
        }
        assert_eq!(transport_error(&add, &missing).code, 11);
        assert!(transport_error(&add, &missing).msg.contains("/tmp/agent.sock"));
        assert_eq!(transport_error(&add, &refused).code, 11);
        assert_eq!(transport_error(&del, &missing).code, 11);
        assert_eq!(transport_error(&add, &denied).code, 5);
        assert_eq!(transport_error(&add, &timeout).code, 11);
        // A connection closed without a reply is retryable.
        assert!(finish(&add, Ok(String::new())).stdout.contains("\"code\":11"));
    }

    #[test]
    fn error_json_shape() {
        let e = CniError::new(7, "bad").with_details("longer");
        assert_eq!(
            e.to_json("1.0.0"),
            r#"{"cniVersion":"1.0.0","code":7,"msg":"bad","details":"longer"}"#
        );
        assert_eq!(
            CniError::new(4, "x").to_json("1.1.0"),
            r#"{"cniVersion":"1.1.0","code":4,"msg":"x"}"#
        );
    }
}
