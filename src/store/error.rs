use super::Revision;

pub type StoreResult<T> = Result<T, StoreError>;

/// Datastore errors. Every variant names the key (or prefix) it concerns, so a caller can
/// report it without extra context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("resource already exists: {key}")]
    AlreadyExists { key: String },
    #[error("update conflict: '{key}'")]
    Conflict { key: String },
    #[error("resource does not exist: {key}")]
    NotFound { key: String },
    #[error("datastore unavailable ({key}): {reason}")]
    Unavailable { key: String, reason: String },
    #[error("revision {requested} of {key} has been compacted (oldest available: {compacted})")]
    Compacted {
        key: String,
        requested: Revision,
        compacted: Revision,
    },
    #[error("invalid request for {key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl StoreError {
    /// The key or prefix the error concerns.
    pub fn key(&self) -> &str {
        match self {
            StoreError::AlreadyExists { key }
            | StoreError::Conflict { key }
            | StoreError::NotFound { key }
            | StoreError::Unavailable { key, .. }
            | StoreError::Compacted { key, .. }
            | StoreError::Invalid { key, .. } => key,
        }
    }

    /// True for errors that a retry may cure (the datastore was unreachable).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}
