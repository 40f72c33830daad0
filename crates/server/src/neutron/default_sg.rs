//! Every project's `default` security group, made on first need (by a group list or create,
//! or a port that gets the default group).

use super::common::{json_bytes, new_id, now, Ctx, NResult};
use super::lookup::{default_sg_key, key};
use isthmus_model::{SecurityGroup, SecurityGroupRule, StandardAttrs};
use isthmus_store::{Compare, Op};

/// A new group's rules: egress anywhere, IPv4 and IPv6.
pub fn egress_rules(project: &str, group: &str, ts: &str) -> Vec<SecurityGroupRule> {
    ["IPv4", "IPv6"]
        .iter()
        .map(|et| SecurityGroupRule {
            id: new_id(),
            project_id: project.to_string(),
            security_group_id: group.to_string(),
            direction: "egress".into(),
            ethertype: et.to_string(),
            protocol: None,
            port_range_min: None,
            port_range_max: None,
            remote_ip_prefix: None,
            remote_group_id: None,
            std: StandardAttrs::new(ts),
        })
        .collect()
}

/// Every project has a `default` group: egress anywhere, ingress from its own members.
/// Created on first need; the index key makes it exactly one even with racing servers.
pub async fn ensure_default(ctx: &Ctx<'_>, project: &str) -> NResult<()> {
    if project.is_empty() || ctx.state.cache.contains(&default_sg_key(project)) {
        return Ok(());
    }
    let ts = now();
    let id = new_id();
    let g = SecurityGroup {
        id: id.clone(),
        project_id: project.to_string(),
        name: "default".into(),
        stateful: true,
        std: StandardAttrs {
            description: "Default security group".into(),
            ..StandardAttrs::new(&ts)
        },
    };
    let mut rules = egress_rules(project, &id, &ts);
    for et in ["IPv4", "IPv6"] {
        let mut r = rules[0].clone();
        r.id = new_id();
        r.direction = "ingress".into();
        r.ethertype = et.into();
        r.remote_group_id = Some(id.clone());
        rules.push(r);
    }
    let mut ops = vec![
        Op::put(default_sg_key(project), id.clone()),
        Op::put(key::<SecurityGroup>(&id), json_bytes(&g)),
    ];
    for r in &rules {
        ops.push(Op::put(key::<SecurityGroupRule>(&r.id), json_bytes(r)));
    }
    if ctx
        .commit(vec![Compare::Absent(default_sg_key(project))], ops)
        .await?
        .is_none()
    {
        // Another request made it first; make sure we can see it.
        ctx.resync(0).await?;
    } else {
        tracing::info!(project, group = %id, "default security group created");
    }
    Ok(())
}
