//! Reading an integration file: every field checked, every problem listed.
//!
//! serde stops at the first problem; a user fixing a file wants them all at
//! once, each with its path (`integration[acme].connection[prod].environment:
//! "prodd" is not one of ...`). So the file is parsed as TOML, then walked by
//! hand into the typed [`Document`], collecting problems as it goes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use toml::{Table, Value};

use crate::catalog::Catalog;
use crate::model::{
    defaults, valid_name, Auth, Backoff, Connection, Document, Environment, FinalState,
    InboundUser, Integration, MessageType, OAuthProfile, ProtocolProfile, ResponseAction,
};
use crate::template;
use crate::units::parse_duration;
use outbox_secret::Secret;

/// What a document is checked against besides itself.
pub struct Context<'a> {
    /// The current state: profiles and users may be defined by another file,
    /// and a masked secret (`"***"`) keeps the stored value.
    pub current: &'a Catalog,
    /// MID server names configured in `[mid_servers]`.
    pub mid_servers: &'a BTreeSet<String>,
}

/// A file that is not TOML, as one line: where (line and column, counted
/// in characters) and what the parser says, without its drawing of the
/// line, which a log line or a problem list cannot show.
fn toml_problem(e: &toml::de::Error, text: &str) -> String {
    let what = outbox_proto::one_line(e.message());
    let Some(span) = e.span() else {
        return format!("not valid TOML: {what}");
    };
    let (line, column) = outbox_proto::line_column(text, span.start);
    format!("not valid TOML at line {line}, column {column}: {what}")
}

/// Parses and checks `text`; on failure, every problem found, one per line.
pub fn parse(text: &str, ctx: &Context<'_>) -> Result<Document, Vec<String>> {
    let table: Table = toml::from_str(text).map_err(|e| vec![toml_problem(&e, text)])?;
    let mut w = Walker::default();
    let doc = w.document(&table, ctx);
    if w.problems.is_empty() {
        Ok(doc)
    } else {
        Err(w.problems)
    }
}

#[derive(Default)]
struct Walker {
    problems: Vec<String>,
}

/// One TOML table being read; remembers which keys were used so the rest can
/// be reported as unknown.
struct Obj<'a> {
    path: String,
    table: &'a Table,
    used: BTreeSet<&'a str>,
}

impl<'a> Obj<'a> {
    fn new(path: String, table: &'a Table) -> Self {
        Obj {
            path,
            table,
            used: BTreeSet::new(),
        }
    }

    fn at(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&mut self, key: &'a str) -> Option<&'a Value> {
        self.used.insert(key);
        self.table.get(key)
    }

    fn str(&mut self, w: &mut Walker, key: &'a str) -> Option<String> {
        match self.get(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                w.wrong_type(&self.at(key), "a string", other);
                None
            }
        }
    }

    fn req_str(&mut self, w: &mut Walker, key: &'a str) -> Option<String> {
        if self.table.get(key).is_none() {
            w.problem(&self.at(key), "is required");
            self.used.insert(key);
            return None;
        }
        self.str(w, key)
    }

    fn name(&mut self, w: &mut Walker, key: &'a str) -> Option<String> {
        let name = self.req_str(w, key)?;
        if !valid_name(&name) {
            w.problem(
                &self.at(key),
                format!("{name:?} is not a name (letters, digits, '.', '_' and '-')"),
            );
            return None;
        }
        Some(name)
    }

    fn bool(&mut self, w: &mut Walker, key: &'a str) -> Option<bool> {
        match self.get(key)? {
            Value::Boolean(b) => Some(*b),
            other => {
                w.wrong_type(&self.at(key), "true or false", other);
                None
            }
        }
    }

    fn count(&mut self, w: &mut Walker, key: &'a str, default: u32, max: u32) -> u32 {
        match self.get(key) {
            None => default,
            Some(Value::Integer(n)) if (1..=i64::from(max)).contains(n) => *n as u32,
            Some(Value::Integer(n)) => {
                w.problem(&self.at(key), format!("{n} is not between 1 and {max}"));
                default
            }
            Some(other) => {
                w.wrong_type(&self.at(key), "a whole number", other);
                default
            }
        }
    }

    fn duration(&mut self, w: &mut Walker, key: &'a str, default: Duration) -> Duration {
        let Some(text) = self.str(w, key) else {
            return default;
        };
        match parse_duration(&text) {
            Ok(d) if d > Duration::ZERO => d,
            Ok(_) => {
                w.problem(&self.at(key), "must be longer than zero");
                default
            }
            Err(p) => {
                w.problem(&self.at(key), p);
                default
            }
        }
    }

    fn table(&mut self, w: &mut Walker, key: &'a str) -> Option<Obj<'a>> {
        match self.get(key)? {
            Value::Table(t) => Some(Obj::new(self.at(key), t)),
            other => {
                w.wrong_type(&self.at(key), "a table", other);
                None
            }
        }
    }

    fn string_map(&mut self, w: &mut Walker, key: &'a str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(obj) = self.table(w, key) else {
            return out;
        };
        for (k, v) in obj.table {
            match v {
                Value::String(s) => {
                    out.insert(k.clone(), s.clone());
                }
                other => w.wrong_type(&format!("{}.{k}", obj.path), "a string", other),
            }
        }
        out
    }

    /// An array of tables; each element's path names it by its `name` field
    /// when it has one (`connection[prod]`), by position otherwise.
    fn tables(&mut self, w: &mut Walker, key: &'a str) -> Vec<Obj<'a>> {
        let Some(value) = self.get(key) else {
            return Vec::new();
        };
        let Value::Array(items) = value else {
            w.wrong_type(&self.at(key), "an array of tables", value);
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let label = match item.get("name") {
                Some(Value::String(n)) if !n.is_empty() => n.clone(),
                _ => format!("#{}", i + 1),
            };
            let path = if self.path.is_empty() {
                format!("{key}[{label}]")
            } else {
                format!("{}.{key}[{label}]", self.path)
            };
            match item {
                Value::Table(t) => out.push(Obj::new(path, t)),
                other => w.wrong_type(&path, "a table", other),
            }
        }
        out
    }

    fn secret(&mut self, w: &mut Walker, key: &'a str) -> Option<Secret> {
        let at = self.at(key);
        match self.get(key) {
            None => {
                w.problem(&at, "is required");
                None
            }
            Some(Value::String(s)) => Some(Secret::Literal(s.clone())),
            Some(Value::Table(t)) => {
                let only = |name: &str| t.len() == 1 && t.contains_key(name);
                let secret = match (t.get("env"), t.get("file")) {
                    (Some(Value::String(env)), _) if only("env") => {
                        Some(Secret::Env { env: env.clone() })
                    }
                    (_, Some(Value::String(file))) if only("file") => Some(Secret::File {
                        file: PathBuf::from(file),
                    }),
                    _ => None,
                };
                match secret {
                    Some(secret) if !secret.names_nothing() => Some(secret),
                    _ => {
                        w.problem(&at, format!("a secret is {}", outbox_secret::FORMS));
                        None
                    }
                }
            }
            Some(other) => {
                w.wrong_type(&at, "a string, { env = .. } or { file = .. }", other);
                None
            }
        }
    }

    /// Reports the keys nobody asked for.
    fn finish(self, w: &mut Walker) {
        for key in self.table.keys() {
            if !self.used.contains(key.as_str()) {
                w.problem(&self.at(key), "unknown key");
            }
        }
    }
}

impl Walker {
    fn problem(&mut self, path: &str, what: impl std::fmt::Display) {
        self.problems.push(format!("{path}: {what}"));
    }

    fn wrong_type(&mut self, path: &str, expected: &str, found: &Value) {
        self.problem(
            path,
            format!("expected {expected}, found {}", found.type_str()),
        );
    }

    fn document(&mut self, table: &Table, ctx: &Context<'_>) -> Document {
        let mut root = Obj::new(String::new(), table);
        let integration_objs = root.tables(self, "integration");
        let oauth_objs = root.tables(self, "oauth_profile");
        let protocol_objs = root.tables(self, "protocol_profile");
        let user_objs = root.tables(self, "inbound_user");
        root.finish(self);

        let mut doc = Document {
            oauth_profile: oauth_objs
                .into_iter()
                .filter_map(|o| self.oauth_profile(o, ctx))
                .collect(),
            protocol_profile: protocol_objs
                .into_iter()
                .filter_map(|o| self.protocol_profile(o))
                .collect(),
            inbound_user: user_objs
                .into_iter()
                .filter_map(|o| self.inbound_user(o, ctx))
                .collect(),
            integration: Vec::new(),
        };
        self.unique("oauth_profile", doc.oauth_profile.iter().map(|p| &p.name));
        self.unique(
            "protocol_profile",
            doc.protocol_profile.iter().map(|p| &p.name),
        );
        self.unique("inbound_user", doc.inbound_user.iter().map(|u| &u.name));
        doc.integration = integration_objs
            .into_iter()
            .filter_map(|o| self.integration(o, ctx, &doc))
            .collect();
        self.unique("integration", doc.integration.iter().map(|i| &i.name));
        doc
    }

    fn unique<'s>(&mut self, what: &str, names: impl Iterator<Item = &'s String>) {
        let mut seen = BTreeSet::new();
        for name in names {
            if !seen.insert(name) {
                self.problem(&format!("{what}[{name}]"), "is defined more than once");
            }
        }
    }

    fn integration(
        &mut self,
        mut o: Obj<'_>,
        ctx: &Context<'_>,
        doc: &Document,
    ) -> Option<Integration> {
        let name = o.name(self, "name");
        let description = o.str(self, "description").unwrap_or_default();
        let max_attempts = o.count(self, "max_attempts", defaults::MAX_ATTEMPTS, 1000);
        let backoff = match o.table(self, "backoff") {
            Some(mut b) => {
                let initial = b.duration(self, "initial", defaults::BACKOFF_INITIAL);
                let max = b.duration(self, "max", defaults::BACKOFF_MAX.max(initial));
                if max < initial {
                    self.problem(&b.at("max"), "is shorter than backoff.initial");
                }
                b.finish(self);
                Backoff { initial, max }
            }
            None => Backoff {
                initial: defaults::BACKOFF_INITIAL,
                max: defaults::BACKOFF_MAX,
            },
        };
        let timeout = o.duration(self, "timeout", defaults::TIMEOUT);
        let concurrency = o.count(self, "concurrency", defaults::CONCURRENCY, 1024);
        let response_action = o
            .tables(self, "response_action")
            .into_iter()
            .filter_map(|a| self.response_action(a))
            .collect();
        let messages: Vec<MessageType> = o
            .tables(self, "message")
            .into_iter()
            .filter_map(|m| self.message_type(m))
            .collect();
        let conn_objs = o.tables(self, "connection");
        let path = o.path.clone();
        o.finish(self);

        let mut connections: Vec<Connection> = conn_objs
            .into_iter()
            .filter_map(|c| self.connection(c, &name, ctx, doc))
            .collect();
        self.unique(&format!("{path}.message"), messages.iter().map(|m| &m.name));
        self.unique(
            &format!("{path}.connection"),
            connections.iter().map(|c| &c.name),
        );
        let active: Vec<&str> = connections
            .iter()
            .filter(|c| c.active)
            .map(|c| c.name.as_str())
            .collect();
        if active.len() > 1 {
            self.problem(
                &path,
                format!(
                    "connections {} are all active; at most one connection of an integration may be",
                    active.join(", ")
                ),
            );
        }
        // A `${variables.K}` that some connection lacks can be seen now.
        for m in &messages {
            for (header, text) in m.templates() {
                let Ok(refs) = template::refs(text) else {
                    continue;
                };
                let field = match header {
                    None => "path".to_string(),
                    Some(name) => format!("headers.{name}"),
                };
                for r in refs.iter().filter(|r| r.namespace == "variables") {
                    for c in &connections {
                        if !c.variables.contains_key(r.key) {
                            self.problem(
                                &format!("{path}.message[{}].{field}", m.name),
                                format!(
                                    "${{variables.{}}} is not a variable of connection {}",
                                    r.key, c.name
                                ),
                            );
                        }
                    }
                }
            }
        }
        connections.sort_by(|a, b| a.name.cmp(&b.name));
        Some(Integration {
            name: name?,
            description,
            max_attempts,
            backoff,
            timeout,
            concurrency,
            response_action,
            messages,
            connections,
        })
    }

    fn response_action(&mut self, mut o: Obj<'_>) -> Option<ResponseAction> {
        let code = o.req_str(self, "code");
        let retry = o.bool(self, "retry").unwrap_or(false);
        let state = match o.str(self, "state").as_deref() {
            None => None,
            Some("sent") => Some(FinalState::Sent),
            Some("error") => Some(FinalState::Error),
            Some("ignored") => Some(FinalState::Ignored),
            Some(other) => {
                self.problem(
                    &o.at("state"),
                    format!("{other:?} is not one of \"sent\", \"error\", \"ignored\""),
                );
                None
            }
        };
        if retry && state.is_some() {
            self.problem(&o.at("state"), "only applies when retry = false");
        }
        let code_path = o.at("code");
        o.finish(self);
        let code = code?;
        let b = code.as_bytes();
        let valid = b.len() == 3
            && (b'1'..=b'5').contains(&b[0])
            && (b[1..].iter().all(u8::is_ascii_digit) || b[1..].eq_ignore_ascii_case(b"xx"));
        if !valid {
            self.problem(
                &code_path,
                format!("{code:?} is not a status like \"401\" or a class like \"4xx\""),
            );
            return None;
        }
        Some(ResponseAction {
            code: code.to_ascii_lowercase(),
            retry,
            state,
        })
    }

    fn message_type(&mut self, mut o: Obj<'_>) -> Option<MessageType> {
        let name = o.name(self, "name");
        let method = o.str(self, "method").unwrap_or_else(|| "POST".into());
        if http::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
            self.problem(&o.at("method"), format!("{method:?} is not an HTTP method"));
        }
        let path = o.req_str(self, "path");
        if let Some(p) = &path {
            if !p.starts_with('/') {
                self.problem(&o.at("path"), format!("{p:?} must start with \"/\""));
            }
            if let Err(e) = template::refs(p) {
                self.problem(&o.at("path"), e);
            }
        }
        let headers = o.string_map(self, "headers");
        for (k, v) in &headers {
            let at = format!("{}.headers.{k}", o.path);
            // The value is a template, checked when a message is built.
            if let Err(e) = crate::deliver::header(k, "") {
                self.problem(&at, e);
            }
            if let Err(e) = template::refs(v) {
                self.problem(&at, e);
            }
        }
        o.finish(self);
        Some(MessageType {
            name: name?,
            method: method.to_ascii_uppercase(),
            path: path?,
            headers,
        })
    }

    fn connection(
        &mut self,
        mut o: Obj<'_>,
        integration: &Option<String>,
        ctx: &Context<'_>,
        doc: &Document,
    ) -> Option<Connection> {
        let name = o.name(self, "name");
        let environment = o.req_str(self, "environment").and_then(|e| {
            let parsed = Environment::parse(&e);
            if parsed.is_none() {
                let all: Vec<String> = Environment::ALL
                    .iter()
                    .map(|e| format!("\"{e}\""))
                    .collect();
                self.problem(
                    &o.at("environment"),
                    format!("{e:?} is not one of {}", all.join(", ")),
                );
            }
            parsed
        });
        let endpoint_url = o.req_str(self, "endpoint_url");
        if let Some(url) = &endpoint_url {
            if let Err(p) = check_url(url) {
                self.problem(&o.at("endpoint_url"), p);
            }
        }
        let instance_name = o.str(self, "instance_name").unwrap_or_default();
        let active = o.bool(self, "active").unwrap_or(false);
        let notes = o.str(self, "notes").unwrap_or_default();
        let auth = match o.table(self, "auth") {
            None => Auth::None,
            Some(mut a) => {
                let auth = match a.req_str(self, "type").as_deref() {
                    Some("basic") => {
                        let username = a.req_str(self, "username");
                        let password = a.secret(self, "password");
                        let password = password.and_then(|p| {
                            self.unmask(&a.at("password"), p, || {
                                current_basic_password(ctx, integration, &name)
                            })
                        });
                        match (username, password) {
                            (Some(username), Some(password)) => {
                                Some(Auth::Basic { username, password })
                            }
                            _ => None,
                        }
                    }
                    Some("oauth") => a.req_str(self, "profile").map(|profile| {
                        let known = doc.oauth_profile.iter().any(|p| p.name == profile)
                            || ctx.current.oauth_profiles.contains_key(&profile);
                        if !known {
                            self.problem(
                                &a.at("profile"),
                                format!("there is no oauth_profile {profile:?}"),
                            );
                        }
                        Auth::Oauth { profile }
                    }),
                    Some("none") => Some(Auth::None),
                    Some(other) => {
                        self.problem(
                            &a.at("type"),
                            format!("{other:?} is not one of \"basic\", \"oauth\", \"none\""),
                        );
                        None
                    }
                    None => None,
                };
                a.finish(self);
                auth.unwrap_or_default()
            }
        };
        let protocol_profile = o.str(self, "protocol_profile");
        if let Some(p) = &protocol_profile {
            let known = doc.protocol_profile.iter().any(|x| &x.name == p)
                || ctx.current.protocol_profiles.contains_key(p);
            if !known {
                self.problem(
                    &o.at("protocol_profile"),
                    format!("there is no protocol_profile {p:?}"),
                );
            }
        }
        let mid_server = o.str(self, "mid_server");
        if let Some(m) = &mid_server {
            if !ctx.mid_servers.contains(m) {
                let known: Vec<&str> = ctx.mid_servers.iter().map(String::as_str).collect();
                self.problem(
                    &o.at("mid_server"),
                    format!(
                        "{m:?} is not a MID server of this daemon (configured: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
            }
        }
        let inbound_user = o.str(self, "inbound_user");
        if let Some(u) = &inbound_user {
            let known = doc.inbound_user.iter().any(|x| &x.name == u)
                || ctx.current.inbound_users.contains_key(u);
            if !known {
                self.problem(
                    &o.at("inbound_user"),
                    format!("there is no inbound_user {u:?}"),
                );
            }
        }
        let variables = o.string_map(self, "variables");
        o.finish(self);
        Some(Connection {
            name: name?,
            environment: environment?,
            endpoint_url: endpoint_url?,
            instance_name,
            active,
            notes,
            auth,
            protocol_profile,
            mid_server,
            inbound_user,
            variables,
        })
    }

    fn oauth_profile(&mut self, mut o: Obj<'_>, ctx: &Context<'_>) -> Option<OAuthProfile> {
        let name = o.name(self, "name");
        let token_url = o.req_str(self, "token_url");
        if let Some(url) = &token_url {
            if let Err(p) = check_url(url) {
                self.problem(&o.at("token_url"), p);
            }
        }
        let client_id = o.req_str(self, "client_id");
        let secret = o.secret(self, "client_secret").and_then(|s| {
            self.unmask(&o.at("client_secret"), s, || {
                name.as_ref()
                    .and_then(|n| ctx.current.oauth_profiles.get(n))
                    .map(|p| p.client_secret.clone())
            })
        });
        let scope = o.str(self, "scope").unwrap_or_default();
        let ca = o.str(self, "ca").map(PathBuf::from);
        o.finish(self);
        Some(OAuthProfile {
            name: name?,
            token_url: token_url?,
            client_id: client_id?,
            client_secret: secret?,
            scope,
            ca,
        })
    }

    fn protocol_profile(&mut self, mut o: Obj<'_>) -> Option<ProtocolProfile> {
        let name = o.name(self, "name");
        let client_cert = o.str(self, "client_cert");
        let client_key = o.str(self, "client_key");
        let ca = o.str(self, "ca");
        match (&client_cert, &client_key, &ca) {
            (Some(_), None, _) => self.problem(&o.at("client_key"), "is required with client_cert"),
            (None, Some(_), _) => self.problem(&o.at("client_cert"), "is required with client_key"),
            (None, None, None) => self.problem(
                &o.path,
                "needs client_cert and client_key (mutual TLS), ca, or both",
            ),
            _ => {}
        }
        o.finish(self);
        Some(ProtocolProfile {
            name: name?,
            client_cert: client_cert.map(PathBuf::from),
            client_key: client_key.map(PathBuf::from),
            ca: ca.map(PathBuf::from),
        })
    }

    fn inbound_user(&mut self, mut o: Obj<'_>, ctx: &Context<'_>) -> Option<InboundUser> {
        let name = o.name(self, "name");
        let password = o.secret(self, "password").and_then(|s| {
            self.unmask(&o.at("password"), s, || {
                name.as_ref()
                    .and_then(|n| ctx.current.inbound_users.get(n))
                    .map(|u| u.password.clone())
            })
        });
        o.finish(self);
        Some(InboundUser {
            name: name?,
            password: password?,
        })
    }

    /// A masked literal (`"***"`, as `export` writes it) keeps the secret
    /// already stored at the same place; with nothing stored it is a problem.
    fn unmask(
        &mut self,
        at: &str,
        secret: Secret,
        stored: impl FnOnce() -> Option<Secret>,
    ) -> Option<Secret> {
        if !secret.is_mask() {
            return Some(secret);
        }
        match stored() {
            Some(s) => Some(s),
            None => {
                self.problem(
                    at,
                    "is masked (\"***\") and no value is stored; give the value or an env/file reference",
                );
                None
            }
        }
    }
}

fn current_basic_password(
    ctx: &Context<'_>,
    integration: &Option<String>,
    connection: &Option<String>,
) -> Option<Secret> {
    let i = ctx.current.integrations.get(integration.as_ref()?)?;
    match &i.spec.connection(connection.as_ref()?)?.auth {
        Auth::Basic { password, .. } => Some(password.clone()),
        _ => None,
    }
}

fn check_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("{url:?} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!(
            "{url:?} must not carry a query; put it in the message path"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[integration]]
name = "acme-incidents"
description = "Incidents to ACME"
max_attempts = 8
backoff = { initial = "1s", max = "10m" }
timeout = "30s"
concurrency = 16
response_action = [ { code = "401", retry = true } ]

  [[integration.message]]
  name = "CreateIncident"
  method = "POST"
  path = "/api/now/table/${variables.table}"
  headers = { "Content-Type" = "application/json" }

  [[integration.connection]]
  name = "prod"
  environment = "production"
  endpoint_url = "https://acme.example.com"
  instance_name = "acme-prod"
  active = true
  notes = "Uses the integration user svc-outbox"
  auth = { type = "basic", username = "svc-outbox", password = { env = "ACME_PW" } }
  protocol_profile = "acme-mtls"
  mid_server = "dc1"
  inbound_user = "acme-inbound"
  variables = { table = "incident" }

  [[integration.connection]]
  name = "test"
  environment = "test"
  endpoint_url = "https://acme-test.example.com"
  auth = { type = "oauth", profile = "acme-oauth" }
  variables = { table = "incident_test" }

[[oauth_profile]]
name = "acme-oauth"
token_url = "https://acme.example.com/oauth_token.do"
client_id = "outbox"
client_secret = { file = "acme-oauth-secret" }
scope = "useraccount"

[[protocol_profile]]
name = "acme-mtls"
client_cert = "/etc/outbox/acme.crt"
client_key = "/etc/outbox/acme.key"
ca = "/etc/outbox/acme-ca.crt"

[[inbound_user]]
name = "acme-inbound"
password = { env = "ACME_INBOUND_PW" }
"#;

    fn ctx_parse(text: &str) -> Result<Document, Vec<String>> {
        let current = Catalog::default();
        let mids: BTreeSet<String> = ["dc1".to_string()].into();
        parse(
            text,
            &Context {
                current: &current,
                mid_servers: &mids,
            },
        )
    }

    #[test]
    fn the_spec_example_parses() {
        let doc = ctx_parse(GOOD).unwrap();
        let i = &doc.integration[0];
        assert_eq!(i.connections.len(), 2);
        assert_eq!(i.connections[0].environment, Environment::Production);
        assert!(i.connections[0].active);
        assert_eq!(i.response_action[0].code, "401");
        assert_eq!(doc.oauth_profile[0].name, "acme-oauth");
    }

    #[test]
    fn every_problem_is_listed_by_path() {
        let bad = GOOD
            .replace("\"production\"", "\"prodd\"")
            .replace("\"30s\"", "\"soon\"")
            .replace("mid_server = \"dc1\"", "mid_server = \"dc9\"")
            .replace("table = \"incident_test\"", "tabel = \"x\"")
            .replace("scope = \"useraccount\"", "scope = \"u\"\ncolour = \"red\"")
            .replace(
                "headers = { \"Content-Type\" = \"application/json\" }",
                "headers = { \"Content-Type\" = \"application/json\", \"Content-Length\" = \"9\" }",
            );
        let problems = ctx_parse(&bad).unwrap_err();
        let expect = [
            "integration[acme-incidents].message[CreateIncident].headers.Content-Length: set by the daemon",
            "integration[acme-incidents].connection[prod].environment: \"prodd\" is not one of \"production\", \"pre-production\", \"test\", \"development\", \"sandbox\"",
            "integration[acme-incidents].timeout: \"soon\" is not a duration",
            "integration[acme-incidents].connection[prod].mid_server: \"dc9\" is not a MID server",
            "integration[acme-incidents].message[CreateIncident].path: ${variables.table} is not a variable of connection test",
            "oauth_profile[acme-oauth].colour: unknown key",
        ];
        for e in expect {
            assert!(
                problems.iter().any(|p| p.starts_with(e)),
                "missing {e:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
    }

    #[test]
    fn a_secret_that_names_nothing_is_refused_as_the_config_refuses_it() {
        for (from, to) in [
            ("{ env = \"ACME_PW\" }", "{ env = \" \" }"),
            ("{ env = \"ACME_PW\" }", "{ env = \"\" }"),
            ("{ file = \"acme-oauth-secret\" }", "{ file = \"\" }"),
            ("{ env = \"ACME_PW\" }", "{ env = \"A\", file = \"b\" }"),
        ] {
            let problems = ctx_parse(&GOOD.replace(from, to)).unwrap_err();
            // (A profile refused is also missing where it is used.)
            assert!(
                problems[0].ends_with(&format!("secret: a secret is {}", outbox_secret::FORMS))
                    || problems[0]
                        .ends_with(&format!("password: a secret is {}", outbox_secret::FORMS)),
                "{to}: {problems:?}"
            );
        }
    }

    #[test]
    fn two_active_connections_are_refused() {
        let bad = GOOD.replace(
            "endpoint_url = \"https://acme-test.example.com\"",
            "endpoint_url = \"https://acme-test.example.com\"\n  active = true",
        );
        let problems = ctx_parse(&bad).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("prod, test are all active"),
            "{problems:?}"
        );
    }

    #[test]
    fn references_to_missing_profiles_and_bad_values() {
        let text = r#"
[[integration]]
name = "x"
concurrency = 0
  [[integration.message]]
  name = "M"
  method = "P OST"
  path = "no-slash/${secrets.a}"
  [[integration.connection]]
  name = "c"
  environment = "test"
  endpoint_url = "ftp://x"
  auth = { type = "oauth", profile = "nope" }
  protocol_profile = "nope"
  inbound_user = "nope"
  [[integration.connection]]
  name = "c"
  environment = "test"
  endpoint_url = "http://x"
  auth = { type = "basic", username = "u", password = "***" }
"#;
        let problems = ctx_parse(text).unwrap_err();
        let expect = [
            "integration[x].concurrency: 0 is not between",
            "integration[x].message[M].method:",
            "integration[x].message[M].path: \"no-slash/${secrets.a}\" must start",
            "integration[x].message[M].path: \"no-slash",
            "integration[x].connection[c].endpoint_url: \"ftp://x\" must start",
            "integration[x].connection[c].auth.profile: there is no oauth_profile",
            "integration[x].connection[c].protocol_profile: there is no",
            "integration[x].connection[c].inbound_user: there is no",
            "integration[x].connection[c].auth.password: is masked",
            "integration[x].connection[c]: is defined more than once",
        ];
        for e in expect {
            assert!(
                problems.iter().any(|p| p.starts_with(e)),
                "missing {e:?} in {problems:#?}"
            );
        }
    }

    #[test]
    fn syntax_errors_are_one_problem() {
        let problems = ctx_parse("[[integration]\nname = ").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("not valid TOML"), "{problems:?}");
        // One line: where, as the parser counts it, then what, without
        // the parser's drawing.
        let text = "name = \"é\"\n[[integration]\nname = \"x\"\n";
        let problems = ctx_parse(text).unwrap_err();
        assert_eq!(
            problems,
            ["not valid TOML at line 2, column 14: invalid table header, expected `.`, `]]`"]
        );
    }
}
