//! Isthmus's resource model: what is stored, how it is validated and how IPs and MACs are
//! chosen. Pure logic only; nothing here touches the store, the network or the clock.

pub mod error;
pub mod ipam;
pub mod keys;
pub mod prefixes;
pub mod resources;
pub mod validate;

pub use error::NeutronError;
pub use resources::*;
