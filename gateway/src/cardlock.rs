//! Per-card serialisation of the money path.
//!
//! A card's settlements and reversals read its year-to-date accumulators, ask the payers, and
//! record the change. Two of them interleaved would both run their payers on the same figures
//! and together spend the account (or the deductible) twice. So each takes the card's lock
//! before it reads and holds it until its outcome is durable; quotes and inquiries read freely.
//!
//! The lock is one process's; the ledger's conditional commit (an outcome is recorded only if
//! the accumulators are still what its payers were given) keeps the guarantee across restarts
//! and across processes sharing a ledger.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The locks of the cards being settled now; an entry lives while someone holds or waits for it.
#[derive(Debug, Default)]
pub struct CardLocks {
    held: Mutex<HashMap<Vec<u8>, Entry>>,
}

/// A card's lock and how many hold it or wait for it.
#[derive(Debug, Default)]
struct Entry {
    mutex: Arc<tokio::sync::Mutex<()>>,
    users: usize,
}

/// A card's lock, held until dropped.
#[derive(Debug)]
pub struct CardGuard {
    locks: Arc<CardLocks>,
    card_hash: Vec<u8>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl CardLocks {
    /// Waits for the card's lock (cards are keyed by their hash).
    pub async fn lock(self: &Arc<Self>, card_hash: &[u8]) -> CardGuard {
        let mutex = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let entry = held.entry(card_hash.to_vec()).or_default();
            entry.users += 1;
            Arc::clone(&entry.mutex)
        };
        // Made before the wait: a waiter whose request is dropped still counts itself out.
        let mut guard = CardGuard { locks: Arc::clone(self), card_hash: card_hash.to_vec(), guard: None };
        guard.guard = Some(mutex.lock_owned().await);
        guard
    }

    /// Cards with a holder or a waiter now.
    pub fn len(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no card is locked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for CardGuard {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = held.get_mut(&self.card_hash) {
            entry.users -= 1;
            if entry.users == 0 {
                held.remove(&self.card_hash);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_per_card_and_entries_go_when_released() {
        let locks = Arc::new(CardLocks::default());
        let first = locks.lock(b"card-a").await;
        let other = locks.lock(b"card-b").await;
        assert_eq!(locks.len(), 2);
        let waiting = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move { locks.lock(b"card-a").await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "a second holder of the same card must wait");
        drop(first);
        let second = waiting.await.expect("the waiter gets the lock");
        drop(second);
        drop(other);
        assert!(locks.is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_no_entry() {
        let locks = Arc::new(CardLocks::default());
        let held = locks.lock(b"card").await;
        let waiting = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move { locks.lock(b"card").await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        waiting.abort();
        let _ = waiting.await;
        drop(held);
        assert!(locks.is_empty());
    }
}
