//! One daemon session: connect, hello, heartbeat, serve request streams,
//! and reconnect with capped exponential backoff and jitter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use outbox_proto::quic::{end, why_closed, write_frame, Ended, Stream, RECEIVE_WINDOW};
use outbox_proto::{
    printable, ErrorKind, Frame, FrameReader, Limits, ALPN, NOT_SENT, PROTOCOL_VERSION,
};
use quinn::{RecvStream, SendStream};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, Daemon};
use crate::perform::{Deadline, Failure};
use crate::Relay;

const BACKOFF_START: Duration = Duration::from_millis(500);
/// Reconnects back off to at most this, so a daemon back from maintenance
/// is found within a minute.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request stream must bring its head this soon after it opens.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const CHUNK: usize = 64 * 1024;

/// The QUIC client endpoint shared by all sessions.
pub fn client_endpoint(config: &Config) -> anyhow::Result<quinn::Endpoint> {
    use anyhow::Context;
    let mut tls = rustls::ClientConfig::builder_with_provider(outbox_remote::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(config.server_roots.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(15))?));
    // The daemon may open at most twice the relay's concurrency in request
    // streams at once; QUIC makes it wait beyond that. A stream's credit
    // returns to the daemon only a round trip after its answer is
    // acknowledged, so a limit of exactly `concurrency` kept fewer requests
    // than that in flight. The permits bound the HTTP requests themselves;
    // the streams waiting for one hold at most `concurrency` more bodies,
    // each within `max_body`.
    transport.max_concurrent_bidi_streams((2 * config.concurrency as u32).into());
    // The daemon opens no one-way streams.
    transport.max_concurrent_uni_streams(0u32.into());
    transport.receive_window(RECEIVE_WINDOW.into());
    client.transport_config(Arc::new(transport));
    let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    let any4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
    let socket = udp_socket(any6)
        .or_else(|_| udp_socket(any4))
        .context("cannot open a UDP socket")?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        outbox_proto::quic::Runtime::new(),
    )
    .context("cannot open a UDP socket")?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// A UDP socket bound to `addr`; an IPv6 one also reaches IPv4 daemons,
/// whatever the host's `bindv6only`.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Without it the socket reaches IPv6 daemons only, which is still
        // of use; quinn's own client endpoint does the same.
        if let Err(e) = socket.set_only_v6(false) {
            tracing::debug!(error = %e, "the UDP socket cannot be made dual-stack");
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Keeps a session to `daemon` until `stop`.
pub async fn keep(
    relay: Arc<Relay>,
    endpoint: quinn::Endpoint,
    daemon: Daemon,
    stop: CancellationToken,
) {
    let span = tracing::info_span!("daemon", address = %daemon.address);
    async move {
        let mut backoff = BACKOFF_START;
        loop {
            if stop.is_cancelled() {
                break;
            }
            let outcome = tokio::select! {
                _ = stop.cancelled() => break,
                r = connect(&relay, &endpoint, &daemon) => r,
            };
            let failed = match outcome {
                Ok((conn, control)) => {
                    backoff = BACKOFF_START;
                    let reason = serve(&relay, &daemon, conn.clone(), control, &stop).await;
                    if stop.is_cancelled() {
                        conn.close(CLOSE_STOPPING.into(), b"relay stopping");
                        break;
                    }
                    // A daemon that closed the session said why; else this
                    // relay gives up on it and tells the daemon why.
                    match end(&conn, "the daemon", CLOSE_LOST, &reason) {
                        // The daemon is stopping (a restart, an upgrade):
                        // news, not a failure.
                        Ended::Stopping(reason) => {
                            tracing::info!(%reason, "the daemon closed the session; reconnecting")
                        }
                        Ended::Failed(reason) => {
                            tracing::warn!(%reason, "session lost; reconnecting")
                        }
                    }
                    None
                }
                Err(e) => Some(e),
            };
            // Full backoff plus up to half again of jitter, so relays that
            // lost a daemon together do not come back together.
            let delay = backoff + backoff.mul_f64(rand::thread_rng().gen_range(0.0..0.5));
            match failed {
                Some(NoSession::Refused(e)) => {
                    tracing::error!(error = %e, retry_in = ?delay, "refused")
                }
                Some(NoSession::Failed(e)) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot open a session")
                }
                None => {}
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
    .instrument(span)
    .await
}

type Control = (SendStream, FrameReader<Stream>, Duration);

/// The code a session is closed with when the relay stops (the daemon logs
/// it as news, not as a failure), and when it gives up on a broken session.
const CLOSE_STOPPING: u32 = 0;
const CLOSE_LOST: u32 = 1;

/// Why no session opened.
enum NoSession {
    /// The daemon refused this relay (name, token or protocol version).
    Refused(String),
    /// Anything else: resolution, network, handshake.
    Failed(String),
}

impl From<String> for NoSession {
    fn from(e: String) -> NoSession {
        NoSession::Failed(e)
    }
}

async fn connect(
    relay: &Relay,
    endpoint: &quinn::Endpoint,
    daemon: &Daemon,
) -> Result<(quinn::Connection, Control), NoSession> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((daemon.host.as_str(), daemon.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", daemon.address))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{} resolves to no address", daemon.address).into());
    }
    // Each address in turn, as resolved: a name with an IPv6 address the
    // network does not route still reaches the daemon over IPv4.
    let mut failures = Vec::new();
    let mut conn = None;
    for addr in addrs {
        match handshake(endpoint, addr, daemon).await {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(e) => failures.push(e),
        }
    }
    let Some(conn) = conn else {
        return Err(failures.join("; ").into());
    };
    let limits = Limits::default();
    let hello = async {
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut control = FrameReader::new(Stream(recv), limits);
        let frame = Frame::Hello {
            name: relay.config.name.clone(),
            token: relay.config.token.expose().to_string(),
            protocol_version: PROTOCOL_VERSION,
            relay_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        write_frame(&mut send, &frame, &limits).await?;
        match control.next().await.map_err(String::from)? {
            Some(Frame::Accept {
                heartbeat_interval_ms,
                session_id,
                daemon_version,
            }) => {
                let daemon_version = printable(&daemon_version);
                tracing::info!(session = session_id, %daemon_version, "session open");
                let every = Duration::from_millis(heartbeat_interval_ms.clamp(500, 60_000));
                Ok((send, control, every))
            }
            Some(Frame::Reject { reason }) => Err(NoSession::Refused(format!(
                "the daemon refused this relay: {}",
                printable(&reason)
            ))),
            Some(other) => Err(format!("expected accept or reject, got {}", other.name()).into()),
            None => Err("the daemon ended the control stream without an answer"
                .to_string()
                .into()),
        }
    };
    let control = tokio::time::timeout(HANDSHAKE_TIMEOUT, hello)
        .await
        .map_err(|_| format!("no answer to hello within {HANDSHAKE_TIMEOUT:?}"))?
        .map_err(|e| match (e, conn.close_reason()) {
            // A daemon that closed the connection said why.
            (NoSession::Failed(_), Some(closed)) => {
                NoSession::Failed(why_closed(&closed, "the daemon"))
            }
            (e, _) => e,
        })?;
    Ok((conn, control))
}

/// A QUIC connection to the daemon at `addr`, verified against
/// `server_ca`, or why there is none.
async fn handshake(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    daemon: &Daemon,
) -> Result<quinn::Connection, String> {
    let connecting = endpoint
        .connect(addr, &daemon.host)
        .map_err(|e| format!("connect {} ({addr}): {e}", daemon.address))?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| {
            format!(
                "no QUIC handshake with {} ({addr}) within {HANDSHAKE_TIMEOUT:?}",
                daemon.address
            )
        })?
        .map_err(|e| {
            let hint = if e.to_string().contains("certificate") {
                " (is server_ca the CA that signed the daemon's certificate, and does \
                 the daemon's certificate name this address?)"
            } else {
                ""
            };
            // quinn's words may carry the daemon's close reason.
            let e = printable(&e.to_string()).into_owned();
            format!("QUIC handshake with {} ({addr}): {e}{hint}", daemon.address)
        })
}

/// Serves one session until it ends; returns why it ended.
async fn serve(
    relay: &Arc<Relay>,
    daemon: &Daemon,
    conn: quinn::Connection,
    control: Control,
    stop: &CancellationToken,
) -> String {
    let (mut send, mut control, every) = control;
    let limits = Limits::default();
    let heartbeat = async {
        let mut seq = 0u64;
        loop {
            seq += 1;
            write_frame(&mut send, &Frame::Heartbeat { seq }, &limits).await?;
            let answered = tokio::time::timeout(every * 3, control.next()).await;
            match answered {
                Err(_) => return Err::<(), String>("no heartbeat answer".into()),
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(Some(Frame::Heartbeat { .. }))) => {}
                Ok(Ok(Some(other))) => {
                    return Err(format!(
                        "unexpected {} frame on the control stream",
                        other.name()
                    ))
                }
                Ok(Ok(None)) => return Err("the daemon ended the control stream".into()),
            }
            tokio::time::sleep(every).await;
        }
    };
    // Request tasks name the daemon in their lines themselves, so a relay
    // serving several daemons says which one a request came from. Not by
    // running in the session's span: entering a span at each poll cost
    // the relay about a tenth of its CPU per request.
    let address: Arc<str> = daemon.address.as_str().into();
    let accept = async {
        loop {
            let (s, r) = conn.accept_bi().await.map_err(|e| e.to_string())?;
            let relay = relay.clone();
            let address = address.clone();
            relay
                .requests
                .clone()
                .spawn(async move { request(&relay, &address, s, r).await });
        }
        #[allow(unreachable_code)]
        Ok::<(), String>(())
    };
    tokio::select! {
        _ = stop.cancelled() => "relay stopping".to_string(),
        r = heartbeat => r.err().unwrap_or_default(),
        r = accept => r.err().unwrap_or_default(),
    }
}

/// One request stream from `daemon`: read the head and body, perform,
/// stream the answer.
async fn request(relay: &Relay, daemon: &str, mut send: SendStream, recv: RecvStream) {
    let limits = Limits::default();
    let mut frames = FrameReader::new(Stream(recv), limits);
    let result = perform(relay, daemon, &mut send, &mut frames, &limits).await;
    if let Err(f) = result {
        tracing::info!(%daemon, kind = ?f.kind, error = %printable(&f.message), "request refused or failed");
        // The daemon may still be writing a body this relay will not read:
        // stop it, so it turns to reading the error below.
        let _ = frames.source_mut().0.stop(0u32.into());
        let _ = write_frame(
            &mut send,
            &Frame::Error {
                kind: f.kind,
                message: truncate(&f.message, limits.max_text),
            },
            &limits,
        )
        .await;
    }
    let _ = send.finish();
    let _ = send.stopped().await;
}

async fn perform(
    relay: &Relay,
    daemon: &str,
    send: &mut SendStream,
    frames: &mut FrameReader<Stream>,
    limits: &Limits,
) -> Result<(), Failure> {
    let protocol = |e: String| Failure::new(ErrorKind::Protocol, e);
    let head = tokio::time::timeout(HEAD_TIMEOUT, frames.next())
        .await
        .map_err(|_| protocol(format!("no request head within {HEAD_TIMEOUT:?}")))?
        .map_err(|e| protocol(e.to_string()))?;
    let (method, url, headers, protocol_profile, timeout_ms) = match head {
        Some(Frame::RequestHead {
            method,
            url,
            headers,
            protocol_profile,
            timeout_ms,
        }) => (method, url, headers, protocol_profile, timeout_ms),
        Some(other) => {
            return Err(protocol(format!(
                "expected a request head, got {}",
                other.name()
            )))
        }
        None => return Err(protocol("the stream ended before a request head".into())),
    };
    if relay.draining.is_cancelled() {
        return Err(Failure::new(ErrorKind::Overloaded, "relay is stopping"));
    }
    // The request's time runs from its head, as the daemon's runs from the
    // stream's opening: reading the body and waiting for a permit count, so
    // the relay gives up before the daemon does and never sends a request
    // the daemon has already given up on (and will send again).
    let deadline = Deadline::starting_now(Duration::from_millis(timeout_ms.clamp(1, 600_000)));
    let mut body = BytesMut::new();
    loop {
        let frame = tokio::time::timeout_at(deadline.at, frames.next())
            .await
            .map_err(|_| {
                Failure::new(
                    ErrorKind::Timeout,
                    format!(
                        "{NOT_SENT} the request's body did not arrive within {:?}",
                        deadline.timeout
                    ),
                )
            })?
            .map_err(|e| protocol(e.to_string()))?;
        match frame {
            Some(Frame::BodyChunk(data)) => {
                if (body.len() + data.len()) as u64 > relay.config.max_body {
                    return Err(Failure::new(
                        ErrorKind::BodyTooLarge,
                        format!(
                            "request body is over this relay's max_body of {} bytes",
                            relay.config.max_body
                        ),
                    ));
                }
                body.extend_from_slice(&data);
            }
            Some(Frame::End) => break,
            Some(other) => {
                return Err(protocol(format!(
                    "expected a body chunk or end, got {}",
                    other.name()
                )))
            }
            None => return Err(protocol("the stream ended before the body's end".into())),
        }
    }
    let _permit = match tokio::time::timeout_at(deadline.at, relay.permits.acquire()).await {
        Ok(Ok(permit)) => permit,
        Ok(Err(_)) => return Err(Failure::new(ErrorKind::Overloaded, "relay is stopping")),
        Err(_) => {
            return Err(Failure::new(
                ErrorKind::Timeout,
                format!(
                    "{NOT_SENT} no free slot within {:?} (the relay's concurrency is {})",
                    deadline.timeout, relay.config.concurrency
                ),
            ))
        }
    };
    let mut resp = relay
        .performer
        .send(
            &method,
            &url,
            &headers,
            protocol_profile.as_deref(),
            body.freeze(),
            deadline,
        )
        .await?;
    tracing::debug!(%daemon, %method, %url, status = resp.status, "performed");
    // From here the target has answered, and the daemon gets its status
    // whatever the rest holds, as it would delivering directly: headers
    // the tunnel cannot carry and a body past max_body are left out (and
    // said so), a body that breaks off ends the answer. Only a body still
    // coming when the request's time is up fails it, as it does directly.
    let (carried, left_out) = limits.fit_response_headers(resp.status, resp.headers);
    if !left_out.is_empty() {
        tracing::warn!(
            %daemon, %url, status = resp.status, dropped = left_out.len(),
            left_out = %printable(&names(&left_out)),
            "response headers a head frame cannot carry were left out of the answer \
             (at most {} headers, names of {} bytes, values of {} bytes, {} bytes in all)",
            limits.max_headers, limits.max_header_name, limits.max_header_value,
            limits.max_head_frame
        );
    }
    let io = |e: String| Failure::new(ErrorKind::Other, e);
    // Frames are gathered and written a CHUNK at a time: a small answer
    // (the usual case) is one write, head, body and end together.
    let mut out = Vec::new();
    encode(
        &Frame::ResponseHead {
            status: resp.status,
            headers: carried,
        },
        limits,
        &mut out,
    )
    .map_err(io)?;
    let mut total = 0u64;
    loop {
        let next = tokio::time::timeout_at(deadline.at, resp.body.next_chunk())
            .await
            .map_err(|_| {
                Failure::new(
                    ErrorKind::Timeout,
                    format!(
                        "the response body did not end within {:?}",
                        deadline.timeout
                    ),
                )
            })?;
        let mut chunk: Bytes = match next {
            None => break,
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                tracing::info!(%daemon, %url, status = resp.status, error = %printable(&e.to_string()),
                    "the response body broke off; the answer ends with what came");
                break;
            }
        };
        let room = relay.config.max_body - total;
        let over = chunk.len() as u64 > room;
        if over {
            chunk.truncate(room as usize);
        }
        total += chunk.len() as u64;
        for piece in chunk.chunks(CHUNK) {
            encode(&Frame::BodyChunk(piece.to_vec()), limits, &mut out).map_err(io)?;
            if out.len() >= CHUNK {
                send.write_all(&out).await.map_err(|e| io(e.to_string()))?;
                out.clear();
            }
        }
        if over {
            tracing::warn!(%daemon, %url, status = resp.status, max_body = relay.config.max_body,
                "the response body is over this relay's max_body; the answer carries its first \
                 max_body bytes");
            break;
        }
    }
    encode(&Frame::End, limits, &mut out).map_err(io)?;
    send.write_all(&out).await.map_err(|e| io(e.to_string()))
}

/// Header names for a log line: the first ten, and how many more.
fn names(all: &[String]) -> String {
    let shown = all.len().min(10);
    let mut text = all[..shown].join(", ");
    if all.len() > shown {
        text.push_str(&format!(" and {} more", all.len() - shown));
    }
    text
}

fn encode(frame: &Frame, limits: &Limits, out: &mut Vec<u8>) -> Result<(), String> {
    outbox_proto::encode(frame, limits, out).map_err(|e| e.to_string())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}
