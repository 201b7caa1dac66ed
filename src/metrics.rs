//! Prometheus metrics: the `metrics` facade, exported by `metrics-exporter-prometheus` at
//! `GET /metrics`. Counters and histograms are recorded where things happen; queue gauges are
//! read from the database at scrape time, so every process reports the same queue.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `postbox_emails_submitted_total` | counter | priority, template |
//! | `postbox_emails_sent_total` / `_failed_total` / `_retried_total` / `_suppressed_total` / `_throttled_total` | counter | priority, template |
//! | `postbox_emails_held_total` | counter (claims put back to wait: a rate limit or a pause; not attempts) | |
//! | `postbox_rate_limit_per_second` | gauge (effective rate of a limit key; 0: unlimited) | key (`relay:<name>`, `domain:<domain>`) |
//! | `postbox_throttle_replies_total` | counter ("slow down" replies) | relay |
//! | `postbox_relay_cooling` | gauge (1 while a relay is skipped after failing to connect) | relay |
//! | `postbox_queue_depth` | gauge | state (queued, retrying, sending) |
//! | `postbox_queue_oldest_age_seconds` | gauge | |
//! | `postbox_submit_seconds` | histogram (submit -> committed) | |
//! | `postbox_smtp_transaction_seconds` | histogram (one attempt: render + SMTP transaction, every relay tried; not the wait for a send slot or a rate limit) | |
//! | `postbox_smtp_replies_total` | counter | code (`250`, `451`, `none` for network errors) |
//! | `postbox_interrupted_sends_total` | counter (resends of an attempt a crash cut off) | |
//! | `postbox_write_batch_size` | histogram (claims / completions / fetches / webhook rounds per transaction) | kind |
//! | `postbox_jobs_unreadable_total` | counter (job rows a fetch could not read: set aside, `Killed`) | |
//! | `postbox_webhook_deliveries_total` | counter (POSTs: delivered, retry, failed, gone) | webhook, result |
//! | `postbox_webhook_lag_seconds` | gauge (age of the oldest event an endpoint has not read; every 2 s) | webhook |
//! | `postbox_mailbox_connected` | gauge | mailbox |
//! | `postbox_mailbox_messages_scanned_total` | counter | mailbox |
//! | `postbox_mailbox_rule_matches_total` | counter | mailbox, rule |
//! | `postbox_mailbox_alerts_total` | counter | mailbox |
//! | `postbox_mailbox_last_poll_timestamp_seconds` | gauge | mailbox |
//! | `postbox_http_requests_total` | counter | method, route, status |
//! | `postbox_http_request_seconds` | histogram | method, route |

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::domain::Email;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Seconds: 1 ms .. 30 s.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the process-wide recorder once. If the embedding application installed its own
/// `metrics` recorder first, postbox's metrics go there and `/metrics` says so.
pub fn init() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .expect("bucket list is not empty");
            match builder.install_recorder() {
                Ok(h) => {
                    describe();
                    // Histogram samples pile up until drained: drain them every few seconds
                    // even when nobody scrapes, so memory stays flat.
                    let upkeep = h.clone();
                    let _ = std::thread::Builder::new()
                        .name("postbox-metrics-upkeep".into())
                        .spawn(move || {
                            loop {
                                std::thread::sleep(std::time::Duration::from_secs(5));
                                upkeep.run_upkeep();
                            }
                        });
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a metrics recorder is already installed; /metrics is not served by postbox");
                    None
                }
            }
        })
        .as_ref()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "postbox_emails_submitted_total",
        "Emails accepted into the queue."
    );
    describe_gauge!(
        "postbox_webhook_lag_seconds",
        "How long the oldest event a webhook endpoint has not read yet has waited (0: caught up)."
    );
    describe_counter!(
        "postbox_webhook_deliveries_total",
        "Webhook POSTs by outcome: delivered, retry (will be retried), failed (retries spent), gone (410: endpoint disabled)."
    );
    describe_counter!(
        "postbox_jobs_unreadable_total",
        "Job rows a fetch could not read (written by no postbox): set aside as Killed, with the reason; the janitor gives their email a new job."
    );
    describe_counter!(
        "postbox_emails_sent_total",
        "Emails accepted by the SMTP server."
    );
    describe_counter!(
        "postbox_emails_throttled_total",
        "Attempts a relay answered with a slow-down reply: retried without spending the retry budget."
    );
    describe_counter!(
        "postbox_emails_held_total",
        "Claimed emails put back to wait (a rate limit or a pause): not attempts."
    );
    describe_gauge!(
        "postbox_rate_limit_per_second",
        "The rate in force for a limit key (relay:<name>, domain:<domain>); 0: unlimited."
    );
    describe_counter!(
        "postbox_throttle_replies_total",
        "Slow-down replies ([throttle] patterns) per relay."
    );
    describe_gauge!(
        "postbox_relay_cooling",
        "1 while a relay is skipped for its cool-down after it could not be reached."
    );
    describe_counter!(
        "postbox_emails_failed_total",
        "Emails moved to the dead letters."
    );
    describe_counter!(
        "postbox_emails_suppressed_total",
        "Emails not sent: every recipient on the suppression list."
    );
    describe_counter!(
        "postbox_emails_retried_total",
        "Attempts that failed temporarily and were rescheduled."
    );
    describe_gauge!(
        "postbox_queue_depth",
        "Emails waiting or in flight, by state."
    );
    describe_gauge!(
        "postbox_queue_oldest_age_seconds",
        Unit::Seconds,
        "Age of the oldest email due and still queued."
    );
    describe_histogram!(
        "postbox_submit_seconds",
        Unit::Seconds,
        "Submit call to durable commit."
    );
    describe_histogram!(
        "postbox_smtp_transaction_seconds",
        Unit::Seconds,
        "One delivery attempt's SMTP transaction."
    );
    describe_counter!(
        "postbox_smtp_replies_total",
        "SMTP replies to delivery attempts, by code."
    );
    describe_gauge!(
        "postbox_mailbox_connected",
        "1 while the mailbox's watcher is logged in."
    );
    describe_counter!(
        "postbox_mailbox_messages_scanned_total",
        "Messages read by a watcher."
    );
    describe_counter!(
        "postbox_mailbox_rule_matches_total",
        "Rule matches stored (each message once per rule)."
    );
    describe_counter!(
        "postbox_mailbox_alerts_total",
        "Alert emails raised for a mailbox."
    );
    describe_gauge!(
        "postbox_mailbox_last_poll_timestamp_seconds",
        Unit::Seconds,
        "Unix time of a watcher's last completed scan."
    );
    describe_counter!(
        "postbox_http_requests_total",
        "HTTP requests by route and status."
    );
    describe_histogram!(
        "postbox_http_request_seconds",
        Unit::Seconds,
        "HTTP request latency by route."
    );
}

/// The labels of an email: priority and template (`raw` for an email without one).
pub fn email_labels(e: &Email) -> [(&'static str, String); 2] {
    [
        ("priority", e.priority.as_str().to_string()),
        (
            "template",
            e.content.template_name().unwrap_or("raw").to_string(),
        ),
    ]
}

/// The Prometheus text exposition, or None when another recorder owns the metrics.
pub fn render() -> Option<String> {
    init().map(|h| h.render())
}
