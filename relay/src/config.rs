//! The relay's configuration (SPEC §9): parsed with unknown keys refused,
//! then validated — token read, daemon addresses and allow-list parsed,
//! certificate files checked — before any connection is attempted.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// A secret: a literal, `{ env = "NAME" }` or `{ file = "PATH" }` (a relative
/// file is looked up under `$CREDENTIALS_DIRECTORY` first).
#[derive(Clone, Deserialize)]
#[serde(untagged)]
enum Secret {
    Literal(String),
    Env { env: String },
    File { file: PathBuf },
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Literal(_) => f.write_str("***"),
            Secret::Env { env } => write!(f, "env:{env}"),
            Secret::File { file } => write!(f, "file:{}", file.display()),
        }
    }
}

impl Secret {
    fn resolve(&self) -> Result<String, String> {
        match self {
            Secret::Literal(s) => Ok(s.clone()),
            Secret::Env { env } => {
                std::env::var(env).map_err(|_| format!("environment variable {env} is not set"))
            }
            Secret::File { file } => {
                let path = match std::env::var_os("CREDENTIALS_DIRECTORY") {
                    Some(dir) if file.is_relative() && Path::new(&dir).join(file).exists() => {
                        Path::new(&dir).join(file)
                    }
                    _ => file.clone(),
                };
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("secret file {} cannot be read: {e}", path.display()))?;
                let value = text.trim_end_matches(['\n', '\r']).to_string();
                if value.is_empty() {
                    return Err(format!("secret file {} is empty", path.display()));
                }
                Ok(value)
            }
        }
    }
}

/// A token whose `Debug` is a mask.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
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
    pub token: Token,
    /// `host:port` of each daemon; the relay keeps a session to each.
    pub daemons: Vec<Daemon>,
    pub server_ca: PathBuf,
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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Profile {
    pub name: String,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

pub mod defaults {
    /// Requests at once: enough for a busy integration host, bounded so a
    /// burst cannot exhaust the private network's targets or our sockets.
    pub const CONCURRENCY: u32 = 64;
    pub const MAX_BODY: &str = "16MiB";
    pub const DRAIN: &str = "30s";
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("--config", format!("{}: {e}", path.display())))?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            let key = msg
                .split('`')
                .nth(1)
                .map(str::to_string)
                .unwrap_or_else(|| "config".to_string());
            err(key, msg.replace('\n', " "))
        })?;
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.len() <= 128
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        if !name_ok(&raw.name) {
            return Err(err(
                "name",
                format!("{:?}: letters, digits, '.', '_' and '-' only", raw.name),
            ));
        }
        let token = Token(raw.token.resolve().map_err(|p| err("token", p))?);
        if raw.daemons.is_empty() {
            return Err(err(
                "daemons",
                "lists no daemon; give at least one host:port",
            ));
        }
        let mut daemons = Vec::new();
        for (i, d) in raw.daemons.iter().enumerate() {
            let (host, port) = d
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                .filter(|(h, _)| !h.is_empty())
                .ok_or_else(|| {
                    err(
                        format!("daemons[{i}]"),
                        format!("{d:?} is not host:port like \"outbox.example.com:4433\""),
                    )
                })?;
            daemons.push(Daemon {
                address: d.clone(),
                host: host.to_string(),
                port,
            });
        }
        readable("server_ca", &raw.server_ca)?;
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
        let drain = humantime::parse_duration(raw.drain.as_deref().unwrap_or(defaults::DRAIN))
            .map_err(|e| err("drain", e.to_string()))?;
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
            if !name_ok(&p.name) {
                return Err(err(
                    format!("{at}.name"),
                    "letters, digits, '.', '_' and '-' only",
                ));
            }
            match (&p.client_cert, &p.client_key) {
                (Some(c), Some(k)) => {
                    readable(&format!("{at}.client_cert"), c)?;
                    readable(&format!("{at}.client_key"), k)?;
                }
                (None, None) if p.ca.is_some() => {}
                _ => {
                    return Err(err(
                        at,
                        "needs client_cert and client_key together (and/or ca)",
                    ))
                }
            }
            if let Some(ca) = &p.ca {
                readable(&format!("{at}.ca"), ca)?;
            }
            if protocol_profiles.contains_key(&p.name) {
                return Err(err(at, "is defined more than once"));
            }
            protocol_profiles.insert(
                p.name.clone(),
                Profile {
                    name: p.name,
                    client_cert: p.client_cert,
                    client_key: p.client_key,
                    ca: p.ca,
                },
            );
        }
        let log_level = raw.log.level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| err("log.level", format!("{log_level:?}: {e}")))?;
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
            server_ca: raw.server_ca,
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

fn readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::metadata(path)
        .map(|_| ())
        .map_err(|e| err(key, format!("{} cannot be read: {e}", path.display())))
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
        std::fs::write(&ca, "x").unwrap();
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
            ("max_body = \"big\"", "max_body"),
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
    }
}
