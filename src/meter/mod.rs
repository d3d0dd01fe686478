//! Metering: what an LLM request may cost and what it did cost, read from the request
//! and response bodies of the four APIs tollgate meters (OpenAI Chat Completions,
//! Responses, Embeddings, Anthropic Messages). Pure code: no I/O, no ledger; the
//! payment gate uses it to size a hold and to price the usage the upstream reported.

use std::fmt;

mod price;
mod request;
mod response;
mod sse;
mod tokens;
mod wire;

#[cfg(test)]
mod tests;

pub use price::{find_model, hold, Hold};
pub use request::{read_for_upstream, read_request, with_include_usage};
pub use response::{response_usage, ResponseRead};
pub use sse::{StreamMeter, MAX_EVENT};
pub use tokens::count_tokens;

use serde::{Deserialize, Serialize};

use crate::money::Micros;

/// How usage is read: one of the four supported API shapes (route key `meter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meter {
    OpenAiChat,
    OpenAiResponses,
    OpenAiEmbeddings,
    AnthropicMessages,
}

impl Meter {
    pub const ALL: [Meter; 4] =
        [Meter::OpenAiChat, Meter::OpenAiResponses, Meter::OpenAiEmbeddings, Meter::AnthropicMessages];

    pub fn as_str(self) -> &'static str {
        match self {
            Meter::OpenAiChat => "openai-chat",
            Meter::OpenAiResponses => "openai-responses",
            Meter::OpenAiEmbeddings => "openai-embeddings",
            Meter::AnthropicMessages => "anthropic-messages",
        }
    }

    pub fn parse(s: &str) -> Option<Meter> {
        Meter::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

impl fmt::Display for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Token counts of one request, by the kinds that are priced apart. `input` is the
/// *uncached* input (OpenAI reports cached tokens inside its input total; they are
/// subtracted here), so the four kinds never overlap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(rename = "input_tokens")]
    pub input: u64,
    #[serde(rename = "cached_input_tokens")]
    pub cached_input: u64,
    #[serde(rename = "cache_write_input_tokens")]
    pub cache_write_input: u64,
    #[serde(rename = "output_tokens")]
    pub output: u64,
}

/// Whether a metered charge comes from the upstream's own usage report or from
/// tollgate's count (the upstream reported none, or the client left under `"stop"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    Reported,
    Estimated,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
        }
    }

    pub fn parse(s: &str) -> Option<UsageSource> {
        match s {
            "reported" => Some(UsageSource::Reported),
            "estimated" => Some(UsageSource::Estimated),
            _ => None,
        }
    }
}

/// A price per 1M tokens, in micro-USD (`"0.15"` USD per 1M tokens = 150,000).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PerMillion(pub Micros);

/// One `[[model]]` entry: what its tokens cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrice {
    /// Exact name, `prefix*`, or `*` (any other model).
    pub name: String,
    pub input: PerMillion,
    pub cached_input: PerMillion,
    pub cache_write_input: PerMillion,
    pub output: PerMillion,
    /// The hold's output when the request names no maximum; also caps the request's.
    pub max_output_tokens: u64,
}

/// What a metered request asks for, read from its JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// The body's `model`.
    pub model: String,
    /// The most output tokens the request allows (already multiplied by `n`), if it
    /// names a maximum.
    pub max_output: Option<u64>,
    /// `"stream": true`.
    pub stream: bool,
    /// The client itself asked for `stream_options.include_usage` (openai-chat).
    pub include_usage: bool,
    /// Input tokens counted with the tokenizer, per-message overhead included: an
    /// estimate that does not undercount ordinary prompts.
    pub input_tokens: u64,
}

/// The request body cannot be metered (`400 request_unreadable`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    #[error("the request body is not JSON: {0}")]
    NotJson(String),
    #[error("the request body is not a JSON object")]
    NotObject,
    #[error("the request body has no \"model\" string")]
    NoModel,
    #[error("{0}")]
    BadField(String),
}
