//! BGP for routed mode: the model read from etcd ([`model`]), the BIRD configuration rendered
//! from it ([`bird`], the confd role), BIRD's control socket ([`control`]) and the speaker that
//! keeps one host's BIRD running and in step with etcd ([`speaker`]).
//!
//! BIRD 2 (Debian `bird2`), not 1.6: 1.6 is the end-of-life branch upstream and needs two
//! daemons (`bird`, `bird6`) and two configurations; BIRD 2 carries both families in one
//! daemon, one file and one control socket, and is the branch that gets fixes.

pub mod bird;
pub mod control;
pub mod model;
pub mod speaker;

use std::path::PathBuf;

pub use bird::{BirdOptions, PeerType, protocol_name, render};
pub use control::{BirdControl, BirdProtocol};
pub use model::{BgpModel, HostBgp};
pub use speaker::{BgpSpeaker, SpeakerConfig, register_host};

use crate::process::ProcessError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BgpError {
    #[error(
        "host {host} has no IPv4 address under /calico/bgp/v1/host/{host}/ip_addr_v4: BIRD needs one as its router id"
    )]
    NoRouterId { host: String },
    #[error("BIRD rejected the rendered configuration {}: {message}", .path.display())]
    ConfigRejected { path: PathBuf, message: String },
    #[error("BIRD control socket {}: {source}", .path.display())]
    Control {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("BIRD control socket {}: {message}", .path.display())]
    ControlProtocol { path: PathBuf, message: String },
    #[error("BIRD refused `{command}`: {message}")]
    Bird { command: String, message: String },
    #[error("{what} {}: {source}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Process(#[from] ProcessError),
}
