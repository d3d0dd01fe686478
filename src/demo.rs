//! `tollgate demo`: a sample upstream behind the gateway, a temporary ledger and two
//! funded keys, with copy-paste curl lines: a fixed-price quote (402, 200, 402) and an
//! OpenAI-style chat completion priced per token, streamed and not.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::config::Config;
use crate::meter::count_tokens;
use crate::money::Micros;
use crate::{Body, BoxError};

/// The demo's price per request; the quote key is funded for exactly one request.
const DEMO_PRICE: &str = "0.002";
/// The chat key's funds: enough for dozens of demo chat requests (each holds about
/// 0.0007 USD and is charged a few hundredths of that).
const CHAT_FUNDS: &str = "0.05";
/// The sample model's name and its prices per 1M tokens.
const CHAT_MODEL: &str = "demo-mini";
const CHAT_INPUT: &str = "0.15";
const CHAT_OUTPUT: &str = "0.60";
const CHAT_MAX_OUTPUT: u64 = 1024;
/// The pause between two streamed chunks, so a terminal shows the answer arrive.
const CHUNK_GAP: Duration = Duration::from_millis(40);

/// Starts a tiny JSON API on `127.0.0.1:0`; returns its address. It answers
/// `GET /v1/quote`, `/docs/*`, and an OpenAI-style `POST /v1/chat/completions`.
pub(crate) async fn sample_upstream() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move { Ok::<_, Infallible>(sample(req).await) });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn sample(req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() == "/v1/chat/completions" {
        if req.method() != Method::POST {
            return chat_error(StatusCode::METHOD_NOT_ALLOWED, "Use POST for /v1/chat/completions.");
        }
        return match Limited::new(req.into_body(), 1 << 20).collect().await {
            Ok(body) => chat::answer(&body.to_bytes()),
            Err(_) => chat_error(StatusCode::PAYLOAD_TOO_LARGE, "The request body is over 1 MiB."),
        };
    }
    sample_response(&req)
}

fn sample_response(req: &Request<Incoming>) -> Response<Body> {
    let payer = req.headers().get("x-tollgate-payer").and_then(|v| v.to_str().ok()).unwrap_or("");
    let body = if req.uri().path().starts_with("/docs") {
        json!({"docs": "GET /v1/quote returns a quote; it costs 0.002 USD per request. \
POST /v1/chat/completions is an OpenAI-style chat model (demo-mini) priced per token."})
    } else {
        json!({"symbol": "TOLL", "price": "42.00", "path": req.uri().path(), "paid_by": payer})
    };
    json_response(StatusCode::OK, &body)
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut res = Response::new(crate::full(body.to_string()));
    res.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    *res.status_mut() = status;
    res
}

/// An error in OpenAI's shape.
fn chat_error(status: StatusCode, message: &str) -> Response<Body> {
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}});
    json_response(status, &body)
}

/// The sample chat model: a deterministic answer in OpenAI's Chat Completions format,
/// whole or as a `chat.completion.chunk` event stream, with a `usage` that is true to
/// what it read and wrote (counted with the gateway's own tokenizer).
mod chat {
    use super::*;

    /// What a chat request asks for.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) struct Asked {
        pub(super) model: String,
        pub(super) prompt_tokens: u64,
        /// The last user message, quoted in the answer.
        pub(super) last_user: String,
        pub(super) max_tokens: Option<u64>,
        pub(super) stream: bool,
        pub(super) include_usage: bool,
    }

    /// The text of a message's `content`: a string, or the `text` of its parts.
    fn content_text(content: &Value) -> String {
        match content {
            Value::String(s) => s.clone(),
            Value::Array(parts) => {
                parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
            }
            _ => String::new(),
        }
    }

    pub(super) fn read(body: &[u8]) -> Result<Asked, String> {
        let v: Value = serde_json::from_slice(body).map_err(|e| format!("The body is not JSON: {e}"))?;
        let model = v.get("model").and_then(Value::as_str).ok_or("The body has no \"model\".")?.to_owned();
        let messages = v.get("messages").and_then(Value::as_array).ok_or("The body has no \"messages\" array.")?;
        // Each message's text, plus 3 tokens of framing per message and 3 priming the reply.
        let mut prompt_tokens = 3;
        let mut last_user = String::new();
        for m in messages {
            let text = content_text(m.get("content").unwrap_or(&Value::Null));
            prompt_tokens += count_tokens(&text) + 3;
            if m.get("role").and_then(Value::as_str) == Some("user") {
                last_user = text;
            }
        }
        let max_tokens = ["max_completion_tokens", "max_tokens"].iter().find_map(|k| v.get(*k).and_then(Value::as_u64));
        let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let include_usage = v.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
        Ok(Asked { model, prompt_tokens, last_user, max_tokens, stream, include_usage })
    }

    /// The answer's pieces, word by word (`"Hello"`, `" from"`, …), cut to the output
    /// maximum; and whether it was cut (`finish_reason` `"length"`).
    pub(super) fn reply(asked: &Asked) -> (Vec<String>, bool) {
        let mut quoted: String = asked.last_user.split_whitespace().collect::<Vec<_>>().join(" ");
        if quoted.chars().count() > 60 {
            quoted = quoted.chars().take(60).collect::<String>() + "…";
        }
        let text = format!(
            "This is tollgate's sample model answering \"{quoted}\". Every word arrives as a chunk of its own, \
and the gateway charges your key for exactly the tokens reported in usage."
        );
        let mut pieces = Vec::new();
        let mut so_far = String::new();
        for (i, word) in text.split(' ').enumerate() {
            let piece = if i == 0 { word.to_owned() } else { format!(" {word}") };
            so_far.push_str(&piece);
            if asked.max_tokens.is_some_and(|max| count_tokens(&so_far) > max) {
                return (pieces, true);
            }
            pieces.push(piece);
        }
        (pieces, false)
    }

    fn usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
        json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
            }
        })
    }

    pub(super) fn answer(body: &[u8]) -> Response<Body> {
        let asked = match read(body) {
            Ok(a) => a,
            Err(why) => return chat_error(StatusCode::BAD_REQUEST, &why),
        };
        let (pieces, cut) = reply(&asked);
        let text = pieces.concat();
        let completion_tokens = count_tokens(&text);
        let finish_reason = if cut { "length" } else { "stop" };
        let id = format!("chatcmpl-{}", ulid::Ulid::new());
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if !asked.stream {
            let body = json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": asked.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": null, "annotations": []},
                    "logprobs": null,
                    "finish_reason": finish_reason
                }],
                "usage": usage(asked.prompt_tokens, completion_tokens),
                "service_tier": "default",
                "system_fingerprint": "fp_tollgate_demo"
            });
            return json_response(StatusCode::OK, &body);
        }
        let chunk = |choices: Value, usage: Option<Value>| {
            let mut c = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": asked.model,
                "service_tier": "default",
                "system_fingerprint": "fp_tollgate_demo",
                "choices": choices
            });
            // With include_usage every chunk carries `usage`: null but the last one.
            if asked.include_usage {
                c["usage"] = usage.unwrap_or(Value::Null);
            }
            Bytes::from(format!("data: {c}\n\n"))
        };
        let delta = |delta: Value, finish: Option<&str>| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
        let mut events = VecDeque::new();
        events.push_back(chunk(delta(json!({"role": "assistant", "content": "", "refusal": null}), None), None));
        for piece in &pieces {
            events.push_back(chunk(delta(json!({"content": piece}), None), None));
        }
        events.push_back(chunk(delta(json!({}), Some(finish_reason)), None));
        if asked.include_usage {
            events.push_back(chunk(json!([]), Some(usage(asked.prompt_tokens, completion_tokens))));
        }
        events.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
        event_stream(events)
    }

    /// `events` as a `text/event-stream`, one frame every [`CHUNK_GAP`].
    fn event_stream(events: VecDeque<Bytes>) -> Response<Body> {
        let frames = futures_util::stream::unfold((events, true), |(mut events, first)| async move {
            let next = events.pop_front()?;
            if !first {
                tokio::time::sleep(CHUNK_GAP).await;
            }
            Some((Ok::<_, BoxError>(Frame::data(next)), (events, false)))
        });
        let mut res = Response::new(StreamBody::new(frames).boxed_unsync());
        let h = res.headers_mut();
        h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream; charset=utf-8"));
        h.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
        res
    }
}

pub(crate) fn demo_config(listen: &str, admin_listen: &str, upstream: SocketAddr, ledger: &std::path::Path) -> String {
    format!(
        r#"[server]
listen = "{listen}"
public_url = "http://{listen}"

[admin]
listen = "{admin_listen}"
token = "demo-admin-token-0123456789"

[ledger]
backend = "sqlite"
path = "{ledger}"

[[upstream]]
name = "sample"
url = "http://{upstream}"
timeout = "10s"

[[route]]
name = "docs"
upstream = "sample"
path = "/docs/*"
free = true

[[route]]
name = "quote"
upstream = "sample"
path = "/v1/quote"
methods = ["GET"]
price = "{DEMO_PRICE}"
accept = ["credits"]
description = "A stock quote"

[[route]]
name = "chat"
upstream = "sample"
path = "/v1/chat/completions"
methods = ["POST"]
meter = "openai-chat"
accept = ["credits"]
description = "An OpenAI-style chat model, priced per token"

[[model]]
name = "{CHAT_MODEL}"
input = "{CHAT_INPUT}"
output = "{CHAT_OUTPUT}"
max_output_tokens = {CHAT_MAX_OUTPUT}

[[model]]
name = "*"
input = "2.50"
output = "10.00"
max_output_tokens = {CHAT_MAX_OUTPUT}

[credits]
topup_url = "http://{listen}/docs/topup"
"#,
        ledger = ledger.display()
    )
}

pub(crate) async fn run(listen: &str, admin_listen: &str) -> ExitCode {
    match run_inner(listen, admin_listen).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run_inner(listen: &str, admin_listen: &str) -> Result<(), String> {
    let signals = crate::app::Signals::install().map_err(|e| format!("signal handlers: {e}"))?;
    let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let upstream = sample_upstream().await.map_err(|e| format!("sample upstream: {e}"))?;
    let text = demo_config(listen, admin_listen, upstream, &dir.join("demo.db"));
    let cfg_path = dir.join("tollgate.toml");
    std::fs::write(&cfg_path, &text).map_err(|e| e.to_string())?;
    let cfg = Config::parse(&text, |_| None).map_err(|e| e.to_string())?;
    let ledger = crate::app::open_ledger(&cfg).await?;
    let price = Micros::parse(DEMO_PRICE).map_err(|e| e.to_string())?;
    let key = ledger.create_key(Some("demo"), price).await.map_err(|e| e.to_string())?;
    let funds = Micros::parse(CHAT_FUNDS).map_err(|e| e.to_string())?;
    let chat = ledger.create_key(Some("demo-chat"), funds).await.map_err(|e| e.to_string())?;
    let running = crate::app::start(cfg, Some(cfg_path.clone()), ledger, crate::app::default_rails())
        .await
        .map_err(|e| e.to_string())?;
    let (a, m) = (running.addr, running.admin_addr);
    println!(
        r#"
tollgate demo is running: a sample API at http://{upstream} behind the gateway at http://{a}
Ledger: {db} (temporary). Config: {cfg}
Route "quote" (GET /v1/quote) costs {DEMO_PRICE} USD; route "docs" (/docs/*) is free.
Route "chat" (POST /v1/chat/completions) charges per token: model {CHAT_MODEL} costs {CHAT_INPUT} USD per 1M input
and {CHAT_OUTPUT} USD per 1M output tokens (any other model 2.50 / 10.00).
A key was funded for exactly one quote: {id}
A second key was funded with {CHAT_FUNDS} USD for chat: {chat_id}

1. No payment: 402 payment_missing
   curl -i http://{a}/v1/quote

2. Paid: 200 with X-Tollgate-Charged and X-Tollgate-Balance
   curl -i -H 'Authorization: Bearer {key}' http://{a}/v1/quote

3. The same again: the key ran dry, 402 insufficient_funds
   curl -i -H 'Authorization: Bearer {key}' http://{a}/v1/quote

4. Chat, priced per token: the gateway holds the most the request can cost, then charges the tokens in usage
   curl -i -H 'Authorization: Bearer {chat_key}' -H 'Content-Type: application/json' \
        -d '{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"Hello, tollgate!"}}]}}' \
        http://{a}/v1/chat/completions

5. Streamed: X-Tollgate-Hold in the head; the trailers after the last chunk say what was charged
   curl -N --raw -i -H 'TE: trailers' -H 'Authorization: Bearer {chat_key}' -H 'Content-Type: application/json' \
        -d '{{"model":"{CHAT_MODEL}","stream":true,"messages":[{{"role":"user","content":"Tell me a story"}}]}}' \
        http://{a}/v1/chat/completions

6. The chat charges, each with its model and usage
   curl -s -H 'Authorization: Bearer demo-admin-token-0123456789' 'http://{m}/admin/transactions?key={chat_id}'

   The empty quote key cannot cover a chat's hold: 402 insufficient_funds
   curl -i -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \
        -d '{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"Hi"}}]}}' http://{a}/v1/chat/completions

   A browser gets a readable page:  curl -H 'Accept: text/html' http://{a}/v1/quote
   Free route:                      curl -i http://{a}/docs/
   Top the key up (admin API):      curl -s -H 'Authorization: Bearer demo-admin-token-0123456789' \
                                         -d '{{"amount":"0.01","idempotency_key":"topup-1"}}' http://{m}/admin/keys/{id}/credit
   Its transactions:                curl -s -H 'Authorization: Bearer demo-admin-token-0123456789' 'http://{m}/admin/transactions?key={id}'
   Metrics:                         curl -s http://{m}/metrics

Press Ctrl-C to stop.
"#,
        db = dir.join("demo.db").display(),
        cfg = cfg_path.display(),
        id = key.id,
        key = key.key,
        chat_id = chat.id,
        chat_key = chat.key,
    );
    crate::app::run_until_signalled(running, signals).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::chat::{answer, read, reply};
    use super::*;

    async fn body_text(res: Response<Body>) -> String {
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[test]
    fn prompt_tokens_are_the_messages_text_plus_3_per_message_plus_3() {
        let body = json!({"model": "demo-mini", "max_tokens": 7, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}
        ]});
        let a = read(body.to_string().as_bytes()).unwrap();
        let expected = count_tokens("Be brief.") + 3 + count_tokens("Hello\nthere") + 3 + 3;
        assert_eq!((a.prompt_tokens, a.max_tokens, a.last_user.as_str()), (expected, Some(7), "Hello\nthere"));
        assert!(read(b"{\"messages\": []}").is_err(), "no model");
        assert!(read(b"not json").is_err());
    }

    #[test]
    fn the_reply_is_cut_to_the_output_maximum() {
        let body = json!({"model": "m", "max_completion_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]});
        let (pieces, cut) = reply(&read(body.to_string().as_bytes()).unwrap());
        assert!(cut);
        assert!(!pieces.is_empty() && count_tokens(&pieces.concat()) <= 5, "{pieces:?}");
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]});
        let (pieces, cut) = reply(&read(body.to_string().as_bytes()).unwrap());
        assert!(!cut && pieces.len() > 10 && pieces[1].starts_with(' '), "{pieces:?}");
    }

    #[tokio::test]
    async fn a_completion_reports_the_tokens_it_read_and_wrote() {
        let req = json!({"model": "demo-mini", "messages": [{"role": "user", "content": "Hello, tollgate!"}]});
        let res = answer(req.to_string().as_bytes());
        assert_eq!(res.headers()["content-type"], "application/json");
        let v: Value = serde_json::from_str(&body_text(res).await).unwrap();
        assert_eq!((&v["object"], &v["model"]), (&json!("chat.completion"), &json!("demo-mini")));
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(v["usage"]["completion_tokens"], count_tokens(text));
        assert_eq!(v["usage"]["prompt_tokens"], count_tokens("Hello, tollgate!") + 6);
        assert_eq!(v["usage"]["total_tokens"], v["usage"]["prompt_tokens"].as_u64().unwrap() + count_tokens(text));
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(v["usage"]["completion_tokens_details"]["reasoning_tokens"], 0);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    fn chunks(stream: &str) -> Vec<Value> {
        assert!(stream.ends_with("data: [DONE]\n\n"), "{stream}");
        stream
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_sends_word_by_word_and_the_usage_chunk_only_when_asked() {
        for include_usage in [false, true] {
            let req = json!({"model": "demo-mini", "stream": true, "stream_options": {"include_usage": include_usage},
                "messages": [{"role": "user", "content": "Tell me a story"}]});
            let res = answer(req.to_string().as_bytes());
            assert_eq!(res.headers()["content-type"], "text/event-stream; charset=utf-8");
            let chunks = chunks(&body_text(res).await);
            assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            let text: String =
                chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<String>();
            let words =
                chunks.iter().filter(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()));
            assert_eq!(words.count(), text.split(' ').count(), "one chunk per word");
            let last = chunks.last().unwrap();
            if include_usage {
                assert_eq!(last["choices"], json!([]));
                assert_eq!(last["usage"]["completion_tokens"], count_tokens(&text));
                assert_eq!(last["usage"]["prompt_tokens"], count_tokens("Tell me a story") + 6);
                assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
                assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "stop");
            } else {
                assert!(chunks.iter().all(|c| c.get("usage").is_none()), "no usage field unless asked");
                assert_eq!(last["choices"][0]["finish_reason"], "stop");
            }
        }
    }
}
