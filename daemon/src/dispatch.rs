//! Dispatch: the scheduler that decides what goes now, and the workers that
//! make the attempts, each going on with the next due message of its
//! integration when it finishes one.
//!
//! The scheduler sleeps until the earliest due message, or until the queue
//! wakes it (enqueue, a finished attempt, replay) or the catalog changes
//! (activation, pause). It never polls on a fixed tick. Per-integration
//! concurrency is the number of messages a lane may have in flight; the
//! scheduler takes no more than that, so a slow remote system cannot starve
//! the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::app::App;
use crate::catalog::State;
use crate::deliver::{self, Outcome, Senders, Via};
use crate::model::FinalState;
use crate::queue::{now_ms, Attempt, Disposition, MessageId, MessageState};
use crate::tunnel::RelayError;
use outbox_proto::ErrorKind;

/// The longest the scheduler sleeps when nothing is due.
const IDLE_WAKE: Duration = Duration::from_secs(3600);
/// How often sent messages past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How long a message waits before trying again for a MID server that has
/// no relay connected (a relay connecting wakes the scheduler sooner).
const MID_WAIT: Duration = Duration::from_secs(5);
/// The same, once the message has waited before: the wait is already on
/// record, and only a relay connecting (which wakes it at once) or a change
/// of connection will move it.
const MID_WAIT_AGAIN: Duration = Duration::from_secs(60);
/// Pause before retrying a request whose relay dropped mid-request.
const RELAY_DROP_PAUSE: Duration = Duration::from_millis(200);
/// Pause before retrying a request a stopping relay turned away.
const RELAY_BUSY_PAUSE: Duration = Duration::from_secs(1);

/// Runs the scheduler until `shutdown`; attempts are spawned on `workers`
/// so the caller can wait for them within the grace period.
pub async fn run(app: Arc<App>, shutdown: CancellationToken, workers: TaskTracker) {
    let timer = tokio::time::sleep(IDLE_WAKE);
    tokio::pin!(timer);
    // The due time (ms since the epoch) the timer is set for, if any.
    let mut timer_due = None;
    loop {
        let catalog = app.catalog();
        let now = now_ms();
        let (jobs, next) = app.queue.take_due(now, |name| room(&catalog, name));
        for (integration, seq) in jobs {
            let app = app.clone();
            // Boxed: the worker's future holds a whole exchange, and tokio
            // copies a task's future into place when it spawns it and again
            // when it finishes; a box makes both copies a pointer.
            let job = Box::pin(async move { work(&app, &integration, seq).await });
            workers.spawn(job);
        }
        // One timer for the whole loop, moved only when something falls due
        // at a new time. The scheduler runs once per finished attempt, and a
        // timer set and cancelled each time cost every delivery. With
        // nothing due later it stays where it was: a wake at most an hour
        // away, in case a change ever failed to wake the scheduler.
        match next {
            Some(due) if timer_due != Some(due) || timer.is_elapsed() => {
                let wait = Duration::from_millis(due.saturating_sub(now_ms()).max(1));
                timer.as_mut().reset(tokio::time::Instant::now() + wait);
                timer_due = Some(due);
            }
            None if timer.is_elapsed() => {
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + IDLE_WAKE);
                timer_due = None;
            }
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = app.queue.wake.notified() => {}
            _ = app.catalog_changed.notified() => {
                // A connection activated or changed may no longer need the
                // MID server a message waits for.
                for name in app.catalog().integrations.keys() {
                    app.queue.wake_waiting(name);
                }
            }
            _ = app.relay_connected.notified() => {
                // Messages waiting for a MID server that now has a relay go
                // at once instead of at their next retry.
                let catalog = app.catalog();
                for name in catalog.integrations.keys() {
                    if relay_connected(&app, &catalog, name) {
                        app.queue.wake_waiting(name);
                    }
                }
            }
            _ = &mut timer => {}
        }
    }
}

/// Prunes sent and ignored messages older than the retention, every minute.
pub async fn prune(app: Arc<App>, shutdown: CancellationToken) {
    loop {
        let cutoff = now_ms().saturating_sub(app.config.retention.as_millis() as u64);
        let queue = app.clone();
        match tokio::task::spawn_blocking(move || queue.queue.prune(cutoff)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(pruned = n, "pruned messages past their retention"),
            Ok(Err(e)) => tracing::warn!(error = %e, "pruning failed"),
            Err(e) => tracing::warn!(error = %e, "pruning task failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}

/// Whether `integration`'s active connection goes through a MID server
/// that has a relay connected now.
fn relay_connected(app: &App, catalog: &crate::catalog::Catalog, integration: &str) -> bool {
    catalog
        .integrations
        .get(integration)
        .and_then(|e| e.spec.active_connection())
        .and_then(|c| c.mid_server.as_deref())
        .is_some_and(|mid| app.relays.pick(mid).is_some())
}

/// How many messages of `name` may be in flight, if it may send now.
fn room(catalog: &crate::catalog::Catalog, name: &str) -> Option<usize> {
    let e = catalog.integrations.get(name)?;
    (e.state() == State::Active).then_some(e.spec.concurrency as usize)
}

/// A worker: attempts message `seq` of `integration`, then goes on with
/// the next message of the same integration that is due when it finishes,
/// for as long as there is one and the queue is not closing. Under load a
/// worker serves a stream of messages, so a delivery costs neither a task
/// nor a round through the scheduler; the queue wakes the scheduler for
/// whatever the worker leaves (see [`crate::queue::Queue::finish_and_take`]).
async fn work(app: &App, integration: &str, mut seq: u64) {
    loop {
        // At debug only: an info span costs every delivery 5-7% of the
        // daemon's CPU at the default log level (the subscriber formats its
        // fields and tracks it at each poll), so the lines an attempt
        // writes at info and above name the integration and the message
        // themselves.
        let span = tracing::debug_span!("deliver", %integration, id = %MessageId(seq));
        let Some(Finished {
            rec,
            record,
            disposition,
            waits_for_relay,
        }) = attempt(app, integration, seq).instrument(span).await
        else {
            return;
        };
        let catalog = app.catalog();
        let room = room(&catalog, integration);
        match app.queue.finish_and_take(rec, record, disposition, room) {
            // A relay that connected while this message found none woke
            // the messages waiting then, not this one (it was in flight):
            // now that it waits, wake it if a relay is there. A waiting
            // message is not done, so the worker took nothing next.
            Ok(_) if waits_for_relay && relay_connected(app, &catalog, integration) => {
                return app.queue.wake_waiting(integration);
            }
            Ok(Some(next)) => {
                seq = next;
                // An attempt that ends before it waits on anything (the
                // guard refuses, the request cannot be built) would
                // otherwise let a worker run through a whole backlog in
                // one poll and hold its thread: this yields once the
                // task's budget is spent, as tokio's own I/O does.
                tokio::task::coop::consume_budget().await;
            }
            Ok(None) => return,
            Err(e) => {
                // The record could not be updated; in memory it is released,
                // and on disk it is still queued, so it will be attempted
                // again.
                tracing::error!(integration, id = %MessageId(seq), error = %e, "message state cannot be written");
                return app.queue.release(integration, seq);
            }
        }
    }
}

/// What an attempt leaves to record: the message, the attempt made (if
/// one was), and where the message goes.
struct Finished {
    rec: crate::queue::MessageRecord,
    record: Option<Attempt>,
    disposition: Disposition,
    /// The message found no relay of its MID server and waits for one.
    waits_for_relay: bool,
}

/// A [`Finished`] attempt that found what it needed to go.
fn finished(
    rec: crate::queue::MessageRecord,
    record: Option<Attempt>,
    disposition: Disposition,
) -> Option<Finished> {
    Some(Finished {
        rec,
        record,
        disposition,
        waits_for_relay: false,
    })
}

/// One attempt for message `seq` of `integration`; `None` when there is
/// nothing to record (the message vanished or cannot be read, and was
/// handed back).
async fn attempt(app: &App, integration: &str, seq: u64) -> Option<Finished> {
    let rec = match app.queue.job(seq) {
        Ok(Some(rec)) => rec,
        Ok(None) => {
            app.queue.release(integration, seq);
            return None;
        }
        Err(e) => {
            tracing::error!(integration, id = %MessageId(seq), error = %e, "message cannot be read; not sent");
            app.queue.unreadable(integration, seq, &e);
            return None;
        }
    };
    let catalog = app.catalog();
    let Some(entry) = catalog.integrations.get(integration) else {
        return finished(rec, None, Disposition::PutBack);
    };
    let spec = &entry.spec;
    let (true, Some(connection)) = (entry.state() == State::Active, spec.active_connection())
    else {
        return finished(rec, None, Disposition::PutBack);
    };
    // `n` numbers the attempt record; `counted` is what max_attempts sees.
    let n = rec.tries.max(rec.attempts) + 1;
    let counted = rec.attempts + 1;
    let mut base = Attempt {
        n,
        at_ms: now_ms(),
        connection: Some(connection.name.clone()),
        environment: Some(connection.environment.to_string()),
        // The way it would have gone, until a relay of the MID server is
        // picked (then its address too).
        via: match &connection.mid_server {
            None => "direct".into(),
            Some(mid) => format!("mid:{mid}"),
        },
        ..Default::default()
    };
    if let Err(e) = deliver::guard(&app.config.instance_name, connection) {
        tracing::warn!(integration, id = %MessageId(seq), connection = %connection.name, environment = %connection.environment, error = %e, "not sent");
        base.error = Some(format!("{e}; not sent"));
        base.outcome = "error".into();
        return finished(rec, Some(base), Disposition::Final(MessageState::Error));
    }
    let prepared = spec
        .message_type(&rec.message)
        .ok_or_else(|| {
            format!(
                "message type {:?} no longer exists in integration {integration}",
                rec.message
            )
        })
        .and_then(|mt| deliver::build(connection, mt, &rec));
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(integration, id = %MessageId(seq), connection = %connection.name, environment = %connection.environment, error = %e, "request cannot be built");
            base.error = Some(e);
            base.outcome = "error".into();
            return finished(rec, Some(base), Disposition::Final(MessageState::Error));
        }
    };
    let via = match &connection.mid_server {
        None => Via::Direct,
        Some(mid) => match app.relays.pick(mid) {
            Some(session) => Via::Relay(session),
            None => {
                // Not the remote system's fault: the message stays queued
                // without using up an attempt, and goes when a relay connects.
                // The wait is recorded once: a message that was already
                // waiting for this MID server adds nothing, so an outage
                // does not grow the store. Any attempt since would have
                // replaced `last_error` (see `Queue::finish_and_take`), so a
                // new outage after one is recorded again.
                // A name this daemon was not started with can have no
                // relay until it is configured (and the daemon restarted).
                let error = match app.config.mid_servers.contains_key(mid) {
                    true => format!("MID server {mid} is not connected"),
                    false => format!(
                        "MID server {mid} is not configured on this daemon: no relay of \
                         that name is accepted until [mid_servers.{mid}] is added and \
                         outboxd restarted"
                    ),
                };
                let again = rec.last_error.as_deref() == Some(error.as_str());
                let wait = if again { MID_WAIT_AGAIN } else { MID_WAIT };
                let disposition = Disposition::Retry {
                    due_ms: now_ms() + wait.as_millis() as u64,
                    counts: false,
                };
                let record = (!again).then(|| Attempt {
                    method: Some(prepared.method.to_string()),
                    url: Some(prepared.url.clone()),
                    error: Some(error),
                    outcome: format!("waiting for MID server {mid}"),
                    ..base
                });
                return Some(Finished {
                    rec,
                    record,
                    disposition,
                    waits_for_relay: true,
                });
            }
        },
    };
    base.via = via.label();
    let senders = Senders {
        clients: &app.clients,
        tokens: &app.tokens,
        catalog: &catalog,
    };

    let started = Instant::now();
    let exchange = deliver::exchange(&senders, connection, prepared, spec.timeout, &via).await;
    let mut rng = rand::thread_rng();
    // Nothing sent for a reason of this host's (a credential that cannot be
    // read, a head the tunnel cannot carry) is the operator's to fix: a
    // warning, as a guard refusal is.
    let mut unsendable = exchange.is_err();
    let (mut record, outcome) = match exchange {
        Ok(mut x) => {
            let status = x.result.as_ref().ok().map(|r| r.status);
            let ra = x
                .result
                .as_ref()
                .ok()
                .and_then(|r| deliver::retry_after(&r.headers));
            let relay_error = x.relay_error.take();
            // A request the tunnel cannot carry is this host's to fix too.
            unsendable |= matches!(relay_error, Some(RelayError::Unsendable { .. }));
            let record = deliver::attempt_record(base, x);
            match &relay_error {
                // The relay dropped mid-request, or is stopping: go again at
                // once through another member of the cluster, without using
                // an attempt.
                Some(e @ RelayError::Dropped { .. })
                | Some(
                    e @ RelayError::Remote {
                        kind: ErrorKind::Overloaded,
                        ..
                    },
                ) => {
                    let mut record = record;
                    record.outcome = "retry through another relay".into();
                    // A short pause keeps a dying session from spinning the
                    // message; a stopping relay gets a little longer.
                    let pause = match e {
                        RelayError::Dropped { .. } => RELAY_DROP_PAUSE,
                        _ => RELAY_BUSY_PAUSE,
                    };
                    return finished(
                        rec,
                        Some(record),
                        Disposition::Retry {
                            due_ms: now_ms() + pause.as_millis() as u64,
                            counts: false,
                        },
                    );
                }
                // A target outside the relay's allow-list, a body over its
                // limit or a head over the tunnel's will not change by
                // retrying: fix and replay.
                Some(RelayError::Remote {
                    kind: ErrorKind::NotAllowed | ErrorKind::BodyTooLarge,
                    ..
                })
                | Some(RelayError::Unsendable { .. }) => {
                    (record, Outcome::Final(FinalState::Error))
                }
                _ => (
                    record,
                    deliver::classify(spec, counted, status, ra, &mut rng),
                ),
            }
        }
        Err(e) => {
            // Nothing was sent: a credential or profile could not be read.
            // It may be fixed without touching the message, so retry.
            base.error = Some(e);
            base.duration_ms = started.elapsed().as_millis() as u64;
            (base, deliver::classify(spec, counted, None, None, &mut rng))
        }
    };
    let disposition = match &outcome {
        Outcome::Sent => Disposition::Sent,
        Outcome::Retry(after) => Disposition::Retry {
            due_ms: now_ms() + after.as_millis() as u64,
            counts: true,
        },
        Outcome::Final(FinalState::Sent) => Disposition::Sent,
        Outcome::Final(FinalState::Error) | Outcome::Exhausted => {
            Disposition::Final(MessageState::Error)
        }
        Outcome::Final(FinalState::Ignored) => Disposition::Final(MessageState::Ignored),
    };
    record.outcome = match &outcome {
        Outcome::Sent => "sent".into(),
        Outcome::Retry(after) => format!(
            "retry in {}",
            crate::units::format_duration(Duration::from_millis(after.as_millis() as u64))
        ),
        Outcome::Final(s) => format!("{s:?}").to_lowercase(),
        Outcome::Exhausted => format!(
            "error: max_attempts reached ({} of {})",
            counted, spec.max_attempts
        ),
    };
    let m = app.metrics.attempts(integration, &connection.name);
    m.seconds.record(record.duration_ms as f64 / 1000.0);
    match &outcome {
        Outcome::Sent | Outcome::Final(FinalState::Sent) => m.sent.increment(1),
        Outcome::Retry(_) => m.retried.increment(1),
        Outcome::Final(_) | Outcome::Exhausted => m.failed.increment(1),
    }
    // No field at all when there was no response, rather than a made-up
    // status.
    let status = record.status;
    match &outcome {
        // A delivery is a debug line: each one is in its message's attempt
        // record and in `outbox_messages_sent_total`, and at the rates the
        // daemon delivers, a line per message costs a sixth of its delivery
        // rate and is more than journald's default rate limit (10,000
        // lines in 30 s per service) lets through. What did not go stays at
        // info.
        Outcome::Sent => tracing::debug!(
            connection = %connection.name,
            environment = %connection.environment,
            status,
            duration_ms = record.duration_ms,
            attempt = n,
            "delivered"
        ),
        _ if unsendable => tracing::warn!(
            integration,
            id = %MessageId(seq),
            connection = %connection.name,
            environment = %connection.environment,
            attempt = n,
            error = record.error.as_deref().unwrap_or(""),
            outcome = %record.outcome,
            "not sent"
        ),
        _ => tracing::info!(
            integration,
            id = %MessageId(seq),
            connection = %connection.name,
            environment = %connection.environment,
            status,
            duration_ms = record.duration_ms,
            attempt = n,
            error = record.error.as_deref().unwrap_or(""),
            outcome = %record.outcome,
            "not delivered"
        ),
    }
    finished(rec, Some(record), disposition)
}
