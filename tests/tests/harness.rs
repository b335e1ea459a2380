//! Tests of the harness itself: the sinks, the token endpoint and the PKI must behave like the remote systems they stand for, or the suites built on them prove nothing. The last tests start the real daemon through the `Daemon` builder.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode, Version};
use outbox_tests::client::{TestClient, Versions};
use outbox_tests::pki::DAY;
use outbox_tests::{eventually, Daemon, OAuthServer, Pki, Reply, Sink};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test]
async fn tls_sink_demanding_a_client_cert_refuses_clients_without_a_trusted_one() {
    let pki = Pki::new();
    let sink = Sink::builder()
        .tls(&pki)
        .require_client_cert(pki.ca_pem())
        .start()
        .await;
    assert!(
        sink.url().starts_with("https://localhost:"),
        "{}",
        sink.url()
    );

    let anonymous = TestClient::new(pki.client_config(None));
    let err = anonymous
        .get(&sink.url(), &[])
        .await
        .expect_err("a client without a certificate must be refused");
    assert_eq!(sink.count(), 0, "no request may reach the sink: {err}");

    let other_ca = Pki::new();
    let stranger = TestClient::new(pki.client_config(Some(other_ca.client())));
    stranger
        .get(&sink.url(), &[])
        .await
        .expect_err("a certificate from another CA must be refused");
    assert_eq!(sink.count(), 0);
    let rejected = eventually(WAIT, || {
        let r = sink.rejected_handshakes();
        (r.len() >= 2).then_some(r)
    })
    .await;
    assert!(
        rejected
            .iter()
            .any(|r| r.to_lowercase().contains("certificate")),
        "the refusals name the certificate: {rejected:?}"
    );

    let trusted = TestClient::new(pki.client_config(Some(pki.client())));
    let resp = trusted
        .get(&format!("{}/ping?x=1", sink.url()), &[])
        .await
        .expect("a client certificate from the CA is accepted");
    assert_eq!(resp.status, StatusCode::OK);
    let seen = sink.wait_for(1, WAIT).await;
    assert_eq!(seen[0].path, "/ping?x=1");
    assert_eq!(
        seen[0].client_cert.as_deref(),
        Some(&pki.client().cert_der[..]),
        "the sink records the certificate the client showed"
    );
}

#[tokio::test]
async fn clients_that_do_not_trust_the_sink_ca_fail_the_handshake() {
    let pki = Pki::new();
    let sink = Sink::builder().tls(&pki).start().await;
    let wrong_roots = TestClient::new(Pki::new().client_config(None));
    let err = wrong_roots
        .get(&sink.url(), &[])
        .await
        .expect_err("the sink's certificate is not trusted by another CA");
    assert!(
        err.to_lowercase().contains("certificate"),
        "the error names the certificate: {err}"
    );
    let right_roots = TestClient::new(pki.client_config(None));
    let resp = right_roots.get(&sink.url(), &[]).await.expect("trusted");
    assert_eq!(resp.status, StatusCode::OK);
    // By IP address too: the certificate carries 127.0.0.1.
    let by_ip = format!("https://{}", sink.addr());
    assert_eq!(
        right_roots.get(&by_ip, &[]).await.expect("trusted").status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn basic_sink_answers_401_without_the_right_credentials() {
    let sink = Sink::builder()
        .basic("svc-outbox", "s3cret")
        .script([201])
        .start()
        .await;
    let client = TestClient::new(Pki::new().client_config(None));
    let none = client.get(&sink.url(), &[]).await.expect("answer");
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert!(none.headers.contains_key("www-authenticate"));
    let wrong = basic("svc-outbox", "guess");
    let resp = client
        .get(&sink.url(), &[("authorization", &wrong)])
        .await
        .expect("answer");
    assert_eq!(resp.status, StatusCode::UNAUTHORIZED);
    let right = basic("svc-outbox", "s3cret");
    // The 401s did not consume the script: the first accepted request
    // gets the scripted 201, the next the default 200.
    for expected in [StatusCode::CREATED, StatusCode::OK] {
        let resp = client
            .get(&sink.url(), &[("authorization", &right)])
            .await
            .expect("answer");
        assert_eq!(resp.status, expected);
    }
    let seen = sink.received();
    let statuses: Vec<u16> = seen.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 401, 201, 200]);
    assert_eq!(
        seen[3].basic(),
        Some(("svc-outbox".into(), "s3cret".into()))
    );
}

#[tokio::test]
async fn bearer_sink_accepts_only_its_token() {
    let sink = Sink::builder().bearer("tok-123").start().await;
    let client = TestClient::new(Pki::new().client_config(None));
    for (auth, status) in [
        (None, 401),
        (Some("Bearer tok-999"), 401),
        (Some("Basic dG9rLTEyMw=="), 401),
        (Some("Bearer tok-123"), 200),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let resp = client.get(&sink.url(), &headers).await.expect("answer");
        assert_eq!(resp.status.as_u16(), status, "with {auth:?}");
    }
    assert_eq!(
        sink.last().and_then(|r| r.bearer().map(String::from)),
        Some("tok-123".into())
    );
}

#[tokio::test]
async fn the_script_is_consumed_in_order_then_the_default_status() {
    let sink = Sink::builder()
        .script([
            Reply::new(503),
            Reply::new(429).header("Retry-After", "1"),
            Reply::new(500).body("boom"),
        ])
        .start()
        .await;
    let client = TestClient::new(Pki::new().client_config(None));
    let mut got = Vec::new();
    for i in 0..5 {
        let key = format!("msg-{i}");
        let resp = client
            .request(
                Method::POST,
                &format!("{}/api/incident", sink.url()),
                &[
                    ("idempotency-key", &key),
                    ("content-type", "application/json"),
                ],
                format!("{{\"n\":{i}}}"),
            )
            .await
            .expect("answer");
        if resp.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(resp.headers["retry-after"], "1");
        }
        if resp.status == StatusCode::INTERNAL_SERVER_ERROR {
            assert_eq!(resp.body, Bytes::from_static(b"boom"));
        }
        got.push(resp.status.as_u16());
    }
    assert_eq!(got, [503, 429, 500, 200, 200]);
    assert_eq!(sink.script_left(), 0);
    assert_eq!(sink.ids(), ["msg-0", "msg-1", "msg-2", "msg-3", "msg-4"]);
    assert_eq!(sink.received()[2].json(), json!({"n": 2}));

    // Changed at run time: a new default, then a script ahead of it.
    sink.set_status(503);
    sink.push_script([201]);
    let mut later = Vec::new();
    for _ in 0..2 {
        later.push(
            client
                .get(&sink.url(), &[])
                .await
                .expect("answer")
                .status
                .as_u16(),
        );
    }
    assert_eq!(later, [201, 503]);
    assert_eq!(sink.count(), 7);
    sink.clear();
    assert_eq!(sink.count(), 0);
}

#[tokio::test]
async fn a_slow_sink_records_the_request_before_it_answers() {
    let sink = Sink::builder()
        .delay(Duration::from_millis(400))
        .start()
        .await;
    let client = TestClient::new(Pki::new().client_config(None));
    let url = sink.url();
    let started = Instant::now();
    let call = tokio::spawn(async move { client.get(&url, &[]).await });
    // Seen on arrival, while the answer is still held back.
    eventually(WAIT, || sink.count() == 1).await;
    assert!(!call.is_finished(), "the answer waits for the delay");
    let resp = call.await.expect("task").expect("answer");
    assert_eq!(resp.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test]
async fn sinks_speak_http2_and_http1() {
    let pki = Pki::new();
    let both = Sink::builder().tls(&pki).start().await;
    let h2 = TestClient::with_versions(pki.client_config(None), Versions::Http2);
    let resp = h2.get(&both.url(), &[]).await.expect("h2 over TLS");
    assert_eq!(resp.version, Version::HTTP_2);
    let any = TestClient::new(pki.client_config(None));
    assert_eq!(
        any.get(&both.url(), &[]).await.expect("ALPN").version,
        Version::HTTP_2,
        "ALPN prefers h2"
    );
    let h1 = TestClient::with_versions(pki.client_config(None), Versions::Http1);
    assert_eq!(
        h1.get(&both.url(), &[]).await.expect("http/1.1").version,
        Version::HTTP_11
    );
    let versions: Vec<Version> = both.received().iter().map(|r| r.version).collect();
    assert_eq!(
        versions,
        [Version::HTTP_2, Version::HTTP_2, Version::HTTP_11]
    );

    let http1_only = Sink::builder().tls(&pki).http2(false).start().await;
    assert_eq!(
        any.get(&http1_only.url(), &[])
            .await
            .expect("falls back")
            .version,
        Version::HTTP_11
    );
    assert!(
        h2.get(&http1_only.url(), &[]).await.is_err(),
        "an h2-only client finds no common protocol"
    );

    // Plain text: h2 with prior knowledge.
    let plain = Sink::start().await;
    assert!(plain.url().starts_with("http://127.0.0.1:"));
    let resp = h2.get(&plain.url(), &[]).await.expect("h2c");
    assert_eq!(resp.version, Version::HTTP_2);
    assert_eq!(plain.received()[0].version, Version::HTTP_2);
}

#[tokio::test]
async fn oauth_server_issues_tokens_for_good_credentials_and_refuses_bad_ones() {
    let pki = Pki::new();
    let oauth = OAuthServer::builder()
        .client("outbox", "oauth-secret")
        .expires_in(1800)
        .tls(&pki)
        .start()
        .await;
    assert!(oauth.token_url().starts_with("https://localhost:"));
    let client = TestClient::new(pki.client_config(None));
    let url = oauth.token_url();

    let by_header = client
        .post_form(
            &url,
            &[("authorization", &basic("outbox", "oauth-secret"))],
            "grant_type=client_credentials&scope=useraccount",
        )
        .await
        .expect("answer");
    assert_eq!(by_header.status, StatusCode::OK, "{:?}", by_header.body);
    let first = by_header.json();
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["expires_in"], 1800);
    assert_eq!(first["scope"], "useraccount");

    let by_form = client
        .post_form(
            &url,
            &[],
            "grant_type=client_credentials&client_id=outbox&client_secret=oauth-secret",
        )
        .await
        .expect("answer");
    assert_eq!(by_form.status, StatusCode::OK);
    let second = by_form.json();
    let (t1, t2) = (
        first["access_token"].as_str().expect("token"),
        second["access_token"].as_str().expect("token"),
    );
    assert_ne!(t1, t2, "every token is fresh");

    let bad = client
        .post_form(
            &url,
            &[],
            "grant_type=client_credentials&client_id=outbox&client_secret=wrong",
        )
        .await
        .expect("answer");
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED);
    assert_eq!(bad.json()["error"], "invalid_client");
    let unknown = client
        .post_form(
            &url,
            &[("authorization", &basic("someone", "oauth-secret"))],
            "grant_type=client_credentials",
        )
        .await
        .expect("answer");
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    let grant = client
        .post_form(
            &url,
            &[("authorization", &basic("outbox", "oauth-secret"))],
            "grant_type=password",
        )
        .await
        .expect("answer");
    assert_eq!(grant.status, StatusCode::BAD_REQUEST);
    assert_eq!(grant.json()["error"], "unsupported_grant_type");

    assert_eq!(oauth.issued(), 2);
    assert_eq!(oauth.refused(), 2);
    let mut valid = oauth.valid_tokens();
    valid.sort();
    let mut expected = vec![t1.to_string(), t2.to_string()];
    expected.sort();
    assert_eq!(valid, expected);
    let requests = oauth.requests();
    assert_eq!(requests.len(), 5);
    assert!(requests[0].basic && !requests[1].basic);
    assert_eq!(requests[1].client_id.as_deref(), Some("outbox"));
}

#[tokio::test]
async fn a_sink_accepts_only_tokens_the_oauth_server_holds_valid() {
    let oauth = OAuthServer::builder().expires_in(1).start().await;
    let sink = Sink::builder().bearer_from(&oauth).start().await;
    let client = TestClient::new(Pki::new().client_config(None));
    let fetch = async || {
        let resp = client
            .post_form(
                &oauth.token_url(),
                &[(
                    "authorization",
                    &basic(oauth.client_id(), oauth.client_secret()),
                )],
                "grant_type=client_credentials",
            )
            .await
            .expect("token answer");
        assert_eq!(resp.status, StatusCode::OK);
        format!(
            "Bearer {}",
            resp.json()["access_token"].as_str().expect("token")
        )
    };
    let deliver = async |auth: &str| {
        client
            .get(&sink.url(), &[("authorization", auth)])
            .await
            .expect("answer")
            .status
            .as_u16()
    };

    let token = fetch().await;
    assert_eq!(deliver(&token).await, 200);
    assert_eq!(deliver("Bearer made-up").await, 401);
    // Tokens expire after expires_in.
    eventually(WAIT, || oauth.valid_tokens().is_empty()).await;
    assert_eq!(deliver(&token).await, 401);

    oauth.set_expires_in(3600);
    let token = fetch().await;
    assert_eq!(deliver(&token).await, 200);
    oauth.revoke_all();
    assert_eq!(deliver(&token).await, 401, "revoked tokens are refused");
    let token = fetch().await;
    assert_eq!(deliver(&token).await, 200, "a refreshed token is accepted");
    assert_eq!(oauth.issued(), 3);
    let statuses: Vec<u16> = sink.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 401, 401, 200, 401, 200]);
}

#[tokio::test]
async fn short_lived_server_certificates_are_served() {
    let pki = Pki::with_server_days(10);
    let left = pki
        .server()
        .not_after
        .duration_since(std::time::SystemTime::now())
        .expect("in the future");
    assert!(left > DAY * 9 && left <= DAY * 10, "{left:?}");
    let sink = Sink::builder().tls(&pki).start().await;

    // What the sink presents is that certificate.
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(pki.client_config(None)));
    let tcp = tokio::net::TcpStream::connect(sink.addr())
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = connector.connect(name, tcp).await.expect("handshake");
    let presented = tls.get_ref().1.peer_certificates().expect("certificates");
    assert_eq!(presented[0], pki.server().cert_der);
}

#[test]
fn pki_files_are_written_for_protocol_profiles() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new();
    let files = pki.write_to(dir.path());
    let read = |p: &std::path::Path| std::fs::read_to_string(p).expect("written");
    assert_eq!(read(&files.ca), pki.ca_pem());
    assert_eq!(read(&files.client_cert), pki.client().cert_pem);
    assert!(read(&files.client_key).contains("BEGIN PRIVATE KEY"));
    assert!(read(&files.server_cert).contains("BEGIN CERTIFICATE"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&files.client_key)
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "keys are private");
    let extra = pki.issue_client("second-client", DAY);
    let (cert, key) = extra.write_to(dir.path(), "second");
    assert!(cert.ends_with("second.crt") && key.ends_with("second.key"));
    assert_ne!(extra.cert_der, pki.client().cert_der);
}

#[test]
fn the_daemon_config_merges_extra_toml() {
    let d = Daemon::builder()
        .instance_name("acme-dev")
        .config_toml(
            "retention = \"1d\"\n[log]\nlevel = \"trace\"\n[mid_servers.dc1]\ntoken = \"t\"",
        )
        .config_toml("shutdown_grace = \"2s\"")
        .apply_file("/tmp/integrations/*.toml")
        .prepare();
    let config: toml::Table = d.config_text().parse().expect("the config is TOML");
    assert_eq!(config["instance_name"].as_str(), Some("acme-dev"));
    assert_eq!(config["retention"].as_str(), Some("1d"));
    assert_eq!(config["shutdown_grace"].as_str(), Some("2s"));
    assert_eq!(
        config["data_dir"].as_str(),
        d.data_dir().to_str(),
        "data dir inside the temporary dir"
    );
    assert_eq!(config["log"]["level"].as_str(), Some("trace"));
    assert_eq!(config["log"]["format"].as_str(), Some("text"));
    assert_eq!(
        config["api"]["listen"].as_str(),
        Some(format!("127.0.0.1:{}", d.port()).as_str())
    );
    assert_eq!(config["api"]["token"].as_str(), Some(d.token()));
    assert_eq!(config["mid_servers"]["dc1"]["token"].as_str(), Some("t"));
    assert_eq!(
        config["apply"].as_array().map(Vec::len),
        Some(1),
        "{config:?}"
    );

    let broken = Daemon::builder()
        .config_toml("this is = = not toml")
        .prepare();
    assert!(broken.config_text().ends_with("this is = = not toml\n"));
}

#[tokio::test]
async fn daemon_starts_and_answers_health() {
    let d = Daemon::builder().instance_name("acme-dev").start().await;
    let (status, _) = d.request(Method::GET, "/healthz", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = d
        .request(Method::GET, "/v1/integrations", Some("wrong-token"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = d.request(Method::GET, "/v1/integrations", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = d.get("/v1/integrations").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn daemon_restarts_on_its_data_dir_and_port_and_stops_on_sigterm() {
    let mut d = Daemon::builder().start().await;
    let integration = r#"
[[integration]]
name = "harness"

  [[integration.message]]
  name = "Ping"
  method = "POST"
  path = "/ping"

  [[integration.connection]]
  name = "dev"
  environment = "development"
  endpoint_url = "http://127.0.0.1:9"
"#;
    let (status, body) = d.apply(integration).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let out = d.cli(&["--json", "integrations"]).await;
    assert!(
        out.status.success(),
        "outbox integrations: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("harness"));

    let url = d.api_url();
    d.kill9();
    assert!(!d.is_running());
    d.restart().await;
    assert_eq!(d.api_url(), url, "same port after a restart");
    let (status, body) = d.get("/v1/integrations/harness").await;
    assert_eq!(status, StatusCode::OK, "kept in the data dir: {body}");

    let exit = d.terminate().await;
    assert!(exit.success(), "SIGTERM exits 0: {exit}");
    assert!(
        d.log().contains("=== outbox_tests: start #2 ==="),
        "the log spans restarts"
    );
}

#[tokio::test]
async fn refused_configs_report_the_key() {
    let (status, stderr) = Daemon::builder().config_toml("no_such_key = 1").run_check();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no_such_key"), "{stderr}");
    let (status, stderr) = Daemon::builder()
        .config_toml("[api]\nlisten = \"not an address\"")
        .start_expecting_failure()
        .await;
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("listen"), "{stderr}");
}
