//! The node agent's core: what the datapath of a node must look like, as a pure function of the
//! node's view of the topology, and the smallest set of changes that gets a node there.
//!
//! The side-effecting parts build on this: [`kernel`] reads and changes the node's datapath
//! (netlink), [`reconcile`] drives it to the desired state.

pub mod desired;
pub mod kernel;
pub mod names;
pub mod plan;
pub mod reconcile;
pub mod view;
