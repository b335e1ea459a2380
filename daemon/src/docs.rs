//! Markdown documentation of every integration and its connections.

use std::fmt::Write;

use crate::catalog::Catalog;
use crate::model::Auth;

/// Renders the catalog as Markdown: per integration its state, settings and
/// message types, then every connection with its environment, endpoint,
/// active flag, MID server, inbound user, variables and notes.
pub fn render(catalog: &Catalog, instance_name: &str) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_doc(&mut out, catalog, instance_name);
    out
}

fn write_doc(out: &mut String, catalog: &Catalog, instance_name: &str) -> std::fmt::Result {
    writeln!(out, "# Integrations of {instance_name}\n")?;
    if catalog.integrations.is_empty() {
        writeln!(out, "No integrations are defined.")?;
    }
    for (name, entry) in &catalog.integrations {
        let spec = &entry.spec;
        writeln!(out, "## {name}\n")?;
        if !spec.description.is_empty() {
            writeln!(out, "{}\n", spec.description)?;
        }
        writeln!(out, "- State: **{}**", entry.state().as_str())?;
        match spec.active_connection() {
            Some(c) => writeln!(
                out,
                "- Active connection: **{}** ({})",
                c.name, c.environment
            )?,
            None => writeln!(out, "- Active connection: none")?,
        }
        writeln!(
            out,
            "- Delivery: up to {} attempts, backoff {} to {}, timeout {}, concurrency {}",
            spec.max_attempts,
            crate::units::format_duration(spec.backoff.initial),
            crate::units::format_duration(spec.backoff.max),
            crate::units::format_duration(spec.timeout),
            spec.concurrency
        )?;
        for a in &spec.response_action {
            let end = match (a.retry, a.state) {
                (true, _) => "retry".to_string(),
                (false, Some(s)) => format!(
                    "no retry, ends {}",
                    serde_json::to_value(s)
                        .map(|v| v.as_str().unwrap_or_default().to_string())
                        .unwrap_or_default()
                ),
                (false, None) => "no retry".to_string(),
            };
            writeln!(out, "- On status {}: {end}", a.code)?;
        }
        writeln!(out)?;
        if !spec.messages.is_empty() {
            writeln!(out, "### Message types\n")?;
            writeln!(out, "| name | method | path |")?;
            writeln!(out, "|---|---|---|")?;
            for m in &spec.messages {
                writeln!(out, "| {} | {} | `{}` |", m.name, m.method, m.path)?;
            }
            writeln!(out)?;
        }
        writeln!(out, "### Connections\n")?;
        if spec.connections.is_empty() {
            writeln!(out, "No connections.\n")?;
        }
        for c in &spec.connections {
            writeln!(
                out,
                "#### {}{}\n",
                c.name,
                if c.active { " (active)" } else { "" }
            )?;
            writeln!(out, "- Environment: {}", c.environment)?;
            writeln!(out, "- Endpoint: {}", c.endpoint_url)?;
            writeln!(out, "- Active: {}", if c.active { "yes" } else { "no" })?;
            let instance = if c.instance_name.is_empty() {
                "(not set: the instance guard lets every message through)".to_string()
            } else {
                c.instance_name.clone()
            };
            writeln!(out, "- Instance name: {instance}")?;
            let auth = match &c.auth {
                Auth::None => "none".to_string(),
                Auth::Basic { username, password } => {
                    format!("basic, user {username}, password {password}")
                }
                Auth::Oauth { profile } => format!("OAuth client credentials, profile {profile}"),
            };
            writeln!(out, "- Authentication: {auth}")?;
            if let Some(p) = &c.protocol_profile {
                writeln!(out, "- Mutual TLS: protocol profile {p}")?;
            }
            writeln!(
                out,
                "- MID server: {}",
                c.mid_server.as_deref().unwrap_or("none (direct)")
            )?;
            writeln!(
                out,
                "- Inbound user: {}",
                c.inbound_user.as_deref().unwrap_or("none")
            )?;
            if c.variables.is_empty() {
                writeln!(out, "- Variables: none")?;
            } else {
                writeln!(out, "- Variables:")?;
                for (k, v) in &c.variables {
                    writeln!(out, "  - `{k}` = `{v}`")?;
                }
            }
            if !c.notes.is_empty() {
                writeln!(out, "\n> {}", c.notes.replace('\n', "\n> "))?;
            }
            writeln!(out)?;
        }
    }
    Ok(())
}
