use tenet::net::NetError;

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
    #[error("links still present after the reset: {0}")]
    ResetIncomplete(String),
}

impl CnError {
    pub fn config(field: &'static str, why: impl Into<String>) -> Self {
        CnError::Config {
            field,
            why: why.into(),
        }
    }
}
