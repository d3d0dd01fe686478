//! Micro-benchmarks of metering: a 1,000-event stream through `StreamMeter` (OpenAI Chat
//! with and without removing the usage chunk, Anthropic Messages), and reading a typical
//! chat request. Per-event time is the per-stream time / 1,000.
//!
//! `cargo bench --bench meter`

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use tollgate::meter::{count_tokens, read_request, Meter, StreamMeter};

const EVENTS: usize = 1_000;
const WORDS: [&str; 8] = [" the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog."];

/// One frame per event, as upstreams usually flush them.
fn chat_stream() -> Vec<Bytes> {
    let head = r#""id":"chatcmpl-AbCdEf0123456789","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_06737a9306""#;
    let mut frames = Vec::with_capacity(EVENTS + 1);
    for i in 0..EVENTS - 2 {
        let word = WORDS[i % WORDS.len()];
        frames.push(Bytes::from(format!(
            "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        )));
    }
    frames.push(Bytes::from(format!(
        "data: {{{head},\"choices\":[],\"usage\":{{\"prompt_tokens\":19,\"completion_tokens\":998,\"total_tokens\":1017,\"prompt_tokens_details\":{{\"cached_tokens\":0,\"audio_tokens\":0}},\"completion_tokens_details\":{{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}}}}\n\n"
    )));
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    frames
}

fn anthropic_stream() -> Vec<Bytes> {
    let mut frames = Vec::with_capacity(EVENTS);
    frames.push(Bytes::from_static(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-sonnet-4-5-20250929\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n"));
    frames.push(Bytes::from_static(b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n"));
    for i in 0..EVENTS - 5 {
        let word = WORDS[i % WORDS.len()];
        frames.push(Bytes::from(format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{word}\"}}}}\n\n"
        )));
    }
    frames.push(Bytes::from_static(
        b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    ));
    frames.push(Bytes::from_static(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":995}}\n\n"));
    frames.push(Bytes::from_static(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    frames
}

fn run(meter: Meter, strip: bool, frames: &[Bytes]) -> u64 {
    let mut m = StreamMeter::new(meter, strip);
    let mut sent = 0;
    for f in frames {
        sent += m.feed(f.clone()).len();
    }
    sent += m.finish().len();
    black_box(sent);
    black_box(m.usage());
    m.output_tokens()
}

fn streams(c: &mut Criterion) {
    // The tokenizer's tables are built on first use; keep that out of the timings.
    count_tokens("warm up");
    let chat = chat_stream();
    let anthropic = anthropic_stream();
    let mut g = c.benchmark_group("stream_1000_events");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("openai_chat", |b| b.iter(|| run(Meter::OpenAiChat, false, &chat)));
    g.bench_function("openai_chat_strip_usage", |b| b.iter(|| run(Meter::OpenAiChat, true, &chat)));
    g.bench_function("anthropic_messages", |b| b.iter(|| run(Meter::AnthropicMessages, false, &anthropic)));
    g.finish();
}

fn request(c: &mut Criterion) {
    count_tokens("warm up");
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer concisely and cite the documentation where you can."},
            {"role": "user", "content": "How do I configure a reverse proxy to forward the Authorization header only to one upstream? Show a short example."},
        ],
        "max_completion_tokens": 1024,
        "temperature": 0.2,
        "stream": true,
    })
    .to_string();
    c.bench_function("read_request_chat", |b| b.iter(|| read_request(Meter::OpenAiChat, black_box(body.as_bytes()))));
}

criterion_group!(benches, streams, request);
criterion_main!(benches);
