//! The route table: first match wins on (host, method, path).
//!
//! Routing is fail-closed (the rule is written out in ARCHITECTURE.md):
//!
//! - the path is routed on, and forwarded in, its normal form ([`path::normalize`]);
//!   a path without a safe normal form is refused;
//! - it is matched again in its folded form ([`path::fold`]) against folded patterns:
//!   if that reaches a priced route the normal form did not, the request is priced
//!   there, and if the two readings reach two different priced routes, the request is
//!   refused as ambiguous;
//! - methods compare case-insensitively, and `HEAD` matches a route that lists `GET`
//!   (origins run the `GET` handler for it); hosts compare without case, port or
//!   trailing dot.

pub mod path;

use std::borrow::Cow;
use std::sync::Arc;

use http::Method;

pub use crate::config::PathPattern;
use crate::config::{ChargeOn, Config, Pricing, RateLimit};

/// A route as the request path sees it, built from its typed `[[route]]`.
#[derive(Debug)]
pub struct Route {
    pub index: usize,
    pub name: Arc<str>,
    pub upstream: Arc<str>,
    /// Lower case, without a trailing dot.
    pub host: Option<String>,
    pub path: PathPattern,
    /// The pattern's path folded (see [`path::fold`]).
    folded: PathPattern,
    pub methods: Vec<Method>,
    pub pricing: Pricing,
    /// Rail names, in the order offered.
    pub accept: Vec<&'static str>,
    pub charge_on: ChargeOn,
    pub rate_limit: Option<RateLimit>,
    pub strip_prefix: Option<String>,
    /// Shown to payers (402 page, x402 `description`).
    pub description: Option<String>,
    /// x402 `mimeType` of what the route returns.
    pub mime_type: Option<String>,
    /// `Upgrade` protocols passed through (lower case; never `h2c`).
    pub upgrades: Vec<String>,
}

impl Route {
    pub fn is_free(&self) -> bool {
        self.pricing.is_free()
    }

    /// Whether the route lets a request upgrade to `protocol` (an `Upgrade` token,
    /// e.g. `websocket` or `websocket/13`).
    pub fn allows_upgrade(&self, protocol: &str) -> bool {
        let name = protocol.split('/').next().unwrap_or_default().trim();
        !name.eq_ignore_ascii_case("h2c") && self.upgrades.iter().any(|u| u.eq_ignore_ascii_case(name))
    }

    fn matches_host_and_method(&self, host: Option<&str>, method: &Method) -> bool {
        if let Some(h) = &self.host {
            if host != Some(h.as_str()) {
                return false;
            }
        }
        self.methods.is_empty()
            || self.methods.iter().any(|m| {
                m == method
                    || (*m == Method::GET && *method == Method::HEAD)
                    || m.as_str().eq_ignore_ascii_case(method.as_str())
            })
    }
}

/// What routing decided about a request, in its extensions for the payment layer
/// and the forwarder.
#[derive(Debug)]
pub struct RequestCtx {
    pub request_id: String,
    pub route: Arc<Route>,
    pub client_ip: std::net::IpAddr,
}

/// Why a request has no route.
#[derive(Debug, thiserror::Error)]
pub enum Unroutable {
    #[error("no route matches")]
    NotFound,
    #[error("{0}")]
    BadPath(#[from] path::PathError),
    #[error("the path reads as route {0} to some servers and as route {1} to others")]
    Ambiguous(Arc<str>, Arc<str>),
}

/// A routed request: its route and the normal form of its path, to forward.
#[derive(Debug)]
pub struct Routed<'p> {
    pub route: Arc<Route>,
    pub path: Cow<'p, str>,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table from a config.
    pub fn new(cfg: &Config) -> RouteTable {
        let routes = cfg
            .routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let path = r.path.clone();
                let folded = match &path {
                    PathPattern::Exact(e) => PathPattern::Exact(path::fold_pattern(e)),
                    PathPattern::Prefix(p) => PathPattern::Prefix(path::fold_pattern(p)),
                };
                Arc::new(Route {
                    index,
                    name: r.name.as_str().into(),
                    upstream: r.upstream.as_str().into(),
                    host: r.host.as_deref().map(normalize_host),
                    path,
                    folded,
                    methods: r.methods.clone(),
                    pricing: r.pricing,
                    accept: r.accept.clone(),
                    charge_on: r.charge_on,
                    rate_limit: r.rate_limit,
                    strip_prefix: r.strip_prefix.clone(),
                    description: r.description.clone(),
                    mime_type: r.mime_type.clone(),
                    upgrades: r.upgrades.clone(),
                })
            })
            .collect();
        RouteTable { routes }
    }

    /// The route for a request (see the module docs). `host` is normalised by
    /// [`normalize_host`]; `method` is the request's, already canonical for the
    /// standard methods.
    pub fn resolve<'p>(
        &self,
        host: Option<&str>,
        method: &Method,
        raw_path: &'p str,
    ) -> Result<Routed<'p>, Unroutable> {
        let normal = path::normalize(raw_path)?;
        let folded = path::fold(&normal);
        let candidates = || self.routes.iter().filter(|r| r.matches_host_and_method(host, method));
        let exact = candidates().find(|r| r.path.matches(&normal));
        let wide =
            if folded == normal && exact.is_some() { exact } else { candidates().find(|r| r.folded.matches(&folded)) };
        let route = match (exact, wide) {
            (Some(a), Some(b)) if !Arc::ptr_eq(a, b) && !a.is_free() && !b.is_free() => {
                return Err(Unroutable::Ambiguous(a.name.clone(), b.name.clone()))
            }
            (Some(a), _) if !a.is_free() => a,
            (_, Some(b)) if !b.is_free() => b,
            (Some(a), _) => a,
            (None, _) => return Err(Unroutable::NotFound),
        };
        Ok(Routed { route: route.clone(), path: normal })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

/// A host as routes compare it: lower case, without port or trailing dot(s).
pub fn normalize_host(raw: &str) -> String {
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        },
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_matches_on_segment_boundaries() {
        let p = PathPattern::parse("/v1/chat/*").unwrap();
        assert!(p.matches("/v1/chat"));
        assert!(p.matches("/v1/chat/"));
        assert!(p.matches("/v1/chat/completions"));
        assert!(!p.matches("/v1/chatty"));
        assert!(!p.matches("/v1"));
        let all = PathPattern::parse("/*").unwrap();
        assert!(all.matches("/"));
        assert!(all.matches("/anything/at/all"));
    }

    #[test]
    fn exact_matches_only_itself() {
        let p = PathPattern::parse("/health").unwrap();
        assert!(p.matches("/health"));
        assert!(!p.matches("/health/"));
        assert!(!p.matches("/healthz"));
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(PathPattern::parse("v1/*").is_err());
        assert!(PathPattern::parse("/v1/*/x").is_err());
        assert!(PathPattern::parse("/v1*").is_err());
    }
}
