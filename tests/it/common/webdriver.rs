//! A small W3C WebDriver client (over reqwest) and a chromedriver + headless Chromium from
//! Debian's packages, for the dashboard's browser test. Chromium runs with --headless,
//! --no-sandbox, --disable-gpu, no background networking, and a resolver that only knows
//! 127.0.0.1 (the box is offline; nothing else is ever contacted).
//!
//! Kept instead of fantoccini, measured: fantoccini 0.22 (without TLS features) brings 22
//! crates (the webdriver crate with ICU's segmenter and its data, second copies of `cookie`
//! and `http`) and added 73 s to `cargo test --no-run` on this 2-core box, for the ten
//! WebDriver calls one test makes. Every call here is one W3C endpoint.

use super::ports::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    client: reqwest::Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a random loopback port and opens a headless Chromium session.
    pub async fn start() -> Browser {
        for bin in ["/usr/bin/chromedriver", "/usr/bin/chromium"] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} is missing. Run the tests with scripts/test.sh (it installs Debian's \
                 chromium and chromium-driver), or: apt-get install chromium chromium-driver"
            );
        }
        let port = free_port();
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let t0 = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{base}/status")).send().await
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == true
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-default-apps", "--disable-extensions", "--disable-sync",
                    "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                    "--metrics-recording-only", "--window-size=1280,960",
                    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        }}});
        let r: Value = client
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_string();
        let b = Browser {
            driver,
            base,
            session,
            client,
            _profile: profile,
        };
        // Finding an element waits up to 5 s for it (pages load after clicks).
        b.call(
            reqwest::Method::POST,
            "/timeouts",
            Some(json!({"implicit": 5000, "pageLoad": 30000})),
        )
        .await;
        b
    }

    /// Waits until the current URL ends with `suffix` (a click's navigation may still run).
    pub async fn wait_url(&self, suffix: &str) {
        let t0 = Instant::now();
        loop {
            let url = self.url().await;
            if url.ends_with(suffix) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the browser is at {url}, expected ...{suffix}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        match self.try_call(method.clone(), path, body).await {
            Ok(v) => v,
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    /// A WebDriver command; `Err` carries WebDriver's error object.
    async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Value> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut rb = self.client.request(method.clone(), &url);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let v: Value = rb
            .send()
            .await
            .expect("WebDriver call")
            .json()
            .await
            .unwrap();
        if v["value"].get("error").is_some() {
            return Err(v["value"].clone());
        }
        Ok(v["value"].clone())
    }

    /// Runs a script in the page; `Err` while the page is being replaced.
    async fn script(&self, js: &str) -> Result<Value, Value> {
        self.try_call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
        .await
    }

    /// Waits until the document marked by `Element::click_and_load` has been replaced by a
    /// fully loaded one. A click on a form's button returns before the browser leaves the old
    /// page, so without this an element found next can belong to the page being left (and go
    /// stale under the test's hands, or be the old page's `#flash`).
    async fn wait_new_document(&self) {
        let t0 = Instant::now();
        loop {
            let js =
                "return window.__postboxLeft === undefined && document.readyState === 'complete';";
            if self.script(js).await == Ok(Value::Bool(true)) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the click did not load a new page (at {})",
                self.url().await
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    pub async fn url(&self) -> String {
        self.call(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The first element matching a CSS selector.
    pub async fn find(&self, css: &str) -> Element<'_> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        Element {
            b: self,
            id: v[ELEMENT].as_str().unwrap().to_string(),
        }
    }

    pub async fn count(&self, css: &str) -> usize {
        self.call(
            reqwest::Method::POST,
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )
        .await
        .as_array()
        .map_or(0, |a| a.len())
    }

    pub async fn cookie(&self, name: &str) -> Value {
        self.call(reqwest::Method::GET, &format!("/cookie/{name}"), None)
            .await
    }

    /// Saves a PNG of the viewport to `path`.
    pub async fn screenshot(&self, path: &std::path::Path) {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    pub async fn quit(mut self) {
        let _ = self
            .client
            .delete(format!("{}/session/{}", self.base, self.session))
            .send()
            .await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}

pub struct Element<'a> {
    b: &'a Browser,
    id: String,
}

impl Element<'_> {
    pub async fn click(&self) {
        self.b
            .call(
                reqwest::Method::POST,
                &format!("/element/{}/click", self.id),
                Some(json!({})),
            )
            .await;
    }

    /// Clicks something that loads a new page (a form's button, a link) and returns once the
    /// new page has loaded.
    pub async fn click_and_load(&self) {
        self.b
            .script("window.__postboxLeft = true; return true;")
            .await
            .expect("mark the page being left");
        self.click().await;
        self.b.wait_new_document().await;
    }

    pub async fn type_text(&self, text: &str) {
        self.b
            .call(
                reqwest::Method::POST,
                &format!("/element/{}/value", self.id),
                Some(json!({"text": text})),
            )
            .await;
    }

    pub async fn text(&self) -> String {
        self.b
            .call(
                reqwest::Method::GET,
                &format!("/element/{}/text", self.id),
                None,
            )
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}
