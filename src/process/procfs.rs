//! What /proc says about a process: whether it lives, its command line, its network
//! namespace, the sockets it listens on; and a pidfd to await its exit.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
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
/// for TCP), in its own namespace's table.
pub fn listening(pid: u32, proto: &str, port: u16) -> bool {
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
        assert!(listening(std::process::id(), "udp", port));
        assert!(!listening(std::process::id(), "tcp", port));
    }
}
