use std::io;

/// A failed link-layer operation: what was attempted (`op`), on which object (`object`, e.g.
/// `bridge tb-acme` or `route 10.0.0.0/24`) and why.
#[derive(Debug, thiserror::Error)]
#[error("{op} {object}: {cause}")]
pub struct NetError {
    pub op: &'static str,
    pub object: String,
    #[source]
    pub cause: Cause,
}

#[derive(Debug, thiserror::Error)]
pub enum Cause {
    /// The kernel (a netlink NACK or a syscall) refused with an errno.
    #[error("{0}")]
    Os(#[from] io::Error),
    #[error("no such object")]
    NotFound,
    /// The request was rejected before reaching the kernel.
    #[error("{0}")]
    Invalid(String),
    /// The netlink conversation itself went wrong (socket closed, unexpected reply).
    #[error("netlink: {0}")]
    Protocol(String),
}

impl NetError {
    pub fn new(op: &'static str, object: impl Into<String>, cause: impl Into<Cause>) -> Self {
        NetError {
            op,
            object: object.into(),
            cause: cause.into(),
        }
    }

    pub fn not_found(op: &'static str, object: impl Into<String>) -> Self {
        Self::new(op, object, Cause::NotFound)
    }

    pub fn invalid(op: &'static str, object: impl Into<String>, why: impl Into<String>) -> Self {
        Self::new(op, object, Cause::Invalid(why.into()))
    }

    /// The errno behind the failure, when the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match &self.cause {
            Cause::Os(e) => e.raw_os_error(),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self.cause, Cause::NotFound)
            || matches!(
                self.errno(),
                Some(libc::ENODEV) | Some(libc::ENOENT) | Some(libc::ESRCH)
            )
    }

    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }

    /// The kernel lacks the feature (e.g. no GRE module): EOPNOTSUPP.
    pub fn is_unsupported(&self) -> bool {
        self.errno() == Some(libc::EOPNOTSUPP)
    }
}

pub type NetResult<T> = Result<T, NetError>;
