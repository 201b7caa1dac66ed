//! Pipeline benchmark: submit N emails through the library and deliver them to Postfix's
//! `smtp-sink` on 127.0.0.1. Prints submits/s (submit_many and single submit), delivered/s end
//! to end, submit -> SMTP-accepted latency (under load and with an idle queue), and peak RSS.
//!
//! Run with `scripts/bench.sh [N]`. POSTBOX_* environment variables tune the settings.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use postbox::config::{TlsMode, Transport};
use postbox::{EmailId, EmailStatus, NewEmail, Postbox, Settings};
use serde_json::json;

/// The allocator the `postbox` binary uses (src/main.rs), so that the peak RSS printed here is
/// the binary's, not glibc's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Sink(Child);

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// The child is waited for in `Sink::drop`.
#[allow(clippy::zombie_processes)]
fn start_sink() -> (Sink, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bin = ["/usr/sbin/smtp-sink", "/usr/bin/smtp-sink"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("smtp-sink not found: install Debian's postfix (scripts/test.sh does)");
    let child = Command::new(bin)
        .args(["-u", "nobody", &format!("127.0.0.1:{port}"), "1024"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start smtp-sink");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (Sink(child), port);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("smtp-sink did not start on port {port}");
}

fn email(i: usize) -> NewEmail {
    if i.is_multiple_of(2) {
        NewEmail::template(
            &format!("user{i}@example.com"),
            "notification",
            json!({"title": format!("Build {i} finished"), "paragraphs": ["All green.", "Nothing to do."],
                   "action_url": "https://ci.example.com/b/1"}),
        )
    } else {
        let mut e = NewEmail::text(
            &format!("user{i}@example.com"),
            &format!("Hello {i}"),
            "A short text body.",
        );
        e.html = Some(format!("<p>Hello <b>{i}</b></p>"));
        e
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn peak_rss_mb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn wait_all_sent(pb: &Postbox, total: u64) {
    let t0 = Instant::now();
    loop {
        let c = pb.counts().await.unwrap();
        if c.get(EmailStatus::Sent) >= total {
            return;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            panic!("not all sent after 300 s: {c:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Latency submit -> SMTP accepted (ms) for these emails, from their own records.
async fn latencies(pb: &Postbox, ids: &[EmailId]) -> Vec<f64> {
    let mut v = Vec::with_capacity(ids.len());
    for id in ids {
        let r = pb.status(id).await.unwrap().unwrap();
        if let Some(sent) = r.sent_at {
            v.push((sent - r.created_at).as_seconds_f64() * 1000.0);
        }
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(5000);
    let (_sink, port) = start_sink();
    let dir = tempfile::tempdir().unwrap();
    let defaults = format!(
        "[database]\nurl = \"sqlite://{}\"\n[delivery]\ntransport = \"smtp\"\n\
         [smtp]\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\npool_max = 32\n\
         [queue]\nconcurrency = 32\nbatch_size = 32\n[log]\nlevel = \"warn\"\n",
        dir.path().join("bench.db").display()
    );
    let settings = Settings::from_toml_and_env(&defaults, std::env::vars()).expect("settings");
    assert_eq!(settings.delivery.transport, Transport::Smtp);
    assert_eq!(settings.smtp.tls, TlsMode::None);
    println!(
        "postbox pipeline benchmark: N = {n}, concurrency {}, batch {}, smtp pool {}, smtp-sink on 127.0.0.1:{port}",
        settings.queue.concurrency, settings.queue.batch_size, settings.smtp.pool_max
    );
    let pb = Postbox::open(settings).await.expect("open");

    // 1. submit_many, workers stopped: the cost of durably accepting mail.
    let t = Instant::now();
    let mut ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let batch = chunk.iter().map(|&i| email(i)).collect();
        ids.extend(
            pb.submit_many(batch)
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.id),
        );
    }
    let submit_many_rate = n as f64 / t.elapsed().as_secs_f64();

    // 2. Drain that backlog: delivered/s from a full queue.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker_pb = pb.clone();
    let workers = tokio::spawn(async move {
        worker_pb
            .run_workers(async move {
                let _ = stop_rx.await;
            })
            .await
    });
    let t = Instant::now();
    wait_all_sent(&pb, n as u64).await;
    let drain_rate = n as f64 / t.elapsed().as_secs_f64();

    // 3. End to end with workers running: submit N with submit_many (batches of 100) while the
    //    workers deliver; delivered/s from the first submit to the last SMTP acceptance.
    let t = Instant::now();
    let mut e2e_ids = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let batch = chunk.iter().map(|&i| email(i)).collect();
        e2e_ids.extend(
            pb.submit_many(batch)
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.id),
        );
    }
    wait_all_sent(&pb, 2 * n as u64).await;
    let e2e_rate = n as f64 / t.elapsed().as_secs_f64();
    let e2e_lat = latencies(&pb, &e2e_ids).await;

    // 4. Single submits, one after another, workers running.
    let single = n.min(2000);
    let t = Instant::now();
    let mut single_ids = Vec::with_capacity(single);
    for i in 0..single {
        single_ids.push(pb.submit(email(i)).await.unwrap().id);
    }
    let single_rate = single as f64 / t.elapsed().as_secs_f64();
    wait_all_sent(&pb, (2 * n + single) as u64).await;

    // 5. Idle queue: one email at a time, 20 ms apart.
    let mut idle_ids = Vec::new();
    for i in 0..200 {
        idle_ids.push(pb.submit(email(i)).await.unwrap().id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_all_sent(&pb, (2 * n + single + 200) as u64).await;
    let idle_lat = latencies(&pb, &idle_ids).await;

    let _ = stop_tx.send(());
    workers.await.unwrap();
    let _ = ids;
    println!("submit_many (batches of 500, workers idle): {submit_many_rate:>9.0} submits/s");
    println!("submit (one by one, workers running):       {single_rate:>9.0} submits/s");
    println!("drain of a {n}-email backlog:              {drain_rate:>9.0} delivered/s");
    println!("end to end (submit_many + deliver):         {e2e_rate:>9.0} delivered/s");
    println!(
        "latency submit -> SMTP accepted, under load:  p50 {:>7.1} ms  p99 {:>7.1} ms",
        pct(&e2e_lat, 0.5),
        pct(&e2e_lat, 0.99)
    );
    println!(
        "latency submit -> SMTP accepted, idle queue:  p50 {:>7.1} ms  p99 {:>7.1} ms",
        pct(&idle_lat, 0.5),
        pct(&idle_lat, 0.99)
    );
    println!("peak RSS: {:.1} MB", peak_rss_mb());
}
