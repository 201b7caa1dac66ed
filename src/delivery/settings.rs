//! Delivery's sections: `[delivery]` (where mail goes, who it is from) and `[smtp]` (the relay).
//! `[retry]` is [`super::RetryPolicy`].

use std::path::PathBuf;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::domain::{EmailAddress, Senders};
use crate::net::is_loopback_host;
use crate::settings::{ConfigError, masked, nonzero};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Write one `.eml` file per email into `delivery.outbox_dir` (development).
    File,
    /// Deliver to the relay in `[smtp]`.
    Smtp,
    /// Keep every message in this process's memory ([`crate::Postbox::sent_in_memory`]): for
    /// tests and embedders that look at what would be sent. Nothing leaves the process.
    Memory,
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
    /// The envelope sender (MAIL FROM) of every email, with `{id}` replaced by the email's id
    /// (VERP): `bounces+{id}@example.com`. Bounces then come back to that address and name
    /// the email they answer. Unset: the From address is the envelope sender.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_path: Option<String>,
    /// The default failover order of relays, by name (`[[relays]]`); empty: every relay, in
    /// the file's order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<String>,
    /// A temporary failure (4xx, timeout) on one relay is tried on the next relay of the
    /// email's route at once, in the same attempt. Off: the attempt is retried later.
    pub failover_on_temporary: bool,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            transport: Transport::File,
            outbox_dir: PathBuf::from("outbox"),
            default_from: "postbox@localhost".into(),
            allowed_from: Vec::new(),
            return_path: None,
            relays: Vec::new(),
            failover_on_temporary: true,
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

impl DeliverySettings {
    /// `default_from` and `allowed_from`, checked.
    /// `return_path`, checked: one `{id}`, and an address once it is filled in.
    pub fn return_path(&self) -> Result<Option<String>, ConfigError> {
        let Some(rp) = &self.return_path else {
            return Ok(None);
        };
        let err = |m: &str| ConfigError::new("delivery.return_path", m.to_string());
        if rp.matches("{id}").count() != 1 {
            return Err(err("must hold `{id}` once (e.g. bounces+{id}@example.com)"));
        }
        let sample = rp.replace("{id}", "01KZZZZZZZZZZZZZZZZZZZZZZZ");
        let a =
            EmailAddress::parse(&sample).map_err(|m| err(&format!("is not an address: {m}")))?;
        if a.address() != sample {
            return Err(err("must be a bare address (no display name)"));
        }
        Ok(Some(rp.clone()))
    }

    pub fn senders(&self) -> Result<Senders, ConfigError> {
        let from = EmailAddress::parse(&self.default_from)
            .map_err(|m| ConfigError::new("delivery.default_from", m))?;
        Senders::new(from, &self.allowed_from).map_err(|(i, m)| {
            let key = if i == usize::MAX {
                "delivery.allowed_from".to_string()
            } else {
                format!("delivery.allowed_from[{i}]")
            };
            ConfigError::new(key, m)
        })
    }
}

/// One relay: `[smtp]` (the single default relay, named `default` unless it says otherwise) or
/// an entry of `[[relays]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSettings {
    /// How routes, `delivery.relays`, an email's `relay` field, the API and metrics name it.
    pub name: String,
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
    /// The environment variable holding the password (instead of `password`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
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
    /// A connection is closed (QUIT) after this many messages; 0: no limit.
    pub max_messages_per_connection: u32,
    /// Send MAIL FROM, the RCPT TOs and DATA in one write when the relay offers PIPELINING
    /// (RFC 2920). Off: one command at a time, for a relay (or a firewall between) that
    /// offers it and mishandles it (Postfix's `smtp_discard_ehlo_keywords = pipelining`).
    pub pipelining: bool,
    /// Connections open to this relay at once across every worker process: each live worker
    /// process takes an equal share (at least one, at most `pool_max`), recomputed every
    /// heartbeat. Unset: `pool_max` per process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Sending rate limits, across every worker process sharing the database on PostgreSQL
    /// (within this process on SQLite). Messages are spread evenly: `per_minute = 600` is one
    /// every 100 ms. Unset: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_minute: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_hour: Option<f64>,
    /// A relay that cannot be reached (refused, timed out, a 421 or 554 greeting, a failed
    /// AUTH or TLS) is skipped for this long; the next relay of the route is used meanwhile.
    pub cooldown_secs: u64,
}

/// The tightest of the per-second, per-minute and per-hour limits, in messages per second.
pub fn rate_of(
    per_second: Option<f64>,
    per_minute: Option<f64>,
    per_hour: Option<f64>,
) -> Option<f64> {
    [
        per_second,
        per_minute.map(|m| m / 60.0),
        per_hour.map(|h| h / 3600.0),
    ]
    .into_iter()
    .flatten()
    .reduce(f64::min)
}

/// Checks rate limit keys under `prefix` (`relays[0].`): positive, finite numbers.
fn check_rates(prefix: &str, rates: [(&str, Option<f64>); 3]) -> Result<(), ConfigError> {
    for (key, v) in rates {
        if let Some(v) = v
            && !(v.is_finite() && v > 0.0)
        {
            return Err(ConfigError::new(
                format!("{prefix}{key}"),
                "must be a number greater than 0 (leave it out for no limit)",
            ));
        }
    }
    Ok(())
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            name: "default".into(),
            host: "localhost".into(),
            port: 587,
            tls: TlsMode::Starttls,
            username: None,
            password: None,
            password_env: None,
            hello_name: None,
            ca_file: None,
            allow_plaintext: false,
            connect_timeout_secs: 10,
            command_timeout_secs: 30,
            pool_max: 10,
            pool_idle_secs: 60,
            max_messages_per_connection: 0,
            pipelining: true,
            max_connections: None,
            per_second: None,
            per_minute: None,
            per_hour: None,
            cooldown_secs: 60,
        }
    }
}

impl SmtpSettings {
    /// This relay's rate limit in messages per second (the tightest of its limits).
    pub fn rate(&self) -> Option<f64> {
        rate_of(self.per_second, self.per_minute, self.per_hour)
    }

    /// Checks the relay settings; `used` says whether mail goes to this relay at all.
    pub fn validate(&self, used: bool) -> Result<(), ConfigError> {
        self.validate_at("smtp.", used)
    }

    /// [`SmtpSettings::validate`] with keys under `prefix` (`smtp.`, `relays[1].`).
    pub fn validate_at(&self, prefix: &str, used: bool) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}{k}");
        nonzero(&[
            (&key("connect_timeout_secs"), self.connect_timeout_secs),
            (&key("command_timeout_secs"), self.command_timeout_secs),
            (&key("pool_max"), u64::from(self.pool_max)),
            (&key("cooldown_secs"), self.cooldown_secs),
            (
                &key("max_connections"),
                self.max_connections.map_or(1, u64::from),
            ),
        ])?;
        check_rates(
            prefix,
            [
                ("per_second", self.per_second),
                ("per_minute", self.per_minute),
                ("per_hour", self.per_hour),
            ],
        )?;
        if !crate::domain::plain_name(&self.name, 64, b"-_.") {
            return Err(ConfigError::new(
                key("name"),
                "must be 1-64 characters of A-Z a-z 0-9 - _ .",
            ));
        }
        if used && self.host.trim().is_empty() {
            return Err(ConfigError::new(
                key("host"),
                "is required when delivery.transport = \"smtp\"",
            ));
        }
        if self.tls == TlsMode::None && !self.allow_plaintext && !is_loopback_host(&self.host) {
            return Err(ConfigError::new(
                key("tls"),
                format!(
                    "\"none\" sends mail and the password readable over the network to {}; use \
                     \"starttls\" or \"tls\", or set {prefix}allow_plaintext = true to accept that",
                    self.host
                ),
            ));
        }
        if let Some(ca) = &self.ca_file
            && !ca.is_file()
        {
            return Err(ConfigError::new(
                key("ca_file"),
                format!("{} is not a file", ca.display()),
            ));
        }
        if self.password.is_some() && self.password_env.is_some() {
            return Err(ConfigError::new(
                key("password_env"),
                "give at most one of password_env or password",
            ));
        }
        if (self.password.is_some() || self.password_env.is_some()) && self.username.is_none() {
            return Err(ConfigError::new(
                key("username"),
                format!("is required when {prefix}password is set"),
            ));
        }
        Ok(())
    }
}

/// `[[routes]]`: emails matching ONE condition go to these relays, in this failover order.
/// The first matching route wins; an email's `relay` field overrides every route.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteSettings {
    /// Emails carrying this tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Emails whose From address is at this domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_domain: Option<String>,
    /// Emails with a recipient at this domain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcpt_domain: Option<String>,
    /// Relay names, in failover order.
    pub relays: Vec<String>,
}

/// `[[domain_limits]]`: a sending rate limit for one recipient domain (every relay together).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DomainLimit {
    pub domain: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_minute: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_hour: Option<f64>,
}

/// `[throttle]`: adaptive throttling. A reply matching one of `patterns` (a regex on
/// `"<code> <text>"`) means "slow down": that relay's rate is cut to `decrease` x its current
/// rate (at most once per second, never below `min_per_second`), then raised by `increase` x
/// every `step_secs` without such a reply, until it is back at the configured limit (or, for a
/// relay without one, at 4x the rate it was first cut from). The email that got the
/// reply is tried again without spending its retry budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleSettings {
    pub patterns: Vec<String>,
    pub decrease: f64,
    pub increase: f64,
    pub step_secs: u64,
    pub min_per_second: f64,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            patterns: vec![
                r"^421 ".into(),
                r"^45[0-9] 4\.7\.".into(),
                r"(?i)^4[0-9][0-9] .*(throttl|rate limit|too many (messages|connections))".into(),
            ],
            decrease: 0.5,
            increase: 1.25,
            step_secs: 5,
            min_per_second: 0.5,
        }
    }
}

impl ThrottleSettings {
    pub fn compile(&self) -> Result<Vec<regex::Regex>, ConfigError> {
        let mut out = Vec::new();
        for (i, p) in self.patterns.iter().enumerate() {
            out.push(regex::Regex::new(p).map_err(|e| {
                ConfigError::new(
                    format!("throttle.patterns[{i}]"),
                    format!("is not a regex: {e}"),
                )
            })?);
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.compile()?;
        nonzero(&[("throttle.step_secs", self.step_secs)])?;
        if !(self.decrease > 0.0 && self.decrease < 1.0) {
            return Err(ConfigError::new(
                "throttle.decrease",
                "must be between 0 and 1",
            ));
        }
        if !(self.increase > 1.0 && self.increase.is_finite()) {
            return Err(ConfigError::new(
                "throttle.increase",
                "must be greater than 1",
            ));
        }
        if !(self.min_per_second > 0.0 && self.min_per_second.is_finite()) {
            return Err(ConfigError::new(
                "throttle.min_per_second",
                "must be greater than 0",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DkimAlgorithm {
    /// rsa-sha256; the key is PEM (PKCS#1 or PKCS#8), at least 2048 bits.
    Rsa,
    /// ed25519-sha256 (RFC 8463); the key is PEM (PKCS#8) or the base64 32-byte seed.
    Ed25519,
}

/// `[[dkim]]`: sign mail From this domain.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimSettings {
    pub domain: String,
    pub selector: String,
    #[serde(default = "default_dkim_algorithm")]
    pub algorithm: DkimAlgorithm,
    /// The private key's file (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The environment variable holding the private key (instead of `key_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
}

fn default_dkim_algorithm() -> DkimAlgorithm {
    DkimAlgorithm::Rsa
}

/// Everything that decides which relay takes an email and how fast: `[smtp]` / `[[relays]]`,
/// `[delivery] relays`, `[[routes]]`, `[[domain_limits]]`, `[throttle]`.
#[derive(Debug, Clone)]
pub struct RelaySetup {
    pub relays: Vec<SmtpSettings>,
    /// Indexes into `relays`.
    pub default_order: Vec<usize>,
    pub routes: Vec<(RouteSettings, Vec<usize>)>,
    pub domain_limits: Vec<DomainLimit>,
    pub throttle: ThrottleSettings,
    pub failover_on_temporary: bool,
}

impl RelaySetup {
    /// Checks and resolves the relay sections. `relays` empty: `[smtp]` is the one relay.
    /// `used`: mail goes over SMTP (`delivery.transport = "smtp"`).
    pub fn build(
        delivery: &DeliverySettings,
        smtp: &SmtpSettings,
        relays: &[SmtpSettings],
        routes: &[RouteSettings],
        domain_limits: &[DomainLimit],
        throttle: &ThrottleSettings,
        used: bool,
    ) -> Result<RelaySetup, ConfigError> {
        let list: Vec<SmtpSettings> = if relays.is_empty() {
            smtp.validate(used)?;
            vec![smtp.clone()]
        } else {
            smtp.validate(false)?;
            let default_toml = toml::to_string(&SmtpSettings::default()).unwrap_or_default();
            if toml::to_string(smtp).unwrap_or_default() != default_toml {
                return Err(ConfigError::new(
                    "smtp",
                    "give either [smtp] (one relay) or [[relays]], not both",
                ));
            }
            for (i, r) in relays.iter().enumerate() {
                r.validate_at(&format!("relays[{i}]."), used)?;
                if relays[..i].iter().any(|o| o.name == r.name) {
                    return Err(ConfigError::new(
                        format!("relays[{i}].name"),
                        format!("\"{}\" names two relays", r.name),
                    ));
                }
            }
            relays.to_vec()
        };
        let find = |key: String, names: &[String]| -> Result<Vec<usize>, ConfigError> {
            let mut out = Vec::new();
            for n in names {
                let i = list.iter().position(|r| &r.name == n).ok_or_else(|| {
                    ConfigError::new(
                        key.clone(),
                        format!(
                            "\"{n}\" is not a relay (relays: {})",
                            list.iter()
                                .map(|r| r.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                })?;
                if out.contains(&i) {
                    return Err(ConfigError::new(
                        key.clone(),
                        format!("names \"{n}\" twice"),
                    ));
                }
                out.push(i);
            }
            Ok(out)
        };
        let default_order = if delivery.relays.is_empty() {
            (0..list.len()).collect()
        } else {
            find("delivery.relays".into(), &delivery.relays)?
        };
        let mut resolved = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let conditions = [
                r.tag.is_some(),
                r.from_domain.is_some(),
                r.rcpt_domain.is_some(),
            ];
            if conditions.iter().filter(|c| **c).count() != 1 {
                return Err(ConfigError::new(
                    format!("routes[{i}]"),
                    "give exactly one of tag, from_domain or rcpt_domain",
                ));
            }
            if r.relays.is_empty() {
                return Err(ConfigError::new(
                    format!("routes[{i}].relays"),
                    "must name at least one relay",
                ));
            }
            let mut r = r.clone();
            r.from_domain = r.from_domain.map(|d| d.to_ascii_lowercase());
            r.rcpt_domain = r.rcpt_domain.map(|d| d.to_ascii_lowercase());
            let order = find(format!("routes[{i}].relays"), &r.relays)?;
            resolved.push((r, order));
        }
        let mut limits = Vec::new();
        for (i, d) in domain_limits.iter().enumerate() {
            let prefix = format!("domain_limits[{i}].");
            if d.domain.trim().is_empty() || d.domain.contains('@') {
                return Err(ConfigError::new(
                    format!("{prefix}domain"),
                    "must be a domain (example.com)",
                ));
            }
            check_rates(
                &prefix,
                [
                    ("per_second", d.per_second),
                    ("per_minute", d.per_minute),
                    ("per_hour", d.per_hour),
                ],
            )?;
            if rate_of(d.per_second, d.per_minute, d.per_hour).is_none() {
                return Err(ConfigError::new(
                    format!("{prefix}per_second"),
                    "give per_second, per_minute or per_hour",
                ));
            }
            let mut d = d.clone();
            d.domain = d.domain.trim().to_ascii_lowercase();
            limits.push(d);
        }
        throttle.validate()?;
        Ok(RelaySetup {
            relays: list,
            default_order,
            routes: resolved,
            domain_limits: limits,
            throttle: throttle.clone(),
            failover_on_temporary: delivery.failover_on_temporary,
        })
    }
}
