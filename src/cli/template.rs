//! The subset of Go's text/template that `get -o go-template=…` understands, run over the
//! list of resources as calicoctl ran it: literal text; `{{.}}` and field paths
//! (`{{.Metadata.Name}}` — Go's field names, matched to the JSON keys without regard to case
//! or dashes, so `.Spec.NatOutgoing` finds `nat-outgoing`); `{{range PATH}}…{{end}}`;
//! `{{if PATH}}…{{else}}…{{end}}`; and string literals (`{{"\n"}}`). Functions, pipelines,
//! variables and `with` are not supported and are refused with a message saying so.

use serde_json::Value;

#[derive(Debug, PartialEq)]
enum Node {
    Text(String),
    Field(Vec<String>),
    Literal(String),
    Range(Vec<String>, Vec<Node>),
    If(Vec<String>, Vec<Node>, Vec<Node>),
}

/// A parsed template.
#[derive(Debug)]
pub struct Template(Vec<Node>);

enum Token {
    Text(String),
    Action(String),
}

fn tokens(src: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(start) = rest.find("{{") {
        if start > 0 {
            out.push(Token::Text(rest[..start].to_string()));
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| "template: unclosed action (missing '}}')".to_string())?;
        out.push(Token::Action(after[..end].trim().to_string()));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        out.push(Token::Text(rest.to_string()));
    }
    Ok(out)
}

fn path(expr: &str) -> Result<Vec<String>, String> {
    if expr == "." {
        return Ok(Vec::new());
    }
    let Some(rest) = expr.strip_prefix('.') else {
        return Err(format!(
            "template: '{expr}' is not supported (only field paths such as .Metadata.Name, string literals, range, if and else)"
        ));
    };
    if rest
        .split('.')
        .any(|p| p.is_empty() || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(format!("template: bad field path '{expr}'"));
    }
    Ok(rest.split('.').map(str::to_string).collect())
}

fn parse_nodes(
    toks: &mut std::iter::Peekable<std::vec::IntoIter<Token>>,
    ends: &[&str],
) -> Result<(Vec<Node>, Option<String>), String> {
    let mut nodes = Vec::new();
    while let Some(t) = toks.next() {
        match t {
            Token::Text(s) => nodes.push(Node::Text(s)),
            Token::Action(a) => {
                if ends.contains(&a.as_str()) {
                    return Ok((nodes, Some(a)));
                }
                if let Some(p) = a.strip_prefix("range ") {
                    let (body, end) = parse_nodes(toks, &["end"])?;
                    if end.is_none() {
                        return Err("template: range without end".into());
                    }
                    nodes.push(Node::Range(path(p.trim())?, body));
                } else if let Some(p) = a.strip_prefix("if ") {
                    let (then, end) = parse_nodes(toks, &["else", "end"])?;
                    let otherwise = match end.as_deref() {
                        Some("else") => {
                            let (e, end) = parse_nodes(toks, &["end"])?;
                            if end.is_none() {
                                return Err("template: if without end".into());
                            }
                            e
                        }
                        Some(_) => Vec::new(),
                        None => return Err("template: if without end".into()),
                    };
                    nodes.push(Node::If(path(p.trim())?, then, otherwise));
                } else if a.starts_with('"') && a.ends_with('"') && a.len() >= 2 {
                    let lit: String = serde_json::from_str(&a)
                        .map_err(|_| format!("template: bad string literal {a}"))?;
                    nodes.push(Node::Literal(lit));
                } else if a == "end" || a == "else" {
                    return Err(format!("template: unexpected {{{{{a}}}}}"));
                } else {
                    nodes.push(Node::Field(path(&a)?));
                }
            }
        }
    }
    Ok((nodes, None))
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, String> {
        let mut toks = tokens(src)?.into_iter().peekable();
        let (nodes, end) = parse_nodes(&mut toks, &[])?;
        debug_assert!(end.is_none());
        Ok(Template(nodes))
    }

    pub fn render(&self, data: &Value) -> Result<String, String> {
        let mut out = String::new();
        render(&self.0, data, &mut out)?;
        Ok(out)
    }
}

/// A JSON key for a Go field name: same letters, ignoring case, dashes and underscores.
fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| *c != '-' && *c != '_')
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    let want = norm(name);
    v.as_object()?
        .iter()
        .find(|(k, _)| norm(k) == want)
        .map(|(_, v)| v)
}

fn lookup<'a>(v: &'a Value, path: &[String]) -> Result<&'a Value, String> {
    let mut cur = v;
    for p in path {
        cur = match field(cur, p) {
            Some(next) => next,
            None if cur.is_object() => &Value::Null,
            None => return Err(format!("template: can't evaluate field {p} in {cur}")),
        };
    }
    Ok(cur)
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Go prints a missing field of a map as `<no value>`; strings without quotes.
fn show(v: &Value) -> String {
    match v {
        Value::Null => "<no value>".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => format!("[{}]", a.iter().map(show).collect::<Vec<_>>().join(" ")),
        Value::Object(o) => format!(
            "map[{}]",
            o.iter()
                .map(|(k, v)| format!("{k}:{}", show(v)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        other => other.to_string(),
    }
}

fn render(nodes: &[Node], dot: &Value, out: &mut String) -> Result<(), String> {
    for n in nodes {
        match n {
            Node::Text(t) | Node::Literal(t) => out.push_str(t),
            Node::Field(p) => out.push_str(&show(lookup(dot, p)?)),
            Node::Range(p, body) => match lookup(dot, p)? {
                Value::Array(items) => {
                    for item in items {
                        render(body, item, out)?;
                    }
                }
                Value::Object(map) => {
                    for item in map.values() {
                        render(body, item, out)?;
                    }
                }
                Value::Null => {}
                other => return Err(format!("template: range can't iterate over {other}")),
            },
            Node::If(p, then, otherwise) => {
                let branch = if truthy(lookup(dot, p)?) {
                    then
                } else {
                    otherwise
                };
                render(branch, dot, out)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subset_renders_like_go() {
        let data: Value = serde_json::from_str(
            r#"[{"kind":"ipPool","metadata":{"cidr":"10.0.0.0/16"},"spec":{"nat-outgoing":true}},
                {"kind":"ipPool","metadata":{"cidr":"10.1.0.0/16"},"spec":{}}]"#,
        )
        .unwrap();
        let t = Template::parse(
            r#"{{range .}}{{.Metadata.CIDR}} {{if .Spec.NatOutgoing}}nat{{else}}no-nat{{end}}{{"\n"}}{{end}}"#,
        )
        .unwrap();
        assert_eq!(
            t.render(&data).unwrap(),
            "10.0.0.0/16 nat\n10.1.0.0/16 no-nat\n"
        );
        let t = Template::parse("{{range .}}{{.Spec.Missing}};{{end}}").unwrap();
        assert_eq!(t.render(&data).unwrap(), "<no value>;<no value>;");
        for (bad, want) in [
            ("{{range .}}", "range without end"),
            ("{{len .}}", "not supported"),
            ("{{.Metadata", "unclosed action"),
            ("{{end}}", "unexpected"),
        ] {
            let e = Template::parse(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
