//! `[[mailboxes]]` and their `[[mailboxes.rules]]`: what the watcher reads and what it alerts on.
//!
//! [`compile`] turns the settings into [`Mailbox`]es (regexes compiled once, recipients parsed,
//! the template checked against the alert variables); every error names the mailbox and the rule.
//!
//! About 600 lines because it is one section's whole surface: the settings types with their
//! defaults and their compilation, each check next to the key it names.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::rules::{Cond, Field, GroupBy, Rule};
use crate::domain::{EmailAddress, Priority};
use crate::settings::ConfigError;

/// How the connection to the IMAP server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImapTls {
    /// TLS from the first byte (port 993).
    Tls,
    /// Plain connection upgraded with STARTTLS before login (port 143).
    Starttls,
    /// DANGEROUS: no encryption at all; the password crosses the network in clear text. Only for
    /// a server on the same host (loopback).
    None,
}

/// One watched mailbox (`[[mailboxes]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxSettings {
    /// A short unique name: used in logs, alerts, metrics and the stored position.
    pub name: String,
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_tls")]
    pub tls: ImapTls,
    /// Extra trust anchors (PEM) for a server whose certificate a public CA did not sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Allow `tls = "none"` to a host that is not loopback (the password crosses the network
    /// readable). Off: such a mailbox is refused.
    #[serde(default)]
    pub allow_plaintext: bool,
    pub username: String,
    /// The environment variable that holds the password (preferred) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// ... or the password itself, in this file.
    #[serde(
        default,
        serialize_with = "crate::settings::masked",
        skip_serializing_if = "Option::is_none"
    )]
    pub password: Option<SecretString>,
    #[serde(default = "default_folder")]
    pub folder: String,
    /// Use IMAP IDLE when the server offers it (else poll every `poll_interval_secs`).
    #[serde(default = "yes")]
    pub idle: bool,
    #[serde(default = "default_poll")]
    pub poll_interval_secs: u64,
    /// IDLE is ended and re-issued this often (servers drop an IDLE after 30 minutes).
    #[serde(default = "default_idle_renew")]
    pub idle_renew_secs: u64,
    /// On the very first start, read what the folder already holds (else start at "now").
    #[serde(default)]
    pub from_start: bool,
    /// Who gets alerts of rules that name no `alert_to`, and the watcher's own down alert.
    #[serde(default)]
    pub alert_to: Vec<String>,
    /// The watcher alerts about itself when it has not been connected for this long.
    #[serde(default = "default_down_after")]
    pub down_alert_after_secs: u64,
    /// ... and repeats that alert at most this often while it stays down.
    #[serde(default = "default_repeat")]
    pub down_repeat_interval_secs: u64,
    /// Reconnect backoff: doubles from `reconnect_min_ms` up to `reconnect_max_secs`, jittered.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_secs: u64,
    #[serde(default = "default_timeout")]
    pub connect_timeout_secs: u64,
    #[serde(default = "default_command_timeout")]
    pub command_timeout_secs: u64,
    /// Messages fetched per IMAP round trip (and committed per transaction).
    #[serde(default = "default_fetch_batch")]
    pub fetch_batch: u32,
    /// Only the first bytes of a message are fetched and matched; a larger one is matched on
    /// what fits.
    #[serde(default = "default_max_bytes")]
    pub max_message_bytes: u32,
    #[serde(default)]
    pub rules: Vec<RuleSettings>,
    /// `alerts` (rules raise alerts) or `bounces` (DSNs and complaints feed the suppression
    /// list; no rules).
    #[serde(default)]
    pub purpose: Purpose,
    /// A bounces mailbox: this many soft bounces of one address ...
    #[serde(default = "default_soft_limit")]
    pub soft_bounce_limit: u32,
    /// ... within this many hours suppress it.
    #[serde(default = "default_soft_window")]
    pub soft_bounce_window_hours: u64,
}

/// What a watched mailbox is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    #[default]
    Alerts,
    Bounces,
}

fn default_soft_limit() -> u32 {
    3
}

fn default_soft_window() -> u64 {
    7 * 24
}

/// Combines a condition block's tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    #[default]
    All,
    Any,
}

/// A header test: the named header (any of its values) matches the regex.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderCondition {
    pub name: String,
    pub regex: String,
}

/// A block of tests. Each field given is one test; `match` says whether all or any must hold.
/// `all` / `any` hold nested blocks (all of them / at least one must match) and `not` one that
/// must not match.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_attachment: Option<bool>,
    #[serde(default, rename = "match")]
    pub combine: Combine,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub all: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub any: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<Condition>>,
}

/// What happens to a matched message on the server once its alert is safely stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Then {
    /// Leave it as it is (unread stays unread).
    #[default]
    Keep,
    /// Set \Seen.
    Seen,
    /// Move it to `move_to`.
    Move,
}

/// One rule (`[[mailboxes.rules]]`): the tests of a [`Condition`] block, then the action.
///
/// The test fields repeat [`Condition`]'s on purpose: serde cannot `flatten` into a struct that
/// denies unknown fields, and a misspelt key must fail `config check`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSettings {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_attachment: Option<bool>,
    #[serde(default, rename = "match")]
    pub combine: Combine,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub all: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub any: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<Condition>>,
    /// Recipients of this rule's alerts (default: the mailbox's `alert_to`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alert_to: Vec<String>,
    /// `critical` (priority high), `warning` (normal) or `info` (low).
    #[serde(default = "default_severity")]
    pub severity: String,
    #[serde(default = "default_template")]
    pub template: String,
    /// What makes two matches one alert: `rule` (always implied), `mailbox`, `sender`,
    /// `subject`, or the name of a regex capture.
    #[serde(default = "default_group_by")]
    pub group_by: Vec<String>,
    /// A new group waits this long for more matches before its first alert.
    #[serde(default)]
    pub group_wait_secs: u64,
    /// A group that keeps matching alerts again at most this often.
    #[serde(default = "default_repeat")]
    pub repeat_interval_secs: u64,
    #[serde(default)]
    pub then: Then,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub move_to: Option<String>,
}

impl RuleSettings {
    fn condition(&self) -> Condition {
        Condition {
            from: self.from.clone(),
            to: self.to.clone(),
            subject: self.subject.clone(),
            body: self.body.clone(),
            headers: self.headers.clone(),
            has_attachment: self.has_attachment,
            combine: self.combine,
            all: self.all.clone(),
            any: self.any.clone(),
            not: self.not.clone(),
        }
    }
}

fn default_port() -> u16 {
    993
}
fn default_tls() -> ImapTls {
    ImapTls::Tls
}
fn default_folder() -> String {
    "INBOX".into()
}
fn yes() -> bool {
    true
}
fn default_poll() -> u64 {
    60
}
fn default_idle_renew() -> u64 {
    25 * 60
}
fn default_down_after() -> u64 {
    600
}
fn default_repeat() -> u64 {
    4 * 3600
}
fn default_reconnect_min() -> u64 {
    500
}
fn default_reconnect_max() -> u64 {
    60
}
fn default_timeout() -> u64 {
    10
}
fn default_command_timeout() -> u64 {
    60
}
fn default_fetch_batch() -> u32 {
    500
}
fn default_max_bytes() -> u32 {
    1024 * 1024
}
fn default_severity() -> String {
    "critical".into()
}
fn default_template() -> String {
    "alert".into()
}
fn default_group_by() -> Vec<String> {
    vec!["rule".into()]
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

impl ClusterSettings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.lease_secs < 3 {
            return Err(ConfigError::new("cluster.lease_secs", "must be at least 3"));
        }
        Ok(())
    }
}

/// The rule name of a watcher's alert about itself; user rules may not take it.
pub const DOWN_RULE: &str = "mailbox-down";

/// A mailbox ready to watch: settings checked, rules compiled.
#[derive(Debug)]
pub struct Mailbox {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub tls: ImapTls,
    pub ca_file: Option<PathBuf>,
    pub username: String,
    pub password: SecretString,
    pub folder: String,
    pub idle: bool,
    pub poll_interval: Duration,
    pub idle_renew: Duration,
    pub from_start: bool,
    pub alert_to: Vec<EmailAddress>,
    pub down_alert_after: Duration,
    pub down_repeat_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub fetch_batch: u32,
    pub max_message_bytes: u32,
    pub rules: Vec<Rule>,
    pub purpose: Purpose,
    pub soft_bounces: crate::store::SoftBounceRule,
}

/// Checks every mailbox and compiles its rules. `env` looks up `password_env` variables.
pub fn compile(
    mailboxes: &[MailboxSettings],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Arc<Mailbox>>, ConfigError> {
    let mut out: Vec<Arc<Mailbox>> = Vec::new();
    for (i, m) in mailboxes.iter().enumerate() {
        let at = |field: &str| format!("mailboxes[{i}].{field}");
        let err = |field: &str, msg: String| {
            ConfigError::new(at(field), format!("(mailbox \"{}\") {msg}", m.name))
        };
        if !crate::domain::plain_name(&m.name, 48, b"-_.") {
            return Err(err(
                "name",
                "must be 1-48 characters of A-Z a-z 0-9 - _ .".into(),
            ));
        }
        if out.iter().any(|o| o.name == m.name) {
            return Err(err("name", "is used by two mailboxes".into()));
        }
        if m.host.trim().is_empty() {
            return Err(err("host", "must not be empty".into()));
        }
        if m.port == 0 {
            return Err(err("port", "must be greater than 0".into()));
        }
        if m.tls == ImapTls::None && !m.allow_plaintext && !crate::net::is_loopback_host(&m.host) {
            return Err(err(
                "tls",
                format!(
                    "\"none\" sends the password readable over the network to {}; use \"tls\" or \
                     \"starttls\", or set allow_plaintext = true to accept that",
                    m.host
                ),
            ));
        }
        for (key, v) in [
            ("poll_interval_secs", m.poll_interval_secs),
            ("idle_renew_secs", m.idle_renew_secs),
            ("down_alert_after_secs", m.down_alert_after_secs),
            ("down_repeat_interval_secs", m.down_repeat_interval_secs),
            ("reconnect_min_ms", m.reconnect_min_ms),
            ("reconnect_max_secs", m.reconnect_max_secs),
            ("connect_timeout_secs", m.connect_timeout_secs),
            ("command_timeout_secs", m.command_timeout_secs),
            ("fetch_batch", u64::from(m.fetch_batch)),
            ("max_message_bytes", u64::from(m.max_message_bytes)),
        ] {
            if v == 0 {
                return Err(err(key, "must be greater than 0".into()));
            }
        }
        if m.idle_renew_secs >= 29 * 60 {
            return Err(err(
                "idle_renew_secs",
                "must be under 1740 (servers may end an IDLE after 29 minutes)".into(),
            ));
        }
        let password = match (&m.password, &m.password_env) {
            (Some(p), None) => p.clone(),
            (None, Some(var)) => SecretString::from(env(var).ok_or_else(|| {
                err(
                    "password_env",
                    format!("environment variable {var} is not set"),
                )
            })?),
            _ => {
                return Err(err(
                    "password_env",
                    "give exactly one of password_env or password".into(),
                ));
            }
        };
        if let Some(ca) = &m.ca_file
            && !ca.is_file()
        {
            return Err(err("ca_file", format!("{} is not a file", ca.display())));
        }
        let alert_to = parse_recipients(&m.alert_to).map_err(|e| err("alert_to", e))?;
        let mut rules: Vec<Rule> = Vec::new();
        for (j, r) in m.rules.iter().enumerate() {
            let rerr = |field: &str, msg: String| {
                ConfigError::new(
                    format!("mailboxes[{i}].rules[{j}].{field}"),
                    format!("(mailbox \"{}\", rule \"{}\") {msg}", m.name, r.name),
                )
            };
            if r.name.trim().is_empty() {
                return Err(rerr("name", "must not be empty".into()));
            }
            if r.name == DOWN_RULE {
                return Err(rerr(
                    "name",
                    format!("`{DOWN_RULE}` is the watcher's own alert"),
                ));
            }
            if rules.iter().any(|o| o.name == r.name) {
                return Err(rerr("name", "is used by two rules of this mailbox".into()));
            }
            let cond = compile_condition(&r.condition(), "").map_err(|(f, e)| rerr(&f, e))?;
            let to = if r.alert_to.is_empty() {
                if alert_to.is_empty() {
                    return Err(rerr(
                        "alert_to",
                        "no recipients: set alert_to on the rule or on its mailbox".into(),
                    ));
                }
                alert_to.clone()
            } else {
                parse_recipients(&r.alert_to).map_err(|e| rerr("alert_to", e))?
            };
            let priority = severity_priority(&r.severity).map_err(|e| rerr("severity", e))?;
            let sample = serde_json::to_value(crate::render::AlertVars::sample())
                .expect("alert variables serialize");
            crate::render::check_variables(&r.template, &sample).map_err(|e| {
                rerr(
                    "template",
                    format!("`{}` cannot render an alert: {}", r.template, e.message),
                )
            })?;
            let captures = cond.capture_names();
            let mut group_by = Vec::new();
            for g in &r.group_by {
                group_by.push(match g.as_str() {
                    "rule" => continue,
                    "mailbox" => GroupBy::Mailbox,
                    "sender" => GroupBy::Sender,
                    "subject" => GroupBy::Subject,
                    c if captures.iter().any(|n| n == c) => GroupBy::Capture(c.to_string()),
                    other => {
                        return Err(rerr(
                            "group_by",
                            format!(
                                "`{other}` is not rule, mailbox, sender, subject or a named capture of this rule ({})",
                                if captures.is_empty() { "it has none".to_string() } else { captures.join(", ") }
                            ),
                        ));
                    }
                });
            }
            if (r.then == Then::Move) != r.move_to.is_some() {
                return Err(rerr(
                    "move_to",
                    "is required with then = \"move\", and only then".into(),
                ));
            }
            rules.push(Rule {
                name: r.name.clone(),
                cond,
                recipients: to,
                severity: r.severity.clone(),
                priority,
                template: r.template.clone(),
                group_by,
                group_wait: Duration::from_secs(r.group_wait_secs),
                repeat_interval: Duration::from_secs(r.repeat_interval_secs),
                then: r.then,
                move_to: r.move_to.clone(),
            });
        }
        if m.purpose == Purpose::Bounces && !m.rules.is_empty() {
            return Err(err(
                "rules",
                "a bounces mailbox has no rules: every DSN and complaint is read".into(),
            ));
        }
        if m.soft_bounce_limit == 0 || m.soft_bounce_window_hours == 0 {
            return Err(err(
                "soft_bounce_limit",
                "soft_bounce_limit and soft_bounce_window_hours must be greater than 0".into(),
            ));
        }
        if alert_to.is_empty() {
            return Err(err(
                "alert_to",
                "is required: the watcher's own down alert goes there".into(),
            ));
        }
        out.push(Arc::new(Mailbox {
            name: m.name.clone(),
            host: m.host.clone(),
            port: m.port,
            tls: m.tls,
            ca_file: m.ca_file.clone(),
            username: m.username.clone(),
            password,
            folder: m.folder.clone(),
            idle: m.idle,
            poll_interval: Duration::from_secs(m.poll_interval_secs),
            idle_renew: Duration::from_secs(m.idle_renew_secs),
            from_start: m.from_start,
            alert_to,
            down_alert_after: Duration::from_secs(m.down_alert_after_secs),
            down_repeat_interval: Duration::from_secs(m.down_repeat_interval_secs),
            reconnect_min: Duration::from_millis(m.reconnect_min_ms),
            reconnect_max: Duration::from_secs(m.reconnect_max_secs),
            connect_timeout: Duration::from_secs(m.connect_timeout_secs),
            command_timeout: Duration::from_secs(m.command_timeout_secs),
            fetch_batch: m.fetch_batch,
            max_message_bytes: m.max_message_bytes,
            rules,
            purpose: m.purpose,
            soft_bounces: crate::store::SoftBounceRule {
                limit: m.soft_bounce_limit,
                window: Duration::from_secs(m.soft_bounce_window_hours * 3600),
            },
        }));
    }
    Ok(out)
}

/// `critical` -> high, `warning` -> normal, `info` -> low.
pub fn severity_priority(s: &str) -> Result<Priority, String> {
    match s {
        "critical" => Ok(Priority::High),
        "warning" => Ok(Priority::Normal),
        "info" => Ok(Priority::Low),
        other => Err(format!(
            "`{other}` is not a severity (critical, warning, info)"
        )),
    }
}

fn parse_recipients(list: &[String]) -> Result<Vec<EmailAddress>, String> {
    list.iter()
        .map(|a| EmailAddress::parse(a).map_err(|e| format!("`{a}`: {e}")))
        .collect()
}

/// Compiles a condition block; an error is (field path inside the rule, message).
fn compile_condition(c: &Condition, path: &str) -> Result<Cond, (String, String)> {
    let key = |f: &str| {
        if path.is_empty() {
            f.to_string()
        } else {
            format!("{path}.{f}")
        }
    };
    let re = |f: &str, pattern: &str| {
        regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| (key(f), format!("not a valid regex: {e}")))
    };
    let mut tests = Vec::new();
    for (field, pattern) in [
        (Field::From, &c.from),
        (Field::To, &c.to),
        (Field::Subject, &c.subject),
        (Field::Body, &c.body),
    ] {
        if let Some(p) = pattern {
            tests.push(Cond::Field(field, re(field.as_str(), p)?));
        }
    }
    for (k, h) in c.headers.iter().enumerate() {
        let name = h.name.trim();
        if name.is_empty() || name.contains(':') || name.chars().any(char::is_whitespace) {
            return Err((
                key(&format!("headers[{k}].name")),
                format!("`{}` is not a header name", h.name),
            ));
        }
        tests.push(Cond::Header(
            name.to_ascii_lowercase(),
            re(&format!("headers[{k}].regex"), &h.regex)?,
        ));
    }
    if let Some(want) = c.has_attachment {
        tests.push(Cond::HasAttachment(want));
    }
    for (k, sub) in c.all.iter().enumerate() {
        tests.push(compile_condition(sub, &key(&format!("all[{k}]")))?);
    }
    if !c.any.is_empty() {
        let mut branches = Vec::new();
        for (k, sub) in c.any.iter().enumerate() {
            branches.push(compile_condition(sub, &key(&format!("any[{k}]")))?);
        }
        tests.push(Cond::Any(branches));
    }
    if let Some(n) = &c.not {
        tests.push(Cond::Not(Box::new(compile_condition(n, &key("not"))?)));
    }
    Ok(match c.combine {
        Combine::All => Cond::All(tests),
        Combine::Any => Cond::Any(tests),
    })
}
