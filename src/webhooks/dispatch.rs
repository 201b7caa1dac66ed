//! The dispatcher: one task per enabled endpoint, started and stopped by a supervisor that
//! follows the endpoints table (config endpoints are synced into it at start; API endpoints
//! come and go).
//!
//! A round of one endpoint: take its lease (one process per endpoint on a shared database),
//! read its due retries and the events after its place in the feed, POST them (up to
//! `webhook.concurrency` at once, each signed), then record in ONE transaction (the
//! `store::Recorder`'s next, beside the deliveries' writes) every attempt's outcome and the
//! endpoint's new place. A crash between a POST and that commit sends the event again with
//! the same `webhook-id` (at least once; receivers dedupe).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use rand::Rng;
use time::OffsetDateTime;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::client::{Client, Target};
use super::{Endpoint, Secret, WebhookTuning, schedule};
use crate::Shutdown;
use crate::store::{
    DeliveryAttempt, DeliveryOutcome, Event, Recorder, Store, WebhookRound, WebhookRow, WebhookSpec,
};

/// How often the supervisor reads the endpoints table (API changes are seen within this).
const RECONCILE: Duration = Duration::from_secs(2);
/// The pause after a round that was not full (see `endpoint`): events wait at most this long
/// more, and a busy endpoint's rounds carry many events each.
const ROUND_GAP: Duration = Duration::from_millis(100);
/// Of a round's events delivered at the first try, how many (the newest) get a row in the
/// deliveries log (`GET /v1/webhooks/{name}/deliveries` lists 50 by default); every failure
/// and retry gets one.
const LOGGED: usize = 50;
/// What is kept of a response body or an error, in characters.
const KEPT: usize = 1024;

/// Runs the webhooks of this process until `shutdown`: syncs the config's endpoints into the
/// database, then (when `dispatch`) keeps one dispatcher per enabled endpoint, on a thread of
/// their own. Each round is recorded by `recorder`, this process's one writer; its node holds
/// the endpoints' leases.
pub async fn run(
    store: Store,
    recorder: Recorder,
    endpoints: Vec<Endpoint>,
    tuning: WebhookTuning,
    lease_ttl: Duration,
    dispatch: bool,
    shutdown: Shutdown,
) {
    let specs: Vec<WebhookSpec> = endpoints.iter().map(|e| e.spec.clone()).collect();
    loop {
        match store.sync_config_webhooks(&specs).await {
            Ok(()) => break,
            Err(e) => warn!(error = %e, "cannot record the configured webhooks; will try again"),
        }
        tokio::select! {
            _ = shutdown.clone() => return,
            _ = tokio::time::sleep(RECONCILE) => {}
        }
    }
    if !dispatch {
        return;
    }
    let tls = match crate::net::tls_config(None) {
        Ok(t) => t,
        Err(e) => {
            warn!(error = %e, "webhooks cannot start: no TLS configuration");
            return;
        }
    };
    let secrets: HashMap<String, Secret> = endpoints
        .into_iter()
        .map(|e| (e.spec.name, e.secret))
        .collect();
    let parts = Parts {
        ctx: Ctx {
            store,
            recorder,
            tuning,
            lease_ttl,
            tls,
            shutdown,
        },
        secrets,
    };
    // The dispatchers run on a thread of their own with a runtime of its own, at a lower CPU
    // priority than the rest of the process: when deliveries and webhooks want the same CPU,
    // deliveries go first, and events catch up when it is free (`scripts/bench-webhooks.sh`).
    // Where the thread cannot be started, they run here.
    let theirs = parts.clone();
    let (done, finished) = tokio::sync::oneshot::channel();
    let first = specs.first().map_or("", |s| s.name.as_str());
    let started = if crate::faults::hit(crate::faults::WEBHOOK_THREAD_FAIL, first) {
        Err(std::io::Error::other(
            "injected fault: no thread for webhooks",
        ))
    } else {
        std::thread::Builder::new()
            .name("postbox-webhooks".into())
            .spawn(move || {
                // A thread may always lower its own priority; where even that is refused, the
                // dispatchers run at the process's.
                if let Err(e) = rustix::process::setpriority_process(None, NICE) {
                    tracing::debug!(error = %e, "the webhook thread's priority stays as it is");
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                let ran = match rt {
                    Ok(rt) => {
                        rt.block_on(theirs.supervise());
                        true
                    }
                    Err(e) => {
                        warn!(error = %e, "the webhook thread has no runtime");
                        false
                    }
                };
                let _ = done.send(ran);
            })
    };
    let ran = match started {
        Ok(_) => finished.await.unwrap_or(true),
        Err(e) => {
            warn!(error = %e, "cannot start the webhook thread");
            false
        }
    };
    if !ran {
        warn!("webhooks are dispatched on the workers' runtime");
        parts.supervise().await;
    }
}

/// The webhook thread's nice value (0 is the process's, 19 the lowest priority).
const NICE: i32 = 10;

/// What the dispatchers are started with.
#[derive(Clone)]
struct Parts {
    ctx: Ctx,
    secrets: HashMap<String, Secret>,
}

impl Parts {
    /// Keeps one dispatcher per enabled endpoint until shutdown, on the current runtime.
    async fn supervise(self) {
        let mut ctx = self.ctx;
        // PostgreSQL: connections of this runtime's own (see `Store::for_this_runtime`).
        ctx.store = ctx.store.for_this_runtime(2);
        supervise(Arc::new(ctx), self.secrets).await;
    }
}

/// Keeps one dispatcher per enabled endpoint until shutdown.
async fn supervise(ctx: Arc<Ctx>, secrets: HashMap<String, Secret>) {
    let shutdown = ctx.shutdown.clone();
    let mut running: HashMap<String, (Key, JoinHandle<()>)> = HashMap::new();
    loop {
        match ctx.store.webhooks().await {
            Ok(rows) => {
                // Disabled endpoints too: theirs is the lag that grows.
                for r in &rows {
                    if let Ok(lag) = ctx.store.webhook_lag_seconds(&r.name).await {
                        metrics::gauge!("postbox_webhook_lag_seconds", "webhook" => r.name.clone())
                            .set(lag);
                    }
                }
                let mut wanted: HashMap<String, (Key, Arc<Ep>)> = HashMap::new();
                for row in rows.into_iter().filter(|r| r.disabled_at.is_none()) {
                    let secret = match (&row.secret, secrets.get(&row.name)) {
                        (Some(s), _) => Secret::parse(s).ok(),
                        (None, Some(s)) => Some(s.clone()),
                        (None, None) => None,
                    };
                    let (Some(secret), Ok(target)) = (secret, Target::parse(&row.url)) else {
                        continue;
                    };
                    let key = Key::of(&row, &secret);
                    wanted.insert(
                        row.name.clone(),
                        (
                            key,
                            Arc::new(Ep {
                                row,
                                secret,
                                target,
                            }),
                        ),
                    );
                }
                running.retain(|name, (key, task)| {
                    let keep =
                        !task.is_finished() && wanted.get(name).is_some_and(|(k, _)| k == key);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for (name, (key, ep)) in wanted {
                    if running.contains_key(&name) {
                        continue;
                    }
                    info!(webhook = %name, "webhook dispatcher started");
                    let task = tokio::spawn(endpoint(ctx.clone(), ep));
                    running.insert(name, (key, task));
                }
            }
            Err(e) => warn!(error = %e, "cannot read the webhooks; will try again"),
        }
        tokio::select! {
            _ = shutdown.clone() => break,
            _ = tokio::time::sleep(RECONCILE) => {}
        }
    }
    // Each dispatcher ends its round and releases its lease.
    for (_, (_, task)) in running {
        let _ = task.await;
    }
}

#[derive(Clone)]
struct Ctx {
    store: Store,
    /// This process's one writer; its node holds the endpoints' leases.
    recorder: Recorder,
    tuning: WebhookTuning,
    lease_ttl: Duration,
    tls: Arc<tokio_rustls::rustls::ClientConfig>,
    shutdown: Shutdown,
}

struct Ep {
    row: WebhookRow,
    secret: Secret,
    target: Target,
}

/// What a running dispatcher was started with: a change restarts it.
#[derive(PartialEq, Eq)]
struct Key {
    url: String,
    secret: String,
    events: Vec<String>,
    tags: Vec<String>,
}

impl Key {
    fn of(row: &WebhookRow, secret: &Secret) -> Key {
        Key {
            url: row.url.clone(),
            secret: secret.expose(),
            events: row.events.clone(),
            tags: row.tags.clone(),
        }
    }
}

impl Ep {
    fn wants(&self, ev: &Event) -> bool {
        (self.row.events.is_empty() || self.row.events.iter().any(|e| e == ev.kind.as_str()))
            && (self.row.tags.is_empty() || ev.data.tags.iter().any(|t| self.row.tags.contains(t)))
    }
}

/// One endpoint's rounds, until it is disabled, removed, or the process stops.
async fn endpoint(ctx: Arc<Ctx>, ep: Arc<Ep>) {
    let name = ep.row.name.as_str();
    let lease = format!("webhook:{name}");
    let t = &ctx.tuning;
    let client = Client::new(
        ep.target.clone(),
        ctx.tls.clone(),
        Duration::from_secs(t.timeout_secs),
    );
    let poll = Duration::from_millis(t.poll_interval_ms);
    let mut written = ctx.store.events_written();
    let mut lease_until = Instant::now();
    loop {
        if ctx.shutdown.clone().now_or_never().is_some() {
            break;
        }
        // The lease, renewed every third of its life.
        if Instant::now() + ctx.lease_ttl * 2 / 3 >= lease_until {
            match ctx
                .store
                .acquire_lease(&lease, ctx.recorder.node(), ctx.lease_ttl)
                .await
            {
                Ok(true) => lease_until = Instant::now() + ctx.lease_ttl,
                Ok(false) => {
                    lease_until = Instant::now();
                    if wait(&ctx, ctx.lease_ttl / 3, &mut written).await {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    warn!(webhook = %name, error = %e, "cannot take the webhook's lease; will try again");
                    if wait(&ctx, poll, &mut written).await {
                        break;
                    }
                    continue;
                }
            }
        }
        // The lease is renewed while a round runs (a slow endpoint can hold one for minutes);
        // a round whose lease is lost is dropped, unrecorded unless its record was already
        // handed to the writer: the new holder sends its events (again: at least once).
        let work = round(&ctx, &ep, &client);
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                r = &mut work => break Some(r),
                _ = tokio::time::sleep(ctx.lease_ttl / 3) => {
                    match ctx.store.acquire_lease(&lease, ctx.recorder.node(), ctx.lease_ttl).await {
                        Ok(true) => lease_until = Instant::now() + ctx.lease_ttl,
                        _ => {
                            warn!(webhook = %name, "lost the webhook's lease mid-round; \
                                its holder sends what this round did not record");
                            break None;
                        }
                    }
                }
            }
        };
        let Some(result) = result else {
            lease_until = Instant::now();
            continue;
        };
        match result {
            Ok(Round::Worked { full }) => {
                // A round that found fewer events than it could take lets more gather
                // before the next: each round is a transaction (and a sync to disk), so
                // rounds of many events cost delivery less than many rounds of few.
                if !full {
                    tokio::select! {
                        _ = ctx.shutdown.clone() => break,
                        _ = tokio::time::sleep(ROUND_GAP) => {}
                    }
                }
            }
            Ok(Round::Idle) => {
                let next_retry = ctx.store.next_webhook_retry(name).await.ok().flatten();
                let pause = next_retry.map_or(poll, |at| {
                    Duration::try_from(at - OffsetDateTime::now_utc())
                        .unwrap_or_default()
                        .min(poll)
                });
                if wait(&ctx, pause, &mut written).await {
                    break;
                }
            }
            Ok(Round::Stop) => return,
            Err(e) => {
                warn!(webhook = %name, error = %e, "a webhook round failed; will try again");
                if wait(&ctx, poll, &mut written).await {
                    break;
                }
            }
        }
    }
    let _ = ctx.store.release_lease(&lease, ctx.recorder.node()).await;
}

/// Waits for `pause`, new events in this process, or shutdown (true).
async fn wait(ctx: &Ctx, pause: Duration, written: &mut tokio::sync::watch::Receiver<u64>) -> bool {
    tokio::select! {
        _ = ctx.shutdown.clone() => true,
        _ = written.changed() => false,
        _ = tokio::time::sleep(pause) => false,
    }
}

enum Round {
    /// `full`: it took a whole batch (more may be waiting).
    Worked {
        full: bool,
    },
    Idle,
    Stop,
}

async fn round(ctx: &Ctx, ep: &Ep, client: &Client) -> Result<Round, crate::store::StoreError> {
    let name = ep.row.name.as_str();
    let t = &ctx.tuning;
    let Some(row) = ctx.store.webhook(name).await? else {
        return Ok(Round::Stop);
    };
    if row.disabled_at.is_some() {
        return Ok(Round::Stop);
    }
    let retries = ctx.store.due_webhook_retries(name, t.batch).await?;
    let seqs: Vec<i64> = retries.iter().map(|(s, _)| *s).collect();
    let again = ctx.store.events_by_seq(&seqs).await?;
    // A retry whose event is gone (its email aged out by retention) cannot be sent: it ends
    // failed, with the reason, instead of coming due again and again.
    let gone: Vec<DeliveryAttempt> = retries
        .iter()
        .filter(|(s, _)| !again.iter().any(|e| e.seq == *s))
        .map(|(s, n)| DeliveryAttempt {
            event_seq: *s,
            attempts: *n,
            outcome: DeliveryOutcome::Failed,
            response_code: None,
            response: Some("the event is no longer kept (retention); not sent again".into()),
            duration_ms: 0,
        })
        .collect();
    let page = ctx.store.events_after(row.after, t.batch).await?;
    let mut jobs: Vec<(Event, u32)> = Vec::new();
    for ev in again {
        let done = retries
            .iter()
            .find(|(s, _)| *s == ev.seq)
            .map_or(0, |(_, n)| *n);
        jobs.push((ev, done + 1));
    }
    let full = retries.len() + page.events.len() >= t.batch as usize;
    for ev in page.events.into_iter().filter(|e| ep.wants(e)) {
        if !seqs.contains(&ev.seq) {
            jobs.push((ev, 1));
        }
    }
    let moved = (page.next != row.after).then_some(page.next);
    if jobs.is_empty() && moved.is_none() && gone.is_empty() {
        return Ok(Round::Idle);
    }
    let plan = schedule(t);
    let attempts: Vec<DeliveryAttempt> = futures::stream::iter(jobs)
        .map(|(ev, n)| post(ep, client, ev, n, &plan))
        .buffer_unordered(t.concurrency)
        .collect()
        .await;
    for a in &attempts {
        let result = match a.outcome {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retry(_) => "retry",
            DeliveryOutcome::Failed => "failed",
            DeliveryOutcome::Gone => "gone",
        };
        metrics::counter!("postbox_webhook_deliveries_total",
            "webhook" => name.to_string(), "result" => result)
        .increment(1);
    }
    let stopped = attempts.iter().any(|a| a.outcome == DeliveryOutcome::Gone);
    ctx.recorder
        .record_webhook_round(WebhookRound {
            name: name.to_string(),
            after: moved,
            attempts,
            dropped: gone,
            disable_after: Duration::from_secs(t.disable_after_hours * 3600),
            keep_delivered: LOGGED,
        })
        .await?;
    if stopped {
        warn!(webhook = %name, "the endpoint answered 410 Gone: disabled");
        return Ok(Round::Stop);
    }
    Ok(Round::Worked { full })
}

/// POSTs one event (attempt `n`) and says what became of it.
async fn post(ep: &Ep, client: &Client, ev: Event, n: u32, plan: &[Duration]) -> DeliveryAttempt {
    let body = serde_json::to_vec(&ev).expect("an event always serializes");
    let ts = OffsetDateTime::now_utc().unix_timestamp();
    let signature = ep.secret.sign(&ev.id, ts, &body);
    let started = Instant::now();
    let res = client
        .post(
            &[
                ("webhook-id", ev.id.clone()),
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", signature),
            ],
            body.into(),
        )
        .await;
    let duration_ms = started.elapsed().as_millis() as i64;
    let retry_or_fail = || match plan.get(n as usize - 1) {
        Some(wait) => {
            // +-10% so that endpoints coming back are not hit by every retry at once.
            let f = rand::rng().random_range(0.9..1.1);
            DeliveryOutcome::Retry(OffsetDateTime::now_utc() + wait.mul_f64(f))
        }
        None => DeliveryOutcome::Failed,
    };
    let (outcome, code, response) = match res {
        Ok(a) if (200..300).contains(&a.status) => {
            (DeliveryOutcome::Delivered, Some(a.status), a.body)
        }
        Ok(a) if a.status == 410 => (DeliveryOutcome::Gone, Some(a.status), a.body),
        Ok(a) => (retry_or_fail(), Some(a.status), a.body),
        Err(e) => (retry_or_fail(), None, format!("{e:#}")),
    };
    DeliveryAttempt {
        event_seq: ev.seq,
        attempts: n,
        outcome,
        response_code: code,
        response: Some(kept(&response)).filter(|s| !s.is_empty()),
        duration_ms,
    }
}

/// What a database can store of outside text: no NUL or other control characters but tab and
/// newline, at most [`KEPT`] characters.
fn kept(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .take(KEPT)
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn outside_text_is_bounded_and_cleaned() {
        assert_eq!(super::kept("ok\0\x1b[31m\n"), "ok[31m\n");
        assert_eq!(super::kept(&"x".repeat(5000)).len(), super::KEPT);
    }
}
