//! The result of ADD (and the `prevResult` CHECK and DEL receive): interfaces, addresses,
//! routes, in the shape of the version the runtime asked for (before 1.0.0 each address
//! carries its IP `version`).

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub dns: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The container's namespace, for an interface inside it; none for the host's side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// "4" or "6" (versions before 1.0.0 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The address with its prefix length (`172.16.0.5/24`).
    pub address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfig {
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

impl CniResult {
    /// The same result in the shape of `version`.
    pub fn in_version(mut self, version: &str) -> CniResult {
        let legacy = version.starts_with("0.");
        for ip in &mut self.ips {
            ip.version = legacy.then(|| match ip.address {
                IpNetwork::V4(_) => "4".to_string(),
                IpNetwork::V6(_) => "6".to_string(),
            });
        }
        self.cni_version = version.to_string();
        self
    }

    /// The interface inside the container (the one with a sandbox), and its index.
    pub fn sandbox_interface(&self) -> Option<(usize, &Interface)> {
        self.interfaces
            .iter()
            .enumerate()
            .find(|(_, i)| i.sandbox.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result() -> CniResult {
        CniResult {
            cni_version: String::new(),
            interfaces: vec![
                Interface {
                    name: "tvn_0001".into(),
                    mac: None,
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    sandbox: Some("/run/netns/c1".into()),
                },
            ],
            ips: vec![IpConfig {
                version: None,
                address: "172.16.0.5/24".parse().unwrap(),
                gateway: Some("172.16.0.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![RouteConfig {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("172.16.0.1".parse().unwrap()),
            }],
            dns: Default::default(),
        }
    }

    #[test]
    fn results_take_the_shape_of_the_asked_version() {
        let now = serde_json::to_value(result().in_version("1.0.0")).unwrap();
        assert_eq!(now["cniVersion"], "1.0.0");
        assert_eq!(now["ips"][0]["address"], "172.16.0.5/24");
        assert!(now["ips"][0].get("version").is_none());
        assert_eq!(now["interfaces"][1]["sandbox"], "/run/netns/c1");
        assert_eq!(now["routes"][0]["dst"], "0.0.0.0/0");
        let old = serde_json::to_value(result().in_version("0.4.0")).unwrap();
        assert_eq!(old["ips"][0]["version"], "4");
        let back: CniResult = serde_json::from_value(old).unwrap();
        assert_eq!(back.sandbox_interface().unwrap().0, 1);
    }
}
