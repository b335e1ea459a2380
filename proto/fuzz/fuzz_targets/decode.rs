//! Fuzz target `decode`: arbitrary bytes into every decoding entry point.
//! Nothing may panic; a decoded frame must be within the limits and encode
//! back to itself; and the stream decoder must give the same frames and the
//! same ending however the bytes are cut.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outbox_proto::{decode_one, decode_payload, encode, DecodeError, Frame, FrameDecoder, Limits};

fuzz_target!(|data: &[u8]| {
    // The defaults, and limits small enough that inputs reach every limit
    // check.
    let tight = Limits {
        max_frame: 300,
        max_head_frame: 200,
        max_headers: 3,
        max_header_name: 8,
        max_header_value: 16,
        max_url: 32,
        max_name: 8,
        max_token: 8,
        max_short: 8,
        max_text: 16,
    };
    for limits in [Limits::default(), tight] {
        check(data, &limits);
    }
});

fn check(data: &[u8], limits: &Limits) {
    if let Ok((frame, used)) = decode_one(data, limits) {
        assert!(used <= data.len());
        round_trips(frame, limits);
    }
    if let Ok(frame) = decode_payload(data, limits) {
        round_trips(frame, limits);
    }
    // The first byte picks the piece size, so the fuzzer explores cuts.
    let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
    let whole = in_pieces(data, data.len().max(1), limits);
    assert_eq!(in_pieces(data, step, limits), whole);
    assert_eq!(in_pieces(data, 1, limits), whole);
    for frame in whole.0 {
        round_trips(frame, limits);
    }
}

fn round_trips(frame: Frame, limits: &Limits) {
    assert_eq!(limits.check(&frame), Ok(()));
    let mut bytes = Vec::new();
    encode(&frame, limits, &mut bytes).expect("a decoded frame encodes");
    assert_eq!(decode_one(&bytes, limits), Ok((frame, bytes.len())));
}

fn in_pieces(data: &[u8], step: usize, limits: &Limits) -> (Vec<Frame>, Result<(), DecodeError>) {
    let mut decoder = FrameDecoder::new(*limits);
    let mut frames = Vec::new();
    for piece in data.chunks(step) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Err(e)),
            }
        }
    }
    (frames, decoder.end_of_stream())
}
