//! Watcher benchmark against a real Dovecot on 127.0.0.1 (started here, as in the tests), with
//! alerts delivered by the real workers to the test harness's SMTP server.
//!
//! 1. Latency with IDLE: a matching message APPENDed -> its alert accepted by the SMTP server,
//!    one message at a time (N = 50 by default), p50 / p90 / max.
//! 2. Bounce latency with IDLE: a DSN APPENDed to a `purpose = "bounces"` mailbox -> its
//!    recipient's suppression committed, one at a time (N), p50 / p90 / max.
//! 3. Backlog scan: M messages (10,000 by default; 1 in 10 matches) already in the folder, a first
//!    start with `from_start = true`: messages/s until the stored position reaches the last UID,
//!    and the time until the one grouped alert is accepted.
//!
//! Run with `scripts/bench-imap.sh [N] [M]`. Prints figures; asserts nothing.

#[path = "../../tests/it/common/dovecot.rs"]
#[allow(dead_code)]
mod dovecot;
#[path = "../../tests/it/common/ports.rs"]
mod ports;
#[path = "../../tests/it/common/root.rs"]
#[allow(dead_code)]
mod root;
#[path = "../../tests/it/common/smtp.rs"]
#[allow(dead_code)]
mod smtp;
#[path = "../../tests/it/common/tls.rs"]
#[allow(dead_code)]
mod tls;

use std::time::{Duration, Instant, SystemTime};

use postbox::config::{TlsMode, Transport};
use postbox::inbound::MailboxSettings;
use postbox::{Postbox, Settings};

fn settings(dir: &std::path::Path, smtp_port: u16, mailbox: MailboxSettings) -> Settings {
    let mut s = Settings::default();
    s.database.url = format!("sqlite://{}", dir.join("postbox.db").display());
    s.delivery.transport = Transport::Smtp;
    s.smtp.host = "127.0.0.1".into();
    s.smtp.port = smtp_port;
    s.smtp.tls = TlsMode::None;
    s.mailboxes = vec![mailbox];
    s.validate().expect("bench settings");
    s
}

fn mailbox(dv: &dovecot::Dovecot, from_start: bool, rules: &str) -> MailboxSettings {
    dv.mailbox(
        "bench",
        "tls",
        &format!("from_start = {from_start}\n{rules}"),
    )
}

struct Running {
    pb: Postbox,
    stop: tokio::sync::oneshot::Sender<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start(s: Settings) -> Running {
    let pb = Postbox::open(s).await.expect("open postbox");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = postbox::shutdown_signal(async move {
        let _ = rx.await;
    });
    let (a, b) = (pb.clone(), pb.clone());
    let s1 = shutdown.clone();
    let tasks = vec![
        tokio::spawn(async move { a.run_workers_with(s1).await }),
        tokio::spawn(async move { b.run_watchers(shutdown).await }),
    ];
    Running {
        pb,
        stop: tx,
        tasks,
    }
}

impl Running {
    async fn wait_connected(&self) {
        dovecot::wait_watcher(&self.pb, "connected", Duration::from_secs(20)).await;
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        for t in self.tasks {
            let _ = t.await;
        }
        self.pb.close().await;
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(50);
    let m: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10_000);

    // 1. Latency with IDLE.
    {
        let dir = tempfile::tempdir().unwrap();
        let dv = dovecot::Dovecot::start(&dir.path().join("dovecot"));
        let sink = smtp::SmtpServer::start().await;
        let rules = r#"
[[rules]]
name = "incident"
subject = '^INCIDENT'
group_by = ["subject"]
repeat_interval_secs = 0
"#;
        let run = start(settings(
            dir.path(),
            sink.port(),
            mailbox(&dv, false, rules),
        ))
        .await;
        run.wait_connected().await;
        let mut c = dv.client().await;
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let msg = dovecot::message("mon@example.com", &format!("INCIDENT {i}"), "latency");
            // Let the watcher settle back into IDLE, as it would between real messages.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let t0 = SystemTime::now();
            c.append("INBOX", &msg).await;
            let deadline = Instant::now() + Duration::from_secs(30);
            while sink.count() < i + 1 {
                assert!(Instant::now() < deadline, "alert {i} not delivered in 30 s");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let at = sink.received()[i].at;
            lat.push(at.duration_since(t0).unwrap_or_default());
        }
        lat.sort();
        println!(
            "latency append -> alert accepted by SMTP (IDLE, {n} messages): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
            pct(&lat, 0.5).as_secs_f64() * 1e3,
            pct(&lat, 0.9).as_secs_f64() * 1e3,
            lat[lat.len() - 1].as_secs_f64() * 1e3,
        );
        run.stop().await;

        // For reference: how long Dovecot itself takes to announce an APPEND to an IDLE client
        // (a bare async-imap session, no postbox involved).
        let mut watcher = dv.client().await;
        watcher.session.select("INBOX").await.unwrap();
        let mut server = Vec::new();
        let mut session = watcher.session;
        for i in 0..5 {
            let mut idle = session.idle();
            idle.init().await.unwrap();
            let t0 = Instant::now();
            c.append(
                "INBOX",
                &dovecot::message("x@example.com", &format!("probe {i}"), "x"),
            )
            .await;
            let (wait, _stop) = idle.wait_with_timeout(Duration::from_secs(10));
            let _ = wait.await.unwrap();
            server.push(t0.elapsed());
            session = idle.done().await.unwrap();
        }
        server.sort();
        println!(
            "  of which Dovecot's own IDLE notification (APPEND -> EXISTS, bare client, 5 runs): p50 {:.1} ms",
            pct(&server, 0.5).as_secs_f64() * 1e3
        );
    }

    // 2. Bounce latency with IDLE: a DSN (Postfix's format) APPENDed to a bounces mailbox ->
    //    its recipient's suppression committed.
    {
        let dir = tempfile::tempdir().unwrap();
        let dv = dovecot::Dovecot::start(&dir.path().join("dovecot"));
        let sink = smtp::SmtpServer::start().await;
        let mut mb = mailbox(&dv, false, "");
        mb.purpose = postbox::inbound::Purpose::Bounces;
        let run = start(settings(dir.path(), sink.port(), mb)).await;
        run.wait_connected().await;
        let fixture = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/bounces/postfix.eml"
        ))
        .unwrap();
        let mut c = dv.client().await;
        let mut lat = Vec::with_capacity(n);
        for i in 0..n {
            let rcpt = format!("gone{i}@example.org");
            let msg = fixture
                .replace("{ID}", "01KZZZZZZZZZZZZZZZZZZZZZZZ")
                .replace("{RCPT}", &rcpt)
                .replace("{MSGID}", "<none@example.test>")
                .replace('\n', "\r\n");
            tokio::time::sleep(Duration::from_millis(20)).await;
            let t0 = Instant::now();
            c.append("INBOX", msg.as_bytes()).await;
            let filter = postbox::store::SuppressionFilter {
                prefix: Some(rcpt.clone()),
                limit: 1,
                ..Default::default()
            };
            loop {
                if !run.pb.suppressions(&filter).await.unwrap().is_empty() {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "bounce {i} not recorded"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            lat.push(t0.elapsed());
        }
        lat.sort();
        println!(
            "latency bounce appended -> suppression committed (IDLE, {n} DSNs): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms",
            pct(&lat, 0.5).as_secs_f64() * 1e3,
            pct(&lat, 0.9).as_secs_f64() * 1e3,
            lat[lat.len() - 1].as_secs_f64() * 1e3,
        );
        run.stop().await;
    }

    // 3. Backlog scan.
    {
        let dir = tempfile::tempdir().unwrap();
        let dv = dovecot::Dovecot::start(&dir.path().join("dovecot"));
        let sink = smtp::SmtpServer::start().await;
        let mut c = dv.client().await;
        let t0 = Instant::now();
        for i in 0..m {
            let subject = if i % 10 == 0 {
                format!("ERROR job {i} failed")
            } else {
                format!("report {i}")
            };
            c.append(
                "INBOX",
                &dovecot::message("cron@example.com", &subject, "a few lines\nof body\ntext\n"),
            )
            .await;
        }
        println!(
            "backlog: {m} messages appended in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let rules = r#"
[[rules]]
name = "job failed"
subject = '^ERROR job (?P<job>\d+) failed'
"#;
        let t0 = Instant::now();
        let run = start(settings(dir.path(), sink.port(), mailbox(&dv, true, rules))).await;
        let mut connected_at = None;
        loop {
            let st = run.pb.mailboxes().await.unwrap();
            if let Some(s) = st.first() {
                if connected_at.is_none() && s.state == "connected" {
                    connected_at = Some(t0.elapsed());
                }
                if s.last_uid as usize >= m {
                    break;
                }
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "backlog not scanned: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let scanned = t0.elapsed();
        let connected = connected_at.unwrap_or_default();
        while sink.count() < 1 {
            assert!(t0.elapsed() < Duration::from_secs(300), "no alert");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let alerted = t0.elapsed();
        let st = run.pb.mailboxes().await.unwrap();
        let scan_only = scanned.saturating_sub(connected);
        println!(
            "backlog scan of {m} messages (from_start): {:.0} messages/s from login to last UID stored \
             ({:.2} s; connect + login + SELECT {:.2} s; {:.0} messages/s including them); \
             matched {}, alert emails {}, the grouped alert accepted by SMTP {:.2} s after start",
            m as f64 / scan_only.as_secs_f64(),
            scan_only.as_secs_f64(),
            connected.as_secs_f64(),
            m as f64 / scanned.as_secs_f64(),
            st[0].matched,
            sink.count(),
            alerted.as_secs_f64(),
        );
        run.stop().await;
    }
    if let Ok(s) = std::fs::read_to_string("/proc/self/status")
        && let Some(l) = s.lines().find(|l| l.starts_with("VmHWM"))
    {
        println!(
            "peak RSS of the benchmark process: {}",
            l.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
        );
    }
}
