//! The `outbox` command-line client. It talks to the daemon's API only; it
//! never opens the store.
//!
//! Exit status: 0 on success, 1 when the daemon refuses the operation (or
//! cannot be reached), 2 on bad usage. A reader that stops reading early
//! changes none of these (see [`out`]).

/// `print!` to standard output through [`out::write`], which ends the
/// output quietly when the reader has gone (`outbox status | head -1`).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::out::write(format_args!($($arg)*))
    };
}

/// `println!` through [`out::write`].
macro_rules! outln {
    () => {
        $crate::cli::out::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

mod client;
mod integrations;
mod messages;
mod out;
mod pki;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use client::ApiClient;

#[derive(Parser)]
#[command(
    name = "outbox",
    version,
    about = "Manage Outbox: integrations, connections and messages"
)]
pub struct Cli {
    /// The daemon's API [default: $OUTBOX_API or http://127.0.0.1:8425]
    #[arg(long, global = true, value_name = "URL")]
    pub api: Option<String>,
    /// API token [default: $OUTBOX_TOKEN, else the daemon's generated token file]
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Print JSON for scripts instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply an integration file (declarative, idempotent)
    Apply {
        /// The file ('-' for standard input)
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: String,
    },
    /// Print every integration, connection and profile as an integration file
    Export,
    /// List integrations
    Integrations,
    /// List connections, of one integration or of all
    Connections { integration: Option<String> },
    /// Activate an integration (I) or a connection (I/C)
    Activate { target: String },
    /// Deactivate an integration (I) or a connection (I/C)
    Deactivate { target: String },
    /// Hold an integration's messages
    Pause { integration: String },
    /// Let a paused integration's messages go again
    Resume { integration: String },
    /// Replay every message of an integration that is in error, in order
    Repair { integration: String },
    /// Test a connection: HEAD, then GET if HEAD failed
    Test {
        /// INTEGRATION/CONNECTION
        target: String,
    },
    /// Enqueue a message
    Send {
        integration: String,
        /// Message type
        message: String,
        /// Body: @FILE, '-' for standard input, or the text itself
        #[arg(long)]
        body: Option<String>,
        /// Template parameter K=V (repeatable)
        #[arg(long = "param", value_name = "K=V")]
        params: Vec<String>,
        #[arg(long)]
        ordering_key: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// List messages, newest first
    Messages {
        #[arg(long)]
        integration: Option<String>,
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one message with every attempt
    Message { id: String },
    /// Replay a message: a copy takes its place in the order
    Replay { id: String },
    /// Ignore a message and release the ones waiting behind it
    Ignore { id: String },
    /// Connected MID servers (relays)
    MidServers,
    /// One summary of integrations, queues and errors
    Status,
    /// Markdown documentation of every integration and connection
    Docs,
    /// Public key infrastructure for the relay tunnel
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Write a CA, a daemon certificate and key, a relay token and config
    /// snippets into DIR
    Init {
        dir: PathBuf,
        /// Host names and addresses relays use to reach the daemon
        #[arg(long = "host", value_name = "NAME", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
        /// The MID server name the relay token is for
        #[arg(long, default_value = "dc1")]
        mid_server: String,
    },
}

/// A failure: refused by the daemon (exit 1) or bad usage (exit 2).
#[derive(Debug)]
pub enum CliError {
    Refused(String),
    Usage(String),
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Refused(format!("{e:#}"))
    }
}

pub type CliResult = Result<(), CliError>;

/// Runs the CLI and returns its exit status.
pub fn main(cli: Cli) -> ExitCode {
    let result = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => Err(CliError::Refused(format!("cannot start: {e}"))),
    };
    // After a write error other than a closed pipe, the output is
    // incomplete: the command did not do all it was asked.
    let written = out::finish();
    match result {
        Ok(()) if written => ExitCode::SUCCESS,
        Ok(()) => ExitCode::from(1),
        Err(CliError::Refused(e)) => {
            eprintln!("outbox: {e}");
            ExitCode::from(1)
        }
        Err(CliError::Usage(e)) => {
            eprintln!("outbox: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> CliResult {
    if let Command::Pki {
        command:
            PkiCommand::Init {
                dir,
                hosts,
                mid_server,
            },
    } = &cli.command
    {
        return pki::init(dir, hosts, mid_server);
    }
    let api = ApiClient::new(cli.api.clone(), cli.token.clone())?;
    let json = cli.json;
    match cli.command {
        Command::Apply { file } => integrations::apply(&api, json, &file).await,
        Command::Export => integrations::export(&api).await,
        Command::Integrations => integrations::list(&api, json).await,
        Command::Connections { integration } => {
            integrations::connections(&api, json, integration.as_deref()).await
        }
        Command::Activate { target } => integrations::toggle(&api, json, &target, "activate").await,
        Command::Deactivate { target } => {
            integrations::toggle(&api, json, &target, "deactivate").await
        }
        Command::Pause { integration } => {
            integrations::action(&api, json, &integration, "pause").await
        }
        Command::Resume { integration } => {
            integrations::action(&api, json, &integration, "resume").await
        }
        Command::Repair { integration } => messages::repair(&api, json, &integration).await,
        Command::Test { target } => integrations::test(&api, json, &target).await,
        Command::Send {
            integration,
            message,
            body,
            params,
            ordering_key,
            idempotency_key,
        } => {
            messages::send(
                &api,
                json,
                messages::SendArgs {
                    integration,
                    message,
                    body,
                    params,
                    ordering_key,
                    idempotency_key,
                },
            )
            .await
        }
        Command::Messages {
            integration,
            state,
            limit,
        } => messages::list(&api, json, integration.as_deref(), state.as_deref(), limit).await,
        Command::Message { id } => messages::show(&api, json, &id).await,
        Command::Replay { id } => messages::act(&api, json, &id, "replay").await,
        Command::Ignore { id } => messages::act(&api, json, &id, "ignore").await,
        Command::MidServers => integrations::mid_servers(&api, json).await,
        Command::Status => integrations::status(&api, json).await,
        Command::Docs => {
            let text = api.get_text("/v1/docs").await?;
            out!("{text}");
            Ok(())
        }
        Command::Pki { .. } => Ok(()),
    }
}

/// Splits `I/C` (or `I`).
fn split_target(target: &str) -> Result<(&str, Option<&str>), CliError> {
    match target.split_once('/') {
        None if !target.is_empty() => Ok((target, None)),
        Some((i, c)) if !i.is_empty() && !c.is_empty() && !c.contains('/') => Ok((i, Some(c))),
        _ => Err(CliError::Usage(format!(
            "{target:?} is not INTEGRATION or INTEGRATION/CONNECTION"
        ))),
    }
}

/// Where the daemon writes its generated token, in the order looked at.
fn token_files() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("OUTBOX_DATA_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from(crate::config::defaults::DATA_DIR));
    // systemd's StateDirectory=outbox.
    dirs.push(PathBuf::from("/var/lib/outbox"));
    dirs.into_iter()
        .map(|d| d.join(crate::config::TOKEN_FILE))
        .collect()
}
