//! OAuth 2.0 client credentials: one cached token per profile.
//!
//! A token is used until 80% of its `expires_in` has passed, then fetched
//! again. Each profile has one async mutex around its token, so however many
//! deliveries need a token at once, one request goes to the token endpoint
//! and the rest wait for its answer. A 401 from the remote system
//! invalidates the token it was sent with (not a newer one), and the
//! delivery fetches a fresh one once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};

use crate::client::{Clients, TlsSettings};
use crate::deliver::{Route, Via};
use crate::model::OAuthProfile;
use outbox_secret::SecretValue;

/// Fraction of `expires_in` after which a token is refreshed.
const REFRESH_AT: f64 = 0.8;
/// Used when the token endpoint does not say how long a token lives.
const DEFAULT_EXPIRES_IN: u64 = 3600;
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Token answers are small JSON documents; JWTs reach a few KiB.
const TOKEN_BODY_LIMIT: usize = 64 * 1024;

#[derive(Clone)]
struct Token {
    value: SecretValue,
    refresh_at: Instant,
}

#[derive(Default)]
pub struct TokenCache {
    profiles: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Token>>>>>,
    /// Tokens fetched, for metrics and tests.
    pub fetched: std::sync::atomic::AtomicU64,
}

impl TokenCache {
    fn slot(&self, profile: &str) -> Arc<tokio::sync::Mutex<Option<Token>>> {
        self.profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(profile.to_string())
            .or_default()
            .clone()
    }

    /// A valid token for `profile`, fetching one if needed the way the
    /// connection's requests go: directly, or through its relay (with the
    /// relay's protocol profile `relay_profile`), so a token endpoint inside
    /// the relay's network is reached as the remote system is.
    pub async fn token(
        &self,
        profile: &OAuthProfile,
        clients: &Clients,
        via: &Via,
        relay_profile: Option<&str>,
    ) -> Result<SecretValue, String> {
        let slot = self.slot(&profile.name);
        let mut guard = slot.lock().await;
        if let Some(t) = guard.as_ref() {
            if Instant::now() < t.refresh_at {
                return Ok(t.value.clone());
            }
        }
        let token = fetch(profile, clients, via, relay_profile).await?;
        self.fetched
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *guard = Some(token.clone());
        Ok(token.value)
    }

    /// Forgets `used` if it is still the cached token of `profile`.
    pub async fn invalidate(&self, profile: &str, used: &SecretValue) {
        let slot = self.slot(profile);
        let mut guard = slot.lock().await;
        if guard.as_ref().is_some_and(|t| t.value == *used) {
            *guard = None;
        }
    }

    /// Drops every cached token (profiles may have changed).
    pub fn clear(&self) {
        self.profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

async fn fetch(
    profile: &OAuthProfile,
    clients: &Clients,
    via: &Via,
    relay_profile: Option<&str>,
) -> Result<Token, String> {
    let what = format!("oauth profile {}", profile.name);
    let secret = profile
        .client_secret
        .resolve()
        .map_err(|e| format!("{what}: client_secret: {e}"))?;
    let mut form = String::from("grant_type=client_credentials");
    if !profile.scope.is_empty() {
        form.push_str("&scope=");
        form.push_str(&form_encode(&profile.scope));
    }
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        form_encode(&profile.client_id),
        form_encode(&secret)
    ));
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    let mut credentials = HeaderValue::from_str(&format!("Basic {basic}"))
        .map_err(|_| format!("{what}: client_id or client_secret is no header value"))?;
    credentials.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, credentials);
    let started = Instant::now();
    let route = Route::new(via, relay_profile, || {
        let tls = TlsSettings {
            ca: profile.ca.clone(),
            identity: None,
        };
        clients.get(&tls).map_err(|e| format!("{what}: {e}"))
    })?;
    // (No TLS probe on a vague failure, as a message's request has: the
    // token's lock is held, and every delivery waiting for it would wait
    // for the probe too.)
    let sent = route
        .send(
            &Method::POST,
            &profile.token_url,
            headers,
            Bytes::from(form),
            TOKEN_TIMEOUT,
            TOKEN_BODY_LIMIT,
        )
        .await
        .map_err(|e| format!("{what}: token_url {}: {e}", profile.token_url))?;
    let reply = sent.result.map_err(|e| {
        format!(
            "{what}: token endpoint {}{}: {e}",
            profile.token_url,
            route.through()
        )
    })?;
    if reply.status != 200 {
        return Err(format!(
            "{what}: token endpoint {} answered {}: {}",
            profile.token_url,
            reply.status,
            String::from_utf8_lossy(&reply.excerpt).trim()
        ));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        access_token: String,
        expires_in: Option<u64>,
    }
    let answer: Answer = serde_json::from_slice(&reply.excerpt).map_err(|e| {
        format!(
            "{what}: token endpoint {} answered without an access_token: {e}",
            profile.token_url
        )
    })?;
    let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(DEFAULT_EXPIRES_IN));
    Ok(Token {
        value: SecretValue::new(answer.access_token),
        refresh_at: started + lifetime.mul_f64(REFRESH_AT),
    })
}

/// `application/x-www-form-urlencoded` encoding (RFC 6749 §2.3.1 asks for
/// it on client credentials in the basic header too).
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
