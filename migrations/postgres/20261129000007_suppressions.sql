-- The `suppressed` status (every recipient on the suppression list: not sent) in the counters.
INSERT INTO postbox_counters (name, shard, n)
    SELECT 'status:suppressed:' || p, g, 0
      FROM unnest(ARRAY['high', 'normal', 'low']) AS p, generate_series(0, 15) AS g
    ON CONFLICT DO NOTHING;

-- Addresses postbox does not send to. `address` is the lowercased addr-spec.
CREATE TABLE IF NOT EXISTS postbox_suppressions (
    address      TEXT PRIMARY KEY,
    reason       TEXT NOT NULL,          -- hard_bounce | complaint | manual | unsubscribe
    source_email TEXT,                   -- the email whose bounce or complaint put it here
    detail       TEXT,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT                  -- NULL: until removed
);
CREATE INDEX IF NOT EXISTS postbox_suppressions_created ON postbox_suppressions (created_at);

-- Soft bounces per address, counted in a window: enough of them suppress it.
CREATE TABLE IF NOT EXISTS postbox_soft_bounces (
    address TEXT NOT NULL,
    at      BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS postbox_soft_bounces_address ON postbox_soft_bounces (address, at);

-- Every bounce or complaint report read from a bounce mailbox, matched to an email or not.
CREATE TABLE IF NOT EXISTS postbox_bounce_reports (
    id          BIGSERIAL PRIMARY KEY,
    mailbox     TEXT NOT NULL,
    kind        TEXT NOT NULL,           -- hard | soft | complaint
    recipient   TEXT NOT NULL,
    status      TEXT,                    -- the enhanced status code (5.1.1)
    diagnostic  TEXT,
    email_id    TEXT,                    -- NULL: matched no email (kept, visible)
    format      TEXT NOT NULL,           -- dsn | arf | heuristic
    created_at  BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS postbox_bounce_reports_created ON postbox_bounce_reports (created_at);
