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
    /// The operation failed, and undoing what it had done failed too.
    #[error("{cause}; {leftovers}")]
    Incomplete {
        cause: Box<Cause>,
        leftovers: Leftovers,
    },
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
        self.cause.errno()
    }

    /// This error, with what its rollback could not undo (unchanged if that is nothing).
    pub fn with_leftovers(self, leftovers: Leftovers) -> Self {
        if leftovers.is_empty() {
            return self;
        }
        NetError {
            op: self.op,
            object: self.object,
            cause: Cause::Incomplete {
                cause: Box::new(self.cause),
                leftovers,
            },
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

impl Cause {
    fn errno(&self) -> Option<i32> {
        match self {
            Cause::Os(e) => e.raw_os_error(),
            Cause::Incomplete { cause, .. } => cause.errno(),
            _ => None,
        }
    }
}

pub type NetResult<T> = Result<T, NetError>;

/// What a rollback or teardown could not undo. Each cleanup step's result is recorded here
/// instead of being dropped; the list is logged and attached to the error the caller gets,
/// so nothing that was left behind goes unreported (netavark's error-list pattern).
#[derive(Debug, Default)]
pub struct Leftovers(Vec<NetError>);

impl Leftovers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one cleanup step. A step whose object was already gone succeeded.
    pub fn note<T>(&mut self, step: NetResult<T>) {
        if let Err(e) = step
            && !e.is_not_found()
        {
            self.0.push(e);
        }
    }

    /// Records a failure that is already known.
    pub fn push(&mut self, error: NetError) {
        self.0.push(error);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn errors(&self) -> &[NetError] {
        &self.0
    }

    /// Logs each failed step as a warning naming what is left behind.
    pub fn log(&self, context: &str) {
        for e in &self.0 {
            tracing::warn!(error = %e, "{context}: could not undo");
        }
    }
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("could not undo: ")?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}
