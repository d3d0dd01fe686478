//! `[[upstream]]`: where routes forward to.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};

use super::raw::RawUpstream;
use super::values::{parse_duration, parse_headers, HttpUrl, Problems};

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    /// http(s), with a host and without a query.
    pub url: HttpUrl,
    pub connect_timeout: Duration,
    /// Time to the upstream's response head.
    pub timeout: Duration,
    /// Headers added to every request sent to this upstream (e.g. its API key).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// PEM file of CA certificates to trust instead of the web PKI roots.
    pub ca: Option<PathBuf>,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
}

impl UpstreamConfig {
    /// Parses every `[[upstream]]`; `names` collects their names for the routes' check.
    pub(super) fn parse_all<'a>(
        raw: &'a [RawUpstream],
        names: &mut HashSet<&'a str>,
        p: &mut Problems,
    ) -> Option<Vec<UpstreamConfig>> {
        let parsed: Vec<_> = raw.iter().enumerate().map(|(i, u)| UpstreamConfig::parse(i, u, names, p)).collect();
        parsed.into_iter().collect()
    }

    fn parse<'a>(
        i: usize,
        u: &'a RawUpstream,
        names: &mut HashSet<&'a str>,
        p: &mut Problems,
    ) -> Option<UpstreamConfig> {
        let at = format!("upstream[{i}]");
        let mut ok = true;
        if u.name.is_empty() {
            ok = false;
            p.push(format_args!("{at}.name"), "must not be empty");
        } else if !names.insert(u.name.as_str()) {
            ok = false;
            p.push(format_args!("{at}.name"), format_args!("duplicate upstream name {:?}", u.name));
        }
        let url = match HttpUrl::parse(&u.url) {
            Some(url) if url.uri().query().is_some() => {
                p.push(format_args!("{at}.url"), "must not carry a query");
                None
            }
            Some(url) => Some(url),
            None => {
                p.push(format_args!("{at}.url"), format_args!("{:?} is not an http(s) URL with a host", u.url));
                None
            }
        };
        let connect_timeout = p.check(format_args!("{at}.connect_timeout"), parse_duration(&u.connect_timeout));
        let timeout = p.check(format_args!("{at}.timeout"), parse_duration(&u.timeout));
        let pool_idle_timeout = p.check(format_args!("{at}.pool_idle_timeout"), parse_duration(&u.pool_idle_timeout));
        let headers = parse_headers(&format!("{at}.headers"), &u.headers, p);
        if let Some(ca) = &u.ca {
            if !ca.exists() {
                ok = false;
                p.push(format_args!("{at}.ca"), format_args!("file {} does not exist", ca.display()));
            }
        }
        ok.then_some(())?;
        Some(UpstreamConfig {
            name: u.name.clone(),
            url: url?,
            connect_timeout: connect_timeout?,
            timeout: timeout?,
            headers: headers?,
            ca: u.ca.clone(),
            pool_idle_timeout: pool_idle_timeout?,
            pool_max_idle: u.pool_max_idle,
        })
    }
}
