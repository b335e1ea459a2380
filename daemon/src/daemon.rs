//! The daemon's life: open the store, apply the files, listen, dispatch,
//! and stop cleanly when `shutdown` completes.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{self, App};
use crate::catalog::Catalog;
use crate::config::{Config, LogFormat};
use crate::queue::Queue;
use crate::store::Store;

/// Sets up tracing to stderr in the configured format.
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: the journal and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Why the daemon could not start: bad apply files are a configuration
/// problem (exit 2); the rest are operational (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Runs the daemon until `shutdown` completes. `ready` is called once the
/// store is open and the API listens.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(&Arc<App>),
) -> Result<(), StartError> {
    // Before any port is bound: a counter recorded before the recorder
    // exists is lost, and a client may enqueue as soon as the API listens.
    crate::telemetry::install();
    let store = {
        let dir = config.data_dir.clone();
        let cache = config.cache_capacity;
        match tokio::task::spawn_blocking(move || Store::open(&dir, cache))
            .await
            .context("store open task")?
        {
            Ok(store) => store,
            // A store from a newer Outbox will not open by restarting: exit
            // as a configuration problem so systemd does not loop on it.
            Err(e @ crate::store::StoreError::TooNew { .. }) => {
                return Err(StartError::Config(e.to_string()))
            }
            Err(e) => return Err(StartError::Other(e.into())),
        }
    };
    let catalog = store.load_catalog().context("loading the catalog")?;
    let queue = Queue::open(&store).context("loading the queue")?;
    let token = app::api_token(&config, &config.data_dir)?;
    let app = Arc::new(App::new(config, store, queue, token, catalog));

    let texts =
        app::read_apply_files(&app.config).map_err(|e| StartError::Config(e.to_string()))?;
    if !texts.is_empty() {
        let changes = app
            .apply_texts(&texts)
            .await
            .map_err(|e| StartError::Config(format!("apply files: {e}")))?;
        tracing::info!(
            files = texts.len(),
            changed = changes.len(),
            "applied integration files"
        );
    }

    let stranded = app.connections_without_mid_server(&app.mid_server_names());
    if !stranded.is_empty() {
        tracing::warn!(connections = ?stranded, "these connections go through a MID server this daemon is not configured for: their messages wait until it is added to [mid_servers]");
    }
    let tunnel = match &app.config.tunnel {
        Some(t) => Some(crate::tunnel::endpoint(t)?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(app.config.api.listen)
        .await
        .with_context(|| format!("api.listen {}: cannot listen", app.config.api.listen))?;
    if let Some(inbound) = app.config.inbound {
        // The section is part of the file format (SPEC §5) and validated,
        // but this version serves no inbound endpoint: say so rather than
        // let an operator believe remote systems can send here.
        tracing::warn!(%inbound, "inbound.listen is set, but this version of outboxd does not serve inbound requests; nothing listens there");
    }
    let (queued, _, errors) = app.queue.totals();
    tracing::info!(
        api = %app.config.api.listen,
        data_dir = %app.config.data_dir.display(),
        instance_name = %app.config.instance_name,
        queued,
        errors,
        "outboxd is up"
    );

    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let workers = TaskTracker::new();
    tasks.spawn(crate::api::serve(listener, app.clone(), stop.clone()));
    if let Some(endpoint) = tunnel {
        tracing::info!(tunnel = %endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(), "tunnel listening for relays");
        app.relays.set_tokens(app.config.mid_servers.clone());
        app.relays.set_endpoint(endpoint.clone());
        tasks.spawn(crate::tunnel::serve(
            endpoint,
            app.relays.clone(),
            app.relay_connected.clone(),
            stop.clone(),
        ));
    }
    let dispatch_stop = CancellationToken::new();
    tasks.spawn(crate::dispatch::run(
        app.clone(),
        dispatch_stop.clone(),
        workers.clone(),
    ));
    tasks.spawn(crate::dispatch::prune(app.clone(), stop.clone()));
    tasks.spawn(crate::telemetry::upkeep(stop.clone()));
    ready(&app);
    notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = spawn_watchdog();

    shutdown.await;
    notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(grace = ?app.config.shutdown_grace, "stopping: no new messages; waiting for attempts in flight");
    // Enqueues now get 503 while the API keeps answering; dispatch takes no
    // new work; attempts in flight get the grace period to finish.
    app.queue.close();
    dispatch_stop.cancel();
    workers.close();
    let drained = tokio::time::timeout(app.config.shutdown_grace, workers.wait()).await;
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(std::time::Duration::from_secs(2), tasks.wait())
        .await
        .is_err()
    {
        tracing::debug!("api connections still open at exit");
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    if drained.is_err() {
        // Whatever is still in flight is queued on disk already (sending is
        // never written), so it goes out again after the restart.
        tracing::warn!(
            in_flight = app.queue.in_flight_total(),
            "grace period over; attempts still in flight will be made again after restart"
        );
    }
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || store.flush())
        .await
        .context("final flush task")?
        .context("final flush")?;
    tracing::info!("outboxd stopped");
    Ok(())
}

/// Reloads on each message of `hup` (SIGHUP): reads the config file again
/// and re-applies the `apply` files. A bad config or file is logged and the
/// running state kept; no queued message is touched either way. Settings
/// that only take effect at start (listen addresses, data dir) are reported.
pub fn spawn_reloader(
    app: &Arc<App>,
    config_path: Option<std::path::PathBuf>,
    mut hup: tokio::sync::mpsc::Receiver<()>,
) {
    let app = app.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            reload(&app, config_path.as_deref()).await;
        }
    });
}

async fn reload(app: &Arc<App>, config_path: Option<&std::path::Path>) {
    notify(&[sd_notify::NotifyState::Reloading]);
    reload_inner(app, config_path).await;
    notify(&[sd_notify::NotifyState::Ready]);
}

async fn reload_inner(app: &Arc<App>, config_path: Option<&std::path::Path>) {
    tracing::info!("reloading configuration");
    let new = match Config::load(config_path, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: invalid configuration; the running configuration stays");
            return;
        }
    };
    let texts = match app::read_apply_files(&new) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %one_line(&e.to_string()), "reload refused: the running configuration stays");
            return;
        }
    };
    let old = &app.config;
    let mut restart = Vec::new();
    if new.api.listen != old.api.listen {
        restart.push("api.listen");
    }
    if new.data_dir != old.data_dir {
        restart.push("data_dir");
    }
    if new.instance_name != old.instance_name {
        restart.push("instance_name");
    }
    if new.mid_servers.keys().ne(old.mid_servers.keys()) {
        // The files are applied below against the names in use; checked
        // here as the next start would check them, a MID server removed
        // that a file still uses would stop that start.
        let names = new.mid_servers.keys().cloned().collect();
        if let Err(e) = app::apply_all(&mut Catalog::default(), &texts, &names) {
            tracing::error!(error = %one_line(&e.to_string()), "reload refused: outboxd would not start with this configuration; the running configuration stays");
            return;
        }
        restart.push("mid_servers (names)");
        let stranded = app.connections_without_mid_server(&names);
        if !stranded.is_empty() {
            tracing::warn!(connections = ?stranded, "these connections go through a MID server the new configuration lacks: after a restart their messages wait until it is configured again");
        }
    }
    if new.tunnel.as_ref().map(|t| t.listen) != old.tunnel.as_ref().map(|t| t.listen) {
        restart.push("tunnel");
    }
    if !restart.is_empty() {
        tracing::warn!(keys = ?restart, "these settings changed and take effect at the next restart");
    }
    // A rotated token and a renewed certificate take effect with the rest,
    // for the relays that connect from then on; relays connected already
    // stay. The names stay those of the start (a name removed keeps its
    // token). Made ready first: nothing changes unless all of it can.
    let tunnel = match (&new.tunnel, &old.tunnel) {
        (Some(tunnel), Some(_)) => match crate::tunnel::server_config(tunnel) {
            Ok(server) => Some(server),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "reload refused: the tunnel's certificate cannot be used; the running configuration stays");
                return;
            }
        },
        _ => None,
    };
    match app.apply_texts(&texts).await {
        Ok(changes) => {
            app.clients.clear();
            app.tokens.clear();
            if let Some(server) = tunnel {
                let tokens = old.mid_servers.iter().map(|(name, mid)| {
                    (
                        name.clone(),
                        new.mid_servers.get(name).unwrap_or(mid).clone(),
                    )
                });
                let rotated = app.relays.set_tokens(tokens);
                if !rotated.is_empty() {
                    tracing::info!(mid_servers = ?rotated, "new token(s): relays connecting from now on must present them; relays connected already stay");
                }
                app.relays.set_server_config(server);
            }
            tracing::info!(files = texts.len(), changed = changes.len(), "reloaded");
        }
        Err(e) => {
            tracing::error!(error = %one_line(&e.to_string()), "reload refused: the running integrations stay")
        }
    }
}

/// An error of several lines (an integration file's problems) on one log
/// line.
fn one_line(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(line);
    }
    out
}

/// Tells systemd (when it started us with `Type=notify`) where we are.
/// Without `$NOTIFY_SOCKET` this does nothing.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Pings systemd's watchdog at half the unit's `WatchdogSec`, when set.
fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    // As libsystemd's sd_watchdog_enabled: WATCHDOG_USEC asks for pings;
    // WATCHDOG_PID, when set, must name this process.
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&u| u > 0)?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let period = std::time::Duration::from_micros(usec / 2);
    Some(tokio::spawn(async move {
        loop {
            notify(&[sd_notify::NotifyState::Watchdog]);
            tokio::time::sleep(period).await;
        }
    }))
}
