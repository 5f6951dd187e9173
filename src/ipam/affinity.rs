//! Block affinity: claiming a range of blocks for a host, releasing a host's claims (an
//! empty block goes with its claim, a used one becomes unaffine), removing a host.

use ipnetwork::IpNetwork;

use super::cache::{Seen, parse_block};
use super::{
    Ipam, IpamError, IpamResult, MAX_RETRIES, backoff, block, blocks_in, empty_block, json,
    nth_block,
};
use crate::calico::{CalicoKey, host_affinity_prefix, ipam_host_prefix};
use crate::store::{Compare, Txn, TxnOp, TxnOutcome};

impl Ipam {
    /// The blocks `host` holds an affinity key for.
    pub async fn affine_blocks(&self, host: &str, v4: bool) -> IpamResult<Vec<IpNetwork>> {
        let listing = self
            .store
            .list(
                &self
                    .scope
                    .scoped(host_affinity_prefix(host, if v4 { 4 } else { 6 })),
            )
            .await?;
        Ok(listing
            .kvs
            .iter()
            .filter_map(
                |kv| match CalicoKey::parse(&super::as_calico_path(&kv.key)) {
                    Ok(CalicoKey::BlockAffinity { cidr, .. }) => Some(cidr),
                    _ => None,
                },
            )
            .collect())
    }

    /// Claims every block of `cidr` for `host`; returns (claimed, claimed by someone else).
    pub async fn claim_affinity(
        &self,
        cidr: IpNetwork,
        host: &str,
    ) -> IpamResult<(Vec<IpNetwork>, Vec<IpNetwork>)> {
        if host.is_empty() {
            return Err(IpamError::NoHost);
        }
        let cidr = crate::calico::canonical(cidr)
            .map_err(|reason| IpamError::InvalidPool { cidr, reason })?;
        if cidr.prefix() > block::block_prefix(cidr.ip()) {
            return Err(IpamError::CidrTooSmall(cidr));
        }
        let pools = self.enabled_pools(cidr.is_ipv4()).await?;
        if !pools.iter().any(|p| p.contains(cidr.network())) {
            return Err(IpamError::CidrNotInPool(cidr));
        }
        let config = self.config().await?;
        let (mut claimed, mut failed) = (Vec::new(), Vec::new());
        for i in 0..blocks_in(&cidr) {
            let b = nth_block(&cidr, i);
            let bkey = self.bkey(&b);
            let akey = self.akey(host, &b);
            let block = empty_block(b, Some(host), config.strict_affinity);
            let txn = Txn::new()
                .when(Compare::absent(bkey.clone()))
                .then(TxnOp::put(bkey, json(&block)))
                .then(TxnOp::put(akey.clone(), "{}"));
            match self.commit(txn).await? {
                TxnOutcome::Committed(revision) => {
                    self.remember(b, Some(Seen { block, revision }));
                    claimed.push(b);
                }
                TxnOutcome::Failed { current } => {
                    let existing = current[0].as_ref().map(parse_block).transpose()?;
                    match existing {
                        Some(s) if s.block.affine_host() == Some(host) => {
                            // Ours already; make sure the marker is there too.
                            self.store.put(&akey, b"{}").await?;
                            claimed.push(b);
                        }
                        _ => failed.push(b),
                    }
                }
            }
        }
        Ok((claimed, failed))
    }

    /// Releases `host`'s affinity to every block of `cidr` (blocks of other hosts are left).
    pub async fn release_affinity(&self, cidr: IpNetwork, host: &str) -> IpamResult<()> {
        for i in 0..blocks_in(&cidr) {
            self.release_block_affinity(host, nth_block(&cidr, i))
                .await?;
        }
        Ok(())
    }

    /// Drops `host`'s affinity to one block: an empty block is deleted, a non-empty one
    /// becomes unaffine (and goes when its last address is released). Atomic with the
    /// removal of the affinity key.
    pub(super) async fn release_block_affinity(
        &self,
        host: &str,
        cidr: IpNetwork,
    ) -> IpamResult<()> {
        let akey = self.akey(host, &cidr);
        let bkey = self.bkey(&cidr);
        for attempt in 0..MAX_RETRIES {
            let got = self.store.get_many(&[bkey.clone(), akey.clone()]).await?;
            let seen = got[0].as_ref().map(parse_block).transpose()?;
            let mut txn = Txn::new();
            match &seen {
                Some(s) if s.block.affine_host().is_some_and(|h| h != host) => {
                    // Not ours: only our stray marker (if any) goes.
                }
                Some(s) => {
                    txn = txn.when(Compare::revision(bkey.clone(), s.revision));
                    if s.block.is_empty() {
                        txn = txn.then(TxnOp::delete(bkey.clone()));
                    } else {
                        let mut block = s.block.clone();
                        block.affinity = None;
                        txn = txn.then(TxnOp::put(bkey.clone(), json(&block)));
                    }
                }
                None => {}
            }
            if let Some(a) = &got[1] {
                txn = txn
                    .when(Compare::revision(akey.clone(), a.mod_revision))
                    .then(TxnOp::delete(akey.clone()));
            }
            if txn.ops.is_empty() {
                return Ok(());
            }
            match self.commit(txn).await? {
                TxnOutcome::Committed(_) => {
                    self.remember(cidr, None);
                    self.set_affine(host, cidr.is_ipv4(), None);
                    return Ok(());
                }
                TxnOutcome::Failed { .. } => backoff(attempt).await,
            }
        }
        Err(IpamError::MaxRetries { key: akey })
    }

    /// Releases every affinity `host` holds (IPv4 and IPv6).
    pub async fn release_host_affinities(&self, host: &str) -> IpamResult<()> {
        for v4 in [true, false] {
            for cidr in self.affine_blocks(host, v4).await? {
                self.release_block_affinity(host, cidr).await?;
            }
        }
        Ok(())
    }

    /// Removes a host from IPAM: its affinities, then its whole IPAM tree. Addresses it still
    /// holds stay allocated (in now unaffine blocks).
    pub async fn remove_host(&self, host: &str) -> IpamResult<()> {
        if host.is_empty() {
            return Err(IpamError::NoHost);
        }
        self.release_host_affinities(host).await?;
        self.store
            .delete_prefix(&self.scope.scoped(ipam_host_prefix(host)))
            .await?;
        Ok(())
    }
}
