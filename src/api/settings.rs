//! The HTTP API's section: `[api]`, and its tokens (`[[api.tokens]]`), resolved once by the
//! runtime.

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::settings::{ConfigError, masked, nonzero};

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
    /// The address recipients reach this API at (`https://mail.example.com`): emails with
    /// `one_click_unsubscribe` carry a `List-Unsubscribe` link under it (`/u/<token>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
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
            public_url: None,
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
    /// Every configured token with its secret (`env` reads `token_env` variables).
    pub fn resolve_tokens(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
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
    /// The API's address, refused when it is not loopback and `tokens` is empty (an open API
    /// beyond this host).
    pub fn exposed_addr(
        &self,
        tokens: &[ResolvedToken],
    ) -> Result<std::net::SocketAddr, ConfigError> {
        let addr = self.listen_addr()?;
        if tokens.is_empty() && !addr.ip().is_loopback() {
            return Err(ConfigError::new(
                "api.token",
                format!(
                    "api.listen = {addr} is not a loopback address; configure api.token \
                     (POSTBOX_API__TOKEN) or [[api.tokens]] before serving beyond this host, \
                     or listen on 127.0.0.1"
                ),
            ));
        }
        Ok(addr)
    }

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

impl ApiSettings {
    /// Checks what types alone cannot (the tokens are checked when they are resolved).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if let Some(u) = &self.public_url {
            let ok = (u.starts_with("https://") || u.starts_with("http://"))
                && u.parse::<axum::http::Uri>()
                    .is_ok_and(|x| x.host().is_some_and(|h| !h.is_empty()));
            if !ok || u.len() > 512 {
                return Err(ConfigError::new(
                    "api.public_url",
                    "must be an http(s) URL with a host, e.g. https://mail.example.com",
                ));
            }
        }
        nonzero(&[
            ("api.max_body_bytes", self.max_body_bytes as u64),
            ("api.max_batch", self.max_batch as u64),
            ("api.max_json_values", self.max_json_values as u64),
            ("api.burst", u64::from(self.burst)),
            ("api.max_connections", self.max_connections as u64),
            ("api.header_timeout_secs", self.header_timeout_secs),
            ("api.body_timeout_secs", self.body_timeout_secs),
            ("api.max_failed_logins", u64::from(self.max_failed_logins)),
            (
                "api.failed_login_window_secs",
                self.failed_login_window_secs,
            ),
        ])
    }
}
