//! ciao's three SSNTP structs and their gob encoding, with the type ids and definition order
//! a Go ciao process uses, so that encoding gives Go's bytes.

use crate::gob::wire::{Reader, put_bytes, put_int, put_uint};
use crate::gob::{GobError, T_BYTES, T_UINT, Value};

/// `time.Time` as Go's MarshalBinary writes it (version 1): seconds since 0001-01-01 UTC,
/// nanoseconds, and the zone offset in minutes (-1 = UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct GoTime {
    pub seconds: i64,
    pub nanos: i32,
    pub offset_minutes: i16,
}

/// Seconds from 0001-01-01 to 1970-01-01.
const UNIX_TO_INTERNAL: i64 = 62_135_596_800;

impl GoTime {
    pub fn is_zero(&self) -> bool {
        self.seconds == 0 && self.nanos == 0
    }

    pub fn from_unix(secs: i64, nanos: u32) -> Self {
        GoTime {
            seconds: secs + UNIX_TO_INTERNAL,
            nanos: nanos as i32,
            offset_minutes: -1,
        }
    }

    pub fn unix_seconds(&self) -> i64 {
        self.seconds - UNIX_TO_INTERNAL
    }

    fn marshal(&self) -> [u8; 15] {
        let mut b = [0u8; 15];
        b[0] = 1;
        b[1..9].copy_from_slice(&self.seconds.to_be_bytes());
        b[9..13].copy_from_slice(&self.nanos.to_be_bytes());
        b[13..15].copy_from_slice(&self.offset_minutes.to_be_bytes());
        b
    }

    fn unmarshal(b: &[u8]) -> Result<Self, GobError> {
        // Version 2 adds a seconds-of-offset byte; both are what Go may send.
        let ok = matches!((b.first(), b.len()), (Some(1), 15) | (Some(2), 16));
        if !ok {
            return Err(GobError::invalid("time.Time: unsupported binary form"));
        }
        Ok(GoTime {
            seconds: i64::from_be_bytes(b[1..9].try_into().expect("8 bytes")),
            nanos: i32::from_be_bytes(b[9..13].try_into().expect("4 bytes")),
            offset_minutes: i16::from_be_bytes([b[13], b[14]]),
        })
    }
}

/// The first four fields of every SSNTP struct: version (bit 7 of `major` = path trace),
/// frame type (COMMAND, STATUS, ERROR, EVENT) and operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Header {
    pub major: u8,
    pub minor: u8,
    pub kind: u8,
    pub operand: u8,
}

impl Header {
    fn encode(&self, f: &mut Fields<'_>) {
        f.uint(0, u64::from(self.major));
        f.uint(1, u64::from(self.minor));
        f.uint(2, u64::from(self.kind));
        f.uint(3, u64::from(self.operand));
    }

    fn decode(v: &Value) -> Result<Self, GobError> {
        let g = |n: &str| v.field(n);
        Ok(Header {
            major: as_u64(g("Major"), "Major", U8)? as u8,
            minor: as_u64(g("Minor"), "Minor", U8)? as u8,
            kind: as_u64(g("Type"), "Type", U8)? as u8,
            operand: as_u64(g("Operand"), "Operand", U8)? as u8,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectFrame {
    pub header: Header,
    pub role: u32,
    pub source: Vec<u8>,
    pub destination: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectedFrame {
    pub header: Header,
    pub role: u32,
    pub source: Vec<u8>,
    pub destination: Vec<u8>,
    pub payload_length: u32,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    pub uuid: Vec<u8>,
    pub role: u32,
    pub tx_timestamp: GoTime,
    pub rx_timestamp: GoTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FrameTrace {
    pub label: Vec<u8>,
    pub start_timestamp: GoTime,
    pub end_timestamp: GoTime,
    pub path_length: u8,
    pub path: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Frame {
    pub header: Header,
    /// UUID of the node that first sent the frame; forwarding keeps it.
    pub origin: [u8; 16],
    pub payload_length: u32,
    pub trace: Option<FrameTrace>,
    pub payload: Vec<u8>,
}

/// A value read from an SSNTP stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Connect(ConnectFrame),
    Connected(ConnectedFrame),
    Frame(Frame),
}

// Type ids as a Go ciao process assigns them (fixtures/ssntp): ConnectFrame first, then Frame
// and its parts, then ConnectedFrame.
const ID_CONNECT: i64 = 65;
const ID_FRAME: i64 = 66;
const ID_UUID: i64 = 67;
const ID_TRACE: i64 = 68;
const ID_TIME: i64 = 69;
const ID_NODE: i64 = 70;
const ID_NODES: i64 = 71;
const ID_CONNECTED: i64 = 72;

/// A struct definition: `wireType{StructT: {CommonType{name, id}, Field: [...]}}`.
fn struct_def(id: i64, name: &str, fields: &[(&str, i64)]) -> Vec<u8> {
    let mut b = Vec::new();
    put_int(&mut b, -id);
    b.extend_from_slice(&[3, 1, 1]); // StructT, CommonType, Name
    put_bytes(&mut b, name.as_bytes());
    b.push(1);
    put_int(&mut b, id);
    b.push(0); // end CommonType
    b.push(1);
    put_uint(&mut b, fields.len() as u64);
    for (fname, fid) in fields {
        b.push(1);
        put_bytes(&mut b, fname.as_bytes());
        b.push(1);
        put_int(&mut b, *fid);
        b.push(0);
    }
    b.extend_from_slice(&[0, 0]);
    b
}

fn common(b: &mut Vec<u8>, name: &str, id: i64) {
    b.extend_from_slice(&[1, 1]);
    put_bytes(b, name.as_bytes());
    b.push(1);
    put_int(b, id);
    b.push(0);
}

fn type_defs(id: i64) -> Vec<Vec<u8>> {
    let u = T_UINT;
    match id {
        ID_CONNECT => vec![struct_def(
            ID_CONNECT,
            "ConnectFrame",
            &[
                ("Major", u),
                ("Minor", u),
                ("Type", u),
                ("Operand", u),
                ("Role", u),
                ("Source", T_BYTES),
                ("Destination", T_BYTES),
            ],
        )],
        ID_CONNECTED => vec![struct_def(
            ID_CONNECTED,
            "ConnectedFrame",
            &[
                ("Major", u),
                ("Minor", u),
                ("Type", u),
                ("Operand", u),
                ("Role", u),
                ("Source", T_BYTES),
                ("Destination", T_BYTES),
                ("PayloadLength", u),
                ("Payload", T_BYTES),
            ],
        )],
        ID_FRAME => {
            let frame = struct_def(
                ID_FRAME,
                "Frame",
                &[
                    ("Major", u),
                    ("Minor", u),
                    ("Type", u),
                    ("Operand", u),
                    ("Origin", ID_UUID),
                    ("PayloadLength", u),
                    ("Trace", ID_TRACE),
                    ("Payload", T_BYTES),
                ],
            );
            let mut uuid = Vec::new();
            put_int(&mut uuid, -ID_UUID);
            uuid.push(1); // ArrayT
            common(&mut uuid, "UUID", ID_UUID);
            uuid.push(1);
            put_int(&mut uuid, u);
            uuid.push(1);
            put_int(&mut uuid, 16);
            uuid.extend_from_slice(&[0, 0]);
            let trace = struct_def(
                ID_TRACE,
                "FrameTrace",
                &[
                    ("Label", T_BYTES),
                    ("StartTimestamp", ID_TIME),
                    ("EndTimestamp", ID_TIME),
                    ("PathLength", u),
                    ("Path", ID_NODES),
                ],
            );
            let mut time = Vec::new();
            put_int(&mut time, -ID_TIME);
            time.push(5); // GobEncoderT
            common(&mut time, "Time", ID_TIME);
            time.extend_from_slice(&[0, 0]);
            let mut nodes = Vec::new();
            put_int(&mut nodes, -ID_NODES);
            nodes.push(2); // SliceT
            common(&mut nodes, "[]ssntp.Node", ID_NODES);
            nodes.push(1);
            put_int(&mut nodes, ID_NODE);
            nodes.extend_from_slice(&[0, 0]);
            let node = struct_def(
                ID_NODE,
                "Node",
                &[
                    ("UUID", T_BYTES),
                    ("Role", u),
                    ("TxTimestamp", ID_TIME),
                    ("RxTimestamp", ID_TIME),
                ],
            );
            vec![frame, uuid, trace, time, nodes, node]
        }
        _ => Vec::new(),
    }
}

/// Writes a struct value field by field, skipping zero values as Go does.
struct Fields<'a> {
    out: &'a mut Vec<u8>,
    last: i64,
}

impl<'a> Fields<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        Fields { out, last: -1 }
    }
    fn delta(&mut self, field: i64) {
        put_uint(self.out, (field - self.last) as u64);
        self.last = field;
    }
    fn uint(&mut self, field: i64, v: u64) {
        if v != 0 {
            self.delta(field);
            put_uint(self.out, v);
        }
    }
    fn bytes(&mut self, field: i64, v: &[u8]) {
        if !v.is_empty() {
            self.delta(field);
            put_bytes(self.out, v);
        }
    }
    fn time(&mut self, field: i64, t: &GoTime) {
        if !t.is_zero() {
            self.delta(field);
            put_bytes(self.out, &t.marshal());
        }
    }
    fn end(self) {
        self.out.push(0);
    }
}

fn encode_trace(out: &mut Vec<u8>, t: &FrameTrace) {
    let mut f = Fields::new(out);
    f.bytes(0, &t.label);
    f.time(1, &t.start_timestamp);
    f.time(2, &t.end_timestamp);
    f.uint(3, u64::from(t.path_length));
    if !t.path.is_empty() {
        f.delta(4);
        put_uint(f.out, t.path.len() as u64);
        for n in &t.path {
            let mut g = Fields::new(f.out);
            g.bytes(0, &n.uuid);
            g.uint(1, u64::from(n.role));
            g.time(2, &n.tx_timestamp);
            g.time(3, &n.rx_timestamp);
            g.end();
        }
    }
    f.end();
}

/// The fields ConnectFrame and ConnectedFrame share: header, role, source, destination.
fn encode_peer(f: &mut Fields<'_>, h: &Header, role: u32, source: &[u8], destination: &[u8]) {
    h.encode(f);
    f.uint(4, u64::from(role));
    f.bytes(5, source);
    f.bytes(6, destination);
}

/// Encodes one direction of an SSNTP stream: type definitions go out before the first value
/// of their type, once.
#[derive(Default)]
pub struct Encoder {
    sent: Vec<i64>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    fn message(out: &mut Vec<u8>, body: &[u8]) {
        put_uint(out, body.len() as u64);
        out.extend_from_slice(body);
    }

    fn types(&mut self, out: &mut Vec<u8>, id: i64) {
        if !self.sent.contains(&id) {
            for def in type_defs(id) {
                Self::message(out, &def);
            }
            self.sent.push(id);
        }
    }

    pub fn encode(&mut self, msg: &Message, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        let id = match msg {
            Message::Connect(c) => {
                put_int(&mut body, ID_CONNECT);
                let mut f = Fields::new(&mut body);
                encode_peer(&mut f, &c.header, c.role, &c.source, &c.destination);
                f.end();
                ID_CONNECT
            }
            Message::Connected(c) => {
                put_int(&mut body, ID_CONNECTED);
                let mut f = Fields::new(&mut body);
                encode_peer(&mut f, &c.header, c.role, &c.source, &c.destination);
                f.uint(7, u64::from(c.payload_length));
                f.bytes(8, &c.payload);
                f.end();
                ID_CONNECTED
            }
            Message::Frame(fr) => return self.encode_frame(fr, out),
        };
        self.types(out, id);
        Self::message(out, &body);
    }

    /// `encode(&Message::Frame(..))` without owning the frame: what a forwarder sends to many
    /// sessions.
    pub fn encode_frame(&mut self, fr: &Frame, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        put_int(&mut body, ID_FRAME);
        let mut f = Fields::new(&mut body);
        fr.header.encode(&mut f);
        // Go sends arrays even when they are all zeros.
        f.delta(4);
        put_uint(f.out, 16);
        for b in fr.origin {
            put_uint(f.out, u64::from(b));
        }
        f.uint(5, u64::from(fr.payload_length));
        if let Some(t) = &fr.trace {
            f.delta(6);
            encode_trace(f.out, t);
        }
        f.bytes(7, &fr.payload);
        f.end();
        self.types(out, ID_FRAME);
        Self::message(out, &body);
    }
}

fn as_u64(v: Option<&Value>, what: &str, max: u64) -> Result<u64, GobError> {
    match v {
        None => Ok(0),
        Some(Value::Uint(x)) if *x <= max => Ok(*x),
        Some(other) => Err(GobError::invalid(format!("{what}: unexpected {other:?}"))),
    }
}

fn as_bytes(v: Option<&Value>, what: &str) -> Result<Vec<u8>, GobError> {
    match v {
        None => Ok(Vec::new()),
        Some(Value::Bytes(b)) => Ok(b.clone()),
        Some(other) => Err(GobError::invalid(format!("{what}: unexpected {other:?}"))),
    }
}

fn as_time(v: Option<&Value>, what: &str) -> Result<GoTime, GobError> {
    match v {
        None => Ok(GoTime::default()),
        Some(Value::Opaque(b)) => GoTime::unmarshal(b),
        Some(other) => Err(GobError::invalid(format!("{what}: unexpected {other:?}"))),
    }
}

const U8: u64 = u8::MAX as u64;
const U32: u64 = u32::MAX as u64;

impl Message {
    /// Matches a decoded value to ciao's struct of the same name, field by field.
    pub fn from_value(type_name: &str, v: &Value) -> Result<Self, GobError> {
        let g = |n: &str| v.field(n);
        match type_name {
            "ConnectFrame" => Ok(Message::Connect(ConnectFrame {
                header: Header::decode(v)?,
                role: as_u64(g("Role"), "Role", U32)? as u32,
                source: as_bytes(g("Source"), "Source")?,
                destination: as_bytes(g("Destination"), "Destination")?,
            })),
            "ConnectedFrame" => Ok(Message::Connected(ConnectedFrame {
                header: Header::decode(v)?,
                role: as_u64(g("Role"), "Role", U32)? as u32,
                source: as_bytes(g("Source"), "Source")?,
                destination: as_bytes(g("Destination"), "Destination")?,
                payload_length: as_u64(g("PayloadLength"), "PayloadLength", U32)? as u32,
                payload: as_bytes(g("Payload"), "Payload")?,
            })),
            "Frame" => {
                let mut origin = [0u8; 16];
                match g("Origin") {
                    None => {}
                    Some(Value::List(items)) if items.len() == 16 => {
                        for (o, i) in origin.iter_mut().zip(items) {
                            *o = as_u64(Some(i), "Origin", U8)? as u8;
                        }
                    }
                    Some(other) => {
                        return Err(GobError::invalid(format!("Origin: unexpected {other:?}")));
                    }
                }
                let trace = match g("Trace") {
                    None => None,
                    Some(t @ Value::Struct(_)) => {
                        let tg = |n: &str| t.field(n);
                        let path = match tg("Path") {
                            None => Vec::new(),
                            Some(Value::List(nodes)) => nodes
                                .iter()
                                .map(|n| {
                                    Ok(Node {
                                        uuid: as_bytes(n.field("UUID"), "Node.UUID")?,
                                        role: as_u64(n.field("Role"), "Node.Role", U32)? as u32,
                                        tx_timestamp: as_time(
                                            n.field("TxTimestamp"),
                                            "TxTimestamp",
                                        )?,
                                        rx_timestamp: as_time(
                                            n.field("RxTimestamp"),
                                            "RxTimestamp",
                                        )?,
                                    })
                                })
                                .collect::<Result<_, GobError>>()?,
                            Some(other) => {
                                return Err(GobError::invalid(format!(
                                    "Path: unexpected {other:?}"
                                )));
                            }
                        };
                        Some(FrameTrace {
                            label: as_bytes(tg("Label"), "Label")?,
                            start_timestamp: as_time(tg("StartTimestamp"), "StartTimestamp")?,
                            end_timestamp: as_time(tg("EndTimestamp"), "EndTimestamp")?,
                            path_length: as_u64(tg("PathLength"), "PathLength", U8)? as u8,
                            path,
                        })
                    }
                    Some(other) => {
                        return Err(GobError::invalid(format!("Trace: unexpected {other:?}")));
                    }
                };
                Ok(Message::Frame(Frame {
                    header: Header::decode(v)?,
                    origin,
                    payload_length: as_u64(g("PayloadLength"), "PayloadLength", U32)? as u32,
                    trace,
                    payload: as_bytes(g("Payload"), "Payload")?,
                }))
            }
            other => Err(GobError::invalid(format!(
                "unexpected type {other:?} on an SSNTP stream"
            ))),
        }
    }
}

/// Reads SSNTP messages from one direction of a stream.
#[derive(Default)]
pub struct StreamDecoder {
    gob: crate::gob::Decoder,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes the next message from `input`: `Ok(None)` if `input` holds no whole value
    /// yet, else the message and how many bytes it used (type definitions included). Nothing
    /// is consumed until a whole value is there, so the caller may offer the same bytes again
    /// with more appended.
    pub fn next(&mut self, input: &[u8]) -> Result<Option<(Message, usize)>, GobError> {
        let mut end = 0;
        loop {
            let Some((body, n)) = crate::gob::Decoder::frame(&input[end..])? else {
                return Ok(None);
            };
            end += n;
            // Type definitions carry a negative id; anything else ends the run.
            let is_definition = matches!(Reader::new(body).int(), Ok(id) if id < 0);
            if !is_definition {
                break;
            }
        }
        let mut used = 0;
        while used < end {
            let (body, n) = crate::gob::Decoder::frame(&input[used..])?
                .expect("a message that was whole a moment ago");
            used += n;
            if let Some((id, value)) = self.gob.message(body)? {
                let name = match self.gob.wire_type(id) {
                    Some(crate::gob::WireType::Struct { name, .. }) => name.clone(),
                    _ => {
                        return Err(GobError::invalid(format!(
                            "top-level value of type {id} is not a struct"
                        )));
                    }
                };
                return Ok(Some((Message::from_value(&name, &value)?, used)));
            }
        }
        Err(GobError::invalid("a run of type definitions with no value"))
    }
}
