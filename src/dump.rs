//! `tenet dump`: every key under a prefix with the kind of object it decodes to.

use serde::Serialize;

use crate::calico::{self, CalicoKey};
use crate::keyspace;
use crate::store::{Datastore, Revision, StoreResult};

/// One listed key.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DumpEntry {
    pub key: String,
    pub revision: Revision,
    /// What the key is (e.g. `WorkloadEndpoint`), or `Unknown` for a key outside the models.
    pub kind: String,
    /// The decoded value, or why it does not decode.
    #[serde(flatten)]
    pub decoded: Decoded,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decoded {
    Value(serde_json::Value),
    Error(String),
}

impl DumpEntry {
    pub fn is_valid(&self) -> bool {
        matches!(self.decoded, Decoded::Value(_))
    }
}

/// Classifies and decodes one stored key.
pub fn describe(key: &str, revision: Revision, raw: &[u8]) -> DumpEntry {
    let (kind, decoded) = if key.starts_with(keyspace::TENET_ROOT) {
        match keyspace::decode(key, raw) {
            Ok(v) => (
                v.kind().to_string(),
                Ok(serde_json::to_value(v).unwrap_or_default()),
            ),
            Err(e) => ("Tenet".to_string(), Err(e)),
        }
    } else {
        match CalicoKey::parse(key) {
            Ok(k) => {
                let decoded = calico::decode(&k, raw)
                    .map(|v| serde_json::to_value(v).unwrap_or_default())
                    .map_err(|e| e.reason);
                (k.kind().to_string(), decoded)
            }
            Err(e) => ("Unknown".to_string(), Err(e.reason)),
        }
    };
    DumpEntry {
        key: key.to_string(),
        revision,
        kind,
        decoded: match decoded {
            Ok(v) => Decoded::Value(v),
            Err(e) => Decoded::Error(e),
        },
    }
}

/// Lists and decodes every key under `prefix`.
pub async fn dump(store: &dyn Datastore, prefix: &str) -> StoreResult<Vec<DumpEntry>> {
    let listing = store.list(prefix).await?;
    Ok(listing
        .kvs
        .iter()
        .map(|kv| describe(&kv.key, kv.mod_revision, &kv.value))
        .collect())
}
