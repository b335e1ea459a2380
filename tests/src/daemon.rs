//! A real `outboxd` on a free loopback port and a temporary data dir, and the ways a test talks to it: its HTTP API, the `outbox` CLI, signals.
//!
//! ```text
//! let d = Daemon::builder()
//!     .instance_name("acme-dev")
//!     .config_toml("[log]\nlevel = \"debug\"")
//!     .env("ACME_PW", "secret")
//!     .start()
//!     .await;
//! let (status, body) = d.get("/v1/integrations").await;
//! ```
//!
//! The process's stdout and stderr go to `outboxd.log` in the temporary
//! directory; its tail is printed when a start fails and when a test panics
//! while the daemon is alive. Dropping the [`Daemon`] kills the process and
//! deletes the directory.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::bins::bin;
use crate::process::{self, log_tail};

/// The API token the harness configures unless told otherwise.
pub const DEFAULT_TOKEN: &str = "e2e-token";
/// The instance name the harness configures unless told otherwise.
pub const DEFAULT_INSTANCE_NAME: &str = "outbox-e2e";
/// Logging detailed enough to debug a failed test from its log tail,
/// without hyper's and sled's chatter.
pub const DEFAULT_LOG_LEVEL: &str = "info,outbox_daemon=debug";

/// How long a start may take before the test fails: generous, as the
/// machines running the suites have 2 cores and other builds.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `terminate` waits after SIGTERM: above the daemon's shutdown
/// grace period (SPEC §10) with margin.
pub const TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);
/// A bound on each API request and CLI run, so a wedged daemon fails the
/// test instead of hanging it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a starting daemon is asked for `/healthz`.
const HEALTH_POLL: Duration = Duration::from_millis(20);

/// Builds the config of a [`Daemon`] and starts it.
pub struct DaemonBuilder {
    instance_name: String,
    token: String,
    log_level: String,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    apply: Vec<PathBuf>,
}

/// A running (or stopped) `outboxd` with its temporary directory, which
/// holds the config file, the log and the data dir, and survives restarts.
pub struct Daemon {
    /// The temporary directory; [`dir`](Self::dir) is the usual way to it.
    /// Public for suites that still write `d.dir.path()`.
    dir: tempfile::TempDir,
    port: u16,
    token: String,
    config_path: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    api: ApiClient,
    starts: u32,
    /// A panic message already carried the log tail; Drop need not repeat it.
    log_shown: bool,
}

/// A cheap, cloneable client of one daemon's API (its URL and token), for
/// producers spawned as `'static` tasks; [`Daemon::api_client`] makes one.
/// Its connection pool is its own: after a restart, take a fresh one.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// An API response.
#[derive(Clone, Debug)]
pub struct ApiReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl ApiReply {
    /// The body as JSON: `Value::Null` when empty, the text as a
    /// `Value::String` when it is not JSON (a test of bad input must not
    /// panic on a plain-text answer).
    pub fn json(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body).unwrap_or_else(|_| Value::String(self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Daemon {
    /// Defaults: instance name [`DEFAULT_INSTANCE_NAME`], token
    /// [`DEFAULT_TOKEN`], log level [`DEFAULT_LOG_LEVEL`] in text format.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            instance_name: DEFAULT_INSTANCE_NAME.into(),
            token: DEFAULT_TOKEN.into(),
            log_level: DEFAULT_LOG_LEVEL.into(),
            extra: Vec::new(),
            env: Vec::new(),
            apply: Vec::new(),
        }
    }
}

impl DaemonBuilder {
    /// The daemon's `instance_name`, which the instance guard compares.
    pub fn instance_name(mut self, name: &str) -> Self {
        self.instance_name = name.into();
        self
    }

    /// The literal `[api] token`.
    pub fn token(mut self, token: &str) -> Self {
        self.token = token.into();
        self
    }

    /// `[log] level` (tracing filter syntax).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.into();
        self
    }

    /// More TOML for the config file. It is merged into the harness's own
    /// keys (top-level keys stay top-level; `[api]` or `[log]` here extend
    /// or override those sections; later calls win). Text that is not valid
    /// TOML is appended verbatim, so a test can hand the daemon a broken
    /// file.
    pub fn config_toml(mut self, toml: &str) -> Self {
        self.extra.push(toml.into());
        self
    }

    /// An environment variable of the daemon process (secrets given as
    /// `{ env = "NAME" }`, `OUTBOX_*` overrides). Inherited `OUTBOX_*`
    /// variables are removed, so only these reach it.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// An integration file (or glob) for the config's `apply` list.
    pub fn apply_file(mut self, path: impl AsRef<Path>) -> Self {
        self.apply.push(path.as_ref().to_path_buf());
        self
    }

    /// Writes the config into a new temporary directory without starting
    /// the daemon; [`Daemon::restart`] starts it.
    pub fn prepare(self) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("outbox-e2e-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let port = crate::free_port();
        let config_path = dir.path().join("outboxd.toml");
        let text = self.render_config(&dir.path().join("data"), port);
        std::fs::write(&config_path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        Daemon {
            dir,
            port,
            api: ApiClient::new(port, &self.token),
            token: self.token,
            config_path,
            env: self.env,
            child: None,
            starts: 0,
            log_shown: false,
        }
    }

    /// Starts the daemon and waits (at most [`START_TIMEOUT`]) until
    /// `/healthz` answers 200; panics with the log tail when it exits or
    /// does not come up.
    pub async fn start(self) -> Daemon {
        let mut d = self.prepare();
        d.spawn_and_wait().await;
        d
    }

    /// `outboxd --config FILE --check-config`: the exit status and stderr,
    /// for configs that must be refused (exit 2, a message naming the key).
    pub fn run_check(self) -> (ExitStatus, String) {
        self.prepare().check_config()
    }

    /// Starts `outboxd` on a config that must be refused and returns its
    /// exit status and stderr; panics when it comes up instead, or is
    /// still running after [`START_TIMEOUT`].
    pub async fn start_expecting_failure(self) -> (ExitStatus, String) {
        let d = self.prepare();
        let stderr_path = d.dir.path().join("refused.stderr");
        let stderr = create(&stderr_path);
        let mut cmd = d.outboxd_command(&[]);
        cmd.stdout(Stdio::null()).stderr(stderr);
        let mut child = spawn(cmd, "outboxd");
        let deadline = Instant::now() + START_TIMEOUT;
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            let up = matches!(
                d.try_request(Method::GET, "/healthz", None, None, &[]).await,
                Ok(r) if r.status == StatusCode::OK
            );
            if up || Instant::now() >= deadline {
                process::kill9(&mut child);
                panic!(
                    "outboxd {} although its config should be refused:\n{}\nstderr:\n{}",
                    if up { "came up" } else { "kept running" },
                    d.config_text(),
                    log_tail(&stderr_path)
                );
            }
            tokio::time::sleep(HEALTH_POLL).await;
        };
        let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        (status, text)
    }

    fn render_config(&self, data_dir: &Path, port: u16) -> String {
        let mut api = toml::Table::new();
        api.insert("listen".into(), format!("127.0.0.1:{port}").into());
        api.insert("token".into(), self.token.clone().into());
        let mut log = toml::Table::new();
        log.insert("level".into(), self.log_level.clone().into());
        log.insert("format".into(), "text".into());
        let mut config = toml::Table::new();
        config.insert("instance_name".into(), self.instance_name.clone().into());
        config.insert("data_dir".into(), path_string(data_dir).into());
        config.insert("api".into(), api.into());
        config.insert("log".into(), log.into());
        let mut verbatim = String::new();
        for extra in &self.extra {
            match extra.parse::<toml::Table>() {
                Ok(table) => merge(&mut config, table),
                Err(_) => {
                    verbatim.push('\n');
                    verbatim.push_str(extra);
                    verbatim.push('\n');
                }
            }
        }
        if !self.apply.is_empty() {
            let apply = config
                .entry("apply")
                .or_insert_with(|| toml::Value::Array(Vec::new()));
            if let toml::Value::Array(list) = apply {
                list.extend(self.apply.iter().map(|p| path_string(p).into()));
            }
        }
        let text = toml::to_string(&config).expect("a TOML table serializes");
        format!("# written by outbox_tests::Daemon\n{text}{verbatim}")
    }
}

impl Daemon {
    /// `http://127.0.0.1:PORT`.
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The API token (`[api] token`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The temporary directory: config, log, data dir; a place for a test's
    /// integration files and certificates too.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's `data_dir` (the sled store).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The config file as written.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config_path).unwrap_or_default()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("outboxd.log")
    }

    /// Everything the daemon printed, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (an exited one is reaped).
    pub fn is_running(&mut self) -> bool {
        let running = match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        };
        if !running {
            self.child = None;
        }
        running
    }

    /// Sends `sig` (e.g. `libc::SIGHUP` to reload); panics when the daemon
    /// is not running.
    pub fn signal(&mut self, sig: libc::c_int) {
        let c = self.child.as_mut().expect("outboxd is not running");
        match process::signal_child(c, sig) {
            Ok(None) => {}
            Ok(Some(status)) => {
                self.log_shown = true;
                panic!(
                    "outboxd had already exited with {status}; log:\n{}",
                    log_tail(&self.log_path())
                )
            }
            Err(e) => panic!("signal {sig} to outboxd: {e}"),
        }
    }

    /// SIGKILL, as `kill -9`, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            process::kill9(&mut c);
        }
    }

    /// SIGTERM, then waits (at most [`TERMINATE_TIMEOUT`], without blocking
    /// the test's servers) for the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("outboxd is not running");
        match process::signal_child(&mut c, libc::SIGTERM) {
            Ok(None) => {}
            // It exited before the signal: that is its status.
            Ok(Some(status)) => return status,
            Err(e) => panic!("SIGTERM to outboxd: {e}"),
        }
        match process::wait_exit(&mut c, TERMINATE_TIMEOUT).await {
            Some(status) => status,
            None => {
                process::kill9(&mut c);
                self.log_shown = true;
                panic!(
                    "outboxd did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM; log:\n{}",
                    log_tail(&self.log_path())
                );
            }
        }
    }

    /// Waits (at most `timeout`) for the process to exit on its own, e.g.
    /// after a signal sent with [`signal`](Self::signal).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        let status = process::wait_exit(c, timeout).await;
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Starts the daemon again on the same config, data dir and port; a
    /// running one is stopped with SIGTERM first (use
    /// [`kill9`](Self::kill9) before, to restart after a crash).
    pub async fn restart(&mut self) {
        if self.child.is_some() {
            self.terminate().await;
        }
        self.spawn_and_wait().await;
    }

    /// `outboxd --config FILE --check-config` on this daemon's config.
    pub fn check_config(&self) -> (ExitStatus, String) {
        let stderr_path = self.dir.path().join("check.stderr");
        let mut cmd = self.outboxd_command(&["--check-config"]);
        cmd.stdout(Stdio::null()).stderr(create(&stderr_path));
        let mut child = spawn(cmd, "outboxd --check-config");
        let deadline = Instant::now() + START_TIMEOUT;
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if Instant::now() >= deadline {
                process::kill9(&mut child);
                panic!("outboxd --check-config did not exit within {START_TIMEOUT:?}");
            }
            // Nothing else of the test runs meanwhile: a config check
            // touches no server, so blocking this thread briefly is fine.
            std::thread::sleep(HEALTH_POLL);
        };
        (
            status,
            std::fs::read_to_string(&stderr_path).unwrap_or_default(),
        )
    }

    /// A cloneable client of this daemon's API, to move into spawned tasks.
    pub fn api_client(&self) -> ApiClient {
        self.api.clone()
    }

    /// An API request; `Err` with the reason when no response came back
    /// (within [`REQUEST_TIMEOUT`]).
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Bytes)>,
        headers: &[(&str, &str)],
    ) -> Result<ApiReply, String> {
        self.api
            .try_request(method, path, token, body, headers)
            .await
    }

    /// An API request with any token (or none), for tests of refusals;
    /// panics only when no response came back.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Bytes)>,
    ) -> (StatusCode, Value) {
        let what = format!("{method} {path}");
        let r = self
            .try_request(method, path, token, body, &[])
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        (r.status, r.json())
    }

    /// `GET path` with the token.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(Method::GET, path, Some(&self.token), None)
            .await
    }

    /// `GET path` with the token, the body as text (`/metrics`,
    /// `/v1/docs`, `/v1/export`).
    pub async fn get_text(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .try_request(Method::GET, path, Some(&self.token), None, &[])
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        (r.status, r.text())
    }

    /// `POST path` with a JSON body (a `Value` or a `&Value`) and the token.
    pub async fn post_json(
        &self,
        path: &str,
        body: impl std::borrow::Borrow<Value>,
    ) -> (StatusCode, Value) {
        let body = Bytes::from(body.borrow().to_string());
        self.post_body(path, "application/json", body, &[]).await
    }

    /// `POST path` with any body, content type and extra headers (e.g.
    /// `Ordering-Key`), and the token.
    pub async fn post_body(
        &self,
        path: &str,
        content_type: &str,
        body: Bytes,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let r = self
            .try_request(
                Method::POST,
                path,
                Some(&self.token),
                Some((content_type, body)),
                headers,
            )
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        (r.status, r.json())
    }

    /// `POST /v1/apply` with an integration file.
    pub async fn apply(&self, toml: &str) -> (StatusCode, Value) {
        self.post_body(
            "/v1/apply",
            "application/toml",
            Bytes::from(toml.to_string()),
            &[],
        )
        .await
    }

    /// `POST /v1/integrations/{integration}/messages` with a JSON envelope
    /// (`{"message", "body", "params", ...}`).
    pub async fn enqueue(&self, integration: &str, envelope: &Value) -> (StatusCode, Value) {
        self.post_json(
            &format!("/v1/integrations/{integration}/messages"),
            envelope,
        )
        .await
    }

    /// `GET /v1/messages/{id}`, which must answer 200.
    pub async fn message(&self, id: &str) -> Value {
        let (status, m) = self.get(&format!("/v1/messages/{id}")).await;
        assert_eq!(status, StatusCode::OK, "GET /v1/messages/{id}: {m}");
        m
    }

    /// Waits until message `id` is in `state` and returns it.
    pub async fn wait_for_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        crate::eventually_msg(timeout, format!("message {id} to be {state}"), async || {
            let m = self.message(id).await;
            if m["state"] == state {
                Ok(m)
            } else {
                Err(m)
            }
        })
        .await
    }

    /// Message `id` once it has an attempt, and that first attempt.
    pub async fn first_attempt(&self, id: &str, timeout: Duration) -> (Value, Value) {
        let m = crate::eventually_msg(timeout, format!("a first attempt of {id}"), async || {
            let m = self.message(id).await;
            m["attempts"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
                .then_some(m)
        })
        .await;
        let first = m["attempts"][0].clone();
        (m, first)
    }

    /// Runs `outbox --api URL --token T ARGS...` to completion (at most
    /// [`REQUEST_TIMEOUT`]). Async so that the test's sinks keep serving
    /// while the CLI has the daemon call them (`outbox test I/C`).
    pub async fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = self.cli_command(args);
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        match tokio::time::timeout(REQUEST_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("cannot run outbox {args:?}: {e}"),
            Err(_) => panic!("outbox {args:?} did not finish within {REQUEST_TIMEOUT:?}"),
        }
    }

    /// The `outbox` command for this daemon with `args`, to run with stdin
    /// or more environment; inherited `OUTBOX_*` variables are removed.
    pub fn cli_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bin("outbox"));
        cmd.args(["--api", &self.api_url(), "--token", &self.token])
            .args(args)
            .env("NO_COLOR", "1");
        for key in outbox_env_vars() {
            cmd.env_remove(key);
        }
        cmd
    }

    /// `outboxd --config FILE ARGS...` with the daemon's environment, not
    /// spawned.
    pub fn outboxd_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("outboxd"));
        cmd.arg("--config")
            .arg(&self.config_path)
            .args(args)
            .stdin(Stdio::null())
            .env("NO_COLOR", "1");
        for key in outbox_env_vars() {
            cmd.env_remove(key);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn spawn_and_wait(&mut self) {
        self.starts += 1;
        // A fresh pool: connections to a previous process are dead.
        self.api = ApiClient::new(self.port, &self.token);
        let log_path = self.log_path();
        let mut cmd = self.outboxd_command(&[]);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
        let _ = writeln!(log, "=== outbox_tests: start #{} ===", self.starts);
        cmd.stdout(log.try_clone().expect("log file handle"))
            .stderr(log);
        self.child = Some(spawn(cmd, "outboxd"));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                self.log_shown = true;
                panic!(
                    "outboxd exited with {status} while starting; config:\n{}\nlog:\n{}",
                    self.config_text(),
                    log_tail(&log_path)
                );
            }
            let health = self
                .try_request(Method::GET, "/healthz", None, None, &[])
                .await;
            if matches!(&health, Ok(r) if r.status == StatusCode::OK) {
                return;
            }
            if Instant::now() >= deadline {
                self.kill9();
                self.log_shown = true;
                panic!(
                    "outboxd did not answer /healthz with 200 within {START_TIMEOUT:?} (last: {}); log:\n{}",
                    match health {
                        Ok(r) => format!("{} {}", r.status, r.text()),
                        Err(e) => e,
                    },
                    log_tail(&log_path)
                );
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }
}

impl ApiClient {
    fn new(port: u16, token: &str) -> ApiClient {
        ApiClient {
            base: format!("http://127.0.0.1:{port}"),
            token: token.into(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// An API request, as [`Daemon::try_request`].
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Bytes)>,
        headers: &[(&str, &str)],
    ) -> Result<ApiReply, String> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = token {
            b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = match body {
            Some((content_type, bytes)) => b
                .header(http::header::CONTENT_TYPE, content_type)
                .body(Full::new(bytes)),
            None => b.body(Full::new(Bytes::new())),
        }
        .map_err(|e| format!("bad request: {e}"))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| crate::client::error_chain(&e))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| crate::client::error_chain(&e))?
                .to_bytes();
            Ok(ApiReply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")))
    }

    /// `POST /v1/integrations/{integration}/messages` with a JSON envelope
    /// and the token; `Err` when no response came back, so a producer racing
    /// a shutdown or a kill can tell an unacknowledged message.
    pub async fn enqueue(
        &self,
        integration: &str,
        envelope: &Value,
    ) -> Result<(StatusCode, Value), String> {
        let r = self
            .try_request(
                Method::POST,
                &format!("/v1/integrations/{integration}/messages"),
                Some(&self.token),
                Some(("application/json", Bytes::from(envelope.to_string()))),
                &[],
            )
            .await?;
        Ok((r.status, r.json()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.log_shown && self.log_path().exists() {
            let mut msg = String::new();
            let _ = writeln!(
                msg,
                "--- outboxd log ({}), last lines ---",
                self.log_path().display()
            );
            msg.push_str(&log_tail(&self.log_path()));
            msg.push_str("--- end of outboxd log ---");
            eprintln!("{msg}");
        }
        self.kill9();
    }
}

/// Merges `extra` into `base`: tables merge key by key, anything else is
/// replaced.
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The `OUTBOX_*` variables of this process, which would override the
/// config the harness wrote (SPEC §5) or point the CLI elsewhere.
fn outbox_env_vars() -> Vec<std::ffi::OsString> {
    std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| k.to_string_lossy().starts_with("OUTBOX_"))
        .collect()
}

fn path_string(p: &Path) -> String {
    p.to_str()
        .unwrap_or_else(|| panic!("path {} is not UTF-8", p.display()))
        .to_string()
}

fn create(path: &Path) -> File {
    File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
}

fn spawn(mut cmd: Command, what: &str) -> Child {
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"))
}
