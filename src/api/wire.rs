//! The API's wire types: every request and response body (and query) the OpenAPI document
//! describes, in one place. Error bodies are in `error.rs`, with the errors they carry.

use serde::{Deserialize, Serialize};

use serde_json::Value;

use crate::domain::{EmailId, EmailStatus, NewEmail};
use crate::store::{MailboxStatus, Stats};

/// One accepted email.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    pub id: EmailId,
    /// False when the email's own `idempotency_key` matched an email submitted earlier (this is
    /// that email's id; nothing new was queued).
    pub created: bool,
    /// Where to follow it: `GET` this for its status and timeline.
    pub status_url: String,
}

/// An accepted batch, in the order submitted.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BatchAccepted {
    pub count: usize,
    pub emails: Vec<Accepted>,
}

/// `POST /v1/emails/batch`: up to `api.max_batch` emails, validated and queued all or nothing.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub emails: Vec<NewEmail>,
}

/// The state an email moved to.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Transitioned {
    pub id: EmailId,
    pub status: EmailStatus,
}

pub(super) fn accepted(id: EmailId, created: bool) -> Accepted {
    Accepted {
        status_url: format!("/v1/emails/{id}"),
        id,
        created,
    }
}

/// Query parameters of `GET /v1/emails`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// queued, sending, sent, retrying, failed, cancelled or expired.
    pub status: Option<String>,
    /// Emails carrying this tag.
    pub tag: Option<String>,
    /// Emails with this envelope recipient (to, cc or bcc; case-insensitive).
    pub recipient: Option<String>,
    /// Created at or after this time (RFC 3339).
    pub created_after: Option<String>,
    /// Created before this time (RFC 3339).
    pub created_before: Option<String>,
    /// Page size, 1 to 500 (default 50).
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A template variable.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TemplateVariable {
    pub name: String,
    /// string, integer, string[], AlertMessage[] ...
    #[serde(rename = "type")]
    pub kind: String,
    pub required: bool,
}

/// A built-in template kind.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TemplateKind {
    pub name: String,
    pub description: String,
    pub variables: Vec<TemplateVariable>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TemplateList {
    pub templates: Vec<TemplateKind>,
}

/// What to preview.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    #[schema(value_type = Object)]
    pub variables: Value,
}

/// A rendered template.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Preview {
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
}

/// Queue statistics plus this process's worker state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatsResponse {
    #[serde(flatten)]
    pub stats: Stats,
    /// Workers are delivering in this process.
    pub workers_running: bool,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
}

/// Readiness and what it found.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `not ready`.
    pub status: String,
    /// `ok`, or the error (only for a caller with a token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// `running`, `stopped`, or `not run here` (an API-only process; only for a caller with a
    /// token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<String>,
}

/// The IMAP watchers' mailboxes.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MailboxesResponse {
    pub mailboxes: Vec<MailboxStatus>,
}
