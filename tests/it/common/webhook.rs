//! A webhook receiver for the tests: `tests/support/webhook_receiver.py`, which verifies every
//! signature with the Standard Webhooks reference library (Python, from PyPI: not our code).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokio::io::AsyncBufReadExt;

/// The secret every test endpoint signs with.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The Python receiver (`tests/support/webhook_receiver.py`), killed on drop.
pub struct Receiver {
    child: tokio::process::Child,
    pub port: u16,
    log: PathBuf,
    http: reqwest::Client,
}

impl Receiver {
    pub async fn start(dir: &Path) -> Receiver {
        let python = std::env::var("TEST_PYTHON").unwrap_or_else(|_| {
            panic!(
                "TEST_PYTHON is not set: run the tests with scripts/test.sh, which makes a venv \
                 with the Standard Webhooks reference library (standardwebhooks, PyPI)"
            )
        });
        let log = dir.join("webhooks.jsonl");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/webhook_receiver.py");
        let mut child = tokio::process::Command::new(python)
            .arg(script)
            .arg(SECRET)
            .arg(&log)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the webhook receiver");
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        tokio::io::BufReader::new(out)
            .read_line(&mut line)
            .await
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver said {line:?}"));
        Receiver {
            child,
            port,
            log,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub async fn mode(&self, mode: &str) {
        let r = self
            .http
            .put(format!("http://127.0.0.1:{}/_mode", self.port))
            .body(mode.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// Every request received so far: the complete lines of the receiver's log. A read can
    /// overlap the receiver's append of a line (a read of a regular file takes no lock
    /// against a write in progress), so a last line without its newline is not there yet.
    pub fn requests(&self) -> Vec<Value> {
        complete_lines(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The requests answered 2xx (the mode was ok or slow), first of each webhook-id.
    pub fn delivered(&self) -> Vec<Value> {
        let mut seen = HashSet::new();
        self.requests()
            .into_iter()
            .filter(|r| matches!(r["mode"].as_str(), Some("ok" | "slow")))
            .filter(|r| seen.insert(r["id"].as_str().unwrap().to_string()))
            .collect()
    }
}

/// The JSON lines of `text` that end with a newline (see [`Receiver::requests`]).
fn complete_lines(text: &str) -> Vec<Value> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_line_still_being_written_is_not_read_yet() {
    let one = serde_json::json!({"id": "a"});
    assert_eq!(
        complete_lines("{\"id\": \"a\"}\n{\"id\": \"b"),
        vec![one.clone()]
    );
    assert_eq!(complete_lines("{\"id\": \"a\"}\n"), vec![one]);
    assert!(complete_lines("{\"id\"").is_empty());
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// `name`'s entry in `[[webhooks]]`, posting to `rx` and signing with [`SECRET`]; `events`
/// subscribes to those only (`None`: every event).
pub fn endpoint(
    name: &str,
    rx: &Receiver,
    events: Option<&[&str]>,
) -> postbox::webhooks::WebhookSettings {
    let events = events.map_or(String::new(), |e| {
        format!("\nevents = {}", serde_json::to_string(e).unwrap())
    });
    toml::from_str(&format!(
        "name = \"{name}\"\nurl = \"{}\"\nsecret = \"{SECRET}\"{events}",
        rx.url()
    ))
    .unwrap()
}

/// The webhook dispatchers of a postbox, run in this process until [`Dispatchers::stop`].
pub struct Dispatchers {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Dispatchers {
    pub fn start(pb: &postbox::Postbox) -> Dispatchers {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let pb = pb.clone();
        let task = tokio::spawn(async move {
            pb.run_webhooks(postbox::shutdown_signal(async move {
                let _ = stopped.await;
            }))
            .await
        });
        Dispatchers { stop, task }
    }

    /// Tells them to stop and waits until they have.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}
