//! `kind: ipPool` ↔ `/calico/v1/ipam/v{4,6}/pool/<cidrkey>` (§1.8, §4.3, §4.10).

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::FieldError;
use crate::calico::IpPool;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpPoolResource {
    pub kind: String,
    pub api_version: String,
    pub metadata: IpPoolMetadata,
    #[serde(default)]
    pub spec: IpPoolSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpPoolMetadata {
    pub cidr: IpNetwork,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpPoolSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip: Option<IpipSpec>,
    #[serde(default, rename = "nat-outgoing", skip_serializing_if = "is_false")]
    pub nat_outgoing: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpipSpec {
    #[serde(default)]
    pub enabled: bool,
    /// `always` (the default) or `cross-subnet`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode: String,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The device name Calico records for an IPIP pool.
const IPIP_DEVICE: &str = "tunl0";

impl IpPoolResource {
    pub fn ipip_enabled(&self) -> bool {
        self.spec.ipip.as_ref().is_some_and(|i| i.enabled)
    }

    pub(super) fn problems(&self) -> Vec<FieldError> {
        let cidr = self.metadata.cidr;
        let mut out = Vec::new();
        let mut field = |field: &str, value: String, reason: &str| {
            out.push(FieldError {
                field: field.into(),
                value,
                reason: reason.into(),
            })
        };
        if cidr.ip() != cidr.network() {
            field(
                "CIDR",
                cidr.to_string(),
                "IP pool CIDR is not strictly masked",
            );
        }
        if !self.spec.disabled {
            match cidr {
                IpNetwork::V4(n) if n.prefix() > 26 => field(
                    "CIDR",
                    cidr.to_string(),
                    "IP pool size is too small (min /26) for use with Calico IPAM",
                ),
                IpNetwork::V6(n) if n.prefix() > 122 => field(
                    "CIDR",
                    cidr.to_string(),
                    "IP pool size is too small (min /122) for use with Calico IPAM",
                ),
                _ => {}
            }
        }
        let link_local: IpNetwork = if cidr.is_ipv4() {
            "169.254.0.0/16".parse().expect("valid")
        } else {
            "fe80::/10".parse().expect("valid")
        };
        if link_local.contains(cidr.network()) || cidr.contains(link_local.network()) {
            field(
                "CIDR",
                cidr.to_string(),
                "IP pool range overlaps with the link local address range",
            );
        }
        if let Some(ipip) = &self.spec.ipip {
            if ipip.enabled && cidr.is_ipv6() {
                field(
                    "IPIP",
                    "enabled".into(),
                    "IPIP is not supported on an IPv6 IP pool",
                );
            }
            if !matches!(ipip.mode.as_str(), "" | "always" | "cross-subnet") {
                field(
                    "Mode",
                    ipip.mode.clone(),
                    "must be one of: always, cross-subnet",
                );
            }
        }
        if self.kind != "ipPool" {
            field("Kind", self.kind.clone(), "expected ipPool");
        }
        out
    }

    /// The value libcalico-go v1 wrote for this pool.
    pub fn to_backend(&self) -> IpPool {
        let ipip = self.spec.ipip.as_ref().filter(|i| i.enabled);
        IpPool {
            cidr: self.metadata.cidr,
            ipip: ipip.map_or("", |_| IPIP_DEVICE).into(),
            ipip_mode: ipip.map(|i| i.mode.clone()).unwrap_or_default(),
            masquerade: self.spec.nat_outgoing,
            ipam: !self.spec.disabled,
            disabled: self.spec.disabled,
        }
    }

    /// The resource a stored pool stands for.
    pub fn from_backend(p: &IpPool) -> IpPoolResource {
        IpPoolResource {
            kind: "ipPool".into(),
            api_version: "v1".into(),
            metadata: IpPoolMetadata { cidr: p.cidr },
            spec: IpPoolSpec {
                ipip: (!p.ipip.is_empty()).then(|| IpipSpec {
                    enabled: true,
                    mode: p.ipip_mode.clone(),
                }),
                nat_outgoing: p.masquerade,
                disabled: p.disabled,
            },
        }
    }

    pub(super) fn cell(&self, heading: &str) -> Option<String> {
        Some(match heading {
            "CIDR" => self.metadata.cidr.to_string(),
            "NAT" => self.spec.nat_outgoing.to_string(),
            "IPIP" => self.ipip_enabled().to_string(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Resource, ResourceError};

    fn pool(yaml: &str) -> Result<Resource, ResourceError> {
        let v: serde_json::Value = serde_saphyr::from_str(yaml).unwrap();
        Resource::from_value(v)
    }

    #[test]
    fn pools_map_to_calicos_backend_value_and_back() {
        let r = pool(
            "apiVersion: v1\nkind: ipPool\nmetadata: {cidr: 192.168.0.0/16}\nspec: {ipip: {enabled: true, mode: cross-subnet}, nat-outgoing: true}\n",
        )
        .unwrap();
        r.validate().unwrap();
        let Resource::IpPool(p) = &r else { panic!() };
        let backend = serde_json::to_string(&p.to_backend()).unwrap();
        assert_eq!(
            backend,
            r#"{"cidr":"192.168.0.0/16","ipip":"tunl0","ipip_mode":"cross-subnet","masquerade":true,"ipam":true,"disabled":false}"#
        );
        assert_eq!(super::IpPoolResource::from_backend(&p.to_backend()), *p);
    }

    #[test]
    fn bad_pools_are_refused_with_calicoctls_reasons() {
        let cases = [
            ("10.0.0.1/16", "", "IP pool CIDR is not strictly masked"),
            ("10.0.0.0/28", "", "IP pool size is too small (min /26)"),
            ("169.254.0.0/16", "", "link local"),
            (
                "fd00::/64",
                "ipip: {enabled: true}",
                "IPIP is not supported on an IPv6",
            ),
            (
                "10.0.0.0/16",
                "ipip: {enabled: true, mode: sometimes}",
                "must be one of",
            ),
        ];
        for (cidr, spec, want) in cases {
            let e = pool(&format!(
                "apiVersion: v1\nkind: ipPool\nmetadata: {{cidr: '{cidr}'}}\nspec: {{{spec}}}\n"
            ))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.starts_with("error with field"), "{e}");
            assert!(e.contains(want), "{cidr} {spec}: {e}");
        }
        // A disabled pool may be small.
        pool(
            "apiVersion: v1\nkind: ipPool\nmetadata: {cidr: 10.0.0.0/28}\nspec: {disabled: true}\n",
        )
        .unwrap()
        .validate()
        .unwrap();
        for (doc, want) in [
            (
                "apiVersion: v2\nkind: ipPool\nmetadata: {cidr: 10.0.0.0/16}\n",
                "unknown APIVersion 'v2'",
            ),
            (
                "apiVersion: v1\nkind: ippool\nmetadata: {cidr: 10.0.0.0/16}\n",
                "resource type 'ippool' is not supported",
            ),
            (
                "apiVersion: v1\nkind: ipPool\nmetadata: {cidr: 10.0.0.0/16}\nspec: {nat: true}\n",
                "unknown field `nat`",
            ),
            (
                "apiVersion: v1\nkind: ipPool\nmetadata: {cidr: 10.0.0/16}\n",
                "error parsing ipPool",
            ),
        ] {
            let e = pool(doc).unwrap_err().to_string();
            assert!(e.contains(want), "{doc}: {e}");
        }
    }
}
