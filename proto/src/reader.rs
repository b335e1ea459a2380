//! Frames from any source of byte pieces, such as a QUIC receive stream.

use std::fmt::Display;
use std::future::Future;

use crate::decoder::FrameDecoder;
use crate::frame::Frame;
use crate::limits::Limits;

/// Where a [`FrameReader`] gets its bytes: one stream, a piece at a time.
/// The transport implements it (the daemon and the relay, for a QUIC
/// receive stream); this crate knows nothing of sockets.
pub trait ChunkSource {
    type Chunk: AsRef<[u8]>;
    type Error: Display;

    /// The next piece of at most `max` bytes; `None` at the end of the
    /// stream.
    fn next_chunk(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Option<Self::Chunk>, Self::Error>> + Send;
}

/// Frames of one stream, read a piece at a time (one read usually brings a
/// whole small message) and decoded by [`FrameDecoder`], which never
/// buffers more than one frame within the limits plus one piece.
pub struct FrameReader<S> {
    source: S,
    decoder: FrameDecoder,
}

impl<S: ChunkSource> FrameReader<S> {
    /// The most bytes one read takes.
    pub const PIECE: usize = 64 * 1024;

    pub fn new(source: S, limits: Limits) -> Self {
        FrameReader {
            source,
            decoder: FrameDecoder::new(limits),
        }
    }

    /// The source, e.g. to stop a stream whose rest will not be read.
    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// The next frame; `None` when the stream ended cleanly between frames.
    /// Errors say whether the source failed (the peer went away) or its
    /// bytes are no valid frame (the peer is wrong), and name what was
    /// wrong.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError<S::Error>> {
        loop {
            if let Some(frame) = self
                .decoder
                .next_frame()
                .map_err(|e| ReadError::Frame(e.to_string()))?
            {
                return Ok(Some(frame));
            }
            match self.source.next_chunk(Self::PIECE).await {
                Ok(Some(chunk)) => self.decoder.push(chunk.as_ref()),
                Ok(None) => {
                    self.decoder.end_of_stream().map_err(|e| {
                        ReadError::Frame(format!("the stream ended inside a frame: {e}"))
                    })?;
                    return Ok(None);
                }
                Err(e) => return Err(ReadError::Source(e)),
            }
        }
    }
}

/// Why [`FrameReader::next`] gave no frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError<E> {
    /// The source failed: for a QUIC stream, the connection was lost or
    /// the stream reset.
    Source(E),
    /// The bytes are no valid frame, or the stream ended inside one.
    Frame(String),
}

impl<E: Display> Display for ReadError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Source(e) => e.fmt(f),
            ReadError::Frame(e) => f.write_str(e),
        }
    }
}

impl<E: Display> From<ReadError<E>> for String {
    fn from(e: ReadError<E>) -> String {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;

    /// A stream that hands out fixed pieces, then ends.
    struct Pieces(Vec<Vec<u8>>);

    impl ChunkSource for Pieces {
        type Chunk = Vec<u8>;
        type Error = String;

        async fn next_chunk(&mut self, max: usize) -> Result<Option<Vec<u8>>, String> {
            if self.0.is_empty() {
                return Ok(None);
            }
            let mut piece = self.0.remove(0);
            if piece.len() > max {
                let rest = piece.split_off(max);
                self.0.insert(0, rest);
            }
            Ok(Some(piece))
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        // The sources here never wait, so one poll with a no-op waker ends
        // every future.
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("a source that never waits made the reader wait"),
        }
    }

    #[test]
    fn frames_across_pieces_then_a_clean_end() {
        let limits = Limits::default();
        let mut bytes = Vec::new();
        encode(&Frame::Heartbeat { seq: 7 }, &limits, &mut bytes).unwrap();
        encode(&Frame::BodyChunk(vec![1; 100_000]), &limits, &mut bytes).unwrap();
        encode(&Frame::End, &limits, &mut bytes).unwrap();
        let pieces = bytes.chunks(3).map(<[u8]>::to_vec).collect();
        let mut reader = FrameReader::new(Pieces(pieces), limits);
        assert_eq!(
            block_on(reader.next()).unwrap(),
            Some(Frame::Heartbeat { seq: 7 })
        );
        assert_eq!(
            block_on(reader.next()).unwrap(),
            Some(Frame::BodyChunk(vec![1; 100_000]))
        );
        assert_eq!(block_on(reader.next()).unwrap(), Some(Frame::End));
        assert_eq!(block_on(reader.next()).unwrap(), None);
    }

    #[test]
    fn an_end_inside_a_frame_is_named() {
        let limits = Limits::default();
        let mut bytes = Vec::new();
        encode(&Frame::Heartbeat { seq: 7 }, &limits, &mut bytes).unwrap();
        bytes.pop();
        let mut reader = FrameReader::new(Pieces(vec![bytes]), limits);
        let e = block_on(reader.next()).unwrap_err();
        assert!(
            matches!(&e, ReadError::Frame(t) if t.contains("ended inside a frame")),
            "{e}"
        );
    }
}
