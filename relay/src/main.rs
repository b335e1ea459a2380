//! `outbox-relay`: parses arguments, validates the config, sets up logging
//! and signals, and runs the relay.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use futures::StreamExt;
use outbox_relay::Config;
use signal_hook::consts::{SIGINT, SIGTERM};

/// mimalloc: every request allocates and frees its frames, hyper buffers
/// and QUIC packets on two threads, and glibc's allocator was an eighth of
/// the relay's CPU in the benchmark (`deploy/bench.sh`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The Outbox MID server: dials out to outboxd over QUIC and performs its
/// requests inside this network.
#[derive(Parser)]
#[command(name = "outbox-relay", version)]
struct Args {
    /// The relay's TOML configuration.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// Validate the configuration and exit: 0 valid, 2 invalid.
    #[arg(long)]
    check_config: bool,
}

/// mimalloc asks for transparent huge pages for its arenas, so a thread's
/// first allocation makes 2 MiB resident: 10 MiB of an idle relay. The
/// process opts out before anything allocates, from a constructor (`main`
/// is too late: the runtime has allocated by then), and the relay keeps
/// mimalloc's speed at glibc's idle size.
#[used]
#[allow(unsafe_code)]
// `link_section` places a constructor; it is a plain safe function.
// Priority 100 sorts after std's own (99, which only records argv) and
// before mimalloc's (101 when its C is built by clang; unprioritized
// constructors run after all of these).
#[link_section = ".init_array.00100"]
static NO_HUGE_PAGES: extern "C" fn() = no_huge_pages;

extern "C" fn no_huge_pages() {
    // Without the flag the relay still works, only larger at idle.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outbox-relay: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        for warning in config.warnings() {
            eprintln!("outbox-relay: warning: {warning}");
        }
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: the journal and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if config.log_json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    // Two workers: the relay's work is I/O; it should stay small on the
    // host it shares with others.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT])?;
        let shutdown = async move {
            if let Some(signal) = signals.next().await {
                tracing::info!(signal, "shutdown requested");
            }
        };
        outbox_relay::run(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}
