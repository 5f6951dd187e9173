//! The calculation engine: the `/calico/v1` datastore in, Felix's dataplane messages out,
//! incrementally. Pure: no I/O, no clock.
//!
//! What it computes (reference §3.3):
//! * every endpoint's effective labels: its own, then each profile's labels and tags (a tag
//!   is a label with an empty value), profiles in the endpoint's order;
//! * for each **local** endpoint (this host's), the policies whose selector matches it,
//!   ordered by `order` (missing last) then name, split by ingress/egress types;
//! * the active policies (matching a local endpoint) and profiles (referenced by one), with
//!   their rules; the IP sets those rules reference, with members from **every** endpoint
//!   in the cluster, sent whole once and as deltas after.
//!
//! Scoping (GRE/VXLAN mode, where tenants may reuse addresses): with a scope label
//! (`tenet.tenant`), each policy and profile is instantiated once per tenant that has a local
//! endpoint using it, named `<tenant>:<name>`, and every IP-set selector of its rules is
//! narrowed with `&& tenet.tenant == "<tenant>"`, so one tenant's addresses never enter
//! another tenant's sets. Without a scope label it is Calico's single address space.
//!
//! Cost is proportional to the change: an endpoint change evaluates the active IP-set
//! selectors and, if local, the policies against that endpoint only; a policy change
//! evaluates its selector against local endpoints only; a new IP set scans the endpoints
//! once.

mod input;
mod rules;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use tracing::debug;

pub use input::{Input, rules_problems};
pub use rules::{Scope, convert, convert_all, rule_selectors};

use crate::calico::{
    HostEndpoint, IpPool, Policy, PolicyType, ProfileRules, WorkloadEndpoint, WorkloadEndpointId,
};
use crate::policy::proto::{self, to_dataplane::Payload};
use crate::policy::selector::Selector;

/// The only tier of Calico 2.x.
pub const TIER: &str = "default";

#[derive(Clone, Debug)]
pub struct CalcConfig {
    /// This host's Calico name: only its endpoints are sent.
    pub hostname: String,
    /// The label that scopes policy to a tenant (GRE/VXLAN mode); `None` in routed mode.
    pub scope_label: Option<String>,
}

/// An endpoint anywhere in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EndpointKey {
    Workload(WorkloadEndpointId),
    Host { host: String, endpoint: String },
}

impl EndpointKey {
    fn host(&self) -> &str {
        match self {
            EndpointKey::Workload(id) => &id.host,
            EndpointKey::Host { host, .. } => host,
        }
    }
}

#[derive(Clone, Debug)]
enum EndpointValue {
    Workload(WorkloadEndpoint),
    Host(HostEndpoint),
}

#[derive(Clone, Debug)]
struct Endpoint {
    value: EndpointValue,
    /// Effective labels (own, then inherited from profiles).
    labels: BTreeMap<String, String>,
    scope: Option<Scope>,
    /// The addresses it puts in IP sets.
    ips: Vec<IpAddr>,
}

impl Endpoint {
    fn own_labels(&self) -> &BTreeMap<String, String> {
        match &self.value {
            EndpointValue::Workload(w) => &w.labels,
            EndpointValue::Host(h) => &h.labels,
        }
    }

    fn profile_ids(&self) -> &[String] {
        match &self.value {
            EndpointValue::Workload(w) => &w.profile_ids,
            EndpointValue::Host(h) => &h.profile_ids,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Profile {
    /// Existence is defined by the tags key.
    tags: Option<Vec<String>>,
    labels: BTreeMap<String, String>,
    rules: Option<ProfileRules>,
}

#[derive(Clone, Debug)]
struct PolicyData {
    value: Policy,
    selector: Selector,
}

/// A policy or profile as used in one scope. Ordered by name first, so that every instance
/// of one name is a range.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Instance {
    name: String,
    scope: Option<Scope>,
}

impl Instance {
    /// The name the dataplane knows it by.
    fn wire_name(&self) -> String {
        match &self.scope {
            None => self.name.clone(),
            Some(s) => format!("{}:{}", s.value, self.name),
        }
    }
}

/// Which kind of rule holder an instance is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RulesOf {
    Policy,
    Profile,
}

/// An active policy or profile instance.
#[derive(Debug, Default)]
struct Active {
    /// Local endpoints using it.
    users: usize,
    /// The IP sets its rules reference (counted once per reference).
    sets: Vec<String>,
}

#[derive(Debug)]
struct IpSetState {
    selector: Selector,
    refs: usize,
    members: HashMap<IpAddr, usize>,
    /// Whether the dataplane has it; if not, the next flush sends it whole.
    sent: bool,
    added: BTreeSet<IpAddr>,
    removed: BTreeSet<IpAddr>,
}

#[derive(Debug, Default)]
struct Local {
    /// Names of the policies whose selector matches it.
    policies: BTreeSet<String>,
    /// Instances it is counted as a user of.
    policy_instances: Vec<Instance>,
    profile_instances: Vec<Instance>,
}

/// Counts, for benchmarks and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CalcStats {
    pub endpoints: usize,
    pub local_endpoints: usize,
    pub active_policies: usize,
    pub active_profiles: usize,
    pub ip_sets: usize,
    pub ip_set_members: usize,
}

/// The engine. Feed it [`Input`]s with [`CalcGraph::apply`]; take the messages with
/// [`CalcGraph::flush`].
pub struct CalcGraph {
    config: CalcConfig,
    endpoints: HashMap<EndpointKey, Endpoint>,
    profiles: HashMap<String, Profile>,
    /// Endpoints referencing each profile (label inheritance follows profile changes).
    profile_users: HashMap<String, HashSet<EndpointKey>>,
    policies: BTreeMap<String, PolicyData>,
    local: BTreeMap<EndpointKey, Local>,
    active_policies: BTreeMap<Instance, Active>,
    active_profiles: BTreeMap<Instance, Active>,
    ipsets: HashMap<String, IpSetState>,
    global_config: BTreeMap<String, String>,
    host_config: BTreeMap<String, String>,
    pools: BTreeMap<IpNetwork, IpPool>,
    host_ips: BTreeMap<String, std::net::Ipv4Addr>,

    in_sync: bool,
    in_sync_sent: bool,
    dirty_policies: BTreeSet<Instance>,
    dirty_profiles: BTreeSet<Instance>,
    dirty_endpoints: BTreeSet<EndpointKey>,
    dirty_sets: BTreeSet<String>,
    removed_sets: BTreeSet<String>,
    dirty_pools: BTreeSet<IpNetwork>,
    dirty_host_ips: BTreeSet<String>,
    sent_policies: HashMap<Instance, proto::Policy>,
    sent_profiles: HashMap<Instance, proto::Profile>,
    sent_endpoints: HashMap<EndpointKey, Payload>,
    sent_config: Option<BTreeMap<String, String>>,
}

impl CalcGraph {
    pub fn new(config: CalcConfig) -> Self {
        CalcGraph {
            config,
            endpoints: HashMap::new(),
            profiles: HashMap::new(),
            profile_users: HashMap::new(),
            policies: BTreeMap::new(),
            local: BTreeMap::new(),
            active_policies: BTreeMap::new(),
            active_profiles: BTreeMap::new(),
            ipsets: HashMap::new(),
            global_config: BTreeMap::new(),
            host_config: BTreeMap::new(),
            pools: BTreeMap::new(),
            host_ips: BTreeMap::new(),
            in_sync: false,
            in_sync_sent: false,
            dirty_policies: BTreeSet::new(),
            dirty_profiles: BTreeSet::new(),
            dirty_endpoints: BTreeSet::new(),
            dirty_sets: BTreeSet::new(),
            removed_sets: BTreeSet::new(),
            dirty_pools: BTreeSet::new(),
            dirty_host_ips: BTreeSet::new(),
            sent_policies: HashMap::new(),
            sent_profiles: HashMap::new(),
            sent_endpoints: HashMap::new(),
            sent_config: None,
        }
    }

    pub fn stats(&self) -> CalcStats {
        CalcStats {
            endpoints: self.endpoints.len(),
            local_endpoints: self.local.len(),
            active_policies: self.active_policies.len(),
            active_profiles: self.active_profiles.len(),
            ip_sets: self.ipsets.len(),
            ip_set_members: self.ipsets.values().map(|s| s.members.len()).sum(),
        }
    }

    /// The merged Felix configuration: global values, overridden by this host's.
    pub fn felix_config(&self) -> BTreeMap<String, String> {
        let mut c = self.global_config.clone();
        c.extend(self.host_config.clone());
        c
    }

    pub fn apply(&mut self, input: Input) {
        match input {
            Input::WorkloadEndpoint { id, value } => {
                let key = EndpointKey::Workload(id);
                let value = value.map(EndpointValue::Workload);
                self.set_endpoint(key, value);
            }
            Input::HostEndpoint {
                host,
                endpoint,
                value,
            } => {
                let key = EndpointKey::Host { host, endpoint };
                self.set_endpoint(key, value.map(EndpointValue::Host));
            }
            Input::ProfileTags { profile, tags } => {
                self.profile_mut(&profile).tags = tags;
                self.profile_labels_changed(&profile);
                self.refresh_profile(&profile);
            }
            Input::ProfileLabels { profile, labels } => {
                self.profile_mut(&profile).labels = labels.unwrap_or_default();
                self.profile_labels_changed(&profile);
            }
            Input::ProfileRules { profile, rules } => {
                self.profile_mut(&profile).rules = rules;
                self.refresh_profile(&profile);
            }
            Input::Policy { tier, name, value } => {
                if tier != TIER {
                    debug!(%tier, %name, "policy: only the default tier exists in Calico 2.x");
                    return;
                }
                self.set_policy(&name, value);
            }
            Input::Pool { cidr, value } => {
                match value {
                    Some(v) => self.pools.insert(cidr, v),
                    None => self.pools.remove(&cidr),
                };
                self.dirty_pools.insert(cidr);
            }
            Input::Config { host, name, value } => {
                let map = match host {
                    None => &mut self.global_config,
                    Some(h) if h == self.config.hostname => &mut self.host_config,
                    Some(_) => return,
                };
                match value {
                    Some(v) => map.insert(name, v),
                    None => map.remove(&name),
                };
            }
            Input::HostIp { host, ip } => {
                match ip {
                    Some(ip) => self.host_ips.insert(host.clone(), ip),
                    None => self.host_ips.remove(&host),
                };
                self.dirty_host_ips.insert(host);
            }
            Input::InSync => self.in_sync = true,
        }
    }

    fn profile_mut(&mut self, name: &str) -> &mut Profile {
        self.profiles.entry(name.to_string()).or_default()
    }

    // ---- endpoints -------------------------------------------------------------------

    fn effective_labels(
        &self,
        own: &BTreeMap<String, String>,
        profile_ids: &[String],
    ) -> BTreeMap<String, String> {
        let mut labels = own.clone();
        for id in profile_ids {
            if let Some(p) = self.profiles.get(id) {
                for (k, v) in &p.labels {
                    labels.entry(k.clone()).or_insert_with(|| v.clone());
                }
                for t in p.tags.iter().flatten() {
                    labels.entry(t.clone()).or_default();
                }
            }
        }
        labels
    }

    fn scope_of(&self, own: &BTreeMap<String, String>) -> Option<Scope> {
        let label = self.config.scope_label.as_ref()?;
        Some(Scope {
            label: label.clone(),
            // An endpoint without a tenant gets a scope that selects nothing else.
            value: own.get(label).cloned().unwrap_or_default(),
        })
    }

    fn build_endpoint(&self, value: EndpointValue) -> Endpoint {
        let (own, profiles, ips): (_, _, Vec<IpAddr>) = match &value {
            EndpointValue::Workload(w) => (
                &w.labels,
                &w.profile_ids,
                w.ipv4_nets
                    .iter()
                    .chain(&w.ipv6_nets)
                    .map(IpNetwork::ip)
                    .collect(),
            ),
            EndpointValue::Host(h) => (
                &h.labels,
                &h.profile_ids,
                h.expected_ipv4_addrs
                    .iter()
                    .chain(&h.expected_ipv6_addrs)
                    .copied()
                    .collect(),
            ),
        };
        // Host endpoints belong to the host, not to a tenant: their rules are unscoped.
        let scope = match &value {
            EndpointValue::Workload(_) => self.scope_of(own),
            EndpointValue::Host(_) => None,
        };
        Endpoint {
            labels: self.effective_labels(own, profiles),
            scope,
            ips,
            value,
        }
    }

    fn set_endpoint(&mut self, key: EndpointKey, value: Option<EndpointValue>) {
        let new = value.map(|v| self.build_endpoint(v));
        self.replace_endpoint(key, new);
    }

    /// Puts `new` in place of what `key` held, updating IP-set membership, profile users
    /// and, for a local endpoint, its policies.
    fn replace_endpoint(&mut self, key: EndpointKey, new: Option<Endpoint>) {
        let old = self.endpoints.remove(&key);
        if let Some(o) = &old {
            for p in o.profile_ids() {
                if let Some(users) = self.profile_users.get_mut(p) {
                    users.remove(&key);
                }
            }
        }
        if let Some(n) = &new {
            for p in n.profile_ids() {
                self.profile_users
                    .entry(p.clone())
                    .or_default()
                    .insert(key.clone());
            }
        }
        self.update_membership(old.as_ref(), new.as_ref());
        // In the map before its policies are counted: an IP set they create scans it.
        if let Some(n) = new {
            self.endpoints.insert(key.clone(), n);
        }
        if key.host() == self.config.hostname {
            self.update_local(&key);
        }
    }

    fn update_membership(&mut self, old: Option<&Endpoint>, new: Option<&Endpoint>) {
        for (id, set) in self.ipsets.iter_mut() {
            let was = old.filter(|o| set.selector.matches(&o.labels));
            let is = new.filter(|n| set.selector.matches(&n.labels));
            if let (Some(o), Some(n)) = (was, is)
                && o.ips == n.ips
            {
                continue;
            }
            let mut changed = false;
            for ip in was.map(|o| o.ips.as_slice()).unwrap_or_default() {
                changed |= set.remove(*ip);
            }
            for ip in is.map(|n| n.ips.as_slice()).unwrap_or_default() {
                changed |= set.add(*ip);
            }
            if changed {
                self.dirty_sets.insert(id.clone());
            }
        }
    }

    fn update_local(&mut self, key: &EndpointKey) {
        let exists = self.endpoints.contains_key(key);
        let mut local = self.local.remove(key).unwrap_or_default();
        let old_policies = std::mem::take(&mut local.policy_instances);
        let old_profiles = std::mem::take(&mut local.profile_instances);
        local.policies.clear();
        if let Some(n) = self.endpoints.get(key) {
            for (name, p) in &self.policies {
                if p.selector.matches(&n.labels) {
                    local.policies.insert(name.clone());
                }
            }
            local.policy_instances = local
                .policies
                .iter()
                .map(|name| Instance {
                    name: name.clone(),
                    scope: n.scope.clone(),
                })
                .collect();
            local.profile_instances = n
                .profile_ids()
                .iter()
                .map(|name| Instance {
                    name: name.clone(),
                    scope: n.scope.clone(),
                })
                .collect();
        }
        // Count new users first so that an instance kept is never torn down and rebuilt.
        for i in &local.policy_instances {
            self.user(RulesOf::Policy, i, true);
        }
        for i in &local.profile_instances {
            self.user(RulesOf::Profile, i, true);
        }
        for i in &old_policies {
            self.user(RulesOf::Policy, i, false);
        }
        for i in &old_profiles {
            self.user(RulesOf::Profile, i, false);
        }
        self.dirty_endpoints.insert(key.clone());
        if exists {
            self.local.insert(key.clone(), local);
        }
    }

    /// A profile's labels or tags changed: every endpoint using it may have new labels.
    fn profile_labels_changed(&mut self, profile: &str) {
        let users: Vec<EndpointKey> = self
            .profile_users
            .get(profile)
            .map(|u| u.iter().cloned().collect())
            .unwrap_or_default();
        for key in users {
            let Some(ep) = self.endpoints.get(&key) else {
                continue;
            };
            let labels = self.effective_labels(ep.own_labels(), ep.profile_ids());
            if labels != ep.labels {
                let mut new = ep.clone();
                new.labels = labels;
                self.replace_endpoint(key, Some(new));
            }
        }
    }

    // ---- policies and profiles --------------------------------------------------------

    fn set_policy(&mut self, name: &str, value: Option<Policy>) {
        let data = value.and_then(|v| {
            // Validated on the way in; a selector that still does not parse selects nothing.
            let selector = Selector::parse(&v.selector).ok()?;
            Some(PolicyData { value: v, selector })
        });
        match data {
            Some(d) => self.policies.insert(name.to_string(), d),
            None => self.policies.remove(name),
        };
        let keys: Vec<EndpointKey> = self.local.keys().cloned().collect();
        for key in keys {
            let Some(ep) = self.endpoints.get(&key) else {
                continue;
            };
            let matches = self
                .policies
                .get(name)
                .is_some_and(|p| p.selector.matches(&ep.labels));
            let inst = Instance {
                name: name.to_string(),
                scope: ep.scope.clone(),
            };
            let local = self.local.get_mut(&key).expect("listed");
            let matched = local.policies.contains(name);
            if matches && !matched {
                local.policies.insert(name.to_string());
                local.policy_instances.push(inst.clone());
                self.user(RulesOf::Policy, &inst, true);
            } else if !matches && matched {
                local.policies.remove(name);
                local.policy_instances.retain(|i| *i != inst);
                self.user(RulesOf::Policy, &inst, false);
            }
            if matches || matched {
                // Order or types may have changed.
                self.dirty_endpoints.insert(key);
            }
        }
        let instances: Vec<Instance> = instances_named(&self.active_policies, name);
        for inst in instances {
            self.refresh(RulesOf::Policy, &inst);
        }
    }

    fn actives(&mut self, kind: RulesOf) -> &mut BTreeMap<Instance, Active> {
        match kind {
            RulesOf::Policy => &mut self.active_policies,
            RulesOf::Profile => &mut self.active_profiles,
        }
    }

    fn mark_dirty(&mut self, kind: RulesOf, inst: &Instance) {
        match kind {
            RulesOf::Policy => self.dirty_policies.insert(inst.clone()),
            RulesOf::Profile => self.dirty_profiles.insert(inst.clone()),
        };
    }

    /// Counts a local endpoint in (or out of) an instance's users: the first user activates
    /// it, the last one leaves deactivates it and drops its IP-set references.
    fn user(&mut self, kind: RulesOf, inst: &Instance, add: bool) {
        let active = self.actives(kind).entry(inst.clone()).or_default();
        if add {
            active.users += 1;
            if active.users == 1 {
                self.refresh(kind, inst);
            }
        } else {
            active.users -= 1;
            if active.users == 0 {
                let gone = self.actives(kind).remove(inst).expect("present");
                for id in gone.sets {
                    self.unref_set(&id);
                }
                self.mark_dirty(kind, inst);
            }
        }
    }

    /// Recomputes an active instance's IP-set references from its rules (none when the
    /// policy is gone or the profile has no rules).
    fn refresh(&mut self, kind: RulesOf, inst: &Instance) {
        let rules: Vec<&crate::calico::Rule> = match kind {
            RulesOf::Policy => self
                .policies
                .get(&inst.name)
                .map(|p| {
                    p.value
                        .inbound_rules
                        .iter()
                        .chain(&p.value.outbound_rules)
                        .collect()
                })
                .unwrap_or_default(),
            RulesOf::Profile => self
                .profiles
                .get(&inst.name)
                .and_then(|p| p.rules.as_ref())
                .map(|r| r.inbound_rules.iter().chain(&r.outbound_rules).collect())
                .unwrap_or_default(),
        };
        let sets: Vec<Selector> = rules
            .into_iter()
            .flat_map(|r| rule_selectors(r, inst.scope.as_ref()))
            .collect();
        let old = self
            .actives(kind)
            .get_mut(inst)
            .map(|a| std::mem::take(&mut a.sets))
            .unwrap_or_default();
        let ids = self.ref_sets(sets);
        for id in old {
            self.unref_set(&id);
        }
        if let Some(a) = self.actives(kind).get_mut(inst) {
            a.sets = ids;
        }
        self.mark_dirty(kind, inst);
    }

    fn refresh_profile(&mut self, name: &str) {
        for inst in instances_named(&self.active_profiles, name) {
            self.refresh(RulesOf::Profile, &inst);
        }
    }

    // ---- IP sets ------------------------------------------------------------------------

    fn ref_sets(&mut self, selectors: Vec<Selector>) -> Vec<String> {
        selectors.into_iter().map(|s| self.ref_set(s)).collect()
    }

    fn ref_set(&mut self, selector: Selector) -> String {
        let id = selector.ip_set_id();
        if let Some(set) = self.ipsets.get_mut(&id) {
            set.refs += 1;
            return id;
        }
        let mut members: HashMap<IpAddr, usize> = HashMap::new();
        for ep in self.endpoints.values() {
            if selector.matches(&ep.labels) {
                for ip in &ep.ips {
                    *members.entry(*ip).or_default() += 1;
                }
            }
        }
        // A set removed and wanted again in one flush is replaced whole.
        self.removed_sets.remove(&id);
        self.ipsets.insert(
            id.clone(),
            IpSetState {
                selector,
                refs: 1,
                members,
                sent: false,
                added: BTreeSet::new(),
                removed: BTreeSet::new(),
            },
        );
        self.dirty_sets.insert(id.clone());
        id
    }

    fn unref_set(&mut self, id: &str) {
        let Some(set) = self.ipsets.get_mut(id) else {
            return;
        };
        set.refs -= 1;
        if set.refs == 0 {
            let set = self.ipsets.remove(id).expect("present");
            self.dirty_sets.remove(id);
            if set.sent {
                self.removed_sets.insert(id.to_string());
            }
        }
    }

    // ---- output -------------------------------------------------------------------------

    /// The messages for everything that changed since the last flush, in Felix's order.
    /// Nothing is sent before the initial snapshot is in (after [`Input::InSync`]).
    pub fn flush(&mut self) -> Vec<Payload> {
        if !self.in_sync {
            return Vec::new();
        }
        let mut out = Vec::new();
        let config = self.felix_config();
        if self.sent_config.as_ref() != Some(&config) {
            out.push(Payload::ConfigUpdate(proto::ConfigUpdate {
                config: config.clone().into_iter().collect(),
            }));
            self.sent_config = Some(config);
        }

        // IP sets: whole ones first, then deltas.
        let mut deltas = Vec::new();
        for id in std::mem::take(&mut self.dirty_sets) {
            let Some(set) = self.ipsets.get_mut(&id) else {
                continue;
            };
            if !set.sent {
                let mut members: Vec<String> =
                    set.members.keys().map(ToString::to_string).collect();
                members.sort();
                out.push(Payload::IpsetUpdate(proto::IpSetUpdate { id, members }));
                set.sent = true;
                set.added.clear();
                set.removed.clear();
            } else if !(set.added.is_empty() && set.removed.is_empty()) {
                deltas.push(Payload::IpsetDeltaUpdate(proto::IpSetDeltaUpdate {
                    id,
                    added_members: set.added.iter().map(ToString::to_string).collect(),
                    removed_members: set.removed.iter().map(ToString::to_string).collect(),
                }));
                set.added.clear();
                set.removed.clear();
            }
        }
        out.extend(deltas);

        let mut policy_removes = Vec::new();
        for inst in std::mem::take(&mut self.dirty_policies) {
            let id = proto::PolicyId {
                tier: TIER.into(),
                name: inst.wire_name(),
            };
            if self.active_policies.contains_key(&inst) {
                let policy = self.render_policy(&inst);
                if self.sent_policies.get(&inst) != Some(&policy) {
                    self.sent_policies.insert(inst, policy.clone());
                    out.push(Payload::ActivePolicyUpdate(proto::ActivePolicyUpdate {
                        id: Some(id),
                        policy: Some(policy),
                    }));
                }
            } else if self.sent_policies.remove(&inst).is_some() {
                policy_removes.push(Payload::ActivePolicyRemove(proto::ActivePolicyRemove {
                    id: Some(id),
                }));
            }
        }
        let mut profile_removes = Vec::new();
        for inst in std::mem::take(&mut self.dirty_profiles) {
            let id = proto::ProfileId {
                name: inst.wire_name(),
            };
            if self.active_profiles.contains_key(&inst) {
                let profile = self.render_profile(&inst);
                if self.sent_profiles.get(&inst) != Some(&profile) {
                    self.sent_profiles.insert(inst, profile.clone());
                    out.push(Payload::ActiveProfileUpdate(proto::ActiveProfileUpdate {
                        id: Some(id),
                        profile: Some(profile),
                    }));
                }
            } else if self.sent_profiles.remove(&inst).is_some() {
                profile_removes.push(Payload::ActiveProfileRemove(proto::ActiveProfileRemove {
                    id: Some(id),
                }));
            }
        }
        let mut endpoint_removes = Vec::new();
        for key in std::mem::take(&mut self.dirty_endpoints) {
            match self.render_endpoint(&key) {
                Some(update) => {
                    if self.sent_endpoints.get(&key) != Some(&update) {
                        self.sent_endpoints.insert(key, update.clone());
                        out.push(update);
                    }
                }
                None => {
                    if self.sent_endpoints.remove(&key).is_some() {
                        endpoint_removes.push(endpoint_remove(&key));
                    }
                }
            }
        }
        out.extend(endpoint_removes);
        out.extend(profile_removes);
        out.extend(policy_removes);
        for id in std::mem::take(&mut self.removed_sets) {
            out.push(Payload::IpsetRemove(proto::IpSetRemove { id }));
        }
        for host in std::mem::take(&mut self.dirty_host_ips) {
            out.push(match self.host_ips.get(&host) {
                Some(ip) => Payload::HostMetadataUpdate(proto::HostMetadataUpdate {
                    hostname: host,
                    ipv4_addr: ip.to_string(),
                }),
                None => Payload::HostMetadataRemove(proto::HostMetadataRemove {
                    hostname: host,
                    ipv4_addr: String::new(),
                }),
            });
        }
        for cidr in std::mem::take(&mut self.dirty_pools) {
            let id = cidr.to_string().replacen('/', "-", 1);
            out.push(match self.pools.get(&cidr) {
                Some(p) => Payload::IpamPoolUpdate(proto::IpamPoolUpdate {
                    id,
                    pool: Some(proto::IpamPool {
                        cidr: cidr.to_string(),
                        masquerade: p.masquerade,
                    }),
                }),
                None => Payload::IpamPoolRemove(proto::IpamPoolRemove { id }),
            });
        }
        if !self.in_sync_sent {
            out.push(Payload::InSync(proto::InSync {}));
            self.in_sync_sent = true;
        }
        out
    }

    fn render_policy(&self, inst: &Instance) -> proto::Policy {
        let Some(p) = self.policies.get(&inst.name) else {
            return proto::Policy::default();
        };
        let scope = inst.scope.as_ref();
        let wire = inst.wire_name();
        proto::Policy {
            inbound_rules: convert_all(
                &p.value.inbound_rules,
                scope,
                &format!("pol-in-{TIER}/{wire}"),
            ),
            outbound_rules: convert_all(
                &p.value.outbound_rules,
                scope,
                &format!("pol-out-{TIER}/{wire}"),
            ),
            untracked: p.value.untracked,
            pre_dnat: p.value.pre_dnat,
        }
    }

    /// A profile whose rules are missing is sent with none: its endpoints fall through to
    /// the final drop, as if it denied everything.
    fn render_profile(&self, inst: &Instance) -> proto::Profile {
        let Some(r) = self.profiles.get(&inst.name).and_then(|p| p.rules.as_ref()) else {
            return proto::Profile::default();
        };
        let scope = inst.scope.as_ref();
        let wire = inst.wire_name();
        proto::Profile {
            inbound_rules: convert_all(&r.inbound_rules, scope, &format!("prof-in-{wire}")),
            outbound_rules: convert_all(&r.outbound_rules, scope, &format!("prof-out-{wire}")),
        }
    }

    /// Ordered policy names for one endpoint: by `order` (missing last), then name.
    fn ordered_policies<'a>(&'a self, local: &'a Local) -> Vec<&'a str> {
        let mut names: Vec<(&str, Option<f64>)> = local
            .policies
            .iter()
            .filter_map(|n| Some((n.as_str(), self.policies.get(n)?.value.order)))
            .collect();
        names.sort_by(|a, b| match (a.1, b.1) {
            (Some(x), Some(y)) => x.total_cmp(&y).then(a.0.cmp(b.0)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.0.cmp(b.0),
        });
        names.into_iter().map(|(n, _)| n).collect()
    }

    fn tier_info(
        &self,
        names: &[&str],
        scope: Option<&Scope>,
        filter: impl Fn(&Policy) -> bool,
    ) -> Vec<proto::TierInfo> {
        let mut ingress = Vec::new();
        let mut egress = Vec::new();
        for n in names {
            let p = &self.policies[*n].value;
            if !filter(p) {
                continue;
            }
            let wire = Instance {
                name: n.to_string(),
                scope: scope.cloned(),
            }
            .wire_name();
            let types = p.effective_types();
            if types.contains(&PolicyType::Ingress) {
                ingress.push(wire.clone());
            }
            if types.contains(&PolicyType::Egress) && !p.pre_dnat {
                egress.push(wire);
            }
        }
        if ingress.is_empty() && egress.is_empty() {
            return Vec::new();
        }
        vec![proto::TierInfo {
            name: TIER.into(),
            ingress_policies: ingress,
            egress_policies: egress,
        }]
    }

    fn render_endpoint(&self, key: &EndpointKey) -> Option<Payload> {
        let local = self.local.get(key)?;
        let ep = self.endpoints.get(key)?;
        let names = self.ordered_policies(local);
        let scope = ep.scope.as_ref();
        let profile_ids: Vec<String> = local
            .profile_instances
            .iter()
            .map(Instance::wire_name)
            .collect();
        match (key, &ep.value) {
            (EndpointKey::Workload(id), EndpointValue::Workload(w)) => {
                let nat = |n: &[crate::calico::IpNat]| {
                    n.iter()
                        .map(|n| proto::NatInfo {
                            ext_ip: n.ext_ip.to_string(),
                            int_ip: n.int_ip.to_string(),
                        })
                        .collect()
                };
                Some(Payload::WorkloadEndpointUpdate(
                    proto::WorkloadEndpointUpdate {
                        id: Some(workload_id(id)),
                        endpoint: Some(proto::WorkloadEndpoint {
                            state: w.state.clone(),
                            name: w.name.clone(),
                            mac: w.mac.map(|m| m.to_string()).unwrap_or_default(),
                            profile_ids,
                            ipv4_nets: w.ipv4_nets.iter().map(ToString::to_string).collect(),
                            ipv6_nets: w.ipv6_nets.iter().map(ToString::to_string).collect(),
                            tiers: self.tier_info(&names, scope, |_| true),
                            ipv4_nat: nat(&w.ipv4_nat),
                            ipv6_nat: nat(&w.ipv6_nat),
                        }),
                    },
                ))
            }
            (EndpointKey::Host { endpoint, .. }, EndpointValue::Host(h)) => {
                Some(Payload::HostEndpointUpdate(proto::HostEndpointUpdate {
                    id: Some(proto::HostEndpointId {
                        endpoint_id: endpoint.clone(),
                    }),
                    endpoint: Some(proto::HostEndpoint {
                        name: h.name.clone().unwrap_or_default(),
                        profile_ids,
                        tiers: self.tier_info(&names, scope, |p| !p.untracked && !p.pre_dnat),
                        expected_ipv4_addrs: h
                            .expected_ipv4_addrs
                            .iter()
                            .map(ToString::to_string)
                            .collect(),
                        expected_ipv6_addrs: h
                            .expected_ipv6_addrs
                            .iter()
                            .map(ToString::to_string)
                            .collect(),
                        untracked_tiers: self.tier_info(&names, scope, |p| p.untracked),
                        pre_dnat_tiers: self.tier_info(&names, scope, |p| p.pre_dnat),
                    }),
                }))
            }
            _ => None,
        }
    }
}

fn instances_named(map: &BTreeMap<Instance, Active>, name: &str) -> Vec<Instance> {
    let start = Instance {
        name: name.to_string(),
        scope: None,
    };
    map.range(start..)
        .take_while(|(i, _)| i.name == name)
        .map(|(i, _)| i.clone())
        .collect()
}

fn workload_id(id: &WorkloadEndpointId) -> proto::WorkloadEndpointId {
    proto::WorkloadEndpointId {
        orchestrator_id: id.orchestrator.clone(),
        workload_id: id.workload.clone(),
        endpoint_id: id.endpoint.clone(),
    }
}

fn endpoint_remove(key: &EndpointKey) -> Payload {
    match key {
        EndpointKey::Workload(id) => {
            Payload::WorkloadEndpointRemove(proto::WorkloadEndpointRemove {
                id: Some(workload_id(id)),
            })
        }
        EndpointKey::Host { endpoint, .. } => {
            Payload::HostEndpointRemove(proto::HostEndpointRemove {
                id: Some(proto::HostEndpointId {
                    endpoint_id: endpoint.clone(),
                }),
            })
        }
    }
}

impl IpSetState {
    /// Counts one more holder of `ip`; true if it became a member.
    fn add(&mut self, ip: IpAddr) -> bool {
        let n = self.members.entry(ip).or_default();
        *n += 1;
        if *n == 1 {
            if !self.removed.remove(&ip) {
                self.added.insert(ip);
            }
            true
        } else {
            false
        }
    }

    /// Counts one holder fewer; true if `ip` stopped being a member.
    fn remove(&mut self, ip: IpAddr) -> bool {
        let Some(n) = self.members.get_mut(&ip) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            self.members.remove(&ip);
            if !self.added.remove(&ip) {
                self.removed.insert(ip);
            }
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests;
