//! ciao's SSNTP protocol. So far: the wire format — Go `encoding/gob` streams carrying
//! `ConnectFrame`, `ConnectedFrame` and `Frame` — decoded from untrusted input and encoded to
//! the bytes Go writes. TLS roles, client, server and the scheduler are still to come.

pub mod frame;
pub mod gob;

pub use frame::{
    ConnectFrame, ConnectedFrame, Encoder, Frame, FrameTrace, GoTime, Header, Message, Node,
    StreamDecoder, Uuid,
};
pub use gob::GobError;
