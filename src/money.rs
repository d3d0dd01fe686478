//! Money as integer micro-units (1 USD = 1,000,000 micros), never floating point.
//!
//! Prices and amounts cross the API boundary as decimal strings (`"0.002"`); inside
//! tollgate they are `Micros`. For x402 with a 6-decimal token (USDC) one micro-USD is
//! exactly one atomic unit.

use std::fmt;

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
    fn formats_without_losing_digits() {
        assert_eq!(Micros(2_000).to_string(), "0.002");
        assert_eq!(Micros(5_000_000).to_string(), "5.00");
        assert_eq!(Micros(500).to_string(), "0.0005");
        assert_eq!(Micros(1).to_string(), "0.000001");
        assert_eq!(Micros(12_340_000).to_string(), "12.34");
    }
}
