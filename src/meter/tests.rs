//! Tests of the meter against transcripts in the upstreams' documented shapes
//! (`tests/fixtures/meter/`), with exact token counts and micro-dollar amounts.

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::money::Micros;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/meter/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn price(name: &str, input: u64, cached: u64, write: u64, output: u64, max_output_tokens: u64) -> ModelPrice {
    ModelPrice {
        name: name.to_owned(),
        input: PerMillion(Micros(input)),
        cached_input: PerMillion(Micros(cached)),
        cache_write_input: PerMillion(Micros(write)),
        output: PerMillion(Micros(output)),
        max_output_tokens,
    }
}

/// USD per 1M tokens, as list prices: 0.15 / 0.075 / 0.60.
fn gpt_4o_mini() -> ModelPrice {
    price("gpt-4o-mini", 150_000, 75_000, 0, 600_000, 16_384)
}
fn o4_mini() -> ModelPrice {
    price("o4-mini", 1_100_000, 275_000, 0, 4_400_000, 100_000)
}
fn gpt_4_1() -> ModelPrice {
    price("gpt-4.1", 2_000_000, 500_000, 0, 8_000_000, 32_768)
}
fn embedding_3_small() -> ModelPrice {
    price("text-embedding-3-small", 20_000, 0, 0, 0, 0)
}
/// 3.00 input, 0.30 cache read, 3.75 cache write (5 min), 15.00 output.
fn claude_sonnet() -> ModelPrice {
    price("claude-sonnet-4-5*", 3_000_000, 300_000, 3_750_000, 15_000_000, 64_000)
}

fn usage(input: u64, cached_input: u64, cache_write_input: u64, output: u64) -> Usage {
    Usage { input, cached_input, cache_write_input, output }
}

/// Feeds `frames` through a fresh meter; returns the bytes sent on, the usage and the
/// counted output.
fn run(meter: Meter, strip: bool, frames: &[&[u8]]) -> (Vec<u8>, Option<Usage>, u64) {
    let mut m = StreamMeter::new(meter, strip);
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&m.feed(Bytes::copy_from_slice(f)));
        assert!(m.held_len() <= MAX_EVENT);
    }
    out.extend_from_slice(&m.finish());
    (out, m.usage(), m.output_tokens())
}

const STREAMS: [(&str, Meter); 4] = [
    ("openai-chat.stream.sse", Meter::OpenAiChat),
    ("openai-responses.stream.sse", Meter::OpenAiResponses),
    ("anthropic-messages.stream.sse", Meter::AnthropicMessages),
    ("anthropic-messages.cache.stream.sse", Meter::AnthropicMessages),
];

/// The chat fixture without its usage-only event.
fn chat_without_usage_event(sse: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(sse).unwrap();
    let events: Vec<&str> = text.split_inclusive("\n\n").collect();
    let kept: Vec<&str> = events.iter().copied().filter(|e| !e.contains("\"choices\":[]")).collect();
    assert_eq!(kept.len() + 1, events.len(), "exactly one usage-only event");
    kept.concat().into_bytes()
}

/// The same transcript with CRLF or CR line endings.
fn with_line_ending(sse: &[u8], ending: &str) -> Vec<u8> {
    std::str::from_utf8(sse).unwrap().replace('\n', ending).into_bytes()
}

// === tokenizer ===

#[test]
fn count_tokens_uses_o200k() {
    assert_eq!(count_tokens(""), 0);
    assert_eq!(count_tokens("Hello, world!"), 4);
    assert_eq!(count_tokens("hello"), 1);
}

// === reported usage and its cost, per fixture ===

#[test]
fn openai_chat_stream_usage_and_cost() {
    let sse = fixture("openai-chat.stream.sse");
    let (out, u, counted) = run(Meter::OpenAiChat, false, &[&sse]);
    assert_eq!(out, sse);
    assert_eq!(u, Some(usage(19, 0, 0, 10)));
    // 19 × 0.15 + 10 × 0.60 = 8.85 micro-USD, rounded up once.
    assert_eq!(u.unwrap().cost(&gpt_4o_mini()), Micros(9));
    assert_eq!(counted, count_tokens("Hello! How can I assist you today?"));
}

#[test]
fn openai_chat_json_cached_and_reasoning() {
    let read = response_usage(Meter::OpenAiChat, &fixture("openai-chat.json"));
    // 2006 prompt tokens of which 1920 cached; reasoning tokens are inside the 300.
    let u = read.usage.unwrap();
    assert_eq!(u, usage(86, 1920, 0, 300));
    assert_eq!(u.total_input(), 2006);
    // 86 × 1.10 + 1920 × 0.275 + 300 × 4.40 = 1942.6
    assert_eq!(u.cost(&o4_mini()), Micros(1943));
    assert_eq!(
        read.output_tokens_counted,
        count_tokens("The capital of France is Paris. It has been the country's capital since the 10th century, apart from a few short interruptions.")
    );
}

#[test]
fn openai_responses_stream_usage_and_cost() {
    let sse = fixture("openai-responses.stream.sse");
    let (out, u, counted) = run(Meter::OpenAiResponses, false, &[&sse]);
    assert_eq!(out, sse);
    assert_eq!(u, Some(usage(37, 0, 0, 11)));
    // 37 × 2.00 + 11 × 8.00 = 162 exactly.
    assert_eq!(u.unwrap().cost(&gpt_4_1()), Micros(162));
    assert_eq!(counted, count_tokens("Hi there! How can I help you today?"));
}

#[test]
fn openai_responses_json_usage_and_cost() {
    let read = response_usage(Meter::OpenAiResponses, &fixture("openai-responses.json"));
    let u = read.usage.unwrap();
    assert_eq!(u, usage(256, 1280, 0, 87));
    // 256 × 2.00 + 1280 × 0.50 + 87 × 8.00 = 1848 exactly.
    assert_eq!(u.cost(&gpt_4_1()), Micros(1848));
    assert!(read.output_tokens_counted > 60, "{}", read.output_tokens_counted);
}

#[test]
fn openai_embeddings_json_usage_and_cost() {
    let read = response_usage(Meter::OpenAiEmbeddings, &fixture("openai-embeddings.json"));
    assert_eq!(read, ResponseRead { usage: Some(usage(8, 0, 0, 0)), output_tokens_counted: 0 });
    // 8 × 0.02 = 0.16 micro-USD: rounded up to 1.
    assert_eq!(read.usage.unwrap().cost(&embedding_3_small()), Micros(1));
}

#[test]
fn anthropic_stream_usage_and_cost() {
    let sse = fixture("anthropic-messages.stream.sse");
    let (out, u, counted) = run(Meter::AnthropicMessages, false, &[&sse]);
    assert_eq!(out, sse);
    // message_start said output_tokens 1; the message_delta's 15 is the total.
    assert_eq!(u, Some(usage(25, 0, 0, 15)));
    assert_eq!(u.unwrap().cost(&claude_sonnet()), Micros(300));
    assert_eq!(counted, count_tokens("Hello!"));
}

#[test]
fn anthropic_cache_stream_usage_and_cost() {
    let sse = fixture("anthropic-messages.cache.stream.sse");
    let (_, u, counted) = run(Meter::AnthropicMessages, false, &[&sse]);
    assert_eq!(u, Some(usage(12, 2048, 1500, 89)));
    // 12 × 3.00 + 2048 × 0.30 + 1500 × 3.75 + 89 × 15.00 = 7610.4
    assert_eq!(u.unwrap().cost(&claude_sonnet()), Micros(7611));
    let text = "The user wants the weather; I should call the tool.{\"location\": \"San Francisco, CA\"}";
    assert_eq!(counted, count_tokens(text));
}

#[test]
fn anthropic_json_usage_and_cost() {
    let read = response_usage(Meter::AnthropicMessages, &fixture("anthropic-messages.json"));
    assert_eq!(read.usage, Some(usage(2095, 0, 2051, 503)));
    // 2095 × 3.00 + 2051 × 3.75 + 503 × 15.00 = 21521.25
    assert_eq!(read.usage.unwrap().cost(&claude_sonnet()), Micros(21522));
    assert_eq!(read.output_tokens_counted, count_tokens("Hi! My name is Claude."));
}

#[test]
fn anthropic_message_deltas_are_cumulative_not_summed() {
    let sse = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":4,\"output_tokens\":1}}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":5}}\n\n\
event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"input_tokens\":11,\"output_tokens\":12}}\n\n";
    let (_, u, _) = run(Meter::AnthropicMessages, false, &[sse]);
    assert_eq!(u, Some(usage(11, 4, 0, 12)));
}

#[test]
fn openai_chat_last_usage_wins() {
    let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":2}}}\n\n";
    let (_, u, _) = run(Meter::OpenAiChat, false, &[sse]);
    assert_eq!(u, Some(usage(1, 2, 0, 7)));
}

// === amounts ===

#[test]
fn cost_rounds_up_once_per_request() {
    // 7 × 0.15 = 1.05 micro-USD → 2, not 7 × ceil(0.15) = 7.
    assert_eq!(usage(7, 0, 0, 0).cost(&gpt_4o_mini()), Micros(2));
    // 0.15 + 0.075 + 0.60 = 0.825 → 1, not three round-ups.
    assert_eq!(usage(1, 1, 0, 1).cost(&gpt_4o_mini()), Micros(1));
    assert_eq!(usage(0, 0, 0, 0).cost(&gpt_4o_mini()), Micros(0));
    // 1e6 tokens at 0.15 is exactly 150,000 micros.
    assert_eq!(usage(1_000_000, 0, 0, 0).cost(&gpt_4o_mini()), Micros(150_000));
}

#[test]
fn cost_saturates() {
    let dear = price("x", u64::MAX, u64::MAX, u64::MAX, u64::MAX, 1);
    assert_eq!(usage(u64::MAX, u64::MAX, u64::MAX, u64::MAX).cost(&dear), Micros(u64::MAX));
    assert_eq!(usage(u64::MAX, 1, 1, 0).total_input(), u64::MAX);
}

#[test]
fn find_model_precedence() {
    let models = vec![
        price("*", 1, 0, 0, 0, 1),
        price("gpt-*", 2, 0, 0, 0, 1),
        price("gpt-4o*", 3, 0, 0, 0, 1),
        price("gpt-4o", 4, 0, 0, 0, 1),
    ];
    let name = |m: &str| find_model(&models, m).map(|p| p.name.as_str());
    assert_eq!(name("gpt-4o"), Some("gpt-4o"));
    assert_eq!(name("gpt-4o-mini"), Some("gpt-4o*"));
    assert_eq!(name("gpt-3.5-turbo"), Some("gpt-*"));
    assert_eq!(name("claude-opus-4"), Some("*"));
    assert_eq!(find_model(&models[1..], "claude-opus-4"), None);
    assert_eq!(find_model(&[], "gpt-4o"), None);
}

fn ask(input_tokens: u64, max_output: Option<u64>) -> Ask {
    Ask { model: "m".to_owned(), max_output, stream: false, include_usage: false, input_tokens }
}

#[test]
fn hold_math() {
    let m = gpt_4o_mini();
    // 2000 fixed + ceil(1000 × 0.15 + 100 × 0.60) = 2000 + 210.
    assert_eq!(
        hold(&ask(1000, Some(100)), &m, Micros(2000), None),
        Hold { amount: Micros(2210), input_tokens: 1000, output_tokens: 100 }
    );
    // No maximum: the model's 16,384: ceil(150 + 9830.4) = 9981.
    let none = hold(&ask(1000, None), &m, Micros(2000), None);
    assert_eq!(none, Hold { amount: Micros(11_981), input_tokens: 1000, output_tokens: 16_384 });
    // A larger request maximum is capped by the model's.
    assert_eq!(hold(&ask(1000, Some(1_000_000)), &m, Micros(2000), None), none);
    // max_price caps the amount, not the token counts.
    assert_eq!(
        hold(&ask(1000, None), &m, Micros(2000), Some(Micros(5000))),
        Hold { amount: Micros(5000), input_tokens: 1000, output_tokens: 16_384 }
    );
    assert_eq!(hold(&ask(1000, Some(100)), &m, Micros(2000), Some(Micros(5000))).amount, Micros(2210));
}

#[test]
fn hold_uses_dearest_input_price() {
    // Cache writes (3.75) cost more than input (3.00): 1000 × 3.75 + 10 × 15 = 3900.
    let h = hold(&ask(1000, Some(10)), &claude_sonnet(), Micros::ZERO, None);
    assert_eq!(h.amount, Micros(3900));
    // The hold covers any split of those 1000 input tokens into the three kinds.
    for u in [usage(1000, 0, 0, 10), usage(0, 1000, 0, 10), usage(0, 0, 1000, 10), usage(400, 300, 300, 10)] {
        assert!(u.cost(&claude_sonnet()) <= h.amount);
    }
}

// === requests ===

fn read(meter: Meter, body: &str) -> Result<Ask, Unreadable> {
    read_request(meter, body.as_bytes())
}

#[test]
fn chat_request_fields() {
    let a = read(
        Meter::OpenAiChat,
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello"}],"max_tokens":100,"n":2,"stream":true}"#,
    )
    .unwrap();
    assert_eq!(a.model, "gpt-4o");
    assert_eq!(a.max_output, Some(200));
    assert!(a.stream);
    assert!(!a.include_usage);
    // 4 per message + "user" + "Hello" + 3 to prime the reply.
    assert_eq!(a.input_tokens, 4 + count_tokens("user") + count_tokens("Hello") + 3);

    let a = read(
        Meter::OpenAiChat,
        r#"{"model":"gpt-4o","messages":[],"max_tokens":100,"max_completion_tokens":50,"stream":true,"stream_options":{"include_usage":true}}"#,
    )
    .unwrap();
    assert_eq!(a.max_output, Some(50), "max_completion_tokens wins over max_tokens");
    assert!(a.include_usage);

    let a = read(Meter::OpenAiChat, r#"{"model":"gpt-4o","messages":[],"n":null,"max_tokens":null}"#).unwrap();
    assert_eq!((a.max_output, a.stream, a.include_usage), (None, false, false));
    let a =
        read(Meter::OpenAiChat, r#"{"model":"gpt-4o","stream":"yes","stream_options":{"include_usage":1}}"#).unwrap();
    assert_eq!((a.stream, a.include_usage), (false, false));
}

#[test]
fn request_errors() {
    let bad = |s: &str| Err(Unreadable::BadField(s.to_owned()));
    assert!(matches!(read(Meter::OpenAiChat, "not json"), Err(Unreadable::NotJson(_))));
    assert!(matches!(read(Meter::OpenAiChat, ""), Err(Unreadable::NotJson(_))));
    assert_eq!(read(Meter::OpenAiChat, "[1]"), Err(Unreadable::NotObject));
    assert_eq!(read(Meter::OpenAiChat, "{}"), Err(Unreadable::NoModel));
    assert_eq!(read(Meter::AnthropicMessages, r#"{"model":5}"#), Err(Unreadable::NoModel));
    assert_eq!(read(Meter::OpenAiChat, r#"{"model":"m","n":0}"#), bad("n must be 1..=128"));
    assert_eq!(read(Meter::OpenAiChat, r#"{"model":"m","n":129}"#), bad("n must be 1..=128"));
    assert_eq!(read(Meter::OpenAiChat, r#"{"model":"m","n":"2"}"#), bad("n must be 1..=128"));
    assert_eq!(
        read(Meter::OpenAiChat, r#"{"model":"m","max_tokens":-1}"#),
        bad("max_tokens must be a non-negative integer")
    );
    assert_eq!(
        read(Meter::OpenAiChat, r#"{"model":"m","max_completion_tokens":1.5}"#),
        bad("max_completion_tokens must be a non-negative integer")
    );
    assert_eq!(
        read(Meter::OpenAiResponses, r#"{"model":"m","max_output_tokens":"10"}"#),
        bad("max_output_tokens must be a non-negative integer")
    );
    assert_eq!(
        read(Meter::AnthropicMessages, r#"{"model":"m","max_tokens":-5}"#),
        bad("max_tokens must be a non-negative integer")
    );
}

#[test]
fn responses_request_fields() {
    let a = read(
        Meter::OpenAiResponses,
        r#"{"model":"gpt-4.1","instructions":"Be brief.","input":"Tell me a joke.","max_output_tokens":300,"stream":true}"#,
    )
    .unwrap();
    assert_eq!((a.max_output, a.stream, a.include_usage), (Some(300), true, false));
    assert_eq!(a.input_tokens, (4 + count_tokens("Be brief.")) + (4 + count_tokens("Tell me a joke.")) + 3);

    let a = read(
        Meter::OpenAiResponses,
        r#"{"model":"gpt-4.1","input":[{"role":"user","content":[{"type":"input_text","text":"What is this?"},{"type":"input_image","image_url":"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA"}]}]}"#,
    )
    .unwrap();
    assert_eq!(a.max_output, None);
    assert_eq!(a.input_tokens, 4 + count_tokens("user") + count_tokens("What is this?") + 1_600 + 3);
}

#[test]
fn embeddings_request_fields() {
    let a = read(Meter::OpenAiEmbeddings, r#"{"model":"text-embedding-3-small","input":"The food was delicious"}"#)
        .unwrap();
    assert_eq!(a.max_output, Some(0));
    assert_eq!(a.input_tokens, count_tokens("The food was delicious"));
    let a = read(Meter::OpenAiEmbeddings, r#"{"model":"e","input":["one two","three"]}"#).unwrap();
    assert_eq!(a.input_tokens, count_tokens("one two") + count_tokens("three"));
    let a = read(Meter::OpenAiEmbeddings, r#"{"model":"e","input":[1,2,3]}"#).unwrap();
    assert_eq!(a.input_tokens, 3);
    let a = read(Meter::OpenAiEmbeddings, r#"{"model":"e","input":[[1,2,3],[4,5]]}"#).unwrap();
    assert_eq!(a.input_tokens, 5);
}

#[test]
fn anthropic_request_scales_the_o200k_count() {
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"system":"You are terse.","messages":[{"role":"user","content":[{"type":"text","text":"Hello, Claude"},{"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo"}}]}],"stream":true}"#;
    let a = read(Meter::AnthropicMessages, body).unwrap();
    assert_eq!((a.max_output, a.stream, a.include_usage), (Some(1024), true, false));
    let o200k =
        (4 + count_tokens("You are terse.")) + (4 + count_tokens("user") + count_tokens("Hello, Claude") + 1_600) + 3;
    assert_eq!(a.input_tokens, (o200k * 6).div_ceil(5));
}

#[test]
fn tools_are_counted() {
    let tools = r#"[{"type":"function","function":{"name":"get_weather","description":"Get the current weather in a given city","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]"#;
    let without =
        read(Meter::OpenAiChat, r#"{"model":"m","messages":[{"role":"user","content":"Weather in Paris?"}]}"#).unwrap();
    let with = read(
        Meter::OpenAiChat,
        &format!(r#"{{"model":"m","messages":[{{"role":"user","content":"Weather in Paris?"}}],"tools":{tools}}}"#),
    )
    .unwrap();
    let json = serde_json::to_string(&serde_json::from_str::<serde_json::Value>(tools).unwrap()).unwrap();
    assert_eq!(with.input_tokens, without.input_tokens + count_tokens(&json));
}

/// The OpenAI cookbook's `num_tokens_from_messages` for gpt-4o-class models: 3 per
/// message, the tokens of every value, 1 more for a `name`, 3 to prime the reply.
fn cookbook_count(messages: &[(&str, &str)]) -> u64 {
    messages.iter().map(|(role, content)| 3 + count_tokens(role) + count_tokens(content)).sum::<u64>() + 3
}

#[test]
fn estimate_does_not_undercount_ordinary_prompts() {
    let prompts: [&[(&str, &str)]; 4] = [
        &[("user", "Hello")],
        &[("system", "You are a helpful assistant."), ("user", "What is the capital of France?")],
        &[
            ("system", "You translate English to French. Answer with the translation only."),
            ("user", "The weather is lovely today, shall we walk along the river after lunch?"),
            ("assistant", "Il fait beau aujourd'hui, on se promène le long de la rivière après le déjeuner ?"),
            ("user", "And: I would rather stay home and read a book about the history of Rust's borrow checker."),
        ],
        &[("user", &"Summarise this paragraph about ownership and borrowing in Rust, please. ".repeat(40))],
    ];
    for messages in prompts {
        let body = serde_json::json!({
            "model": "gpt-4o",
            "messages": messages.iter().map(|(r, c)| serde_json::json!({"role": r, "content": c})).collect::<Vec<_>>(),
        });
        let est = read_request(Meter::OpenAiChat, body.to_string().as_bytes()).unwrap().input_tokens;
        let truth = cookbook_count(messages);
        assert!(est >= truth, "{est} < {truth}");
        assert!(est * 4 <= truth * 5 + 256, "{est} > 1.25 × {truth} + 64");
    }
}

#[test]
fn with_include_usage_keeps_everything_else() {
    let body = br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_obfuscation":false},"messages":[{"role":"user","content":"Hi"}],"temperature":0.2}"#;
    let out = with_include_usage(body).unwrap();
    let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let mut want: serde_json::Value = serde_json::from_slice(body).unwrap();
    want["stream_options"]["include_usage"] = serde_json::Value::Bool(true);
    assert_eq!(got, want);

    let out = with_include_usage(br#"{"model":"gpt-4o","stream":true}"#).unwrap();
    let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(got, serde_json::json!({"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}));
    let out = with_include_usage(br#"{"model":"gpt-4o","stream_options":{"include_usage":false}}"#).unwrap();
    let got: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(got["stream_options"], serde_json::json!({"include_usage": true}));

    assert_eq!(with_include_usage(b"[1,2]"), None);
    assert_eq!(with_include_usage(b"nope"), None);
}

// === streams: frame splits, stripping, cuts ===

#[test]
fn every_split_point_gives_the_same_result() {
    for (name, meter) in STREAMS {
        let base = fixture(name);
        for sse in [base.clone(), with_line_ending(&base, "\r\n"), with_line_ending(&base, "\r")] {
            let whole = run(meter, false, &[&sse]);
            assert!(whole.1.is_some(), "{name}");
            for k in 0..=sse.len() {
                let split = run(meter, false, &[&sse[..k], &sse[k..]]);
                assert_eq!(split, whole, "{name} split at {k}");
            }
            let bytes: Vec<&[u8]> = sse.chunks(1).collect();
            assert_eq!(run(meter, false, &bytes), whole, "{name} byte by byte");
        }
    }
}

#[test]
fn stripping_removes_exactly_the_usage_event_at_every_split() {
    let base = fixture("openai-chat.stream.sse");
    let (_, want_usage, want_tokens) = run(Meter::OpenAiChat, false, &[&base]);
    for ending in ["\n", "\r\n", "\r"] {
        let sse = with_line_ending(&base, ending);
        let want = with_line_ending(&chat_without_usage_event(&base), ending);
        for k in 0..=sse.len() {
            let got = run(Meter::OpenAiChat, true, &[&sse[..k], &sse[k..]]);
            assert_eq!(got, (want.clone(), want_usage, want_tokens), "split at {k}, ending {ending:?}");
        }
        let bytes: Vec<&[u8]> = sse.chunks(1).collect();
        assert_eq!(run(Meter::OpenAiChat, true, &bytes).0, want, "byte by byte, ending {ending:?}");
    }
}

#[test]
fn stripping_sends_complete_events_at_once_and_zero_copy() {
    let sse = fixture("openai-chat.stream.sse");
    let mut m = StreamMeter::new(Meter::OpenAiChat, true);
    let first_end = sse.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
    // A frame of whole events goes out as the same buffer.
    let frame = Bytes::copy_from_slice(&sse[..first_end]);
    let out = m.feed(frame.clone());
    assert_eq!(out.as_ptr(), frame.as_ptr());
    assert_eq!(out.len(), frame.len());
    // A partial event is held back until its blank line arrives.
    assert!(m.feed(Bytes::copy_from_slice(&sse[first_end..first_end + 10])).is_empty());
    assert_eq!(m.held_len(), 10);
    // Without stripping the frame itself comes back.
    let mut m = StreamMeter::new(Meter::OpenAiChat, false);
    let frame = Bytes::copy_from_slice(&sse[..7]);
    assert_eq!(m.feed(frame.clone()).as_ptr(), frame.as_ptr());
}

#[test]
fn stripping_only_touches_openai_chat() {
    let sse = fixture("anthropic-messages.stream.sse");
    let (out, u, _) = run(Meter::AnthropicMessages, true, &[&sse]);
    assert_eq!(out, sse);
    assert!(u.is_some());
}

#[test]
fn cut_streams_have_no_usage_but_count_output() {
    for (name, meter) in STREAMS {
        let sse = fixture(name);
        let text = std::str::from_utf8(&sse).unwrap();
        // Up to (and including) the fifth event: past some deltas, before any usage.
        let cut: usize = text.split_inclusive("\n\n").take(5).map(str::len).sum();
        let (_, u, counted) = run(meter, false, &[&sse[..cut]]);
        assert_eq!(u, None, "{name}");
        assert!(counted > 0, "{name}");
    }
}

#[test]
fn unterminated_last_event_is_still_read() {
    let sse = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}";
    let (out, u, _) = run(Meter::OpenAiChat, false, &[sse]);
    assert_eq!(out, sse);
    assert_eq!(u, Some(usage(5, 0, 0, 2)));
    let (out, u, _) = run(Meter::OpenAiChat, true, &[sse]);
    assert!(out.is_empty());
    assert_eq!(u, Some(usage(5, 0, 0, 2)));
}

#[test]
fn comments_multi_line_data_and_odd_fields() {
    let sse = b": keep-alive\n\nid: 7\nretry: 100\ndata: {\"choices\":[{\"delta\":\ndata: {\"content\":\"hi\"}}],\ndata: \"usage\":null}\n\ndata:{\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
    let (out, u, counted) = run(Meter::OpenAiChat, true, &[sse]);
    assert_eq!(u, Some(usage(1, 0, 0, 1)));
    assert_eq!(counted, count_tokens("hi"));
    assert_eq!(
        out,
        b": keep-alive\n\nid: 7\nretry: 100\ndata: {\"choices\":[{\"delta\":\ndata: {\"content\":\"hi\"}}],\ndata: \"usage\":null}\n\ndata: [DONE]\n\n"
    );
}

#[test]
fn oversize_event_passes_through_unbuffered() {
    let big = vec![b'x'; MAX_EVENT + 100_000];
    let usage_event = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n\n";
    let mut sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"".to_vec();
    sse.extend_from_slice(&big);
    sse.extend_from_slice(b"\"}}]}\n\n");
    sse.extend_from_slice(usage_event);
    for strip in [false, true] {
        let frames: Vec<&[u8]> = sse.chunks(64 * 1024).collect();
        let (out, u, _) = run(Meter::OpenAiChat, strip, &frames);
        assert_eq!(u, Some(usage(4, 0, 0, 2)), "the stream is read again after the big event");
        let want = if strip { &sse[..sse.len() - usage_event.len()] } else { &sse[..] };
        assert_eq!(out.len(), want.len());
        assert!(out == want);
    }
}

#[test]
fn long_streams_count_in_batches() {
    let event = b"data: {\"choices\":[{\"delta\":{\"content\":\" hello\"}}],\"usage\":null}\n\n";
    let mut m = StreamMeter::new(Meter::OpenAiChat, false);
    for _ in 0..5_000 {
        m.feed(Bytes::from_static(event));
    }
    assert_eq!(m.output_tokens(), 5_000);
    assert_eq!(m.usage(), None);
}

#[test]
fn garbage_and_errors_never_panic() {
    for meter in Meter::ALL {
        for body in [&b"\xff\xfe"[..], b"{", b"null", b"{\"usage\":{\"prompt_tokens\":-1}}", b"{\"usage\":\"x\"}"] {
            let read = response_usage(meter, body);
            assert_eq!(read.usage, None);
            let _ = read_request(meter, body);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn stream_meter_survives_anything(
        pieces in proptest::collection::vec(
            prop_oneof![
                Just(b"data: ".to_vec()), Just(b"data:".to_vec()), Just(b"event: x".to_vec()),
                Just(b"\n".to_vec()), Just(b"\r".to_vec()), Just(b"\r\n".to_vec()), Just(b":".to_vec()),
                Just(b"[DONE]".to_vec()), Just(b"{\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}".to_vec()),
                Just(b"{\"type\":\"message_delta\",\"usage\":{\"output_tokens\":3}}".to_vec()),
                Just(b"{\"type\":\"response.output_text.delta\",\"delta\":\"x\"}".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..40),
            ],
            0..60,
        ),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
        meter in 0usize..4,
        strip in any::<bool>(),
    ) {
        let bytes = pieces.concat();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        let frames: Vec<&[u8]> = points.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
        let meter = Meter::ALL[meter];
        let (out, u, _) = run(meter, strip, &frames);
        // Removal only ever takes bytes out, and only when stripping a chat stream.
        if strip && meter == Meter::OpenAiChat {
            prop_assert!(out.len() <= bytes.len());
        } else {
            prop_assert_eq!(&out, &bytes);
        }
        // The same bytes in one frame read the same usage.
        let whole = run(meter, strip, &[&bytes]);
        prop_assert_eq!(whole.1, u);
        prop_assert_eq!(whole.0, out);
    }
}

#[test]
fn usage_at_the_end_of_an_oversize_responses_event_is_read() {
    // A `response.completed` repeating an answer too long to parse whole; a string
    // after the usage holds an escaped look-alike that must not be taken for it.
    let text = "word ".repeat(MAX_EVENT / 4);
    let completed = format!(
        "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"resp_1\",\"status\":\"completed\",\"output\":[{{\"type\":\"message\",\"content\":[{{\"type\":\"output_text\",\"text\":\"{text}\"}}]}}],\"usage\":{{\"input_tokens\":40,\"input_tokens_details\":{{\"cached_tokens\":8}},\"output_tokens\":262144,\"total_tokens\":262184}},\"metadata\":{{\"note\":\"\\\"usage\\\":{{\\\"input_tokens\\\":1,\\\"output_tokens\\\":1}}\"}}}},\"sequence_number\":9}}\n\n"
    );
    assert!(completed.len() > MAX_EVENT);
    for frame in [1000, 64 * 1024, completed.len()] {
        let frames: Vec<&[u8]> = completed.as_bytes().chunks(frame).collect();
        let (out, u, _) = run(Meter::OpenAiResponses, false, &frames);
        assert!(out == completed.as_bytes());
        assert_eq!(u, Some(usage(32, 8, 0, 262_144)), "frames of {frame}");
    }
}

#[test]
fn the_upstream_gets_the_json_that_was_priced() {
    let body = br#"{"model":"cheap","stream":true,"model":"gpt-4o","messages":[]}"#;
    let (ask, out) = read_for_upstream(Meter::OpenAiChat, body).unwrap();
    assert_eq!(ask.model, "gpt-4o");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["model"], "gpt-4o");
    assert_eq!(String::from_utf8_lossy(&out).matches("\"model\"").count(), 1);
    assert_eq!(v["stream_options"]["include_usage"], true);
    // Not a chat stream: priced and forwarded as read, nothing added.
    let (_, out) = read_for_upstream(Meter::AnthropicMessages, body).unwrap();
    assert!(!String::from_utf8_lossy(&out).contains("stream_options"));
    assert_eq!(read_for_upstream(Meter::OpenAiChat, b"[]").unwrap_err(), Unreadable::NotObject);
}
