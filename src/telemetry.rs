//! Logging: `tracing` with pretty or JSON output and a `RUST_LOG`-style filter.
//!
//! Secrets never reach a log line: credentials are never put in fields, paths are
//! logged without their query string.

use tracing_subscriber::{fmt, EnvFilter};

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG` wins over the config's filter.
/// Calling it twice is harmless (the second call is ignored).
pub(crate) fn init(cfg: &LogConfig) {
    let filter = std::env::var("RUST_LOG").ok().or_else(|| cfg.filter.clone()).unwrap_or_else(|| "info".to_owned());
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// A request id: a sane incoming `x-request-id` is kept (so ids correlate across
/// proxies), anything else is replaced by a fresh ULID.
pub(crate) fn request_id(incoming: Option<&http::HeaderValue>) -> String {
    match incoming {
        Some(v) if is_sane_request_id(v) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
        _ => ulid::Ulid::new().to_string(),
    }
}

/// Short, and only characters that are safe in logs and headers.
pub(crate) fn is_sane_request_id(v: &http::HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
}

/// Makes the id of a request that came without a sane one: a ULID (sortable by time).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct MakeUlid;

impl tower_http::request_id::MakeRequestId for MakeUlid {
    fn make_request_id<B>(&mut self, _req: &http::Request<B>) -> Option<tower_http::request_id::RequestId> {
        let id = http::HeaderValue::from_str(&ulid::Ulid::new().to_string()).ok()?;
        Some(tower_http::request_id::RequestId::new(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_sane_request_ids_and_replaces_others() {
        let ok = http::HeaderValue::from_static("abc-123_x.y:z");
        assert_eq!(request_id(Some(&ok)), "abc-123_x.y:z");
        let bad = http::HeaderValue::from_static("has space");
        assert_eq!(request_id(Some(&bad)).len(), 26);
        let long = http::HeaderValue::from_str(&"a".repeat(129)).unwrap();
        assert_eq!(request_id(Some(&long)).len(), 26);
        assert_eq!(request_id(None).len(), 26);
    }
}
