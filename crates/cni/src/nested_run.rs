//! The nested modes' side effects: the nested API over HTTP(S) and the container's device
//! (`isthmus_agent::kernel::nested`). The pure half is `isthmus_cni::nested`.

use isthmus_agent::kernel::nested::{attach_nested, detach_nested, inspect_nested, NestedAttach, NestedDevice};
use isthmus_agent::kernel::{HostRoute, KernelError, MacAddr};
use isthmus_client::{Error as ClientError, NestedClient, NestedConfig as ClientConfig};
use isthmus_cni::nested::{
    add_output, addresses, api_error, check_attachment, check_observed, read_credential, ApiError, NestedConfig,
    Observed,
};
use isthmus_cni::{code, parse_command, CniError, Command, Env, Outcome, CURRENT_VERSION};
use isthmus_wire::nested::{Attachment, AttachmentRequest, NestedMode};
use std::path::Path;
use std::time::Duration;

/// The three calls the plugin makes (a seam for tests and other transports).
pub trait NestedApi {
    /// `PUT .../attachments/{container_id}/{ifname}`: the container's port (idempotent).
    fn attach(&self, container_id: &str, ifname: &str, req: &AttachmentRequest) -> Result<Attachment, ApiError>;
    /// `GET` on the same path; `None` on 404.
    fn get(&self, container_id: &str, ifname: &str) -> Result<Option<Attachment>, ApiError>;
    /// `DELETE` on the same path; nothing to delete is success.
    fn release(&self, container_id: &str, ifname: &str) -> Result<(), ApiError>;
}

/// The nested API through `isthmus_client::NestedClient` (rustls for `https://`, trusting only
/// `ca_file` when given), each request bounded by the config's timeout.
pub struct HttpApi {
    rt: tokio::runtime::Runtime,
    client: NestedClient,
}

impl HttpApi {
    pub fn new(config: &NestedConfig, credential: String) -> Result<HttpApi, CniError> {
        let mut c = ClientConfig::new(&config.api_url, &credential);
        c.ca_file = config.ca_file.clone();
        c.timeout = config.timeout;
        c.connect_timeout = config.timeout.min(Duration::from_secs(10));
        // Config and CA errors never repeat the credential.
        let client = NestedClient::new(c).map_err(|e| {
            CniError::new(code::INVALID_CONFIG, "cannot use the nested API settings").with_details(e.to_string())
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CniError::new(code::IO_FAILURE, "cannot start the I/O runtime").with_details(e.to_string()))?;
        Ok(HttpApi { rt, client })
    }
}

fn api_failure(e: ClientError) -> ApiError {
    ApiError {
        status: e.status(),
        unreachable: matches!(e, ClientError::Unreachable(_)),
        message: e.api_message().unwrap_or_else(|| e.to_string()),
    }
}

impl NestedApi for HttpApi {
    fn attach(&self, container_id: &str, ifname: &str, req: &AttachmentRequest) -> Result<Attachment, ApiError> {
        self.rt
            .block_on(self.client.attach(container_id, ifname, req))
            .map_err(api_failure)
    }

    fn get(&self, container_id: &str, ifname: &str) -> Result<Option<Attachment>, ApiError> {
        self.rt
            .block_on(self.client.get(container_id, ifname))
            .map_err(api_failure)
    }

    fn release(&self, container_id: &str, ifname: &str) -> Result<(), ApiError> {
        self.rt
            .block_on(self.client.release(container_id, ifname))
            .map_err(api_failure)
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
