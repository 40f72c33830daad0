//! CNI error codes (SPEC.md "Error"): 0-99 are well-known, 100 and up are this plugin's.

pub const INCOMPATIBLE_VERSION: u32 = 1;
/// The container or attachment is unknown.
pub const UNKNOWN_CONTAINER: u32 = 3;
/// CNI_NETNS (or another variable) is not what it must be.
pub const INVALID_ENV: u32 = 4;
pub const IO_FAILURE: u32 = 5;
pub const DECODE_FAILURE: u32 = 6;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;
pub const NOT_AVAILABLE: u32 = 50;
/// The attachment does not look as recorded (CHECK).
pub const CHECK_FAILED: u32 = 100;
/// The interface could not be set up (it exists already, ...); also the plugin's code for an
/// agent failure without a code of its own, so 101 means one thing whoever chose it.
pub const ATTACH_FAILED: u32 = 101;
