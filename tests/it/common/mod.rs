//! Test harness: a real SMTP server on loopback and the real postbox (library or child process).

pub mod dovecot;
pub mod http;
pub mod ports;
pub mod postfix;
pub mod root;
pub mod smtp;
pub mod tls;
pub mod webdriver;
pub mod webhook;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use postbox::config::{TlsMode, Transport};
use postbox::{EmailId, EmailReport, EmailStatus, Postbox, Settings};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use smtp::SmtpServer;

/// Settings for a test: a fresh SQLite file, SMTP to the test server in plaintext on loopback,
/// fast polls and a 1 s backoff so retries are observable in seconds.
/// Is this test run on PostgreSQL (`TEST_DB_BACKEND=postgres`, set by scripts/test.sh for
/// its second pass)? Otherwise SQLite.
pub fn on_postgres() -> bool {
    std::env::var("TEST_DB_BACKEND").is_ok_and(|v| v == "postgres")
}

/// The throwaway PostgreSQL server scripts/test.sh starts (an admin URL).
pub fn pg_admin_url() -> String {
    std::env::var("TEST_PG_URL").unwrap_or_else(|_| {
        panic!(
            "TEST_PG_URL is not set: run the tests with scripts/test.sh, which starts a \
             throwaway PostgreSQL (initdb + pg_ctl on a random loopback port) and sets it"
        )
    })
}

/// Runs SQL on the throwaway PostgreSQL with psql; its unaligned output.
pub fn psql(url: &str, sql: &str) -> String {
    let out = std::process::Command::new("psql")
        .args([
            "-X",
            "-q",
            "-t",
            "-A",
            "-v",
            "ON_ERROR_STOP=1",
            url,
            "-c",
            sql,
        ])
        .output()
        .expect("run psql (Debian's postgresql-client; scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A new, empty PostgreSQL database; its URL.
pub fn fresh_pg_database() -> String {
    let admin = pg_admin_url();
    let name = format!("t_{}", ulid::Ulid::generate().to_string().to_lowercase());
    psql(&admin, &format!("CREATE DATABASE {name}"));
    let base = admin.rsplit_once('/').expect("a URL with a database").0;
    format!("{base}/{name}")
}

/// The database URL of the test that uses `dir`: its own SQLite file, or (on PostgreSQL) its
/// own fresh database, the same one for every call with the same `dir`.
pub fn db_url(dir: &Path) -> String {
    if !on_postgres() {
        return format!("sqlite://{}", dir.join("postbox.db").display());
    }
    static URLS: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    let mut urls = URLS.lock().unwrap();
    if let Some((_, u)) = urls.iter().find(|(d, _)| d == dir) {
        return u.clone();
    }
    let u = fresh_pg_database();
    urls.push((dir.to_path_buf(), u.clone()));
    u
}

/// Runs one statement on the test's database (`sqlite` or `postgres` text by backend).
/// apalis's jobs table on the test's database.
pub fn jobs_table() -> &'static str {
    if on_postgres() { "apalis.jobs" } else { "Jobs" }
}

pub async fn db_exec(dir: &Path, sqlite: &str, postgres: &str) {
    if on_postgres() {
        psql(&db_url(dir), postgres);
    } else {
        let pool = sqlx::SqlitePool::connect(&db_url(dir)).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(sqlite.to_string()))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
}

/// One integer from the test's database (the same SQL on both backends).
pub async fn db_scalar(dir: &Path, sql: &str) -> i64 {
    if on_postgres() {
        return psql(&db_url(dir), sql).parse().unwrap();
    }
    let pool = sqlx::SqlitePool::connect(&db_url(dir)).await.unwrap();
    let v = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    v
}

pub fn settings(dir: &Path, smtp_port: u16) -> Settings {
    let mut s = Settings::default();
    s.database.url = db_url(dir);
    s.delivery.transport = Transport::Smtp;
    s.smtp.host = "127.0.0.1".into();
    s.smtp.port = smtp_port;
    s.smtp.tls = TlsMode::None;
    s.smtp.connect_timeout_secs = 2;
    s.smtp.command_timeout_secs = 5;
    s.queue.stuck_after_secs = 30;
    s.queue.poll_interval_ms = 50;
    s.queue.heartbeat_secs = 1;
    s.queue.janitor_interval_secs = 1;
    s.retry.min_backoff_secs = 1;
    s.retry.max_backoff_secs = 2;
    s.retry.jitter = false;
    s.retry.max_attempts = 100;
    s.validate().expect("test settings are valid");
    s
}

/// [`settings`] with the memory transport: for tests about the queue, not about SMTP (every
/// delivery path keeps a test against the real SMTP server).
pub fn memory_settings(dir: &Path) -> Settings {
    let mut s = settings(dir, 1);
    s.delivery.transport = Transport::Memory;
    s
}

/// postbox running in this process: the facade plus its workers.
pub struct App {
    pub postbox: Postbox,
    workers: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl App {
    /// Opens postbox without starting workers (mail stays queued).
    pub async fn open(settings: Settings) -> App {
        let postbox = Postbox::open(settings).await.expect("open postbox");
        App {
            postbox,
            workers: None,
        }
    }

    /// Postbox opened by the caller, without workers.
    pub fn with(postbox: Postbox) -> App {
        App {
            postbox,
            workers: None,
        }
    }

    /// Opens postbox and starts its workers.
    pub async fn start(settings: Settings) -> App {
        let mut app = App::open(settings).await;
        app.start_workers();
        app
    }

    pub fn start_workers(&mut self) {
        let (tx, rx) = oneshot::channel::<()>();
        let pb = self.postbox.clone();
        let h = tokio::spawn(async move {
            pb.run_workers(async move {
                let _ = rx.await;
            })
            .await
        });
        self.workers = Some((tx, h));
    }

    pub async fn stop_workers(&mut self) {
        if let Some((tx, h)) = self.workers.take() {
            let _ = tx.send(());
            h.await.expect("workers exit cleanly");
        }
    }

    /// What the memory transport delivered, in order.
    pub fn sent(&self) -> Vec<postbox::delivery::SentMessage> {
        self.postbox.sent_in_memory()
    }

    /// Submits one email that must be accepted; returns its id.
    pub async fn submit(&self, email: postbox::NewEmail) -> EmailId {
        self.postbox.submit(email).await.expect("email accepted").id
    }

    pub async fn status(&self, id: &EmailId) -> EmailReport {
        self.postbox
            .status(id)
            .await
            .expect("status")
            .expect("email exists")
    }

    /// Waits until the email reaches `want`; panics with its report if it does not in `limit`.
    pub async fn wait_status(
        &self,
        id: &EmailId,
        want: EmailStatus,
        limit: Duration,
    ) -> EmailReport {
        let t0 = Instant::now();
        loop {
            // A read may fail while the test holds the database down (and for a moment after,
            // while the circuit breaker waits to try it again): like a client, ask again.
            let r = self.postbox.status(id).await;
            if let Ok(Some(r)) = &r
                && r.status == want
            {
                return r.clone();
            }
            if t0.elapsed() > limit {
                panic!("email {id} did not become {want} within {limit:?}: {r:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn count(&self, s: EmailStatus) -> u64 {
        self.postbox.counts().await.expect("counts").get(s)
    }
}

/// The IMAP watchers of `pb`, running until [`Watchers::stop`].
pub struct Watchers(Option<(oneshot::Sender<()>, JoinHandle<()>)>);

impl Watchers {
    pub fn start(pb: &Postbox) -> Watchers {
        let (tx, rx) = oneshot::channel::<()>();
        let pb = pb.clone();
        let h = tokio::spawn(async move {
            pb.run_watchers(postbox::shutdown_signal(async move {
                let _ = rx.await;
            }))
            .await;
        });
        Watchers(Some((tx, h)))
    }

    pub async fn stop(&mut self) {
        if let Some((tx, h)) = self.0.take() {
            let _ = tx.send(());
            h.await.expect("watchers exit cleanly");
        }
    }
}

/// Polls `cond` every 50 ms until true; panics with `what` after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        if t0.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_postbox"))
}

/// Environment that points a `postbox` child process at the test database and SMTP server.
pub fn child_env(dir: &Path, smtp_port: u16) -> Vec<(String, String)> {
    [
        ("POSTBOX_DATABASE__URL", db_url(dir)),
        ("POSTBOX_DELIVERY__TRANSPORT", "smtp".into()),
        ("POSTBOX_SMTP__HOST", "127.0.0.1".into()),
        ("POSTBOX_SMTP__PORT", smtp_port.to_string()),
        ("POSTBOX_SMTP__TLS", "none".into()),
        ("POSTBOX_SMTP__CONNECT_TIMEOUT_SECS", "2".into()),
        ("POSTBOX_SMTP__COMMAND_TIMEOUT_SECS", "5".into()),
        ("POSTBOX_QUEUE__STUCK_AFTER_SECS", "30".into()),
        ("POSTBOX_QUEUE__POLL_INTERVAL_MS", "50".into()),
        ("POSTBOX_QUEUE__HEARTBEAT_SECS", "1".into()),
        ("POSTBOX_QUEUE__JANITOR_INTERVAL_SECS", "1".into()),
        ("POSTBOX_RETRY__MIN_BACKOFF_SECS", "1".into()),
        ("POSTBOX_RETRY__MAX_BACKOFF_SECS", "2".into()),
        ("POSTBOX_RETRY__JITTER", "false".into()),
        ("POSTBOX_API__LISTEN", "127.0.0.1:0".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A `postbox serve` child process whose stderr is drained continuously (a full pipe would
/// block the child) into `logs`.
pub struct Serve {
    pub child: tokio::process::Child,
    pub logs: std::sync::Arc<std::sync::Mutex<String>>,
    drain: JoinHandle<()>,
}

impl Serve {
    /// Everything the child logged so far (all of it once the child has exited and been waited).
    pub async fn logs(self) -> String {
        let _ = self.drain.await;
        self.logs.lock().unwrap().clone()
    }
}

pub fn spawn_serve(dir: &Path, smtp_port: u16, extra: &[(&str, &str)]) -> Serve {
    spawn_postbox("serve", dir, smtp_port, extra)
}

/// A `postbox <command>` child process (serve, api, worker) as [`spawn_serve`] makes it.
pub fn spawn_postbox(command: &str, dir: &Path, smtp_port: u16, extra: &[(&str, &str)]) -> Serve {
    use tokio::io::AsyncReadExt;
    let mut cmd = tokio::process::Command::new(bin());
    cmd.arg(command)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(child_env(dir, smtp_port))
        .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn postbox serve");
    let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stderr = child.stderr.take().expect("piped stderr");
    let sink = logs.clone();
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    Serve { child, logs, drain }
}

/// The port a `postbox serve` or `postbox api` child logged it listens on.
pub async fn api_port(serve: &Serve) -> u16 {
    let mut port = None;
    wait_for("the API's listening line", Duration::from_secs(30), || {
        let logs = serve.logs.lock().unwrap();
        port = logs.find("HTTP API listening").and_then(|i| {
            let rest = &logs[i..];
            let at = rest.find("127.0.0.1:")? + "127.0.0.1:".len();
            let digits: String = rest[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        });
        port.is_some()
    })
    .await;
    port.unwrap()
}

/// Emails in the database without the job that owns them (`<id>:<job_seq>`), and jobs without
/// an email: both must always be 0, whatever a request did.
pub async fn half_written(dir: &Path) -> (i64, i64) {
    let jobs = jobs_table();
    let emails = db_scalar(
        dir,
        &format!(
            "SELECT COUNT(*) FROM postbox_emails e WHERE NOT EXISTS
               (SELECT 1 FROM {jobs} j WHERE j.idempotency_key = e.id || ':' || e.job_seq)"
        ),
    )
    .await;
    let orphan_jobs = db_scalar(
        dir,
        &format!(
            "SELECT COUNT(*) FROM {jobs} j WHERE NOT EXISTS
               (SELECT 1 FROM postbox_emails e WHERE j.idempotency_key = e.id || ':' || e.job_seq)"
        ),
    )
    .await;
    (emails, orphan_jobs)
}

/// The store's invariants, checked at a test's end: the trigger-kept counters (by status and
/// priority, and the depth) equal a real count of the emails table, and every email waiting
/// to be sent owns a live job, and no job is left live for an email that is final.
pub async fn assert_store_consistent(dir: &Path) {
    let off = db_scalar(
        dir,
        "SELECT COUNT(*) FROM (SELECT name, SUM(n) AS n FROM postbox_counters
           WHERE name LIKE 'status:%' GROUP BY name) c
          WHERE c.n <> (SELECT COUNT(*) FROM postbox_emails e
                         WHERE 'status:' || e.status || ':' || e.priority = c.name)",
    )
    .await;
    assert_eq!(off, 0, "status counters differ from the emails table");
    let depth = db_scalar(
        dir,
        "SELECT CAST(SUM(n) AS BIGINT) - (SELECT COUNT(*) FROM postbox_emails
           WHERE status IN ('queued', 'retrying', 'sending'))
           FROM postbox_counters WHERE name = 'depth'",
    )
    .await;
    assert_eq!(depth, 0, "the depth counter differs from the emails table");
    // Nothing accepted is lost: every email waiting to be sent owns a live job for its current
    // seq (the janitor would rescue one that does not, but none should need it).
    let jobs = jobs_table();
    let orphans = db_scalar(
        dir,
        &format!(
            "SELECT COUNT(*) FROM postbox_emails e
              WHERE e.status IN ('queued', 'retrying')
                AND NOT EXISTS (SELECT 1 FROM {jobs} j
                     WHERE j.idempotency_key = e.id || ':' || e.job_seq
                       AND j.status IN ('Pending', 'Queued', 'Running'))"
        ),
    )
    .await;
    assert_eq!(orphans, 0, "emails waiting to be sent without a live job");
    // And no job is left live for an email that is final (its job is acked just after the
    // outcome is recorded: give that a moment).
    let leaked = format!(
        "SELECT COUNT(*) FROM {jobs} j JOIN postbox_emails e
            ON j.idempotency_key = e.id || ':' || e.job_seq
         WHERE j.status IN ('Pending', 'Queued', 'Running')
           AND e.status IN ('sent', 'failed', 'cancelled', 'expired')"
    );
    let t0 = Instant::now();
    loop {
        let n = db_scalar(dir, &leaked).await;
        if n == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{n} jobs still live for final emails"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A real database outage for `hold`, while postbox runs: on SQLite another connection holds
/// the write lock (postbox's writes fail with "database is locked" once their busy timeout
/// runs out); on PostgreSQL every other connection to the test's database is terminated, again
/// and again (postbox's statements fail with a closed connection and its pools reconnect).
pub async fn db_outage(dir: &Path, hold: Duration) {
    if on_postgres() {
        let url = db_url(dir);
        let t0 = Instant::now();
        while t0.elapsed() < hold {
            psql(
                &url,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return;
    }
    hold_writes(dir, hold).await;
}

/// Blocks every write to the test's database for `hold` (another connection holds SQLite's
/// write lock; on PostgreSQL an exclusive lock on the emails table): writers wait, or fail once
/// their busy timeout runs out.
pub async fn hold_writes(dir: &Path, hold: Duration) {
    if on_postgres() {
        let url = db_url(dir);
        let secs = hold.as_secs_f64();
        tokio::task::spawn_blocking(move || {
            psql(
                &url,
                &format!(
                    "BEGIN; LOCK TABLE postbox_emails IN EXCLUSIVE MODE; SELECT pg_sleep({secs}); COMMIT;"
                ),
            )
        })
        .await
        .unwrap();
        return;
    }
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(&db_url(dir)).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("UPDATE postbox_counters SET n = n WHERE name = 'depth'")
        .execute(&mut c)
        .await
        .unwrap();
    tokio::time::sleep(hold).await;
    sqlx::query("COMMIT").execute(&mut c).await.unwrap();
    c.close().await.unwrap();
}

/// A small tmpfs mounted for one test (a disk that can really fill up), unmounted on drop.
/// Mounting needs root (or passwordless sudo); CI runs the suite as root.
pub struct TmpFs {
    pub path: PathBuf,
}

fn as_root(args: &[&str]) -> std::process::Output {
    root::command(args[0])
        .args(&args[1..])
        .output()
        .expect("run mount/umount")
}

impl TmpFs {
    pub fn mount(path: &Path, mib: u64) -> TmpFs {
        std::fs::create_dir_all(path).unwrap();
        let out = as_root(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m"),
            "tmpfs",
            path.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "the disk-full test mounts a {mib} MiB tmpfs at {}; that needs root or passwordless \
             sudo: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        TmpFs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for TmpFs {
    fn drop(&mut self) {
        let _ = as_root(&["umount", "-l", self.path.to_str().unwrap()]);
    }
}

/// A PostgreSQL of one test's own (scripts/pg-throwaway.sh: initdb + pg_ctl in a temp dir on a
/// random loopback port), which the test may take down and bring back; removed on drop.
pub struct PgServer {
    pub url: String,
    dir: String,
}

fn pg_script(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-throwaway.sh");
    let out = std::process::Command::new(script)
        .args(args)
        .env("PG_THROWAWAY_OPTS", "-c fsync=off")
        .output()
        .expect("run scripts/pg-throwaway.sh");
    assert!(
        out.status.success(),
        "pg-throwaway.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl PgServer {
    pub fn start() -> PgServer {
        let out = pg_script(&[]);
        let value = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("pg-throwaway.sh printed no {key}: {out}"))
                .to_string()
        };
        PgServer {
            url: value("TEST_PG_URL="),
            dir: value("PG_THROWAWAY_DIR="),
        }
    }

    /// Stops the server (fast shutdown: every connection is closed).
    pub fn down(&self) {
        pg_script(&["down", &self.dir]);
    }

    /// Starts it again on the same port with the same data.
    pub fn up(&self) {
        pg_script(&["up", &self.dir]);
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        pg_script(&["stop", &self.dir]);
    }
}

/// Peak resident memory of process `pid` (this process when None), in MiB.
pub fn peak_rss_mib(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024
}
