//! Integration, connection, apply and export endpoints.

use std::sync::Arc;

use http::StatusCode;
use serde::Serialize;

use super::{ok, response, ApiError, ApiResult, Call};
use crate::app::App;
use crate::catalog::{Catalog, Entry};
use crate::model::Connection;

/// An integration as the API shows it (secrets masked).
#[derive(Serialize)]
pub struct IntegrationView {
    pub name: String,
    pub description: String,
    pub state: &'static str,
    pub active_connection: Option<String>,
    pub environment: Option<&'static str>,
    /// Why the instance guard stops every message of the active
    /// connection, when it does (SPEC §3.4): said on the switch itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard_error: Option<String>,
    pub max_attempts: u32,
    pub concurrency: u32,
    pub connections: Vec<Connection>,
    pub messages: Vec<crate::model::MessageType>,
    #[serde(flatten)]
    pub queue: crate::queue::IntegrationStats,
}

pub fn view(app: &App, entry: &Entry) -> IntegrationView {
    let active = entry.spec.active_connection();
    IntegrationView {
        name: entry.spec.name.clone(),
        description: entry.spec.description.clone(),
        state: entry.state().as_str(),
        active_connection: active.map(|c| c.name.clone()),
        environment: active.map(|c| c.environment.as_str()),
        guard_error: active.and_then(|c| crate::deliver::guard(&app.config.instance_name, c).err()),
        max_attempts: entry.spec.max_attempts,
        concurrency: entry.spec.concurrency,
        connections: entry
            .spec
            .connections
            .iter()
            .map(Connection::masked)
            .collect(),
        messages: entry.spec.messages.clone(),
        queue: app.queue.stats(&entry.spec.name),
    }
}

fn entry<'c>(catalog: &'c Catalog, name: &str) -> Result<&'c Entry, ApiError> {
    Ok(catalog.entry(name)?)
}

pub fn list(app: &Arc<App>) -> ApiResult {
    let catalog = app.catalog();
    let all: Vec<IntegrationView> = catalog
        .integrations
        .values()
        .map(|e| view(app, e))
        .collect();
    ok(&all)
}

pub fn get(app: &Arc<App>, name: &str) -> ApiResult {
    let catalog = app.catalog();
    ok(&view(app, entry(&catalog, name)?))
}

pub fn connections(app: &Arc<App>, name: &str) -> ApiResult {
    let catalog = app.catalog();
    let e = entry(&catalog, name)?;
    let all: Vec<Connection> = e.spec.connections.iter().map(Connection::masked).collect();
    ok(&all)
}

pub async fn integration_action(app: &Arc<App>, name: &str, action: &str) -> ApiResult {
    let change = app
        .change(|c| match action {
            "activate" => c.activate_integration(name),
            "deactivate" => c.deactivate_integration(name),
            "pause" => c.pause(name),
            _ => c.resume(name),
        })
        .await?;
    tracing::info!(
        integration = name,
        action,
        state = change.state.as_str(),
        active_connection = change.active_connection.as_deref().unwrap_or("none"),
        "integration changed"
    );
    get(app, name)
}

pub async fn connection_action(
    app: &Arc<App>,
    integration: &str,
    connection: &str,
    action: &str,
) -> ApiResult {
    let change = app
        .change(|c| match action {
            "activate" => c.activate_connection(integration, connection),
            _ => c.deactivate_connection(integration, connection),
        })
        .await?;
    tracing::info!(
        integration,
        connection,
        action,
        state = change.state.as_str(),
        "connection changed"
    );
    get(app, integration)
}

pub async fn apply(app: &Arc<App>, call: &Call) -> ApiResult {
    let text = call.text()?.to_string();
    let changes = app.apply_texts(&[(String::new(), text)]).await?;
    for c in &changes {
        tracing::info!(integration = %c.integration, state = c.state.as_str(), active_connection = c.active_connection.as_deref().unwrap_or("none"), "applied");
    }
    ok(&serde_json::json!({ "changed": changes }))
}

pub fn export(app: &Arc<App>) -> ApiResult {
    let doc = app.catalog().export();
    let text = toml::to_string(&doc).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("export failed: {e}"),
        )
    })?;
    Ok(response(
        StatusCode::OK,
        "application/toml; charset=utf-8",
        text,
    ))
}
