//! What the end-to-end suites share: the real binaries started on free
//! loopback ports with a temporary data dir, a small API client, a scripted
//! HTTP sink, and a bounded `eventually`.

#![allow(dead_code)]

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;

pub const TOKEN: &str = "e2e-token";

/// Path of a workspace binary, built once per test process by the
/// harness library (which keeps the nested cargo build from invalidating
/// the test build's fingerprints).
pub fn bin(name: &str) -> PathBuf {
    outbox_tests::bins::bin(name)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `check` until it returns `Some`, for at most `timeout`.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A running `outboxd` on its own data dir and port.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config: PathBuf,
    child: Option<Child>,
    client: Client<HttpConnector, Full<Bytes>>,
    env: Vec<(String, String)>,
}

pub struct DaemonBuilder {
    instance_name: String,
    extra: String,
    env: Vec<(String, String)>,
}

impl Daemon {
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder {
            instance_name: "e2e-dev".into(),
            extra: String::new(),
            env: Vec::new(),
        }
    }
}

impl DaemonBuilder {
    pub fn instance_name(mut self, name: &str) -> Self {
        self.instance_name = name.into();
        self
    }

    /// TOML appended to the config file (sections after the `[api]` one).
    pub fn config(mut self, toml: &str) -> Self {
        self.extra.push('\n');
        self.extra.push_str(toml);
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Writes the config without starting the daemon.
    pub fn prepare(self) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config = dir.path().join("outboxd.toml");
        let text = format!(
            "instance_name = {:?}\ndata_dir = {:?}\n{}{}\n[api]\nlisten = \"127.0.0.1:{port}\"\ntoken = {TOKEN:?}\n{}",
            self.instance_name,
            dir.path().join("data").display().to_string(),
            if self.extra.contains("shutdown_grace") {
                ""
            } else {
                "shutdown_grace = \"5s\"\n"
            },
            // Top-level keys must come before the first table.
            self.extra
                .lines()
                .take_while(|l| !l.trim_start().starts_with('['))
                .collect::<Vec<_>>()
                .join("\n"),
            if self.extra.contains("[log]") {
                ""
            } else {
                "[log]\nlevel = \"info,outbox_daemon=debug\"\n"
            },
        );
        let tables: String = {
            let mut seen_table = false;
            self.extra
                .lines()
                .filter(|l| {
                    seen_table |= l.trim_start().starts_with('[');
                    seen_table
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        std::fs::write(&config, format!("{text}\n{tables}\n")).expect("config written");
        Daemon {
            dir,
            port,
            config,
            child: None,
            client: Client::builder(TokioExecutor::new()).build_http(),
            env: self.env,
        }
    }

    pub async fn start(self) -> Daemon {
        let mut d = self.prepare();
        d.start().await;
        d
    }
}

impl Daemon {
    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("outboxd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts (or restarts) the process and waits for `/healthz`.
    pub async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(bin("outboxd"));
        cmd.arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .env("NO_COLOR", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("outboxd starts"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("outboxd exited with {status} during start:\n{}", self.log());
            }
            if let Ok((StatusCode::OK, _)) = self.request(Method::GET, "/healthz", None, None).await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "outboxd did not come up:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, as `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        signal(c.id(), libc::SIGTERM);
        wait_bounded(&mut c, Duration::from_secs(30))
    }

    pub fn signal(&self, sig: i32) {
        signal(self.pid(), sig);
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<(&str, Bytes)>,
    ) -> Result<(StatusCode, Value), String> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.api()));
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some((ct, bytes)) => b.header("content-type", ct).body(Full::new(bytes)),
            None => b.body(Full::new(Bytes::new())),
        }
        .map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.request(Method::GET, path, Some(TOKEN), None)
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.request(
            Method::POST,
            path,
            Some(TOKEN),
            Some(("application/json", Bytes::from(body.to_string()))),
        )
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Value) {
        self.request(
            Method::POST,
            path,
            Some(TOKEN),
            Some((content_type, body.into())),
        )
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// `POST /v1/apply` with a TOML document.
    pub async fn apply(&self, toml: &str) -> (StatusCode, Value) {
        self.post_raw("/v1/apply", "application/toml", toml.to_string())
            .await
    }

    /// Runs the `outbox` CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("outbox"))
            .args(["--api", &self.api(), "--token", TOKEN])
            .args(args)
            .env_remove("OUTBOX_API")
            .env_remove("OUTBOX_TOKEN")
            .output()
            .expect("outbox runs")
    }

    /// Runs `outboxd` with extra arguments on this config (e.g.
    /// `--check-config`), returning its output.
    pub fn run_outboxd(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("outboxd"));
        cmd.arg("--config").arg(&self.config).args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("outboxd runs")
    }

    /// The message with its attempts.
    pub async fn message(&self, id: &str) -> Value {
        let (s, v) = self.get(&format!("/v1/messages/{id}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// Waits until message `id` is in `state`.
    pub async fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        eventually(
            timeout,
            &format!("message {id} to be {state}"),
            async || {
                let m = self.message(id).await;
                (m["state"] == state).then_some(m)
            },
        )
        .await
    }
}

/// A cheap, cloneable client of one daemon's API, for concurrent producers.
#[derive(Clone)]
pub struct Api {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    /// `POST /v1/integrations/{i}/messages` with a JSON envelope.
    pub async fn enqueue(
        &self,
        integration: &str,
        body: &Value,
    ) -> Result<(StatusCode, Value), String> {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!(
                "{}/v1/integrations/{integration}/messages",
                self.base
            ))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }
}

impl Daemon {
    pub fn api_client(&self) -> Api {
        Api {
            base: self.api(),
            client: self.client.clone(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- outboxd log ({}) ---\n{}",
                self.log_path().display(),
                self.log()
            );
        }
        self.kill9();
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY-free: libc::kill through a safe wrapper is not available, so
    // use the `kill` command.
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub fn wait_bounded(c: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("process {} did not exit within {limit:?}", c.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a sink saw.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct SinkState {
    script: VecDeque<(u16, Vec<(String, String)>)>,
    status: u16,
    received: Vec<Received>,
    delay: Duration,
}

/// A plain-HTTP remote system: answers a script of statuses, then a default
/// status, and records every request.
pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<Mutex<SinkState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    pub async fn start() -> Sink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(SinkState {
            status: 200,
            ..Default::default()
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let st = st.clone();
                            async move {
                                let method = req.method().to_string();
                                let path = req.uri().to_string();
                                let headers = req.headers().clone();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let (status, extra, delay) = {
                                    let mut s = st.lock().unwrap();
                                    s.received.push(Received {
                                        method,
                                        path,
                                        headers,
                                        body,
                                    });
                                    let (status, extra) =
                                        s.script.pop_front().unwrap_or((s.status, vec![]));
                                    (status, extra, s.delay)
                                };
                                if !delay.is_zero() {
                                    tokio::time::sleep(delay).await;
                                }
                                let mut r =
                                    Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")));
                                *r.status_mut() = StatusCode::from_u16(status).unwrap();
                                for (k, v) in extra {
                                    r.headers_mut().insert(
                                        http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                                        http::HeaderValue::from_str(&v).unwrap(),
                                    );
                                }
                                Ok::<_, Infallible>(r)
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Sink { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Statuses answered in order before the default one.
    pub fn script(&self, statuses: &[u16]) {
        let mut s = self.state.lock().unwrap();
        s.script.extend(statuses.iter().map(|&c| (c, vec![])));
    }

    pub fn script_with(&self, status: u16, headers: &[(&str, &str)]) {
        self.state.lock().unwrap().script.push_back((
            status,
            headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
    }

    pub fn set_status(&self, status: u16) {
        self.state.lock().unwrap().status = status;
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// Distinct `Idempotency-Key` values seen.
    pub fn ids(&self) -> HashSet<String> {
        self.state
            .lock()
            .unwrap()
            .received
            .iter()
            .filter_map(|r| {
                r.headers
                    .get("idempotency-key")?
                    .to_str()
                    .ok()
                    .map(str::to_string)
            })
            .collect()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes `text` to a file in `dir` and returns its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).expect("create");
    f.write_all(text.as_bytes()).expect("write");
    p
}

/// A one-integration file with the given connections (TOML snippets).
pub fn integration(name: &str, connections: &[&str]) -> String {
    let mut t = format!(
        "[[integration]]\nname = \"{name}\"\nmax_attempts = 5\nbackoff = {{ initial = \"100ms\", max = \"1s\" }}\ntimeout = \"5s\"\nconcurrency = 4\n\n  [[integration.message]]\n  name = \"Create\"\n  method = \"POST\"\n  path = \"/api/${{variables.table}}/${{message.id}}\"\n  headers = {{ \"Content-Type\" = \"application/json\" }}\n"
    );
    for c in connections {
        t.push_str("\n  [[integration.connection]]\n");
        t.push_str(c);
        t.push('\n');
    }
    t
}

/// A connection snippet.
pub fn connection(name: &str, environment: &str, url: &str, extra: &str) -> String {
    format!(
        "  name = \"{name}\"\n  environment = \"{environment}\"\n  endpoint_url = \"{url}\"\n  variables = {{ table = \"incident\" }}\n  {extra}"
    )
}
