//! Several postbox processes on one PostgreSQL (the throwaway server scripts/test.sh starts):
//! real child processes, killed with SIGKILL.

mod common;

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
    assert!(
        interrupted_ids.len() <= CONCURRENCY,
        "more interrupted sends ({}) than the killed worker could have in flight ({CONCURRENCY})",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_share_one_mailbox_through_a_lease_and_hand_over_on_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let dv = Dovecot::start(&dir.path().join("dovecot"));
    let smtp = SmtpServer::start().await;
    let url = fresh_pg_database();
    let config = dir.path().join("postbox.toml");
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
    let mut a = spawn_postbox("serve", dir.path(), smtp.port(), &env);
    wait_for("the schema", Duration::from_secs(20), || {
        psql(
            &url,
            "SELECT to_regclass('public.postbox_leases') IS NOT NULL",
        ) == "t"
    })
    .await;
    wait_for(
        "process A to hold the lease",
        Duration::from_secs(20),
        || !holder(&url).is_empty(),
    )
    .await;
    let mut b = spawn_postbox("serve", dir.path(), smtp.port(), &env);
    let first = holder(&url);
    let pid_a = a.child.id().unwrap();
    assert!(first.contains(&format!("-{pid_a}-")), "A holds it: {first}");
    wait_for("the watcher to connect", Duration::from_secs(20), || {
        psql(
            &url,
            "SELECT state FROM postbox_mailboxes WHERE name = 'mon'",
        ) == "connected"
    })
    .await;

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
