//! Limits on everything a peer can make us hold, checked on decode and on
//! encode alike.

use crate::frame::Frame;
use crate::wire::{FrameRef, Headers, TAG_BODY_CHUNK};

/// Length of the frame header: a big-endian `u32` payload length.
pub const HEADER_LEN: usize = 4;

/// The hard ceiling on a payload, whatever [`Limits`] says: bincode's decode
/// limit is a compile-time constant, so limits above it are treated as it.
/// 16 MiB is sixteen times the default body frame, room for a peer tuned up
/// without letting a setting make a frame unbounded.
pub const FRAME_CEILING: usize = 16 << 20;

/// Explicit limits on frames and their fields. Both sides use
/// [`Limits::default`] unless they agree on something else; a frame over a
/// limit is refused when encoding (so it is never sent) and when decoding.
///
/// String and byte lengths are in bytes. `max_frame` and `max_head_frame`
/// are payload lengths, without the 4-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload of a body chunk frame. Default 1 MiB: the unit in
    /// which a body crosses the tunnel, large enough that framing costs
    /// nothing, small enough that a stream buffers at most this much. Capped
    /// at [`FRAME_CEILING`].
    pub max_frame: usize,
    /// Largest payload of every other frame (hello, heads, errors...).
    /// Default 64 KiB: a maximal URL plus a generous header list, while a
    /// bogus head cannot make the reader buffer a megabyte. Capped at
    /// [`FRAME_CEILING`].
    pub max_head_frame: usize,
    /// Most headers in a request or response head. Default 100, hyper's and
    /// httparse's default for HTTP/1.
    pub max_headers: usize,
    /// Longest header name. Default 256; real names are far shorter.
    pub max_header_name: usize,
    /// Longest header value. Default 8 KiB, the common server limit on a
    /// header field (nginx `large_client_header_buffers`, Apache
    /// `LimitRequestFieldSize`).
    pub max_header_value: usize,
    /// Longest request URL. Default 8 KiB, the common server limit on a
    /// request line (nginx, Apache `LimitRequestLine`).
    pub max_url: usize,
    /// Longest MID server name in a hello. Default 128, the same as the
    /// daemon's and relay's configuration rule for names.
    pub max_name: usize,
    /// Longest token in a hello. Default 1 KiB; `outbox pki init` writes
    /// tokens far shorter, this leaves room for any secret a user chooses.
    pub max_token: usize,
    /// Longest short word: method, daemon and relay versions, protocol
    /// profile name. Default 128 (profile names follow the name rule).
    pub max_short: usize,
    /// Longest human-readable text: reject reason, error message. Default
    /// 4 KiB: one line for a log or an attempt record, with room for a URL.
    pub max_text: usize,
}

/// A frame field is over its limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{frame} frame: {field} is {found}, expected at most {limit}")]
pub struct LimitExceeded {
    /// The frame's kind in words, e.g. `request head`.
    pub frame: &'static str,
    /// The field and what is measured, e.g. `url length`, `header count`.
    pub field: &'static str,
    /// The measured value.
    pub found: usize,
    /// The limit it broke.
    pub limit: usize,
}

/// Framing around a body chunk's bytes: the kind byte and the bytes' length,
/// a varint of at most 5 bytes below 2^32 (a marker byte and a `u32`).
const CHUNK_OVERHEAD: usize = 1 + 5;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 1 << 20,
            max_head_frame: 64 << 10,
            max_headers: 100,
            max_header_name: 256,
            max_header_value: 8 << 10,
            max_url: 8 << 10,
            max_name: 128,
            max_token: 1 << 10,
            max_short: 128,
            max_text: 4 << 10,
        }
    }
}

impl Limits {
    /// The most body bytes one [`Frame::BodyChunk`] may carry: the body
    /// frame limit less the chunk's framing. Senders split bodies into
    /// chunks of at most this.
    pub fn max_chunk(&self) -> usize {
        self.max_frame
            .min(FRAME_CEILING)
            .saturating_sub(CHUNK_OVERHEAD)
    }

    /// Checks every field of `frame` against these limits (the frame's
    /// encoded size is checked by [`encode`](crate::encode)).
    pub fn check(&self, frame: &Frame) -> Result<(), LimitExceeded> {
        self.check_ref(&FrameRef::from(frame))
    }

    /// The largest payload any frame may have: what a length prefix is
    /// checked against before the frame's kind is known.
    pub(crate) fn max_payload(&self) -> usize {
        self.max_frame.max(self.max_head_frame).min(FRAME_CEILING)
    }

    /// The largest payload of the frame kind `tag`.
    pub(crate) fn max_payload_of(&self, tag: u8) -> usize {
        if tag == TAG_BODY_CHUNK {
            self.max_frame.min(FRAME_CEILING)
        } else {
            self.max_head_frame.min(FRAME_CEILING)
        }
    }

    /// The headers of a response head that these limits let cross, in
    /// order — each name and value within its limit, at most
    /// `max_headers`, the whole head within `max_head_frame` — and the
    /// names of the others. A relay cuts a target's answer to this, so its
    /// status always crosses.
    pub fn fit_response_headers(
        &self,
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
    ) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
        // The payload as bincode writes it: the kind, the status and the
        // header count, then each header's two lengths and bytes.
        let mut size = 1 + varint_len(usize::from(status)) + varint_len(headers.len());
        let room = self.max_head_frame.min(FRAME_CEILING);
        let mut carried = Vec::with_capacity(headers.len().min(self.max_headers));
        let mut left_out = Vec::new();
        for (name, value) in headers {
            let header =
                varint_len(name.len()) + name.len() + varint_len(value.len()) + value.len();
            if carried.len() < self.max_headers
                && name.len() <= self.max_header_name
                && value.len() <= self.max_header_value
                && size + header <= room
            {
                size += header;
                carried.push((name, value));
            } else {
                left_out.push(name);
            }
        }
        (carried, left_out)
    }

    pub(crate) fn check_ref(&self, frame: &FrameRef<'_>) -> Result<(), LimitExceeded> {
        let at_most = |field: &'static str, found: usize, limit: usize| {
            if found > limit {
                Err(LimitExceeded {
                    frame: frame.name(),
                    field,
                    found,
                    limit,
                })
            } else {
                Ok(())
            }
        };
        let headers = |headers: &Headers<'_>| {
            at_most("header count", headers.len(), self.max_headers)?;
            headers.iter().try_for_each(|(name, value)| {
                at_most("header name length", name.len(), self.max_header_name)?;
                at_most("header value length", value.len(), self.max_header_value)
            })
        };
        match frame {
            FrameRef::Hello {
                name,
                token,
                protocol_version: _,
                relay_version,
            } => {
                at_most("name length", name.len(), self.max_name)?;
                at_most("token length", token.len(), self.max_token)?;
                at_most("relay version length", relay_version.len(), self.max_short)
            }
            FrameRef::Accept { daemon_version, .. } => at_most(
                "daemon version length",
                daemon_version.len(),
                self.max_short,
            ),
            FrameRef::Reject { reason } => at_most("reason length", reason.len(), self.max_text),
            FrameRef::Heartbeat { .. } | FrameRef::End => Ok(()),
            FrameRef::RequestHead {
                method,
                url,
                headers: list,
                protocol_profile,
                timeout_ms: _,
            } => {
                at_most("method length", method.len(), self.max_short)?;
                at_most("url length", url.len(), self.max_url)?;
                headers(list)?;
                at_most(
                    "protocol profile length",
                    protocol_profile.map_or(0, str::len),
                    self.max_short,
                )
            }
            FrameRef::ResponseHead {
                status: _,
                headers: list,
            } => headers(list),
            FrameRef::BodyChunk(data) => at_most("chunk length", data.0.len(), self.max_chunk()),
            FrameRef::Error { kind: _, message } => {
                at_most("message length", message.len(), self.max_text)
            }
        }
    }
}

/// How many bytes bincode's varint takes for `n`.
fn varint_len(n: usize) -> usize {
    match n as u64 {
        0..=250 => 1,
        251..=0xFFFF => 3,
        0x1_0000..=0xFFFF_FFFF => 5,
        _ => 9,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    /// Whatever a target answers with, the head that carries what fits
    /// encodes, and a header left out for room would not have fitted.
    #[test]
    fn response_headers_are_cut_to_what_a_head_frame_carries() {
        let l = Limits::default();
        let header = |name: &str, len: usize| (name.to_string(), vec![b'v'; len]);
        let head = |headers: Vec<(String, Vec<u8>)>| Frame::ResponseHead {
            status: 200,
            headers,
        };
        let encodes = |headers: &[(String, Vec<u8>)]| {
            crate::encode(&head(headers.to_vec()), &l, &mut Vec::new()).is_ok()
        };
        type Headers = Vec<(String, Vec<u8>)>;
        let cases: Vec<(Headers, usize, usize)> = vec![
            // Too many.
            (
                (0..150).map(|i| header(&format!("x-{i}"), 10)).collect(),
                100,
                50,
            ),
            // A value and a name over their limits, among good ones.
            (
                vec![
                    header("a", 10),
                    header("big", l.max_header_value + 1),
                    header(&"n".repeat(l.max_header_name + 1), 1),
                    header("b", 10),
                ],
                2,
                2,
            ),
            // Each within its limits, together over the frame.
            (
                (0..20)
                    .map(|i| header(&format!("x-{i}"), l.max_header_value))
                    .collect(),
                7,
                13,
            ),
        ];
        for (headers, kept, dropped) in cases {
            let (carried, left_out) = l.fit_response_headers(200, headers.clone());
            assert_eq!((carried.len(), left_out.len()), (kept, dropped));
            assert!(encodes(&carried));
        }
        // Filled to the byte, as the encoder counts: one byte more would
        // not encode, and is left out.
        let mut full = vec![header("a", 8000); 8];
        let used: usize = full.iter().map(|(n, v)| 1 + n.len() + 3 + v.len()).sum();
        // Kind, status 200, count; then the last header's lengths and name.
        let last = l.max_head_frame - (1 + 1 + 1) - used - (1 + 1 + 3);
        full.push(header("x", last));
        let (all, out) = l.fit_response_headers(200, full.clone());
        assert!(out.is_empty(), "{last} bytes fit exactly");
        assert!(encodes(&all));
        full.last_mut().unwrap().1.push(b'v');
        assert!(!encodes(&full), "one byte more does not encode");
        let (_, out) = l.fit_response_headers(200, full);
        assert_eq!(out, ["x"]);
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let l = Limits::default();
        assert_eq!(l.max_frame, 1_048_576);
        assert_eq!(l.max_head_frame, 65_536);
        assert_eq!(l.max_chunk(), 1_048_570);
        assert_eq!(l.max_payload(), 1_048_576);
        assert_eq!(l.max_payload_of(TAG_BODY_CHUNK), 1_048_576);
        assert_eq!(l.max_payload_of(0), 65_536);
    }

    #[test]
    fn limits_above_the_ceiling_are_the_ceiling() {
        let l = Limits {
            max_frame: usize::MAX,
            max_head_frame: usize::MAX,
            ..Limits::default()
        };
        assert_eq!(l.max_payload(), FRAME_CEILING);
        assert_eq!(l.max_payload_of(TAG_BODY_CHUNK), FRAME_CEILING);
        assert_eq!(l.max_chunk(), FRAME_CEILING - CHUNK_OVERHEAD);
        let tiny = Limits {
            max_frame: 3,
            ..Limits::default()
        };
        assert_eq!(tiny.max_chunk(), 0);
    }

    /// Each field at its limit passes and one byte more is refused, naming
    /// the frame and the field.
    #[test]
    fn every_field_is_checked_at_its_limit() {
        let l = Limits::default();
        let s = |n: usize| "x".repeat(n);
        let hello = |name: usize, token: usize, version: usize| Frame::Hello {
            name: s(name),
            token: s(token),
            protocol_version: 1,
            relay_version: s(version),
        };
        let head = |method: usize, url: usize, profile: usize| Frame::RequestHead {
            method: s(method),
            url: s(url),
            headers: vec![],
            protocol_profile: Some(s(profile)),
            timeout_ms: 1,
        };
        let response = |count: usize, name: usize, value: usize| Frame::ResponseHead {
            status: 200,
            headers: vec![(s(name), vec![b'v'; value]); count],
        };
        #[rustfmt::skip]
        let cases: Vec<(Frame, Frame, &str)> = vec![
            (hello(128, 1, 1), hello(129, 1, 1), "hello frame: name length is 129, expected at most 128"),
            (hello(1, 1024, 1), hello(1, 1025, 1), "hello frame: token length is 1025, expected at most 1024"),
            (hello(1, 1, 128), hello(1, 1, 129), "hello frame: relay version length is 129, expected at most 128"),
            (
                Frame::Accept { daemon_version: s(128), heartbeat_interval_ms: 1, session_id: 1 },
                Frame::Accept { daemon_version: s(129), heartbeat_interval_ms: 1, session_id: 1 },
                "accept frame: daemon version length is 129, expected at most 128",
            ),
            (
                Frame::Reject { reason: s(4096) },
                Frame::Reject { reason: s(4097) },
                "reject frame: reason length is 4097, expected at most 4096",
            ),
            (head(128, 1, 1), head(129, 1, 1), "request head frame: method length is 129, expected at most 128"),
            (head(1, 8192, 1), head(1, 8193, 1), "request head frame: url length is 8193, expected at most 8192"),
            (head(1, 1, 128), head(1, 1, 129), "request head frame: protocol profile length is 129, expected at most 128"),
            (response(100, 1, 1), response(101, 1, 1), "response head frame: header count is 101, expected at most 100"),
            (response(1, 256, 1), response(1, 257, 1), "response head frame: header name length is 257, expected at most 256"),
            (response(1, 1, 8192), response(1, 1, 8193), "response head frame: header value length is 8193, expected at most 8192"),
            (
                Frame::BodyChunk(vec![0; l.max_chunk()]),
                Frame::BodyChunk(vec![0; l.max_chunk() + 1]),
                "body chunk frame: chunk length is 1048571, expected at most 1048570",
            ),
            (
                Frame::Error { kind: ErrorKind::Other, message: s(4096) },
                Frame::Error { kind: ErrorKind::Other, message: s(4097) },
                "error frame: message length is 4097, expected at most 4096",
            ),
        ];
        for (at_limit, over, message) in cases {
            assert_eq!(l.check(&at_limit), Ok(()), "{}", at_limit.name());
            let e = l.check(&over).unwrap_err();
            assert_eq!(e.to_string(), message);
        }
    }
}
