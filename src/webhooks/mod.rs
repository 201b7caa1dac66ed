//! Webhooks: every event (`store::Event`, read from the timeline) is POSTed to each endpoint
//! that wants it, signed by the Standard Webhooks spec (`sign.rs`), at least once.
//!
//! Endpoints come from the config (`[[webhooks]]`, secrets from the environment) and from the
//! API (`/v1/webhooks`, secrets stored); each keeps its place in the events feed in the
//! database. The dispatcher (`dispatch.rs`) runs in every process that runs workers; on a
//! shared database one process at a time sends for an endpoint (a lease per endpoint).
//! Tuning is the `[webhook]` section.

mod client;
mod dispatch;
mod sign;

use std::collections::HashMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

pub use client::Target;
pub use dispatch::run;
pub use sign::Secret;

use crate::domain::EventType;
use crate::settings::ConfigError;
use crate::store::WebhookSpec;

/// One endpoint of the config (`[[webhooks]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// 1-48 characters of A-Z a-z 0-9 - _ .
    pub name: String,
    /// `https://...` (or `http://` to this host).
    pub url: String,
    /// The environment variable holding the `whsec_...` secret (preferred) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// ... or the secret itself, in this file.
    #[serde(
        default,
        serialize_with = "crate::settings::masked",
        skip_serializing_if = "Option::is_none"
    )]
    pub secret: Option<SecretString>,
    /// The event types sent (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// Only events of emails with one of these tags (empty: every email).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Allow `http://` to a host that is not loopback (events cross the network readable).
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// How webhooks are sent (`[webhook]`), for every endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookTuning {
    /// The deadline of one POST (connect, send, answer).
    pub timeout_secs: u64,
    /// POSTs in flight at once, per endpoint.
    pub concurrency: usize,
    /// Events read from the feed per round, per endpoint.
    pub batch: u32,
    /// The waits before each retry of a failed POST; when they are spent the delivery has
    /// failed (the event stays in the feed). The default retries for ~27.6 h.
    pub retry_schedule_secs: Vec<u64>,
    /// An endpoint that has not taken one event for this long is disabled (it says why).
    pub disable_after_hours: u64,
    /// How often an idle dispatcher looks for events written by other processes (its own
    /// process's wake it at once).
    pub poll_interval_ms: u64,
}

impl Default for WebhookTuning {
    fn default() -> Self {
        Self {
            timeout_secs: 10,
            concurrency: 8,
            batch: 256,
            retry_schedule_secs: vec![5, 300, 1800, 7200, 18000, 36000, 36000],
            disable_after_hours: 120,
            poll_interval_ms: 500,
        }
    }
}

impl WebhookTuning {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("webhook.timeout_secs", self.timeout_secs),
            ("webhook.concurrency", self.concurrency as u64),
            ("webhook.batch", u64::from(self.batch)),
            ("webhook.disable_after_hours", self.disable_after_hours),
            ("webhook.poll_interval_ms", self.poll_interval_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::new(key, "must be greater than 0"));
            }
        }
        if self.concurrency > 256 {
            return Err(ConfigError::new(
                "webhook.concurrency",
                "must be at most 256",
            ));
        }
        if self.batch > 10_000 {
            return Err(ConfigError::new("webhook.batch", "must be at most 10000"));
        }
        if self.retry_schedule_secs.len() > 50 {
            return Err(ConfigError::new(
                "webhook.retry_schedule_secs",
                "must have at most 50 waits",
            ));
        }
        Ok(())
    }
}

/// A config endpoint with its secret resolved.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub spec: WebhookSpec,
    pub secret: Secret,
}

/// The rules every endpoint's fields follow, config or API. Each error names the field.
pub fn check_spec(
    name: &str,
    url: &str,
    events: &[String],
    tags: &[String],
    allow_plaintext: bool,
) -> Result<(), (&'static str, String)> {
    if !crate::domain::plain_name(name, 48, b"-_.") {
        return Err((
            "name",
            "must be 1-48 characters of A-Z a-z 0-9 - _ .".into(),
        ));
    }
    if url.len() > 2048 {
        return Err(("url", "must be at most 2048 characters".into()));
    }
    let target = Target::parse(url).map_err(|e| ("url", e))?;
    if !target.is_tls() && !allow_plaintext && !crate::net::is_loopback_host(target.host()) {
        return Err((
            "url",
            "http:// sends events readable over the network; use https:// (or allow_plaintext)"
                .into(),
        ));
    }
    if events.len() > EventType::ALL.len() {
        return Err(("events", "lists a type twice".into()));
    }
    for e in events {
        if EventType::parse(e).is_none() {
            let all: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
            return Err((
                "events",
                format!(
                    "`{}` is not an event type (one of {})",
                    e.escape_debug(),
                    all.join(", ")
                ),
            ));
        }
    }
    if tags.len() > 50 {
        return Err(("tags", "must have at most 50 tags".into()));
    }
    if let Some(t) = tags.iter().find(|t| {
        t.is_empty() || t.len() > 64 || t.chars().any(|c| c.is_whitespace() || c.is_control())
    }) {
        return Err((
            "tags",
            format!(
                "`{}` is not a tag (1-64 characters, no spaces)",
                t.escape_debug()
            ),
        ));
    }
    Ok(())
}

/// Checks the config's endpoints and reads their secrets through `env`.
pub fn compile(
    hooks: &[WebhookSettings],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Endpoint>, ConfigError> {
    let mut out: Vec<Endpoint> = Vec::new();
    let mut seen: HashMap<&str, ()> = HashMap::new();
    for (i, h) in hooks.iter().enumerate() {
        let err = |field: &str, msg: String| {
            ConfigError::new(
                format!("webhooks[{i}].{field}"),
                format!("(webhook \"{}\") {msg}", h.name),
            )
        };
        check_spec(&h.name, &h.url, &h.events, &h.tags, h.allow_plaintext)
            .map_err(|(f, m)| err(f, m))?;
        if seen.insert(h.name.as_str(), ()).is_some() {
            return Err(err("name", "is used by two webhooks".into()));
        }
        let raw = match (&h.secret, &h.secret_env) {
            (Some(s), None) => s.expose_secret().to_string(),
            (None, Some(var)) => env(var).ok_or_else(|| {
                err(
                    "secret_env",
                    format!("environment variable {var} is not set"),
                )
            })?,
            _ => {
                return Err(err(
                    "secret_env",
                    "give exactly one of secret_env or secret".into(),
                ));
            }
        };
        let key = if h.secret.is_some() {
            "secret"
        } else {
            "secret_env"
        };
        let secret = Secret::parse(&raw).map_err(|m| err(key, format!("the secret {m}")))?;
        out.push(Endpoint {
            spec: WebhookSpec {
                name: h.name.clone(),
                url: h.url.clone(),
                secret: None,
                events: h.events.clone(),
                tags: h.tags.clone(),
            },
            secret,
        });
    }
    Ok(out)
}

/// The retry schedule as durations.
pub(crate) fn schedule(t: &WebhookTuning) -> Vec<Duration> {
    t.retry_schedule_secs
        .iter()
        .map(|s| Duration::from_secs(*s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(toml: &str) -> WebhookSettings {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn config_endpoints_are_checked_and_errors_name_the_key() {
        let env = |k: &str| {
            (k == "HOOK_SECRET").then(|| "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string())
        };
        let ok = hook(
            "name = \"app\"\nurl = \"https://hooks.example.com/x\"\nsecret_env = \"HOOK_SECRET\"\nevents = [\"email.sent\"]",
        );
        assert_eq!(compile(std::slice::from_ref(&ok), &env).unwrap().len(), 1);
        for (toml, key) in [
            (
                "name = \"a b\"\nurl = \"https://h/\"\nsecret_env = \"HOOK_SECRET\"",
                "webhooks[0].name",
            ),
            (
                "name = \"a\"\nurl = \"ftp://h/\"\nsecret_env = \"HOOK_SECRET\"",
                "webhooks[0].url",
            ),
            (
                "name = \"a\"\nurl = \"http://hooks.example.com/\"\nsecret_env = \"HOOK_SECRET\"",
                "webhooks[0].url",
            ),
            (
                "name = \"a\"\nurl = \"https://h/\"\nsecret_env = \"NOPE\"",
                "webhooks[0].secret_env",
            ),
            (
                "name = \"a\"\nurl = \"https://h/\"",
                "webhooks[0].secret_env",
            ),
            (
                "name = \"a\"\nurl = \"https://h/\"\nsecret = \"whsec_c2hvcnQ=\"",
                "webhooks[0].secret",
            ),
            (
                "name = \"a\"\nurl = \"https://h/\"\nsecret_env = \"HOOK_SECRET\"\nevents = [\"email.opened\"]",
                "webhooks[0].events",
            ),
            (
                "name = \"a\"\nurl = \"https://h/\"\nsecret_env = \"HOOK_SECRET\"\ntags = [\"a b\"]",
                "webhooks[0].tags",
            ),
        ] {
            let e = compile(&[hook(toml)], &env).unwrap_err();
            assert_eq!(e.key, key, "{toml}: {e}");
            assert!(!e.to_string().contains("c2hvcnQ"), "{e}");
        }
        let e = compile(&[ok.clone(), ok], &env).unwrap_err();
        assert_eq!(e.key, "webhooks[1].name");
        // Loopback may be plain http.
        let local =
            hook("name = \"l\"\nurl = \"http://127.0.0.1:9/\"\nsecret_env = \"HOOK_SECRET\"");
        assert!(compile(&[local], &env).is_ok());
    }
}
