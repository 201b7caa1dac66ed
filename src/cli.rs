//! What the `postbox` command does, as library functions: `main.rs` parses the command line
//! and calls these. Output goes to stdout (results) and stderr (errors, progress); each returns
//! the process's exit code: 0 done, 1 some items refused or not found, 2 bad input.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::{EmailId, NewAttachment, NewEmail, Postbox, Priority, Role, Settings, SubmitError};

/// `postbox send`: one email from flags.
#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// Submit every line of a JSON Lines file (one email per line, the fields of
    /// `POST /v1/emails`); prints `<line>\t<id>` per accepted line and a summary.
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["to", "cc", "bcc", "subject", "text", "html", "template"])]
    pub batch: Option<PathBuf>,
    #[arg(long, required_unless_present = "batch")]
    to: Vec<String>,
    #[arg(long)]
    cc: Vec<String>,
    #[arg(long)]
    bcc: Vec<String>,
    #[arg(long)]
    from: Option<String>,
    #[arg(long)]
    reply_to: Vec<String>,
    #[arg(long)]
    subject: Option<String>,
    #[arg(long)]
    text: Option<String>,
    #[arg(long)]
    html: Option<String>,
    /// A built-in template (welcome, password_reset, notification, alert).
    #[arg(long)]
    template: Option<String>,
    /// A template variable: `name=value`; a value that is valid JSON (42, true, ["a"]) is used as
    /// such, anything else as a string.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// A custom header `Name: value` (List-Unsubscribe, In-Reply-To, References, X-*).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Attach a file (content type guessed from the extension).
    #[arg(long = "attach")]
    attachments: Vec<PathBuf>,
    #[arg(long, default_value = "normal")]
    priority: String,
    /// RFC 3339 time before which the email is not sent.
    #[arg(long)]
    send_at: Option<String>,
    /// RFC 3339 time after which an unsent email expires.
    #[arg(long)]
    expires_at: Option<String>,
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Send even to addresses on the suppression list (recorded on the timeline).
    #[arg(long)]
    ignore_suppression: bool,
    /// Send through this relay only (a `[[relays]]` name).
    #[arg(long)]
    relay: Option<String>,
}

/// `postbox config check`: validates and resolves the settings (secrets from the environment,
/// tokens, mailbox rules), then prints them with secrets masked.
pub fn config_check(settings: Settings) -> ExitCode {
    let checked = crate::Runtime::build(settings).and_then(|rt| {
        if rt.settings.api.enabled {
            rt.api_addr()?;
        }
        Ok(rt)
    });
    match checked {
        Ok(rt) => {
            println!("# configuration is valid; effective settings:");
            print!("{}", rt.settings.to_masked_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `postbox migrate`.
pub async fn migrate(settings: Settings) -> anyhow::Result<ExitCode> {
    let pb = open(settings).await?;
    pb.close().await;
    println!("database is up to date");
    Ok(ExitCode::SUCCESS)
}

/// `postbox serve | api | worker`: runs `role` until SIGINT or SIGTERM.
pub async fn serve(settings: Settings, role: Role) -> anyhow::Result<ExitCode> {
    let pb = open(settings).await?;
    let shutdown = crate::shutdown_signal(os_signal());
    let res = pb.run(role, shutdown).await;
    pb.close().await;
    match res {
        Ok(()) => {
            tracing::info!("postbox stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(crate::RunError::Bind(e)) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

/// `postbox send` without `--batch`.
pub async fn send(settings: Settings, args: SendArgs) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.batch {
        return send_batch(settings, path).await;
    }
    let new = match new_email(args) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let pb = open(settings).await?;
    let res = pb.submit(new).await;
    pb.close().await;
    match res {
        Ok(s) => {
            println!("{}", s.id);
            if !s.created {
                eprintln!("note: idempotency key matched an earlier email; nothing new queued");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(SubmitError::Invalid(errs)) => {
            for e in errs.0 {
                eprintln!("error: {}: {}", e.field, e.message);
            }
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

/// `postbox stats`.
pub async fn stats(settings: Settings, json: bool) -> anyhow::Result<ExitCode> {
    let pb = open(settings).await?;
    let stats = pb.stats().await?;
    pb.close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print_stats(&stats);
    }
    Ok(ExitCode::SUCCESS)
}

/// `postbox status ID`.
pub async fn status(settings: Settings, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let id = parse_id(id)?;
    let pb = open(settings).await?;
    let report = pb.status(&id).await?;
    pb.close().await;
    let Some(r) = report else {
        eprintln!("error: no email with id {id}");
        return Ok(ExitCode::from(1));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_report(&r);
    }
    Ok(ExitCode::SUCCESS)
}

/// `postbox send --batch FILE.jsonl`: every line validated and submitted (500 per commit);
/// a progress bar on a terminal; accepted lines printed as `<line>\t<id>`, rejected ones
/// explained on stderr. Exit 0 when every line was accepted, 1 when some were rejected.
async fn send_batch(settings: Settings, path: &std::path::Path) -> anyhow::Result<ExitCode> {
    use std::io::BufRead;
    const CHUNK: usize = 500;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: --batch {}: {e}", path.display());
            return Ok(ExitCode::from(2));
        }
    };
    // Progress by bytes read, so the file is read once.
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let lines = std::io::BufReader::new(file).lines();
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes}  {bytes_per_sec}  eta {eta}  {msg}",
        )
        .expect("a valid progress template"),
    );
    let pb = open(settings).await?;
    let mut accepted = 0u64;
    let mut rejected: Vec<(usize, String)> = Vec::new();
    let mut chunk: Vec<(usize, NewEmail)> = Vec::with_capacity(CHUNK);
    let mut out = std::io::stdout().lock();
    async fn flush(
        pb: &Postbox,
        chunk: &mut Vec<(usize, NewEmail)>,
        accepted: &mut u64,
        rejected: &mut Vec<(usize, String)>,
        out: &mut impl std::io::Write,
    ) -> anyhow::Result<()> {
        while !chunk.is_empty() {
            let emails = chunk.iter().map(|(_, e)| e.clone()).collect();
            match pb.submit_many(emails).await {
                Ok(done) => {
                    for ((line, _), s) in chunk.iter().zip(done) {
                        writeln!(out, "{line}\t{}", s.id)?;
                    }
                    *accepted += chunk.len() as u64;
                    chunk.clear();
                }
                Err(SubmitError::InvalidBatch(bad)) => {
                    // Take the invalid lines out and submit the rest.
                    let mut drop = std::collections::BTreeSet::new();
                    for (i, errs) in bad {
                        let why = errs
                            .iter()
                            .map(|e| format!("{}: {}", e.field, e.message))
                            .collect::<Vec<_>>()
                            .join("; ");
                        rejected.push((chunk[i].0, why));
                        drop.insert(i);
                    }
                    let mut i = 0;
                    chunk.retain(|_| {
                        i += 1;
                        !drop.contains(&(i - 1))
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
    for (n, line) in lines.enumerate() {
        let line_no = n + 1;
        let line = line?;
        bar.inc(line.len() as u64 + 1);
        if line.trim().is_empty() {
            continue;
        }
        let mut de = serde_json::Deserializer::from_str(&line);
        match serde_path_to_error::deserialize::<_, NewEmail>(&mut de) {
            Ok(e) => chunk.push((line_no, e)),
            Err(e) => {
                let field = e.path().to_string();
                let field = if field == "." { "(line)".into() } else { field };
                rejected.push((line_no, format!("{field}: {}", e.inner())));
            }
        }
        if chunk.len() >= CHUNK {
            flush(&pb, &mut chunk, &mut accepted, &mut rejected, &mut out).await?;
            bar.set_message(format!("{accepted} accepted, {} rejected", rejected.len()));
        }
    }
    flush(&pb, &mut chunk, &mut accepted, &mut rejected, &mut out).await?;
    bar.finish_and_clear();
    pb.close().await;
    rejected.sort();
    for (line, why) in &rejected {
        eprintln!("line {line}: {why}");
    }
    eprintln!(
        "{accepted} accepted, {} rejected ({})",
        rejected.len(),
        path.display()
    );
    Ok(if rejected.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_stats(s: &crate::store::Stats) {
    println!(
        "{:<10} {:>8} {:>8} {:>8} {:>8}",
        "waiting", "high", "normal", "low", "total"
    );
    for state in ["queued", "retrying", "sending"] {
        let (h, n, l) = s.depth_of(state);
        println!("{state:<10} {h:>8} {n:>8} {l:>8} {:>8}", h + n + l);
    }
    println!();
    println!("{:<10} {:>8}", "all", "emails");
    for (status, n) in &s.totals {
        println!("{status:<10} {n:>8}");
    }
    println!();
    println!(
        "oldest due and queued: {}",
        s.oldest_queued_age_secs
            .map_or("-".to_string(), |a| format!("{a:.1} s"))
    );
    println!("in flight: {}", s.in_flight);
    println!(
        "last minute: {} sent, {} failed, {} retried;  last hour: {} sent, {} failed, {} retried",
        s.last_minute.sent,
        s.last_minute.failed,
        s.last_minute.retried,
        s.last_hour.sent,
        s.last_hour.failed,
        s.last_hour.retried
    );
}

/// `postbox cancel ID` (`cancel = true`) or `postbox retry ID`.
pub async fn transition(settings: Settings, id: &str, cancel: bool) -> anyhow::Result<ExitCode> {
    let id = parse_id(id)?;
    let pb = open(settings).await?;
    let res = if cancel {
        pb.cancel(&id).await
    } else {
        pb.retry(&id).await
    };
    pb.close().await;
    match res {
        Ok(()) => {
            println!("{id} {}", if cancel { "cancelled" } else { "re-queued" });
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

/// `postbox relays`: the relays, rate limits and pauses. Run from the CLI, the limits are the
/// configured ones (live rates, throttling and cool-downs belong to the serving processes:
/// `GET /v1/relays`, the dashboard, metrics); pauses are the cluster's.
pub async fn relays(settings: Settings, json: bool) -> anyhow::Result<ExitCode> {
    let pb = open(settings).await?;
    let r = pb.relays().await;
    pb.close().await;
    let r = r?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("relays:");
    for v in &r.relays {
        let order = v
            .default_position
            .map_or_else(|| "-".to_string(), |p| (p + 1).to_string());
        println!("  {}\t{}\tdefault order {order}", v.name, v.address);
    }
    println!("rate limits (messages per second):");
    for l in &r.limits {
        let f = |v: Option<f64>| v.map_or_else(|| "none".to_string(), |v| format!("{v:.2}"));
        println!(
            "  {}\tconfigured {}\teffective {}{}",
            l.key,
            f(l.configured_per_second),
            f(l.effective_per_second),
            l.throttled_reason
                .as_deref()
                .map(|w| format!("\tthrottled: {w}"))
                .unwrap_or_default()
        );
    }
    println!("pauses:");
    for p in &r.pauses {
        println!(
            "  {} {}\tsince {}\t{}",
            p.kind.as_str(),
            p.value,
            crate::inbound::rfc3339(p.created_at),
            p.reason.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `postbox pause KIND VALUE` / `postbox resume KIND VALUE`.
pub async fn pause(
    settings: Settings,
    kind: &str,
    value: &str,
    reason: Option<&str>,
    resume: bool,
) -> anyhow::Result<ExitCode> {
    let pb = open(settings).await?;
    let res = async {
        let (k, v) = match pb.pause_target(kind, value) {
            Ok(t) => t,
            Err((field, m)) => {
                let arg = if field == "kind" { "KIND" } else { "VALUE" };
                eprintln!("error: {arg}: {m}");
                return Ok(ExitCode::from(2));
            }
        };
        if resume {
            match pb.resume(k, &v).await? {
                Some(n) => println!("{} {v} resumed; {n} held emails queued again", k.as_str()),
                None => {
                    eprintln!("error: {} {v} is not paused", k.as_str());
                    return Ok(ExitCode::from(1));
                }
            }
        } else if pb.pause(k, &v, reason).await? {
            println!("{} {v} paused", k.as_str());
        } else {
            println!("{} {v} was paused already", k.as_str());
        }
        anyhow::Ok(ExitCode::SUCCESS)
    }
    .await;
    pb.close().await;
    res
}

/// `postbox bulk ACTION --status S [--tag T] [--domain D] [--older-than SECS]`.
pub async fn bulk(
    settings: Settings,
    action: &str,
    status: &str,
    tag: Option<&str>,
    domain: Option<&str>,
    older_than_secs: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let (action_v, filter) =
        match crate::postbox::bulk_request(action, status, tag, domain, older_than_secs) {
            Ok(r) => r,
            Err((field, m)) => {
                let arg = match field {
                    "action" => "ACTION".to_string(),
                    "older_than_secs" => "--older-than".to_string(),
                    f => format!("--{f}"),
                };
                eprintln!("error: {arg}: {m}");
                return Ok(ExitCode::from(2));
            }
        };
    let pb = open(settings).await?;
    let r = pb
        .bulk(action_v, &filter, &format!("bulk {action} from the CLI"))
        .await;
    pb.close().await;
    let r = r?;
    println!(
        "{} matched, {} {}{}",
        r.matched,
        r.changed,
        if action == "retry" {
            "re-queued"
        } else {
            "cancelled"
        },
        if r.more {
            "; more match: run it again"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// `postbox suppressions ...`.
#[derive(clap::Subcommand)]
pub enum SuppressionsCommand {
    /// List suppressed addresses (address, reason, since, source email, detail), tab-separated.
    List {
        /// Only this reason: hard_bounce, complaint, manual, unsubscribe.
        #[arg(long)]
        reason: Option<String>,
        /// Only addresses starting with this.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Suppress an address (reason manual unless given).
    Add {
        address: String,
        #[arg(long, default_value = "manual")]
        reason: String,
        #[arg(long)]
        detail: Option<String>,
    },
    /// Remove an address from the list.
    Remove { address: String },
    /// Every suppression as CSV (address,reason,created_at,expires_at,source_email,detail).
    Export,
}

pub async fn suppressions(
    settings: Settings,
    command: SuppressionsCommand,
) -> anyhow::Result<ExitCode> {
    use crate::store::{SuppressionFilter, SuppressionReason};
    let reason = |r: &str| {
        SuppressionReason::parse(r).ok_or_else(|| {
            anyhow::anyhow!(
                "--reason: `{r}` is not one of hard_bounce, complaint, manual, unsubscribe"
            )
        })
    };
    // Bad arguments are refused before the database is opened.
    let filter_reason = match &command {
        SuppressionsCommand::List {
            reason: Some(r), ..
        } => Some(reason(r)?),
        _ => None,
    };
    if let SuppressionsCommand::Add { reason: r, .. } = &command {
        reason(r)?;
    }
    let pb = open(settings).await?;
    let res = async {
        let (csv, prefix) = match &command {
            SuppressionsCommand::List { prefix, .. } => (false, prefix.clone()),
            SuppressionsCommand::Export => (true, None),
            _ => (false, None),
        };
        match command {
            SuppressionsCommand::List { .. } | SuppressionsCommand::Export => {
                if csv {
                    println!("address,reason,created_at,expires_at,source_email,detail");
                }
                let mut after: Option<String> = None;
                loop {
                    let page = pb
                        .suppressions(&SuppressionFilter {
                            reason: filter_reason,
                            prefix: prefix.clone(),
                            after: after.clone(),
                            limit: 1000,
                        })
                        .await?;
                    for s in &page {
                        let created = crate::inbound::rfc3339(s.created_at);
                        let expires = s
                            .expires_at
                            .map(crate::inbound::rfc3339)
                            .unwrap_or_default();
                        let source = s.source_email.clone().unwrap_or_default();
                        let detail = s.detail.clone().unwrap_or_default();
                        if csv {
                            println!(
                                "{},{},{created},{expires},{},{}",
                                csv_field(&s.address),
                                s.reason.as_str(),
                                csv_field(&source),
                                csv_field(&detail)
                            );
                        } else {
                            println!(
                                "{}\t{}\t{created}\t{source}\t{detail}",
                                s.address,
                                s.reason.as_str()
                            );
                        }
                    }
                    if page.len() < 1000 {
                        break;
                    }
                    after = page.last().map(|s| s.address.clone());
                }
                Ok(ExitCode::SUCCESS)
            }
            SuppressionsCommand::Add {
                address,
                reason: r,
                detail,
            } => {
                let a = crate::domain::EmailAddress::parse(&address)
                    .map_err(|e| anyhow::anyhow!("address `{address}`: {e}"))?;
                pb.suppress(&a, reason(&r)?, detail.as_deref(), None)
                    .await?;
                println!(
                    "{} suppressed ({r})",
                    crate::store::suppression_key(a.address())
                );
                Ok(ExitCode::SUCCESS)
            }
            SuppressionsCommand::Remove { address } => {
                if pb.unsuppress(&address).await? {
                    println!("{} removed", crate::store::suppression_key(&address));
                    Ok(ExitCode::SUCCESS)
                } else {
                    eprintln!("error: {address} is not on the suppression list");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
    .await;
    pb.close().await;
    res
}

/// A CSV field, quoted when it must be (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

async fn open(settings: Settings) -> anyhow::Result<Postbox> {
    let url = crate::config::redact_url(&settings.database.url);
    Postbox::open(settings)
        .await
        .with_context(|| format!("Failed to open postbox (database.url = {url})"))
}

fn parse_id(s: &str) -> anyhow::Result<EmailId> {
    EmailId::parse(s).map_err(|e| anyhow::anyhow!(e))
}

/// Resolves on SIGINT or SIGTERM.
pub async fn os_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested: finishing in-flight sends");
}

fn new_email(a: SendArgs) -> Result<NewEmail, String> {
    let variables = if a.vars.is_empty() {
        None
    } else {
        let mut map = serde_json::Map::new();
        for v in &a.vars {
            let (k, val) = v
                .split_once('=')
                .ok_or_else(|| format!("--var `{v}`: expected NAME=VALUE"))?;
            let json = serde_json::from_str(val).unwrap_or(serde_json::Value::String(val.into()));
            map.insert(k.trim().to_string(), json);
        }
        Some(serde_json::Value::Object(map))
    };
    let mut headers = std::collections::BTreeMap::new();
    for h in &a.headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("--header `{h}`: expected `Name: value`"))?;
        headers.insert(k.trim().to_string(), v.trim().to_string());
    }
    let time = |flag: &str, v: &Option<String>| -> Result<Option<OffsetDateTime>, String> {
        v.as_deref()
            .map(|s| {
                OffsetDateTime::parse(s, &Rfc3339)
                    .map_err(|e| format!("--{flag} `{s}`: not an RFC 3339 time ({e})"))
            })
            .transpose()
    };
    let mut attachments = Vec::new();
    for p in &a.attachments {
        let content = std::fs::read(p).map_err(|e| format!("--attach {}: {e}", p.display()))?;
        attachments.push(NewAttachment {
            filename: p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "attachment".into()),
            content_type: guess_type(p).into(),
            content,
        });
    }
    Ok(NewEmail {
        from: a.from,
        reply_to: a.reply_to,
        to: a.to,
        cc: a.cc,
        bcc: a.bcc,
        subject: a.subject,
        text: a.text,
        html: a.html,
        template: a.template,
        variables,
        headers,
        tags: a.tags,
        metadata: Default::default(),
        attachments,
        send_at: time("send-at", &a.send_at)?,
        expires_at: time("expires-at", &a.expires_at)?,
        priority: Priority::parse(&a.priority).map_err(|e| format!("--priority: {e}"))?,
        idempotency_key: a.idempotency_key,
        ignore_suppression: a.ignore_suppression,
        relay: a.relay.clone(),
        one_click_unsubscribe: false,
    })
}

fn guess_type(p: &std::path::Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "txt" | "log" => "text/plain",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "pdf" => "application/pdf",
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

fn print_report(r: &crate::EmailReport) {
    let t = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    println!("id:          {}", r.id);
    println!("status:      {}", r.status);
    println!("priority:    {}", r.priority.as_str());
    println!("to:          {}", r.to.join(", "));
    if let Some(s) = &r.subject {
        println!("subject:     {s}");
    }
    if let Some(s) = &r.template {
        println!("template:    {s}");
    }
    println!("message-id:  {}", r.message_id);
    println!("attempts:    {}", r.attempts);
    println!("created:     {}", t(r.created_at));
    if let Some(s) = r.sent_at {
        println!("sent:        {}", t(s));
    }
    if let Some(s) = r.next_attempt_at {
        println!("next try:    {}", t(s));
    }
    if let Some(e) = &r.last_error {
        println!("last error:  {e}");
    }
    println!("timeline:");
    println!("  {}  queued", t(r.created_at));
    for e in &r.timeline {
        let mut line = format!("  {}  {}", t(e.at), e.kind);
        if let Some(a) = e.attempt {
            line += &format!(" #{a}");
        }
        line += &format!(" -> {}", e.status);
        if let Some(c) = e.smtp_code {
            line += &format!("  [{c}]");
        }
        if let Some(txt) = &e.smtp_text {
            line += &format!(" {txt}");
        }
        if let Some(d) = e.duration_ms {
            line += &format!(" ({d} ms)");
        }
        if let Some(d) = &e.detail {
            line += &format!("  {d}");
        }
        println!("{line}");
    }
}
