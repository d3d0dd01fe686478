//! A fake x402 facilitator on 127.0.0.1:0: checks what tollgate sends to `/verify` and
//! `/settle` (method, content type, auth headers, body shape, version, the selected
//! requirements against the payment), counts the calls, and answers as programmed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// The transaction hash every successful fake settlement reports.
pub(crate) const TX_HASH: &str = "0x6a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// How `/verify` answers.
#[derive(Debug, Clone)]
pub(crate) enum Verify {
    /// 200 `{"isValid":true,"payer":from}`.
    Valid,
    /// 200 `{"isValid":false,"invalidReason":…}`.
    Invalid(String),
    /// This status and JSON body.
    Http(u16, Value),
    /// Never answers.
    Hang,
}

/// How `/settle` answers.
#[derive(Debug, Clone)]
pub(crate) enum Settle {
    /// 200 `{"success":true,"transaction":TX_HASH,…}`.
    Success,
    /// 200 `{"success":false,"errorReason":…}`.
    Fail(String),
    Http(u16, Value),
    Hang,
}

/// One call as the fake received it.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

struct State {
    verify_calls: AtomicUsize,
    settle_calls: AtomicUsize,
    supported_calls: AtomicUsize,
    verify: Mutex<Verify>,
    settle: Mutex<Settle>,
    supported: Mutex<Value>,
    calls: Mutex<Vec<Call>>,
    problems: Mutex<Vec<String>>,
    required_headers: Vec<(String, String)>,
}

#[derive(Clone)]
pub(crate) struct FakeFacilitator {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl FakeFacilitator {
    /// Starts a fake that answers valid / success and requires `required_headers`.
    pub(crate) async fn start(required_headers: &[(&str, &str)]) -> FakeFacilitator {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            verify_calls: AtomicUsize::new(0),
            settle_calls: AtomicUsize::new(0),
            supported_calls: AtomicUsize::new(0),
            verify: Mutex::new(Verify::Valid),
            settle: Mutex::new(Settle::Success),
            supported: Mutex::new(json!({
                "kinds": [
                    {"x402Version": 1, "scheme": "exact", "network": "base-sepolia"},
                    {"x402Version": 2, "scheme": "exact", "network": "eip155:84532"}
                ],
                "extensions": [],
                "signers": {}
            })),
            calls: Mutex::new(Vec::new()),
            problems: Mutex::new(Vec::new()),
            required_headers: required_headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        });
        let st = state.clone();
        super::serve(listener, move |req| handle(st.clone(), req));
        FakeFacilitator { addr, state }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub(crate) fn verify_calls(&self) -> usize {
        self.state.verify_calls.load(Ordering::SeqCst)
    }
    pub(crate) fn settle_calls(&self) -> usize {
        self.state.settle_calls.load(Ordering::SeqCst)
    }
    pub(crate) fn supported_calls(&self) -> usize {
        self.state.supported_calls.load(Ordering::SeqCst)
    }
    pub(crate) fn set_verify(&self, v: Verify) {
        *self.state.verify.lock().unwrap() = v;
    }
    pub(crate) fn set_settle(&self, s: Settle) {
        *self.state.settle.lock().unwrap() = s;
    }
    pub(crate) fn set_supported(&self, v: Value) {
        *self.state.supported.lock().unwrap() = v;
    }
    /// Every call received, in order.
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }
    /// What the fake found wrong in what tollgate sent (empty when all was right).
    pub(crate) fn problems(&self) -> Vec<String> {
        self.state.problems.lock().unwrap().clone()
    }
}

/// A URL on which nothing listens (a facilitator that is down).
pub(crate) async fn closed_port_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

fn reply(status: u16, body: &Value) -> Response<tollgate::Body> {
    let mut res = Response::new(tollgate::full(body.to_string()));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res.headers_mut().insert("content-type", "application/json".parse().unwrap());
    res
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Response<tollgate::Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let headers = req.headers().clone();
    let bytes = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    st.calls.lock().unwrap().push(Call { path: path.clone(), headers: headers.clone(), body: body.clone() });

    match (method.clone(), path.as_str()) {
        (Method::GET, "/supported") => {
            st.supported_calls.fetch_add(1, Ordering::SeqCst);
            let v = st.supported.lock().unwrap().clone();
            return reply(200, &v);
        }
        (_, "/verify") => st.verify_calls.fetch_add(1, Ordering::SeqCst),
        (_, "/settle") => st.settle_calls.fetch_add(1, Ordering::SeqCst),
        _ => return reply(404, &json!({"error": "not found"})),
    };

    let problems = check_request(&st, &method, &headers, &body);
    if !problems.is_empty() {
        let msg = problems.join("; ");
        st.problems.lock().unwrap().extend(problems);
        return reply(500, &json!({ "error": msg }));
    }
    let payer = body["paymentPayload"]["payload"]["authorization"]["from"].clone();
    let network = body["paymentRequirements"]["network"].clone();
    if path == "/verify" {
        let answer = st.verify.lock().unwrap().clone();
        match answer {
            Verify::Valid => reply(200, &json!({"isValid": true, "payer": payer})),
            Verify::Invalid(r) => reply(200, &json!({"isValid": false, "invalidReason": r, "payer": payer})),
            Verify::Http(s, v) => reply(s, &v),
            Verify::Hang => std::future::pending().await,
        }
    } else {
        let answer = st.settle.lock().unwrap().clone();
        match answer {
            Settle::Success => {
                reply(200, &json!({"success": true, "payer": payer, "transaction": TX_HASH, "network": network}))
            }
            Settle::Fail(r) => reply(
                200,
                &json!({"success": false, "errorReason": r, "payer": payer, "transaction": "", "network": network}),
            ),
            Settle::Http(s, v) => reply(s, &v),
            Settle::Hang => std::future::pending().await,
        }
    }
}

/// What a facilitator expects of `POST /verify` and `POST /settle`.
fn check_request(st: &State, method: &Method, headers: &HeaderMap, body: &Value) -> Vec<String> {
    let mut p = Vec::new();
    if method != Method::POST {
        p.push(format!("method {method}, want POST"));
    }
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
        p.push("content-type is not application/json".into());
    }
    for (k, v) in &st.required_headers {
        if headers.get(k.as_str()).and_then(|h| h.to_str().ok()) != Some(v.as_str()) {
            p.push(format!("header {k} missing or wrong"));
        }
    }
    let Some(obj) = body.as_object() else {
        p.push("body is not a JSON object".into());
        return p;
    };
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["paymentPayload", "paymentRequirements", "x402Version"] {
        p.push(format!("body members {keys:?}"));
    }
    let version = body["x402Version"].as_u64();
    if version != body["paymentPayload"]["x402Version"].as_u64() || !matches!(version, Some(1 | 2)) {
        p.push("x402Version differs from the payload's".into());
    }
    let req = &body["paymentRequirements"];
    let auth = &body["paymentPayload"]["payload"]["authorization"];
    let str_of = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let want: &[&str] = if version == Some(1) {
        &[
            "scheme",
            "network",
            "maxAmountRequired",
            "asset",
            "payTo",
            "resource",
            "description",
            "mimeType",
            "maxTimeoutSeconds",
            "extra",
        ]
    } else {
        &["scheme", "network", "amount", "asset", "payTo", "maxTimeoutSeconds", "extra"]
    };
    for k in want {
        if req.get(*k).is_none() {
            p.push(format!("paymentRequirements.{k} missing"));
        }
    }
    // The official facilitators validate requirements with schemas that accept a
    // member or its absence, never `null` (x402-fetch 1.x and `outputSchema`).
    if let Some(m) = req.as_object() {
        for (k, v) in m {
            if v.is_null() || v.as_object().is_some_and(|o| o.values().any(Value::is_null)) {
                p.push(format!("paymentRequirements.{k} is or holds null"));
            }
        }
    }
    if version == Some(1) {
        if req["network"] != body["paymentPayload"]["network"] {
            p.push("v1 requirements network differs from the payload's".into());
        }
        if str_of(&req["network"]).contains(':') {
            p.push("v1 requirements use a CAIP-2 network".into());
        }
    } else {
        let acc = &body["paymentPayload"]["accepted"];
        for k in ["scheme", "network", "amount"] {
            if acc[k] != req[k] {
                p.push(format!("accepted.{k} differs from the requirements"));
            }
        }
        for k in ["asset", "payTo"] {
            if str_of(&acc[k]).to_lowercase() != str_of(&req[k]).to_lowercase() {
                p.push(format!("accepted.{k} differs from the requirements"));
            }
        }
        if !str_of(&req["network"]).starts_with("eip155:") {
            p.push("v2 requirements network is not CAIP-2".into());
        }
    }
    if str_of(&auth["to"]).to_lowercase() != str_of(&req["payTo"]).to_lowercase() {
        p.push("authorization.to is not payTo".into());
    }
    if req["extra"]["name"].as_str().is_none() || req["extra"]["version"].as_str().is_none() {
        p.push("requirements.extra lacks the EIP-712 name/version".into());
    }
    p
}
