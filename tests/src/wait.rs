//! Bounded waiting: [`eventually`] polls a condition until it holds or a deadline passes, so tests never sleep to synchronise; [`free_port`] finds a loopback port.
//!
//! A condition is a closure, plain or async, returning one of:
//!
//! - `bool`: done when `true`;
//! - `Option<T>`: done with `T` when `Some`;
//! - `Result<T, E>`: done with `T` when `Ok`; the last `Err` is printed if
//!   the deadline passes, which says *why* it never held.
//!
//! ```text
//! eventually(Duration::from_secs(5), || sink.count() == 3).await;
//! let m = eventually(WAIT, async || {
//!     let (_, m) = daemon.get(&format!("/v1/messages/{id}")).await;
//!     (m["state"] == "sent").then_some(m)
//! })
//! .await;
//! ```

use std::fmt::{Debug, Display};
use std::future::Future;
use std::panic::Location;
use std::time::{Duration, Instant};

/// How often a condition is checked: short enough not to slow a test down,
/// long enough not to load the 2-core machines the suites run on.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `condition` every [`POLL_INTERVAL`] until it holds and returns its
/// value; panics, naming the caller's line, when `timeout` passes first. A
/// check that itself hangs counts against the same deadline.
#[track_caller]
pub fn eventually<M, C: Condition<M>>(
    timeout: Duration,
    condition: C,
) -> impl Future<Output = C::Value> {
    let at = Location::caller();
    poll(timeout, format!("the condition at {at}"), condition)
}

/// [`eventually`] with a description of what is awaited, for the panic
/// message ("timed out after 5s waiting for message 42 to be sent").
#[track_caller]
pub fn eventually_msg<M, C: Condition<M>>(
    timeout: Duration,
    what: impl Display,
    condition: C,
) -> impl Future<Output = C::Value> {
    let at = Location::caller();
    poll(timeout, format!("{what} (at {at})"), condition)
}

/// A port that was free on 127.0.0.1 a moment ago: bound, read, released.
/// Another process may take it in between; the harness accepts that small
/// race to hand the daemon a port it can be configured with up front.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port on 127.0.0.1: {e}"))
}

/// What a condition's closure may return; see the module docs.
pub trait Ready {
    /// What [`eventually`] returns once the condition holds.
    type Value;
    /// `Ok` when the condition holds; otherwise why not, when known.
    fn into_ready(self) -> Result<Self::Value, Option<String>>;
}

impl Ready for bool {
    type Value = ();
    fn into_ready(self) -> Result<(), Option<String>> {
        if self {
            Ok(())
        } else {
            Err(None)
        }
    }
}

impl<T> Ready for Option<T> {
    type Value = T;
    fn into_ready(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Debug> Ready for Result<T, E> {
    type Value = T;
    fn into_ready(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(format!("{e:?}")))
    }
}

/// A condition [`eventually`] can poll: any `FnMut() -> R` or
/// `AsyncFnMut() -> R` where `R:` [`Ready`]. `M` is [`PlainCheck`] or
/// [`AsyncCheck`] and is inferred; it only keeps the two blanket impls apart.
pub trait Condition<M> {
    type Value;
    fn check(&mut self) -> impl Future<Output = Result<Self::Value, Option<String>>>;
}

/// Marker of conditions that are plain closures.
pub enum PlainCheck {}
/// Marker of conditions that are async closures (or closures returning a
/// future).
pub enum AsyncCheck {}

impl<F, R> Condition<PlainCheck> for F
where
    F: FnMut() -> R,
    R: Ready,
{
    type Value = R::Value;
    async fn check(&mut self) -> Result<R::Value, Option<String>> {
        self().into_ready()
    }
}

impl<F, R> Condition<AsyncCheck> for F
where
    F: AsyncFnMut() -> R,
    R: Ready,
{
    type Value = R::Value;
    async fn check(&mut self) -> Result<R::Value, Option<String>> {
        self().await.into_ready()
    }
}

async fn poll<M, C: Condition<M>>(timeout: Duration, what: String, mut condition: C) -> C::Value {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, condition.check()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(why)) => last = why.or(last),
            Err(_) => panic!("timed out after {timeout:?} waiting for {what}: a check was still running at the deadline"),
        }
        if Instant::now() >= deadline {
            match last {
                Some(why) => panic!("timed out after {timeout:?} waiting for {what}; last: {why}"),
                None => panic!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn sync_and_async_conditions_return_their_value() {
        let n = AtomicUsize::new(0);
        eventually(Duration::from_secs(5), || {
            n.fetch_add(1, Ordering::SeqCst) >= 3
        })
        .await;
        assert!(n.load(Ordering::SeqCst) >= 4);
        let v = eventually(Duration::from_secs(5), async || {
            let k = n.fetch_add(1, Ordering::SeqCst);
            (k >= 6).then_some(k * 10)
        })
        .await;
        assert!(v >= 60);
        let r: u8 = eventually(Duration::from_secs(5), || {
            if n.fetch_add(1, Ordering::SeqCst) >= 8 {
                Ok(7)
            } else {
                Err("not yet")
            }
        })
        .await;
        assert_eq!(r, 7);
    }

    #[tokio::test]
    #[should_panic(expected = "never true")]
    async fn a_condition_that_never_holds_panics_with_the_description() {
        eventually_msg(Duration::from_millis(100), "never true", || false).await;
    }

    #[tokio::test]
    #[should_panic(expected = "last: \"still 503\"")]
    async fn the_last_error_is_reported() {
        eventually(Duration::from_millis(100), || Err::<(), _>("still 503")).await;
    }

    #[tokio::test]
    #[should_panic(expected = "still running at the deadline")]
    async fn a_hanging_check_is_bounded_too() {
        eventually(Duration::from_millis(100), async || {
            std::future::pending::<()>().await;
            true
        })
        .await;
    }
}
