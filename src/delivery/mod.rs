//! Delivery: MIME building (lettre), the transports (SMTP, pooled; file, for development), and
//! the one place where an SMTP reply becomes an [`Outcome`].

mod dkim;
mod policy;
mod pool;
mod relays;
mod settings;
pub mod throttle;

use std::path::PathBuf;
use std::sync::Arc;

use lettre::Message;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment as MimeAttachment, MultiPart, SinglePart};

pub use dkim::{DkimError, DkimSigner};
pub use policy::{Decision, RetryPolicy};
pub use pool::Sent;
pub use relays::{Pick, RelayView, Relays};
pub use settings::{
    DeliverySettings, DkimAlgorithm, DkimSettings, DomainLimit, RelaySetup, RouteSettings,
    SmtpSettings, ThrottleSettings, TlsMode, Transport, rate_of,
};
pub use throttle::{LimitView, Limiter, Turn};

use crate::domain::Email;
use crate::render::Rendered;

/// How an attempt ended, decided only by [`classify`] (and the file transport).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx: the server took responsibility for the message.
    Sent { code: u16, text: String },
    /// 4xx, timeout, network or TLS trouble: worth another try later.
    Temporary { code: Option<u16>, text: String },
    /// 5xx, or a message the client itself refuses to send: retrying cannot help.
    Permanent { code: Option<u16>, text: String },
}

impl Outcome {
    pub fn code(&self) -> Option<u16> {
        match self {
            Outcome::Sent { code, .. } => Some(*code),
            Outcome::Temporary { code, .. } | Outcome::Permanent { code, .. } => *code,
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Outcome::Sent { text, .. }
            | Outcome::Temporary { text, .. }
            | Outcome::Permanent { text, .. } => text,
        }
    }
}

fn code_u16(c: lettre::transport::smtp::response::Code) -> Option<u16> {
    c.to_string().parse().ok()
}

/// The one place an SMTP result is classified.
pub fn classify(
    result: Result<lettre::transport::smtp::response::Response, lettre::transport::smtp::Error>,
) -> Outcome {
    match result {
        Ok(resp) => Outcome::Sent {
            code: code_u16(resp.code()).unwrap_or(250),
            text: resp.message().collect::<Vec<_>>().join(" "),
        },
        Err(e) => {
            let code = e.status().and_then(code_u16);
            let text = e.to_string();
            if e.is_permanent() || e.is_client() {
                Outcome::Permanent { code, text }
            } else {
                // Transient replies, timeouts, refused connections, TLS and protocol errors.
                Outcome::Temporary { code, text }
            }
        }
    }
}

/// Why a message could not be built (a permanent failure of that email).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the message: {0}")]
pub struct BuildError(String);

/// Builds the MIME message: multipart/alternative text + HTML, attachments in multipart/mixed,
/// the email's stable Message-ID.
pub fn build_message(
    email: &Email,
    rendered: &Rendered,
    message_id: &str,
) -> Result<Message, BuildError> {
    let mut b = Message::builder();
    b = headers(b, email, rendered, message_id)?;
    body(b, email, rendered)
}

/// How one email goes out: its id (the `X-Postbox-Id` header, which bounces carry back), the
/// recipients left out of the envelope (lowercased: suppressed; the headers still name
/// them) and the envelope sender (a VERP return path; None: the From address).
#[derive(Debug, Clone, Default)]
pub struct Outgoing<'a> {
    pub id: &'a str,
    pub except: &'a [String],
    pub return_path: Option<String>,
    /// RFC 8058: `List-Unsubscribe: <this>` and `List-Unsubscribe-Post`.
    pub unsubscribe_url: Option<String>,
}

/// [`build_message`] for one email postbox sends: see [`Outgoing`].
pub fn build_message_for(
    email: &Email,
    rendered: &Rendered,
    message_id: &str,
    out: &Outgoing,
) -> Result<Message, BuildError> {
    let mut b = Message::builder();
    if !out.except.is_empty() || out.return_path.is_some() {
        let addr = |a: &str| {
            a.parse::<lettre::Address>()
                .map_err(|e| BuildError(format!("address {a}: {e}")))
        };
        let to = email
            .recipients()
            .filter(|a| !out.except.contains(&a.address().to_lowercase()))
            .map(|a| addr(a.address()))
            .collect::<Result<Vec<_>, _>>()?;
        let from = match &out.return_path {
            Some(rp) => addr(rp)?,
            None => addr(email.from.address())?,
        };
        let envelope = lettre::address::Envelope::new(Some(from), to)
            .map_err(|e| BuildError(format!("envelope: {e}")))?;
        b = b.envelope(envelope);
    }
    if !out.id.is_empty() {
        b = b.raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("X-Postbox-Id"),
            out.id.to_string(),
        ));
    }
    if let Some(url) = &out.unsubscribe_url {
        b = b
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe"),
                format!("<{url}>"),
            ))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
                "List-Unsubscribe=One-Click".to_string(),
            ));
    }
    b = headers(b, email, rendered, message_id)?;
    body(b, email, rendered)
}

fn headers(
    b: lettre::message::MessageBuilder,
    email: &Email,
    rendered: &Rendered,
    message_id: &str,
) -> Result<lettre::message::MessageBuilder, BuildError> {
    let mut b = b
        .from(email.from.to_mailbox())
        .subject(rendered.subject.clone())
        .message_id(Some(message_id.to_string()))
        .date_now();
    for a in &email.reply_to {
        b = b.reply_to(a.to_mailbox());
    }
    for a in &email.to {
        b = b.to(a.to_mailbox());
    }
    for a in &email.cc {
        b = b.cc(a.to_mailbox());
    }
    for a in &email.bcc {
        b = b.bcc(a.to_mailbox());
    }
    for (name, value) in &email.headers {
        let name = HeaderName::new_from_ascii(name.clone())
            .map_err(|e| BuildError(format!("header {name}: {e}")))?;
        b = b.raw_header(HeaderValue::new(name, value.clone()));
    }
    Ok(b)
}

fn body(
    b: lettre::message::MessageBuilder,
    email: &Email,
    rendered: &Rendered,
) -> Result<Message, BuildError> {
    let body = match (&rendered.text, &rendered.html) {
        (Some(t), Some(h)) => MultiPart::alternative_plain_html(t.clone(), h.clone()),
        (Some(t), None) => MultiPart::mixed().singlepart(SinglePart::plain(t.clone())),
        (None, Some(h)) => MultiPart::mixed().singlepart(SinglePart::html(h.clone())),
        (None, None) => MultiPart::mixed().singlepart(SinglePart::plain(String::new())),
    };
    let result = if email.attachments.is_empty() {
        match (&rendered.text, &rendered.html) {
            (Some(_), Some(_)) => b.multipart(body),
            (None, Some(h)) => b.singlepart(SinglePart::html(h.clone())),
            (Some(t), None) => b.singlepart(SinglePart::plain(t.clone())),
            (None, None) => b.singlepart(SinglePart::plain(String::new())),
        }
    } else {
        let mut mixed = MultiPart::mixed().multipart(body);
        for a in &email.attachments {
            let ct = ContentType::parse(&a.content_type)
                .map_err(|e| BuildError(format!("content type {}: {e}", a.content_type)))?;
            mixed = mixed
                .singlepart(MimeAttachment::new(a.filename.clone()).body(a.content.clone(), ct));
        }
        b.multipart(mixed)
    };
    result.map_err(|e| BuildError(e.to_string()))
}

/// The Message-ID for a new email: `<id@sender-domain>`.
pub fn message_id_for(id: &str, email: &Email) -> String {
    let domain = email
        .from
        .address()
        .rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or("postbox.invalid");
    format!("<{id}@{domain}>")
}

#[derive(Debug, thiserror::Error)]
#[error("smtp settings: {0}")]
pub struct MailerError(String);

/// Where messages go.
#[derive(Clone)]
pub enum Mailer {
    /// The relays (`[smtp]` or `[[relays]]`), each over our pool (plaintext, STARTTLS or
    /// implicit TLS; see `pool.rs`).
    Smtp(Arc<Relays>),
    /// One `<email id>.eml` per email in this folder (development default).
    File(PathBuf),
    /// Every message kept in memory, in the order sent.
    Memory(Arc<std::sync::Mutex<Vec<SentMessage>>>),
}

/// A message the [`Mailer::Memory`] transport kept.
#[derive(Debug, Clone)]
pub struct SentMessage {
    pub email_id: String,
    /// The envelope: sender and every recipient (to, cc and bcc).
    pub from: String,
    pub to: Vec<String>,
    /// The whole MIME message, as it would go over SMTP.
    pub message: Vec<u8>,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mailer::Smtp(r) => write!(f, "Mailer::Smtp({r:?})"),
            Mailer::File(p) => write!(f, "Mailer::File({})", p.display()),
            Mailer::Memory(m) => write!(
                f,
                "Mailer::Memory({} sent)",
                m.lock().unwrap_or_else(|p| p.into_inner()).len()
            ),
        }
    }
}

impl Mailer {
    pub fn from_settings(
        delivery: &DeliverySettings,
        relays: &RelaySetup,
    ) -> Result<Mailer, MailerError> {
        match delivery.transport {
            Transport::File => Ok(Mailer::File(delivery.outbox_dir.clone())),
            Transport::Memory => Ok(Mailer::Memory(Default::default())),
            Transport::Smtp => Ok(Mailer::Smtp(Arc::new(Relays::new(relays)?))),
        }
    }

    /// The relays, when mail goes over SMTP.
    pub fn relays(&self) -> Option<&Arc<Relays>> {
        match self {
            Mailer::Smtp(r) => Some(r),
            _ => None,
        }
    }

    /// The messages the memory transport kept (none for other transports).
    pub fn sent_in_memory(&self) -> Vec<SentMessage> {
        match self {
            Mailer::Memory(m) => m.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            _ => Vec::new(),
        }
    }

    /// Sends one message (over SMTP: through relay `relay`, or the first relay); never
    /// panics, never hangs past the deadline.
    pub async fn send(&self, message: &Message, email_id: &str, relay: Option<usize>) -> Sent {
        let outcome = match self {
            Mailer::Smtp(relays) => return relays.send(relay.unwrap_or(0), message).await,
            Mailer::Memory(sent) => {
                let envelope = message.envelope();
                sent.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(SentMessage {
                        email_id: email_id.to_string(),
                        from: envelope.from().map(|a| a.to_string()).unwrap_or_default(),
                        to: envelope.to().iter().map(|a| a.to_string()).collect(),
                        message: message.formatted(),
                    });
                Outcome::Sent {
                    code: 250,
                    text: "kept in memory".into(),
                }
            }
            Mailer::File(dir) => {
                let path = dir.join(format!("{email_id}.eml"));
                let tmp = dir.join(format!(".{email_id}.eml.tmp"));
                let bytes = message.formatted();
                let res = async {
                    tokio::fs::create_dir_all(dir).await?;
                    tokio::fs::write(&tmp, &bytes).await?;
                    tokio::fs::rename(&tmp, &path).await
                }
                .await;
                match res {
                    Ok(()) => Outcome::Sent {
                        code: 250,
                        text: format!("written to {}", path.display()),
                    },
                    Err(e) => Outcome::Temporary {
                        code: None,
                        text: format!("cannot write {}: {e}", path.display()),
                    },
                }
            }
        };
        Sent {
            outcome,
            reached: true,
        }
    }
}
