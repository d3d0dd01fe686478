//! A stand-in for Stripe's API on 127.0.0.1:0, and Stripe-shaped webhook events signed
//! the way Stripe's libraries sign them.
//!
//! The stand-in records every request (method, path, headers, the decoded form
//! fields) and answers like Stripe: `POST /v1/checkout/sessions` creates a session
//! (`cs_test_…`, with `url` and `expires_at`) and answers a repeated `Idempotency-Key`
//! with the first answer; `GET /v1/balance` answers a balance; a wrong key is 401 with
//! Stripe's error object. It can be told to answer any status and JSON instead, or to
//! hang.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::net::TcpListener;

pub(crate) const SECRET_KEY: &str = "sk_test_51TollgateStandIn0000000000";
pub(crate) const WEBHOOK_SECRET: &str = "whsec_tollgate_test_0123456789abcdef";

/// How the stand-in answers `POST /v1/checkout/sessions`.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    /// Like Stripe: a new open session (or the first answer again for a repeated
    /// `Idempotency-Key`).
    Create,
    /// This status and JSON body.
    Http(u16, Value),
    /// Never answers.
    Hang,
}

/// One request as the stand-in received it.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    /// The form fields, in order, decoded.
    pub form: Vec<(String, String)>,
}

impl Call {
    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct State {
    answer: Mutex<Answer>,
    calls: Mutex<Vec<Call>>,
    by_idempotency_key: Mutex<HashMap<String, Value>>,
}

#[derive(Clone)]
pub(crate) struct FakeStripe {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl FakeStripe {
    pub(crate) async fn start() -> FakeStripe {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            answer: Mutex::new(Answer::Create),
            calls: Mutex::new(Vec::new()),
            by_idempotency_key: Mutex::new(HashMap::new()),
        });
        let st = state.clone();
        super::serve(listener, move |req| handle(st.clone(), req));
        FakeStripe { addr, state }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub(crate) fn set(&self, a: Answer) {
        *self.state.answer.lock().unwrap() = a;
    }
    pub(crate) fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }
    /// The `[stripe]` section for this stand-in.
    pub(crate) fn section(&self) -> String {
        format!(
            "[stripe]\nsecret_key = \"{SECRET_KEY}\"\nwebhook_secret = \"{WEBHOOK_SECRET}\"\napi_base = \"{}\"\n\
currency = \"usd\"\nmin_topup = \"5.00\"\nmax_topup = \"500.00\"\nsuccess_url = \"https://example.com/thanks\"\n\
cancel_url = \"https://example.com/pricing\"\n",
            self.url()
        )
    }
}

fn reply(status: u16, body: &Value) -> Response<tollgate::Body> {
    let mut res = Response::new(tollgate::full(body.to_string()));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res.headers_mut().insert("content-type", "application/json".parse().unwrap());
    res
}

fn stripe_error(status: u16, kind: &str, message: &str) -> Response<tollgate::Body> {
    reply(status, &json!({"error": {"type": kind, "message": message}}))
}

fn decode(body: &[u8]) -> Vec<(String, String)> {
    let text = std::str::from_utf8(body).unwrap_or("");
    let dec = |s: &str| percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned();
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (dec(k), dec(v))
        })
        .collect()
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Response<tollgate::Body> {
    let (method, path, headers) = (req.method().clone(), req.uri().path().to_owned(), req.headers().clone());
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let form = decode(&body);
    let call = Call { method: method.clone(), path: path.clone(), headers: headers.clone(), form: form.clone() };
    st.calls.lock().unwrap().push(call.clone());

    if call.header("authorization") != Some(&format!("Bearer {SECRET_KEY}")) {
        return stripe_error(401, "invalid_request_error", "Invalid API Key provided: sk_test_****");
    }
    match (method, path.as_str()) {
        (Method::GET, "/v1/balance") => reply(
            200,
            &json!({"object": "balance", "available": [{"amount": 0, "currency": "usd"}], "livemode": false,
                    "pending": [{"amount": 0, "currency": "usd"}]}),
        ),
        (Method::POST, "/v1/checkout/sessions") => {
            let answer = st.answer.lock().unwrap().clone();
            match answer {
                Answer::Http(s, v) => reply(s, &v),
                Answer::Hang => std::future::pending().await,
                Answer::Create => {
                    if call.header("content-type") != Some("application/x-www-form-urlencoded") {
                        return stripe_error(400, "invalid_request_error", "expected a form body");
                    }
                    let idem = call.header("idempotency-key").unwrap_or("").to_owned();
                    if let Some(first) = st.by_idempotency_key.lock().unwrap().get(&idem) {
                        return reply(200, first);
                    }
                    let n = st.calls.lock().unwrap().len();
                    let id = format!("cs_test_a1{n:04}TollgateStandIn");
                    let unit: u64 =
                        call.field("line_items[0][price_data][unit_amount]").unwrap_or("0").parse().unwrap_or(0);
                    let session = json!({
                        "id": id,
                        "object": "checkout.session",
                        "amount_subtotal": unit,
                        "amount_total": unit,
                        "cancel_url": call.field("cancel_url"),
                        "client_reference_id": call.field("client_reference_id"),
                        "currency": call.field("line_items[0][price_data][currency]"),
                        "expires_at": 1_900_000_000 + n as i64,
                        "livemode": false,
                        "metadata": {
                            "tollgate_key_id": call.field("metadata[tollgate_key_id]"),
                            "tollgate_amount": call.field("metadata[tollgate_amount]"),
                        },
                        "mode": "payment",
                        "payment_status": "unpaid",
                        "status": "open",
                        "success_url": call.field("success_url"),
                        "url": format!("https://checkout.stripe.com/c/pay/{id}#fidkdWxOYHwnPyd1blpxYHZxWjA0"),
                    });
                    if !idem.is_empty() {
                        st.by_idempotency_key.lock().unwrap().insert(idem, session.clone());
                    }
                    reply(200, &session)
                }
            }
        }
        _ => stripe_error(404, "invalid_request_error", "Unrecognized request URL"),
    }
}

// === events ===

/// A Checkout Session as Stripe puts it in `data.object` of a checkout event (the
/// shape of Stripe's API reference, fields tollgate does not read included).
pub(crate) fn session_object(
    id: &str,
    key_id: &str,
    amount_total: u64,
    payment_status: &str,
    metadata_amount: &str,
) -> Value {
    json!({
        "id": id,
        "object": "checkout.session",
        "after_expiration": null,
        "allow_promotion_codes": null,
        "amount_subtotal": amount_total,
        "amount_total": amount_total,
        "automatic_tax": {"enabled": false, "liability": null, "status": null},
        "billing_address_collection": null,
        "cancel_url": "https://example.com/pricing",
        "client_reference_id": key_id,
        "client_secret": null,
        "consent": null,
        "created": 1_764_000_000,
        "currency": "usd",
        "custom_fields": [],
        "customer": null,
        "customer_creation": "if_required",
        "customer_details": {"address": null, "email": "customer@example.com", "name": "Jane Customer",
                             "phone": null, "tax_exempt": "none", "tax_ids": []},
        "customer_email": null,
        "expires_at": 1_764_086_400,
        "invoice": null,
        "livemode": false,
        "locale": null,
        "metadata": {"tollgate_key_id": key_id, "tollgate_amount": metadata_amount},
        "mode": "payment",
        "payment_intent": "pi_3TollgateStandIn0001",
        "payment_link": null,
        "payment_method_collection": "if_required",
        "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
        "payment_method_types": ["card"],
        "payment_status": payment_status,
        "shipping_address_collection": null,
        "shipping_details": null,
        "status": "complete",
        "submit_type": null,
        "subscription": null,
        "success_url": "https://example.com/thanks",
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted",
        "url": null
    })
}

/// A Stripe event (`object: "event"`) of `kind` about `object`.
pub(crate) fn event(event_id: &str, kind: &str, object: Value) -> String {
    json!({
        "id": event_id,
        "object": "event",
        "api_version": "2024-06-20",
        "created": 1_764_000_100,
        "data": {"object": object},
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": kind
    })
    .to_string()
}

/// `hex(HMAC-SHA256(secret, "{t}.{body}"))`, as Stripe's libraries compute `v1`.
pub(crate) fn v1(secret: &str, t: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// A `Stripe-Signature` header for `body`, signed now with the test secret.
pub(crate) fn signature(body: &str) -> String {
    let t = now();
    format!("t={t},v1={}", v1(WEBHOOK_SECRET, t, body))
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}
