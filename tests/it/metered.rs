//! Metered routes end to end: a fake LLM upstream that answers in each API's real
//! format (OpenAI Chat Completions, Responses, Embeddings, Anthropic Messages; streamed
//! and not), the gateway in front of it, and the ledger checked to the micro-dollar.
//! The scenarios that touch the ledger's concurrency run on SQLite and PostgreSQL.
//!
//! Prices (per 1M tokens) are chosen so that one token is a whole number of micros:
//! `gpt-test` input 1.00, cached 0.50, cache write 1.25, output 2.00; `claude-test`
//! input 3.00, cached 0.30, cache write 3.75, output 15.00.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::support::pg::Cluster;
use crate::support::*;
use tollgate::money::Micros;

/// The fake upstream's usage for a chat request: 100 prompt tokens of which 40 cached,
/// 20 completion tokens. At gpt-test prices: 60 + 20 + 40 = 120 micros, plus the chat
/// route's fixed 100.
const CHAT_CHARGE: u64 = 220;
/// Anthropic: input 50, cache read 10, cache write 5, output 15 (the last cumulative
/// `message_delta`; the first says 7): 150 + 3 + 18.75 + 225 = 396.75 → 397.
const MESSAGES_CHARGE: u64 = 397;
/// Responses: input 30 of which 10 cached, output 7: 20 + 5 + 14.
const RESPONSES_CHARGE: u64 = 39;
/// Embeddings: 8 tokens at 0.02 per 1M: 0.16 → 1 micro.
const EMBEDDINGS_CHARGE: u64 = 1;

const CHAT_WORDS: [&str; 4] = ["Hello", " there", ", friend", "!"];

/// What the fake upstream saw: request bodies, and streams cut short by tollgate.
#[derive(Clone, Default)]
struct Llm {
    bodies: Arc<Mutex<Vec<Value>>>,
    /// The bytes of each request body and its `Accept-Encoding`, as received.
    raw: Arc<Mutex<Vec<Received>>>,
    cancelled: Arc<AtomicUsize>,
    auth: Arc<Mutex<Vec<Option<String>>>>,
}

/// A request body's bytes and its `Accept-Encoding`.
type Received = (Bytes, Option<String>);

/// Sets a flag when a stream is dropped before its end (the upstream saw a cancel).
struct CancelGuard {
    done: bool,
    cancelled: Arc<AtomicUsize>,
}

impl CancelGuard {
    fn finish(&mut self) {
        self.done = true;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            self.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn sse(events: Vec<String>, delay: Duration, cut: bool, llm: &Llm) -> tollgate::Body {
    let guard = CancelGuard { done: false, cancelled: llm.cancelled.clone() };
    let stream =
        futures_util::stream::unfold((events.into_iter(), guard, 0usize), move |(mut it, mut g, i)| async move {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match it.next() {
                Some(e) => Some((Ok::<_, tollgate::BoxError>(Frame::data(Bytes::from(e))), (it, g, i + 1))),
                None if cut => {
                    g.finish();
                    Some((Err("upstream cut the stream".into()), (it, g, i + 1)))
                }
                None => {
                    g.finish();
                    None
                }
            }
        });
    BodyExt::boxed_unsync(StreamBody::new(stream))
}

fn data(v: Value) -> String {
    format!("data: {v}\n\n")
}

fn event(name: &str, v: Value) -> String {
    format!("event: {name}\ndata: {v}\n\n")
}

fn chat_usage(completion: u64) -> Value {
    json!({"prompt_tokens": 100, "completion_tokens": completion, "total_tokens": 100 + completion,
           "prompt_tokens_details": {"cached_tokens": 40, "audio_tokens": 0},
           "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}})
}

/// A chat stream exactly as OpenAI sends it; `usage` chunk only when asked for.
fn chat_events(include_usage: bool, with_usage: bool, completion: u64, repeat: usize) -> (Vec<String>, String) {
    let u = if include_usage { json!({"usage": null}) } else { json!({}) };
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gpt-test-2024", "system_fingerprint": "fp_1",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if let Some(m) = u.as_object() {
            c.as_object_mut().unwrap().extend(m.clone());
        }
        data(c)
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": "", "refusal": null}), Value::Null)];
    for _ in 0..repeat {
        for w in CHAT_WORDS {
            events.push(chunk(json!({"content": w}), Value::Null));
        }
    }
    events.push(chunk(json!({}), json!("stop")));
    let usage_event = data(json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "gpt-test-2024", "system_fingerprint": "fp_1", "choices": [], "usage": chat_usage(completion)}));
    if include_usage && with_usage {
        events.push(usage_event.clone());
    }
    events.push("data: [DONE]\n\n".to_owned());
    (events, usage_event)
}

fn anthropic_events() -> Vec<String> {
    vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
            "role": "assistant", "content": [], "model": "claude-test", "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 50, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 10, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}),
        ),
        event(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": null, "stop_sequence": null}, "usage": {"output_tokens": 7}}),
        ),
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there!"}}),
        ),
        event("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        event(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 15}}),
        ),
        event("message_stop", json!({"type": "message_stop"})),
    ]
}

fn responses_events() -> Vec<String> {
    let usage = json!({"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 37});
    let resp = |status: &str, usage: Value| {
        json!({"id": "resp_1", "object": "response", "created_at": 1_700_000_000,
        "status": status, "model": "gpt-test", "output": [], "usage": usage})
    };
    vec![
        event(
            "response.created",
            json!({"type": "response.created", "sequence_number": 0, "response": resp("in_progress", Value::Null)}),
        ),
        event(
            "response.output_text.delta",
            json!({"type": "response.output_text.delta", "sequence_number": 1,
            "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Hi"}),
        ),
        event(
            "response.completed",
            json!({"type": "response.completed", "sequence_number": 2, "response": resp("completed", usage)}),
        ),
    ]
}

fn json_response(status: u16, v: Value) -> Response<tollgate::Body> {
    let mut res = Response::new(tollgate::full(v.to_string()));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res.headers_mut().insert("content-type", "application/json".parse().unwrap());
    res
}

fn stream_response(body: tollgate::Body) -> Response<tollgate::Body> {
    let mut res = Response::new(body);
    res.headers_mut().insert("content-type", "text/event-stream; charset=utf-8".parse().unwrap());
    res
}

/// The fake LLM upstream. `x-fake` picks a misbehaviour: `cut` (the stream breaks off
/// before its usage), `nousage` (a stream or body with no usage), `slow` (40 rounds of
/// words, 25 ms apart), `overrun` (reports 5000 output tokens), `status:N` (answers N).
async fn llm_upstream() -> (Upstream, Llm) {
    let llm = Llm::default();
    let l = llm.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let llm = l.clone();
        async move {
            let path = req.uri().path().to_owned();
            let fake = req.headers().get("x-fake").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            llm.auth.lock().unwrap().push(
                req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned),
            );
            let encoding = req.headers().get("accept-encoding").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body = req.into_body().collect().await.unwrap().to_bytes();
            llm.raw.lock().unwrap().push((body.clone(), encoding));
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            llm.bodies.lock().unwrap().push(body.clone());
            if fake == "gzip" {
                let mut res = json_response(200, json!({"compressed": "as if"}));
                res.headers_mut().insert("content-encoding", "gzip".parse().unwrap());
                return res;
            }
            if let Some(code) = fake.strip_prefix("status:") {
                return json_response(code.parse().unwrap(), json!({"error": {"message": "nope", "type": "invalid_request_error"}}));
            }
            let stream = body["stream"] == true;
            let (delay, repeat) = match fake.as_str() {
                "slow" => (Duration::from_millis(25), 40),
                // Paced, so the head and the first events are on the wire before the break.
                "cut" => (Duration::from_millis(20), 1),
                _ => (Duration::ZERO, 1),
            };
            let completion = if fake == "overrun" { 5000 } else { 20 };
            match path.as_str() {
                "/v1/chat/completions" if stream => {
                    let include = body["stream_options"]["include_usage"] == true;
                    let (events, _) = chat_events(include, fake != "nousage", completion, repeat);
                    let events = if fake == "cut" { events[..3].to_vec() } else { events };
                    stream_response(sse(events, delay, fake == "cut", &llm))
                }
                "/v1/chat/completions" => {
                    let mut v = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000,
                        "model": "gpt-test-2024", "choices": [{"index": 0, "message": {"role": "assistant",
                        "content": CHAT_WORDS.concat(), "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
                        "usage": chat_usage(completion), "system_fingerprint": "fp_1"});
                    if fake == "nousage" {
                        v.as_object_mut().unwrap().remove("usage");
                    }
                    json_response(200, v)
                }
                "/v1/messages" if stream => stream_response(sse(anthropic_events(), delay, false, &llm)),
                "/v1/messages" => json_response(200, json!({"id": "msg_1", "type": "message", "role": "assistant",
                    "model": "claude-test", "content": [{"type": "text", "text": "Hello there!"}],
                    "stop_reason": "end_turn", "stop_sequence": null,
                    "usage": {"input_tokens": 50, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 10, "output_tokens": 15}})),
                "/v1/responses" if stream => stream_response(sse(responses_events(), delay, false, &llm)),
                "/v1/embeddings" => json_response(200, json!({"object": "list", "data": [{"object": "embedding",
                    "index": 0, "embedding": [0.1, 0.2]}], "model": "text-embedding-test",
                    "usage": {"prompt_tokens": 8, "total_tokens": 8}})),
                _ => json_response(404, json!({"error": "no such path"})),
            }
        }
    })
    .await;
    (up, llm)
}

fn routes(up: &Upstream, chat_extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"llm\"\nurl = \"{}\"\ntimeout = \"10s\"\nheaders = {{ Authorization = \"Bearer sk-upstream-secret\" }}\n\n\
[[route]]\nname = \"chat\"\nupstream = \"llm\"\npath = \"/v1/chat/completions\"\nmethods = [\"POST\"]\naccept = [\"credits\"]\n\
meter = \"openai-chat\"\nprice = \"0.0001\"\n{chat_extra}\n\n\
[[route]]\nname = \"messages\"\nupstream = \"llm\"\npath = \"/v1/messages\"\nmethods = [\"POST\"]\naccept = [\"credits\"]\nmeter = \"anthropic-messages\"\n\n\
[[route]]\nname = \"responses\"\nupstream = \"llm\"\npath = \"/v1/responses\"\nmethods = [\"POST\"]\naccept = [\"credits\"]\nmeter = \"openai-responses\"\n\n\
[[route]]\nname = \"embeddings\"\nupstream = \"llm\"\npath = \"/v1/embeddings\"\nmethods = [\"POST\"]\naccept = [\"credits\"]\nmeter = \"openai-embeddings\"\n\n\
[[model]]\nname = \"gpt-test*\"\ninput = \"1.00\"\ncached_input = \"0.50\"\ncache_write_input = \"1.25\"\noutput = \"2.00\"\nmax_output_tokens = 1000\n\n\
[[model]]\nname = \"claude-test\"\ninput = \"3.00\"\ncached_input = \"0.30\"\ncache_write_input = \"3.75\"\noutput = \"15.00\"\nmax_output_tokens = 1000\n\n\
[[model]]\nname = \"text-embedding-test\"\ninput = \"0.02\"\noutput = \"0\"\n",
        up.url()
    )
}

/// Which ledger a scenario runs on.
enum On {
    Sqlite,
    Postgres(Cluster),
}

async fn gateway_on(on: &On, rest: &str) -> Gateway {
    match on {
        On::Sqlite => gateway(rest).await,
        On::Postgres(cluster) => {
            let url = cluster.create_db().await;
            let dir = tempfile::tempdir().unwrap();
            let text = base_config().replace(
                "[ledger]\npath = \"{db}\"",
                &format!("[ledger]\nbackend = \"postgres\"\nurl = \"{url}\"\nstatement_timeout = \"5s\""),
            ) + rest;
            start_text(dir, &text, tollgate::app::default_rails()).await
        }
    }
}

/// A response read whole, with its trailers.
struct Streamed {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

async fn post(url: &str, key: &str, headers: &[(&str, &str)], body: Value) -> Streamed {
    let mut req = Request::builder().method("POST").uri(url).header("authorization", format!("Bearer {key}"));
    req = req.header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let fut = async {
        let res = client().request(req).await.expect("request reached the gateway");
        let (parts, body) = res.into_parts();
        let collected = body.collect().await.expect("body read");
        let trailers = collected.trailers().cloned();
        Streamed { status: parts.status, headers: parts.headers, body: collected.to_bytes(), trailers }
    };
    tokio::time::timeout(Duration::from_secs(20), fut).await.expect("response within 20 s")
}

fn chat_body(stream: bool, include_usage: Option<bool>) -> Value {
    let mut b = json!({"model": "gpt-test-2024", "max_tokens": 500, "stream": stream,
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]});
    if let Some(i) = include_usage {
        b["stream_options"] = json!({"include_usage": i});
    }
    b
}

fn header_micros(v: Option<&http::HeaderValue>) -> u64 {
    let s = v.expect("money header").to_str().unwrap();
    let amount = s.strip_suffix(" USD").unwrap_or_else(|| panic!("{s:?} is not an amount in USD"));
    Micros::parse(amount).unwrap().get()
}

/// The key's one debit for the request with `request_id`, as the admin API shows it.
async fn debit(gw: &Gateway, key_id: &str, request_id: &str) -> Value {
    for _ in 0..200 {
        let r = admin(gw, "GET", &format!("/admin/transactions?key={key_id}&limit=100"), "").await;
        let rows = r.json()["transactions"].as_array().unwrap().clone();
        let row = rows.into_iter().find(|t| t["request_id"] == request_id && t["kind"] == "debit");
        if let Some(row) = row.filter(|r| r["status"] != "pending") {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no closed debit for {request_id}");
}

fn micros(v: &Value) -> u64 {
    Micros::parse(v.as_str().unwrap()).unwrap().get()
}

// === scenarios ===

/// A streamed chat whose client did not ask for usage: the upstream is asked for it,
/// the client's stream is the upstream's minus the usage-only chunk, byte for byte, and
/// the charge is exact (trailers, ledger row, balance).
async fn chat_stream_strips_the_usage_chunk_and_charges_exactly(on: On) {
    let (up, llm) = llm_upstream().await;
    let gw = gateway_on(&on, &routes(&up, "")).await;
    let (id, key) = gw.key("1.00").await;
    let r = post(&gw.url("/v1/chat/completions"), &key, &[("te", "trailers")], chat_body(true, None)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        llm.bodies.lock().unwrap()[0]["stream_options"]["include_usage"],
        true,
        "the upstream is asked for usage"
    );
    assert_eq!(
        llm.auth.lock().unwrap()[0].as_deref(),
        Some("Bearer sk-upstream-secret"),
        "the upstream gets its own key, never the caller's"
    );
    let (events, usage_event) = chat_events(true, true, 20, 1);
    let expected: String = events.iter().filter(|e| **e != usage_event).cloned().collect();
    assert_eq!(String::from_utf8_lossy(&r.body), expected, "only the usage-only chunk is removed");
    let hold = header_micros(r.headers.get("x-tollgate-hold"));
    assert!(hold > CHAT_CHARGE, "hold {hold}");
    let trailers = r.trailers.expect("trailers for a client that sent TE: trailers");
    assert_eq!(header_micros(trailers.get("x-tollgate-charged")), CHAT_CHARGE);
    assert_eq!(header_micros(trailers.get("x-tollgate-balance")), 1_000_000 - CHAT_CHARGE);
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let row = debit(&gw, &id, &rid).await;
    assert_eq!(micros(&row["amount"]), CHAT_CHARGE, "{row}");
    assert_eq!(micros(&row["held"]), hold, "{row}");
    assert_eq!(row["status"], "captured");
    assert_eq!(row["model"], "gpt-test*");
    assert_eq!(row["usage_source"], "reported");
    assert_eq!(
        row["usage"],
        json!({"input_tokens": 60, "cached_input_tokens": 40, "cache_write_input_tokens": 0, "output_tokens": 20})
    );
    assert_eq!(gw.balance(&id).await, Micros(1_000_000 - CHAT_CHARGE));
    gw.shutdown().await;
}

#[tokio::test]
async fn sqlite_chat_stream_strips_the_usage_chunk_and_charges_exactly() {
    chat_stream_strips_the_usage_chunk_and_charges_exactly(On::Sqlite).await;
}

#[tokio::test]
async fn postgres_chat_stream_strips_the_usage_chunk_and_charges_exactly() {
    chat_stream_strips_the_usage_chunk_and_charges_exactly(On::Postgres(Cluster::spawn().await)).await;
}

#[tokio::test]
async fn a_client_that_asked_for_usage_gets_the_stream_untouched() {
    let (up, _llm) = llm_upstream().await;
    let gw = gateway(&routes(&up, "")).await;
    let (id, key) = gw.key("1.00").await;
    let r = post(&gw.url("/v1/chat/completions"), &key, &[], chat_body(true, Some(true))).await;
    let (events, _) = chat_events(true, true, 20, 1);
    assert_eq!(String::from_utf8_lossy(&r.body), events.concat());
    assert!(r.trailers.is_none(), "no trailers without TE: trailers");
    assert!(r.headers.get("x-tollgate-hold").is_some());
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(micros(&debit(&gw, &id, &rid).await["amount"]), CHAT_CHARGE);
    gw.shutdown().await;
}

/// Non-streamed answers are charged before the head, which carries the receipt.
async fn non_streamed_answers_carry_the_exact_receipt(on: On) {
    let (up, _llm) = llm_upstream().await;
    let gw = gateway_on(&on, &routes(&up, "")).await;
    let (id, key) = gw.key("1.00").await;
    let mut spent = 0;
    let cases = [
        ("/v1/chat/completions", chat_body(false, None), CHAT_CHARGE),
        (
            "/v1/messages",
            json!({"model": "claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}),
            MESSAGES_CHARGE,
        ),
        (
            "/v1/embeddings",
            json!({"model": "text-embedding-test", "input": "eight tokens of text here"}),
            EMBEDDINGS_CHARGE,
        ),
    ];
    for (path, body, charge) in cases {
        let r = post(&gw.url(path), &key, &[], body).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", String::from_utf8_lossy(&r.body));
        spent += charge;
        assert_eq!(header_micros(r.headers.get("x-tollgate-charged")), charge, "{path}");
        assert_eq!(header_micros(r.headers.get("x-tollgate-balance")), 1_000_000 - spent, "{path}");
        assert!(r.headers.get("x-tollgate-hold").is_none());
        let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
        let row = debit(&gw, &id, &rid).await;
        assert_eq!(micros(&row["amount"]), charge, "{path}: {row}");
        assert_eq!(row["usage_source"], "reported");
    }
    assert_eq!(gw.balance(&id).await, Micros(1_000_000 - spent));
    gw.shutdown().await;
}

#[tokio::test]
async fn sqlite_non_streamed_answers_carry_the_exact_receipt() {
    non_streamed_answers_carry_the_exact_receipt(On::Sqlite).await;
}

#[tokio::test]
async fn postgres_non_streamed_answers_carry_the_exact_receipt() {
    non_streamed_answers_carry_the_exact_receipt(On::Postgres(Cluster::spawn().await)).await;
}

#[tokio::test]
async fn anthropic_and_responses_streams_charge_the_last_cumulative_usage() {
    let (up, _llm) = llm_upstream().await;
    let gw = gateway(&routes(&up, "")).await;
    let (id, key) = gw.key("1.00").await;
    let body = json!({"model": "claude-test", "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "Hi"}]});
    let r = post(&gw.url("/v1/messages"), &key, &[("te", "trailers")], body).await;
    assert_eq!(String::from_utf8_lossy(&r.body), anthropic_events().concat(), "the stream passes untouched");
    assert_eq!(header_micros(r.trailers.unwrap().get("x-tollgate-charged")), MESSAGES_CHARGE);
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let row = debit(&gw, &id, &rid).await;
    assert_eq!(
        row["usage"],
        json!({"input_tokens": 50, "cached_input_tokens": 10, "cache_write_input_tokens": 5, "output_tokens": 15}),
        "the last message_delta's output (15), not the sum (22)"
    );

    let body = json!({"model": "gpt-test", "max_output_tokens": 100, "stream": true, "input": "Hi"});
    let r = post(&gw.url("/v1/responses"), &key, &[("te", "trailers")], body).await;
    assert_eq!(header_micros(r.trailers.unwrap().get("x-tollgate-charged")), RESPONSES_CHARGE);
    assert_eq!(gw.balance(&id).await, Micros(1_000_000 - MESSAGES_CHARGE - RESPONSES_CHARGE));
    gw.shutdown().await;
}

#[tokio::test]
async fn streams_without_usage_are_charged_an_estimate_within_the_hold() {
    let (up, _llm) = llm_upstream().await;
    let gw = gateway(&routes(&up, "")).await;
    let (id, key) = gw.key("1.00").await;
    for fake in ["nousage", "cut"] {
        let req = Request::builder()
            .method("POST")
            .uri(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .header("x-fake", fake)
            .body(Full::new(Bytes::from(chat_body(true, None).to_string())))
            .unwrap();
        let (rid, hold) = tokio::time::timeout(Duration::from_secs(10), async {
            let res = client().request(req).await.unwrap();
            let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
            assert_eq!(res.status(), StatusCode::OK, "{fake}: {:?}", res.headers());
            let hold = header_micros(res.headers().get("x-tollgate-hold"));
            let body = res.into_body().collect().await;
            // A cut stream reaches the client as an error, not as a clean end.
            assert_eq!(body.is_err(), fake == "cut", "{fake}");
            (rid, hold)
        })
        .await
        .unwrap();
        let row = debit(&gw, &id, &rid).await;
        assert_eq!(row["usage_source"], "estimated", "{fake}: {row}");
        let amount = micros(&row["amount"]);
        // The fixed 100, the input estimate and a few output tokens: far below the hold.
        assert!(amount > 100 && amount < hold, "{fake}: {amount} of hold {hold}");
        assert!(row["usage"]["output_tokens"].as_u64().unwrap() > 0, "{fake}: delivered output is counted");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn upstream_errors_without_usage_charge_only_the_fixed_part_and_5xx_nothing() {
    let (up, _llm) = llm_upstream().await;
    let gw = gateway(&routes(&up, "")).await;
    let (id, key) = gw.key("1.00").await;
    let r = post(&gw.url("/v1/chat/completions"), &key, &[("x-fake", "status:400")], chat_body(false, None)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(header_micros(r.headers.get("x-tollgate-charged")), 100, "only the route's fixed price");
    let r = post(&gw.url("/v1/chat/completions"), &key, &[("x-fake", "status:500")], chat_body(false, None)).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(r.headers.get("x-tollgate-charged").is_none());
    assert_eq!(gw.balance(&id).await, Micros(1_000_000 - 100));
    gw.shutdown().await;
}

#[tokio::test]
async fn an_overrun_is_charged_the_hold_and_counted() {
    let (up, _llm) = llm_upstream().await;
    let gw = gateway(&routes(&up, "")).await;
    let (id, key) = gw.key("1.00").await;
    let mut body = chat_body(true, None);
    body["max_tokens"] = json!(10);
    let r = post(&gw.url("/v1/chat/completions"), &key, &[("x-fake", "overrun"), ("te", "trailers")], body).await;
    let hold = header_micros(r.headers.get("x-tollgate-hold"));
    assert_eq!(header_micros(r.trailers.unwrap().get("x-tollgate-charged")), hold);
    assert_eq!(gw.balance(&id).await, Micros(1_000_000 - hold));
    let m = get(&gw.admin_url("/metrics"), &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))]).await.text();
    assert!(m.contains("tollgate_metered_overrun_total{route=\"chat\"} 1"), "{m}");
    assert!(m.contains("tollgate_tokens_total{route=\"chat\",model=\"gpt-test*\",kind=\"output\"} 5000"), "{m}");
    gw.shutdown().await;
}

/// Sends a slow streamed chat, reads its head and first frame, and hangs up.
async fn leave_after_first_frame(gw: &Gateway, key: &str) -> String {
    let req = Request::builder()
        .method("POST")
        .uri(gw.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("x-fake", "slow")
        .body(Full::new(Bytes::from(chat_body(true, None).to_string())))
        .unwrap();
    let res = client().request(req).await.unwrap();
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    rid
}

async fn client_leaving_mid_stream(on: On) {
    let (up, llm) = llm_upstream().await;
    for (setting, reported) in [("finish", true), ("stop", false)] {
        let gw = gateway_on(&on, &routes(&up, &format!("on_disconnect = \"{setting}\""))).await;
        let (id, key) = gw.key("1.00").await;
        let cancelled_before = llm.cancelled.load(Ordering::SeqCst);
        let rid = leave_after_first_frame(&gw, &key).await;
        let row = debit(&gw, &id, &rid).await;
        if reported {
            // Read on to the end: the whole generation, as reported.
            assert_eq!(micros(&row["amount"]), CHAT_CHARGE, "{setting}: {row}");
            assert_eq!(row["usage_source"], "reported");
            assert_eq!(llm.cancelled.load(Ordering::SeqCst), cancelled_before, "finish never cancels the upstream");
        } else {
            assert_eq!(row["usage_source"], "estimated", "{setting}: {row}");
            let out = row["usage"]["output_tokens"].as_u64().unwrap();
            assert!(out < 40, "stop charges only what was delivered: {out} output tokens");
            for _ in 0..100 {
                if llm.cancelled.load(Ordering::SeqCst) > cancelled_before {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(llm.cancelled.load(Ordering::SeqCst) > cancelled_before, "stop cancels the upstream request");
        }
        let balance = gw.balance(&id).await.get();
        assert_eq!(balance, 1_000_000 - micros(&row["amount"]), "{setting}: the hold's rest is back");
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn sqlite_client_leaving_mid_stream() {
    client_leaving_mid_stream(On::Sqlite).await;
}

#[tokio::test]
async fn postgres_client_leaving_mid_stream() {
    client_leaving_mid_stream(On::Postgres(Cluster::spawn().await)).await;
}

#[tokio::test]
async fn requests_that_cannot_be_priced_are_refused_before_anything_is_held() {
    let (up, _llm) = llm_upstream().await;
    let gw = gateway(&routes(&up, "max_request_bytes = 2048")).await;
    let (id, key) = gw.key("1.00").await;
    let url = gw.url("/v1/chat/completions");
    let cases: [(Bytes, u16, &str); 5] = [
        (Bytes::from(json!({"model": "llama-3", "messages": []}).to_string()), 400, "model_not_priced"),
        (Bytes::from_static(b"not json"), 400, "request_unreadable"),
        (Bytes::from(json!({"messages": []}).to_string()), 400, "request_unreadable"),
        (
            Bytes::from(json!({"model": "gpt-test", "max_tokens": -1, "messages": []}).to_string()),
            400,
            "request_unreadable",
        ),
        (Bytes::from(vec![b' '; 4096]), 413, "request_too_large"),
    ];
    for (body, status, reason) in cases {
        let auth = format!("Bearer {key}");
        let r = send("POST", &url, &[("authorization", &auth), ("content-type", "application/json")], body).await;
        assert_eq!(r.status.as_u16(), status, "{}", r.text());
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        assert_eq!(r.json()["reason"], reason);
        assert_eq!(r.json()["type"], format!("https://api.test/.well-known/tollgate/problems/{reason}"));
    }
    assert_eq!(up.hits(), 0, "nothing is forwarded");
    assert_eq!(gw.balance(&id).await, Micros(1_000_000), "nothing is held");
    // The problem pages exist.
    for reason in ["model_not_priced", "request_unreadable", "request_too_large"] {
        let r = get(&gw.url(&format!("/.well-known/tollgate/problems/{reason}")), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{reason}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn a_balance_below_the_hold_is_refused_with_what_to_lower() {
    let (up, _llm) = llm_upstream().await;
    let gw = gateway(&routes(&up, "")).await;
    let (_, key) = gw.key("0.0005").await;
    let mut body = chat_body(false, None);
    body["max_tokens"] = json!(4096);
    let auth = format!("Bearer {key}");
    let r = send("POST", &gw.url("/v1/chat/completions"), &[("authorization", &auth)], body.to_string()).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
    let j = r.json();
    assert_eq!(j["reason"], "insufficient_funds");
    let detail = j["detail"].as_str().unwrap();
    assert!(detail.contains("max_tokens 1000 of gpt-test-2024"), "the model caps max_tokens at 1000: {detail}");
    assert!(detail.contains("balance 0.0005 USD") && detail.contains("lower max_tokens or top up"), "{detail}");
    // price.amount is the hold: 100 fixed + 1000 output × 2 + the input estimate × 1.25.
    let hold = Micros::parse(j["price"]["amount"].as_str().unwrap()).unwrap().get();
    assert!(hold > 2_100 && hold < 2_300, "hold {hold}");
    assert_eq!(up.hits(), 0);
    gw.shutdown().await;
}

/// Thirty streams at once on a key funded for exactly three holds: at most three run,
/// no balance goes below zero, and the debits account for every micro.
async fn concurrent_streams_on_a_key_funded_for_three(on: On) {
    let (up, _llm) = llm_upstream().await;
    let gw = gateway_on(&on, &routes(&up, "")).await;
    // Learn the hold from one request on another key.
    let (_, probe) = gw.key("1.00").await;
    let r = post(&gw.url("/v1/chat/completions"), &probe, &[], chat_body(true, None)).await;
    let hold = header_micros(r.headers.get("x-tollgate-hold"));
    let (id, key) = gw.key(&Micros(3 * hold).to_string()).await;
    let served = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let (url, key, served, refused) =
            (gw.url("/v1/chat/completions"), key.clone(), served.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let r = post(&url, &key, &[("x-fake", "slow")], chat_body(true, None)).await;
            match r.status {
                StatusCode::OK => served.fetch_add(1, Ordering::SeqCst),
                StatusCode::PAYMENT_REQUIRED => refused.fetch_add(1, Ordering::SeqCst),
                s => panic!("unexpected {s}"),
            };
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let served = served.load(Ordering::SeqCst);
    assert_eq!(served + refused.load(Ordering::SeqCst), 30);
    assert!((3..30).contains(&served), "{served} streams served");
    let page = admin(&gw, "GET", &format!("/admin/transactions?key={id}&limit=1000"), "").await.json();
    let rows = page["transactions"].as_array().unwrap();
    let sum = |kind: &str| rows.iter().filter(|t| t["kind"] == kind).map(|t| micros(&t["amount"])).sum::<u64>();
    let debits = rows.iter().filter(|t| t["kind"] == "debit" && t["status"] == "captured").count();
    assert_eq!(debits, served, "one captured debit per served stream");
    let balance = gw.balance(&id).await.get();
    assert_eq!(sum("credit") - sum("debit") + sum("refund"), balance, "Σ transactions = balance");
    assert_eq!(balance, 3 * hold - served as u64 * CHAT_CHARGE, "each stream charged exactly its usage");
    gw.shutdown().await;
}

#[tokio::test]
async fn sqlite_concurrent_streams_on_a_key_funded_for_three() {
    concurrent_streams_on_a_key_funded_for_three(On::Sqlite).await;
}

#[tokio::test]
async fn postgres_concurrent_streams_on_a_key_funded_for_three() {
    concurrent_streams_on_a_key_funded_for_three(On::Postgres(Cluster::spawn().await)).await;
}

#[tokio::test]
async fn metered_routes_refuse_x402_and_unknown_meters_at_load() {
    let (up, _llm) = llm_upstream().await;
    let text = format!("{}{}", base_config(), routes(&up, "")).replace(
        "accept = [\"credits\"]\nmeter = \"openai-chat\"",
        "accept = [\"credits\", \"x402\"]\nmeter = \"openai-chat\"",
    );
    let err = tollgate::config::Config::parse(&text, |_| None).unwrap_err().to_string();
    assert!(err.contains("route[0].accept[1]") && err.contains("cannot pay a metered route"), "{err}");
    let text = format!("{}{}", base_config(), routes(&up, "")).replace("meter = \"openai-chat\"", "meter = \"openai\"");
    let err = tollgate::config::Config::parse(&text, |_| None).unwrap_err().to_string();
    assert!(err.contains("route[0].meter") && err.contains("unknown meter"), "{err}");
}

#[tokio::test]
async fn a_long_prompt_is_counted_off_the_request_thread_and_held_for() {
    let (up, _llm) = llm_upstream().await;
    let gw = gateway(&routes(&up, "")).await;
    let (id, key) = gw.key("1.00").await;
    // About 200 KB of prose: well over what is tokenized inline.
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(4_500);
    let body = json!({"model": "gpt-test", "max_tokens": 10, "messages": [{"role": "user", "content": prompt}]});
    let r = post(&gw.url("/v1/chat/completions"), &key, &[], body).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(header_micros(r.headers.get("x-tollgate-charged")), CHAT_CHARGE);
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let held = micros(&debit(&gw, &id, &rid).await["held"]);
    // 10 tokens per sentence × 4,500 at 1.25 per token (the highest input price), plus
    // the output and fixed parts: the hold covers the prompt without a large margin.
    assert!((56_000..80_000).contains(&held), "held {held}");
    gw.shutdown().await;
}

#[tokio::test]
async fn the_upstream_gets_the_json_that_was_priced_and_is_asked_not_to_compress() {
    let (up, llm) = llm_upstream().await;
    let gw = gateway(&routes(&up, "")).await;
    let (id, key) = gw.key("1.00").await;
    // The model named twice: read as the last one (priced), and forwarded only so.
    let body = r#"{"model": "claude-test", "max_tokens": 50, "model": "gpt-test", "messages": [{"role": "user", "content": "Hi"}]}"#;
    let auth = format!("Bearer {key}");
    let r = send(
        "POST",
        &gw.url("/v1/chat/completions"),
        &[("authorization", &auth), ("accept-encoding", "gzip, br")],
        body,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let (raw, encoding) = llm.raw.lock().unwrap()[0].clone();
    let raw = String::from_utf8(raw.to_vec()).unwrap();
    assert_eq!(raw.matches("\"model\"").count(), 1, "one model reaches the upstream: {raw}");
    assert!(raw.contains("\"model\":\"gpt-test\""), "{raw}");
    assert_eq!(encoding.as_deref(), Some("identity"), "the answer must be readable for its usage");

    // An upstream that compresses anyway cannot be read: the hold is charged.
    let r = post(&gw.url("/v1/chat/completions"), &key, &[("x-fake", "gzip")], chat_body(false, None)).await;
    let rid = r.headers["x-request-id"].to_str().unwrap().to_owned();
    let row = debit(&gw, &id, &rid).await;
    assert_eq!(micros(&row["amount"]), micros(&row["held"]), "{row}");
    assert_eq!(row["usage_source"], "estimated");
    assert_eq!(header_micros(r.headers.get("x-tollgate-charged")), micros(&row["held"]));
    gw.shutdown().await;
}

#[tokio::test]
async fn an_answer_over_max_response_bytes_is_not_delivered_and_not_charged() {
    let (up, _llm) = llm_upstream().await;
    let gw = gateway(&routes(&up, "max_response_bytes = 64")).await;
    let (id, key) = gw.key("1.00").await;
    let r = post(&gw.url("/v1/chat/completions"), &key, &[], chat_body(false, None)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers.get("content-type").unwrap(), "application/problem+json");
    let detail = serde_json::from_slice::<Value>(&r.body).unwrap()["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("nothing was charged") && detail.contains("request_id"), "{detail}");
    assert!(r.headers.get("x-tollgate-charged").is_none());
    assert_eq!(gw.balance(&id).await, Micros(1_000_000), "the hold is given back");
    // Streams are never read whole: the same route still streams.
    let r = post(&gw.url("/v1/chat/completions"), &key, &[], chat_body(true, None)).await;
    assert_eq!(r.status, StatusCode::OK);
    gw.shutdown().await;
}
