//! Header hygiene for forwarding.
//!
//! RFC 9110 §7.6.1: "Intermediaries MUST parse a received Connection header field
//! before a message is forwarded and, for each connection-option in this field, remove
//! any header or trailer field(s) from the message with the same name as the
//! connection-option, and then remove the Connection header field itself (or replace it
//! with the intermediary's own control options for the forwarded message)."
//! The fields that are hop-by-hop by definition are removed too.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Fields that only ever describe one connection (RFC 9110 §7.6.1, RFC 9112 §9.6,
/// plus the non-standard ones clients still send).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Request fields that make origins run another method or serve another path than
/// the request line says (Rails, Laravel, Symfony, ASP.NET, IIS URL Rewrite, Spring…).
/// tollgate priced the request line, so these never reach an upstream.
pub(crate) const OVERRIDES: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-method",
    "x-original-url",
    "x-rewrite-url",
];

/// Removes hop-by-hop fields and those named in `Connection`.
/// `TE: trailers` is kept: it is the one TE value an end-to-end trailer exchange needs.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let keep_te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for name in named {
        if name != header::TE {
            headers.remove(&name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    if keep_te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// The `Upgrade` protocol a request asks for, if it is an HTTP/1.1 upgrade request
/// (`Connection: upgrade` plus `Upgrade: <proto>`).
pub(crate) fn upgrade_request(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Turns an upgrade request into a plain one (the route does not allow its protocol).
pub(crate) fn drop_upgrade(headers: &mut HeaderMap) {
    headers.remove(header::CONNECTION);
    headers.remove(header::UPGRADE);
}

/// Who sent the request, as far as the configured trusted proxies let us tell.
#[derive(Debug, Clone)]
pub(crate) struct TrustedProxies(Vec<ipnet::IpNet>);

impl TrustedProxies {
    pub(crate) fn new(nets: Vec<ipnet::IpNet>) -> Self {
        TrustedProxies(nets)
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client address: the peer, or — when the peer is a trusted proxy — the
    /// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
    pub(crate) fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for e in entries.iter().rev() {
            match e.parse::<IpAddr>() {
                Ok(ip) => {
                    client = canonical(ip);
                    if !self.contains(client) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }

    /// Sets `X-Forwarded-For/-Proto/-Host`. From an untrusted peer, whatever it sent is
    /// replaced; from a trusted proxy, its values are kept and the peer appended.
    ///
    /// `X-Forwarded-Host` is the `Host` the client sent, port included (as Go's
    /// `ReverseProxy`, Traefik and Envoy do), so an upstream can rebuild its public
    /// URLs; `host` is used only when the request has no `Host` field.
    pub(crate) fn set_forwarded(&self, headers: &mut HeaderMap, peer: IpAddr, proto: &'static str, host: Option<&str>) {
        let peer = canonical(peer);
        let trusted = self.contains(peer);
        let xff = if trusted {
            let prior: Vec<&str> = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
            if prior.is_empty() {
                peer.to_string()
            } else {
                format!("{}, {peer}", prior.join(", "))
            }
        } else {
            peer.to_string()
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            headers.insert("x-forwarded-for", v);
        }
        if !(trusted && headers.contains_key("x-forwarded-proto")) {
            headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
        }
        if !(trusted && headers.contains_key("x-forwarded-host")) {
            let original = headers.get(header::HOST).filter(|h| !h.is_empty()).cloned();
            match original.or_else(|| host.and_then(|h| HeaderValue::from_str(h).ok())) {
                Some(h) => {
                    headers.insert("x-forwarded-host", h);
                }
                None => {
                    headers.remove("x-forwarded-host");
                }
            }
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_fields() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic eA=="),
            ("te", "trailers, deflate"),
            ("upgrade", "h2c"),
            ("x-end-to-end", "kept"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-end-to-end"], "kept");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn untrusted_peer_cannot_spoof_forwarded_for() {
        let tp = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let mut h = map(&[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-proto", "https")]);
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(tp.client_ip(peer, &h), peer);
        tp.set_forwarded(&mut h, peer, "http", Some("api.example.com"));
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
    }

    #[test]
    fn forwarded_host_is_the_client_host_with_its_port() {
        let tp = TrustedProxies::new(Vec::new());
        let mut h = map(&[("host", "API.example.com:8443"), ("x-forwarded-host", "evil.test")]);
        tp.set_forwarded(&mut h, "203.0.113.9".parse().unwrap(), "https", Some("api.example.com"));
        assert_eq!(h["x-forwarded-host"], "API.example.com:8443");
    }

    #[test]
    fn trusted_proxy_chain_is_kept_and_extended() {
        let tp = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let mut h = map(&[("x-forwarded-for", "198.51.100.7, 10.0.0.2"), ("x-forwarded-proto", "https")]);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(tp.client_ip(peer, &h), "198.51.100.7".parse::<IpAddr>().unwrap());
        tp.set_forwarded(&mut h, peer, "http", Some("x"));
        assert_eq!(h["x-forwarded-for"], "198.51.100.7, 10.0.0.2, 10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
