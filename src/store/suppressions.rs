//! The suppression list: addresses postbox does not send to (hard bounces, complaints, manual
//! entries, unsubscribes), checked when a worker claims an email, in the claim's transaction.

use serde::Serialize;
use time::OffsetDateTime;

use super::open::now;
use super::*;
use crate::db::{DbRow, Tx, sql};

/// Why an address is suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SuppressionReason {
    HardBounce,
    Complaint,
    Manual,
    Unsubscribe,
}

impl SuppressionReason {
    pub const ALL: [SuppressionReason; 4] = [
        SuppressionReason::HardBounce,
        SuppressionReason::Complaint,
        SuppressionReason::Manual,
        SuppressionReason::Unsubscribe,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SuppressionReason::HardBounce => "hard_bounce",
            SuppressionReason::Complaint => "complaint",
            SuppressionReason::Manual => "manual",
            SuppressionReason::Unsubscribe => "unsubscribe",
        }
    }

    pub fn parse(s: &str) -> Option<SuppressionReason> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// One suppressed address.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Suppression {
    pub address: String,
    pub reason: SuppressionReason,
    /// The email whose bounce or complaint put it here.
    pub source_email: Option<String>,
    pub detail: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
}

/// Which suppressions to list: by reason, by address prefix, after an address (the cursor),
/// up to `limit`, in address order.
#[derive(Debug, Clone, Default)]
pub struct SuppressionFilter {
    pub reason: Option<SuppressionReason>,
    pub prefix: Option<String>,
    pub after: Option<String>,
    pub limit: u32,
}

/// The key an address is suppressed under: the addr-spec, lowercased.
pub fn suppression_key(address: &str) -> String {
    address.trim().to_lowercase()
}

/// Of `addresses`, those suppressed now, as keys (one statement per 500).
pub(super) async fn suppressed_among(
    tx: &mut Tx,
    addresses: &[String],
    now_ms: i64,
) -> Result<std::collections::HashSet<String>, StoreError> {
    let mut out = std::collections::HashSet::new();
    let mut keys: Vec<String> = addresses.iter().map(|a| suppression_key(a)).collect();
    keys.sort_unstable();
    keys.dedup();
    for chunk in keys.chunks(500) {
        let list: Vec<String> = (2..chunk.len() + 2).map(|i| format!("${i}")).collect();
        let mut q = sql(format!(
            "SELECT address FROM postbox_suppressions
              WHERE address IN ({}) AND (expires_at IS NULL OR expires_at > $1)",
            list.join(", ")
        ));
        q.add(now_ms);
        for k in chunk {
            q.add(k.as_str());
        }
        out.extend(q.column::<String>(&mut *tx).await?);
    }
    Ok(out)
}

fn suppression_from(row: &DbRow) -> Result<Suppression, StoreError> {
    let reason: String = row.get("reason")?;
    Ok(Suppression {
        address: row.get("address")?,
        reason: SuppressionReason::parse(&reason).unwrap_or(SuppressionReason::Manual),
        source_email: row.get("source_email")?,
        detail: row.get("detail")?,
        created_at: from_ms(row.get("created_at")?),
        expires_at: row.get::<Option<i64>>("expires_at")?.map(from_ms),
    })
}

/// Adds (or replaces) a suppression inside `tx`.
pub(super) async fn suppress_in(
    tx: &mut Tx,
    address: &str,
    reason: SuppressionReason,
    source_email: Option<&str>,
    detail: Option<&str>,
    expires_at: Option<OffsetDateTime>,
) -> Result<(), StoreError> {
    sql(
        "INSERT INTO postbox_suppressions (address, reason, source_email, detail, created_at,
             expires_at) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (address) DO UPDATE SET reason = excluded.reason,
             source_email = excluded.source_email, detail = excluded.detail,
             created_at = excluded.created_at, expires_at = excluded.expires_at",
    )
    .bind(suppression_key(address))
    .bind(reason.as_str())
    .bind(source_email)
    .bind(detail)
    .bind(ms(now()))
    .bind(expires_at.map(ms))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

impl Store {
    pub async fn suppressions(
        &self,
        f: &SuppressionFilter,
    ) -> Result<Vec<Suppression>, StoreError> {
        let mut q = sql("SELECT * FROM postbox_suppressions WHERE 1 = 1");
        if let Some(r) = f.reason {
            q.push(" AND reason = ").push_bind(r.as_str());
        }
        if let Some(p) = &f.prefix {
            let p = suppression_key(p)
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            q.push(" AND address LIKE ")
                .push_bind(format!("{p}%"))
                .push(" ESCAPE '\\'");
        }
        if let Some(a) = &f.after {
            q.push(" AND address > ").push_bind(suppression_key(a));
        }
        q.push(" ORDER BY address LIMIT ").push_bind(f.limit as i64);
        let rows = q.fetch_all(&self.db).await?;
        rows.iter().map(suppression_from).collect()
    }

    /// Adds (or replaces) a suppression.
    pub async fn suppress(
        &self,
        address: &str,
        reason: SuppressionReason,
        detail: Option<&str>,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().await?;
        suppress_in(&mut tx, address, reason, None, detail, expires_at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes a suppression; false if the address was not suppressed.
    pub async fn unsuppress(&self, address: &str) -> Result<bool, StoreError> {
        let n = sql("DELETE FROM postbox_suppressions WHERE address = $1")
            .bind(suppression_key(address))
            .execute(&self.db)
            .await?;
        Ok(n == 1)
    }
}

/// When soft bounces suppress an address: `limit` of them within `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftBounceRule {
    pub limit: u32,
    pub window: std::time::Duration,
}

/// What a bounce mailbox read about one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BounceKind {
    Hard,
    Soft,
    Complaint,
}

impl BounceKind {
    fn as_str(self) -> &'static str {
        match self {
            BounceKind::Hard => "hard",
            BounceKind::Soft => "soft",
            BounceKind::Complaint => "complaint",
        }
    }
}

/// One bounce or complaint report, as the store records it.
#[derive(Debug, Clone)]
pub struct BounceRecord {
    /// dsn | arf | heuristic
    pub format: &'static str,
    pub email_id: Option<String>,
    pub message_id: Option<String>,
    /// (address, kind, enhanced status, diagnostic)
    pub recipients: Vec<(String, BounceKind, Option<String>, Option<String>)>,
}

/// Records reports inside `tx` (a bounce mailbox's scan): each recipient's report row (kept
/// whether it matched an email or not), the suppression it earns (a hard bounce or a
/// complaint at once; soft bounces once `rule.limit` fall within `rule.window`), and for a
/// matched email its `bounced` / `complained` timeline entry (its event). Returns how many
/// recipients matched an email.
pub(super) async fn record_bounces_in(
    tx: &mut Tx,
    mailbox: &str,
    reports: &[BounceRecord],
    rule: SoftBounceRule,
) -> Result<u64, StoreError> {
    let now_ms = ms(now());
    let mut matched = 0;
    for r in reports {
        // The email it answers: by id (VERP or X-Postbox-Id), else by Message-ID.
        let mut email: Option<(String, String)> = None;
        if let Some(id) = &r.email_id {
            let row = sql("SELECT id, status FROM postbox_emails WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = row {
                email = Some((row.get("id")?, row.get("status")?));
            }
        }
        if email.is_none()
            && let Some(mid) = &r.message_id
        {
            let row = sql("SELECT id, status FROM postbox_emails WHERE message_id = $1")
                .bind(format!("<{mid}>"))
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = row {
                email = Some((row.get("id")?, row.get("status")?));
            }
        }
        for (address, kind, status, diagnostic) in &r.recipients {
            let key = suppression_key(address);
            sql(
                "INSERT INTO postbox_bounce_reports (mailbox, kind, recipient, status, diagnostic,
                     email_id, format, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(mailbox)
            .bind(kind.as_str())
            .bind(key.as_str())
            .bind(status.as_deref())
            .bind(diagnostic.as_deref())
            .bind(email.as_ref().map(|(id, _)| id.as_str()))
            .bind(r.format)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            let source = email.as_ref().map(|(id, _)| id.as_str());
            let said = match (status, diagnostic) {
                (Some(s), Some(d)) => format!("{s} {d}"),
                (Some(s), None) => s.clone(),
                (None, Some(d)) => d.clone(),
                (None, None) => String::new(),
            };
            let suppress = match kind {
                BounceKind::Hard => Some((SuppressionReason::HardBounce, said.clone())),
                BounceKind::Complaint => Some((SuppressionReason::Complaint, said.clone())),
                BounceKind::Soft => {
                    sql("INSERT INTO postbox_soft_bounces (address, at) VALUES ($1, $2)")
                        .bind(key.as_str())
                        .bind(now_ms)
                        .execute(&mut *tx)
                        .await?;
                    let n: Option<i64> = sql(
                        "SELECT COUNT(*) FROM postbox_soft_bounces WHERE address = $1 AND at > $2",
                    )
                    .bind(key.as_str())
                    .bind(now_ms - rule.window.as_millis() as i64)
                    .scalar(&mut *tx)
                    .await?;
                    (n.unwrap_or(0) >= i64::from(rule.limit)).then(|| {
                        (
                            SuppressionReason::HardBounce,
                            format!("{} soft bounces; last: {said}", n.unwrap_or(0)),
                        )
                    })
                }
            };
            if let Some((reason, detail)) = suppress {
                suppress_in(tx, &key, reason, source, Some(&detail), None).await?;
            }
            if let Some((id, status_now)) = &email {
                matched += 1;
                let entry = match kind {
                    BounceKind::Complaint => "complained",
                    _ => "bounced",
                };
                let detail = format!(
                    "{} {} from {key}{}",
                    kind.as_str(),
                    if *kind == BounceKind::Complaint {
                        "complaint"
                    } else {
                        "bounce"
                    },
                    if said.is_empty() {
                        String::new()
                    } else {
                        format!(": {said}")
                    }
                );
                sql(
                    "INSERT INTO postbox_events (email_id, at, kind, status, smtp_text, detail)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(id.as_str())
                .bind(now_ms)
                .bind(entry)
                .bind(status_now.as_str())
                .bind(status.as_deref())
                .bind(detail.as_str())
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    Ok(matched)
}

/// A report read from a bounce mailbox, for listings.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BounceReportRow {
    pub id: i64,
    pub mailbox: String,
    /// hard | soft | complaint
    pub kind: String,
    pub recipient: String,
    pub status: Option<String>,
    pub diagnostic: Option<String>,
    /// None: it matched no email (kept, visible).
    pub email_id: Option<String>,
    /// dsn | arf | heuristic
    pub format: String,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

impl Store {
    /// The latest bounce and complaint reports, newest first.
    pub async fn bounce_reports(&self, limit: u32) -> Result<Vec<BounceReportRow>, StoreError> {
        let rows = sql("SELECT * FROM postbox_bounce_reports ORDER BY id DESC LIMIT $1")
            .bind(limit as i64)
            .fetch_all(&self.db)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(BounceReportRow {
                    id: r.get("id")?,
                    mailbox: r.get("mailbox")?,
                    kind: r.get("kind")?,
                    recipient: r.get("recipient")?,
                    status: r.get("status")?,
                    diagnostic: r.get("diagnostic")?,
                    email_id: r.get("email_id")?,
                    format: r.get("format")?,
                    created_at: from_ms(r.get("created_at")?),
                })
            })
            .collect()
    }
}

impl Store {
    /// The one-click unsubscribe signing key: made (32 random bytes) by the first process that
    /// asks, then shared by all.
    pub async fn unsubscribe_key(&self) -> Result<Vec<u8>, StoreError> {
        let mut fresh = [0u8; 32];
        rand::fill(&mut fresh[..]);
        sql(
            "INSERT INTO postbox_keys (name, value) VALUES ('unsubscribe', $1)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(hex::encode(fresh))
        .execute(&self.db)
        .await?;
        let v: Option<String> = sql("SELECT value FROM postbox_keys WHERE name = 'unsubscribe'")
            .scalar(&self.db)
            .await?;
        hex::decode(v.unwrap_or_default()).map_err(|e| StoreError::Corrupt {
            id: "(unsubscribe key)".into(),
            message: e.to_string(),
        })
    }

    /// A recipient's one-click unsubscribe: suppressed (`unsubscribe`), and the email gets an
    /// `unsubscribed` timeline entry (its event), in one transaction. False when the email is
    /// gone (retention); the address is suppressed all the same.
    pub async fn unsubscribe(&self, id: &EmailId, recipient: &str) -> Result<bool, StoreError> {
        let mut tx = self.db.begin_write().await?;
        suppress_in(
            &mut tx,
            recipient,
            SuppressionReason::Unsubscribe,
            Some(id.as_str()),
            Some("one-click unsubscribe (RFC 8058)"),
            None,
        )
        .await?;
        let status: Option<String> = sql("SELECT status FROM postbox_emails WHERE id = $1")
            .bind(id.as_str())
            .scalar(&mut tx)
            .await?;
        if let Some(status) = &status {
            sql(
                "INSERT INTO postbox_events (email_id, at, kind, status, detail)
                 VALUES ($1, $2, 'unsubscribed', $3, $4)",
            )
            .bind(id.as_str())
            .bind(ms(now()))
            .bind(status.as_str())
            .bind(format!(
                "{} unsubscribed (one click)",
                suppression_key(recipient)
            ))
            .execute(&mut tx)
            .await?;
        }
        tx.commit().await?;
        self.wrote_events();
        Ok(status.is_some())
    }
}
