//! Compute-node dataplane: tenant VNICs (VM taps, container veths, concentrator macvtaps), one
//! bridge and one tunnel per tenant subnet, and the tunnel and container-network events the
//! agent turns into SSNTP messages and runtime calls. Built on `tenet::net`.

pub mod agent;
pub mod cni;
pub mod config;
pub mod discovery;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod names;
pub mod node;
pub mod rebuild;
pub mod routed;

pub use config::{ContainerNetns, VnicConfig, VnicRole};
pub use discovery::{Underlay, UnderlayAddr, UnderlayConfig};
pub use error::CnError;
#[cfg(feature = "fault-injection")]
pub use fault::{FaultHook, FaultPoint};
pub use node::{
    CnConfig, ComputeNode, ContainerEvent, ContainerNetwork, CreatedVnic, DestroyedVnic,
    SubnetBinding, TunnelEvent, TunnelEventKind, Vnic,
};
pub use rebuild::{RebuildReport, Repair};
pub use routed::{RoutedNode, RoutedVnic, RoutedVnicConfig};
