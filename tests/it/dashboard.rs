//! The dashboard at /ui: a real headless Chromium (Debian's, driven over WebDriver) logs in,
//! finds an email, reads its timeline, retries a dead letter and sees it sent; screenshots of
//! each page go to target/ui-screenshots/. Plus the session and CSRF rules over plain HTTP.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use common::SmtpServer;
use common::dovecot::{self, Dovecot};
use common::http::{TOKEN, TestApp};
use common::webdriver::Browser;
use serde_json::json;

fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots")
}

async fn start(dir: &std::path::Path, smtp: &SmtpServer) -> TestApp {
    start_with(dir, smtp, vec![]).await
}

fn dashboard_settings(
    dir: &std::path::Path,
    smtp: &SmtpServer,
    mailboxes: Vec<postbox::inbound::MailboxSettings>,
) -> postbox::Settings {
    let mut s = common::settings(dir, smtp.port());
    s.mailboxes = mailboxes;
    s.api.token = Some(TOKEN.to_string().into());
    s.retry.max_attempts = 1;
    s
}

async fn start_with(
    dir: &std::path::Path,
    smtp: &SmtpServer,
    mailboxes: Vec<postbox::inbound::MailboxSettings>,
) -> TestApp {
    let s = dashboard_settings(dir, smtp, mailboxes);
    TestApp::start(s, true).await.with_token(TOKEN)
}

/// Submits an email to `to`; returns its id.
async fn submit(api: &TestApp, to: &str, subject: &str) -> String {
    let r = api
        .post(
            "/v1/emails",
            &json!({"to": [to], "subject": subject, "text": "Hello from the dashboard test."}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    r.json["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_real_browser_log_in_find_an_email_and_retry_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start().await;
    smtp.reply_to_rcpt("dead", "550 5.1.1 <dead@example.com>: no such user");
    let dv = Dovecot::start(&dir.path().join("dovecot"));
    let mailbox = dv.mailbox(
        "monitoring",
        "none",
        r#"
[[rules]]
name = "disk full"
subject = '(?P<host>db\d+) disk full'
"#,
    );
    let api = start_with(dir.path(), &smtp, vec![mailbox]).await;
    let mut watchers = common::Watchers::start(&api.app.postbox);
    submit(&api, "ada@example.com", "Your invoice").await;
    let dead = submit(&api, "dead@example.com", "Quarterly report").await;
    let dismiss = submit(&api, "dead.too@example.com", "Old newsletter").await;
    api.wait_status(&dead, "failed").await;
    api.wait_status(&dismiss, "failed").await;

    let b = Browser::start().await;
    // Without a session the dashboard sends the browser to the login page.
    b.goto(&format!("{}/ui", api.base)).await;
    b.wait_url("/ui/login").await;
    b.screenshot(&shots().join("01-login.png")).await;
    b.find("#token")
        .await
        .type_text("not-the-right-token")
        .await;
    b.find("#login").await.click_and_load().await;
    assert!(b.find("#problem").await.text().await.contains("not valid"));
    b.find("#token").await.type_text(TOKEN).await;
    b.find("#login").await.click_and_load().await;
    b.wait_url("/ui").await;
    let src = b.source().await;
    assert!(
        src.contains("Queue depth") && src.contains("Throughput"),
        "overview"
    );
    assert!(
        src.contains("Quarterly report"),
        "recent failures list the dead letter"
    );
    b.screenshot(&shots().join("02-overview.png")).await;
    let cookie = b.cookie("postbox_session").await;
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");

    // Find the email by recipient, open it, read the timeline.
    b.goto(&format!("{}/ui/emails", api.base)).await;
    b.find("#q").await.type_text("dead@example.com").await;
    b.find("#search").await.click_and_load().await;
    b.wait_url("q=dead%40example.com").await;
    assert_eq!(b.count("a.email-link").await, 1);
    b.screenshot(&shots().join("03-emails-search.png")).await;
    b.find("a.email-link").await.click_and_load().await;
    b.wait_url(&format!("/ui/emails/{dead}")).await;
    assert_eq!(b.find("#status").await.text().await, "failed");
    let timeline = b.find("#timeline").await.text().await;
    assert!(
        timeline.contains("550") && timeline.contains("no such user"),
        "{timeline}"
    );
    assert!(
        b.find("#preview-text")
            .await
            .text()
            .await
            .contains("Hello from the dashboard test.")
    );
    b.screenshot(&shots().join("04-email-failed.png")).await;

    // The recipient exists now: retry the dead letter from the dead-letter page.
    smtp.clear_rcpt_replies();
    b.goto(&format!("{}/ui/dead", api.base)).await;
    b.screenshot(&shots().join("05-dead-letters.png")).await;
    b.find(&format!("button.cancel[data-id=\"{dismiss}\"]"))
        .await
        .click_and_load()
        .await;
    assert!(b.find("#flash").await.text().await.contains("cancelled"));
    api.wait_status(&dismiss, "cancelled").await;
    assert_eq!(
        b.count(&format!("button.retry[data-id=\"{dismiss}\"]"))
            .await,
        0,
        "dismissed"
    );
    b.find(&format!("button.retry[data-id=\"{dead}\"]"))
        .await
        .click_and_load()
        .await;
    assert!(b.find("#flash").await.text().await.contains("re-queued"));
    api.wait_status(&dead, "sent").await;
    b.goto(&format!("{}/ui/emails/{dead}", api.base)).await;
    assert_eq!(b.find("#status").await.text().await, "sent");
    let timeline = b.find("#timeline").await.text().await;
    assert!(timeline.contains("dashboard, token default"), "{timeline}");
    b.screenshot(&shots().join("06-email-sent.png")).await;
    // The mailbox page: state, position, rule hits and the alert it raised.
    dovecot::wait_watcher(&api.app.postbox, "connected", Duration::from_secs(10)).await;
    let mut c = dv.client().await;
    c.append(
        "INBOX",
        &dovecot::message("nagios@example.com", "PROBLEM db3 disk full", "97%"),
    )
    .await;
    common::wait_for("the alert", Duration::from_secs(15), || {
        smtp.received()
            .iter()
            .any(|m| m.rcpt_to == vec!["oncall@example.com".to_string()])
    })
    .await;
    b.goto(&format!("{}/ui/mailboxes", api.base)).await;
    let src = b.source().await;
    for want in [
        "monitoring",
        "connected",
        "IDLE",
        "disk full",
        "(alert template)",
        "oncall@example.com",
    ] {
        assert!(src.contains(want), "mailboxes page lacks {want:?}");
    }
    b.screenshot(&shots().join("07-mailboxes.png")).await;
    watchers.stop().await;
    assert_eq!(
        smtp.received()
            .iter()
            .filter(|m| m.rcpt_to.contains(&"dead@example.com".to_string()))
            .count(),
        1
    );
    b.quit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_real_browser_see_webhook_deliveries_and_redeliver_one() {
    use common::webhook::{Dispatchers, Receiver, endpoint};
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start().await;
    let rx = Receiver::start(dir.path()).await;
    let mut s = dashboard_settings(dir.path(), &smtp, vec![]);
    s.webhooks = vec![endpoint("app", &rx, None)];
    let api = TestApp::start(s, true).await.with_token(TOKEN);
    let hooks = Dispatchers::start(&api.app.postbox);
    let id = submit(&api, "ada@example.com", "Your invoice").await;
    // Both recorded (the receiver has them a moment before postbox commits the round).
    let t0 = std::time::Instant::now();
    loop {
        let d = api.get("/v1/webhooks/app/deliveries").await;
        let n = d.json["deliveries"].as_array().map_or(0, |a| a.len());
        if n == 2 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", d.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let b = Browser::start().await;
    b.goto(&format!("{}/ui/login", api.base)).await;
    b.find("#token").await.type_text(TOKEN).await;
    b.find("#login").await.click_and_load().await;
    b.wait_url("/ui").await;
    b.goto(&format!("{}/ui/webhooks", api.base)).await;
    let page = b.find("#webhook-app").await.text().await;
    assert!(page.contains(&rx.url()) && page.contains("ok"), "{page}");
    assert_eq!(b.count("tr.delivery").await, 2, "two deliveries listed");
    assert!(page.contains("delivered") && page.contains("204"), "{page}");
    b.screenshot(&shots().join("08-webhooks.png")).await;
    // Redeliver the newest: the receiver gets that event again, with its id.
    let before = rx.requests().len();
    b.find("button.redeliver").await.click_and_load().await;
    assert!(
        b.find("#flash").await.text().await.contains("sent again"),
        "flash"
    );
    common::wait_for("the redelivery", Duration::from_secs(20), || {
        rx.requests().len() > before
    })
    .await;
    let again = rx.requests()[before].clone();
    assert_eq!(again["verified"], true);
    assert_eq!(again["email_id"], id.as_str());
    let first = rx
        .requests()
        .iter()
        .filter(|r| r["id"] == again["id"])
        .count();
    assert_eq!(first, 2, "the same webhook-id twice: {:#?}", rx.requests());
    // Any event by its id, from the form: a bad id is named, a good one sent again.
    let other = rx
        .requests()
        .iter()
        .find(|r| r["id"] != again["id"])
        .expect("the other event")["id"]
        .as_str()
        .unwrap()
        .to_string();
    b.goto(&format!("{}/ui/webhooks", api.base)).await;
    b.find("form.redeliver-event input[name=event_id]")
        .await
        .type_text("nope")
        .await;
    b.find("button.redeliver-event")
        .await
        .click_and_load()
        .await;
    let flash = b.find("#flash").await.text().await;
    assert!(flash.contains("not an event id"), "{flash}");
    let before = rx.requests().len();
    b.find("form.redeliver-event input[name=event_id]")
        .await
        .type_text(&other)
        .await;
    b.find("button.redeliver-event")
        .await
        .click_and_load()
        .await;
    let flash = b.find("#flash").await.text().await;
    assert!(flash.contains("sent to app again"), "{flash}");
    common::wait_for("the event sent again", Duration::from_secs(20), || {
        rx.requests()[before..]
            .iter()
            .any(|r| r["id"] == other.as_str())
    })
    .await;

    // The suppression list: listed, and removed with a click.
    let r = api
        .post(
            "/v1/suppressions",
            &json!({"address": "gone@example.com", "reason": "hard_bounce", "detail": "5.1.1"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    b.goto(&format!("{}/ui/suppressions", api.base)).await;
    assert_eq!(b.count("tr.suppression").await, 1);
    let table = b.find("#suppressions").await.text().await;
    assert!(
        table.contains("gone@example.com") && table.contains("hard_bounce"),
        "{table}"
    );
    b.screenshot(&shots().join("09-suppressions.png")).await;
    b.find("button.remove").await.click_and_load().await;
    assert!(b.find("#flash").await.text().await.contains("removed"));
    assert_eq!(b.count("tr.suppression").await, 0);
    let r = api.get("/v1/suppressions").await;
    assert_eq!(r.json["suppressions"], json!([]), "{}", r.text);
    b.quit().await;
    hooks.stop().await;
}

/// The Relays page: relays and limits listed; a tag paused, its queued email cancelled in
/// bulk, the pause resumed, each by a click.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_real_browser_pause_a_tag_cancel_its_mail_in_bulk_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start().await;
    let mut s = dashboard_settings(dir.path(), &smtp, vec![]);
    s.smtp.per_second = Some(40.0);
    let api = TestApp::start(s, true).await.with_token(TOKEN);
    let b = Browser::start().await;
    b.goto(&format!("{}/ui/login", api.base)).await;
    b.find("#token").await.type_text(TOKEN).await;
    b.find("#login").await.click_and_load().await;
    b.wait_url("/ui").await;
    b.goto(&format!("{}/ui/relays", api.base)).await;
    let relays = b.find("#relays").await.text().await;
    assert!(
        relays.contains("default") && relays.contains("127.0.0.1"),
        "{relays}"
    );
    let limits = b.find("#limits").await.text().await;
    assert!(
        limits.contains("relay:default") && limits.contains("40.00/s"),
        "{limits}"
    );
    b.find("#pause-kind option[value=tag]").await.click().await;
    b.find("#pause-value").await.type_text("promo").await;
    b.find("#pause-reason")
        .await
        .type_text("campaign on hold")
        .await;
    b.find("#pause").await.click_and_load().await;
    assert!(
        b.find("#flash")
            .await
            .text()
            .await
            .contains("tag promo paused")
    );
    assert_eq!(b.count("tr.pause").await, 1);
    b.screenshot(&shots().join("10-relays.png")).await;

    let r = api
        .post(
            "/v1/emails",
            &json!({"to": ["p@example.com"], "subject": "promo", "text": "t", "tags": ["promo"]}),
        )
        .await;
    let id = r.json["id"].as_str().unwrap().to_string();
    let t0 = std::time::Instant::now();
    while api.email(&id).await.json["last_error"] != "paused: tag \"promo\"" {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{}",
            api.email(&id).await.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.goto(&format!("{}/ui/relays", api.base)).await;
    b.find("#bulk-action option[value=cancel]")
        .await
        .click()
        .await;
    b.find("#bulk-status option[value=queued]")
        .await
        .click()
        .await;
    b.find("#bulk-tag").await.type_text("promo").await;
    b.find("#bulk").await.click_and_load().await;
    let flash = b.find("#flash").await.text().await;
    assert!(flash.contains("1 matched, 1 changed"), "{flash}");
    assert_eq!(api.email(&id).await.json["status"], "cancelled");

    b.goto(&format!("{}/ui/relays", api.base)).await;
    b.find("button.resume").await.click_and_load().await;
    assert!(b.find("#flash").await.text().await.contains("resumed"));
    assert_eq!(b.count("tr.pause").await, 0);
    assert_eq!(api.get("/v1/relays").await.json["pauses"], json!([]));
    assert_eq!(smtp.count(), 0, "nothing was sent");
    b.quit().await;
}

async fn get_as(api: &TestApp, token: &str, path: &str) -> common::http::Reply {
    let auth = format!("Bearer {token}");
    api.raw(
        reqwest::Method::GET,
        path,
        None,
        &[("authorization", &auth)],
    )
    .await
}

fn set_cookies(r: &reqwest::Response) -> Vec<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

/// The login page's cookie (`postbox_login=...`) and the CSRF token in its form.
async fn login_form(http: &reqwest::Client, url: &str) -> (String, String) {
    let r = http.get(url).send().await.unwrap();
    let cookie = set_cookies(&r)
        .into_iter()
        .find(|c| c.starts_with("postbox_login="))
        .expect("the login page sets its cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui/login"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    let html = r.text().await.unwrap();
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    (
        cookie.split(';').next().unwrap().to_string(),
        html[at..at + 64].to_string(),
    )
}

/// Logs in through the login form as a browser would.
async fn login(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let (cookie, csrf) = login_form(http, url).await;
    let mut rb = http
        .post(url)
        .header("cookie", cookie)
        .form(&[("token", token), ("csrf", csrf.as_str())]);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_lock_the_client_out_for_the_window_bearer_and_dashboard_alike() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = common::memory_settings(dir.path());
    s.api.token = Some(TOKEN.to_string().into());
    s.api.max_failed_logins = 3;
    let api = TestApp::start(s, false).await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = |p: &str| format!("{}{p}", api.base);
    // Requests without any token are not guesses: they do not count.
    for _ in 0..5 {
        assert_eq!(api.stats().await.status, 401);
    }
    // Two wrong bearer tokens and one wrong dashboard login: the third failure locks out.
    for _ in 0..2 {
        let r = get_as(&api, "wrong-token-0123456789abcdef", "/v1/stats").await;
        assert_eq!(r.status, 401);
    }
    assert_eq!(
        login(&http, &url("/ui/login"), "nope-nope-nope-nope", &[])
            .await
            .status(),
        401
    );
    // Now even the right token is refused from this address, on both doors, with Retry-After.
    let r = get_as(&api, TOKEN, "/v1/stats").await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.error().0, "too_many_failed_logins");
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((500..=600).contains(&wait), "{wait}");
    let r = login(&http, &url("/ui/login"), TOKEN, &[]).await;
    assert_eq!(r.status(), 429);
    assert!(
        !set_cookies(&r)
            .iter()
            .any(|c| c.starts_with("postbox_session="))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_csrf_guard_every_page_and_form() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start().await;
    smtp.reply_to_rcpt("dead", "550 5.1.1 no such user");
    let api = start(dir.path(), &smtp).await;
    let dead = submit(&api, "dead@example.com", "s").await;
    api.wait_status(&dead, "failed").await;
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let url = |p: &str| format!("{}{p}", api.base);

    // No session: every page redirects to the login, and a form post changes nothing.
    for p in [
        "/ui",
        "/ui/emails",
        &format!("/ui/emails/{dead}"),
        "/ui/dead",
        "/ui/mailboxes",
    ] {
        let r = http.get(url(p)).send().await.unwrap();
        assert_eq!(r.status(), 303, "{p}");
        assert_eq!(r.headers()["location"], "/ui/login", "{p}");
    }
    let r = http
        .post(url(&format!("/ui/emails/{dead}/retry")))
        .form(&[("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    // Logging in takes the login form's CSRF token and its cookie: without them, 403.
    let r = http
        .post(url("/ui/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a login post without the form's token");
    assert!(
        !set_cookies(&r)
            .iter()
            .any(|c| c.starts_with("postbox_session="))
    );
    let (login_cookie, login_csrf) = login_form(&http, &url("/ui/login")).await;
    let r = http
        .post(url("/ui/login"))
        .form(&[("token", TOKEN), ("csrf", "0".repeat(64).as_str())])
        .header("cookie", &login_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "another form's token");
    // A wrong token: 401 and no session. The right one: a cookie with the expected flags.
    let r = login(&http, &url("/ui/login"), "wrong-token-wrong-token", &[]).await;
    assert_eq!(r.status(), 401);
    assert!(
        !set_cookies(&r)
            .iter()
            .any(|c| c.starts_with("postbox_session="))
    );
    let _ = login_csrf;
    let r = login(&http, &url("/ui/login"), TOKEN, &[]).await;
    assert_eq!(r.status(), 303);
    let cookie = set_cookies(&r)
        .into_iter()
        .find(|c| c.starts_with("postbox_session="))
        .expect("a session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP on loopback: no Secure flag"
    );
    let session = cookie.split(';').next().unwrap().to_string();
    let r = login(
        &http,
        &url("/ui/login"),
        TOKEN,
        &[("x-forwarded-proto", "https")],
    )
    .await;
    assert!(
        set_cookies(&r)
            .iter()
            .any(|c| c.starts_with("postbox_session=") && c.contains("; Secure")),
        "behind TLS: Secure"
    );

    // With a session but without (or with a wrong) CSRF token: 403, and the email stays failed.
    for form in [vec![], vec![("csrf", "0".repeat(64))]] {
        let r = http
            .post(url(&format!("/ui/emails/{dead}/retry")))
            .header("cookie", &session)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{form:?}");
    }
    let r = api.email(&dead).await;
    assert_eq!(r.json["status"], "failed", "refused forms change nothing");

    // The page's own token works.
    let page = http
        .get(url(&format!("/ui/emails/{dead}")))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'")
    );
    let html = page.text().await.unwrap();
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    let csrf = &html[at..at + 64];
    smtp.clear_rcpt_replies();
    let r = http
        .post(url(&format!("/ui/emails/{dead}/retry")))
        .header("cookie", &session)
        .form(&[("csrf", csrf), ("back", "https://evil.example/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let to = r.headers()["location"].to_str().unwrap();
    assert_eq!(
        to,
        format!("/ui/emails/{dead}"),
        "never redirects off the dashboard, and the outcome is not in the URL"
    );
    // The outcome is shown once, on the next page of this session: served here by a second API
    // process on the same database (sessions live there, so no sticky sessions are needed).
    let b = TestApp::start(dashboard_settings(dir.path(), &smtp, vec![]), false).await;
    let url_b = |p: &str| format!("{}{p}", b.base);
    let show = |path: String| {
        let http = http.clone();
        let session = session.clone();
        async move {
            http.get(path)
                .header("cookie", &session)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let next = show(url_b(to)).await;
    assert!(
        next.contains("id=\"flash\"") && next.contains("re-queued"),
        "{next}"
    );
    let again = show(url_b(to)).await;
    assert!(
        !again.contains("id=\"flash\""),
        "a flash message is shown once"
    );
    api.wait_status(&dead, "sent").await;

    // Logging out on one process ends the session on every one.
    let r = http
        .post(url_b("/ui/logout"))
        .header("cookie", &session)
        .form(&[("csrf", csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = http
        .get(url("/ui"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/ui/login");

    // Sessions the database cannot read or store: a 503 to try again, never a login page
    // (which would look like a logout) and never a session that was not stored.
    common::db_exec(
        dir.path(),
        "DROP TABLE postbox_sessions",
        "DROP TABLE postbox_sessions",
    )
    .await;
    let r = http
        .get(url("/ui"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let r = login(&http, &url("/ui/login"), TOKEN, &[]).await;
    assert_eq!(r.status(), 503);
    assert!(
        !set_cookies(&r)
            .iter()
            .any(|c| c.starts_with("postbox_session=")),
        "no cookie for a session that was not stored"
    );
    b.stop().await;
    api.stop().await;
}
