//! The HTTP API over real TCP on 127.0.0.1, against the running app (and a real SMTP server).

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::http::{TOKEN, TestApp};
use common::{SmtpServer, half_written, settings};
use postbox::EmailStatus;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(20);

fn email(to: &str) -> Value {
    json!({"to": [to], "subject": "Hello", "text": "Body"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follow_and_deliver_with_request_id_in_the_timeline() {
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let api = TestApp::start(settings(dir.path(), smtp.port()), true).await;

    let r = api
        .post_with(
            "/v1/emails",
            &json!({"to": ["Ada <ada@example.com>"], "template": "welcome",
                    "variables": {"name": "Ada", "product": "Postbox"}, "tags": ["signup"]}),
            &[("x-request-id", "req-abc-123")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.header("x-request-id"), Some("req-abc-123"));
    let id = r.json["id"].as_str().unwrap().to_string();
    assert_eq!(r.json["status_url"], format!("/v1/emails/{id}"));
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/emails/{id}").as_str())
    );
    assert_eq!(r.json["created"], true);

    let report = api.wait_status(&id, "sent").await;
    assert_eq!(report["request_id"], "req-abc-123");
    let timeline = report["timeline"].as_array().unwrap();
    assert_eq!(timeline[0]["kind"], "submitted");
    assert!(
        timeline[0]["detail"]
            .as_str()
            .unwrap()
            .contains("req-abc-123")
    );
    let attempt = timeline.iter().find(|e| e["kind"] == "attempt").unwrap();
    assert_eq!(attempt["smtp_code"], 250);
    assert!(attempt["at"].is_string() && attempt["smtp_text"].is_string());
    assert_eq!(report["attempts"], 1);
    assert_eq!(smtp.count(), 1);
    assert!(String::from_utf8_lossy(&smtp.received()[0].data).contains("Welcome"));

    // A fresh request id is made when the client sends none, and every response carries it.
    let r = api.healthz().await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-request-id").map(str::len), Some(26));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_mistake_is_a_4xx_json_error_naming_the_problem_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 9);
    s.api.max_body_bytes = 64 * 1024;
    let api = TestApp::start(s, false).await;

    type Case = (
        &'static str,
        Vec<u8>,
        StatusCode,
        &'static str,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        ("/v1/emails", b"{\"to\": [".to_vec(), StatusCode::BAD_REQUEST, "malformed_json", Some("body")),
        ("/v1/emails", b"not json".to_vec(), StatusCode::BAD_REQUEST, "malformed_json", Some("body")),
        ("/v1/emails", br#"{"to": "a@example.com", "subject": "s", "text": "t"}"#.to_vec(),
            StatusCode::BAD_REQUEST, "invalid_field", Some("to")),
        ("/v1/emails", br#"{"to": ["a@example.com"], "subject": 5, "text": "t"}"#.to_vec(),
            StatusCode::BAD_REQUEST, "invalid_field", Some("subject")),
        ("/v1/emails", br#"{"to": ["a@example.com"], "subjekt": "s"}"#.to_vec(),
            StatusCode::BAD_REQUEST, "unknown_field", Some("subjekt")),
        ("/v1/emails", br#"{"to": ["a@example.com"], "template": "nope", "variables": {}}"#.to_vec(),
            StatusCode::BAD_REQUEST, "invalid_email", Some("template")),
        ("/v1/emails", br#"{"to": ["a@example.com"], "template": "welcome", "variables": {"name": "A"}}"#.to_vec(),
            StatusCode::BAD_REQUEST, "invalid_email", Some("variables")),
        ("/v1/emails", br#"{"to": ["not an address"], "subject": "s", "text": "t"}"#.to_vec(),
            StatusCode::BAD_REQUEST, "invalid_email", Some("to[0]")),
        ("/v1/emails", br#"{"to": ["a@example.com"], "subject": "s", "text": "t", "headers": {"X-Evil": "a\r\nBcc: x@example.com"}}"#.to_vec(),
            StatusCode::BAD_REQUEST, "invalid_email", Some("headers.X-Evil")),
        ("/v1/emails", br#"{"to": ["a@example.com"], "subject": "s\r\nBcc: x@example.com", "text": "t"}"#.to_vec(),
            StatusCode::BAD_REQUEST, "invalid_email", Some("subject")),
        ("/v1/emails", vec![b'x'; 70 * 1024], StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None),
    ];
    for (path, body, status, code, field) in cases {
        let r = api.raw(Method::POST, path, Some(body.clone()), &[]).await;
        assert_eq!(
            r.status,
            status,
            "{}: {}",
            String::from_utf8_lossy(&body[..body.len().min(80)]),
            r.text
        );
        let (c, f) = r.error();
        assert_eq!(c, code, "{}", r.text);
        if let Some(field) = field {
            let f = f.unwrap_or_default();
            assert!(
                f.starts_with(field),
                "field {f} should name {field}: {}",
                r.text
            );
        }
    }

    // Content-Type that is not JSON.
    let r = api
        .client
        .post(format!("{}/v1/emails", api.base))
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Routes, methods, ids.
    let r = api.get("/v1/nothing-here").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error().0, "not_found");
    let r = api.raw(Method::DELETE, "/v1/emails", None, &[]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.error().0, "method_not_allowed");
    let r = api.get("/v1/emails/not-an-id").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error(), ("invalid_id".into(), Some("id".into())));
    let r = api.get("/v1/emails/01KAQ3N2W4XGZ8Y5B7C9D1E3F5").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = api.cancel("01KAQ3N2W4XGZ8Y5B7C9D1E3F5").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = api
        .post_with(
            "/v1/emails",
            &email("a@example.com"),
            &[("idempotency-key", "")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error().1.as_deref(), Some("Idempotency-Key"));

    assert_eq!(
        api.app.postbox.counts().await.unwrap().by_status.len(),
        0,
        "nothing stored"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_is_all_or_nothing_and_lists_every_bad_item() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 9);
    s.api.max_batch = 5;
    let api = TestApp::start(s, false).await;

    let r = api
        .post(
            "/v1/emails/batch",
            &json!({"emails": [
                email("a@example.com"),
                {"to": ["bad address"], "subject": "s", "text": "t"},
                email("c@example.com"),
                {"to": ["d@example.com"], "subject": "s\nx", "text": "t"},
            ]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    let (code, field) = r.error();
    assert_eq!(code, "invalid_batch");
    assert_eq!(field.as_deref(), Some("emails[1].to[0]"));
    let details = r.json["error"]["details"].as_array().unwrap();
    let idx: Vec<u64> = details
        .iter()
        .map(|d| d["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![1, 3]);
    assert_eq!(details[1]["field"], "emails[3].subject");
    assert_eq!(api.app.postbox.counts().await.unwrap().by_status.len(), 0);

    // A type error inside an item names its index too.
    let r = api
        .post(
            "/v1/emails/batch",
            &json!({"emails": [email("a@example.com"), {"to": 7}]}),
        )
        .await;
    assert_eq!(r.error().1.as_deref(), Some("emails[1].to"));

    let six: Vec<Value> = (0..6)
        .map(|i| email(&format!("u{i}@example.com")))
        .collect();
    let r = api.submit_batch(&json!({ "emails": six })).await;
    assert_eq!(r.error(), ("invalid_batch".into(), Some("emails".into())));
    let r = api.submit_batch(&json!({"emails": []})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    let five: Vec<Value> = (0..5)
        .map(|i| email(&format!("u{i}@example.com")))
        .collect();
    let r = api.submit_batch(&json!({ "emails": five })).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json["count"], 5);
    let ids: HashSet<&str> = r.json["emails"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5);
    assert_eq!(api.app.count(EmailStatus::Queued).await, 5);
    assert_eq!(half_written(dir.path()).await, (0, 0));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_filters_and_pages_in_a_stable_order() {
    let dir = tempfile::tempdir().unwrap();
    let api = TestApp::start(settings(dir.path(), 9), false).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut e = email(&format!("User{i} <user{i}@example.com>"));
        e["tags"] = json!([if i % 2 == 0 { "even" } else { "odd" }, "all"]);
        e["cc"] = json!(["Boss@Example.com"]);
        let r = api.submit(&e).await;
        ids.push(r.json["id"].as_str().unwrap().to_string());
    }
    let cancelled = &ids[3];
    assert_eq!(api.cancel(cancelled).await.status, StatusCode::OK);

    // Pages of 3, newest first, no gaps, no repeats.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/emails?limit=3&cursor={c}"),
            None => "/v1/emails?limit=3".to_string(),
        };
        let r = api.get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        for e in r.json["emails"].as_array().unwrap() {
            seen.push(e["id"].as_str().unwrap().to_string());
        }
        match r.json["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.sort();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let count = |r: &common::http::Reply| r.json["emails"].as_array().unwrap().len();
    assert_eq!(count(&api.list("tag=even").await), 4);
    assert_eq!(count(&api.list("tag=all&status=queued").await), 6);
    let r = api.list("status=cancelled").await;
    assert_eq!(count(&r), 1);
    assert_eq!(r.json["emails"][0]["id"], cancelled.as_str());
    assert_eq!(count(&api.list("recipient=USER2@example.com").await), 1);
    assert_eq!(count(&api.list("recipient=boss@example.com").await), 7);
    assert_eq!(count(&api.list("recipient=user@example.com").await), 0);
    assert_eq!(
        count(&api.list("created_after=2099-01-01T00:00:00Z").await),
        0
    );
    assert_eq!(
        count(&api.list("created_before=2099-01-01T00:00:00Z").await),
        7
    );

    for (q, field) in [
        ("status=lost", "status"),
        ("limit=0", "limit"),
        ("limit=many", "limit"),
        ("created_after=yesterday", "created_after"),
        ("cursor=xyz", "cursor"),
        ("colour=red", "colour"),
    ] {
        let r = api.list(q).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(r.error().1.as_deref(), Some(field), "{q}: {}", r.text);
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_retry_follow_the_state_machine() {
    let smtp = SmtpServer::start().await;
    smtp.always_reply_to_data(Some("554 5.7.1 rejected"));
    let dir = tempfile::tempdir().unwrap();
    let api = TestApp::start(settings(dir.path(), smtp.port()), true).await;

    let r = api
        .post(
            "/v1/emails",
            &json!({"to": ["x@example.com"], "subject": "s", "text": "t",
            "send_at": "2099-01-01T00:00:00Z"}),
        )
        .await;
    let later = r.json["id"].as_str().unwrap().to_string();
    let r = api.retry(&later).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.error().0, "conflict");
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queued")
    );
    let r = api.cancel(&later).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["status"], "cancelled");
    let r = api.cancel(&later).await;
    assert_eq!(r.status, StatusCode::CONFLICT);

    // A dead letter, re-driven once the server accepts mail again.
    let r = api.submit(&email("dead@example.com")).await;
    let dead = r.json["id"].as_str().unwrap().to_string();
    let report = api.wait_status(&dead, "failed").await;
    assert_eq!(report["timeline"][1]["smtp_code"], 554);
    smtp.always_reply_to_data(None);
    let r = api.retry(&dead).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["status"], "queued");
    api.wait_status(&dead, "sent").await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_listed_and_previewed_without_sending() {
    let dir = tempfile::tempdir().unwrap();
    let api = TestApp::start(settings(dir.path(), 9), false).await;
    let r = api.templates().await;
    assert_eq!(r.status, StatusCode::OK);
    let kinds: Vec<&str> = r.json["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"welcome") && kinds.contains(&"alert"),
        "{kinds:?}"
    );
    let welcome = &r.json["templates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "welcome")
        .unwrap();
    assert!(
        welcome["variables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "name" && v["required"] == true)
    );

    let r = api
        .post(
            "/v1/templates/welcome/preview",
            &json!({"variables": {"name": "<Ada>", "product": "Postbox"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.json["subject"].as_str().unwrap().contains("Postbox"));
    assert!(r.json["text"].as_str().unwrap().contains("<Ada>"));
    assert!(
        r.json["html"].as_str().unwrap().contains("&#60;Ada&#62;")
            || r.json["html"].as_str().unwrap().contains("&lt;Ada&gt;")
    );

    let r = api.preview("nope", &json!({"variables": {}})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error().0, "unknown_template");
    let r = api
        .post("/v1/templates/password_reset/preview",
            &json!({"variables": {"name": "A", "reset_url": "https://x", "expires_in_minutes": "soon"}}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error().1.as_deref(), Some("variables.expires_in_minutes"));
    assert_eq!(api.app.postbox.counts().await.unwrap().by_status.len(), 0);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_health_report_the_queue_and_the_workers() {
    let smtp = SmtpServer::start().await;
    smtp.reply_to_rcpt("bounce", "550 5.1.1 no such user");
    let dir = tempfile::tempdir().unwrap();
    let mut api = TestApp::start(settings(dir.path(), smtp.port()), true).await;

    let r = api.readyz().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["workers"], "running");
    assert_eq!(r.json["database"], "ok");

    let ok = api.submit(&email("ok@example.com")).await.json["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bad = api.submit(&email("bounce@example.com")).await.json["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.wait_status(&ok, "sent").await;
    api.wait_status(&bad, "failed").await;
    api.app.stop_workers().await;
    for p in ["high", "low"] {
        let mut e = email("later@example.com");
        e["priority"] = json!(p);
        api.submit(&e).await;
    }

    let r = api.stats().await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let s = &r.json;
    assert_eq!(s["last_minute"]["sent"], 1);
    assert_eq!(s["last_minute"]["failed"], 1);
    assert_eq!(s["last_hour"]["sent"], 1);
    assert_eq!(s["depth"]["queued"]["high"], 1);
    assert_eq!(s["depth"]["queued"]["low"], 1);
    assert_eq!(s["totals"]["sent"], 1);
    assert_eq!(s["in_flight"], 0);
    assert!(s["oldest_queued_age_secs"].as_f64().unwrap() >= 0.0);
    assert_eq!(s["workers_running"], false);

    let r = api.readyz().await;
    assert_eq!(
        r.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "workers stopped: not ready"
    );
    assert_eq!(r.json["workers"], "stopped");
    assert_eq!(api.healthz().await.status, StatusCode::OK);
    api.app.start_workers();
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_and_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 9);
    s.api.token = Some(TOKEN.to_string().into());
    s.api.tokens = vec![postbox::config::ApiToken {
        name: "slow".into(),
        token: Some("slow-token-0123456789abcdef".to_string().into()),
        token_env: None,
        rate_per_sec: Some(0.5),
        burst: Some(2),
    }];
    let api = TestApp::start(s, false).await;

    // No token, a wrong one, a malformed header.
    for auth in [
        None,
        Some("Bearer wrong-token-0123456789abcdef"),
        Some(TOKEN),
    ] {
        let mut rb = api
            .client
            .post(format!("{}/v1/emails", api.base))
            .json(&email("a@example.com"));
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert!(r.headers().get("www-authenticate").is_some());
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    for path in ["/v1/emails", "/v1/stats", "/v1/templates"] {
        assert_eq!(
            api.get(path).await.status,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    // Health routes and metrics stay open (api.open_health = true, the default).
    assert_eq!(api.healthz().await.status, StatusCode::OK);
    assert_eq!(api.openapi().await.status, StatusCode::OK);
    assert_eq!(api.metrics().await.status, StatusCode::OK);
    assert_eq!(api.app.postbox.counts().await.unwrap().by_status.len(), 0);

    let api = api.with_token(TOKEN);
    let r = api.submit(&email("a@example.com")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);

    // The slow token: a burst of 2, then 429 with Retry-After.
    let api = api.with_token("slow-token-0123456789abcdef");
    assert_eq!(api.templates().await.status, StatusCode::OK);
    assert_eq!(api.templates().await.status, StatusCode::OK);
    let r = api.templates().await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error().0, "rate_limited");
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    // The default token is not slowed by the other's limit.
    let api = api.with_token(TOKEN);
    for _ in 0..5 {
        assert_eq!(api.templates().await.status, StatusCode::OK);
    }
    api.stop().await;

    // With open_health = false, health and metrics need the token as well.
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 9);
    s.api.token = Some(TOKEN.to_string().into());
    s.api.open_health = false;
    let api = TestApp::start(s, false).await;
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(
            api.get(path).await.status,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    let api = api.with_token(TOKEN);
    let r = api.metrics().await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text.contains("postbox_queue_depth"), "{}", r.text);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_submits_whole_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 9);
    s.queue.max_depth = 3;
    let api = TestApp::start(s, false).await;
    for i in 0..2 {
        let r = api.submit(&email(&format!("u{i}@example.com"))).await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
    }
    // 2 queued + a batch of 2 > 3: the whole batch is refused.
    let r = api
        .post(
            "/v1/emails/batch",
            &json!({"emails": [email("b1@example.com"), email("b2@example.com")]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert_eq!(r.error().0, "queue_full");
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(api.app.count(EmailStatus::Queued).await, 2);
    let r = api.submit(&email("third@example.com")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let r = api.submit(&email("fourth@example.com")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(api.app.count(EmailStatus::Queued).await, 3);
    // Room again once one leaves the queue.
    let first = api.list("limit=1").await.json["emails"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.cancel(&first).await;
    assert_eq!(
        api.submit(&email("fifth@example.com")).await.status,
        StatusCode::ACCEPTED
    );
    api.stop().await;
}

/// A batch that takes several insert statements (chunks of up to 128 emails; on SQLite the
/// depth cap is checked in the last one's text, before its COMMIT) is held to the cap whole:
/// past it nothing of it is stored, within it all of it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_several_chunks_is_held_to_the_cap_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 9);
    s.queue.max_depth = 400;
    let api = TestApp::start(s, false).await;
    let batch = |n: usize, tag: &str| {
        let emails: Vec<Value> = (0..n)
            .map(|i| email(&format!("{tag}{i}@example.com")))
            .collect();
        json!({ "emails": emails })
    };
    let r = api.post("/v1/emails/batch", &batch(300, "a")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let r = api.post("/v1/emails/batch", &batch(200, "b")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert_eq!(r.error().0, "queue_full");
    assert_eq!(api.app.count(EmailStatus::Queued).await, 300);
    let r = api.post("/v1/emails/batch", &batch(100, "c")).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(api.app.count(EmailStatus::Queued).await, 400);
    common::assert_store_consistent(dir.path()).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_replays_refuses_other_payloads_and_survives_a_race() {
    let dir = tempfile::tempdir().unwrap();
    let api = TestApp::start(settings(dir.path(), 9), false).await;
    let body = email("once@example.com");
    let first = api
        .post_with("/v1/emails", &body, &[("idempotency-key", "order-1")])
        .await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    assert!(first.header("idempotent-replayed").is_none());
    // Same payload (keys in another order): the first response, nothing new.
    let reordered = br#"{"text": "Body", "subject": "Hello", "to": ["once@example.com"]}"#.to_vec();
    let again = api
        .raw(
            Method::POST,
            "/v1/emails",
            Some(reordered),
            &[("idempotency-key", "order-1")],
        )
        .await;
    assert_eq!(again.status, first.status);
    assert_eq!(again.text, first.text, "same body");
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(api.app.count(EmailStatus::Queued).await, 1);
    // Another payload with the same key: 409.
    let other = api
        .post_with(
            "/v1/emails",
            &email("other@example.com"),
            &[("idempotency-key", "order-1")],
        )
        .await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(
        other.error(),
        (
            "idempotency_key_reused".into(),
            Some("Idempotency-Key".into())
        )
    );
    // The same key on the batch route is another request, so 409 too.
    let r = api
        .post_with(
            "/v1/emails/batch",
            &json!({"emails": [body.clone()]}),
            &[("idempotency-key", "order-1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(api.app.count(EmailStatus::Queued).await, 1);

    // 20 parallel requests with one new key: one email, twenty identical answers.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let client = api.client.clone();
        let url = format!("{}/v1/emails", api.base);
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .header("idempotency-key", "race-7")
                .json(&email("race@example.com"))
                .send()
                .await
                .unwrap();
            (r.status(), r.text().await.unwrap())
        }));
    }
    let mut bodies = HashSet::new();
    for t in tasks {
        let (status, text) = t.await.unwrap();
        assert_eq!(status, StatusCode::ACCEPTED, "{text}");
        bodies.insert(text);
    }
    assert_eq!(
        bodies.len(),
        1,
        "every racer got the same answer: {bodies:?}"
    );
    assert_eq!(
        api.app.count(EmailStatus::Queued).await,
        2,
        "the race created one email"
    );

    // Batches replay too.
    let batch = json!({"emails": [email("b1@example.com"), email("b2@example.com")]});
    let a = api
        .post_with(
            "/v1/emails/batch",
            &batch,
            &[("idempotency-key", "batch-1")],
        )
        .await;
    let b = api
        .post_with(
            "/v1/emails/batch",
            &batch,
            &[("idempotency-key", "batch-1")],
        )
        .await;
    assert_eq!((a.status, &a.text), (b.status, &b.text));
    assert_eq!(api.app.count(EmailStatus::Queued).await, 4);
    api.stop().await;
}

/// A raw request to the API (reqwest sends our `Host` when one is given).
async fn send(
    api: &TestApp,
    method: Method,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> common::http::Reply {
    let mut rb = api.client.request(method, format!("{}{path}", api.base));
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.body(b.to_string());
    }
    let res = rb.send().await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let text = res.text().await.unwrap();
    common::http::Reply {
        status,
        headers,
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_local_programs_are_served_but_no_web_page_is() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 9);
    s.delivery.default_from = "app@example.com".into();
    s.delivery.allowed_from = vec!["example.com".into()];
    let api = TestApp::start(s, false).await;
    let port = api.base.rsplit(':').next().unwrap().to_string();
    let body = r#"{"to": ["a@example.com"], "subject": "s", "text": "t"}"#;
    let json = ("content-type", "application/json");

    // A program (no browser headers) is served, addressed by any loopback name.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_string(),
    ] {
        let r = send(&api, Method::GET, "/v1/emails", None, &[("host", &host)]).await;
        assert_eq!(r.status, StatusCode::OK, "{host}: {}", r.text);
    }
    let r = send(&api, Method::POST, "/v1/emails", Some(body), &[json]).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    // The dashboard's own same-origin form posts are served too.
    let origin = format!("http://127.0.0.1:{port}");
    let same = [
        json,
        ("origin", origin.as_str()),
        ("sec-fetch-site", "same-origin"),
    ];
    let r = send(&api, Method::POST, "/v1/emails", Some(body), &same).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);

    // DNS rebinding: a page on another name that resolves to 127.0.0.1.
    for path in ["/v1/emails", "/v1/stats", "/ui", "/ui/login", "/metrics"] {
        let r = send(&api, Method::GET, path, None, &[("host", "evil.example")]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.text);
        assert_eq!(r.error(), ("forbidden_host".into(), Some("Host".into())));
        assert!(!r.text.contains("a@example.com"), "{}", r.text);
    }
    // Requests another site started (a no-cors fetch or a form post).
    for headers in [
        vec![json, ("origin", "http://evil.example")],
        vec![json, ("origin", "null")],
        vec![json, ("sec-fetch-site", "cross-site")],
        vec![json, ("sec-fetch-site", "same-site")],
        vec![
            ("content-type", "text/plain"),
            ("sec-fetch-site", "cross-site"),
        ],
        vec![json, ("origin", "http://localhost:1")],
    ] {
        let r = send(&api, Method::POST, "/v1/emails", Some(body), &headers).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{headers:?}: {}", r.text);
        assert_eq!(r.error().0, "cross_site_request", "{headers:?}");
    }
    // A body without a JSON Content-Type (what a no-cors fetch with a Blob sends).
    for headers in [vec![], vec![("content-type", "text/plain")]] {
        let r = send(&api, Method::POST, "/v1/emails", Some(body), &headers).await;
        assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{}", r.text);
        assert_eq!(
            r.error(),
            ("unsupported_media_type".into(), Some("Content-Type".into()))
        );
    }
    // delivery.allowed_from: only example.com may send.
    let r = api
        .post(
            "/v1/emails",
            &json!({"from": "boss@evil.example", "to": ["a@example.com"], "subject": "s", "text": "t"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(r.error(), ("invalid_email".into(), Some("from".into())));
    let r = api
        .post(
            "/v1/emails",
            &json!({"from": "Shop <shop@example.com>", "to": ["a@example.com"], "subject": "s", "text": "t"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(
        api.app.count(EmailStatus::Queued).await,
        3,
        "only the accepted ones"
    );
    api.stop().await;

    // With a token the name in Host does not matter (a bearer token is never sent by a
    // browser on its own).
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 9);
    s.api.token = Some(TOKEN.to_string().into());
    let api = TestApp::start(s, false).await;
    let auth = format!("Bearer {TOKEN}");
    let r = send(
        &api,
        Method::GET,
        "/v1/emails",
        None,
        &[("host", "postbox.internal"), ("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    api.stop().await;
}

/// Reads from `s` until the server closes the connection (or `limit` passes); what it sent.
async fn read_until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let t0 = std::time::Instant::now();
    loop {
        let left = limit.checked_sub(t0.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_idle_and_surplus_connections_are_bounded_and_labels_stay_fixed() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 9);
    s.api.token = Some(TOKEN.to_string().into());
    s.api.header_timeout_secs = 1;
    s.api.body_timeout_secs = 1;
    s.api.max_connections = 3;
    let api = TestApp::start(s, false).await.with_token(TOKEN);
    let addr = api.base.trim_start_matches("http://").to_string();
    let connect = || tokio::net::TcpStream::connect(addr.clone());

    // Headers that never finish (slow loris): the connection is closed after the deadline.
    let mut slow = connect().await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut slow, Duration::from_secs(10))
            .await
            .is_some(),
        "a connection trickling its headers is closed"
    );
    // A keep-alive connection left idle after a request is closed too.
    let mut idle = connect().await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(
        got.as_deref()
            .is_some_and(|g| g.starts_with("HTTP/1.1 200")),
        "{got:?}"
    );
    // A body that stops half way: 408, nothing stored.
    let mut body = connect().await.unwrap();
    body.write_all(
        format!(
            "POST /v1/emails HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"to\": "
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let got = read_until_closed(&mut body, Duration::from_secs(10))
        .await
        .unwrap_or_default();
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("body_timeout"), "{got}");
    assert_eq!(api.app.postbox.counts().await.unwrap().by_status.len(), 0);

    // At most 3 connections: with 3 held open, a 4th is not served until one closes.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = connect().await.unwrap();
        // Half a request keeps each busy until the header deadline.
        c.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(c);
    }
    let fourth = tokio::time::timeout(
        Duration::from_millis(500),
        api.client.get(format!("{}/healthz", api.base)).send(),
    )
    .await;
    assert!(
        fourth.is_err(),
        "served past the connection cap: {fourth:?}"
    );
    // The held ones time out (1 s) and free their slots: the API serves again.
    assert_eq!(api.healthz().await.status, StatusCode::OK);
    drop(held);

    // A made-up method is counted as "other": no new series per method string.
    let r = send(
        &api,
        Method::from_bytes(b"BREW").unwrap(),
        "/v1/emails",
        None,
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let metrics = api.metrics().await.text;
    assert!(!metrics.contains("BREW"), "{metrics}");
    assert!(metrics.contains("method=\"other\""), "{metrics}");

    // /readyz without a token says ready or not, nothing more.
    let anonymous = send(&api, Method::GET, "/readyz", None, &[]).await;
    assert_eq!(anonymous.status, StatusCode::OK);
    assert_eq!(anonymous.json, json!({"status": "ready"}));
    let r = api.readyz().await;
    assert_eq!(r.json["database"], "ok", "{}", r.text);

    // Dashboard forms are small.
    let big = format!("token={}", "x".repeat(64 * 1024));
    let r = send(
        &api,
        Method::POST,
        "/ui/login",
        Some(&big),
        &[("content-type", "application/x-www-form-urlencoded")],
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_cost_a_bounded_error_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let api = TestApp::start(settings(dir.path(), 9), false).await;
    let json = ("content-type", "application/json");
    let before = common::peak_rss_mib(None);

    // 16 MiB of `{}`: millions of values, refused before anything is built.
    let mut huge = String::from("{\"emails\": [");
    while huge.len() < 16 * 1024 * 1024 - 16 {
        huge.push_str("{},");
    }
    huge.push_str("{}]}");
    let r = send(&api, Method::POST, "/v1/emails/batch", Some(&huge), &[json]).await;
    assert_eq!(
        r.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        &r.text[..r.text.len().min(300)]
    );
    assert_eq!(r.error().0, "too_many_values");
    // Under the value bound, a batch past api.max_batch stops at the cap while reading.
    let many = format!("{{\"emails\": [{}{{}}]}}", "{},".repeat(50_000));
    let r = send(&api, Method::POST, "/v1/emails/batch", Some(&many), &[json]).await;
    assert_eq!(r.error(), ("invalid_batch".into(), Some("emails".into())));
    assert!(
        r.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 1000"),
        "{}",
        r.text
    );
    // A list of 100,000 empty recipients: one error, not 100,000.
    let r = send(
        &api,
        Method::POST,
        "/v1/emails",
        Some(&format!(r#"{{"to": [{}""]}}"#, "\"\",".repeat(100_000))),
        &[json],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error().1.as_deref(), Some("to"));
    assert!(r.text.len() < 1000, "{}", r.text);
    // Template variables past their bound.
    let deep = format!(
        r#"{{"to": ["a@example.com"], "template": "welcome", "variables": {{"name": {}1{}}}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let r = send(&api, Method::POST, "/v1/emails", Some(&deep), &[json]).await;
    let field = r.error().1.unwrap_or_default();
    assert!(field.starts_with("variables.name[0]"), "{}", r.text);
    assert!(r.text.contains("nested more than 32 deep"), "{}", r.text);
    // A valid-shaped batch where every email has many bad addresses: at most 100 details
    // (plus one counting the rest), whatever the number of problems.
    let bad: Vec<Value> = (0..1000)
        .map(|_| json!({"to": vec!["x"; 60], "subject": "s", "text": "t"}))
        .collect();
    let r = api.submit_batch(&json!({ "emails": bad })).await;
    assert_eq!(r.error().0, "invalid_batch");
    let details = r.json["error"]["details"].as_array().unwrap();
    assert_eq!(details.len(), 101, "{}", details.len());
    assert!(
        details[100]["message"]
            .as_str()
            .unwrap()
            .contains("more problems")
    );
    assert!(r.text.len() < 64 * 1024, "{} bytes", r.text.len());
    let grew = common::peak_rss_mib(None).saturating_sub(before);
    assert!(grew < 300, "hostile bodies grew the peak RSS by {grew} MiB");

    // Control characters where they make no sense (NUL breaks PostgreSQL's json, ESC a
    // terminal): refused, naming the field.
    for (body, field) in [
        (
            json!({"to": ["a@example.com"], "subject": "a\u{0}b", "text": "t"}),
            "subject",
        ),
        (
            json!({"to": ["a@example.com"], "subject": "a\u{1b}[31m", "text": "t"}),
            "subject",
        ),
        (
            json!({"to": ["a@example.com"], "subject": "s", "text": "a\u{0}b"}),
            "text",
        ),
        (
            json!({"to": ["a@example.com"], "subject": "s", "html": "<b>\u{0}</b>"}),
            "html",
        ),
        (
            json!({"to": ["a\u{0}@example.com"], "subject": "s", "text": "t"}),
            "to[0]",
        ),
        (
            json!({"to": ["a@example.com"], "subject": "s", "text": "t", "metadata": {"k": "v\u{0}"}}),
            "metadata.k",
        ),
        (
            json!({"to": ["a@example.com"], "subject": "s", "text": "t", "idempotency_key": "k\u{0}"}),
            "idempotency_key",
        ),
        (
            json!({"to": ["a@example.com"], "template": "welcome", "variables": {"name": "A\u{0}", "product": "P"}}),
            "variables.name",
        ),
        (
            json!({"to": ["a@example.com"], "subject": "s", "text": "t", "attachments": [{"filename": "a\u{0}.txt", "content_type": "text/plain", "content": ""}]}),
            "attachments[0].filename",
        ),
    ] {
        let r = api.submit(&body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_eq!(r.error().1.as_deref(), Some(field), "{body}: {}", r.text);
    }
    // Tabs, line breaks and form feeds are text: accepted in bodies.
    let r = api
        .post(
            "/v1/emails",
            &json!({"to": ["a@example.com"], "subject": "tab\there", "text": "a\tb\r\nc\u{c}d"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(api.app.count(EmailStatus::Queued).await, 1);
    let list = api.get("/v1/emails").await;
    assert_eq!(
        list.json["emails"][0]["subject"], "tab\there",
        "{}",
        list.text
    );
    api.stop().await;
}

/// Holds the database's write lock from another connection for 1.5 s, sends `post(None)`
/// (the writer then waits for the lock with it), runs `before_queueing`, and sends `n` more,
/// `post(Some(0..n))`: those queue behind the first and are committed as one group. Their
/// statuses, the first's and then theirs in order.
async fn one_group_behind_a_held_writer(
    dir: &std::path::Path,
    post: impl Fn(Option<usize>) -> reqwest::RequestBuilder,
    n: usize,
    before_queueing: impl FnOnce(),
) -> (StatusCode, Vec<StatusCode>) {
    let send =
        |r: reqwest::RequestBuilder| tokio::spawn(async move { r.send().await.unwrap().status() });
    let hold = tokio::spawn({
        let dir = dir.to_path_buf();
        async move { common::hold_writes(&dir, Duration::from_millis(1500)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = send(post(None));
    tokio::time::sleep(Duration::from_millis(200)).await;
    before_queueing();
    let queued: Vec<_> = (0..n).map(|i| send(post(Some(i)))).collect();
    hold.await.unwrap();
    let mut codes = Vec::with_capacity(n);
    for q in queued {
        codes.push(q.await.unwrap());
    }
    (first.await.unwrap(), codes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_commit_is_retried_one_submission_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let api = TestApp::start(settings(dir.path(), 9), false).await;
    // 20 submissions committed as one group, and one of them makes that group's transaction
    // fail.
    let post = |i: Option<usize>| {
        let rid = match i {
            None => "first".to_string(),
            Some(7) => "poisoned-group-7".to_string(),
            Some(i) => format!("group-{i}"),
        };
        api.client
            .post(format!("{}/v1/emails", api.base))
            .header("x-request-id", rid)
            .json(&email("a@example.com"))
    };
    let arm = || postbox::faults::arm(postbox::faults::GROUP_COMMIT_FAIL, "poisoned-group-7", 1);
    let (first, queued) = one_group_behind_a_held_writer(dir.path(), post, 20, arm).await;
    assert_eq!(first, StatusCode::ACCEPTED);
    for q in queued {
        assert_eq!(q, StatusCode::ACCEPTED, "every submission of the group");
    }
    assert_eq!(
        postbox::faults::left(postbox::faults::GROUP_COMMIT_FAIL, "poisoned-group-7"),
        0,
        "the group commit failed"
    );
    assert_eq!(api.app.count(EmailStatus::Queued).await, 21);
    assert_eq!(half_written(dir.path()).await, (0, 0));
    api.stop().await;
}

/// Submissions committed together as one group are each held to the depth cap in turn: a
/// group that does not fit whole is rolled back and decided one submission at a time, so as
/// many go in as fit and the counters stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commit_past_the_cap_lets_in_those_that_fit() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 9);
    s.queue.max_depth = 4;
    let api = TestApp::start(s, false).await;
    // Five submissions committed as one group, and only three of them fit.
    let post = |i: Option<usize>| {
        let to = i.map_or("first@example.com".to_string(), |i| {
            format!("g{i}@example.com")
        });
        api.client
            .post(format!("{}/v1/emails", api.base))
            .json(&email(&to))
    };
    let (first, codes) = one_group_behind_a_held_writer(dir.path(), post, 5, || {}).await;
    assert_eq!(first, StatusCode::ACCEPTED);
    let accepted = codes.iter().filter(|c| **c == StatusCode::ACCEPTED).count();
    let full = codes
        .iter()
        .filter(|c| **c == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert_eq!((accepted, full), (3, 2), "{codes:?}");
    assert_eq!(api.app.count(EmailStatus::Queued).await, 4);
    common::assert_store_consistent(dir.path()).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_writes_is_a_503_naming_it_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), 9);
    s.database.busy_timeout_ms = 100;
    let api = TestApp::start(s, false).await;
    assert_eq!(api.submit(&email("a@example.com")).await.status, 202);
    let outage = tokio::spawn({
        let dir = dir.path().to_path_buf();
        async move { common::db_outage(&dir, Duration::from_millis(1500)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SQLite: the lock is held past the busy timeout (every write is refused); PostgreSQL: the
    // connections are terminated again and again (a write may slip through between).
    let want = if common::on_postgres() {
        "database_unavailable"
    } else {
        "database_busy"
    };
    let (mut accepted, mut refused) = (0, 0);
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_millis(800) {
        let r = api.submit(&email("b@example.com")).await;
        if r.status == StatusCode::ACCEPTED {
            accepted += 1;
            continue;
        }
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
        assert_eq!(r.error().0, want, "{}", r.text);
        assert!(r.header("retry-after").is_some());
        refused += 1;
    }
    if !common::on_postgres() {
        assert!(
            refused > 0 && accepted == 0,
            "{refused} refused, {accepted} accepted"
        );
    }
    outage.await.unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let r = api.submit(&email("c@example.com")).await;
        if r.status == 202 {
            break;
        }
        assert!(t0.elapsed() < LIMIT, "writes never came back: {}", r.text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        api.app.count(EmailStatus::Queued).await,
        2 + accepted,
        "the refused ones were not stored"
    );
    assert_eq!(half_written(dir.path()).await, (0, 0));
    api.stop().await;
}

/// Dashboard sessions are rows every API process shares: capped across all of them (the
/// sessions closest to expiry go first), a flash message taken once, expired rows swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_sessions_are_shared_rows_capped_and_swept() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path(), 1);
    let store = postbox::store::Store::open(&s.database, &s.queue.name)
        .await
        .unwrap();
    let t0 = time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
    for i in 0..5u64 {
        let at = t0 + Duration::from_secs(i);
        store
            .session_create(&format!("s{i}"), "ops", "csrf", at, 3)
            .await
            .unwrap();
    }
    for (id, live) in [("s0", false), ("s1", false), ("s2", true), ("s4", true)] {
        let got = store.session_take(id).await.unwrap();
        assert_eq!(got.is_some(), live, "{id}");
    }
    store
        .session_flash("s4", "done", "re-queued")
        .await
        .unwrap();
    let first = store.session_take("s4").await.unwrap().unwrap();
    assert_eq!(first.flash, Some(("done".into(), "re-queued".into())));
    assert_eq!(store.session_take("s4").await.unwrap().unwrap().flash, None);
    let past = time::OffsetDateTime::now_utc() - Duration::from_secs(1);
    store
        .session_create("old", "ops", "csrf", past, 10)
        .await
        .unwrap();
    assert!(store.session_take("old").await.unwrap().is_none());
    assert_eq!(store.sessions_sweep().await.unwrap(), 1);
    store.close().await;
}
