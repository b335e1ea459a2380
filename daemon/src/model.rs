//! The connection-management model: integrations, connections, message
//! types and profiles, in the shape of the integration file (SPEC §6).
//!
//! These types serialize to exactly what `outbox export` prints, and to the
//! JSON kept in the store. Reading a file goes through [`crate::apply`], which
//! checks every field and reports every problem by its path.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::units::duration_str;
use outbox_secret::Secret;

/// The environment of a remote system a connection points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Environment {
    Production,
    PreProduction,
    Test,
    Development,
    Sandbox,
}

impl Environment {
    pub const ALL: [Environment; 5] = [
        Environment::Production,
        Environment::PreProduction,
        Environment::Test,
        Environment::Development,
        Environment::Sandbox,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::PreProduction => "pre-production",
            Environment::Test => "test",
            Environment::Development => "development",
            Environment::Sandbox => "sandbox",
        }
    }

    pub fn parse(text: &str) -> Option<Environment> {
        Self::ALL.into_iter().find(|e| e.as_str() == text)
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A whole integration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub integration: Vec<Integration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub oauth_profile: Vec<OAuthProfile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocol_profile: Vec<ProtocolProfile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_user: Vec<InboundUser>,
}

/// A named link to one remote system, with its delivery settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Integration {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub max_attempts: u32,
    pub backoff: Backoff,
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    pub concurrency: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_action: Vec<ResponseAction>,
    #[serde(rename = "message", default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<MessageType>,
    /// Kept sorted by name.
    #[serde(rename = "connection", default, skip_serializing_if = "Vec::is_empty")]
    pub connections: Vec<Connection>,
}

/// Delivery defaults, chosen for a remote system that may be down for a
/// while: ten attempts spread over about an hour with the default backoff.
pub mod defaults {
    use std::time::Duration;
    pub const MAX_ATTEMPTS: u32 = 10;
    pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
    pub const BACKOFF_MAX: Duration = Duration::from_secs(600);
    pub const TIMEOUT: Duration = Duration::from_secs(30);
    pub const CONCURRENCY: u32 = 8;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    #[serde(with = "duration_str")]
    pub initial: Duration,
    #[serde(with = "duration_str")]
    pub max: Duration,
}

/// An override of the outcome of one status or status class.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseAction {
    /// `"401"` or a class such as `"4xx"`.
    pub code: String,
    pub retry: bool,
    /// Where the message ends when it is not retried (default: `sent` for
    /// 1xx/2xx, `error` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<FinalState>,
}

impl ResponseAction {
    /// True when this entry covers `status`; exact codes are checked by the
    /// caller before classes.
    pub fn matches(&self, status: u16) -> bool {
        let code = self.code.as_bytes();
        if code.len() != 3 {
            return false;
        }
        if code[1..].eq_ignore_ascii_case(b"xx") {
            return status / 100 == u16::from(code[0].wrapping_sub(b'0'));
        }
        self.code.parse::<u16>().ok() == Some(status)
    }

    pub fn is_exact(&self) -> bool {
        self.code.bytes().all(|b| b.is_ascii_digit())
    }
}

/// The state a message ends in when an outcome is final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalState {
    Sent,
    Error,
    Ignored,
}

/// A named outbound request shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageType {
    pub name: String,
    pub method: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl MessageType {
    /// Its templates: the path (`None`), then each header's value, under
    /// the header's name.
    pub fn templates(&self) -> impl Iterator<Item = (Option<&str>, &str)> {
        std::iter::once((None, self.path.as_str())).chain(
            self.headers
                .iter()
                .map(|(name, value)| (Some(name.as_str()), value.as_str())),
        )
    }
}

/// Everything specific to one environment of the remote system.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    pub name: String,
    pub environment: Environment,
    pub endpoint_url: String,
    #[serde(default)]
    pub instance_name: String,
    pub active: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub notes: String,
    #[serde(default, skip_serializing_if = "Auth::is_none")]
    pub auth: Auth,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid_server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_user: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, String>,
}

/// How requests of a connection authenticate (mutual TLS is separate, in the
/// protocol profile, and combines with any of these).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Auth {
    #[default]
    None,
    Basic {
        username: String,
        password: Secret,
    },
    Oauth {
        profile: String,
    },
}

impl Auth {
    pub fn is_none(&self) -> bool {
        matches!(self, Auth::None)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Auth::None => "none",
            Auth::Basic { .. } => "basic",
            Auth::Oauth { .. } => "oauth",
        }
    }
}

/// OAuth 2.0 client credentials against a token URL.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthProfile {
    pub name: String,
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Secret,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// CA bundle that signs the token endpoint's certificate, when it is not
    /// one the system trusts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

/// Client certificate, key and optional CA bundle for mutual TLS.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolProfile {
    pub name: String,
    /// Client certificate and key for mutual TLS; both or neither (a
    /// profile with only `ca` trusts a private CA without a client
    /// certificate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
}

/// A user a remote system authenticates as when it sends to this side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundUser {
    pub name: String,
    pub password: Secret,
}

/// Names of integrations, connections, profiles and MID servers: letters,
/// digits, `.`, `_` and `-`, so they fit in URLs and `I/C` arguments as is.
pub fn valid_name(name: &str) -> bool {
    outbox_proto::check_name(name, &outbox_proto::Limits::default()).is_ok()
}

impl Integration {
    pub fn connection(&self, name: &str) -> Option<&Connection> {
        self.connections.iter().find(|c| c.name == name)
    }

    pub fn active_connection(&self) -> Option<&Connection> {
        self.connections.iter().find(|c| c.active)
    }

    pub fn message_type(&self, name: &str) -> Option<&MessageType> {
        self.messages.iter().find(|m| m.name == name)
    }

    /// The override for `status`: an exact code wins over a class.
    pub fn response_action(&self, status: u16) -> Option<&ResponseAction> {
        self.response_action
            .iter()
            .find(|a| a.is_exact() && a.matches(status))
            .or_else(|| {
                self.response_action
                    .iter()
                    .find(|a| !a.is_exact() && a.matches(status))
            })
    }
}

impl Connection {
    /// The same connection with a literal password replaced by the mask.
    pub fn masked(&self) -> Connection {
        let mut c = self.clone();
        if let Auth::Basic { password, .. } = &mut c.auth {
            *password = password.masked();
        }
        c
    }
}

impl Document {
    /// The same document with every literal secret replaced by the mask.
    pub fn masked(mut self) -> Document {
        for i in &mut self.integration {
            for c in &mut i.connections {
                *c = c.masked();
            }
        }
        for p in &mut self.oauth_profile {
            p.client_secret = p.client_secret.masked();
        }
        for u in &mut self.inbound_user {
            u.password = u.password.masked();
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_actions_prefer_exact_codes() {
        let mut i = Integration {
            name: "i".into(),
            description: String::new(),
            max_attempts: 3,
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(2),
            },
            timeout: Duration::from_secs(1),
            concurrency: 1,
            response_action: vec![
                ResponseAction {
                    code: "4xx".into(),
                    retry: true,
                    state: None,
                },
                ResponseAction {
                    code: "404".into(),
                    retry: false,
                    state: Some(FinalState::Ignored),
                },
            ],
            messages: vec![],
            connections: vec![],
        };
        assert_eq!(i.response_action(404).unwrap().code, "404");
        assert_eq!(i.response_action(401).unwrap().code, "4xx");
        assert!(i.response_action(500).is_none());
        i.response_action.clear();
        assert!(i.response_action(404).is_none());
    }

    #[test]
    fn names() {
        assert!(valid_name("acme-incidents_2.prod"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
    }
}
