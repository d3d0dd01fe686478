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

// Wired to its endpoint in the next commit.
#![allow(dead_code)]

use sha2::{Digest, Sha256};

use super::config::{StripeConfig, CURRENCY, CURRENCY_DECIMALS, MICROS_PER_MINOR};
use crate::money::Micros;

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
