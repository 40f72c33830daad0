//! The nested API (`/isthmus/v1/nested/...`): what the CNI plugin inside a VM asks of the
//! control plane for the containers it runs, authenticated by a credential scoped to one trunk.
//!
//! - `PUT /isthmus/v1/nested/attachments/{container_id}/{ifname}` with [`AttachmentRequest`]:
//!   creates the container's port (idempotent: the same container and interface get the same
//!   port back) and answers [`Attachment`];
//! - `GET` on the same path: the attachment, or 404;
//! - `DELETE` on the same path: releases the subport or address pair and deletes the port; 204,
//!   also when there is nothing to delete.
//!
//! The credential travels in the [`CREDENTIAL_HEADER`] header as `<id>.<secret>`. Credentials
//! are managed by the trunk's project with a Keystone token:
//! `POST/GET /isthmus/v1/trunks/{trunk_id}/credentials`, `DELETE .../credentials/{id}`; the
//! secret is returned once, by the POST ([`TrunkCredential`]).

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Header carrying `<credential id>.<secret>`.
pub const CREDENTIAL_HEADER: &str = "X-Isthmus-Trunk-Credential";

/// How the container's traffic rides the VM's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NestedMode {
    /// A subport of the VM's trunk; the container's interface is an 802.1Q device on the VM's
    /// NIC with the subport's VLAN id.
    Vlan,
    /// A port whose MAC and IPs become an allowed address pair of the VM's port; the
    /// container's interface is a macvlan device on the VM's NIC.
    Macvlan,
}

/// `{"attachment": AttachmentRequest}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRequest {
    pub mode: NestedMode,
    /// The network the container joins (the trunk's project's own, or shared with it).
    pub network_id: String,
}

/// `{"attachment": Attachment}`: everything the plugin needs to configure the interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub port_id: String,
    pub network_id: String,
    pub mode: NestedMode,
    pub mac_address: String,
    /// The VLAN id on the VM's interface (`vlan` mode only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// The network's MTU.
    pub mtu: u32,
    pub addresses: Vec<AttachmentAddress>,
    /// The subnets' host routes.
    #[serde(default)]
    pub routes: Vec<AttachmentRoute>,
    #[serde(default)]
    pub dns_nameservers: Vec<String>,
}

/// One fixed IP with its subnet's prefix length and gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentAddress {
    pub ip_address: IpAddr,
    pub prefix_len: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRoute {
    /// CIDR.
    pub destination: String,
    pub nexthop: IpAddr,
}

/// `{"credential": TrunkCredential}`: `secret` only in the answer to the POST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrunkCredential {
    pub id: String,
    pub trunk_id: String,
    pub project_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default)]
    pub created_at: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip() {
        let a: AttachmentRequest =
            serde_json::from_str(r#"{"mode":"vlan","network_id":"n1"}"#).expect("request parses");
        assert_eq!(a.mode, NestedMode::Vlan);
        let bad = serde_json::from_str::<AttachmentRequest>(r#"{"mode":"vxlan","network_id":"n1"}"#);
        assert!(bad.is_err());
    }
}
