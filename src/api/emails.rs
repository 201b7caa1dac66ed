//! `/v1/emails`: submit one or a batch, look up, list, cancel, retry. Every handler calls the
//! `Postbox` facade; none holds SQL or SMTP.

use super::wire::*;
use axum::Json;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::ApiState;
use super::auth::Principal;
use super::body::{
    JsonBody, fingerprint, from_value, from_value_seeded, parse, parse_seeded, query,
};
use super::error::{ApiError, ErrorResponse, current_request_id};
use crate::domain::{EmailId, EmailStatus, NewEmail};
use crate::store::{EmailPage, EmailReport, IdempotencyClaim, ListFilter};
use crate::{SubmitOptions, SubmitOutcome};

/// The header that makes a submit safe to repeat.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on a response that replays an earlier request's result.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// The start of the error a batch past `api.max_batch` gets (recognised by `body::data_error`).
pub const BATCH_CAP: &str = "a batch holds at most";

/// Reads `{"emails": [...]}`, stopping at the first email past `max` instead of reading (and
/// allocating) the rest.
struct BatchSeed {
    max: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for BatchSeed {
    type Value = BatchRequest;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<BatchRequest, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for BatchSeed {
    type Value = BatchRequest;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object with `emails`")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<BatchRequest, A::Error> {
        use serde::de::Error;
        let mut emails = None;
        while let Some(k) = m.next_key::<String>()? {
            match k.as_str() {
                "emails" if emails.is_none() => {
                    emails = Some(m.next_value_seed(EmailsSeed(self.max))?)
                }
                "emails" => return Err(A::Error::duplicate_field("emails")),
                other => return Err(A::Error::unknown_field(other, &["emails"])),
            }
        }
        Ok(BatchRequest {
            emails: emails.ok_or_else(|| A::Error::missing_field("emails"))?,
        })
    }
}

struct EmailsSeed(usize);

impl<'de> serde::de::DeserializeSeed<'de> for EmailsSeed {
    type Value = Vec<NewEmail>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<NewEmail>, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EmailsSeed {
    type Value = Vec<NewEmail>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of emails")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<Vec<NewEmail>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.0).min(1024));
        while let Some(e) = seq.next_element::<NewEmail>()? {
            if out.len() == self.0 {
                return Err(serde::de::Error::custom(format!(
                    "{BATCH_CAP} {} emails (api.max_batch); this one has more",
                    self.0
                )));
            }
            out.push(e);
        }
        Ok(out)
    }
}

/// Reads `Idempotency-Key`: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )
    };
    let s = v.to_str().map_err(|_| bad())?;
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(bad());
    }
    Ok(Some(s.to_string()))
}

/// Parses the body as `T`; with an Idempotency-Key, also fingerprints it.
fn read<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    principal: Option<&Principal>,
    route: &str,
    body: &[u8],
) -> Result<(T, Option<IdempotencyClaim>), ApiError> {
    match idempotency_key(headers)? {
        None => Ok((parse(body)?, None)),
        Some(key) => {
            let v: Value = parse(body)?;
            let claim = claim_of(principal, key, route, &v);
            Ok((from_value(v)?, Some(claim)))
        }
    }
}

fn claim_of(
    principal: Option<&Principal>,
    key: String,
    route: &str,
    body: &Value,
) -> IdempotencyClaim {
    IdempotencyClaim {
        scope: principal.map_or("anonymous", |p| p.0.as_str()).to_string(),
        key,
        fingerprint: fingerprint("POST", route, body),
    }
}

fn options(idempotency: Option<IdempotencyClaim>) -> SubmitOptions {
    SubmitOptions {
        request_id: Some(current_request_id()),
        idempotency,
    }
}

fn respond<T: Serialize>(body: T, out: &SubmitOutcome, location: Option<&str>) -> Response {
    let mut res = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Some(l) = location.and_then(|l| HeaderValue::from_str(l).ok()) {
        res.headers_mut().insert(header::LOCATION, l);
    }
    if out.replayed {
        res.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    res
}

/// Queue one email.
#[utoipa::path(post, path = "/v1/emails", tag = "emails",
    request_body = NewEmail,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "Makes the request safe to repeat: the same key with the same body returns \
                       the first response and queues nothing; with another body, 409.")),
    responses(
        (status = 202, description = "Queued (committed)", body = Accepted),
        (status = 400, description = "Malformed JSON or an invalid email; `field` names it", body = ErrorResponse),
        (status = 401, body = ErrorResponse), (status = 409, description = "Idempotency-Key reused with another body", body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 415, body = ErrorResponse),
        (status = 429, description = "Rate limited (Retry-After)", body = ErrorResponse),
        (status = 503, description = "Queue full or database busy (Retry-After)", body = ErrorResponse),
    ),
    security(("bearer" = [])))]
pub async fn submit_email(
    State(st): State<ApiState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let (new, claim): (NewEmail, _) = read(&headers, principal.as_deref(), "/v1/emails", &body)?;
    let out = st.postbox.submit_with(new, options(claim)).await?;
    let s = out
        .emails
        .first()
        .ok_or_else(|| ApiError::internal("no result"))?;
    tracing::debug!(email_id = %s.id, created = s.created, replayed = out.replayed, "accepted");
    let a = accepted(s.id.clone(), s.created);
    let location = a.status_url.clone();
    Ok(respond(a, &out, Some(&location)))
}

/// Queue a batch in one transaction: every email is valid and queued, or none is.
#[utoipa::path(post, path = "/v1/emails/batch", tag = "emails",
    request_body = BatchRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "As for `POST /v1/emails`.")),
    responses(
        (status = 202, description = "All queued (committed)", body = BatchAccepted),
        (status = 400, description = "Lists every bad email by index and field; nothing queued", body = ErrorResponse),
        (status = 401, body = ErrorResponse), (status = 409, body = ErrorResponse),
        (status = 413, body = ErrorResponse), (status = 415, body = ErrorResponse),
        (status = 429, body = ErrorResponse),
        (status = 503, description = "Queue full: the whole batch is refused (Retry-After)", body = ErrorResponse),
    ),
    security(("bearer" = [])))]
pub async fn submit_batch(
    State(st): State<ApiState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let seed = || BatchSeed {
        max: st.settings.max_batch,
    };
    let (batch, claim) = match idempotency_key(&headers)? {
        None => (parse_seeded(&body, seed())?, None),
        Some(key) => {
            let v: Value = parse(&body)?;
            let batch = from_value_seeded(&v, seed())?;
            (
                batch,
                Some(claim_of(principal.as_deref(), key, "/v1/emails/batch", &v)),
            )
        }
    };
    if batch.emails.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_batch",
            "emails",
            "a batch needs at least one email",
        ));
    }
    let out = st
        .postbox
        .submit_many_with(batch.emails, options(claim))
        .await?;
    tracing::debug!(
        count = out.emails.len(),
        replayed = out.replayed,
        "batch accepted"
    );
    let body = BatchAccepted {
        count: out.emails.len(),
        emails: out
            .emails
            .iter()
            .map(|s| accepted(s.id.clone(), s.created))
            .collect(),
    };
    Ok(respond(body, &out, None))
}

fn email_id(raw: &str) -> Result<EmailId, ApiError> {
    EmailId::parse(raw).map_err(|m| ApiError::bad_request("invalid_id", "id", m))
}

/// An email's status, attempts and timeline (each attempt's time, SMTP code and reply).
#[utoipa::path(get, path = "/v1/emails/{id}", tag = "emails",
    params(("id" = String, Path, description = "The email's id")),
    responses((status = 200, body = EmailReport), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn get_email(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<EmailReport>, ApiError> {
    let id = email_id(&id)?;
    match st.postbox.status(&id).await? {
        Some(r) => Ok(Json(r)),
        None => Err(ApiError::not_found(format!("no email with id {id}"))),
    }
}

fn time_param(field: &str, v: Option<&str>) -> Result<Option<OffsetDateTime>, ApiError> {
    v.map(|s| {
        OffsetDateTime::parse(s, &Rfc3339).map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                field,
                format!("`{s}` is not an RFC 3339 time (e.g. 2026-11-22T10:00:00Z)"),
            )
        })
    })
    .transpose()
}

/// Emails, newest first, filtered; follow `next_cursor` for the next page.
#[utoipa::path(get, path = "/v1/emails", tag = "emails", params(ListQuery),
    responses((status = 200, body = EmailPage), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn list_emails(
    State(st): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<EmailPage>, ApiError> {
    let q: ListQuery = query(raw.as_deref())?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            EmailStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    "status",
                    format!("`{s}` is not a status (queued, sending, sent, retrying, failed, cancelled, expired)"),
                )
            })
        })
        .transpose()?;
    let limit = super::body::page_size(q.limit.as_deref(), 50, 500)?;
    let before_id = q
        .cursor
        .as_deref()
        .map(|c| {
            EmailId::parse(c).map_err(|_| {
                ApiError::bad_request("invalid_query", "cursor", "not a cursor from this API")
            })
        })
        .transpose()?;
    let filter = ListFilter {
        status,
        tag: q.tag.filter(|t| !t.is_empty()),
        recipient: q.recipient.filter(|r| !r.is_empty()),
        domain: None,
        created_after: time_param("created_after", q.created_after.as_deref())?,
        created_before: time_param("created_before", q.created_before.as_deref())?,
        before_id,
        limit,
    };
    Ok(Json(st.postbox.list(&filter).await?))
}

/// Cancel a queued or retrying email, or dismiss a dead letter (failed).
#[utoipa::path(post, path = "/v1/emails/{id}/cancel", tag = "emails",
    params(("id" = String, Path, description = "The email's id")),
    responses((status = 200, body = Transitioned), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
        (status = 409, description = "Its state does not allow it", body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn cancel_email(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Transitioned>, ApiError> {
    let id = email_id(&id)?;
    st.postbox.cancel_from(&id, &current_request_id()).await?;
    Ok(Json(Transitioned {
        id,
        status: EmailStatus::Cancelled,
    }))
}

/// Re-drive a failed email (dead letter): a fresh retry budget, the same Message-ID.
#[utoipa::path(post, path = "/v1/emails/{id}/retry", tag = "emails",
    params(("id" = String, Path, description = "The email's id")),
    responses((status = 200, body = Transitioned), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse),
        (status = 409, description = "Only failed emails can be retried", body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn retry_email(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Transitioned>, ApiError> {
    let id = email_id(&id)?;
    st.postbox.retry_from(&id, &current_request_id()).await?;
    Ok(Json(Transitioned {
        id,
        status: EmailStatus::Queued,
    }))
}
