//! `tenet config set|get|unset`: calicoctl's cluster settings (reference: calico-data-model.md
//! §4.7) — logLevel (global or per node), nodeToNodeMesh, asNumber and ipip — stored where
//! calico/node, Felix and confd read them, with calicoctl's messages; `--raw felix|bgp`
//! reaches any Felix or BGP key.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use tenet::calico::{Asn, BgpHostField, CalicoKey, DEFAULT_AS_NUMBER};
use tenet::store::{Datastore, StoreError};

use super::{Cli, CliError, connect, store_error};

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Set NAME to VALUE: logLevel (none, debug, info, warning, error, critical; global or
    /// --node), nodeToNodeMesh (on, off), asNumber (0-4294967295 or dotted X.Y), ipip (on, off).
    Set {
        name: String,
        value: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Print NAME's value (the default when unset; a node's logLevel says when it is
    /// inherited from the global one).
    Get {
        name: String,
        #[command(flatten)]
        scope: Scope,
    },
    /// Restore NAME's default.
    Unset {
        name: String,
        #[command(flatten)]
        scope: Scope,
    },
}

#[derive(Debug, Args)]
struct Scope {
    /// The node the setting is for (logLevel and raw keys only).
    #[arg(short = 'n', long)]
    node: Option<String>,
    /// Any key of a component, unchecked: felix (/calico/v1/config or the node's config) or
    /// bgp (/calico/bgp/v1/global or the node's BGP keys).
    #[arg(long, value_name = "felix|bgp")]
    raw: Option<String>,
}

const LOG_LEVELS: [&str; 6] = ["none", "debug", "info", "warning", "error", "critical"];

/// The settings calicoctl knows, by their case-insensitive names.
#[derive(Clone, Copy, PartialEq)]
enum Setting {
    LogLevel,
    NodeToNodeMesh,
    AsNumber,
    Ipip,
}

impl Setting {
    fn parse(name: &str) -> Option<Setting> {
        Some(match name.to_ascii_lowercase().as_str() {
            "loglevel" => Setting::LogLevel,
            "nodetonodemesh" => Setting::NodeToNodeMesh,
            "asnumber" => Setting::AsNumber,
            "ipip" => Setting::Ipip,
            _ => return None,
        })
    }
}

fn error(text: impl std::fmt::Display) -> Result<ExitCode, CliError> {
    eprintln!("Error executing command: {text}");
    Ok(ExitCode::from(1))
}

fn felix_key(node: Option<&str>, name: &str) -> String {
    match node {
        Some(h) => CalicoKey::HostConfig {
            host: h.into(),
            name: name.into(),
        },
        None => CalicoKey::GlobalConfig { name: name.into() },
    }
    .path()
}

fn bgp_log_key(node: Option<&str>) -> String {
    match node {
        Some(h) => CalicoKey::BgpHost {
            host: h.into(),
            field: BgpHostField::LogLevel,
        },
        None => CalicoKey::BgpGlobalLogLevel,
    }
    .path()
}

fn raw_key(component: &str, node: Option<&str>, name: &str) -> Option<String> {
    match (component, node) {
        ("felix", n) => Some(felix_key(n, name)),
        ("bgp", None) => Some(format!("/calico/bgp/v1/global/{name}")),
        ("bgp", Some(h)) => Some(format!("/calico/bgp/v1/host/{h}/{name}")),
        _ => None,
    }
}

/// The BIRD level a calicoctl level maps to (§1.12).
fn bgp_level(level: &str) -> &'static str {
    match level {
        "debug" => "debug",
        "info" => "info",
        _ => "none",
    }
}

fn on_off(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

async fn text_at(store: &dyn Datastore, key: &str) -> Result<Option<String>, StoreError> {
    Ok(store
        .get(key)
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

async fn delete(store: &dyn Datastore, key: &str) -> Result<(), StoreError> {
    match store.delete(key, None).await {
        Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

pub async fn run(cli: &Cli, args: &ConfigArgs) -> Result<ExitCode, CliError> {
    let (name, scope) = match &args.command {
        ConfigCommand::Set { name, scope, .. }
        | ConfigCommand::Get { name, scope }
        | ConfigCommand::Unset { name, scope } => (name, scope),
    };
    let node = scope.node.as_deref();
    // Check everything that needs no datastore first.
    let setting = match &scope.raw {
        Some(c) if c != "felix" && c != "bgp" => {
            return error(format!("unrecognised component '{c}'"));
        }
        Some(_) => None,
        None => match Setting::parse(name) {
            Some(s) => Some(s),
            None => return error(format!("unrecognised config name '{name}'")),
        },
    };
    if node.is_some() && matches!(setting, Some(s) if s != Setting::LogLevel) {
        return error("--node should not be specified");
    }
    if let ConfigCommand::Set { value, .. } = &args.command {
        let ok = match setting {
            None => true,
            Some(Setting::LogLevel) => LOG_LEVELS.contains(&value.to_ascii_lowercase().as_str()),
            Some(Setting::NodeToNodeMesh | Setting::Ipip) => on_off(value).is_some(),
            Some(Setting::AsNumber) => {
                if value.parse::<Asn>().is_err() {
                    return error("the supplied AS number is not valid");
                }
                true
            }
        };
        if !ok {
            return error(format!("invalid value '{value}'"));
        }
    }
    let (store, config) = connect(cli).await?;
    let fail = |e: StoreError| store_error(&config, e);
    let store: &dyn Datastore = &store;

    match (&args.command, setting) {
        (ConfigCommand::Set { value, .. }, None) => {
            let key = raw_key(scope.raw.as_deref().unwrap_or(""), node, name).expect("checked");
            store.put(&key, value.as_bytes()).await.map_err(fail)?;
        }
        (ConfigCommand::Get { .. }, None) => {
            let key = raw_key(scope.raw.as_deref().unwrap_or(""), node, name).expect("checked");
            match text_at(store, &key).await.map_err(fail)? {
                Some(v) => println!("{v}"),
                None => println!("(unset)"),
            }
        }
        (ConfigCommand::Unset { .. }, None) => {
            let key = raw_key(scope.raw.as_deref().unwrap_or(""), node, name).expect("checked");
            delete(store, &key).await.map_err(fail)?;
        }
        (ConfigCommand::Set { value, .. }, Some(s)) => {
            let value = value.to_ascii_lowercase();
            match s {
                Setting::LogLevel => {
                    store
                        .put(&felix_key(node, "LogSeverityScreen"), value.as_bytes())
                        .await
                        .map_err(fail)?;
                    store
                        .put(&bgp_log_key(node), bgp_level(&value).as_bytes())
                        .await
                        .map_err(fail)?;
                }
                Setting::NodeToNodeMesh => {
                    let enabled = on_off(&value).expect("checked");
                    let json = format!("{{\"enabled\":{enabled}}}");
                    store
                        .put(&CalicoKey::BgpGlobalNodeMesh.path(), json.as_bytes())
                        .await
                        .map_err(fail)?;
                }
                Setting::AsNumber => {
                    let asn: Asn = value.parse().expect("checked");
                    store
                        .put(
                            &CalicoKey::BgpGlobalAsNum.path(),
                            asn.0.to_string().as_bytes(),
                        )
                        .await
                        .map_err(fail)?;
                }
                Setting::Ipip => {
                    let on = on_off(&value).expect("checked");
                    store
                        .put(&felix_key(None, "IpInIpEnabled"), on.to_string().as_bytes())
                        .await
                        .map_err(fail)?;
                }
            }
        }
        (ConfigCommand::Get { .. }, Some(s)) => {
            let shown = match s {
                Setting::LogLevel => {
                    let global = text_at(store, &felix_key(None, "LogSeverityScreen"))
                        .await
                        .map_err(fail)?
                        .unwrap_or_else(|| "info".into());
                    match node {
                        None => global,
                        Some(n) => match text_at(store, &felix_key(Some(n), "LogSeverityScreen"))
                            .await
                            .map_err(fail)?
                        {
                            Some(v) => v,
                            None => format!("{global} (inherited from global)"),
                        },
                    }
                }
                Setting::NodeToNodeMesh => {
                    let stored = text_at(store, &CalicoKey::BgpGlobalNodeMesh.path())
                        .await
                        .map_err(fail)?;
                    // Absent means on; a value that does not parse reads as off (§1.12).
                    let on = stored.is_none_or(|v| {
                        serde_json::from_str::<tenet::calico::NodeMesh>(&v).is_ok_and(|m| m.enabled)
                    });
                    if on { "on" } else { "off" }.to_string()
                }
                Setting::AsNumber => text_at(store, &CalicoKey::BgpGlobalAsNum.path())
                    .await
                    .map_err(fail)?
                    .unwrap_or_else(|| DEFAULT_AS_NUMBER.0.to_string()),
                Setting::Ipip => {
                    let v = text_at(store, &felix_key(None, "IpInIpEnabled"))
                        .await
                        .map_err(fail)?;
                    if v.as_deref() == Some("true") {
                        "on"
                    } else {
                        "off"
                    }
                    .to_string()
                }
            };
            println!("{shown}");
        }
        (ConfigCommand::Unset { .. }, Some(s)) => match s {
            Setting::LogLevel => {
                delete(store, &felix_key(node, "LogSeverityScreen"))
                    .await
                    .map_err(fail)?;
                delete(store, &bgp_log_key(node)).await.map_err(fail)?;
            }
            Setting::NodeToNodeMesh => delete(store, &CalicoKey::BgpGlobalNodeMesh.path())
                .await
                .map_err(fail)?,
            Setting::AsNumber => delete(store, &CalicoKey::BgpGlobalAsNum.path())
                .await
                .map_err(fail)?,
            Setting::Ipip => delete(store, &felix_key(None, "IpInIpEnabled"))
                .await
                .map_err(fail)?,
        },
    }
    Ok(ExitCode::SUCCESS)
}
