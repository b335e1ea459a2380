//! An HTTP(S) client for tests that talk to the harness servers directly: hyper-util's pooled client over hyper-rustls, trusting a test [`Pki`](crate::Pki).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A bound on every request, so a server that never answers fails the test
/// instead of hanging it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Which HTTP versions a [`TestClient`] speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    /// HTTP/1.1 only (ALPN `http/1.1`).
    Http1,
    /// h2 only: ALPN `h2` over TLS, prior knowledge in plain text.
    Http2,
    /// Both, ALPN `h2` preferred; plain text uses HTTP/1.1.
    Both,
}

/// An HTTP and HTTPS client with its own connection pool.
#[derive(Clone)]
pub struct TestClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// A response with its body collected.
#[derive(Clone, Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    /// The body as JSON; `Value::Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl TestClient {
    /// A client with `tls` (e.g. `pki.client_config(None)`) speaking both
    /// HTTP/1.1 and h2.
    pub fn new(tls: rustls::ClientConfig) -> TestClient {
        TestClient::with_versions(tls, Versions::Both)
    }

    pub fn with_versions(tls: rustls::ClientConfig, versions: Versions) -> TestClient {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let connector = match versions {
            Versions::Http1 => builder.enable_http1().build(),
            Versions::Http2 => builder.enable_http2().build(),
            Versions::Both => builder.enable_http1().enable_http2().build(),
        };
        let inner = Client::builder(TokioExecutor::new())
            .http2_only(versions == Versions::Http2)
            .build(connector);
        TestClient { inner }
    }

    /// Sends `req`; `Err` with the reason when no response came back (a
    /// refused handshake, a connection reset, the [`REQUEST_TIMEOUT`]).
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<TestResponse, String> {
        let exchange = async {
            let resp = self.inner.request(req).await.map_err(|e| error_chain(&e))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| error_chain(&e))?
                .to_bytes();
            Ok(TestResponse {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no response within {REQUEST_TIMEOUT:?}")))
    }

    /// `method url` with `headers` and `body`.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<TestResponse, String> {
        let mut b = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(body.into()))
            .map_err(|e| format!("bad request to {url}: {e}"))?;
        self.send(req).await
    }

    /// `GET url` with `headers`.
    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<TestResponse, String> {
        self.request(Method::GET, url, headers, Bytes::new()).await
    }

    /// `POST url` with an `application/x-www-form-urlencoded` body.
    pub async fn post_form(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        form: &str,
    ) -> Result<TestResponse, String> {
        let mut all = vec![("content-type", "application/x-www-form-urlencoded")];
        all.extend_from_slice(headers);
        self.request(Method::POST, url, &all, form.to_string())
            .await
    }
}

/// An error with its sources, as hyper's outer errors alone say little
/// ("client error (Connect)").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
