//! `kind: profile` ↔ `/calico/v1/policy/profile/<name>/{tags,labels,rules}` (§1.5, §4.3).
//! The tags key says whether the profile exists; all three are written in one transaction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::FieldError;
use super::rule::{ApiRule, label_problems, name_problem};
use crate::calico::ProfileRules;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProfileResource {
    pub kind: String,
    pub api_version: String,
    pub metadata: ProfileMetadata,
    #[serde(default)]
    pub spec: ProfileSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileMetadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<ApiRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<ApiRule>,
}

/// The three values a profile is stored as.
pub struct ProfileValues {
    pub tags: Vec<u8>,
    pub labels: Vec<u8>,
    pub rules: Vec<u8>,
}

impl ProfileResource {
    pub(super) fn problems(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        if let Some(reason) = name_problem(&self.metadata.name, true) {
            out.push(FieldError {
                field: "Name".into(),
                value: self.metadata.name.clone(),
                reason,
            });
        }
        for tag in &self.metadata.tags {
            if let Some(reason) = name_problem(tag, false) {
                out.push(FieldError {
                    field: "Tags".into(),
                    value: tag.clone(),
                    reason,
                });
            }
        }
        out.extend(label_problems(&self.metadata.labels, "Labels"));
        for (i, r) in self.spec.ingress.iter().enumerate() {
            out.extend(r.problems(&format!("Ingress[{i}]")));
        }
        for (i, r) in self.spec.egress.iter().enumerate() {
            out.extend(r.problems(&format!("Egress[{i}]")));
        }
        if self.kind != "profile" {
            out.push(FieldError {
                field: "Kind".into(),
                value: self.kind.clone(),
                reason: "expected profile".into(),
            });
        }
        out
    }

    /// Go wrote `null` for no tags and no labels.
    pub fn to_backend(&self) -> ProfileValues {
        let tags = if self.metadata.tags.is_empty() {
            b"null".to_vec()
        } else {
            serde_json::to_vec(&self.metadata.tags).expect("tags serialise")
        };
        let labels = if self.metadata.labels.is_empty() {
            b"null".to_vec()
        } else {
            serde_json::to_vec(&self.metadata.labels).expect("labels serialise")
        };
        let rules = ProfileRules {
            inbound_rules: self.spec.ingress.iter().map(ApiRule::to_backend).collect(),
            outbound_rules: self.spec.egress.iter().map(ApiRule::to_backend).collect(),
        };
        ProfileValues {
            tags,
            labels,
            rules: serde_json::to_vec(&rules).expect("rules serialise"),
        }
    }

    pub fn from_backend(
        name: &str,
        tags: Option<Vec<String>>,
        labels: Option<BTreeMap<String, String>>,
        rules: Option<ProfileRules>,
    ) -> ProfileResource {
        let rules = rules.unwrap_or_default();
        ProfileResource {
            kind: "profile".into(),
            api_version: "v1".into(),
            metadata: ProfileMetadata {
                name: name.into(),
                tags: tags.unwrap_or_default(),
                labels: labels.unwrap_or_default(),
            },
            spec: ProfileSpec {
                ingress: rules
                    .inbound_rules
                    .iter()
                    .map(ApiRule::from_backend)
                    .collect(),
                egress: rules
                    .outbound_rules
                    .iter()
                    .map(ApiRule::from_backend)
                    .collect(),
            },
        }
    }

    pub(super) fn cell(&self, heading: &str) -> Option<String> {
        Some(match heading {
            "NAME" => self.metadata.name.clone(),
            "TAGS" => self.metadata.tags.join(","),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Resource;

    #[test]
    fn a_profile_is_three_values_as_go_wrote_them() {
        // calico-data-model.md §7.2: k8s_ns.default.
        let r = Resource::from_value(
            serde_saphyr::from_str(
                "apiVersion: v1\nkind: profile\nmetadata:\n  name: k8s_ns.default\n  labels: {calico/k8s_ns: default}\nspec:\n  ingress: [{action: allow}]\n  egress: [{action: allow}]\n",
            )
            .unwrap(),
        )
        .unwrap();
        r.validate().unwrap();
        let Resource::Profile(p) = &r else { panic!() };
        let v = p.to_backend();
        assert_eq!(v.tags, b"null");
        assert_eq!(
            String::from_utf8(v.labels).unwrap(),
            r#"{"calico/k8s_ns":"default"}"#
        );
        assert_eq!(
            String::from_utf8(v.rules).unwrap(),
            r#"{"inbound_rules":[{"action":"allow"}],"outbound_rules":[{"action":"allow"}]}"#
        );
        let bad = Resource::from_value(
            serde_saphyr::from_str(
                "apiVersion: v1\nkind: profile\nmetadata: {name: p, tags: ['a/b'], labels: {k: '-x'}}\n",
            )
            .unwrap(),
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(bad.starts_with("error with the following fields:"), "{bad}");
        assert!(
            bad.contains("Tags = 'a/b'") && bad.contains("Labels = '-x'"),
            "{bad}"
        );
    }
}
