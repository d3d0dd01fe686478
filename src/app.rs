//! Wiring: open the ledger, build the gateway, bind the listeners, handle signals,
//! run the background sweeps. Used by `tollgate run`, `tollgate demo` and the tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigErrors, LedgerBackend};
use crate::gateway::{Gateway, RailFactory};
use crate::ledger::postgres::{PostgresLedger, PostgresOptions};
use crate::ledger::sqlite::{SqliteLedger, SqliteOptions};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::payment::rails::credits::Credits;
use crate::payment::rails::x402::X402;
use crate::payment::{Rail, Rails};
use crate::server::{self, Limits};

/// How long past the longest upstream timeout a hold may stay pending before any
/// replica releases it as abandoned.
pub const STALE_HOLD_MARGIN: Duration = Duration::from_secs(60);

/// Opens the configured ledger.
pub async fn open_ledger(cfg: &Config) -> Result<Arc<dyn Ledger>, String> {
    match cfg.ledger.backend {
        LedgerBackend::Sqlite => {
            let path = cfg.ledger.path.clone();
            let opts = SqliteOptions {
                synchronous_full: cfg.ledger.synchronous == crate::config::Synchronous::Full,
                busy_timeout: cfg.ledger.statement_timeout,
            };
            let l = tokio::task::spawn_blocking(move || SqliteLedger::open(&path, opts))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("ledger {}: {e}", cfg.ledger.path.display()))?;
            Ok(Arc::new(l))
        }
        LedgerBackend::Postgres => {
            let url = cfg.ledger.url.as_deref().ok_or("ledger.url is required when ledger.backend = \"postgres\"")?;
            let opts = PostgresOptions {
                pool_size: cfg.ledger.pool_size,
                statement_timeout: cfg.ledger.statement_timeout,
                ..PostgresOptions::default()
            };
            let l = PostgresLedger::connect(url, opts).await.map_err(|e| format!("ledger (postgres): {e}"))?;
            Ok(Arc::new(l))
        }
    }
}

/// The rails every build offers: credits, and x402 when configured.
pub fn default_rails() -> RailFactory {
    Arc::new(|cfg: &Config, ledger: &Arc<dyn Ledger>, metrics: &Arc<Metrics>| {
        let mut rails: Vec<Arc<dyn Rail>> = vec![Arc::new(Credits::new(&cfg.credits, ledger.clone(), metrics.clone()))];
        if let Some(x) = &cfg.x402 {
            rails.push(Arc::new(X402::new(x, ledger.clone(), metrics.clone())?));
        }
        Ok(Rails::new(rails))
    })
}

/// A running gateway: its addresses and the handle to stop it.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Gateway,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _ledger_lock: Option<std::fs::File>,
}

impl Running {
    /// Stops accepting, drains in-flight requests (up to `server.shutdown_timeout`).
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// A sender that triggers the same shutdown (for signal handlers).
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// Waits until the servers have stopped.
    pub async fn wait(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts the gateway and admin listeners for a validated config.
pub async fn start(
    cfg: Config,
    config_path: Option<PathBuf>,
    ledger: Arc<dyn Ledger>,
    rails: RailFactory,
) -> Result<Running, ConfigErrors> {
    let errs = |m: String| ConfigErrors(vec![m]);
    let ledger_lock = lock_single_replica_ledger(&cfg).map_err(errs)?;
    let metrics = Arc::new(Metrics::new());
    let limits = Limits::from_config(&cfg);
    let tls = match &cfg.server.tls {
        Some(t) => Some(server::tls_acceptor(&t.cert, &t.key).map_err(|e| errs(format!("server.tls: {e}")))?),
        None => None,
    };
    let listener = TcpListener::bind(cfg.server.listen)
        .await
        .map_err(|e| errs(format!("server.listen: cannot bind {}: {e}", cfg.server.listen)))?;
    let admin_listener = TcpListener::bind(cfg.admin.listen)
        .await
        .map_err(|e| errs(format!("admin.listen: cannot bind {}: {e}", cfg.admin.listen)))?;
    let addr = listener.local_addr().map_err(|e| errs(e.to_string()))?;
    let admin_addr = admin_listener.local_addr().map_err(|e| errs(e.to_string()))?;

    if cfg.server.public_url.is_none() && cfg.routes.iter().any(|r| !r.pricing.is_free()) {
        tracing::warn!(
            base = %cfg.public_base(),
            "server.public_url is not set: 402 problem links and x402 resources will use the listen address; \
        set it to the URL clients call"
        );
    }
    let gateway = Gateway::new(cfg, config_path, ledger.clone(), metrics, rails)?;
    let (tx, rx) = watch::channel(false);

    // A single replica on its own ledger owns every pending hold: any left open was
    // abandoned by a previous process. A shared ledger only sweeps old ones.
    let single = gateway.snapshot().config.ledger.backend == LedgerBackend::Sqlite;
    match ledger.release_stale_holds(if single { Duration::ZERO } else { stale_after(&gateway) }).await {
        Ok(n) if n > 0 => tracing::warn!(released = n, "released holds left open by a previous process"),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not sweep stale holds at start-up"),
    }

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(server::serve(listener, tls, gateway.clone(), limits, rx.clone())));
    let admin_gw = gateway.clone();
    tasks.push(tokio::spawn(server::serve_simple(
        admin_listener,
        move |req, _peer| {
            let gw = admin_gw.clone();
            async move { crate::admin::handle(gw, req).await }
        },
        rx.clone(),
    )));
    tasks.push(tokio::spawn(sweeper(gateway.clone(), rx)));
    tracing::info!(%addr, %admin_addr, "tollgate listening");
    Ok(Running { addr, admin_addr, gateway, shutdown: tx, tasks, _ledger_lock: ledger_lock })
}

/// An SQLite ledger belongs to one gateway: a second `run` on the same file would treat
/// the first one's holds as abandoned and release them at start-up. The lock is an
/// advisory file lock next to the database, freed by the kernel when the process dies
/// (so a restart after `kill -9` is never blocked). `tollgate keys` does not take it.
fn lock_single_replica_ledger(cfg: &Config) -> Result<Option<std::fs::File>, String> {
    if cfg.ledger.backend != LedgerBackend::Sqlite {
        return Ok(None);
    }
    let mut path = cfg.ledger.path.clone().into_os_string();
    path.push(".lock");
    let path = PathBuf::from(path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("ledger: cannot open lock file {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "ledger: {} is in use by another running tollgate; an SQLite ledger serves one gateway \
(stop the other, or use backend = \"postgres\" for several replicas)",
            cfg.ledger.path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(format!("ledger: cannot lock {}: {e}", path.display())),
    }
}

fn stale_after(gw: &Gateway) -> Duration {
    gw.snapshot().max_upstream_timeout() + STALE_HOLD_MARGIN
}

/// Every 30 s: release abandoned holds and forget expired x402 nonces.
async fn sweeper(gw: Gateway, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let ledger = &gw.shared.ledger;
        if let Err(e) = ledger.release_stale_holds(stale_after(&gw)).await {
            tracing::warn!(error = %e, "stale hold sweep failed");
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        if let Err(e) = ledger.purge_nonces(now).await {
            tracing::warn!(error = %e, "nonce purge failed");
        }
    }
}

/// The process signals tollgate handles. Install them *before* binding listeners:
/// a SIGHUP or SIGTERM that arrives between start-up and installation would otherwise
/// take its default action and kill the process.
#[derive(Debug)]
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// Runs until SIGTERM/SIGINT (then drains); SIGHUP reloads the config.
pub async fn run_until_signalled(running: Running, mut signals: Signals) {
    let gw = running.gateway.clone();
    let stop = running.shutdown_handle();
    let handler = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = signals.hup.recv() => {
                    tracing::info!("SIGHUP: reloading config");
                    let _ = gw.reload().await;
                }
                _ = signals.term.recv() => {
                    tracing::info!("SIGTERM: draining and shutting down");
                    let _ = stop.send(true);
                    return;
                }
                _ = signals.int.recv() => {
                    tracing::info!("SIGINT: draining and shutting down");
                    let _ = stop.send(true);
                    return;
                }
            }
        }
    });
    running.wait().await;
    handler.abort();
}
