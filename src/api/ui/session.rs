//! Dashboard sessions: login with an API token, the session cookie, CSRF tokens, flash
//! messages, and the [`Authed`] extractor every page and form handler takes.
//!
//! - A session lives in this process's memory for [`SESSION_TTL`]; at most [`MAX_SESSIONS`]
//!   exist (a login past the cap evicts the session closest to expiry), and a sweeper removes
//!   expired ones every minute.
//! - The cookie is HttpOnly, SameSite=Strict, scoped to `/ui`, and Secure when the request came
//!   through TLS (`X-Forwarded-Proto: https`).
//! - Every form carries the session's CSRF token; the login form (no session yet) carries a
//!   token that must match a short-lived `postbox_login` cookie (double submit), so another
//!   site cannot log a browser in.
//! - Failed logins count against the client's address ([`super::super::auth::FailedLogins`]):
//!   past the limit, logins from it are refused for the rest of the window.
//! - Flash messages ("re-queued", "cannot retry: ...") live in the session, shown once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

const COOKIE: &str = "postbox_session";
/// The login form's double-submit cookie.
const LOGIN_COOKIE: &str = "postbox_login";
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (a login past it evicts the session closest to expiry).
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

#[derive(Clone)]
pub struct Session {
    /// The API token's name that logged in.
    pub who: String,
    pub csrf: String,
    expires: Instant,
    flash: Option<Flash>,
}

/// Dashboard sessions of this process.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session for `who`; its id.
    pub fn create(&self, who: String) -> String {
        let id = random_hex(32);
        let s = Session {
            who,
            csrf: random_hex(32),
            expires: Instant::now() + SESSION_TTL,
            flash: None,
        };
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            let now = Instant::now();
            map.retain(|_, v| v.expires > now);
            while map.len() >= MAX_SESSIONS {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, v)| v.expires)
                    .map(|(k, _)| k.clone())
                    .expect("the map is not empty");
                map.remove(&oldest);
            }
        }
        map.insert(id.clone(), s);
        id
    }

    /// The live session `id`, taking its flash message.
    fn take(&self, id: &str) -> Option<(Session, Option<Flash>)> {
        let mut map = self.lock();
        let s = map.get_mut(id).filter(|s| s.expires > Instant::now())?;
        let flash = s.flash.take();
        Some((s.clone(), flash))
    }

    pub fn set_flash(&self, id: &str, flash: Flash) {
        if let Some(s) = self.lock().get_mut(id) {
            s.flash = Some(flash);
        }
    }

    fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Removes expired sessions; how many are left.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, v| v.expires > now);
        map.len()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Sweeps every [`SWEEP_EVERY`] until `shutdown`.
    pub async fn sweeper(self: std::sync::Arc<Self>, shutdown: Shutdown) {
        loop {
            tokio::select! {
                _ = shutdown.clone() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => { self.sweep(); }
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
        }
    }
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
        let (session, flash) = st.sessions.take(&id).ok_or(Refused::Login)?;
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
    if cookie(&headers, COOKIE)
        .and_then(|id| st.sessions.take(&id))
        .is_some()
    {
        return Redirect::to("/ui").into_response();
    }
    if st.tokens.is_open() {
        return start_session(&st, &headers, "anonymous".into());
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
            start_session(&st, headers, who)
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

fn start_session(st: &ApiState, headers: &HeaderMap, who: String) -> Response {
    let id = st.sessions.create(who);
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
    st.sessions.remove(&me.id);
    with_cookie(
        Redirect::to("/ui/login").into_response(),
        format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_capped_and_swept() {
        let s = Sessions::default();
        let first = s.create("a".into());
        for _ in 1..MAX_SESSIONS {
            s.create("b".into());
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        // One more evicts the session closest to expiry: the first.
        let newest = s.create("c".into());
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.take(&first).is_none());
        assert!(s.take(&newest).is_some());
        // Expired ones go at the next sweep.
        s.lock()
            .values_mut()
            .for_each(|v| v.expires = Instant::now());
        assert_eq!(s.sweep(), 0);
    }

    #[test]
    fn a_flash_message_is_shown_once() {
        let s = Sessions::default();
        let id = s.create("a".into());
        s.set_flash(&id, Flash::Done("re-queued".into()));
        assert!(matches!(s.take(&id), Some((_, Some(Flash::Done(m)))) if m == "re-queued"));
        assert!(matches!(s.take(&id), Some((_, None))));
    }
}
