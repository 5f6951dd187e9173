//! Fault injection (feature `fault-injection`): named points in an attach where a test can
//! stop the process, to prove that [`crate::Concentrator::rebuild`] copes with what a crash
//! there leaves behind.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Where an attach is when the hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// The subnet's bridge exists, without its gateway address or alias.
    BridgeCreated,
    /// dnsmasq runs; the bridge has no alias yet.
    DhcpStarted,
    /// The bridge carries its alias: the subnet is complete, with no tunnel yet.
    SubnetReady,
    /// The tunnel exists but is not on the bridge.
    TunnelCreated,
    /// The tunnel is on the bridge: the attach is complete, but the caller was not told.
    TunnelReady,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 5] = [
        FaultPoint::BridgeCreated,
        FaultPoint::DhcpStarted,
        FaultPoint::SubnetReady,
        FaultPoint::TunnelCreated,
        FaultPoint::TunnelReady,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultPoint::BridgeCreated => "bridge-created",
            FaultPoint::DhcpStarted => "dhcp-started",
            FaultPoint::SubnetReady => "subnet-ready",
            FaultPoint::TunnelCreated => "tunnel-created",
            FaultPoint::TunnelReady => "tunnel-ready",
        }
    }
}

impl fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FaultPoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FaultPoint::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown fault point {s:?}"))
    }
}

/// Called at every [`FaultPoint`] an attach passes.
#[derive(Clone)]
pub struct FaultHook(pub Arc<dyn Fn(FaultPoint) + Send + Sync>);

impl FaultHook {
    pub fn new(f: impl Fn(FaultPoint) + Send + Sync + 'static) -> Self {
        FaultHook(Arc::new(f))
    }
}

impl fmt::Debug for FaultHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultHook")
    }
}
