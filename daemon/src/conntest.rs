//! The connection test (SPEC §3.5): HEAD, then GET only if HEAD failed, to
//! the endpoint URL with the connection's authentication; plus the guard's
//! verdict and the days left on the server's TLS certificate.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method};
use serde::Serialize;

use crate::app::App;
use crate::catalog::Catalog;
use crate::client::{tls_config, TlsSettings};
use crate::deliver::{self, Prepared, Senders, Via};
use crate::model::Connection;

/// How long each test request may take.
const TEST_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Serialize)]
pub struct TestResult {
    pub integration: String,
    pub connection: String,
    pub environment: String,
    pub ok: bool,
    pub attempts: Vec<TestAttempt>,
    pub guard: Guard,
    pub tls_days_left: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TestAttempt {
    pub method: String,
    pub url: String,
    pub status: Option<u16>,
    pub error: Option<String>,
    pub duration_ms: u64,
    /// `direct`, or the relay that carried it.
    pub via: String,
}

#[derive(Debug, Serialize)]
pub struct Guard {
    /// True when messages would be sent through this connection.
    pub ok: bool,
    pub message: String,
}

/// A test attempt fails on 400, 401, 403, 404 or 405, or without a response.
pub fn failed(status: Option<u16>) -> bool {
    matches!(status, None | Some(400 | 401 | 403 | 404 | 405))
}

pub async fn run(
    app: &Arc<App>,
    catalog: &Catalog,
    integration: &str,
    connection: &Connection,
) -> TestResult {
    let guard = match deliver::guard(&app.config.instance_name, connection) {
        Ok(()) => Guard {
            ok: true,
            message: if connection.instance_name.trim().is_empty() {
                "instance_name is blank: messages are sent (legacy)".into()
            } else {
                format!(
                    "instance_name {:?} matches this daemon",
                    connection.instance_name
                )
            },
        },
        Err(e) => Guard {
            ok: false,
            message: e,
        },
    };
    let mut attempts = Vec::new();
    let mut ok = false;
    for method in [Method::HEAD, Method::GET] {
        let a = one(app, catalog, connection, method).await;
        let passed = !failed(a.status);
        attempts.push(a);
        if passed {
            ok = true;
            break;
        }
    }
    let (tls_days_left, tls_error) = if connection.mid_server.is_some() {
        // The endpoint is only reachable from the relay's network; the
        // certificate check is not carried over the tunnel.
        (None, Some("not measured through a MID server".to_string()))
    } else if connection.endpoint_url.starts_with("https://") {
        match tls_days(catalog, connection).await {
            Ok(d) => (Some(d), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    TestResult {
        integration: integration.to_string(),
        connection: connection.name.clone(),
        environment: connection.environment.to_string(),
        ok,
        attempts,
        guard,
        tls_days_left,
        tls_error,
    }
}

async fn one(app: &App, catalog: &Catalog, connection: &Connection, method: Method) -> TestAttempt {
    let url = connection.endpoint_url.clone();
    let via = match &connection.mid_server {
        None => Via::Direct,
        Some(mid) => match app.relays.pick(mid) {
            Some(session) => Via::Relay(session),
            None => {
                return TestAttempt {
                    method: method.to_string(),
                    url,
                    status: None,
                    error: Some(format!("MID server {mid} is not connected")),
                    duration_ms: 0,
                    via: format!("mid:{mid}"),
                }
            }
        },
    };
    let senders = Senders {
        clients: &app.clients,
        tokens: &app.tokens,
        catalog,
    };
    let prepared = Prepared {
        method: method.clone(),
        url: url.clone(),
        headers: HeaderMap::new(),
        body: Bytes::new(),
    };
    match deliver::exchange(&senders, connection, prepared, TEST_TIMEOUT, &via).await {
        Ok(x) => TestAttempt {
            method: method.to_string(),
            url,
            status: x.result.as_ref().ok().map(|r| r.status),
            error: x.result.as_ref().err().map(|e| e.to_string()),
            duration_ms: x.duration.as_millis() as u64,
            via: via.label(),
        },
        Err(e) => TestAttempt {
            method: method.to_string(),
            url,
            status: None,
            error: Some(e),
            duration_ms: 0,
            via: via.label(),
        },
    }
}

/// Opens a TLS connection to the endpoint and reads the server
/// certificate's `notAfter`.
async fn tls_days(catalog: &Catalog, connection: &Connection) -> Result<i64, String> {
    let uri: http::Uri = connection
        .endpoint_url
        .parse()
        .map_err(|e| format!("endpoint_url: {e}"))?;
    let host = uri.host().ok_or("endpoint_url has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(443);
    let profile = connection
        .protocol_profile
        .as_ref()
        .and_then(|p| catalog.protocol_profiles.get(p));
    let config = tls_config(&TlsSettings::from_profile(profile))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| format!("{host}: {e}"))?;
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {host}:{port}: {e}"))?;
        let (_, session) = tls.get_ref();
        let cert = session
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("server sent no certificate")?;
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| format!("server certificate cannot be parsed: {e}"))?;
        let not_after = parsed.validity().not_after.timestamp();
        let now = crate::queue::now_ms() as i64 / 1000;
        Ok((not_after - now).div_euclid(86_400))
    };
    tokio::time::timeout(TEST_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("TLS check of {host}:{port} timed out")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn failure_statuses() {
        for s in [400, 401, 403, 404, 405] {
            assert!(super::failed(Some(s)));
        }
        assert!(super::failed(None));
        for s in [200, 204, 301, 302, 406, 409, 500, 503] {
            assert!(!super::failed(Some(s)), "{s}");
        }
    }
}
