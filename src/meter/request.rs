//! Reading a metered request: the model, the output it allows, whether it streams, and
//! an input token estimate that does not undercount.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::tokens::count_tokens;
use super::{Ask, Meter, Unreadable};

/// Tokens each message costs beyond its text (role markers and separators). OpenAI's
/// cookbook (`num_tokens_from_messages`) counts 3 for current models; one more keeps the
/// estimate on the safe side of models that count 4.
const PER_MESSAGE: u64 = 4;
/// Every reply is primed with `<|start|>assistant<|message|>` (cookbook rule).
const REPLY_PRIMING: u64 = 3;
/// A non-text part (image, audio, file) is not tokenized as its base64 or URL text:
/// a fixed allowance stands in for it. 1,600 tokens covers a high-detail image on
/// OpenAI's tile formula for common sizes and Anthropic's `width × height / 750` up to
/// about 1.2 megapixels.
const NON_TEXT_PART: u64 = 1_600;
/// Claude's tokenizer is not public; on English prose and code it yields more tokens
/// than `o200k_base` (Anthropic's own counts run roughly 10–20% above it), so the
/// o200k count is scaled by 1.2 to keep the estimate from undercounting.
const CLAUDE_SCALE_NUM: u64 = 6;
const CLAUDE_SCALE_DEN: u64 = 5;

/// Part `type`s that carry no text to tokenize.
const NON_TEXT_TYPES: &[&str] =
    &["image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "document"];
/// Keys whose values are identifiers or opaque blobs, not text a model reads as tokens.
const SKIPPED_KEYS: &[&str] = &[
    "type",
    "id",
    "call_id",
    "tool_call_id",
    "tool_use_id",
    "status",
    "cache_control",
    "signature",
    "encrypted_content",
];

/// Reads what `body` asks for under `meter`.
pub fn read_request(meter: Meter, body: &[u8]) -> Result<Ask, Unreadable> {
    ask_of(meter, &parse_object(body)?)
}

/// What `body` asks for, and the body as the upstream will get it, from one parse: the
/// JSON that was priced, written out again, so a body whose keys repeat (`"model"`
/// twice) cannot be priced on one reading and served on another by a parser that keeps
/// the first of two equal keys where this one keeps the last. On an `openai-chat`
/// stream `stream_options.include_usage` is set, so the upstream reports usage.
pub fn read_for_upstream(meter: Meter, body: &[u8]) -> Result<(Ask, Bytes), Unreadable> {
    let mut obj = parse_object(body)?;
    let ask = ask_of(meter, &obj)?;
    if meter == Meter::OpenAiChat && ask.stream {
        set_include_usage(&mut obj);
    }
    let forwarded = serde_json::to_vec(&obj).map_err(|e| Unreadable::NotJson(e.to_string()))?;
    Ok((ask, Bytes::from(forwarded)))
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Unreadable> {
    match serde_json::from_slice(body).map_err(|e| Unreadable::NotJson(e.to_string()))? {
        Value::Object(obj) => Ok(obj),
        _ => Err(Unreadable::NotObject),
    }
}

fn ask_of(meter: Meter, obj: &Map<String, Value>) -> Result<Ask, Unreadable> {
    let model = match obj.get("model") {
        Some(Value::String(m)) => m.clone(),
        _ => return Err(Unreadable::NoModel),
    };
    let stream = obj.get("stream") == Some(&Value::Bool(true));
    let (max_output, include_usage, input_tokens) = match meter {
        Meter::OpenAiChat => {
            let n = match obj.get("n") {
                None | Some(Value::Null) => 1,
                Some(v) => match v.as_u64() {
                    Some(n @ 1..=128) => n,
                    _ => return Err(bad("n must be 1..=128")),
                },
            };
            let max = match non_negative(obj, "max_completion_tokens")? {
                Some(m) => Some(m),
                None => non_negative(obj, "max_tokens")?,
            };
            let include_usage =
                obj.get("stream_options").and_then(|o| o.get("include_usage")).is_some_and(|v| v == &Value::Bool(true));
            (max.map(|m| m.saturating_mul(n)), include_usage, chat_input(obj))
        }
        Meter::OpenAiResponses => (non_negative(obj, "max_output_tokens")?, false, responses_input(obj)),
        Meter::OpenAiEmbeddings => (Some(0), false, embeddings_input(obj)),
        Meter::AnthropicMessages => (non_negative(obj, "max_tokens")?, false, anthropic_input(obj)),
    };
    Ok(Ask { model, max_output, stream, include_usage, input_tokens })
}

/// `body` with `stream_options.include_usage` set to `true`, its other `stream_options`
/// kept; `None` if `body` is not a JSON object.
pub fn with_include_usage(body: &[u8]) -> Option<Bytes> {
    let mut obj = parse_object(body).ok()?;
    set_include_usage(&mut obj);
    serde_json::to_vec(&obj).ok().map(Bytes::from)
}

fn set_include_usage(obj: &mut Map<String, Value>) {
    match obj.get_mut("stream_options") {
        Some(Value::Object(options)) => {
            options.insert("include_usage".to_owned(), Value::Bool(true));
        }
        _ => {
            let mut options = Map::new();
            options.insert("include_usage".to_owned(), Value::Bool(true));
            obj.insert("stream_options".to_owned(), Value::Object(options));
        }
    }
}

fn bad(msg: &str) -> Unreadable {
    Unreadable::BadField(msg.to_owned())
}

/// An optional non-negative integer field (`null` counts as absent).
fn non_negative(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, Unreadable> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| bad(&format!("{key} must be a non-negative integer"))),
    }
}

/// Tokens of the text in `v`: strings are tokenized, non-text parts get their
/// allowance, identifiers and opaque blobs are skipped.
fn text_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => count_tokens(s),
        Value::Array(items) => items.iter().map(text_tokens).fold(0, u64::saturating_add),
        Value::Object(obj) => {
            if obj.get("type").and_then(Value::as_str).is_some_and(|t| NON_TEXT_TYPES.contains(&t)) {
                return NON_TEXT_PART;
            }
            obj.iter()
                .filter(|(k, _)| !SKIPPED_KEYS.contains(&k.as_str()))
                .map(|(_, v)| text_tokens(v))
                .fold(0, u64::saturating_add)
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
    }
}

/// A list of messages or input items: each one's text plus its overhead.
fn messages_tokens(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Array(items)) => {
            items.iter().map(|m| text_tokens(m).saturating_add(PER_MESSAGE)).fold(0, u64::saturating_add)
        }
        // A bare string `input` is one user message.
        Some(Value::String(s)) => count_tokens(s).saturating_add(PER_MESSAGE),
        Some(other) => text_tokens(other),
        None => 0,
    }
}

/// Tool definitions reach the model as text rendered from their JSON schema; the JSON
/// itself is a close, slightly generous stand-in.
fn json_tokens(v: Option<&Value>) -> u64 {
    match v {
        None | Some(Value::Null) => 0,
        Some(v) => serde_json::to_string(v).map(|s| count_tokens(&s)).unwrap_or(0),
    }
}

fn chat_input(obj: &Map<String, Value>) -> u64 {
    messages_tokens(obj.get("messages"))
        .saturating_add(json_tokens(obj.get("tools")))
        .saturating_add(json_tokens(obj.get("functions")))
        .saturating_add(REPLY_PRIMING)
}

fn responses_input(obj: &Map<String, Value>) -> u64 {
    let instructions = match obj.get("instructions") {
        Some(Value::String(s)) => count_tokens(s).saturating_add(PER_MESSAGE),
        _ => 0,
    };
    instructions
        .saturating_add(messages_tokens(obj.get("input")))
        .saturating_add(json_tokens(obj.get("tools")))
        .saturating_add(REPLY_PRIMING)
}

fn embeddings_input(obj: &Map<String, Value>) -> u64 {
    fn one(v: &Value) -> u64 {
        match v {
            Value::String(s) => count_tokens(s),
            // Pre-tokenized input: each number is one token.
            Value::Number(_) => 1,
            Value::Array(items) => items.iter().map(one).fold(0, u64::saturating_add),
            _ => 0,
        }
    }
    obj.get("input").map(one).unwrap_or(0)
}

fn anthropic_input(obj: &Map<String, Value>) -> u64 {
    let system = match obj.get("system") {
        None | Some(Value::Null) => 0,
        Some(s) => text_tokens(s).saturating_add(PER_MESSAGE),
    };
    let o200k = system
        .saturating_add(messages_tokens(obj.get("messages")))
        .saturating_add(json_tokens(obj.get("tools")))
        .saturating_add(REPLY_PRIMING);
    o200k.saturating_mul(CLAUDE_SCALE_NUM).div_ceil(CLAUDE_SCALE_DEN)
}
