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
        Self {
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
    pub fn check_request(&self, institution: &str) -> Result<(), Limited> {
        self.tick();
        if let Some(global) = &self.global {
            global.check().map_err(|n| limited(Scope::Global, &n))?;
        }
        if let Some(limiter) = &self.institution {
            limiter.check_key(&institution.to_owned()).map_err(|n| limited(Scope::Institution, &n))?;
        }
        Ok(())
    }

    /// The terminal limit.
    pub fn check_terminal(&self, institution: &str, terminal: &str) -> Result<(), Limited> {
        match &self.terminal {
            Some(limiter) => limiter
                .check_key(&(institution.to_owned(), terminal.to_owned()))
                .map_err(|n| limited(Scope::Terminal, &n)),
            None => Ok(()),
        }
    }

    /// The card velocity limit, by the card's keyed hash.
    pub fn check_card(&self, card_hash: &[u8]) -> Result<(), Limited> {
        match &self.card {
            Some(limiter) => limiter.check_key(&card_hash.to_vec()).map_err(|n| limited(Scope::Card, &n)),
            None => Ok(()),
        }
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

    #[test]
    fn each_scope_refuses_past_its_burst() {
        let limiter = Limiter::new(&LimitsConfig {
            global: None,
            institution: rate(1, 3),
            terminal: rate(1, 2),
            card: Some(RateConfig { per_second: None, per_minute: Some(1), burst: 1 }),
            max_in_flight: 10,
            institution_max_in_flight: None,
        });
        for _ in 0..3 {
            assert_eq!(limiter.check_request("H1"), Ok(()));
        }
        let refused = limiter.check_request("H1").expect_err("burst used");
        assert_eq!(refused.scope, Scope::Institution);
        assert!(refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(1));
        assert_eq!(limiter.check_request("H2"), Ok(()), "other institutions are not affected");
        assert_eq!(limiter.check_terminal("H1", "T1"), Ok(()));
        assert_eq!(limiter.check_terminal("H1", "T1"), Ok(()));
        assert_eq!(limiter.check_terminal("H1", "T1").map_err(|l| l.scope), Err(Scope::Terminal));
        assert_eq!(limiter.check_terminal("H2", "T1"), Ok(()), "terminals are per institution");
        assert_eq!(limiter.check_card(b"c"), Ok(()));
        let card = limiter.check_card(b"c").expect_err("velocity");
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
}
