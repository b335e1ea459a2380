//! `apply`, `export`, `integrations`, `connections`, `activate`,
//! `deactivate`, `pause`, `resume`, `test`, `mid-servers`, `status`.

use std::io::Read;

use bytes::Bytes;
use serde_json::Value;

use super::client::{seg, ApiClient};
use super::table::{cell, print, rows};
use super::{split_target, CliError, CliResult};

pub async fn apply(api: &ApiClient, json: bool, file: &str) -> CliResult {
    let text = if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::Usage(format!("standard input: {e}")))?;
        s
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| CliError::Usage(format!("{file}: cannot be read: {e}")))?
    };
    let v = api
        .post_raw("/v1/apply", "application/toml", Bytes::from(text), &[])
        .await
        .map_err(|e| match e {
            CliError::Refused(why) => CliError::Refused(format!("{file}: {why}")),
            other => other,
        })?;
    if json {
        super::table::json(&v);
        return Ok(());
    }
    let changed = v["changed"].as_array().cloned().unwrap_or_default();
    if changed.is_empty() {
        outln!("applied {file}: nothing changed");
    } else {
        outln!("applied {file}:");
        for c in changed {
            let names = |key: &str, what: &str| -> Vec<String> {
                c[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(|n| format!("{what} {n}"))
                    .collect()
            };
            let mut removed = names("removed_message_types", "message type");
            let types_removed = !removed.is_empty();
            removed.extend(names("removed_connections", "connection"));
            outln!(
                "  {}: {}{}{}",
                cell(&c, "integration"),
                cell(&c, "state"),
                c["active_connection"]
                    .as_str()
                    .map(|a| format!(", active connection {a}"))
                    .unwrap_or_default(),
                match (removed.is_empty(), types_removed) {
                    (true, _) => String::new(),
                    (false, false) => format!("; removed {}", removed.join(", ")),
                    (false, true) => format!(
                        "; removed {} (messages queued for it end in error when sent)",
                        removed.join(", ")
                    ),
                }
            );
        }
    }
    Ok(())
}

pub async fn export(api: &ApiClient) -> CliResult {
    out!("{}", api.get_text("/v1/export").await?);
    Ok(())
}

pub async fn list(api: &ApiClient, json: bool) -> CliResult {
    let v = api.get("/v1/integrations").await?;
    if json {
        super::table::json(&v);
        return Ok(());
    }
    let rows = rows(&v, |i| {
        vec![
            cell(i, "name"),
            cell(i, "state"),
            cell(i, "active_connection"),
            cell(i, "environment"),
            cell(i, "queue_depth"),
            cell(i, "errors"),
            cell(i, "last_error"),
        ]
    });
    print(
        &[
            "name",
            "state",
            "connection",
            "environment",
            "queued",
            "errors",
            "last error",
        ],
        &rows,
    );
    Ok(())
}

pub async fn connections(api: &ApiClient, json: bool, integration: Option<&str>) -> CliResult {
    let integrations = match integration {
        Some(i) => vec![api.get(&format!("/v1/integrations/{}", seg(i))).await?],
        None => api
            .get("/v1/integrations")
            .await?
            .as_array()
            .cloned()
            .unwrap_or_default(),
    };
    let mut all = Vec::new();
    for i in &integrations {
        for c in i["connections"].as_array().cloned().unwrap_or_default() {
            let mut c = c;
            c["integration"] = i["name"].clone();
            all.push(c);
        }
    }
    if json {
        super::table::json(&Value::Array(all));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|c| {
            vec![
                cell(c, "integration"),
                cell(c, "name"),
                cell(c, "environment"),
                if c["active"].as_bool() == Some(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
                cell(c, "endpoint_url"),
                cell(c, "instance_name"),
                c["auth"]["type"].as_str().unwrap_or("none").to_string(),
                cell(c, "mid_server"),
            ]
        })
        .collect();
    print(
        &[
            "integration",
            "connection",
            "environment",
            "active",
            "endpoint",
            "instance",
            "auth",
            "mid server",
        ],
        &rows,
    );
    Ok(())
}

pub async fn toggle(api: &ApiClient, json: bool, target: &str, action: &str) -> CliResult {
    let (i, c) = split_target(target)?;
    let path = match c {
        None => format!("/v1/integrations/{}/{action}", seg(i)),
        Some(c) => format!(
            "/v1/integrations/{}/connections/{}/{action}",
            seg(i),
            seg(c)
        ),
    };
    let v = api.post(&path, None).await?;
    summary(json, &v);
    Ok(())
}

pub async fn action(api: &ApiClient, json: bool, integration: &str, action: &str) -> CliResult {
    let v = api
        .post(
            &format!("/v1/integrations/{}/{action}", seg(integration)),
            None,
        )
        .await?;
    summary(json, &v);
    Ok(())
}

fn summary(json: bool, v: &Value) {
    if json {
        super::table::json(v);
    } else {
        outln!(
            "{}: {}{}",
            cell(v, "name"),
            cell(v, "state"),
            match (v["active_connection"].as_str(), v["environment"].as_str()) {
                (Some(c), Some(e)) => format!(", active connection {c} ({e})"),
                _ => ", no active connection".into(),
            }
        );
        if let Some(guard) = v["guard_error"].as_str() {
            eprintln!(
                "warning: {guard}: every message ends in error while this connection is active"
            );
        }
    }
}

pub async fn test(api: &ApiClient, json: bool, target: &str) -> CliResult {
    let (i, Some(c)) = split_target(target)? else {
        return Err(CliError::Usage(format!(
            "{target:?}: test needs INTEGRATION/CONNECTION"
        )));
    };
    let v = api
        .post(
            &format!("/v1/integrations/{}/connections/{}/test", seg(i), seg(c)),
            None,
        )
        .await?;
    if json {
        super::table::json(&v);
    } else {
        let ok = v["ok"].as_bool() == Some(true);
        outln!(
            "{i}/{c} ({}): {}",
            cell(&v, "environment"),
            if ok { "reachable" } else { "FAILED" }
        );
        for a in v["attempts"].as_array().cloned().unwrap_or_default() {
            outln!(
                "  {} {} -> {} ({} ms)",
                cell(&a, "method"),
                cell(&a, "url"),
                match a["status"].as_u64() {
                    Some(s) => s.to_string(),
                    None => cell(&a, "error"),
                },
                cell(&a, "duration_ms")
            );
        }
        outln!(
            "  instance guard: {} ({})",
            if v["guard"]["ok"].as_bool() == Some(true) {
                "passes"
            } else {
                "BLOCKS"
            },
            v["guard"]["message"].as_str().unwrap_or("")
        );
        match (v["tls_days_left"].as_i64(), v["tls_error"].as_str()) {
            (Some(d), _) => outln!("  TLS certificate: {d} days left"),
            (None, Some(e)) => outln!("  TLS certificate: {e}"),
            _ => {}
        }
    }
    if v["ok"].as_bool() == Some(true) {
        Ok(())
    } else {
        Err(CliError::Refused(format!(
            "connection test of {target} failed"
        )))
    }
}

pub async fn mid_servers(api: &ApiClient, json: bool) -> CliResult {
    let v = api.get("/v1/mid-servers").await?;
    if json {
        super::table::json(&v);
        return Ok(());
    }
    let rows = rows(&v, |s| {
        vec![
            cell(s, "name"),
            cell(s, "address"),
            cell(s, "since"),
            cell(s, "in_flight"),
            cell(s, "protocol_version"),
            cell(s, "relay_version"),
        ]
    });
    print(
        &[
            "name",
            "address",
            "connected since",
            "in flight",
            "protocol",
            "version",
        ],
        &rows,
    );
    Ok(())
}

pub async fn status(api: &ApiClient, json: bool) -> CliResult {
    let v = api.get("/v1/status").await?;
    if json {
        super::table::json(&v);
        return Ok(());
    }
    outln!(
        "outboxd {} on {}: {} queued, {} sending, {} in error, store {} bytes",
        cell(&v, "version"),
        cell(&v, "instance_name"),
        cell(&v, "queued"),
        cell(&v, "sending"),
        cell(&v, "errors"),
        cell(&v, "store_bytes"),
    );
    outln!();
    let rows = rows(&v["integrations"], |i| {
        vec![
            cell(i, "name"),
            cell(i, "state"),
            format!(
                "{} ({})",
                cell(i, "active_connection"),
                cell(i, "environment")
            ),
            cell(i, "queue_depth"),
            cell(i, "errors"),
            cell(i, "last_sent_at"),
            match i["last_error"].as_str() {
                Some(e) => format!("{} at {}", e, cell(i, "last_error_at")),
                None => "-".into(),
            },
        ]
    });
    print(
        &[
            "integration",
            "state",
            "connection",
            "queued",
            "errors",
            "last sent",
            "last error",
        ],
        &rows,
    );
    if let Some(mids) = v["mid_servers"].as_array() {
        outln!();
        for m in mids {
            outln!(
                "MID server {}: {} relay(s) connected",
                cell(m, "name"),
                m["sessions"].as_array().map_or(0, |s| s.len())
            );
        }
    }
    Ok(())
}
