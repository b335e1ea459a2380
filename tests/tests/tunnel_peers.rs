//! Misbehaving peers on the tunnel, over real QUIC and TLS on loopback.
//!
//! A hostile relay — a raw quinn client trusting the test CA — against a
//! real `outboxd`: bytes that are no hello, wrong hellos, bad answers on
//! request streams, garbage on the control stream, streams of its own. A
//! hostile daemon — a raw quinn server with a certificate from the test
//! PKI — against a real `outbox-relay`: bad answers to its hello, garbage
//! on the control stream, bad request streams, targets outside `allow`,
//! bodies over `max_body` or without end, a session broken on purpose.
//!
//! Valid frames come from the proto crate's own encoder (with roomier
//! limits for frames the default ones refuse); invalid ones are raw bytes.
//! Each case checks what the product rule asks: the peer that is still
//! running says what was wrong and where (its log, and its answer where
//! the protocol has one), no queued message is lost or wrongly marked
//! sent, and other sessions carry on.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use outbox_proto::quic::Stream;
use outbox_proto::{ErrorKind, Frame, FrameReader, Limits, ALPN, PROTOCOL_VERSION};
use outbox_tests::{free_udp_port, Pki, PkiFiles, Relay};
use serde_json::{json, Value};

/// A bound on every wait: generous for 2 loaded cores, far above what a
/// passing case takes.
const WAIT: Duration = Duration::from_secs(15);
/// The daemon's tokens for its two MID servers.
const DC1_TOKEN: &str = "dc1-token-4f1c9a7e2b6d";
const DC2_TOKEN: &str = "dc2-token-8d3e6b0a5c1f";
/// The relay's first reconnect waits its starting backoff, 500 ms, plus
/// up to half again of jitter (relay/src/session.rs).
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------
// Frames and streams
// ---------------------------------------------------------------------

/// `frame` as the proto crate encodes it within the default limits.
fn wire(frame: &Frame) -> Vec<u8> {
    wire_with(frame, &Limits::default())
}

/// `frame` encoded under `limits`: how a frame the default limits refuse
/// is built.
fn wire_with(frame: &Frame, limits: &Limits) -> Vec<u8> {
    let mut out = Vec::new();
    outbox_proto::encode(frame, limits, &mut out)
        .unwrap_or_else(|e| panic!("encode a {} frame: {e}", frame.name()));
    out
}

/// Limits far above the defaults, to encode over-limit frames.
fn roomy() -> Limits {
    Limits {
        max_frame: 4 << 20,
        max_head_frame: 1 << 20,
        max_headers: 10_000,
        max_header_name: 1 << 16,
        max_header_value: 1 << 16,
        max_url: 1 << 16,
        max_name: 1 << 16,
        max_token: 1 << 16,
        max_short: 1 << 16,
        max_text: 1 << 16,
    }
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn hello(name: &str, token: &str) -> Frame {
    Frame::Hello {
        name: name.into(),
        token: token.into(),
        protocol_version: PROTOCOL_VERSION,
        relay_version: "hostile-0.0.1".into(),
    }
}

fn accept_frame(heartbeat_interval_ms: u64) -> Frame {
    Frame::Accept {
        daemon_version: "hostile-0.0.1".into(),
        heartbeat_interval_ms,
        session_id: 4242,
    }
}

fn response_head(status: u16) -> Frame {
    Frame::ResponseHead {
        status,
        headers: vec![],
    }
}

/// Frames of a QUIC receive stream, read as both binaries read theirs.
type Frames = FrameReader<Stream>;

fn frames(recv: quinn::RecvStream) -> Frames {
    FrameReader::new(Stream(recv), Limits::default())
}

/// The next frame of `frames`, within [`WAIT`].
async fn next_frame(frames: &mut Frames, what: &str) -> Result<Option<Frame>, String> {
    tokio::time::timeout(WAIT, frames.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no frame within {WAIT:?}"))
        .map_err(String::from)
}

/// How a connection ended, as `(code, reason)` of an application close.
async fn closed_by_peer(conn: &quinn::Connection, what: &str) -> (u64, String) {
    let e = tokio::time::timeout(WAIT, conn.closed())
        .await
        .unwrap_or_else(|_| panic!("{what}: the peer did not close within {WAIT:?}"));
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("{what}: expected an application close, got {other}"),
    }
}

fn toml_path(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

/// Lines of `log` containing every one of `needles`.
fn lines_with<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// Waits until a line of `log()` holds every needle; returns it.
async fn logged(who: &str, log: impl Fn() -> String, needles: &[&str]) -> String {
    eventually_msg(
        WAIT,
        format!("a line in the {who} log with {needles:?}"),
        || lines_with(&log(), needles).first().map(|l| l.to_string()),
    )
    .await
}

// ---------------------------------------------------------------------
// A real outboxd with a tunnel, a sink and real relays
// ---------------------------------------------------------------------

/// A real `outboxd` with its tunnel on loopback, MID servers dc1 and dc2,
/// integration `acme` through dc1 and `other` through dc2, both to one
/// sink.
struct Tunnel {
    _certs: tempfile::TempDir,
    pki: Pki,
    files: PkiFiles,
    port: u16,
    sink: Sink,
    daemon: Daemon,
}

impl Tunnel {
    async fn start() -> Tunnel {
        let pki = Pki::new();
        let certs = tempfile::tempdir().expect("temp dir");
        let files = pki.write_to(certs.path());
        let port = free_udp_port();
        let sink = Sink::start().await;
        let daemon = suite_daemon()
            .config_toml(&format!(
                "[tunnel]\nlisten = \"127.0.0.1:{port}\"\ncert = {}\nkey = {}\n\n\
                 [mid_servers.dc1]\ntoken = \"{DC1_TOKEN}\"\n\n\
                 [mid_servers.dc2]\ntoken = \"{DC2_TOKEN}\"\n",
                toml_path(&files.server_cert),
                toml_path(&files.server_key),
            ))
            .start()
            .await;
        for (name, mid) in [("acme", "dc1"), ("other", "dc2")] {
            let doc = integration(
                name,
                &[&connection(
                    "dc",
                    "production",
                    &sink.url(),
                    &format!("active = true\n  mid_server = \"{mid}\""),
                )],
            );
            let (s, v) = daemon.apply(&doc).await;
            assert_eq!(s, StatusCode::OK, "{v}");
        }
        Tunnel {
            _certs: certs,
            pki,
            files,
            port,
            sink,
            daemon,
        }
    }

    /// A tunnel with a real dc2 relay connected, and its session: what
    /// [`Tunnel::unharmed`] checks a case left alone.
    async fn start_with_dc2() -> (Tunnel, Relay, Value) {
        let t = Tunnel::start().await;
        let relay = t.relay("dc2", DC2_TOKEN);
        let session = t.session("dc2", None).await;
        (t, relay, session)
    }

    /// No dc1 session is listed: a refused relay got none.
    async fn no_dc1_session(&self) {
        assert!(
            self.sessions().await.iter().all(|s| s["name"] != "dc1"),
            "no dc1 session came of it"
        );
    }

    /// A real `outbox-relay` for MID server `name`, allowed to reach the
    /// sink.
    fn relay(&self, name: &str, token: &str) -> Relay {
        Relay::start(&relay_config(
            name,
            token,
            &[self.port],
            &self.files.ca,
            &[self.sink.addr().to_string()],
        ))
    }

    async fn hostile(&self) -> HostileRelay {
        HostileRelay::connect(&self.pki, self.port).await
    }

    async fn sessions(&self) -> Vec<Value> {
        let (s, v) = self.daemon.get("/v1/mid-servers").await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v.as_array().expect("a list of sessions").clone()
    }

    /// Waits for a session of MID server `name` (from `address`, if given).
    async fn session(&self, name: &str, address: Option<SocketAddr>) -> Value {
        eventually_msg(WAIT, format!("a {name} session"), async || {
            self.sessions().await.into_iter().find(|s| {
                s["name"] == name
                    && address.is_none_or(|a| s["address"].as_str() == Some(&a.to_string()))
            })
        })
        .await
    }

    async fn no_session_from(&self, address: SocketAddr) {
        let address = address.to_string();
        eventually_msg(WAIT, format!("no session from {address}"), async || {
            let sessions = self.sessions().await;
            if sessions.iter().any(|s| s["address"] == address.as_str()) {
                Err(sessions)
            } else {
                Ok(())
            }
        })
        .await;
    }

    async fn send(&self, integration: &str) -> String {
        let (s, v) = self
            .daemon
            .enqueue(integration, &json!({"message": "Create", "body": {"n": 1}}))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        v["id"].as_str().expect("an id").to_string()
    }

    fn log(&self) -> String {
        self.daemon.log()
    }

    /// What every hostile-relay case ends with: the daemon answers
    /// `/healthz`; the dc2 session is the one from before and still
    /// delivers; message `waiting` (of `acme`, through dc1) was neither
    /// lost nor marked sent nor charged an attempt, and a real dc1 relay
    /// delivers it to the sink.
    async fn unharmed(&self, dc2_before: &Value, waiting: &str) -> Relay {
        let health = self
            .daemon
            .try_request(http::Method::GET, "/healthz", None, None, &[])
            .await
            .expect("outboxd answers /healthz");
        assert_eq!(health.status, StatusCode::OK, "{}", health.text());

        let dc2 = self.session("dc2", None).await;
        assert_eq!(dc2["id"], dc2_before["id"], "the dc2 session is untouched");
        let other = self.send("other").await;
        let m = self.daemon.wait_for_state(&other, "sent", WAIT).await;
        let via = format!("mid:dc2 ({})", dc2["address"].as_str().unwrap());
        assert_eq!(m["attempts"][0]["via"], via.as_str(), "{m}");

        // Not lost, not sent: back in the queue once no attempt is in
        // flight.
        let m = self.daemon.wait_for_state(waiting, "queued", WAIT).await;
        assert_eq!(m["attempt_count"], 0, "no attempt charged: {m}");
        assert!(
            !self.sink.distinct_ids().contains(waiting),
            "nothing reached the sink for {waiting}"
        );
        let relay = self.relay("dc1", DC1_TOKEN);
        let m = self.daemon.wait_for_state(waiting, "sent", WAIT).await;
        assert_eq!(m["attempt_count"], 1, "{m}");
        let last = m["attempts"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["status"], 200, "{m}");
        assert!(
            self.sink.distinct_ids().contains(waiting),
            "the real relay delivered {waiting} to the sink"
        );
        relay
    }
}

/// A hostile relay: a raw QUIC client with the test CA and the tunnel's
/// ALPN, on a loopback port of its own (its address in the daemon's log).
struct HostileRelay {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

/// The relay's end of an accepted control stream.
struct Control {
    send: quinn::SendStream,
    frames: Frames,
    session: u64,
}

/// Heartbeats sent every second from a task, each echo checked; the task
/// stops when this is dropped.
struct Beating(tokio::task::JoinHandle<String>);

impl HostileRelay {
    async fn connect(pki: &Pki, port: u16) -> HostileRelay {
        Self::connect_from(pki, port, [127, 0, 0, 1]).await
    }

    /// Connects from `ip`, a loopback address of its own.
    async fn connect_from(pki: &Pki, port: u16, ip: [u8; 4]) -> HostileRelay {
        let mut tls = pki.client_config(None);
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("a TLS 1.3 client");
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(WAIT.try_into().expect("an idle timeout")));
        client.transport_config(Arc::new(transport));
        let mut endpoint = quinn::Endpoint::client((ip, 0).into()).expect("a UDP socket");
        endpoint.set_default_client_config(client);
        let connecting = endpoint
            .connect(([127, 0, 0, 1], port).into(), "localhost")
            .expect("a QUIC connection starts");
        let conn = tokio::time::timeout(WAIT, connecting)
            .await
            .expect("a QUIC handshake in time")
            .expect("the QUIC handshake with outboxd");
        HostileRelay { endpoint, conn }
    }

    /// The address the daemon sees.
    fn address(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("a local address")
    }

    /// Opens the control stream and writes `bytes` on it, then ends it if
    /// `finish`.
    async fn control(&self, bytes: &[u8], finish: bool) -> (quinn::SendStream, Frames) {
        let (mut send, recv) = self.conn.open_bi().await.expect("a control stream");
        // The daemon may close the connection while this is written.
        let _ = send.write_all(bytes).await;
        if finish {
            let _ = send.finish();
        }
        (send, frames(recv))
    }

    /// Says hello as MID server `name` and returns the accepted control
    /// stream; panics if the daemon does not accept.
    async fn hello(&self, name: &str, token: &str) -> Control {
        let (send, mut frames) = self.control(&wire(&hello(name, token)), false).await;
        match next_frame(&mut frames, "the answer to a hello").await {
            Ok(Some(Frame::Accept { session_id, .. })) => Control {
                send,
                frames,
                session: session_id,
            },
            other => panic!("expected an accept, got {other:?}"),
        }
    }

    /// Takes the next request the daemon sends, read to its end; returns
    /// the stream to answer on, and the method and URL.
    async fn take_request(&self, what: &str) -> (quinn::SendStream, (String, String)) {
        let (send, recv) = tokio::time::timeout(WAIT, self.conn.accept_bi())
            .await
            .unwrap_or_else(|_| panic!("{what}: the daemon sends a message"))
            .expect("a request stream");
        (send, read_request(&mut frames(recv)).await)
    }

    async fn closed(&self, what: &str) -> (u64, String) {
        closed_by_peer(&self.conn, what).await
    }
}

impl Drop for HostileRelay {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"hostile relay done");
    }
}

impl Control {
    fn beat(self) -> Beating {
        let Control {
            mut send,
            mut frames,
            ..
        } = self;
        Beating(tokio::spawn(async move {
            for seq in 1.. {
                if let Err(e) = send.write_all(&wire(&Frame::Heartbeat { seq })).await {
                    return format!("heartbeat {seq}: {e}");
                }
                match frames.next().await {
                    Ok(Some(Frame::Heartbeat { seq: echo })) if echo == seq => {}
                    other => return format!("heartbeat {seq} answered with {other:?}"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            unreachable!("heartbeats count up forever")
        }))
    }
}

impl Beating {
    fn assert_alive(&self) {
        assert!(
            !self.0.is_finished(),
            "the daemon stopped echoing heartbeats"
        );
    }
}

impl Drop for Beating {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads a request the daemon sent on a stream, through its end frame;
/// returns its method and URL.
async fn read_request(frames: &mut Frames) -> (String, String) {
    let (method, url) = match next_frame(frames, "a request head").await {
        Ok(Some(Frame::RequestHead { method, url, .. })) => (method, url),
        other => panic!("expected a request head, got {other:?}"),
    };
    loop {
        match next_frame(frames, "a request body").await {
            Ok(Some(Frame::BodyChunk(_))) => {}
            Ok(Some(Frame::End)) => return (method, url),
            other => panic!("expected a body chunk or end, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------
// A real outbox-relay, and a hostile daemon for it
// ---------------------------------------------------------------------

fn relay_config(
    name: &str,
    token: &str,
    daemons: &[u16],
    ca: &Path,
    allow: &[String],
) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("name".into(), name.into());
    t.insert("token".into(), token.into());
    t.insert(
        "daemons".into(),
        toml::Value::Array(
            daemons
                .iter()
                .map(|p| format!("127.0.0.1:{p}").into())
                .collect(),
        ),
    );
    t.insert("server_ca".into(), ca.display().to_string().into());
    t.insert(
        "allow".into(),
        toml::Value::Array(allow.iter().map(|a| a.as_str().into()).collect()),
    );
    t.insert("concurrency".into(), 4.into());
    t.insert("max_body".into(), "4KiB".into());
    t.insert("drain".into(), "1s".into());
    let mut log = toml::Table::new();
    log.insert("level".into(), "info,outbox_relay=debug".into());
    t.insert("log".into(), log.into());
    t
}

/// A hostile daemon: a raw QUIC server on loopback presenting a server
/// certificate of a test PKI with the tunnel's ALPN.
struct HostileDaemon {
    /// The PKI it made for itself, if it did.
    _own: Option<(tempfile::TempDir, Pki)>,
    /// The CA file a relay trusts it with.
    ca: PathBuf,
    endpoint: quinn::Endpoint,
}

/// A relay that connected to the hostile daemon and said hello.
struct Peer {
    conn: quinn::Connection,
    send: quinn::SendStream,
    frames: Frames,
    name: String,
    at: Instant,
}

impl HostileDaemon {
    /// With a PKI of its own.
    fn start() -> HostileDaemon {
        let pki = Pki::new();
        let certs = tempfile::tempdir().expect("temp dir");
        let files = pki.write_to(certs.path());
        let mut d = HostileDaemon::presenting(pki.server(), files.ca);
        d._own = Some((certs, pki));
        d
    }

    /// Presenting `server`, a certificate of the CA in the file `ca`.
    fn presenting(server: &outbox_tests::Identity, ca: PathBuf) -> HostileDaemon {
        let tls = outbox_tests::pki::server_config(server, None, &[ALPN]);
        let crypto =
            quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("a TLS 1.3 server");
        let server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint =
            quinn::Endpoint::server(server, ([127, 0, 0, 1], 0).into()).expect("a UDP socket");
        HostileDaemon {
            _own: None,
            ca,
            endpoint,
        }
    }

    fn port(&self) -> u16 {
        self.endpoint.local_addr().expect("a local address").port()
    }

    /// The relay config for MID server `name` of this daemon (and
    /// `others`), allowed to reach `allow`.
    fn relay_config(&self, name: &str, others: &[u16], allow: &[String]) -> toml::Table {
        let mut daemons = vec![self.port()];
        daemons.extend_from_slice(others);
        relay_config(name, "any-token", &daemons, &self.ca, allow)
    }

    /// The next relay to connect, once it said hello.
    async fn next(&self) -> Peer {
        let incoming = tokio::time::timeout(WAIT, self.endpoint.accept())
            .await
            .expect("a relay connects in time")
            .expect("the endpoint is open");
        hello_of(incoming).await
    }

    /// Hands every relay that connects to `handle`, each in a task of
    /// `tasks` (aborted when the set is dropped).
    fn serve<F, Fut>(&self, tasks: &mut tokio::task::JoinSet<()>, handle: F)
    where
        F: Fn(Peer) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let endpoint = self.endpoint.clone();
        let handle = Arc::new(handle);
        let mut inner = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let handle = handle.clone();
                inner.spawn(async move { handle(hello_of(incoming).await).await });
            }
        });
    }
}

async fn hello_of(incoming: quinn::Incoming) -> Peer {
    let conn = tokio::time::timeout(WAIT, incoming)
        .await
        .expect("a QUIC handshake in time")
        .expect("the QUIC handshake with the relay");
    let (send, recv) = tokio::time::timeout(WAIT, conn.accept_bi())
        .await
        .expect("a control stream in time")
        .expect("the relay opens a control stream");
    let mut frames = frames(recv);
    match next_frame(&mut frames, "the relay's hello").await {
        Ok(Some(Frame::Hello { name, .. })) => Peer {
            conn,
            send,
            frames,
            name,
            at: Instant::now(),
        },
        other => panic!("expected a hello, got {other:?}"),
    }
}

impl Peer {
    /// Accepts the relay and echoes its heartbeats until the connection
    /// ends.
    async fn accept_and_echo(mut self, heartbeat_interval_ms: u64) {
        let _ = self
            .send
            .write_all(&wire(&accept_frame(heartbeat_interval_ms)))
            .await;
        while let Ok(Some(Frame::Heartbeat { seq })) = self.frames.next().await {
            if self
                .send
                .write_all(&wire(&Frame::Heartbeat { seq }))
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

/// Sends `bytes` on a new request stream (ending it if `finish`) and
/// reads the relay's whole answer.
async fn relay_answer(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> Vec<Frame> {
    let (mut send, recv) = conn.open_bi().await.expect("a request stream");
    // The relay stops reading a stream it refuses: the write may fail.
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    read_answer(recv).await
}

async fn read_answer(recv: quinn::RecvStream) -> Vec<Frame> {
    let mut frames = frames(recv);
    let mut out = Vec::new();
    loop {
        match next_frame(&mut frames, "the relay's answer").await {
            Ok(Some(f)) => out.push(f),
            Ok(None) => return out,
            Err(e) => panic!("the relay's answer is unreadable after {out:?}: {e}"),
        }
    }
}

/// The one error frame of an answer.
fn error_of(answer: &[Frame], case: &str) -> (ErrorKind, String) {
    match answer {
        [Frame::Error { kind, message }] => (*kind, message.clone()),
        other => panic!("{case}: expected one error frame, got {other:?}"),
    }
}

// ---------------------------------------------------------------------
// A: a hostile relay against a real outboxd
// ---------------------------------------------------------------------

/// A1. Bytes that are no hello — garbage, an oversized or empty length
/// prefix, a hello announcing a megabyte, an unknown kind, a truncated
/// hello, another frame, nothing: the daemon closes that connection,
/// logs the problem with the peer's address, and nothing else changes.
#[tokio::test]
async fn bytes_that_are_no_hello_are_refused_with_the_reason_logged() {
    let (t, _dc2, dc2) = Tunnel::start_with_dc2().await;
    let waiting = t.send("acme").await;

    let good = wire(&hello("dc1", DC1_TOKEN));
    let n = good.len();
    let no_valid_hello = "no valid hello";
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>, &str, String)> = vec![
        ("HTTP", b"GET / HTTP/1.1\r\nHost: outbox\r\n\r\n".to_vec(), no_valid_hello,
         "frame length prefix announces 1195725856 bytes, expected at most 1048576".into()),
        ("max prefix", vec![0xff; 4], no_valid_hello,
         "frame length prefix announces 4294967295 bytes, expected at most 1048576".into()),
        ("empty frame", vec![0, 0, 0, 0], no_valid_hello,
         "frame length prefix announces 0 bytes, expected at least 1".into()),
        ("big hello", vec![0, 0x10, 0, 0, 0], no_valid_hello,
         "hello frame of 1048576 bytes, expected at most 65536".into()),
        ("unknown kind", vec![0, 0, 0, 1, 42], no_valid_hello,
         "unknown frame kind 42, expected 0 to 8".into()),
        ("truncated hello", good[..n - 3].to_vec(), no_valid_hello,
         format!("the stream ended inside a frame: truncated frame: expected {n} bytes, found {}", n - 3)),
        ("heartbeat first", wire(&Frame::Heartbeat { seq: 1 }), no_valid_hello,
         "the first frame is heartbeat, not hello".into()),
        ("nothing", vec![], no_valid_hello,
         "the control stream ended before a hello".into()),
    ];
    for (case, bytes, refusal, detail) in &cases {
        let relay = t.hostile().await;
        let (_send, _frames) = relay.control(bytes, true).await;
        let (code, reason) = relay.closed(case).await;
        assert_eq!(code, 1, "{case}: closed as a refused hello ({reason})");
        assert!(!reason.is_empty(), "{case}: the close says why");
        let address = relay.address().to_string();
        let line = logged(
            "daemon",
            || t.log(),
            &["relay refused", refusal, detail, &address],
        )
        .await;
        assert!(line.contains("WARN"), "{case}: {line}");
    }
    t.no_dc1_session().await;
    let _dc1 = t.unharmed(&dc2, &waiting).await;
}

/// A2. Hellos that are wrong: a protocol version either side of this
/// one, an unknown name, a wrong token (answered with a reject that says
/// why); a name, token or relay version over its limit, a name that is
/// not UTF-8, trailing bytes (refused as no valid hello). Every refusal
/// is logged with the peer's address; no token is ever logged.
#[tokio::test]
async fn wrong_hellos_are_refused_and_named() {
    let (t, _dc2, dc2) = Tunnel::start_with_dc2().await;
    let waiting = t.send("acme").await;

    let with_version = |v: u32| Frame::Hello {
        name: "dc1".into(),
        token: DC1_TOKEN.into(),
        protocol_version: v,
        relay_version: "hostile-0.0.1".into(),
    };
    let rejects: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "future version",
            wire(&with_version(PROTOCOL_VERSION + 1)),
            format!(
                "relay speaks protocol version {}, this daemon speaks version {PROTOCOL_VERSION}; upgrade the daemon",
                PROTOCOL_VERSION + 1
            ),
        ),
        (
            "version 0",
            wire(&with_version(0)),
            format!("relay speaks protocol version 0, this daemon speaks version {PROTOCOL_VERSION}; upgrade the relay"),
        ),
        (
            "version u32::MAX",
            wire(&with_version(u32::MAX)),
            format!("relay speaks protocol version {}, this daemon speaks version {PROTOCOL_VERSION}; upgrade the daemon", u32::MAX),
        ),
        (
            "unknown name",
            wire(&hello("dc9", DC1_TOKEN)),
            "MID server \"dc9\" is not configured on this daemon".into(),
        ),
        (
            "wrong token",
            wire(&hello("dc1", DC2_TOKEN)),
            "wrong token for MID server \"dc1\"".into(),
        ),
    ];
    for (case, bytes, reason) in &rejects {
        let relay = t.hostile().await;
        let (_send, mut frames) = relay.control(bytes, false).await;
        match next_frame(&mut frames, case).await {
            Ok(Some(Frame::Reject { reason: said })) => assert_eq!(&said, reason, "{case}"),
            other => panic!("{case}: expected a reject, got {other:?}"),
        }
        let (code, said) = relay.closed(case).await;
        assert_eq!((code, said.as_str()), (2, reason.as_str()), "{case}");
        let address = relay.address().to_string();
        logged("daemon", || t.log(), &["relay refused", reason, &address]).await;
    }

    // Too long to decode: the hello is no valid hello at all.
    let long_token = "s3cr3t-".repeat(150);
    let roomy = roomy();
    let mut not_utf8 = vec![0, 0, 0, 7, 0, 2, 0xff, 0xfe, 0, 1, 0];
    not_utf8[3] = (not_utf8.len() - 4) as u8;
    let mut trailing = wire(&hello("dc1", DC1_TOKEN));
    trailing[3] += 1;
    trailing.push(0);
    let invalid: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "long name",
            wire_with(&hello(&"n".repeat(129), DC1_TOKEN), &roomy),
            "hello frame: name length is 129, expected at most 128",
        ),
        (
            "long token",
            wire_with(&hello("dc1", &long_token), &roomy),
            "hello frame: token length is 1050, expected at most 1024",
        ),
        (
            "long relay version",
            wire_with(
                &Frame::Hello {
                    name: "dc1".into(),
                    token: DC1_TOKEN.into(),
                    protocol_version: PROTOCOL_VERSION,
                    relay_version: "v".repeat(129),
                },
                &roomy,
            ),
            "hello frame: relay version length is 129, expected at most 128",
        ),
        (
            "name not UTF-8",
            not_utf8,
            "malformed hello frame: expected a UTF-8 string, found invalid utf-8 sequence of 1 bytes from index 0",
        ),
        (
            "trailing bytes",
            trailing,
            "hello frame has 1 trailing bytes, expected none",
        ),
    ];
    for (case, bytes, detail) in &invalid {
        let relay = t.hostile().await;
        let (_send, _frames) = relay.control(bytes, false).await;
        let (code, _) = relay.closed(case).await;
        assert_eq!(code, 1, "{case}");
        let address = relay.address().to_string();
        logged(
            "daemon",
            || t.log(),
            &["relay refused: no valid hello", detail, &address],
        )
        .await;
    }
    let log = t.log();
    assert!(!log.contains(DC1_TOKEN), "the daemon logs no token");
    assert!(!log.contains(DC2_TOKEN), "the daemon logs no token");
    assert!(!log.contains("s3cr3t-"), "the daemon logs no token");
    t.no_dc1_session().await;
    let _dc1 = t.unharmed(&dc2, &waiting).await;
}

/// A token with whitespace around it (as a relay from before both sides
/// trimmed it sends one read from a file with an extra newline) is the
/// token: the relay is let in.
#[tokio::test]
async fn a_token_with_whitespace_around_it_is_let_in() {
    let t = Tunnel::start().await;
    let relay = t.hostile().await;
    let _control = relay.hello("dc1", &format!(" {DC1_TOKEN}\n\n")).await;
    t.session("dc1", Some(relay.address())).await;
}

/// A2, the answer: a hello the daemon cannot decode is answered with
/// what is wrong with it — a reject, or the connection's close reason —
/// as a hello it can decode is, so the relay's operator does not need
/// the daemon's log to learn it.
#[tokio::test]
async fn an_undecodable_hello_is_answered_with_what_is_wrong() {
    let t = Tunnel::start().await;
    let relay = t.hostile().await;
    let bytes = wire_with(&hello(&"n".repeat(129), DC1_TOKEN), &roomy());
    let (_send, mut frames) = relay.control(&bytes, false).await;
    let rejected = match next_frame(&mut frames, "the answer").await {
        Ok(Some(Frame::Reject { reason })) => Some(reason),
        _ => None,
    };
    let (_, close) = relay.closed("long name").await;
    let told = rejected.unwrap_or(close);
    assert!(
        told.contains("name length is 129, expected at most 128"),
        "the relay was told only {told:?}"
    );
}

/// A2, the log: text a relay chooses — the name in its hello, the reason
/// it closes with — cannot add lines of its own to the daemon's log.
#[tokio::test]
async fn text_from_a_relay_cannot_forge_daemon_log_lines() {
    let t = Tunnel::start().await;
    let forged_name = "FORGED-NAME outbox_daemon::tunnel: relay connected";
    let relay = t.hostile().await;
    let bytes = wire(&hello(&format!("dc1\n{forged_name}"), DC1_TOKEN));
    let (_send, mut frames) = relay.control(&bytes, false).await;
    let answer = next_frame(&mut frames, "the answer").await;
    assert!(
        matches!(answer, Ok(Some(Frame::Reject { .. }))),
        "{answer:?}"
    );
    logged("daemon", || t.log(), &["is not configured on this daemon"]).await;

    let forged_close = "FORGED-CLOSE outbox_daemon::tunnel: all messages sent";
    let relay = t.hostile().await;
    let control = relay.hello("dc1", DC1_TOKEN).await;
    t.session("dc1", Some(relay.address())).await;
    relay
        .conn
        .close(0u32.into(), format!("stopping\n{forged_close}").as_bytes());
    drop(control);
    logged("daemon", || t.log(), &["relay closed its session"]).await;

    assert_no_forged_lines(&t.log(), "a relay");
}

/// A3. Bad answers on request streams — frames out of order, over the
/// limits, of no known kind, a stream that ends early or is reset — fail
/// the attempt, named with the relay's name and address, and count as an
/// attempt with no response does (with backoff: never a retry every
/// moment). The daemon closes that session with the reason (code 4), so a
/// broken relay cannot keep taking a cluster's messages; it logs it, and
/// a message sent later goes through a real relay.
#[tokio::test]
async fn bad_answers_on_request_streams_fail_the_attempt_and_close_the_session() {
    let (t, _dc2, dc2) = Tunnel::start_with_dc2().await;

    let ok = wire(&response_head(200));
    let roomy = roomy();
    let many_headers = Frame::ResponseHead {
        status: 200,
        headers: vec![("x-h".into(), b"v".to_vec()); 101],
    };
    let big_chunk = Frame::BodyChunk(vec![b'b'; Limits::default().max_chunk() + 1]);
    let partial = wire(&Frame::BodyChunk(b"partial body".to_vec()));
    #[rustfmt::skip]
    let cases: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        ("body before head", Some(concat(&[&wire(&Frame::BodyChunk(b"early".to_vec())), &wire(&Frame::End)])),
         "expected a response head, got body chunk"),
        ("second head", Some(concat(&[&ok, &ok, &wire(&Frame::End)])),
         "expected a body chunk or end in a response body, got response head"),
        ("unknown kind", Some(concat(&[&ok, &[0, 0, 0, 1, 42]])),
         "unknown frame kind 42, expected 0 to 8"),
        ("101 headers", Some(wire_with(&many_headers, &roomy)),
         "response head frame: header count is 101, expected at most 100"),
        ("chunk over the limit", Some(concat(&[&ok, &wire_with(&big_chunk, &roomy)])),
         "frame length prefix announces 1048577 bytes, expected at most 1048576"),
        ("error of no kind", Some(vec![0, 0, 0, 3, 8, 9, 0]),
         "malformed error frame: invalid value: integer `9`, expected variant index 0 <= i < 8"),
        ("truncated frame", Some(concat(&[&ok, &partial[..partial.len() - 4]])),
         "the stream ended inside a frame: truncated frame"),
        ("no end frame", Some(concat(&[&ok, &partial])),
         "the answer ended before its end frame"),
        ("reset", None, "reset by peer"),
    ];
    let mut ids = Vec::new();
    for (case, answer, expected) in &cases {
        let relay = t.hostile().await;
        let beating = relay.hello("dc1", DC1_TOKEN).await.beat();
        let address = relay.address();
        t.session("dc1", Some(address)).await;
        ids.push(t.send("acme").await);
        // Messages of earlier cases come too (a relay connecting wakes
        // them): whichever comes first gets the bad answer.
        let (mut send, _) = relay.take_request(case).await;
        match answer {
            Some(answer) => {
                let _ = send.write_all(answer).await;
                let _ = send.finish();
            }
            None => {
                let _ = send.reset(7u32.into());
            }
        }
        let (code, reason) = relay.closed(case).await;
        assert_eq!(code, 4, "{case}: closed for the bad answer ({reason})");
        assert!(
            reason.contains("answered a request badly") && reason.contains(expected),
            "{case}: {reason}"
        );
        drop(beating);
        t.no_session_from(address).await;
        logged(
            "daemon",
            || t.log(),
            &[
                "relay disconnected",
                "answered a request badly",
                expected,
                &address.to_string(),
            ],
        )
        .await;

        let via = format!("mid:dc1 ({address})");
        let bad = eventually_msg(
            WAIT,
            format!("{case}: the bad answer on record"),
            async || {
                for id in &ids {
                    let m = t.daemon.message(id).await;
                    let found = m["attempts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|a| a["via"] == via.as_str() && a["status"].is_null())
                        .cloned();
                    if let Some(a) = found.filter(|a| {
                        a["error"]
                            .as_str()
                            .is_some_and(|e| e.contains("answered badly"))
                    }) {
                        return Some((m, a));
                    }
                }
                None
            },
        )
        .await;
        let (m, a) = bad;
        let error = a["error"].as_str().unwrap_or("");
        assert!(error.contains(expected), "{case}: {a}");
        assert!(
            error.contains(&format!("relay dc1 ({address}) answered badly")),
            "{case}: {a}"
        );
        let outcome = a["outcome"].as_str().unwrap_or("");
        assert!(
            outcome.starts_with("retry in") || outcome.starts_with("error"),
            "{case}: it counts, with backoff: {m}"
        );
        assert!(m["attempt_count"].as_u64().unwrap_or(0) >= 1, "{case}: {m}");
        assert!(
            !t.sink.distinct_ids().iter().any(|id| ids.contains(id)),
            "{case}: nothing reached the sink"
        );
    }
    let later = t.send("acme").await;
    let _dc1 = t.unharmed(&dc2, &later).await;
}

/// A relay that takes a request and never answers it, while its session
/// stays alive: past the request's timeout (5 s) and the daemon's margin
/// of 5 s the attempt counts, as one with no response does, instead of
/// going round for free; the session is kept.
#[tokio::test]
async fn a_request_a_live_relay_never_answers_costs_an_attempt() {
    let t = Tunnel::start().await;
    let relay = t.hostile().await;
    let beating = relay.hello("dc1", DC1_TOKEN).await.beat();
    let address = relay.address();
    t.session("dc1", Some(address)).await;
    let id = t.send("acme").await;
    // Take the request, hold its stream open and say nothing.
    let (_send, _) = relay.take_request("silence").await;
    let m = eventually_msg(
        Duration::from_secs(30),
        "an attempt counted for the silence",
        async || {
            let m = t.daemon.message(&id).await;
            (m["attempt_count"].as_u64() >= Some(1)).then_some(m)
        },
    )
    .await;
    let a = &m["attempts"][0];
    let error = a["error"].as_str().unwrap_or("");
    assert!(
        error.contains(&format!("relay dc1 ({address}) gave no answer within 10s")),
        "{m}"
    );
    assert!(
        a["outcome"].as_str().unwrap_or("").starts_with("retry in"),
        "{m}"
    );
    beating.assert_alive();
    t.session("dc1", Some(address)).await;
}

/// A request in flight on a session this daemon drops (garbage on the
/// control stream) records why the daemon dropped it, not quinn's bare
/// "connection lost"; the message goes round again for free.
#[tokio::test]
async fn a_request_on_a_session_the_daemon_drops_says_why() {
    let t = Tunnel::start().await;
    let relay = t.hostile().await;
    let mut control = relay.hello("dc1", DC1_TOKEN).await;
    let address = relay.address();
    t.session("dc1", Some(address)).await;
    let id = t.send("acme").await;
    let (_send, _) = relay.take_request("dropped").await;
    let _ = control.send.write_all(&[0, 0, 0, 1, 42]).await;
    let (code, _) = relay.closed("garbage").await;
    assert_eq!(code, 3);
    let (m, first) = t.daemon.first_attempt(&id, WAIT).await;
    let error = first["error"].as_str().unwrap_or("");
    assert!(
        error.contains(&format!(
            "relay dc1 ({address}) disconnected: this daemon closed the session: unknown frame kind 42"
        )),
        "{m}"
    );
    assert_eq!(m["attempt_count"], 0, "{m}");
}

/// A3. Garbage on the control stream after a good hello — an unknown
/// kind, an oversized prefix, a second hello, a request head, a truncated
/// frame, the stream ended — drops that session: the daemon closes it
/// with the reason, logs it with the relay's name, address and session,
/// and takes it off the registry; the message waits for the next relay.
#[tokio::test]
async fn garbage_on_the_control_stream_drops_that_session_only() {
    let (t, _dc2, dc2) = Tunnel::start_with_dc2().await;
    let waiting = t.send("acme").await;

    let head = Frame::RequestHead {
        method: "GET".into(),
        url: "http://127.0.0.1:9/".into(),
        headers: vec![],
        protocol_profile: None,
        timeout_ms: 1000,
    };
    let beat = wire(&Frame::Heartbeat { seq: 1 });
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("unknown kind", vec![0, 0, 0, 1, 42], false, "unknown frame kind 42, expected 0 to 8"),
        ("max prefix", vec![0xff; 4], false, "frame length prefix announces 4294967295 bytes"),
        ("second hello", wire(&hello("dc1", DC1_TOKEN)), false,
         "unexpected hello frame on the control stream"),
        ("request head", wire(&head), false, "unexpected request head frame on the control stream"),
        ("truncated", beat[..beat.len() - 1].to_vec(), true, "the stream ended inside a frame"),
        ("ended", vec![], true, "control stream closed"),
    ];
    for (case, bytes, finish, expected) in &cases {
        let relay = t.hostile().await;
        let mut control = relay.hello("dc1", DC1_TOKEN).await;
        let address = relay.address();
        t.session("dc1", Some(address)).await;
        let _ = control.send.write_all(bytes).await;
        if *finish {
            let _ = control.send.finish();
        }
        let (code, reason) = relay.closed(case).await;
        assert_eq!(code, 3, "{case}: {reason}");
        assert!(reason.contains(expected), "{case}: closed with {reason:?}");
        let session = format!("session={}", control.session);
        logged(
            "daemon",
            || t.log(),
            &[
                "relay disconnected",
                expected,
                &address.to_string(),
                "mid_server=dc1",
                &session,
            ],
        )
        .await;
        t.no_session_from(address).await;
    }
    assert!(!t.log().contains(DC1_TOKEN), "the daemon logs no token");
    let _dc1 = t.unharmed(&dc2, &waiting).await;
}

/// A4. A relay cannot open streams of its own after a good hello, one-way
/// or two-way: the daemon gives it no credit for them. The session still
/// heartbeats and carries the daemon's own requests, and the message is
/// delivered by a real relay.
#[tokio::test]
async fn streams_a_relay_opens_do_not_disturb_the_session() {
    let (t, _dc2, dc2) = Tunnel::start_with_dc2().await;
    let relay = t.hostile().await;
    let beating = relay.hello("dc1", DC1_TOKEN).await.beat();
    let address = relay.address();
    let session = t.session("dc1", Some(address)).await;

    // The daemon gives a relay credit for one stream it opens, its control
    // stream: any other stream it tries to open never opens, so nothing
    // sent on one is buffered or acted on.
    let no_credit = Duration::from_secs(1);
    assert!(
        tokio::time::timeout(no_credit, relay.conn.open_uni())
            .await
            .is_err(),
        "a one-way stream opened"
    );
    assert!(
        tokio::time::timeout(no_credit, relay.conn.open_bi())
            .await
            .is_err(),
        "a second two-way stream opened"
    );

    // The daemon's own request still comes, on a stream it opened.
    let id = t.send("acme").await;
    let (mut send, (_, url)) = relay.take_request("draining").await;
    assert!(url.contains(&format!("/api/incident/{id}")), "{url}");
    // A relay that is stopping turns it away: the daemon sends it no more
    // and the message waits for another relay, charged nothing.
    let stopping = Frame::Error {
        kind: ErrorKind::Overloaded,
        message: "relay is stopping".into(),
    };
    send.write_all(&wire(&stopping)).await.expect("answer");
    let _ = send.finish();
    let m = eventually_msg(WAIT, "the refusal on record", async || {
        let m = t.daemon.message(&id).await;
        let a = m["attempts"].as_array().unwrap();
        a.iter()
            .any(|a| {
                a["error"]
                    .as_str()
                    .unwrap_or("")
                    .contains("relay is stopping")
            })
            .then_some(m)
    })
    .await;
    assert_eq!(m["attempt_count"], 0, "{m}");

    beating.assert_alive();
    let now = t.session("dc1", Some(address)).await;
    assert_eq!(now["id"], session["id"], "the same session");
    drop(beating);
    drop(relay);
    t.no_session_from(address).await;
    let _dc1 = t.unharmed(&dc2, &id).await;
}

/// A4, room: connections that never say hello take at most four places
/// from one address; the next from it is closed with the reason, the
/// daemon warns once, a relay from another address still connects, and
/// the silent ones are closed when their time for a hello is up.
#[tokio::test]
async fn connections_that_never_say_hello_cannot_lock_relays_out() {
    let t = Tunnel::start().await;
    // 127.0.0.2: an address of its own, on the loopback.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(HostileRelay::connect_from(&t.pki, t.port, [127, 0, 0, 2]).await);
    }
    let extra = HostileRelay::connect_from(&t.pki, t.port, [127, 0, 0, 2]).await;
    let (code, reason) = extra.closed("the fifth silent connection").await;
    assert_eq!(code, 1, "{reason}");
    assert!(
        reason.contains("too many connections are waiting to say hello"),
        "{reason}"
    );
    logged(
        "daemon",
        || t.log(),
        &[
            "relay connections refused",
            "4 from this address",
            "127.0.0.2",
        ],
    )
    .await;

    let _dc1 = t.relay("dc1", DC1_TOKEN);
    t.session("dc1", None).await;

    let (code, reason) = silent[0].closed("a silent connection").await;
    assert_eq!(code, 1, "{reason}");
    assert!(reason.contains("no hello"), "{reason}");
}

/// A4, memory: streams a peer opens and the daemon never reads cannot
/// make it hold their data — neither before a hello (any client that
/// completes TLS) nor after one. Measured by what the daemon lets the
/// peer write (QUIC flow control credit) and by its resident size.
#[tokio::test]
async fn streams_a_peer_opens_cannot_fill_the_daemons_memory() {
    let t = Tunnel::start().await;
    let rss_kib = || {
        let pid = t.daemon.pid().expect("outboxd runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
    };
    let before = rss_kib();
    let mut credited = Vec::new();
    for say_hello in [false, true] {
        let relay = t.hostile().await;
        // Kept open meanwhile: an accepted session, or a hello begun and
        // not finished (the daemon waits 10 s for the rest).
        let _control = if say_hello {
            let c = relay.hello("dc1", DC1_TOKEN).await;
            (c.send, c.frames)
        } else {
            relay.control(&[0, 0, 0, 60], false).await
        };
        let piece = vec![0u8; 64 << 10];
        let mut written = 0usize;
        'streams: for _ in 0..100 {
            let Ok(Ok(mut s)) =
                tokio::time::timeout(Duration::from_secs(1), relay.conn.open_uni()).await
            else {
                break;
            };
            for _ in 0..16 {
                match tokio::time::timeout(Duration::from_secs(1), s.write_all(&piece)).await {
                    Ok(Ok(())) => written += piece.len(),
                    _ => break 'streams,
                }
            }
        }
        credited.push(written);
        t.daemon
            .try_request(http::Method::GET, "/healthz", None, None, &[])
            .await
            .expect("up");
    }
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(
        credited.iter().all(|&n| n == 0) && grown_mib < 64,
        "the daemon let a peer write {credited:?} bytes (before and after a hello) on streams it never reads; it grew by {grown_mib} MiB"
    );
}

/// A3, the log: a relay's bad answer on a request stream is in the
/// daemon's log, with the problem and the relay's name and address, not
/// only in the attempt record.
#[tokio::test]
async fn bad_answers_on_request_streams_are_logged() {
    let t = Tunnel::start().await;
    let relay = t.hostile().await;
    let _beating = relay.hello("dc1", DC1_TOKEN).await.beat();
    let address = relay.address().to_string();
    t.session("dc1", Some(relay.address())).await;
    t.send("acme").await;
    let (mut send, _) = relay.take_request("a request in time").await;
    let _ = send.write_all(&[0, 0, 0, 1, 42]).await;
    let _ = send.finish();
    logged(
        "daemon",
        || t.log(),
        &["unknown frame kind 42, expected 0 to 8", "dc1", &address],
    )
    .await;
}

/// A3, the log: a relay that closes its session says why in its close
/// reason (`outbox-relay` does, with code 1: "no heartbeat answer",
/// "unexpected control frame ..."); the daemon's log keeps that reason.
#[tokio::test]
async fn the_reason_a_relay_closes_a_session_with_is_in_the_daemon_log() {
    let t = Tunnel::start().await;
    let relay = t.hostile().await;
    let _control = relay.hello("dc1", DC1_TOKEN).await;
    t.session("dc1", Some(relay.address())).await;
    relay.conn.close(1u32.into(), b"no heartbeat answer");
    let address = relay.address().to_string();
    let line = logged("daemon", || t.log(), &["relay disconnected", &address]).await;
    assert!(line.contains("no heartbeat answer"), "{line}");
}

// ---------------------------------------------------------------------
// B: a hostile daemon against a real outbox-relay
// ---------------------------------------------------------------------

/// B. Bad answers to the relay's hello — garbage, an unknown kind, a
/// heartbeat instead of an accept, an accept over its limits, a reject,
/// a reject over its limits, the stream ended — each is logged with the
/// daemon's address, and the relay stays up and tries again after its
/// backoff.
#[tokio::test]
async fn bad_answers_to_hello_are_logged_and_retried() {
    let daemon = HostileDaemon::start();
    let roomy = roomy();
    let long_version = Frame::Accept {
        daemon_version: "v".repeat(129),
        heartbeat_interval_ms: 1000,
        session_id: 1,
    };
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", vec![0xff; 4], "frame length prefix announces 4294967295 bytes, expected at most 1048576"),
        ("unknown-kind", vec![0, 0, 0, 1, 42], "unknown frame kind 42, expected 0 to 8"),
        ("heartbeat", wire(&Frame::Heartbeat { seq: 1 }), "expected accept or reject, got heartbeat"),
        ("long-version", wire_with(&long_version, &roomy), "accept frame: daemon version length is 129, expected at most 128"),
        ("reject", wire(&Frame::Reject { reason: "hostile daemon says no".into() }),
         "the daemon refused this relay: hostile daemon says no"),
        ("long-reason", wire_with(&Frame::Reject { reason: "r".repeat(4097) }, &roomy),
         "reject frame: reason length is 4097, expected at most 4096"),
        ("ended", vec![], "the daemon ended the control stream without an answer"),
    ];
    let answers: Arc<HashMap<String, Vec<u8>>> = Arc::new(
        cases
            .iter()
            .map(|(name, bytes, _)| (name.to_string(), bytes.clone()))
            .collect(),
    );
    let seen: Arc<Mutex<HashMap<String, Vec<Instant>>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let seen_by_server = seen.clone();
    daemon.serve(&mut tasks, move |mut peer: Peer| {
        let answers = answers.clone();
        let seen = seen_by_server.clone();
        async move {
            let first = {
                let mut seen = seen.lock().unwrap();
                let times = seen.entry(peer.name.clone()).or_default();
                times.push(peer.at);
                times.len() == 1
            };
            if first {
                let bytes = &answers[&peer.name];
                let _ = peer.send.write_all(bytes).await;
                let _ = peer.send.finish();
                let _ = tokio::time::timeout(WAIT, peer.conn.closed()).await;
            } else {
                peer.accept_and_echo(1000).await;
            }
        }
    });
    let mut relays: Vec<Relay> = cases
        .iter()
        .map(|(name, _, _)| Relay::start(&daemon.relay_config(name, &[], &[])))
        .collect();

    let address = format!("127.0.0.1:{}", daemon.port());
    for ((name, _, expected), relay) in cases.iter().zip(&mut relays) {
        let times = eventually_msg(WAIT, format!("{name} to connect again"), || {
            let seen = seen.lock().unwrap();
            seen.get(*name).filter(|t| t.len() >= 2).cloned()
        })
        .await;
        let gap = times[1] - times[0];
        assert!(
            gap >= FIRST_BACKOFF.mul_f64(0.9),
            "{name}: tried again after {gap:?}, without backing off"
        );
        let line = logged(name, || relay.log(), &[expected, "retry_in", &address]).await;
        let what = if *name == "reject" {
            "refused"
        } else {
            "cannot open a session"
        };
        assert!(line.contains(what), "{name}: {line}");
        relay.assert_running();
    }
}

/// B. Garbage on the control stream after an accept — an unknown kind,
/// a request head, the stream ended, no heartbeat echo — ends the
/// session: the relay closes it with the reason, logs it with the
/// daemon's address, and connects again promptly (a session that was up
/// resets the backoff).
#[tokio::test]
async fn garbage_on_the_control_stream_ends_the_session_and_the_relay_reconnects() {
    let daemon = HostileDaemon::start();
    let head = Frame::RequestHead {
        method: "GET".into(),
        url: "http://127.0.0.1:9/".into(),
        headers: vec![],
        protocol_profile: None,
        timeout_ms: 1000,
    };
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("ctl-garbage", vec![0, 0, 0, 1, 42], false, "unknown frame kind 42, expected 0 to 8"),
        ("ctl-request", wire(&head), false, "unexpected request head frame on the control stream"),
        ("ctl-ended", vec![], true, "the daemon ended the control stream"),
        ("ctl-silent", vec![], false, "no heartbeat answer"),
    ];
    let answers: Arc<HashMap<String, (Vec<u8>, bool)>> = Arc::new(
        cases
            .iter()
            .map(|(name, bytes, finish, _)| (name.to_string(), (bytes.clone(), *finish)))
            .collect(),
    );
    type Seen = HashMap<String, (Vec<Instant>, Option<(u64, String, Instant)>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let seen_by_server = seen.clone();
    daemon.serve(&mut tasks, move |mut peer: Peer| {
        let answers = answers.clone();
        let seen = seen_by_server.clone();
        async move {
            let first = {
                let mut seen = seen.lock().unwrap();
                let entry = seen.entry(peer.name.clone()).or_default();
                entry.0.push(peer.at);
                entry.0.len() == 1
            };
            if !first {
                return peer.accept_and_echo(500).await;
            }
            let (bytes, finish) = &answers[&peer.name];
            let _ = peer.send.write_all(&wire(&accept_frame(500))).await;
            let _ = peer.send.write_all(bytes).await;
            if *finish {
                let _ = peer.send.finish();
            }
            let (code, reason) = closed_by_peer(&peer.conn, &peer.name).await;
            seen.lock().unwrap().get_mut(&peer.name).expect("seen").1 =
                Some((code, reason, Instant::now()));
        }
    });
    let mut relays: Vec<Relay> = cases
        .iter()
        .map(|(name, ..)| Relay::start(&daemon.relay_config(name, &[], &[])))
        .collect();

    let address = format!("127.0.0.1:{}", daemon.port());
    for ((name, _, _, expected), relay) in cases.iter().zip(&mut relays) {
        let (times, (code, reason, closed)) =
            eventually_msg(WAIT, format!("{name} to connect again"), || {
                let seen = seen.lock().unwrap();
                let (times, close) = seen.get(*name)?;
                let close = close.clone()?;
                (times.len() >= 2).then(|| (times.clone(), close))
            })
            .await;
        assert_eq!(code, 1, "{name}: closed as a lost session");
        assert!(reason.contains(expected), "{name}: closed with {reason:?}");
        let gap = times[1].saturating_duration_since(closed);
        assert!(
            gap >= FIRST_BACKOFF.mul_f64(0.9) && gap < Duration::from_secs(3),
            "{name}: connected again {gap:?} after the session ended"
        );
        logged(
            name,
            || relay.log(),
            &["session lost; reconnecting", expected, &address],
        )
        .await;
        relay.assert_running();
    }
}

/// B. Request streams a real relay must refuse: garbage, frames out of
/// order, over-limit heads, a target outside `allow` (by address, by a
/// name or numeric form that resolves to loopback, by userinfo, by an
/// IPv4-mapped address), a body over `max_body` (one chunk, and a body
/// that never ends), a bad method, URL, header name or value, an unknown
/// protocol profile. Each is answered with one error frame naming the
/// problem and logged; nothing reaches a target outside `allow`; the
/// session goes on, a good request on it still works, and the relay's
/// session to a real daemon carries a message meanwhile.
#[tokio::test]
async fn request_streams_a_relay_must_refuse_get_an_error_frame() {
    let allowed = Sink::start().await;
    let denied = Sink::start().await;
    let t = Tunnel::start().await;
    // The hostile daemon presents a certificate of the real daemon's CA,
    // so one relay holds a session to each.
    let hostile = HostileDaemon::presenting(t.pki.server(), t.files.ca.clone());
    let dp = denied.addr().port();
    let ap = allowed.addr().port();
    // A CIDR entry that does not hold loopback makes a name go through
    // resolution and the check of every address.
    let allow = vec![
        allowed.addr().to_string(),
        t.sink.addr().to_string(),
        "10.0.0.0/8".to_string(),
    ];
    let mut relay = Relay::start(&relay_config(
        "dc1",
        DC1_TOKEN,
        &[hostile.port(), t.port],
        &t.files.ca,
        &allow,
    ));
    let peer = hostile.next().await;
    let conn = peer.conn.clone();
    let echo = tokio::spawn(peer.accept_and_echo(1000));
    let real_session = t.session("dc1", None).await;

    type Headers = Vec<(String, Vec<u8>)>;
    let head = |method: &str, url: &str, headers: Headers, profile: Option<&str>| {
        wire_with(
            &Frame::RequestHead {
                method: method.into(),
                url: url.into(),
                headers,
                protocol_profile: profile.map(str::to_string),
                timeout_ms: 5000,
            },
            &roomy(),
        )
    };
    let text = || vec![("content-type".to_string(), b"text/plain".to_vec())];
    let ok_url = format!("http://127.0.0.1:{ap}/ok");
    let ok = head("POST", &ok_url, text(), None);
    let to = |url: String| concat(&[&head("POST", &url, text(), None), &wire(&Frame::End)]);
    let with_header = |name: &str, value: &[u8]| {
        let h = vec![(name.to_string(), value.to_vec())];
        concat(&[&head("POST", &ok_url, h, None), &wire(&Frame::End)])
    };
    let end = wire(&Frame::End);
    let chunk = wire(&Frame::BodyChunk(b"x".to_vec()));
    let over = wire(&Frame::BodyChunk(vec![b'o'; 5000]));
    let max_body = "request body is over this relay's max_body of 4096 bytes";
    let not_allowed = |host: &str| format!("{host}:{dp} is not in this relay's allow list");
    let long_url = format!("http://127.0.0.1:{ap}/{}", "u".repeat(8200));
    let many = vec![("x-h".to_string(), b"v".to_vec()); 101];
    use ErrorKind::{BodyTooLarge, NotAllowed, Protocol};
    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<u8>, ErrorKind, String)> = vec![
        ("garbage", vec![0, 0, 0, 1, 42], Protocol, "unknown frame kind 42, expected 0 to 8".into()),
        ("max prefix", vec![0xff; 4], Protocol, "frame length prefix announces 4294967295 bytes".into()),
        ("body before head", concat(&[&chunk, &end]), Protocol, "expected a request head, got body chunk".into()),
        ("nothing", vec![], Protocol, "the stream ended before a request head".into()),
        ("second head", concat(&[&ok, &ok, &end]), Protocol,
         "expected a body chunk or end, got request head".into()),
        ("no end frame", concat(&[&ok, &chunk]), Protocol, "the stream ended before the body's end".into()),
        ("truncated", concat(&[&ok, &chunk[..chunk.len() - 1]]), Protocol,
         "the stream ended inside a frame".into()),
        ("101 headers", head("POST", &ok_url, many, None), Protocol,
         "request head frame: header count is 101, expected at most 100".into()),
        ("long url", head("POST", &long_url, text(), None), Protocol,
         format!("request head frame: url length is {}, expected at most 8192", long_url.len())),
        ("denied address", to(format!("http://127.0.0.1:{dp}/x")), NotAllowed, not_allowed("127.0.0.1")),
        ("userinfo", to(format!("http://127.0.0.1:{ap}@127.0.0.1:{dp}/x")), NotAllowed, not_allowed("127.0.0.1")),
        ("mapped v6", to(format!("http://[::ffff:127.0.0.1]:{dp}/x")), NotAllowed, not_allowed("[::ffff:127.0.0.1]")),
        ("name", to(format!("http://localhost:{dp}/x")), NotAllowed,
         "localhost resolves outside the allow-list".into()),
        ("numeric name", to(format!("http://2130706433:{dp}/x")), NotAllowed,
         "2130706433 resolves outside the allow-list".into()),
        ("allowed port, other name", to(format!("http://localhost:{ap}/x")), NotAllowed,
         "localhost resolves outside the allow-list".into()),
        ("body over max_body", concat(&[&ok, &over, &end]), BodyTooLarge, max_body.into()),
        ("bad method", concat(&[&head("BAD METHOD", &ok_url, text(), None), &end]), Protocol,
         "\"BAD METHOD\" is not a method".into()),
        ("bad url", to("not a url".into()), Protocol, "\"not a url\": ".into()),
        ("no host", to("/just/a/path".into()), Protocol, "/just/a/path has no host".into()),
        ("bad header name", with_header("bad header", b"v"), Protocol, "\"bad header\" is not a header name".into()),
        ("header injection", with_header("x-note", b"v\r\nHost: evil"), Protocol, "header x-note: bad value".into()),
        ("unknown profile", concat(&[&head("POST", &ok_url, text(), Some("nope")), &end]), Protocol,
         "this relay has no protocol profile \"nope\"".into()),
    ];
    for (case, bytes, kind, expected) in &cases {
        let answer = relay_answer(&conn, bytes, true).await;
        let (got, message) = error_of(&answer, case);
        assert_eq!(got, *kind, "{case}: {message}");
        assert!(message.contains(expected.as_str()), "{case}: {message:?}");
        logged(
            "relay",
            || relay.log(),
            &["request refused or failed", &format!("{kind:?}"), expected],
        )
        .await;
    }

    // A body that never ends: chunks until the relay stops the stream.
    let (mut send, recv) = conn.open_bi().await.expect("a request stream");
    let writer = async {
        let piece = wire(&Frame::BodyChunk(vec![b'e'; 1024]));
        send.write_all(&ok).await.expect("the head");
        let mut sent = 0usize;
        loop {
            match send.write_all(&piece).await {
                Ok(()) if sent < (64 << 20) => sent += piece.len(),
                other => return (sent, other),
            }
        }
    };
    let ((sent, stopped), answer) = tokio::join!(writer, read_answer(recv));
    let (kind, message) = error_of(&answer, "endless body");
    assert_eq!((kind, message.as_str()), (BodyTooLarge, max_body));
    assert!(
        matches!(stopped, Err(quinn::WriteError::Stopped(_))),
        "the relay stopped the stream after {sent} bytes: {stopped:?}"
    );

    // The session still carries a good request.
    let answer = relay_answer(&conn, &concat(&[&ok, &chunk, &end]), true).await;
    assert!(
        matches!(
            answer.as_slice(),
            [Frame::ResponseHead { status: 200, .. }, .., Frame::End]
        ),
        "{answer:?}"
    );
    assert_eq!(
        allowed.count(),
        1,
        "only the good request reached the target"
    );
    assert_eq!(allowed.last().unwrap().body.as_ref(), b"x");
    assert_eq!(denied.count(), 0, "nothing reached a target outside allow");
    assert!(conn.close_reason().is_none(), "the session is up");
    assert!(!echo.is_finished(), "heartbeats go on");
    relay.assert_running();

    // The relay's other session, to a real daemon, carried on.
    let id = t.send("acme").await;
    let m = t.daemon.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(m["attempt_count"], 1, "{m}");
    let now = t.session("dc1", None).await;
    assert_eq!(now["id"], real_session["id"], "the same session");
    assert!(t.sink.distinct_ids().contains(&id));
    echo.abort();
}

/// B, time: a request whose body never ends within its timeout — it
/// trickles, or stops without an end frame — is answered with a timeout
/// once the time given in its head is up, as ARCHITECTURE.md says ("A
/// request's timeout runs from its head"), instead of holding a stream
/// and a task of the relay for ever.
#[tokio::test]
async fn a_body_that_never_ends_is_answered_when_its_time_is_up() {
    let allowed = Sink::start().await;
    let daemon = HostileDaemon::start();
    let _relay = Relay::start(&daemon.relay_config("dc1", &[], &[allowed.addr().to_string()]));
    let peer = daemon.next().await;
    let conn = peer.conn.clone();
    let echo = tokio::spawn(peer.accept_and_echo(1000));
    let head = wire(&Frame::RequestHead {
        method: "POST".into(),
        url: format!("http://{}/slow", allowed.addr()),
        headers: vec![],
        protocol_profile: None,
        timeout_ms: 1000,
    });
    for trickle in [true, false] {
        let (mut send, recv) = conn.open_bi().await.expect("a request stream");
        send.write_all(&head).await.expect("the head");
        let started = Instant::now();
        let writer = async {
            while trickle && started.elapsed() < Duration::from_secs(6) {
                if send
                    .write_all(&wire(&Frame::BodyChunk(vec![b't'])))
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let reader =
            async { tokio::time::timeout(Duration::from_secs(5), read_answer(recv)).await };
        let (_, answer) = tokio::join!(writer, reader);
        let answer = answer.unwrap_or_else(|_| {
            panic!("no answer within 5s to a request whose timeout is 1s (trickle: {trickle})")
        });
        let (kind, message) = error_of(&answer, "a body past its time");
        assert_eq!(kind, ErrorKind::Timeout, "{message}");
        assert!(message.starts_with(outbox_proto::NOT_SENT), "{message}");
    }
    assert_eq!(allowed.count(), 0);
    echo.abort();
}

/// B, time: a target that sends its status and headers and then stalls its
/// body is given up on when the request's time is up: the relay answers
/// with a timeout instead of holding the request (and its slot) for as
/// long as the target holds the connection.
#[tokio::test]
async fn a_response_body_that_stalls_is_answered_when_its_time_is_up() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let target = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a target");
    let addr = target.local_addr().expect("its address");
    let stall = tokio::spawn(async move {
        let (mut tcp, _) = target.accept().await.expect("the relay connects");
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await;
        let _ = tcp
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nten bytes.")
            .await;
        // Hold the connection, and the rest of the body, for good.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(tcp);
    });
    let daemon = HostileDaemon::start();
    let _relay = Relay::start(&daemon.relay_config("dc1", &[], &[addr.to_string()]));
    let peer = daemon.next().await;
    let conn = peer.conn.clone();
    let echo = tokio::spawn(peer.accept_and_echo(1000));
    let request = concat(&[
        &wire(&Frame::RequestHead {
            method: "GET".into(),
            url: format!("http://{addr}/stalls"),
            headers: vec![],
            protocol_profile: None,
            timeout_ms: 1000,
        }),
        &wire(&Frame::End),
    ]);
    let answer = tokio::time::timeout(Duration::from_secs(5), relay_answer(&conn, &request, true))
        .await
        .expect("an answer within 5s to a request whose timeout is 1s");
    let (kind, message) = error_of(&answer, "a stalled response body");
    assert_eq!(kind, ErrorKind::Timeout, "{message}");
    assert_eq!(message, "the response body did not end within 1s");
    stall.abort();
    echo.abort();
}

/// B. A daemon that keeps refusing the relay, then breaks a session on
/// purpose: the relay logs each, backs off exponentially with jitter
/// between refusals, and after a session that was up connects again at
/// its first backoff.
#[tokio::test]
async fn the_relay_backs_off_between_refusals_and_reconnects_after_a_broken_session() {
    let daemon = HostileDaemon::start();
    let relay = Relay::start(&daemon.relay_config("dc1", &[], &[]));
    let reject = wire(&Frame::Reject {
        reason: "not today".into(),
    });
    let mut at = Vec::new();
    for _ in 0..3 {
        let mut peer = daemon.next().await;
        at.push(peer.at);
        peer.send.write_all(&reject).await.expect("reject");
        let _ = peer.send.finish();
        let _ = tokio::time::timeout(WAIT, peer.conn.closed()).await;
    }
    let mut peer = daemon.next().await;
    at.push(peer.at);
    peer.send
        .write_all(&wire(&accept_frame(1000)))
        .await
        .expect("accept");
    match next_frame(&mut peer.frames, "the first heartbeat").await {
        Ok(Some(Frame::Heartbeat { seq: 1 })) => {}
        other => panic!("expected heartbeat 1, got {other:?}"),
    }
    peer.conn
        .close(7u32.into(), b"hostile daemon breaks the session");
    let broken = Instant::now();
    let again = daemon.next().await;
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    let after_break = again.at - broken;
    eprintln!("gaps between refusals {gaps:?}; reconnected {after_break:?} after the break");
    let secs = |d: Duration| d.as_secs_f64();
    // The delays the relay chose, as it logged them: backoff 0.5 s, 1 s,
    // 2 s, each plus up to half again of jitter. The gaps seen here are
    // those plus a handshake, which a loaded machine may stretch: only
    // their lower bounds are tight.
    let address = format!("127.0.0.1:{}", daemon.port());
    let log = relay.log();
    let refusals = lines_with(
        &log,
        &[
            "refused",
            "the daemon refused this relay: not today",
            &address,
        ],
    );
    assert_eq!(refusals.len(), 3, "{log}");
    let delays: Vec<f64> = refusals.iter().map(|l| retry_in(l)).collect();
    for (i, (low, d)) in [0.5, 1.0, 2.0].iter().zip(&delays).enumerate() {
        assert!(
            (*low..=low * 1.5).contains(d),
            "refusal {i}: retry in {d} s, expected {low} s plus up to half again: {delays:?}"
        );
        assert!(
            secs(gaps[i]) >= *d - 0.05,
            "gap {i}: {gaps:?} against {delays:?}"
        );
        assert!(
            secs(gaps[i]) < d + 5.0,
            "gap {i}: {gaps:?} against {delays:?}"
        );
    }
    assert!(
        (0.45..5.0).contains(&secs(after_break)),
        "a session that was up resets the backoff: {after_break:?}"
    );
    logged(
        "relay",
        || relay.log(),
        &["session lost; reconnecting", &address],
    )
    .await;
    drop(again);
}

/// Fails if `log` has lines that text from `peer` started: the forging
/// tests put "\nFORGED-..." into what the peer says.
fn assert_no_forged_lines(log: &str, peer: &str) {
    let forged: Vec<&str> = log.lines().filter(|l| l.starts_with("FORGED-")).collect();
    assert!(
        forged.is_empty(),
        "lines {peer} wrote into the log: {forged:?}"
    );
}

/// The `retry_in` of a relay log line, in seconds (`retry_in=667.2ms`).
fn retry_in(line: &str) -> f64 {
    let value = line
        .split("retry_in=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no retry_in in {line}"));
    let (number, scale) = if let Some(n) = value.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = value.strip_suffix("µs") {
        (n, 1e-6)
    } else if let Some(n) = value.strip_suffix('s') {
        (n, 1.0)
    } else {
        panic!("retry_in {value:?} in {line}")
    };
    number.parse::<f64>().expect("a number") * scale
}

/// B, the log: text a daemon chooses — a reject's reason — cannot add
/// lines of its own to the relay's log.
#[tokio::test]
async fn text_from_a_daemon_cannot_forge_relay_log_lines() {
    let daemon = HostileDaemon::start();
    let relay = Relay::start(&daemon.relay_config("dc1", &[], &[]));
    let mut peer = daemon.next().await;
    let reason = "no\nFORGED-REJECT outbox_relay::session: session open";
    peer.send
        .write_all(&wire(&Frame::Reject {
            reason: reason.into(),
        }))
        .await
        .expect("reject");
    let _ = peer.send.finish();
    logged(
        "relay",
        || relay.log(),
        &["the daemon refused this relay: no"],
    )
    .await;
    assert_no_forged_lines(&relay.log(), "a daemon");
}

/// B, the log: a daemon that closes a session says why in its close
/// reason (`outboxd` does: "no heartbeat for 6s", "unexpected frame on
/// the control stream: ..."); the relay's log keeps that reason.
#[tokio::test]
async fn the_reason_a_daemon_closes_a_session_with_is_in_the_relay_log() {
    let daemon = HostileDaemon::start();
    let relay = Relay::start(&daemon.relay_config("dc1", &[], &[]));
    let mut peer = daemon.next().await;
    peer.send
        .write_all(&wire(&accept_frame(1000)))
        .await
        .expect("accept");
    match next_frame(&mut peer.frames, "the first heartbeat").await {
        Ok(Some(Frame::Heartbeat { seq: 1 })) => {}
        other => panic!("expected heartbeat 1, got {other:?}"),
    }
    peer.conn.close(3u32.into(), b"no heartbeat for 6s");
    let mut again = daemon.next().await;
    let line = logged("relay", || relay.log(), &["session lost; reconnecting"]).await;
    assert!(line.contains("no heartbeat for 6s"), "{line}");
    assert!(line.contains("WARN"), "{line}");

    // Code 0 is a daemon stopping: news, not a failure.
    again
        .send
        .write_all(&wire(&accept_frame(1000)))
        .await
        .expect("accept");
    let _ = next_frame(&mut again.frames, "the first heartbeat").await;
    again.conn.close(0u32.into(), b"daemon stopping");
    let _third = daemon.next().await;
    let line = logged(
        "relay",
        || relay.log(),
        &[
            "the daemon closed the session; reconnecting",
            "daemon stopping",
        ],
    )
    .await;
    assert!(line.contains("INFO"), "{line}");
}

/// B, the log: a refused request is logged with the daemon it came from,
/// (`daemon=ADDRESS`), as everything else of a session is: a relay
/// serving several daemons must say which one sent a bad request.
#[tokio::test]
async fn a_refused_request_is_logged_with_the_daemon_it_came_from() {
    let daemon = HostileDaemon::start();
    let relay = Relay::start(&daemon.relay_config("dc1", &[], &[]));
    let peer = daemon.next().await;
    let conn = peer.conn.clone();
    let echo = tokio::spawn(peer.accept_and_echo(1000));
    let answer = relay_answer(&conn, &[0, 0, 0, 1, 42], true).await;
    let (kind, _) = error_of(&answer, "garbage");
    assert_eq!(kind, ErrorKind::Protocol);
    let line = logged("relay", || relay.log(), &["request refused or failed"]).await;
    let address = format!("127.0.0.1:{}", daemon.port());
    assert!(line.contains(&address), "names no daemon: {line}");
    echo.abort();
}
