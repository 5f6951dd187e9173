//! Untrusted bytes as one direction of an SSNTP stream: the decoder must return values or an
//! error, never panic, and never allocate more than its bounds allow. Whatever it decodes must
//! re-encode and decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssntp::{Encoder, StreamDecoder};

fuzz_target!(|data: &[u8]| {
    let mut decoder = StreamDecoder::new();
    let mut pos = 0;
    let mut messages = Vec::new();
    while pos < data.len() {
        match decoder.next(&data[pos..]) {
            Ok(Some((msg, used))) => {
                assert!(used > 0 && pos + used <= data.len());
                pos += used;
                messages.push(msg);
            }
            Ok(None) | Err(_) => break,
        }
    }
    let mut encoder = Encoder::new();
    let mut bytes = Vec::new();
    for m in &messages {
        encoder.encode(m, &mut bytes);
    }
    let mut again = StreamDecoder::new();
    let mut at = 0;
    for m in &messages {
        let (decoded, used) = again
            .next(&bytes[at..])
            .expect("our own encoding decodes")
            .expect("a whole message");
        at += used;
        assert_eq!(&decoded, m);
    }
});
