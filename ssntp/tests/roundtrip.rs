//! Encode → decode is the identity for random frames (with and without traces), and random
//! input never panics the decoder.

use proptest::collection::vec;
use proptest::prelude::*;
use ssntp::{Encoder, Frame, FrameTrace, GoTime, Header, Message, Node, StreamDecoder};

fn time() -> impl Strategy<Value = GoTime> {
    prop_oneof![
        Just(GoTime::default()),
        (0i64..4_000_000_000, 0u32..1_000_000_000).prop_map(|(s, n)| GoTime::from_unix(s, n)),
    ]
}

fn node() -> impl Strategy<Value = Node> {
    (vec(any::<u8>(), 0..20), any::<u32>(), time(), time()).prop_map(|(uuid, role, tx, rx)| Node {
        uuid,
        role,
        tx_timestamp: tx,
        rx_timestamp: rx,
    })
}

fn frame() -> impl Strategy<Value = Frame> {
    let trace = (
        vec(any::<u8>(), 0..12),
        time(),
        time(),
        any::<u8>(),
        vec(node(), 0..4),
    )
        .prop_map(|(label, s, e, n, path)| FrameTrace {
            label,
            start_timestamp: s,
            end_timestamp: e,
            path_length: n,
            path,
        });
    (
        any::<[u8; 4]>(),
        any::<[u8; 16]>(),
        any::<u32>(),
        proptest::option::of(trace),
        vec(any::<u8>(), 0..300),
    )
        .prop_map(|(h, origin, len, trace, payload)| Frame {
            header: Header {
                major: h[0],
                minor: h[1],
                kind: h[2],
                operand: h[3],
            },
            origin,
            payload_length: len,
            trace,
            payload,
        })
}

proptest! {
    #[test]
    fn frames_round_trip(frames in vec(frame(), 1..5)) {
        let mut e = Encoder::new();
        let mut bytes = Vec::new();
        for f in &frames {
            e.encode(&Message::Frame(f.clone()), &mut bytes);
        }
        let mut d = StreamDecoder::new();
        let mut pos = 0;
        for f in &frames {
            let (m, n) = d.next(&bytes[pos..]).unwrap().unwrap();
            prop_assert_eq!(m, Message::Frame(f.clone()));
            pos += n;
        }
        prop_assert_eq!(pos, bytes.len());
    }

    #[test]
    fn random_input_never_panics(bytes in vec(any::<u8>(), 0..400)) {
        let _ = StreamDecoder::new().next(&bytes);
    }
}
