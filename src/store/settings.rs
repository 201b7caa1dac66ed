//! The store's sections: `[database]` and `[retention]`.

use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::settings::{ConfigError, nonzero};

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://path/to/file.db` (created if missing), `sqlite::memory:`, or
    /// `postgres://user:password@host:port/db` (many processes on many hosts). Its password is
    /// a secret: printed only through [`redact_url`].
    #[serde(serialize_with = "redacted_url")]
    pub url: String,
    pub max_connections: u32,
    /// How long a connection waits for SQLite's write lock before giving up.
    pub busy_timeout_ms: u64,
    /// SQLite: `full` (the default) syncs the WAL to disk at every commit, so an accepted email
    /// (a 202) survives a power loss; `normal` syncs only at checkpoints: faster, but the last
    /// commits before a power loss (not a crash of postbox) can be lost. Ignored on PostgreSQL,
    /// whose own `synchronous_commit` decides.
    pub synchronous: Synchronous,
}

/// SQLite's `PRAGMA synchronous` (see [`DatabaseSettings::synchronous`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Full,
    Normal,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("busy_timeout_ms", &self.busy_timeout_ms)
            .field("synchronous", &self.synchronous)
            .finish()
    }
}

/// A database URL fit to print: the password (`user:PASSWORD@`, or a `password=` query
/// parameter) replaced by `********`. Every place that shows a URL goes through this.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    // userinfo: between "://" and the last '@' before the path.
    if let Some(scheme_end) = out.find("://") {
        let auth_start = scheme_end + 3;
        let rest = &out[auth_start..];
        let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        if let Some(at) = rest[..auth_end].rfind('@')
            && let Some(colon) = rest[..at].find(':')
        {
            out.replace_range(auth_start + colon + 1..auth_start + at, "********");
        }
    }
    // query parameters named password (libpq style `?password=...`).
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=********"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", query.join("&"));
    }
    out
}

fn redacted_url<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "sqlite://postbox.db".into(),
            max_connections: 8,
            busy_timeout_ms: 5_000,
            synchronous: Synchronous::Full,
        }
    }
}

impl DatabaseSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = &self.url;
        // The URL is never echoed: a postgres:// URL may carry a password.
        if is_postgres_url(url) {
            if <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(url).is_err() {
                return Err(ConfigError::new(
                    "database.url",
                    "not a valid postgres:// URL",
                ));
            }
        } else if !url.starts_with("sqlite:") {
            return Err(ConfigError::new(
                "database.url",
                "must be a sqlite:// or postgres:// URL",
            ));
        }
        if self.max_connections < 2 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 2",
            ));
        }
        Ok(())
    }

    pub fn busy_timeout(&self) -> Duration {
        Duration::from_millis(self.busy_timeout_ms)
    }
}

/// Is this database URL a PostgreSQL one?
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Finished apalis jobs are deleted after this many hours.
    pub finished_jobs_hours: u64,
    /// Emails in a final state (sent, failed, cancelled, expired) and their timelines are deleted
    /// after this many days. 0 keeps them forever.
    pub emails_days: u64,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            finished_jobs_hours: 24,
            emails_days: 30,
        }
    }
}

impl RetentionSettings {
    /// How long final emails are kept (None: forever).
    pub fn emails(&self) -> Option<Duration> {
        (self.emails_days > 0).then(|| Duration::from_secs(self.emails_days * 24 * 3600))
    }

    pub fn finished_jobs(&self) -> Duration {
        Duration::from_secs(self.finished_jobs_hours * 3600)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        nonzero(&[("retention.finished_jobs_hours", self.finished_jobs_hours)])
    }
}
