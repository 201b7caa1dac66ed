//! Opening the store (pools, migrations, the WAL checkpointer) and its health: whether the
//! database answers, whether the disk refused a write, whether deliveries must wait for the WAL.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use time::OffsetDateTime;

use super::Fault;
use super::settings::{DatabaseSettings, Synchronous, is_postgres_url};
use super::*;
use crate::db::{Db, Kind, sql};
use crate::queue::table;
use std::sync::atomic::Ordering;

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pub(super) db: Db,
    pub(super) queue: String,
    /// The last write refused because the disk is full, until a write succeeds again.
    pub(super) full: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, String)>>>,
    /// SQLite: a checkpoint failed (the disk is full) and the WAL has not been truncated
    /// since; deliveries wait (see [`Store::wal_reclaimed`]).
    pub(super) wal_trouble: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Told after a commit that queued a job for later (a retry's backoff, a `send_at`), so
    /// the worker's due timer looks again for the next run time ([`Store::next_due`]).
    pub(super) scheduled: std::sync::Arc<tokio::sync::Notify>,
    /// Bumped after each commit that wrote timeline entries (events), so this process's
    /// webhook dispatchers look at once.
    pub(super) events: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

/// How long a refused write keeps `/readyz` not ready (unless a write succeeds sooner).
const FULL_REMEMBERED: Duration = Duration::from_secs(10);
/// How long a write waits for SQLite's one writer connection before failing as busy (the
/// writer is only ever held for one transaction; this is the backstop of `busy_timeout_ms`).
const WRITER_WAIT: Duration = Duration::from_secs(30);
/// How often WAL frames are copied back into the database, off the commit path.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

pub(super) fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// WAL frames past which the WAL is truncated while the disk has been in trouble (16 MiB of
/// 4 KiB pages).
const WAL_TIGHT_FRAMES: i64 = 4_096;
/// How long after a failed checkpoint the WAL is kept tight.
const TROUBLE_REMEMBERED: Duration = Duration::from_secs(600);

/// Copies WAL frames back into the database every [`CHECKPOINT_EVERY`], off the commit path.
///
/// In normal operation only passive checkpoints run: they never wait. But they never restart
/// the WAL either (SQLite reuses it from its start only when every frame was copied back and no
/// reader still holds it, and under sustained load some reader always does), so the WAL grows:
/// measured, `scripts/bench-http.sh 10` left a 206 MB WAL, and a delivery backlog adds ~80 KB
/// per email. Forcing restarts holds writers while readers finish, and that cost tail latency
/// (bench-http single POSTs, p99 12 ms -> 61-72 ms with a restart past 64 MiB; a TRUNCATE past
/// 16 MiB cost 18% of a drain's rate), so they are left out of normal operation.
///
/// A full disk is where an unbounded WAL hurts: on a 32 MiB disk, space freed after it filled
/// up was eaten again within a second by the backlog. So after a failed checkpoint, TRUNCATE
/// checkpoints run until one succeeds (giving the WAL's space back to the disk), and for
/// [`TROUBLE_REMEMBERED`] afterwards the WAL is truncated whenever it passes
/// [`WAL_TIGHT_FRAMES`]. Until the first truncation succeeds, `trouble` is set: deliveries
/// wait, so that a backlog (~80 KB of WAL per delivery) does not eat the space freed for the
/// truncation. Measured under load before they waited: 648 truncations in a row failed on a
/// disk 40 MB of which had just been freed.
async fn checkpoints(
    pool: sqlx::SqlitePool,
    trouble: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut mode = "PASSIVE";
    let mut trouble_until: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(CHECKPOINT_EVERY).await;
        if pool.is_closed() {
            return;
        }
        let res = sqlx::query_as::<_, (i64, i64, i64)>(sqlx::AssertSqlSafe(format!(
            "PRAGMA wal_checkpoint({mode})"
        )))
        .fetch_one(&pool)
        .await;
        if mode == "TRUNCATE"
            && matches!(res, Ok((0, _, _)))
            && trouble.swap(false, Ordering::AcqRel)
        {
            tracing::info!("the WAL was truncated; deliveries resume");
        }
        // A write refused for a full disk (noted by the store) counts like a failed checkpoint.
        if mode != "TRUNCATE" && trouble.load(Ordering::Acquire) {
            trouble_until = Some(std::time::Instant::now() + TROUBLE_REMEMBERED);
            mode = "TRUNCATE";
            continue;
        }
        let tight = trouble_until.is_some_and(|t| std::time::Instant::now() < t);
        mode = match res {
            // Readers could not be waited out: try again.
            Ok((busy, _, _)) if mode == "TRUNCATE" && busy != 0 => "TRUNCATE",
            Ok((_, log, _)) if tight && log > WAL_TIGHT_FRAMES => "TRUNCATE",
            Ok(_) => "PASSIVE",
            Err(e) => {
                if pool.is_closed() {
                    return;
                }
                if mode != "TRUNCATE" {
                    tracing::warn!(error = %e, "WAL checkpoint failed; truncating the WAL until it succeeds");
                }
                trouble_until = Some(std::time::Instant::now() + TROUBLE_REMEMBERED);
                if !trouble.swap(true, Ordering::AcqRel) {
                    tracing::warn!("deliveries wait until the WAL can be truncated");
                }
                "TRUNCATE"
            }
        };
    }
}

/// Whether a connection given back to the pool may be used again. A transaction whose COMMIT
/// or ROLLBACK failed (SQLite on a full disk rolls a transaction back by itself, so the
/// driver's ROLLBACK then fails too) leaves the driver believing it is still inside one: the
/// next `BEGIN IMMEDIATE` on it fails ("non-zero transaction depth") and other writers wait on
/// it. Such a connection is closed instead of reused, whoever used it (apalis included). A
/// rollback the driver has merely queued is let through first (the ping runs after it).
async fn still_clean<C: sqlx::Connection>(conn: &mut C) -> Result<bool, sqlx::Error> {
    if conn.is_in_transaction() {
        conn.ping().await?;
    }
    let clean = !conn.is_in_transaction();
    if !clean {
        tracing::warn!("closing a database connection left inside a failed transaction");
    }
    Ok(clean)
}

impl Store {
    /// Opens the database named by `database.url` (SQLite, or PostgreSQL for `postgres://`)
    /// and applies every migration: apalis's, then ours (bookkept in `postbox_migrations`).
    pub async fn open(settings: &DatabaseSettings, queue: &str) -> Result<Store, StoreError> {
        let wal_trouble = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let db = if is_postgres_url(&settings.url) {
            Self::open_postgres(settings).await?
        } else {
            Self::open_sqlite(settings, wal_trouble.clone()).await?
        };
        Ok(Store {
            db,
            queue: queue.to_string(),
            full: Default::default(),
            wal_trouble,
            scheduled: Default::default(),
            events: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// This store for tasks of another tokio runtime (the webhook dispatchers' thread); call
    /// it on that runtime. PostgreSQL: a pool of its own of `connections`, opened when first
    /// used, because a connection's I/O is served by the runtime that opened it: sharing the
    /// pool would leave some of the workers' connections to the other runtime's thread.
    /// SQLite's connections are threads of their own: shared as they are.
    pub(crate) fn for_this_runtime(&self, connections: u32) -> Store {
        match &self.db {
            Db::Pg(pool, breaker) => {
                let own = PgPoolOptions::new()
                    .max_connections(connections)
                    .after_release(|conn, _| Box::pin(still_clean(conn)))
                    .acquire_timeout(pool.options().get_acquire_timeout())
                    .connect_lazy_with(pool.connect_options().as_ref().clone());
                Store {
                    db: Db::Pg(own, breaker.clone()),
                    ..self.clone()
                }
            }
            Db::Sqlite { .. } => self.clone(),
        }
    }

    /// PostgreSQL: apalis-postgres's schema `apalis` (it needs the hstore extension: the first
    /// start must be allowed to `CREATE EXTENSION`), then `migrations/postgres`. Both migrators
    /// hold sqlx's advisory lock, so many processes can start at once.
    async fn open_postgres(settings: &DatabaseSettings) -> Result<Db, StoreError> {
        let opts = PgConnectOptions::from_str(&settings.url)?;
        let breaker = std::sync::Arc::new(crate::db::Breaker::new(opts.clone()));
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(1)
            .after_release(|conn, _| Box::pin(still_clean(conn)))
            .acquire_timeout(Duration::from_millis(settings.busy_timeout_ms.max(1000)))
            .connect_with(opts)
            .await?;
        let db = Db::Pg(pool, breaker);
        table::setup(&db).await.map_err(StoreError::Queue)?;
        let mut migrator = sqlx::migrate!("./migrations/postgres");
        migrator.dangerous_set_table_name("postbox_migrations");
        if let Db::Pg(pool, _) = &db {
            migrator.run(pool).await?;
        }
        Ok(db)
    }

    async fn open_sqlite(
        settings: &DatabaseSettings,
        wal_trouble: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Db, StoreError> {
        let opts = SqliteConnectOptions::from_str(&settings.url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match settings.synchronous {
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_millis(settings.busy_timeout_ms))
            .pragma("temp_store", "MEMORY")
            // 2 MB of page cache on every connection, SQLite's default (see the readers below).
            .pragma("cache_size", "-2000")
            // Checkpoints run in a background task (see below), not inside whichever commit
            // crosses the threshold; this high mark is only a backstop.
            .pragma("wal_autocheckpoint", "50000");
        // apalis's setup() switches one connection to synchronous=OFF: run it on a throwaway pool
        // so no connection we keep has durability turned off.
        let setup = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await?;
        table::setup(&Db::Sqlite {
            write: setup.clone(),
            read: setup.clone(),
        })
        .await
        .map_err(StoreError::Queue)?;
        let mut migrator = sqlx::migrate!("./migrations/sqlite");
        migrator.dangerous_set_table_name("postbox_migrations");
        migrator.run(&setup).await?;
        setup.close().await;

        // The one writer (see `Db`): one connection, which every write queues for. No ping
        // before each use (sqlx's default): an SQLite connection is a file in this process, it
        // cannot hang up, and a connection a failed transaction left unusable is closed on
        // release (`still_clean`). The ping was one more round trip to the driver's thread per
        // transaction, ~10% of the rate of a 5,000-email run at the peer harness's settings.
        let write = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(WRITER_WAIT)
            .after_release(|conn, _| Box::pin(still_clean(conn)))
            .connect_with(opts.clone())
            .await?;
        // Readers and the writer keep SQLite's default 2 MB page cache each (the OS caches the
        // file too). Measured (`scripts/bench.sh 5000`): 16 MB on every connection peaked at
        // 60 MB RSS; 2 MB readers, 54 MB; and an 8 MB writer, 45.5 MB, at the same
        // delivered/s. A 4 MB writer then took 2.5 MB more off the peer harness's peak, and a
        // 2 MB one another 3 MB (postbox-bulk, 41-42 -> 38-39 MB, alternated in one sitting)
        // at the same delivered/s, also with 1,000,000 queued (`scripts/bench-1m.sh`: 8,622
        // delivered/s against 8,554 with 200,000). No ping before use.
        let read = SqlitePoolOptions::new()
            .test_before_acquire(false)
            .max_connections(settings.max_connections)
            .min_connections(1)
            .after_release(|conn, _| Box::pin(still_clean(conn)))
            .connect_with(opts)
            .await?;
        tokio::spawn(checkpoints(read.clone(), wal_trouble));
        Ok(Db::Sqlite { write, read })
    }

    /// The database pool (the queue builds its apalis backend on it).
    pub fn db(&self) -> &Db {
        &self.db
    }

    pub fn kind(&self) -> Kind {
        self.db.kind()
    }

    /// Changes after each commit in this process that wrote events.
    pub(crate) fn events_written(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.subscribe()
    }

    pub(super) fn wrote_events(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Notified after each commit that queued a job to run later (see `worker::wake_when_due`).
    pub(crate) fn scheduled(&self) -> &std::sync::Arc<tokio::sync::Notify> {
        &self.scheduled
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    pub async fn close(&self) {
        self.db.close().await;
    }

    /// Is the database answering?
    pub async fn ping(&self) -> Result<(), StoreError> {
        sql("SELECT 1").execute(&self.db).await?;
        Ok(())
    }

    /// Notes how a submission's write went: a refusal for a full disk is remembered (readiness
    /// says so, so that a load balancer sends submissions elsewhere) until a submission commits
    /// or `FULL_REMEMBERED` passes.
    pub fn note_write<T>(&self, r: &Result<T, StoreError>) {
        let mut full = self.full.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(_) => *full = None,
            Err(e) if e.fault() == Fault::Full => {
                self.saw(e);
                *full = Some((std::time::Instant::now(), e.to_string()))
            }
            Err(_) => {}
        }
    }

    /// Notes an error of any write: one refused for a full disk sets SQLite's WAL trouble, so
    /// that deliveries wait and the checkpointer truncates the WAL as soon as it can (before
    /// the backlog eats freed space: see `checkpoints`).
    pub fn saw(&self, e: &StoreError) {
        if e.fault() == Fault::Full
            && self.db.kind() == Kind::Sqlite
            && !self.wal_trouble.swap(true, Ordering::AcqRel)
        {
            tracing::warn!("the disk is full: deliveries wait until the WAL can be truncated");
        }
    }

    /// Waits while SQLite's WAL must be reclaimed after a full disk (a failed checkpoint not
    /// yet followed by a truncation), or until `stop` fires. Returns at once otherwise.
    pub async fn wal_reclaimed(&self, stop: impl std::future::Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        while self.wal_trouble.load(Ordering::Acquire) {
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    /// A recent write refused for a full disk, not followed by a successful one.
    pub fn storage_full(&self) -> Option<String> {
        let full = self.full.lock().unwrap_or_else(|p| p.into_inner());
        full.as_ref()
            .filter(|(at, _)| at.elapsed() < FULL_REMEMBERED)
            .map(|(_, e)| format!("writes were refused: {e}"))
    }

    /// Does the database take a write now? One row rewritten in a transaction of its own: it
    /// fails on a full disk, on a lock held past the busy timeout, on an unreachable server.
    pub async fn write_probe(&self) -> Result<(), StoreError> {
        if let Some(full) = self.storage_full() {
            return Err(StoreError::Queue(full));
        }
        let mut tx = self.db.begin_write().await?;
        let probe = match self.db.kind() {
            Kind::Sqlite => "UPDATE postbox_counters SET n = n WHERE name = 'depth'",
            Kind::Postgres => {
                "UPDATE postbox_counters SET n = n WHERE name = 'depth' AND shard = 0"
            }
        };
        sql(probe).execute(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PRAGMA synchronous` on the writer and on every reader: FULL (2) by default, NORMAL (1)
    /// when configured.
    async fn synchronous_of(setting: Option<Synchronous>) -> Vec<i64> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = DatabaseSettings {
            url: format!("sqlite://{}", dir.path().join("t.db").display()),
            ..Default::default()
        };
        if let Some(v) = setting {
            s.synchronous = v;
        }
        let store = Store::open(&s, "q").await.expect("open");
        let Db::Sqlite { write, read } = store.db() else {
            panic!("not SQLite")
        };
        let mut seen = Vec::new();
        let w: (i64,) = sqlx::query_as("PRAGMA synchronous")
            .fetch_one(write)
            .await
            .expect("writer");
        seen.push(w.0);
        // Hold several readers at once, so each is a different connection.
        let mut held = Vec::new();
        for _ in 0..s.max_connections {
            let mut c = read.acquire().await.expect("reader");
            let r: (i64,) = sqlx::query_as("PRAGMA synchronous")
                .fetch_one(&mut *c)
                .await
                .expect("reader");
            seen.push(r.0);
            held.push(c);
        }
        seen
    }

    #[tokio::test]
    async fn every_sqlite_connection_syncs_fully_unless_configured_otherwise() {
        let full = synchronous_of(None).await;
        assert_eq!(full.len(), 9);
        assert!(full.iter().all(|&v| v == 2), "FULL expected: {full:?}");
        let normal = synchronous_of(Some(Synchronous::Normal)).await;
        assert!(
            normal.iter().all(|&v| v == 1),
            "NORMAL expected: {normal:?}"
        );
    }
}
