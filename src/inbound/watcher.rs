//! One watcher per mailbox: connect, SELECT, resume from the stored (UIDVALIDITY, last UID),
//! scan new messages in batches, wait with IDLE (or poll), reconnect with capped, jittered
//! backoff, and alert about itself when it stays down.
//!
//! Longer than most files (~660 lines) on purpose: it is one state machine (connected,
//! idling, scanning, backing off, leased or standby), and each state's code reads the same
//! session and position; split, its transitions would be spread over files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use async_imap::extensions::idle::IdleResponse;
use async_imap::types::UnsolicitedResponse;
use futures::TryStreamExt;
use time::OffsetDateTime;
use tracing::{Instrument, debug, info, info_span, warn};

use super::config::{DOWN_RULE, Mailbox};
use super::imap::{self, Caps, Session};
use super::message::{self, clip};
use super::rules::{self, Disposition};
use super::{Inbound, rfc3339};
use crate::Shutdown;
use crate::store::{Health, MailboxPosition, NewHit, StoreError, lease_name};

/// A session shorter than this does not end an outage (a server that accepts the login and
/// drops the connection at once is still down).
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Watches one mailbox until `shutdown`, while this process holds the mailbox's lease.
///
/// A standby tries to take the lease every third of its length; the holder renews it as often.
/// A holder that cannot renew before its lease runs out stops reading at once, and every scan
/// commits only if its lease is still held (checked inside the scan's transaction), so a
/// holder that was paused past its lease writes nothing after a takeover. The new holder
/// resumes from the stored (UIDVALIDITY, last UID).
pub(super) async fn watch(ctx: Arc<Inbound>, mb: Arc<Mailbox>, shutdown: Shutdown) {
    let span = info_span!("watcher", mailbox = %mb.name);
    async move {
        let tls = match imap::tls_config(&mb) {
            Ok(t) => t,
            Err(e) => {
                // ca_file was checked at start-up; this is a file changed since.
                warn!(error = %format!("{e:#}"), "cannot set up TLS; the watcher does not run");
                return;
            }
        };
        let name = lease_name(&mb.name);
        let store = ctx.pb.store();
        let every = ctx.lease / 3;
        let mut standby_logged = false;
        loop {
            match store.acquire_lease(&name, &ctx.node, ctx.lease).await {
                Ok(true) => {
                    info!(node = %ctx.node, lease_secs = ctx.lease.as_secs(), "lease taken; watching");
                    standby_logged = false;
                    tokio::select! {
                        _ = shutdown.clone() => {
                            if let Err(e) = store.release_lease(&name, &ctx.node).await {
                                warn!(error = %e, "cannot release the lease; it runs out by itself");
                            }
                            return;
                        }
                        _ = watch_held(&ctx, &mb, &tls) => {}
                        _ = async {
                            tokio::select! {
                                _ = keep_lease(&ctx, &name) => {}
                                _ = super::flusher(&ctx, &mb) => {}
                            }
                        } => {
                            warn!("lease lost (not renewed in time, or taken over); standing by");
                            metrics::gauge!("postbox_mailbox_connected", "mailbox" => mb.name.clone()).set(0.0);
                        }
                    }
                }
                Ok(false) => {
                    if !standby_logged {
                        info!("another process holds this mailbox's lease; standing by");
                        standby_logged = true;
                    }
                }
                Err(e) => warn!(error = %e, "cannot take the lease; will try again"),
            }
            tokio::select! {
                _ = shutdown.clone() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
    .instrument(span)
    .await
}

/// Renews the lease every third of its length; returns when it is lost: taken by another
/// process, or not renewed before it would run out.
async fn keep_lease(ctx: &Inbound, name: &str) {
    let store = ctx.pb.store();
    let mut held_until = Instant::now() + ctx.lease;
    loop {
        tokio::time::sleep(ctx.lease / 3).await;
        let asked = Instant::now();
        match store.acquire_lease(name, &ctx.node, ctx.lease).await {
            Ok(true) => held_until = asked + ctx.lease,
            Ok(false) => return,
            Err(e) => warn!(error = %e, "cannot renew the lease; will try again"),
        }
        // Stop with a margin of a sixth of the lease: our clock and the database's writes
        // must not let two holders overlap.
        if Instant::now() + ctx.lease / 6 >= held_until {
            return;
        }
    }
}

/// The watch loop of a lease holder: sessions, reconnects with backoff, the down alert.
/// Returns only if TLS cannot be used (the caller stops); the caller's select ends it otherwise.
async fn watch_held(ctx: &Inbound, mb: &Mailbox, tls: &Arc<tokio_rustls::rustls::ClientConfig>) {
    let mut down_since = OffsetDateTime::now_utc();
    let mut backoff = mb.reconnect_min;
    loop {
        let started = Instant::now();
        let mut connected = false;
        let err = match session(ctx, mb, tls, &mut connected).await {
            Ok(()) => return,
            Err(e) => format!("{e:#}"),
        };
        if connected && started.elapsed() >= STABLE_AFTER {
            down_since = OffsetDateTime::now_utc();
            backoff = mb.reconnect_min;
        }
        let down_for = (OffsetDateTime::now_utc() - down_since).unsigned_abs();
        warn!(error = %err, down_secs = down_for.as_secs(), retry_in_ms = backoff.as_millis() as u64,
            "IMAP session failed; reconnecting");
        metrics::gauge!("postbox_mailbox_connected", "mailbox" => mb.name.clone()).set(0.0);
        if let Err(e) = ctx
            .pb
            .store()
            .set_mailbox_health(
                &mb.name,
                Health::Down {
                    since: down_since,
                    error: &err,
                },
            )
            .await
        {
            warn!(error = %e, "cannot record the watcher's state");
        }
        if down_for >= mb.down_alert_after {
            raise_down_alert(ctx, mb, down_since, down_for, &err).await;
        }
        // Equal jitter: half fixed, half random, so many watchers do not reconnect in step.
        let half = backoff / 2;
        tokio::time::sleep(half + half.mul_f64(rand::random::<f64>())).await;
        backoff = (backoff * 2).min(mb.reconnect_max);
    }
}

/// The watcher's own alert: one hit per `down_repeat_interval` of an outage, in the
/// `mailbox-down` group, which alerts at once and then at most once per repeat interval.
async fn raise_down_alert(
    ctx: &Inbound,
    mb: &Mailbox,
    since: OffsetDateTime,
    down_for: Duration,
    error: &str,
) {
    let period = (down_for - mb.down_alert_after).as_secs() / mb.down_repeat_interval.as_secs();
    let error = clip(error, 1000);
    let summary = format!(
        "The watcher for mailbox {} ({}:{}, folder {}) has not been connected since {} ({} minutes). Last error: {error}",
        mb.name,
        mb.host,
        mb.port,
        mb.folder,
        rfc3339(since),
        down_for.as_secs() / 60,
    );
    let hit = NewHit {
        rule: DOWN_RULE.to_string(),
        group_key: String::new(),
        uid: None,
        fingerprint: format!("down:{}:{period}", since.unix_timestamp()),
        sender: String::new(),
        detail: serde_json::json!({
            "from": "postbox",
            "subject": format!("Mailbox {} is unreachable", mb.name),
            "date": rfc3339(OffsetDateTime::now_utc()),
            "snippet": error,
            "captures": {},
            "summary": summary,
        }),
        group_wait: Duration::ZERO,
        repeat_interval: mb.down_repeat_interval,
    };
    match ctx
        .pb
        .store()
        .record_scan(
            &mb.name,
            None,
            0,
            &[hit],
            None,
            &|g| ctx.build_alert(g),
            Some(&ctx.node),
        )
        .await
    {
        Ok(out) => {
            if out.new_hits > 0 {
                warn!(
                    down_secs = down_for.as_secs(),
                    "mailbox down past down_alert_after_secs: down alert raised"
                );
            }
            ctx.alerted(&out.alerts);
        }
        Err(e) => warn!(error = %e, "cannot store the down alert"),
    }
}

/// One connection's life. Returns only on an error (the caller reconnects).
async fn session(
    ctx: &Inbound,
    mb: &Mailbox,
    tls: &Arc<tokio_rustls::rustls::ClientConfig>,
    connected: &mut bool,
) -> anyhow::Result<()> {
    let cmd = mb.command_timeout;
    let (mut s, caps) = tokio::time::timeout(mb.connect_timeout * 3, imap::connect(mb, tls))
        .await
        .map_err(|_| anyhow!("connect and login timed out"))??;
    let selected = timed(cmd, s.select(&mb.folder))
        .await?
        .with_context(|| format!("SELECT {}", mb.folder))?;
    let uidvalidity = selected
        .uid_validity
        .ok_or_else(|| anyhow!("the server gave no UIDVALIDITY for {}", mb.folder))?;
    let store = ctx.pb.store();
    let mut pos = match store.mailbox_position(&mb.name).await? {
        Some(p) if p.uidvalidity == uidvalidity => p,
        Some(p) => {
            // UIDs of the old numbering mean nothing now: read the whole folder again. Messages
            // already alerted on are recognised by the fingerprint of their header block, so
            // only messages never matched before can alert.
            warn!(
                old = p.uidvalidity,
                new = uidvalidity,
                "UIDVALIDITY changed: rescanning the folder; messages alerted before are recognised and skipped"
            );
            let p = MailboxPosition {
                uidvalidity,
                last_uid: 0,
            };
            store.set_mailbox_position(&mb.name, p, true).await?;
            p
        }
        None => {
            let last_uid = if mb.from_start {
                0
            } else {
                match selected.uid_next {
                    Some(n) => n.saturating_sub(1),
                    None => timed(cmd, s.uid_search("ALL"))
                        .await??
                        .into_iter()
                        .max()
                        .unwrap_or(0),
                }
            };
            let p = MailboxPosition {
                uidvalidity,
                last_uid,
            };
            info!(
                last_uid,
                from_start = mb.from_start,
                "first start: position stored"
            );
            store.set_mailbox_position(&mb.name, p, false).await?;
            p
        }
    };
    let use_idle = mb.idle && caps.idle;
    *connected = true;
    metrics::gauge!("postbox_mailbox_connected", "mailbox" => mb.name.clone()).set(1.0);
    store
        .set_mailbox_health(&mb.name, Health::Connected { idle: use_idle })
        .await?;
    info!(
        uidvalidity,
        last_uid = pos.last_uid,
        idle = use_idle,
        "connected"
    );
    let rx = s.unsolicited_responses.clone();
    loop {
        scan(ctx, mb, &mut s, caps, &mut pos).await?;
        // New mail announced during the scan (an EXISTS on another command) means scan again.
        if drain_news(&rx) {
            continue;
        }
        if use_idle {
            let mut idle = s.idle();
            timed(cmd, idle.init()).await?.context("IDLE")?;
            if !drain_news(&rx) {
                let (wait, _stop) = idle.wait_with_timeout(mb.idle_renew);
                match wait.await.context("IDLE")? {
                    IdleResponse::NewData(_) => debug!("IDLE: the server announced changes"),
                    IdleResponse::Timeout => debug!("IDLE renewed"),
                    IdleResponse::ManualInterrupt => {
                        return Err(anyhow!("the server closed the connection during IDLE"));
                    }
                }
            }
            s = timed(cmd, idle.done()).await?.context("ending IDLE")?;
        } else {
            tokio::time::sleep(mb.poll_interval).await;
            timed(cmd, s.noop()).await?.context("NOOP")?;
        }
    }
}

/// Empties the unsolicited-response channel; true if it held news of messages.
fn drain_news(rx: &async_channel::Receiver<UnsolicitedResponse>) -> bool {
    let mut news = false;
    while let Ok(r) = rx.try_recv() {
        news |= matches!(
            r,
            UnsolicitedResponse::Exists(_) | UnsolicitedResponse::Recent(_)
        );
    }
    news
}

async fn timed<T>(d: Duration, f: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| anyhow!("the server did not answer within {} s", d.as_secs()))
}

/// Reads every message above the stored last UID, in batches of `fetch_batch`: each batch's
/// matches and the advanced position commit together, then the batch's messages are marked or
/// moved on the server.
async fn scan(
    ctx: &Inbound,
    mb: &Mailbox,
    s: &mut Session,
    caps: Caps,
    pos: &mut MailboxPosition,
) -> anyhow::Result<()> {
    let cmd = mb.command_timeout;
    let mut uids: Vec<u32> = timed(cmd, s.uid_search(format!("UID {}:*", pos.last_uid + 1)))
        .await?
        .context("UID SEARCH")?
        .into_iter()
        .filter(|u| *u > pos.last_uid)
        .collect();
    let polled = || {
        metrics::gauge!("postbox_mailbox_last_poll_timestamp_seconds", "mailbox" => mb.name.clone())
            .set(OffsetDateTime::now_utc().unix_timestamp() as f64);
    };
    if uids.is_empty() {
        ctx.pb.store().record_poll(&mb.name).await?;
        polled();
        return Ok(());
    }
    uids.sort_unstable();
    let total = uids.len();
    let started = Instant::now();
    for chunk in uids.chunks(mb.fetch_batch as usize) {
        let (first, last) = (chunk[0], chunk[chunk.len() - 1]);
        let set = if first == last {
            first.to_string()
        } else {
            format!("{first}:{last}")
        };
        let mut hits = Vec::new();
        let mut bounces: Vec<crate::store::BounceRecord> = Vec::new();
        let mut seen = Vec::new();
        let mut moves: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        let mut scanned = 0u64;
        // Each message is matched as it arrives and dropped: a batch holds one message's bytes
        // at a time (plus its hits), not fetch_batch x max_message_bytes.
        let mut stream = timed(
            cmd,
            s.uid_fetch(
                &set,
                format!("(UID BODY.PEEK[]<0.{}>)", mb.max_message_bytes),
            ),
        )
        .await?
        .with_context(|| format!("UID FETCH {set}"))?;
        while let Some(f) = timed(cmd, stream.try_next())
            .await?
            .with_context(|| format!("UID FETCH {set}"))?
        {
            let Some(uid) = f.uid else { continue };
            if uid <= pos.last_uid || uid > last {
                continue;
            }
            scanned += 1;
            let _message = tracing::info_span!("message", uid).entered();
            let Some(raw) = f.body() else {
                warn!(uid, "the server sent no body for this message; skipped");
                continue;
            };
            if mb.purpose == super::config::Purpose::Bounces {
                // A bounce mailbox: reports feed the suppression list; anything else (and
                // garbage) is passed over.
                match super::bounce::parse(raw) {
                    Some(r) => {
                        debug!(
                            uid,
                            format = r.format.as_str(),
                            recipients = r.recipients.len(),
                            matched_id = r.email_id.is_some(),
                            "bounce report"
                        );
                        bounces.push(r.into_record());
                    }
                    None => debug!(uid, "not a bounce or complaint report; skipped"),
                }
                continue;
            }
            let parsed = message::parse(raw);
            drop(f);
            if crate::faults::hit(crate::faults::WATCHER_PANIC, &mb.name) {
                panic!("injected fault: the watcher panics on message {uid}");
            }
            if !parsed.well_formed {
                warn!(
                    uid,
                    "message has no readable MIME structure; matched on its raw text"
                );
            }
            let matches = rules::evaluate(&mb.rules, &mb.name, &parsed.message);
            if matches.is_empty() {
                continue;
            }
            let m = &parsed.message;
            let from = clip(
                &m.from.first().map(|a| a.display()).unwrap_or_default(),
                300,
            );
            let subject = clip(&m.subject, 300);
            let date = clip(m.date.as_deref().unwrap_or_default(), 64);
            let snippet = clip(&message::snippet(m), 600);
            let sender = clip(&m.sender(), 320);
            for x in &matches {
                let rule = &mb.rules[x.rule];
                debug!(uid, rule = %rule.name, group = %x.group_key, "rule matched");
                let captures: BTreeMap<&str, String> = x
                    .captures
                    .iter()
                    .map(|(k, v)| (k.as_str(), clip(v, 200)))
                    .collect();
                hits.push(NewHit {
                    rule: rule.name.clone(),
                    group_key: x.group_key.clone(),
                    uid: Some((pos.uidvalidity, uid)),
                    fingerprint: parsed.fingerprint.clone(),
                    sender: sender.clone(),
                    detail: serde_json::json!({
                        "from": from,
                        "subject": subject,
                        "date": date,
                        "snippet": snippet,
                        "captures": captures,
                        "sender": sender,
                    }),
                    group_wait: rule.group_wait,
                    repeat_interval: rule.repeat_interval,
                });
            }
            match rules::disposition(&mb.rules, &matches) {
                Some(Disposition::Seen) => seen.push(uid),
                Some(Disposition::Move(folder)) => moves.entry(folder).or_default().push(uid),
                None => {}
            }
        }
        drop(stream);
        let next = MailboxPosition {
            uidvalidity: pos.uidvalidity,
            last_uid: last,
        };
        let store = ctx.pb.store();
        let build = |g: &crate::store::DueGroup| ctx.build_alert(g);
        let out = match store
            .record_scan(
                &mb.name,
                Some(next),
                scanned,
                &hits,
                Some((&bounces, mb.soft_bounces)),
                &build,
                Some(&ctx.node),
            )
            .await
        {
            Ok(out) => out,
            // The database is busy, full or away, or the lease is gone: the session ends and
            // the batch is read again later.
            Err(e) if e.is_transient() || matches!(e, StoreError::LeaseLost(_)) => {
                return Err(e.into());
            }
            // Something in this batch cannot be stored: never retry it forever (that would
            // blind the mailbox); record it message by message instead.
            Err(e) => {
                warn!(error = %e, first, last, "a batch of matches could not be stored; storing its messages one by one");
                record_one_by_one(ctx, mb, *pos, next, scanned, hits.clone()).await?
            }
        };
        *pos = next;
        metrics::counter!("postbox_mailbox_messages_scanned_total", "mailbox" => mb.name.clone())
            .increment(scanned);
        for h in &hits {
            metrics::counter!("postbox_mailbox_rule_matches_total",
                "mailbox" => mb.name.clone(), "rule" => h.rule.clone())
            .increment(1);
        }
        polled();
        ctx.alerted(&out.alerts);
        if !out.alerts.is_empty() {
            info!(alerts = out.alerts.len(), "alert emails queued");
        }
        // The alerts are durable; only now touch the messages on the server. A failure here
        // leaves a message unmarked, never an alert unsent.
        if !seen.is_empty() {
            let set = uid_set(&seen);
            if let Err(e) = timed(cmd, async {
                s.uid_store(&set, "+FLAGS.SILENT (\\Seen)")
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            })
            .await?
            {
                warn!(error = %e, "cannot mark matched messages seen");
            }
        }
        for (folder, list) in moves {
            let set = uid_set(&list);
            let r = if caps.mv {
                timed(cmd, s.uid_mv(&set, folder)).await?
            } else {
                move_by_copy(s, &set, folder, caps.uidplus, cmd).await?
            };
            if let Err(e) = r {
                warn!(error = %e, folder, "cannot move matched messages");
            }
        }
    }
    debug!(
        messages = total,
        ms = started.elapsed().as_millis() as u64,
        "scan done"
    );
    Ok(())
}

/// Stores a batch's hits message by message, after the batch as a whole was refused for a
/// reason that retrying will not fix. A message whose hits still cannot be stored is stored as
/// an error hit instead (same rule, no group key, the error as its subject), so its alert still
/// says something arrived; if even that fails, the message is skipped with an error in the log.
/// Either way the position advances: one message never stops the others.
async fn record_one_by_one(
    ctx: &Inbound,
    mb: &Mailbox,
    from: MailboxPosition,
    to: MailboxPosition,
    scanned: u64,
    hits: Vec<NewHit>,
) -> Result<crate::store::ScanOutcome, StoreError> {
    let store = ctx.pb.store();
    let build = |g: &crate::store::DueGroup| ctx.build_alert(g);
    let mut by_uid: BTreeMap<u32, Vec<NewHit>> = BTreeMap::new();
    for h in hits {
        by_uid
            .entry(h.uid.map_or(0, |(_, u)| u))
            .or_default()
            .push(h);
    }
    let mut all = crate::store::ScanOutcome::default();
    let record = |pos: MailboxPosition, scanned: u64, hits: Vec<NewHit>| {
        let build = &build;
        async move {
            store
                .record_scan(
                    &mb.name,
                    Some(pos),
                    scanned,
                    &hits,
                    None,
                    build,
                    Some(&ctx.node),
                )
                .await
        }
    };
    for (uid, hits) in by_uid {
        let pos = MailboxPosition {
            uidvalidity: from.uidvalidity,
            last_uid: uid.max(from.last_uid),
        };
        let out = match record(pos, 0, hits.clone()).await {
            Ok(out) => out,
            Err(e) if e.is_transient() || matches!(e, StoreError::LeaseLost(_)) => return Err(e),
            Err(e) => {
                let error = clip(&e.to_string(), 300);
                warn!(uid, error = %error, "a message's matches cannot be stored; storing an error hit instead");
                let degraded = hits
                    .iter()
                    .map(|h| NewHit {
                        group_key: String::new(),
                        sender: String::new(),
                        detail: serde_json::json!({
                            "subject": format!("(a message that could not be stored: {error})"),
                            "captures": {},
                        }),
                        ..h.clone()
                    })
                    .collect();
                match record(pos, 0, degraded).await {
                    Ok(out) => out,
                    Err(e) if e.is_transient() || matches!(e, StoreError::LeaseLost(_)) => {
                        return Err(e);
                    }
                    Err(e) => {
                        tracing::error!(uid, error = %e, "a message's matches cannot be stored at all; skipped");
                        record(pos, 0, Vec::new()).await?
                    }
                }
            }
        };
        all.new_hits += out.new_hits;
        all.alerts.extend(out.alerts);
    }
    let out = record(to, scanned, Vec::new()).await?;
    all.alerts.extend(out.alerts);
    Ok(all)
}

/// MOVE for servers without it: COPY, flag \Deleted, and expunge those UIDs if UIDPLUS allows.
async fn move_by_copy(
    s: &mut Session,
    set: &str,
    folder: &str,
    uidplus: bool,
    cmd: Duration,
) -> anyhow::Result<async_imap::error::Result<()>> {
    if let Err(e) = timed(cmd, s.uid_copy(set, folder)).await? {
        return Ok(Err(e));
    }
    let flagged = timed(cmd, async {
        s.uid_store(set, "+FLAGS.SILENT (\\Deleted)")
            .await?
            .try_collect::<Vec<_>>()
            .await
    })
    .await?;
    if let Err(e) = flagged {
        return Ok(Err(e));
    }
    if uidplus {
        let r = timed(cmd, async {
            s.uid_expunge(set).await?.try_collect::<Vec<_>>().await
        })
        .await?;
        return Ok(r.map(|_| ()));
    }
    Ok(Ok(()))
}

/// `1,3,5:9` from sorted UIDs.
fn uid_set(uids: &[u32]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end + 1 {
            i += 1;
            end = uids[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}:{end}")
        });
        i += 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn uid_sets_collapse_runs() {
        assert_eq!(super::uid_set(&[1, 2, 3, 5, 7, 8]), "1:3,5,7:8");
        assert_eq!(super::uid_set(&[4]), "4");
    }
}
