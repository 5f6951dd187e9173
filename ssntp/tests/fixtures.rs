//! The gob streams written by ciao's Go code (tests/fixtures, copied from
//! ../shared/fixtures/ssntp) decode to the
//! documented values, and encoding those values gives the same bytes.

use ssntp::{
    ConnectFrame, ConnectedFrame, Encoder, Frame, FrameTrace, GoTime, Header, Message, Node,
    StreamDecoder,
};

// Copied from ../shared/fixtures/ssntp (ciao Go output) so that a clean clone has them.
const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{DIR}{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn decode_all(bytes: &[u8]) -> Vec<Message> {
    let mut d = StreamDecoder::new();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let (m, n) = d.next(&bytes[pos..]).unwrap().expect("a whole message");
        out.push(m);
        pos += n;
    }
    out
}

fn encode_all(msgs: &[Message]) -> Vec<u8> {
    let mut e = Encoder::new();
    let mut out = Vec::new();
    for m in msgs {
        e.encode(m, &mut out);
    }
    out
}

const CLIENT: &[u8; 16] = b"0123456789abcdef";
const SERVER: &[u8; 16] = b"fedcba9876543210";

fn client_stream() -> Vec<Message> {
    let added = "concentrator_instance_added:\n  instance_uuid: 67d86208-b46c-4465-9018-e14187d4010d\n  tenant_uuid: \"\"\n  concentrator_ip: 192.168.0.110\n  concentrator_mac: \"02:00:ff:00:00:01\"\n";
    let tenant = "tenant_added:\n  agent_uuid: 2400bce6-ccc8-4a45-b2aa-b5cc3790077b\n  agent_ip: 10.3.66.71\n  tenant_uuid: 67d86208-000-4465-9018-fe14087d415f\n  tenant_subnet: 172.16.0.0/24\n  concentrator_uuid: 67d86208-b46c-4465-9018-e14187d4010d\n  concentrator_ip: 192.168.0.110\n  subnet_key: 4268\n";
    let event = |operand: u8, payload: &str| {
        Message::Frame(Frame {
            header: Header {
                minor: 1,
                kind: 3,
                operand,
                ..Header::default()
            },
            origin: *CLIENT,
            payload_length: payload.len() as u32,
            payload: payload.as_bytes().to_vec(),
            ..Frame::default()
        })
    };
    vec![
        Message::Connect(ConnectFrame {
            header: Header {
                minor: 1,
                ..Header::default()
            },
            role: 0x20,
            source: CLIENT.to_vec(),
            destination: vec![0; 16],
        }),
        event(3, added),
        event(0, tenant),
    ]
}

fn server_stream() -> Vec<Message> {
    let configure = "configure:\n  scheduler:\n    storage_uri: /etc/ciao/configuration.yaml\n  launcher:\n    compute_net:\n    - 10.3.66.0/24\n    mgmt_net:\n    - 10.3.66.0/24\n";
    let assign = "assign_public_ip:\n  concentrator_uuid: 67d86208-b46c-4465-9018-e14187d4010d\n  tenant_uuid: 67d86208-000-4465-9018-fe14087d415f\n  instance_uuid: 3390740c-dce9-48d6-b83a-a717417072ce\n  public_ip: 10.1.2.3\n  private_ip: 192.168.1.2\n  vnic_mac: \"02:00:e6:f5:00:02\"\n";
    let ready = "ready:\n  node_uuid: 2400bce6-ccc8-4a45-b2aa-b5cc3790077b\n  mem_total_mb: 3896\n";
    // 2017-12-01T10:20:30.123456789Z
    let start = GoTime::from_unix(1_512_123_630, 123_456_789);
    let tx = GoTime {
        nanos: start.nanos + 1_500_000,
        ..start
    };
    vec![
        Message::Connected(ConnectedFrame {
            header: Header {
                minor: 1,
                kind: 1,
                ..Header::default()
            },
            role: 0x08,
            source: SERVER.to_vec(),
            destination: CLIENT.to_vec(),
            payload_length: configure.len() as u32,
            payload: configure.as_bytes().to_vec(),
        }),
        Message::Frame(Frame {
            header: Header {
                minor: 1,
                kind: 0,
                operand: 5,
                ..Header::default()
            },
            origin: *b"ORIGINORIGIN1234",
            payload_length: assign.len() as u32,
            payload: assign.as_bytes().to_vec(),
            ..Frame::default()
        }),
        Message::Frame(Frame {
            header: Header {
                minor: 1,
                kind: 2,
                operand: 4,
                ..Header::default()
            },
            origin: *SERVER,
            ..Frame::default()
        }),
        Message::Frame(Frame {
            header: Header {
                major: 0x80,
                minor: 1,
                kind: 1,
                operand: 1,
            },
            origin: *SERVER,
            payload_length: ready.len() as u32,
            trace: Some(FrameTrace {
                label: b"trace-label".to_vec(),
                start_timestamp: start,
                end_timestamp: GoTime::default(),
                path_length: 1,
                path: vec![Node {
                    uuid: SERVER.to_vec(),
                    role: 0x08,
                    tx_timestamp: tx,
                    rx_timestamp: start,
                }],
            }),
            payload: ready.as_bytes().to_vec(),
        }),
    ]
}

#[test]
fn streams_decode_to_the_documented_values_and_encode_back() {
    for (file, want) in [
        ("client_stream.gob", client_stream()),
        ("server_stream.gob", server_stream()),
    ] {
        let bytes = read(file);
        assert_eq!(decode_all(&bytes), want, "{file}");
        assert_eq!(encode_all(&want), bytes, "{file}: encoding differs");
    }
}

#[test]
fn single_values_carry_their_own_type_definitions() {
    let c = client_stream();
    let s = server_stream();
    for (file, value) in [
        ("connect_only.gob", &c[0]),
        ("frame_event_tenant_added.gob", &c[2]),
        ("connected_only.gob", &s[0]),
        ("frame_error_no_payload.gob", &s[2]),
        ("frame_traced_status.gob", &s[3]),
    ] {
        let bytes = read(file);
        assert_eq!(decode_all(&bytes), std::slice::from_ref(value), "{file}");
        assert_eq!(
            encode_all(std::slice::from_ref(value)),
            bytes,
            "{file}: encoding differs"
        );
    }
}

#[test]
fn every_prefix_is_incomplete_or_an_error_never_a_panic() {
    let bytes = read("server_stream.gob");
    for cut in 0..bytes.len() {
        let mut d = StreamDecoder::new();
        let _ = d.next(&bytes[..cut]);
    }
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0xff;
        let mut d = StreamDecoder::new();
        let mut pos = 0;
        while pos < b.len() {
            match d.next(&b[pos..]) {
                Ok(Some((_, n))) => pos += n,
                _ => break,
            }
        }
    }
}

fn payload_of(m: &Message) -> &[u8] {
    match m {
        Message::Frame(f) => &f.payload,
        Message::Connected(c) => &c.payload,
        Message::Connect(_) => panic!("CONNECT has no payload"),
    }
}

/// The YAML payloads Go wrote parse into ssntp's payload types with the documented values,
/// and the frames' operands map to the right constants.
#[test]
fn fixture_payloads_parse_into_payload_types() {
    use ssntp::payload::*;
    use ssntp::{Command, Event, Operation, Status};

    let client = decode_all(&read("client_stream.gob"));
    let Message::Frame(f) = &client[1] else {
        panic!()
    };
    assert_eq!(
        f.operation(),
        Some(Operation::Event(Event::ConcentratorInstanceAdded))
    );
    let cia = ConcentratorInstanceAdded::from_yaml(payload_of(&client[1])).unwrap();
    assert_eq!(
        cia.concentrator_instance_added.concentrator_mac,
        "02:00:ff:00:00:01"
    );
    assert_eq!(cia.concentrator_instance_added.tenant_uuid, "");
    let ta = TenantAdded::from_yaml(payload_of(&client[2]))
        .unwrap()
        .tenant_added;
    assert_eq!(ta.subnet_key, 4268);
    assert_eq!(ta.tenant_subnet, "172.16.0.0/24");
    assert_eq!(ta.concentrator_uuid, "67d86208-b46c-4465-9018-e14187d4010d");
    assert_eq!(ta.agent_ip, "10.3.66.71");

    let server = decode_all(&read("server_stream.gob"));
    let Message::Connected(c) = &server[0] else {
        panic!()
    };
    assert_eq!(
        Operation::from_header(&c.header),
        Some(Operation::Status(Status::Connected))
    );
    let cfg = Configure::from_yaml(payload_of(&server[0]))
        .unwrap()
        .configure;
    let launcher = cfg.launcher.unwrap();
    assert_eq!(launcher.compute_net, vec!["10.3.66.0/24"]);
    assert_eq!(launcher.mgmt_net, vec!["10.3.66.0/24"]);
    assert_eq!(
        cfg.scheduler.unwrap().storage_uri,
        "/etc/ciao/configuration.yaml"
    );
    let Message::Frame(f) = &server[1] else {
        panic!()
    };
    assert_eq!(
        f.operation(),
        Some(Operation::Command(Command::AssignPublicIp))
    );
    let a = AssignPublicIp::from_yaml(payload_of(&server[1]))
        .unwrap()
        .assign_public_ip;
    assert_eq!(a.vnic_mac, "02:00:e6:f5:00:02");
    assert_eq!(a.public_ip, "10.1.2.3");
    let Message::Frame(f) = &server[2] else {
        panic!()
    };
    assert_eq!(
        f.operation(),
        Some(Operation::Error(ssntp::ErrorCode::ConnectionAborted))
    );
}

/// The decoder consumes nothing until a whole value is there, so feeding a stream byte by
/// byte (as a slow TCP peer would) gives the same messages.
#[test]
fn byte_at_a_time_feeding_decodes_the_same() {
    for name in ["client_stream.gob", "server_stream.gob"] {
        let bytes = read(name);
        let mut d = StreamDecoder::new();
        let (mut start, mut end, mut out) = (0, 0, Vec::new());
        while end < bytes.len() {
            end += 1;
            if let Some((m, n)) = d.next(&bytes[start..end]).unwrap() {
                start += n;
                out.push(m);
            }
        }
        assert_eq!(out, decode_all(&bytes), "{name}");
    }
}
