//! The node agent's core: what the datapath of a node must look like, as a pure function of the
//! node's view of the topology, and the smallest set of changes that gets a node there.
//!
//! The side-effecting parts (watching the server, netlink, the attach socket) build on this.

pub mod desired;
pub mod names;
pub mod plan;
pub mod view;
