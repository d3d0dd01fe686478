//! The route table: first match wins on (host, method, path).
//!
//! Matching uses a *normalised* path (RFC 3986 §6.2.2: percent-encoded unreserved
//! characters decoded, dot segments removed, repeated slashes merged) so that
//! `/v1/%63hat/x` or `/docs/../v1/chat/x` cannot slip past a priced route into a free
//! one. The path forwarded upstream is still the client's bytes, untouched.

use std::sync::Arc;

use http::Method;

use crate::config::{ChargeOn, Config, RouteConfig};
use crate::money::Micros;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    /// `/v1/*`: the prefix `/v1` itself and everything under `/v1/`.
    Prefix(String),
}

impl PathPattern {
    pub fn parse(p: &str) -> Result<PathPattern, String> {
        if !p.starts_with('/') {
            return Err(format!("{p:?} must start with '/'"));
        }
        if let Some(prefix) = p.strip_suffix("/*") {
            if prefix.contains('*') {
                return Err(format!("{p:?}: '*' is allowed only as a final \"/*\""));
            }
            return Ok(PathPattern::Prefix(prefix.to_owned()));
        }
        if p.contains('*') {
            return Err(format!("{p:?}: '*' is allowed only as a final \"/*\""));
        }
        Ok(PathPattern::Exact(p.to_owned()))
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(e) => e == path,
            PathPattern::Prefix(p) => {
                p.is_empty()
                    || (path.starts_with(p.as_str()) && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
        }
    }
}

/// A route as the request path sees it: config resolved, price parsed.
#[derive(Debug)]
pub struct Route {
    pub index: usize,
    pub name: Arc<str>,
    pub upstream: Arc<str>,
    pub host: Option<String>,
    pub path: PathPattern,
    pub methods: Vec<Method>,
    /// `None` for free routes.
    pub price: Option<Micros>,
    pub accept: Vec<String>,
    pub charge_on: ChargeOn,
    pub strip_prefix: Option<String>,
    pub config: RouteConfig,
}

impl Route {
    pub fn is_free(&self) -> bool {
        self.price.is_none()
    }

    fn matches(&self, host: Option<&str>, method: &Method, path: &str) -> bool {
        if let Some(h) = &self.host {
            match host {
                Some(req) if req.eq_ignore_ascii_case(h) => {}
                _ => return false,
            }
        }
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return false;
        }
        self.path.matches(path)
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table from a validated config.
    pub fn new(cfg: &Config) -> RouteTable {
        let routes = cfg
            .routes
            .iter()
            .enumerate()
            .map(|(index, r)| {
                Arc::new(Route {
                    index,
                    name: r.name.as_str().into(),
                    upstream: r.upstream.as_str().into(),
                    host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                    path: PathPattern::parse(&r.path).unwrap_or(PathPattern::Exact(r.path.clone())),
                    methods: r
                        .methods
                        .iter()
                        .filter_map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
                        .collect(),
                    price: r.price.as_deref().and_then(|p| Micros::parse(p).ok()),
                    accept: r.accept.clone(),
                    charge_on: r.charge_on,
                    strip_prefix: r.strip_prefix.clone(),
                    config: r.clone(),
                })
            })
            .collect();
        RouteTable { routes }
    }

    /// First route matching the request. `host` is the request's host without port.
    pub fn find(&self, host: Option<&str>, method: &Method, raw_path: &str) -> Option<&Arc<Route>> {
        let path = normalize_path(raw_path);
        self.routes.iter().find(|r| r.matches(host, method, &path))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

/// RFC 3986 normalisation for matching only (see module docs).
pub fn normalize_path(raw: &str) -> std::borrow::Cow<'_, str> {
    let needs = raw.contains('%') || raw.contains("/.") || raw.contains("//");
    if !needs {
        return std::borrow::Cow::Borrowed(raw);
    }
    // Decode unreserved characters, and `%2F` to `/`: an upstream that decodes it
    // before routing would otherwise serve `/v1/chat%2Fx` as `/v1/chat/x` while it
    // matched a free route here. Other reserved characters keep their encoding.
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = &raw[i + 1..i + 3];
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                    decoded.push(b as char);
                } else {
                    decoded.push('%');
                    decoded.push_str(&hex.to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i] as char);
        i += 1;
    }
    // Remove dot segments and empty segments.
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || (decoded.ends_with('/') && !path.ends_with('/')) {
        path.push('/');
    }
    std::borrow::Cow::Owned(path)
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

    #[test]
    fn normalisation_defeats_encoding_and_dot_tricks() {
        assert_eq!(normalize_path("/v1/%63hat/x"), "/v1/chat/x");
        assert_eq!(normalize_path("/docs/../v1/chat/x"), "/v1/chat/x");
        assert_eq!(normalize_path("/docs/%2e%2e/v1/chat"), "/v1/chat");
        assert_eq!(normalize_path("//v1//chat/"), "/v1/chat/");
        assert_eq!(normalize_path("/v1/chat%2Fcompletions"), "/v1/chat/completions");
        assert_eq!(normalize_path("/a/%3Fb"), "/a/%3Fb");
        assert_eq!(normalize_path("/../.."), "/");
        assert_eq!(normalize_path("/bad%zz"), "/bad%zz");
        assert_eq!(normalize_path("/end%4"), "/end%4");
        assert_eq!(normalize_path("/plain/path"), "/plain/path");
    }
}
