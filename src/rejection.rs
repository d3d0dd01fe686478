//! The one renderer: every answer tollgate makes up itself instead of the upstream's.
//!
//! Shaped after linkerd2-proxy's `HttpRescue`: each way a request can end without the
//! upstream's answer is a [`Rejection`], and [`Rejection::into_response`] is the only
//! code that turns one into a response. The status comes from the problem code
//! (`problem::DOCS`), never from a second table; payment refusals carry the parts the
//! offered rails contributed (body members, headers, HTML, headers to expose to
//! browsers) and follow the 402 contract: RFC 9457 problem+json, or a paywall page
//! for a client whose `Accept` prefers HTML, `Cache-Control: no-store`,
//! `X-Robots-Tag: noindex`.

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use serde_json::{json, Map};

use crate::money::{Currency, Micros, Money};
use crate::payment::{ChallengePart, Denial, Reason};
use crate::problem::{self, html_escape};
use crate::proxy::{Malformed, ProxyError};
use crate::route::Unroutable;
use crate::Body;

/// Why a request ends with an answer of tollgate's own.
#[derive(Debug)]
pub enum Rejection {
    /// Refused on arrival, before routing (`CONNECT`, two `Host` fields).
    Malformed(Malformed),
    /// No route, or a path without a safe reading.
    Unroutable(Unroutable),
    /// The upstream was not reached, did not answer in time, or broke off.
    Upstream(ProxyError),
    /// The payment gate refused the request.
    Payment(Box<PaymentRefusal>),
    /// A metered route cannot price the request (no model price, unreadable, too large).
    Metering(MeterRefusal),
    /// A fault of tollgate's own; says where.
    Internal(&'static str),
    /// A refusal of the customer self-service endpoints (`/.well-known/tollgate/…`).
    Account(Box<AccountProblem>),
}

/// A refusal of a self-service endpoint: its problem code (the status comes from it),
/// the sentence, extension members (a key refusal's `reason` and `credits`) and
/// headers (`WWW-Authenticate`, `Allow`, `Retry-After`).
#[derive(Debug)]
pub struct AccountProblem {
    pub code: &'static str,
    pub detail: String,
    pub extra: Map<String, serde_json::Value>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// A payment refusal with everything its 402 / 429 / 503 shows.
#[derive(Debug)]
pub struct PaymentRefusal {
    pub denial: Denial,
    pub route: String,
    pub price: Micros,
    pub topup_url: Option<String>,
    /// One part per offered rail, in the route's `accept` order.
    pub parts: Vec<ChallengePart>,
}

/// Why a metered route could not price a request; nothing was held or forwarded.
#[derive(Debug)]
pub struct MeterRefusal {
    /// `model_not_priced`, `request_unreadable` or `request_too_large`.
    pub code: &'static str,
    pub detail: String,
    pub route: String,
}

/// What every rendered answer needs to know about its request.
#[derive(Debug, Clone, Copy)]
pub struct Responder<'a> {
    pub public_base: &'a str,
    pub request_id: &'a str,
    /// The request path (the problem's `instance`).
    pub instance: &'a str,
    /// The client prefers HTML (payment refusals then get the paywall page).
    pub html: bool,
}

/// Headers every refusal lets a browser read, besides those the rails declare.
const ALWAYS_EXPOSED: [HeaderName; 2] = [header::RETRY_AFTER, HeaderName::from_static("x-request-id")];

impl Rejection {
    /// The problem code: the last path segment of the `type` URL.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "bad_request",
            Rejection::Unroutable(Unroutable::NotFound) => "route_not_found",
            Rejection::Unroutable(_) => "bad_request",
            Rejection::Upstream(ProxyError::Timeout { .. }) => "upstream_timeout",
            Rejection::Upstream(ProxyError::BadRequest(_)) => "bad_request",
            Rejection::Upstream(ProxyError::Unrouted) => "internal_error",
            Rejection::Upstream(_) => "upstream_unavailable",
            Rejection::Payment(p) => p.denial.reason.as_str(),
            Rejection::Metering(m) => m.code,
            Rejection::Internal(_) => "internal_error",
            Rejection::Account(p) => p.code,
        }
    }

    pub fn status(&self) -> StatusCode {
        problem::doc(self.code()).map_or(StatusCode::INTERNAL_SERVER_ERROR, |d| d.status)
    }

    /// The sentence for the caller: what happened, and for a charge, that none was made.
    fn detail(&self, r: &Responder<'_>) -> String {
        match self {
            Rejection::Malformed(e) => format!("The request cannot be forwarded: {e}."),
            Rejection::Unroutable(Unroutable::NotFound) => format!("No route matches {}.", r.instance),
            Rejection::Unroutable(e) => format!("The request path cannot be routed safely: {e}."),
            Rejection::Upstream(ProxyError::Timeout { timeout, .. }) => format!(
                "The upstream did not answer within {}; nothing was charged.",
                humantime::format_duration(*timeout)
            ),
            Rejection::Upstream(ProxyError::BadRequest(m)) => format!("The request cannot be forwarded: {m}."),
            Rejection::Upstream(ProxyError::Unrouted) => {
                "tollgate failed to route the request to an upstream; nothing was charged.".to_owned()
            }
            Rejection::Upstream(ProxyError::Connect { .. }) => {
                "The upstream could not be reached; nothing was charged.".to_owned()
            }
            Rejection::Upstream(_) => "The upstream's answer broke off or could not be used; nothing was charged. \
                 Retry; if it keeps failing, quote the request_id to the operator."
                .to_owned(),
            Rejection::Payment(p) => p.denial.detail.clone(),
            Rejection::Metering(m) => m.detail.clone(),
            Rejection::Internal(what) => {
                format!("tollgate failed to handle the request ({what}); nothing was charged.")
            }
            Rejection::Account(p) => p.detail.clone(),
        }
    }

    pub fn into_response(self, r: &Responder<'_>) -> Response<Body> {
        let status = self.status();
        let detail = self.detail(r);
        let mut res = match self {
            Rejection::Payment(p) => payment(*p, status, detail, r),
            Rejection::Metering(m) => {
                let mut extra = Map::new();
                extra.insert("reason".into(), json!(m.code));
                extra.insert("route".into(), json!(m.route));
                problem::problem_response(r.public_base, m.code, status, detail, r.instance, r.request_id, extra)
            }
            Rejection::Account(p) => {
                let AccountProblem { code, extra, headers, .. } = *p;
                let mut res =
                    problem::problem_response(r.public_base, code, status, detail, r.instance, r.request_id, extra);
                for (k, v) in headers {
                    res.headers_mut().append(k, v);
                }
                res
            }
            other => problem::problem_response(
                r.public_base,
                other.code(),
                status,
                detail,
                r.instance,
                r.request_id,
                Map::new(),
            ),
        };
        if let Ok(v) = HeaderValue::from_str(r.request_id) {
            res.headers_mut().insert("x-request-id", v);
        }
        res
    }
}

fn payment(p: PaymentRefusal, status: StatusCode, detail: String, r: &Responder<'_>) -> Response<Body> {
    let PaymentRefusal { denial, route, price, topup_url, parts } = p;
    let mut extra = Map::new();
    extra.insert("reason".into(), json!(denial.reason.as_str()));
    extra.insert("route".into(), json!(route));
    let currency = Currency::Usd;
    extra.insert("price".into(), json!({ "amount": price.to_string(), "currency": currency.code() }));
    if let Some(c) = &denial.cause {
        extra.insert("cause".into(), json!(c));
    }
    let mut headers = HeaderMap::new();
    let mut expose: Vec<HeaderName> = Vec::new();
    let mut sections = String::new();
    for part in parts {
        extra.extend(part.body);
        for (k, v) in part.headers {
            headers.append(k, v);
        }
        expose.extend(part.expose);
        sections.push_str(&part.html);
    }
    for (k, v) in &denial.headers {
        headers.append(k.clone(), v.clone());
        expose.push(k.clone());
    }

    let mut res = if r.html {
        paywall(&denial, &detail, &route, price, topup_url.as_deref(), &sections, r.request_id)
    } else {
        problem::problem_response(
            r.public_base,
            denial.reason.as_str(),
            status,
            detail,
            r.instance,
            r.request_id,
            extra,
        )
    };
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-robots-tag", HeaderValue::from_static("noindex"));
    if let Some(secs) = denial.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    let always = ALWAYS_EXPOSED;
    let mut names: Vec<&str> = Vec::new();
    for name in expose.iter().chain(always.iter()) {
        if !names.iter().any(|n| n.eq_ignore_ascii_case(name.as_str())) {
            names.push(name.as_str());
        }
    }
    if let Ok(v) = HeaderValue::from_str(&names.join(", ")) {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
    }
    h.extend(headers);
    res
}

fn paywall(
    denial: &Denial,
    detail: &str,
    route: &str,
    price: Micros,
    topup_url: Option<&str>,
    sections: &str,
    request_id: &str,
) -> Response<Body> {
    let doc = problem::doc(denial.reason.as_str());
    let title = doc.map(|d| d.title).unwrap_or("Payment required");
    let fix = doc.map(|d| problem::code_spans(&html_escape(d.fix))).unwrap_or_default();
    let topup = match topup_url {
        // tollgate's own top-up endpoint takes a POST: a form, with the key typed in.
        Some(u)
            if u.ends_with(crate::selfservice::TOPUP_PATH)
                && (denial.reason == Reason::InsufficientFunds || denial.reason == Reason::PaymentMissing) =>
        {
            format!("<h2>Top up by card</h2>{}", crate::selfservice::topup_form(u, None))
        }
        Some(u) if denial.reason == Reason::InsufficientFunds || denial.reason == Reason::PaymentMissing => {
            format!("<p><a class=\"button\" href=\"{u}\">Top up your balance</a></p>", u = html_escape(u))
        }
        _ => String::new(),
    };
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title>\
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:42em;margin:3em auto;padding:0 1em;color:#1d1d1f}}\
.price{{font-size:1.6em;font-weight:600}}code,pre{{background:#f4f4f5;border-radius:4px;padding:.1em .3em}}\
pre{{padding:.8em;overflow-x:auto}}section{{border:1px solid #e4e4e7;border-radius:8px;padding:0 1em;margin:1em 0}}\
.button{{display:inline-block;background:#1d4ed8;color:#fff;padding:.5em 1em;border-radius:6px;text-decoration:none}}\
small{{color:#71717a}}</style></head><body>\
<h1>{title}</h1><p>{detail}</p><p class=\"price\">{price} <small>per request to <code>{route}</code></small></p>\
{topup}<p>{fix}</p><h2>Ways to pay</h2>{sections}\
<p><small>Reason <code>{reason}</code> &middot; request id <code>{rid}</code> &middot; quote it to the operator if you need help.</small></p>\
</body></html>",
        detail = html_escape(detail),
        price = Money::usd(price),
        route = html_escape(route),
        reason = denial.reason.as_str(),
        rid = html_escape(request_id),
    );
    let mut res = Response::new(crate::full(page));
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    res
}

/// Whether the client's `Accept` prefers HTML over JSON (q-values honoured).
pub fn prefers_html(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let (mut html, mut json) = (0.0f32, 0.0f32);
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q =
            parts.filter_map(|p| p.trim().strip_prefix("q=")).find_map(|q| q.trim().parse::<f32>().ok()).unwrap_or(1.0);
        match media.as_str() {
            "text/html" | "application/xhtml+xml" => html = html.max(q),
            "application/json" | "application/problem+json" | "*/*" | "application/*" => json = json.max(q),
            _ => {}
        }
    }
    html > 0.0 && html >= json
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn browsers_get_html_and_programs_get_json() {
        assert!(prefers_html(&accept("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")));
        assert!(!prefers_html(&accept("application/json")));
        assert!(!prefers_html(&accept("*/*")));
        assert!(!prefers_html(&accept("text/html;q=0.5, application/json")));
        assert!(!prefers_html(&HeaderMap::new()));
    }

    #[test]
    fn every_reason_and_rejection_has_a_documented_code_and_status() {
        for reason in Reason::ALL {
            let doc = problem::doc(reason.as_str()).expect("every reason has a problem page");
            assert_eq!(reason.status(), doc.status);
        }
        let r = Responder { public_base: "https://x", request_id: "rid", instance: "/p", html: false };
        let rejections = [
            Rejection::Malformed(Malformed::Connect),
            Rejection::Unroutable(Unroutable::NotFound),
            Rejection::Upstream(ProxyError::BadRequest("x".into())),
            Rejection::Internal("test"),
        ];
        for rej in rejections {
            let code = rej.code();
            assert!(problem::doc(code).is_some(), "{code} has no problem page");
            let res = rej.into_response(&r);
            assert_eq!(res.headers()["x-request-id"], "rid");
            assert_eq!(res.headers()["content-type"], "application/problem+json");
        }
    }
}
