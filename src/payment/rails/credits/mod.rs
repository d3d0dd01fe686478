//! Prepaid credits: an API key with a balance (RFC 6750 bearer token).
//!
//! The key arrives as `Authorization: Bearer <key>` (the header is configurable) or
//! `X-API-Key: <key>`. Only its SHA-256 is looked up. The ledger holds the price
//! atomically before forwarding, captures it when the upstream answered, and releases
//! it when the upstream failed (see ARCHITECTURE.md, "Invariants").

pub mod config;

use std::sync::Arc;

use async_trait::async_trait;
use http::header::{self, HeaderName, HeaderValue};
use http::HeaderMap;
use serde_json::json;

use self::config::{CreditsConfig, SpendCap};
use crate::ledger::{HoldId, HoldOutcome, HoldRequest, Ledger, LedgerError, Metered, SecretHash, KEY_PREFIX};
use crate::metrics::Metrics;
use crate::money::{Micros, Money};
use crate::payment::{ChallengePart, Charge, Denial, Grant, Rail, Reason, Receipt};
use crate::problem::html_escape;

pub const NAME: &str = "credits";
/// Always available: `[credits]` is optional, its defaults work.
pub const SPEC: super::RailSpec = super::RailSpec { name: NAME, section: None, metered: true };
const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Longest credential header value read at all; anything longer is malformed.
const MAX_CREDENTIAL: usize = 256;

pub struct Credits {
    ledger: Arc<dyn Ledger>,
    header: HeaderName,
    header_display: String,
    headers: Vec<HeaderName>,
    topup_url: Option<String>,
    spend_cap: Option<SpendCap>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Credits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credits").field("header", &self.header).finish()
    }
}

impl Credits {
    pub fn new(cfg: &CreditsConfig, ledger: Arc<dyn Ledger>, metrics: Arc<Metrics>) -> Credits {
        let header = cfg.header.clone();
        let mut headers = vec![header.clone()];
        if header != X_API_KEY {
            headers.push(X_API_KEY);
        }
        Credits {
            ledger,
            header_display: cfg.header_display.clone(),
            header,
            headers,
            topup_url: cfg.topup_url.clone(),
            spend_cap: cfg.spend_cap,
            metrics,
        }
    }

    fn bearer(&self) -> bool {
        self.header == header::AUTHORIZATION
    }

    /// Extracts the key. `Ok(None)`: no credits credential at all.
    pub(crate) fn key<'h>(&self, headers: &'h HeaderMap) -> Result<Option<&'h str>, Denial> {
        let malformed = |why: &str| {
            Denial::new(Reason::PaymentMalformed, format!("The API key could not be read: {why}.")).rail(NAME)
        };
        if headers.get_all(&self.header).iter().nth(1).is_some() || headers.get_all(X_API_KEY).iter().nth(1).is_some() {
            return Err(malformed("the credential header is sent more than once"));
        }
        let (value, bearer) = match headers.get(&self.header) {
            Some(v) => (v, self.bearer()),
            None => match headers.get(X_API_KEY) {
                Some(v) => (v, false),
                None => return Ok(None),
            },
        };
        if value.len() > MAX_CREDENTIAL {
            return Err(malformed("the header value is too long"));
        }
        let s = value.to_str().map_err(|_| malformed("the header holds non-ASCII bytes"))?;
        let key = if bearer {
            let (scheme, rest) = s.trim().split_once(' ').ok_or_else(|| malformed("expected \"Bearer <key>\""))?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(Denial::new(
                    Reason::PaymentMethodUnsupported,
                    format!("Authorization scheme {scheme:?} is not accepted; send \"Bearer <key>\"."),
                )
                .rail(NAME));
            }
            rest.trim()
        } else {
            s.trim()
        };
        if !is_key_shape(key) {
            return Err(malformed("keys look like tg_live_ followed by 40 hex digits"));
        }
        Ok(Some(key))
    }
}

fn is_key_shape(k: &str) -> bool {
    k.strip_prefix(KEY_PREFIX)
        .is_some_and(|hex| hex.len() == 40 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

#[async_trait]
impl Rail for Credits {
    fn name(&self) -> &'static str {
        NAME
    }

    fn present(&self, headers: &HeaderMap) -> bool {
        headers.contains_key(&self.header) || headers.contains_key(X_API_KEY)
    }

    fn credential_headers(&self) -> &[HeaderName] {
        &self.headers
    }

    /// The key's hash: one per key, whichever header and spelling carried it.
    fn payer_hint(&self, headers: &HeaderMap) -> Option<String> {
        let key = self.key(headers).ok()??;
        Some(hex::encode(SecretHash::of(key).0))
    }

    /// Only values that carry a tollgate key: the same header may hold the upstream's
    /// own credential on a free route.
    fn scrub(&self, headers: &mut HeaderMap) {
        for name in &self.headers {
            let ours = headers
                .get_all(name)
                .iter()
                .any(|v| v.as_bytes().windows(KEY_PREFIX.len()).any(|w| w.eq_ignore_ascii_case(KEY_PREFIX.as_bytes())));
            if ours {
                headers.remove(name);
            }
        }
    }

    async fn authorize(&self, charge: &Charge<'_>, headers: &HeaderMap) -> Result<Box<dyn Grant>, Denial> {
        let Some(key) = self.key(headers)? else {
            return Err(Denial::new(Reason::PaymentMissing, "No API key was sent.").rail(NAME));
        };
        let outcome = self
            .ledger
            .authorize(HoldRequest {
                secret: SecretHash::of(key),
                amount: charge.price,
                route: &charge.route.name,
                request_id: charge.request_id,
                spend_cap: self.spend_cap.map(|c| (c.amount, c.per)),
            })
            .await
            .map_err(|e| backend_down(&self.metrics, e))?;
        let route = &charge.route.name;
        match outcome {
            HoldOutcome::Held { hold, key_id, balance } => Ok(Box::new(CreditsGrant {
                ledger: self.ledger.clone(),
                metrics: self.metrics.clone(),
                hold,
                key_id,
                price: charge.price,
                balance,
            })),
            HoldOutcome::UnknownKey => {
                Err(Denial::new(Reason::PaymentInvalid, "The API key is not known.").cause("unknown_key").rail(NAME))
            }
            HoldOutcome::Revoked { key_id } => {
                Err(Denial::new(Reason::PaymentInvalid, format!("The API key {key_id} has been revoked."))
                    .cause("revoked_key")
                    .rail(NAME))
            }
            HoldOutcome::Insufficient { balance, .. } => {
                let detail = match charge.hold_note {
                    Some(note) => format!(
                        "Up to {}: {note}; balance {}; lower max_tokens or top up.",
                        Money::usd(charge.price),
                        Money::usd(balance)
                    ),
                    None => format!(
                        "Balance {} is below the price {} of route {route}.",
                        Money::usd(balance),
                        Money::usd(charge.price)
                    ),
                };
                Err(Denial::new(Reason::InsufficientFunds, detail).rail(NAME))
            }
            HoldOutcome::SpendCapReached { spent, cap, .. } => {
                let window = match self.spend_cap {
                    Some(SpendCap { per, .. }) if per.as_secs() <= 3600 => "hour",
                    _ => "day",
                };
                Err(Denial::new(
                    Reason::SpendCapReached,
                    format!(
                        "This key has spent {} of its {} cap per {window}; the price {} of route {route} would exceed it.",
                        Money::usd(spent),
                        Money::usd(cap),
                        Money::usd(charge.price)
                    ),
                )
                .rail(NAME))
            }
        }
    }

    fn challenge(&self, _charge: &Charge<'_>, denial: &Denial) -> ChallengePart {
        let mut part = ChallengePart { expose: vec![header::WWW_AUTHENTICATE], ..ChallengePart::default() };
        let scheme = if self.bearer() { "Bearer" } else { "" };
        let mut section = json!({ "header": self.header_display, "scheme": scheme });
        if let Some(u) = &self.topup_url {
            section["topup_url"] = json!(u);
        }
        part.body.insert("credits".into(), section);
        if denial.reason.status() == http::StatusCode::PAYMENT_REQUIRED {
            let v = format!("Bearer realm=\"tollgate\", error=\"{}\"", denial.reason.as_str());
            if let Ok(v) = HeaderValue::from_str(&v) {
                part.headers.push((header::WWW_AUTHENTICATE, v));
            }
        }
        let how = if self.bearer() {
            "<pre>Authorization: Bearer tg_live_…</pre><p>or <code>X-API-Key: tg_live_…</code>.</p>".to_owned()
        } else {
            format!("<pre>{}: tg_live_…</pre>", html_escape(&self.header_display))
        };
        let topup = self
            .topup_url
            .as_deref()
            .map(|u| format!("<p>Get or top up a key at <a href=\"{0}\">{0}</a>.</p>", html_escape(u)))
            .unwrap_or_default();
        part.html = format!(
            "<section><h3>Prepaid credits (API key)</h3><p>Send your key with each request:</p>{how}{topup}</section>"
        );
        part
    }
}

fn backend_down(metrics: &Metrics, e: LedgerError) -> Denial {
    metrics.ledger_errors.inc();
    tracing::warn!(error = %e, "ledger unavailable; refusing paid request");
    Denial::new(Reason::PaymentBackendUnavailable, "The payment ledger is unavailable; nothing was charged.")
        .cause("ledger_unavailable")
        .rail(NAME)
}

struct CreditsGrant {
    ledger: Arc<dyn Ledger>,
    metrics: Arc<Metrics>,
    hold: HoldId,
    key_id: String,
    price: Micros,
    balance: Micros,
}

#[async_trait]
impl Grant for CreditsGrant {
    fn rail(&self) -> &'static str {
        NAME
    }

    fn payer(&self) -> &str {
        &self.key_id
    }

    fn paid(&self) -> String {
        Money::usd(self.price).to_string()
    }

    async fn commit(self: Box<Self>, amount: Micros, metered: Option<&Metered>) -> Result<Receipt, Denial> {
        let failed = |cause: &'static str| {
            Denial::new(
                Reason::SettlementFailed,
                "The charge could not be recorded, so the response was withheld; you will not be charged.",
            )
            .cause(cause)
            .rail(NAME)
        };
        match self.ledger.capture(self.hold, amount, metered).await {
            Ok(true) => {}
            // Released meanwhile (swept as abandoned): the money is back, so the
            // response must not be delivered either.
            Ok(false) => {
                tracing::warn!(key_id = %self.key_id, "hold was released before capture; withholding response");
                return Err(failed("hold_released"));
            }
            Err(e) => {
                // The hold stays pending and is released by the stale-hold sweep: the
                // caller gets no paid response, so it must not stay charged.
                self.metrics.ledger_errors.inc();
                tracing::warn!(error = %e, key_id = %self.key_id, "capture failed; withholding response");
                return Err(failed("ledger_unavailable"));
            }
        }
        // The balance after this request: what the hold left, plus what it gave back.
        let balance =
            self.balance.checked_add(self.price.checked_sub(amount).unwrap_or_default()).unwrap_or(self.balance);
        Ok(Receipt {
            headers: vec![
                (HeaderName::from_static("x-tollgate-charged"), Money::usd(amount).header_value()),
                (HeaderName::from_static("x-tollgate-balance"), Money::usd(balance).header_value()),
            ],
            revenue: amount.get(),
        })
    }

    async fn release(self: Box<Self>) {
        if let Err(e) = self.ledger.release(self.hold).await {
            self.metrics.ledger_errors.inc();
            tracing::warn!(error = %e, key_id = %self.key_id, "release failed; the stale-hold sweep will refund it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_shape_is_strict() {
        assert!(is_key_shape(&format!("{KEY_PREFIX}{}", "a1".repeat(20))));
        assert!(!is_key_shape(&format!("{KEY_PREFIX}{}", "A1".repeat(20))));
        assert!(!is_key_shape(&format!("{KEY_PREFIX}{}", "a1".repeat(21))));
        assert!(!is_key_shape("sk-abc"));
    }

    // === properties (the credential parser's fuzz targets, run by `cargo test`) ===

    use proptest::prelude::*;

    fn credits() -> (tempfile::TempDir, Credits) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = crate::ledger::sqlite::SqliteLedger::open(&dir.path().join("l.db"), Default::default()).unwrap();
        let c = Credits::new(&CreditsConfig::default(), Arc::new(ledger), Arc::new(Metrics::new()));
        (dir, c)
    }

    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        let key = format!("{KEY_PREFIX}{}", "0a".repeat(20));
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            "(?i:bearer)[ \t]{0,3}(tg_live_[0-9a-f]{0,41})?[ \t]{0,3}".prop_map(String::into_bytes),
            Just(format!("Bearer {key}").into_bytes()),
            Just(format!("bearer   {key}  ").into_bytes()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

        /// Any header bytes: a decision (no key, a key, a refusal), never a panic; a
        /// key that is accepted is exactly the canonical shape, and its payer hint is
        /// the same whichever header carried it.
        #[test]
        fn any_credential_bytes_get_a_decision(auth in header_value(), api in proptest::option::of(header_value())) {
            let (_dir, c) = credits();
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&auth) {
                h.insert(header::AUTHORIZATION, v);
            }
            if let Some(Ok(v)) = api.as_deref().map(HeaderValue::from_bytes) {
                h.insert(X_API_KEY, v);
            }
            if let Ok(Some(k)) = c.key(&h) {
                prop_assert!(is_key_shape(k));
                let mut alone = HeaderMap::new();
                alone.insert(X_API_KEY, HeaderValue::from_str(k).unwrap());
                prop_assert_eq!(c.payer_hint(&h), c.payer_hint(&alone));
            }
            let mut scrubbed = h.clone();
            c.scrub(&mut scrubbed);
            for v in scrubbed.values() {
                prop_assert!(!v.as_bytes().to_ascii_lowercase().windows(8).any(|w| w == b"tg_live_"));
            }
        }
    }
}
