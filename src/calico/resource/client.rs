//! create / replace / apply / delete / list over the datastore, safe under concurrency:
//! create is create-if-absent, replace a compare-and-swap on the revision it read, apply an
//! unconditional write; every write of one resource is one transaction.

use std::sync::Arc;

use ipnetwork::IpNetwork;

use std::collections::BTreeMap;

use super::{
    IpPoolResource, PolicyResource, ProfileResource, Resource, ResourceError, ResourceId,
    ResourceKind,
};
use crate::calico::{CalicoKey, IP_POOLS_V4, IP_POOLS_V6, IpPool, Policy, ProfileRules};
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
    /// Replace only if the resource is still at this revision.
    ReplaceAt(crate::store::Revision),
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

    /// Replaces the resource only if it is still at `revision` (what a reader saw; see
    /// [`ResourceClient::revision`]): two writers that read the same revision cannot both
    /// win.
    pub async fn replace_at(
        &self,
        r: &Resource,
        revision: crate::store::Revision,
    ) -> Result<(), ResourceError> {
        self.write(r, Mode::ReplaceAt(revision)).await
    }

    /// The revision of the key that says `r` exists, if it does.
    pub async fn revision(
        &self,
        r: &Resource,
    ) -> Result<Option<crate::store::Revision>, ResourceError> {
        let key = match r {
            Resource::IpPool(p) => CalicoKey::IpPool {
                cidr: p.metadata.cidr,
            }
            .path(),
            Resource::Policy(p) => policy_key(&p.metadata.name),
            Resource::Profile(p) => CalicoKey::ProfileTags {
                profile: p.metadata.name.clone(),
            }
            .path(),
        };
        Ok(self.store.get(&key).await?.map(|kv| kv.mod_revision))
    }

    /// Creates or overwrites.
    pub async fn apply(&self, r: &Resource) -> Result<(), ResourceError> {
        self.write(r, Mode::Apply).await
    }

    async fn write(&self, r: &Resource, mode: Mode) -> Result<(), ResourceError> {
        r.validate()?;
        // The key that says the resource exists, its value, and what else is written with it.
        let (key, value, extra): (String, Vec<u8>, Vec<TxnOp>) = match r {
            Resource::IpPool(p) => {
                let key = CalicoKey::IpPool {
                    cidr: p.metadata.cidr,
                }
                .path();
                let value = serde_json::to_vec(&p.to_backend()).expect("pools serialise");
                let extra = p
                    .ipip_enabled()
                    .then(|| TxnOp::put(IPIP_ENABLED_KEY, "true"))
                    .into_iter()
                    .collect();
                (key, value, extra)
            }
            Resource::Policy(p) => (
                policy_key(&p.metadata.name),
                serde_json::to_vec(&p.to_backend()).expect("policies serialise"),
                Vec::new(),
            ),
            Resource::Profile(p) => {
                let name = &p.metadata.name;
                let values = p.to_backend();
                let labels = CalicoKey::ProfileLabels {
                    profile: name.clone(),
                }
                .path();
                let rules = CalicoKey::ProfileRules {
                    profile: name.clone(),
                }
                .path();
                (
                    CalicoKey::ProfileTags {
                        profile: name.clone(),
                    }
                    .path(),
                    values.tags,
                    vec![
                        TxnOp::put(labels, values.labels),
                        TxnOp::put(rules, values.rules),
                    ],
                )
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
            Mode::ReplaceAt(revision) => {
                txn = txn.when(Compare::revision(key.clone(), revision));
            }
            Mode::Apply => {}
        }
        txn = txn.then(TxnOp::put(key.clone(), value));
        for op in extra {
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
            ResourceId::Policy(name) => match self.store.delete(&policy_key(name), None).await {
                Ok(_) => Ok(()),
                Err(StoreError::NotFound { .. }) => Err(ResourceError::DoesNotExist(id.clone())),
                Err(e) => Err(e.into()),
            },
            ResourceId::Profile(name) => {
                // The tags key is the profile's existence; the whole directory goes.
                let tags = CalicoKey::ProfileTags {
                    profile: name.clone(),
                }
                .path();
                if self.store.get(&tags).await?.is_none() {
                    return Err(ResourceError::DoesNotExist(id.clone()));
                }
                let dir = tags.strip_suffix("tags").expect("a tags key");
                self.store.delete_prefix(dir).await?;
                Ok(())
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
            ResourceKind::Policy => {
                let kvs = match name {
                    Some(n) => self.store.get(&policy_key(n)).await?.into_iter().collect(),
                    None => self.store.list(&policy_prefix()).await?.kvs,
                };
                let mut out = Vec::new();
                for kv in kvs {
                    let Ok(CalicoKey::Policy { name, .. }) = CalicoKey::parse(&kv.key) else {
                        continue;
                    };
                    let p: Policy = decode(&kv.key, &kv.value)?;
                    out.push(Resource::Policy(PolicyResource::from_backend(&name, &p)));
                }
                Ok(out)
            }
            ResourceKind::Profile => {
                let prefix = match name {
                    Some(n) => {
                        let tags = CalicoKey::ProfileTags { profile: n.into() }.path();
                        tags.strip_suffix("tags").expect("a tags key").to_string()
                    }
                    None => PROFILES.to_string(),
                };
                let mut parts: BTreeMap<String, ProfileParts> = BTreeMap::new();
                for kv in self.store.list(&prefix).await?.kvs {
                    match CalicoKey::parse(&kv.key) {
                        Ok(CalicoKey::ProfileTags { profile }) => {
                            let tags: Option<Vec<String>> = decode(&kv.key, &kv.value)?;
                            parts.entry(profile).or_default().tags = Some(tags.unwrap_or_default());
                        }
                        Ok(CalicoKey::ProfileLabels { profile }) => {
                            parts.entry(profile).or_default().labels = decode(&kv.key, &kv.value)?;
                        }
                        Ok(CalicoKey::ProfileRules { profile }) => {
                            parts.entry(profile).or_default().rules = decode(&kv.key, &kv.value)?;
                        }
                        _ => {}
                    }
                }
                Ok(parts
                    .into_iter()
                    // Without tags there is no profile (libcalico-go read tags first).
                    .filter(|(n, p)| p.tags.is_some() && name.is_none_or(|want| want == n))
                    .map(|(n, p)| {
                        Resource::Profile(ProfileResource::from_backend(
                            &n, p.tags, p.labels, p.rules,
                        ))
                    })
                    .collect())
            }
        }
    }
}

#[derive(Default)]
struct ProfileParts {
    tags: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
    rules: Option<ProfileRules>,
}

const PROFILES: &str = "/calico/v1/policy/profile/";

fn policy_key(name: &str) -> String {
    CalicoKey::Policy {
        tier: "default".into(),
        name: name.into(),
    }
    .path()
}

fn policy_prefix() -> String {
    let key = policy_key("x");
    key[..key.len() - 1].to_string()
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, raw: &[u8]) -> Result<T, ResourceError> {
    serde_json::from_slice(raw).map_err(|e| ResourceError::Corrupt {
        key: key.into(),
        reason: e.to_string(),
    })
}

/// An ipPool's CLI name is its CIDR.
pub fn parse_pool_name(name: &str) -> Result<IpNetwork, ResourceError> {
    name.parse()
        .map_err(|_| ResourceError::Invalid(format!("invalid CIDR '{name}'")))
}
