//! The dashboard at `/ui`: server-rendered askama HTML, no scripts, no external assets.
//!
//! Login with an API token gives a session cookie (HttpOnly, SameSite=Strict, Path=/ui, Secure
//! when the request came through TLS per `X-Forwarded-Proto: https`). Sessions live in this
//! process's memory for 12 hours. Every form carries the session's CSRF token; a POST without
//! the right one is refused with 403 and changes nothing. When the API has no token configured
//! (loopback only), the dashboard is open too, but forms still need the CSRF token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use askama::Template;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::ApiState;
use crate::domain::{EmailId, EmailStatus};
use crate::store::{EmailReport, EmailSummary, ListFilter, MailboxStatus, Stats};

const COOKIE: &str = "postbox_session";
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// Dashboard sessions of this process.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

#[derive(Clone)]
struct Session {
    /// The API token's name that logged in.
    who: String,
    csrf: String,
    expires: Instant,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::fill(&mut b[..]);
    hex::encode(b)
}

impl Sessions {
    fn create(&self, who: String) -> (String, Session) {
        let id = random_hex(32);
        let s = Session {
            who,
            csrf: random_hex(32),
            expires: Instant::now() + SESSION_TTL,
        };
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, v| v.expires > now);
        map.insert(id.clone(), s.clone());
        (id, s)
    }

    fn get(&self, id: &str) -> Option<Session> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).filter(|s| s.expires > Instant::now()).cloned()
    }

    fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// Largest dashboard form body (a CSRF token, a path, a login token).
const FORM_MAX_BYTES: usize = 16 * 1024;

/// A dashboard form (`application/x-www-form-urlencoded`): at most [`FORM_MAX_BYTES`], read
/// within `api.body_timeout_secs`.
struct UiForm<T>(T);

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
        let deadline = Duration::from_secs(st.postbox.settings().api.body_timeout_secs);
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

pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/ui", get(overview))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/emails", get(emails))
        .route("/ui/emails/{id}", get(email))
        .route("/ui/emails/{id}/{action}", post(act))
        .route("/ui/dead", get(dead_letters))
        .route("/ui/mailboxes", get(mailboxes))
}

fn session_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == COOKIE).then(|| v.to_string())
        })
}

/// Why a dashboard request is turned away.
enum Refused {
    /// No (live) session: to the login page.
    Login,
    /// A form without the session's CSRF token.
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

/// The caller's session, or a redirect to the login page.
fn require(st: &ApiState, headers: &HeaderMap) -> Result<Session, Refused> {
    session_id(headers)
        .and_then(|id| st.sessions.get(&id))
        .ok_or(Refused::Login)
}

fn page<T: Template>(t: T) -> Response {
    match t.render() {
        Ok(html) => (
            [
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            Html(html),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "dashboard template failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "template error; see the log").into_response()
        }
    }
}

/// What every page's layout needs.
struct Nav {
    active: &'static str,
    csrf: String,
    who: String,
    notice: Option<String>,
    problem: Option<String>,
}

#[derive(Deserialize, Default)]
struct Flash {
    done: Option<String>,
    error: Option<String>,
}

fn nav(active: &'static str, s: &Session, flash: &Flash) -> Nav {
    Nav {
        active,
        csrf: s.csrf.clone(),
        who: s.who.clone(),
        notice: flash.done.clone(),
        problem: flash.error.clone(),
    }
}

fn when(t: time::OffsetDateTime) -> String {
    crate::inbound::rfc3339(t)
        .replace('T', " ")
        .replace('Z', " UTC")
}

fn when_opt(t: Option<time::OffsetDateTime>) -> String {
    t.map(when).unwrap_or_else(|| "-".into())
}

// ---- login -------------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "ui/login.html")]
struct LoginPage {
    problem: Option<String>,
}

async fn login_form(State(st): State<ApiState>, headers: HeaderMap) -> Response {
    if session_id(&headers)
        .and_then(|id| st.sessions.get(&id))
        .is_some()
    {
        return Redirect::to("/ui").into_response();
    }
    if st.tokens.is_open() {
        return start_session(&st, &headers, "anonymous".into());
    }
    page(LoginPage { problem: None })
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(st): State<ApiState>,
    headers: HeaderMap,
    UiForm(f): UiForm<LoginForm>,
) -> Response {
    let who = if st.tokens.is_open() {
        Some("anonymous".to_string())
    } else {
        st.tokens.name_of(f.token.trim())
    };
    match who {
        Some(who) => {
            tracing::info!(token = %who, "dashboard login");
            start_session(&st, &headers, who)
        }
        None => {
            tracing::warn!("dashboard login with a wrong token");
            let mut r = page(LoginPage {
                problem: Some("That token is not valid.".into()),
            });
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r
        }
    }
}

fn start_session(st: &ApiState, headers: &HeaderMap, who: String) -> Response {
    let (id, _) = st.sessions.create(who);
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    let mut r = Redirect::to("/ui").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    back: String,
}

fn check_csrf(s: &Session, given: &str) -> Result<(), Refused> {
    if !given.is_empty() && bool::from(s.csrf.as_bytes().ct_eq(given.as_bytes())) {
        Ok(())
    } else {
        tracing::warn!(token = %s.who, "dashboard form without a valid CSRF token refused");
        Err(Refused::Csrf)
    }
}

async fn logout(
    State(st): State<ApiState>,
    headers: HeaderMap,
    UiForm(f): UiForm<CsrfForm>,
) -> Response {
    let s = match require(&st, &headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = check_csrf(&s, &f.csrf) {
        return r.into_response();
    }
    if let Some(id) = session_id(&headers) {
        st.sessions.remove(&id);
    }
    let mut r = Redirect::to("/ui/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "postbox_session=; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0",
        ),
    );
    r
}

// ---- overview ----------------------------------------------------------------------------

struct Bar {
    x: u32,
    sent_y: u32,
    sent_h: u32,
    failed_y: u32,
    failed_h: u32,
    title: String,
}

#[derive(Template)]
#[template(path = "ui/overview.html")]
struct OverviewPage {
    nav: Nav,
    stats: Stats,
    depth_rows: Vec<(String, u64, u64, u64, u64)>,
    bars: Vec<Bar>,
    peak: u64,
    recent_failures: Vec<Row>,
}

/// One email in a table.
struct Row {
    id: String,
    status: String,
    priority: String,
    subject: String,
    recipients: String,
    attempts: u32,
    updated: String,
    last_error: String,
}

impl From<&EmailSummary> for Row {
    fn from(e: &EmailSummary) -> Row {
        Row {
            id: e.id.to_string(),
            status: e.status.as_str().to_string(),
            priority: e.priority.as_str().to_string(),
            subject: e
                .subject
                .clone()
                .or_else(|| e.template.as_ref().map(|t| format!("({t} template)")))
                .unwrap_or_default(),
            recipients: e.recipients.join(", "),
            attempts: e.attempts,
            updated: when(e.updated_at),
            last_error: e.last_error.clone().unwrap_or_default(),
        }
    }
}

const CHART_MINUTES: u32 = 30;
const CHART_H: u32 = 120;

async fn overview(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(flash): Query<Flash>,
) -> Response {
    let s = match require(&st, &headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let pb = &st.postbox;
    let failed = ListFilter {
        status: Some(EmailStatus::Failed),
        limit: 10,
        ..Default::default()
    };
    let (stats, minutes, failures) =
        match tokio::try_join!(pb.stats(), pb.throughput(CHART_MINUTES), pb.list(&failed)) {
            Ok(v) => v,
            Err(e) => return store_error(e),
        };
    let depth_rows = ["queued", "retrying", "sending"]
        .iter()
        .map(|state| {
            let (h, n, l) = stats.depth_of(state);
            (state.to_string(), h, n, l, h + n + l)
        })
        .collect();
    let peak = minutes
        .iter()
        .map(|m| m.sent + m.failed)
        .max()
        .unwrap_or(0)
        .max(1);
    let scale = |n: u64| ((n as f64 / peak as f64) * f64::from(CHART_H)).round() as u32;
    let bars = minutes
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let (sh, fh) = (scale(m.sent), scale(m.failed));
            Bar {
                x: i as u32 * 20,
                sent_y: CHART_H - sh,
                sent_h: sh,
                failed_y: CHART_H - sh - fh,
                failed_h: fh,
                title: format!("{}: {} sent, {} failed", when(m.minute), m.sent, m.failed),
            }
        })
        .collect();
    page(OverviewPage {
        nav: nav("overview", &s, &flash),
        stats,
        depth_rows,
        bars,
        peak,
        recent_failures: failures.emails.iter().map(Row::from).collect(),
    })
}

fn store_error(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "dashboard could not read the store");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Html("<h1>503</h1><p>The database did not answer; see the log.</p>"),
    )
        .into_response()
}

// ---- emails ------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct EmailQuery {
    #[serde(default)]
    status: String,
    #[serde(default)]
    tag: String,
    /// A recipient address or an email id.
    #[serde(default)]
    q: String,
    #[serde(default)]
    before: String,
    #[serde(flatten)]
    flash: Flash,
}

#[derive(Template)]
#[template(path = "ui/emails.html")]
struct EmailsPage {
    nav: Nav,
    title: &'static str,
    action: &'static str,
    status: String,
    tag: String,
    q: String,
    statuses: Vec<&'static str>,
    rows: Vec<Row>,
    /// The next page's URL.
    next: Option<String>,
    dead: bool,
}

async fn emails(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<EmailQuery>,
) -> Response {
    list_page(st, headers, q, false).await
}

async fn dead_letters(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(mut q): Query<EmailQuery>,
) -> Response {
    q.status = "failed".into();
    list_page(st, headers, q, true).await
}

async fn list_page(st: ApiState, headers: HeaderMap, q: EmailQuery, dead: bool) -> Response {
    let s = match require(&st, &headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let query = q.q.trim().to_string();
    // An id jumps straight to the email.
    if let Ok(id) = EmailId::parse(&query) {
        return Redirect::to(&format!("/ui/emails/{id}")).into_response();
    }
    let filter = ListFilter {
        status: EmailStatus::parse(q.status.trim()),
        tag: Some(q.tag.trim().to_string()).filter(|t| !t.is_empty()),
        recipient: Some(query.clone()).filter(|t| !t.is_empty()),
        before_id: EmailId::parse(&q.before).ok(),
        limit: 50,
        ..Default::default()
    };
    let list = match st.postbox.list(&filter).await {
        Ok(l) => l,
        Err(e) => return store_error(e),
    };
    let (active, title, action) = if dead {
        ("dead", "Dead letters", "/ui/dead")
    } else {
        ("emails", "Emails", "/ui/emails")
    };
    page(EmailsPage {
        nav: nav(active, &s, &q.flash),
        title,
        action,
        status: q.status.clone(),
        tag: q.tag.clone(),
        q: query.clone(),
        statuses: vec![
            "queued",
            "sending",
            "retrying",
            "sent",
            "failed",
            "cancelled",
            "expired",
        ],
        rows: list.emails.iter().map(Row::from).collect(),
        next: list.next_cursor.map(|c| {
            let qs = serde_urlencoded::to_string([
                ("status", q.status.as_str()),
                ("tag", q.tag.as_str()),
                ("q", query.as_str()),
                ("before", c.as_str()),
            ])
            .unwrap_or_default();
            format!("{action}?{qs}")
        }),
        dead,
    })
}

#[derive(Template)]
#[template(path = "ui/email.html")]
struct EmailPage {
    nav: Nav,
    r: EmailReport,
    created: String,
    updated: String,
    sent: String,
    next_attempt: String,
    timeline: Vec<(String, crate::store::TimelineEntry)>,
    can_retry: bool,
    can_cancel: bool,
    preview: Option<crate::render::Rendered>,
    preview_error: Option<String>,
}

async fn email(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
) -> Response {
    let s = match require(&st, &headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let Ok(id) = EmailId::parse(&id) else {
        return (
            StatusCode::NOT_FOUND,
            Html("<h1>404</h1><p>Not an email id.</p>"),
        )
            .into_response();
    };
    let (report, preview) = match tokio::try_join!(st.postbox.status(&id), st.postbox.preview(&id))
    {
        Ok(v) => v,
        Err(e) => return store_error(e),
    };
    let Some(r) = report else {
        return (
            StatusCode::NOT_FOUND,
            Html("<h1>404</h1><p>No such email.</p>"),
        )
            .into_response();
    };
    let (preview, preview_error) = match preview {
        Some(Ok(p)) => (Some(p), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    page(EmailPage {
        nav: nav("emails", &s, &flash),
        created: when(r.created_at),
        updated: when(r.updated_at),
        sent: when_opt(r.sent_at),
        next_attempt: when_opt(r.next_attempt_at),
        timeline: r.timeline.iter().map(|t| (when(t.at), t.clone())).collect(),
        can_retry: r.status == EmailStatus::Failed,
        can_cancel: matches!(
            r.status,
            EmailStatus::Queued | EmailStatus::Retrying | EmailStatus::Failed
        ),
        preview,
        preview_error,
        r,
    })
}

/// `POST /ui/emails/{id}/retry` or `/cancel`.
async fn act(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    UiForm(f): UiForm<CsrfForm>,
) -> Response {
    match action.as_str() {
        "retry" => transition(st, headers, id, f, false).await,
        "cancel" => transition(st, headers, id, f, true).await,
        _ => (StatusCode::NOT_FOUND, Html("<h1>404</h1>")).into_response(),
    }
}

async fn transition(
    st: ApiState,
    headers: HeaderMap,
    id: String,
    f: CsrfForm,
    cancel: bool,
) -> Response {
    let s = match require(&st, &headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = check_csrf(&s, &f.csrf) {
        return r.into_response();
    }
    let Ok(id) = EmailId::parse(&id) else {
        return (StatusCode::NOT_FOUND, Html("<h1>404</h1>")).into_response();
    };
    let origin = format!("dashboard, token {}", s.who);
    let res = if cancel {
        st.postbox.cancel_from(&id, &origin).await
    } else {
        st.postbox.retry_from(&id, &origin).await
    };
    // Back to where the button was (only dashboard pages), with the outcome.
    let back = if f.back.starts_with("/ui") && !f.back.contains("//") {
        f.back.split('?').next().unwrap_or("/ui").to_string()
    } else {
        format!("/ui/emails/{id}")
    };
    let flash = match res {
        Ok(()) => {
            tracing::info!(email_id = %id, token = %s.who, cancel, "dashboard action");
            (
                "done",
                if cancel {
                    format!("{id} cancelled")
                } else {
                    format!("{id} re-queued")
                },
            )
        }
        Err(e) => ("error", e.to_string()),
    };
    let qs = serde_urlencoded::to_string([flash]).unwrap_or_default();
    Redirect::to(&format!("{back}?{qs}")).into_response()
}

// ---- mailboxes ---------------------------------------------------------------------------

struct MailboxView {
    m: MailboxStatus,
    connected_since: String,
    down_since: String,
    last_poll: String,
    rules: Vec<(crate::store::RuleStatus, String)>,
    recent: Vec<Row>,
}

#[derive(Template)]
#[template(path = "ui/mailboxes.html")]
struct MailboxesPage {
    nav: Nav,
    mailboxes: Vec<MailboxView>,
}

async fn mailboxes(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Query(flash): Query<Flash>,
) -> Response {
    let s = match require(&st, &headers) {
        Ok(s) => s,
        Err(r) => return r.into_response(),
    };
    let list = match st.postbox.mailboxes().await {
        Ok(l) => l,
        Err(e) => return store_error(e),
    };
    let mut views = Vec::new();
    for m in list {
        let recent = match st
            .postbox
            .list(&ListFilter {
                tag: Some(format!("mailbox:{}", m.name)),
                limit: 5,
                ..Default::default()
            })
            .await
        {
            Ok(p) => p.emails.iter().map(Row::from).collect(),
            Err(e) => return store_error(e),
        };
        views.push(MailboxView {
            connected_since: when_opt(m.connected_since),
            down_since: when_opt(m.down_since),
            last_poll: when_opt(m.last_poll_at),
            rules: m
                .rules
                .iter()
                .map(|r| (r.clone(), when_opt(r.last_alert_at)))
                .collect(),
            recent,
            m,
        });
    }
    page(MailboxesPage {
        nav: nav("mailboxes", &s, &flash),
        mailboxes: views,
    })
}
