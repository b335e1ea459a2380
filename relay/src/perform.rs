//! Performing one request for the daemon: allow-list, HTTP(S) with the
//! relay's own protocol profiles, bounded bodies.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use outbox_proto::ErrorKind;

use crate::allow::{AllowList, Verdict};
use crate::config::Profile;

type Connector = HttpsConnector<AllowConnector>;
/// Connections to targets with one protocol profile's TLS settings.
type HttpClient = Arc<outbox_remote::pool::Pool<Connector>>;

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

/// A request's time: when it is up, and the timeout it was given, which
/// is what an error says ran out.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: tokio::time::Instant,
    pub timeout: Duration,
}

impl Deadline {
    pub fn starting_now(timeout: Duration) -> Deadline {
        Deadline {
            at: tokio::time::Instant::now() + timeout,
            timeout,
        }
    }
}

/// A response: status, headers, and the body as it arrives.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: outbox_remote::pool::Body,
}

/// The relay's HTTP side: a client for requests without a protocol
/// profile and one per profile, built at the start, each resolving names
/// only into allowed addresses.
pub struct Performer {
    allow: Arc<AllowList>,
    default: HttpClient,
    by_profile: HashMap<String, HttpClient>,
}

/// The connector under every client: it connects only where the allow-list
/// lets it, judging each connection by its host *and* port ([`Verdict`]).
/// A name listed with this port by a `host:port` entry resolves as usual;
/// any other name resolves only into addresses inside a CIDR block, and
/// the connection goes only to those checked addresses, so a name cannot be
/// re-pointed between the check and the connection.
#[derive(Clone)]
struct AllowConnector {
    allow: Arc<AllowList>,
    /// For targets the list allows as they are.
    listed: HttpConnector,
    /// For names that must resolve into a CIDR block.
    checked: HttpConnector<CidrResolver>,
}

type Connecting<T> =
    Pin<Box<dyn Future<Output = Result<T, Box<dyn std::error::Error + Send + Sync>>> + Send>>;

impl AllowConnector {
    fn new(allow: Arc<AllowList>) -> AllowConnector {
        fn tune<R>(http: &mut HttpConnector<R>) {
            http.enforce_http(false);
            http.set_connect_timeout(Some(Duration::from_secs(10)));
        }
        let mut listed = HttpConnector::new();
        tune(&mut listed);
        let mut checked = HttpConnector::new_with_resolver(CidrResolver {
            allow: allow.clone(),
        });
        tune(&mut checked);
        AllowConnector {
            allow,
            listed,
            checked,
        }
    }
}

impl tower_service::Service<http::Uri> for AllowConnector {
    type Response = <HttpConnector as tower_service::Service<http::Uri>>::Response;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Connecting<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both connectors are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let host = uri.host().unwrap_or_default().to_string();
        let port = target_port(&uri);
        match self.allow.check(&host, port) {
            Verdict::Allowed => {
                let mut listed = self.listed.clone();
                Box::pin(async move { Ok(listed.call(uri).await?) })
            }
            Verdict::ResolveAndCheck => {
                let mut checked = self.checked.clone();
                Box::pin(async move {
                    checked.call(uri).await.map_err(|e| {
                        // The resolver refused the name's addresses.
                        match in_chain::<OutsideBlocks>(&e) {
                            Some(_) => NotAllowed::outside_blocks(&host, port).into(),
                            None => e.into(),
                        }
                    })
                })
            }
            // (`Performer::send` checks first; the connector is where the
            // list is enforced, whatever calls it.)
            Verdict::Denied => Box::pin(async move { Err(NotAllowed::target(&host, port).into()) }),
        }
    }
}

/// A refusal by the allow-list, typed so that [`classify`] finds it under
/// whatever hyper wraps it in.
#[derive(Debug)]
struct NotAllowed(String);

impl NotAllowed {
    fn target(host: &str, port: u16) -> NotAllowed {
        NotAllowed(format!("{host}:{port} is not in this relay's allow list"))
    }

    fn outside_blocks(host: &str, port: u16) -> NotAllowed {
        NotAllowed(format!(
            "{host}:{port} is not in this relay's allow list \
             ({host} resolves outside the allow-list's CIDR blocks)"
        ))
    }
}

impl std::fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotAllowed {}

/// [`CidrResolver`]'s refusal of a name, inside the `io::Error` a
/// resolver must give.
#[derive(Debug)]
struct OutsideBlocks(String);

impl std::fmt::Display for OutsideBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} resolves outside the allow-list", self.0)
    }
}

impl std::error::Error for OutsideBlocks {}

/// The first error of type `T` in `e`'s chain, looking inside `io::Error`s
/// too (which hold theirs rather than give it as a source).
fn in_chain<'e, T: std::error::Error + 'static>(
    e: &'e (dyn std::error::Error + 'static),
) -> Option<&'e T> {
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(found) = e.downcast_ref::<T>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref()?.downcast_ref::<T>())
        }) {
            return Some(found);
        }
        source = e.source();
    }
    None
}

/// A DNS resolver that hands out a name's addresses only when every one of
/// them is inside a CIDR block of the allow-list.
#[derive(Clone)]
struct CidrResolver {
    allow: Arc<AllowList>,
}

impl tower_service::Service<Name> for CidrResolver {
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
            if addrs.iter().all(|a| allow.allows_addr(a.ip())) {
                Ok(addrs.into_iter())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    OutsideBlocks(host),
                ))
            }
        })
    }
}

/// The port a request to `uri` goes to.
fn target_port(uri: &http::Uri) -> u16 {
    uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    })
}

impl Performer {
    /// Builds every client; an error is the system's roots failing to
    /// make TLS settings.
    pub fn new(
        allow: AllowList,
        profiles: impl IntoIterator<Item = Profile>,
    ) -> Result<Performer, String> {
        let allow = Arc::new(allow);
        let client = |tls: rustls::ClientConfig| {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .enable_http2()
                .wrap_connector(AllowConnector::new(allow.clone()));
            Arc::new(outbox_remote::pool::Pool::new(connector))
        };
        let system = outbox_remote::tls::client_config(&outbox_remote::tls::Files::default())
            .map_err(|e| e.to_string())?;
        let by_profile = profiles
            .into_iter()
            .map(|p| (p.name, client(p.tls)))
            .collect();
        Ok(Performer {
            default: client(system),
            by_profile,
            allow,
        })
    }

    /// Checks the target against the allow-list, before anything is
    /// resolved or connected.
    pub fn check_target(&self, url: &http::Uri) -> Result<(), Failure> {
        let host = url
            .host()
            .ok_or_else(|| Failure::new(ErrorKind::Protocol, format!("{url} has no host")))?;
        let port = target_port(url);
        match self.allow.check(host, port) {
            Verdict::Allowed | Verdict::ResolveAndCheck => Ok(()),
            Verdict::Denied => Err(Failure::new(
                ErrorKind::NotAllowed,
                NotAllowed::target(host, port).to_string(),
            )),
        }
    }

    /// The client for `profile` (none: the system's roots alone).
    fn client(&self, profile: Option<&str>) -> Result<&HttpClient, Failure> {
        match profile {
            None => Ok(&self.default),
            Some(name) => self.by_profile.get(name).ok_or_else(|| {
                Failure::new(
                    ErrorKind::Protocol,
                    format!("this relay has no protocol profile {name:?}"),
                )
            }),
        }
    }

    /// Sends the request; the caller streams the response body.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(String, Vec<u8>)],
        protocol_profile: Option<&str>,
        body: Bytes,
        deadline: Deadline,
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
            .uri(uri.clone())
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
        let resp = tokio::time::timeout_at(deadline.at, client.request(req))
            .await
            .map_err(|_| {
                Failure::new(
                    ErrorKind::Timeout,
                    format!("no response within {:?}", deadline.timeout),
                )
            })?;
        let resp = match resp {
            Ok(resp) => resp,
            Err(e) => {
                let failure = classify(&e);
                // A failure without a reason may be a target's TLS alert
                // that only the connection saw (a refused client
                // certificate): the probe finds it.
                return Err(match client.explain(&uri, &failure.message).await {
                    Some(why) => {
                        Failure::new(ErrorKind::Tls, format!("{}: {why}", failure.message))
                    }
                    None => failure,
                });
            }
        };
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

fn classify(e: &outbox_remote::pool::Error) -> Failure {
    // The connector's refusal says all there is to say.
    if let Some(refused) = in_chain::<NotAllowed>(e.inner()) {
        return Failure::new(ErrorKind::NotAllowed, refused.to_string());
    }
    let text = outbox_remote::error_chain(e.inner());
    let kind = if text.to_ascii_lowercase().contains("certificate") || text.contains("tls") {
        ErrorKind::Tls
    } else if e.is_connect() {
        ErrorKind::Connect
    } else {
        ErrorKind::Other
    };
    Failure::new(kind, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target on loopback that answers every request with 204 and closes.
    async fn target() -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = tcp.read(&mut buf).await;
                    let _ = tcp
                        .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                        .await;
                });
            }
        });
        port
    }

    async fn get(allow: &[String], url: &str) -> Result<u16, Failure> {
        let performer = Performer::new(AllowList::parse(allow).unwrap(), []).unwrap();
        let r = performer
            .send(
                "GET",
                url,
                &[],
                None,
                Bytes::new(),
                Deadline::starting_now(Duration::from_secs(5)),
            )
            .await?;
        Ok(r.status)
    }

    /// A `host:port` entry allows its name on that port only: on another
    /// port the name must resolve into a CIDR block like any other.
    #[test]
    fn only_the_allow_lists_own_refusals_count_as_refusals() {
        // A connection refused by the system (EACCES from a local firewall)
        // is no allow-list refusal, though its kind is the resolver's.
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(in_chain::<OutsideBlocks>(&denied).is_none());
        let refused = std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            OutsideBlocks("jira.internal".into()),
        );
        assert!(in_chain::<OutsideBlocks>(&refused).is_some());
        let boxed: Box<dyn std::error::Error + Send + Sync> =
            NotAllowed::target("jira.internal", 22).into();
        assert_eq!(
            in_chain::<NotAllowed>(&*boxed)
                .map(|n| n.to_string())
                .as_deref(),
            Some("jira.internal:22 is not in this relay's allow list")
        );
    }

    #[tokio::test]
    async fn a_name_listed_with_one_port_is_not_allowed_on_another() {
        let port = target().await;
        let url = format!("http://localhost:{port}/");
        let listed = format!("localhost:{port}");
        let other_port = format!("localhost:{}", port.wrapping_add(1).max(1));
        // Listed with this port: resolved as usual.
        assert_eq!(get(&[listed], &url).await, Ok(204));
        // Listed with another port, and a CIDR block it does not resolve
        // into: refused when resolving, before any connection.
        let e = get(&[other_port.clone(), "10.20.0.0/16".into()], &url)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotAllowed, "{e:?}");
        assert_eq!(
            e.message,
            format!(
                "localhost:{port} is not in this relay's allow list \
                 (localhost resolves outside the allow-list's CIDR blocks)"
            ),
            "{e:?}"
        );
        // Listed with another port and a block it resolves into: allowed.
        let loopback = ["127.0.0.0/8".to_string(), "::1/128".to_string()];
        let mut allow = vec![other_port];
        allow.extend(loopback);
        assert_eq!(get(&allow, &url).await, Ok(204));
        // Not listed at all, and no block: refused before anything.
        let e = get(
            &["10.20.0.0/16".into()],
            &format!("http://127.0.0.1:{port}/"),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotAllowed, "{e:?}");
    }
}
