-- The PostgreSQL ledger's schema as the migrations leave it (schema.rs applies it to
-- a new database as migration 1). Amounts are BIGINT micro-units. sqlite/schema.sql
-- describes the same tables and columns, but for `keys.seq` and
-- `transactions.touched_at` (tests/it/postgres.rs checks it).

CREATE TABLE keys (
    -- Creation order, for listings (ids are random). SQLite has its rowid for this.
    seq         BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    id          TEXT PRIMARY KEY,
    secret_hash BYTEA NOT NULL UNIQUE CHECK (length(secret_hash) = 32),
    label       TEXT,
    balance     BIGINT NOT NULL CHECK (balance >= 0),
    revoked     BOOLEAN NOT NULL DEFAULT false,
    created_at  BIGINT NOT NULL DEFAULT floor(extract(epoch FROM now()))::bigint
);

CREATE TABLE transactions (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_id          TEXT NOT NULL REFERENCES keys (id),
    kind            TEXT NOT NULL CHECK (kind IN ('credit', 'debit', 'refund')),
    amount          BIGINT NOT NULL CHECK (amount > 0),
    route           TEXT,
    request_id      TEXT,
    -- A debit is a hold: pending, then captured or released. Others have no status.
    status          TEXT CHECK (
        (kind = 'debit' AND status IS NOT NULL
            AND status IN ('pending', 'captured', 'released'))
        OR (kind <> 'debit' AND status IS NULL)),
    idempotency_key TEXT CHECK (idempotency_key IS NULL OR kind = 'credit'),
    created_at      BIGINT NOT NULL DEFAULT floor(extract(epoch FROM now()))::bigint,
    -- A captured debit's hold, when the capture took less (the rest went back to the
    -- balance with it, no refund row) or was metered; NULL otherwise.
    held                     BIGINT CHECK (held IS NULL OR held >= amount),
    -- What a metered capture was priced from: all NULL for a fixed price.
    model                    TEXT,
    input_tokens             BIGINT CHECK (input_tokens >= 0),
    cached_input_tokens      BIGINT CHECK (cached_input_tokens >= 0),
    cache_write_input_tokens BIGINT CHECK (cache_write_input_tokens >= 0),
    output_tokens            BIGINT CHECK (output_tokens >= 0),
    usage_source             TEXT CHECK (usage_source IN ('reported', 'estimated')),
    -- A pending hold's lease: when the replica holding it last said it is still open
    -- (unix seconds; NULL: not since it was taken). SQLite keeps open holds in memory.
    touched_at               BIGINT
);

-- Listings are ordered by time (`created_at`, then id), with a key or without.
CREATE INDEX transactions_key_id ON transactions (key_id, id);
CREATE INDEX transactions_key_created_id ON transactions (key_id, created_at, id);
CREATE INDEX transactions_created ON transactions (created_at, id);
-- Idempotency keys are looked up across keys: a reuse on another key is a conflict.
CREATE UNIQUE INDEX transactions_idempotency
    ON transactions (key_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX transactions_idempotency_key
    ON transactions (idempotency_key) WHERE idempotency_key IS NOT NULL;
-- The stale-hold sweep's. Captures and releases must not use it (see mod.rs).
CREATE INDEX transactions_pending
    ON transactions (created_at) WHERE kind = 'debit' AND status = 'pending';

-- Payer and nonce are stored lower-cased: hex is case-insensitive.
CREATE TABLE x402_nonces (
    payer        TEXT NOT NULL,
    nonce        TEXT NOT NULL,
    valid_before BIGINT NOT NULL,
    PRIMARY KEY (payer, nonce)
);
CREATE INDEX x402_nonces_valid_before ON x402_nonces (valid_before);

CREATE TABLE settlements (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rail       TEXT NOT NULL,
    payer      TEXT NOT NULL,
    amount     BIGINT NOT NULL CHECK (amount >= 0),
    asset      TEXT NOT NULL,
    network    TEXT NOT NULL,
    tx_hash    TEXT NOT NULL,
    route      TEXT NOT NULL,
    request_id TEXT NOT NULL,
    created_at BIGINT NOT NULL DEFAULT floor(extract(epoch FROM now()))::bigint
);

-- One row, rewritten by ping: readiness proves the database is writable (a read-only
-- standby after a failover is not ready).
CREATE TABLE health (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at BIGINT NOT NULL
);
