//! Prometheus metrics, rendered by the admin listener at `/metrics`.
//!
//! Names follow `cardgate_<thing>_<unit>`; counters end in `_total`. The recorder is global
//! (one per process) and installed on first use.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, OnceLock, RwLock};
use std::time::Duration;

use metrics::{Counter, Histogram};
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

/// Whether the recorder is installed: a metric's handle made before it would record nowhere,
/// so handles are kept ([`kept`]) only once it is.
fn installed() -> bool {
    matches!(HANDLE.get(), Some(Some(_)))
}

/// The handles of the metrics every request and every plugin call records, kept once made.
/// Why: the recorder finds a labelled metric by building its key (the labels copied), hashing
/// and comparing it — about 2% of a settlement's CPU under load for the three calls a
/// settlement makes (docs/BENCHMARKS.md, thirteenth round); a kept handle is a map lookup
/// without allocation. The maps stay small: endpoints, statuses and codes are fixed sets, and
/// plugins are few.
type RequestHandles = HashMap<(&'static str, u16, &'static str), (Counter, Histogram)>;
static REQUESTS: LazyLock<RwLock<RequestHandles>> = LazyLock::new(Default::default);

/// By plugin label (the handle's own `Arc`: a key made without allocating), operation, outcome.
type PluginHandles = HashMap<(Arc<str>, &'static str, &'static str), (Counter, Histogram)>;
static PLUGIN_CALLS: LazyLock<RwLock<PluginHandles>> = LazyLock::new(Default::default);

/// By state.
static SETTLEMENTS: LazyLock<RwLock<HashMap<&'static str, Counter>>> = LazyLock::new(Default::default);

/// The handles kept under `key`, made (and kept, once the recorder is installed) if none are.
fn kept<K: Eq + std::hash::Hash, V: Clone>(cache: &RwLock<HashMap<K, V>>, key: K, make: impl FnOnce() -> V) -> V {
    if let Some(handles) = cache.read().ok().and_then(|map| map.get(&key).cloned()) {
        return handles;
    }
    let handles = make();
    if installed()
        && let Ok(mut map) = cache.write()
    {
        map.insert(key, handles.clone());
    }
    handles
}

/// One answered request.
pub fn request(endpoint: &'static str, status: u16, code: &'static str, elapsed: Duration) {
    let make = || {
        let counter = metrics::counter!("cardgate_requests_total", "endpoint" => endpoint, "status" => status.to_string(), "code" => code);
        (counter, metrics::histogram!("cardgate_request_duration_seconds", "endpoint" => endpoint))
    };
    let (counter, histogram) = kept(&REQUESTS, (endpoint, status, code), make);
    counter.increment(1);
    histogram.record(elapsed.as_secs_f64());
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
pub fn plugin_call(plugin: &Arc<str>, operation: &'static str, outcome: &'static str, elapsed: Duration) {
    let make = || {
        let label = plugin.to_string();
        let counter = metrics::counter!("cardgate_plugin_calls_total", "plugin" => label.clone(), "operation" => operation, "outcome" => outcome);
        (
            counter,
            metrics::histogram!("cardgate_plugin_call_duration_seconds", "plugin" => label, "operation" => operation),
        )
    };
    let (counter, histogram) = kept(&PLUGIN_CALLS, (Arc::clone(plugin), operation, outcome), make);
    counter.increment(1);
    histogram.record(elapsed.as_secs_f64());
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
    kept(&SETTLEMENTS, state, || metrics::counter!("cardgate_settlements_total", "state" => state)).increment(1);
}

/// Connections opened (+1) or closed (-1).
pub fn connections(delta: f64) {
    metrics::gauge!("cardgate_open_connections").increment(delta);
}

/// A connection closed as it arrived: as many were open as the open-files limit leaves room for.
pub fn connection_refused() {
    metrics::counter!("cardgate_connections_refused_total").increment(1);
}

/// A failed TLS handshake.
pub fn handshake_failed(reason: &'static str) {
    metrics::counter!("cardgate_tls_handshake_failures_total", "reason" => reason).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The count of a rendered counter line that holds every one of `labels`.
    fn count(rendered: &str, name: &str, labels: &[&str]) -> Option<u64> {
        rendered
            .lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
            .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
    }

    #[test]
    fn kept_handles_count_every_call_under_its_own_labels() {
        install().expect("recorder");
        let before = render();
        let of = |rendered: &str, labels: &[&str]| count(rendered, "cardgate_plugin_calls_total", labels).unwrap_or(0);
        let ok = ["plugin=\"kept-handles\"", "operation=\"settle\"", "outcome=\"ok\""];
        let refused = ["plugin=\"kept-handles\"", "operation=\"settle\"", "outcome=\"refused\""];
        let other = ["plugin=\"kept-handles-2\"", "operation=\"settle\"", "outcome=\"ok\""];
        let (first, second): (Arc<str>, Arc<str>) = (Arc::from("kept-handles"), Arc::from("kept-handles-2"));
        for _ in 0..3 {
            // A label equal to a kept one but not the same allocation finds the kept handles.
            plugin_call(&Arc::from("kept-handles"), "settle", "ok", Duration::from_micros(5));
        }
        plugin_call(&first, "settle", "refused", Duration::from_micros(5));
        plugin_call(&second, "settle", "ok", Duration::from_micros(5));
        for _ in 0..2 {
            request("kept_handles_test", 201, "-", Duration::from_micros(50));
        }
        request("kept_handles_test", 409, "token_used", Duration::from_micros(50));
        let after = render();
        assert_eq!(of(&after, &ok) - of(&before, &ok), 3);
        assert_eq!(of(&after, &refused) - of(&before, &refused), 1);
        assert_eq!(of(&after, &other) - of(&before, &other), 1);
        let requests = |labels: &[&str]| count(&after, "cardgate_requests_total", labels);
        assert_eq!(requests(&["endpoint=\"kept_handles_test\"", "status=\"201\"", "code=\"-\""]), Some(2));
        assert_eq!(requests(&["endpoint=\"kept_handles_test\"", "status=\"409\"", "code=\"token_used\""]), Some(1));
        let durations = count(&after, "cardgate_request_duration_seconds_count", &["endpoint=\"kept_handles_test\""]);
        assert_eq!(durations, Some(3));
    }
}
