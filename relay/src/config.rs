//! The relay's configuration (SPEC §9): parsed with unknown keys refused,
//! then validated — token read, daemon addresses and allow-list parsed,
//! certificate files checked — before any connection is attempted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outbox_secret::{Secret, SecretValue};
use serde::Deserialize;

use crate::allow::AllowList;

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

fn err(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    token: Secret,
    daemons: Vec<String>,
    server_ca: PathBuf,
    #[serde(default)]
    allow: Vec<String>,
    concurrency: Option<u32>,
    max_body: Option<String>,
    drain: Option<String>,
    #[serde(default)]
    protocol_profile: Vec<RawProfile>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    name: String,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    ca: Option<PathBuf>,
}

impl RawProfile {
    fn files(&self) -> outbox_remote::tls::Files<'_> {
        outbox_remote::tls::Files {
            ca: self.ca.as_deref(),
            client: self.client_cert.as_deref().zip(self.client_key.as_deref()),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

/// The validated relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The MID server name connections refer to.
    pub name: String,
    pub token: SecretValue,
    /// `host:port` of each daemon; the relay keeps a session to each.
    pub daemons: Vec<Daemon>,
    /// The certificates of `server_ca`, read once at load.
    pub server_roots: Arc<rustls::RootCertStore>,
    pub allow: AllowList,
    /// Requests performed at once (across daemons).
    pub concurrency: usize,
    /// Largest request or response body relayed.
    pub max_body: u64,
    /// How long requests in flight may finish after SIGTERM.
    pub drain: Duration,
    pub protocol_profiles: BTreeMap<String, Profile>,
    pub log_level: String,
    pub log_json: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daemon {
    /// As written, for logs.
    pub address: String,
    pub host: String,
    pub port: u16,
}

/// A protocol profile: its name, and the rustls settings its files
/// (`ca`, `client_cert`, `client_key`) give, built once at load. The relay
/// connects with them, and a file changed later does not matter.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub tls: rustls::ClientConfig,
}

pub mod defaults {
    /// Requests at once: enough for a busy integration host, bounded so a
    /// burst cannot exhaust the private network's targets or our sockets.
    pub const CONCURRENCY: u32 = 64;
    pub const MAX_BODY: &str = "16MiB";
    pub const DRAIN: &str = "30s";
}

impl Config {
    /// What is valid but almost certainly not meant, for `--check-config`
    /// and the start to say alike.
    pub fn warnings(&self) -> Vec<&'static str> {
        let mut warnings = Vec::new();
        if self.allow.is_empty() {
            warnings.push("the allow list is empty: every request will be refused");
        }
        warnings
    }

    /// Reads and validates the file, with the certificates and keys it
    /// names, so `--check-config` finds a `server_ca` that holds no
    /// certificate, or a profile's key that does not load, before anything
    /// is started.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("--config", format!("{}: {e}", path.display())))?;
        Self::parse_from(&text, Some(path))
    }

    /// Validates a configuration given as text; its errors name no file.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::parse_from(text, None)
    }

    fn parse_from(text: &str, file: Option<&Path>) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| toml_error(&e, text, file))?;
        // Names follow the one rule of the protocol (and of the daemon).
        let names = outbox_proto::Limits::default();
        outbox_proto::check_name(&raw.name, &names).map_err(|e| err("name", e.to_string()))?;
        // Read as the daemon reads its tokens: without whitespace around
        // it, and refused when blank.
        let token = raw
            .token
            .resolve_token()
            .map_err(|e| err("token", e.to_string()))?;
        if raw.daemons.is_empty() {
            return Err(err(
                "daemons",
                "lists no daemon; give at least one host:port",
            ));
        }
        let mut daemons = Vec::new();
        for (i, d) in raw.daemons.iter().enumerate() {
            let (host, port) = crate::allow::split_host_port(d).map_err(|bad| {
                use crate::allow::{NotHostPort, PORT_ZERO};
                let what = match bad {
                    NotHostPort::Shape => {
                        format!("{d:?} is not host:port like \"outbox.example.com:4433\"")
                    }
                    NotHostPort::PortZero => format!("{d:?} {PORT_ZERO}"),
                };
                err(format!("daemons[{i}]"), what)
            })?;
            // Two sessions to one daemon from one relay would only take
            // twice the hello places and show twice in its list.
            if let Some(j) = raw.daemons[..i]
                .iter()
                .position(|e| e.eq_ignore_ascii_case(d))
            {
                return Err(err(
                    format!("daemons[{i}]"),
                    format!("{d:?} is listed already, as daemons[{j}]"),
                ));
            }
            daemons.push(Daemon {
                address: d.clone(),
                host: host.to_string(),
                port,
            });
        }
        let server_roots =
            outbox_remote::tls::roots(&raw.server_ca).map_err(|e| err("server_ca", e))?;
        let allow = AllowList::parse(&raw.allow).map_err(|p| {
            let (key, problem) = p.split_once(": ").unwrap_or(("allow", &p));
            err(key, problem)
        })?;
        let concurrency = raw.concurrency.unwrap_or(defaults::CONCURRENCY);
        if !(1..=4096).contains(&concurrency) {
            return Err(err(
                "concurrency",
                format!("{concurrency} is not between 1 and 4096"),
            ));
        }
        let max_body = parse_size(raw.max_body.as_deref().unwrap_or(defaults::MAX_BODY))
            .map_err(|p| err("max_body", p))?;
        if max_body == 0 {
            return Err(err("max_body", "0 would refuse every request with a body"));
        }
        let drain_text = raw.drain.as_deref().unwrap_or(defaults::DRAIN);
        let drain = humantime::parse_duration(drain_text).map_err(|e| {
            err(
                "drain",
                format!("{drain_text:?} is not a duration such as \"30s\" or \"2m\" ({e})"),
            )
        })?;
        let mut protocol_profiles = BTreeMap::new();
        for (i, p) in raw.protocol_profile.into_iter().enumerate() {
            let at = format!(
                "protocol_profile[{}]",
                if p.name.is_empty() {
                    format!("#{}", i + 1)
                } else {
                    p.name.clone()
                }
            );
            outbox_proto::check_name(&p.name, &names)
                .map_err(|e| err(format!("{at}.name"), e.to_string()))?;
            match (&p.client_cert, &p.client_key) {
                (Some(_), Some(_)) => {}
                (None, None) if p.ca.is_some() => {}
                _ => {
                    return Err(err(
                        at,
                        "needs client_cert and client_key together (and/or ca)",
                    ))
                }
            }
            if protocol_profiles.contains_key(&p.name) {
                return Err(err(at, "is defined more than once"));
            }
            let tls = outbox_remote::tls::client_config(&p.files()).map_err(|e| match e.key {
                "" => err(&at, e.problem),
                key => err(format!("{at}.{key}"), e.problem),
            })?;
            protocol_profiles.insert(p.name.clone(), Profile { name: p.name, tls });
        }
        let log_level = raw.log.level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| err("log.level", format!("{log_level:?}: {e}")))?;
        // A bare word is a valid filter (it enables one target) but never
        // what is meant: `level = "loud"` would log nothing at all.
        if let Some(word) = outbox_proto::bare_log_word(&log_level) {
            let not_a_level = outbox_proto::NOT_A_LOG_LEVEL;
            return Err(err("log.level", format!("{word:?} {not_a_level}")));
        }
        let log_json = match raw.log.format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(err(
                    "log.format",
                    format!("{other:?} is not one of \"text\", \"json\""),
                ))
            }
        };
        Ok(Config {
            name: raw.name,
            token,
            daemons,
            server_roots: Arc::new(server_roots),
            allow,
            concurrency: concurrency as usize,
            max_body,
            drain,
            protocol_profiles,
            log_level,
            log_json,
        })
    }
}

/// A TOML error as a [`ConfigError`]: the key path where the parser stopped
/// (`concurrency`, `protocol_profile[acme].client_crt`), and as the
/// problem, the parser's message on one line, then the file, line and
/// column. The parser gives only a byte span; the key path is found by
/// reading the document again as a tree of spans ([`Node`]), or, when it
/// is not even TOML, from the lines above the error.
fn toml_error(e: &toml::de::Error, text: &str, file: Option<&Path>) -> ConfigError {
    let message = outbox_proto::one_line(e.message());
    let at = e
        .span()
        .map(|span| outbox_proto::char_boundary(text, span.start));
    let key = at
        .and_then(|at| match toml::from_str::<Node>(text) {
            Ok(root) => {
                let mut path = String::new();
                // "missing field `x`" spans the table that lacks it: the
                // key is that table's path and the field.
                match message
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.split('`').next())
                {
                    Some(field) => {
                        if let Some(span) = e.span() {
                            root.locate(span, false, &mut path);
                        }
                        push_key(&mut path, field);
                    }
                    None => root.locate(at..at + 1, true, &mut path),
                }
                Some(path)
            }
            Err(_) => key_above(text, at),
        })
        .filter(|key| !key.is_empty())
        .unwrap_or_else(|| match file {
            Some(f) => f.display().to_string(),
            None => "config".to_string(),
        });
    // A field missing from the file's top level has no place of its own
    // (its span is the whole file): the file is the place.
    let at = at.filter(|_| !message.starts_with("missing field") || key.contains('.'));
    let place = at.map(|at| {
        let (line, column) = outbox_proto::line_column(text, at);
        format!("line {line}, column {column}")
    });
    let place = match (file, place) {
        (Some(f), Some(p)) => format!(" ({}, {p})", f.display()),
        (Some(f), None) => format!(" ({})", f.display()),
        (None, Some(p)) => format!(" ({p})"),
        (None, None) => String::new(),
    };
    err(key, format!("{message}{place}"))
}

/// A TOML document as the spans of its keys and values, to find the key
/// path at a byte offset. String values are kept: an element of an array
/// of tables is named by its `name`, as validation names it.
enum Node {
    Table(Vec<(toml::Spanned<String>, toml::Spanned<Node>)>),
    Array(Vec<toml::Spanned<Node>>),
    Str(String),
    Other,
}

impl Node {
    /// Appends to `path` the keys down to the narrowest value (or key, when
    /// `keys`) that holds all of `span`: for a byte the parser stopped at,
    /// `at..at + 1` and keys too; for a missing field, the span of the
    /// table that lacks it and values only.
    fn locate(&self, span: std::ops::Range<usize>, keys: bool, path: &mut String) {
        let holds =
            |outer: &std::ops::Range<usize>| outer.start <= span.start && span.end <= outer.end;
        let len = |outer: &std::ops::Range<usize>| outer.end - outer.start;
        match self {
            Node::Table(entries) => {
                let hit = entries
                    .iter()
                    .flat_map(|(k, v)| {
                        let key = keys.then(|| (k.span(), k.get_ref(), None));
                        key.into_iter()
                            .chain([(v.span(), k.get_ref(), Some(v.get_ref()))])
                    })
                    .filter(|(outer, _, _)| holds(outer))
                    .min_by_key(|(outer, _, _)| len(outer));
                if let Some((_, key, value)) = hit {
                    push_key(path, key);
                    if let Some(value) = value {
                        value.locate(span, keys, path);
                    }
                }
            }
            Node::Array(items) => {
                let hit = items
                    .iter()
                    .enumerate()
                    .filter(|(_, item)| holds(&item.span()))
                    .min_by_key(|(_, item)| len(&item.span()));
                if let Some((i, item)) = hit {
                    path.push_str(&format!("[{}]", item.get_ref().label(i)));
                    item.get_ref().locate(span, keys, path);
                }
            }
            Node::Str(_) | Node::Other => {}
        }
    }

    /// How element `i` of an array is named: a table by its `name` (or
    /// `#n`, counted from 1, as validation does), anything else by index.
    fn label(&self, i: usize) -> String {
        let Node::Table(entries) = self else {
            return i.to_string();
        };
        entries
            .iter()
            .find_map(|(k, v)| match v.get_ref() {
                Node::Str(name) if k.get_ref() == "name" && !name.is_empty() => Some(name.clone()),
                _ => None,
            })
            .unwrap_or_else(|| format!("#{}", i + 1))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Node, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any TOML value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::Other)
            }
            fn visit_str<E>(self, s: &str) -> Result<Node, E> {
                Ok(Node::Str(s.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Node::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Node::Table(entries))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

/// The key path at offset `at` of a text that is not valid TOML, as well as
/// its lines tell: the last table header above it and the last key
/// assigned there, skipping the lines of an array or inline table still
/// open (its key is the one that opened it).
fn key_above(text: &str, at: usize) -> Option<String> {
    let mut table = String::new();
    let mut key = None;
    let mut counts = BTreeMap::<String, usize>::new();
    // Brackets and braces open across lines, outside strings and comments.
    let mut depth = 0usize;
    let mut start = 0;
    for line in text.split_inclusive('\n') {
        if start > at {
            break;
        }
        start += line.len();
        let line = line.trim();
        let value = if depth > 0 {
            line
        } else if let Some(header) = line.strip_prefix("[[") {
            let name = header.split("]]").next().unwrap_or(header).trim();
            let n = counts.entry(name.to_string()).or_default();
            *n += 1;
            table = format!("{name}[#{n}]");
            key = None;
            continue;
        } else if let Some(header) = line.strip_prefix('[') {
            table = header
                .split(']')
                .next()
                .unwrap_or(header)
                .trim()
                .to_string();
            key = None;
            continue;
        } else if let Some((name, value)) = line.split_once('=') {
            let name = name.trim();
            let plausible = !name.is_empty()
                && name.chars().all(|c| {
                    c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | '\'' | ' ')
                });
            if plausible {
                key = Some(name.to_string());
            }
            value
        } else {
            continue;
        };
        let mut quote = None;
        for c in value.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => depth += 1,
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    let mut path = table;
    if let Some(key) = key {
        push_key(&mut path, &key);
    }
    Some(path)
}

fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"16MiB\""))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return Err(format!("{text:?} is not a size like \"16MiB\"")),
    };
    Ok(n.saturating_mul(mult))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_ca(extra: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["outbox-ca".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let text = format!(
            "name = \"dc1\"\ntoken = \"t\"\ndaemons = [\"127.0.0.1:4433\"]\nserver_ca = {:?}\n{extra}",
            ca.display().to_string()
        );
        (dir, text)
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let (_d, text) = with_ca("");
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.name, "dc1");
        assert_eq!(c.concurrency, 64);
        assert_eq!(c.max_body, 16 << 20);
        assert!(c.allow.is_empty());
        assert_eq!(format!("{:?}", c.token), "***");
        assert_eq!(c.daemons[0].port, 4433);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("allow = [\"jira\"]", "allow[0]"),
            ("concurrency = 0", "concurrency"),
            ("[log]\nlevel = \"loud\"", "log.level"),
            ("max_body = \"big\"", "max_body"),
            ("max_body = \"0\"", "max_body"),
            ("allow = [\"127.0.0.1:0\"]", "allow[0]"),
            ("colour = 1", "colour"),
            (
                "[[protocol_profile]]\nname = \"p\"\nclient_cert = \"/nonexistent\"\nclient_key = \"/nonexistent\"",
                "protocol_profile[p].client_cert",
            ),
            ("[log]\nformat = \"xml\"", "log.format"),
        ];
        for (extra, key) in cases {
            let (_d, text) = with_ca(extra);
            let e = Config::parse(&text).expect_err(extra);
            assert_eq!(e.key, key, "{extra}: {e}");
        }
        let e = Config::parse("name = \"dc1\"\ntoken = { env = \"SURELY_UNSET_RELAY_VAR\" }\ndaemons = []\nserver_ca = \"/x\"").unwrap_err();
        assert_eq!(e.key, "token");
        let (_d, text) = with_ca("");
        let e = Config::parse(&text.replace("127.0.0.1:4433", "nowhere")).unwrap_err();
        assert_eq!(e.key, "daemons[0]");
        let e = Config::parse(&text.replace("127.0.0.1:4433", "127.0.0.1:0")).unwrap_err();
        assert_eq!(e.key, "daemons[0]");
        let (_d, port_zero) = with_ca("allow = [\"jira.internal:0\"]");
        let e = Config::parse(&port_zero).unwrap_err();
        assert_eq!(
            e.to_string(),
            "allow[0]: \"jira.internal:0\" names port 0, which nothing listens on"
        );
        assert!(
            e.problem
                .ends_with("names port 0, which nothing listens on"),
            "{e}"
        );
        let twice = text.replace(
            "\"127.0.0.1:4433\"",
            "\"127.0.0.1:4433\", \"127.0.0.1:4433\"",
        );
        let e = Config::parse(&twice).unwrap_err();
        assert_eq!(e.key, "daemons[1]", "{e}");
        assert!(e.problem.contains("listed already, as daemons[0]"), "{e}");
    }

    #[test]
    fn a_blank_token_is_refused_in_every_form() {
        let (dir, text) = with_ca("");
        let blank_file = dir.path().join("relay-token");
        std::fs::write(&blank_file, " \n").unwrap();
        let forms = [
            ("\"\"".to_string(), "is empty".to_string()),
            ("\" \t\"".to_string(), "is empty".to_string()),
            (
                format!("{{ file = {:?} }}", blank_file.display().to_string()),
                format!("secret file {} is empty", blank_file.display()),
            ),
        ];
        for (token, problem) in forms {
            let text = text.replace("token = \"t\"", &format!("token = {token}"));
            let e = Config::parse(&text).expect_err(&text);
            assert_eq!(
                (e.key.as_str(), e.problem.as_str()),
                ("token", problem.as_str())
            );
        }
        // An environment variable set but empty gets the same words: the
        // secret is read as the daemon reads it (`outbox_secret`, whose own
        // tests cover that case without changing the process environment).
    }

    #[test]
    fn the_token_is_read_as_the_daemon_reads_its_tokens() {
        let (dir, text) = with_ca("");
        let file = dir.path().join("relay-token");
        // Extra blank lines, as an editor may leave them, are no part of
        // the token: the daemon reading the same file gets the same one.
        std::fs::write(&file, "tok\n\n").unwrap();
        let with = |token: String| text.replace("token = \"t\"", &format!("token = {token}"));
        let c = Config::parse(&with(format!(
            "{{ file = {:?} }}",
            file.display().to_string()
        )))
        .unwrap();
        assert_eq!(c.token.expose(), "tok");
        let c = Config::parse(&with("\" tok \"".into())).unwrap();
        assert_eq!(c.token.expose(), "tok");
        // The mask an export writes is no token.
        let e = Config::parse(&with("\"***\"".into())).unwrap_err();
        assert_eq!(e.key, "token", "{e}");
        assert!(e.problem.contains("secret is masked"), "{e}");
    }

    #[test]
    fn toml_errors_name_the_key_file_line_and_column() {
        let (dir, text) = with_ca("");
        let path = dir.path().join("relay.toml");
        let cases = [
            // Not TOML at all: an array left open, at the end and before
            // other keys.
            (
                "name = \"dc1\"\ntoken = [\n".to_string(),
                "token",
                "invalid array, expected `]`",
                "line 2, column 10",
            ),
            (
                text.replace("token = \"t\"", "token = [ # open"),
                "token",
                "expected `]`",
                "line 3, column 1",
            ),
            (
                format!("{text}concurrency = \"64\"\n"),
                "concurrency",
                "invalid type: string \"64\", expected u32",
                "line 5, column 15",
            ),
            (
                format!(
                    "{text}[[protocol_profile]]\nname = \"a\"\nca = \"/a\"\n\n\
                     [[protocol_profile]]\nname = \"p\"\nclient_crt = \"x\"\n"
                ),
                "protocol_profile[p].client_crt",
                "unknown field `client_crt`",
                "line 11, column 1",
            ),
            (
                text.replace("name = \"dc1\"\n", ""),
                "name",
                "missing field `name`",
                "",
            ),
            (
                format!("{text}[[protocol_profile]]\nclient_cert = \"x\"\n"),
                "protocol_profile[#1].name",
                "missing field `name`",
                "line 5, column 1",
            ),
            (
                format!("{text}[log]\nlevel = 5\n"),
                "log.level",
                "invalid type: integer `5`",
                "line 6, column 9",
            ),
            (
                format!("{text}allow = [\n  \"10.0.0.0/8\",\n  5,\n]\n"),
                "allow[1]",
                "invalid type: integer `5`",
                "line 7, column 3",
            ),
            (
                text.replace("token = \"t\"", "token = { env = 5 }"),
                "token.env",
                "invalid type: integer `5`, expected a string",
                "line 2, column 17",
            ),
            (
                text.replace("token = \"t\"", "token = { env = \"T\", file = \"t\" }"),
                "token",
                "a secret takes one of `env` and `file`, not both",
                "line 2, column 9",
            ),
            (
                text.replace("token = \"t\"", "token = { enb = \"T\" }"),
                "token",
                "unknown key `enb` in a secret",
                "line 2, column 9",
            ),
        ];
        for (text, key, message, place) in cases {
            std::fs::write(&path, &text).unwrap();
            let e = Config::load(&path).expect_err(&text);
            assert_eq!(e.key, key, "{text}\n{e}");
            assert!(e.problem.contains(message), "{e}");
            let at = match place {
                "" => format!("({})", path.display()),
                place => format!("({}, {place})", path.display()),
            };
            assert!(e.problem.ends_with(&at), "{e}\nshould end with {at}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
    }
}
