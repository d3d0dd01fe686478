//! x402: pay per request with a signed stablecoin transfer (x402 v1 and v2, "exact"
//! scheme on EVM networks, EIP-3009 `transferWithAuthorization`).
//!
//! The 402 carries the v1 requirements in its body (`x402Version`, `error`, `accepts`)
//! and the v2 `PaymentRequired` document, base64, in `PAYMENT-REQUIRED`, so both
//! generations of clients can pay. A client pays with `X-PAYMENT` (v1) or
//! `PAYMENT-SIGNATURE` (v2). Accepting a payment is, in this order:
//!
//! 1. strict decoding (size limit, base64, JSON shape) → `payment_malformed`;
//! 2. matching an offer (scheme, network, asset; for v2 the `accepted` requirement)
//!    → `payment_method_unsupported` / `payment_invalid`;
//! 3. local checks ([`verify`]): recipient, amount, validity window, EIP-712 signature
//!    → `payment_invalid` / `payment_expired`, without any network call;
//! 4. reserving (payer, nonce) in the ledger until `validBefore` → `payment_replayed`;
//! 5. the facilitator's `/verify` ([`facilitator`]), and `/settle` before the upstream
//!    (`settle = "before_upstream"`) or once its response head is known (default).
//!
//! Whether a response is paid for is one rule for every rail, from the route's
//! `charge_on`: the payment layer commits the grant when the upstream answered below
//! 500 (`"success"`) or whatever it answered (`"always"`), and this rail settles
//! whenever its grant is committed.
//!
//! Amounts: one micro-USD of the route price is one atomic unit of a 6-decimal token.
//!
//! This file is a little over 600 lines on purpose: the five steps above read best in
//! one place. What is not on that path lives beside it: `config.rs`, `types.rs`,
//! `verify.rs`, `facilitator.rs`, `grant.rs` (settlement and receipts), `supported.rs`.

pub mod config;
pub mod facilitator;
pub mod types;
pub mod verify;

use std::sync::Arc;

use alloy_primitives::{Address, U256};
use alloy_sol_types::Eip712Domain;
use async_trait::async_trait;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use serde_json::{json, Map, Value};

use self::config::{OfferConfig, SettleMode, X402Config};
use self::facilitator::{settle_reason, verify_reason, FacilitatorClient, FacilitatorError, Verdict};
use self::types::{
    AssetExtra, FacilitatorRequest, PaymentPayloadV1, PaymentPayloadV2, PaymentRequiredV2, Requirements,
    RequirementsV1, RequirementsV2, ResourceInfo, SettleResponse,
};
use self::verify::{Authorization, Expected, LocalError};
use crate::ledger::{Ledger, Metered, Settlement};
use crate::metrics::{Metrics, RailResult};
use crate::money::{Currency, Micros, Money};
use crate::payment::{ChallengePart, Charge, Denial, Grant, Rail, Reason, Receipt};
use crate::problem::html_escape;

pub const NAME: &str = "x402";
/// Needs its `[x402]` section (facilitator, network, asset, payTo).
/// Not metered: the `exact` scheme signs one amount before the request is sent.
pub const SPEC: super::RailSpec = super::RailSpec { name: NAME, section: Some("x402"), metered: false };
/// v1 payment header.
pub const X_PAYMENT: HeaderName = HeaderName::from_static("x-payment");
/// v2 payment header.
pub const PAYMENT_SIGNATURE: HeaderName = HeaderName::from_static("payment-signature");
/// v2 requirements header of the 402.
pub const PAYMENT_REQUIRED: HeaderName = HeaderName::from_static("payment-required");
/// v2 settlement header.
pub const PAYMENT_RESPONSE: HeaderName = HeaderName::from_static("payment-response");
/// v1 settlement header.
pub const X_PAYMENT_RESPONSE: HeaderName = HeaderName::from_static("x-payment-response");
/// Longest payment header read at all; an EOA payment is about 700 bytes of base64 and
/// a smart-wallet one a few KiB.
pub const MAX_PAYMENT_HEADER: usize = 8 * 1024;
/// The only scheme offered.
pub const SCHEME: &str = "exact";

/// Standard base64; padding is written, and tolerated missing when read.
const B64_READ: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Unix seconds now; injectable so that signed vectors with fixed times can be tested.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs())
}

/// The x402 v1 network name of an EVM chain id (v2 uses CAIP-2 `eip155:<id>`).
/// Chains without a v1 name are offered to v2 clients only.
pub fn v1_network(chain_id: u64) -> Option<&'static str> {
    Some(match chain_id {
        8453 => "base",
        84532 => "base-sepolia",
        43114 => "avalanche",
        43113 => "avalanche-fuji",
        137 => "polygon",
        80002 => "polygon-amoy",
        _ => return None,
    })
}

/// One (network, asset, payTo) the operator accepts: `[x402]` itself or an `[[x402.offer]]`.
#[derive(Debug, Clone)]
struct Offer {
    network: String,
    v1_network: Option<&'static str>,
    asset: Address,
    asset_text: String,
    pay_to: Address,
    pay_to_text: String,
    extra: AssetExtra,
    domain: Eip712Domain,
}

impl Offer {
    fn new(cfg: &OfferConfig) -> Offer {
        let (name, version) = (&cfg.asset_name, &cfg.asset_version);
        Offer {
            network: cfg.network.clone(),
            v1_network: v1_network(cfg.chain_id),
            asset: cfg.asset,
            asset_text: cfg.asset_text.clone(),
            pay_to: cfg.pay_to,
            pay_to_text: cfg.pay_to_text.clone(),
            extra: AssetExtra { name: name.clone(), version: version.clone() },
            domain: verify::domain(name, version, cfg.chain_id, cfg.asset),
        }
    }

    fn v1(&self, price: Micros, resource: &ResourceInfo, max_timeout: u64) -> Option<RequirementsV1> {
        Some(RequirementsV1 {
            scheme: SCHEME,
            network: self.v1_network?,
            max_amount_required: price.get().to_string(),
            asset: self.asset_text.clone(),
            pay_to: self.pay_to_text.clone(),
            resource: resource.url.clone(),
            description: resource.description.clone(),
            mime_type: resource.mime_type.clone(),
            output_schema: None,
            max_timeout_seconds: max_timeout,
            extra: self.extra.clone(),
        })
    }

    fn v2(&self, price: Micros, max_timeout: u64) -> RequirementsV2 {
        RequirementsV2 {
            scheme: SCHEME,
            network: self.network.clone(),
            amount: price.get().to_string(),
            asset: self.asset_text.clone(),
            pay_to: self.pay_to_text.clone(),
            max_timeout_seconds: max_timeout,
            extra: self.extra.clone(),
        }
    }
}

/// `tollgate_facilitator_requests_total{rail="x402",result}` handles.
struct Calls {
    verify_ok: Counter,
    verify_invalid: Counter,
    verify_error: Counter,
    settle_ok: Counter,
    settle_failed: Counter,
    settle_error: Counter,
}

impl Calls {
    fn new(metrics: &Metrics) -> Calls {
        let c = |result| metrics.facilitator_calls.get_or_create(&RailResult { rail: NAME, result }).clone();
        Calls {
            verify_ok: c("verify_ok"),
            verify_invalid: c("verify_invalid"),
            verify_error: c("verify_error"),
            settle_ok: c("settle_ok"),
            settle_failed: c("settle_failed"),
            settle_error: c("settle_error"),
        }
    }
}

/// What the rail and its grants share: the offers, the facilitator client, the replay
/// store (the ledger), the clock and the metric handles.
struct X402Core {
    offers: Vec<Offer>,
    facilitator: FacilitatorClient,
    ledger: Arc<dyn Ledger>,
    metrics: Arc<Metrics>,
    calls: Calls,
    clock: Clock,
    settle: SettleMode,
    max_timeout: u64,
    symbol: Currency,
}

/// The x402 rail.
pub struct X402 {
    shared: Arc<X402Core>,
    headers: [HeaderName; 2],
}

impl std::fmt::Debug for X402 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X402")
            .field("facilitator", &self.shared.facilitator.base())
            .field("offers", &self.shared.offers.iter().map(|o| &o.network).collect::<Vec<_>>())
            .finish()
    }
}

impl X402 {
    pub fn new(cfg: &X402Config, ledger: Arc<dyn Ledger>, metrics: Arc<Metrics>) -> Result<X402, String> {
        X402::with_clock(cfg, ledger, metrics, system_clock())
    }

    pub fn with_clock(
        cfg: &X402Config,
        ledger: Arc<dyn Ledger>,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Result<X402, String> {
        let offers = cfg.all_offers().map(Offer::new).collect();
        let shared = X402Core {
            offers,
            facilitator: FacilitatorClient::new(cfg)?,
            calls: Calls::new(&metrics),
            ledger,
            metrics,
            clock,
            settle: cfg.settle,
            max_timeout: cfg.max_timeout_seconds,
            symbol: cfg.asset_symbol.clone(),
        };
        Ok(X402 { shared: Arc::new(shared), headers: [PAYMENT_SIGNATURE, X_PAYMENT] })
    }
}

fn resource_info(charge: &Charge<'_>) -> ResourceInfo {
    let route = charge.route;
    ResourceInfo {
        url: charge.resource(),
        description: route.description.clone().unwrap_or_else(|| format!("Access to route {}", route.name)),
        mime_type: route.mime_type.clone().unwrap_or_else(|| "application/json".to_owned()),
    }
}

fn deny(reason: Reason, detail: impl Into<String>) -> Denial {
    Denial::new(reason, detail).rail(NAME)
}

fn malformed(what: impl std::fmt::Display) -> Denial {
    deny(Reason::PaymentMalformed, format!("The x402 payment could not be decoded: {what}.")).cause("invalid_payload")
}

/// A decoded payment, before any check against an offer.
enum Decoded {
    V1(PaymentPayloadV1),
    V2(PaymentPayloadV2),
}

/// Reads the payment header: size limit, base64, JSON object, version, shape.
fn decode(headers: &HeaderMap) -> Result<(Decoded, Value), Denial> {
    let (name, value) = match (headers.get(&PAYMENT_SIGNATURE), headers.get(&X_PAYMENT)) {
        (Some(v), _) => ("PAYMENT-SIGNATURE", v),
        (None, Some(v)) => ("X-PAYMENT", v),
        (None, None) => return Err(deny(Reason::PaymentMissing, "No x402 payment header was sent.")),
    };
    if value.len() > MAX_PAYMENT_HEADER {
        return Err(malformed(format_args!("{name} is longer than {MAX_PAYMENT_HEADER} bytes")));
    }
    let bytes = B64_READ
        .decode(value.as_bytes().trim_ascii())
        .map_err(|_| malformed(format_args!("{name} is not standard base64")))?;
    let raw: Value = serde_json::from_slice(&bytes).map_err(|e| malformed(format_args!("{name} is not JSON ({e})")))?;
    if !raw.is_object() {
        return Err(malformed(format_args!("{name} is not a JSON object")));
    }
    let shape = |e: serde_json::Error| malformed(format_args!("{name}: {e}"));
    let decoded = match raw.get("x402Version").and_then(Value::as_u64) {
        Some(1) => Decoded::V1(serde_json::from_value(raw.clone()).map_err(shape)?),
        Some(2) => Decoded::V2(serde_json::from_value(raw.clone()).map_err(shape)?),
        _ => {
            return Err(malformed(format_args!("{name} has no x402Version 1 or 2")).cause("invalid_x402_version"));
        }
    };
    Ok((decoded, raw))
}

/// The `from` address a payment header claims, lower case, unverified.
fn signed_from(headers: &HeaderMap) -> Option<String> {
    let (decoded, _) = decode(headers).ok()?;
    let from = match &decoded {
        Decoded::V1(p) => &p.payload.authorization.from,
        Decoded::V2(p) => &p.payload.authorization.from,
    };
    Some(from.to_ascii_lowercase())
}

fn local_denial(e: &LocalError) -> Denial {
    let reason = match e {
        LocalError::Expired { .. } | LocalError::NotYetValid { .. } => Reason::PaymentExpired,
        _ => Reason::PaymentInvalid,
    };
    let fix = match reason {
        Reason::PaymentExpired => "sign a new payment with the current time",
        _ => "sign a new payment for the requirements in this response",
    };
    deny(reason, format!("The x402 payment was refused: {e}; {fix}.")).cause(e.cause())
}

/// The accepted payment: which offer it pays, in which protocol version.
struct Selected<'a> {
    offer: &'a Offer,
    version: u8,
    auth: Authorization,
    value: U256,
}

impl X402Core {
    /// Matches a decoded payment to an offer and runs every local check.
    fn select(&self, decoded: &Decoded, price: Micros) -> Result<Selected<'_>, Denial> {
        let amount = U256::from(price.get());
        let now = (self.clock)();
        let unsupported = |what: String| {
            deny(
                Reason::PaymentMethodUnsupported,
                format!("{what}; see the requirements in this response for what this route accepts."),
            )
        };
        match decoded {
            Decoded::V1(p) => {
                if p.scheme != SCHEME {
                    return Err(
                        unsupported(format!("x402 scheme {:?} is not accepted", p.scheme)).cause("invalid_scheme")
                    );
                }
                let candidates: Vec<&Offer> =
                    self.offers.iter().filter(|o| o.v1_network == Some(p.network.as_str())).collect();
                if candidates.is_empty() {
                    return Err(
                        unsupported(format!("network {:?} is not accepted", p.network)).cause("invalid_network")
                    );
                }
                let auth = verify::parse(&p.payload).map_err(malformed)?;
                // v1 payments do not name their asset: the one whose domain the signature
                // belongs to is the one paid.
                let mut first_err = None;
                for offer in candidates {
                    let want = Expected { pay_to: offer.pay_to, amount, exact_amount: false, domain: &offer.domain };
                    match verify::check(&auth, &want, now) {
                        Ok(()) => {
                            let value = auth.transfer.value;
                            return Ok(Selected { offer, version: 1, auth, value });
                        }
                        Err(e) => {
                            first_err.get_or_insert(e);
                        }
                    }
                }
                Err(first_err.map(|e| local_denial(&e)).unwrap_or_else(|| malformed("no offer")))
            }
            Decoded::V2(p) => {
                let a = &p.accepted;
                if a.scheme != SCHEME {
                    return Err(
                        unsupported(format!("x402 scheme {:?} is not accepted", a.scheme)).cause("invalid_scheme")
                    );
                }
                let on_network: Vec<&Offer> = self.offers.iter().filter(|o| o.network == a.network).collect();
                if on_network.is_empty() {
                    return Err(
                        unsupported(format!("network {:?} is not accepted", a.network)).cause("invalid_network")
                    );
                }
                let asset = verify::address(&a.asset);
                let Some(offer) = on_network.into_iter().find(|o| Some(o.asset) == asset) else {
                    return Err(unsupported(format!("asset {} is not accepted on {}", a.asset, a.network))
                        .cause("unsupported_asset"));
                };
                if verify::address(&a.pay_to) != Some(offer.pay_to) {
                    return Err(deny(
                        Reason::PaymentInvalid,
                        format!(
                            "The accepted requirement pays {}, but this route is paid to {}; pay the requirement in this response.",
                            a.pay_to, offer.pay_to_text
                        ),
                    )
                    .cause("accepted_requirements_mismatch"));
                }
                if verify::uint(&a.amount) != Some(amount) {
                    return Err(deny(
                        Reason::PaymentInvalid,
                        format!(
                            "The accepted requirement's amount {} is not the price {} of this route; pay the requirement in this response.",
                            a.amount,
                            price.get()
                        ),
                    )
                    .cause("accepted_requirements_mismatch"));
                }
                let auth = verify::parse(&p.payload).map_err(malformed)?;
                let want = Expected { pay_to: offer.pay_to, amount, exact_amount: true, domain: &offer.domain };
                verify::check(&auth, &want, now).map_err(|e| local_denial(&e))?;
                let value = auth.transfer.value;
                Ok(Selected { offer, version: 2, auth, value })
            }
        }
    }

    fn backend_down(&self, cause: &'static str, what: &str) -> Denial {
        deny(Reason::PaymentBackendUnavailable, format!("{what}; nothing was charged. Retry with a new payment."))
            .cause(cause)
    }

    /// Calls `/settle`; records the settlement in the ledger when it succeeded.
    async fn settle(&self, p: &Pending) -> Result<SettleResponse, Denial> {
        let req = FacilitatorRequest {
            x402_version: p.version,
            payment_payload: &p.payload,
            payment_requirements: &p.requirements,
        };
        // Like the reference servers, the refusal carries the failed SettleResponse in
        // the version's settlement header.
        let failed = |reason: Reason, cause: String, why: &str| {
            let mut d = deny(
                reason,
                format!("The x402 payment was verified but could not be settled ({why}); you were not served. Retry with a new payment."),
            );
            let body = SettleResponse {
                success: false,
                error_reason: Some(cause.clone()),
                payer: Some(p.payer.clone()),
                transaction: String::new(),
                network: p.network.clone(),
            };
            if let Some((name, v)) = settlement_header(p.version, &body) {
                d = d.header(name, v);
            }
            d.cause(cause)
        };
        let res = match self.facilitator.settle(&req).await {
            Ok(r) => r,
            Err(e) => {
                self.calls.settle_error.inc();
                tracing::warn!(error = %e, request_id = %p.request_id, payer = %p.payer, "x402 settle failed");
                return Err(failed(Reason::SettlementFailed, e.cause().to_owned(), "the facilitator did not answer"));
            }
        };
        if !res.success {
            self.calls.settle_failed.inc();
            let reason = res.error_reason.clone().unwrap_or_else(|| "unknown".to_owned());
            tracing::info!(reason = %reason, request_id = %p.request_id, payer = %p.payer, "x402 settle refused");
            return Err(failed(settle_reason(&reason), reason, "the facilitator refused it"));
        }
        self.calls.settle_ok.inc();
        let settlement = Settlement {
            rail: NAME.to_owned(),
            payer: p.payer.clone(),
            amount: p.amount,
            asset: p.asset.clone(),
            network: p.network.clone(),
            tx_hash: res.transaction.clone(),
            route: p.route.clone(),
            request_id: p.request_id.clone(),
        };
        if let Err(e) = self.ledger.record_settlement(&settlement).await {
            // The money moved on chain: the caller is served, the operator is told.
            self.metrics.ledger_errors.inc();
            tracing::error!(error = %e, tx = %res.transaction, request_id = %p.request_id, "x402 settlement not recorded");
        }
        Ok(res)
    }
}

#[async_trait]
impl Rail for X402 {
    fn name(&self) -> &'static str {
        NAME
    }

    fn present(&self, headers: &HeaderMap) -> bool {
        headers.contains_key(&PAYMENT_SIGNATURE) || headers.contains_key(&X_PAYMENT)
    }

    fn credential_headers(&self) -> &[HeaderName] {
        &self.headers
    }

    /// The signed `from` address: the bucket a per-key limit counts, checked before
    /// the facilitator is asked (and before `settle = "before_upstream"` settles).
    fn payer_hint(&self, headers: &HeaderMap) -> Option<String> {
        signed_from(headers)
    }

    async fn authorize(&self, charge: &Charge<'_>, headers: &HeaderMap) -> Result<Box<dyn Grant>, Denial> {
        let s = &self.shared;
        let (decoded, raw) = decode(headers)?;
        let sel = s.select(&decoded, charge.price)?;
        let t = &sel.auth.transfer;
        let payer = t.from.to_checksum(None);

        // Single use, reserved before the facilitator sees it: a concurrent or later
        // second presentation is refused here, whatever the facilitator would say.
        let valid_before = u64::try_from(t.validBefore).unwrap_or(u64::MAX).min(i64::MAX as u64);
        match s.ledger.reserve_nonce(&format!("{:#x}", t.from), &format!("{:#x}", t.nonce), valid_before).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(deny(
                    Reason::PaymentReplayed,
                    "This x402 payment was already used; sign a new one (with a fresh nonce) for each request.",
                )
                .cause("nonce_already_used"));
            }
            Err(e) => {
                s.metrics.ledger_errors.inc();
                tracing::warn!(error = %e, "ledger unavailable; refusing x402 payment");
                return Err(s.backend_down("ledger_unavailable", "The payment ledger is unavailable"));
            }
        }

        let offer = sel.offer;
        let resource = resource_info(charge);
        // The selected offer: a v1 payment only ever selects an offer with a v1 name.
        let requirements = match offer.v1(charge.price, &resource, s.max_timeout) {
            Some(v1) if sel.version == 1 => Requirements::V1(v1),
            _ => Requirements::V2(offer.v2(charge.price, s.max_timeout)),
        };
        let pending = Pending {
            version: sel.version,
            payload: raw,
            requirements,
            payer,
            amount: u64::try_from(sel.value).unwrap_or(u64::MAX),
            asset: offer.asset_text.clone(),
            network: offer.network.clone(),
            route: charge.route.name.to_string(),
            request_id: charge.request_id.to_owned(),
        };

        let req = FacilitatorRequest {
            x402_version: pending.version,
            payment_payload: &pending.payload,
            payment_requirements: &pending.requirements,
        };
        match s.facilitator.verify(&req).await {
            Ok(Verdict::Valid { .. }) => {
                s.calls.verify_ok.inc();
            }
            Ok(Verdict::Invalid { reason }) => {
                s.calls.verify_invalid.inc();
                let r = verify_reason(&reason);
                return Err(deny(r, format!("The facilitator refused the x402 payment ({reason}).")).cause(reason));
            }
            Err(e) => {
                s.calls.verify_error.inc();
                tracing::warn!(error = %e, facilitator = %s.facilitator.base(), "x402 verify failed");
                return Err(s.backend_down(e.cause(), "The x402 facilitator could not verify the payment"));
            }
        }

        let settled = match s.settle {
            SettleMode::BeforeUpstream => Some(s.settle(&pending).await?),
            SettleMode::AfterUpstream => None,
        };
        Ok(Box::new(X402Grant { shared: self.shared.clone(), pending, settled }))
    }

    fn challenge(&self, charge: &Charge<'_>, denial: &Denial) -> ChallengePart {
        let s = &self.shared;
        let resource = resource_info(charge);
        let missing = denial.reason == Reason::PaymentMissing;
        let error_v1 = if missing { "X-PAYMENT header is required" } else { denial.reason.as_str() };
        let error_v2 = if missing { "PAYMENT-SIGNATURE header is required" } else { denial.reason.as_str() };
        let (accepts_v1, v2) = requirements(&s.offers, charge.price, resource, s.max_timeout, error_v2);

        let mut part = ChallengePart {
            expose: vec![PAYMENT_REQUIRED, PAYMENT_RESPONSE, X_PAYMENT_RESPONSE],
            ..ChallengePart::default()
        };
        part.body.insert("x402Version".into(), json!(1));
        part.body.insert("error".into(), json!(error_v1));
        part.body.insert("accepts".into(), serde_json::to_value(&accepts_v1).unwrap_or_else(|_| json!([])));
        if let Ok(doc) = serde_json::to_vec(&v2) {
            if let Ok(v) = HeaderValue::from_str(&STANDARD.encode(doc)) {
                part.headers.push((PAYMENT_REQUIRED, v));
            }
        }
        let amount = format!("{} {}", charge.price, s.symbol);
        let mut ways = String::new();
        for o in &s.offers {
            ways.push_str(&format!(
                "<li><b>{amount}</b> on <code>{network}</code> to <code>{pay_to}</code> (token <code>{asset}</code>)</li>",
                amount = html_escape(&amount),
                network = html_escape(o.v1_network.unwrap_or(&o.network)),
                pay_to = html_escape(&o.pay_to_text),
                asset = html_escape(&o.asset_text),
            ));
        }
        part.html = format!(
            "<section><h3>x402 (stablecoin, per request)</h3><ul>{ways}</ul>\
<p>Use an x402 client, such as the Python package <code>x402</code> or the npm package <code>@x402/fetch</code>: \
it reads the requirements from the <code>PAYMENT-REQUIRED</code> header (v2) or the JSON body (v1) and \
retries with a signed <code>PAYMENT-SIGNATURE</code> or <code>X-PAYMENT</code> header.</p></section>"
        );
        part
    }
}

/// The requirements of a 402: the v1 `accepts` (offers with a v1 network name) and the
/// v2 `PaymentRequired` document.
fn requirements(
    offers: &[Offer],
    price: Micros,
    resource: ResourceInfo,
    max_timeout: u64,
    error_v2: &str,
) -> (Vec<RequirementsV1>, PaymentRequiredV2) {
    let accepts_v1 = offers.iter().filter_map(|o| o.v1(price, &resource, max_timeout)).collect();
    let v2 = PaymentRequiredV2 {
        x402_version: 2,
        error: error_v2.to_owned(),
        accepts: offers.iter().map(|o| o.v2(price, max_timeout)).collect(),
        resource,
        extensions: Map::new(),
    };
    (accepts_v1, v2)
}

mod grant;
mod supported;
#[cfg(test)]
mod tests;

use grant::{settlement_header, Pending, X402Grant};
pub use supported::{check_supported, KindSupport};
