//! The nested API: ports for containers inside a VM, asked for by the CNI plugin in the VM
//! with a trunk credential (see `trunk_credentials`), never a Keystone token. Bodies are
//! `isthmus_wire::nested`.
//!
//! - `PUT /isthmus/v1/nested/attachments/{container_id}/{ifname}`: creates the container's
//!   port in the trunk's project, as if a member of it had asked (its network visibility,
//!   attribute rules and quota), and joins it to the VM's port; 200 `{"attachment": ...}`
//!   (the same port and VLAN when repeated):
//!   - `vlan`: a subport of the credential's trunk on the lowest free VLAN id, port and trunk
//!     written in one transaction;
//!   - `macvlan`: a port on the parent's network whose MAC and addresses become allowed
//!     address pairs of the parent, port and parent written in one transaction.
//!
//!   The attachment's record (`keys::nested_attachment`, written in that transaction too)
//!   makes the PUT idempotent. Deleting the port through Neutron removes the record and the
//!   parent's pairs with it (`trunks::plan_nested_port_gone`); a record left stale anyway
//!   (its port gone) is replaced by the next PUT.
//! - `GET` on the same path: the attachment, or 404.
//! - `DELETE`: the subport or address pairs released and the port deleted, one transaction;
//!   204 also when there was nothing.
//!
//! A credential only ever reaches its own trunk's records: the trunk id is part of the key.

use super::common::{json_bytes, not_found, now, Ctx, NResult};
use super::http::{json_response, parse_body, ApiResult};
use super::lookup;
use super::portops::{self, NewPort, NodeBinding};
use super::trunk_credentials::authenticate_credential;
use super::trunks::{self, take_pairs, NestedRecord};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;
use isthmus_model::validate::Body;
use isthmus_model::{keys, AddressPair, Network, NeutronError, Port, Subnet, Trunk};
use isthmus_store::{Compare, Op, Revision};
use isthmus_wire::nested::{Attachment, AttachmentAddress, AttachmentRequest, AttachmentRoute, NestedMode};
use serde_json::{json, Map, Value};
use std::net::IpAddr;
use std::sync::Arc;

/// Routes under this prefix authenticate with a trunk credential only.
pub const PREFIX: &str = "/isthmus/v1/nested/";
/// `device_owner` of a `macvlan` attachment's port.
pub const MACVLAN_OWNER: &str = "isthmus:nested";
/// Re-plans after lost races before giving up (ten containers of one VM starting at once
/// all race for the trunk).
const MAX_ATTEMPTS: usize = 60;

pub fn is_nested_path(path: &str) -> bool {
    path.starts_with(PREFIX)
}

type Record = NestedRecord;

/// A container id (1–128 of `[A-Za-z0-9_.-]`) and an interface name as Linux takes them
/// (1–15 bytes, no `/`, `:` or white space, not `.` or `..`).
fn check_names(container_id: &str, ifname: &str) -> NResult<()> {
    let cid_ok = (1..=128).contains(&container_id.len())
        && container_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !cid_ok {
        return Err(NeutronError::invalid_attr(
            "container_id",
            "a container id is 1 to 128 characters of A-Z, a-z, 0-9, '_', '.' and '-'",
        ));
    }
    let if_ok = (1..=15).contains(&ifname.len())
        && ifname != "."
        && ifname != ".."
        && !ifname
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if !if_ok {
        return Err(NeutronError::invalid_attr(
            "ifname",
            "an interface name is 1 to 15 bytes without '/', ':' or white space, and not '.' or '..'",
        ));
    }
    Ok(())
}

fn attachment_not_found(container_id: &str, ifname: &str) -> NeutronError {
    NeutronError::new(
        404,
        "AttachmentNotFound",
        format!("No attachment of interface {ifname} of container {container_id} on this trunk."),
    )
}

fn too_much_change() -> NeutronError {
    NeutronError::new(
        409,
        "Conflict",
        "Too much concurrent change to this trunk; retry the request",
    )
}

fn record(ctx: &Ctx<'_>, key: &str) -> Option<(Record, Revision)> {
    ctx.state.cache.get_json::<Record>(key)
}

fn trunk(ctx: &Ctx<'_>, id: &str) -> NResult<(Trunk, Revision)> {
    trunks::visible(ctx, id)
}

fn parent_of(ctx: &Ctx<'_>, t: &Trunk) -> NResult<(Port, Revision)> {
    ctx.get::<Port>(&t.port_id).ok_or_else(|| not_found::<Port>(&t.port_id))
}

fn enabled(t: &Trunk) -> NResult<()> {
    if t.admin_state_up {
        Ok(())
    } else {
        Err(NeutronError::conflict(
            "TrunkDisabled",
            format!("Trunk {} is currently disabled.", t.id),
        ))
    }
}

fn in_trunk(t: &Trunk, port_id: &str) -> Option<u16> {
    t.sub_ports
        .iter()
        .find(|s| s.port_id == port_id)
        .and_then(|s| u16::try_from(s.segmentation_id).ok())
}

/// The attachment as the plugin needs it: addresses with their subnets' prefix lengths and
/// gateways, the subnets' routes and DNS servers, the network's MTU.
fn render(ctx: &Ctx<'_>, t: &Trunk, r: &Record, p: &Port) -> Attachment {
    let mtu = ctx.get::<Network>(&p.network_id).map(|(n, _)| n.mtu).unwrap_or(0);
    let mut addresses = vec![];
    let mut routes: Vec<AttachmentRoute> = vec![];
    let mut dns: Vec<String> = vec![];
    for f in &p.fixed_ips {
        let (Ok(ip), Some((s, _))) = (f.ip_address.parse::<IpAddr>(), ctx.get::<Subnet>(&f.subnet_id)) else {
            continue;
        };
        let Ok(net) = s.cidr.parse::<IpNet>() else { continue };
        addresses.push(AttachmentAddress {
            ip_address: ip,
            prefix_len: net.prefix_len(),
            gateway: s.gateway_ip.as_deref().and_then(|g| g.parse().ok()),
        });
        for h in &s.host_routes {
            if let Ok(nexthop) = h.nexthop.parse() {
                let route = AttachmentRoute {
                    destination: h.destination.clone(),
                    nexthop,
                };
                if !routes.contains(&route) {
                    routes.push(route);
                }
            }
        }
        for d in &s.dns_nameservers {
            if !dns.contains(d) {
                dns.push(d.clone());
            }
        }
    }
    Attachment {
        port_id: p.id.clone(),
        network_id: p.network_id.clone(),
        mode: r.mode,
        mac_address: p.mac_address.clone(),
        vlan: match r.mode {
            NestedMode::Vlan => in_trunk(t, &p.id),
            NestedMode::Macvlan => None,
        },
        mtu,
        addresses,
        routes,
        dns_nameservers: dns,
    }
}

/// The attachment if it is whole: its port exists and (`vlan`) is still a subport.
fn current(ctx: &Ctx<'_>, trunk_id: &str, key: &str) -> NResult<Option<Attachment>> {
    let Some((r, _)) = record(ctx, key) else {
        return Ok(None);
    };
    let Some((p, _)) = ctx.get::<Port>(&r.port_id) else {
        return Ok(None);
    };
    let (t, _) = trunk(ctx, trunk_id)?;
    if r.mode == NestedMode::Vlan && in_trunk(&t, &p.id).is_none() {
        return Ok(None);
    }
    Ok(Some(render(ctx, &t, &r, &p)))
}

/// What one attempt of a PUT found to do.
enum Step {
    Done(Attachment),
    /// A port must be created; prepare it (async) first.
    NeedPort,
    Write(Vec<Compare>, Vec<Op>),
}

/// One attempt at a PUT, planned from the cache.
fn plan_put(
    ctx: &Ctx<'_>,
    trunk_id: &str,
    key: &str,
    req: &AttachmentRequest,
    new: Option<&mut NewPort<'_>>,
) -> NResult<Step> {
    let (mut t, trev) = trunk(ctx, trunk_id)?;
    let (mut parent, prev) = parent_of(ctx, &t)?;
    let found = record(ctx, key);
    let live = found
        .as_ref()
        .and_then(|(r, _)| ctx.get::<Port>(&r.port_id))
        .map(|(p, _)| p);
    if let (Some((r, _)), Some(p)) = (&found, &live) {
        if r.mode != req.mode || r.network_id != req.network_id {
            return Err(NeutronError::conflict(
                "AttachmentExists",
                format!(
                    "This interface is already attached in {:?} mode to network {}; release it first.",
                    r.mode, r.network_id
                ),
            ));
        }
        if r.mode == NestedMode::Macvlan || in_trunk(&t, &p.id).is_some() {
            return Ok(Step::Done(render(ctx, &t, r, p)));
        }
        // Its port was taken off the trunk through Neutron: back on, on a free VLAN.
        enabled(&t)?;
        let vlan = free_vlan(&t)?;
        let mut cmp = vec![Compare::ModRevision(lookup::key::<Trunk>(trunk_id), trev)];
        let mut ops = vec![];
        let wanted = (p.id.clone(), Some(("vlan".to_string(), vlan)));
        trunks::plan_add(ctx, &mut t, &parent, &[wanted], &mut cmp, &mut ops)?;
        t.std.bump(&now());
        ops.push(Op::put(lookup::key::<Trunk>(trunk_id), json_bytes(&t)));
        return Ok(Step::Write(cmp, ops));
    }
    enabled(&t)?;
    let Some(new) = new else { return Ok(Step::NeedPort) };
    let (mut cmp, mut ops, mut port) = new.plan(ctx)?;
    cmp.push(Compare::ModRevision(lookup::key::<Trunk>(trunk_id), trev));
    let mut trunk_changed = false;
    let mut parent_changed = false;
    match &found {
        // A record whose port is gone: replaced, what it still held given back.
        Some((old, orev)) => {
            cmp.push(Compare::ModRevision(key.to_string(), *orev));
            parent_changed |= take_pairs(&mut parent, &old.pairs);
            let before = t.sub_ports.len();
            t.sub_ports.retain(|s| s.port_id != old.port_id);
            if t.sub_ports.len() != before {
                trunk_changed = true;
                ops.push(Op::delete(keys::trunk_port(&old.port_id)));
            }
        }
        None => cmp.push(Compare::Absent(key.to_string())),
    }
    let mut rec = Record {
        port_id: port.id.clone(),
        network_id: req.network_id.clone(),
        mode: req.mode,
        pairs: vec![],
    };
    match req.mode {
        NestedMode::Vlan => {
            let vlan = free_vlan(&t)?;
            trunks::plan_new_subport(ctx, &mut t, &parent, &mut port, vlan, &mut cmp, &mut ops)?;
            trunk_changed = true;
        }
        NestedMode::Macvlan => {
            if port.network_id != parent.network_id {
                return Err(not_parent_network(&parent));
            }
            // Without port security on the parent nothing is filtered: no pairs needed.
            if parent.port_security_enabled {
                let add: Vec<AddressPair> = port
                    .fixed_ips
                    .iter()
                    .map(|f| AddressPair {
                        ip_address: f.ip_address.clone(),
                        mac_address: port.mac_address.clone(),
                    })
                    .filter(|a| !parent.allowed_address_pairs.contains(a))
                    .collect();
                let max = ctx.state.config.max_allowed_address_pair;
                if parent.allowed_address_pairs.len() + add.len() > max {
                    return Err(NeutronError::new(
                        400,
                        "AllowedAddressPairExhausted",
                        format!("The number of allowed address pair exceeds the maximum {max}."),
                    ));
                }
                parent.allowed_address_pairs.extend(add.iter().cloned());
                parent_changed |= !add.is_empty();
                rec.pairs = add;
            }
        }
    }
    if trunk_changed {
        t.std.bump(&now());
        ops.push(Op::put(lookup::key::<Trunk>(trunk_id), json_bytes(&t)));
    }
    if parent_changed {
        parent.std.bump(&now());
        cmp.push(Compare::ModRevision(lookup::key::<Port>(&parent.id), prev));
        ops.push(portops::put_op(&parent));
    }
    ops.push(portops::put_op(&port));
    ops.push(Op::put(key.to_string(), json_bytes(&rec)));
    Ok(Step::Write(cmp, ops))
}

fn free_vlan(t: &Trunk) -> NResult<u32> {
    trunks::lowest_free_vlan(t)
        .ok_or_else(|| NeutronError::conflict("NoFreeVlan", format!("Every VLAN id of trunk {} is in use.", t.id)))
}

fn not_parent_network(parent: &Port) -> NeutronError {
    NeutronError::bad_request(format!(
        "A macvlan attachment rides the VM's port: its network must be the parent port's network {}.",
        parent.network_id
    ))
}

async fn attach(
    ctx: &Ctx<'_>,
    trunk_id: &str,
    container_id: &str,
    ifname: &str,
    req: &AttachmentRequest,
) -> NResult<Attachment> {
    let key = keys::nested_attachment(trunk_id, container_id, ifname);
    let mut new: Option<NewPort<'_>> = None;
    let mut attempt = 0;
    while attempt < MAX_ATTEMPTS {
        match plan_put(ctx, trunk_id, &key, req, new.as_mut())? {
            Step::Done(a) => return Ok(a),
            Step::NeedPort => {
                new = Some(prepare_port(ctx, trunk_id, container_id, ifname, req).await?);
                continue;
            }
            Step::Write(cmp, ops) => {
                if ctx.commit(cmp, ops).await?.is_some() {
                    return current(ctx, trunk_id, &key)?.ok_or_else(too_much_change);
                }
            }
        }
        ctx.resync(attempt).await?;
        attempt += 1;
    }
    Err(too_much_change())
}

/// The container's port, checked as the trunk's project's own port create is.
async fn prepare_port<'r>(
    ctx: &Ctx<'r>,
    trunk_id: &str,
    container_id: &str,
    ifname: &str,
    req: &AttachmentRequest,
) -> NResult<NewPort<'r>> {
    let (t, _) = trunk(ctx, trunk_id)?;
    let (parent, _) = parent_of(ctx, &t)?;
    let short: String = container_id.chars().take(12).collect();
    let mut body = Map::new();
    body.insert("network_id".into(), json!(req.network_id));
    body.insert("name".into(), json!(format!("nested-{short}-{ifname}")));
    let host = match req.mode {
        NestedMode::Vlan => parent.binding_host_id.clone(),
        NestedMode::Macvlan => {
            // Visibility first, so an unseen network is a 404 whatever the parent's.
            ctx.visible_network(&req.network_id)?;
            if req.network_id != parent.network_id {
                return Err(not_parent_network(&parent));
            }
            body.insert("device_owner".into(), json!(MACVLAN_OWNER));
            body.insert("device_id".into(), json!(trunk_id));
            // Not bound: the parent's node carries its traffic, not a device of its own.
            String::new()
        }
    };
    let profile = json!({"nested": {
        "trunk_id": trunk_id,
        "container_id": container_id,
        "ifname": ifname,
        "mode": req.mode,
    }});
    NewPort::prepare(ctx, Body::from_map(body), Some(NodeBinding { host, profile }), true).await
}

/// One attempt at a DELETE; `None`: nothing to release.
fn plan_delete(ctx: &Ctx<'_>, trunk_id: &str, key: &str) -> NResult<Option<(Vec<Compare>, Vec<Op>)>> {
    let Some((r, rrev)) = record(ctx, key) else {
        return Ok(None);
    };
    let mut cmp = vec![Compare::ModRevision(key.to_string(), rrev)];
    let mut ops = vec![Op::delete(key.to_string())];
    let mut ours = false;
    if let Some((mut t, trev)) = ctx.get::<Trunk>(trunk_id) {
        if let Some(i) = t.sub_ports.iter().position(|s| s.port_id == r.port_id) {
            t.sub_ports.remove(i);
            t.std.bump(&now());
            cmp.push(Compare::ModRevision(lookup::key::<Trunk>(trunk_id), trev));
            ops.push(Op::put(lookup::key::<Trunk>(trunk_id), json_bytes(&t)));
            ops.push(Op::delete(keys::trunk_port(&r.port_id)));
            ours = true;
        }
        if let Some((mut parent, prev)) = ctx.get::<Port>(&t.port_id) {
            if take_pairs(&mut parent, &r.pairs) {
                parent.std.bump(&now());
                cmp.push(Compare::ModRevision(lookup::key::<Port>(&parent.id), prev));
                ops.push(portops::put_op(&parent));
            }
        }
    }
    if ctx.get::<Port>(&r.port_id).is_some() {
        // A port some trunk holds (not this one, after a change through Neutron) stays.
        let elsewhere = trunks::trunk_of(ctx, &r.port_id).is_some_and(|other| other.id != trunk_id);
        if !elsewhere {
            if !ours {
                cmp.push(trunks::not_trunked(&r.port_id));
            }
            portops::plan_delete(ctx, &r.port_id, &mut cmp, &mut ops)?;
        }
    }
    Ok(Some((cmp, ops)))
}

async fn release(ctx: &Ctx<'_>, trunk_id: &str, container_id: &str, ifname: &str) -> NResult<()> {
    let key = keys::nested_attachment(trunk_id, container_id, ifname);
    for attempt in 0..MAX_ATTEMPTS {
        let Some((cmp, ops)) = plan_delete(ctx, trunk_id, &key)? else {
            return Ok(());
        };
        if ctx.commit(cmp, ops).await?.is_some() {
            return Ok(());
        }
        ctx.resync(attempt).await?;
    }
    Err(too_much_change())
}

fn parse_request(body: Result<Bytes, BytesRejection>) -> NResult<AttachmentRequest> {
    let Value::Object(mut outer) = parse_body(body)? else {
        return Err(NeutronError::bad_request("The request body must be a JSON object"));
    };
    let inner = outer
        .remove("attachment")
        .ok_or_else(|| NeutronError::bad_request("Resource body required: 'attachment'"))?;
    serde_json::from_value(inner).map_err(|e| NeutronError::bad_request(format!("Invalid attachment: {e}")))
}

/// `PUT /isthmus/v1/nested/attachments/{container_id}/{ifname}`.
pub async fn put(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((container_id, ifname)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let who = authenticate_credential(&state, &headers)?;
    check_names(&container_id, &ifname)?;
    let req = parse_request(body)?;
    let ctx = Ctx {
        state: &state,
        auth: &who.auth,
    };
    let a = attach(&ctx, &who.trunk_id, &container_id, &ifname, &req).await?;
    tracing::info!(trunk = %who.trunk_id, credential = %who.credential_id, port = %a.port_id, vlan = ?a.vlan, mode = ?a.mode, "nested attachment");
    Ok(json_response(StatusCode::OK, json!({ "attachment": a })))
}

/// `GET` on the same path.
pub async fn get(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((container_id, ifname)): Path<(String, String)>,
) -> ApiResult<Response> {
    let who = authenticate_credential(&state, &headers)?;
    check_names(&container_id, &ifname)?;
    let ctx = Ctx {
        state: &state,
        auth: &who.auth,
    };
    let key = keys::nested_attachment(&who.trunk_id, &container_id, &ifname);
    let a = current(&ctx, &who.trunk_id, &key)?.ok_or_else(|| attachment_not_found(&container_id, &ifname))?;
    Ok(json_response(StatusCode::OK, json!({ "attachment": a })))
}

/// `DELETE` on the same path: 204, also when there was nothing.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((container_id, ifname)): Path<(String, String)>,
) -> ApiResult<Response> {
    let who = authenticate_credential(&state, &headers)?;
    check_names(&container_id, &ifname)?;
    let ctx = Ctx {
        state: &state,
        auth: &who.auth,
    };
    release(&ctx, &who.trunk_id, &container_id, &ifname).await?;
    tracing::info!(trunk = %who.trunk_id, credential = %who.credential_id, "nested attachment released");
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_names("abc123", "eth0").is_ok());
        assert!(check_names(&"a".repeat(128), "net1.100").is_ok());
        assert!(check_names("a_b.c-d", "x").is_ok());
        for (cid, ifname) in [
            ("", "eth0"),
            (&*"a".repeat(129), "eth0"),
            ("a/b", "eth0"),
            ("a b", "eth0"),
            ("ä", "eth0"),
            ("abc", ""),
            ("abc", "."),
            ("abc", ".."),
            ("abc", "a/b"),
            ("abc", "a:b"),
            ("abc", "a b"),
            ("abc", "0123456789abcdef"),
        ] {
            let e = check_names(cid, ifname).unwrap_err();
            assert_eq!(e.status, 400, "{cid:?} {ifname:?}");
        }
    }
}
