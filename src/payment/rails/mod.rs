//! The rails: one module per way to pay.

pub mod credits;
pub mod x402;
