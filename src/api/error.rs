//! `ApiError`: every failure the API answers with, as one JSON shape:
//! `{"error": {"code", "message", "field"?, "details"?}, "request_id"}`.
//!
//! Client mistakes are 4xx and name the problem. A 500 is opaque to the client and logged once
//! here, with the request id (the request's span carries it).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::json;

use crate::SubmitError;
use crate::domain::FieldError;
use crate::store::{Fault, StoreError, TransitionError};

tokio::task_local! {
    /// The current request's id, set by the request-id middleware for the whole request.
    pub(crate) static REQUEST_ID: String;
}

/// The current request's id (empty outside a request).
pub(crate) fn current_request_id() -> String {
    REQUEST_ID.try_with(|r| r.clone()).unwrap_or_default()
}

/// One problem in a list (`error.details`): a field and, in a batch, the email's index.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub field: String,
    pub message: String,
}

/// The error object of every non-2xx response.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable: `invalid_email`, `malformed_json`, `unauthorized`, ...
    pub code: String,
    pub message: String,
    /// The field at fault, when there is one (`to[0]`, `emails[3].subject`, `Idempotency-Key`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<ErrorDetail>,
}

/// `{"error": {...}, "request_id": "..."}`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorBody,
    pub request_id: String,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: Box<ErrorBody>,
    pub retry_after: Option<u64>,
    /// For 500s: what went wrong, for the log only.
    internal: Option<Box<str>>,
    www_authenticate: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Box::new(ErrorBody {
                code: code.to_string(),
                message: message.into(),
                field: None,
                details: Vec::new(),
            }),
            retry_after: None,
            internal: None,
            www_authenticate: false,
        }
    }

    pub fn bad_request(code: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message).field(field)
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.body.field = Some(field.into());
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
        e.www_authenticate = true;
        e
    }

    /// A server-side failure: the client sees an opaque message; the log gets `what`.
    pub fn internal(what: impl std::fmt::Display) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the server log has the details under this request id",
        );
        e.internal = Some(what.to_string().into());
        e
    }

    /// Field errors of one email.
    pub fn invalid_email(errors: &[FieldError]) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_email",
            summary(
                errors.iter().map(|f| format!("{}: {}", f.field, f.message)),
                errors.len(),
                "; ",
            ),
        );
        e.body.field = errors.first().map(|f| f.field.clone());
        e.body.details = errors
            .iter()
            .take(MAX_DETAILS)
            .map(|f| ErrorDetail {
                index: None,
                field: f.field.clone(),
                message: f.message.clone(),
            })
            .collect();
        e
    }
}

/// Field errors listed in one response (`details`); more are counted in a last entry.
pub const MAX_DETAILS: usize = 100;

/// The first few of `items` joined, and how many more there are.
fn summary(items: impl Iterator<Item = String>, total: usize, sep: &str) -> String {
    const SHOWN: usize = 10;
    let mut s = items.take(SHOWN).collect::<Vec<_>>().join(sep);
    if total > SHOWN {
        s.push_str(&format!("{sep}and {} more", total - SHOWN));
    }
    s
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let (code, message, retry) = match e.fault() {
            Fault::Busy => (
                "database_busy",
                "the database is busy; nothing was stored; try again shortly",
                1,
            ),
            Fault::Full => (
                "storage_full",
                "the database's disk is full; nothing was stored; try again once space is freed",
                30,
            ),
            Fault::Unavailable => (
                "database_unavailable",
                "the database cannot be reached; nothing was stored; try again shortly",
                5,
            ),
            Fault::Other => return ApiError::internal(e),
        };
        tracing::warn!(error = %e, code, "request refused: the database is not writable now");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message).retry_after(retry)
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Invalid(v) => ApiError::invalid_email(&v.0),
            SubmitError::InvalidBatch(bad) => {
                let total: usize = bad.iter().map(|(_, errs)| errs.len()).sum();
                let mut details = Vec::new();
                for (i, errs) in &bad {
                    for f in errs {
                        if details.len() == MAX_DETAILS {
                            break;
                        }
                        details.push(ErrorDetail {
                            index: Some(*i),
                            field: format!("emails[{i}].{}", f.field),
                            message: f.message.clone(),
                        });
                    }
                }
                if total > details.len() {
                    details.push(ErrorDetail {
                        index: None,
                        field: "emails".into(),
                        message: format!("{} more problems are not listed", total - details.len()),
                    });
                }
                let mut err = ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_batch",
                    format!(
                        "{} of the batch's emails are invalid (indexes {}); nothing was stored",
                        bad.len(),
                        summary(bad.iter().map(|(i, _)| i.to_string()), bad.len(), ", ")
                    ),
                );
                err.body.field = details.first().map(|d| d.field.clone());
                err.body.details = details;
                err
            }
            SubmitError::KeyReused { key } => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                format!(
                    "Idempotency-Key `{key}` was already used with a different request; \
                     use a new key for a new request"
                ),
            )
            .field("Idempotency-Key"),
            SubmitError::QueueFull { depth, max_depth } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                format!(
                    "the queue is full ({depth} emails waiting, queue.max_depth = {max_depth}); \
                     nothing was stored, try again later"
                ),
            )
            .retry_after(5),
            SubmitError::Store(e) => e.into(),
        }
    }
}

impl From<TransitionError> for ApiError {
    fn from(e: TransitionError) -> Self {
        match e {
            TransitionError::NotFound(id) => ApiError::not_found(format!("no email with id {id}")),
            c @ TransitionError::Conflict { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", c.to_string())
            }
            TransitionError::Store(e) => e.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = current_request_id();
        if let Some(what) = &self.internal {
            tracing::error!(request_id = %request_id, error = %what, "internal error");
        }
        let body = json!({ "error": self.body, "request_id": request_id });
        let mut res = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.www_authenticate {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"postbox\""),
            );
        }
        res
    }
}
