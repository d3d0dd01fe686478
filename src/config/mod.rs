//! Configuration: one TOML file, parsed once into types (see ARCHITECTURE.md, "Config").
//!
//! Loading happens in three passes so that one run reports every problem, the way
//! linkerd's `env.rs` and pingora's `validate()` do:
//!
//! 1. TOML syntax, then `${ENV}` expansion in every string value (`expand.rs`; all
//!    missing variables are reported, each with its key path);
//! 2. structure: serde with `deny_unknown_fields` into the `raw.rs` structs, errors
//!    carry their key path;
//! 3. meaning: each section's `parse` turns its raw strings into typed values
//!    (durations, money, addresses, header names, path patterns, a [`Pricing`]) and
//!    pushes every problem as `key.path: message`. A rail's section is parsed by the
//!    rail's own `config` module; a route's `accept` list is checked against
//!    [`crate::payment::rails::KNOWN`].
//!
//! A [`Config`] exists only when all three passes succeeded: nothing downstream parses
//! a config string again or falls back on a default for a bad one.

mod expand;
mod model;
pub(crate) mod raw;
pub mod route;
pub mod server;
pub mod upstream;
pub mod values;

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

pub use self::route::{ChargeOn, MeterPlan, OnDisconnect, PathPattern, Pricing, RateLimit, RouteConfig};
pub use self::server::{
    AdminConfig, LedgerBackend, LedgerConfig, LogConfig, LogFormat, ServerConfig, Synchronous, TlsConfig,
};
pub use self::upstream::UpstreamConfig;
pub use self::values::{parse_duration, parse_net, parse_rate, HttpUrl, Rate};
pub use crate::payment::rails::credits::config::{parse_spend_cap, CreditsConfig, SpendCap};
pub use crate::payment::rails::x402::config::{evm_chain_id, OfferConfig, SettleMode, X402Config};
pub use crate::selfservice::config::StripeConfig;

use self::raw::RawConfig;
use self::route::RouteContext;
use self::values::Problems;
use crate::meter::ModelPrice;

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

/// A checked config: every value parsed, every reference resolved.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub ledger: LedgerConfig,
    pub upstreams: Vec<UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    /// `[[model]]`: token prices of metered routes, in file order.
    pub models: Vec<ModelPrice>,
    pub credits: CreditsConfig,
    pub x402: Option<X402Config>,
    /// Customer top-ups by card; `None` without a `[stripe]` section.
    pub stripe: Option<StripeConfig>,
    pub log: LogConfig,
}

// === loading ===

impl Config {
    /// Reads, expands and parses a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())]))?;
        Config::parse(&text, |k| std::env::var(k).ok())
    }

    /// Parses TOML text, expanding `${VAR}` and `${VAR:-default}` in string values with
    /// `env`, and checks everything: the result holds only valid, typed values.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        let mut value: toml::Value =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![format!("syntax: {}", e.to_string().trim())]))?;
        let mut errors = Vec::new();
        expand::expand_env(&mut value, &mut String::new(), &env, &mut errors);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        let sections: HashSet<String> = value.as_table().map(|t| t.keys().cloned().collect()).unwrap_or_default();
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let msg = e.into_inner().to_string();
            let msg = msg.trim();
            ConfigErrors(vec![if path == "." { msg.to_owned() } else { format!("{path}: {msg}") }])
        })?;
        let mut problems = Problems::default();
        match Config::from_raw(raw, &sections, &mut problems) {
            Some(cfg) if problems.is_empty() => Ok(cfg),
            _ => Err(ConfigErrors(problems.into_vec())),
        }
    }

    /// Every section in file order, so errors come out in the order a reader meets them.
    fn from_raw(raw: RawConfig, sections: &HashSet<String>, p: &mut Problems) -> Option<Config> {
        let server = ServerConfig::parse(raw.server, p);
        let admin = AdminConfig::parse(raw.admin, p);
        let ledger = LedgerConfig::parse(raw.ledger, p);
        let mut upstream_names = HashSet::new();
        let upstreams = UpstreamConfig::parse_all(&raw.upstreams, &mut upstream_names, p);
        let cx = RouteContext {
            upstreams: &upstream_names,
            rails: crate::payment::rails::KNOWN,
            sections,
            has_models: !raw.models.is_empty(),
        };
        let routes = RouteConfig::parse_all(raw.routes, &cx, p);
        let models = model::parse_all(raw.models, p);
        let credits = CreditsConfig::parse(raw.credits, p);
        let x402 = match raw.x402 {
            None => Some(None),
            Some(x) => X402Config::parse(x, p).map(Some),
        };
        let stripe = match raw.stripe {
            None => Some(None),
            Some(s) => StripeConfig::parse(s, p).map(Some),
        };
        let mut cfg = Config {
            server: server?,
            admin: admin?,
            ledger: ledger?,
            upstreams: upstreams?,
            routes: routes?,
            models: models?,
            credits: credits?,
            x402: x402?,
            stripe: stripe?,
            log: raw.log,
        };
        // With Stripe set up, a customer tops up at tollgate's own endpoint unless the
        // operator named another page.
        if cfg.stripe.is_some() && cfg.credits.topup_url.is_none() {
            cfg.credits.topup_url = Some(format!("{}{}", cfg.public_base(), crate::selfservice::TOPUP_PATH));
        }
        Some(cfg)
    }

    /// The public base URL used in problem `type` links and x402 `resource`s.
    pub fn public_base(&self) -> String {
        match &self.server.public_url {
            Some(u) => u.as_str().trim_end_matches('/').to_owned(),
            None => {
                let scheme = if self.server.tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{}", self.server.listen)
            }
        }
    }
}

#[cfg(test)]
mod tests;
