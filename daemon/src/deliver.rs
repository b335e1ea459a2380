//! One delivery attempt's rules: the instance guard, the request built from
//! the active connection, authentication, and what the answer means.
//!
//! Everything here that decides (guard, templates, outcome classes, backoff,
//! `Retry-After`) is a pure function with unit tests; [`attempt`] strings them
//! together around one HTTP request.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::Full;
use rand::Rng;

use crate::client::{send, Clients, HttpClient, Reply, SendError, TlsSettings, EXCERPT_BYTES};
use crate::headers::Headers;
use crate::model::{Auth, Backoff, Connection, FinalState, Integration, MessageType};
use crate::oauth::TokenCache;
use crate::queue::{format_id, Attempt, MessageRecord};
use crate::template::{self, Ref};

/// The instance-name guard (SPEC §3.4): a connection whose `instance_name`
/// is set and differs from the daemon's gets no request. The error is the
/// reason alone; each user says what follows from it.
pub fn guard(daemon_instance: &str, connection: &Connection) -> Result<(), String> {
    let wanted = connection.instance_name.trim();
    if wanted.is_empty() || wanted == daemon_instance {
        Ok(())
    } else {
        Err(format!(
            "instance guard: connection is for {wanted:?} but this daemon is {daemon_instance:?}"
        ))
    }
}

/// A request ready to go, before authentication.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub method: Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Headers that frame the message or the connection: the HTTP client sets
/// them from the body and the connection, and one given with a message
/// would contradict them (a `Content-Length` that is not the body's makes
/// every attempt wait out its timeout).
const FRAMING: [&str; 8] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
];

/// A header given with a message or a message type, parsed, or why it
/// cannot be sent: a bad name, a header that frames the request, or a
/// control character in the value. Applying a message type and enqueueing a
/// message check with it too.
pub fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        format!("{name:?} is not a header name (letters, digits and !#$%&'*+-.^_`|~ only)")
    })?;
    // Names parse lower-case.
    if FRAMING.contains(&parsed.as_str()) {
        return Err("set by the daemon from the body and the connection, not by a message".into());
    }
    let value = HeaderValue::from_str(value).map_err(|_| {
        format!("{value:?} holds a control character (a tab is the only one allowed)")
    })?;
    Ok((parsed, value))
}

/// Builds the request of `rec` from the active connection and message type:
/// `endpoint_url` joined with the expanded path, the type's headers, the
/// producer's headers, and `Idempotency-Key: <message id>`; the body is
/// the record's.
pub fn build(
    connection: &Connection,
    message_type: &MessageType,
    rec: &MessageRecord,
) -> Result<Prepared, String> {
    let id = format_id(rec.seq);
    let lookup = |r: &Ref<'_>| -> Option<Cow<'_, str>> {
        match r.namespace {
            "variables" => connection
                .variables
                .get(r.key)
                .map(|v| Cow::Borrowed(v.as_str())),
            "params" => rec.params.get(r.key).map(|v| Cow::Borrowed(v.as_str())),
            "message" => Some(Cow::Borrowed(id.as_str())),
            "connection" if r.key == "name" => Some(Cow::Borrowed(connection.name.as_str())),
            "connection" => Some(Cow::Owned(connection.environment.to_string())),
            _ => None,
        }
    };
    let path = template::expand(&message_type.path, true, lookup)
        .map_err(|e| format!("message type {} path: {e}", message_type.name))?;
    let url = join_url(&connection.endpoint_url, &path);
    let method = Method::from_bytes(message_type.method.as_bytes())
        .map_err(|_| format!("{:?} is not an HTTP method", message_type.method))?;
    let mut headers = HeaderMap::new();
    let producer = rec.headers.iter().map(|(k, v)| (k, v.clone()));
    let typed = message_type
        .headers
        .iter()
        .map(|(k, v)| {
            template::expand(v, false, lookup)
                .map(|v| (k, v))
                .map_err(|e| format!("message type {} header {k}: {e}", message_type.name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (k, v) in typed.into_iter().chain(producer) {
        let (name, value) = header(k, &v).map_err(|e| format!("header {k}: {e}"))?;
        headers.insert(name, value);
    }
    headers.insert(
        HeaderName::from_static("idempotency-key"),
        HeaderValue::from_str(&id).map_err(|e| e.to_string())?,
    );
    Ok(Prepared {
        method,
        url,
        headers,
        body: rec.body.clone(),
    })
}

fn join_url(endpoint: &str, path: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if path.is_empty() {
        base.to_string()
    } else if path.starts_with('/') {
        format!("{base}{path}")
    } else {
        format!("{base}/{path}")
    }
}

/// What an attempt's result means for the message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sent,
    Retry(Duration),
    Final(FinalState),
    /// It would be retried, but `max_attempts` is reached: `error`, said
    /// so on the attempt.
    Exhausted,
}

/// The class of an HTTP status (SPEC §4): 1xx/2xx sent; 408, 425, 429 and
/// 5xx retried; everything else an error without retry.
fn default_class(status: u16) -> Outcome {
    match status {
        100..=299 => Outcome::Sent,
        408 | 425 | 429 | 500..=599 => Outcome::Retry(Duration::ZERO),
        _ => Outcome::Final(FinalState::Error),
    }
}

/// Decides what happens after attempt `n` (1-based): the status class or
/// its `response_action` override; a retry becomes `error` once
/// `max_attempts` is reached, and waits `Retry-After` (capped at the
/// backoff maximum) or the exponential backoff with jitter.
pub fn classify(
    integration: &Integration,
    n: u32,
    status: Option<u16>,
    retry_after: Option<Duration>,
    rng: &mut impl Rng,
) -> Outcome {
    let base = match status {
        None => Outcome::Retry(Duration::ZERO),
        Some(s) => match integration.response_action(s) {
            Some(a) if a.retry => Outcome::Retry(Duration::ZERO),
            Some(a) => match a.state {
                Some(state) => Outcome::Final(state),
                None if (100..300).contains(&s) => Outcome::Sent,
                None => Outcome::Final(FinalState::Error),
            },
            None => default_class(s),
        },
    };
    match base {
        Outcome::Final(FinalState::Sent) => Outcome::Sent,
        Outcome::Retry(_) if n >= integration.max_attempts => Outcome::Exhausted,
        Outcome::Retry(_) => Outcome::Retry(match retry_after {
            Some(ra) => ra.min(integration.backoff.max),
            None => backoff(&integration.backoff, n, rng),
        }),
        other => other,
    }
}

/// Exponential backoff with jitter: `initial * 2^(n-1)`, capped at `max`,
/// then a uniformly random point in its upper half, so many messages that
/// failed together do not come back together.
pub fn backoff(b: &Backoff, n: u32, rng: &mut impl Rng) -> Duration {
    let exp = n.saturating_sub(1).min(32);
    let full = b
        .initial
        .checked_mul(1u32 << exp.min(31))
        .unwrap_or(b.max)
        .min(b.max);
    let half = full / 2;
    half + full.saturating_sub(half).mul_f64(rng.gen::<f64>())
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate_parse(v)?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn httpdate_parse(v: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(v).ok().or_else(|| {
        // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
        let parts: Vec<&str> = v.split_whitespace().collect();
        if parts.len() != 6 {
            return None;
        }
        let month = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ]
        .iter()
        .position(|m| *m == parts[2])?
            + 1;
        let text = format!("{}-{:02}-{}T{}Z", parts[3], month, parts[1], parts[4]);
        humantime::parse_rfc3339(&text).ok()
    })
}

/// Everything one attempt needs from the daemon.
pub struct Senders<'a> {
    pub clients: &'a Clients,
    pub tokens: &'a TokenCache,
    pub catalog: &'a crate::catalog::Catalog,
}

/// How a request reaches the remote system.
#[derive(Clone)]
pub enum Via {
    Direct,
    /// Through a connected relay of the connection's MID server, which
    /// applies mutual TLS from its own protocol profile of the same name.
    Relay(std::sync::Arc<crate::tunnel::Session>),
}

impl Via {
    pub fn label(&self) -> String {
        match self {
            Via::Direct => "direct".into(),
            Via::Relay(s) => s.via(),
        }
    }
}

/// A request's way out, for the message's own request and the OAuth token
/// request alike: the daemon's HTTP client for a TLS setting, or a relay
/// with its protocol profile of a name.
pub enum Route<'a> {
    Direct(Arc<HttpClient>),
    Relay {
        session: &'a crate::tunnel::Session,
        protocol_profile: Option<&'a str>,
    },
}

/// What one request through a [`Route`] brought.
pub struct Sent {
    pub result: Result<Reply, SendError>,
    pub elapsed: Duration,
    /// Set when a relay carried the request and did not deliver a response.
    pub relay_error: Option<crate::tunnel::RelayError>,
}

impl<'a> Route<'a> {
    /// The route `via` gives. Going directly, `direct` gives the client
    /// (asked for only then); through a relay, the relay applies its own
    /// protocol profile `relay_profile`.
    pub fn new(
        via: &'a Via,
        relay_profile: Option<&'a str>,
        direct: impl FnOnce() -> Result<Arc<HttpClient>, String>,
    ) -> Result<Route<'a>, String> {
        Ok(match via {
            Via::Direct => Route::Direct(direct()?),
            Via::Relay(session) => Route::Relay {
                session,
                protocol_profile: relay_profile,
            },
        })
    }

    /// Sends one request. An error is a request that cannot be built (the
    /// builder's words; the caller names the URL); a request that fails is
    /// in [`Sent::result`].
    pub async fn send(
        &self,
        method: &Method,
        url: &str,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
        keep: usize,
    ) -> Result<Sent, String> {
        match self {
            Route::Direct(client) => {
                let mut req = Request::builder()
                    .method(method.clone())
                    .uri(url)
                    .body(Full::new(body))
                    .map_err(|e| e.to_string())?;
                *req.headers_mut() = headers;
                let (result, elapsed) = send(client, req, timeout, keep).await;
                Ok(Sent {
                    result,
                    elapsed,
                    relay_error: None,
                })
            }
            Route::Relay {
                session,
                protocol_profile,
            } => {
                let started = std::time::Instant::now();
                let out = crate::tunnel::Outbound {
                    method: method.as_str(),
                    url,
                    headers: &headers,
                    protocol_profile: *protocol_profile,
                    body,
                };
                let (result, relay) = session.request(out, timeout, keep).await;
                Ok(Sent {
                    result,
                    elapsed: started.elapsed(),
                    relay_error: relay.err(),
                })
            }
        }
    }

    /// A direct request's failure without a reason, explained by a TLS
    /// probe of `url` with the same client ([`outbox_remote::pool::Pool::explain`];
    /// the relay probes its own). For a message's request only: the probe
    /// may take seconds.
    pub async fn explain(&self, url: &str, result: &mut Result<Reply, SendError>) {
        let (Route::Direct(client), Err(SendError::Failed(msg))) = (self, &*result) else {
            return;
        };
        let Ok(uri) = url.parse::<http::Uri>() else {
            return;
        };
        if let Some(why) = client.explain(&uri, msg).await {
            *result = Err(SendError::Failed(format!("{msg}: {why}")));
        }
    }

    /// Words for an error's end saying which relay carried the request;
    /// empty for a direct request.
    pub fn through(&self) -> String {
        match self {
            Route::Direct(_) => String::new(),
            Route::Relay { session, .. } => format!(" (through {})", session.via()),
        }
    }
}

/// The result of sending a prepared request with authentication.
pub struct Exchange {
    pub method: String,
    pub url: String,
    pub request_headers: Headers,
    pub result: Result<Reply, SendError>,
    pub duration: Duration,
    pub note: Option<String>,
    /// Set when a relay carried the request and did not deliver a response.
    pub relay_error: Option<crate::tunnel::RelayError>,
}

/// Adds the connection's authentication and sends; with OAuth, a 401
/// invalidates the token and the request goes once more with a fresh one.
pub async fn exchange(
    s: &Senders<'_>,
    connection: &Connection,
    mut prepared: Prepared,
    timeout: Duration,
    via: &Via,
) -> Result<Exchange, String> {
    let route = Route::new(via, connection.protocol_profile.as_deref(), || {
        let profile = match &connection.protocol_profile {
            Some(name) => Some(
                s.catalog
                    .protocol_profiles
                    .get(name)
                    .ok_or_else(|| format!("protocol profile {name:?} does not exist"))?,
            ),
            None => None,
        };
        s.clients
            .get(&TlsSettings::from_profile(profile))
            .map_err(|e| format!("protocol profile: {e}"))
    })?;
    let oauth_profile = match &connection.auth {
        Auth::Oauth { profile } => Some(
            s.catalog
                .oauth_profiles
                .get(profile)
                .ok_or_else(|| format!("oauth profile {profile:?} does not exist"))?,
        ),
        _ => None,
    };
    let mut note = None;
    let mut total = Duration::ZERO;
    for round in 0..2 {
        let (auth_value, token) = match (&connection.auth, oauth_profile) {
            (Auth::Basic { username, password }, _) => {
                let pw = password
                    .resolve()
                    .map_err(|e| format!("basic auth password: {e}"))?;
                let raw =
                    base64::engine::general_purpose::STANDARD.encode(format!("{username}:{pw}"));
                (Some(format!("Basic {raw}")), None)
            }
            (Auth::Oauth { .. }, Some(p)) => {
                let token = s
                    .tokens
                    .token(p, s.clients, via, connection.protocol_profile.as_deref())
                    .await?;
                (Some(format!("Bearer {}", token.expose())), Some(token))
            }
            _ => (None, None),
        };
        // Only an OAuth 401 sends a second time; otherwise this round is
        // the last and the headers move into the request.
        let mut headers = if round == 0 && oauth_profile.is_some() {
            prepared.headers.clone()
        } else {
            std::mem::take(&mut prepared.headers)
        };
        if let Some(v) = &auth_value {
            let mut value = HeaderValue::from_str(v)
                .map_err(|_| "credentials are not a valid header value".to_string())?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        let request_headers = Headers::masked(&headers);
        let Sent {
            mut result,
            elapsed,
            relay_error,
        } = route
            .send(
                &prepared.method,
                &prepared.url,
                headers,
                prepared.body.clone(),
                timeout,
                EXCERPT_BYTES,
            )
            .await
            .map_err(|e| format!("URL {}: {e}", prepared.url))?;
        route.explain(&prepared.url, &mut result).await;
        total += elapsed;
        let unauthorized = matches!(&result, Ok(r) if r.status == 401);
        if round == 0 && unauthorized {
            if let (Some(p), Some(t)) = (oauth_profile, &token) {
                s.tokens.invalidate(&p.name, t).await;
                note =
                    Some("HTTP 401 with a cached token: fetched a new token and sent again".into());
                continue;
            }
        }
        return Ok(Exchange {
            method: prepared.method.to_string(),
            url: prepared.url,
            request_headers,
            result,
            duration: total,
            note,
            relay_error,
        });
    }
    // The loop returns in its second round at the latest.
    Err("authentication retry did not complete".into())
}

/// The attempt record of an exchange: `base` (number, connection,
/// environment, route) completed with what the exchange brought, taken from
/// it instead of copied: this runs once per delivery. What decides the
/// outcome (the status, `Retry-After`, the relay's error) is read before.
pub fn attempt_record(base: Attempt, x: Exchange) -> Attempt {
    let mut a = Attempt {
        at_ms: crate::queue::now_ms(),
        method: Some(x.method),
        url: Some(x.url),
        request_headers: x.request_headers,
        duration_ms: x.duration.as_millis() as u64,
        ..base
    };
    match x.result {
        Ok(r) => {
            a.status = Some(r.status);
            a.response_headers = Headers::masked(&r.headers);
            if !r.excerpt.is_empty() {
                a.response_excerpt = Some(String::from_utf8_lossy(&r.excerpt).into_owned());
            }
        }
        Err(e) => a.error = Some(e.to_string()),
    }
    if let Some(n) = x.note {
        a.error = Some(match a.error.take() {
            Some(e) => format!("{e} ({n})"),
            None => n,
        });
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Environment, ResponseAction};
    use crate::queue::MessageState;
    use rand::rngs::mock::StepRng;

    fn integration(actions: Vec<ResponseAction>) -> Integration {
        Integration {
            name: "i".into(),
            description: String::new(),
            max_attempts: 5,
            backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
            timeout: Duration::from_secs(5),
            concurrency: 1,
            response_action: actions,
            messages: vec![],
            connections: vec![],
        }
    }

    fn connection(instance: &str) -> Connection {
        Connection {
            name: "prod".into(),
            environment: Environment::Production,
            endpoint_url: "https://acme.example.com/".into(),
            instance_name: instance.into(),
            active: true,
            notes: String::new(),
            auth: Auth::None,
            protocol_profile: None,
            mid_server: None,
            inbound_user: None,
            variables: [("table".to_string(), "incident".to_string())].into(),
        }
    }

    fn record() -> MessageRecord {
        MessageRecord {
            seq: 42,
            integration: "i".into(),
            message: "Create".into(),
            state: MessageState::Queued,
            params: [("q".to_string(), "x y".to_string())].into(),
            headers: [("X-Trace".to_string(), "t1".to_string())].into(),
            ordering_key: None,
            idempotency_key: None,
            order: 42,
            replay_of: None,
            replayed_by: None,
            attempts: 0,
            tries: 0,
            created_ms: 0,
            updated_ms: 0,
            due_ms: 0,
            last_error: None,
            sent_attempt: None,
            body: Bytes::new(),
            body_ref: None,
            stored_inline: false,
        }
    }

    #[test]
    fn guard_names_both_values_and_lets_blank_through() {
        assert!(guard("acme-dev", &connection("")).is_ok());
        assert!(guard("acme-dev", &connection("  ")).is_ok());
        assert!(guard("acme-prod", &connection("acme-prod")).is_ok());
        let e = guard("acme-dev", &connection("acme-prod")).unwrap_err();
        assert!(
            e.contains("\"acme-prod\"") && e.contains("\"acme-dev\""),
            "{e}"
        );
    }

    #[test]
    fn build_expands_templates_and_adds_the_idempotency_key() {
        let mt = MessageType {
            name: "Create".into(),
            method: "POST".into(),
            path: "/api/${variables.table}/${params.q}".into(),
            headers: [
                ("Content-Type".to_string(), "application/json".to_string()),
                ("X-Env".to_string(), "${connection.environment}".to_string()),
            ]
            .into(),
        };
        let p = build(&connection(""), &mt, &record()).unwrap();
        assert_eq!(p.url, "https://acme.example.com/api/incident/x%20y");
        assert_eq!(p.method, Method::POST);
        assert_eq!(p.headers["idempotency-key"], "000000000000002a");
        assert_eq!(p.headers["x-env"], "production");
        assert_eq!(p.headers["x-trace"], "t1");
        let bad = MessageType {
            path: "/api/${params.missing}".into(),
            ..mt
        };
        let e = build(&connection(""), &bad, &record()).unwrap_err();
        assert!(e.contains("unknown params key \"missing\""), "{e}");
    }

    #[test]
    fn outcome_classes() {
        let i = integration(vec![]);
        let mut rng = StepRng::new(0, 0);
        let cases = [(Some(200), true), (Some(204), true), (Some(101), true)];
        for (status, sent) in cases {
            assert_eq!(
                classify(&i, 1, status, None, &mut rng) == Outcome::Sent,
                sent
            );
        }
        for status in [None, Some(408), Some(425), Some(429), Some(500), Some(503)] {
            assert!(
                matches!(classify(&i, 1, status, None, &mut rng), Outcome::Retry(_)),
                "{status:?}"
            );
        }
        for status in [400, 401, 403, 404, 409, 422, 301] {
            assert_eq!(
                classify(&i, 1, Some(status), None, &mut rng),
                Outcome::Final(FinalState::Error),
                "{status}"
            );
        }
        // max_attempts reached: a retryable outcome ends in error.
        assert_eq!(
            classify(&i, 5, Some(503), None, &mut rng),
            Outcome::Exhausted
        );
        assert_eq!(
            classify(&i, 5, Some(404), None, &mut rng),
            Outcome::Final(FinalState::Error)
        );
    }

    #[test]
    fn response_actions_override_the_class() {
        let i = integration(vec![
            ResponseAction {
                code: "401".into(),
                retry: true,
                state: None,
            },
            ResponseAction {
                code: "4xx".into(),
                retry: false,
                state: Some(FinalState::Ignored),
            },
            ResponseAction {
                code: "503".into(),
                retry: false,
                state: None,
            },
        ]);
        let mut rng = StepRng::new(0, 0);
        assert!(matches!(
            classify(&i, 1, Some(401), None, &mut rng),
            Outcome::Retry(_)
        ));
        assert_eq!(
            classify(&i, 1, Some(404), None, &mut rng),
            Outcome::Final(FinalState::Ignored)
        );
        assert_eq!(
            classify(&i, 1, Some(503), None, &mut rng),
            Outcome::Final(FinalState::Error)
        );
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let i = integration(vec![]);
        let mut rng = StepRng::new(0, 0);
        assert_eq!(
            classify(&i, 1, Some(429), Some(Duration::from_secs(7)), &mut rng),
            Outcome::Retry(Duration::from_secs(7))
        );
        assert_eq!(
            classify(&i, 1, Some(429), Some(Duration::from_secs(7200)), &mut rng),
            Outcome::Retry(Duration::from_secs(60))
        );
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        let mut low = StepRng::new(0, 0);
        let mut rng = rand::thread_rng();
        for n in 1..=20 {
            let full = Duration::from_secs(1u64 << (n - 1).min(20)).min(b.max);
            let d = backoff(&b, n, &mut rng);
            assert!(d >= full / 2 && d <= full, "n={n}: {d:?} vs {full:?}");
            assert_eq!(backoff(&b, n, &mut low), full / 2);
        }
        assert!(backoff(&b, 1000, &mut rng) <= b.max);
    }
}
