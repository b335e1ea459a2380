//! Encoding frames to bytes and decoding them back, with every limit checked
//! on both ways.

use crate::frame::Frame;
use crate::limits::{LimitExceeded, Limits, HEADER_LEN};
use crate::wire::{config, kind_name, FrameRef, KIND_NAMES};

/// Why bytes could not be decoded into a frame. After any of these the
/// stream is out of step and should be dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announces more than any frame may hold; nothing
    /// was allocated for it.
    #[error("frame length prefix announces {found} bytes, expected at most {limit}")]
    LengthTooLarge { found: usize, limit: usize },
    /// The length prefix announces an empty payload, which no frame has.
    #[error("frame length prefix announces 0 bytes, expected at least 1")]
    Empty,
    /// The input ends inside a frame.
    #[error("truncated frame: expected {expected} bytes, found {found}")]
    Truncated { expected: usize, found: usize },
    /// The first payload byte is no frame kind.
    #[error("unknown frame kind {tag}, expected 0 to {}", KIND_NAMES.len() - 1)]
    UnknownKind { tag: u8 },
    /// The payload is over the limit of its kind (heads are smaller than
    /// body chunks).
    #[error("{kind} frame of {found} bytes, expected at most {limit}")]
    FrameTooLarge {
        kind: &'static str,
        found: usize,
        limit: usize,
    },
    /// The payload is not a valid frame of its kind.
    #[error("malformed {kind} frame: {reason}")]
    Malformed { kind: &'static str, reason: String },
    /// The frame ends before its payload does.
    #[error("{kind} frame has {found} trailing bytes, expected none")]
    TrailingBytes { kind: &'static str, found: usize },
    /// A field is over its limit.
    #[error(transparent)]
    Limit(#[from] LimitExceeded),
}

/// Why a frame could not be encoded. Nothing is written when this happens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A field is over its limit.
    #[error(transparent)]
    Limit(#[from] LimitExceeded),
    /// The encoded frame is over the limit of its kind.
    #[error("{kind} frame of {found} bytes, expected at most {limit}")]
    FrameTooLarge {
        kind: &'static str,
        found: usize,
        limit: usize,
    },
    /// bincode refused the frame. Not expected: every field type encodes.
    #[error("cannot serialize {kind} frame: {reason}")]
    Serialize { kind: &'static str, reason: String },
}

/// Appends `frame` to `out`: the 4-byte big-endian payload length, then the
/// payload. On error `out` is left as it was.
pub fn encode(frame: &Frame, limits: &Limits, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let wire = FrameRef::from(frame);
    limits.check_ref(&wire)?;
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    let written = bincode::serde::encode_into_std_write(&wire, out, config());
    let found = out.len() - start - HEADER_LEN;
    let limit = limits.max_payload_of(wire.tag());
    let too_large = EncodeError::FrameTooLarge {
        kind: wire.name(),
        found,
        limit,
    };
    let result = match written {
        Err(e) => Err(EncodeError::Serialize {
            kind: wire.name(),
            reason: format!("{e:?}"),
        }),
        Ok(_) if found > limit => Err(too_large),
        // `limit` is at most FRAME_CEILING, well inside a u32.
        Ok(_) => match u32::try_from(found) {
            Ok(len) => {
                out[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
                Ok(())
            }
            Err(_) => Err(too_large),
        },
    };
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// The payload length a frame header announces, checked against the
/// largest payload `limits` allow before anything is allocated for it.
///
/// For an async reader: read [`HEADER_LEN`] bytes, call this, read exactly
/// the returned number of bytes and pass them to [`decode_payload`].
pub fn frame_len(header: [u8; HEADER_LEN], limits: &Limits) -> Result<usize, DecodeError> {
    // A u32 always fits a usize on the 32- and 64-bit targets we build for;
    // saturating keeps the check correct anywhere else.
    let len = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
    let limit = limits.max_payload();
    if len == 0 {
        Err(DecodeError::Empty)
    } else if len > limit {
        Err(DecodeError::LengthTooLarge { found: len, limit })
    } else {
        Ok(len)
    }
}

/// Decodes one payload (the bytes after the length prefix), which must be
/// exactly one frame within `limits`.
pub fn decode_payload(payload: &[u8], limits: &Limits) -> Result<Frame, DecodeError> {
    let Some(&tag) = payload.first() else {
        return Err(DecodeError::Empty);
    };
    let limit = limits.max_payload();
    if payload.len() > limit {
        return Err(DecodeError::LengthTooLarge {
            found: payload.len(),
            limit,
        });
    }
    let kind = check_kind(tag, payload.len(), limits)?;
    let (wire, used) =
        bincode::serde::borrow_decode_from_slice::<FrameRef<'_>, _>(payload, config()).map_err(
            |e| DecodeError::Malformed {
                kind,
                reason: describe(e),
            },
        )?;
    if used != payload.len() {
        return Err(DecodeError::TrailingBytes {
            kind,
            found: payload.len() - used,
        });
    }
    limits.check_ref(&wire)?;
    Ok(wire.to_frame())
}

/// Decodes the frame at the start of `bytes`, which must hold all of it;
/// returns the frame and how many bytes it took. Bytes after it are left
/// alone.
pub fn decode_one(bytes: &[u8], limits: &Limits) -> Result<(Frame, usize), DecodeError> {
    let Some(header) = bytes.first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::Truncated {
            expected: HEADER_LEN,
            found: bytes.len(),
        });
    };
    let end = HEADER_LEN + frame_len(*header, limits)?;
    let Some(payload) = bytes.get(HEADER_LEN..end) else {
        if let Some(&tag) = bytes.get(HEADER_LEN) {
            check_kind(tag, end - HEADER_LEN, limits)?;
        }
        return Err(DecodeError::Truncated {
            expected: end,
            found: bytes.len(),
        });
    };
    Ok((decode_payload(payload, limits)?, end))
}

/// How long the frame at the start of `bytes` is, header included, once
/// enough of it is there to know: `None` until the header is. Checks the
/// header, and the kind as soon as the first payload byte is there, so a
/// bad frame is refused before it is buffered.
pub(crate) fn frame_extent(bytes: &[u8], limits: &Limits) -> Result<Option<usize>, DecodeError> {
    let Some(header) = bytes.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = frame_len(*header, limits)?;
    if let Some(&tag) = bytes.get(HEADER_LEN) {
        check_kind(tag, len, limits)?;
    }
    Ok(Some(HEADER_LEN + len))
}

/// The kind named by a first payload byte, if a payload of `len` bytes is
/// within that kind's limit.
fn check_kind(tag: u8, len: usize, limits: &Limits) -> Result<&'static str, DecodeError> {
    let kind = kind_name(tag).ok_or(DecodeError::UnknownKind { tag })?;
    let limit = limits.max_payload_of(tag);
    if len > limit {
        return Err(DecodeError::FrameTooLarge {
            kind,
            found: len,
            limit,
        });
    }
    Ok(kind)
}

/// bincode's errors print as `Debug`; say what was expected and found.
fn describe(e: bincode::error::DecodeError) -> String {
    use bincode::error::DecodeError as E;
    match e {
        E::UnexpectedEnd { additional } => {
            format!("expected {additional} more bytes, found the end of the payload")
        }
        E::LimitExceeded => "expected lengths within the payload, found more claimed".to_owned(),
        E::Utf8 { inner } => format!("expected a UTF-8 string, found {inner}"),
        E::UnexpectedVariant {
            type_name, found, ..
        } => {
            format!("expected a {type_name} variant, found {found}")
        }
        E::InvalidIntegerType { expected, found } => format!(
            "expected an integer of type {}, found {}",
            format!("{expected:?}").to_lowercase(),
            format!("{found:?}").to_lowercase()
        ),
        E::OutsideUsizeRange(n) => format!("expected a length, found {n}"),
        // serde's own messages, e.g. "invalid value: integer `9`, expected
        // variant index 0 <= i < 8".
        E::OtherString(message) => message,
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::frame::ErrorKind;
    use crate::limits::FRAME_CEILING;

    /// One frame of each kind, in wire order.
    pub(crate) fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello {
                name: "dc1".into(),
                token: "t0ken".into(),
                protocol_version: 1,
                relay_version: "0.1.0".into(),
            },
            Frame::Accept {
                daemon_version: "0.1.0".into(),
                heartbeat_interval_ms: 5000,
                session_id: 7,
            },
            Frame::Reject {
                reason: "wrong token for MID server \"dc1\"".into(),
            },
            Frame::Heartbeat { seq: u64::MAX },
            Frame::RequestHead {
                method: "POST".into(),
                url: "https://jira.internal/rest/api/2/issue?x=ü".into(),
                headers: vec![
                    ("content-type".into(), b"application/json".to_vec()),
                    ("x-raw".into(), vec![0, 0xff, b'\n']),
                    ("x-raw".into(), vec![]),
                ],
                protocol_profile: Some("acme-mtls".into()),
                timeout_ms: 30_000,
            },
            Frame::ResponseHead {
                status: 201,
                headers: vec![("location".into(), b"/issue/7".to_vec())],
            },
            Frame::BodyChunk((0..=255).collect()),
            Frame::End,
            Frame::Error {
                kind: ErrorKind::NotAllowed,
                message: "jira.internal:443 is not in the allow list".into(),
            },
        ]
    }

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        encode(frame, &Limits::default(), &mut out).unwrap();
        out
    }

    #[test]
    fn each_frame_round_trips() {
        let limits = Limits::default();
        let mut variants = vec![
            Frame::RequestHead {
                method: "GET".into(),
                url: "http://10.20.0.5/".into(),
                headers: vec![],
                protocol_profile: None,
                timeout_ms: 0,
            },
            Frame::BodyChunk(vec![]),
            Frame::BodyChunk(vec![0xab; limits.max_chunk()]),
            Frame::Hello {
                name: String::new(),
                token: String::new(),
                protocol_version: u32::MAX,
                relay_version: String::new(),
            },
        ];
        variants.extend(ErrorKind::ALL.map(|kind| Frame::Error {
            kind,
            message: kind.to_string(),
        }));
        for frame in samples().into_iter().chain(variants) {
            let bytes = encoded(&frame);
            let header = *bytes.first_chunk::<HEADER_LEN>().unwrap();
            assert_eq!(frame_len(header, &limits), Ok(bytes.len() - HEADER_LEN));
            assert_eq!(
                decode_payload(&bytes[HEADER_LEN..], &limits),
                Ok(frame.clone())
            );
            let (back, used) = decode_one(&bytes, &limits).unwrap();
            assert_eq!(back, frame);
            assert_eq!(used, bytes.len());
        }
    }

    /// The exact bytes of a few frames, so a change to the wire format is
    /// a deliberate one.
    #[test]
    fn wire_bytes_are_stable() {
        assert_eq!(encoded(&Frame::End), [0, 0, 0, 1, 7]);
        assert_eq!(
            encoded(&Frame::Heartbeat { seq: 300 }),
            [0, 0, 0, 4, 3, 0xfb, 0x2c, 0x01]
        );
        assert_eq!(
            encoded(&Frame::BodyChunk(vec![9, 8])),
            [0, 0, 0, 4, 6, 2, 9, 8]
        );
        assert_eq!(
            encoded(&Frame::Reject {
                reason: "no".into()
            }),
            [0, 0, 0, 4, 2, 2, b'n', b'o']
        );
        assert_eq!(
            encoded(&Frame::Error {
                kind: ErrorKind::Tls,
                message: String::new()
            }),
            [0, 0, 0, 3, 8, 3, 0]
        );
    }

    #[test]
    fn encode_appends_and_leaves_out_alone_on_error() {
        let limits = Limits::default();
        let mut out = vec![1, 2, 3];
        encode(&Frame::End, &limits, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 0, 0, 0, 1, 7]);
        let over = Frame::Reject {
            reason: "x".repeat(limits.max_text + 1),
        };
        assert!(matches!(
            encode(&over, &limits, &mut out),
            Err(EncodeError::Limit(_))
        ));
        assert_eq!(out, [1, 2, 3, 0, 0, 0, 1, 7]);
    }

    /// Every field within its limit, yet the whole head over the head
    /// frame limit: refused when encoding, and when decoding with the
    /// tighter limit.
    #[test]
    fn heads_over_the_head_frame_limit_are_refused_both_ways() {
        let limits = Limits::default();
        let frame = Frame::ResponseHead {
            status: 200,
            headers: vec![("x-big".into(), vec![b'v'; limits.max_header_value]); 9],
        };
        assert_eq!(limits.check(&frame), Ok(()));
        let mut out = Vec::new();
        let e = encode(&frame, &limits, &mut out).unwrap_err();
        assert_eq!(
            e.to_string(),
            "response head frame of 73812 bytes, expected at most 65536"
        );
        assert!(out.is_empty());

        let roomy = Limits {
            max_head_frame: 1 << 20,
            ..limits
        };
        encode(&frame, &roomy, &mut out).unwrap();
        let e = decode_one(&out, &limits).unwrap_err();
        assert_eq!(
            e,
            DecodeError::FrameTooLarge {
                kind: "response head",
                found: 73812,
                limit: 65536
            }
        );
        // Refused from the first payload byte, before the rest arrives.
        assert_eq!(decode_one(&out[..HEADER_LEN + 1], &limits), Err(e));
    }

    #[test]
    fn fields_over_their_limit_are_refused_when_decoding() {
        let limits = Limits::default();
        let frame = Frame::Hello {
            name: "n".repeat(200),
            token: "t".into(),
            protocol_version: 1,
            relay_version: "v".into(),
        };
        let roomy = Limits {
            max_name: 1000,
            ..limits
        };
        let mut out = Vec::new();
        encode(&frame, &roomy, &mut out).unwrap();
        assert_eq!(
            decode_one(&out, &limits).unwrap_err().to_string(),
            "hello frame: name length is 200, expected at most 128"
        );
    }

    /// Hostile input, one case per way to be wrong: each gives its error
    /// and message.
    #[test]
    fn bad_input_gives_a_clear_error() {
        let limits = Limits::default();
        let hello = encoded(&samples()[0]);
        let mut bad_utf8 = hello.clone();
        let at = bad_utf8.iter().position(|&b| b == b'd').unwrap();
        bad_utf8[at] = 0xff;
        #[rustfmt::skip]
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "truncated frame: expected 4 bytes, found 0"),
            (vec![0, 0], "truncated frame: expected 4 bytes, found 2"),
            (vec![0, 0, 0, 0], "frame length prefix announces 0 bytes, expected at least 1"),
            (vec![0xff, 0xff, 0xff, 0xff], "frame length prefix announces 4294967295 bytes, expected at most 1048576"),
            (vec![0, 0x10, 0, 1, 6], "frame length prefix announces 1048577 bytes, expected at most 1048576"),
            (vec![0, 0, 0, 1, 9], "unknown frame kind 9, expected 0 to 8"),
            (vec![0, 0, 0, 1, 0xff], "unknown frame kind 255, expected 0 to 8"),
            (vec![0, 1, 0, 1, 0], "hello frame of 65537 bytes, expected at most 65536"),
            (hello[..hello.len() - 1].to_vec(), "truncated frame: expected 22 bytes, found 21"),
            (vec![0, 0, 0, 2, 3, 0xfb], "malformed heartbeat frame: expected 2 more bytes, found the end of the payload"),
            (vec![0, 0, 0, 2, 7, 0], "end frame has 1 trailing bytes, expected none"),
            (bad_utf8, "malformed hello frame: expected a UTF-8 string, found invalid utf-8 sequence of 1 bytes from index 0"),
            (vec![0, 0, 0, 3, 8, 8, 0], "malformed error frame: invalid value: integer `8`, expected variant index 0 <= i < 8"),
            (vec![0, 0, 0, 2, 6, 5], "malformed body chunk frame: expected 5 more bytes, found the end of the payload"),
            // A request head whose profile option tag is 2.
            (vec![0, 0, 0, 6, 4, 0, 0, 0, 2, 0], "malformed request head frame: expected a Option<T> variant, found 2"),
        ];
        for (bytes, message) in cases {
            let e = decode_one(&bytes, &limits).unwrap_err();
            assert_eq!(e.to_string(), message, "{bytes:?}");
        }
    }

    #[test]
    fn payload_checks_match_the_header_checks() {
        let limits = Limits::default();
        assert_eq!(decode_payload(&[], &limits), Err(DecodeError::Empty));
        assert_eq!(
            decode_payload(&vec![6; (1 << 20) + 1], &limits),
            Err(DecodeError::LengthTooLarge {
                found: (1 << 20) + 1,
                limit: 1 << 20
            })
        );
        assert_eq!(decode_payload(&[7], &limits), Ok(Frame::End));
    }

    /// A limit raised past the ceiling is the ceiling on both ways.
    #[test]
    fn the_ceiling_holds_whatever_the_limits() {
        let huge = Limits {
            max_frame: usize::MAX,
            ..Limits::default()
        };
        let header = u32::try_from(FRAME_CEILING + 1).unwrap().to_be_bytes();
        assert_eq!(
            frame_len(header, &huge),
            Err(DecodeError::LengthTooLarge {
                found: FRAME_CEILING + 1,
                limit: FRAME_CEILING
            })
        );
        let mut out = Vec::new();
        let chunk = Frame::BodyChunk(vec![0; huge.max_chunk()]);
        encode(&chunk, &huge, &mut out).unwrap();
        assert_eq!(out.len(), HEADER_LEN + FRAME_CEILING);
        assert_eq!(decode_one(&out, &huge).map(|(f, _)| f), Ok(chunk));
    }
}
