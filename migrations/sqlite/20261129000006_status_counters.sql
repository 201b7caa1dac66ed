-- Emails by (status, priority), kept exact by triggers like the depth counter: GET /v1/stats and
-- the /metrics gauges read these 21 rows instead of counting the table. Row names are
-- 'status:<status>:<priority>'.

INSERT OR REPLACE INTO postbox_counters (name, n)
    SELECT 'status:' || s.column1 || ':' || p.column1, 0
      FROM (VALUES ('queued'), ('sending'), ('sent'), ('retrying'), ('failed'), ('cancelled'),
                   ('expired')) AS s,
           (VALUES ('high'), ('normal'), ('low')) AS p;

UPDATE postbox_counters
   SET n = (SELECT COUNT(*) FROM postbox_emails e
             WHERE 'status:' || e.status || ':' || e.priority = postbox_counters.name)
 WHERE name LIKE 'status:%';

CREATE TRIGGER IF NOT EXISTS postbox_status_insert AFTER INSERT ON postbox_emails
BEGIN
    UPDATE postbox_counters SET n = n + 1 WHERE name = 'status:' || NEW.status || ':' || NEW.priority;
END;

CREATE TRIGGER IF NOT EXISTS postbox_status_delete AFTER DELETE ON postbox_emails
BEGIN
    UPDATE postbox_counters SET n = n - 1 WHERE name = 'status:' || OLD.status || ':' || OLD.priority;
END;

CREATE TRIGGER IF NOT EXISTS postbox_status_update AFTER UPDATE OF status, priority ON postbox_emails
    WHEN OLD.status != NEW.status OR OLD.priority != NEW.priority
BEGIN
    UPDATE postbox_counters SET n = n - 1 WHERE name = 'status:' || OLD.status || ':' || OLD.priority;
    UPDATE postbox_counters SET n = n + 1 WHERE name = 'status:' || NEW.status || ':' || NEW.priority;
END;

-- The subject as a column: listings no longer parse every row's stored email (attachments and
-- all) to show it.
ALTER TABLE postbox_emails ADD COLUMN subject TEXT;
UPDATE postbox_emails SET subject = json_extract(spec, '$.subject');

-- The oldest email still waiting, found by a seek.
CREATE INDEX IF NOT EXISTS postbox_emails_status_age ON postbox_emails (status, age_from);
