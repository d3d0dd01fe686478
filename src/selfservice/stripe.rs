//! The little of Stripe's API tollgate calls: `POST /v1/checkout/sessions` to start a
//! top-up, and `GET /v1/balance` for `tollgate doctor` (a read that charges nothing).
//!
//! Stripe's API takes `application/x-www-form-urlencoded` bodies with bracketed keys
//! (`line_items[0][quantity]=1`) and answers JSON; errors are
//! `{"error": {"type", "code", "message", "param"}}`. Requests authenticate with
//! `Authorization: Bearer <secret key>`, and a POST carrying an `Idempotency-Key` is
//! answered with the first answer again when repeated within 24 hours.
//!
//! No SDK: two calls do not need one. Built on hyper-util's pooled client with rustls
//! (`proxy::pooled_client`), like the upstream pool and the x402 facilitator client;
//! forms are encoded with `percent-encoding` (the WHATWG form serializer's byte set).

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;

use super::config::{Secret, StripeConfig};
use crate::proxy::HttpsConnector;

/// Longest Stripe answer read; a Checkout Session is a few KiB.
const MAX_ANSWER: usize = 256 * 1024;
/// How long one call to Stripe may take, connecting included. A customer is waiting.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(15);

/// Why a call to Stripe produced no answer to use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum StripeError {
    #[error("Stripe unreachable: {0}")]
    Unreachable(String),
    #[error("Stripe did not answer within {0:?}")]
    Timeout(Duration),
    /// 5xx, or 429 (rate limited): worth retrying later.
    #[error("Stripe answered HTTP {0}")]
    Unavailable(u16),
    /// Any other 4xx: the request was refused, retrying the same will not help.
    #[error("Stripe refused the request (HTTP {status}, {kind}{}): {message}", code.as_deref().map(|c| format!(", {c}")).unwrap_or_default())]
    Refused { status: u16, kind: String, code: Option<String>, message: String },
    #[error("Stripe's answer could not be read: {0}")]
    Undecodable(String),
}

impl StripeError {
    /// Whether the same call may succeed later (503 + `Retry-After` to the customer).
    pub(crate) fn transient(&self) -> bool {
        !matches!(self, StripeError::Refused { .. })
    }
}

/// A Checkout Session as created.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Session {
    pub id: String,
    pub url: String,
    /// Unix seconds.
    pub expires_at: i64,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type", default)]
    kind: String,
    code: Option<String>,
    #[serde(default)]
    message: String,
}

/// Stripe's API with one connection pool.
pub(crate) struct StripeClient {
    base: String,
    secret: Secret,
    client: Client<HttpsConnector, Full<Bytes>>,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient").field("base", &self.base).finish_non_exhaustive()
    }
}

impl StripeClient {
    pub(crate) fn new(cfg: &StripeConfig) -> Result<StripeClient, String> {
        let client = crate::proxy::pooled_client(crate::proxy::PoolSettings {
            connect_timeout: TIMEOUT,
            ca: None,
            idle_timeout: Duration::from_secs(60),
            max_idle: 4,
        })
        .map_err(|e| format!("stripe: {e}"))?;
        Ok(StripeClient { base: cfg.api_base.as_str().to_owned(), secret: cfg.secret_key.clone(), client })
    }

    /// `POST /v1/checkout/sessions` with `form`; a repeat with the same
    /// `idempotency_key` within 24 hours gets the same session back.
    pub(crate) async fn create_checkout_session(
        &self,
        form: &[(&str, String)],
        idempotency_key: &str,
    ) -> Result<Session, StripeError> {
        let body = encode_form(form);
        let (status, body) = self.call(Method::POST, "/v1/checkout/sessions", Some((body, idempotency_key))).await?;
        answer(status, &body)
    }

    /// `GET /v1/balance`: whether the key works, spending nothing.
    pub(crate) async fn check_balance(&self) -> Result<(), StripeError> {
        let (status, body) = self.call(Method::GET, "/v1/balance", None).await?;
        answer::<serde_json::Value>(status, &body).map(drop)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        form: Option<(String, &str)>,
    ) -> Result<(StatusCode, Bytes), StripeError> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", self.secret.expose()))
            .map_err(|_| StripeError::Unreachable("stripe.secret_key is not a valid header value".into()))?;
        auth.set_sensitive(true);
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(header::AUTHORIZATION, auth)
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, concat!("tollgate/", env!("CARGO_PKG_VERSION")));
        let body = match form {
            Some((body, idempotency_key)) => {
                req = req
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .header("idempotency-key", idempotency_key);
                Bytes::from(body)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(body)).map_err(|e| StripeError::Unreachable(format!("bad request: {e}")))?;
        let exchange = async {
            let res = self.client.request(req).await.map_err(|e| StripeError::Unreachable(error_chain(&e)))?;
            let status = res.status();
            let body = Limited::new(res.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| StripeError::Undecodable(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| StripeError::Timeout(TIMEOUT))?
    }
}

fn answer<T: for<'de> Deserialize<'de>>(status: StatusCode, body: &[u8]) -> Result<T, StripeError> {
    if status.is_success() {
        return serde_json::from_slice(body).map_err(|e| StripeError::Undecodable(e.to_string()));
    }
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        return Err(StripeError::Unavailable(status.as_u16()));
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => Err(StripeError::Refused {
            status: status.as_u16(),
            kind: error.kind,
            code: error.code,
            message: error.message,
        }),
        Err(_) => Err(StripeError::Refused {
            status: status.as_u16(),
            kind: "unknown".into(),
            code: None,
            message: "no error object in the answer".into(),
        }),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

// === forms ===

/// What the WHATWG `application/x-www-form-urlencoded` serializer leaves as it is:
/// ASCII letters, digits and `*-._`. Everything else is `%XX` (a space too, which
/// every decoder reads like `+`).
const FORM: &AsciiSet = &NON_ALPHANUMERIC.remove(b'*').remove(b'-').remove(b'.').remove(b'_');

/// `k=v&k=v`, each side percent-encoded.
pub(crate) fn encode_form(pairs: &[(&str, String)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.extend(utf8_percent_encode(k, FORM));
        out.push('=');
        out.extend(utf8_percent_encode(v, FORM));
    }
    out
}

/// The pairs of a form body (`+` is a space); `None` if a value is not UTF-8.
pub(crate) fn decode_form(body: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(body).ok()?;
    let decode = |s: &str| -> Option<String> {
        let spaced = s.replace('+', " ");
        percent_decode_str(&spaced).decode_utf8().ok().map(|c| c.into_owned())
    };
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((decode(k)?, decode(v)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_round_trip_with_brackets_and_urls() {
        let pairs = [
            ("line_items[0][price_data][currency]", "usd".to_owned()),
            ("success_url", "https://example.com/thanks?a=1&b=two words".to_owned()),
            ("metadata[tollgate_amount]", "10.00".to_owned()),
        ];
        let s = encode_form(&pairs);
        assert!(s.starts_with("line_items%5B0%5D%5Bprice_data%5D%5Bcurrency%5D=usd&"), "{s}");
        assert!(s.contains("success_url=https%3A%2F%2Fexample.com%2Fthanks%3Fa%3D1%26b%3Dtwo%20words"), "{s}");
        let back = decode_form(s.as_bytes()).unwrap();
        let want: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        assert_eq!(back, want);
        assert_eq!(decode_form(b"amount=10.00&key=a+b%2B").unwrap()[1], ("key".into(), "a b+".into()));
        assert_eq!(decode_form(b"a=%FF"), None);
    }

    /// A Stripe that accepts the connection and never answers: the customer gets a
    /// 503 after [`TIMEOUT`], not a hung request (virtual time).
    #[tokio::test(start_paused = true)]
    async fn a_silent_stripe_times_out_and_may_be_retried() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let raw: crate::selfservice::config::RawStripeConfig = toml::from_str(&format!(
            "secret_key = \"sk_test_1\"\nwebhook_secret = \"whsec_1\"\napi_base = \"http://{addr}\"\n\
             success_url = \"https://e.com/ok\"\ncancel_url = \"https://e.com/no\"\n"
        ))
        .unwrap();
        let cfg = StripeConfig::parse(raw, &mut crate::config::values::Problems::default()).unwrap();
        let client = StripeClient::new(&cfg).unwrap();
        let started = tokio::time::Instant::now();
        let e = client.create_checkout_session(&[("mode", "payment".into())], "idem").await.unwrap_err();
        assert!(e.transient(), "{e}");
        assert!(started.elapsed() >= TIMEOUT, "{:?}", started.elapsed());
    }

    #[test]
    fn errors_say_whether_a_retry_can_help() {
        let refused = answer::<Session>(
            StatusCode::BAD_REQUEST,
            br#"{"error":{"type":"invalid_request_error","code":"url_invalid","message":"Not a valid URL","param":"success_url"}}"#,
        )
        .unwrap_err();
        assert!(!refused.transient());
        assert!(refused.to_string().contains("Not a valid URL"), "{refused}");
        assert!(answer::<Session>(StatusCode::BAD_GATEWAY, b"").unwrap_err().transient());
        assert!(answer::<Session>(StatusCode::TOO_MANY_REQUESTS, b"").unwrap_err().transient());
        let s: Session = answer(StatusCode::OK, br#"{"id":"cs_test_1","url":"https://c/1","expires_at":5}"#).unwrap();
        assert_eq!((s.id.as_str(), s.expires_at), ("cs_test_1", 5));
    }
}
