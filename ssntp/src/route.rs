//! Reading one routing field from a YAML payload without parsing the document.
//!
//! The scheduler forwards TenantAdded/TenantRemoved by `concentrator_uuid` and the public-IP
//! commands by `concentrator_uuid`; parsing the whole document for that one field was most
//! of its CPU. ciao's payloads are plain block mappings written by gopkg.in/yaml.v2:
//!
//! ```yaml
//! tenant_added:
//!   agent_uuid: 0e0c…
//!   concentrator_uuid: 67d8…
//! ```
//!
//! [`scan`] reads exactly that shape: the top-level key alone on its line, then its
//! children at one indentation, the field once, with a plain scalar value. Anything else
//! (flow style, quotes, anchors, tags, tabs, several documents, the field twice or missing)
//! is [`Scan::Unusual`], and the caller falls back to the full parse, which decides.

/// What the scanner found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan<'a> {
    /// The field's plain value.
    Found(&'a str),
    /// Not the simple shape: parse the document.
    Unusual,
}

/// `top.field` of `payload`, if the payload is a simple block mapping.
pub fn scan<'a>(payload: &'a [u8], top: &str, field: &str) -> Scan<'a> {
    let Ok(text) = std::str::from_utf8(payload) else {
        return Scan::Unusual;
    };
    let mut inside = false;
    let mut seen_top = false;
    let mut indent: Option<usize> = None;
    let mut found: Option<&str> = None;
    for raw in text.split('\n') {
        let line = raw.strip_suffix('\r').unwrap_or(raw);
        if line.contains('\t') {
            return Scan::Unusual;
        }
        let body = line.trim_start_matches(' ');
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let depth = line.len() - body.len();
        if depth == 0 {
            if body.starts_with("---") || body.starts_with("...") || body.starts_with('%') {
                return Scan::Unusual;
            }
            let Some(key) = body.strip_suffix(':') else {
                // A top-level `key: value` of some other field is fine; anything else is not
                // the shape this reads.
                if plain_pair(body).is_some() {
                    inside = false;
                    continue;
                }
                return Scan::Unusual;
            };
            if key == top {
                if seen_top {
                    return Scan::Unusual;
                }
                seen_top = true;
                inside = true;
            } else {
                inside = false;
            }
            continue;
        }
        if !inside {
            continue;
        }
        let block = *indent.get_or_insert(depth);
        if depth < block {
            return Scan::Unusual;
        }
        if depth > block {
            // Nested under another child.
            continue;
        }
        let Some((key, value)) = plain_pair(body) else {
            // A child opening a nested block (`key:`) is fine; a sequence or anything
            // else is not this shape.
            if body.ends_with(':') && is_plain_key(&body[..body.len() - 1]) {
                continue;
            }
            return Scan::Unusual;
        };
        if key == field {
            if found.is_some() || value.is_empty() || !is_plain_value(value) {
                return Scan::Unusual;
            }
            found = Some(value);
        }
    }
    match found {
        Some(v) => Scan::Found(v),
        None => Scan::Unusual,
    }
}

/// `key: value` with a plain key; the value trimmed (possibly empty).
fn plain_pair(body: &str) -> Option<(&str, &str)> {
    let (key, value) = body.split_once(": ")?;
    is_plain_key(key).then_some((key, value.trim()))
}

fn is_plain_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A value that means itself in YAML: no quoting, comment, anchor, alias, tag, flow or
/// block indicator.
fn is_plain_value(v: &str) -> bool {
    !v.contains(" #")
        && !matches!(
            v.as_bytes()[0],
            b'"' | b'\'' | b'&' | b'*' | b'!' | b'{' | b'[' | b'|' | b'>' | b'%' | b'@' | b'`'
        )
        && v.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CIAO: &str = "tenant_added:\n  agent_uuid: 0e0c7d3e-8c2d-4f0e-9f40-6f4e1b1c3a2f\n  agent_ip: 10.3.66.71\n  tenant_uuid: 67d86208-000-4465-9018-fe14087d415f\n  tenant_subnet: 172.16.0.0/24\n  concentrator_uuid: 7d5bd7a4-2d8c-4b5e-8a33-0e3f6b3b2c11\n  concentrator_ip: 192.168.0.110\n  subnet_key: 4268\n";

    #[test]
    fn reads_ciao_payloads() {
        assert_eq!(
            scan(CIAO.as_bytes(), "tenant_added", "concentrator_uuid"),
            Scan::Found("7d5bd7a4-2d8c-4b5e-8a33-0e3f6b3b2c11")
        );
        let crlf = CIAO.replace('\n', "\r\n");
        assert_eq!(
            scan(crlf.as_bytes(), "tenant_added", "concentrator_uuid"),
            Scan::Found("7d5bd7a4-2d8c-4b5e-8a33-0e3f6b3b2c11")
        );
        let commented = format!("# from ciao\n{CIAO}\n");
        assert!(matches!(
            scan(commented.as_bytes(), "tenant_added", "concentrator_uuid"),
            Scan::Found(_)
        ));
    }

    #[test]
    fn anything_unusual_falls_back() {
        let cases = [
            "tenant_added: {concentrator_uuid: x}\n",
            "tenant_added:\n  concentrator_uuid: \"x\"\n",
            "tenant_added:\n  concentrator_uuid: &a x\n",
            "tenant_added:\n  concentrator_uuid: x # comment\n",
            "tenant_added:\n\tconcentrator_uuid: x\n",
            "---\ntenant_added:\n  concentrator_uuid: x\n",
            "tenant_added:\n  concentrator_uuid: x\n  concentrator_uuid: y\n",
            "tenant_added:\n  agent_uuid: a\n",
            "tenant_added:\n  concentrator_uuid:\n",
            "tenant_added:\n  - concentrator_uuid: x\n",
            "tenant_added:\n    a: 1\n  concentrator_uuid: x\n",
            "tenant_removed:\n  concentrator_uuid: x\n",
            "tenant_added:\n  concentrator_uuid: x\ntenant_added:\n  concentrator_uuid: y\n",
            "\u{0}\u{1}",
        ];
        for c in cases {
            assert_eq!(
                scan(c.as_bytes(), "tenant_added", "concentrator_uuid"),
                Scan::Unusual,
                "{c:?}"
            );
        }
        assert_eq!(
            scan(&[0xff, 0xfe], "tenant_added", "concentrator_uuid"),
            Scan::Unusual
        );
    }

    #[test]
    fn nested_children_and_other_top_keys_are_skipped() {
        let doc = "other: 1\ntenant_added:\n  nested:\n    concentrator_uuid: no\n  concentrator_uuid: yes\n";
        assert_eq!(
            scan(doc.as_bytes(), "tenant_added", "concentrator_uuid"),
            Scan::Found("yes")
        );
    }
}
