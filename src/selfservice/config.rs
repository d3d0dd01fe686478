//! The `[stripe]` section: the account tollgate creates Checkout Sessions with, the
//! webhook secret it verifies events with, and the limits of one top-up.
//!
//! Both secrets are kept in [`Secret`], whose `Debug` prints nothing of them, so no
//! log line or `{:?}` of a config can leak them.

use std::fmt;

use serde::Deserialize;

use crate::config::values::{HttpUrl, Problems};
use crate::money::Micros;

/// `[stripe]` as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStripeConfig {
    pub secret_key: String,
    pub webhook_secret: String,
    #[serde(default = "defaults::api_base")]
    pub api_base: String,
    #[serde(default = "defaults::currency")]
    pub currency: String,
    #[serde(default = "defaults::min_topup")]
    pub min_topup: String,
    #[serde(default = "defaults::max_topup")]
    pub max_topup: String,
    pub success_url: String,
    pub cancel_url: String,
}

impl fmt::Debug for RawStripeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawStripeConfig")
            .field("secret_key", &"<redacted>")
            .field("webhook_secret", &"<redacted>")
            .field("api_base", &self.api_base)
            .field("currency", &self.currency)
            .finish_non_exhaustive()
    }
}

mod defaults {
    pub(super) fn api_base() -> String {
        "https://api.stripe.com".into()
    }
    pub(super) fn currency() -> String {
        "usd".into()
    }
    pub(super) fn min_topup() -> String {
        "5.00".into()
    }
    pub(super) fn max_topup() -> String {
        "500.00".into()
    }
}

/// A credential from the config: usable, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that sends or keys with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The one currency balances are kept in: a top-up in any other cannot be credited.
pub const CURRENCY: &str = "usd";
/// Decimal places of [`CURRENCY`] (cents): Stripe's `unit_amount` is in these.
pub const CURRENCY_DECIMALS: u32 = 2;
/// Micro-USD in one minor unit (one cent).
pub const MICROS_PER_MINOR: u64 = 10_000;

/// `[stripe]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeConfig {
    /// `sk_live_…`, `sk_test_…` or a restricted `rk_…` key.
    pub secret_key: Secret,
    /// The endpoint's signing secret, `whsec_…`, used whole as the HMAC key.
    pub webhook_secret: Secret,
    /// Without a trailing slash.
    pub api_base: HttpUrl,
    /// Lower case; always [`CURRENCY`].
    pub currency: String,
    pub min_topup: Micros,
    pub max_topup: Micros,
    pub success_url: HttpUrl,
    pub cancel_url: HttpUrl,
}

impl StripeConfig {
    pub fn parse(raw: RawStripeConfig, p: &mut Problems) -> Option<StripeConfig> {
        let secret_key = p.check("stripe.secret_key", non_empty(&raw.secret_key));
        let webhook_secret = p.check("stripe.webhook_secret", non_empty(&raw.webhook_secret));
        let url = |key: &str, v: &str, p: &mut Problems| {
            p.check(format_args!("stripe.{key}"), HttpUrl::parse(v).ok_or(format!("{v:?} is not an http(s) URL")))
        };
        let api_base = url("api_base", raw.api_base.trim_end_matches('/'), p);
        let success_url = url("success_url", &raw.success_url, p);
        let cancel_url = url("cancel_url", &raw.cancel_url, p);
        let currency = raw.currency.to_ascii_lowercase();
        let currency = p.check(
            "stripe.currency",
            if currency == CURRENCY {
                Ok(currency)
            } else {
                Err(format!("{:?}: balances are kept in USD, so only \"usd\" top-ups can be credited", raw.currency))
            },
        );
        let min_topup = p.check("stripe.min_topup", topup_limit(&raw.min_topup));
        let max_topup = p.check("stripe.max_topup", topup_limit(&raw.max_topup));
        if let (Some(min), Some(max)) = (min_topup, max_topup) {
            if min > max {
                p.push("stripe.max_topup", format_args!("{max} is below stripe.min_topup {min}"));
                return None;
            }
        }
        Some(StripeConfig {
            secret_key: Secret(secret_key?),
            webhook_secret: Secret(webhook_secret?),
            api_base: api_base?,
            currency: currency?,
            min_topup: min_topup?,
            max_topup: max_topup?,
            success_url: success_url?,
            cancel_url: cancel_url?,
        })
    }
}

fn non_empty(v: &str) -> Result<String, String> {
    match v.trim() {
        "" => Err("must not be empty".into()),
        s => Ok(s.to_owned()),
    }
}

/// A positive amount that the currency can express (whole cents).
fn topup_limit(v: &str) -> Result<Micros, String> {
    let m = Micros::parse(v).map_err(|e| e.to_string())?;
    if m == Micros::ZERO {
        return Err("must be above zero".into());
    }
    if m.get() % MICROS_PER_MINOR != 0 {
        return Err(format!("{v:?} has more than {CURRENCY_DECIMALS} decimal places"));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawStripeConfig {
        RawStripeConfig {
            secret_key: "sk_test_123".into(),
            webhook_secret: "whsec_abc".into(),
            api_base: defaults::api_base(),
            currency: "usd".into(),
            min_topup: "5.00".into(),
            max_topup: "500".into(),
            success_url: "https://example.com/thanks".into(),
            cancel_url: "https://example.com/pricing".into(),
        }
    }

    fn problems(r: RawStripeConfig) -> Vec<String> {
        let mut p = Problems::default();
        let parsed = StripeConfig::parse(r, &mut p);
        assert_eq!(parsed.is_some(), p.is_empty());
        p.into_vec()
    }

    #[test]
    fn a_complete_section_parses() {
        let mut p = Problems::default();
        let c = StripeConfig::parse(raw(), &mut p).unwrap();
        assert_eq!((c.min_topup, c.max_topup), (Micros(5_000_000), Micros(500_000_000)));
        assert_eq!(c.api_base.as_str(), "https://api.stripe.com");
    }

    #[test]
    fn only_usd_can_be_credited() {
        let e = problems(RawStripeConfig { currency: "eur".into(), ..raw() });
        assert!(e[0].starts_with("stripe.currency:") && e[0].contains("USD"), "{e:?}");
        assert!(problems(RawStripeConfig { currency: "USD".into(), ..raw() }).is_empty());
    }

    #[test]
    fn limits_are_positive_whole_cents_in_order() {
        let e = problems(RawStripeConfig { min_topup: "0.001".into(), ..raw() });
        assert!(e[0].starts_with("stripe.min_topup:"), "{e:?}");
        let e = problems(RawStripeConfig { min_topup: "0".into(), ..raw() });
        assert!(e[0].contains("above zero"), "{e:?}");
        let e = problems(RawStripeConfig { min_topup: "600".into(), ..raw() });
        assert!(e[0].starts_with("stripe.max_topup:"), "{e:?}");
    }

    #[test]
    fn urls_and_secrets_are_checked() {
        let e = problems(RawStripeConfig { success_url: "thanks".into(), secret_key: " ".into(), ..raw() });
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("stripe.secret_key:")));
        assert!(e.iter().any(|m| m.starts_with("stripe.success_url:")));
    }

    const MINIMAL: &str = "[server]\nlisten = \"127.0.0.1:8080\"\npublic_url = \"https://api.example.com/\"\n";
    const SECTION: &str = "[stripe]\nsecret_key = \"${STRIPE_SECRET_KEY}\"\nwebhook_secret = \"whsec_1\"\n\
        success_url = \"https://example.com/thanks\"\ncancel_url = \"https://example.com/pricing\"\n";

    fn load(text: &str) -> Result<crate::config::Config, crate::config::ConfigErrors> {
        crate::config::Config::parse(text, |k| (k == "STRIPE_SECRET_KEY").then(|| "sk_test_from_env".to_owned()))
    }

    #[test]
    fn with_stripe_the_topup_url_defaults_to_the_topup_endpoint() {
        let cfg = load(&format!("{MINIMAL}{SECTION}")).unwrap();
        let s = cfg.stripe.as_ref().unwrap();
        assert_eq!(s.secret_key.expose(), "sk_test_from_env");
        assert_eq!((s.min_topup, s.max_topup), (Micros(5_000_000), Micros(500_000_000)));
        assert_eq!(s.api_base.as_str(), "https://api.stripe.com");
        assert_eq!(
            cfg.credits.topup_url.as_deref(),
            Some("https://api.example.com/.well-known/tollgate/account/topup")
        );
        let own = load(&format!("{MINIMAL}[credits]\ntopup_url = \"https://billing.example.com\"\n{SECTION}")).unwrap();
        assert_eq!(own.credits.topup_url.as_deref(), Some("https://billing.example.com"));
        let none = load(MINIMAL).unwrap();
        assert_eq!((none.stripe.is_none(), none.credits.topup_url), (true, None));
    }

    #[test]
    fn unknown_keys_in_the_section_are_errors() {
        let e = load(&format!("{MINIMAL}{SECTION}publishable_key = \"pk_test_1\"\n")).unwrap_err();
        assert!(e.0[0].starts_with("stripe") && e.0[0].contains("publishable_key"), "{e:?}");
        let e = load(&format!("{MINIMAL}{}", SECTION.replace("usd", "eur") + "currency = \"eur\"\n")).unwrap_err();
        assert!(e.0[0].starts_with("stripe.currency:"), "{e:?}");
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let mut p = Problems::default();
        let c = StripeConfig::parse(raw(), &mut p).unwrap();
        let shown = format!("{c:?} {:?}", raw());
        assert!(!shown.contains("sk_test_123") && !shown.contains("whsec_abc"), "{shown}");
    }
}
