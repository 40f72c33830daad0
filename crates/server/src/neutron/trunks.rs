//! Trunks (`trunk`, `trunk-details`): a parent port carries its own network untagged and each
//! subport's network on a VLAN id, for containers nested in a VM.
//!
//! A trunk stores its subports, so one transaction on the trunk keeps VLAN ids unique in it.
//! Every port in a trunk, parent or subport, holds the index key [`keys::trunk_port`] naming
//! the trunk: a port joins one trunk at most, and a port delete that finds the key refuses
//! (Neutron's PortInUseAsTrunkParent / PortInUseAsSubPort). Subports are rewritten as
//! Neutron does (`device_owner` `trunk:subport`, `device_id` the trunk, the parent's host).
//!
//! - `PUT /v2.0/trunks/{id}/add_subports` / `remove_subports` with `{"sub_ports": [...]}` → the trunk.
//! - `GET /v2.0/trunks/{id}/get_subports` → `{"sub_ports": [...]}`.

use super::common::{
    check_if_match, description_from, json_bytes, new_id, not_found, now, retry, tags_from, Ctx, NResult, Stored,
};
use super::lookup::{self, visible_port};
use super::query::Prefilter;
use super::resource::{BoxFut, Meta, Resource};
use crate::cache::Typed;
use isthmus_model::validate::{is_uuid, Body};
use isthmus_model::{keys, AddressPair, Network, NeutronError, Port, StandardAttrs, SubPort, SubportOf, Trunk};
use isthmus_store::{Compare, Op, Revision};
use isthmus_wire::nested::NestedMode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

pub struct Trunks;

/// `device_owner` of a port while it is a subport.
pub const SUBPORT_OWNER: &str = "trunk:subport";
const VLAN: &str = "vlan";
const INHERIT: &str = "inherit";

static META: Meta = Meta {
    collection: "trunks",
    singular: "trunk",
    plural: "trunks",
    store: Trunk::COLLECTION,
    not_found: Trunk::NOT_FOUND,
    bulk: true,
    tags: true,
    // Not advertised (`trunk`, `trunk-details`) until the datapath carries subports.
    indexed: false,
    quota: None,
};

impl Stored for Trunk {
    const NOT_FOUND: (&'static str, &'static str) = ("Trunk", "Trunk");
}

impl Resource for Trunks {
    fn meta(&self) -> &'static Meta {
        &META
    }
    /// Neutron has no quota for trunks.
    fn used(&self, _ctx: &Ctx<'_>, _project: &str) -> usize {
        0
    }
    fn list_visible<'a>(&'a self, ctx: &'a Ctx<'a>, pre: &'a Prefilter<'a>) -> BoxFut<'a, Vec<Value>> {
        Box::pin(async move {
            Ok(ctx
                .all::<Trunk>()
                .into_iter()
                .filter(|(t, _)| ctx.admin() || ctx.owns(&t.project_id))
                .filter(|(t, _)| pre.keeps_owned(&t.id, &t.name, &t.project_id) && pre.keeps("port_id", &t.port_id))
                .map(|(t, _)| render(ctx, &t))
                .collect())
        })
    }
    fn show(&self, ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
        Ok(render(ctx, &visible(ctx, id)?.0))
    }
    fn create_one<'a>(&'a self, ctx: &'a Ctx<'a>, body: Body) -> BoxFut<'a, Value> {
        Box::pin(create(ctx, body))
    }
    fn update<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, body: Body, if_match: Option<u64>) -> BoxFut<'a, Value> {
        Box::pin(update(ctx, id, body, if_match))
    }
    fn delete<'a>(&'a self, ctx: &'a Ctx<'a>, id: &'a str, if_match: Option<u64>) -> BoxFut<'a, ()> {
        Box::pin(delete(ctx, id, if_match))
    }
}

fn key(id: &str) -> String {
    lookup::key::<Trunk>(id)
}

const ACTIVE: &str = "ACTIVE";

/// A trunk's status from its ports' (as the agents report them): `ACTIVE` when the parent
/// and every subport are, `DEGRADED` when the parent is and some subport is not, else `DOWN`.
/// `None`: a port that no longer exists.
pub(crate) fn derived_status<'a>(
    parent: Option<&str>,
    subports: impl IntoIterator<Item = Option<&'a str>>,
) -> &'static str {
    if parent != Some(ACTIVE) {
        return "DOWN";
    }
    if subports.into_iter().all(|s| s == Some(ACTIVE)) {
        ACTIVE
    } else {
        "DEGRADED"
    }
}

/// The trunk as the API shows it, its status derived from its ports'.
pub(crate) fn render(ctx: &Ctx<'_>, t: &Trunk) -> Value {
    let status_of = |id: &str| ctx.get::<Port>(id).map(|(p, _)| p.status);
    let parent = status_of(&t.port_id);
    let subs: Vec<Option<String>> = t.sub_ports.iter().map(|s| status_of(&s.port_id)).collect();
    let status = derived_status(parent.as_deref(), subs.iter().map(Option::as_deref));
    let mut v = t.to_api();
    v["status"] = json!(status);
    v
}

/// A trunk the caller may see (its project's, or any for an admin), or TrunkNotFound.
pub(crate) fn visible(ctx: &Ctx<'_>, id: &str) -> NResult<(Trunk, Revision)> {
    ctx.get::<Trunk>(id)
        .filter(|(t, _)| ctx.admin() || ctx.owns(&t.project_id))
        .ok_or_else(|| not_found::<Trunk>(id))
}

/// The trunk port `port_id` is in, if any.
pub fn trunk_of(ctx: &Ctx<'_>, port_id: &str) -> Option<Trunk> {
    let kv = ctx.state.cache.get(&keys::trunk_port(port_id))?;
    let id = String::from_utf8_lossy(&kv.value).to_string();
    ctx.get::<Trunk>(&id).map(|(t, _)| t)
}

/// Neutron's error for a port that is already in trunk `t` (as its parent or a subport).
fn in_use(port_id: &str, t: &Trunk) -> NeutronError {
    if t.port_id == port_id {
        NeutronError::conflict(
            "PortInUseAsTrunkParent",
            format!("Port {port_id} is currently a parent port for trunk {}.", t.id),
        )
    } else {
        NeutronError::conflict(
            "PortInUseAsSubPort",
            format!("Port {port_id} is currently a subport for trunk {}.", t.id),
        )
    }
}

/// Neutron's refusal to delete a port in a trunk, or nothing.
pub fn check_port_deletion(ctx: &Ctx<'_>, port_id: &str) -> NResult<()> {
    trunk_of(ctx, port_id).map_or(Ok(()), |t| Err(in_use(port_id, &t)))
}

/// What the nested API records for a container's attachment (`keys::nested_attachment`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NestedRecord {
    pub port_id: String,
    pub network_id: String,
    pub mode: NestedMode,
    /// The address pairs the attachment added to the parent (`macvlan`), to take back.
    #[serde(default)]
    pub pairs: Vec<AddressPair>,
}

/// Removes `pairs` from the parent's; whether anything changed.
pub(crate) fn take_pairs(parent: &mut Port, pairs: &[AddressPair]) -> bool {
    let before = parent.allowed_address_pairs.len();
    parent.allowed_address_pairs.retain(|a| !pairs.contains(a));
    parent.allowed_address_pairs.len() != before
}

/// Adds to the delete of port `p` through Neutron what its nested attachment (named by its
/// `binding:profile`) holds: the record goes and the parent's pairs for it are taken back, so
/// the VM is not left allowed to send as addresses that may go to another port.
pub fn plan_nested_port_gone(ctx: &Ctx<'_>, p: &Port, cmp: &mut Vec<Compare>, ops: &mut Vec<Op>) {
    let n = &p.binding_profile["nested"];
    let (Some(trunk_id), Some(cid), Some(ifname)) =
        (n["trunk_id"].as_str(), n["container_id"].as_str(), n["ifname"].as_str())
    else {
        return;
    };
    let rkey = keys::nested_attachment(trunk_id, cid, ifname);
    let Some((r, rrev)) = ctx.state.cache.get_json::<NestedRecord>(&rkey) else {
        return;
    };
    if r.port_id != p.id {
        return;
    }
    cmp.push(Compare::ModRevision(rkey.clone(), rrev));
    ops.push(Op::delete(rkey));
    let Some((t, _)) = ctx.get::<Trunk>(trunk_id) else {
        return;
    };
    if let Some((mut parent, prev)) = ctx.get::<Port>(&t.port_id) {
        if parent.id != p.id && take_pairs(&mut parent, &r.pairs) {
            parent.std.bump(&now());
            cmp.push(Compare::ModRevision(lookup::key::<Port>(&parent.id), prev));
            ops.push(Op::put(lookup::key::<Port>(&parent.id), json_bytes(&parent)));
        }
    }
}

/// The comparison a port delete adds: no trunk took the port meanwhile.
pub fn not_trunked(port_id: &str) -> Compare {
    Compare::Absent(keys::trunk_port(port_id))
}

/// `trunk_details` (`trunk-details`) added to a rendered port that is a trunk's parent.
pub fn add_details(ctx: &Ctx<'_>, port: &mut Value) {
    let Some(id) = port.get("id").and_then(Value::as_str).map(str::to_string) else {
        return;
    };
    let Some(t) = trunk_of(ctx, &id).filter(|t| t.port_id == id) else {
        return;
    };
    let subs: Vec<Value> = t
        .sub_ports
        .iter()
        .map(|s| {
            let mut v = s.to_api();
            let mac = ctx
                .get::<Port>(&s.port_id)
                .map(|(p, _)| p.mac_address)
                .unwrap_or_default();
            v["mac_address"] = json!(mac);
            v
        })
        .collect();
    if let Value::Object(m) = port {
        m.insert("trunk_details".into(), json!({"trunk_id": t.id, "sub_ports": subs}));
    }
}

/// A subport asked for: its port, and its segmentation (`None`: inherit, or not given).
pub(crate) type Wanted = (String, Option<(String, u32)>);

fn invalid_subports(reason: impl std::fmt::Display) -> NeutronError {
    NeutronError::bad_request(format!("Invalid input for sub_ports. Reason: {reason}."))
}

/// `sub_ports` as Neutron's validator takes them: a list of objects with a port UUID, unique;
/// `vlan` with an id in 1..=4094, unique per type; `inherit` takes the id from the port's
/// network. `ids_only` (remove_subports): only `port_id` matters.
fn parse_subports(raw: Option<Value>, ids_only: bool) -> NResult<Vec<Wanted>> {
    let Some(raw) = raw else { return Ok(vec![]) };
    let Value::Array(items) = raw else {
        return Err(invalid_subports(format!(
            "Invalid data format for subports: '{raw}' is not a list"
        )));
    };
    let mut ids = BTreeSet::new();
    let mut segs = BTreeSet::new();
    let mut out = vec![];
    for item in items {
        let Value::Object(m) = &item else {
            return Err(invalid_subports(format!(
                "Invalid data format for subport: '{item}' is not a dict"
            )));
        };
        let id = match m.get("port_id") {
            Some(Value::String(s)) if is_uuid(s) => s.clone(),
            Some(v) => return Err(invalid_subports(format!("Invalid UUID for subport: '{v}'"))),
            None => return Err(invalid_subports("A valid port UUID must be specified")),
        };
        if !ids.insert(id.clone()) {
            return Err(invalid_subports(format!("Non unique UUID for subport: '{id}'")));
        }
        if ids_only {
            out.push((id, None));
            continue;
        }
        out.push((id, segmentation(m, &mut segs)?));
    }
    Ok(out)
}

/// A subport's segmentation; `None` for `inherit`.
fn segmentation(m: &Map<String, Value>, seen: &mut BTreeSet<(String, u32)>) -> NResult<Option<(String, u32)>> {
    let kind = m.get("segmentation_type");
    if kind.and_then(Value::as_str) == Some(INHERIT) {
        return Ok(None);
    }
    let (Some(kind), Some(id)) = (kind, m.get("segmentation_id")) else {
        return Err(invalid_subports(
            "Invalid subport details: missing segmentation information. Must specify both segmentation_id and segmentation_type",
        ));
    };
    let kind = match kind.as_str() {
        Some(VLAN) => VLAN.to_string(),
        _ => {
            return Err(invalid_subports(format!(
                "Invalid segmentation type {kind}: only vlan and inherit are supported"
            )))
        }
    };
    let id = match id {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
    .filter(|n| (1..=4094).contains(n))
    .ok_or_else(|| invalid_subports(format!("Invalid segmentation id {id}: a VLAN id is in 1..4094")))?;
    let id = u32::try_from(id).unwrap_or(0);
    if !seen.insert((kind.clone(), id)) {
        return Err(invalid_subports(format!("Segmentation ID '{id}' is not unique")));
    }
    Ok(Some((kind, id)))
}

/// Ports the network services own (router interfaces, gateways, floating IPs, DHCP) join no
/// trunk.
fn service_port(p: &Port) -> NResult<()> {
    if p.device_owner.starts_with("network:") {
        return Err(NeutronError::conflict(
            "PortInUse",
            format!(
                "Port {} is in use by {} and cannot be part of a trunk.",
                p.id, p.device_owner
            ),
        ));
    }
    Ok(())
}

fn network_mtu(ctx: &Ctx<'_>, network_id: &str) -> u32 {
    ctx.get::<Network>(network_id).map(|(n, _)| n.mtu).unwrap_or(0)
}

/// Plans adding `subs` to trunk `t` (whose parent is `parent`): checks each port and writes
/// the trunk's new subport list into `t`, the ports' new ownership and the index keys.
pub(crate) fn plan_add(
    ctx: &Ctx<'_>,
    t: &mut Trunk,
    parent: &Port,
    subs: &[Wanted],
    cmp: &mut Vec<Compare>,
    ops: &mut Vec<Op>,
) -> NResult<()> {
    let parent_mtu = network_mtu(ctx, &parent.network_id);
    for (port_id, seg) in subs {
        if *port_id == t.port_id {
            return Err(in_use(port_id, t));
        }
        let (mut p, prev) = visible_port(ctx, port_id)?;
        service_port(&p)?;
        if let Some(other) = trunk_of(ctx, port_id) {
            return Err(in_use(port_id, &other));
        }
        let (kind, seg_id) = seg.clone().ok_or_else(|| {
            // Inherit takes the VLAN of the port's network: none here is a VLAN network.
            NeutronError::bad_request(format!(
                "Invalid input for sub_ports. Reason: segmentation type inherit needs the network of port {port_id} to be a VLAN provider network, and it is not."
            ))
        })?;
        join(ctx, t, parent_mtu, parent, &mut p, kind, seg_id)?;
        cmp.push(Compare::ModRevision(lookup::key::<Port>(port_id), prev));
        cmp.push(Compare::Absent(keys::trunk_port(port_id)));
        ops.push(Op::put(lookup::key::<Port>(port_id), json_bytes(&p)));
        ops.push(Op::put(keys::trunk_port(port_id), t.id.clone()));
    }
    Ok(())
}

/// Makes `p` a subport of `t` on (`kind`, `seg_id`): Neutron's per-trunk uniqueness and MTU
/// rules, the trunk's list, the port's new ownership (written by the caller).
fn join(
    ctx: &Ctx<'_>,
    t: &mut Trunk,
    parent_mtu: u32,
    parent: &Port,
    p: &mut Port,
    kind: String,
    seg_id: u32,
) -> NResult<()> {
    if let Some(s) = t
        .sub_ports
        .iter()
        .find(|s| s.segmentation_type == kind && s.segmentation_id == seg_id)
    {
        return Err(NeutronError::conflict(
            "DuplicateSubPort",
            format!(
                "segmentation_type {kind} and segmentation_id {seg_id} already in use on trunk {} (port {}).",
                t.id, s.port_id
            ),
        ));
    }
    let mtu = network_mtu(ctx, &p.network_id);
    if parent_mtu > 0 && mtu > parent_mtu {
        return Err(NeutronError::conflict(
            "SubPortMtuGreaterThanTrunkPortMtu",
            format!(
                "MTU {mtu} of subport {} is greater than MTU {parent_mtu} of trunk {} parent port {}.",
                p.id, t.id, t.port_id
            ),
        ));
    }
    t.sub_ports.push(SubPort {
        port_id: p.id.clone(),
        segmentation_type: kind,
        segmentation_id: seg_id,
    });
    p.device_owner = SUBPORT_OWNER.into();
    p.device_id = t.id.clone();
    p.binding_host_id = parent.binding_host_id.clone();
    p.subport_of = Some(SubportOf {
        trunk_id: t.id.clone(),
        parent_port_id: parent.id.clone(),
        segmentation_id: seg_id,
    });
    p.std.bump(&now());
    Ok(())
}

/// The lowest VLAN id no subport of `t` uses, if any is left.
pub(crate) fn lowest_free_vlan(t: &Trunk) -> Option<u32> {
    let used: BTreeSet<u32> = t
        .sub_ports
        .iter()
        .filter(|s| s.segmentation_type == VLAN)
        .map(|s| s.segmentation_id)
        .collect();
    (1..=4094).find(|v| !used.contains(v))
}

/// Plans port `p`, created in the same transaction, as a subport of `t` on VLAN `vlan` (the
/// caller writes the port and the trunk): so no crash leaves one without the other.
pub(crate) fn plan_new_subport(
    ctx: &Ctx<'_>,
    t: &mut Trunk,
    parent: &Port,
    p: &mut Port,
    vlan: u32,
    cmp: &mut Vec<Compare>,
    ops: &mut Vec<Op>,
) -> NResult<()> {
    let parent_mtu = network_mtu(ctx, &parent.network_id);
    join(ctx, t, parent_mtu, parent, p, VLAN.to_string(), vlan)?;
    cmp.push(Compare::Absent(keys::trunk_port(&p.id)));
    ops.push(Op::put(keys::trunk_port(&p.id), t.id.clone()));
    Ok(())
}

/// Plans releasing subport `port_id` of trunk `trunk_id`: its ownership cleared, its key gone.
pub(crate) fn plan_release(ctx: &Ctx<'_>, trunk_id: &str, port_id: &str, cmp: &mut Vec<Compare>, ops: &mut Vec<Op>) {
    ops.push(Op::delete(keys::trunk_port(port_id)));
    if let Some((mut p, prev)) = ctx.get::<Port>(port_id) {
        if p.device_owner == SUBPORT_OWNER && p.device_id == trunk_id {
            // Unbound as Neutron unbinds a released subport: its node unwires it.
            p.device_owner.clear();
            p.device_id.clear();
            p.binding_host_id.clear();
            p.subport_of = None;
            p.status = "DOWN".into();
            p.std.bump(&now());
            cmp.push(Compare::ModRevision(lookup::key::<Port>(port_id), prev));
            ops.push(Op::put(lookup::key::<Port>(port_id), json_bytes(&p)));
        }
    }
}

async fn create(ctx: &Ctx<'_>, mut body: Body) -> NResult<Value> {
    let project_id = ctx.target_project(&mut body)?;
    let name = body.string_max("name", 255)?.unwrap_or_default();
    let description = description_from(&mut body)?.unwrap_or_default();
    let admin_state_up = body.boolean("admin_state_up")?.unwrap_or(true);
    let tags = tags_from(ctx, &mut body)?.unwrap_or_default();
    let port_id = match body.string("port_id")? {
        Some(p) if is_uuid(&p) => p,
        Some(p) => {
            return Err(NeutronError::invalid_attr(
                "port_id",
                format!("'{p}' is not a valid UUID"),
            ))
        }
        None => {
            return Err(NeutronError::bad_request(
                "Failed to parse request. Required attribute 'port_id' not specified",
            ))
        }
    };
    let subs = parse_subports(body.take_raw("sub_ports"), false)?;
    body.finish()?;
    let id = new_id();
    let trunk = retry(ctx, |ctx| {
        let (parent, prev) = visible_port(ctx, &port_id)?;
        service_port(&parent)?;
        if !ctx.admin() && !ctx.owns(&parent.project_id) {
            return Err(NeutronError::not_found("Port", "Port", &port_id));
        }
        if let Some(other) = trunk_of(ctx, &port_id) {
            return Err(NeutronError::conflict(
                "TrunkPortInUse",
                format!("Port {port_id} is in use by another trunk {}.", other.id),
            ));
        }
        let mut t = Trunk {
            id: id.clone(),
            project_id: project_id.clone(),
            name: name.clone(),
            admin_state_up,
            port_id: port_id.clone(),
            status: "DOWN".into(),
            sub_ports: vec![],
            std: StandardAttrs {
                description: description.clone(),
                tags: tags.clone(),
                ..StandardAttrs::new(&now())
            },
        };
        let mut cmp = vec![
            Compare::Absent(key(&id)),
            Compare::ModRevision(lookup::key::<Port>(&port_id), prev),
            Compare::Absent(keys::trunk_port(&port_id)),
        ];
        let mut ops = vec![Op::put(keys::trunk_port(&port_id), id.clone())];
        plan_add(ctx, &mut t, &parent, &subs, &mut cmp, &mut ops)?;
        ops.push(Op::put(key(&id), json_bytes(&t)));
        Ok((cmp, ops, t))
    })
    .await?;
    tracing::info!(trunk = %trunk.id, parent = %trunk.port_id, sub_ports = trunk.sub_ports.len(), "trunk created");
    Ok(render(ctx, &trunk))
}

async fn update(ctx: &Ctx<'_>, id: &str, mut body: Body, if_match: Option<u64>) -> NResult<Value> {
    for ro in ["port_id", "sub_ports", "status", "project_id", "tenant_id"] {
        if body.contains(ro) {
            return Err(NeutronError::bad_request(format!(
                "Cannot update read-only attribute {ro}"
            )));
        }
    }
    let name = body.string_max("name", 255)?;
    let description = description_from(&mut body)?;
    let admin_state_up = body.boolean("admin_state_up")?;
    let tags = tags_from(ctx, &mut body)?;
    body.finish()?;
    let t = retry(ctx, |ctx| {
        let (mut t, rev) = visible(ctx, id)?;
        check_if_match(if_match, t.std.revision_number)?;
        if let Some(v) = &name {
            t.name = v.clone();
        }
        if let Some(v) = &description {
            t.std.description = v.clone();
        }
        if let Some(v) = admin_state_up {
            t.admin_state_up = v;
        }
        if let Some(v) = &tags {
            t.std.tags = v.clone();
        }
        t.std.bump(&now());
        Ok((
            vec![Compare::ModRevision(key(id), rev)],
            vec![Op::put(key(id), json_bytes(&t))],
            t,
        ))
    })
    .await?;
    Ok(render(ctx, &t))
}

async fn delete(ctx: &Ctx<'_>, id: &str, if_match: Option<u64>) -> NResult<()> {
    retry(ctx, |ctx| {
        let (t, rev) = visible(ctx, id)?;
        check_if_match(if_match, t.std.revision_number)?;
        // Its subports are released with it, as Neutron does.
        let mut cmp = vec![Compare::ModRevision(key(id), rev)];
        let mut ops = vec![Op::delete(key(id)), Op::delete(keys::trunk_port(&t.port_id))];
        for s in &t.sub_ports {
            plan_release(ctx, id, &s.port_id, &mut cmp, &mut ops);
        }
        plan_nested_cleanup(ctx, id, &mut cmp, &mut ops);
        Ok((cmp, ops, ()))
    })
    .await?;
    drop_nested_records(ctx, id).await;
    tracing::info!(trunk = %id, "trunk deleted");
    Ok(())
}

/// Removes a deleted trunk's nested attachment records, after its own transaction so that a
/// trunk with many subports stays within the store's limit of writes per transaction.
/// Nothing can reach them any more (the trunk and its credentials are gone, and a nested
/// write compares the trunk), so a failure here leaves only unreachable keys; it is logged.
async fn drop_nested_records(ctx: &Ctx<'_>, id: &str) {
    let keys: Vec<String> = ctx
        .state
        .cache
        .list(&keys::nested_attachment_prefix(id))
        .iter()
        .map(|kv| kv.key.clone())
        .collect();
    for chunk in keys.chunks(64) {
        let ops = chunk.iter().map(|k| Op::delete(k.clone())).collect();
        if let Err(e) = ctx.commit(vec![], ops).await {
            tracing::warn!(trunk = %id, error = %e.message, "deleting a deleted trunk's nested attachment records failed");
            return;
        }
    }
}

/// What a trunk delete also removes in its transaction: its credentials (the guard compared,
/// so none created meanwhile is missed; at most 16). Its nested attachments' records go right
/// after; their ports stay, as Neutron leaves a deleted trunk's ports.
fn plan_nested_cleanup(ctx: &Ctx<'_>, id: &str, cmp: &mut Vec<Compare>, ops: &mut Vec<Op>) {
    let guard = keys::trunk_credential_guard(id);
    match ctx.state.cache.get(&guard) {
        Some(kv) => {
            cmp.push(Compare::ModRevision(guard.clone(), kv.mod_revision));
            ops.push(Op::delete(guard));
        }
        None => cmp.push(Compare::Absent(guard)),
    }
    for kv in ctx.state.cache.list(keys::TRUNK_CREDENTIAL_PREFIX) {
        let of_trunk = serde_json::from_slice::<Value>(&kv.value)
            .is_ok_and(|v| v.get("trunk_id").and_then(Value::as_str) == Some(id));
        if of_trunk {
            ops.push(Op::delete(kv.key.clone()));
        }
    }
}

fn writable(ctx: &Ctx<'_>, id: &str) -> NResult<(Trunk, Revision)> {
    let (t, rev) = visible(ctx, id)?;
    if !t.admin_state_up {
        return Err(NeutronError::conflict(
            "TrunkDisabled",
            format!("Trunk {id} is currently disabled."),
        ));
    }
    Ok((t, rev))
}

/// `PUT /v2.0/trunks/{id}/add_subports` and `remove_subports`.
pub async fn change_subports(ctx: &Ctx<'_>, id: &str, body: Value, add: bool) -> NResult<Value> {
    let rule = if add { "add_subports" } else { "remove_subports" };
    visible(ctx, id)?;
    ctx.require_member(rule)?;
    let raw = match body {
        Value::Object(mut m) => m.remove("sub_ports"),
        _ => None,
    };
    if raw.is_none() {
        return Err(NeutronError::bad_request(
            "Failed to parse request. Required attribute 'sub_ports' not specified",
        ));
    }
    let subs = parse_subports(raw, !add)?;
    let t = retry(ctx, |ctx| {
        let (mut t, rev) = writable(ctx, id)?;
        let mut cmp = vec![Compare::ModRevision(key(id), rev)];
        let mut ops = vec![];
        if add {
            let (parent, _) = ctx
                .get::<Port>(&t.port_id)
                .ok_or_else(|| not_found::<Port>(&t.port_id))?;
            plan_add(ctx, &mut t, &parent, &subs, &mut cmp, &mut ops)?;
        } else {
            for (port_id, _) in &subs {
                let Some(at) = t.sub_ports.iter().position(|s| s.port_id == *port_id) else {
                    return Err(NeutronError::new(
                        404,
                        "SubPortNotFound",
                        format!("SubPort {port_id} does not exist on trunk {id}."),
                    ));
                };
                t.sub_ports.remove(at);
                plan_release(ctx, id, port_id, &mut cmp, &mut ops);
            }
        }
        t.std.bump(&now());
        ops.push(Op::put(key(id), json_bytes(&t)));
        Ok((cmp, ops, t))
    })
    .await?;
    tracing::info!(trunk = %id, changed = subs.len(), sub_ports = t.sub_ports.len(), "trunk {rule}");
    Ok(render(ctx, &t))
}

/// `GET /v2.0/trunks/{id}/get_subports`.
pub fn get_subports(ctx: &Ctx<'_>, id: &str) -> NResult<Value> {
    if !ctx.can_read() {
        return Err(not_found::<Trunk>(id));
    }
    let (t, _) = visible(ctx, id)?;
    Ok(json!({"sub_ports": t.sub_ports.iter().map(SubPort::to_api).collect::<Vec<_>>()}))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "11111111-2222-3333-4444-555555555555";
    const B: &str = "11111111-2222-3333-4444-666666666666";

    #[test]
    fn status_follows_the_ports() {
        let up = Some("ACTIVE");
        assert_eq!(derived_status(up, []), "ACTIVE");
        assert_eq!(derived_status(up, [up, up]), "ACTIVE");
        assert_eq!(derived_status(up, [up, Some("DOWN")]), "DEGRADED");
        assert_eq!(derived_status(up, [None]), "DEGRADED");
        assert_eq!(derived_status(Some("DOWN"), [up]), "DOWN");
        assert_eq!(derived_status(Some("BUILD"), []), "DOWN");
        assert_eq!(derived_status(None, [up]), "DOWN");
    }

    #[test]
    fn vlans_are_taken_lowest_first() {
        let mut t = Trunk {
            id: "t".into(),
            project_id: "p".into(),
            name: String::new(),
            admin_state_up: true,
            port_id: "parent".into(),
            status: "DOWN".into(),
            sub_ports: vec![],
            std: StandardAttrs::new("2026-01-01T00:00:00Z"),
        };
        assert_eq!(lowest_free_vlan(&t), Some(1));
        for v in [1, 2, 4] {
            t.sub_ports.push(SubPort {
                port_id: format!("p{v}"),
                segmentation_type: VLAN.into(),
                segmentation_id: v,
            });
        }
        assert_eq!(lowest_free_vlan(&t), Some(3));
        t.sub_ports = (1..=4094)
            .map(|v| SubPort {
                port_id: format!("p{v}"),
                segmentation_type: VLAN.into(),
                segmentation_id: v,
            })
            .collect();
        assert_eq!(lowest_free_vlan(&t), None);
    }

    #[test]
    fn subports_are_checked_as_neutron_checks_them() {
        let ok = parse_subports(
            Some(json!([
                {"port_id": A, "segmentation_type": "vlan", "segmentation_id": 100},
                {"port_id": B, "segmentation_type": "vlan", "segmentation_id": "101"},
            ])),
            false,
        )
        .unwrap();
        assert_eq!(ok[1].1, Some(("vlan".to_string(), 101)));
        let bad = [
            json!({"port_id": A}),
            json!([{"port_id": "x", "segmentation_type": "vlan", "segmentation_id": 1}]),
            json!([{"segmentation_type": "vlan", "segmentation_id": 1}]),
            json!([{"port_id": A, "segmentation_type": "vlan"}]),
            json!([{"port_id": A, "segmentation_type": "vxlan", "segmentation_id": 1}]),
            json!([{"port_id": A, "segmentation_type": "vlan", "segmentation_id": 0}]),
            json!([{"port_id": A, "segmentation_type": "vlan", "segmentation_id": 4095}]),
            json!([{"port_id": A, "segmentation_type": "vlan", "segmentation_id": -1}]),
            json!([{"port_id": A, "segmentation_type": "vlan", "segmentation_id": 5},
                   {"port_id": B, "segmentation_type": "vlan", "segmentation_id": 5}]),
            json!([{"port_id": A, "segmentation_type": "vlan", "segmentation_id": 5},
                   {"port_id": A, "segmentation_type": "vlan", "segmentation_id": 6}]),
            json!(["not an object"]),
        ];
        for b in bad {
            let e = parse_subports(Some(b.clone()), false).unwrap_err();
            assert_eq!(e.status, 400, "{b}");
        }
        // Removal names ports only.
        let ids = parse_subports(Some(json!([{"port_id": A}])), true).unwrap();
        assert_eq!(ids, vec![(A.to_string(), None)]);
        // Inherit passes the validator; the network decides later.
        let inh = parse_subports(Some(json!([{"port_id": A, "segmentation_type": "inherit"}])), false).unwrap();
        assert_eq!(inh[0].1, None);
    }
}
