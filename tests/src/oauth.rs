//! An OAuth 2.0 token endpoint for the client-credentials grant (RFC 6749 §4.4), plain or over TLS, issuing fresh random tokens that a [`Sink`](crate::Sink) can be told to accept.
//!
//! `POST /oauth/token` with an `application/x-www-form-urlencoded` body
//! `grant_type=client_credentials[&scope=..]` and the client id and secret
//! either in an HTTP Basic header or as the form fields `client_id` and
//! `client_secret`. Answers `200 {"access_token","token_type":"Bearer",
//! "expires_in"}`, `401 {"error":"invalid_client"}` for bad credentials,
//! `400` for a wrong grant type, content type or scope.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::pki::{self, Identity, Pki};
use crate::server::{Handler, Peer, Server};

/// The path of the token endpoint.
pub const TOKEN_PATH: &str = "/oauth/token";

/// Builds an [`OAuthServer`]; defaults: client `outbox` / `outbox-secret`,
/// tokens live an hour, plain HTTP, any scope.
pub struct OAuthServerBuilder {
    client_id: String,
    client_secret: String,
    expires_in: u64,
    tls: Option<Identity>,
    delay: Duration,
    scope: Option<String>,
}

/// A running token endpoint; stops when dropped.
pub struct OAuthServer {
    server: Server,
    state: Arc<TokenState>,
    https: bool,
}

/// One request the endpoint answered.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// The decoded form fields (`client_secret` included: tests check what
    /// was sent, the harness prints nothing).
    pub form: HashMap<String, String>,
    /// Whether the client authenticated with an HTTP Basic header.
    pub basic: bool,
    /// The client id it authenticated as, whichever way.
    pub client_id: Option<String>,
    /// What the endpoint answered.
    pub status: u16,
}

/// A token the endpoint handed out.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    pub token: String,
    pub issued_at: Instant,
    pub expires_at: Instant,
    pub scope: Option<String>,
}

/// What the endpoint shares with the sinks that accept its tokens.
pub(crate) struct TokenState {
    client_id: String,
    client_secret: String,
    expires_in: AtomicU64,
    delay: Duration,
    scope: Option<String>,
    /// Tokens not revoked, with their expiry.
    live: Mutex<HashMap<String, Instant>>,
    issued: Mutex<Vec<IssuedToken>>,
    refused: AtomicUsize,
    requests: Mutex<Vec<TokenRequest>>,
}

impl OAuthServer {
    pub fn builder() -> OAuthServerBuilder {
        OAuthServerBuilder {
            client_id: "outbox".into(),
            client_secret: "outbox-secret".into(),
            expires_in: 3600,
            tls: None,
            delay: Duration::ZERO,
            scope: None,
        }
    }

    /// The token URL: `https://localhost:PORT/oauth/token` over TLS (the
    /// name the [`Pki`] server certificate carries), else
    /// `http://127.0.0.1:PORT/oauth/token`.
    pub fn token_url(&self) -> String {
        if self.https {
            format!("https://localhost:{}{TOKEN_PATH}", self.server.addr.port())
        } else {
            format!("http://{}{TOKEN_PATH}", self.server.addr)
        }
    }

    pub fn client_id(&self) -> &str {
        &self.state.client_id
    }

    pub fn client_secret(&self) -> &str {
        &self.state.client_secret
    }

    /// How many tokens it has issued.
    pub fn issued(&self) -> usize {
        lock(&self.state.issued).len()
    }

    /// Every token issued, oldest first.
    pub fn issued_tokens(&self) -> Vec<IssuedToken> {
        lock(&self.state.issued).clone()
    }

    /// The tokens a sink built with `bearer_from` accepts now: issued, not
    /// expired, not revoked.
    pub fn valid_tokens(&self) -> Vec<String> {
        let now = Instant::now();
        lock(&self.state.live)
            .iter()
            .filter(|(_, exp)| now < **exp)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// Whether `token` is valid now.
    pub fn accepts(&self, token: &str) -> bool {
        self.state.accepts(token)
    }

    /// Requests refused for bad client credentials.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::SeqCst)
    }

    /// Every request answered, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        lock(&self.state.requests).clone()
    }

    /// Every token stops being valid at once, as when the remote side
    /// rotates its keys: the next delivery gets a 401 and must refresh.
    pub fn revoke_all(&self) {
        lock(&self.state.live).clear();
    }

    /// The `expires_in` of tokens issued from now on.
    pub fn set_expires_in(&self, secs: u64) {
        self.state.expires_in.store(secs, Ordering::SeqCst);
    }

    pub(crate) fn state(&self) -> Arc<TokenState> {
        self.state.clone()
    }
}

impl OAuthServerBuilder {
    /// The one client it knows.
    pub fn client(mut self, id: &str, secret: &str) -> Self {
        self.client_id = id.into();
        self.client_secret = secret.into();
        self
    }

    /// Lifetime of the tokens it issues, in seconds (the `expires_in` of
    /// the answer).
    pub fn expires_in(mut self, secs: u64) -> Self {
        self.expires_in = secs;
        self
    }

    /// Serve over TLS with the [`Pki`]'s server certificate.
    pub fn tls(mut self, pki: &Pki) -> Self {
        self.tls = Some(pki.server().clone());
        self
    }

    /// Wait this long before issuing each token, so that concurrent
    /// deliveries pile up behind one token request.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Refuse (`400 invalid_scope`) requests whose `scope` is not `scope`.
    pub fn require_scope(mut self, scope: &str) -> Self {
        self.scope = Some(scope.into());
        self
    }

    pub async fn start(self) -> OAuthServer {
        let state = Arc::new(TokenState {
            client_id: self.client_id,
            client_secret: self.client_secret,
            expires_in: AtomicU64::new(self.expires_in),
            delay: self.delay,
            scope: self.scope,
            live: Mutex::default(),
            issued: Mutex::default(),
            refused: AtomicUsize::new(0),
            requests: Mutex::default(),
        });
        let st = state.clone();
        let handler: Handler = Arc::new(move |_: Peer, req| {
            let st = st.clone();
            Box::pin(async move { st.answer(req).await })
        });
        let https = self.tls.is_some();
        let tls = self
            .tls
            .map(|id| pki::server_config(&id, None, &[b"h2", b"http/1.1"]));
        let server = Server::start(tls, true, handler).await;
        OAuthServer {
            server,
            state,
            https,
        }
    }
}

impl TokenState {
    /// Whether `token` was issued, is not revoked and has not expired.
    pub(crate) fn accepts(&self, token: &str) -> bool {
        lock(&self.live)
            .get(token)
            .is_some_and(|exp| Instant::now() < *exp)
    }

    async fn answer(&self, req: Request<Bytes>) -> Response<Full<Bytes>> {
        if req.uri().path() != TOKEN_PATH {
            return reply(StatusCode::NOT_FOUND, json!({"error": "not_found"}));
        }
        if req.method() != Method::POST {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "invalid_request", "error_description": "use POST"}),
            );
        }
        let form = parse_form(&String::from_utf8_lossy(req.body()));
        let basic = basic_credentials(req.headers());
        let creds = basic.clone().or_else(|| {
            Some((
                form.get("client_id")?.clone(),
                form.get("client_secret")?.clone(),
            ))
        });
        let form_encoded = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let scope = form.get("scope").cloned();
        let resp = if !form_encoded {
            reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_request", "error_description": "expected an application/x-www-form-urlencoded body"}),
            )
        } else if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
            reply(
                StatusCode::BAD_REQUEST,
                json!({"error": "unsupported_grant_type"}),
            )
        } else if creds.as_ref() != Some(&(self.client_id.clone(), self.client_secret.clone())) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                json!({"error": "invalid_client", "error_description": "client authentication failed"}),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"oauth\""),
            );
            r
        } else if self.scope.is_some() && scope != self.scope {
            reply(StatusCode::BAD_REQUEST, json!({"error": "invalid_scope"}))
        } else {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            self.issue(scope)
        };
        lock(&self.requests).push(TokenRequest {
            form,
            basic: basic.is_some(),
            client_id: creds.map(|(id, _)| id),
            status: resp.status().as_u16(),
        });
        resp
    }

    fn issue(&self, scope: Option<String>) -> Response<Full<Bytes>> {
        let token = format!("tok-{}", crate::random::hex::<16>());
        let expires_in = self.expires_in.load(Ordering::SeqCst);
        let issued_at = Instant::now();
        let expires_at = issued_at + Duration::from_secs(expires_in);
        lock(&self.live).insert(token.clone(), expires_at);
        lock(&self.issued).push(IssuedToken {
            token: token.clone(),
            issued_at,
            expires_at,
            scope: scope.clone(),
        });
        let mut body =
            json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in});
        if let Some(scope) = scope {
            body["scope"] = scope.into();
        }
        reply(StatusCode::OK, body)
    }
}

/// The id and secret of an `Authorization: Basic` header; RFC 6749 §2.3.1
/// form-encodes both before joining them with `:`.
fn basic_credentials(headers: &http::HeaderMap) -> Option<(String, String)> {
    let encoded = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((form_decode(id), form_decode(secret)))
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // RFC 6749 §5.1: token responses are not to be cached.
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn parse_form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .map(|(k, v)| (form_decode(k), form_decode(v)))
        .collect()
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a
/// byte; a malformed escape is kept as is.
pub fn form_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock is already failing the test; the data
    // is still the best record of what happened.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
