//! The email a caller submits ([`NewEmail`]) and the validated form the queue stores ([`Email`]).
//!
//! ~530 lines of code (the rest is its tests): `Email::parse` checks every field of a
//! `NewEmail` in one pass so that all broken rules are reported together.

use std::collections::BTreeMap;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use super::{EmailAddress, FieldError, Limits, Priority, Senders, ValidationErrors, bounded};

/// Hard caps while reading a submission, far above any sensible `[limits]` (which are checked
/// after): each of to / cc / bcc,
pub const MAX_LIST: usize = 1_000;
/// ... reply_to,
pub const MAX_REPLY_TO: usize = 100;
/// ... and tags, headers, metadata entries, attachments.
pub const MAX_SMALL: usize = 100;
/// Field errors reported for one email; the rest are counted in one more.
pub const MAX_FIELD_ERRORS: usize = 20;

/// Is there a control character other than tab, CR, LF or form feed (text bodies)?
fn has_binary(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\r' | '\n' | '\u{c}'))
}

/// Is there a control character other than tab (single-line fields)?
fn has_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control() && c != '\t')
}

/// The first string in `v` (keys included) holding a control character other than tab, CR,
/// LF or form feed; its path.
fn binary_in(v: &Value, path: &str) -> Option<String> {
    match v {
        Value::String(s) => has_binary(s).then(|| path.to_string()),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| binary_in(x, &format!("{path}[{i}]"))),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            let at = format!("{path}.{k}");
            if has_binary(k) {
                Some(at)
            } else {
                binary_in(x, &at)
            }
        }),
        _ => None,
    }
}

/// An attachment as submitted; in JSON the content is base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAttachment {
    pub filename: String,
    pub content_type: String,
    /// The bytes, base64 (standard alphabet).
    #[serde(with = "b64")]
    #[schema(value_type = String, format = Byte)]
    pub content: Vec<u8>,
}

/// A validated attachment.
pub type Attachment = NewAttachment;

/// What a caller submits. Either `text`/`html` (with `subject`) or `template` + `variables`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEmail {
    /// Defaults to the configured `delivery.default_from`.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default, deserialize_with = "bounded::list::<_, _, MAX_REPLY_TO>")]
    pub reply_to: Vec<String>,
    #[serde(default, deserialize_with = "bounded::list::<_, _, MAX_LIST>")]
    pub to: Vec<String>,
    #[serde(default, deserialize_with = "bounded::list::<_, _, MAX_LIST>")]
    pub cc: Vec<String>,
    #[serde(default, deserialize_with = "bounded::list::<_, _, MAX_LIST>")]
    pub bcc: Vec<String>,
    /// Required for raw content; a template renders its own subject.
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub html: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    /// The template's variables (see `GET /v1/templates`).
    #[serde(default, deserialize_with = "bounded::variables")]
    #[schema(value_type = Option<Object>)]
    pub variables: Option<Value>,
    /// Only List-Unsubscribe, List-Unsubscribe-Post, In-Reply-To, References and X-* headers.
    #[serde(default, deserialize_with = "bounded::map::<_, MAX_SMALL>")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "bounded::list::<_, _, MAX_SMALL>")]
    pub tags: Vec<String>,
    #[serde(default, deserialize_with = "bounded::map::<_, MAX_SMALL>")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "bounded::list::<_, _, MAX_SMALL>")]
    pub attachments: Vec<NewAttachment>,
    /// Not before this time (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub send_at: Option<OffsetDateTime>,
    /// Give up if not delivered by this time (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub priority: Priority,
    /// A key unique per email: submitting it again returns the first email's id.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Send even to addresses on the suppression list (mail that must go, such as a password
    /// reset the user just asked for); recorded on the timeline when it matters.
    #[serde(default)]
    pub ignore_suppression: bool,
    /// Add RFC 8058 one-click unsubscribe headers (`List-Unsubscribe` with a signed link under
    /// `api.public_url`, `List-Unsubscribe-Post`): a POST to the link suppresses the
    /// recipient. Needs `api.public_url` and exactly one recipient.
    #[serde(default)]
    pub one_click_unsubscribe: bool,
    /// Send through this relay only (a `[[relays]]` name), whatever the routes say.
    #[serde(default)]
    pub relay: Option<String>,
}

impl NewEmail {
    /// A plain-text email: the shortest useful submission.
    pub fn text(to: &str, subject: &str, body: &str) -> Self {
        Self {
            to: vec![to.to_string()],
            subject: Some(subject.to_string()),
            text: Some(body.to_string()),
            ..Default::default()
        }
    }

    /// An email rendered from a built-in template.
    pub fn template(to: &str, template: &str, variables: Value) -> Self {
        Self {
            to: vec![to.to_string()],
            template: Some(template.to_string()),
            variables: Some(variables),
            ..Default::default()
        }
    }
}

/// The body: given verbatim, or rendered by the worker from a template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Content {
    Raw {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        html: Option<String>,
    },
    Template {
        name: String,
        variables: Value,
    },
}

impl Content {
    pub fn template_name(&self) -> Option<&str> {
        match self {
            Content::Template { name, .. } => Some(name),
            Content::Raw { .. } => None,
        }
    }
}

/// A validated email, as stored (JSON) and rendered by the worker. Built only by [`Email::parse`].
///
/// Empty lists, absent values and false flags are left out of the stored JSON (and read back
/// as such): a plain email's JSON is half as long, and every submit writes it and every claim
/// reads it. Rows written before keep every field and read the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Email {
    pub from: EmailAddress,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reply_to: Vec<EmailAddress>,
    pub to: Vec<EmailAddress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cc: Vec<EmailAddress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bcc: Vec<EmailAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub content: Content,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub send_at: Option<OffsetDateTime>,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_suppression: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_click_unsubscribe: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
}

/// Checks a template name and its variables (implemented by `render`).
pub trait TemplateCheck {
    fn check(&self, name: &str, variables: &Value) -> Result<(), FieldError>;
}

const NEWEMAIL_HEADER_ALLOW: [&str; 4] = [
    "list-unsubscribe",
    "list-unsubscribe-post",
    "in-reply-to",
    "references",
];

fn has_crlf(s: &str) -> bool {
    s.contains('\r') || s.contains('\n')
}

impl Email {
    /// Validates a submission. Collects every broken rule, not just the first.
    pub fn parse(
        new: NewEmail,
        limits: &Limits,
        senders: &Senders,
        templates: &dyn TemplateCheck,
    ) -> Result<Email, ValidationErrors> {
        let mut errs = Vec::new();
        let addr_list = |field: &str, list: &[String], errs: &mut Vec<FieldError>| {
            list.iter()
                .enumerate()
                .filter_map(|(i, s)| match EmailAddress::parse(s) {
                    Ok(a) => Some(a),
                    Err(m) => {
                        errs.push(FieldError::new(format!("{field}[{i}]"), m));
                        None
                    }
                })
                .collect::<Vec<_>>()
        };
        let from = match new.from.as_deref() {
            None => Some(senders.default_from().clone()),
            Some(s) => match EmailAddress::parse(s) {
                Ok(a) if senders.allows(&a) => Some(a),
                Ok(a) => {
                    errs.push(FieldError::new(
                        "from",
                        format!(
                            "{} is not an allowed sender (delivery.allowed_from)",
                            a.address()
                        ),
                    ));
                    None
                }
                Err(m) => {
                    errs.push(FieldError::new("from", m));
                    None
                }
            },
        };
        let reply_to = addr_list("reply_to", &new.reply_to, &mut errs);
        let to = addr_list("to", &new.to, &mut errs);
        let cc = addr_list("cc", &new.cc, &mut errs);
        let bcc = addr_list("bcc", &new.bcc, &mut errs);
        let n_rcpt = new.to.len() + new.cc.len() + new.bcc.len();
        if n_rcpt == 0 {
            errs.push(FieldError::new("to", "at least one recipient is required"));
        } else if n_rcpt > limits.max_recipients {
            errs.push(FieldError::new(
                "to",
                format!(
                    "{n_rcpt} recipients (to + cc + bcc) exceed the limit of {}",
                    limits.max_recipients
                ),
            ));
        }

        if let Some(s) = &new.subject {
            if has_crlf(s) {
                errs.push(FieldError::new("subject", "must not contain CR or LF"));
            } else if has_control(s) {
                errs.push(FieldError::new(
                    "subject",
                    "must not contain control characters (NUL, ESC, ...)",
                ));
            }
            if s.chars().count() > limits.max_subject_chars {
                errs.push(FieldError::new(
                    "subject",
                    format!("is longer than {} characters", limits.max_subject_chars),
                ));
            }
        }

        let content = match (&new.template, &new.text, &new.html) {
            (Some(name), None, None) => {
                let variables = new
                    .variables
                    .clone()
                    .unwrap_or(Value::Object(Default::default()));
                let size = serde_json::to_vec(&variables).map_or(usize::MAX, |v| v.len());
                if size > limits.max_variables_bytes {
                    errs.push(FieldError::new(
                        "variables",
                        format!(
                            "are {size} bytes as JSON; at most {} (limits.max_variables_bytes)",
                            limits.max_variables_bytes
                        ),
                    ));
                } else if let Some(at) = binary_in(&variables, "variables") {
                    errs.push(FieldError::new(
                        at,
                        "must not contain control characters (NUL, ESC, ...)",
                    ));
                } else if let Err(e) = templates.check(name, &variables) {
                    errs.push(e);
                }
                Some(Content::Template {
                    name: name.clone(),
                    variables,
                })
            }
            (Some(_), _, _) => {
                errs.push(FieldError::new(
                    "template",
                    "give either a template or text/html, not both",
                ));
                None
            }
            (None, None, None) => {
                errs.push(FieldError::new(
                    "text",
                    "give text and/or html, or a template",
                ));
                None
            }
            (None, text, html) => {
                if new.variables.is_some() {
                    errs.push(FieldError::new(
                        "variables",
                        "variables are only used with a template",
                    ));
                }
                if new.subject.as_deref().is_none_or(|s| s.trim().is_empty()) {
                    errs.push(FieldError::new(
                        "subject",
                        "is required when the content is text/html",
                    ));
                }
                for (field, body) in [("text", text), ("html", html)] {
                    if body
                        .as_ref()
                        .is_some_and(|b| b.len() > limits.max_body_bytes)
                    {
                        errs.push(FieldError::new(
                            field,
                            format!("is larger than {} bytes", limits.max_body_bytes),
                        ));
                    } else if body.as_deref().is_some_and(has_binary) {
                        errs.push(FieldError::new(
                            field,
                            "must not contain control characters other than tab, CR, LF and \
                             form feed (NUL, ESC, ...)",
                        ));
                    }
                }
                Some(Content::Raw {
                    text: text.clone(),
                    html: html.clone(),
                })
            }
        };

        let mut headers = Vec::new();
        for (name, value) in &new.headers {
            let field = format!("headers.{name}");
            let lower = name.to_ascii_lowercase();
            let token_ok = !name.is_empty()
                && name.len() <= 76
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !token_ok {
                errs.push(FieldError::new(field, "is not a valid header name"));
            } else if !(lower.starts_with("x-") || NEWEMAIL_HEADER_ALLOW.contains(&lower.as_str()))
            {
                errs.push(FieldError::new(
                    field,
                    "is not an allowed header (List-Unsubscribe, List-Unsubscribe-Post, \
                     In-Reply-To, References, X-*)",
                ));
            } else if has_control(value) {
                errs.push(FieldError::new(
                    field,
                    "must not contain control characters (CR, LF, NUL, ...)",
                ));
            } else if value.len() > 998 {
                errs.push(FieldError::new(field, "is longer than 998 bytes"));
            } else {
                headers.push((name.clone(), value.clone()));
            }
        }

        if new.tags.len() > limits.max_tags {
            errs.push(FieldError::new(
                "tags",
                format!("more than {} tags", limits.max_tags),
            ));
        }
        for (i, t) in new.tags.iter().enumerate() {
            if !super::plain_name(t, 64, b"-_.:") {
                errs.push(FieldError::new(
                    format!("tags[{i}]"),
                    "must be 1-64 characters of A-Z a-z 0-9 - _ . :",
                ));
            }
        }
        if new.metadata.len() > limits.max_metadata_entries {
            errs.push(FieldError::new(
                "metadata",
                format!("more than {} entries", limits.max_metadata_entries),
            ));
        }
        for (k, v) in &new.metadata {
            if k.is_empty() || k.len() > 64 || v.len() > 1024 || has_control(k) || has_control(v) {
                errs.push(FieldError::new(
                    format!(
                        "metadata.{}",
                        k.chars()
                            .filter(|c| !c.is_control())
                            .take(64)
                            .collect::<String>()
                    ),
                    "keys must be 1-64 bytes and values at most 1024 bytes, without control \
                     characters",
                ));
            }
        }

        let mut total = 0usize;
        for (i, a) in new.attachments.iter().enumerate() {
            total += a.content.len();
            if a.filename.trim().is_empty() || has_control(&a.filename) || a.filename.len() > 255 {
                errs.push(FieldError::new(
                    format!("attachments[{i}].filename"),
                    "must be 1-255 bytes without control characters",
                ));
            }
            if a.content_type
                .parse::<lettre::message::header::ContentType>()
                .is_err()
            {
                errs.push(FieldError::new(
                    format!("attachments[{i}].content_type"),
                    format!("`{}` is not a MIME type", a.content_type),
                ));
            }
            if a.content.len() > limits.max_attachment_bytes {
                errs.push(FieldError::new(
                    format!("attachments[{i}].content"),
                    format!("is larger than {} bytes", limits.max_attachment_bytes),
                ));
            }
        }
        if total > limits.max_attachments_total_bytes {
            errs.push(FieldError::new(
                "attachments",
                format!(
                    "together are larger than {} bytes",
                    limits.max_attachments_total_bytes
                ),
            ));
        }

        if let (Some(s), Some(e)) = (new.send_at, new.expires_at)
            && e <= s
        {
            errs.push(FieldError::new("expires_at", "must be after send_at"));
        }
        if let Some(k) = &new.idempotency_key
            && (k.is_empty() || k.len() > 255 || has_control(k))
        {
            errs.push(FieldError::new(
                "idempotency_key",
                "must be 1-255 characters without control characters",
            ));
        }

        if let Some(r) = &new.relay
            && !super::plain_name(r, 64, b"-_.")
        {
            errs.push(FieldError::new(
                "relay",
                "must be a relay's name (1-64 characters of A-Z a-z 0-9 - _ .)",
            ));
        }

        if !errs.is_empty() {
            if errs.len() > MAX_FIELD_ERRORS {
                let more = errs.len() - MAX_FIELD_ERRORS;
                errs.truncate(MAX_FIELD_ERRORS);
                errs.push(FieldError::new(
                    "(more)",
                    format!("{more} more problems with this email are not listed"),
                ));
            }
            return Err(ValidationErrors(errs));
        }
        Ok(Email {
            from: from.expect("no error means from parsed"),
            reply_to,
            to,
            cc,
            bcc,
            subject: new.subject,
            content: content.expect("no error means content is set"),
            headers,
            tags: new.tags,
            metadata: new.metadata,
            attachments: new.attachments,
            send_at: new.send_at,
            expires_at: new.expires_at,
            priority: new.priority,
            idempotency_key: new.idempotency_key,
            ignore_suppression: new.ignore_suppression,
            one_click_unsubscribe: new.one_click_unsubscribe,
            relay: new.relay,
        })
    }

    /// Every envelope recipient (to, cc and bcc).
    pub fn recipients(&self) -> impl Iterator<Item = &EmailAddress> {
        self.to.iter().chain(&self.cc).chain(&self.bcc)
    }
}

mod b64 {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(|_| serde::de::Error::custom("content must be base64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct AnyTemplate;
    impl TemplateCheck for AnyTemplate {
        fn check(&self, name: &str, _: &Value) -> Result<(), FieldError> {
            if name == "welcome" {
                Ok(())
            } else {
                Err(FieldError::new("template", "unknown"))
            }
        }
    }

    fn senders(allowed: &[&str]) -> Senders {
        let from = EmailAddress::parse("app@example.com").unwrap();
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        Senders::new(from, &allowed).unwrap()
    }

    fn parse(n: NewEmail) -> Result<Email, ValidationErrors> {
        Email::parse(n, &Limits::default(), &senders(&[]), &AnyTemplate)
    }

    #[test]
    fn allowed_from_limits_senders_to_domains_and_addresses() {
        let s = senders(&["example.com", "@Bücher.example", "ops@other.example"]);
        let check = |from: &str| {
            let mut n = base();
            n.from = Some(from.into());
            Email::parse(n, &Limits::default(), &s, &AnyTemplate).map(|_| ())
        };
        for ok in [
            "a@example.com",
            "Zoë <zoe@bücher.example>",
            "OPS@other.example",
        ] {
            assert!(check(ok).is_ok(), "{ok}");
        }
        for bad in [
            "a@sub.example.com",
            "a@other.example",
            "a@example.com.evil.example",
        ] {
            let e = check(bad).unwrap_err();
            assert!(
                e.has_field("from") && e.0[0].message.contains("allowed_from"),
                "{bad}: {e}"
            );
        }
        // No `from`: the default, which must itself be allowed.
        assert!(Email::parse(base(), &Limits::default(), &s, &AnyTemplate).is_ok());
        let from = EmailAddress::parse("app@example.com").unwrap();
        assert!(Senders::new(from.clone(), &["other.example".into()]).is_err());
        assert_eq!(Senders::new(from, &["x".into()]).unwrap_err().0, 0);
    }

    fn base() -> NewEmail {
        NewEmail::text("a@example.com", "Hi", "Hello")
    }

    /// The stored JSON leaves out what is empty, absent or false, and reads back the same; the
    /// JSON rows written before (every field present) read the same email.
    #[test]
    fn the_stored_json_leaves_out_empty_fields_and_old_rows_still_read() {
        let e = parse(base()).unwrap();
        let stored = serde_json::to_string(&e).unwrap();
        assert_eq!(
            stored,
            r#"{"from":"app@example.com","to":["a@example.com"],"subject":"Hi","content":{"kind":"raw","text":"Hello"},"priority":"normal"}"#
        );
        assert_eq!(serde_json::from_str::<Email>(&stored).unwrap(), e);
        let old = r#"{"from":"app@example.com","reply_to":[],"to":["a@example.com"],"cc":[],"bcc":[],"subject":"Hi","content":{"kind":"raw","text":"Hello","html":null},"headers":[],"tags":[],"metadata":{},"attachments":[],"send_at":null,"expires_at":null,"priority":"normal","idempotency_key":null,"ignore_suppression":false,"one_click_unsubscribe":false}"#;
        assert_eq!(serde_json::from_str::<Email>(old).unwrap(), e);
        // Whatever is set is kept.
        let mut n = base();
        n.cc = vec!["c@example.com".into()];
        n.tags = vec!["t".into()];
        n.send_at = Some(OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap());
        n.ignore_suppression = true;
        let full = parse(n).unwrap();
        let stored = serde_json::to_string(&full).unwrap();
        for field in ["cc", "tags", "send_at", "ignore_suppression"] {
            assert!(
                stored.contains(&format!("\"{field}\":")),
                "{field}: {stored}"
            );
        }
        assert_eq!(serde_json::from_str::<Email>(&stored).unwrap(), full);
    }

    #[test]
    fn a_plain_text_email_is_valid_and_gets_the_default_from() {
        let e = parse(base()).unwrap();
        assert_eq!(e.from.address(), "app@example.com");
    }

    /// Each rule: (what to change, the field the error must name).
    #[test]
    fn each_rule_names_its_field() {
        type Case = (&'static str, fn(&mut NewEmail));
        let cases: Vec<Case> = vec![
            ("to", |n| n.to.clear()),
            ("to[0]", |n| n.to = vec!["nope".into()]),
            ("cc[0]", |n| n.cc = vec!["x@".into()]),
            ("bcc[0]", |n| n.bcc = vec!["@x.com".into()]),
            ("from", |n| n.from = Some("bad".into())),
            ("reply_to[0]", |n| n.reply_to = vec!["bad".into()]),
            ("subject", |n| {
                n.subject = Some("Hi\r\nBcc: evil@x.com".into())
            }),
            ("subject", |n| n.subject = None),
            ("subject", |n| n.subject = Some("x".repeat(1000))),
            ("text", |n| n.text = None),
            ("text", |n| n.text = Some("x".repeat(3 * 1024 * 1024))),
            ("template", |n| n.template = Some("welcome".into())),
            ("variables", |n| n.variables = Some(json!({}))),
            ("headers.Bcc", |n| {
                n.headers.insert("Bcc".into(), "x@y.com".into());
            }),
            ("headers.X-Campaign", |n| {
                n.headers.insert("X-Campaign".into(), "a\r\nb".into());
            }),
            ("headers.X Bad", |n| {
                n.headers.insert("X Bad".into(), "v".into());
            }),
            ("tags[0]", |n| n.tags = vec!["has space".into()]),
            ("attachments[0].filename", |n| {
                n.attachments = vec![NewAttachment {
                    filename: "".into(),
                    content_type: "text/plain".into(),
                    content: vec![1],
                }]
            }),
            ("attachments[0].content_type", |n| {
                n.attachments = vec![NewAttachment {
                    filename: "a.txt".into(),
                    content_type: "not a type".into(),
                    content: vec![1],
                }]
            }),
            ("attachments[0].content", |n| {
                n.attachments = vec![NewAttachment {
                    filename: "a.bin".into(),
                    content_type: "application/octet-stream".into(),
                    content: vec![0; 11 * 1024 * 1024],
                }]
            }),
            ("expires_at", |n| {
                n.send_at = Some(OffsetDateTime::now_utc());
                n.expires_at = Some(OffsetDateTime::now_utc() - time::Duration::hours(1));
            }),
            ("idempotency_key", |n| {
                n.idempotency_key = Some(String::new())
            }),
        ];
        for (field, mutate) in cases {
            let mut n = base();
            mutate(&mut n);
            let err = parse(n).expect_err(field);
            assert!(
                err.has_field(field),
                "expected an error on {field}, got {err}"
            );
        }
    }

    #[test]
    fn recipient_cap_counts_to_cc_and_bcc() {
        let mut n = base();
        n.to = (0..30).map(|i| format!("t{i}@example.com")).collect();
        n.bcc = (0..21).map(|i| format!("b{i}@example.com")).collect();
        let err = parse(n).unwrap_err();
        assert!(err.0[0].message.contains("51 recipients"), "{err}");
    }

    #[test]
    fn every_broken_rule_is_reported_at_once() {
        let mut n = base();
        n.to = vec!["bad".into()];
        n.subject = Some("a\nb".into());
        let err = parse(n).unwrap_err();
        assert!(err.has_field("to[0]") && err.has_field("subject"), "{err}");
    }

    #[test]
    fn unknown_template_is_rejected_by_the_checker() {
        let n = NewEmail::template("a@example.com", "nope", json!({}));
        assert!(parse(n).unwrap_err().has_field("template"));
    }

    #[test]
    fn allowed_headers_pass() {
        let mut n = base();
        n.headers
            .insert("List-Unsubscribe".into(), "<https://x.example/u>".into());
        n.headers.insert("X-Campaign".into(), "spring".into());
        assert_eq!(parse(n).unwrap().headers.len(), 2);
    }
}
