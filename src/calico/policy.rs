//! Profiles, policies and the rule form they share (backend JSON, §1.5–1.7).

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::scalar::{Port, Protocol, go_float_opt, null_as_default};

/// `/calico/v1/policy/profile/<name>/rules`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileRules {
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub inbound_rules: Vec<Rule>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub outbound_rules: Vec<Rule>,
}

/// `/calico/v1/policy/tier/default/policy/<name>`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Missing means "infinite": sorted after every ordered policy.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "go_float_opt"
    )]
    pub order: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub inbound_rules: Vec<Rule>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub outbound_rules: Vec<Rule>,
    /// Always written; empty selects everything.
    #[serde(default)]
    pub selector: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub untracked: bool,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub pre_dnat: bool,
    /// Missing (pre-2.6 data) means both directions; see [`Policy::effective_types`].
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub types: Vec<PolicyType>,
}

impl Policy {
    pub fn effective_types(&self) -> Vec<PolicyType> {
        if self.types.is_empty() {
            vec![PolicyType::Ingress, PolicyType::Egress]
        } else {
            self.types.clone()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyType {
    Ingress,
    Egress,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What a matching rule does. The empty string (the field omitted) means allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RuleAction {
    #[default]
    Unset,
    Allow,
    Deny,
    Log,
    /// API `pass`.
    NextTier,
}

impl RuleAction {
    fn as_str(self) -> &'static str {
        match self {
            RuleAction::Unset => "",
            RuleAction::Allow => "allow",
            RuleAction::Deny => "deny",
            RuleAction::Log => "log",
            RuleAction::NextTier => "next-tier",
        }
    }

    pub fn is_unset(&self) -> bool {
        *self == RuleAction::Unset
    }
}

impl Serialize for RuleAction {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RuleAction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "" => RuleAction::Unset,
            "allow" => RuleAction::Allow,
            "deny" => RuleAction::Deny,
            "log" => RuleAction::Log,
            "next-tier" => RuleAction::NextTier,
            other => {
                return Err(serde::de::Error::custom(format!(
                    "unknown rule action '{other}' (want allow, deny, log or next-tier)"
                )));
            }
        })
    }
}

/// One rule, in libcalico-go's backend field order. Every match field is optional; the
/// `!`-prefixed fields negate their counterpart.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "RuleAction::is_unset")]
    pub action: RuleAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, rename = "!protocol", skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    #[serde(
        default,
        rename = "!icmp_type",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_icmp_type: Option<u8>,
    #[serde(
        default,
        rename = "!icmp_code",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_icmp_code: Option<u8>,

    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub src_tag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_net: Option<IpNetwork>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub src_nets: Vec<IpNetwork>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub src_selector: String,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub src_ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dst_tag: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dst_selector: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_net: Option<IpNetwork>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub dst_nets: Vec<IpNetwork>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub dst_ports: Vec<Port>,

    #[serde(default, rename = "!src_tag", skip_serializing_if = "String::is_empty")]
    pub not_src_tag: String,
    #[serde(default, rename = "!src_net", skip_serializing_if = "Option::is_none")]
    pub not_src_net: Option<IpNetwork>,
    #[serde(
        default,
        rename = "!src_nets",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_src_nets: Vec<IpNetwork>,
    #[serde(
        default,
        rename = "!src_selector",
        skip_serializing_if = "String::is_empty"
    )]
    pub not_src_selector: String,
    #[serde(
        default,
        rename = "!src_ports",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_src_ports: Vec<Port>,
    #[serde(default, rename = "!dst_tag", skip_serializing_if = "String::is_empty")]
    pub not_dst_tag: String,
    #[serde(
        default,
        rename = "!dst_selector",
        skip_serializing_if = "String::is_empty"
    )]
    pub not_dst_selector: String,
    #[serde(default, rename = "!dst_net", skip_serializing_if = "Option::is_none")]
    pub not_dst_net: Option<IpNetwork>,
    #[serde(
        default,
        rename = "!dst_nets",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_dst_nets: Vec<IpNetwork>,
    #[serde(
        default,
        rename = "!dst_ports",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub not_dst_ports: Vec<Port>,

    /// Legacy; Felix 2.x ignores it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub log_prefix: String,
}

impl Rule {
    /// Every source CIDR (`src_nets` then `src_net`, as libcalico-go combines them).
    pub fn all_src_nets(&self) -> Vec<IpNetwork> {
        combine(&self.src_nets, self.src_net)
    }

    pub fn all_dst_nets(&self) -> Vec<IpNetwork> {
        combine(&self.dst_nets, self.dst_net)
    }

    /// Semantic problems of the rule (Calico's validator rules for the backend form).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(v) = self.ip_version
            && v != 4
            && v != 6
        {
            out.push(format!("ip_version {v} is neither 4 nor 6"));
        }
        if self.icmp_type == Some(255) || self.not_icmp_type == Some(255) {
            out.push("ICMP type 255 cannot be matched".into());
        }
        if self.icmp_code.is_some() && self.icmp_type.is_none() {
            out.push("icmp_code needs icmp_type".into());
        }
        if self.not_icmp_code.is_some() && self.not_icmp_type.is_none() {
            out.push("!icmp_code needs !icmp_type".into());
        }
        let has_ports = !(self.src_ports.is_empty()
            && self.dst_ports.is_empty()
            && self.not_src_ports.is_empty()
            && self.not_dst_ports.is_empty());
        if has_ports && !self.protocol.as_ref().is_some_and(Protocol::has_ports) {
            out.push("ports need protocol tcp or udp".into());
        }
        let nets: Vec<IpNetwork> = [
            self.all_src_nets(),
            self.all_dst_nets(),
            combine(&self.not_src_nets, self.not_src_net),
            combine(&self.not_dst_nets, self.not_dst_net),
        ]
        .concat();
        let v4 = nets.iter().filter(|n| n.is_ipv4()).count();
        if v4 != 0 && v4 != nets.len() {
            out.push("rule mixes IPv4 and IPv6 CIDRs".into());
        }
        if let (Some(version), Some(first)) = (self.ip_version, nets.first())
            && (version == 4) != first.is_ipv4()
        {
            out.push(format!("CIDRs do not match ip_version {version}"));
        }
        out
    }
}

fn combine(nets: &[IpNetwork], net: Option<IpNetwork>) -> Vec<IpNetwork> {
    nets.iter().copied().chain(net).collect()
}
