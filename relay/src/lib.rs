//! `outbox-relay`, the MID server: dials out to one or more daemons over
//! QUIC and performs their requests inside the private network.
//!
//! Nothing connects in to the relay. For each address in `daemons` it keeps
//! a session: connect (verifying the daemon's certificate against
//! `server_ca`), say hello with its name and token, heartbeat, and serve the
//! request streams the daemon opens. A lost or refused session is retried
//! with capped exponential backoff and jitter, so the relay starts cleanly
//! even before the network is up. Requests from every daemon share one
//! concurrency limit; on shutdown new requests are refused as "overloaded"
//! (the daemon sends them through another relay) while those in flight
//! finish within the drain period.

pub mod allow;
pub mod config;
pub mod perform;
mod session;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// The relay's shared state.
pub struct Relay {
    pub config: Config,
    pub performer: perform::Performer,
    /// Bounds requests in flight across all daemons.
    pub permits: Arc<Semaphore>,
    /// Set when the relay is stopping: new requests are refused.
    pub draining: CancellationToken,
    /// Tracks requests in flight, for the drain.
    pub requests: TaskTracker,
}

/// Runs until `shutdown` completes, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let endpoint = session::client_endpoint(&config)?;
    let relay = Arc::new(Relay {
        performer: perform::Performer::new(
            config.allow.clone(),
            config.protocol_profiles.values().cloned(),
        )
        .map_err(|e| anyhow::anyhow!("TLS settings for targets: {e}"))?,
        permits: Arc::new(Semaphore::new(config.concurrency)),
        draining: CancellationToken::new(),
        requests: TaskTracker::new(),
        config,
    });
    for warning in relay.config.warnings() {
        tracing::warn!("{warning}");
    }
    let stop = CancellationToken::new();
    let sessions = TaskTracker::new();
    for daemon in relay.config.daemons.clone() {
        sessions.spawn(session::keep(
            relay.clone(),
            endpoint.clone(),
            daemon,
            stop.clone(),
        ));
    }
    tracing::info!(
        name = %relay.config.name,
        daemons = relay.config.daemons.len(),
        concurrency = relay.config.concurrency,
        "outbox-relay is up"
    );
    // READY once the config is loaded and sessions are being kept, not once
    // a daemon answers: the relay must start even before the network is up.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    shutdown.await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!(drain = ?relay.config.drain, in_flight = relay.requests.len(), "stopping: refusing new requests, draining those in flight");
    relay.draining.cancel();
    relay.requests.close();
    if tokio::time::timeout(relay.config.drain, relay.requests.wait())
        .await
        .is_err()
    {
        // The daemon sends them again: through another relay, or through
        // this one when it is back.
        tracing::warn!(
            in_flight = relay.requests.len(),
            "drain period over with requests still in flight; the daemon will send them again"
        );
    }
    stop.cancel();
    sessions.close();
    sessions.wait().await;
    endpoint.close(0u32.into(), b"relay stopping");
    // The close goes out at once; waiting lets it be sent again to a
    // daemon whose packet crosses it. Bounded: a handshake that was under
    // way when the relay stopped would hold the wait for three of its
    // retransmission timeouts (about 3 s) with nobody to tell. A daemon
    // far enough away (a round trip over about 250 ms) whose close is lost
    // learns of it from the missing heartbeats instead; its requests are
    // sent again either way.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    tracing::info!("outbox-relay stopped");
    Ok(())
}
