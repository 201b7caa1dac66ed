//! Events and webhooks, end to end: `postbox serve` as a child process delivering over real
//! SMTP (the harness server) and posting webhooks to a real HTTP receiver that verifies each
//! signature with the Standard Webhooks reference library (Python, from PyPI: not our code).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::http::TestApp;
use crate::common::webhook::{Dispatchers, Receiver, SECRET, endpoint};
use crate::common::{self, SmtpServer, api_port, settings, spawn_serve, wait_for};

const LIMIT: Duration = Duration::from_secs(40);
const TOKEN: &str = "webhook-test-token-0123456789";

fn config(dir: &Path, receiver: &Receiver, extra: &str) -> PathBuf {
    let path = dir.join("postbox.toml");
    std::fs::write(
        &path,
        format!(
            "[webhook]\ntimeout_secs = 2\nretry_schedule_secs = [1, 1, 1, 1, 1, 1]\npoll_interval_ms = 200\n\
             {extra}\n\
             [[webhooks]]\nname = \"app\"\nurl = \"{}\"\nsecret_env = \"HOOK_SECRET\"\n",
            receiver.url()
        ),
    )
    .unwrap();
    path
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(port: u16) -> Api {
        Api {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> Value {
        let (s, v) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(s, 200, "{path}: {v}");
        v
    }

    async fn submit(&self, to: &str) -> String {
        let (s, v) = self
            .call(
                reqwest::Method::POST,
                "/v1/emails",
                Some(
                    json!({"to": [to], "subject": "Hi", "text": "Hello", "tags": ["billing"],
                            "metadata": {"order": "42"}}),
                ),
            )
            .await;
        assert_eq!(s, 202, "{v}");
        v["id"].as_str().unwrap().to_string()
    }
}

/// The event types each email got at the receiver, in arrival order of their first delivery.
fn types_by_email(delivered: &[Value]) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for r in delivered {
        out.entry(r["email_id"].as_str().unwrap().to_string())
            .or_default()
            .push(r["type"].as_str().unwrap().to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_the_webhook_signed_and_retries_follow_the_schedule() {
    let smtp = SmtpServer::start().await;
    smtp.reply_to_rcpt("bounce", "550 5.1.1 no such user");
    smtp.script_data_replies(&["451 4.3.0 try later"]);
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path()).await;
    let conf = config(dir.path(), &rx, "");
    let conf = conf.to_str().unwrap();
    let serve = spawn_serve(
        dir.path(),
        smtp.port(),
        &[
            ("POSTBOX_CONFIG", conf),
            ("HOOK_SECRET", SECRET),
            ("POSTBOX_API__TOKEN", TOKEN),
        ],
    );
    let api = Api::new(api_port(&serve).await);

    // One deferred then sent (the scripted 451 goes to whichever is sent first), one sent,
    // one dead letter.
    let first = api.submit("first@example.com").await;
    let second = api.submit("second@example.com").await;
    let failed = api.submit("bounce@example.com").await;
    wait_for("all 7 events delivered", LIMIT, || {
        rx.delivered().len() >= 7
    })
    .await;
    let delivered = rx.delivered();
    assert!(
        rx.requests().iter().all(|r| r["verified"] == true),
        "every signature verifies: {:#?}",
        rx.requests()
    );
    let by_email = types_by_email(&delivered);
    let deferred = |id: &String| {
        by_email
            .get(id)
            .is_some_and(|t| t.iter().any(|t| t == "email.deferred"))
    };
    let (retried, sent) = if deferred(&first) {
        (first.clone(), second.clone())
    } else {
        (second.clone(), first.clone())
    };
    let mut want: HashMap<String, Vec<String>> = HashMap::new();
    want.insert(
        retried.clone(),
        vec![
            "email.queued".into(),
            "email.deferred".into(),
            "email.sent".into(),
        ],
    );
    want.insert(
        sent.clone(),
        vec!["email.queued".into(), "email.sent".into()],
    );
    want.insert(
        failed.clone(),
        vec!["email.queued".into(), "email.failed".into()],
    );
    for (id, types) in &want {
        let mut got = by_email.get(id).cloned().unwrap_or_default();
        let mut types = types.clone();
        got.sort();
        types.sort();
        assert_eq!(got, types, "events of {id}: {delivered:#?}");
    }
    // The payload carries what an app needs.
    let fail = delivered
        .iter()
        .find(|r| r["type"] == "email.failed")
        .unwrap();
    let data = &fail["payload"]["data"];
    assert_eq!(data["smtp_code"], 550, "{data}");
    assert_eq!(data["recipients"], json!(["bounce@example.com"]));
    assert_eq!(data["tags"], json!(["billing"]));
    assert_eq!(data["metadata"], json!({"order": "42"}));

    // The feed has the same events, in order, with the same ids; and one email's events.
    let feed = api.get("/v1/events?limit=1000").await;
    let feed_ids: Vec<&str> = feed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    let got_ids: HashSet<&str> = delivered
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(feed_ids.len(), 7, "{feed}");
    assert_eq!(feed_ids.iter().copied().collect::<HashSet<_>>(), got_ids);
    let next = feed["next"].as_str().unwrap();
    let rest = api.get(&format!("/v1/events?after={next}")).await;
    assert_eq!(rest["events"], json!([]), "nothing after the end");

    // Any event is sent again on request by its id, logged or not, with the same webhook-id.
    let first = feed_ids[0].to_string();
    let sent = || {
        rx.requests()
            .iter()
            .filter(|r| r["id"] == first.as_str())
            .count()
    };
    let before = sent();
    let post = reqwest::Method::POST;
    let again = format!("/v1/webhooks/app/events/{first}/redeliver");
    let (s, v) = api.call(post.clone(), &again, None).await;
    assert_eq!(s, 202, "{v}");
    wait_for("the event sent again", LIMIT, || sent() > before).await;
    let (s, v) = api
        .call(
            post.clone(),
            "/v1/webhooks/app/events/evt_999999/redeliver",
            None,
        )
        .await;
    assert_eq!(s, 404, "{v}");
    let (s, v) = api
        .call(post.clone(), "/v1/webhooks/app/events/nope/redeliver", None)
        .await;
    assert_eq!(
        (s, v["error"]["field"].as_str()),
        (400, Some("event_id")),
        "{v}"
    );
    let (s, v) = api
        .call(
            post,
            &format!("/v1/webhooks/none/events/{first}/redeliver"),
            None,
        )
        .await;
    assert_eq!(s, 404, "{v}");
    let mine = api.get(&format!("/v1/emails/{retried}/events")).await;
    let types: Vec<&str> = mine["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["email.queued", "email.deferred", "email.sent"]);

    // The receiver fails: the event is retried on the schedule (1 s) until it takes it.
    rx.mode("500").await;
    let later = api.submit("third@example.com").await;
    wait_for("two failed attempts", LIMIT, || {
        rx.requests()
            .iter()
            .filter(|r| r["mode"] == "500" && r["email_id"] == later.as_str())
            .count()
            >= 3
    })
    .await;
    rx.mode("ok").await;
    wait_for("the events of the third email delivered", LIMIT, || {
        types_by_email(&rx.delivered())
            .get(&later)
            .is_some_and(|t| t.len() == 2)
    })
    .await;
    let tries: Vec<f64> = rx
        .requests()
        .iter()
        .filter(|r| r["email_id"] == later.as_str() && r["type"] == "email.queued")
        .map(|r| r["at"].as_f64().unwrap())
        .collect();
    assert!(tries.len() >= 2, "{tries:?}");
    for w in tries.windows(2) {
        assert!(
            w[1] - w[0] >= 0.85,
            "a retry waited for the schedule's 1 s: {tries:?}"
        );
    }
    let ids: HashSet<String> = rx
        .requests()
        .iter()
        .filter(|r| r["email_id"] == later.as_str() && r["type"] == "email.queued")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "a retry keeps its webhook-id");
    // Recorded with its attempts (a moment after the receiver answered).
    let t0 = std::time::Instant::now();
    loop {
        let deliveries = api.get("/v1/webhooks/app/deliveries").await;
        if deliveries["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["state"] == "delivered" && d["attempts"].as_u64() >= Some(2))
        {
            break;
        }
        assert!(t0.elapsed() < LIMIT, "{deliveries}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A receiver that does not answer: the POST times out (webhook.timeout_secs = 2 here),
    // is recorded as such, and is retried until it is taken.
    rx.mode("hang").await;
    let slow = api.submit("slow@example.com").await;
    let t0 = std::time::Instant::now();
    loop {
        let d = api.get("/v1/webhooks/app/deliveries").await;
        if d["deliveries"].as_array().unwrap().iter().any(|d| {
            d["state"] == "retrying"
                && d["response"]
                    .as_str()
                    .is_some_and(|r| r.contains("no answer within 2 s"))
        }) {
            break;
        }
        assert!(t0.elapsed() < LIMIT, "{d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rx.mode("ok").await;
    wait_for("the slow email's events delivered", LIMIT, || {
        types_by_email(&rx.delivered())
            .get(&slow)
            .is_some_and(|t| t.len() == 2)
    })
    .await;

    // 410 Gone disables the endpoint, and it says why.
    rx.mode("410").await;
    api.submit("fourth@example.com").await;
    let mut hooks = Value::Null;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < LIMIT {
        hooks = api.get("/v1/webhooks").await;
        if hooks["webhooks"][0]["disabled_at"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w = &hooks["webhooks"][0];
    assert!(
        w["disabled_reason"].as_str().unwrap_or("").contains("410"),
        "{hooks}"
    );
    assert!(w.get("secret").is_none(), "a secret is never listed");
    // While it is disabled, the events it has not read age, and /metrics shows it.
    api.submit("fifth@example.com").await;
    let metrics = format!("{}/metrics", api.base);
    let t0 = std::time::Instant::now();
    loop {
        let text = api
            .http
            .get(&metrics)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let lag = text
            .lines()
            .find(|l| l.starts_with("postbox_webhook_lag_seconds{webhook=\"app\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if lag.is_some_and(|l| l > 0.0) {
            break;
        }
        assert!(t0.elapsed() < LIMIT, "no lag reported: {lag:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Enabled again, it catches up with what happened meanwhile; the events that met the 410
    // are failed deliveries, sent again on request.
    rx.mode("ok").await;
    let (s, _) = api
        .call(reqwest::Method::POST, "/v1/webhooks/app/enable", None)
        .await;
    assert_eq!(s, 200);
    let fourth = |t: &str| {
        rx.delivered().iter().any(|r| {
            r["type"] == t && r["payload"]["data"]["recipients"] == json!(["fourth@example.com"])
        })
    };
    let deliveries = api.get("/v1/webhooks/app/deliveries").await;
    let gone: Vec<&Value> = deliveries["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["state"] == "failed" && d["response_code"] == 410)
        .collect();
    assert!(!gone.is_empty(), "{deliveries}");
    for d in gone {
        let (s, v) = api
            .call(
                reqwest::Method::POST,
                &format!("/v1/webhooks/app/deliveries/{}/redeliver", d["id"]),
                None,
            )
            .await;
        assert_eq!(s, 202, "{v}");
    }
    wait_for("the fourth email's events delivered", LIMIT, || {
        fourth("email.queued") && fourth("email.sent")
    })
    .await;
    drop(serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_mid_dispatch_loses_no_event() {
    const N: usize = 40;
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path()).await;
    rx.mode("slow").await;
    let conf = config(dir.path(), &rx, "concurrency = 2");
    let conf = conf.to_str().unwrap();
    let env = [
        ("POSTBOX_CONFIG", conf),
        ("HOOK_SECRET", SECRET),
        ("POSTBOX_API__TOKEN", TOKEN),
    ];
    let serve = spawn_serve(dir.path(), smtp.port(), &env);
    let api = Api::new(api_port(&serve).await);
    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(api.submit(&format!("u{i}@example.com")).await);
    }
    wait_for("some events delivered", LIMIT, || {
        rx.delivered().len() >= 10
    })
    .await;
    // The dispatchers run on a thread of their own, at a lower CPU priority than deliveries.
    let pid = serve.child.id().expect("serve runs");
    assert_eq!(nice_of(&format!("/proc/{pid}")), Some(0), "the process");
    let thread = webhook_thread(pid).expect("a thread named postbox-webhooks");
    assert_eq!(nice_of(&thread), Some(10), "the webhook thread");
    let mut serve = serve;
    serve.child.start_kill().unwrap(); // SIGKILL, posts in flight
    serve.child.wait().await.unwrap();
    let at_kill = rx.delivered().len();
    assert!(
        at_kill < 2 * N,
        "killed mid-dispatch ({at_kill} of {})",
        2 * N
    );

    rx.mode("ok").await;
    let serve = spawn_serve(dir.path(), smtp.port(), &env);
    wait_for("every email's queued and sent events", LIMIT, || {
        let by = types_by_email(&rx.delivered());
        ids.iter().all(|id| {
            by.get(id).is_some_and(|t| {
                t.contains(&"email.queued".to_string()) && t.contains(&"email.sent".to_string())
            })
        })
    })
    .await;
    assert!(rx.requests().iter().all(|r| r["verified"] == true));
    drop(serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_made_over_the_api_are_checked_and_their_secret_shown_once() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::start(settings(dir.path(), 1), false).await;
    for (body, field) in [
        (json!({"name": "x y", "url": "https://h.example/"}), "name"),
        (json!({"name": "x", "url": "ftp://h.example/"}), "url"),
        (json!({"name": "x", "url": "http://h.example/"}), "url"),
        (
            json!({"name": "x", "url": "https://h.example/", "events": ["email.opened"]}),
            "events",
        ),
        (
            json!({"name": "x", "url": "https://h.example/", "secret": "whsec_c2hvcnQ="}),
            "secret",
        ),
        (
            json!({"name": "x", "url": "https://h.example/", "tags": ["a b"]}),
            "tags",
        ),
    ] {
        let r = app.post("/v1/webhooks", &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert_eq!(r.error().1.as_deref(), Some(field), "{body}: {}", r.text);
        assert!(!r.text.contains("c2hvcnQ"), "{}", r.text);
    }
    assert_eq!(
        app.get("/v1/webhooks").await.json,
        json!({"webhooks": []}),
        "nothing was saved"
    );
    let r = app
        .post(
            "/v1/webhooks",
            &json!({"name": "crm", "url": "https://crm.example/hooks", "events": ["email.sent"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let secret = r.json["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"), "{secret}");
    let list = app.get("/v1/webhooks").await;
    assert_eq!(list.json["webhooks"][0]["name"], "crm");
    assert_eq!(list.json["webhooks"][0]["source"], "api");
    assert!(
        !list.text.contains(&secret[6..]),
        "the secret is not listed"
    );
    assert_eq!(
        (
            &list.json["webhooks"][0]["lag"],
            &list.json["webhooks"][0]["lag_capped"]
        ),
        (&json!(0), &json!(false)),
        "a new endpoint starts at the end of the feed: {}",
        list.text
    );
    // A row already behind the endpoint's place in feed order (tx, seq), though its seq is
    // newer (on PostgreSQL: an older transaction that committed later) is not lag.
    let old_tx = "INSERT INTO postbox_events (email_id, at, kind, status, tx)
        VALUES ('01KAAAAAAAAAAAAAAAAAAAAAAA', 1, 'submitted', 'queued', -1)";
    common::db_exec(dir.path(), old_tx, old_tx).await;
    let w = &app.get("/v1/webhooks").await.json["webhooks"][0];
    assert_eq!(
        (&w["lag"], &w["lag_seconds"]),
        (&json!(0), &json!(0.0)),
        "{w}"
    );
    // No dispatcher runs here: every email.queued event stays unread. The listing counts at
    // most 10,000 of them (a bounded read, however far behind an endpoint is) and says so.
    let emails: Vec<Value> = (0..1_000)
        .map(|i| json!({"to": [format!("lag{i}@example.com")], "subject": "s", "text": "t"}))
        .collect();
    let r = app
        .post("/v1/emails/batch", &json!({"emails": emails}))
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let w = &app.get("/v1/webhooks").await.json["webhooks"][0];
    assert_eq!(
        (&w["lag"], &w["lag_capped"]),
        (&json!(1_000), &json!(false)),
        "{w}"
    );
    // 10,000 more unread events, written directly (11,000 submits take 40 s in a debug build).
    let copies = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 10)
        INSERT INTO postbox_events (email_id, at, kind, status, detail)
        SELECT e.email_id, e.at, e.kind, e.status, e.detail FROM postbox_events e, n
         WHERE e.kind = 'submitted'";
    common::db_exec(dir.path(), copies, copies).await;
    let w = &app.get("/v1/webhooks").await.json["webhooks"][0];
    assert_eq!(
        (&w["lag"], &w["lag_capped"]),
        (&json!(10_000), &json!(true)),
        "{w}"
    );
    assert!(w["lag_seconds"].as_f64().is_some_and(|s| s >= 0.0), "{w}");
    let r = app.get("/v1/events?after=junk").await;
    assert_eq!(
        (r.status.as_u16(), r.error().1.as_deref()),
        (400, Some("after"))
    );
    let r = app.get("/v1/events?limit=0").await;
    assert_eq!(
        (r.status.as_u16(), r.error().1.as_deref()),
        (400, Some("limit"))
    );
    let r = app
        .raw(reqwest::Method::DELETE, "/v1/webhooks/crm", None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = app
        .raw(reqwest::Method::DELETE, "/v1/webhooks/crm", None, &[])
        .await;
    assert_eq!(r.status, 404);
    common::assert_store_consistent(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suppression_list_over_the_api_adds_lists_and_removes_and_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::start(settings(dir.path(), 1), false).await;
    for (body, field) in [
        (json!({"address": "not an address"}), "address"),
        (
            json!({"address": "a@example.com", "reason": "angry"}),
            "reason",
        ),
        (
            json!({"address": "a@example.com", "detail": "x\u{0}y"}),
            "detail",
        ),
    ] {
        let r = app.post("/v1/suppressions", &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert_eq!(r.error().1.as_deref(), Some(field), "{}", r.text);
    }
    for a in ["Zed@Example.com", "amy@example.com", "amos@example.org"] {
        let r = app
            .post(
                "/v1/suppressions",
                &json!({"address": a, "reason": "complaint"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let r = app.get("/v1/suppressions?prefix=AM&limit=1").await;
    assert_eq!(
        r.json["suppressions"][0]["address"], "amos@example.org",
        "{}",
        r.text
    );
    let next = r.json["next"].as_str().unwrap().to_string();
    let r = app
        .get(&format!("/v1/suppressions?prefix=am&limit=1&after={next}"))
        .await;
    assert_eq!(
        r.json["suppressions"][0]["address"], "amy@example.com",
        "{}",
        r.text
    );
    let r = app.get("/v1/suppressions?reason=complaint").await;
    assert_eq!(r.json["suppressions"].as_array().unwrap().len(), 3);
    assert_eq!(r.json["suppressions"][2]["address"], "zed@example.com");
    let r = app.get("/v1/suppressions?reason=nope").await;
    assert_eq!(
        (r.status.as_u16(), r.error().1.as_deref()),
        (400, Some("reason"))
    );
    let r = app
        .raw(
            reqwest::Method::DELETE,
            "/v1/suppressions/ZED@example.com",
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = app
        .raw(
            reqwest::Method::DELETE,
            "/v1/suppressions/zed@example.com",
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_click_unsubscribe_suppresses_the_recipient_on_post_only() {
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), smtp.port());
    s.api.public_url = Some("https://mail.example.test".into());
    let app = TestApp::start(s, true).await;
    let r = app
        .submit(
            &json!({"to": ["a@example.com", "b@example.com"], "subject": "News", "text": "x",
                        "one_click_unsubscribe": true}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.error().1.as_deref(), Some("one_click_unsubscribe"));

    let r = app
        .submit(
            &json!({"to": ["Reader@Example.com"], "subject": "News", "text": "x",
                        "one_click_unsubscribe": true}),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let id = r.json["id"].as_str().unwrap().to_string();
    app.wait_status(&id, "sent").await;
    let data = &smtp.received()[0].data;
    let link = common::smtp::header(data, "List-Unsubscribe").expect("List-Unsubscribe");
    assert_eq!(
        common::smtp::header(data, "List-Unsubscribe-Post").as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
    let path = link
        .trim_start_matches("<https://mail.example.test")
        .trim_end_matches('>')
        .to_string();
    assert!(path.starts_with("/u/"), "{link}");

    // A GET (a client's prefetch) changes nothing.
    let r = app.raw(reqwest::Method::GET, &path, None, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.contains("reader@example.com"), "{}", r.text);
    assert_eq!(
        app.get("/v1/suppressions").await.json["suppressions"],
        json!([])
    );
    // A forged or damaged link does nothing.
    let bad = format!("{}x", &path[..path.len() - 1]);
    let r = app
        .raw(
            reqwest::Method::POST,
            &bad,
            Some(b"List-Unsubscribe=One-Click".to_vec()),
            &[],
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    // The POST unsubscribes: suppressed with the email as source, and the email's event.
    let r = app
        .raw(
            reqwest::Method::POST,
            &path,
            Some(b"List-Unsubscribe=One-Click".to_vec()),
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let list = app.get("/v1/suppressions").await.json;
    assert_eq!(
        list["suppressions"][0]["address"], "reader@example.com",
        "{list}"
    );
    assert_eq!(list["suppressions"][0]["reason"], "unsubscribe");
    assert_eq!(list["suppressions"][0]["source_email"], id.as_str());
    let ev = app.get(&format!("/v1/emails/{id}/events")).await.json;
    let types: Vec<&str> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["email.queued", "email.sent", "email.unsubscribed"]);
    // And the next newsletter to that reader is not sent.
    let r = app
        .submit(&json!({"to": ["reader@example.com"], "subject": "More news", "text": "x"}))
        .await;
    app.wait_status(r.json["id"].as_str().unwrap(), "suppressed")
        .await;
    assert_eq!(smtp.count(), 1);
}

/// A retry whose event retention deleted ends `failed` with the reason (it is not sent, and
/// does not come due again and again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_event_is_gone_ends_failed() {
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path()).await;
    rx.mode("500").await;
    let mut s = settings(dir.path(), smtp.port());
    s.webhooks = vec![endpoint("app", &rx, Some(&["email.sent"]))];
    s.webhook.retry_schedule_secs = vec![1, 1, 1, 1, 1, 1];
    let app = TestApp::start(s, true).await;
    let hooks = Dispatchers::start(&app.app.postbox);
    let r = app
        .submit(&json!({"to": ["a@example.com"], "subject": "x", "text": "y"}))
        .await;
    let id = r.json["id"].as_str().unwrap().to_string();
    let deliveries = || async { app.get("/v1/webhooks/app/deliveries").await.json };
    let t0 = std::time::Instant::now();
    while deliveries().await["deliveries"][0]["state"] != "retrying" {
        assert!(t0.elapsed() < LIMIT, "{}", deliveries().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Retention takes the email's timeline (the events) away.
    let del = format!("DELETE FROM postbox_events WHERE email_id = '{id}'");
    common::db_exec(dir.path(), &del, &del).await;
    rx.mode("ok").await;
    let t0 = std::time::Instant::now();
    loop {
        let d = deliveries().await;
        let d = &d["deliveries"][0];
        if d["state"] == "failed" {
            assert!(
                d["response"].as_str().unwrap().contains("no longer kept"),
                "{d}"
            );
            break;
        }
        assert!(t0.elapsed() < LIMIT, "{d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rx.delivered().is_empty(), "nothing was sent");
    let hooks_state = app.get("/v1/webhooks").await.json;
    assert!(
        hooks_state["webhooks"][0]["disabled_at"].is_null(),
        "{hooks_state}"
    );
    hooks.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_their_own_thread_the_dispatchers_run_on_the_workers_runtime() {
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(dir.path()).await;
    let mut s = settings(dir.path(), smtp.port());
    s.webhooks = vec![endpoint("threadless", &rx, Some(&["email.sent"]))];
    // The webhook thread cannot be started.
    postbox::faults::arm(postbox::faults::WEBHOOK_THREAD_FAIL, "threadless", 1);
    let app = TestApp::start(s, true).await;
    let hooks = Dispatchers::start(&app.app.postbox);
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = app
            .submit(&json!({"to": [format!("t{i}@example.com")], "subject": "x", "text": "y"}))
            .await;
        ids.push(r.json["id"].as_str().unwrap().to_string());
    }
    wait_for("every email's sent event at the receiver", LIMIT, || {
        let by = types_by_email(&rx.delivered());
        ids.iter().all(|id| {
            by.get(id)
                .is_some_and(|t| t.contains(&"email.sent".to_string()))
        })
    })
    .await;
    assert_eq!(
        postbox::faults::left(postbox::faults::WEBHOOK_THREAD_FAIL, "threadless"),
        0,
        "the thread was refused"
    );
    assert!(rx.requests().iter().all(|r| r["verified"] == true));
    hooks.stop().await;
}

/// Process `pid`'s webhook thread's `/proc` directory (the kernel keeps 15 bytes of a name).
fn webhook_thread(pid: u32) -> Option<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .filter_map(|t| t.ok())
        .map(|t| t.path().display().to_string())
        .find(|t| {
            std::fs::read_to_string(format!("{t}/comm"))
                .is_ok_and(|c| c.trim() == "postbox-webhook")
        })
}

/// The nice value in `/proc/.../stat` (field 19; the fields after the name start at 3).
fn nice_of(dir: &str) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(16)?.parse().ok()
}
