//! The payment gate: everything the payment layer decides for one priced request, in
//! order — per-address limit, choice of rail, per-payer limit, authorization (hold /
//! verify), the request as the upstream will see it, and, once the upstream answered or
//! failed, the end of the charge by `charge_on`. Built once per config snapshot; the
//! tower plumbing around it is in `layer.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tower::{Service, ServiceExt};

use super::metered::{self, Bill, Charger, MeteredBody, MeteredCall};
use super::ratelimit::Limiter;
use super::{Charge, Denial, Grant, Paid, Rails, Reason, Receipt, Refused};
use crate::config::{ChargeOn, Config, Pricing, Rate};
use crate::ledger::Metered;
use crate::meter::ModelPrice;
use crate::metrics::{Metrics, RailLabel, RouteLabel, RouteModelKind, RouteRail, RouteRailResult, RouteReason};
use crate::money::Micros;
use crate::proxy::{ProxyError, ReqBody};
use crate::rejection::{self, PaymentRefusal, Rejection, Responder};
use crate::route::{RequestCtx, RouteTable};
use crate::Body;

/// The configured gate: rails, limits and pre-resolved metric handles. Built once per
/// config snapshot.
pub struct PaymentGate {
    rails: Rails,
    public_base: String,
    topup_url: Option<String>,
    routes: HashMap<usize, RouteGate>,
    all_credential_headers: Vec<HeaderName>,
    /// `[[model]]`, for metered routes.
    models: Vec<ModelPrice>,
}

impl std::fmt::Debug for PaymentGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentGate").field("rails", &self.rails).finish()
    }
}

struct RouteGate {
    per_key: Option<Limiter>,
    per_ip: Option<Limiter>,
    required: Vec<Counter>,
    rails: Vec<RailHandles>,
    metered: Option<MeterHandles>,
}

/// A metered route's own handles.
struct MeterHandles {
    overrun: Counter,
    /// Per `[[model]]` name: input, cached_input, cache_write_input, output.
    tokens: HashMap<String, [Counter; 4]>,
    /// The route's upstream timeout: bounds reading a whole response, and reading on
    /// after a client left a stream.
    upstream_timeout: std::time::Duration,
}

/// How a paid request's charge ends.
enum Plan {
    /// At the response head, for the route's price.
    Fixed(Micros),
    /// At the end of the response body, for the tokens used (`metered.rs`).
    Metered(Box<MeteredCall>),
}

impl Plan {
    /// The amount held before forwarding.
    fn hold(&self) -> Micros {
        match self {
            Plan::Fixed(p) => *p,
            Plan::Metered(c) => c.hold.amount,
        }
    }
}

struct RailHandles {
    name: &'static str,
    success: Counter,
    refunded: Counter,
    rejected: Counter,
    failed: Counter,
    revenue: Counter,
    verify: Histogram,
    settle: Histogram,
}

impl PaymentGate {
    pub fn new(cfg: &Config, routes: &RouteTable, rails: Rails, metrics: &Metrics) -> PaymentGate {
        let mut gates = HashMap::new();
        for route in routes.iter().filter(|r| !r.is_free()) {
            let name = route.name.to_string();
            let rl = route.rate_limit.as_ref();
            let limiter = |rate: Option<Rate>| {
                let rate = rate?;
                Some(Limiter::new(rate.count, rate.per, rl.and_then(|r| r.burst)))
            };
            let required = Reason::ALL
                .iter()
                .map(|r| {
                    metrics
                        .payment_required
                        .get_or_create(&RouteReason { route: name.clone(), reason: r.as_str() })
                        .clone()
                })
                .collect();
            let rail_handles = rails
                .iter()
                .map(|rail| {
                    let n = rail.name();
                    let result = |res: &'static str| {
                        metrics
                            .payments
                            .get_or_create(&RouteRailResult { route: name.clone(), rail: n, result: res })
                            .clone()
                    };
                    RailHandles {
                        name: n,
                        success: result("success"),
                        refunded: result("refunded"),
                        rejected: result("rejected"),
                        failed: result("failed"),
                        revenue: metrics
                            .revenue_micros
                            .get_or_create(&RouteRail { route: name.clone(), rail: n })
                            .clone(),
                        verify: metrics.verify_duration.get_or_create(&RailLabel { rail: n }).clone(),
                        settle: metrics.settle_duration.get_or_create(&RailLabel { rail: n }).clone(),
                    }
                })
                .collect();
            let metered = matches!(route.pricing, Pricing::Metered(_)).then(|| MeterHandles {
                overrun: metrics.metered_overrun.get_or_create(&RouteLabel { route: name.clone() }).clone(),
                tokens: cfg
                    .models
                    .iter()
                    .map(|m| {
                        let kind = |kind: &'static str| {
                            metrics
                                .tokens
                                .get_or_create(&RouteModelKind { route: name.clone(), model: m.name.clone(), kind })
                                .clone()
                        };
                        (
                            m.name.clone(),
                            [kind("input"), kind("cached_input"), kind("cache_write_input"), kind("output")],
                        )
                    })
                    .collect(),
                upstream_timeout: cfg
                    .upstreams
                    .iter()
                    .find(|u| *u.name == *route.upstream)
                    .map_or(std::time::Duration::from_secs(60), |u| u.timeout),
            });
            gates.insert(
                route.index,
                RouteGate {
                    per_key: limiter(rl.and_then(|r| r.per_key)),
                    per_ip: limiter(rl.and_then(|r| r.per_ip)),
                    required,
                    rails: rail_handles,
                    metered,
                },
            );
        }
        let all_credential_headers = rails.iter().flat_map(|r| r.credential_headers().iter().cloned()).collect();
        PaymentGate {
            rails,
            public_base: cfg.public_base(),
            topup_url: cfg.credits.topup_url.clone(),
            routes: gates,
            all_credential_headers,
            models: cfg.models.clone(),
        }
    }

    /// What the rails are asked to charge (or told was refused) for one request.
    fn charge<'a>(
        &'a self,
        ctx: &'a RequestCtx,
        price: Micros,
        path: &'a str,
        hold_note: Option<&'a str>,
    ) -> Charge<'a> {
        Charge {
            route: &ctx.route,
            price,
            request_id: &ctx.request_id,
            client_ip: ctx.client_ip,
            public_base: &self.public_base,
            path,
            hold_note,
        }
    }

    /// Answers a refusal to a client that asked for `path` (`html`: it prefers a page).
    fn refuse(
        &self,
        path: &str,
        html: bool,
        ctx: &RequestCtx,
        charge: &Charge<'_>,
        denial: Denial,
        gate: Option<&RouteGate>,
    ) -> Response<Body> {
        if let Some(g) = gate {
            if let Some(c) = Reason::ALL.iter().position(|r| *r == denial.reason).and_then(|i| g.required.get(i)) {
                c.inc();
            }
        }
        tracing::info!(
            request_id = %ctx.request_id,
            route = %ctx.route.name,
            reason = denial.reason.as_str(),
            cause = denial.cause.as_deref().unwrap_or(""),
            "payment refused"
        );
        let parts = ctx
            .route
            .accept
            .iter()
            .filter_map(|name| self.rails.get(name))
            .map(|rail| rail.challenge(charge, &denial))
            .collect();
        let refusal = PaymentRefusal {
            denial,
            route: ctx.route.name.to_string(),
            price: charge.price,
            topup_url: self.topup_url.clone(),
            parts,
        };
        let reason = refusal.denial.reason;
        let responder = Responder { public_base: &self.public_base, request_id: &ctx.request_id, instance: path, html };
        let mut res = Rejection::Payment(Box::new(refusal)).into_response(&responder);
        res.extensions_mut().insert(Refused(reason.as_str()));
        res
    }

    /// One request through the gate: a free route passes (scrubbed of tollgate's
    /// credentials), a priced one goes through [`PaymentGate::run`].
    pub(super) async fn handle<S>(
        self: Arc<Self>,
        req: Request<ReqBody>,
        inner: S,
    ) -> Result<Response<Body>, ProxyError>
    where
        S: Service<Request<ReqBody>, Response = Response<Body>, Error = ProxyError> + Send + 'static,
        S::Future: Send,
    {
        let Some(ctx) = req.extensions().get::<Arc<RequestCtx>>().cloned() else {
            // Without a matched route the gate cannot know the price: fail closed.
            let r = Responder { public_base: &self.public_base, request_id: "", instance: "", html: false };
            return Ok(Rejection::Internal("no route for the payment gate").into_response(&r));
        };
        match ctx.route.pricing {
            Pricing::Free => {
                let mut req = req;
                for rail in self.rails.iter() {
                    rail.scrub(req.headers_mut());
                }
                inner.oneshot(req).await
            }
            Pricing::Fixed(price) => self.run(ctx, Plan::Fixed(price), req, inner).await,
            Pricing::Metered(plan) => {
                let html = rejection::prefers_html(req.headers());
                let path = req.uri().path().to_owned();
                match metered::price_request(plan, &self.models, &ctx.route.name, req).await {
                    Ok((call, req)) => self.run(ctx, Plan::Metered(Box::new(call)), req, inner).await,
                    Err(refusal) => {
                        tracing::info!(
                            request_id = %ctx.request_id,
                            route = %ctx.route.name,
                            reason = refusal.code,
                            detail = %refusal.detail,
                            "metered request refused"
                        );
                        let code = refusal.code;
                        let r = Responder {
                            public_base: &self.public_base,
                            request_id: &ctx.request_id,
                            instance: &path,
                            html,
                        };
                        let mut res = Rejection::Metering(refusal).into_response(&r);
                        res.extensions_mut().insert(Refused(code));
                        Ok(res)
                    }
                }
            }
        }
    }

    /// The whole gate for one priced request; `plan` says what is held and how the
    /// charge ends.
    async fn run<S>(
        self: Arc<Self>,
        ctx: Arc<RequestCtx>,
        plan: Plan,
        mut req: Request<ReqBody>,
        inner: S,
    ) -> Result<Response<Body>, ProxyError>
    where
        S: Service<Request<ReqBody>, Response = Response<Body>, Error = ProxyError> + Send + 'static,
        S::Future: Send,
    {
        let route = &ctx.route;
        let path = req.uri().path().to_owned();
        let html = rejection::prefers_html(req.headers());
        let price = plan.hold();
        let hold_note = match &plan {
            Plan::Metered(c) => Some(c.note.as_str()),
            Plan::Fixed(_) => None,
        };
        let charge = self.charge(&ctx, price, &path, hold_note);
        let gate = self.routes.get(&route.index);

        if let Some(Err(secs)) = gate.and_then(|g| g.per_ip.as_ref()).map(|l| l.check(ctx.client_ip)) {
            let d = Denial::new(Reason::RateLimited, "Too many requests from this address.").retry_after(secs);
            return Ok(self.refuse(&path, html, &ctx, &charge, d, gate));
        }

        let chosen = route.accept.iter().filter_map(|n| self.rails.get(n)).find(|r| r.present(req.headers()));
        let Some(rail) = chosen else {
            let other =
                self.rails.iter().find(|r| !route.accept.iter().any(|a| *a == r.name()) && r.present(req.headers()));
            let d = match other {
                Some(r) => Denial::new(
                    Reason::PaymentMethodUnsupported,
                    format!(
                        "Route {} does not accept {}; it accepts {}.",
                        route.name,
                        r.name(),
                        route.accept.join(", ")
                    ),
                ),
                None => Denial::new(
                    Reason::PaymentMissing,
                    match hold_note {
                        None => format!(
                            "Route {} costs {price} USD per request; pay with {}.",
                            route.name,
                            route.accept.join(" or ")
                        ),
                        Some(note) => format!(
                            "Route {} charges per token, up to {price} USD for this request ({note}); pay with {}.",
                            route.name,
                            route.accept.join(" or ")
                        ),
                    },
                ),
            };
            return Ok(self.refuse(&path, html, &ctx, &charge, d, gate));
        };
        let handles = gate.and_then(|g| g.rails.iter().find(|h| h.name == rail.name()));

        // Per-key limits count the payer (see `Rail::payer_hint`), so a credential's
        // spelling cannot buy a fresh bucket. A bucket is made only once a payment
        // verified; a spent payer is refused before the ledger is asked.
        let per_key = gate.and_then(|g| g.per_key.as_ref());
        let hint = per_key.and_then(|_| rail.payer_hint(req.headers()));
        if let (Some(limiter), Some(hint)) = (per_key, &hint) {
            if let Err(secs) = limiter.peek((rail.name(), hint)) {
                let d = Denial::new(Reason::RateLimited, "Too many requests for this payer.").retry_after(secs);
                return Ok(self.refuse(&path, html, &ctx, &charge, d, gate));
            }
        }

        let started = Instant::now();
        let result = rail.authorize(&charge, req.headers()).await;
        if let Some(h) = handles {
            h.verify.observe(started.elapsed().as_secs_f64());
        }
        let grant = match result {
            Ok(g) => g,
            Err(d) => {
                if let Some(h) = handles {
                    if d.reason == Reason::PaymentBackendUnavailable {
                        h.failed.inc();
                    } else {
                        h.rejected.inc();
                    }
                }
                return Ok(self.refuse(&path, html, &ctx, &charge, d, gate));
            }
        };

        if let Some(limiter) = per_key {
            let payer = hint.unwrap_or_else(|| grant.payer().to_ascii_lowercase());
            if let Err(secs) = limiter.check((rail.name(), &payer)) {
                grant.release().await;
                let d = Denial::new(Reason::RateLimited, "Too many requests for this payer.").retry_after(secs);
                return Ok(self.refuse(&path, html, &ctx, &charge, d, gate));
            }
        }

        let headers = req.headers_mut();
        for name in &self.all_credential_headers {
            headers.remove(name);
        }
        let (rail_name, payer, paid) = (grant.rail(), grant.payer().to_owned(), grant.paid());
        if let Ok(v) = HeaderValue::from_str(&route.name) {
            headers.insert(HeaderName::from_static("x-tollgate-route"), v);
        }
        if let Ok(v) = HeaderValue::from_str(&payer) {
            headers.insert(HeaderName::from_static("x-tollgate-payer"), v);
        }
        if let Ok(v) = HeaderValue::from_str(&paid) {
            headers.insert(HeaderName::from_static("x-tollgate-paid"), v);
        }
        req.extensions_mut().insert(Paid { rail: rail_name, payer });

        // From here on the request is the upstream's: it runs to its answer in a task
        // of its own, so a client that hangs up before the head does not decide the
        // charge; the upstream's answer does, by the same rule as always.
        let this = self.clone();
        let request_id = ctx.request_id.clone();
        let task = tokio::spawn(async move {
            let guard = GrantGuard(Some(grant));
            let answer = inner.oneshot(req).await;
            match plan {
                Plan::Fixed(price) => this.settle(&ctx, price, guard, answer, path, html).await,
                Plan::Metered(call) => this.settle_metered(ctx, *call, guard, answer, path, html).await,
            }
        });
        match task.await {
            Ok(res) => res,
            Err(e) => {
                tracing::error!(request_id = %request_id, error = %e, "paid request task failed");
                let r =
                    Responder { public_base: &self.public_base, request_id: &request_id, instance: "", html: false };
                Ok(Rejection::Internal("the paid request's task failed").into_response(&r))
            }
        }
    }

    /// Ends the charge of a forwarded request once the upstream answered or failed:
    /// captured / settled when `charge_on` says so, released otherwise. Under
    /// `"always"` a request that reached the upstream and then timed out or broke off
    /// is charged; one that never reached it (connect error, the client's own body
    /// failed) never is.
    async fn settle(
        &self,
        ctx: &RequestCtx,
        price: Micros,
        mut guard: GrantGuard,
        answer: Result<Response<Body>, ProxyError>,
        path: String,
        html: bool,
    ) -> Result<Response<Body>, ProxyError> {
        let route = &ctx.route;
        let gate = self.routes.get(&route.index);
        let grant = guard.take();
        let handles = gate.and_then(|g| g.rails.iter().find(|h| h.name == grant.rail()));
        let chargeable = match &answer {
            Ok(res) => route.charge_on == ChargeOn::Always || res.status().as_u16() < 500,
            Err(e) => route.charge_on == ChargeOn::Always && e.reached_upstream(),
        };
        if !chargeable {
            grant.release().await;
            if let Some(h) = handles {
                h.refunded.inc();
            }
            return answer;
        }
        match self.commit(gate, grant, price, None).await {
            Ok(receipt) => {
                // Charged after a timeout under "always": the caller gets the 504, with
                // no receipt to attach it to.
                let mut res = answer?;
                attach_receipt(res.headers_mut(), receipt);
                Ok(res)
            }
            Err(d) => {
                // The upstream body is dropped unread: the caller does not get what it
                // was not charged for.
                let charge = self.charge(ctx, price, &path, None);
                Ok(self.refuse(&path, html, ctx, &charge, d, gate))
            }
        }
    }

    /// Commits `grant` for `amount` and counts the outcome in the rail's metrics.
    async fn commit(
        &self,
        gate: Option<&RouteGate>,
        grant: Box<dyn Grant>,
        amount: Micros,
        metered: Option<&Metered>,
    ) -> Result<Receipt, Denial> {
        let handles = gate.and_then(|g| g.rails.iter().find(|h| h.name == grant.rail()));
        let started = Instant::now();
        let committed = grant.commit(amount, metered).await;
        if let Some(h) = handles {
            h.settle.observe(started.elapsed().as_secs_f64());
            match &committed {
                Ok(r) if r.revenue > 0 => {
                    h.success.inc();
                    h.revenue.inc_by(r.revenue);
                }
                Ok(_) => {
                    h.refunded.inc();
                }
                Err(_) => {
                    h.failed.inc();
                }
            }
        }
        committed
    }

    /// Whether a metered answer with a status of 400 or above is charged at all (its
    /// fixed part, or its usage when it reported any): a 4xx is; a 5xx is only under
    /// `charge_on = "always"`.
    pub(super) fn chargeable_status(&self, ctx: &RequestCtx, status: http::StatusCode) -> bool {
        ctx.route.charge_on == ChargeOn::Always || status.as_u16() < 500
    }

    /// Ends a metered charge with its bill: the tokens in the metrics, the capture.
    pub(super) async fn close_metered(
        &self,
        ctx: &RequestCtx,
        call: &MeteredCall,
        grant: Box<dyn Grant>,
        bill: &Bill,
    ) -> Result<Receipt, Denial> {
        let gate = self.routes.get(&ctx.route.index);
        let grant_rail = grant.rail();
        if let Some(m) = gate.and_then(|g| g.metered.as_ref()) {
            if bill.overrun {
                m.overrun.inc();
                tracing::warn!(
                    request_id = %ctx.request_id,
                    route = %ctx.route.name,
                    hold = %call.hold.amount,
                    "reported usage cost more than the hold; charged the hold"
                );
            }
            if let Some((metered, counters)) = bill.metered.as_ref().and_then(|b| Some((b, m.tokens.get(&b.model)?))) {
                let u = metered.usage;
                for (c, n) in counters.iter().zip([u.input, u.cached_input, u.cache_write_input, u.output]) {
                    c.inc_by(n);
                }
            }
        }
        if bill.amount == Micros::ZERO && bill.metered.is_none() {
            // Nothing is charged for a failure: the hold is simply given back, as on a
            // fixed-price route, and the answer carries no receipt.
            grant.release().await;
            if let Some(h) = gate.and_then(|g| g.rails.iter().find(|h| h.name == grant_rail)) {
                h.refunded.inc();
            }
            return Ok(Receipt::default());
        }
        let committed = self.commit(gate, grant, bill.amount, bill.metered.as_ref()).await;
        if let Err(d) = &committed {
            tracing::warn!(
                request_id = %ctx.request_id,
                reason = d.reason.as_str(),
                "metered charge not captured: its hold stays pending until the stale-hold sweep releases it, \
                 so the request goes uncharged; check the ledger (tollgate_ledger_errors_total)"
            );
        }
        committed
    }

    /// Ends the charge of a forwarded metered request. A failure before any answer,
    /// and a non-streamed answer, end it here, before the head is sent; an event
    /// stream ends it in its body ([`MeteredBody`]).
    async fn settle_metered(
        self: Arc<Self>,
        ctx: Arc<RequestCtx>,
        call: MeteredCall,
        mut guard: GrantGuard,
        answer: Result<Response<Body>, ProxyError>,
        path: String,
        html: bool,
    ) -> Result<Response<Body>, ProxyError> {
        let gate = self.routes.get(&ctx.route.index);
        let timeout =
            gate.and_then(|g| g.metered.as_ref()).map_or(std::time::Duration::from_secs(60), |m| m.upstream_timeout);
        let res = match answer {
            Ok(res) => res,
            Err(e) => {
                let chargeable = ctx.route.charge_on == ChargeOn::Always && e.reached_upstream();
                let bill = metered::bill(&call, metered::Ending::Failed { chargeable }, None, 0);
                let _ = self.close_metered(&ctx, &call, guard.take(), &bill).await;
                return Err(e);
            }
        };
        let status = res.status();
        if metered::is_encoded(res.headers()) && status.as_u16() < 400 {
            tracing::warn!(
                request_id = %ctx.request_id,
                route = %ctx.route.name,
                "the upstream encoded a metered answer it was asked to send as is; charged the hold"
            );
            let bill = metered::bill_unreadable(&call);
            let mut res = res;
            match self.close_metered(&ctx, &call, guard.take(), &bill).await {
                Ok(receipt) => attach_receipt(res.headers_mut(), receipt),
                Err(d) => {
                    let charge = self.charge(&ctx, call.hold.amount, &path, Some(&call.note));
                    return Ok(self.refuse(&path, html, &ctx, &charge, d, gate));
                }
            }
            return Ok(res);
        }
        if metered::is_event_stream(res.headers()) {
            let (mut parts, body) = res.into_parts();
            metered::stream_head(&mut parts.headers, &call);
            let charger = Charger { gate: self.clone(), ctx, call, grant: guard, status };
            let body = MeteredBody::new(body, charger, timeout);
            return Ok(Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(body)));
        }
        let (mut parts, body) = res.into_parts();
        let (ending, bytes) = match metered::read_whole(body, call.plan.max_response_bytes, timeout).await {
            Ok(bytes) if status.as_u16() < 400 => (metered::Ending::Answered, Ok(bytes)),
            Ok(bytes) => (metered::Ending::Failed { chargeable: self.chargeable_status(&ctx, status) }, Ok(bytes)),
            Err(why) => (metered::Ending::Failed { chargeable: ctx.route.charge_on == ChargeOn::Always }, Err(why)),
        };
        let read = bytes.as_ref().map(|b| crate::meter::response_usage(call.plan.meter, b)).ok();
        let usage = read.as_ref().and_then(|r| r.usage);
        let counted = read.as_ref().map_or(0, |r| r.output_tokens_counted);
        let bill = metered::bill(&call, ending, usage, counted);
        let committed = self.close_metered(&ctx, &call, guard.take(), &bill).await;
        let bytes = match bytes {
            Ok(b) => b,
            Err(why) => {
                tracing::warn!(request_id = %ctx.request_id, route = %ctx.route.name, error = why, "metered response unreadable");
                return Err(ProxyError::Upstream { upstream: ctx.route.upstream.clone(), source: why.into() });
            }
        };
        match committed {
            Ok(receipt) => {
                attach_receipt(&mut parts.headers, receipt);
                parts.headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                Ok(Response::from_parts(parts, crate::full(bytes)))
            }
            Err(d) => {
                let charge = self.charge(&ctx, call.hold.amount, &path, Some(&call.note));
                Ok(self.refuse(&path, html, &ctx, &charge, d, gate))
            }
        }
    }
}

/// Puts a receipt's headers on a response head, readable by browser clients.
fn attach_receipt(headers: &mut http::HeaderMap, receipt: Receipt) {
    let expose: Vec<&str> = receipt.headers.iter().map(|(k, _)| k.as_str()).collect();
    let expose = expose.join(", ");
    if let Ok(v) = HeaderValue::from_str(&expose) {
        if !expose.is_empty() {
            headers.append(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
        }
    }
    for (k, v) in receipt.headers {
        headers.insert(k, v);
    }
}

/// Releases a grant whose request was abandoned (client gone, task cancelled).
pub(super) struct GrantGuard(Option<Box<dyn Grant>>);

impl GrantGuard {
    pub(super) fn take(&mut self) -> Box<dyn Grant> {
        self.0.take().expect("grant taken once")
    }
}

impl Drop for GrantGuard {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(g.release());
            }
        }
    }
}
