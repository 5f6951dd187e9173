//! Pure logic on one allocation block: which ordinal is which address, assigning from the
//! front of `unallocated`, releasing to its back, and keeping attributes de-duplicated.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

use crate::calico::{AllocationAttribute, AllocationBlock};

/// Addresses per block: Calico 2.x blocks are /26 (IPv4) and /122 (IPv6).
pub const BLOCK_SIZE: usize = 64;
pub const BLOCK_PREFIX_V4: u8 = 26;
pub const BLOCK_PREFIX_V6: u8 = 122;

pub fn block_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        BLOCK_PREFIX_V4
    } else {
        BLOCK_PREFIX_V6
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(value: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(value as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(value))
    }
}

/// The block an address belongs to.
pub fn block_of(ip: IpAddr) -> IpNetwork {
    let net = IpNetwork::new(ip, block_prefix(ip)).expect("block prefix is valid");
    IpNetwork::new(net.network(), net.prefix()).expect("network of a valid prefix")
}

/// The address at `ordinal` within `block`.
pub fn address(block: &IpNetwork, ordinal: usize) -> IpAddr {
    from_u128(to_u128(block.network()) + ordinal as u128, block.is_ipv4())
}

/// The ordinal of `ip` within its block.
pub fn ordinal(block: &IpNetwork, ip: IpAddr) -> usize {
    (to_u128(ip) - to_u128(block.network())) as usize
}

/// The `index`-th block of `pool` (blocks counted from the pool's base).
pub fn nth_block(pool: &IpNetwork, index: u128) -> IpNetwork {
    let base = to_u128(pool.network()) + index * BLOCK_SIZE as u128;
    IpNetwork::new(from_u128(base, pool.is_ipv4()), block_prefix(pool.ip())).expect("valid prefix")
}

/// How many blocks `pool` holds (0 if the pool is smaller than one block).
pub fn blocks_in(pool: &IpNetwork) -> u128 {
    let bits = if pool.is_ipv4() { 32 } else { 128 };
    let host_bits = bits - u32::from(pool.prefix());
    let block_bits = bits - u32::from(block_prefix(pool.ip()));
    if host_bits < block_bits {
        0
    } else {
        1u128
            .checked_shl(host_bits - block_bits)
            .unwrap_or(u128::MAX)
    }
}

/// A new block with every address free.
pub fn empty_block(cidr: IpNetwork, host: Option<&str>, strict_affinity: bool) -> AllocationBlock {
    AllocationBlock {
        cidr,
        affinity: host.map(|h| format!("host:{h}")),
        strict_affinity,
        allocations: vec![None; BLOCK_SIZE],
        unallocated: (0..BLOCK_SIZE).collect(),
        attributes: Vec::new(),
    }
}

/// What one allocation records about its owner.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub handle: Option<String>,
    pub attributes: BTreeMap<String, String>,
}

impl Owner {
    fn attribute(&self) -> AllocationAttribute {
        AllocationAttribute {
            handle_id: self.handle.clone(),
            secondary: (!self.attributes.is_empty()).then(|| self.attributes.clone()),
        }
    }
}

/// What releasing addresses did to a block.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    pub ordinals: Vec<usize>,
    /// Addresses released per handle (for the handles' counts).
    pub per_handle: BTreeMap<String, u64>,
    /// Requested ordinals that were not allocated.
    pub not_allocated: Vec<usize>,
}

impl AllocationBlock {
    pub fn is_empty(&self) -> bool {
        self.unallocated.len() == self.allocations.len()
    }

    pub fn free(&self) -> usize {
        self.unallocated.len()
    }

    /// True if `host` may allocate here: the block is ours, or nobody's and not strict
    /// (`check_affinity` = false allows borrowing from other hosts' non-strict blocks).
    pub fn allows(&self, host: &str, check_affinity: bool) -> bool {
        match self.affine_host() {
            Some(owner) if owner != host => !(check_affinity || self.strict_affinity),
            _ => true,
        }
    }

    fn attribute_index(&mut self, owner: &Owner) -> usize {
        let attr = owner.attribute();
        match self.attributes.iter().position(|a| *a == attr) {
            Some(i) => i,
            None => {
                self.attributes.push(attr);
                self.attributes.len() - 1
            }
        }
    }

    /// Takes up to `n` ordinals from the front of `unallocated`.
    pub fn assign(&mut self, n: usize, owner: &Owner) -> Vec<usize> {
        let n = n.min(self.unallocated.len());
        if n == 0 {
            return Vec::new();
        }
        let index = self.attribute_index(owner);
        let taken: Vec<usize> = self.unallocated.drain(..n).collect();
        for &o in &taken {
            self.allocations[o] = Some(index);
        }
        taken
    }

    /// Assigns one specific ordinal; false if it is already taken.
    pub fn assign_ordinal(&mut self, ordinal: usize, owner: &Owner) -> bool {
        let Some(pos) = self.unallocated.iter().position(|&o| o == ordinal) else {
            return false;
        };
        self.unallocated.remove(pos);
        let index = self.attribute_index(owner);
        self.allocations[ordinal] = Some(index);
        true
    }

    /// Releases the given ordinals (appending them to the back of `unallocated`).
    pub fn release(&mut self, ordinals: &[usize]) -> Released {
        let mut out = Released::default();
        for &o in ordinals {
            match self.allocations.get(o).copied().flatten() {
                Some(index) => {
                    if let Some(handle) =
                        self.attributes.get(index).and_then(|a| a.handle_id.clone())
                    {
                        *out.per_handle.entry(handle).or_default() += 1;
                    }
                    self.allocations[o] = None;
                    self.unallocated.push(o);
                    out.ordinals.push(o);
                }
                None => out.not_allocated.push(o),
            }
        }
        self.collect_attributes();
        out
    }

    /// Every ordinal allocated with `handle`.
    pub fn ordinals_of(&self, handle: &str) -> Vec<usize> {
        self.allocations
            .iter()
            .enumerate()
            .filter_map(|(o, a)| {
                let attr = self.attributes.get((*a)?)?;
                (attr.handle_id.as_deref() == Some(handle)).then_some(o)
            })
            .collect()
    }

    /// Addresses per handle, counted from the allocations (the truth a handle must match).
    pub fn handle_counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for index in self.allocations.iter().flatten() {
            if let Some(h) = self
                .attributes
                .get(*index)
                .and_then(|a| a.handle_id.clone())
            {
                *counts.entry(h).or_default() += 1;
            }
        }
        counts
    }

    /// Drops attributes no allocation refers to and renumbers the rest.
    fn collect_attributes(&mut self) {
        let mut used = vec![false; self.attributes.len()];
        for index in self.allocations.iter().flatten() {
            used[*index] = true;
        }
        if used.iter().all(|u| *u) {
            return;
        }
        let mut renumber = vec![0; self.attributes.len()];
        let mut kept = Vec::new();
        for (i, attr) in std::mem::take(&mut self.attributes).into_iter().enumerate() {
            if used[i] {
                renumber[i] = kept.len();
                kept.push(attr);
            }
        }
        self.attributes = kept;
        for index in self.allocations.iter_mut().flatten() {
            *index = renumber[*index];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(h: &str) -> Owner {
        Owner {
            handle: Some(h.into()),
            attributes: BTreeMap::new(),
        }
    }

    #[test]
    fn addresses_and_ordinals() {
        let ip: IpAddr = "10.10.3.77".parse().unwrap();
        let b = block_of(ip);
        assert_eq!(b.to_string(), "10.10.3.64/26");
        assert_eq!(ordinal(&b, ip), 13);
        assert_eq!(address(&b, 13), ip);
        let v6: IpAddr = "fd00::1:5".parse().unwrap();
        assert_eq!(block_of(v6).to_string(), "fd00::1:0/122");
        let pool: IpNetwork = "10.10.0.0/16".parse().unwrap();
        assert_eq!(blocks_in(&pool), 1024);
        assert_eq!(nth_block(&pool, 1023).to_string(), "10.10.255.192/26");
        assert_eq!(blocks_in(&"10.0.0.0/27".parse().unwrap()), 0);
        assert_eq!(blocks_in(&"fd00::/64".parse().unwrap()), 1u128 << 58);
    }

    #[test]
    fn assign_from_front_release_to_back_and_renumber() {
        let mut b = empty_block("10.0.0.0/26".parse().unwrap(), Some("n1"), false);
        assert_eq!(b.assign(2, &owner("a")), [0, 1]);
        assert_eq!(b.assign(1, &owner("b")), [2]);
        assert_eq!(b.assign(1, &owner("a")), [3], "attribute reused");
        assert_eq!(b.attributes.len(), 2);
        let r = b.release(&[0, 1, 3, 9]);
        assert_eq!(r.ordinals, [0, 1, 3]);
        assert_eq!(r.not_allocated, [9]);
        assert_eq!(r.per_handle.get("a"), Some(&3));
        // Attribute "a" is gone; "b" moved to index 0.
        assert_eq!(b.attributes.len(), 1);
        assert_eq!(b.allocations[2], Some(0));
        assert_eq!(
            b.unallocated.last(),
            Some(&3),
            "freed ordinals go to the back"
        );
        assert_eq!(b.assign(1, &owner("c")), [4]);
        assert!(b.problems().is_empty());
        assert_eq!(b.handle_counts().get("b"), Some(&1));
    }

    #[test]
    fn affinity_rules() {
        let mut b = empty_block("10.0.0.0/26".parse().unwrap(), Some("n1"), false);
        assert!(b.allows("n1", true));
        assert!(!b.allows("n2", true));
        assert!(b.allows("n2", false), "borrowing from a non-strict block");
        b.strict_affinity = true;
        assert!(!b.allows("n2", false));
        b.affinity = None;
        assert!(b.allows("n2", true));
    }
}
