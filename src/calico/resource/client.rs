//! create / replace / apply / delete / list over the datastore, safe under concurrency:
//! create is create-if-absent, replace a compare-and-swap on the revision it read, apply an
//! unconditional write; every write of one resource is one transaction.

use std::sync::Arc;

use ipnetwork::IpNetwork;

use super::{IpPoolResource, Resource, ResourceError, ResourceId, ResourceKind};
use crate::calico::{CalicoKey, IP_POOLS_V4, IP_POOLS_V6, IpPool};
use crate::ipam::{Ipam, IpamError};
use crate::store::{Compare, Datastore, StoreError, Txn, TxnOp};

/// Set when any IPIP pool is written (libcalico-go v1 did the same).
const IPIP_ENABLED_KEY: &str = "/calico/v1/config/IpInIpEnabled";

pub struct ResourceClient {
    store: Arc<dyn Datastore>,
}

/// How a write treats what is already there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Create,
    Replace,
    Apply,
}

impl ResourceClient {
    pub fn new(store: Arc<dyn Datastore>) -> Self {
        ResourceClient { store }
    }

    /// Fails with "resource already exists" if it does.
    pub async fn create(&self, r: &Resource) -> Result<(), ResourceError> {
        self.write(r, Mode::Create).await
    }

    /// Fails with "resource does not exist" if it does not, and with "update conflict" if it
    /// changed between the read and the write.
    pub async fn replace(&self, r: &Resource) -> Result<(), ResourceError> {
        self.write(r, Mode::Replace).await
    }

    /// Creates or overwrites.
    pub async fn apply(&self, r: &Resource) -> Result<(), ResourceError> {
        self.write(r, Mode::Apply).await
    }

    async fn write(&self, r: &Resource, mode: Mode) -> Result<(), ResourceError> {
        r.validate()?;
        let (key, value, extra) = match r {
            Resource::IpPool(p) => {
                let key = CalicoKey::IpPool {
                    cidr: p.metadata.cidr,
                }
                .path();
                let value = serde_json::to_vec(&p.to_backend()).expect("pools serialise");
                let extra = p
                    .ipip_enabled()
                    .then(|| TxnOp::put(IPIP_ENABLED_KEY, "true"));
                (key, value, extra)
            }
        };
        let mut txn = Txn::new();
        match mode {
            Mode::Create => txn = txn.when(Compare::absent(key.clone())),
            Mode::Replace => {
                let current = self
                    .store
                    .get(&key)
                    .await?
                    .ok_or_else(|| ResourceError::DoesNotExist(r.id()))?;
                txn = txn.when(Compare::revision(key.clone(), current.mod_revision));
            }
            Mode::Apply => {}
        }
        txn = txn.then(TxnOp::put(key.clone(), value));
        if let Some(op) = extra {
            txn = txn.then(op);
        }
        match self.store.txn(txn).await {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) if mode == Mode::Create => {
                Err(ResourceError::AlreadyExists(r.id()))
            }
            Err(StoreError::Conflict { .. }) => Err(ResourceError::UpdateConflict(key)),
            Err(e) => Err(e.into()),
        }
    }

    /// Fails with "resource does not exist" if it does not. A pool is disabled and its
    /// blocks' affinities released before its key goes (libcalico-go v1's order), so no
    /// host allocates from it meanwhile.
    pub async fn delete(&self, id: &ResourceId) -> Result<(), ResourceError> {
        match id {
            ResourceId::IpPool(cidr) => {
                match Ipam::new(self.store.clone()).delete_pool(*cidr).await {
                    Ok(()) => Ok(()),
                    Err(IpamError::PoolNotFound(_)) => Err(ResourceError::DoesNotExist(id.clone())),
                    Err(IpamError::Store(e)) => Err(e.into()),
                    Err(e) => Err(ResourceError::Invalid(e.to_string())),
                }
            }
        }
    }

    /// Every resource of `kind`, or the one named (none if it does not exist).
    pub async fn list(
        &self,
        kind: ResourceKind,
        name: Option<&str>,
    ) -> Result<Vec<Resource>, ResourceError> {
        match kind {
            ResourceKind::IpPool => {
                let kvs = match name {
                    Some(n) => {
                        let cidr = parse_pool_name(n)?;
                        let key = CalicoKey::IpPool { cidr }.path();
                        self.store.get(&key).await?.into_iter().collect()
                    }
                    None => {
                        let mut kvs = self.store.list(IP_POOLS_V4).await?.kvs;
                        kvs.extend(self.store.list(IP_POOLS_V6).await?.kvs);
                        kvs
                    }
                };
                kvs.into_iter()
                    .map(|kv| {
                        let pool: IpPool = serde_json::from_slice(&kv.value).map_err(|e| {
                            ResourceError::Corrupt {
                                key: kv.key.clone(),
                                reason: e.to_string(),
                            }
                        })?;
                        Ok(Resource::IpPool(IpPoolResource::from_backend(&pool)))
                    })
                    .collect()
            }
        }
    }
}

/// An ipPool's CLI name is its CIDR.
pub fn parse_pool_name(name: &str) -> Result<IpNetwork, ResourceError> {
    name.parse()
        .map_err(|_| ResourceError::Invalid(format!("invalid CIDR '{name}'")))
}
