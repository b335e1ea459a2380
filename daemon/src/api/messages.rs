//! Message endpoints: enqueue, read, list, replay, ignore, repair; and the
//! connection test.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::{json_response, ok, ApiError, ApiResult, Call};
use crate::app::App;
use crate::queue::{
    format_id, parse_id, Attempt, MessageRecord, MessageState, NewMessage, QueueError,
};

pub async fn route(app: &Arc<App>, call: &Call, segs: &[&str]) -> ApiResult {
    match (call.method.clone(), segs) {
        (Method::POST, ["v1", "integrations", i, "messages"]) => {
            enqueue_envelope(app, call, i).await
        }
        (Method::POST, ["v1", "integrations", i, "messages", t]) => {
            enqueue_raw(app, call, i, t).await
        }
        (Method::POST, ["v1", "integrations", i, "repair"]) => repair(app, i).await,
        (Method::POST, ["v1", "integrations", i, "connections", c, "test"]) => {
            let catalog = app.catalog();
            let entry = catalog.entry(i)?;
            let conn = entry.spec.connection(c).ok_or_else(|| {
                ApiError::not_found(format!("integration {i} has no connection {c:?}"))
            })?;
            ok(&crate::conntest::run(app, &catalog, i, conn).await)
        }
        (Method::GET, ["v1", "messages"]) => list(app, call).await,
        (Method::GET, ["v1", "messages", id]) => get(app, id).await,
        (Method::POST, ["v1", "messages", id, "replay"]) => {
            let seq = parse_id(id).map_err(queue_error)?;
            let q = app.clone();
            let copy = blocking(move || q.queue.replay(seq)).await?;
            tracing::info!(id = %format_id(seq), copy = %format_id(copy.seq), "replayed");
            ok(&view(&copy, None))
        }
        (Method::POST, ["v1", "messages", id, "ignore"]) => {
            let seq = parse_id(id).map_err(queue_error)?;
            let q = app.clone();
            let rec = blocking(move || q.queue.ignore(seq)).await?;
            tracing::info!(id = %format_id(seq), "ignored");
            ok(&view(&rec, None))
        }
        (Method::GET, ["v1", "status"]) => ok(&crate::status::status(app)),
        (_, ["v1", ..]) | (_, ["healthz"]) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no such endpoint: {} /{}",
                call.method,
                call.segments.join("/")
            ),
        )),
        _ => Err(ApiError::not_found(format!(
            "no such endpoint: {} /{}",
            call.method,
            call.segments.join("/")
        ))),
    }
}

/// The JSON envelope of `POST /v1/integrations/{i}/messages`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    message: String,
    #[serde(default)]
    body: Option<serde_json::Value>,
    #[serde(default)]
    params: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    ordering_key: Option<String>,
    idempotency_key: Option<String>,
}

async fn enqueue_envelope(app: &Arc<App>, call: &Call, integration: &str) -> ApiResult {
    let env: Envelope = call.json()?;
    let body = match env.body {
        None | Some(serde_json::Value::Null) => Bytes::new(),
        Some(serde_json::Value::String(s)) => Bytes::from(s),
        Some(other) => Bytes::from(other.to_string()),
    };
    let mut params = BTreeMap::new();
    for (k, v) in env.params {
        let text = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            other => {
                return Err(ApiError::bad_request(format!(
                    "params.{k}: expected a string, number or boolean, found {other}"
                )))
            }
        };
        params.insert(k, text);
    }
    // A header that could never be sent is refused now, not at send time.
    for (name, value) in &env.headers {
        crate::deliver::header(name, value)
            .map_err(|e| ApiError::bad_request(format!("headers.{name}: {e}")))?;
    }
    enqueue(
        app,
        NewMessage {
            integration: integration.to_string(),
            message: env.message,
            body,
            params,
            headers: env.headers,
            ordering_key: env.ordering_key,
            idempotency_key: env.idempotency_key,
        },
    )
    .await
}

async fn enqueue_raw(app: &Arc<App>, call: &Call, integration: &str, message: &str) -> ApiResult {
    // The producer's Content-Type travels with the body, unless the message
    // type fixes one (then the type's wins: it describes the remote API).
    let typed_ct = app
        .catalog()
        .integrations
        .get(integration)
        .and_then(|e| e.spec.message_type(message))
        .is_some_and(|m| {
            m.headers
                .keys()
                .any(|k| k.eq_ignore_ascii_case("content-type"))
        });
    let mut headers = BTreeMap::new();
    if let (false, Some(ct)) = (typed_ct, call.header("content-type")) {
        headers.insert("Content-Type".to_string(), ct.to_string());
    }
    enqueue(
        app,
        NewMessage {
            integration: integration.to_string(),
            message: message.to_string(),
            body: call.body.clone(),
            params: call.query.iter().cloned().collect(),
            headers,
            ordering_key: call.header("ordering-key").map(str::to_string),
            idempotency_key: call.header("idempotency-key").map(str::to_string),
        },
    )
    .await
}

async fn enqueue(app: &Arc<App>, new: NewMessage) -> ApiResult {
    let catalog = app.catalog();
    let entry = catalog.entry(&new.integration)?;
    let Some(message_type) = entry.spec.message_type(&new.message) else {
        let known: Vec<&str> = entry
            .spec
            .messages
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        return Err(ApiError::not_found(format!(
            "integration {} has no message type {:?} (it has: {})",
            new.integration,
            new.message,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    };
    // A parameter the message type's templates use and the message lacks
    // would fail every attempt: the producer hears of it now.
    if let Some((place, key)) = missing_param(message_type, &new.params) {
        // A producer's retry of a message taken before still gets its id
        // (SPEC §7); anything else hears now what every attempt would say.
        let retry = match &new.idempotency_key {
            Some(k) => app.queue.seen(&new.integration, k).map_err(queue_error)?,
            None => false,
        };
        if !retry {
            return Err(ApiError::bad_request(format!(
                "params.{key}: message type {} uses ${{params.{key}}} in its {place}, \
                 and this message does not give it",
                new.message
            )));
        }
    }
    for (what, value) in [
        ("ordering_key", &new.ordering_key),
        ("idempotency_key", &new.idempotency_key),
    ] {
        if value
            .as_ref()
            .is_some_and(|v| v.is_empty() || v.len() > 256)
        {
            return Err(ApiError::bad_request(format!(
                "{what}: must be 1 to 256 bytes"
            )));
        }
    }
    let integration = new.integration.clone();
    let enqueued = app.queue.enqueue(new).await.map_err(queue_error)?;
    if !enqueued.duplicate {
        app.metrics.enqueued(&integration).increment(1);
    }
    Ok(json_response(StatusCode::ACCEPTED, &enqueued))
}

/// The first `${params.K}` of `message_type`'s path or header values that
/// `params` lacks, with where it is. A malformed template is not this
/// check's to report: apply refused it, and an attempt would say so.
fn missing_param<'m>(
    message_type: &'m crate::model::MessageType,
    params: &BTreeMap<String, String>,
) -> Option<(String, &'m str)> {
    for (header, template) in message_type.templates() {
        for r in crate::template::refs(template).unwrap_or_default() {
            if r.namespace == "params" && !params.contains_key(r.key) {
                let place = match header {
                    None => "path".to_string(),
                    Some(name) => format!("header {name}"),
                };
                return Some((place, r.key));
            }
        }
    }
    None
}

async fn get(app: &Arc<App>, id: &str) -> ApiResult {
    let seq = parse_id(id).map_err(queue_error)?;
    let q = app.clone();
    let (rec, attempts, body, blocked_by) = blocking(move || {
        let rec = q
            .queue
            .view(seq)?
            .ok_or_else(|| QueueError::UnknownMessage(format_id(seq)))?;
        let attempts = q.queue.attempts(&rec)?;
        let body = rec.body.clone();
        let blocked_by = q.queue.blocked_by(&rec);
        Ok((rec, attempts, body, blocked_by))
    })
    .await?;
    let mut v = view(&rec, Some(attempts));
    v.blocked_by = blocked_by.map(format_id);
    v.body = Some(String::from_utf8_lossy(&body).into_owned());
    ok(&v)
}

async fn list(app: &Arc<App>, call: &Call) -> ApiResult {
    let integration = call.query("integration").map(str::to_string);
    let state = match call.query("state") {
        None | Some("") => None,
        Some(s) => Some(MessageState::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "state: {s:?} is not one of queued, sending, sent, error, ignored"
            ))
        })?),
    };
    let limit = match call.query("limit") {
        None => 100,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit: {l:?} is not a number from 1 to 10000"))
            })?,
    };
    if let Some(i) = &integration {
        app.catalog().entry(i)?;
    }
    let q = app.clone();
    let records = blocking(move || Ok(q.queue.list(integration.as_deref(), state, limit)?)).await?;
    let views: Vec<MessageView> = records.iter().map(|r| view(r, None)).collect();
    ok(&views)
}

async fn repair(app: &Arc<App>, integration: &str) -> ApiResult {
    app.catalog().entry(integration)?;
    let q = app.clone();
    let name = integration.to_string();
    let copies = blocking(move || q.queue.repair(&name)).await?;
    tracing::info!(integration, replayed = copies.len(), "repaired");
    let views: Vec<MessageView> = copies.iter().map(|r| view(r, None)).collect();
    ok(&serde_json::json!({ "replayed": views.len(), "messages": views }))
}

/// A message as the API shows it.
#[derive(Serialize)]
pub struct MessageView {
    pub id: String,
    pub integration: String,
    pub message: String,
    pub state: MessageState,
    pub ordering_key: Option<String>,
    pub idempotency_key: Option<String>,
    pub replay_of: Option<String>,
    pub replayed_by: Option<String>,
    pub attempt_count: u32,
    pub params: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
    pub created_at: String,
    pub updated_at: String,
    pub due_at: Option<String>,
    pub last_error: Option<String>,
    /// The message in `error` at the head of this one's ordering line,
    /// which holds it until it is replayed and sent, or ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<Attempt>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

pub fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn view(r: &MessageRecord, attempts: Option<Vec<Attempt>>) -> MessageView {
    MessageView {
        id: format_id(r.seq),
        integration: r.integration.clone(),
        message: r.message.clone(),
        state: r.state,
        ordering_key: r.ordering_key.clone(),
        idempotency_key: r.idempotency_key.clone(),
        replay_of: r.replay_of.map(format_id),
        replayed_by: r.replayed_by.map(format_id),
        attempt_count: r.attempts,
        params: r.params.clone(),
        headers: r.headers.clone(),
        created_at: time(r.created_ms),
        updated_at: time(r.updated_ms),
        due_at: matches!(r.state, MessageState::Queued).then(|| time(r.due_ms)),
        last_error: r.last_error.clone(),
        blocked_by: None,
        attempts,
        body: None,
    }
}

fn queue_error(e: QueueError) -> ApiError {
    let status = match &e {
        QueueError::UnknownMessage(_) => StatusCode::NOT_FOUND,
        QueueError::BadId(_) => StatusCode::BAD_REQUEST,
        QueueError::WrongState { .. }
        | QueueError::Unreadable { .. }
        | QueueError::Replayed { .. } => StatusCode::CONFLICT,
        QueueError::Flush(_) | QueueError::ShuttingDown | QueueError::Store(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    ApiError::new(status, e.to_string())
}

/// Runs store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, QueueError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(queue_error)
}
