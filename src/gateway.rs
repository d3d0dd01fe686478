//! The per-request path: request id, route match, payment gate, forward, metrics,
//! access log.
//!
//! Everything that comes from the config lives in an immutable [`Snapshot`] behind an
//! `ArcSwap`: a reload builds a new snapshot and swaps it in atomically, and requests
//! already in flight finish on the one they started with.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use std::sync::atomic::AtomicI64;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;
use tower::{Layer, ServiceExt};

use crate::config::{Config, ConfigErrors};
use crate::ledger::Ledger;
use crate::metrics::{Metrics, RouteMetrics};
use crate::payment::layer::{PaymentGate, PaymentLayer, PaymentService};
use crate::payment::{Rails, Refused};
use crate::problem::{self, PROBLEM_PATH};
use crate::proxy::headers::TrustedProxies;
use crate::proxy::{ConnInfo, Forward, Upstream};
use crate::rejection::{Rejection, Responder};
use crate::route::RequestCtx;
use crate::route::{normalize_host, RouteTable, Unroutable};
use crate::Body;

/// Builds the rails for a config; given to the gateway so tests can add fakes.
pub type RailFactory = Arc<dyn Fn(&Config, &Arc<dyn Ledger>, &Arc<Metrics>) -> Result<Rails, String> + Send + Sync>;

/// Everything derived from one config file.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub public_base: String,
    pub routes: RouteTable,
    route_metrics: Vec<RouteMetrics>,
    trusted: TrustedProxies,
    /// The request stack, built once per snapshot: payment gate, then forwarder.
    stack: PaymentService<Forward>,
    unmatched: RouteMetrics,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("routes", &self.routes).finish()
    }
}

impl Snapshot {
    pub fn build(
        cfg: Config,
        metrics: &Arc<Metrics>,
        ledger: &Arc<dyn Ledger>,
        rails: &RailFactory,
    ) -> Result<Snapshot, ConfigErrors> {
        let mut upstreams = HashMap::new();
        let mut errors = Vec::new();
        for (i, u) in cfg.upstreams.iter().enumerate() {
            match Upstream::new(u, metrics) {
                Ok(up) => {
                    upstreams.insert(up.name.clone(), Arc::new(up));
                }
                Err(e) => errors.push(format!("upstream[{i}]: {e}")),
            }
        }
        let rails = match rails(&cfg, ledger, metrics) {
            Ok(r) => r,
            Err(e) => {
                errors.push(e);
                Rails::default()
            }
        };
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let routes = RouteTable::new(&cfg);
        let route_metrics = routes.iter().map(|r| metrics.for_route(&r.name)).collect();
        let gate = PaymentGate::new(&cfg, &routes, rails, metrics);
        let trusted = TrustedProxies::new(cfg.server.trusted_proxies.clone());
        Ok(Snapshot {
            public_base: cfg.public_base(),
            routes,
            route_metrics,
            trusted,
            stack: PaymentLayer::new(Arc::new(gate)).layer(Forward::new(upstreams)),
            unmatched: metrics.for_route("_unmatched"),
            config: Arc::new(cfg),
        })
    }

    /// The longest upstream timeout: holds older than this plus a margin are stale.
    pub fn max_upstream_timeout(&self) -> std::time::Duration {
        self.config.upstreams.iter().map(|u| u.timeout).max().unwrap_or_default()
    }
}

/// State that outlives reloads.
pub struct GatewayState {
    pub metrics: Arc<Metrics>,
    pub ledger: Arc<dyn Ledger>,
    pub rails: RailFactory,
    pub config_path: Option<PathBuf>,
    pub state: ArcSwap<Snapshot>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for GatewayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayState").field("config_path", &self.config_path).finish()
    }
}

/// The gateway service handed to every connection. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Gateway {
    pub shared: Arc<GatewayState>,
}

impl Gateway {
    pub fn new(
        cfg: Config,
        config_path: Option<PathBuf>,
        ledger: Arc<dyn Ledger>,
        metrics: Arc<Metrics>,
        rails: RailFactory,
    ) -> Result<Gateway, ConfigErrors> {
        let snap = Snapshot::build(cfg, &metrics, &ledger, &rails)?;
        let shared = Arc::new(GatewayState {
            metrics,
            ledger,
            rails,
            config_path,
            state: ArcSwap::from_pointee(snap),
            reload_lock: tokio::sync::Mutex::new(()),
        });
        Ok(Gateway { shared })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.state.load_full()
    }

    /// Re-reads the config file and swaps it in; the old one stays on any error.
    pub async fn reload(&self) -> Result<(), ConfigErrors> {
        let _one_at_a_time = self.shared.reload_lock.lock().await;
        let result = match &self.shared.config_path {
            None => Err(ConfigErrors(vec!["no config file to reload from".into()])),
            Some(path) => {
                let path = path.clone();
                let cfg = tokio::task::spawn_blocking(move || Config::load(&path))
                    .await
                    .map_err(|e| ConfigErrors(vec![e.to_string()]))
                    .and_then(|r| r);
                cfg.and_then(|cfg| self.swap(cfg))
            }
        };
        let label = if result.is_ok() { "success" } else { "failure" };
        self.shared.metrics.config_reloads.get_or_create(&crate::metrics::ReloadResult { result: label }).inc();
        match &result {
            Ok(()) => tracing::info!("config reloaded"),
            Err(e) => tracing::error!(errors = %e.0.join("; "), "config reload refused; keeping the old config"),
        }
        result
    }

    /// Swaps in a new config; what needs a restart is refused.
    pub fn swap(&self, cfg: Config) -> Result<(), ConfigErrors> {
        let old = self.snapshot();
        let mut problems = Vec::new();
        if cfg.server.listen != old.config.server.listen {
            problems.push("server.listen: changing the listen address needs a restart".to_owned());
        }
        if cfg.admin.listen != old.config.admin.listen {
            problems.push("admin.listen: changing the admin address needs a restart".to_owned());
        }
        if cfg.ledger.backend != old.config.ledger.backend
            || cfg.ledger.path != old.config.ledger.path
            || cfg.ledger.url != old.config.ledger.url
        {
            problems.push("ledger: changing the ledger needs a restart".to_owned());
        }
        let sh = &self.shared;
        let snap = Snapshot::build(cfg, &sh.metrics, &sh.ledger, &sh.rails).map_err(|mut e| {
            e.0.append(&mut problems.clone());
            e
        })?;
        if !problems.is_empty() {
            return Err(ConfigErrors(problems));
        }
        self.shared.state.store(Arc::new(snap));
        Ok(())
    }

    /// Serves one request. Never fails: every problem is a response.
    pub async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let snap = self.snapshot();
        let request_id = crate::telemetry::request_id(req.headers().get("x-request-id"));
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
        let inflight = Inflight::new(&self.shared.metrics);

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

        let answer = snap.stack.clone().oneshot(req).await;
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
    fn new(m: &Metrics) -> Self {
        m.inflight.inc();
        Inflight(m.inflight.clone())
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
