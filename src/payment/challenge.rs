//! Rendering a refusal: the 402 contract of DESIGN §4.
//!
//! RFC 9457 problem+json with the extension members `reason`, `request_id`, `route`,
//! `price` and one section per offered rail (the x402 rail adds the v1 body fields and
//! the v2 `PAYMENT-REQUIRED` header). Browsers (`Accept` preferring `text/html`) get a
//! self-contained page that explains each way to pay.

use http::header::{self, HeaderValue};
use http::{HeaderMap, Response};
use serde_json::{json, Map, Value};

use super::{ChallengePart, Denial, Reason};
use crate::money::Micros;
use crate::problem::{self, html_escape};
use crate::Body;

/// Everything a refusal page needs besides the rails' parts.
#[derive(Debug)]
pub struct Refusal<'a> {
    pub public_base: &'a str,
    pub route: &'a str,
    pub price: Micros,
    pub request_id: &'a str,
    pub instance: &'a str,
    pub topup_url: Option<&'a str>,
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

pub fn render(r: &Refusal<'_>, denial: &Denial, parts: Vec<ChallengePart>, html: bool) -> Response<Body> {
    let reason = denial.reason;
    let mut extra = Map::new();
    extra.insert("reason".into(), json!(reason.as_str()));
    extra.insert("route".into(), json!(r.route));
    extra.insert("price".into(), json!({ "amount": r.price.to_string(), "currency": "USD" }));
    if let Some(c) = &denial.cause {
        extra.insert("cause".into(), json!(c));
    }
    let mut headers = Vec::new();
    let mut html_sections = String::new();
    for p in parts {
        extra.extend(p.body);
        headers.extend(p.headers);
        html_sections.push_str(&p.html);
    }

    let mut res = if html {
        paywall(r, denial, &html_sections)
    } else {
        problem::problem_response(
            r.public_base,
            reason.as_str(),
            reason.status(),
            denial.detail.clone(),
            r.instance,
            r.request_id,
            extra,
        )
    };
    *res.status_mut() = reason.status();
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-robots-tag", HeaderValue::from_static("noindex"));
    if let Some(secs) = denial.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    for (k, v) in headers.into_iter().chain(denial.headers.iter().cloned()) {
        h.append(k, v);
    }
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "PAYMENT-REQUIRED, PAYMENT-RESPONSE, X-PAYMENT-RESPONSE, WWW-Authenticate, Retry-After, X-Request-Id",
        ),
    );
    res
}

fn paywall(r: &Refusal<'_>, denial: &Denial, sections: &str) -> Response<Body> {
    let doc = problem::doc(denial.reason.as_str());
    let title = doc.map(|d| d.title).unwrap_or("Payment required");
    let fix = doc.map(|d| problem::code_spans(&html_escape(d.fix))).unwrap_or_default();
    let topup = match r.topup_url {
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
<h1>{title}</h1><p>{detail}</p><p class=\"price\">{price} USD <small>per request to <code>{route}</code></small></p>\
{topup}<p>{fix}</p><h2>Ways to pay</h2>{sections}\
<p><small>Reason <code>{reason}</code> &middot; request id <code>{rid}</code> &middot; quote it to the operator if you need help.</small></p>\
</body></html>",
        detail = html_escape(&denial.detail),
        price = r.price,
        route = html_escape(r.route),
        reason = denial.reason.as_str(),
        rid = html_escape(r.request_id),
    );
    let mut res = Response::new(crate::full(page));
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    res
}

/// Keeps a `Value` map small to build in rails.
pub fn section(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
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
}
