//! Customer self-service under `{public_url}/.well-known/tollgate/`: a key holder reads
//! their own account and buys credits by card (Stripe Checkout) without the operator.
//! README.md, "Letting customers pay by card", is the operator's guide.
//!
//! The route step hands every request under [`PREFIX`] here before routing, so these
//! answers never reach an upstream, whatever routes the config has. Every answer has
//! `Cache-Control: no-store`; every refusal is problem+json rendered by `rejection.rs`.
//!
//! | endpoint | module |
//! |---|---|
//! | `GET account`, `GET account/transactions`, `GET account/requests/{id}` | [`account`]: the key's own balance and rows, and how every customer endpoint authenticates |
//! | `POST account/topup` (and `GET`: a form for people) | [`topup`]: a Checkout Session for the caller's key |
//! | `POST stripe/webhook` | [`webhook`]: Stripe's signed events, credited once per session |
//!
//! Built once per config snapshot (`SelfService::new`), like the payment gate.

mod account;
pub mod config;
mod stripe;
mod topup;
mod webhook;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Map, Value};

use self::config::StripeConfig;
use self::stripe::StripeClient;
use crate::config::{Config, SpendCap};
use crate::ledger::Ledger;
use crate::metrics::{Metrics, ProviderLabel, ProviderResult};
use crate::money::Micros;
use crate::payment::rails::credits::Credits;
use crate::problem::html_escape;
use crate::rejection::{AccountProblem, Rejection, Responder};
use crate::Body;

/// Everything under this path is answered here, never forwarded.
pub(crate) const PREFIX: &str = "/.well-known/tollgate/";
/// Where a customer starts a top-up (the default `credits.topup_url`).
pub(crate) const TOPUP_PATH: &str = "/.well-known/tollgate/account/topup";
/// Where Stripe delivers events.
pub(crate) const WEBHOOK_PATH: &str = "/.well-known/tollgate/stripe/webhook";
/// The `provider` label of the top-up metrics.
const PROVIDER: &str = "stripe";

/// The self-service endpoints of one config snapshot.
pub(crate) struct SelfService {
    public_base: String,
    ledger: Arc<dyn Ledger>,
    metrics: Arc<Metrics>,
    /// Reads a key exactly as the credits rail does on a paid route.
    credits: Credits,
    credits_header: HeaderName,
    credits_header_display: String,
    spend_cap: Option<SpendCap>,
    topup_url: Option<String>,
    stripe: Option<Stripe>,
}

impl std::fmt::Debug for SelfService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfService").field("stripe", &self.stripe.is_some()).finish_non_exhaustive()
    }
}

/// `[stripe]` with its client and pre-resolved metric handles.
struct Stripe {
    cfg: StripeConfig,
    client: StripeClient,
    created: Counter,
    credited: Counter,
    duplicate: Counter,
    rejected: Counter,
    micros: Counter,
}

impl SelfService {
    pub(crate) fn new(cfg: &Config, ledger: &Arc<dyn Ledger>, metrics: &Arc<Metrics>) -> Result<SelfService, String> {
        let stripe = match &cfg.stripe {
            None => None,
            Some(s) => {
                let result = |r: &'static str| {
                    metrics.topups.get_or_create(&ProviderResult { provider: PROVIDER, result: r }).clone()
                };
                Some(Stripe {
                    client: StripeClient::new(s)?,
                    cfg: s.clone(),
                    created: result("created"),
                    credited: result("credited"),
                    duplicate: result("duplicate"),
                    rejected: result("rejected"),
                    micros: metrics.topup_micros.get_or_create(&ProviderLabel { provider: PROVIDER }).clone(),
                })
            }
        };
        Ok(SelfService {
            public_base: cfg.public_base(),
            ledger: ledger.clone(),
            metrics: metrics.clone(),
            credits: Credits::new(&cfg.credits, ledger.clone(), metrics.clone()),
            credits_header: cfg.credits.header.clone(),
            credits_header_display: cfg.credits.header_display.clone(),
            spend_cap: cfg.credits.spend_cap,
            topup_url: cfg.credits.topup_url.clone(),
            stripe,
        })
    }

    /// Whether `path` (as received, or in its normal form) is answered here.
    pub(crate) fn owns(path: &str) -> bool {
        path.len() >= PREFIX.len() && path.as_bytes()[..PREFIX.len()].eq_ignore_ascii_case(PREFIX.as_bytes())
    }

    /// Answers one request under [`PREFIX`]. Never fails: every problem is a response.
    pub(crate) async fn handle(&self, req: Request<Incoming>, path: &str, request_id: &str) -> Response<Body> {
        let cx = Cx { public_base: &self.public_base, request_id, path };
        let rest = &path[PREFIX.len()..];
        let method = req.method().clone();
        let read = method == Method::GET || method == Method::HEAD;
        let mut res = match rest {
            "account" if read => self.account(&req, &cx).await,
            "account/transactions" if read => self.transactions(&req, &cx).await,
            "account" | "account/transactions" => not_allowed(&cx, "GET, HEAD"),
            "account/topup" => match &self.stripe {
                None => not_found(&cx, "Top-ups by card are not set up on this gateway."),
                Some(s) if read => topup_page(&self.public_base, Some(s.cfg.min_topup)),
                Some(s) if method == Method::POST => self.topup(s, req, &cx).await,
                Some(_) => not_allowed(&cx, "GET, HEAD, POST"),
            },
            _ if rest.starts_with("account/requests/") => {
                let id = &rest["account/requests/".len()..];
                if id.is_empty() || id.contains('/') {
                    not_found(&cx, &format!("There is no self-service endpoint at {path}."))
                } else if !read {
                    not_allowed(&cx, "GET, HEAD")
                } else {
                    self.request(&req, id, &cx).await
                }
            }
            "stripe/webhook" => match &self.stripe {
                None => not_found(&cx, "Top-ups by card are not set up on this gateway."),
                Some(_) if method != Method::POST => not_allowed(&cx, "POST"),
                Some(s) => self.webhook(s, req, &cx).await,
            },
            _ => not_found(&cx, &format!("There is no self-service endpoint at {path}.")),
        };
        let h = res.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert("x-request-id", v);
        }
        res
    }

    async fn webhook(&self, s: &Stripe, req: Request<Incoming>, cx: &Cx<'_>) -> Response<Body> {
        let signature = req.headers().get("stripe-signature").cloned();
        let body = match read_body(req, webhook::MAX_BODY, cx).await {
            Ok(b) => b,
            Err(res) => return res,
        };
        match webhook::receive(self.ledger.as_ref(), &s.cfg, signature.as_ref(), &body, unix_now()).await {
            Ok(outcome) => {
                let result = match &outcome {
                    webhook::Outcome::Ignored(why) => {
                        tracing::debug!(request_id = %cx.request_id, why, "stripe event ignored");
                        "ignored"
                    }
                    webhook::Outcome::Credited { key_id, session, amount, balance } => {
                        s.credited.inc();
                        s.micros.inc_by(amount.get());
                        tracing::info!(request_id = %cx.request_id, key_id = %key_id, session = %session,
                            amount = %amount, balance = %balance, "stripe top-up credited");
                        "credited"
                    }
                    webhook::Outcome::Duplicate { key_id, session } => {
                        s.duplicate.inc();
                        tracing::info!(request_id = %cx.request_id, key_id = %key_id, session = %session,
                            "stripe top-up already credited; nothing changed");
                        "duplicate"
                    }
                    webhook::Outcome::Rejected { why } => {
                        s.rejected.inc();
                        tracing::error!(request_id = %cx.request_id, why = %why, "stripe top-up not credited");
                        "rejected"
                    }
                };
                json_response(StatusCode::OK, json!({ "received": true, "result": result }))
            }
            Err(webhook::Refusal::Ledger(e)) => {
                tracing::warn!(request_id = %cx.request_id, error = %e, "stripe event not credited: ledger unavailable; Stripe will retry");
                backend_unavailable(cx, "The ledger is unavailable; nothing was credited. Stripe retries the delivery.")
            }
            Err(e) => {
                let inconsistent = matches!(e, webhook::Refusal::Inconsistent(_));
                if inconsistent {
                    s.rejected.inc();
                    tracing::error!(request_id = %cx.request_id, error = %e, "stripe event refused; nothing credited");
                } else {
                    tracing::warn!(request_id = %cx.request_id, error = %e, "stripe webhook delivery refused");
                }
                problem(cx, "webhook_invalid", format!("Nothing was credited: {e}."), Map::new(), Vec::new())
            }
        }
    }
}

/// What every answer needs to know about its request.
struct Cx<'a> {
    public_base: &'a str,
    request_id: &'a str,
    path: &'a str,
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

/// Reads a body of at most `limit` bytes (`413 request_too_large` past it).
async fn read_body(req: Request<Incoming>, limit: usize, cx: &Cx<'_>) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(problem(
            cx,
            "request_too_large",
            format!("The body is larger than the {} KiB this endpoint reads.", limit / 1024),
            Map::new(),
            Vec::new(),
        )),
        Err(e) => Err(problem(cx, "bad_request", format!("The body could not be read: {e}."), Map::new(), Vec::new())),
    }
}

fn problem(
    cx: &Cx<'_>,
    code: &'static str,
    detail: String,
    extra: Map<String, Value>,
    headers: Vec<(HeaderName, HeaderValue)>,
) -> Response<Body> {
    let r = Responder { public_base: cx.public_base, request_id: cx.request_id, instance: cx.path, html: false };
    Rejection::Account(Box::new(AccountProblem { code, detail, extra, headers })).into_response(&r)
}

fn not_found(cx: &Cx<'_>, detail: &str) -> Response<Body> {
    problem(cx, "not_found", detail.to_owned(), Map::new(), Vec::new())
}

fn not_allowed(cx: &Cx<'_>, allow: &'static str) -> Response<Body> {
    let detail = format!("{} takes {allow} only.", cx.path);
    problem(cx, "method_not_allowed", detail, Map::new(), vec![(header::ALLOW, HeaderValue::from_static(allow))])
}

fn backend_unavailable(cx: &Cx<'_>, detail: &str) -> Response<Body> {
    let mut extra = Map::new();
    extra.insert("reason".into(), json!("payment_backend_unavailable"));
    let headers = vec![(header::RETRY_AFTER, HeaderValue::from_static("2"))];
    problem(cx, "payment_backend_unavailable", detail.to_owned(), extra, headers)
}

/// `GET account/topup`: the form, for a person who followed a `topup_url`.
fn topup_page(public_base: &str, min: Option<Micros>) -> Response<Body> {
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>Top up your API key</title>\
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:42em;margin:3em auto;padding:0 1em;color:#1d1d1f}}\
input{{font:inherit;padding:.3em}}</style></head><body><h1>Top up your API key</h1>{}</body></html>",
        topup_form(&format!("{public_base}{TOPUP_PATH}"), min)
    );
    let mut res = Response::new(crate::full(page));
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    res
}

/// A form that starts a top-up at `action` (tollgate's top-up endpoint): the amount,
/// and the key, which the customer types or pastes. It is posted in the body, never
/// put in a URL.
pub(crate) fn topup_form(action: &str, min: Option<Micros>) -> String {
    let value = min.map(|m| format!(" value=\"{m}\"")).unwrap_or_default();
    format!(
        "<form method=\"post\" action=\"{action}\" class=\"topup\">\
<p><label>Amount (USD) <input name=\"amount\" inputmode=\"decimal\" required size=\"8\"{value}></label></p>\
<p><label>Your API key <input name=\"key\" type=\"password\" autocomplete=\"off\" required \
placeholder=\"tg_live_…\" size=\"50\"></label></p>\
<p><button type=\"submit\" class=\"button\">Top up by card</button></p></form>",
        action = html_escape(action),
    )
}

fn json_response(status: StatusCode, v: Value) -> Response<Body> {
    let mut res = Response::new(crate::full(serde_json::to_vec(&v).unwrap_or_default()));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

// === doctor ===

/// `tollgate doctor`'s checks of `[stripe]`, spending nothing: the shapes of both
/// secrets, and that the API answers the key (`GET /v1/balance`, a read). Prints one
/// line per check; returns how many failed.
pub(crate) async fn doctor(cfg: &StripeConfig) -> usize {
    let mut failures = 0;
    let key = cfg.secret_key.expose();
    let mode = ["sk_live_", "rk_live_"].iter().any(|p| key.starts_with(p));
    let shape = if mode {
        Some("live")
    } else if ["sk_test_", "rk_test_"].iter().any(|p| key.starts_with(p)) {
        Some("test")
    } else {
        None
    };
    match shape {
        Some(m) => println!("stripe secret_key: looks like a {m}-mode key"),
        None => {
            failures += 1;
            println!("stripe secret_key: does NOT look like a Stripe secret key (sk_live_…, sk_test_…, rk_live_…, rk_test_…)");
        }
    }
    if cfg.webhook_secret.expose().starts_with("whsec_") {
        println!("stripe webhook_secret: looks like a signing secret (whsec_…)");
    } else {
        failures += 1;
        println!("stripe webhook_secret: does NOT look like a webhook signing secret (whsec_…); copy it from the endpoint's page in Stripe's dashboard");
    }
    let client = match StripeClient::new(cfg) {
        Ok(c) => c,
        Err(e) => {
            println!("stripe api {}: FAILED: {e}", cfg.api_base);
            return failures + 1;
        }
    };
    match client.check_balance().await {
        Ok(()) => println!("stripe api {}: answers GET /v1/balance with this key", cfg.api_base),
        Err(e) => {
            failures += 1;
            println!("stripe api {}: FAILED: {e}", cfg.api_base);
        }
    }
    println!(
        "stripe top-ups: {} to {} USD at {TOPUP_PATH}; register {WEBHOOK_PATH} in Stripe for \
checkout.session.completed and checkout.session.async_payment_succeeded",
        cfg.min_topup, cfg.max_topup
    );
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_answered_here_has_a_problem_page_and_its_status() {
        for (code, status) in [
            ("not_found", 404),
            ("method_not_allowed", 405),
            ("request_too_large", 413),
            ("topup_amount_invalid", 400),
            ("topup_failed", 502),
            ("webhook_invalid", 400),
            ("bad_request", 400),
            ("payment_backend_unavailable", 503),
            ("payment_missing", 402),
            ("payment_malformed", 402),
            ("payment_invalid", 402),
        ] {
            let doc = crate::problem::doc(code).unwrap_or_else(|| panic!("{code} has no problem page"));
            assert_eq!(doc.status.as_u16(), status, "{code}");
        }
    }

    #[test]
    fn the_namespace_is_owned_in_any_case_and_nothing_else_is() {
        assert!(SelfService::owns("/.well-known/tollgate/account"));
        assert!(SelfService::owns("/.WELL-KNOWN/Tollgate/x"));
        assert!(!SelfService::owns("/.well-known/tollgate"));
        assert!(!SelfService::owns("/.well-known/other/"));
        assert!(!SelfService::owns("/v1/.well-known/tollgate/account"));
    }

    #[test]
    fn the_form_posts_the_key_in_the_body() {
        let f =
            topup_form("https://api.example.com/.well-known/tollgate/account/topup?x=\"1\"", Some(Micros(5_000_000)));
        assert!(f.contains("method=\"post\""), "{f}");
        assert!(f.contains("action=\"https://api.example.com/.well-known/tollgate/account/topup?x=&quot;1&quot;\""));
        assert!(f.contains("name=\"key\" type=\"password\""), "{f}");
        assert!(f.contains("value=\"5.00\""), "{f}");
    }
}
