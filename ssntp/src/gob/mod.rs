//! Go `encoding/gob`, as far as SSNTP needs it: a decoder that accepts any type ids and any
//! subset of fields Go's encoder may send for struct, slice, array, byte-string, integer,
//! string and GobEncoder values, and the building blocks for an encoder that writes what Go
//! writes. Input is untrusted: every length is checked against what is left of its message,
//! messages and nesting are bounded, and nothing panics.

pub mod wire;

use std::collections::HashMap;

use wire::Reader;

/// The largest gob message accepted (SSNTP payloads are small YAML documents).
pub const MAX_MESSAGE: usize = 4 << 20;
const MAX_DEPTH: usize = 16;
const MAX_TYPES: usize = 1024;
/// Go's first id for user types; lower ids are gob's own.
pub const FIRST_USER_TYPE: i64 = 65;

pub const T_BOOL: i64 = 1;
pub const T_INT: i64 = 2;
pub const T_UINT: i64 = 3;
pub const T_FLOAT: i64 = 4;
pub const T_BYTES: i64 = 5;
pub const T_STRING: i64 = 6;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GobError {
    #[error("gob: input ends inside a value")]
    Truncated,
    #[error("gob: message of {0} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLarge(u64),
    #[error("gob: {0}")]
    Invalid(String),
    #[error("gob: value of undefined type id {0}")]
    UnknownType(i64),
}

impl GobError {
    pub fn invalid(why: impl Into<String>) -> Self {
        GobError::Invalid(why.into())
    }
}

/// A type definition received on the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireType {
    Struct {
        name: String,
        fields: Vec<(String, i64)>,
    },
    Slice {
        name: String,
        elem: i64,
    },
    Array {
        name: String,
        elem: i64,
        len: i64,
    },
    /// A type with its own encoding (GobEncoder / BinaryMarshaler / TextMarshaler).
    Opaque {
        name: String,
    },
}

/// A decoded value, before it is matched to a Rust type by field names (as Go does).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Bytes(Vec<u8>),
    String(String),
    /// Fields that were sent, by name; absent ones are zero.
    Struct(Vec<(String, Value)>),
    List(Vec<Value>),
    /// The bytes of a GobEncoder value (e.g. `time.Time`).
    Opaque(Vec<u8>),
}

impl Value {
    pub fn field(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Struct(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Decodes one direction of a gob stream: type definitions are remembered across messages.
#[derive(Default)]
pub struct Decoder {
    types: HashMap<i64, WireType>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Splits the next message off `input`: `Ok(None)` when `input` does not yet hold a whole
    /// one, else the message body and the bytes consumed.
    pub fn frame(input: &[u8]) -> Result<Option<(&[u8], usize)>, GobError> {
        let mut r = Reader::new(input);
        let len = match r.uint() {
            Ok(l) => l,
            Err(GobError::Truncated) => return Ok(None),
            Err(e) => return Err(e),
        };
        if len > MAX_MESSAGE as u64 {
            return Err(GobError::TooLarge(len));
        }
        let header = input.len() - r.remaining();
        let len = len as usize;
        if r.remaining() < len {
            return Ok(None);
        }
        Ok(Some((&input[header..header + len], header + len)))
    }

    /// Handles one message body: a type definition (returns `None`) or a value of type id
    /// and decoded value.
    pub fn message(&mut self, body: &[u8]) -> Result<Option<(i64, Value)>, GobError> {
        let mut r = Reader::new(body);
        let id = r.int()?;
        if id < 0 {
            let id = -id;
            if id < FIRST_USER_TYPE {
                return Err(GobError::invalid(format!(
                    "redefinition of built-in type {id}"
                )));
            }
            if self.types.len() >= MAX_TYPES {
                return Err(GobError::invalid("too many type definitions"));
            }
            let t = read_wire_type(&mut r)?;
            if !r.is_empty() {
                return Err(GobError::invalid("trailing bytes after a type definition"));
            }
            self.types.insert(id, t);
            return Ok(None);
        }
        if !matches!(self.types.get(&id), Some(WireType::Struct { .. })) {
            if id >= FIRST_USER_TYPE && !self.types.contains_key(&id) {
                return Err(GobError::UnknownType(id));
            }
            // Non-struct top-level values carry a zero field delta first.
            if r.uint()? != 0 {
                return Err(GobError::invalid("bad top-level value"));
            }
        }
        let value = self.value(&mut r, id, 0)?;
        if !r.is_empty() {
            return Err(GobError::invalid("trailing bytes after a value"));
        }
        Ok(Some((id, value)))
    }

    pub fn wire_type(&self, id: i64) -> Option<&WireType> {
        self.types.get(&id)
    }

    fn value(&self, r: &mut Reader<'_>, id: i64, depth: usize) -> Result<Value, GobError> {
        if depth > MAX_DEPTH {
            return Err(GobError::invalid("values nested too deeply"));
        }
        Ok(match id {
            T_BOOL => Value::Bool(r.uint()? != 0),
            T_INT => Value::Int(r.int()?),
            T_UINT => Value::Uint(r.uint()?),
            T_FLOAT => Value::Float(f64::from_bits(r.uint()?.swap_bytes())),
            T_BYTES => Value::Bytes(r.bytes()?.to_vec()),
            T_STRING => Value::String(r.string()?),
            _ => match self.types.get(&id).ok_or(GobError::UnknownType(id))? {
                WireType::Struct { fields, .. } => {
                    let mut out = Vec::new();
                    let mut field: i64 = -1;
                    loop {
                        let delta = r.uint()?;
                        if delta == 0 {
                            break;
                        }
                        field = field
                            .checked_add(
                                i64::try_from(delta)
                                    .map_err(|_| GobError::invalid("field delta"))?,
                            )
                            .ok_or_else(|| GobError::invalid("field delta"))?;
                        let (name, fid) = usize::try_from(field)
                            .ok()
                            .and_then(|f| fields.get(f))
                            .ok_or_else(|| {
                            GobError::invalid(format!("field {field} is not in the type"))
                        })?;
                        out.push((name.clone(), self.value(r, *fid, depth + 1)?));
                    }
                    Value::Struct(out)
                }
                WireType::Slice { elem, .. } => {
                    let n = r.count()?;
                    let mut v = Vec::with_capacity(n.min(1024));
                    for _ in 0..n {
                        v.push(self.value(r, *elem, depth + 1)?);
                    }
                    Value::List(v)
                }
                WireType::Array { elem, len, .. } => {
                    let n = r.count()?;
                    if n as i64 != *len {
                        return Err(GobError::invalid(format!(
                            "array of {n} elements, type says {len}"
                        )));
                    }
                    let mut v = Vec::with_capacity(n);
                    for _ in 0..n {
                        v.push(self.value(r, *elem, depth + 1)?);
                    }
                    Value::List(v)
                }
                WireType::Opaque { .. } => Value::Opaque(r.bytes()?.to_vec()),
            },
        })
    }
}

/// Reads the fields of a gob struct value, calling `f(field_index, reader)` for each.
fn read_struct(
    r: &mut Reader<'_>,
    mut f: impl FnMut(u64, &mut Reader<'_>) -> Result<(), GobError>,
) -> Result<(), GobError> {
    let mut field: u64 = u64::MAX; // -1
    loop {
        let delta = r.uint()?;
        if delta == 0 {
            return Ok(());
        }
        field = field.wrapping_add(delta);
        if field > 16 {
            return Err(GobError::invalid("unknown field in a type definition"));
        }
        f(field, r)?;
    }
}

/// commonType {Name string; Id typeId}
fn read_common(r: &mut Reader<'_>) -> Result<(String, i64), GobError> {
    let (mut name, mut id) = (String::new(), 0);
    read_struct(r, |f, r| {
        match f {
            0 => name = r.string()?,
            1 => id = r.int()?,
            _ => return Err(GobError::invalid("bad commonType")),
        }
        Ok(())
    })?;
    Ok((name, id))
}

/// wireType {ArrayT, SliceT, StructT, MapT, GobEncoderT, BinaryMarshalerT, TextMarshalerT}
fn read_wire_type(r: &mut Reader<'_>) -> Result<WireType, GobError> {
    let mut out = None;
    read_struct(r, |f, r| {
        let t = match f {
            0 => {
                let (mut name, mut elem, mut len) = (String::new(), 0, 0);
                read_struct(r, |g, r| {
                    match g {
                        0 => name = read_common(r)?.0,
                        1 => elem = r.int()?,
                        2 => len = r.int()?,
                        _ => return Err(GobError::invalid("bad arrayType")),
                    }
                    Ok(())
                })?;
                WireType::Array { name, elem, len }
            }
            1 => {
                let (mut name, mut elem) = (String::new(), 0);
                read_struct(r, |g, r| {
                    match g {
                        0 => name = read_common(r)?.0,
                        1 => elem = r.int()?,
                        _ => return Err(GobError::invalid("bad sliceType")),
                    }
                    Ok(())
                })?;
                WireType::Slice { name, elem }
            }
            2 => {
                let (mut name, mut fields) = (String::new(), Vec::new());
                read_struct(r, |g, r| {
                    match g {
                        0 => name = read_common(r)?.0,
                        1 => {
                            let n = r.count()?;
                            for _ in 0..n {
                                let (mut fname, mut fid) = (String::new(), 0);
                                read_struct(r, |h, r| {
                                    match h {
                                        0 => fname = r.string()?,
                                        1 => fid = r.int()?,
                                        _ => return Err(GobError::invalid("bad fieldType")),
                                    }
                                    Ok(())
                                })?;
                                fields.push((fname, fid));
                            }
                        }
                        _ => return Err(GobError::invalid("bad structType")),
                    }
                    Ok(())
                })?;
                WireType::Struct { name, fields }
            }
            3 => return Err(GobError::invalid("maps are not used by SSNTP")),
            4..=6 => WireType::Opaque {
                name: read_common_wrapper(r)?,
            },
            _ => return Err(GobError::invalid("bad wireType")),
        };
        out = Some(t);
        Ok(())
    })?;
    out.ok_or_else(|| GobError::invalid("empty type definition"))
}

/// gobEncoderType {CommonType}
fn read_common_wrapper(r: &mut Reader<'_>) -> Result<String, GobError> {
    let mut name = String::new();
    read_struct(r, |f, r| {
        if f != 0 {
            return Err(GobError::invalid("bad gobEncoderType"));
        }
        name = read_common(r)?.0;
        Ok(())
    })?;
    Ok(name)
}
