//! Dashboard sessions, kept in the database so that every API process on it sees the same
//! ones (a load balancer needs no sticky sessions). Rows are keyed by the SHA-256 of the
//! session id, never the id itself.

use time::OffsetDateTime;

use super::open::now;
use super::*;
use crate::db::sql;

/// A live session as stored.
#[derive(Debug, Clone)]
pub struct StoredSession {
    /// The API token's name that logged in.
    pub who: String,
    pub csrf: String,
    /// A message for the next page: (kind, text), taken by the read that returns it.
    pub flash: Option<(String, String)>,
}

impl Store {
    /// Stores a new session; past `max` sessions, those closest to expiry are deleted.
    pub async fn session_create(
        &self,
        id_hash: &str,
        who: &str,
        csrf: &str,
        expires: OffsetDateTime,
        max: usize,
    ) -> Result<(), StoreError> {
        sql(
            "INSERT INTO postbox_sessions (id_hash, who, csrf, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id_hash)
        .bind(who)
        .bind(csrf)
        .bind(ms(now()))
        .bind(ms(expires))
        .execute(&self.db)
        .await?;
        let keep_from: Option<i64> = sql(
            "SELECT expires_at FROM postbox_sessions ORDER BY expires_at DESC LIMIT 1 OFFSET $1",
        )
        .bind(max as i64)
        .scalar(&self.db)
        .await?;
        if let Some(t) = keep_from {
            sql("DELETE FROM postbox_sessions WHERE expires_at <= $1")
                .bind(t)
                .execute(&self.db)
                .await?;
        }
        Ok(())
    }

    /// The live session `id_hash`, taking its flash message.
    pub async fn session_take(&self, id_hash: &str) -> Result<Option<StoredSession>, StoreError> {
        let row = sql(
            "SELECT who, csrf, flash_kind, flash_text FROM postbox_sessions
                        WHERE id_hash = $1 AND expires_at > $2",
        )
        .bind(id_hash)
        .bind(ms(now()))
        .fetch_optional(&self.db)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let kind: Option<String> = row.get("flash_kind")?;
        let text: Option<String> = row.get("flash_text")?;
        let flash = kind.zip(text);
        if flash.is_some() {
            sql(
                "UPDATE postbox_sessions SET flash_kind = NULL, flash_text = NULL
                  WHERE id_hash = $1",
            )
            .bind(id_hash)
            .execute(&self.db)
            .await?;
        }
        Ok(Some(StoredSession {
            who: row.get("who")?,
            csrf: row.get("csrf")?,
            flash,
        }))
    }

    /// Leaves a message for the session's next page.
    pub async fn session_flash(
        &self,
        id_hash: &str,
        kind: &str,
        text: &str,
    ) -> Result<(), StoreError> {
        sql("UPDATE postbox_sessions SET flash_kind = $2, flash_text = $3 WHERE id_hash = $1")
            .bind(id_hash)
            .bind(kind)
            .bind(text)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    pub async fn session_delete(&self, id_hash: &str) -> Result<(), StoreError> {
        sql("DELETE FROM postbox_sessions WHERE id_hash = $1")
            .bind(id_hash)
            .execute(&self.db)
            .await?;
        Ok(())
    }

    /// Deletes expired sessions; how many.
    pub async fn sessions_sweep(&self) -> Result<u64, StoreError> {
        Ok(sql("DELETE FROM postbox_sessions WHERE expires_at <= $1")
            .bind(ms(now()))
            .execute(&self.db)
            .await?)
    }
}
