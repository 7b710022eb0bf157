//! Replay protection: a token settles at most one bill, ever.
//!
//! [`ReplayStore`] is the interface; [`MemoryReplayStore`] is the fast in-memory cache the
//! daemon keeps in front of the ledger, which implements the same interface durably.

use std::collections::HashMap;
use std::sync::Mutex;

use super::error::TokenError;

/// Records token ids that were used.
pub trait ReplayStore: Send + Sync {
    /// Records that `token_id` is used; [`TokenError::Replayed`] if it was used before.
    /// `expires_at` (seconds since the epoch) is when the token stops verifying anyway, after
    /// which a store may forget it.
    fn claim(&self, token_id: &[u8], expires_at: i64, now: i64) -> Result<(), TokenError>;
}

/// An in-memory replay store. Forgets tokens once they have expired (they fail the time
/// check from then on), so its size is bounded by the tokens live at once.
#[derive(Debug, Default)]
pub struct MemoryReplayStore {
    seen: Mutex<Seen>,
}

#[derive(Debug, Default)]
struct Seen {
    tokens: HashMap<Vec<u8>, i64>,
    /// Size at which the next claim sweeps out expired tokens.
    sweep_at: usize,
}

impl MemoryReplayStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many token ids are remembered.
    pub fn len(&self) -> usize {
        self.seen.lock().map_or(0, |s| s.tokens.len())
    }

    /// Whether a token id was claimed (and not yet forgotten).
    pub fn contains(&self, token_id: &[u8]) -> bool {
        self.seen.lock().is_ok_and(|s| s.tokens.contains_key(token_id))
    }

    /// Whether no token id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ReplayStore for MemoryReplayStore {
    fn claim(&self, token_id: &[u8], expires_at: i64, now: i64) -> Result<(), TokenError> {
        // A poisoned lock means a panic mid-update; the map itself is still consistent.
        let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.tokens.contains_key(token_id) {
            return Err(TokenError::Replayed);
        }
        if seen.tokens.len() >= seen.sweep_at {
            seen.tokens.retain(|_, exp| *exp >= now);
            seen.sweep_at = (seen.tokens.len() * 2).max(1024);
        }
        seen.tokens.insert(token_id.to_vec(), expires_at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_a_replay() {
        let store = MemoryReplayStore::new();
        assert_eq!(store.claim(b"t1", 100, 0), Ok(()));
        assert_eq!(store.claim(b"t1", 100, 50), Err(TokenError::Replayed));
        assert_eq!(store.claim(b"t2", 100, 50), Ok(()));
    }

    #[test]
    fn expired_tokens_are_forgotten_but_live_ones_never() {
        let store = MemoryReplayStore::new();
        for i in 0..2000u32 {
            store.claim(&i.to_be_bytes(), 100, 0).expect("fresh");
        }
        store.claim(b"live", 10_000, 0).expect("fresh");
        // Past the expiry of the first 2000, a sweep drops them.
        for i in 0..2000u32 {
            store.claim(&(i + 1_000_000).to_be_bytes(), 10_000, 500).expect("fresh");
        }
        assert!(store.len() < 3000, "expired ids were swept: {}", store.len());
        assert_eq!(store.claim(b"live", 10_000, 600), Err(TokenError::Replayed));
    }
}
