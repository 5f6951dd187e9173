//! A blocking client of the local API (`api`), for short-lived callers on the same host: the
//! CNI plugin, a VM launcher, tests. One connection per call.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::api::{ApiRequest, ApiResponse, MAX_REQUEST};

/// Why a call did not get an answer (a refusal is an answer: `ApiResponse::ok` false).
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("tenet-cn's local API at {path} is not reachable: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tenet-cn's local API at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tenet-cn's local API at {path} answered {line:?}: {source}")]
    Answer {
        path: PathBuf,
        line: String,
        source: serde_json::Error,
    },
}

/// The local API at one socket path.
#[derive(Debug, Clone)]
pub struct ApiClient {
    path: PathBuf,
    /// How long one call may take (a START waits for etcd and the kernel).
    pub timeout: Duration,
}

impl ApiClient {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ApiClient {
            path: path.into(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `request`; returns the answer and the descriptors that came with it (a VM
    /// tap's queues).
    pub fn call(
        &self,
        request: &ApiRequest,
    ) -> Result<(ApiResponse, Vec<OwnedFd>), ApiClientError> {
        let line = serde_json::to_string(request).expect("requests serialise");
        self.call_raw(&line)
    }

    /// Sends one line as it is (tests send malformed ones).
    pub fn call_raw(&self, line: &str) -> Result<(ApiResponse, Vec<OwnedFd>), ApiClientError> {
        let io = |source| ApiClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ApiClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        stream.write_all(line.as_bytes()).map_err(io)?;
        stream.write_all(b"\n").map_err(io)?;
        let (answer, fds) = read_line(&stream).map_err(io)?;
        let text = String::from_utf8_lossy(&answer).trim().to_string();
        let response = serde_json::from_str(&text).map_err(|source| ApiClientError::Answer {
            path: self.path.clone(),
            line: text,
            source,
        })?;
        Ok((response, fds))
    }
}

/// Reads up to the first newline, collecting descriptors sent as SCM_RIGHTS.
fn read_line(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    while !line.contains(&b'\n') {
        let mut space = nix::cmsg_space!([RawFd; 64]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .map_err(std::io::Error::from)?;
        for c in msg.cmsgs().map_err(std::io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors for us; nothing else
                // owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the agent closed the connection without an answer",
            ));
        }
        line.extend_from_slice(&buf[..n]);
        if line.len() > MAX_REQUEST {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "an answer longer than the API's limit",
            ));
        }
    }
    Ok((line, fds))
}
