//! Payment: the gate in front of priced routes.
//!
//! [`layer::PaymentLayer`] is a tower layer shaped like tower-http's
//! `AsyncRequireAuthorization`: it forwards a paid request (with the verified payment in
//! the request's extensions) or answers the 402 itself. Payment failures are responses,
//! never service errors.
//!
//! A [`Rail`] is one way to pay. Each rail reads its own credential, verifies and
//! reserves it ([`Rail::authorize`]), describes its part of the challenge, and hands
//! back a [`Grant`] that is committed (captured / settled) or released once the
//! upstream's response head is known. Adding a rail touches no other rail.

pub mod gate;
pub mod layer;
mod metered;
pub mod rails;
pub mod ratelimit;

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde_json::{Map, Value};

use crate::ledger::Metered;
use crate::money::Micros;
use crate::route::Route;

/// Why a priced request was not forwarded. Each has a problem page (`problem::DOCS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    PaymentMissing,
    PaymentMalformed,
    PaymentMethodUnsupported,
    PaymentInvalid,
    PaymentExpired,
    PaymentReplayed,
    InsufficientFunds,
    SpendCapReached,
    SettlementFailed,
    PaymentBackendUnavailable,
    RateLimited,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::PaymentMissing,
        Reason::PaymentMalformed,
        Reason::PaymentMethodUnsupported,
        Reason::PaymentInvalid,
        Reason::PaymentExpired,
        Reason::PaymentReplayed,
        Reason::InsufficientFunds,
        Reason::SpendCapReached,
        Reason::SettlementFailed,
        Reason::PaymentBackendUnavailable,
        Reason::RateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PaymentMissing => "payment_missing",
            Reason::PaymentMalformed => "payment_malformed",
            Reason::PaymentMethodUnsupported => "payment_method_unsupported",
            Reason::PaymentInvalid => "payment_invalid",
            Reason::PaymentExpired => "payment_expired",
            Reason::PaymentReplayed => "payment_replayed",
            Reason::InsufficientFunds => "insufficient_funds",
            Reason::SpendCapReached => "spend_cap_reached",
            Reason::SettlementFailed => "settlement_failed",
            Reason::PaymentBackendUnavailable => "payment_backend_unavailable",
            Reason::RateLimited => "rate_limited",
        }
    }

    /// The status of a refusal for this reason, from its problem page's entry.
    pub fn status(self) -> StatusCode {
        crate::problem::doc(self.as_str()).map_or(StatusCode::PAYMENT_REQUIRED, |d| d.status)
    }
}

/// A refusal: the reason, a sentence for the caller, and optional finer cause.
#[derive(Debug, Clone)]
pub struct Denial {
    pub reason: Reason,
    pub detail: String,
    /// A finer cause, e.g. a facilitator's `invalidReason`.
    pub cause: Option<String>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
    /// The rail whose credential was refused, if any.
    pub rail: Option<&'static str>,
    /// Extra response headers (e.g. x402's `PAYMENT-RESPONSE` with `success: false`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Denial {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Denial {
        let retry_after = match reason {
            Reason::PaymentBackendUnavailable => Some(2),
            Reason::RateLimited => Some(1),
            _ => None,
        };
        Denial { reason, detail: detail.into(), cause: None, retry_after, rail: None, headers: Vec::new() }
    }

    pub fn cause(mut self, c: impl Into<String>) -> Denial {
        self.cause = Some(c.into());
        self
    }

    pub fn rail(mut self, r: &'static str) -> Denial {
        self.rail = Some(r);
        self
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Denial {
        self.headers.push((name, value));
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Denial {
        self.retry_after = Some(secs);
        self
    }
}

/// What a rail is asked to charge for one request.
#[derive(Debug)]
pub struct Charge<'a> {
    pub route: &'a Route,
    pub price: Micros,
    pub request_id: &'a str,
    pub client_ip: IpAddr,
    /// `server.public_url` without a trailing slash, and the request path: together the
    /// resource URL, which only x402 needs (built on demand by [`Charge::resource`]).
    pub public_base: &'a str,
    pub path: &'a str,
    /// A metered request: what its hold (`price`) is made of, for a refusal's detail
    /// (`max_tokens 4096 of gpt-4o-mini`).
    pub hold_note: Option<&'a str>,
}

impl Charge<'_> {
    /// The resource URL (public base + path).
    pub fn resource(&self) -> String {
        format!("{}{}", self.public_base, self.path)
    }
}

/// A rail's part of a 402: members of the problem body and response headers.
#[derive(Debug, Default)]
pub struct ChallengePart {
    pub body: Map<String, Value>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Headers of this rail a browser client must be able to read
    /// (`Access-Control-Expose-Headers`), whether or not this refusal carries them.
    pub expose: Vec<HeaderName>,
    /// A few lines of HTML for the paywall page (already escaped).
    pub html: String,
}

/// What the caller is told after a successful charge (response headers).
#[derive(Debug, Default)]
pub struct Receipt {
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Revenue in the rail's minor units, for `tollgate_revenue_micros_total`.
    pub revenue: u64,
}

/// One way to pay.
#[async_trait]
pub trait Rail: Send + Sync + 'static {
    /// The name used in `accept = [...]` and metric labels.
    fn name(&self) -> &'static str;

    /// Whether the request carries a credential meant for this rail.
    fn present(&self, headers: &HeaderMap) -> bool;

    /// Headers that carry this rail's credential; removed before forwarding.
    fn credential_headers(&self) -> &[HeaderName];

    /// Who the credential claims to pay as, read without verifying it (no I/O): a
    /// stable id per payer however the credential is spelled, for per-key rate
    /// limits to refuse a spent payer before the ledger or a facilitator is asked.
    /// `None` when the payer is known only once verified.
    fn payer_hint(&self, _headers: &HeaderMap) -> Option<String> {
        None
    }

    /// Removes this rail's credentials from a request to a *free* route, which may
    /// carry other credentials of the same header meant for the upstream. By default
    /// every credential header goes.
    fn scrub(&self, headers: &mut HeaderMap) {
        for name in self.credential_headers() {
            headers.remove(name);
        }
    }

    /// Verifies the credential and reserves the payment.
    async fn authorize(&self, charge: &Charge<'_>, headers: &HeaderMap) -> Result<Box<dyn Grant>, Denial>;

    /// This rail's part of a challenge for `charge`, refused for `denial`.
    fn challenge(&self, charge: &Charge<'_>, denial: &Denial) -> ChallengePart;
}

/// A reserved payment, waiting for the upstream's answer.
#[async_trait]
pub trait Grant: Send + Sync {
    fn rail(&self) -> &'static str;
    /// Who pays: a key id or a wallet address (for `X-Tollgate-Payer`).
    fn payer(&self) -> &str;
    /// The amount reserved, as a money string for `X-Tollgate-Paid` (`0.002 USD`).
    fn paid(&self) -> String;
    /// Charges `amount` of the reserved payment (never more than was reserved; a
    /// metered request's usage comes with it) and gives the rest back: the payment
    /// layer decided, by `charge_on`, that the upstream's answer is paid for. A rail
    /// may still decline (revenue 0).
    async fn commit(self: Box<Self>, amount: Micros, metered: Option<&Metered>) -> Result<Receipt, Denial>;
    /// Gives the reservation back: the upstream failed, or was never reached.
    async fn release(self: Box<Self>);
}

/// The payment layer's verdict on a request it refused (its problem code), in the
/// response's extensions (the gateway counts outcomes by it). A response without it
/// came from the upstream.
#[derive(Debug, Clone, Copy)]
pub struct Refused(pub &'static str);

/// The verified payment, in the forwarded request's extensions.
#[derive(Debug, Clone)]
pub struct Paid {
    pub rail: &'static str,
    pub payer: String,
}

/// The rails configured for this process, by name.
#[derive(Default, Clone)]
pub struct Rails(Vec<Arc<dyn Rail>>);

impl std::fmt::Debug for Rails {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.iter().map(|r| r.name())).finish()
    }
}

impl Rails {
    pub fn new(rails: Vec<Arc<dyn Rail>>) -> Rails {
        Rails(rails)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Rail>> {
        self.0.iter().find(|r| r.name() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Rail>> {
        self.0.iter()
    }
}
