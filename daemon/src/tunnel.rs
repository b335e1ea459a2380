//! The relay tunnel, daemon side: a QUIC listener for MID servers, the
//! registry of connected relays, and requests sent through them.
//!
//! A relay is the QUIC client. It opens a control stream and sends `Hello`
//! (name, token, versions); the token is checked in constant time against
//! `[mid_servers.NAME]`, and the daemon answers `Accept` or `Reject{reason}`.
//! Heartbeats flow on the control stream. For each request the daemon opens
//! a bidirectional stream: request head, body chunks, end; the relay answers
//! with a response head, body chunks, end, or an error frame. Several relays
//! under one name form a cluster: requests go to the one with the fewest in
//! flight, and when a relay drops, its requests fail as retryable and go
//! through another.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use outbox_proto::quic::{end, why_closed, write_frame, Ended, Stream, RECEIVE_WINDOW};
use outbox_proto::{printable, ErrorKind, Frame, FrameReader, Limits, ReadError};
use quinn::SendStream;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::client::{Reply, SendError};
use crate::config::{MidServerConfig, TunnelConfig};
use outbox_secret::SecretValue;

/// ALPN of the tunnel protocol; a client speaking anything else fails the
/// TLS handshake.
pub use outbox_proto::ALPN;
/// Relays send a heartbeat this often; three missed ones end the session,
/// so a relay that died without a word is dropped (and its requests go
/// through another) within about six seconds.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A relay must say hello this soon after its QUIC handshake: a real one
/// does within a round trip or two.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections that finished the QUIC handshake but have not said hello
/// yet, at most, in all and from one address. Anyone who reaches the port
/// can hold one for [`HELLO_TIMEOUT`], each with up to a stream's receive
/// window buffered (about 1.2 MiB): so at most about 80 MiB and 5 s, and
/// one address cannot take the room of all others. A relay refused for
/// it tries again with its backoff. (Addresses are validated with a QUIC
/// retry first, so they cannot be forged.)
const MAX_UNGREETED: usize = 64;
const MAX_UNGREETED_PER_ADDRESS: usize = 4;
/// Refusals for want of room are logged at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// Body chunk size on request streams: well under the frame limit.
const CHUNK: usize = 64 * 1024;

/// One connected relay.
pub struct Session {
    pub id: u64,
    pub name: String,
    pub address: SocketAddr,
    pub since_ms: u64,
    pub protocol_version: u32,
    pub relay_version: String,
    /// `mid:NAME (ADDRESS)`, as attempts record it: formatted once, not at
    /// every attempt.
    via: String,
    in_flight: AtomicUsize,
    /// Set when a request on this session got no answer at all; cleared by
    /// the next heartbeat. A suspect session gets requests only when no
    /// other member of the cluster is left.
    suspect: std::sync::atomic::AtomicBool,
    /// Set when the relay turned a request away because it is stopping: it
    /// gets no new requests from then on.
    stopping: std::sync::atomic::AtomicBool,
    /// Why this daemon closed the session, when it did: an answer that
    /// broke the protocol.
    broken: std::sync::OnceLock<String>,
    conn: quinn::Connection,
}

/// What the API shows of a session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    pub name: String,
    pub id: u64,
    pub address: String,
    pub since: String,
    pub in_flight: usize,
    pub protocol_version: u32,
    pub relay_version: String,
}

/// The relays connected now, by MID server name, and what admits one: the
/// tokens of the configured MID servers and the tunnel's endpoint, both
/// replaced by a reload (a rotated token, a renewed certificate).
#[derive(Default)]
pub struct Relays {
    sessions: Mutex<HashMap<String, Vec<Arc<Session>>>>,
    next_id: AtomicU64,
    tokens: std::sync::RwLock<Arc<HashMap<String, MidServerConfig>>>,
    endpoint: std::sync::OnceLock<quinn::Endpoint>,
}

/// Why a request through a relay did not get a response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RelayError {
    #[error("MID server {0} is not connected")]
    NotConnected(String),
    /// The relay went away mid-request: retry through another.
    #[error("relay {name} ({address}) disconnected: {reason}")]
    Dropped {
        name: String,
        address: SocketAddr,
        reason: String,
    },
    /// The relay answered with bytes that are no valid answer, or reset
    /// the stream: a fault of the relay, which QUIC delivered intact. The
    /// daemon closes the session, so the rest of a cluster carries on, and
    /// the attempt counts, as one with no response does, so a broken relay
    /// costs a message its attempts with backoff rather than a record
    /// every moment.
    #[error("relay {name} ({address}) answered badly: {reason}")]
    BadAnswer {
        name: String,
        address: SocketAddr,
        reason: String,
    },
    /// The relay took no new request (gave no stream) within the
    /// request's time: the request was not sent.
    #[error("relay {name} ({address}): {} the relay took no new request within {waited:?} (all the requests it takes at once are in flight)", outbox_proto::NOT_SENT)]
    NotTaken {
        name: String,
        address: SocketAddr,
        waited: Duration,
    },
    /// The request is over what a request head may carry (URL, headers):
    /// it can never cross the tunnel, so it was not sent, and retrying
    /// will not change that.
    #[error("relay {name} ({address}): not sent: the request cannot cross the tunnel: {reason}")]
    Unsendable {
        name: String,
        address: SocketAddr,
        reason: String,
    },
    /// A live relay said nothing about a request well past its timeout,
    /// which the relay enforces itself: the attempt counts, as one with no
    /// response does, so a relay that loses requests cannot keep a message
    /// going round for ever.
    #[error(
        "relay {name} ({address}) gave no answer within {waited:?}, past the request's timeout"
    )]
    NoAnswer {
        name: String,
        address: SocketAddr,
        waited: Duration,
    },
    /// The relay answered with an error frame.
    #[error("relay {name} ({address}): {message}")]
    Remote {
        name: String,
        address: SocketAddr,
        kind: ErrorKind,
        message: String,
    },
}

impl Relays {
    /// The tokens hellos are checked against from now on; returns the
    /// names whose token changed. Sessions open already stay: they proved
    /// themselves with the token of their time.
    pub fn set_tokens(
        &self,
        tokens: impl IntoIterator<Item = (String, MidServerConfig)>,
    ) -> Vec<String> {
        let tokens: HashMap<String, MidServerConfig> = tokens.into_iter().collect();
        let mut current = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        let mut rotated: Vec<String> = tokens
            .iter()
            .filter(|(name, mid)| current.get(*name).is_some_and(|m| m.token != mid.token))
            .map(|(name, _)| name.clone())
            .collect();
        rotated.sort();
        *current = Arc::new(tokens);
        rotated
    }

    /// The tokens hellos are checked against now.
    fn tokens(&self) -> Arc<HashMap<String, MidServerConfig>> {
        self.tokens
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The tunnel's endpoint, kept so a reload can give it a renewed
    /// certificate.
    pub fn set_endpoint(&self, endpoint: quinn::Endpoint) {
        let _ = self.endpoint.set(endpoint);
    }

    /// What the endpoint accepts connections with from now on (a renewed
    /// certificate, from [`server_config`]); connections open already keep
    /// theirs.
    pub fn set_server_config(&self, server: quinn::ServerConfig) {
        if let Some(endpoint) = self.endpoint.get() {
            endpoint.set_server_config(Some(server));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<Session>>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The member of `name`'s cluster with the fewest requests in flight.
    pub fn pick(&self, name: &str) -> Option<Arc<Session>> {
        self.lock()
            .get(name)?
            .iter()
            // A session whose connection is closed is on its way out of the
            // registry; never hand it a request.
            .filter(|s| s.conn.close_reason().is_none())
            // A relay that is stopping turns every new request away: with
            // no other member, the message waits for a relay as if none
            // were connected (recorded once), instead of being refused
            // every second for the whole drain.
            .filter(|s| !s.stopping.load(Ordering::Relaxed))
            // Healthy before suspect, then the fewest in flight, then the
            // newest session (a relay that just reconnected is alive).
            .min_by_key(|s| {
                (
                    s.suspect.load(Ordering::Relaxed),
                    s.in_flight.load(Ordering::Relaxed),
                    std::cmp::Reverse(s.id),
                )
            })
            .cloned()
    }

    pub fn sessions(&self) -> Vec<SessionView> {
        let mut out: Vec<SessionView> = self
            .lock()
            .values()
            .flatten()
            .map(|s| SessionView {
                name: s.name.clone(),
                id: s.id,
                address: s.address.to_string(),
                since: crate::api::time(s.since_ms),
                in_flight: s.in_flight.load(Ordering::Relaxed),
                protocol_version: s.protocol_version,
                relay_version: s.relay_version.clone(),
            })
            .collect();
        out.sort_by(|a, b| (&a.name, a.id).cmp(&(&b.name, b.id)));
        out
    }

    fn add(&self, s: Arc<Session>) {
        self.lock().entry(s.name.clone()).or_default().push(s);
    }

    fn remove(&self, s: &Session) {
        let mut map = self.lock();
        if let Some(list) = map.get_mut(&s.name) {
            list.retain(|x| x.id != s.id);
            if list.is_empty() {
                map.remove(&s.name);
            }
        }
    }
}

/// A request as handed to a relay: authentication headers already added.
pub struct Outbound<'a> {
    pub method: &'a str,
    pub url: &'a str,
    pub headers: &'a HeaderMap,
    /// The relay's protocol profile of this name applies mutual TLS.
    pub protocol_profile: Option<&'a str>,
    pub body: Bytes,
}

/// Counts a request in flight on a session for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Session {
    /// Sends one request through this relay and reads the response, keeping
    /// the first `keep` bytes of its body.
    pub async fn request(
        &self,
        out: Outbound<'_>,
        timeout: Duration,
        keep: usize,
    ) -> (Result<Reply, SendError>, Result<(), RelayError>) {
        let Outbound {
            method,
            url,
            headers,
            protocol_profile,
            body,
        } = out;
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _guard = InFlight(&self.in_flight);
        let started = Instant::now();
        // The request's time runs from here: waiting for the relay to take
        // it counts, and the relay gets what is left. (An integration may
        // give a timeout too large to add; the relay caps it anyway.)
        let deadline = started
            .checked_add(timeout)
            .unwrap_or(started + Duration::from_secs(24 * 3600));
        let limits = Limits::default();
        let work = async {
            // The time left, in whole milliseconds rounded up: a request the
            // relay takes at once gets its whole timeout, and its head need
            // not be encoded again.
            let left_ms = || {
                let left = deadline.saturating_duration_since(Instant::now());
                (left.as_nanos().div_ceil(1_000_000) as u64).max(1)
            };
            let mut head = Frame::RequestHead {
                method: method.to_string(),
                url: url.to_string(),
                headers: headers
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
                    .collect(),
                protocol_profile: protocol_profile.map(str::to_string),
                timeout_ms: left_ms(),
            };
            // Frames are gathered and written a chunk at a time: a request
            // whose body fits one chunk (the usual case) is one write, one
            // wake of the connection; a large body never sits in memory
            // twice.
            let mut buf = Vec::with_capacity(body.len().min(CHUNK) + 512);
            // A head over the limits (a URL or headers too long, too many)
            // can never cross: found before the relay is asked for a stream.
            if let Err(e) = outbox_proto::encode(&head, &limits, &mut buf) {
                return Err(RelayError::Unsendable {
                    name: self.name.clone(),
                    address: self.address,
                    reason: e.to_string(),
                });
            }
            // A relay takes at most twice its concurrency in requests at
            // once (QUIC stream credit); one that takes none within the
            // request's time has not sent it.
            let opened = tokio::time::timeout_at(deadline.into(), self.conn.open_bi()).await;
            let (mut send, recv) = match opened {
                Ok(opened) => opened.map_err(|e| self.dropped(self.lost(&e)))?,
                Err(_) => {
                    return Err(RelayError::NotTaken {
                        name: self.name.clone(),
                        address: self.address,
                        waited: timeout,
                    })
                }
            };
            let encode = |frame: &Frame, buf: &mut Vec<u8>| {
                outbox_proto::encode(frame, &limits, buf).map_err(|e| self.dropped(e))
            };
            // A wait for the stream is told to the relay: the head again,
            // with the time that is left.
            if let Frame::RequestHead { timeout_ms, .. } = &mut head {
                let left = left_ms();
                if left != *timeout_ms {
                    *timeout_ms = left;
                    buf.clear();
                    encode(&head, &mut buf)?;
                }
            }
            // A relay that refuses the request part way (body over its
            // max_body, draining) stops the stream and answers with an
            // error frame: stop writing and read it.
            let mut refused = false;
            for chunk in body.chunks(CHUNK) {
                encode(&Frame::BodyChunk(chunk.to_vec()), &mut buf)?;
                if buf.len() >= CHUNK {
                    refused = write_unless_stopped(&mut send, &buf)
                        .await
                        .map_err(|e| self.write_failed(e))?;
                    buf.clear();
                    if refused {
                        break;
                    }
                }
            }
            if !refused {
                encode(&Frame::End, &mut buf)?;
                write_unless_stopped(&mut send, &buf)
                    .await
                    .map_err(|e| self.write_failed(e))?;
                let _ = send.finish();
            }
            let mut frames = FrameReader::new(Stream(recv), limits);
            let (status, headers) = match frames.next().await.map_err(|e| self.read_failed(e))? {
                Some(Frame::ResponseHead { status, headers }) => (status, headers),
                Some(Frame::Error { kind, message }) => return Err(self.remote(kind, message)),
                Some(other) => {
                    return Err(
                        self.bad_answer(format!("expected a response head, got {}", other.name()))
                    )
                }
                None => return Err(self.bad_answer("the answer ended before its response head")),
            };
            let mut excerpt = BytesMut::new();
            loop {
                match frames.next().await.map_err(|e| self.read_failed(e))? {
                    Some(Frame::BodyChunk(data)) => {
                        let room = keep.saturating_sub(excerpt.len());
                        excerpt.extend_from_slice(&data[..data.len().min(room)]);
                    }
                    Some(Frame::End) => break,
                    None => return Err(self.bad_answer("the answer ended before its end frame")),
                    Some(Frame::Error { kind, message }) => return Err(self.remote(kind, message)),
                    Some(other) => {
                        return Err(self.bad_answer(format!(
                            "expected a body chunk or end in a response body, got {}",
                            other.name()
                        )))
                    }
                }
            }
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_bytes(&v),
                ) {
                    map.append(k, v);
                }
            }
            Ok(Reply {
                status,
                headers: map,
                excerpt: excerpt.freeze(),
                duration: started.elapsed(),
            })
        };
        // The relay enforces the timeout on its request; this bound covers a
        // relay that stops answering altogether.
        let bound = timeout.saturating_add(Duration::from_secs(5));
        match tokio::time::timeout(bound, work).await {
            Ok(Ok(reply)) => (Ok(reply), Ok(())),
            Ok(Err(RelayError::Remote {
                kind: ErrorKind::Timeout,
                message,
                ..
            })) => {
                // The relay's words say what ran out: a request never sent
                // (it waited for a free slot), no response, or a response
                // body that did not end. Named as every relay error is.
                let e = self.remote(ErrorKind::Timeout, message);
                (Err(SendError::Failed(e.to_string())), Err(e))
            }
            Ok(Err(e)) => {
                match e {
                    RelayError::Dropped { .. } => self.suspect.store(true, Ordering::Relaxed),
                    // A relay refuses new requests this way only while it
                    // drains before stopping.
                    RelayError::Remote {
                        kind: ErrorKind::Overloaded,
                        ..
                    } => self.stopping.store(true, Ordering::Relaxed),
                    _ => {}
                }
                (Err(SendError::Failed(e.to_string())), Err(e))
            }
            // The relay enforces the request's timeout and answers with a
            // timeout error; silence past it means the relay, not the remote
            // system, failed. Picks prefer its healthy peers from now on.
            Err(_) => {
                self.suspect.store(true, Ordering::Relaxed);
                let e = RelayError::NoAnswer {
                    name: self.name.clone(),
                    address: self.address,
                    waited: bound,
                };
                (Err(SendError::Failed(e.to_string())), Err(e))
            }
        }
    }

    /// The relay answered this request with an error frame.
    fn remote(&self, kind: ErrorKind, message: String) -> RelayError {
        RelayError::Remote {
            name: self.name.clone(),
            address: self.address,
            kind,
            // The relay's words go into logs and attempt records.
            message: printable(&message).into_owned(),
        }
    }

    fn dropped(&self, e: impl std::fmt::Display) -> RelayError {
        RelayError::Dropped {
            name: self.name.clone(),
            address: self.address,
            // quinn's words may carry the relay's close reason.
            reason: printable(&e.to_string()).into_owned(),
        }
    }

    /// A request could not be written: the connection is gone (or the
    /// stream reset, which a relay never does).
    fn write_failed(&self, e: quinn::WriteError) -> RelayError {
        match e {
            quinn::WriteError::ConnectionLost(e) => self.dropped(self.lost(&e)),
            e => self.dropped(e),
        }
    }

    /// Why the connection under a request went, for its attempt: in the
    /// relay's words when the relay closed it (a relay stopping past its
    /// drain says so), in this daemon's when it closed it itself; quinn's
    /// own "connection lost" keeps the reason to itself.
    fn lost(&self, e: &quinn::ConnectionError) -> String {
        match e {
            quinn::ConnectionError::LocallyClosed => match self.broken.get() {
                Some(why) => format!("this daemon closed the session: {why}"),
                None => "this daemon closed the session: it is stopping".to_string(),
            },
            e => outbox_proto::quic::why_closed(e, "the relay"),
        }
    }

    /// The relay's answer could not be read: the connection is gone, or
    /// the relay reset the stream (which a relay never does: it finishes
    /// every stream) or sent what is no valid frame.
    fn read_failed(&self, e: ReadError<quinn::ReadError>) -> RelayError {
        match e {
            ReadError::Source(quinn::ReadError::ConnectionLost(e)) => self.dropped(self.lost(&e)),
            ReadError::Source(e) => self.bad_answer(e.to_string()),
            ReadError::Frame(e) => self.bad_answer(e),
        }
    }

    /// The relay broke the protocol on a request stream: logged here, since
    /// the attempt record alone would not reach whoever runs the relay, and
    /// the session is closed with the reason, which the relay logs. Its
    /// other requests go through another member, and it may connect again.
    fn bad_answer(&self, reason: impl Into<String>) -> RelayError {
        let reason = printable(&reason.into()).into_owned();
        tracing::warn!(address = %self.address, mid_server = %self.name, session = self.id, %reason, "relay answered a request badly");
        let why = format!("answered a request badly: {reason}");
        // Said before the close: the session's end reads it as soon as the
        // connection is closed.
        let why = self.broken.get_or_init(|| why);
        self.conn.close(4u32.into(), why.as_bytes());
        RelayError::BadAnswer {
            name: self.name.clone(),
            address: self.address,
            reason,
        }
    }

    pub fn via(&self) -> String {
        self.via.clone()
    }
}

/// Writes `buf`; `Ok(true)` if the peer stopped the stream (it will say
/// why in its answer).
async fn write_unless_stopped(
    send: &mut SendStream,
    buf: &[u8],
) -> Result<bool, quinn::WriteError> {
    match send.write_all(buf).await {
        Ok(()) => Ok(false),
        Err(quinn::WriteError::Stopped(_)) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Builds the QUIC server endpoint from the tunnel's certificate and key.
pub fn endpoint(config: &TunnelConfig) -> anyhow::Result<quinn::Endpoint> {
    use anyhow::Context;
    let socket = std::net::UdpSocket::bind(config.listen)
        .with_context(|| format!("tunnel.listen {}: cannot listen", config.listen))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config(config)?),
        socket,
        outbox_proto::quic::Runtime::new(),
    )
    .with_context(|| format!("tunnel.listen {}: cannot listen", config.listen))
}

/// What the tunnel's endpoint accepts connections with: its certificate and
/// key, and the transport limits below.
pub fn server_config(config: &TunnelConfig) -> anyhow::Result<quinn::ServerConfig> {
    use anyhow::Context;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(config.tls.clone())
        .context("tunnel TLS settings")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(HEARTBEAT));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(HEARTBEAT * 3)?));
    // A relay opens one stream, its control stream; the daemon opens the
    // request streams. Any other stream a peer tries to open waits for
    // credit it never gets, so nothing it sends on one is buffered here.
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.receive_window(RECEIVE_WINDOW.into());
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Accepts relays until `shutdown`, checking hellos against the tokens
/// `relays` holds at the time.
pub async fn serve(
    endpoint: quinn::Endpoint,
    relays: Arc<Relays>,
    connected: Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    let ungreeted = Arc::new(Ungreeted::default());
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        // A QUIC retry first proves the address is the sender's: it costs
        // a round trip and keeps no state, so forged packets hold nothing.
        if !incoming.remote_address_validated() {
            let _ = incoming.retry();
            continue;
        }
        let address = incoming.remote_address();
        let relays = relays.clone();
        let connected = connected.clone();
        let ungreeted = ungreeted.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    let error = printable(&e.to_string()).into_owned();
                    return tracing::info!(%address, %error, "relay connection failed");
                }
            };
            match ungreeted.enter(address) {
                Some(greeting) => session(conn, address, relays, connected, greeting).await,
                None => conn.close(
                    1u32.into(),
                    b"too many connections are waiting to say hello; try again",
                ),
            }
        });
    }
    endpoint.close(0u32.into(), b"daemon stopping");
}

async fn session(
    conn: quinn::Connection,
    address: SocketAddr,
    relays: Arc<Relays>,
    connected: Arc<tokio::sync::Notify>,
    greeting: Greeting,
) {
    let limits = Limits::default();
    let hello = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut control = FrameReader::new(Stream(recv), limits);
        let frame = control.next().await?;
        Ok::<_, String>((send, control, frame))
    })
    .await;
    let (mut send, mut control, frame) = match hello {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let e = match conn.close_reason() {
                Some(closed) => why_closed(&closed, "the relay"),
                None => printable(&e).into_owned(),
            };
            tracing::warn!(%address, error = %e, "relay refused: no valid hello");
            conn.close(1u32.into(), format!("no valid hello: {e}").as_bytes());
            return;
        }
        Err(_) => {
            tracing::warn!(%address, "relay refused: no hello within {HELLO_TIMEOUT:?}");
            conn.close(1u32.into(), b"no hello");
            return;
        }
    };
    let hello = match frame {
        Some(Frame::Hello {
            name,
            token,
            protocol_version,
            relay_version,
        }) => Ok((name, token, protocol_version, relay_version)),
        Some(other) => Err(format!("the first frame is {}, not hello", other.name())),
        None => Err("the control stream ended before a hello".to_string()),
    };
    let (name, token, protocol_version, relay_version) = match hello {
        Ok(hello) => hello,
        Err(e) => {
            tracing::warn!(%address, error = %e, "relay refused: no valid hello");
            conn.close(1u32.into(), format!("no valid hello: {e}").as_bytes());
            return;
        }
    };
    let refusal = check_hello(&relays.tokens(), &name, &token, protocol_version);
    if let Some(reason) = refusal {
        tracing::warn!(%address, mid_server = %printable(&name), relay_version = %printable(&relay_version), %reason, "relay refused");
        let _ = write_frame(
            &mut send,
            &Frame::Reject {
                reason: reason.clone(),
            },
            &limits,
        )
        .await;
        let _ = send.finish();
        // Give the reject a moment to reach the relay before closing.
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
        conn.close(2u32.into(), reason.as_bytes());
        return;
    }
    // From here `name` is a configured MID server's, safe to log as it is.
    let relay_version = printable(&relay_version).into_owned();
    drop(greeting);
    let id = relays.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    let accept = Frame::Accept {
        daemon_version: env!("CARGO_PKG_VERSION").to_string(),
        heartbeat_interval_ms: HEARTBEAT.as_millis() as u64,
        session_id: id,
    };
    if let Err(e) = write_frame(&mut send, &accept, &limits).await {
        let error = printable(&e).into_owned();
        tracing::warn!(%address, mid_server = %name, %error, "relay dropped during hello");
        return;
    }
    let s = Arc::new(Session {
        id,
        name: name.clone(),
        address,
        since_ms: crate::queue::now_ms(),
        protocol_version,
        relay_version: relay_version.clone(),
        via: format!("mid:{name} ({address})"),
        in_flight: AtomicUsize::new(0),
        suspect: std::sync::atomic::AtomicBool::new(false),
        stopping: std::sync::atomic::AtomicBool::new(false),
        broken: std::sync::OnceLock::new(),
        conn: conn.clone(),
    });
    relays.add(s.clone());
    tracing::info!(%address, mid_server = %name, session = id, %relay_version, "relay connected");
    connected.notify_one();

    // Control stream: answer heartbeats until the relay goes quiet or away.
    let reason = loop {
        match tokio::time::timeout(HEARTBEAT * 3, control.next()).await {
            Err(_) => break format!("no heartbeat for {:?}", HEARTBEAT * 3),
            Ok(Err(e)) => break e.to_string(),
            Ok(Ok(None)) => break "control stream closed".to_string(),
            Ok(Ok(Some(Frame::Heartbeat { seq }))) => {
                s.suspect.store(false, Ordering::Relaxed);
                if let Err(e) = write_frame(&mut send, &Frame::Heartbeat { seq }, &limits).await {
                    break e;
                }
            }
            Ok(Ok(Some(other))) => {
                break format!("unexpected {} frame on the control stream", other.name())
            }
        }
    };
    relays.remove(&s);
    // A session closed on purpose, by a relay that is stopping or by this
    // daemon stopping, is not news worth a warning; anything else is.
    let reason = match conn.close_reason() {
        Some(quinn::ConnectionError::LocallyClosed) => match s.broken.get() {
            Some(why) => why.clone(),
            None => {
                return tracing::info!(%address, mid_server = %name, session = id, "relay session closed: the daemon is stopping");
            }
        },
        closed => {
            // Closed here, now: said first, for the requests it cuts.
            if closed.is_none() {
                let _ = s.broken.set(reason.clone());
            }
            match end(&conn, "the relay", 3, &reason) {
                Ended::Stopping(reason) => {
                    return tracing::info!(%address, mid_server = %name, session = id, %reason, "relay closed its session");
                }
                Ended::Failed(reason) => reason,
            }
        }
    };
    tracing::warn!(%address, mid_server = %name, session = id, %reason, "relay disconnected");
}

/// Connections between their QUIC handshake and an accepted hello, in all
/// and by address (see [`MAX_UNGREETED`]).
#[derive(Default)]
struct Ungreeted {
    by_address: Mutex<HashMap<std::net::IpAddr, usize>>,
    /// When a refusal was last logged, in ms since the epoch.
    logged_ms: AtomicU64,
    refused: AtomicU64,
}

/// A place among the ungreeted, given back when dropped.
struct Greeting(Arc<Ungreeted>, std::net::IpAddr);

impl Ungreeted {
    fn enter(self: &Arc<Self>, address: SocketAddr) -> Option<Greeting> {
        let ip = address.ip();
        let mut by = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = by.values().sum();
        let here = by.get(&ip).copied().unwrap_or(0);
        if total >= MAX_UNGREETED || here >= MAX_UNGREETED_PER_ADDRESS {
            drop(by);
            let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            let now = crate::queue::now_ms();
            let last = self.logged_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= REFUSAL_LOG_EVERY.as_millis() as u64
                && self
                    .logged_ms
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                self.refused.store(0, Ordering::Relaxed);
                tracing::warn!(%address, refused, "relay connections refused: too many have not said hello yet ({here} from this address, {total} in all)");
            }
            return None;
        }
        *by.entry(ip).or_default() += 1;
        Some(Greeting(self.clone(), ip))
    }
}

impl Drop for Greeting {
    fn drop(&mut self) {
        let mut by = self.0.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                by.remove(&self.1);
            }
        }
    }
}

/// Why a hello is refused, if it is: unknown name, wrong token (compared in
/// constant time), or a protocol version this daemon does not speak.
fn check_hello(
    tokens: &HashMap<String, MidServerConfig>,
    name: &str,
    token: &str,
    protocol_version: u32,
) -> Option<String> {
    use subtle::ConstantTimeEq;
    if let Err(reason) = outbox_proto::check_version(protocol_version) {
        return Some(reason);
    }
    let Some(mid) = tokens.get(name) else {
        return Some(format!(
            "MID server {name:?} is not configured on this daemon"
        ));
    };
    let expected: &SecretValue = &mid.token;
    // Both sides read a token without the whitespace around it; a relay
    // from before they did may still send it, and is let in.
    if bool::from(token.trim().as_bytes().ct_eq(expected.expose().as_bytes())) {
        None
    } else {
        Some(format!("wrong token for MID server {name:?}"))
    }
}
