//! The daemon↔relay wire protocol of Outbox: frames, codec, limits and the
//! version handshake. No I/O: both sides, the tests and the fuzzer use it
//! over byte buffers.
//!
//! # Transport
//!
//! The relay (the MID server) is the QUIC **client** and the daemon the
//! server, with ALPN [`ALPN`] over TLS 1.3; the relay verifies the daemon's
//! certificate. Nothing ever connects in to a relay.
//!
//! # Handshake and control stream
//!
//! After the QUIC handshake the relay opens one bidirectional *control
//! stream* and sends [`Frame::Hello`]: its MID server name, its token, the
//! [`PROTOCOL_VERSION`] it speaks and its own version string. The daemon
//! answers on the same stream with either
//!
//! - [`Frame::Accept`]: the daemon's version, the heartbeat interval and a
//!   session id, or
//! - [`Frame::Reject`] with a one-line reason, after which it closes the
//!   connection. [`check_version`] is the version rule: a relay whose
//!   protocol version the daemon does not support is rejected with a reason
//!   that names both versions. [`check_name`] is the rule for MID server
//!   names.
//!
//! Once accepted, the relay sends [`Frame::Heartbeat`] on the control stream
//! every `heartbeat_interval_ms` with an increasing `seq`, and the daemon
//! echoes each one with the same `seq`. Either side treats three silent
//! intervals as a dead peer and drops the session; the daemon then fails that
//! session's requests as retryable.
//!
//! # Requests
//!
//! For each HTTP request the daemon opens a new bidirectional stream and
//! sends [`Frame::RequestHead`], zero or more [`Frame::BodyChunk`]s, then
//! [`Frame::End`]. The relay answers on the same stream with
//! [`Frame::ResponseHead`], zero or more body chunks and `End` — or, at any
//! point instead, [`Frame::Error`] whose [`ErrorKind`] the daemon turns into
//! the attempt's outcome (retry or not). Once the target has answered, the
//! relay sends its status: headers over the limits and a body past the
//! relay's `max_body` are left out, and a body that breaks off ends the
//! answer; only a body still arriving when the request's time is up makes
//! the answer a timeout error instead. Neither side resets a stream; the
//! daemon takes a reset as a broken answer. QUIC flow control is per
//! stream, so one large body does not hold up the others.
//!
//! ```text
//! relay                                   daemon
//!   | -- control stream: Hello ------------> |
//!   | <------------- Accept | Reject{reason} |
//!   | -- Heartbeat{seq} -------------------> |
//!   | <------------------- Heartbeat{seq}    |   (every interval)
//!   |                                        |
//!   | <-- request stream: RequestHead ------ |   (one stream per request)
//!   | <-- BodyChunk* ----------------------- |
//!   | <-- End ------------------------------ |
//!   | -- ResponseHead ---------------------> |
//!   | -- BodyChunk* -----------------------> |
//!   | -- End | Error{kind, message} -------> |
//! ```
//!
//! # Encoding
//!
//! On the wire a frame is a 4-byte big-endian payload length followed by the
//! payload: the [`Frame`] in bincode 2 (serde, `bincode::config::standard()`
//! with an explicit `with_limit`). The first payload byte is the frame kind,
//! which fixes its size limit: [`Limits::max_frame`] for a body chunk,
//! [`Limits::max_head_frame`] for every other frame.
//!
//! Decoding is defensive, because the peer may be anything that completed a
//! TLS handshake:
//!
//! - the length prefix is checked against the limits before anything is
//!   allocated for the payload ([`frame_len`]), and the kind byte against the
//!   limit of that kind as soon as it arrives ([`FrameDecoder`]);
//! - the payload is decoded *borrowing* from the input, so a length claimed
//!   inside it can never make the decoder allocate more than the payload
//!   holds, and every string, header list and body chunk is checked against
//!   its own limit before it is copied out;
//! - truncated, oversized or garbage input gives a [`DecodeError`], never a
//!   panic.
//!
//! Encoding applies the same limits: an over-limit frame is an
//! [`EncodeError`], so a peer never receives a frame it would refuse.
//!
//! # Reading frames
//!
//! An async reader can read the 4-byte header, ask [`frame_len`] how many
//! payload bytes follow (already checked against the limits), read exactly
//! those and call [`decode_payload`]. A reader that gets bytes in arbitrary
//! pieces feeds them to a [`FrameDecoder`]. [`decode_one`] decodes the first
//! frame of a buffer that should hold a whole one.
//!
//! # QUIC runtime
//!
//! With the `quic` feature, [`quic::Runtime`] is the runtime both sides give
//! quinn. It does no I/O of its own: it only changes when quinn's drivers
//! run, so that one wake-up sends what many requests wrote.

mod codec;
mod decoder;
mod frame;
mod handshake;
mod limits;
#[cfg(feature = "quic")]
pub mod quic;
mod reader;
mod text;
mod wire;

pub use codec::{decode_one, decode_payload, encode, frame_len, DecodeError, EncodeError};
pub use decoder::FrameDecoder;
pub use frame::{ErrorKind, Frame, NOT_SENT};
pub use handshake::{
    check_name, check_version, NameError, ALPN, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use limits::{LimitExceeded, Limits, FRAME_CEILING, HEADER_LEN};
pub use reader::{ChunkSource, FrameReader, ReadError};
pub use text::{bare_log_word, char_boundary, line_column, one_line, printable, NOT_A_LOG_LEVEL};
