//! The dataplane driver: keeps the state Felix's messages describe and makes the kernel
//! match it: IP sets through `ipset restore` (a whole set is built under a temporary name and
//! swapped in; deltas are `add`/`del -exist`), chains through `net::firewall` (one
//! `iptables-restore` transaction per change, only changed chains rewritten). Sets are
//! created before the rules that use them and destroyed after the rules that used them are
//! gone. Nothing reaches the kernel before InSync; the first apply after it reconciles with
//! what a previous run left (stray `cali` chains and sets are removed).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::net::Netlink;
use crate::net::firewall::{
    Drift, Firewall, FirewallError, IpFamily, IptablesVariant, Ruleset, Table,
};
use crate::policy::proto::to_dataplane::Payload;
use crate::policy::render::{
    self, DataplaneState, OWNER, RenderConfig, WorkloadHook, ipset_name_in, ipset_temp_name_in,
};

/// Both families, IPv4 first.
const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];
use crate::policy::validate;

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
    /// The IPv4 and the IPv6 tables.
    firewalls: [(IpFamily, Firewall); 2],
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
    /// The rulesets last rendered (per family), and what changed in the state since: a
    /// change re-renders only the chains it touches (a 30,000-rule ruleset is not rebuilt
    /// for one rule).
    rendered: BTreeMap<IpFamily, Ruleset>,
    dirty: Dirty,
    /// The endpoint each interface's chains were rendered for.
    rendered_owner: BTreeMap<String, EndpointKey>,
    /// Bridges whose `nf_call_iptables` this dataplane switched on.
    nf_call_bridges: BTreeSet<u32>,
    /// Netlink in the namespace (links for zones and endpoint status); none offline.
    netlink: Option<Netlink>,
}

/// A workload endpoint: (orchestrator, workload, endpoint).
pub type EndpointKey = (String, String, String);

/// Endpoint statuses as [`PolicyDataplane::endpoint_statuses`] gives them.
pub type Statuses = BTreeMap<EndpointKey, &'static str>;

/// What a status reporter must say, given what it said (`sent`) and the statuses now: the
/// endpoints gone, and those whose status is new or different.
pub fn status_changes(
    sent: &Statuses,
    now: &Statuses,
) -> (Vec<EndpointKey>, Vec<(EndpointKey, &'static str)>) {
    let gone = sent
        .keys()
        .filter(|k| !now.contains_key(*k))
        .cloned()
        .collect();
    let changed = now
        .iter()
        .filter(|(k, s)| sent.get(*k) != Some(*s))
        .map(|(k, s)| (k.clone(), *s))
        .collect();
    (gone, changed)
}

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
    /// A host endpoint changed (their chains are rendered as one piece).
    host_endpoints: bool,
    endpoints: BTreeSet<EndpointKey>,
}

impl PolicyDataplane {
    pub async fn new(
        netns: Option<&Path>,
        hook: WorkloadHook,
        variant: Option<IptablesVariant>,
    ) -> Result<Self, FirewallError> {
        let variant = match variant {
            Some(v) => v,
            None => IptablesVariant::detect().await?,
        };
        let netlink = match netns {
            Some(p) => Netlink::connect_in(p),
            None => Netlink::connect(),
        };
        let netlink = netlink
            .map_err(|e| warn!(error = %e, "policy: no netlink (no conntrack zones, no endpoint status)"))
            .ok();
        Ok(PolicyDataplane {
            firewalls: [
                (
                    IpFamily::V4,
                    Firewall::for_family(netns, Some(variant), IpFamily::V4).await?,
                ),
                (
                    IpFamily::V6,
                    Firewall::for_family(netns, Some(variant), IpFamily::V6).await?,
                ),
            ],
            hook,
            state: DataplaneState::default(),
            in_sync: false,
            resync: true,
            set_ops: Vec::new(),
            doomed_sets: BTreeSet::new(),
            zones_stale: true,
            rendered: BTreeMap::new(),
            dirty: Dirty::default(),
            rendered_owner: BTreeMap::new(),
            nf_call_bridges: BTreeSet::new(),
            netlink,
        })
    }

    /// A dataplane that keeps and renders the state but never touches a kernel: for tests
    /// and fuzzing of everything between the messages and the restore text.
    pub fn offline(hook: WorkloadHook) -> Self {
        PolicyDataplane {
            firewalls: [
                (
                    IpFamily::V4,
                    Firewall::with_backend(Box::new(Offline), None),
                ),
                (
                    IpFamily::V6,
                    Firewall::with_backend(Box::new(Offline), None),
                ),
            ],
            hook,
            state: DataplaneState::default(),
            in_sync: false,
            resync: true,
            set_ops: Vec::new(),
            doomed_sets: BTreeSet::new(),
            zones_stale: false,
            rendered: BTreeMap::new(),
            dirty: Dirty::default(),
            rendered_owner: BTreeMap::new(),
            nf_call_bridges: BTreeSet::new(),
            netlink: None,
        }
    }

    /// The rulesets the state asks for now, per family (rendering only what changed since
    /// the last call), and the `ipset restore` lines waiting to be run.
    pub fn desired(&mut self) -> (Vec<(IpFamily, Ruleset)>, Vec<String>) {
        let rulesets = self.render_changes();
        for (family, rs) in &rulesets {
            self.rendered.insert(*family, rs.clone());
        }
        (rulesets, self.set_ops.clone())
    }

    /// Each workload endpoint's status as Felix reports it: `up` when it is active and its
    /// interface is up, else `down`.
    pub async fn endpoint_statuses(&self) -> Statuses {
        // One link dump, not one request per endpoint.
        let up: BTreeSet<String> = match &self.netlink {
            Some(nl) => nl
                .links()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|l| l.up)
                .map(|l| l.name)
                .collect(),
            None => BTreeSet::new(),
        };
        self.state
            .workloads
            .iter()
            .map(|(key, ep)| {
                let status = if ep.state == "active" && up.contains(&ep.name) {
                    "up"
                } else {
                    "down"
                };
                (key.clone(), status)
            })
            .collect()
    }

    /// Forgets the state (before a fresh snapshot); the next apply reconciles the kernel.
    pub fn reset(&mut self) {
        self.state = DataplaneState::default();
        self.in_sync = false;
        self.resync = true;
        self.set_ops.clear();
        self.doomed_sets.clear();
        self.zones_stale = true;
        self.rendered.clear();
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
                if let Err(e) = validate::ip_set_id(&u.id) {
                    warn!(error = %e, "policy dataplane: IP set refused");
                    return;
                }
                let members: BTreeSet<String> = valid_members(u.members, &u.id);
                for f in FAMILIES {
                    self.doomed_sets.remove(&ipset_name_in(&u.id, f));
                }
                self.queue_whole_set(&u.id, &members);
                self.state.ipsets.insert(u.id, members);
            }
            Payload::IpsetDeltaUpdate(d) => {
                if let Err(e) = validate::ip_set_id(&d.id) {
                    warn!(error = %e, "policy dataplane: IP set delta refused");
                    return;
                }
                let removed = valid_members(d.removed_members, &d.id);
                let added = valid_members(d.added_members, &d.id);
                let set = self.state.ipsets.entry(d.id.clone()).or_default();
                for m in removed {
                    let name = ipset_name_in(&d.id, family_of(&m));
                    self.set_ops.push(format!("del {name} {m} -exist"));
                    set.remove(&m);
                }
                for m in added {
                    let name = ipset_name_in(&d.id, family_of(&m));
                    self.set_ops.push(format!("add {name} {m} -exist"));
                    set.insert(m);
                }
            }
            Payload::IpsetRemove(r) => {
                if validate::ip_set_id(&r.id).is_ok() {
                    self.state.ipsets.remove(&r.id);
                    for f in FAMILIES {
                        self.doomed_sets.insert(ipset_name_in(&r.id, f));
                    }
                }
            }
            Payload::ActivePolicyUpdate(u) => {
                let (Some(id), Some(p)) = (u.id, u.policy) else {
                    return;
                };
                match validate::rule_holder(&id.name, &p.inbound_rules, &p.outbound_rules) {
                    Ok(()) => {
                        self.dirty.policies.insert(id.name.clone());
                        if self.state.policies.insert(id.name, p).is_none() {
                            self.dirty.endpoints_all = true;
                        }
                    }
                    Err(e) => {
                        warn!(policy = %id.name, error = %e, "policy dataplane: policy refused (treated as removed)");
                        self.remove_policy(id.name);
                    }
                }
            }
            Payload::ActivePolicyRemove(r) => {
                if let Some(id) = r.id {
                    self.remove_policy(id.name);
                }
            }
            Payload::ActiveProfileUpdate(u) => {
                let (Some(id), Some(p)) = (u.id, u.profile) else {
                    return;
                };
                match validate::rule_holder(&id.name, &p.inbound_rules, &p.outbound_rules) {
                    Ok(()) => {
                        self.dirty.profiles.insert(id.name.clone());
                        if self.state.profiles.insert(id.name, p).is_none() {
                            self.dirty.endpoints_all = true;
                        }
                    }
                    Err(e) => {
                        warn!(profile = %id.name, error = %e, "policy dataplane: profile refused (treated as removed)");
                        self.remove_profile(id.name);
                    }
                }
            }
            Payload::ActiveProfileRemove(r) => {
                if let Some(id) = r.id {
                    self.remove_profile(id.name);
                }
            }
            Payload::WorkloadEndpointUpdate(u) => {
                let (Some(id), Some(ep)) = (u.id, u.endpoint) else {
                    return;
                };
                let key = (id.orchestrator_id, id.workload_id, id.endpoint_id);
                self.zones_stale = true;
                self.dirty.endpoints.insert(key.clone());
                match validate::workload(&ep) {
                    Ok(()) => {
                        self.state.workloads.insert(key, ep);
                    }
                    Err(e) => {
                        warn!(endpoint = ?key, error = %e, "policy dataplane: endpoint refused (treated as removed)");
                        self.state.workloads.remove(&key);
                    }
                }
            }
            Payload::WorkloadEndpointRemove(r) => {
                if let Some(id) = r.id {
                    let key = (id.orchestrator_id, id.workload_id, id.endpoint_id);
                    self.zones_stale = true;
                    self.state.workloads.remove(&key);
                    self.dirty.endpoints.insert(key);
                }
            }
            Payload::HostEndpointUpdate(u) => {
                let (Some(id), Some(ep)) = (u.id, u.endpoint) else {
                    return;
                };
                self.dirty.host_endpoints = true;
                match validate::host_endpoint(&ep) {
                    Ok(()) => {
                        self.state.host_endpoints.insert(id.endpoint_id, ep);
                    }
                    Err(e) => {
                        warn!(endpoint = %id.endpoint_id, error = %e, "policy dataplane: host endpoint refused (treated as removed)");
                        self.state.host_endpoints.remove(&id.endpoint_id);
                    }
                }
            }
            Payload::HostEndpointRemove(r) => {
                if let Some(id) = r.id {
                    self.dirty.host_endpoints = true;
                    self.state.host_endpoints.remove(&id.endpoint_id);
                }
            }
            // Host metadata and pools are not rendered yet.
            other => debug!(?other, "policy dataplane: message not rendered"),
        }
    }

    fn remove_policy(&mut self, name: String) {
        if self.state.policies.remove(&name).is_some() {
            self.dirty.endpoints_all = true;
        }
        self.dirty.policies.insert(name);
    }

    fn remove_profile(&mut self, name: String) {
        if self.state.profiles.remove(&name).is_some() {
            self.dirty.endpoints_all = true;
        }
        self.dirty.profiles.insert(name);
    }

    /// Builds both families' sets of `id` whole under temporary names and swaps them in.
    fn queue_whole_set(&mut self, id: &str, members: &BTreeSet<String>) {
        for family in FAMILIES {
            let (name, temp) = (ipset_name_in(id, family), ipset_temp_name_in(id, family));
            let mine: Vec<&String> = members.iter().filter(|m| family_of(m) == family).collect();
            let max = self.max_size().max(mine.len());
            let kind = match family {
                IpFamily::V4 => "inet",
                IpFamily::V6 => "inet6",
            };
            let create = |n: &str| format!("create {n} hash:ip family {kind} maxelem {max} -exist");
            self.set_ops.push(create(&temp));
            self.set_ops.push(format!("flush {temp}"));
            self.set_ops
                .extend(mine.iter().map(|m| format!("add {temp} {m}")));
            self.set_ops.push(create(&name));
            self.set_ops.push(format!("swap {name} {temp}"));
            self.set_ops.push(format!("destroy {temp}"));
        }
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
        // The two families' tables are independent: both transactions run at once.
        let rulesets = self.render_changes();
        let applied = futures::future::join_all(
            rulesets
                .iter()
                .map(|(family, rules)| self.firewall(*family).apply(rules)),
        )
        .await;
        for (family, rules) in rulesets {
            self.rendered.insert(family, rules);
        }
        for drift in applied {
            let drift = drift?;
            report.drift.restored.extend(drift.restored);
            report.drift.removed.extend(drift.removed);
        }
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
        let wanted: BTreeSet<String> = sets
            .iter()
            .flat_map(|(id, _)| FAMILIES.map(|f| ipset_name_in(id, f)))
            .collect();
        let lines = self.set_ops.len();
        self.run_set_ops().await?;
        self.discover_zones().await;
        self.rendered.clear();
        let mut drift = Drift::default();
        let rulesets = self.render_changes();
        let reconciled = futures::future::join_all(
            rulesets
                .iter()
                .map(|(family, rules)| self.firewall(*family).reconcile(rules)),
        )
        .await;
        for (family, rules) in rulesets {
            self.rendered.insert(family, rules);
        }
        for d in reconciled {
            let d = d?;
            drift.restored.extend(d.restored);
            drift.removed.extend(d.removed);
        }
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
        let Some(nl) = &self.netlink else {
            return;
        };
        let links = match nl.links().await {
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
        // Bridged traffic must reach iptables for the rules to see it: switch it on per
        // bridge, so it does not depend on the namespace's bridge-nf-call sysctls.
        let new: Vec<u32> = bridges.difference(&self.nf_call_bridges).copied().collect();
        for index in new {
            match nl.set_bridge_nf_call(index, true).await {
                Ok(()) => {
                    self.nf_call_bridges.insert(index);
                }
                Err(e) => warn!(bridge = index, error = %e, "policy: bridge nf_call_iptables"),
            }
        }
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

    fn firewall(&self, family: IpFamily) -> &Firewall {
        &self
            .firewalls
            .iter()
            .find(|(f, _)| *f == family)
            .expect("both families")
            .1
    }

    /// The rulesets for the state, per family: the last ones with only the chains the
    /// changes touch rendered again, or everything when there is no last one.
    fn render_changes(&mut self) -> Vec<(IpFamily, Ruleset)> {
        let dirty = std::mem::take(&mut self.dirty);
        let now = owners(&self.state);
        let mut out = Vec::new();
        for family in FAMILIES {
            let config = self.render_config().with_family(family);
            let rs = match self.rendered.remove(&family).filter(|_| !dirty.all) {
                Some(rs) => update(rs, &dirty, &now, &self.rendered_owner, &self.state, &config),
                None => render::render(&self.state, &config),
            };
            out.push((family, rs));
        }
        self.rendered_owner = now;
        out
    }

    /// Removes every `cali` chain, jump and set (shutdown).
    pub async fn remove(&mut self) -> Result<(), FirewallError> {
        for (_, firewall) in &self.firewalls {
            firewall.remove(OWNER).await?;
        }
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
        self.firewall(IpFamily::V4).ipset_restore(&text).await
    }

    /// Every IP set of tenet's policy in the namespace (main and temporary names).
    async fn kernel_sets(&self) -> Result<Vec<String>, FirewallError> {
        Ok(self
            .firewall(IpFamily::V4)
            .ipset_names()
            .await?
            .into_iter()
            .filter(|s| {
                ["cali4-", "cali4t", "cali6-", "cali6t"]
                    .iter()
                    .any(|p| s.starts_with(p))
            })
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
        self.firewall(IpFamily::V4).ipset_restore(&text).await?;
        Ok(doomed.len())
    }
}

/// `rs` (rendered for the state before `dirty`) brought up to date: only the chains the
/// changes touch are rendered again.
fn update(
    mut rs: Ruleset,
    dirty: &Dirty,
    now: &BTreeMap<String, EndpointKey>,
    before: &BTreeMap<String, EndpointKey>,
    state: &DataplaneState,
    config: &RenderConfig,
) -> Ruleset {
    if dirty.base {
        let mut fresh = render::base(state, config);
        for (key, rules) in rs.chains {
            if !render::BASE_CHAINS.contains(&key.1.as_str()) {
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
        if let Some(p) = state.policies.get(name) {
            for c in render::policy_chains(name, p, config) {
                put(&mut rs, c);
            }
        }
    }
    for name in &dirty.profiles {
        for inbound in [true, false] {
            rs.chains
                .remove(&(Table::Filter, render::profile_chain(name, inbound)));
        }
        if let Some(p) = state.profiles.get(name) {
            for c in render::profile_chains(name, p, config) {
                put(&mut rs, c);
            }
        }
    }
    for (name, key) in now {
        let stale =
            dirty.endpoints_all || dirty.endpoints.contains(key) || before.get(name) != Some(key);
        if stale {
            for c in render::endpoint_chains(&state.workloads[key], state, config) {
                put(&mut rs, c);
            }
        }
    }
    for name in before.keys().filter(|n| !now.contains_key(*n)) {
        rs.chains
            .remove(&(Table::Filter, render::to_endpoint_chain(name)));
        rs.chains
            .remove(&(Table::Filter, render::from_endpoint_chain(name)));
    }
    if !now.keys().eq(before.keys()) {
        rs.chains
            .retain(|(t, c), _| !(*t == Table::Filter && render::is_dispatch_chain(c)));
        let names: Vec<String> = now.keys().cloned().collect();
        for c in render::dispatch_chains(&names, config) {
            put(&mut rs, c);
        }
    }
    if dirty.host_endpoints || dirty.endpoints_all {
        rs.chains
            .retain(|(t, c), _| !(*t == Table::Filter && render::is_host_endpoint_chain(c)));
        for c in render::host_endpoint_part(state, config) {
            put(&mut rs, c);
        }
    }
    rs
}

/// The family of an (already checked) member address.
fn family_of(member: &str) -> IpFamily {
    if member.contains(':') {
        IpFamily::V6
    } else {
        IpFamily::V4
    }
}

/// The backend of an [`PolicyDataplane::offline`] dataplane: nothing to save or restore.
struct Offline;

#[async_trait::async_trait]
impl crate::net::firewall::FirewallBackend for Offline {
    fn name(&self) -> &'static str {
        "offline"
    }
    async fn save(&self) -> Result<String, FirewallError> {
        Ok(String::new())
    }
    async fn restore(&self, _: &str) -> Result<(), FirewallError> {
        Ok(())
    }
}

/// The members that go into the sets; anything that is not an address is dropped with a
/// warning (one would make `ipset restore` refuse the whole batch).
fn valid_members(members: Vec<String>, id: &str) -> BTreeSet<String> {
    members
        .into_iter()
        .filter(|m| match validate::member(m) {
            Ok(()) => true,
            Err(e) => {
                warn!(set = %id, error = %e, "policy dataplane: member dropped");
                false
            }
        })
        .collect()
}

/// Each interface with the endpoint its chains are for (the first of a name wins).
fn owners(state: &DataplaneState) -> BTreeMap<String, EndpointKey> {
    let mut out = BTreeMap::new();
    for (key, ep) in &state.workloads {
        out.entry(ep.name.clone()).or_insert_with(|| key.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::proto;

    fn dataplane() -> PolicyDataplane {
        let mut dp = PolicyDataplane::offline(WorkloadHook::Bridged {
            prefixes: vec!["tvn_".into()],
        });
        dp.in_sync = true;
        dp
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
                dp.handle(Payload::HostEndpointUpdate(proto::HostEndpointUpdate {
                    id: Some(proto::HostEndpointId {
                        endpoint_id: "eth0-ep".into(),
                    }),
                    endpoint: Some(proto::HostEndpoint {
                        name: "eth0".into(),
                        profile_ids: vec!["p".into()],
                        tiers: vec![proto::TierInfo {
                            name: "default".into(),
                            ingress_policies: vec!["a".into()],
                            egress_policies: vec![],
                        }],
                        ..Default::default()
                    }),
                }))
            }),
            // A policy a host endpoint uses goes: its chain stops jumping to it.
            Box::new(|dp| {
                dp.handle(Payload::ActivePolicyRemove(proto::ActivePolicyRemove {
                    id: Some(proto::PolicyId {
                        tier: "default".into(),
                        name: "a".into(),
                    }),
                }))
            }),
            Box::new(|dp| {
                dp.handle(Payload::HostEndpointRemove(proto::HostEndpointRemove {
                    id: Some(proto::HostEndpointId {
                        endpoint_id: "eth0-ep".into(),
                    }),
                }))
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
            for (family, incremental) in dp.render_changes() {
                let full = render::render(&dp.state, &dp.render_config().with_family(family));
                assert_eq!(incremental.chains, full.chains, "{family:?} after step {i}");
                assert_eq!(incremental.jumps, full.jumps, "{family:?} after step {i}");
                dp.rendered.insert(family, incremental);
            }
        }
    }

    #[test]
    fn values_that_would_break_a_restore_are_refused_alone() {
        let mut dp = dataplane();
        dp.handle(policy("good", 80));
        dp.handle(policy("bad name", 80));
        dp.handle(policy("bad-port", 70000));
        dp.handle(endpoint("w1", "tvn 1", &["good"], &[]));
        dp.handle(endpoint("w2", "tvn_2", &["good"], &[]));
        dp.handle(Payload::IpsetUpdate(proto::IpSetUpdate {
            id: "s:x".into(),
            members: vec![
                "10.0.0.1".into(),
                "10.0.0.2 -exist".into(),
                "fd00::1".into(),
            ],
        }));
        assert_eq!(dp.state.policies.keys().collect::<Vec<_>>(), ["good"]);
        assert_eq!(dp.state.workloads.len(), 1);
        assert_eq!(
            dp.state.ipsets["s:x"].iter().collect::<Vec<_>>(),
            ["10.0.0.1", "fd00::1"]
        );
        let (rulesets, ops) = dp.desired();
        for (_, rs) in &rulesets {
            assert!(rs.chains.keys().all(|(_, c)| !c.contains(' ')));
        }
        assert!(
            ops.contains(&"add cali4ts:x 10.0.0.1".to_string()),
            "{ops:?}"
        );
        assert!(
            ops.contains(&"add cali6ts:x fd00::1".to_string()),
            "{ops:?}"
        );
        // A policy that turns bad is removed, not kept stale.
        dp.handle(policy("good", -1));
        assert!(dp.state.policies.is_empty());
        for (_, rs) in dp.desired().0 {
            assert!(!rs.chains.keys().any(|(_, c)| c == "cali-pi-good"));
        }
    }
}
