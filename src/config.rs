//! Settings: built-in defaults, then a TOML file (`--config` / `POSTBOX_CONFIG`), then
//! `POSTBOX_<SECTION>__<KEY>` environment variables (e.g. `POSTBOX_SMTP__PASSWORD`).
//!
//! This module only loads and merges them and names bad keys: each section's type and its
//! checks live with its layer (`store::DatabaseSettings`, `delivery::SmtpSettings`, ...), and
//! secrets named by the file (`password_env`, `token_env`), API tokens and mailbox rules are
//! resolved once, by [`crate::Runtime::build`]. Every error names the key (`smtp.port`) and, for
//! an environment override, the variable. Secrets are held in `SecretString` and printed only
//! as `********`.

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use crate::api::{ApiSettings, ApiToken, ResolvedToken};
pub use crate::delivery::{
    DeliverySettings, DkimSettings, DomainLimit, RelaySetup, RetryPolicy, RouteSettings,
    SmtpSettings, ThrottleSettings, TlsMode, Transport,
};
use crate::domain::Limits;
pub use crate::inbound::{ClusterSettings, MailboxSettings};
pub use crate::queue::QueueSettings;
pub use crate::settings::ConfigError;
pub use crate::store::{DatabaseSettings, RetentionSettings, redact_url};
pub use crate::telemetry::{LogFormat, LogSettings};

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
    /// The one relay, when `[[relays]]` is not used.
    pub smtp: SmtpSettings,
    /// Several relays (`[[relays]]`: a `name` plus `[smtp]`'s keys); none: `[smtp]` is the one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<SmtpSettings>,
    /// Which relays take which emails (`[[routes]]`), first match wins.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteSettings>,
    /// Rate limits per recipient domain (`[[domain_limits]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub domain_limits: Vec<DomainLimit>,
    /// Adaptive throttling (`[throttle]`).
    pub throttle: ThrottleSettings,
    /// The stall alert (`[stall_alert]`); off until `alert_to` is set.
    pub stall_alert: crate::stall::StallAlertSettings,
    /// DKIM keys per From domain (`[[dkim]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<DkimSettings>,
    pub limits: Limits,
    pub log: LogSettings,
    pub api: ApiSettings,
    pub cluster: ClusterSettings,
    /// IMAP mailboxes the watcher reads (`[[mailboxes]]`); none by default.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mailboxes: Vec<MailboxSettings>,
    /// How webhooks are sent (`[webhook]`).
    pub webhook: crate::webhooks::WebhookTuning,
    /// Webhook endpoints (`[[webhooks]]`); none by default.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<crate::webhooks::WebhookSettings>,
}

const ENV_PREFIX: &str = "POSTBOX_";

/// Keys whose values are secrets: errors about them never echo the value.
fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    let last = last.split('[').next().unwrap_or(last);
    matches!(last, "password" | "token" | "secret" | "url")
}

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
    collect(table.get("webhooks"), "secret_env");
    collect(table.get("relays"), "password_env");
    collect(table.get("dkim"), "key_env");
    collect(table.get("api").and_then(|a| a.get("tokens")), "token_env");
    if let Some(name) = table
        .get("smtp")
        .and_then(|s| s.get("password_env"))
        .and_then(|v| v.as_str())
    {
        out.push(name.to_string());
    }
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

    /// Checks every section (each by its own rules), then what relates two of them. Reads
    /// no environment and compiles nothing: secrets, tokens and mailbox rules are resolved by
    /// [`crate::Runtime::build`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.database.validate()?;
        self.retention.validate()?;
        self.queue.validate()?;
        self.retry.validate()?;
        self.delivery.senders()?;
        self.delivery.return_path()?;
        let relays = self.relay_setup()?;
        self.limits.validate()?;
        self.log.validate()?;
        self.api.validate()?;
        self.cluster.validate()?;
        self.webhook.validate()?;
        self.stall_alert.validate()?;
        let command_timeout = relays
            .relays
            .iter()
            .map(|r| r.command_timeout_secs)
            .max()
            .unwrap_or(0);
        if self.queue.stuck_after_secs <= command_timeout * 4 {
            return Err(ConfigError::new(
                "queue.stuck_after_secs",
                "must be longer than 4 x smtp.command_timeout_secs, or live sends look stuck",
            ));
        }
        Ok(())
    }

    /// The relay sections, checked and resolved (see [`RelaySetup::build`]).
    pub fn relay_setup(&self) -> Result<RelaySetup, ConfigError> {
        RelaySetup::build(
            &self.delivery,
            &self.smtp,
            &self.relays,
            &self.routes,
            &self.domain_limits,
            &self.throttle,
            self.delivery.transport == Transport::Smtp,
        )
    }

    /// The effective settings as TOML, secrets masked (for `postbox config check`).
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}"))
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
    use std::path::PathBuf;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Loads and resolves, as `postbox config check` does (secrets from `pairs` only).
    fn check(text: &str, pairs: &[(&str, &str)]) -> Result<crate::Runtime, ConfigError> {
        let vars = env(pairs);
        let s = Settings::from_toml_and_env(text, vars.clone())?;
        let rt = crate::Runtime::build_with(s, &|k| {
            vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })?;
        rt.api_addr()?;
        Ok(rt)
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
        // Loading reads no environment; resolving reads password_env from it.
        let s = Settings::from_toml_and_env(&block, env(&[])).unwrap();
        let mb = crate::inbound::compile(&s.mailboxes, &|_| Some("x".into())).unwrap();
        assert_eq!(mb[0].rules[0].name, "disk full");
        assert_eq!(mb[0].rules[0].priority, crate::Priority::High);
        assert_eq!(mb[1].purpose, crate::inbound::Purpose::Bounces);
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
            (
                "[delivery]\nreturn_path = \"bounces@example.com\"\n",
                vec![],
                "delivery.return_path",
            ),
            (
                "[delivery]\nreturn_path = \"Bounces <bounces+{id}@example.com>\"\n",
                vec![],
                "delivery.return_path",
            ),
            (
                "[api]\npublic_url = \"ftp://x\"\n",
                vec![],
                "api.public_url",
            ),
            (
                "[webhook]\nconcurrency = 0\n",
                vec![],
                "webhook.concurrency",
            ),
            (
                "[[mailboxes]]\nname = \"b\"\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\nalert_to = [\"a@example.com\"]\npurpose = \"bounces\"\n[[mailboxes.rules]]\nname = \"r\"\nsubject = \"x\"\n",
                vec![],
                "mailboxes[0].rules",
            ),
            (
                "[[mailboxes]]\nname = \"b\"\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\nalert_to = [\"a@example.com\"]\npurpose = \"bounces\"\nsoft_bounce_limit = 0\n",
                vec![],
                "mailboxes[0].soft_bounce_limit",
            ),
            (
                "[smtp]\nport = 25\n[[relays]]\nname = \"a\"\nhost = \"127.0.0.1\"\ntls = \"none\"\n",
                vec![],
                "smtp",
            ),
            (
                "[[relays]]\nname = \"a\"\nhost = \"127.0.0.1\"\ntls = \"none\"\n[[relays]]\nname = \"a\"\nhost = \"127.0.0.1\"\ntls = \"none\"\n",
                vec![],
                "relays[1].name",
            ),
            (
                "[[relays]]\nname = \"a\"\nhost = \"127.0.0.1\"\ntls = \"none\"\n[delivery]\nrelays = [\"a\", \"z\"]\n",
                vec![],
                "delivery.relays",
            ),
            (
                "[[relays]]\nname = \"a\"\nhost = \"127.0.0.1\"\ntls = \"none\"\n[[routes]]\ntag = \"x\"\nrcpt_domain = \"y\"\nrelays = [\"a\"]\n",
                vec![],
                "routes[0]",
            ),
            (
                "[[domain_limits]]\ndomain = \"gmail.com\"\n",
                vec![],
                "domain_limits[0].per_second",
            ),
            (
                "[throttle]\npatterns = [\"(\"]\n",
                vec![],
                "throttle.patterns[0]",
            ),
            ("[throttle]\ndecrease = 1.5\n", vec![], "throttle.decrease"),
            (
                "[stall_alert]\nalert_to = [\"not an address\"]\n",
                vec![],
                "stall_alert.alert_to[0]",
            ),
            (
                "[stall_alert]\nfailure_ratio = 2.0\n",
                vec![],
                "stall_alert.failure_ratio",
            ),
            (
                "[[relays]]\nname = \"a\"\nhost = \"127.0.0.1\"\ntls = \"none\"\npassword_env = \"NOT_SET_ANYWHERE\"\nusername = \"u\"\n",
                vec![],
                "relays[0].password_env",
            ),
        ];
        for (text, e, key) in cases {
            let err = check(text, &e).unwrap_err();
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
            let err = check(text, &e).unwrap_err();
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
