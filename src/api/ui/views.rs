//! The dashboard's views: one askama template struct per page, the rows and bars they show,
//! and `page`, which renders one with the dashboard's security headers.

use askama::Template;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};

use super::session::{Authed, Flash};
use crate::store::{EmailReport, EmailSummary, MailboxStatus, Stats};

pub(super) fn page<T: Template>(t: T) -> Response {
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
pub(super) struct Nav {
    pub(super) active: &'static str,
    pub(super) csrf: String,
    pub(super) who: String,
    pub(super) notice: Option<String>,
    pub(super) problem: Option<String>,
}

pub(super) fn nav(active: &'static str, me: &Authed) -> Nav {
    let (notice, problem) = match &me.flash {
        Some(Flash::Done(m)) => (Some(m.clone()), None),
        Some(Flash::Problem(m)) => (None, Some(m.clone())),
        None => (None, None),
    };
    Nav {
        active,
        csrf: me.session.csrf.clone(),
        who: me.session.who.clone(),
        notice,
        problem,
    }
}

pub(super) fn when(t: time::OffsetDateTime) -> String {
    crate::inbound::rfc3339(t)
        .replace('T', " ")
        .replace('Z', " UTC")
}

pub(super) fn when_opt(t: Option<time::OffsetDateTime>) -> String {
    t.map(when).unwrap_or_else(|| "-".into())
}

pub(super) struct Bar {
    pub(super) x: u32,
    pub(super) sent_y: u32,
    pub(super) sent_h: u32,
    pub(super) failed_y: u32,
    pub(super) failed_h: u32,
    pub(super) title: String,
}

#[derive(Template)]
#[template(path = "ui/overview.html")]
pub(super) struct OverviewPage {
    pub(super) nav: Nav,
    pub(super) stats: Stats,
    pub(super) depth_rows: Vec<(String, u64, u64, u64, u64)>,
    pub(super) bars: Vec<Bar>,
    pub(super) peak: u64,
    pub(super) recent_failures: Vec<Row>,
}

/// One email in a table.
pub(super) struct Row {
    pub(super) id: String,
    pub(super) status: String,
    pub(super) priority: String,
    pub(super) subject: String,
    pub(super) recipients: String,
    pub(super) attempts: u32,
    pub(super) updated: String,
    pub(super) last_error: String,
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

#[derive(Template)]
#[template(path = "ui/emails.html")]
pub(super) struct EmailsPage {
    pub(super) nav: Nav,
    pub(super) title: &'static str,
    pub(super) action: &'static str,
    pub(super) status: String,
    pub(super) tag: String,
    pub(super) q: String,
    pub(super) statuses: Vec<&'static str>,
    pub(super) rows: Vec<Row>,
    /// The next page's URL.
    pub(super) next: Option<String>,
    pub(super) dead: bool,
}

#[derive(Template)]
#[template(path = "ui/email.html")]
pub(super) struct EmailPage {
    pub(super) nav: Nav,
    pub(super) r: EmailReport,
    pub(super) created: String,
    pub(super) updated: String,
    pub(super) sent: String,
    pub(super) next_attempt: String,
    pub(super) timeline: Vec<(String, crate::store::TimelineEntry)>,
    pub(super) can_retry: bool,
    pub(super) can_cancel: bool,
    pub(super) preview: Option<crate::render::Rendered>,
    pub(super) preview_error: Option<String>,
}

pub(super) struct MailboxView {
    pub(super) m: MailboxStatus,
    pub(super) connected_since: String,
    pub(super) down_since: String,
    pub(super) last_poll: String,
    pub(super) rules: Vec<(crate::store::RuleStatus, String)>,
    pub(super) recent: Vec<Row>,
}

#[derive(Template)]
#[template(path = "ui/mailboxes.html")]
pub(super) struct MailboxesPage {
    pub(super) nav: Nav,
    pub(super) mailboxes: Vec<MailboxView>,
}

pub(super) struct WebhookView {
    pub(super) w: crate::store::WebhookRow,
    /// Events not yet read, and how long the oldest has waited.
    pub(super) lag: String,
    pub(super) failing_since: String,
    pub(super) disabled_at: String,
    pub(super) deliveries: Vec<(crate::store::DeliveryRecord, String)>,
}

#[derive(Template)]
#[template(path = "ui/webhooks.html")]
pub(super) struct WebhooksPage {
    pub(super) nav: Nav,
    pub(super) hooks: Vec<WebhookView>,
}

#[derive(Template)]
#[template(path = "ui/suppressions.html")]
pub(super) struct SuppressionsPage {
    pub(super) nav: Nav,
    pub(super) q: String,
    pub(super) rows: Vec<(crate::store::Suppression, String)>,
    pub(super) reports: Vec<(crate::store::BounceReportRow, String)>,
}

#[derive(Template)]
#[template(path = "ui/relays.html")]
pub(super) struct RelaysPage {
    pub(super) nav: Nav,
    pub(super) relays: Vec<(crate::delivery::RelayView, String)>,
    /// The limit, its configured and effective rates, throttled since.
    pub(super) limits: Vec<(crate::delivery::LimitView, String, String, String)>,
    pub(super) pauses: Vec<(crate::store::Pause, String)>,
}
