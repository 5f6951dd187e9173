use tenet::net::{Leftovers, NetError};

#[derive(Debug, thiserror::Error)]
pub enum CnError {
    /// The request is wrong; nothing was changed.
    #[error("invalid VNIC config: {field}: {why}")]
    Config { field: &'static str, why: String },
    /// The kernel refused something; what this call created has been removed again.
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("underlay discovery: {0}")]
    Discovery(String),
    #[error("timed out after {seconds}s waiting for {what} being created by another call")]
    Timeout { what: String, seconds: u64 },
    #[error("cancelled before it started")]
    Cancelled,
    /// A call this one waited on failed.
    #[error("{what} could not be created: {why}")]
    Dependency { what: String, why: String },
    /// The call failed, and undoing what it had done failed too: `leftovers` names what is
    /// left behind (the next `rebuild` takes it up).
    #[error("{cause}; {leftovers}")]
    Incomplete {
        cause: Box<CnError>,
        leftovers: Leftovers,
    },
}

impl CnError {
    /// This error, with what its rollback could not undo (unchanged if that is nothing).
    pub fn with_leftovers(self, leftovers: Leftovers) -> Self {
        if leftovers.is_empty() {
            self
        } else {
            CnError::Incomplete {
                cause: Box::new(self),
                leftovers,
            }
        }
    }

    pub fn config(field: &'static str, why: impl Into<String>) -> Self {
        CnError::Config {
            field,
            why: why.into(),
        }
    }
}
