//! One SSNTP connection's two gob streams over any byte stream (TLS in production).

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{Encoder, Message, StreamDecoder};
use crate::gob::GobError;

/// ciao's deadline for every write, and for the handshake's read.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("malformed SSNTP stream: {0}")]
    Decode(#[from] GobError),
    #[error("{0} timed out")]
    Timeout(&'static str),
}

/// A peer that closes without TLS close_notify is treated like a clean close: the stream ended
/// and there is nothing more to read.
fn is_eof(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::UnexpectedEof
}

/// How much room each read offers; messages larger than this take several reads.
const READ_CHUNK: usize = 16 * 1024;

/// Reads messages from one direction of a connection.
pub struct MessageReader<R> {
    inner: R,
    decoder: StreamDecoder,
    buf: Vec<u8>,
    start: usize,
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub fn new(inner: R) -> Self {
        MessageReader {
            inner,
            decoder: StreamDecoder::new(),
            buf: Vec::with_capacity(READ_CHUNK),
            start: 0,
        }
    }

    /// The next message, or `None` when the peer closed the stream between messages.
    /// Cancel-safe: bytes read are kept in the buffer until a whole message is there.
    pub async fn read(&mut self) -> Result<Option<Message>, ConnError> {
        loop {
            if let Some((msg, used)) = self.decoder.next(&self.buf[self.start..])? {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Some(msg));
            }
            // Move the incomplete tail (usually a few bytes) to the front before reading more.
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.buf.reserve(READ_CHUNK);
            let n = match self.inner.read_buf(&mut self.buf).await {
                Ok(n) => n,
                Err(e) if is_eof(&e) => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended inside a message",
                )
                .into());
            }
        }
    }

    pub async fn read_timeout(
        &mut self,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Option<Message>, ConnError> {
        tokio::time::timeout(timeout, self.read())
            .await
            .map_err(|_| ConnError::Timeout(what))?
    }
}

/// Writes messages to one direction of a connection; type definitions go out once.
pub struct MessageWriter<W> {
    inner: W,
    encoder: Encoder,
    buf: Vec<u8>,
    timeout: Duration,
}

impl<W: AsyncWrite + Unpin> MessageWriter<W> {
    pub fn new(inner: W) -> Self {
        MessageWriter {
            inner,
            encoder: Encoder::new(),
            buf: Vec::with_capacity(16 * 1024),
            timeout: IO_TIMEOUT,
        }
    }

    /// Encodes a message into the pending buffer; `flush` sends everything pending.
    pub fn queue(&mut self, msg: &Message) {
        self.encoder.encode(msg, &mut self.buf);
    }

    pub fn queue_frame(&mut self, frame: &crate::frame::Frame) {
        self.encoder.encode_frame(frame, &mut self.buf);
    }

    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    pub async fn flush(&mut self) -> Result<(), ConnError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let write = async {
            self.inner.write_all(&self.buf).await?;
            self.inner.flush().await
        };
        tokio::time::timeout(self.timeout, write)
            .await
            .map_err(|_| ConnError::Timeout("write"))??;
        self.buf.clear();
        Ok(())
    }

    pub async fn send(&mut self, msg: &Message) -> Result<(), ConnError> {
        self.queue(msg);
        self.flush().await
    }

    /// Ends the stream with TLS close_notify so the peer sees a clean close.
    pub async fn shutdown(&mut self) -> Result<(), ConnError> {
        let _ = self.flush().await;
        tokio::time::timeout(self.timeout, self.inner.shutdown())
            .await
            .map_err(|_| ConnError::Timeout("shutdown"))??;
        Ok(())
    }
}
