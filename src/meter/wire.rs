//! Shapes of the upstreams' usage objects, and a lenient string type for the text
//! fields the meter only counts.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::Usage;

/// A field that counts as text when it is a string and as nothing otherwise, so that an
/// upstream putting an object or a number where text usually goes costs the meter one
/// uncounted field instead of the whole event (and with it, possibly, the usage).
/// Strings without escapes are borrowed from the input.
#[derive(Debug, Default)]
pub(crate) struct Text<'a>(pub(crate) Option<Cow<'a, str>>);

impl Text<'_> {
    pub(crate) fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Borrowed(v))))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Owned(v.to_owned()))))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Text(Some(Cow::Owned(v))))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Text(None))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(TextVisitor)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Text(None))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Text(None))
    }
}

/// `cached_tokens` of OpenAI's `prompt_tokens_details` / `input_tokens_details`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct CachedDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

fn cached(details: &Option<CachedDetails>) -> u64 {
    details.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0)
}

/// Chat Completions and Embeddings `usage`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ChatUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<CachedDetails>,
}

impl ChatUsage {
    /// Complete only with both counts (embeddings: with `prompt_tokens`).
    pub(crate) fn to_usage(&self, needs_output: bool) -> Option<Usage> {
        let prompt = self.prompt_tokens?;
        let output = match self.completion_tokens {
            Some(n) => n,
            None if needs_output => return None,
            None => 0,
        };
        let cached = cached(&self.prompt_tokens_details);
        // Cached tokens are part of prompt_tokens; they are priced apart, so they are
        // taken out of the uncached input.
        Some(Usage { input: prompt.saturating_sub(cached), cached_input: cached, cache_write_input: 0, output })
    }
}

/// Responses API `usage`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ResponsesUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    input_tokens_details: Option<CachedDetails>,
}

impl ResponsesUsage {
    pub(crate) fn to_usage(&self) -> Option<Usage> {
        let input = self.input_tokens?;
        let output = self.output_tokens?;
        let cached = cached(&self.input_tokens_details);
        Some(Usage { input: input.saturating_sub(cached), cached_input: cached, cache_write_input: 0, output })
    }
}

/// Anthropic Messages `usage`: the three input kinds are reported apart, and
/// `input_tokens` already excludes the cached ones.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub(crate) struct AnthropicUsage {
    #[serde(default)]
    pub(crate) input_tokens: Option<u64>,
    #[serde(default)]
    pub(crate) output_tokens: Option<u64>,
    #[serde(default)]
    pub(crate) cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    pub(crate) cache_creation_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Fields `later` carries replace ours: Anthropic's stream reports running totals,
    /// so the last value is the count, never a sum.
    pub(crate) fn merge(&mut self, later: &AnthropicUsage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_read_input_tokens = later.cache_read_input_tokens.or(self.cache_read_input_tokens);
        self.cache_creation_input_tokens = later.cache_creation_input_tokens.or(self.cache_creation_input_tokens);
    }

    pub(crate) fn to_usage(self) -> Option<Usage> {
        Some(Usage {
            input: self.input_tokens.unwrap_or(0),
            cached_input: self.cache_read_input_tokens.unwrap_or(0),
            cache_write_input: self.cache_creation_input_tokens.unwrap_or(0),
            output: self.output_tokens?,
        })
    }
}
