//! Several postbox processes on one PostgreSQL (the throwaway server scripts/test.sh starts):
//! real child processes, killed with SIGKILL.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::dovecot::{self, Dovecot};
use common::smtp::Received;
use common::{Serve, SmtpServer, api_port, fresh_pg_database, psql, spawn_postbox, wait_for};
use serde_json::json;

const TOTAL: usize = 10_000;
const CONCURRENCY: usize = 16;

fn count(url: &str, sql: &str) -> i64 {
    psql(url, sql).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_api_and_three_workers_deliver_10k_emails_through_a_kill_9() {
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_pg_database();
    let concurrency = CONCURRENCY.to_string();
    let env = [
        ("POSTBOX_DATABASE__URL", url.as_str()),
        ("POSTBOX_QUEUE__CONCURRENCY", concurrency.as_str()),
        ("POSTBOX_QUEUE__BATCH_SIZE", concurrency.as_str()),
        ("POSTBOX_QUEUE__POLL_INTERVAL_MS", "1000"),
        ("POSTBOX_DATABASE__MAX_CONNECTIONS", "12"),
    ];
    let api = spawn_postbox("api", dir.path(), smtp.port(), &env);
    let port = api_port(&api).await;
    let mut workers: Vec<Serve> = (0..3)
        .map(|_| spawn_postbox("worker", dir.path(), smtp.port(), &env))
        .collect();

    // 10,000 emails in batches of 500 through the API process.
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    for b in 0..TOTAL / 500 {
        let emails: Vec<_> = (0..500)
            .map(|i| {
                json!({"to": [format!("u{}@example.com", b * 500 + i)],
                       "subject": format!("n {}", b * 500 + i), "text": "hello"})
            })
            .collect();
        let r = http
            .post(format!("http://127.0.0.1:{port}/v1/emails/batch"))
            .json(&json!({ "emails": emails }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
    let submitted = t0.elapsed();

    // Kill one worker mid-run, with sends in flight.
    wait_for("3,000 deliveries", Duration::from_secs(120), || {
        smtp.count() >= 3_000
    })
    .await;
    let victim = workers.remove(0);
    let mut child = victim.child;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let killed_at = smtp.count();

    let t1 = Instant::now();
    loop {
        let sent = count(
            &url,
            "SELECT count(*) FROM postbox_emails WHERE status = 'sent'",
        );
        if sent == TOTAL as i64 {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(180),
            "only {sent} of {TOTAL} sent after the kill; statuses: {}",
            psql(
                &url,
                "SELECT string_agg(status || '=' || n, ' ') FROM
                   (SELECT status, count(*) AS n FROM postbox_emails GROUP BY status) s"
            )
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let all = t0.elapsed();

    // Every email arrived; the only repeats are sends the killed worker had in flight.
    let got = smtp.received();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for r in &got {
        *per_id.entry(r.message_id()).or_default() += 1;
    }
    assert_eq!(per_id.len(), TOTAL, "distinct Message-IDs received");
    let dups: HashSet<String> = per_id
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    let extra = got.len() - TOTAL;
    let interrupted_ids: HashSet<String> = psql(
        &url,
        "SELECT e.message_id FROM postbox_emails e WHERE EXISTS
           (SELECT 1 FROM postbox_events v WHERE v.email_id = e.id AND v.kind = 'interrupted')",
    )
    .lines()
    .map(str::to_string)
    .collect();
    eprintln!(
        "submitted {TOTAL} in {submitted:?}; all sent in {all:?}; killed at {killed_at} received; \
         {extra} duplicate sends; {} sends interrupted by the kill",
        interrupted_ids.len()
    );
    // In flight in one worker (worker::window, PostgreSQL): twice concurrency + batch_size
    // (= CONCURRENCY here): sends, outcomes not yet committed, and emails claimed and waiting
    // for a slot.
    let in_flight = 4 * CONCURRENCY;
    assert!(
        interrupted_ids.len() <= in_flight,
        "more interrupted sends ({}) than the killed worker could have in flight ({in_flight})",
        interrupted_ids.len()
    );
    assert!(extra <= interrupted_ids.len(), "{extra} duplicates");
    for id in &dups {
        assert!(
            interrupted_ids.contains(id),
            "{id} arrived twice but was not a send in flight at the kill ({interrupted_ids:?})"
        );
    }
    // Jobs the dead worker had finished but not yet acknowledged (apalis writes acks in
    // batches) are re-queued after its heartbeat lapses and then run as no-ops: the queue
    // drains completely.
    wait_for("every job to finish", Duration::from_secs(60), || {
        count(
            &url,
            "SELECT count(*) FROM apalis.jobs WHERE status IN ('Pending', 'Queued', 'Running')",
        ) == 0
    })
    .await;
    assert_eq!(smtp.count(), got.len(), "the no-op re-runs sent nothing");
    let depth = count(
        &url,
        "SELECT sum(n) FROM postbox_counters WHERE name = 'depth'",
    );
    assert_eq!(depth, 0, "the sharded depth counter is exact");
    for w in workers {
        drop(w);
    }
    drop(api);
}

/// Each message is its own group, so a message alerting twice shows as a second email.
const RULE: &str = r#"
idle = true
reconnect_min_ms = 100
reconnect_max_secs = 1
connect_timeout_secs = 2
command_timeout_secs = 5
[[mailboxes.rules]]
name = "incident"
subject = '^INCIDENT (?P<n>\d+)'
group_by = ["subject"]
repeat_interval_secs = 0
"#;

fn incidents(got: &[Received]) -> Vec<u32> {
    let re = regex::Regex::new(r"INCIDENT (\d+)").unwrap();
    let mut n: Vec<u32> = got
        .iter()
        .map(|r| {
            let m = mail_parser::MessageParser::default()
                .parse(&r.data)
                .unwrap();
            let text = m.body_text(0).unwrap_or_default().to_string();
            re.captures(&text).expect("an incident number")[1]
                .parse()
                .unwrap()
        })
        .collect();
    n.sort();
    n
}

fn holder(url: &str) -> String {
    psql(
        url,
        "SELECT holder FROM postbox_leases WHERE name = 'mailbox:mon' AND expires_at >= \
         (extract(epoch from clock_timestamp()) * 1000)::bigint",
    )
}

/// Two `serve` processes watching one mailbox (`mon` on `dv`, lease of 3 s) on a fresh
/// PostgreSQL database: A started first and holding the lease, then B, and A's watcher
/// connected. Returns (A, B, the database URL).
async fn two_watchers(
    dir: &std::path::Path,
    dv: &Dovecot,
    smtp: &SmtpServer,
) -> (Serve, Serve, String) {
    let url = fresh_pg_database();
    let config = dir.join("postbox.toml");
    std::fs::write(
        &config,
        format!(
            "[cluster]\nlease_secs = 3\n\n[[mailboxes]]\n{}",
            dv.mailbox_toml("mon", "none", RULE)
        ),
    )
    .unwrap();
    let env = [
        ("POSTBOX_DATABASE__URL", url.as_str()),
        ("POSTBOX_CONFIG", config.to_str().unwrap()),
        ("POSTBOX_API__ENABLED", "false"),
    ];
    let a = spawn_postbox("serve", dir, smtp.port(), &env);
    wait_for("the schema", Duration::from_secs(20), || {
        psql(
            &url,
            "SELECT to_regclass('public.postbox_leases') IS NOT NULL",
        ) == "t"
    })
    .await;
    let pid_a = a.child.id().unwrap();
    wait_for(
        "process A to hold the lease",
        Duration::from_secs(20),
        || holder(&url).contains(&format!("-{pid_a}-")),
    )
    .await;
    let b = spawn_postbox("serve", dir, smtp.port(), &env);
    wait_for("A's watcher to connect", Duration::from_secs(20), || {
        psql(
            &url,
            "SELECT state FROM postbox_mailboxes WHERE name = 'mon'",
        ) == "connected"
    })
    .await;
    (a, b, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_share_one_mailbox_through_a_lease_and_hand_over_on_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let dv = Dovecot::start(&dir.path().join("dovecot"));
    let smtp = SmtpServer::start().await;
    let (mut a, mut b, url) = two_watchers(dir.path(), &dv, &smtp).await;
    let first = holder(&url);

    let mut c = dv.client().await;
    for i in 1..=3 {
        c.append(
            "INBOX",
            &dovecot::message("a@example.com", &format!("INCIDENT {i}"), "x"),
        )
        .await;
    }
    wait_for("3 alerts", Duration::from_secs(20), || smtp.count() >= 3).await;
    // B stands by: the holder never changed while both ran.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(holder(&url), first, "the lease stayed with A");
    assert!(
        b.logs.lock().unwrap().contains("standing by"),
        "B says it stands by"
    );

    // Kill A; mail keeps arriving during the handover.
    a.child.start_kill().unwrap();
    a.child.wait().await.unwrap();
    let killed = Instant::now();
    for i in 4..=6 {
        c.append(
            "INBOX",
            &dovecot::message("a@example.com", &format!("INCIDENT {i}"), "x"),
        )
        .await;
    }
    let pid_b = b.child.id().unwrap();
    wait_for("B to take the lease", Duration::from_secs(10), || {
        holder(&url).contains(&format!("-{pid_b}-"))
    })
    .await;
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(3 + 1 + 1),
        "takeover within the lease time (3 s) plus one attempt period: {took:?}"
    );
    c.append(
        "INBOX",
        &dovecot::message("a@example.com", "INCIDENT 7", "x"),
    )
    .await;
    wait_for("7 alerts", Duration::from_secs(20), || smtp.count() >= 7).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = smtp.received();
    assert_eq!(
        incidents(&got),
        vec![1, 2, 3, 4, 5, 6, 7],
        "neither missed nor doubled"
    );
    eprintln!("lease taken over {took:?} after the kill");
    b.child.start_kill().unwrap();
    let _ = b.child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_stopped_and_restarted_under_running_workers_loses_and_doubles_nothing() {
    use common::http::{TOKEN, TestApp};
    use postbox::{EmailStatus, NewEmail};
    let pg = common::PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let smtp = SmtpServer::start().await;
    let mut s = common::settings(dir.path(), smtp.port());
    s.database.url = pg.url.clone();
    s.database.busy_timeout_ms = 2000;
    // Idle workers wake only on NOTIFY from other processes: a restarted LISTEN is observable.
    s.queue.poll_interval_ms = 60_000;
    s.api.token = Some(TOKEN.to_string().into());
    let api = TestApp::start(s.clone(), true).await.with_token(TOKEN);
    // Another process (its own pool) submits: only LISTEN/NOTIFY tells the workers.
    let submitter = common::App::open(s).await;
    let submit = |n: usize| {
        let pb = submitter.postbox.clone();
        async move {
            let t0 = Instant::now();
            loop {
                let to = format!("u{n}@example.com");
                match pb.submit(NewEmail::text(&to, "s", "x")).await {
                    Ok(s) => return s.id,
                    Err(e) => {
                        assert!(t0.elapsed() < Duration::from_secs(30), "submit {n}: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    };
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(submit(n).await);
    }
    for id in &ids {
        api.app
            .wait_status(id, EmailStatus::Sent, Duration::from_secs(20))
            .await;
    }

    // Sends in flight when the server goes down: the relay answers during the outage.
    smtp.set_delay(Duration::from_millis(1500));
    for n in 3..6 {
        ids.push(submit(n).await);
    }
    for id in &ids[3..] {
        api.app
            .wait_status(id, EmailStatus::Sending, Duration::from_secs(20))
            .await;
    }
    pg.down();
    // Requests fail with a 503 that says what it is, and fast once the outage is known.
    let t0 = Instant::now();
    for _ in 0..5 {
        let r = api
            .post(
                "/v1/emails",
                &json!({"to": ["x@example.com"], "subject": "s", "text": "t"}),
            )
            .await;
        assert_eq!(r.status, 503, "{}", r.text);
        assert_eq!(r.error().0, "database_unavailable", "{}", r.text);
        assert!(r.header("retry-after").is_some());
    }
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "5 refusals took {:?}: each waited out the pool instead of failing fast",
        t0.elapsed()
    );
    assert_eq!(api.readyz().await.status, 503);
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.up();
    smtp.set_delay(Duration::ZERO);
    let t0 = Instant::now();
    while api.readyz().await.status != 200 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not ready after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The workers and their LISTEN came back: new mail from another process is picked up.
    for n in 6..9 {
        ids.push(submit(n).await);
    }
    for id in &ids {
        api.app
            .wait_status(id, EmailStatus::Sent, Duration::from_secs(30))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let received = smtp.received();
    let distinct: HashSet<String> = received.iter().map(|r| r.message_id()).collect();
    assert_eq!((distinct.len(), received.len()), (9, 9), "every email once");
    submitter.postbox.close().await;
    api.stop().await;
}

fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holder_writes_nothing_after_a_takeover_and_a_clean_stop_hands_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let dv = Dovecot::start(&dir.path().join("dovecot"));
    let smtp = SmtpServer::start().await;
    let (mut a, mut b, url) = two_watchers(dir.path(), &dv, &smtp).await;
    let (pid_a, pid_b) = (a.child.id().unwrap(), b.child.id().unwrap());

    // A freezes (a stop-the-world pause, a suspended VM) past its lease: B takes over and
    // alerts on new mail. When A wakes, it finds the news in its IDLE session, but every scan
    // commits only while its lease is held: it writes nothing.
    signal(&a.child, "-STOP");
    wait_for("B to take the lease", Duration::from_secs(10), || {
        holder(&url).contains(&format!("-{pid_b}-"))
    })
    .await;
    let mut c = dv.client().await;
    c.append(
        "INBOX",
        &dovecot::message("a@example.com", "INCIDENT 1", "x"),
    )
    .await;
    wait_for("B's alert", Duration::from_secs(20), || smtp.count() >= 1).await;
    signal(&a.child, "-CONT");
    wait_for(
        "A to notice it lost the lease",
        Duration::from_secs(10),
        || a.logs.lock().unwrap().contains("lease lost"),
    )
    .await;
    c.append(
        "INBOX",
        &dovecot::message("a@example.com", "INCIDENT 2", "x"),
    )
    .await;
    wait_for("the second alert", Duration::from_secs(20), || {
        smtp.count() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(incidents(&smtp.received()), vec![1, 2], "none doubled");
    assert!(
        holder(&url).contains(&format!("-{pid_b}-")),
        "B still holds it"
    );

    // A clean stop gives the lease up: right after B exits, B no longer holds it (it would for
    // up to 3 s more otherwise), and A takes over.
    signal(&b.child, "-TERM");
    let status = b.child.wait().await.unwrap();
    assert!(status.success(), "B stops cleanly: {status}");
    let now = holder(&url);
    assert!(
        !now.contains(&format!("-{pid_b}-")),
        "B released its lease: {now}"
    );
    wait_for("A to take the lease", Duration::from_secs(10), || {
        holder(&url).contains(&format!("-{pid_a}-"))
    })
    .await;
    a.child.start_kill().unwrap();
    let _ = a.child.wait().await;
}

/// Two worker processes on one database, one webhook endpoint: one process at a time sends
/// for it (its lease), so without a crash every event arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_send_each_webhook_event_once() {
    use common::webhook::{Receiver, SECRET};
    const N: usize = 60;
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_pg_database();
    let rx = Receiver::start(dir.path()).await;
    let conf = dir.path().join("postbox.toml");
    std::fs::write(
        &conf,
        format!(
            "[webhook]\npoll_interval_ms = 100\n[[webhooks]]\nname = \"app\"\nurl = \"{}\"\nsecret_env = \"HOOK_SECRET\"\n",
            rx.url()
        ),
    )
    .unwrap();
    let conf = conf.to_str().unwrap();
    let env = [
        ("POSTBOX_DATABASE__URL", url.as_str()),
        ("POSTBOX_CONFIG", conf),
        ("HOOK_SECRET", SECRET),
    ];
    let api = spawn_postbox("api", dir.path(), smtp.port(), &env);
    let port = api_port(&api).await;
    let _workers: Vec<Serve> = (0..2)
        .map(|_| spawn_postbox("worker", dir.path(), smtp.port(), &env))
        .collect();
    let http = reqwest::Client::new();
    let emails: Vec<_> = (0..N)
        .map(|i| json!({"to": [format!("w{i}@example.com")], "subject": "x", "text": "y"}))
        .collect();
    let r = http
        .post(format!("http://127.0.0.1:{port}/v1/emails/batch"))
        .json(&json!({ "emails": emails }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    wait_for(
        "every queued and sent event",
        Duration::from_secs(60),
        || rx.delivered().len() >= 2 * N,
    )
    .await;
    // A moment more for any second sender to show itself.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = rx.requests();
    let ids: Vec<&str> = all.iter().map(|r| r["id"].as_str().unwrap()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), 2 * N, "each event once: {} requests", ids.len());
    assert_eq!(unique.len(), 2 * N);
    assert!(all.iter().all(|r| r["verified"] == true));
}

/// A relay limited to 25 messages a second, three worker processes on one PostgreSQL: the
/// relay sees at most the limit (+10%) over 10 s, and no email spends a retry attempt on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_rate_limit_holds_across_three_worker_processes() {
    const RATE: f64 = 25.0;
    const N: usize = 400;
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_pg_database();
    let conf = dir.path().join("postbox.toml");
    std::fs::write(&conf, format!("[smtp]\nper_second = {RATE}\n")).unwrap();
    let conf = conf.to_str().unwrap();
    let env = [
        ("POSTBOX_DATABASE__URL", url.as_str()),
        ("POSTBOX_CONFIG", conf),
    ];
    let api = spawn_postbox("api", dir.path(), smtp.port(), &env);
    let port = api_port(&api).await;
    let http = reqwest::Client::new();
    let emails: Vec<_> = (0..N)
        .map(|i| json!({"to": [format!("r{i}@example.com")], "subject": "x", "text": "y"}))
        .collect();
    let r = http
        .post(format!("http://127.0.0.1:{port}/v1/emails/batch"))
        .json(&json!({ "emails": emails }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let _workers: Vec<Serve> = (0..3)
        .map(|_| spawn_postbox("worker", dir.path(), smtp.port(), &env))
        .collect();
    wait_for("every email at the relay", Duration::from_secs(60), || {
        smtp.count() >= N
    })
    .await;
    let mut at: Vec<std::time::SystemTime> = smtp.received().iter().map(|r| r.at).collect();
    at.sort();
    assert_eq!(at.len(), N, "each email once");
    // Any 10 s window: at most the limit + 10%.
    let window = Duration::from_secs(10);
    let most = (0..at.len())
        .map(|i| {
            at[i..]
                .iter()
                .take_while(|t| t.duration_since(at[i]).unwrap() < window)
                .count()
        })
        .max()
        .unwrap();
    eprintln!("{most} messages in the busiest 10 s (limit {RATE}/s)");
    assert!(
        most as f64 <= RATE * 10.0 * 1.1,
        "{most} messages in 10 s against a limit of {RATE}/s"
    );
    // ... and not far below it: the three processes share the rate, they do not waste it.
    assert!(
        most as f64 >= RATE * 10.0 * 0.7,
        "only {most} messages in 10 s"
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM postbox_emails WHERE status = 'sent' AND attempts = 1"
        ),
        N as i64,
        "waiting for the limit is not an attempt"
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM postbox_events WHERE status = 'retrying'"
        ),
        0
    );
    drop(api);
}

/// A relay's `max_connections = 3` shared by three worker processes (pool_max 10 each): the
/// relay never sees more than three connections at once, and every email arrives once.
/// (Without the cap this test sees 30.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_connection_cap_is_shared_by_three_worker_processes() {
    const N: usize = 300;
    let smtp = SmtpServer::start().await;
    // Slow answers: without the cap, each process would open all ten of its connections.
    smtp.set_delay(Duration::from_millis(20));
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_pg_database();
    let conf = dir.path().join("postbox.toml");
    std::fs::write(&conf, "[smtp]\nmax_connections = 3\npool_max = 10\n").unwrap();
    let conf = conf.to_str().unwrap();
    let env = [
        ("POSTBOX_DATABASE__URL", url.as_str()),
        ("POSTBOX_CONFIG", conf),
    ];
    let api = spawn_postbox("api", dir.path(), smtp.port(), &env);
    let port = api_port(&api).await;
    let workers: Vec<Serve> = (0..3)
        .map(|_| spawn_postbox("worker", dir.path(), smtp.port(), &env))
        .collect();
    // Each process takes its share at its next heartbeat (1 s here) once all three are live.
    wait_for("three live workers", Duration::from_secs(30), || {
        count(
            &url,
            "SELECT count(*) FROM postbox_leases WHERE name LIKE 'node:%'",
        ) == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let http = reqwest::Client::new();
    let emails: Vec<_> = (0..N)
        .map(|i| json!({"to": [format!("c{i}@example.com")], "subject": "x", "text": "y"}))
        .collect();
    let r = http
        .post(format!("http://127.0.0.1:{port}/v1/emails/batch"))
        .json(&json!({ "emails": emails }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    wait_for("every email at the relay", Duration::from_secs(60), || {
        smtp.count() >= N
    })
    .await;
    assert_eq!(smtp.count(), N);
    eprintln!("at most {} connections at once", smtp.max_sessions());
    assert!(
        smtp.max_sessions() <= 3,
        "{} connections at once",
        smtp.max_sessions()
    );
    drop((api, workers));
}
