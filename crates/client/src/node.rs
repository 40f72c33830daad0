//! The node API (`/isthmus/v1/nodes/{host}/...`), as the node `host`.

use crate::{Client, Error, Result, Url};
use isthmus_wire::node::{Heartbeat, HeartbeatBody, PortBody, PortCreate, PortReport};
use serde_json::Value;

pub struct NodeApi<'a> {
    client: &'a Client,
    host: String,
}

impl<'a> NodeApi<'a> {
    pub(crate) fn new(client: &'a Client, host: &str) -> Self {
        NodeApi {
            client,
            host: host.to_string(),
        }
    }

    /// Registers or heartbeats this node.
    pub async fn heartbeat(&self, node: Heartbeat) -> Result<()> {
        let body = HeartbeatBody { node };
        let path = format!("/isthmus/v1/nodes/{}", self.host);
        self.client
            .call(reqwest::Method::PUT, Url::Network(&path), Some(&body))
            .await
            .map(|_| ())
    }

    /// Binds a port to this node and/or reports its status and binding. Returns the port.
    pub async fn report_port(&self, port_id: &str, port: &PortReport) -> Result<Value> {
        let path = format!("/isthmus/v1/nodes/{}/ports/{port_id}", self.host);
        let mut v = self
            .client
            .call(reqwest::Method::PUT, Url::Network(&path), Some(&PortBody { port }))
            .await?;
        Ok(v["port"].take())
    }

    /// Creates a port bound to this node in `port.project`'s `port.network`. Returns the port.
    pub async fn create_port(&self, port: &PortCreate) -> Result<Value> {
        let path = format!("/isthmus/v1/nodes/{}/ports", self.host);
        let mut v = self
            .client
            .call(reqwest::Method::POST, Url::Network(&path), Some(&PortBody { port }))
            .await?;
        Ok(v["port"].take())
    }

    /// Deletes a port bound to this node; one already gone counts as deleted.
    pub async fn delete_port(&self, port_id: &str) -> Result<()> {
        let path = format!("/isthmus/v1/nodes/{}/ports/{port_id}", self.host);
        match self
            .client
            .call(reqwest::Method::DELETE, Url::Network(&path), Some(&Value::Null))
            .await
        {
            Err(e) if e.status() == Some(404) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Opens the node stream (NDJSON), resuming after revision `since` when given. No overall
    /// timeout: the caller watches for pings.
    pub async fn watch(&self, since: Option<i64>) -> Result<reqwest::Response> {
        let q = since.map(|r| format!("?since={r}")).unwrap_or_default();
        let path = format!("/isthmus/v1/nodes/{}/watch{q}", self.host);
        let resp = self
            .client
            .send(reqwest::Method::GET, Url::Network(&path), None::<&()>, None)
            .await?;
        let status = resp.status().as_u16();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            return Err(Error::Status { status, body });
        }
        Ok(resp)
    }
}
