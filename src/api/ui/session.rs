//! Dashboard sessions: login with an API token, the session cookie, CSRF tokens, flash
//! messages, and the [`Authed`] extractor every page and form handler takes.
//!
//! - A session lives in the database for [`SESSION_TTL`] (`postbox_sessions`, keyed by the
//!   SHA-256 of its id), so every API process on the database sees it: behind a load balancer
//!   no sticky sessions are needed. A sweeper deletes expired ones every minute; at most
//!   [`MAX_SESSIONS`] exist (a login past it deletes those closest to expiry).
//!   tower-sessions' sqlx store was the candidate, but it is built on sqlx 0.8 and postbox on
//!   sqlx 0.9 (apalis 1.0's): two libsqlite3-sys cannot link into one binary, and a custom
//!   tower-sessions store would be this same table plus the crate.
//! - The cookie is HttpOnly, SameSite=Strict, scoped to `/ui`, and Secure when the request came
//!   through TLS (`X-Forwarded-Proto: https`).
//! - Every form carries the session's CSRF token; the login form (no session yet) carries a
//!   token that must match a short-lived `postbox_login` cookie (double submit), so another
//!   site cannot log a browser in.
//! - Failed logins count against the client's address ([`super::super::auth::FailedLogins`]):
//!   past the limit, logins from it are refused for the rest of the window.
//! - Flash messages ("re-queued", "cannot retry: ...") live in the session, shown once.

use std::time::Duration;

use askama::Template;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::super::ApiState;
use super::super::auth::client_ip;
use super::page;
use crate::Shutdown;
use crate::store::{Store, StoreError};

const COOKIE: &str = "postbox_session";
/// The login form's double-submit cookie.
const LOGIN_COOKIE: &str = "postbox_login";
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most, across every process (a login past it deletes the sessions closest
/// to expiry): an open-mode API starts one per visit of the login page.
pub const MAX_SESSIONS: usize = 10_000;
/// How often expired sessions are removed.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Largest dashboard form body (a CSRF token, a path, a login token).
const FORM_MAX_BYTES: usize = 16 * 1024;

/// A message for the next page the session sees.
#[derive(Debug, Clone)]
pub enum Flash {
    Done(String),
    Problem(String),
}

impl Flash {
    fn parts(&self) -> (&'static str, &str) {
        match self {
            Flash::Done(m) => ("done", m),
            Flash::Problem(m) => ("problem", m),
        }
    }

    fn from_parts(kind: &str, text: String) -> Flash {
        match kind {
            "done" => Flash::Done(text),
            _ => Flash::Problem(text),
        }
    }
}

#[derive(Clone)]
pub struct Session {
    /// The API token's name that logged in.
    pub who: String,
    pub csrf: String,
}

/// Dashboard sessions, in the database every API process shares.
pub struct Sessions {
    store: Store,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

/// What the database keys a session by: its id's SHA-256.
fn id_hash(id: &str) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(id.as_bytes()))
}

impl Sessions {
    pub fn new(store: Store) -> Sessions {
        Sessions { store }
    }

    /// A new session for `who`; its id.
    pub async fn create(&self, who: &str) -> Result<String, StoreError> {
        let id = random_hex(32);
        let expires = time::OffsetDateTime::now_utc() + SESSION_TTL;
        self.store
            .session_create(&id_hash(&id), who, &random_hex(32), expires, MAX_SESSIONS)
            .await?;
        Ok(id)
    }

    /// The live session `id`, taking its flash message.
    async fn take(&self, id: &str) -> Result<Option<(Session, Option<Flash>)>, StoreError> {
        Ok(self.store.session_take(&id_hash(id)).await?.map(|s| {
            let flash = s.flash.map(|(k, t)| Flash::from_parts(&k, t));
            (
                Session {
                    who: s.who,
                    csrf: s.csrf,
                },
                flash,
            )
        }))
    }

    pub async fn set_flash(&self, id: &str, flash: Flash) {
        let (kind, text) = flash.parts();
        if let Err(e) = self.store.session_flash(&id_hash(id), kind, text).await {
            tracing::warn!(error = %e, "cannot keep the dashboard's message for the next page");
        }
    }

    async fn remove(&self, id: &str) -> Result<(), StoreError> {
        self.store.session_delete(&id_hash(id)).await
    }

    /// Deletes expired sessions every [`SWEEP_EVERY`] until `shutdown`.
    pub async fn sweeper(self: std::sync::Arc<Self>, shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = shutdown.clone() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => {
                    if let Err(e) = self.store.sessions_sweep().await {
                        tracing::warn!(error = %e, "cannot delete expired dashboard sessions; will try again");
                    }
                }
            }
        }
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

/// Why a dashboard request is turned away.
pub enum Refused {
    /// No (live) session: to the login page.
    Login,
    /// A form without the right CSRF token.
    Csrf,
    /// The database did not answer.
    Unavailable,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Login => Redirect::to("/ui/login").into_response(),
            Refused::Csrf => (
                StatusCode::FORBIDDEN,
                Html("<h1>403</h1><p>This form is missing its CSRF token or it is stale. Reload the page and try again.</p>"),
            )
                .into_response(),
            Refused::Unavailable => unavailable(),
        }
    }
}

/// The page for a dashboard request the database could not serve.
fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5")],
        Html("<h1>503</h1><p>The database is not answering; try again in a moment.</p>"),
    )
        .into_response()
}

/// A request with a live session: what every dashboard handler takes (no session: a redirect
/// to the login page). Holds the flash message the session had, taken now.
pub struct Authed {
    pub id: String,
    pub session: Session,
    pub flash: Option<Flash>,
}

impl FromRequestParts<ApiState> for Authed {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, st: &ApiState) -> Result<Self, Refused> {
        let id = cookie(&parts.headers, COOKIE).ok_or(Refused::Login)?;
        let (session, flash) = st
            .sessions
            .take(&id)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot read the dashboard session");
                Refused::Unavailable
            })?
            .ok_or(Refused::Login)?;
        Ok(Authed { id, session, flash })
    }
}

impl Authed {
    /// Checks a form's CSRF token (constant time).
    pub fn check_csrf(&self, given: &str) -> Result<(), Refused> {
        if !given.is_empty() && bool::from(self.session.csrf.as_bytes().ct_eq(given.as_bytes())) {
            Ok(())
        } else {
            tracing::warn!(token = %self.session.who, "dashboard form without a valid CSRF token refused");
            Err(Refused::Csrf)
        }
    }
}

/// A dashboard form (`application/x-www-form-urlencoded`): at most [`FORM_MAX_BYTES`], read
/// within `api.body_timeout_secs`.
pub struct UiForm<T>(pub T);

impl<T: serde::de::DeserializeOwned> axum::extract::FromRequest<ApiState> for UiForm<T> {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, st: &ApiState) -> Result<Self, Response> {
        let refuse = |status: StatusCode, what: &str| {
            (
                status,
                Html(format!("<h1>{}</h1><p>{what}</p>", status.as_u16())),
            )
                .into_response()
        };
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !form {
            return Err(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Expected a form post.",
            ));
        }
        let deadline = Duration::from_secs(st.settings.body_timeout_secs);
        let body = axum::body::to_bytes(req.into_body(), FORM_MAX_BYTES);
        let bytes = match tokio::time::timeout(deadline, body).await {
            Err(_) => {
                return Err(refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    "The form did not arrive in time.",
                ));
            }
            Ok(Err(_)) => {
                return Err(refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "The form is too large.",
                ));
            }
            Ok(Ok(b)) => b,
        };
        serde_urlencoded::from_bytes(&bytes)
            .map(UiForm)
            .map_err(|_| refuse(StatusCode::BAD_REQUEST, "The form could not be read."))
    }
}

/// A form that only proves it came from a dashboard page.
#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
    #[serde(default)]
    pub back: String,
}

// ---- login and logout ----------------------------------------------------------------------

#[derive(Template)]
#[template(path = "ui/login.html")]
struct LoginPage {
    problem: Option<String>,
    csrf: String,
}

fn secure(headers: &HeaderMap) -> &'static str {
    let tls = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    if tls { "; Secure" } else { "" }
}

fn with_cookie(mut r: Response, cookie: String) -> Response {
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

/// The login page with a fresh login CSRF token (in the page and in its cookie).
fn login_page(headers: &HeaderMap, status: StatusCode, problem: Option<String>) -> Response {
    let csrf = random_hex(32);
    let mut r = page(LoginPage {
        problem,
        csrf: csrf.clone(),
    });
    *r.status_mut() = status;
    with_cookie(
        r,
        format!(
            "{LOGIN_COOKIE}={csrf}; HttpOnly; SameSite=Strict; Path=/ui/login; Max-Age=3600{}",
            secure(headers)
        ),
    )
}

pub async fn login_form(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE)
        && let Ok(Some(_)) = st.sessions.take(&id).await
    {
        return Redirect::to("/ui").into_response();
    }
    if st.tokens.is_open() {
        return start_session(&st, &headers, "anonymous").await;
    }
    login_page(&headers, StatusCode::OK, None)
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

pub async fn login(
    State(st): State<ApiState>,
    parts: Parts,
    UiForm(f): UiForm<LoginForm>,
) -> Response {
    let headers = &parts.headers;
    let ip = client_ip(&parts);
    if let Some(wait) = st.logins.blocked(ip) {
        tracing::warn!(client = %ip, "dashboard login refused: too many failed logins");
        let mut r = login_page(
            headers,
            StatusCode::TOO_MANY_REQUESTS,
            Some(format!(
                "Too many failed logins from this address; try again in {} minutes.",
                wait.as_secs().div_ceil(60)
            )),
        );
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs().max(1)),
        );
        return r;
    }
    let expected = cookie(headers, LOGIN_COOKIE).unwrap_or_default();
    if expected.is_empty() || !bool::from(expected.as_bytes().ct_eq(f.csrf.as_bytes())) {
        tracing::warn!("dashboard login without the login form's CSRF token refused");
        return login_page(
            headers,
            StatusCode::FORBIDDEN,
            Some("The login form expired; please log in again.".into()),
        );
    }
    let who = if st.tokens.is_open() {
        Some("anonymous".to_string())
    } else {
        st.tokens.name_of(f.token.trim())
    };
    match who {
        Some(who) => {
            st.logins.clear(ip);
            tracing::info!(token = %who, "dashboard login");
            start_session(&st, headers, &who).await
        }
        None => {
            st.logins.fail(ip);
            tracing::warn!(client = %ip, "dashboard login with a wrong token");
            login_page(
                headers,
                StatusCode::UNAUTHORIZED,
                Some("That token is not valid.".into()),
            )
        }
    }
}

async fn start_session(st: &ApiState, headers: &HeaderMap, who: &str) -> Response {
    let id = match st.sessions.create(who).await {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %e, "cannot store a dashboard session");
            return unavailable();
        }
    };
    let r = with_cookie(
        Redirect::to("/ui").into_response(),
        format!(
            "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={}{}",
            SESSION_TTL.as_secs(),
            secure(headers)
        ),
    );
    // The login form's token is spent.
    with_cookie(
        r,
        format!("{LOGIN_COOKIE}=; HttpOnly; SameSite=Strict; Path=/ui/login; Max-Age=0"),
    )
}

pub async fn logout(
    State(st): State<ApiState>,
    me: Authed,
    UiForm(f): UiForm<CsrfForm>,
) -> Response {
    if let Err(r) = me.check_csrf(&f.csrf) {
        return r.into_response();
    }
    if let Err(e) = st.sessions.remove(&me.id).await {
        tracing::warn!(error = %e, "cannot delete a dashboard session");
        return unavailable();
    }
    with_cookie(
        Redirect::to("/ui/login").into_response(),
        format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0"),
    )
}
