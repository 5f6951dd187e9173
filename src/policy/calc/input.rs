//! What the calculation engine eats: one datastore change at a time, decoded from a
//! `/calico/v1` key and value. An invalid value is a deletion (Felix's rule), logged once.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::IpNetwork;
use tracing::warn;

use crate::calico::{
    self, CalicoKey, CalicoValue, HostEndpoint, IpPool, Policy, ProfileRules, WorkloadEndpoint,
    WorkloadEndpointId,
};
use crate::policy::selector::Selector;

/// One change.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    WorkloadEndpoint {
        id: WorkloadEndpointId,
        value: Option<WorkloadEndpoint>,
    },
    HostEndpoint {
        host: String,
        endpoint: String,
        value: Option<HostEndpoint>,
    },
    ProfileTags {
        profile: String,
        tags: Option<Vec<String>>,
    },
    ProfileLabels {
        profile: String,
        labels: Option<BTreeMap<String, String>>,
    },
    ProfileRules {
        profile: String,
        rules: Option<ProfileRules>,
    },
    Policy {
        tier: String,
        name: String,
        value: Option<Policy>,
    },
    Pool {
        cidr: IpNetwork,
        value: Option<IpPool>,
    },
    /// Global (`host: None`) or per-host Felix configuration.
    Config {
        host: Option<String>,
        name: String,
        value: Option<String>,
    },
    HostIp {
        host: String,
        ip: Option<Ipv4Addr>,
    },
    /// The initial snapshot is complete.
    InSync,
}

impl Input {
    /// The change a key and its new value (`None`: deleted) make, if the engine cares about
    /// that key. Values that do not decode or fail validation come back as deletions.
    pub fn from_kv(key: &str, value: Option<&[u8]>) -> Option<Input> {
        let parsed = CalicoKey::parse(key).ok()?;
        let decoded = match value {
            Some(raw) => match calico::decode(&parsed, raw) {
                Ok(v) => Some(v),
                Err(e) => {
                    warn!(key, error = %e, "policy: invalid value treated as a deletion");
                    None
                }
            },
            None => None,
        };
        let invalid = |key: &str, problems: Vec<String>| {
            warn!(key, problems = %problems.join("; "), "policy: invalid value treated as a deletion");
        };
        Some(match parsed {
            CalicoKey::WorkloadEndpoint(id) => Input::WorkloadEndpoint {
                id,
                value: match decoded {
                    Some(CalicoValue::WorkloadEndpoint(w)) => {
                        let problems = w.problems();
                        if problems.is_empty() {
                            Some(w)
                        } else {
                            invalid(key, problems);
                            None
                        }
                    }
                    _ => None,
                },
            },
            CalicoKey::HostEndpoint { host, endpoint } => Input::HostEndpoint {
                host,
                endpoint,
                value: match decoded {
                    Some(CalicoValue::HostEndpoint(h)) => {
                        let problems = h.problems();
                        if problems.is_empty() {
                            Some(h)
                        } else {
                            invalid(key, problems);
                            None
                        }
                    }
                    _ => None,
                },
            },
            CalicoKey::ProfileTags { profile } => Input::ProfileTags {
                profile,
                tags: match decoded {
                    Some(CalicoValue::ProfileTags(t)) => Some(t.unwrap_or_default()),
                    _ => None,
                },
            },
            CalicoKey::ProfileLabels { profile } => Input::ProfileLabels {
                profile,
                labels: match decoded {
                    Some(CalicoValue::ProfileLabels(l)) => Some(l.unwrap_or_default()),
                    _ => None,
                },
            },
            CalicoKey::ProfileRules { profile } => Input::ProfileRules {
                profile,
                rules: match decoded {
                    Some(CalicoValue::ProfileRules(r)) => {
                        let problems =
                            rules_problems(r.inbound_rules.iter().chain(&r.outbound_rules));
                        if problems.is_empty() {
                            Some(r)
                        } else {
                            invalid(key, problems);
                            None
                        }
                    }
                    _ => None,
                },
            },
            CalicoKey::Policy { tier, name } => Input::Policy {
                tier,
                name,
                value: match decoded {
                    Some(CalicoValue::Policy(p)) => {
                        let mut problems =
                            rules_problems(p.inbound_rules.iter().chain(&p.outbound_rules));
                        if let Err(e) = Selector::parse(&p.selector) {
                            problems.push(e.to_string());
                        }
                        if problems.is_empty() {
                            Some(p)
                        } else {
                            invalid(key, problems);
                            None
                        }
                    }
                    _ => None,
                },
            },
            CalicoKey::IpPool { cidr } => Input::Pool {
                cidr,
                value: match decoded {
                    Some(CalicoValue::IpPool(p)) => Some(p),
                    _ => None,
                },
            },
            CalicoKey::GlobalConfig { name } => Input::Config {
                host: None,
                name,
                value: config_value(decoded),
            },
            CalicoKey::HostConfig { host, name } => Input::Config {
                host: Some(host),
                name,
                value: config_value(decoded),
            },
            CalicoKey::HostBirdIp { host } => Input::HostIp {
                host,
                ip: match decoded {
                    Some(CalicoValue::BirdIp(ip)) => Some(ip),
                    _ => None,
                },
            },
            _ => return None,
        })
    }
}

fn config_value(decoded: Option<CalicoValue>) -> Option<String> {
    match decoded {
        // Felix ignores empty values (`none` overrides a default).
        Some(CalicoValue::Config(v)) if !v.is_empty() => Some(v),
        _ => None,
    }
}

/// What is wrong with a list of rules: Calico's rule checks plus selectors that do not parse.
pub fn rules_problems<'a>(rules: impl Iterator<Item = &'a calico::Rule>) -> Vec<String> {
    let mut out = Vec::new();
    for (i, r) in rules.enumerate() {
        for p in r.problems() {
            out.push(format!("rule {i}: {p}"));
        }
        for sel in [
            &r.src_selector,
            &r.dst_selector,
            &r.not_src_selector,
            &r.not_dst_selector,
        ] {
            if !sel.is_empty()
                && let Err(e) = Selector::parse(sel)
            {
                out.push(format!("rule {i}: {e}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_become_inputs_and_bad_values_deletions() {
        let wep = "/calico/v1/host/n1/workload/ciao/i1/endpoint/e1";
        let good = br#"{"state":"active","name":"tvn_1","mac":null,"profile_ids":[],"ipv4_nets":["10.0.0.1/32"],"ipv6_nets":[]}"#;
        match Input::from_kv(wep, Some(good)) {
            Some(Input::WorkloadEndpoint { id, value: Some(v) }) => {
                assert_eq!(id.endpoint, "e1");
                assert_eq!(v.name, "tvn_1");
            }
            other => panic!("{other:?}"),
        }
        // No interface name: Felix treats it as deleted.
        let nameless =
            br#"{"state":"active","name":"","profile_ids":[],"ipv4_nets":[],"ipv6_nets":[]}"#;
        assert!(matches!(
            Input::from_kv(wep, Some(nameless)),
            Some(Input::WorkloadEndpoint { value: None, .. })
        ));
        assert!(matches!(
            Input::from_kv(wep, Some(b"{not json")),
            Some(Input::WorkloadEndpoint { value: None, .. })
        ));
        let pol = "/calico/v1/policy/tier/default/policy/p";
        assert!(matches!(
            Input::from_kv(pol, Some(br#"{"selector":"role =="}"#)),
            Some(Input::Policy { value: None, .. })
        ));
        assert!(matches!(
            Input::from_kv(
                pol,
                Some(br#"{"selector":"","inbound_rules":[{"src_selector":"a in {"}]}"#)
            ),
            Some(Input::Policy { value: None, .. })
        ));
        assert!(matches!(
            Input::from_kv(pol, Some(br#"{"selector":"has(a)","order":10}"#)),
            Some(Input::Policy { value: Some(_), .. })
        ));
        assert!(matches!(
            Input::from_kv("/calico/v1/policy/profile/p/tags", Some(b"null")),
            Some(Input::ProfileTags { tags: Some(t), .. }) if t.is_empty()
        ));
        assert!(matches!(
            Input::from_kv("/calico/v1/config/LogPrefix", Some(b"")),
            Some(Input::Config { value: None, .. })
        ));
        assert_eq!(
            Input::from_kv("/calico/ipam/v2/handle/h", Some(b"{}")),
            None
        );
        assert_eq!(Input::from_kv("/tenet/v1/x", None), None);
    }
}
