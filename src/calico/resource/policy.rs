//! `kind: policy` ↔ `/calico/v1/policy/tier/default/policy/<name>` (§1.6, §4.3, §4.10).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::FieldError;
use super::rule::{ApiRule, label_problems, name_problem};
use crate::calico::{Policy, PolicyType};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyResource {
    pub kind: String,
    pub api_version: String,
    pub metadata: PolicyMetadata,
    #[serde(default)]
    pub spec: PolicySpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyMetadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<f64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<ApiRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<ApiRule>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub do_not_track: bool,
    #[serde(default, rename = "preDNAT", skip_serializing_if = "is_false")]
    pub pre_dnat: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<PolicyType>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl PolicyResource {
    pub(super) fn problems(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        if let Some(reason) = name_problem(&self.metadata.name, true) {
            out.push(FieldError {
                field: "Name".into(),
                value: self.metadata.name.clone(),
                reason,
            });
        }
        out.extend(
            label_problems(&self.metadata.annotations, "Annotations")
                .into_iter()
                .filter(
                    // Annotation values are free text; only their keys follow the label rules.
                    |e| e.reason.starts_with("label keys"),
                ),
        );
        if let Err(e) = crate::policy::selector::Selector::parse(&self.spec.selector) {
            out.push(FieldError {
                field: "Selector".into(),
                value: self.spec.selector.clone(),
                reason: format!("invalid selector: {} (at position {})", e.reason, e.at),
            });
        }
        for (i, r) in self.spec.ingress.iter().enumerate() {
            out.extend(r.problems(&format!("Ingress[{i}]")));
        }
        for (i, r) in self.spec.egress.iter().enumerate() {
            out.extend(r.problems(&format!("Egress[{i}]")));
        }
        let spec = &self.spec;
        let mut problem = |field: &str, value: String, reason: &str| {
            out.push(FieldError {
                field: field.into(),
                value,
                reason: reason.into(),
            })
        };
        if spec.pre_dnat {
            if spec.do_not_track {
                problem(
                    "PreDNAT",
                    "true".into(),
                    "PreDNAT and DoNotTrack cannot both be true, for a given Policy",
                );
            }
            if !spec.egress.is_empty() {
                problem(
                    "PreDNAT",
                    "true".into(),
                    "PreDNAT Policy cannot have any Egress rules",
                );
            }
            if spec.types.contains(&PolicyType::Egress) {
                problem(
                    "PolicyTypes",
                    "egress".into(),
                    "PreDNAT Policy cannot have 'egress' Type",
                );
            }
        }
        let mut seen = Vec::new();
        for t in &spec.types {
            if seen.contains(t) {
                problem(
                    "PolicyTypes",
                    format!("{t:?}").to_lowercase(),
                    "a policy type may be given only once",
                );
            }
            seen.push(*t);
        }
        if self.kind != "policy" {
            problem("Kind", self.kind.clone(), "expected policy");
        }
        out
    }

    /// The value libcalico-go v1 wrote. Without types: ingress unless it has only egress
    /// rules; both when it has both.
    pub fn to_backend(&self) -> Policy {
        let spec = &self.spec;
        let types = if !spec.types.is_empty() {
            spec.types.clone()
        } else {
            match (spec.ingress.is_empty(), spec.egress.is_empty()) {
                (_, true) => vec![PolicyType::Ingress],
                (true, false) => vec![PolicyType::Egress],
                (false, false) => vec![PolicyType::Ingress, PolicyType::Egress],
            }
        };
        Policy {
            order: spec.order,
            inbound_rules: spec.ingress.iter().map(ApiRule::to_backend).collect(),
            outbound_rules: spec.egress.iter().map(ApiRule::to_backend).collect(),
            selector: spec.selector.clone(),
            untracked: spec.do_not_track,
            annotations: self.metadata.annotations.clone(),
            pre_dnat: spec.pre_dnat,
            types,
        }
    }

    pub fn from_backend(name: &str, p: &Policy) -> PolicyResource {
        PolicyResource {
            kind: "policy".into(),
            api_version: "v1".into(),
            metadata: PolicyMetadata {
                name: name.into(),
                annotations: p.annotations.clone(),
            },
            spec: PolicySpec {
                order: p.order,
                selector: p.selector.clone(),
                ingress: p.inbound_rules.iter().map(ApiRule::from_backend).collect(),
                egress: p.outbound_rules.iter().map(ApiRule::from_backend).collect(),
                do_not_track: p.untracked,
                pre_dnat: p.pre_dnat,
                types: p.effective_types(),
            },
        }
    }

    pub(super) fn cell(&self, heading: &str) -> Option<String> {
        Some(match heading {
            "NAME" => self.metadata.name.clone(),
            // Go prints the float with %v: 100 → "100", 1.5 → "1.5"; empty if unset.
            "ORDER" => self.spec.order.map(go_float).unwrap_or_default(),
            "SELECTOR" => self.spec.selector.clone(),
            _ => return None,
        })
    }
}

fn go_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1e21 {
        format!("{}", f as i64)
    } else {
        format!("{f}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Resource, ResourceError};

    fn parse(yaml: &str) -> Result<Resource, ResourceError> {
        Resource::from_value(serde_saphyr::from_str(yaml).unwrap())
    }

    #[test]
    fn a_policy_becomes_calicos_backend_value_and_reads_back() {
        // calico-data-model.md §7.2: the `web` policy.
        let r = parse(
            "apiVersion: v1\nkind: policy\nmetadata: {name: web}\nspec:\n  order: 100\n  selector: app == 'web'\n  ingress:\n  - action: allow\n    protocol: tcp\n    source: {selector: role == 'frontend'}\n    destination: {ports: [80, '8080:8090']}\n  egress:\n  - action: allow\n",
        )
        .unwrap();
        r.validate().unwrap();
        let Resource::Policy(p) = &r else { panic!() };
        assert_eq!(
            serde_json::to_string(&p.to_backend()).unwrap(),
            r#"{"order":100,"inbound_rules":[{"action":"allow","protocol":"tcp","src_selector":"role == 'frontend'","dst_ports":[80,"8080:8090"]}],"outbound_rules":[{"action":"allow"}],"selector":"app == 'web'","types":["ingress","egress"]}"#
        );
        let back = super::PolicyResource::from_backend("web", &p.to_backend());
        assert_eq!(back.spec.ingress, p.spec.ingress);
        assert_eq!(back.cell("ORDER").unwrap(), "100");
        // pass ↔ next-tier; types default from the rules present.
        let r = parse(
            "apiVersion: v1\nkind: policy\nmetadata: {name: p2}\nspec: {egress: [{action: pass}]}\n",
        )
        .unwrap();
        let Resource::Policy(p) = &r else { panic!() };
        assert_eq!(
            serde_json::to_string(&p.to_backend()).unwrap(),
            r#"{"outbound_rules":[{"action":"next-tier"}],"selector":"","types":["egress"]}"#
        );
    }

    #[test]
    fn bad_policies_name_the_field() {
        for (spec, want) in [
            (
                "{ingress: [{action: accept}]}",
                "Ingress[0].Action = 'accept' (must be one of",
            ),
            (
                "{ingress: [{action: allow, destination: {ports: [80]}}]}",
                "ports need protocol tcp or udp",
            ),
            (
                "{ingress: [{action: allow, icmp: {code: 3}}]}",
                "icmp_code needs icmp_type",
            ),
            (
                "{ingress: [{action: allow, source: {net: 10.0.0.0/8, nets: [10.1.0.0/16]}}]}",
                "only one of net and nets",
            ),
            (
                "{ingress: [{action: allow, source: {nets: [10.0.0.0/8, 'fd00::/8']}}]}",
                "mixes IPv4 and IPv6",
            ),
            (
                "{preDNAT: true, doNotTrack: true}",
                "PreDNAT and DoNotTrack cannot both be true",
            ),
            (
                "{preDNAT: true, egress: [{action: allow}]}",
                "PreDNAT Policy cannot have any Egress rules",
            ),
            ("{types: [ingress, ingress]}", "only once"),
            (
                "{selector: \"role = 'db'\"}",
                "Selector = 'role = 'db'' (invalid selector: expected ==, !=, in or not in",
            ),
            (
                "{ingress: [{action: allow, source: {selector: \"has(x\"}}]}",
                "Ingress[0].Source.Selector = 'has(x'",
            ),
        ] {
            let e = parse(&format!(
                "apiVersion: v1\nkind: policy\nmetadata: {{name: p}}\nspec: {spec}\n"
            ))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{spec}: {e}");
        }
        let e = parse("apiVersion: v1\nkind: policy\nmetadata: {name: 'a b'}\n")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("error with field Name = 'a b'"), "{e}");
        let e = parse("apiVersion: v1\nkind: policy\nmetadata: {name: p}\nspec: {ingress: [{action: allow, protocol: tcpp}]}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("'tcpp' is not a protocol"), "{e}");
        // A port range upside down, or an AS-like number out of range, fails as it is read.
        let e = parse("apiVersion: v1\nkind: policy\nmetadata: {name: p}\nspec: {ingress: [{action: allow, protocol: tcp, destination: {ports: ['90:80']}}]}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("port range 90:80 has min > max"), "{e}");
    }
}
