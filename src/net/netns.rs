//! Running set-up work inside another network namespace without moving the caller's thread.
//!
//! Sockets, taps and netlink connections stay bound to the namespace they were created in, so
//! a short-lived thread enters the target namespace, creates them, and hands them back.

use std::path::Path;

use super::{NetError, NetResult};

/// Runs `f` on a fresh thread that has joined the namespace at `netns` (`None`: the
/// caller's own namespace, run in place).
pub fn run_in<T, F>(netns: Option<&Path>, f: F) -> NetResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> NetResult<T> + Send + 'static,
{
    let Some(path) = netns else {
        return f();
    };
    let object = path.display().to_string();
    let target =
        std::fs::File::open(path).map_err(|e| NetError::new("open namespace", &object, e))?;
    std::thread::spawn(move || {
        nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetError::new("enter namespace", object, std::io::Error::from(e)))?;
        f()
    })
    .join()
    .unwrap_or_else(|_| {
        Err(NetError::new(
            "enter namespace",
            path.display().to_string(),
            super::Cause::Protocol("worker thread panicked".into()),
        ))
    })
}
