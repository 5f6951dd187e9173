//! Untrusted YAML payloads through the parsers the scheduler and agents use: errors, no panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssntp::payload::*;

fuzz_target!(|data: &[u8]| {
    let _ = TenantAdded::from_yaml(data);
    let _ = AssignPublicIp::from_yaml(data);
    let _ = CnciRefresh::from_yaml(data);
    let _ = Start::from_yaml(data);
    let _ = Configure::from_yaml(data);
    let _ = PublicIpFailure::from_yaml(data);
});
