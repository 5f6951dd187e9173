//! IP pools and Calico's IPAM v2 data: blocks, handles, affinities, config (§1.8–1.9).

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::scalar::null_as_default;

/// `/calico/v1/ipam/v{4,6}/pool/<cidrkey>`. Go writes every field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "IpPoolWire")]
pub struct IpPool {
    pub cidr: IpNetwork,
    /// Tunnel device (`tunl0`) when IPIP is on, else empty. Python-era values omit it.
    #[serde(default)]
    pub ipip: String,
    /// `""`, `always` or `cross-subnet`.
    #[serde(default)]
    pub ipip_mode: String,
    /// API `nat-outgoing`.
    #[serde(default)]
    pub masquerade: bool,
    #[serde(default)]
    pub ipam: bool,
    #[serde(default)]
    pub disabled: bool,
}

/// Python-era pools carry neither `ipip` nor `ipam`; such a pool is used by IPAM unless
/// disabled, which is what Go writes back (`ipam = !disabled`).
#[derive(Deserialize)]
struct IpPoolWire {
    cidr: IpNetwork,
    #[serde(default)]
    ipip: String,
    #[serde(default)]
    ipip_mode: String,
    #[serde(default)]
    masquerade: bool,
    #[serde(default)]
    ipam: Option<bool>,
    #[serde(default)]
    disabled: bool,
}

impl From<IpPoolWire> for IpPool {
    fn from(w: IpPoolWire) -> Self {
        IpPool {
            cidr: w.cidr,
            ipip: w.ipip,
            ipip_mode: w.ipip_mode,
            masquerade: w.masquerade,
            ipam: w.ipam.unwrap_or(!w.disabled),
            disabled: w.disabled,
        }
    }
}

/// `/calico/ipam/v2/config`. Both fields are omitted when false; a missing key means
/// strict affinity off and automatic block allocation on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamConfig {
    #[serde(default, skip_serializing_if = "is_false")]
    pub strict_affinity: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub auto_allocate_blocks: bool,
}

impl Default for IpamConfig {
    fn default() -> Self {
        IpamConfig {
            strict_affinity: false,
            auto_allocate_blocks: true,
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `/calico/ipam/v2/assignment/ipv{4,6}/block/<cidrkey>`, in Go's field order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AllocationBlockWire")]
pub struct AllocationBlock {
    pub cidr: IpNetwork,
    /// `host:<hostname>`, or `null` for a block no host owns.
    pub affinity: Option<String>,
    #[serde(rename = "strictAffinity")]
    pub strict_affinity: bool,
    /// One entry per address: `null` when free, else an index into `attributes`.
    pub allocations: Vec<Option<usize>>,
    /// Free ordinals; allocation takes from the front, release appends to the back.
    pub unallocated: Vec<usize>,
    pub attributes: Vec<AllocationAttribute>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationAttribute {
    /// The Python docs called it `primary`.
    #[serde(default, alias = "primary")]
    pub handle_id: Option<String>,
    #[serde(default)]
    pub secondary: Option<BTreeMap<String, String>>,
}

/// Everything a stored block may look like: Go's shape, the deprecated `hostAffinity`, and
/// Python-era blocks without `unallocated` or `strictAffinity`.
#[derive(Deserialize)]
struct AllocationBlockWire {
    cidr: IpNetwork,
    #[serde(default)]
    affinity: Option<String>,
    #[serde(default, rename = "hostAffinity")]
    host_affinity: Option<String>,
    #[serde(default, rename = "strictAffinity")]
    strict_affinity: bool,
    allocations: Vec<Option<usize>>,
    #[serde(default)]
    unallocated: Option<Vec<usize>>,
    #[serde(default, deserialize_with = "null_as_default")]
    attributes: Vec<AllocationAttribute>,
}

/// The largest block tenet will read (a /16 worth of addresses); blocks Calico writes hold 64.
pub const MAX_BLOCK_ADDRESSES: usize = 65536;

impl TryFrom<AllocationBlockWire> for AllocationBlock {
    type Error = String;

    fn try_from(w: AllocationBlockWire) -> Result<Self, String> {
        let size = block_size(&w.cidr)?;
        if w.allocations.len() != size {
            return Err(format!(
                "block {} has {} allocation entries, want {size}",
                w.cidr,
                w.allocations.len()
            ));
        }
        for (ordinal, attr) in w.allocations.iter().enumerate() {
            if let Some(a) = attr
                && *a >= w.attributes.len()
            {
                return Err(format!(
                    "allocation {ordinal} points at attribute {a}, but there are only {}",
                    w.attributes.len()
                ));
            }
        }
        // Go 1.7.3 treats a block without `unallocated` as full; rebuild it from the
        // allocations instead so legacy blocks keep allocating.
        let unallocated = match w.unallocated {
            Some(u) => {
                let mut seen = vec![false; size];
                for &o in &u {
                    if o >= size || std::mem::replace(&mut seen[o], true) {
                        return Err(format!(
                            "unallocated ordinal {o} is out of range or repeated"
                        ));
                    }
                }
                u
            }
            None => (0..size).filter(|&o| w.allocations[o].is_none()).collect(),
        };
        let affinity = w
            .affinity
            .or_else(|| w.host_affinity.map(|h| format!("host:{h}")));
        Ok(AllocationBlock {
            cidr: w.cidr,
            affinity,
            strict_affinity: w.strict_affinity,
            allocations: w.allocations,
            unallocated,
            attributes: w.attributes,
        })
    }
}

fn block_size(cidr: &IpNetwork) -> Result<usize, String> {
    let bits = if cidr.is_ipv4() { 32 } else { 128 };
    let host_bits = bits - u32::from(cidr.prefix());
    if host_bits > 16 {
        return Err(format!(
            "block {cidr} is larger than tenet reads ({MAX_BLOCK_ADDRESSES} addresses)"
        ));
    }
    Ok(1usize << host_bits)
}

impl AllocationBlock {
    /// The host this block is affine to, if any (`host:<h>`).
    pub fn affine_host(&self) -> Option<&str> {
        self.affinity.as_deref()?.strip_prefix("host:")
    }

    /// Inconsistencies between `allocations` and `unallocated` (a free ordinal listed as
    /// allocated, or neither); an empty list means the block is coherent.
    pub fn problems(&self) -> Vec<String> {
        let mut listed_free = vec![false; self.allocations.len()];
        for &o in &self.unallocated {
            listed_free[o] = true;
        }
        let mut out = Vec::new();
        for (o, (alloc, free)) in self.allocations.iter().zip(listed_free).enumerate() {
            match (alloc, free) {
                (Some(_), true) => out.push(format!("ordinal {o} is both allocated and free")),
                (None, false) => out.push(format!("ordinal {o} is neither allocated nor free")),
                _ => {}
            }
        }
        out
    }
}

/// `/calico/ipam/v2/handle/<id>`: block CIDR → number of the handle's addresses in it.
/// Python wrote an `id` field as well; it is accepted and not written back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamHandle {
    #[serde(default, deserialize_with = "null_as_default")]
    pub block: BTreeMap<String, u64>,
}
