//! tenet core: what the compute-node agent, the concentrator agent and the CLI share.
//!
//! * [`store`]: the datastore trait with etcd and in-memory backends.
//! * [`calico`]: Calico 2.x's etcd keyspace: key builders/parsers and value types.
//! * [`testbed`]: real etcd and network namespaces for tests, benchmarks and the lab.

pub mod calico;
pub mod dump;
pub mod ipam;
pub mod net;
pub mod state;
pub mod store;
#[cfg(feature = "testbed")]
pub mod testbed;
pub mod types;
