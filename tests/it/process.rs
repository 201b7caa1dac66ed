//! The real `postbox` binary as a child process: crash recovery (kill -9), graceful shutdown,
//! the embedded defaults, configuration errors and secrets.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use common::{App, SmtpServer, api_port, bin, settings, spawn_serve, wait_for};
use postbox::{EmailStatus, NewEmail};

const LIMIT: Duration = Duration::from_secs(60);

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("child running");
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "SIGTERM delivered");
}

async fn exit_ok(child: &mut tokio::process::Child) {
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("postbox exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_then_restart_delivers_every_email_with_bounded_duplicates() {
    const N: usize = 400;
    const CONCURRENCY: usize = 8;
    let smtp = SmtpServer::start().await;
    smtp.set_delay(Duration::from_millis(20));
    let dir = tempfile::tempdir().unwrap();
    let app = App::open(settings(dir.path(), smtp.port())).await;
    let batch = (0..N)
        .map(|i| NewEmail::text(&format!("user{i}@example.com"), &format!("n{i}"), "x"))
        .collect();
    let ids: Vec<_> = app
        .postbox
        .submit_many(batch)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();

    let conc = CONCURRENCY.to_string();
    let env = [
        ("POSTBOX_QUEUE__CONCURRENCY", conc.as_str()),
        ("POSTBOX_QUEUE__BATCH_SIZE", conc.as_str()),
    ];
    let mut serve = spawn_serve(dir.path(), smtp.port(), &env);
    wait_for("a third of the batch delivered", LIMIT, || {
        smtp.count() >= N / 3
    })
    .await;
    serve.child.start_kill().unwrap(); // SIGKILL
    serve.child.wait().await.unwrap();
    let at_kill = smtp.count();
    assert!(at_kill < N, "killed mid-batch ({at_kill} of {N} delivered)");

    let mut serve = spawn_serve(dir.path(), smtp.port(), &env);
    let t0 = std::time::Instant::now();
    while app.count(EmailStatus::Sent).await < N as u64 {
        assert!(
            t0.elapsed() < LIMIT,
            "not all sent after restart: {:?}",
            app.postbox.counts().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sigterm(&serve.child);
    exit_ok(&mut serve.child).await;

    let received = smtp.received();
    let got: HashSet<String> = received.iter().map(|r| r.message_id()).collect();
    for id in &ids {
        let r = app.status(id).await;
        assert!(got.contains(&r.message_id), "email {id} never arrived");
    }
    let duplicates = received.len() - N;
    eprintln!("kill -9 at {at_kill} delivered; duplicates after restart: {duplicates}");
    // Claimed and not yet recorded: sends in flight, outcomes not yet committed, and emails
    // claimed ahead of a send slot; all within the jobs a worker holds on SQLite
    // (worker::window): 16 x (concurrency + batch_size), batch_size = CONCURRENCY here.
    const IN_FLIGHT: usize = 16 * (CONCURRENCY + CONCURRENCY);
    assert!(
        duplicates <= IN_FLIGHT,
        "{duplicates} duplicates exceed the {IN_FLIGHT} jobs in flight"
    );
    // Every duplicate is an email whose send was cut off: its timeline says so.
    let mut interrupted = 0;
    for id in &ids {
        if app
            .status(id)
            .await
            .timeline
            .iter()
            .any(|e| e.kind == "interrupted")
        {
            interrupted += 1;
        }
    }
    assert!(
        interrupted >= duplicates && interrupted <= IN_FLIGHT,
        "interrupted {interrupted}, duplicates {duplicates}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_sends_and_exits_zero() {
    const N: usize = 40;
    let smtp = SmtpServer::start().await;
    smtp.set_delay(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let app = App::open(settings(dir.path(), smtp.port())).await;
    let batch = (0..N)
        .map(|i| NewEmail::text(&format!("u{i}@example.com"), "x", "x"))
        .collect();
    app.postbox.submit_many(batch).await.unwrap();

    let env = [
        ("POSTBOX_QUEUE__CONCURRENCY", "4"),
        ("POSTBOX_QUEUE__BATCH_SIZE", "4"),
    ];
    let mut serve = spawn_serve(dir.path(), smtp.port(), &env);
    wait_for("first deliveries", LIMIT, || smtp.count() >= 4).await;
    sigterm(&serve.child);
    exit_ok(&mut serve.child).await;
    let logs = serve.logs().await;
    assert!(logs.contains("shutdown requested"), "{logs}");

    assert_eq!(
        app.count(EmailStatus::Sending).await,
        0,
        "no send left half-done; the child's log:\n{logs}"
    );
    let sent = app.count(EmailStatus::Sent).await;
    assert_eq!(
        sent as usize,
        smtp.count(),
        "every message the server accepted is recorded as sent"
    );
    assert!(sent < N as u64, "stopped before the end of the batch");
    // Jobs the stopped worker had taken (buffered by apalis, or fetched ahead by the writer)
    // are back in the queue, not left to a dead worker until its heartbeat runs out.
    let taken = common::db_scalar(
        dir.path(),
        &format!(
            "SELECT count(*) FROM {} WHERE status IN ('Queued', 'Running')",
            common::jobs_table()
        ),
    )
    .await;
    assert_eq!(
        taken, 0,
        "jobs left taken after a clean stop; the child's log:\n{logs}"
    );

    let mut serve = spawn_serve(dir.path(), smtp.port(), &env);
    let t0 = std::time::Instant::now();
    while app.count(EmailStatus::Sent).await < N as u64 {
        assert!(t0.elapsed() < LIMIT, "not all sent after restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sigterm(&serve.child);
    exit_ok(&mut serve.child).await;
    assert_eq!(smtp.count(), N, "a graceful stop causes no duplicate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_never_appears_in_logs_or_config_output() {
    const SECRET: &str = "s3cr3t-Pa55-xyzzy";
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = App::open(settings(dir.path(), smtp.port())).await;
    let id = app.submit(NewEmail::text("a@example.com", "x", "x")).await;
    let env = [
        ("POSTBOX_SMTP__USERNAME", "postbox"),
        ("POSTBOX_SMTP__PASSWORD", SECRET),
        ("RUST_LOG", "trace"),
    ];
    let mut serve = spawn_serve(dir.path(), smtp.port(), &env);
    app.wait_status(&id, EmailStatus::Sent, LIMIT).await;
    sigterm(&serve.child);
    exit_ok(&mut serve.child).await;
    let logs = serve.logs().await;
    assert!(
        !smtp.auth_seen().is_empty(),
        "the client authenticated with the secret"
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("\0postbox\0{SECRET}"));
    assert!(logs.len() > 1000, "trace logs were captured");
    assert!(
        !logs.contains(SECRET) && !logs.contains(&b64),
        "secret leaked into logs"
    );

    let out = std::process::Command::new(bin())
        .args(["config", "check"])
        .env("POSTBOX_SMTP__USERNAME", "postbox")
        .env("POSTBOX_SMTP__PASSWORD", SECRET)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("password = \"********\"") && !stdout.contains(SECRET),
        "{stdout}"
    );

    // A database password, in `config check` and in the error of a command that cannot
    // connect (nothing listens on port 1).
    let url = format!("postgres://postbox:{SECRET}@127.0.0.1:1/postbox");
    let shown = "postgres://postbox:********@127.0.0.1:1/postbox";
    let check = std::process::Command::new(bin())
        .args(["config", "check"])
        .env("POSTBOX_DATABASE__URL", &url)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{stdout}");
    assert!(
        stdout.contains(shown) && !stdout.contains(SECRET),
        "{stdout}"
    );
    for args in [&["stats"][..], &["status", "01KAQ3N2W4XGZ8Y5B7C9D1E3F5"]] {
        let out = std::process::Command::new(bin())
            .args(args)
            .env("POSTBOX_DATABASE__URL", &url)
            .env("RUST_LOG", "trace")
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{args:?}: {all}");
        assert!(all.contains(shown), "{args:?} names the database: {all}");
        assert!(!all.contains(SECRET), "{args:?} leaked the password: {all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_config_and_no_servers_send_and_serve_write_to_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args([
            "send",
            "--to",
            "Ada <ada@example.com>",
            "--template",
            "welcome",
        ])
        .args(["--var", "name=Ada", "--var", "product=Postbox"])
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(dir.path().join("postbox.db").exists());

    let mut child = tokio::process::Command::new(bin())
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        // No config file; only the API port moves off 8080 so parallel tests never collide.
        .env("POSTBOX_API__LISTEN", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let eml = dir.path().join("outbox").join(format!("{id}.eml"));
    wait_for("the .eml in ./outbox", LIMIT, || eml.exists()).await;
    sigterm(&child);
    exit_ok(&mut child).await;
    let text = std::fs::read_to_string(&eml).unwrap();
    assert!(text.contains("Subject: Welcome to Postbox, Ada"), "{text}");

    let status = std::process::Command::new(bin())
        .args(["status", &id])
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&status.stdout);
    assert!(s.contains("status:      sent"), "{s}");
}

#[test]
fn config_errors_name_the_key_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    // (environment, config file, the key the error must name)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
    const MAILBOX: &str = "[[mailboxes]]\nname = \"monitoring\"\nhost = \"127.0.0.1\"\nusername = \"u\"\npassword_env = \"POSTBOX_TEST_IMAP_PASSWORD\"\nalert_to = [\"ops@example.com\"]\n";
    let bad_regex =
        format!("{MAILBOX}[[mailboxes.rules]]\nname = \"disk full\"\nsubject = \"(?P<host>\"\n");
    let unknown_field =
        format!("{MAILBOX}[[mailboxes.rules]]\nname = \"disk full\"\nsubjcet = \"x\"\n");
    let cases: [Case; 10] = [
        (&[("POSTBOX_SMTP__PORT", "abc")], "", "smtp.port"),
        (
            &[("POSTBOX_TEST_IMAP_PASSWORD", "p")],
            &bad_regex,
            "mailboxes[0].rules[0].subject`: (mailbox \"monitoring\", rule \"disk full\") not a valid regex",
        ),
        (
            &[("POSTBOX_TEST_IMAP_PASSWORD", "p")],
            &unknown_field,
            "mailboxes[0].rules[0].subjcet`: (mailbox \"monitoring\", rule \"disk full\") unknown field `subjcet`",
        ),
        (&[], MAILBOX, "mailboxes[0].password_env"),
        (&[], "[queue]\nconcurency = 3\n", "concurency"),
        (
            &[],
            "[[relays]]\nname = \"a\"\nhost = \"127.0.0.1\"\ntls = \"none\"\n[[routes]]\ntag = \"x\"\nrelays = [\"b\"]\n",
            "routes[0].relays",
        ),
        (
            &[],
            "[[relays]]\nname = \"a\"\nhost = \"127.0.0.1\"\ntls = \"none\"\nper_second = -1\n",
            "relays[0].per_second",
        ),
        (
            &[("DKIM_KEY", "not a key")],
            "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_env = \"DKIM_KEY\"\n",
            "dkim[0].key_env",
        ),
        (
            &[("DKIM_KEY", "AAAA")],
            "[[dkim]]\ndomain = \"example.com\"\nselector = \"bad selector\"\nalgorithm = \"ed25519\"\nkey_env = \"DKIM_KEY\"\n",
            "dkim[0].selector",
        ),
        (
            &[],
            "[delivery]\ntransport = \"carrier-pigeon\"\n",
            "delivery.transport",
        ),
    ];
    for (env, file, key) in cases {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, file).unwrap();
        let out = std::process::Command::new(bin())
            .args(["--config", path.to_str().unwrap(), "config", "check"])
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(key), "error should name {key}: {err}");
    }
    let out = std::process::Command::new(bin())
        .args(["send", "--to", "nope", "--subject", "s", "--text", "t"])
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("to[0]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_public_address_without_a_token_and_serves_http_with_one() {
    const TOKEN: &str = "process-token-0123456789";
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Never binds: the check comes first, so nothing but loopback is ever touched.
    let out = std::process::Command::new(bin())
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .envs(common::child_env(dir.path(), smtp.port()))
        .env("POSTBOX_API__LISTEN", "0.0.0.0:18080")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("api.token"), "{stderr}");

    let mut serve = spawn_serve(
        dir.path(),
        smtp.port(),
        &[("POSTBOX_API__TOKEN", TOKEN), ("RUST_LOG", "debug")],
    );
    let port = api_port(&serve).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://127.0.0.1:{port}/v1/emails");
    let email = serde_json::json!({"to": ["a@example.com"], "subject": "s", "text": "t"});
    let r = client.post(&url).json(&email).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    let r = client
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&email)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    wait_for("delivery through the child", LIMIT, || smtp.count() == 1).await;
    sigterm(&serve.child);
    exit_ok(&mut serve.child).await;
    let logs = serve.logs().await;
    assert!(!logs.contains(TOKEN), "the token never reaches the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_carry_span_fields_with_recipients_masked() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start().await;
    let mut serve = spawn_serve(
        dir.path(),
        smtp.port(),
        &[
            ("POSTBOX_LOG__FORMAT", "json"),
            ("RUST_LOG", "postbox=debug"),
        ],
    );
    let mut port = None;
    wait_for("the API's listening line", LIMIT, || {
        let logs = serve.logs.lock().unwrap();
        port = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["message"] == "HTTP API listening")
            .and_then(|v| v["addr"].as_str()?.rsplit(':').next()?.parse::<u16>().ok());
        port.is_some()
    })
    .await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = client
        .post(format!("http://127.0.0.1:{}/v1/emails", port.unwrap()))
        .header("x-request-id", "log-test-1")
        .json(&serde_json::json!({"to": ["alice.secret@example.com"], "subject": "s", "text": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::ACCEPTED);
    wait_for("delivery", LIMIT, || smtp.count() == 1).await;
    sigterm(&serve.child);
    exit_ok(&mut serve.child).await;
    let logs = serve.logs().await;

    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let in_span = |v: &serde_json::Value, name: &str| -> Option<serde_json::Value> {
        v["spans"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    };
    let request = lines
        .iter()
        .find_map(|v| in_span(v, "request").filter(|s| s["request_id"] == "log-test-1"))
        .expect("a log line inside the request span carries its request_id");
    assert_eq!(request["method"], "POST");
    let sent = lines
        .iter()
        .find(|v| v["message"] == "sent")
        .expect("a `sent` line");
    let deliver = in_span(sent, "deliver").expect("`sent` is logged in the deliver span");
    assert_eq!(deliver["attempt"], 1);
    assert_eq!(deliver["email_id"].as_str().unwrap().len(), 26);
    assert_eq!(sent["level"], "INFO");
    assert!(sent["timestamp"].is_string());
    assert!(
        sent["to"].as_str().unwrap().contains("a***@example.com"),
        "{sent}"
    );
    assert!(
        !logs.contains("alice.secret"),
        "recipient addresses are masked in every line"
    );
}

#[test]
fn send_batch_reports_accepted_and_rejected_lines_and_stats_shows_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mail.jsonl");
    std::fs::write(
        &file,
        [
            r#"{"to": ["a@example.com"], "subject": "one", "text": "t"}"#,
            r#"{"to": ["not an address"], "subject": "two", "text": "t"}"#,
            r#"{"to": ["b@example.com"], "template": "welcome", "variables": {"name": "B", "product": "P"}, "priority": "high"}"#,
            r#"{"to": ["c@example.com"], "subject": "four", "text": "t""#,
            "",
            r#"{"to": ["d@example.com"], "subject": "six", "text": "t", "colour": "red"}"#,
            r#"{"to": ["e@example.com"], "subject": "seven", "text": "t"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(args)
            .current_dir(dir.path())
            .env_clear()
            .envs(common::child_env(dir.path(), 9))
            .output()
            .unwrap()
    };
    let out = run(&["send", "--batch", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "some lines were rejected: {stderr}"
    );
    let accepted: Vec<(&str, &str)> = stdout
        .lines()
        .map(|l| l.split_once('\t').expect("<line>\\t<id>"))
        .collect();
    assert_eq!(
        accepted.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        vec!["1", "3", "7"]
    );
    assert!(accepted.iter().all(|(_, id)| id.len() == 26));
    assert!(stderr.contains("line 2: to[0]:"), "{stderr}");
    assert!(stderr.contains("line 4: "), "{stderr}");
    assert!(
        stderr.contains("line 6: ") && stderr.contains("colour"),
        "{stderr}"
    );
    assert!(stderr.contains("3 accepted, 3 rejected"), "{stderr}");

    let out = run(&["stats", "--json"]);
    assert!(out.status.success());
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["totals"]["queued"], 3);
    assert_eq!(stats["depth"]["queued"]["high"], 1);
    assert_eq!(stats["depth"]["queued"]["normal"], 2);
    let out = run(&["stats"]);
    let table = String::from_utf8_lossy(&out.stdout);
    let queued = table
        .lines()
        .find(|l| l.starts_with("queued "))
        .unwrap_or_else(|| panic!("a queued row: {table}"));
    let cells: Vec<&str> = queued.split_whitespace().collect();
    assert_eq!(cells, vec!["queued", "1", "2", "0", "3"], "{table}");

    let out = run(&["send", "--batch", "/nonexistent.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batch /nonexistent.jsonl"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_a_retryable_503_and_postbox_recovers_by_itself_losing_and_doubling_nothing()
{
    use common::http::{TOKEN, TestApp};
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    // The server's log, shown if this test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,postbox=info")
        .with_test_writer()
        .try_init();
    let disk = common::TmpFs::mount(&dir.path().join("disk"), 64);
    // Room to free later.
    let filler = disk.path.join("filler");
    std::fs::write(&filler, vec![0u8; 40 * 1024 * 1024]).unwrap();
    let smtp = SmtpServer::start().await;
    let mut s = settings(dir.path(), smtp.port());
    s.database.url = format!("sqlite://{}", disk.path.join("postbox.db").display());
    s.api.token = Some(TOKEN.to_string().into());
    let api = TestApp::start(s, true).await.with_token(TOKEN);

    // Batches of 4 KB emails until the disk is full: a 503 naming it, never a 500.
    let body = "x".repeat(4000);
    let mut accepted: Vec<String> = Vec::new();
    let mut refusal = None;
    for round in 0..200 {
        let emails: Vec<_> = (0..200)
            .map(|i| json!({"to": [format!("u{round}-{i}@example.com")], "subject": "s", "text": body}))
            .collect();
        let r = api.submit_batch(&json!({ "emails": emails })).await;
        if r.status == 202 {
            accepted.extend(
                r.json["emails"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["id"].as_str().unwrap().to_string()),
            );
            continue;
        }
        refusal = Some(r);
        break;
    }
    let r = refusal.expect("the disk filled up");
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.error().0, "storage_full", "{}", r.text);
    assert!(r.header("retry-after").is_some());
    assert!(!accepted.is_empty());
    // Readiness says so (writes fail even though reads work).
    let ready = api.readyz().await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert!(
        ready.json["database"].as_str().unwrap().contains("full"),
        "{}",
        ready.text
    );

    // Space comes back: postbox recovers without a restart.
    std::fs::remove_file(&filler).unwrap();
    let t0 = std::time::Instant::now();
    while api.readyz().await.status != 200 {
        assert!(t0.elapsed() < LIMIT, "not ready after space came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Submissions are accepted again (a client retrying after Retry-After): while the backlog
    // gives the WAL's space back, a refusal is still a 503 naming the disk, never a 500.
    let t0 = std::time::Instant::now();
    let r = loop {
        let r = api
            .post(
                "/v1/emails",
                &json!({"to": ["after@example.com"], "subject": "s", "text": "t"}),
            )
            .await;
        if r.status == 202 {
            break r;
        }
        assert_eq!(
            (r.status.as_u16(), r.error().0.as_str()),
            (503, "storage_full"),
            "{}",
            r.text
        );
        if t0.elapsed() > LIMIT {
            let df = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("df -k {0}; ls -la {0}", disk.path.display()))
                .output()
                .unwrap();
            panic!(
                "submissions never accepted again; the disk:\n{}",
                String::from_utf8_lossy(&df.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    accepted.push(r.json["id"].as_str().unwrap().to_string());
    let t0 = std::time::Instant::now();
    while api.app.count(EmailStatus::Sent).await < accepted.len() as u64 {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "not everything accepted was sent: {:?}",
            api.app.postbox.counts().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every 202 delivered, once.
    let received = smtp.received();
    let distinct: HashSet<String> = received.iter().map(|r| r.message_id()).collect();
    assert_eq!(
        distinct.len(),
        accepted.len(),
        "every accepted email arrived"
    );
    assert_eq!(received.len(), accepted.len(), "and none twice");
    api.stop().await;
    drop(disk);
}
