//! Taking a running daemon off the kernel's multicast notifications.
//!
//! dnsmasq subscribes its netlink socket to the IPv4/IPv6 address and route groups whatever
//! its configuration (2.90: groups 5, 7, 9 and 11), to notice new interfaces and to resend a
//! DNS query when a route appears. A concentrator runs one dnsmasq per subnet, all in one
//! namespace, so each new subnet's gateway address and routes became a message the kernel
//! cloned to every dnsmasq, and a wake-up of each, under RTNL: the N-th attach cost O(N).
//! Measured here: 200 bridges with an address took 0.05 s beside no dnsmasq and 3.0 s
//! beside 400 (1.1 s with IPv6 off). A dnsmasq told its interface (`bind-interfaces`), with
//! no DHCPv6, router advertisements or resolv file, needs none of those messages.
//!
//! [`leave_multicast_groups`] takes them away from outside, without patching the daemon: a
//! descriptor copied from another process (`pidfd_getfd`) is the same socket, and
//! `NETLINK_DROP_MEMBERSHIP` on the copy unsubscribes the daemon's own. The daemon keeps its
//! socket for its own requests (dumping addresses), which are unicast replies.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::procfs;

/// Takes every route-netlink socket of process `pid` out of all its multicast groups;
/// returns how many memberships it dropped (0 when the process has no subscribed socket).
/// Root, or the right to ptrace `pid`, is needed to copy its descriptors.
pub fn leave_multicast_groups(pid: u32) -> io::Result<usize> {
    let mut dropped = 0;
    for socket in route_sockets(pid)? {
        for group in memberships(&socket)? {
            // SAFETY: setsockopt reads an int from a pointer valid for its size.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_NETLINK,
                    libc::NETLINK_DROP_MEMBERSHIP,
                    (&group as *const u32).cast(),
                    std::mem::size_of::<u32>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// The multicast groups (numbered from 1) the route-netlink sockets of `pid` belong to.
pub fn multicast_groups(pid: u32) -> io::Result<Vec<u32>> {
    let mut groups = Vec::new();
    for socket in route_sockets(pid)? {
        groups.extend(memberships(&socket)?);
    }
    groups.sort_unstable();
    groups.dedup();
    Ok(groups)
}

/// Copies of the route-netlink sockets of `pid`.
fn route_sockets(pid: u32) -> io::Result<Vec<OwnedFd>> {
    let mut out = Vec::new();
    for socket in procfs::sockets(pid)? {
        if procfs::int_option(&socket, libc::SOL_SOCKET, libc::SO_DOMAIN)? == libc::AF_NETLINK
            && procfs::int_option(&socket, libc::SOL_SOCKET, libc::SO_PROTOCOL)?
                == libc::NETLINK_ROUTE
        {
            out.push(socket);
        }
    }
    Ok(out)
}

/// The multicast groups a netlink socket belongs to (numbered from 1).
fn memberships(fd: &OwnedFd) -> io::Result<Vec<u32>> {
    // A bitmap, 32 groups per word; rtnetlink has fewer than 64.
    let mut words = [0u32; 4];
    let mut len = std::mem::size_of_val(&words) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes to a pointer valid for that many.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_LIST_MEMBERSHIPS,
            words.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let filled = (len as usize / 4).min(words.len());
    Ok(words[..filled]
        .iter()
        .enumerate()
        .flat_map(|(w, bits)| {
            (0..32)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| (w * 32 + b) as u32 + 1)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// `ip monitor route` subscribes to the route groups; afterwards it belongs to none, and a
    /// second pass finds nothing to drop.
    #[test]
    fn a_listening_process_leaves_its_groups() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root (pidfd_getfd)");
            return;
        }
        let mut monitor = std::process::Command::new("ip")
            .args(["monitor", "route"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("ip (iproute2)");
        let pid = monitor.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        let groups = loop {
            let groups = multicast_groups(pid).unwrap_or_default();
            if !groups.is_empty() || Instant::now() > deadline {
                break groups;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let left = leave_multicast_groups(pid);
        let after = multicast_groups(pid);
        let again = leave_multicast_groups(pid);
        let _ = monitor.kill();
        let _ = monitor.wait();
        // IPv4 and IPv6 routes (7, 11) at least.
        assert!(groups.contains(&7) && groups.contains(&11), "{groups:?}");
        assert_eq!(left.unwrap(), groups.len());
        assert_eq!(after.unwrap(), Vec::<u32>::new());
        assert_eq!(again.unwrap(), 0);
    }
}
