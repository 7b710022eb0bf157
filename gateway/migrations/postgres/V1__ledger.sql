-- The cluster ledger (cardgate, backend = "postgres"): what the embedded ledger holds, with
-- the guarantees enforced by the database. Plain SQL of PostgreSQL 13 and later, no
-- extensions. Applied by `cardgate serve` at start (refinery, under an advisory lock).

-- One row per settlement: its intent, then its outcome written over the defaults.
CREATE TABLE settlements (
    seq             bigserial PRIMARY KEY,
    -- The writing transaction: listings page in its order and never pass a transaction
    -- still running (docs/API.md, cursors).
    txid            bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    id              text NOT NULL UNIQUE,
    institution     text NOT NULL,
    terminal        text NOT NULL,
    idempotency_key text NOT NULL,
    request_hash    bytea NOT NULL,
    token_id        bytea,
    quote_id        text,
    card_hash       bytea NOT NULL,
    card_masked     text NOT NULL,
    total_fen       bigint NOT NULL,
    day             text NOT NULL,
    created_at      bigint NOT NULL,
    sealed_request  bytea NOT NULL,
    state           text NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'settled', 'failed', 'unknown', 'reversed')),
    status          integer NOT NULL DEFAULT 0,
    body            text NOT NULL DEFAULT '',
    reversal        text,
    deltas          text NOT NULL DEFAULT '[]',
    payers          jsonb NOT NULL DEFAULT '[]',
    fund_fen        bigint NOT NULL DEFAULT 0,
    account_fen     bigint NOT NULL DEFAULT 0,
    cash_fen        bigint NOT NULL DEFAULT 0,
    updated_at      bigint NOT NULL DEFAULT 0,
    reversed_day    text,
    -- The node completing it (asking its payers) and until when: no other node takes it over
    -- before then.
    lease_owner     text,
    lease_until     timestamptz,
    CONSTRAINT settlements_idempotency_key UNIQUE (institution, idempotency_key)
);
CREATE INDEX settlements_by_day ON settlements (institution, day);
CREATE INDEX settlements_by_reversed_day ON settlements (institution, reversed_day) WHERE reversed_day IS NOT NULL;
CREATE INDEX settlements_unresolved ON settlements (created_at) WHERE state IN ('pending', 'unknown');
CREATE INDEX settlements_listing ON settlements (institution, txid, seq);

-- A token or quote settles once, whichever node sees it: the primary keys decide.
CREATE TABLE used_tokens (token_id bytea PRIMARY KEY, settlement text NOT NULL);
CREATE TABLE used_quotes (quote_id text PRIMARY KEY, settlement text NOT NULL);

-- Each card's year-to-date figures with each payer; changed only if still what was read.
CREATE TABLE accumulators (
    card_hash             bytea NOT NULL,
    year                  integer NOT NULL,
    payer                 text NOT NULL,
    deductible_fen        bigint NOT NULL DEFAULT 0,
    fund_paid_fen         bigint NOT NULL DEFAULT 0,
    eligible_fen          bigint NOT NULL DEFAULT 0,
    account_paid_fen      bigint NOT NULL DEFAULT 0,
    eligible_self_pay_fen bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (card_hash, year, payer)
);

CREATE TABLE quotes (
    id          text PRIMARY KEY,
    institution text NOT NULL,
    expires_at  bigint NOT NULL,
    sealed      bytea NOT NULL
);
