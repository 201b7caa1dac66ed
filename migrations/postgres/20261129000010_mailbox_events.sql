-- Events about a watched mailbox itself (mailbox.down / mailbox.up) name it here; their
-- email_id is ''.
ALTER TABLE postbox_events ADD COLUMN IF NOT EXISTS mailbox TEXT;
