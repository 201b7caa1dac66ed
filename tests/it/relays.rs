//! Several relays over real SMTP on 127.0.0.1: failover and cool-down, routing, rate limits,
//! adaptive throttling, DKIM signatures checked by an independent verifier, pauses and bulk
//! actions.

use crate::common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use common::{App, SmtpServer, settings};
use postbox::config::{DkimSettings, RouteSettings, SmtpSettings, TlsMode};
use postbox::delivery::DkimAlgorithm;
use postbox::store::PauseKind;
use postbox::{BulkAction, BulkFilter, EmailStatus, NewEmail, Settings};

const LIMIT: Duration = Duration::from_secs(30);

fn relay(name: &str, port: u16) -> SmtpSettings {
    SmtpSettings {
        name: name.into(),
        host: "127.0.0.1".into(),
        port,
        tls: TlsMode::None,
        connect_timeout_secs: 2,
        command_timeout_secs: 5,
        cooldown_secs: 2,
        ..Default::default()
    }
}

/// Test settings with relays `a` and `b` (in that failover order) instead of `[smtp]`.
fn two_relays(dir: &std::path::Path, a: &SmtpServer, b: &SmtpServer) -> Settings {
    let mut s = settings(dir, a.port());
    s.smtp = SmtpSettings::default();
    s.relays = vec![relay("a", a.port()), relay("b", b.port())];
    s.validate().expect("valid relay settings");
    s
}

fn email(to: &str, subject: &str) -> NewEmail {
    let mut e = NewEmail::text(to, subject, "hello");
    e.from = Some("app@example.com".into());
    e
}

fn subjects(s: &SmtpServer) -> Vec<String> {
    s.received()
        .iter()
        .map(|r| common::smtp::header(&r.data, "Subject").unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_relay_is_skipped_for_its_cooldown_and_the_next_one_takes_the_mail() {
    let (a, b) = (SmtpServer::start().await, SmtpServer::start().await);
    a.set_greeting(Some("421 4.3.2 service not available, closing channel"));
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(two_relays(dir.path(), &a, &b)).await;

    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            app.submit(email(&format!("u{i}@example.com"), &format!("m{i}")))
                .await,
        );
    }
    for id in &ids {
        app.wait_status(id, EmailStatus::Sent, LIMIT).await;
    }
    assert_eq!(a.count(), 0);
    assert_eq!(
        b.count(),
        10,
        "every email arrives once, via the second relay"
    );
    let report = app.postbox.relays().await.unwrap();
    let ra = report.relays.iter().find(|r| r.name == "a").unwrap();
    assert!(
        ra.cooling_reason
            .as_deref()
            .is_some_and(|r| r.contains("421")),
        "relay a cools down and says why: {ra:?}"
    );
    // Every attempt counted once; the timeline names the relays.
    for id in &ids {
        let r = app.status(id).await;
        assert_eq!(r.attempts, 1, "{r:#?}");
    }
    // The emails that tried relay a before it cooled down say what it answered; every
    // timeline names the relay that took the message.
    let mut tried_a = 0;
    for id in &ids {
        let r = app.status(id).await;
        let attempt = r
            .timeline
            .iter()
            .find(|t| t.kind == "attempt")
            .and_then(|t| t.detail.clone())
            .unwrap_or_default();
        assert!(attempt.contains("via relay \"b\""), "{attempt}");
        if attempt.contains("relay \"a\"") {
            assert!(attempt.contains("421"), "{attempt}");
            tried_a += 1;
        }
    }
    assert!(tried_a >= 1, "the first email tried relay a first");

    // The first relay recovers: after its cool-down it is used again.
    a.set_greeting(None);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let id = app.submit(email("back@example.com", "back")).await;
    let r = app.wait_status(&id, EmailStatus::Sent, LIMIT).await;
    assert_eq!(
        a.count(),
        1,
        "the first relay takes mail again after its cool-down"
    );
    assert_eq!(b.count(), 10);
    assert!(
        r.timeline.iter().any(|t| t
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("via relay \"a\""))),
        "{r:#?}"
    );

    // A relay that refuses connections altogether is skipped the same way.
    a.stop().await;
    let id = app.submit(email("down@example.com", "down")).await;
    app.wait_status(&id, EmailStatus::Sent, LIMIT).await;
    assert_eq!(b.count(), 11);
    a.resume().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_follow_their_relay_field_then_the_first_matching_route_then_the_default_order() {
    let (a, b) = (SmtpServer::start().await, SmtpServer::start().await);
    let dir = tempfile::tempdir().unwrap();
    let mut s = two_relays(dir.path(), &a, &b);
    let route = |f: fn(&mut RouteSettings)| {
        let mut r = RouteSettings {
            relays: vec!["b".into()],
            ..Default::default()
        };
        f(&mut r);
        r
    };
    s.routes = vec![
        route(|r| r.tag = Some("bulk".into())),
        route(|r| r.from_domain = Some("news.example.com".into())),
        route(|r| r.rcpt_domain = Some("b.example".into())),
    ];
    let app = App::start(s).await;

    let mut tagged = email("t@example.com", "by-tag");
    tagged.tags = vec!["bulk".into()];
    let mut news = email("n@example.com", "by-from");
    news.from = Some("news@News.Example.com".into());
    let rcpt = email("someone@B.example", "by-rcpt");
    let mut field = email("f@example.com", "by-field");
    field.relay = Some("b".into());
    let mut pinned_a = email("p@b.example", "field-beats-route");
    pinned_a.relay = Some("a".into());
    let plain = email("x@example.com", "default");
    let mut ids = Vec::new();
    for e in [tagged, news, rcpt, field, pinned_a, plain] {
        ids.push(app.submit(e).await);
    }
    for id in &ids {
        app.wait_status(id, EmailStatus::Sent, LIMIT).await;
    }
    let via_b: HashSet<String> = subjects(&b).into_iter().collect();
    let via_a: HashSet<String> = subjects(&a).into_iter().collect();
    assert_eq!(
        via_b,
        ["by-tag", "by-from", "by-rcpt", "by-field"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        via_a,
        ["field-beats-route", "default"].map(String::from).into()
    );

    // An unknown relay is refused at submit, naming the field; nothing is stored.
    let before = app.postbox.counts().await.unwrap();
    let mut bad = email("z@example.com", "nope");
    bad.relay = Some("nowhere".into());
    let err = app.postbox.submit(bad).await.unwrap_err().to_string();
    assert!(err.contains("relay") && err.contains("nowhere"), "{err}");
    assert_eq!(
        app.postbox.counts().await.unwrap().by_status,
        before.by_status
    );
}

/// A relay that accepts 20 messages a second and answers the rest `454 Throttling failure`
/// (Amazon SES's reply): postbox slows down below that rate by itself, no email spends a
/// retry attempt on it, none becomes a dead letter, and the relay's figures say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_replies_slow_postbox_below_the_relays_rate_without_spending_retries() {
    const RATE: usize = 20;
    const N: usize = 300;
    let smtp = SmtpServer::start().await;
    smtp.set_rate_limit(Some((
        RATE,
        "454 4.7.0 Throttling failure: Maximum sending rate exceeded.",
    )));
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), smtp.port());
    s.retry.max_attempts = 2;
    s.throttle.step_secs = 2;
    let app = App::start(s).await;
    let t0 = SystemTime::now();
    let mut ids = Vec::new();
    for i in 0..N {
        ids.push(
            app.submit(email(&format!("u{i}@example.com"), &format!("m{i}")))
                .await,
        );
    }
    let mut seen_lowered = None;
    let started = Instant::now();
    while smtp.count() < N {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} of {N} arrived",
            smtp.count()
        );
        let r = app.postbox.relays().await.unwrap();
        if let Some(l) = r.limits.iter().find(|l| l.key == "relay:default")
            && let (Some(rate), Some(why)) = (l.effective_per_second, &l.throttled_reason)
            && seen_lowered.is_none()
        {
            seen_lowered = Some((rate, why.clone()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in &ids {
        let r = app.wait_status(id, EmailStatus::Sent, LIMIT).await;
        assert_eq!(r.attempts, 1, "a throttled try is not an attempt: {r:#?}");
    }
    assert_eq!(app.count(EmailStatus::Failed).await, 0);
    let (rate, why) = seen_lowered.expect("the effective rate was lowered, with the reason");
    assert!(rate < RATE as f64, "lowered below the relay's rate: {rate}");
    assert!(why.contains("454"), "{why}");
    // Converged: after the first seconds, refusals are rare beside deliveries.
    let settle = t0 + Duration::from_secs(4);
    let late_refused = smtp.refused().iter().filter(|t| **t > settle).count();
    let late_accepted = smtp.received().iter().filter(|r| r.at > settle).count();
    eprintln!(
        "refused {} in all; after 4 s: {late_refused} refused, {late_accepted} accepted",
        smtp.refused().len()
    );
    assert!(
        late_refused * 4 < late_accepted,
        "still hammering the relay: {late_refused} refused, {late_accepted} accepted after 4 s"
    );
}

/// A per-domain limit spaces messages to that domain only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_limit_spaces_that_domains_mail_and_not_the_rest() {
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path(), smtp.port());
    s.domain_limits = vec![postbox::config::DomainLimit {
        domain: "Slow.Example".into(),
        per_second: Some(5.0),
        ..Default::default()
    }];
    let app = App::start(s).await;
    let mut ids = Vec::new();
    for i in 0..15 {
        ids.push(
            app.submit(email(&format!("s{i}@slow.example"), "slow"))
                .await,
        );
        ids.push(
            app.submit(email(&format!("f{i}@fast.example"), "fast"))
                .await,
        );
    }
    for id in &ids {
        let r = app.wait_status(id, EmailStatus::Sent, LIMIT).await;
        assert_eq!(r.attempts, 1);
    }
    let times = |domain: &str| -> Vec<SystemTime> {
        let mut v: Vec<SystemTime> = smtp
            .received()
            .iter()
            .filter(|r| r.rcpt_to.iter().any(|t| t.ends_with(domain)))
            .map(|r| r.at)
            .collect();
        v.sort();
        v
    };
    let slow = times("@slow.example");
    let fast = times("@fast.example");
    assert_eq!((slow.len(), fast.len()), (15, 15));
    let span = |v: &[SystemTime]| v[v.len() - 1].duration_since(v[0]).unwrap();
    // 15 messages at 5/s: at least 14 intervals of 200 ms (some slack for the clock).
    assert!(
        span(&slow) >= Duration::from_millis(2600),
        "{:?}",
        span(&slow)
    );
    assert!(
        span(&fast) < span(&slow) / 2,
        "fast {:?} slow {:?}",
        span(&fast),
        span(&slow)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pauses_hold_mail_until_resumed_and_bulk_actions_retry_and_cancel_by_filter() {
    let (a, b) = (SmtpServer::start().await, SmtpServer::start().await);
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(two_relays(dir.path(), &a, &b)).await;
    let pb = &app.postbox;

    // A paused domain: its mail waits (not an attempt), the rest goes.
    assert!(
        pb.pause(PauseKind::Domain, "hold.example", Some("complaints"))
            .await
            .unwrap()
    );
    let held = app.submit(email("h@hold.example", "held")).await;
    let free = app.submit(email("f@free.example", "free")).await;
    app.wait_status(&free, EmailStatus::Sent, LIMIT).await;
    let t0 = Instant::now();
    loop {
        let r = app.status(&held).await;
        if r.last_error.as_deref() == Some("paused: domain \"hold.example\"") {
            assert_eq!(r.status, EmailStatus::Queued);
            assert_eq!(r.attempts, 0, "waiting is not an attempt");
            break;
        }
        assert!(t0.elapsed() < LIMIT, "{r:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        pb.resume(PauseKind::Domain, "hold.example").await.unwrap(),
        Some(1)
    );
    let r = app.wait_status(&held, EmailStatus::Sent, LIMIT).await;
    let kinds: Vec<&str> = r.timeline.iter().map(|t| t.kind.as_str()).collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "held").count(),
        1,
        "one entry when the pause first held it: {kinds:?}"
    );
    assert!(kinds.contains(&"released"), "{kinds:?}");
    assert_eq!(
        pb.resume(PauseKind::Domain, "hold.example").await.unwrap(),
        None
    );

    // A paused relay is skipped: relay b takes its mail.
    pb.pause(PauseKind::Relay, "a", None).await.unwrap();
    let id = app.submit(email("r@example.com", "relay-paused")).await;
    app.wait_status(&id, EmailStatus::Sent, LIMIT).await;
    assert!(subjects(&b).contains(&"relay-paused".to_string()));
    pb.resume(PauseKind::Relay, "a").await.unwrap();

    // Bulk retry of dead letters by tag; bulk cancel of queued mail by domain.
    a.reply_to_rcpt("dead", "550 5.1.1 no such user");
    let mut dead = Vec::new();
    for i in 0..3 {
        let mut e = email(&format!("dead{i}@example.com"), "dead");
        e.tags = vec!["campaign-7".into()];
        e.relay = Some("a".into());
        dead.push(app.submit(e).await);
    }
    let mut other = email("dead-other@example.com", "dead-untagged");
    other.relay = Some("a".into());
    let untagged = app.submit(other).await;
    for id in dead.iter().chain([&untagged]) {
        app.wait_status(id, EmailStatus::Failed, LIMIT).await;
    }
    a.clear_rcpt_replies();
    let r = pb
        .bulk(
            BulkAction::Retry,
            &BulkFilter {
                status: Some(EmailStatus::Failed),
                tag: Some("campaign-7".into()),
                ..Default::default()
            },
            "bulk retry, test",
        )
        .await
        .unwrap();
    assert_eq!((r.matched, r.changed, r.more), (3, 3, false));
    for id in &dead {
        let r = app.wait_status(id, EmailStatus::Sent, LIMIT).await;
        assert!(
            r.timeline.iter().any(|t| t.kind == "requeued"
                && t.detail
                    .as_deref()
                    .is_some_and(|d| d.contains("bulk retry"))),
            "{r:#?}"
        );
    }
    assert_eq!(app.status(&untagged).await.status, EmailStatus::Failed);

    pb.pause(PauseKind::Tag, "later", None).await.unwrap();
    let mut q = Vec::new();
    for i in 0..2 {
        let mut e = email(&format!("c{i}@cancel.example"), "cancel-me");
        e.tags = vec!["later".into()];
        q.push(app.submit(e).await);
    }
    // Claimed and put back by the pause: queued again, waiting.
    for id in &q {
        let t0 = Instant::now();
        while app.status(id).await.last_error.as_deref() != Some("paused: tag \"later\"") {
            assert!(t0.elapsed() < LIMIT);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let r = pb
        .bulk(
            BulkAction::Cancel,
            &BulkFilter {
                status: Some(EmailStatus::Queued),
                domain: Some("cancel.example".into()),
                ..Default::default()
            },
            "bulk cancel, test",
        )
        .await
        .unwrap();
    assert_eq!(r.changed, 2);
    for id in &q {
        app.wait_status(id, EmailStatus::Cancelled, LIMIT).await;
    }
}

/// Makes a key pair with openssl: (private key PEM, public key for the DNS record).
fn keypair(dir: &std::path::Path, alg: DkimAlgorithm) -> (String, String) {
    let key = dir.join(format!("{alg:?}.pem"));
    let run = |args: &[&str]| -> Vec<u8> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let k = key.to_str().unwrap();
    match alg {
        DkimAlgorithm::Rsa => run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            k,
        ]),
        DkimAlgorithm::Ed25519 => run(&["genpkey", "-algorithm", "ed25519", "-out", k]),
    };
    let der = run(&["pkey", "-in", k, "-pubout", "-outform", "DER"]);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let public = match alg {
        // The SubjectPublicKeyInfo, as DKIM's p= wants for RSA.
        DkimAlgorithm::Rsa => b64.encode(&der),
        // The raw 32-byte key (RFC 8463).
        DkimAlgorithm::Ed25519 => b64.encode(&der[der.len() - 32..]),
    };
    (std::fs::read_to_string(&key).unwrap(), public)
}

/// Verifies a message's DKIM signature with dkimpy (PyPI), the public key given as the DNS
/// record; returns what it said.
fn dkim_verify(message: &[u8], selector: &str, domain: &str, record: &str) -> (bool, String) {
    let py = std::env::var("TEST_PYTHON").expect("TEST_PYTHON (scripts/test.sh sets it)");
    let script = r#"
import sys, dkim, logging
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
name, record = sys.argv[1].encode(), sys.argv[2].encode()
def dns(qname, timeout=5):
    return record if qname.rstrip(b".") == name.rstrip(b".") else None
msg = sys.stdin.buffer.read()
ok = dkim.verify(msg, dnsfunc=dns, logger=logging.getLogger("dkim"))
print("PASS" if ok else "FAIL")
"#;
    use std::io::Write;
    let mut child = std::process::Command::new(py)
        .args([
            "-c",
            script,
            &format!("{selector}._domainkey.{domain}."),
            record,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python runs");
    child.stdin.take().unwrap().write_all(message).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (String::from_utf8_lossy(&out.stdout).trim() == "PASS", said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_signatures_verify_with_an_independent_verifier_for_rsa_and_ed25519() {
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (rsa_key, rsa_pub) = keypair(dir.path(), DkimAlgorithm::Rsa);
    let (ed_key, ed_pub) = keypair(dir.path(), DkimAlgorithm::Ed25519);
    let rsa_file = dir.path().join("rsa-key.pem");
    std::fs::write(&rsa_file, &rsa_key).unwrap();
    let mut s = settings(dir.path(), smtp.port());
    s.dkim = vec![
        DkimSettings {
            domain: "rsa.example".into(),
            selector: "s2048".into(),
            algorithm: DkimAlgorithm::Rsa,
            key_file: Some(rsa_file),
            key_env: None,
        },
        DkimSettings {
            domain: "ed.example".into(),
            selector: "ed1".into(),
            algorithm: DkimAlgorithm::Ed25519,
            key_file: None,
            key_env: Some("TEST_DKIM_ED_KEY".into()),
        },
    ];
    let rt =
        postbox::Runtime::build_with(s, &|k| (k == "TEST_DKIM_ED_KEY").then(|| ed_key.clone()))
            .expect("keys load");
    let mut app = App::with(postbox::Postbox::start(rt).await.unwrap());
    app.start_workers();
    let mut ids = Vec::new();
    for (from, subject) in [
        ("Ops <ops@rsa.example>", "RSA signed"),
        ("alerts@ed.example", "Ed25519 signed"),
        ("someone@unsigned.example", "unsigned"),
    ] {
        let mut e = NewEmail::text(
            "Ada <ada@example.com>",
            subject,
            "Body line\r\n\r\nmore  text ",
        );
        e.html = Some("<p>HTML part</p>".into());
        e.from = Some(from.into());
        e.cc = vec!["cc@example.com".into()];
        ids.push(app.submit(e).await);
    }
    for id in &ids {
        app.wait_status(id, EmailStatus::Sent, LIMIT).await;
    }
    let find = |subject: &str| {
        smtp.received()
            .into_iter()
            .find(|r| common::smtp::header(&r.data, "Subject").as_deref() == Some(subject))
            .unwrap()
            .data
    };
    let rsa_msg = find("RSA signed");
    let (ok, said) = dkim_verify(
        &rsa_msg,
        "s2048",
        "rsa.example",
        &format!("v=DKIM1; k=rsa; p={rsa_pub}"),
    );
    assert!(
        ok,
        "RSA signature verifies: {said}\n{}",
        String::from_utf8_lossy(&rsa_msg[..rsa_msg.len().min(3000)])
    );
    let sig = common::smtp::header(&rsa_msg, "DKIM-Signature").unwrap();
    assert!(
        sig.contains("a=rsa-sha256") && sig.contains("d=rsa.example") && sig.contains("s=s2048"),
        "{sig}"
    );
    for h in ["from", "subject", "date", "to", "message-id"] {
        assert!(sig.contains(h), "{h} is signed: {sig}");
    }
    let ed_msg = find("Ed25519 signed");
    let (ok, said) = dkim_verify(
        &ed_msg,
        "ed1",
        "ed.example",
        &format!("v=DKIM1; k=ed25519; p={ed_pub}"),
    );
    assert!(ok, "Ed25519 signature verifies: {said}");
    // A changed body fails: the verifier is really checking.
    let mut tampered = ed_msg.clone();
    let at = tampered.windows(9).position(|w| w == b"Body line").unwrap();
    tampered[at] = b'N';
    assert!(
        !dkim_verify(
            &tampered,
            "ed1",
            "ed.example",
            &format!("v=DKIM1; k=ed25519; p={ed_pub}")
        )
        .0
    );
    assert!(common::smtp::header(&find("unsigned"), "DKIM-Signature").is_none());
}

/// The operator controls over HTTP: every mistake a 400 naming the field (nothing changes),
/// `GET /v1/relays` reporting relays, limits and pauses, and the bulk endpoint's report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_pauses_and_bulk_over_http_name_every_bad_field() {
    use common::http::TestApp;
    use reqwest::{Method, StatusCode};
    use serde_json::json;
    let (a, b) = (SmtpServer::start().await, SmtpServer::start().await);
    let dir = tempfile::tempdir().unwrap();
    let mut s = two_relays(dir.path(), &a, &b);
    s.relays[1].per_second = Some(50.0);
    let api = TestApp::start(s, true).await;

    let bad: [(serde_json::Value, &str); 5] = [
        (json!({"kind": "planet", "value": "x"}), "kind"),
        (json!({"kind": "relay", "value": "nowhere"}), "value"),
        (json!({"kind": "domain", "value": "has space"}), "value"),
        (
            json!({"kind": "tag", "value": "t", "reason": "a\u{0}b"}),
            "reason",
        ),
        (json!({"kind": "tag", "value": "t", "extra": 1}), "extra"),
    ];
    for (body, field) in bad {
        let r = api.post("/v1/pauses", &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        let (_, f) = r.error();
        assert!(
            f.as_deref().is_some_and(|f| f.contains(field)),
            "{body}: {}",
            r.text
        );
    }
    let r = api.get("/v1/relays").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json["pauses"], json!([]), "bad requests changed nothing");
    let names: Vec<&str> = r.json["relays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    let limit_b = r.json["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"] == "relay:b")
        .cloned()
        .unwrap();
    assert_eq!(limit_b["configured_per_second"], 50.0);

    let r = api
        .post(
            "/v1/pauses",
            &json!({"kind": "relay", "value": "a", "reason": "maintenance"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let r = api
        .post("/v1/pauses", &json!({"kind": "relay", "value": "a"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "pausing twice is not an error");
    let r = api.get("/v1/relays").await;
    assert_eq!(r.json["pauses"][0]["value"], "a");
    assert_eq!(r.json["pauses"][0]["reason"], "maintenance");
    let r = api
        .raw(Method::DELETE, "/v1/pauses/relay/a", None, &[])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = api
        .raw(Method::DELETE, "/v1/pauses/relay/a", None, &[])
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let bad: [(serde_json::Value, &str); 7] = [
        (
            json!({"action": "cancel", "status": "queued", "older_than_secs": u64::MAX}),
            "older_than_secs",
        ),
        (
            json!({"action": "cancel", "status": "queued", "older_than_secs": -1}),
            "older_than_secs",
        ),
        (json!({"action": "explode", "status": "failed"}), "action"),
        (json!({"action": "retry", "status": "queued"}), "status"),
        (json!({"action": "cancel", "status": "sent"}), "status"),
        (
            json!({"action": "cancel", "status": "queued", "tag": ""}),
            "tag",
        ),
        (
            json!({"action": "cancel", "status": "queued", "domain": "a b"}),
            "domain",
        ),
    ];
    for (body, field) in bad {
        let r = api.post("/v1/emails/bulk", &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_eq!(r.error().1.as_deref(), Some(field), "{body}");
    }
    let r = api
        .post(
            "/v1/emails/bulk",
            &json!({"action": "retry", "status": "failed", "tag": "none-such"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json, json!({"matched": 0, "changed": 0, "more": false}));
    api.stop().await;
}

/// The CLI's operator commands: pause, relays, resume, bulk; bad arguments named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pauses_resumes_lists_and_runs_bulk_actions() {
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(common::bin())
            .args(args)
            .current_dir(dir.path())
            .env_clear()
            .envs(common::child_env(dir.path(), smtp.port()))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&["pause", "domain", "Example.ORG", "--reason", "spam trap"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("domain example.org paused"), "{out}");
    let (code, out, _) = run(&["relays", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["pauses"][0]["value"], "example.org");
    assert_eq!(v["relays"][0]["name"], "default");
    let (code, _, err) = run(&["pause", "relay", "nowhere"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("VALUE") && err.contains("nowhere"), "{err}");
    let (code, _, err) = run(&["bulk", "explode", "--status", "failed"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("ACTION"), "{err}");
    let (code, _, err) = run(&["bulk", "retry", "--status", "queued"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--status"), "{err}");
    let (code, out, err) = run(&[
        "bulk",
        "cancel",
        "--status",
        "queued",
        "--domain",
        "example.org",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("0 matched"), "{out}");
    let (code, out, _) = run(&["resume", "domain", "example.org"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("resumed"), "{out}");
    let (code, _, err) = run(&["resume", "domain", "example.org"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not paused"), "{err}");
}

/// The stall alert: mail held too long (here by a pause) raises ONE alert email to
/// `alert_to` while it lasts; once the queue recovers, one "recovered" email follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_queue_raises_one_alert_and_its_recovery_clears_it() {
    use serde_json::json;
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("postbox.toml");
    std::fs::write(
        &conf,
        "[stall_alert]\nalert_to = [\"ops@example.com\"]\noldest_due_secs = 2\ncheck_secs = 1\n",
    )
    .unwrap();
    let serve = common::spawn_serve(
        dir.path(),
        smtp.port(),
        &[("POSTBOX_CONFIG", conf.to_str().unwrap())],
    );
    let port = common::api_port(&serve).await;
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let r = http
        .post(format!("{base}/v1/pauses"))
        .json(&json!({"kind": "domain", "value": "held.example"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http
        .post(format!("{base}/v1/emails"))
        .json(&json!({"to": ["x@held.example"], "subject": "held", "text": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let alerts = |s: &SmtpServer, what: &str| -> Vec<String> {
        s.received()
            .iter()
            .filter(|r| r.rcpt_to == ["ops@example.com"])
            .map(|r| String::from_utf8_lossy(&r.data).to_string())
            .filter(|d| d.contains(what))
            .collect()
    };
    common::wait_for("the stall alert", LIMIT, || {
        !alerts(&smtp, "[postbox] delivery stalled").is_empty()
    })
    .await;
    let raised = alerts(&smtp, "[postbox] delivery stalled");
    assert!(
        raised[0].contains("the oldest due email has waited"),
        "{}",
        raised[0]
    );
    // Checked every second, sent once: the repeat comes after repeat_minutes (60).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(alerts(&smtp, "[postbox] delivery stalled").len(), 1);
    assert!(alerts(&smtp, "recovered").is_empty());
    let r = http
        .delete(format!("{base}/v1/pauses/domain/held.example"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    common::wait_for("the recovery email", LIMIT, || {
        !alerts(&smtp, "[postbox] delivery recovered").is_empty()
    })
    .await;
    assert!(
        smtp.received()
            .iter()
            .any(|r| r.rcpt_to == ["x@held.example"])
    );
    assert_eq!(alerts(&smtp, "[postbox] delivery stalled").len(), 1);
    drop(serve);
}
