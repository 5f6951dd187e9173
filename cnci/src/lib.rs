//! Concentrator dataplane (ciao's CNCI, for one tenant): remote subnets over tunnels from the
//! compute nodes, a bridge holding each subnet's gateway, dnsmasq per subnet handing out the
//! addresses of the tenant's workload endpoints, and crash-safe rebuild. Built on
//! `tenet::net` (links, ownership, tunnels) and `tenet::process` (dnsmasq's supervision).

pub mod agent;
pub mod concentrator;
pub mod config;
pub mod dnsmasq;
pub mod edge;
pub mod endpoints;
pub mod error;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod names;
pub mod rebuild;
pub mod show;
mod sync;
mod sysctls;

pub use concentrator::{Attached, Concentrator, Detached, MeshChange, SubnetInfo};
pub use config::{CnciConfig, DhcpOptions, RemoteSubnet, TENANT_LABEL};
pub use error::CnciError;
#[cfg(feature = "fault-injection")]
pub use fault::{FaultHook, FaultPoint};
pub use rebuild::{RebuildReport, Repair};
