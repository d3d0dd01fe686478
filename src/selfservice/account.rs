//! A key holder's own account: `GET account`, `GET account/transactions`,
//! `GET account/requests/{request_id}`, and the authentication every customer endpoint
//! shares.
//!
//! The key is read exactly as the credits rail reads it on a paid route (the
//! configured header as `Bearer <key>`, or `X-API-Key`), and a missing, malformed,
//! unknown or revoked key gets the same 402 problem a paid route gives
//! (`payment_missing`, `payment_malformed`, `payment_invalid`) with the `credits`
//! member and `WWW-Authenticate`. A key sees only its own rows: the transaction
//! listing is filtered by its id in the ledger, and a request id of another key is
//! the same `404 not_found` as one that never existed, so no answer tells whether
//! another key or request exists.

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Map, Value};

use super::{backend_unavailable, json_response, problem, Cx, SelfService};
use crate::ledger::{Account, Cursor, LedgerError, SecretHash, TxKind, TxQuery, MAX_PAGE};
use crate::money::Micros;
use crate::payment::{Denial, Reason};
use crate::Body;

/// Rows on a page of `account/transactions` when `limit` is not given.
const DEFAULT_PAGE: usize = 100;

impl SelfService {
    /// The account of the key in `headers` (or, for a browser form, `form_key`).
    pub(super) async fn authenticate(
        &self,
        headers: &HeaderMap,
        form_key: Option<&str>,
        cx: &Cx<'_>,
    ) -> Result<Account, Response<Body>> {
        let mut from_form = HeaderMap::new();
        let headers = match form_key.map(HeaderValue::from_str) {
            // The form field stands in for the header a form cannot set.
            Some(Ok(v)) => {
                from_form.insert(HeaderName::from_static("x-api-key"), v);
                &from_form
            }
            Some(Err(_)) => {
                let d =
                    Denial::new(Reason::PaymentMalformed, "The API key could not be read: it holds non-ASCII bytes.");
                return Err(self.refuse(d, cx));
            }
            None => headers,
        };
        let key = match self.credits.key(headers) {
            Ok(Some(k)) => k,
            Ok(None) => return Err(self.refuse(Denial::new(Reason::PaymentMissing, "No API key was sent."), cx)),
            Err(d) => return Err(self.refuse(d, cx)),
        };
        let window = self.spend_cap.map(|c| c.per);
        match self.ledger.account(SecretHash::of(key), window).await {
            Ok(Some(a)) if a.key.revoked => Err(self.refuse(
                Denial::new(Reason::PaymentInvalid, format!("The API key {} has been revoked.", a.key.id))
                    .cause("revoked_key"),
                cx,
            )),
            Ok(Some(a)) => Ok(a),
            Ok(None) => {
                Err(self
                    .refuse(Denial::new(Reason::PaymentInvalid, "The API key is not known.").cause("unknown_key"), cx))
            }
            Err(e) => Err(self.ledger_down(e, cx)),
        }
    }

    /// A key refusal, shaped like the credits rail's part of a paid route's 402.
    fn refuse(&self, d: Denial, cx: &Cx<'_>) -> Response<Body> {
        let mut extra = Map::new();
        extra.insert("reason".into(), json!(d.reason.as_str()));
        if let Some(c) = &d.cause {
            extra.insert("cause".into(), json!(c));
        }
        extra.insert("credits".into(), self.credits_member());
        let mut headers = Vec::new();
        let challenge = format!("Bearer realm=\"tollgate\", error=\"{}\"", d.reason.as_str());
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            headers.push((header::WWW_AUTHENTICATE, v));
        }
        headers.push((HeaderName::from_static("x-robots-tag"), HeaderValue::from_static("noindex")));
        problem(cx, d.reason.as_str(), d.detail, extra, headers)
    }

    /// The `credits` member of a 402: how to send a key, and where to top one up.
    fn credits_member(&self) -> Value {
        let scheme = if self.credits_header == header::AUTHORIZATION { "Bearer" } else { "" };
        json!({ "header": self.credits_header_display, "scheme": scheme, "topup_url": self.topup_url })
    }

    pub(super) fn ledger_down(&self, e: LedgerError, cx: &Cx<'_>) -> Response<Body> {
        self.metrics.ledger_errors.inc();
        tracing::warn!(request_id = %cx.request_id, error = %e, "ledger unavailable for a self-service request");
        backend_unavailable(cx, "The payment ledger is unavailable; retry shortly.")
    }

    // === endpoints ===

    /// `GET account`.
    pub(super) async fn account(&self, req: &Request<Incoming>, cx: &Cx<'_>) -> Response<Body> {
        let a = match self.authenticate(req.headers(), None, cx).await {
            Ok(a) => a,
            Err(res) => return res,
        };
        let spend_cap = match (self.spend_cap, a.spent) {
            (Some(cap), spent) => json!({
                "limit": cap.amount.to_string(),
                "window": if cap.per.as_secs() <= 3600 { "hour" } else { "day" },
                "spent": spent.unwrap_or(Micros::ZERO).to_string(),
            }),
            (None, _) => Value::Null,
        };
        json_response(
            StatusCode::OK,
            json!({
                "key_id": a.key.id,
                "label": a.key.label,
                "balance": a.key.balance.to_string(),
                "currency": "USD",
                "held": a.held.to_string(),
                "spend_cap": spend_cap,
                "topup_url": self.topup_url,
            }),
        )
    }

    /// `GET account/transactions?limit=N&before=CURSOR`: the key's own rows, newest
    /// first, as the admin API shows them.
    pub(super) async fn transactions(&self, req: &Request<Incoming>, cx: &Cx<'_>) -> Response<Body> {
        let a = match self.authenticate(req.headers(), None, cx).await {
            Ok(a) => a,
            Err(res) => return res,
        };
        let (mut limit, mut before) = (DEFAULT_PAGE, None);
        let pairs = super::stripe::decode_form(req.uri().query().unwrap_or("").as_bytes()).unwrap_or_default();
        for (k, v) in pairs {
            match k.as_str() {
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_PAGE).contains(&n) => limit = n,
                    _ => {
                        let detail =
                            format!("limit must be a number from 1 to {MAX_PAGE}; page on with before=<next>.");
                        return problem(cx, "bad_request", detail, Map::new(), Vec::new());
                    }
                },
                "before" => match Cursor::parse(&v) {
                    Some(c) => before = Some(c),
                    None => {
                        let detail = "before must be the \"next\" value of an earlier page, unchanged.".to_owned();
                        return problem(cx, "bad_request", detail, Map::new(), Vec::new());
                    }
                },
                _ => {}
            }
        }
        match self.ledger.transaction_page(TxQuery { key: Some(&a.key.id), before, limit }).await {
            Ok(page) => {
                let mut body = json!({ "transactions": page.transactions });
                if let Some(next) = page.next {
                    body["next"] = json!(next.encode());
                }
                json_response(StatusCode::OK, body)
            }
            Err(e) => self.ledger_down(e, cx),
        }
    }

    /// `GET account/requests/{request_id}`: what one of the key's requests cost.
    pub(super) async fn request(&self, req: &Request<Incoming>, request_id: &str, cx: &Cx<'_>) -> Response<Body> {
        let a = match self.authenticate(req.headers(), None, cx).await {
            Ok(a) => a,
            Err(res) => return res,
        };
        let rows = match self.ledger.request_transactions(&a.key.id, request_id).await {
            Ok(rows) => rows,
            Err(e) => return self.ledger_down(e, cx),
        };
        let Some(debit) = rows.iter().find(|t| t.kind == TxKind::Debit) else {
            // Never made, or made with another key: the same answer.
            let detail = format!("No request {request_id:?} was paid with this key.");
            return problem(cx, "not_found", detail, Map::new(), Vec::new());
        };
        let refunded =
            rows.iter().filter(|t| t.kind == TxKind::Refund).fold(0u64, |s, t| s.saturating_add(t.amount.get()));
        let mut body = json!({
            "request_id": request_id,
            "route": debit.route,
            "status": debit.status,
            "amount": Micros(debit.amount.get().saturating_sub(refunded)).to_string(),
            "created_at": debit.created_at,
        });
        // The metered detail (`held`, `model`, `usage`, `usage_source`) as the
        // transaction itself shows it, when it has any.
        if let (Value::Object(b), Ok(Value::Object(d))) = (&mut body, serde_json::to_value(debit)) {
            for k in ["held", "model", "usage", "usage_source"] {
                if let Some(v) = d.get(k) {
                    b.insert(k.into(), v.clone());
                }
            }
        }
        body["transactions"] = json!(rows);
        json_response(StatusCode::OK, body)
    }
}
