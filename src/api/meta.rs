//! Templates, stats, health and the OpenAPI document.

use super::wire::*;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::ApiState;
use super::body::{JsonBody, parse};
use super::error::{ApiError, ErrorResponse};
use crate::render::{self, KINDS, RenderError};

/// The template kinds and their variables.
#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses((status = 200, body = TemplateList), (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn list_templates() -> Json<TemplateList> {
    Json(TemplateList {
        templates: KINDS
            .iter()
            .map(|k| TemplateKind {
                name: k.name.into(),
                description: k.description.into(),
                variables: k
                    .variables
                    .iter()
                    .map(|(n, t)| TemplateVariable {
                        name: n.to_string(),
                        kind: t.trim_end_matches('?').to_string(),
                        required: !t.ends_with('?'),
                    })
                    .collect(),
            })
            .collect(),
    })
}

/// Render a template's subject, text and HTML without sending anything.
#[utoipa::path(post, path = "/v1/templates/{kind}/preview", tag = "templates",
    params(("kind" = String, Path, description = "A template kind from GET /v1/templates")),
    request_body = PreviewRequest,
    responses((status = 200, body = Preview),
        (status = 400, description = "A variable is missing or of the wrong type; `field` names it", body = ErrorResponse),
        (status = 401, body = ErrorResponse), (status = 404, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn preview_template(
    Path(kind): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Preview>, ApiError> {
    if !KINDS.iter().any(|k| k.name == kind) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_template",
            format!(
                "no template `{kind}` (known: {})",
                KINDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            ),
        )
        .field("kind"));
    }
    let req: PreviewRequest = parse(&body)?;
    if let Err(f) = render::check_variables(&kind, &req.variables) {
        return Err(ApiError::bad_request(
            "invalid_variables",
            f.field.clone(),
            f.message,
        ));
    }
    match render::render_template(&kind, &req.variables) {
        Ok(r) => Ok(Json(Preview {
            subject: r.subject,
            text: r.text,
            html: r.html,
        })),
        Err(RenderError::Variables { message, .. }) => Err(ApiError::bad_request(
            "invalid_variables",
            "variables",
            message,
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}

/// Depth by state and priority, oldest queued age, recent outcomes, in flight.
#[utoipa::path(get, path = "/v1/stats", tag = "operations",
    responses((status = 200, body = StatsResponse), (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn stats(State(st): State<ApiState>) -> Result<Json<StatsResponse>, ApiError> {
    Ok(Json(StatsResponse {
        stats: st.postbox.stats().await?,
        workers_running: st.postbox.workers_running(),
    }))
}

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Ready: the database answers, and the workers run (when this process runs them). What was
/// found (`database`, `workers`) is shown only to a caller with a valid token (or when no token
/// is configured); anyone else gets the status alone.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(st): State<ApiState>, headers: axum::http::HeaderMap) -> Response {
    let database = st.writes.check(&st.postbox).await;
    let workers = match (st.expect_workers, st.postbox.workers_running()) {
        (false, _) => "not run here",
        (true, true) => "running",
        (true, false) => "stopped",
    };
    let ready = database == "ok" && workers != "stopped";
    let detailed = st.tokens.is_open()
        || headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| st.tokens.name_of(t.trim()).is_some());
    let body = Readiness {
        status: if ready { "ready" } else { "not ready" }.into(),
        database: if detailed { Some(database) } else { None },
        workers: if detailed { Some(workers.into()) } else { None },
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// This API's OpenAPI 3.1 document, generated from the code that serves it.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json")))]
pub async fn openapi(State(st): State<ApiState>) -> Response {
    let doc = st.openapi.get().cloned().unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], doc).into_response()
}

/// Each watched mailbox: connection state, position (UIDVALIDITY, last UID), last poll, last
/// error, counters, and hits / pending / alerts per rule.
#[utoipa::path(get, path = "/v1/mailboxes", tag = "operations",
    responses((status = 200, body = MailboxesResponse), (status = 401, body = ErrorResponse)),
    security(("bearer" = [])))]
pub async fn mailboxes(State(st): State<ApiState>) -> Result<Json<MailboxesResponse>, ApiError> {
    Ok(Json(MailboxesResponse {
        mailboxes: st.postbox.mailboxes().await?,
    }))
}

/// The last write probe of `/readyz` (at most one per [`WRITES_EVERY`]): a database that
/// answers reads but refuses writes (a full disk) is not ready.
#[derive(Default)]
pub struct Writes {
    last: tokio::sync::Mutex<Option<(std::time::Instant, String)>>,
}

/// How often `/readyz` probes the database with a write.
const WRITES_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl Writes {
    /// `ok`, or what failed.
    async fn check(&self, pb: &crate::Postbox) -> String {
        let mut last = self.last.lock().await;
        if let Some((at, verdict)) = &*last
            && at.elapsed() < WRITES_EVERY
        {
            return verdict.clone();
        }
        let probe = tokio::time::timeout(std::time::Duration::from_secs(2), pb.write_probe()).await;
        let verdict = match probe {
            Ok(Ok(())) => "ok".to_string(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(_) => "error: no answer within 2 s".to_string(),
        };
        *last = Some((std::time::Instant::now(), verdict.clone()));
        verdict
    }
}

/// The queue gauges of `/metrics`, read from the database at most once per [`GAUGES_EVERY`] and
/// by one scrape at a time: scrapers, however many and however often, cost the database (and the
/// workers sharing its pool) one small read every few seconds.
#[derive(Default)]
pub struct Gauges {
    refreshed: std::sync::Mutex<Option<std::time::Instant>>,
    refreshing: tokio::sync::Mutex<()>,
}

/// How old the queue gauges may be.
pub const GAUGES_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl Gauges {
    async fn refresh(&self, pb: &crate::Postbox) {
        let fresh =
            |at: &Option<std::time::Instant>| at.is_some_and(|t| t.elapsed() < GAUGES_EVERY);
        if fresh(&self.refreshed.lock().unwrap_or_else(|p| p.into_inner())) {
            return;
        }
        // Another scrape is reading: serve the values it last set.
        let Ok(_one) = self.refreshing.try_lock() else {
            return;
        };
        match pb.queue_gauges().await {
            Ok(g) => {
                for (state, n) in g.depth {
                    metrics::gauge!("postbox_queue_depth", "state" => state).set(n as f64);
                }
                metrics::gauge!("postbox_queue_oldest_age_seconds")
                    .set(g.oldest_queued_age_secs.unwrap_or(0.0));
                *self.refreshed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(std::time::Instant::now());
            }
            // The counters still render; the gauges keep their last values.
            Err(e) => tracing::warn!(error = %e, "cannot read the queue gauges"),
        }
    }
}

/// Prometheus metrics (text exposition format). Queue gauges come from the database, at most
/// [`GAUGES_EVERY`] old. Open or behind the token like the health routes (`api.open_health`).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(st): State<ApiState>) -> Result<Response, ApiError> {
    st.gauges.refresh(&st.postbox).await;
    // The rate limit gauges: set from this process's limiter (no database read).
    st.postbox.refresh_limit_gauges();
    match crate::metrics::render() {
        Some(text) => Ok((
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics_elsewhere",
            "the embedding application installed its own metrics recorder",
        )),
    }
}
