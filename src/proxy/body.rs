//! The request body type of the stack below the route step: the client's body as it
//! streams in, or a body the gateway read whole and may have rewritten (a metered
//! request, whose model and output maximum are read before it is priced).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

/// See the module docs. An enum rather than a boxed body: the streaming case, every
/// fixed-price and free request, costs no allocation.
#[derive(Debug)]
pub enum ReqBody {
    /// Streams from the client to the upstream untouched.
    Incoming(Incoming),
    /// Read whole by the gateway (`None` once sent).
    Buffered(Option<Bytes>),
}

impl From<Incoming> for ReqBody {
    fn from(b: Incoming) -> ReqBody {
        ReqBody::Incoming(b)
    }
}

impl From<Bytes> for ReqBody {
    fn from(b: Bytes) -> ReqBody {
        ReqBody::Buffered(Some(b))
    }
}

impl http_body::Body for ReqBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ReqBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            ReqBody::Buffered(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Incoming(b) => b.is_end_stream(),
            ReqBody::Buffered(b) => b.as_ref().is_none_or(|b| b.is_empty()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Incoming(b) => b.size_hint(),
            ReqBody::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
