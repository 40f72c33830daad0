//! The node stream: the server's view of this node, as a snapshot and then updates, applied to
//! the shared [`NodeState`]. Reconnects with back-off, resuming after the last revision seen.

use crate::client::Client;
use crate::controller::Backoff;
use crate::objects::{parse_message, Applied};
use crate::state::NodeState;
use futures::StreamExt;
use isthmus_wire::stream::Message;
use std::time::Duration;
use tracing::{debug, info, warn};

/// Follows the node stream forever.
pub async fn follow(state: &NodeState, client: &Client) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let res = once(state, client, &mut backoff).await;
        state.set_connected(false);
        match res {
            Ok(()) => warn!("node stream ended, reconnecting"),
            Err(e) => warn!(error = %e, "node stream failed, reconnecting"),
        }
        let wait = backoff.next_wait();
        debug!(?wait, "backing off");
        tokio::time::sleep(wait).await;
    }
}

/// One connection of the node stream, until it ends or fails.
async fn once(state: &NodeState, client: &Client, backoff: &mut Backoff) -> anyhow::Result<()> {
    let since = {
        let v = state.lock();
        v.synced.then_some(v.objects.revision)
    };
    let resp = client.watch(since).await?;
    info!(?since, "node stream connected");
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    // The server pings every 15 s; three silent periods mean a dead connection (a server that
    // stops or restarts closes the connection, which is noticed at once).
    let silence = Duration::from_secs(45);
    loop {
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let line = &line[..line.len() - 1];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let msg = parse_message(line).map_err(|e| anyhow::anyhow!("node stream: {e}"))?;
            state.set_connected(true);
            match &msg {
                Message::Snapshot { revision, .. } => info!(revision, "snapshot received"),
                Message::Resume {
                    since,
                    revision,
                    put,
                    delete,
                } => info!(
                    since,
                    revision,
                    put = put.len(),
                    delete = delete.len(),
                    "node stream resumed"
                ),
                Message::Update { revision, .. } => debug!(revision, "update received"),
                Message::Ping { .. } => {}
            }
            if matches!(state.apply(msg), Applied::Snapshot | Applied::Resume) {
                backoff.reset();
            }
        }
        if buf.len() > 64 << 20 {
            anyhow::bail!("node stream: a line longer than 64 MiB");
        }
        match tokio::time::timeout(silence, stream.next()).await {
            Err(_) => anyhow::bail!("node stream silent for {silence:?}"),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => anyhow::bail!("node stream: {}", e.without_url()),
            Ok(Some(Ok(chunk))) => buf.extend_from_slice(&chunk),
        }
    }
}
