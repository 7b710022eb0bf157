//! Rate limits shared by the nodes of a cluster, in Redis (`[limits.shared]`).
//!
//! Each check is one call of a Lua script that Redis runs atomically: the generic cell rate
//! algorithm (the one governor uses on one node) over one key per bucket, holding the bucket's
//! theoretical arrival time in microseconds of Redis's own clock (the nodes' clocks do not
//! matter). There is no read on a node followed by a write: two nodes spending the same bucket
//! at once are ordered by Redis, which is what limits built on GET then SET get wrong.
//!
//! When Redis does not answer within `timeout_ms`, the check falls back to the node's own
//! limits (the caller's governor buckets) and the node stops asking Redis for a second: a
//! warning is logged once per outage and `cardgate_limits_shared_up` drops to 0.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::{RateConfig, SharedLimitsConfig};

/// The generic cell rate algorithm, atomically. KEYS[1]: the bucket; ARGV[1]: microseconds
/// between two requests at the sustained rate; ARGV[2]: the burst. Answers 0 (admitted, and
/// the bucket spent) or how many microseconds until a request would be admitted.
const GCRA: &str = r"
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local emission = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local next_tat = tat + emission
local allowed_at = next_tat - emission * tonumber(ARGV[2])
if now < allowed_at then
  return allowed_at - now
end
redis.call('SET', KEYS[1], next_tat, 'PX', math.floor((next_tat - now) / 1000) + 1)
return 0
";

/// One bucket's rate, as the script takes it.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    emission_us: u64,
    burst: u32,
}

impl Rate {
    /// A configured rate; `None` for an unlimited (or invalid) one.
    pub fn of(rate: &RateConfig) -> Option<Self> {
        let per_second = match (rate.per_second, rate.per_minute) {
            (Some(n), None) if n > 0 => f64::from(n),
            (None, Some(n)) if n > 0 => f64::from(n) / 60.0,
            _ => return None,
        };
        (rate.burst > 0).then(|| Self { emission_us: (1_000_000.0 / per_second).ceil() as u64, burst: rate.burst })
    }
}

/// The connection to Redis, and whether it answers.
pub struct Shared {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    script: redis::Script,
    prefix: String,
    timeout: Duration,
    /// No call before this moment (ms since `epoch`): Redis failed recently.
    resting_until: AtomicU64,
    epoch: Instant,
    down: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("prefix", &self.prefix).field("down", &self.down).finish()
    }
}

/// How long a node leaves Redis alone after it failed to answer.
const REST: Duration = Duration::from_secs(1);

impl Shared {
    /// A client for the configured Redis (connecting on first use).
    pub fn new(config: &SharedLimitsConfig) -> Result<Self, String> {
        let client = redis::Client::open(config.url.as_str()).map_err(|e| format!("limits.shared.url: {e}"))?;
        crate::metrics::limits_shared_up(true);
        Ok(Self {
            client,
            connection: tokio::sync::Mutex::new(None),
            script: redis::Script::new(GCRA),
            prefix: config.key_prefix.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
            resting_until: AtomicU64::new(0),
            epoch: Instant::now(),
            down: AtomicBool::new(false),
        })
    }

    /// Spends one request of the bucket `scope`/`key` at `rate`: `Some(Ok(()))` admitted,
    /// `Some(Err(wait))` refused, `None` when Redis did not answer (the caller decides
    /// locally).
    pub async fn check(&self, scope: &str, key: &str, rate: Rate) -> Option<Result<(), Duration>> {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        if now < self.resting_until.load(Ordering::Relaxed) {
            return None;
        }
        let bucket = format!("{}:limit:{scope}:{key}", self.prefix);
        let answer = tokio::time::timeout(self.timeout, self.call(&bucket, rate)).await;
        match answer {
            Ok(Ok(wait_us)) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("limits: Redis answers again; the cluster's limits apply");
                    crate::metrics::limits_shared_up(true);
                }
                Some(if wait_us == 0 { Ok(()) } else { Err(Duration::from_micros(wait_us)) })
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer in {} ms", self.timeout.as_millis()),
                };
                // The next call connects afresh.
                if let Ok(mut connection) = self.connection.try_lock() {
                    *connection = None;
                }
                self.resting_until.store(now + REST.as_millis() as u64, Ordering::Relaxed);
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "limits: Redis does not answer; each node applies its own limits until it does");
                    crate::metrics::limits_shared_up(false);
                }
                crate::metrics::limits_local_fallback();
                None
            }
        }
    }

    async fn call(&self, bucket: &str, rate: Rate) -> redis::RedisResult<u64> {
        let mut connection = {
            let mut held = self.connection.lock().await;
            match &*held {
                Some(connection) => connection.clone(),
                None => {
                    let connection = self.client.get_multiplexed_async_connection().await?;
                    *held = Some(connection.clone());
                    connection
                }
            }
        };
        self.script.key(bucket).arg(rate.emission_us).arg(rate.burst).invoke_async(&mut connection).await
    }
}
