use tenet::net::{Leftovers, NetError};
use tenet::process::ProcessError;

#[derive(Debug, thiserror::Error)]
pub enum CnciError {
    /// The request is wrong; nothing was changed.
    #[error("invalid request: {field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("underlay discovery: {0}")]
    Discovery(String),
    #[error("firewall: {0}")]
    Firewall(#[from] tenet::net::firewall::FirewallError),
    #[error("datastore: {0}")]
    Store(#[from] tenet::store::StoreError),
    /// dnsmasq for a subnet could not be started, reloaded or stopped.
    #[error("DHCP for subnet {subnet}: {cause}")]
    Dhcp {
        subnet: String,
        #[source]
        cause: ProcessError,
    },
    /// A file under the run directory.
    #[error("{what} {path}: {cause}")]
    File {
        what: &'static str,
        path: String,
        #[source]
        cause: std::io::Error,
    },
    /// The call failed, and undoing what it had done failed too: `leftovers` names what is
    /// left behind (the next `rebuild` takes it up).
    #[error("{cause}; {leftovers}")]
    Incomplete {
        cause: Box<CnciError>,
        leftovers: Leftovers,
    },
}

impl CnciError {
    pub fn invalid(field: &'static str, why: impl Into<String>) -> Self {
        CnciError::Invalid {
            field,
            why: why.into(),
        }
    }

    pub fn with_leftovers(self, leftovers: Leftovers) -> Self {
        if leftovers.is_empty() {
            self
        } else {
            CnciError::Incomplete {
                cause: Box::new(self),
                leftovers,
            }
        }
    }

    pub(crate) fn file(what: &'static str, path: &std::path::Path, cause: std::io::Error) -> Self {
        CnciError::File {
            what,
            path: path.display().to_string(),
            cause,
        }
    }
}
