//! `[[model]]`: what each model's tokens cost on metered routes.

use std::collections::HashSet;

use super::raw::RawModel;
use super::values::Problems;
use crate::meter::{ModelPrice, PerMillion};
use crate::money::Micros;

/// Parses every `[[model]]`. Prices are USD per 1M tokens with at most 6 decimals;
/// `cached_input` and `cache_write_input` default to `input`.
pub(super) fn parse_all(raw: Vec<RawModel>, p: &mut Problems) -> Option<Vec<ModelPrice>> {
    let mut names = HashSet::new();
    let parsed: Vec<_> = raw.into_iter().enumerate().map(|(i, m)| parse(i, m, &mut names, p)).collect();
    parsed.into_iter().collect()
}

fn parse(i: usize, m: RawModel, names: &mut HashSet<String>, p: &mut Problems) -> Option<ModelPrice> {
    let at = format!("model[{i}]");
    let before = p.len();
    let stem = m.name.strip_suffix('*').unwrap_or(&m.name);
    if m.name.is_empty() {
        p.push(format_args!("{at}.name"), "must not be empty");
    } else if stem.contains('*') {
        p.push(format_args!("{at}.name"), "'*' is allowed only at the end (\"gpt-4o*\", or \"*\" for any model)");
    } else if !names.insert(m.name.clone()) {
        p.push(format_args!("{at}.name"), format_args!("duplicate model {:?}", m.name));
    }
    let mut price = |key: &str, v: &str| {
        p.check(format_args!("{at}.{key}"), Micros::parse(v).map(PerMillion).map_err(|e| e.to_string()))
    };
    let input = price("input", &m.input);
    let output = price("output", &m.output);
    let cached_input = m.cached_input.as_deref().map(|v| price("cached_input", v));
    let cache_write_input = m.cache_write_input.as_deref().map(|v| price("cache_write_input", v));
    let max_output_tokens = match (m.max_output_tokens, output) {
        (Some(0), _) => {
            p.push(format_args!("{at}.max_output_tokens"), "must be above zero");
            None
        }
        (Some(n), _) => Some(n),
        // A model whose output is free (embeddings) needs no bound on it.
        (None, Some(PerMillion(Micros::ZERO))) => Some(0),
        (None, _) => {
            p.push(
                format_args!("{at}.max_output_tokens"),
                "required: it bounds the hold of a request that names no output maximum",
            );
            None
        }
    };
    if p.len() != before {
        return None;
    }
    let input = input?;
    Some(ModelPrice {
        name: m.name,
        input,
        cached_input: cached_input.unwrap_or(Some(input))?,
        cache_write_input: cache_write_input.unwrap_or(Some(input))?,
        output: output?,
        max_output_tokens: max_output_tokens?,
    })
}
