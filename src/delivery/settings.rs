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
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            transport: Transport::File,
            outbox_dir: PathBuf::from("outbox"),
            default_from: "postbox@localhost".into(),
            allowed_from: Vec::new(),
            return_path: None,
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

impl SmtpSettings {
    /// Checks the relay settings; `used` says whether mail goes to this relay at all.
    pub fn validate(&self, used: bool) -> Result<(), ConfigError> {
        nonzero(&[
            ("smtp.connect_timeout_secs", self.connect_timeout_secs),
            ("smtp.command_timeout_secs", self.command_timeout_secs),
            ("smtp.pool_max", u64::from(self.pool_max)),
        ])?;
        if used && self.host.trim().is_empty() {
            return Err(ConfigError::new(
                "smtp.host",
                "is required when delivery.transport = \"smtp\"",
            ));
        }
        if self.tls == TlsMode::None && !self.allow_plaintext && !is_loopback_host(&self.host) {
            return Err(ConfigError::new(
                "smtp.tls",
                format!(
                    "\"none\" sends mail and the password readable over the network to {}; use \
                     \"starttls\" or \"tls\", or set smtp.allow_plaintext = true to accept that",
                    self.host
                ),
            ));
        }
        if let Some(ca) = &self.ca_file
            && !ca.is_file()
        {
            return Err(ConfigError::new(
                "smtp.ca_file",
                format!("{} is not a file", ca.display()),
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(ConfigError::new(
                "smtp.username",
                "is required when smtp.password is set",
            ));
        }
        Ok(())
    }
}
