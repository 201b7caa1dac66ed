-- Rate limits shared by every worker process: the theoretical arrival time (GCRA) of the next
-- message per limit key (`relay:<name>`, `domain:<domain>`), in µs since the epoch.
CREATE TABLE postbox_rate_slots (
    key TEXT PRIMARY KEY,
    tat BIGINT NOT NULL
);

-- Operator pauses: no email for this relay, recipient domain or tag is sent while one exists.
CREATE TABLE postbox_pauses (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    reason TEXT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (kind, value)
);

-- The stall alert's state: raised (since when, why) and when it was last sent.
CREATE TABLE postbox_alert_state (
    name TEXT PRIMARY KEY,
    raised_at BIGINT NOT NULL,
    last_sent_at BIGINT NOT NULL,
    reason TEXT NOT NULL
);
