//! Where the datastore is: calicoctl's conventions.
//!
//! `--config FILE` (YAML or JSON in calicoctl's `calicoApiConfig` shape) wins; without a
//! file, `ETCD_ENDPOINTS` (or `CALICO_ETCD_ENDPOINTS`, which takes precedence) from the
//! environment; otherwise `http://127.0.0.1:2379`.

use std::path::Path;

use serde::Deserialize;

use crate::store::{EtcdOptions, EtcdStore, EtcdTls, StoreResult};

pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

/// How to reach the datastore.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatastoreConfig {
    pub endpoints: Vec<String>,
    pub credentials: Option<(String, String)>,
    /// TLS files, for `https://` endpoints.
    pub tls: Option<EtcdTls>,
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
        let tls = tls_files(
            &spec.etcd_ca_cert_file,
            &spec.etcd_cert_file,
            &spec.etcd_key_file,
            ["etcdCACertFile", "etcdCertFile", "etcdKeyFile"],
        )
        .map_err(invalid)?;
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
        check_schemes(&endpoints, tls.is_some()).map_err(invalid)?;
        Ok(DatastoreConfig {
            endpoints,
            credentials: credentials(spec.etcd_username, spec.etcd_password),
            tls,
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
        let file = |name: &str| var(name).map(|(_, v)| v).unwrap_or_default();
        let env_error = |reason: String| ConfigError::Environment {
            variable: "ETCD_CA_CERT_FILE, ETCD_CERT_FILE, ETCD_KEY_FILE".into(),
            reason,
        };
        let tls = tls_files(
            &file("ETCD_CA_CERT_FILE"),
            &file("ETCD_CERT_FILE"),
            &file("ETCD_KEY_FILE"),
            ["ETCD_CA_CERT_FILE", "ETCD_CERT_FILE", "ETCD_KEY_FILE"],
        )
        .map_err(env_error)?;
        check_schemes(&endpoints, tls.is_some()).map_err(|reason| ConfigError::Environment {
            variable: source.clone(),
            reason,
        })?;
        Ok(DatastoreConfig {
            endpoints,
            credentials: credentials(user, password),
            tls,
            source,
        })
    }

    /// Connects (lazily) to the configured etcd.
    pub async fn connect(&self) -> StoreResult<EtcdStore> {
        let options = EtcdOptions {
            credentials: self.credentials.clone(),
            tls: self.tls.clone(),
            ..EtcdOptions::default()
        };
        EtcdStore::connect(&self.endpoints, options).await
    }
}

/// The TLS files from their three settings (`names` as the user wrote them, for errors): a
/// CA alone (server authentication), or a CA with a certificate and key (client
/// authentication too).
fn tls_files(ca: &str, cert: &str, key: &str, names: [&str; 3]) -> Result<Option<EtcdTls>, String> {
    let [ca_name, cert_name, key_name] = names;
    let path = |s: &str| (!s.is_empty()).then(|| std::path::PathBuf::from(s));
    match (path(ca), path(cert), path(key)) {
        (None, None, None) => Ok(None),
        (None, _, _) => Err(format!(
            "{cert_name}/{key_name} are set but {ca_name} is not: name the CA that signed etcd's certificates"
        )),
        (Some(ca_file), None, None) => Ok(Some(EtcdTls {
            ca_file,
            identity: None,
        })),
        (Some(ca_file), Some(c), Some(k)) => Ok(Some(EtcdTls {
            ca_file,
            identity: Some((c, k)),
        })),
        (Some(_), Some(_), None) => Err(format!("{cert_name} is set but {key_name} is not")),
        (Some(_), None, Some(_)) => Err(format!("{key_name} is set but {cert_name} is not")),
    }
}

/// TLS settings go with https endpoints, plain ones with http.
fn check_schemes(endpoints: &[String], tls: bool) -> Result<(), String> {
    for e in endpoints {
        match (e.starts_with("https://"), tls) {
            (true, false) => {
                return Err(format!(
                    "endpoint '{e}' is https but no CA file is configured (etcdCACertFile / ETCD_CA_CERT_FILE)"
                ));
            }
            (false, true) => {
                return Err(format!(
                    "TLS files are configured but endpoint '{e}' is plain http"
                ));
            }
            _ => {}
        }
    }
    Ok(())
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
        let Some(rest) = e
            .strip_prefix("http://")
            .or_else(|| e.strip_prefix("https://"))
        else {
            return Err(format!("endpoint '{e}' must look like http(s)://HOST:PORT"));
        };
        let (host, port) = rest
            .trim_end_matches('/')
            .rsplit_once(':')
            .ok_or_else(|| format!("endpoint '{e}' has no port"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("endpoint '{e}' must look like http(s)://HOST:PORT"));
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
    fn tls_settings_from_the_environment_and_files() {
        let c = DatastoreConfig::resolve(
            None,
            env(&[
                ("ETCD_ENDPOINTS", "https://10.0.0.1:2379"),
                ("CALICO_ETCD_CA_CERT_FILE", "/pki/ca.pem"),
                ("ETCD_CERT_FILE", "/pki/c.pem"),
                ("ETCD_KEY_FILE", "/pki/k.pem"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.tls,
            Some(EtcdTls {
                ca_file: "/pki/ca.pem".into(),
                identity: Some(("/pki/c.pem".into(), "/pki/k.pem".into())),
            })
        );
        let err =
            DatastoreConfig::resolve(None, env(&[("ETCD_ENDPOINTS", "https://10.0.0.1:2379")]))
                .unwrap_err();
        assert!(err.to_string().contains("ETCD_CA_CERT_FILE"), "{err}");
        let f = file(
            "apiVersion: v1\nkind: calicoApiConfig\nspec:\n  etcdEndpoints: https://a:2379\n  etcdCACertFile: /ca.pem\n",
        );
        let c = DatastoreConfig::from_file(f.path()).unwrap();
        assert_eq!(
            c.tls.unwrap().identity,
            None,
            "a CA alone: server authentication only"
        );
    }

    #[test]
    fn the_packaged_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/examples/datastore.yaml");
        let c = DatastoreConfig::from_file(&path).unwrap();
        assert_eq!(c.endpoints.len(), 3);
        assert!(c.tls.unwrap().identity.is_some());
        let all = std::fs::read_to_string(&path)
            .unwrap()
            .replace("  # etcdUsername", "  etcdUsername")
            .replace("  # etcdPassword", "  etcdPassword");
        let c = DatastoreConfig::from_file(file(&all).path()).unwrap();
        assert_eq!(c.credentials, Some(("tenet".into(), "secret".into())));
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
                "no CA file",
            ),
            (
                "apiVersion: v1\nkind: calicoApiConfig\nspec: {etcdEndpoints: 'http://a:1', etcdCACertFile: /ca.pem}\n",
                "plain http",
            ),
            (
                "apiVersion: v1\nkind: calicoApiConfig\nspec: {etcdEndpoints: 'https://a:1', etcdCACertFile: /ca.pem, etcdCertFile: /c.pem}\n",
                "etcdCertFile is set but etcdKeyFile is not",
            ),
            (
                "apiVersion: v1\nkind: calicoApiConfig\nspec: {etcdEndpoints: 'https://a:1', etcdKeyFile: /k.pem, etcdCertFile: /c.pem}\n",
                "etcdCACertFile is not",
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
