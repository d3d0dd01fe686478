//! The gateway: config snapshots, each with its request stack (request id, route
//! step, payment gate, forward), swapped atomically on reload.
//!
//! Everything that comes from the config lives in an immutable [`Snapshot`] behind an
//! `ArcSwap`: a reload builds a new snapshot and swaps it in atomically, and requests
//! already in flight finish on the one they started with.

mod routing;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::request_id::{PropagateRequestId, PropagateRequestIdLayer, SetRequestId, SetRequestIdLayer};

use crate::config::{Config, ConfigErrors};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::payment::layer::{PaymentGate, PaymentLayer, PaymentService};
use crate::payment::Rails;
use crate::proxy::{Forward, Upstream};
use crate::route::RouteTable;
use crate::telemetry::MakeUlid;
use crate::Body;
use routing::{RouteLayer, RouteService, Routing};

/// Builds the rails for a config; given to the gateway so tests can add fakes.
pub type RailFactory = Arc<dyn Fn(&Config, &Arc<dyn Ledger>, &Arc<Metrics>) -> Result<Rails, String> + Send + Sync>;

/// The request stack of one snapshot: request id, route step, payment gate, forwarder.
/// Named, not boxed: the hot path pays no allocation or dynamic call for the layering.
type Stack = SetRequestId<PropagateRequestId<RouteService<PaymentService<Forward>>>, MakeUlid>;

/// Everything derived from one config file, the request stack included.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub public_base: String,
    stack: Stack,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("routes", &self.config.routes.len()).finish()
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
        let selfservice = crate::selfservice::SelfService::new(&cfg, ledger, metrics).map_err(|e| errors.push(e)).ok();
        let rails = match rails(&cfg, ledger, metrics) {
            Ok(r) => r,
            Err(e) => {
                errors.push(e);
                Rails::default()
            }
        };
        let (Some(selfservice), true) = (selfservice, errors.is_empty()) else {
            return Err(ConfigErrors(errors));
        };
        let routes = RouteTable::new(&cfg);
        let gate = PaymentGate::new(&cfg, &routes, rails, metrics);
        let routing = Routing::new(&cfg, routes, metrics, selfservice);
        // Built once here, swapped whole on reload; a request flows through it one way:
        // request id → route (metrics, access log) → payment → forward.
        let stack = ServiceBuilder::new()
            .layer(SetRequestIdLayer::x_request_id(MakeUlid))
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(RouteLayer::new(routing))
            .layer(PaymentLayer::new(Arc::new(gate)))
            .service(Forward::new(upstreams));
        Ok(Snapshot { public_base: cfg.public_base(), stack, config: Arc::new(cfg) })
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

    /// Serves one request through the current snapshot's stack. Never fails: every
    /// problem is a response.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let stack = self.snapshot().stack.clone();
        match stack.oneshot(req).await {
            Ok(res) => res,
            Err(never) => match never {},
        }
    }
}
