//! The catalog: every integration, connection and profile, and the
//! activation rules of SPEC §3 (1–3), enforced here and nowhere else.
//!
//! A [`Catalog`] is a plain value. Every change — an `apply`, an activation,
//! a pause — is a method that edits a copy and returns an error instead when
//! a rule refuses it; the store then persists the new value whole and the
//! daemon swaps it in. Dispatch reads a snapshot and never waits on a change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Document, InboundUser, Integration, OAuthProfile, ProtocolProfile};

/// An integration with its runtime state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// As applied, with each connection's `active` flag kept current.
    pub spec: Integration,
    /// Paused by an operator: active, but holding its messages.
    #[serde(default)]
    pub paused: bool,
    /// The connection active most recently, for rule 3.
    #[serde(default)]
    pub last_active: Option<String>,
}

/// The state of an integration, derived from its connections and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Active,
    Paused,
    Off,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Paused => "paused",
            State::Off => "off",
        }
    }
}

impl Entry {
    /// Active when one connection is active, unless paused; off when none is.
    /// There is no way to be "active" without an active connection, so the
    /// state is derived rather than stored.
    pub fn state(&self) -> State {
        match (self.spec.active_connection(), self.paused) {
            (None, _) => State::Off,
            (Some(_), true) => State::Paused,
            (Some(_), false) => State::Active,
        }
    }
}

/// Everything connection management knows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub integrations: BTreeMap<String, Entry>,
    pub oauth_profiles: BTreeMap<String, OAuthProfile>,
    pub protocol_profiles: BTreeMap<String, ProtocolProfile>,
    pub inbound_users: BTreeMap<String, InboundUser>,
}

/// Why a change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("there is no integration {0:?}")]
    UnknownIntegration(String),
    #[error("integration {integration} has no connection {connection:?}")]
    UnknownConnection {
        integration: String,
        connection: String,
    },
    #[error(
        "integration {integration} has never had an active connection and has {}; \
         activate one of them: {}", connections.len(), connections.join(", ")
    )]
    Ambiguous {
        integration: String,
        connections: Vec<String>,
    },
    #[error("integration {0} has no connections to activate")]
    NoConnections(String),
    #[error("integration {0} is off; activate it or one of its connections first")]
    Off(String),
    #[error("integration {0} is not paused")]
    NotPaused(String),
}

/// What one change did, for logs and answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub integration: String,
    pub state: State,
    pub active_connection: Option<String>,
    /// The message types an apply took away. Messages queued for one end
    /// in `error` when their turn comes, so an apply says so rather than
    /// doing it silently.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed_message_types: Vec<String>,
    /// The connections an apply took away.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed_connections: Vec<String>,
}

impl Catalog {
    pub fn entry(&self, integration: &str) -> Result<&Entry, RuleError> {
        self.integrations
            .get(integration)
            .ok_or_else(|| RuleError::UnknownIntegration(integration.to_string()))
    }

    fn entry_mut(&mut self, integration: &str) -> Result<&mut Entry, RuleError> {
        self.integrations
            .get_mut(integration)
            .ok_or_else(|| RuleError::UnknownIntegration(integration.to_string()))
    }

    fn change(&self, integration: &str) -> Change {
        let e = &self.integrations[integration];
        Change {
            integration: integration.to_string(),
            state: e.state(),
            active_connection: e.spec.active_connection().map(|c| c.name.clone()),
            removed_message_types: Vec::new(),
            removed_connections: Vec::new(),
        }
    }

    /// Rule 1: activating a connection deactivates every other connection of
    /// its integration and makes the integration active (a pause is lifted).
    pub fn activate_connection(
        &mut self,
        integration: &str,
        connection: &str,
    ) -> Result<Change, RuleError> {
        let e = self.entry_mut(integration)?;
        if e.spec.connection(connection).is_none() {
            return Err(RuleError::UnknownConnection {
                integration: integration.to_string(),
                connection: connection.to_string(),
            });
        }
        for c in &mut e.spec.connections {
            c.active = c.name == connection;
        }
        e.paused = false;
        e.last_active = Some(connection.to_string());
        Ok(self.change(integration))
    }

    /// Rule 2: deactivating the active connection turns the integration off.
    /// Deactivating a connection that is not active changes nothing.
    pub fn deactivate_connection(
        &mut self,
        integration: &str,
        connection: &str,
    ) -> Result<Change, RuleError> {
        let e = self.entry_mut(integration)?;
        let Some(c) = e.spec.connections.iter_mut().find(|c| c.name == connection) else {
            return Err(RuleError::UnknownConnection {
                integration: integration.to_string(),
                connection: connection.to_string(),
            });
        };
        if c.active {
            c.active = false;
            e.paused = false;
        }
        Ok(self.change(integration))
    }

    /// Rule 2: deactivating an integration deactivates its active connection.
    pub fn deactivate_integration(&mut self, integration: &str) -> Result<Change, RuleError> {
        let e = self.entry_mut(integration)?;
        for c in &mut e.spec.connections {
            c.active = false;
        }
        e.paused = false;
        Ok(self.change(integration))
    }

    /// Rule 3: activating an integration activates the connection that was
    /// last active; where none ever was and there is exactly one connection,
    /// that one; otherwise it is refused, listing the connections.
    pub fn activate_integration(&mut self, integration: &str) -> Result<Change, RuleError> {
        let e = self.entry(integration)?;
        if let Some(active) = e.spec.active_connection() {
            let name = active.name.clone();
            return self.activate_connection(integration, &name);
        }
        let last = e
            .last_active
            .as_deref()
            .filter(|name| e.spec.connection(name).is_some());
        let target = match (last, e.spec.connections.as_slice()) {
            (Some(name), _) => name.to_string(),
            (None, [only]) => only.name.clone(),
            (None, []) => return Err(RuleError::NoConnections(integration.to_string())),
            (None, many) => {
                return Err(RuleError::Ambiguous {
                    integration: integration.to_string(),
                    connections: many.iter().map(|c| c.name.clone()).collect(),
                })
            }
        };
        self.activate_connection(integration, &target)
    }

    /// Holds an active integration's messages; an off one cannot be paused.
    pub fn pause(&mut self, integration: &str) -> Result<Change, RuleError> {
        let e = self.entry_mut(integration)?;
        if e.state() == State::Off {
            return Err(RuleError::Off(integration.to_string()));
        }
        e.paused = true;
        Ok(self.change(integration))
    }

    pub fn resume(&mut self, integration: &str) -> Result<Change, RuleError> {
        let e = self.entry_mut(integration)?;
        match e.state() {
            State::Off => return Err(RuleError::Off(integration.to_string())),
            State::Active => return Err(RuleError::NotPaused(integration.to_string())),
            State::Paused => e.paused = false,
        }
        Ok(self.change(integration))
    }

    /// Applies a checked document: profiles and users it names are replaced,
    /// integrations it names are replaced whole (their message types and
    /// connections are exactly the listed ones). Names it does not mention are
    /// left alone, so several files can each own their integrations.
    ///
    /// A connection's `active` flag follows the file through rules 1 and 2,
    /// so applying a file behaves like the same activations by hand; the
    /// pause flag and the rule-3 memory are runtime state and are kept.
    pub fn apply(&mut self, doc: &Document) -> Vec<Change> {
        for p in &doc.oauth_profile {
            self.oauth_profiles.insert(p.name.clone(), p.clone());
        }
        for p in &doc.protocol_profile {
            self.protocol_profiles.insert(p.name.clone(), p.clone());
        }
        for u in &doc.inbound_user {
            self.inbound_users.insert(u.name.clone(), u.clone());
        }
        let mut changes = Vec::new();
        for spec in &doc.integration {
            let previous = self.integrations.get(&spec.name);
            let was_active =
                previous.and_then(|e| e.spec.active_connection().map(|c| c.name.clone()));
            let mut entry = Entry {
                spec: spec.clone(),
                paused: previous.is_some_and(|e| e.paused),
                last_active: previous.and_then(|e| e.last_active.clone()),
            };
            entry.spec.connections.sort_by(|a, b| a.name.cmp(&b.name));
            let now_active = entry.spec.active_connection().map(|c| c.name.clone());
            if let Some(name) = &now_active {
                entry.last_active = Some(name.clone());
            }
            if now_active.is_none() {
                entry.paused = false;
            }
            if entry
                .last_active
                .as_deref()
                .is_some_and(|n| entry.spec.connection(n).is_none())
            {
                entry.last_active = None;
            }
            let changed = previous.is_none_or(|p| *p != entry);
            let (types, connections) =
                previous.map_or_else(Default::default, |p| removed(&p.spec, &entry.spec));
            self.integrations.insert(spec.name.clone(), entry);
            if changed || was_active != now_active {
                changes.push(Change {
                    removed_message_types: types,
                    removed_connections: connections,
                    ..self.change(&spec.name)
                });
            }
        }
        changes
    }

    /// The whole catalog as an integration file, secrets masked: applying it
    /// gives back the same catalog, and exporting again the same text.
    pub fn export(&self) -> Document {
        Document {
            integration: self.integrations.values().map(|e| e.spec.clone()).collect(),
            oauth_profile: self.oauth_profiles.values().cloned().collect(),
            protocol_profile: self.protocol_profiles.values().cloned().collect(),
            inbound_user: self.inbound_users.values().cloned().collect(),
        }
        .masked()
    }
}

/// The message types and the connections of `before` that `after` lacks.
fn removed(before: &Integration, after: &Integration) -> (Vec<String>, Vec<String>) {
    let types = before
        .messages
        .iter()
        .filter(|m| after.message_type(&m.name).is_none())
        .map(|m| m.name.clone());
    let connections = before
        .connections
        .iter()
        .filter(|c| after.connection(&c.name).is_none())
        .map(|c| c.name.clone());
    (types.collect(), connections.collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Auth, Backoff, Connection, Environment};
    use std::time::Duration;

    fn connection(name: &str, active: bool) -> Connection {
        Connection {
            name: name.into(),
            environment: Environment::Test,
            endpoint_url: "http://x".into(),
            instance_name: String::new(),
            active,
            notes: String::new(),
            auth: Auth::None,
            protocol_profile: None,
            mid_server: None,
            inbound_user: None,
            variables: Default::default(),
        }
    }

    fn catalog(connections: &[(&str, bool)]) -> Catalog {
        let mut c = Catalog::default();
        let doc = Document {
            integration: vec![Integration {
                name: "i".into(),
                description: String::new(),
                max_attempts: 3,
                backoff: Backoff {
                    initial: Duration::from_secs(1),
                    max: Duration::from_secs(10),
                },
                timeout: Duration::from_secs(5),
                concurrency: 2,
                response_action: vec![],
                messages: vec![],
                connections: connections.iter().map(|(n, a)| connection(n, *a)).collect(),
            }],
            ..Default::default()
        };
        c.apply(&doc);
        c
    }

    fn active(c: &Catalog) -> Option<String> {
        c.integrations["i"]
            .spec
            .active_connection()
            .map(|c| c.name.clone())
    }

    fn state(c: &Catalog) -> State {
        c.integrations["i"].state()
    }

    #[test]
    fn rule1_activation_deactivates_the_others_and_activates_the_integration() {
        let mut c = catalog(&[("prod", true), ("test", false), ("dev", false)]);
        c.pause("i").unwrap();
        let change = c.activate_connection("i", "test").unwrap();
        assert_eq!(change.state, State::Active);
        assert_eq!(active(&c).as_deref(), Some("test"));
        let actives = c.integrations["i"]
            .spec
            .connections
            .iter()
            .filter(|c| c.active)
            .count();
        assert_eq!(actives, 1);

        let mut off = catalog(&[("prod", false), ("test", false)]);
        assert_eq!(state(&off), State::Off);
        off.activate_connection("i", "prod").unwrap();
        assert_eq!(state(&off), State::Active);
    }

    #[test]
    fn rule1_refuses_unknown_names() {
        let mut c = catalog(&[("prod", true)]);
        assert_eq!(
            c.activate_connection("i", "nope"),
            Err(RuleError::UnknownConnection {
                integration: "i".into(),
                connection: "nope".into()
            })
        );
        assert_eq!(
            c.activate_connection("x", "prod"),
            Err(RuleError::UnknownIntegration("x".into()))
        );
        assert_eq!(active(&c).as_deref(), Some("prod"));
    }

    #[test]
    fn rule2_deactivating_the_active_connection_turns_the_integration_off() {
        let mut c = catalog(&[("prod", true), ("test", false)]);
        // Deactivating an inactive connection changes nothing.
        assert_eq!(
            c.deactivate_connection("i", "test").unwrap().state,
            State::Active
        );
        assert_eq!(
            c.deactivate_connection("i", "prod").unwrap().state,
            State::Off
        );
        assert_eq!(active(&c), None);
    }

    #[test]
    fn rule2_deactivating_the_integration_deactivates_its_connection() {
        let mut c = catalog(&[("prod", true), ("test", false)]);
        c.pause("i").unwrap();
        let change = c.deactivate_integration("i").unwrap();
        assert_eq!(change.state, State::Off);
        assert_eq!(change.active_connection, None);
        assert!(!c.integrations["i"].paused);
    }

    #[test]
    fn rule3_activating_the_integration_restores_the_last_active_connection() {
        let mut c = catalog(&[("prod", false), ("test", true)]);
        c.activate_connection("i", "prod").unwrap();
        c.deactivate_integration("i").unwrap();
        let change = c.activate_integration("i").unwrap();
        assert_eq!(change.active_connection.as_deref(), Some("prod"));
        assert_eq!(change.state, State::Active);
    }

    #[test]
    fn rule3_single_connection_is_activated_when_none_ever_was() {
        let mut c = catalog(&[("only", false)]);
        assert_eq!(
            c.activate_integration("i")
                .unwrap()
                .active_connection
                .as_deref(),
            Some("only")
        );
    }

    #[test]
    fn rule3_is_refused_with_the_list_when_ambiguous_or_empty() {
        let mut c = catalog(&[("b", false), ("a", false)]);
        let e = c.activate_integration("i").unwrap_err();
        assert_eq!(
            e,
            RuleError::Ambiguous {
                integration: "i".into(),
                connections: vec!["a".into(), "b".into()]
            }
        );
        assert!(e.to_string().contains("a, b"), "{e}");
        assert_eq!(state(&c), State::Off);
        let mut empty = catalog(&[]);
        assert_eq!(
            empty.activate_integration("i"),
            Err(RuleError::NoConnections("i".into()))
        );
    }

    #[test]
    fn rule3_forgets_a_last_active_connection_that_was_removed() {
        let mut c = catalog(&[("a", true), ("b", false), ("c", false)]);
        let mut doc = Document {
            integration: vec![c.integrations["i"].spec.clone()],
            ..Default::default()
        };
        doc.integration[0].connections.retain(|c| c.name != "a");
        c.apply(&doc);
        assert_eq!(state(&c), State::Off);
        assert!(matches!(
            c.activate_integration("i"),
            Err(RuleError::Ambiguous { .. })
        ));
    }

    #[test]
    fn pause_and_resume() {
        let mut c = catalog(&[("a", true)]);
        assert_eq!(c.resume("i"), Err(RuleError::NotPaused("i".into())));
        assert_eq!(c.pause("i").unwrap().state, State::Paused);
        assert_eq!(c.resume("i").unwrap().state, State::Active);
        c.deactivate_integration("i").unwrap();
        assert_eq!(c.pause("i"), Err(RuleError::Off("i".into())));
        assert_eq!(c.resume("i"), Err(RuleError::Off("i".into())));
    }

    #[test]
    fn apply_is_idempotent_and_export_round_trips() {
        let mut c = catalog(&[("b", false), ("a", true)]);
        let exported = c.export();
        let before = c.clone();
        assert!(c.apply(&exported).is_empty());
        assert_eq!(c, before);
        assert_eq!(c.export(), exported);
    }

    #[test]
    fn apply_follows_the_files_active_flags() {
        let mut c = catalog(&[("a", true), ("b", false)]);
        let mut doc = c.export();
        for conn in &mut doc.integration[0].connections {
            conn.active = conn.name == "b";
        }
        c.apply(&doc);
        assert_eq!(active(&c).as_deref(), Some("b"));
        for conn in &mut doc.integration[0].connections {
            conn.active = false;
        }
        c.apply(&doc);
        assert_eq!(state(&c), State::Off);
        // Rule 3 still remembers b.
        assert_eq!(
            c.activate_integration("i")
                .unwrap()
                .active_connection
                .as_deref(),
            Some("b")
        );
    }

    #[test]
    fn an_apply_says_what_it_removed() {
        let mut c = catalog(&[("a", true), ("b", false)]);
        let mut doc = c.export();
        doc.integration[0].messages = vec![crate::model::MessageType {
            name: "Create".into(),
            method: "POST".into(),
            path: "/x".into(),
            headers: Default::default(),
        }];
        let changes = c.apply(&doc);
        assert!(changes[0].removed_message_types.is_empty(), "{changes:?}");
        doc.integration[0].messages.clear();
        doc.integration[0].connections.retain(|c| c.name == "a");
        let changes = c.apply(&doc);
        assert_eq!(
            (
                &changes[0].removed_message_types,
                &changes[0].removed_connections
            ),
            (&vec!["Create".to_string()], &vec!["b".to_string()]),
            "{changes:?}"
        );
    }
}
