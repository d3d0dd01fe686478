//! `POST /.well-known/tollgate/stripe/webhook`: Stripe's events about the Checkout
//! Sessions tollgate created, verified, then credited once.
//!
//! **Signature** (Stripe, "Verify webhook signatures manually"): the
//! `Stripe-Signature` header is `t=<unix seconds>,v1=<hex>[,v1=<hex>…]` (other schemes,
//! such as `v0`, are ignored). The expected `v1` is HMAC-SHA256 keyed with the
//! endpoint's whole signing secret (`whsec_…`, as Stripe's libraries use it) over
//! `"{t}.{raw body}"`, in lower-case hex; it is compared in constant time with *every*
//! `v1`, since during a secret rotation Stripe signs with the old and the new secret.
//! A `t` more than [`TOLERANCE`] seconds away from now, either way, is refused, so a
//! captured delivery cannot be replayed later. Nothing is read from the body before
//! the signature matched.
//!
//! **Crediting**: `checkout.session.completed` with `payment_status = "paid"` (a card),
//! and `checkout.session.async_payment_succeeded` (a bank debit that cleared later).
//! The key is the session's `client_reference_id`; the amount is its `amount_total`
//! (minor units of its `currency`, which must be USD), never anything in `metadata`;
//! the ledger credit's idempotency key is `stripe:{session id}`, so a redelivered
//! event, both events of one session, and one event delivered to several replicas at
//! once all credit once (the ledger serialises credits naming one idempotency key).
//!
//! **What Stripe is answered** decides whether it retries (for up to three days):
//!
//! | event | answer | why |
//! |---|---|---|
//! | bad, stale or missing signature, not JSON | 400 | not from Stripe, or mangled: nothing to do |
//! | another event type, an unpaid session, a session without tollgate's `client_reference_id` and metadata | 200 | nothing to credit: not a top-up (yet) |
//! | a revoked key | 200, credited, warning | the money arrived; the operator decides about a refund |
//! | a key this ledger does not know | 200, not credited, error log | a retry cannot make it known: the session belongs to another tollgate sharing the Stripe account (e.g. staging), or the ledger was replaced. Failing would make Stripe retry for days and then disable the endpoint for every other top-up. The money is in Stripe; the log line says how to credit it by hand with the same idempotency key. |
//! | `client_reference_id` and `metadata[tollgate_key_id]` disagree, a currency other than USD, the session id credited before with another amount | 400, not credited, error log | never happens with sessions tollgate made: someone edited them through the API. Stripe shows the failed delivery in its dashboard, where the operator can look and resend it once settled. |
//! | the ledger unavailable | 503 | Stripe retries later |

use std::collections::HashMap;

use hmac::{Hmac, Mac};
use http::HeaderValue;
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::config::{StripeConfig, CURRENCY, MICROS_PER_MINOR};
use crate::ledger::{Ledger, LedgerError};
use crate::money::Micros;

/// Most seconds between an event's signature time and now, either way.
pub(crate) const TOLERANCE: i64 = 300;
/// Largest webhook body read; Stripe's events are well below.
pub(crate) const MAX_BODY: usize = 1024 * 1024;

/// The two events that mean a top-up was paid.
pub(crate) const COMPLETED: &str = "checkout.session.completed";
pub(crate) const ASYNC_SUCCEEDED: &str = "checkout.session.async_payment_succeeded";

/// Why a `Stripe-Signature` was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SignatureError {
    #[error("no Stripe-Signature header")]
    Missing,
    #[error("the Stripe-Signature header is malformed: {0}")]
    Malformed(&'static str),
    #[error("no v1 signature matches the body")]
    NoMatch,
    #[error("the signature time {t} is more than {TOLERANCE} s away from now ({now})")]
    Stale { t: i64, now: i64 },
}

/// Checks `header` for `body` at `now` (unix seconds), as Stripe's libraries do.
pub(crate) fn verify(secret: &str, header: Option<&HeaderValue>, body: &[u8], now: i64) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let header = header.to_str().map_err(|_| SignatureError::Malformed("not ASCII"))?;
    let mut t = None;
    let mut candidates = Vec::new();
    for item in header.split(',') {
        let Some((k, v)) = item.trim().split_once('=') else {
            return Err(SignatureError::Malformed("expected key=value pairs"));
        };
        match k {
            "t" if t.is_some() => return Err(SignatureError::Malformed("more than one t")),
            "t" => t = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed("t is not a unix time"))?),
            // A v1 that is not 32 bytes of hex cannot match; the others still may.
            "v1" => candidates.extend(hex::decode(v).ok().filter(|s| s.len() == 32)),
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed("no timestamp t"))?;
    if candidates.is_empty() {
        return Err(SignatureError::NoMatch);
    }
    let expected = sign(secret, t, body);
    // Every candidate is compared in full, whichever matches.
    let matched = candidates.iter().fold(subtle::Choice::from(0), |acc, c| acc | expected.ct_eq(c.as_slice()));
    if !bool::from(matched) {
        return Err(SignatureError::NoMatch);
    }
    if now.abs_diff(t) > TOLERANCE.unsigned_abs() {
        return Err(SignatureError::Stale { t, now });
    }
    Ok(())
}

/// HMAC-SHA256 of `"{t}.{body}"` keyed with the whole secret.
pub(crate) fn sign(secret: &str, t: i64, body: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

// === events ===

#[derive(Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: EventData,
}

#[derive(Deserialize)]
struct EventData {
    object: serde_json::Value,
}

/// The fields of a Checkout Session this reads.
#[derive(Deserialize)]
struct CheckoutSession {
    id: String,
    payment_status: Option<String>,
    amount_total: Option<u64>,
    currency: Option<String>,
    client_reference_id: Option<String>,
    #[serde(default)]
    metadata: Option<HashMap<String, serde_json::Value>>,
}

/// What a verified event led to (all answered 200).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Not a paid tollgate top-up: nothing changed, nothing counted.
    Ignored(&'static str),
    Credited {
        key_id: String,
        session: String,
        amount: Micros,
        balance: Micros,
    },
    /// This session was credited before (a redelivery, the other event, another replica).
    Duplicate {
        key_id: String,
        session: String,
    },
    /// A top-up that cannot be credited and that a retry would not fix (unknown key).
    Rejected {
        why: String,
    },
}

/// Why a delivery is answered with an error.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("{0}")]
    Signature(#[from] SignatureError),
    #[error("the event cannot be read: {0}")]
    Malformed(String),
    /// Signed by Stripe, but not as tollgate created it: refused loudly (400).
    #[error("{0}")]
    Inconsistent(String),
    #[error("{0}")]
    Ledger(LedgerError),
}

/// Verifies one delivery and credits what it pays for.
pub(crate) async fn receive(
    ledger: &dyn Ledger,
    cfg: &StripeConfig,
    signature: Option<&HeaderValue>,
    body: &[u8],
    now: i64,
) -> Result<Outcome, Refusal> {
    verify(cfg.webhook_secret.expose(), signature, body, now)?;
    let event: Event = serde_json::from_slice(body).map_err(|e| Refusal::Malformed(e.to_string()))?;
    if event.kind != COMPLETED && event.kind != ASYNC_SUCCEEDED {
        return Ok(Outcome::Ignored("not a top-up event"));
    }
    let s: CheckoutSession =
        serde_json::from_value(event.data.object).map_err(|e| Refusal::Malformed(format!("data.object: {e}")))?;
    let meta_key = s.metadata.as_ref().and_then(|m| m.get("tollgate_key_id")).map(|v| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    });
    let key_id = match (&s.client_reference_id, &meta_key) {
        (None, None) => return Ok(Outcome::Ignored("not a tollgate checkout session")),
        (Some(a), Some(b)) if a == b => a.clone(),
        (a, b) => {
            return Err(Refusal::Inconsistent(format!(
                "session {} names key {a:?} in client_reference_id but {b:?} in metadata[tollgate_key_id]; \
                 not credited",
                s.id
            )))
        }
    };
    // A card is paid when the session completes; a bank debit only when
    // async_payment_succeeded follows (then payment_status is "paid" as well).
    if event.kind == COMPLETED && s.payment_status.as_deref() != Some("paid") {
        return Ok(Outcome::Ignored("checkout completed but not paid yet"));
    }
    let currency = s.currency.as_deref().unwrap_or("").to_ascii_lowercase();
    if currency != CURRENCY {
        return Err(Refusal::Inconsistent(format!(
            "session {} is in {currency:?}; balances are USD, so it cannot be credited",
            s.id
        )));
    }
    let amount = match s.amount_total.and_then(|minor| minor.checked_mul(MICROS_PER_MINOR)) {
        Some(0) | None => {
            return Ok(Outcome::Rejected { why: format!("session {} has no amount_total to credit", s.id) })
        }
        Some(m) => Micros(m),
    };
    let idem = format!("stripe:{}", s.id);
    match ledger.credit(&key_id, amount, Some(&idem)).await {
        Ok(o) if o.applied => {
            if let Ok(Some(k)) = ledger.key(&key_id).await {
                if k.revoked {
                    tracing::warn!(key_id = %key_id, session = %s.id, event = %event.id, amount = %amount,
                        "stripe top-up credited to a revoked key: the money arrived; refund it in Stripe if the key stays revoked");
                }
            }
            Ok(Outcome::Credited { key_id, session: s.id, amount, balance: o.balance })
        }
        Ok(_) => Ok(Outcome::Duplicate { key_id, session: s.id }),
        Err(LedgerError::NoSuchKey(_)) => {
            tracing::error!(key_id = %key_id, session = %s.id, event = %event.id, amount = %amount,
                "stripe top-up for a key this ledger does not know: not credited. If the key should exist, credit it \
                 with `tollgate keys credit {key_id} {amount} --idempotency-key {idem}`; otherwise refund it in Stripe");
            Ok(Outcome::Rejected { why: format!("no key {key_id:?} in this ledger") })
        }
        Err(e @ LedgerError::IdempotencyConflict { .. }) => Err(Refusal::Inconsistent(e.to_string())),
        Err(e) => Err(Refusal::Ledger(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"checkout.session.completed"}"#;

    fn header(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    fn signed(secret: &str, t: i64) -> String {
        format!("t={t},v1={}", hex::encode(sign(secret, t, BODY)))
    }

    /// Stripe's own libraries compute `HMAC-SHA256(secret, "{t}.{payload}")` in hex;
    /// this vector was computed independently (Python `hmac`, `hashlib.sha256`).
    #[test]
    fn signature_matches_stripes_scheme() {
        let body = br#"{"id":"evt_test"}"#;
        assert_eq!(
            hex::encode(sign("whsec_abc", 1_700_000_000, body)),
            "d5c04c1c13ec96960852a6f2b1afa81473a2ca347633e735cc5879bbac6400b3"
        );
    }

    #[test]
    fn a_fresh_signature_is_accepted_and_anything_else_refused() {
        let now = 1_764_000_000;
        assert_eq!(verify(SECRET, Some(&header(&signed(SECRET, now))), BODY, now), Ok(()));
        assert_eq!(verify(SECRET, Some(&header(&signed(SECRET, now - 300))), BODY, now), Ok(()));
        assert_eq!(verify(SECRET, Some(&header(&signed(SECRET, now + 300))), BODY, now), Ok(()));
        assert!(matches!(
            verify(SECRET, Some(&header(&signed(SECRET, now - 301))), BODY, now),
            Err(SignatureError::Stale { .. })
        ));
        assert!(matches!(
            verify(SECRET, Some(&header(&signed(SECRET, now + 301))), BODY, now),
            Err(SignatureError::Stale { .. })
        ));
        let far = format!("t={},v1={}", i64::MIN, hex::encode(sign(SECRET, i64::MIN, BODY)));
        assert!(matches!(verify(SECRET, Some(&header(&far)), BODY, now), Err(SignatureError::Stale { .. })));
        assert_eq!(verify(SECRET, None, BODY, now), Err(SignatureError::Missing));
        assert_eq!(verify("whsec_other", Some(&header(&signed(SECRET, now))), BODY, now), Err(SignatureError::NoMatch));
        assert_eq!(verify(SECRET, Some(&header(&signed(SECRET, now))), b"{}", now), Err(SignatureError::NoMatch));
        for bad in ["", "v1=00", "t=abc,v1=00", "t=1,t=2,v1=00", "garbage"] {
            assert!(verify(SECRET, Some(&header(bad)), BODY, now).is_err(), "{bad:?}");
        }
        // Only v0 (Stripe's test scheme) or junk in v1: nothing to match.
        let v0 = format!("t={now},v0={}", hex::encode(sign(SECRET, now, BODY)));
        assert_eq!(verify(SECRET, Some(&header(&v0)), BODY, now), Err(SignatureError::NoMatch));
    }

    #[test]
    fn any_v1_may_match_during_a_rotation() {
        let now = 1_764_000_000;
        let old = hex::encode(sign("whsec_old", now, BODY));
        let new = hex::encode(sign(SECRET, now, BODY));
        let h = header(&format!("t={now},v1={old},v1=zz,v1={new},v0=ignored"));
        assert_eq!(verify(SECRET, Some(&h), BODY, now), Ok(()));
        let h = header(&format!("t={now},v1={old}"));
        assert_eq!(verify(SECRET, Some(&h), BODY, now), Err(SignatureError::NoMatch));
    }
}
