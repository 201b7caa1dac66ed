-- Leases: one holder per name (a mailbox watcher) until expires_at (ms). With SQLite there is
-- one node, but the same code runs, so a second `serve` on the same file stands by too.
CREATE TABLE IF NOT EXISTS postbox_leases (
    name        TEXT PRIMARY KEY NOT NULL,
    holder      TEXT NOT NULL,
    acquired_at INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
