//! Prometheus metrics (`GET /metrics`) through the `metrics` facade and its
//! Prometheus exporter, and the names every counter goes by.
//!
//! Counters and the attempt histogram are recorded where things happen;
//! gauges that describe state (queue depth, store size, relay sessions) are
//! set from the source of truth just before each scrape, so they cannot
//! drift.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::app::App;

pub const ENQUEUED: &str = "outbox_messages_enqueued_total";
pub const SENT: &str = "outbox_messages_sent_total";
pub const FAILED: &str = "outbox_messages_failed_total";
pub const RETRIED: &str = "outbox_messages_retried_total";
pub const ATTEMPT_SECONDS: &str = "outbox_attempt_duration_seconds";
pub const QUEUE_DEPTH: &str = "outbox_queue_depth";
pub const STORE_BYTES: &str = "outbox_store_bytes";
pub const RELAY_SESSIONS: &str = "outbox_relay_sessions";

/// Attempt latency buckets: from a fast local sink (ms) to the 30 s
/// default timeout.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls reuse it.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(ATTEMPT_SECONDS.to_string()), &BUCKETS)
                .ok()?;
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    metrics::describe_counter!(ENQUEUED, "Messages accepted for delivery");
    metrics::describe_counter!(SENT, "Messages delivered (ended sent)");
    metrics::describe_counter!(FAILED, "Messages that ended in error");
    metrics::describe_counter!(RETRIED, "Attempts that will be retried");
    metrics::describe_histogram!(
        ATTEMPT_SECONDS,
        metrics::Unit::Seconds,
        "Duration of delivery attempts"
    );
    metrics::describe_gauge!(QUEUE_DEPTH, "Messages by integration and state");
    metrics::describe_gauge!(STORE_BYTES, metrics::Unit::Bytes, "Store size on disk");
    metrics::describe_gauge!(RELAY_SESSIONS, "Relays connected by MID server");
}

/// The attempt metrics of one connection of one integration.
pub struct AttemptMetrics {
    pub seconds: Histogram,
    pub sent: Counter,
    pub retried: Counter,
    pub failed: Counter,
}

/// Metric handles looked up once per label set and kept: the facade's
/// macros build, hash and look up a labelled key on every call, which on
/// the delivery path cost as much as building the request. The handles stay
/// valid for the life of the recorder, which is the process's (the
/// exporter's `idle_timeout` is not used: with it, a kept handle would
/// count into a series the exporter had dropped). A label set is one
/// integration and connection, so the map stays as small as the catalog
/// has ever been. Looking up the attempt metrics registers all three
/// counters, so a connection's `sent`, `retried` and `failed` series exist
/// from its first attempt, at 0 until they count.
#[derive(Default)]
pub struct Handles {
    attempts: Mutex<HashMap<String, HashMap<String, Arc<AttemptMetrics>>>>,
    enqueued: Mutex<HashMap<String, Counter>>,
}

impl Handles {
    /// The attempt metrics of `connection` in `integration`.
    pub fn attempts(&self, integration: &str, connection: &str) -> Arc<AttemptMetrics> {
        let mut map = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = map.get(integration).and_then(|c| c.get(connection)) {
            return m.clone();
        }
        let labels = [
            ("integration", integration.to_string()),
            ("connection", connection.to_string()),
        ];
        let m = Arc::new(AttemptMetrics {
            seconds: metrics::histogram!(ATTEMPT_SECONDS, &labels),
            sent: metrics::counter!(SENT, &labels),
            retried: metrics::counter!(RETRIED, &labels),
            failed: metrics::counter!(FAILED, &labels),
        });
        map.entry(integration.to_string())
            .or_default()
            .insert(connection.to_string(), m.clone());
        m
    }

    /// The enqueue counter of `integration`.
    pub fn enqueued(&self, integration: &str) -> Counter {
        let mut map = self.enqueued.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(integration) {
            return c.clone();
        }
        let c = metrics::counter!(ENQUEUED, "integration" => integration.to_string());
        map.insert(integration.to_string(), c.clone());
        c
    }
}

/// How often histogram samples are folded into their buckets when nobody
/// scrapes: the exporter's own upkeep period.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets every few seconds
/// until `stop`. The exporter keeps each sample until its upkeep runs, and
/// with a recorder built by hand that upkeep is ours to run: without it, a
/// daemon nobody scrapes would hold every attempt's duration, growing by a
/// few bytes per delivery for as long as it runs. A scrape also runs it.
pub async fn upkeep(stop: tokio_util::sync::CancellationToken) {
    let Some(handle) = install() else { return };
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(UPKEEP_EVERY) => handle.run_upkeep(),
        }
    }
}

/// The Prometheus text of every metric, with state gauges refreshed.
pub fn render(app: &App) -> String {
    let Some(handle) = install() else {
        return String::new();
    };
    for name in app.catalog().integrations.keys() {
        let s = app.queue.stats(name);
        for (state, v) in [
            ("queued", s.queue_depth),
            ("sending", s.sending),
            ("error", s.errors),
        ] {
            metrics::gauge!(QUEUE_DEPTH, "integration" => name.clone(), "state" => state)
                .set(v as f64);
        }
    }
    metrics::gauge!(STORE_BYTES).set(app.store.size_on_disk() as f64);
    for m in crate::status::mid_servers(app) {
        metrics::gauge!(RELAY_SESSIONS, "mid_server" => m.name).set(m.sessions.len() as f64);
    }
    handle.run_upkeep();
    handle.render()
}
