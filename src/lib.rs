//! tenet core: what the compute-node agent, the concentrator agent and the CLI share.
//!
//! One job per module, lowest layer first:
//!
//! * [`types`]: small values every layer shares (`MacAddr`, `TunnelKey`, the gateway rule).
//! * [`store`]: the datastore trait with etcd and in-memory backends, and how to find the
//!   datastore (`store::config`, calicoctl's conventions).
//! * [`net`]: link primitives over rtnetlink, link ownership (`net::owned`), the tunnel
//!   backends.
//! * [`process`]: running programs and supervising daemons (dnsmasq, BIRD, etcd).
//! * [`calico`]: Calico 2.x's etcd keyspace: key builders/parsers and value types.
//! * [`keyspace`]: tenet's own keys under `/tenet/v1/`.
//! * [`ipam`]: Calico block IPAM made atomic with etcd transactions.
//! * [`bgp`]: routed mode's BGP: the model from etcd, BIRD's configuration rendered from it
//!   (the confd role), BIRD's control socket, the per-host speaker.
//! * [`policy`]: Calico policy: selectors, the calculation engine, Felix's dataplane protocol,
//!   rendering into iptables chains and IP sets.
//! * [`dump`]: decoding any stored key for `tenet dump`.
//! * [`turns`]: async work that takes turns per key.
//! * `metrics` (feature `metrics`): the agents' /metrics, /healthz and /readyz endpoints.
//! * [`testbed`] (feature `testbed`): real etcd and network namespaces for tests,
//!   benchmarks and the lab.

pub mod bgp;
pub mod calico;
pub mod dump;
pub mod ipam;
pub mod keyspace;
#[cfg(feature = "logging")]
pub mod logging;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod net;
pub mod policy;
pub mod process;
pub mod store;
#[cfg(feature = "testbed")]
pub mod testbed;
pub mod turns;
pub mod types;
