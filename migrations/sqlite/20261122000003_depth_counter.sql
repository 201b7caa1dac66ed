-- The queue depth (emails queued, retrying or sending) kept exact by triggers, so the backpressure
-- check on every submit is one row read instead of a COUNT over the whole queue.

CREATE TABLE IF NOT EXISTS postbox_counters (
    name TEXT PRIMARY KEY NOT NULL,
    n    INTEGER NOT NULL
);

INSERT OR REPLACE INTO postbox_counters (name, n)
    SELECT 'depth', COUNT(*) FROM postbox_emails WHERE status IN ('queued', 'retrying', 'sending');

CREATE TRIGGER IF NOT EXISTS postbox_depth_insert AFTER INSERT ON postbox_emails
    WHEN NEW.status IN ('queued', 'retrying', 'sending')
BEGIN
    UPDATE postbox_counters SET n = n + 1 WHERE name = 'depth';
END;

CREATE TRIGGER IF NOT EXISTS postbox_depth_delete AFTER DELETE ON postbox_emails
    WHEN OLD.status IN ('queued', 'retrying', 'sending')
BEGIN
    UPDATE postbox_counters SET n = n - 1 WHERE name = 'depth';
END;

CREATE TRIGGER IF NOT EXISTS postbox_depth_update AFTER UPDATE OF status ON postbox_emails
    WHEN (OLD.status IN ('queued', 'retrying', 'sending')) != (NEW.status IN ('queued', 'retrying', 'sending'))
BEGIN
    UPDATE postbox_counters
       SET n = n + (CASE WHEN NEW.status IN ('queued', 'retrying', 'sending') THEN 1 ELSE -1 END)
     WHERE name = 'depth';
END;
