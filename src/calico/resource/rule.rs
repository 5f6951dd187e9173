//! The API (calicoctl YAML) form of a rule ↔ the backend form libcalico-go wrote (§1.7).

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::FieldError;
use crate::calico::{Port, Protocol, Rule, RuleAction};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiRule {
    /// allow, deny, log or pass.
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<Protocol>,
    #[serde(default, rename = "notICMP", skip_serializing_if = "Option::is_none")]
    pub not_icmp: Option<IcmpFields>,
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub source: EntityRule,
    #[serde(default, skip_serializing_if = "EntityRule::is_empty")]
    pub destination: EntityRule,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IcmpFields {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EntityRule {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<IpNetwork>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<IpNetwork>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub not_tag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_net: Option<IpNetwork>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_nets: Vec<IpNetwork>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub not_selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<Port>,
}

impl EntityRule {
    pub fn is_empty(&self) -> bool {
        *self == EntityRule::default()
    }
}

fn action_of(api: &str) -> Option<RuleAction> {
    Some(match api {
        "allow" => RuleAction::Allow,
        "deny" => RuleAction::Deny,
        "log" => RuleAction::Log,
        "pass" => RuleAction::NextTier,
        _ => return None,
    })
}

impl ApiRule {
    /// calicoctl's checks of one rule; `at` names it (e.g. `Ingress[0]`).
    pub(super) fn problems(&self, at: &str) -> Vec<FieldError> {
        let mut out = Vec::new();
        let mut field = |name: String, value: String, reason: String| {
            out.push(FieldError {
                field: format!("{at}.{name}"),
                value,
                reason,
            })
        };
        if action_of(&self.action).is_none() {
            field(
                "Action".into(),
                self.action.clone(),
                "must be one of: allow, deny, log, pass".into(),
            );
        }
        for (side, e) in [("Source", &self.source), ("Destination", &self.destination)] {
            for (name, sel) in [("Selector", &e.selector), ("NotSelector", &e.not_selector)] {
                if let Err(err) = crate::policy::selector::Selector::parse(sel) {
                    field(format!("{side}.{name}"), sel.clone(), err.reason);
                }
            }
            if e.net.is_some() && !e.nets.is_empty() {
                field(
                    format!("{side}.Nets"),
                    format!("{:?}", e.nets),
                    "only one of net and nets may be given".into(),
                );
            }
            if e.not_net.is_some() && !e.not_nets.is_empty() {
                field(
                    format!("{side}.NotNets"),
                    format!("{:?}", e.not_nets),
                    "only one of notNet and notNets may be given".into(),
                );
            }
            for p in e.ports.iter().chain(&e.not_ports) {
                if p.min == 0 {
                    field(
                        format!("{side}.Ports"),
                        p.to_string(),
                        "ports must be in 1-65535".into(),
                    );
                }
            }
        }
        // The backend form's rules (ICMP code needs type, ports need tcp/udp, one IP
        // version per rule).
        for reason in self.to_backend().problems() {
            field("Rule".into(), self.action.clone(), reason);
        }
        out
    }

    pub fn to_backend(&self) -> Rule {
        let (s, d) = (&self.source, &self.destination);
        Rule {
            action: action_of(&self.action).unwrap_or_default(),
            ip_version: self.ip_version,
            protocol: self.protocol.clone(),
            not_protocol: self.not_protocol.clone(),
            icmp_type: self.icmp.as_ref().and_then(|i| i.icmp_type),
            icmp_code: self.icmp.as_ref().and_then(|i| i.code),
            not_icmp_type: self.not_icmp.as_ref().and_then(|i| i.icmp_type),
            not_icmp_code: self.not_icmp.as_ref().and_then(|i| i.code),
            src_tag: s.tag.clone(),
            src_net: s.net,
            src_nets: s.nets.clone(),
            src_selector: s.selector.clone(),
            src_ports: s.ports.clone(),
            dst_tag: d.tag.clone(),
            dst_selector: d.selector.clone(),
            // Destination nets are stored as network addresses (libcalico-go normalised them).
            dst_net: d.net.map(normalise),
            dst_nets: d.nets.iter().copied().map(normalise).collect(),
            dst_ports: d.ports.clone(),
            not_src_tag: s.not_tag.clone(),
            not_src_net: s.not_net,
            not_src_nets: s.not_nets.clone(),
            not_src_selector: s.not_selector.clone(),
            not_src_ports: s.not_ports.clone(),
            not_dst_tag: d.not_tag.clone(),
            not_dst_selector: d.not_selector.clone(),
            not_dst_net: d.not_net.map(normalise),
            not_dst_nets: d.not_nets.iter().copied().map(normalise).collect(),
            not_dst_ports: d.not_ports.clone(),
            log_prefix: String::new(),
        }
    }

    pub fn from_backend(r: &Rule) -> ApiRule {
        let icmp = |t: Option<u8>, c: Option<u8>| {
            (t.is_some() || c.is_some()).then_some(IcmpFields {
                icmp_type: t,
                code: c,
            })
        };
        ApiRule {
            action: match r.action {
                RuleAction::Unset | RuleAction::Allow => "allow",
                RuleAction::Deny => "deny",
                RuleAction::Log => "log",
                RuleAction::NextTier => "pass",
            }
            .into(),
            ip_version: r.ip_version,
            protocol: r.protocol.clone(),
            icmp: icmp(r.icmp_type, r.icmp_code),
            not_protocol: r.not_protocol.clone(),
            not_icmp: icmp(r.not_icmp_type, r.not_icmp_code),
            source: EntityRule {
                tag: r.src_tag.clone(),
                net: r.src_net,
                nets: r.src_nets.clone(),
                selector: r.src_selector.clone(),
                ports: r.src_ports.clone(),
                not_tag: r.not_src_tag.clone(),
                not_net: r.not_src_net,
                not_nets: r.not_src_nets.clone(),
                not_selector: r.not_src_selector.clone(),
                not_ports: r.not_src_ports.clone(),
            },
            destination: EntityRule {
                tag: r.dst_tag.clone(),
                net: r.dst_net,
                nets: r.dst_nets.clone(),
                selector: r.dst_selector.clone(),
                ports: r.dst_ports.clone(),
                not_tag: r.not_dst_tag.clone(),
                not_net: r.not_dst_net,
                not_nets: r.not_dst_nets.clone(),
                not_selector: r.not_dst_selector.clone(),
                not_ports: r.not_dst_ports.clone(),
            },
        }
    }
}

fn normalise(n: IpNetwork) -> IpNetwork {
    IpNetwork::new(n.network(), n.prefix()).expect("same prefix")
}

/// calicoctl's name rules (§4.10).
pub(super) fn name_problem(name: &str, allow_slash: bool) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') || (allow_slash && c == '/')
        });
    (!ok).then(|| {
        format!(
            "must be 1-128 characters of letters, digits, '_', '.', '-'{}",
            if allow_slash { " or '/'" } else { "" }
        )
    })
}

/// Label keys and values (§4.10).
pub(super) fn label_problems(
    labels: &std::collections::BTreeMap<String, String>,
    field: &str,
) -> Vec<FieldError> {
    let mut out = Vec::new();
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 512
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'));
        if !key_ok {
            out.push(FieldError {
                field: field.into(),
                value: k.clone(),
                reason: "label keys are 1-512 characters of letters, digits, '_', '.', '/', '-'"
                    .into(),
            });
        }
        let bytes = v.as_bytes();
        let value_ok = v.is_empty()
            || (v.len() <= 63
                && bytes[0].is_ascii_alphanumeric()
                && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')));
        if !value_ok {
            out.push(FieldError {
                field: field.into(),
                value: v.clone(),
                reason: "label values are up to 63 characters of letters, digits, '_', '.', '-', beginning and ending with a letter or digit".into(),
            });
        }
    }
    out
}
