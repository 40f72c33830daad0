//! What the server, the node agent and the CNI plugin say to each other, defined once.
//!
//! - [`stream`]: the node stream (`GET /isthmus/v1/nodes/{host}/watch`), one NDJSON message per
//!   line, each object typed by its kind;
//! - [`node`]: the bodies of the node API (heartbeat, port report, node port create);
//! - [`nested`]: the nested API the CNI plugin inside a VM uses (trunk-scoped credential);
//! - [`socket`]: the agent's local socket, its requests and replies;
//! - [`cni_code`]: CNI error codes.
//!
//! serde and serde_json only: the CNI plugin links this and must stay small and quick to start.

pub mod cni_code;
pub mod nested;
pub mod node;
pub mod socket;
pub mod stream;

/// `null` read as the type's default (Neutron renders absent strings and lists either way).
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + serde::Deserialize<'de>,
{
    use serde::Deserialize;
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
