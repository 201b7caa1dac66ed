-- Dashboard sessions, shared by every API process on this database (no sticky sessions).
-- id_hash is the SHA-256 (hex) of the session cookie's value: a read of this table does not
-- give anyone a live session. Expired rows are deleted by each API process's sweeper.
CREATE TABLE IF NOT EXISTS postbox_sessions (
    id_hash    TEXT PRIMARY KEY,
    who        TEXT NOT NULL,
    csrf       TEXT NOT NULL,
    flash_kind TEXT,
    flash_text TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS postbox_sessions_expires ON postbox_sessions (expires_at);
