//! One small query layer over both databases, so every statement of the store is written once.
//!
//! SQL is written with `$1`-style parameters (SQLite accepts them too) and the common subset of
//! both dialects; the few places that differ ask [`Kind`]. Values are bound as [`Arg`]s (integers,
//! text, bytes: all our columns are one of these) and rows are read through [`DbRow::get`], which
//! takes any type both drivers decode.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgPool, PgRow};
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Decode, Postgres, Row, Sqlite, Transaction, Type};

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

impl Kind {
    /// The function giving a substring's 1-based position (0: absent): `instr(haystack,
    /// needle)` on SQLite, `strpos(haystack, needle)` on PostgreSQL.
    pub fn position_fn(self) -> &'static str {
        match self {
            Kind::Sqlite => "instr",
            Kind::Postgres => "strpos",
        }
    }
}

/// The pool of either database. PostgreSQL's comes with a `Breaker`.
///
/// SQLite has ONE writer: `write` holds a single connection, and every transaction and every
/// statement that is not a `SELECT` runs on it (apalis's too), so no two postbox connections
/// ever wait on each other's write lock (SQLite's busy handler sleeps in whole milliseconds;
/// measured before this, 5 of 8 connections slept there at any moment of a drain). Callers
/// queue for the connection instead, in order, without sleeping. Plain `SELECT`s run on
/// `read`, many at once (WAL readers never block the writer).
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite { write: SqlitePool, read: SqlitePool },
    Pg(PgPool, Arc<Breaker>),
}

/// While PostgreSQL is known to be unreachable, statements fail at once instead of each
/// waiting out the pool's acquire timeout (with the server down, every request would take
/// that long to learn it). After [`Breaker::WINDOW`] one caller tries again; success closes
/// the breaker for everyone.
#[derive(Debug)]
pub struct Breaker {
    /// Unix ms until which callers fail fast; 0 when the database answers.
    down_until: AtomicI64,
    /// How to reach the server directly, to tell "unreachable" from "every connection busy".
    opts: sqlx::postgres::PgConnectOptions,
}

impl Breaker {
    const WINDOW: Duration = Duration::from_secs(2);

    pub fn new(opts: sqlx::postgres::PgConnectOptions) -> Breaker {
        Breaker {
            down_until: AtomicI64::new(0),
            opts,
        }
    }

    /// Does the server accept a connection within a second?
    async fn server_answers(&self) -> bool {
        use sqlx::Connection;
        let connect = sqlx::postgres::PgConnection::connect_with(&self.opts);
        match tokio::time::timeout(Duration::from_secs(1), connect).await {
            Ok(Ok(c)) => {
                let _ = c.close().await;
                true
            }
            _ => false,
        }
    }

    fn now_ms() -> i64 {
        (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
    }

    /// May a statement go to the database now?
    fn admit(&self) -> Result<(), sqlx::Error> {
        let until = self.down_until.load(Ordering::Acquire);
        if until == 0 {
            return Ok(());
        }
        let now = Self::now_ms();
        let retry = now + Self::WINDOW.as_millis() as i64;
        // The window is over: one caller (the one that moves it) tries.
        if now >= until
            && self
                .down_until
                .compare_exchange(until, retry, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Ok(());
        }
        Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "the database could not be reached moments ago; not tried again yet",
        )))
    }

    /// Notes how a statement went, and names the trouble right: a pool that timed out either
    /// had every connection busy, or could not open one because the server is unreachable
    /// (the pool cannot tell; a direct connection attempt can).
    async fn observe<T>(&self, r: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        let r = match r {
            Err(sqlx::Error::PoolTimedOut) if !self.server_answers().await => {
                Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "cannot connect to the database server",
                )))
            }
            r => r,
        };
        self.note(&r);
        r
    }

    fn note<T>(&self, r: &Result<T, sqlx::Error>) {
        match r {
            Ok(_) => {
                if self.down_until.load(Ordering::Relaxed) != 0 {
                    self.down_until.store(0, Ordering::Release);
                    tracing::info!("the database answers again");
                }
            }
            Err(e) if unreachable(e) => {
                let until = Self::now_ms() + Self::WINDOW.as_millis() as i64;
                if self.down_until.swap(until, Ordering::AcqRel) == 0 {
                    tracing::warn!(error = %e, "the database cannot be reached; failing fast for now");
                }
            }
            Err(_) => {}
        }
    }
}

/// Does `e` say the PostgreSQL server cannot be reached (not that a statement was wrong)?
fn unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

impl Db {
    pub fn kind(&self) -> Kind {
        match self {
            Db::Sqlite { .. } => Kind::Sqlite,
            Db::Pg(..) => Kind::Postgres,
        }
    }

    /// A plain transaction.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Sqlite { write, .. } => Tx::Sqlite(write.begin().await?),
            Db::Pg(p, b) => {
                b.admit()?;
                Tx::Pg(b.observe(p.begin().await).await?)
            }
        })
    }

    /// A transaction that writes after reading what it checks. SQLite: take the write lock
    /// first (`BEGIN IMMEDIATE`). PostgreSQL: plain; callers serialize with `Tx::lock`.
    pub async fn begin_write(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Sqlite { write, .. } => Tx::Sqlite(write.begin_with("BEGIN IMMEDIATE").await?),
            Db::Pg(..) => self.begin().await?,
        })
    }

    /// A write transaction that begins with its first statement. SQLite: postbox's own
    /// ([`OwnTx`]), whose `BEGIN IMMEDIATE` goes to the writer's thread in the text of its
    /// first statement, not as a round trip of its own; [`Tx::commit_with`] puts the `COMMIT`
    /// in the text of the last. PostgreSQL: [`Db::begin`].
    pub async fn begin_own(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Db::Sqlite { write, .. } => Tx::SqliteOwn(OwnTx {
                conn: Some(write.acquire().await?),
                open: false,
                failed: false,
            }),
            Db::Pg(..) => self.begin().await?,
        })
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite { write, read } => {
                read.close().await;
                write.close().await;
            }
            Db::Pg(p, _) => p.close().await,
        }
    }
}

/// SQLite's write connection in a transaction postbox begins and ends itself instead of through
/// sqlx's `Transaction` ([`Db::begin_own`]): `BEGIN IMMEDIATE` goes to the connection's thread
/// in the text of the transaction's first statement, and [`Tx::commit_with`] sends `COMMIT` in
/// the text of its last, where sqlx's begin and commit are a round trip each. sqlx does not know
/// of this transaction, so it must never go back to the pool open: a failed commit is rolled
/// back at once, and one dropped unended (an error on the way, a cancelled future) is rolled
/// back before its connection is released, as sqlx does for its own; where that fails, the
/// connection is closed (which rolls back) instead. After a statement of it failed it runs no
/// other (that statement may have been the one carrying its `BEGIN`, and the next would then
/// commit on its own): it can only be rolled back or dropped.
pub struct OwnTx {
    /// Taken only by `drop`.
    conn: Option<sqlx::pool::PoolConnection<Sqlite>>,
    /// `BEGIN` was sent (it may have failed: ending it then finds no transaction, which is
    /// fine) and no `COMMIT` or `ROLLBACK` has succeeded since.
    open: bool,
    /// A statement failed.
    failed: bool,
}

impl OwnTx {
    /// The connection, for a statement sent with [`OwnTx::prefix`] before its text (the
    /// query layer's, and apalis's fetch, which reads its rows with sqlx itself).
    pub(crate) fn conn(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_mut()
            .expect("the connection is taken only on drop")
    }

    /// The text to send before the next statement's: `BEGIN IMMEDIATE` before the first. An
    /// error once a statement has failed.
    pub(crate) fn prefix(&mut self) -> Result<&'static str, sqlx::Error> {
        if self.failed {
            return Err(sqlx::Error::Protocol(
                "a statement of this transaction failed: it can only be rolled back".into(),
            ));
        }
        Ok(if self.open {
            ""
        } else {
            self.open = true;
            "BEGIN IMMEDIATE;\n"
        })
    }

    /// Notes how a statement sent after [`OwnTx::prefix`] ended.
    pub(crate) fn ran<T>(&mut self, res: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if res.is_err() {
            self.failed = true;
        }
        res
    }

    /// `script` and `COMMIT` in one text (after the `BEGIN`, if no statement ran yet). A
    /// failure rolls back: the statement's error is the one returned.
    async fn commit_with<T: Col>(&mut self, mut script: Script) -> Result<Vec<T>, sqlx::Error> {
        if !self.open && script.parts.is_empty() {
            return Ok(Vec::new());
        }
        script.push(sql("COMMIT").keep());
        let res = script.joined().column(On::SqliteOwn(self)).await;
        if res.is_ok() {
            self.open = false;
        } else {
            let _ = self.rollback().await;
        }
        res
    }

    /// Ends the transaction if it is open; where even `ROLLBACK` fails, the connection is
    /// closed when dropped instead of going back to the pool, and the error returned.
    async fn rollback(&mut self) -> Result<(), sqlx::Error> {
        if !self.open {
            return Ok(());
        }
        self.open = false;
        let res = rollback_own(self.conn()).await;
        if let Err(e) = &res {
            tracing::warn!(error = %e, "cannot roll back a failed write; closing its connection");
            if let Some(c) = self.conn.as_mut() {
                c.close_on_drop();
            }
        }
        res
    }
}

/// `ROLLBACK`. Most failed statements leave their transaction open; some (a full disk, an
/// I/O error) end it themselves, and then there is nothing to roll back.
async fn rollback_own(conn: &mut SqliteConnection) -> Result<(), sqlx::Error> {
    match sqlx::query("ROLLBACK").execute(conn).await {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_database_error()
                .is_some_and(|d| d.message().contains("no transaction is active")) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

impl Drop for OwnTx {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if !self.open {
            return;
        }
        // Until its ROLLBACK has succeeded the connection is closed if dropped: the task below
        // may itself be dropped unpolled (a runtime shutting down).
        let mut closing = Closing(Some(conn));
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let Some(conn) = closing.0.as_mut() else {
                        return;
                    };
                    match rollback_own(conn).await {
                        Ok(()) => drop(closing.0.take()),
                        Err(e) => tracing::warn!(error = %e,
                            "cannot roll back an abandoned write; closing its connection"),
                    }
                });
            }
            Err(_) => drop(closing),
        }
    }
}

/// A connection that is closed when dropped, unless taken out first.
struct Closing(Option<sqlx::pool::PoolConnection<Sqlite>>);

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            c.close_on_drop();
        }
    }
}

/// A transaction on either database.
pub enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    /// SQLite's writer in a transaction of postbox's own ([`Db::begin_own`]).
    SqliteOwn(OwnTx),
    Pg(Transaction<'static, Postgres>),
}

/// Advisory locks (PostgreSQL only; SQLite's write lock already serializes writers). The first
/// key is the kind of lock, the second its object.
#[derive(Debug, Clone, Copy)]
pub enum Lock {
    /// The queue depth cap: checked and raised by one submitter at a time.
    Depth,
    /// An idempotency key (hashed).
    Idempotency(i32),
    /// Alert groups: scans and flushes of alerts run one at a time across the cluster.
    Alerts,
}

impl Tx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.commit().await,
            Tx::SqliteOwn(mut t) => t.commit_with::<i64>(Script::new()).await.map(|_| ()),
            Tx::Pg(t) => t.commit().await,
        }
    }

    /// Runs `script` and commits, the first column of each row its statements returned. On
    /// [`Tx::SqliteOwn`] the `COMMIT` goes in the script's text: one round trip for both.
    pub async fn commit_with<T: Col>(mut self, script: Script) -> Result<Vec<T>, sqlx::Error> {
        if let Tx::SqliteOwn(t) = &mut self {
            return t.commit_with(script).await;
        }
        let out = script.column(&mut self).await?;
        self.commit().await?;
        Ok(out)
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(t) => t.rollback().await,
            Tx::SqliteOwn(mut t) => t.rollback().await,
            Tx::Pg(t) => t.rollback().await,
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Tx::Sqlite(_) | Tx::SqliteOwn(_) => Kind::Sqlite,
            Tx::Pg(_) => Kind::Postgres,
        }
    }

    /// Takes an advisory lock until the transaction ends (PostgreSQL; a no-op on SQLite, whose
    /// `BEGIN IMMEDIATE` holds the one write lock).
    pub async fn lock(&mut self, lock: Lock) -> Result<(), sqlx::Error> {
        if let Tx::Pg(t) = self {
            let (a, b) = match lock {
                Lock::Depth => (0x5042_0001, 0),
                Lock::Idempotency(h) => (0x5042_0002, h),
                Lock::Alerts => (0x5042_0003, 0),
                // (0x5042_0004, shard) is the status counters' (the trigger in
                // migrations/postgres/20261206000012_counters_per_statement.sql).
            };
            sqlx::query("SELECT pg_advisory_xact_lock($1, $2)")
                .bind(a)
                .bind(b)
                .execute(&mut **t)
                .await?;
        }
        Ok(())
    }
}

/// Where a statement runs: a pool or an open transaction.
pub enum On<'a> {
    /// SQLite's writer and readers: a `SELECT` runs on a reader, anything else on the writer.
    SqlitePool {
        write: &'a SqlitePool,
        read: &'a SqlitePool,
    },
    PgPool(&'a PgPool, &'a Breaker),
    SqliteConn(&'a mut SqliteConnection),
    SqliteOwn(&'a mut OwnTx),
    PgConn(&'a mut PgConnection),
}

impl<'a> From<&'a Db> for On<'a> {
    fn from(db: &'a Db) -> Self {
        match db {
            Db::Sqlite { write, read } => On::SqlitePool { write, read },
            Db::Pg(p, b) => On::PgPool(p, b),
        }
    }
}

impl<'a> From<&'a mut Tx> for On<'a> {
    fn from(tx: &'a mut Tx) -> Self {
        match tx {
            Tx::Sqlite(t) => On::SqliteConn(t),
            Tx::SqliteOwn(t) => On::SqliteOwn(t),
            Tx::Pg(t) => On::PgConn(t),
        }
    }
}

/// A bound value.
#[derive(Debug, Clone)]
pub enum Arg {
    Int(Option<i64>),
    Text(Option<String>),
    Blob(Vec<u8>),
}

macro_rules! arg_from {
    ($($t:ty => |$v:ident| $e:expr),* $(,)?) => {
        $(impl From<$t> for Arg { fn from($v: $t) -> Arg { $e } })*
    };
}

arg_from! {
    i64 => |v| Arg::Int(Some(v)),
    i32 => |v| Arg::Int(Some(i64::from(v))),
    u32 => |v| Arg::Int(Some(i64::from(v))),
    Option<i64> => |v| Arg::Int(v),
    bool => |v| Arg::Int(Some(i64::from(v))),
    &str => |v| Arg::Text(Some(v.to_string())),
    &String => |v| Arg::Text(Some(v.clone())),
    String => |v| Arg::Text(Some(v)),
    Option<&str> => |v| Arg::Text(v.map(str::to_string)),
    Option<String> => |v| Arg::Text(v),
    Vec<u8> => |v| Arg::Blob(v),
}

/// SQLite: a statement with more arguments than this is prepared for each run, not kept in
/// the connection's statement cache, unless marked [`Sql::keep`]. The batch statements (one
/// row of arguments per email) have a text per batch size, and a prepared statement grows
/// with its rows: kept, up to 100 of them per connection held megabytes for sizes rarely seen
/// again.
const CACHED_ARGS_MAX: usize = 64;

/// A statement and its arguments.
#[derive(Debug, Clone)]
pub struct Sql {
    text: Cow<'static, str>,
    args: Vec<Arg>,
    /// SQLite: keep it prepared whatever its size ([`Sql::keep`]).
    keep: bool,
    /// SQLite only: the text's placeholders are already anonymous (`?`) and `args` are in
    /// their order (what [`Script::joined`] makes).
    anonymous: bool,
}

/// Starts a statement.
pub fn sql(text: impl Into<Cow<'static, str>>) -> Sql {
    Sql {
        text: text.into(),
        args: Vec::new(),
        keep: false,
        anonymous: false,
    }
}

/// Appends `n` in decimal (without the allocation of `to_string`: the batch statements have
/// thousands of placeholders).
fn push_num(s: &mut String, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        s.push(char::from(d));
    }
}

/// `($1, $2, ..), (..)`: placeholders for `rows` rows of `cols` values, numbered from `first`.
pub fn values(rows: usize, cols: usize, first: usize) -> String {
    let mut s = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            s.push_str(", ");
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push_str(", ");
            }
            s.push('$');
            push_num(&mut s, first + r * cols + c);
        }
        s.push(')');
    }
    s
}

/// The rows of a multi-row INSERT: `VALUES (..), ..` for `rows` rows of `cols` placeholders
/// numbered from 1; with `pad` above `rows`, `SELECT * FROM (VALUES ..) WHERE column1 IS NOT
/// NULL` with `pad` rows, of which those past `rows` are bound NULL ([`Sql::nulls_to`]) and left
/// out by the `WHERE` (the first column must be one no real row has NULL). So a statement for
/// any number of rows can run the kept text of the next power of two ([`Sql::keep`]): SQLite
/// compiling a fresh text for each group size was ~17% of the writer's time under single
/// submits. The `WHERE` also settles SQLite's parsing of an `ON CONFLICT` after a `SELECT`.
pub fn rows_of(rows: usize, cols: usize, pad: usize) -> String {
    if pad <= rows {
        return format!("VALUES {}", values(rows, cols, 1));
    }
    format!(
        "SELECT * FROM (VALUES {}) WHERE column1 IS NOT NULL",
        values(pad, cols, 1)
    )
}

/// `text` with every `$N` outside string literals replaced by `?`, and the 0-based argument
/// index of each, in order. None when the text has no `$N` placeholder.
fn positional(text: &str) -> Option<(String, Vec<usize>)> {
    let found = placeholders(text)?;
    let mut out = String::with_capacity(text.len());
    let mut order = Vec::with_capacity(found.len());
    let mut copied = 0;
    for (at, n) in found {
        out.push_str(&text[copied..at.start]);
        out.push('?');
        order.push(n.checked_sub(1)?);
        copied = at.end;
    }
    out.push_str(&text[copied..]);
    Some((out, order))
}

/// Every `$N` outside string literals in `text`: where it is and its N. None when there is
/// none (or an N too large to read).
fn placeholders(text: &str) -> Option<Vec<(std::ops::Range<usize>, usize)>> {
    if !text.contains('$') {
        return None;
    }
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\'' {
            in_string = !in_string;
        } else if b == b'$' && !in_string {
            let start = i + 1;
            let mut end = start;
            while end < bytes.len() && bytes[end].is_ascii_digit() {
                end += 1;
            }
            if end > start {
                found.push((i..end, text[start..end].parse().ok()?));
                i = end;
                continue;
            }
        }
        i += 1;
    }
    (!found.is_empty()).then_some(found)
}

/// Statements that run one after another in one transaction.
///
/// On SQLite they go to the connection as ONE text (sqlx runs a text's statements in turn,
/// binding the arguments in order): one round trip to the connection's thread for all of
/// them. Each round trip is a hand-off between a tokio worker and sqlx's SQLite thread, two
/// context switches; for a single submit that was most of its cost (README, "Writing to
/// SQLite"). On PostgreSQL they run one by one.
#[derive(Debug, Default)]
pub struct Script {
    parts: Vec<Sql>,
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    /// Adds a statement (its `$N` numbered from 1, as if alone).
    pub fn push(&mut self, s: Sql) -> &mut Self {
        self.parts.push(s);
        self
    }

    /// Adds statements: any of a list, or one when there is one (an `Option`).
    pub fn extend(&mut self, s: impl IntoIterator<Item = Sql>) -> &mut Self {
        self.parts.extend(s);
        self
    }

    /// SQLite: the script as one statement ([`Script::joined`]), so that running it later
    /// only sends it.
    pub fn joined_sqlite(self) -> Script {
        if self.parts.is_empty() {
            return self;
        }
        Script {
            parts: vec![self.joined()],
        }
    }

    /// Runs every statement (none: nothing runs); the rows they changed, in all.
    pub async fn execute(self, tx: &mut Tx) -> Result<u64, sqlx::Error> {
        if tx.kind() == Kind::Sqlite && !self.parts.is_empty() {
            return self.joined().execute(tx).await;
        }
        let mut n = 0;
        for s in &self.parts {
            n += s.execute(&mut *tx).await?;
        }
        Ok(n)
    }

    /// Runs every statement; the first column of each row any of them returned, in order.
    pub async fn column<T: Col>(self, tx: &mut Tx) -> Result<Vec<T>, sqlx::Error> {
        if tx.kind() == Kind::Sqlite && !self.parts.is_empty() {
            return self.joined().column(tx).await;
        }
        let mut out = Vec::new();
        for s in &self.parts {
            out.extend(s.column::<T>(&mut *tx).await?);
        }
        Ok(out)
    }

    /// SQLite: one text of every statement, its placeholders anonymous (`?`) and the
    /// arguments in their order, as [`Sql::sqlite`] would bind each statement's ([`positional`],
    /// once per text): a 1,000-email batch has tens of thousands of placeholders, and the texts
    /// were scanned three times, on the path every write of the group waits on.
    fn joined(mut self) -> Sql {
        if self.parts.len() == 1 && self.parts[0].anonymous {
            return self.parts.pop().expect("one");
        }
        let mut text = String::new();
        let mut args = Vec::new();
        let keep = self.parts.iter().all(|s| s.keep);
        for s in self.parts {
            if !text.is_empty() {
                text.push_str(";\n");
            }
            if s.anonymous {
                text.push_str(&s.text);
                args.extend(s.args);
                continue;
            }
            let Some((anon, order)) = positional(&s.text) else {
                text.push_str(&s.text);
                continue;
            };
            text.push_str(&anon);
            // Each argument is moved to where its first placeholder is, and cloned for any
            // later one (`$N` used twice is bound twice).
            let mut first_at = vec![usize::MAX; s.args.len()];
            let mut slots: Vec<Option<Arg>> = s.args.into_iter().map(Some).collect();
            for i in order {
                let arg = match slots.get_mut(i) {
                    Some(slot) => match slot.take() {
                        Some(a) => {
                            first_at[i] = args.len();
                            a
                        }
                        None => args[first_at[i]].clone(),
                    },
                    // SQLite binds a missing argument as NULL, as it would for `$N`.
                    None => Arg::Int(None),
                };
                args.push(arg);
            }
        }
        Sql {
            text: text.into(),
            args,
            keep,
            anonymous: true,
        }
    }
}

macro_rules! on_each {
    ($sql:expr, $on:expr, |$q:ident, $e:ident| $body:expr) => {
        match $on {
            On::SqlitePool { write, read } => {
                let $e = $sql.sqlite_pool(write, read);
                let $q = $sql.sqlite();
                $body.map(|x| x.into_iter().map(DbRow::Sqlite).collect::<Vec<_>>())
            }
            On::PgPool($e, b) => {
                b.admit()?;
                let $q = $sql.pg();
                b.observe($body.map(|x| x.into_iter().map(DbRow::Pg).collect::<Vec<_>>()))
                    .await
            }
            On::SqliteConn($e) => {
                let $q = $sql.sqlite();
                $body.map(|x| x.into_iter().map(DbRow::Sqlite).collect::<Vec<_>>())
            }
            On::SqliteOwn(t) => {
                let $q = $sql.sqlite_after(t.prefix()?);
                let $e = t.conn();
                let res = $body;
                t.ran(res)
                    .map(|x| x.into_iter().map(DbRow::Sqlite).collect::<Vec<_>>())
            }
            On::PgConn($e) => {
                let $q = $sql.pg();
                $body.map(|x| x.into_iter().map(DbRow::Pg).collect::<Vec<_>>())
            }
        }
    };
}

impl Sql {
    /// SQLite: keeps this statement prepared in the connection's cache even when it has more
    /// than [`CACHED_ARGS_MAX`] arguments. For a batch statement whose text repeats: one of a
    /// few fixed sizes (`store::submit`'s chunks), so the cache holds a handful of them instead
    /// of parsing a 128-row INSERT again at every batch (10% of the writer's time at 1,000-
    /// email batches). A [`Script`] is kept when all its statements are.
    pub fn keep(mut self) -> Sql {
        self.keep = true;
        self
    }

    pub fn bind(mut self, v: impl Into<Arg>) -> Self {
        self.args.push(v.into());
        self
    }

    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.to_mut().push_str(text);
        self
    }

    /// Binds NULL to the arguments after those added so far, up to `n` in all: the padding
    /// rows of [`rows_of`] (`pad * cols`; nothing when there are none).
    pub fn nulls_to(&mut self, n: usize) -> &mut Self {
        let more = n.saturating_sub(self.args.len());
        self.args
            .extend(std::iter::repeat_with(|| Arg::Int(None)).take(more));
        self
    }

    /// Appends a placeholder for `v` (numbered after the arguments so far).
    pub fn push_bind(&mut self, v: impl Into<Arg>) -> &mut Self {
        self.args.push(v.into());
        let n = self.args.len();
        self.text.to_mut().push_str(&format!("${n}"));
        self
    }

    /// Adds an argument without text (for placeholders written with [`values`]).
    pub fn add(&mut self, v: impl Into<Arg>) -> &mut Self {
        self.args.push(v.into());
        self
    }

    /// The sqlx query for database `DB`, with every argument bound.
    fn query<'q, DB: sqlx::Database>(&'q self) -> sqlx::query::Query<'q, DB, DB::Arguments>
    where
        Option<i64>: sqlx::Encode<'q, DB> + Type<DB>,
        Option<&'q str>: sqlx::Encode<'q, DB> + Type<DB>,
        &'q [u8]: sqlx::Encode<'q, DB> + Type<DB>,
    {
        self.bind_in_order(match &self.text {
            Cow::Borrowed(s) => sqlx::query(*s),
            Cow::Owned(s) => sqlx::query(sqlx::AssertSqlSafe(s.clone())),
        })
    }

    /// `q` with every argument bound, in order.
    fn bind_in_order<'q, DB: sqlx::Database>(
        &'q self,
        mut q: sqlx::query::Query<'q, DB, DB::Arguments>,
    ) -> sqlx::query::Query<'q, DB, DB::Arguments>
    where
        Option<i64>: sqlx::Encode<'q, DB> + Type<DB>,
        Option<&'q str>: sqlx::Encode<'q, DB> + Type<DB>,
        &'q [u8]: sqlx::Encode<'q, DB> + Type<DB>,
    {
        for a in &self.args {
            q = match a {
                Arg::Int(v) => q.bind(*v),
                Arg::Text(v) => q.bind(v.as_deref()),
                Arg::Blob(v) => q.bind(v.as_slice()),
            };
        }
        q
    }

    /// SQLite: the statement with each `$N` rewritten to an anonymous `?` and the arguments
    /// bound in the order the placeholders appear (a `$N` used twice is bound twice). sqlx maps
    /// a named parameter to its argument by asking SQLite for the parameter's name, which
    /// SQLite finds by scanning every name of the statement: quadratic in the parameters. A
    /// 1,000-email batch insert (2,240 parameters a statement) spent 64% of the API's CPU in
    /// `sqlite3_bind_parameter_name`; anonymous parameters have no names to scan.
    fn sqlite(&self) -> sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments> {
        self.sqlite_after("")
    }

    /// [`Sql::sqlite`] with `prefix` (statements without arguments) sent before its text.
    fn sqlite_after(
        &self,
        prefix: &str,
    ) -> sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments> {
        if self.anonymous {
            let mut text = String::with_capacity(prefix.len() + self.text.len());
            text.push_str(prefix);
            text.push_str(&self.text);
            return self
                .bind_in_order(sqlx::query(sqlx::AssertSqlSafe(text)))
                .persistent(self.keep || self.args.len() <= CACHED_ARGS_MAX);
        }
        let Some((text, order)) = positional(&self.text) else {
            if prefix.is_empty() {
                return self.query();
            }
            return self.bind_in_order(sqlx::query(sqlx::AssertSqlSafe(format!(
                "{prefix}{}",
                self.text
            ))));
        };
        let text = if prefix.is_empty() {
            text
        } else {
            format!("{prefix}{text}")
        };
        let mut q = sqlx::query(sqlx::AssertSqlSafe(text));
        for i in order {
            q = match self.args.get(i) {
                Some(Arg::Int(v)) => q.bind(*v),
                Some(Arg::Text(v)) => q.bind(v.as_deref()),
                Some(Arg::Blob(v)) => q.bind(v.as_slice()),
                // SQLite binds a missing argument as NULL, as it would for `$N`.
                None => q.bind(None::<i64>),
            };
        }
        q.persistent(self.keep || self.args.len() <= CACHED_ARGS_MAX)
    }

    /// SQLite: the pool this statement runs on when not in a transaction. A statement that
    /// starts with `SELECT` only reads; anything else (UPDATE, INSERT, DELETE, WITH .. UPDATE,
    /// PRAGMA) goes to the one writer.
    fn sqlite_pool<'p>(&self, write: &'p SqlitePool, read: &'p SqlitePool) -> &'p SqlitePool {
        let head = self.text.trim_start();
        if head.len() >= 6 && head[..6].eq_ignore_ascii_case("select") {
            read
        } else {
            write
        }
    }

    fn pg(&self) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments> {
        self.query()
    }

    /// Runs it; the number of rows changed.
    pub async fn execute<'a>(&self, on: impl Into<On<'a>>) -> Result<u64, sqlx::Error> {
        Ok(match on.into() {
            On::SqlitePool { write, read } => self
                .sqlite()
                .execute(self.sqlite_pool(write, read))
                .await?
                .rows_affected(),
            On::PgPool(p, b) => {
                b.admit()?;
                b.observe(self.pg().execute(p).await).await?.rows_affected()
            }
            On::SqliteConn(c) => self.sqlite().execute(c).await?.rows_affected(),
            On::SqliteOwn(t) => {
                let q = self.sqlite_after(t.prefix()?);
                let res = q.execute(t.conn()).await;
                t.ran(res)?.rows_affected()
            }
            On::PgConn(c) => self.pg().execute(c).await?.rows_affected(),
        })
    }

    pub async fn fetch_all<'a>(&self, on: impl Into<On<'a>>) -> Result<Vec<DbRow>, sqlx::Error> {
        on_each!(self, on.into(), |q, e| q.fetch_all(e).await)
    }

    /// The first row, if any. The statement always runs to its end: sqlx's own
    /// `fetch_optional` stops SQLite after the first row and drops whatever the statement's
    /// completion returns, so the failed commit of an autocommit `UPDATE ... RETURNING` (a full
    /// disk) went unseen, and postbox acted on a claim that never happened. Every caller
    /// expects one row at most.
    pub async fn fetch_optional<'a>(
        &self,
        on: impl Into<On<'a>>,
    ) -> Result<Option<DbRow>, sqlx::Error> {
        Ok(self.fetch_all(on).await?.into_iter().next())
    }

    /// The first column of every row.
    pub async fn column<'a, T: Col>(&self, on: impl Into<On<'a>>) -> Result<Vec<T>, sqlx::Error> {
        self.fetch_all(on)
            .await?
            .iter()
            .map(|r| r.get_at(0))
            .collect()
    }

    /// The first column of the first row, if there is a row.
    pub async fn scalar<'a, T: Col>(
        &self,
        on: impl Into<On<'a>>,
    ) -> Result<Option<T>, sqlx::Error> {
        match self.fetch_optional(on).await? {
            Some(r) => Ok(Some(r.get_at(0)?)),
            None => Ok(None),
        }
    }
}

/// A type both drivers decode.
pub trait Col:
    for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}
impl<T> Col for T where
    T: for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

/// A row of either database.
pub enum DbRow {
    Sqlite(SqliteRow),
    Pg(PgRow),
}

impl DbRow {
    pub fn get<T: Col>(&self, col: &str) -> Result<T, sqlx::Error> {
        match self {
            DbRow::Sqlite(r) => r.try_get(col),
            DbRow::Pg(r) => r.try_get(col),
        }
    }

    pub fn get_at<T: Col>(&self, i: usize) -> Result<T, sqlx::Error> {
        match self {
            DbRow::Sqlite(r) => r.try_get(i),
            DbRow::Pg(r) => r.try_get(i),
        }
    }
}

/// The 31-bit hash used for advisory locks on a text key (FNV-1a).
pub fn lock_hash(parts: &[&str]) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for p in parts {
        for b in p.bytes().chain([0u8]) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    (h & 0x7fff_ffff) as i32
}

/// Tests: an in-memory SQLite database of one connection, with `schema` run on it, as a pool
/// and as the `Db` whose writer and readers both use it.
#[cfg(test)]
pub(crate) async fn memory_db(schema: &[&str]) -> (SqlitePool, Db) {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .unwrap();
    for q in schema {
        sqlx::query(sqlx::AssertSqlSafe(q.to_string()))
            .execute(&pool)
            .await
            .unwrap();
    }
    let db = Db::Sqlite {
        write: pool.clone(),
        read: pool.clone(),
    };
    (pool, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_row_by_row() {
        assert_eq!(values(2, 3, 1), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(values(1, 2, 5), "($5, $6)");
        let mut s = sql("SELECT 1 WHERE a = ");
        s.push_bind(1i64).push(" AND b = ").push_bind("x");
        assert_eq!(s.text, "SELECT 1 WHERE a = $1 AND b = $2");
        assert_eq!(s.args.len(), 2);
    }

    /// Rows padded to a longer text insert only the real ones, through an `ON CONFLICT`, in a
    /// joined script, and the padded text is the one for that many rows whatever the real
    /// count (so it is kept once).
    #[tokio::test]
    async fn padded_rows_insert_only_the_real_ones() {
        let (pool, db) = memory_db(&[
            "CREATE TABLE t (a TEXT NOT NULL UNIQUE, b INTEGER)",
            "INSERT INTO t VALUES ('x', 0)",
        ])
        .await;
        let insert = |real: &[&str], pad: usize| {
            let mut q = sql(format!(
                "INSERT INTO t (a, b) {} ON CONFLICT(a) DO NOTHING",
                rows_of(real.len(), 2, pad)
            ));
            for (i, a) in real.iter().enumerate() {
                q.add(*a).add(i as i64);
            }
            q.nulls_to(pad * 2);
            q
        };
        assert_eq!(insert(&["p"], 4).text, insert(&["p", "q", "r"], 4).text);
        assert_eq!(rows_of(2, 2, 2), "VALUES ($1, $2), ($3, $4)");
        let mut script = Script::new();
        script.push(insert(&["a", "x", "c"], 4).keep());
        script.push(insert(&["d"], 1));
        let mut tx = db.begin_own().await.unwrap();
        script.execute(&mut tx).await.unwrap();
        tx.commit().await.unwrap();
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT a, b FROM t ORDER BY a")
            .fetch_all(&pool)
            .await
            .unwrap();
        let want = [("a", 0), ("c", 2), ("d", 0), ("x", 0)].map(|(a, b)| (a.to_string(), b));
        assert_eq!(rows, want, "no NULL row, the conflicting one skipped");
    }

    #[test]
    fn sqlite_placeholders_become_positional_in_order_of_use() {
        let (t, order) = positional("SELECT $2, '$1', $1 WHERE a = $2 AND b = $10").unwrap();
        assert_eq!(t, "SELECT ?, '$1', ? WHERE a = ? AND b = ?");
        assert_eq!(order, vec![1, 0, 1, 9]);
        assert!(positional("SELECT 1").is_none());
        assert!(positional("SELECT '$1'").is_none());
    }

    #[test]
    fn a_scripts_statements_are_numbered_after_those_before_them() {
        let mut a = sql("INSERT INTO t VALUES ($1, $2), ($2, '$1')");
        a.add(1i64).add("x");
        let mut b = sql("UPDATE t SET b = $1 WHERE a = $2 RETURNING a");
        b.add("y").add(1i64);
        let mut script = Script::new();
        script.push(a).extend(None).push(b);
        let joined = script.joined();
        assert!(joined.anonymous);
        assert_eq!(
            joined.text,
            "INSERT INTO t VALUES (?, ?), (?, '$1');\nUPDATE t SET b = ? WHERE a = ? RETURNING a"
        );
        let args: Vec<String> = joined.args.iter().map(|a| format!("{a:?}")).collect();
        assert_eq!(
            args,
            [
                r#"Int(Some(1))"#,
                r#"Text(Some("x"))"#,
                r#"Text(Some("x"))"#,
                r#"Text(Some("y"))"#,
                r#"Int(Some(1))"#,
            ]
        );
        // Joined again (a script of scripts), it is taken as it is.
        let mut again = Script::new();
        again.push(joined).push(sql("SELECT $2").bind(7i64));
        let again = again.joined();
        assert!(again.text.ends_with(";\nSELECT ?"));
        assert_eq!(again.args.len(), 6);
        assert!(matches!(again.args[5], Arg::Int(None)));
        let mut n = String::new();
        for v in [0, 9, 10, 2048, usize::MAX] {
            n.clear();
            push_num(&mut n, v);
            assert_eq!(n, v.to_string());
        }
    }

    /// One text on SQLite: every statement runs, each with its own arguments, and the rows any
    /// of them returns come back.
    #[tokio::test]
    async fn a_script_runs_every_statement_with_its_own_arguments_on_sqlite() {
        let (pool, _) = memory_db(&["CREATE TABLE t (a INTEGER, b TEXT)"]).await;
        let mut tx = Tx::Sqlite(pool.begin().await.unwrap());
        let mut ins = sql("INSERT INTO t VALUES ($1, $2), ($3, $2)");
        ins.add(1i64).add("x").add(2i64);
        let mut upd = sql("UPDATE t SET b = $1 WHERE a = $2 RETURNING b");
        upd.add("y").add(2i64);
        let mut del = sql("DELETE FROM t WHERE a = $1 AND b = $2");
        del.add(1i64).add("nothing");
        let mut script = Script::new();
        script.push(ins).push(upd).push(del);
        assert_eq!(script.column::<String>(&mut tx).await.unwrap(), ["y"]);
        let Tx::Sqlite(t) = &mut tx else {
            unreachable!()
        };
        let rows: Vec<(i64, String)> = sqlx::query_as("SELECT a, b FROM t ORDER BY a")
            .fetch_all(&mut **t)
            .await
            .unwrap();
        assert_eq!(rows, [(1, "x".to_string()), (2, "y".to_string())]);
    }

    /// [`OwnTx`] on SQLite: its statements commit together or not at all, and one that failed
    /// (in the committing text, or before it) or was dropped leaves no transaction open on the
    /// one write connection (sqlx does not know of it): the next transaction begins and commits.
    #[tokio::test]
    async fn an_own_transaction_is_all_or_nothing_and_ends_either_way() {
        let (pool, db) = memory_db(&["CREATE TABLE t (a INTEGER UNIQUE)"]).await;
        let insert = |a: i64| sql("INSERT INTO t VALUES ($1) RETURNING a").bind(a);
        let script = |xs: &[i64]| {
            let mut s = Script::new();
            s.extend(xs.iter().map(|a| insert(*a)));
            s
        };
        let once = |xs: &'static [i64]| {
            let db = db.clone();
            async move { db.begin_own().await?.commit_with::<i64>(script(xs)).await }
        };
        assert_eq!(once(&[1, 2]).await.unwrap(), [1, 2]);
        // 3 goes in, then 1 fails: neither stays.
        let e = once(&[3, 1]).await.unwrap_err();
        assert!(e.to_string().contains("UNIQUE"), "{e}");
        assert_eq!(once(&[4]).await.unwrap(), [4]);
        // A statement before the committing text fails: the transaction is dropped unended.
        let mut tx = db.begin_own().await.unwrap();
        script(&[5]).execute(&mut tx).await.unwrap();
        assert!(script(&[4]).execute(&mut tx).await.is_err());
        drop(tx);
        // The statement carrying the BEGIN fails: nothing after it runs (had the BEGIN been
        // what failed, it would have committed on its own), and the commit fails.
        let mut tx = db.begin_own().await.unwrap();
        assert!(script(&[1]).execute(&mut tx).await.is_err());
        assert!(script(&[10]).execute(&mut tx).await.is_err());
        assert!(tx.commit().await.is_err());
        // Statements, then the commit on its own.
        let mut tx = db.begin_own().await.unwrap();
        script(&[6]).execute(&mut tx).await.unwrap();
        script(&[7]).execute(&mut tx).await.unwrap();
        tx.commit().await.unwrap();
        // Rolled back on purpose.
        let mut tx = db.begin_own().await.unwrap();
        script(&[8]).execute(&mut tx).await.unwrap();
        tx.rollback().await.unwrap();
        let all: Vec<i64> = sqlx::query_scalar("SELECT a FROM t ORDER BY a")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(all, [1, 2, 4, 6, 7]);
        // sqlx's own transactions still work on the connection.
        let tx = db.begin_write().await.unwrap();
        tx.commit().await.unwrap();
    }

    #[test]
    fn lock_hashes_differ_by_part_boundaries() {
        assert_ne!(lock_hash(&["ab", "c"]), lock_hash(&["a", "bc"]));
        assert!(lock_hash(&["x"]) >= 0);
    }
}
