//! Prices: which `[[model]]` entry applies, what a usage costs, and how much to hold
//! before the upstream answers.

use super::{Ask, ModelPrice, PerMillion, Usage};
use crate::money::Micros;

/// The entry for `model`: the exact name first, then the longest matching `prefix*`,
/// then `*`.
pub fn find_model<'a>(models: &'a [ModelPrice], model: &str) -> Option<&'a ModelPrice> {
    if let Some(exact) = models.iter().find(|m| m.name == model) {
        return Some(exact);
    }
    // `*` is the empty prefix, so it matches last of all.
    models
        .iter()
        .filter_map(|m| {
            let prefix = m.name.strip_suffix('*')?;
            model.starts_with(prefix).then_some((prefix.len(), m))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, m)| m)
}

/// `Σ tokens × price-per-million / 1e6`, rounded up once: rounding each kind (or each
/// token) up would overcharge small requests many times over.
fn metered(parts: &[(u64, PerMillion)]) -> Micros {
    // Each product fits in u128; four of them at the extremes may not, hence saturation.
    let sum = parts
        .iter()
        .map(|&(tokens, PerMillion(Micros(price)))| u128::from(tokens) * u128::from(price))
        .fold(0u128, u128::saturating_add);
    let micros = sum.div_ceil(1_000_000);
    Micros(u64::try_from(micros).unwrap_or(u64::MAX))
}

impl Usage {
    /// What these tokens cost at `price`, rounded up to the micro-USD.
    pub fn cost(&self, price: &ModelPrice) -> Micros {
        metered(&[
            (self.input, price.input),
            (self.cached_input, price.cached_input),
            (self.cache_write_input, price.cache_write_input),
            (self.output, price.output),
        ])
    }

    /// All input tokens, whatever their kind.
    pub fn total_input(&self) -> u64 {
        self.input.saturating_add(self.cached_input).saturating_add(self.cache_write_input)
    }
}

/// The amount reserved before forwarding a metered request, and the token counts it
/// was sized for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub amount: Micros,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The most `ask` can cost: its estimated input at the dearest input price (a cache
/// write may cost more than plain input, and the hold must stay an upper bound), plus
/// its allowed output, plus `fixed`, capped by `max_price`.
pub fn hold(ask: &Ask, model: &ModelPrice, fixed: Micros, max_price: Option<Micros>) -> Hold {
    let output_tokens = match ask.max_output {
        Some(max) => max.min(model.max_output_tokens),
        None => model.max_output_tokens,
    };
    let input_price = model.input.max(model.cached_input).max(model.cache_write_input);
    let Micros(metered) = metered(&[(ask.input_tokens, input_price), (output_tokens, model.output)]);
    let mut amount = Micros(fixed.0.saturating_add(metered));
    if let Some(cap) = max_price {
        amount = amount.min(cap);
    }
    Hold { amount, input_tokens: ask.input_tokens, output_tokens }
}
