//! x402 wire types, v1 and v2 (x402 specification `specs/x402-specification.md`,
//! "exact" scheme on EVM: `specs/schemes/exact/scheme_exact_evm.md`).
//!
//! What tollgate *writes* (requirements, the v2 `PAYMENT-REQUIRED` document, facilitator
//! requests) is typed and serialized field by field. What clients *send* is decoded
//! strictly where it matters (the authorization and signature shapes, the version, the
//! scheme and network) and tolerantly elsewhere: unknown members are ignored so that
//! a newer client's extensions do not break payment.
//!
//! An absent optional member is left out, never written as `null`: the official
//! clients validate with schemas that accept a member's value or its absence only
//! (the legacy npm `x402-fetch` 1.x refuses `"outputSchema": null`). Every `Option`
//! serialized here carries `skip_serializing_if`, and a test walks each document
//! tollgate writes for a `null`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The EIP-712 domain's name and version, in a requirement's `extra`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssetExtra {
    pub name: String,
    pub version: String,
}

/// One v1 `accepts` entry (the 402 body of x402 v1).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequirementsV1 {
    pub scheme: &'static str,
    pub network: &'static str,
    pub max_amount_required: String,
    pub asset: String,
    pub pay_to: String,
    pub resource: String,
    pub description: String,
    pub mime_type: String,
    /// A JSON schema of the response; tollgate has none to offer, so it is left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    pub max_timeout_seconds: u64,
    pub extra: AssetExtra,
}

/// One v2 `accepts` entry; a v2 payment copies the one it pays into `accepted`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequirementsV2 {
    pub scheme: &'static str,
    pub network: String,
    pub amount: String,
    pub asset: String,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    pub extra: AssetExtra,
}

/// The v2 resource description.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    pub url: String,
    pub description: String,
    pub mime_type: String,
}

/// The decoded `PAYMENT-REQUIRED` header of x402 v2.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequiredV2 {
    pub x402_version: u8,
    pub error: String,
    pub resource: ResourceInfo,
    pub accepts: Vec<RequirementsV2>,
    pub extensions: Map<String, Value>,
}

/// The EIP-3009 `transferWithAuthorization` arguments, as strings on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireAuthorization {
    pub from: String,
    pub to: String,
    pub value: String,
    pub valid_after: String,
    pub valid_before: String,
    pub nonce: String,
}

/// The `payload` of an "exact" EVM payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactEvmPayload {
    pub signature: String,
    pub authorization: WireAuthorization,
}

/// An `X-PAYMENT` (v1) payment payload.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV1 {
    pub x402_version: u8,
    pub scheme: String,
    pub network: String,
    pub payload: ExactEvmPayload,
}

/// The `accepted` member of a v2 payment: what the client believes it pays.
/// Decoded loosely (`extra` and other members may be anything); compared semantically.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcceptedV2 {
    pub scheme: String,
    pub network: String,
    pub amount: String,
    pub asset: String,
    pub pay_to: String,
}

/// A `PAYMENT-SIGNATURE` (v2) payment payload.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV2 {
    pub x402_version: u8,
    pub accepted: AcceptedV2,
    pub payload: ExactEvmPayload,
}

/// Only the version, read first to pick the payload type.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionOnly {
    pub x402_version: Value,
}

/// The one requirement a payment was matched to, as the facilitator is sent it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Requirements {
    V1(RequirementsV1),
    V2(RequirementsV2),
}

/// The body of `POST /verify` and `POST /settle`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FacilitatorRequest<'a> {
    pub x402_version: u8,
    pub payment_payload: &'a Value,
    pub payment_requirements: &'a Requirements,
}

/// `POST /verify` answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyResponse {
    pub is_valid: bool,
    #[serde(default)]
    pub invalid_reason: Option<String>,
    #[serde(default)]
    pub payer: Option<String>,
}

/// `POST /settle` answer; also what tollgate returns, base64-encoded, in
/// `PAYMENT-RESPONSE` / `X-PAYMENT-RESPONSE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResponse {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    #[serde(default)]
    pub transaction: String,
    #[serde(default)]
    pub network: String,
}

/// `GET /supported` answer.
#[derive(Debug, Clone, Deserialize)]
pub struct SupportedResponse {
    #[serde(default)]
    pub kinds: Vec<SupportedKind>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupportedKind {
    pub x402_version: u8,
    pub scheme: String,
    pub network: String,
}
