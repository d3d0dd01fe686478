//! The `[credits]` section: which header carries the key, where to top up, and an
//! optional per-key spend cap.

use std::time::Duration;

use http::header::{self, HeaderName};
use serde::Deserialize;

use crate::config::values::Problems;
use crate::money::Micros;

/// `[credits]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCreditsConfig {
    #[serde(default = "default_header")]
    pub header: String,
    pub topup_url: Option<String>,
    pub spend_cap: Option<String>,
}

fn default_header() -> String {
    "Authorization".into()
}

impl Default for RawCreditsConfig {
    fn default() -> Self {
        RawCreditsConfig { header: default_header(), topup_url: None, spend_cap: None }
    }
}

/// `[credits]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditsConfig {
    /// The header that carries the key (`Authorization` means `Bearer <key>`).
    pub header: HeaderName,
    /// The header as the operator wrote it, for the 402's instructions.
    pub header_display: String,
    pub topup_url: Option<String>,
    pub spend_cap: Option<SpendCap>,
}

impl Default for CreditsConfig {
    fn default() -> Self {
        CreditsConfig {
            header: header::AUTHORIZATION,
            header_display: default_header(),
            topup_url: None,
            spend_cap: None,
        }
    }
}

/// At most `amount` spent per key in any `per` window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendCap {
    pub amount: Micros,
    pub per: Duration,
}

/// Parses a spend cap such as `"25.00/day"` or `"2/hour"`.
pub fn parse_spend_cap(v: &str) -> Result<SpendCap, String> {
    let bad = || format!("{v:?} is not a spend cap like \"25.00/day\" or \"2.50/hour\"");
    let (amt, per) = v.split_once('/').ok_or_else(bad)?;
    let amount = Micros::parse(amt).map_err(|e| format!("{v:?}: {e}"))?;
    let per = match per.trim() {
        "hour" => Duration::from_secs(3600),
        "day" => Duration::from_secs(86_400),
        _ => return Err(bad()),
    };
    Ok(SpendCap { amount, per })
}

impl CreditsConfig {
    pub fn parse(raw: RawCreditsConfig, p: &mut Problems) -> Option<CreditsConfig> {
        let header = p.check(
            "credits.header",
            HeaderName::from_bytes(raw.header.as_bytes())
                .map_err(|_| format!("{:?} is not a valid header name", raw.header)),
        );
        let spend_cap = match &raw.spend_cap {
            None => Some(None),
            Some(c) => p.check("credits.spend_cap", parse_spend_cap(c)).map(Some),
        };
        Some(CreditsConfig {
            header: header?,
            header_display: raw.header,
            topup_url: raw.topup_url,
            spend_cap: spend_cap?,
        })
    }
}
