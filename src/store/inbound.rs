//! What the IMAP watcher keeps: each mailbox's position and health, rule matches ("hits") and
//! alert groups. A scan's hits and the advanced position commit in ONE transaction, and so does
//! every alert email made from due hits, so a crash re-reads messages but never alerts twice.

use std::time::Duration;

use crate::db::{Lock, Tx, sql};
use serde::Serialize;
use time::OffsetDateTime;

use super::open::now;
use super::{NewRow, Store, StoreError, from_ms, ms};
use crate::domain::EmailId;

/// Where a mailbox's watcher is: the folder's UIDVALIDITY and the last UID it has processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxPosition {
    pub uidvalidity: u32,
    pub last_uid: u32,
}

/// A rule match to store.
#[derive(Debug, Clone)]
pub struct NewHit {
    pub rule: String,
    pub group_key: String,
    /// (UIDVALIDITY, UID) of the message; `None` for the watcher's own alerts.
    pub uid: Option<(u32, u32)>,
    pub fingerprint: String,
    /// The message's sender (lower-cased address; empty when it has none).
    pub sender: String,
    /// What the alert shows about the message (JSON object).
    pub detail: serde_json::Value,
    pub group_wait: Duration,
    pub repeat_interval: Duration,
}

/// Pending hits an alert lists; the rest are counted.
pub const MAX_LISTED: usize = 25;
/// Distinct senders an alert names (with their counts).
pub const MAX_SENDERS: usize = 10;

/// A group whose alert is due: what it holds, loaded in bounded pieces whatever the number of
/// pending hits (a storm of a million matches loads 25 hits and a few counts).
#[derive(Debug, Clone)]
pub struct DueGroup {
    pub mailbox: String,
    pub rule: String,
    pub group_key: String,
    /// Alerts this group raised before (0 for the first).
    pub alerts_before: u64,
    /// Hits pending in all.
    pub count: u64,
    pub first_seen: OffsetDateTime,
    pub last_seen: OffsetDateTime,
    /// The oldest pending hits, at most [`MAX_LISTED`].
    pub listed: Vec<PendingHit>,
    /// The newest pending hit (its `summary`, if any, leads the alert).
    pub last: Option<PendingHit>,
    /// Senders of every pending hit with their counts, most first, at most [`MAX_SENDERS`].
    pub senders: Vec<(String, u64)>,
}

#[derive(Debug, Clone)]
pub struct PendingHit {
    pub seen_at: OffsetDateTime,
    pub detail: serde_json::Value,
}

/// Makes the alert email of a due group (None: drop the hits, e.g. the rule is gone).
pub type AlertBuilder<'a> = &'a (dyn Fn(&DueGroup) -> Option<NewRow> + Sync);

/// What a stored scan did.
#[derive(Debug, Clone, Default)]
pub struct ScanOutcome {
    /// Hits stored (a hit seen before, by UID or fingerprint, is not stored again).
    pub new_hits: u64,
    /// Alert emails created in the same transaction, with their mailbox.
    pub alerts: Vec<(String, EmailId)>,
}

/// A watcher's health, as it reports it.
#[derive(Debug, Clone)]
pub enum Health<'a> {
    Connected {
        idle: bool,
    },
    Down {
        since: OffsetDateTime,
        error: &'a str,
    },
}

/// A mailbox as `GET /v1/mailboxes` and the dashboard show it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MailboxStatus {
    pub name: String,
    /// `starting`, `connected` or `down`.
    pub state: String,
    pub idle: bool,
    pub uidvalidity: Option<u32>,
    pub last_uid: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub connected_since: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub down_since: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_poll_at: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    pub scanned: u64,
    pub matched: u64,
    pub alerts: u64,
    pub resyncs: u64,
    /// The process that holds this mailbox's watcher lease (`host-pid-ulid`), while its lease
    /// runs; None when no process watches it (its last holder died or stopped).
    pub lease_holder: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub lease_expires_at: Option<OffsetDateTime>,
    /// Per rule: hits stored, hits waiting for their alert, alerts raised.
    pub rules: Vec<RuleStatus>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RuleStatus {
    pub rule: String,
    pub hits: u64,
    pub pending: u64,
    pub alerts: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub last_alert_at: Option<OffsetDateTime>,
}

/// The lease that makes one process in the cluster the watcher of `mailbox`.
pub fn lease_name(mailbox: &str) -> String {
    format!("mailbox:{mailbox}")
}

/// The lease a delivering process renews while it lives: its claims are not taken over while
/// it runs (see `store/batch.rs`).
pub fn node_lease(node: &str) -> String {
    format!("node:{node}")
}

impl Store {
    /// Takes the lease `name` for `holder` until `ttl` from now, or renews it if `holder` has
    /// it. True when `holder` holds it afterwards; false while another holder's lease runs.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = ms(now());
        let n = sql(
            "INSERT INTO postbox_leases (name, holder, acquired_at, expires_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT(name) DO UPDATE SET holder = $2, expires_at = $4,
                 acquired_at = CASE WHEN postbox_leases.holder = $2
                                    THEN postbox_leases.acquired_at ELSE $3 END
              WHERE postbox_leases.holder = $2 OR postbox_leases.expires_at < $3",
        )
        .bind(name)
        .bind(holder)
        .bind(now)
        .bind(now + ttl.as_millis() as i64)
        .execute(&self.db)
        .await?;
        Ok(n == 1)
    }

    /// Worker processes alive now (their `node:` leases run).
    pub async fn live_nodes(&self) -> Result<u64, StoreError> {
        let n = sql(
            "SELECT COUNT(*) FROM postbox_leases WHERE name LIKE 'node:%' AND expires_at >= $1",
        )
        .bind(ms(now()))
        .scalar::<i64>(&self.db)
        .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Gives the lease up (a clean shutdown), so a standby takes over at once.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        sql("DELETE FROM postbox_leases WHERE name = $1 AND holder = $2")
            .bind(name)
            .bind(holder)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// Inside a write: does `holder` still hold an unexpired lease? (PostgreSQL also locks the
    /// row, so a takeover waits for this transaction.)
    async fn lease_held(&self, tx: &mut Tx, name: &str, holder: &str) -> Result<bool, StoreError> {
        let n = sql("UPDATE postbox_leases SET holder = holder
              WHERE name = $1 AND holder = $2 AND expires_at >= $3")
        .bind(name)
        .bind(holder)
        .bind(ms(now()))
        .execute(&mut *tx)
        .await?;
        Ok(n == 1)
    }

    /// The stored position of `mailbox`, if it was ever scanned.
    pub async fn mailbox_position(
        &self,
        mailbox: &str,
    ) -> Result<Option<MailboxPosition>, StoreError> {
        let row = sql(
            "SELECT uidvalidity, last_uid FROM postbox_mailboxes WHERE name = $1 AND uidvalidity IS NOT NULL",
        )
        .bind(mailbox)
        .fetch_optional(&self.db)
        .await?;
        Ok(match row {
            Some(r) => Some(MailboxPosition {
                uidvalidity: r.get::<i64>("uidvalidity")? as u32,
                last_uid: r.get::<i64>("last_uid")? as u32,
            }),
            None => None,
        })
    }

    /// Stores a new position without hits: the first start, or a UIDVALIDITY change (`resync`).
    pub async fn set_mailbox_position(
        &self,
        mailbox: &str,
        pos: MailboxPosition,
        resync: bool,
    ) -> Result<(), StoreError> {
        sql(
            "INSERT INTO postbox_mailboxes (name, uidvalidity, last_uid, resyncs, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT(name) DO UPDATE SET uidvalidity = $2, last_uid = $3,
                 resyncs = postbox_mailboxes.resyncs + $4, updated_at = $5",
        )
        .bind(mailbox)
        .bind(i64::from(pos.uidvalidity))
        .bind(i64::from(pos.last_uid))
        .bind(i64::from(resync))
        .bind(ms(now()))
        .execute(&self.db)
        .await?;
        Ok(())
    }

    /// Notes a scan that found nothing new.
    pub async fn record_poll(&self, mailbox: &str) -> Result<(), StoreError> {
        sql("UPDATE postbox_mailboxes SET last_poll_at = $2, updated_at = $2 WHERE name = $1")
            .bind(mailbox)
            .bind(ms(now()))
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// Records a watcher's health (state, since when, the last error).
    pub async fn set_mailbox_health(
        &self,
        mailbox: &str,
        health: Health<'_>,
    ) -> Result<(), StoreError> {
        let now = ms(now());
        let mut tx = self.db.begin_write().await?;
        let before: Option<String> = sql("SELECT state FROM postbox_mailboxes WHERE name = $1")
            .bind(mailbox)
            .scalar(&mut tx)
            .await?;
        let (after, detail) = match &health {
            Health::Connected { .. } => ("connected", format!("mailbox {mailbox} is connected")),
            Health::Down { error, .. } => (
                "down",
                format!("mailbox {mailbox} is not connected: {error}"),
            ),
        };
        // mailbox.down / mailbox.up on each change (and up on the first connection).
        if before.as_deref() != Some(after) {
            sql(
                "INSERT INTO postbox_events (email_id, at, kind, status, detail, mailbox)
                 VALUES ('', $1, $2, '', $3, $4)",
            )
            .bind(now)
            .bind(if after == "down" {
                "mailbox_down"
            } else {
                "mailbox_up"
            })
            .bind(detail.chars().take(500).collect::<String>())
            .bind(mailbox)
            .execute(&mut tx)
            .await?;
        }
        let q = match health {
            Health::Connected { idle } => sql(
                "INSERT INTO postbox_mailboxes (name, state, idle, connected_since, updated_at)
                 VALUES ($1, 'connected', $2, $3, $3)
                 ON CONFLICT(name) DO UPDATE SET state = 'connected', idle = $2,
                     connected_since = $3, down_since = NULL, last_error = NULL, updated_at = $3",
            )
            .bind(mailbox)
            .bind(i64::from(idle))
            .bind(now),
            Health::Down { since, error } => sql(
                "INSERT INTO postbox_mailboxes (name, state, down_since, last_error, updated_at)
                 VALUES ($1, 'down', $2, $3, $4)
                 ON CONFLICT(name) DO UPDATE SET state = 'down', idle = 0, connected_since = NULL,
                     down_since = $2, last_error = $3, updated_at = $4",
            )
            .bind(mailbox)
            .bind(ms(since))
            .bind(error)
            .bind(now),
        };
        q.execute(&mut tx).await?;
        tx.commit().await?;
        if before.as_deref() != Some(after) {
            self.wrote_events();
        }
        Ok(())
    }

    /// Stores one scan in ONE transaction: its hits, the advanced position, the counters, and
    /// the alert emails of every group that is due now (made by `build`).
    #[allow(clippy::too_many_arguments)]
    pub async fn record_scan(
        &self,
        mailbox: &str,
        pos: Option<MailboxPosition>,
        scanned: u64,
        hits: &[NewHit],
        bounces: Option<(&[super::BounceRecord], super::SoftBounceRule)>,
        build: AlertBuilder<'_>,
        holder: Option<&str>,
    ) -> Result<ScanOutcome, StoreError> {
        let now = now();
        let now_ms = ms(now);
        let mut tx = self.db.begin_write().await?;
        tx.lock(Lock::Alerts).await?;
        if let Some(holder) = holder
            && !self
                .lease_held(&mut tx, &lease_name(mailbox), holder)
                .await?
        {
            tx.rollback().await?;
            return Err(StoreError::LeaseLost(mailbox.to_string()));
        }
        // A bounce mailbox's reports commit with the position that read them: exactly once.
        if let Some((reports, rule)) = bounces
            && !reports.is_empty()
        {
            super::suppressions::record_bounces_in(&mut tx, mailbox, reports, rule).await?;
        }
        let mut new_hits = 0u64;
        for h in hits {
            let (uidvalidity, uid) = match h.uid {
                Some((v, u)) => (Some(i64::from(v)), Some(i64::from(u))),
                None => (None, None),
            };
            let inserted = sql("INSERT INTO postbox_alert_hits
                     (mailbox, rule, group_key, uidvalidity, uid, fingerprint, seen_at, detail, sender)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                 ON CONFLICT DO NOTHING")
            .bind(mailbox)
            .bind(&h.rule)
            .bind(&h.group_key)
            .bind(uidvalidity)
            .bind(uid)
            .bind(&h.fingerprint)
            .bind(now_ms)
            .bind(h.detail.to_string())
            .bind(&h.sender)
            .execute(&mut tx)
            .await?;
            if inserted == 0 {
                continue;
            }
            new_hits += 1;
            // A group with nothing pending opens now: due after group_wait, and never sooner
            // than repeat_interval after its last alert.
            sql(
                "INSERT INTO postbox_alert_groups AS g (mailbox, rule, group_key, pending, due_at)
                 VALUES ($1, $2, $3, 1, $4 + $5)
                 ON CONFLICT(mailbox, rule, group_key) DO UPDATE SET
                     pending = g.pending + 1,
                     due_at = CASE WHEN g.pending = 0
                                   THEN (CASE WHEN $4 + $5 > coalesce(g.last_alert_at + $6, 0)
                                              THEN $4 + $5 ELSE g.last_alert_at + $6 END)
                                   ELSE g.due_at END",
            )
            .bind(mailbox)
            .bind(&h.rule)
            .bind(&h.group_key)
            .bind(now_ms)
            .bind(h.group_wait.as_millis() as i64)
            .bind(h.repeat_interval.as_millis() as i64)
            .execute(&mut tx)
            .await?;
        }
        if let Some(p) = pos {
            sql(
                "INSERT INTO postbox_mailboxes (name, uidvalidity, last_uid, last_poll_at, scanned, matched, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $4)
                 ON CONFLICT(name) DO UPDATE SET uidvalidity = $2, last_uid = CASE WHEN postbox_mailboxes.last_uid > $3 THEN postbox_mailboxes.last_uid ELSE $3 END,
                     last_poll_at = $4, scanned = postbox_mailboxes.scanned + $5, matched = postbox_mailboxes.matched + $6, updated_at = $4",
            )
            .bind(mailbox)
            .bind(i64::from(p.uidvalidity))
            .bind(i64::from(p.last_uid))
            .bind(now_ms)
            .bind(scanned as i64)
            .bind(new_hits as i64)
            .execute(&mut tx)
            .await?;
        } else if new_hits > 0 {
            sql(
                "INSERT INTO postbox_mailboxes (name, matched, updated_at) VALUES ($1, $2, $3)
                 ON CONFLICT(name) DO UPDATE SET matched = postbox_mailboxes.matched + $2, updated_at = $3",
            )
            .bind(mailbox)
            .bind(new_hits as i64)
            .bind(now_ms)
            .execute(&mut tx)
            .await?;
        }
        let alerts = self.flush_due(&mut tx, now, build, mailbox).await?;
        tx.commit().await?;
        Ok(ScanOutcome { new_hits, alerts })
    }

    /// Makes the alert emails of `mailbox`'s due groups, in one transaction that commits only
    /// while `holder` holds the mailbox's lease: only the watcher of a mailbox (which knows its
    /// rules) raises its alerts. Nothing is written when no group is due.
    pub async fn flush_alerts(
        &self,
        mailbox: &str,
        holder: &str,
        build: AlertBuilder<'_>,
    ) -> Result<Vec<(String, EmailId)>, StoreError> {
        let now = now();
        let due = sql("SELECT 1 FROM postbox_alert_groups
              WHERE mailbox = $1 AND pending > 0 AND due_at <= $2 LIMIT 1")
        .bind(mailbox)
        .bind(ms(now))
        .fetch_optional(&self.db)
        .await?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.db.begin_write().await?;
        tx.lock(Lock::Alerts).await?;
        if !self
            .lease_held(&mut tx, &lease_name(mailbox), holder)
            .await?
        {
            tx.rollback().await?;
            return Err(StoreError::LeaseLost(mailbox.to_string()));
        }
        let alerts = self.flush_due(&mut tx, now, build, mailbox).await?;
        tx.commit().await?;
        Ok(alerts)
    }

    /// The earliest time a pending group of `mailbox` falls due, if any is pending.
    pub async fn next_alert_due(
        &self,
        mailbox: &str,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        let v =
            sql("SELECT min(due_at) FROM postbox_alert_groups WHERE mailbox = $1 AND pending > 0")
                .bind(mailbox)
                .scalar::<Option<i64>>(&self.db)
                .await?
                .flatten();
        Ok(v.map(from_ms))
    }

    async fn flush_due(
        &self,
        tx: &mut Tx,
        now: OffsetDateTime,
        build: AlertBuilder<'_>,
        mailbox: &str,
    ) -> Result<Vec<(String, EmailId)>, StoreError> {
        let now_ms = ms(now);
        let groups = sql("SELECT rule, group_key, alerts FROM postbox_alert_groups
              WHERE mailbox = $1 AND pending > 0 AND due_at <= $2 ORDER BY due_at")
        .bind(mailbox)
        .bind(now_ms)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::new();
        for g in groups {
            let rule: String = g.get("rule")?;
            let group_key: String = g.get("group_key")?;
            let pending = |q: &str| {
                sql(format!(
                    "{q} FROM postbox_alert_hits
                      WHERE mailbox = $1 AND rule = $2 AND group_key = $3 AND alert_id IS NULL"
                ))
                .bind(mailbox)
                .bind(&rule)
                .bind(&group_key)
            };
            let hit = |r: &crate::db::DbRow| -> Result<PendingHit, StoreError> {
                Ok(PendingHit {
                    seen_at: from_ms(r.get("seen_at")?),
                    detail: serde_json::from_str(&r.get::<String>("detail")?).unwrap_or_default(),
                })
            };
            let counts =
                pending("SELECT COUNT(*) AS n, MIN(seen_at) AS first, MAX(seen_at) AS last")
                    .fetch_optional(&mut *tx)
                    .await?;
            let (count, first, last) = match &counts {
                Some(c) => (
                    c.get::<i64>("n")? as u64,
                    c.get::<Option<i64>>("first")?.unwrap_or(now_ms),
                    c.get::<Option<i64>>("last")?.unwrap_or(now_ms),
                ),
                None => (0, now_ms, now_ms),
            };
            let mut listed = Vec::new();
            let mut q = pending("SELECT seen_at, detail");
            q.push(" ORDER BY id LIMIT ").push_bind(MAX_LISTED as i64);
            for r in q.fetch_all(&mut *tx).await? {
                listed.push(hit(&r)?);
            }
            let mut q = pending("SELECT seen_at, detail");
            q.push(" ORDER BY id DESC LIMIT 1");
            let last_hit = match q.fetch_optional(&mut *tx).await? {
                Some(r) => Some(hit(&r)?),
                None => None,
            };
            let mut q = pending("SELECT sender, COUNT(*) AS n");
            q.push(" AND sender <> '' GROUP BY sender ORDER BY n DESC, sender LIMIT ")
                .push_bind(MAX_SENDERS as i64);
            let mut senders = Vec::new();
            for r in q.fetch_all(&mut *tx).await? {
                senders.push((r.get::<String>("sender")?, r.get::<i64>("n")? as u64));
            }
            let group = DueGroup {
                mailbox: mailbox.to_string(),
                rule,
                group_key,
                alerts_before: g.get::<i64>("alerts")? as u64,
                count,
                first_seen: from_ms(first),
                last_seen: from_ms(last),
                listed,
                last: last_hit,
                senders,
            };
            let alert_id = match build(&group) {
                Some(row) => {
                    let ids = self.insert_rows(tx, &[(&row, None)], now_ms).await?;
                    let id = ids[0].0.clone();
                    sql(
                        "INSERT INTO postbox_events (email_id, at, kind, status, detail, mailbox)
                         VALUES ($1, $2, 'alert_raised', 'queued', $3, $4)",
                    )
                    .bind(id.as_str())
                    .bind(now_ms)
                    .bind(format!(
                        "rule {}: {} matching message(s)",
                        group.rule, group.count
                    ))
                    .bind(&group.mailbox)
                    .execute(&mut *tx)
                    .await?;
                    out.push((group.mailbox.clone(), id.clone()));
                    id.to_string()
                }
                None => "dropped".to_string(),
            };
            sql("UPDATE postbox_alert_hits SET alert_id = $4
                  WHERE mailbox = $1 AND rule = $2 AND group_key = $3 AND alert_id IS NULL")
            .bind(&group.mailbox)
            .bind(&group.rule)
            .bind(&group.group_key)
            .bind(&alert_id)
            .execute(&mut *tx)
            .await?;
            sql("UPDATE postbox_alert_groups
                    SET pending = 0, due_at = NULL, last_alert_at = $4, last_alert_id = $5,
                        alerts = alerts + 1
                  WHERE mailbox = $1 AND rule = $2 AND group_key = $3")
            .bind(&group.mailbox)
            .bind(&group.rule)
            .bind(&group.group_key)
            .bind(now_ms)
            .bind(&alert_id)
            .execute(&mut *tx)
            .await?;
            sql(
                "UPDATE postbox_mailboxes SET alerts = alerts + 1, updated_at = $2 WHERE name = $1",
            )
            .bind(&group.mailbox)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        }
        Ok(out)
    }

    /// Every mailbox the watchers have recorded, with per-rule counts.
    pub async fn mailboxes(&self) -> Result<Vec<MailboxStatus>, StoreError> {
        let rows = sql(
            "SELECT m.*, l.holder AS lease_holder, l.expires_at AS lease_expires_at
               FROM postbox_mailboxes m
               LEFT JOIN postbox_leases l ON l.name = 'mailbox:' || m.name AND l.expires_at >= $1
              ORDER BY m.name",
        )
        .bind(ms(now()))
        .fetch_all(&self.db)
        .await?;
        let rules = sql("SELECT h.mailbox, h.rule, count(*) AS hits,
                    COUNT(*) FILTER (WHERE h.alert_id IS NULL) AS pending,
                    (SELECT CAST(sum(g.alerts) AS BIGINT) FROM postbox_alert_groups g
                      WHERE g.mailbox = h.mailbox AND g.rule = h.rule) AS alerts,
                    (SELECT max(g.last_alert_at) FROM postbox_alert_groups g
                      WHERE g.mailbox = h.mailbox AND g.rule = h.rule) AS last_alert_at
               FROM postbox_alert_hits h GROUP BY h.mailbox, h.rule ORDER BY h.mailbox, h.rule")
        .fetch_all(&self.db)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let name: String = r.get("name")?;
            let mut mine = Vec::new();
            for x in &rules {
                if x.get::<String>("mailbox")? == name {
                    mine.push(RuleStatus {
                        rule: x.get("rule")?,
                        hits: x.get::<i64>("hits")? as u64,
                        pending: x.get::<Option<i64>>("pending")?.unwrap_or(0) as u64,
                        alerts: x.get::<Option<i64>>("alerts")?.unwrap_or(0) as u64,
                        last_alert_at: x.get::<Option<i64>>("last_alert_at")?.map(from_ms),
                    });
                }
            }
            out.push(MailboxStatus {
                name,
                state: r.get("state")?,
                idle: r.get::<i64>("idle")? != 0,
                uidvalidity: r.get::<Option<i64>>("uidvalidity")?.map(|v| v as u32),
                last_uid: r.get::<i64>("last_uid")? as u32,
                connected_since: r.get::<Option<i64>>("connected_since")?.map(from_ms),
                down_since: r.get::<Option<i64>>("down_since")?.map(from_ms),
                last_poll_at: r.get::<Option<i64>>("last_poll_at")?.map(from_ms),
                last_error: r.get("last_error")?,
                scanned: r.get::<i64>("scanned")? as u64,
                matched: r.get::<i64>("matched")? as u64,
                alerts: r.get::<i64>("alerts")? as u64,
                resyncs: r.get::<i64>("resyncs")? as u64,
                lease_holder: r.get("lease_holder")?,
                lease_expires_at: r.get::<Option<i64>>("lease_expires_at")?.map(from_ms),
                rules: mine,
            });
        }
        Ok(out)
    }
}
