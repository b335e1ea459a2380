//! Connection management end to end: config validation, the API token,
//! apply/export, the activation rules through the API and the CLI, bad
//! requests, restarts and the store lock.

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use serde_json::{json, Value};

const SPEC_EXAMPLE: &str = r#"
[[integration]]
name = "acme-incidents"
description = "Incidents to ACME's ServiceNow"
max_attempts = 8
backoff = { initial = "1s", max = "10m" }
timeout = "30s"
concurrency = 16
response_action = [ { code = "401", retry = true } ]

  [[integration.message]]
  name = "CreateIncident"
  method = "POST"
  path = "/api/now/table/${variables.table}"
  headers = { "Content-Type" = "application/json" }

  [[integration.connection]]
  name = "prod"
  environment = "production"
  endpoint_url = "https://acme.example.com"
  instance_name = "acme-prod"
  active = true
  notes = "Uses the integration user svc-outbox"
  auth = { type = "basic", username = "svc-outbox", password = "literal-secret-pw" }
  protocol_profile = "acme-mtls"
  mid_server = "dc1"
  inbound_user = "acme-inbound"
  variables = { table = "incident" }

  [[integration.connection]]
  name = "test"
  environment = "test"
  endpoint_url = "https://acme-test.example.com"
  auth = { type = "oauth", profile = "acme-oauth" }
  variables = { table = "incident" }

  [[integration.connection]]
  name = "dev"
  environment = "development"
  endpoint_url = "http://127.0.0.1:9"
  variables = { table = "incident" }

[[oauth_profile]]
name = "acme-oauth"
token_url = "https://acme.example.com/oauth_token.do"
client_id = "outbox"
client_secret = { file = "acme-oauth-secret" }
scope = "useraccount"

[[protocol_profile]]
name = "acme-mtls"
client_cert = "/etc/outbox/acme.crt"
client_key = "/etc/outbox/acme.key"
ca = "/etc/outbox/acme-ca.crt"

[[inbound_user]]
name = "acme-inbound"
password = { env = "ACME_INBOUND_PW" }
"#;

/// A daemon with MID server dc1 configured, and so its tunnel, whose
/// certificate and key are written next to its config.
async fn daemon() -> Daemon {
    let mut d = suite_daemon()
        .config_toml("[mid_servers.dc1]\ntoken = \"relay-secret\"")
        .prepare();
    let (cert, key) = outbox_tests::Pki::new()
        .server()
        .write_to(d.dir(), "daemon");
    let mut text = std::fs::read_to_string(d.config_path()).unwrap();
    text.push_str(&format!(
        "\n[tunnel]\nlisten = \"127.0.0.1:0\"\ncert = {cert:?}\nkey = {key:?}\n"
    ));
    std::fs::write(d.config_path(), text).unwrap();
    d.restart().await;
    d
}

fn active_of(v: &Value) -> Option<String> {
    v["active_connection"].as_str().map(str::to_string)
}

#[tokio::test]
async fn apply_is_idempotent_export_round_trips_and_masks_secrets() {
    let d = daemon().await;
    let (s, v) = d.apply(SPEC_EXAMPLE).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["changed"].as_array().unwrap().len(), 1);
    let (s, v) = d.apply(SPEC_EXAMPLE).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        v["changed"].as_array().unwrap().is_empty(),
        "second apply changed {v}"
    );

    let (_, first) = d.get("/v1/export").await;
    let first = first.as_str().unwrap().to_string();
    assert!(!first.contains("literal-secret-pw"), "{first}");
    assert!(first.contains("password = \"***\""), "{first}");
    assert!(first.contains("env = \"ACME_INBOUND_PW\""), "{first}");
    let (s, v) = d.apply(&first).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["changed"].as_array().unwrap().is_empty(), "{v}");
    let (_, second) = d.get("/v1/export").await;
    assert_eq!(second.as_str().unwrap(), first);

    // No answer of the API carries the secret.
    for path in [
        "/v1/integrations",
        "/v1/integrations/acme-incidents",
        "/v1/docs",
        "/v1/status",
    ] {
        let (_, v) = d.get(path).await;
        assert!(
            !v.to_string().contains("literal-secret-pw"),
            "{path} leaks the password"
        );
    }
    assert!(
        !d.log().contains("literal-secret-pw"),
        "the log leaks the password"
    );
}

#[tokio::test]
async fn an_invalid_document_is_refused_whole_with_every_problem() {
    let d = daemon().await;
    let bad = SPEC_EXAMPLE
        .replace("\"production\"", "\"prodd\"")
        .replace("timeout = \"30s\"", "timeout = \"soon\"")
        .replace(
            "name = \"acme-oauth\"\n",
            "name = \"acme-oauth\"\ncolour = \"red\"\n",
        );
    let (s, v) = d.apply(&bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let problems: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(problems.iter().any(|p| p.starts_with(
        "integration[acme-incidents].connection[prod].environment: \"prodd\" is not one of \"production\", \"pre-production\", \"test\", \"development\", \"sandbox\""
    )), "{problems:#?}");
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("integration[acme-incidents].timeout:")),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("oauth_profile[acme-oauth].colour: unknown key")),
        "{problems:#?}"
    );
    let (_, list) = d.get("/v1/integrations").await;
    assert_eq!(list, json!([]), "nothing of a refused file is applied");

    // Two active connections in one integration.
    let two = SPEC_EXAMPLE.replace(
        "endpoint_url = \"https://acme-test.example.com\"",
        "endpoint_url = \"https://acme-test.example.com\"\n  active = true",
    );
    let (s, v) = d.apply(&two).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("prod, test are all active"),
        "{v}"
    );

    // Not TOML at all.
    let (s, v) = d.apply("[[integration]\nname=").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"].as_str().unwrap().contains("not valid TOML"),
        "{v}"
    );

    // The CLI shows every problem and exits 1.
    let file = write(d.dir(), "bad.toml", &bad);
    let out = d.cli(&["apply", "-f", file.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}: the integration file has", file.display())),
        "the file is named: {err}"
    );
    assert!(err.contains("connection[prod].environment"), "{err}");
    assert!(err.contains("colour: unknown key"), "{err}");
}

#[tokio::test]
async fn activation_rules_through_the_api() {
    let d = daemon().await;
    d.apply(SPEC_EXAMPLE).await;
    let base = "/v1/integrations/acme-incidents";
    let (_, v) = d.get(base).await;
    assert_eq!(v["state"], "active");
    assert_eq!(active_of(&v).as_deref(), Some("prod"));
    assert_eq!(v["environment"], "production");

    // Rule 1: activating test deactivates prod.
    let (s, v) = d
        .post_json(&format!("{base}/connections/test/activate"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(active_of(&v).as_deref(), Some("test"));
    let actives: Vec<_> = v["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["active"] == true)
        .collect();
    assert_eq!(actives.len(), 1);

    // Rule 2: deactivating the active connection turns the integration off.
    let (_, v) = d
        .post_json(&format!("{base}/connections/test/deactivate"), json!({}))
        .await;
    assert_eq!(v["state"], "off");
    assert_eq!(v["active_connection"], Value::Null);

    // Rule 3: activating the integration brings back the last active one.
    let (s, v) = d.post_json(&format!("{base}/activate"), json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(active_of(&v).as_deref(), Some("test"));

    // Rule 2: deactivating the integration deactivates its connection.
    let (_, v) = d.post_json(&format!("{base}/deactivate"), json!({})).await;
    assert_eq!(v["state"], "off");
    assert!(v["connections"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["active"] == false));

    // Pause needs an active integration; resume a paused one.
    let (s, _) = d.post_json(&format!("{base}/pause"), json!({})).await;
    assert_eq!(s, StatusCode::CONFLICT);
    d.post_json(&format!("{base}/activate"), json!({})).await;
    let (_, v) = d.post_json(&format!("{base}/pause"), json!({})).await;
    assert_eq!(v["state"], "paused");
    let (_, v) = d.post_json(&format!("{base}/resume"), json!({})).await;
    assert_eq!(v["state"], "active");

    // Unknown names are 404 with a JSON error.
    let (s, v) = d
        .post_json(&format!("{base}/connections/nope/activate"), json!({}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(v["error"].as_str().unwrap().contains("nope"));
    let (s, _) = d
        .post_json("/v1/integrations/nope/activate", json!({}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn rule3_refuses_with_the_list_of_connections() {
    let d = daemon().await;
    let doc = SPEC_EXAMPLE.replace("  active = true\n", "");
    let (s, _) = d.apply(&doc).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = d
        .post_json("/v1/integrations/acme-incidents/activate", json!({}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("dev, prod, test"), "{e}");
    let out = d.cli(&["activate", "acme-incidents"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dev, prod, test"));
}

#[tokio::test]
async fn state_survives_restart_and_a_second_daemon_is_refused() {
    let mut d = daemon().await;
    d.apply(SPEC_EXAMPLE).await;
    d.post_json(
        "/v1/integrations/acme-incidents/connections/dev/activate",
        json!({}),
    )
    .await;
    d.post_json("/v1/integrations/acme-incidents/pause", json!({}))
        .await;

    // A second outboxd on the same data dir fails clearly, no panic.
    let out = d.outboxd_command(&[]).output().expect("outboxd runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another outboxd"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    assert_eq!(
        d.terminate().await.code(),
        Some(0),
        "SIGTERM exits 0:\n{}",
        d.log()
    );
    d.restart().await;
    let (_, v) = d.get("/v1/integrations/acme-incidents").await;
    assert_eq!(v["state"], "paused");
    assert_eq!(active_of(&v).as_deref(), Some("dev"));
    let (_, export) = d.get("/v1/export").await;
    assert!(export.as_str().unwrap().contains("acme-mtls"));
}

#[tokio::test]
async fn bad_tokens_bad_bodies_and_unknown_paths() {
    let d = daemon().await;
    let (s, v) = d.request(Method::GET, "/v1/integrations", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(v["error"].is_string());
    let (s, _) = d
        .request(Method::GET, "/v1/integrations", Some("wrong"), None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = d.request(Method::GET, "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = d.get("/v1/nothing-here").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(v["error"].is_string());
    d.apply(SPEC_EXAMPLE).await;
    let (s, v) = d
        .post_body(
            "/v1/integrations/acme-incidents/messages",
            "application/json",
            "{\"message\": ".into(),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["error"].as_str().unwrap().contains("line 1"), "{v}");
    let (s, _) = d
        .post_json(
            "/v1/integrations/acme-incidents/messages",
            json!({"nope": 1}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // The daemon is still fine.
    let (s, _) = d.get("/v1/integrations").await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn cli_tables_json_and_exit_codes() {
    let d = daemon().await;
    let file = write(d.dir(), "acme.toml", SPEC_EXAMPLE);
    let out = d.cli(&["apply", "-f", file.to_str().unwrap()]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An apply that takes a connection and the message type away says so.
    let fewer = SPEC_EXAMPLE
        .replace(
            "  [[integration.connection]]\n  name = \"dev\"\n  environment = \"development\"\n  endpoint_url = \"http://127.0.0.1:9\"\n  variables = { table = \"incident\" }\n",
            "",
        )
        .replace("name = \"CreateIncident\"", "name = \"Create\"");
    assert_ne!(fewer, SPEC_EXAMPLE);
    let smaller = write(d.dir(), "fewer.toml", &fewer);
    let out = d.cli(&["apply", "-f", smaller.to_str().unwrap()]).await;
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(
            "removed message type CreateIncident, connection dev (messages queued for it end in error when sent)"
        ),
        "{said}"
    );
    let out = d.cli(&["apply", "-f", file.to_str().unwrap()]).await;
    assert!(out.status.success());
    let out = d.cli(&["integrations"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("acme-incidents") && table.contains("production"),
        "{table}"
    );
    let out = d.cli(&["--json", "connections", "acme-incidents"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["name"].is_string() && c["environment"].is_string()));
    let out = d.cli(&["activate", "acme-incidents/test"]).await;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("active connection test (test)"));
    let out = d.cli(&["activate", "acme-incidents/nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    let out = d.cli(&["activate", "a/b/c"]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = d.cli(&["no-such-command"]).await;
    assert_eq!(out.status.code(), Some(2));
    let out = d.cli(&["docs"]).await;
    let md = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "## acme-incidents",
        "#### prod",
        "Environment: production",
        "MID server: dc1",
        "Inbound user: acme-inbound",
        "`table` = `incident`",
        "> Uses the integration user svc-outbox",
    ] {
        assert!(md.contains(needle), "docs lack {needle:?}:\n{md}");
    }
    // The daemon unreachable: exit 1 with a clear message.
    let out = std::process::Command::new(bin("outbox"))
        .args([
            "--api",
            &format!("http://127.0.0.1:{}", free_port()),
            "--token",
            "t",
            "integrations",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach outboxd"));
}

#[tokio::test]
async fn invalid_configs_exit_2_naming_the_key_before_binding() {
    let cases = [
        ("retention = \"forever\"", "retention"),
        ("colour = \"blue\"", "colour"),
        (
            "[tunnel]\ncert = \"/nonexistent.crt\"\nkey = \"/nonexistent.key\"",
            "tunnel.cert",
        ),
        (
            "[mid_servers.dc1]\ntoken = { env = \"E2E_SURELY_UNSET\" }",
            "mid_servers.dc1.token",
        ),
        (
            "[mid_servers.dc1]\ntoken = { file = \"/nonexistent/token\" }",
            "mid_servers.dc1.token",
        ),
        ("[log]\nformat = \"xml\"", "log.format"),
    ];
    for (extra, key) in cases {
        let d = suite_daemon().config_toml(extra).prepare();
        for args in [&["--check-config"][..], &[][..]] {
            let out = d.outboxd_command(args).output().expect("outboxd runs");
            assert_eq!(out.status.code(), Some(2), "{extra} {args:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(key), "{extra}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        }
        // Nothing listened on the API port.
        assert!(std::net::TcpStream::connect(("127.0.0.1", d.port())).is_err());
    }
    // A bad address.
    let d = suite_daemon().prepare();
    let text = std::fs::read_to_string(d.config_path())
        .unwrap()
        .replace("listen = \"127.0.0.1:", "listen = \"nowhere:");
    std::fs::write(d.config_path(), text).unwrap();
    let out = d
        .outboxd_command(&["--check-config"])
        .output()
        .expect("outboxd runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api.listen"));
    // Environment overrides are checked too.
    let d = suite_daemon().env("OUTBOX_API__LISTEN", "bogus").prepare();
    let out = d
        .outboxd_command(&["--check-config"])
        .output()
        .expect("outboxd runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("api.listen"));
}

#[tokio::test]
async fn without_a_token_in_the_config_one_is_generated_for_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let config = write(
        dir.path(),
        "outboxd.toml",
        &format!(
            "data_dir = {:?}\n[api]\nlisten = \"127.0.0.1:{port}\"\n",
            data.display().to_string()
        ),
    );
    let mut child = std::process::Command::new(bin("outboxd"))
        .arg("--config")
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let token_file = data.join("api-token");
    eventually_msg(Duration::from_secs(20), "the token file", async || {
        std::fs::metadata(&token_file).ok()
    })
    .await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The CLI finds the token through the data dir, with no --token.
    let out = eventually_msg(Duration::from_secs(20), "the API", async || {
        let out = std::process::Command::new(bin("outbox"))
            .args([
                "--api",
                &format!("http://127.0.0.1:{port}"),
                "--json",
                "integrations",
            ])
            .env("OUTBOX_DATA_DIR", &data)
            .env_remove("OUTBOX_TOKEN")
            .output()
            .unwrap();
        out.status.success().then_some(out)
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert_eq!(
        process::terminate(&mut child, Duration::from_secs(20))
            .await
            .code(),
        Some(0)
    );
}
