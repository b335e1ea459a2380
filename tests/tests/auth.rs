//! Authentication end to end: mutual TLS through protocol profiles, basic
//! auth and OAuth 2.0 client credentials, each against real local servers (an
//! HTTPS sink that checks client certificates and credentials, a token
//! endpoint that issues, expires and revokes tokens), the connection test's
//! report on the server certificate, and secrets kept out of attempts and
//! the log.
//!
//! The PKI, the sink and the token endpoint are the harness library's
//! ([`Pki`], [`Sink`], [`OAuthServer`]); the daemon side is `common`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use http::StatusCode;
use outbox_tests::pki::DAY;
use outbox_tests::{OAuthServer, Pki, PkiFiles, Sink};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// The sink's URL by IP address, `https://127.0.0.1:PORT`, so that the IP
/// address in the server certificate is what the daemon checks there (the
/// token endpoint's URL names `localhost`, which covers the DNS name).
fn sink_url(sink: &Sink) -> String {
    format!("https://{}", sink.addr())
}

/// The status the sink answered to each request, in order.
fn statuses(sink: &Sink) -> Vec<u16> {
    sink.received().iter().map(|r| r.status).collect()
}

/// Every token the endpoint issued, oldest first.
fn tokens_of(tokens: &OAuthServer) -> Vec<String> {
    tokens
        .issued_tokens()
        .into_iter()
        .map(|t| t.token)
        .collect()
}

/// A fresh test CA with its server certificate valid for `server_valid_for`,
/// its PEM files written into `dir`.
fn pki_in(dir: &Path, server_valid_for: Duration) -> (Pki, PkiFiles) {
    let pki = Pki::with_server_validity(server_valid_for);
    let files = pki.write_to(dir);
    (pki, files)
}

/// A client certificate and key from a CA no sink trusts, written as
/// `rogue.crt` and `rogue.key` into `dir`.
///
/// Kept here rather than taken from another [`Pki`]: every `Pki` names its
/// CA "Outbox test CA", so the sink would find its own CA by that name and
/// fail the rogue certificate on its signature (`BadSignature`), where the
/// test checks that an unknown issuer is refused as one (`UnknownIssuer`).
fn rogue_client(dir: &Path) -> (PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.distinguished_name
        .push(DnType::CommonName, "e2e unknown CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name
        .push(DnType::CommonName, "outbox-client");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &ca, &ca_key).expect("signed certificate");
    (
        write(dir, "rogue.crt", &cert.pem()),
        write(dir, "rogue.key", &key.serialize_pem()),
    )
}

/// A path as a TOML string.
fn q(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

fn protocol_profile(name: &str, identity: Option<(&Path, &Path)>, ca: Option<&Path>) -> String {
    let mut t = format!("\n[[protocol_profile]]\nname = \"{name}\"\n");
    if let Some((cert, key)) = identity {
        t.push_str(&format!(
            "client_cert = {}\nclient_key = {}\n",
            q(cert),
            q(key)
        ));
    }
    if let Some(ca) = ca {
        t.push_str(&format!("ca = {}\n", q(ca)));
    }
    t
}

/// An OAuth profile; `secret` is TOML (a string, `{ env = .. }`, `{ file = .. }`).
fn oauth_profile(name: &str, tokens: &OAuthServer, secret: &str, ca: Option<&Path>) -> String {
    let mut t = format!(
        "\n[[oauth_profile]]\nname = \"{name}\"\ntoken_url = \"{}\"\nclient_id = \"outbox\"\nclient_secret = {secret}\nscope = \"useraccount\"\n",
        tokens.token_url()
    );
    if let Some(ca) = ca {
        t.push_str(&format!("ca = {}\n", q(ca)));
    }
    t
}

async fn apply(d: &Daemon, doc: &str) {
    let (s, v) = d.apply(doc).await;
    assert_eq!(s, StatusCode::OK, "{v}\n{doc}");
}

async fn activate(d: &Daemon, connection: &str) {
    let (s, v) = d
        .post_json(
            &format!("/v1/integrations/acme/connections/{connection}/activate"),
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

async fn send(d: &Daemon, n: usize) -> String {
    let (s, v) = d
        .post_json(
            "/v1/integrations/acme/messages",
            json!({"message": "Create", "body": {"n": n}}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    v["id"].as_str().expect("id").to_string()
}

fn attempts(m: &Value) -> &Vec<Value> {
    m["attempts"].as_array().expect("attempts")
}

/// Each attempt's error, lowercased; an attempt without one fails the test.
fn errors(m: &Value) -> Vec<String> {
    attempts(m)
        .iter()
        .map(|a| {
            a["error"]
                .as_str()
                .unwrap_or_else(|| panic!("attempt without an error: {a}"))
                .to_lowercase()
        })
        .collect()
}

#[tokio::test]
async fn mutual_tls_delivers_with_the_profiles_client_certificate() {
    let d = Daemon::builder().start().await;
    let (pki, files) = pki_in(d.dir(), 365 * DAY);
    let sink = Sink::builder()
        .tls(&pki)
        .require_client_cert(pki.ca_pem())
        .start()
        .await;
    let doc = integration(
        "acme",
        &[&connection(
            "mtls",
            "production",
            &sink_url(&sink),
            "active = true\n  protocol_profile = \"mtls\"",
        )],
    ) + &protocol_profile(
        "mtls",
        Some((&files.client_cert, &files.client_key)),
        Some(&files.ca),
    );
    apply(&d, &doc).await;

    let id = send(&d, 1).await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(attempts(&m).len(), 1, "{m}");
    let a = &attempts(&m)[0];
    assert_eq!(a["status"], 200, "{m}");
    assert_eq!(a["connection"], "mtls");
    assert_eq!(a["environment"], "production");
    let seen = sink.received();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, format!("/api/incident/{id}"));
    assert_eq!(seen[0].headers["idempotency-key"], id.as_str());
    assert_eq!(
        seen[0].client_cert.as_deref(),
        Some(&pki.client().cert_der[..]),
        "the sink was shown the profile's client certificate"
    );
    // The daemon offers h2 and the sink prefers it: the h2 path end to end
    // (the basic-auth test covers HTTP/1.1).
    assert_eq!(seen[0].version, http::Version::HTTP_2);
    assert!(
        sink.rejected_handshakes().is_empty(),
        "{:?}",
        sink.rejected_handshakes()
    );
}

/// Against a sink that requires a client certificate from the test CA, a
/// connection with no client certificate, then one with a certificate from
/// an unknown CA ([`rogue_client`]): the handshake fails, which is a
/// connection-level error, retried until `max_attempts`; every attempt says
/// it was TLS that failed, and no request reaches the sink.
async fn refused_client_certificates_fail_naming_tls(http1_only: bool) {
    let d = Daemon::builder().start().await;
    let (pki, files) = pki_in(d.dir(), 365 * DAY);
    let (rogue_cert, rogue_key) = rogue_client(d.dir());
    let builder = Sink::builder().tls(&pki).require_client_cert(pki.ca_pem());
    let sink = if http1_only {
        builder.http2(false)
    } else {
        builder
    }
    .start()
    .await;
    let doc = integration(
        "acme",
        &[
            &connection(
                "no-cert",
                "test",
                &sink_url(&sink),
                "active = true\n  protocol_profile = \"ca-only\"",
            ),
            &connection(
                "unknown-cert",
                "sandbox",
                &sink_url(&sink),
                "protocol_profile = \"rogue\"",
            ),
        ],
    ) + &protocol_profile("ca-only", None, Some(&files.ca))
        + &protocol_profile("rogue", Some((&rogue_cert, &rogue_key)), Some(&files.ca));
    apply(&d, &doc).await;

    for (conn, n, server_says) in [
        ("no-cert", 1, "no certificates"),
        ("unknown-cert", 2, "unknownissuer"),
    ] {
        activate(&d, conn).await;
        let rejected_before = sink.rejected_handshakes().len();
        let id = send(&d, n).await;
        let m = d.wait_for_state(&id, "error", WAIT).await;
        assert_eq!(attempts(&m).len(), 5, "retried up to max_attempts: {m}");
        assert_eq!(sink.count(), 0, "{conn}: nothing was delivered");
        // The sink did see the daemon's handshakes, and refused them for
        // the client certificate.
        let rejected = sink.rejected_handshakes();
        assert!(rejected.len() > rejected_before, "{conn}: {rejected:?}");
        let why = rejected.last().unwrap().to_lowercase();
        assert!(why.contains(server_says), "{conn}: the sink says {why}");
        for (a, e) in attempts(&m).iter().zip(errors(&m)) {
            assert_eq!(a["connection"], conn);
            assert!(a["status"].is_null(), "{a}");
            // rustls words it "received fatal alert: CertificateRequired"
            // or "... UnknownCA"; "connection closed" alone does not tell
            // an operator what to fix.
            assert!(
                e.contains("certificate") || e.contains("tls") || e.contains("alert"),
                "{conn}: attempt {} does not say the TLS handshake failed: {e}\nall attempts: {:#?}",
                a["n"],
                errors(&m)
            );
        }
    }
}

#[tokio::test]
async fn refused_client_certificates_fail_naming_tls_over_http1() {
    refused_client_certificates_fail_naming_tls(true).await;
}

#[tokio::test]
async fn refused_client_certificates_fail_naming_tls_over_h2() {
    refused_client_certificates_fail_naming_tls(false).await;
}

#[tokio::test]
async fn without_the_ca_the_daemon_refuses_the_sinks_certificate() {
    let d = Daemon::builder().start().await;
    let (pki, files) = pki_in(d.dir(), 365 * DAY);
    let sink = Sink::builder()
        .tls(&pki)
        .require_client_cert(pki.ca_pem())
        .start()
        .await;
    let doc = integration(
        "acme",
        &[
            &connection(
                "cert-no-ca",
                "production",
                &sink_url(&sink),
                "active = true\n  protocol_profile = \"cert-only\"",
            ),
            &connection("no-profile", "test", &sink_url(&sink), ""),
        ],
    ) + &protocol_profile(
        "cert-only",
        Some((&files.client_cert, &files.client_key)),
        None,
    );
    apply(&d, &doc).await;
    for (conn, n) in [("cert-no-ca", 1), ("no-profile", 2)] {
        activate(&d, conn).await;
        let id = send(&d, n).await;
        let m = d.wait_for_state(&id, "error", WAIT).await;
        assert_eq!(attempts(&m).len(), 5, "{m}");
        for e in errors(&m) {
            assert!(
                e.contains("certificate") && (e.contains("issuer") || e.contains("unknown")),
                "{conn}: the error names the untrusted certificate: {e}"
            );
        }
        assert_eq!(sink.count(), 0, "{conn}");
    }
    // The daemon did reach the sink, and turned its certificate down.
    assert!(!sink.rejected_handshakes().is_empty());
}

#[tokio::test]
async fn basic_auth_over_tls_right_password_delivers_wrong_one_ends_in_error() {
    let d = Daemon::builder().start().await;
    let (pki, files) = pki_in(d.dir(), 365 * DAY);
    let sink = Sink::builder()
        .tls(&pki)
        .http2(false)
        .basic("svc-outbox", "Right:pw/1")
        .start()
        .await;
    let doc = integration(
        "acme",
        &[
            &connection(
                "right",
                "production",
                &sink_url(&sink),
                "active = true\n  protocol_profile = \"tls\"\n  auth = { type = \"basic\", username = \"svc-outbox\", password = \"Right:pw/1\" }",
            ),
            &connection(
                "wrong",
                "test",
                &sink_url(&sink),
                "protocol_profile = \"tls\"\n  auth = { type = \"basic\", username = \"svc-outbox\", password = \"wrong-pw\" }",
            ),
        ],
    ) + &protocol_profile("tls", None, Some(&files.ca));
    apply(&d, &doc).await;

    let id = send(&d, 1).await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(attempts(&m).len(), 1, "{m}");
    assert_eq!(m["attempts"][0]["status"], 200);
    assert_eq!(
        m["attempts"][0]["request_headers"]["authorization"],
        "Basic ***"
    );
    let seen = sink.received();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].status, 200);
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert!(seen[0].client_cert.is_none());

    activate(&d, "wrong").await;
    let id = send(&d, 2).await;
    let m = d.wait_for_state(&id, "error", WAIT).await;
    assert_eq!(attempts(&m).len(), 1, "401 is final by default: {m}");
    assert_eq!(m["attempts"][0]["status"], 401);
    assert_eq!(m["attempts"][0]["connection"], "wrong");
    assert_eq!(statuses(&sink), [200, 401]);
}

/// A daemon with integration `acme` whose only connection goes to `sink`
/// (trusting the CA certificate at `ca`) with OAuth profile `oauth` against
/// `tokens`; `secret` is the profile's `client_secret` as TOML.
async fn oauth_setup(
    sink: &Sink,
    ca: &Path,
    tokens: &OAuthServer,
    secret: &str,
    concurrency: u32,
) -> Daemon {
    let d = Daemon::builder().start().await;
    let doc = integration(
        "acme",
        &[&connection(
            "prod",
            "production",
            &sink_url(sink),
            "active = true\n  protocol_profile = \"tls\"\n  auth = { type = \"oauth\", profile = \"oauth\" }",
        )],
    )
    .replace(
        "concurrency = 4\n",
        &format!("concurrency = {concurrency}\n"),
    ) + &protocol_profile("tls", None, Some(ca))
        + &oauth_profile("oauth", tokens, secret, Some(ca));
    apply(&d, &doc).await;
    d
}

/// A client secret that only survives the trip when the daemon form-encodes
/// it before the Basic header, as RFC 6749 §2.3.1 asks.
const CLIENT_SECRET: &str = "s3cret+/%:=x";

#[tokio::test]
async fn oauth_one_token_serves_many_concurrent_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, files) = pki_in(dir.path(), 365 * DAY);
    // A slow token endpoint: every worker needs a token while the first
    // request is still out.
    let tokens = OAuthServer::builder()
        .client("outbox", CLIENT_SECRET)
        .tls(&pki)
        .delay(Duration::from_millis(300))
        .start()
        .await;
    let sink = Sink::builder().tls(&pki).bearer_from(&tokens).start().await;
    let d = oauth_setup(&sink, &files.ca, &tokens, &format!("{CLIENT_SECRET:?}"), 16).await;
    // Queue 50 while paused, so that 16 go at once on resume.
    let (s, v) = d.post_json("/v1/integrations/acme/pause", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let mut ids = Vec::new();
    for n in 0..50 {
        ids.push(send(&d, n).await);
    }
    let (s, v) = d.post_json("/v1/integrations/acme/resume", json!({})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    eventually_msg(WAIT, "50 messages sent", async || {
        let (_, v) = d
            .get("/v1/messages?integration=acme&state=sent&limit=100")
            .await;
        (v.as_array()?.len() == 50).then_some(())
    })
    .await;

    let issued = tokens_of(&tokens);
    assert_eq!(issued.len(), 1, "one token for all: {issued:?}");
    let requests = tokens.requests();
    assert_eq!(requests.len(), 1, "one token request: {requests:?}");
    assert_eq!(requests[0].form["grant_type"], "client_credentials");
    assert_eq!(requests[0].form["scope"], "useraccount");
    assert!(requests[0].basic, "client credentials in the Basic header");
    let seen = sink.received();
    assert_eq!(seen.len(), 50);
    assert!(
        seen.iter().all(|s| s.status == 200),
        "{:?}",
        statuses(&sink)
    );
    assert!(seen.iter().all(|s| s.bearer() == Some(issued[0].as_str())));
    let keys: std::collections::HashSet<_> = seen
        .iter()
        .map(|s| s.headers["idempotency-key"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 50);
    for id in &ids {
        let m = d.message(id).await;
        assert_eq!(attempts(&m).len(), 1, "{m}");
        assert_eq!(
            m["attempts"][0]["request_headers"]["authorization"],
            "Bearer ***"
        );
    }
}

#[tokio::test]
async fn oauth_a_revoked_token_gets_one_401_and_a_fresh_token_in_the_same_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, files) = pki_in(dir.path(), 365 * DAY);
    let tokens = OAuthServer::builder()
        .client("outbox", CLIENT_SECRET)
        .tls(&pki)
        .start()
        .await;
    let sink = Sink::builder().tls(&pki).bearer_from(&tokens).start().await;
    let d = oauth_setup(&sink, &files.ca, &tokens, &format!("{CLIENT_SECRET:?}"), 4).await;

    let id = send(&d, 1).await;
    d.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(tokens_of(&tokens).len(), 1);

    tokens.revoke_all();
    let id = send(&d, 2).await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(attempts(&m).len(), 1, "one attempt: {m}");
    let a = &m["attempts"][0];
    assert_eq!(a["status"], 200, "{a}");
    assert!(
        a["error"].as_str().is_some_and(|n| n.contains("401")),
        "the attempt notes the 401 and the new token: {a}"
    );
    let issued = tokens_of(&tokens);
    assert_eq!(issued.len(), 2, "one new token: {issued:?}");
    let seen = sink.received();
    assert_eq!(statuses(&sink), [200, 401, 200]);
    assert_eq!(seen[1].bearer(), Some(issued[0].as_str()), "the old token");
    assert_eq!(seen[2].bearer(), Some(issued[1].as_str()), "the new token");
    assert_eq!(
        seen[1].headers["idempotency-key"],
        seen[2].headers["idempotency-key"]
    );

    // The new token is cached in turn.
    let id = send(&d, 3).await;
    d.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(tokens_of(&tokens).len(), 2);
    assert_eq!(statuses(&sink), [200, 401, 200, 200]);
}

#[tokio::test]
async fn oauth_a_short_lived_token_is_refreshed_before_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, files) = pki_in(dir.path(), 365 * DAY);
    // 3 s rather than 2: refreshing at 80% leaves 600 ms between the
    // daemon's last use of a token and its expiry at the sink, room for a
    // loaded 2-core machine.
    let tokens = OAuthServer::builder()
        .client("outbox", CLIENT_SECRET)
        .tls(&pki)
        .expires_in(3)
        .start()
        .await;
    let sink = Sink::builder().tls(&pki).bearer_from(&tokens).start().await;
    let d = oauth_setup(&sink, &files.ca, &tokens, &format!("{CLIENT_SECRET:?}"), 4).await;

    // Steady traffic, one message after the other, until the third token.
    let deadline = Instant::now() + WAIT;
    let mut ids = Vec::new();
    while tokens.issued() < 3 {
        assert!(
            Instant::now() < deadline,
            "no third token after {} messages",
            ids.len()
        );
        let id = send(&d, ids.len()).await;
        d.wait_for_state(&id, "sent", WAIT).await;
        ids.push(id);
    }
    assert!(
        statuses(&sink).iter().all(|s| *s == 200),
        "no token was used after it expired: {:?}",
        statuses(&sink)
    );
    let issued = tokens.issued_tokens();
    for pair in issued.windows(2) {
        assert!(
            pair[1].issued_at < pair[0].expires_at,
            "the next token was fetched before the previous one expired"
        );
    }
    for id in &ids {
        let m = d.message(id).await;
        assert_eq!(attempts(&m).len(), 1, "{m}");
        assert!(m["attempts"][0]["error"].is_null(), "{m}");
    }
}

#[tokio::test]
async fn oauth_a_wrong_client_secret_fails_with_the_token_endpoints_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, files) = pki_in(dir.path(), 365 * DAY);
    // Plain HTTP this time (the other OAuth tests use TLS).
    let tokens = OAuthServer::builder()
        .client("outbox", CLIENT_SECRET)
        .start()
        .await;
    let sink = Sink::builder().tls(&pki).bearer_from(&tokens).start().await;
    let d = oauth_setup(&sink, &files.ca, &tokens, "\"not-the-secret\"", 4).await;

    let id = send(&d, 1).await;
    let m = d.wait_for_state(&id, "error", WAIT).await;
    assert_eq!(
        attempts(&m).len(),
        5,
        "retried: the secret may be fixed: {m}"
    );
    for e in errors(&m) {
        assert!(
            e.contains("401") && e.contains("invalid_client"),
            "the error carries the token endpoint's answer: {e}"
        );
        assert!(e.contains(&tokens.token_url().to_lowercase()), "{e}");
    }
    assert!(m["attempts"][0]["status"].is_null());
    assert_eq!(sink.count(), 0, "nothing reached the remote system");
    assert!(tokens.refused() >= 1);
    assert!(tokens_of(&tokens).is_empty());
}

#[tokio::test]
async fn oauth_a_changed_profile_is_used_from_the_next_message() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, files) = pki_in(dir.path(), 365 * DAY);
    let old_idp = OAuthServer::builder()
        .client("outbox", CLIENT_SECRET)
        .tls(&pki)
        .start()
        .await;
    let new_idp = OAuthServer::builder()
        .client("outbox", "another-secret")
        .tls(&pki)
        .start()
        .await;
    let old_sink = Sink::builder()
        .tls(&pki)
        .bearer_from(&old_idp)
        .start()
        .await;
    let new_sink = Sink::builder()
        .tls(&pki)
        .bearer_from(&new_idp)
        .start()
        .await;
    let d = oauth_setup(
        &old_sink,
        &files.ca,
        &old_idp,
        &format!("{CLIENT_SECRET:?}"),
        4,
    )
    .await;
    let id = send(&d, 1).await;
    d.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(tokens_of(&old_idp).len(), 1);

    // The remote system moves, with its identity provider, under the same
    // profile name: an apply, as an operator would do it.
    let doc = integration(
        "acme",
        &[&connection(
            "prod",
            "production",
            &sink_url(&new_sink),
            "active = true\n  protocol_profile = \"tls\"\n  auth = { type = \"oauth\", profile = \"oauth\" }",
        )],
    ) + &protocol_profile("tls", None, Some(&files.ca))
        + &oauth_profile("oauth", &new_idp, "\"another-secret\"", Some(&files.ca));
    apply(&d, &doc).await;
    let id = send(&d, 2).await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(tokens_of(&new_idp).len(), 1, "{m}");
    let old_token = tokens_of(&old_idp)[0].clone();
    let seen = new_sink.received();
    assert!(
        seen.iter().all(|s| s.bearer() != Some(old_token.as_str())),
        "the token of the old profile went to the new remote system: {:?} ({m})",
        statuses(&new_sink)
    );
    assert_eq!(statuses(&new_sink), [200], "{m}");
}

#[tokio::test]
async fn mutual_tls_and_oauth_on_one_connection() {
    let d = Daemon::builder().start().await;
    let (pki, files) = pki_in(d.dir(), 365 * DAY);
    let tokens = OAuthServer::builder()
        .client("outbox", CLIENT_SECRET)
        .tls(&pki)
        .start()
        .await;
    let sink = Sink::builder()
        .tls(&pki)
        .require_client_cert(pki.ca_pem())
        .bearer_from(&tokens)
        .start()
        .await;
    let doc = integration(
        "acme",
        &[&connection(
            "prod",
            "production",
            &sink_url(&sink),
            "active = true\n  protocol_profile = \"mtls\"\n  auth = { type = \"oauth\", profile = \"oauth\" }",
        )],
    ) + &protocol_profile(
        "mtls",
        Some((&files.client_cert, &files.client_key)),
        Some(&files.ca),
    ) + &oauth_profile(
        "oauth",
        &tokens,
        &format!("{CLIENT_SECRET:?}"),
        Some(&files.ca),
    );
    apply(&d, &doc).await;
    let id = send(&d, 1).await;
    let m = d.wait_for_state(&id, "sent", WAIT).await;
    assert_eq!(attempts(&m).len(), 1, "{m}");
    assert_eq!(
        m["attempts"][0]["request_headers"]["authorization"],
        "Bearer ***"
    );
    let seen = sink.received();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].status, 200);
    assert_eq!(
        seen[0].client_cert.as_deref(),
        Some(&pki.client().cert_der[..])
    );
    assert_eq!(seen[0].bearer(), Some(tokens_of(&tokens)[0].as_str()));
    assert!(
        sink.rejected_handshakes().is_empty(),
        "{:?}",
        sink.rejected_handshakes()
    );
}

#[tokio::test]
async fn the_connection_test_reports_the_days_left_on_the_server_certificate() {
    let d = Daemon::builder().start().await;
    // Half a day over ten, so floor, round and ceiling all land on 10 or 11.
    let (pki, files) = pki_in(d.dir(), 10 * DAY + DAY / 2);
    let sink = Sink::builder()
        .tls(&pki)
        .require_client_cert(pki.ca_pem())
        .start()
        .await;
    let doc = integration(
        "acme",
        &[
            &connection(
                "mtls",
                "production",
                &sink_url(&sink),
                "active = true\n  protocol_profile = \"mtls\"",
            ),
            &connection("no-ca", "test", &sink_url(&sink), ""),
        ],
    ) + &protocol_profile(
        "mtls",
        Some((&files.client_cert, &files.client_key)),
        Some(&files.ca),
    );
    apply(&d, &doc).await;

    let (s, v) = d
        .post_json("/v1/integrations/acme/connections/mtls/test", json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    let tried = v["attempts"].as_array().unwrap();
    assert_eq!(tried.len(), 1, "HEAD passed, so no GET: {v}");
    assert_eq!(tried[0]["method"], "HEAD");
    assert_eq!(tried[0]["status"], 200);
    assert_eq!(v["guard"]["ok"], true, "{v}");
    let days = v["tls_days_left"].as_i64().expect("tls_days_left");
    assert!((10..=11).contains(&days), "tls_days_left {days}: {v}");
    let seen = sink.received();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "HEAD");
    assert_eq!(
        seen[0].client_cert.as_deref(),
        Some(&pki.client().cert_der[..])
    );

    // An inactive connection that does not trust the CA: both requests
    // fail, and the certificate check says why instead of a day count.
    let (s, v) = d
        .post_json("/v1/integrations/acme/connections/no-ca/test", json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["ok"], false, "{v}");
    let tried = v["attempts"].as_array().unwrap();
    let methods: Vec<_> = tried.iter().map(|a| a["method"].clone()).collect();
    assert_eq!(methods, ["HEAD", "GET"], "{v}");
    for a in tried {
        assert!(a["status"].is_null(), "{a}");
        let e = a["error"].as_str().unwrap().to_lowercase();
        assert!(e.contains("certificate"), "{e}");
    }
    assert!(v["tls_days_left"].is_null(), "{v}");
    let why = v["tls_error"].as_str().expect("tls_error").to_lowercase();
    assert!(why.contains("certificate"), "{why}");
    assert_eq!(sink.count(), 1);
}

#[tokio::test]
async fn secrets_stay_out_of_attempts_and_the_log() {
    let basic_pw = "Basic-pw-7f3e";
    let wrong_secret = "wrong-secret-91ab";
    let d = Daemon::builder()
        .env("E2E_BASIC_PW", basic_pw)
        // Everything, dependencies included, at debug.
        .config_toml("[log]\nlevel = \"debug\"")
        .start()
        .await;
    let (pki, files) = pki_in(d.dir(), 365 * DAY);
    let secret_file = write(d.dir(), "oauth-secret", &format!("{CLIENT_SECRET}\n"));
    let tokens = OAuthServer::builder()
        .client("outbox", CLIENT_SECRET)
        .tls(&pki)
        .start()
        .await;
    let basic_sink = Sink::builder()
        .tls(&pki)
        .require_client_cert(pki.ca_pem())
        .basic("svc-outbox", basic_pw)
        .start()
        .await;
    let oauth_sink = Sink::builder().tls(&pki).bearer_from(&tokens).start().await;
    let doc = integration(
        "acme",
        &[
            &connection(
                "basic",
                "production",
                &sink_url(&basic_sink),
                "active = true\n  protocol_profile = \"mtls\"\n  auth = { type = \"basic\", username = \"svc-outbox\", password = { env = \"E2E_BASIC_PW\" } }",
            ),
            &connection(
                "basic-wrong",
                "pre-production",
                &sink_url(&basic_sink),
                "protocol_profile = \"mtls\"\n  auth = { type = \"basic\", username = \"svc-outbox\", password = \"wrong-pw-3c1d\" }",
            ),
            &connection(
                "oauth",
                "test",
                &sink_url(&oauth_sink),
                "protocol_profile = \"tls\"\n  auth = { type = \"oauth\", profile = \"oauth\" }",
            ),
            &connection(
                "oauth-wrong",
                "sandbox",
                &sink_url(&oauth_sink),
                "protocol_profile = \"tls\"\n  auth = { type = \"oauth\", profile = \"oauth-wrong\" }",
            ),
        ],
    ) + &protocol_profile(
        "mtls",
        Some((&files.client_cert, &files.client_key)),
        Some(&files.ca),
    ) + &protocol_profile("tls", None, Some(&files.ca))
        + &oauth_profile(
            "oauth",
            &tokens,
            &format!("{{ file = {} }}", q(&secret_file)),
            Some(&files.ca),
        )
        + &oauth_profile(
            "oauth-wrong",
            &tokens,
            &format!("{wrong_secret:?}"),
            Some(&files.ca),
        );
    apply(&d, &doc).await;

    let mut ids = Vec::new();
    let id = send(&d, 1).await;
    d.wait_for_state(&id, "sent", WAIT).await;
    ids.push(id);
    activate(&d, "basic-wrong").await;
    let id = send(&d, 2).await;
    d.wait_for_state(&id, "error", WAIT).await;
    ids.push(id);
    activate(&d, "oauth").await;
    let id = send(&d, 3).await;
    d.wait_for_state(&id, "sent", WAIT).await;
    ids.push(id);
    tokens.revoke_all();
    let id = send(&d, 4).await;
    d.wait_for_state(&id, "sent", WAIT).await;
    ids.push(id);
    activate(&d, "oauth-wrong").await;
    let id = send(&d, 5).await;
    d.wait_for_state(&id, "error", WAIT).await;
    ids.push(id);
    assert_eq!(statuses(&basic_sink), [200, 401]);
    assert_eq!(statuses(&oauth_sink), [200, 401, 200]);

    let mut outputs = Vec::new();
    for id in &ids {
        let m = d.message(id).await;
        for a in attempts(&m) {
            if let Some(auth) = a["request_headers"]["authorization"].as_str() {
                assert!(auth == "Basic ***" || auth == "Bearer ***", "{a}");
            }
        }
        outputs.push((format!("GET /v1/messages/{id}"), m.to_string()));
    }
    for path in [
        "/v1/messages?integration=acme&limit=100",
        "/v1/integrations/acme",
        "/v1/export",
        "/v1/status",
    ] {
        outputs.push((format!("GET {path}"), d.get(path).await.1.to_string()));
    }
    for conn in ["basic", "oauth"] {
        let (_, v) = d
            .post_json(
                &format!("/v1/integrations/acme/connections/{conn}/test"),
                json!({}),
            )
            .await;
        outputs.push((format!("test {conn}"), v.to_string()));
    }
    let log = d.log();
    assert!(
        log.contains("invalid_client") || log.lines().count() > 10,
        "the log has something to check"
    );
    outputs.push(("the daemon log".into(), log));

    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let key_body = pki
        .client()
        .key_pem
        .lines()
        .find(|l| !l.starts_with("-----"))
        .expect("key body")
        .to_string();
    let mut secrets = vec![
        basic_pw.to_string(),
        b64(&format!("svc-outbox:{basic_pw}")),
        "wrong-pw-3c1d".to_string(),
        b64("svc-outbox:wrong-pw-3c1d"),
        CLIENT_SECRET.to_string(),
        "s3cret%2B%2F%25%3A%3Dx".to_string(),
        wrong_secret.to_string(),
        key_body,
    ];
    let issued = tokens_of(&tokens);
    assert!(issued.len() >= 2, "{issued:?}");
    secrets.extend(issued);
    for (what, text) in &outputs {
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "{what} shows {secret:?}");
        }
    }
}
