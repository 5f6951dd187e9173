//! What an [`Ipam`] remembers between calls: the blocks it has read or written (with their
//! revisions) and each host's affine blocks. Every use is validated by the transaction that
//! relies on it, so a stale entry costs one failed transaction, never a wrong allocation.

use ipnetwork::IpNetwork;

use super::{Ipam, IpamError, IpamResult};
use crate::calico::{AllocationBlock, CalicoKey, CalicoValue, IpamHandle, decode};
use crate::store::{KeyValue, Revision};

/// A block as last seen, with its revision.
#[derive(Clone, Debug)]
pub(super) struct Seen {
    pub block: AllocationBlock,
    pub revision: Revision,
}

/// A handle as last seen (`None`: absent).
pub(super) type SeenHandle = Option<(IpamHandle, Revision)>;

pub(super) fn parse_block(kv: &KeyValue) -> IpamResult<Seen> {
    let key =
        CalicoKey::parse(&super::as_calico_path(&kv.key)).map_err(|e| IpamError::Corrupt {
            key: kv.key.clone(),
            reason: e.reason,
        })?;
    match decode(&key, &kv.value) {
        Ok(CalicoValue::IpamBlock(block)) => Ok(Seen {
            block,
            revision: kv.mod_revision,
        }),
        Ok(_) => Err(IpamError::Corrupt {
            key: kv.key.clone(),
            reason: "not a block".into(),
        }),
        Err(e) => Err(IpamError::Corrupt {
            key: kv.key.clone(),
            reason: e.reason,
        }),
    }
}

pub(super) fn parse_handle(kv: &KeyValue) -> IpamResult<(IpamHandle, Revision)> {
    serde_json::from_slice(&kv.value)
        .map(|h| (h, kv.mod_revision))
        .map_err(|e| IpamError::Corrupt {
            key: kv.key.clone(),
            reason: format!("invalid handle: {e}"),
        })
}

pub(super) fn parse_handle_opt(kv: Option<&KeyValue>) -> IpamResult<SeenHandle> {
    kv.map(parse_handle).transpose()
}

impl Ipam {
    pub(super) fn cached_affine(&self, host: &str, v4: bool) -> Option<Vec<IpNetwork>> {
        let cache = self.affine.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(&(host.to_string(), v4)).cloned()
    }

    pub(super) fn set_affine(&self, host: &str, v4: bool, blocks: Option<Vec<IpNetwork>>) {
        let mut cache = self.affine.lock().unwrap_or_else(|p| p.into_inner());
        match blocks {
            Some(b) => cache.insert((host.to_string(), v4), b),
            None => cache.remove(&(host.to_string(), v4)),
        };
    }

    pub(super) fn cached(&self, cidr: &IpNetwork) -> Option<Seen> {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cidr)
            .cloned()
    }

    pub(super) fn remember(&self, cidr: IpNetwork, seen: Option<Seen>) {
        let mut cache = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        match seen {
            Some(s) => cache.insert(cidr, s),
            None => cache.remove(&cidr),
        };
    }

    /// Reads blocks and (optionally) a handle in one round trip.
    pub(super) async fn read_blocks(
        &self,
        cidrs: &[IpNetwork],
        handle: Option<&str>,
    ) -> IpamResult<(Vec<Option<Seen>>, SeenHandle)> {
        let mut keys: Vec<String> = cidrs.iter().map(|c| self.bkey(c)).collect();
        keys.extend(handle.map(|h| self.hkey(h)));
        let got = self.store.get_many(&keys).await?;
        let mut seen = Vec::with_capacity(cidrs.len());
        for (cidr, kv) in cidrs.iter().zip(&got) {
            let block = kv.as_ref().map(parse_block).transpose()?;
            self.remember(*cidr, block.clone());
            seen.push(block);
        }
        let handle = parse_handle_opt(got.get(cidrs.len()).and_then(Option::as_ref))?;
        Ok((seen, handle))
    }

    /// Reads a block and (optionally) a handle in one round trip.
    pub(super) async fn read(
        &self,
        cidr: &IpNetwork,
        handle: Option<&str>,
    ) -> IpamResult<(Option<Seen>, SeenHandle)> {
        let (mut seen, handle) = self.read_blocks(std::slice::from_ref(cidr), handle).await?;
        Ok((seen.pop().flatten(), handle))
    }
}
