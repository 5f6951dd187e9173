//! The identity tenet writes into an interface alias (IFLA_IFALIAS), so that an agent can
//! rebuild its topology from the kernel after a restart and touch only links that are its own.
//!
//! Format: `tenet:v1:<kind> key=value key=value ...` with no spaces inside values.

/// Every tenet alias starts with this; links without it are never touched.
pub const ALIAS_PREFIX: &str = "tenet:v1:";

/// A decoded alias: the object kind and its fields in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    pub kind: String,
    pub fields: Vec<(String, String)>,
}

impl Alias {
    pub fn new(kind: &str) -> Self {
        Alias {
            kind: kind.to_string(),
            fields: Vec::new(),
        }
    }

    pub fn with(mut self, key: &str, value: impl ToString) -> Self {
        self.fields.push((key.to_string(), value.to_string()));
        self
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Parses `text`; `None` if it is not a tenet alias or is not well formed.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(ALIAS_PREFIX)?;
        let mut words = rest.split(' ');
        let kind = words.next().filter(|k| !k.is_empty())?.to_string();
        let fields = words
            .map(|w| {
                w.split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Alias { kind, fields })
    }
}

impl std::fmt::Display for Alias {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{ALIAS_PREFIX}{}", self.kind)?;
        for (k, v) in &self.fields {
            write!(f, " {k}={v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_foreign_aliases() {
        let a = Alias::new("tunnel")
            .with("key", 4268)
            .with("remote", "10.0.0.2");
        let text = a.to_string();
        assert_eq!(text, "tenet:v1:tunnel key=4268 remote=10.0.0.2");
        assert_eq!(Alias::parse(&text), Some(a.clone()));
        assert_eq!(a.get("key"), Some("4268"));
        assert_eq!(Alias::parse("tenant=acme net=blue"), None);
        assert_eq!(Alias::parse("tenet:v1: key=1"), None);
        assert_eq!(Alias::parse("tenet:v1:tunnel key"), None);
        assert_eq!(Alias::parse("tenet:v2:tunnel key=1"), None);
    }
}
