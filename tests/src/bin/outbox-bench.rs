//! `outbox-bench`: the load generator of Outbox.
//!
//! Every figure is a ratio against a baseline measured in the same run, on
//! the same machine, with the same client code, because the machine is
//! shared and noisy:
//!
//! - **enqueue**: `--messages` raw 1 KiB enqueues from `--producers`
//!   concurrent producers into `outboxd` (202 only after the group-commit
//!   flush), against a baseline hyper server that reads the body and answers
//!   `202 {"id","state"}`, nothing else. Both are served by the same hyper
//!   builder and hit by the same client with the same requests, in
//!   `--rounds` interleaved rounds (baseline and daemon by turns, and by
//!   turns first), so both see the same neighbours.
//! - **delivery**: from the activation of the connection until the sink has
//!   seen every queued message's distinct `Idempotency-Key`, against a plain
//!   hyper client sending the same requests (method, path, headers, body) to
//!   the same sink with the integration's `concurrency`, once before and
//!   once after the daemon (the ratio is against their mean).
//! - **memory**: the daemon's `VmHWM` (peak RSS, reset at the start of each
//!   phase through `/proc/PID/clear_refs`) and its `VmRSS` sampled meanwhile.
//! - **CPU**: CPU time per message of every process taking part, the rest
//!   of the machine's load, and the daemon's busiest threads; from them a
//!   "CPU cost ratio" (the ratio the rates would have if CPU were the only
//!   limit), which neighbours barely move.
//! - **relay** (when `outbox-relay` is found, or given with
//!   `--outbox-relay`): the daemon gets a `[tunnel]` (PKI from `outbox pki
//!   init`) and the integration a second connection to the same sink with
//!   `mid_server`; `outbox-relay` (allowed to reach the sink only) dials in.
//!   Its VmRSS idle (2 s after the daemon lists it), then `--relay-rounds`
//!   rounds of: a plain-client delivery (context), and `--relay-messages`
//!   enqueued with the integration off and delivered through the direct
//!   connection and, as many again, through the relay connection (by turns
//!   first), each timed from activation until the sink has every key. The
//!   ratio is relay against direct over all rounds; the relay's VmHWM and
//!   sampled VmRSS under load, and CPU per message of every process.
//! - **ssh tunnel** (in the relay phase, when `sshd`, `ssh` and `ssh-keygen`
//!   are installed, unless `--no-ssh`): what users compare the relay with.
//!   The bench runs its own `sshd` on a free loopback port (keys, config and
//!   pid file in its temporary dir, public-key login as the current user)
//!   and an `ssh -N -L` forwarding a free loopback port to the sink, with
//!   ssh's default cipher; the integration gets a third connection, `ssh`,
//!   to the forwarded port. Each round then delivers through `sink`,
//!   `relay`, `ssh` and `forward` (below), the order rotating between
//!   rounds, and the phase
//!   reports the tunnel's rate, relay against ssh, ssh against direct, and
//!   CPU per message with `ssh` and `sshd` (with the sshd child serving the
//!   session) counted as one process, `ssh`.
//! - **plain TCP forward** (in the relay phase, unless `--no-forward`): the
//!   floor of any relay that is a process of its own on the daemon's cores
//!   (with `--relay-cpus`, it runs on the relay's CPUs instead, beside it).
//!   This binary in `--tcp-forward` mode copies each connection to the sink
//!   and back (`tokio::io::copy_bidirectional`, no encryption, no
//!   authentication, no protocol); the integration gets a connection,
//!   `forward`, to it, delivered through in each round like the others.
//!   What the relay costs beyond this is its tunnel's own cost.
//!
//! The baseline server and the sink are separate processes (this binary in
//! `--baseline-server` and `--sink` mode): `outboxd` is a process of its own,
//! so the baseline is one too, scheduled the same way on the same cores; the
//! sink must not share a runtime with the load generator, nor with the plain
//! client it measures.
//!
//! Results: one JSON line on stdout, a table on stderr. The run is bounded
//! (`--phase-timeout` per phase), kills the daemon and its helpers at the
//! end (also on SIGINT/SIGTERM), and deletes its temporary directory.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outbox_tests::process::{log_tail, signal};
use serde_json::{json, Value};
use tokio::net::TcpListener;

const TOKEN: &str = "literal-token";
const INTEGRATION: &str = "bench";
const MESSAGE_TYPE: &str = "Post";
const CONNECTION: &str = "sink";
const CONTENT_TYPE: &str = "application/octet-stream";
/// What the baseline server answers: the shape of the daemon's 202.
const BASELINE_ANSWER: &str = "{\"id\":\"00000000000186a0\",\"state\":\"queued\"}\n";
/// Linux reports CPU times in USER_HZ, which is 100 on every architecture
/// the daemon runs on.
const TICKS_PER_SEC: f64 = 100.0;
/// One request that takes longer than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A load phase stops early after this many errors.
const MAX_ERRORS: usize = 100;

const USAGE: &str = "\
usage: outbox-bench [OPTIONS]
       outbox-bench --sink | --baseline-server | --tcp-forward ADDR
                                                    (helper processes, started by the bench)

options:
  --messages N        messages enqueued and delivered          (default 100000)
  --producers N       concurrent producers for the enqueue     (default 64)
  --body BYTES        body size                                (default 1024)
  --concurrency N     the integration's concurrency, and the plain client's (default 64)
  --rounds N          interleaved enqueue rounds, baseline and daemon by turns (default 10)
  --outboxd PATH      the daemon binary      (default: outboxd next to this binary)
  --tmp DIR           where the daemon's temporary data dir goes (default: $TMPDIR or /tmp)
  --phase-timeout S   seconds one phase may take before the run gives up (default 900)
  --sample-ms MS      VmRSS sampling period                    (default 50)
  --daemon-env K=V    an environment variable for outboxd only, for experiments
                      (OUTBOX_STORE__CACHE_CAPACITY=256MiB, LD_PRELOAD=..., ...); repeatable

relay phase (on when the relay binary exists):
  --outbox-relay PATH the relay binary   (default: outbox-relay next to this binary)
  --outbox PATH       the CLI, for `outbox pki init` (default: outbox next to outboxd)
  --no-relay          skip the relay phase
  --relay-only        only the relay phase (no enqueue baseline, no first delivery phase)
  --relay-messages N  messages per delivery in the relay phase  (default: --messages)
  --relay-rounds N    rounds of one direct and one relay delivery, by turns first (default 2)
  --relay-concurrency N  the relay's `concurrency`              (default: --concurrency)
  --relay-cpus LIST   run the relay (and the plain TCP forward, its floor) on these CPUs
                      only (`taskset -c LIST`), e.g. to
                      emulate a relay host of its own: `taskset -c 0 outbox-bench
                      --relay-only --relay-cpus 1`
  --no-ssh            no ssh tunnel in the relay phase (by default, when sshd, ssh and
                      ssh-keygen are installed, each round also delivers through
                      `ssh -L` to a private sshd on loopback, to compare the relay with)
  --no-forward        no plain TCP forward in the relay phase (by default each round also
                      delivers through a bare TCP forwarder process, the floor of any relay
                      that shares the cores)
";

#[derive(Clone, Debug)]
struct Opts {
    messages: usize,
    producers: usize,
    body: usize,
    concurrency: usize,
    outboxd: PathBuf,
    tmp: PathBuf,
    phase_timeout: Duration,
    sample_every: Duration,
    daemon_env: Vec<(String, String)>,
    rounds: usize,
    /// The relay binary; `None`: no relay phase.
    relay: Option<PathBuf>,
    /// The `outbox` CLI, which writes the tunnel's PKI.
    outbox: PathBuf,
    relay_only: bool,
    relay_messages: usize,
    relay_rounds: usize,
    relay_concurrency: usize,
    /// CPUs the relay is pinned to (`taskset -c`).
    relay_cpus: Option<String>,
    /// The ssh tunnel of the relay phase: its programs, or why it is skipped.
    ssh: Result<SshBins, String>,
    /// Whether the relay phase also delivers through a plain TCP forward.
    forward: bool,
}

/// The OpenSSH programs the ssh tunnel runs.
#[derive(Clone, Debug)]
struct SshBins {
    sshd: PathBuf,
    ssh: PathBuf,
    keygen: PathBuf,
}

/// `name` at one of `first` or in a directory of `$PATH`, as an absolute
/// path (sshd re-executes itself, which needs one).
fn find_program(name: &str, first: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    first
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path).map(|d| d.join(name)))
        .find(|p| p.is_file())
        .and_then(|p| std::path::absolute(p).ok())
}

impl SshBins {
    /// The programs, or why the ssh tunnel cannot run.
    fn find() -> Result<SshBins, String> {
        let sshd = find_program("sshd", &["/usr/sbin/sshd"]).ok_or(
            "sshd not found (in /usr/sbin or $PATH): install openssh-server and openssh-client",
        )?;
        let ssh =
            find_program("ssh", &[]).ok_or("ssh not found in $PATH: install openssh-client")?;
        let keygen = find_program("ssh-keygen", &[])
            .ok_or("ssh-keygen not found in $PATH: install openssh-client")?;
        Ok(SshBins { sshd, ssh, keygen })
    }
}

fn parse_args() -> Result<Opts> {
    let exe = std::env::current_exe().context("where is this binary")?;
    let mut o = Opts {
        messages: 100_000,
        producers: 64,
        body: 1024,
        concurrency: 64,
        outboxd: exe.with_file_name("outboxd"),
        tmp: std::env::temp_dir(),
        phase_timeout: Duration::from_secs(900),
        sample_every: Duration::from_millis(50),
        daemon_env: Vec::new(),
        rounds: 10,
        relay: None,
        outbox: PathBuf::new(),
        relay_only: false,
        relay_messages: 0,
        relay_rounds: 2,
        relay_concurrency: 0,
        relay_cpus: None,
        ssh: Err(String::new()),
        forward: true,
    };
    let mut no_ssh = false;
    let mut relay = Some(exe.with_file_name("outbox-relay"));
    let mut relay_asked = false;
    let mut outbox = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| anyhow!("{name} needs a value"));
        let num = |name: &str, v: String| -> Result<usize> {
            v.replace('_', "")
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| anyhow!("{name}: {v:?} is not a positive number"))
        };
        match a.as_str() {
            "--messages" => o.messages = num(&a, value(&a)?)?,
            "--producers" => o.producers = num(&a, value(&a)?)?,
            "--body" => o.body = num(&a, value(&a)?)?,
            "--concurrency" => o.concurrency = num(&a, value(&a)?)?,
            "--rounds" => o.rounds = num(&a, value(&a)?)?,
            "--outboxd" => o.outboxd = PathBuf::from(value(&a)?),
            "--outbox" => outbox = Some(PathBuf::from(value(&a)?)),
            "--outbox-relay" => {
                relay = Some(PathBuf::from(value(&a)?));
                relay_asked = true;
            }
            "--no-relay" => relay = None,
            "--relay-only" => o.relay_only = true,
            "--relay-messages" => o.relay_messages = num(&a, value(&a)?)?,
            "--relay-rounds" => o.relay_rounds = num(&a, value(&a)?)?,
            "--relay-concurrency" => o.relay_concurrency = num(&a, value(&a)?)?,
            "--relay-cpus" => o.relay_cpus = Some(value(&a)?),
            "--no-ssh" => no_ssh = true,
            "--no-forward" => o.forward = false,
            "--tmp" => o.tmp = PathBuf::from(value(&a)?),
            "--phase-timeout" => o.phase_timeout = Duration::from_secs(num(&a, value(&a)?)? as u64),
            "--sample-ms" => o.sample_every = Duration::from_millis(num(&a, value(&a)?)? as u64),
            "--daemon-env" => {
                let kv = value(&a)?;
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--daemon-env: {kv:?} is not KEY=VALUE"))?;
                o.daemon_env.push((k.to_string(), v.to_string()));
            }
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if o.concurrency > 1024 {
        bail!("--concurrency: the daemon allows at most 1024");
    }
    if !o.outboxd.is_file() {
        bail!(
            "{} does not exist: build it with `cargo build --release -p outbox-daemon --bins`, or pass --outboxd",
            o.outboxd.display()
        );
    }
    o.outbox = outbox.unwrap_or_else(|| o.outboxd.with_file_name("outbox"));
    // The relay phase runs when the relay binary is there: asked for by
    // --outbox-relay (then it must exist), or found next to this binary.
    o.relay = match relay {
        Some(r) if r.is_file() => Some(r),
        Some(r) if relay_asked || o.relay_only => bail!(
            "{} does not exist: build it with `cargo build --release -p outbox-relay`, or pass --outbox-relay",
            r.display()
        ),
        _ => None,
    };
    if o.relay_only && o.relay.is_none() {
        bail!("--relay-only and --no-relay exclude each other");
    }
    if o.relay.is_some() && !o.outbox.is_file() {
        bail!(
            "{} does not exist: the relay phase needs the outbox CLI for `outbox pki init` \
             (cargo build --release -p outbox-daemon --bins), or pass --outbox",
            o.outbox.display()
        );
    }
    if o.relay_messages == 0 {
        o.relay_messages = o.messages;
    }
    if o.relay_concurrency == 0 {
        o.relay_concurrency = o.concurrency;
    }
    o.ssh = if no_ssh {
        Err("--no-ssh given".into())
    } else {
        SshBins::find()
    };
    Ok(o)
}

fn main() -> std::process::ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let result = match mode.as_str() {
        "--sink" => helper(Helper::Sink),
        "--baseline-server" => helper(Helper::Baseline),
        "--tcp-forward" => forward_helper(std::env::args().nth(2).unwrap_or_default()),
        _ => parse_args().and_then(|o| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(interruptible(bench(o)))
        }),
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("outbox-bench: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Runs the bench until it ends or SIGINT/SIGTERM arrives; either way its
/// future is dropped here, which kills the daemon and the helpers and
/// deletes the temporary directory.
async fn interruptible(run: impl std::future::Future<Output = Result<bool>>) -> Result<bool> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        r = run => r,
        _ = term.recv() => Err(anyhow!("terminated; the daemon was stopped and its data deleted")),
        _ = int.recv() => Err(anyhow!("interrupted; the daemon was stopped and its data deleted")),
    }
}

// ---------------------------------------------------------------------------
// Helper processes: the sink and the baseline server.

#[derive(Clone, Copy, Debug)]
enum Helper {
    Sink,
    Baseline,
}

impl Helper {
    fn flag(self) -> &'static str {
        match self {
            Helper::Sink => "--sink",
            Helper::Baseline => "--baseline-server",
        }
    }
}

/// Runs a helper process: binds a loopback port, prints it on stdout, and
/// hands each connection accepted to `serve` (on the helper's runtime)
/// until its stdin closes (the bench ended, however it ended).
/// `workers` sets the runtime's threads (default: one per CPU).
fn serve_helper(
    workers: Option<usize>,
    mut serve: impl FnMut(tokio::net::TcpStream),
) -> Result<bool> {
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        println!("listening {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    serve(stream);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
}

/// The sink or the baseline server.
fn helper(kind: Helper) -> Result<bool> {
    let sink = Arc::new(SinkState::default());
    serve_helper(None, move |stream| {
        let io = TokioIo::new(stream);
        match kind {
            Helper::Sink => {
                let sink = sink.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let sink = sink.clone();
                    async move { Ok::<_, Infallible>(sink_handle(&sink, req).await) }
                });
                // HTTP/1.1 with keep-alive: what a remote system speaks
                // to the daemon over plain http.
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
            Helper::Baseline => {
                let svc = hyper::service::service_fn(baseline_handle);
                // The same server builder as the daemon's API.
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                });
            }
        }
    })
}

/// The plain TCP forward: copies each connection to `target` and back.
fn forward_helper(target: String) -> Result<bool> {
    let target: SocketAddr = target
        .parse()
        .map_err(|_| anyhow!("--tcp-forward: {target:?} is not an address"))?;
    // Two threads, as the relay has (relay/src/main.rs): the floor gets no
    // more parallelism than what it is compared with.
    serve_helper(Some(2), move |mut inbound| {
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    })
}

/// The baseline of the enqueue: read the body like the daemon does, answer
/// 202 with the daemon's JSON shape, nothing else.
async fn baseline_handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let authorized = req
        .headers()
        .get("authorization")
        .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
    let _ = req.into_body().collect().await;
    let status = if authorized {
        StatusCode::ACCEPTED
    } else {
        StatusCode::UNAUTHORIZED
    };
    Ok(text(status, "application/json", BASELINE_ANSWER))
}

/// What the sink has seen since its last reset.
#[derive(Default)]
struct SinkState {
    inner: Mutex<SinkInner>,
    distinct: AtomicUsize,
    total: AtomicU64,
}

#[derive(Default)]
struct SinkInner {
    keys: HashSet<Box<str>>,
    missing_key: u64,
    target: usize,
    first: Option<Instant>,
    done: Option<Instant>,
}

impl SinkState {
    fn record(&self, key: Option<&str>) {
        let now = Instant::now();
        self.total.fetch_add(1, Ordering::Relaxed);
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        s.first.get_or_insert(now);
        match key {
            None => s.missing_key += 1,
            Some(k) => {
                if !s.keys.contains(k) {
                    s.keys.insert(k.into());
                    let n = s.keys.len();
                    self.distinct.store(n, Ordering::Release);
                    if n == s.target {
                        s.done = Some(now);
                    }
                }
            }
        }
    }

    fn stats(&self) -> Value {
        let s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let ago = |t: Option<Instant>| t.map(|t| t.elapsed().as_micros() as u64);
        json!({
            "distinct": s.keys.len(),
            "total": self.total.load(Ordering::Relaxed),
            "missing_key": s.missing_key,
            "target": s.target,
            "first_ago_us": ago(s.first),
            "done_ago_us": ago(s.done),
        })
    }

    fn reset(&self, target: usize) {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *s = SinkInner {
            target,
            ..SinkInner::default()
        };
        s.keys.reserve(target);
        self.distinct.store(0, Ordering::Release);
        self.total.store(0, Ordering::Relaxed);
    }
}

/// The sink: `/__reset?target=N`, `/__stats`, `/__wait?n=N&timeout_ms=T`
/// (answers once N distinct keys were seen, or at the timeout); any other
/// request is a delivery, counted by its `Idempotency-Key`, answered 200.
async fn sink_handle(sink: &SinkState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if let Some(control) = path.strip_prefix("/__") {
        let q = query(req.uri().query().unwrap_or(""));
        let n = |k: &str| q.get(k).and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        let body = match control {
            "reset" => {
                sink.reset(n("target"));
                sink.stats()
            }
            "stats" => sink.stats(),
            "wait" => {
                let until = Instant::now() + Duration::from_millis(n("timeout_ms") as u64);
                let want = n("n");
                while sink.distinct.load(Ordering::Acquire) < want && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                sink.stats()
            }
            _ => return text(StatusCode::NOT_FOUND, "text/plain", "unknown control\n"),
        };
        return text(StatusCode::OK, "application/json", body.to_string());
    }
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let _ = req.into_body().collect().await;
    sink.record(key.as_deref());
    text(StatusCode::OK, "application/json", "{\"ok\":true}\n")
}

fn query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn text(status: StatusCode, ct: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = ct.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// A child process killed, with every process it forked, when dropped:
/// the helpers, the daemon, the relay, and sshd, which forks a process per
/// connection that outlives a killed parent.
struct Killed(Child);

impl Killed {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        // Not reaped yet, so the pid is still the child's and its
        // descendants still name it as their parent.
        if let Ok(None) = self.0.try_wait() {
            for (pid, _) in process_tree(&[self.pid()]).into_iter().skip(1) {
                let _ = signal(pid, libc::SIGKILL);
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A helper process, killed when dropped.
struct Proc {
    child: Killed,
    _stdin: Option<ChildStdin>,
    addr: SocketAddr,
}

/// A command running `exe`, pinned to `cpus` (`taskset -c`) when given.
/// taskset execs the program, so the child's pid is the program's.
fn pinned(exe: &std::path::Path, cpus: Option<&str>) -> Command {
    match cpus {
        None => Command::new(exe),
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(exe);
            c
        }
    }
}

impl Proc {
    fn spawn_helper(kind: Helper) -> Result<Proc> {
        Proc::spawn_with(&[kind.flag()], None)
    }

    /// The plain TCP forward to `target`, on the relay's CPUs when it has
    /// its own, as the relay it stands beside.
    fn spawn_forward(target: SocketAddr, cpus: Option<&str>) -> Result<Proc> {
        Proc::spawn_with(&["--tcp-forward", &target.to_string()], cpus)
    }

    /// This binary with `args`, a helper that prints the address it serves;
    /// pinned to `cpus` (`taskset -c`, which execs it) when given.
    fn spawn_with(args: &[&str], cpus: Option<&str>) -> Result<Proc> {
        let mut child = pinned(&std::env::current_exe()?, cpus)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", args[0]))?;
        let stdin = child.stdin.take();
        let mut line = String::new();
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        BufReader::new(out).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("{} did not start: {line:?}", args[0]))?;
        Ok(Proc {
            child: Killed(child),
            _stdin: stdin,
            addr,
        })
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }
}

// ---------------------------------------------------------------------------
// /proc: memory and CPU of a process.

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// utime + stime of a `/proc/.../stat` line, in seconds, and its `comm`.
/// What the bench reads from a `/proc/.../stat` file.
struct Stat {
    comm: String,
    ppid: u32,
    /// User and system CPU, in seconds.
    cpu: f64,
}

fn read_stat(path: &str) -> Option<Stat> {
    let text = std::fs::read_to_string(path).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parens.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Stat {
        comm: text[open + 1..close].to_string(),
        ppid: f.get(1)?.parse().ok()?,
        cpu: ticks as f64 / TICKS_PER_SEC,
    })
}

fn proc_cpu(pid: u32) -> f64 {
    read_stat(&format!("/proc/{pid}/stat")).map_or(0.0, |s| s.cpu)
}

/// `roots` and every process descending from them (scanning `/proc` for
/// parent pids), roots first, each with its CPU seconds from the same read.
fn process_tree(roots: &[u32]) -> Vec<(u32, f64)> {
    let mut stats = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(stat) = read_stat(&format!("/proc/{pid}/stat")) {
                stats.insert(pid, stat);
            }
        }
    }
    let mut tree = roots.to_vec();
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        for (&pid, stat) in &stats {
            if stat.ppid == parent && !tree.contains(&pid) {
                tree.push(pid);
            }
        }
        i += 1;
    }
    tree.into_iter()
        .map(|pid| (pid, stats.get(&pid).map_or(0.0, |s| s.cpu)))
        .collect()
}

/// CPU seconds of the processes running now in the trees of `roots`, by pid.
fn tree_cpu(roots: &[u32]) -> HashMap<u32, f64> {
    process_tree(roots).into_iter().collect()
}

/// CPU seconds and name of threads, by thread id.
type ThreadCpu = HashMap<u64, (String, f64)>;

/// CPU seconds of every thread of `pid`, by thread id.
fn thread_cpu(pid: u32) -> ThreadCpu {
    let mut out = HashMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            if let Some(st) = read_stat(&format!("/proc/{pid}/task/{tid}/stat")) {
                out.insert(tid, (st.comm, st.cpu));
            }
        }
    }
    out
}

/// Busy CPU seconds of the whole machine (`/proc/stat`), and seconds some
/// task waited for a CPU (`/proc/pressure/cpu`, "some" total).
fn machine_cpu() -> (f64, f64) {
    let busy = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| {
            let f: Vec<u64> = t
                .lines()
                .next()?
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            Some(
                [0, 1, 2, 5, 6, 7]
                    .iter()
                    .filter_map(|&i| f.get(i))
                    .sum::<u64>(),
            )
        })
        .unwrap_or(0) as f64
        / TICKS_PER_SEC;
    let stall = std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()?
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("total="))?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0) as f64
        / 1e6;
    (busy, stall)
}

/// Resets a process's VmHWM to its current VmRSS (Linux ≥ 4.0).
fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Samples VmRSS of a process on a thread of its own.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(u64, u64, u64)>,
}

impl RssSampler {
    fn start(pid: u32, every: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut max, mut sum, mut n) = (0u64, 0u64, 0u64);
            while !flag.load(Ordering::Relaxed) {
                if let Some(rss) = proc_status_kib(pid, "VmRSS") {
                    max = max.max(rss);
                    sum += rss;
                    n += 1;
                }
                std::thread::sleep(every);
            }
            (max, sum.checked_div(n).unwrap_or(0), n)
        });
        RssSampler { stop, handle }
    }

    /// (max VmRSS, mean VmRSS, samples)
    fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or((0, 0, 0))
    }
}

/// CPU counters of the processes taking part in a phase, taken at its start.
struct CpuSnap {
    procs: Vec<(&'static str, u32, f64)>,
    /// Process trees counted as one process, by pid within the tree.
    trees: Vec<(&'static str, Vec<u32>, HashMap<u32, f64>)>,
    /// Processes whose threads are reported one by one.
    threads: Vec<(&'static str, u32, ThreadCpu)>,
    machine: (f64, f64),
    at: Instant,
}

impl CpuSnap {
    /// `threads`: the processes (among `procs`) to break down by thread.
    fn take(procs: &[(&'static str, u32)], threads: &[(&'static str, u32)]) -> CpuSnap {
        CpuSnap {
            procs: procs
                .iter()
                .map(|&(n, pid)| (n, pid, proc_cpu(pid)))
                .collect(),
            threads: threads
                .iter()
                .map(|&(n, pid)| (n, pid, thread_cpu(pid)))
                .collect(),
            trees: Vec::new(),
            machine: machine_cpu(),
            at: Instant::now(),
        }
    }

    /// Also counts the processes `roots` and their descendants, together,
    /// as the process `name` (e.g. a server that forks per connection).
    fn with_tree(mut self, name: &'static str, roots: &[u32]) -> CpuSnap {
        self.trees.push((name, roots.to_vec(), tree_cpu(roots)));
        self.machine = machine_cpu();
        self.at = Instant::now();
        self
    }
}

/// CPU used over one phase, or over the rounds of an interleaved phase.
#[derive(Default)]
struct CpuAcc {
    wall: f64,
    procs: Vec<(&'static str, f64)>,
    threads: Vec<(&'static str, ThreadCpu)>,
    busy: f64,
    stall: f64,
}

impl CpuAcc {
    /// Adds what happened since `snap` was taken.
    fn add(&mut self, snap: CpuSnap) {
        self.wall += snap.at.elapsed().as_secs_f64();
        let mut used: Vec<(&'static str, f64)> = snap
            .procs
            .iter()
            .map(|(name, pid, before)| (*name, proc_cpu(*pid) - before))
            .collect();
        // A process of a tree born during the phase counts from zero.
        for (name, roots, before) in &snap.trees {
            let now = tree_cpu(roots);
            let sum = now
                .iter()
                .map(|(pid, secs)| secs - before.get(pid).copied().unwrap_or(0.0))
                .sum();
            used.push((*name, sum));
        }
        for (name, used) in used {
            match self.procs.iter_mut().find(|(n, _)| *n == name) {
                Some((_, s)) => *s += used,
                None => self.procs.push((name, used)),
            }
        }
        let (busy, stall) = machine_cpu();
        self.busy += busy - snap.machine.0;
        self.stall += stall - snap.machine.1;
        for (name, pid, before) in &snap.threads {
            let acc = match self.threads.iter().position(|(n, _)| n == name) {
                Some(i) => &mut self.threads[i].1,
                None => {
                    self.threads.push((name, ThreadCpu::new()));
                    &mut self.threads.last_mut().expect("just pushed").1
                }
            };
            for (tid, (comm, secs)) in thread_cpu(*pid) {
                let prev = before.get(&tid).map_or(0.0, |(_, s)| *s);
                acc.entry(tid).or_insert((comm, 0.0)).1 += secs - prev;
            }
        }
    }

    fn of(snap: CpuSnap, messages: usize) -> Value {
        let mut acc = CpuAcc::default();
        acc.add(snap);
        acc.report(messages)
    }

    /// For each process, the cores it used on average and its CPU time per
    /// message; what the rest of the machine ran meanwhile; and the busiest
    /// threads of the daemon (`daemon_threads`) and of any other process
    /// broken down (`NAME_threads`): `top -H` over the whole phase; tokio's
    /// blocking pool threads share the workers' name.
    fn report(&self, messages: usize) -> Value {
        let wall = self.wall.max(1e-9);
        let (mut cores, mut per_msg) = (serde_json::Map::new(), serde_json::Map::new());
        let mut ours = 0.0;
        for (name, used) in &self.procs {
            ours += used;
            cores.insert(name.to_string(), json!(round(used / wall, 2)));
            per_msg.insert(
                name.to_string(),
                json!(round(used * 1e6 / messages.max(1) as f64, 1)),
            );
        }
        // The machine is shared: what everything else ran meanwhile, and how
        // much of the time some task waited for a CPU (PSI "some", ours too).
        let machine = json!({
            "busy_cores": round(self.busy / wall, 2),
            "others_cores": round(((self.busy - ours) / wall).max(0.0), 2),
            "cpu_pressure_pct": round(self.stall / wall * 100.0, 1),
        });
        let mut out = json!({
            "cores": cores,
            "cpu_us_per_msg": per_msg,
            "machine": machine,
            "daemon_threads": [],
        });
        for (name, threads) in &self.threads {
            let mut v: Vec<(String, f64)> = threads
                .iter()
                .map(|(tid, (comm, secs))| (format!("{comm}/{tid}"), secs / wall))
                .filter(|(_, c)| *c >= 0.01)
                .collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            let list: Vec<Value> = v
                .into_iter()
                .take(8)
                .map(|(name, c)| json!([name, round(c, 2)]))
                .collect();
            let key = match *name {
                "outboxd" => "daemon_threads".to_string(),
                other => format!("{other}_threads"),
            };
            out[key] = json!(list);
        }
        out
    }
}

/// CPU time per message of the processes named, summed.
fn cpu_per_msg(cpu: &Value, names: &[&str]) -> f64 {
    names
        .iter()
        .filter_map(|n| cpu["cpu_us_per_msg"][n].as_f64())
        .sum()
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

// ---------------------------------------------------------------------------
// The load generator.

type HttpClient = Client<HttpConnector, Full<Bytes>>;
/// Builds request number `i` of a load phase.
type MakeRequest = Arc<dyn Fn(usize) -> Request<Full<Bytes>> + Send + Sync>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

/// What one load phase did.
#[derive(Debug, Default)]
struct Load {
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    secs: f64,
    latencies_us: Vec<u32>,
}

impl Load {
    fn merge(&mut self, other: Load) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.secs += other.secs;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.latencies_us.extend(other.latencies_us);
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }

    fn latency(&self) -> Value {
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        let p = |q: f64| -> u32 {
            if l.is_empty() {
                0
            } else {
                l[((l.len() - 1) as f64 * q).round() as usize]
            }
        };
        json!({ "p50": p(0.5), "p90": p(0.9), "p99": p(0.99), "max": p(1.0) })
    }
}

/// Sends requests `0..n` from `workers` concurrent tasks, each one request
/// at a time, and times the whole from the first request to the last answer.
async fn drive(
    client: &HttpClient,
    label: &str,
    n: usize,
    workers: usize,
    deadline: Instant,
    expect: StatusCode,
    make: MakeRequest,
) -> Load {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let progress = {
        let (done, label) = (done.clone(), label.to_string());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let d = done.load(Ordering::Relaxed);
                eprintln!(
                    "  {label}: {d}/{n} after {:.0}s ({:.0}/s)",
                    started.elapsed().as_secs_f64(),
                    d as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, next, done, failures, make) = (
            client.clone(),
            next.clone(),
            done.clone(),
            failures.clone(),
            make.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut r = Load::default();
            r.latencies_us.reserve(n / workers + 1);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || failures.load(Ordering::Relaxed) >= MAX_ERRORS {
                    break;
                }
                if Instant::now() > deadline {
                    r.errors += 1;
                    r.first_error.get_or_insert("phase timeout".into());
                    failures.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                let t = Instant::now();
                let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    let resp = client.request(make(i)).await?;
                    let status = resp.status();
                    let body = resp.into_body().collect().await?.to_bytes();
                    Ok::<_, anyhow::Error>((status, body))
                })
                .await;
                let problem = match answer {
                    Ok(Ok((s, _))) if s == expect => None,
                    Ok(Ok((s, body))) => Some(format!(
                        "HTTP {s}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
                    )),
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some(format!("no answer within {REQUEST_TIMEOUT:?}")),
                };
                match problem {
                    None => {
                        r.ok += 1;
                        r.latencies_us
                            .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(p) => {
                        r.errors += 1;
                        r.first_error.get_or_insert(p);
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            r
        }));
    }
    let mut total = Load::default();
    for t in tasks {
        match t.await {
            Ok(r) => {
                total.ok += r.ok;
                total.errors += r.errors;
                if total.first_error.is_none() {
                    total.first_error = r.first_error;
                }
                total.latencies_us.extend(r.latencies_us);
            }
            Err(e) => {
                total.errors += 1;
                total.first_error.get_or_insert(e.to_string());
            }
        }
    }
    total.secs = started.elapsed().as_secs_f64();
    progress.abort();
    if let Some(e) = &total.first_error {
        eprintln!("  {label}: {} error(s), first: {e}", total.errors);
    }
    total
}

/// One request to a control endpoint (daemon API or sink), JSON answer.
async fn call(
    c: &HttpClient,
    method: Method,
    url: &str,
    body: Option<String>,
    auth: bool,
) -> Result<(StatusCode, Value)> {
    let mut b = Request::builder().method(method.clone()).uri(url);
    if auth {
        b = b.header("authorization", format!("Bearer {TOKEN}"));
    }
    let req = b.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = tokio::time::timeout(REQUEST_TIMEOUT, c.request(req))
        .await
        .map_err(|_| anyhow!("{method} {url}: no answer"))??;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}

/// The daemon under test, killed and its data deleted when dropped.
struct Daemon {
    child: Killed,
    url: String,
    log: PathBuf,
    /// The relay tunnel, when the relay phase runs.
    tunnel: Option<Tunnel>,
    // Dropped after the child is killed (field order).
    dir: tempfile::TempDir,
}

/// The daemon's `[tunnel]`: its UDP address, and the directory `outbox pki
/// init` wrote (CA, daemon certificate and key, relay token).
struct Tunnel {
    listen: SocketAddr,
    pki: PathBuf,
}

/// The MID server name of the bench's relay.
const MID_SERVER: &str = "dc1";
/// The connection of the bench integration that goes through the relay.
const RELAY_CONNECTION: &str = "relay";
/// The connection of the bench integration that goes through the ssh tunnel.
const SSH_CONNECTION: &str = "ssh";
/// The connection of the bench integration that goes through the plain
/// TCP forward.
const FORWARD_CONNECTION: &str = "forward";

impl Daemon {
    async fn start(o: &Opts, c: &HttpClient) -> Result<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix("outbox-bench-")
            .tempdir_in(&o.tmp)
            .with_context(|| format!("temporary dir in {}", o.tmp.display()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let data = dir.path().join("data");
        let config = dir.path().join("outboxd.toml");
        let mut text = format!(
            "instance_name = \"bench\"\n\
             data_dir = {data:?}\n\
             [api]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\nmax_body = \"4MiB\"\n\
             [store]\ncache_capacity = \"64MiB\"\n",
            data = data.display().to_string()
        );
        let tunnel = match o.relay {
            None => None,
            Some(_) => {
                let t = Tunnel::init(o, dir.path())?;
                let path = |f: &str| t.pki.join(f).display().to_string();
                text.push_str(&format!(
                    "[tunnel]\nlisten = \"{listen}\"\ncert = {cert:?}\nkey = {key:?}\n\
                     [mid_servers.{MID_SERVER}]\ntoken = {{ file = {token:?} }}\n",
                    listen = t.listen,
                    cert = path("daemon.crt"),
                    key = path("daemon.key"),
                    token = path("relay-token"),
                ));
                Some(t)
            }
        };
        std::fs::write(&config, text)?;
        let log = dir.path().join("outboxd.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&o.outboxd)
            .arg("--config")
            .arg(&config)
            .envs(o.daemon_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", o.outboxd.display()))?;
        let mut d = Daemon {
            child: Killed(child),
            url: format!("http://127.0.0.1:{port}"),
            log,
            tunnel,
            dir,
        };
        let health = format!("{}/healthz", d.url);
        wait_ready(
            "outboxd to be healthy",
            START_LIMIT,
            &mut [("outboxd", &mut d.child, &d.log)],
            || async {
                let answer = call(c, Method::GET, &health, None, false).await;
                Ok(matches!(answer, Ok((StatusCode::OK, _))))
            },
        )
        .await?;
        Ok(d)
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    async fn api(
        &self,
        c: &HttpClient,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<Value> {
        let (s, v) = call(
            c,
            method.clone(),
            &format!("{}{path}", self.url),
            body,
            true,
        )
        .await?;
        if !s.is_success() {
            bail!("{method} {path}: HTTP {s}: {v}");
        }
        Ok(v)
    }

    async fn integration(&self, c: &HttpClient) -> Result<Value> {
        let status = self.api(c, Method::GET, "/v1/status", None).await?;
        status["integrations"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == INTEGRATION))
            .cloned()
            .ok_or_else(|| anyhow!("integration {INTEGRATION} missing from /v1/status: {status}"))
    }

    /// Activates `connection` of the bench integration (starts a delivery).
    async fn activate(&self, c: &HttpClient, connection: &str) -> Result<()> {
        let path = format!("/v1/integrations/{INTEGRATION}/connections/{connection}/activate");
        self.api(c, Method::POST, &path, None).await?;
        Ok(())
    }

    /// Waits until the daemon records every message of the integration as
    /// done (queue depth 0): seconds since `t0`, `None` past `deadline`,
    /// and the integration's status at the end.
    async fn drained(
        &self,
        c: &HttpClient,
        t0: Instant,
        deadline: Instant,
    ) -> Result<(Option<f64>, Value)> {
        let mut state = Value::Null;
        while Instant::now() < deadline {
            state = self.integration(c).await?;
            if state["queue_depth"] == 0 {
                return Ok((Some(t0.elapsed().as_secs_f64()), state));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok((None, state))
    }
}

impl Tunnel {
    /// Writes the PKI with `outbox pki init` and picks a free UDP port.
    fn init(o: &Opts, dir: &std::path::Path) -> Result<Tunnel> {
        let pki = dir.join("pki");
        run_checked(
            Command::new(&o.outbox)
                .args(["pki", "init"])
                .arg(&pki)
                .args(["--host", "127.0.0.1", "--host", "localhost"])
                .args(["--mid-server", MID_SERVER]),
            "outbox pki init",
        )?;
        let listen = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
        Ok(Tunnel { listen, pki })
    }
}

/// The bench integration: its direct connection to the sink and, for the
/// relay phase, a second one to the same sink through the relay, and a
/// third through the ssh tunnel's forwarded port `ssh_port` when it runs,
/// and a fourth through the plain TCP forward at `forward` when it runs.
fn integration_file(
    o: &Opts,
    sink: SocketAddr,
    ssh_port: Option<u16>,
    forward: Option<SocketAddr>,
) -> String {
    let mut file = format!(
        r#"[[integration]]
name = "{INTEGRATION}"
concurrency = {conc}
max_attempts = 3

  [[integration.message]]
  name = "{MESSAGE_TYPE}"
  method = "POST"
  path = "/ingest/${{message.id}}"
  headers = {{ "Content-Type" = "{CONTENT_TYPE}" }}
"#,
        conc = o.concurrency
    );
    let connection = |name: &str, endpoint: String, mid_server: Option<&str>| {
        let mid = mid_server.map_or(String::new(), |m| format!("  mid_server = \"{m}\"\n"));
        format!(
            "\n  [[integration.connection]]\n  name = \"{name}\"\n  environment = \"test\"\n  \
             endpoint_url = \"{endpoint}\"\n{mid}  active = false\n"
        )
    };
    file.push_str(&connection(CONNECTION, format!("http://{sink}"), None));
    if o.relay.is_some() {
        file.push_str(&connection(
            RELAY_CONNECTION,
            format!("http://{sink}"),
            Some(MID_SERVER),
        ));
    }
    if let Some(port) = ssh_port {
        file.push_str(&connection(
            SSH_CONNECTION,
            format!("http://127.0.0.1:{port}"),
            None,
        ));
    }
    if let Some(addr) = forward {
        file.push_str(&connection(
            FORWARD_CONNECTION,
            format!("http://{addr}"),
            None,
        ));
    }
    file
}

/// The enqueue request, identical for the daemon and the baseline server.
fn enqueue_request(base: &str, body: &Bytes) -> MakeRequest {
    let uri: hyper::Uri = format!("{base}/v1/integrations/{INTEGRATION}/messages/{MESSAGE_TYPE}")
        .parse()
        .expect("a valid URI");
    let body = body.clone();
    let auth = format!("Bearer {TOKEN}");
    Arc::new(move |_| {
        Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header("authorization", &auth)
            .header("content-type", CONTENT_TYPE)
            .body(Full::new(body.clone()))
            .expect("a valid request")
    })
}

/// The request the daemon sends for the message with id `format!("{i:016x}")`:
/// same method, path, headers and body.
fn delivery_request(sink: SocketAddr, body: &Bytes) -> MakeRequest {
    let body = body.clone();
    Arc::new(move |i| {
        let id = format!("{i:016x}");
        Request::builder()
            .method(Method::POST)
            .uri(format!("http://{sink}/ingest/{id}"))
            .header("content-type", CONTENT_TYPE)
            .header("idempotency-key", id)
            .body(Full::new(body.clone()))
            .expect("a valid request")
    })
}

/// From the sink's stats (answered at `answered`, times as "how long
/// ago"): seconds from `t0` until the last key and until the first.
fn sink_times(answered: Instant, stats: &Value, t0: Instant) -> (f64, f64) {
    let at = |k: &str| {
        (answered - Duration::from_micros(stats[k].as_u64().unwrap_or(0)))
            .saturating_duration_since(t0)
            .as_secs_f64()
    };
    (at("done_ago_us"), at("first_ago_us"))
}

/// Waits until the sink has seen `n` distinct keys; answers when its
/// answer came back, with the sink's stats (its times are "how long ago").
async fn sink_wait(
    c: &HttpClient,
    sink: SocketAddr,
    n: usize,
    deadline: Instant,
) -> Result<(Instant, Value)> {
    let mut last_report = Instant::now();
    loop {
        let url = format!("http://{sink}/__wait?n={n}&timeout_ms=1000");
        let (_, stats) = call(c, Method::GET, &url, None, false).await?;
        let now = Instant::now();
        if stats["done_ago_us"].is_u64() {
            return Ok((now, stats));
        }
        if now > deadline {
            bail!(
                "the sink saw {} of {n} distinct keys before the phase timeout",
                stats["distinct"]
            );
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  daemon delivery: {}/{n} distinct keys at the sink",
                stats["distinct"]
            );
            last_report = Instant::now();
        }
    }
}

async fn sink_reset(c: &HttpClient, sink: SocketAddr, target: usize) -> Result<()> {
    let url = format!("http://{sink}/__reset?target={target}");
    let (s, v) = call(c, Method::POST, &url, None, false).await?;
    if s != StatusCode::OK {
        bail!("sink reset: HTTP {s}: {v}");
    }
    Ok(())
}

/// The plain client's delivery: the same requests straight to the sink,
/// from a fresh client (new connections, like the daemon's first attempts).
async fn plain_delivery(
    o: &Opts,
    c: &HttpClient,
    sink: &Proc,
    body: &Bytes,
    label: &str,
    n: usize,
) -> Result<(Load, Value, Value)> {
    eprintln!("phase: {label}");
    sink_reset(c, sink.addr, n).await?;
    let deadline = Instant::now() + o.phase_timeout;
    let snap = CpuSnap::take(&[("bench", std::process::id()), ("sink", sink.pid())], &[]);
    let load = drive(
        &client(),
        label,
        n,
        o.concurrency,
        deadline,
        StatusCode::OK,
        delivery_request(sink.addr, body),
    )
    .await;
    let cpu = CpuAcc::of(snap, load.ok);
    let url = format!("http://{}/__stats", sink.addr);
    let (_, stats) = call(c, Method::GET, &url, None, false).await?;
    if stats["distinct"].as_u64() != Some(n as u64) {
        eprintln!(
            "  {label}: the sink saw {} distinct keys of {}",
            stats["distinct"], n
        );
    }
    Ok((load, stats, cpu))
}

async fn bench(o: Opts) -> Result<bool> {
    let c = client();
    let body = Bytes::from(
        (0..o.body)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    );
    let rounds = o.rounds.min(o.messages);
    eprintln!(
        "outbox-bench: {} messages, {} producers, {} B bodies, concurrency {}, {} cores",
        o.messages,
        o.producers,
        o.body,
        o.concurrency,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let sink = Proc::spawn_helper(Helper::Sink)?;
    let baseline = Proc::spawn_helper(Helper::Baseline)?;
    let forward = match o.relay.is_some() && o.forward {
        true => Some(Proc::spawn_forward(sink.addr, o.relay_cpus.as_deref())?),
        false => None,
    };

    eprintln!("phase: start outboxd");
    let daemon = Daemon::start(&o, &c).await?;
    // The ssh tunnel's local port, held until `ssh -L` takes it over.
    let ssh_port = match (&o.relay, &o.ssh) {
        (Some(_), Ok(_)) => Some(std::net::TcpListener::bind("127.0.0.1:0")?),
        _ => None,
    };
    let ssh_fwd = match &ssh_port {
        Some(l) => Some(l.local_addr()?.port()),
        None => None,
    };
    daemon
        .api(
            &c,
            Method::POST,
            "/v1/apply",
            Some(integration_file(
                &o,
                sink.addr,
                ssh_fwd,
                forward.as_ref().map(|f| f.addr),
            )),
        )
        .await
        .context("applying the bench integration")?;
    let state = daemon.integration(&c).await?;
    if state["state"] != "off" {
        bail!("the bench integration should be off before the enqueue: {state}");
    }
    let mut result = json!({
        "bench": "outbox",
        "messages": o.messages,
        "producers": o.producers,
        "body_bytes": o.body,
        "concurrency": o.concurrency,
        "rounds": rounds,
        "daemon_env": o.daemon_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
    });
    let mut complete = true;
    if o.relay_only {
        drop(baseline);
    } else {
        let (phases, ok) = enqueue_and_delivery(&o, &c, &sink, baseline, &daemon, &body).await?;
        for (k, v) in phases.as_object().into_iter().flatten() {
            result[k] = v.clone();
        }
        complete &= ok;
    }
    if let Some(relay) = &o.relay {
        let (phase, ok) = relay_phase(
            &o,
            &c,
            &sink,
            &daemon,
            &body,
            relay,
            ssh_port,
            forward.as_ref(),
        )
        .await?;
        result["relay"] = phase;
        complete &= ok;
    }
    drop(daemon);
    drop(sink);
    result["complete"] = json!(complete);
    print_table(&result);
    println!("{result}");
    Ok(complete)
}

/// The enqueue phase (baseline server and daemon by turns) and the delivery
/// phase (plain client, daemon, plain client) on the direct connection.
async fn enqueue_and_delivery(
    o: &Opts,
    c: &HttpClient,
    sink: &Proc,
    baseline: Proc,
    daemon: &Daemon,
    body: &Bytes,
) -> Result<(Value, bool)> {
    let (o, c) = (o.clone(), c.clone());
    let me = std::process::id();
    let pid = daemon.pid();
    let rounds = o.rounds.min(o.messages);
    let idle_rss = proc_status_kib(pid, "VmRSS").unwrap_or(0);
    let hwm_reset = reset_hwm(pid);

    // -- enqueue --------------------------------------------------------------
    // Interleaved rounds, baseline and daemon taking turns (and turns at
    // going first), so both see the same neighbours on the shared machine.
    // Each side keeps one client, so its connections live across rounds.
    eprintln!(
        "phase: enqueue, {rounds} interleaved round(s) of ~{} messages into the baseline server and outboxd",
        o.messages / rounds
    );
    let (base_client, daemon_client) = (client(), client());
    let base_make = enqueue_request(&format!("http://{}", baseline.addr), body);
    let daemon_make = enqueue_request(&daemon.url, body);
    let (mut base, mut enq) = (Load::default(), Load::default());
    let (mut base_cpu, mut enq_cpu) = (CpuAcc::default(), CpuAcc::default());
    let mut round_ratios = Vec::new();
    let sampler = RssSampler::start(pid, o.sample_every);
    let deadline = Instant::now() + o.phase_timeout;
    for r in 0..rounds {
        let n = o.messages / rounds + usize::from(r < o.messages % rounds);
        let (mut b, mut d) = (Load::default(), Load::default());
        for daemon_turn in [r % 2 == 1, r % 2 == 0] {
            if daemon_turn {
                let snap = CpuSnap::take(&[("bench", me), ("outboxd", pid)], &[("outboxd", pid)]);
                d = drive(
                    &daemon_client,
                    "daemon enqueue",
                    n,
                    o.producers,
                    deadline,
                    StatusCode::ACCEPTED,
                    daemon_make.clone(),
                )
                .await;
                enq_cpu.add(snap);
            } else {
                let snap =
                    CpuSnap::take(&[("bench", me), ("baseline_server", baseline.pid())], &[]);
                b = drive(
                    &base_client,
                    "baseline enqueue",
                    n,
                    o.producers,
                    deadline,
                    StatusCode::ACCEPTED,
                    base_make.clone(),
                )
                .await;
                base_cpu.add(snap);
            }
        }
        round_ratios.push(round(d.rate() / b.rate().max(1e-9), 3));
        let failed = b.errors + d.errors > 0;
        base.merge(b);
        enq.merge(d);
        if failed {
            eprintln!(
                "  enqueue: stopping after round {} because of errors",
                r + 1
            );
            break;
        }
    }
    let (enq_rss_max, enq_rss_mean, _) = sampler.finish();
    let enq_hwm = proc_status_kib(pid, "VmHWM").unwrap_or(0);
    let base_cpu = base_cpu.report(base.ok);
    let enq_cpu = enq_cpu.report(enq.ok);
    let queued = daemon.integration(&c).await?["queue_depth"]
        .as_u64()
        .unwrap_or(0) as usize;
    drop((base_client, daemon_client));
    drop(baseline);

    // -- delivery -------------------------------------------------------------
    let (plain1, plain1_stats, plain1_cpu) = plain_delivery(
        &o,
        &c,
        sink,
        body,
        "plain client delivery (before)",
        o.messages,
    )
    .await?;

    eprintln!("phase: daemon delivery of {queued} queued messages");
    sink_reset(&c, sink.addr, queued).await?;
    let rss_before_delivery = proc_status_kib(pid, "VmRSS").unwrap_or(0);
    let hwm_reset2 = reset_hwm(pid);
    let deadline = Instant::now() + o.phase_timeout;
    let snap = CpuSnap::take(
        &[("bench", me), ("outboxd", pid), ("sink", sink.pid())],
        &[("outboxd", pid)],
    );
    let sampler = RssSampler::start(pid, o.sample_every);
    let t0 = Instant::now();
    daemon.activate(&c, CONNECTION).await?;
    let delivered = sink_wait(&c, sink.addr, queued, deadline).await;
    let del_cpu = CpuAcc::of(snap, queued);
    let (del_rss_max, del_rss_mean, _) = sampler.finish();
    let del_hwm = proc_status_kib(pid, "VmHWM").unwrap_or(0);
    let (answered, del_stats) = delivered?;
    let (del_secs, first_at) = sink_times(answered, &del_stats, t0);
    // The daemon's own view: every message recorded sent.
    let (drained, final_state) = daemon.drained(&c, t0, deadline).await?;
    let rss_end = proc_status_kib(pid, "VmRSS").unwrap_or(0);
    let hwm_total = proc_status_kib(pid, "VmHWM").unwrap_or(0);

    let (plain2, plain2_stats, plain2_cpu) = plain_delivery(
        &o,
        &c,
        sink,
        body,
        "plain client delivery (after)",
        o.messages,
    )
    .await?;

    // -- results --------------------------------------------------------------
    let plain_mean = (plain1.rate() + plain2.rate()) / 2.0;
    let del_rate = queued as f64 / del_secs.max(1e-9);
    let enq_ratio = enq.rate() / base.rate().max(1e-9);
    let del_ratio = del_rate / plain_mean.max(1e-9);
    // What the ratios would be if CPU were the only limit and the machine
    // ours: the inverse ratio of CPU time per message, client and server
    // (or sink) together. Neighbours barely move it.
    let enq_cpu_ratio = cpu_per_msg(&base_cpu, &["bench", "baseline_server"])
        / cpu_per_msg(&enq_cpu, &["bench", "outboxd"]).max(1e-9);
    let plain_us = (cpu_per_msg(&plain1_cpu, &["bench", "sink"])
        + cpu_per_msg(&plain2_cpu, &["bench", "sink"]))
        / 2.0;
    let del_cpu_ratio = plain_us / cpu_per_msg(&del_cpu, &["bench", "outboxd", "sink"]).max(1e-9);
    let errors = base.errors + enq.errors + plain1.errors + plain2.errors;
    let complete = errors == 0
        && queued == o.messages
        && drained.is_some()
        && plain1_stats["distinct"] == o.messages
        && plain2_stats["distinct"] == o.messages;
    let result = json!({
        "enqueue": {
            "daemon_per_s": round(enq.rate(), 0),
            "baseline_per_s": round(base.rate(), 0),
            "ratio": round(enq_ratio, 3),
            "target": 0.5,
            "met": enq_ratio >= 0.5,
            "round_ratios": round_ratios,
            "cpu_cost_ratio": round(enq_cpu_ratio, 3),
            "daemon_secs": round(enq.secs, 3),
            "baseline_secs": round(base.secs, 3),
            "accepted": enq.ok,
            "errors": enq.errors + base.errors,
            "first_error": enq.first_error.clone().or(base.first_error.clone()),
            "queued_after": queued,
            "daemon_latency_us": enq.latency(),
            "baseline_latency_us": base.latency(),
            "cpu": { "daemon": enq_cpu, "baseline": base_cpu },
        },
        "delivery": {
            "daemon_per_s": round(del_rate, 0),
            "plain_per_s": [round(plain1.rate(), 0), round(plain2.rate(), 0)],
            "ratio": round(del_ratio, 3),
            "target": 0.7,
            "met": del_ratio >= 0.7,
            "cpu_cost_ratio": round(del_cpu_ratio, 3),
            "daemon_secs": round(del_secs, 3),
            "first_request_secs": round(first_at, 3),
            "drained_secs": drained.map(|s| round(s, 3)),
            "sink_requests": del_stats["total"],
            "sink_distinct": del_stats["distinct"],
            "duplicates": del_stats["total"].as_u64().unwrap_or(0).saturating_sub(del_stats["distinct"].as_u64().unwrap_or(0)),
            "daemon_errors": final_state["errors"],
            "plain_errors": plain1.errors + plain2.errors,
            "plain_latency_us": [plain1.latency(), plain2.latency()],
            "cpu": { "daemon": del_cpu, "plain": [plain1_cpu, plain2_cpu] },
        },
        "rss_kib": {
            "idle": idle_rss,
            "enqueue_hwm": enq_hwm,
            "enqueue_max_sampled": enq_rss_max,
            "enqueue_mean_sampled": enq_rss_mean,
            "before_delivery": rss_before_delivery,
            "delivery_hwm": del_hwm,
            "delivery_max_sampled": del_rss_max,
            "delivery_mean_sampled": del_rss_mean,
            "end": rss_end,
            "hwm_per_phase": hwm_reset && hwm_reset2,
            "hwm_last_phase_and_after": hwm_total,
        },
    });
    Ok((result, complete))
}

fn print_table(r: &Value) {
    eprintln!();
    eprintln!(
        "outbox-bench: {} messages, {} producers, {} B bodies, concurrency {}, {} cores{}",
        r["messages"],
        r["producers"],
        r["body_bytes"],
        r["concurrency"],
        r["cores"],
        if r["complete"] == true {
            ""
        } else {
            "  (INCOMPLETE: see the errors above)"
        }
    );
    if r["enqueue"].is_object() {
        print_main_phases(r);
    }
    if r["relay"].is_object() {
        print_relay(&r["relay"]);
    }
    eprintln!();
}

/// One line per process: cores used and CPU time per message, and the rest
/// of the machine.
fn print_cpu(label: &str, c: &Value) {
    let mut parts = Vec::new();
    for (name, cores) in c["cores"].as_object().into_iter().flatten() {
        parts.push(format!(
            "{name} {:.2} cores ({} µs/msg)",
            cores.as_f64().unwrap_or(0.0),
            c["cpu_us_per_msg"][name]
        ));
    }
    let m = &c["machine"];
    parts.push(format!(
        "others {:.2} cores, CPU pressure {}%",
        m["others_cores"].as_f64().unwrap_or(0.0),
        m["cpu_pressure_pct"]
    ));
    eprintln!("  {label:<20} {}", parts.join(", "));
}

/// A thread list of a CPU report, as `name/tid cores, ...`.
fn thread_list(v: &Value) -> String {
    let list: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| format!("{} {}", t[0].as_str().unwrap_or("?"), t[1]))
        .collect();
    list.join(", ")
}

fn print_relay(r: &Value) {
    let num = |v: &Value| format!("{:.0}", v.as_f64().unwrap_or(0.0));
    let mib = |v: &Value| format!("{:.1} MiB", v.as_f64().unwrap_or(0.0) / 1024.0);
    let m = &r["relay_rss_kib"];
    eprintln!(
        "relay: {} messages per delivery, {} round(s), relay concurrency {}, integration concurrency {}{}",
        r["messages"],
        r["rounds"],
        r["relay_concurrency"],
        r["integration_concurrency"],
        match r["relay_cpus"].as_str() {
            Some(cpus) => format!(", relay on CPUs {cpus}"),
            None => String::new(),
        }
    );
    eprintln!(
        "{:<10} {:>9} {:>9} {:>7} {:>8} {:>10} {:>22}",
        "msgs/s", "direct", "relay", "ratio", "target", "CPU ratio", "plain client"
    );
    let plain: Vec<String> = r["plain_per_s"]
        .as_array()
        .into_iter()
        .flatten()
        .map(num)
        .collect();
    eprintln!(
        "{:<10} {:>9} {:>9} {:>7.3} {:>8} {:>10.3} {:>22}",
        "delivery",
        num(&r["direct_per_s"]),
        num(&r["relay_per_s"]),
        r["ratio"].as_f64().unwrap_or(0.0),
        format!(
            "{} {}",
            if r["met"] == true { "met" } else { "<" },
            r["target"]
        ),
        r["cpu_cost_ratio"].as_f64().unwrap_or(0.0),
        plain.join(" / "),
    );
    let rounds: Vec<String> = r["round_details"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let mut others = String::new();
            for name in [SSH_CONNECTION, FORWARD_CONNECTION] {
                if let Some(v) = d[format!("relay_vs_{name}")].as_f64() {
                    let vs_direct = &d[format!("{name}_vs_direct")];
                    others.push_str(&format!("; relay/{name} {v}, {name}/direct {vs_direct}"));
                }
            }
            format!(
                "{} ({} first{others})",
                d["ratio"],
                d["first"].as_str().unwrap_or("?")
            )
        })
        .collect();
    eprintln!("  ratio per round: {}", rounds.join(", "));
    let t = &r["ssh_tunnel"];
    match t["skipped"].as_str() {
        Some(why) => eprintln!("ssh tunnel: comparison skipped: {why}"),
        None => {
            eprintln!(
                "ssh tunnel (ssh -L, {} {}, cipher {}): {} msg/s; relay/ssh {:.3} \
                 (CPU ratio {:.3}), ssh/direct {:.3} (CPU ratio {:.3})",
                t["client_version"].as_str().unwrap_or("?"),
                t["kex"].as_str().unwrap_or("?"),
                t["cipher"].as_str().unwrap_or("?"),
                num(&r["ssh_per_s"]),
                r["relay_vs_ssh"].as_f64().unwrap_or(0.0),
                r["relay_vs_ssh_cpu_cost_ratio"].as_f64().unwrap_or(0.0),
                r["ssh_vs_direct"].as_f64().unwrap_or(0.0),
                r["ssh_vs_direct_cpu_cost_ratio"].as_f64().unwrap_or(0.0),
            );
        }
    }
    if let Some(v) = r["relay_vs_forward"].as_f64() {
        eprintln!(
            "plain TCP forward (no encryption, no authentication): {} msg/s; relay/forward {v:.3} \
             (CPU ratio {:.3}), forward/direct {:.3} (CPU ratio {:.3})",
            num(&r["forward_per_s"]),
            r["relay_vs_forward_cpu_cost_ratio"].as_f64().unwrap_or(0.0),
            r["forward_vs_direct"].as_f64().unwrap_or(0.0),
            r["forward_vs_direct_cpu_cost_ratio"]
                .as_f64()
                .unwrap_or(0.0),
        );
    }
    eprintln!(
        "relay memory: idle {} (anon {}, file {}, {} threads; {} at connect) {} 10 MiB; \
         under load VmHWM {} (VmRSS max {}); 2 s after the load {}",
        mib(&m["idle"]["rss"]),
        mib(&m["idle"]["anon"]),
        mib(&m["idle"]["file"]),
        m["idle"]["threads"],
        mib(&m["at_connect"]["rss"]),
        if m["idle_met"] == true { "≤" } else { ">" },
        mib(&m["load_hwm"]),
        mib(&m["load_max_sampled"]),
        mib(&m["after_load"]["rss"]),
    );
    eprintln!("CPU over the relay phase's deliveries:");
    print_cpu("direct", &r["cpu"]["direct"]);
    print_cpu("through the relay", &r["cpu"]["relay"]);
    if r["cpu"]["ssh"].is_object() {
        print_cpu("through ssh -L", &r["cpu"]["ssh"]);
    }
    if r["cpu"]["forward"].is_object() {
        print_cpu("through the forward", &r["cpu"]["forward"]);
    }
    print_cpu("plain client", &r["cpu"]["plain"][0]);
    let all = &r["cpu_us_per_msg_all"];
    eprintln!(
        "  every process, µs/msg: direct {:.1}, relay {:.1}{}{}",
        all["direct"].as_f64().unwrap_or(0.0),
        all["relay"].as_f64().unwrap_or(0.0),
        match all["ssh"].as_f64() {
            Some(v) => format!(", ssh {v:.1}"),
            None => String::new(),
        },
        match all["forward"].as_f64() {
            Some(v) => format!(", forward {v:.1}"),
            None => String::new(),
        }
    );
    eprintln!(
        "  outboxd threads (cores), direct: {}",
        thread_list(&r["cpu"]["direct"]["daemon_threads"])
    );
    eprintln!(
        "  outboxd threads (cores), relay:  {}",
        thread_list(&r["cpu"]["relay"]["daemon_threads"])
    );
    eprintln!(
        "  relay threads (cores):           {}",
        thread_list(&r["cpu"]["relay"]["relay_threads"])
    );
}

fn print_main_phases(r: &Value) {
    let (e, d, m) = (&r["enqueue"], &r["delivery"], &r["rss_kib"]);
    let num = |v: &Value| format!("{:.0}", v.as_f64().unwrap_or(0.0));
    let mib = |v: &Value| format!("{:.1} MiB", v.as_f64().unwrap_or(0.0) / 1024.0);
    let row = |name: &str, f: &Value, base: &Value| {
        let base = match base.as_array() {
            Some(b) => b.iter().map(num).collect::<Vec<_>>().join(" / "),
            None => num(base),
        };
        eprintln!(
            "{:<10} {:>9} {:>22} {:>7.3} {:>8} {:>10.3}",
            name,
            num(&f["daemon_per_s"]),
            base,
            f["ratio"].as_f64().unwrap_or(0.0),
            format!(
                "{} {}",
                if f["met"] == true { "met" } else { "<" },
                f["target"]
            ),
            f["cpu_cost_ratio"].as_f64().unwrap_or(0.0),
        )
    };
    eprintln!(
        "{:<10} {:>9} {:>22} {:>7} {:>8} {:>10}",
        "msgs/s", "outboxd", "baseline", "ratio", "target", "CPU ratio"
    );
    row("enqueue", e, &e["baseline_per_s"]);
    row("delivery", d, &d["plain_per_s"]);
    eprintln!(
        "enqueue latency p50/p99: outboxd {}/{} µs, baseline {}/{} µs",
        e["daemon_latency_us"]["p50"],
        e["daemon_latency_us"]["p99"],
        e["baseline_latency_us"]["p50"],
        e["baseline_latency_us"]["p99"]
    );
    eprintln!(
        "delivery: first request {} s after activation, every key at the sink after {} s, \
         every message recorded sent after {} s; {} duplicate(s), {} error(s)",
        d["first_request_secs"],
        d["daemon_secs"],
        d["drained_secs"],
        d["duplicates"],
        d["daemon_errors"]
    );
    eprintln!(
        "outboxd memory: idle {}; enqueue VmHWM {} (VmRSS max {}); delivery VmHWM {} (VmRSS max {}); end {}",
        mib(&m["idle"]),
        mib(&m["enqueue_hwm"]),
        mib(&m["enqueue_max_sampled"]),
        mib(&m["delivery_hwm"]),
        mib(&m["delivery_max_sampled"]),
        mib(&m["end"])
    );
    eprintln!("CPU over each phase:");
    print_cpu("enqueue, outboxd", &e["cpu"]["daemon"]);
    print_cpu("enqueue, baseline", &e["cpu"]["baseline"]);
    print_cpu("delivery, outboxd", &d["cpu"]["daemon"]);
    print_cpu("delivery, plain", &d["cpu"]["plain"][0]);
    let (te, td) = (
        &e["cpu"]["daemon"]["daemon_threads"],
        &d["cpu"]["daemon"]["daemon_threads"],
    );
    eprintln!("  outboxd threads (cores), enqueue:  {}", thread_list(te));
    eprintln!("  outboxd threads (cores), delivery: {}", thread_list(td));
}

// ---------------------------------------------------------------------------
// The relay phase: the same deliveries direct and through `outbox-relay`.

/// The relay process, killed when dropped.
struct RelayProc {
    child: Killed,
    log: PathBuf,
}

impl RelayProc {
    /// Starts `outbox-relay` against the daemon's tunnel, allowed to reach
    /// the sink only, and waits until the daemon lists its session.
    async fn start(
        o: &Opts,
        exe: &std::path::Path,
        c: &HttpClient,
        daemon: &Daemon,
        sink: SocketAddr,
    ) -> Result<RelayProc> {
        let t = daemon
            .tunnel
            .as_ref()
            .ok_or_else(|| anyhow!("the daemon was started without a tunnel"))?;
        let dir = daemon.dir.path();
        let config = dir.join("relay.toml");
        let path = |f: &str| t.pki.join(f).display().to_string();
        std::fs::write(
            &config,
            format!(
                "name = \"{MID_SERVER}\"\n\
                 token = {{ file = {token:?} }}\n\
                 daemons = [\"{daemon}\"]\n\
                 server_ca = {ca:?}\n\
                 allow = [\"{sink}\"]\n\
                 concurrency = {conc}\n\
                 max_body = \"16MiB\"\n",
                token = path("relay-token"),
                daemon = t.listen,
                ca = path("ca.crt"),
                conc = o.relay_concurrency,
            ),
        )?;
        let log = dir.join("relay.log");
        let out = std::fs::File::create(&log)?;
        let child = pinned(exe, o.relay_cpus.as_deref())
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let mut r = RelayProc {
            child: Killed(child),
            log,
        };
        wait_ready(
            "outbox-relay to connect to outboxd",
            START_LIMIT,
            &mut [("outbox-relay", &mut r.child, &r.log)],
            || async {
                let sessions = daemon.api(c, Method::GET, "/v1/mid-servers", None).await?;
                Ok(sessions
                    .as_array()
                    .is_some_and(|a| a.iter().any(|s| s["name"] == MID_SERVER)))
            },
        )
        .await?;
        Ok(r)
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// VmRSS and what it is made of, thread count, in KiB.
    fn memory(&self) -> Value {
        let pid = self.pid();
        let f = |k: &str| proc_status_kib(pid, k).unwrap_or(0);
        json!({
            "rss": f("VmRSS"),
            "anon": f("RssAnon"),
            "file": f("RssFile"),
            "hwm": f("VmHWM"),
            "threads": f("Threads"),
        })
    }
}

// ---------------------------------------------------------------------------
// The ssh tunnel: the same deliveries through `ssh -L`, the general-purpose
// tunnel users compare the relay with.

/// A directory the bench created outside its temporary dir, removed when
/// dropped (if still empty).
struct CreatedDir(PathBuf);

impl Drop for CreatedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The login name of the user the bench runs as.
fn current_user() -> Result<String> {
    if let Ok(out) = Command::new("id").arg("-un").stdin(Stdio::null()).output() {
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !name.is_empty() {
            return Ok(name);
        }
    }
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .context("the current user's name: `id -un` failed and $USER is not set")
}

/// A private sshd on a free loopback port and an `ssh -N -L` through it to
/// the sink. Dropped in field order: ssh, then sshd with the process that
/// serves the session, then sshd's privilege separation dir if the bench
/// made it.
struct SshTunnel {
    ssh: Killed,
    sshd: Killed,
    _privsep: Option<CreatedDir>,
    /// The local end of the forwarding, which the `ssh` connection targets.
    fwd: SocketAddr,
    ssh_log: PathBuf,
    sshd_log: PathBuf,
    connect_secs: f64,
}

impl SshTunnel {
    /// Writes keys and an sshd config into `dir`, starts sshd, then `ssh -L`
    /// from the port `fwd` holds to the sink, and waits until that port
    /// accepts connections.
    async fn start(
        bins: &SshBins,
        dir: &std::path::Path,
        sink: SocketAddr,
        fwd: std::net::TcpListener,
    ) -> Result<SshTunnel> {
        let started = Instant::now();
        let dir = dir.join("ssh");
        std::fs::create_dir_all(&dir)?;
        let (host_key, client_key) = (dir.join("host_ed25519"), dir.join("client_ed25519"));
        for key in [&host_key, &client_key] {
            run_checked(
                Command::new(&bins.keygen)
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", "outbox-bench", "-f"])
                    .arg(key),
                "ssh-keygen",
            )?;
        }
        let public = std::fs::read_to_string(dir.join("client_ed25519.pub"))?;
        // The key may forward to the sink and do nothing else.
        let authorized = dir.join("authorized_keys");
        std::fs::write(
            &authorized,
            format!("restrict,port-forwarding,permitopen=\"{sink}\" {public}"),
        )?;
        let user = current_user()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = dir.join("sshd_config");
        let quoted = |p: &std::path::Path| format!("\"{}\"", p.display());
        std::fs::write(
            &config,
            format!(
                "# The bench's own sshd: loopback only, public key only, files in {dir}.\n\
                 ListenAddress 127.0.0.1\n\
                 Port {port}\n\
                 HostKey {host_key}\n\
                 AuthorizedKeysFile {authorized}\n\
                 PidFile {pid}\n\
                 AllowUsers {user}\n\
                 PermitRootLogin prohibit-password\n\
                 AuthenticationMethods publickey\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 AllowTcpForwarding yes\n\
                 AllowAgentForwarding no\n\
                 X11Forwarding no\n\
                 PermitTTY no\n\
                 PrintMotd no\n\
                 UseDNS no\n",
                dir = dir.display(),
                host_key = quoted(&host_key),
                authorized = quoted(&authorized),
                pid = quoted(&dir.join("sshd.pid")),
            ),
        )?;
        // Started as root, sshd needs its privilege separation directory
        // (/run/sshd on Debian, made by its service unit); it names the
        // directory when missing, and the bench makes it for the run.
        let check = || {
            run_checked(
                Command::new(&bins.sshd).arg("-t").arg("-f").arg(&config),
                "sshd -t",
            )
        };
        let mut privsep = None;
        if let Err(e) = check() {
            let text = e.to_string();
            let missing = text.lines().find_map(|l| {
                let at = l.find("Missing privilege separation directory:")?;
                let d = &l[at + "Missing privilege separation directory:".len()..];
                Some(PathBuf::from(d.trim()))
            });
            let Some(d) = missing else {
                return Err(e);
            };
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(&d)
                .with_context(|| format!("creating sshd's directory {}", d.display()))?;
            privsep = Some(CreatedDir(d));
            check()?;
        }
        let sshd_log = dir.join("sshd.log");
        let log = std::fs::File::create(&sshd_log)?;
        let sshd = Command::new(&bins.sshd)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bins.sshd.display()))?;
        let mut sshd = Killed(sshd);
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        wait_accepting(listen, START_LIMIT, &mut [("sshd", &mut sshd, &sshd_log)]).await?;
        let fwd_addr = fwd.local_addr()?;
        drop(fwd);
        let ssh_log = dir.join("ssh.log");
        let log = std::fs::File::create(&ssh_log)?;
        // -v: the log names the negotiated algorithms. -F /dev/null: no
        // user or system ssh_config, ssh's own defaults (cipher included).
        let ssh = Command::new(&bins.ssh)
            .arg("-v")
            .args(["-F", "/dev/null", "-N", "-L"])
            .arg(format!("{fwd_addr}:{}:{}", sink.ip(), sink.port()))
            .arg("-p")
            .arg(port.to_string())
            .arg("-i")
            .arg(&client_key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ExitOnForwardFailure=yes",
                "-o",
                "IdentitiesOnly=yes",
            ])
            .arg(format!("{user}@127.0.0.1"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bins.ssh.display()))?;
        let mut t = SshTunnel {
            ssh: Killed(ssh),
            sshd,
            _privsep: privsep,
            fwd: fwd_addr,
            ssh_log,
            sshd_log,
            connect_secs: 0.0,
        };
        wait_accepting(
            fwd_addr,
            START_LIMIT,
            &mut [
                ("ssh", &mut t.ssh, &t.ssh_log),
                ("sshd", &mut t.sshd, &t.sshd_log),
            ],
        )
        .await?;
        t.connect_secs = started.elapsed().as_secs_f64();
        Ok(t)
    }

    /// The processes whose CPU counts as the tunnel's: sshd (with what it
    /// forks) and ssh.
    fn pids(&self) -> [u32; 2] {
        [self.sshd.pid(), self.ssh.pid()]
    }

    /// What ssh negotiated, from its `-v` log, and the processes' count.
    fn info(&self) -> Value {
        let log = std::fs::read_to_string(&self.ssh_log).unwrap_or_default();
        let after = |prefix: &str| {
            log.lines()
                .find_map(|l| l.split_once(prefix).map(|(_, v)| v.trim().to_string()))
        };
        // "debug1: kex: client->server cipher: C MAC: M compression: Z"
        let c2s = after("kex: client->server cipher:").unwrap_or_default();
        let mut words = c2s.split_whitespace();
        let cipher = words.next().map(str::to_string);
        let mac = words.nth(1).map(str::to_string);
        let forwarded = log
            .lines()
            .filter(|l| l.contains("Connection to port") && l.contains("requested"))
            .count();
        json!({
            "forward": format!("{} -> sink", self.fwd),
            "client_version": log
                .lines()
                .find(|l| l.starts_with("OpenSSH"))
                .map(|l| l.split(',').next().unwrap_or(l).to_string()),
            "server_version": after("remote software version"),
            "kex": after("kex: algorithm:"),
            "cipher": cipher,
            "mac": mac,
            "connect_secs": round(self.connect_secs, 3),
            "forwarded_connections": forwarded,
            "processes": process_tree(&self.pids()).len(),
        })
    }
}

/// How long a helper process (sshd, the ssh tunnel) may take to accept
/// connections.
const START_LIMIT: Duration = Duration::from_secs(30);

/// Polls `ready` until it says yes, while each of `procs` (name,
/// process, log) keeps running; fails with their logs' tails if one exits
/// first or `limit` passes. The one start-up wait of every process the
/// bench starts.
async fn wait_ready<F: std::future::Future<Output = Result<bool>>>(
    what: &str,
    limit: Duration,
    procs: &mut [(&str, &mut Killed, &std::path::Path)],
    mut ready: impl FnMut() -> F,
) -> Result<()> {
    let until = Instant::now() + limit;
    let logs = |procs: &[(&str, &mut Killed, &std::path::Path)]| {
        procs
            .iter()
            .map(|(name, _, log)| format!("{name}:\n{}", log_tail(log)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    loop {
        for i in 0..procs.len() {
            if let Some(status) = procs[i].1 .0.try_wait()? {
                bail!(
                    "{} exited at start ({status}):\n{}",
                    procs[i].0,
                    logs(procs)
                );
            }
        }
        if ready().await? {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("still waiting for {what} after {limit:?}:\n{}", logs(procs));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `addr` accepts connections; see [`wait_ready`].
async fn wait_accepting(
    addr: SocketAddr,
    limit: Duration,
    procs: &mut [(&str, &mut Killed, &std::path::Path)],
) -> Result<()> {
    wait_ready(
        &format!("{addr} to accept connections"),
        limit,
        procs,
        || async move { Ok(tokio::net::TcpStream::connect(addr).await.is_ok()) },
    )
    .await
}

/// Runs `cmd` to completion (stdin closed) and fails, with what it printed,
/// unless it succeeds.
fn run_checked(cmd: &mut Command, what: &str) -> Result<std::process::Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// One timed delivery of the daemon through one of its connections.
struct Delivery {
    secs: f64,
    first_secs: f64,
    drained_secs: Option<f64>,
    stats: Value,
    daemon_errors: Value,
    /// Relay VmHWM and VmRSS max/mean sampled over the delivery.
    relay_rss: (u64, u64, u64),
}

/// Enqueues `n` messages with the integration off, activates `connection`,
/// and times until the sink has every key; then waits until the daemon
/// records them all sent. CPU goes to `cpu` (the ssh tunnel's too, when it
/// runs, whichever connection delivers).
#[allow(clippy::too_many_arguments)]
async fn timed_delivery(
    o: &Opts,
    c: &HttpClient,
    daemon: &Daemon,
    sink: &Proc,
    relay: &RelayProc,
    ssh: Option<&SshTunnel>,
    forward: Option<&Proc>,
    body: &Bytes,
    connection: &str,
    n: usize,
    cpu: &mut CpuAcc,
) -> Result<Delivery> {
    let deadline = Instant::now() + o.phase_timeout;
    let state = daemon.integration(c).await?;
    if state["state"] != "off" {
        let path = format!("/v1/integrations/{INTEGRATION}/deactivate");
        daemon.api(c, Method::POST, &path, None).await?;
    }
    let load = drive(
        &client(),
        "enqueue",
        n,
        o.producers,
        deadline,
        StatusCode::ACCEPTED,
        enqueue_request(&daemon.url, body),
    )
    .await;
    if load.errors > 0 {
        bail!(
            "enqueue before the {connection} delivery: {} error(s), first: {}",
            load.errors,
            load.first_error.unwrap_or_default()
        );
    }
    let queued = daemon.integration(c).await?["queue_depth"]
        .as_u64()
        .unwrap_or(0) as usize;
    if queued != n {
        bail!("{queued} messages queued before the {connection} delivery, expected {n}");
    }
    eprintln!("phase: {connection} delivery of {n} messages");
    sink_reset(c, sink.addr, n).await?;
    let (pid, rpid) = (daemon.pid(), relay.pid());
    reset_hwm(rpid);
    let sampler = RssSampler::start(rpid, o.sample_every);
    let mut procs = vec![
        ("bench", std::process::id()),
        ("outboxd", pid),
        ("sink", sink.pid()),
        ("relay", rpid),
    ];
    if let Some(f) = forward {
        procs.push(("forward", f.pid()));
    }
    let snap = CpuSnap::take(&procs, &[("outboxd", pid), ("relay", rpid)]);
    let snap = match ssh {
        Some(t) => snap.with_tree("ssh", &t.pids()),
        None => snap,
    };
    let t0 = Instant::now();
    daemon.activate(c, connection).await?;
    let delivered = sink_wait(c, sink.addr, n, deadline).await;
    cpu.add(snap);
    let (rss_max, rss_mean, _) = sampler.finish();
    let hwm = proc_status_kib(rpid, "VmHWM").unwrap_or(0);
    let (answered, stats) = delivered.map_err(|e| anyhow!("{e}\n{}", relay.log_tail()))?;
    let (secs, first_secs) = sink_times(answered, &stats, t0);
    let (drained_secs, state) = daemon.drained(c, t0, deadline).await?;
    Ok(Delivery {
        secs,
        first_secs,
        drained_secs,
        stats,
        daemon_errors: state["errors"].clone(),
        relay_rss: (hwm, rss_max, rss_mean),
    })
}

/// The relay phase: starts the relay, measures its idle memory, starts the
/// ssh tunnel when `ssh_port` is given, then runs `--relay-rounds` rounds
/// of a plain-client delivery (for context) and one delivery through each
/// connection (direct, relay, ssh, the plain TCP `forward` when given), the
/// order rotating between rounds.
#[allow(clippy::too_many_arguments)]
async fn relay_phase(
    o: &Opts,
    c: &HttpClient,
    sink: &Proc,
    daemon: &Daemon,
    body: &Bytes,
    exe: &std::path::Path,
    ssh_port: Option<std::net::TcpListener>,
    forward: Option<&Proc>,
) -> Result<(Value, bool)> {
    let n = o.relay_messages;
    eprintln!(
        "phase: relay: start outbox-relay (concurrency {}), {} round(s) of {n} messages direct and through it",
        o.relay_concurrency, o.relay_rounds
    );
    let started = Instant::now();
    let relay = RelayProc::start(o, exe, c, daemon, sink.addr).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    let at_connect = relay.memory();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = relay.memory();
    let idle_rss = idle["rss"].as_u64().unwrap_or(0);

    // The ssh tunnel, or why there is none.
    let (ssh, ssh_skipped) = match (&o.ssh, ssh_port) {
        (Err(why), _) => (None, Some(why.clone())),
        (Ok(_), None) => (None, Some("no port for the tunnel".to_string())),
        (Ok(bins), Some(port)) => {
            eprintln!("phase: relay: start sshd and ssh -L to the sink");
            match SshTunnel::start(bins, daemon.dir.path(), sink.addr, port).await {
                Ok(t) => (Some(t), None),
                Err(e) => (None, Some(format!("the ssh tunnel did not start: {e:#}"))),
            }
        }
    };
    if let Some(why) = &ssh_skipped {
        eprintln!("  ssh comparison skipped: {why}");
    }
    let mut conns = vec![CONNECTION, RELAY_CONNECTION];
    if ssh.is_some() {
        conns.push(SSH_CONNECTION);
    }
    if forward.is_some() {
        conns.push(FORWARD_CONNECTION);
    }
    let at = |conn: &str| conns.iter().position(|c| *c == conn);

    let mut cpu: Vec<CpuAcc> = conns.iter().map(|_| CpuAcc::default()).collect();
    let mut secs = vec![0.0f64; conns.len()];
    let mut rounds = Vec::new();
    let mut plain = Vec::new();
    let (mut peak_hwm, mut peak_sampled) = (0u64, 0u64);
    let mut complete = true;
    for r in 0..o.relay_rounds {
        let (p, p_stats, p_cpu) =
            plain_delivery(o, c, sink, body, "plain client delivery", n).await?;
        complete &= p.errors == 0 && p_stats["distinct"] == n;
        plain.push((p, p_cpu));
        let mut order = conns.clone();
        order.rotate_left(r % conns.len());
        let mut round_json = json!({ "first": order[0], "order": order });
        let mut rates = vec![0.0f64; conns.len()];
        for &conn in &order {
            let k = at(conn).expect("a connection of the list");
            let d = timed_delivery(
                o,
                c,
                daemon,
                sink,
                &relay,
                ssh.as_ref(),
                forward,
                body,
                conn,
                n,
                &mut cpu[k],
            )
            .await?;
            let rate = n as f64 / d.secs.max(1e-9);
            let duplicates = d.stats["total"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(d.stats["distinct"].as_u64().unwrap_or(0));
            complete &= d.drained_secs.is_some()
                && d.stats["distinct"] == n
                && d.daemon_errors.as_u64().unwrap_or(0) == 0;
            secs[k] += d.secs;
            rates[k] = rate;
            if conn == RELAY_CONNECTION {
                peak_hwm = peak_hwm.max(d.relay_rss.0);
                peak_sampled = peak_sampled.max(d.relay_rss.1);
            }
            eprintln!(
                "  {conn}: {rate:.0} msg/s, every key at the sink after {:.3} s",
                d.secs
            );
            round_json[conn] = json!({
                "per_s": round(rate, 0),
                "secs": round(d.secs, 3),
                "first_request_secs": round(d.first_secs, 3),
                "drained_secs": d.drained_secs.map(|s| round(s, 3)),
                "sink_requests": d.stats["total"],
                "duplicates": duplicates,
                "daemon_errors": d.daemon_errors,
                "relay_hwm_kib": d.relay_rss.0,
                "relay_rss_max_sampled_kib": d.relay_rss.1,
                "relay_rss_mean_sampled_kib": d.relay_rss.2,
            });
        }
        let (direct, through_relay) = (rates[0], rates[1]);
        round_json["ratio"] = json!(round(through_relay / direct.max(1e-9), 3));
        for name in [SSH_CONNECTION, FORWARD_CONNECTION] {
            let Some(k) = at(name) else { continue };
            round_json[format!("relay_vs_{name}")] =
                json!(round(through_relay / rates[k].max(1e-9), 3));
            round_json[format!("{name}_vs_direct")] = json!(round(rates[k] / direct.max(1e-9), 3));
        }
        rounds.push(round_json);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = relay.memory();
    let ssh_info = ssh.as_ref().map(|t| t.info());
    drop(ssh);
    drop(relay);

    let total = n * o.relay_rounds;
    let rate: Vec<f64> = secs.iter().map(|s| total as f64 / s.max(1e-9)).collect();
    let (direct_rate, relay_rate) = (rate[0], rate[1]);
    let ratio = relay_rate / direct_rate.max(1e-9);
    let plain_rates: Vec<f64> = plain.iter().map(|(p, _)| round(p.rate(), 0)).collect();
    let plain_mean = plain.iter().map(|(p, _)| p.rate()).sum::<f64>() / plain.len().max(1) as f64;
    let cpu: Vec<Value> = cpu.iter().map(|a| a.report(total)).collect();
    // Every process taking part, the ssh tunnel's and the forward's
    // included when they run (idle, they add next to nothing to the other
    // deliveries).
    let everyone = ["bench", "outboxd", "sink", "relay", "ssh", "forward"];
    let us: Vec<f64> = cpu.iter().map(|c| cpu_per_msg(c, &everyone)).collect();
    let cpu_ratio = us[0] / us[1].max(1e-9);
    let mut result = json!({
        "messages": n,
        "rounds": o.relay_rounds,
        "relay_concurrency": o.relay_concurrency,
        "integration_concurrency": o.concurrency,
        "relay_cpus": o.relay_cpus,
        "direct_per_s": round(direct_rate, 0),
        "relay_per_s": round(relay_rate, 0),
        "ratio": round(ratio, 3),
        "target": 0.8,
        "met": ratio >= 0.8,
        "cpu_cost_ratio": round(cpu_ratio, 3),
        "plain_per_s": plain_rates,
        "direct_vs_plain": round(direct_rate / plain_mean.max(1e-9), 3),
        "relay_vs_plain": round(relay_rate / plain_mean.max(1e-9), 3),
        "ssh_per_s": null,
        "relay_vs_ssh": null,
        "ssh_vs_direct": null,
        "ssh_tunnel": { "skipped": ssh_skipped },
        "forward_per_s": null,
        "relay_vs_forward": null,
        "forward_vs_direct": null,
        "round_details": rounds,
        "relay_rss_kib": {
            "connect_secs": round(connect_secs, 3),
            "at_connect": at_connect,
            "idle": idle,
            "idle_target": 10 * 1024,
            "idle_met": idle_rss > 0 && idle_rss <= 10 * 1024,
            "load_hwm": peak_hwm,
            "load_max_sampled": peak_sampled,
            "after_load": after,
        },
        "cpu_us_per_msg_all": {
            "direct": round(us[0], 1),
            "relay": round(us[1], 1),
        },
        "cpu": {
            "direct": cpu[0],
            "relay": cpu[1],
            "plain": plain.iter().map(|(_, c)| c.clone()).collect::<Vec<_>>(),
        },
    });
    // Each comparison that ran, under its connection's name: its rate,
    // the relay against it, it against direct, and, as `cpu_cost_ratio`,
    // the ratios the rates would have if CPU were the only limit.
    for name in [SSH_CONNECTION, FORWARD_CONNECTION] {
        let Some(k) = at(name) else { continue };
        result[format!("{name}_per_s")] = json!(round(rate[k], 0));
        result[format!("relay_vs_{name}")] = json!(round(relay_rate / rate[k].max(1e-9), 3));
        result[format!("{name}_vs_direct")] = json!(round(rate[k] / direct_rate.max(1e-9), 3));
        result[format!("relay_vs_{name}_cpu_cost_ratio")] =
            json!(round(us[k] / us[1].max(1e-9), 3));
        result[format!("{name}_vs_direct_cpu_cost_ratio")] =
            json!(round(us[0] / us[k].max(1e-9), 3));
        result["cpu_us_per_msg_all"][name] = json!(round(us[k], 1));
        result["cpu"][name] = cpu[k].clone();
    }
    if let Some(info) = ssh_info {
        result["ssh_tunnel"] = info;
        result["ssh_tunnel"]["skipped"] = Value::Null;
    }
    Ok((result, complete))
}
