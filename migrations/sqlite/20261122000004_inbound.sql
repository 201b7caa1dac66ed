-- The IMAP watcher: where each mailbox is, what its rules matched, and the alert groups.

-- One row per watched mailbox: the position (UIDVALIDITY, last UID processed) and its health.
CREATE TABLE IF NOT EXISTS postbox_mailboxes (
    name            TEXT PRIMARY KEY NOT NULL,
    uidvalidity     INTEGER,
    last_uid        INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL DEFAULT 'starting',   -- starting | connected | down
    idle            INTEGER NOT NULL DEFAULT 0,         -- 1 while the session uses IDLE
    connected_since INTEGER,                            -- ms; NULL while down
    down_since      INTEGER,                            -- ms; NULL while connected
    last_poll_at    INTEGER,                            -- ms of the last completed scan
    last_error      TEXT,
    scanned         INTEGER NOT NULL DEFAULT 0,         -- messages read
    matched         INTEGER NOT NULL DEFAULT 0,         -- rule matches stored
    alerts          INTEGER NOT NULL DEFAULT 0,         -- alert emails raised
    resyncs         INTEGER NOT NULL DEFAULT 0,         -- UIDVALIDITY changes seen
    updated_at      INTEGER NOT NULL
);

-- A rule match ("hit"), stored with the mailbox position in ONE transaction. It waits
-- (alert_id NULL) until its group's alert email is made, in the same transaction that sets
-- alert_id. Real messages are unique per (mailbox, UIDVALIDITY, UID, rule), and per
-- (mailbox, rule, fingerprint of the header block) so a UIDVALIDITY resync does not re-alert.
-- The watcher's own down alerts have no UID.
CREATE TABLE IF NOT EXISTS postbox_alert_hits (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox     TEXT NOT NULL,
    rule        TEXT NOT NULL,
    group_key   TEXT NOT NULL,
    uidvalidity INTEGER,
    uid         INTEGER,
    fingerprint TEXT NOT NULL,
    seen_at     INTEGER NOT NULL,                       -- ms
    detail      TEXT NOT NULL,                          -- JSON: from, subject, date, snippet, captures
    alert_id    TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS postbox_alert_hits_uid
    ON postbox_alert_hits (mailbox, uidvalidity, uid, rule);
CREATE UNIQUE INDEX IF NOT EXISTS postbox_alert_hits_fingerprint
    ON postbox_alert_hits (mailbox, rule, fingerprint);
CREATE INDEX IF NOT EXISTS postbox_alert_hits_pending
    ON postbox_alert_hits (mailbox, rule, group_key, id) WHERE alert_id IS NULL;

-- One row per (mailbox, rule, group): pending hits, when they are due, the last alert.
CREATE TABLE IF NOT EXISTS postbox_alert_groups (
    mailbox       TEXT NOT NULL,
    rule          TEXT NOT NULL,
    group_key     TEXT NOT NULL,
    pending       INTEGER NOT NULL DEFAULT 0,
    due_at        INTEGER,                              -- ms; when pending > 0
    last_alert_at INTEGER,                              -- ms
    last_alert_id TEXT,
    alerts        INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (mailbox, rule, group_key)
);
CREATE INDEX IF NOT EXISTS postbox_alert_groups_due
    ON postbox_alert_groups (due_at) WHERE pending > 0;
