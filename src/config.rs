//! Configuration: one TOML file (DESIGN §3).
//!
//! Loading happens in three passes so that one run reports every problem, the way
//! linkerd's `env.rs` and pingora's `validate()` do:
//!
//! 1. TOML syntax, then `${ENV}` expansion in every string value (all missing
//!    variables are reported, each with its key path);
//! 2. structure: serde with `deny_unknown_fields`, errors carry their key path;
//! 3. meaning: [`Config::validate`] checks references, durations, prices, addresses
//!    and collects every error as `key.path: message`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::money::Micros;

/// Every problem found in a config file, each with the key path it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// === raw model (what the file says) ===

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub ledger: LedgerConfig,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub credits: CreditsConfig,
    pub x402: Option<X402Config>,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    pub public_url: Option<String>,
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Time a client has to send a complete request head.
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: String,
    /// Largest request head accepted; larger is answered with 431.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// A client connection with no request in flight for this long is closed
    /// (HTTP/2: GOAWAY, then close), so idle clients cannot keep connection slots.
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: String,
    /// Requests one HTTP/2 connection may have in flight at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`, RFC 9113 §6.5.2).
    #[serde(default = "defaults::http2_max_concurrent_streams")]
    pub http2_max_concurrent_streams: u32,
    /// How long SIGTERM waits for in-flight requests before closing connections.
    #[serde(default = "defaults::shutdown_timeout")]
    pub shutdown_timeout: String,
    /// Tokio worker threads; default is one per core.
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "defaults::admin_listen")]
    pub listen: String,
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: defaults::admin_listen(), token: None }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LedgerBackend {
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    #[serde(default = "defaults::ledger_backend")]
    pub backend: LedgerBackend,
    #[serde(default = "defaults::ledger_path")]
    pub path: PathBuf,
    pub url: Option<String>,
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    #[serde(default = "defaults::statement_timeout")]
    pub statement_timeout: String,
    /// SQLite durability: "normal" survives a killed process (every acknowledged
    /// transaction is in the WAL); "full" also survives power loss, at an fsync per batch.
    #[serde(default)]
    pub synchronous: Synchronous,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Normal,
    Full,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
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
pub struct UpstreamConfig {
    pub name: String,
    pub url: String,
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: String,
    /// Time to the upstream's response head.
    #[serde(default = "defaults::upstream_timeout")]
    pub timeout: String,
    /// Headers added to every request sent to this upstream (e.g. its API key).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// PEM file of CA certificates to trust instead of the web PKI roots.
    pub ca: Option<PathBuf>,
    #[serde(default = "defaults::pool_idle_timeout")]
    pub pool_idle_timeout: String,
    #[serde(default = "defaults::pool_max_idle")]
    pub pool_max_idle: usize,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChargeOn {
    /// Charge when the upstream answered with a status below 500.
    #[default]
    Success,
    /// Charge whenever the upstream answered at all.
    Always,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
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
    pub rate_limit: Option<RateLimitConfig>,
    /// Removed from the start of the path before forwarding (e.g. "/api").
    pub strip_prefix: Option<String>,
    /// Shown to payers (402 page, x402 `description`).
    pub description: Option<String>,
    /// x402 `mimeType` of what the route returns.
    pub mime_type: Option<String>,
    /// `Upgrade` protocols passed through to the upstream (default: WebSocket). Any
    /// other upgrade request is forwarded as a plain request without its `Upgrade`.
    #[serde(default = "defaults::upgrades")]
    pub upgrades: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub per_key: Option<String>,
    pub per_ip: Option<String>,
    pub burst: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsConfig {
    #[serde(default = "defaults::credits_header")]
    pub header: String,
    pub topup_url: Option<String>,
    pub spend_cap: Option<String>,
}

impl Default for CreditsConfig {
    fn default() -> Self {
        CreditsConfig { header: defaults::credits_header(), topup_url: None, spend_cap: None }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SettleMode {
    #[default]
    AfterUpstream,
    BeforeUpstream,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X402Config {
    pub facilitator: String,
    pub network: String,
    pub asset: String,
    #[serde(default = "defaults::asset_name")]
    pub asset_name: String,
    #[serde(default = "defaults::asset_version")]
    pub asset_version: String,
    pub pay_to: String,
    #[serde(default = "defaults::max_timeout_seconds")]
    pub max_timeout_seconds: u64,
    #[serde(default)]
    pub settle: SettleMode,
    /// Token symbol used in money headers (`0.01 USDC`).
    #[serde(default = "defaults::asset_symbol")]
    pub asset_symbol: String,
    /// Extra headers sent to the facilitator (hosted facilitators need auth).
    #[serde(default)]
    pub facilitator_headers: BTreeMap<String, String>,
    #[serde(default = "defaults::facilitator_timeout")]
    pub facilitator_timeout: String,
    /// Further offers (e.g. a second network) besides the one above.
    #[serde(default, rename = "offer")]
    pub offers: Vec<X402Offer>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X402Offer {
    pub network: String,
    pub asset: String,
    #[serde(default = "defaults::asset_name")]
    pub asset_name: String,
    #[serde(default = "defaults::asset_version")]
    pub asset_version: String,
    pub pay_to: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// `RUST_LOG`-style filter; the `RUST_LOG` variable wins when set.
    pub filter: Option<String>,
}

mod defaults {
    use super::LedgerBackend;
    use std::path::PathBuf;
    pub fn header_read_timeout() -> String {
        "10s".into()
    }
    pub fn max_header_bytes() -> usize {
        16 * 1024
    }
    pub fn max_connections() -> usize {
        10_000
    }
    pub fn idle_timeout() -> String {
        "60s".into()
    }
    pub fn http2_max_concurrent_streams() -> u32 {
        100
    }
    pub fn shutdown_timeout() -> String {
        "30s".into()
    }
    pub fn admin_listen() -> String {
        "127.0.0.1:9090".into()
    }
    pub fn ledger_backend() -> LedgerBackend {
        LedgerBackend::Sqlite
    }
    pub fn ledger_path() -> PathBuf {
        "tollgate.db".into()
    }
    pub fn pool_size() -> usize {
        16
    }
    pub fn statement_timeout() -> String {
        "2s".into()
    }
    pub fn connect_timeout() -> String {
        "2s".into()
    }
    pub fn upstream_timeout() -> String {
        "60s".into()
    }
    pub fn pool_idle_timeout() -> String {
        "90s".into()
    }
    pub fn pool_max_idle() -> usize {
        64
    }
    pub fn credits_header() -> String {
        "Authorization".into()
    }
    pub fn upgrades() -> Vec<String> {
        vec!["websocket".into()]
    }
    pub fn asset_name() -> String {
        "USDC".into()
    }
    pub fn asset_version() -> String {
        "2".into()
    }
    pub fn asset_symbol() -> String {
        "USDC".into()
    }
    pub fn max_timeout_seconds() -> u64 {
        60
    }
    pub fn facilitator_timeout() -> String {
        "10s".into()
    }
}

// === loading ===

impl Config {
    /// Reads, expands, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())]))?;
        let cfg = Config::parse(&text, |k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text, expanding `${VAR}` and `${VAR:-default}` in string values with `env`.
    /// Does not validate.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![format!("syntax: {}", e.to_string().trim())]))?;
        let mut errors = Vec::new();
        expand_env(&mut value, &mut String::new(), &env, &mut errors);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let msg = e.into_inner().to_string();
            let msg = msg.trim();
            ConfigErrors(vec![if path == "." { msg.to_owned() } else { format!("{path}: {msg}") }])
        })
    }

    /// Checks everything serde cannot: references, formats, ranges. Collects every error.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errs = Vec::new();
        let mut err = |path: String, msg: String| errs.push(format!("{path}: {msg}"));

        // server
        if let Err(e) = self.server.listen.parse::<SocketAddr>() {
            err(
                "server.listen".into(),
                format!("{:?} is not an address like \"0.0.0.0:8080\" ({e})", self.server.listen),
            );
        }
        if let Some(u) = &self.server.public_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) || u.parse::<http::Uri>().is_err() {
                err("server.public_url".into(), format!("{u:?} is not an http(s) URL"));
            }
        }
        for (i, p) in self.server.trusted_proxies.iter().enumerate() {
            if parse_net(p).is_none() {
                err(format!("server.trusted_proxies[{i}]"), format!("{p:?} is not an IP address or CIDR block"));
            }
        }
        check_duration(&mut err, "server.header_read_timeout", &self.server.header_read_timeout);
        check_duration(&mut err, "server.shutdown_timeout", &self.server.shutdown_timeout);
        match parse_duration(&self.server.idle_timeout) {
            Ok(d) if d.is_zero() => err("server.idle_timeout".into(), "must be above zero".into()),
            Ok(_) => {}
            Err(e) => err("server.idle_timeout".into(), e),
        }
        if self.server.max_header_bytes < 8192 {
            err("server.max_header_bytes".into(), "must be at least 8192".into());
        }
        if self.server.max_connections == 0 {
            err("server.max_connections".into(), "must be at least 1".into());
        }
        if self.server.http2_max_concurrent_streams == 0 {
            err("server.http2_max_concurrent_streams".into(), "must be at least 1".into());
        }
        if self.server.worker_threads == Some(0) {
            err("server.worker_threads".into(), "must be at least 1".into());
        }
        if let Some(tls) = &self.server.tls {
            for (k, p) in [("cert", &tls.cert), ("key", &tls.key)] {
                if !p.exists() {
                    err(format!("server.tls.{k}"), format!("file {} does not exist", p.display()));
                }
            }
        }

        // admin
        if let Err(e) = self.admin.listen.parse::<SocketAddr>() {
            err("admin.listen".into(), format!("{:?} is not an address ({e})", self.admin.listen));
        }
        if let Some(t) = &self.admin.token {
            if t.len() < 16 {
                err("admin.token".into(), "must be at least 16 characters".into());
            }
        }

        // ledger
        check_duration(&mut err, "ledger.statement_timeout", &self.ledger.statement_timeout);
        if self.ledger.backend == LedgerBackend::Postgres {
            match &self.ledger.url {
                None => err("ledger.url".into(), "required when backend = \"postgres\"".into()),
                Some(u) if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) => {
                    err("ledger.url".into(), "must start with postgres://".into())
                }
                _ => {}
            }
        }
        if self.ledger.pool_size == 0 {
            err("ledger.pool_size".into(), "must be at least 1".into());
        }

        // upstreams
        let mut upstream_names = HashSet::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            let at = format!("upstream[{i}]");
            if u.name.is_empty() {
                err(format!("{at}.name"), "must not be empty".into());
            } else if !upstream_names.insert(u.name.as_str()) {
                err(format!("{at}.name"), format!("duplicate upstream name {:?}", u.name));
            }
            match u.url.parse::<http::Uri>() {
                Ok(uri) if matches!(uri.scheme_str(), Some("http") | Some("https")) && uri.host().is_some() => {
                    if uri.query().is_some() {
                        err(format!("{at}.url"), "must not carry a query".into());
                    }
                }
                _ => err(format!("{at}.url"), format!("{:?} is not an http(s) URL with a host", u.url)),
            }
            check_duration(&mut err, &format!("{at}.connect_timeout"), &u.connect_timeout);
            check_duration(&mut err, &format!("{at}.timeout"), &u.timeout);
            check_duration(&mut err, &format!("{at}.pool_idle_timeout"), &u.pool_idle_timeout);
            for (k, v) in &u.headers {
                if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                    err(format!("{at}.headers.{k}"), "is not a valid header name".into());
                }
                if http::HeaderValue::from_str(v).is_err() {
                    err(format!("{at}.headers.{k}"), "value is not a valid header value".into());
                }
            }
            if let Some(ca) = &u.ca {
                if !ca.exists() {
                    err(format!("{at}.ca"), format!("file {} does not exist", ca.display()));
                }
            }
        }

        // routes
        let mut route_names = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let at = format!("route[{i}]");
            if r.name.is_empty() {
                err(format!("{at}.name"), "must not be empty".into());
            } else if !route_names.insert(r.name.as_str()) {
                err(format!("{at}.name"), format!("duplicate route name {:?}", r.name));
            } else if !r.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                err(format!("{at}.name"), "may contain only letters, digits, '-', '_' and '.'".into());
            }
            if !upstream_names.contains(r.upstream.as_str()) {
                err(format!("{at}.upstream"), format!("no upstream named {:?}", r.upstream));
            }
            if let Err(e) = crate::route::PathPattern::parse(&r.path) {
                err(format!("{at}.path"), e);
            }
            for (j, m) in r.methods.iter().enumerate() {
                if http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()).is_err() {
                    err(format!("{at}.methods[{j}]"), format!("{m:?} is not an HTTP method"));
                }
            }
            for (j, u) in r.upgrades.iter().enumerate() {
                if u.eq_ignore_ascii_case("h2c") {
                    err(
                        format!("{at}.upgrades[{j}]"),
                        "h2c upgrades are never forwarded: they would tunnel HTTP/2 past the gateway".into(),
                    );
                } else if u.is_empty() || !u.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                    err(format!("{at}.upgrades[{j}]"), format!("{u:?} is not an upgrade protocol name"));
                }
            }
            if let Some(h) = &r.host {
                if h.is_empty() || h.contains(['/', ' ', '@']) {
                    err(format!("{at}.host"), format!("{h:?} is not a host name"));
                }
            }
            if let Some(p) = &r.strip_prefix {
                if !p.starts_with('/') {
                    err(format!("{at}.strip_prefix"), "must start with '/'".into());
                }
            }
            match (&r.price, r.free) {
                (Some(_), true) => err(format!("{at}.free"), "a route cannot be free and have a price".into()),
                (None, false) => err(format!("{at}.price"), "required unless free = true".into()),
                (Some(p), false) => match Micros::parse(p) {
                    Ok(m) if m.get() == 0 => err(format!("{at}.price"), "must be above zero (use free = true)".into()),
                    Ok(_) => {}
                    Err(e) => err(format!("{at}.price"), e.to_string()),
                },
                (None, true) => {}
            }
            if r.free && !r.accept.is_empty() {
                err(format!("{at}.accept"), "a free route accepts no payment".into());
            }
            if !r.free && r.accept.is_empty() {
                err(format!("{at}.accept"), "name at least one rail: \"credits\" or \"x402\"".into());
            }
            let mut seen = HashSet::new();
            for (j, a) in r.accept.iter().enumerate() {
                match a.as_str() {
                    "credits" => {}
                    "x402" if self.x402.is_none() => {
                        err(format!("{at}.accept[{j}]"), "\"x402\" needs an [x402] section".into())
                    }
                    "x402" => {}
                    other => err(format!("{at}.accept[{j}]"), format!("unknown rail {other:?} (known: credits, x402)")),
                }
                if !seen.insert(a) {
                    err(format!("{at}.accept[{j}]"), format!("{a:?} listed twice"));
                }
            }
            if let Some(rl) = &r.rate_limit {
                for (k, v) in [("per_key", &rl.per_key), ("per_ip", &rl.per_ip)] {
                    if let Some(v) = v {
                        if let Err(e) = parse_rate(v) {
                            err(format!("{at}.rate_limit.{k}"), e);
                        }
                    }
                }
                if rl.burst == Some(0) {
                    err(format!("{at}.rate_limit.burst"), "must be at least 1".into());
                }
            }
        }

        // credits
        if http::HeaderName::from_bytes(self.credits.header.as_bytes()).is_err() {
            err("credits.header".into(), format!("{:?} is not a valid header name", self.credits.header));
        }
        if let Some(cap) = &self.credits.spend_cap {
            if let Err(e) = parse_spend_cap(cap) {
                err("credits.spend_cap".into(), e);
            }
        }

        // x402
        if let Some(x) = &self.x402 {
            if !(x.facilitator.starts_with("http://") || x.facilitator.starts_with("https://")) {
                err("x402.facilitator".into(), format!("{:?} is not an http(s) URL", x.facilitator));
            }
            check_duration(&mut err, "x402.facilitator_timeout", &x.facilitator_timeout);
            let mut check_offer = |at: &str, network: &str, asset: &str, pay_to: Option<&str>| {
                if evm_chain_id(network).is_none() {
                    err(
                        format!("{at}.network"),
                        format!("{network:?} is not a CAIP-2 EVM network like \"eip155:84532\""),
                    );
                }
                if !is_evm_address(asset) {
                    err(format!("{at}.asset"), format!("{asset:?} is not a 0x-prefixed 20-byte address"));
                }
                if let Some(p) = pay_to {
                    if !is_evm_address(p) {
                        err(format!("{at}.pay_to"), format!("{p:?} is not a 0x-prefixed 20-byte address"));
                    }
                }
            };
            check_offer("x402", &x.network, &x.asset, Some(&x.pay_to));
            for (i, o) in x.offers.iter().enumerate() {
                check_offer(&format!("x402.offer[{i}]"), &o.network, &o.asset, o.pay_to.as_deref());
            }
            if x.max_timeout_seconds == 0 {
                err("x402.max_timeout_seconds".into(), "must be at least 1".into());
            }
            for k in x.facilitator_headers.keys() {
                if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                    err(format!("x402.facilitator_headers.{k}"), "is not a valid header name".into());
                }
            }
        }

        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errs))
        }
    }

    /// The public base URL used in problem `type` links and x402 `resource`s.
    pub fn public_base(&self) -> String {
        match &self.server.public_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let scheme = if self.server.tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{}", self.server.listen)
            }
        }
    }
}

fn check_duration(err: &mut impl FnMut(String, String), path: &str, v: &str) {
    if let Err(e) = parse_duration(v) {
        err(path.to_owned(), e);
    }
}

/// Parses a human duration such as `"2s"`, `"150ms"`, `"1m 30s"`.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v).map_err(|e| format!("{v:?} is not a duration like \"2s\" or \"500ms\" ({e})"))
}

/// A validated config's duration; only call after `validate()` succeeded.
pub fn duration(v: &str) -> Duration {
    parse_duration(v).unwrap_or(Duration::from_secs(1))
}

/// Parses an IP address or CIDR block.
pub fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>().ok().or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Parses a rate such as `"10/s"`, `"100/min"`, `"5000/hour"` into (count, period).
pub fn parse_rate(v: &str) -> Result<(u32, Duration), String> {
    let bad = || format!("{v:?} is not a rate like \"10/s\", \"100/min\" or \"1000/hour\"");
    let (n, per) = v.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(format!("{v:?}: the count must be at least 1"));
    }
    let period = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        _ => return Err(bad()),
    };
    Ok((n, period))
}

/// Parses a spend cap such as `"25.00/day"` or `"2/hour"`.
pub fn parse_spend_cap(v: &str) -> Result<(Micros, Duration), String> {
    let bad = || format!("{v:?} is not a spend cap like \"25.00/day\" or \"2.50/hour\"");
    let (amt, per) = v.split_once('/').ok_or_else(bad)?;
    let amt = Micros::parse(amt).map_err(|e| format!("{v:?}: {e}"))?;
    let period = match per.trim() {
        "hour" => Duration::from_secs(3600),
        "day" => Duration::from_secs(86_400),
        _ => return Err(bad()),
    };
    Ok((amt, period))
}

/// The EVM chain id of a CAIP-2 `eip155:<id>` network.
pub fn evm_chain_id(network: &str) -> Option<u64> {
    network.strip_prefix("eip155:")?.parse().ok()
}

pub fn is_evm_address(s: &str) -> bool {
    s.len() == 42 && s.starts_with("0x") && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

// === ${ENV} expansion ===

fn expand_env(v: &mut toml::Value, path: &mut String, env: &impl Fn(&str) -> Option<String>, errors: &mut Vec<String>) {
    match v {
        toml::Value::String(s) if s.contains("${") => match expand_str(s, env) {
            Ok(x) => *s = x,
            Err(e) => errors.push(format!("{path}: {e}")),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(item, path, env, errors);
                path.truncate(len);
            }
        }
        toml::Value::Table(t) => {
            for (k, item) in t.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                expand_env(item, path, env, errors);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn expand_str(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| "unclosed \"${\" in value".to_owned())?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("{inner:?} is not an environment variable name"));
        }
        match (env(name), default) {
            (Some(v), _) if !v.is_empty() || default.is_none() => out.push_str(&v),
            (_, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {name} is not set")),
            (Some(v), None) => out.push_str(&v),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests;
