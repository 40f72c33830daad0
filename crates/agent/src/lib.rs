//! The node agent's core: what the datapath of a node must look like, as a pure function of the
//! node's view of the topology, and the smallest set of changes that gets a node there.
//!
//! The side-effecting parts build on this: [`kernel`] reads and changes the node's datapath
//! (netlink), [`reconcile`] drives it to the desired state.
//!
//! The running agent (`isthmus agent`): [`client`] talks to the server (identity, heartbeats,
//! port binding and status, the node stream), [`objects`] keeps the node's slice of the
//! topology and turns it into a [`view::NodeView`] (pure), [`runtime`] ties it together
//! (reconcile on every change and periodically, never tearing down because the server is
//! gone), [`socket`] is the local attach API on a unix socket, and [`cni`] is the agent's half of
//! the CNI plugin (attachments as ports, port pools).

pub mod attach;
pub mod client;
pub mod cni;
pub mod controller;
pub mod desired;
pub mod kernel;
pub mod l3;
pub mod metrics;
pub mod names;
pub mod objects;
pub mod plan;
pub mod qos;
pub mod reconcile;
pub mod routing;
pub mod runtime;
pub mod security;
pub mod shaping;
pub mod socket;
pub mod state;
pub mod stream;
pub mod trunk;
pub mod view;
