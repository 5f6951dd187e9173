//! Tap devices through /dev/net/tun (the kernel refuses to make taps over netlink).

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{NetError, NetResult, link::MAX_IFNAME, netns};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    IfReqFlags
);
nix::ioctl_write_int!(tunsetpersist, b'T', 203);

/// How to open a tap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapOptions {
    /// Queues (file descriptors) to open; more than one sets IFF_MULTI_QUEUE, so each queue
    /// can be served by its own thread or handed to a VMM.
    pub queues: usize,
    /// Prefix every frame with a `virtio_net_hdr` (what QEMU expects from a vhost tap).
    pub vnet_hdr: bool,
    /// Open the descriptors non-blocking.
    pub nonblocking: bool,
}

impl Default for TapOptions {
    fn default() -> Self {
        TapOptions {
            queues: 1,
            vnet_hdr: false,
            nonblocking: true,
        }
    }
}

/// Creates the persistent tap `name`, or attaches to it if it already exists with the same
/// flags, and returns one descriptor per queue. The device outlives the descriptors (and the
/// process): delete it with [`super::Netlink::delete`].
pub fn open_tap(name: &str, opts: TapOptions) -> NetResult<Vec<OwnedFd>> {
    let object = format!("tap {name}");
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(NetError::invalid(
            "open",
            object,
            format!("interface name must be 1 to {MAX_IFNAME} bytes"),
        ));
    }
    if opts.queues == 0 || opts.queues > 256 {
        return Err(NetError::invalid(
            "open",
            object,
            format!("{} queues requested; 1 to 256 are possible", opts.queues),
        ));
    }
    let mut flags = IFF_TAP | IFF_NO_PI;
    if opts.queues > 1 {
        flags |= IFF_MULTI_QUEUE;
    }
    if opts.vnet_hdr {
        flags |= IFF_VNET_HDR;
    }
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let mut fds = Vec::with_capacity(opts.queues);
    for _ in 0..opts.queues {
        let mut oo = OpenOptions::new();
        oo.read(true).write(true);
        if opts.nonblocking {
            oo.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
        }
        let file = oo
            .open("/dev/net/tun")
            .map_err(|e| NetError::new("open", &object, e))?;
        // SAFETY: `req` is a valid ifreq-shaped struct that outlives the call.
        unsafe { tunsetiff(file.as_raw_fd(), &req) }
            .map_err(|e| NetError::new("open", &object, std::io::Error::from(e)))?;
        fds.push(OwnedFd::from(file));
    }
    // SAFETY: plain integer ioctl on a descriptor we own.
    unsafe { tunsetpersist(fds[0].as_raw_fd(), 1) }
        .map_err(|e| NetError::new("make persistent", &object, std::io::Error::from(e)))?;
    Ok(fds)
}

/// [`open_tap`] inside the namespace at `netns` (the tap is created there).
pub fn open_tap_in(netns: Option<&Path>, name: &str, opts: TapOptions) -> NetResult<Vec<OwnedFd>> {
    let name = name.to_string();
    netns::run_in(netns, move || open_tap(&name, opts))
}

/// Offloads a tap may hand to its reader (TUNSETOFFLOAD): checksum and TCPv4 segmentation.
pub const TUN_F_CSUM: libc::c_uint = 0x01;
pub const TUN_F_TSO4: libc::c_uint = 0x02;

nix::ioctl_write_int!(tunsetoffload, b'T', 208);

/// Lets the kernel pass CHECKSUM_PARTIAL frames and TCP super-frames to the tap's reader,
/// which must then complete and segment them. Needs a tap opened with `vnet_hdr`.
pub fn set_offload(tap: std::os::fd::BorrowedFd<'_>, offloads: libc::c_uint) -> NetResult<()> {
    // SAFETY: integer ioctl on a descriptor the caller keeps open.
    unsafe { tunsetoffload(tap.as_raw_fd(), offloads as libc::c_ulong) }
        .map(drop)
        .map_err(|e| NetError::new("set offloads of", "tap", std::io::Error::from(e)))
}
