//! The suppression list over HTTP: list (filters, cursor), add, remove.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::ApiState;
use super::body::{JsonBody, page_size, parse, query};
use super::error::{ApiError, ErrorResponse};
use crate::domain::EmailAddress;
use crate::store::{Suppression, SuppressionFilter, SuppressionReason};

/// Query of `GET /v1/suppressions`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SuppressionsQuery {
    /// hard_bounce, complaint, manual or unsubscribe.
    pub reason: Option<String>,
    /// Addresses starting with this (case-insensitive).
    pub prefix: Option<String>,
    /// `next` of the previous page.
    pub after: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    pub limit: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SuppressionPage {
    pub suppressions: Vec<Suppression>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Body of `POST /v1/suppressions`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSuppression {
    pub address: String,
    /// Default `manual`.
    pub reason: Option<String>,
    pub detail: Option<String>,
    /// RFC 3339; absent: until removed.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<OffsetDateTime>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Unsuppressed {
    pub address: String,
    pub removed: bool,
}

fn reason(raw: &str, field: &str) -> Result<SuppressionReason, ApiError> {
    SuppressionReason::parse(raw).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_suppression",
            field,
            format!(
                "`{}` is not a reason (hard_bounce, complaint, manual, unsubscribe)",
                raw.escape_debug()
            ),
        )
    })
}

/// Suppressed addresses, in address order, filtered; follow `next`.
#[utoipa::path(get, path = "/v1/suppressions", tag = "events", params(SuppressionsQuery),
    responses((status = 200, body = SuppressionPage), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn list_suppressions(
    State(st): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<SuppressionPage>, ApiError> {
    let q: SuppressionsQuery = query(raw.as_deref())?;
    let limit = page_size(q.limit.as_deref(), 100, 1000)?;
    let f = SuppressionFilter {
        reason: q
            .reason
            .as_deref()
            .filter(|r| !r.is_empty())
            .map(|r| reason(r, "reason"))
            .transpose()?,
        prefix: q.prefix.filter(|p| !p.is_empty()),
        after: q.after.filter(|a| !a.is_empty()),
        limit,
    };
    let suppressions = st.postbox.suppressions(&f).await?;
    let next = (suppressions.len() == limit as usize)
        .then(|| suppressions.last().map(|s| s.address.clone()))
        .flatten();
    Ok(Json(SuppressionPage { suppressions, next }))
}

/// Add an address to the suppression list (or replace its entry): postbox will not send to it.
#[utoipa::path(post, path = "/v1/suppressions", tag = "events", request_body = NewSuppression,
    responses((status = 201, body = Suppression),
        (status = 400, description = "`field` names what is wrong", body = ErrorResponse),
        (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn add_suppression(
    State(st): State<ApiState>,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<Suppression>), ApiError> {
    let new: NewSuppression = parse(&body)?;
    let address = EmailAddress::parse(&new.address)
        .map_err(|m| ApiError::bad_request("invalid_suppression", "address", m))?;
    let why = match new.reason.as_deref() {
        None => SuppressionReason::Manual,
        Some(r) => reason(r, "reason")?,
    };
    if let Some(d) = &new.detail
        && (d.chars().count() > 500 || d.chars().any(|c| c.is_control()))
    {
        return Err(ApiError::bad_request(
            "invalid_suppression",
            "detail",
            "must be at most 500 characters, no control characters",
        ));
    }
    st.postbox
        .suppress(&address, why, new.detail.as_deref(), new.expires_at)
        .await?;
    let key = crate::store::suppression_key(address.address());
    let saved = st
        .postbox
        .suppressions(&SuppressionFilter {
            prefix: Some(key.clone()),
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_iter()
        .find(|s| s.address == key)
        .ok_or_else(|| ApiError::internal("the suppression was not found after saving"))?;
    Ok((StatusCode::CREATED, Json(saved)))
}

/// Remove an address from the suppression list.
#[utoipa::path(delete, path = "/v1/suppressions/{address}", tag = "events",
    params(("address" = String, Path, description = "The address")),
    responses((status = 200, body = Unsuppressed), (status = 401, body = ErrorResponse),
        (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn remove_suppression(
    State(st): State<ApiState>,
    Path(address): Path<String>,
) -> Result<Json<Unsuppressed>, ApiError> {
    if st.postbox.unsuppress(&address).await? {
        Ok(Json(Unsuppressed {
            address: crate::store::suppression_key(&address),
            removed: true,
        }))
    } else {
        Err(ApiError::not_found(format!(
            "{} is not on the suppression list",
            address.escape_debug()
        )))
    }
}

/// Query of `GET /v1/bounces`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BouncesQuery {
    /// How many, 1 to 1000 (default 100).
    pub limit: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BounceList {
    pub reports: Vec<crate::store::BounceReportRow>,
}

/// The latest bounce and complaint reports read from bounce mailboxes, newest first; those
/// that matched no email have no `email_id`.
#[utoipa::path(get, path = "/v1/bounces", tag = "events", params(BouncesQuery),
    responses((status = 200, body = BounceList), (status = 400, body = ErrorResponse),
        (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn list_bounces(
    State(st): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<BounceList>, ApiError> {
    let q: BouncesQuery = query(raw.as_deref())?;
    let limit = page_size(q.limit.as_deref(), 100, 1000)?;
    Ok(Json(BounceList {
        reports: st.postbox.bounce_reports(limit).await?,
    }))
}

/// The one-click unsubscribe endpoint (RFC 8058), outside `/v1` and its tokens: the link in
/// an email's `List-Unsubscribe` header. A GET (a mail client's prefetch, a person's click)
/// only shows a page with a button; the POST unsubscribes.
pub fn unsubscribe_router() -> axum::Router<ApiState> {
    axum::Router::new().route(
        "/u/{token}",
        axum::routing::get(unsubscribe_page).post(unsubscribe_now),
    )
}

fn unsubscribe_html(title: &str, text: &str, form: Option<&str>) -> axum::response::Html<String> {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let form = form.map_or(String::new(), |action| {
        format!(
            "<form method=\"post\" action=\"{}\"><input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\"><button id=\"unsubscribe\">Unsubscribe</button></form>",
            esc(action)
        )
    });
    axum::response::Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title></head><body><h1>{t}</h1><p id=\"text\">{}</p>{form}</body></html>",
        esc(text),
        t = esc(title)
    ))
}

async fn unsubscribe_page(
    State(st): State<ApiState>,
    Path(token): Path<String>,
) -> Result<axum::response::Html<String>, ApiError> {
    match st.postbox.unsubscribe_target(&token).await? {
        Some(r) => Ok(unsubscribe_html(
            "Unsubscribe",
            &format!("Stop sending email to {r}?"),
            Some(&format!("/u/{token}")),
        )),
        None => Err(ApiError::not_found("this unsubscribe link is not valid")),
    }
}

async fn unsubscribe_now(
    State(st): State<ApiState>,
    Path(token): Path<String>,
) -> Result<axum::response::Html<String>, ApiError> {
    match st.postbox.unsubscribe(&token).await? {
        Some(r) => {
            tracing::info!("one-click unsubscribe");
            Ok(unsubscribe_html(
                "Unsubscribed",
                &format!("{r} will get no more email from this sender."),
                None,
            ))
        }
        None => Err(ApiError::not_found("this unsubscribe link is not valid")),
    }
}
