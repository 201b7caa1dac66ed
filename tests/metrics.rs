//! `/metrics`: scraped before and after real deliveries (and a watcher's work), parsed, and the
//! counters, gauges and histograms checked to have moved as they should. Metrics are
//! process-wide, so this file holds one test.

#[allow(dead_code, unused_imports)]
#[path = "it/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::SmtpServer;
use common::dovecot::{self, Dovecot};
use common::http::{TOKEN, TestApp};
use serde_json::json;

/// `name{a="x",b="y"}` -> value, for every sample line.
fn parse(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (key, value) = line.rsplit_once(' ').expect("sample line: name value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        // Normalise label order so lookups do not depend on the exporter's order.
        let key = match key.split_once('{') {
            Some((name, labels)) => {
                let mut l: Vec<&str> = labels.trim_end_matches('}').split("\",").collect();
                l.iter_mut().for_each(|x| *x = x.trim_end_matches('"'));
                l.sort();
                format!("{name}{{{}}}", l.join(","))
            }
            None => key.to_string(),
        };
        out.insert(key, value);
    }
    out
}

/// `name{k="v",...}` in the normalised form of [`parse`].
fn key(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let mut l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}")).collect();
    l.sort();
    format!("{name}{{{}}}", l.join(","))
}

async fn scrape(api: &TestApp) -> BTreeMap<String, f64> {
    let r = api.metrics().await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "Prometheus text format"
    );
    parse(&r.text)
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, k: &str) -> f64 {
    after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_deliveries_failures_http_and_the_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start().await;
    smtp.reply_to_rcpt("bounce", "550 5.1.1 no such user");
    let dv = Dovecot::start(&dir.path().join("dovecot"));
    let mut s = common::settings(dir.path(), smtp.port());
    s.api.token = Some(TOKEN.to_string().into());
    s.mailboxes = vec![dv.mailbox(
        "mon",
        "none",
        r#"
[[rules]]
name = "incident"
subject = '^INCIDENT'
"#,
    )];
    let api = TestApp::start(s, true).await.with_token(TOKEN);
    let mut watchers = common::Watchers::start(&api.app.postbox);

    let before = scrape(&api).await;
    for (to, body) in [
        (
            "a@example.com",
            json!({"to": ["a@example.com"], "subject": "s", "text": "t"}),
        ),
        (
            "b@example.com",
            json!({"to": ["b@example.com"], "subject": "s", "text": "t"}),
        ),
        (
            "c@example.com",
            json!({"to": ["c@example.com"], "template": "welcome", "priority": "high",
                   "variables": {"name": "C", "product": "P"}}),
        ),
        (
            "bounce@example.com",
            json!({"to": ["bounce@example.com"], "subject": "s", "text": "t"}),
        ),
    ] {
        let r = api.submit(&body).await;
        assert_eq!(r.status, 202, "{to}: {}", r.text);
    }
    // One for later: it waits in the queue and shows in the depth gauge.
    let later = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let r = api
        .post(
            "/v1/emails",
            &json!({"to": ["d@example.com"], "subject": "s", "text": "t", "send_at": later}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let bad = api.submit(&json!({"to": ["nope"]})).await;
    assert_eq!(bad.status, 400);
    common::wait_for("3 deliveries", Duration::from_secs(15), || {
        smtp.count() >= 3
    })
    .await;

    // The watcher reads one matching message and raises one alert.
    dovecot::wait_watcher(&api.app.postbox, "connected", Duration::from_secs(10)).await;
    let mut c = dv.client().await;
    c.append(
        "INBOX",
        &dovecot::message("mon@example.com", "INCIDENT 1", "x"),
    )
    .await;
    c.append("INBOX", &dovecot::message("mon@example.com", "hello", "x"))
        .await;
    common::wait_for("the alert", Duration::from_secs(15), || smtp.count() >= 4).await;
    // The SMTP server has every message, but a worker records its outcome just after the
    // server's reply: wait until the last two outcomes (the 550 and the alert) are recorded.
    let recorded = |after: &BTreeMap<String, f64>| {
        let failed = key(
            "postbox_emails_failed_total",
            &[("priority", "normal"), ("template", "raw")],
        );
        let alert = key(
            "postbox_emails_sent_total",
            &[("priority", "high"), ("template", "alert")],
        );
        delta(&before, after, &failed) >= 1.0 && delta(&before, after, &alert) >= 1.0
    };
    let mut after = scrape(&api).await;
    for _ in 0..100 {
        if recorded(&after) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = scrape(&api).await;
    }
    // One scrape reads the queue gauges before it renders the counters, so a send recorded in
    // between shows in the counters but not yet in the gauges: scrape once more.
    let after = scrape(&api).await;

    let raw = [("priority", "normal"), ("template", "raw")];
    let welcome = [("priority", "high"), ("template", "welcome")];
    let checks: Vec<(String, f64)> = vec![
        (key("postbox_emails_submitted_total", &raw), 4.0),
        (key("postbox_emails_submitted_total", &welcome), 1.0),
        (key("postbox_emails_sent_total", &raw), 2.0),
        (key("postbox_emails_sent_total", &welcome), 1.0),
        (
            key(
                "postbox_emails_sent_total",
                &[("priority", "high"), ("template", "alert")],
            ),
            1.0,
        ),
        (key("postbox_emails_failed_total", &raw), 1.0),
        (key("postbox_smtp_replies_total", &[("code", "250")]), 4.0),
        (key("postbox_smtp_replies_total", &[("code", "550")]), 1.0),
        (key("postbox_smtp_transaction_seconds_count", &[]), 5.0),
        // Every attempt was claimed and completed once, in the writer's batches.
        (
            key("postbox_write_batch_size_sum", &[("kind", "claims")]),
            5.0,
        ),
        (
            key("postbox_write_batch_size_sum", &[("kind", "completions")]),
            5.0,
        ),
        (key("postbox_submit_seconds_count", &[]), 5.0),
        (
            key(
                "postbox_http_requests_total",
                &[
                    ("method", "POST"),
                    ("route", "/v1/emails"),
                    ("status", "202"),
                ],
            ),
            5.0,
        ),
        (
            key(
                "postbox_http_requests_total",
                &[
                    ("method", "POST"),
                    ("route", "/v1/emails"),
                    ("status", "400"),
                ],
            ),
            1.0,
        ),
        (
            key(
                "postbox_http_request_seconds_count",
                &[("method", "POST"), ("route", "/v1/emails")],
            ),
            6.0,
        ),
        (
            key(
                "postbox_mailbox_messages_scanned_total",
                &[("mailbox", "mon")],
            ),
            2.0,
        ),
        (
            key(
                "postbox_mailbox_rule_matches_total",
                &[("mailbox", "mon"), ("rule", "incident")],
            ),
            1.0,
        ),
        (
            key("postbox_mailbox_alerts_total", &[("mailbox", "mon")]),
            1.0,
        ),
    ];
    for (k, want) in &checks {
        assert_eq!(
            delta(&before, &after, k),
            *want,
            "{k} should grow by {want}"
        );
    }
    // An attempt's seconds are its measured time, not its whole milliseconds (the timeline's
    // `duration_ms`): over the five attempts the sum is more than theirs, by under 1 ms each.
    // From whole milliseconds, attempts under 1 ms (most, on loopback) would add nothing.
    let whole_ms = common::db_scalar(
        dir.path(),
        "SELECT CAST(COALESCE(SUM(duration_ms), 0) AS BIGINT) FROM postbox_events
          WHERE kind = 'attempt'",
    )
    .await as f64;
    let secs = delta(
        &before,
        &after,
        &key("postbox_smtp_transaction_seconds_sum", &[]),
    );
    assert!(
        secs * 1e3 > whole_ms && secs * 1e3 < whole_ms + 5.0,
        "postbox_smtp_transaction_seconds_sum grew by {secs} s; the attempts' whole ms: {whole_ms}"
    );
    // Gauges: only the delayed email waits. The queue gauges are at most GAUGES_EVERY old.
    let depth = |m: &BTreeMap<String, f64>, state: &str| {
        m[&key("postbox_queue_depth", &[("state", state)])]
    };
    let settled = |m: &BTreeMap<String, f64>| {
        depth(m, "queued") == 1.0 && depth(m, "retrying") == 0.0 && depth(m, "sending") == 0.0
    };
    let t0 = std::time::Instant::now();
    let mut gauges = after.clone();
    while !settled(&gauges) {
        assert!(
            t0.elapsed() < postbox::api::GAUGES_EVERY * 3,
            "queue gauges never showed the one delayed email: {gauges:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        gauges = scrape(&api).await;
    }
    // One database read serves every scrape for GAUGES_EVERY: after a refresh, a new email is
    // not counted by an immediate scrape, and is once the gauges are due again.
    tokio::time::sleep(postbox::api::GAUGES_EVERY + Duration::from_millis(100)).await;
    let refreshed = scrape(&api).await;
    assert_eq!(depth(&refreshed, "queued"), 1.0);
    let r = api
        .post(
            "/v1/emails",
            &json!({"to": ["e@example.com"], "subject": "s", "text": "t", "send_at": later}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    assert_eq!(
        depth(&scrape(&api).await, "queued"),
        1.0,
        "served from the cache"
    );
    tokio::time::sleep(postbox::api::GAUGES_EVERY + Duration::from_millis(100)).await;
    assert_eq!(depth(&scrape(&api).await, "queued"), 2.0, "refreshed");
    assert_eq!(
        after[&key("postbox_mailbox_connected", &[("mailbox", "mon")])],
        1.0
    );
    let polled = after[&key(
        "postbox_mailbox_last_poll_timestamp_seconds",
        &[("mailbox", "mon")],
    )];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - polled).abs() < 60.0,
        "last poll {polled} vs now {now}"
    );
    // Latency histograms have buckets (histograms, not summaries).
    assert!(
        after
            .keys()
            .any(|k| k.starts_with("postbox_smtp_transaction_seconds_bucket{"))
    );
    watchers.stop().await;
}
