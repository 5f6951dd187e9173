//! Fault injection: named points in create and destroy where a test can stop the process, to
//! prove that [`crate::ComputeNode::rebuild`] copes with whatever a crash there leaves behind.
//! Production configs carry no hook, and a point is then a no-op.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Where a create or destroy is when the hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// The bridge exists; it has no alias and no tunnel yet.
    BridgeCreated,
    /// The tunnel exists but is not on the bridge.
    TunnelCreated,
    /// The tunnel is on the bridge; the bridge has no alias yet.
    TunnelEnslaved,
    /// The bridge carries its alias: the subnet is complete, with no VNIC yet.
    SubnetReady,
    /// The VNIC's link exists (on the bridge for a veth); it has no alias yet.
    VnicLinkCreated,
    /// The VNIC carries its alias: complete, but the caller has not been told.
    VnicReady,
    /// A destroy has deleted the VNICs but not yet the subnets they emptied.
    VnicsDeleted,
}

impl FaultPoint {
    pub const ALL: [FaultPoint; 7] = [
        FaultPoint::BridgeCreated,
        FaultPoint::TunnelCreated,
        FaultPoint::TunnelEnslaved,
        FaultPoint::SubnetReady,
        FaultPoint::VnicLinkCreated,
        FaultPoint::VnicReady,
        FaultPoint::VnicsDeleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultPoint::BridgeCreated => "bridge-created",
            FaultPoint::TunnelCreated => "tunnel-created",
            FaultPoint::TunnelEnslaved => "tunnel-enslaved",
            FaultPoint::SubnetReady => "subnet-ready",
            FaultPoint::VnicLinkCreated => "vnic-link-created",
            FaultPoint::VnicReady => "vnic-ready",
            FaultPoint::VnicsDeleted => "vnics-deleted",
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

/// Called at every [`FaultPoint`] a call passes.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for p in FaultPoint::ALL {
            assert_eq!(p.as_str().parse::<FaultPoint>().unwrap(), p);
        }
        assert!("nowhere".parse::<FaultPoint>().is_err());
    }
}
