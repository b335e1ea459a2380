//! Performing one request for the daemon: allow-list, HTTP(S) with the
//! relay's own protocol profiles, bounded bodies.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use outbox_proto::ErrorKind;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::allow::{AllowList, Verdict};
use crate::config::Profile;

type HttpClient = Client<HttpsConnector<HttpConnector<AllowResolver>>, Full<Bytes>>;

/// A failed request, as the error frame the daemon gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

/// A response: status, headers, and the body as it arrives.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: hyper::body::Incoming,
}

/// The relay's HTTP side: one client per protocol profile, built on first
/// use, each resolving names only into allowed addresses.
pub struct Performer {
    allow: Arc<AllowList>,
    profiles: HashMap<String, Profile>,
    clients: Mutex<HashMap<Option<String>, HttpClient>>,
}

/// A DNS resolver that hands out only addresses the allow-list permits, so
/// a name checked against a CIDR block cannot resolve elsewhere when the
/// connection is made.
#[derive(Clone)]
struct AllowResolver {
    allow: Arc<AllowList>,
}

impl tower_service::Service<Name> for AllowResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            // Names allowed by a host:port entry were checked with their
            // port before the request; anything else must resolve only into
            // CIDR blocks.
            if allow.names_host(&host) || addrs.iter().all(|a| allow.allows_addr(a.ip())) {
                Ok(addrs.into_iter())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("{host} resolves outside the allow-list"),
                ))
            }
        })
    }
}

impl Performer {
    pub fn new(allow: AllowList, profiles: impl IntoIterator<Item = Profile>) -> Performer {
        Performer {
            allow: Arc::new(allow),
            profiles: profiles.into_iter().map(|p| (p.name.clone(), p)).collect(),
            clients: Mutex::default(),
        }
    }

    /// Checks the target against the allow-list, before anything is
    /// resolved or connected.
    pub fn check_target(&self, url: &http::Uri) -> Result<(), Failure> {
        let host = url
            .host()
            .ok_or_else(|| Failure::new(ErrorKind::Protocol, format!("{url} has no host")))?;
        let port = url.port_u16().unwrap_or(match url.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        match self.allow.check(host, port) {
            Verdict::Allowed | Verdict::ResolveAndCheck => Ok(()),
            Verdict::Denied => Err(Failure::new(
                ErrorKind::NotAllowed,
                format!("{host}:{port} is not in this relay's allow list"),
            )),
        }
    }

    fn client(&self, profile: Option<&str>) -> Result<HttpClient, Failure> {
        let key = profile.map(str::to_string);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let profile = match profile {
            None => None,
            Some(name) => Some(self.profiles.get(name).ok_or_else(|| {
                Failure::new(
                    ErrorKind::Protocol,
                    format!("this relay has no protocol profile {name:?}"),
                )
            })?),
        };
        let tls = tls_config(profile).map_err(|e| Failure::new(ErrorKind::Tls, e))?;
        let mut http = HttpConnector::new_with_resolver(AllowResolver {
            allow: self.allow.clone(),
        });
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Sends the request; the caller streams the response body.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, Vec<u8>)],
        protocol_profile: Option<&str>,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Response, Failure> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| Failure::new(ErrorKind::Protocol, format!("{url:?}: {e}")))?;
        self.check_target(&uri)?;
        let method = Method::from_bytes(method.as_bytes()).map_err(|_| {
            Failure::new(ErrorKind::Protocol, format!("{method:?} is not a method"))
        })?;
        let client = self.client(protocol_profile)?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| Failure::new(ErrorKind::Protocol, e.to_string()))?;
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                Failure::new(ErrorKind::Protocol, format!("{k:?} is not a header name"))
            })?;
            let value = HeaderValue::from_bytes(v)
                .map_err(|_| Failure::new(ErrorKind::Protocol, format!("header {k}: bad value")))?;
            req.headers_mut().append(name, value);
        }
        let resp = tokio::time::timeout(timeout, client.request(req))
            .await
            .map_err(|_| {
                Failure::new(
                    ErrorKind::Timeout,
                    format!("no response within {timeout:?}"),
                )
            })?
            .map_err(|e| classify(&e))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        Ok(Response {
            status,
            headers,
            body: resp.into_body(),
        })
    }
}

/// Reads the next piece of a response body.
pub async fn next_chunk(body: &mut hyper::body::Incoming) -> Option<Result<Bytes, String>> {
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e.to_string())),
        }
    }
}

fn classify(e: &hyper_util::client::legacy::Error) -> Failure {
    let text = chain(e);
    let kind = if text.contains("outside the allow-list") {
        ErrorKind::NotAllowed
    } else if text.to_ascii_lowercase().contains("certificate") || text.contains("tls") {
        ErrorKind::Tls
    } else if e.is_connect() {
        ErrorKind::Connect
    } else {
        ErrorKind::Other
    };
    Failure::new(kind, text)
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// rustls settings for targets: webpki and system roots plus the profile's
/// CA, and its client certificate for mutual TLS.
pub(crate) fn tls_config(profile: Option<&Profile>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Ok(iter) = CertificateDer::pem_file_iter("/etc/ssl/certs/ca-certificates.crt") {
        for cert in iter.flatten() {
            let _ = roots.add(cert);
        }
    }
    if let Some(ca) = profile.and_then(|p| p.ca.as_ref()) {
        for cert in read_certs(ca)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    match profile.and_then(|p| p.client_cert.as_ref().zip(p.client_key.as_ref())) {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("client key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(read_certs(cert)?, key)
                .map_err(|e| format!("client certificate {}: {e}", cert.display()))
        }
    }
}

/// The roots a relay trusts the daemon's certificate with: `server_ca`.
pub fn server_roots(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(roots)
}

pub fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}
