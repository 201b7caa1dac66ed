-- postbox's own tables. apalis keeps its jobs in `Jobs` (its own migrations); the link from an
-- email to its live job is the job's idempotency key: '<email id>:<job_seq>'.

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
    attempts        INTEGER NOT NULL DEFAULT 0,     -- attempts since submission or manual retry
    job_seq         INTEGER NOT NULL DEFAULT 0,     -- which job currently owns this email
    interrupted     INTEGER NOT NULL DEFAULT 0,     -- the last claim found a send in flight (crash)
    send_at         INTEGER,                        -- unix ms
    expires_at      INTEGER,                        -- unix ms
    age_from        INTEGER NOT NULL,               -- unix ms; retry.max_age counts from here
    next_attempt_at INTEGER,                        -- unix ms, while retrying
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    sent_at         INTEGER
);

CREATE INDEX IF NOT EXISTS postbox_emails_status_updated ON postbox_emails (status, updated_at);
CREATE INDEX IF NOT EXISTS postbox_emails_expires ON postbox_emails (expires_at) WHERE expires_at IS NOT NULL;

-- The timeline: one row per attempt and per transition that is not implied by an attempt.
CREATE TABLE IF NOT EXISTS postbox_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    email_id     TEXT NOT NULL,
    at           INTEGER NOT NULL,                  -- unix ms
    kind         TEXT NOT NULL,                     -- attempt|interrupted|cancelled|expired|requeued
    status       TEXT NOT NULL,                     -- the email's status after this event
    attempt      INTEGER,
    smtp_code    INTEGER,
    smtp_text    TEXT,
    duration_ms  INTEGER,
    detail       TEXT
);

CREATE INDEX IF NOT EXISTS postbox_events_email ON postbox_events (email_id, seq);
