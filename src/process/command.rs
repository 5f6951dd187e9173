//! Running a program to completion.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::{ProcessError, command_line, tail};

/// A program to run: its arguments, the namespace to run it in and what to feed its stdin.
#[derive(Debug, Clone)]
pub struct Command {
    program: String,
    args: Vec<String>,
    netns: Option<PathBuf>,
    stdin: Option<Vec<u8>>,
}

/// What a successful run wrote.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
}

impl Command {
    pub fn new(program: impl Into<String>) -> Self {
        Command {
            program: program.into(),
            args: Vec::new(),
            netns: None,
            stdin: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Runs the program inside the network namespace at `path` (`/run/netns/<name>` or
    /// `/proc/<pid>/ns/net`); `None` runs it in the caller's.
    pub fn netns(mut self, path: Option<&Path>) -> Self {
        self.netns = path.map(Path::to_path_buf);
        self
    }

    /// Feeds `input` to the program's stdin (then closes it).
    pub fn stdin(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(input.into());
        self
    }

    pub fn program(&self) -> &str {
        &self.program
    }

    pub fn arguments(&self) -> &[String] {
        &self.args
    }

    /// The command line, for messages.
    pub fn display(&self) -> String {
        command_line(&self.program, &self.args)
    }

    /// Runs the program to completion. A non-zero exit is an error quoting the end of its
    /// stderr; a program that cannot be started is an error naming it.
    pub async fn run(&self) -> Result<Output, ProcessError> {
        let mut cmd = self.tokio_command();
        cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = self.spawn(cmd)?;
        if let Some(input) = &self.stdin {
            let mut pipe = child.stdin.take().expect("piped");
            // A program that exits without reading all of its input fails below with its
            // own message; the broken pipe says less.
            let _ignored_broken_pipe = pipe.write_all(input).await;
            drop(pipe);
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| ProcessError::Spawn {
                program: self.program.clone(),
                hint: "",
                source: e,
            })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        debug!(command = %self.display(), status = %out.status, "ran");
        if !out.status.success() {
            let said = if stderr.trim().is_empty() {
                &stdout
            } else {
                &stderr
            };
            return Err(ProcessError::Failed {
                command: self.display(),
                status: out.status.to_string(),
                stderr: tail(said),
            });
        }
        Ok(Output { stdout, stderr })
    }

    /// The tokio command for the program, to be started by [`Self::spawn`].
    pub(super) fn tokio_command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args);
        cmd
    }

    /// Starts `cmd` (made by [`Self::tokio_command`], then given its stdio) in the command's
    /// network namespace. A thread of its own enters the namespace (`net::netns::run_in`:
    /// `setns` moves only the calling thread) and spawns from there, and a child starts in
    /// its parent thread's namespaces. Entering it between fork and exec instead (a `pre_exec` hook) would force
    /// a full fork(), whose page-table copy costs a large process (an agent holding policy
    /// for 10,000 endpoints) tens of milliseconds; exec'ing `nsenter` first costs every
    /// command a second exec. From the thread the standard library spawns with vfork
    /// semantics, so the program is exec'ed straight away.
    pub(super) fn spawn(
        &self,
        mut cmd: tokio::process::Command,
    ) -> Result<tokio::process::Child, ProcessError> {
        let Some(path) = &self.netns else {
            return cmd.spawn().map_err(|e| spawn_error(&self.program, e));
        };
        // The child is registered with this runtime's process driver (for its exit).
        let runtime = tokio::runtime::Handle::current();
        let entered = crate::net::netns::run_in(Some(path), move || {
            let _entered = runtime.enter();
            Ok(cmd.spawn())
        });
        match entered {
            Ok(spawned) => spawned.map_err(|e| spawn_error(&self.program, e)),
            Err(e) => Err(ProcessError::Netns {
                path: path.clone(),
                source: std::io::Error::other(e),
            }),
        }
    }
}

pub(super) fn spawn_error(program: &str, source: std::io::Error) -> ProcessError {
    let hint = if source.kind() == std::io::ErrorKind::NotFound {
        " (is it installed? scripts/setup.sh installs what tenet needs)"
    } else {
        ""
    };
    ProcessError::Spawn {
        program: program.to_string(),
        hint,
        source,
    }
}
