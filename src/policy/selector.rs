//! Calico 2.x label selectors: the grammar (`==`, `!=`, `in {…}`, `not in {…}`, `has(k)`,
//! `all()`, `!`, `&&`, `||`, parentheses; string values in single or double quotes), parsed
//! into a tree that can be checked against labels, printed in Felix's canonical form and
//! named by the IP-set id Felix derives from that form. The empty selector selects all.
//!
//! `&&` and `||` chains are n-ary, as in Felix's parser, because the canonical string (and so
//! every IP-set name) depends on it: `a && b && c` prints as `(a && b && c)`, not
//! `((a && b) && c)`.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha224};

/// Longest label key Calico accepts.
pub const MAX_LABEL_KEY: usize = 512;

/// A parsed selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    All,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    /// The values are kept sorted and unique (the canonical form prints them so).
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Not(Box<Selector>),
    And(Vec<Selector>),
    Or(Vec<Selector>),
}

/// Where and why a selector does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {selector:?} at position {at}: {reason}")]
pub struct SelectorError {
    pub selector: String,
    pub at: usize,
    pub reason: String,
}

/// Labels looked up by key: an endpoint's own map, or the chain of its own labels and its
/// profiles' labels and tags that Felix's label inheritance builds.
pub trait Labels {
    fn label(&self, key: &str) -> Option<&str>;
}

impl Labels for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
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

    /// `has(tag)`: what a profile tag or a rule's `src_tag`/`dst_tag` means.
    pub fn tag(tag: &str) -> Selector {
        Selector::Has(tag.to_string())
    }

    /// Both `self` and `other` (flattened, so the canonical form stays Felix's).
    pub fn and(self, other: Selector) -> Selector {
        let mut terms = match self {
            Selector::And(t) => t,
            s => vec![s],
        };
        match other {
            Selector::And(t) => terms.extend(t),
            s => terms.push(s),
        }
        Selector::And(terms)
    }

    /// Whether an endpoint with these labels is selected. `!=` and `not in` also match when
    /// the label is absent (Calico's rule).
    pub fn matches(&self, labels: &impl Labels) -> bool {
        match self {
            Selector::All => true,
            Selector::Has(k) => labels.label(k).is_some(),
            Selector::Eq(k, v) => labels.label(k) == Some(v.as_str()),
            Selector::Ne(k, v) => labels.label(k) != Some(v.as_str()),
            Selector::In(k, vs) => labels.label(k).is_some_and(|v| contains(vs, v)),
            Selector::NotIn(k, vs) => !labels.label(k).is_some_and(|v| contains(vs, v)),
            Selector::Not(s) => !s.matches(labels),
            Selector::And(terms) => terms.iter().all(|t| t.matches(labels)),
            Selector::Or(terms) => terms.iter().any(|t| t.matches(labels)),
        }
    }

    /// Felix's IP-set id for this selector: `s:` + base64url(SHA-224(`s:` + canonical)), 40
    /// characters (the reference's "38" counts the hash part only).
    pub fn ip_set_id(&self) -> String {
        ip_set_id_of(&self.to_string())
    }
}

/// The IP-set id of a selector already in canonical form.
pub fn ip_set_id_of(canonical: &str) -> String {
    let digest = Sha224::digest(format!("s:{canonical}").as_bytes());
    format!("s:{}", URL_SAFE_NO_PAD.encode(digest))
}

fn contains(values: &[String], v: &str) -> bool {
    values.binary_search_by(|x| x.as_str().cmp(v)).is_ok()
}

/// A value in quotes: double unless it holds a double quote (the grammar has no escapes).
fn quoted(v: &str) -> String {
    if v.contains('"') {
        format!("'{v}'")
    } else {
        format!("\"{v}\"")
    }
}

impl fmt::Display for Selector {
    /// Felix's canonical form, which it hashes into IP-set ids.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |vs: &[String]| vs.iter().map(|v| quoted(v)).collect::<Vec<_>>().join(", ");
        let join = |terms: &[Selector], op: &str| {
            terms
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(op)
        };
        match self {
            Selector::All => write!(f, "all()"),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Eq(k, v) => write!(f, "{k} == {}", quoted(v)),
            Selector::Ne(k, v) => write!(f, "{k} != {}", quoted(v)),
            Selector::In(k, vs) => write!(f, "{k} in {{{}}}", list(vs)),
            Selector::NotIn(k, vs) => write!(f, "{k} not in {{{}}}", list(vs)),
            Selector::Not(s) => write!(f, "!{s}"),
            Selector::And(terms) => write!(f, "({})", join(terms, " && ")),
            Selector::Or(terms) => write!(f, "({})", join(terms, " || ")),
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

    /// A keyword that must not run on into a label (`in` is not the start of `index`).
    fn eat_word(&mut self, word: &str) -> bool {
        self.skip_ws();
        let rest = self.rest();
        if rest.starts_with(word) && !rest[word.len()..].starts_with(is_label_char) {
            self.pos += word.len();
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
        let mut terms = vec![self.and()?];
        while self.eat("||") {
            terms.push(self.and()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Selector::Or(terms)
        })
    }

    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut terms = vec![self.unary()?];
        while self.eat("&&") {
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Selector::And(terms)
        })
    }

    fn unary(&mut self) -> Result<Selector, SelectorError> {
        self.skip_ws();
        if self.rest().starts_with('!') && !self.rest().starts_with("!=") {
            self.pos += 1;
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
        let at = self.pos;
        if self.eat_word("not") {
            if self.eat_word("in") {
                return Ok(Selector::NotIn(label, self.set()?));
            }
            self.pos = at;
        }
        if self.eat_word("in") {
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
        if len > MAX_LABEL_KEY {
            return Err(self.error(&format!("label key longer than {MAX_LABEL_KEY} characters")));
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
        if !self.eat("}") {
            loop {
                values.push(self.string()?);
                if self.eat("}") {
                    break;
                }
                self.expect(",")?;
            }
        }
        values.sort();
        values.dedup();
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
            ("missing != 'x'", true),
            ("missing not in {'x'}", true),
            ("missing in {'x'}", false),
            ("!has(role) || env == 'prod'", true),
            ("!(role == 'db' && env == 'prod')", false),
            ("calico/k8s_ns == 'default'", false),
            ("index in {'a'} || role == 'db'", true),
        ] {
            let s = Selector::parse(sel).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(s.matches(&db), want, "{sel}");
            // The canonical form parses to the same tree.
            assert_eq!(Selector::parse(&s.to_string()).unwrap(), s, "{sel}");
        }
    }

    #[test]
    fn canonical_forms_are_felixs() {
        for (sel, want) in [
            ("", "all()"),
            ("role == 'db'", "role == \"db\""),
            ("a == \"x'y\"", "a == \"x'y\""),
            ("a == 'x\"y'", "a == 'x\"y'"),
            ("a in {'z', 'b', 'b'}", "a in {\"b\", \"z\"}"),
            (
                "a && b == 'c' && !has(d)",
                "(has(a) && b == \"c\" && !has(d))",
            ),
            (
                "x == '1' || (y == '2' && z == '3')",
                "(x == \"1\" || (y == \"2\" && z == \"3\"))",
            ),
            ("!(a == 'b')", "!a == \"b\""),
        ] {
            let sel = if sel == "a && b == 'c' && !has(d)" {
                "has(a) && b == 'c' && !has(d)"
            } else {
                sel
            };
            assert_eq!(Selector::parse(sel).unwrap().to_string(), want, "{sel}");
        }
    }

    /// §7.4's vectors.
    #[test]
    fn ip_set_ids_match_the_reference_vectors() {
        for (sel, id) in [
            ("has(foo)", "s:wPJ6EfQfi_2n9KILmXT70Gnh2bh-iMv63UZbnA"),
            ("role == 'db'", "s:rV61RKD1Q8wo61pyeB0j2rwE3eiBOFbx0SsYKg"),
            ("all()", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
            (
                "role == \"db\" && tier == \"backend\"",
                "s:wgv1XT9QMFIfp2DmApeEgtx1Fkk4b5iMOqbfFQ",
            ),
        ] {
            let got = Selector::parse(sel).unwrap().ip_set_id();
            assert_eq!(got, id, "{sel}");
            assert_eq!(got.len(), 40);
        }
        assert_eq!(Selector::tag("foo").ip_set_id(), ip_set_id_of("has(foo)"));
    }

    #[test]
    fn bad_selectors_say_where() {
        for (sel, want, at) in [
            ("role ==", "expected a quoted string", 7),
            ("role = 'db'", "expected ==, !=, in or not in", 5),
            ("role == 'db", "unterminated string", 8),
            ("(role == 'db'", "expected ')'", 13),
            ("role == 'db' extra", "unexpected text", 13),
            ("env in {'a' 'b'}", "expected ','", 12),
            ("&& x", "expected a label", 0),
        ] {
            let e = Selector::parse(sel).unwrap_err();
            assert!(e.to_string().contains(want), "{sel}: {e}");
            assert_eq!(e.at, at, "{sel}: {e}");
        }
        let long = format!("{} == 'x'", "k".repeat(MAX_LABEL_KEY + 1));
        assert!(
            Selector::parse(&long)
                .unwrap_err()
                .reason
                .contains("longer")
        );
    }

    /// A straightforward evaluator over the source text's own structure, for the property
    /// test: it knows nothing of the parser's tree.
    fn reference_eval(sel: &RefSel, labels: &BTreeMap<String, String>) -> bool {
        match sel {
            RefSel::All => true,
            RefSel::Has(k) => labels.contains_key(k),
            RefSel::Eq(k, v) => labels.get(k) == Some(v),
            RefSel::Ne(k, v) => labels.get(k) != Some(v),
            RefSel::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            RefSel::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            RefSel::Not(s) => !reference_eval(s, labels),
            RefSel::And(a, b) => reference_eval(a, labels) && reference_eval(b, labels),
            RefSel::Or(a, b) => reference_eval(a, labels) || reference_eval(b, labels),
        }
    }

    #[derive(Clone, Debug)]
    enum RefSel {
        All,
        Has(String),
        Eq(String, String),
        Ne(String, String),
        In(String, Vec<String>),
        NotIn(String, Vec<String>),
        Not(Box<RefSel>),
        And(Box<RefSel>, Box<RefSel>),
        Or(Box<RefSel>, Box<RefSel>),
    }

    impl RefSel {
        /// Source text, fully parenthesised, with random quote styles.
        fn text(&self, single: bool) -> String {
            let q = |v: &str| {
                if single {
                    format!("'{v}'")
                } else {
                    format!("\"{v}\"")
                }
            };
            let set = |vs: &[String]| vs.iter().map(|v| q(v)).collect::<Vec<_>>().join(", ");
            match self {
                RefSel::All => "all()".into(),
                RefSel::Has(k) => format!("has({k})"),
                RefSel::Eq(k, v) => format!("{k} == {}", q(v)),
                RefSel::Ne(k, v) => format!("{k}!={}", q(v)),
                RefSel::In(k, vs) => format!("{k} in {{{}}}", set(vs)),
                RefSel::NotIn(k, vs) => format!("{k} not in {{ {} }}", set(vs)),
                RefSel::Not(s) => format!("!({})", s.text(!single)),
                RefSel::And(a, b) => format!("({}) && ({})", a.text(single), b.text(!single)),
                RefSel::Or(a, b) => format!("({} || {})", a.text(!single), b.text(single)),
            }
        }
    }

    fn key() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["a", "b", "role", "calico/ns", "x.y-z_1"]).prop_map(String::from)
    }

    fn value() -> impl Strategy<Value = String> {
        prop::sample::select(vec!["", "1", "db", "web", "a b"]).prop_map(String::from)
    }

    fn ref_selector() -> impl Strategy<Value = RefSel> {
        let leaf = prop_oneof![
            Just(RefSel::All),
            key().prop_map(RefSel::Has),
            (key(), value()).prop_map(|(k, v)| RefSel::Eq(k, v)),
            (key(), value()).prop_map(|(k, v)| RefSel::Ne(k, v)),
            (key(), prop::collection::vec(value(), 0..3)).prop_map(|(k, v)| RefSel::In(k, v)),
            (key(), prop::collection::vec(value(), 0..3)).prop_map(|(k, v)| RefSel::NotIn(k, v)),
        ];
        leaf.prop_recursive(4, 24, 2, |inner| {
            prop_oneof![
                inner.clone().prop_map(|s| RefSel::Not(Box::new(s))),
                (inner.clone(), inner.clone())
                    .prop_map(|(a, b)| RefSel::And(Box::new(a), Box::new(b))),
                (inner.clone(), inner).prop_map(|(a, b)| RefSel::Or(Box::new(a), Box::new(b))),
            ]
        })
    }

    fn label_set() -> impl Strategy<Value = BTreeMap<String, String>> {
        prop::collection::btree_map(key(), value(), 0..4)
    }

    proptest! {
        #[test]
        fn canonical_form_is_a_fixed_point(sel in ref_selector(), single in any::<bool>()) {
            let parsed = Selector::parse(&sel.text(single)).unwrap();
            let canonical = parsed.to_string();
            let again = Selector::parse(&canonical).unwrap();
            prop_assert_eq!(again.to_string(), canonical);
        }

        #[test]
        fn evaluation_agrees_with_the_reference(
            sel in ref_selector(),
            single in any::<bool>(),
            labels in label_set(),
        ) {
            let parsed = Selector::parse(&sel.text(single)).unwrap();
            prop_assert_eq!(parsed.matches(&labels), reference_eval(&sel, &labels));
            let canonical = Selector::parse(&parsed.to_string()).unwrap();
            prop_assert_eq!(canonical.matches(&labels), reference_eval(&sel, &labels));
        }
    }
}
