//! What the daemon and the relay share over quinn (feature `quic`): the
//! runtime both give quinn, receive streams as frame sources, writing a
//! frame, the receive window, and how a connection ended.
//!
//! The runtime is tokio's, with each quinn driver deferred once after a
//! wake-up.
//!
//! quinn runs one driver task per endpoint (receiving datagrams) and one per
//! connection (building and sending packets, timers). Every stream write
//! wakes the connection's driver, and on tokio's multi-threaded scheduler a
//! task woken from another task runs next on that thread. So with many
//! requests in flight the driver ran once per write: one packet, one
//! `sendmsg`, one acknowledgement to process, per request.
//!
//! Here a driver that is woken first puts itself back at the end of its
//! thread's queue, and does its work when it comes round again. The tasks
//! queued meanwhile (other requests being written, answers being read) run
//! first, and the driver then sends what they all wrote in as few packets
//! and system calls as it can. Under load that is several requests per
//! wake-up; when idle, the queue is empty and the driver runs at once.
//!
//! Measured with `outbox-bench --relay-only --no-ssh` (three runs each way,
//! taking turns): CPU per message through the relay went from 89.4–92.7 to
//! 59.1–76.7 µs for the daemon, the relay and the sink together.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// quinn's tokio runtime with deferred drivers; see the module docs.
#[derive(Debug)]
pub struct Runtime(quinn::TokioRuntime);

impl Runtime {
    pub fn new() -> Arc<Runtime> {
        Arc::new(Runtime(quinn::TokioRuntime))
    }
}

impl quinn::Runtime for Runtime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        self.0.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        self.0.spawn(Box::pin(Deferred {
            driver: future,
            deferred: false,
        }))
    }

    fn now(&self) -> Instant {
        // tokio's clock, so quinn follows it when it is paused in tests.
        self.0.now()
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        self.0.wrap_udp_socket(socket)
    }
}

/// The most a peer may have sent on a connection that its reader has not
/// taken yet, all streams together. Both sides read as data comes (the
/// daemon keeps an answer's excerpt and drops the rest; the relay gathers
/// a body up to its `max_body`), so this bounds only a peer that writes
/// what is never read; at a 100 ms round trip it still allows 160 MiB/s.
pub const RECEIVE_WINDOW: u32 = 16 << 20;

/// A QUIC receive stream as the source of a [`crate::FrameReader`]. Every
/// stream is read through one reader for its whole life, so nothing read
/// ahead is lost.
pub struct Stream(pub quinn::RecvStream);

impl crate::ChunkSource for Stream {
    type Chunk = bytes::Bytes;
    type Error = quinn::ReadError;

    async fn next_chunk(&mut self, max: usize) -> Result<Option<bytes::Bytes>, quinn::ReadError> {
        Ok(self.0.read_chunk(max, true).await?.map(|c| c.bytes))
    }
}

/// Writes one frame on `send`, as both sides write control frames (hello,
/// accept, heartbeats, an error answer).
pub async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &crate::Frame,
    limits: &crate::Limits,
) -> Result<(), String> {
    let mut buf = Vec::new();
    crate::encode(frame, limits, &mut buf).map_err(|e| e.to_string())?;
    send.write_all(&buf).await.map_err(|e| e.to_string())
}

/// How a connection ended, in words for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The peer closed it with code 0: it is stopping (a restart, an
    /// upgrade), which is news, not a failure. The peer's reason.
    Stopping(String),
    /// Anything else: the peer gave up on it (its code and reason), the
    /// network, a timeout.
    Failed(String),
}

/// How `e` ended a connection; `peer` names the other side ("the relay").
/// The peer's reason is escaped, as all text from a peer is.
pub fn ended(e: &quinn::ConnectionError, peer: &str) -> Ended {
    match e {
        quinn::ConnectionError::ApplicationClosed(close)
            if close.error_code == quinn::VarInt::from_u32(0) =>
        {
            Ended::Stopping(crate::printable(&String::from_utf8_lossy(&close.reason)).into_owned())
        }
        quinn::ConnectionError::ApplicationClosed(close) => Ended::Failed(format!(
            "{peer} closed the session (code {}): {}",
            close.error_code,
            crate::printable(&String::from_utf8_lossy(&close.reason))
        )),
        // quinn's own words may carry the peer's reason raw.
        other => Ended::Failed(crate::printable(&other.to_string()).into_owned()),
    }
}

/// How `conn` ended: as the peer said ([`ended`]) if it closed it, else
/// this side closes it now, with `code` and `reason`, and that is why.
pub fn end(conn: &quinn::Connection, peer: &str, code: u32, reason: &str) -> Ended {
    match conn.close_reason() {
        Some(closed) => ended(&closed, peer),
        None => {
            let reason = crate::printable(reason).into_owned();
            conn.close(code.into(), reason.as_bytes());
            Ended::Failed(reason)
        }
    }
}

/// [`ended`] as one text, for errors.
pub fn why_closed(e: &quinn::ConnectionError, peer: &str) -> String {
    match ended(e, peer) {
        Ended::Stopping(reason) => format!("{peer} closed the session: {reason}"),
        Ended::Failed(reason) => reason,
    }
}

/// A driver that, woken, first yields once.
struct Deferred {
    driver: Pin<Box<dyn Future<Output = ()> + Send>>,
    deferred: bool,
}

impl Future for Deferred {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !self.deferred {
            // Woken during its own poll, a tokio task is queued behind the
            // thread's other ready tasks, not run next.
            self.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.deferred = false;
        self.driver.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The driver runs after the tasks that were ready when it was woken,
    /// and still runs to completion.
    #[tokio::test(flavor = "current_thread")]
    async fn a_woken_driver_runs_after_the_tasks_already_queued() {
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let polls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let driver = {
            let order = order.clone();
            let polls = polls.clone();
            async move {
                polls.fetch_add(1, Ordering::Relaxed);
                rx.await.unwrap();
                order.lock().unwrap().push("driver");
                done_tx.send(()).unwrap();
            }
        };
        quinn::Runtime::spawn(&*Runtime::new(), Box::pin(driver));
        tokio::task::yield_now().await;
        assert_eq!(polls.load(Ordering::Relaxed), 1, "the driver started");
        // Wake the driver, then queue another task behind it.
        tx.send(()).unwrap();
        let other = {
            let order = order.clone();
            tokio::spawn(async move { order.lock().unwrap().push("other") })
        };
        done_rx.await.unwrap();
        other.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["other", "driver"]);
    }
}
