-- Each hit's sender as a column: an alert counts senders with GROUP BY instead of loading every
-- pending hit of its group.
ALTER TABLE postbox_alert_hits ADD COLUMN IF NOT EXISTS sender TEXT NOT NULL DEFAULT '';
UPDATE postbox_alert_hits SET sender = coalesce(detail::json ->> 'sender', '')
 WHERE position('\u0000' IN detail) = 0;
