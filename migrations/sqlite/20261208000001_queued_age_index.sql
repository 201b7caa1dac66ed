-- The oldest queued email (`Store::oldest_queued_age_secs`: `status = 'queued' AND age_from <=
-- now`) is the only reader of the (status, age_from) index. Partial, on queued emails only, it
-- is written at submit and at claim and at no later change of state (1 B-tree write per
-- delivered email instead of 4), and holds no email that has left the queue.
DROP INDEX IF EXISTS postbox_emails_status_age;
-- `status` stays its first column: the planner then sees the same equality and range it saw on
-- the full index, and picks this one over (status, updated_at).
CREATE INDEX IF NOT EXISTS postbox_emails_queued_age ON postbox_emails (status, age_from)
    WHERE status = 'queued';
