//! What /proc says about a process: whether it lives, its command line, its network
//! namespace, the sockets it listens on; and a pidfd to await its exit.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// When `pid` started, in clock ticks since boot (`/proc/<pid>/stat` field 22): with the pid
/// it names one process for good, since a reused pid gets a later start time.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name start with the state (field 3); start time is field 22.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The argument vector `pid` was started with.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// Whether `pid` lives in the network namespace at `netns` (the caller's when `None`).
pub fn in_netns(pid: u32, netns: Option<&Path>) -> bool {
    let ours = match netns {
        Some(p) => fs::metadata(p),
        None => fs::metadata("/proc/self/ns/net"),
    };
    match (ours, fs::metadata(format!("/proc/{pid}/ns/net"))) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The socket inodes `pid` holds open.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy();
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// Whether `pid` has a socket of `proto` (`udp` or `tcp`) bound to local `port` (listening,
/// for TCP). Asks its own sockets (copies, see [`sockets`]): reading the namespace's
/// `/proc/net/udp` instead walks every slot of the kernel's UDP table, whatever the number
/// of sockets, and a concentrator polls this for every dnsmasq it starts. Without the right
/// to copy them, the table it is.
pub fn listening(pid: u32, proto: &str, port: u16) -> bool {
    let Ok(sockets) = sockets(pid) else {
        return listening_in_table(pid, proto, port);
    };
    let (kind, protocol) = match proto {
        "udp" => (libc::SOCK_DGRAM, libc::IPPROTO_UDP),
        "tcp" => (libc::SOCK_STREAM, libc::IPPROTO_TCP),
        _ => return false,
    };
    sockets.iter().any(|s| {
        let option = |name| int_option(s, libc::SOL_SOCKET, name).ok();
        let bound =
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(s.as_raw_fd())
                .ok()
                .and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|a| a.port())
                        .or_else(|| a.as_sockaddr_in6().map(|a| a.port()))
                });
        option(libc::SO_TYPE) == Some(kind)
            && option(libc::SO_PROTOCOL) == Some(protocol)
            && (kind != libc::SOCK_STREAM || option(libc::SO_ACCEPTCONN) == Some(1))
            && bound == Some(port)
    })
}

/// [`listening`] from the namespace's socket table.
fn listening_in_table(pid: u32, proto: &str, port: u16) -> bool {
    let mine = socket_inodes(pid);
    if mine.is_empty() {
        return false;
    }
    ["", "6"].iter().any(|v6| {
        let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/{proto}{v6}")) else {
            return false;
        };
        table.lines().skip(1).any(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                return false;
            };
            let port_ok = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            let state_ok = proto != "tcp" || *state == "0A";
            port_ok && state_ok && inode.parse().is_ok_and(|i: u64| mine.contains(&i))
        })
    })
}

/// Copies, in this process, of the sockets `pid` holds open (`pidfd_getfd`): the same
/// sockets, to ask about or to change. Root, or the right to ptrace `pid`, is needed.
pub fn sockets(pid: u32) -> io::Result<Vec<OwnedFd>> {
    let pidfd = pidfd(pid)?;
    let mut out = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let is_socket = fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: pidfd_getfd takes two descriptors and flags and returns a new one or -1.
        let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if copy < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBADF) {
                continue; // closed since the listing
            }
            return Err(e);
        }
        // SAFETY: the descriptor was just made for us and is owned by nobody else.
        out.push(unsafe { OwnedFd::from_raw_fd(copy as RawFd) });
    }
    Ok(out)
}

/// An integer socket option.
pub(crate) fn int_option(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes to a pointer valid for that many.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A pidfd for `pid`: readable once the process has exited (Linux ≥ 5.3).
pub fn pidfd(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned to us and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_in_its_namespace() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(in_netns(me, None));
        assert!(!cmdline(me).unwrap().is_empty());
        assert!(!alive(u32::MAX / 2));
        assert!(pidfd(me).is_ok());
    }

    #[test]
    fn a_bound_udp_socket_is_seen() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        let me = std::process::id();
        assert!(listening(me, "udp", port));
        assert!(!listening(me, "tcp", port));
        assert!(listening_in_table(me, "udp", port));
    }

    #[test]
    fn a_listening_tcp_socket_is_seen_and_a_connected_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let me = std::process::id();
        assert!(listening(me, "tcp", port));
        assert!(!listening(me, "udp", port));
        assert!(!listening(me, "tcp", client.local_addr().unwrap().port()));
        assert!(listening_in_table(me, "tcp", port));
    }
}
