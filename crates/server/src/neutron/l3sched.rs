//! Chooses each router's SNAT node: the router's gateway port is bound to one living node
//! that offers the `gateway` capability, and moved when that node dies (its liveness key goes
//! with its lease, see [`super::liveness`]). The choice is a rendezvous hash of router and
//! node, so routers spread over the gateway nodes and a death moves only the dead node's
//! routers. Every server may run this: each move is a compare-and-swap on the port.

use super::common::{json_bytes, now};
use super::liveness;
use crate::AppState;
use isthmus_model::{keys, Node, Port, Router};
use isthmus_store::{Compare, Op};
use std::sync::Arc;
use std::time::Duration;

/// The capability a node's heartbeat names to offer itself as a SNAT gateway.
pub const GATEWAY: &str = "gateway";

/// How often bindings are checked (a node's death is seen within its lease TTL plus this).
const EVERY: Duration = Duration::from_millis(500);

pub fn start(state: Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // After a (re)start every node looks dead until its next heartbeat: give them one
        // agent-down period before moving anything.
        tokio::time::sleep(Duration::from_secs(state.config.agent_down_secs.max(0) as u64)).await;
        loop {
            sweep(&state).await;
            tokio::time::sleep(EVERY).await;
        }
    })
}

/// The node a router's SNAT goes to, among `nodes` (none when empty).
pub fn choose<'a>(router: &str, nodes: &[&'a str]) -> Option<&'a str> {
    nodes.iter().copied().max_by_key(|n| {
        // FNV-1a over "router/node": stable across servers and releases.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in router.bytes().chain([b'/']).chain(n.bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h, *n)
    })
}

async fn sweep(state: &AppState) {
    let cache = &state.cache;
    let nodes: Vec<Arc<Node>> = cache.list_typed::<Node>().into_iter().map(|(n, _)| n).collect();
    let alive: Vec<&str> = nodes
        .iter()
        .filter(|n| n.capabilities.iter().any(|c| c == GATEWAY) && cache.contains(&liveness::key(&n.host)))
        .map(|n| n.host.as_str())
        .collect();
    // No living gateway node: a dead binding is no worse than none, and keeps its place.
    if alive.is_empty() {
        return;
    }
    for (r, _) in cache.list_typed::<Router>() {
        let Some(gw) = &r.gateway else { continue };
        let key = keys::resource("ports", &gw.port_id);
        let Some((mut port, rev)) = cache.get_typed::<Port>(&key) else {
            continue;
        };
        let current = port.binding_host_id.as_str();
        if !current.is_empty() && alive.contains(&current) {
            continue;
        }
        let want = choose(&r.id, &alive).unwrap_or("");
        if want == current {
            continue;
        }
        tracing::info!(router = %r.id, from = current, to = want, "router SNAT moves to another gateway node");
        port.binding_host_id = want.to_string();
        port.status = if want.is_empty() { "DOWN" } else { "ACTIVE" }.into();
        port.std.bump(&now());
        let res = state
            .store
            .txn(
                vec![Compare::ModRevision(key.clone(), rev)],
                vec![Op::put(key.clone(), json_bytes(&port))],
            )
            .await;
        if let Err(e) = res {
            tracing::warn!(router = %r.id, error = %e, "binding the router's gateway failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::choose;

    #[test]
    fn choice_is_stable_and_a_death_moves_only_its_routers() {
        let all = ["g1", "g2", "g3"];
        let routers: Vec<String> = (0..200).map(|i| format!("r{i}")).collect();
        let before: Vec<&str> = routers.iter().map(|r| choose(r, &all).unwrap()).collect();
        for n in all {
            assert!(before.contains(&n), "{n} never chosen");
        }
        let left = ["g1", "g3"];
        for (r, b) in routers.iter().zip(&before) {
            let after = choose(r, &left).unwrap();
            if *b != "g2" {
                assert_eq!(after, *b, "{r} moved although its node lives");
            }
        }
        assert_eq!(choose("r", &[]), None);
    }
}
