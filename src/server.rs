//! Listeners: the gateway (HTTP/1.1 and HTTP/2, over TLS by ALPN or h2c by prior
//! knowledge in clear) and the admin listener; connection cap, header read timeout,
//! idle timeout, HTTP/2 stream limits, header size limit, graceful shutdown and reload
//! signals.
//!
//! Shaped like mini-redis's server: a semaphore caps connections before `accept`, and
//! one shutdown signal fans out to every connection, each of which finishes its
//! in-flight requests; connections still open at the deadline are closed.
//!
//! Every phase before a request head is complete is limited by `header_read_timeout`,
//! so an idle or slow client cannot hold a connection slot for long: the TLS
//! handshake, the first bytes that tell HTTP/1 from the HTTP/2 preface (which
//! hyper-util's auto builder would wait for forever), and the HTTP/1 head itself
//! (hyper's own timer; without one it is silently off). hyper starts that timer again
//! whenever an HTTP/1 connection waits for its next request, so it also bounds an idle
//! keep-alive connection.
//!
//! HTTP/2 has no such timer: a client that sent the preface and answers PINGs could
//! hold its slot forever. So every connection counts its requests in flight, from the
//! request head until the response body has ended or been dropped (a long SSE stream
//! is in flight, not idle), and one with none for `idle_timeout` is closed gracefully:
//! HTTP/2 gets a GOAWAY (RFC 9113 §6.8) and closes once streams the client opened
//! meanwhile have finished; HTTP/1, being between requests, is closed. A client that
//! stalls that close (an HTTP/2 peer that never acknowledges the GOAWAY's PING) is
//! dropped after one more `idle_timeout`. Keep-alive PINGs find peers that vanished
//! during a long response, and a stream cap bounds what one connection may ask of the
//! upstreams at once.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::{service_fn, Service};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::proxy::ConnInfo;
use crate::Body;

/// Limits applied to client connections.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
    pub shutdown_timeout: Duration,
}

impl Limits {
    pub(crate) fn from_config(cfg: &Config) -> Limits {
        Limits {
            header_read_timeout: cfg.server.header_read_timeout,
            max_header_bytes: cfg.server.max_header_bytes,
            max_connections: cfg.server.max_connections,
            idle_timeout: cfg.server.idle_timeout,
            http2_max_concurrent_streams: cfg.server.http2_max_concurrent_streams,
            shutdown_timeout: cfg.server.shutdown_timeout,
        }
    }
}

/// How often an HTTP/2 connection is PINGed when nothing else arrived from the client.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A PING unanswered for this long drops the connection: the peer is gone, even if
/// the kernel has not noticed (a long response would otherwise keep its slot).
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams a client may reset before tollgate accepted them, before the connection is
/// closed with ENHANCE_YOUR_CALM: the h2 crate's answer to the "rapid reset" attack
/// (CVE-2023-44487), pinned here so a dependency upgrade cannot loosen it.
const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams tollgate may reset for a client's protocol errors over one connection before
/// closing it (RUSTSEC-2024-0003); hyper's current default, pinned for the same reason.
const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Loads a rustls server config from PEM files, offering h2 and http/1.1 by ALPN.
pub(crate) fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
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
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    b
}

/// What the server tells its connections, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Finish in-flight requests, take no new ones, then close.
    Draining,
    /// The shutdown deadline passed: close now.
    Closed,
}

/// Timeouts every connection of a listener gets.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    header_read: Duration,
    idle: Duration,
}

/// Serves the gateway on `listener` until `shutdown` turns true, then drains.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    gateway: Gateway,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = Arc::new(builder(&limits));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (phase, phase_rx) = watch::channel(Phase::Serving);
    // Every connection task holds a clone; `recv` returns `None` once all have ended.
    let (finished_tx, mut finished) = mpsc::channel::<()>(1);
    let timeouts = Timeouts { header_read: limits.header_read_timeout, idle: limits.idle_timeout };
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
        let mut phase = phase_rx.clone();
        let conn_phase = phase_rx.clone();
        let finished = finished_tx.clone();
        tokio::spawn(async move {
            let conn = async {
                let conn_info = ConnInfo { peer, tls: tls.is_some() };
                let io: Box<dyn Io> = match tls {
                    None => Box::new(stream),
                    Some(acceptor) => match tokio::time::timeout(timeouts.header_read, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => return tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(peer = %peer, "TLS handshake timed out"),
                    },
                };
                let svc = service_fn(move |req| {
                    let gw = gateway.clone();
                    async move { Ok::<_, Infallible>(handle(gw, conn_info, req).await) }
                });
                serve_http(io, &builder, svc, timeouts, conn_phase, peer).await;
            };
            tokio::select! {
                () = conn => {}
                _ = phase.wait_for(|&p| p == Phase::Closed) => {
                    tracing::debug!(peer = %peer, "connection closed at the shutdown deadline");
                }
            }
            drop(permit);
            drop(finished);
        });
    }
    drop(listener);
    drop(finished_tx);
    tracing::info!("draining in-flight requests");
    let _ = phase.send(Phase::Draining);
    tokio::select! {
        _ = finished.recv() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(limits.shutdown_timeout) => {
            tracing::warn!(timeout = ?limits.shutdown_timeout, "shutdown deadline reached; closing remaining connections");
            let _ = phase.send(Phase::Closed);
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
        let snap = gw.snapshot();
        let r = crate::rejection::Responder {
            public_base: &snap.public_base,
            request_id: &request_id,
            instance: req.uri().path(),
            html: false,
        };
        return crate::rejection::Rejection::Malformed(e).into_response(&r);
    }
    gw.handle(req).await
}

/// Serves a simple HTTP/1 service (the admin API) until shutdown.
pub(crate) async fn serve_simple<F, Fut>(listener: TcpListener, handler: F, mut shutdown: watch::Receiver<bool>)
where
    F: Fn(hyper::Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<crate::Body>> + Send + 'static,
{
    const TIMEOUTS: Timeouts = Timeouts { header_read: Duration::from_secs(10), idle: Duration::from_secs(60) };
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).header_read_timeout(TIMEOUTS.header_read);
    let builder = Arc::new(b);
    let (phase, phase_rx) = watch::channel(Phase::Serving);
    let (finished_tx, mut finished) = mpsc::channel::<()>(1);
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
        let mut phase = phase_rx.clone();
        let finished = finished_tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = serve_http(Box::new(stream), &builder, svc, TIMEOUTS, phase.clone(), peer) => {}
                _ = phase.wait_for(|&p| p == Phase::Closed) => {}
            }
            drop(permit);
            drop(finished);
        });
    }
    drop(listener);
    drop(finished_tx);
    let _ = phase.send(Phase::Draining);
    if tokio::time::timeout(Duration::from_secs(5), finished.recv()).await.is_err() {
        let _ = phase.send(Phase::Closed);
    }
}

// === connection plumbing ===

/// A client connection after TLS, whatever it runs on.
trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves HTTP/1.1 or HTTP/2 on `io` once its first bytes arrived within the header
/// read timeout, until the client closes, the server drains, or the connection has
/// been idle for the idle timeout.
async fn serve_http<S>(
    mut io: Box<dyn Io>,
    builder: &auto::Builder<TokioExecutor>,
    svc: S,
    timeouts: Timeouts,
    mut phase: watch::Receiver<Phase>,
    peer: SocketAddr,
) where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let prefix = match tokio::time::timeout(timeouts.header_read, sniff(&mut io)).await {
        Ok(Ok(Some(prefix))) => prefix,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return tracing::debug!(peer = %peer, error = %e, "connection failed before a request"),
        Err(_) => return tracing::debug!(peer = %peer, "no request within the header read timeout"),
    };
    let io = TokioIo::new(Prefixed { prefix, pos: 0, io });
    let activity = Arc::new(Activity::new());
    let svc = Counted { inner: svc, activity: activity.clone() };
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %peer, error = %e, "connection closed with error");
                }
                return;
            }
            _ = phase.wait_for(|&p| p >= Phase::Draining), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            () = idle_for(&activity, timeouts.idle) => {
                if closing {
                    // Nothing in flight, yet the graceful close did not finish: an HTTP/2
                    // peer that never acknowledges the GOAWAY's PING.
                    return tracing::debug!(peer = %peer, "idle connection did not close; dropped");
                }
                tracing::debug!(peer = %peer, "closing idle connection");
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Completes once no request has been in flight for `timeout` (counted from the end of
/// the last one, or from the start of the connection).
///
/// Requests only touch atomics ([`Activity`]); this timer wakes once per `timeout`
/// and re-arms itself, so the hot path never wakes the connection task.
async fn idle_for(activity: &Activity, timeout: Duration) {
    let mut deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::time::sleep_until(deadline).await;
        let now = tokio::time::Instant::now();
        if activity.in_flight.load(Ordering::Acquire) > 0 {
            deadline = now + timeout;
            continue;
        }
        let idle_since = activity.last_end();
        if now.saturating_duration_since(idle_since) >= timeout {
            return;
        }
        deadline = idle_since + timeout;
    }
}

// === in-flight counting ===

/// Wraps a connection's service so that each request counts as in flight until its
/// response body has ended or been dropped (a client reset or disconnect).
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

/// A connection's requests in flight and when the last one ended, kept in atomics so
/// that counting costs a request no wake-up of anyone.
struct Activity {
    in_flight: AtomicUsize,
    /// The connection's start, the origin of `last_end_ms`.
    origin: tokio::time::Instant,
    last_end_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity { in_flight: AtomicUsize::new(0), origin: tokio::time::Instant::now(), last_end_ms: AtomicU64::new(0) }
    }

    fn last_end(&self) -> tokio::time::Instant {
        self.origin + Duration::from_millis(self.last_end_ms.load(Ordering::Acquire))
    }
}

impl<S, B> Service<Request<Incoming>> for Counted<S>
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
{
    type Response = Response<CountedBody<B>>;
    type Error = Infallible;
    type Future = CountedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let guard = InFlight::start(self.activity.clone());
        CountedFuture { inner: self.inner.call(req), guard: Some(guard) }
    }
}

/// One request in flight; dropping it ends it.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.last_end_ms.fetch_max(ms, Ordering::AcqRel);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// The service's future, holding the request's [`InFlight`] until the response
    /// body takes it over.
    struct CountedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F, B> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
{
    type Output = Result<Response<CountedBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = match ready!(this.inner.poll(cx)) {
            Ok(res) => res,
            Err(never) => match never {},
        };
        let guard = this.guard.take();
        Poll::Ready(Ok(res.map(|body| CountedBody { body, guard })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that ends its request's [`InFlight`] when it ends.
    struct CountedBody<B> {
        #[pin]
        body: B,
        guard: Option<InFlight>,
    }
}

impl<B: hyper::body::Body> hyper::body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(this.body.poll_frame(cx));
        if frame.is_none() {
            *this.guard = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
