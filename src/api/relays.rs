//! Operator controls over HTTP: the relays and their rate limits, pauses, bulk retry / cancel.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::ApiState;
use super::body::{JsonBody, parse};
use super::error::{ApiError, ErrorResponse, current_request_id};
use crate::store::{Pause, PauseKind};
use crate::{BulkReport, RelaysReport};

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

fn invalid(kind: &str, (field, message): (&'static str, String)) -> ApiError {
    ApiError::bad_request(kind, field, message)
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
    let (kind, value) = st
        .postbox
        .pause_target(&new.kind, &new.value)
        .map_err(|e| invalid("invalid_pause", e))?;
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
        .pauses()
        .await?
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
    let (action, filter) = crate::postbox::bulk_request(
        &req.action,
        &req.status,
        req.tag.as_deref(),
        req.domain.as_deref(),
        req.older_than_secs,
    )
    .map_err(|e| invalid("invalid_bulk", e))?;
    let origin = format!("bulk {}, request {}", req.action, current_request_id());
    Ok(Json(st.postbox.bulk(action, &filter, &origin).await?))
}
