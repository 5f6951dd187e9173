//! Calico 2.x label selectors: the grammar (`==`, `!=`, `in {…}`, `not in {…}`, `has(k)`,
//! `all()`, `!`, `&&`, `||`, parentheses; string values in single or double quotes), parsed
//! into a tree that can be checked against a set of labels. The empty selector selects all.

use std::collections::BTreeMap;
use std::fmt;

/// A parsed selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    All,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Not(Box<Selector>),
    And(Box<Selector>, Box<Selector>),
    Or(Box<Selector>, Box<Selector>),
}

/// Where and why a selector does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {selector:?} at position {at}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub at: usize,
    pub reason: String,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let mut p = Parser { s: text, pos: 0 };
        p.skip_ws();
        if p.pos == text.len() {
            return Ok(Selector::All);
        }
        let sel = p.or()?;
        p.skip_ws();
        if p.pos != text.len() {
            return Err(p.error("unexpected text after the expression"));
        }
        Ok(sel)
    }

    /// Whether an endpoint with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::All => true,
            Selector::Has(k) => labels.contains_key(k),
            Selector::Eq(k, v) => labels.get(k) == Some(v),
            Selector::Ne(k, v) => labels.get(k) != Some(v),
            Selector::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Selector::NotIn(k, vs) => !labels.get(k).is_some_and(|v| vs.contains(v)),
            Selector::Not(s) => !s.matches(labels),
            Selector::And(a, b) => a.matches(labels) && b.matches(labels),
            Selector::Or(a, b) => a.matches(labels) || b.matches(labels),
        }
    }
}

impl fmt::Display for Selector {
    /// A canonical form (Felix hashes the canonical form into IP set names).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |vs: &[String]| {
            vs.iter()
                .map(|v| format!("\"{v}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Selector::All => write!(f, "all()"),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Eq(k, v) => write!(f, "{k} == \"{v}\""),
            Selector::Ne(k, v) => write!(f, "{k} != \"{v}\""),
            Selector::In(k, vs) => write!(f, "{k} in {{{}}}", list(vs)),
            Selector::NotIn(k, vs) => write!(f, "{k} not in {{{}}}", list(vs)),
            Selector::Not(s) => write!(f, "!({s})"),
            Selector::And(a, b) => write!(f, "({a} && {b})"),
            Selector::Or(a, b) => write!(f, "({a} || {b})"),
        }
    }
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

fn is_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-')
}

impl Parser<'_> {
    fn error(&self, reason: &str) -> SelectorError {
        SelectorError {
            selector: self.s.to_string(),
            at: self.pos,
            reason: reason.into(),
        }
    }

    fn rest(&self) -> &str {
        &self.s[self.pos..]
    }

    fn skip_ws(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.s.len() - trimmed.len();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_ws();
        if self.rest().starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str) -> Result<(), SelectorError> {
        if self.eat(token) {
            Ok(())
        } else {
            Err(self.error(&format!("expected '{token}'")))
        }
    }

    fn or(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Selector::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            left = Selector::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Selector, SelectorError> {
        if self.eat("!") {
            return Ok(Selector::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let inner = self.or()?;
            self.expect(")")?;
            return Ok(inner);
        }
        if self.eat("all()") {
            return Ok(Selector::All);
        }
        if self.eat("has(") {
            let label = self.label()?;
            self.expect(")")?;
            return Ok(Selector::Has(label));
        }
        let label = self.label()?;
        if self.eat("==") {
            return Ok(Selector::Eq(label, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Selector::Ne(label, self.string()?));
        }
        if self.eat("not in") {
            return Ok(Selector::NotIn(label, self.set()?));
        }
        if self.eat("in") {
            return Ok(Selector::In(label, self.set()?));
        }
        Err(self.error("expected ==, !=, in or not in after a label"))
    }

    fn label(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let len = self
            .rest()
            .find(|c| !is_label_char(c))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(self.error("expected a label"));
        }
        let label = self.rest()[..len].to_string();
        self.pos += len;
        Ok(label)
    }

    fn string(&mut self) -> Result<String, SelectorError> {
        self.skip_ws();
        let quote = match self.rest().chars().next() {
            Some(q @ ('"' | '\'')) => q,
            _ => return Err(self.error("expected a quoted string")),
        };
        let body = &self.rest()[1..];
        let end = body
            .find(quote)
            .ok_or_else(|| self.error("unterminated string"))?;
        let value = body[..end].to_string();
        self.pos += end + 2;
        Ok(value)
    }

    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        self.expect("{")?;
        let mut values = Vec::new();
        if self.eat("}") {
            return Ok(values);
        }
        loop {
            values.push(self.string()?);
            if self.eat("}") {
                return Ok(values);
            }
            self.expect(",")?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_parse_and_match() {
        let db = labels(&[("role", "db"), ("env", "prod")]);
        for (sel, want) in [
            ("", true),
            ("all()", true),
            ("role == 'db'", true),
            ("role == \"web\"", false),
            ("role != 'web' && has(env)", true),
            ("env in {'prod', 'staging'}", true),
            ("env not in {'prod'}", false),
            ("!has(role) || env == 'prod'", true),
            ("!(role == 'db' && env == 'prod')", false),
            ("calico/k8s_ns == 'default'", false),
        ] {
            let s = Selector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(s.matches(&db), want, "{sel}");
            // The canonical form parses to the same tree.
            assert_eq!(Selector::parse(&s.to_string()).unwrap(), s, "{sel}");
        }
    }

    #[test]
    fn bad_selectors_say_where() {
        for (sel, want) in [
            ("role ==", "expected a quoted string"),
            ("role = 'db'", "expected ==, !=, in or not in"),
            ("role == 'db", "unterminated string"),
            ("(role == 'db'", "expected ')'"),
            ("role == 'db' extra", "unexpected text"),
            ("env in {'a' 'b'}", "expected ','"),
            ("&& x", "expected a label"),
        ] {
            let e = Selector::parse(sel).unwrap_err().to_string();
            assert!(e.contains(want), "{sel}: {e}");
        }
    }
}
