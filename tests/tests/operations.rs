//! Operations end to end: SIGHUP reloads with good and bad files while
//! messages flow, SIGTERM with attempts in flight, metrics read by a real
//! Prometheus-format parser, and the status screen while an endpoint fails.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn apply_dir_config(dir: &std::path::Path) -> String {
    format!("apply = [{:?}]", format!("{}/*.toml", dir.display()))
}

#[tokio::test]
async fn sighup_reloads_good_files_and_keeps_the_running_state_on_bad_ones() {
    let sink = Sink::start().await;
    let files = tempfile::tempdir().unwrap();
    write(
        files.path(),
        "a.toml",
        &integration(
            "alpha",
            &[&connection("c", "test", &sink.url(), "active = true")],
        ),
    );
    let mut d = suite_daemon()
        .config_toml(&apply_dir_config(files.path()))
        .start()
        .await;
    let (_, v) = d.get("/v1/integrations/alpha").await;
    assert_eq!(v["state"], "active", "applied at start: {v}");

    // Messages keep flowing across every reload below.
    let producer = {
        let api = d.api_client();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..60 {
                let (s, v) = api
                    .enqueue(
                        "alpha",
                        &json!({"message": "Create", "body": format!("{i}")}),
                    )
                    .await
                    .unwrap();
                assert_eq!(s, StatusCode::ACCEPTED);
                ids.push(v["id"].as_str().unwrap().to_string());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ids
        })
    };

    // A good new file: applied on SIGHUP.
    let beta = integration(
        "beta",
        &[&connection("c", "test", &sink.url(), "active = true")],
    );
    write(files.path(), "b.toml", &beta);
    d.signal(libc::SIGHUP);
    eventually_msg(WAIT, "beta after reload", async || {
        let (s, _) = d.get("/v1/integrations/beta").await;
        (s == StatusCode::OK).then_some(())
    })
    .await;

    // A file that takes a message type away: said in the log, as a warning.
    write(
        files.path(),
        "b.toml",
        &beta.replace("name = \"Create\"", "name = \"Create2\""),
    );
    d.signal(libc::SIGHUP);
    eventually_msg(WAIT, "the removal logged", async || {
        let log = d.log();
        (log.contains("apply removed a message type")
            && log.contains(r#"message_types=["Create"]"#))
        .then_some(())
    })
    .await;

    // A bad file: refused whole, logged with the reason, nothing changes.
    write(
        files.path(),
        "c.toml",
        &integration("gamma", &[&connection("c", "prodd", &sink.url(), "")]),
    );
    d.signal(libc::SIGHUP);
    eventually_msg(WAIT, "the refusal in the log", async || {
        d.log().contains("reload refused").then_some(())
    })
    .await;
    assert!(
        d.log()
            .contains("integration[gamma].connection[c].environment"),
        "{}",
        d.log()
    );
    let (s, _) = d.get("/v1/integrations/gamma").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    std::fs::remove_file(files.path().join("c.toml")).unwrap();

    // A broken config file: logged, the running config stays.
    let good = std::fs::read_to_string(d.config_path()).unwrap();
    std::fs::write(d.config_path(), format!("{good}\nnot valid toml [[[")).unwrap();
    d.signal(libc::SIGHUP);
    eventually_msg(WAIT, "the config refusal in the log", async || {
        d.log().contains("invalid configuration").then_some(())
    })
    .await;
    std::fs::write(d.config_path(), good).unwrap();

    let ids = producer.await.unwrap();
    for id in &ids {
        d.wait_for_state(id, "sent", WAIT).await;
    }
    assert_eq!(sink.distinct_ids().len(), ids.len());
    let (_, v) = d.get("/v1/integrations/alpha").await;
    assert_eq!(v["state"], "active");
}

// The sink must keep serving while the test blocks waiting for the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_messages_and_lets_attempts_in_flight_finish() {
    let sink = Sink::start().await;
    sink.set_delay(Duration::from_millis(1500));
    let mut d = suite_daemon()
        .config_toml("shutdown_grace = \"10s\"")
        .start()
        .await;
    d.apply(&integration(
        "acme",
        &[&connection("c", "test", &sink.url(), "active = true")],
    ))
    .await;
    let (_, v) = d
        .post_json(
            "/v1/integrations/acme/messages",
            json!({"message": "Create"}),
        )
        .await;
    let id = v["id"].as_str().unwrap().to_string();
    d.wait_for_state(&id, "sending", WAIT).await;

    let api = d.api_client();
    d.signal(libc::SIGTERM);
    // During the grace period the API answers, and refuses enqueues. An
    // enqueue that reached the daemon before the signal did is accepted,
    // and is then a message like the first.
    let accepted = std::sync::Mutex::new(Vec::new());
    let refused = eventually_msg(WAIT, "a 503 for a new message", async || {
        match api.enqueue("acme", &json!({"message": "Create"})).await {
            Ok((StatusCode::SERVICE_UNAVAILABLE, v)) => Some(v),
            Ok((StatusCode::ACCEPTED, v)) => {
                let id = v["id"].as_str().unwrap().to_string();
                accepted.lock().unwrap().push(id);
                None
            }
            _ => None,
        }
    })
    .await;
    assert!(
        refused["error"].as_str().unwrap().contains("shutting down"),
        "{refused}"
    );
    let status = d.terminate().await;
    assert_eq!(status.code(), Some(0));
    let accepted = accepted.into_inner().unwrap();
    let seen = sink.ids();
    assert_eq!(
        seen.iter().filter(|s| **s == id).count(),
        1,
        "the attempt in flight finished, once: {seen:?}"
    );
    assert!(
        seen.iter().all(|s| *s == id || accepted.contains(s)),
        "only accepted messages reached the sink: {seen:?}, accepted {accepted:?}"
    );
    d.restart().await;
    assert_eq!(d.message(&id).await["state"], "sent");
    for other in &accepted {
        d.wait_for_state(other, "sent", WAIT).await;
    }
}

// The sink must keep serving while the test blocks waiting for the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_still_in_flight_at_the_deadline_are_queued_again() {
    let sink = Sink::start().await;
    sink.set_delay(Duration::from_secs(10));
    let mut d = suite_daemon()
        .config_toml("shutdown_grace = \"500ms\"")
        .start()
        .await;
    d.apply(&integration(
        "acme",
        &[&connection("c", "test", &sink.url(), "active = true")],
    ))
    .await;
    let (_, v) = d
        .post_json(
            "/v1/integrations/acme/messages",
            json!({"message": "Create"}),
        )
        .await;
    let id = v["id"].as_str().unwrap().to_string();
    d.wait_for_state(&id, "sending", WAIT).await;
    let started = Instant::now();
    let status = d.terminate().await;
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the grace period bounds the stop"
    );
    sink.set_delay(Duration::ZERO);
    d.restart().await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    assert!(sink.count() >= 2, "sent again after the restart");
    assert!(!m["attempts"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_status_shows_the_failure() {
    let sink = Sink::start().await;
    let d = suite_daemon().start().await;
    d.apply(&integration(
        "acme",
        &[&connection("c", "test", &sink.url(), "active = true")],
    ))
    .await;
    for _ in 0..3 {
        d.post_json(
            "/v1/integrations/acme/messages",
            json!({"message": "Create"}),
        )
        .await;
    }
    eventually_msg(WAIT, "three sent", async || {
        (sink.count() == 3).then_some(())
    })
    .await;
    sink.set_status(503);
    let (_, v) = d
        .post_json(
            "/v1/integrations/acme/messages",
            json!({"message": "Create"}),
        )
        .await;
    let failing = v["id"].as_str().unwrap().to_string();
    eventually_msg(WAIT, "a failed attempt", async || {
        (d.message(&failing).await["attempt_count"].as_u64() >= Some(1)).then_some(())
    })
    .await;

    let (s, text) = d.request(Method::GET, "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let text = text.as_str().unwrap().to_string();
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses");
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .and_then(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(*v),
                _ => None,
            })
    };
    assert_eq!(
        value("outbox_messages_enqueued_total", &[("integration", "acme")]),
        Some(4.0)
    );
    assert_eq!(
        value(
            "outbox_messages_sent_total",
            &[("integration", "acme"), ("connection", "c")]
        ),
        Some(3.0)
    );
    assert!(
        value("outbox_messages_retried_total", &[("integration", "acme")]).unwrap_or(0.0) >= 1.0
    );
    assert_eq!(
        value(
            "outbox_queue_depth",
            &[("integration", "acme"), ("state", "queued")]
        ),
        Some(1.0)
    );
    assert!(value("outbox_store_bytes", &[]).unwrap_or(0.0) > 0.0);
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "outbox_attempt_duration_seconds"
                && matches!(s.value, prometheus_parse::Value::Histogram(_))),
        "{text}"
    );

    let (_, status) = d.get("/v1/status").await;
    let i = &status["integrations"][0];
    assert_eq!(i["name"], "acme");
    assert_eq!(i["state"], "active");
    assert_eq!(i["active_connection"], "c");
    assert_eq!(i["environment"], "test");
    assert_eq!(i["queue_depth"], 1);
    assert_eq!(i["last_error"], "HTTP 503");
    assert!(
        i["last_error_at"].is_string() && i["last_sent_at"].is_string(),
        "{i}"
    );
    let out = d.cli(&["status"]).await;
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(screen.contains("HTTP 503"), "{screen}");
    // One log line per attempt that did not deliver, at info, with the
    // fields an operator greps; deliveries are debug lines (the test
    // daemons log at debug).
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("not delivered"))
        .expect("a line for the failed attempt");
    for field in [
        "integration=acme",
        "connection=c",
        "status=503",
        "duration_ms=",
        "id=",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
    let deliveries: Vec<_> = log
        .lines()
        .filter(|l| l.contains("delivered") && !l.contains("not delivered"))
        .collect();
    assert!(
        !deliveries.is_empty() && deliveries.iter().all(|l| l.contains("DEBUG")),
        "deliveries are debug lines:\n{log}"
    );
}

/// A daemon logging JSON at `level`, with integration `acme` delivering to
/// `sink` (connection `c`, settings `extra`), and the id of one message
/// enqueued to it.
async fn json_logging_daemon(level: &str, sink: &Sink, extra: &str) -> (Daemon, String) {
    let d = suite_daemon()
        .config_toml(&format!("[log]\nlevel = {level:?}\nformat = \"json\""))
        .start()
        .await;
    d.apply(&integration(
        "acme",
        &[&connection(
            "c",
            "test",
            &sink.url(),
            &format!("active = true\n  {extra}"),
        )],
    ))
    .await;
    let (_, v) = d
        .post_json(
            "/v1/integrations/acme/messages",
            json!({"message": "Create"}),
        )
        .await;
    let id = v["id"].as_str().unwrap().to_string();
    (d, id)
}

/// The first JSON line of `log` whose message is `message`.
fn json_line(log: &str, message: &str) -> Option<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == message)
}

#[tokio::test]
async fn json_logs_when_configured() {
    let sink = Sink::start().await;
    let basic = "auth = { type = \"basic\", username = \"u\", password = \"hunter2\" }";
    let (d, id) = json_logging_daemon("info,outbox_daemon::dispatch=debug", &sink, basic).await;
    d.wait_for_state(&id, "sent", WAIT).await;
    let log = d.log();
    let delivered = json_line(&log, "delivered").expect("a JSON delivery line");
    assert_eq!(delivered["status"], 200);
    assert_eq!(delivered["connection"], "c");
    assert!(!log.contains("hunter2"));
}

/// At the default level the attempt's span is off (it costs every
/// delivery); a line about an attempt names its integration and message
/// itself.
#[tokio::test]
async fn attempt_lines_at_info_name_the_integration_and_the_message() {
    let sink = Sink::start().await;
    sink.set_status(503);
    let (d, id) = json_logging_daemon("info", &sink, "").await;
    let line = eventually_msg(WAIT, "a line for the failed attempt", async || {
        json_line(&d.log(), "not delivered")
    })
    .await;
    assert_eq!(line["integration"], "acme", "{line}");
    assert_eq!(line["id"], id.as_str(), "{line}");
    assert_eq!(line["status"], 503, "{line}");
    assert!(line.get("span").is_none(), "no span at info: {line}");
}

/// systemd's notify protocol, with the test as the service manager: a
/// datagram socket in `$NOTIFY_SOCKET` receives READY, RELOADING and
/// STOPPING, and WATCHDOG pings when `$WATCHDOG_USEC` asks for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_reloading_stopping_and_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut d = suite_daemon()
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .env("WATCHDOG_USEC", "400000")
        .start()
        .await;
    let mut seen = String::new();
    let recv_until = |needle: &str, seen: &mut String| {
        let mut buf = [0u8; 512];
        while !seen.contains(needle) {
            let n = socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("waiting for {needle}: {e}; got {seen:?}"));
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    };
    recv_until("READY=1", &mut seen);
    recv_until("WATCHDOG=1", &mut seen);
    d.signal(libc::SIGHUP);
    recv_until("RELOADING=1", &mut seen);
    let after_reload = seen.rfind("RELOADING=1").unwrap();
    let mut tail = seen[after_reload..].to_string();
    recv_until("READY=1", &mut tail);
    assert_eq!(d.terminate().await.code(), Some(0));
    recv_until("STOPPING=1", &mut seen);
}
