//! Outbound HTTP clients: rustls settings, a cached client per TLS setting,
//! and one request with a deadline and a bounded response excerpt.
//!
//! A client's TLS identity lives in its rustls `ClientConfig`, so connections
//! with different client certificates cannot share one; connections with the
//! same [`TlsSettings`] do, and so share their pooled HTTP/1.1 and HTTP/2
//! connections.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::ClientConfig;

use crate::model::ProtocolProfile;

/// Connections to remote systems with one set of TLS settings
/// ([`outbox_remote::pool`]).
pub type HttpClient = outbox_remote::pool::Pool<HttpsConnector<HttpConnector>>;

/// How much of a response body an attempt keeps.
pub const EXCERPT_BYTES: usize = 2048;
/// How much of a response body is read (and dropped) so the connection can
/// be reused; a larger body closes the connection instead.
const DRAIN_LIMIT: usize = 1 << 20;

/// What a TLS client needs: extra trusted CAs and an optional identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TlsSettings {
    pub ca: Option<PathBuf>,
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl TlsSettings {
    pub fn from_profile(profile: Option<&ProtocolProfile>) -> TlsSettings {
        match profile {
            None => TlsSettings::default(),
            Some(p) => TlsSettings {
                ca: p.ca.clone(),
                identity: p.client_cert.clone().zip(p.client_key.clone()),
            },
        }
    }
}

/// Builds a rustls client config: the system and webpki roots plus the
/// settings' CA, and the client certificate when there is one
/// ([`outbox_remote::tls::client_config`]).
pub fn tls_config(settings: &TlsSettings) -> Result<ClientConfig, String> {
    let files = outbox_remote::tls::Files {
        ca: settings.ca.as_deref(),
        client: settings
            .identity
            .as_ref()
            .map(|(cert, key)| (cert.as_path(), key.as_path())),
    };
    outbox_remote::tls::client_config(&files).map_err(|e| e.to_string())
}

/// Clients by TLS settings, built on first use, handed out as an `Arc`.
#[derive(Default)]
pub struct Clients {
    cache: Mutex<HashMap<TlsSettings, Arc<HttpClient>>>,
}

impl Clients {
    pub fn get(&self, settings: &TlsSettings) -> Result<Arc<HttpClient>, String> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(settings) {
            return Ok(c.clone());
        }
        let config = tls_config(settings)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let client = Arc::new(HttpClient::new(connector));
        cache.insert(settings.clone(), client.clone());
        Ok(client)
    }

    /// Drops every client, so changed certificate files are read again.
    pub fn clear(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// What came back for one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub excerpt: Bytes,
    pub duration: Duration,
}

/// Why no response came back.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The status and headers came, the rest of the body did not.
    #[error("the response body did not end within {0:?}")]
    BodyTimeout(Duration),
    #[error("{0}")]
    Failed(String),
}

/// Sends `req` and reads the response within `timeout`, keeping the first
/// `keep` bytes of the body.
pub async fn send(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    keep: usize,
) -> (Result<Reply, SendError>, Duration) {
    let started = Instant::now();
    // Set once the head is in: a timeout after it is the body's.
    let mut answered = false;
    let result = tokio::time::timeout(timeout, async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| SendError::Failed(outbox_remote::error_chain(e.inner())))?;
        answered = true;
        let status = resp.status().as_u16();
        let (parts, mut body) = resp.into_parts();
        let mut excerpt = BytesMut::new();
        let mut read = 0usize;
        while let Some(data) = body.next_chunk().await {
            let Ok(data) = data else { break };
            read += data.len();
            let room = keep.saturating_sub(excerpt.len());
            excerpt.extend_from_slice(&data[..data.len().min(room)]);
            if read > DRAIN_LIMIT {
                break;
            }
        }
        Ok(Reply {
            status,
            headers: parts.headers,
            excerpt: excerpt.freeze(),
            duration: started.elapsed(),
        })
    })
    .await;
    let result = result.unwrap_or(Err(match answered {
        true => SendError::BodyTimeout(timeout),
        false => SendError::Timeout(timeout),
    }));
    (result, started.elapsed())
}
