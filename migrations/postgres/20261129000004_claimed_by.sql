-- The process (node) that claimed an email for its current attempt. While that node is alive
-- (its 'node:<name>' lease in postbox_leases runs), no other process re-claims the email: a
-- send whose outcome is still being recorded is never sent twice.
ALTER TABLE postbox_emails ADD COLUMN IF NOT EXISTS claimed_by TEXT;
