//! `outbox`: the command-line client of the Outbox daemon.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    outbox_daemon::cli::main(outbox_daemon::cli::Cli::parse())
}
