-- Keys this installation made for itself (every process on the database shares them): the
-- one-click unsubscribe links' signing key.
CREATE TABLE IF NOT EXISTS postbox_keys (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
