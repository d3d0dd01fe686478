//! The integration tests, in one crate so that the library (and alloy, rustls, …) is
//! linked once rather than once per file. Each module is one suite; `support` is the
//! shared harness (real upstreams on 127.0.0.1:0, the in-process gateway, a
//! PostgreSQL cluster per test, the stand-in x402 facilitator).
//!
//! Run one suite with `cargo test --test it <module>::`, e.g. `cargo test --test it bypass::`.

mod support;

mod binary;
mod bypass;
mod ledger_conformance;
mod lifecycle;
mod llm_sdk;
mod metered;
mod payment;
mod postgres;
mod selfservice;
mod smoke;
mod transparency;
mod x402;
