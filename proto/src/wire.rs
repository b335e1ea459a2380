//! The payload encoding: a borrowed mirror of [`Frame`] that bincode writes
//! from and reads into without copying, so a decoded frame's limits are
//! checked before any of its strings or bytes are copied out.

use std::fmt;

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

use crate::frame::{ErrorKind, Frame};
use crate::limits::FRAME_CEILING;

/// The kind byte of a body chunk: its variant index.
pub(crate) const TAG_BODY_CHUNK: u8 = 6;

/// The kinds in wire order: the first payload byte indexes this.
pub(crate) const KIND_NAMES: [&str; 9] = [
    "hello",
    "accept",
    "reject",
    "heartbeat",
    "request head",
    "response head",
    "body chunk",
    "end",
    "error",
];

/// [`Frame`] with every string and byte string borrowed. The variants, their
/// order and their fields are the wire format.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum FrameRef<'a> {
    Hello {
        name: &'a str,
        token: &'a str,
        protocol_version: u32,
        relay_version: &'a str,
    },
    Accept {
        daemon_version: &'a str,
        heartbeat_interval_ms: u64,
        session_id: u64,
    },
    Reject {
        reason: &'a str,
    },
    Heartbeat {
        seq: u64,
    },
    RequestHead {
        method: &'a str,
        url: &'a str,
        #[serde(borrow)]
        headers: Headers<'a>,
        #[serde(borrow)]
        protocol_profile: Option<&'a str>,
        timeout_ms: u64,
    },
    ResponseHead {
        status: u16,
        #[serde(borrow)]
        headers: Headers<'a>,
    },
    BodyChunk(#[serde(borrow)] Bytes<'a>),
    End,
    Error {
        kind: ErrorKind,
        message: &'a str,
    },
}

/// A byte string encoded as one length and the raw bytes, and decoded by
/// borrowing from the payload (serde's own `[u8]` goes element by element).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Bytes<'a>(pub(crate) &'a [u8]);

/// A header list: borrowed from a [`Frame`] when encoding, from the payload
/// when decoding. Both encode the same way.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Headers<'a> {
    Frame(&'a [(String, Vec<u8>)]),
    Payload(Vec<(&'a str, &'a [u8])>),
}

/// bincode's decode limit: the most a payload's lengths and integers may
/// claim. bincode counts each integer at its size in memory (a one-byte
/// varint length claims 8 bytes), so a valid payload of `n` bytes claims at
/// most `8 * n`. Decoding borrows from the payload, whose length is already
/// checked, so this is a second fence rather than the real bound.
const DECODE_LIMIT: usize = 8 * FRAME_CEILING;

/// The bincode configuration of a payload.
pub(crate) fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// The kind name of a first payload byte, `None` if no kind has it.
pub(crate) fn kind_name(tag: u8) -> Option<&'static str> {
    KIND_NAMES.get(usize::from(tag)).copied()
}

/// How many headers a decoded list makes room for up front, whatever count
/// the payload claims. Real heads rarely have more; a longer list grows as
/// its entries are actually read, each taking payload bytes.
const HEADERS_PREALLOC: usize = 32;

impl FrameRef<'_> {
    pub(crate) fn name(&self) -> &'static str {
        // `tag` is below `KIND_NAMES.len()` by construction (a test pins
        // both to the serialized variant index).
        KIND_NAMES[usize::from(self.tag())]
    }

    pub(crate) fn tag(&self) -> u8 {
        match self {
            FrameRef::Hello { .. } => 0,
            FrameRef::Accept { .. } => 1,
            FrameRef::Reject { .. } => 2,
            FrameRef::Heartbeat { .. } => 3,
            FrameRef::RequestHead { .. } => 4,
            FrameRef::ResponseHead { .. } => 5,
            FrameRef::BodyChunk(_) => TAG_BODY_CHUNK,
            FrameRef::End => 7,
            FrameRef::Error { .. } => 8,
        }
    }

    /// Copies the frame out of the payload.
    pub(crate) fn to_frame(&self) -> Frame {
        match *self {
            FrameRef::Hello {
                name,
                token,
                protocol_version,
                relay_version,
            } => Frame::Hello {
                name: name.to_owned(),
                token: token.to_owned(),
                protocol_version,
                relay_version: relay_version.to_owned(),
            },
            FrameRef::Accept {
                daemon_version,
                heartbeat_interval_ms,
                session_id,
            } => Frame::Accept {
                daemon_version: daemon_version.to_owned(),
                heartbeat_interval_ms,
                session_id,
            },
            FrameRef::Reject { reason } => Frame::Reject {
                reason: reason.to_owned(),
            },
            FrameRef::Heartbeat { seq } => Frame::Heartbeat { seq },
            FrameRef::RequestHead {
                method,
                url,
                ref headers,
                protocol_profile,
                timeout_ms,
            } => Frame::RequestHead {
                method: method.to_owned(),
                url: url.to_owned(),
                headers: headers.to_owned(),
                protocol_profile: protocol_profile.map(str::to_owned),
                timeout_ms,
            },
            FrameRef::ResponseHead {
                status,
                ref headers,
            } => Frame::ResponseHead {
                status,
                headers: headers.to_owned(),
            },
            FrameRef::BodyChunk(Bytes(data)) => Frame::BodyChunk(data.to_vec()),
            FrameRef::End => Frame::End,
            FrameRef::Error { kind, message } => Frame::Error {
                kind,
                message: message.to_owned(),
            },
        }
    }
}

impl<'a> From<&'a Frame> for FrameRef<'a> {
    fn from(frame: &'a Frame) -> Self {
        match frame {
            Frame::Hello {
                name,
                token,
                protocol_version,
                relay_version,
            } => FrameRef::Hello {
                name,
                token,
                protocol_version: *protocol_version,
                relay_version,
            },
            Frame::Accept {
                daemon_version,
                heartbeat_interval_ms,
                session_id,
            } => FrameRef::Accept {
                daemon_version,
                heartbeat_interval_ms: *heartbeat_interval_ms,
                session_id: *session_id,
            },
            Frame::Reject { reason } => FrameRef::Reject { reason },
            Frame::Heartbeat { seq } => FrameRef::Heartbeat { seq: *seq },
            Frame::RequestHead {
                method,
                url,
                headers,
                protocol_profile,
                timeout_ms,
            } => FrameRef::RequestHead {
                method,
                url,
                headers: Headers::Frame(headers),
                protocol_profile: protocol_profile.as_deref(),
                timeout_ms: *timeout_ms,
            },
            Frame::ResponseHead { status, headers } => FrameRef::ResponseHead {
                status: *status,
                headers: Headers::Frame(headers),
            },
            Frame::BodyChunk(data) => FrameRef::BodyChunk(Bytes(data)),
            Frame::End => FrameRef::End,
            Frame::Error { kind, message } => FrameRef::Error {
                kind: *kind,
                message,
            },
        }
    }
}

impl<'a> Headers<'a> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Headers::Frame(list) => list.len(),
            Headers::Payload(list) => list.len(),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + '_ {
        let (frame, payload) = match self {
            Headers::Frame(list) => (*list, &[][..]),
            Headers::Payload(list) => (&[][..], list.as_slice()),
        };
        frame
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice()))
            .chain(payload.iter().copied())
    }

    fn to_owned(&self) -> Vec<(String, Vec<u8>)> {
        self.iter()
            .map(|(name, value)| (name.to_owned(), value.to_vec()))
            .collect()
    }
}

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Bytes<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;

        impl<'de> Visitor<'de> for BytesVisitor {
            type Value = Bytes<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Self::Value, E> {
                Ok(Bytes(v))
            }
        }

        deserializer.deserialize_bytes(BytesVisitor)
    }
}

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len()))?;
        for (name, value) in self.iter() {
            seq.serialize_element(&(name, Bytes(value)))?;
        }
        seq.end()
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Headers<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HeadersVisitor;

        impl<'de> Visitor<'de> for HeadersVisitor {
            type Value = Headers<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header list")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // The claimed count is untrusted: reserve a little and let
                // real entries grow the list.
                let claimed = seq.size_hint().unwrap_or(0);
                let mut list = Vec::with_capacity(claimed.min(HEADERS_PREALLOC));
                while let Some((name, Bytes(value))) =
                    seq.next_element::<(&'de str, Bytes<'de>)>()?
                {
                    list.push((name, value));
                }
                Ok(Headers::Payload(list))
            }
        }

        deserializer.deserialize_seq(HeadersVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kind byte is the variant index, one byte: the decoder relies on
    /// it to apply a kind's size limit before the payload arrives.
    #[test]
    fn first_payload_byte_is_the_kind() {
        for frame in crate::codec::tests::samples() {
            let wire = FrameRef::from(&frame);
            let payload = bincode::serde::encode_to_vec(&wire, config()).unwrap();
            assert_eq!(payload[0], wire.tag(), "{}", frame.name());
            assert_eq!(kind_name(payload[0]), Some(frame.name()));
            assert_eq!(wire.name(), frame.name());
        }
        assert_eq!(kind_name(9), None);
    }

    /// A byte string is one length and the raw bytes, like a `Vec<u8>`.
    #[test]
    fn bytes_encode_as_length_and_raw_bytes() {
        let bytes = bincode::serde::encode_to_vec(Bytes(b"abc"), config()).unwrap();
        assert_eq!(bytes, [3, b'a', b'b', b'c']);
        let vec = bincode::serde::encode_to_vec(b"abc".to_vec(), config()).unwrap();
        assert_eq!(bytes, vec);
    }

    /// A header list claiming a huge count reserves little and fails on
    /// the missing entries.
    #[test]
    fn claimed_header_count_is_not_trusted() {
        // Response head, status 200, then a header count of 2^32 - 1
        // (varint marker 0xfc and a little-endian u32).
        let payload = [5, 200, 0xfc, 0xff, 0xff, 0xff, 0xff, 1, b'a', 0];
        let r = bincode::serde::borrow_decode_from_slice::<FrameRef<'_>, _>(&payload, config());
        assert!(r.is_err());
    }
}
