//! The rails: one module per way to pay.
//!
//! Each rail owns its config section (`<rail>::config`: the raw serde form, the typed
//! form and the parse that checks it) and declares itself in [`KNOWN`], which is what
//! a route's `accept` list is checked against.

pub mod credits;
pub mod x402;

/// A rail as the config knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RailSpec {
    /// Its name in a route's `accept` list.
    pub name: &'static str,
    /// The top-level section it cannot work without (`None`: its section is optional).
    pub section: Option<&'static str>,
    /// It can charge an amount known only once the response is done (a metered route's
    /// usage), up to what it reserved.
    pub metered: bool,
}

/// Every rail this build offers, in the order they are listed to operators.
pub const KNOWN: &[RailSpec] = &[credits::SPEC, x402::SPEC];
