-- The depth and status counters are kept per statement, not per row. The row trigger ran a
-- PL/pgSQL call and up to three counter UPDATEs for every email a statement changed: 15% of the
-- delivered/s of one worker process on 2 cores (`scripts/bench-cluster.sh`, the trigger dropped
-- vs kept). Now each statement that inserts, updates or deletes emails folds its rows' changes
-- into one delta per counter (from the statement's transition tables) and applies them in one
-- UPDATE. Same counters, same shards (one per backend pid % 16), same totals.
--
-- A transaction takes its shard's advisory lock (two-key form: (0x5042_0004, shard); the other
-- keys are `db::Lock`'s) before it changes a counter, and holds it to its end. Two backends
-- whose pids share a shard then wait for each other on one lock instead of on the shard's
-- counter rows in whatever order their statements reached them: seen as `deadlock detected`
-- between a batch submit and a claim, once a statement's rows were counted in one join instead
-- of one row at a time.

DROP TRIGGER IF EXISTS postbox_depth ON postbox_emails;
DROP FUNCTION IF EXISTS postbox_depth_change();

CREATE OR REPLACE FUNCTION postbox_counts_change() RETURNS trigger AS $$
DECLARE
    names TEXT[];
    deltas BIGINT[];
    my_shard INTEGER := pg_backend_pid() % 16;
BEGIN
    -- Each branch reads only the transition tables its event has: PL/pgSQL plans a statement
    -- when it first runs.
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(name), array_agg(delta) INTO names, deltas FROM (
            SELECT name, SUM(delta) AS delta FROM (
                SELECT 'status:' || status || ':' || priority AS name, 1 AS delta FROM new_rows
                UNION ALL
                SELECT 'depth', 1 FROM new_rows WHERE status IN ('queued', 'retrying', 'sending')
            ) x GROUP BY name
        ) g;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(name), array_agg(delta) INTO names, deltas FROM (
            SELECT name, SUM(delta) AS delta FROM (
                SELECT 'status:' || status || ':' || priority AS name, -1 AS delta FROM old_rows
                UNION ALL
                SELECT 'depth', -1 FROM old_rows WHERE status IN ('queued', 'retrying', 'sending')
            ) x GROUP BY name
        ) g;
    ELSE
        SELECT array_agg(name), array_agg(delta) INTO names, deltas FROM (
            SELECT name, SUM(delta) AS delta FROM (
                SELECT 'status:' || status || ':' || priority AS name, -1 AS delta FROM old_rows
                UNION ALL
                SELECT 'depth', -1 FROM old_rows WHERE status IN ('queued', 'retrying', 'sending')
                UNION ALL
                SELECT 'status:' || status || ':' || priority, 1 FROM new_rows
                UNION ALL
                SELECT 'depth', 1 FROM new_rows WHERE status IN ('queued', 'retrying', 'sending')
            ) x GROUP BY name HAVING SUM(delta) <> 0
        ) g;
    END IF;
    IF names IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(1346502660, my_shard);
    UPDATE postbox_counters c SET n = c.n + u.delta
      FROM unnest(names, deltas) AS u(name, delta)
     WHERE c.name = u.name AND c.shard = my_shard;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER postbox_counts_insert AFTER INSERT ON postbox_emails
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION postbox_counts_change();
CREATE TRIGGER postbox_counts_update AFTER UPDATE ON postbox_emails
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION postbox_counts_change();
CREATE TRIGGER postbox_counts_delete AFTER DELETE ON postbox_emails
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION postbox_counts_change();
