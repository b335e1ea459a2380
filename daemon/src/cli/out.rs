//! The CLI's standard output. A reader that goes away early (`outbox status
//! | head -1`) is not the command's failure: the rest of the output is
//! dropped without a word, and the command ends as it would have, with its
//! usual exit status (the operation asked of the daemon happened or not
//! regardless of who read the answer). Any other write error is reported
//! once on standard error and makes the exit status 1.
//!
//! Every line the CLI prints goes through [`write`], by the `out!` and
//! `outln!` macros; `print!` would panic on a closed pipe.

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;

/// Standard output's state for the whole process.
static STDOUT: Mutex<Sink> = Mutex::new(Sink::new());

/// Writes `args` to standard output, or nothing once it is closed.
pub fn write(args: fmt::Arguments<'_>) {
    let mut sink = STDOUT.lock().unwrap_or_else(|p| p.into_inner());
    sink.write(&mut io::stdout().lock(), args);
}

/// Flushes standard output (output without a final newline may still be
/// buffered) and tells whether everything written went out or was dropped
/// for a closed pipe; false after any other write error.
pub fn finish() -> bool {
    let mut sink = STDOUT.lock().unwrap_or_else(|p| p.into_inner());
    sink.flush(&mut io::stdout().lock());
    !sink.failed
}

/// What became of the writes so far.
#[derive(Debug, PartialEq, Eq)]
struct Sink {
    /// The reader is gone, or writing failed: later output is dropped.
    closed: bool,
    /// Writing failed for a reason other than a closed pipe.
    failed: bool,
}

impl Sink {
    const fn new() -> Sink {
        Sink {
            closed: false,
            failed: false,
        }
    }

    fn write(&mut self, w: &mut impl Write, args: fmt::Arguments<'_>) {
        if !self.closed {
            let result = w.write_fmt(args);
            self.outcome(result);
        }
    }

    fn flush(&mut self, w: &mut impl Write) {
        if !self.closed {
            let result = w.flush();
            self.outcome(result);
        }
    }

    fn outcome(&mut self, result: io::Result<()>) {
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => self.closed = true,
            Err(e) => {
                eprintln!("outbox: cannot write to standard output: {e}");
                self.closed = true;
                self.failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that fails every call with `kind`, counting the calls.
    struct Failing {
        kind: io::ErrorKind,
        calls: usize,
    }

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            Err(self.kind.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            self.calls += 1;
            Err(self.kind.into())
        }
    }

    #[test]
    fn a_closed_pipe_ends_the_output_quietly() {
        let mut sink = Sink::new();
        let mut pipe = Failing {
            kind: io::ErrorKind::BrokenPipe,
            calls: 0,
        };
        sink.write(&mut pipe, format_args!("NAME  STATE\n"));
        sink.write(&mut pipe, format_args!("acme  active\n"));
        sink.flush(&mut pipe);
        assert_eq!(pipe.calls, 1, "nothing is written after the pipe closed");
        assert_eq!(
            sink,
            Sink {
                closed: true,
                failed: false
            }
        );
    }

    #[test]
    fn other_write_errors_fail_the_command() {
        let mut sink = Sink::new();
        let mut disk = Failing {
            kind: io::ErrorKind::StorageFull,
            calls: 0,
        };
        sink.write(&mut disk, format_args!("line\n"));
        sink.write(&mut disk, format_args!("line\n"));
        assert_eq!(disk.calls, 1);
        assert!(sink.failed);
    }

    #[test]
    fn output_goes_through_while_the_reader_reads() {
        let mut sink = Sink::new();
        let mut buf = Vec::new();
        sink.write(&mut buf, format_args!("a {}\n", 1));
        sink.flush(&mut buf);
        assert_eq!(buf, b"a 1\n");
        assert_eq!(sink, Sink::new());
    }
}
