//! The payment gate as a tower layer (see the module docs of `payment`).
//!
//! Shaped like tower-http's `AsyncRequireAuthorization`: the service either calls the
//! inner service with the verified payment in the request's extensions, or answers
//! with the refusal itself. The inner service is never called for an unpaid request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service};

pub use super::gate::PaymentGate;
use crate::proxy::{ProxyError, ReqBody};
use crate::Body;

// === impl PaymentLayer ===

#[derive(Clone, Debug)]
pub struct PaymentLayer {
    gate: Arc<PaymentGate>,
}

impl PaymentLayer {
    pub fn new(gate: Arc<PaymentGate>) -> PaymentLayer {
        PaymentLayer { gate }
    }
}

impl<S> Layer<S> for PaymentLayer {
    type Service = PaymentService<S>;
    fn layer(&self, inner: S) -> PaymentService<S> {
        PaymentService { gate: self.gate.clone(), inner }
    }
}

// === impl PaymentService ===

#[derive(Clone, Debug)]
pub struct PaymentService<S> {
    gate: Arc<PaymentGate>,
    inner: S,
}

impl<S> Service<Request<ReqBody>> for PaymentService<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>, Error = ProxyError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The clone is the one polled ready; the original stays for the next call.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let gate = self.gate.clone();
        Box::pin(gate.handle(req, inner))
    }
}

#[cfg(test)]
mod tests {
    //! The layer against a `tower-test` mock: the inner service is never called for an
    //! unpaid request, and is called exactly once for a paid one.

    use std::net::{IpAddr, Ipv4Addr};

    use tower_test::mock;

    use tower::ServiceExt;

    use super::*;
    use crate::config::Config;
    use crate::ledger::sqlite::{SqliteLedger, SqliteOptions};
    use crate::ledger::Ledger;
    use crate::metrics::Metrics;
    use crate::payment::rails::credits::Credits;
    use crate::payment::{Paid, Rails};
    use crate::route::{RequestCtx, RouteTable};

    const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
public_url = "https://api.test"
[[upstream]]
name = "api"
url = "http://127.0.0.1:9"
[[route]]
name = "chat"
upstream = "api"
path = "/v1/*"
price = "0.5"
accept = ["credits"]
[[route]]
name = "free"
upstream = "api"
path = "/free"
free = true
"#;

    /// The mock's errors as the forwarder's.
    fn mock_error(e: tower::BoxError) -> ProxyError {
        ProxyError::Upstream { upstream: "mock".into(), source: e }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        ledger: Arc<dyn Ledger>,
        layer: PaymentLayer,
        routes: RouteTable,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ledger: Arc<dyn Ledger> =
            Arc::new(SqliteLedger::open(&dir.path().join("l.db"), SqliteOptions::default()).unwrap());
        let cfg = Config::parse(CONFIG, |_| None).unwrap();
        let metrics = Arc::new(Metrics::new());
        let rails = Rails::new(vec![Arc::new(Credits::new(&cfg.credits, ledger.clone(), metrics.clone()))]);
        let routes = RouteTable::new(&cfg);
        let gate = PaymentGate::new(&cfg, &routes, rails, &metrics);
        Fixture { _dir: dir, ledger, layer: PaymentLayer::new(Arc::new(gate)), routes }
    }

    fn request(fx: &Fixture, path: &str, auth: Option<&str>) -> Request<ReqBody> {
        let mut req = Request::builder().uri(path);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let mut req = req.body(ReqBody::from(bytes::Bytes::new())).unwrap();
        let route = fx.routes.resolve(None, &http::Method::GET, path).unwrap().route;
        req.extensions_mut().insert(Arc::new(RequestCtx {
            request_id: "rid-1".into(),
            route,
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }));
        req
    }

    #[tokio::test]
    async fn inner_service_is_never_called_without_payment() {
        let fx = fixture();
        let (svc, mut handle) = mock::pair::<Request<ReqBody>, Response<Body>>();
        let mut svc = fx.layer.layer(svc.map_err(mock_error));
        for auth in [None, Some("Bearer nope"), Some(&*format!("Bearer tg_live_{}", "0".repeat(40)))] {
            handle.allow(1);
            let res = svc.ready().await.unwrap().call(request(&fx, "/v1/x", auth)).await.unwrap();
            assert_eq!(res.status(), http::StatusCode::PAYMENT_REQUIRED);
            assert!(handle.poll_request().is_pending(), "inner service called for an unpaid request");
        }
        // A key with too little money: refused, and nothing held.
        let k = fx.ledger.create_key(None, crate::money::Micros(1)).await.unwrap();
        handle.allow(1);
        let auth = format!("Bearer {}", k.key);
        let res = svc.ready().await.unwrap().call(request(&fx, "/v1/x", Some(&auth))).await.unwrap();
        assert_eq!(res.status(), http::StatusCode::PAYMENT_REQUIRED);
        assert!(handle.poll_request().is_pending());
    }

    #[tokio::test]
    async fn paid_request_reaches_inner_once_with_payment_in_extensions() {
        let fx = fixture();
        let k = fx.ledger.create_key(None, crate::money::Micros(1_000_000)).await.unwrap();
        let (svc, mut handle) = mock::pair::<Request<ReqBody>, Response<Body>>();
        let mut svc = fx.layer.layer(svc.map_err(mock_error));
        handle.allow(1);
        let auth = format!("Bearer {}", k.key);
        let fut = svc.ready().await.unwrap().call(request(&fx, "/v1/x", Some(&auth)));
        let task = tokio::spawn(fut);
        let (req, send) = handle.next_request().await.unwrap();
        let paid = req.extensions().get::<Paid>().expect("verified payment in extensions");
        assert_eq!(paid.rail, "credits");
        assert_eq!(paid.payer, k.id);
        assert!(req.headers().get("authorization").is_none());
        send.send_response(Response::new(crate::empty()));
        let res = task.await.unwrap().unwrap();
        assert_eq!(res.headers()["x-tollgate-charged"], "0.50 USD");
        assert!(handle.poll_request().is_pending(), "called exactly once");
        assert_eq!(fx.ledger.key(&k.id).await.unwrap().unwrap().balance, crate::money::Micros(500_000));
    }

    #[tokio::test]
    async fn free_routes_pass_straight_through() {
        let fx = fixture();
        let (svc, mut handle) = mock::pair::<Request<ReqBody>, Response<Body>>();
        let mut svc = fx.layer.layer(svc.map_err(mock_error));
        handle.allow(1);
        let task = tokio::spawn(svc.ready().await.unwrap().call(request(&fx, "/free", None)));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(Response::new(crate::empty()));
        assert_eq!(task.await.unwrap().unwrap().status(), http::StatusCode::OK);
    }
}
