//! Askama templates: one kind per folder in `templates/emails/<kind>/` (subject.txt, body.txt,
//! body.html extending `emails/layout.html`), compiled into the binary.
//!
//! Each kind has a typed variables struct; [`check_variables`] deserializes the caller's JSON into
//! it at submit time, so a missing or mistyped variable is refused before anything is queued.
//! [`render`] runs in the worker, so queued mail always uses the deployed templates.
//! `.html` output is HTML-escaped by askama; `.txt` output is not.
//!
//! Adding a kind: add its folder, a variables struct and one `kinds!` line below.

use std::collections::BTreeMap;

use askama::Template;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{Content, Email, FieldError, TemplateCheck};

/// What a worker hands to the MIME builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("unknown template `{0}`")]
    UnknownTemplate(String),
    #[error("template variables no longer fit `{template}`: {message}")]
    Variables { template: String, message: String },
    #[error("template `{template}` failed to render: {message}")]
    Askama { template: String, message: String },
}

/// Variables of the `welcome` template.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WelcomeVars {
    pub name: String,
    pub product: String,
    #[serde(default)]
    pub action_url: Option<String>,
}

/// Variables of the `password_reset` template.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordResetVars {
    pub name: String,
    pub reset_url: String,
    pub expires_in_minutes: u32,
}

/// Variables of the `notification` template: a title, paragraphs and an optional action link.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotificationVars {
    pub title: String,
    #[serde(default)]
    pub paragraphs: Vec<String>,
    #[serde(default)]
    pub action_text: Option<String>,
    #[serde(default)]
    pub action_url: Option<String>,
}

/// Variables of the `alert` template (raised by the IMAP watcher).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertVars {
    pub rule: String,
    pub severity: String,
    pub mailbox: String,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    /// What the alert is about in one sentence (the watcher's own alerts, repeats).
    #[serde(default)]
    pub summary: Option<String>,
    /// The group within the rule (`host=db1, sender=...`), if the rule splits its matches.
    #[serde(default)]
    pub group: Option<String>,
    /// Distinct senders with their message counts, most frequent first.
    #[serde(default)]
    pub senders: Vec<String>,
    #[serde(default)]
    pub messages: Vec<AlertMessage>,
    /// Messages counted in `count` but not listed in `messages`.
    #[serde(default)]
    pub unlisted: u64,
}

impl AlertVars {
    /// A filled-in example (config checks, previews).
    pub fn sample() -> Self {
        AlertVars {
            rule: "disk-full".into(),
            severity: "critical".into(),
            mailbox: "monitoring".into(),
            count: 2,
            first_seen: "2026-11-22T10:00:00Z".into(),
            last_seen: "2026-11-22T10:00:30Z".into(),
            summary: None,
            group: Some("host=db1".into()),
            senders: vec!["nagios@example.com (2)".into()],
            messages: vec![AlertMessage {
                from: "Nagios <nagios@example.com>".into(),
                subject: "PROBLEM: db1 disk /var is 97% full".into(),
                date: "2026-11-22T10:00:00Z".into(),
                snippet: "Host db1 State CRITICAL".into(),
                captures: [("host".to_string(), "db1".to_string())].into(),
            }],
            unlisted: 1,
        }
    }
}

/// One inbound message listed in an alert.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertMessage {
    pub from: String,
    pub subject: String,
    pub date: String,
    #[serde(default)]
    pub snippet: String,
    #[serde(default)]
    pub captures: BTreeMap<String, String>,
}

/// A template kind and its variables, for listings (`GET /v1/templates`, docs).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TemplateInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// (variable, type); a `?` suffix marks an optional one.
    pub variables: &'static [(&'static str, &'static str)],
}

macro_rules! kinds {
    ($( $name:literal => $vars:ty, $desc:literal, [$($var:literal : $ty:literal),*],
        $subj:ident = $subj_path:literal, $text:ident = $text_path:literal,
        $html:ident = $html_path:literal; )*) => {
        $(
            #[derive(Template)]
            #[template(path = $subj_path)]
            #[allow(dead_code)] // a subject may not use any variable
            struct $subj<'a> { v: &'a $vars }
            #[derive(Template)]
            #[template(path = $text_path)]
            struct $text<'a> { v: &'a $vars }
            #[derive(Template)]
            #[template(path = $html_path)]
            struct $html<'a> { v: &'a $vars }
        )*

        /// Every built-in template kind.
        pub const KINDS: &[TemplateInfo] = &[
            $(TemplateInfo { name: $name, description: $desc, variables: &[$(($var, $ty)),*] },)*
        ];

        fn render_kind(name: &str, variables: &Value) -> Result<Rendered, RenderError> {
            match name {
                $($name => {
                    let v: $vars = parse_vars(name, variables)
                        .map_err(|e| RenderError::Variables { template: name.into(), message: e.message })?;
                    let askama = |e: askama::Error| RenderError::Askama { template: name.into(), message: e.to_string() };
                    Ok(Rendered {
                        subject: one_line(&$subj { v: &v }.render().map_err(askama)?),
                        text: Some($text { v: &v }.render().map_err(askama)?),
                        html: Some($html { v: &v }.render().map_err(askama)?),
                    })
                })*
                other => Err(RenderError::UnknownTemplate(other.to_string())),
            }
        }

        /// Checks that `name` is a template and `variables` fit it; the error names the variable.
        pub fn check_variables(name: &str, variables: &Value) -> Result<(), FieldError> {
            match name {
                $($name => parse_vars::<$vars>(name, variables).map(|_| ()),)*
                other => Err(FieldError::new(
                    "template",
                    format!("unknown template `{other}` (known: {})", KINDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")),
                )),
            }
        }
    };
}

kinds! {
    "welcome" => WelcomeVars, "Greets a new user; optional call to action.",
        ["name": "string", "product": "string", "action_url": "string?"],
        WelcomeSubject = "emails/welcome/subject.txt", WelcomeText = "emails/welcome/body.txt",
        WelcomeHtml = "emails/welcome/body.html";
    "password_reset" => PasswordResetVars, "A password reset link with its validity.",
        ["name": "string", "reset_url": "string", "expires_in_minutes": "integer"],
        ResetSubject = "emails/password_reset/subject.txt", ResetText = "emails/password_reset/body.txt",
        ResetHtml = "emails/password_reset/body.html";
    "notification" => NotificationVars, "Generic notice: title, paragraphs, optional action link.",
        ["title": "string", "paragraphs": "string[]?", "action_text": "string?", "action_url": "string?"],
        NotificationSubject = "emails/notification/subject.txt", NotificationText = "emails/notification/body.txt",
        NotificationHtml = "emails/notification/body.html";
    "alert" => AlertVars, "An ops alert raised by the IMAP watcher (grouped messages).",
        ["rule": "string", "severity": "string", "mailbox": "string", "count": "integer",
         "first_seen": "string", "last_seen": "string", "summary": "string?", "group": "string?",
         "senders": "string[]?", "messages": "AlertMessage[]?", "unlisted": "integer?"],
        AlertSubject = "emails/alert/subject.txt", AlertText = "emails/alert/body.txt",
        AlertHtml = "emails/alert/body.html";
}

fn parse_vars<T: for<'de> Deserialize<'de>>(
    name: &str,
    variables: &Value,
) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(variables).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() {
            "variables".to_string()
        } else {
            format!("variables.{path}")
        };
        FieldError::new(field, format!("{} (template `{name}`)", e.inner()))
    })
}

/// Subjects come from a text template; a stray newline must never reach a header.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Renders an email's subject, text and HTML.
pub fn render(email: &Email) -> Result<Rendered, RenderError> {
    match &email.content {
        Content::Raw { text, html } => Ok(Rendered {
            subject: email.subject.clone().unwrap_or_default(),
            text: text.clone(),
            html: html.clone(),
        }),
        Content::Template { name, variables } => {
            let mut r = render_kind(name, variables)?;
            if let Some(s) = &email.subject {
                // An explicit subject overrides the template's.
                r.subject = s.clone();
            }
            Ok(r)
        }
    }
}

/// Renders a template from its name and variables (previews).
pub fn render_template(name: &str, variables: &Value) -> Result<Rendered, RenderError> {
    render_kind(name, variables)
}

/// The [`TemplateCheck`] the facade hands to `Email::parse`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Templates;

impl TemplateCheck for Templates {
    fn check(&self, name: &str, variables: &Value) -> Result<(), FieldError> {
        check_variables(name, variables)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_kind_renders_subject_text_and_html() {
        let samples = [
            (
                "welcome",
                json!({"name": "Ada", "product": "Postbox", "action_url": "https://x.example/start"}),
            ),
            (
                "password_reset",
                json!({"name": "Ada", "reset_url": "https://x.example/r/1", "expires_in_minutes": 30}),
            ),
            (
                "notification",
                json!({"title": "Build done", "paragraphs": ["One", "Two"], "action_url": "https://x.example"}),
            ),
            (
                "alert",
                json!({"rule": "disk", "severity": "critical", "mailbox": "ops", "count": 2,
                "first_seen": "t1", "last_seen": "t2",
                "messages": [{"from": "a@x.example", "subject": "Disk full", "date": "t1", "snippet": "98%",
                              "captures": {"host": "db1"}}]}),
            ),
        ];
        assert_eq!(samples.len(), KINDS.len());
        for (name, vars) in samples {
            let r = render_template(name, &vars).unwrap();
            assert!(!r.subject.is_empty() && !r.subject.contains('\n'), "{name}");
            assert!(r.text.unwrap().len() > 10, "{name}");
            assert!(r.html.unwrap().contains("</html>"), "{name}");
        }
    }

    #[test]
    fn html_is_escaped_and_text_is_not() {
        let vars = json!({"name": "<script>alert(1)</script>", "product": "A&B"});
        let r = render_template("welcome", &vars).unwrap();
        let html = r.html.unwrap();
        assert!(!html.contains("<script>"), "{html}");
        assert!(
            html.contains("&#60;script&#62;") || html.contains("&lt;script&gt;"),
            "{html}"
        );
        assert!(
            html.contains("A&#38;B") || html.contains("A&amp;B"),
            "{html}"
        );
        assert!(r.text.unwrap().contains("<script>alert(1)</script>"));
    }

    #[test]
    fn variable_errors_name_the_variable() {
        let e = check_variables("welcome", &json!({"name": "Ada"})).unwrap_err();
        assert!(e.message.contains("product"), "{e:?}");
        let e = check_variables(
            "password_reset",
            &json!({"name": "Ada", "reset_url": "u", "expires_in_minutes": "soon"}),
        )
        .unwrap_err();
        assert_eq!(e.field, "variables.expires_in_minutes");
        let e = check_variables(
            "welcome",
            &json!({"name": "Ada", "product": "P", "extra": 1}),
        )
        .unwrap_err();
        assert!(e.message.contains("extra"), "{e:?}");
        let e = check_variables("nope", &json!({})).unwrap_err();
        assert_eq!(e.field, "template");
    }

    #[test]
    fn subject_never_spans_lines() {
        let r =
            render_template("notification", &json!({"title": "a\r\nBcc: x@y.example"})).unwrap();
        assert!(!r.subject.contains('\n') && !r.subject.contains('\r'));
    }
}
