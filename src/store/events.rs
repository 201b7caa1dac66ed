//! The events feed and the webhook endpoints' bookkeeping.
//!
//! An event is a timeline entry (`postbox_events`) whose kind the state machine maps to an
//! event type (`domain::lifecycle::event_of`): the timeline is the outbox. Every status change
//! writes its entry in its own transaction, so an event exists exactly when its change
//! committed, and raising events costs delivery no extra write.
//!
//! The feed is read in `(tx, seq)` order behind a [`Cursor`]. On SQLite `tx` is 0 (one writer
//! commits in `seq` order). On PostgreSQL `tx` is the writing transaction's id and only rows of
//! transactions older than every running one are read (`pg_snapshot_xmin`), so a reader never
//! steps past a row that a slower transaction commits later.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::open::now;
use super::*;
use crate::db::{DbRow, Tx, sql};
use crate::domain::EventType;
use crate::domain::lifecycle::{NOTES, TABLE, event_of};

/// A place in the events feed: everything at or before it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Cursor {
    pub tx: i64,
    pub seq: i64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.tx, self.seq)
    }
}

impl FromStr for Cursor {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Cursor, Self::Err> {
        const BAD: &str = "must be a cursor from a previous page's `next` (or empty)";
        if s.is_empty() {
            return Ok(Cursor::default());
        }
        let (tx, seq) = s.split_once('-').ok_or(BAD)?;
        let tx: i64 = tx.parse().map_err(|_| BAD)?;
        let seq: i64 = seq.parse().map_err(|_| BAD)?;
        if tx < 0 || seq < 0 {
            return Err(BAD);
        }
        Ok(Cursor { tx, seq })
    }
}

/// One event, as the feed and the webhooks carry it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Event {
    /// Stable across redeliveries (a webhook's `webhook-id`): receivers dedupe on it.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub timestamp: OffsetDateTime,
    pub data: EventData,
    #[serde(skip)]
    pub(crate) seq: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventData {
    /// The email (absent for mailbox.down / mailbox.up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email_id: Option<String>,
    /// The watched mailbox (mailbox.* and alert.raised events).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailbox: Option<String>,
    /// Every recipient (to, cc, bcc).
    pub recipients: Vec<String>,
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    /// The email's status after this event.
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smtp_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smtp_text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The request that submitted the email.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The timeline kinds that are events (the others, `interrupted`, are not).
fn event_kinds() -> String {
    let mut kinds: Vec<&str> = TABLE.iter().filter_map(|t| t.entry).collect();
    kinds.push("failed");
    kinds.extend(NOTES.iter().map(|(k, _)| *k));
    kinds.sort_unstable();
    kinds.dedup();
    let list: Vec<String> = kinds.iter().map(|k| format!("'{k}'")).collect();
    format!("ev.kind IN ({})", list.join(", "))
}

/// Rows of transactions that may still be running are not read yet (see the module's doc).
fn settled(kind: Kind) -> &'static str {
    match kind {
        Kind::Sqlite => "",
        Kind::Postgres => {
            "AND ev.tx < CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS TEXT) AS BIGINT)"
        }
    }
}

/// An event's public id: `evt_` and its timeline seq.
fn event_id(seq: i64) -> String {
    format!("evt_{seq}")
}

/// The timeline seq of a public event id ([`event_id`]'s inverse); `None` if it is not one.
pub fn event_seq(id: &str) -> Option<i64> {
    id.strip_prefix("evt_")?.parse().ok().filter(|n| *n > 0)
}

/// The feed's rows after the cursor (`tx`, `seq`: SQL expressions), as a range the index
/// `postbox_events_feed (tx, seq)` answers with one seek. (`tx > t OR (tx = t AND seq > s)`
/// made SQLite scan that index from its start at every read: every round of a webhook
/// dispatcher, and its lag every few seconds, cost a pass over the whole timeline.)
fn feed_after(kind: Kind, tx: &str, seq: &str) -> String {
    match kind {
        // One writer commits in seq order: `tx` is 0 on every row and in every cursor handed out.
        Kind::Sqlite => format!("ev.tx = {tx} AND ev.seq > {seq}"),
        Kind::Postgres => format!("(ev.tx, ev.seq) > ({tx}, {seq})"),
    }
}

/// A page of the feed: `$1`, `$2` the cursor, `$3` the limit.
fn page_sql(kind: Kind) -> String {
    format!(
        "SELECT {EVENT_COLUMNS} FROM postbox_events ev
           LEFT JOIN postbox_emails e ON e.id = ev.email_id
          WHERE {} {}
          ORDER BY ev.tx, ev.seq LIMIT $3",
        feed_after(kind, "$1", "$2"),
        settled(kind)
    )
}

/// The time of endpoint `$1`'s oldest unread row.
fn lag_seconds_sql(kind: Kind) -> String {
    format!(
        "SELECT ev.at FROM postbox_events ev, postbox_webhooks w
          WHERE w.name = $1 AND {}
          ORDER BY ev.tx, ev.seq LIMIT 1",
        feed_after(kind, "w.after_tx", "w.after_seq")
    )
}

/// How many events endpoint `$1` has not read, up to `$2`.
fn lag_count_sql(kind: Kind) -> String {
    format!(
        "SELECT COUNT(*) FROM (SELECT 1 FROM postbox_events ev, postbox_webhooks w
          WHERE w.name = $1 AND {}
            AND {} LIMIT $2) behind",
        feed_after(kind, "w.after_tx", "w.after_seq"),
        event_kinds()
    )
}

const EVENT_COLUMNS: &str = "ev.seq, ev.tx, ev.email_id, ev.at, ev.kind, ev.status, ev.attempt,
    ev.smtp_code, ev.smtp_text, ev.detail, ev.mailbox, e.recipients, e.tags, e.spec, e.request_id";

/// The part of a stored email an event carries that has no column of its own.
#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

fn event_from(row: &DbRow) -> Result<Option<(Cursor, Event)>, StoreError> {
    let kind: String = row.get("kind")?;
    let status: String = row.get("status")?;
    let cursor = Cursor {
        tx: row.get("tx")?,
        seq: row.get("seq")?,
    };
    let Some(ty) = event_of(&kind, &status) else {
        return Ok(None);
    };
    let words = |c: &str| -> Result<Vec<String>, StoreError> {
        Ok(row
            .get::<Option<String>>(c)?
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect())
    };
    let metadata = row
        .get::<Option<String>>("spec")?
        .and_then(|s| serde_json::from_str::<Meta>(&s).ok())
        .map(|m| m.metadata)
        .unwrap_or_default();
    Ok(Some((
        cursor,
        Event {
            id: event_id(cursor.seq),
            kind: ty,
            timestamp: from_ms(row.get("at")?),
            seq: cursor.seq,
            data: EventData {
                email_id: Some(row.get::<String>("email_id")?).filter(|e| !e.is_empty()),
                mailbox: row.get::<Option<String>>("mailbox")?.or_else(|| {
                    metadata
                        .get("mailbox")
                        .filter(|_| ty == EventType::AlertRaised)
                        .cloned()
                }),
                recipients: words("recipients")?,
                tags: words("tags")?,
                metadata,
                status,
                attempt: row.get::<Option<i64>>("attempt")?.map(|a| a as u32),
                smtp_code: row.get::<Option<i64>>("smtp_code")?.map(|c| c as u16),
                smtp_text: row.get("smtp_text")?,
                detail: row.get("detail")?,
                request_id: row.get("request_id")?,
            },
        },
    )))
}

/// A page of the feed.
#[derive(Debug, Clone)]
pub struct EventPage {
    pub events: Vec<Event>,
    /// Where the next page starts (past every row read, events or not).
    pub next: Cursor,
}

/// A webhook endpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRow {
    pub name: String,
    pub url: String,
    /// Only endpoints added over the API keep theirs here.
    pub secret: Option<String>,
    pub events: Vec<String>,
    pub tags: Vec<String>,
    pub source: String,
    pub after: Cursor,
    pub failing_since: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    pub disabled_at: Option<OffsetDateTime>,
    pub disabled_reason: Option<String>,
}

/// What an endpoint is told to be: from the config, or from `POST /v1/webhooks`.
#[derive(Debug, Clone)]
pub struct WebhookSpec {
    pub name: String,
    pub url: String,
    pub secret: Option<String>,
    pub events: Vec<String>,
    pub tags: Vec<String>,
}

/// One attempt to deliver one event to one endpoint, as the dispatcher saw it.
#[derive(Debug, Clone)]
pub struct DeliveryAttempt {
    pub event_seq: i64,
    /// Attempts so far, this one included.
    pub attempts: u32,
    pub outcome: DeliveryOutcome,
    pub response_code: Option<u16>,
    pub response: Option<String>,
    pub duration_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    Delivered,
    /// Try again at this time.
    Retry(OffsetDateTime),
    /// Retries spent.
    Failed,
    /// The endpoint answered 410 Gone: it is disabled.
    Gone,
}

/// A delivery row, for listings.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryRecord {
    pub id: i64,
    pub event_id: String,
    pub attempts: u32,
    /// delivered | retrying | failed
    pub state: String,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub next_at: Option<OffsetDateTime>,
    pub response_code: Option<u16>,
    pub response: Option<String>,
    pub duration_ms: Option<i64>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
}

fn opt_time(row: &DbRow, c: &str) -> Result<Option<OffsetDateTime>, StoreError> {
    Ok(row.get::<Option<i64>>(c)?.map(from_ms))
}

fn webhook_from(row: &DbRow) -> Result<WebhookRow, StoreError> {
    let words = |c: &str| -> Result<Vec<String>, StoreError> {
        Ok(row
            .get::<String>(c)?
            .split_whitespace()
            .map(str::to_string)
            .collect())
    };
    Ok(WebhookRow {
        name: row.get("name")?,
        url: row.get("url")?,
        secret: row.get("secret")?,
        events: words("events")?,
        tags: words("tags")?,
        source: row.get("source")?,
        after: Cursor {
            tx: row.get("after_tx")?,
            seq: row.get("after_seq")?,
        },
        failing_since: opt_time(row, "failing_since")?,
        last_error: row.get("last_error")?,
        disabled_at: opt_time(row, "disabled_at")?,
        disabled_reason: row.get("disabled_reason")?,
    })
}

impl Store {
    /// Up to `limit` events after `after`, oldest first.
    pub async fn events_after(&self, after: Cursor, limit: u32) -> Result<EventPage, StoreError> {
        let rows = sql(page_sql(self.kind()))
            .bind(after.tx)
            .bind(after.seq)
            .bind(limit as i64)
            .fetch_all(&self.db)
            .await?;
        let mut next = after;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let cursor = Cursor {
                tx: row.get("tx")?,
                seq: row.get("seq")?,
            };
            next = next.max(cursor);
            if let Some((_, ev)) = event_from(row)? {
                events.push(ev);
            }
        }
        Ok(EventPage { events, next })
    }

    /// The events with these timeline `seq`s (a webhook's redeliveries), in seq order.
    pub async fn events_by_seq(&self, seqs: &[i64]) -> Result<Vec<Event>, StoreError> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<String> = (1..=seqs.len()).map(|i| format!("${i}")).collect();
        let mut q = sql(format!(
            "SELECT {EVENT_COLUMNS} FROM postbox_events ev
               LEFT JOIN postbox_emails e ON e.id = ev.email_id
              WHERE ev.seq IN ({}) ORDER BY ev.seq",
            list.join(", ")
        ));
        for s in seqs {
            q.add(*s);
        }
        let rows = q.fetch_all(&self.db).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some((_, ev)) = event_from(row)? {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// Every event of one email, oldest first.
    pub async fn email_events(&self, id: &EmailId) -> Result<Vec<Event>, StoreError> {
        let rows = sql(format!(
            "SELECT {EVENT_COLUMNS} FROM postbox_events ev
               LEFT JOIN postbox_emails e ON e.id = ev.email_id
              WHERE ev.email_id = $1 AND {} ORDER BY ev.seq",
            event_kinds()
        ))
        .bind(id.as_str())
        .fetch_all(&self.db)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some((_, ev)) = event_from(row)? {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// The end of the feed as of now: a new endpoint starts here (it gets what happens next).
    pub async fn feed_end(&self) -> Result<Cursor, StoreError> {
        let row = sql(format!(
            "SELECT ev.tx, ev.seq FROM postbox_events ev WHERE 1 = 1 {}
              ORDER BY ev.tx DESC, ev.seq DESC LIMIT 1",
            settled(self.kind())
        ))
        .fetch_optional(&self.db)
        .await?;
        Ok(match row {
            Some(r) => Cursor {
                tx: r.get("tx")?,
                seq: r.get("seq")?,
            },
            None => Cursor::default(),
        })
    }

    /// Makes the config's endpoints (source `config`) what `specs` say: new ones start at the
    /// end of the feed, changed ones keep their place, ones no longer configured are removed
    /// (with their delivery rows). Endpoints added over the API are left alone.
    pub async fn sync_config_webhooks(&self, specs: &[WebhookSpec]) -> Result<(), StoreError> {
        let end = self.feed_end().await?;
        let now = ms(now());
        let mut tx = self.db.begin_write().await?;
        let existing: Vec<String> =
            sql("SELECT name FROM postbox_webhooks WHERE source = 'config'")
                .column::<String>(&mut tx)
                .await?;
        for name in existing
            .iter()
            .filter(|n| !specs.iter().any(|s| &s.name == *n))
        {
            delete_webhook_in(&mut tx, name).await?;
        }
        for s in specs {
            upsert_webhook_in(&mut tx, s, "config", end, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Adds (or replaces the settings of) an endpoint made over the API; a replaced endpoint
    /// keeps its place in the feed and is enabled again. Refused (false) when the name
    /// belongs to the config.
    pub async fn put_webhook(&self, spec: &WebhookSpec) -> Result<bool, StoreError> {
        let end = self.feed_end().await?;
        let mut tx = self.db.begin_write().await?;
        let source: Option<String> = sql("SELECT source FROM postbox_webhooks WHERE name = $1")
            .bind(spec.name.as_str())
            .scalar(&mut tx)
            .await?;
        if source.as_deref() == Some("config") {
            return Ok(false);
        }
        upsert_webhook_in(&mut tx, spec, "api", end, ms(now())).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Removes an endpoint made over the API. False when there is none (or it is the config's).
    pub async fn delete_webhook(&self, name: &str) -> Result<bool, StoreError> {
        let mut tx = self.db.begin_write().await?;
        let source: Option<String> = sql("SELECT source FROM postbox_webhooks WHERE name = $1")
            .bind(name)
            .scalar(&mut tx)
            .await?;
        if source.as_deref() != Some("api") {
            return Ok(false);
        }
        delete_webhook_in(&mut tx, name).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Enables an endpoint again (after it was disabled); true if it exists.
    pub async fn enable_webhook(&self, name: &str) -> Result<bool, StoreError> {
        let n = sql(
            "UPDATE postbox_webhooks SET disabled_at = NULL, disabled_reason = NULL,
                    failing_since = NULL, updated_at = $1 WHERE name = $2",
        )
        .bind(ms(now()))
        .bind(name)
        .execute(&self.db)
        .await?;
        Ok(n == 1)
    }

    pub async fn webhooks(&self) -> Result<Vec<WebhookRow>, StoreError> {
        let rows = sql("SELECT * FROM postbox_webhooks ORDER BY name")
            .fetch_all(&self.db)
            .await?;
        rows.iter().map(webhook_from).collect()
    }

    pub async fn webhook(&self, name: &str) -> Result<Option<WebhookRow>, StoreError> {
        let row = sql("SELECT * FROM postbox_webhooks WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.db)
            .await?;
        row.as_ref().map(webhook_from).transpose()
    }

    /// Deliveries of `name` waiting for a retry that is due, oldest first: `(event seq,
    /// attempts so far)`.
    pub async fn due_webhook_retries(
        &self,
        name: &str,
        limit: u32,
    ) -> Result<Vec<(i64, u32)>, StoreError> {
        let rows = sql("SELECT event_seq, attempts FROM postbox_webhook_deliveries
              WHERE webhook = $1 AND state = 'retrying' AND next_at <= $2
              ORDER BY next_at LIMIT $3")
        .bind(name)
        .bind(ms(now()))
        .bind(limit as i64)
        .fetch_all(&self.db)
        .await?;
        rows.iter()
            .map(|r| Ok((r.get("event_seq")?, r.get::<i64>("attempts")? as u32)))
            .collect()
    }

    /// When the next retry of `name` falls due, if any waits.
    pub async fn next_webhook_retry(
        &self,
        name: &str,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        let at: Option<Option<i64>> = sql("SELECT MIN(next_at) FROM postbox_webhook_deliveries
              WHERE webhook = $1 AND state = 'retrying'")
        .bind(name)
        .scalar(&self.db)
        .await?;
        Ok(at.flatten().map(from_ms))
    }

    /// The deliveries of `name`'s latest events, newest first.
    pub async fn webhook_deliveries(
        &self,
        name: &str,
        limit: u32,
    ) -> Result<Vec<DeliveryRecord>, StoreError> {
        let rows = sql("SELECT * FROM postbox_webhook_deliveries WHERE webhook = $1
              ORDER BY event_seq DESC LIMIT $2")
        .bind(name)
        .bind(limit as i64)
        .fetch_all(&self.db)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeliveryRecord {
                    id: r.get("id")?,
                    event_id: event_id(r.get::<i64>("event_seq")?),
                    attempts: r.get::<i64>("attempts")? as u32,
                    state: r.get("state")?,
                    next_at: opt_time(r, "next_at")?,
                    response_code: r.get::<Option<i64>>("response_code")?.map(|c| c as u16),
                    response: r.get("response")?,
                    duration_ms: r.get("duration_ms")?,
                    updated_at: from_ms(r.get("updated_at")?),
                })
            })
            .collect()
    }

    /// Sends delivery `id` of `name` again now (whatever its state). False if there is none.
    pub async fn redeliver(&self, name: &str, id: i64) -> Result<bool, StoreError> {
        let n = sql(
            "UPDATE postbox_webhook_deliveries SET state = 'retrying', next_at = $1, updated_at = $1
              WHERE webhook = $2 AND id = $3",
        )
        .bind(ms(now()))
        .bind(name)
        .bind(id)
        .execute(&self.db)
        .await?;
        Ok(n == 1)
    }

    /// Sends event `seq` to `name` again now, with its `webhook-id`, whether or not it has a
    /// delivery row (a first-try success in a busy round has none: [`logged`]). False if the
    /// endpoint or the event is unknown.
    pub async fn redeliver_event(&self, name: &str, seq: i64) -> Result<bool, StoreError> {
        let n = sql("INSERT INTO postbox_webhook_deliveries
                 (webhook, event_seq, attempts, state, next_at, created_at, updated_at)
             SELECT w.name, ev.seq, 1, 'retrying', $1, $1, $1
               FROM postbox_webhooks w, postbox_events ev
              WHERE w.name = $2 AND ev.seq = $3
             ON CONFLICT (webhook, event_seq) DO UPDATE SET state = 'retrying',
                 next_at = excluded.next_at, updated_at = excluded.updated_at")
        .bind(ms(now()))
        .bind(name)
        .bind(seq)
        .execute(&self.db)
        .await?;
        Ok(n == 1)
    }

    /// How long the oldest timeline entry `name` has not read yet has waited (zero when it is
    /// caught up): one index probe, so it can be read every few seconds at any backlog.
    pub async fn webhook_lag_seconds(&self, name: &str) -> Result<f64, StoreError> {
        // In feed order, (tx, seq), as the dispatcher reads: by seq alone, a row an earlier
        // transaction committed after a later one (PostgreSQL) counts as unread once read.
        let at: Option<i64> = sql(lag_seconds_sql(self.kind()))
            .bind(name)
            .scalar(&self.db)
            .await?;
        Ok(at.map_or(0.0, |at| ((ms(now()) - at).max(0) as f64) / 1e3))
    }

    /// How many events `name` is behind the end of the feed (its outbox lag), counted up to
    /// [`LAG_COUNT_MAX`]: `(count, true)` means at least that many. Bounded, so listing an
    /// endpoint disabled behind a large backlog reads at most that many index entries.
    pub async fn webhook_lag(&self, name: &str) -> Result<(i64, bool), StoreError> {
        let n: Option<i64> = sql(lag_count_sql(self.kind()))
            .bind(name)
            .bind(LAG_COUNT_MAX + 1)
            .scalar(&self.db)
            .await?;
        let n = n.unwrap_or(0);
        Ok((n.min(LAG_COUNT_MAX), n > LAG_COUNT_MAX))
    }
}

/// The most events [`Store::webhook_lag`] counts.
pub const LAG_COUNT_MAX: i64 = 10_000;

async fn upsert_webhook_in(
    tx: &mut Tx,
    s: &WebhookSpec,
    source: &str,
    end: Cursor,
    now: i64,
) -> Result<(), StoreError> {
    sql(
        "INSERT INTO postbox_webhooks (name, url, secret, events, tags, source, after_tx,
             after_seq, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
         ON CONFLICT (name) DO UPDATE SET url = excluded.url, secret = excluded.secret,
             events = excluded.events, tags = excluded.tags, source = excluded.source,
             disabled_at = CASE WHEN postbox_webhooks.source = 'api'
                                THEN NULL ELSE postbox_webhooks.disabled_at END,
             disabled_reason = CASE WHEN postbox_webhooks.source = 'api'
                                    THEN NULL ELSE postbox_webhooks.disabled_reason END,
             updated_at = excluded.updated_at",
    )
    .bind(s.name.as_str())
    .bind(s.url.as_str())
    .bind(s.secret.as_deref())
    .bind(s.events.join(" "))
    .bind(s.tags.join(" "))
    .bind(source)
    .bind(end.tx)
    .bind(end.seq)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn delete_webhook_in(tx: &mut Tx, name: &str) -> Result<(), StoreError> {
    sql("DELETE FROM postbox_webhook_deliveries WHERE webhook = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    sql("DELETE FROM postbox_webhooks WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// What one round of dispatch to an endpoint did, to record in the one writer's next
/// transaction (`Recorder::record_webhook_round`): each attempt's delivery row, the endpoint's
/// new place in the feed (`after`, when new events were read), and its health: a success
/// clears `failing_since`; failures since longer than `disable_after` (or a 410) disable it,
/// with the reason. `dropped` are deliveries that were not posted (their event is gone):
/// recorded, but they say nothing of the endpoint. Of the events delivered at their first try,
/// only the newest `keep_delivered` get a row (see [`logged`]).
#[derive(Debug, Clone)]
pub struct WebhookRound {
    pub name: String,
    pub after: Option<Cursor>,
    pub attempts: Vec<DeliveryAttempt>,
    pub dropped: Vec<DeliveryAttempt>,
    pub disable_after: std::time::Duration,
    pub keep_delivered: usize,
}

/// Writes `round` in the caller's transaction (see [`WebhookRound`]).
pub(super) async fn webhook_round_in(tx: &mut Tx, round: &WebhookRound) -> Result<(), StoreError> {
    let WebhookRound {
        name,
        after,
        attempts,
        dropped,
        disable_after,
        keep_delivered,
    } = round;
    let (name, after, disable_after) = (name.as_str(), *after, *disable_after);
    let all = logged(attempts, dropped, *keep_delivered);
    let now_t = now();
    let now = ms(now_t);
    // Many rows per statement: one round trip for a whole round (10 columns a row: 200
    // rows stay far below SQLite's parameter limit).
    for chunk in all.chunks(200) {
        let mut q = sql(format!(
            "INSERT INTO postbox_webhook_deliveries (webhook, event_seq, attempts, state,
                 next_at, response_code, response, duration_ms, created_at, updated_at)
             VALUES {}
             ON CONFLICT (webhook, event_seq) DO UPDATE SET attempts = excluded.attempts,
                 state = excluded.state, next_at = excluded.next_at,
                 response_code = excluded.response_code, response = excluded.response,
                 duration_ms = excluded.duration_ms, updated_at = excluded.updated_at",
            crate::db::values(chunk.len(), 10, 1)
        ));
        for a in chunk {
            let (state, next_at) = match &a.outcome {
                DeliveryOutcome::Delivered => ("delivered", None),
                DeliveryOutcome::Retry(at) => ("retrying", Some(ms(*at))),
                DeliveryOutcome::Failed | DeliveryOutcome::Gone => ("failed", None),
            };
            q.add(name)
                .add(a.event_seq)
                .add(a.attempts as i64)
                .add(state)
                .add(next_at)
                .add(a.response_code.map(i64::from))
                .add(a.response.as_deref())
                .add(a.duration_ms)
                .add(now)
                .add(now);
        }
        q.execute(&mut *tx).await?;
    }
    if let Some(c) = after {
        sql(
            "UPDATE postbox_webhooks SET after_tx = $1, after_seq = $2, updated_at = $3
              WHERE name = $4",
        )
        .bind(c.tx)
        .bind(c.seq)
        .bind(now)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    }
    let ok = attempts
        .iter()
        .any(|a| a.outcome == DeliveryOutcome::Delivered);
    let bad = attempts
        .iter()
        .rev()
        .find(|a| a.outcome != DeliveryOutcome::Delivered);
    if ok {
        sql(
            "UPDATE postbox_webhooks SET failing_since = NULL, last_error = NULL
              WHERE name = $1",
        )
        .bind(name)
        .execute(&mut *tx)
        .await?;
    } else if let Some(b) = bad {
        let error = match (&b.response_code, &b.response) {
            (Some(c), Some(r)) => format!("HTTP {c}: {r}"),
            (Some(c), None) => format!("HTTP {c}"),
            (None, Some(r)) => r.clone(),
            (None, None) => "no answer".into(),
        };
        sql(
            "UPDATE postbox_webhooks SET failing_since = COALESCE(failing_since, $1),
                    last_error = $2 WHERE name = $3",
        )
        .bind(now)
        .bind(error.as_str())
        .bind(name)
        .execute(&mut *tx)
        .await?;
        let gone = attempts.iter().any(|a| a.outcome == DeliveryOutcome::Gone);
        let cutoff = now - disable_after.as_millis() as i64;
        let reason = if gone {
            "the endpoint answered 410 Gone".to_string()
        } else {
            format!(
                "failing for more than {} h; last error: {error}",
                disable_after.as_secs() / 3600
            )
        };
        sql(
            "UPDATE postbox_webhooks SET disabled_at = $1, disabled_reason = $2
              WHERE name = $3 AND disabled_at IS NULL
                AND ($4 = 1 OR failing_since <= $5)",
        )
        .bind(now)
        .bind(reason.as_str())
        .bind(name)
        .bind(gone as i64)
        .bind(cutoff)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// The attempts of a round that get a delivery row: every one that was not delivered, every
/// retry's (its row moves to delivered or on), and the newest `keep` of the events delivered at
/// their first try. A busy endpoint's round carries hundreds of those; a row each was half of
/// what webhooks cost delivery on SQLite (`scripts/bench-webhooks.sh`), and the log shows the
/// newest first anyway. The others are recorded by the endpoint's place in the feed (past
/// them, with no row that says otherwise: delivered) and the deliveries counter.
fn logged<'a>(
    attempts: &'a [DeliveryAttempt],
    dropped: &'a [DeliveryAttempt],
    keep: usize,
) -> Vec<&'a DeliveryAttempt> {
    let first_ok = |a: &DeliveryAttempt| a.outcome == DeliveryOutcome::Delivered && a.attempts == 1;
    let mut ok: Vec<i64> = attempts
        .iter()
        .filter(|a| first_ok(a))
        .map(|a| a.event_seq)
        .collect();
    ok.sort_unstable();
    // The oldest seq still kept.
    let from = match ok.len().checked_sub(keep) {
        Some(skip) if keep > 0 => ok[skip],
        Some(_) => i64::MAX,
        None => i64::MIN,
    };
    attempts
        .iter()
        .chain(dropped)
        .filter(|a| !first_ok(a) || a.event_seq >= from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite reads the feed with a seek on `postbox_events_feed`, never a scan of the
    /// timeline: what each dispatcher round and each lag reading costs must not grow with it.
    #[tokio::test]
    async fn the_feed_is_read_with_a_seek_not_a_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, read) = crate::store::sqlite_for_plans(dir.path()).await;
        for (text, args) in [
            (page_sql(Kind::Sqlite), 3),
            (lag_seconds_sql(Kind::Sqlite), 1),
            (lag_count_sql(Kind::Sqlite), 2),
        ] {
            let details = crate::store::query_plan(&read, &text, args).await;
            assert!(
                details
                    .iter()
                    .any(|d| d.contains("postbox_events_feed (tx=? AND seq>?)")),
                "{text}: {details:?}"
            );
            assert!(
                !details.iter().any(|d| d.starts_with("SCAN ev")),
                "{text}: {details:?}"
            );
        }
    }

    #[test]
    fn event_ids_round_trip_and_bad_ones_are_refused() {
        assert_eq!(event_seq(&event_id(42)), Some(42));
        for bad in [
            "42",
            "evt_",
            "evt_0",
            "evt_-1",
            "evt_x",
            "ev_1",
            "evt_99999999999999999999",
        ] {
            assert_eq!(event_seq(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_round_logs_its_failures_and_retries_and_its_newest_first_try_deliveries() {
        let at = |seq: i64, attempts: u32, outcome: DeliveryOutcome| DeliveryAttempt {
            event_seq: seq,
            attempts,
            outcome,
            response_code: None,
            response: None,
            duration_ms: 0,
        };
        let soon = OffsetDateTime::now_utc();
        // Delivered first try: 10, 11, 12, 13 (out of order, as buffer_unordered finishes);
        // a retry delivered (5), a failure (14), a retry to come (15), one dropped (3).
        let attempts = vec![
            at(12, 1, DeliveryOutcome::Delivered),
            at(14, 1, DeliveryOutcome::Failed),
            at(10, 1, DeliveryOutcome::Delivered),
            at(5, 3, DeliveryOutcome::Delivered),
            at(13, 1, DeliveryOutcome::Delivered),
            at(15, 1, DeliveryOutcome::Retry(soon)),
            at(11, 1, DeliveryOutcome::Delivered),
        ];
        let dropped = vec![at(3, 2, DeliveryOutcome::Failed)];
        let seqs = |keep| {
            let mut v: Vec<i64> = logged(&attempts, &dropped, keep)
                .iter()
                .map(|a| a.event_seq)
                .collect();
            v.sort_unstable();
            v
        };
        assert_eq!(seqs(2), vec![3, 5, 12, 13, 14, 15]);
        assert_eq!(seqs(0), vec![3, 5, 14, 15]);
        assert_eq!(seqs(4), vec![3, 5, 10, 11, 12, 13, 14, 15]);
        assert_eq!(seqs(100), vec![3, 5, 10, 11, 12, 13, 14, 15]);
    }

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let c = Cursor { tx: 7, seq: 42 };
        assert_eq!(c.to_string().parse::<Cursor>(), Ok(c));
        assert_eq!("".parse::<Cursor>(), Ok(Cursor::default()));
        for bad in ["x", "1", "1-", "-1-2", "1-x", "9999999999999999999999-1"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad}");
        }
    }
}
