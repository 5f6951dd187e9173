//! The dataplane driver: keeps the state Felix's messages describe and makes the kernel
//! match it: IP sets through `ipset restore` (a whole set is built under a temporary name and
//! swapped in; deltas are `add`/`del -exist`), chains through `net::firewall` (one
//! `iptables-restore` transaction per change, only changed chains rewritten). Sets are
//! created before the rules that use them and destroyed after the rules that used them are
//! gone. Nothing reaches the kernel before InSync; the first apply after it reconciles with
//! what a previous run left (stray `cali` chains and sets are removed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::net::Netlink;
use crate::net::firewall::{Drift, Firewall, FirewallError, IptablesVariant, rejected};
use crate::policy::proto::to_dataplane::Payload;
use crate::policy::render::{
    self, DataplaneState, OWNER, RenderConfig, WorkloadHook, ipset_name, ipset_temp_name,
};
use crate::process::Command;

/// Felix's default `MaxIpsetSize`.
pub const DEFAULT_MAX_IPSET_SIZE: usize = 1_048_576;

/// What one apply did, for logs and benchmarks.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    pub ipset_lines: usize,
    pub sets_destroyed: usize,
    pub drift: Drift,
    pub took: Duration,
}

pub struct PolicyDataplane {
    firewall: Firewall,
    netns: Option<PathBuf>,
    hook: WorkloadHook,
    state: DataplaneState,
    in_sync: bool,
    /// Whether the next apply must reconcile with the kernel (first apply, after an error).
    resync: bool,
    /// `ipset restore` lines waiting for the next apply.
    set_ops: Vec<String>,
    /// Sets to destroy once the rules no longer use them.
    doomed_sets: BTreeSet<String>,
    /// Whether the workloads changed since the bridges' zones were looked up.
    zones_stale: bool,
}

impl PolicyDataplane {
    pub async fn new(
        netns: Option<&Path>,
        hook: WorkloadHook,
        variant: Option<IptablesVariant>,
    ) -> Result<Self, FirewallError> {
        Ok(PolicyDataplane {
            firewall: Firewall::new(netns, variant).await?,
            netns: netns.map(Path::to_path_buf),
            hook,
            state: DataplaneState::default(),
            in_sync: false,
            resync: true,
            set_ops: Vec::new(),
            doomed_sets: BTreeSet::new(),
            zones_stale: true,
        })
    }

    /// Forgets the state (before a fresh snapshot); the next apply reconciles the kernel.
    pub fn reset(&mut self) {
        self.state = DataplaneState::default();
        self.in_sync = false;
        self.resync = true;
        self.set_ops.clear();
        self.doomed_sets.clear();
        self.zones_stale = true;
    }

    pub fn state(&self) -> &DataplaneState {
        &self.state
    }

    pub fn in_sync(&self) -> bool {
        self.in_sync
    }

    fn max_size(&self) -> usize {
        self.state
            .config
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("MaxIpsetSize"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MAX_IPSET_SIZE)
    }

    /// Takes one message into the state (no kernel work).
    pub fn handle(&mut self, msg: Payload) {
        match msg {
            Payload::InSync(_) => self.in_sync = true,
            Payload::ConfigUpdate(c) => self.state.config = c.config.into_iter().collect(),
            Payload::IpsetUpdate(u) => {
                let members: BTreeSet<String> =
                    u.members.into_iter().filter(|m| !m.contains(':')).collect();
                self.doomed_sets.remove(&ipset_name(&u.id));
                self.queue_whole_set(&u.id, &members);
                self.state.ipsets.insert(u.id, members);
            }
            Payload::IpsetDeltaUpdate(d) => {
                let name = ipset_name(&d.id);
                let set = self.state.ipsets.entry(d.id).or_default();
                for m in d.removed_members.into_iter().filter(|m| !m.contains(':')) {
                    self.set_ops.push(format!("del {name} {m} -exist"));
                    set.remove(&m);
                }
                for m in d.added_members.into_iter().filter(|m| !m.contains(':')) {
                    self.set_ops.push(format!("add {name} {m} -exist"));
                    set.insert(m);
                }
            }
            Payload::IpsetRemove(r) => {
                self.state.ipsets.remove(&r.id);
                self.doomed_sets.insert(ipset_name(&r.id));
            }
            Payload::ActivePolicyUpdate(u) => {
                if let (Some(id), Some(p)) = (u.id, u.policy) {
                    self.state.policies.insert(id.name, p);
                }
            }
            Payload::ActivePolicyRemove(r) => {
                if let Some(id) = r.id {
                    self.state.policies.remove(&id.name);
                }
            }
            Payload::ActiveProfileUpdate(u) => {
                if let (Some(id), Some(p)) = (u.id, u.profile) {
                    self.state.profiles.insert(id.name, p);
                }
            }
            Payload::ActiveProfileRemove(r) => {
                if let Some(id) = r.id {
                    self.state.profiles.remove(&id.name);
                }
            }
            Payload::WorkloadEndpointUpdate(u) => {
                self.zones_stale = true;
                if let (Some(id), Some(ep)) = (u.id, u.endpoint) {
                    self.state
                        .workloads
                        .insert((id.orchestrator_id, id.workload_id, id.endpoint_id), ep);
                }
            }
            Payload::WorkloadEndpointRemove(r) => {
                self.zones_stale = true;
                if let Some(id) = r.id {
                    self.state.workloads.remove(&(
                        id.orchestrator_id,
                        id.workload_id,
                        id.endpoint_id,
                    ));
                }
            }
            // Host endpoints, host metadata and pools are not rendered yet.
            other => debug!(?other, "policy dataplane: message not rendered"),
        }
    }

    fn queue_whole_set(&mut self, id: &str, members: &BTreeSet<String>) {
        let (name, temp) = (ipset_name(id), ipset_temp_name(id));
        let max = self.max_size().max(members.len());
        let create = |n: &str| format!("create {n} hash:ip family inet maxelem {max} -exist");
        self.set_ops.push(create(&temp));
        self.set_ops.push(format!("flush {temp}"));
        self.set_ops
            .extend(members.iter().map(|m| format!("add {temp} {m}")));
        self.set_ops.push(create(&name));
        self.set_ops.push(format!("swap {name} {temp}"));
        self.set_ops.push(format!("destroy {temp}"));
    }

    /// Makes the kernel match the state: sets, then rules, then the sets no longer used.
    pub async fn apply(&mut self) -> Result<ApplyReport, FirewallError> {
        if !self.in_sync {
            return Ok(ApplyReport::default());
        }
        if self.resync {
            return self.reconcile().await;
        }
        let started = Instant::now();
        let result = self.apply_inner().await;
        if result.is_err() {
            self.resync = true;
        }
        let mut report = result?;
        report.took = started.elapsed();
        Ok(report)
    }

    async fn apply_inner(&mut self) -> Result<ApplyReport, FirewallError> {
        let mut report = ApplyReport {
            ipset_lines: self.set_ops.len(),
            ..ApplyReport::default()
        };
        self.run_set_ops().await?;
        if self.zones_stale {
            self.discover_zones().await;
        }
        let rules = render::render(&self.state, &self.render_config());
        report.drift = self.firewall.apply(&rules).await?;
        report.sets_destroyed = self.destroy_doomed().await?;
        Ok(report)
    }

    pub fn render_config(&self) -> RenderConfig {
        RenderConfig::from_felix(self.hook.clone(), &self.state.config)
    }

    /// Rewrites every set and every chain from the state and removes `cali` sets and chains
    /// nobody wants (left by a previous run or made by hand). Returns what differed.
    pub async fn reconcile(&mut self) -> Result<ApplyReport, FirewallError> {
        if !self.in_sync {
            return Ok(ApplyReport::default());
        }
        let started = Instant::now();
        self.resync = true;
        self.set_ops.clear();
        let sets: Vec<(String, BTreeSet<String>)> = self
            .state
            .ipsets
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, members) in &sets {
            self.queue_whole_set(id, members);
        }
        let wanted: BTreeSet<String> = sets.iter().map(|(id, _)| ipset_name(id)).collect();
        let lines = self.set_ops.len();
        self.run_set_ops().await?;
        self.discover_zones().await;
        let rules = render::render(&self.state, &self.render_config());
        let drift = self.firewall.reconcile(&rules).await?;
        self.doomed_sets = self
            .kernel_sets()
            .await?
            .into_iter()
            .filter(|s| !wanted.contains(s))
            .collect();
        let destroyed = self.destroy_doomed().await?;
        self.resync = false;
        if !drift.is_empty() || destroyed > 0 {
            warn!(?drift, stray_sets = destroyed, "policy dataplane repaired");
        }
        info!(
            policies = self.state.policies.len(),
            profiles = self.state.profiles.len(),
            endpoints = self.state.workloads.len(),
            sets = self.state.ipsets.len(),
            "policy dataplane in sync"
        );
        Ok(ApplyReport {
            ipset_lines: lines,
            sets_destroyed: destroyed,
            drift,
            took: started.elapsed(),
        })
    }

    /// Bridged mode: the bridges the workloads' ports are on, each with its conntrack zone
    /// (the bridge's interface index, unique in the namespace and stable while it lives).
    async fn discover_zones(&mut self) {
        self.zones_stale = false;
        let WorkloadHook::Bridged { .. } = &self.hook else {
            return;
        };
        let netlink = match &self.netns {
            Some(p) => Netlink::connect_in(p),
            None => Netlink::connect(),
        };
        let links = match netlink {
            Ok(nl) => nl.links().await,
            Err(e) => Err(e),
        };
        let links = match links {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "policy: listing links for conntrack zones");
                self.zones_stale = true;
                return;
            }
        };
        let ports: BTreeSet<&str> = self
            .state
            .workloads
            .values()
            .map(|w| w.name.as_str())
            .collect();
        let bridges: BTreeSet<u32> = links
            .iter()
            .filter(|l| ports.contains(l.name.as_str()))
            .filter_map(|l| l.controller)
            .collect();
        self.state.zones = links
            .iter()
            .filter(|l| bridges.contains(&l.index))
            // Zone 0 is the default zone; indexes past 65535 fold into 1..=65535.
            .map(|l| {
                (
                    l.name.clone(),
                    (l.index % 65_535) as u16 + u16::from(l.index % 65_535 == 0),
                )
            })
            .collect();
    }

    /// Removes every `cali` chain, jump and set (shutdown).
    pub async fn remove(&mut self) -> Result<(), FirewallError> {
        self.firewall.remove(OWNER).await?;
        self.doomed_sets = self.kernel_sets().await?.into_iter().collect();
        self.destroy_doomed().await?;
        self.resync = true;
        Ok(())
    }

    async fn run_set_ops(&mut self) -> Result<(), FirewallError> {
        if self.set_ops.is_empty() {
            return Ok(());
        }
        let mut text = self.set_ops.join("\n");
        text.push('\n');
        self.set_ops.clear();
        ipset_restore(self.netns.as_deref(), &text).await
    }

    /// Every IP set of tenet's policy in the namespace (main and temporary names).
    async fn kernel_sets(&self) -> Result<Vec<String>, FirewallError> {
        let listed = Command::new("ipset")
            .args(["list", "-n"])
            .netns(self.netns.as_deref())
            .run()
            .await?;
        Ok(listed
            .stdout
            .lines()
            .filter(|s| s.starts_with("cali4-") || s.starts_with("cali4t"))
            .map(str::to_string)
            .collect())
    }

    async fn destroy_doomed(&mut self) -> Result<usize, FirewallError> {
        if self.doomed_sets.is_empty() {
            return Ok(0);
        }
        let present: BTreeSet<String> = self.kernel_sets().await?.into_iter().collect();
        let doomed: Vec<String> = std::mem::take(&mut self.doomed_sets)
            .into_iter()
            .filter(|s| present.contains(s))
            .collect();
        if doomed.is_empty() {
            return Ok(0);
        }
        let text: String = doomed.iter().map(|s| format!("destroy {s}\n")).collect();
        ipset_restore(self.netns.as_deref(), &text).await?;
        Ok(doomed.len())
    }
}

async fn ipset_restore(netns: Option<&Path>, text: &str) -> Result<(), FirewallError> {
    Command::new("ipset")
        .arg("restore")
        .netns(netns)
        .stdin(text)
        .run()
        .await
        .map_err(|e| rejected("ipset restore", text, e))?;
    Ok(())
}

/// The sets' members as the kernel has them, by set name (for tests and `status`).
pub async fn kernel_members(
    netns: Option<&Path>,
) -> Result<BTreeMap<String, BTreeSet<String>>, FirewallError> {
    let saved = Command::new("ipset").arg("save").netns(netns).run().await?;
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in saved.stdout.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("create"), Some(name), _) if name.starts_with("cali4") => {
                out.entry(name.to_string()).or_default();
            }
            (Some("add"), Some(name), Some(member)) if name.starts_with("cali4") => {
                out.entry(name.to_string())
                    .or_default()
                    .insert(member.to_string());
            }
            _ => {}
        }
    }
    Ok(out)
}
