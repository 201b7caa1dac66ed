-- Emails by (status, priority), kept exact by the depth trigger (now also counting these):
-- GET /v1/stats and the /metrics gauges read counter rows instead of counting the table. Like the
-- depth, each is spread over 16 shards (one per backend pid % 16); readers sum them. Row names
-- are 'status:<status>:<priority>'.

INSERT INTO postbox_counters (name, shard, n)
    SELECT 'status:' || s || ':' || p, g, 0
      FROM unnest(ARRAY['queued', 'sending', 'sent', 'retrying', 'failed', 'cancelled', 'expired']) AS s,
           unnest(ARRAY['high', 'normal', 'low']) AS p,
           generate_series(0, 15) AS g
    ON CONFLICT DO NOTHING;

UPDATE postbox_counters c
   SET n = (SELECT COUNT(*) FROM postbox_emails e
             WHERE 'status:' || e.status || ':' || e.priority = c.name)
 WHERE c.name LIKE 'status:%' AND c.shard = 0;

CREATE OR REPLACE FUNCTION postbox_depth_change() RETURNS trigger AS $$
DECLARE
    was BOOLEAN := TG_OP <> 'INSERT' AND OLD.status IN ('queued', 'retrying', 'sending');
    now_live BOOLEAN := TG_OP <> 'DELETE' AND NEW.status IN ('queued', 'retrying', 'sending');
    my_shard INTEGER := pg_backend_pid() % 16;
BEGIN
    IF was <> now_live THEN
        UPDATE postbox_counters SET n = n + (CASE WHEN now_live THEN 1 ELSE -1 END)
         WHERE name = 'depth' AND shard = my_shard;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.status = NEW.status AND OLD.priority = NEW.priority THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        UPDATE postbox_counters SET n = n - 1
         WHERE name = 'status:' || OLD.status || ':' || OLD.priority
           AND shard = my_shard;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        UPDATE postbox_counters SET n = n + 1
         WHERE name = 'status:' || NEW.status || ':' || NEW.priority
           AND shard = my_shard;
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE OR REPLACE TRIGGER postbox_depth AFTER INSERT OR DELETE OR UPDATE OF status, priority
    ON postbox_emails FOR EACH ROW EXECUTE FUNCTION postbox_depth_change();

-- The subject as a column: listings no longer parse every row's stored email to show it. (A
-- stored email holding an escaped NUL cannot be read as json text; its subject stays NULL.)
ALTER TABLE postbox_emails ADD COLUMN IF NOT EXISTS subject TEXT;
UPDATE postbox_emails SET subject = spec::json ->> 'subject' WHERE position('\u0000' IN spec) = 0;

CREATE INDEX IF NOT EXISTS postbox_emails_status_age ON postbox_emails (status, age_from);
