//! Secrets: a literal, an environment variable or a file, never printed.
//!
//! A secret is written as a literal string, `{ env = "NAME" }` or
//! `{ file = "PATH" }`. Its `Debug` and `Display` show only the reference
//! (`env:NAME`, `file:PATH`) or `***` for a literal, so a secret can be logged,
//! exported or returned by the API without leaking.
//!
//! The daemon and the relay both read their secrets here, so a token file
//! the two share reads the same on both sides, and a secret written wrong
//! gets the same words from either.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// What a masked literal looks like in every output.
pub const MASK: &str = "***";

/// A secret value, kept as the reference the user wrote. Read through
/// serde (the daemon's config file and environment, the stored catalog,
/// the relay's file), anything but one of the three forms is refused with
/// what is wrong: another type, an unknown key, an empty table, an empty
/// name, or both `env` and `file`. The daemon's integration files are read
/// by its `apply`'s own walker.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Secret {
    Literal(String),
    Env { env: String },
    File { file: PathBuf },
}

/// A secret's value once read. Only [`SecretValue::expose`] shows it; `Debug`
/// prints the mask.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(value: impl Into<String>) -> Self {
        SecretValue(value.into())
    }

    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("secret file {path} cannot be read: {reason}")]
    FileUnreadable { path: String, reason: String },
    #[error("secret file {0} is empty")]
    FileEmpty(String),
    #[error("environment variable {0} is empty")]
    EnvEmpty(String),
    #[error("is empty")]
    LiteralEmpty,
    #[error("secret is masked (\"***\"): give the value or an env/file reference")]
    Masked,
}

impl Secret {
    /// Reads the secret's value now. A relative file is looked up under
    /// systemd's `$CREDENTIALS_DIRECTORY` first, then relative to the
    /// working directory; one trailing newline is removed from file contents.
    pub fn resolve(&self) -> Result<String, SecretError> {
        match self {
            Secret::Literal(s) if s == MASK => Err(SecretError::Masked),
            Secret::Literal(s) => Ok(s.clone()),
            Secret::Env { env } => {
                std::env::var(env).map_err(|_| SecretError::EnvMissing(env.clone()))
            }
            Secret::File { file } => {
                let path = locate(file);
                let text =
                    std::fs::read_to_string(&path).map_err(|e| SecretError::FileUnreadable {
                        path: looked_at(&path),
                        reason: e.to_string(),
                    })?;
                let value = text.strip_suffix('\n').unwrap_or(&text);
                let value = value.strip_suffix('\r').unwrap_or(value);
                if value.is_empty() {
                    return Err(SecretError::FileEmpty(path.display().to_string()));
                }
                Ok(value.to_string())
            }
        }
    }

    /// Reads a token: the daemon's API token and a MID server's token,
    /// which the daemon compares with what a client or a relay presents,
    /// and the relay's token, which it presents. As [`Secret::resolve`],
    /// but without whitespace around it (a file's extra newlines, a space
    /// in a variable), and a value that is empty or only whitespace is
    /// refused, whichever form gave it.
    ///
    /// Whitespace around a token is never part of it: HTTP drops it from
    /// an `Authorization` header anyway, and a relay and a daemon reading
    /// one token from differently written places must agree on it. An
    /// empty token keeps nobody out who presents an empty one (for the
    /// API, `Authorization: Bearer ` with nothing after it), and it is
    /// always a mistake, such as a variable exported empty. Passwords and
    /// client secrets keep [`Secret::resolve`]: an empty password is a real
    /// thing (some services take an API key as the basic-auth user name and
    /// an empty password), and those are the remote system's to judge.
    pub fn resolve_token(&self) -> Result<SecretValue, SecretError> {
        self.resolve()
            .and_then(|value| self.non_blank(value))
            .map(SecretValue)
    }

    /// `value`, read from this secret, without the whitespace around it,
    /// unless that leaves nothing.
    fn non_blank(&self, value: String) -> Result<String, SecretError> {
        let trimmed = value.trim();
        if !trimmed.is_empty() {
            return Ok(match trimmed.len() == value.len() {
                true => value,
                false => trimmed.to_string(),
            });
        }
        Err(match self {
            Secret::Literal(_) => SecretError::LiteralEmpty,
            Secret::Env { env } => SecretError::EnvEmpty(env.clone()),
            Secret::File { file } => SecretError::FileEmpty(locate(file).display().to_string()),
        })
    }

    /// The same reference with a literal value replaced by the mask, for
    /// exports and API answers.
    pub fn masked(&self) -> Secret {
        match self {
            Secret::Literal(_) => Secret::Literal(MASK.to_string()),
            other => other.clone(),
        }
    }

    /// True for the masked literal an export writes.
    pub fn is_mask(&self) -> bool {
        matches!(self, Secret::Literal(s) if s == MASK)
    }

    /// True for an `env` or `file` reference whose name is blank: it names
    /// nothing, and every reader of secrets refuses it.
    pub fn names_nothing(&self) -> bool {
        match self {
            Secret::Env { env } => env.trim().is_empty(),
            Secret::File { file } => file.as_os_str().is_empty(),
            Secret::Literal(_) => false,
        }
    }
}

/// Where a `{ file = .. }` secret is read from: a relative path is tried under
/// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) before the working
/// directory.
fn locate(file: &Path) -> PathBuf {
    if file.is_relative() {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let candidate = Path::new(&dir).join(file);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    file.to_path_buf()
}

/// `path` as an error names it: a relative path with the directory it was
/// looked for in, since a service's working directory is seldom where its
/// user thinks (systemd starts it in `/`).
fn looked_at(path: &Path) -> String {
    let cwd = match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => cwd,
        _ => return path.display().to_string(),
    };
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(creds) => format!(
            "{} (looked for under $CREDENTIALS_DIRECTORY {} and in the working directory {})",
            path.display(),
            Path::new(&creds).display(),
            cwd.display()
        ),
        None => format!(
            "{} (relative to the working directory {})",
            path.display(),
            cwd.display()
        ),
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Literal(_) => f.write_str(MASK),
            Secret::Env { env } => write!(f, "env:{env}"),
            Secret::File { file } => write!(f, "file:{}", file.display()),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a secret may be, as errors say it.
pub const FORMS: &str = "a string, { env = \"NAME\" } or { file = \"PATH\" }";

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        deserializer.deserialize_any(SecretVisitor)
    }
}

struct SecretVisitor;

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a secret: {FORMS}")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Secret, E> {
        Ok(Secret::Literal(value.to_string()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Secret, A::Error> {
        let mut secret = None;
        while let Some(key) = map.next_key::<String>()? {
            let read = match key.as_str() {
                "env" => Secret::Env {
                    env: map.next_value::<String>()?,
                },
                "file" => Secret::File {
                    file: map.next_value::<PathBuf>()?,
                },
                other => {
                    return Err(de::Error::custom(format!(
                        "unknown key `{other}` in a secret: it is {FORMS}"
                    )))
                }
            };
            if read.names_nothing() {
                return Err(de::Error::custom(format!(
                    "`{key}` names nothing: it is {FORMS}"
                )));
            }
            if secret.is_some() {
                return Err(de::Error::custom(
                    "a secret takes one of `env` and `file`, not both",
                ));
            }
            secret = Some(read);
        }
        secret
            .ok_or_else(|| de::Error::custom(format!("an empty table is no secret: it is {FORMS}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_a_literal() {
        let s = Secret::Literal("hunter2".into());
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.to_string(), "***");
        assert_eq!(
            Secret::Env { env: "PW".into() }.to_string(),
            "env:PW".to_string()
        );
        assert_eq!(
            format!("{:?}", Secret::File { file: "a/b".into() }),
            "file:a/b"
        );
    }

    #[test]
    fn file_secret_strips_one_newline_and_reports_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let s = Secret::File { file: path.clone() };
        assert_eq!(s.resolve().unwrap(), "s3cret");
        // A line ending as Windows writes it is one newline too; a second
        // newline is part of the value, for the daemon and the relay alike.
        std::fs::write(&path, "s3cret\r\n").unwrap();
        assert_eq!(s.resolve().unwrap(), "s3cret");
        std::fs::write(&path, "s3cret\n\n").unwrap();
        assert_eq!(s.resolve().unwrap(), "s3cret\n");
        let missing = Secret::File {
            file: dir.path().join("nope"),
        };
        assert!(matches!(
            missing.resolve(),
            Err(SecretError::FileUnreadable { .. })
        ));
        // A relative path says where it was looked for.
        let relative = Secret::File {
            file: "no-such-secret-file".into(),
        };
        let e = relative.resolve().unwrap_err().to_string();
        let cwd = std::env::current_dir().unwrap();
        assert!(
            e.starts_with("secret file no-such-secret-file (")
                && e.contains(&format!("the working directory {})", cwd.display())),
            "{e}"
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(s.resolve(), Err(SecretError::FileEmpty(_))));
    }

    #[test]
    fn a_blank_token_is_refused_in_every_form() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, " \n").unwrap();
        let cases = [
            (Secret::Literal(String::new()), SecretError::LiteralEmpty),
            (Secret::Literal("  ".into()), SecretError::LiteralEmpty),
            (
                Secret::File { file: path.clone() },
                SecretError::FileEmpty(path.display().to_string()),
            ),
        ];
        for (secret, expected) in cases {
            assert_eq!(secret.resolve_token(), Err(expected), "{secret:?}");
        }
        // An environment variable set but empty: checked on the value read,
        // so the test need not change the process environment, which other
        // tests running at the same time read.
        let env = Secret::Env { env: "X".into() };
        assert_eq!(
            env.non_blank(" ".into()),
            Err(SecretError::EnvEmpty("X".into()))
        );
        assert_eq!(
            SecretError::EnvEmpty("X".into()).to_string(),
            "environment variable X is empty"
        );
        // Other secrets keep an empty literal: an empty password is valid.
        assert_eq!(Secret::Literal(String::new()).resolve().unwrap(), "");
        assert_eq!(
            Secret::Literal("t".into())
                .resolve_token()
                .unwrap()
                .expose(),
            "t"
        );
    }

    #[test]
    fn a_token_is_read_without_the_whitespace_around_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "tok\n\n").unwrap();
        let file = Secret::File { file: path };
        assert_eq!(file.resolve_token().unwrap().expose(), "tok");
        // A password keeps all but the one line ending.
        assert_eq!(file.resolve().unwrap(), "tok\n");
        assert_eq!(
            Secret::Literal(" tok\t".into())
                .resolve_token()
                .unwrap()
                .expose(),
            "tok"
        );
        let env = Secret::Env { env: "X".into() };
        assert_eq!(env.non_blank(" a b ".into()), Ok("a b".to_string()));
    }

    #[test]
    fn masked_literal_cannot_be_resolved() {
        let s = Secret::Literal("x".into()).masked();
        assert!(s.is_mask());
        assert_eq!(s.resolve(), Err(SecretError::Masked));
    }

    #[test]
    fn parses_all_three_forms_from_toml() {
        #[derive(Deserialize)]
        struct T {
            a: Secret,
            b: Secret,
            c: Secret,
        }
        let t: T =
            toml::from_str("a = \"lit\"\nb = { env = \"E\" }\nc = { file = \"f\" }").unwrap();
        assert_eq!(t.a, Secret::Literal("lit".into()));
        assert_eq!(t.b, Secret::Env { env: "E".into() });
        assert_eq!(t.c, Secret::File { file: "f".into() });
    }

    #[test]
    fn anything_but_the_three_forms_is_refused_with_what_is_wrong() {
        #[derive(Debug, Deserialize)]
        struct T {
            #[allow(dead_code)]
            a: Secret,
        }
        let cases = [
            ("a = { env = \"E\", file = \"f\" }", "not both"),
            ("a = { envv = \"E\" }", "unknown key `envv` in a secret"),
            ("a = {}", "an empty table is no secret"),
            (
                "a = 5",
                "invalid type: integer `5`, expected a secret: a string",
            ),
            (
                "a = { env = 5 }",
                "invalid type: integer `5`, expected a string",
            ),
            ("a = { env = \"\" }", "`env` names nothing"),
            ("a = { file = \"\" }", "`file` names nothing"),
        ];
        for (text, expected) in cases {
            let e = toml::from_str::<T>(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
        // The catalog is stored as JSON.
        let e = serde_json::from_str::<T>(r#"{"a": {"env": "E", "file": "f"}}"#).unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let t: T = serde_json::from_str(r#"{"a": {"file": "f"}}"#).unwrap();
        assert_eq!(t.a, Secret::File { file: "f".into() });
    }
}
