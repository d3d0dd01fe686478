//! Metered charges: a request priced by the tokens the upstream reports (see
//! ARCHITECTURE.md, "Metered pricing").
//!
//! Like a card at a petrol pump: [`price_request`] reads the request body (bounded),
//! finds the model's price and the most the request can cost, and the gate holds that
//! through the payer's rail exactly as it holds a fixed price. The charge then ends
//! when the response **body** ends, not at its head:
//!
//! - a non-streamed response is read whole (bounded) so the charge is captured before
//!   the head is sent, and the head carries the exact receipt;
//! - an event stream passes through [`MeteredBody`] event by event; the head carries
//!   `X-Tollgate-Hold`, and at the end of the stream the amount is captured and, when
//!   the client accepts trailers, sent as trailers.
//!
//! Every way a stream can end captures exactly once ([`Charger::charge`] consumes the
//! grant): its end, an upstream error (the usage seen so far, or an estimate), or the
//! client leaving (`on_disconnect`: read on to the end, or stop and charge what was
//! delivered). [`bill`] is the one rule that turns what was seen into an amount.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode, Version};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, Limited};

use super::gate::{GrantGuard, PaymentGate};
use crate::config::{MeterPlan, OnDisconnect};
use crate::ledger::Metered;
use crate::meter::{self, Ask, Hold, Meter, ModelPrice, StreamMeter, Unreadable, Usage, UsageSource};
use crate::money::{Micros, Money};
use crate::proxy::ReqBody;
use crate::rejection::MeterRefusal;
use crate::route::RequestCtx;
use crate::{Body, BoxError};

pub(super) const X_TOLLGATE_HOLD: HeaderName = HeaderName::from_static("x-tollgate-hold");
/// Request bodies up to this size are tokenized on the request's own task.
const TOKENIZE_INLINE: usize = 64 * 1024;

/// A priced metered request, on its way to the upstream.
#[derive(Debug)]
pub(crate) struct MeteredCall {
    pub(super) plan: MeterPlan,
    /// The `[[model]]` entry the request's model matched.
    pub(super) model: ModelPrice,
    pub(super) ask: Ask,
    pub(super) hold: Hold,
    /// Remove the usage-only chunk the client did not ask for (openai-chat streams).
    pub(super) strip_usage: bool,
    /// The client reads trailers (`TE: trailers`, or HTTP/2).
    pub(super) trailers: bool,
    /// What the hold is made of, for a refusal's detail.
    pub(super) note: String,
}

/// Reads a metered request's body (at most the route's `max_request_bytes`), prices
/// it, and gives back the request to forward: for an `openai-chat` stream, with
/// `stream_options.include_usage` set so the upstream reports usage.
pub(super) async fn price_request(
    plan: MeterPlan,
    models: &[ModelPrice],
    route: &str,
    req: Request<ReqBody>,
) -> Result<(MeteredCall, Request<ReqBody>), MeterRefusal> {
    let refuse = |code: &'static str, detail: String| MeterRefusal { code, detail, route: route.to_owned() };
    let too_large = || {
        refuse(
            "request_too_large",
            format!(
                "The request body is larger than the {} bytes route {route} reads to price a request.",
                plan.max_request_bytes
            ),
        )
    };
    let (mut parts, body) = req.into_parts();
    if body.size_hint().lower() > plan.max_request_bytes as u64 {
        return Err(too_large());
    }
    let bytes = match collect_limited(body, plan.max_request_bytes).await {
        Ok(bytes) => bytes,
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(_) => {
            return Err(refuse("request_unreadable", "The request body was cut short or malformed.".to_owned()));
        }
    };
    // Counting a long prompt's tokens takes milliseconds of CPU: off the runtime's
    // threads, so other requests on this worker are not held up.
    let read = if bytes.len() > TOKENIZE_INLINE {
        let meter = plan.meter;
        tokio::task::spawn_blocking(move || meter::read_for_upstream(meter, &bytes))
            .await
            .unwrap_or(Err(Unreadable::NotObject))
    } else {
        meter::read_for_upstream(plan.meter, &bytes)
    };
    let (ask, forwarded) =
        read.map_err(|e| refuse("request_unreadable", format!("Route {route} charges per token and {e}.")))?;
    let Some(model) = meter::find_model(models, &ask.model) else {
        let mut priced: Vec<&str> = models.iter().map(|m| m.name.as_str()).take(8).collect();
        if models.len() > priced.len() {
            priced.push("…");
        }
        return Err(refuse(
            "model_not_priced",
            format!("Model {:?} has no price on route {route}; priced: {}.", ask.model, priced.join(", ")),
        ));
    };
    let hold = meter::hold(&ask, model, plan.fixed, plan.max_price);
    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(forwarded.len()));
    // tollgate reads the answer for its usage: it must come uncompressed.
    parts.headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    let trailers = parts.version == Version::HTTP_2
        || parts
            .headers
            .get_all(header::TE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
    let output_key = match plan.meter {
        Meter::OpenAiResponses => "max_output_tokens",
        _ => "max_tokens",
    };
    let note = match plan.meter {
        Meter::OpenAiEmbeddings => format!("{} input tokens of {}", hold.input_tokens, ask.model),
        _ => format!("{output_key} {} of {}", hold.output_tokens, ask.model),
    };
    let call = MeteredCall {
        plan,
        model: model.clone(),
        strip_usage: plan.meter == Meter::OpenAiChat && ask.stream && !ask.include_usage,
        ask,
        hold,
        trailers,
        note,
    };
    Ok((call, Request::from_parts(parts, ReqBody::from(forwarded))))
}

/// What a finished metered response is charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bill {
    /// Never more than the hold.
    pub(crate) amount: Micros,
    /// The usage charged for, when tokens were charged.
    pub(crate) metered: Option<Metered>,
    /// The reported usage cost more than the hold (the hold was charged).
    pub(crate) overrun: bool,
}

/// How a metered response ended, as far as the charge is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The upstream answered below 400.
    Answered,
    /// The upstream answered 400 or above, failed, or its body broke off; `chargeable`
    /// by the route's `charge_on`.
    Failed { chargeable: bool },
}

/// The bill of an answer whose body cannot be read for usage (the upstream encoded it
/// although it was asked not to): the whole hold, marked estimated, since anything less
/// could be gamed.
pub(crate) fn bill_unreadable(call: &MeteredCall) -> Bill {
    let usage = Usage { input: call.hold.input_tokens, output: call.hold.output_tokens, ..Usage::default() };
    Bill {
        amount: call.hold.amount,
        metered: Some(Metered { model: call.model.name.clone(), usage, source: UsageSource::Estimated }),
        overrun: false,
    }
}

/// Whether a response body is encoded (`Content-Encoding` other than `identity`).
pub(super) fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| v.to_str().map_or(true, |v| v.split(',').any(|c| !c.trim().eq_ignore_ascii_case("identity"))))
}

/// The one rule from what was seen to the amount charged:
///
/// - usage reported: the fixed part plus its tokens at the model's prices;
/// - no usage after an answer below 400: an estimate, the input counted before the
///   request plus the output delivered, marked `estimated`;
/// - no usage after a failure: only the fixed part (no tokens were billed upstream),
///   and nothing at all when `charge_on` does not charge the failure;
///
/// always capped by the hold.
pub(crate) fn bill(call: &MeteredCall, ending: Ending, usage: Option<Usage>, delivered_output: u64) -> Bill {
    let fixed = call.plan.fixed;
    let (usage, source) = match (ending, usage) {
        (Ending::Failed { chargeable: false }, _) => {
            return Bill { amount: Micros::ZERO, metered: None, overrun: false };
        }
        (_, Some(u)) => (u, UsageSource::Reported),
        (Ending::Answered, None) => {
            let estimated = Usage { input: call.ask.input_tokens, output: delivered_output, ..Usage::default() };
            (estimated, UsageSource::Estimated)
        }
        (Ending::Failed { chargeable: true }, None) => {
            return Bill { amount: fixed.min(call.hold.amount), metered: None, overrun: false };
        }
    };
    let cost = fixed.checked_add(usage.cost(&call.model)).unwrap_or(Micros(u64::MAX));
    let overrun = source == UsageSource::Reported && cost > call.hold.amount;
    Bill {
        amount: cost.min(call.hold.amount),
        metered: Some(Metered { model: call.model.name.clone(), usage, source }),
        overrun,
    }
}

/// Everything needed to end a metered charge, once: it consumes the grant.
pub(super) struct Charger {
    pub(super) gate: Arc<PaymentGate>,
    pub(super) ctx: Arc<RequestCtx>,
    pub(super) call: MeteredCall,
    pub(super) grant: GrantGuard,
    pub(super) status: StatusCode,
}

impl Charger {
    /// A stream that broke off or lost its client still answered: it is charged for
    /// its usage, or an estimate. Only the status decides a failure.
    fn ending(&self) -> Ending {
        if self.status.as_u16() < 400 {
            return Ending::Answered;
        }
        Ending::Failed { chargeable: self.gate.chargeable_status(&self.ctx, self.status) }
    }

    /// Captures the bill for what was seen; the receipt's headers when the client
    /// reads trailers.
    pub(super) async fn charge(mut self, usage: Option<Usage>, delivered_output: u64) -> Option<HeaderMap> {
        let bill = bill(&self.call, self.ending(), usage, delivered_output);
        let grant = self.grant.take();
        let receipt = self.gate.close_metered(&self.ctx, &self.call, grant, &bill).await.ok()?;
        if !self.call.trailers {
            return None;
        }
        let mut trailers = HeaderMap::new();
        for (k, v) in receipt.headers {
            trailers.insert(k, v);
        }
        Some(trailers)
    }
}

/// The head of a metered event stream: the hold, and the trailers to expect.
pub(super) fn stream_head(headers: &mut HeaderMap, call: &MeteredCall) {
    // The body may lose a chunk (the usage-only one) and gains trailers: its length
    // is not the upstream's.
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(X_TOLLGATE_HOLD, Money::usd(call.hold.amount).header_value());
    let mut expose = String::from("x-tollgate-hold");
    if call.trailers {
        headers.insert(header::TRAILER, HeaderValue::from_static("X-Tollgate-Charged, X-Tollgate-Balance"));
        expose.push_str(", x-tollgate-charged, x-tollgate-balance");
    }
    if let Ok(v) = HeaderValue::from_str(&expose) {
        headers.append(header::ACCESS_CONTROL_EXPOSE_HEADERS, v);
    }
}

/// Whether a response is an event stream (`text/event-stream`).
pub(super) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().get(..17).is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream")))
}

/// Reads a non-streamed metered response whole, within `limit` bytes and `timeout`.
pub(super) async fn read_whole(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, &'static str> {
    match tokio::time::timeout(timeout, collect_limited(body, limit)).await {
        Err(_) => Err("the upstream did not finish its response in time"),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err("the upstream's response is larger than the route's max_response_bytes")
        }
        Ok(Err(_)) => Err("the upstream's response broke off"),
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

/// Reads `body` whole, failing past `limit` bytes. Boxed as a `Send` future: written
/// as a plain `async` call, the compiler cannot prove the error conversion inside
/// `Limited` is `Send` for every lifetime, and the gate's task must be.
fn collect_limited<B>(body: B, limit: usize) -> Pin<Box<dyn Future<Output = Result<Bytes, BoxError>> + Send>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Box::pin(async move { Ok(Limited::new(body, limit).collect().await?.to_bytes()) })
}

// === MeteredBody ===

/// A metered event stream on its way to the client: every frame passes through the
/// usage meter, and the charge is captured when the stream ends, however it ends.
pub(super) struct MeteredBody {
    state: State,
}

enum State {
    Streaming(Box<Streaming>),
    /// The capture runs in a task of its own, so a client that leaves now cannot
    /// cancel it; `error` is the upstream's, passed on once the charge is done.
    Closing {
        capture: tokio::task::JoinHandle<Option<HeaderMap>>,
        error: Option<BoxError>,
    },
    Done,
}

struct Streaming {
    upstream: Body,
    meter: StreamMeter,
    charger: Charger,
    /// Trailers the upstream sent itself, passed on with the receipt's.
    upstream_trailers: Option<HeaderMap>,
    on_disconnect: OnDisconnect,
    /// How long a stream whose client left is read on (`on_disconnect = "finish"`).
    drain: Duration,
}

impl MeteredBody {
    pub(super) fn new(upstream: Body, charger: Charger, drain: Duration) -> MeteredBody {
        let meter = StreamMeter::new(charger.call.plan.meter, charger.call.strip_usage);
        let on_disconnect = charger.call.plan.on_disconnect;
        MeteredBody {
            state: State::Streaming(Box::new(Streaming {
                upstream,
                meter,
                charger,
                upstream_trailers: None,
                on_disconnect,
                drain,
            })),
        }
    }
}

/// Starts the capture of a stream that ended, at its end or by an upstream error.
fn close(mut s: Box<Streaming>) -> tokio::task::JoinHandle<Option<HeaderMap>> {
    let usage = s.meter.usage();
    let delivered = s.meter.output_tokens();
    let upstream_trailers = s.upstream_trailers.take();
    tokio::spawn(async move {
        let ours = s.charger.charge(usage, delivered).await;
        match (upstream_trailers, ours) {
            (None, t) | (t, None) => t,
            (Some(mut theirs), Some(ours)) => {
                theirs.extend(ours);
                Some(theirs)
            }
        }
    })
}

impl http_body::Body for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Streaming(s) => match Pin::new(&mut s.upstream).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => {
                            let out = s.meter.feed(data);
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(out))));
                            }
                        }
                        Err(frame) => {
                            if let Ok(t) = frame.into_trailers() {
                                s.upstream_trailers.get_or_insert_with(HeaderMap::new).extend(t);
                            }
                        }
                    },
                    Poll::Ready(Some(Err(e))) => {
                        let State::Streaming(s) = std::mem::replace(&mut this.state, State::Done) else {
                            unreachable!("matched above")
                        };
                        this.state = State::Closing { capture: close(s), error: Some(e) };
                    }
                    Poll::Ready(None) => {
                        let rest = s.meter.finish();
                        let State::Streaming(s) = std::mem::replace(&mut this.state, State::Done) else {
                            unreachable!("matched above")
                        };
                        this.state = State::Closing { capture: close(s), error: None };
                        if !rest.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(rest))));
                        }
                    }
                },
                State::Closing { capture, error } => {
                    let trailers = match Pin::new(capture).poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(t) => t.ok().flatten(),
                    };
                    let error = error.take();
                    this.state = State::Done;
                    if let Some(e) = error {
                        return Poll::Ready(Some(Err(e)));
                    }
                    if let Some(t) = trailers.filter(|t| !t.is_empty()) {
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    return Poll::Ready(None);
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }
}

impl Drop for MeteredBody {
    /// The client left (or the response was dropped) before the stream ended.
    fn drop(&mut self) {
        let State::Streaming(s) = std::mem::replace(&mut self.state, State::Done) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime left (shutting down): the grant guard releases the hold.
            return;
        };
        rt.spawn(abandoned(s));
    }
}

/// A stream whose client left: `"finish"` reads the upstream on to its end (within the
/// drain time) and charges what it reports; `"stop"` cancels the upstream request and
/// charges what was delivered.
async fn abandoned(mut s: Box<Streaming>) {
    let request_id = s.charger.ctx.request_id.clone();
    let finish = s.on_disconnect == OnDisconnect::Finish;
    if finish {
        let drained = tokio::time::timeout(s.drain, async {
            while let Some(Ok(frame)) = s.upstream.frame().await {
                if let Ok(data) = frame.into_data() {
                    s.meter.feed(data);
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::info!(request_id = %request_id, "a metered stream whose client left ran past its drain time");
        }
    }
    tracing::info!(request_id = %request_id, on_disconnect = if finish { "finish" } else { "stop" }, "client left a metered stream");
    // Under "stop" only what was delivered is charged, whatever the upstream would
    // have reported for the whole generation.
    let usage = if finish { s.meter.usage() } else { None };
    let delivered = s.meter.output_tokens();
    drop(s.upstream);
    s.charger.charge(usage, delivered).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meter::PerMillion;

    fn call(fixed: u64, hold: u64) -> MeteredCall {
        MeteredCall {
            plan: MeterPlan {
                meter: Meter::OpenAiChat,
                fixed: Micros(fixed),
                max_price: None,
                on_disconnect: OnDisconnect::Finish,
                max_request_bytes: 1024,
                max_response_bytes: 1024,
            },
            model: ModelPrice {
                name: "gpt-4o-mini".into(),
                input: PerMillion(Micros(150_000)),
                cached_input: PerMillion(Micros(75_000)),
                cache_write_input: PerMillion(Micros(150_000)),
                output: PerMillion(Micros(600_000)),
                max_output_tokens: 16_384,
            },
            ask: Ask {
                model: "gpt-4o-mini".into(),
                max_output: Some(100),
                stream: true,
                include_usage: false,
                input_tokens: 20,
            },
            hold: Hold { amount: Micros(hold), input_tokens: 20, output_tokens: 100 },
            strip_usage: true,
            trailers: true,
            note: String::new(),
        }
    }

    #[test]
    fn reported_usage_is_charged_at_the_models_prices_rounded_up_once() {
        let c = call(100, 1_000);
        let usage = Usage { input: 1_000, cached_input: 1_000, cache_write_input: 0, output: 333 };
        // 1000 × 0.15 + 1000 × 0.075 + 333 × 0.60 = 150 + 75 + 199.8 → 425 (ceil of 424.8), + 100 fixed.
        let b = bill(&c, Ending::Answered, Some(usage), 0);
        assert_eq!(b.amount, Micros(525));
        assert!(!b.overrun);
        assert_eq!(b.metered.unwrap().source, UsageSource::Reported);
    }

    #[test]
    fn an_overrun_charges_the_hold_and_says_so() {
        let c = call(0, 300);
        let usage = Usage { input: 0, cached_input: 0, cache_write_input: 0, output: 1_000 };
        let b = bill(&c, Ending::Answered, Some(usage), 0);
        assert_eq!((b.amount, b.overrun), (Micros(300), true));
    }

    #[test]
    fn missing_usage_after_an_answer_is_estimated_from_input_and_delivered_output() {
        let c = call(0, 10_000);
        let b = bill(&c, Ending::Answered, None, 50);
        // 20 input × 0.15 + 50 output × 0.60 = 3 + 30.
        assert_eq!(b.amount, Micros(33));
        let m = b.metered.unwrap();
        assert_eq!(m.source, UsageSource::Estimated);
        assert_eq!((m.usage.input, m.usage.output), (20, 50));
    }

    #[test]
    fn a_failure_without_usage_charges_only_the_fixed_part_or_nothing() {
        let c = call(7, 10_000);
        assert_eq!(bill(&c, Ending::Failed { chargeable: true }, None, 50).amount, Micros(7));
        assert_eq!(bill(&c, Ending::Failed { chargeable: true }, None, 50).metered, None);
        assert_eq!(bill(&c, Ending::Failed { chargeable: false }, None, 50).amount, Micros::ZERO);
        let usage = Usage { input: 100, ..Usage::default() };
        assert_eq!(bill(&c, Ending::Failed { chargeable: false }, Some(usage), 0).amount, Micros::ZERO);
        // A failure that still reported usage (a 400 after generation) is charged for it.
        assert_eq!(bill(&c, Ending::Failed { chargeable: true }, Some(usage), 0).amount, Micros(7 + 15));
    }
}
