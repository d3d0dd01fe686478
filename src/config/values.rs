//! Value parsers shared by every config section, and the collector that lets one run
//! report every problem with its key path.
//!
//! A section's parser calls these on its raw strings, pushes each failure into
//! [`Problems`] under the key it came from, and builds its typed form only when none of
//! its own keys failed.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::Uri;
use ipnet::IpNet;

// === Problems ===

/// Every problem found so far, each as `key.path: message`.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn push(&mut self, path: impl fmt::Display, msg: impl fmt::Display) {
        self.0.push(format!("{path}: {msg}"));
    }

    /// Keeps the value of `r`, or records its error under `path`.
    pub fn check<T>(&mut self, path: impl fmt::Display, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| self.push(path, e)).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0
    }
}

/// `n`, unless it is below `min` ("must be at least {min}").
pub fn at_least<N: PartialOrd + std::fmt::Display>(n: N, min: N) -> Result<N, String> {
    if n < min {
        Err(format!("must be at least {min}"))
    } else {
        Ok(n)
    }
}

// === durations, rates, networks ===

/// Parses a human duration such as `"2s"`, `"150ms"`, `"1m 30s"`.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v).map_err(|e| format!("{v:?} is not a duration like \"2s\" or \"500ms\" ({e})"))
}

/// Parses an IP address or CIDR block.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
        .ok_or_else(|| format!("{s:?} is not an IP address or CIDR block"))
}

/// A request rate: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// Parses a rate such as `"10/s"`, `"100/min"`, `"5000/hour"`.
pub fn parse_rate(v: &str) -> Result<Rate, String> {
    let bad = || format!("{v:?} is not a rate like \"10/s\", \"100/min\" or \"1000/hour\"");
    let (n, per) = v.split_once('/').ok_or_else(bad)?;
    let count: u32 = n.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err(format!("{v:?}: the count must be at least 1"));
    }
    let per = match per.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        _ => return Err(bad()),
    };
    Ok(Rate { count, per })
}

// === URLs and headers ===

/// An `http://` or `https://` URL with a host, parsed, that still displays as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    text: String,
    uri: Uri,
}

impl HttpUrl {
    /// `None` unless `s` is an absolute http(s) URL with a host.
    pub fn parse(s: &str) -> Option<HttpUrl> {
        let uri: Uri = s.parse().ok()?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
            return None;
        }
        Some(HttpUrl { text: s.to_owned(), uri })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Parses a `name = value` table of headers; each problem is reported under
/// `{at}.{name}`.
pub fn parse_headers<'a>(
    at: &str,
    raw: impl IntoIterator<Item = (&'a String, &'a String)>,
    problems: &mut Problems,
) -> Option<Vec<(HeaderName, HeaderValue)>> {
    let before = problems.len();
    let mut out = Vec::new();
    for (k, v) in raw {
        let name = HeaderName::from_bytes(k.as_bytes());
        if name.is_err() {
            problems.push(format_args!("{at}.{k}"), "is not a valid header name");
        }
        let value = HeaderValue::from_str(v);
        if value.is_err() {
            problems.push(format_args!("{at}.{k}"), "value is not a valid header value");
        }
        if let (Ok(n), Ok(v)) = (name, value) {
            out.push((n, v));
        }
    }
    (problems.len() == before).then_some(out)
}
