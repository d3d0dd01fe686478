//! Prometheus metrics (names listed in the README's metrics reference), encoded with the Prometheus project's own
//! `prometheus-client` crate.
//!
//! Label sets are bounded: route names and upstream names come from the config,
//! reasons, rails and results from fixed lists. Handles for the hot path are resolved
//! once per config snapshot ([`RouteMetrics`]) so a request allocates no label strings.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOutcome {
    pub route: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReason {
    pub route: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteRailResult {
    pub route: String,
    pub rail: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteRail {
    pub route: String,
    pub rail: &'static str,
}

/// `kind`: input, cached_input, cache_write_input or output; `model` is the matching
/// `[[model]]` entry's name (bounded by the config), not the request's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteModelKind {
    pub route: String,
    pub model: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RailLabel {
    pub rail: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RailResult {
    pub rail: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderResult {
    pub provider: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: &'static str,
}

#[derive(Clone, Copy)]
pub struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// Latency buckets from 100 µs to 30 s: a proxy's own time is sub-millisecond,
/// an LLM upstream's can be tens of seconds.
const LATENCY: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

type HistogramFamily<L> = Family<L, Histogram, Buckets>;

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteOutcome, Counter>,
    pub payment_required: Family<RouteReason, Counter>,
    pub payments: Family<RouteRailResult, Counter>,
    pub revenue_micros: Family<RouteRail, Counter>,
    pub request_duration: HistogramFamily<RouteLabel>,
    pub upstream_duration: HistogramFamily<UpstreamLabel>,
    pub verify_duration: HistogramFamily<RailLabel>,
    pub settle_duration: HistogramFamily<RailLabel>,
    pub facilitator_calls: Family<RailResult, Counter>,
    pub ledger_errors: Counter,
    pub inflight: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub config_reloads: Family<ReloadResult, Counter>,
    pub tokens: Family<RouteModelKind, Counter>,
    pub metered_overrun: Family<RouteLabel, Counter>,
    /// Self-service top-ups by provider and result (created, credited, duplicate, rejected).
    pub topups: Family<ProviderResult, Counter>,
    pub topup_micros: Family<ProviderLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadResult {
    pub result: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tollgate");
        let m = Metrics {
            requests: Family::default(),
            payment_required: Family::default(),
            payments: Family::default(),
            revenue_micros: Family::default(),
            request_duration: HistogramFamily::new_with_constructor(Buckets(LATENCY)),
            upstream_duration: HistogramFamily::new_with_constructor(Buckets(LATENCY)),
            verify_duration: HistogramFamily::new_with_constructor(Buckets(LATENCY)),
            settle_duration: HistogramFamily::new_with_constructor(Buckets(LATENCY)),
            facilitator_calls: Family::default(),
            ledger_errors: Counter::default(),
            inflight: Gauge::default(),
            config_reloads: Family::default(),
            tokens: Family::default(),
            metered_overrun: Family::default(),
            topups: Family::default(),
            topup_micros: Family::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests by route and outcome", m.requests.clone());
        registry.register(
            "payment_required",
            "Requests refused for payment, by route and reason",
            m.payment_required.clone(),
        );
        registry.register("payments", "Payment attempts by route, rail and result", m.payments.clone());
        registry.register(
            "revenue_micros",
            "Money charged, in micro-units of the currency (USD micros, or token atomic units)",
            m.revenue_micros.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response head, by route",
            m.request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time the upstream took to send its response head",
            m.upstream_duration.clone(),
        );
        registry.register(
            "payment_verify_duration_seconds",
            "Time to verify (and reserve) a payment, by rail",
            m.verify_duration.clone(),
        );
        registry.register(
            "payment_settle_duration_seconds",
            "Time to capture or settle a payment, by rail",
            m.settle_duration.clone(),
        );
        registry.register(
            "facilitator_requests",
            "Calls to x402 facilitators by call and result",
            m.facilitator_calls.clone(),
        );
        registry.register("ledger_errors", "Ledger operations that failed", m.ledger_errors.clone());
        registry.register("inflight_requests", "Requests being served now", m.inflight.clone());
        registry.register("config_reloads", "Config reloads by result", m.config_reloads.clone());
        registry.register(
            "tokens",
            "Tokens charged on metered routes, by route, model entry and kind",
            m.tokens.clone(),
        );
        registry.register(
            "metered_overrun",
            "Metered requests whose reported usage cost more than their hold (charged the hold)",
            m.metered_overrun.clone(),
        );
        registry.register(
            "topups",
            "Customer top-ups by payment provider and result (created, credited, duplicate, rejected)",
            m.topups.clone(),
        );
        registry.register(
            "topup_micros",
            "Money credited by customer top-ups, in micro-USD, by payment provider",
            m.topup_micros.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    ///
    /// `prometheus-client` writes OpenMetrics, where a counter family `x` has samples
    /// `x_total`. The classic text format that `promtool check metrics` and older
    /// scrapers read wants HELP and TYPE to name `x_total` itself and no `# EOF`
    /// trailer, so those lines are rewritten; samples are untouched.
    pub fn encode(&self) -> String {
        let mut om = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut om, &self.registry);
        let counters: std::collections::HashSet<&str> =
            om.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
        let mut out = String::with_capacity(om.len() + 1024);
        for line in om.lines() {
            if line == "# EOF" {
                continue;
            }
            let meta = line
                .strip_prefix("# HELP ")
                .map(|r| ("# HELP ", r))
                .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
            match meta {
                Some((kind, rest)) => {
                    let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                    out.push_str(kind);
                    out.push_str(name);
                    if counters.contains(name) {
                        out.push_str("_total");
                    }
                    out.push(' ');
                    out.push_str(tail);
                }
                None => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }

    /// Handles for one route, resolved once per config snapshot.
    pub fn for_route(&self, route: &str) -> RouteMetrics {
        let outcome = |o: &'static str| {
            self.requests.get_or_create(&RouteOutcome { route: route.to_owned(), outcome: o }).clone()
        };
        RouteMetrics {
            forwarded: outcome("forwarded"),
            free: outcome("free"),
            payment_required: outcome("payment_required"),
            rejected: outcome("rejected"),
            upstream_error: outcome("upstream_error"),
            duration: self.request_duration.get_or_create(&RouteLabel { route: route.to_owned() }).clone(),
        }
    }
}

/// Pre-resolved per-route handles for the hot path.
#[derive(Clone)]
pub struct RouteMetrics {
    pub forwarded: Counter<u64, AtomicU64>,
    pub free: Counter<u64, AtomicU64>,
    pub payment_required: Counter<u64, AtomicU64>,
    pub rejected: Counter<u64, AtomicU64>,
    pub upstream_error: Counter<u64, AtomicU64>,
    pub duration: Histogram,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteMetrics")
    }
}
