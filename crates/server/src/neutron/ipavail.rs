//! `network-ip-availability`: per network and subnet, how many addresses the allocation pools
//! hold and how many are allocated. Admin only (Neutron's policy); read only.
//!
//! Used addresses are the subnet's allocation keys (every allocated address has one, whoever
//! holds it: ports, gateways, floating IPs); totals are the pools' sizes, as Neutron counts.

use super::common::Ctx;
use super::http::{authenticate, json_response, ApiResult};
use super::query::{parse_pairs, Query};
use crate::AppState;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use isthmus_model::{keys, Network, NeutronError, Subnet};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::Arc;

const PLURAL: &str = "network_ip_availabilities";

/// Addresses in an allocation pool (inclusive), 0 if it does not parse.
fn pool_size(start: &str, end: &str) -> u128 {
    match (start.parse::<IpAddr>(), end.parse::<IpAddr>()) {
        (Ok(IpAddr::V4(a)), Ok(IpAddr::V4(b))) => u128::from(u32::from(b)).saturating_sub(u128::from(u32::from(a))) + 1,
        (Ok(IpAddr::V6(a)), Ok(IpAddr::V6(b))) => u128::from(b).saturating_sub(u128::from(a)).saturating_add(1),
        _ => 0,
    }
}

/// JSON can carry at most a u64 here; a /64's pools fit.
fn count(n: u128) -> Value {
    json!(u64::try_from(n).unwrap_or(u64::MAX))
}

fn availability(ctx: &Ctx<'_>, n: &Network, versions: &[u8]) -> Option<Value> {
    let cache = &ctx.state.cache;
    let mut subnets: Vec<Value> = vec![];
    let (mut total, mut used) = (0u128, 0u128);
    for id in &n.subnets {
        let Some((s, _)) = cache.get_object::<Subnet>(id) else {
            continue;
        };
        if !versions.is_empty() && !versions.contains(&s.ip_version) {
            continue;
        }
        let t: u128 = s.allocation_pools.iter().map(|p| pool_size(&p.start, &p.end)).sum();
        let u = cache.list(&keys::ip_alloc_prefix(&s.id)).len() as u128;
        total = total.saturating_add(t);
        used += u;
        subnets.push(json!({
            "subnet_id": s.id, "subnet_name": s.name, "cidr": s.cidr, "ip_version": s.ip_version,
            "total_ips": count(t), "used_ips": count(u),
        }));
    }
    if !versions.is_empty() && subnets.is_empty() {
        return None;
    }
    Some(json!({
        "network_id": n.id, "network_name": n.name, "project_id": n.project_id, "tenant_id": n.project_id,
        "total_ips": count(total), "used_ips": count(used), "subnet_ip_availability": subnets,
    }))
}

fn admin_only(ctx: &Ctx<'_>) -> Result<(), NeutronError> {
    if ctx.admin() {
        return Ok(());
    }
    Err(NeutronError::forbidden(
        "rule:get_network_ip_availability is disallowed by policy",
    ))
}

/// `GET /v2.0/network-ip-availabilities`.
pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    admin_only(&ctx)?;
    // `ip_version` selects subnets (and networks with one); the rest filter the networks.
    let raw = q.unwrap_or_default();
    let mut versions = vec![];
    for (k, v) in parse_pairs(&raw) {
        if k == "ip_version" {
            match v.as_str() {
                "4" => versions.push(4),
                "6" => versions.push(6),
                _ => return Err(NeutronError::invalid_input(format!("Invalid ip_version '{v}'")).into()),
            }
        }
    }
    let rest: Vec<&str> = raw.split('&').filter(|p| !p.starts_with("ip_version=")).collect();
    let query = Query::parse(&rest.join("&"))?;
    let items: Vec<Value> = state
        .cache
        .list_typed::<Network>()
        .iter()
        .filter_map(|(n, _)| availability(&ctx, n, &versions))
        .collect();
    let url = format!("{}v2.0/network-ip-availabilities", state.network_url);
    Ok(json_response(StatusCode::OK, query.apply(items, PLURAL, &url)?))
}

/// `GET /v2.0/network-ip-availabilities/{network_id}`.
pub async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let auth = authenticate(&state, &headers).await?;
    let ctx = Ctx {
        state: &state,
        auth: &auth,
    };
    admin_only(&ctx)?;
    let item = state
        .cache
        .get_object::<Network>(&id)
        .and_then(|(n, _)| availability(&ctx, &n, &[]))
        .ok_or_else(|| NeutronError::not_found("Network", "network", &id))?;
    Ok(json_response(StatusCode::OK, json!({"network_ip_availability": item})))
}

#[cfg(test)]
mod tests {
    use super::pool_size;

    #[test]
    fn pools_count_inclusively() {
        assert_eq!(pool_size("10.0.0.2", "10.0.0.254"), 253);
        assert_eq!(pool_size("10.0.0.5", "10.0.0.5"), 1);
        assert_eq!(
            pool_size("2001:db8::2", "2001:db8::ffff:ffff:ffff:ffff"),
            (1u128 << 64) - 2
        );
        assert_eq!(
            pool_size("10.0.0.9", "10.0.0.1"),
            1,
            "a reversed pool counts its start only"
        );
        assert_eq!(pool_size("x", "10.0.0.1"), 0);
    }
}
