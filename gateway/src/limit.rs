//! Traffic control: token-bucket rate limits (governor) — global, per institution, per
//! terminal, per card — and the global in-flight limit past which the gateway sheds load.
//!
//! A refusal names its scope and how long to wait (`429` with `Retry-After`). Keyed buckets
//! that have refilled are swept out now and then, so memory follows the active keys.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{LimitsConfig, RateConfig};

pub mod shared;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole gateway.
    Global,
    /// One institution.
    Institution,
    /// One terminal of an institution.
    Terminal,
    /// One card (velocity).
    Card,
}

impl Scope {
    /// The name in problem documents and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::Institution => "institution",
            Self::Terminal => "terminal",
            Self::Card => "card",
        }
    }
}

/// A refusal: the scope and how long until a request would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The scope.
    pub scope: Scope,
    /// Wait at least this long.
    pub retry_after: Duration,
}

/// The limits, shared by all connections.
#[derive(Debug)]
pub struct Limiter {
    global: Option<DefaultDirectRateLimiter>,
    institution: Option<DefaultKeyedRateLimiter<String>>,
    terminal: Option<DefaultKeyedRateLimiter<(String, String)>>,
    card: Option<DefaultKeyedRateLimiter<Vec<u8>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    /// Requests in flight per institution (`""`: clients naming no known institution).
    institutions: std::sync::RwLock<std::collections::HashMap<String, Arc<AtomicUsize>>>,
    max_institution_in_flight: usize,
    checks: AtomicU64,
    /// The cluster's buckets (institution, terminal, card), when `[limits.shared]` is set;
    /// the keyed limiters above decide while Redis does not answer.
    shared: Option<(shared::Shared, SharedRates)>,
}

/// The shared scopes' rates.
#[derive(Debug, Clone, Copy)]
struct SharedRates {
    institution: Option<shared::Rate>,
    terminal: Option<shared::Rate>,
    card: Option<shared::Rate>,
}

/// Counts one request in flight (in all, and for its institution) until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>, Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sweep refilled keyed buckets every this many checks.
const SWEEP_EVERY: u64 = 1 << 16;

fn quota(rate: &RateConfig) -> Option<Quota> {
    let burst = NonZeroU32::new(rate.burst)?;
    let base = match (rate.per_second, rate.per_minute) {
        (Some(n), None) => Quota::per_second(NonZeroU32::new(n)?),
        (None, Some(n)) => Quota::per_minute(NonZeroU32::new(n)?),
        _ => return None,
    };
    Some(base.allow_burst(burst))
}

impl Limiter {
    /// Limiters from validated configuration; an absent scope is unlimited.
    pub fn new(config: &LimitsConfig) -> Self {
        let rate = |r: &Option<RateConfig>| r.as_ref().and_then(shared::Rate::of);
        let shared = config.shared.as_ref().and_then(|c| match shared::Shared::new(c) {
            Ok(shared) => Some(shared),
            Err(problem) => {
                tracing::warn!(%problem, "limits: the shared limits are off");
                None
            }
        });
        Self {
            shared: shared.map(|s| {
                let rates = SharedRates {
                    institution: rate(&config.institution),
                    terminal: rate(&config.terminal),
                    card: rate(&config.card),
                };
                (s, rates)
            }),
            global: config.global.as_ref().and_then(quota).map(RateLimiter::direct),
            institution: config.institution.as_ref().and_then(quota).map(RateLimiter::keyed),
            terminal: config.terminal.as_ref().and_then(quota).map(RateLimiter::keyed),
            card: config.card.as_ref().and_then(quota).map(RateLimiter::keyed),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: config.max_in_flight,
            institutions: std::sync::RwLock::default(),
            max_institution_in_flight: config.institution_in_flight(),
            checks: AtomicU64::new(0),
        }
    }

    /// Admits one more request of `institution` (as its certificate names it; `""` for one
    /// naming no known institution), or `None` past the gateway's limit or past the
    /// institution's share of it (shed with 503): one client cannot take every slot.
    pub fn enter(&self, institution: &str) -> Option<InFlight> {
        let mine = self.institution_counter(institution);
        let before_all = self.in_flight.fetch_add(1, Ordering::AcqRel);
        let before_mine = mine.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(Arc::clone(&self.in_flight), mine);
        (before_all < self.max_in_flight && before_mine < self.max_institution_in_flight).then_some(guard)
    }

    fn institution_counter(&self, institution: &str) -> Arc<AtomicUsize> {
        if let Some(counter) = self.institutions.read().unwrap_or_else(|p| p.into_inner()).get(institution) {
            return Arc::clone(counter);
        }
        let mut all = self.institutions.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(all.entry(institution.to_owned()).or_default())
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The global and institution limits, checked on every request.
    pub async fn check_request(&self, institution: &str) -> Result<(), Limited> {
        self.tick();
        if let Some(global) = &self.global {
            global.check().map_err(|n| limited(Scope::Global, &n))?;
        }
        let rate = self.shared.as_ref().and_then(|(_, r)| r.institution);
        self.keyed(Scope::Institution, &self.institution, institution.to_owned(), rate, || institution.to_owned()).await
    }

    /// The terminal limit.
    pub async fn check_terminal(&self, institution: &str, terminal: &str) -> Result<(), Limited> {
        let rate = self.shared.as_ref().and_then(|(_, r)| r.terminal);
        // The terminal id is the institution's to choose: its length prefixes it in the key.
        let name = || format!("{}:{institution}:{terminal}", institution.len());
        self.keyed(Scope::Terminal, &self.terminal, (institution.to_owned(), terminal.to_owned()), rate, name).await
    }

    /// The card velocity limit, by the card's keyed hash.
    pub async fn check_card(&self, card_hash: &[u8]) -> Result<(), Limited> {
        let rate = self.shared.as_ref().and_then(|(_, r)| r.card);
        let name = || card_hash.iter().map(|b| format!("{b:02x}")).collect::<String>();
        self.keyed(Scope::Card, &self.card, card_hash.to_vec(), rate, name).await
    }

    /// One keyed scope: the cluster's bucket when shared (and Redis answers), else this node's.
    async fn keyed<K: std::hash::Hash + Eq + Clone>(
        &self,
        scope: Scope,
        local: &Option<DefaultKeyedRateLimiter<K>>,
        key: K,
        rate: Option<shared::Rate>,
        name: impl FnOnce() -> String,
    ) -> Result<(), Limited> {
        let Some(local) = local else { return Ok(()) };
        if let (Some((shared, _)), Some(rate)) = (&self.shared, rate) {
            match shared.check(scope.as_str(), &name(), rate).await {
                Some(Ok(())) => return Ok(()),
                Some(Err(retry_after)) => return Err(Limited { scope, retry_after }),
                None => {}
            }
        }
        local.check_key(&key).map_err(|n| limited(scope, &n))
    }

    fn tick(&self) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            if let Some(l) = &self.institution {
                l.retain_recent();
                l.shrink_to_fit();
            }
            if let Some(l) = &self.terminal {
                l.retain_recent();
                l.shrink_to_fit();
            }
            if let Some(l) = &self.card {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
    }
}

fn limited(scope: Scope, not_until: &governor::NotUntil<<DefaultClock as Clock>::Instant>) -> Limited {
    Limited { scope, retry_after: not_until.wait_time_from(DefaultClock::default().now()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: u32, burst: u32) -> Option<RateConfig> {
        Some(RateConfig { per_second: Some(per_second), per_minute: None, burst })
    }

    #[tokio::test]
    async fn each_scope_refuses_past_its_burst() {
        let limiter = Limiter::new(&LimitsConfig {
            global: None,
            institution: rate(1, 3),
            terminal: rate(1, 2),
            card: Some(RateConfig { per_second: None, per_minute: Some(1), burst: 1 }),
            max_in_flight: 10,
            institution_max_in_flight: None,
            shared: None,
        });
        for _ in 0..3 {
            assert_eq!(limiter.check_request("H1").await, Ok(()));
        }
        let refused = limiter.check_request("H1").await.expect_err("burst used");
        assert_eq!(refused.scope, Scope::Institution);
        assert!(refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(1));
        assert_eq!(limiter.check_request("H2").await, Ok(()), "other institutions are not affected");
        assert_eq!(limiter.check_terminal("H1", "T1").await, Ok(()));
        assert_eq!(limiter.check_terminal("H1", "T1").await, Ok(()));
        assert_eq!(limiter.check_terminal("H1", "T1").await.map_err(|l| l.scope), Err(Scope::Terminal));
        assert_eq!(limiter.check_terminal("H2", "T1").await, Ok(()), "terminals are per institution");
        assert_eq!(limiter.check_card(b"c").await, Ok(()));
        let card = limiter.check_card(b"c").await.expect_err("velocity");
        assert!(card.retry_after > Duration::from_secs(50), "{:?}", card.retry_after);
    }

    #[test]
    fn in_flight_limit_sheds_and_recovers() {
        let limiter = Limiter::new(&LimitsConfig { max_in_flight: 2, ..LimitsConfig::default() });
        let a = limiter.enter("H1").expect("first");
        let _b = limiter.enter("H2").expect("second");
        assert!(limiter.enter("H3").is_none(), "third is shed");
        drop(a);
        assert!(limiter.enter("H3").is_some());
    }

    #[test]
    fn one_institution_takes_only_its_share_of_the_slots() {
        let config = LimitsConfig { max_in_flight: 8, institution_max_in_flight: Some(3), ..LimitsConfig::default() };
        let limiter = Limiter::new(&config);
        let held: Vec<_> = (0..3).map(|_| limiter.enter("P1").expect("within its share")).collect();
        assert!(limiter.enter("P1").is_none(), "past its share");
        assert!(limiter.enter("H1").is_some(), "others still get in");
        drop(held);
        assert!(limiter.enter("P1").is_some());
        assert_eq!(LimitsConfig { max_in_flight: 4096, ..LimitsConfig::default() }.institution_in_flight(), 1024);
    }

    /// The Redis server for the shared limits' tests: `CARDGATE_TEST_REDIS`, if set.
    fn redis() -> Option<String> {
        std::env::var("CARDGATE_TEST_REDIS").ok().filter(|url| !url.is_empty())
    }

    /// A node's limiter on the shared buckets under `prefix`: institutions 3 at once, 1/s.
    fn node(url: &str, prefix: &str) -> Limiter {
        Limiter::new(&LimitsConfig {
            institution: rate(1, 3),
            card: Some(RateConfig { per_second: None, per_minute: Some(1), burst: 10 }),
            shared: Some(crate::config::SharedLimitsConfig {
                url: url.to_owned(),
                timeout_ms: 200,
                key_prefix: prefix.to_owned(),
            }),
            ..LimitsConfig::default()
        })
    }

    fn prefix() -> String {
        format!("cardgate-test-{}-{}", std::process::id(), now_nanos())
    }

    fn now_nanos() -> u128 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_share_one_quota() {
        let Some(url) = redis() else {
            eprintln!(
                "SKIPPED (set CARDGATE_TEST_REDIS=redis://127.0.0.1:6379 to run): limit::three_nodes_share_one_quota"
            );
            return;
        };
        let prefix = prefix();
        let nodes: Vec<Limiter> = (0..3).map(|_| node(&url, &prefix)).collect();
        // Each node alone would admit 3: together they admit 3, and refuse with the wait.
        let mut admitted = 0;
        for round in 0..3 {
            for node in &nodes {
                match node.check_request("H1").await {
                    Ok(()) => admitted += 1,
                    Err(refused) => {
                        assert_eq!(refused.scope, Scope::Institution, "round {round}");
                        assert!(refused.retry_after <= Duration::from_secs(1), "{refused:?}");
                    }
                }
            }
        }
        assert_eq!(admitted, 3);
        assert_eq!(nodes[0].check_request("H2").await, Ok(()), "other institutions are not affected");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_from_every_node_at_once_is_admitted_exactly_once() {
        let Some(url) = redis() else {
            eprintln!(
                "SKIPPED (set CARDGATE_TEST_REDIS=redis://127.0.0.1:6379 to run): limit::a_burst_from_every_node_at_once_is_admitted_exactly_once"
            );
            return;
        };
        let prefix = prefix();
        let nodes: Vec<Arc<Limiter>> = (0..3).map(|_| Arc::new(node(&url, &prefix))).collect();
        // A card's velocity: 10 a minute. Sixty checks at once over three nodes: exactly ten pass
        // (no check reads the bucket, then writes it, between another's).
        let tasks: Vec<_> = (0..60)
            .map(|i| {
                let node = Arc::clone(&nodes[i % 3]);
                tokio::spawn(async move { node.check_card(b"one-card").await.is_ok() })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            admitted += usize::from(task.await.expect("task"));
        }
        assert_eq!(admitted, 10);
    }

    #[tokio::test]
    async fn without_redis_each_node_applies_its_own_limits() {
        // Nothing listens there: each check falls back at once (the connection is refused), and
        // the node leaves Redis alone for a second.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        let url = format!("redis://{}", listener.local_addr().expect("address"));
        drop(listener);
        let limiter = node(&url, "unreachable");
        let started = std::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check_request("H1").await, Ok(()));
        }
        assert_eq!(limiter.check_request("H1").await.map_err(|l| l.scope), Err(Scope::Institution));
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
