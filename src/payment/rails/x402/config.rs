//! The `[x402]` section: the facilitator, and the (network, asset, payTo) offers.

use std::collections::BTreeMap;
use std::time::Duration;

use alloy_primitives::Address;
use http::header::{HeaderName, HeaderValue};
use serde::Deserialize;

use super::verify;
use crate::config::values::{at_least, parse_duration, parse_headers, HttpUrl, Problems};
use crate::money::Currency;

/// `[x402]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawX402Config {
    pub facilitator: String,
    pub network: String,
    pub asset: String,
    #[serde(default = "defaults::asset_name")]
    pub asset_name: String,
    #[serde(default = "defaults::asset_version")]
    pub asset_version: String,
    pub pay_to: String,
    #[serde(default = "defaults::max_timeout_seconds")]
    pub max_timeout_seconds: u64,
    #[serde(default)]
    pub settle: SettleMode,
    #[serde(default = "defaults::asset_symbol")]
    pub asset_symbol: String,
    #[serde(default)]
    pub facilitator_headers: BTreeMap<String, String>,
    #[serde(default = "defaults::facilitator_timeout")]
    pub facilitator_timeout: String,
    #[serde(default, rename = "offer")]
    pub offers: Vec<RawOffer>,
}

/// `[[x402.offer]]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOffer {
    pub network: String,
    pub asset: String,
    #[serde(default = "defaults::asset_name")]
    pub asset_name: String,
    #[serde(default = "defaults::asset_version")]
    pub asset_version: String,
    pub pay_to: Option<String>,
}

mod defaults {
    pub(super) fn asset_name() -> String {
        "USDC".into()
    }
    pub(super) fn asset_version() -> String {
        "2".into()
    }
    pub(super) fn asset_symbol() -> String {
        "USDC".into()
    }
    pub(super) fn max_timeout_seconds() -> u64 {
        60
    }
    pub(super) fn facilitator_timeout() -> String {
        "10s".into()
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SettleMode {
    #[default]
    AfterUpstream,
    BeforeUpstream,
}

/// `[x402]`, checked.
#[derive(Debug, Clone)]
pub struct X402Config {
    pub facilitator: HttpUrl,
    /// The offer of `[x402]` itself.
    pub primary: OfferConfig,
    /// Further offers (`[[x402.offer]]`, e.g. a second network); `pay_to` defaults to
    /// the primary one's.
    pub offers: Vec<OfferConfig>,
    /// At least 1.
    pub max_timeout_seconds: u64,
    pub settle: SettleMode,
    /// Token symbol used in money headers (`0.01 USDC`).
    pub asset_symbol: Currency,
    /// Extra headers sent to the facilitator (hosted facilitators need auth).
    pub facilitator_headers: Vec<(HeaderName, HeaderValue)>,
    pub facilitator_timeout: Duration,
}

impl X402Config {
    /// The primary offer, then the others.
    pub fn all_offers(&self) -> impl Iterator<Item = &OfferConfig> {
        std::iter::once(&self.primary).chain(&self.offers)
    }
}

/// One (network, asset, payTo) the operator accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferConfig {
    /// CAIP-2, `eip155:<chain id>`.
    pub network: String,
    pub chain_id: u64,
    pub asset: Address,
    /// The asset as written (x402 documents echo it).
    pub asset_text: String,
    /// EIP-712 domain name and version of the asset.
    pub asset_name: String,
    pub asset_version: String,
    pub pay_to: Address,
    pub pay_to_text: String,
}

/// The EVM chain id of a CAIP-2 `eip155:<id>` network.
pub fn evm_chain_id(network: &str) -> Option<u64> {
    network.strip_prefix("eip155:")?.parse().ok()
}

impl OfferConfig {
    /// Checks one offer; problems are reported under `{at}.network` etc. An offer
    /// without its own `pay_to` gets `default_pay_to`, whose problem is reported where
    /// it is written, not again here.
    pub fn parse(at: &str, raw: &RawOffer, default_pay_to: &str, p: &mut Problems) -> Option<OfferConfig> {
        let (network, asset) = (&raw.network, &raw.asset);
        let pay_to = raw.pay_to.as_deref().unwrap_or(default_pay_to);
        let report_pay_to = raw.pay_to.is_some();
        let chain_id = p.check(
            format_args!("{at}.network"),
            evm_chain_id(network).ok_or(format!("{network:?} is not a CAIP-2 EVM network like \"eip155:84532\"")),
        );
        let asset_addr = p.check(
            format_args!("{at}.asset"),
            verify::address(asset).ok_or(format!("{asset:?} is not a 0x-prefixed 20-byte address")),
        );
        let pay_to_addr = match verify::address(pay_to) {
            None if report_pay_to => {
                p.push(format_args!("{at}.pay_to"), format_args!("{pay_to:?} is not a 0x-prefixed 20-byte address"));
                None
            }
            a => a,
        };
        Some(OfferConfig {
            network: network.clone(),
            chain_id: chain_id?,
            asset: asset_addr?,
            asset_text: asset.clone(),
            asset_name: raw.asset_name.clone(),
            asset_version: raw.asset_version.clone(),
            pay_to: pay_to_addr?,
            pay_to_text: pay_to.to_owned(),
        })
    }
}

impl X402Config {
    pub fn parse(raw: RawX402Config, p: &mut Problems) -> Option<X402Config> {
        let facilitator = p.check(
            "x402.facilitator",
            HttpUrl::parse(&raw.facilitator).ok_or(format!("{:?} is not an http(s) URL", raw.facilitator)),
        );
        let facilitator_timeout = p.check("x402.facilitator_timeout", parse_duration(&raw.facilitator_timeout));
        let own = RawOffer {
            network: raw.network,
            asset: raw.asset,
            asset_name: raw.asset_name,
            asset_version: raw.asset_version,
            pay_to: Some(raw.pay_to.clone()),
        };
        let primary = OfferConfig::parse("x402", &own, &raw.pay_to, p);
        let offers: Vec<_> = raw
            .offers
            .iter()
            .enumerate()
            .map(|(i, o)| OfferConfig::parse(&format!("x402.offer[{i}]"), o, &raw.pay_to, p))
            .collect();
        let max_timeout_seconds = p.check("x402.max_timeout_seconds", at_least(raw.max_timeout_seconds, 1));
        let facilitator_headers = parse_headers("x402.facilitator_headers", &raw.facilitator_headers, p);
        let asset_symbol = p.check(
            "x402.asset_symbol",
            Currency::token(&raw.asset_symbol)
                .ok_or_else(|| format!("{:?} is not a token symbol (1 to 16 letters or digits)", raw.asset_symbol)),
        );
        Some(X402Config {
            facilitator: facilitator?,
            primary: primary?,
            offers: offers.into_iter().collect::<Option<_>>()?,
            max_timeout_seconds: max_timeout_seconds?,
            settle: raw.settle,
            asset_symbol: asset_symbol?,
            facilitator_headers: facilitator_headers?,
            facilitator_timeout: facilitator_timeout?,
        })
    }
}
