//! Felix's dataplane-driver protocol: the `felix` protobuf messages (generated from
//! `proto/felixbackend.proto`, Felix's field numbers) and the pipe framing, an 8-byte
//! little-endian length before each envelope. Decoding is bounded: a length over
//! [`MAX_MESSAGE`] is refused before anything is read into memory.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

use std::io;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

include!(concat!(env!("OUT_DIR"), "/felix.rs"));

/// The largest envelope accepted (an IP-set update of a million members is ~20 MB).
pub const MAX_MESSAGE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer closed the pipe")]
    Closed,
    #[error("message of {0} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLarge(u64),
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Writes one length-prefixed message.
pub async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &impl Message,
) -> Result<(), FrameError> {
    let body = msg.encode_to_vec();
    let mut frame = Vec::with_capacity(8 + body.len());
    frame.extend_from_slice(&(body.len() as u64).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one length-prefixed message; [`FrameError::Closed`] at a clean end of stream.
pub async fn read_message<R: AsyncRead + Unpin, M: Message + Default>(
    r: &mut R,
) -> Result<M, FrameError> {
    let mut len = [0u8; 8];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u64::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await?;
    Ok(M::decode(body.as_slice())?)
}

/// Decodes one framed message from the front of `buf`: `Ok(None)` when more bytes are
/// needed, else the message and how many bytes it took. For fuzzing and in-memory use.
pub fn decode_frame<M: Message + Default>(buf: &[u8]) -> Result<Option<(M, usize)>, FrameError> {
    let Some(head) = buf.get(..8) else {
        return Ok(None);
    };
    let len = u64::from_le_bytes(head.try_into().expect("8 bytes"));
    if len > MAX_MESSAGE {
        return Err(FrameError::TooLarge(len));
    }
    let end = 8 + len as usize;
    let Some(body) = buf.get(8..end) else {
        return Ok(None);
    };
    Ok(Some((M::decode(body)?, end)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_numbers_are_felixs() {
        // An InSync with sequence number 1: field 15 varint (0x78 0x01), field 1 empty
        // message (0x0a 0x00).
        let msg = ToDataplane {
            sequence_number: 1,
            payload: Some(to_dataplane::Payload::InSync(InSync {})),
        };
        let bytes = msg.encode_to_vec();
        assert!(bytes.windows(2).any(|w| w == [0x78, 0x01]), "{bytes:x?}");
        assert!(bytes.windows(2).any(|w| w == [0x0a, 0x00]), "{bytes:x?}");
        // rule_id is field 201: tag (201 << 3 | 2) = 1610 = varint 0xca 0x0c.
        let rule = Rule {
            rule_id: "x".into(),
            ..Rule::default()
        };
        assert_eq!(rule.encode_to_vec(), [0xca, 0x0c, 0x01, b'x']);
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_ones_are_refused() {
        let msg = ToDataplane {
            sequence_number: 7,
            payload: Some(to_dataplane::Payload::IpsetUpdate(IpSetUpdate {
                id: "s:abc".into(),
                members: vec!["10.0.0.1".into()],
            })),
        };
        let mut buf = Vec::new();
        write_message(&mut buf, &msg).await.unwrap();
        assert_eq!(&buf[..8], &((buf.len() - 8) as u64).to_le_bytes());
        let back: ToDataplane = read_message(&mut buf.as_slice()).await.unwrap();
        assert_eq!(back, msg);
        assert!(matches!(
            decode_frame::<ToDataplane>(&buf[..buf.len() - 1]),
            Ok(None)
        ));
        let huge = (MAX_MESSAGE + 1).to_le_bytes();
        assert!(matches!(
            decode_frame::<ToDataplane>(&huge),
            Err(FrameError::TooLarge(_))
        ));
        let mut garbage = 3u64.to_le_bytes().to_vec();
        garbage.extend([0xff, 0xff, 0xff]);
        assert!(matches!(
            decode_frame::<ToDataplane>(&garbage),
            Err(FrameError::Decode(_))
        ));
        assert!(matches!(
            read_message::<_, ToDataplane>(&mut [].as_slice()).await,
            Err(FrameError::Closed)
        ));
    }
}
