//! The x402 facilitator client: `POST /verify`, `POST /settle`, `GET /supported`
//! (x402 specification, "Facilitator interface").
//!
//! Built on hyper-util's pooled client with rustls, like the upstream pool. Every call
//! is bounded by `x402.facilitator_timeout` (connect, request and reading the answer)
//! and by [`MAX_ANSWER`] bytes. Facilitators answer refusals with HTTP 200 and also
//! with 400 (412 for allowance errors), so the JSON of those is read too; anything else
//! (unreachable, slow, 5xx, 401, undecodable) is a [`FacilitatorError`], which the rail
//! turns into a fail-closed 503.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use serde_json::Value;

use super::config::X402Config;
use super::types::{FacilitatorRequest, SettleResponse, SupportedResponse, VerifyResponse};
use crate::payment::Reason;

/// Longest facilitator answer read; a JSON verdict is a few hundred bytes.
pub const MAX_ANSWER: usize = 64 * 1024;

use crate::proxy::HttpsConnector;

/// A facilitator call that produced no verdict.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FacilitatorError {
    #[error("facilitator unreachable: {0}")]
    Unreachable(String),
    #[error("facilitator did not answer within {0:?}")]
    Timeout(Duration),
    #[error("facilitator answered HTTP {0}")]
    Status(u16),
    #[error("facilitator answer could not be decoded: {0}")]
    Undecodable(String),
}

impl FacilitatorError {
    /// The `cause` shown in the 503.
    pub fn cause(&self) -> &'static str {
        match self {
            FacilitatorError::Unreachable(_) => "facilitator_unreachable",
            FacilitatorError::Timeout(_) => "facilitator_timeout",
            FacilitatorError::Status(_) => "facilitator_http_error",
            FacilitatorError::Undecodable(_) => "facilitator_bad_answer",
        }
    }
}

/// The verdict of `POST /verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid { payer: Option<String> },
    Invalid { reason: String },
}

/// One facilitator endpoint with its own connection pool.
pub struct FacilitatorClient {
    base: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    client: Client<HttpsConnector, Full<Bytes>>,
}

impl std::fmt::Debug for FacilitatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The extra headers are credentials: never printed.
        f.debug_struct("FacilitatorClient").field("base", &self.base).field("timeout", &self.timeout).finish()
    }
}

impl FacilitatorClient {
    /// Builds the client for a validated `[x402]` section.
    pub fn new(cfg: &X402Config) -> Result<FacilitatorClient, String> {
        let timeout = cfg.facilitator_timeout;
        let client = crate::proxy::pooled_client(crate::proxy::PoolSettings {
            connect_timeout: timeout,
            ca: None,
            idle_timeout: Duration::from_secs(60),
            max_idle: 8,
        })?;
        let headers = cfg
            .facilitator_headers
            .iter()
            .map(|(name, value)| {
                let mut value = value.clone();
                value.set_sensitive(true);
                (name.clone(), value)
            })
            .collect();
        let base = cfg.facilitator.as_str().trim_end_matches('/').to_owned();
        Ok(FacilitatorClient { base, headers, timeout, client })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn verify(&self, req: &FacilitatorRequest<'_>) -> Result<Verdict, FacilitatorError> {
        let (status, body) = self.call(Method::POST, "/verify", Some(encode(req)?)).await?;
        let json = verdict_json(status, &body)?;
        if let Ok(v) = serde_json::from_value::<VerifyResponse>(json.clone()) {
            return Ok(if v.is_valid {
                Verdict::Valid { payer: v.payer }
            } else {
                Verdict::Invalid { reason: v.invalid_reason.unwrap_or_else(|| "unknown".to_owned()) }
            });
        }
        match failure_reason(&json) {
            Some(reason) if status != StatusCode::OK => Ok(Verdict::Invalid { reason }),
            _ => Err(FacilitatorError::Undecodable("expected {\"isValid\": bool, …}".to_owned())),
        }
    }

    /// The settle answer; `success: false` is an answer, not an error.
    pub async fn settle(&self, req: &FacilitatorRequest<'_>) -> Result<SettleResponse, FacilitatorError> {
        let (status, body) = self.call(Method::POST, "/settle", Some(encode(req)?)).await?;
        let json = verdict_json(status, &body)?;
        if let Ok(s) = serde_json::from_value::<SettleResponse>(json.clone()) {
            return Ok(s);
        }
        match failure_reason(&json) {
            Some(reason) if status != StatusCode::OK => Ok(SettleResponse {
                success: false,
                error_reason: Some(reason),
                payer: None,
                transaction: String::new(),
                network: String::new(),
            }),
            _ => Err(FacilitatorError::Undecodable("expected {\"success\": bool, …}".to_owned())),
        }
    }

    pub async fn supported(&self) -> Result<SupportedResponse, FacilitatorError> {
        let (status, body) = self.call(Method::GET, "/supported", None).await?;
        if status != StatusCode::OK {
            return Err(FacilitatorError::Status(status.as_u16()));
        }
        serde_json::from_slice(&body).map_err(|e| FacilitatorError::Undecodable(e.to_string()))
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), FacilitatorError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, concat!("tollgate/", env!("CARGO_PKG_VERSION")));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| FacilitatorError::Unreachable(format!("bad facilitator URL: {e}")))?;
        let exchange = async {
            let res = self.client.request(req).await.map_err(|e| FacilitatorError::Unreachable(error_chain(&e)))?;
            let status = res.status();
            let body = Limited::new(res.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| FacilitatorError::Undecodable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange).await.map_err(|_| FacilitatorError::Timeout(self.timeout))?
    }
}

fn encode(req: &FacilitatorRequest<'_>) -> Result<Bytes, FacilitatorError> {
    serde_json::to_vec(req).map(Bytes::from).map_err(|e| FacilitatorError::Undecodable(e.to_string()))
}

/// The JSON of an answer that carries a verdict: 200, and the 400/412/422 some
/// facilitators use for refusals.
fn verdict_json(status: StatusCode, body: &[u8]) -> Result<Value, FacilitatorError> {
    if !matches!(status.as_u16(), 200 | 400 | 402 | 412 | 422) {
        return Err(FacilitatorError::Status(status.as_u16()));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ if status == StatusCode::OK => Err(FacilitatorError::Undecodable("the answer is not a JSON object".into())),
        _ => Err(FacilitatorError::Status(status.as_u16())),
    }
}

/// A refusal reason in an answer that is not the documented shape.
fn failure_reason(v: &Value) -> Option<String> {
    ["invalidReason", "errorReason", "error", "errorType"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Maps a facilitator's `invalidReason` (from `/verify`) to a refusal reason; the
/// original code goes in the problem's `cause`. See [`reason_family`].
pub fn verify_reason(code: &str) -> Reason {
    reason_family(code).unwrap_or(Reason::PaymentInvalid)
}

/// Maps a facilitator's `errorReason` (from `/settle`) to a refusal reason: a refusal
/// of the payment itself says why (an unfunded wallet is `insufficient_funds`), and
/// anything else that failed after verification is `settlement_failed`.
pub fn settle_reason(code: &str) -> Reason {
    reason_family(code).unwrap_or(Reason::SettlementFailed)
}

/// What a facilitator's refusal code means, read by family rather than by exact
/// spelling, because each SDK generation spells them differently: the v1 era's
/// `insufficient_funds` is `invalid_exact_evm_insufficient_balance` or
/// `permit2_insufficient_balance` in the current Python (`mechanisms/evm/constants.py`)
/// and TypeScript (`@x402/evm`) SDKs, and new schemes add their own prefixes. The code
/// is split into its `_`-separated words and matched on word sequences, in this order:
///
/// 1. a fault of the facilitator or the chain (`unexpected_…`, a failed transaction,
///    simulation, broadcast or lookup): `None`, the caller's default;
/// 2. the payer's balance: `insufficient_funds`;
/// 3. a nonce already used, a duplicate settlement: `payment_replayed`;
/// 4. the validity window (`valid_before`, `valid_after`, expired, not yet valid, too
///    early): `payment_expired`;
/// 5. a scheme, network, asset transfer method or protocol version the facilitator does
///    not take: `payment_method_unsupported`;
/// 6. signature, recipient, amount, token or payload: `payment_invalid`.
///
/// Anything else is `None`.
pub fn reason_family(code: &str) -> Option<Reason> {
    let lower = code.to_ascii_lowercase();
    let words: Vec<&str> = lower.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).collect();
    let has = |seq: &[&str]| words.windows(seq.len()).any(|w| w == seq);
    let any = |seqs: &[&[&str]]| seqs.iter().any(|seq| has(seq));

    let fault: &[&[&str]] = &[
        &["unexpected"],
        &["transaction", "failed"],
        &["simulation", "failed"],
        &["broadcast", "failed"],
        &["tx", "failed"],
        &["deployment", "failed"],
        &["failed", "to"],
        &["invalid", "transaction", "state"],
        &["settlement", "pending"],
        &["timed", "out"],
        &["unavailable"],
        &["rpc"],
    ];
    let balance: &[&[&str]] = &[&["insufficient", "funds"], &["insufficient", "balance"], &["exceeds", "balance"]];
    let replayed: &[&[&str]] = &[
        &["nonce", "already", "used"],
        &["nonce", "used"],
        &["nonce", "reused"],
        &["already", "used"],
        &["permit2", "invalid", "nonce"],
        &["duplicate", "settlement"],
    ];
    let expired: &[&[&str]] = &[
        &["valid", "before"],
        &["valid", "after"],
        &["expired"],
        &["not", "yet", "valid"],
        &["too", "early"],
        &["block", "height", "exceeded"],
    ];
    let unsupported: &[&[&str]] = &[
        &["unsupported"],
        &["not", "supported"],
        &["scheme"],
        &["network"],
        &["x402", "version"],
        &["asset", "not", "deployed"],
    ];
    let invalid: &[&[&str]] = &[
        &["signature"],
        &["recipient"],
        &["receiver"],
        &["destination"],
        &["spender"],
        &["owner"],
        &["mismatch"],
        &["amount"],
        &["value"],
        &["payload"],
        &["payment"],
        &["allowance"],
    ];
    if any(fault) {
        None
    } else if any(balance) || lower.contains("insufficientbalance") {
        Some(Reason::InsufficientFunds)
    } else if any(replayed) {
        Some(Reason::PaymentReplayed)
    } else if any(expired) {
        Some(Reason::PaymentExpired)
    } else if any(unsupported) {
        Some(Reason::PaymentMethodUnsupported)
    } else if any(invalid) {
        Some(Reason::PaymentInvalid)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Codes the facilitators emit, by SDK generation: the v1 era (npm `x402` 1.2
    /// `ErrorReasons`), the current Python SDK 2.25 (`mechanisms/evm/constants.py`,
    /// `exact/permit2_utils.py`) and TypeScript `@x402/evm` 2.27, with the reason each
    /// must give on `/verify` and on `/settle`.
    const CODES: &[(&str, Reason)] = &[
        // The payer's balance.
        ("insufficient_funds", Reason::InsufficientFunds),
        ("invalid_exact_evm_insufficient_balance", Reason::InsufficientFunds),
        ("permit2_insufficient_balance", Reason::InsufficientFunds),
        ("invalid_batch_settlement_evm_insufficient_balance", Reason::InsufficientFunds),
        ("invalid_batch_settlement_evm_cumulative_exceeds_balance", Reason::InsufficientFunds),
        ("ERC20InsufficientBalance", Reason::InsufficientFunds),
        // A nonce already used.
        ("invalid_exact_evm_nonce_already_used", Reason::PaymentReplayed),
        ("permit2_invalid_nonce", Reason::PaymentReplayed),
        ("duplicate_settlement", Reason::PaymentReplayed),
        ("nonce_already_used", Reason::PaymentReplayed),
        // The validity window.
        ("invalid_exact_evm_payload_authorization_valid_before", Reason::PaymentExpired),
        ("invalid_exact_evm_payload_authorization_valid_after", Reason::PaymentExpired),
        ("invalid_batch_settlement_evm_payload_authorization_valid_before", Reason::PaymentExpired),
        ("permit2_deadline_expired", Reason::PaymentExpired),
        ("permit2_not_yet_valid", Reason::PaymentExpired),
        ("permit2_payment_too_early", Reason::PaymentExpired),
        ("eip2612_deadline_expired", Reason::PaymentExpired),
        ("payment_expired", Reason::PaymentExpired),
        // Signature, recipient, amount, token, payload.
        ("invalid_exact_evm_payload_signature", Reason::PaymentInvalid),
        ("invalid_exact_evm_signature", Reason::PaymentInvalid),
        ("invalid_permit2_signature", Reason::PaymentInvalid),
        ("invalid_exact_evm_recipient_mismatch", Reason::PaymentInvalid),
        ("invalid_exact_evm_payload_recipient_mismatch", Reason::PaymentInvalid),
        ("invalid_permit2_recipient_mismatch", Reason::PaymentInvalid),
        ("invalid_permit2_spender", Reason::PaymentInvalid),
        ("permit2_invalid_destination", Reason::PaymentInvalid),
        ("permit2_invalid_owner", Reason::PaymentInvalid),
        ("invalid_exact_evm_authorization_value", Reason::PaymentInvalid),
        ("invalid_exact_evm_payload_authorization_value", Reason::PaymentInvalid),
        ("invalid_exact_evm_payload_authorization_value_mismatch", Reason::PaymentInvalid),
        ("permit2_amount_mismatch", Reason::PaymentInvalid),
        ("invalid_upto_evm_payload_settlement_exceeds_amount", Reason::PaymentInvalid),
        ("invalid_exact_svm_payload_amount_insufficient", Reason::PaymentInvalid),
        ("invalid_exact_evm_token_name_mismatch", Reason::PaymentInvalid),
        ("permit2_token_mismatch", Reason::PaymentInvalid),
        ("invalid_exact_evm_payload_undeployed_smart_wallet", Reason::PaymentInvalid),
        ("permit2_allowance_required", Reason::PaymentInvalid),
        ("invalid_payload", Reason::PaymentInvalid),
        ("invalid_payment", Reason::PaymentInvalid),
        // Scheme, network, asset, version.
        ("invalid_network", Reason::PaymentMethodUnsupported),
        ("network_mismatch", Reason::PaymentMethodUnsupported),
        ("invalid_exact_evm_network_mismatch", Reason::PaymentMethodUnsupported),
        ("invalid_scheme", Reason::PaymentMethodUnsupported),
        ("unsupported_scheme", Reason::PaymentMethodUnsupported),
        ("invalid_exact_evm_scheme", Reason::PaymentMethodUnsupported),
        ("unsupported_asset_transfer_method", Reason::PaymentMethodUnsupported),
        ("invalid_exact_evm_eip3009_not_supported", Reason::PaymentMethodUnsupported),
        ("asset_not_deployed_contract", Reason::PaymentMethodUnsupported),
        ("invalid_x402_version", Reason::PaymentMethodUnsupported),
    ];

    /// Faults of the facilitator or the chain, and codes of no known family: the
    /// caller's default (`payment_invalid` on verify, `settlement_failed` on settle).
    const NO_FAMILY: &[&str] = &[
        "unexpected_verify_error",
        "unexpected_settle_error",
        "transaction_failed",
        "invalid_exact_evm_transaction_failed",
        "invalid_exact_evm_transaction_simulation_failed",
        "invalid_exact_evm_failed_to_get_network_config",
        "invalid_exact_evm_failed_to_verify_signature",
        "invalid_transaction_state",
        "smart_wallet_deployment_failed",
        "erc20_approval_tx_failed",
        "settle_exact_svm_transaction_confirmation_timed_out",
        "missing_eip712_domain",
        "something_new",
        "",
    ];

    #[test]
    fn facilitator_codes_map_by_family_on_verify_and_settle() {
        for &(code, want) in CODES {
            assert_eq!(reason_family(code), Some(want), "{code}");
            assert_eq!(verify_reason(code), want, "verify {code}");
            assert_eq!(settle_reason(code), want, "settle {code}");
        }
        for &code in NO_FAMILY {
            assert_eq!(reason_family(code), None, "{code}");
            assert_eq!(verify_reason(code), Reason::PaymentInvalid, "verify {code}");
            assert_eq!(settle_reason(code), Reason::SettlementFailed, "settle {code}");
        }
    }

    #[test]
    fn families_match_whole_words_in_any_case() {
        assert_eq!(reason_family("INVALID_EXACT_EVM_INSUFFICIENT_BALANCE"), Some(Reason::InsufficientFunds));
        assert_eq!(reason_family("insufficient-funds"), Some(Reason::InsufficientFunds));
        // "networks" and "unscheme" are not the words "network" and "scheme".
        assert_eq!(reason_family("networks_busy"), None);
        assert_eq!(reason_family("unscheme"), None);
        // A window code outranks the payload it sits in.
        assert_eq!(reason_family("invalid_exact_evm_payload_authorization_valid_after"), Some(Reason::PaymentExpired));
    }

    #[test]
    fn refusals_in_4xx_bodies_are_read_and_5xx_are_errors() {
        let j = verdict_json(StatusCode::BAD_REQUEST, br#"{"isValid":false,"invalidReason":"insufficient_funds"}"#);
        assert!(j.is_ok());
        assert_eq!(verdict_json(StatusCode::BAD_GATEWAY, b"{}"), Err(FacilitatorError::Status(502)));
        assert_eq!(verdict_json(StatusCode::UNAUTHORIZED, b"{}"), Err(FacilitatorError::Status(401)));
        assert_eq!(verdict_json(StatusCode::BAD_REQUEST, b"<html>"), Err(FacilitatorError::Status(400)));
        assert!(matches!(verdict_json(StatusCode::OK, b"[]"), Err(FacilitatorError::Undecodable(_))));
        assert_eq!(failure_reason(&serde_json::json!({"errorReason": "x"})).as_deref(), Some("x"));
    }
}
