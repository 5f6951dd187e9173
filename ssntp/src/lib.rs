//! ciao's SSNTP protocol, compatible with ciao's Go components:
//!
//! * [`frame`] and [`gob`]: the wire format — Go `encoding/gob` streams carrying
//!   `ConnectFrame`, `ConnectedFrame` and `Frame` — decoded from untrusted input and encoded to
//!   the bytes Go writes;
//! * [`types`]: frame types, operands and roles with Go's constant values;
//! * [`payload`]: the YAML payloads of the networking messages; [`route`]: reading the one
//!   field the scheduler routes by without parsing the whole payload;
//! * [`tls`] and [`cert`]: mutual TLS (rustls, ring) with roles carried in certificates;
//! * [`client`], [`server`]: sessions over TLS; [`scheduler`]: ciao's forwarding rules.

pub mod cert;
pub mod client;
pub mod compat;
pub mod conn;
pub mod frame;
pub mod gob;
pub mod payload;
pub mod route;
pub mod scheduler;
pub mod server;
pub mod tls;
pub mod types;

pub use client::{Backoff, Client, ClientConfig, ClientError, ClientEvent, ServerInfo};
pub use frame::{
    ConnectFrame, ConnectedFrame, Encoder, Frame, FrameTrace, GoTime, Header, Message, Node,
    StreamDecoder,
};
pub use gob::GobError;
pub use server::{
    NoHandler, Peer, Route, Rules, Server, ServerConfig, ServerError, ServerHandle, ServerHandler,
};
pub use tls::{Identity, TlsError, TlsFiles};
pub use types::{Command, ErrorCode, Event, FrameType, Operation, Role, Status};
pub use uuid::Uuid;
