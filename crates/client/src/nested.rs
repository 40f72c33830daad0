//! The nested API (`/isthmus/v1/nested/...`) as the CNI plugin inside a VM uses it: one
//! trunk credential, no Keystone. See `isthmus_wire::nested`.

use crate::{send_with_retries, unreachable, with_ca, Error, Result};
use isthmus_wire::nested::{Attachment, AttachmentRequest, CREDENTIAL_HEADER};
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Where the nested API is and how to reach it.
#[derive(Clone)]
pub struct NestedConfig {
    /// The network API's URL (`https://host:9696`), no path.
    pub url: String,
    /// `<credential id>.<secret>`, as the trunk's project got it.
    pub credential: String,
    /// PEM CA bundle that alone verifies the server; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Per request, connection included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
}

impl NestedConfig {
    pub fn new(url: &str, credential: &str) -> NestedConfig {
        NestedConfig {
            url: url.trim_end_matches('/').to_string(),
            credential: credential.to_string(),
            ca_file: None,
            timeout: crate::CALL_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl std::fmt::Debug for NestedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedConfig")
            .field("url", &self.url)
            .field("credential", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// `{"attachment": ...}` both ways.
#[derive(Serialize, Deserialize)]
struct Wrapped<T> {
    attachment: T,
}

pub struct NestedClient {
    http: reqwest::Client,
    base: reqwest::Url,
    credential: HeaderValue,
}

impl std::fmt::Debug for NestedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedClient")
            .field("url", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl NestedClient {
    pub fn new(config: NestedConfig) -> Result<NestedClient> {
        let base = reqwest::Url::parse(&config.url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && !u.cannot_be_a_base())
            .ok_or_else(|| Error::Config(format!("'{}' is not an http(s) URL", config.url)))?;
        let well_formed = config
            .credential
            .split_once('.')
            .is_some_and(|(id, secret)| !id.is_empty() && !secret.is_empty());
        let mut credential = HeaderValue::from_str(config.credential.trim())
            .ok()
            .filter(|_| well_formed)
            .ok_or_else(|| Error::Config("the trunk credential is not of the form <id>.<secret>".into()))?;
        credential.set_sensitive(true);
        let http = with_ca(reqwest::Client::builder(), config.ca_file.as_deref())?
            .connect_timeout(config.connect_timeout)
            .timeout(config.timeout)
            .build()
            .map_err(|e| Error::Unreachable(format!("HTTP client: {e}")))?;
        Ok(NestedClient { http, base, credential })
    }

    fn url(&self, container_id: &str, ifname: &str) -> Result<reqwest::Url> {
        let mut u = self.base.clone();
        u.path_segments_mut()
            .map_err(|()| Error::Config("the URL cannot take a path".into()))?
            .pop_if_empty()
            .extend(["isthmus", "v1", "nested", "attachments", container_id, ifname]);
        Ok(u)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        container_id: &str,
        ifname: &str,
        body: Option<&AttachmentRequest>,
    ) -> Result<(u16, String)> {
        let mut req = self
            .http
            .request(method, self.url(container_id, ifname)?)
            .header(CREDENTIAL_HEADER, self.credential.clone());
        if let Some(b) = body {
            req = req.json(&Wrapped { attachment: b });
        }
        // Every call is idempotent (a PUT names its container and interface).
        let resp = send_with_retries(req, true).await?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(unreachable)?;
        Ok((status, text))
    }

    fn attachment(status: u16, text: &str) -> Result<Attachment> {
        if !(200..300).contains(&status) {
            return Err(failed(status, text));
        }
        serde_json::from_str::<Wrapped<Attachment>>(text)
            .map(|w| w.attachment)
            .map_err(|e| Error::Decode(format!("attachment: {e}")))
    }

    /// Creates (or finds again) the port of interface `ifname` of container `container_id`.
    pub async fn attach(&self, container_id: &str, ifname: &str, req: &AttachmentRequest) -> Result<Attachment> {
        let (status, text) = self.send(reqwest::Method::PUT, container_id, ifname, Some(req)).await?;
        Self::attachment(status, &text)
    }

    /// The attachment, or `None` if there is none.
    pub async fn get(&self, container_id: &str, ifname: &str) -> Result<Option<Attachment>> {
        let (status, text) = self.send(reqwest::Method::GET, container_id, ifname, None).await?;
        if status == 404 {
            return Ok(None);
        }
        Self::attachment(status, &text).map(Some)
    }

    /// Releases the attachment and deletes its port; nothing to release is fine.
    pub async fn release(&self, container_id: &str, ifname: &str) -> Result<()> {
        let (status, text) = self.send(reqwest::Method::DELETE, container_id, ifname, None).await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(failed(status, &text))
        }
    }
}

/// The server's answer as an error (its Neutron message in [`Error::api_message`]).
fn failed(status: u16, body: &str) -> Error {
    if status == 401 {
        Error::Auth {
            status,
            body: body.to_string(),
        }
    } else {
        Error::Status {
            status,
            body: body.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded_and_credentials_checked() {
        let c = NestedClient::new(NestedConfig::new("http://127.0.0.1:9/", "id.secret")).unwrap();
        assert_eq!(
            c.url("abc", "eth 0").unwrap().as_str(),
            "http://127.0.0.1:9/isthmus/v1/nested/attachments/abc/eth%200"
        );
        assert!(!format!("{c:?}").contains("secret"));
        for bad in ["nodot", ".secret", "id.", "id.sec\nret"] {
            let e = NestedClient::new(NestedConfig::new("http://127.0.0.1:9", bad)).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{bad}: {e}");
            assert!(!e.to_string().contains(bad), "{e}");
        }
        let e = NestedClient::new(NestedConfig::new("not a url", "id.secret")).unwrap_err();
        assert!(matches!(e, Error::Config(_)));
    }
}
