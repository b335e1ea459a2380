//! The relay ("MID server") end to end: `outbox pki init` sets up the
//! tunnel, a real `outbox-relay` dials out to a real `outboxd` over QUIC on
//! loopback and performs requests against a local sink. Delivery through
//! the relay, messages waiting for an absent relay, a wrong token, the
//! allow-list, `kill -9` of a relay (alone and in a cluster of two), a relay
//! that starts before its daemon, and `--check-config`.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use outbox_tests::{free_udp_port, OAuthServer, Relay};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// What `outbox pki init` wrote, in a temporary directory.
struct Pki {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Pki {
    /// Runs `outbox pki init DIR --host localhost --host 127.0.0.1
    /// --mid-server dc1`, as a user would, and checks what it wrote.
    fn init() -> Pki {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("pki");
        let out = Command::new(bin("outbox"))
            .args(["pki", "init"])
            .arg(&dir)
            .args(["--host", "localhost", "--host", "127.0.0.1"])
            .args(["--mid-server", "dc1"])
            .output()
            .expect("outbox runs");
        assert!(
            out.status.success(),
            "pki init failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = std::fs::canonicalize(&dir).expect("pki dir");
        for (f, private) in [
            ("ca.crt", false),
            ("ca.key", true),
            ("daemon.crt", false),
            ("daemon.key", true),
            ("relay-token", true),
            ("outboxd.toml", false),
            ("relay.toml", false),
        ] {
            let meta = std::fs::metadata(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
            if private {
                use std::os::unix::fs::PermissionsExt;
                assert_eq!(meta.permissions().mode() & 0o077, 0, "{f} is private");
            }
        }
        let token = std::fs::read_to_string(dir.join("relay-token")).unwrap();
        assert!(token.trim().len() >= 16, "a real token: {token:?}");
        // Running it again never overwrites keys.
        let again = Command::new(bin("outbox"))
            .args(["pki", "init"])
            .arg(&dir)
            .output()
            .expect("outbox runs");
        assert_eq!(
            again.status.code(),
            Some(1),
            "pki init refuses to overwrite"
        );
        Pki { _tmp: tmp, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.path("relay-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The `outboxd.toml` snippet `pki init` wrote, listening on loopback.
    fn daemon_config(&self, tunnel_port: u16) -> String {
        let text = std::fs::read_to_string(self.path("outboxd.toml")).unwrap();
        for needle in ["[tunnel]", "[mid_servers.dc1]", "daemon.crt", "relay-token"] {
            assert!(
                text.contains(needle),
                "outboxd.toml lacks {needle}:\n{text}"
            );
        }
        assert!(text.contains("listen = \"0.0.0.0:4433\""), "{text}");
        text.replace("0.0.0.0:4433", &format!("127.0.0.1:{tunnel_port}"))
    }

    /// The `relay.toml` `pki init` wrote, pointed at this test's files,
    /// daemons and targets.
    fn relay_config(&self, daemons: &[u16], allow: &[String]) -> toml::Table {
        let text = std::fs::read_to_string(self.path("relay.toml")).unwrap();
        let mut t: toml::Table = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("relay.toml does not parse: {e}\n{text}"));
        assert_eq!(t.get("name").and_then(|v| v.as_str()), Some("dc1"));
        for key in [
            "token",
            "daemons",
            "server_ca",
            "allow",
            "concurrency",
            "max_body",
        ] {
            assert!(t.contains_key(key), "relay.toml lacks {key}:\n{text}");
        }
        let path = |p: PathBuf| toml::Value::String(p.display().to_string());
        let mut token = toml::Table::new();
        token.insert("file".into(), path(self.path("relay-token")));
        t.insert("token".into(), toml::Value::Table(token));
        t.insert(
            "daemons".into(),
            toml::Value::Array(
                daemons
                    .iter()
                    .map(|p| toml::Value::String(format!("127.0.0.1:{p}")))
                    .collect(),
            ),
        );
        t.insert("server_ca".into(), path(self.path("ca.crt")));
        t.insert(
            "allow".into(),
            toml::Value::Array(allow.iter().cloned().map(toml::Value::String).collect()),
        );
        t.insert("drain".into(), toml::Value::String("5s".into()));
        let mut log = toml::Table::new();
        log.insert("level".into(), "info,outbox_relay=debug".into());
        t.insert("log".into(), toml::Value::Table(log));
        t
    }
}

/// `outbox-relay --config FILE --check-config`.
fn check_config(dir: &Path, text: &str) -> Output {
    let path = write(dir, "check.toml", text);
    Command::new(bin("outbox-relay"))
        .arg("--config")
        .arg(path)
        .arg("--check-config")
        .output()
        .expect("outbox-relay runs")
}

/// A daemon whose tunnel is the one `pki init` described, on `tunnel_port`.
async fn daemon(pki: &Pki, tunnel_port: u16) -> Daemon {
    suite_daemon()
        .config_toml(&pki.daemon_config(tunnel_port))
        .start()
        .await
}

/// One integration whose active connection goes through MID server dc1.
fn relayed(name: &str, url: &str, concurrency: u32) -> String {
    relayed_with(name, url, "").replace(
        "concurrency = 4\n",
        &format!("concurrency = {concurrency}\n"),
    )
}

/// One integration whose active connection "dc" goes through MID server
/// dc1, with `more` keys of the connection (TOML lines, each starting with
/// a newline).
fn relayed_with(name: &str, url: &str, more: &str) -> String {
    integration(
        name,
        &[&connection(
            "dc",
            "production",
            url,
            &format!("active = true\n  mid_server = \"dc1\"{more}"),
        )],
    )
}

async fn apply(d: &Daemon, doc: &str) {
    let (s, v) = d.apply(doc).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

fn allow(sink: &Sink) -> Vec<String> {
    vec![sink.addr().to_string()]
}

async fn sessions(d: &Daemon) -> Vec<Value> {
    let (s, v) = d.get("/v1/mid-servers").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v.as_array().expect("a list").clone()
}

/// Waits until exactly `n` relay sessions are listed.
async fn wait_sessions(d: &Daemon, n: usize, timeout: Duration) -> Vec<Value> {
    eventually_msg(timeout, &format!("{n} relay session(s)"), async || {
        let s = sessions(d).await;
        (s.len() == n).then_some(s)
    })
    .await
}

async fn send(d: &Daemon, integration: &str, body: Value) -> String {
    let (s, v) = d
        .post_json(&format!("/v1/integrations/{integration}/messages"), body)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

/// Enqueues `n` messages to `integration` from eight concurrent producers;
/// returns their ids.
fn produce(d: &Daemon, integration: &str, n: usize) -> tokio::task::JoinHandle<Vec<String>> {
    const PRODUCERS: usize = 8;
    let api = d.api_client();
    let integration = integration.to_string();
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for p in 0..PRODUCERS {
            let api = api.clone();
            let integration = integration.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in (p..n).step_by(PRODUCERS) {
                    let body = json!({"message": "Create", "body": {"n": i}});
                    let (s, v) = api.enqueue(&integration, &body).await.expect("enqueue");
                    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
                    ids.push(v["id"].as_str().unwrap().to_string());
                }
                ids
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.extend(t.await.expect("producer"));
        }
        ids
    })
}

/// Waits until every id is `sent`, then returns each message with its
/// attempts.
async fn all_sent(d: &Daemon, integration: &str, ids: &[String], timeout: Duration) -> Vec<Value> {
    let want: HashSet<&str> = ids.iter().map(String::as_str).collect();
    eventually_msg(
        timeout,
        &format!("{} messages sent", ids.len()),
        async || {
            let (_, v) = d
                .get(&format!(
                    "/v1/messages?integration={integration}&state=sent&limit=10000"
                ))
                .await;
            let sent: HashSet<&str> = v
                .as_array()?
                .iter()
                .filter_map(|m| m["id"].as_str())
                .collect();
            want.iter().all(|id| sent.contains(id)).then_some(())
        },
    )
    .await;
    let mut out = Vec::new();
    for id in ids {
        let m = d.message(id).await;
        assert_eq!(m["state"], "sent", "{m}");
        out.push(m);
    }
    out
}

/// Waits until message `id` is back in `queued` with an attempt that says
/// it waits for MID server dc1; returns the message.
async fn waiting(d: &Daemon, id: &str) -> Value {
    // The attempt is written just before the record goes back to queued, so
    // wait for both.
    let m = eventually_msg(WAIT, "a waiting attempt", async || {
        let m = d.message(id).await;
        (m["state"] == "queued" && !attempts(&m).is_empty()).then_some(m)
    })
    .await;
    assert_eq!(m["attempt_count"], 0, "waiting uses up no attempt: {m}");
    let a = &attempts(&m)[0];
    assert_eq!(a["error"], "MID server dc1 is not connected", "{m}");
    assert_eq!(a["via"], "mid:dc1", "{m}");
    assert!(
        a["outcome"].as_str().unwrap_or("").contains("waiting"),
        "{m}"
    );
    m
}

fn attempts(m: &Value) -> &Vec<Value> {
    m["attempts"].as_array().expect("attempts")
}

/// Lines of `log` containing every one of `needles`.
fn lines_with<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}

/// `outbox pki init` → daemon + relay → 200 messages through the relay, the
/// session listed by the API and the CLI, a connection test through the
/// relay, and a clean SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_go_through_a_relay_set_up_with_pki_init() {
    const MESSAGES: usize = 200;
    let pki = Pki::init();
    let port = free_udp_port();
    let sink = Sink::start().await;
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 16)).await;
    let mut relay = Relay::start(&pki.relay_config(&[port], &allow(&sink)));

    let s = wait_sessions(&d, 1, WAIT).await;
    let session = &s[0];
    assert_eq!(session["name"], "dc1", "{session}");
    assert!(session["id"].is_u64(), "{session}");
    assert!(session["since"].is_string(), "{session}");
    assert_eq!(session["in_flight"], 0, "{session}");
    assert!(session["protocol_version"].as_u64() >= Some(1), "{session}");
    assert!(
        !session["relay_version"].as_str().unwrap_or("").is_empty(),
        "{session}"
    );
    let address = session["address"].as_str().unwrap().to_string();
    assert!(address.starts_with("127.0.0.1:"), "{session}");
    let via = format!("mid:dc1 ({address})");
    assert!(
        !lines_with(&d.log(), &["relay connected", &address]).is_empty(),
        "the daemon logs the relay's arrival:\n{}",
        d.log()
    );

    // The connection test goes through the relay too.
    let (s, t) = d
        .post_json("/v1/integrations/acme/connections/dc/test", json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert_eq!(t["ok"], true, "{t}");
    let a = &t["attempts"][0];
    assert_eq!(a["method"], "HEAD", "{t}");
    assert_eq!(a["status"], 200, "{t}");
    assert_eq!(a["via"], via.as_str(), "{t}");
    assert_eq!(sink.received()[0].method, "HEAD");

    let ids = produce(&d, "acme", MESSAGES).await.unwrap();
    let messages = all_sent(&d, "acme", &ids, WAIT).await;
    for m in &messages {
        let a = attempts(m);
        assert_eq!(a.len(), 1, "{m}");
        assert_eq!(m["attempt_count"], 1, "{m}");
        assert_eq!(a[0]["via"], via.as_str(), "{m}");
        assert_eq!(a[0]["status"], 200, "{m}");
        assert_eq!(a[0]["connection"], "dc", "{m}");
    }
    let seen = sink.distinct_ids();
    assert!(
        ids.iter().all(|id| seen.contains(id)),
        "the sink saw every id"
    );
    // The relay passed the request through as the daemon built it.
    let r = sink
        .received()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap();
    let key = r.headers["idempotency-key"].to_str().unwrap().to_string();
    assert_eq!(r.path, format!("/api/incident/{key}"));
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(r.body.starts_with(b"{\"n\":"), "{:?}", r.body);

    // The CLI lists the session, as a table and as JSON.
    let out = d.cli(&["mid-servers"]).await;
    assert!(out.status.success(), "{out:?}");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("dc1") && screen.contains(&address),
        "{screen}"
    );
    let out = d.cli(&["--json", "mid-servers"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v[0]["name"], "dc1", "{v}");
    assert_eq!(v[0]["address"], address.as_str(), "{v}");

    // SIGTERM: the relay drains, exits 0 and its session goes away.
    let status = relay.terminate().await;
    assert!(status.success(), "SIGTERM exits 0: {status}");
    wait_sessions(&d, 0, WAIT).await;
    assert!(
        relay.log().contains("outbox-relay stopped"),
        "{}",
        relay.log()
    );
    // The daemon says the relay closed its session because it stops, not
    // that it was lost.
    let log = d.log();
    assert!(
        !lines_with(&log, &["relay closed its session", "relay stopping"]).is_empty(),
        "{log}"
    );
    assert!(
        lines_with(&log, &["relay disconnected"]).is_empty(),
        "{log}"
    );
    // No secret in either log.
    let token = pki.token();
    assert!(!d.log().contains(&token), "the daemon logs no token");
    assert!(!relay.log().contains(&token), "the relay logs no token");
}

/// With no relay connected, messages wait (queued, no attempt used up) and
/// say why; a relay connecting sends them at once, not at the next retry.
#[tokio::test]
async fn messages_wait_for_an_absent_relay_and_go_when_it_connects() {
    const MESSAGES: usize = 20;
    let pki = Pki::init();
    let port = free_udp_port();
    let sink = Sink::start().await;
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 8)).await;
    assert!(sessions(&d).await.is_empty());

    let mut ids = Vec::new();
    for i in 0..MESSAGES {
        ids.push(send(&d, "acme", json!({"message": "Create", "body": {"n": i}})).await);
    }
    // When each message first waited, by the daemon's clock.
    let mut waited_at = std::collections::HashMap::new();
    for id in &ids {
        let m = waiting(&d, id).await;
        waited_at.insert(id.clone(), attempts(&m)[0]["at_ms"].as_u64().unwrap());
    }
    let (_, v) = d.get("/v1/integrations/acme").await;
    assert_eq!(v["queue_depth"], MESSAGES, "{v}");
    assert_eq!(sink.count(), 0);
    // Past the first 5s wait, each message has looked for the relay again,
    // and the wait is still on record once: an outage adds nothing.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for id in &ids {
        let m = d.message(id).await;
        assert_eq!(m["state"], "queued", "{m}");
        assert_eq!(attempts(&m).len(), 1, "one record of the wait: {m}");
        // The second look happened, and set the longer wait (a minute).
        let due = humantime::parse_rfc3339(m["due_at"].as_str().expect("due_at"))
            .expect("an RFC 3339 time");
        let ahead = due
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        assert!(
            ahead > Duration::from_secs(30),
            "due {ahead:?} from now, not about a minute: {m}"
        );
    }

    let relay_started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let _relay = Relay::start(&pki.relay_config(&[port], &allow(&sink)));
    wait_sessions(&d, 1, WAIT).await;
    let connected = Instant::now();
    // The daemon looks again for a relay after a minute; a relay
    // connecting must send them well before that.
    let messages = all_sent(&d, "acme", &ids, Duration::from_secs(4)).await;
    let took = connected.elapsed();
    for m in &messages {
        assert_eq!(m["attempt_count"], 1, "{m}");
        let last = attempts(m).last().unwrap();
        assert_eq!(last["status"], 200, "{m}");
        assert!(
            last["via"]
                .as_str()
                .unwrap()
                .starts_with("mid:dc1 (127.0.0.1:"),
            "{m}"
        );
        assert!(last["at_ms"].as_u64().unwrap() > waited_at[m["id"].as_str().unwrap()]);
        let waited = last["at_ms"]
            .as_u64()
            .unwrap()
            .saturating_sub(relay_started_ms);
        assert!(
            waited < 4000,
            "sent {waited}ms after the relay started: its arrival did not wake it ({m})"
        );
    }
    eprintln!("all {MESSAGES} sent {took:?} after the relay connected");
    // The history keeps the attempt that waited for the relay, next to the
    // one that went through it: attempts are not overwritten.
    for m in &messages {
        let a = attempts(m);
        assert!(
            a.len() == 2 && a[0]["error"] == "MID server dc1 is not connected",
            "the waiting attempt is missing from the history: {m}"
        );
    }
    // `outbox message` says which of them max_attempts counts.
    let id = messages[0]["id"].as_str().unwrap();
    let out = d.cli(&["message", id]).await;
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("attempts (2, 1 counted toward max_attempts):"),
        "{screen}"
    );
}

/// A wrong token: the daemon refuses the hello, both sides log it, nothing
/// is delivered, and the relay keeps trying.
#[tokio::test]
async fn a_relay_with_a_wrong_token_is_refused_and_keeps_retrying() {
    const WRONG: &str = "not-the-relay-token-0123456789";
    let pki = Pki::init();
    let port = free_udp_port();
    let sink = Sink::start().await;
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 4)).await;
    let mut config = pki.relay_config(&[port], &allow(&sink));
    config.insert("token".into(), WRONG.into());
    let mut relay = Relay::start(&config);

    // Refused at least twice: it retries (with backoff) after a refusal.
    eventually_msg(WAIT, "two refusals in the relay log", async || {
        (lines_with(&relay.log(), &["refused", "wrong token for MID server"]).len() >= 2)
            .then_some(())
    })
    .await;
    let log = d.log();
    let refused = lines_with(&log, &["relay refused", "wrong token for MID server"]);
    assert!(!refused.is_empty(), "daemon log:\n{log}");
    assert!(
        refused.iter().all(|l| l.contains("127.0.0.1:")),
        "the daemon names the relay's address: {refused:?}"
    );
    assert!(relay.running(), "the relay stays up:\n{}", relay.log());
    assert!(
        sessions(&d).await.is_empty(),
        "no session for a refused relay"
    );

    let id = send(&d, "acme", json!({"message": "Create", "body": "x"})).await;
    waiting(&d, &id).await;
    assert_eq!(sink.count(), 0, "nothing delivered");
    assert!(relay.running(), "the relay stays up:\n{}", relay.log());
    // Neither side prints a token, right or wrong.
    for (who, log) in [("daemon", d.log()), ("relay", relay.log())] {
        assert!(!log.contains(WRONG), "the {who} log shows the wrong token");
        assert!(!log.contains(&pki.token()), "the {who} log shows the token");
    }
}

/// A target outside the relay's allow-list: the message ends in `error`
/// with the relay's reason; the relay stays up and allowed targets still
/// get their messages.
#[tokio::test]
async fn a_target_outside_the_allow_list_ends_in_error() {
    let pki = Pki::init();
    let port = free_udp_port();
    let allowed = Sink::start().await;
    let denied = Sink::start().await;
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &denied.url(), 4)).await;
    apply(&d, &relayed("ok", &allowed.url(), 4)).await;
    // A CIDR block that does not hold loopback must not let it through.
    let mut list = allow(&allowed);
    list.push("10.0.0.0/8".into());
    let mut relay = Relay::start(&pki.relay_config(&[port], &list));
    wait_sessions(&d, 1, WAIT).await;

    let id = send(&d, "acme", json!({"message": "Create", "body": "x"})).await;
    let m = d.wait_for_state(&id, "error", WAIT).await;
    let a = attempts(&m);
    assert_eq!(a.len(), 1, "not retried: {m}");
    let e = a[0]["error"].as_str().unwrap_or("");
    assert!(e.contains("not in this relay's allow list"), "{m}");
    assert!(
        e.contains(&denied.addr().to_string()),
        "names the target: {m}"
    );
    assert!(
        a[0]["via"].as_str().unwrap().starts_with("mid:dc1 ("),
        "{m}"
    );
    assert_eq!(denied.count(), 0, "nothing reached the denied target");

    // The connection test says so too.
    let (_, t) = d
        .post_json("/v1/integrations/acme/connections/dc/test", json!({}))
        .await;
    assert_eq!(t["ok"], false, "{t}");
    assert!(
        t["attempts"][0]["error"]
            .as_str()
            .unwrap_or("")
            .contains("not in this relay's allow list"),
        "{t}"
    );
    assert_eq!(denied.count(), 0);

    assert!(relay.running(), "{}", relay.log());
    assert_eq!(sessions(&d).await.len(), 1);
    let mut ok = Vec::new();
    for i in 0..5 {
        ok.push(send(&d, "ok", json!({"message": "Create", "body": {"n": i}})).await);
    }
    all_sent(&d, "ok", &ok, WAIT).await;
    assert_eq!(allowed.distinct_ids().len(), 5);
}

/// `kill -9` of the only relay in the middle of a run, then a restart:
/// every message ends `sent` and the sink saw every id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_run_and_restarted_loses_nothing() {
    const MESSAGES: usize = 500;
    let pki = Pki::init();
    let port = free_udp_port();
    let sink = Sink::start().await;
    sink.set_delay(Duration::from_millis(20));
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 16)).await;
    let mut relay = Relay::start(&pki.relay_config(&[port], &allow(&sink)));
    wait_sessions(&d, 1, WAIT).await;

    let producers = produce(&d, "acme", MESSAGES);
    eventually_msg(WAIT, "delivery under way", async || {
        (sink.count() >= 50).then_some(())
    })
    .await;
    relay.kill9();
    let killed = Instant::now();
    let seen_before = sink.distinct_ids().len();
    let ids = producers.await.unwrap();
    assert!(
        seen_before < MESSAGES,
        "the kill came too late to prove anything"
    );
    relay.spawn();
    let messages = all_sent(&d, "acme", &ids, Duration::from_secs(60)).await;
    eprintln!(
        "{seen_before} at the sink at the kill; all {MESSAGES} sent {:?} after it",
        killed.elapsed()
    );
    let seen = sink.distinct_ids();
    let lost: Vec<&String> = ids.iter().filter(|id| !seen.contains(*id)).collect();
    assert!(lost.is_empty(), "never reached the sink: {lost:?}");
    eprintln!(
        "{} message(s) needed more than one counted attempt",
        messages.iter().filter(|m| m["attempt_count"] != 1).count()
    );
    let vias: BTreeSet<&str> = messages
        .iter()
        .filter_map(|m| attempts(m).last()?["via"].as_str())
        .collect();
    assert!(
        vias.len() >= 2,
        "sent through the first session and the restarted one: {vias:?}"
    );
}

/// Two relays named dc1 share the load; `kill -9` of one mid-run: its
/// requests go through the other without using up attempts, and everything
/// is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_two_relays_survives_the_loss_of_one() {
    const MESSAGES: usize = 400;
    let pki = Pki::init();
    let port = free_udp_port();
    let sink = Sink::start().await;
    sink.set_delay(Duration::from_millis(20));
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 16)).await;
    let config = pki.relay_config(&[port], &allow(&sink));
    let mut a = Relay::start(&config);
    let first = wait_sessions(&d, 1, WAIT).await;
    let addr_a = first[0]["address"].as_str().unwrap().to_string();
    let b = Relay::start(&config);
    let both = wait_sessions(&d, 2, WAIT).await;
    assert!(both.iter().all(|s| s["name"] == "dc1"), "{both:?}");
    let addr_b = both
        .iter()
        .map(|s| s["address"].as_str().unwrap().to_string())
        .find(|x| *x != addr_a)
        .expect("a second address");
    let via_a = format!("mid:dc1 ({addr_a})");
    let via_b = format!("mid:dc1 ({addr_b})");

    let producers = produce(&d, "acme", MESSAGES);
    eventually_msg(WAIT, "both relays carrying requests", async || {
        let performed = |r: &Relay| lines_with(&r.log(), &["performed"]).len();
        (sink.count() >= 100 && performed(&a) >= 10 && performed(&b) >= 10).then_some(())
    })
    .await;
    a.kill9();
    let killed = Instant::now();
    let seen_before = sink.distinct_ids().len();
    let ids = producers.await.unwrap();
    assert!(
        seen_before < MESSAGES,
        "the kill came too late to prove anything"
    );
    let messages = all_sent(&d, "acme", &ids, Duration::from_secs(60)).await;
    let took = killed.elapsed();
    eprintln!("{seen_before} at the sink at the kill; all {MESSAGES} sent {took:?} after it");
    let seen = sink.distinct_ids();
    assert!(
        ids.iter().all(|id| seen.contains(id)),
        "the sink saw every id"
    );

    let sent_via = |via: &str| {
        messages
            .iter()
            .filter(|m| attempts(m).last().unwrap()["via"] == via)
            .count()
    };
    assert!(
        sent_via(&via_a) > 0,
        "relay A carried messages before the kill"
    );
    assert!(sent_via(&via_b) > 0, "relay B carried messages");
    // A relay lost mid-request costs its messages no attempt: they went
    // again through B. (A message may show the lost try as an extra,
    // uncounted attempt.)
    let counted: Vec<&Value> = messages
        .iter()
        .filter(|m| m["attempt_count"] != 1)
        .collect();
    assert!(
        counted.is_empty(),
        "{} message(s) used up an attempt for the killed relay, e.g. {}",
        counted.len(),
        counted[0]
    );
    // The daemon notices A is gone.
    let left = wait_sessions(&d, 1, WAIT).await;
    assert_eq!(left[0]["address"], addr_b.as_str());
    drop(b);
}

/// A relay started before its daemon (network or daemon not up yet) keeps
/// trying and connects once the daemon listens; messages then flow.
#[tokio::test]
async fn a_relay_started_before_the_daemon_connects_when_it_comes_up() {
    let pki = Pki::init();
    let port = free_udp_port();
    let sink = Sink::start().await;
    let started = Instant::now();
    let mut relay = Relay::start(&pki.relay_config(&[port], &allow(&sink)));
    eventually_msg(WAIT, "the relay to fail to reach the daemon", async || {
        (!lines_with(&relay.log(), &["cannot open a session"]).is_empty()).then_some(())
    })
    .await;
    assert!(relay.running(), "the relay stays up:\n{}", relay.log());

    let failed = started.elapsed();
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 4)).await;
    let up = Instant::now();
    wait_sessions(&d, 1, Duration::from_secs(30)).await;
    eprintln!(
        "first failure after {failed:?}; connected {:?} after the daemon came up",
        up.elapsed()
    );
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(send(&d, "acme", json!({"message": "Create", "body": {"n": i}})).await);
    }
    let messages = all_sent(&d, "acme", &ids, WAIT).await;
    assert!(messages.iter().all(|m| m["attempt_count"] == 1));
    assert_eq!(sink.distinct_ids().len(), 10);
}

/// `--check-config` validates without connecting: 0 for a good file, 2 and
/// the key for a bad one.
#[test]
fn check_config_names_the_bad_key() {
    let pki = Pki::init();
    let dir = tempfile::tempdir().unwrap();
    let good = toml::to_string(&pki.relay_config(&[4433], &["127.0.0.1:8080".into()])).unwrap();
    let out = check_config(dir.path(), &good);
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{good}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("valid"),
        "{out:?}"
    );

    let mut cases = vec![("allow[0]", good.replace("\"127.0.0.1:8080\"", "\"jira\""))];
    cases.push(("colour", format!("colour = 1\n{good}")));
    cases.push(("daemons[0]", good.replace("127.0.0.1:4433", "nowhere")));
    for (key, text) in cases {
        assert_ne!(text, good, "the case {key} changes the file");
        let out = check_config(dir.path(), &text);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {out:?}\n{text}");
        assert!(err.contains(key), "{key}: {err}");
    }
    let out = check_config(dir.path(), &good.replace("\"127.0.0.1:8080\"", "\"jira\""));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("jira"),
        "{out:?}"
    );
}

/// A request body and an answer over one 64 KiB chunk each travel as
/// several frames: the sink gets the body whole and the attempt keeps the
/// answer's first bytes.
#[tokio::test]
async fn bodies_over_one_chunk_cross_the_relay_whole() {
    let answer = format!("answer:{}", "a".repeat(200 * 1024));
    let sink = outbox_tests::Sink::builder()
        .reply(outbox_tests::Reply::new(200).body(answer.clone()))
        .start()
        .await;
    let pki = Pki::init();
    let port = free_udp_port();
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 4)).await;
    let allow = vec![sink.addr().to_string()];
    let _relay = Relay::start(&pki.relay_config(&[port], &allow));
    wait_sessions(&d, 1, WAIT).await;

    let big = "b".repeat(150 * 1024);
    let id = send(
        &d,
        "acme",
        json!({"message": "Create", "body": {"big": big}}),
    )
    .await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    let a = &attempts(&m)[0];
    assert!(
        a["via"].as_str().unwrap_or("").starts_with("mid:dc1"),
        "{a}"
    );
    let excerpt = a["response_excerpt"].as_str().unwrap_or("");
    assert!(excerpt.starts_with("answer:aaa"), "{excerpt}");
    let got = sink.last().expect("the sink got the request");
    let v: Value = serde_json::from_slice(&got.body).expect("the body is whole JSON");
    assert_eq!(v["big"].as_str().map(str::len), Some(150 * 1024));
}

/// A target that answers with more than the tunnel carries — a header value
/// over its limit, headers together over a head frame, a body over the
/// relay's `max_body` — has still answered: the message is sent on its first
/// attempt with the target's status, and the relay says what it left out.
#[tokio::test]
async fn an_answer_larger_than_the_tunnel_carries_still_delivers_the_message() {
    let mut reply = outbox_tests::Reply::new(201)
        .header("x-keep", "yes")
        .header("x-big", &"v".repeat(9 * 1024))
        .body(format!("answer:{}", "a".repeat(200 * 1024)));
    for i in 0..9 {
        reply = reply.header(&format!("x-wide-{i}"), &"w".repeat(8000));
    }
    let sink = outbox_tests::Sink::builder().reply(reply).start().await;
    let pki = Pki::init();
    let port = free_udp_port();
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 4)).await;
    let mut config = pki.relay_config(&[port], &allow(&sink));
    config.insert("max_body".into(), toml::Value::String("64KiB".into()));
    let relay = Relay::start(&config);
    wait_sessions(&d, 1, WAIT).await;

    let id = send(&d, "acme", json!({"message": "Create", "body": {}})).await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    let a = attempts(&m);
    assert_eq!(a.len(), 1, "{m}");
    assert_eq!(a[0]["status"], 201, "{m}");
    assert_eq!(a[0]["response_headers"]["x-keep"], "yes", "{m}");
    assert!(a[0]["response_headers"].get("x-big").is_none(), "{m}");
    let excerpt = a[0]["response_excerpt"].as_str().unwrap_or("");
    assert!(excerpt.starts_with("answer:aaa"), "{excerpt}");
    assert_eq!(sink.count(), 1);
    let log = relay.log();
    assert_eq!(
        lines_with(
            &log,
            &["WARN", "were left out", "dropped=2", "x-big, x-wide-8"]
        )
        .len(),
        1,
        "{log}"
    );
    assert_eq!(
        lines_with(
            &log,
            &["WARN", "over this relay's max_body", "max_body=65536"]
        )
        .len(),
        1,
        "{log}"
    );
}

/// A request whose head the tunnel cannot carry (here a header value over
/// 8 KiB) ends in `error` on its first attempt, saying why, with nothing
/// sent; the relay stays in service.
#[tokio::test]
async fn a_request_the_tunnel_cannot_carry_ends_in_error_at_once() {
    let pki = Pki::init();
    let port = free_udp_port();
    let sink = Sink::start().await;
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 4)).await;
    let _relay = Relay::start(&pki.relay_config(&[port], &allow(&sink)));
    wait_sessions(&d, 1, WAIT).await;

    let wide = "w".repeat(9 * 1024);
    let id = send(
        &d,
        "acme",
        json!({"message": "Create", "body": {}, "headers": {"X-Context": wide}}),
    )
    .await;
    let m = d.wait_for_state(&id, "error", WAIT).await;
    let a = attempts(&m);
    assert_eq!(a.len(), 1, "{m}");
    let error = a[0]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("not sent: the request cannot cross the tunnel")
            && error.contains("header value length is 9216, expected at most 8192"),
        "{m}"
    );
    assert_eq!(sink.count(), 0, "nothing reached the target");
    // The next message goes through the same relay.
    let id = send(&d, "acme", json!({"message": "Create", "body": {}})).await;
    d.wait_for_state(&id, "sent", WAIT).await;
}

/// A reload takes a rotated token and a renewed certificate, rewritten in
/// place and followed by SIGHUP: relays that connect from then on must
/// present the new token and are shown the new certificate, and the relay
/// connected before stays.
#[tokio::test]
async fn a_reload_takes_a_rotated_token_and_a_renewed_certificate() {
    let old = Pki::init();
    // Another CA, with its own daemon certificate and token.
    let new = Pki::init();
    let port = free_udp_port();
    let sink = Sink::start().await;
    let mut d = daemon(&old, port).await;
    apply(&d, &relayed("acme", &sink.url(), 4)).await;
    let _first = Relay::start(&old.relay_config(&[port], &allow(&sink)));
    let first = wait_sessions(&d, 1, WAIT).await;

    let old_token = old.token();
    for f in ["daemon.crt", "daemon.key", "relay-token"] {
        std::fs::copy(new.path(f), old.path(f)).expect("renewed in place");
    }
    d.signal(libc::SIGHUP);
    eventually_msg(WAIT, "the reload", async || {
        d.log().contains("reloaded").then_some(())
    })
    .await;

    // The old CA no longer verifies the daemon (this relay has the new token).
    let stale_ca = Relay::start(&old.relay_config(&[port], &allow(&sink)));
    // The new CA, but the token from before.
    let mut config = new.relay_config(&[port], &allow(&sink));
    config.insert("token".into(), toml::Value::String(old_token));
    let stale_token = Relay::start(&config);
    // Both new: it connects.
    let _fresh = Relay::start(&new.relay_config(&[port], &allow(&sink)));
    let connected = wait_sessions(&d, 2, WAIT).await;
    assert!(
        connected.iter().any(|s| s["id"] == first[0]["id"]),
        "the relay connected before stays: {connected:?}"
    );
    eventually_msg(
        WAIT,
        "the old CA's relay refusing the new certificate",
        async || {
            (!lines_with(&stale_ca.log(), &["cannot open a session", "certificate"]).is_empty())
                .then_some(())
        },
    )
    .await;
    eventually_msg(WAIT, "the old token refused", async || {
        (!lines_with(
            &stale_token.log(),
            &["refused", "wrong token for MID server"],
        )
        .is_empty())
        .then_some(())
    })
    .await;
    assert_eq!(sessions(&d).await.len(), 2);
    let id = send(&d, "acme", json!({"message": "Create", "body": {}})).await;
    d.wait_for_state(&id, "sent", WAIT).await;
}

/// A reload that drops a MID server an apply file still uses is refused,
/// as the next start would refuse that configuration; the running one
/// stays, relay and all.
#[tokio::test]
async fn a_reload_that_drops_a_mid_server_in_use_is_refused() {
    let pki = Pki::init();
    let port = free_udp_port();
    let sink = Sink::start().await;
    let files = tempfile::tempdir().expect("temp dir");
    let file = write(files.path(), "acme.toml", &relayed("acme", &sink.url(), 4));
    let mut d = suite_daemon()
        .config_toml(&pki.daemon_config(port))
        .apply_file(&file)
        .start()
        .await;
    let _relay = Relay::start(&pki.relay_config(&[port], &allow(&sink)));
    wait_sessions(&d, 1, WAIT).await;

    let mut config: toml::Table = toml::from_str(&d.config_text()).expect("the daemon's config");
    config
        .remove("mid_servers")
        .expect("a [mid_servers] section");
    std::fs::write(d.config_path(), config.to_string()).expect("the config rewritten");
    d.signal(libc::SIGHUP);
    let line = eventually_msg(WAIT, "the reload refused", async || {
        lines_with(&d.log(), &["reload refused", "would not start"])
            .first()
            .map(|l| l.to_string())
    })
    .await;
    assert!(line.contains("dc1"), "{line}");
    let id = send(&d, "acme", json!({"message": "Create", "body": {}})).await;
    d.wait_for_state(&id, "sent", WAIT).await;
}

/// The instance guard refuses a connection through a MID server for
/// another instance before any relay is asked, and the attempt says which
/// way it would have gone.
#[tokio::test]
async fn the_guard_refuses_a_relay_connection_for_another_instance() {
    let pki = Pki::init();
    let d = daemon(&pki, free_udp_port()).await;
    let doc = relayed_with(
        "acme",
        "http://127.0.0.1:9/",
        "\n  instance_name = \"elsewhere\"",
    );
    apply(&d, &doc).await;
    let id = send(&d, "acme", json!({"message": "Create", "body": {}})).await;
    let m = d.wait_for_state(&id, "error", WAIT).await;
    let a = &attempts(&m)[0];
    assert_eq!(a["via"], "mid:dc1", "{m}");
    assert!(
        a["error"].as_str().unwrap_or("").contains("\"elsewhere\""),
        "{m}"
    );
}

/// OAuth through a relay: the token request goes through the relay too, so
/// a token endpoint inside the relay's network is reached as the remote
/// system is. A relay that may not reach the endpoint fails the token
/// request with its allow-list error; one that may, delivers.
#[tokio::test]
async fn oauth_tokens_are_fetched_through_the_relay() {
    let tokens = OAuthServer::builder().start().await;
    let sink = Sink::builder().bearer_from(&tokens).start().await;
    let pki = Pki::init();
    let port = free_udp_port();
    let d = daemon(&pki, port).await;
    let doc = relayed_with(
        "acme",
        &sink.url(),
        "\n  auth = { type = \"oauth\", profile = \"tok\" }",
    ) + &format!(
        "\n[[oauth_profile]]\nname = \"tok\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\n",
        tokens.token_url(),
        tokens.client_id(),
        tokens.client_secret()
    );
    apply(&d, &doc).await;
    let mut relay = Relay::start(&pki.relay_config(&[port], &allow(&sink)));
    wait_sessions(&d, 1, WAIT).await;
    let id = send(&d, "acme", json!({"message": "Create", "body": {}})).await;
    let (m, first) = d.first_attempt(&id, WAIT).await;
    let error = first["error"].as_str().unwrap_or("").to_string();
    assert!(
        error.contains("oauth profile tok: token endpoint")
            && error.contains("(through mid:dc1")
            && error.contains("not in this relay's allow list"),
        "{m}"
    );
    assert_eq!(tokens.issued(), 0);
    assert_eq!(sink.count(), 0);

    relay.terminate().await;
    wait_sessions(&d, 0, WAIT).await;
    let endpoint: http::Uri = tokens.token_url().parse().expect("a token URL");
    let endpoint = endpoint.authority().expect("host:port").to_string();
    let _relay = Relay::start(&pki.relay_config(&[port], &[sink.addr().to_string(), endpoint]));
    d.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(tokens.issued(), 1);
    assert_eq!(sink.count(), 1);
}

/// Mutual TLS through a relay comes from the relay's own protocol profile
/// of the connection's profile name: its CA is trusted for the target's
/// certificate, and its client certificate is the one the target sees.
/// The daemon's profile of that name gives neither (a relayed request
/// never uses it); a relay whose profile lacks the client certificate is
/// refused by the target, in TLS's words.
#[tokio::test]
async fn the_relay_applies_mutual_tls_from_its_own_protocol_profile() {
    let tls = outbox_tests::Pki::new();
    let files_dir = tempfile::tempdir().expect("temp dir");
    let files = tls.write_to(files_dir.path());
    let sink = Sink::builder()
        .tls(&tls)
        .require_client_cert(tls.ca_pem())
        .start()
        .await;
    let pki = Pki::init();
    let port = free_udp_port();
    let d = daemon(&pki, port).await;
    let doc = relayed_with(
        "acme",
        &format!("https://{}", sink.addr()),
        "\n  protocol_profile = \"mtls\"",
    ) + &format!(
        "\n[[protocol_profile]]\nname = \"mtls\"\nca = {:?}\n",
        files.ca.display().to_string()
    );
    apply(&d, &doc).await;
    let profile = |client: bool| {
        let path = |p: &Path| toml::Value::String(p.display().to_string());
        let mut p = toml::Table::new();
        p.insert("name".into(), "mtls".into());
        p.insert("ca".into(), path(&files.ca));
        if client {
            p.insert("client_cert".into(), path(&files.client_cert));
            p.insert("client_key".into(), path(&files.client_key));
        }
        toml::Value::Array(vec![toml::Value::Table(p)])
    };

    let mut config = pki.relay_config(&[port], &allow(&sink));
    config.insert("protocol_profile".into(), profile(false));
    let mut relay = Relay::start(&config);
    wait_sessions(&d, 1, WAIT).await;
    let id = send(&d, "acme", json!({"message": "Create", "body": {}})).await;
    let (m, first) = d.first_attempt(&id, WAIT).await;
    let error = first["error"].as_str().unwrap_or("");
    assert!(error.starts_with("relay dc1 (127.0.0.1:"), "{m}");
    // The target's alert, whether hyper passed it on or the relay's probe
    // found it behind a connection closed without a reason.
    assert!(error.contains("CertificateRequired"), "a TLS refusal: {m}");
    assert_eq!(sink.count(), 0, "no request got past the handshake");

    relay.terminate().await;
    wait_sessions(&d, 0, WAIT).await;
    config.insert("protocol_profile".into(), profile(true));
    let _relay = Relay::start(&config);
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    let last = attempts(&m).last().cloned().unwrap_or_default();
    assert_eq!(last["status"], 200, "{m}");
    let seen = sink.received();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        seen[0].client_cert.as_deref(),
        Some(&tls.client().cert_der[..]),
        "the target was shown the relay profile's client certificate"
    );
}

/// A daemon restarted without a MID server that stored connections still
/// use says so at start, and their messages wait with an attempt that says
/// the MID server is not configured (not merely "not connected").
#[tokio::test]
async fn connections_through_a_mid_server_no_longer_configured_are_named() {
    let pki = Pki::init();
    let mut d = daemon(&pki, free_udp_port()).await;
    apply(&d, &relayed("acme", "http://127.0.0.1:9/", 4)).await;
    d.terminate().await;
    let mut config: toml::Table = toml::from_str(&d.config_text()).expect("the daemon's config");
    config
        .remove("mid_servers")
        .expect("a [mid_servers] section");
    std::fs::write(d.config_path(), config.to_string()).expect("the config rewritten");
    d.restart().await;
    let log = d.log();
    let line = lines_with(
        &log,
        &["WARN", "is not configured for", "acme/dc (MID server dc1)"],
    );
    assert_eq!(line.len(), 1, "{log}");
    let id = send(&d, "acme", json!({"message": "Create", "body": {}})).await;
    let m = eventually_msg(WAIT, "a waiting attempt", async || {
        let m = d.message(&id).await;
        (m["state"] == "queued" && !attempts(&m).is_empty()).then_some(m)
    })
    .await;
    let error = attempts(&m)[0]["error"].as_str().unwrap_or("");
    assert!(
        error.starts_with("MID server dc1 is not configured on this daemon"),
        "{m}"
    );
}

/// A body over the relay's `max_body`, larger than the stream's flow
/// control window: the relay stops the stream and says why, the daemon
/// stops writing and reads it, and the message ends in `error` at once
/// instead of waiting out its timeout and coming back.
#[tokio::test]
async fn a_body_over_the_relays_max_body_ends_in_error_promptly() {
    let pki = Pki::init();
    let port = free_udp_port();
    let sink = Sink::start().await;
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 4)).await;
    let mut config = pki.relay_config(&[port], &allow(&sink));
    config.insert("max_body".into(), toml::Value::String("64KiB".into()));
    let _relay = Relay::start(&config);
    wait_sessions(&d, 1, WAIT).await;

    let big = "b".repeat(3 << 20);
    let started = Instant::now();
    let id = send(&d, "acme", json!({"message": "Create", "body": big})).await;
    let m = d.wait_for_state(&id, "error", WAIT).await;
    assert!(started.elapsed() < Duration::from_secs(15), "{m}");
    let a = &attempts(&m)[0];
    let error = a["error"].as_str().unwrap_or("");
    assert!(error.contains("max_body"), "{a}");
    assert_eq!(sink.count(), 0, "nothing reached the target");
}

/// A relay of concurrency 1 (two streams) to a sink that answers after
/// 3 s, so one request holds the relay's slot that long; integrations
/// "slow" (timeout 5s, concurrency `slow`) and "quick" (timeout 1s).
async fn one_slot_relay(slow: u32) -> (Pki, Sink, Daemon, Relay) {
    let pki = Pki::init();
    let port = free_udp_port();
    let sink = Sink::builder().delay(Duration::from_secs(3)).start().await;
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("slow", &sink.url(), slow)).await;
    apply(
        &d,
        &relayed("quick", &sink.url(), 1).replace("timeout = \"5s\"", "timeout = \"1s\""),
    )
    .await;
    let mut config = pki.relay_config(&[port], &allow(&sink));
    config.insert("concurrency".into(), toml::Value::Integer(1));
    let relay = Relay::start(&config);
    wait_sessions(&d, 1, WAIT).await;
    (pki, sink, d, relay)
}

/// A request waiting at the relay for a free slot counts that wait in its
/// timeout: past it the relay answers without sending it, so the remote
/// system never gets a request the daemon has given up on (and would send
/// again).
#[tokio::test]
async fn a_request_that_waits_past_its_timeout_for_a_slot_is_not_sent() {
    let (_pki, sink, d, _relay) = one_slot_relay(1).await;
    let a = send(&d, "slow", json!({"message": "Create", "body": {"n": 1}})).await;
    sink.wait_for(1, WAIT).await;
    let b = send(&d, "quick", json!({"message": "Create", "body": {"n": 2}})).await;
    let (m, first) = d.first_attempt(&b, WAIT).await;
    let error = first["error"].as_str().unwrap_or("");
    assert!(
        error.contains("not sent: no free slot within "),
        "the attempt says it was not sent: {m}"
    );
    let ids = sink.ids();
    assert_eq!(ids, [a], "only the slow message reached the sink");
}

/// A target slower than the request's timeout: the relay gives up and
/// says which timeout ran out, as given (not the time that was left of it
/// when the request went).
#[tokio::test]
async fn a_target_slower_than_the_timeout_is_reported_with_that_timeout() {
    let (_pki, sink, d, _relay) = one_slot_relay(1).await;
    let b = send(&d, "quick", json!({"message": "Create", "body": {"n": 1}})).await;
    let (m, first) = d.first_attempt(&b, WAIT).await;
    let error = first["error"].as_str().unwrap_or("");
    assert!(error.ends_with(": no response within 1s"), "{m}");
    sink.wait_for(1, WAIT).await;
}

/// A relay takes at most twice its concurrency in requests at once; a
/// request that waits past its timeout for the relay to take it is not
/// sent either, and says so within its timeout, rather than being taken
/// for a relay that went away.
#[tokio::test]
async fn a_request_the_relay_has_no_room_for_is_not_sent_within_its_timeout() {
    let (_pki, sink, d, _relay) = one_slot_relay(2).await;
    // The relay's two streams: a at the sink, a2 waiting for the relay's
    // one slot (its first attempt runs out of time; it goes again later).
    let a = send(&d, "slow", json!({"message": "Create", "body": {"n": 1}})).await;
    let a2 = send(&d, "slow", json!({"message": "Create", "body": {"n": 2}})).await;
    sink.wait_for(1, WAIT).await;
    let b = send(&d, "quick", json!({"message": "Create", "body": {"n": 3}})).await;
    let (m, first) = d.first_attempt(&b, WAIT).await;
    let error = first["error"].as_str().unwrap_or("");
    assert!(
        error.contains("not sent: the relay took no new request within 1s"),
        "the attempt says it was not sent: {m}"
    );
    assert!(!error.contains("disconnected"), "{m}");
    let took = first["duration_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(took < 2_000, "it ends within its timeout: {took} ms: {m}");
    assert!(
        !sink.ids().contains(&b),
        "the quick message did not reach the sink"
    );
    for id in [&a, &a2] {
        d.wait_for_state(id, "sent", WAIT).await;
    }
}

/// A relay that stops with a request still in flight past its drain closes
/// the session saying so, and the daemon's attempt says it in the relay's
/// words, not as a connection lost; the message goes when a relay is back.
#[tokio::test]
async fn a_request_cut_by_the_end_of_a_drain_says_the_relay_stopped() {
    let pki = Pki::init();
    let port = free_udp_port();
    let sink = Sink::builder().delay(Duration::from_secs(4)).start().await;
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 4)).await;
    let mut config = pki.relay_config(&[port], &allow(&sink));
    config.insert("drain".into(), toml::Value::String("1s".into()));
    let mut relay = Relay::start(&config);
    wait_sessions(&d, 1, WAIT).await;

    let a = send(&d, "acme", json!({"message": "Create", "body": {"n": 1}})).await;
    sink.wait_for(1, WAIT).await;
    assert!(relay.terminate().await.success());
    let cut = eventually_msg(WAIT, "the cut attempt recorded", async || {
        let m = d.message(&a).await;
        attempts(&m).iter().find_map(|x| {
            x["error"]
                .as_str()
                .filter(|e| e.contains("disconnected"))
                .map(str::to_owned)
        })
    })
    .await;
    assert!(
        cut.contains("the relay closed the session: relay stopping"),
        "{cut}"
    );
    let _relay = Relay::start(&config);
    all_sent(&d, "acme", &[a], WAIT).await;
}

/// A relay draining before it stops turns new requests away once; the
/// daemon then sends it no more, and a message with no other relay waits
/// for one (its wait recorded once) instead of being refused every second
/// of the drain. It goes when the relay is back.
#[tokio::test]
async fn a_draining_relay_gets_no_new_requests() {
    let pki = Pki::init();
    let port = free_udp_port();
    // Every answer takes 4s: the first message keeps the relay draining
    // that long.
    let sink = Sink::builder().delay(Duration::from_secs(4)).start().await;
    let d = daemon(&pki, port).await;
    apply(&d, &relayed("acme", &sink.url(), 4)).await;
    let config = pki.relay_config(&[port], &allow(&sink));
    let mut relay = Relay::start(&config);
    wait_sessions(&d, 1, WAIT).await;

    let a = send(&d, "acme", json!({"message": "Create", "body": {"n": 1}})).await;
    sink.wait_for(1, WAIT).await;
    relay.begin_stop();
    eventually_msg(WAIT, "the relay draining", async || {
        relay.log().contains("draining").then_some(())
    })
    .await;
    let b = send(&d, "acme", json!({"message": "Create", "body": {"n": 2}})).await;
    // Through the drain: the relay finishes the first message, then exits.
    assert!(relay.terminate().await.success());
    let m = d.message(&b).await;
    let waits: Vec<&Value> = attempts(&m)
        .iter()
        .filter(|a| a["error"] == "MID server dc1 is not connected")
        .collect();
    assert!(
        attempts(&m).len() <= 2 && waits.len() == 1,
        "at most one refusal, then one recorded wait: {m}"
    );
    assert_eq!(m["state"], "queued", "{m}");

    let _relay = Relay::start(&config);
    all_sent(&d, "acme", &[a, b], WAIT).await;
}
