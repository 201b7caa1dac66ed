//! Operator controls over HTTP: the relays and their rate limits, pauses, bulk retry / cancel.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::ApiState;
use super::body::{JsonBody, parse};
use super::error::{ApiError, ErrorResponse, current_request_id};
use crate::domain::EmailStatus;
use crate::store::{Pause, PauseKind};
use crate::{BulkAction, BulkFilter, BulkReport, Postbox, RelaysReport};

/// The relays (cool-downs), every rate limit (configured, effective, why it is lowered) and
/// the pauses.
#[utoipa::path(get, path = "/v1/relays", tag = "operations",
    responses((status = 200, body = RelaysReport), (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn relays(State(st): State<ApiState>) -> Result<Json<RelaysReport>, ApiError> {
    Ok(Json(st.postbox.relays().await?))
}

/// Body of `POST /v1/pauses`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPause {
    /// relay, domain or tag.
    pub kind: String,
    /// The relay's name, the recipient domain or the tag.
    pub value: String,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Resumed {
    /// How many held emails were queued again at once.
    pub released: u64,
}

/// A pause's kind and value, checked; errors name `field_kind` / `field_value`.
pub fn pause_target(
    pb: &Postbox,
    kind: &str,
    value: &str,
    (field_kind, field_value): (&str, &str),
) -> Result<(PauseKind, String), ApiError> {
    let bad = |field: &str, m: String| ApiError::bad_request("invalid_pause", field, m);
    let k = PauseKind::parse(kind).ok_or_else(|| {
        bad(
            field_kind,
            format!("`{}` is not relay, domain or tag", kind.escape_debug()),
        )
    })?;
    let v = value.trim();
    let ok_chars = !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !ok_chars {
        return Err(bad(
            field_value,
            "must be 1-253 characters of A-Z a-z 0-9 - _ . :".into(),
        ));
    }
    let v = match k {
        PauseKind::Relay => {
            if !pb.relay_names().iter().any(|n| n == v) {
                return Err(bad(
                    field_value,
                    format!(
                        "\"{v}\" is not a relay (relays: {})",
                        pb.relay_names().join(", ")
                    ),
                ));
            }
            v.to_string()
        }
        PauseKind::Domain => v.to_ascii_lowercase(),
        PauseKind::Tag => v.to_string(),
    };
    Ok((k, v))
}

/// Pause sending through a relay (its emails fail over to the route's next relay, or wait),
/// to a recipient domain, or with a tag (they wait). Worker processes see it within 2 s.
#[utoipa::path(post, path = "/v1/pauses", tag = "operations", request_body = NewPause,
    responses((status = 201, body = Pause), (status = 200, description = "Already paused", body = Pause),
        (status = 400, description = "`field` names what is wrong", body = ErrorResponse),
        (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn add_pause(
    State(st): State<ApiState>,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<Pause>), ApiError> {
    let new: NewPause = parse(&body)?;
    let (kind, value) = pause_target(&st.postbox, &new.kind, &new.value, ("kind", "value"))?;
    if let Some(r) = &new.reason
        && (r.chars().count() > 500 || r.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(
            "invalid_pause",
            "reason",
            "must be at most 500 characters without control characters",
        ));
    }
    let created = st
        .postbox
        .pause(kind, &value, new.reason.as_deref())
        .await?;
    let pause = st
        .postbox
        .relays()
        .await?
        .pauses
        .into_iter()
        .find(|p| p.kind == kind && p.value == value)
        .ok_or_else(|| ApiError::not_found("the pause was removed meanwhile"))?;
    let code = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((code, Json(pause)))
}

/// End a pause: the emails it held are queued again at once.
#[utoipa::path(delete, path = "/v1/pauses/{kind}/{value}", tag = "operations",
    params(("kind" = String, Path, description = "relay, domain or tag"),
        ("value" = String, Path, description = "The relay, domain or tag")),
    responses((status = 200, body = Resumed), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn remove_pause(
    State(st): State<ApiState>,
    Path((kind, value)): Path<(String, String)>,
) -> Result<Json<Resumed>, ApiError> {
    let k = PauseKind::parse(&kind).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_pause",
            "kind",
            format!("`{}` is not relay, domain or tag", kind.escape_debug()),
        )
    })?;
    let value = if k == PauseKind::Domain {
        value.to_ascii_lowercase()
    } else {
        value
    };
    match st.postbox.resume(k, &value).await? {
        Some(released) => Ok(Json(Resumed { released })),
        None => Err(ApiError::not_found(format!(
            "no pause of {} \"{}\"",
            k.as_str(),
            value.escape_debug()
        ))),
    }
}

/// Body of `POST /v1/emails/bulk`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    /// retry (dead letters) or cancel.
    pub action: String,
    /// Required: failed for retry; queued, retrying or failed for cancel.
    pub status: String,
    pub tag: Option<String>,
    /// A recipient at this domain.
    pub domain: Option<String>,
    /// Created at least this many seconds ago.
    pub older_than_secs: Option<u64>,
}

/// The bulk filter and action, checked; errors name the field.
pub fn bulk_request(b: &BulkRequest) -> Result<(BulkAction, BulkFilter), ApiError> {
    let bad = |field: &str, m: String| ApiError::bad_request("invalid_bulk", field, m);
    let action = match b.action.as_str() {
        "retry" => BulkAction::Retry,
        "cancel" => BulkAction::Cancel,
        other => {
            return Err(bad(
                "action",
                format!("`{}` is not retry or cancel", other.escape_debug()),
            ));
        }
    };
    let status = EmailStatus::parse(&b.status).ok_or_else(|| {
        bad(
            "status",
            format!("`{}` is not a status", b.status.escape_debug()),
        )
    })?;
    let allowed: &[EmailStatus] = match action {
        BulkAction::Retry => &[EmailStatus::Failed],
        BulkAction::Cancel => &[
            EmailStatus::Queued,
            EmailStatus::Retrying,
            EmailStatus::Failed,
        ],
    };
    if !allowed.contains(&status) {
        return Err(bad(
            "status",
            format!(
                "{} applies to {}",
                b.action,
                allowed
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let word = |field: &str, v: &Option<String>| -> Result<Option<String>, ApiError> {
        match v {
            Some(v)
                if v.is_empty()
                    || v.len() > 253
                    || !v
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(&c)) =>
            {
                Err(bad(
                    field,
                    "must be 1-253 characters of A-Z a-z 0-9 - _ . :".into(),
                ))
            }
            v => Ok(v.clone()),
        }
    };
    Ok((
        action,
        BulkFilter {
            status: Some(status),
            tag: word("tag", &b.tag)?,
            domain: word("domain", &b.domain)?.map(|d| d.to_ascii_lowercase()),
            older_than: b.older_than_secs.map(std::time::Duration::from_secs),
        },
    ))
}

/// Retry or cancel every email matching a filter (up to 10,000 per call; `more` says to call
/// again). Each email goes through the same step as one by one, its timeline naming the
/// request.
#[utoipa::path(post, path = "/v1/emails/bulk", tag = "operations", request_body = BulkRequest,
    responses((status = 200, body = BulkReport),
        (status = 400, description = "`field` names what is wrong", body = ErrorResponse),
        (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn bulk(
    State(st): State<ApiState>,
    JsonBody(body): JsonBody,
) -> Result<Json<BulkReport>, ApiError> {
    let req: BulkRequest = parse(&body)?;
    let (action, filter) = bulk_request(&req)?;
    let origin = format!("bulk {}, request {}", req.action, current_request_id());
    Ok(Json(st.postbox.bulk(action, &filter, &origin).await?))
}
