//! The admin listener (the README's "Operations" section): `/metrics`, `/healthz`, `/readyz`, and the
//! `/admin/*` JSON API behind the admin bearer token (compared in constant time).
//!
//! Errors are `{"error": "…"}` saying what to do next. A credit whose idempotency key
//! was used for another top-up (another amount or key) is `409 Conflict`.
//! `GET /admin/transactions?key=&limit=&before=` lists newest first (by `created_at`,
//! then id), at most [`MAX_PAGE`] rows a page, and adds `"next"` (an opaque cursor for
//! `before=`) when more rows exist.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::gateway::Gateway;
use crate::ledger::{Cursor, LedgerError, TxQuery, MAX_PAGE};
use crate::money::Micros;
use crate::Body;

const MAX_BODY: usize = 64 * 1024;

/// Serves one admin request.
pub(crate) async fn handle<B>(gw: Gateway, req: Request<B>) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (&method, path.as_str()) {
        (&Method::GET, "/metrics") => {
            let mut res = Response::new(crate::full(gw.shared.metrics.encode()));
            res.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            return res;
        }
        (&Method::GET, "/healthz") => return json_response(StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            return match tokio::time::timeout(Duration::from_secs(2), gw.shared.ledger.ping()).await {
                Ok(Ok(())) => json_response(StatusCode::OK, json!({"status": "ready"})),
                Ok(Err(e)) => {
                    gw.shared.metrics.ledger_errors.inc();
                    json_response(StatusCode::SERVICE_UNAVAILABLE, json!({"status": "unready", "error": e.to_string()}))
                }
                Err(_) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "unready", "error": "ledger did not answer within 2s"}),
                ),
            };
        }
        _ => {}
    }
    if !path.starts_with("/admin/") {
        return error(StatusCode::NOT_FOUND, "no such endpoint; see /metrics, /healthz, /readyz, /admin/*");
    }
    let snap = gw.snapshot();
    let Some(token) = snap.config.admin.token.as_deref() else {
        return error(StatusCode::FORBIDDEN, "the admin API is disabled: set admin.token in the config");
    };
    if !authorized(req.headers().get(header::AUTHORIZATION), token) {
        let mut res = error(StatusCode::UNAUTHORIZED, "send the admin token as Authorization: Bearer <token>");
        res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"tollgate-admin\""));
        return res;
    }
    let query = req.uri().query().unwrap_or("").to_owned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large or unreadable (limit 64 KiB)"),
    };
    let segments: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
    let ledger = &gw.shared.ledger;
    match (&method, segments.as_slice()) {
        (&Method::POST, ["reload"]) => match gw.reload().await {
            Ok(()) => json_response(StatusCode::OK, json!({"status": "reloaded"})),
            Err(e) => json_response(StatusCode::BAD_REQUEST, json!({"status": "refused", "errors": e.0})),
        },
        (&Method::POST, ["keys"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct CreateKey {
                #[serde(default)]
                balance: Option<Value>,
                label: Option<String>,
            }
            let req: CreateKey = match parse_json(&body) {
                Ok(r) => r,
                Err(res) => return res,
            };
            let balance = match req.balance.as_ref().map(amount).transpose() {
                Ok(b) => b.unwrap_or_default(),
                Err(res) => return res,
            };
            match ledger.create_key(req.label.as_deref(), balance).await {
                Ok(k) => json_response(StatusCode::CREATED, json!(k)),
                Err(e) => ledger_error(&gw, e),
            }
        }
        (&Method::GET, ["keys"]) => match ledger.list_keys().await {
            Ok(keys) => json_response(StatusCode::OK, json!({ "keys": keys })),
            Err(e) => ledger_error(&gw, e),
        },
        (&Method::GET, ["keys", id]) => match ledger.key(id).await {
            Ok(Some(k)) => json_response(StatusCode::OK, json!(k)),
            Ok(None) => error(StatusCode::NOT_FOUND, &format!("no key with id {id:?}")),
            Err(e) => ledger_error(&gw, e),
        },
        (&Method::POST, ["keys", id, "credit"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Credit {
                amount: Value,
                idempotency_key: Option<String>,
            }
            let req: Credit = match parse_json(&body) {
                Ok(r) => r,
                Err(res) => return res,
            };
            let amt = match amount(&req.amount) {
                Ok(a) if a.get() > 0 => a,
                Ok(_) => return error(StatusCode::BAD_REQUEST, "amount must be above zero"),
                Err(res) => return res,
            };
            match ledger.credit(id, amt, req.idempotency_key.as_deref()).await {
                Ok(o) => json_response(
                    StatusCode::OK,
                    json!({"id": id, "balance": o.balance.to_string(), "applied": o.applied}),
                ),
                Err(e) => ledger_error(&gw, e),
            }
        }
        (&Method::POST, ["keys", id, "revoke"]) => match ledger.revoke(id).await {
            Ok(true) => json_response(StatusCode::OK, json!({"id": id, "revoked": true})),
            Ok(false) => error(StatusCode::NOT_FOUND, &format!("no key with id {id:?}")),
            Err(e) => ledger_error(&gw, e),
        },
        // Newest first (by time, then id); `before` is the `next` of the page before.
        (&Method::GET, ["transactions"]) => {
            let mut key = None;
            let mut limit = 100usize;
            let mut before = None;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                match k {
                    "key" => key = Some(v.to_owned()),
                    "limit" => match v.parse::<usize>() {
                        Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
                        _ => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                &format!("limit must be a number from 1 to {MAX_PAGE}; page on with before=<next>"),
                            )
                        }
                    },
                    "before" => match Cursor::parse(v) {
                        Some(c) => before = Some(c),
                        None => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                "before must be the \"next\" value of an earlier page, unchanged",
                            )
                        }
                    },
                    _ => {}
                }
            }
            match ledger.transaction_page(TxQuery { key: key.as_deref(), before, limit }).await {
                Ok(page) => {
                    let mut body = json!({ "transactions": page.transactions });
                    if let Some(next) = page.next {
                        body["next"] = json!(next.encode());
                    }
                    json_response(StatusCode::OK, body)
                }
                Err(e) => ledger_error(&gw, e),
            }
        }
        (&Method::GET, ["settlements"]) => match ledger.settlements(100).await {
            Ok(s) => json_response(StatusCode::OK, json!({ "settlements": s })),
            Err(e) => ledger_error(&gw, e),
        },
        _ => error(StatusCode::NOT_FOUND, &format!("no admin endpoint {method} {path}")),
    }
}

fn authorized(header: Option<&HeaderValue>, token: &str) -> bool {
    let Some(v) = header.and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let Some((scheme, given)) = v.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer") && bool::from(given.trim().as_bytes().ct_eq(token.as_bytes()))
}

/// A money amount: a decimal string, or a JSON integer of whole units. A JSON number
/// with a fraction is refused: it has already been through a binary float when parsed,
/// and money is never rounded.
fn amount(v: &Value) -> Result<Micros, Response<Body>> {
    let decimal_please = || error(StatusCode::BAD_REQUEST, "send amounts as decimal strings, like \"5.00\"");
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_u64().ok_or_else(decimal_please)?.to_string(),
        _ => return Err(decimal_please()),
    };
    Micros::parse(&s).map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad amount: {e}")))
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Response<Body>> {
    let body = if body.is_empty() { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad JSON body: {e}")))
}

fn ledger_error(gw: &Gateway, e: LedgerError) -> Response<Body> {
    match e {
        LedgerError::NoSuchKey(id) => error(StatusCode::NOT_FOUND, &format!("no key with id {id:?}")),
        LedgerError::Overflow => error(StatusCode::BAD_REQUEST, "amount too large"),
        conflict @ LedgerError::IdempotencyConflict { .. } => error(StatusCode::CONFLICT, &conflict.to_string()),
        LedgerError::Unavailable(_) => {
            gw.shared.metrics.ledger_errors.inc();
            let mut res = error(StatusCode::SERVICE_UNAVAILABLE, "the ledger is unavailable; retry shortly");
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            res
        }
        LedgerError::Other(m) => {
            gw.shared.metrics.ledger_errors.inc();
            tracing::error!(error = %m, "admin ledger operation failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, "ledger error; see the gateway's log")
        }
    }
}

pub(crate) fn json_response(status: StatusCode, v: Value) -> Response<Body> {
    let mut res = Response::new(crate::full(serde_json::to_vec(&v).unwrap_or_default()));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn error(status: StatusCode, msg: &str) -> Response<Body> {
    json_response(status, json!({ "error": msg }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_must_match_exactly() {
        let t = "0123456789abcdef-token";
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(authorized(Some(&h("Bearer 0123456789abcdef-token")), t));
        assert!(authorized(Some(&h("bearer 0123456789abcdef-token")), t));
        assert!(!authorized(Some(&h("Bearer 0123456789abcdef-toke")), t));
        assert!(!authorized(Some(&h("Basic 0123456789abcdef-token")), t));
        assert!(!authorized(None, t));
    }
}
