//! The official `openai` and `anthropic` Python SDKs, unmodified, through the built
//! tollgate binary in front of a fake LLM upstream that answers in each API's real wire
//! format (streamed and not). The SDKs must parse everything tollgate passes on, the
//! upstream must see its own key and never the customer's, and the ledger must charge
//! exactly what the upstream's reported usage costs at the configured prices.
//!
//! The SDKs are pinned in tests/interop/requirements.txt; scripts/test.sh installs them
//! into target/interop/venv and sets TOLLGATE_INTEROP_REQUIRED=1, which turns a missing
//! install into a failure instead of a skip. Also here, needing no SDK: the `tollgate
//! demo` chat route, streamed and not, charged exactly the usage its sample model reports.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use serde_json::{json, Value};

use crate::support::*;

/// What tollgate injects for each upstream (`upstream.headers`), and what the fake
/// upstream insists on.
const OPENAI_UPSTREAM_KEY: &str = "sk-upstream-openai-0123456789";
const ANTHROPIC_UPSTREAM_KEY: &str = "sk-ant-upstream-0123456789";
const FUNDED: u64 = 1_000_000; // 1.00 USD

/// USD per 1M tokens, in micro-USD, as configured below.
struct Prices {
    input: u64,
    cached_input: u64,
    cache_write_input: u64,
    output: u64,
}
const GPT_4O_MINI: Prices =
    Prices { input: 150_000, cached_input: 75_000, cache_write_input: 150_000, output: 600_000 };
const CLAUDE_SONNET: Prices =
    Prices { input: 3_000_000, cached_input: 300_000, cache_write_input: 3_750_000, output: 15_000_000 };

/// Tokens by the kinds tollgate prices apart (its `usage` object in the admin API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Tokens {
    input: u64,
    cached_input: u64,
    cache_write_input: u64,
    output: u64,
}

impl Tokens {
    /// The price rule (README, "Selling an LLM API"): `ceil(Σ tokens × price / 1,000,000)`
    /// micro-USD, rounded up once per request.
    fn cost(&self, p: &Prices) -> u64 {
        let sum = self.input * p.input
            + self.cached_input * p.cached_input
            + self.cache_write_input * p.cache_write_input
            + self.output * p.output;
        sum.div_ceil(1_000_000)
    }

    fn json(&self) -> Value {
        json!({
            "input_tokens": self.input,
            "cached_input_tokens": self.cached_input,
            "cache_write_input_tokens": self.cache_write_input,
            "output_tokens": self.output,
        })
    }
}

/// One scripted answer of the fake upstream, chosen by the request's last user message
/// (`case: NAME`).
struct Case {
    name: &'static str,
    pieces: &'static [&'static str],
    /// OpenAI: `prompt_tokens` is input + cached (cached counted inside it).
    usage: Tokens,
}

impl Case {
    fn text(&self) -> String {
        self.pieces.concat()
    }
}

const OPENAI_CASES: [Case; 3] = [
    Case {
        name: "nonstream",
        pieces: &["Hello from the fake OpenAI upstream."],
        usage: Tokens { input: 8, cached_input: 32, cache_write_input: 0, output: 9 },
    },
    Case {
        name: "stream",
        pieces: &["Streaming", " without", " usage", "."],
        usage: Tokens { input: 21, cached_input: 0, cache_write_input: 0, output: 4 },
    },
    Case {
        name: "stream-usage",
        pieces: &["Streaming", " with", " usage", "."],
        usage: Tokens { input: 23, cached_input: 0, cache_write_input: 0, output: 5 },
    },
];

const ANTHROPIC_CASES: [Case; 4] = [
    Case {
        name: "nonstream",
        pieces: &["Hello from the fake Anthropic upstream."],
        usage: Tokens { input: 14, cached_input: 0, cache_write_input: 0, output: 10 },
    },
    // Cache reads and writes, and a message_delta that repeats the input counts
    // (cumulative, as the API sends them now).
    Case {
        name: "stream-helper",
        pieces: &["Hello", " from", " a", " stream", "."],
        usage: Tokens { input: 16, cached_input: 30, cache_write_input: 20, output: 6 },
    },
    // The older shape: message_delta carries output_tokens only.
    Case {
        name: "stream-raw",
        pieces: &["Raw", " events", " all", " the", " way", "."],
        usage: Tokens { input: 17, cached_input: 0, cache_write_input: 0, output: 7 },
    },
    // The tollgate key sent as X-Api-Key rather than Authorization.
    Case {
        name: "x-api-key",
        pieces: &["Paid with X-Api-Key."],
        usage: Tokens { input: 12, cached_input: 0, cache_write_input: 0, output: 8 },
    },
];

fn case<'a>(cases: &'a [Case], body: &Value) -> Option<&'a Case> {
    let last = body["messages"].as_array()?.iter().rev().find(|m| m["role"] == "user")?;
    let text = match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
        _ => return None,
    };
    let name = text.strip_prefix("case: ")?;
    cases.iter().find(|c| c.name == name)
}

// === the fake upstream ===

/// What the fake upstream received: path, headers, JSON body.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: http::HeaderMap,
    body: Value,
}

type Log = Arc<Mutex<Vec<Received>>>;

fn json_response(status: StatusCode, body: Value) -> Response<tollgate::Body> {
    let mut res = Response::new(tollgate::full(body.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert("content-type", "application/json".parse().unwrap());
    res
}

/// Server-sent events, one frame each, a few milliseconds apart (as a model streams).
fn event_stream(events: Vec<String>) -> Response<tollgate::Body> {
    let queue: VecDeque<Bytes> = events.into_iter().map(Bytes::from).collect();
    let frames = futures_util::stream::unfold(queue, |mut q| async move {
        let next = q.pop_front()?;
        tokio::time::sleep(Duration::from_millis(3)).await;
        Some((Ok::<_, tollgate::BoxError>(Frame::data(next)), q))
    });
    let mut res = Response::new(StreamBody::new(frames).boxed_unsync());
    res.headers_mut().insert("content-type", "text/event-stream; charset=utf-8".parse().unwrap());
    res.headers_mut().insert("cache-control", "no-cache".parse().unwrap());
    res
}

fn header<'a>(h: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// OpenAI Chat Completions, as api.openai.com answers: `chat.completion`, or
/// `chat.completion.chunk` events ending in `data: [DONE]`, with the usage-only chunk
/// (empty `choices`) when the request set `stream_options.include_usage`.
fn openai_answer(headers: &http::HeaderMap, body: &Value) -> Response<tollgate::Body> {
    if header(headers, "authorization") != Some(&format!("Bearer {OPENAI_UPSTREAM_KEY}"))
        || headers.contains_key("x-api-key")
    {
        let error = json!({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
        return json_response(StatusCode::UNAUTHORIZED, error);
    }
    let Some(c) = case(&OPENAI_CASES, body) else {
        let error =
            json!({"error": {"message": "unknown case", "type": "invalid_request_error", "param": null, "code": null}});
        return json_response(StatusCode::BAD_REQUEST, error);
    };
    let model = body["model"].as_str().unwrap_or_default();
    let served = format!("{model}-2024-07-18");
    let u = c.usage;
    let usage = json!({
        "prompt_tokens": u.input + u.cached_input,
        "completion_tokens": u.output,
        "total_tokens": u.input + u.cached_input + u.output,
        "prompt_tokens_details": {"cached_tokens": u.cached_input, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    });
    let id = format!("chatcmpl-fake{}", c.name.len());
    if body["stream"] != true {
        return json_response(
            StatusCode::OK,
            json!({
                "id": id, "object": "chat.completion", "created": 1_764_500_000, "model": served,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text(), "refusal": null, "annotations": []}, "logprobs": null, "finish_reason": "stop"}],
                "usage": usage, "service_tier": "default", "system_fingerprint": "fp_fake0001"
            }),
        );
    }
    let include_usage = body["stream_options"]["include_usage"] == true;
    let chunk = |choices: Value, usage: Value| {
        let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": 1_764_500_000, "model": served,
            "service_tier": "default", "system_fingerprint": "fp_fake0001", "choices": choices});
        if include_usage {
            c["usage"] = usage;
        }
        format!("data: {c}\n\n")
    };
    let delta = |d: Value, finish: Value| json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}]);
    let mut events =
        vec![chunk(delta(json!({"role": "assistant", "content": "", "refusal": null}), Value::Null), Value::Null)];
    for p in c.pieces {
        events.push(chunk(delta(json!({"content": p}), Value::Null), Value::Null));
    }
    events.push(chunk(delta(json!({}), json!("stop")), Value::Null));
    if include_usage {
        events.push(chunk(json!([]), usage));
    }
    events.push("data: [DONE]\n\n".to_owned());
    event_stream(events)
}

/// Anthropic Messages, as api.anthropic.com answers: a `message`, or `event:`-named
/// events message_start, content_block_start, ping, content_block_delta (text_delta)…,
/// content_block_stop, message_delta (cumulative usage), message_stop.
fn anthropic_answer(headers: &http::HeaderMap, body: &Value) -> Response<tollgate::Body> {
    let error = |status: StatusCode, kind: &str, message: &str| {
        json_response(status, json!({"type": "error", "error": {"type": kind, "message": message}}))
    };
    // The API takes its key as x-api-key or as a bearer token (anthropic 2.x sends the
    // latter); either way it must be the upstream's own.
    let bearer = format!("Bearer {ANTHROPIC_UPSTREAM_KEY}");
    let (key, auth) = (header(headers, "x-api-key"), header(headers, "authorization"));
    if (key.is_none() && auth.is_none())
        || key.is_some_and(|k| k != ANTHROPIC_UPSTREAM_KEY)
        || auth.is_some_and(|a| a != bearer)
    {
        return error(StatusCode::UNAUTHORIZED, "authentication_error", "invalid x-api-key");
    }
    if !headers.contains_key("anthropic-version") {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "anthropic-version: header is required");
    }
    let Some(c) = case(&ANTHROPIC_CASES, body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "unknown case");
    };
    let model = body["model"].as_str().unwrap_or_default();
    let u = c.usage;
    let id = format!("msg_01Fake{}", c.name.len());
    if body["stream"] != true {
        return json_response(
            StatusCode::OK,
            json!({
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": c.text()}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": u.input, "cache_creation_input_tokens": u.cache_write_input,
                          "cache_read_input_tokens": u.cached_input, "output_tokens": u.output, "service_tier": "standard"}
            }),
        );
    }
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant", "content": [],
                "model": model, "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": u.input, "cache_creation_input_tokens": u.cache_write_input,
                          "cache_read_input_tokens": u.cached_input, "output_tokens": 1, "service_tier": "standard"}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for p in c.pieces {
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}),
        ));
    }
    events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    let final_usage = if c.name == "stream-helper" {
        json!({"input_tokens": u.input, "cache_creation_input_tokens": u.cache_write_input,
               "cache_read_input_tokens": u.cached_input, "output_tokens": u.output})
    } else {
        json!({"output_tokens": u.output})
    };
    events.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": final_usage}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    event_stream(events)
}

/// The fake LLM upstream: both APIs on one server, recording every request.
async fn fake_llm(log: Log) -> Upstream {
    upstream(move |req: Request<Incoming>| {
        let log = log.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let path = parts.uri.path().to_owned();
            log.lock().unwrap().push(Received {
                path: path.clone(),
                headers: parts.headers.clone(),
                body: body.clone(),
            });
            match (parts.method.as_str(), path.as_str()) {
                ("POST", "/v1/chat/completions") => openai_answer(&parts.headers, &body),
                ("POST", "/v1/messages") => anthropic_answer(&parts.headers, &body),
                _ => json_response(StatusCode::NOT_FOUND, json!({"error": "not found"})),
            }
        }
    })
    .await
}

// === tollgate, the built binary ===

struct Tollgate {
    _proc: Proc,
    _dir: tempfile::TempDir,
    base: String,
    admin: String,
    key_id: String,
    key: String,
}

fn config(dir: &std::path::Path, upstream: &str, port: u16, admin_port: u16) -> std::path::PathBuf {
    let text = format!(
        r#"[server]
listen = "127.0.0.1:{port}"
shutdown_timeout = "2s"

[admin]
listen = "127.0.0.1:{admin_port}"
token = "{ADMIN_TOKEN}"

[ledger]
path = "{db}"

[log]
filter = "warn"

[[upstream]]
name = "openai"
url = "{upstream}"
timeout = "10s"
headers = {{ Authorization = "Bearer {OPENAI_UPSTREAM_KEY}" }}

[[upstream]]
name = "anthropic"
url = "{upstream}"
timeout = "10s"
headers = {{ x-api-key = "{ANTHROPIC_UPSTREAM_KEY}" }}

[[route]]
name = "chat"
upstream = "openai"
path = "/v1/chat/completions"
methods = ["POST"]
meter = "openai-chat"
accept = ["credits"]

[[route]]
name = "messages"
upstream = "anthropic"
path = "/v1/messages"
methods = ["POST"]
meter = "anthropic-messages"
accept = ["credits"]

[[model]]
name = "gpt-4o-mini"
input = "0.15"
cached_input = "0.075"
output = "0.60"
max_output_tokens = 16384

[[model]]
name = "claude-sonnet-4-5"
input = "3.00"
cached_input = "0.30"
cache_write_input = "3.75"
output = "15.00"
max_output_tokens = 64000
"#,
        db = dir.join("ledger.db").display()
    );
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn wait_healthy(admin: &str) {
    for _ in 0..200 {
        let req = client().get(format!("{admin}/healthz").parse().unwrap());
        if let Ok(Ok(res)) = tokio::time::timeout(Duration::from_millis(500), req).await {
            if res.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("tollgate did not become healthy");
}

impl Tollgate {
    /// The built binary in front of `upstream`, with one key funded with [`FUNDED`].
    async fn start(upstream: &Upstream) -> Tollgate {
        let dir = tempfile::tempdir().unwrap();
        let (port, admin_port) = (free_port(), free_port());
        let cfg = config(dir.path(), &upstream.url(), port, admin_port);
        let (ok, out, err) = cli(&cfg, &["keys", "create", "--balance", "1.00", "--label", "sdk", "--json"]);
        assert!(ok, "{err}");
        let k = parse_json(&out);
        let proc = Proc(
            Command::new(binary())
                .args(["run", "--config"])
                .arg(&cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let admin = format!("http://127.0.0.1:{admin_port}");
        wait_healthy(&admin).await;
        Tollgate {
            _proc: proc,
            _dir: dir,
            base: format!("http://127.0.0.1:{port}"),
            admin,
            key_id: k["id"].as_str().unwrap().to_owned(),
            key: k["key"].as_str().unwrap().to_owned(),
        }
    }

    async fn transactions(&self) -> Vec<Value> {
        let r = send(
            "GET",
            &format!("{}/admin/transactions?key={}&limit=100", self.admin, self.key_id),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["transactions"].as_array().unwrap().clone()
    }

    async fn balance(&self) -> u64 {
        let r = send(
            "GET",
            &format!("{}/admin/keys/{}", self.admin, self.key_id),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        micros(r.json()["balance"].as_str().unwrap())
    }
}

/// A decimal USD string in micro-USD.
fn micros(s: &str) -> u64 {
    tollgate::money::Micros::parse(s).unwrap_or_else(|e| panic!("{s:?}: {e}")).get()
}

/// `"0.000009 USD"` → 9.
fn header_micros(v: &Value) -> u64 {
    let s = v.as_str().unwrap_or_else(|| panic!("no money header: {v}"));
    micros(s.strip_suffix(" USD").unwrap_or_else(|| panic!("{s:?} is not in USD")))
}

/// The metered debits of the key, as (model, usage, amount), sorted; and checks each is
/// a captured, reported debit with its hold.
fn metered_debits(txs: &[Value]) -> Vec<(String, Value, u64)> {
    let mut out: Vec<(String, Value, u64)> = txs
        .iter()
        .filter(|t| t["kind"] == "debit")
        .map(|t| {
            assert_eq!(t["status"], "captured", "{t}");
            assert_eq!(t["usage_source"], "reported", "{t}");
            let amount = micros(t["amount"].as_str().unwrap());
            let held = micros(t["held"].as_str().unwrap_or_else(|| panic!("a metered debit has `held`: {t}")));
            assert!(amount <= held, "{t}");
            (t["model"].as_str().unwrap_or_else(|| panic!("no model: {t}")).to_owned(), t["usage"].clone(), amount)
        })
        .collect();
    out.sort_by_key(|d| (d.2, d.1.to_string()));
    out
}

fn expected_debits(model: &str, cases: &[Case], prices: &Prices) -> Vec<(String, Value, u64)> {
    let mut out: Vec<(String, Value, u64)> =
        cases.iter().map(|c| (model.to_owned(), c.usage.json(), c.usage.cost(prices))).collect();
    out.sort_by_key(|d| (d.2, d.1.to_string()));
    out
}

/// The upstream saw its own key on every request, and the customer's key nowhere.
fn assert_upstream_never_saw(log: &Log, customer_key: &str) {
    let log = log.lock().unwrap();
    assert!(!log.is_empty());
    for r in log.iter() {
        for (name, value) in &r.headers {
            let v = value.to_str().unwrap_or_default();
            assert!(!v.contains(customer_key), "{} reached the upstream with the customer's key in {name}", r.path);
        }
        assert!(!r.body.to_string().contains(customer_key), "{}", r.path);
    }
}

// === running an SDK script ===

/// Where scripts/test.sh installs the clients (`TOLLGATE_INTEROP_DIR` overrides).
fn interop_dir() -> std::path::PathBuf {
    std::env::var_os("TOLLGATE_INTEROP_DIR")
        .map(Into::into)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/interop"))
}

/// Runs `tests/interop/SCRIPT BASE KEY` with the venv's Python; its last line as JSON,
/// or `None` when the venv is not installed (skipped, loudly, unless
/// TOLLGATE_INTEROP_REQUIRED=1).
async fn run_sdk_script(script: &str, base: &str, key: &str) -> Option<Value> {
    let venv = interop_dir().join("venv");
    if !venv.join(".installed").exists() {
        let msg = format!(
            "official LLM SDKs not installed ({} is missing); run scripts/test.sh to install them",
            venv.join(".installed").display()
        );
        assert!(std::env::var_os("TOLLGATE_INTEROP_REQUIRED").is_none(), "{msg}");
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED: {msg}");
        return None;
    }
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(script);
    let child = tokio::process::Command::new(venv.join("bin/python"))
        .arg(&source)
        .args([base, key])
        .env_remove("OPENAI_BASE_URL")
        .env_remove("ANTHROPIC_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_AUTH_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {script}: {e}"));
    // A bound, not a timing assertion: a hung client fails the test instead of hanging it.
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within 120 s"))
        .expect("waiting for the SDK script");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} failed ({}):\n{stderr}\n{stdout}", out.status);
    let line = stdout.lines().last().unwrap_or_else(|| panic!("{script} printed nothing:\n{stderr}"));
    Some(serde_json::from_str(line).unwrap_or_else(|e| panic!("{script} printed {line:?} ({e}):\n{stderr}")))
}

// === the tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_sdk_streams_and_is_charged_the_reported_usage() {
    let log = Log::default();
    let up = fake_llm(log.clone()).await;
    let tg = Tollgate::start(&up).await;
    let Some(out) = run_sdk_script("llm_openai.py", &tg.base, &tg.key).await else { return };
    let sdk = out["client"].as_str().unwrap().to_owned();
    let [plain, stream, with_usage] = &OPENAI_CASES;

    // Not streamed: the completion and its usage as the upstream sent them, with the
    // exact charge and the balance in the head.
    let n = &out["nonstream"];
    assert_eq!(n["object"], "chat.completion", "{sdk}: {n}");
    assert_eq!(n["text"], plain.text(), "{sdk}");
    assert_eq!(n["finish_reason"], "stop", "{sdk}");
    assert_eq!(n["usage"]["prompt_tokens"], 40, "{sdk}: {n}");
    assert_eq!(n["usage"]["prompt_tokens_details"]["cached_tokens"], 32, "{sdk}: {n}");
    assert_eq!(n["usage"]["completion_tokens"], 9, "{sdk}: {n}");
    assert_eq!(header_micros(&n["charged"]), plain.usage.cost(&GPT_4O_MINI), "{sdk}: {n}");
    assert_eq!(header_micros(&n["balance"]), FUNDED - plain.usage.cost(&GPT_4O_MINI), "{sdk}: {n}");

    // Streamed without stream_options: tollgate asked the upstream for usage, and the
    // SDK never sees the usage-only chunk (nor a `usage` it did not ask for).
    let s = &out["stream"];
    assert_eq!(s["text"], stream.text(), "{sdk}: {s}");
    assert_eq!(s["finish_reason"], "stop", "{sdk}: {s}");
    assert_eq!((&s["usage_chunks"], &s["empty_choice_chunks"]), (&json!(0), &json!(0)), "{sdk}: {s}");
    assert_eq!(s["chunks"], stream.pieces.len() + 2, "{sdk}: role chunk + pieces + finish chunk: {s}");
    assert!(header_micros(&s["hold"]) >= stream.usage.cost(&GPT_4O_MINI), "{sdk}: {s}");

    // Streamed with include_usage: the SDK gets the usage chunk as OpenAI sends it.
    let s = &out["stream_usage"];
    assert_eq!(s["text"], with_usage.text(), "{sdk}: {s}");
    assert_eq!((&s["usage_chunks"], &s["empty_choice_chunks"]), (&json!(1), &json!(1)), "{sdk}: {s}");
    assert_eq!(s["usage"]["prompt_tokens"], 23, "{sdk}: {s}");
    assert_eq!(s["usage"]["completion_tokens"], 5, "{sdk}: {s}");

    // An unpriced model: the SDK raises BadRequestError with tollgate's reason.
    assert_eq!(out["unpriced"], json!({"status": 400, "reason": "model_not_priced"}), "{sdk}");

    // What reached the upstream: its own key, never the customer's; both streams asked
    // for usage, whatever the client sent.
    assert_upstream_never_saw(&log, &tg.key);
    let streams: Vec<Value> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.body["stream"] == true)
        .map(|r| r.body["stream_options"]["include_usage"].clone())
        .collect();
    assert_eq!(streams, vec![json!(true), json!(true)], "{sdk}");

    // The ledger: exactly the reported usage at the configured prices, per request.
    let txs = tg.transactions().await;
    let debits = metered_debits(&txs);
    assert_eq!(debits, expected_debits("gpt-4o-mini", &OPENAI_CASES, &GPT_4O_MINI), "{sdk}: {txs:#?}");
    let charged: u64 = debits.iter().map(|d| d.2).sum();
    assert_eq!(tg.balance().await, FUNDED - charged, "{sdk}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_anthropic_sdk_streams_and_is_charged_the_reported_usage() {
    let log = Log::default();
    let up = fake_llm(log.clone()).await;
    let tg = Tollgate::start(&up).await;
    let Some(out) = run_sdk_script("llm_anthropic.py", &tg.base, &tg.key).await else { return };
    let sdk = out["client"].as_str().unwrap().to_owned();
    let [plain, helper, raw, legacy] = &ANTHROPIC_CASES;

    let n = &out["nonstream"];
    assert_eq!(n["type"], "message", "{sdk}: {n}");
    assert_eq!(n["text"], plain.text(), "{sdk}");
    assert_eq!(n["stop_reason"], "end_turn", "{sdk}");
    assert_eq!((&n["usage"]["input_tokens"], &n["usage"]["output_tokens"]), (&json!(14), &json!(10)), "{sdk}: {n}");
    assert_eq!(header_micros(&n["charged"]), plain.usage.cost(&CLAUDE_SONNET), "{sdk}: {n}");
    assert_eq!(header_micros(&n["balance"]), FUNDED - plain.usage.cost(&CLAUDE_SONNET), "{sdk}: {n}");

    // messages.stream(): text_stream, and the final message the helper accumulates.
    let s = &out["stream_helper"];
    assert_eq!((&s["text"], &s["final_text"]), (&json!(helper.text()), &json!(helper.text())), "{sdk}: {s}");
    assert_eq!(s["stop_reason"], "end_turn", "{sdk}");
    let u = &s["usage"];
    assert_eq!(
        [&u["input_tokens"], &u["cache_read_input_tokens"], &u["cache_creation_input_tokens"], &u["output_tokens"]],
        [&json!(16), &json!(30), &json!(20), &json!(6)],
        "{sdk}: {s}"
    );
    assert!(header_micros(&s["hold"]) >= helper.usage.cost(&CLAUDE_SONNET), "{sdk}: {s}");

    // messages.create(stream=True): every event type in order (the SDK drops `ping`).
    let s = &out["stream_raw"];
    assert_eq!(s["text"], raw.text(), "{sdk}: {s}");
    let mut events = vec!["message_start", "content_block_start"];
    events.extend(std::iter::repeat_n("content_block_delta", raw.pieces.len()));
    events.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(s["events"], json!(events), "{sdk}: {s}");
    assert_eq!((&s["usage"]["input_tokens"], &s["usage"]["output_tokens"]), (&json!(17), &json!(7)), "{sdk}: {s}");

    // The key sent as X-Api-Key pays too.
    let x = &out["x_api_key"];
    assert_eq!(x["text"], legacy.text(), "{sdk}: {x}");
    assert_eq!(header_micros(&x["charged"]), legacy.usage.cost(&CLAUDE_SONNET), "{sdk}: {x}");

    // The upstream got the configured x-api-key on every request, and neither the
    // customer's bearer token nor their X-Api-Key.
    assert_upstream_never_saw(&log, &tg.key);
    for r in log.lock().unwrap().iter() {
        assert_eq!(header(&r.headers, "x-api-key"), Some(ANTHROPIC_UPSTREAM_KEY), "{sdk}");
        assert_eq!(header(&r.headers, "authorization"), None, "{sdk}");
        assert!(header(&r.headers, "anthropic-version").is_some(), "{sdk}: the SDK's version header passes");
    }

    // Cache reads and writes priced apart, the last message_delta's cumulative usage.
    let txs = tg.transactions().await;
    let debits = metered_debits(&txs);
    assert_eq!(debits, expected_debits("claude-sonnet-4-5", &ANTHROPIC_CASES, &CLAUDE_SONNET), "{sdk}: {txs:#?}");
    let charged: u64 = debits.iter().map(|d| d.2).sum();
    assert_eq!(tg.balance().await, FUNDED - charged, "{sdk}");
}

// === tollgate demo ===

/// What `tollgate demo` printed: the gateway, the admin listener, the chat key.
struct Demo {
    _proc: Proc,
    base: String,
    admin: String,
    chat_id: String,
    chat_key: String,
}

/// Starts `tollgate demo` on free ports and reads its printout up to "Press Ctrl-C".
fn start_demo() -> Demo {
    let (port, admin_port) = (free_port(), free_port());
    let mut child = Command::new(binary())
        .args(["demo", "--listen", &format!("127.0.0.1:{port}"), "--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let mut printed = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let after = |marker: &str| {
        let at = printed.find(marker).unwrap_or_else(|| panic!("{marker:?} not printed:\n{printed}")) + marker.len();
        printed[at..].split_whitespace().next().unwrap().trim_matches(|c| c == '\'' || c == ',').to_owned()
    };
    let chat_id = after("funded with 0.05 USD for chat: ");
    // The chat key is the one in step 4's curl line.
    let step4 = printed.split("4. Chat").nth(1).unwrap_or_else(|| panic!("no step 4:\n{printed}"));
    let chat_key = step4.split("Bearer ").nth(1).unwrap().split('\'').next().unwrap().to_owned();
    Demo {
        _proc: proc,
        base: format!("http://127.0.0.1:{port}"),
        admin: format!("http://127.0.0.1:{admin_port}"),
        chat_id,
        chat_key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_chat_is_charged_exactly_the_usage_its_sample_model_reports() {
    let demo = start_demo();
    let auth = format!("Bearer {}", demo.chat_key);
    let url = format!("{}/v1/chat/completions", demo.base);
    let headers = [("authorization", auth.as_str()), ("content-type", "application/json")];

    // Not streamed: a chat.completion whose usage is the charge in the head.
    let r = send(
        "POST",
        &url,
        &headers,
        r#"{"model":"demo-mini","messages":[{"role":"user","content":"Hello, tollgate!"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(body["usage"]["completion_tokens_details"]["reasoning_tokens"], 0);
    let (p, c) =
        (body["usage"]["prompt_tokens"].as_u64().unwrap(), body["usage"]["completion_tokens"].as_u64().unwrap());
    let demo_mini = Prices { input: 150_000, cached_input: 150_000, cache_write_input: 150_000, output: 600_000 };
    let first = Tokens { input: p, cached_input: 0, cache_write_input: 0, output: c }.cost(&demo_mini);
    assert_eq!(
        r.header("x-tollgate-charged").map(str::to_owned),
        Some(format!("{} USD", tollgate::money::Micros(first)))
    );

    // Streamed, with trailers: X-Tollgate-Hold in the head, chunks word by word, the
    // usage-only chunk removed (not asked for), the charge in the trailers.
    let req = Request::post(&url)
        .header("authorization", &auth)
        .header("content-type", "application/json")
        .header("te", "trailers")
        .body(http_body_util::Full::new(Bytes::from_static(
            br#"{"model":"demo-mini","stream":true,"messages":[{"role":"user","content":"Tell me a story"}]}"#,
        )))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(20), client().request(req)).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("x-tollgate-hold").is_some(), "{:?}", res.headers());
    let collected = tokio::time::timeout(Duration::from_secs(20), res.into_body().collect()).await.unwrap().unwrap();
    let trailers = collected.trailers().cloned();
    let text = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("\"choices\":[]"), "the usage chunk the client did not ask for is removed: {text}");
    let words = text.matches("\"content\":\"").count();
    assert!(words > 10, "word by word: {text}");
    let trailers = trailers.expect("trailers after the stream");
    let charged = trailers.get("x-tollgate-charged").unwrap().to_str().unwrap().to_owned();
    let streamed: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();

    // The ledger: two debits, each exactly its usage; the streamed one's usage is the
    // tokens of what was streamed.
    let r = send(
        "GET",
        &format!("{}/admin/transactions?key={}", demo.admin, demo.chat_id),
        &[("authorization", "Bearer demo-admin-token-0123456789")],
        "",
    )
    .await;
    let txs = r.json()["transactions"].as_array().unwrap().clone();
    let debits: Vec<&Value> = txs.iter().filter(|t| t["kind"] == "debit").collect();
    assert_eq!(debits.len(), 2, "{txs:#?}");
    let mut total = 0;
    for t in &debits {
        assert_eq!(
            (&t["model"], &t["usage_source"], &t["status"]),
            (&json!("demo-mini"), &json!("reported"), &json!("captured")),
            "{t}"
        );
        let u = &t["usage"];
        let tokens = Tokens {
            input: u["input_tokens"].as_u64().unwrap(),
            cached_input: u["cached_input_tokens"].as_u64().unwrap(),
            cache_write_input: u["cache_write_input_tokens"].as_u64().unwrap(),
            output: u["output_tokens"].as_u64().unwrap(),
        };
        let amount = micros(t["amount"].as_str().unwrap());
        assert_eq!(amount, tokens.cost(&demo_mini), "{t}");
        total += amount;
    }
    // Newest first: the streamed request's debit, its output the tokens of what streamed.
    assert_eq!(format!("{} USD", debits[0]["amount"].as_str().unwrap()), charged, "{txs:#?}");
    assert_eq!(debits[0]["usage"]["output_tokens"], tollgate::meter::count_tokens(&streamed), "{streamed:?}");
    let r = send(
        "GET",
        &format!("{}/admin/keys/{}", demo.admin, demo.chat_id),
        &[("authorization", "Bearer demo-admin-token-0123456789")],
        "",
    )
    .await;
    assert_eq!(micros(r.json()["balance"].as_str().unwrap()), 50_000 - total);
}
