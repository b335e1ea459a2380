//! Child processes under test: signals, bounded waits for their exit, and the tail of their log for panic messages.

use std::io;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// How often a waited-for child is checked for its exit.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// How much of a log a failure prints: enough for the last start-up and the
/// error, short enough to read in a test report.
const TAIL_LINES: usize = 120;

/// Sends `sig` (e.g. `libc::SIGTERM`, `libc::SIGHUP`) to process `pid`.
#[allow(unsafe_code)]
pub fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    // SAFETY: kill(2) takes two integers and touches no memory of this
    // process; any pair is memory-safe, the worst outcome is an error code.
    // Using it avoids depending on a `kill` binary being installed.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits for `child` to exit for at most `limit` without blocking the async
/// runtime (servers of the same test may be serving the child meanwhile).
/// `None` when it is still running.
pub async fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(EXIT_POLL).await;
    }
}

/// SIGKILL and reap, as `kill -9`. Through std, which sends nothing to a
/// child already reaped (its pid may belong to another process by now).
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `sig` to `child` unless it has exited; returns its exit status
/// when it has.
pub fn signal_child(child: &mut Child, sig: libc::c_int) -> io::Result<Option<ExitStatus>> {
    if let Some(status) = child.try_wait()? {
        return Ok(Some(status));
    }
    // Not reaped (try_wait just said so), so the pid is still this child's.
    signal(child.id(), sig).map(|()| None)
}

/// SIGTERM to `child`, then waits (at most `limit`, without blocking the
/// async runtime) for its exit status; on timeout kills it with SIGKILL
/// and panics. For children a test spawns itself (a relay, a second
/// `outboxd`); [`Daemon::terminate`](crate::Daemon::terminate) does this
/// for the daemon.
pub async fn terminate(child: &mut Child, limit: Duration) -> ExitStatus {
    match signal_child(child, libc::SIGTERM) {
        Ok(None) => {}
        Ok(Some(status)) => return status,
        Err(e) => panic!("SIGTERM to process {}: {e}", child.id()),
    }
    match wait_exit(child, limit).await {
        Some(status) => status,
        None => {
            kill9(child);
            panic!(
                "process {} did not exit within {limit:?} of SIGTERM",
                child.id()
            );
        }
    }
}

/// The last lines of the file at `path` (empty when it cannot be read).
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(TAIL_LINES);
    let mut out = String::new();
    if skip > 0 {
        out.push_str(&format!("[... {skip} earlier lines ...]\n"));
    }
    for l in &lines[skip..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}
