//! Link-layer primitives over rtnetlink (bridges, veths, taps, macvtaps, tunnels, addresses,
//! routes, neighbours) and the tunnel backends. Every operation is async (except tap
//! creation, which is an ioctl) and fails with a [`NetError`] naming the operation and object.

mod addr;
pub mod alias;
mod error;
mod fdb;
pub mod firewall;
pub mod garp;
mod link;
pub mod netns;
mod new_link;
pub mod owned;
pub mod routed;
pub mod sysctl;
pub mod tap;
pub mod tunnel;
pub mod underlay;

pub use addr::{Neighbour, Route};
pub use error::{Cause, Leftovers, NetError, NetResult};
pub use fdb::{FLOOD_MAC, FdbEntry};
pub use link::{Link, LinkUpdate, MAX_IFNAME, Netlink};
pub use new_link::{
    GretapParams, LinkKind, MacvtapMode, NewLink, VethPeer, VxlanParams, new_link_request,
};

pub(crate) fn nl_err(op: &'static str, object: impl Into<String>, e: rtnetlink::Error) -> NetError {
    let cause = match e {
        rtnetlink::Error::NetlinkError(m) => Cause::Os(m.to_io()),
        other => Cause::Protocol(other.to_string()),
    };
    NetError::new(op, object, cause)
}
