//! How the agents log: human-readable text (the default) or one JSON object per line for log
//! collectors, both on stderr, filtered by `RUST_LOG` (default `info`). Spans carry the ids
//! of what is being worked on (node, tenant, subnet, VNIC), so every line says which.

use std::str::FromStr;

/// `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format '{other}' is neither text nor json")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

impl LogFormat {
    /// The flag's format (clap also reads the environment into it), else the config file's
    /// `log_format`, else text.
    pub fn choose(flag: Option<LogFormat>, file: Option<&str>) -> Result<LogFormat, String> {
        match (flag, file) {
            (Some(f), _) => Ok(f),
            (None, Some(f)) => f.parse().map_err(|e| format!("log_format: {e}")),
            (None, None) => Ok(LogFormat::Text),
        }
    }
}

/// Installs the process's subscriber. JSON lines carry the timestamp, level, target, the
/// message and fields, and the span chain with each span's fields.
pub fn init(format: LogFormat) {
    init_with(format, "info");
}

/// [`init`] with another level than `info` when `RUST_LOG` is unset (the CNI plugin logs
/// warnings only: a runtime shows its stderr to users).
pub fn init_with(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_span_list(true).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_print() {
        assert_eq!("JSON".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>().unwrap().to_string(), "text");
        assert!("xml".parse::<LogFormat>().unwrap_err().contains("xml"));
        assert_eq!(
            LogFormat::choose(Some(LogFormat::Text), Some("json")),
            Ok(LogFormat::Text)
        );
        assert_eq!(LogFormat::choose(None, Some("json")), Ok(LogFormat::Json));
        assert_eq!(LogFormat::choose(None, None), Ok(LogFormat::Text));
        assert!(
            LogFormat::choose(None, Some("yaml"))
                .unwrap_err()
                .starts_with("log_format")
        );
    }
}
