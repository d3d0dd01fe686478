//! The PostgreSQL ledger's connections: the `deadpool` pool and its connector (which
//! sets the server-side timeouts on every new connection), the client-side bound on
//! each operation, and what PostgreSQL errors mean to a caller (fail closed on
//! `Unavailable`). The module docs of [`super`] say why.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use deadpool_postgres::{Object, PoolError};
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};
use tokio_postgres::{Client, Config as PgConfig, NoTls};

use super::PostgresLedger;
use crate::ledger::{LedgerError, Result};

// === impl PostgresLedger ===

impl PostgresLedger {
    /// Runs `op` on a pooled connection within the operation timeout. A connection whose
    /// operation timed out is discarded rather than returned to the pool.
    pub(super) async fn run<T>(&self, op: impl AsyncFnOnce(&mut Object) -> Result<T>) -> Result<T> {
        let deadline = Instant::now() + self.op_timeout;
        let mut client = match timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(self.pool_error(e)),
            Err(_) => return Err(self.pool_busy()),
        };
        match timeout_at(deadline, op(&mut client)).await {
            Ok(result) => result,
            Err(_) => {
                // Dropping the detached connection closes it; the server rolls back
                // whatever it was doing.
                drop(Object::take(client));
                Err(self.too_slow())
            }
        }
    }

    pub(super) fn too_slow(&self) -> LedgerError {
        LedgerError::Unavailable(format!(
            "PostgreSQL at {} did not answer within {:?}; paid requests are refused until it does",
            self.target, self.op_timeout
        ))
    }

    fn pool_busy(&self) -> LedgerError {
        LedgerError::Unavailable(format!(
            "no connection to PostgreSQL at {} became free within {:?} (all {} in use, or connecting is \
             slow); raise ledger.pool_size or look for slow statements",
            self.target,
            self.op_timeout,
            self.pool.status().max_size
        ))
    }

    pub(super) fn pool_error(&self, e: PoolError) -> LedgerError {
        let why = match e {
            PoolError::Backend(e) => match LedgerError::from(e) {
                LedgerError::Unavailable(m) | LedgerError::Other(m) => m,
                other => other.to_string(),
            },
            PoolError::Timeout(_) => return self.pool_busy(),
            other => other.to_string(),
        };
        LedgerError::Unavailable(format!(
            "cannot connect to PostgreSQL at {}: {why}; is it running and reachable?",
            self.target
        ))
    }
}

/// `host:port/dbname` of the first host, for messages: never the password.
pub(super) fn describe(pg: &PgConfig) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let db = pg.get_dbname().or(pg.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// Opens connections for the pool and sets the per-connection timeouts.
pub(super) struct Connector {
    pub(super) statement_timeout: Duration,
    pub(super) idle_timeout: Duration,
}

pub(super) type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = std::result::Result<(Client, JoinHandle<()>), tokio_postgres::Error>> + Send + 'a>>;

impl deadpool_postgres::Connect for Connector {
    fn connect(&self, pg: &PgConfig) -> ConnectFuture<'_> {
        let pg = pg.clone();
        let settings = format!(
            "SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {}",
            self.statement_timeout.as_millis(),
            self.idle_timeout.as_millis()
        );
        Box::pin(async move {
            let (client, connection) = pg.connect(NoTls).await?;
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "PostgreSQL connection closed");
                }
            });
            if let Err(e) = client.batch_execute(&settings).await {
                task.abort();
                return Err(e);
            }
            Ok((client, task))
        })
    }
}

/// PostgreSQL errors that mean the store cannot do its job right now (fail closed and
/// let readiness report it) are `Unavailable`; a bigint overflow is `Overflow`; the
/// rest (constraint violations, bugs) are `Other`.
impl From<tokio_postgres::Error> for LedgerError {
    fn from(e: tokio_postgres::Error) -> LedgerError {
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let msg = format!("PostgreSQL: {} (SQLSTATE {code})", db.message());
            return if code == "22003" {
                LedgerError::Overflow
            } else if transient(code) {
                LedgerError::Unavailable(msg)
            } else {
                LedgerError::Other(msg)
            };
        }
        let source = std::error::Error::source(&e);
        let msg = match source {
            Some(s) => format!("PostgreSQL: {e}: {s}"),
            None => format!("PostgreSQL: {e}"),
        };
        let io = source.is_some_and(|s| s.is::<std::io::Error>());
        if e.is_closed() || io || e.to_string() == "timeout waiting for server" {
            LedgerError::Unavailable(msg)
        } else {
            LedgerError::Other(msg)
        }
    }
}

/// SQLSTATE classes and codes that a retry later may cure.
pub(super) fn transient(code: &str) -> bool {
    // 08 connection exception, 40 transaction rollback (serialization, deadlock),
    // 53 insufficient resources, 57 operator intervention (statement timeout,
    // shutdown, database starting), 58 system error (I/O).
    matches!(code.get(..2), Some("08" | "40" | "53" | "57" | "58"))
        // lock_not_available, read_only_sql_transaction (a standby after failover)
        || matches!(code, "55P03" | "25006")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_sqlstates_are_unavailable() {
        for code in ["57014", "57P01", "57P03", "08006", "53300", "40001", "40P01", "55P03", "25006", "58030"] {
            assert!(transient(code), "{code}");
        }
        for code in ["23505", "23514", "42P01", "22P02", "XX000"] {
            assert!(!transient(code), "{code}");
        }
    }

    #[test]
    fn messages_never_show_the_password() {
        let pg: PgConfig = "postgres://tollgate:s3cret@db.internal:6432/ledger".parse().unwrap();
        assert_eq!(describe(&pg), "db.internal:6432/ledger");
    }
}
