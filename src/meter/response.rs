//! Reading a non-streamed JSON response: the usage the upstream reported, and a count
//! of the output text for when it reported none.

use serde::Deserialize;
use serde_json::Value;

use super::tokens::count_tokens;
use super::wire::{AnthropicUsage, ChatUsage, ResponsesUsage};
use super::{Meter, Usage};

/// What a non-streamed response body says about its cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseRead {
    /// The upstream's reported usage, when complete.
    pub usage: Option<Usage>,
    /// Tokens of the output text in the body, counted with the tokenizer.
    pub output_tokens_counted: u64,
}

/// Reads a complete (non-streamed) response body; anything unreadable yields no usage.
pub fn response_usage(meter: Meter, body: &[u8]) -> ResponseRead {
    if meter == Meter::OpenAiEmbeddings {
        // Only `usage` is read, so the vectors are skipped without being built.
        #[derive(Deserialize)]
        struct Embeddings {
            #[serde(default)]
            usage: Option<ChatUsage>,
        }
        let usage = serde_json::from_slice::<Embeddings>(body).ok().and_then(|e| e.usage?.to_usage(false));
        return ResponseRead { usage, output_tokens_counted: 0 };
    }
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return ResponseRead::default();
    };
    let usage = value.get("usage").and_then(|u| match meter {
        Meter::OpenAiChat => ChatUsage::deserialize(u).ok()?.to_usage(true),
        Meter::OpenAiResponses => ResponsesUsage::deserialize(u).ok()?.to_usage(),
        Meter::AnthropicMessages => AnthropicUsage::deserialize(u).ok()?.to_usage(),
        Meter::OpenAiEmbeddings => None,
    });
    let mut text = String::new();
    match meter {
        Meter::OpenAiChat => {
            for choice in items(value.get("choices")) {
                let Some(message) = choice.get("message") else { continue };
                for key in ["content", "reasoning_content", "refusal"] {
                    push_str(&mut text, message.get(key));
                }
                for call in items(message.get("tool_calls")) {
                    let function = call.get("function");
                    push_str(&mut text, function.and_then(|f| f.get("name")));
                    push_str(&mut text, function.and_then(|f| f.get("arguments")));
                }
            }
        }
        Meter::OpenAiResponses => {
            for item in items(value.get("output")) {
                for part in items(item.get("content")).chain(items(item.get("summary"))) {
                    push_str(&mut text, part.get("text"));
                    push_str(&mut text, part.get("refusal"));
                }
                push_str(&mut text, item.get("arguments"));
            }
        }
        Meter::AnthropicMessages => {
            for block in items(value.get("content")) {
                push_str(&mut text, block.get("text"));
                push_str(&mut text, block.get("thinking"));
                if let Some(input) = block.get("input") {
                    text.push_str(&input.to_string());
                }
            }
        }
        Meter::OpenAiEmbeddings => {}
    }
    ResponseRead { usage, output_tokens_counted: count_tokens(&text) }
}

fn items(v: Option<&Value>) -> impl Iterator<Item = &Value> {
    v.and_then(Value::as_array).into_iter().flatten()
}

fn push_str(text: &mut String, v: Option<&Value>) {
    if let Some(s) = v.and_then(Value::as_str) {
        text.push_str(s);
    }
}
