-- Operator pauses: no email for this relay, recipient domain or tag is sent while one exists.
-- (Rate limits live in the one process's memory on SQLite.)
CREATE TABLE postbox_pauses (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    reason TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (kind, value)
);
