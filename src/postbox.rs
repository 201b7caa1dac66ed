//! The facade: the one library API. The CLI, the HTTP API and embedding apps all go through it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::Shutdown;
use crate::delivery::{Mailer, MailerError, RetryPolicy, message_id_for};
use crate::domain::{Email, EmailId, FieldError, Limits, NewEmail, Senders, ValidationErrors};
use crate::render::Templates;
use crate::store::{
    Counts, EmailPage, EmailReport, GroupCommitter, GroupSettings, IdempotencyClaim, InsertOutcome,
    InsertRequest, JanitorReport, ListFilter, NewRow, Stats, Store, StoreError, TransitionError,
};
use crate::worker::{self, Deliverer, Wake, WorkerSettings};
use futures::future::BoxFuture;

/// Errors of [`Postbox::open`].
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] crate::settings::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Mailer(#[from] MailerError),
}

/// Errors of [`Postbox::run`].
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The API could not listen (address taken, or not loopback without a token).
    #[error("{0:#}")]
    Bind(anyhow::Error),
    #[error(transparent)]
    Api(anyhow::Error),
}

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The HTTP API (unless `api.enabled = false`), the delivery workers and the watchers.
    Serve,
    /// The HTTP API only.
    Api,
    /// The delivery workers only.
    Worker,
}

impl Role {
    /// Whether this role serves the API, given `api.enabled`.
    pub fn runs_api(self, api_enabled: bool) -> bool {
        match self {
            Role::Api => true,
            Role::Worker => false,
            Role::Serve => api_enabled,
        }
    }

    pub fn runs_workers(self) -> bool {
        !matches!(self, Role::Api)
    }

    pub fn runs_watchers(self) -> bool {
        matches!(self, Role::Serve)
    }
}

/// The parts of a process the facade starts but does not own: the HTTP API and the mailbox
/// watchers sit above it (they call the facade), so the composition root (`runtime.rs`), which
/// knows their settings, implements this.
pub(crate) trait Roles: Send + Sync + 'static {
    fn run<'a>(
        self: Arc<Self>,
        pb: &'a Postbox,
        role: Role,
        shutdown: Shutdown,
    ) -> BoxFuture<'a, Result<(), RunError>>;

    fn run_watchers<'a>(self: Arc<Self>, pb: &'a Postbox, shutdown: Shutdown) -> BoxFuture<'a, ()>;

    fn run_webhooks<'a>(self: Arc<Self>, pb: &'a Postbox, shutdown: Shutdown) -> BoxFuture<'a, ()>;

    fn serve_api<'a>(
        self: Arc<Self>,
        pb: &'a Postbox,
        listener: tokio::net::TcpListener,
        expect_workers: bool,
        shutdown: Shutdown,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// What [`Postbox::assemble`] is made of: each part resolved by the composition root.
pub(crate) struct Parts {
    pub store: Store,
    pub mailer: Mailer,
    /// Every relay's name (an email's `relay` field must be one).
    pub relay_names: Vec<String>,
    pub limiter: Arc<crate::delivery::Limiter>,
    pub dkim: crate::delivery::DkimSigner,
    pub limits: Limits,
    pub senders: Senders,
    pub retry: RetryPolicy,
    pub workers: WorkerSettings,
    pub roles: Arc<dyn Roles>,
}

/// Errors of [`Postbox::submit`] and [`Postbox::submit_many`].
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The email broke rules; nothing was stored.
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
    /// Some emails of a batch broke rules (index, errors); nothing was stored.
    #[error("{} of the batch's emails are invalid; nothing was stored", .0.len())]
    InvalidBatch(Vec<(usize, Vec<FieldError>)>),
    /// The idempotency key was used before for a different request; nothing was stored.
    #[error("idempotency key `{key}` was already used for a different request")]
    KeyReused { key: String },
    /// The queue holds `queue.max_depth` emails already; nothing was stored. Try again later.
    #[error("the queue is full ({depth} emails waiting, the cap is {max_depth}); try again later")]
    QueueFull { depth: u64, max_depth: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Relays, rate limits and pauses: `GET /v1/relays`, `postbox relays`, the dashboard.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct RelaysReport {
    /// Every relay (empty unless `delivery.transport = "smtp"`), with its cool-down.
    pub relays: Vec<crate::delivery::RelayView>,
    /// Every rate limit key (`relay:<name>`, `domain:<domain>`): configured and effective
    /// rates, adaptive throttling. Figures are this process's (on PostgreSQL the slots are
    /// shared; the adaptive rate and the observed rate are per process).
    pub limits: Vec<crate::delivery::LimitView>,
    pub pauses: Vec<crate::store::Pause>,
}

/// What a bulk action does to each email its filter matches.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum BulkAction {
    /// Re-drive dead letters (status failed).
    Retry,
    /// Cancel queued or retrying emails, or dismiss dead letters.
    Cancel,
}

/// Which emails a bulk action takes: every condition given must hold; `status` is required.
#[derive(Debug, Clone, Default)]
pub struct BulkFilter {
    pub status: Option<crate::domain::EmailStatus>,
    pub tag: Option<String>,
    /// A recipient at this domain.
    pub domain: Option<String>,
    /// Created at least this long ago.
    pub older_than: Option<std::time::Duration>,
}

/// What a bulk action did.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct BulkReport {
    /// Emails the filter matched (at most `MAX_BULK`).
    pub matched: u64,
    /// Emails changed (the others changed state meanwhile).
    pub changed: u64,
    /// More emails match: run it again.
    pub more: bool,
}

/// Emails one bulk call takes at most.
pub const MAX_BULK: u64 = 10_000;

/// The oldest a bulk filter's `older_than_secs` may reach back (10 years).
const MAX_OLDER_THAN_SECS: u64 = 10 * 365 * 24 * 3600;

/// A relay name, domain or tag as pauses and bulk filters take it.
fn target_word(field: &'static str, v: &str) -> Result<String, (&'static str, String)> {
    if crate::domain::plain_name(v, 253, b"-_.:") {
        Ok(v.to_string())
    } else {
        Err((
            field,
            "must be 1-253 characters of A-Z a-z 0-9 - _ . :".into(),
        ))
    }
}

/// A bulk action and its filter, checked (the API and the CLI take the same words). An error
/// names the field: action, status, tag or domain.
pub fn bulk_request(
    action: &str,
    status: &str,
    tag: Option<&str>,
    domain: Option<&str>,
    older_than_secs: Option<u64>,
) -> Result<(BulkAction, BulkFilter), (&'static str, String)> {
    let action = match action {
        "retry" => BulkAction::Retry,
        "cancel" => BulkAction::Cancel,
        other => {
            return Err((
                "action",
                format!("`{}` is not retry or cancel", other.escape_debug()),
            ));
        }
    };
    let st = crate::domain::EmailStatus::parse(status).ok_or_else(|| {
        (
            "status",
            format!("`{}` is not a status", status.escape_debug()),
        )
    })?;
    use crate::domain::EmailStatus::{Failed, Queued, Retrying};
    let allowed: &[crate::domain::EmailStatus] = match action {
        BulkAction::Retry => &[Failed],
        BulkAction::Cancel => &[Queued, Retrying, Failed],
    };
    if !allowed.contains(&st) {
        let names: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
        return Err((
            "status",
            format!("{action:?} applies to {}", names.join(", ")).to_lowercase(),
        ));
    }
    if older_than_secs.is_some_and(|s| s > MAX_OLDER_THAN_SECS) {
        return Err((
            "older_than_secs",
            format!("must be at most {MAX_OLDER_THAN_SECS} (10 years)"),
        ));
    }
    Ok((
        action,
        BulkFilter {
            status: Some(st),
            tag: tag.map(|t| target_word("tag", t)).transpose()?,
            domain: domain
                .map(|d| target_word("domain", d).map(|d| d.to_ascii_lowercase()))
                .transpose()?,
            older_than: older_than_secs.map(std::time::Duration::from_secs),
        },
    ))
}

/// Options of [`Postbox::submit_with`] and [`Postbox::submit_many_with`].
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// Where the submission came from (an HTTP request id); shown in the email's timeline.
    pub request_id: Option<String>,
    /// Makes the whole submission idempotent: the same claim again replays the first result.
    pub idempotency: Option<IdempotencyClaim>,
}

/// The result of [`Postbox::submit_with`] / [`Postbox::submit_many_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitOutcome {
    pub emails: Vec<Submitted>,
    /// True when an idempotency claim matched: these are the first submission's results and
    /// nothing was created now.
    pub replayed: bool,
}

/// A submission's result: the email's id, and whether this call created it (false when an
/// idempotency key matched an earlier submission).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub id: EmailId,
    pub created: bool,
}

struct Inner {
    limits: Limits,
    senders: Senders,
    retry: RetryPolicy,
    workers: WorkerSettings,
    /// Runs the API and the watchers (the composition root's part).
    roles: Arc<dyn Roles>,
    store: Store,
    wake: Arc<Wake>,
    mailer: Mailer,
    relay_names: Vec<String>,
    limiter: Arc<crate::delivery::Limiter>,
    dkim: crate::delivery::DkimSigner,
    /// The pauses as workers see them (re-read every few seconds, and after a change here).
    pauses: Arc<worker::PauseCache>,
    writer: GroupCommitter,
    /// The one writer of deliveries' claims and outcomes, apalis's fetches and the webhook
    /// dispatchers' bookkeeping (`store::Recorder`), shared by every worker of this process.
    /// Its node is this process in the cluster (`host-pid-ulid`): the holder of its leases
    /// and claims.
    recorder: crate::store::Recorder,
    workers_running: AtomicUsize,
}

/// postbox as a library: submit mail, look it up, cancel or re-drive it, and run the workers.
///
/// ```no_run
/// use postbox::{Postbox, Settings, NewEmail};
/// # async fn demo() -> anyhow::Result<()> {
/// let postbox = Postbox::open(Settings::default()).await?;
/// let sent = postbox.submit(NewEmail::text("ada@example.com", "Hello", "First email")).await?;
/// let report = postbox.status(&sent.id).await?.expect("just stored");
/// assert_eq!(report.status, postbox::EmailStatus::Queued);
/// // Deliver in this process until Ctrl-C:
/// postbox.run_workers(async { let _ = tokio::signal::ctrl_c().await; }).await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Postbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Postbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postbox").finish_non_exhaustive()
    }
}

impl Postbox {
    /// Assembles the facade from its parts (the composition root, `runtime.rs`, calls this
    /// from [`Postbox::open`] / [`Postbox::start`]).
    pub(crate) fn assemble(parts: Parts) -> Postbox {
        let writer = GroupCommitter::start(
            parts.store.clone(),
            GroupSettings {
                max_rows: parts.workers.queue.group_commit_max,
                max_depth: parts.workers.queue.max_depth,
                idempotency_ttl: parts.workers.idempotency_ttl,
            },
        );
        let recorder = crate::store::Recorder::start(parts.store.clone(), worker::node_name());
        Postbox {
            inner: Arc::new(Inner {
                recorder,
                store: parts.store,
                wake: Arc::new(Wake::default()),
                mailer: parts.mailer,
                relay_names: parts.relay_names,
                limiter: parts.limiter,
                dkim: parts.dkim,
                pauses: Arc::new(worker::PauseCache::default()),
                writer,
                workers_running: AtomicUsize::new(0),
                limits: parts.limits,
                senders: parts.senders,
                retry: parts.retry,
                workers: parts.workers,
                roles: parts.roles,
            }),
        }
    }

    /// The limits every email is validated against.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    fn validate(&self, new: NewEmail) -> Result<(EmailId, Email, String), ValidationErrors> {
        let email = Email::parse(new, &self.inner.limits, &self.inner.senders, &Templates)?;
        if let Some(r) = &email.relay
            && !self.inner.relay_names.contains(r)
        {
            return Err(ValidationErrors(vec![crate::domain::FieldError::new(
                "relay",
                format!(
                    "\"{r}\" is not a relay (relays: {})",
                    self.inner.relay_names.join(", ")
                ),
            )]));
        }
        if email.one_click_unsubscribe {
            let why = if self.inner.workers.public_url.is_none() {
                Some("needs api.public_url (where the link points)")
            } else if email.recipients().count() != 1 {
                Some("needs exactly one recipient (the link unsubscribes that recipient)")
            } else if email
                .headers
                .iter()
                .any(|(n, _)| n.to_ascii_lowercase().starts_with("list-unsubscribe"))
            {
                Some("makes the List-Unsubscribe headers: leave them out of `headers`")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ValidationErrors(vec![crate::domain::FieldError::new(
                    "one_click_unsubscribe",
                    why,
                )]));
            }
        }
        let id = EmailId::generate();
        let message_id = message_id_for(id.as_str(), &email);
        Ok((id, email, message_id))
    }

    /// Validates an email for the store (the watcher builds alert rows with it).
    pub(crate) fn validate_email(&self, new: NewEmail) -> Result<NewRow, ValidationErrors> {
        self.validate(new)
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    /// This process's one writer of claims, outcomes and webhook bookkeeping.
    pub(crate) fn recorder(&self) -> &crate::store::Recorder {
        &self.inner.recorder
    }

    /// This process's name in the cluster (`host-pid-ulid`).
    pub(crate) fn node(&self) -> &str {
        self.inner.recorder.node()
    }

    /// Wakes idle workers in this process (emails were queued outside `submit`).
    pub(crate) fn notify_workers(&self) {
        self.inner.wake.notify();
    }

    /// Runs a watcher for every `[[mailboxes]]` entry until `shutdown` (returns at once when
    /// none is configured). Alerts they raise are delivered by the workers.
    pub async fn run_watchers(&self, shutdown: Shutdown) {
        self.inner.roles.clone().run_watchers(self, shutdown).await
    }

    /// Sends webhooks (the `[[webhooks]]` endpoints and those added over the API) until
    /// `shutdown`. `run` does this wherever workers run.
    pub async fn run_webhooks(&self, shutdown: Shutdown) {
        self.inner.roles.clone().run_webhooks(self, shutdown).await
    }

    /// Runs what `role` says (the API, the workers, the watchers) until `shutdown`; then lets
    /// requests and sends in flight finish and returns.
    pub async fn run(&self, role: Role, shutdown: Shutdown) -> Result<(), RunError> {
        self.inner.roles.clone().run(self, role, shutdown).await
    }

    /// Serves the HTTP API on `listener` (readiness expects workers when `expect_workers`)
    /// until `shutdown`.
    pub async fn serve_api(
        &self,
        listener: tokio::net::TcpListener,
        expect_workers: bool,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        self.inner
            .roles
            .clone()
            .serve_api(self, listener, expect_workers, shutdown)
            .await
    }

    /// An email rendered as it would be sent now (subject, text, HTML), for previews.
    pub async fn preview(
        &self,
        id: &EmailId,
    ) -> Result<Option<Result<crate::render::Rendered, String>>, StoreError> {
        Ok(self
            .inner
            .store
            .email(id)
            .await?
            .map(|e| crate::render::render(&e).map_err(|e| e.to_string())))
    }

    /// Sent / failed attempts per minute over the last `minutes`.
    pub async fn throughput(
        &self,
        minutes: u32,
    ) -> Result<Vec<crate::store::MinuteCounts>, StoreError> {
        self.inner.store.throughput(minutes).await
    }

    /// Events after `after` in the feed (oldest first), and where the next page starts.
    pub async fn events(
        &self,
        after: crate::store::Cursor,
        limit: u32,
    ) -> Result<crate::store::EventPage, StoreError> {
        self.inner.store.events_after(after, limit).await
    }

    /// Every event of one email (None: no such email).
    pub async fn email_events(
        &self,
        id: &EmailId,
    ) -> Result<Option<Vec<crate::store::Event>>, StoreError> {
        let events = self.inner.store.email_events(id).await?;
        if events.is_empty() && self.inner.store.email(id).await?.is_none() {
            return Ok(None);
        }
        Ok(Some(events))
    }

    /// The webhook endpoints (config and API), with their health.
    pub async fn webhooks(&self) -> Result<Vec<crate::store::WebhookRow>, StoreError> {
        self.inner.store.webhooks().await
    }

    pub async fn webhook(
        &self,
        name: &str,
    ) -> Result<Option<crate::store::WebhookRow>, StoreError> {
        self.inner.store.webhook(name).await
    }

    /// Adds or replaces an API endpoint (false: the name is the config's).
    pub async fn put_webhook(&self, spec: &crate::store::WebhookSpec) -> Result<bool, StoreError> {
        self.inner.store.put_webhook(spec).await
    }

    /// Removes an API endpoint (false: none by that name, or it is the config's).
    pub async fn delete_webhook(&self, name: &str) -> Result<bool, StoreError> {
        self.inner.store.delete_webhook(name).await
    }

    /// Enables a disabled endpoint again (false: none by that name).
    pub async fn enable_webhook(&self, name: &str) -> Result<bool, StoreError> {
        self.inner.store.enable_webhook(name).await
    }

    /// An endpoint's latest deliveries, newest first.
    pub async fn webhook_deliveries(
        &self,
        name: &str,
        limit: u32,
    ) -> Result<Vec<crate::store::DeliveryRecord>, StoreError> {
        self.inner.store.webhook_deliveries(name, limit).await
    }

    /// Sends one delivery of an endpoint again now (false: no such delivery).
    pub async fn redeliver(&self, name: &str, id: i64) -> Result<bool, StoreError> {
        self.inner.store.redeliver(name, id).await
    }

    /// Sends one event to an endpoint again now, delivered or not (false: no such endpoint or
    /// event).
    pub async fn redeliver_event(&self, name: &str, seq: i64) -> Result<bool, StoreError> {
        self.inner.store.redeliver_event(name, seq).await
    }

    /// How many events an endpoint has still to read, counted up to
    /// [`crate::store::LAG_COUNT_MAX`] (`true`: at least that many), and how long the oldest
    /// of them has waited, in seconds.
    pub async fn webhook_lag(&self, name: &str) -> Result<(i64, bool, f64), StoreError> {
        let (n, more) = self.inner.store.webhook_lag(name).await?;
        let secs = self.inner.store.webhook_lag_seconds(name).await?;
        Ok((n, more, secs))
    }

    /// Suppressed addresses, in address order.
    pub async fn suppressions(
        &self,
        f: &crate::store::SuppressionFilter,
    ) -> Result<Vec<crate::store::Suppression>, StoreError> {
        self.inner.store.suppressions(f).await
    }

    /// Adds (or replaces) a suppression: postbox will not send to `address`.
    pub async fn suppress(
        &self,
        address: &crate::domain::EmailAddress,
        reason: crate::store::SuppressionReason,
        detail: Option<&str>,
        expires_at: Option<time::OffsetDateTime>,
    ) -> Result<(), StoreError> {
        self.inner
            .store
            .suppress(address.address(), reason, detail, expires_at)
            .await
    }

    /// The latest bounce and complaint reports read from bounce mailboxes, newest first
    /// (matched to an email or not).
    pub async fn bounce_reports(
        &self,
        limit: u32,
    ) -> Result<Vec<crate::store::BounceReportRow>, StoreError> {
        self.inner.store.bounce_reports(limit).await
    }

    /// Where one-click unsubscribe links point and the key that signs them (None without
    /// `api.public_url`, or while the key cannot be read: such emails then go without the
    /// headers, and the log says why).
    async fn unsubscribe_links(&self) -> Option<(String, Vec<u8>)> {
        let base = self.inner.workers.public_url.clone()?;
        match self.inner.store.unsubscribe_key().await {
            Ok(key) => Some((base.trim_end_matches('/').to_string(), key)),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the unsubscribe key; one-click unsubscribe links are left out");
                None
            }
        }
    }

    /// A one-click unsubscribe (`POST {api.public_url}/u/{token}`): the recipient the token
    /// names is suppressed and the email records it. None when the token is not ours.
    pub async fn unsubscribe(&self, token: &str) -> Result<Option<String>, StoreError> {
        let key = self.inner.store.unsubscribe_key().await?;
        let Some((id, recipient)) = crate::domain::unsubscribe::verify(&key, token) else {
            return Ok(None);
        };
        self.inner.store.unsubscribe(&id, &recipient).await?;
        Ok(Some(recipient))
    }

    /// Whether a token is one of ours (a GET shows a confirmation page, changing nothing).
    pub async fn unsubscribe_target(&self, token: &str) -> Result<Option<String>, StoreError> {
        let key = self.inner.store.unsubscribe_key().await?;
        Ok(crate::domain::unsubscribe::verify(&key, token).map(|(_, r)| r))
    }

    /// Removes a suppression; false if the address was not suppressed.
    pub async fn unsuppress(&self, address: &str) -> Result<bool, StoreError> {
        self.inner.store.unsuppress(address).await
    }

    /// Every watched mailbox's position, health and per-rule counts.
    pub async fn mailboxes(&self) -> Result<Vec<crate::store::MailboxStatus>, StoreError> {
        self.inner.store.mailboxes().await
    }

    /// Validates and durably queues one email. When this returns `Ok`, the email is committed.
    pub async fn submit(&self, new: NewEmail) -> Result<Submitted, SubmitError> {
        let mut out = self.submit_with(new, SubmitOptions::default()).await?;
        Ok(out.emails.pop().expect("one email in, one out"))
    }

    /// [`Postbox::submit`] with a request id and an optional idempotency claim.
    pub async fn submit_with(
        &self,
        new: NewEmail,
        opts: SubmitOptions,
    ) -> Result<SubmitOutcome, SubmitError> {
        let row = self.validate(new)?;
        self.commit(vec![row], opts).await
    }

    /// Validates every email, then queues them all in ONE transaction: all or nothing.
    pub async fn submit_many(&self, emails: Vec<NewEmail>) -> Result<Vec<Submitted>, SubmitError> {
        Ok(self
            .submit_many_with(emails, SubmitOptions::default())
            .await?
            .emails)
    }

    /// [`Postbox::submit_many`] with a request id and an optional idempotency claim.
    pub async fn submit_many_with(
        &self,
        emails: Vec<NewEmail>,
        opts: SubmitOptions,
    ) -> Result<SubmitOutcome, SubmitError> {
        let mut rows = Vec::with_capacity(emails.len());
        let mut bad = Vec::new();
        for (i, new) in emails.into_iter().enumerate() {
            match self.validate(new) {
                Ok(r) => rows.push(r),
                Err(e) => bad.push((i, e.0)),
            }
        }
        if !bad.is_empty() {
            return Err(SubmitError::InvalidBatch(bad));
        }
        self.commit(rows, opts).await
    }

    async fn commit(
        &self,
        rows: Vec<NewRow>,
        opts: SubmitOptions,
    ) -> Result<SubmitOutcome, SubmitError> {
        let key = opts.idempotency.as_ref().map(|c| c.key.clone());
        let labels: Vec<_> = rows
            .iter()
            .map(|(_, e, _)| crate::metrics::email_labels(e))
            .collect();
        let started = std::time::Instant::now();
        let outcome = self
            .inner
            .writer
            .submit(InsertRequest {
                rows,
                request_id: opts.request_id,
                idempotency: opts.idempotency,
            })
            .await?;
        let (ids, replayed) = match outcome {
            InsertOutcome::Inserted(ids) => {
                self.inner.wake.notify();
                metrics::histogram!("postbox_submit_seconds")
                    .record(started.elapsed().as_secs_f64());
                // One increment per label set, not per email (batches are large).
                let mut by_label: std::collections::BTreeMap<(String, String), u64> =
                    Default::default();
                for ((_, created), [(_, priority), (_, template)]) in ids.iter().zip(labels) {
                    if *created {
                        *by_label.entry((priority, template)).or_default() += 1;
                    }
                }
                for ((priority, template), n) in by_label {
                    metrics::counter!("postbox_emails_submitted_total",
                        "priority" => priority, "template" => template)
                    .increment(n);
                }
                (ids, false)
            }
            InsertOutcome::Replayed(ids) => (ids, true),
            InsertOutcome::KeyReused => {
                return Err(SubmitError::KeyReused {
                    key: key.unwrap_or_default(),
                });
            }
            InsertOutcome::QueueFull { depth, max_depth } => {
                return Err(SubmitError::QueueFull { depth, max_depth });
            }
        };
        Ok(SubmitOutcome {
            emails: ids
                .into_iter()
                .map(|(id, created)| Submitted { id, created })
                .collect(),
            replayed,
        })
    }

    /// A page of emails, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<EmailPage, StoreError> {
        self.inner.store.list(filter).await
    }

    /// Queue depth, recent outcomes, in flight.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        self.inner.store.stats().await
    }

    /// The queue gauges of `/metrics` (depth by state, oldest queued age).
    pub async fn queue_gauges(&self) -> Result<crate::store::QueueGauges, StoreError> {
        self.inner.store.queue_gauges().await
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.inner.store.ping().await
    }

    /// Checks that the database takes writes (a full disk, a stuck lock or an unreachable
    /// server fail it).
    pub async fn write_probe(&self) -> Result<(), StoreError> {
        self.inner.store.write_probe().await
    }

    /// True while [`Postbox::run_workers`] runs in this process.
    pub fn workers_running(&self) -> bool {
        self.inner.workers_running.load(Ordering::Relaxed) > 0
    }

    /// The email's state and timeline (`None`: no such email).
    pub async fn status(&self, id: &EmailId) -> Result<Option<EmailReport>, StoreError> {
        self.inner.store.report(id).await
    }

    /// Cancels a queued or retrying email, or dismisses a dead letter (failed).
    pub async fn cancel(&self, id: &EmailId) -> Result<(), TransitionError> {
        self.inner.store.cancel(id, None).await
    }

    /// [`Postbox::cancel`], noting the request that asked for it in the timeline.
    pub async fn cancel_from(&self, id: &EmailId, request_id: &str) -> Result<(), TransitionError> {
        self.inner.store.cancel(id, Some(request_id)).await
    }

    /// Re-drives a failed email (dead letter) with a fresh retry budget and the same Message-ID.
    pub async fn retry(&self, id: &EmailId) -> Result<(), TransitionError> {
        self.inner.store.retry(id, None).await?;
        self.inner.wake.notify();
        Ok(())
    }

    /// [`Postbox::retry`], noting the request that asked for it in the timeline.
    pub async fn retry_from(&self, id: &EmailId, request_id: &str) -> Result<(), TransitionError> {
        self.inner.store.retry(id, Some(request_id)).await?;
        self.inner.wake.notify();
        Ok(())
    }

    /// The relays, rate limits and pauses, as this process sees them.
    pub async fn relays(&self) -> Result<RelaysReport, StoreError> {
        Ok(RelaysReport {
            relays: self
                .inner
                .mailer
                .relays()
                .map(|r| r.views())
                .unwrap_or_default(),
            limits: self.inner.limiter.views(),
            pauses: self.inner.store.pauses().await?,
        })
    }

    /// Sets `postbox_rate_limit_per_second` for every limit key (scrapes call this).
    pub fn refresh_limit_gauges(&self) {
        let _ = self.inner.limiter.views();
    }

    /// Every pause, oldest first.
    pub async fn pauses(&self) -> Result<Vec<crate::store::Pause>, StoreError> {
        self.inner.store.pauses().await
    }

    /// Every relay's name.
    pub fn relay_names(&self) -> &[String] {
        &self.inner.relay_names
    }

    /// A pause's kind (relay, domain, tag) and value, checked: a relay must exist. An error
    /// names the field: kind or value.
    pub fn pause_target(
        &self,
        kind: &str,
        value: &str,
    ) -> Result<(crate::store::PauseKind, String), (&'static str, String)> {
        use crate::store::PauseKind;
        let k = PauseKind::parse(kind).ok_or_else(|| {
            (
                "kind",
                format!("`{}` is not relay, domain or tag", kind.escape_debug()),
            )
        })?;
        let v = target_word("value", value.trim())?;
        match k {
            PauseKind::Relay if !self.inner.relay_names.contains(&v) => Err((
                "value",
                format!(
                    "\"{v}\" is not a relay (relays: {})",
                    self.inner.relay_names.join(", ")
                ),
            )),
            PauseKind::Domain => Ok((k, v.to_ascii_lowercase())),
            _ => Ok((k, v)),
        }
    }

    /// Pauses sending through a relay, to a recipient domain or with a tag (every worker
    /// process sees it within a few seconds). False: it was paused already.
    pub async fn pause(
        &self,
        kind: crate::store::PauseKind,
        value: &str,
        reason: Option<&str>,
    ) -> Result<bool, StoreError> {
        let changed = self.inner.store.pause(kind, value, reason).await?;
        self.inner.pauses.invalidate();
        Ok(changed)
    }

    /// Ends a pause and queues the emails it held at once. None: there was no such pause;
    /// else how many emails it released.
    pub async fn resume(
        &self,
        kind: crate::store::PauseKind,
        value: &str,
    ) -> Result<Option<u64>, StoreError> {
        let n = self.inner.store.resume(kind, value).await?;
        self.inner.pauses.invalidate();
        self.inner.wake.notify();
        Ok(n)
    }

    /// Retries or cancels every email `filter` matches (up to [`MAX_BULK`] per call), each
    /// through the same step as one by one, its timeline noting `origin`.
    pub async fn bulk(
        &self,
        action: BulkAction,
        filter: &BulkFilter,
        origin: &str,
    ) -> Result<BulkReport, StoreError> {
        let mut report = BulkReport::default();
        let created_before = filter
            .older_than
            .map(|d| time::OffsetDateTime::now_utc() - d);
        let mut before: Option<EmailId> = None;
        loop {
            let page = self
                .inner
                .store
                .list(&crate::store::ListFilter {
                    status: filter.status,
                    tag: filter.tag.clone(),
                    domain: filter.domain.clone(),
                    created_before,
                    before_id: before.clone(),
                    limit: 500,
                    ..Default::default()
                })
                .await?;
            for e in &page.emails {
                if report.matched == MAX_BULK {
                    report.more = true;
                    break;
                }
                report.matched += 1;
                let r = match action {
                    BulkAction::Retry => self.inner.store.retry(&e.id, Some(origin)).await,
                    BulkAction::Cancel => self.inner.store.cancel(&e.id, Some(origin)).await,
                };
                match r {
                    Ok(()) => report.changed += 1,
                    Err(TransitionError::Store(e)) => return Err(e),
                    Err(_) => {}
                }
            }
            match (page.emails.last(), report.more) {
                (Some(last), false) if page.next_cursor.is_some() => before = Some(last.id.clone()),
                _ => break,
            }
        }
        if action == BulkAction::Retry && report.changed > 0 {
            self.inner.wake.notify();
        }
        Ok(report)
    }

    /// Emails by status.
    pub async fn counts(&self) -> Result<Counts, StoreError> {
        self.inner.store.counts().await
    }

    /// One janitor pass now (it also runs periodically inside [`Postbox::run_workers`]).
    pub async fn janitor(&self) -> Result<JanitorReport, StoreError> {
        worker::janitor_pass(&self.inner.workers, &self.inner.store, self.node()).await
    }

    /// Delivers queued mail in this process until `shutdown` completes; then stops fetching,
    /// lets in-flight sends finish and returns.
    pub async fn run_workers(&self, shutdown: impl Future<Output = ()> + Send + 'static) {
        self.run_workers_with(crate::shutdown_signal(shutdown))
            .await
    }

    /// Like [`Postbox::run_workers`] with an already shared shutdown signal.
    pub async fn run_workers_with(&self, shutdown: Shutdown) {
        let i = &self.inner;
        struct Running<'a>(&'a AtomicUsize);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        i.workers_running.fetch_add(1, Ordering::Relaxed);
        let _running = Running(&i.workers_running);
        let deliverer = Arc::new(Deliverer::new(
            i.store.clone(),
            i.recorder.clone(),
            i.mailer.clone(),
            i.retry.clone(),
            worker::Addressing {
                return_path: i.workers.return_path.clone(),
                unsubscribe: self.unsubscribe_links().await,
            },
            worker::Shaping {
                concurrency: i.workers.queue.concurrency,
                batch_size: i.workers.queue.batch_size,
                limiter: i.limiter.clone(),
                dkim: i.dkim.clone(),
                pauses: i.pauses.clone(),
            },
            shutdown.clone(),
        ));
        worker::run(
            &i.workers,
            i.store.clone(),
            deliverer,
            i.wake.clone(),
            shutdown,
        )
        .await
    }

    /// What the memory transport (`delivery.transport = "memory"`) kept, in the order sent;
    /// empty for the other transports.
    pub fn sent_in_memory(&self) -> Vec<crate::delivery::SentMessage> {
        self.inner.mailer.sent_in_memory()
    }

    /// Closes the database pool.
    pub async fn close(&self) {
        self.inner.store.close().await
    }
}
