-- Bounces that carry no postbox id are matched to their email by the returned Message-ID.
CREATE INDEX IF NOT EXISTS postbox_emails_message_id ON postbox_emails (message_id);
