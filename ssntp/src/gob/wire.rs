//! Gob's primitive encodings: unsigned and signed integers, byte strings, and a bounded reader.

use super::GobError;

/// Appends `x` in gob's unsigned encoding: one byte below 128, else the negated byte count
/// followed by the big-endian bytes without leading zeros.
pub fn put_uint(out: &mut Vec<u8>, x: u64) {
    if x < 128 {
        out.push(x as u8);
        return;
    }
    let bytes = x.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    out.push((-((8 - skip) as i8)) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

/// Gob's signed encoding: the sign moves to bit 0, complemented when negative.
pub fn put_int(out: &mut Vec<u8>, x: i64) {
    let u = if x < 0 {
        ((!x as u64) << 1) | 1
    } else {
        (x as u64) << 1
    };
    put_uint(out, u);
}

pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_uint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A cursor over untrusted input: every read is bounds-checked, nothing panics.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub fn byte(&mut self) -> Result<u8, GobError> {
        let b = *self.buf.get(self.pos).ok_or(GobError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], GobError> {
        if n > self.remaining() {
            return Err(GobError::Truncated);
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn uint(&mut self) -> Result<u64, GobError> {
        let b = self.byte()?;
        if b < 128 {
            return Ok(u64::from(b));
        }
        // The byte is the negated count: 0xff → 1 ... 0xf8 → 8 (0x80 would be 128).
        let n = 256 - usize::from(b);
        if n > 8 {
            return Err(GobError::invalid(format!("integer of {n} bytes")));
        }
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    pub fn int(&mut self) -> Result<i64, GobError> {
        let u = self.uint()?;
        Ok(if u & 1 == 1 {
            !((u >> 1) as i64)
        } else {
            (u >> 1) as i64
        })
    }

    /// A length-prefixed byte string; the length cannot exceed what is left of the message.
    pub fn bytes(&mut self) -> Result<&'a [u8], GobError> {
        let n = self.uint()?;
        if n > self.remaining() as u64 {
            return Err(GobError::Truncated);
        }
        self.take(n as usize)
    }

    pub fn string(&mut self) -> Result<String, GobError> {
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| GobError::invalid("string is not UTF-8"))
    }

    /// A count of elements, each at least one byte long, so it is bounded by the input.
    pub fn count(&mut self) -> Result<usize, GobError> {
        let n = self.uint()?;
        if n > self.remaining() as u64 {
            return Err(GobError::Truncated);
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_match_go() {
        // Values from the encoding/gob documentation.
        let mut b = Vec::new();
        put_uint(&mut b, 7);
        put_uint(&mut b, 256);
        assert_eq!(b, [0x07, 0xfe, 0x01, 0x00]);
        let mut b = Vec::new();
        put_int(&mut b, -65);
        put_int(&mut b, 65);
        assert_eq!(b, [0xff, 0x81, 0xff, 0x82]);
        let mut r = Reader::new(&[0xfe, 0x01, 0x00, 0xff, 0x81]);
        assert_eq!((r.uint().unwrap(), r.int().unwrap()), (256, -65));
        for x in [0u64, 1, 127, 128, 255, 1 << 40, u64::MAX] {
            let mut b = Vec::new();
            put_uint(&mut b, x);
            assert_eq!(Reader::new(&b).uint().unwrap(), x);
        }
        for x in [0i64, -1, 1, i64::MIN, i64::MAX] {
            let mut b = Vec::new();
            put_int(&mut b, x);
            assert_eq!(Reader::new(&b).int().unwrap(), x);
        }
        assert!(
            Reader::new(&[0xf7, 1, 2, 3, 4, 5, 6, 7, 8, 9])
                .uint()
                .is_err()
        );
        assert!(Reader::new(&[0x05, 1]).bytes().is_err());
    }
}
