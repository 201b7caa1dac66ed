//! The HTTP API (axum), served by `postbox serve` and `postbox api`.
//!
//! [`router`] builds the routes and their OpenAPI document from the same declarations
//! (utoipa-axum), so the document lists exactly what is served. Layers, outermost first:
//! request context (request id, span, panic -> 500, `x-request-id` on every response), body
//! limit, then per route group: bearer auth + rate limit on `/v1`, open health routes.
//! Handlers only call the [`Postbox`] facade.

mod auth;
mod body;
mod emails;
mod error;
mod events;
mod meta;
mod relays;
mod server;
mod settings;
mod suppressions;
mod ui;
pub mod wire;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use futures::FutureExt;
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::{Principal, RateLimit, Tokens};
pub use emails::{IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};
pub use error::{ApiError, ErrorBody, ErrorResponse};
pub use meta::GAUGES_EVERY;
pub use settings::{ApiSettings, ApiToken, ResolvedToken};

use crate::Shutdown;
use crate::postbox::Postbox;
use crate::settings::ConfigError;
use error::REQUEST_ID;

/// The response header carrying the request id (also accepted from the client).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    postbox: Postbox,
    settings: Arc<ApiSettings>,
    tokens: Arc<Tokens>,
    /// Whether this process runs workers (readiness requires them then).
    expect_workers: bool,
    openapi: Arc<OnceLock<String>>,
    sessions: Arc<ui::Sessions>,
    logins: Arc<auth::FailedLogins>,
    gauges: Arc<meta::Gauges>,
    writes: Arc<meta::Writes>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "postbox",
        description = "Reliable email dispatch: submit emails, follow them to the mailbox, \
                       re-drive dead letters. Every error is `{\"error\": {\"code\", \"message\", \
                       \"field\"?}, \"request_id\"}`.",
        license(name = "MIT OR Apache-2.0")
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "emails", description = "Submit and follow emails"),
        (name = "templates", description = "Built-in templates"),
        (name = "events", description = "What became of each email: the events feed and signed webhooks"),
        (name = "operations", description = "Stats, health, relays and rate limits, pauses, bulk actions, and this document")
    )
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Builds the app: the router and the OpenAPI document it serves.
pub fn router(
    postbox: Postbox,
    settings: &ApiSettings,
    tokens: &[ResolvedToken],
    expect_workers: bool,
) -> Result<(Router, utoipa::openapi::OpenApi), ConfigError> {
    build(postbox, settings, tokens, expect_workers).map(|(r, doc, _)| (r, doc))
}

fn build(
    postbox: Postbox,
    settings: &ApiSettings,
    tokens: &[ResolvedToken],
    expect_workers: bool,
) -> Result<(Router, utoipa::openapi::OpenApi, ApiState), ConfigError> {
    let tokens = Arc::new(Tokens::new(tokens));
    let sessions = Arc::new(ui::Sessions::new(postbox.store().clone()));
    let state = ApiState {
        postbox,
        settings: Arc::new(settings.clone()),
        tokens,
        expect_workers,
        openapi: Arc::new(OnceLock::new()),
        sessions,
        logins: Arc::new(auth::FailedLogins::new(
            settings.max_failed_logins,
            std::time::Duration::from_secs(settings.failed_login_window_secs),
        )),
        gauges: Arc::new(meta::Gauges::default()),
        writes: Arc::new(meta::Writes::default()),
    };
    let v1 = OpenApiRouter::new()
        .routes(routes!(emails::submit_email, emails::list_emails))
        .routes(routes!(emails::submit_batch))
        .routes(routes!(emails::get_email))
        .routes(routes!(emails::cancel_email))
        .routes(routes!(emails::retry_email))
        .routes(routes!(meta::list_templates))
        .routes(routes!(meta::preview_template))
        .routes(routes!(meta::stats))
        .routes(routes!(meta::mailboxes))
        .routes(routes!(events::list_events))
        .routes(routes!(events::email_events))
        .routes(routes!(events::list_webhooks, events::put_webhook))
        .routes(routes!(events::delete_webhook))
        .routes(routes!(events::enable_webhook))
        .routes(routes!(events::list_deliveries))
        .routes(routes!(events::redeliver))
        .routes(routes!(events::redeliver_event))
        .routes(routes!(
            suppressions::list_suppressions,
            suppressions::add_suppression
        ))
        .routes(routes!(suppressions::remove_suppression))
        .routes(routes!(suppressions::list_bounces))
        .routes(routes!(relays::relays))
        .routes(routes!(relays::add_pause))
        .routes(routes!(relays::remove_pause))
        .routes(routes!(relays::bulk))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let mut health = OpenApiRouter::new()
        .routes(routes!(meta::healthz))
        .routes(routes!(meta::readyz))
        .routes(routes!(meta::openapi))
        .routes(routes!(meta::metrics));
    if !settings.open_health {
        health = health.route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    }
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(v1)
        .merge(health)
        .split_for_parts();
    let _ = state.openapi.set(
        doc.to_pretty_json()
            .map_err(|e| ConfigError::new("(openapi)", e.to_string()))?,
    );
    let open = state.tokens.is_open();
    let mut router = router
        .merge(ui::router())
        .merge(suppressions::unsubscribe_router());
    if open {
        // No token: any local process may call, but no web page may (see `open_guard`).
        router = router.layer(middleware::from_fn(open_guard));
    }
    let router = router
        .fallback(|req: Request| async move {
            ApiError::not_found(format!("no route {} {}", req.method(), req.uri().path()))
        })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(middleware::from_fn(request_context))
        .with_state(state.clone());
    Ok((router, doc, state))
}

/// A client's `x-request-id` is kept when it is short and plain; otherwise a new one is made.
fn incoming_request_id(req: &Request) -> Option<String> {
    let v = req.headers().get(REQUEST_ID_HEADER)?.to_str().ok()?;
    crate::domain::plain_name(v, 64, b"-_.:").then(|| v.to_string())
}

/// Is a `Host` (or an `Origin`'s host) this machine: `localhost`, 127.0.0.0/8 or `[::1]`, with
/// any port?
fn loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    crate::net::is_loopback_host(host)
}

/// The API without a token (loopback only) trusts every local process, so it must not serve a
/// web page the user happens to visit:
/// - DNS rebinding: a page on `evil.example` whose name now points at 127.0.0.1 reads
///   `GET /v1/emails` as same-origin; it sends `Host: evil.example`, so only loopback hosts
///   are served;
/// - cross-site requests: a page may POST here (a no-cors fetch needs no preflight); browsers
///   say where a request comes from in `Sec-Fetch-Site` and `Origin`, so requests another
///   site started are refused. Programs (curl, SDKs) send neither header.
async fn open_guard(req: Request, next: Next) -> Response {
    let h = req.headers();
    let text = |name: &str| h.get(name).map(|v| v.to_str().unwrap_or("\u{0}"));
    let host = text("host");
    if let Some(host) = host
        && !loopback_authority(host)
    {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "without an API token postbox answers only requests addressed to localhost, \
             127.0.0.1 or [::1] (configure api.token to serve other names)",
        )
        .field("Host")
        .into_response();
    }
    let cross_site = match (text("sec-fetch-site"), text("origin")) {
        (Some(site), _) if !matches!(site, "same-origin" | "none") => true,
        (_, Some(origin)) => {
            let origin_host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            origin_host.is_none_or(|o| Some(o) != host || !loopback_authority(o))
        }
        _ => false,
    };
    if cross_site {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site_request",
            "requests started by another web site are refused (no API token is configured)",
        )
        .field("Origin")
        .into_response();
    }
    next.run(req).await
}

/// The method as a metrics label: a fixed set, so a client cannot mint new series by sending
/// made-up methods.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Request id, span, panic guard and the `x-request-id` header, for every request.
async fn request_context(req: Request, next: Next) -> Response {
    let id = incoming_request_id(&req).unwrap_or_else(|| ulid::Ulid::generate().to_string());
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let method = method_label(req.method());
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(),
        path = %req.uri().path(), token = tracing::field::Empty);
    let started = Instant::now();
    let run = REQUEST_ID.scope(id.clone(), AssertUnwindSafe(next.run(req)).catch_unwind());
    let mut res = match run.instrument(span.clone()).await {
        Ok(res) => res,
        Err(panic) => {
            let what = crate::telemetry::panic_message(&*panic, "a handler panicked");
            let _g = span.enter();
            REQUEST_ID.sync_scope(id.clone(), || {
                ApiError::internal(format!("panic: {what}")).into_response()
            })
        }
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    tracing::debug!(parent: &span, status = res.status().as_u16(),
        micros = started.elapsed().as_micros() as u64, "request done");
    metrics::counter!("postbox_http_requests_total", "method" => method,
        "route" => route.clone(), "status" => res.status().as_u16().to_string())
    .increment(1);
    metrics::histogram!("postbox_http_request_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    res
}

/// Serves the API on `listener` until `shutdown`; in-flight requests finish first.
pub async fn serve(
    postbox: Postbox,
    api: &ApiSettings,
    tokens: &[ResolvedToken],
    listener: tokio::net::TcpListener,
    expect_workers: bool,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let (router, _, state) = build(postbox, api, tokens, expect_workers)?;
    tokio::spawn(state.sessions.clone().sweeper(shutdown.clone()));
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "HTTP API listening");
    let limits = server::Limits {
        max_connections: api.max_connections,
        header_timeout: std::time::Duration::from_secs(api.header_timeout_secs),
    };
    server::run(router, listener, limits, shutdown).await;
    Ok(())
}

/// Binds `api.listen`, refusing a non-loopback address when no token is configured.
pub async fn bind(
    api: &ApiSettings,
    tokens: &[ResolvedToken],
) -> anyhow::Result<tokio::net::TcpListener> {
    let addr: SocketAddr = api.exposed_addr(tokens)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (api.listen): {e}"))?;
    Ok(listener)
}
