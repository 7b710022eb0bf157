//! Prometheus metrics, rendered by the admin listener at `/metrics`.
//!
//! Names follow `cardgate_<thing>_<unit>`; counters end in `_total`. The recorder is global
//! (one per process) and installed on first use.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

const LATENCY_BUCKETS: [f64; 14] =
    [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Installs the recorder (once) and returns the handle that renders the metrics.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("cardgate_ledger_commit_batch_size".into()), &BATCH_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("cardgate_token_signature_batch_size".into()),
                        &BATCH_BUCKETS,
                    )
                });
            match builder.and_then(PrometheusBuilder::install_recorder) {
                Ok(handle) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// The metrics in the Prometheus text format.
pub fn render() -> String {
    install()
        .map(|h| {
            h.run_upkeep();
            h.render()
        })
        .unwrap_or_default()
}

/// One answered request.
pub fn request(endpoint: &'static str, status: u16, code: &str, elapsed: Duration) {
    metrics::counter!("cardgate_requests_total", "endpoint" => endpoint, "status" => status.to_string(), "code" => code.to_owned())
        .increment(1);
    metrics::histogram!("cardgate_request_duration_seconds", "endpoint" => endpoint).record(elapsed.as_secs_f64());
}

/// A refused token, by reason.
pub fn token_rejected(code: &'static str) {
    metrics::counter!("cardgate_token_rejections_total", "reason" => code).increment(1);
}

/// Ed25519 signatures checked together (token::batch); a batch of one is a single check.
pub fn signature_batch(size: usize) {
    metrics::histogram!("cardgate_token_signature_batch_size").record(size as f64);
}

/// A batch of signatures that failed as a whole (each was then checked alone).
pub fn signature_batch_failed() {
    metrics::counter!("cardgate_token_signature_batch_failures_total").increment(1);
}

/// A request refused by a rate limit.
pub fn rate_limited(scope: &'static str) {
    metrics::counter!("cardgate_rate_limited_total", "scope" => scope).increment(1);
}

/// A request shed past the in-flight limit.
pub fn shed() {
    metrics::counter!("cardgate_shed_total").increment(1);
}

/// Calls of a plugin past their timeout that still hold a thread of its pool.
pub fn plugin_stuck(plugin: &str, calls: usize) {
    metrics::gauge!("cardgate_plugin_stuck_calls", "plugin" => plugin.to_owned()).set(calls as f64);
}

/// One plugin call.
pub fn plugin_call(plugin: &str, operation: &'static str, outcome: &'static str, elapsed: Duration) {
    let plugin = plugin.to_owned();
    metrics::counter!("cardgate_plugin_calls_total", "plugin" => plugin.clone(), "operation" => operation, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("cardgate_plugin_call_duration_seconds", "plugin" => plugin, "operation" => operation)
        .record(elapsed.as_secs_f64());
}

/// A plugin's breaker state: 1 for the current state (`closed`, `half_open`, `open`), 0 for
/// the others.
pub fn breaker(plugin: &str, state: &'static str) {
    for candidate in ["closed", "half_open", "open"] {
        let value = if candidate == state { 1.0 } else { 0.0 };
        metrics::gauge!("cardgate_plugin_breaker_state", "plugin" => plugin.to_owned(), "state" => candidate)
            .set(value);
    }
}

/// Whether the cluster's shared rate limits (Redis) answer: 1, or 0 while each node applies
/// its own.
pub fn limits_shared_up(up: bool) {
    metrics::gauge!("cardgate_limits_shared_up").set(if up { 1.0 } else { 0.0 });
}

/// A rate-limit check decided by the node's own limits because Redis did not answer.
pub fn limits_local_fallback() {
    metrics::counter!("cardgate_limits_local_fallback_total").increment(1);
}

/// One ledger commit.
pub fn ledger_commit(batch: usize, elapsed: Duration) {
    metrics::histogram!("cardgate_ledger_commit_batch_size").record(batch as f64);
    metrics::histogram!("cardgate_ledger_commit_duration_seconds").record(elapsed.as_secs_f64());
}

/// The write-ahead log after the writer's checkpoint: frames in it, and how many of them are
/// copied into the database (equal: the log starts over with the next commit).
pub fn ledger_wal(frames: i64, copied: i64) {
    metrics::gauge!("cardgate_ledger_wal_frames").set(frames as f64);
    metrics::gauge!("cardgate_ledger_wal_uncopied_frames").set((frames - copied).max(0) as f64);
}

/// A settlement outcome.
pub fn settlement(state: &'static str) {
    metrics::counter!("cardgate_settlements_total", "state" => state).increment(1);
}

/// Connections opened (+1) or closed (-1).
pub fn connections(delta: f64) {
    metrics::gauge!("cardgate_open_connections").increment(delta);
}

/// A failed TLS handshake.
pub fn handshake_failed(reason: &'static str) {
    metrics::counter!("cardgate_tls_handshake_failures_total", "reason" => reason).increment(1);
}
