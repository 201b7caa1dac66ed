//! The HTTP API served for real on 127.0.0.1 (random port), and a client for it.

use std::time::Duration;

use postbox::{Postbox, Settings};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::App;

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// postbox (facade + optional workers) with its HTTP API listening on a random loopback port.
pub struct TestApp {
    pub app: App,
    pub base: String,
    pub client: reqwest::Client,
    pub token: Option<String>,
    stop: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

/// A response: status, headers and the JSON body (Null when empty or not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub json: Value,
    pub text: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the documented error shape and returns (code, field).
    pub fn error(&self) -> (String, Option<String>) {
        let e = &self.json["error"];
        assert!(
            e["code"].is_string() && e["message"].is_string(),
            "not an error body: {} {}",
            self.status,
            self.text
        );
        let rid = self.json["request_id"].as_str().expect("request_id");
        assert_eq!(Some(rid), self.header("x-request-id"), "request id matches");
        (
            e["code"].as_str().unwrap().to_string(),
            e["field"].as_str().map(str::to_string),
        )
    }
}

impl TestApp {
    /// Opens postbox with `settings` (workers started when `workers`) and serves the API.
    pub async fn start(settings: Settings, workers: bool) -> TestApp {
        let app = if workers {
            App::start(settings).await
        } else {
            App::open(settings).await
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let pb: Postbox = app.postbox.clone();
        let shutdown = postbox::shutdown_signal(async move {
            let _ = rx.await;
        });
        let h = tokio::spawn(async move {
            pb.serve_api(listener, workers, shutdown)
                .await
                .expect("API serves");
        });
        TestApp {
            app,
            base,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .no_proxy()
                .build()
                .unwrap(),
            token: None,
            stop: Some((tx, h)),
        }
    }

    pub fn with_token(mut self, token: &str) -> TestApp {
        self.token = Some(token.to_string());
        self
    }

    /// Sends a request with the configured token (if any) and an optional raw body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut rb = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let res = rb.send().await.expect("HTTP request");
        let status = res.status();
        let headers = res.headers().clone();
        let text = res.text().await.unwrap();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            json,
            text,
        }
    }

    // ---- one helper per endpoint ----------------------------------------------------------

    /// `POST /v1/emails`.
    pub async fn submit(&self, email: &Value) -> Reply {
        self.post("/v1/emails", email).await
    }

    /// `POST /v1/emails/batch`.
    pub async fn submit_batch(&self, body: &Value) -> Reply {
        self.post("/v1/emails/batch", body).await
    }

    /// `GET /v1/emails/{id}`.
    pub async fn email(&self, id: &str) -> Reply {
        self.get(&format!("/v1/emails/{id}")).await
    }

    /// `GET /v1/emails?{query}`.
    pub async fn list(&self, query: &str) -> Reply {
        self.get(&format!("/v1/emails?{query}")).await
    }

    /// `POST /v1/emails/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> Reply {
        self.post(
            &format!("/v1/emails/{id}/cancel"),
            &Value::Object(Default::default()),
        )
        .await
    }

    /// `POST /v1/emails/{id}/retry`.
    pub async fn retry(&self, id: &str) -> Reply {
        self.post(
            &format!("/v1/emails/{id}/retry"),
            &Value::Object(Default::default()),
        )
        .await
    }

    /// `GET /v1/templates`.
    pub async fn templates(&self) -> Reply {
        self.get("/v1/templates").await
    }

    /// `POST /v1/templates/{kind}/preview`.
    pub async fn preview(&self, kind: &str, body: &Value) -> Reply {
        self.post(&format!("/v1/templates/{kind}/preview"), body)
            .await
    }

    /// `GET /v1/stats`.
    pub async fn stats(&self) -> Reply {
        self.get("/v1/stats").await
    }

    /// `GET /v1/mailboxes`.
    pub async fn mailboxes(&self) -> Reply {
        self.get("/v1/mailboxes").await
    }

    /// `GET /healthz`.
    pub async fn healthz(&self) -> Reply {
        self.get("/healthz").await
    }

    /// `GET /readyz`.
    pub async fn readyz(&self) -> Reply {
        self.get("/readyz").await
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> Reply {
        self.get("/metrics").await
    }

    /// `GET /openapi.json`.
    pub async fn openapi(&self) -> Reply {
        self.get("/openapi.json").await
    }

    /// Polls `GET /v1/emails/{id}` until its status is `want` (20 s at most); its last body.
    pub async fn wait_status(&self, id: &str, want: &str) -> Value {
        let t0 = std::time::Instant::now();
        loop {
            let r = self.email(id).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            if r.json["status"] == want {
                return r.json;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "{id} never became {want}: {}",
                r.text
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // ---- any request ------------------------------------------------------------------------

    pub async fn get(&self, path: &str) -> Reply {
        self.raw(Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.raw(
            Method::POST,
            path,
            Some(serde_json::to_vec(body).unwrap()),
            &[],
        )
        .await
    }

    pub async fn post_with(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
        self.raw(
            Method::POST,
            path,
            Some(serde_json::to_vec(body).unwrap()),
            headers,
        )
        .await
    }

    /// Stops the HTTP server (in-flight requests finish) and the workers.
    pub async fn stop(mut self) {
        if let Some((tx, h)) = self.stop.take() {
            let _ = tx.send(());
            h.await.unwrap();
        }
        self.app.stop_workers().await;
    }
}
