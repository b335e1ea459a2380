//! Authentication end to end: mutual TLS through protocol profiles, basic
//! auth and OAuth 2.0 client credentials, each against real local servers (an
//! HTTPS sink that checks client certificates and credentials, a token
//! endpoint that issues, expires and revokes tokens), the connection test's
//! report on the server certificate, and secrets kept out of attempts and
//! the log.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use http::StatusCode;
use serde_json::{json, Value};

use pki::Pki;
use tls_sink::TlsSink;
use token_server::TokenServer;

const WAIT: Duration = Duration::from_secs(20);
const DAY: Duration = Duration::from_secs(86_400);

/// Test PKI: CAs and certificates made with rcgen, written as PEM files the
/// daemon's protocol and OAuth profiles point at.
mod pki {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use rcgen::{
        BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose,
    };
    use rustls::server::WebPkiClientVerifier;
    use rustls::{RootCertStore, ServerConfig};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    /// A server CA with one certificate for `localhost` and `127.0.0.1`; a
    /// client CA with one client certificate; and a client certificate from
    /// a CA that no server trusts.
    pub struct Pki {
        /// PEM of the CA that signed the server certificate: the `ca` of a
        /// profile.
        pub server_ca: PathBuf,
        pub client_cert: PathBuf,
        pub client_key: PathBuf,
        /// A client certificate and key issued by an unknown CA.
        pub rogue_cert: PathBuf,
        pub rogue_key: PathBuf,
        /// DER of the good client certificate, to compare with what a sink
        /// was shown.
        pub client_der: Vec<u8>,
        /// The PEM text of the client key, which must never be echoed.
        pub client_key_pem: String,
        server_cert: CertificateDer<'static>,
        server_key: Vec<u8>,
        client_ca: CertificateDer<'static>,
    }

    struct Issuer {
        cert: Certificate,
        key: KeyPair,
    }

    fn ca(name: &str) -> Issuer {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).expect("CA certificate");
        Issuer { cert, key }
    }

    fn leaf(
        issuer: &Issuer,
        cn: &str,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
        valid_for: Duration,
    ) -> (Certificate, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        // rcgen takes `time` dates: the epoch plus whole seconds, which
        // keeps the encoding exact without naming the `time` crate.
        let at = |t: SystemTime| {
            rcgen::date_time_ymd(1970, 1, 1)
                + Duration::from_secs(t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs())
        };
        let now = SystemTime::now();
        p.not_before = at(now - Duration::from_secs(3600));
        p.not_after = at(now + valid_for);
        let cert = p
            .signed_by(&key, &issuer.cert, &issuer.key)
            .expect("signed certificate");
        (cert, key)
    }

    impl Pki {
        /// Writes the PEM files into `dir`; the server certificate expires
        /// `server_valid_for` from now.
        pub fn new(dir: &Path, server_valid_for: Duration) -> Pki {
            let server_ca = ca("e2e server CA");
            let client_ca = ca("e2e client CA");
            let rogue_ca = ca("e2e unknown CA");
            let (server, server_key) = leaf(
                &server_ca,
                "localhost",
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
                server_valid_for,
            );
            let year = Duration::from_secs(365 * 86_400);
            let (client, client_key) = leaf(
                &client_ca,
                "outbox-client",
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
                year,
            );
            let (rogue, rogue_key) = leaf(
                &rogue_ca,
                "outbox-client",
                &[],
                ExtendedKeyUsagePurpose::ClientAuth,
                year,
            );
            let file = |name: &str, text: String| {
                let p = dir.join(name);
                std::fs::write(&p, text).expect("PEM written");
                p
            };
            Pki {
                server_ca: file("server-ca.crt", server_ca.cert.pem()),
                client_cert: file("client.crt", client.pem()),
                client_key: file("client.key", client_key.serialize_pem()),
                rogue_cert: file("rogue.crt", rogue.pem()),
                rogue_key: file("rogue.key", rogue_key.serialize_pem()),
                client_der: client.der().to_vec(),
                client_key_pem: client_key.serialize_pem(),
                server_cert: server.der().clone(),
                server_key: server_key.serialize_der(),
                client_ca: client_ca.cert.der().clone(),
            }
        }

        /// A rustls server config with the server certificate; with
        /// `client_auth`, a client certificate from the client CA is
        /// required.
        pub fn server_config(&self, client_auth: bool, alpn: &[&[u8]]) -> Arc<ServerConfig> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("protocol versions");
            let builder = if client_auth {
                let mut roots = RootCertStore::empty();
                roots.add(self.client_ca.clone()).expect("client CA");
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_no_client_auth()
            };
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
            let mut config = builder
                .with_single_cert(vec![self.server_cert.clone()], key)
                .expect("server certificate");
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Arc::new(config)
        }
    }
}

/// A hyper server on `127.0.0.1:0`, over TLS or plain TCP, that hands each
/// request (body collected) with its connection's client certificate to a
/// handler, and keeps the reasons of failed TLS handshakes. Dropping it
/// stops the listener and every connection.
mod server {
    use std::convert::Infallible;
    use std::future::Future;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::ServerConfig;
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio::task::{JoinHandle, JoinSet};

    /// What the TLS layer learnt about the client.
    #[derive(Default)]
    pub struct Peer {
        /// DER of the first certificate the client presented.
        pub client_cert: Option<Vec<u8>>,
    }

    pub type Reply = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;
    pub type Handler = Arc<dyn Fn(Arc<Peer>, Request<Bytes>) -> Reply + Send + Sync>;

    pub struct Server {
        pub addr: SocketAddr,
        rejected: Arc<Mutex<Vec<String>>>,
        task: JoinHandle<()>,
    }

    impl Server {
        pub async fn start(tls: Option<Arc<ServerConfig>>, handler: Handler) -> Server {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let rejected = Arc::new(Mutex::new(Vec::new()));
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            let failures = rejected.clone();
            let task = tokio::spawn(async move {
                // Owned here, so aborting the accept loop ends every
                // connection too.
                let mut conns = JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((tcp, _)) = accepted else { return };
                            let (acceptor, handler, failures) =
                                (acceptor.clone(), handler.clone(), failures.clone());
                            conns.spawn(async move {
                                let Some(acceptor) = acceptor else {
                                    return serve(tcp, Peer::default(), handler).await;
                                };
                                match acceptor.accept(tcp).await {
                                    Ok(tls) => {
                                        let peer = Peer {
                                            client_cert: tls
                                                .get_ref()
                                                .1
                                                .peer_certificates()
                                                .and_then(|c| c.first())
                                                .map(|c| c.to_vec()),
                                        };
                                        serve(tls, peer, handler).await
                                    }
                                    Err(e) => failures.lock().unwrap().push(e.to_string()),
                                }
                            });
                        }
                        Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    }
                }
            });
            Server {
                addr,
                rejected,
                task,
            }
        }

        /// Why TLS handshakes failed, in order.
        pub fn rejected(&self) -> Vec<String> {
            self.rejected.lock().unwrap().clone()
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// HTTP/1.1 or h2 (whatever the client speaks) on one connection.
    async fn serve<I>(io: I, peer: Peer, handler: Handler)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = Arc::new(peer);
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (peer, handler) = (peer.clone(), handler.clone());
            async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                Ok::<_, Infallible>(handler(peer, Request::from_parts(parts, body)).await)
            }
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), svc)
            .await;
    }
}

/// An OAuth 2.0 token endpoint (client credentials): checks the client id
/// and secret from the Basic header or the form, issues random tokens that
/// live `expires_in` seconds, and can revoke them all.
mod token_server {
    use std::collections::hash_map::RandomState;
    use std::collections::HashMap;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use base64::Engine;
    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::Full;

    use super::pki::Pki;
    use super::server::{Handler, Server};

    /// One request to the endpoint.
    #[derive(Debug, Clone)]
    pub struct TokenRequest {
        pub form: HashMap<String, String>,
        /// Whether the credentials came in an HTTP Basic header.
        pub basic: bool,
    }

    /// One token handed out.
    #[derive(Debug, Clone)]
    pub struct Issued {
        pub token: String,
        pub at: Instant,
        pub expires: Instant,
    }

    pub struct TokenState {
        client_id: String,
        client_secret: String,
        expires_in: u64,
        delay: Duration,
        live: Mutex<HashMap<String, Instant>>,
        issued: Mutex<Vec<Issued>>,
        refused: AtomicU64,
        requests: Mutex<Vec<TokenRequest>>,
    }

    impl TokenState {
        /// Whether `token` was issued, is not revoked and has not expired.
        pub fn accepts(&self, token: &str) -> bool {
            self.live
                .lock()
                .unwrap()
                .get(token)
                .is_some_and(|exp| Instant::now() < *exp)
        }
    }

    pub struct Builder<'a> {
        tls: Option<&'a Pki>,
        client_id: String,
        client_secret: String,
        expires_in: u64,
        delay: Duration,
    }

    impl<'a> Builder<'a> {
        pub fn tls(mut self, pki: &'a Pki) -> Self {
            self.tls = Some(pki);
            self
        }

        pub fn expires_in(mut self, secs: u64) -> Self {
            self.expires_in = secs;
            self
        }

        /// How long each token request waits before it is answered, so
        /// that concurrent deliveries pile up behind one request.
        pub fn delay(mut self, d: Duration) -> Self {
            self.delay = d;
            self
        }

        pub async fn start(self) -> TokenServer {
            let state = Arc::new(TokenState {
                client_id: self.client_id,
                client_secret: self.client_secret,
                expires_in: self.expires_in,
                delay: self.delay,
                live: Mutex::default(),
                issued: Mutex::default(),
                refused: AtomicU64::new(0),
                requests: Mutex::default(),
            });
            let st = state.clone();
            let handler: Handler = Arc::new(move |_peer, req| {
                let st = st.clone();
                Box::pin(async move { answer(&st, req).await })
            });
            let tls = self
                .tls
                .map(|p| p.server_config(false, &[b"h2", b"http/1.1"]));
            let https = tls.is_some();
            let server = Server::start(tls, handler).await;
            TokenServer {
                server,
                state,
                https,
            }
        }
    }

    pub struct TokenServer {
        server: Server,
        pub state: Arc<TokenState>,
        https: bool,
    }

    impl TokenServer {
        /// A plain-HTTP endpoint; `.tls(&pki)` serves it over TLS with the
        /// server certificate instead.
        pub fn builder<'a>(client_id: &str, client_secret: &str) -> Builder<'a> {
            Builder {
                tls: None,
                client_id: client_id.into(),
                client_secret: client_secret.into(),
                expires_in: 3600,
                delay: Duration::ZERO,
            }
        }

        /// The token URL; over TLS it names `localhost`, so the DNS name of
        /// the server certificate is checked (the sink uses its IP address).
        pub fn url(&self) -> String {
            if self.https {
                format!("https://localhost:{}/oauth/token", self.server.addr.port())
            } else {
                format!("http://{}/oauth/token", self.server.addr)
            }
        }

        pub fn issued(&self) -> Vec<Issued> {
            self.state.issued.lock().unwrap().clone()
        }

        pub fn tokens(&self) -> Vec<String> {
            self.issued().into_iter().map(|i| i.token).collect()
        }

        /// Requests refused for bad client credentials.
        pub fn refused(&self) -> u64 {
            self.state.refused.load(Ordering::SeqCst)
        }

        pub fn requests(&self) -> Vec<TokenRequest> {
            self.state.requests.lock().unwrap().clone()
        }

        /// Every token stops being accepted at once, as when the remote
        /// side rotates its keys.
        pub fn revoke_all(&self) {
            self.state.live.lock().unwrap().clear();
        }
    }

    fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        r
    }

    async fn answer(st: &TokenState, req: Request<Bytes>) -> Response<Full<Bytes>> {
        if req.uri().path() != "/oauth/token" {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found"}),
            );
        }
        if req.method() != http::Method::POST {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "invalid_request"}),
            );
        }
        let form = parse_form(&String::from_utf8_lossy(req.body()));
        // RFC 6749 §2.3.1: id and secret are form-encoded, then put in the
        // Basic header.
        let basic = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|s| {
                s.split_once(':')
                    .map(|(id, secret)| (form_decode(id), form_decode(secret)))
            });
        st.requests.lock().unwrap().push(TokenRequest {
            form: form.clone(),
            basic: basic.is_some(),
        });
        let creds = basic.or_else(|| {
            Some((
                form.get("client_id")?.clone(),
                form.get("client_secret")?.clone(),
            ))
        });
        if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "unsupported_grant_type"}),
            );
        }
        if creds != Some((st.client_id.clone(), st.client_secret.clone())) {
            st.refused.fetch_add(1, Ordering::SeqCst);
            let mut r = json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "invalid_client", "error_description": "client authentication failed"}),
            );
            r.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Basic realm=\"token\""),
            );
            return r;
        }
        if !st.delay.is_zero() {
            tokio::time::sleep(st.delay).await;
        }
        let token = random_token();
        let expires_in = st.expires_in;
        let at = Instant::now();
        let expires = at + Duration::from_secs(expires_in);
        st.live.lock().unwrap().insert(token.clone(), expires);
        st.issued.lock().unwrap().push(Issued {
            token: token.clone(),
            at,
            expires,
        });
        json(
            StatusCode::OK,
            serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in}),
        )
    }

    /// 128 random bits, from the std hasher's per-instance random keys.
    fn random_token() -> String {
        let mut out = String::from("tok-");
        for _ in 0..2 {
            let mut h = RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos(),
            );
            out.push_str(&format!("{:016x}", h.finish()));
        }
        out
    }

    fn parse_form(body: &str) -> HashMap<String, String> {
        body.split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (form_decode(k), form_decode(v)))
            .collect()
    }

    fn form_decode(s: &str) -> String {
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
}

/// The remote system over HTTPS: optionally requires a client certificate
/// from the client CA, optionally checks basic credentials or bearer tokens
/// (401 otherwise), and records every request with what it answered.
mod tls_sink {
    use std::sync::{Arc, Mutex};

    use base64::Engine;
    use bytes::Bytes;
    use http::{HeaderMap, Response, StatusCode, Version};
    use http_body_util::Full;

    use super::pki::Pki;
    use super::server::{Handler, Server};
    use super::token_server::{TokenServer, TokenState};

    /// A request the sink saw.
    #[derive(Debug, Clone)]
    pub struct Seen {
        pub method: String,
        pub path: String,
        pub version: Version,
        pub headers: HeaderMap,
        pub client_cert: Option<Vec<u8>>,
        pub status: u16,
    }

    impl Seen {
        pub fn bearer(&self) -> Option<&str> {
            self.headers
                .get(http::header::AUTHORIZATION)?
                .to_str()
                .ok()?
                .strip_prefix("Bearer ")
        }
    }

    enum Check {
        Open,
        Basic { user: String, password: String },
        Bearer(Arc<TokenState>),
    }

    pub struct Builder<'a> {
        pki: &'a Pki,
        client_auth: bool,
        alpn: Vec<&'static [u8]>,
        check: Check,
    }

    impl Builder<'_> {
        /// The TLS handshake fails without a certificate from the client CA.
        pub fn require_client_cert(mut self) -> Self {
            self.client_auth = true;
            self
        }

        /// Offers only HTTP/1.1 in ALPN (the default offers h2 first).
        pub fn http1_only(mut self) -> Self {
            self.alpn = vec![b"http/1.1"];
            self
        }

        pub fn basic(mut self, user: &str, password: &str) -> Self {
            self.check = Check::Basic {
                user: user.into(),
                password: password.into(),
            };
            self
        }

        /// Accepts only tokens `tokens` issued and still considers live.
        pub fn bearer(mut self, tokens: &TokenServer) -> Self {
            self.check = Check::Bearer(tokens.state.clone());
            self
        }

        pub async fn start(self) -> TlsSink {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = seen.clone();
            let check = Arc::new(self.check);
            let handler: Handler = Arc::new(move |peer, req| {
                let authorized = match &*check {
                    Check::Open => true,
                    Check::Basic { user, password } => req
                        .headers()
                        .get(http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Basic "))
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .is_some_and(|raw| raw == format!("{user}:{password}").as_bytes()),
                    Check::Bearer(tokens) => req
                        .headers()
                        .get(http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .is_some_and(|t| tokens.accepts(t)),
                };
                let status = if authorized { 200 } else { 401 };
                log.lock().unwrap().push(Seen {
                    method: req.method().to_string(),
                    path: req.uri().path().to_string(),
                    version: req.version(),
                    headers: req.headers().clone(),
                    client_cert: peer.client_cert.clone(),
                    status,
                });
                let mut r = Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")));
                *r.status_mut() = StatusCode::from_u16(status).expect("status");
                if !authorized {
                    let challenge = match &*check {
                        Check::Bearer(_) => "Bearer error=\"invalid_token\"",
                        _ => "Basic realm=\"sink\"",
                    };
                    r.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static(challenge),
                    );
                }
                Box::pin(async move { r })
            });
            let tls = self.pki.server_config(self.client_auth, &self.alpn);
            let server = Server::start(Some(tls), handler).await;
            TlsSink { server, seen }
        }
    }

    pub struct TlsSink {
        server: Server,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl TlsSink {
        pub fn builder(pki: &Pki) -> Builder<'_> {
            Builder {
                pki,
                client_auth: false,
                alpn: vec![b"h2", b"http/1.1"],
                check: Check::Open,
            }
        }

        pub fn url(&self) -> String {
            format!("https://{}", self.server.addr)
        }

        pub fn seen(&self) -> Vec<Seen> {
            self.seen.lock().unwrap().clone()
        }

        pub fn count(&self) -> usize {
            self.seen.lock().unwrap().len()
        }

        pub fn statuses(&self) -> Vec<u16> {
            self.seen().iter().map(|s| s.status).collect()
        }

        /// Why TLS handshakes with the sink failed.
        pub fn rejected(&self) -> Vec<String> {
            self.server.rejected()
        }
    }
}

/// A path as a TOML string.
fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn protocol_profile(name: &str, identity: Option<(&Path, &Path)>, ca: Option<&Path>) -> String {
    let mut t = format!("\n[[protocol_profile]]\nname = \"{name}\"\n");
    if let Some((cert, key)) = identity {
        t.push_str(&format!(
            "client_cert = {}\nclient_key = {}\n",
            q(cert),
            q(key)
        ));
    }
    if let Some(ca) = ca {
        t.push_str(&format!("ca = {}\n", q(ca)));
    }
    t
}

/// An OAuth profile; `secret` is TOML (a string, `{ env = .. }`, `{ file = .. }`).
fn oauth_profile(name: &str, tokens: &TokenServer, secret: &str, ca: Option<&Path>) -> String {
    let mut t = format!(
        "\n[[oauth_profile]]\nname = \"{name}\"\ntoken_url = \"{}\"\nclient_id = \"outbox\"\nclient_secret = {secret}\nscope = \"useraccount\"\n",
        tokens.url()
    );
    if let Some(ca) = ca {
        t.push_str(&format!("ca = {}\n", q(ca)));
    }
    t
}

async fn apply(d: &Daemon, doc: &str) {
    let (s, v) = d.apply(doc).await;
    assert_eq!(s, StatusCode::OK, "{v}\n{doc}");
}

async fn activate(d: &Daemon, connection: &str) {
    let (s, v) = d
        .post(
            &format!("/v1/integrations/acme/connections/{connection}/activate"),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

async fn send(d: &Daemon, n: usize) -> String {
    let (s, v) = d
        .post(
            "/v1/integrations/acme/messages",
            json!({"message": "Create", "body": {"n": n}}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    v["id"].as_str().expect("id").to_string()
}

fn attempts(m: &Value) -> &Vec<Value> {
    m["attempts"].as_array().expect("attempts")
}

/// Each attempt's error, lowercased; an attempt without one fails the test.
fn errors(m: &Value) -> Vec<String> {
    attempts(m)
        .iter()
        .map(|a| {
            a["error"]
                .as_str()
                .unwrap_or_else(|| panic!("attempt without an error: {a}"))
                .to_lowercase()
        })
        .collect()
}

#[tokio::test]
async fn mutual_tls_delivers_with_the_profiles_client_certificate() {
    let d = Daemon::builder().start().await;
    let pki = Pki::new(d.dir.path(), 365 * DAY);
    let sink = TlsSink::builder(&pki).require_client_cert().start().await;
    let doc = integration(
        "acme",
        &[&connection(
            "mtls",
            "production",
            &sink.url(),
            "active = true\n  protocol_profile = \"mtls\"",
        )],
    ) + &protocol_profile(
        "mtls",
        Some((&pki.client_cert, &pki.client_key)),
        Some(&pki.server_ca),
    );
    apply(&d, &doc).await;

    let id = send(&d, 1).await;
    let m = d.wait_state(&id, "sent", WAIT).await;
    assert_eq!(attempts(&m).len(), 1, "{m}");
    let a = &attempts(&m)[0];
    assert_eq!(a["status"], 200, "{m}");
    assert_eq!(a["connection"], "mtls");
    assert_eq!(a["environment"], "production");
    let seen = sink.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, format!("/api/incident/{id}"));
    assert_eq!(seen[0].headers["idempotency-key"], id.as_str());
    assert_eq!(
        seen[0].client_cert.as_deref(),
        Some(&pki.client_der[..]),
        "the sink was shown the profile's client certificate"
    );
    // The daemon offers h2 and the sink prefers it: the h2 path end to end
    // (the basic-auth test covers HTTP/1.1).
    assert_eq!(seen[0].version, http::Version::HTTP_2);
    assert!(sink.rejected().is_empty(), "{:?}", sink.rejected());
}

/// Against a sink that requires a client certificate from its client CA,
/// a connection with no client certificate, then one with a certificate
/// from an unknown CA: the handshake fails, which is a connection-level
/// error, retried until `max_attempts`; every attempt says it was TLS that
/// failed, and no request reaches the sink.
async fn refused_client_certificates_fail_naming_tls(http1_only: bool) {
    let d = Daemon::builder().start().await;
    let pki = Pki::new(d.dir.path(), 365 * DAY);
    let builder = TlsSink::builder(&pki).require_client_cert();
    let sink = if http1_only {
        builder.http1_only()
    } else {
        builder
    }
    .start()
    .await;
    let doc = integration(
        "acme",
        &[
            &connection(
                "no-cert",
                "test",
                &sink.url(),
                "active = true\n  protocol_profile = \"ca-only\"",
            ),
            &connection(
                "unknown-cert",
                "sandbox",
                &sink.url(),
                "protocol_profile = \"rogue\"",
            ),
        ],
    ) + &protocol_profile("ca-only", None, Some(&pki.server_ca))
        + &protocol_profile(
            "rogue",
            Some((&pki.rogue_cert, &pki.rogue_key)),
            Some(&pki.server_ca),
        );
    apply(&d, &doc).await;

    for (conn, n, server_says) in [
        ("no-cert", 1, "no certificates"),
        ("unknown-cert", 2, "unknownissuer"),
    ] {
        activate(&d, conn).await;
        let rejected_before = sink.rejected().len();
        let id = send(&d, n).await;
        let m = d.wait_state(&id, "error", WAIT).await;
        assert_eq!(attempts(&m).len(), 5, "retried up to max_attempts: {m}");
        assert_eq!(sink.count(), 0, "{conn}: nothing was delivered");
        // The sink did see the daemon's handshakes, and refused them for
        // the client certificate.
        let rejected = sink.rejected();
        assert!(rejected.len() > rejected_before, "{conn}: {rejected:?}");
        let why = rejected.last().unwrap().to_lowercase();
        assert!(why.contains(server_says), "{conn}: the sink says {why}");
        for (a, e) in attempts(&m).iter().zip(errors(&m)) {
            assert_eq!(a["connection"], conn);
            assert!(a["status"].is_null(), "{a}");
            // rustls words it "received fatal alert: CertificateRequired"
            // or "... UnknownCA"; "connection closed" alone does not tell
            // an operator what to fix.
            assert!(
                e.contains("certificate") || e.contains("tls") || e.contains("alert"),
                "{conn}: attempt {} does not say the TLS handshake failed: {e}\nall attempts: {:#?}",
                a["n"],
                errors(&m)
            );
        }
    }
}

#[tokio::test]
async fn refused_client_certificates_fail_naming_tls_over_http1() {
    refused_client_certificates_fail_naming_tls(true).await;
}

#[tokio::test]
async fn refused_client_certificates_fail_naming_tls_over_h2() {
    refused_client_certificates_fail_naming_tls(false).await;
}

#[tokio::test]
async fn without_the_ca_the_daemon_refuses_the_sinks_certificate() {
    let d = Daemon::builder().start().await;
    let pki = Pki::new(d.dir.path(), 365 * DAY);
    let sink = TlsSink::builder(&pki).require_client_cert().start().await;
    let doc = integration(
        "acme",
        &[
            &connection(
                "cert-no-ca",
                "production",
                &sink.url(),
                "active = true\n  protocol_profile = \"cert-only\"",
            ),
            &connection("no-profile", "test", &sink.url(), ""),
        ],
    ) + &protocol_profile("cert-only", Some((&pki.client_cert, &pki.client_key)), None);
    apply(&d, &doc).await;
    for (conn, n) in [("cert-no-ca", 1), ("no-profile", 2)] {
        activate(&d, conn).await;
        let id = send(&d, n).await;
        let m = d.wait_state(&id, "error", WAIT).await;
        assert_eq!(attempts(&m).len(), 5, "{m}");
        for e in errors(&m) {
            assert!(
                e.contains("certificate") && (e.contains("issuer") || e.contains("unknown")),
                "{conn}: the error names the untrusted certificate: {e}"
            );
        }
        assert_eq!(sink.count(), 0, "{conn}");
    }
    // The daemon did reach the sink, and turned its certificate down.
    assert!(!sink.rejected().is_empty());
}

#[tokio::test]
async fn basic_auth_over_tls_right_password_delivers_wrong_one_ends_in_error() {
    let d = Daemon::builder().start().await;
    let pki = Pki::new(d.dir.path(), 365 * DAY);
    let sink = TlsSink::builder(&pki)
        .http1_only()
        .basic("svc-outbox", "Right:pw/1")
        .start()
        .await;
    let doc = integration(
        "acme",
        &[
            &connection(
                "right",
                "production",
                &sink.url(),
                "active = true\n  protocol_profile = \"tls\"\n  auth = { type = \"basic\", username = \"svc-outbox\", password = \"Right:pw/1\" }",
            ),
            &connection(
                "wrong",
                "test",
                &sink.url(),
                "protocol_profile = \"tls\"\n  auth = { type = \"basic\", username = \"svc-outbox\", password = \"wrong-pw\" }",
            ),
        ],
    ) + &protocol_profile("tls", None, Some(&pki.server_ca));
    apply(&d, &doc).await;

    let id = send(&d, 1).await;
    let m = d.wait_state(&id, "sent", WAIT).await;
    assert_eq!(attempts(&m).len(), 1, "{m}");
    assert_eq!(m["attempts"][0]["status"], 200);
    assert_eq!(
        m["attempts"][0]["request_headers"]["authorization"],
        "Basic ***"
    );
    let seen = sink.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].status, 200);
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert!(seen[0].client_cert.is_none());

    activate(&d, "wrong").await;
    let id = send(&d, 2).await;
    let m = d.wait_state(&id, "error", WAIT).await;
    assert_eq!(attempts(&m).len(), 1, "401 is final by default: {m}");
    assert_eq!(m["attempts"][0]["status"], 401);
    assert_eq!(m["attempts"][0]["connection"], "wrong");
    assert_eq!(sink.statuses(), [200, 401]);
}

/// A daemon with integration `acme` whose only connection goes to `sink`
/// (trusting the test CA) with OAuth profile `oauth` against `tokens`;
/// `secret` is the profile's `client_secret` as TOML.
async fn oauth_setup(
    sink: &TlsSink,
    pki: &Pki,
    tokens: &TokenServer,
    secret: &str,
    concurrency: u32,
) -> Daemon {
    let d = Daemon::builder().start().await;
    let doc = integration(
        "acme",
        &[&connection(
            "prod",
            "production",
            &sink.url(),
            "active = true\n  protocol_profile = \"tls\"\n  auth = { type = \"oauth\", profile = \"oauth\" }",
        )],
    )
    .replace(
        "concurrency = 4\n",
        &format!("concurrency = {concurrency}\n"),
    ) + &protocol_profile("tls", None, Some(&pki.server_ca))
        + &oauth_profile("oauth", tokens, secret, Some(&pki.server_ca));
    apply(&d, &doc).await;
    d
}

/// A client secret that only survives the trip when the daemon form-encodes
/// it before the Basic header, as RFC 6749 §2.3.1 asks.
const CLIENT_SECRET: &str = "s3cret+/%:=x";

#[tokio::test]
async fn oauth_one_token_serves_many_concurrent_messages() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), 365 * DAY);
    // A slow token endpoint: every worker needs a token while the first
    // request is still out.
    let tokens = TokenServer::builder("outbox", CLIENT_SECRET)
        .tls(&pki)
        .delay(Duration::from_millis(300))
        .start()
        .await;
    let sink = TlsSink::builder(&pki).bearer(&tokens).start().await;
    let d = oauth_setup(&sink, &pki, &tokens, &format!("{CLIENT_SECRET:?}"), 16).await;
    // Queue 50 while paused, so that 16 go at once on resume.
    let (s, v) = d.post("/v1/integrations/acme/pause", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(send(&d, n).await);
    }
    let (s, v) = d.post("/v1/integrations/acme/resume", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    eventually(WAIT, "50 messages sent", async || {
        let (_, v) = d
            .get("/v1/messages?integration=acme&state=sent&limit=100")
            .await;
        (v.as_array()?.len() == 50).then_some(())
    })
    .await;

    let issued = tokens.tokens();
    assert_eq!(issued.len(), 1, "one token for all: {issued:?}");
    let requests = tokens.requests();
    assert_eq!(requests.len(), 1, "one token request: {requests:?}");
    assert_eq!(requests[0].form["grant_type"], "client_credentials");
    assert_eq!(requests[0].form["scope"], "useraccount");
    assert!(requests[0].basic, "client credentials in the Basic header");
    let seen = sink.seen();
    assert_eq!(seen.len(), 50);
    assert!(
        seen.iter().all(|s| s.status == 200),
        "{:?}",
        sink.statuses()
    );
    assert!(seen.iter().all(|s| s.bearer() == Some(issued[0].as_str())));
    let keys: std::collections::HashSet<_> = seen
        .iter()
        .map(|s| s.headers["idempotency-key"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 50);
    for id in &ids {
        let m = d.message(id).await;
        assert_eq!(attempts(&m).len(), 1, "{m}");
        assert_eq!(
            m["attempts"][0]["request_headers"]["authorization"],
            "Bearer ***"
        );
    }
}

#[tokio::test]
async fn oauth_a_revoked_token_gets_one_401_and_a_fresh_token_in_the_same_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), 365 * DAY);
    let tokens = TokenServer::builder("outbox", CLIENT_SECRET)
        .tls(&pki)
        .start()
        .await;
    let sink = TlsSink::builder(&pki).bearer(&tokens).start().await;
    let d = oauth_setup(&sink, &pki, &tokens, &format!("{CLIENT_SECRET:?}"), 4).await;

    let id = send(&d, 1).await;
    d.wait_state(&id, "sent", WAIT).await;
    assert_eq!(tokens.tokens().len(), 1);

    tokens.revoke_all();
    let id = send(&d, 2).await;
    let m = d.wait_state(&id, "sent", WAIT).await;
    assert_eq!(attempts(&m).len(), 1, "one attempt: {m}");
    let a = &m["attempts"][0];
    assert_eq!(a["status"], 200, "{a}");
    assert!(
        a["error"].as_str().is_some_and(|n| n.contains("401")),
        "the attempt notes the 401 and the new token: {a}"
    );
    let issued = tokens.tokens();
    assert_eq!(issued.len(), 2, "one new token: {issued:?}");
    let seen = sink.seen();
    assert_eq!(sink.statuses(), [200, 401, 200]);
    assert_eq!(seen[1].bearer(), Some(issued[0].as_str()), "the old token");
    assert_eq!(seen[2].bearer(), Some(issued[1].as_str()), "the new token");
    assert_eq!(
        seen[1].headers["idempotency-key"],
        seen[2].headers["idempotency-key"]
    );

    // The new token is cached in turn.
    let id = send(&d, 3).await;
    d.wait_state(&id, "sent", WAIT).await;
    assert_eq!(tokens.tokens().len(), 2);
    assert_eq!(sink.statuses(), [200, 401, 200, 200]);
}

#[tokio::test]
async fn oauth_a_short_lived_token_is_refreshed_before_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), 365 * DAY);
    // 3 s rather than 2: refreshing at 80% leaves 600 ms between the
    // daemon's last use of a token and its expiry at the sink, room for a
    // loaded 2-core machine.
    let tokens = TokenServer::builder("outbox", CLIENT_SECRET)
        .tls(&pki)
        .expires_in(3)
        .start()
        .await;
    let sink = TlsSink::builder(&pki).bearer(&tokens).start().await;
    let d = oauth_setup(&sink, &pki, &tokens, &format!("{CLIENT_SECRET:?}"), 4).await;

    // Steady traffic, one message after the other, until the third token.
    let deadline = Instant::now() + WAIT;
    let mut ids = Vec::new();
    while tokens.issued().len() < 3 {
        assert!(
            Instant::now() < deadline,
            "no third token after {} messages",
            ids.len()
        );
        let id = send(&d, ids.len()).await;
        d.wait_state(&id, "sent", WAIT).await;
        ids.push(id);
    }
    assert!(
        sink.statuses().iter().all(|s| *s == 200),
        "no token was used after it expired: {:?}",
        sink.statuses()
    );
    let issued = tokens.issued();
    for pair in issued.windows(2) {
        assert!(
            pair[1].at < pair[0].expires,
            "the next token was fetched before the previous one expired"
        );
    }
    for id in &ids {
        let m = d.message(id).await;
        assert_eq!(attempts(&m).len(), 1, "{m}");
        assert!(m["attempts"][0]["error"].is_null(), "{m}");
    }
}

#[tokio::test]
async fn oauth_a_wrong_client_secret_fails_with_the_token_endpoints_answer() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), 365 * DAY);
    // Plain HTTP this time (the other OAuth tests use TLS).
    let tokens = TokenServer::builder("outbox", CLIENT_SECRET).start().await;
    let sink = TlsSink::builder(&pki).bearer(&tokens).start().await;
    let d = oauth_setup(&sink, &pki, &tokens, "\"not-the-secret\"", 4).await;

    let id = send(&d, 1).await;
    let m = d.wait_state(&id, "error", WAIT).await;
    assert_eq!(
        attempts(&m).len(),
        5,
        "retried: the secret may be fixed: {m}"
    );
    for e in errors(&m) {
        assert!(
            e.contains("401") && e.contains("invalid_client"),
            "the error carries the token endpoint's answer: {e}"
        );
        assert!(e.contains(&tokens.url().to_lowercase()), "{e}");
    }
    assert!(m["attempts"][0]["status"].is_null());
    assert_eq!(sink.count(), 0, "nothing reached the remote system");
    assert!(tokens.refused() >= 1);
    assert!(tokens.tokens().is_empty());
}

#[tokio::test]
async fn oauth_a_changed_profile_is_used_from_the_next_message() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), 365 * DAY);
    let old_idp = TokenServer::builder("outbox", CLIENT_SECRET)
        .tls(&pki)
        .start()
        .await;
    let new_idp = TokenServer::builder("outbox", "another-secret")
        .tls(&pki)
        .start()
        .await;
    let old_sink = TlsSink::builder(&pki).bearer(&old_idp).start().await;
    let new_sink = TlsSink::builder(&pki).bearer(&new_idp).start().await;
    let d = oauth_setup(&old_sink, &pki, &old_idp, &format!("{CLIENT_SECRET:?}"), 4).await;
    let id = send(&d, 1).await;
    d.wait_state(&id, "sent", WAIT).await;
    assert_eq!(old_idp.tokens().len(), 1);

    // The remote system moves, with its identity provider, under the same
    // profile name: an apply, as an operator would do it.
    let doc = integration(
        "acme",
        &[&connection(
            "prod",
            "production",
            &new_sink.url(),
            "active = true\n  protocol_profile = \"tls\"\n  auth = { type = \"oauth\", profile = \"oauth\" }",
        )],
    ) + &protocol_profile("tls", None, Some(&pki.server_ca))
        + &oauth_profile("oauth", &new_idp, "\"another-secret\"", Some(&pki.server_ca));
    apply(&d, &doc).await;
    let id = send(&d, 2).await;
    let m = d.wait_state(&id, "sent", WAIT).await;
    assert_eq!(new_idp.tokens().len(), 1, "{m}");
    let old_token = old_idp.tokens()[0].clone();
    let seen = new_sink.seen();
    assert!(
        seen.iter().all(|s| s.bearer() != Some(old_token.as_str())),
        "the token of the old profile went to the new remote system: {:?} ({m})",
        new_sink.statuses()
    );
    assert_eq!(new_sink.statuses(), [200], "{m}");
}

#[tokio::test]
async fn mutual_tls_and_oauth_on_one_connection() {
    let d = Daemon::builder().start().await;
    let pki = Pki::new(d.dir.path(), 365 * DAY);
    let tokens = TokenServer::builder("outbox", CLIENT_SECRET)
        .tls(&pki)
        .start()
        .await;
    let sink = TlsSink::builder(&pki)
        .require_client_cert()
        .bearer(&tokens)
        .start()
        .await;
    let doc = integration(
        "acme",
        &[&connection(
            "prod",
            "production",
            &sink.url(),
            "active = true\n  protocol_profile = \"mtls\"\n  auth = { type = \"oauth\", profile = \"oauth\" }",
        )],
    ) + &protocol_profile(
        "mtls",
        Some((&pki.client_cert, &pki.client_key)),
        Some(&pki.server_ca),
    ) + &oauth_profile(
        "oauth",
        &tokens,
        &format!("{CLIENT_SECRET:?}"),
        Some(&pki.server_ca),
    );
    apply(&d, &doc).await;
    let id = send(&d, 1).await;
    let m = d.wait_state(&id, "sent", WAIT).await;
    assert_eq!(attempts(&m).len(), 1, "{m}");
    assert_eq!(
        m["attempts"][0]["request_headers"]["authorization"],
        "Bearer ***"
    );
    let seen = sink.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].status, 200);
    assert_eq!(seen[0].client_cert.as_deref(), Some(&pki.client_der[..]));
    assert_eq!(seen[0].bearer(), Some(tokens.tokens()[0].as_str()));
    assert!(sink.rejected().is_empty(), "{:?}", sink.rejected());
}

#[tokio::test]
async fn the_connection_test_reports_the_days_left_on_the_server_certificate() {
    let d = Daemon::builder().start().await;
    // Half a day over ten, so floor, round and ceiling all land on 10 or 11.
    let pki = Pki::new(d.dir.path(), 10 * DAY + DAY / 2);
    let sink = TlsSink::builder(&pki).require_client_cert().start().await;
    let doc = integration(
        "acme",
        &[
            &connection(
                "mtls",
                "production",
                &sink.url(),
                "active = true\n  protocol_profile = \"mtls\"",
            ),
            &connection("no-ca", "test", &sink.url(), ""),
        ],
    ) + &protocol_profile(
        "mtls",
        Some((&pki.client_cert, &pki.client_key)),
        Some(&pki.server_ca),
    );
    apply(&d, &doc).await;

    let (s, v) = d
        .post("/v1/integrations/acme/connections/mtls/test", json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    let tried = v["attempts"].as_array().unwrap();
    assert_eq!(tried.len(), 1, "HEAD passed, so no GET: {v}");
    assert_eq!(tried[0]["method"], "HEAD");
    assert_eq!(tried[0]["status"], 200);
    assert_eq!(v["guard"]["ok"], true, "{v}");
    let days = v["tls_days_left"].as_i64().expect("tls_days_left");
    assert!((10..=11).contains(&days), "tls_days_left {days}: {v}");
    let seen = sink.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "HEAD");
    assert_eq!(seen[0].client_cert.as_deref(), Some(&pki.client_der[..]));

    // An inactive connection that does not trust the CA: both requests
    // fail, and the certificate check says why instead of a day count.
    let (s, v) = d
        .post("/v1/integrations/acme/connections/no-ca/test", json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], false, "{v}");
    let tried = v["attempts"].as_array().unwrap();
    let methods: Vec<_> = tried.iter().map(|a| a["method"].clone()).collect();
    assert_eq!(methods, ["HEAD", "GET"], "{v}");
    for a in tried {
        assert!(a["status"].is_null(), "{a}");
        let e = a["error"].as_str().unwrap().to_lowercase();
        assert!(e.contains("certificate"), "{e}");
    }
    assert!(v["tls_days_left"].is_null(), "{v}");
    let why = v["tls_error"].as_str().expect("tls_error").to_lowercase();
    assert!(why.contains("certificate"), "{why}");
    assert_eq!(sink.count(), 1);
}

#[tokio::test]
async fn secrets_stay_out_of_attempts_and_the_log() {
    let basic_pw = "Basic-pw-7f3e";
    let wrong_secret = "wrong-secret-91ab";
    let d = Daemon::builder()
        .env("E2E_BASIC_PW", basic_pw)
        // Everything, dependencies included, at debug.
        .config("[log]\nlevel = \"debug\"")
        .start()
        .await;
    let pki = Pki::new(d.dir.path(), 365 * DAY);
    let secret_file = write(d.dir.path(), "oauth-secret", &format!("{CLIENT_SECRET}\n"));
    let tokens = TokenServer::builder("outbox", CLIENT_SECRET)
        .tls(&pki)
        .start()
        .await;
    let basic_sink = TlsSink::builder(&pki)
        .require_client_cert()
        .basic("svc-outbox", basic_pw)
        .start()
        .await;
    let oauth_sink = TlsSink::builder(&pki).bearer(&tokens).start().await;
    let doc = integration(
        "acme",
        &[
            &connection(
                "basic",
                "production",
                &basic_sink.url(),
                "active = true\n  protocol_profile = \"mtls\"\n  auth = { type = \"basic\", username = \"svc-outbox\", password = { env = \"E2E_BASIC_PW\" } }",
            ),
            &connection(
                "basic-wrong",
                "pre-production",
                &basic_sink.url(),
                "protocol_profile = \"mtls\"\n  auth = { type = \"basic\", username = \"svc-outbox\", password = \"wrong-pw-3c1d\" }",
            ),
            &connection(
                "oauth",
                "test",
                &oauth_sink.url(),
                "protocol_profile = \"tls\"\n  auth = { type = \"oauth\", profile = \"oauth\" }",
            ),
            &connection(
                "oauth-wrong",
                "sandbox",
                &oauth_sink.url(),
                "protocol_profile = \"tls\"\n  auth = { type = \"oauth\", profile = \"oauth-wrong\" }",
            ),
        ],
    ) + &protocol_profile(
        "mtls",
        Some((&pki.client_cert, &pki.client_key)),
        Some(&pki.server_ca),
    ) + &protocol_profile("tls", None, Some(&pki.server_ca))
        + &oauth_profile(
            "oauth",
            &tokens,
            &format!("{{ file = {} }}", q(&secret_file)),
            Some(&pki.server_ca),
        )
        + &oauth_profile(
            "oauth-wrong",
            &tokens,
            &format!("{wrong_secret:?}"),
            Some(&pki.server_ca),
        );
    apply(&d, &doc).await;

    let mut ids = Vec::new();
    let id = send(&d, 1).await;
    d.wait_state(&id, "sent", WAIT).await;
    ids.push(id);
    activate(&d, "basic-wrong").await;
    let id = send(&d, 2).await;
    d.wait_state(&id, "error", WAIT).await;
    ids.push(id);
    activate(&d, "oauth").await;
    let id = send(&d, 3).await;
    d.wait_state(&id, "sent", WAIT).await;
    ids.push(id);
    tokens.revoke_all();
    let id = send(&d, 4).await;
    d.wait_state(&id, "sent", WAIT).await;
    ids.push(id);
    activate(&d, "oauth-wrong").await;
    let id = send(&d, 5).await;
    d.wait_state(&id, "error", WAIT).await;
    ids.push(id);
    assert_eq!(basic_sink.statuses(), [200, 401]);
    assert_eq!(oauth_sink.statuses(), [200, 401, 200]);

    let mut outputs = Vec::new();
    for id in &ids {
        let m = d.message(id).await;
        for a in attempts(&m) {
            if let Some(auth) = a["request_headers"]["authorization"].as_str() {
                assert!(auth == "Basic ***" || auth == "Bearer ***", "{a}");
            }
        }
        outputs.push((format!("GET /v1/messages/{id}"), m.to_string()));
    }
    for path in [
        "/v1/messages?integration=acme&limit=100",
        "/v1/integrations/acme",
        "/v1/export",
        "/v1/status",
    ] {
        outputs.push((format!("GET {path}"), d.get(path).await.1.to_string()));
    }
    for conn in ["basic", "oauth"] {
        let (_, v) = d
            .post(
                &format!("/v1/integrations/acme/connections/{conn}/test"),
                json!({}),
            )
            .await;
        outputs.push((format!("test {conn}"), v.to_string()));
    }
    let log = d.log();
    assert!(
        log.contains("invalid_client") || log.lines().count() > 10,
        "the log has something to check"
    );
    outputs.push(("the daemon log".into(), log));

    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let key_body = pki
        .client_key_pem
        .lines()
        .find(|l| !l.starts_with("-----"))
        .expect("key body")
        .to_string();
    let mut secrets = vec![
        basic_pw.to_string(),
        b64(&format!("svc-outbox:{basic_pw}")),
        "wrong-pw-3c1d".to_string(),
        b64("svc-outbox:wrong-pw-3c1d"),
        CLIENT_SECRET.to_string(),
        "s3cret%2B%2F%25%3A%3Dx".to_string(),
        wrong_secret.to_string(),
        key_body,
    ];
    let issued = tokens.tokens();
    assert!(issued.len() >= 2, "{issued:?}");
    secrets.extend(issued);
    for (what, text) in &outputs {
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "{what} shows {secret:?}");
        }
    }
}
