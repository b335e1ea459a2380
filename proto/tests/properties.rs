//! Property tests of the codec through its public API: valid frames round
//! trip, and no input, however cut or mangled, panics or decodes to a
//! frame it does not hold.

use outbox_proto::{
    decode_one, decode_payload, encode, frame_len, DecodeError, ErrorKind, Frame, FrameDecoder,
    Limits, HEADER_LEN,
};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{0,40}"
}

/// Any Unicode text, so multi-byte characters meet the byte limits too.
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,64}"
}

/// Unicode text within the 128-byte limit on versions (4 bytes a char at
/// most).
fn short_text() -> impl Strategy<Value = String> {
    "\\PC{0,32}"
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    prop::collection::vec(("[a-z0-9-]{0,24}", bytes(64)), 0..12)
}

fn error_kind() -> impl Strategy<Value = ErrorKind> {
    prop::sample::select(ErrorKind::ALL.to_vec())
}

/// Any frame within the default limits.
fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (name(), text(), any::<u32>(), short_text()).prop_map(
            |(name, token, protocol_version, relay_version)| Frame::Hello {
                name,
                token,
                protocol_version,
                relay_version,
            }
        ),
        (short_text(), any::<u64>(), any::<u64>()).prop_map(
            |(daemon_version, heartbeat_interval_ms, session_id)| Frame::Accept {
                daemon_version,
                heartbeat_interval_ms,
                session_id,
            }
        ),
        text().prop_map(|reason| Frame::Reject { reason }),
        any::<u64>().prop_map(|seq| Frame::Heartbeat { seq }),
        (
            "[A-Z]{1,10}",
            text(),
            headers(),
            prop::option::of(name()),
            any::<u64>()
        )
            .prop_map(|(method, url, headers, protocol_profile, timeout_ms)| {
                Frame::RequestHead {
                    method,
                    url,
                    headers,
                    protocol_profile,
                    timeout_ms,
                }
            }),
        (any::<u16>(), headers())
            .prop_map(|(status, headers)| Frame::ResponseHead { status, headers }),
        bytes(4096).prop_map(Frame::BodyChunk),
        Just(Frame::End),
        (error_kind(), text()).prop_map(|(kind, message)| Frame::Error { kind, message }),
    ]
}

fn encode_all(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        encode(f, &Limits::default(), &mut out).unwrap();
    }
    out
}

/// Feeds `bytes` to a decoder in pieces cut at `cuts` (taken modulo the
/// length, in any order), taking frames after each piece. Returns the
/// frames and how the stream ended.
fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> (Vec<Frame>, Result<(), DecodeError>) {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut frames = Vec::new();
    let mut from = 0;
    for to in cuts {
        decoder.push(&bytes[from..to]);
        from = to;
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    // Errors are final.
                    assert_eq!(decoder.next_frame(), Err(e.clone()));
                    assert_eq!(decoder.buffered(), 0);
                    return (frames, Err(e));
                }
            }
        }
    }
    (frames, decoder.end_of_stream())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (1) Any valid frame round-trips through every decoding entry point.
    #[test]
    fn valid_frames_round_trip(f in frame()) {
        let limits = Limits::default();
        prop_assert_eq!(limits.check(&f), Ok(()));
        let bytes = encode_all(std::slice::from_ref(&f));
        let (back, used) = decode_one(&bytes, &limits).unwrap();
        prop_assert_eq!(&back, &f);
        prop_assert_eq!(used, bytes.len());
        let header = *bytes.first_chunk::<HEADER_LEN>().unwrap();
        let len = frame_len(header, &limits).unwrap();
        prop_assert_eq!(len, bytes.len() - HEADER_LEN);
        prop_assert_eq!(decode_payload(&bytes[HEADER_LEN..], &limits).unwrap(), f);
    }

    /// (1) A stream of valid frames cut anywhere decodes to the same frames.
    #[test]
    fn frame_streams_decode_the_same_however_cut(
        frames in prop::collection::vec(frame(), 0..8),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let bytes = encode_all(&frames);
        let (back, end) = decode_in_pieces(&bytes, &cuts);
        prop_assert_eq!(back, frames);
        prop_assert_eq!(end, Ok(()));
    }

    /// (2) Any bytes, whole or cut at random points, give frames or an
    /// error, never a panic; the cuts change nothing; and whatever decodes
    /// is within the limits and encodes back to itself.
    #[test]
    fn any_bytes_give_frames_or_an_error(
        bytes in bytes(1024),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        check_arbitrary_input(&bytes, &cuts)?;
    }

    /// (2) The same, for valid streams with a few bytes changed: these get
    /// past the length and kind checks far more often than random bytes.
    #[test]
    fn mangled_streams_give_frames_or_an_error(
        frames in prop::collection::vec(frame(), 1..6),
        changes in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut bytes = encode_all(&frames);
        for (at, byte) in changes {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
        check_arbitrary_input(&bytes, &cuts)?;
    }

    /// (3) No cut short encoding decodes to a frame: `decode_one` says it
    /// is truncated, the stream decoder waits for more and reports the
    /// truncation at the end of the stream, and a cut short payload is
    /// malformed.
    #[test]
    fn truncated_encodings_are_never_a_frame(f in frame(), cut in any::<usize>()) {
        let limits = Limits::default();
        let bytes = encode_all(std::slice::from_ref(&f));
        // From 1 byte to all but one: no bytes at all is an empty stream.
        let cut = 1 + cut % (bytes.len() - 1);
        let expected = if cut < HEADER_LEN { HEADER_LEN } else { bytes.len() };
        let truncated = DecodeError::Truncated { expected, found: cut };
        prop_assert_eq!(decode_one(&bytes[..cut], &limits), Err(truncated.clone()));

        let mut decoder = FrameDecoder::new(limits);
        decoder.push(&bytes[..cut]);
        prop_assert_eq!(decoder.next_frame(), Ok(None));
        prop_assert_eq!(decoder.buffered(), cut);
        prop_assert_eq!(decoder.end_of_stream(), Err(truncated));

        let payload = &bytes[HEADER_LEN..];
        let short = &payload[..cut % payload.len()];
        prop_assert!(decode_payload(short, &limits).is_err());
    }

    /// (4) A length prefix over the limit is refused from the header alone,
    /// whatever follows, and the stream decoder keeps nothing of it.
    #[test]
    fn oversized_length_prefixes_are_refused(
        len in (1u32 << 20) + 1..=u32::MAX,
        tail in bytes(64),
    ) {
        let limits = Limits::default();
        let refused = DecodeError::LengthTooLarge { found: len as usize, limit: 1 << 20 };
        let header = len.to_be_bytes();
        prop_assert_eq!(frame_len(header, &limits), Err(refused.clone()));
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&tail);
        prop_assert_eq!(decode_one(&bytes, &limits), Err(refused.clone()));
        let mut decoder = FrameDecoder::new(limits);
        decoder.push(&bytes);
        prop_assert_eq!(decoder.buffered(), 0);
        prop_assert_eq!(decoder.next_frame(), Err(refused));
    }

    /// (4) A frame other than a body chunk announcing more than the head
    /// frame limit is refused at its first payload byte.
    #[test]
    fn oversized_heads_are_refused_at_their_kind_byte(
        len in (64u32 << 10) + 1..=1 << 20,
        tag in (0u8..9).prop_filter("not a body chunk", |&t| t != 6),
    ) {
        let limits = Limits::default();
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.push(tag);
        let e = decode_one(&bytes, &limits).unwrap_err();
        prop_assert!(matches!(e, DecodeError::FrameTooLarge { found, limit: 65536, .. } if found == len as usize), "{:?}", e);
        let mut decoder = FrameDecoder::new(limits);
        decoder.push(&bytes);
        prop_assert_eq!(decoder.next_frame(), Err(e));
        prop_assert_eq!(decoder.buffered(), 0);
    }
}

fn check_arbitrary_input(bytes: &[u8], cuts: &[usize]) -> Result<(), TestCaseError> {
    let limits = Limits::default();
    if let Ok((f, used)) = decode_one(bytes, &limits) {
        prop_assert!(used <= bytes.len());
        prop_assert_eq!(limits.check(&f), Ok(()));
        let again = encode_all(std::slice::from_ref(&f));
        prop_assert_eq!(decode_one(&again, &limits).map(|(g, _)| g), Ok(f));
    }
    let (whole_frames, whole_end) = decode_in_pieces(bytes, &[]);
    let (cut_frames, cut_end) = decode_in_pieces(bytes, cuts);
    prop_assert_eq!(&cut_frames, &whole_frames);
    prop_assert_eq!(cut_end, whole_end);
    for f in &whole_frames {
        prop_assert_eq!(limits.check(f), Ok(()));
    }
    Ok(())
}
