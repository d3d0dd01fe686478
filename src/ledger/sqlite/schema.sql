-- The SQLite ledger's schema as the migrations leave it (schema.rs applies it to a new
-- database as migration 1). Amounts are integer micro-units. postgres/schema.sql
-- describes the same tables and columns (tests/it/postgres.rs checks it).

CREATE TABLE keys (
    id          TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
    label       TEXT,
    balance     INTEGER NOT NULL CHECK (balance >= 0),
    revoked     INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
    created_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE transactions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id          TEXT NOT NULL REFERENCES keys (id),
    kind            TEXT NOT NULL CHECK (kind IN ('credit', 'debit', 'refund')),
    amount          INTEGER NOT NULL CHECK (amount > 0),
    route           TEXT,
    request_id      TEXT,
    -- A debit is a hold: pending, then captured or released. Others have no status.
    status          TEXT CHECK (
        (kind = 'debit' AND status IS NOT NULL
            AND status IN ('pending', 'captured', 'released'))
        OR (kind <> 'debit' AND status IS NULL)),
    idempotency_key TEXT CHECK (idempotency_key IS NULL OR kind = 'credit'),
    created_at      INTEGER NOT NULL,
    -- A captured debit's hold, when the capture took less (the rest went back to the
    -- balance with it, no refund row) or was metered; NULL otherwise.
    held                     INTEGER CHECK (held IS NULL OR held >= amount),
    -- What a metered capture was priced from: all NULL for a fixed price.
    model                    TEXT,
    input_tokens             INTEGER CHECK (input_tokens >= 0),
    cached_input_tokens      INTEGER CHECK (cached_input_tokens >= 0),
    cache_write_input_tokens INTEGER CHECK (cache_write_input_tokens >= 0),
    output_tokens            INTEGER CHECK (output_tokens >= 0),
    usage_source             TEXT CHECK (usage_source IN ('reported', 'estimated'))
) STRICT;

-- Listings are ordered by time (`created_at`, then id: the id is the rowid, so it is
-- in every index), with a key or without.
CREATE INDEX transactions_key_created ON transactions (key_id, created_at);
CREATE INDEX transactions_created ON transactions (created_at);
-- Idempotency keys are looked up across keys: a reuse on another key is a conflict.
CREATE UNIQUE INDEX transactions_idempotency
    ON transactions (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX transactions_idempotency_key
    ON transactions (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX transactions_pending
    ON transactions (created_at) WHERE kind = 'debit' AND status = 'pending';

-- Payer and nonce are stored lower-cased: hex is case-insensitive.
CREATE TABLE x402_nonces (
    payer        TEXT NOT NULL,
    nonce        TEXT NOT NULL,
    valid_before INTEGER NOT NULL,
    PRIMARY KEY (payer, nonce)
) STRICT, WITHOUT ROWID;
CREATE INDEX x402_nonces_valid_before ON x402_nonces (valid_before);

CREATE TABLE settlements (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    rail       TEXT NOT NULL,
    payer      TEXT NOT NULL,
    amount     INTEGER NOT NULL CHECK (amount >= 0),
    asset      TEXT NOT NULL,
    network    TEXT NOT NULL,
    tx_hash    TEXT NOT NULL,
    route      TEXT NOT NULL,
    request_id TEXT NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

-- One row, rewritten by ping: readiness proves the database is writable.
CREATE TABLE health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at INTEGER NOT NULL
) STRICT;
