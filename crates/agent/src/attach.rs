//! Attaching one port to a workload and detaching it: claim the port, wait for it in the
//! node's view, plug it (its network's devices and its own veth, nothing else), report it.

use crate::client::{ApiError, Client};
use crate::controller::ports::PortsController;
use crate::desired::PortDevice;
use crate::kernel::{KernelError, Links, MacAddr, PortDevices, VethAttach};
use crate::names;
use crate::objects::{port_plan, PlanError, PortPlan};
use crate::state::NodeState;
use isthmus_wire::node::PortReport;
use isthmus_wire::socket::{AttachReply, DetachReply, ReplyIp, ReplyRoute};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

/// An error of an attach or detach, with an HTTP-like code for the socket's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub code: u16,
    pub message: String,
    /// The CNI error code, for requests from the CNI plugin.
    pub cni: Option<u32>,
}

impl OpError {
    pub fn new(code: u16, message: impl Into<String>) -> Self {
        OpError {
            code,
            message: message.into(),
            cni: None,
        }
    }

    pub fn with_cni(mut self, code: u32) -> Self {
        self.cni = Some(code);
        self
    }
}

impl From<ApiError> for OpError {
    fn from(e: ApiError) -> Self {
        // Neutron's own message says it best ("IP address 10.0.0.7 already allocated ...").
        let neutron = match &e {
            ApiError::Status { status, body } => serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|v| v["NeutronError"]["message"].as_str().map(str::to_string))
                .map(|m| format!("server answered {status}: {m}")),
            _ => None,
        };
        let msg = neutron.unwrap_or_else(|| e.to_string());
        match e.status() {
            None => OpError::new(503, msg),
            Some(s) => OpError::new(if s >= 500 { 502 } else { s }, msg),
        }
    }
}

impl From<KernelError> for OpError {
    fn from(e: KernelError) -> Self {
        OpError::new(500, format!("datapath: {e}"))
    }
}

impl From<PlanError> for OpError {
    fn from(e: PlanError) -> Self {
        OpError::new(if e.transient() { 409 } else { 422 }, e.to_string())
    }
}

/// What an attach request asks for.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    pub port_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// Claim the port for this node first (an unbound port). False when it is bound here
    /// already (CNI), which saves a round trip.
    pub bind: bool,
    /// Extra port fields written with the ACTIVE report (a CNI attachment's record), so a
    /// pooled port costs one write.
    pub record: Option<PortReport>,
}

impl AttachRequest {
    pub fn new(port_id: &str, netns: PathBuf, ifname: &str) -> Self {
        AttachRequest {
            port_id: port_id.to_string(),
            netns,
            ifname: ifname.to_string(),
            bind: true,
            record: None,
        }
    }
}

/// A port id as it may appear in an API path.
pub fn valid_port_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Checks, without blocking, that `path` is an absolute path to a network namespace. A missing
/// one is an unknown container (CNI 3); anything else there (FIFO, device, file) is refused
/// as an invalid CNI_NETNS (CNI 4) before any port is taken or created.
pub fn check_netns(path: &std::path::Path) -> Result<(), OpError> {
    use isthmus_wire::cni_code;
    if !path.is_absolute() {
        return Err(OpError::new(
            400,
            format!("netns {} is not an existing absolute path", path.display()),
        )
        .with_cni(cni_code::INVALID_ENV));
    }
    match crate::kernel::netns::open_netns_file(path) {
        Ok(_) => Ok(()),
        Err(KernelError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Err(OpError::new(400, format!("netns {} does not exist", path.display()))
                .with_cni(cni_code::UNKNOWN_CONTAINER))
        }
        Err(e) => Err(OpError::new(400, e.to_string()).with_cni(cni_code::INVALID_ENV)),
    }
}

/// Attaches and detaches ports; shared by the socket's `attach` op and CNI.
pub struct Attacher<K, L> {
    state: Arc<NodeState>,
    client: Arc<Client>,
    ports: Arc<PortsController<K, L>>,
    timeout: Duration,
}

impl<K: PortDevices, L: Links> Attacher<K, L> {
    pub fn new(
        state: Arc<NodeState>,
        client: Arc<Client>,
        ports: Arc<PortsController<K, L>>,
        timeout: Duration,
    ) -> Self {
        Attacher {
            state,
            client,
            ports,
            timeout,
        }
    }

    /// Deletes a port's host device under its lock.
    pub async fn unplug(&self, dev: &str) -> Result<(), KernelError> {
        self.ports.unplug(dev).await
    }

    /// Waits until the port, its network and subnets are in the view.
    async fn wait_for_plan(&self, port_id: &str) -> Result<PortPlan, OpError> {
        let mut gen = self.state.subscribe();
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let res = {
                let v = self.state.lock();
                port_plan(&v.objects, &self.state.node, port_id)
            };
            match res {
                Ok(p) => return Ok(p),
                Err(e) if !e.transient() => return Err(OpError::new(422, e.to_string())),
                Err(e) => {
                    gen.borrow_and_update();
                    if tokio::time::timeout_at(deadline, gen.changed()).await.is_err() {
                        return Err(OpError::new(504, format!("timed out waiting for the node's view: {e}")));
                    }
                }
            }
        }
    }

    /// Plugs port `req.port_id` into the workload namespace `req.netns`.
    pub async fn attach(&self, req: &AttachRequest) -> Result<AttachReply, OpError> {
        if !valid_port_id(&req.port_id) {
            return Err(OpError::new(400, format!("invalid port_id {:?}", req.port_id)));
        }
        if !crate::kernel::valid_ifname(&req.ifname) {
            return Err(OpError::new(400, format!("invalid ifname {:?}", req.ifname)));
        }
        check_netns(&req.netns)?;
        // Claim the port (or confirm it is ours).
        if req.bind {
            let claim = PortReport {
                bind: true,
                ..Default::default()
            };
            match self.client.report_port(&req.port_id, &claim).await {
                Ok(_) => {}
                Err(e) if e.status() == Some(404) => {
                    return Err(OpError::new(
                        404,
                        format!("port {} does not exist or is bound to another node", req.port_id),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        }
        let t0 = std::time::Instant::now();
        let plan = self.wait_for_plan(&req.port_id).await?;
        let t_plan = t0.elapsed();
        let mac: MacAddr = plan
            .mac
            .parse()
            .map_err(|_| OpError::new(422, format!("port has an invalid MAC {}", plan.mac)))?;
        let dev = names::tap(&req.port_id);
        let bridge = names::bridge(plan.vni);
        let va = VethAttach {
            port: PortDevice {
                name: dev.clone(),
                bridge: bridge.clone(),
                mtu: plan.mtu,
                veth: true,
            },
            mac,
            netns: req.netns.clone(),
            ifname: req.ifname.clone(),
            addresses: plan.addresses.iter().map(|a| a.address).collect(),
            gateway: plan.gateway,
            routes: plan.routes.clone(),
            mtu: plan.mtu,
        };
        self.ports.plug(&va, plan.vni, plan.mtu).await?;
        let t_veth = t0.elapsed();
        let details = json!({"bridge_name": bridge, "mtu": plan.mtu});
        let mut report = PortReport {
            status: Some("ACTIVE".into()),
            vif_type: Some("veth".into()),
            vif_details: Some(details),
            ..Default::default()
        };
        if let Some(record) = &req.record {
            report.device_id = record.device_id.clone();
            report.name = record.name.clone();
            report.profile = record.profile.clone();
            // The record must land: without it the port would look free (pool) or unowned.
            self.client.report_port(&req.port_id, &report).await?;
        } else if let Err(e) = self.client.report_port(&req.port_id, &report).await {
            // The workload is plumbed; the status catches up with the next pass.
            warn!(port = %req.port_id, error = %e, "could not report the port ACTIVE");
        }
        // Cumulative milliseconds, so a slow attach shows where it waited.
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        info!(port = %req.port_id, dev = %dev, netns = %req.netns.display(),
            plan_ms = ms(t_plan), veth_ms = ms(t_veth), reported_ms = ms(t0.elapsed()), "port attached");
        let ips = plan
            .addresses
            .iter()
            .map(|a| ReplyIp {
                address: a.address.to_string(),
                gateway: a.gateway.map(|g| g.to_string()),
            })
            .collect();
        let routes = plan
            .routes
            .iter()
            .map(|r| ReplyRoute {
                destination: r.destination.to_string(),
                nexthop: Some(r.nexthop.to_string()),
            })
            .collect();
        Ok(AttachReply {
            ok: true,
            port_id: Some(req.port_id.clone()),
            interface: Some(req.ifname.clone()),
            host_interface: Some(dev),
            mac: Some(plan.mac),
            ips: Some(ips),
            gateway: plan.gateway.map(|g| g.to_string()),
            mtu: Some(plan.mtu),
            routes: Some(routes),
            dns_nameservers: Some(plan.dns),
            sandbox: None,
        })
    }

    /// Unplugs a port: its host device goes (with the workload end), its status goes DOWN.
    /// Idempotent; a port already deleted from the API is fine.
    pub async fn detach(&self, port_id: &str) -> Result<DetachReply, OpError> {
        if !valid_port_id(port_id) {
            return Err(OpError::new(400, format!("invalid port_id {port_id:?}")));
        }
        let dev = names::tap(port_id);
        self.ports.unplug(&dev).await?;
        info!(port = %port_id, dev = %dev, "port detached");
        match self.client.report_port(port_id, &PortReport::status("DOWN")).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => debug!(port = %port_id, "port gone from the API already"),
            Err(e) => warn!(port = %port_id, error = %e, "could not report the port DOWN"),
        }
        Ok(DetachReply {
            ok: true,
            port_id: port_id.to_string(),
            host_interface: dev,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ids_are_checked() {
        assert!(valid_port_id("0b7e0f4c-2a6e-4b8e-9d3f-3c7f6e2a1b00"));
        for bad in ["", "../x", "a b", "a/b", &"x".repeat(65)] {
            assert!(!valid_port_id(bad), "{bad}");
        }
    }
}
