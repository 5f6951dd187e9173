//! `tenet-cni`: a CNI plugin (spec 1.0.0, and 0.3.x/0.4.0 for older runtimes) that puts a
//! container on a tenet network through the compute node's local API, so the container's
//! address (tenet's IPAM, handle = container id + interface), VNIC, Calico endpoint and tunnel
//! come about exactly as for a workload started over SSNTP.
//!
//! * [`conf`]: the network configuration and the runtime's environment, checked;
//! * [`result`]: the result JSON in the version the runtime asked for;
//! * [`error`]: CNI error objects with the spec's codes;
//! * [`check`]: CHECK, the container's interface, addresses and routes against `prevResult`;
//! * [`plugin`]: ADD, DEL, CHECK and VERSION.

pub mod check;
pub mod conf;
pub mod error;
pub mod plugin;
pub mod result;

pub use conf::{Command, Mode, NetConf, RuntimeEnv};
pub use error::CniError;
pub use result::CniResult;

/// The versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The version it answers VERSION with.
pub const CURRENT_VERSION: &str = "1.0.0";
