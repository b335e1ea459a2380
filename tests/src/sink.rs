//! The remote system: a real HTTP(S) server on 127.0.0.1 that checks client certificates and credentials, answers a script of replies then a default one, and records every request.
//!
//! ```text
//! let sink = Sink::builder()
//!     .tls(&pki)
//!     .require_client_cert(pki.ca_pem())
//!     .basic("svc-outbox", "pw")
//!     .script([Reply::new(503).header("Retry-After", "1"), 503.into()])
//!     .start()
//!     .await;
//! // ... deliver ...
//! let seen = sink.wait_for(3, WAIT).await;
//! ```
//!
//! Per request, in order: a request without valid credentials is answered
//! `401` (and does not consume the script); otherwise the next scripted
//! reply, or the default one once the script is spent. Every request is
//! recorded on arrival, before any delay, with the status it gets.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Version};
use http_body_util::Full;
use tokio::sync::watch;

use crate::oauth::{OAuthServer, TokenState};
use crate::pki::{self, Identity, Pki};
use crate::server::{Handler, Peer, Server};

/// Builds a [`Sink`]; defaults: plain HTTP, no credentials checked, empty
/// script, status 200, no delay, HTTP/1.1 and h2.
pub struct SinkBuilder {
    tls: Option<Identity>,
    client_ca: Option<String>,
    auth: Auth,
    script: VecDeque<Reply>,
    default: Reply,
    delay: Duration,
    http2: bool,
}

/// A running remote system; stops (listener and connections) when dropped.
pub struct Sink {
    server: Server,
    shared: Arc<Shared>,
    https: bool,
}

/// One answer of the sink.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body; `None` answers `{"status":N}` as JSON.
    pub body: Option<Bytes>,
    /// Overrides the sink's delay for this reply.
    pub delay: Option<Duration>,
}

/// A request the sink received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: Method,
    /// Path and query, as sent.
    pub path: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// DER of the client certificate the connection presented, over TLS.
    pub client_cert: Option<Vec<u8>>,
    /// The status the sink answered (401 when credentials were refused).
    pub status: u16,
    pub at: Instant,
}

/// Which credentials the sink demands.
#[derive(Clone)]
enum Auth {
    Open,
    Basic { user: String, password: String },
    Bearer(String),
    Issued(Arc<TokenState>),
}

struct Shared {
    state: Mutex<State>,
    /// The number of requests received, for `wait_for`.
    count: watch::Sender<usize>,
}

struct State {
    auth: Auth,
    script: VecDeque<Reply>,
    default: Reply,
    delay: Duration,
    received: Vec<Received>,
}

impl Sink {
    pub fn builder() -> SinkBuilder {
        SinkBuilder {
            tls: None,
            client_ca: None,
            auth: Auth::Open,
            script: VecDeque::new(),
            default: Reply::new(200),
            delay: Duration::ZERO,
            http2: true,
        }
    }

    /// A plain-HTTP sink answering 200 to everything.
    pub async fn start() -> Sink {
        Sink::builder().start().await
    }

    /// `https://localhost:PORT` over TLS (the name the [`Pki`] server
    /// certificate carries), else `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        if self.https {
            format!("https://localhost:{}", self.server.addr.port())
        } else {
            format!("http://{}", self.server.addr)
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Every request received, in order of arrival.
    pub fn received(&self) -> Vec<Received> {
        self.state().received.clone()
    }

    /// The last request received.
    pub fn last(&self) -> Option<Received> {
        self.state().received.last().cloned()
    }

    /// How many requests it received.
    pub fn count(&self) -> usize {
        self.state().received.len()
    }

    /// The `Idempotency-Key` of every request, in order of arrival
    /// (repeated when a message was sent again).
    pub fn ids(&self) -> Vec<String> {
        self.state()
            .received
            .iter()
            .filter_map(|r| r.header("idempotency-key").map(str::to_string))
            .collect()
    }

    /// The distinct `Idempotency-Key` values: one per message delivered.
    pub fn distinct_ids(&self) -> HashSet<String> {
        self.ids().into_iter().collect()
    }

    /// Waits until at least `n` requests arrived and returns them all;
    /// panics after `timeout` with what did arrive.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let mut count = self.shared.count.subscribe();
        if tokio::time::timeout(timeout, count.wait_for(|c| *c >= n))
            .await
            .is_err()
        {
            let seen: Vec<String> = self
                .received()
                .iter()
                .map(|r| format!("{} {} -> {}", r.method, r.path, r.status))
                .collect();
            panic!(
                "sink {} got {} requests within {timeout:?}, expected {n}: {seen:#?}",
                self.url(),
                seen.len()
            );
        }
        self.received()
    }

    /// The default status from now on (the script, if any, comes first).
    pub fn set_status(&self, status: u16) {
        self.state().default = Reply::new(status);
    }

    /// The default reply from now on.
    pub fn set_reply(&self, reply: impl Into<Reply>) {
        self.state().default = reply.into();
    }

    /// Appends replies to the script.
    pub fn push_script<R: Into<Reply>>(&self, replies: impl IntoIterator<Item = R>) {
        self.state()
            .script
            .extend(replies.into_iter().map(Into::into));
    }

    /// Replies still scripted.
    pub fn script_left(&self) -> usize {
        self.state().script.len()
    }

    /// The delay before every answer from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.state().delay = delay;
    }

    /// Forgets the requests received so far.
    pub fn clear(&self) {
        self.state().received.clear();
        self.shared.count.send_replace(0);
    }

    /// Why TLS handshakes were refused (no client certificate, an unknown
    /// CA, ...), in order.
    pub fn rejected_handshakes(&self) -> Vec<String> {
        self.server
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state()
    }
}

impl SinkBuilder {
    /// HTTPS with the [`Pki`]'s server certificate (`localhost`,
    /// `127.0.0.1`).
    pub fn tls(self, pki: &Pki) -> Self {
        self.tls_identity(pki.server())
    }

    /// HTTPS with another server certificate (e.g. a short-lived one).
    pub fn tls_identity(mut self, identity: &Identity) -> Self {
        self.tls = Some(identity.clone());
        self
    }

    /// Refuse the TLS handshake unless the client presents a certificate
    /// signed by a CA in `ca_pem`. Needs [`tls`](Self::tls).
    pub fn require_client_cert(mut self, ca_pem: &str) -> Self {
        self.client_ca = Some(ca_pem.into());
        self
    }

    /// Demand `Authorization: Basic` with these credentials (401 otherwise).
    pub fn basic(mut self, user: &str, password: &str) -> Self {
        self.auth = Auth::Basic {
            user: user.into(),
            password: password.into(),
        };
        self
    }

    /// Demand `Authorization: Bearer token` (401 otherwise).
    pub fn bearer(mut self, token: &str) -> Self {
        self.auth = Auth::Bearer(token.into());
        self
    }

    /// Demand a bearer token `oauth` issued and still holds valid (401
    /// otherwise, also after [`OAuthServer::revoke_all`]).
    pub fn bearer_from(mut self, oauth: &OAuthServer) -> Self {
        self.auth = Auth::Issued(oauth.state());
        self
    }

    /// Replies answered in order, one per request, before the default one:
    /// `.script([503, 503, 503])`, or [`Reply`]s with headers.
    pub fn script<R: Into<Reply>>(mut self, replies: impl IntoIterator<Item = R>) -> Self {
        self.script.extend(replies.into_iter().map(Into::into));
        self
    }

    /// The default status (200 unless set).
    pub fn status(mut self, status: u16) -> Self {
        self.default = Reply::new(status);
        self
    }

    /// The default reply.
    pub fn reply(mut self, reply: impl Into<Reply>) -> Self {
        self.default = reply.into();
        self
    }

    /// Wait this long before each answer: a slow remote system.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Serve h2 as well as HTTP/1.1 (the default); `false` serves and
    /// offers HTTP/1.1 only.
    pub fn http2(mut self, on: bool) -> Self {
        self.http2 = on;
        self
    }

    pub async fn start(self) -> Sink {
        assert!(
            self.client_ca.is_none() || self.tls.is_some(),
            "require_client_cert needs tls"
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                auth: self.auth,
                script: self.script,
                default: self.default,
                delay: self.delay,
                received: Vec::new(),
            }),
            count: watch::Sender::new(0),
        });
        let sh = shared.clone();
        let handler: Handler = Arc::new(move |peer, req| {
            let sh = sh.clone();
            Box::pin(async move { sh.answer(peer, req).await })
        });
        let alpn: &[&[u8]] = if self.http2 {
            &[b"h2", b"http/1.1"]
        } else {
            &[b"http/1.1"]
        };
        let https = self.tls.is_some();
        let tls = self
            .tls
            .map(|id| pki::server_config(&id, self.client_ca.as_deref(), alpn));
        let server = Server::start(tls, self.http2, handler).await;
        Sink {
            server,
            shared,
            https,
        }
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is already failing the test; the
        // record is still the best account of what happened.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn answer(&self, peer: Peer, req: Request<Bytes>) -> Response<Full<Bytes>> {
        let (reply, delay) = {
            let mut st = self.state();
            let reply = if st.auth.allows(req.headers()) {
                st.script.pop_front().unwrap_or_else(|| st.default.clone())
            } else {
                st.auth.challenge()
            };
            let delay = reply.delay.unwrap_or(st.delay);
            let (parts, body) = req.into_parts();
            st.received.push(Received {
                path: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "/".into()),
                method: parts.method,
                version: parts.version,
                headers: parts.headers,
                body,
                client_cert: peer.client_cert,
                status: reply.status,
                at: Instant::now(),
            });
            self.count.send_replace(st.received.len());
            (reply, delay)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        reply.into_response()
    }
}

impl Auth {
    fn allows(&self, headers: &HeaderMap) -> bool {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match self {
            Auth::Open => true,
            Auth::Basic { user, password } => authorization
                .and_then(|v| v.strip_prefix("Basic "))
                .and_then(|b| {
                    base64::engine::general_purpose::STANDARD
                        .decode(b.trim())
                        .ok()
                })
                .is_some_and(|raw| raw == format!("{user}:{password}").as_bytes()),
            Auth::Bearer(token) => {
                authorization.and_then(|v| v.strip_prefix("Bearer ")) == Some(token.as_str())
            }
            Auth::Issued(tokens) => authorization
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| tokens.accepts(t)),
        }
    }

    fn challenge(&self) -> Reply {
        let scheme = match self {
            Auth::Basic { .. } => "Basic realm=\"sink\"",
            _ => "Bearer error=\"invalid_token\"",
        };
        Reply::new(401)
            .header("WWW-Authenticate", scheme)
            .body(r#"{"error":"unauthorized"}"#)
    }
}

impl Reply {
    pub fn new(status: u16) -> Reply {
        assert!(
            (100..1000).contains(&status),
            "{status} is not an HTTP status"
        );
        Reply {
            status,
            headers: Vec::new(),
            body: None,
            delay: None,
        }
    }

    /// Adds a response header, e.g. `("Retry-After", "1")`.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = Some(body.into());
        self
    }

    /// Wait this long before answering, whatever the sink's delay.
    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = Some(delay);
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let has_body = self.body.is_some();
        let body = self
            .body
            .unwrap_or_else(|| Bytes::from(format!("{{\"status\":{}}}", self.status)));
        let mut r = Response::new(Full::new(body));
        *r.status_mut() =
            http::StatusCode::from_u16(self.status).expect("status checked in Reply::new");
        if !has_body {
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        for (k, v) in self.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .unwrap_or_else(|e| panic!("sink reply header name {k:?}: {e}"));
            let value = HeaderValue::from_str(&v)
                .unwrap_or_else(|e| panic!("sink reply header {k}: {v:?}: {e}"));
            r.headers_mut().append(name, value);
        }
        r
    }
}

impl From<u16> for Reply {
    fn from(status: u16) -> Reply {
        Reply::new(status)
    }
}

impl Received {
    /// A header's value, when present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// The body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The token of an `Authorization: Bearer` header.
    pub fn bearer(&self) -> Option<&str> {
        self.header("authorization")?.strip_prefix("Bearer ")
    }

    /// The user and password of an `Authorization: Basic` header.
    pub fn basic(&self) -> Option<(String, String)> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(self.header("authorization")?.strip_prefix("Basic ")?.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (user, password) = text.split_once(':')?;
        Some((user.into(), password.into()))
    }
}
