//! The dataplane driver: keeps the state Felix's messages describe and makes the kernel
//! match it: IP sets through `ipset restore` (a whole set is built under a temporary name and
//! swapped in; deltas are `add`/`del -exist`), chains through `net::firewall` (one
//! `iptables-restore` transaction per change, only changed chains rewritten). Sets are
//! created before the rules that use them and destroyed after the rules that used them are
//! gone. Nothing reaches the kernel before InSync; the first apply after it reconciles with
//! what a previous run left (stray `cali` chains and sets are removed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::net::Netlink;
use crate::net::firewall::{
    Drift, Firewall, FirewallError, IptablesVariant, Ruleset, Table, rejected,
};
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
    /// The ruleset last rendered, and what changed in the state since: a change re-renders
    /// only the chains it touches (a 30,000-rule ruleset is not rebuilt for one rule).
    rendered: Option<Ruleset>,
    dirty: Dirty,
    /// The endpoint each interface's chains were rendered for.
    rendered_owner: BTreeMap<String, EndpointKey>,
}

type EndpointKey = (String, String, String);

#[derive(Debug, Default)]
struct Dirty {
    /// Render everything (first apply, configuration change).
    all: bool,
    /// The static chains (conntrack zones changed).
    base: bool,
    policies: BTreeSet<String>,
    profiles: BTreeSet<String>,
    /// A policy or profile appeared or went: endpoint chains jump only to existing ones.
    endpoints_all: bool,
    endpoints: BTreeSet<EndpointKey>,
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
            rendered: None,
            dirty: Dirty::default(),
            rendered_owner: BTreeMap::new(),
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
        self.rendered = None;
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
            Payload::ConfigUpdate(c) => {
                self.state.config = c.config.into_iter().collect();
                self.dirty.all = true;
            }
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
                    self.dirty.policies.insert(id.name.clone());
                    if self.state.policies.insert(id.name, p).is_none() {
                        self.dirty.endpoints_all = true;
                    }
                }
            }
            Payload::ActivePolicyRemove(r) => {
                if let Some(id) = r.id {
                    self.state.policies.remove(&id.name);
                    self.dirty.policies.insert(id.name);
                    self.dirty.endpoints_all = true;
                }
            }
            Payload::ActiveProfileUpdate(u) => {
                if let (Some(id), Some(p)) = (u.id, u.profile) {
                    self.dirty.profiles.insert(id.name.clone());
                    if self.state.profiles.insert(id.name, p).is_none() {
                        self.dirty.endpoints_all = true;
                    }
                }
            }
            Payload::ActiveProfileRemove(r) => {
                if let Some(id) = r.id {
                    self.state.profiles.remove(&id.name);
                    self.dirty.profiles.insert(id.name);
                    self.dirty.endpoints_all = true;
                }
            }
            Payload::WorkloadEndpointUpdate(u) => {
                self.zones_stale = true;
                if let (Some(id), Some(ep)) = (u.id, u.endpoint) {
                    let key = (id.orchestrator_id, id.workload_id, id.endpoint_id);
                    self.dirty.endpoints.insert(key.clone());
                    self.state.workloads.insert(key, ep);
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
        let rules = self.render_changes();
        let applied = self.firewall.apply(&rules).await;
        self.rendered = Some(rules);
        report.drift = applied?;
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
        self.rendered = None;
        let rules = self.render_changes();
        let drift = self.firewall.reconcile(&rules).await;
        self.rendered = Some(rules);
        let drift = drift?;
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
        let zones: BTreeMap<String, u16> = links
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
        if zones != self.state.zones {
            self.state.zones = zones;
            self.dirty.base = true;
        }
    }

    /// The ruleset for the state: the last one with only the chains the changes touch
    /// rendered again, or everything when there is no last one.
    fn render_changes(&mut self) -> Ruleset {
        let config = self.render_config();
        let dirty = std::mem::take(&mut self.dirty);
        let Some(mut rs) = self.rendered.take().filter(|_| !dirty.all) else {
            self.rendered_owner = owners(&self.state);
            return render::render(&self.state, &config);
        };
        if dirty.base {
            let mut fresh = render::base(&self.state, &config);
            for (key, rules) in rs.chains {
                let is_base = matches!(
                    key.1.as_str(),
                    "cali-FORWARD" | "cali-INPUT" | "cali-wl-to-host" | "cali-PREROUTING"
                );
                if !is_base {
                    fresh.chains.insert(key, rules);
                }
            }
            rs = fresh;
        }
        let put = |rs: &mut Ruleset, (name, rules): render::Chain| {
            rs.set_rules(Table::Filter, &name, Arc::new(rules));
        };
        for name in &dirty.policies {
            for inbound in [true, false] {
                rs.chains
                    .remove(&(Table::Filter, render::policy_chain(name, inbound)));
            }
            if let Some(p) = self.state.policies.get(name) {
                for c in render::policy_chains(name, p, &config) {
                    put(&mut rs, c);
                }
            }
        }
        for name in &dirty.profiles {
            for inbound in [true, false] {
                rs.chains
                    .remove(&(Table::Filter, render::profile_chain(name, inbound)));
            }
            if let Some(p) = self.state.profiles.get(name) {
                for c in render::profile_chains(name, p, &config) {
                    put(&mut rs, c);
                }
            }
        }
        let now = owners(&self.state);
        for (name, key) in &now {
            let stale = dirty.endpoints_all
                || dirty.endpoints.contains(key)
                || self.rendered_owner.get(name) != Some(key);
            if stale {
                let ep = &self.state.workloads[key];
                for c in render::endpoint_chains(ep, &self.state, &config) {
                    put(&mut rs, c);
                }
            }
        }
        for name in self.rendered_owner.keys().filter(|n| !now.contains_key(*n)) {
            rs.chains
                .remove(&(Table::Filter, render::to_endpoint_chain(name)));
            rs.chains
                .remove(&(Table::Filter, render::from_endpoint_chain(name)));
        }
        if !now.keys().eq(self.rendered_owner.keys()) {
            rs.chains
                .retain(|(t, c), _| !(*t == Table::Filter && render::is_dispatch_chain(c)));
            let names: Vec<String> = now.keys().cloned().collect();
            for c in render::dispatch_chains(&names, &config) {
                put(&mut rs, c);
            }
        }
        self.rendered_owner = now;
        rs
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

/// Each interface with the endpoint its chains are for (the first of a name wins).
fn owners(state: &DataplaneState) -> BTreeMap<String, EndpointKey> {
    let mut out = BTreeMap::new();
    for (key, ep) in &state.workloads {
        out.entry(ep.name.clone()).or_insert_with(|| key.clone());
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::firewall::FirewallBackend;
    use crate::policy::proto;

    struct NoBackend;

    #[async_trait::async_trait]
    impl FirewallBackend for NoBackend {
        fn name(&self) -> &'static str {
            "none"
        }
        async fn save(&self) -> Result<String, FirewallError> {
            Ok(String::new())
        }
        async fn restore(&self, _: &str) -> Result<(), FirewallError> {
            Ok(())
        }
    }

    fn dataplane() -> PolicyDataplane {
        PolicyDataplane {
            firewall: Firewall::with_backend(Box::new(NoBackend), None),
            netns: None,
            hook: WorkloadHook::Bridged {
                prefixes: vec!["tvn_".into()],
            },
            state: DataplaneState::default(),
            in_sync: true,
            resync: false,
            set_ops: Vec::new(),
            doomed_sets: BTreeSet::new(),
            zones_stale: false,
            rendered: None,
            dirty: Dirty::default(),
            rendered_owner: BTreeMap::new(),
        }
    }

    fn policy(name: &str, port: i32) -> Payload {
        Payload::ActivePolicyUpdate(proto::ActivePolicyUpdate {
            id: Some(proto::PolicyId {
                tier: "default".into(),
                name: name.into(),
            }),
            policy: Some(proto::Policy {
                inbound_rules: vec![proto::Rule {
                    action: "allow".into(),
                    protocol: Some(proto::Protocol {
                        number_or_name: Some(proto::protocol::NumberOrName::Name("tcp".into())),
                    }),
                    dst_ports: vec![proto::PortRange {
                        first: port,
                        last: port,
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }),
        })
    }

    fn endpoint(w: &str, iface: &str, policies: &[&str], profiles: &[&str]) -> Payload {
        Payload::WorkloadEndpointUpdate(proto::WorkloadEndpointUpdate {
            id: Some(proto::WorkloadEndpointId {
                orchestrator_id: "o".into(),
                workload_id: w.into(),
                endpoint_id: "e".into(),
            }),
            endpoint: Some(proto::WorkloadEndpoint {
                state: "active".into(),
                name: iface.into(),
                profile_ids: profiles.iter().map(|p| p.to_string()).collect(),
                tiers: vec![proto::TierInfo {
                    name: "default".into(),
                    ingress_policies: policies.iter().map(|p| p.to_string()).collect(),
                    egress_policies: vec![],
                }],
                ..Default::default()
            }),
        })
    }

    /// After every change the incremental ruleset equals a full render of the state.
    #[test]
    fn incremental_rendering_matches_a_full_render() {
        let mut dp = dataplane();
        type Step = Box<dyn Fn(&mut PolicyDataplane)>;
        let steps: Vec<Step> = vec![
            Box::new(|dp| dp.handle(policy("a", 80))),
            Box::new(|dp| dp.handle(endpoint("w1", "tvn_1", &["a", "b"], &["p"]))),
            Box::new(|dp| dp.handle(endpoint("w2", "tvn_2", &["a"], &[]))),
            // b appears later: w1's chain must now jump to it.
            Box::new(|dp| dp.handle(policy("b", 81))),
            Box::new(|dp| {
                dp.handle(Payload::ActiveProfileUpdate(proto::ActiveProfileUpdate {
                    id: Some(proto::ProfileId { name: "p".into() }),
                    profile: Some(proto::Profile::default()),
                }))
            }),
            Box::new(|dp| dp.handle(policy("a", 90))),
            // Two endpoints on one interface: the first key wins, then the other takes over.
            Box::new(|dp| dp.handle(endpoint("w0", "tvn_2", &[], &["p"]))),
            Box::new(|dp| {
                dp.handle(Payload::WorkloadEndpointRemove(
                    proto::WorkloadEndpointRemove {
                        id: Some(proto::WorkloadEndpointId {
                            orchestrator_id: "o".into(),
                            workload_id: "w0".into(),
                            endpoint_id: "e".into(),
                        }),
                    },
                ))
            }),
            // Renamed interface.
            Box::new(|dp| dp.handle(endpoint("w1", "tvn_3", &["a"], &[]))),
            Box::new(|dp| {
                dp.handle(Payload::ActivePolicyRemove(proto::ActivePolicyRemove {
                    id: Some(proto::PolicyId {
                        tier: "default".into(),
                        name: "b".into(),
                    }),
                }))
            }),
            Box::new(|dp| {
                dp.state.zones.insert("tbr_1".into(), 5);
                dp.dirty.base = true;
            }),
            Box::new(|dp| {
                dp.handle(Payload::ConfigUpdate(proto::ConfigUpdate {
                    config: [("LogPrefix".to_string(), "x".to_string())].into(),
                }))
            }),
            Box::new(|dp| {
                dp.handle(Payload::WorkloadEndpointRemove(
                    proto::WorkloadEndpointRemove {
                        id: Some(proto::WorkloadEndpointId {
                            orchestrator_id: "o".into(),
                            workload_id: "w2".into(),
                            endpoint_id: "e".into(),
                        }),
                    },
                ))
            }),
        ];
        for (i, step) in steps.iter().enumerate() {
            step(&mut dp);
            let incremental = dp.render_changes();
            let full = render::render(&dp.state, &dp.render_config());
            assert_eq!(incremental.chains, full.chains, "after step {i}");
            assert_eq!(incremental.jumps, full.jumps, "after step {i}");
            dp.rendered = Some(incremental);
        }
    }
}
