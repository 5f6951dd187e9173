//! tenet's firewall: every rule tenet installs lives in chains an owner (one component, e.g.
//! `TENET-CNCI`) owns, each rule commented with its owner and object, entered from the
//! built-in chains by one jump each. A change is one transaction: one `ipset restore` and one
//! `iptables-restore --noflush` batch, never one `iptables` process per rule; a batch the
//! kernel refuses part-way (iptables commits table by table) is undone from the state saved
//! before it, so a rejected batch leaves nothing applied. After a restart the first apply
//! reads `iptables-save` and repairs the owner's part (rules added or removed behind its back);
//! rules of others are never touched. [`Firewall::remove`] leaves no chain, rule or set of the
//! owner behind.
//!
//! * [`ruleset`]: the desired state (pure).
//! * [`batch`]: desired state + what is there → the restore batch (pure).
//! * [`iptables`]: the backends (iptables-nft, iptables-legacy) behind [`FirewallBackend`].
//! * [`natmap`]: 1:1 NAT as nftables maps, where a mapping changes often (floating IPs).

pub mod batch;
pub mod iptables;
pub mod natmap;
pub mod ruleset;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use tracing::{debug, info, warn};

pub use batch::Drift;
pub use iptables::{IpFamily, Iptables, IptablesVariant};
pub use natmap::NatMap;
pub use ruleset::{IpSet, Jump, Rule, Ruleset, Table};

use crate::process::{Command, ProcessError};

/// A firewall change that did not go through.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// The batch was refused; nothing of it was applied.
    #[error("{program} refused the batch: {message}{}", line_suffix(.line))]
    Rejected {
        program: String,
        message: String,
        /// The batch line it complained about.
        line: Option<String>,
    },
    #[error(transparent)]
    Process(#[from] ProcessError),
}

fn line_suffix(line: &Option<String>) -> String {
    line.as_ref()
        .map(|l| format!(" (at: {l})"))
        .unwrap_or_default()
}

/// How rules reach the kernel: a real seam (iptables-nft, iptables-legacy; nftables later).
#[async_trait]
pub trait FirewallBackend: Send + Sync {
    fn name(&self) -> &'static str;
    /// The current rules, in `iptables-save` form.
    async fn save(&self) -> Result<String, FirewallError>;
    /// Applies `batch` (restore format, `--noflush`). It may be refused part-way; the caller
    /// undoes what went in.
    async fn restore(&self, batch: &str) -> Result<(), FirewallError>;
}

/// One owner's firewall in one network namespace.
pub struct Firewall {
    backend: Box<dyn FirewallBackend>,
    netns: Option<PathBuf>,
    /// What was applied last: the next change is a diff against it. `None` until the first
    /// apply, which reconciles with `iptables-save`.
    applied: Mutex<Option<Ruleset>>,
}

impl Firewall {
    /// A firewall for the namespace at `netns` with the backend the system's `iptables`
    /// points to (Debian's default is nft), or the one given.
    pub async fn new(
        netns: Option<&Path>,
        variant: Option<IptablesVariant>,
    ) -> Result<Self, FirewallError> {
        Self::for_family(netns, variant, IpFamily::V4).await
    }

    /// The same for one address family's tables (`ip6tables` for [`IpFamily::V6`]).
    pub async fn for_family(
        netns: Option<&Path>,
        variant: Option<IptablesVariant>,
        family: IpFamily,
    ) -> Result<Self, FirewallError> {
        let variant = match variant {
            Some(v) => v,
            None => IptablesVariant::detect().await?,
        };
        Ok(Self::with_backend(
            Box::new(Iptables::for_family(variant, family, netns)),
            netns,
        ))
    }

    pub fn with_backend(backend: Box<dyn FirewallBackend>, netns: Option<&Path>) -> Self {
        Firewall {
            backend,
            netns: netns.map(Path::to_path_buf),
            applied: Mutex::new(None),
        }
    }

    pub fn backend(&self) -> &str {
        self.backend.name()
    }

    fn applied(&self) -> std::sync::MutexGuard<'_, Option<Ruleset>> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the owner's rules exactly `desired`. The first call (and any after a failure)
    /// reconciles with `iptables-save` and reports what differed; later calls apply only the
    /// difference from the last call.
    pub async fn apply(&self, desired: &Ruleset) -> Result<Drift, FirewallError> {
        let last = self.applied().clone();
        match last {
            Some(old) if old.owner == desired.owner => {
                self.apply_sets(desired).await?;
                let batch: String = batch::diff(&old, desired)
                    .into_iter()
                    .map(|(_, t)| t)
                    .collect();
                if !batch.is_empty()
                    && let Err(e) = self.backend.restore(&batch).await
                {
                    // Part of it may be in: put the last applied state back.
                    if let Err(undo) = self.reconcile(&old).await {
                        warn!(owner = %desired.owner, error = %undo, "firewall: undoing a refused change");
                        *self.applied() = None;
                    }
                    return Err(e);
                }
                debug!(owner = %desired.owner, bytes = batch.len(), "firewall change applied");
                *self.applied() = Some(desired.clone());
                Ok(Drift::default())
            }
            _ => self.reconcile(desired).await,
        }
    }

    /// Reads the rules back (`iptables-save`) and repairs the owner's part: missing rules,
    /// chains and jumps are put back, others of the owner removed. Returns what differed.
    pub async fn reconcile(&self, desired: &Ruleset) -> Result<Drift, FirewallError> {
        *self.applied() = None;
        self.apply_sets(desired).await?;
        let saved = batch::Saved::parse(&self.backend.save().await?);
        let (batches, drift) = batch::full(desired, &saved);
        let text: String = batches.into_iter().map(|(_, t)| t).collect();
        if !text.is_empty()
            && let Err(e) = self.backend.restore(&text).await
        {
            self.undo(&saved, &desired.owner).await;
            return Err(e);
        }
        for d in &drift.restored {
            warn!(owner = %desired.owner, what = %d, "firewall: restored");
        }
        for d in &drift.removed {
            warn!(owner = %desired.owner, what = %d, "firewall: removed");
        }
        info!(owner = %desired.owner, rules = desired.chains.values().map(|r| r.len()).sum::<usize>(), "firewall reconciled");
        *self.applied() = Some(desired.clone());
        Ok(drift)
    }

    /// After a refused batch: puts the owner's part back as it was in `before`.
    async fn undo(&self, before: &batch::Saved, owner: &str) {
        let undone = async {
            let now = batch::Saved::parse(&self.backend.save().await?);
            let text = batch::rollback(before, &now, owner);
            if !text.is_empty() {
                self.backend.restore(&text).await?;
            }
            Ok::<_, FirewallError>(())
        }
        .await;
        if let Err(e) = undone {
            warn!(%owner, error = %e, "firewall: could not undo a refused batch");
        }
    }

    /// Removes every chain, jump and IP set of `owner`.
    pub async fn remove(&self, owner: &str) -> Result<(), FirewallError> {
        *self.applied() = None;
        let saved = batch::Saved::parse(&self.backend.save().await?);
        let (batches, _) = batch::full(&Ruleset::new(owner), &saved);
        let text: String = batches.into_iter().map(|(_, t)| t).collect();
        if !text.is_empty() {
            self.backend.restore(&text).await?;
        }
        // Sets go after the rules that used them.
        let prefix = format!("{owner}-");
        let doomed: String = self
            .ipset_names()
            .await?
            .iter()
            .filter(|s| s.starts_with(&prefix))
            .map(|s| format!("destroy {s}\n"))
            .collect();
        if !doomed.is_empty() {
            self.ipset_restore(&doomed).await?;
        }
        info!(%owner, "firewall rules removed");
        Ok(())
    }

    /// The rules as the backend shows them.
    pub async fn save(&self) -> Result<String, FirewallError> {
        self.backend.save().await
    }

    async fn apply_sets(&self, desired: &Ruleset) -> Result<(), FirewallError> {
        let text = desired.ipset_text();
        if text.is_empty() {
            return Ok(());
        }
        self.ipset_restore(&text).await
    }

    /// The names of every IP set in the firewall's namespace.
    pub async fn ipset_names(&self) -> Result<Vec<String>, FirewallError> {
        let listed = Command::new("ipset")
            .args(["list", "-n"])
            .netns(self.netns.as_deref())
            .run()
            .await?;
        Ok(listed.stdout.lines().map(str::to_string).collect())
    }

    /// One `ipset restore` of `text` in the firewall's namespace (sets a caller manages
    /// itself, e.g. with deltas, rather than through a [`Ruleset`]).
    pub async fn ipset_restore(&self, text: &str) -> Result<(), FirewallError> {
        Command::new("ipset")
            .arg("restore")
            .netns(self.netns.as_deref())
            .stdin(text)
            .run()
            .await
            .map_err(|e| rejected("ipset restore", text, e))?;
        Ok(())
    }
}

/// Turns a failed restore into a `Rejected` naming the batch line it failed at. iptables says
/// `Error occurred at line: N`; iptables-nft reports errors at the table's COMMIT, so a name
/// the message quotes (`Chain 'X' does not exist`) finds the line better.
pub(crate) fn rejected(program: &str, batch: &str, e: ProcessError) -> FirewallError {
    match e {
        ProcessError::Failed { stderr, .. } => {
            let numbered = stderr
                .lines()
                .find_map(|l| {
                    l.split("line: ")
                        .nth(1)
                        .or_else(|| l.split("line ").nth(1))
                        .and_then(|n| n.split(|c: char| !c.is_ascii_digit()).next())
                        .and_then(|n| n.parse::<usize>().ok())
                })
                .and_then(|n| batch.lines().nth(n.checked_sub(1)?))
                .filter(|l| *l != "COMMIT")
                .map(str::to_string);
            let quoted: Vec<&str> = stderr
                .split(['\'', '`'])
                .skip(1)
                .step_by(2)
                .filter(|t| !t.is_empty() && !t.contains(' '))
                .collect();
            let named = batch
                .lines()
                .find(|l| l.starts_with('-') && quoted.iter().any(|q| l.contains(q)))
                .map(str::to_string);
            let message = stderr
                .lines()
                .filter(|l| !l.starts_with("Try `") && !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            FirewallError::Rejected {
                program: program.to_string(),
                message,
                line: numbered.or(named),
            }
        }
        other => FirewallError::Process(other),
    }
}
