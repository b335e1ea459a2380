//! HTTP connections to remote systems, kept for reuse.
//!
//! Each connection runs on a task of its own (hyper's `client::conn`), and
//! the pool keeps its sender. An HTTP/1.1 sender goes back to the pool once
//! the answer's body has been read to its end, and carries the next request
//! to the same origin (scheme and authority). An HTTP/2 sender, when the
//! target chose h2 in TLS's ALPN, is shared by every request to its origin.
//!
//! hyper-util's pooled client, which the daemon and the relay used before,
//! does the same with more machinery: for every HTTP/1.1 request it spawned
//! a task that waited until the connection could go back to the pool, and
//! it checked connections out through a pool with waiters and a lazy
//! connect. Without it the daemon's CPU per delivery fell by about a
//! tenth (README, Benchmark).
//!
//! A connection the target closes ends its task, and its sender says so
//! (`is_closed`): it is dropped when it is next taken, or by the sweep. A
//! request that a pooled connection gives back unsent (it closed meanwhile)
//! goes on a new connection. Connections idle past [`IDLE`] (an HTTP/2 one:
//! not handed out for that long) are closed by the sweep, a task started
//! with the pool's first connection, or when next looked for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// How long a connection may wait in the pool for its next request. An
/// idle connection may be dropped silently on the way (a NAT, a firewall),
/// and a request sent on it would wait out its timeout.
pub const IDLE: Duration = Duration::from_secs(90);

/// What a connector gives: TCP, with TLS for `https`.
pub type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Http1 = http1::SendRequest<Full<Bytes>>;
type Http2 = http2::SendRequest<Full<Bytes>>;

/// Where a connection goes. (`Authority` compares and hashes without
/// case, and is shared, not copied: no allocation per request.)
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Origin {
    https: bool,
    authority: Option<http::uri::Authority>,
}

/// Senders of open connections, with when each was last handed out.
#[derive(Default)]
struct Idle {
    http1: HashMap<Origin, Vec<(Http1, Instant)>>,
    http2: HashMap<Origin, (Http2, Instant)>,
}

/// Connections over one connector (one set of TLS settings).
pub struct Pool<C> {
    connector: C,
    idle: Arc<Mutex<Idle>>,
    sweeping: AtomicBool,
}

/// Why a request failed.
#[derive(Debug)]
pub enum Error {
    /// No connection: the connector's error (resolving, TCP, TLS, or a
    /// connector's own refusal).
    Connect(BoxError),
    /// The connection failed the request.
    Request(hyper::Error),
}

impl Error {
    pub fn is_connect(&self) -> bool {
        matches!(self, Error::Connect(_))
    }

    /// The error wrapped, to walk its chain from (this one's `source`
    /// skips it, as its words are this one's).
    pub fn inner(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            Error::Connect(e) => &**e,
            Error::Request(e) => e,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(e) => e.fmt(f),
            Error::Request(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    // Transparent: the chain goes on from the wrapped error's source.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect(e) => e.source(),
            Error::Request(e) => std::error::Error::source(e),
        }
    }
}

/// An answer's body as it arrives. Read to its end, its HTTP/1.1
/// connection goes back to the pool; dropped before, it is closed.
pub struct Body {
    body: Incoming,
    back: Option<Back>,
}

struct Back {
    sender: Http1,
    origin: Origin,
    idle: Weak<Mutex<Idle>>,
}

impl Body {
    /// The next piece of the body; `None` at its end.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, hyper::Error>> {
        loop {
            match self.body.frame().await {
                None => {
                    if let Some(back) = self.back.take() {
                        if let Some(idle) = back.idle.upgrade() {
                            lock(&idle)
                                .http1
                                .entry(back.origin)
                                .or_default()
                                .push((back.sender, Instant::now()));
                        }
                    }
                    return None;
                }
                // Trailers carry no data.
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
                Some(Err(e)) => {
                    self.back = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

fn lock(idle: &Mutex<Idle>) -> MutexGuard<'_, Idle> {
    idle.lock().unwrap_or_else(|p| p.into_inner())
}

enum Conn {
    /// A sender, and for a new connection, where its error will come.
    Http1(Http1, Option<Failed>),
    Http2(Http2),
}

/// A connection's error, from its task, once the connection has ended.
type Failed = tokio::sync::oneshot::Receiver<hyper::Error>;

/// Runs a connection on a task of its own; its error goes to the returned
/// receiver (and the log).
fn spawn_connection<F>(conn: F) -> Failed
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection to a remote system ended");
            let _ = tx.send(e);
        }
    });
    rx
}

impl<C> Pool<C>
where
    C: tower_service::Service<Uri, Response = Stream, Error = BoxError> + Clone + Send + 'static,
    C::Future: Send,
{
    pub fn new(connector: C) -> Pool<C> {
        Pool {
            connector,
            idle: Arc::default(),
            sweeping: AtomicBool::new(false),
        }
    }

    /// Explains a request to `uri` that failed with `error` without a
    /// reason ([`crate::tls::is_vague`]): one more TLS connection through
    /// the pool's connector (the same settings; for the relay, the same
    /// allow-list), and the alert its server sends, if any. Bounded at
    /// 2 s; `None` when there is nothing to add.
    pub async fn explain(&self, uri: &Uri, error: &str) -> Option<String> {
        if uri.scheme_str() != Some("https") || !crate::tls::is_vague(error) {
            return None;
        }
        let probe = async {
            match self.connector.clone().call(uri.clone()).await.ok()? {
                MaybeHttpsStream::Https(tls) => crate::tls::alert(tls.into_inner()).await,
                MaybeHttpsStream::Http(_) => None,
            }
        };
        // Boxed, as `request`'s connect is: a rare path kept out of the
        // size of the caller's future.
        tokio::time::timeout(Duration::from_secs(2), Box::pin(probe))
            .await
            .ok()
            .flatten()
    }

    /// Sends `req`, whose URI is absolute; the caller reads the body.
    pub async fn request(&self, mut req: Request<Full<Bytes>>) -> Result<Response<Body>, Error> {
        let target = req.uri().clone();
        let origin = Origin {
            https: target.scheme_str() == Some("https"),
            authority: target.authority().cloned(),
        };
        // After a pooled connection gave the request back unsent, only a
        // new connection is tried.
        let mut fresh = false;
        loop {
            let taken = if fresh { None } else { self.take(&origin) };
            let reused = taken.is_some();
            let conn = match taken {
                Some(conn) => conn,
                // Boxed: connecting (TCP, TLS, the HTTP handshake) is a
                // future of several KiB. Inline, it made every request's
                // future that large, and every task around one, though most
                // requests take a pooled connection; tokio copies a task's
                // future when it spawns it and at each change of stage.
                None => Box::pin(self.connect(&origin, &target)).await?,
            };
            let mut sent = match conn {
                Conn::Http2(mut sender) => {
                    // HTTP/2 takes the scheme and authority from the URI.
                    *req.uri_mut() = target.clone();
                    match sender.try_send_request(req).await {
                        Ok(res) => return Ok(res.map(|body| Body { body, back: None })),
                        Err(e) => e,
                    }
                }
                Conn::Http1(mut sender, failed) => {
                    if let Err(e) = sender.ready().await {
                        // Closed while idle: the next one, or a new one.
                        if reused {
                            continue;
                        }
                        // A new connection that ended says why itself
                        // ("channel closed" does not).
                        let why = match failed {
                            Some(failed) => failed.await.unwrap_or(e),
                            None => e,
                        };
                        return Err(Error::Request(why));
                    }
                    to_origin_form(&mut req, &target);
                    match sender.try_send_request(req).await {
                        Ok(res) => {
                            let back = Back {
                                sender,
                                origin,
                                idle: Arc::downgrade(&self.idle),
                            };
                            return Ok(res.map(|body| Body {
                                body,
                                back: Some(back),
                            }));
                        }
                        Err(e) => e,
                    }
                }
            };
            // Given back unsent by a connection that was pooled: on a new one.
            match sent.take_message() {
                Some(unsent) if reused => {
                    req = unsent;
                    fresh = true;
                }
                _ => return Err(Error::Request(sent.into_error())),
            }
        }
    }

    /// A pooled connection to `origin` that is still open: the shared
    /// HTTP/2 one, or the HTTP/1.1 one used last.
    fn take(&self, origin: &Origin) -> Option<Conn> {
        let mut idle = lock(&self.idle);
        if let Some((sender, used)) = idle.http2.get_mut(origin) {
            if !sender.is_closed() && used.elapsed() < IDLE {
                *used = Instant::now();
                return Some(Conn::Http2(sender.clone()));
            }
            idle.http2.remove(origin);
        }
        let parked = idle.http1.get_mut(origin)?;
        while let Some((sender, since)) = parked.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE {
                return Some(Conn::Http1(sender, None));
            }
        }
        None
    }

    async fn connect(&self, origin: &Origin, target: &Uri) -> Result<Conn, Error> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(Error::Connect)?;
        let io = connector
            .call(target.clone())
            .await
            .map_err(Error::Connect)?;
        self.sweep();
        if io.connected().is_negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(Error::Request)?;
            spawn_connection(conn);
            // Requests that connected at once share the first connection
            // made; the others' connections close with their last sender.
            let mut idle = lock(&self.idle);
            let shared = match idle.http2.get(origin) {
                Some((open, _)) if !open.is_closed() => open.clone(),
                _ => {
                    idle.http2
                        .insert(origin.clone(), (sender.clone(), Instant::now()));
                    sender
                }
            };
            return Ok(Conn::Http2(shared));
        }
        let (sender, conn) = http1::Builder::new()
            // A malformed header line in an answer is skipped: the remote
            // system has answered, and its status counts.
            .ignore_invalid_headers_in_responses(true)
            .handshake(io)
            .await
            .map_err(Error::Request)?;
        let failed = spawn_connection(conn);
        Ok(Conn::Http1(sender, Some(failed)))
    }

    /// Starts the sweep, once: every [`IDLE`] / 3 it drops the senders of
    /// closed connections and of connections idle past [`IDLE`] (which
    /// closes them), until the pool is dropped.
    fn sweep(&self) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(&self.idle);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(IDLE / 3);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(idle) = pool.upgrade() else { return };
                let mut idle = lock(&idle);
                idle.http1.retain(|_, parked| {
                    parked.retain(|(sender, since)| !sender.is_closed() && since.elapsed() < IDLE);
                    !parked.is_empty()
                });
                idle.http2
                    .retain(|_, (sender, used)| !sender.is_closed() && used.elapsed() < IDLE);
            }
        });
    }
}

/// HTTP/1.1 puts the path alone in the request line (the authority for
/// CONNECT) and the host in a `Host` header, unless the request brings its
/// own. `target` is the request's absolute URI.
fn to_origin_form(req: &mut Request<Full<Bytes>>, target: &Uri) {
    if let Some(host) = target.host() {
        let default = if target.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        let value = match target.port_u16() {
            Some(port) if port != default => HeaderValue::try_from(format!("{host}:{port}")),
            _ => HeaderValue::try_from(host),
        };
        if let Ok(value) = value {
            req.headers_mut().entry(HOST).or_insert(value);
        }
    }
    let mut form = http::uri::Parts::default();
    if req.method() == Method::CONNECT {
        form.authority = target.authority().cloned();
    } else {
        // ("?x=1" alone, from a URL with a query and no path, is shown as
        // "/?x=1".)
        form.path_and_query = target.path_and_query().cloned();
    }
    *req.uri_mut() = Uri::from_parts(form).unwrap_or_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A target on loopback answering every request "ok"; `close` ends
    /// each connection after one answer (without saying so, as a server
    /// timing out an idle connection does). Counts connections.
    async fn target(close: bool) -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    loop {
                        let Ok(n) = tcp.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if tcp.write_all(answer).await.is_err() || close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (port, accepted)
    }

    type Plain = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

    fn pool() -> Pool<Plain> {
        let tls = crate::tls::client_config(&crate::tls::Files::default()).unwrap();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Pool::new(connector)
    }

    async fn get(pool: &Pool<Plain>, port: u16, read_body: bool) -> u16 {
        let req = Request::get(format!("http://127.0.0.1:{port}/x"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let res = pool.request(req).await.unwrap();
        let status = res.status().as_u16();
        let mut body = res.into_body();
        if read_body {
            let mut got = Vec::new();
            while let Some(chunk) = body.next_chunk().await {
                got.extend_from_slice(&chunk.unwrap());
            }
            assert_eq!(got, b"ok");
        }
        status
    }

    #[tokio::test]
    async fn a_connection_carries_the_next_request_once_its_answer_is_read() {
        let (port, accepted) = target(false).await;
        let pool = pool();
        for _ in 0..3 {
            assert_eq!(get(&pool, port, true).await, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // An answer left unread closes its connection: the next request
        // opens another.
        assert_eq!(get(&pool, port, false).await, 200);
        assert_eq!(get(&pool, port, true).await, 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_target_closed_is_not_used_again() {
        let (port, accepted) = target(true).await;
        let pool = pool();
        for _ in 0..3 {
            assert_eq!(get(&pool, port, true).await, 200);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    fn origin_form(method: Method, url: &str) -> (String, Option<String>) {
        let target: Uri = url.parse().unwrap();
        let mut req = Request::builder()
            .method(method)
            .uri(target.clone())
            .body(Full::new(Bytes::new()))
            .unwrap();
        to_origin_form(&mut req, &target);
        let host = req
            .headers()
            .get(HOST)
            .map(|h| h.to_str().unwrap().to_string());
        (req.uri().to_string(), host)
    }

    #[test]
    fn http1_requests_carry_the_path_and_a_host_header() {
        assert_eq!(
            origin_form(Method::POST, "http://jira.internal:8080/api/x?y=1"),
            ("/api/x?y=1".into(), Some("jira.internal:8080".into()))
        );
        assert_eq!(
            origin_form(Method::GET, "https://jira.internal:443"),
            ("/".into(), Some("jira.internal".into()))
        );
        assert_eq!(
            origin_form(Method::GET, "http://jira.internal?token=t"),
            ("/?token=t".into(), Some("jira.internal".into()))
        );
        assert_eq!(
            origin_form(Method::GET, "http://[::1]:80/a"),
            ("/a".into(), Some("[::1]".into()))
        );
        assert_eq!(
            origin_form(Method::CONNECT, "http://proxy.internal:3128/"),
            (
                "proxy.internal:3128".into(),
                Some("proxy.internal:3128".into())
            )
        );
    }
}
