//! Untrusted bytes on Felix's pipe (fd 3): the framing and protobuf decoding must return a
//! message or an error, never panic or allocate past the length cap; whatever decodes must
//! re-encode to the same message; and the messages, taken by the dataplane, must render to
//! restore text in which every line is whole (no value may split or inject a line).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tenet::net::firewall::batch::{Saved, full};
use tenet::policy::dataplane::PolicyDataplane;
use tenet::policy::proto::{ToDataplane, decode_frame};
use tenet::policy::render::WorkloadHook;

fuzz_target!(|data: &[u8]| {
    let mut dp = PolicyDataplane::offline(WorkloadHook::Bridged {
        prefixes: vec!["tvn_".into()],
    });
    let mut pos = 0;
    while pos < data.len() {
        match decode_frame::<ToDataplane>(&data[pos..]) {
            Ok(Some((msg, used))) => {
                assert!(used >= 8 && pos + used <= data.len());
                pos += used;
                let again = ToDataplane::decode(msg.encode_to_vec().as_slice())
                    .expect("our own encoding decodes");
                assert_eq!(again, msg);
                if let Some(p) = msg.payload {
                    dp.handle(p);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    let (rulesets, set_ops) = dp.desired();
    for (_, rules) in &rulesets {
    let (batches, _) = full(rules, &Saved::parse(""));
    for (_, text) in &batches {
        for line in text.lines() {
            assert!(
                line.starts_with('*')
                    || line.starts_with(':')
                    || line.starts_with("-A ")
                    || line.starts_with("-I ")
                    || line.starts_with("-X ")
                    || line == "COMMIT",
                "a broken restore line: {line:?}"
            );
        }
    }
    }
    for op in &set_ops {
        assert!(!op.contains('\n'), "a broken ipset line: {op:?}");
        let verb = op.split(' ').next().unwrap_or_default();
        assert!(
            matches!(verb, "create" | "flush" | "add" | "del" | "swap" | "destroy"),
            "{op:?}"
        );
    }
});
