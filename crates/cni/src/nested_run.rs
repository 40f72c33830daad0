//! The nested modes' side effects: the nested API over HTTP(S) and the container's device
//! (`isthmus_agent::kernel::nested`). The pure half is `isthmus_cni::nested`.

use isthmus_agent::kernel::nested::{attach_nested, detach_nested, inspect_nested, NestedAttach, NestedDevice};
use isthmus_agent::kernel::{HostRoute, KernelError, MacAddr};
use isthmus_cni::nested::{
    add_output, addresses, api_error, check_attachment, check_observed, error_message, read_credential, ApiError,
    NestedConfig, Observed,
};
use isthmus_cni::{code, parse_command, CniError, Command, Env, Outcome, CURRENT_VERSION};
use isthmus_wire::nested::{Attachment, AttachmentRequest, NestedMode, CREDENTIAL_HEADER};
use std::path::Path;
use std::time::Duration;

/// The three calls the plugin makes; the HTTP client below, or any other with the same shape.
pub trait NestedApi {
    /// `PUT .../attachments/{container_id}/{ifname}`: the container's port (idempotent).
    fn attach(&self, container_id: &str, ifname: &str, req: &AttachmentRequest) -> Result<Attachment, ApiError>;
    /// `GET` on the same path; `None` on 404.
    fn get(&self, container_id: &str, ifname: &str) -> Result<Option<Attachment>, ApiError>;
    /// `DELETE` on the same path; nothing to delete is success.
    fn release(&self, container_id: &str, ifname: &str) -> Result<(), ApiError>;
}

/// Longest answer read from the API.
const MAX_BODY: usize = 1024 * 1024;

/// The nested API over HTTP/1.1 (rustls for `https://`, trusting `ca_file` when given), each
/// request bounded by the config's timeout.
pub struct HttpApi {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
    base: reqwest::Url,
    credential: String,
}

impl HttpApi {
    pub fn new(config: &NestedConfig, credential: String) -> Result<HttpApi, CniError> {
        let base = reqwest::Url::parse(&config.api_url).map_err(|e| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("network config 'nested.api_url' {:?} is not a URL", config.api_url),
            )
            .with_details(e.to_string())
        })?;
        if base.cannot_be_a_base() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "network config 'nested.api_url' cannot be a base URL",
            ));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            // Inside a VM, a proxy from the environment must not see the credential.
            .no_proxy();
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("cannot read 'nested.ca_file' {}", ca.display()),
                )
                .with_details(e.to_string())
            })?;
            let not_pem = |why: String| {
                CniError::new(
                    code::INVALID_CONFIG,
                    format!("'nested.ca_file' {} holds no PEM certificate", ca.display()),
                )
                .with_details(why)
            };
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| not_pem(e.to_string()))?;
            if certs.is_empty() {
                return Err(not_pem("no CERTIFICATE block".into()));
            }
            // Only this CA: the API's certificate is the project's own, not a public one.
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| {
            CniError::new(code::INVALID_CONFIG, "cannot set up the HTTP client").with_details(e.to_string())
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CniError::new(code::IO_FAILURE, "cannot start the I/O runtime").with_details(e.to_string()))?;
        Ok(HttpApi {
            rt,
            client,
            base,
            credential,
        })
    }

    fn url(&self, container_id: &str, ifname: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut segs) = url.path_segments_mut() {
            // Each piece is one path segment, escaped as needed.
            segs.pop_if_empty()
                .extend(["isthmus", "v1", "nested", "attachments", container_id, ifname]);
        }
        url
    }

    /// Sends the request; the status and the body (at most [`MAX_BODY`]).
    fn send(&self, req: reqwest::RequestBuilder) -> Result<(u16, String), ApiError> {
        let req = req.header(CREDENTIAL_HEADER, &self.credential);
        self.rt.block_on(async {
            let unreachable = |e: reqwest::Error| ApiError {
                status: None,
                unreachable: true,
                message: causes(&e),
            };
            let mut resp = req.send().await.map_err(unreachable)?;
            let status = resp.status().as_u16();
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(unreachable)? {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_BODY {
                    return Err(ApiError {
                        status: Some(status),
                        unreachable: false,
                        message: format!("answer longer than {MAX_BODY} bytes"),
                    });
                }
            }
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        })
    }
}

/// The error and its causes ("error sending request: ... : invalid peer certificate: ...").
fn causes(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn refused(status: u16, body: &str) -> ApiError {
    ApiError {
        status: Some(status),
        unreachable: false,
        message: error_message(body),
    }
}

fn attachment_of(status: u16, body: &str) -> Result<Attachment, ApiError> {
    #[derive(serde::Deserialize)]
    struct Wrapped {
        attachment: Attachment,
    }
    serde_json::from_str::<Wrapped>(body)
        .map(|w| w.attachment)
        .map_err(|e| ApiError {
            status: Some(status),
            unreachable: false,
            message: format!("malformed attachment: {e}"),
        })
}

impl NestedApi for HttpApi {
    fn attach(&self, container_id: &str, ifname: &str, req: &AttachmentRequest) -> Result<Attachment, ApiError> {
        let body = serde_json::json!({ "attachment": req });
        let (status, text) = self.send(self.client.put(self.url(container_id, ifname)).json(&body))?;
        match status {
            200..=299 => attachment_of(status, &text),
            _ => Err(refused(status, &text)),
        }
    }

    fn get(&self, container_id: &str, ifname: &str) -> Result<Option<Attachment>, ApiError> {
        let (status, text) = self.send(self.client.get(self.url(container_id, ifname)))?;
        match status {
            404 => Ok(None),
            200..=299 => attachment_of(status, &text).map(Some),
            _ => Err(refused(status, &text)),
        }
    }

    fn release(&self, container_id: &str, ifname: &str) -> Result<(), ApiError> {
        let (status, text) = self.send(self.client.delete(self.url(container_id, ifname)))?;
        match status {
            200..=299 | 404 => Ok(()),
            _ => Err(refused(status, &text)),
        }
    }
}

/// One nested invocation: parse, call the API, set up or tear down the device, print.
pub fn run(env: &Env, config: Result<NestedConfig, CniError>) -> Outcome {
    let version = config.as_ref().map_or(CURRENT_VERSION, |c| c.cni_version.as_str());
    match run_inner(env, config) {
        Ok(stdout) => Outcome { stdout, exit_code: 0 },
        Err(e) => e.outcome(version),
    }
}

fn run_inner(env: &Env, config: Result<NestedConfig, CniError>) -> Result<String, CniError> {
    let command = parse_command(env)?;
    let config = config?;
    crate::watchdog_for(config.timeout, config.cni_version.as_str());
    match command {
        // Nothing on this side keeps a list to collect from.
        Command::Gc | Command::Version => Ok(String::new()),
        // Able to serve ADD when the credential is there.
        Command::Status => read_credential(&config.credential_file)
            .map(|_| String::new())
            .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg).with_details(e.details)),
        Command::Add { attachment: a, .. } => {
            let api = HttpApi::new(&config, read_credential(&config.credential_file)?)?;
            check_netns(&a.netns)?;
            add(&api, &config, &a.container_id, &a.ifname, &a.netns)
        }
        Command::Del {
            container_id,
            ifname,
            netns,
        } => {
            let api = HttpApi::new(&config, read_credential(&config.credential_file)?)?;
            if let Some(ns) = netns {
                detach_nested(Path::new(&ns), &ifname).map_err(|e| kernel_error(&config, "removing", e))?;
            }
            api.release(&container_id, &ifname)
                .map_err(|e| api_error("releasing the attachment", &e))?;
            Ok(String::new())
        }
        Command::Check(a) => {
            let api = HttpApi::new(&config, read_credential(&config.credential_file)?)?;
            check_netns(&a.netns)?;
            let att = api
                .get(&a.container_id, &a.ifname)
                .map_err(|e| api_error("reading the attachment", &e))?
                .ok_or_else(|| CniError::new(code::CHECK_FAILED, "the nested API has no such attachment"))?;
            let seen = inspect_nested(Path::new(&a.netns), &a.ifname)
                .map_err(|e| kernel_error(&config, "inspecting", e))?
                .map(|s| Observed {
                    mac: s.mac.map(|m| m.to_string()),
                    up: s.up,
                    addresses: s.addresses,
                });
            check_observed(&att, &a.ifname, seen.as_ref())?;
            Ok(String::new())
        }
    }
}

fn add(
    api: &dyn NestedApi,
    config: &NestedConfig,
    container_id: &str,
    ifname: &str,
    netns: &str,
) -> Result<String, CniError> {
    let req = AttachmentRequest {
        mode: config.mode,
        network_id: config.network_id.clone(),
    };
    let att = api
        .attach(container_id, ifname, &req)
        .map_err(|e| api_error("attaching", &e))?;
    check_attachment(config, &att)?;
    let mac: MacAddr = att.mac_address.parse().map_err(|_| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("nested API returned an invalid MAC {:?}", att.mac_address),
        )
    })?;
    let mut routes = Vec::new();
    for r in &att.routes {
        let destination = r.destination.parse().map_err(|_| {
            CniError::new(
                code::DECODE_FAILURE,
                format!("nested API returned an invalid route {:?}", r.destination),
            )
        })?;
        routes.push(HostRoute {
            destination,
            nexthop: r.nexthop,
        });
    }
    let device = match (config.mode, att.vlan) {
        (NestedMode::Vlan, Some(id)) => NestedDevice::Vlan(id),
        _ => NestedDevice::Macvlan,
    };
    let req = NestedAttach {
        parent: config.parent_interface.clone(),
        device,
        netns: netns.into(),
        ifname: ifname.to_string(),
        mac,
        mtu: att.mtu,
        addresses: addresses(&att)?,
        // The first address with a gateway gives the default route, as on a node.
        gateway: att.addresses.iter().find_map(|a| a.gateway),
        routes,
    };
    attach_nested(&req).map_err(|e| kernel_error(config, "setting up", e))?;
    add_output(config.cni_version, &att, ifname, netns, config.prev_result.as_ref())
}

/// CNI_NETNS must be a network namespace before a port is asked for.
fn check_netns(netns: &str) -> Result<(), CniError> {
    match isthmus_agent::kernel::netns::open_netns_file(Path::new(netns)) {
        Ok(_) => Ok(()),
        Err(KernelError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("CNI_NETNS {netns} does not exist"),
        )),
        Err(KernelError::Io { source, .. }) if source.kind() == std::io::ErrorKind::InvalidInput => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {netns} is not a network namespace"),
        )
        .with_details(source.to_string())),
        Err(e) => {
            Err(CniError::new(code::IO_FAILURE, format!("cannot open CNI_NETNS {netns}")).with_details(e.to_string()))
        }
    }
}

fn kernel_error(config: &NestedConfig, what: &str, e: KernelError) -> CniError {
    match &e {
        KernelError::NoDevice(name) if *name == config.parent_interface => CniError::new(
            code::INVALID_CONFIG,
            format!("'nested.parent_interface' {name} does not exist in the plugin's namespace"),
        ),
        _ => CniError::new(code::ATTACH_FAILED, format!("{what} the container's interface failed"))
            .with_details(e.to_string()),
    }
}
