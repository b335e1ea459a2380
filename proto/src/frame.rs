//! The frames daemon and relay exchange, and the relay's error kinds.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::wire::FrameRef;

/// One message on a tunnel stream.
///
/// The wire order of the variants is part of the protocol (the first payload
/// byte is the variant's index): add new kinds at the end, and only with a
/// new [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
///
/// `Debug` masks the token and prints header values and body chunks as their
/// lengths, so a frame can be logged without leaking credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    /// Relay → daemon, first frame on the control stream.
    Hello {
        /// The MID server name connections refer to.
        name: String,
        /// The MID server's shared secret.
        token: String,
        /// The [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) the relay speaks.
        protocol_version: u32,
        /// The relay's own version, for `outbox mid-servers`.
        relay_version: String,
    },
    /// Daemon → relay: the hello is accepted.
    Accept {
        /// The daemon's own version.
        daemon_version: String,
        /// How often the relay sends a heartbeat.
        heartbeat_interval_ms: u64,
        /// The daemon's id for this session, for logs on both sides.
        session_id: u64,
    },
    /// Daemon → relay: the hello is refused; the daemon closes the
    /// connection after sending it.
    Reject {
        /// One line for the relay's log, e.g. a version mismatch.
        reason: String,
    },
    /// Either way on the control stream: the relay sends one each interval
    /// and the daemon echoes it.
    Heartbeat {
        /// Counts up from 1 on each session.
        seq: u64,
    },
    /// Daemon → relay, first frame on a request stream.
    RequestHead {
        /// The HTTP method, e.g. `POST`.
        method: String,
        /// The absolute target URL.
        url: String,
        /// Header names and raw values, in order; names may repeat.
        headers: Vec<(String, Vec<u8>)>,
        /// The relay's protocol profile (client certificate) to use, by name.
        protocol_profile: Option<String>,
        /// The whole request must finish within this, from the head's
        /// arrival at the relay to the response body's last byte: the
        /// request's body, the wait for a free slot, connecting, the
        /// response head and body.
        timeout_ms: u64,
    },
    /// Relay → daemon, first frame of a successful answer.
    ResponseHead {
        /// The HTTP status code.
        status: u16,
        /// Header names and raw values, in order; names may repeat.
        headers: Vec<(String, Vec<u8>)>,
    },
    /// Either way: the next piece of the body.
    BodyChunk(Vec<u8>),
    /// Either way: the head and body are complete.
    End,
    /// Relay → daemon, instead of (or after) a response head: the request
    /// failed on the relay.
    Error {
        /// What failed; the daemon decides from it whether to retry.
        kind: ErrorKind,
        /// One line for the attempt record.
        message: String,
    },
}

/// How the message of a [`ErrorKind::Timeout`] begins when the relay never
/// sent the request.
pub const NOT_SENT: &str = "not sent:";

/// Why a request failed on the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The target is outside the relay's allow list.
    NotAllowed,
    /// The target could not be reached: DNS, refused, unreachable, reset.
    Connect,
    /// No complete response within the request's timeout. A message that
    /// begins with [`NOT_SENT`] says the request never left the relay: its
    /// time was up while its body was still arriving or while it waited
    /// for a free slot.
    Timeout,
    /// The TLS handshake with the target failed (its certificate, or ours).
    Tls,
    /// The request or response body is over the relay's `max_body`.
    BodyTooLarge,
    /// The relay is stopping and takes no new request: the daemon sends it
    /// through another relay and sends this session no more. (A relay at
    /// its concurrency limit makes requests wait instead.)
    Overloaded,
    /// The daemon sent something the relay cannot use: a bad head, an
    /// unknown protocol profile, frames out of order.
    Protocol,
    /// Anything else.
    Other,
}

impl Frame {
    /// The frame's kind in words, for error messages and logs.
    pub fn name(&self) -> &'static str {
        FrameRef::from(self).name()
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frame::Hello {
                name,
                token: _,
                protocol_version,
                relay_version,
            } => f
                .debug_struct("Hello")
                .field("name", name)
                .field("token", &Masked)
                .field("protocol_version", protocol_version)
                .field("relay_version", relay_version)
                .finish(),
            Frame::Accept {
                daemon_version,
                heartbeat_interval_ms,
                session_id,
            } => f
                .debug_struct("Accept")
                .field("daemon_version", daemon_version)
                .field("heartbeat_interval_ms", heartbeat_interval_ms)
                .field("session_id", session_id)
                .finish(),
            Frame::Reject { reason } => f.debug_struct("Reject").field("reason", reason).finish(),
            Frame::Heartbeat { seq } => f.debug_struct("Heartbeat").field("seq", seq).finish(),
            Frame::RequestHead {
                method,
                url,
                headers,
                protocol_profile,
                timeout_ms,
            } => f
                .debug_struct("RequestHead")
                .field("method", method)
                .field("url", url)
                .field("headers", &HeadersDebug(headers))
                .field("protocol_profile", protocol_profile)
                .field("timeout_ms", timeout_ms)
                .finish(),
            Frame::ResponseHead { status, headers } => f
                .debug_struct("ResponseHead")
                .field("status", status)
                .field("headers", &HeadersDebug(headers))
                .finish(),
            Frame::BodyChunk(data) => f.debug_tuple("BodyChunk").field(&Len(data.len())).finish(),
            Frame::End => f.write_str("End"),
            Frame::Error { kind, message } => f
                .debug_struct("Error")
                .field("kind", kind)
                .field("message", message)
                .finish(),
        }
    }
}

impl ErrorKind {
    /// Every kind, in wire order.
    pub const ALL: [ErrorKind; 8] = [
        ErrorKind::NotAllowed,
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Tls,
        ErrorKind::BodyTooLarge,
        ErrorKind::Overloaded,
        ErrorKind::Protocol,
        ErrorKind::Other,
    ];
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::NotAllowed => "not allowed",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Tls => "tls",
            ErrorKind::BodyTooLarge => "body too large",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Other => "other",
        })
    }
}

/// Prints `***` in place of a secret.
struct Masked;

impl fmt::Debug for Masked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Prints a byte string as its length: values may be credentials
/// (`authorization`, API keys) and bodies may be large.
struct Len(usize);

impl fmt::Debug for Len {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0)
    }
}

struct HeadersDebug<'a>(&'a [(String, Vec<u8>)]);

impl fmt::Debug for HeadersDebug<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, value)| (name, Len(value.len()))))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_the_token_and_header_values() {
        let hello = Frame::Hello {
            name: "dc1".into(),
            token: "s3cret-token".into(),
            protocol_version: 1,
            relay_version: "0.1.0".into(),
        };
        let text = format!("{hello:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("\"dc1\"") && text.contains("***"), "{text}");

        let head = Frame::RequestHead {
            method: "POST".into(),
            url: "https://jira.internal/rest".into(),
            headers: vec![("authorization".into(), b"Bearer abc123".to_vec())],
            protocol_profile: None,
            timeout_ms: 1000,
        };
        let text = format!("{head:?}");
        assert!(!text.contains("abc123"), "{text}");
        assert!(
            text.contains("authorization") && text.contains("<13 bytes>"),
            "{text}"
        );

        let chunk = Frame::BodyChunk(vec![7; 70_000]);
        assert_eq!(format!("{chunk:?}"), "BodyChunk(<70000 bytes>)");
    }

    #[test]
    fn error_kinds_read_as_words() {
        let words: Vec<String> = ErrorKind::ALL.iter().map(ToString::to_string).collect();
        assert_eq!(
            words,
            [
                "not allowed",
                "connect",
                "timeout",
                "tls",
                "body too large",
                "overloaded",
                "protocol",
                "other"
            ]
        );
    }
}
