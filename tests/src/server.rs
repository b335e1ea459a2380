//! The hyper server under [`Sink`](crate::Sink) and [`OAuthServer`](crate::OAuthServer): 127.0.0.1:0, plain or TLS, HTTP/1.1 and h2, one handler per request; dropping it stops the listener and every connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::{JoinHandle, JoinSet};

/// What the connection told about the client.
#[derive(Clone, Debug, Default)]
pub(crate) struct Peer {
    /// DER of the first certificate the client presented over TLS.
    pub client_cert: Option<Vec<u8>>,
}

pub(crate) type Reply = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;
/// Answers one request, its body already collected.
pub(crate) type Handler = Arc<dyn Fn(Peer, Request<Bytes>) -> Reply + Send + Sync>;

pub(crate) struct Server {
    pub addr: SocketAddr,
    /// Why TLS handshakes failed, in order.
    pub rejected: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds 127.0.0.1:0 and serves `handler`; over TLS with `tls`. With
    /// `http2` both HTTP/1.1 and h2 are served (by ALPN over TLS, by the
    /// connection preface in plain text); without, HTTP/1.1 only.
    pub async fn start(tls: Option<Arc<ServerConfig>>, http2: bool, handler: Handler) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("test server cannot bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .expect("bound listener has an address");
        let rejected = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let failures = rejected.clone();
        let task = tokio::spawn(async move {
            // The connections are owned here, so aborting this task (on
            // drop) ends every one of them with the listener.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        let (acceptor, handler, failures) =
                            (acceptor.clone(), handler.clone(), failures.clone());
                        conns.spawn(async move {
                            let Some(acceptor) = acceptor else {
                                return serve(tcp, Peer::default(), http2, handler).await;
                            };
                            match acceptor.accept(tcp).await {
                                Ok(tls) => {
                                    let peer = Peer {
                                        client_cert: tls
                                            .get_ref()
                                            .1
                                            .peer_certificates()
                                            .and_then(|c| c.first())
                                            .map(|c| c.to_vec()),
                                    };
                                    serve(tls, peer, http2, handler).await;
                                }
                                Err(e) => failures
                                    .lock()
                                    .expect("rejected list lock")
                                    .push(e.to_string()),
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Server {
            addr,
            rejected,
            task,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<I>(io: I, peer: Peer, http2: bool, handler: Handler)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (peer, handler) = (peer.clone(), handler.clone());
        async move {
            let (parts, body) = req.into_parts();
            // A body cut short is recorded as what arrived.
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, Infallible>(handler(peer, Request::from_parts(parts, body)).await)
        }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let builder = if http2 { builder } else { builder.http1_only() };
    // Errors end one connection (a client gone, a reset); nothing to report.
    let _ = builder.serve_connection(TokioIo::new(io), svc).await;
}
