-- The HTTP API: which request created an email, and remembered Idempotency-Key responses.

ALTER TABLE postbox_emails ADD COLUMN request_id TEXT;

-- One row per (scope, key): scope is the API token's name, so two clients never collide.
-- fingerprint: sha256 of method, path and body; response: the JSON of what the first request got.
CREATE TABLE IF NOT EXISTS postbox_idempotency (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    response     TEXT NOT NULL,
    created_at   INTEGER NOT NULL,                  -- unix ms
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS postbox_idempotency_created ON postbox_idempotency (created_at);

-- Stats: attempts in the last minute / hour.
CREATE INDEX IF NOT EXISTS postbox_events_at ON postbox_events (at) WHERE kind = 'attempt';
-- Listing: newest first, filtered by status.
CREATE INDEX IF NOT EXISTS postbox_emails_status_id ON postbox_emails (status, id);
