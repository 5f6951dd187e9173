//! Network sysctls of one namespace: `/proc/sys/net/…` as a thread inside that namespace
//! sees it (each network namespace has its own). Keys are written dotted
//! (`net.ipv4.ip_forward`, `net.ipv4.conf.<ifname>.proxy_arp_pvlan`).

use std::path::{Path, PathBuf};

use super::netns::run_in;
use super::{NetError, NetResult};

fn path_of(key: &str) -> NetResult<PathBuf> {
    if !key.starts_with("net.") || key.contains("..") || key.contains('/') {
        return Err(NetError::invalid("sysctl", key, "not a network sysctl key"));
    }
    Ok(Path::new("/proc/sys").join(key.replace('.', "/")))
}

/// The value of `key` in the namespace at `netns` (the caller's when `None`).
pub fn read(netns: Option<&Path>, key: &str) -> NetResult<String> {
    let path = path_of(key)?;
    let key = key.to_string();
    run_in(netns, move || {
        std::fs::read_to_string(&path)
            .map(|v| v.trim().to_string())
            .map_err(|e| NetError::new("read sysctl", key, e))
    })
}

/// Sets `key` to `value` in the namespace at `netns`.
pub fn write(netns: Option<&Path>, key: &str, value: &str) -> NetResult<()> {
    let path = path_of(key)?;
    let (key, value) = (key.to_string(), value.to_string());
    run_in(netns, move || {
        std::fs::write(&path, &value).map_err(|e| NetError::new("write sysctl", key, e))
    })
}

/// Sets several keys in one visit to the namespace, in order; stops at the first failure.
pub fn write_all<K: AsRef<str>>(netns: Option<&Path>, pairs: &[(K, &str)]) -> NetResult<()> {
    let mut writes = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        writes.push((
            key.as_ref().to_string(),
            path_of(key.as_ref())?,
            value.to_string(),
        ));
    }
    run_in(netns, move || {
        for (key, path, value) in writes {
            std::fs::write(&path, &value).map_err(|e| NetError::new("write sysctl", key, e))?;
        }
        Ok(())
    })
}

/// Sets `key` to `value`; returns the value it had if that was different (so the caller
/// can restore it), `None` if nothing changed.
pub fn set(netns: Option<&Path>, key: &str, value: &str) -> NetResult<Option<String>> {
    let old = read(netns, key)?;
    if old == value {
        return Ok(None);
    }
    write(netns, key, value)?;
    Ok(Some(old))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_network_keys_are_accepted() {
        assert!(path_of("kernel.hostname").is_err());
        assert!(path_of("net.ipv4.conf.eth0/../x").is_err());
        assert_eq!(
            path_of("net.ipv4.ip_forward").unwrap(),
            Path::new("/proc/sys/net/ipv4/ip_forward")
        );
        assert_eq!(read(None, "net.ipv4.ip_forward").unwrap().len(), 1);
    }
}
