//! IPAM errors. The messages of the variants calicoctl users meet keep Calico's wording.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::MAX_RETRIES;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{key}: inconsistent IPAM data: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("No configured Calico pools")]
    NoPools,
    #[error("The given pool ({0}) does not exist")]
    PoolNotFound(IpNetwork),
    #[error("{0} is not an IPv{1} pool")]
    WrongPoolVersion(IpNetwork, u8),
    #[error("The provided IP address {0} is not in a configured pool")]
    NotInPool(IpAddr),
    #[error("Address {0} is already assigned in block")]
    AlreadyAssigned(IpAddr),
    #[error("{0} is not assigned")]
    NotAssigned(IpAddr),
    #[error("IP {0} is not currently assigned in block")]
    NotAssignedInBlock(IpAddr),
    #[error("Block host affinity of {block} ({affinity}) does not match host {host}")]
    AffinityMismatch {
        block: IpNetwork,
        affinity: String,
        host: String,
    },
    #[error("The requested CIDR ({0}) is smaller than the minimum.")]
    CidrTooSmall(IpNetwork),
    #[error("The requested CIDR ({0}) is not within any configured pools.")]
    CidrNotInPool(IpNetwork),
    #[error("handle {0} does not exist")]
    HandleNotFound(String),
    #[error("Cannot change IPAM config while allocations exist")]
    ConfigInUse,
    #[error("Cannot disable 'StrictAffinity' and 'AutoAllocateBlocks' at the same time")]
    ConfigInvalid,
    #[error("no free address left in {0}")]
    NoFreeAddress(IpNetwork),
    #[error("{0} is the subnet's network, gateway or broadcast address")]
    Reserved(IpAddr),
    #[error("a hostname must be specified")]
    NoHost,
    #[error("invalid pool {cidr}: {reason}")]
    InvalidPool { cidr: IpNetwork, reason: String },
    #[error("gave up on {key} after {MAX_RETRIES} conflicting attempts")]
    MaxRetries { key: String },
}

pub type IpamResult<T> = Result<T, IpamError>;
