//! Forwarding to upstreams: connection pool, header hygiene, timeouts, upgrades.
//!
//! Bodies stream both ways: the client's body is handed to the upstream request as
//! it arrives and the upstream's body is handed back frame by frame, trailers
//! included. Nothing is buffered whole.

mod body;
mod forward;
pub(crate) mod headers;

pub(crate) use body::ReqBody;
pub(crate) use forward::Forward;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::config::UpstreamConfig;
use crate::metrics::{Metrics, UpstreamLabel};
use crate::Body;

pub(crate) type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Settings of an outgoing connection pool (upstreams, facilitators).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolSettings<'a> {
    pub connect_timeout: Duration,
    /// PEM CA bundle to trust instead of the web PKI roots.
    pub ca: Option<&'a std::path::Path>,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

/// A pooled HTTP/1.1 client for `http://` and `https://` URLs (rustls).
pub(crate) fn pooled_client<B>(p: PoolSettings<'_>) -> Result<Client<HttpsConnector, B>, String>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(p.connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_client_config(p.ca)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(p.idle_timeout)
        .pool_max_idle_per_host(p.max_idle)
        .build(connector))
}

/// Facts about the client connection, put in each request's extensions by the server.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Why a request is refused before it reaches the gateway proper.
#[derive(Debug, thiserror::Error)]
pub enum Malformed {
    #[error("the request has more than one Host header (RFC 9112 §3.2)")]
    DuplicateHost,
    #[error("CONNECT tunnels are not supported: tollgate is a reverse proxy")]
    Connect,
}

/// Puts a request from a client into the shape the rest of the gateway expects, before
/// anything else reads or adds a header:
///
/// - hop-by-hop fields, and those the client named in `Connection`, are removed now, so
///   that a client cannot make the gateway drop the fields it adds itself (a request
///   with `Connection: X-Forwarded-For` must still reach the upstream with one); an
///   upgrade request keeps exactly `Connection: upgrade` and its `Upgrade`, except
///   an upgrade to `h2c`, which is never forwarded (it would let the client speak
///   HTTP/2 straight to the origin, past every route);
/// - method and URL override fields ([`headers::OVERRIDES`]) are removed;
/// - a standard method spelled in another case (`post`) is made canonical (`POST`),
///   since origins such as Flask and Starlette upper-case it before dispatching;
/// - `Host` is made to agree with the request target's authority when there is one
///   (HTTP/2 `:authority`, HTTP/1.1 absolute-form; RFC 9112 §3.2.2);
/// - requests that cannot be proxied safely are refused.
pub(crate) fn prepare_request<B>(req: &mut Request<B>) -> Result<(), Malformed> {
    if let Some(canonical) = canonical_method(req.method()) {
        *req.method_mut() = canonical;
    }
    if req.method() == Method::CONNECT {
        return Err(Malformed::Connect);
    }
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Err(Malformed::DuplicateHost);
    }
    if let Some(authority) = req.uri().authority() {
        if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    let upgrade = headers::upgrade_request(req.headers()).filter(|p| !names_h2c(p));
    let h = req.headers_mut();
    headers::strip_hop_by_hop(h);
    for name in headers::OVERRIDES {
        h.remove(*name);
    }
    // An id that is not sane is replaced (the request-id layer makes a fresh one).
    if h.get("x-request-id").is_some_and(|v| !crate::telemetry::is_sane_request_id(v))
        || h.get_all("x-request-id").iter().nth(1).is_some()
    {
        h.remove("x-request-id");
    }
    if let Some(proto) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, proto);
    }
    Ok(())
}

/// The standard method `m` names in another spelling (`post`, `Get`), if any.
fn canonical_method(m: &Method) -> Option<Method> {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::CONNECT,
        Method::OPTIONS,
        Method::TRACE,
        Method::PATCH,
    ];
    if m.as_str().bytes().all(|b| !b.is_ascii_lowercase()) {
        return None;
    }
    STANDARD.into_iter().find(|s| s.as_str().eq_ignore_ascii_case(m.as_str()))
}

/// Whether an `Upgrade` value asks for `h2c` among its protocols.
fn names_h2c(v: &HeaderValue) -> bool {
    v.to_str().map_or(true, |s| {
        s.split(',').any(|p| p.split('/').next().unwrap_or_default().trim().eq_ignore_ascii_case("h2c"))
    })
}

/// Why forwarding failed; each maps to one synthetic response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("could not connect to upstream {upstream}: {source}")]
    Connect { upstream: Arc<str>, source: crate::BoxError },
    #[error("upstream {upstream} sent no response head within {timeout:?}")]
    Timeout { upstream: Arc<str>, timeout: Duration },
    #[error("upstream {upstream} failed: {source}")]
    Upstream { upstream: Arc<str>, source: crate::BoxError },
    #[error("request cannot be forwarded: {0}")]
    BadRequest(String),
    /// A request reached the forwarder without a route or with an unknown upstream: a
    /// fault of tollgate's wiring, never of the client.
    #[error("the request has no route to an upstream")]
    Unrouted,
}

impl ProxyError {
    /// Whether the request reached the upstream before it failed (it timed out or
    /// broke off after being sent), as opposed to never getting there.
    pub fn reached_upstream(&self) -> bool {
        matches!(self, ProxyError::Timeout { .. } | ProxyError::Upstream { .. })
    }
}

/// One configured upstream with its own connection pool.
pub(crate) struct Upstream {
    pub name: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    timeout: Duration,
    inject: Vec<(HeaderName, HeaderValue)>,
    client: Client<HttpsConnector, RequestBody>,
    duration: prometheus_client::metrics::histogram::Histogram,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("name", &self.name).field("authority", &self.authority).finish()
    }
}

impl Upstream {
    /// Builds an upstream from validated config.
    pub(crate) fn new(cfg: &UpstreamConfig, metrics: &Metrics) -> Result<Upstream, String> {
        let uri = cfg.url.uri();
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        let authority = uri.authority().cloned().ok_or_else(|| format!("upstream {}: url has no host", cfg.name))?;
        let base_path = uri.path().trim_end_matches('/').to_owned();

        let client = pooled_client(PoolSettings {
            connect_timeout: cfg.connect_timeout,
            ca: cfg.ca.as_deref(),
            idle_timeout: cfg.pool_idle_timeout,
            max_idle: cfg.pool_max_idle,
        })
        .map_err(|e| format!("upstream {}: {e}", cfg.name))?;
        let inject = cfg.headers.clone();
        Ok(Upstream {
            name: cfg.name.as_str().into(),
            scheme,
            authority,
            base_path,
            timeout: cfg.timeout,
            inject,
            client,
            duration: metrics.upstream_duration.get_or_create(&UpstreamLabel { upstream: cfg.name.clone() }).clone(),
        })
    }

    /// The upstream URI for a client request path, after `strip_prefix`.
    fn target(&self, pq: Option<&PathAndQuery>, strip_prefix: Option<&str>) -> Result<Uri, ProxyError> {
        let raw = pq.map(|p| p.as_str()).unwrap_or("/");
        let mut rest = raw;
        if let Some(prefix) = strip_prefix {
            let prefix = prefix.trim_end_matches('/');
            if let Some(r) = raw.strip_prefix(prefix) {
                if r.is_empty() || r.starts_with('/') || r.starts_with('?') {
                    rest = r;
                }
            }
        }
        let mut path = String::with_capacity(self.base_path.len() + rest.len() + 1);
        path.push_str(&self.base_path);
        if !rest.starts_with('/') {
            path.push('/');
        }
        path.push_str(rest);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| ProxyError::BadRequest(e.to_string()))
    }

    /// Forwards `req` (already through [`prepare_request`]) and returns the upstream's
    /// response with a streaming body.
    pub(crate) async fn forward(
        &self,
        mut req: Request<ReqBody>,
        strip_prefix: Option<&str>,
    ) -> Result<Response<Body>, ProxyError> {
        let asked = headers::upgrade_request(req.headers());
        let client_upgrade = asked.is_some().then(|| hyper::upgrade::on(&mut req));

        let uri = self.target(req.uri().path_and_query(), strip_prefix)?;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        // Hop-by-hop fields were already removed on arrival (`prepare_request`), which
        // left exactly `Connection: upgrade` + `Upgrade` on an upgrade request.
        let h = req.headers_mut();
        // Host is set by the client from the upstream URI, as nginx's default
        // `proxy_set_header Host $proxy_host` does; the original is in X-Forwarded-Host.
        h.remove(header::HOST);
        for (k, v) in &self.inject {
            h.insert(k.clone(), v.clone());
        }

        let client_failed = Arc::new(AtomicBool::new(false));
        let req = req.map(|inner| RequestBody { inner, failed: client_failed.clone() });

        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.client.request(req)).await;
        self.duration.observe(started.elapsed().as_secs_f64());
        let mut res = match result {
            Err(_) => return Err(ProxyError::Timeout { upstream: self.name.clone(), timeout: self.timeout }),
            // The client's own body broke (bad chunk, cut short): its fault, not the upstream's.
            Ok(Err(_)) if client_failed.load(Ordering::Acquire) => {
                return Err(ProxyError::BadRequest("the request body is malformed or was cut short".to_owned()))
            }
            Ok(Err(e)) if e.is_connect() => {
                return Err(ProxyError::Connect { upstream: self.name.clone(), source: Box::new(e) })
            }
            Ok(Err(e)) => return Err(ProxyError::Upstream { upstream: self.name.clone(), source: Box::new(e) }),
            Ok(Ok(res)) => res,
        };

        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            // Splice only the protocol the client asked for and the route allowed; an
            // upstream that switches to anything else (or unasked) is not followed.
            let agreed = asked.as_ref().zip(res.headers().get(header::UPGRADE)).is_some_and(|(a, got)| {
                let got = got.to_str().unwrap_or_default().trim();
                a.to_str().is_ok_and(|a| a.split(',').any(|p| p.trim().eq_ignore_ascii_case(got)))
            });
            let client_upgrade = client_upgrade.filter(|_| agreed);
            let Some(client_upgrade) = client_upgrade else {
                return Err(ProxyError::Upstream {
                    upstream: self.name.clone(),
                    source: "the upstream switched protocols to one the client did not ask for".into(),
                });
            };
            {
                let upstream_upgrade = hyper::upgrade::on(&mut res);
                let name = self.name.clone();
                tokio::spawn(async move {
                    match tokio::try_join!(client_upgrade, upstream_upgrade) {
                        Ok((c, u)) => {
                            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                                tracing::debug!(upstream = %name, error = %e, "upgraded connection closed with error");
                            }
                        }
                        Err(e) => tracing::debug!(upstream = %name, error = %e, "upgrade failed"),
                    }
                });
                let proto = res.headers().get(header::UPGRADE).cloned();
                headers::strip_hop_by_hop(res.headers_mut());
                if let Some(p) = proto {
                    res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    res.headers_mut().insert(header::UPGRADE, p);
                }
                return Ok(res.map(|b| b.map_err(Into::into).boxed_unsync()));
            }
        }
        headers::strip_hop_by_hop(res.headers_mut());
        Ok(res.map(|b| b.map_err(Into::into).boxed_unsync()))
    }
}

/// The client's request body on its way upstream. It streams untouched; it only notes
/// whether reading it failed, so that failure is answered 400 rather than 502.
pub(crate) struct RequestBody {
    inner: ReqBody,
    failed: Arc<AtomicBool>,
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.failed.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn tls_client_config(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no certificates found", path.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}
