//! The daemon's configuration: parsed, then validated into typed values.
//!
//! Three phases, so that everything a file can get wrong is found before a
//! port is bound: [`RawConfig`] is what serde reads (unknown keys refused),
//! [`Config::load`] validates it into durations, socket addresses and read
//! secrets, and only then does the daemon open its store and listen.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::units::{parse_duration, parse_size};
use outbox_secret::{Secret, SecretValue};

/// The prefix of environment overrides (`OUTBOX_API__LISTEN`).
pub const ENV_PREFIX: &str = "OUTBOX";

/// Name of the generated API token file inside the data dir.
pub const TOKEN_FILE: &str = "api-token";

/// A configuration problem: the key and what is wrong with it, in one line.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    /// The error, saying so when its key was set by an environment
    /// variable among `env`: the file a user would look in may not have it.
    fn naming_its_variable(mut self, env: &config::Map<String, String>) -> ConfigError {
        // `apply[0]` is set by OUTBOX_APPLY; `mid_servers.dc1.token` may be
        // set by OUTBOX_MID_SERVERS__DC1__TOKEN__ENV.
        let key = self.key.split('[').next().unwrap_or_default();
        let variable = format!(
            "{ENV_PREFIX}_{}",
            key.replace('.', "__").to_ascii_uppercase()
        );
        let below = format!("{variable}__");
        let set_by = env
            .keys()
            .filter(|k| **k == variable || k.starts_with(&below))
            .min();
        if let Some(set_by) = set_by {
            self.problem = format!(
                "{} (set by the environment variable {set_by})",
                self.problem
            );
        }
        self
    }
}

fn err(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The file as written, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    instance_name: Option<String>,
    data_dir: Option<String>,
    retention: Option<String>,
    shutdown_grace: Option<String>,
    #[serde(default)]
    apply: Vec<String>,
    #[serde(default)]
    api: RawApi,
    inbound: Option<RawInbound>,
    tunnel: Option<RawTunnel>,
    #[serde(default)]
    mid_servers: BTreeMap<String, RawMidServer>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    store: RawStore,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<String>,
    token: Option<Secret>,
    max_body: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    listen: Option<String>,
    cert: String,
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMidServer {
    token: Secret,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    cache_capacity: Option<String>,
}

/// The validated configuration the daemon runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The instance-name guard's property (SPEC §3.4).
    pub instance_name: String,
    pub data_dir: PathBuf,
    /// How long sent and ignored messages are kept.
    pub retention: Duration,
    /// How long in-flight requests may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Integration files (glob patterns) applied at start and on SIGHUP.
    pub apply: Vec<String>,
    pub api: ApiConfig,
    pub inbound: Option<SocketAddr>,
    pub tunnel: Option<TunnelConfig>,
    pub mid_servers: BTreeMap<String, MidServerConfig>,
    pub log: LogConfig,
    /// sled page cache in bytes.
    pub cache_capacity: u64,
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// From the config; `None` means "use or generate `data_dir/api-token`".
    pub token: Option<SecretValue>,
    /// Largest request body the API accepts (413 above it).
    pub max_body: usize,
}

#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The TLS settings made from `cert` and `key` when the config was
    /// checked: the endpoint is built from them, without reading the files
    /// again.
    pub tls: Arc<rustls::ServerConfig>,
}

#[derive(Debug, Clone)]
pub struct MidServerConfig {
    pub token: SecretValue,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Defaults, named so the README and the code agree.
pub mod defaults {
    pub const DATA_DIR: &str = "./outbox-data";
    pub const RETENTION: &str = "7d";
    pub const SHUTDOWN_GRACE: &str = "30s";
    pub const API_LISTEN: &str = "127.0.0.1:8425";
    /// Large enough for any sensible message, small enough that a runaway
    /// producer cannot fill memory with one request.
    pub const API_MAX_BODY: &str = "4MiB";
    pub const TUNNEL_LISTEN: &str = "0.0.0.0:4433";
    pub const LOG_LEVEL: &str = "info";
    /// sled's default page cache is 1 GiB; 64 MiB keeps the daemon's memory
    /// small while holding the hot part of a queue of a few hundred thousand
    /// messages.
    pub const CACHE_CAPACITY: &str = "64MiB";
}

impl Config {
    /// Loads the optional file plus `OUTBOX_*` overrides from `env`, then
    /// validates. `env` is passed in so tests need not touch the process
    /// environment.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env = overrides(env);
        Self::read(file, env.clone())
            .and_then(Self::validate)
            .map_err(|e| e.naming_its_variable(&env))
    }

    fn read(
        file: Option<&Path>,
        env: config::Map<String, String>,
    ) -> Result<RawConfig, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(err(
                    "--config",
                    format!("file {} does not exist", path.display()),
                ));
            }
            builder = builder.add_source(
                config::File::from(path.to_path_buf()).format(config::FileFormat::Toml),
            );
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("apply")
                // List parsing only happens with try_parsing on; numbers and
                // booleans it produces still deserialize into string keys.
                .try_parsing(true)
                .source(Some(env)),
        );
        let merged = builder.build().map_err(|e| from_config_error(e, file))?;
        merged
            .try_deserialize::<RawConfig>()
            .map_err(|e| from_config_error(e, file))
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let instance_name = match raw.instance_name {
            Some(name) if name.trim().is_empty() => {
                return Err(err("instance_name", "must not be blank"))
            }
            Some(name) => name,
            None => host_name(),
        };
        let duration = |key: &str, value: Option<String>, default: &str| {
            let text = value.unwrap_or_else(|| default.to_string());
            parse_duration(&text).map_err(|p| err(key, p))
        };
        let retention = duration("retention", raw.retention, defaults::RETENTION)?;
        let shutdown_grace = duration(
            "shutdown_grace",
            raw.shutdown_grace,
            defaults::SHUTDOWN_GRACE,
        )?;
        for (i, pattern) in raw.apply.iter().enumerate() {
            glob::Pattern::new(pattern)
                .map_err(|e| err(format!("apply[{i}]"), format!("{pattern:?}: {e}")))?;
        }

        let listen = socket_addr(
            "api.listen",
            raw.api.listen.as_deref().unwrap_or(defaults::API_LISTEN),
        )?;
        let token = match raw.api.token {
            Some(secret) => Some(resolve_token("api.token", &secret)?),
            None => None,
        };
        let max_body = parse_size(
            raw.api
                .max_body
                .as_deref()
                .unwrap_or(defaults::API_MAX_BODY),
        )
        .map_err(|p| err("api.max_body", p))? as usize;

        let inbound = raw
            .inbound
            .map(|i| socket_addr("inbound.listen", &i.listen))
            .transpose()?;
        let tunnel = match raw.tunnel {
            Some(t) => {
                let listen = socket_addr(
                    "tunnel.listen",
                    t.listen.as_deref().unwrap_or(defaults::TUNNEL_LISTEN),
                )?;
                let cert = readable_file("tunnel.cert", &t.cert)?;
                let key = readable_file("tunnel.key", &t.key)?;
                // A certificate and key that do not make a pair are a
                // configuration error (exit 2), found before anything is
                // bound.
                let tls = Arc::new(tunnel_tls(&cert, &key)?);
                Some(TunnelConfig {
                    listen,
                    cert,
                    key,
                    tls,
                })
            }
            None => None,
        };
        let mut mid_servers = BTreeMap::new();
        for (name, mid) in raw.mid_servers {
            if !crate::model::valid_name(&name) {
                return Err(err(
                    format!("mid_servers.{name}"),
                    "a MID server name uses letters, digits, '.', '_' and '-' only",
                ));
            }
            let token = resolve_token(&format!("mid_servers.{name}.token"), &mid.token)?;
            mid_servers.insert(name, MidServerConfig { token });
        }
        // Relays reach the daemon only through the tunnel: without it, every
        // message through a MID server would wait for a relay that cannot
        // connect.
        if let (None, Some(name)) = (&tunnel, mid_servers.keys().next()) {
            return Err(err(
                "tunnel",
                format!(
                    "is not configured, but mid_servers.{name} is: the tunnel must be configured \
                     for MID servers to connect (a [tunnel] section with cert and key; \
                     `outbox pki init DIR` writes both)"
                ),
            ));
        }

        let level = raw
            .log
            .level
            .unwrap_or_else(|| defaults::LOG_LEVEL.to_string());
        tracing_subscriber::EnvFilter::try_new(&level).map_err(|e| {
            err(
                "log.level",
                format!("{level:?} is not a tracing filter: {e}"),
            )
        })?;
        // A bare word is a valid filter (it enables one target) but never
        // what is meant: `level = "loud"` would log nothing at all.
        if let Some(word) = outbox_proto::bare_log_word(&level) {
            let not_a_level = outbox_proto::NOT_A_LOG_LEVEL;
            return Err(err("log.level", format!("{word:?} {not_a_level}")));
        }
        let format = match raw.log.format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(err(
                    "log.format",
                    format!("{other:?} is not one of \"text\", \"json\""),
                ))
            }
        };
        let cache_capacity = parse_size(
            raw.store
                .cache_capacity
                .as_deref()
                .unwrap_or(defaults::CACHE_CAPACITY),
        )
        .map_err(|p| err("store.cache_capacity", p))?;

        Ok(Config {
            instance_name,
            data_dir: PathBuf::from(raw.data_dir.unwrap_or_else(|| defaults::DATA_DIR.into())),
            retention,
            shutdown_grace,
            apply: raw.apply,
            api: ApiConfig {
                listen,
                token,
                max_body,
            },
            inbound,
            tunnel,
            mid_servers,
            log: LogConfig { level, format },
            cache_capacity,
        })
    }

    /// The files the `apply` patterns name now, sorted, so they apply in a
    /// stable order.
    pub fn apply_files(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let mut files = Vec::new();
        for (i, pattern) in self.apply.iter().enumerate() {
            let paths =
                glob::glob(pattern).map_err(|e| err(format!("apply[{i}]"), e.to_string()))?;
            for path in paths {
                files.push(path.map_err(|e| err(format!("apply[{i}]"), e.to_string()))?);
            }
        }
        files.sort();
        files.dedup();
        Ok(files)
    }
}

/// The process environment's `OUTBOX_*` variables that name config keys.
///
/// The same prefix also carries the CLI's `OUTBOX_API` and `OUTBOX_TOKEN`
/// and, by convention, secrets such as `OUTBOX_MID_DC1_TOKEN`; those are not
/// config keys. An override is therefore either a known top-level key or has
/// a `__` section separator; anything else is left alone rather than
/// refused as an unknown key.
fn overrides(env: impl IntoIterator<Item = (String, String)>) -> config::Map<String, String> {
    const TOP_LEVEL: [&str; 5] = [
        "INSTANCE_NAME",
        "DATA_DIR",
        "RETENTION",
        "SHUTDOWN_GRACE",
        "APPLY",
    ];
    let prefix = format!("{ENV_PREFIX}_");
    env.into_iter()
        .filter(|(k, _)| {
            k.strip_prefix(&prefix)
                .is_some_and(|rest| rest.contains("__") || TOP_LEVEL.contains(&rest))
        })
        .collect()
}

fn from_config_error(e: config::ConfigError, file: Option<&Path>) -> ConfigError {
    let text = e.to_string();
    // The config crate words unknown keys as "unknown field `x`, expected ..."
    // and type errors "... for key `a.b` in FILE"; keep that, but on one line
    // and with the file named once.
    let between = |marker: &str| {
        text.split(marker)
            .nth(1)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string)
    };
    let key = match (between("unknown field `"), between("for key `")) {
        (Some(field), Some(section)) => Some(format!("{section}.{field}")),
        (Some(field), None) => Some(field),
        (None, section) => section,
    }
    .unwrap_or_else(|| {
        file.map(|f| f.display().to_string())
            .unwrap_or_else(|| "config".into())
    });
    let mut problem = one_line(&text);
    // The crate ends some messages with the key, which leads the error.
    problem = problem.replace(&format!(" for key `{key}`"), "");
    // A parse error's key is the file, which the crate also names last.
    // (The crate may name it by a relative path.)
    if let Some(f) = file.filter(|f| key == f.display().to_string()) {
        if let Some((kept, named)) = problem.rsplit_once(" in ") {
            if Path::new(named).file_name() == f.file_name() {
                problem = kept.to_string();
            }
        }
    }
    err(key, problem)
}

/// A config error on one line. A TOML parse error's picture of the line
/// with a caret under the column (lines that start with `|`) is left out:
/// the first line says where, the rest what.
fn one_line(text: &str) -> String {
    let mut parts = text.lines().filter(|l| {
        let l = l
            .trim_start()
            .trim_start_matches(|c: char| c.is_ascii_digit());
        !l.trim_start().starts_with('|')
    });
    let first = parts.next().unwrap_or_default().trim().to_string();
    let rest: Vec<&str> = parts.map(str::trim).filter(|l| !l.is_empty()).collect();
    if rest.is_empty() {
        first
    } else if first.starts_with("TOML parse error at") {
        format!("{first}: {}", rest.join(" "))
    } else {
        format!("{first} {}", rest.join(" "))
    }
}

fn socket_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        err(
            key,
            format!("{text:?} is not a socket address like \"127.0.0.1:8425\""),
        )
    })
}

/// A token of the config (`api.token`, `mid_servers.NAME.token`): read now,
/// without the whitespace around it, and refused when blank (see
/// [`Secret::resolve_token`]).
fn resolve_token(key: &str, secret: &Secret) -> Result<SecretValue, ConfigError> {
    secret.resolve_token().map_err(|e| err(key, e.to_string()))
}

/// The TLS settings the tunnel listens with: TLS 1.3, the tunnel's ALPN,
/// and the certificate chain of `tunnel.cert` with the private key of
/// `tunnel.key`, checked to be a pair. [`Config::load`] builds it, so a
/// wrong pair is a configuration error before any socket is bound, and
/// keeps it in [`TunnelConfig::tls`] for the listener.
fn tunnel_tls(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, ConfigError> {
    use rustls::pki_types::pem::{self, PemObject};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_path = cert.display();
    let key_path = key.display();
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err("tunnel.cert", format!("{cert_path}: {e}")))?;
    if certs.is_empty() {
        return Err(err(
            "tunnel.cert",
            format!("{cert_path} holds no PEM certificate"),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            err("tunnel.key", format!("{key_path} holds no PEM private key"))
        }
        other => err("tunnel.key", format!("{key_path}: {other}")),
    })?;
    let provider = outbox_remote::tls::provider();
    // Loaded once on its own so that a key rustls cannot use is reported
    // as the key's problem, not the pair's.
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| err("tunnel.key", format!("{key_path}: {e}")))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err("tunnel", format!("TLS 1.3: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => err(
                "tunnel.key",
                format!("{key_path} is not the private key of the certificate in {cert_path} (tunnel.cert)"),
            ),
            other => err("tunnel.cert", format!("{cert_path}: {other}")),
        })?;
    tls.alpn_protocols = vec![outbox_proto::ALPN.to_vec()];
    Ok(tls)
}

fn readable_file(key: &str, path: &str) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(path);
    std::fs::metadata(&path)
        .map_err(|e| err(key, format!("{} cannot be read: {e}", path.display())))?;
    Ok(path)
}

/// The machine's host name, the default `instance_name`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outboxd.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path), Vec::new())
    }

    #[test]
    fn a_toml_parse_error_is_one_readable_line() {
        let e = load_str("instance_name = \"walk\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("outboxd.toml: TOML parse error at line 1, column 22: invalid basic string"),
            "{e}"
        );
        assert!(!e.contains('|') && !e.contains('\n'), "{e}");
        assert!(!e.ends_with("outboxd.toml"), "the file is named once: {e}");
    }

    #[test]
    fn runs_on_defaults_without_a_file() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c.api.listen, "127.0.0.1:8425".parse().unwrap());
        assert_eq!(c.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.data_dir, PathBuf::from("./outbox-data"));
        assert!(c.api.token.is_none());
        assert!(!c.instance_name.is_empty());
        assert_eq!(c.log.format, LogFormat::Text);
    }

    #[test]
    fn an_error_in_a_key_set_by_the_environment_names_the_variable() {
        let cases = [
            ("OUTBOX_LOG__LEVL", "debug", "log.levl"),
            ("OUTBOX_API__LISTEN", "nonsense", "api.listen"),
            ("OUTBOX_RETENTION", "forever", "retention"),
            ("OUTBOX_APPLY", "[bad", "apply[0]"),
        ];
        for (variable, value, key) in cases {
            let env = vec![(variable.to_string(), value.to_string())];
            let e = Config::load(None, env).unwrap_err();
            assert_eq!(e.key, key, "{e}");
            assert!(
                e.problem
                    .ends_with(&format!("(set by the environment variable {variable})")),
                "{e}"
            );
        }
        // A key from the file is not said to come from the environment.
        let e = load_str("retention = \"forever\"").unwrap_err();
        assert!(!e.problem.contains("environment"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outboxd.toml");
        std::fs::write(&path, "[api]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        let env = vec![
            (
                "OUTBOX_API__LISTEN".to_string(),
                "127.0.0.1:9999".to_string(),
            ),
            ("OUTBOX_INSTANCE_NAME".to_string(), "acme-dev".to_string()),
            (
                "OUTBOX_APPLY".to_string(),
                "/a/*.toml,/b/*.toml".to_string(),
            ),
            ("OUTBOX_RETENTION".to_string(), "3d".to_string()),
            // Not config keys: the CLI's variables and a secret.
            ("OUTBOX_API".to_string(), "http://x".to_string()),
            ("OUTBOX_TOKEN".to_string(), "t".to_string()),
            ("OUTBOX_MID_DC1_TOKEN".to_string(), "t".to_string()),
        ];
        let c = Config::load(Some(&path), env).unwrap();
        assert_eq!(c.api.listen, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(c.instance_name, "acme-dev");
        assert_eq!(c.apply, ["/a/*.toml", "/b/*.toml"]);
        assert_eq!(c.retention, Duration::from_secs(3 * 86_400));
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases = [
            ("retention = \"forever\"", "retention"),
            ("[api]\nlisten = \"localhost\"", "api.listen"),
            ("[log]\nlevel = \"loud\"", "log.level"),
            ("[api]\nlisten = \"127.0.0.1:1\"\nlisen = 1", "api.lisen"),
            ("colour = \"blue\"", "colour"),
            (
                "[api]\ntoken = { env = \"OUTBOX_TEST_SURELY_UNSET_VAR\" }",
                "api.token",
            ),
            (
                "[api]\ntoken = { file = \"/nonexistent/token\" }",
                "api.token",
            ),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("[log]\nlevel = \"[[[\"", "log.level"),
            ("instance_name = \"  \"", "instance_name"),
            (
                "[mid_servers.dc1]\ntoken = { env = \"OUTBOX_TEST_SURELY_UNSET_VAR\" }",
                "mid_servers.dc1.token",
            ),
            ("[store]\ncache_capacity = \"big\"", "store.cache_capacity"),
            (
                "[tunnel]\ncert = \"/nonexistent.crt\"\nkey = \"/nonexistent.key\"",
                "tunnel.cert",
            ),
        ];
        for (text, key) in cases {
            let e = load_str(text).expect_err(text);
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }

    /// A certificate and its key, and a second key that is not its, written
    /// into `dir`: (cert, key, other key).
    fn tunnel_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let files = (
            dir.join("daemon.crt"),
            dir.join("daemon.key"),
            dir.join("other.key"),
        );
        std::fs::write(&files.0, pair.cert.pem()).unwrap();
        std::fs::write(&files.1, pair.key_pair.serialize_pem()).unwrap();
        std::fs::write(&files.2, other.serialize_pem()).unwrap();
        files
    }

    fn tunnel_section(cert: &Path, key: &Path) -> String {
        format!(
            "[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        )
    }

    #[test]
    fn blank_tokens_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = tunnel_files(dir.path());
        let tunnel = tunnel_section(&cert, &key);
        let blank_file = dir.path().join("blank-token");
        std::fs::write(&blank_file, "  \n").unwrap();
        let cases = [
            (
                "[mid_servers.dc1]\ntoken = \"\"".to_string(),
                "mid_servers.dc1.token",
            ),
            (
                "[mid_servers.dc1]\ntoken = \" \t\"".to_string(),
                "mid_servers.dc1.token",
            ),
            (
                format!(
                    "[mid_servers.dc1]\ntoken = {{ file = {:?} }}",
                    blank_file.display().to_string()
                ),
                "mid_servers.dc1.token",
            ),
            ("[api]\ntoken = \"\"".to_string(), "api.token"),
        ];
        for (section, key) in cases {
            let text = format!("{tunnel}{section}");
            let e = load_str(&text).expect_err(&text);
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.problem.contains("is empty"), "{e}");
        }
        let ok = load_str(&format!("{tunnel}[mid_servers.dc1]\ntoken = \"t\"")).unwrap();
        assert_eq!(ok.mid_servers["dc1"].token.expose(), "t");
    }

    #[test]
    fn the_tunnel_certificate_and_key_must_be_a_pair() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, other) = tunnel_files(dir.path());
        let c = load_str(&tunnel_section(&cert, &key)).unwrap();
        let tls = &c.tunnel.as_ref().unwrap().tls;
        assert_eq!(tls.alpn_protocols, [outbox_proto::ALPN.to_vec()]);
        let cases = [
            (
                &cert,
                &cert,
                "tunnel.key",
                &cert,
                "holds no PEM private key",
            ),
            (
                &cert,
                &other,
                "tunnel.key",
                &other,
                "is not the private key",
            ),
            (&key, &key, "tunnel.cert", &key, "holds no PEM certificate"),
        ];
        for (cert, key, name, path, problem) in cases {
            let text = tunnel_section(cert, key);
            let e = load_str(&text).expect_err(&text);
            assert_eq!(e.key, name, "{text}: {e}");
            assert!(e.problem.contains(&path.display().to_string()), "{e}");
            assert!(e.problem.contains(problem), "{e}");
        }
    }

    #[test]
    fn mid_servers_need_the_tunnel() {
        let e = load_str("[mid_servers.dc1]\ntoken = \"t\"").unwrap_err();
        assert_eq!(e.key, "tunnel", "{e}");
        assert!(e.problem.contains("mid_servers.dc1"), "{e}");
        assert!(
            e.problem
                .contains("the tunnel must be configured for MID servers to connect"),
            "{e}"
        );
    }

    #[test]
    fn apply_patterns_expand_sorted() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.toml", "a.toml", "c.txt"] {
            std::fs::write(dir.path().join(name), "").unwrap();
        }
        let pattern = format!("{}/*.toml", dir.path().display());
        let c = load_str(&format!("apply = [{pattern:?}]")).unwrap();
        let files = c.apply_files().unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["a.toml", "b.toml"]);
    }
}
