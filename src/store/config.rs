//! Where the datastore is: calicoctl's conventions.
//!
//! `--config FILE` (YAML or JSON in calicoctl's `calicoApiConfig` shape) wins; without a
//! file, `ETCD_ENDPOINTS` (or `CALICO_ETCD_ENDPOINTS`, which takes precedence) from the
//! environment; otherwise `http://127.0.0.1:2379`.

use std::path::Path;

use serde::Deserialize;

use crate::store::{EtcdOptions, EtcdStore, StoreResult};

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

/// How to reach the datastore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatastoreConfig {
    pub endpoints: Vec<String>,
    pub credentials: Option<(String, String)>,
    /// Where the settings came from, for messages ("--config /etc/…", "ETCD_ENDPOINTS", …).
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Error reading config file: {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("syntax error in {path}: {reason}")]
    Syntax { path: String, reason: String },
    #[error("invalid config file {path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("invalid {variable}: {reason}")]
    Environment { variable: String, reason: String },
}

/// calicoctl's client configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ApiConfigFile {
    api_version: String,
    kind: String,
    #[serde(default)]
    #[allow(dead_code)] // accepted for compatibility; calicoctl ignores it too
    metadata: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    spec: ApiConfigSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ApiConfigSpec {
    #[serde(default)]
    datastore_type: String,
    #[serde(default)]
    etcd_endpoints: String,
    #[serde(default)]
    etcd_scheme: String,
    #[serde(default)]
    etcd_authority: String,
    #[serde(default)]
    etcd_username: String,
    #[serde(default)]
    etcd_password: String,
    #[serde(default)]
    etcd_key_file: String,
    #[serde(default)]
    etcd_cert_file: String,
    #[serde(default, rename = "etcdCACertFile")]
    etcd_ca_cert_file: String,
}

impl DatastoreConfig {
    /// Resolves the configuration from an optional file and the environment.
    pub fn resolve(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        match file {
            Some(path) => Self::from_file(path),
            None => Self::from_env(env),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let file: ApiConfigFile =
            serde_saphyr::from_str(&text).map_err(|e| ConfigError::Syntax {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        let invalid = |reason: String| ConfigError::Invalid {
            path: shown.clone(),
            reason,
        };
        if file.api_version != "v1" {
            return Err(invalid(format!(
                "unknown APIVersion '{}'",
                file.api_version
            )));
        }
        if file.kind != "calicoApiConfig" {
            return Err(invalid(format!(
                "expected kind 'calicoApiConfig', got '{}'",
                file.kind
            )));
        }
        let spec = file.spec;
        if !matches!(spec.datastore_type.as_str(), "" | "etcdv2" | "etcdv3") {
            return Err(invalid(format!(
                "datastoreType '{}' is not supported (tenet speaks to etcd)",
                spec.datastore_type
            )));
        }
        for (field, value) in [
            ("etcdKeyFile", &spec.etcd_key_file),
            ("etcdCertFile", &spec.etcd_cert_file),
            ("etcdCACertFile", &spec.etcd_ca_cert_file),
        ] {
            if !value.is_empty() {
                return Err(invalid(format!(
                    "{field} is set, but tenet does not yet support TLS to etcd"
                )));
            }
        }
        let endpoints = if !spec.etcd_endpoints.is_empty() {
            split_endpoints(&spec.etcd_endpoints).map_err(invalid)?
        } else if !spec.etcd_authority.is_empty() {
            let scheme = if spec.etcd_scheme.is_empty() {
                "http"
            } else {
                &spec.etcd_scheme
            };
            split_endpoints(&format!("{scheme}://{}", spec.etcd_authority)).map_err(invalid)?
        } else {
            return Err(invalid("no etcd authority or endpoints specified".into()));
        };
        Ok(DatastoreConfig {
            endpoints,
            credentials: credentials(spec.etcd_username, spec.etcd_password),
            source: format!("--config {shown}"),
        })
    }

    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // calicoctl honours every variable with a CALICO_ prefix too; the prefixed one wins.
        let var = |name: &str| {
            env(&format!("CALICO_{name}"))
                .map(|v| (format!("CALICO_{name}"), v))
                .or_else(|| env(name).map(|v| (name.to_string(), v)))
                .filter(|(_, v)| !v.is_empty())
        };
        let (endpoints, source) = match var("ETCD_ENDPOINTS") {
            Some((name, value)) => (
                split_endpoints(&value).map_err(|reason| ConfigError::Environment {
                    variable: name.clone(),
                    reason,
                })?,
                name,
            ),
            None => (vec![DEFAULT_ENDPOINT.to_string()], "default".to_string()),
        };
        let user = var("ETCD_USERNAME").map(|(_, v)| v).unwrap_or_default();
        let password = var("ETCD_PASSWORD").map(|(_, v)| v).unwrap_or_default();
        Ok(DatastoreConfig {
            endpoints,
            credentials: credentials(user, password),
            source,
        })
    }

    /// Connects (lazily) to the configured etcd.
    pub async fn connect(&self) -> StoreResult<EtcdStore> {
        let options = EtcdOptions {
            credentials: self.credentials.clone(),
            ..EtcdOptions::default()
        };
        EtcdStore::connect(&self.endpoints, options).await
    }
}

/// Both a user and a password are needed for either to be used.
fn credentials(user: String, password: String) -> Option<(String, String)> {
    (!user.is_empty() && !password.is_empty()).then_some((user, password))
}

fn split_endpoints(list: &str) -> Result<Vec<String>, String> {
    let endpoints: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect();
    if endpoints.is_empty() {
        return Err("no etcd endpoints given".into());
    }
    for e in &endpoints {
        let Some(rest) = e.strip_prefix("http://") else {
            return Err(if e.starts_with("https://") {
                format!("endpoint '{e}': TLS to etcd is not supported yet")
            } else {
                format!("endpoint '{e}' must look like http://HOST:PORT")
            });
        };
        let (host, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .ok_or_else(|| format!("endpoint '{e}' has no port"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("endpoint '{e}' must look like http://HOST:PORT"));
        }
    }
    Ok(endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn default_then_environment() {
        let c = DatastoreConfig::resolve(None, env(&[])).unwrap();
        assert_eq!(c.endpoints, [DEFAULT_ENDPOINT]);
        let c = DatastoreConfig::resolve(
            None,
            env(&[
                (
                    "ETCD_ENDPOINTS",
                    "http://10.0.0.1:2379, http://10.0.0.2:2379",
                ),
                ("CALICO_ETCD_USERNAME", "u"),
                ("ETCD_PASSWORD", "p"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(c.credentials, Some(("u".into(), "p".into())));
        let c = DatastoreConfig::resolve(
            None,
            env(&[
                ("ETCD_ENDPOINTS", "http://a:1"),
                ("CALICO_ETCD_ENDPOINTS", "http://b:2"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (c.endpoints[0].as_str(), c.source.as_str()),
            ("http://b:2", "CALICO_ETCD_ENDPOINTS")
        );
        let err =
            DatastoreConfig::resolve(None, env(&[("ETCD_ENDPOINTS", "10.0.0.1")])).unwrap_err();
        assert!(err.to_string().contains("ETCD_ENDPOINTS"), "{err}");
    }

    #[test]
    fn calicoctl_config_file() {
        let f = file(
            "apiVersion: v1\nkind: calicoApiConfig\nmetadata:\nspec:\n  datastoreType: \"etcdv2\"\n  etcdEndpoints: \"http://10.0.0.1:2379,http://10.0.0.2:2379\"\n",
        );
        // A file beats the environment (and is not merged with it).
        let c = DatastoreConfig::resolve(Some(f.path()), env(&[("ETCD_ENDPOINTS", "http://x:1")]))
            .unwrap();
        assert_eq!(c.endpoints.len(), 2);
        let legacy =
            file("apiVersion: v1\nkind: calicoApiConfig\nspec:\n  etcdAuthority: 127.0.0.1:4001\n");
        let c = DatastoreConfig::from_file(legacy.path()).unwrap();
        assert_eq!(c.endpoints, ["http://127.0.0.1:4001"]);
    }

    #[test]
    fn bad_config_files_say_what_is_wrong() {
        for (text, want) in [
            (
                "apiVersion: v2\nkind: calicoApiConfig\nspec: {etcdEndpoints: 'http://a:1'}\n",
                "unknown APIVersion 'v2'",
            ),
            (
                "apiVersion: v1\nkind: bgpPeer\nspec: {etcdEndpoints: 'http://a:1'}\n",
                "expected kind 'calicoApiConfig', got 'bgpPeer'",
            ),
            (
                "apiVersion: v1\nkind: calicoApiConfig\nspec: {etcdEndpoint: 'http://a:1'}\n",
                "syntax error",
            ),
            (
                "apiVersion: v1\nkind: calicoApiConfig\nspec: {etcdEndpoints: [1, 2}\n",
                "syntax error",
            ),
            (
                "apiVersion: v1\nkind: calicoApiConfig\nspec: {}\n",
                "no etcd authority or endpoints",
            ),
            (
                "apiVersion: v1\nkind: calicoApiConfig\nspec: {etcdEndpoints: 'https://a:1'}\n",
                "TLS",
            ),
            (
                "apiVersion: v1\nkind: calicoApiConfig\nspec: {etcdEndpoints: 'http://a:1', etcdCACertFile: /ca.pem}\n",
                "TLS",
            ),
            (
                "apiVersion: v1\nkind: calicoApiConfig\nspec: {datastoreType: kubernetes, etcdEndpoints: 'http://a:1'}\n",
                "not supported",
            ),
        ] {
            let f = file(text);
            let err = DatastoreConfig::from_file(f.path())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let err = DatastoreConfig::from_file(Path::new("/nonexistent/tenet.cfg")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Error reading config file: /nonexistent/tenet.cfg")
        );
    }
}
