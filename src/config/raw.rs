//! What the file says: serde structs of strings and numbers, with the defaults of
//! the README's configuration reference. Nothing here is used past [`super::Config::parse`]; the typed sections
//! are built from these by each section's `parse`.
//!
//! `deny_unknown_fields` everywhere: a misspelt key is an error with its path.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::route::{ChargeOn, OnDisconnect};
use super::server::{LedgerBackend, LogConfig, Synchronous};
use crate::payment::rails::credits::config::RawCreditsConfig;
use crate::payment::rails::x402::config::RawX402Config;
use crate::selfservice::config::RawStripeConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub ledger: RawLedger,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RawRoute>,
    #[serde(default, rename = "model")]
    pub models: Vec<RawModel>,
    #[serde(default)]
    pub credits: RawCreditsConfig,
    pub x402: Option<RawX402Config>,
    pub stripe: Option<RawStripeConfig>,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    pub listen: String,
    pub public_url: Option<String>,
    pub tls: Option<RawTls>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: String,
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: String,
    #[serde(default = "defaults::http2_max_concurrent_streams")]
    pub http2_max_concurrent_streams: u32,
    #[serde(default = "defaults::shutdown_timeout")]
    pub shutdown_timeout: String,
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    #[serde(default = "defaults::admin_listen")]
    pub listen: String,
    pub token: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { listen: defaults::admin_listen(), token: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLedger {
    #[serde(default = "defaults::ledger_backend")]
    pub backend: LedgerBackend,
    #[serde(default = "defaults::ledger_path")]
    pub path: PathBuf,
    pub url: Option<String>,
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    #[serde(default = "defaults::statement_timeout")]
    pub statement_timeout: String,
    #[serde(default)]
    pub synchronous: Synchronous,
}

impl Default for RawLedger {
    fn default() -> Self {
        RawLedger {
            backend: defaults::ledger_backend(),
            path: defaults::ledger_path(),
            url: None,
            pool_size: defaults::pool_size(),
            statement_timeout: defaults::statement_timeout(),
            synchronous: Synchronous::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstream {
    pub name: String,
    pub url: String,
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: String,
    #[serde(default = "defaults::upstream_timeout")]
    pub timeout: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub ca: Option<PathBuf>,
    #[serde(default = "defaults::pool_idle_timeout")]
    pub pool_idle_timeout: String,
    #[serde(default = "defaults::pool_max_idle")]
    pub pool_max_idle: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub name: String,
    pub upstream: String,
    pub host: Option<String>,
    pub path: String,
    #[serde(default)]
    pub methods: Vec<String>,
    pub price: Option<String>,
    #[serde(default)]
    pub free: bool,
    #[serde(default)]
    pub accept: Vec<String>,
    #[serde(default)]
    pub charge_on: ChargeOn,
    pub rate_limit: Option<RawRateLimit>,
    pub strip_prefix: Option<String>,
    pub description: Option<String>,
    pub mime_type: Option<String>,
    #[serde(default = "defaults::upgrades")]
    pub upgrades: Vec<String>,
    pub meter: Option<String>,
    pub max_price: Option<String>,
    pub on_disconnect: Option<OnDisconnect>,
    pub max_request_bytes: Option<usize>,
    pub max_response_bytes: Option<usize>,
}

/// `[[model]]`: what a model's tokens cost, USD per 1M tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub name: String,
    pub input: String,
    pub cached_input: Option<String>,
    pub cache_write_input: Option<String>,
    pub output: String,
    pub max_output_tokens: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub per_key: Option<String>,
    pub per_ip: Option<String>,
    pub burst: Option<u32>,
}

mod defaults {
    use super::LedgerBackend;
    use std::path::PathBuf;
    pub(super) fn header_read_timeout() -> String {
        "10s".into()
    }
    pub(super) fn max_header_bytes() -> usize {
        16 * 1024
    }
    pub(super) fn max_connections() -> usize {
        10_000
    }
    pub(super) fn idle_timeout() -> String {
        "60s".into()
    }
    pub(super) fn http2_max_concurrent_streams() -> u32 {
        100
    }
    pub(super) fn shutdown_timeout() -> String {
        "30s".into()
    }
    pub(super) fn admin_listen() -> String {
        "127.0.0.1:9090".into()
    }
    pub(super) fn ledger_backend() -> LedgerBackend {
        LedgerBackend::Sqlite
    }
    pub(super) fn ledger_path() -> PathBuf {
        "tollgate.db".into()
    }
    pub(super) fn pool_size() -> usize {
        16
    }
    pub(super) fn statement_timeout() -> String {
        "2s".into()
    }
    pub(super) fn connect_timeout() -> String {
        "2s".into()
    }
    pub(super) fn upstream_timeout() -> String {
        "60s".into()
    }
    pub(super) fn pool_idle_timeout() -> String {
        "90s".into()
    }
    pub(super) fn pool_max_idle() -> usize {
        64
    }
    pub(super) fn upgrades() -> Vec<String> {
        vec!["websocket".into()]
    }
}
