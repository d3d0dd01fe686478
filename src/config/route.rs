//! `[[route]]`: what is matched, where it goes, and what it costs.
//!
//! The path pattern type lives here, not in `crate::route`, so that the route table
//! depends on the config and never the other way round.

use std::collections::HashSet;
use std::fmt;

use http::Method;
use serde::Deserialize;

use super::raw::{RawRateLimit, RawRoute};
use super::values::{parse_rate, Problems, Rate};
use crate::meter::Meter;
use crate::money::Micros;
use crate::payment::rails::RailSpec;

// === PathPattern ===

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

/// As written in the config: `/docs/*`, `/health`.
impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathPattern::Exact(e) => f.write_str(e),
            PathPattern::Prefix(p) => write!(f, "{p}/*"),
        }
    }
}

// === Pricing ===

/// What a request on a route costs. Every priced variant is charged through the
/// route's `accept` rails.
///
/// Code that charges matches on the variant rather than asking for an amount: a
/// metered request's amount is known only once its response is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pricing {
    /// `free = true`: no payment is asked for or read.
    Free,
    /// `price = "0.002"`: the same amount for every request, above zero.
    Fixed(Micros),
    /// `meter = "openai-chat"`: the tokens the upstream reports, priced by `[[model]]`.
    Metered(MeterPlan),
}

impl Pricing {
    pub fn is_free(&self) -> bool {
        matches!(self, Pricing::Free)
    }

    /// The amount held before forwarding, when it is the same for every request:
    /// `None` for free and metered routes.
    pub fn price(&self) -> Option<Micros> {
        match self {
            Pricing::Free | Pricing::Metered(_) => None,
            Pricing::Fixed(m) => Some(*m),
        }
    }
}

/// A metered route's keys: how usage is read and what bounds a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeterPlan {
    pub meter: Meter,
    /// `price`: a fixed part added to every request's metered part (zero if unset).
    pub fixed: Micros,
    /// `max_price`: the most one request is held (and so charged).
    pub max_price: Option<Micros>,
    pub on_disconnect: OnDisconnect,
    /// Longest request body read to find the model (413 above it).
    pub max_request_bytes: usize,
    /// Longest non-streamed response body read to find the usage.
    pub max_response_bytes: usize,
}

/// `on_disconnect`: what a metered stream does when its client leaves.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnDisconnect {
    /// Read the upstream to its end and charge the usage it reports (providers bill the
    /// whole generation).
    #[default]
    Finish,
    /// Cancel the upstream request and charge the input and the output delivered.
    Stop,
}

pub const DEFAULT_MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChargeOn {
    /// Charge when the upstream answered with a status below 500.
    #[default]
    Success,
    /// Charge whenever the upstream answered at all.
    Always,
}

/// `rate_limit = { per_key = "10/s", per_ip = "100/min", burst = 20 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_key: Option<Rate>,
    pub per_ip: Option<Rate>,
    /// At least 1 when set.
    pub burst: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    /// The name of an `[[upstream]]` that exists.
    pub upstream: String,
    pub host: Option<String>,
    pub path: PathPattern,
    /// Upper case; empty means any method.
    pub methods: Vec<Method>,
    pub pricing: Pricing,
    /// Names of configured rails, in the order offered; empty exactly when free.
    pub accept: Vec<&'static str>,
    pub charge_on: ChargeOn,
    pub rate_limit: Option<RateLimit>,
    /// Removed from the start of the path before forwarding (e.g. "/api").
    pub strip_prefix: Option<String>,
    /// Shown to payers (402 page, x402 `description`).
    pub description: Option<String>,
    /// x402 `mimeType` of what the route returns.
    pub mime_type: Option<String>,
    /// `Upgrade` protocols passed through to the upstream, lower case, never `h2c`.
    /// Any other upgrade request is forwarded as a plain request without its `Upgrade`.
    pub upgrades: Vec<String>,
}

/// What a route's references are checked against.
pub(super) struct RouteContext<'a> {
    pub upstreams: &'a HashSet<&'a str>,
    /// Every rail the build knows.
    pub rails: &'a [RailSpec],
    /// The top-level sections present in the file (a rail may need its own).
    pub sections: &'a HashSet<String>,
    /// Whether any `[[model]]` is configured (a metered route needs one).
    pub has_models: bool,
}

impl RouteConfig {
    pub(super) fn parse_all(raw: Vec<RawRoute>, cx: &RouteContext<'_>, p: &mut Problems) -> Option<Vec<RouteConfig>> {
        let mut names = HashSet::new();
        let parsed: Vec<_> =
            raw.into_iter().enumerate().map(|(i, r)| RouteConfig::parse(i, r, &mut names, cx, p)).collect();
        parsed.into_iter().collect()
    }

    fn parse(
        i: usize,
        r: RawRoute,
        names: &mut HashSet<String>,
        cx: &RouteContext<'_>,
        p: &mut Problems,
    ) -> Option<RouteConfig> {
        let at = format!("route[{i}]");
        let before = p.len();
        if r.name.is_empty() {
            p.push(format_args!("{at}.name"), "must not be empty");
        } else if !names.insert(r.name.clone()) {
            p.push(format_args!("{at}.name"), format_args!("duplicate route name {:?}", r.name));
        } else if !r.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            p.push(format_args!("{at}.name"), "may contain only letters, digits, '-', '_' and '.'");
        }
        if !cx.upstreams.contains(r.upstream.as_str()) {
            p.push(format_args!("{at}.upstream"), format_args!("no upstream named {:?}", r.upstream));
        }
        let path = p.check(format_args!("{at}.path"), PathPattern::parse(&r.path));
        let methods: Vec<_> = r
            .methods
            .iter()
            .enumerate()
            .map(|(j, m)| {
                p.check(
                    format_args!("{at}.methods[{j}]"),
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| format!("{m:?} is not an HTTP method")),
                )
            })
            .collect();
        for (j, u) in r.upgrades.iter().enumerate() {
            if u.eq_ignore_ascii_case("h2c") {
                p.push(
                    format_args!("{at}.upgrades[{j}]"),
                    "h2c upgrades are never forwarded: they would tunnel HTTP/2 past the gateway",
                );
            } else if u.is_empty() || !u.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
                p.push(format_args!("{at}.upgrades[{j}]"), format_args!("{u:?} is not an upgrade protocol name"));
            }
        }
        if let Some(h) = &r.host {
            if h.is_empty() || h.contains(['/', ' ', '@']) {
                p.push(format_args!("{at}.host"), format_args!("{h:?} is not a host name"));
            }
        }
        if let Some(s) = &r.strip_prefix {
            if !s.starts_with('/') {
                p.push(format_args!("{at}.strip_prefix"), "must start with '/'");
            }
        }
        let pricing = match &r.meter {
            None => {
                let metered_only = [
                    ("max_price", r.max_price.is_some()),
                    ("on_disconnect", r.on_disconnect.is_some()),
                    ("max_request_bytes", r.max_request_bytes.is_some()),
                    ("max_response_bytes", r.max_response_bytes.is_some()),
                ];
                for (key, set) in metered_only {
                    if set {
                        p.push(format_args!("{at}.{key}"), "applies only to metered routes (set meter)");
                    }
                }
                parse_pricing(&at, r.price.as_deref(), r.free, p)
            }
            Some(m) => parse_meter(&at, m, &r, cx, p),
        };
        let metered = matches!(pricing, Some(Pricing::Metered(_)));
        let accept = parse_accept(&at, &r.accept, r.free, metered, cx, p);
        let rate_limit = match &r.rate_limit {
            None => Some(None),
            Some(rl) => parse_rate_limit(&at, rl, p).map(Some),
        };
        if p.len() != before {
            return None;
        }
        Some(RouteConfig {
            name: r.name,
            upstream: r.upstream,
            host: r.host,
            path: path?,
            methods: methods.into_iter().collect::<Option<_>>()?,
            pricing: pricing?,
            accept: accept?,
            charge_on: r.charge_on,
            rate_limit: rate_limit?,
            strip_prefix: r.strip_prefix,
            description: r.description,
            mime_type: r.mime_type,
            upgrades: r.upgrades.iter().map(|u| u.to_ascii_lowercase()).collect(),
        })
    }
}

fn parse_pricing(at: &str, price: Option<&str>, free: bool, p: &mut Problems) -> Option<Pricing> {
    match (price, free) {
        (Some(_), true) => p.push(format_args!("{at}.free"), "a route cannot be free and have a price"),
        (None, false) => p.push(format_args!("{at}.price"), "required unless free = true"),
        (Some(s), false) => match Micros::parse(s) {
            Ok(m) if m.get() == 0 => p.push(format_args!("{at}.price"), "must be above zero (use free = true)"),
            Ok(m) => return Some(Pricing::Fixed(m)),
            Err(e) => p.push(format_args!("{at}.price"), e),
        },
        (None, true) => return Some(Pricing::Free),
    }
    None
}

/// A metered route's keys (`meter`, and the optional `price`, `max_price`,
/// `on_disconnect`, `max_request_bytes`, `max_response_bytes`).
fn parse_meter(at: &str, meter: &str, r: &RawRoute, cx: &RouteContext<'_>, p: &mut Problems) -> Option<Pricing> {
    let before = p.len();
    let known = || Meter::ALL.iter().map(|m| format!("{:?}", m.as_str())).collect::<Vec<_>>().join(", ");
    let parsed = Meter::parse(meter);
    if parsed.is_none() {
        p.push(format_args!("{at}.meter"), format_args!("unknown meter {meter:?} (known: {})", known()));
    }
    if r.free {
        p.push(format_args!("{at}.free"), "a route cannot be free and metered");
    }
    if !cx.has_models {
        p.push(
            format_args!("{at}.meter"),
            "no [[model]] is configured: a metered route prices tokens by model (add [[model]] entries, \"*\" for any model)",
        );
    }
    let money = |p: &mut Problems, key: &str, v: Option<&str>| -> Option<Option<Micros>> {
        match v {
            None => Some(None),
            Some(s) => p.check(format_args!("{at}.{key}"), Micros::parse(s).map_err(|e| e.to_string())).map(Some),
        }
    };
    let fixed = money(p, "price", r.price.as_deref());
    let max_price = money(p, "max_price", r.max_price.as_deref());
    if max_price == Some(Some(Micros::ZERO)) {
        p.push(format_args!("{at}.max_price"), "must be above zero");
    }
    if let (Some(Some(f)), Some(Some(m))) = (fixed, max_price) {
        if f > m {
            p.push(format_args!("{at}.max_price"), "must not be below the route's fixed price");
        }
    }
    let bytes = |p: &mut Problems, key: &str, v: Option<usize>, default: usize| match v {
        Some(0) => {
            p.push(format_args!("{at}.{key}"), "must be above zero");
            None
        }
        Some(n) => Some(n),
        None => Some(default),
    };
    let max_request_bytes = bytes(p, "max_request_bytes", r.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
    let max_response_bytes = bytes(p, "max_response_bytes", r.max_response_bytes, DEFAULT_MAX_RESPONSE_BYTES);
    if p.len() != before {
        return None;
    }
    Some(Pricing::Metered(MeterPlan {
        meter: parsed?,
        fixed: fixed?.unwrap_or(Micros::ZERO),
        max_price: max_price?,
        on_disconnect: r.on_disconnect.unwrap_or_default(),
        max_request_bytes: max_request_bytes?,
        max_response_bytes: max_response_bytes?,
    }))
}

/// The `accept` list against the rails the build knows and the sections the file has.
fn parse_accept(
    at: &str,
    accept: &[String],
    free: bool,
    metered: bool,
    cx: &RouteContext<'_>,
    p: &mut Problems,
) -> Option<Vec<&'static str>> {
    let before = p.len();
    if free && !accept.is_empty() {
        p.push(format_args!("{at}.accept"), "a free route accepts no payment");
    }
    if !free && accept.is_empty() {
        let names: Vec<String> = cx.rails.iter().map(|r| format!("{:?}", r.name)).collect();
        p.push(format_args!("{at}.accept"), format_args!("name at least one rail: {}", names.join(" or ")));
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (j, a) in accept.iter().enumerate() {
        match cx.rails.iter().find(|r| r.name == a) {
            None => {
                let known: Vec<&str> = cx.rails.iter().map(|r| r.name).collect();
                p.push(
                    format_args!("{at}.accept[{j}]"),
                    format_args!("unknown rail {a:?} (known: {})", known.join(", ")),
                );
            }
            Some(rail) if metered && !rail.metered => p.push(
                format_args!("{at}.accept[{j}]"),
                format_args!(
                    "{:?} cannot pay a metered route: it settles one amount signed before the request, and a \
                     metered charge is known only once the response is done (accept \"credits\")",
                    rail.name
                ),
            ),
            Some(rail) => match rail.section {
                Some(section) if !cx.sections.contains(section) => p.push(
                    format_args!("{at}.accept[{j}]"),
                    format_args!("{:?} needs an [{section}] section", rail.name),
                ),
                _ => out.push(rail.name),
            },
        }
        if !seen.insert(a) {
            p.push(format_args!("{at}.accept[{j}]"), format_args!("{a:?} listed twice"));
        }
    }
    (p.len() == before).then_some(out)
}

fn parse_rate_limit(at: &str, rl: &RawRateLimit, p: &mut Problems) -> Option<RateLimit> {
    let mut rate = |k: &str, v: &Option<String>| match v {
        None => Some(None),
        Some(v) => p.check(format_args!("{at}.rate_limit.{k}"), parse_rate(v)).map(Some),
    };
    let per_key = rate("per_key", &rl.per_key);
    let per_ip = rate("per_ip", &rl.per_ip);
    if rl.burst == Some(0) {
        p.push(format_args!("{at}.rate_limit.burst"), "must be at least 1");
        return None;
    }
    Some(RateLimit { per_key: per_key?, per_ip: per_ip?, burst: rl.burst })
}
