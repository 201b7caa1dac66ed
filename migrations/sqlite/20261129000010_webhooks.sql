-- The events feed is the timeline (postbox_events), read in (tx, seq) order. `tx` is 0 on
-- SQLite: one writer commits in seq order. (PostgreSQL sets it to the writing transaction's
-- id, so a reader never passes a row that a slower transaction commits later.)
ALTER TABLE postbox_events ADD COLUMN tx BIGINT NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS postbox_events_feed ON postbox_events (tx, seq);

-- Webhook endpoints: those of the config (source 'config': the secret is resolved at start,
-- never stored) and those added over the API (secret stored). Each keeps its own place in the
-- feed (after_tx, after_seq): events after it are still to be sent.
CREATE TABLE IF NOT EXISTS postbox_webhooks (
    name            TEXT PRIMARY KEY,
    url             TEXT NOT NULL,
    secret          TEXT,
    events          TEXT NOT NULL DEFAULT '',   -- space-separated event types; '' = every type
    tags            TEXT NOT NULL DEFAULT '',   -- space-separated; '' = every email
    source          TEXT NOT NULL,              -- config | api
    after_tx        BIGINT NOT NULL DEFAULT 0,
    after_seq       BIGINT NOT NULL DEFAULT 0,
    failing_since   BIGINT,                     -- unix ms of the first failure since a success
    last_error      TEXT,
    disabled_at     BIGINT,
    disabled_reason TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);

-- One row per (endpoint, event) that was tried: delivered, retrying (next_at) or failed
-- (retries spent).
CREATE TABLE IF NOT EXISTS postbox_webhook_deliveries (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook       TEXT NOT NULL,
    event_seq     BIGINT NOT NULL,
    attempts      BIGINT NOT NULL,
    state         TEXT NOT NULL,               -- delivered | retrying | failed
    next_at       BIGINT,
    response_code BIGINT,
    response      TEXT,
    duration_ms   BIGINT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    UNIQUE (webhook, event_seq)
);
CREATE INDEX IF NOT EXISTS postbox_webhook_deliveries_due
    ON postbox_webhook_deliveries (webhook, next_at) WHERE state = 'retrying';
CREATE INDEX IF NOT EXISTS postbox_webhook_deliveries_updated
    ON postbox_webhook_deliveries (updated_at);
