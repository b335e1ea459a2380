//! `send`, `messages`, `message`, `replay`, `ignore`, `repair`.

use std::collections::BTreeMap;
use std::io::Read;

use bytes::Bytes;
use serde_json::{json, Value};

use super::client::{seg, ApiClient};
use super::table::{cell, print, rows};
use super::{CliError, CliResult};

pub struct SendArgs {
    pub integration: String,
    pub message: String,
    pub body: Option<String>,
    pub params: Vec<String>,
    pub ordering_key: Option<String>,
    pub idempotency_key: Option<String>,
}

pub async fn send(api: &ApiClient, json: bool, a: SendArgs) -> CliResult {
    let body = match a.body.as_deref() {
        None => Bytes::new(),
        Some("-") => {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .map_err(|e| CliError::Usage(format!("standard input: {e}")))?;
            Bytes::from(b)
        }
        Some(s) if s.starts_with('@') => Bytes::from(
            std::fs::read(&s[1..])
                .map_err(|e| CliError::Usage(format!("{}: cannot be read: {e}", &s[1..])))?,
        ),
        Some(s) => Bytes::from(s.to_string()),
    };
    let mut params = BTreeMap::new();
    for p in &a.params {
        let (k, v) = p
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| CliError::Usage(format!("--param {p:?} is not K=V")))?;
        params.insert(k.to_string(), v.to_string());
    }
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", seg(k), seg(v)))
        .collect();
    let mut path = format!(
        "/v1/integrations/{}/messages/{}",
        seg(&a.integration),
        seg(&a.message)
    );
    if !query.is_empty() {
        path.push('?');
        path.push_str(&query.join("&"));
    }
    let content_type = if serde_json::from_slice::<Value>(&body).is_ok() {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let mut headers = Vec::new();
    if let Some(k) = a.ordering_key {
        headers.push(("Ordering-Key", k));
    }
    if let Some(k) = a.idempotency_key {
        headers.push(("Idempotency-Key", k));
    }
    let v = api.post_raw(&path, content_type, body, &headers).await?;
    if json {
        super::table::json(&v);
    } else if v["duplicate"].as_bool() == Some(true) {
        outln!(
            "{} (already enqueued with this idempotency key)",
            cell(&v, "id")
        );
    } else {
        outln!("{} {}", cell(&v, "id"), cell(&v, "state"));
    }
    Ok(())
}

pub async fn list(
    api: &ApiClient,
    json: bool,
    integration: Option<&str>,
    state: Option<&str>,
    limit: usize,
) -> CliResult {
    let mut q = vec![format!("limit={limit}")];
    if let Some(i) = integration {
        q.push(format!("integration={}", seg(i)));
    }
    if let Some(s) = state {
        q.push(format!("state={}", seg(s)));
    }
    let v = api.get(&format!("/v1/messages?{}", q.join("&"))).await?;
    if json {
        super::table::json(&v);
        return Ok(());
    }
    let rows = rows(&v, |m| {
        vec![
            cell(m, "id"),
            cell(m, "integration"),
            cell(m, "message"),
            cell(m, "state"),
            cell(m, "attempt_count"),
            cell(m, "ordering_key"),
            cell(m, "updated_at"),
            cell(m, "last_error"),
        ]
    });
    print(
        &[
            "id",
            "integration",
            "message",
            "state",
            "attempts",
            "ordering key",
            "updated",
            "last error",
        ],
        &rows,
    );
    Ok(())
}

pub async fn show(api: &ApiClient, json: bool, id: &str) -> CliResult {
    let v = api.get(&format!("/v1/messages/{}", seg(id))).await?;
    if json {
        super::table::json(&v);
        return Ok(());
    }
    outln!("message {}", cell(&v, "id"));
    for k in [
        "integration",
        "message",
        "state",
        "ordering_key",
        "idempotency_key",
        "replay_of",
        "replayed_by",
        "created_at",
        "updated_at",
        "due_at",
        "last_error",
    ] {
        if !v[k].is_null() {
            outln!("  {k:<16}{}", cell(&v, k));
        }
    }
    if let Some(head) = v["blocked_by"].as_str() {
        outln!(
            "  {:<16}{head}, in error at the head of its ordering line: replay or ignore it",
            "blocked_by"
        );
    }
    let attempts = v["attempts"].as_array().cloned().unwrap_or_default();
    // Waits for a MID server and goes through another relay are on record
    // but use no attempt; the list's ATTEMPTS column is the count that
    // max_attempts sees.
    match v["attempt_count"].as_u64() {
        Some(counted) if counted != attempts.len() as u64 => outln!(
            "  attempts ({}, {counted} counted toward max_attempts):",
            attempts.len()
        ),
        _ => outln!("  attempts ({}):", attempts.len()),
    }

    for a in attempts {
        outln!(
            "    #{} {} {} via {} [{} {}] -> {} in {} ms: {}",
            cell(&a, "n"),
            cell(&a, "method"),
            cell(&a, "url"),
            cell(&a, "via"),
            cell(&a, "connection"),
            cell(&a, "environment"),
            match a["status"].as_u64() {
                Some(s) => s.to_string(),
                None => "no response".into(),
            },
            cell(&a, "duration_ms"),
            match a["error"].as_str() {
                Some(e) => format!("{} ({e})", cell(&a, "outcome")),
                None => cell(&a, "outcome"),
            }
        );
        // What was sent and what came back, as curl shows it: credentials
        // are masked by the daemon; text from the target is escaped, so
        // it cannot write to the terminal.
        for (arrow, key) in [(">", "request_headers"), ("<", "response_headers")] {
            for (name, value) in a[key].as_object().into_iter().flatten() {
                outln!(
                    "        {arrow} {}: {}",
                    outbox_proto::printable(name),
                    outbox_proto::printable(value.as_str().unwrap_or_default())
                );
            }
        }
        if let Some(excerpt) = a["response_excerpt"].as_str().filter(|x| !x.is_empty()) {
            outln!("        body: {}", outbox_proto::printable(excerpt));
        }
    }
    Ok(())
}

pub async fn act(api: &ApiClient, json: bool, id: &str, action: &str) -> CliResult {
    let v = api
        .post(&format!("/v1/messages/{}/{action}", seg(id)), None)
        .await?;
    if json {
        super::table::json(&v);
    } else if action == "replay" {
        outln!("{id} replayed as {}", cell(&v, "id"));
    } else {
        outln!("{id} {}", cell(&v, "state"));
    }
    Ok(())
}

pub async fn repair(api: &ApiClient, json: bool, integration: &str) -> CliResult {
    let v = api
        .post(
            &format!("/v1/integrations/{}/repair", seg(integration)),
            Some(&json!({})),
        )
        .await?;
    if json {
        super::table::json(&v);
    } else {
        outln!(
            "{integration}: replayed {} message(s) in error",
            cell(&v, "replayed")
        );
    }
    Ok(())
}
