//! `GET /v1/status`: one summary an operator reads to see what is wrong.

use serde::Serialize;

use crate::app::App;

#[derive(Serialize)]
pub struct Status {
    pub instance_name: String,
    pub version: &'static str,
    pub queued: u64,
    pub sending: u64,
    pub errors: u64,
    pub store_bytes: u64,
    pub integrations: Vec<IntegrationStatus>,
    pub mid_servers: Vec<MidServerStatus>,
}

/// A configured MID server and the relays connected under its name.
#[derive(Serialize)]
pub struct MidServerStatus {
    pub name: String,
    pub sessions: Vec<crate::tunnel::SessionView>,
}

/// Every configured MID server with its connected relays.
pub fn mid_servers(app: &App) -> Vec<MidServerStatus> {
    let sessions = app.relays.sessions();
    app.config
        .mid_servers
        .keys()
        .map(|name| MidServerStatus {
            name: name.clone(),
            sessions: sessions
                .iter()
                .filter(|s| &s.name == name)
                .cloned()
                .collect(),
        })
        .collect()
}

#[derive(Serialize)]
pub struct IntegrationStatus {
    pub name: String,
    pub state: &'static str,
    pub active_connection: Option<String>,
    pub environment: Option<&'static str>,
    #[serde(flatten)]
    pub queue: crate::queue::IntegrationStats,
    pub last_error_at: Option<String>,
    pub last_sent_at: Option<String>,
}

pub fn status(app: &App) -> Status {
    let catalog = app.catalog();
    let (queued, sending, errors) = app.queue.totals();
    let integrations = catalog
        .integrations
        .values()
        .map(|e| {
            let active = e.spec.active_connection();
            let queue = app.queue.stats(&e.spec.name);
            IntegrationStatus {
                name: e.spec.name.clone(),
                state: e.state().as_str(),
                active_connection: active.map(|c| c.name.clone()),
                environment: active.map(|c| c.environment.as_str()),
                last_error_at: queue.last_error_at_ms.map(crate::api::time),
                last_sent_at: queue.last_sent_at_ms.map(crate::api::time),
                queue,
            }
        })
        .collect();
    Status {
        instance_name: app.config.instance_name.clone(),
        version: env!("CARGO_PKG_VERSION"),
        queued,
        sending,
        errors,
        store_bytes: app.store.size_on_disk(),
        integrations,
        mid_servers: mid_servers(app),
    }
}
