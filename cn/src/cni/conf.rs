//! The network configuration (stdin) and the runtime's environment (`CNI_*`), checked: every
//! wrong or missing field is named in a CNI error.
//!
//! ```json
//! {"cniVersion": "1.0.0", "name": "acme-net", "type": "tenet-cni",
//!  "tenant": "acme", "mode": "gre", "subnet": "172.16.0.0/24",
//!  "concentrator": "<uuid>", "concentratorIP": "10.254.0.11",
//!  "socket": "/run/tenet/cn.sock"}
//! ```
//!
//! Routed mode names a Calico `pool` instead of a subnet and no concentrator. An explicit
//! address comes from `runtimeConfig.ips` (the `ips` capability), `args.cni.ips` or
//! `CNI_ARGS` `IP=`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::Deserialize;
use serde_json::Value;

use super::SUPPORTED_VERSIONS;
use super::error::{CniError, code};

/// The local API's socket unless the configuration names another.
pub const DEFAULT_SOCKET: &str = "/run/tenet/cn.sock";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The tenant's subnet behind its concentrator, over a GRE tunnel.
    #[default]
    Gre,
    /// Calico's model: a routed veth, an address from a Calico pool, BGP.
    Routed,
}

/// The fields tenet reads; a runtime's other fields (`dns`, `capabilities`, …) are ignored,
/// as the spec asks.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin: String,
    pub tenant: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default, deserialize_with = "subnet_field")]
    pub subnet: Option<Ipv4Network>,
    #[serde(default, deserialize_with = "pool_field")]
    pub pool: Option<Ipv4Network>,
    /// Routed mode: a Calico IPv6 pool too, for dual stack.
    #[serde(default, deserialize_with = "pool6_field")]
    pub pool6: Option<Ipv6Network>,
    #[serde(default)]
    pub concentrator: Option<String>,
    #[serde(default, rename = "concentratorIP")]
    pub concentrator_ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub socket: Option<PathBuf>,
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub args: Option<Value>,
    #[serde(default)]
    pub runtime_config: Option<Value>,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

/// An IPv4 network from text, in an error that names the field and the value (serde's own
/// says neither).
fn network_field<'de, D: serde::Deserializer<'de>>(
    d: D,
    field: &str,
) -> Result<Option<Ipv4Network>, D::Error> {
    let text = Option::<String>::deserialize(d)?;
    text.map(|t| {
        t.parse::<Ipv4Network>().map_err(|e| {
            serde::de::Error::custom(format!(
                "{field} {t:?} is not an IPv4 network such as 172.16.0.0/24: {e}"
            ))
        })
    })
    .transpose()
}

fn subnet_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Ipv4Network>, D::Error> {
    network_field(d, "subnet")
}

fn pool_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Ipv4Network>, D::Error> {
    network_field(d, "pool")
}

fn pool6_field<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Ipv6Network>, D::Error> {
    let text = Option::<String>::deserialize(d)?;
    text.map(|t| {
        t.parse::<Ipv6Network>().map_err(|e| {
            serde::de::Error::custom(format!(
                "pool6 {t:?} is not an IPv6 network such as fd00:65::/48: {e}"
            ))
        })
    })
    .transpose()
}

impl NetConf {
    /// Parses and checks the configuration the runtime wrote to stdin.
    pub fn parse(raw: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(raw).map_err(|e| {
            CniError::new(
                code::DECODE_FAILURE,
                "the network configuration is not JSON",
                e.to_string(),
            )
        })?;
        let conf: NetConf = serde_json::from_value(value)
            .map_err(|e| CniError::config("invalid network configuration", e.to_string()))?;
        conf.validate()?;
        Ok(conf)
    }

    fn validate(&self) -> Result<(), CniError> {
        if !SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {} is not supported", self.cni_version),
                format!("tenet-cni speaks {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        if self.name.trim().is_empty() {
            return Err(CniError::config("name is empty", ""));
        }
        if self.tenant.trim().is_empty() {
            return Err(CniError::config(
                "tenant is empty",
                "name the tenant the network belongs to",
            ));
        }
        if let Some(ipam) = &self.ipam {
            let kind = ipam.get("type").and_then(Value::as_str);
            if ipam.as_object().is_some_and(|o| !o.is_empty()) && kind != Some("tenet") {
                return Err(CniError::new(
                    code::UNSUPPORTED_FIELD,
                    format!("ipam type {kind:?} is not supported"),
                    "tenet-cni allocates through tenet's IPAM: drop the ipam section or set its type to \"tenet\"",
                ));
            }
        }
        match self.mode {
            Mode::Gre => {
                if self.subnet.is_none() {
                    return Err(CniError::config(
                        "subnet is missing",
                        "gre mode puts the container on the tenant subnet named by \"subnet\"",
                    ));
                }
                if self.pool.is_some() || self.pool6.is_some() {
                    return Err(CniError::config(
                        "pool and pool6 are for routed mode",
                        "gre mode names a \"subnet\" and its \"concentrator\"",
                    ));
                }
                if self
                    .concentrator
                    .as_deref()
                    .is_none_or(|c| c.trim().is_empty())
                {
                    return Err(CniError::config(
                        "concentrator is missing",
                        "gre mode needs the UUID of the concentrator that serves the subnet",
                    ));
                }
            }
            Mode::Routed => {
                if self.subnet.is_some() && self.pool.is_some() {
                    return Err(CniError::config("give pool or subnet, not both", ""));
                }
                if self.pool.or(self.subnet).is_none() {
                    return Err(CniError::config(
                        "pool is missing",
                        "routed mode allocates from the Calico pool named by \"pool\"",
                    ));
                }
                if self.concentrator.is_some() || self.concentrator_ip.is_some() {
                    return Err(CniError::config(
                        "routed mode has no concentrator",
                        "drop \"concentrator\" and \"concentratorIP\"",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The subnet (gre) or pool (routed) the address comes from.
    pub fn network(&self) -> Ipv4Network {
        self.subnet
            .or(self.pool)
            .expect("validate requires a subnet or a pool")
    }

    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
    }

    /// The address the runtime asks for, if any: `runtimeConfig.ips`, then `args.cni.ips`,
    /// then `CNI_ARGS` `IP=`. At most one IPv4 address (tenet's workloads are IPv4).
    pub fn requested_ip(&self, env: &RuntimeEnv) -> Result<Option<Ipv4Addr>, CniError> {
        let from_list = |v: Option<&Value>, field: &str| -> Result<Vec<String>, CniError> {
            match v {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|i| {
                        i.as_str().map(str::to_string).ok_or_else(|| {
                            CniError::config(format!("{field} holds {i}, not a string"), "")
                        })
                    })
                    .collect(),
                Some(other) => Err(CniError::config(
                    format!("{field} is {other}, not a list"),
                    "",
                )),
            }
        };
        let mut asked = from_list(
            self.runtime_config.as_ref().and_then(|r| r.get("ips")),
            "runtimeConfig.ips",
        )?;
        if asked.is_empty() {
            asked = from_list(
                self.args
                    .as_ref()
                    .and_then(|a| a.get("cni"))
                    .and_then(|c| c.get("ips")),
                "args.cni.ips",
            )?;
        }
        if asked.is_empty()
            && let Some(ips) = env.args.get("IP")
        {
            asked = ips.split(',').map(str::to_string).collect();
        }
        let mut v4 = Vec::new();
        for text in &asked {
            let ip = text
                .parse::<IpNetwork>()
                .map(|n| n.ip())
                .or_else(|_| text.parse::<IpAddr>())
                .map_err(|_| {
                    CniError::config(
                        format!("requested address {text:?} is not an IP address"),
                        "",
                    )
                })?;
            match ip {
                IpAddr::V4(ip) => v4.push(ip),
                IpAddr::V6(ip) => {
                    return Err(CniError::config(
                        format!("requested address {ip} is IPv6"),
                        "tenet's workloads have IPv4 addresses",
                    ));
                }
            }
        }
        if v4.len() > 1 {
            return Err(CniError::config(
                format!("{} addresses requested", v4.len()),
                "a tenet interface has one IPv4 address",
            ));
        }
        Ok(v4.first().copied())
    }
}

/// The operation the runtime asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

/// The `CNI_*` environment.
#[derive(Debug, Clone)]
pub struct RuntimeEnv {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS`, split at `;` and `=`.
    pub args: BTreeMap<String, String>,
}

impl RuntimeEnv {
    /// Reads the environment through `get` (the process's, or a test's).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<RuntimeEnv, CniError> {
        let command = match get("CNI_COMMAND").as_deref() {
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("VERSION") => Command::Version,
            Some(other) => {
                return Err(CniError::env(format!(
                    "CNI_COMMAND {other:?} is not ADD, DEL, CHECK or VERSION"
                )));
            }
            None => return Err(CniError::env("CNI_COMMAND is not set")),
        };
        let nonempty = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let container_id = nonempty("CNI_CONTAINERID").unwrap_or_default();
        let ifname = nonempty("CNI_IFNAME").unwrap_or_default();
        let netns = nonempty("CNI_NETNS").map(PathBuf::from);
        if command != Command::Version {
            if container_id.is_empty() {
                return Err(CniError::env("CNI_CONTAINERID is not set"));
            }
            if !container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
            {
                return Err(CniError::env(format!(
                    "CNI_CONTAINERID {container_id:?} has characters other than letters, digits, '_', '.' and '-'"
                )));
            }
            if ifname.is_empty() {
                return Err(CniError::env("CNI_IFNAME is not set"));
            }
            if netns.is_none() && command != Command::Del {
                return Err(CniError::env("CNI_NETNS is not set"));
            }
        }
        let mut args = BTreeMap::new();
        for pair in get("CNI_ARGS").unwrap_or_default().split(';') {
            if pair.is_empty() {
                continue;
            }
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| CniError::env(format!("CNI_ARGS holds {pair:?}, not KEY=VALUE")))?;
            args.insert(k.to_string(), v.to_string());
        }
        Ok(RuntimeEnv {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    /// The VNIC id, which is also the IPAM handle: one per container and interface. VNIC ids
    /// have at most 48 bytes: a runtime's 64-hex container id is cut to its first 32
    /// characters (128 bits), the interface name has at most 15.
    pub fn vnic_id(&self) -> String {
        let id: String = self.container_id.chars().take(32).collect();
        format!("{id}.{}", self.ifname)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<RuntimeEnv, CniError> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RuntimeEnv::from_vars(|k| vars.get(k).cloned())
    }

    const GRE: &str = r#"{"cniVersion":"1.0.0","name":"n","type":"tenet-cni","tenant":"acme",
        "subnet":"172.16.0.0/24","concentrator":"c1"}"#;

    #[test]
    fn a_gre_network_parses_with_its_defaults() {
        let c = NetConf::parse(GRE.as_bytes()).unwrap();
        assert_eq!(c.mode, Mode::Gre);
        assert_eq!(c.network(), "172.16.0.0/24".parse().unwrap());
        assert_eq!(c.socket(), PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn bad_configurations_get_the_spec_codes_and_name_the_field() {
        let cases = [
            ("{", code::DECODE_FAILURE, "not JSON"),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#,
                7,
                "tenant",
            ),
            (
                r#"{"cniVersion":"9.9.9","name":"n","type":"t","tenant":"a","subnet":"10.0.0.0/24","concentrator":"c"}"#,
                1,
                "9.9.9",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","tenant":"a","concentrator":"c"}"#,
                7,
                "subnet",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","tenant":"a","subnet":"10.0.0.0/24"}"#,
                7,
                "concentrator",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","tenant":"a","subnet":"10.0.0.0/33","concentrator":"c"}"#,
                7,
                r#"subnet "10.0.0.0/33""#,
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","tenant":"a","mode":"bgp","pool":"10.0.0.0/16"}"#,
                7,
                "invalid network configuration",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","tenant":"a","mode":"routed"}"#,
                7,
                "pool",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","type":"t","tenant":"a","subnet":"10.0.0.0/24","concentrator":"c","ipam":{"type":"host-local"}}"#,
                2,
                "host-local",
            ),
        ];
        for (raw, want, words) in cases {
            let e = NetConf::parse(raw.as_bytes()).unwrap_err();
            assert_eq!(e.code, want, "{raw}: {e}");
            assert!(e.to_string().contains(words), "{raw}: {e}");
        }
    }

    #[test]
    fn the_requested_address_comes_from_runtime_config_args_or_cni_args() {
        let with = |extra: &str| {
            let raw = GRE.replace('}', &format!(",{extra}}}"));
            NetConf::parse(raw.as_bytes()).unwrap()
        };
        let plain = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ])
        .unwrap();
        let ip = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            with(r#""runtimeConfig":{"ips":["172.16.0.9/24"]}"#)
                .requested_ip(&plain)
                .unwrap(),
            ip("172.16.0.9")
        );
        assert_eq!(
            with(r#""args":{"cni":{"ips":["172.16.0.8"]}}"#)
                .requested_ip(&plain)
                .unwrap(),
            ip("172.16.0.8")
        );
        let args = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
            ("CNI_ARGS", "IgnoreUnknown=1;IP=172.16.0.7"),
        ])
        .unwrap();
        assert_eq!(
            NetConf::parse(GRE.as_bytes())
                .unwrap()
                .requested_ip(&args)
                .unwrap(),
            ip("172.16.0.7")
        );
        assert_eq!(
            NetConf::parse(GRE.as_bytes())
                .unwrap()
                .requested_ip(&plain)
                .unwrap(),
            None
        );
        let v6 = with(r#""runtimeConfig":{"ips":["fd00::5/64"]}"#)
            .requested_ip(&plain)
            .unwrap_err();
        assert_eq!(v6.code, 7);
        let two = with(r#""runtimeConfig":{"ips":["172.16.0.9","172.16.0.10"]}"#)
            .requested_ip(&plain)
            .unwrap_err();
        assert!(two.msg.contains("2 addresses"), "{two}");
    }

    #[test]
    fn the_environment_is_checked_per_command() {
        assert_eq!(env(&[]).unwrap_err().code, code::INVALID_ENVIRONMENT);
        assert!(
            env(&[("CNI_COMMAND", "GC")])
                .unwrap_err()
                .msg
                .contains("GC")
        );
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        let no_netns = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert!(no_netns.msg.contains("CNI_NETNS"), "{no_netns}");
        // DEL without a namespace is fine: the runtime may have removed it already.
        let del = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap();
        assert_eq!(del.vnic_id(), "c.eth0");
        let long = "0123456789abcdef".repeat(4);
        let runtime = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", &long),
            ("CNI_IFNAME", "net1"),
        ])
        .unwrap();
        assert_eq!(runtime.vnic_id(), format!("{}.net1", &long[..32]));
        let slash = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "a/b"),
            ("CNI_IFNAME", "eth0"),
        ])
        .unwrap_err();
        assert!(slash.msg.contains("a/b"), "{slash}");
    }
}
