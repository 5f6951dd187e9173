//! Tenant-subnet tunnels behind one trait: kernel gretap, the eBPF GRE datapath, the
//! user-space GRE datapath and kernel VXLAN. Every backend produces a link that can be enslaved to a bridge, and records
//! the tunnel's identity in the link alias so that it can be found again after a restart.

pub mod ebpf;
mod kernel;
pub mod userspace;
mod vxlan;

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use tracing::info;

pub use ebpf::EbpfGre;
pub use kernel::{KernelGre, gretap_link, kernel_supports_gretap};
pub use userspace::UserspaceGre;
pub use vxlan::Vxlan;

use super::alias::Alias;
use super::link::{Link, LinkUpdate, Netlink};
use super::{Leftovers, NetError, NetResult};
use crate::types::TunnelKey;

/// Bytes GRE-with-key over IPv4 adds around an Ethernet frame: outer IPv4 (20) + GRE with
/// key (8) + inner Ethernet (14).
pub const GRE_OVERHEAD: u32 = 42;
/// VXLAN: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;
pub const VXLAN_PORT: u16 = 4789;

/// One point-to-point tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TunnelSpec {
    /// Interface name (at most 15 bytes).
    pub name: String,
    pub key: TunnelKey,
    /// This host's underlay address.
    pub local: Ipv4Addr,
    /// The peer's underlay address.
    pub remote: Ipv4Addr,
    /// Tenant MTU; `None` derives it from the MTU of the link holding `local`.
    pub mtu: Option<u32>,
    /// Outer TTL; `None` inherits the inner IPv4 TTL / IPv6 hop limit (gretap's default).
    pub ttl: Option<u8>,
}

impl TunnelSpec {
    pub fn new(name: impl Into<String>, key: TunnelKey, local: Ipv4Addr, remote: Ipv4Addr) -> Self {
        TunnelSpec {
            name: name.into(),
            key,
            local,
            remote,
            mtu: None,
            ttl: None,
        }
    }

    fn object(&self) -> String {
        format!("tunnel {} (key {} to {})", self.name, self.key, self.remote)
    }

    fn validate(&self) -> NetResult<()> {
        let bad = |why: &str| Err(NetError::invalid("create", self.object(), why));
        if self.local.is_unspecified() || self.remote.is_unspecified() {
            return bad("local and remote underlay addresses are required");
        }
        if self.local == self.remote {
            return bad("local and remote are the same address");
        }
        if self.local.is_multicast() || self.remote.is_multicast() {
            return bad("multicast underlay addresses are not supported");
        }
        if let Some(m) = self.mtu
            && !(68..=65535).contains(&m)
        {
            return bad("MTU must be between 68 and 65535");
        }
        if self.ttl == Some(0) {
            return bad("a fixed TTL must be between 1 and 255 (leave it unset to inherit)");
        }
        Ok(())
    }

    /// The alias that records this tunnel on its link.
    fn alias(&self, kind: TunnelKind) -> String {
        let alias = Alias::new("tunnel")
            .with("type", kind)
            .with("key", self.key)
            .with("local", self.local)
            .with("remote", self.remote);
        match self.ttl {
            Some(ttl) => alias.with("ttl", ttl),
            None => alias,
        }
        .to_string()
    }

    /// The tunnel recorded in a link's alias, if the alias is a tenet tunnel alias.
    pub fn from_link(link: &Link) -> Option<(TunnelKind, TunnelSpec)> {
        let alias = Alias::parse(link.alias.as_deref()?)?;
        if alias.kind != "tunnel" {
            return None;
        }
        let kind = alias.get("type")?.parse().ok()?;
        let spec = TunnelSpec {
            name: link.name.clone(),
            key: TunnelKey::new(alias.get("key")?.parse().ok()?)?,
            local: alias.get("local")?.parse().ok()?,
            remote: alias.get("remote")?.parse().ok()?,
            mtu: Some(link.mtu),
            ttl: match alias.get("ttl") {
                Some(t) => Some(t.parse().ok()?),
                None => None,
            },
        };
        Some((kind, spec))
    }
}

/// The four datapaths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelKind {
    KernelGre,
    EbpfGre,
    UserspaceGre,
    Vxlan,
}

impl fmt::Display for TunnelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TunnelKind::KernelGre => "gretap",
            TunnelKind::EbpfGre => "ebpfgre",
            TunnelKind::UserspaceGre => "usergre",
            TunnelKind::Vxlan => "vxlan",
        })
    }
}

impl FromStr for TunnelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gretap" => Ok(TunnelKind::KernelGre),
            "ebpfgre" => Ok(TunnelKind::EbpfGre),
            "usergre" => Ok(TunnelKind::UserspaceGre),
            "vxlan" => Ok(TunnelKind::Vxlan),
            other => Err(format!("unknown tunnel type {other:?}")),
        }
    }
}

/// The outer TTL an operator chose: `inherit` (the inner packet's, gretap's default) or a
/// fixed 1-255.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TunnelTtl(pub Option<u8>);

impl FromStr for TunnelTtl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "inherit" {
            return Ok(TunnelTtl(None));
        }
        match s.parse::<u8>() {
            Ok(t) if t > 0 => Ok(TunnelTtl(Some(t))),
            _ => Err(format!(
                "invalid tunnel TTL {s:?}; expected inherit or a number from 1 to 255"
            )),
        }
    }
}

impl fmt::Display for TunnelTtl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(t) => write!(f, "{t}"),
            None => f.write_str("inherit"),
        }
    }
}

/// The operator's choice of backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// Kernel gretap where the kernel has it, else the eBPF datapath, else user space.
    #[default]
    Auto,
    Kernel,
    Ebpf,
    Userspace,
    Vxlan,
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "kernel" => Ok(BackendChoice::Kernel),
            "ebpf" => Ok(BackendChoice::Ebpf),
            "userspace" => Ok(BackendChoice::Userspace),
            "vxlan" => Ok(BackendChoice::Vxlan),
            other => Err(format!(
                "unknown tunnel backend {other:?}; expected auto, kernel, ebpf, userspace or vxlan"
            )),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Kernel => "kernel",
            BackendChoice::Ebpf => "ebpf",
            BackendChoice::Userspace => "userspace",
            BackendChoice::Vxlan => "vxlan",
        })
    }
}

/// A way of making tunnels in one network namespace.
#[async_trait]
pub trait TunnelBackend: Send + Sync {
    fn kind(&self) -> TunnelKind;

    /// Bytes of encapsulation, for deriving the tenant MTU.
    fn overhead(&self) -> u32;

    /// Creates the tunnel link (up, alias set, MTU set) and returns it. Idempotent: an
    /// existing link with the same name and identity is returned as is; one with the same
    /// name but another identity is an error and is left untouched.
    async fn create(&self, spec: &TunnelSpec) -> NetResult<Link>;

    /// Deletes the tunnel link; a tunnel that does not exist is not an error.
    async fn delete(&self, name: &str) -> NetResult<()>;

    /// Tunnels of this backend found in the kernel (by alias).
    async fn tunnels(&self) -> NetResult<Vec<(TunnelSpec, Link)>>;

    /// Drops what the backend holds for tunnel `name` without touching its link, because the
    /// caller deletes the link itself (in a batch). Kernel tunnels hold nothing.
    fn forget(&self, _name: &str) {}

    /// The datapath's own counters, where tenet runs the datapath (kernel tunnels keep
    /// theirs on the link).
    fn stats(&self) -> Option<userspace::EngineStats> {
        None
    }
}

/// Builds the backend for `choice` in the namespace `netlink` is bound to (`netns` is the
/// same namespace's file, needed by the user-space datapath for its socket and taps).
pub async fn backend(
    choice: BackendChoice,
    netlink: Netlink,
    netns: Option<PathBuf>,
) -> NetResult<Arc<dyn TunnelBackend>> {
    let kind = match choice {
        BackendChoice::Kernel => TunnelKind::KernelGre,
        BackendChoice::Ebpf => TunnelKind::EbpfGre,
        BackendChoice::Userspace => TunnelKind::UserspaceGre,
        BackendChoice::Vxlan => TunnelKind::Vxlan,
        BackendChoice::Auto => {
            if kernel_supports_gretap(&netlink).await? {
                TunnelKind::KernelGre
            } else if ebpf_supported() {
                TunnelKind::EbpfGre
            } else {
                TunnelKind::UserspaceGre
            }
        }
    };
    info!(%choice, backend = %kind, "tunnel backend selected");
    Ok(match kind {
        TunnelKind::KernelGre => Arc::new(KernelGre::new(netlink)),
        TunnelKind::Vxlan => Arc::new(Vxlan::new(netlink)),
        TunnelKind::EbpfGre => Arc::new(EbpfGre::start(netlink, netns).await?),
        TunnelKind::UserspaceGre => Arc::new(UserspaceGre::start(netlink, netns).await?),
    })
}

/// The tenant MTU for a tunnel: the spec's, or the MTU of the underlay link that holds
/// `local` minus `overhead` (1500 is assumed when no link holds it).
async fn tenant_mtu(netlink: &Netlink, spec: &TunnelSpec, overhead: u32) -> NetResult<u32> {
    if let Some(m) = spec.mtu {
        return Ok(m);
    }
    let underlay = match netlink.link_of_address(spec.local.into()).await? {
        Some(index) => netlink.link_by_index(index).await?.map_or(1500, |l| l.mtu),
        None => 1500,
    };
    Ok(underlay.saturating_sub(overhead).max(68))
}

/// Shared by the backends: if `spec.name` exists, returns it when it records the same
/// tunnel, an error when it is something else.
async fn existing(
    netlink: &Netlink,
    kind: TunnelKind,
    spec: &TunnelSpec,
) -> NetResult<Option<Link>> {
    let Some(link) = netlink.link_by_name(&spec.name).await? else {
        return Ok(None);
    };
    match TunnelSpec::from_link(&link) {
        Some((k, found))
            if k == kind
                && found.key == spec.key
                && found.local == spec.local
                && found.remote == spec.remote =>
        {
            Ok(Some(link))
        }
        _ => Err(NetError::new(
            "create",
            spec.object(),
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "link {} already exists and is not this tunnel (alias {:?})",
                    link.name, link.alias
                ),
            ),
        )),
    }
}

/// Finishes a freshly created tunnel link: MTU, alias and up in one request, after the
/// link-local address is ruled out (a tunnel is a bridge port: no address of its own; see
/// `disable_link_local`). On failure the link is deleted, so nothing is left half made.
async fn finish(
    netlink: &Netlink,
    kind: TunnelKind,
    spec: &TunnelSpec,
    index: u32,
    mtu: u32,
) -> NetResult<Link> {
    let res = async {
        netlink.disable_link_local(index).await?;
        let update = LinkUpdate {
            mtu: Some(mtu),
            alias: Some(spec.alias(kind)),
            up: true,
            ..LinkUpdate::default()
        };
        netlink.update(index, &update).await?;
        netlink
            .link_by_index(index)
            .await?
            .ok_or_else(|| NetError::not_found("create", spec.object()))
    }
    .await;
    match res {
        Ok(link) => Ok(link),
        Err(e) => {
            let mut left = Leftovers::new();
            left.note(netlink.delete(index).await);
            left.log(&spec.object());
            Err(e.with_leftovers(left))
        }
    }
}

async fn tunnels_of(netlink: &Netlink, kind: TunnelKind) -> NetResult<Vec<(TunnelSpec, Link)>> {
    Ok(netlink
        .links_with_alias_prefix(super::alias::ALIAS_PREFIX)
        .await?
        .into_iter()
        .filter_map(|l| {
            let (k, spec) = TunnelSpec::from_link(&l)?;
            (k == kind).then_some((spec, l))
        })
        .collect())
}

async fn delete_named(netlink: &Netlink, name: &str) -> NetResult<()> {
    match netlink.link_by_name(name).await? {
        Some(l) => match netlink.delete(l.index).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        },
        None => Ok(()),
    }
}

static GRETAP_SUPPORTED: OnceLock<bool> = OnceLock::new();
static EBPF_SUPPORTED: OnceLock<bool> = OnceLock::new();

/// Whether the eBPF datapath can run here: built in, and its programs pass this kernel's
/// verifier (probed once per process by loading them).
pub fn ebpf_supported() -> bool {
    *EBPF_SUPPORTED.get_or_init(|| match ebpf::probe() {
        Ok(()) => {
            info!("probed the eBPF GRE datapath: it loads");
            true
        }
        Err(e) => {
            info!(error = %e, "eBPF GRE datapath unavailable");
            false
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_ciao_rule() {
        let k = TunnelKey::from_subnet(&"172.16.0.0/16".parse().unwrap()).unwrap();
        assert_eq!(k.get(), 4268);
        assert!(TunnelKey::from_subnet(&"0.0.0.0/8".parse().unwrap()).is_err());
        assert_eq!(TunnelKey::new(0), None);
    }

    #[test]
    fn backend_choice_parses() {
        for s in ["auto", "kernel", "ebpf", "userspace", "vxlan"] {
            assert_eq!(s.parse::<BackendChoice>().unwrap().to_string(), s);
        }
        assert!(
            "gre"
                .parse::<BackendChoice>()
                .unwrap_err()
                .contains("auto, kernel")
        );
    }

    #[test]
    fn tunnel_ttl_parses() {
        assert_eq!("inherit".parse(), Ok(TunnelTtl(None)));
        assert_eq!("17".parse(), Ok(TunnelTtl(Some(17))));
        for bad in ["0", "256", "-1", "x"] {
            let err = bad.parse::<TunnelTtl>().unwrap_err();
            assert!(err.contains("inherit or a number from 1 to 255"), "{err}");
        }
        assert_eq!(TunnelTtl(Some(9)).to_string(), "9");
    }

    #[test]
    fn spec_validation() {
        let k = TunnelKey::new(5).unwrap();
        let a: Ipv4Addr = "10.0.0.1".parse().unwrap();
        assert!(TunnelSpec::new("t", k, a, a).validate().is_err());
        assert!(
            TunnelSpec::new("t", k, Ipv4Addr::UNSPECIFIED, a)
                .validate()
                .is_err()
        );
        let mut s = TunnelSpec::new("t", k, a, "10.0.0.2".parse().unwrap());
        assert!(s.validate().is_ok());
        s.mtu = Some(20);
        assert!(s.validate().is_err());
    }
}
