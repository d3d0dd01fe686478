//! `[server]`, `[admin]`, `[ledger]` and `[log]`: the process-wide sections.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::raw::{RawAdmin, RawLedger, RawServer};
use super::values::{at_least, parse_duration, parse_net, HttpUrl, Problems};

// === [server] ===

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Base of resource URLs in challenges.
    pub public_url: Option<HttpUrl>,
    pub tls: Option<TlsConfig>,
    /// Whose `X-Forwarded-For` to trust.
    pub trusted_proxies: Vec<IpNet>,
    /// Time a client has to send a complete request head.
    pub header_read_timeout: Duration,
    /// Largest request head accepted; larger is answered with 431.
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// A client connection with no request in flight for this long is closed
    /// (HTTP/2: GOAWAY, then close), so idle clients cannot keep connection slots.
    pub idle_timeout: Duration,
    /// Requests one HTTP/2 connection may have in flight at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`, RFC 9113 §6.5.2).
    pub http2_max_concurrent_streams: u32,
    /// How long SIGTERM waits for in-flight requests before closing connections.
    pub shutdown_timeout: Duration,
    /// Tokio worker threads; default is one per core.
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServerConfig {
    pub(super) fn parse(raw: RawServer, p: &mut Problems) -> Option<ServerConfig> {
        let listen = p.check(
            "server.listen",
            raw.listen
                .parse::<SocketAddr>()
                .map_err(|e| format!("{:?} is not an address like \"0.0.0.0:8080\" ({e})", raw.listen)),
        );
        let public_url = match &raw.public_url {
            None => Some(None),
            Some(u) => {
                p.check("server.public_url", HttpUrl::parse(u).ok_or(format!("{u:?} is not an http(s) URL"))).map(Some)
            }
        };
        let trusted: Vec<_> = raw
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, s)| p.check(format_args!("server.trusted_proxies[{i}]"), parse_net(s)))
            .collect();
        let header_read_timeout = p.check("server.header_read_timeout", parse_duration(&raw.header_read_timeout));
        let shutdown_timeout = p.check("server.shutdown_timeout", parse_duration(&raw.shutdown_timeout));
        let max_header_bytes = p.check(
            "server.max_header_bytes",
            at_least(raw.max_header_bytes, 8192).map_err(|_| "must be at least 8192".to_owned()),
        );
        let max_connections = p.check("server.max_connections", at_least(raw.max_connections, 1));
        let idle_timeout = p.check(
            "server.idle_timeout",
            parse_duration(&raw.idle_timeout).and_then(|d| {
                if d.is_zero() {
                    Err("must be above zero".to_owned())
                } else {
                    Ok(d)
                }
            }),
        );
        let http2_max_concurrent_streams =
            p.check("server.http2_max_concurrent_streams", at_least(raw.http2_max_concurrent_streams, 1));
        let worker_threads = match raw.worker_threads {
            None => Some(None),
            Some(n) => p.check("server.worker_threads", at_least(n, 1)).map(Some),
        };
        let tls = match raw.tls {
            None => Some(None),
            Some(t) => {
                let mut ok = true;
                for (k, path) in [("cert", &t.cert), ("key", &t.key)] {
                    if !path.exists() {
                        ok = false;
                        p.push(format_args!("server.tls.{k}"), format_args!("file {} does not exist", path.display()));
                    }
                }
                ok.then_some(Some(TlsConfig { cert: t.cert, key: t.key }))
            }
        };
        Some(ServerConfig {
            listen: listen?,
            public_url: public_url?,
            tls: tls?,
            trusted_proxies: trusted.into_iter().collect::<Option<_>>()?,
            header_read_timeout: header_read_timeout?,
            max_header_bytes: max_header_bytes?,
            max_connections: max_connections?,
            idle_timeout: idle_timeout?,
            http2_max_concurrent_streams: http2_max_concurrent_streams?,
            shutdown_timeout: shutdown_timeout?,
            worker_threads: worker_threads?,
        })
    }
}

// === [admin] ===

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token of the admin API; without it the API is off.
    pub token: Option<String>,
}

impl AdminConfig {
    pub(super) fn parse(raw: RawAdmin, p: &mut Problems) -> Option<AdminConfig> {
        let listen = p.check(
            "admin.listen",
            raw.listen.parse::<SocketAddr>().map_err(|e| format!("{:?} is not an address ({e})", raw.listen)),
        );
        let token = match raw.token {
            Some(t) if t.len() < 16 => {
                p.push("admin.token", "must be at least 16 characters");
                None
            }
            t => Some(t),
        };
        Some(AdminConfig { listen: listen?, token: token? })
    }
}

// === [ledger] ===

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LedgerBackend {
    Sqlite,
    Postgres,
}

/// SQLite durability: "normal" survives a killed process (every acknowledged
/// transaction is in the WAL); "full" also survives power loss, at an fsync per batch.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Normal,
    Full,
}

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub backend: LedgerBackend,
    /// SQLite file.
    pub path: PathBuf,
    /// PostgreSQL URL; always set when `backend` is `Postgres`.
    pub url: Option<String>,
    pub pool_size: usize,
    pub statement_timeout: Duration,
    pub synchronous: Synchronous,
}

impl LedgerConfig {
    pub(super) fn parse(raw: RawLedger, p: &mut Problems) -> Option<LedgerConfig> {
        let statement_timeout = p.check("ledger.statement_timeout", parse_duration(&raw.statement_timeout));
        let url = match (raw.backend, raw.url) {
            (LedgerBackend::Postgres, None) => {
                p.push("ledger.url", "required when backend = \"postgres\"");
                None
            }
            (LedgerBackend::Postgres, Some(u)) if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) => {
                p.push("ledger.url", "must start with postgres://");
                None
            }
            (_, url) => Some(url),
        };
        let pool_size = p.check("ledger.pool_size", at_least(raw.pool_size, 1));
        Some(LedgerConfig {
            backend: raw.backend,
            path: raw.path,
            url: url?,
            pool_size: pool_size?,
            statement_timeout: statement_timeout?,
            synchronous: raw.synchronous,
        })
    }
}

// === [log] ===

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// `[log]` needs no parsing beyond serde's.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// `RUST_LOG`-style filter; the `RUST_LOG` variable wins when set.
    pub filter: Option<String>,
}
