//! `${namespace.key}` templates in message paths and headers (SPEC §4).
//!
//! Known references: `${variables.K}`, `${params.K}`, `${message.id}`,
//! `${connection.name}`, `${connection.environment}`. An unknown reference
//! is an error, never an empty string.

use std::borrow::Cow;

/// One `${namespace.key}` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref<'a> {
    pub namespace: &'a str,
    pub key: &'a str,
}

/// The references of a template, or why it is malformed (an unclosed `${`,
/// an unknown namespace or field).
pub fn refs(template: &str) -> Result<Vec<Ref<'_>>, String> {
    let mut out = Vec::new();
    scan(template, |_, r| {
        out.push(r);
        Ok(())
    })?;
    Ok(out)
}

/// Walks `template` once: calls `each` with the text before every
/// reference and the reference, in order, and returns the text after the
/// last; or says why the template is malformed, or what `each` said.
fn scan<'t>(
    template: &'t str,
    mut each: impl FnMut(&'t str, Ref<'t>) -> Result<(), String>,
) -> Result<&'t str, String> {
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{template:?}: \"${{\" is not closed by \"}}\""))?;
        let inner = &after[..end];
        let (namespace, key) = inner.split_once('.').ok_or_else(|| {
            format!("{template:?}: \"${{{inner}}}\" is not of the form ${{namespace.key}}")
        })?;
        let known = match namespace {
            "variables" | "params" => !key.is_empty(),
            "message" => key == "id",
            "connection" => key == "name" || key == "environment",
            _ => false,
        };
        if !known {
            return Err(format!(
                "{template:?}: \"${{{inner}}}\" is not one of ${{variables.K}}, ${{params.K}}, \
                 ${{message.id}}, ${{connection.name}}, ${{connection.environment}}"
            ));
        }
        each(&rest[..start], Ref { namespace, key })?;
        rest = &after[end + 1..];
    }
    Ok(rest)
}

/// Expands `template`, asking `lookup` for each reference; a malformed
/// template or a reference `lookup` does not know is an error naming it,
/// never a partial result. `encode` percent-encodes the values (for URL
/// paths). This runs for every attempt, so `lookup` lends its values
/// rather than copying them, and the template is read once.
pub fn expand<'v>(
    template: &str,
    encode: bool,
    lookup: impl Fn(&Ref<'_>) -> Option<Cow<'v, str>>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 16);
    let tail = scan(template, |before, r| {
        out.push_str(before);
        let value = lookup(&r).ok_or_else(|| format!("unknown {} key {:?}", r.namespace, r.key))?;
        if encode {
            percent_encode_into(&value, &mut out);
        } else {
            out.push_str(&value);
        }
        Ok(())
    })?;
    out.push_str(tail);
    Ok(out)
}

/// Percent-encodes everything but the characters a URL path may carry as is.
fn percent_encode_into(value: &str, out: &mut String) {
    for b in value.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~/:@!$&'()*+,;=".contains(&b);
        if keep {
            out.push(b as char);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(r: &Ref<'_>) -> Option<Cow<'static, str>> {
        match (r.namespace, r.key) {
            ("variables", "table") => Some("incident".into()),
            ("params", "q") => Some("a b/c".into()),
            ("message", "id") => Some("m1".into()),
            ("params", "u") => Some("é%".into()),
            _ => None,
        }
    }

    #[test]
    fn expands_known_references() {
        assert_eq!(
            expand("/api/${variables.table}/${message.id}", true, lookup).unwrap(),
            "/api/incident/m1"
        );
        assert_eq!(
            expand("/s/${params.q}", true, lookup).unwrap(),
            "/s/a%20b/c"
        );
        assert_eq!(expand("x ${params.q}", false, lookup).unwrap(), "x a b/c");
        assert_eq!(expand("/${params.u}", true, lookup).unwrap(), "/%C3%A9%25");
        assert_eq!(expand("plain", true, lookup).unwrap(), "plain");
    }

    #[test]
    fn unknown_references_are_errors_never_empty() {
        assert_eq!(
            expand("/${variables.nope}", true, lookup).unwrap_err(),
            "unknown variables key \"nope\""
        );
        assert!(expand("/${params.missing}", true, lookup).is_err());
    }

    #[test]
    fn malformed_templates_are_refused() {
        assert!(refs("/${variables.table").is_err());
        assert!(refs("/${table}").is_err());
        assert!(refs("/${secrets.x}").is_err());
        assert!(refs("/${message.body}").is_err());
        // Also when the template is expanded.
        assert!(expand("/${params.q}/${variables.table", true, lookup).is_err());
        assert_eq!(refs("/${connection.environment}").unwrap().len(), 1);
    }
}
