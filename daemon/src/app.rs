//! The running daemon's shared state: config, store, catalog snapshot, queue.
//!
//! Catalog changes are serialized by one async mutex and persisted before the
//! new snapshot is published; readers (the API, dispatch) take an `Arc`
//! snapshot and never wait on a change in progress.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, RwLock};

use crate::apply::{self, Context};
use crate::catalog::{Catalog, Change, RuleError};
use crate::client::Clients;
use crate::config::Config;
use crate::oauth::TokenCache;
use crate::queue::Queue;
use crate::store::{Store, StoreError};
use outbox_secret::SecretValue;

/// Why a catalog change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    Rule(#[from] RuleError),
    #[error("the integration file has {} problem(s):\n{}", .0.len(), .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("{0}")]
    Store(#[from] StoreError),
}

pub struct App {
    pub config: Config,
    pub store: Store,
    pub token: SecretValue,
    pub queue: Queue,
    pub clients: Clients,
    pub tokens: TokenCache,
    /// Relays connected now, by MID server name.
    pub relays: Arc<crate::tunnel::Relays>,
    /// Woken when a relay connects (messages waiting for it may go).
    pub relay_connected: Arc<tokio::sync::Notify>,
    catalog: RwLock<Arc<Catalog>>,
    changes: tokio::sync::Mutex<()>,
    /// Woken after every catalog change (dispatch re-reads what is active).
    pub catalog_changed: tokio::sync::Notify,
    /// Metric handles by label set.
    pub metrics: crate::telemetry::Handles,
}

impl App {
    pub fn new(
        config: Config,
        store: Store,
        queue: Queue,
        token: SecretValue,
        catalog: Catalog,
    ) -> App {
        App {
            config,
            store,
            token,
            queue,
            clients: Clients::default(),
            tokens: TokenCache::default(),
            relays: Arc::default(),
            relay_connected: Arc::default(),
            catalog: RwLock::new(Arc::new(catalog)),
            changes: tokio::sync::Mutex::new(()),
            catalog_changed: tokio::sync::Notify::new(),
            metrics: Default::default(),
        }
    }

    /// The current catalog.
    pub fn catalog(&self) -> Arc<Catalog> {
        // A poisoned lock means a panic while swapping an Arc, which cannot
        // leave the value half-written; keep serving the last snapshot.
        match self.catalog.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The MID server names this daemon is configured for.
    pub fn mid_server_names(&self) -> BTreeSet<String> {
        self.config.mid_servers.keys().cloned().collect()
    }

    /// The catalog's connections (`integration/connection`) that go
    /// through a MID server not among `names`, with that MID server: their
    /// messages can only wait until it is configured.
    pub fn connections_without_mid_server(&self, names: &BTreeSet<String>) -> Vec<String> {
        self.catalog()
            .integrations
            .values()
            .flat_map(|entry| {
                entry.spec.connections.iter().filter_map(|c| {
                    let mid = c.mid_server.as_ref().filter(|m| !names.contains(*m))?;
                    Some(format!("{}/{} (MID server {mid})", entry.spec.name, c.name))
                })
            })
            .collect()
    }

    /// Runs `edit` on a copy of the catalog; when it succeeds, persists the
    /// result (one transaction, flushed) and publishes it.
    pub async fn change<T, E>(
        &self,
        edit: impl FnOnce(&mut Catalog) -> Result<T, E>,
    ) -> Result<T, ChangeError>
    where
        ChangeError: From<E>,
    {
        let _guard = self.changes.lock().await;
        let old = self.catalog();
        let mut new = (*old).clone();
        let out = edit(&mut new)?;
        if *old != new {
            let store = self.store.clone();
            let new_arc = Arc::new(new);
            let to_save = new_arc.clone();
            let saved_over = old.clone();
            tokio::task::spawn_blocking(move || store.save_catalog(&saved_over, &to_save))
                .await
                .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))??;
            // Cached tokens and TLS clients belong to the profiles they were
            // made from: a changed profile must never reuse them (a token of
            // one identity provider shown to another system).
            if old.oauth_profiles != new_arc.oauth_profiles {
                self.tokens.clear();
            }
            if old.protocol_profiles != new_arc.protocol_profiles {
                self.clients.clear();
            }
            match self.catalog.write() {
                Ok(mut c) => *c = new_arc,
                Err(poisoned) => *poisoned.into_inner() = new_arc,
            }
            self.catalog_changed.notify_one();
        }
        Ok(out)
    }

    /// Parses and applies integration files in order, all or nothing.
    pub async fn apply_texts(
        &self,
        texts: &[(String, String)],
    ) -> Result<Vec<Change>, ChangeError> {
        let mids = self.mid_server_names();
        let changes = self
            .change(|catalog| apply_all(catalog, texts, &mids))
            .await?;
        warn_removed(&changes);
        Ok(changes)
    }

    /// Reads the `apply` files named in the config and applies them.
    pub async fn apply_configured_files(&self) -> Result<Vec<Change>, anyhow::Error> {
        let texts = read_apply_files(&self.config)?;
        Ok(self.apply_texts(&texts).await?)
    }
}

/// Logs what applies took away, however they came (the API, the files at
/// start or on reload): a removed message type is a warning, since
/// messages still queued for it end in `error` on their turn.
fn warn_removed(changes: &[crate::catalog::Change]) {
    for c in changes {
        if !c.removed_message_types.is_empty() {
            tracing::warn!(integration = %c.integration, message_types = ?c.removed_message_types, connections = ?c.removed_connections, "apply removed a message type: messages still queued for it end in error when sent");
        } else if !c.removed_connections.is_empty() {
            tracing::info!(integration = %c.integration, connections = ?c.removed_connections, "apply removed connections");
        }
    }
}

/// Applies each `(label, text)` in turn to `catalog`, so later files may
/// refer to profiles of earlier ones; problems are prefixed with the label
/// (a file's path; an API request has none).
pub fn apply_all(
    catalog: &mut Catalog,
    texts: &[(String, String)],
    mid_servers: &BTreeSet<String>,
) -> Result<Vec<Change>, ChangeError> {
    let mut changes = Vec::new();
    let mut problems = Vec::new();
    for (label, text) in texts {
        let parsed = apply::parse(
            text,
            &Context {
                current: catalog,
                mid_servers,
            },
        );
        match parsed {
            Ok(doc) => changes.extend(catalog.apply(&doc)),
            Err(p) if label.is_empty() => problems.extend(p),
            Err(p) => problems.extend(p.into_iter().map(|p| format!("{label}: {p}"))),
        }
    }
    if problems.is_empty() {
        Ok(changes)
    } else {
        Err(ChangeError::Invalid(problems))
    }
}

/// The configured `apply` files with their contents.
pub fn read_apply_files(config: &Config) -> anyhow::Result<Vec<(String, String)>> {
    let mut texts = Vec::new();
    for path in config.apply_files()? {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("apply file {} cannot be read: {e}", path.display()))?;
        texts.push((path.display().to_string(), text));
    }
    Ok(texts)
}

/// The API token: from the config, else the one in `data_dir/api-token`,
/// else a new random one written there with mode 0600.
pub fn api_token(config: &Config, data_dir: &Path) -> anyhow::Result<SecretValue> {
    use anyhow::Context as _;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(token) = &config.api.token {
        return Ok(token.clone());
    }
    let path = data_dir.join(crate::config::TOKEN_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let token = text.trim();
        if !token.is_empty() {
            return Ok(SecretValue::new(token));
        }
    }
    let token = random_token();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("api token file {} cannot be written", path.display()))?;
    writeln!(file, "{token}")?;
    file.sync_all()?;
    Ok(SecretValue::new(token))
}

/// 32 random bytes, hex: 256 bits from the OS generator.
pub fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the configured `apply` files on their own (as on a new store):
/// the count of files, or every problem.
pub fn check_apply_files(config: &Config) -> anyhow::Result<usize> {
    let texts = read_apply_files(config)?;
    let mids = config.mid_servers.keys().cloned().collect();
    apply_all(&mut Catalog::default(), &texts, &mids)?;
    Ok(texts.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_their_file_even_when_it_is_the_only_one() {
        let bad = "[[integration]]\nname = \"x y\"\n".to_string();
        let problems = |texts: &[(String, String)]| match apply_all(
            &mut Catalog::default(),
            texts,
            &BTreeSet::new(),
        ) {
            Err(ChangeError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        };
        let one = problems(&[("ints/a.toml".into(), bad.clone())]);
        assert!(
            !one.is_empty() && one.iter().all(|p| p.starts_with("ints/a.toml: ")),
            "{one:?}"
        );
        // An API request has no file to name.
        let request = problems(&[(String::new(), bad)]);
        assert!(
            request.iter().all(|p| p.starts_with("integration[")),
            "{request:?}"
        );
    }
}
