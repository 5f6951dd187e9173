//! CNI error objects: `{"cniVersion","code","msg","details"}` on stdout, and a non-zero exit.

use serde::Serialize;

/// The spec's well-known codes, and tenet's own (100 and up, as the spec reserves them for
/// plugins).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// The container is unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid or missing environment variables (CNI_COMMAND, CNI_CONTAINERID, …).
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// I/O failure (stdin unreadable).
    pub const IO_FAILURE: u32 = 5;
    /// The network configuration is not JSON.
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network configuration (a field missing or wrong, or refused by tenet-cn as such).
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Try again later: tenet-cn is not reachable.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// tenet-cn could not add the container (its reason is in `msg`).
    pub const REFUSED: u32 = 100;
    /// No free address left in the subnet or pool.
    pub const NO_FREE_ADDRESS: u32 = 101;
    /// CHECK: the container's network is not what ADD made.
    pub const CHECK_FAILED: u32 = 102;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", details_suffix(.details))]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

fn details_suffix(details: &str) -> String {
    match details {
        "" => String::new(),
        d => format!(" ({d})"),
    }
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn config(msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self::new(code::INVALID_NETWORK_CONFIG, msg, details)
    }

    pub fn env(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENVIRONMENT, msg, "")
    }

    /// The JSON the runtime reads, in `version`.
    pub fn to_json(&self, version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            #[serde(flatten)]
            error: &'a CniError,
        }
        serde_json::to_string(&Wire {
            cni_version: version,
            error: self,
        })
        .expect("errors serialise")
    }
}
