//! The innermost service of the request stack: sends a routed request to its route's
//! upstream. Failures are typed ([`ProxyError`]) so that the payment layer can decide
//! a charge by them and the gateway can render them.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::Service;

use super::{ProxyError, ReqBody, Upstream};
use crate::route::RequestCtx;
use crate::Body;

/// The configured upstreams by name; one per config snapshot.
#[derive(Clone, Debug)]
pub(crate) struct Forward {
    upstreams: Arc<HashMap<Arc<str>, Arc<Upstream>>>,
}

impl Forward {
    pub(crate) fn new(upstreams: HashMap<Arc<str>, Arc<Upstream>>) -> Forward {
        Forward { upstreams: Arc::new(upstreams) }
    }
}

impl Service<Request<ReqBody>> for Forward {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let upstreams = self.upstreams.clone();
        Box::pin(async move {
            let ctx = req.extensions().get::<Arc<RequestCtx>>().cloned().ok_or(ProxyError::Unrouted)?;
            let upstream = upstreams.get(&ctx.route.upstream).cloned().ok_or(ProxyError::Unrouted)?;
            upstream.forward(req, ctx.route.strip_prefix.as_deref()).await
        })
    }
}
