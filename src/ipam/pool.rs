//! IP pools and the IPAM configuration: listing, creating and (safely) deleting pools, and
//! the pools an allocation may use.

use std::collections::BTreeSet;

use ipnetwork::IpNetwork;

use super::{Ipam, IpamError, IpamResult, block, blocks_in, json};
use crate::calico::{CalicoKey, CalicoValue, IpPool, IpamConfig, decode};

impl Ipam {
    /// Every pool of one IP version.
    pub async fn pools(&self, v4: bool) -> IpamResult<Vec<IpPool>> {
        let prefix = if v4 {
            crate::calico::IP_POOLS_V4
        } else {
            crate::calico::IP_POOLS_V6
        };
        let listing = self.store.list(prefix).await?;
        let mut pools = Vec::new();
        for kv in &listing.kvs {
            let key = CalicoKey::parse(&kv.key).map_err(|e| IpamError::Corrupt {
                key: kv.key.clone(),
                reason: e.reason,
            })?;
            match decode(&key, &kv.value) {
                Ok(CalicoValue::IpPool(pool)) => pools.push(pool),
                Ok(_) => {}
                Err(e) => {
                    return Err(IpamError::Corrupt {
                        key: e.key,
                        reason: e.reason,
                    });
                }
            }
        }
        Ok(pools)
    }

    pub(super) async fn enabled_pools(&self, v4: bool) -> IpamResult<Vec<IpNetwork>> {
        Ok(self
            .pools(v4)
            .await?
            .into_iter()
            .filter(|p| !p.disabled)
            .map(|p| p.cidr)
            .collect())
    }

    /// Creates a pool (IPAM enabled). It must hold at least one block.
    pub async fn create_pool(&self, cidr: IpNetwork, masquerade: bool) -> IpamResult<()> {
        let cidr = crate::calico::canonical(cidr)
            .map_err(|reason| IpamError::InvalidPool { cidr, reason })?;
        if blocks_in(&cidr) == 0 {
            return Err(IpamError::InvalidPool {
                cidr,
                reason: format!("smaller than one /{} block", block::block_prefix(cidr.ip())),
            });
        }
        let pool = IpPool {
            cidr,
            ipip: String::new(),
            ipip_mode: String::new(),
            masquerade,
            ipam: true,
            disabled: false,
        };
        self.store
            .create(&CalicoKey::IpPool { cidr }.path(), &json(&pool))
            .await?;
        Ok(())
    }

    /// Deletes a pool the safe way: disable it, release every host's affinity to its
    /// blocks, delete the pool key. Allocated addresses and non-empty blocks remain.
    pub async fn delete_pool(&self, cidr: IpNetwork) -> IpamResult<()> {
        let key = CalicoKey::IpPool { cidr }.path();
        let kv = self
            .store
            .get(&key)
            .await?
            .ok_or(IpamError::PoolNotFound(cidr))?;
        let mut pool: IpPool =
            serde_json::from_slice(&kv.value).map_err(|e| IpamError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        pool.disabled = true;
        pool.ipam = false;
        self.store
            .update(&key, &json(&pool), kv.mod_revision)
            .await?;
        let affinities = self.store.list(crate::calico::IPAM_HOSTS).await?;
        for kv in affinities.kvs {
            if let Ok(CalicoKey::BlockAffinity { host, cidr: b }) = CalicoKey::parse(&kv.key)
                && cidr.contains(b.network())
            {
                self.release_block_affinity(&host, b).await?;
            }
        }
        self.store.delete(&key, None).await?;
        Ok(())
    }

    pub async fn config(&self) -> IpamResult<IpamConfig> {
        match self.store.get(&CalicoKey::IpamConfig.path()).await? {
            None => Ok(IpamConfig::default()),
            Some(kv) => serde_json::from_slice(&kv.value).map_err(|e| IpamError::Corrupt {
                key: kv.key,
                reason: e.to_string(),
            }),
        }
    }

    /// Changes the IPAM configuration; refused while any block exists.
    pub async fn set_config(&self, config: IpamConfig) -> IpamResult<()> {
        if !config.strict_affinity && !config.auto_allocate_blocks {
            return Err(IpamError::ConfigInvalid);
        }
        for v4 in [true, false] {
            if !self.store.list(&self.blocks_root(v4)).await?.kvs.is_empty() {
                return Err(IpamError::ConfigInUse);
            }
        }
        self.store
            .put(&CalicoKey::IpamConfig.path(), &json(&config))
            .await?;
        Ok(())
    }

    pub(super) async fn candidate_pools(
        &self,
        v4: bool,
        requested: Option<&[IpNetwork]>,
    ) -> IpamResult<Vec<IpNetwork>> {
        if let super::IpamScope::Tenant(_) = self.scope {
            // A tenant's pools are the subnets asked for; Calico's pools do not apply.
            return requested.map(<[_]>::to_vec).ok_or(IpamError::NoPools);
        }
        let enabled = self.enabled_pools(v4).await?;
        match requested {
            Some(req) => {
                for p in req {
                    if !enabled.contains(p) {
                        return Err(IpamError::PoolNotFound(*p));
                    }
                }
                Ok(req.to_vec())
            }
            None if enabled.is_empty() => Err(IpamError::NoPools),
            None => Ok(enabled),
        }
    }

    pub(super) async fn existing_blocks(&self, v4: bool) -> IpamResult<BTreeSet<IpNetwork>> {
        let listing = self.store.list(&self.blocks_root(v4)).await?;
        Ok(listing
            .kvs
            .iter()
            .filter_map(
                |kv| match CalicoKey::parse(&super::as_calico_path(&kv.key)) {
                    Ok(CalicoKey::IpamBlock { cidr }) => Some(cidr),
                    _ => None,
                },
            )
            .collect())
    }
}
