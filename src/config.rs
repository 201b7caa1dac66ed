//! Settings: built-in defaults, then a TOML file (`--config` / `POSTBOX_CONFIG`), then
//! `POSTBOX_<SECTION>__<KEY>` environment variables (e.g. `POSTBOX_SMTP__PASSWORD`).
//!
//! Every error names the key (`smtp.port`) and, for an environment override, the variable.
//! Secrets are held in [`SecretString`] and printed only as `********`.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::{Deserialize, Serialize, Serializer};

use crate::delivery::RetryPolicy;
use crate::domain::{EmailAddress, Limits, Senders};

/// A configuration problem, naming the key it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// All of postbox's settings. `Settings::default()` is the no-config-file setup: SQLite at
/// `./postbox.db`, delivery to `./outbox/*.eml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub queue: QueueSettings,
    pub retry: RetryPolicy,
    pub retention: RetentionSettings,
    pub delivery: DeliverySettings,
    pub smtp: SmtpSettings,
    pub limits: Limits,
    pub log: LogSettings,
    pub api: ApiSettings,
    pub cluster: ClusterSettings,
    /// IMAP mailboxes the watcher reads (`[[mailboxes]]`); none by default.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mailboxes: Vec<crate::inbound::MailboxSettings>,
}

/// Several processes on one database (`[cluster]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// How long a mailbox watcher's lease lasts without renewal (renewed every third of it).
    /// A standby takes a dead holder's mailbox over within this time.
    pub lease_secs: u64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self { lease_secs: 15 }
    }
}

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
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("busy_timeout_ms", &self.busy_timeout_ms)
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

/// Keys whose values are secrets: errors about them never echo the value.
fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    let last = last.split('[').next().unwrap_or(last);
    matches!(last, "password" | "token" | "secret" | "url")
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "sqlite://postbox.db".into(),
            max_connections: 8,
            busy_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    /// The apalis queue name. Renaming it orphans jobs already queued: don't, without a migration.
    pub name: String,
    /// Emails delivered at once by one process.
    pub concurrency: usize,
    /// Jobs fetched per database round trip. Priority decides which jobs a fetch takes; a fetched
    /// batch starts in submission order, so keep this at or below `concurrency`.
    pub batch_size: usize,
    /// How often an idle worker looks for due jobs (in-process submits wake it at once).
    pub poll_interval_ms: u64,
    /// Worker heartbeat; a worker silent for two of these is dead and its jobs are re-queued.
    pub heartbeat_secs: u64,
    /// How often the janitor repairs stuck rows, expires mail and applies retention.
    pub janitor_interval_secs: u64,
    /// A job running longer than this is considered stuck and handed back to the queue.
    pub stuck_after_secs: u64,
    /// Pause before restarting a worker that died on a database error.
    pub restart_delay_ms: u64,
    /// Backpressure: at most this many emails waiting (queued, retrying or sending). A submit
    /// past it is refused whole (HTTP 503 with Retry-After); 0 means no cap.
    pub max_depth: u64,
    /// Submits that arrive together share one transaction (group commit), up to this many emails.
    pub group_commit_max: usize,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            name: "postbox::send".into(),
            concurrency: 32,
            batch_size: 32,
            poll_interval_ms: 100,
            heartbeat_secs: 10,
            janitor_interval_secs: 15,
            stuck_after_secs: 600,
            restart_delay_ms: 1_000,
            max_depth: 1_000_000,
            group_commit_max: 2_000,
        }
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Write one `.eml` file per email into `delivery.outbox_dir` (development).
    File,
    /// Deliver to the relay in `[smtp]`.
    Smtp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    pub transport: Transport,
    pub outbox_dir: PathBuf,
    /// Used when an email gives no `from`.
    pub default_from: String,
    /// When not empty, the only senders accepted: domains (`example.com`) or addresses
    /// (`ops@example.com`). A submit from anyone else is refused, naming `from`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_from: Vec<String>,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            transport: Transport::File,
            outbox_dir: PathBuf::from("outbox"),
            default_from: "postbox@localhost".into(),
            allowed_from: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Implicit TLS from the first byte (usually port 465).
    Tls,
    /// STARTTLS, required: refuses to send if the server does not offer it (usually 587).
    Starttls,
    /// DANGEROUS: plaintext, credentials and mail readable on the wire. Refused for a host that
    /// is not loopback unless `allow_plaintext = true`.
    None,
}

/// Is `host` this machine (`localhost`, 127.0.0.0/8, ::1)? Plaintext is allowed only there.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim().trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Secret: prefer `POSTBOX_SMTP__PASSWORD` over the file.
    #[serde(
        serialize_with = "masked",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub password: Option<SecretString>,
    /// Name sent in EHLO; defaults to this host's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hello_name: Option<String>,
    /// Extra trust anchors (PEM) for a relay whose certificate a public CA did not sign.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Allow `tls = "none"` to a host that is not loopback (mail and the password cross the
    /// network readable). Off: such a config is refused.
    pub allow_plaintext: bool,
    pub connect_timeout_secs: u64,
    /// Timeout of each SMTP command (and of the whole DATA transfer).
    pub command_timeout_secs: u64,
    /// Connections kept open to the relay.
    pub pool_max: u32,
    pub pool_idle_secs: u64,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 587,
            tls: TlsMode::Starttls,
            username: None,
            password: None,
            hello_name: None,
            ca_file: None,
            allow_plaintext: false,
            connect_timeout_secs: 10,
            command_timeout_secs: 30,
            pool_max: 10,
            pool_idle_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter; `RUST_LOG` itself wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// The HTTP API (`postbox serve`, `postbox api`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Serve the HTTP API in `postbox serve`.
    pub enabled: bool,
    /// Address to listen on. Anything but loopback requires at least one token.
    pub listen: String,
    /// One bearer token named "default" (secret: prefer `POSTBOX_API__TOKEN`).
    #[serde(
        serialize_with = "masked",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub token: Option<SecretString>,
    /// Named tokens, each with its own rate limit.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<ApiToken>,
    /// Default per-token rate limit in requests per second (token bucket); 0 = no limit.
    pub rate_per_sec: f64,
    /// Bucket size: requests a token may make at once after being idle.
    pub burst: u32,
    /// Largest request body accepted (HTTP 413 past it).
    pub max_body_bytes: usize,
    /// Most emails in one `POST /v1/emails/batch`.
    pub max_batch: usize,
    /// Most JSON values (elements and keys) in one request body: a body describing more is
    /// refused (413) before it is parsed.
    pub max_json_values: usize,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_ttl_hours: u64,
    /// Leave `/healthz`, `/readyz` and `/openapi.json` open (no token).
    pub open_health: bool,
    /// Open HTTP connections at most; more wait to be accepted.
    pub max_connections: usize,
    /// Seconds to read a request's headers; a keep-alive connection idle this long is closed.
    pub header_timeout_secs: u64,
    /// Seconds to read a request's body (408 past it).
    pub body_timeout_secs: u64,
    /// Requests with a wrong token (bearer or dashboard login) one client address may make in
    /// `failed_login_window_secs`; past it every login from that address is refused (429)
    /// until the window ends.
    pub max_failed_logins: u32,
    pub failed_login_window_secs: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
            token: None,
            tokens: Vec::new(),
            rate_per_sec: 0.0,
            burst: 100,
            max_body_bytes: 16 * 1024 * 1024,
            max_batch: 1_000,
            max_json_values: 200_000,
            idempotency_ttl_hours: 24,
            open_health: true,
            max_connections: 1024,
            header_timeout_secs: 30,
            body_timeout_secs: 30,
            max_failed_logins: 10,
            failed_login_window_secs: 600,
        }
    }
}

/// A named API token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// Shown in logs and timelines (never the secret).
    pub name: String,
    /// The secret itself, or...
    #[serde(
        serialize_with = "masked",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub token: Option<SecretString>,
    /// ...the environment variable that holds it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub token_env: Option<String>,
    /// Overrides `api.rate_per_sec` for this token.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rate_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub burst: Option<u32>,
}

/// A token ready for use: name, secret, limits.
#[derive(Debug, Clone)]
pub struct ResolvedToken {
    pub name: String,
    pub secret: SecretString,
    pub rate_per_sec: f64,
    pub burst: u32,
}

impl ApiSettings {
    /// Every configured token with its secret (read from the environment for `token_env`).
    pub fn resolved_tokens(&self) -> Result<Vec<ResolvedToken>, ConfigError> {
        self.resolve_tokens(|k| std::env::var(k).ok())
    }

    fn resolve_tokens(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<ResolvedToken>, ConfigError> {
        let mut out = Vec::new();
        if let Some(t) = &self.token {
            out.push(ResolvedToken {
                name: "default".into(),
                secret: t.clone(),
                rate_per_sec: self.rate_per_sec,
                burst: self.burst,
            });
        }
        for (i, t) in self.tokens.iter().enumerate() {
            let key = format!("api.tokens[{i}]");
            if t.name.trim().is_empty() {
                return Err(ConfigError::new(format!("{key}.name"), "must not be empty"));
            }
            if out.iter().any(|o| o.name == t.name) {
                return Err(ConfigError::new(
                    format!("{key}.name"),
                    format!("`{}` is used by two tokens", t.name),
                ));
            }
            let secret = match (&t.token, &t.token_env) {
                (Some(s), None) => s.clone(),
                (None, Some(var)) => SecretString::from(env(var).ok_or_else(|| {
                    ConfigError::new(
                        format!("{key}.token_env"),
                        format!("environment variable {var} is not set"),
                    )
                })?),
                _ => {
                    return Err(ConfigError::new(
                        format!("{key}.token"),
                        "give exactly one of token or token_env",
                    ));
                }
            };
            out.push(ResolvedToken {
                name: t.name.clone(),
                secret,
                rate_per_sec: t.rate_per_sec.unwrap_or(self.rate_per_sec),
                burst: t.burst.unwrap_or(self.burst),
            });
        }
        for (i, t) in out.iter().enumerate() {
            use secrecy::ExposeSecret;
            let key = if i == 0 && self.token.is_some() {
                "api.token".to_string()
            } else {
                format!(
                    "api.tokens[{}].token",
                    i - usize::from(self.token.is_some())
                )
            };
            if t.secret.expose_secret().len() < 16 {
                return Err(ConfigError::new(key, "must be at least 16 characters"));
            }
            if t.secret.expose_secret() == README_EXAMPLE_TOKEN {
                return Err(ConfigError::new(
                    key,
                    "is the README's example value, known to everyone; generate a token \
                     (e.g. `openssl rand -hex 32`)",
                ));
            }
            if !(t.rate_per_sec >= 0.0 && t.rate_per_sec.is_finite()) {
                return Err(ConfigError::new(
                    "api.rate_per_sec",
                    "must be a number >= 0",
                ));
            }
        }
        Ok(out)
    }

    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| {
            ConfigError::new(
                "api.listen",
                format!("`{}` is not an IP:port address", self.listen),
            )
        })
    }
}

/// The token the README's examples show: refused as a real token.
const README_EXAMPLE_TOKEN: &str = "change-me-to-a-long-random-string";

pub(crate) fn masked<S: Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("********"),
        None => s.serialize_none(),
    }
}

const ENV_PREFIX: &str = "POSTBOX_";

/// The name of every mailbox in the file, with the names of its rules.
fn mailbox_names(table: &toml::Table) -> Vec<(String, Vec<String>)> {
    let name = |v: &toml::Value| {
        v.get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("?")
            .to_string()
    };
    table
        .get("mailboxes")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .map(|m| {
            let rules = m
                .get("rules")
                .and_then(|r| r.as_array())
                .into_iter()
                .flatten()
                .map(name)
                .collect();
            (name(m), rules)
        })
        .collect()
}

/// `3` from `...<marker>3]...`.
fn index_after(path: &str, marker: &str) -> Option<usize> {
    let rest = &path[path.find(marker)? + marker.len()..];
    rest[..rest.find(']')?].parse().ok()
}

/// The values of every `password_env` / `token_env` key in the file.
fn secret_env_names(table: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    let mut collect = |list: Option<&toml::Value>, key: &str| {
        for item in list.and_then(|v| v.as_array()).into_iter().flatten() {
            if let Some(name) = item.get(key).and_then(|v| v.as_str()) {
                out.push(name.to_string());
            }
        }
    };
    collect(table.get("mailboxes"), "password_env");
    collect(table.get("api").and_then(|a| a.get("tokens")), "token_env");
    out
}

impl Settings {
    /// Loads settings from an optional file plus the process environment.
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_from(path, std::env::vars())
    }

    /// Like [`Settings::load`], with the environment given explicitly (tests).
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|e| {
                ConfigError::new("--config", format!("cannot read {}: {e}", p.display()))
            })?,
            None => String::new(),
        };
        Self::from_toml_and_env(&text, env)
    }

    /// Parses TOML text, applies environment overrides, deserializes and validates.
    pub fn from_toml_and_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            // Only the message and the position: toml's Display quotes the offending line,
            // which may hold a password.
            let at = e
                .span()
                .map(|span| {
                    let line = text[..span.start].matches('\n').count() + 1;
                    format!(" (line {line})")
                })
                .unwrap_or_default();
            ConfigError::new(
                "(file)",
                format!("not valid TOML{at}: {}", e.message().trim()),
            )
        })?;
        let defaults = toml::Table::try_from(Settings::default())
            .map_err(|e| ConfigError::new("(defaults)", e.to_string()))?;
        // Variables the file names as secret sources (`password_env`, `token_env`) are not
        // overrides, even when they start with POSTBOX_.
        let referenced = secret_env_names(&table);
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with(ENV_PREFIX) && k != "POSTBOX_CONFIG" && !referenced.contains(k)
            })
            .collect();
        env.sort();
        for (var, value) in env {
            apply_env(&mut table, &defaults, &var, &value)?;
        }
        let names = mailbox_names(&table);
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| {
                let path = e.path().to_string();
                let mut message = e.inner().to_string();
                if is_secret_key(&path) {
                    // serde quotes the value it could not use; this one is a secret.
                    message = "has the wrong type or format (the value is not shown: it is a \
                               secret)"
                        .into();
                }
                // Name the mailbox and rule, not just their positions.
                if let Some(i) = index_after(&path, "mailboxes[")
                    && let Some((mailbox, rules)) = names.get(i)
                {
                    message = match index_after(&path, ".rules[").and_then(|j| rules.get(j)) {
                        Some(rule) => format!("(mailbox \"{mailbox}\", rule \"{rule}\") {message}"),
                        None => format!("(mailbox \"{mailbox}\") {message}"),
                    };
                }
                ConfigError::new(if path == "." { "(root)".into() } else { path }, message)
            })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks relations between keys that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = &self.database.url;
        // The URL is never echoed: a postgres:// URL may carry a password.
        if crate::store::is_postgres_url(url) {
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
        if self.cluster.lease_secs < 3 {
            return Err(ConfigError::new("cluster.lease_secs", "must be at least 3"));
        }
        if self.database.max_connections < 2 {
            return Err(ConfigError::new(
                "database.max_connections",
                "must be at least 2",
            ));
        }
        let q = &self.queue;
        for (key, v) in [
            ("queue.concurrency", q.concurrency as u64),
            ("queue.batch_size", q.batch_size as u64),
            ("queue.poll_interval_ms", q.poll_interval_ms),
            ("queue.heartbeat_secs", q.heartbeat_secs),
            ("queue.janitor_interval_secs", q.janitor_interval_secs),
            ("queue.stuck_after_secs", q.stuck_after_secs),
            ("smtp.connect_timeout_secs", self.smtp.connect_timeout_secs),
            ("smtp.command_timeout_secs", self.smtp.command_timeout_secs),
            ("smtp.pool_max", self.smtp.pool_max as u64),
            ("retry.max_attempts", self.retry.max_attempts as u64),
            ("limits.max_recipients", self.limits.max_recipients as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        use crate::domain::{MAX_LIST, MAX_SMALL};
        for (key, v, max) in [
            (
                "limits.max_recipients",
                self.limits.max_recipients,
                MAX_LIST,
            ),
            ("limits.max_tags", self.limits.max_tags, MAX_SMALL),
            (
                "limits.max_metadata_entries",
                self.limits.max_metadata_entries,
                MAX_SMALL,
            ),
        ] {
            if v > max {
                return Err(ConfigError::new(key, format!("must be at most {max}")));
            }
        }
        if q.name.trim().is_empty() {
            return Err(ConfigError::new("queue.name", "must not be empty"));
        }
        if q.stuck_after_secs <= self.smtp.command_timeout_secs * 4 {
            return Err(ConfigError::new(
                "queue.stuck_after_secs",
                "must be longer than 4 x smtp.command_timeout_secs, or live sends look stuck",
            ));
        }
        self.retry.validate()?;
        let mailboxes = crate::inbound::compile(&self.mailboxes, &|k| std::env::var(k).ok())?;
        // An alert is an ordinary email: recipients past the limit would fail it at send time.
        let max = self.limits.max_recipients;
        for (i, mb) in mailboxes.iter().enumerate() {
            if mb.alert_to.len() > max {
                return Err(ConfigError::new(
                    format!("mailboxes[{i}].alert_to"),
                    format!(
                        "(mailbox \"{}\") {} recipients; an email may have at most {max} \
                         (limits.max_recipients)",
                        mb.name,
                        mb.alert_to.len()
                    ),
                ));
            }
            for (j, r) in mb.rules.iter().enumerate() {
                if r.recipients.len() > max {
                    return Err(ConfigError::new(
                        format!("mailboxes[{i}].rules[{j}].alert_to"),
                        format!(
                            "(mailbox \"{}\", rule \"{}\") {} recipients; an email may have at \
                             most {max} (limits.max_recipients)",
                            mb.name,
                            r.name,
                            r.recipients.len()
                        ),
                    ));
                }
            }
        }
        self.senders()?;
        if self.delivery.transport == Transport::Smtp && self.smtp.host.trim().is_empty() {
            return Err(ConfigError::new(
                "smtp.host",
                "is required when delivery.transport = \"smtp\"",
            ));
        }
        if self.smtp.tls == TlsMode::None
            && !self.smtp.allow_plaintext
            && !is_loopback_host(&self.smtp.host)
        {
            return Err(ConfigError::new(
                "smtp.tls",
                format!(
                    "\"none\" sends mail and the password readable over the network to {}; use \
                     \"starttls\" or \"tls\", or set smtp.allow_plaintext = true to accept that",
                    self.smtp.host
                ),
            ));
        }
        if let Some(ca) = &self.smtp.ca_file
            && !ca.is_file()
        {
            return Err(ConfigError::new(
                "smtp.ca_file",
                format!("{} is not a file", ca.display()),
            ));
        }
        if self.smtp.password.is_some() && self.smtp.username.is_none() {
            return Err(ConfigError::new(
                "smtp.username",
                "is required when smtp.password is set",
            ));
        }
        let addr = self.api.listen_addr()?;
        let tokens = self.api.resolved_tokens()?;
        if self.api.enabled && tokens.is_empty() && !addr.ip().is_loopback() {
            return Err(ConfigError::new(
                "api.token",
                format!(
                    "api.listen = {addr} is not a loopback address; configure api.token \
                     (POSTBOX_API__TOKEN) or [[api.tokens]] before serving beyond this host"
                ),
            ));
        }
        for (key, v) in [
            ("api.max_body_bytes", self.api.max_body_bytes as u64),
            ("api.max_batch", self.api.max_batch as u64),
            ("api.max_json_values", self.api.max_json_values as u64),
            ("api.burst", self.api.burst as u64),
            ("api.max_connections", self.api.max_connections as u64),
            ("api.header_timeout_secs", self.api.header_timeout_secs),
            ("api.body_timeout_secs", self.api.body_timeout_secs),
            (
                "api.max_failed_logins",
                u64::from(self.api.max_failed_logins),
            ),
            (
                "api.failed_login_window_secs",
                self.api.failed_login_window_secs,
            ),
            ("queue.group_commit_max", self.queue.group_commit_max as u64),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::new("log.level", e.to_string()))?;
        Ok(())
    }

    /// The effective settings as TOML, secrets masked (for `postbox config check`).
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}"))
    }

    /// `delivery.default_from` and `delivery.allowed_from`, checked.
    pub fn senders(&self) -> Result<Senders, ConfigError> {
        let from = EmailAddress::parse(&self.delivery.default_from)
            .map_err(|m| ConfigError::new("delivery.default_from", m))?;
        Senders::new(from, &self.delivery.allowed_from).map_err(|(i, m)| {
            let key = if i == usize::MAX {
                "delivery.allowed_from".to_string()
            } else {
                format!("delivery.allowed_from[{i}]")
            };
            ConfigError::new(key, m)
        })
    }
}

/// Sets `POSTBOX_A__B=value` at `a.b`, typed like the default (or the file's) value there.
fn apply_env(
    table: &mut toml::Table,
    defaults: &toml::Table,
    var: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    let key = path.join(".");
    let secret = is_secret_key(&key);
    let err = |m: String| ConfigError::new(key.clone(), format!("{m} (from {var})"));
    // The value is quoted in errors unless the key holds a secret.
    let shown = |raw: &str| {
        if secret {
            "the value".to_string()
        } else {
            format!("`{raw}`")
        }
    };
    if path.iter().any(|p| p.is_empty()) {
        return Err(err("is not a valid key".into()));
    }
    // The type to parse as: the file's value if set there, else the default's.
    let lookup = |t: &toml::Table| -> Option<toml::Value> {
        let mut cur = t.get(&path[0])?;
        for p in &path[1..] {
            cur = cur.as_table()?.get(p)?;
        }
        Some(cur.clone())
    };
    let like = lookup(table).or_else(|| lookup(defaults));
    let value = match like {
        Some(toml::Value::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| err(format!("{} is not an integer", shown(raw))))?,
        Some(toml::Value::Float(_)) => raw
            .trim()
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| err(format!("{} is not a number", shown(raw))))?,
        Some(toml::Value::Boolean(_)) => match raw.trim() {
            "true" | "1" => toml::Value::Boolean(true),
            "false" | "0" => toml::Value::Boolean(false),
            _ => return Err(err(format!("{} is not true or false", shown(raw)))),
        },
        Some(toml::Value::Table(_)) => {
            return Err(err("is a section, not a value".into()));
        }
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',')
                .map(|s| toml::Value::String(s.trim().to_string()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_string()),
    };
    let mut cur = table;
    for p in &path[..path.len() - 1] {
        let entry = cur
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        cur = entry
            .as_table_mut()
            .ok_or_else(|| err(format!("`{p}` is not a section")))?;
    }
    cur.insert(path[path.len() - 1].clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_file_gives_the_embedded_defaults() {
        let s = Settings::from_toml_and_env("", env(&[])).unwrap();
        assert_eq!(s.database.url, "sqlite://postbox.db");
        assert_eq!(s.delivery.transport, Transport::File);
        assert_eq!(s.delivery.outbox_dir, PathBuf::from("outbox"));
    }

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../config.example.toml");
        let s = Settings::from_toml_and_env(text, env(&[])).unwrap();
        assert_eq!(s.smtp.port, 587);
    }

    #[test]
    fn the_commented_mailbox_example_parses_and_compiles() {
        let text = include_str!("../config.example.toml");
        let block: String = text
            .lines()
            .skip_while(|l| !l.contains("BEGIN mailboxes example"))
            .skip(1)
            .take_while(|l| !l.contains("END mailboxes example"))
            .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(block.contains("[[mailboxes.rules]]"));
        let s = Settings::from_toml_and_env(
            &block,
            env(&[("POSTBOX_IMAP_MONITORING_PASSWORD", "secret")]),
        );
        // The password comes from the process environment at validation; compile with ours.
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                assert_eq!(e.key, "mailboxes[0].password_env", "{e}");
                let mut t: toml::Table = block.parse().unwrap();
                let m = t["mailboxes"].as_array_mut().unwrap()[0]
                    .as_table_mut()
                    .unwrap();
                m.remove("password_env");
                m.insert("password".into(), "secret".into());
                Settings::from_toml_and_env(&t.to_string(), env(&[])).unwrap()
            }
        };
        let mb = crate::inbound::compile(&s.mailboxes, &|_| Some("x".into())).unwrap();
        assert_eq!(mb[0].rules[0].name, "disk full");
        assert_eq!(mb[0].rules[0].priority, crate::Priority::High);
    }

    #[test]
    fn plaintext_is_for_loopback_unless_explicitly_allowed() {
        for host in ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.53"] {
            let t = format!("[smtp]\nhost = \"{host}\"\ntls = \"none\"\n");
            assert!(Settings::from_toml_and_env(&t, env(&[])).is_ok(), "{host}");
        }
        let t = "[smtp]\nhost = \"10.0.0.5\"\ntls = \"none\"\nallow_plaintext = true\n";
        assert!(Settings::from_toml_and_env(t, env(&[])).is_ok());
    }

    #[test]
    fn env_overrides_file_with_types_and_secrets() {
        let s = Settings::from_toml_and_env(
            "[smtp]\nport = 25\nusername = \"u\"\n",
            env(&[
                ("POSTBOX_SMTP__PORT", "2525"),
                ("POSTBOX_SMTP__PASSWORD", "12345"),
                ("POSTBOX_QUEUE__CONCURRENCY", "4"),
                ("POSTBOX_RETRY__JITTER", "false"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.smtp.port, 2525);
        assert_eq!(s.smtp.password.unwrap().expose_secret(), "12345");
        assert_eq!(s.queue.concurrency, 4);
        assert!(!s.retry.jitter);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("[smtp]\nport = \"x\"\n", vec![], "smtp.port"),
            ("[smtp]\nprot = 1\n", vec![], "smtp"),
            ("", vec![("POSTBOX_SMTP__PORT", "abc")], "smtp.port"),
            (
                "[delivery]\ndefault_from = \"nope\"\n",
                vec![],
                "delivery.default_from",
            ),
            ("[queue]\nconcurrency = 0\n", vec![], "queue.concurrency"),
            (
                "[retry]\nmin_backoff_secs = 10\nmax_backoff_secs = 5\n",
                vec![],
                "retry.max_backoff_secs",
            ),
            ("[smtp]\ntls = \"maybe\"\n", vec![], "smtp.tls"),
            (
                "[smtp]\nhost = \"smtp.example.com\"\ntls = \"none\"\n",
                vec![],
                "smtp.tls",
            ),
            (
                "[smtp]\nca_file = \"/nonexistent.pem\"\n",
                vec![],
                "smtp.ca_file",
            ),
            (
                "[delivery]\nallowed_from = [\"example.com\"]\n",
                vec![],
                "delivery.allowed_from",
            ),
            (
                "[delivery]\nallowed_from = [\"localhost\", \"x@@y\"]\n",
                vec![],
                "delivery.allowed_from[1]",
            ),
            ("[database]\nurl = \"mysql://x\"\n", vec![], "database.url"),
            (
                "[database]\nurl = \"postgres://u:secret@h:notaport/db\"\n",
                vec![],
                "database.url",
            ),
            ("[cluster]\nlease_secs = 1\n", vec![], "cluster.lease_secs"),
            (
                "[limits]\nmax_recipients = 2\n[[mailboxes]]\nname = \"m\"\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\nalert_to = [\"a@example.com\", \"b@example.com\", \"c@example.com\"]\n",
                vec![],
                "mailboxes[0].alert_to",
            ),
            (
                "[limits]\nmax_recipients = 1001\n",
                vec![],
                "limits.max_recipients",
            ),
            ("[api]\nlisten = \"0.0.0.0:8080\"\n", vec![], "api.token"),
            ("[api]\nlisten = \"nowhere\"\n", vec![], "api.listen"),
            ("", vec![("POSTBOX_API__TOKEN", "short")], "api.token"),
            (
                "",
                vec![("POSTBOX_API__TOKEN", "change-me-to-a-long-random-string")],
                "api.token",
            ),
            (
                "[[api.tokens]]\nname = \"a\"\ntoken_env = \"POSTBOX_TEST_UNSET_VAR\"\n",
                vec![],
                "api.tokens[0].token_env",
            ),
        ];
        for (text, e, key) in cases {
            let err = Settings::from_toml_and_env(text, env(&e)).unwrap_err();
            assert!(
                err.key.starts_with(key),
                "{text:?}: expected key {key}, got {err}"
            );
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn database_passwords_are_redacted_wherever_a_url_is_shown() {
        for (url, shown) in [
            (
                "postgres://u:PW@db.internal:5432/postbox",
                "postgres://u:********@db.internal:5432/postbox",
            ),
            (
                "postgresql://u:p%40ss:w@[::1]/db?sslmode=require",
                "postgresql://u:********@[::1]/db?sslmode=require",
            ),
            (
                "postgres://u@h/db?sslmode=disable&password=PW",
                "postgres://u@h/db?sslmode=disable&password=********",
            ),
            ("postgres://h/db", "postgres://h/db"),
            ("sqlite://postbox.db", "sqlite://postbox.db"),
            ("sqlite://dir/a@b.db", "sqlite://dir/a@b.db"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        let s = Settings::from_toml_and_env(
            "",
            env(&[(
                "POSTBOX_DATABASE__URL",
                "postgres://postbox:hunter2-secret@127.0.0.1:5432/postbox",
            )]),
        )
        .unwrap();
        for printed in [s.to_masked_toml(), format!("{s:?}")] {
            assert!(!printed.contains("hunter2-secret"), "{printed}");
            assert!(
                printed.contains("postgres://postbox:********@127.0.0.1:5432/postbox"),
                "{printed}"
            );
        }
    }

    #[test]
    fn config_errors_never_echo_a_secret() {
        let cases = [
            // toml quotes the offending line in its own message.
            ("[smtp]\npassword = \"hunter2-secret\nport = 1\n", vec![]),
            ("[smtp]\npassword = [\"hunter2-secret\"]\n", vec![]),
            ("[database]\nurl = [\"hunter2-secret\"]\n", vec![]),
            (
                "[api]\ntoken = 5\n",
                vec![("POSTBOX_API__TOKEN", "hunter2-secret")],
            ),
            (
                "[[api.tokens]]\nname = \"a\"\ntoken = \"hunter2-secret\"\nrate_per_sec = \"x\"\n",
                vec![],
            ),
        ];
        for (text, e) in cases {
            let err = Settings::from_toml_and_env(text, env(&e)).unwrap_err();
            assert!(!err.to_string().contains("hunter2"), "{text:?}: {err}");
        }
    }

    #[test]
    fn secrets_are_masked_when_printed() {
        let s = Settings::from_toml_and_env(
            "[smtp]\nusername = \"u\"\npassword = \"hunter2-secret\"\n",
            env(&[]),
        )
        .unwrap();
        assert!(!s.to_masked_toml().contains("hunter2-secret"));
        assert!(s.to_masked_toml().contains("********"));
        assert!(!format!("{s:?}").contains("hunter2-secret"));
    }
}
