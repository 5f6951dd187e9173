//! Felix's status report (§1.13).

use serde::{Deserialize, Serialize};

use super::scalar::go_float;

/// `/calico/felix/v1/host/<h>/status` (TTL 90 s) and `last_reported_status` (no TTL).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FelixStatus {
    /// ISO-8601 UTC time, kept as written.
    pub time: String,
    #[serde(serialize_with = "go_float")]
    pub uptime: f64,
    pub first_update: bool,
}
