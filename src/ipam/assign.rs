//! Allocation: automatic assignment (affine blocks, then new blocks, then borrowing) and the
//! assignment of one chosen address, each committed with its handle in one transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use rand::{Rng, SeedableRng};
use tracing::debug;

use super::cache::{Seen, SeenHandle, parse_block, parse_handle_opt};
use super::{
    Ipam, IpamError, IpamResult, MAX_RETRIES, Owner, ThenWrite, address, backoff, block_of,
    blocks_in, empty_block, handle_ops, handle_ops_many, json, nth_block, ordinal,
};
use crate::calico::IpamConfig;
use crate::store::{Compare, Revision, Txn, TxnOp, TxnOutcome};

/// What a compare of [`Ipam::assign_in_blocks`]'s transaction is about.
enum Compared {
    Block(IpNetwork),
    Affinity(IpNetwork),
    Handle,
}

/// A request for automatically chosen addresses.
#[derive(Clone, Debug, Default)]
pub struct AutoAssignArgs {
    pub num_v4: usize,
    pub num_v6: usize,
    pub handle: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub host: String,
    /// Restrict to these pools (each must exist); `None` = every enabled pool.
    pub pools_v4: Option<Vec<IpNetwork>>,
    pub pools_v6: Option<Vec<IpNetwork>>,
}

/// FNV-1 (32-bit) of the hostname: Calico seeds each host's block walk with it, so hosts
/// start claiming at different places in a pool.
fn host_seed(host: &str) -> u64 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in host.bytes() {
        hash = hash.wrapping_mul(0x0100_0193);
        hash ^= u32::from(b);
    }
    u64::from(hash)
}

/// Block candidates of a pool in the host's random order: a random start, then forward with
/// wrap-around, each block once (at most `limit` blocks for huge IPv6 pools).
fn block_walk(
    pool: &IpNetwork,
    host: &str,
    limit: u128,
) -> impl Iterator<Item = IpNetwork> + use<> {
    let pool = *pool;
    let n = blocks_in(&pool);
    let start = if n == 0 {
        0
    } else {
        let mut rng = rand::rngs::StdRng::seed_from_u64(host_seed(host));
        rng.random_range(0..n)
    };
    (0..n.min(limit)).map(move |i| nth_block(&pool, (start + i) % n))
}

/// The one request running the slow path of an allocation; when it ends, the requests that
/// waited try the host's blocks again.
struct SlowPath<'a> {
    ipam: &'a Ipam,
    _guard: tokio::sync::MutexGuard<'a, ()>,
}

impl Drop for SlowPath<'_> {
    fn drop(&mut self) {
        self.ipam
            .slow_paths
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}

/// Most blocks tried when walking a pool for a free one.
const WALK_LIMIT: u128 = 1 << 20;

impl Ipam {
    /// Assigns up to `num_v4` + `num_v6` addresses to `host`: from its affine blocks first,
    /// then by claiming new blocks, then (unless strict affinity) by borrowing from other
    /// hosts' blocks. Fewer than requested is not an error.
    pub async fn auto_assign(
        &self,
        args: &AutoAssignArgs,
    ) -> IpamResult<(Vec<IpAddr>, Vec<IpAddr>)> {
        self.auto_assign_then(args, None).await
    }

    /// [`Self::auto_assign`], with `then`'s writes in the transaction that assigns the one
    /// IPv4 address asked for, when a block of the host's has it (`then.written()` says
    /// whether they were; otherwise the caller writes them itself). Only for one address.
    pub async fn auto_assign_then(
        &self,
        args: &AutoAssignArgs,
        then: Option<&ThenWrite>,
    ) -> IpamResult<(Vec<IpAddr>, Vec<IpAddr>)> {
        if args.host.is_empty() {
            return Err(IpamError::NoHost);
        }
        let owner = Owner {
            handle: args.handle.clone(),
            attributes: args.attributes.clone(),
        };
        let then = then.filter(|_| args.num_v4 == 1 && args.num_v6 == 0);
        let v4 = self
            .assign_version(
                true,
                args.num_v4,
                args.pools_v4.as_deref(),
                &args.host,
                &owner,
                then,
            )
            .await?;
        let v6 = self
            .assign_version(
                false,
                args.num_v6,
                args.pools_v6.as_deref(),
                &args.host,
                &owner,
                None,
            )
            .await?;
        Ok((v4, v6))
    }

    async fn assign_version(
        &self,
        v4: bool,
        num: usize,
        requested: Option<&[IpNetwork]>,
        host: &str,
        owner: &Owner,
        then: Option<&ThenWrite>,
    ) -> IpamResult<Vec<IpAddr>> {
        let mut out = Vec::new();
        if num == 0 {
            return Ok(out);
        }
        if let Some(pools) = requested
            && let Some(bad) = pools.iter().find(|p| p.is_ipv4() != v4)
        {
            return Err(IpamError::WrongPoolVersion(*bad, if v4 { 4 } else { 6 }));
        }
        let in_requested = |cidr: &IpNetwork| {
            requested.is_none_or(|ps| ps.iter().any(|p| p.contains(cidr.network())))
        };

        // 1. The host's affine blocks. The list is cached per instance: a block used from it
        // is re-validated by the allocation's own transaction (revision compare) and must
        // still be affine to this host. On a miss, list afresh and read again the blocks that
        // looked full (someone may have released addresses) before claiming a new block.
        //
        // That slower path runs one at a time: in a burst, the requests that find the
        // host's blocks full wait while one of them claims a block, then try it — together,
        // so they share its transactions — rather than each claiming a block of its own.
        let _slow = loop {
            if let Some(cached) = self.cached_affine(host, v4) {
                let want = num - out.len();
                out.extend(
                    self.fill_from(&cached, &in_requested, want, host, owner, false, then)
                        .await?,
                );
                if out.len() == num {
                    return Ok(out);
                }
            }
            let generation = self.slow_paths.load(std::sync::atomic::Ordering::Acquire);
            let guard = self.slow_path.lock().await;
            if self.slow_paths.load(std::sync::atomic::Ordering::Acquire) == generation {
                break SlowPath {
                    ipam: self,
                    _guard: guard,
                };
            }
        };
        let affine = self.affine_blocks(host, v4).await?;
        self.set_affine(host, v4, Some(affine.clone()));
        let want = num - out.len();
        out.extend(
            self.fill_from(&affine, &in_requested, want, host, owner, true, then)
                .await?,
        );
        if out.len() == num {
            return Ok(out);
        }

        // 2. Claim new blocks.
        let config = self.config().await?;
        let pools = self.candidate_pools(v4, requested).await?;
        let mut existing: BTreeSet<IpNetwork> = self.existing_blocks(v4).await?;
        if config.auto_allocate_blocks {
            while out.len() < num {
                match self
                    .claim_and_assign(&pools, &mut existing, num - out.len(), host, owner, &config)
                    .await?
                {
                    Some(ips) => out.extend(ips),
                    None => break, // no free block left in the pools
                }
            }
        }

        // 3. Borrow from other hosts' blocks.
        if out.len() < num && !config.strict_affinity {
            'pools: for pool in &pools {
                for cidr in block_walk(pool, host, WALK_LIMIT) {
                    if out.len() == num {
                        break 'pools;
                    }
                    if !existing.contains(&cidr) {
                        continue;
                    }
                    out.extend(
                        self.assign_from_block(cidr, num - out.len(), host, owner, false, None)
                            .await?,
                    );
                }
            }
        }
        Ok(out)
    }

    /// Assigns up to `want` addresses from the host's affine `blocks`, in order. A block the
    /// cache says is full is skipped, or read again first when `reread_full`.
    #[allow(clippy::too_many_arguments)]
    async fn fill_from(
        &self,
        blocks: &[IpNetwork],
        in_requested: &(dyn Fn(&IpNetwork) -> bool + Sync),
        want: usize,
        host: &str,
        owner: &Owner,
        reread_full: bool,
        then: Option<&ThenWrite>,
    ) -> IpamResult<Vec<IpAddr>> {
        let mut out = Vec::new();
        for cidr in blocks.iter().filter(|c| in_requested(c)) {
            if out.len() == want {
                break;
            }
            if self.cached(cidr).is_some_and(|s| s.block.free() == 0) {
                if !reread_full {
                    continue;
                }
                self.read(cidr, None).await?;
            }
            let got = self
                .assign_from_block(*cidr, want - out.len(), host, owner, true, then)
                .await?;
            out.extend(got);
        }
        Ok(out)
    }

    /// Whether `host` may still allocate from the block as last seen. A block that is no
    /// longer affine to it (affinity released, e.g. by a pool deletion) also leaves its
    /// cached list of affine blocks.
    pub(super) fn usable(
        &self,
        cidr: IpNetwork,
        current: &Seen,
        host: &str,
        check_affinity: bool,
    ) -> bool {
        if check_affinity && current.block.affine_host() != Some(host) {
            let v4 = cidr.is_ipv4();
            if let Some(mut affine) = self.cached_affine(host, v4) {
                affine.retain(|c| *c != cidr);
                self.set_affine(host, v4, Some(affine));
            }
            return false;
        }
        current.block.allows(host, check_affinity)
    }

    /// Assigns up to `n` addresses from an existing block in one transaction (block + handle)
    /// of its own (see `batch` for the shared one).
    pub(super) async fn assign_alone(
        &self,
        cidr: IpNetwork,
        n: usize,
        host: &str,
        owner: &Owner,
        check_affinity: bool,
        then: Option<&ThenWrite>,
    ) -> IpamResult<Vec<IpAddr>> {
        let handle = owner.handle.as_deref();
        let (mut seen, mut seen_handle) = match self.cached(&cidr) {
            Some(s) => (Some(s), None),
            None => self.read(&cidr, handle).await?,
        };
        for attempt in 0..MAX_RETRIES {
            let Some(current) = seen.clone() else {
                return Ok(Vec::new()); // the block went away
            };
            if !self.usable(cidr, &current, host, check_affinity) {
                return Ok(Vec::new());
            }
            let mut block = current.block.clone();
            let ordinals = block.assign(n, owner);
            if ordinals.is_empty() {
                return Ok(Vec::new());
            }
            let key = self.bkey(&cidr);
            let mut txn = Txn::new().when(Compare::revision(key.clone(), current.revision));
            if let Some(h) = handle {
                let (cmp, op) =
                    handle_ops(self.hkey(h), h, &seen_handle, &cidr, ordinals.len() as i64);
                txn = txn.when(cmp);
                txn.ops.extend(op);
            }
            txn = txn.then(TxnOp::put(key, json(&block)));
            let addresses: Vec<IpAddr> = ordinals.iter().map(|&o| address(&cidr, o)).collect();
            if let Some(then) = then {
                txn.ops.extend(then.ops(&addresses));
            }
            match self.commit(txn).await? {
                TxnOutcome::Committed(revision) => {
                    self.remember(cidr, Some(Seen { block, revision }));
                    self.count_assigned(ordinals.len());
                    if let Some(then) = then {
                        then.mark_written();
                    }
                    debug!(%cidr, host, n = ordinals.len(), "assigned");
                    return Ok(addresses);
                }
                TxnOutcome::Failed { current } => {
                    seen = current[0].as_ref().map(parse_block).transpose()?;
                    self.remember(cidr, seen.clone());
                    seen_handle = parse_handle_opt(current.get(1).and_then(Option::as_ref))?;
                    backoff(attempt).await;
                }
            }
        }
        Err(IpamError::MaxRetries {
            key: self.bkey(&cidr),
        })
    }

    /// Claims the first free block of the host's walk through `pools` and assigns from it,
    /// all in one transaction. `None` when every block of the pools exists.
    async fn claim_and_assign(
        &self,
        pools: &[IpNetwork],
        existing: &mut BTreeSet<IpNetwork>,
        n: usize,
        host: &str,
        owner: &Owner,
        config: &IpamConfig,
    ) -> IpamResult<Option<Vec<IpAddr>>> {
        let handle = owner.handle.as_deref();
        let mut seen_handle: SeenHandle = None;
        let mut affinity_rev: Revision = 0;
        for attempt in 0..MAX_RETRIES {
            let Some(cidr) = pools
                .iter()
                .flat_map(|p| block_walk(p, host, WALK_LIMIT))
                .find(|c| !existing.contains(c))
            else {
                return Ok(None);
            };
            let mut block = empty_block(cidr, Some(host), config.strict_affinity);
            let ordinals = block.assign(n, owner);
            let bkey = self.bkey(&cidr);
            let akey = self.akey(host, &cidr);
            let mut txn = Txn::new()
                .when(Compare::absent(bkey.clone()))
                .when(Compare::revision(akey.clone(), affinity_rev));
            if let Some(h) = handle {
                let (cmp, op) =
                    handle_ops(self.hkey(h), h, &seen_handle, &cidr, ordinals.len() as i64);
                txn = txn.when(cmp);
                txn.ops.extend(op);
            }
            txn = txn
                .then(TxnOp::put(bkey, json(&block)))
                .then(TxnOp::put(akey, "{}"));
            match self.commit(txn).await? {
                TxnOutcome::Committed(revision) => {
                    self.count_assigned(ordinals.len());
                    existing.insert(cidr);
                    self.remember(cidr, Some(Seen { block, revision }));
                    let v4 = cidr.is_ipv4();
                    let mut affine = self.cached_affine(host, v4).unwrap_or_default();
                    affine.push(cidr);
                    self.set_affine(host, v4, Some(affine));
                    debug!(%cidr, host, "claimed block");
                    return Ok(Some(ordinals.iter().map(|&o| address(&cidr, o)).collect()));
                }
                TxnOutcome::Failed { current } => {
                    if current[0].is_some() {
                        // Someone else claimed it first: try the next block.
                        existing.insert(cidr);
                        affinity_rev = 0;
                    } else {
                        // A leftover affinity key of ours without a block: overwrite it.
                        affinity_rev = current[1].as_ref().map_or(0, |kv| kv.mod_revision);
                    }
                    seen_handle = parse_handle_opt(current.get(2).and_then(Option::as_ref))?;
                    if attempt > 0 {
                        backoff(attempt).await;
                    }
                }
            }
        }
        Err(IpamError::MaxRetries {
            key: self.blocks_root(pools.first().is_none_or(|p| p.is_ipv4())),
        })
    }

    /// Assigns one specific address. Its block is claimed for `host` if nobody has it yet.
    pub async fn assign_ip(
        &self,
        ip: IpAddr,
        handle: Option<&str>,
        attributes: BTreeMap<String, String>,
        host: &str,
    ) -> IpamResult<()> {
        self.assign_in_blocks(&[ip], handle, attributes, host, false)
            .await
            .map(|_| ())
    }

    /// Assigns those of `ips` that are still free, in one transaction whatever blocks they
    /// are in, and returns how many that was: an address already assigned is left as it is.
    /// For reservations, which only need the addresses taken (a subnet's network and gateway
    /// addresses are in its first block, its broadcast address in its last).
    pub(super) async fn assign_if_free(
        &self,
        ips: &[IpAddr],
        handle: &str,
        attributes: BTreeMap<String, String>,
        host: &str,
    ) -> IpamResult<usize> {
        self.assign_in_blocks(ips, Some(handle), attributes, host, true)
            .await
    }

    /// [`Self::assign_ip`] for several addresses: all in one transaction, which compares and
    /// writes each block involved (creating a missing one with `host`'s affinity) and the
    /// handle once. An address already assigned is skipped when `skip_assigned`, an error
    /// otherwise.
    async fn assign_in_blocks(
        &self,
        ips: &[IpAddr],
        handle: Option<&str>,
        attributes: BTreeMap<String, String>,
        host: &str,
        skip_assigned: bool,
    ) -> IpamResult<usize> {
        if host.is_empty() {
            return Err(IpamError::NoHost);
        }
        let mut by_block: BTreeMap<IpNetwork, BTreeSet<IpAddr>> = BTreeMap::new();
        for ip in ips {
            by_block.entry(block_of(*ip)).or_default().insert(*ip);
        }
        if by_block.is_empty() {
            return Ok(0);
        }
        // A tenant's caller checks the address against its subnet (`assign_in_subnet`).
        if self.scope == super::IpamScope::Calico {
            for v4 in [true, false] {
                let of_family: Vec<IpAddr> = ips
                    .iter()
                    .copied()
                    .filter(|ip| ip.is_ipv4() == v4)
                    .collect();
                if of_family.is_empty() {
                    continue;
                }
                let pools = self.enabled_pools(v4).await?;
                if let Some(ip) = of_family
                    .into_iter()
                    .find(|ip| !pools.iter().any(|p| p.contains(*ip)))
                {
                    return Err(IpamError::NotInPool(ip));
                }
            }
        }
        let owner = Owner {
            handle: handle.map(str::to_string),
            attributes,
        };
        let cidrs: Vec<IpNetwork> = by_block.keys().copied().collect();
        // Both at once: a new subnet's reservation waits for them before its transaction.
        let (config, read) = tokio::join!(self.config(), self.read_blocks(&cidrs, handle));
        let config = config?;
        let (mut seen, mut seen_handle) = read?;
        // The affinity key's revision, per block, for blocks to create.
        let mut affinity_rev: BTreeMap<IpNetwork, Revision> = BTreeMap::new();
        for attempt in 0..MAX_RETRIES {
            let mut txn = Txn::new();
            // What each compare is about, to read the answer of a failed transaction.
            let mut compared: Vec<Compared> = Vec::new();
            let mut written: Vec<(IpNetwork, crate::calico::AllocationBlock, bool)> = Vec::new();
            let mut deltas: Vec<(IpNetwork, i64)> = Vec::new();
            for ((cidr, wanted), current) in by_block.iter().zip(&seen) {
                let bkey = self.bkey(cidr);
                let mut block = match current {
                    Some(s) => {
                        if s.block.strict_affinity && !s.block.allows(host, true) {
                            return Err(IpamError::AffinityMismatch {
                                block: *cidr,
                                affinity: s.block.affinity.clone().unwrap_or_default(),
                                host: host.into(),
                            });
                        }
                        s.block.clone()
                    }
                    None => empty_block(*cidr, Some(host), config.strict_affinity),
                };
                let mut assigned = 0;
                for ip in wanted {
                    if block.assign_ordinal(ordinal(cidr, *ip), &owner) {
                        assigned += 1;
                    } else if !skip_assigned {
                        return Err(IpamError::AlreadyAssigned(*ip));
                    }
                }
                if assigned == 0 {
                    continue;
                }
                match current {
                    Some(s) => {
                        txn = txn.when(Compare::revision(bkey, s.revision));
                        compared.push(Compared::Block(*cidr));
                    }
                    None => {
                        let akey = self.akey(host, cidr);
                        let rev = affinity_rev.get(cidr).copied().unwrap_or(0);
                        txn = txn
                            .when(Compare::absent(bkey))
                            .when(Compare::revision(akey.clone(), rev))
                            .then(TxnOp::put(akey, "{}"));
                        compared.push(Compared::Block(*cidr));
                        compared.push(Compared::Affinity(*cidr));
                    }
                }
                deltas.push((*cidr, assigned));
                written.push((*cidr, block, current.is_none()));
            }
            if written.is_empty() {
                return Ok(0);
            }
            if let Some(h) = handle {
                let (cmp, op) = handle_ops_many(self.hkey(h), h, &seen_handle, &deltas);
                txn = txn.when(cmp);
                txn.ops.extend(op);
                compared.push(Compared::Handle);
            }
            for (cidr, block, _) in &written {
                txn = txn.then(TxnOp::put(self.bkey(cidr), json(block)));
            }
            match self.commit(txn).await? {
                TxnOutcome::Committed(revision) => {
                    let assigned: i64 = deltas.iter().map(|(_, n)| n).sum();
                    self.count_assigned(assigned as usize);
                    for (cidr, block, created) in written {
                        self.remember(cidr, Some(Seen { block, revision }));
                        if created {
                            // Claimed for `host` just now: the next allocations find the
                            // block without listing the host's affinities.
                            let v4 = cidr.is_ipv4();
                            let mut affine = self.cached_affine(host, v4).unwrap_or_default();
                            if !affine.contains(&cidr) {
                                affine.insert(affine.partition_point(|c| *c < cidr), cidr);
                                self.set_affine(host, v4, Some(affine));
                            }
                        }
                    }
                    return Ok(assigned as usize);
                }
                TxnOutcome::Failed { current } => {
                    for (what, kv) in compared.iter().zip(&current) {
                        match what {
                            Compared::Block(cidr) => {
                                let i = cidrs.binary_search(cidr).expect("a block of the call");
                                seen[i] = kv.as_ref().map(parse_block).transpose()?;
                            }
                            Compared::Affinity(cidr) => {
                                affinity_rev
                                    .insert(*cidr, kv.as_ref().map_or(0, |kv| kv.mod_revision));
                            }
                            Compared::Handle => seen_handle = parse_handle_opt(kv.as_ref())?,
                        }
                    }
                    backoff(attempt).await;
                }
            }
        }
        Err(IpamError::MaxRetries {
            key: self.bkey(&cidrs[0]),
        })
    }

    /// The handle and attributes recorded for an assigned address.
    pub async fn get_assignment_attributes(
        &self,
        ip: IpAddr,
    ) -> IpamResult<(Option<String>, BTreeMap<String, String>)> {
        let cidr = block_of(ip);
        let (seen, _) = self.read(&cidr, None).await?;
        let seen = seen.ok_or(IpamError::NotAssigned(ip))?;
        let index =
            seen.block.allocations[ordinal(&cidr, ip)].ok_or(IpamError::NotAssignedInBlock(ip))?;
        let attr = seen
            .block
            .attributes
            .get(index)
            .cloned()
            .unwrap_or_default();
        Ok((attr.handle_id, attr.secondary.unwrap_or_default()))
    }
}
