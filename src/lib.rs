//! # postbox: reliable email dispatch
//!
//! Apps hand postbox emails (this library, the HTTP API, the CLI); each becomes a durable row plus
//! an apalis job in SQLite (or PostgreSQL, shared by many processes); workers render it with
//! askama and deliver it over SMTP with lettre, retrying by the SMTP reply. IMAP watchers turn
//! matching inbound mail into grouped, throttled alert emails.
//!
//! ## Codemap
//! Layers, lowest first; a module uses only modules above it in this list (checked by
//! `scripts/module-deps.py`, which prints the graph and fails on a cycle).
//! ```text
//! settings.rs   ConfigError (names the bad key), masked(), nonzero(): shared by every section
//! db.rs         the query layer over SQLite and PostgreSQL: Db, Tx, Sql (one statement text for
//!               both), Script (statements sent to SQLite as one text: one round trip),
//!               OwnTx (Db::begin_own: an SQLite transaction whose BEGIN and COMMIT ride in
//!               its first and last statements' texts), DbRow, Lock; the PostgreSQL breaker
//! net.rs        loopback checks, TCP keepalive      shutdown.rs  the Shutdown signal
//! faults.rs     fault points tests arm (inert otherwise)
//! telemetry.rs  [log] section, tracing init
//! domain/       email.rs: NewEmail -> Email::parse (validated; every error names its field);
//!               address.rs; ids.rs (EmailId, Priority, EmailStatus); limits.rs ([limits],
//!               Senders from delivery.allowed_from); bounded.rs (bounded deserialization);
//!               lifecycle.rs: THE state machine as one table (Step -> from states, to state,
//!               timeline entry, EventType), the SQL guards built from it; unsubscribe.rs
//!               (signed one-click unsubscribe tokens, HMAC-SHA256)
//! render/       askama templates (templates/emails/<kind>/) -> Rendered { subject, text, html }
//! metrics.rs    Prometheus names and label sets
//! queue/        the job queue: every statement on apalis's tables (table.rs: setup, push inside
//!               a caller's transaction, acks, janitor repairs, the fetch statements;
//!               backend.rs: QueueStorage, the apalis backend on both databases, apalis's
//!               Persisted over its own statements, batches fetched ahead, on SQLite the fetch
//!               run in the one writer's transaction, an empty fetch that raced a wake-up
//!               run again); wake.rs: Wake, the workers' wake-ups, counted; JobKind (name,
//!               versioned id-only payload, idempotency key); SendJob; [queue] section
//! store/        everything else postbox keeps: open.rs (pools: on SQLite one writer
//!               connection and a reader pool; migrations, WAL checkpointer, health), submit.rs
//!               (group commit), batch.rs (Recorder, one per process: claims and completions
//!               of deliveries, on SQLite the workers' fetches, and the webhook dispatchers'
//!               rounds, batched into one transaction), lifecycle.rs (defer, cancel, retry), reads.rs
//!               (reports, listings, stats), janitor.rs, group.rs (the group committer),
//!               events.rs (the events feed read from the timeline by Cursor; webhook
//!               endpoints, their place in the feed and their deliveries), suppressions.rs
//!               (the suppression list, read by each claim batch), throttle.rs (rate limit
//!               slots shared on PostgreSQL, GCRA; operator pauses and the resume that
//!               releases what they held),
//!               inbound.rs (watcher positions, hits, alert groups, leases);
//!               [database] and [retention] sections; StoreError::fault() decides Busy / Full /
//!               Unavailable from the drivers' codes, once
//! delivery/     MIME building, Mailer { Smtp (Relays), File, Memory }, classify() of SMTP
//!               replies, RetryPolicy (policy.rs); relays.rs (named relays, each over our pool
//!               pool.rs, which pipelines MAIL / RCPT / DATA when the relay offers it; routing by field / tag / From / recipient domain; failover order and
//!               cool-downs); throttle.rs (Limiter: rate limits per relay and recipient domain,
//!               GCRA slots in memory or shared through store/, adaptive throttling on
//!               slow-down replies); dkim.rs (DkimSigner, keys per From domain); settings.rs:
//!               [delivery], [smtp], [[relays]], [[routes]], [[domain_limits]], [throttle],
//!               [[dkim]] -> RelaySetup; [retry]
//! worker/       one supervised apalis worker per job kind (Handler); this process's liveness
//!               lease; wake-ups (queue::Wake): on submit, by PostgreSQL LISTEN, the due timer for
//!               delayed jobs (wake_when_due); the janitor loop;
//!               deliver.rs: Deliverer, the handler of SendJob, with its Shaping (Limiter,
//!               DKIM keys, the PauseCache read every 2 s)
//! webhooks/     [[webhooks]] and [webhook] sections; sign.rs (Standard Webhooks signatures,
//!               whsec_ secrets); client.rs (HTTP/1.1 POSTs over hyper, keep-alive, bounded
//!               answers); dispatch.rs (one dispatcher per endpoint, under a lease: due
//!               retries + events after its place, signed POSTs, each round recorded by the
//!               Recorder; all on the postbox-webhooks thread, its own runtime, nice +10)
//! postbox.rs    Postbox, the facade every entry point calls: submit, status, list, cancel,
//!               retry, bulk, stats, events, webhooks, suppressions, unsubscribe, relays,
//!               pause / resume, run_workers; run /
//!               run_watchers / run_webhooks / serve_api delegate to Roles
//! api/          HTTP (axum over our hyper server.rs: timeouts, connection cap): routes and
//!               OpenAPI from one declaration, auth.rs (tokens, rate limits, failed logins,
//!               open-mode Host/Origin checks), body.rs (JSON bodies, bounded), events.rs (the
//!               events feed, webhook endpoints and deliveries), suppressions.rs, relays.rs
//!               (relays and limits, pauses, bulk actions), wire.rs (every
//!               request and response body), error.rs (errors as JSON); ui/ the /ui dashboard:
//!               pages in mod.rs, views.rs (templates), session.rs (sessions, CSRF, Authed);
//!               [api] section; ui/ adds the Relays page (pauses, bulk actions)
//! inbound/      IMAP watchers (async-imap): watcher.rs (IDLE/poll, scans, the lease),
//!               message.rs (parsing), rules.rs (pure matching), bounce.rs (DSN / ARF / text
//!               bounces -> reports, pure) for purpose = "bounces", alert grouping; [[mailboxes]]
//!               and [cluster] sections (config.rs)
//! config.rs     Settings: defaults <- TOML file <- POSTBOX_* env, the sections above merged;
//!               errors name the key
//! stall.rs      the stall alert ([stall_alert]): under the lease `stall-alert`, checks the
//!               oldest due email and the recent failure ratio; raises, repeats and clears
//!               alert emails through the facade, its state in the database
//! runtime.rs    the composition root: Runtime::build resolves secrets, tokens, senders and
//!               mailboxes and webhook secrets once; Postbox::open/start hand each layer its
//!               own section; Runtime runs the API, the watchers and (where workers run) the
//!               webhook dispatchers for the facade (Roles)
//! cli.rs        every CLI command's work (serve | api | worker | send | stats | status |
//!               cancel | retry | suppressions | relays | pause | resume | bulk | migrate |
//!               config check); main.rs only parses
//!               and dispatches
//! ```
//!
//! Public to embedders: the facade and its types at the crate root, `config` (every section's
//! type), `domain`, `delivery`, `render`, `store` (reports, listings, stats, events,
//! suppressions), `api`, `inbound`, `webhooks`, `metrics` and `cli` (for `main.rs`); `faults` is hidden (tests arm it). Crate-private: `db`,
//! `net`, `postbox`, `queue`, `runtime`, `settings`, `shutdown`, `telemetry`, `worker`.
//!
//! ## One email's path
//! `Postbox::submit` -> `Email::parse` (every rule, every field named; `relay` must exist) -> `GroupCommitter` ->
//! `Store::insert_group` (idempotency, depth cap, then email rows + `queue::table::push_sql` of job
//! `<id>:0`, and its `submitted` timeline entry, in ONE transaction; without idempotency keys
//! the three INSERTs, the counters' UPDATEs (SQLite) and the depth read after them are one
//! `Script`, and a group over the cap is rolled back and decided submission by submission)
//! -> worker
//! `Deliverer::spawn` (a place among the claims ahead of the send slots, highest priority
//! first; `Deliverer::claims_ahead` grows with the writer's batches) -> `Deliverer::deliver`:
//! `Recorder::claim` (row -> `sending`, attempt n, `claimed_by` this
//! process; one UPDATE for every claim waiting, one read of their recipients against the
//! suppression list) -> pauses (`PauseCache`) -> `Relays::route` and `pick` (the first relay
//! of its route not paused, not cooling down unless all are) -> `Limiter::take` (a slot of every limit key:
//! waited for within 2 s, else `Finish::Wait`, back to `queued`, not an attempt) -> a send
//! slot (`queue.concurrency`, highest priority first; a free one waits for a more urgent email
//! that holds a claims-ahead place, `Coming`) -> `render` -> `build_message_for`
//! (X-Postbox-Id, VERP return path, suppressed recipients out of the envelope,
//! List-Unsubscribe) -> DKIM -> `Mailer::send` through that relay (unreached: it cools down,
//! the next relay is tried) -> `Outcome` (a slow-down reply: `Limiter::slow_down`,
//! `Finish::Throttled`) -> `Recorder::complete`
//! (attempt + new status + timeline entry, and for a retry the next job with its `run_at`;
//! with the other claims and completions waiting, in ONE transaction) -> its event is read
//! from the timeline by the feed and the webhook dispatchers.
//!
//! ## Invariants, and where each is kept
//! - Nothing accepted is lost: an email row and its job commit in one transaction
//!   (`store/submit.rs`, `store/lifecycle.rs`); every non-final email owns one live job, and
//!   the janitor gives a new one to any email whose job vanished (`store/janitor.rs`, with
//!   `queue::table::live_job_exists`).
//! - A job whose `seq` is not the email's current `job_seq` does nothing (`store/batch.rs`), so
//!   repeated, stale or recovered jobs never send twice.
//! - A known outcome is never sent again: it is retried into the database from memory
//!   (`worker/deliver.rs`, `record`); a `sending` email is taken over only once its claimer's
//!   `node:<name>` lease ran out (`store/batch.rs`, renewed by `worker::run`). The one resend
//!   the README admits: a send in flight at a crash (same Message-ID).
//! - SQLite: one connection writes (`db::Db::Sqlite`); a statement that is not a `SELECT`
//!   never runs on a reader.
//! - A job is acked in the transaction that records what it did (`store/batch.rs`,
//!   `Store::defer`): apalis's own lock and ack statements are off (`worker::supervise`).
//! - Every status change writes its timeline entry in the same transaction (`store/lifecycle.rs`),
//!   and which change is allowed, and what it writes, is `domain::lifecycle::TABLE` alone: the
//!   store's status statements are built from it.
//! - The timeline is the events outbox: an event exists exactly when its change committed; a
//!   webhook endpoint's place in the feed advances in the transaction that records what its
//!   POSTs got (`store/events.rs`, `webhook_round_in`, run by the Recorder), so a crash
//!   resends, never skips (same `webhook-id`).
//! - A wait for a rate limit, a pause or a cooling relay is never an attempt: `Finish::Wait`
//!   takes the claim's count back in the completion's statement (`store/batch.rs`), and a
//!   slow-down reply (`Finish::Throttled`) does too; rate limits only ever under-use (unused
//!   reserved slots are dropped, never spent late in a burst: `delivery/throttle.rs`).
//! - Retry or fail: an SMTP reply is classified only by `delivery::classify`; a connection or
//!   TLS failure before any reply is temporary (`delivery/pool.rs`); a render error or a panic
//!   is permanent (`worker/deliver.rs`); when retries stop is `RetryPolicy`'s alone. Backoff is
//!   the next job's `run_at`, never a sleep.
//! - apalis is stopped only after a kind's handler drained (`worker::supervise`): apalis 1.0
//!   stops polling its own futures at once, one of which may hold SQLite's write lock.
//! - Only `queue/` touches apalis's tables; only `db.rs`, `queue/` and `store/` run SQL.
//! - Outside input is bounded before it is parsed (`api/body.rs`, `domain/bounded.rs`) and
//!   cleaned before it is stored (`inbound/message.rs`, `store/inbound.rs`).
//! - Secrets are never printed: `settings::masked`, `store::redact_url`, and the `Debug` of
//!   every section holding one.
//! - Only a mailbox's lease holder scans it and flushes its alerts (`inbound/watcher.rs`,
//!   `store/inbound.rs`).
//! - `domain`, `render`, `delivery::policy` and `inbound::rules` do no IO.

pub mod api;
pub mod cli;
pub mod config;
mod db;
pub mod delivery;
pub mod domain;
#[doc(hidden)]
pub mod faults;
pub mod inbound;
pub mod metrics;
mod net;
mod postbox;
pub(crate) mod queue;
pub mod render;
mod runtime;
pub(crate) mod settings;
mod shutdown;
pub mod stall;
pub mod store;
pub(crate) mod telemetry;
pub mod webhooks;
mod worker;

pub use config::Settings;
pub use domain::{EmailId, EmailStatus, NewAttachment, NewEmail, Priority};
pub use postbox::{
    BulkAction, BulkFilter, BulkReport, MAX_BULK, OpenError, Postbox, RelaysReport, Role, RunError,
    SubmitError, SubmitOptions, SubmitOutcome, Submitted,
};
pub use runtime::Runtime;
pub use shutdown::{Shutdown, shutdown_signal};
pub use store::{EmailReport, TimelineEntry};
