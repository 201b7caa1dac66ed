-- Operator pauses: no email for this relay, recipient domain or tag is sent while one exists.
-- (Rate limits live in the one process's memory on SQLite.)
CREATE TABLE postbox_pauses (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    reason TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (kind, value)
);

-- The stall alert's state: raised (since when, why) and when it was last sent.
CREATE TABLE postbox_alert_state (
    name TEXT PRIMARY KEY,
    raised_at INTEGER NOT NULL,
    last_sent_at INTEGER NOT NULL,
    reason TEXT NOT NULL
);
