//! The HTTP API (SPEC §7): hyper 1.x server, token check, routing, errors.
//!
//! Every answer is JSON (`{"error": ".."}` on failure) except the export
//! (TOML), the docs (Markdown) and the metrics (Prometheus text).

mod integrations;
mod messages;

pub use messages::time;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::app::{App, ChangeError};
use crate::catalog::RuleError;

pub type Body = Full<Bytes>;

/// An oversized body is read and dropped up to this many bytes before the
/// 413 goes out (so the client sees the answer, not a reset); a larger
/// declared length is refused at once.
const DRAIN_LIMIT: usize = 64 << 20;

/// An error answer: status and a one-line message (plus, for a refused
/// integration file, every problem).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub problems: Vec<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            problems: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    fn into_response(self) -> Response<Body> {
        #[derive(Serialize)]
        struct E<'a> {
            error: &'a str,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            problems: &'a [String],
        }
        json_response(
            self.status,
            &E {
                error: &self.message,
                problems: &self.problems,
            },
        )
    }
}

impl From<RuleError> for ApiError {
    fn from(e: RuleError) -> Self {
        let status = match e {
            RuleError::UnknownIntegration(_) | RuleError::UnknownConnection { .. } => {
                StatusCode::NOT_FOUND
            }
            _ => StatusCode::CONFLICT,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Rule(r) => r.into(),
            ChangeError::Invalid(problems) => ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "the integration file has {} problem(s): {}",
                    problems.len(),
                    problems.join("; ")
                ),
                problems,
            },
            ChangeError::Store(s) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, s.to_string()),
        }
    }
}

pub type ApiResult = Result<Response<Body>, ApiError>;

pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Body> {
    // Our answer types are plain data; serializing them cannot fail.
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    response(status, "application/json", body)
}

pub fn response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

pub fn ok<T: Serialize + ?Sized>(value: &T) -> ApiResult {
    Ok(json_response(StatusCode::OK, value))
}

/// Serves the API on `listener` until `shutdown`; connections in progress
/// are given until the tracker is awaited by the caller.
pub async fn serve(listener: TcpListener, app: Arc<App>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: log, pause briefly so
                // the loop does not spin, and keep serving.
                tracing::warn!(error = %e, "api accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(handle(&app, req).await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "api connection ended");
                        }
                    }
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            }
            .instrument(tracing::debug_span!("api", %peer)),
        );
    }
    tracker.close();
    tracker.wait().await;
}

/// A request with its path split, the body read up to the configured limit.
pub struct Call {
    pub method: Method,
    pub segments: Vec<String>,
    pub query: Vec<(String, String)>,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Call {
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON of type `T`; a parse error says where.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.body.is_empty() {
            return Err(ApiError::bad_request(
                "request body is empty; expected JSON",
            ));
        }
        // serde_json's words already say where ("at line 1 column 2").
        serde_json::from_slice(&self.body).map_err(|e| {
            ApiError::bad_request(format!("request body is not valid JSON for this call: {e}"))
        })
    }

    pub fn text(&self) -> Result<&str, ApiError> {
        std::str::from_utf8(&self.body)
            .map_err(|e| ApiError::bad_request(format!("request body is not UTF-8: {e}")))
    }
}

async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if method == Method::GET && path == "/healthz" {
        return json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}));
    }
    // Metrics carry counts and names, never secrets; like /healthz they
    // need no token, so a Prometheus scrape needs no credentials.
    if method == Method::GET && path == "/metrics" {
        return response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            crate::telemetry::render(app),
        );
    }
    if let Err(e) = check_token(app, req.headers()) {
        return e.into_response();
    }
    let call = match read_call(app, req).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let result = route(app, &call).await;
    match result {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(%method, %path, status = e.status.as_u16(), error = %e.message, "api call failed");
            }
            e.into_response()
        }
    }
}

fn check_token(app: &App, headers: &http::HeaderMap) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <token> header",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Authorization header is not of the form \"Bearer <token>\"",
            )
        })?;
    let expected = app.token.expose().as_bytes();
    if bool::from(given.trim().as_bytes().ct_eq(expected)) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "API token is not valid",
        ))
    }
}

async fn read_call(app: &App, req: Request<Incoming>) -> Result<Call, ApiError> {
    let limit = app.config.api.max_body;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes (api.max_body)"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > DRAIN_LIMIT as u64 {
            return Err(too_large());
        }
    }
    let (parts, mut body) = req.into_parts();
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("request body could not be read: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                // Read (and drop) the rest, up to a bound, so the client gets
                // its 413 instead of a connection reset mid-upload.
                let mut drained = buf.len() + data.len();
                while let Some(Ok(f)) = body.frame().await {
                    drained += f.data_ref().map_or(0, |d| d.len());
                    if drained > DRAIN_LIMIT {
                        break;
                    }
                }
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    let body = buf.freeze();
    let segments = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect::<Result<Vec<_>, _>>()?;
    let query = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(k)?, percent_decode(&v.replace('+', " "))?))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Call {
        method: parts.method,
        segments,
        query,
        headers: parts.headers,
        body,
    })
}

fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::bad_request(format!("bad percent-encoding in {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ApiError::bad_request(format!("{s:?} is not UTF-8")))
}

async fn route(app: &Arc<App>, call: &Call) -> ApiResult {
    let segs: Vec<&str> = call.segments.iter().map(String::as_str).collect();
    let m = &call.method;
    match (m.clone(), segs.as_slice()) {
        (Method::GET, ["v1", "integrations"]) => integrations::list(app),
        (Method::GET, ["v1", "integrations", i]) => integrations::get(app, i),
        (Method::GET, ["v1", "integrations", i, "connections"]) => {
            integrations::connections(app, i)
        }
        (
            Method::POST,
            ["v1", "integrations", i, action @ ("activate" | "deactivate" | "pause" | "resume")],
        ) => integrations::integration_action(app, i, action).await,
        (
            Method::POST,
            ["v1", "integrations", i, "connections", c, action @ ("activate" | "deactivate")],
        ) => integrations::connection_action(app, i, c, action).await,
        (Method::POST, ["v1", "apply"]) => integrations::apply(app, call).await,
        (Method::GET, ["v1", "export"]) => integrations::export(app),
        (Method::GET, ["v1", "mid-servers"]) => ok(&app.relays.sessions()),
        (Method::GET, ["v1", "docs"]) => Ok(response(
            StatusCode::OK,
            "text/markdown; charset=utf-8",
            crate::docs::render(&app.catalog(), &app.config.instance_name),
        )),
        _ => messages::route(app, call, &segs).await,
    }
}
