//! The agent's side of the node API, over [`isthmus_client`]: the node user's password auth
//! (project scope; renewed when the token is refused), heartbeats, port binding and status
//! reports, node port create/delete, the node stream.

pub use isthmus_client::{network_endpoint, Error as ApiError};
use isthmus_client::{Auth, Config, NodeApi};
use isthmus_wire::node::{Heartbeat, PortCreate, PortReport};
use serde_json::Value;

#[derive(Clone)]
pub struct Credentials {
    /// The user: named as the node, with role `node` on `project`.
    pub user: String,
    /// Never logged.
    pub password: String,
    pub project: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("project", &self.project)
            .finish()
    }
}

#[derive(Debug)]
pub struct Client {
    inner: isthmus_client::Client,
    node: String,
}

impl Client {
    /// `network_url` empty: taken from the identity catalog (the network service's internal,
    /// else public endpoint). `ca_file`: the CA bundle that verifies an https server.
    pub fn new(
        network_url: &str,
        auth_url: &str,
        node: &str,
        creds: Credentials,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Client, ApiError> {
        let config = Config::new(auth_url, Auth::password(&creds.user, &creds.password, &creds.project))
            .network_url(network_url)
            .interface("internal")
            .ca_file(ca_file);
        Ok(Client {
            inner: isthmus_client::Client::new(config)?,
            node: node.to_string(),
        })
    }

    fn api(&self) -> NodeApi<'_> {
        self.inner.node(&self.node)
    }

    /// Registers or heartbeats this node.
    pub async fn heartbeat(&self, node: Heartbeat) -> Result<(), ApiError> {
        self.api().heartbeat(node).await
    }

    /// Binds a port to this node and/or reports its status and binding. Returns the port.
    pub async fn report_port(&self, port_id: &str, port: &PortReport) -> Result<Value, ApiError> {
        self.api().report_port(port_id, port).await
    }

    /// Creates a port bound to this node in `port.project`'s `port.network`. Returns the port.
    pub async fn create_port(&self, port: &PortCreate) -> Result<Value, ApiError> {
        self.api().create_port(port).await
    }

    /// Deletes a port bound to this node; one already gone counts as deleted.
    pub async fn delete_port(&self, port_id: &str) -> Result<(), ApiError> {
        self.api().delete_port(port_id).await
    }

    /// Opens the node stream (NDJSON), resuming after revision `since` when given.
    pub async fn watch(&self, since: Option<i64>) -> Result<reqwest::Response, ApiError> {
        self.api().watch(since).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_never_in_debug_output() {
        let creds = Credentials {
            user: "n".into(),
            password: "hunter2-secret".into(),
            project: "service".into(),
        };
        assert!(!format!("{creds:?}").contains("hunter2"));
    }
}
