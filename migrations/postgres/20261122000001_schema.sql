-- postbox's tables on PostgreSQL: the same columns as migrations/sqlite (times are unix ms in
-- BIGINT, flags are 0/1 BIGINT), so one set of statements serves both databases.

CREATE TABLE IF NOT EXISTS postbox_emails (
    id              TEXT PRIMARY KEY NOT NULL,      -- ULID
    status          TEXT NOT NULL,                  -- queued|sending|sent|retrying|failed|cancelled|expired
    priority        TEXT NOT NULL,                  -- high|normal|low
    spec            TEXT NOT NULL,                  -- the validated email as JSON (domain::Email)
    message_id      TEXT NOT NULL,                  -- stable across attempts
    idempotency_key TEXT UNIQUE,
    template        TEXT,
    recipients      TEXT NOT NULL,                  -- space-separated envelope recipients (search)
    tags            TEXT NOT NULL DEFAULT '',       -- space-separated (search)
    attempts        BIGINT NOT NULL DEFAULT 0,
    job_seq         BIGINT NOT NULL DEFAULT 0,
    interrupted     BIGINT NOT NULL DEFAULT 0,
    send_at         BIGINT,
    expires_at      BIGINT,
    age_from        BIGINT NOT NULL,
    next_attempt_at BIGINT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    sent_at         BIGINT,
    request_id      TEXT
);

CREATE INDEX IF NOT EXISTS postbox_emails_status_updated ON postbox_emails (status, updated_at);
CREATE INDEX IF NOT EXISTS postbox_emails_expires ON postbox_emails (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS postbox_emails_status_id ON postbox_emails (status, id);

CREATE TABLE IF NOT EXISTS postbox_events (
    seq          BIGSERIAL PRIMARY KEY,
    email_id     TEXT NOT NULL,
    at           BIGINT NOT NULL,
    kind         TEXT NOT NULL,
    status       TEXT NOT NULL,
    attempt      BIGINT,
    smtp_code    BIGINT,
    smtp_text    TEXT,
    duration_ms  BIGINT,
    detail       TEXT
);

CREATE INDEX IF NOT EXISTS postbox_events_email ON postbox_events (email_id, seq);
CREATE INDEX IF NOT EXISTS postbox_events_at ON postbox_events (at) WHERE kind = 'attempt';

CREATE TABLE IF NOT EXISTS postbox_idempotency (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    response     TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS postbox_idempotency_created ON postbox_idempotency (created_at);

-- The queue depth, kept exact by triggers. Many workers on many hosts change it at once, so it
-- is spread over 16 shard rows (picked by the backend's pid): readers sum them.
CREATE TABLE IF NOT EXISTS postbox_counters (
    name  TEXT NOT NULL,
    shard INTEGER NOT NULL DEFAULT 0,
    n     BIGINT NOT NULL,
    PRIMARY KEY (name, shard)
);

INSERT INTO postbox_counters (name, shard, n)
    SELECT 'depth', s, 0 FROM generate_series(0, 15) AS s
    ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION postbox_depth_change() RETURNS trigger AS $$
DECLARE
    was BOOLEAN := TG_OP <> 'INSERT' AND OLD.status IN ('queued', 'retrying', 'sending');
    now_live BOOLEAN := TG_OP <> 'DELETE' AND NEW.status IN ('queued', 'retrying', 'sending');
BEGIN
    IF was <> now_live THEN
        UPDATE postbox_counters SET n = n + (CASE WHEN now_live THEN 1 ELSE -1 END)
         WHERE name = 'depth' AND shard = pg_backend_pid() % 16;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE TRIGGER postbox_depth AFTER INSERT OR DELETE OR UPDATE OF status ON postbox_emails
    FOR EACH ROW EXECUTE FUNCTION postbox_depth_change();

CREATE TABLE IF NOT EXISTS postbox_mailboxes (
    name            TEXT PRIMARY KEY NOT NULL,
    uidvalidity     BIGINT,
    last_uid        BIGINT NOT NULL DEFAULT 0,
    state           TEXT NOT NULL DEFAULT 'starting',
    idle            BIGINT NOT NULL DEFAULT 0,
    connected_since BIGINT,
    down_since      BIGINT,
    last_poll_at    BIGINT,
    last_error      TEXT,
    scanned         BIGINT NOT NULL DEFAULT 0,
    matched         BIGINT NOT NULL DEFAULT 0,
    alerts          BIGINT NOT NULL DEFAULT 0,
    resyncs         BIGINT NOT NULL DEFAULT 0,
    updated_at      BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS postbox_alert_hits (
    id          BIGSERIAL PRIMARY KEY,
    mailbox     TEXT NOT NULL,
    rule        TEXT NOT NULL,
    group_key   TEXT NOT NULL,
    uidvalidity BIGINT,
    uid         BIGINT,
    fingerprint TEXT NOT NULL,
    seen_at     BIGINT NOT NULL,
    detail      TEXT NOT NULL,
    alert_id    TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS postbox_alert_hits_uid
    ON postbox_alert_hits (mailbox, uidvalidity, uid, rule);
CREATE UNIQUE INDEX IF NOT EXISTS postbox_alert_hits_fingerprint
    ON postbox_alert_hits (mailbox, rule, fingerprint);
CREATE INDEX IF NOT EXISTS postbox_alert_hits_pending
    ON postbox_alert_hits (mailbox, rule, group_key, id) WHERE alert_id IS NULL;

CREATE TABLE IF NOT EXISTS postbox_alert_groups (
    mailbox       TEXT NOT NULL,
    rule          TEXT NOT NULL,
    group_key     TEXT NOT NULL,
    pending       BIGINT NOT NULL DEFAULT 0,
    due_at        BIGINT,
    last_alert_at BIGINT,
    last_alert_id TEXT,
    alerts        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (mailbox, rule, group_key)
);
CREATE INDEX IF NOT EXISTS postbox_alert_groups_due
    ON postbox_alert_groups (due_at) WHERE pending > 0;

-- Leases: one holder per name (a mailbox watcher) across the cluster until expires_at (ms).
CREATE TABLE IF NOT EXISTS postbox_leases (
    name        TEXT PRIMARY KEY NOT NULL,
    holder      TEXT NOT NULL,
    acquired_at BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
