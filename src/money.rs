//! Money as integer micro-units (1 USD = 1,000,000 micros), never floating point.
//!
//! Prices and amounts cross the API boundary as decimal strings (`"0.002"`); inside
//! tollgate they are `Micros`. For x402 with a 6-decimal token (USDC) one micro-USD is
//! exactly one atomic unit. Shown to a caller, an amount carries its [`Currency`]
//! ([`Money`]: `0.002 USD`, `0.01 USDC`).

use std::fmt;
use std::sync::Arc;

use http::HeaderValue;

/// Number of decimal places one micro-unit represents.
pub const DECIMALS: u32 = 6;
const SCALE: u64 = 1_000_000;

/// An exact, non-negative amount of money in millionths of the currency unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(pub u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseMoneyError {
    #[error("empty amount")]
    Empty,
    #[error("{0:?} is not a decimal amount like \"0.002\"")]
    Syntax(String),
    #[error("{0:?} has more than 6 decimal places (the smallest unit is 0.000001)")]
    TooPrecise(String),
    #[error("{0:?} is too large")]
    Overflow(String),
}

impl Micros {
    pub const ZERO: Micros = Micros(0);

    /// Parses a decimal string such as `"5"`, `"0.002"` or `"12.50"`.
    /// Signs, exponents, and more than six decimals are refused rather than rounded.
    pub fn parse(s: &str) -> Result<Micros, ParseMoneyError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ParseMoneyError::Empty);
        }
        let (int, frac) = match s.split_once('.') {
            Some((i, f)) => (i, f),
            None => (s, ""),
        };
        let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
            return Err(ParseMoneyError::Syntax(s.to_owned()));
        }
        if s.ends_with('.') && frac.is_empty() && s.contains('.') && int.is_empty() {
            return Err(ParseMoneyError::Syntax(s.to_owned()));
        }
        let frac_trimmed = frac.trim_end_matches('0');
        if frac_trimmed.len() > DECIMALS as usize {
            return Err(ParseMoneyError::TooPrecise(s.to_owned()));
        }
        let overflow = || ParseMoneyError::Overflow(s.to_owned());
        let whole: u64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| overflow())? };
        let mut frac_micros: u64 = 0;
        for (i, b) in frac_trimmed.bytes().enumerate() {
            frac_micros += u64::from(b - b'0') * 10u64.pow(DECIMALS - 1 - i as u32);
        }
        whole.checked_mul(SCALE).and_then(|w| w.checked_add(frac_micros)).map(Micros).ok_or_else(overflow)
    }

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn checked_add(self, o: Micros) -> Option<Micros> {
        self.0.checked_add(o.0).map(Micros)
    }

    pub fn checked_sub(self, o: Micros) -> Option<Micros> {
        self.0.checked_sub(o.0).map(Micros)
    }
}

/// Formats with the fewest decimals that are exact, but at least two: `5.00`, `0.002`.
impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / SCALE;
        let (mut frac, mut width) = (self.0 % SCALE, DECIMALS as usize);
        while width > 2 && frac % 10 == 0 {
            frac /= 10;
            width -= 1;
        }
        write!(f, "{whole}.{frac:0width$}")
    }
}

/// What an amount is counted in: US dollars (credits and prices) or a token's symbol
/// (x402's `asset_symbol`, validated as letters and digits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Currency {
    Usd,
    Token(Symbol),
}

/// A token symbol: 1 to 16 ASCII letters or digits (made only by [`Currency::token`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol(Arc<str>);

impl Currency {
    /// A token symbol, if it is one: 1 to 16 ASCII letters or digits.
    pub fn token(symbol: &str) -> Option<Currency> {
        let ok = (1..=16).contains(&symbol.len()) && symbol.bytes().all(|b| b.is_ascii_alphanumeric());
        ok.then(|| Currency::Token(Symbol(symbol.into())))
    }

    pub fn code(&self) -> &str {
        match self {
            Currency::Usd => "USD",
            Currency::Token(Symbol(s)) => s,
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An amount in a currency, as callers see it: `0.002 USD`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Money {
    pub amount: Micros,
    pub currency: Currency,
}

impl Money {
    pub fn usd(amount: Micros) -> Money {
        Money { amount, currency: Currency::Usd }
    }

    /// The money header format (`X-Tollgate-Charged: 0.002 USD`).
    pub fn header_value(&self) -> HeaderValue {
        // An amount is digits and a dot, a currency letters and digits (`Symbol`), so
        // the text is always a valid header value.
        HeaderValue::from_str(&self.to_string()).expect("money is visible ASCII")
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

impl std::str::FromStr for Micros {
    type Err = ParseMoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Micros::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_decimal_strings_exactly() {
        assert_eq!(Micros::parse("0.002"), Ok(Micros(2_000)));
        assert_eq!(Micros::parse("5"), Ok(Micros(5_000_000)));
        assert_eq!(Micros::parse("5.00"), Ok(Micros(5_000_000)));
        assert_eq!(Micros::parse("0.000001"), Ok(Micros(1)));
        assert_eq!(Micros::parse(".5"), Ok(Micros(500_000)));
        assert_eq!(Micros::parse("1.2300000"), Ok(Micros(1_230_000)));
    }

    #[test]
    fn refuses_what_it_would_have_to_round() {
        assert!(matches!(Micros::parse("0.0000001"), Err(ParseMoneyError::TooPrecise(_))));
        assert!(matches!(Micros::parse("-1"), Err(ParseMoneyError::Syntax(_))));
        assert!(matches!(Micros::parse("1e3"), Err(ParseMoneyError::Syntax(_))));
        assert!(matches!(Micros::parse("."), Err(ParseMoneyError::Syntax(_))));
        assert!(matches!(Micros::parse("1.2.3"), Err(ParseMoneyError::Syntax(_))));
        assert!(matches!(Micros::parse(""), Err(ParseMoneyError::Empty)));
        assert!(matches!(Micros::parse("99999999999999999999"), Err(ParseMoneyError::Overflow(_))));
    }

    #[test]
    fn money_shows_its_currency() {
        assert_eq!(Money::usd(Micros(2_000)).to_string(), "0.002 USD");
        let usdc = Money { amount: Micros(10_000), currency: Currency::token("USDC").unwrap() };
        assert_eq!(usdc.header_value(), "0.01 USDC");
        assert_eq!(Currency::token("US DC"), None);
        assert_eq!(Currency::token(""), None);
        assert_eq!(Currency::token("USD\n"), None);
    }

    #[test]
    fn formats_without_losing_digits() {
        assert_eq!(Micros(2_000).to_string(), "0.002");
        assert_eq!(Micros(5_000_000).to_string(), "5.00");
        assert_eq!(Micros(500).to_string(), "0.0005");
        assert_eq!(Micros(1).to_string(), "0.000001");
        assert_eq!(Micros(12_340_000).to_string(), "12.34");
    }
}
