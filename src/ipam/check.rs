//! `ipam check`: compares blocks, handles, affinity keys and workload endpoints, and
//! repairs what does not agree. The blocks are the truth for what is allocated; workload
//! endpoints are the truth for what is in use.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::cache::parse_block;
use super::{Ipam, IpamResult, address, affinity_key, block_key, handle_key, json};
use crate::calico::{
    CalicoKey, CalicoValue, HOSTS, IPAM_BLOCKS_V4, IPAM_BLOCKS_V6, IPAM_HANDLES, IPAM_HOSTS,
    IpamHandle, decode,
};
use crate::store::{Compare, Revision, StoreError, StoreResult, Txn, TxnOp};

/// One disagreement found by [`Ipam::check`].
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Finding {
    /// Allocated with a handle, but no workload endpoint uses the address. `host` is the
    /// host its block is affine to (the one whose agent allocated it, as a rule).
    LeakedAddress {
        ip: IpAddr,
        handle: String,
        host: Option<String>,
    },
    /// A handle's count for a block differs from the addresses the block holds for it.
    HandleOutOfStep {
        handle: String,
        block: String,
        recorded: u64,
        actual: u64,
    },
    /// An affinity key whose block is missing or affine to someone else.
    AffinityWithoutBlock { host: String, block: IpNetwork },
    /// A block affine to a host that has no affinity key for it.
    BlockWithoutAffinity { host: String, block: IpNetwork },
    /// A key whose value does not decode.
    Unreadable { key: String, reason: String },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::LeakedAddress { ip, handle, .. } => {
                write!(
                    f,
                    "leaked address {ip} (handle {handle}, no workload endpoint uses it)"
                )
            }
            Finding::HandleOutOfStep {
                handle,
                block,
                recorded,
                actual,
            } => write!(
                f,
                "handle {handle} records {recorded} address(es) in block {block}, the block holds {actual}"
            ),
            Finding::AffinityWithoutBlock { host, block } => {
                write!(
                    f,
                    "affinity of host {host} to block {block}, which is missing or not affine to it"
                )
            }
            Finding::BlockWithoutAffinity { host, block } => {
                write!(
                    f,
                    "block {block} is affine to host {host}, which has no affinity key for it"
                )
            }
            Finding::Unreadable { key, reason } => write!(f, "unreadable key {key}: {reason}"),
        }
    }
}

/// What a check found (and, after a repair, what remains).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub blocks: usize,
    pub handles: usize,
    pub allocated: usize,
    pub findings: Vec<Finding>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Everything the check reads, at roughly one moment.
struct Snapshot {
    /// Block → (value, revision).
    blocks: BTreeMap<IpNetwork, (crate::calico::AllocationBlock, Revision)>,
    handles: BTreeMap<String, (IpamHandle, Revision)>,
    affinities: BTreeMap<(String, IpNetwork), Revision>,
    in_use: BTreeSet<IpAddr>,
    unreadable: Vec<Finding>,
}

impl Ipam {
    async fn snapshot(&self) -> IpamResult<Snapshot> {
        let tenant = match &self.scope {
            super::IpamScope::Calico => None,
            super::IpamScope::Tenant(t) => Some(t),
        };
        let mut snap = Snapshot {
            blocks: BTreeMap::new(),
            handles: BTreeMap::new(),
            affinities: BTreeMap::new(),
            in_use: BTreeSet::new(),
            unreadable: Vec::new(),
        };
        for prefix in [IPAM_BLOCKS_V4, IPAM_BLOCKS_V6] {
            for kv in self
                .store
                .list(&self.scope.scoped(prefix.into()))
                .await?
                .kvs
            {
                match parse_block(&kv) {
                    Ok(seen) => {
                        snap.blocks
                            .insert(seen.block.cidr, (seen.block, seen.revision));
                    }
                    Err(e) => snap.unreadable.push(Finding::Unreadable {
                        key: kv.key,
                        reason: e.to_string(),
                    }),
                }
            }
        }
        let handles = self.scope.scoped(IPAM_HANDLES.into());
        for kv in self.store.list(&handles).await?.kvs {
            let id = kv.key[handles.len()..].to_string();
            match serde_json::from_slice::<IpamHandle>(&kv.value) {
                Ok(h) => {
                    snap.handles.insert(id, (h, kv.mod_revision));
                }
                Err(e) => snap.unreadable.push(Finding::Unreadable {
                    key: kv.key,
                    reason: e.to_string(),
                }),
            }
        }
        for kv in self
            .store
            .list(&self.scope.scoped(IPAM_HOSTS.into()))
            .await?
            .kvs
        {
            if let Ok(CalicoKey::BlockAffinity { host, cidr }) =
                CalicoKey::parse(&super::as_calico_path(&kv.key))
            {
                snap.affinities.insert((host, cidr), kv.mod_revision);
            }
        }
        for kv in self.store.list(HOSTS).await?.kvs {
            let Ok(key @ CalicoKey::WorkloadEndpoint(_)) = CalicoKey::parse(&kv.key) else {
                continue;
            };
            match decode(&key, &kv.value) {
                // A tenant's addresses are used by that tenant's endpoints only: tenants
                // overlap, so another tenant's endpoint at the same address proves nothing.
                Ok(CalicoValue::WorkloadEndpoint(wep))
                    if tenant.is_none_or(|t| {
                        wep.labels.get(crate::calico::vnic::TENANT_LABEL) == Some(t)
                    }) =>
                {
                    snap.in_use
                        .extend(wep.ipv4_nets.iter().chain(&wep.ipv6_nets).map(|n| n.ip()));
                }
                Ok(_) => {}
                Err(e) => snap.unreadable.push(Finding::Unreadable {
                    key: kv.key,
                    reason: e.reason,
                }),
            }
        }
        Ok(snap)
    }

    /// Finds leaked addresses, handles out of step with blocks, and affinity keys and
    /// blocks that do not match. Reads only.
    pub async fn check(&self) -> IpamResult<CheckReport> {
        let snap = self.snapshot().await?;
        Ok(findings(&snap))
    }

    /// Checks, repairs every finding that can be repaired, and checks again. Each repair is
    /// a transaction conditioned on the revisions it was computed from, so a concurrent
    /// change makes it a no-op (reported by the final check) rather than a wrong write.
    pub async fn repair(&self) -> IpamResult<CheckReport> {
        let snap = self.snapshot().await?;
        let report = findings(&snap);
        // Leaks first: releasing changes blocks and handles.
        let leaked: Vec<IpAddr> = report
            .findings
            .iter()
            .filter_map(|f| match f {
                Finding::LeakedAddress { ip, .. } => Some(*ip),
                _ => None,
            })
            .collect();
        if !leaked.is_empty() {
            self.release_ips(&leaked).await?;
        }
        let snap = self.snapshot().await?;
        let actual = actual_handle_counts(&snap);
        let mut handle_ids: BTreeSet<&String> = snap.handles.keys().collect();
        handle_ids.extend(actual.keys());
        for id in handle_ids {
            let want = actual.get(id).cloned().unwrap_or_default();
            let have = snap.handles.get(id);
            if have.map(|(h, _)| &h.block) == Some(&want) {
                continue;
            }
            // Rewrite the handle from the blocks, provided none of them changed meanwhile.
            let key = self.scope.scoped(handle_key(id));
            let blocks: BTreeSet<IpNetwork> = want
                .keys()
                .chain(have.map(|(h, _)| h.block.keys()).into_iter().flatten())
                .filter_map(|cidr| cidr.parse().ok())
                .collect();
            let mut txn =
                Txn::new().when(Compare::revision(key.clone(), have.map_or(0, |(_, r)| *r)));
            for cidr in &blocks {
                if let Some((_, rev)) = snap.blocks.get(cidr) {
                    txn = txn.when(Compare::revision(self.scope.scoped(block_key(cidr)), *rev));
                }
            }
            txn = txn.then(if want.is_empty() {
                TxnOp::delete(key)
            } else {
                TxnOp::put(key, json(&IpamHandle { block: want }))
            });
            lost_race_is_fine(self.store.txn(txn).await)?;
        }
        for ((host, cidr), rev) in &snap.affinities {
            let ours = snap
                .blocks
                .get(cidr)
                .is_some_and(|(b, _)| b.affine_host() == Some(host));
            if !ours {
                lost_race_is_fine(
                    self.store
                        .delete(&self.scope.scoped(affinity_key(host, cidr)), Some(*rev))
                        .await,
                )?;
            }
        }
        for (cidr, (block, rev)) in &snap.blocks {
            if let Some(host) = block.affine_host()
                && !snap.affinities.contains_key(&(host.to_string(), *cidr))
            {
                let affinity = self.scope.scoped(affinity_key(host, cidr));
                let txn = Txn::new()
                    .when(Compare::revision(self.scope.scoped(block_key(cidr)), *rev))
                    .when(Compare::absent(affinity.clone()))
                    .then(TxnOp::put(affinity, "{}"));
                lost_race_is_fine(self.store.txn(txn).await)?;
            }
        }
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.check().await
    }
}

/// A repair is a transaction conditioned on what was read. Losing that race (someone changed
/// the key meanwhile) is fine: the check that follows reports what is still wrong. A
/// datastore failure is not.
fn lost_race_is_fine(result: StoreResult<Revision>) -> IpamResult<()> {
    match result {
        Ok(_) | Err(StoreError::Conflict { .. }) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn actual_handle_counts(snap: &Snapshot) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut actual: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (cidr, (block, _)) in &snap.blocks {
        for (handle, n) in block.handle_counts() {
            actual
                .entry(handle)
                .or_default()
                .insert(cidr.to_string(), n);
        }
    }
    actual
}

fn findings(snap: &Snapshot) -> CheckReport {
    let mut report = CheckReport {
        blocks: snap.blocks.len(),
        handles: snap.handles.len(),
        findings: snap.unreadable.clone(),
        ..CheckReport::default()
    };
    for (cidr, (block, _)) in &snap.blocks {
        for (o, index) in block.allocations.iter().enumerate() {
            let Some(index) = index else { continue };
            report.allocated += 1;
            let ip = address(cidr, o);
            if let Some(handle) = block
                .attributes
                .get(*index)
                .and_then(|a| a.handle_id.clone())
                && !snap.in_use.contains(&ip)
                // A tenant subnet's network, gateway and broadcast addresses are held on
                // purpose.
                && !handle.starts_with(super::tenant::RESERVED_HANDLE_PREFIX)
            {
                report.findings.push(Finding::LeakedAddress {
                    ip,
                    handle,
                    host: block.affine_host().map(str::to_string),
                });
            }
        }
        if let Some(host) = block.affine_host()
            && !snap.affinities.contains_key(&(host.to_string(), *cidr))
        {
            report.findings.push(Finding::BlockWithoutAffinity {
                host: host.into(),
                block: *cidr,
            });
        }
    }
    let actual = actual_handle_counts(snap);
    let empty = BTreeMap::new();
    let mut ids: BTreeSet<&String> = snap.handles.keys().collect();
    ids.extend(actual.keys());
    for id in ids {
        let recorded = snap.handles.get(id).map_or(&empty, |(h, _)| &h.block);
        let counted = actual.get(id).unwrap_or(&empty);
        let mut blocks: BTreeSet<&String> = recorded.keys().collect();
        blocks.extend(counted.keys());
        for b in blocks {
            let (r, a) = (
                recorded.get(b).copied().unwrap_or(0),
                counted.get(b).copied().unwrap_or(0),
            );
            if r != a {
                report.findings.push(Finding::HandleOutOfStep {
                    handle: id.clone(),
                    block: b.clone(),
                    recorded: r,
                    actual: a,
                });
            }
        }
    }
    for (host, cidr) in snap.affinities.keys() {
        if snap
            .blocks
            .get(cidr)
            .is_none_or(|(b, _)| b.affine_host() != Some(host))
        {
            report.findings.push(Finding::AffinityWithoutBlock {
                host: host.clone(),
                block: *cidr,
            });
        }
    }
    report.findings.sort();
    report
}
