//! An incremental frame decoder for bytes that arrive in pieces.

use crate::codec::{decode_payload, frame_extent, DecodeError};
use crate::frame::Frame;
use crate::limits::{Limits, HEADER_LEN};

/// Decodes frames from a byte stream that arrives in arbitrary pieces: push
/// each piece, then take frames until [`next_frame`](Self::next_frame)
/// returns `Ok(None)`.
///
/// It holds only what was pushed and not yet taken as frames. The header of
/// the frame being assembled is checked as soon as it is complete, and its
/// kind as soon as the first payload byte is, so a hostile peer cannot make
/// it buffer more than one frame within the limits (plus whatever one push
/// brought). The first error is final: the stream is out of step, so
/// `next_frame` keeps returning it and later pushes are dropped.
///
/// ```
/// use outbox_proto::{encode, Frame, FrameDecoder, Limits};
///
/// let limits = Limits::default();
/// let mut bytes = Vec::new();
/// encode(&Frame::Heartbeat { seq: 1 }, &limits, &mut bytes)?;
/// encode(&Frame::End, &limits, &mut bytes)?;
///
/// let mut decoder = FrameDecoder::new(limits);
/// let mut frames = Vec::new();
/// for piece in bytes.chunks(3) {
///     decoder.push(piece);
///     while let Some(frame) = decoder.next_frame()? {
///         frames.push(frame);
///     }
/// }
/// decoder.end_of_stream()?;
/// assert_eq!(frames, [Frame::Heartbeat { seq: 1 }, Frame::End]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    buf: Vec<u8>,
    /// How many bytes at the front of `buf` were already taken as frames;
    /// dropped on the next push, so taking a frame copies nothing.
    taken: usize,
    failed: Option<DecodeError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(Limits::default())
    }
}

impl FrameDecoder {
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            limits,
            buf: Vec::new(),
            taken: 0,
            failed: None,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Adds bytes from the stream. Dropped if the stream already failed.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.buf.drain(..self.taken);
        self.taken = 0;
        self.buf.extend_from_slice(bytes);
        // Refuse a bad header now rather than buffer what follows it.
        if let Err(e) = frame_extent(&self.buf, &self.limits) {
            self.fail(e);
        }
    }

    /// The next whole frame; `Ok(None)` if more bytes are needed for it.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let pending = &self.buf[self.taken..];
        let decoded = match frame_extent(pending, &self.limits) {
            Ok(Some(end)) => match pending.get(HEADER_LEN..end) {
                Some(payload) => decode_payload(payload, &self.limits).map(|f| Some((f, end))),
                None => Ok(None),
            },
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        match decoded {
            Ok(Some((frame, end))) => {
                self.taken += end;
                if self.taken == self.buf.len() {
                    self.buf.clear();
                    self.taken = 0;
                }
                Ok(Some(frame))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.fail(e.clone());
                Err(e)
            }
        }
    }

    /// Bytes pushed and not yet taken as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.taken
    }

    /// Call when the stream has ended: an error if it ended inside a frame
    /// (or had failed). Whole frames still buffered can be taken after.
    pub fn end_of_stream(&self) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let pending = &self.buf[self.taken..];
        if pending.is_empty() {
            return Ok(());
        }
        let expected = frame_extent(pending, &self.limits)?.unwrap_or(HEADER_LEN);
        if pending.len() < expected {
            Err(DecodeError::Truncated {
                expected,
                found: pending.len(),
            })
        } else {
            Ok(())
        }
    }

    fn fail(&mut self, e: DecodeError) {
        self.failed = Some(e);
        // Nothing buffered can be used any more.
        self.buf = Vec::new();
        self.taken = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode;
    use crate::codec::tests::samples;

    fn stream() -> Vec<u8> {
        let mut out = Vec::new();
        for frame in samples() {
            encode(&frame, &Limits::default(), &mut out).unwrap();
        }
        out
    }

    fn drain(d: &mut FrameDecoder) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            frames.push(f);
        }
        frames
    }

    #[test]
    fn byte_by_byte_and_all_at_once_give_the_same_frames() {
        let bytes = stream();
        let mut one = FrameDecoder::default();
        let mut frames = Vec::new();
        for b in &bytes {
            one.push(std::slice::from_ref(b));
            frames.extend(drain(&mut one));
        }
        assert_eq!(frames, samples());
        assert_eq!(one.buffered(), 0);
        assert_eq!(one.end_of_stream(), Ok(()));

        let mut all = FrameDecoder::default();
        all.push(&bytes);
        assert_eq!(drain(&mut all), samples());
        assert_eq!(all.buffered(), 0);
    }

    #[test]
    fn a_partial_frame_waits_and_an_ended_stream_reports_it() {
        let mut bytes = stream();
        bytes.extend_from_slice(&[0, 0, 0, 1, 7]);
        let mut d = FrameDecoder::default();
        d.push(&bytes[..bytes.len() - 1]);
        assert_eq!(drain(&mut d), samples());
        assert_eq!(d.buffered(), 4);
        assert_eq!(
            d.end_of_stream(),
            Err(DecodeError::Truncated {
                expected: 5,
                found: 4
            })
        );
        d.push(&bytes[bytes.len() - 1..]);
        assert_eq!(d.end_of_stream(), Ok(()));
        assert_eq!(d.next_frame(), Ok(Some(Frame::End)));
        assert_eq!(d.next_frame(), Ok(None));

        let mut short = FrameDecoder::default();
        short.push(&[0, 0]);
        assert_eq!(short.next_frame(), Ok(None));
        assert_eq!(
            short.end_of_stream(),
            Err(DecodeError::Truncated {
                expected: 4,
                found: 2
            })
        );
    }

    #[test]
    fn errors_are_final_and_free_the_buffer() {
        let mut d = FrameDecoder::default();
        let mut bytes = vec![0, 0, 0, 1, 7];
        bytes.extend_from_slice(&[0, 0, 0, 1, 42]);
        d.push(&bytes);
        assert_eq!(d.next_frame(), Ok(Some(Frame::End)));
        let e = DecodeError::UnknownKind { tag: 42 };
        assert_eq!(d.next_frame(), Err(e.clone()));
        d.push(&[0, 0, 0, 1, 7]);
        assert_eq!(d.next_frame(), Err(e.clone()));
        assert_eq!(d.end_of_stream(), Err(e));
        assert_eq!(d.buffered(), 0);
    }

    /// An oversized header is refused on the push that completes it, and
    /// what follows is not kept.
    #[test]
    fn a_bad_header_is_refused_before_its_payload_is_buffered() {
        let mut d = FrameDecoder::default();
        d.push(&[0x7f, 0xff]);
        d.push(&[0xff, 0xff]);
        assert_eq!(d.buffered(), 0);
        d.push(&[0; 4096]);
        assert_eq!(d.buffered(), 0);
        assert!(matches!(
            d.next_frame(),
            Err(DecodeError::LengthTooLarge { .. })
        ));

        // A hello announcing a megabyte: within the body frame limit, over
        // the head frame limit, refused at its first payload byte.
        let mut d = FrameDecoder::default();
        d.push(&[0, 0x10, 0, 0, 0]);
        assert_eq!(
            d.next_frame(),
            Err(DecodeError::FrameTooLarge {
                kind: "hello",
                found: 1 << 20,
                limit: 64 << 10
            })
        );
    }

    /// Taking frames does not shift the buffer; the next push drops what
    /// was taken.
    #[test]
    fn taken_frames_are_dropped_on_the_next_push() {
        let bytes = stream();
        let mut d = FrameDecoder::default();
        d.push(&bytes);
        d.next_frame().unwrap();
        let left = d.buffered();
        d.push(&[]);
        assert_eq!(d.buffered(), left);
        assert_eq!(d.buf.len(), left);
        assert_eq!(drain(&mut d), samples()[1..]);
    }
}
