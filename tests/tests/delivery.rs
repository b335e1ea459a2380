//! Delivery end to end: enqueue, templates, retries, outcome classes, the
//! instance guard, pause/off, ordering, replay/ignore/repair, idempotency,
//! bad input, metrics, and `kill -9` in the middle of delivery.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

async fn setup(extra: &str) -> (Daemon, Sink) {
    let sink = Sink::start().await;
    let d = suite_daemon().instance_name("acme-dev").start().await;
    let doc = integration(
        "acme",
        &[&connection(
            "dev",
            "development",
            &sink.url(),
            &format!("active = true\n  {extra}"),
        )],
    );
    let (s, v) = d.apply(&doc).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    (d, sink)
}

async fn send(d: &Daemon, body: Value) -> String {
    send_to(d, "acme", body).await
}

/// Enqueues `body` (the JSON envelope) into `integration`; its id.
async fn send_to(d: &Daemon, integration: &str, body: Value) -> String {
    let (s, v) = d.enqueue(integration, &body).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_message_is_built_from_the_active_connection_and_delivered() {
    let (d, sink) =
        setup("auth = { type = \"basic\", username = \"svc\", password = { env = \"E2E_PW\" } }")
            .await;
    // The env secret is read by the daemon at send time; this daemon has
    // none, so set one up through a second connection instead.
    let id = send(
        &d,
        json!({"message": "Create", "body": {"a": 1}, "headers": {"X-Trace": "t1"}}),
    )
    .await;
    d.wait_for_state(&id, "queued", WAIT).await;
    // Missing env var: the attempt says so and the message waits to retry.
    let (_, a) = d.first_attempt(&id, WAIT).await;
    assert!(a["error"].as_str().unwrap().contains("E2E_PW"), "{a}");
    assert_eq!(sink.count(), 0);

    // Switch to a connection without auth: queued messages follow it.
    let doc = integration(
        "acme",
        &[
            &connection("dev", "development", &sink.url(), ""),
            &connection(
                "other",
                "test",
                &sink.url(),
                "variables = { table = \"other_table\" }",
            ),
        ],
    );
    let doc = doc.replace(
        "variables = { table = \"incident\" }\n  variables",
        "variables",
    );
    let (s, v) = d.apply(&doc).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    d.post_json(
        "/v1/integrations/acme/connections/other/activate",
        json!({}),
    )
    .await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    let got = sink.received();
    let last = got.last().unwrap();
    assert_eq!(last.method, "POST");
    assert_eq!(last.path, format!("/api/other_table/{id}"));
    assert_eq!(last.headers["idempotency-key"], id.as_str());
    assert_eq!(last.headers["x-trace"], "t1");
    assert_eq!(last.headers["content-type"], "application/json");
    assert_eq!(&last.body[..], br#"{"a":1}"#);
    let attempts = m["attempts"].as_array().unwrap();
    let a = attempts.last().unwrap();
    assert_eq!(a["connection"], "other");
    assert_eq!(a["environment"], "test");
    assert_eq!(a["via"], "direct");
    assert_eq!(a["status"], 200);
    assert_eq!(a["method"], "POST");
    assert!(a["url"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/api/other_table/{id}")));
    assert!(a["duration_ms"].is_u64());
}

#[tokio::test]
async fn basic_auth_is_sent_and_masked_in_attempts() {
    let (d, sink) =
        setup("auth = { type = \"basic\", username = \"svc\", password = \"s3cret\" }").await;
    let id = send(&d, json!({"message": "Create", "body": "x"})).await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    let auth = sink.received()[0].headers["authorization"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(auth, "Basic c3ZjOnMzY3JldA==");
    let recorded = m["attempts"][0]["request_headers"]["authorization"]
        .as_str()
        .unwrap();
    assert_eq!(recorded, "Basic ***");
    assert!(!m.to_string().contains("c3ZjOnMzY3JldA"));
    // `outbox message` shows the headers both ways and the answer's first
    // bytes, masked as the record is.
    sink.set_reply(
        Reply::new(200)
            .header("X-Request", "r-1")
            .body("{\"ok\":1}\u{1b}[2J"),
    );
    let id = send(&d, json!({"message": "Create", "body": "y"})).await;
    d.wait_for_state(&id, "sent", WAIT).await;
    let out = d.cli(&["message", &id]).await;
    let screen = String::from_utf8_lossy(&out.stdout);
    for line in [
        "> authorization: Basic ***",
        &format!("> idempotency-key: {id}"),
        "< x-request: r-1",
        "body: {\"ok\":1}\\u{1b}[2J",
    ] {
        assert!(screen.contains(line), "{line:?} missing in:\n{screen}");
    }
    assert!(!screen.contains("c3ZjOnMzY3JldA"), "{screen}");
}

#[tokio::test]
async fn retryable_statuses_are_retried_then_sent() {
    let (d, sink) = setup("").await;
    sink.push_script([503, 503, 503]);
    let id = send(&d, json!({"message": "Create", "body": "x"})).await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    let statuses: Vec<u64> = m["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [503, 503, 503, 200]);
    assert_eq!(
        sink.distinct_ids().len(),
        1,
        "one message, one idempotency key"
    );

    // 429 with Retry-After: honoured (capped at the backoff max of 1s).
    sink.push_script([Reply::new(429).header("Retry-After", "1")]);
    let id = send(&d, json!({"message": "Create", "body": "y"})).await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    let a = &m["attempts"][0];
    assert_eq!(a["status"], 429);
    assert_eq!(a["outcome"], "retry in 1s");
}

#[tokio::test]
async fn final_statuses_end_in_error_and_max_attempts_is_respected() {
    let (d, sink) = setup("").await;
    sink.push_script([401]);
    let id = send(&d, json!({"message": "Create", "body": "x"})).await;
    let m = d.wait_for_state(&id, "error", WAIT).await;
    assert_eq!(
        m["attempts"].as_array().unwrap().len(),
        1,
        "401 is not retried"
    );

    sink.set_status(500);
    let id = send(&d, json!({"message": "Create", "body": "x"})).await;
    let m = d.wait_for_state(&id, "error", WAIT).await;
    assert_eq!(
        m["attempts"].as_array().unwrap().len(),
        5,
        "max_attempts = 5"
    );
    assert_eq!(
        m["attempts"][4]["outcome"],
        "error: max_attempts reached (5 of 5)"
    );
}

#[tokio::test]
async fn response_actions_override_the_outcome() {
    let sink = Sink::start().await;
    let d = suite_daemon().start().await;
    let doc = integration("acme", &[&connection("dev", "development", &sink.url(), "active = true")]).replace(
        "concurrency = 4\n",
        "concurrency = 4\nresponse_action = [ { code = \"401\", retry = true }, { code = \"4xx\", retry = false, state = \"ignored\" } ]\n",
    );
    let (s, v) = d.apply(&doc).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    sink.push_script([401, 404]);
    let (_, v) = d
        .post_json(
            "/v1/integrations/acme/messages",
            json!({"message": "Create"}),
        )
        .await;
    let id = v["id"].as_str().unwrap();
    let m = d.wait_for_state(id, "ignored", WAIT).await;
    let statuses: Vec<u64> = m["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [401, 404]);
}

#[tokio::test]
async fn the_instance_guard_refuses_a_connection_for_another_instance() {
    let (d, sink) = setup("instance_name = \"acme-prod\"").await;
    let id = send(&d, json!({"message": "Create", "body": "x"})).await;
    let m = d.wait_for_state(&id, "error", WAIT).await;
    let e = m["attempts"][0]["error"].as_str().unwrap();
    assert!(
        e.contains("\"acme-prod\"") && e.contains("\"acme-dev\""),
        "{e}"
    );
    assert_eq!(sink.count(), 0, "nothing was sent");
    let (_, t) = d
        .post_json("/v1/integrations/acme/connections/dev/test", json!({}))
        .await;
    assert_eq!(t["guard"]["ok"], false);
    // Switching to it says so at once, on the switch.
    let out = d.cli(&["activate", "acme/dev"]).await;
    assert!(out.status.success());
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(
        warned.contains("warning: instance guard: connection is for \"acme-prod\"")
            && warned.contains("every message ends in error while this connection is active"),
        "{warned}"
    );
    let (_, v) = d.get("/v1/integrations/acme").await;
    assert!(
        v["guard_error"]
            .as_str()
            .is_some_and(|g| g.contains("acme-dev")),
        "{v}"
    );
}

#[tokio::test]
async fn paused_and_off_integrations_hold_messages_in_order() {
    let (d, sink) = setup("").await;
    d.post_json("/v1/integrations/acme/pause", json!({})).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            send(
                &d,
                json!({"message": "Create", "body": format!("{i}"), "ordering_key": "k"}),
            )
            .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.count(), 0, "paused: nothing goes");
    d.post_json("/v1/integrations/acme/deactivate", json!({}))
        .await;
    let (_, v) = d.get("/v1/integrations/acme").await;
    assert_eq!(v["state"], "off");
    assert_eq!(v["queue_depth"], 5);
    d.post_json("/v1/integrations/acme/activate", json!({}))
        .await;
    eventually_msg(WAIT, "all five sent", async || {
        (sink.count() == 5).then_some(())
    })
    .await;
    let bodies: Vec<String> = sink
        .received()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(bodies, ["0", "1", "2", "3", "4"]);
}

/// The body is stored with its record: shown by `GET`, still there after a
/// restart, sent as it came, and carried by a replay.
#[tokio::test]
async fn bodies_survive_a_restart_and_are_sent_as_they_came() {
    let (mut d, sink) = setup("").await;
    d.post_json("/v1/integrations/acme/deactivate", json!({}))
        .await;
    let body = "{\"caf\u{e9}\": [1, 2]}\n";
    let id = send(&d, json!({"message": "Create", "body": body})).await;
    assert_eq!(d.message(&id).await["body"], body);
    d.terminate().await;
    d.restart().await;
    assert_eq!(d.message(&id).await["body"], body, "after a restart");
    d.post_json("/v1/integrations/acme/activate", json!({}))
        .await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(m["body"], body);
    assert_eq!(sink.received()[0].body, body.as_bytes());
    let (s, copy) = d
        .post_json(&format!("/v1/messages/{id}/replay"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{copy}");
    let copy_id = copy["id"].as_str().unwrap();
    assert_eq!(d.wait_for_state(copy_id, "sent", WAIT).await["body"], body);
    assert_eq!(sink.received()[1].body, body.as_bytes());
}

#[tokio::test]
async fn an_error_blocks_its_ordering_key_until_replayed_or_ignored() {
    let (d, sink) = setup("").await;
    sink.push_script([400]);
    // a2 waits behind a1, so the scripted 400 can only go to a1.
    let a1 = send(
        &d,
        json!({"message": "Create", "body": "a1", "ordering_key": "a"}),
    )
    .await;
    let a2 = send(
        &d,
        json!({"message": "Create", "body": "a2", "ordering_key": "a"}),
    )
    .await;
    d.wait_for_state(&a1, "error", WAIT).await;
    // Another line is not held up.
    let b1 = send(
        &d,
        json!({"message": "Create", "body": "b1", "ordering_key": "b"}),
    )
    .await;
    d.wait_for_state(&b1, "sent", WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = d.message(&a2).await;
    assert_eq!(held["state"], "queued", "a2 waits behind a1");
    // And says so, with what to do about it.
    assert_eq!(held["blocked_by"], a1.as_str(), "{held}");
    let out = d.cli(&["message", &a2]).await;
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains(&format!(
            "blocked_by      {a1}, in error at the head of its ordering line: replay or ignore it"
        )),
        "{screen}"
    );

    // Replay: the copy takes a1's place and goes before a2.
    let (s, copy) = d
        .post_json(&format!("/v1/messages/{a1}/replay"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{copy}");
    let copy_id = copy["id"].as_str().unwrap().to_string();
    assert_eq!(copy["replay_of"], a1.as_str());
    // Once: a second replay of a1 is refused, naming the copy to replay.
    let (s, again) = d
        .post_json(&format!("/v1/messages/{a1}/replay"), json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{again}");
    assert!(
        again
            .to_string()
            .contains(&format!("replay {copy_id} to send it again")),
        "{again}"
    );
    d.wait_for_state(&a2, "sent", WAIT).await;
    assert_eq!(d.message(&a1).await["state"], "ignored");
    let order: Vec<String> = sink
        .received()
        .iter()
        .filter(|r| r.body.starts_with(b"a"))
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(order, [a1.clone(), copy_id, a2.clone()]);

    // Ignore releases the ones behind.
    sink.push_script([422]);
    let c1 = send(
        &d,
        json!({"message": "Create", "body": "c1", "ordering_key": "c"}),
    )
    .await;
    let c2 = send(
        &d,
        json!({"message": "Create", "body": "c2", "ordering_key": "c"}),
    )
    .await;
    d.wait_for_state(&c1, "error", WAIT).await;
    let out = d.cli(&["ignore", &c1]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.wait_for_state(&c2, "sent", WAIT).await;

    // Repair replays every message in error, in order.
    sink.push_script([400, 400]);
    let e1 = send(&d, json!({"message": "Create", "body": "e1"})).await;
    let e2 = send(&d, json!({"message": "Create", "body": "e2"})).await;
    d.wait_for_state(&e1, "error", WAIT).await;
    d.wait_for_state(&e2, "error", WAIT).await;
    let out = d.cli(&["--json", "repair", "acme"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["replayed"], 2);
    for m in v["messages"].as_array().unwrap() {
        d.wait_for_state(m["id"].as_str().unwrap(), "sent", WAIT)
            .await;
    }
}

/// A parameter the message type's path or headers use is checked at
/// enqueue: without it the message could never be built, and the producer
/// hears so at once (400), instead of the message ending in `error` later.
#[tokio::test]
async fn a_message_without_a_parameter_its_type_uses_is_refused_at_enqueue() {
    let sink = Sink::start().await;
    let d = suite_daemon().instance_name("acme-dev").start().await;
    let doc = integration(
        "acme",
        &[&connection("dev", "development", &sink.url(), "active = true")],
    )
    .replace(
        "path = \"/api/${variables.table}/${message.id}\"",
        "path = \"/api/${params.kind}/${message.id}\"",
    )
    .replace(
        "headers = { \"Content-Type\" = \"application/json\" }",
        "headers = { \"Content-Type\" = \"application/json\", \"X-Tenant\" = \"${params.tenant}\" }",
    );
    let (s, v) = d.apply(&doc).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = d
        .enqueue(
            "acme",
            &json!({"message": "Create", "body": {}, "params": {"tenant": "t1"}}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v.to_string().contains(
            "params.kind: message type Create uses ${params.kind} in its path, \
             and this message does not give it"
        ),
        "{v}"
    );
    // Raw enqueues give their parameters in the query string.
    let (s, v) = d
        .post_body(
            "/v1/integrations/acme/messages/Create?kind=incident",
            "application/json",
            bytes::Bytes::from_static(b"{}"),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("params.tenant"), "{v}");
    let id = send(
        &d,
        json!({"message": "Create", "body": {}, "params": {"kind": "incident", "tenant": "t1"},
               "idempotency_key": "k-1"}),
    )
    .await;
    d.wait_for_state(&id, "sent", WAIT).await;
    // A producer's retry with a key seen before gets the first id, even
    // without the parameters (SPEC §7: it enqueues nothing).
    let (s, v) = d
        .enqueue(
            "acme",
            &json!({"message": "Create", "body": {}, "idempotency_key": "k-1"}),
        )
        .await;
    assert_eq!(
        (s, v["id"].as_str()),
        (StatusCode::ACCEPTED, Some(id.as_str())),
        "{v}"
    );
    let got = sink.last().unwrap();
    assert_eq!(got.path, format!("/api/incident/{id}"));
    assert_eq!(got.headers["x-tenant"], "t1");
}

#[tokio::test]
async fn idempotency_keys_bad_input_and_limits() {
    let (d, sink) = setup("").await;
    let first = send(
        &d,
        json!({"message": "Create", "body": "x", "idempotency_key": "order-1"}),
    )
    .await;
    let (s, again) = d
        .post_json(
            "/v1/integrations/acme/messages",
            json!({"message": "Create", "body": "x", "idempotency_key": "order-1"}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(again["id"], first.as_str());
    d.wait_for_state(&first, "sent", WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sink.count(), 1);

    // The raw form with headers.
    let (s, v) = d
        .request(
            http::Method::POST,
            "/v1/integrations/acme/messages/Create",
            Some(TOKEN),
            Some(("text/plain", bytes::Bytes::from_static(b"raw body"))),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    d.wait_for_state(v["id"].as_str().unwrap(), "sent", WAIT)
        .await;
    assert_eq!(&sink.received().last().unwrap().body[..], b"raw body");

    let (s, _) = d
        .post_json(
            "/v1/integrations/nope/messages",
            json!({"message": "Create"}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = d
        .post_json("/v1/integrations/acme/messages", json!({"message": "Nope"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().unwrap().contains("Create"), "{v}");
    let (s, v) = d
        .post_body(
            "/v1/integrations/acme/messages",
            "application/json",
            "{not json".into(),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Where it is wrong, said once.
    assert_eq!(
        v["error"],
        "request body is not valid JSON for this call: key must be a string at line 1 column 2",
        "{v}"
    );
    let big = vec![b'x'; 5 << 20];
    let (s, v) = d
        .post_body(
            "/v1/integrations/acme/messages/Create",
            "text/plain",
            big.into(),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    // Headers that could never be sent are refused at enqueue.
    for (headers, expected) in [
        (
            json!({"Bad Name": "v"}),
            "\"Bad Name\" is not a header name",
        ),
        (json!({"X-Ok": "a\r\nX-Injected: 1"}), "headers.X-Ok: "),
        (
            json!({"Content-Length": "50"}),
            "headers.Content-Length: set by the daemon",
        ),
    ] {
        let (s, v) = d
            .post_json(
                "/v1/integrations/acme/messages",
                json!({"message": "Create", "headers": headers}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error"].as_str().unwrap_or("").contains(expected), "{v}");
    }
    let (s, _) = d.get("/v1/messages/zz").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = d.get("/v1/messages/00000000000fffff").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = d.get("/v1/messages?state=bogus").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Still up and delivering.
    let id = send(&d, json!({"message": "Create", "body": "after"})).await;
    d.wait_for_state(&id, "sent", WAIT).await;
}

#[tokio::test]
async fn connection_test_heads_then_gets() {
    let (d, sink) = setup("").await;
    sink.push_script([405]);
    let (s, t) = d
        .post_json("/v1/integrations/acme/connections/dev/test", json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{t}");
    assert_eq!(t["ok"], true);
    let attempts = t["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["method"], "HEAD");
    assert_eq!(attempts[0]["status"], 405);
    assert_eq!(attempts[1]["method"], "GET");
    assert_eq!(attempts[1]["status"], 200);
    assert_eq!(t["guard"]["ok"], true);

    // HEAD succeeding: no GET.
    let (_, t) = d
        .post_json("/v1/integrations/acme/connections/dev/test", json!({}))
        .await;
    assert_eq!(t["attempts"].as_array().unwrap().len(), 1);

    // No response at all fails, and the CLI exits 1.
    let doc = integration(
        "down",
        &[&connection(
            "c",
            "test",
            &format!("http://127.0.0.1:{}", free_port()),
            "",
        )],
    );
    d.apply(&doc).await;
    let (_, t) = d
        .post_json("/v1/integrations/down/connections/c/test", json!({}))
        .await;
    assert_eq!(t["ok"], false);
    assert_eq!(t["attempts"].as_array().unwrap().len(), 2);
    assert!(t["attempts"][0]["error"].is_string());
    let out = d.cli(&["test", "down/c"]).await;
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test]
async fn metrics_and_status_tell_what_is_wrong() {
    let (d, sink) = setup("").await;
    sink.set_status(503);
    let id = send(&d, json!({"message": "Create", "body": "x"})).await;
    eventually_msg(WAIT, "a failed attempt", async || {
        (d.message(&id).await["attempt_count"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    let (s, v) = d.request(http::Method::GET, "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let text = v.as_str().unwrap();
    for needle in [
        "outbox_messages_enqueued_total{integration=\"acme\"} 1",
        "outbox_messages_retried_total{integration=\"acme\",connection=\"dev\"}",
        "outbox_attempt_duration_seconds_bucket",
        "outbox_queue_depth{integration=\"acme\",state=\"queued\"} 1",
        "outbox_store_bytes",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }
    let out = d.cli(&["status"]).await;
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("acme") && screen.contains("HTTP 503"),
        "{screen}"
    );
}

/// Thousands of messages enqueued concurrently, the daemon killed with
/// SIGKILL in the middle of delivery, restarted: the sink must see every id
/// that was acknowledged, with its body. Half the bodies are small enough
/// to live in their record, half go to the body log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_delivery_loses_no_acknowledged_message() {
    const MESSAGES: usize = 3200;
    const PRODUCERS: usize = 16;
    let sink = Sink::start().await;
    // Slow enough that the kill lands while many messages are still queued.
    sink.set_delay(Duration::from_millis(5));
    let d = suite_daemon().start().await;
    let doc = integration(
        "acme",
        &[&connection(
            "dev",
            "development",
            &sink.url(),
            "active = true",
        )],
    );
    d.apply(&doc).await;
    let d = Arc::new(tokio::sync::Mutex::new(d));

    let acked = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let d = d.clone();
        let acked = acked.clone();
        producers.push(tokio::spawn(async move {
            let d = d.lock().await.api_client();
            for i in 0..MESSAGES / PRODUCERS {
                let text = format!("{p}-{i}-{}", "x".repeat(5000 * (i % 2)));
                let body = json!({"message": "Create", "body": text});
                // A refused or cut-off request was not acknowledged.
                match d.enqueue("acme", &body).await {
                    Ok((StatusCode::ACCEPTED, v)) => {
                        acked
                            .lock()
                            .unwrap()
                            .insert(v["id"].as_str().unwrap().to_string(), text);
                    }
                    other => eprintln!("enqueue not acknowledged: {other:?}"),
                }
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    let acked: HashMap<String, String> = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), MESSAGES, "every enqueue was acknowledged");
    // Kill once delivery is under way but far from done.
    eventually_msg(WAIT, "delivery to start", async || {
        (sink.count() > 50).then_some(())
    })
    .await;
    let mut guard = d.lock().await;
    guard.kill9();
    let seen_before = sink.distinct_ids().len();
    assert!(
        seen_before < MESSAGES,
        "the kill came too late to prove anything"
    );
    sink.set_delay(Duration::ZERO);
    guard.restart().await;
    eventually_msg(
        Duration::from_secs(120),
        "every acknowledged id at the sink",
        async || {
            let seen = sink.distinct_ids();
            acked.keys().all(|id| seen.contains(id)).then_some(())
        },
    )
    .await;
    for r in sink.received() {
        let id = r.header("idempotency-key").unwrap_or_default().to_string();
        let want = acked.get(&id).map(String::as_bytes);
        assert_eq!(want, Some(&r.body[..]), "the body of {id}");
    }
    let (_, v) = guard.get("/v1/integrations/acme").await;
    eventually_msg(WAIT, "an empty queue", async || {
        let (_, v) = guard.get("/v1/integrations/acme").await;
        (v["queue_depth"] == 0).then_some(())
    })
    .await;
    let _ = v;
}

/// A credential this host cannot read (its variable unset) sends nothing:
/// the attempt says why, the message is retried, and the log has a warning.
#[tokio::test]
async fn an_unreadable_credential_sends_nothing_and_is_a_warning() {
    let (d, sink) = setup(
        "auth = { type = \"basic\", username = \"svc\", password = { env = \"E2E_SURELY_UNSET_PW\" } }",
    )
    .await;
    let id = send(&d, json!({"message": "Create", "body": "x"})).await;
    let (m, a) = d.first_attempt(&id, WAIT).await;
    assert!(
        a["error"]
            .as_str()
            .unwrap_or("")
            .contains("environment variable E2E_SURELY_UNSET_PW is not set"),
        "{m}"
    );
    assert!(
        a["outcome"].as_str().unwrap_or("").starts_with("retry in"),
        "{m}"
    );
    assert_eq!(sink.count(), 0, "nothing was sent");
    eventually_msg(WAIT, "the warning", async || {
        d.log()
            .lines()
            .any(|l| {
                l.contains("WARN") && l.contains("not sent") && l.contains("E2E_SURELY_UNSET_PW")
            })
            .then_some(())
    })
    .await;
}

/// A target on loopback that answers its first request with `first` and
/// then holds the connection for a minute; its URL.
async fn raw_target(first: &'static [u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a target");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = tcp.read(&mut buf).await;
                let _ = tcp.write_all(first).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
            });
        }
    });
    format!("http://{addr}")
}

/// An answer is read as far as it can be: a malformed header line is
/// skipped and the status counts; a body that stalls after the head is
/// told apart from no answer at all.
#[tokio::test]
async fn answers_are_read_as_far_as_they_can_be() {
    let d = suite_daemon().instance_name("acme-dev").start().await;
    let bad_header =
        raw_target(b"HTTP/1.1 201 Created\r\nx-odd: a\x01b\r\ncontent-length: 2\r\n\r\nok").await;
    let stalled = raw_target(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nten bytes.").await;
    for (name, url) in [("odd", &bad_header), ("stalled", &stalled)] {
        let doc = integration(
            name,
            &[&connection("dev", "development", url, "active = true")],
        );
        let (s, v) = d.apply(&doc).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    let id = send_to(&d, "odd", json!({"message": "Create", "body": "x"})).await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(m["attempts"][0]["status"], 201, "{m}");

    let id = send_to(&d, "stalled", json!({"message": "Create", "body": "x"})).await;
    let (m, _) = d.first_attempt(&id, WAIT).await;
    assert_eq!(
        m["attempts"][0]["error"], "the response body did not end within 5s",
        "{m}"
    );
}
