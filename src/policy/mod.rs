//! Calico policy, computed as Felix does and rendered into tenet's firewall.
//!
//! * [`selector`]: the selector grammar, its canonical form and IP-set ids.
//! * [`proto`]: Felix's dataplane-driver messages and their framing.
//! * [`calc`]: the incremental calculation engine: endpoints, profiles and policies in,
//!   Felix's dataplane messages out (pure).
//! * [`render`]: dataplane state → Calico-named chains and IP sets (pure).
//! * [`dataplane`]: the driver that keeps that state from the messages and applies it.
//! * [`driver`]: the same driver behind Felix's external-driver pipes (fd 3 and 4).
//! * [`validate`]: what the dataplane accepts from its messages.
//! * [`sync`]: etcd → engine → driver → kernel for one host (Felix, in-process).

pub mod calc;
pub mod dataplane;
pub mod driver;
pub mod proto;
pub mod render;
pub mod selector;
pub mod sync;
pub mod validate;
