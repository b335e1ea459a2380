//! The durable message queue: records in the message log
//! ([`crate::msglog`]), attempts and idempotency keys in sled, the schedule
//! in memory.
//!
//! The message records in the store are the truth; what is due, what waits
//! behind an ordering key and what is in flight is an index kept in memory
//! and rebuilt from the records at start. That keeps a delivery on the
//! first try to one read and one append of its record, and leaves no index to keep
//! consistent on disk. `sending` exists only in memory: a message on disk is
//! `queued` until it is `sent`, `error` or `ignored`, so after a crash every
//! message that was being sent is simply queued again (at-least-once).
//!
//! Enqueue writes the record, claims its idempotency key by compare-and-
//! swap, takes the queue lock only to add it to the schedule (ordering
//! lines are keyed by `(order, seq)`, so any publishing order agrees), then
//! waits for a shared flush
//! ([`GroupCommit`]): one fsync acknowledges every enqueue of its round.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};

use crate::bodylog::BodyRef;
use crate::headers::Headers;
use crate::msglog::Version;
use crate::store::{
    record_config, MessageTrees, RecordFormat, Store, StoreError, StoredBody, INLINE_BODY_MAX,
};

/// A message's state as users see it (SPEC §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageState {
    Queued,
    Sending,
    Sent,
    Error,
    Ignored,
}

impl MessageState {
    pub fn parse(text: &str) -> Option<MessageState> {
        serde_json::from_value(serde_json::Value::String(text.to_string())).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Queued => "queued",
            MessageState::Sending => "sending",
            MessageState::Sent => "sent",
            MessageState::Error => "error",
            MessageState::Ignored => "ignored",
        }
    }
}

/// One message as stored, record and body in one value
/// ([`crate::store::message_value`]).
///
/// The record is bincode: its field order (and that of [`Attempt`] and
/// [`MessageState`]) is the on-disk format. A change to it needs a new
/// layout byte in [`crate::store`] that still reads the old one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub seq: u64,
    pub integration: String,
    pub message: String,
    pub state: MessageState,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub ordering_key: Option<String>,
    pub idempotency_key: Option<String>,
    /// Position in its ordering line: its own seq, or the seq position of
    /// the message it replays, so a replay takes the original's place.
    pub order: u64,
    pub replay_of: Option<u64>,
    pub replayed_by: Option<u64>,
    /// Attempts that count toward `max_attempts` (waiting for a MID server
    /// and a relay lost mid-request do not).
    pub attempts: u32,
    /// Attempt records kept so far, counted or not: the next one is
    /// numbered `tries + 1`, so none overwrites another.
    #[serde(default)]
    pub tries: u32,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// When the next attempt is due.
    pub due_ms: u64,
    pub last_error: Option<String>,
    /// The attempt that delivered the message, kept inside the record so
    /// that a delivery writes one value, not an attempt and a record.
    /// Earlier attempts (and every attempt of a message that is not sent)
    /// live in the attempts tree.
    #[serde(default)]
    pub sent_attempt: Option<Attempt>,
    /// The body as the producer sent it. Stored after the record or in the
    /// body log, not in the record; empty when a scan read only the record.
    #[serde(skip)]
    pub body: Bytes,
    /// Where the body is in the body log, for a body stored there.
    #[serde(skip)]
    pub body_ref: Option<BodyRef>,
    /// Whether this record was read from a stored value that ends with
    /// its body (an inline body), which the next version may then share
    /// instead of writing it again. Not so for a new record, nor for a body
    /// read from elsewhere (the body log, or the `bodies` tree of a store
    /// from schema 2 or older, whatever the body's size).
    #[serde(skip)]
    pub stored_inline: bool,
}

/// One HTTP request made for a message, with what came back.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub n: u32,
    pub at_ms: u64,
    pub connection: Option<String>,
    pub environment: Option<String>,
    /// `direct`, or `mid:NAME (ADDRESS)` for a request through a relay.
    pub via: String,
    pub method: Option<String>,
    pub url: Option<String>,
    /// Request headers as sent, with credentials masked.
    pub request_headers: Headers,
    pub status: Option<u16>,
    pub response_headers: Headers,
    /// The first bytes of the response body (lossy UTF-8).
    pub response_excerpt: Option<String>,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// What the daemon decided: `sent`, `retry in 2s`, `error`, ...
    pub outcome: String,
}

/// What a producer hands in.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub integration: String,
    pub message: String,
    pub body: Bytes,
    pub params: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
    pub ordering_key: Option<String>,
    pub idempotency_key: Option<String>,
}

/// The answer to an enqueue.
#[derive(Debug, Clone, Serialize)]
pub struct Enqueued {
    pub id: String,
    pub state: MessageState,
    /// True when the idempotency key was seen before and nothing was added.
    pub duplicate: bool,
}

/// Per-integration numbers for the API and status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IntegrationStats {
    pub queue_depth: u64,
    pub sending: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<u64>,
    pub last_sent_at_ms: Option<u64>,
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("there is no message {0}")]
    UnknownMessage(String),
    #[error("{0:?} is not a message id")]
    BadId(String),
    #[error("message {id} is {state}; {what}")]
    WrongState {
        id: String,
        state: &'static str,
        what: &'static str,
    },
    #[error(
        "message {id} cannot be replayed: its body cannot be read ({reason}); ignore it instead"
    )]
    Unreadable { id: String, reason: String },
    #[error("message {id} was replayed already, as {copy}; replay {copy} to send it again")]
    Replayed { id: String, copy: String },
    #[error("the store could not write the message to disk: {0}; nothing was acknowledged, retry")]
    Flush(String),
    #[error("the daemon is shutting down and takes no new messages; retry once it is back")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Ids as people see them: the sequence number in 16 hex digits, so they
/// sort in enqueue order.
pub fn format_id(seq: u64) -> String {
    MessageId(seq).to_string()
}

/// A message id to log: formatted only if the line is written.
pub struct MessageId(pub u64);

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

pub fn parse_id(id: &str) -> Result<u64, QueueError> {
    if id.len() != 16 {
        return Err(QueueError::BadId(id.to_string()));
    }
    u64::from_str_radix(id, 16).map_err(|_| QueueError::BadId(id.to_string()))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A stored message value without its body (scans), and where the body
/// starts in `v` if it is inline. A logged body's place goes into
/// `body_ref`.
fn decode(seq: u64, v: &[u8]) -> Result<(MessageRecord, Option<usize>), StoreError> {
    let parts = crate::store::message_parts(v).map_err(|e| corrupt("messages", seq, e))?;
    let mut rec: MessageRecord = match parts.format {
        RecordFormat::Binary => {
            bincode::serde::decode_from_slice(parts.record, record_config())
                .map_err(|e| corrupt("messages", seq, e))?
                .0
        }
        RecordFormat::Json => {
            serde_json::from_slice(parts.record).map_err(|e| corrupt("messages", seq, e))?
        }
    };
    let at = match parts.body {
        StoredBody::Inline(b) => Some(v.len() - b.len()),
        StoredBody::Apart => None,
        StoredBody::Logged(r) => {
            rec.body_ref = Some(r);
            None
        }
    };
    Ok((rec, at))
}

/// A record that cannot be encoded: plain data, far below the limit, so
/// this is not expected; should it happen, nothing is written and the
/// caller reports it.
fn encoding(seq: u64, e: &bincode::error::EncodeError) -> StoreError {
    StoreError::Io(std::io::Error::other(format!(
        "message {} cannot be encoded: {e}",
        format_id(seq)
    )))
}

/// Inline bodies from this size on are shared by a record's later
/// versions rather than written again with each (see
/// [`crate::msglog::MessageLog::insert_sharing_tail`]); a smaller one costs
/// less to write again than a second read costs when the record is read.
const SHARE_BODY_MIN: usize = 256;

/// Whether `body` is stored inside its message's value (else in the body
/// log).
fn inline(body: &[u8]) -> bool {
    body.len() <= INLINE_BODY_MAX
}

fn corrupt(tree: &'static str, key: u64, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        tree,
        key: format_id(key),
        reason: e.to_string(),
    }
}

/// The in-memory schedule of one integration.
#[derive(Default)]
struct Lane {
    /// Queued messages that may go now or later: `(due_ms, seq)`. Only the
    /// head of an ordering line is ever here.
    ready: BTreeSet<(u64, u64)>,
    /// Ordering lines: key → `(order, seq)` → due_ms, for messages queued,
    /// sending, or in error at the head (which blocks the line).
    lines: HashMap<String, BTreeMap<(u64, u64), u64>>,
    in_flight: BTreeSet<u64>,
    /// Messages retried without using an attempt (no relay connected for
    /// their MID server): seq → (due, ordering key and order). A relay
    /// connecting makes them due at once.
    waiting: BTreeMap<u64, (u64, Option<(String, u64)>)>,
    queued: u64,
    errors: u64,
    last_error: Option<(String, u64)>,
    last_sent_ms: Option<u64>,
}

impl Lane {
    /// Moves the first ready message in flight if it is due by `now` and
    /// fewer than `limit` are in flight. Otherwise `Err` with when the first
    /// ready one falls due, if it is later and there is room.
    fn take(&mut self, now: u64, limit: usize) -> Result<u64, Option<u64>> {
        while self.in_flight.len() < limit {
            let Some(&(due, seq)) = self.ready.first() else {
                break;
            };
            if due > now {
                return Err(Some(due));
            }
            self.ready.pop_first();
            self.waiting.remove(&seq);
            // A message is in flight at most once, whatever the index says.
            if self.in_flight.insert(seq) {
                return Ok(seq);
            }
        }
        Err(None)
    }

    /// Puts a queued message where dispatch will find it: in `ready`, unless
    /// it waits in an ordering line behind another.
    fn add_queued(&mut self, seq: u64, order: u64, due_ms: u64, key: Option<&str>) {
        self.queued += 1;
        match key {
            None => {
                self.ready.insert((due_ms, seq));
            }
            Some(k) => {
                let line = self.lines.entry(k.to_string()).or_default();
                let old_head = line.keys().next().copied();
                line.insert((order, seq), due_ms);
                let new_head = line.keys().next().copied();
                if new_head == Some((order, seq)) {
                    // It heads the line. If it jumped ahead of an old head (a
                    // replay taking its original's place), the old head goes
                    // back to waiting; if the old head is being sent, the new
                    // one waits for it to finish: one at a time.
                    let mut old_in_flight = false;
                    if let Some((o, s)) = old_head {
                        if let Some(d) = line.get(&(o, s)) {
                            self.ready.remove(&(*d, s));
                        }
                        old_in_flight = self.in_flight.contains(&s);
                    }
                    if !old_in_flight {
                        self.ready.insert((due_ms, seq));
                    }
                }
            }
        }
    }

    /// Removes a message from its line; if it was the head, the next one (if
    /// queued and not blocked) becomes ready.
    fn leave_line(&mut self, key: &str, order: u64, seq: u64) {
        let Some(line) = self.lines.get_mut(key) else {
            return;
        };
        line.remove(&(order, seq));
        if line.is_empty() {
            self.lines.remove(key);
        } else {
            self.release_head(key);
        }
    }

    /// Makes the head of a line ready, unless it is in error (due u64::MAX,
    /// it blocks the line) or already in flight.
    fn release_head(&mut self, key: &str) {
        if let Some((&(_, head), &due)) = self.lines.get(key).and_then(|l| l.iter().next()) {
            if due != u64::MAX && !self.in_flight.contains(&head) {
                self.ready.insert((due, head));
            }
        }
    }

    fn head_is(&self, key: &str, seq: u64) -> bool {
        self.lines
            .get(key)
            .and_then(|l| l.keys().next())
            .is_some_and(|&(_, s)| s == seq)
    }
}

#[derive(Default)]
struct State {
    lanes: HashMap<String, Lane>,
    shutting_down: bool,
    /// Every record with a smaller seq has been looked at by the pruner,
    /// and is gone, or unfinished then, or in `late`.
    prune_cursor: u64,
    /// `(finished at ms, seq)` of messages below the cursor that finished
    /// (or were last touched) after the pruner passed them.
    late: BTreeSet<(u64, u64)>,
}

impl State {
    /// A message reached `sent` or `ignored` (or was touched again) at
    /// `at_ms`: if the pruner's scan is already past it, it waits in
    /// `late`. Called under the lock after the record is written.
    fn finished(&mut self, seq: u64, at_ms: u64) {
        if seq < self.prune_cursor {
            self.late.insert((at_ms, seq));
        }
    }
}

/// What the pruner did with one record.
enum Pruned {
    Removed,
    Kept,
    /// The record changed since it was read: look again next time.
    Changed,
}

/// The queue. Cheap to share behind an `Arc`.
pub struct Queue {
    trees: MessageTrees,
    state: Mutex<State>,
    commit: GroupCommit,
    /// Woken when something may have become due (enqueue, a finished
    /// delivery, a replay); the dispatcher waits on it.
    pub wake: Notify,
}

/// What happened to a message at the end of an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    Sent,
    /// Queued again, due at the given time. `counts` is false for waits
    /// that are not the remote system's fault (MID server not connected).
    Retry {
        due_ms: u64,
        counts: bool,
    },
    Final(MessageState),
    /// Put back untouched (integration paused or switched off meanwhile).
    PutBack,
}

impl Queue {
    /// Opens the queue over the store's message trees and rebuilds the
    /// schedule: every message not finished is queued again.
    pub fn open(store: &Store) -> Result<Queue, StoreError> {
        let q = Queue {
            trees: store.messages.clone(),
            state: Mutex::new(State::default()),
            commit: GroupCommit::new(store.clone()),
            wake: Notify::new(),
        };
        {
            let mut st = q.lock();
            // Error messages that head an ordering line must block it, so
            // collect lines first and settle them after the scan.
            let mut blocked: Vec<(String, String, u64, u64)> = Vec::new();
            for item in q.trees.messages.heads(0, false) {
                let (seq, _, v) = item?;
                let rec: MessageRecord = decode(seq, &v)?.0;
                if let Some(r) = &rec.body_ref {
                    q.trees.body_log.adopt(r);
                }
                let lane = st.lanes.entry(rec.integration.clone()).or_default();
                match rec.state {
                    MessageState::Queued | MessageState::Sending => {
                        lane.add_queued(seq, rec.order, rec.due_ms, rec.ordering_key.as_deref())
                    }
                    MessageState::Error => {
                        lane.errors += 1;
                        if lane
                            .last_error
                            .as_ref()
                            .is_none_or(|(_, t)| *t < rec.updated_ms)
                        {
                            lane.last_error =
                                Some((rec.last_error.clone().unwrap_or_default(), rec.updated_ms));
                        }
                        if let Some(key) = &rec.ordering_key {
                            blocked.push((rec.integration.clone(), key.clone(), rec.order, seq));
                        }
                    }
                    MessageState::Sent => {
                        if lane.last_sent_ms.is_none_or(|t| t < rec.updated_ms) {
                            lane.last_sent_ms = Some(rec.updated_ms);
                        }
                    }
                    MessageState::Ignored => {}
                }
            }
            // An error message sits in its line (it blocks what is behind
            // it) but is never ready itself.
            for (integration, key, order, seq) in blocked {
                let lane = st.lanes.entry(integration).or_default();
                let line = lane.lines.entry(key).or_default();
                let old_head = line.keys().next().copied();
                line.insert((order, seq), u64::MAX);
                if line.keys().next() == Some(&(order, seq)) {
                    if let Some((o, s)) = old_head {
                        let due = line[&(o, s)];
                        lane.ready.remove(&(due, s));
                    }
                }
            }
        }
        // Every body a record points to is counted: segments nothing
        // points into (their messages pruned) go.
        let swept = q.trees.body_log.sweep();
        if swept > 0 {
            tracing::info!(
                segments = swept,
                "removed body log segments no message uses"
            );
        }
        Ok(q)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is only changed by short non-panicking sections; after
        // a panic elsewhere, keep going with what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `key` was given to a message of `integration` that is still
    /// kept: an enqueue with it adds nothing and answers with that id.
    pub fn seen(&self, integration: &str, key: &str) -> Result<bool, QueueError> {
        let (kept, _) = self.idempotent(&idempotency_key(integration, key))?;
        Ok(kept.is_some())
    }

    /// The message an idempotency key (as stored) names, if it is still
    /// kept; else the key's stale entry, if any (its message pruned part
    /// way, before an old crash), for an enqueue to take over.
    #[allow(clippy::type_complexity)]
    fn idempotent(&self, key: &[u8]) -> Result<(Option<u64>, Option<sled::IVec>), QueueError> {
        match self.trees.idempotency.get(key).map_err(StoreError::from)? {
            Some(existing) if self.trees.messages.contains(key_seq(&existing)) => {
                Ok((Some(key_seq(&existing)), None))
            }
            stale => Ok((None, stale)),
        }
    }

    /// Adds a message and answers once it is on disk.
    pub async fn enqueue(&self, new: NewMessage) -> Result<Enqueued, QueueError> {
        let enqueued = self.insert(new)?;
        self.commit.wait().await?;
        if !enqueued.duplicate {
            self.wake.notify_one();
        }
        Ok(enqueued)
    }

    /// Writes the message, then publishes it to the schedule. The store
    /// writes happen outside the queue lock (it only guards the in-memory
    /// schedule), so concurrent enqueues write in parallel.
    fn insert(&self, new: NewMessage) -> Result<Enqueued, QueueError> {
        if self.lock().shutting_down {
            return Err(QueueError::ShuttingDown);
        }
        let idem_key = new
            .idempotency_key
            .as_ref()
            .map(|k| idempotency_key(&new.integration, k));
        // A key whose message is gone is free again: it is taken over
        // below, from that seq.
        let mut stale = None;
        if let Some(key) = &idem_key {
            match self.idempotent(key)? {
                (Some(first), _) => return self.duplicate(first),
                (None, old) => stale = old,
            }
        }
        let seq = self.commit.store.generate_id()?;
        let now = now_ms();
        let body_ref = self.log_body(&new.body)?;
        let rec = MessageRecord {
            seq,
            integration: new.integration,
            message: new.message,
            state: MessageState::Queued,
            params: new.params,
            headers: new.headers,
            ordering_key: new.ordering_key,
            idempotency_key: new.idempotency_key,
            order: seq,
            replay_of: None,
            replayed_by: None,
            attempts: 0,
            tries: 0,
            created_ms: now,
            updated_ms: now,
            due_ms: now,
            last_error: None,
            sent_attempt: None,
            body_ref,
            body: new.body,
            stored_inline: false,
        };
        if let Err(e) = self.put(&rec) {
            self.release_body(body_ref);
            return Err(e.into());
        }
        if let Some(key) = idem_key {
            // The record is written before the key is claimed, so whoever
            // finds the key finds a record that the next flush covers.
            loop {
                let claimed = self
                    .trees
                    .idempotency
                    .compare_and_swap(&key, stale.as_deref(), Some(&seq.to_be_bytes()[..]))
                    .map_err(StoreError::from)?;
                self.trees.wrote_sled();
                let Err(lost) = claimed else { break };
                match lost.current {
                    // Another enqueue holds the key for a message that
                    // exists: this one is its duplicate.
                    Some(v) if self.trees.messages.contains(key_seq(&v)) => {
                        self.trees.messages.remove(seq).map_err(StoreError::from)?;
                        self.release_body(body_ref);
                        return self.duplicate(key_seq(&v));
                    }
                    // The key went with its message (pruned meanwhile), or
                    // points at one that is gone: take it from what it is.
                    current => stale = current,
                }
            }
        }
        // Lines are ordered by (order, seq), so publishing out of id order
        // under concurrency still keeps each ordering key one at a time.
        self.lock()
            .lanes
            .entry(rec.integration.clone())
            .or_default()
            .add_queued(seq, rec.order, rec.due_ms, rec.ordering_key.as_deref());
        Ok(Enqueued {
            id: format_id(seq),
            state: MessageState::Queued,
            duplicate: false,
        })
    }

    fn duplicate(&self, seq: u64) -> Result<Enqueued, QueueError> {
        let state = self
            .record(seq)?
            .map(|r| r.state)
            .unwrap_or(MessageState::Queued);
        Ok(Enqueued {
            id: format_id(seq),
            state,
            duplicate: true,
        })
    }

    /// Appends `body` to the body log if it is too large to be inline.
    fn log_body(&self, body: &[u8]) -> Result<Option<BodyRef>, StoreError> {
        if inline(body) {
            return Ok(None);
        }
        Ok(Some(self.trees.body_log.append(body)?))
    }

    /// Gives a removed message's logged body back to the body log.
    fn release_body(&self, body_ref: Option<BodyRef>) {
        if let Some(r) = &body_ref {
            self.trees.body_log.release(r);
        }
    }

    fn put(&self, rec: &MessageRecord) -> Result<(), StoreError> {
        // A logged body (or one apart, from an older store) was written
        // once, with the message; only its place is written again.
        let body = match (&rec.body_ref, inline(&rec.body)) {
            (Some(r), _) => StoredBody::Logged(*r),
            (None, true) => StoredBody::Inline(&rec.body),
            (None, false) => StoredBody::Apart,
        };
        let mut encoded = Ok(0);
        let record = |out: &mut Vec<u8>| {
            encoded = bincode::serde::encode_into_std_write(rec, out, record_config());
        };
        let value = match body {
            // An inline body ends the value, and a message's body never
            // changes: a new version of a record read from such a value
            // shares the body with the entry that holds it instead of
            // writing it again.
            StoredBody::Inline(b) => {
                let mut head = crate::store::message_head(b.len(), record);
                encoded.map_err(|e| encoding(rec.seq, &e))?;
                if rec.stored_inline
                    && b.len() >= SHARE_BODY_MIN
                    && self
                        .trees
                        .messages
                        .insert_sharing_tail(rec.seq, &head, b.len())?
                {
                    return Ok(());
                }
                head.extend_from_slice(b);
                head
            }
            body => {
                let value = crate::store::message_value(body, record);
                encoded.map_err(|e| encoding(rec.seq, &e))?;
                value
            }
        };
        self.trees.messages.insert(rec.seq, &value)?;
        Ok(())
    }

    /// The stored record of `seq`, with its body.
    pub fn record(&self, seq: u64) -> Result<Option<MessageRecord>, StoreError> {
        self.load(seq, true)
    }

    /// The stored record of `seq`; a body in the body log is read only with
    /// `logged_body`. Without it the record keeps its `body_ref`, so a
    /// `put` of it leaves the body where it is.
    fn load(&self, seq: u64, logged_body: bool) -> Result<Option<MessageRecord>, StoreError> {
        let key = seq.to_be_bytes();
        match self.trees.messages.get(seq)? {
            Some(v) => {
                let (mut rec, at) = decode(seq, &v)?;
                rec.stored_inline = at.is_some();
                // An inline body stays in the buffer it was read into.
                rec.body = match (at, &rec.body_ref) {
                    (Some(at), _) => v.slice(at..),
                    (None, Some(r)) if logged_body => self
                        .trees
                        .body_log
                        .read(r)
                        .map_err(|e| corrupt("messages", seq, e))?,
                    (None, Some(_)) => Bytes::new(),
                    (None, None) => self
                        .trees
                        .bodies
                        .get(key)?
                        .map(Bytes::from_owner)
                        .unwrap_or_default(),
                };
                Ok(Some(rec))
            }
            None => Ok(None),
        }
    }

    /// The record as users see it: `sending` while in flight.
    pub fn view(&self, seq: u64) -> Result<Option<MessageRecord>, StoreError> {
        let Some(mut rec) = self.load(seq, false)? else {
            return Ok(None);
        };
        if let Some(r) = &rec.body_ref {
            // A body that cannot be read does not hide its record, nor the
            // attempt that says why.
            rec.body = self.trees.body_log.read(r).unwrap_or_default();
        }
        let st = self.lock();
        if st
            .lanes
            .get(&rec.integration)
            .is_some_and(|l| l.in_flight.contains(&seq))
        {
            rec.state = MessageState::Sending;
        }
        Ok(Some(rec))
    }

    /// Every attempt of `rec`, oldest first: those in the attempts tree,
    /// then the one that delivered it.
    pub fn attempts(&self, rec: &MessageRecord) -> Result<Vec<Attempt>, StoreError> {
        let seq = rec.seq;
        let mut out = Vec::new();
        for item in self.trees.attempts.scan_prefix(seq.to_be_bytes()) {
            let (_, v) = item?;
            out.push(serde_json::from_slice(&v).map_err(|e| corrupt("attempts", seq, e))?);
        }
        out.extend(rec.sent_attempt.clone());
        Ok(out)
    }

    /// Messages, newest first, filtered.
    pub fn list(
        &self,
        integration: Option<&str>,
        state: Option<MessageState>,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.trees.messages.heads(u64::MAX, true) {
            let (seq, _, v) = item?;
            let mut rec: MessageRecord = decode(seq, &v)?.0;
            if integration.is_some_and(|i| i != rec.integration) {
                continue;
            }
            if rec.state == MessageState::Queued && self.in_flight(&rec.integration, seq) {
                rec.state = MessageState::Sending;
            }
            if state.is_some_and(|s| s != rec.state) {
                continue;
            }
            out.push(rec);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    fn in_flight(&self, integration: &str, seq: u64) -> bool {
        self.lock()
            .lanes
            .get(integration)
            .is_some_and(|l| l.in_flight.contains(&seq))
    }

    pub fn stats(&self, integration: &str) -> IntegrationStats {
        let st = self.lock();
        match st.lanes.get(integration) {
            None => IntegrationStats::default(),
            Some(l) => IntegrationStats {
                queue_depth: l.queued,
                sending: l.in_flight.len() as u64,
                errors: l.errors,
                last_error: l.last_error.as_ref().map(|(e, _)| e.clone()),
                last_error_at_ms: l.last_error.as_ref().map(|(_, t)| *t),
                last_sent_at_ms: l.last_sent_ms,
            },
        }
    }

    /// Takes the messages that are due now from each integration `may_send`
    /// allows, up to `room(integration)` more in flight each. Returns them
    /// with the time the next one falls due (among lanes with room).
    pub fn take_due(
        &self,
        now: u64,
        may_send: impl Fn(&str) -> Option<usize>,
    ) -> (Vec<(String, u64)>, Option<u64>) {
        let mut st = self.lock();
        let mut taken = Vec::new();
        let mut next: Option<u64> = None;
        for (name, lane) in st.lanes.iter_mut() {
            let Some(limit) = may_send(name) else {
                continue;
            };
            loop {
                match lane.take(now, limit) {
                    Ok(seq) => taken.push((name.clone(), seq)),
                    Err(later) => {
                        if let Some(due) = later {
                            next = Some(next.map_or(due, |n| n.min(due)));
                        }
                        break;
                    }
                }
            }
        }
        (taken, next)
    }

    /// The record, with its body, of a message taken by
    /// [`Queue::take_due`]; `None` if it vanished (pruned or ignored
    /// meanwhile).
    pub fn job(&self, seq: u64) -> Result<Option<MessageRecord>, StoreError> {
        Ok(self
            .record(seq)?
            .filter(|r| r.state == MessageState::Queued))
    }

    /// A taken message whose record or body cannot be read. With a
    /// readable record it ends in `error`, the reason in an attempt (a
    /// body lost in a crash before its message was acknowledged, or
    /// damaged since); otherwise it leaves the schedule until the next
    /// start, rather than being taken again and again.
    pub fn unreadable(&self, integration: &str, seq: u64, error: &StoreError) {
        let logged = self.load(seq, false).ok().flatten().and_then(|rec| {
            let r = rec.body_ref?;
            Some((rec, r))
        });
        if let Some((rec, r)) = logged {
            if self.trees.body_log.read(&r).is_ok() {
                // It reads now: the failure passed. Try again later.
                return self.release(integration, seq);
            }
            let attempt = Attempt {
                n: rec.tries.max(rec.attempts) + 1,
                at_ms: now_ms(),
                via: "none".into(),
                error: Some(format!(
                    "the body cannot be read; nothing was sent: {error}"
                )),
                outcome: "error".into(),
                ..Default::default()
            };
            match self.finish(rec, Some(attempt), Disposition::Final(MessageState::Error)) {
                Ok(()) => return,
                Err(e) => tracing::error!(
                    integration,
                    id = %MessageId(seq),
                    error = %e,
                    "message state cannot be written"
                ),
            }
        }
        let mut st = self.lock();
        if let Some(lane) = st.lanes.get_mut(integration) {
            lane.in_flight.remove(&seq);
            lane.last_error = Some((
                format!("message {} cannot be read: {error}", format_id(seq)),
                now_ms(),
            ));
        }
    }

    /// Gives back a taken message that could not be loaded.
    pub fn release(&self, integration: &str, seq: u64) {
        let mut st = self.lock();
        if let Some(lane) = st.lanes.get_mut(integration) {
            lane.in_flight.remove(&seq);
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Records an attempt (when one was made) and moves the message on.
    ///
    /// The store writes come first, outside the queue lock; then the lock
    /// is taken only to update the schedule. A message in flight cannot be
    /// ignored or replayed meanwhile, so nothing else writes its record.
    pub fn finish(
        &self,
        rec: MessageRecord,
        attempt: Option<Attempt>,
        disposition: Disposition,
    ) -> Result<(), StoreError> {
        self.finish_and_take(rec, attempt, disposition, None)
            .map(|_| ())
    }

    /// [`Queue::finish`], then, for a message that left the schedule (sent,
    /// ignored or in error) and with `room` (the integration's concurrency,
    /// when it may send), takes the next message of the same integration
    /// that is due now, in the same lock, unless the queue is closing. The worker that finished goes on
    /// with it, and the scheduler is woken only when something is left for
    /// it: no message taken, a new due time (a retry, a message put back),
    /// or more that could go now or later in a lane with room.
    pub fn finish_and_take(
        &self,
        mut rec: MessageRecord,
        attempt: Option<Attempt>,
        disposition: Disposition,
        room: Option<usize>,
    ) -> Result<Option<u64>, StoreError> {
        let seq = rec.seq;
        let now = now_ms();
        let attempted = u32::from(attempt.is_some());
        let sent = matches!(
            disposition,
            Disposition::Sent | Disposition::Final(MessageState::Sent)
        );
        let retry = matches!(disposition, Disposition::Retry { .. });
        let failed = matches!(disposition, Disposition::Final(MessageState::Error));
        if let Some(a) = attempt {
            rec.tries = rec.tries.max(a.n);
            // The last error is what the latest failed attempt said: an
            // attempt that ends in a retry or in `error` failed whatever its
            // status (a `response_action` may retry a 202, a 307 ends a
            // message in `error`), so an older error, or none, never stands
            // for it. The MID-server wait relies on this: it adds a record
            // only when `last_error` is not already its own.
            if retry || failed || a.error.is_some() || a.status.is_some_and(|s| s >= 400) {
                rec.last_error = Some(attempt_error(&a));
            }
            if sent {
                rec.sent_attempt = Some(a);
            } else {
                self.put_attempt(seq, &a)?;
            }
        }
        rec.updated_ms = now;
        // What the record becomes on disk.
        let end_state = match disposition {
            Disposition::PutBack => None,
            Disposition::Retry { due_ms, counts } => {
                rec.attempts += u32::from(counts);
                rec.due_ms = due_ms;
                self.put(&rec)?;
                None
            }
            Disposition::Final(MessageState::Error) => {
                rec.attempts += attempted;
                rec.state = MessageState::Error;
                self.put(&rec)?;
                Some(MessageState::Error)
            }
            Disposition::Final(MessageState::Ignored) => Some(MessageState::Ignored),
            Disposition::Sent | Disposition::Final(_) => Some(MessageState::Sent),
        };
        if let Some(state @ (MessageState::Sent | MessageState::Ignored)) = end_state {
            rec.attempts += attempted;
            rec.state = state;
            if state == MessageState::Sent {
                rec.last_error = None;
            }
            self.put(&rec)?;
        }

        let mut st = self.lock();
        // Nothing new once the queue is closing (a stop has begun).
        let closing = st.shutting_down;
        if end_state.is_some_and(|s| matches!(s, MessageState::Sent | MessageState::Ignored)) {
            st.finished(seq, now);
        }
        let lane = st.lanes.entry(rec.integration.clone()).or_default();
        lane.in_flight.remove(&seq);
        let key = rec.ordering_key.clone();
        match (disposition, end_state) {
            (Disposition::PutBack, _) => {
                // Nothing changed on disk: it is ready again where it was.
                if key.as_deref().is_none_or(|k| lane.head_is(k, seq)) {
                    lane.ready.insert((rec.due_ms, seq));
                }
            }
            (Disposition::Retry { due_ms, counts }, _) => {
                if !counts {
                    let line = key.clone().map(|k| (k, rec.order));
                    lane.waiting.insert(seq, (due_ms, line));
                }
                match &key {
                    Some(k) => {
                        if let Some(line) = lane.lines.get_mut(k) {
                            line.insert((rec.order, seq), due_ms);
                        }
                        lane.release_head(k);
                    }
                    None => {
                        lane.ready.insert((due_ms, seq));
                    }
                }
                if let Some(e) = &rec.last_error {
                    lane.last_error = Some((e.clone(), now));
                }
            }
            (_, Some(MessageState::Error)) => {
                lane.queued = lane.queued.saturating_sub(1);
                lane.errors += 1;
                lane.last_error = Some((rec.last_error.clone().unwrap_or_default(), now));
                if let Some(k) = &key {
                    // Stays at the head, blocking the line, never ready.
                    if let Some(line) = lane.lines.get_mut(k) {
                        line.insert((rec.order, seq), u64::MAX);
                    }
                }
            }
            (_, state) => {
                lane.queued = lane.queued.saturating_sub(1);
                if state == Some(MessageState::Sent) {
                    lane.last_sent_ms = Some(now);
                }
                if let Some(k) = &key {
                    lane.leave_line(k, rec.order, seq);
                }
            }
        }
        let (next, wake) = match room {
            Some(limit) if end_state.is_some() && !closing => {
                let next = lane.take(now, limit).ok();
                let more = lane.in_flight.len() < limit && !lane.ready.is_empty();
                (next, next.is_none() || more)
            }
            _ => (None, true),
        };
        drop(st);
        if wake {
            self.wake.notify_one();
        }
        Ok(next)
    }

    fn put_attempt(&self, seq: u64, a: &Attempt) -> Result<(), StoreError> {
        let mut key = seq.to_be_bytes().to_vec();
        key.extend_from_slice(&a.n.to_be_bytes());
        let value = serde_json::to_vec(a).unwrap_or_default();
        self.trees.attempts.insert(key, value)?;
        self.trees.wrote_sled();
        Ok(())
    }

    /// Ignore (SPEC §4): marks the message `ignored` and releases what waits
    /// behind it. Only a queued (not in flight) or errored message can be.
    pub fn ignore(&self, seq: u64) -> Result<MessageRecord, QueueError> {
        let mut st = self.lock();
        let mut rec = self
            .load(seq, false)?
            .ok_or_else(|| QueueError::UnknownMessage(format_id(seq)))?;
        let lane = st.lanes.entry(rec.integration.clone()).or_default();
        if lane.in_flight.contains(&seq) {
            return Err(QueueError::WrongState {
                id: format_id(seq),
                state: "sending",
                what: "wait until the attempt ends",
            });
        }
        match rec.state {
            MessageState::Queued => {
                lane.queued = lane.queued.saturating_sub(1);
                lane.ready.remove(&(rec.due_ms, seq));
            }
            MessageState::Error => lane.errors = lane.errors.saturating_sub(1),
            s => {
                return Err(QueueError::WrongState {
                    id: format_id(seq),
                    state: s.as_str(),
                    what: "only queued and error messages can be ignored",
                })
            }
        }
        if let Some(k) = rec.ordering_key.clone() {
            lane.leave_line(&k, rec.order, seq);
        }
        rec.state = MessageState::Ignored;
        rec.updated_ms = now_ms();
        self.settle(st, &rec)?;
        Ok(rec)
    }

    /// Writes `rec`, which an operator has just ended (ignored, or
    /// replaced by its replay), with the schedule still locked, so that
    /// it is found by the pruner; then lets go of the schedule and makes
    /// the change durable before waking dispatch.
    fn settle(&self, mut st: MutexGuard<'_, State>, rec: &MessageRecord) -> Result<(), QueueError> {
        self.put(rec)?;
        st.finished(rec.seq, rec.updated_ms);
        drop(st);
        self.commit_sync()?;
        self.wake.notify_one();
        Ok(())
    }

    /// Replay (SPEC §4): enqueues a copy in the message's place in its
    /// order; an `error` original becomes `ignored`. A queued message is
    /// going out anyway and cannot be replayed.
    pub fn replay(&self, seq: u64) -> Result<MessageRecord, QueueError> {
        self.replay_where(seq, |_| true)?
            .ok_or_else(|| QueueError::UnknownMessage(format_id(seq)))
    }

    /// Replays `seq` if `still(record)` holds under the lock; `None` if not.
    fn replay_where(
        &self,
        seq: u64,
        still: impl Fn(&MessageRecord) -> bool,
    ) -> Result<Option<MessageRecord>, QueueError> {
        // A message's body never changes: it is read, and the copy's
        // written, before the lock, so that no disk I/O on bodies holds up
        // the schedule.
        let first = self
            .load(seq, false)?
            .ok_or_else(|| QueueError::UnknownMessage(format_id(seq)))?;
        let body = match &first.body_ref {
            Some(r) => self
                .trees
                .body_log
                .read(r)
                .map_err(|reason| QueueError::Unreadable {
                    id: format_id(seq),
                    reason,
                })?,
            None => first.body.clone(),
        };
        let body_ref = self.log_body(&body)?;
        let mut st = self.lock();
        let (mut orig, copy) = match self.write_copy(seq, still, body, body_ref) {
            Ok(Some(written)) => written,
            // No copy refers to the body written for it.
            other => {
                self.release_body(body_ref);
                return other.map(|_| None);
            }
        };
        let (copy_seq, now) = (copy.seq, copy.created_ms);
        let lane = st.lanes.entry(orig.integration.clone()).or_default();
        if orig.state == MessageState::Error {
            lane.errors = lane.errors.saturating_sub(1);
            if let Some(k) = &orig.ordering_key {
                // Remove the blocking original without releasing the next:
                // the copy takes its place.
                if let Some(line) = lane.lines.get_mut(k) {
                    line.remove(&(orig.order, seq));
                }
            }
            orig.state = MessageState::Ignored;
        }
        lane.add_queued(copy_seq, copy.order, now, copy.ordering_key.as_deref());
        orig.replayed_by = Some(copy_seq);
        orig.updated_ms = now;
        self.settle(st, &orig)?;
        Ok(Some(copy))
    }

    /// Under the queue lock: writes the replay copy of `seq`, with `body`
    /// (logged at `body_ref` if large), if the original still exists,
    /// passes `still` and is not queued. Returns the original as read and
    /// the copy.
    fn write_copy(
        &self,
        seq: u64,
        still: impl Fn(&MessageRecord) -> bool,
        body: Bytes,
        body_ref: Option<BodyRef>,
    ) -> Result<Option<(MessageRecord, MessageRecord)>, QueueError> {
        let orig = self
            .load(seq, false)?
            .ok_or_else(|| QueueError::UnknownMessage(format_id(seq)))?;
        if !still(&orig) {
            return Ok(None);
        }
        if orig.state == MessageState::Queued {
            return Err(QueueError::WrongState {
                id: format_id(seq),
                state: "queued",
                what: "it will be sent anyway",
            });
        }
        // One copy per message: a second replay (a script run twice, two
        // people at once) would deliver it twice more, under two ids the
        // target cannot tell apart. The copy is the one to replay.
        // (A copy pruned away leaves the original free to replay again.)
        if let Some(copy) = orig
            .replayed_by
            .filter(|&c| self.trees.messages.contains(c))
        {
            return Err(QueueError::Replayed {
                id: format_id(seq),
                copy: format_id(copy),
            });
        }
        let copy_seq = self.commit.store.generate_id()?;
        let now = now_ms();
        let copy = MessageRecord {
            seq: copy_seq,
            state: MessageState::Queued,
            order: orig.order,
            replay_of: Some(seq),
            replayed_by: None,
            attempts: 0,
            tries: 0,
            created_ms: now,
            updated_ms: now,
            due_ms: now,
            last_error: None,
            sent_attempt: None,
            // A replay is a new message: the idempotency key stays with the
            // original, so a producer's retry still finds the first id.
            idempotency_key: None,
            // The copy has a body of its own: each message's body goes
            // with it when it is pruned.
            body,
            body_ref,
            stored_inline: false,
            ..orig.clone()
        };
        self.put(&copy)?;
        Ok(Some((orig, copy)))
    }

    /// The message in `error` that `rec` waits behind, if its ordering line
    /// is blocked by one (SPEC §4: until it is replayed and sent, or
    /// ignored).
    pub fn blocked_by(&self, rec: &MessageRecord) -> Option<u64> {
        let key = rec.ordering_key.as_deref()?;
        if rec.state != MessageState::Queued {
            return None;
        }
        let st = self.lock();
        let line = st.lanes.get(&rec.integration)?.lines.get(key)?;
        // The first in error ahead of it (a replayed copy may be before).
        line.range(..(rec.order, rec.seq))
            .find(|(_, &due)| due == u64::MAX)
            .map(|(&(_, seq), _)| seq)
    }

    /// Repair (SPEC §4): replays every `error` message of the integration,
    /// oldest first. Returns the copies.
    pub fn repair(&self, integration: &str) -> Result<Vec<MessageRecord>, QueueError> {
        let mut errors: Vec<MessageRecord> = Vec::new();
        for item in self.trees.messages.heads(0, false) {
            let (seq, _, v) = item.map_err(StoreError::from)?;
            let rec: MessageRecord = decode(seq, &v)?.0;
            if rec.integration == integration && rec.state == MessageState::Error {
                errors.push(rec);
            }
        }
        errors.sort_by_key(|r| (r.order, r.seq));
        // Only those still in error when their turn comes: a concurrent
        // repair or replay may have taken one meanwhile.
        let mut copies = Vec::new();
        for rec in errors {
            match self.replay_where(rec.seq, |r| r.state == MessageState::Error) {
                Ok(Some(copy)) => copies.push(copy),
                Ok(None) | Err(QueueError::UnknownMessage(_)) => {}
                Err(e @ QueueError::Unreadable { .. }) => {
                    tracing::warn!(error = %e, "not repaired");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(copies)
    }

    /// Deletes sent and ignored messages (and their attempts) that finished
    /// before `cutoff_ms`. Returns how many.
    ///
    /// There is no retention index to keep up on every delivery. Records
    /// are keyed by seq, seqs are handed out in creation order, and a
    /// message finishes after it is created, so the candidates are the
    /// records created before the cutoff. A cursor walks them once: each
    /// is removed, or left unfinished (when it finishes, [`State::finished`]
    /// puts it in `late`), or finished too recently (put in `late` now).
    /// Later runs read `late` and the records past the cursor, so a run
    /// costs what it removes, not what stays. The walk stops at the first
    /// record created after the cutoff, unless that record is dated in the
    /// future (the clock was ahead when it was made): it is passed like
    /// the others. The cursor lives in memory; after a restart the first
    /// run walks from the start again.
    ///
    /// Then the message log is compacted ([`crate::msglog::MessageLog::compact`]).
    pub fn prune(&self, cutoff_ms: u64) -> Result<usize, StoreError> {
        let now = now_ms();
        let mut pruned = 0;
        let late: Vec<(u64, u64)> = {
            let mut st = self.lock();
            let keep = st.late.split_off(&(cutoff_ms, 0));
            std::mem::replace(&mut st.late, keep).into_iter().collect()
        };
        for (_, seq) in late {
            let Some((version, v)) = self.trees.messages.get_versioned(seq)? else {
                continue;
            };
            let rec = decode(seq, &v)?.0;
            // Changed means touched again (replayed): it is in `late` anew.
            if let Pruned::Removed = self.prune_one(&rec, version, cutoff_ms, false)? {
                pruned += 1;
            }
        }
        let start = self.lock().prune_cursor;
        for item in self.trees.messages.heads(start, false) {
            let (seq, version, v) = item?;
            let rec = decode(seq, &v)?.0;
            if (cutoff_ms..=now).contains(&rec.created_ms) {
                break;
            }
            match self.prune_one(&rec, version, cutoff_ms, true)? {
                Pruned::Removed => pruned += 1,
                Pruned::Kept => {}
                Pruned::Changed => break,
            }
        }
        // Records that outlive their neighbours (a paused integration's)
        // move out of the oldest segments, so those can go.
        let before = self.trees.messages.current();
        loop {
            let moved = self.trees.messages.compact(before)?;
            if moved == 0 {
                break;
            }
            tracing::info!(
                records = moved,
                "moved records out of the oldest message log segment"
            );
        }
        Ok(pruned)
    }

    /// Removes `rec` (read at `version`) if it finished before the cutoff;
    /// with `advance`, moves the cursor past it. The decision is taken
    /// under the queue lock against the record as it is now: finish, ignore
    /// and replay write a record before they take the lock, so one written
    /// since `rec` was read is left for next time. The check is the log's
    /// index, in memory, not a second read under the lock.
    fn prune_one(
        &self,
        rec: &MessageRecord,
        version: Version,
        cutoff_ms: u64,
        advance: bool,
    ) -> Result<Pruned, StoreError> {
        let seq = rec.seq;
        let key = seq.to_be_bytes();
        let mut st = self.lock();
        if self.trees.messages.version(seq) != Some(version) {
            return Ok(Pruned::Changed);
        }
        if advance {
            st.prune_cursor = st.prune_cursor.max(seq + 1);
        }
        let finished = matches!(rec.state, MessageState::Sent | MessageState::Ignored);
        if !finished {
            return Ok(Pruned::Kept);
        }
        if rec.updated_ms >= cutoff_ms {
            st.late.insert((rec.updated_ms, seq));
            return Ok(Pruned::Kept);
        }
        // The idempotency key goes first (if it is still this message's):
        // a key must never outlive its message, or it would swallow the
        // next message sent with it.
        if let Some(k) = &rec.idempotency_key {
            let _ = self.trees.idempotency.compare_and_swap(
                idempotency_key(&rec.integration, k),
                Some(&key[..]),
                None::<&[u8]>,
            )?;
        }
        self.trees.messages.remove(seq)?;
        drop(st);
        self.release_body(rec.body_ref);
        // Also when the body was inline now: a store upgraded from schema
        // 2 keeps its bodies apart whatever their size.
        self.trees.bodies.remove(key)?;
        let attempt_keys: Vec<_> = self
            .trees
            .attempts
            .scan_prefix(key)
            .keys()
            .collect::<Result<_, _>>()?;
        for ak in attempt_keys {
            self.trees.attempts.remove(ak)?;
        }
        self.trees.wrote_sled();
        Ok(Pruned::Removed)
    }

    /// Makes every message of `integration` that waits for a MID server
    /// due now (a relay connected).
    pub fn wake_waiting(&self, integration: &str) {
        let now = now_ms();
        let mut st = self.lock();
        let Some(lane) = st.lanes.get_mut(integration) else {
            return;
        };
        for (seq, (due, line)) in std::mem::take(&mut lane.waiting) {
            if lane.ready.remove(&(due, seq)) {
                lane.ready.insert((now, seq));
            }
            if let Some((key, order)) = line {
                if let Some(entry) = lane
                    .lines
                    .get_mut(&key)
                    .and_then(|l| l.get_mut(&(order, seq)))
                {
                    if *entry != u64::MAX {
                        *entry = now;
                    }
                }
            }
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Refuses new messages from now on (shutdown).
    pub fn close(&self) {
        self.lock().shutting_down = true;
    }

    /// Number of messages in flight across all integrations.
    pub fn in_flight_total(&self) -> usize {
        self.lock().lanes.values().map(|l| l.in_flight.len()).sum()
    }

    /// Queue depth by state, across integrations: (queued, sending, error).
    pub fn totals(&self) -> (u64, u64, u64) {
        let st = self.lock();
        st.lanes.values().fold((0, 0, 0), |(q, s, e), l| {
            (q + l.queued, s + l.in_flight.len() as u64, e + l.errors)
        })
    }

    /// Waits for a flush of everything written so far.
    pub async fn sync(&self) -> Result<(), QueueError> {
        self.commit.wait().await
    }

    fn commit_sync(&self) -> Result<(), StoreError> {
        self.commit.store.flush()
    }
}

/// A one-line summary of what went wrong in an attempt.
fn attempt_error(a: &Attempt) -> String {
    match (&a.error, a.status) {
        (Some(e), _) => e.clone(),
        (None, Some(s)) => format!("HTTP {s}"),
        (None, None) => "no response".into(),
    }
}

fn idempotency_key(integration: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(integration.len() + key.len() + 1);
    k.extend_from_slice(integration.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn key_seq(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = k.len().min(8);
    b[..n].copy_from_slice(&k[..n]);
    u64::from_be_bytes(b)
}

/// Group commit: every waiter of a round is answered by one flush.
///
/// A waiter registers after its inserts, so a flush that starts after it
/// registered covers them. The first waiter to find no flush running starts
/// a flusher task; while a flush runs, new waiters gather for the next round,
/// and the task keeps going until a round finds nobody waiting. Under load
/// one fsync acknowledges hundreds of messages; idle, nothing runs. The
/// flusher is a task, not the waiter's own future, so a producer that hangs
/// up mid-flush cannot leave the flush half-done.
struct GroupCommit {
    store: Store,
    state: Arc<Mutex<Round>>,
}

#[derive(Default)]
struct Round {
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
    flushing: bool,
}

impl GroupCommit {
    fn new(store: Store) -> GroupCommit {
        GroupCommit {
            store,
            state: Arc::default(),
        }
    }

    async fn wait(&self) -> Result<(), QueueError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.waiters.push(tx);
            !std::mem::replace(&mut st.flushing, true)
        };
        if start {
            tokio::spawn(flusher(self.store.clone(), self.state.clone()));
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(QueueError::Flush(e)),
            Err(_) => Err(QueueError::Flush("the flusher stopped".into())),
        }
    }
}

async fn flusher(store: Store, state: Arc<Mutex<Round>>) {
    let lock = |s: &Mutex<Round>| {
        // The round state is a Vec and a flag; a panic elsewhere cannot leave
        // it half-changed, so a poisoned lock is still usable.
        std::mem::take(&mut s.lock().unwrap_or_else(|p| p.into_inner()).waiters)
    };
    let mut round = lock(&state);
    loop {
        let s = store.clone();
        let result = tokio::task::spawn_blocking(move || s.commit())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = &result {
            tracing::error!(error = %e, waiters = round.len(), "store flush failed");
        }
        let next = {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            let next = std::mem::take(&mut st.waiters);
            if next.is_empty() {
                st.flushing = false;
            }
            next
        };
        if next.is_empty() {
            // Let go of the store before answering, so that once every
            // waiter has its answer nothing here holds the data dir.
            drop(store);
            for w in round {
                let _ = w.send(result.clone());
            }
            return;
        }
        for w in round {
            let _ = w.send(result.clone());
        }
        round = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store in `dir`, waiting for sled's lock if the test has
    /// just dropped a store there.
    fn store(dir: &std::path::Path) -> Store {
        crate::store::when_unlocked(|| Store::open(dir, 1 << 20))
            .unwrap_or_else(|e| panic!("store in {}: {e}", dir.display()))
    }

    fn new(key: Option<&str>) -> NewMessage {
        NewMessage {
            integration: "i".into(),
            message: "M".into(),
            body: Bytes::from_static(b"body"),
            params: BTreeMap::new(),
            headers: BTreeMap::new(),
            ordering_key: key.map(str::to_string),
            idempotency_key: None,
        }
    }

    fn take(q: &Queue, limit: usize) -> Vec<u64> {
        q.take_due(u64::MAX - 1, |_| Some(limit))
            .0
            .into_iter()
            .map(|(_, s)| s)
            .collect()
    }

    fn done(q: &Queue, seq: u64, d: Disposition) {
        let rec = q.record(seq).unwrap().unwrap();
        q.finish(
            rec,
            Some(Attempt {
                n: 1,
                ..Default::default()
            }),
            d,
        )
        .unwrap();
    }

    async fn enqueue(q: &Queue, key: Option<&str>) -> u64 {
        parse_id(&q.enqueue(new(key)).await.unwrap().id).unwrap()
    }

    #[tokio::test]
    async fn ordering_key_lines_go_one_at_a_time_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&store(dir.path())).unwrap();
        let a1 = enqueue(&q, Some("a")).await;
        let a2 = enqueue(&q, Some("a")).await;
        let b1 = enqueue(&q, Some("b")).await;
        let free = enqueue(&q, None).await;
        let mut first = take(&q, 10);
        first.sort();
        assert_eq!(first, vec![a1, b1, free]);
        assert!(take(&q, 10).is_empty(), "a2 waits behind a1");
        done(&q, a1, Disposition::Sent);
        assert_eq!(take(&q, 10), vec![a2]);
    }

    #[tokio::test]
    async fn an_error_blocks_its_line_until_replayed_or_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&store(dir.path())).unwrap();
        let a1 = enqueue(&q, Some("a")).await;
        let a2 = enqueue(&q, Some("a")).await;
        assert_eq!(take(&q, 10), vec![a1]);
        done(&q, a1, Disposition::Final(MessageState::Error));
        assert!(take(&q, 10).is_empty(), "a2 is blocked by a1 in error");

        // Replay puts a copy in a1's place: it goes before a2.
        let copy = q.replay(a1).unwrap();
        assert_eq!(q.record(a1).unwrap().unwrap().state, MessageState::Ignored);
        assert_eq!(copy.replay_of, Some(a1));
        assert_eq!(take(&q, 10), vec![copy.seq]);
        done(&q, copy.seq, Disposition::Final(MessageState::Error));
        assert!(take(&q, 10).is_empty());
        // One copy per message: the original cannot be replayed again.
        let again = q.replay(a1).unwrap_err();
        assert!(matches!(again, QueueError::Replayed { .. }), "{again}");
        assert_eq!(
            again.to_string(),
            format!(
                "message {} was replayed already, as {}; replay {} to send it again",
                format_id(a1),
                format_id(copy.seq),
                format_id(copy.seq)
            )
        );
        assert!(take(&q, 10).is_empty(), "no second copy");

        // a2 says what it waits behind; the copy at the head does not.
        let rec = |seq| q.record(seq).unwrap().unwrap();
        assert_eq!(q.blocked_by(&rec(a2)), Some(copy.seq));
        assert_eq!(q.blocked_by(&rec(copy.seq)), None);

        // Ignore releases the one behind.
        q.ignore(copy.seq).unwrap();
        assert_eq!(take(&q, 10), vec![a2]);
        assert_eq!(q.blocked_by(&rec(a2)), None);
    }

    #[tokio::test]
    async fn a_message_names_the_error_it_waits_behind_even_past_a_replayed_copy() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&store(dir.path())).unwrap();
        let a1 = enqueue(&q, Some("a")).await;
        let a2 = enqueue(&q, Some("a")).await;
        let a3 = enqueue(&q, Some("a")).await;
        assert_eq!(take(&q, 10), vec![a1]);
        done(&q, a1, Disposition::Final(MessageState::Error));
        q.ignore(a1).unwrap();
        assert_eq!(take(&q, 10), vec![a2]);
        done(&q, a2, Disposition::Final(MessageState::Error));
        // The ignored a1 replayed: its copy goes back to a1's place, ahead
        // of a2, which still blocks a3.
        let copy = q.replay(a1).unwrap();
        let rec = |seq| q.record(seq).unwrap().unwrap();
        assert_eq!(q.blocked_by(&rec(a3)), Some(a2));
        assert_eq!(q.blocked_by(&rec(copy.seq)), None);
    }

    #[tokio::test]
    async fn restart_rebuilds_lines_blocks_and_requeues_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let (a1, a2, free);
        {
            let q = Queue::open(&store(dir.path())).unwrap();
            a1 = enqueue(&q, Some("a")).await;
            a2 = enqueue(&q, Some("a")).await;
            free = enqueue(&q, None).await;
            let taken = take(&q, 10);
            assert_eq!(taken.len(), 2);
            done(&q, a1, Disposition::Final(MessageState::Error));
            // `free` is in flight when the process "dies".
            q.sync().await.unwrap();
        }
        let q = Queue::open(&store(dir.path())).unwrap();
        assert_eq!(
            take(&q, 10),
            vec![free],
            "in-flight message is queued again; a2 stays blocked"
        );
        let stats = q.stats("i");
        assert_eq!(stats.errors, 1);
        assert_eq!(stats.queue_depth, 2);
        let copy = q.replay(a1).unwrap();
        assert_eq!(take(&q, 10), vec![copy.seq]);
        done(&q, copy.seq, Disposition::Sent);
        assert_eq!(take(&q, 10), vec![a2]);
    }

    #[tokio::test]
    async fn idempotency_keys_return_the_first_id() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&store(dir.path())).unwrap();
        let mut m = new(None);
        m.idempotency_key = Some("k".into());
        let first = q.enqueue(m.clone()).await.unwrap();
        let again = q.enqueue(m).await.unwrap();
        assert_eq!(first.id, again.id);
        assert!(again.duplicate && !first.duplicate);
        assert_eq!(q.stats("i").queue_depth, 1);
    }

    #[tokio::test]
    async fn an_attempt_that_ends_in_a_retry_replaces_the_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&store(dir.path())).unwrap();
        let m = enqueue(&q, None).await;
        let retry = || Disposition::Retry {
            due_ms: now_ms(),
            counts: true,
        };
        let finish = |n: u32, error: Option<&str>, status: Option<u16>| {
            let rec = q.record(m).unwrap().unwrap();
            let a = Attempt {
                n,
                error: error.map(str::to_string),
                status,
                ..Default::default()
            };
            q.finish(rec, Some(a), retry()).unwrap();
            q.record(m).unwrap().unwrap().last_error
        };
        assert_eq!(
            finish(1, Some("MID server dc1 is not connected"), None).as_deref(),
            Some("MID server dc1 is not connected")
        );
        // A 202 that the integration retries is the latest failure.
        assert_eq!(finish(2, None, Some(202)).as_deref(), Some("HTTP 202"));
        assert_eq!(finish(3, None, Some(503)).as_deref(), Some("HTTP 503"));
        // A retry without an attempt (a repeated wait) leaves it.
        let rec = q.record(m).unwrap().unwrap();
        q.finish(rec, None, retry()).unwrap();
        assert_eq!(
            q.record(m).unwrap().unwrap().last_error.as_deref(),
            Some("HTTP 503")
        );
        // A status that ends the message in `error` (a redirect, which the
        // daemon does not follow) is its last error, on the message and on
        // its integration.
        let rec = q.record(m).unwrap().unwrap();
        let a = Attempt {
            n: 4,
            status: Some(307),
            ..Default::default()
        };
        q.finish(rec, Some(a), Disposition::Final(MessageState::Error))
            .unwrap();
        assert_eq!(
            q.record(m).unwrap().unwrap().last_error.as_deref(),
            Some("HTTP 307")
        );
        assert_eq!(q.stats("i").last_error.as_deref(), Some("HTTP 307"));
    }

    #[tokio::test]
    async fn retries_wait_until_due_and_concurrency_is_respected() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&store(dir.path())).unwrap();
        let m1 = enqueue(&q, None).await;
        let m2 = enqueue(&q, None).await;
        assert_eq!(take(&q, 1), vec![m1], "one in flight at a time");
        assert!(take(&q, 1).is_empty());
        let later = now_ms() + 60_000;
        done(
            &q,
            m1,
            Disposition::Retry {
                due_ms: later,
                counts: true,
            },
        );
        let (taken, next) = q.take_due(now_ms(), |_| Some(1));
        assert_eq!(taken, vec![("i".to_string(), m2)]);
        assert_eq!(next, None, "lane is full; next due is not its concern");
        done(&q, m2, Disposition::Sent);
        let (taken, next) = q.take_due(now_ms(), |_| Some(1));
        assert!(taken.is_empty());
        assert_eq!(next, Some(later));
        assert_eq!(q.record(m1).unwrap().unwrap().attempts, 1);
    }

    #[tokio::test]
    async fn a_worker_goes_on_with_the_next_due_message_and_wakes_the_scheduler_for_the_rest() {
        use futures::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&store(dir.path())).unwrap();
        let woken = |q: &Queue| q.wake.notified().now_or_never().is_some();
        let m1 = enqueue(&q, None).await;
        let m2 = enqueue(&q, None).await;
        let m3 = enqueue(&q, None).await;
        let m4 = enqueue(&q, None).await;
        assert_eq!(take(&q, 1), vec![m1]);
        woken(&q);
        let finish = |seq, d, room| {
            let rec = q.record(seq).unwrap().unwrap();
            q.finish_and_take(rec, None, d, room).unwrap()
        };
        // Sent, with room for one: the worker takes m2, the lane is full
        // again, and the scheduler has nothing to do.
        assert_eq!(finish(m1, Disposition::Sent, Some(1)), Some(m2));
        assert!(!woken(&q), "nothing left for the scheduler");
        assert_eq!(q.record(m1).unwrap().unwrap().state, MessageState::Sent);
        // Room for two after taking one: m4 could go too, so the scheduler
        // is woken for it.
        assert_eq!(finish(m2, Disposition::Sent, Some(3)), Some(m3));
        assert!(woken(&q), "m4 may go alongside m3");
        assert_eq!(take(&q, 3), vec![m4]);
        // A retry sets a new due time: nothing is taken, and the scheduler
        // is woken to time it.
        let later = now_ms() + 60_000;
        let retry = Disposition::Retry {
            due_ms: later,
            counts: true,
        };
        assert_eq!(finish(m3, retry, Some(3)), None);
        assert!(woken(&q));
        // Not allowed to go on (paused, off): nothing taken, woken.
        assert_eq!(finish(m4, Disposition::Sent, None), None);
        assert!(woken(&q));
        let (taken, next) = q.take_due(now_ms(), |_| Some(3));
        assert!(taken.is_empty());
        assert_eq!(next, Some(later));
        // Nor once the queue is closing, whatever room the worker saw.
        let m5 = enqueue(&q, None).await;
        let m6 = enqueue(&q, None).await;
        let (taken, _) = q.take_due(now_ms(), |_| Some(1));
        assert_eq!(taken, vec![("i".to_string(), m5)]);
        q.close();
        assert_eq!(finish(m5, Disposition::Sent, Some(3)), None);
        assert!(take(&q, 3).contains(&m6), "m6 is still queued");
    }

    const DAY: u64 = 24 * 3600 * 1000;

    #[tokio::test]
    async fn prune_passes_what_it_keeps_once_and_finds_late_finishers() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&store(dir.path())).unwrap();
        let slow = enqueue(&q, None).await;
        let fast = enqueue(&q, None).await;
        // One dated a year ahead (the clock was ahead when it was made).
        let ahead = enqueue(&q, None).await;
        let mut rec = q.record(ahead).unwrap().unwrap();
        rec.created_ms += 365 * DAY;
        q.put(&rec).unwrap();
        let after = enqueue(&q, None).await;
        assert_eq!(take(&q, 10).len(), 4);
        for seq in [fast, ahead, after] {
            done(&q, seq, Disposition::Sent);
        }
        // A cutoff after all of them: the future-dated one is no stop.
        let cutoff = now_ms() + 1;
        assert_eq!(q.prune(cutoff).unwrap(), 3);
        assert!(q.record(after).unwrap().is_none());
        assert_eq!(q.lock().prune_cursor, after + 1, "the walk passed them all");
        // `slow` was in flight when the walk passed it; it finishes now and
        // is found in `late`, not by walking again.
        std::thread::sleep(std::time::Duration::from_millis(5));
        done(&q, slow, Disposition::Sent);
        assert_eq!(q.prune(cutoff).unwrap(), 0, "finished after the cutoff");
        assert_eq!(q.prune(now_ms() + 1).unwrap(), 1);
        assert!(q.record(slow).unwrap().is_none());
        assert!(q.lock().late.is_empty());
    }

    #[tokio::test]
    async fn large_bodies_live_in_the_body_log_and_go_with_their_message() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&store(dir.path())).unwrap();
        let big = Bytes::from(vec![b'x'; INLINE_BODY_MAX + 1]);
        let id = q
            .enqueue(NewMessage {
                body: big.clone(),
                ..new(None)
            })
            .await
            .unwrap();
        let seq = parse_id(&id.id).unwrap();
        let small = enqueue(&q, None).await;
        let stored = |seq: u64| q.trees.messages.get(seq).unwrap().unwrap();
        let logged = |seq: u64| q.record(seq).unwrap().unwrap().body_ref.is_some();
        assert!(stored(seq).len() < 128, "the record and the body's place");
        assert!(logged(seq) && !logged(small));
        assert_eq!(q.record(seq).unwrap().unwrap().body, big);
        assert_eq!(&q.record(small).unwrap().unwrap().body[..], b"body");
        take(&q, 10);
        done(&q, seq, Disposition::Final(MessageState::Error));
        assert!(
            stored(seq).len() < 256,
            "a state change does not rewrite it"
        );
        let copy = q.replay(seq).unwrap();
        assert!(logged(copy.seq));
        assert_ne!(copy.body_ref, q.record(seq).unwrap().unwrap().body_ref);
        assert_eq!(q.record(copy.seq).unwrap().unwrap().body, big);
        take(&q, 10);
        done(&q, copy.seq, Disposition::Sent);
        done(&q, small, Disposition::Sent);
        // A new segment after a restart; pruning empties the old one.
        drop(q);
        let q = Queue::open(&store(dir.path())).unwrap();
        assert_eq!(q.record(copy.seq).unwrap().unwrap().body, big);
        assert_eq!(q.trees.body_log.segments(), 2);
        assert_eq!(q.prune(now_ms() + 1).unwrap(), 3);
        assert_eq!(q.trees.body_log.segments(), 1, "only the current one");
    }

    #[tokio::test]
    async fn a_body_lost_before_its_message_was_acknowledged_ends_in_error() {
        let dir = tempfile::tempdir().unwrap();
        let seq = {
            let q = Queue::open(&store(dir.path())).unwrap();
            let big = Bytes::from(vec![b'y'; INLINE_BODY_MAX + 1000]);
            let seq = parse_id(
                &q.enqueue(NewMessage {
                    body: big,
                    ..new(None)
                })
                .await
                .unwrap()
                .id,
            )
            .unwrap();
            seq
        };
        // The record made it to disk, its body did not.
        for entry in std::fs::read_dir(dir.path().join("bodies")).unwrap() {
            std::fs::File::options()
                .write(true)
                .open(entry.unwrap().path())
                .unwrap()
                .set_len(0)
                .unwrap();
        }
        let q = Queue::open(&store(dir.path())).unwrap();
        assert_eq!(take(&q, 10), vec![seq]);
        let e = q.job(seq).unwrap_err();
        q.unreadable("i", seq, &e);
        let rec = q.view(seq).unwrap().unwrap();
        assert_eq!((rec.state, rec.body.len()), (MessageState::Error, 0));
        let attempts = q.attempts(&rec).unwrap();
        assert!(attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("body cannot be read"));
        assert!(take(&q, 10).is_empty(), "not taken again");
        // It cannot be replayed, repair goes past it, and it can be ignored.
        let e = q.replay(seq).unwrap_err();
        assert!(e.to_string().contains("ignore it instead"), "{e}");
        assert!(q.repair("i").unwrap().is_empty());
        assert_eq!(q.ignore(seq).unwrap().state, MessageState::Ignored);
    }

    #[tokio::test]
    async fn json_records_of_schema_3_are_read_and_go_binary_when_written() {
        let dir = tempfile::tempdir().unwrap();
        let st = store(dir.path());
        let record = |seq: u64| {
            let r = serde_json::json!({
                "seq": seq, "integration": "i", "message": "M", "state": "queued",
                "params": {"p": "1"}, "headers": {}, "ordering_key": null,
                "idempotency_key": null, "order": seq, "replay_of": null,
                "replayed_by": null, "attempts": 0, "tries": 0, "created_ms": 5,
                "updated_ms": 5, "due_ms": 5, "last_error": null
            });
            serde_json::to_vec(&r).unwrap()
        };
        let value = |layout: u8, json: Vec<u8>, body: &[u8]| {
            let mut v = vec![layout];
            v.extend_from_slice(&(json.len() as u32).to_be_bytes());
            v.extend_from_slice(&json);
            v.extend_from_slice(body);
            v
        };
        // Bodies long enough to be shared by a later version, and a value
        // with its body apart (as schema 2 left them, whatever their size)
        // longer than its body: its last bytes are its record, not a body
        // to share.
        let inline_body = vec![b'i'; SHARE_BODY_MIN];
        let apart_body = vec![b'a'; SHARE_BODY_MIN];
        let apart_value = value(2, record(2), b"");
        assert!(apart_value.len() >= apart_body.len());
        let trees = &st.messages;
        trees
            .messages
            .insert(1, &value(1, record(1), &inline_body))
            .unwrap();
        trees.messages.insert(2, &apart_value).unwrap();
        trees
            .bodies
            .insert(2u64.to_be_bytes(), &apart_body[..])
            .unwrap();
        let q = Queue::open(&st).unwrap();
        let one = q.record(1).unwrap().unwrap();
        assert_eq!(
            (&one.body[..], one.params["p"].as_str()),
            (&inline_body[..], "1")
        );
        assert_eq!(&q.record(2).unwrap().unwrap().body[..], &apart_body[..]);
        assert_eq!(take(&q, 10), vec![1, 2], "both are queued");
        // A retry, then the delivery: two new versions of each.
        for seq in [1, 2] {
            let due_ms = now_ms();
            done(
                &q,
                seq,
                Disposition::Retry {
                    due_ms,
                    counts: true,
                },
            );
            assert_eq!(take(&q, 10), vec![seq]);
            done(&q, seq, Disposition::Sent);
        }
        for (seq, body) in [(1u64, &inline_body[..]), (2, &apart_body[..])] {
            let raw = q.trees.messages.get(seq).unwrap().unwrap();
            let parts = crate::store::message_parts(&raw).unwrap();
            assert_eq!(parts.format, RecordFormat::Binary);
            let rec = q.record(seq).unwrap().unwrap();
            assert_eq!((rec.state, &rec.body[..]), (MessageState::Sent, body));
            assert_eq!(rec.sent_attempt.map(|a| a.n), Some(1));
            assert_eq!(rec.attempts, 2);
        }
    }

    #[tokio::test]
    async fn a_key_whose_message_is_gone_is_free_again() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&store(dir.path())).unwrap();
        let keyed = || NewMessage {
            idempotency_key: Some("k".into()),
            ..new(None)
        };
        let first = q.enqueue(keyed()).await.unwrap();
        take(&q, 10);
        done(&q, parse_id(&first.id).unwrap(), Disposition::Sent);
        assert_eq!(q.prune(now_ms() + 1).unwrap(), 1);
        let again = q.enqueue(keyed()).await.unwrap();
        assert!(!again.duplicate, "pruning took the key with the message");
        // A key left behind with no message (a crash part way through an
        // older prune) does not swallow the next message either.
        let seq = parse_id(&again.id).unwrap();
        q.trees.messages.remove(seq).unwrap();
        let third = q.enqueue(keyed()).await.unwrap();
        assert!(!third.duplicate && third.id != again.id, "{third:?}");
        assert_eq!(q.enqueue(keyed()).await.unwrap().id, third.id);
    }

    #[tokio::test]
    async fn prune_removes_finished_messages_past_retention_only() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&store(dir.path())).unwrap();
        let sent = enqueue(&q, None).await;
        let errored = enqueue(&q, None).await;
        take(&q, 10);
        done(&q, sent, Disposition::Sent);
        done(&q, errored, Disposition::Final(MessageState::Error));
        assert_eq!(q.prune(now_ms() + 1).unwrap(), 1);
        assert!(q.record(sent).unwrap().is_none());
        assert!(q
            .trees
            .attempts
            .scan_prefix(sent.to_be_bytes())
            .next()
            .is_none());
        assert!(q.record(errored).unwrap().is_some());
    }
}
