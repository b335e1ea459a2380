//! `outboxd`: the Outbox daemon. Parses arguments, loads the config, sets up
//! logging and signals, and hands over to `outbox_daemon::daemon::run`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use futures::StreamExt;
use outbox_daemon::config::Config;
use outbox_daemon::daemon::{self, StartError};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// mimalloc: under load the daemon frees many small store nodes from several
/// threads, and glibc's allocator lock showed up as most of its context
/// switches in the benchmark (`deploy/bench.sh`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc asks for transparent huge pages for its arenas, which made
/// 43 MiB of an idle daemon's 52 MiB resident. The process opts out before
/// anything allocates, from a constructor (`main` is too late: the runtime
/// has allocated by then).
#[used]
#[allow(unsafe_code)]
// `link_section` places a constructor; it is a plain safe function.
// Priority 100 sorts after std's own (99, which only records argv) and
// before mimalloc's (101 when its C is built by clang; unprioritized
// constructors run after all of these).
#[link_section = ".init_array.00100"]
static NO_HUGE_PAGES: extern "C" fn() = no_huge_pages;

extern "C" fn no_huge_pages() {
    // Without the flag the daemon still works, only larger.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

/// The Outbox daemon: keeps messages durably and delivers each one through
/// its integration's active connection.
#[derive(Parser)]
#[command(name = "outboxd", version)]
struct Args {
    /// TOML configuration file; without it the daemon runs on its defaults.
    /// Every key can be overridden as OUTBOX_<SECTION>__<KEY>.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration (and the integration files it applies),
    /// print the result and exit: 0 valid, 2 invalid.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(args.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("outboxd: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        return match outbox_daemon::app::check_apply_files(&config) {
            Ok(n) => {
                println!("configuration is valid ({n} integration file(s))");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("outboxd: invalid configuration: {e}");
                ExitCode::from(2)
            }
        };
    }
    daemon::init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("outboxd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config_path = args.config.clone();
    let result = runtime.block_on(async move {
        let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP])
            .map_err(|e| StartError::Other(e.into()))?;
        let (hup_tx, hup_rx) = tokio::sync::mpsc::channel::<()>(1);
        let shutdown = async move {
            while let Some(signal) = signals.next().await {
                match signal {
                    SIGHUP => {
                        let _ = hup_tx.try_send(());
                    }
                    _ => {
                        tracing::info!(signal, "shutdown requested");
                        break;
                    }
                }
            }
        };
        daemon::run(config, shutdown, move |app| {
            daemon::spawn_reloader(app, config_path, hup_rx);
        })
        .await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::Config(e)) => {
            eprintln!("outboxd: invalid configuration: {e}");
            ExitCode::from(2)
        }
        Err(StartError::Other(e)) => {
            eprintln!("outboxd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
