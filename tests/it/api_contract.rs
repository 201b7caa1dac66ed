//! The API's contract: the OpenAPI document validates and lists exactly what is served, and no
//! generated or mutated body ever yields a 500 or a half-written email.

use crate::common;

use std::collections::BTreeSet;

use common::half_written;
use common::http::{TOKEN, TestApp};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Every `$ref` in the document points at something that exists.
fn check_refs(doc: &Value, v: &Value, at: &str) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                let ptr = r.strip_prefix('#').expect("local ref");
                assert!(doc.pointer(ptr).is_some(), "{at}: dangling $ref {r}");
            }
            for (k, x) in m {
                check_refs(doc, x, &format!("{at}/{k}"));
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_refs(doc, x, &format!("{at}/{i}"));
            }
        }
        _ => {}
    }
}

/// Not the router's own 404/405: a handler answered.
fn served(r: &common::http::Reply) -> bool {
    let code = r.json["error"]["code"].as_str().unwrap_or("");
    let routed_404 = r.status == StatusCode::NOT_FOUND
        && code == "not_found"
        && r.json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .starts_with("no route");
    !(routed_404 || r.status == StatusCode::METHOD_NOT_ALLOWED)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_validates_and_lists_exactly_the_served_routes() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = common::settings(dir.path(), 9);
    s.api.token = Some(TOKEN.to_string().into());
    let api = TestApp::start(s, false).await.with_token(TOKEN);
    let r = api.openapi().await;
    assert_eq!(r.status, StatusCode::OK);
    let spec = oas3::from_json(&r.text).expect("a valid OpenAPI 3.1 document");
    let version = spec.validate_version().expect("a supported version");
    assert_eq!((version.major, version.minor), (3, 1), "OpenAPI 3.1");
    check_refs(&r.json, &r.json, "");

    let mut documented = BTreeSet::new();
    for (path, method, op) in spec.operations() {
        assert!(
            !op.responses(&spec).is_empty(),
            "{method} {path} documents responses"
        );
        documented.insert((method.as_str().to_string(), path));
    }
    for want in [
        ("POST", "/v1/emails"),
        ("GET", "/v1/emails"),
        ("POST", "/v1/emails/batch"),
        ("GET", "/v1/emails/{id}"),
        ("POST", "/v1/emails/{id}/cancel"),
        ("POST", "/v1/emails/{id}/retry"),
        ("GET", "/v1/templates"),
        ("POST", "/v1/templates/{kind}/preview"),
        ("GET", "/v1/stats"),
        ("GET", "/v1/mailboxes"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/openapi.json"),
        ("GET", "/metrics"),
    ] {
        assert!(
            documented.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} is documented"
        );
    }

    // Probe every documented path (and a few others) with every method: a route is served
    // exactly when the document lists it.
    let mut paths: BTreeSet<String> = documented.iter().map(|(_, p)| p.clone()).collect();
    for extra in ["/v1", "/v1/emails/{id}/send", "/v1/template", "/"] {
        paths.insert(extra.to_string());
    }
    for path in &paths {
        let concrete = path
            .replace("{id}", "01KAQ3N2W4XGZ8Y5B7C9D1E3F5")
            .replace("{kind}", "welcome");
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            let m = Method::from_bytes(method.as_bytes()).unwrap();
            let body = (method != "GET").then(|| b"{}".to_vec());
            let r = api.raw(m, &concrete, body, &[]).await;
            let listed = documented.contains(&(method.to_string(), path.clone()));
            assert_eq!(
                served(&r),
                listed,
                "{method} {path}: {} {}",
                r.status,
                r.text
            );
        }
    }
    api.stop().await;
}

/// A mutation of a valid email body: drop, retype or corrupt a field, or add junk.
fn mutated_email() -> impl Strategy<Value = Value> {
    let field = prop::sample::select(vec![
        "to",
        "cc",
        "bcc",
        "from",
        "reply_to",
        "subject",
        "text",
        "html",
        "template",
        "variables",
        "headers",
        "tags",
        "metadata",
        "attachments",
        "send_at",
        "expires_at",
        "priority",
        "idempotency_key",
        "bogus",
    ]);
    let junk = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
        "[a-z]{0,8}@[a-z]{0,8}\\.?[a-z]{0,3}".prop_map(|s| json!([s])),
        ".{0,20}".prop_map(|s| json!({ "X-Any": s, "Subject": "x\r\ny" })),
        Just(json!([{"filename": "a", "content_type": "text/plain", "content": "!!notbase64"}])),
        Just(json!("2026-13-45T99:00:00Z")),
        Just(json!({"name": 5})),
        Just(Value::Array(vec![json!("a@b.c"); 60])),
    ];
    (prop::collection::vec((field, junk), 0..4), any::<bool>()).prop_map(|(edits, template)| {
        let mut base = if template {
            json!({"to": ["ada@example.com"], "template": "welcome",
                   "variables": {"name": "Ada", "product": "P"}})
        } else {
            json!({"to": ["ada@example.com"], "subject": "Hi", "text": "Body"})
        };
        for (k, v) in edits {
            base[k] = v;
        }
        base
    })
}

fn random_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[derive(Debug, Clone)]
enum Body {
    Email(Value),
    Batch(Vec<Value>),
    Json(Value),
    Bytes(Vec<u8>),
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        4 => mutated_email().prop_map(Body::Email),
        2 => prop::collection::vec(mutated_email(), 0..5).prop_map(Body::Batch),
        1 => random_json().prop_map(Body::Json),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Body::Bytes),
    ]
}

#[test]
fn generated_bodies_never_yield_a_500_or_a_half_written_email() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = rt.block_on(TestApp::start(common::settings(dir.path(), 9), false));
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    let accepted = std::sync::atomic::AtomicU64::new(0);
    let result = runner.run(&body(), |b| {
        let (path, bytes) = match &b {
            Body::Email(v) | Body::Json(v) => ("/v1/emails", serde_json::to_vec(v).unwrap()),
            Body::Batch(items) => (
                "/v1/emails/batch",
                serde_json::to_vec(&json!({ "emails": items })).unwrap(),
            ),
            Body::Bytes(raw) => ("/v1/emails", raw.clone()),
        };
        let before = rt.block_on(api.app.postbox.counts()).unwrap().by_status;
        let r = rt.block_on(api.raw(Method::POST, path, Some(bytes), &[]));
        prop_assert!(
            r.status.is_client_error() || r.status == StatusCode::ACCEPTED,
            "{:?} -> {} {}",
            b,
            r.status,
            r.text
        );
        let after = rt.block_on(api.app.postbox.counts()).unwrap().by_status;
        if r.status.is_client_error() {
            r.error();
            prop_assert_eq!(before, after, "a refused request changed nothing");
        } else {
            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    });
    result.unwrap();
    let accepted = accepted.into_inner();
    assert!(
        accepted > 10,
        "the generator also makes valid emails ({accepted})"
    );
    assert_eq!(rt.block_on(half_written(dir.path())), (0, 0));
    rt.block_on(api.stop());
}
