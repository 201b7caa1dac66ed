//! Pure domain types: the only way into them is a constructor that validates.
//!
//! Nothing here does IO. A [`NewEmail`] is what a caller hands in (plain strings, serde-friendly);
//! [`Email::parse`] turns it into an [`Email`] whose fields carry the guarantees the rest of the
//! crate relies on (addresses parse, no CR/LF in a header, sizes within limits, template variables
//! type-check). Every rule that fails is reported with the name of the field.

pub(crate) mod address;
pub mod bounded;
mod email;
mod ids;
pub mod lifecycle;
mod limits;
pub mod unsubscribe;

pub use address::EmailAddress;
pub use email::{
    Attachment, Content, Email, MAX_FIELD_ERRORS, MAX_LIST, MAX_REPLY_TO, MAX_SMALL, NewAttachment,
    NewEmail, TemplateCheck,
};
pub use ids::{EmailId, EmailStatus, Priority};
pub use lifecycle::EventType;
pub use limits::{Limits, Senders};

use serde::Serialize;

/// A plain name: 1 to `max` bytes of ASCII letters, digits and the bytes in `punct` (names of
/// relays, mailboxes, webhooks; tags; request ids).
pub fn plain_name(s: &str, max: usize, punct: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || punct.contains(&b))
}

/// One broken rule: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `to[2]`, `content.variables.name`.
    pub field: String,
    /// Human-readable description of the problem.
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Every rule an email broke (never empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("invalid email: {}", .0.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; "))]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    /// The first error's field, handy in tests and messages.
    pub fn first_field(&self) -> &str {
        self.0.first().map(|e| e.field.as_str()).unwrap_or("")
    }

    pub fn has_field(&self, field: &str) -> bool {
        self.0.iter().any(|e| e.field == field)
    }
}
