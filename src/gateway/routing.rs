//! The route step of the request stack: problem pages, routing (fail-closed, see
//! ARCHITECTURE.md), the request as the upstream will see it (normal path, upgrade
//! policy, `X-Forwarded-*`, no client-sent `X-Tollgate-*`), and around the rest of the
//! stack the per-route outcome metrics, the in-flight gauge and the access log.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;
use tower::{Layer, Service, ServiceExt};
use tower_http::request_id::RequestId;

use crate::config::Config;
use crate::metrics::{Metrics, RouteMetrics};
use crate::payment::Refused;
use crate::problem::{self, PROBLEM_PATH};
use crate::proxy::headers::TrustedProxies;
use crate::proxy::{ConnInfo, ProxyError, ReqBody};
use crate::rejection::{Rejection, Responder};
use crate::route::{normalize_host, RequestCtx, RouteTable, Unroutable};
use crate::selfservice::SelfService;
use crate::Body;

/// What the route step needs from one snapshot.
pub(super) struct Routing {
    public_base: String,
    routes: RouteTable,
    route_metrics: Vec<RouteMetrics>,
    unmatched: RouteMetrics,
    trusted: TrustedProxies,
    inflight: Gauge<i64, AtomicI64>,
    selfservice: SelfService,
}

impl Routing {
    pub(super) fn new(cfg: &Config, routes: RouteTable, metrics: &Metrics, selfservice: SelfService) -> Routing {
        Routing {
            selfservice,
            public_base: cfg.public_base(),
            route_metrics: routes.iter().map(|r| metrics.for_route(&r.name)).collect(),
            routes,
            unmatched: metrics.for_route("_unmatched"),
            trusted: TrustedProxies::new(cfg.server.trusted_proxies.clone()),
            inflight: metrics.inflight.clone(),
        }
    }

    /// Routes one request and runs the rest of the stack (`inner`) on it. Never
    /// fails: every problem is a response.
    async fn route<S>(&self, mut req: Request<Incoming>, inner: S) -> Response<Body>
    where
        S: Service<Request<ReqBody>, Response = Response<Body>, Error = ProxyError>,
    {
        let started = Instant::now();
        let snap = self;
        let request_id = match req.extensions().get::<RequestId>() {
            Some(id) => String::from_utf8_lossy(id.header_value().as_bytes()).into_owned(),
            None => crate::telemetry::request_id(req.headers().get("x-request-id")),
        };
        let conn = req.extensions().get::<ConnInfo>().copied();
        let peer = conn.map(|c| c.peer.ip()).unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));

        let method = req.method().clone();
        let path = req.uri().path().to_owned();

        if let Some(code) = path.strip_prefix(PROBLEM_PATH) {
            if method == Method::GET || method == Method::HEAD {
                if let Some(res) = problem::problem_page(code) {
                    return finish(res, &request_id);
                }
            }
        }
        // tollgate's own namespace, as sent or once normalised: answered here, never
        // forwarded, whatever the routes are.
        // Only a path with a segment starting with '.' (as `/.well-known` does) or an
        // escape can be in that namespace: the common path is not normalised twice.
        let own = if path.contains("/.") || path.contains('%') {
            match crate::route::path::normalize(&path) {
                Ok(normal) if SelfService::owns(&normal) => Some(normal.into_owned()),
                _ if SelfService::owns(&path) => Some(path.clone()),
                _ => None,
            }
        } else {
            None
        };
        if let Some(own) = own {
            let res = snap.selfservice.handle(req, &own, &request_id).await;
            tracing::info!(request_id = %request_id, client = %peer, method = %method, path = %path,
                status = res.status().as_u16(), latency_us = started.elapsed().as_micros() as u64, "self-service");
            return finish(res, &request_id);
        }

        let host = request_host(&req);
        let routed = snap.routes.resolve(host.as_deref(), &method, &path).map(|r| (r.route, r.path.into_owned()));
        let routed = routed.and_then(|(route, normal)| {
            // Fail closed: the upstream gets the path that was routed on, or nothing.
            if normal != path && !set_path(&mut req, &normal) {
                return Err(Unroutable::BadPath(crate::route::path::PathError::ControlCharacter));
            }
            Ok(route)
        });
        let route = match routed {
            Ok(route) => route,
            Err(e) => {
                snap.unmatched.rejected.inc();
                tracing::info!(request_id = %request_id, method = %method, path = %path, error = %e, "no route");
                let r =
                    Responder { public_base: &snap.public_base, request_id: &request_id, instance: &path, html: false };
                return Rejection::Unroutable(e).into_response(&r);
            }
        };
        if let Some(protocols) = crate::proxy::headers::upgrade_request(req.headers()) {
            let allowed = protocols.to_str().is_ok_and(|p| p.split(',').all(|t| route.allows_upgrade(t)));
            if !allowed {
                tracing::debug!(request_id = %request_id, route = %route.name, "upgrade not allowed on this route; forwarded as a plain request");
                crate::proxy::headers::drop_upgrade(req.headers_mut());
            }
        }
        let rm = &snap.route_metrics[route.index];
        let inflight = Inflight::new(&self.inflight);

        let client_ip = snap.trusted.client_ip(peer, req.headers());
        let proto = if conn.is_some_and(|c| c.tls) { "https" } else { "http" };
        let headers = req.headers_mut();
        let stale: Vec<_> = headers.keys().filter(|k| k.as_str().starts_with("x-tollgate-")).cloned().collect();
        for k in stale {
            headers.remove(k);
        }
        snap.trusted.set_forwarded(headers, peer, proto, host.as_deref());
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            headers.insert("x-request-id", v);
        }
        req.extensions_mut().insert(Arc::new(RequestCtx {
            request_id: request_id.clone(),
            route: route.clone(),
            client_ip,
        }));

        let answer = inner.oneshot(req.map(ReqBody::Incoming)).await;
        let (res, counter) = match answer {
            Ok(res) => {
                let counter = match res.extensions().get::<Refused>() {
                    Some(_) if res.status() == StatusCode::PAYMENT_REQUIRED => &rm.payment_required,
                    Some(_) => &rm.rejected,
                    None if route.is_free() => &rm.free,
                    None => &rm.forwarded,
                };
                (res, counter)
            }
            Err(e) => {
                tracing::warn!(request_id = %request_id, route = %route.name, error = %e, "upstream failed");
                let r =
                    Responder { public_base: &snap.public_base, request_id: &request_id, instance: &path, html: false };
                (Rejection::Upstream(e).into_response(&r), &rm.upstream_error)
            }
        };
        counter.inc();
        let status = res.status();
        let elapsed = started.elapsed();
        rm.duration.observe(elapsed.as_secs_f64());
        tracing::info!(
            request_id = %request_id,
            client = %client_ip,
            method = %method,
            path = %path,
            route = %route.name,
            upstream = %route.upstream,
            status = status.as_u16(),
            latency_us = elapsed.as_micros() as u64,
            "request"
        );
        let res = res.map(|inner| TrackedBody { inner, inflight }.boxed_unsync());
        finish(res, &request_id)
    }
}

// === impl RouteLayer ===

#[derive(Clone)]
pub(super) struct RouteLayer {
    routing: Arc<Routing>,
}

impl RouteLayer {
    pub(super) fn new(routing: Routing) -> RouteLayer {
        RouteLayer { routing: Arc::new(routing) }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = RouteService<S>;
    fn layer(&self, inner: S) -> RouteService<S> {
        RouteService { routing: self.routing.clone(), inner }
    }
}

// === impl RouteService ===

#[derive(Clone)]
pub(super) struct RouteService<S> {
    routing: Arc<Routing>,
    inner: S,
}

impl<S> Service<Request<Incoming>> for RouteService<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner services are always ready (the payment layer and the forwarder
        // hold no capacity of their own).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let routing = self.routing.clone();
        let inner = self.inner.clone();
        Box::pin(async move { Ok(routing.route(req, inner).await) })
    }
}

fn finish(mut res: Response<Body>, request_id: &str) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        res.headers_mut().insert("x-request-id", v);
    }
    res
}

/// The request's host as routes compare it (see [`normalize_host`]): `Host` for
/// HTTP/1, `:authority` for HTTP/2.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    match req.uri().authority() {
        Some(a) => Some(normalize_host(a.host())),
        None => req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(normalize_host),
    }
}

/// Replaces the request's path (keeping its query) with the normal form it was
/// routed on, which is what the upstream gets. `false` if it cannot be.
fn set_path<B>(req: &mut Request<B>, path: &str) -> bool {
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = req.uri().clone().into_parts();
    let Ok(pq) = http::uri::PathAndQuery::try_from(pq) else { return false };
    parts.path_and_query = Some(pq);
    match http::Uri::from_parts(parts) {
        Ok(uri) => {
            *req.uri_mut() = uri;
            true
        }
        Err(_) => false,
    }
}

/// Counts a request in `tollgate_inflight_requests` until its response body has been
/// sent or dropped, so long streams (SSE, downloads) count for as long as they run.
struct Inflight(Gauge<i64, AtomicI64>);

impl Inflight {
    fn new(gauge: &Gauge<i64, AtomicI64>) -> Self {
        gauge.inc();
        Inflight(gauge.clone())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pin_project_lite::pin_project! {
    /// A response body that carries its request's [`Inflight`] mark.
    struct TrackedBody {
        #[pin]
        inner: Body,
        inflight: Inflight,
    }
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
