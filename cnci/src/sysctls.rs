//! The namespace-wide settings a concentrator changes, each remembered in the run directory
//! before it is changed (`<run_dir>/sysctl/<key>` holds the old value), so that `reset`
//! restores them even after a crash:
//!
//! * `net.ipv4.ip_forward = 1`: NAT out, floating IPs and VXLAN subnets route;
//! * `net.bridge.bridge-nf-call-iptables = 0`: with br_netfilter loaded, frames the tenant
//!   bridges carry would pass iptables a second time, which breaks hairpin NAT (a workload
//!   reaching another through a port forward). The concentrator polices nothing at the
//!   bridge level; compute nodes do.
//!
//! Those two when the concentrator routes (edge, mesh, VXLAN subnets); this one with its first
//! subnet:
//!
//! * `net.ipv6.conf.default.disable_ipv6 = 1`: the interfaces it makes from then on (bridges,
//!   tunnel ports) get no IPv6. Tenant subnets are IPv4, and every IPv6 route the kernel
//!   would add for them (ff00::/8 on each bridge and port) is a message to each subnet's
//!   dnsmasq, which always listens to the route groups: with hundreds of subnets that woke
//!   every dnsmasq for each new one, and took more CPU than attaching the subnets did.
//!   Interfaces that exist already (uplink, compute) keep theirs.

use std::path::PathBuf;

use tenet::net::sysctl;
use tracing::info;

use crate::concentrator::Inner;
use crate::error::CnciError;

const FOR_ROUTING: [(&str, &str); 2] = [
    ("net.ipv4.ip_forward", "1"),
    ("net.bridge.bridge-nf-call-iptables", "0"),
];

const FOR_SUBNETS: [(&str, &str); 1] = [("net.ipv6.conf.default.disable_ipv6", "1")];

fn memo_dir(inner: &Inner) -> PathBuf {
    inner.config.run_dir.join("sysctl")
}

/// Sets the settings a routing concentrator needs, remembering the old values. A setting
/// the kernel does not have (no br_netfilter) is skipped.
pub(crate) fn ensure(inner: &Inner) -> Result<(), CnciError> {
    apply(inner, &FOR_ROUTING, &inner.settings_ready)
}

/// Sets the settings a concentrator with subnets needs (before it makes the first one).
pub(crate) fn ensure_for_subnets(inner: &Inner) -> Result<(), CnciError> {
    apply(inner, &FOR_SUBNETS, &inner.subnet_settings_ready)
}

fn apply(
    inner: &Inner,
    wanted: &[(&str, &str)],
    ready: &std::sync::atomic::AtomicBool,
) -> Result<(), CnciError> {
    use std::sync::atomic::Ordering;
    if ready.load(Ordering::Acquire) {
        return Ok(());
    }
    let netns = inner.config.netns.as_deref();
    for &(key, value) in wanted {
        let Ok(current) = sysctl::read(netns, key) else {
            continue;
        };
        if current == value {
            continue;
        }
        let dir = memo_dir(inner);
        let memo = dir.join(key);
        if !memo.exists() {
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&memo, &current))
                .map_err(|e| CnciError::file("writing", &memo, e))?;
        }
        sysctl::write(netns, key, value)?;
        info!(key, was = %current, now = value, "namespace setting changed");
    }
    ready.store(true, Ordering::Release);
    Ok(())
}

/// Puts back every setting `ensure` and `ensure_for_subnets` changed.
pub(crate) fn restore(inner: &Inner) -> Result<(), CnciError> {
    for ready in [&inner.settings_ready, &inner.subnet_settings_ready] {
        ready.store(false, std::sync::atomic::Ordering::Release);
    }
    let dir = memo_dir(inner);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let key = entry.file_name().to_string_lossy().into_owned();
        let old = std::fs::read_to_string(entry.path())
            .map_err(|e| CnciError::file("reading", &entry.path(), e))?;
        sysctl::write(inner.config.netns.as_deref(), &key, old.trim())?;
        info!(key = %key, restored = %old.trim(), "namespace setting restored");
    }
    std::fs::remove_dir_all(&dir).map_err(|e| CnciError::file("removing", &dir, e))
}
