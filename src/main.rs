//! The `postbox` binary: parses the command line and calls the library (`postbox::cli`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postbox::cli::{self, SendArgs};
use postbox::{Role, Settings};

/// mimalloc for the binary (the library leaves the allocator to the embedding app): the submit
/// path allocates per email (JSON, validated types, SQL arguments), and glibc's malloc/free was
/// ~15% of a batch submit's profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "postbox", version, about = "Reliable email dispatch")]
struct Cli {
    /// TOML config file (optional: without one, the embedded defaults apply).
    #[arg(long, global = true, env = "POSTBOX_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API (unless api.enabled = false), the delivery workers and the mailbox
    /// watchers until SIGINT/SIGTERM.
    Serve,
    /// Run only the HTTP API (no delivery in this process).
    Api,
    /// Run only the delivery workers (no HTTP API, no mailbox watchers): add these on more
    /// hosts, all on one PostgreSQL, to deliver more.
    Worker,
    /// Submit one email (prints its id), or every line of a JSON Lines file with --batch.
    Send(Box<SendArgs>),
    /// The queue at a glance: depth by state and priority, totals, recent outcomes.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show an email's status and timeline.
    Status {
        id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or retrying email, or dismiss a dead letter (failed).
    Cancel { id: String },
    /// Re-drive a failed email (dead letter).
    Retry { id: String },
    /// The suppression list: addresses postbox does not send to.
    Suppressions {
        #[command(subcommand)]
        command: cli::SuppressionsCommand,
    },
    /// The relays, their rate limits and the pauses.
    Relays {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Pause sending through a relay, to a recipient domain, or with a tag.
    Pause {
        /// relay, domain or tag
        kind: String,
        value: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// End a pause: the emails it held are queued again at once.
    Resume {
        /// relay, domain or tag
        kind: String,
        value: String,
    },
    /// Retry (dead letters) or cancel every email a filter matches, 10,000 per run.
    Bulk {
        /// retry or cancel
        action: String,
        /// Required: failed for retry; queued, retrying or failed for cancel.
        #[arg(long)]
        status: String,
        #[arg(long)]
        tag: Option<String>,
        /// A recipient at this domain.
        #[arg(long)]
        domain: Option<String>,
        /// Created at least this many seconds ago.
        #[arg(long)]
        older_than: Option<u64>,
    },
    /// Create or upgrade the database schema, then exit.
    Migrate,
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration, resolve its secrets, and print the effective settings
    /// (secrets masked).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    settings.log.init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let res = rt.block_on(async {
        match cli.command {
            Command::Config {
                command: ConfigCommand::Check,
            } => Ok(cli::config_check(settings)),
            Command::Migrate => cli::migrate(settings).await,
            Command::Serve => cli::serve(settings, Role::Serve).await,
            Command::Api => cli::serve(settings, Role::Api).await,
            Command::Worker => cli::serve(settings, Role::Worker).await,
            Command::Send(args) => cli::send(settings, *args).await,
            Command::Stats { json } => cli::stats(settings, json).await,
            Command::Status { id, json } => cli::status(settings, &id, json).await,
            Command::Cancel { id } => cli::transition(settings, &id, true).await,
            Command::Retry { id } => cli::transition(settings, &id, false).await,
            Command::Suppressions { command } => cli::suppressions(settings, command).await,
            Command::Relays { json } => cli::relays(settings, json).await,
            Command::Pause {
                kind,
                value,
                reason,
            } => cli::pause(settings, &kind, &value, reason.as_deref(), false).await,
            Command::Resume { kind, value } => {
                cli::pause(settings, &kind, &value, None, true).await
            }
            Command::Bulk {
                action,
                status,
                tag,
                domain,
                older_than,
            } => {
                cli::bulk(
                    settings,
                    &action,
                    &status,
                    tag.as_deref(),
                    domain.as_deref(),
                    older_than,
                )
                .await
            }
        }
    });
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A setting refused (a secret missing from the environment, a bad rule) is the
            // user's to fix, like a bad flag: exit 2, as `config check` does.
            match e.downcast_ref::<postbox::OpenError>() {
                Some(postbox::OpenError::Config(_)) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
