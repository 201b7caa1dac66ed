//! The dashboard at `/ui`: server-rendered askama HTML, no scripts, no external assets.
//!
//! The pages (handlers) are here; `views.rs` holds their templates and `session.rs` login,
//! sessions, CSRF and flash messages. Every handler here takes an
//! [`Authed`] (no session: a redirect to the login page). When the API has no token configured
//! (loopback only), the dashboard is open too, but forms still need the CSRF token.

mod session;
mod views;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

pub use session::Sessions;
use session::{Authed, CsrfForm, Flash, UiForm};

use super::ApiState;
use crate::domain::{EmailId, EmailStatus};
use crate::store::ListFilter;
use views::*;

pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/ui", get(overview))
        .route("/ui/login", get(session::login_form).post(session::login))
        .route("/ui/logout", post(session::logout))
        .route("/ui/emails", get(emails))
        .route("/ui/emails/{id}", get(email))
        .route("/ui/emails/{id}/{action}", post(act))
        .route("/ui/dead", get(dead_letters))
        .route("/ui/mailboxes", get(mailboxes))
        .route("/ui/webhooks", get(webhooks))
        .route("/ui/suppressions", get(suppressions))
        .route("/ui/suppressions/remove", post(unsuppress))
        .route("/ui/relays", get(relays))
        .route("/ui/relays/pause", post(pause))
        .route("/ui/relays/resume", post(resume))
        .route("/ui/relays/bulk", post(bulk))
        .route("/ui/webhooks/{name}/enable", post(enable_webhook))
        .route(
            "/ui/webhooks/{name}/deliveries/{id}/redeliver",
            post(redeliver),
        )
        .route(
            "/ui/webhooks/{name}/events/redeliver",
            post(redeliver_event),
        )
}

// ---- overview ----------------------------------------------------------------------------

const CHART_MINUTES: u32 = 30;
const CHART_H: u32 = 120;

async fn overview(State(st): State<ApiState>, me: Authed) -> Response {
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
        nav: nav("overview", &me),
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
}

async fn emails(State(st): State<ApiState>, me: Authed, Query(q): Query<EmailQuery>) -> Response {
    list_page(st, me, q, false).await
}

async fn dead_letters(
    State(st): State<ApiState>,
    me: Authed,
    Query(mut q): Query<EmailQuery>,
) -> Response {
    q.status = "failed".into();
    list_page(st, me, q, true).await
}

async fn list_page(st: ApiState, me: Authed, q: EmailQuery, dead: bool) -> Response {
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
        nav: nav(active, &me),
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

async fn email(State(st): State<ApiState>, me: Authed, Path(id): Path<String>) -> Response {
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
        nav: nav("emails", &me),
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
    me: Authed,
    Path((id, action)): Path<(String, String)>,
    UiForm(f): UiForm<CsrfForm>,
) -> Response {
    match action.as_str() {
        "retry" => transition(st, me, id, f, false).await,
        "cancel" => transition(st, me, id, f, true).await,
        _ => (StatusCode::NOT_FOUND, Html("<h1>404</h1>")).into_response(),
    }
}

async fn transition(st: ApiState, me: Authed, id: String, f: CsrfForm, cancel: bool) -> Response {
    if let Err(r) = me.check_csrf(&f.csrf) {
        return r.into_response();
    }
    let Ok(id) = EmailId::parse(&id) else {
        return (StatusCode::NOT_FOUND, Html("<h1>404</h1>")).into_response();
    };
    let origin = format!("dashboard, token {}", me.session.who);
    let res = if cancel {
        st.postbox.cancel_from(&id, &origin).await
    } else {
        st.postbox.retry_from(&id, &origin).await
    };
    // Back to where the button was (only dashboard pages); the outcome waits in the session.
    let back = if f.back.starts_with("/ui") && !f.back.contains("//") && !f.back.contains('\\') {
        f.back.clone()
    } else {
        format!("/ui/emails/{id}")
    };
    let flash = match res {
        Ok(()) => {
            tracing::info!(email_id = %id, token = %me.session.who, cancel, "dashboard action");
            Flash::Done(if cancel {
                format!("{id} cancelled")
            } else {
                format!("{id} re-queued")
            })
        }
        Err(e) => Flash::Problem(e.to_string()),
    };
    st.sessions.set_flash(&me.id, flash).await;
    Redirect::to(&back).into_response()
}

// ---- mailboxes ---------------------------------------------------------------------------

async fn mailboxes(State(st): State<ApiState>, me: Authed) -> Response {
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
        nav: nav("mailboxes", &me),
        mailboxes: views,
    })
}

// ---- webhooks ----------------------------------------------------------------------------

async fn webhooks(State(st): State<ApiState>, me: Authed) -> Response {
    let list = match st.postbox.webhooks().await {
        Ok(l) => l,
        Err(e) => return store_error(e),
    };
    let mut hooks = Vec::new();
    for w in list {
        let (lag, deliveries) = match (
            st.postbox.webhook_lag(&w.name).await,
            st.postbox.webhook_deliveries(&w.name, 20).await,
        ) {
            (Ok(l), Ok(d)) => (l, d),
            (Err(e), _) | (_, Err(e)) => return store_error(e),
        };
        let (n, more, secs) = lag;
        hooks.push(WebhookView {
            lag: match (n, more) {
                (0, _) => "none".to_string(),
                (n, false) => format!("{n}, the oldest waiting {secs:.1} s"),
                (n, true) => format!("more than {n}, the oldest waiting {secs:.1} s"),
            },
            failing_since: when_opt(w.failing_since),
            disabled_at: when_opt(w.disabled_at),
            deliveries: deliveries
                .into_iter()
                .map(|d| {
                    let at = when(d.updated_at);
                    (d, at)
                })
                .collect(),
            w,
        });
    }
    page(WebhooksPage {
        nav: nav("webhooks", &me),
        hooks,
    })
}

/// `POST /ui/webhooks/{name}/enable`.
async fn enable_webhook(
    State(st): State<ApiState>,
    me: Authed,
    Path(name): Path<String>,
    UiForm(f): UiForm<CsrfForm>,
) -> Response {
    if let Err(r) = me.check_csrf(&f.csrf) {
        return r.into_response();
    }
    let flash = match st.postbox.enable_webhook(&name).await {
        Ok(true) => {
            tracing::info!(webhook = %name, token = %me.session.who, "dashboard: webhook enabled");
            Flash::Done(format!("webhook {name} enabled"))
        }
        Ok(false) => Flash::Problem(format!("no webhook named {name}")),
        Err(e) => Flash::Problem(e.to_string()),
    };
    st.sessions.set_flash(&me.id, flash).await;
    Redirect::to("/ui/webhooks").into_response()
}

/// `POST /ui/webhooks/{name}/deliveries/{id}/redeliver`.
async fn redeliver(
    State(st): State<ApiState>,
    me: Authed,
    Path((name, id)): Path<(String, i64)>,
    UiForm(f): UiForm<CsrfForm>,
) -> Response {
    if let Err(r) = me.check_csrf(&f.csrf) {
        return r.into_response();
    }
    let flash = match st.postbox.redeliver(&name, id).await {
        Ok(true) => {
            tracing::info!(webhook = %name, delivery = id, token = %me.session.who, "dashboard: redeliver");
            Flash::Done(format!("delivery {id} of {name} will be sent again"))
        }
        Ok(false) => Flash::Problem(format!("no delivery {id} of webhook {name}")),
        Err(e) => Flash::Problem(e.to_string()),
    };
    st.sessions.set_flash(&me.id, flash).await;
    Redirect::to("/ui/webhooks").into_response()
}

#[derive(Debug, Deserialize)]
struct EventForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    event_id: String,
}

/// `POST /ui/webhooks/{name}/events/redeliver`: any event by its id, listed in the deliveries
/// or not (a first-try success in a busy round has no row: `store::events::logged`).
async fn redeliver_event(
    State(st): State<ApiState>,
    me: Authed,
    Path(name): Path<String>,
    UiForm(f): UiForm<EventForm>,
) -> Response {
    if let Err(r) = me.check_csrf(&f.csrf) {
        return r.into_response();
    }
    let flash = match crate::store::event_seq(f.event_id.trim()) {
        None => Flash::Problem("event id: not an event id (evt_ and a number)".into()),
        Some(seq) => match st.postbox.redeliver_event(&name, seq).await {
            Ok(true) => {
                tracing::info!(webhook = %name, event = seq, token = %me.session.who, "dashboard: redeliver event");
                Flash::Done(format!("event evt_{seq} will be sent to {name} again"))
            }
            Ok(false) => Flash::Problem(format!("no event evt_{seq} or no webhook {name}")),
            Err(e) => Flash::Problem(e.to_string()),
        },
    };
    st.sessions.set_flash(&me.id, flash).await;
    Redirect::to("/ui/webhooks").into_response()
}

// ---- suppressions ------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct SuppressionQuery {
    #[serde(default)]
    q: String,
}

async fn suppressions(
    State(st): State<ApiState>,
    me: Authed,
    Query(q): Query<SuppressionQuery>,
) -> Response {
    let q = q.q.trim().chars().take(254).collect::<String>();
    let filter = crate::store::SuppressionFilter {
        prefix: Some(q.clone()).filter(|p| !p.is_empty()),
        limit: 200,
        ..Default::default()
    };
    let (list, reports) = match (
        st.postbox.suppressions(&filter).await,
        st.postbox.bounce_reports(50).await,
    ) {
        (Ok(l), Ok(r)) => (l, r),
        (Err(e), _) | (_, Err(e)) => return store_error(e),
    };
    page(SuppressionsPage {
        nav: nav("suppressions", &me),
        q,
        rows: list
            .into_iter()
            .map(|s| {
                let at = when(s.created_at);
                (s, at)
            })
            .collect(),
        reports: reports
            .into_iter()
            .map(|r| {
                let at = when(r.created_at);
                (r, at)
            })
            .collect(),
    })
}

#[derive(Debug, Deserialize)]
struct RemoveForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    address: String,
}

/// `POST /ui/suppressions/remove`.
async fn unsuppress(
    State(st): State<ApiState>,
    me: Authed,
    UiForm(f): UiForm<RemoveForm>,
) -> Response {
    if let Err(r) = me.check_csrf(&f.csrf) {
        return r.into_response();
    }
    let flash = match st.postbox.unsuppress(&f.address).await {
        Ok(true) => {
            tracing::info!(token = %me.session.who, "dashboard: suppression removed");
            Flash::Done(format!("{} removed from the suppression list", f.address))
        }
        Ok(false) => Flash::Problem(format!("{} is not on the suppression list", f.address)),
        Err(e) => Flash::Problem(e.to_string()),
    };
    st.sessions.set_flash(&me.id, flash).await;
    Redirect::to("/ui/suppressions").into_response()
}

// ---- relays, pauses, bulk actions --------------------------------------------------------

async fn relays(State(st): State<ApiState>, me: Authed) -> Response {
    let r = match st.postbox.relays().await {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    let rate = |v: Option<f64>| v.map_or_else(|| "none".to_string(), |v| format!("{v:.2}/s"));
    page(RelaysPage {
        nav: nav("relays", &me),
        relays: r
            .relays
            .into_iter()
            .map(|v| {
                let until = when_opt(v.cooling_until);
                (v, until)
            })
            .collect(),
        limits: r
            .limits
            .into_iter()
            .map(|l| {
                let (c, e) = (rate(l.configured_per_second), rate(l.effective_per_second));
                let since = when_opt(l.throttled_since);
                (l, c, e, since)
            })
            .collect(),
        pauses: r
            .pauses
            .into_iter()
            .map(|p| {
                let at = when(p.created_at);
                (p, at)
            })
            .collect(),
    })
}

#[derive(Debug, Deserialize)]
struct PauseForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    reason: String,
}

/// `POST /ui/relays/pause`.
async fn pause(State(st): State<ApiState>, me: Authed, UiForm(f): UiForm<PauseForm>) -> Response {
    if let Err(r) = me.check_csrf(&f.csrf) {
        return r.into_response();
    }
    let reason = f.reason.trim();
    let flash = match st.postbox.pause_target(&f.kind, &f.value) {
        Err((field, m)) => Flash::Problem(format!("{field}: {m}")),
        Ok(_) if reason.chars().count() > 500 || reason.chars().any(char::is_control) => {
            Flash::Problem("reason: at most 500 characters without control characters".into())
        }
        Ok((k, v)) => {
            let reason = Some(reason).filter(|r| !r.is_empty());
            match st.postbox.pause(k, &v, reason).await {
                Ok(_) => {
                    tracing::info!(token = %me.session.who, kind = k.as_str(), value = %v,
                        "dashboard: paused");
                    Flash::Done(format!("{} {v} paused", k.as_str()))
                }
                Err(e) => Flash::Problem(e.to_string()),
            }
        }
    };
    st.sessions.set_flash(&me.id, flash).await;
    Redirect::to("/ui/relays").into_response()
}

/// `POST /ui/relays/resume`.
async fn resume(State(st): State<ApiState>, me: Authed, UiForm(f): UiForm<PauseForm>) -> Response {
    if let Err(r) = me.check_csrf(&f.csrf) {
        return r.into_response();
    }
    let flash = match crate::store::PauseKind::parse(&f.kind) {
        None => Flash::Problem(format!("kind: `{}` is not relay, domain or tag", f.kind)),
        Some(k) => match st.postbox.resume(k, &f.value).await {
            Ok(Some(n)) => {
                tracing::info!(token = %me.session.who, kind = k.as_str(), value = %f.value,
                    "dashboard: resumed");
                Flash::Done(format!(
                    "{} {} resumed; {n} held emails queued again",
                    k.as_str(),
                    f.value
                ))
            }
            Ok(None) => Flash::Problem(format!("{} {} is not paused", k.as_str(), f.value)),
            Err(e) => Flash::Problem(e.to_string()),
        },
    };
    st.sessions.set_flash(&me.id, flash).await;
    Redirect::to("/ui/relays").into_response()
}

#[derive(Debug, Deserialize)]
struct BulkForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    tag: String,
    #[serde(default)]
    domain: String,
    #[serde(default)]
    older_than_secs: String,
}

/// `POST /ui/relays/bulk`.
async fn bulk(State(st): State<ApiState>, me: Authed, UiForm(f): UiForm<BulkForm>) -> Response {
    if let Err(r) = me.check_csrf(&f.csrf) {
        return r.into_response();
    }
    let opt = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    let older = match opt(&f.older_than_secs).map(|s| s.parse::<u64>()) {
        None => Ok(None),
        Some(Ok(n)) => Ok(Some(n)),
        Some(Err(_)) => Err((
            "older_than_secs",
            "must be a whole number of seconds".into(),
        )),
    };
    let (tag, domain) = (opt(&f.tag), opt(&f.domain));
    let checked = older.and_then(|older| {
        crate::postbox::bulk_request(
            &f.action,
            &f.status,
            tag.as_deref(),
            domain.as_deref(),
            older,
        )
    });
    let flash = match checked {
        Err((field, m)) => Flash::Problem(format!("{field}: {m}")),
        Ok((action, filter)) => {
            let origin = format!("bulk {} from the dashboard by {}", f.action, me.session.who);
            match st.postbox.bulk(action, &filter, &origin).await {
                Ok(r) => {
                    tracing::info!(token = %me.session.who, action = %f.action,
                        matched = r.matched, changed = r.changed, "dashboard: bulk action");
                    Flash::Done(format!(
                        "{} matched, {} changed{}",
                        r.matched,
                        r.changed,
                        if r.more {
                            "; more match: run it again"
                        } else {
                            ""
                        }
                    ))
                }
                Err(e) => Flash::Problem(e.to_string()),
            }
        }
    };
    st.sessions.set_flash(&me.id, flash).await;
    Redirect::to("/ui/relays").into_response()
}
