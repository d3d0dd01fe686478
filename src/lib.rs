//! tollgate: a reverse proxy that makes callers pay for APIs.
//!
//! A request to a priced route passes only with a valid payment credential; otherwise
//! the caller gets a structured `402 Payment Required` (RFC 9457 problem+json, plus the
//! x402 challenge) that says exactly what is wrong and how to pay. See `ARCHITECTURE.md`
//! for how the code is laid out.
#![forbid(unsafe_code)]

pub(crate) mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub(crate) mod demo;
pub(crate) mod doctor;
pub mod gateway;
pub mod ledger;
pub mod meter;
pub mod metrics;
pub mod money;
pub mod payment;
pub(crate) mod problem;
pub(crate) mod proxy;
pub mod rejection;
pub mod route;
pub mod selfservice;
pub(crate) mod server;
pub(crate) mod telemetry;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

/// Errors crossing the tower boundary.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type of every service in tollgate: streamed, never buffered whole.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `b` in full (synthetic responses only).
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}
