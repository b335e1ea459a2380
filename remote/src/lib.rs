//! How the daemon (direct connections) and the relay (connections through
//! a MID server) reach remote systems, one way for both:
//!
//! - [`tls`]: rustls client settings from a protocol profile's files, and
//!   the probe that explains a request failed without a reason.
//! - [`pool`]: HTTP/1.1 and HTTP/2 connections kept for reuse, over any
//!   connector that gives hyper-rustls streams (the daemon's plain one, the
//!   relay's allow-list connector).

pub mod pool;
pub mod tls;

/// An error and its causes on one line: hyper's top-level messages alone
/// ("connection error") do not say what went wrong. A cause whose words
/// the line has already is left out.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}
