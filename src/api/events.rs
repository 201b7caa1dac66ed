//! Events and webhooks: the durable events feed, one email's events, and the webhook
//! endpoints (list, add, remove, enable, their deliveries, redeliver).

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::ApiState;
use super::body::{JsonBody, page_size, parse, query};
use super::error::{ApiError, ErrorResponse};
use crate::domain::EmailId;
use crate::store::{Cursor, DeliveryRecord, Event, WebhookRow, WebhookSpec};
use crate::webhooks::Secret;

/// Endpoints the API may add (the config's are not counted).
const MAX_API_WEBHOOKS: usize = 100;

/// Query of `GET /v1/events`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// `next` of the previous page; empty or absent: from the oldest event kept.
    pub after: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<String>,
}

/// A page of the events feed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventFeed {
    pub events: Vec<Event>,
    /// Pass as `after` for the events that follow (the same value when there are none yet).
    pub next: String,
}

/// One email's events, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmailEvents {
    pub email_id: String,
    pub events: Vec<Event>,
}

/// A webhook endpoint (its secret is never shown again after it was made).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookView {
    pub name: String,
    pub url: String,
    /// Event types sent (empty: all).
    pub events: Vec<String>,
    /// Only emails with one of these tags (empty: all).
    pub tags: Vec<String>,
    /// `config` or `api` (only `api` endpoints can be changed here).
    pub source: String,
    /// Events not yet read by its dispatcher, counted up to 10,000 (see `lag_capped`).
    pub lag: i64,
    /// True when there are more than `lag` (the count stops at 10,000).
    pub lag_capped: bool,
    /// How long the oldest event not yet read has waited, in seconds (0 when caught up).
    pub lag_seconds: f64,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub failing_since: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub disabled_at: Option<OffsetDateTime>,
    pub disabled_reason: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookList {
    pub webhooks: Vec<WebhookView>,
}

/// Body of `POST /v1/webhooks`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhook {
    pub name: String,
    pub url: String,
    /// `whsec_<base64>` (24 to 64 bytes); absent: one is made and returned once.
    pub secret: Option<String>,
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// The endpoint as saved, with its secret: the only time it is shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookCreated {
    pub name: String,
    pub url: String,
    pub secret: String,
    pub events: Vec<String>,
    pub tags: Vec<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryList {
    pub deliveries: Vec<DeliveryRecord>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Done {
    pub ok: bool,
}

/// The events feed: every email event, oldest first, from a cursor. A consumer that prefers
/// pulling to webhooks keeps `next` and asks again.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery),
    responses((status = 200, body = EventFeed), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn list_events(
    State(st): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<EventFeed>, ApiError> {
    let q: EventsQuery = query(raw.as_deref())?;
    let after: Cursor = q
        .after
        .as_deref()
        .unwrap_or("")
        .parse()
        .map_err(|m: &str| ApiError::bad_request("invalid_query", "after", m))?;
    let limit = page_size(q.limit.as_deref(), 100, 1000)?;
    let page = st.postbox.events(after, limit).await?;
    Ok(Json(EventFeed {
        events: page.events,
        next: page.next.to_string(),
    }))
}

/// One email's events (the webhook payloads it raised), oldest first.
#[utoipa::path(get, path = "/v1/emails/{id}/events", tag = "events",
    params(("id" = String, Path, description = "The email's id")),
    responses((status = 200, body = EmailEvents), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn email_events(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<EmailEvents>, ApiError> {
    let id = EmailId::parse(&id).map_err(|m| ApiError::bad_request("invalid_id", "id", m))?;
    match st.postbox.email_events(&id).await? {
        Some(events) => Ok(Json(EmailEvents {
            email_id: id.to_string(),
            events,
        })),
        None => Err(ApiError::not_found(format!("no email with id {id}"))),
    }
}

async fn view(st: &ApiState, w: WebhookRow) -> Result<WebhookView, ApiError> {
    let (lag, lag_capped, lag_seconds) = st.postbox.webhook_lag(&w.name).await?;
    Ok(WebhookView {
        name: w.name,
        url: w.url,
        events: w.events,
        tags: w.tags,
        source: w.source,
        lag,
        lag_capped,
        lag_seconds,
        failing_since: w.failing_since,
        last_error: w.last_error,
        disabled_at: w.disabled_at,
        disabled_reason: w.disabled_reason,
    })
}

/// Webhook endpoints (from the config and from this API), with their health.
#[utoipa::path(get, path = "/v1/webhooks", tag = "events",
    responses((status = 200, body = WebhookList), (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn list_webhooks(State(st): State<ApiState>) -> Result<Json<WebhookList>, ApiError> {
    let mut webhooks = Vec::new();
    for w in st.postbox.webhooks().await? {
        webhooks.push(view(&st, w).await?);
    }
    Ok(Json(WebhookList { webhooks }))
}

/// Add an endpoint, or replace one added here before (it keeps its place in the feed and is
/// enabled again). The response carries the secret: the only time it is shown.
#[utoipa::path(post, path = "/v1/webhooks", tag = "events", request_body = NewWebhook,
    responses((status = 201, body = WebhookCreated),
        (status = 400, description = "`field` names what is wrong", body = ErrorResponse),
        (status = 401, body = ErrorResponse),
        (status = 409, description = "The name is the config's, or too many endpoints", body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn put_webhook(
    State(st): State<ApiState>,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<WebhookCreated>), ApiError> {
    let new: NewWebhook = parse(&body)?;
    crate::webhooks::check_spec(&new.name, &new.url, &new.events, &new.tags, false)
        .map_err(|(field, m)| ApiError::bad_request("invalid_webhook", field, m))?;
    let secret = match &new.secret {
        Some(s) => Secret::parse(s).map_err(|m| {
            ApiError::bad_request("invalid_webhook", "secret", format!("the secret {m}"))
        })?,
        None => Secret::generate(),
    };
    let existing = st.postbox.webhooks().await?;
    if !existing.iter().any(|w| w.name == new.name)
        && existing.iter().filter(|w| w.source == "api").count() >= MAX_API_WEBHOOKS
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_webhooks",
            format!("at most {MAX_API_WEBHOOKS} endpoints can be added over the API"),
        ));
    }
    let spec = WebhookSpec {
        name: new.name.clone(),
        url: new.url.clone(),
        secret: Some(secret.expose()),
        events: new.events.clone(),
        tags: new.tags.clone(),
    };
    if !st.postbox.put_webhook(&spec).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "configured_webhook",
            format!(
                "webhook {} is set in the config file; change it there",
                new.name
            ),
        )
        .field("name"));
    }
    Ok((
        StatusCode::CREATED,
        Json(WebhookCreated {
            name: new.name,
            url: new.url,
            secret: secret.expose(),
            events: new.events,
            tags: new.tags,
        }),
    ))
}

/// Remove an endpoint added over the API (with its delivery records).
#[utoipa::path(delete, path = "/v1/webhooks/{name}", tag = "events",
    params(("name" = String, Path, description = "The endpoint's name")),
    responses((status = 200, body = Done), (status = 401, body = ErrorResponse),
        (status = 404, body = ErrorResponse),
        (status = 409, description = "It is the config's", body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn delete_webhook(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Done>, ApiError> {
    match st.postbox.webhook(&name).await? {
        None => Err(ApiError::not_found(format!(
            "no webhook named {}",
            name.escape_debug()
        ))),
        Some(w) if w.source != "api" => Err(ApiError::new(
            StatusCode::CONFLICT,
            "configured_webhook",
            format!("webhook {name} is set in the config file; remove it there"),
        )),
        Some(_) => {
            st.postbox.delete_webhook(&name).await?;
            Ok(Json(Done { ok: true }))
        }
    }
}

/// Enable an endpoint that was disabled (410 Gone, or failing for days).
#[utoipa::path(post, path = "/v1/webhooks/{name}/enable", tag = "events",
    params(("name" = String, Path, description = "The endpoint's name")),
    responses((status = 200, body = Done), (status = 401, body = ErrorResponse),
        (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn enable_webhook(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<Done>, ApiError> {
    if st.postbox.enable_webhook(&name).await? {
        Ok(Json(Done { ok: true }))
    } else {
        Err(ApiError::not_found(format!(
            "no webhook named {}",
            name.escape_debug()
        )))
    }
}

/// Query of `GET /v1/webhooks/{name}/deliveries`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// How many, 1 to 500 (default 50).
    pub limit: Option<String>,
}

/// An endpoint's latest deliveries, newest first: state, attempts, the answer.
#[utoipa::path(get, path = "/v1/webhooks/{name}/deliveries", tag = "events",
    params(("name" = String, Path, description = "The endpoint's name"), DeliveriesQuery),
    responses((status = 200, body = DeliveryList), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn list_deliveries(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<DeliveryList>, ApiError> {
    let q: DeliveriesQuery = query(raw.as_deref())?;
    let limit = page_size(q.limit.as_deref(), 50, 500)?;
    if st.postbox.webhook(&name).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "no webhook named {}",
            name.escape_debug()
        )));
    }
    Ok(Json(DeliveryList {
        deliveries: st.postbox.webhook_deliveries(&name, limit).await?,
    }))
}

/// Send one delivery again now (same event, same `webhook-id`).
#[utoipa::path(post, path = "/v1/webhooks/{name}/deliveries/{id}/redeliver", tag = "events",
    params(("name" = String, Path, description = "The endpoint's name"),
        ("id" = i64, Path, description = "The delivery's id")),
    responses((status = 202, body = Done), (status = 401, body = ErrorResponse),
        (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn redeliver(
    State(st): State<ApiState>,
    Path((name, id)): Path<(String, i64)>,
) -> Result<(StatusCode, Json<Done>), ApiError> {
    if st.postbox.redeliver(&name, id).await? {
        Ok((StatusCode::ACCEPTED, Json(Done { ok: true })))
    } else {
        Err(ApiError::not_found(format!(
            "no delivery {id} of webhook {}",
            name.escape_debug()
        )))
    }
}

/// Send one event to an endpoint again now (same `webhook-id`), whether or not the deliveries
/// log has a row for it (of a busy round's first-try successes only the newest are logged).
#[utoipa::path(post, path = "/v1/webhooks/{name}/events/{event_id}/redeliver", tag = "events",
    params(("name" = String, Path, description = "The endpoint's name"),
        ("event_id" = String, Path, description = "The event's id (`evt_...`)")),
    responses((status = 202, body = Done), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn redeliver_event(
    State(st): State<ApiState>,
    Path((name, event_id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Done>), ApiError> {
    let seq = crate::store::event_seq(&event_id).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_id",
            "event_id",
            "must be an event id: evt_<number>",
        )
    })?;
    if st.postbox.redeliver_event(&name, seq).await? {
        Ok((StatusCode::ACCEPTED, Json(Done { ok: true })))
    } else {
        Err(ApiError::not_found(format!(
            "no webhook {} or no event {}",
            name.escape_debug(),
            event_id.escape_debug()
        )))
    }
}
