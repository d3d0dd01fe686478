//! Listeners: the gateway (HTTP/1.1 and HTTP/2, over TLS by ALPN or h2c by prior
//! knowledge in clear) and the admin listener; connection cap, header read timeout,
//! header size limit, graceful shutdown and reload signals.
//!
//! Shaped like mini-redis's server: a semaphore caps connections before `accept`, and
//! one shutdown signal fans out to every connection, each of which finishes its
//! in-flight requests; connections still open at the deadline are closed.
//!
//! Every phase before a request head is complete is limited by `header_read_timeout`,
//! so an idle or slow client cannot hold a connection slot for long: the TLS
//! handshake, the first bytes that tell HTTP/1 from the HTTP/2 preface (which
//! hyper-util's auto builder would wait for forever), and the HTTP/1 head itself
//! (hyper's own timer; without one it is silently off).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::proxy::ConnInfo;
use crate::Body;

/// Limits applied to client connections.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub shutdown_timeout: Duration,
}

impl Limits {
    pub fn from_config(cfg: &Config) -> Limits {
        Limits {
            header_read_timeout: cfg.server.header_read_timeout,
            max_header_bytes: cfg.server.max_header_bytes,
            max_connections: cfg.server.max_connections,
            shutdown_timeout: cfg.server.shutdown_timeout,
        }
    }
}

/// Loads a rustls server config from PEM files, offering h2 and http/1.1 by ALPN.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs = {
        let pem = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
        rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", cert.display()))?
    };
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", cert.display()));
    }
    let key = {
        let pem = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
        rustls_pemfile::private_key(&mut pem.as_slice())
            .map_err(|e| format!("{}: {e}", key.display()))?
            .ok_or_else(|| format!("{}: no private key found", key.display()))?
    };
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS: {e}"))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Serves the gateway on `listener` until `shutdown` turns true, then drains.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    gateway: Gateway,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = Arc::new(builder(&limits));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let (force_close, force_rx) = watch::channel(false);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let gateway = gateway.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let mut force = force_rx.clone();
        let timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let conn = async {
                let conn_info = ConnInfo { peer, tls: tls.is_some() };
                let io: Box<dyn Io> = match tls {
                    None => Box::new(stream),
                    Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => return tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    },
                };
                let svc = service_fn(move |req| {
                    let gw = gateway.clone();
                    async move { Ok::<_, Infallible>(handle(gw, conn_info, req).await) }
                });
                serve_http(io, &builder, svc, watcher, timeout, peer).await;
            };
            tokio::select! {
                () = conn => {}
                _ = force.wait_for(|&closed| closed) => {
                    tracing::debug!(peer = %peer, "connection closed at the shutdown deadline");
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("draining in-flight requests");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(limits.shutdown_timeout) => {
            tracing::warn!(timeout = ?limits.shutdown_timeout, "shutdown deadline reached; closing remaining connections");
            let _ = force_close.send(true);
        }
    }
}

/// One request from a client: refused here if it cannot be proxied safely, otherwise
/// cleaned of hop-by-hop fields and handed to the gateway.
async fn handle(gw: Gateway, conn: ConnInfo, mut req: Request<Incoming>) -> Response<Body> {
    req.extensions_mut().insert(conn);
    if let Err(e) = crate::proxy::prepare_request(&mut req) {
        let request_id = crate::telemetry::request_id(req.headers().get("x-request-id"));
        tracing::info!(request_id = %request_id, client = %conn.peer, method = %req.method(), error = %e, status = 400, "request refused");
        let mut res = crate::problem::problem_response(
            &gw.snapshot().public_base,
            "bad_request",
            StatusCode::BAD_REQUEST,
            format!("The request cannot be forwarded: {e}."),
            req.uri().path(),
            &request_id,
            Default::default(),
        );
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            res.headers_mut().insert("x-request-id", v);
        }
        return res;
    }
    gw.handle(req).await
}

/// Serves a simple HTTP/1 service (the admin API) until shutdown.
pub async fn serve_simple<F, Fut>(listener: TcpListener, handler: F, mut shutdown: watch::Receiver<bool>)
where
    F: Fn(hyper::Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<crate::Body>> + Send + 'static,
{
    const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
    let builder = Arc::new(b);
    let graceful = GracefulShutdown::new();
    let (force_close, force_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(256));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (stream, peer): (TcpStream, SocketAddr) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue } },
            _ = shutdown.changed() => break,
        };
        let handler = handler.clone();
        let svc = service_fn(move |req| {
            let h = handler.clone();
            async move { Ok::<_, Infallible>(h(req, peer).await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let mut force = force_rx.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = serve_http(Box::new(stream), &builder, svc, watcher, HEADER_TIMEOUT, peer) => {}
                _ = force.wait_for(|&closed| closed) => {}
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await.is_err() {
        let _ = force_close.send(true);
    }
}

// === connection plumbing ===

/// A client connection after TLS, whatever it runs on.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves HTTP/1.1 or HTTP/2 on `io` once its first bytes arrived within `timeout`.
async fn serve_http<S>(
    mut io: Box<dyn Io>,
    builder: &auto::Builder<TokioExecutor>,
    svc: S,
    watcher: Watcher,
    timeout: Duration,
    peer: SocketAddr,
) where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let prefix = match tokio::time::timeout(timeout, sniff(&mut io)).await {
        Ok(Ok(Some(prefix))) => prefix,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return tracing::debug!(peer = %peer, error = %e, "connection failed before a request"),
        Err(_) => return tracing::debug!(peer = %peer, "no request within the header read timeout"),
    };
    let io = TokioIo::new(Prefixed { prefix, pos: 0, io });
    if let Err(e) = watcher.watch(builder.serve_connection_with_upgrades(io, svc)).await {
        tracing::debug!(peer = %peer, error = %e, "connection closed with error");
    }
}

/// Reads the first bytes of a connection: enough to tell an HTTP/1 request from the
/// HTTP/2 preface. `None` when the client closed without sending anything.
async fn sniff(io: &mut Box<dyn Io>) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; H2_PREFACE.len()];
    let mut filled = 0;
    loop {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(None);
        }
        filled += n;
        if filled == H2_PREFACE.len() || !H2_PREFACE.starts_with(&buf[..filled]) {
            buf.truncate(filled);
            return Ok(Some(buf));
        }
    }
}

/// `io` with the sniffed bytes put back in front.
struct Prefixed {
    prefix: Vec<u8>,
    pos: usize,
    io: Box<dyn Io>,
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            buf.put_slice(&self.prefix[self.pos..self.pos + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
