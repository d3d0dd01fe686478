//! RFC 9457 problem details for the gateway's own answers.
//!
//! Every response tollgate makes up itself (no route, upstream down, upstream slow,
//! payment problems) is `application/problem+json` whose `type` is a page tollgate
//! serves at `{public_url}/.well-known/tollgate/problems/{code}`, so a person who
//! follows the link learns what happened and how to fix it. [`DOCS`] is the one table
//! of codes, titles and statuses; `rejection.rs` is the one place that builds such
//! responses.

use http::{header, HeaderValue, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::Body;

pub(crate) const PROBLEM_PATH: &str = "/.well-known/tollgate/problems/";

/// What a problem code means, for the `title` and the explanatory page.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProblemDoc {
    pub code: &'static str,
    pub title: &'static str,
    pub status: StatusCode,
    pub what: &'static str,
    pub fix: &'static str,
}

pub(crate) const DOCS: &[ProblemDoc] = &[
    ProblemDoc { code: "payment_missing", title: "Payment required", status: StatusCode::PAYMENT_REQUIRED,
        what: "The route is priced and the request carried no payment credential of any rail the route accepts.",
        fix: "Send an API key as `Authorization: Bearer <key>` (or `X-API-Key`), or pay with x402 by answering the challenge in the `PAYMENT-REQUIRED` header with a `PAYMENT-SIGNATURE` (v2) or `X-PAYMENT` (v1) header." },
    ProblemDoc { code: "payment_malformed", title: "Malformed payment credential", status: StatusCode::PAYMENT_REQUIRED,
        what: "A payment credential was present but could not be decoded: bad base64 or JSON, wrong shape, or a value that is too large.",
        fix: "Send the key exactly as it was issued, or let an official x402 client build the payment header." },
    ProblemDoc { code: "payment_method_unsupported", title: "Payment method not accepted here", status: StatusCode::PAYMENT_REQUIRED,
        what: "The credential belongs to a rail, scheme, network or asset that this route does not accept.",
        fix: "Use one of the methods listed in the challenge (`accepts`, `credits`)." },
    ProblemDoc { code: "payment_invalid", title: "Payment credential invalid", status: StatusCode::PAYMENT_REQUIRED,
        what: "The key is unknown or revoked, or the payment's signature, recipient or amount is wrong.",
        fix: "Check the key, or sign a fresh payment for the exact amount and recipient in the challenge." },
    ProblemDoc { code: "payment_expired", title: "Payment authorization expired", status: StatusCode::PAYMENT_REQUIRED,
        what: "The payment authorization is outside its validity window (validAfter/validBefore).",
        fix: "Sign a new payment and send it promptly; check the client's clock." },
    ProblemDoc { code: "payment_replayed", title: "Payment already used", status: StatusCode::PAYMENT_REQUIRED,
        what: "This single-use payment was already presented.",
        fix: "Sign a new payment with a fresh nonce for each request." },
    ProblemDoc { code: "insufficient_funds", title: "Insufficient funds", status: StatusCode::PAYMENT_REQUIRED,
        what: "The key's balance, or the payer's token balance, is below the price of the route.",
        fix: "Top up the key (see `credits.topup_url`) or fund the paying wallet." },
    ProblemDoc { code: "spend_cap_reached", title: "Spend cap reached", status: StatusCode::PAYMENT_REQUIRED,
        what: "The key has spent its configured maximum for the current hour or day.",
        fix: "Wait for the window to roll over, or ask the operator to raise the cap." },
    ProblemDoc { code: "settlement_failed", title: "Settlement failed", status: StatusCode::PAYMENT_REQUIRED,
        what: "The payment was valid but charging or settling it failed, so the response was withheld.",
        fix: "Retry with a new payment; if it keeps failing, quote the request_id to the operator." },
    ProblemDoc { code: "payment_backend_unavailable", title: "Payment backend unavailable", status: StatusCode::SERVICE_UNAVAILABLE,
        what: "The ledger or the payment facilitator could not be reached in time. Nothing was charged and the request was not forwarded.",
        fix: "Retry after the number of seconds in `Retry-After`." },
    ProblemDoc { code: "rate_limited", title: "Too many requests", status: StatusCode::TOO_MANY_REQUESTS,
        what: "The key or client address exceeded the route's rate limit.",
        fix: "Slow down; retry after the number of seconds in `Retry-After`." },
    ProblemDoc { code: "model_not_priced", title: "Model not priced", status: StatusCode::BAD_REQUEST,
        what: "The route charges per token, and the model the request names has no price on it. Nothing was charged or forwarded.",
        fix: "Use one of the models the API's operator prices, or ask the operator to price this one." },
    ProblemDoc { code: "request_unreadable", title: "Request cannot be priced", status: StatusCode::BAD_REQUEST,
        what: "The route charges per token, and the request body is not a JSON object naming a `model` (with valid token limits), so its price cannot be known. Nothing was charged or forwarded.",
        fix: "Send the JSON body the API documents, with `model` and, if you set them, non-negative integer token limits." },
    ProblemDoc { code: "request_too_large", title: "Request too large", status: StatusCode::PAYLOAD_TOO_LARGE,
        what: "The request body is larger than this route reads to price a request, or than this endpoint reads. Nothing was charged or forwarded.",
        fix: "Send a smaller request (fewer or shorter messages)." },
    ProblemDoc { code: "route_not_found", title: "No route", status: StatusCode::NOT_FOUND,
        what: "No configured route matches this host, method and path.",
        fix: "Check the URL and method against the API's documentation." },
    ProblemDoc { code: "upstream_unavailable", title: "Upstream unavailable", status: StatusCode::BAD_GATEWAY,
        what: "tollgate could not connect to the API behind it. Nothing was charged.",
        fix: "Retry later; the operator should check the upstream." },
    ProblemDoc { code: "upstream_timeout", title: "Upstream timed out", status: StatusCode::GATEWAY_TIMEOUT,
        what: "The API behind tollgate did not answer in time. Nothing was charged.",
        fix: "Retry later, or with a smaller request." },
    ProblemDoc { code: "internal_error", title: "Internal error", status: StatusCode::INTERNAL_SERVER_ERROR,
        what: "tollgate could not handle the request because of a fault of its own. Nothing was charged.",
        fix: "Retry; if it keeps failing, quote the request_id to the operator." },
    ProblemDoc { code: "bad_request", title: "Bad request", status: StatusCode::BAD_REQUEST,
        what: "The request could not be forwarded as sent.",
        fix: "Check the request's URL and headers." },
    // The customer self-service endpoints (`/.well-known/tollgate/account…`, Stripe's webhook).
    ProblemDoc { code: "not_found", title: "Not found", status: StatusCode::NOT_FOUND,
        what: "There is nothing at this address for this key: no such endpoint, no request with this id made with this key, or top-ups by card are not set up here.",
        fix: "Check the URL; request ids come from the `X-Request-Id` header of a response to your key." },
    ProblemDoc { code: "method_not_allowed", title: "Method not allowed", status: StatusCode::METHOD_NOT_ALLOWED,
        what: "This endpoint does not take this HTTP method.",
        fix: "Use one of the methods in the `Allow` header." },
    ProblemDoc { code: "topup_amount_invalid", title: "Top-up amount not accepted", status: StatusCode::BAD_REQUEST,
        what: "The amount is missing, not a decimal amount, finer than the currency's smallest unit (cents), or outside the operator's top-up range.",
        fix: "Send a decimal string in whole cents within the range named in `detail`, like `{\"amount\": \"10.00\"}`." },
    ProblemDoc { code: "topup_failed", title: "Top-up could not be started", status: StatusCode::BAD_GATEWAY,
        what: "The payment provider refused to create the checkout. Nothing was charged.",
        fix: "Quote the request_id to the operator, whose log has the provider's reason." },
    ProblemDoc { code: "webhook_invalid", title: "Webhook not accepted", status: StatusCode::BAD_REQUEST,
        what: "The webhook delivery is unsigned, signed with another secret, too old or too far in the future, unreadable, or describes a payment tollgate did not set up that way. Nothing was credited.",
        fix: "Check `stripe.webhook_secret` against the endpoint's signing secret and the server clock; the gateway's log says which." },
];

pub(crate) fn doc(code: &str) -> Option<&'static ProblemDoc> {
    DOCS.iter().find(|d| d.code == code)
}

/// A problem+json response. `extra` members are added after the standard ones.
pub(crate) fn problem_response(
    public_base: &str,
    code: &'static str,
    status: StatusCode,
    detail: String,
    instance: &str,
    request_id: &str,
    extra: Map<String, Value>,
) -> Response<Body> {
    let title = doc(code).map(|d| d.title).unwrap_or("Error");
    let mut body = json!({
        "type": format!("{public_base}{PROBLEM_PATH}{code}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "instance": instance,
        "request_id": request_id,
    });
    if let Value::Object(m) = &mut body {
        m.extend(extra);
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut res = Response::new(crate::full(bytes));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The page served at a problem `type` URL.
pub(crate) fn problem_page(code: &str) -> Option<Response<Body>> {
    let d = doc(code)?;
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<style>body{{font:16px/1.5 system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em;color:#222}}\
code{{background:#f3f3f3;padding:0 .2em}}</style></head><body>\
<h1>{title}</h1><p>HTTP {status} &middot; reason <code>{code}</code></p>\
<h2>What happened</h2><p>{what}</p><h2>How to fix it</h2><p>{fix}</p>\
<p>Quote the <code>request_id</code> of the response when you contact the operator.</p></body></html>",
        title = d.title,
        status = d.status.as_u16(),
        code = d.code,
        what = html_escape(d.what),
        fix = code_spans(&html_escape(d.fix)),
    );
    let mut res = Response::new(crate::full(html));
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    Some(res)
}

pub(crate) fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Turns `backtick` spans into `<code>` (input already escaped).
pub(crate) fn code_spans(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 16);
    let mut open = false;
    for c in s.chars() {
        if c == '`' {
            out.push_str(if open { "</code>" } else { "<code>" });
            open = !open;
        } else {
            out.push(c);
        }
    }
    if open {
        out.push_str("</code>");
    }
    out
}
