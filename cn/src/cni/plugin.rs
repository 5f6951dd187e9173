//! The four CNI commands. ADD and DEL are one call each on tenet-cn's local API; CHECK reads
//! the container's namespace; VERSION answers from the constants.

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use tenet::keyspace::NetworkMode;
use tracing::info;

use super::conf::{Command, Mode, NetConf, RuntimeEnv};
use super::error::{CniError, code};
use super::result::{CniResult, Interface, IpConfig, RouteConfig};
use super::{CURRENT_VERSION, SUPPORTED_VERSIONS};
use crate::agent::api::{ApiRequest, ApiResponse, CreateVnic, DestroyVnic, VnicKind};
use crate::agent::api_client::{ApiClient, ApiClientError};

/// Runs `env.command` with the configuration on `stdin`; what to print on success.
pub fn run(env: &RuntimeEnv, stdin: &[u8]) -> Result<Option<String>, CniError> {
    match env.command {
        Command::Version => Ok(Some(version())),
        Command::Add => add(env, &NetConf::parse(stdin)?).map(Some),
        Command::Del => del(env, &NetConf::parse(stdin)?).map(|()| None),
        Command::Check => check(env, &NetConf::parse(stdin)?).map(|()| None),
    }
}

/// The version an error should be written in: the configuration's when it has a supported
/// one, else the newest.
pub fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| CURRENT_VERSION.to_string())
}

fn version() -> String {
    serde_json::json!({
        "cniVersion": CURRENT_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

fn add(env: &RuntimeEnv, conf: &NetConf) -> Result<String, CniError> {
    let ip = conf.requested_ip(env)?;
    let request = ApiRequest::Create(CreateVnic {
        instance: env.container_id.clone(),
        vnic: env.vnic_id(),
        tenant: conf.tenant.clone(),
        subnet: conf.network(),
        kind: VnicKind::Container,
        concentrator: conf.concentrator.clone().unwrap_or_default(),
        concentrator_ip: conf.concentrator_ip,
        mac: None,
        ip,
        netns: env.netns.clone(),
        ifname: Some(env.ifname.clone()),
        queues: None,
        pool6: conf.pool6,
        mode: Some(match conf.mode {
            Mode::Gre => NetworkMode::Gre,
            Mode::Routed => NetworkMode::Routed,
        }),
    });
    let made = call(conf, &request)?;
    if !made.ok {
        return Err(refusal(&made, "add the container"));
    }
    let answer = |field: &str| {
        CniError::new(
            code::IO_FAILURE,
            format!("tenet-cn's answer has no {field}"),
            "a tenet-cn older than this plugin?",
        )
    };
    let address = made.ip.ok_or_else(|| answer("ip"))?;
    let prefix = made.prefix.ok_or_else(|| answer("prefix"))?;
    let gateway = made.gateway.ok_or_else(|| answer("gateway"))?;
    let network = Ipv4Network::new(address, prefix).map_err(|_| answer("valid prefix"))?;
    let v6 = match (conf.pool6, made.ip6, made.gateway6) {
        (None, _, _) => None,
        (Some(_), Some(ip6), Some(gw6)) => Some((ip6, gw6)),
        (Some(_), _, _) => return Err(answer("ip6")),
    };
    info!(container = %env.container_id, ifname = %env.ifname, %network, "added");
    let result = CniResult {
        cni_version: String::new(),
        interfaces: vec![
            Interface {
                name: made.ifname.clone().unwrap_or_default(),
                mac: None,
                sandbox: None,
            },
            Interface {
                name: env.ifname.clone(),
                mac: made.mac.clone(),
                sandbox: env.netns.as_ref().map(|n| n.display().to_string()),
            },
        ],
        ips: std::iter::once(IpConfig {
            version: None,
            address: IpNetwork::V4(network),
            gateway: Some(gateway.into()),
            interface: Some(1),
        })
        .chain(v6.map(|(ip6, gw6)| IpConfig {
            version: None,
            address: IpNetwork::V6(Ipv6Network::new(ip6, 128).expect("a /128")),
            gateway: Some(gw6.into()),
            interface: Some(1),
        }))
        .collect(),
        routes: std::iter::once(RouteConfig {
            dst: "0.0.0.0/0".parse().expect("a network"),
            gw: Some(gateway.into()),
        })
        .chain(v6.map(|(_, gw6)| RouteConfig {
            dst: "::/0".parse().expect("a network"),
            gw: Some(gw6.into()),
        }))
        .collect(),
        dns: Default::default(),
    };
    Ok(serde_json::to_string(&result.in_version(&conf.cni_version)).expect("results serialise"))
}

/// Idempotent: a container, interface or address already gone is success.
fn del(env: &RuntimeEnv, conf: &NetConf) -> Result<(), CniError> {
    let request = ApiRequest::Destroy(DestroyVnic {
        instance: env.container_id.clone(),
        vnic: Some(env.vnic_id()),
    });
    let done = call(conf, &request)?;
    match (done.ok, done.reason.as_deref()) {
        (true, _) => info!(container = %env.container_id, ifname = %env.ifname, "deleted"),
        (false, Some("no_instance")) => {
            info!(container = %env.container_id, ifname = %env.ifname, "nothing to delete")
        }
        (false, _) => return Err(refusal(&done, "delete the container's interface")),
    }
    Ok(())
}

fn check(env: &RuntimeEnv, conf: &NetConf) -> Result<(), CniError> {
    if conf.cni_version.starts_with("0.3") {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, not {}",
                conf.cni_version
            ),
            "",
        ));
    }
    let prev = conf
        .prev_result
        .clone()
        .ok_or_else(|| CniError::config("CHECK needs prevResult", "the result of ADD"))?;
    let prev: CniResult = serde_json::from_value(prev)
        .map_err(|e| CniError::config("prevResult is not a CNI result", e.to_string()))?;
    let netns = env
        .netns
        .as_ref()
        .ok_or_else(|| CniError::env("CNI_NETNS is not set"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            CniError::new(
                code::IO_FAILURE,
                "starting the plugin's runtime",
                e.to_string(),
            )
        })?;
    runtime.block_on(super::check::container_matches(&prev, netns, &env.ifname))
}

fn call(conf: &NetConf, request: &ApiRequest) -> Result<ApiResponse, CniError> {
    let client = ApiClient::new(conf.socket());
    match client.call(request) {
        Ok((response, _)) => Ok(response),
        Err(e @ (ApiClientError::Connect { .. } | ApiClientError::Io { .. })) => {
            Err(CniError::new(
                code::TRY_AGAIN_LATER,
                "tenet-cn is not reachable; try again later",
                e.to_string(),
            ))
        }
        Err(e @ ApiClientError::Answer { .. }) => Err(CniError::new(
            code::IO_FAILURE,
            "tenet-cn's answer is not understood",
            e.to_string(),
        )),
    }
}

/// A refusal from tenet-cn in CNI's terms; `details` carries tenet-cn's own words.
fn refusal(r: &ApiResponse, what: &str) -> CniError {
    let reason = r.reason.as_deref().unwrap_or("unknown");
    let detail = r.detail.clone().unwrap_or_default();
    match reason {
        "invalid_data" | "invalid_payload" => CniError::config(
            format!("tenet-cn refused the network configuration: {detail}"),
            reason,
        ),
        "full_cloud" => CniError::new(code::NO_FREE_ADDRESS, detail, reason),
        _ => CniError::new(
            code::REFUSED,
            format!("tenet-cn could not {what}: {detail}"),
            reason,
        ),
    }
}
