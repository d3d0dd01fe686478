//! `POST /.well-known/tollgate/account/topup`: a Stripe Checkout Session for a top-up
//! of the caller's own key.
//!
//! The amount is checked before Stripe is called: within `min_topup`..`max_topup`, and
//! no finer than the currency's minor unit (USD: cents), since Stripe's `unit_amount`
//! is an integer of those. The session carries the key id twice — as
//! `client_reference_id`, which the webhook credits, and as
//! `metadata[tollgate_key_id]`, which it cross-checks — and the amount as
//! `metadata[tollgate_amount]`, for people reading the Stripe dashboard only: the
//! webhook credits what Stripe says was paid (`amount_total`), never metadata.
//!
//! **Idempotency.** Every request to Stripe carries an `Idempotency-Key` so a
//! double-submitted form or a client retry gets the *same* session back instead of a
//! second one. It is derived from the key id, the amount in cents, and either the
//! client's own `Idempotency-Key` header (hashed, so any string is safe to forward),
//! or, without one, the current [`WINDOW`]-second window of the clock. A deliberate
//! second top-up of the same amount inside one window gets the first session back,
//! which is harmless: it is unpaid, or already paid and its page says so. Two replicas
//! behind a load balancer derive the same key, so they agree too.

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::config::{StripeConfig, CURRENCY, CURRENCY_DECIMALS, MICROS_PER_MINOR};
use super::stripe::StripeError;
use super::{backend_unavailable, json_response, problem, read_body, unix_now, Cx, SelfService, Stripe};
use crate::money::Micros;
use crate::Body;

/// Seconds in which repeated top-ups of one amount by one key are the same session.
pub(crate) const WINDOW: u64 = 60;
/// Largest top-up request body read (a JSON object or a form of two fields).
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// Why an amount cannot be a top-up (`400 topup_amount_invalid`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AmountError {
    #[error("the amount is missing; send {{\"amount\": \"10.00\"}}")]
    Missing,
    #[error("{0:?} is not a decimal amount like \"10.00\"")]
    Syntax(String),
    #[error("{0} USD has more than {CURRENCY_DECIMALS} decimal places; card payments are in whole cents")]
    TooPrecise(String),
    #[error("{amount} USD is outside the top-up range {min} to {max} USD")]
    OutOfRange { amount: Micros, min: Micros, max: Micros },
}

/// The amount of a top-up, checked against the section's limits.
pub(crate) fn parse_amount(raw: Option<&str>, cfg: &StripeConfig) -> Result<Micros, AmountError> {
    let raw = raw.map(str::trim).filter(|s| !s.is_empty()).ok_or(AmountError::Missing)?;
    let amount = Micros::parse(raw).map_err(|e| match e {
        crate::money::ParseMoneyError::TooPrecise(_) => AmountError::TooPrecise(raw.to_owned()),
        _ => AmountError::Syntax(raw.to_owned()),
    })?;
    if amount.get() % MICROS_PER_MINOR != 0 {
        return Err(AmountError::TooPrecise(raw.to_owned()));
    }
    if amount < cfg.min_topup || amount > cfg.max_topup {
        return Err(AmountError::OutOfRange { amount, min: cfg.min_topup, max: cfg.max_topup });
    }
    Ok(amount)
}

/// The `Idempotency-Key` sent to Stripe (see the module docs).
pub(crate) fn idempotency_key(key_id: &str, amount: Micros, client_key: Option<&str>, now: u64) -> String {
    let cents = amount.get() / MICROS_PER_MINOR;
    match client_key {
        Some(k) => {
            let h = Sha256::digest(k.as_bytes());
            format!("tollgate-topup-{key_id}-{cents}-c{}", hex::encode(&h[..12]))
        }
        None => format!("tollgate-topup-{key_id}-{cents}-w{}", now / WINDOW),
    }
}

/// The Checkout Session's form fields.
pub(crate) fn session_form(cfg: &StripeConfig, key_id: &str, amount: Micros) -> Vec<(&'static str, String)> {
    vec![
        ("mode", "payment".to_owned()),
        ("line_items[0][price_data][currency]", CURRENCY.to_owned()),
        ("line_items[0][price_data][unit_amount]", (amount.get() / MICROS_PER_MINOR).to_string()),
        ("line_items[0][price_data][product_data][name]", format!("API credits ({amount} USD)")),
        ("line_items[0][quantity]", "1".to_owned()),
        ("client_reference_id", key_id.to_owned()),
        ("metadata[tollgate_key_id]", key_id.to_owned()),
        ("metadata[tollgate_amount]", amount.to_string()),
        ("success_url", cfg.success_url.as_str().to_owned()),
        ("cancel_url", cfg.cancel_url.as_str().to_owned()),
    ]
}

/// The JSON body of a top-up.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopupRequest {
    amount: Option<Value>,
}

impl SelfService {
    /// `POST account/topup`: JSON with the key in a header → `201` and the session;
    /// a browser form with the key in a field → `303` to Stripe's page.
    pub(super) async fn topup(&self, s: &Stripe, req: Request<Incoming>, cx: &Cx<'_>) -> Response<Body> {
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"));
        let headers = req.headers().clone();
        let body = match read_body(req, MAX_BODY, cx).await {
            Ok(b) => b,
            Err(res) => return res,
        };
        let (amount, form_key) = if form {
            let Some(fields) = super::stripe::decode_form(&body) else {
                return problem(cx, "bad_request", "The form is not UTF-8.".into(), Map::new(), Vec::new());
            };
            let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.trim().to_owned());
            (field("amount"), field("key").filter(|k| !k.is_empty()))
        } else {
            let parsed: Result<TopupRequest, _> =
                serde_json::from_slice(if body.is_empty() { b"{}" } else { &body[..] });
            match parsed {
                Ok(TopupRequest { amount: Some(Value::String(a)) }) => (Some(a), None),
                // Whole units as a JSON integer are exact; a fraction went through a float.
                Ok(TopupRequest { amount: Some(Value::Number(n)) }) if n.is_u64() => (Some(n.to_string()), None),
                Ok(TopupRequest { amount: Some(other) }) => {
                    let detail = format!("Send the amount as a decimal string like \"10.00\", not {other}.");
                    return problem(cx, "topup_amount_invalid", detail, Map::new(), Vec::new());
                }
                Ok(TopupRequest { amount: None }) => (None, None),
                Err(e) => {
                    let detail = format!("The body is not {{\"amount\": \"10.00\"}}: {e}.");
                    return problem(cx, "bad_request", detail, Map::new(), Vec::new());
                }
            }
        };
        let account = match self.authenticate(&headers, form_key.as_deref(), cx).await {
            Ok(a) => a,
            Err(res) => return res,
        };
        let amount = match parse_amount(amount.as_deref(), &s.cfg) {
            Ok(a) => a,
            Err(e) => return problem(cx, "topup_amount_invalid", format!("{e}."), Map::new(), Vec::new()),
        };
        let key_id = &account.key.id;
        let client_key = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
        let idem = idempotency_key(key_id, amount, client_key, unix_now().max(0) as u64);
        let session = match s.client.create_checkout_session(&session_form(&s.cfg, key_id, amount), &idem).await {
            Ok(session) => session,
            Err(e) => return self.stripe_failed(e, cx),
        };
        s.created.inc();
        tracing::info!(request_id = %cx.request_id, key_id = %key_id, session = %session.id, amount = %amount,
            "stripe checkout session created");
        if form {
            let mut res = Response::new(crate::empty());
            *res.status_mut() = StatusCode::SEE_OTHER;
            if let Ok(v) = HeaderValue::from_str(&session.url) {
                res.headers_mut().insert(header::LOCATION, v);
            }
            return res;
        }
        json_response(
            StatusCode::CREATED,
            json!({
                "url": session.url,
                "session_id": session.id,
                "amount": amount.to_string(),
                "expires_at": session.expires_at,
            }),
        )
    }

    fn stripe_failed(&self, e: StripeError, cx: &Cx<'_>) -> Response<Body> {
        if e.transient() {
            tracing::warn!(request_id = %cx.request_id, error = %e, "stripe unavailable; no checkout session");
            return backend_unavailable(cx, "The payment provider is unavailable; nothing was charged. Retry shortly.");
        }
        // Stripe's own message, for the operator (it never contains the secret key).
        tracing::error!(request_id = %cx.request_id, error = %e, "stripe refused to create a checkout session");
        let detail = "The payment provider refused to start the checkout; nothing was charged. The operator's log \
                      has the reason."
            .to_owned();
        problem(cx, "topup_failed", detail, Map::new(), Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::values::Problems;
    use crate::selfservice::config::RawStripeConfig;

    fn cfg() -> StripeConfig {
        let raw: RawStripeConfig = toml::from_str(
            "secret_key = \"sk_test_1\"\nwebhook_secret = \"whsec_1\"\nmin_topup = \"5\"\nmax_topup = \"500\"\n\
             success_url = \"https://e.com/ok\"\ncancel_url = \"https://e.com/no\"\n",
        )
        .unwrap();
        StripeConfig::parse(raw, &mut Problems::default()).unwrap()
    }

    #[test]
    fn amounts_are_whole_cents_within_the_limits() {
        let c = cfg();
        assert_eq!(parse_amount(Some("10.00"), &c), Ok(Micros(10_000_000)));
        assert_eq!(parse_amount(Some("5"), &c), Ok(Micros(5_000_000)));
        assert_eq!(parse_amount(Some("500.00"), &c), Ok(Micros(500_000_000)));
        assert!(matches!(parse_amount(Some("10.001"), &c), Err(AmountError::TooPrecise(_))));
        assert!(matches!(parse_amount(Some("10.0000001"), &c), Err(AmountError::TooPrecise(_))));
        assert!(matches!(parse_amount(Some("4.99"), &c), Err(AmountError::OutOfRange { .. })));
        assert!(matches!(parse_amount(Some("500.01"), &c), Err(AmountError::OutOfRange { .. })));
        assert!(matches!(parse_amount(Some("-5"), &c), Err(AmountError::Syntax(_))));
        assert!(matches!(parse_amount(Some("1e3"), &c), Err(AmountError::Syntax(_))));
        assert_eq!(parse_amount(Some(" "), &c), Err(AmountError::Missing));
        assert_eq!(parse_amount(None, &c), Err(AmountError::Missing));
    }

    #[test]
    fn a_retry_is_the_same_session_and_another_amount_is_not() {
        let a = Micros(10_000_000);
        let k = idempotency_key("key_1", a, None, 1_200);
        assert_eq!(k, idempotency_key("key_1", a, None, 1_259));
        assert_ne!(k, idempotency_key("key_1", a, None, 1_260));
        assert_ne!(k, idempotency_key("key_1", Micros(20_000_000), None, 1_200));
        assert_ne!(k, idempotency_key("key_2", a, None, 1_200));
        let c = idempotency_key("key_1", a, Some("click-1 \u{e9}"), 1_200);
        assert_eq!(c, idempotency_key("key_1", a, Some("click-1 \u{e9}"), 99_999));
        assert!(c.is_ascii() && c.len() < 255, "{c}");
    }

    #[test]
    fn the_session_carries_the_key_twice_and_the_amount_in_cents() {
        let f = session_form(&cfg(), "key_ab", Micros(12_340_000));
        let get = |k: &str| f.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("line_items[0][price_data][unit_amount]"), Some("1234"));
        assert_eq!(get("client_reference_id"), Some("key_ab"));
        assert_eq!(get("metadata[tollgate_key_id]"), Some("key_ab"));
        assert_eq!(get("metadata[tollgate_amount]"), Some("12.34"));
        assert_eq!(get("mode"), Some("payment"));
    }
}
