//! Random bytes for values that are public once made — AES-GCM nonces, settlement and request
//! ids — drawn from the operating system's generator a block at a time.
//!
//! Why: every settlement needs four such values (its request id, its id, the nonces of its
//! sealed request and receipt); one `getrandom` system call each cost ~1% of a settlement's CPU
//! under load (docs/BENCHMARKS.md, thirteenth round). Each thread keeps what one call to the
//! system's generator ([`ring::rand::SystemRandom`]) gave and hands it out in order, never
//! twice. The bytes are the system's own; nothing here generates randomness.
//!
//! Not for secrets (keys, key material): a block's unused bytes stay in memory until they are
//! handed out, and whoever reads this process's memory then knows the next nonces. That is
//! harmless for values that are stored or sent in the clear anyway, and wrong for a key —
//! keys come from `SystemRandom` directly.

use std::cell::RefCell;

use ring::rand::{SecureRandom, SystemRandom};

/// How many bytes one system call fetches: 16 settlements' worth.
const BLOCK: usize = 512;

struct Pool {
    bytes: [u8; BLOCK],
    /// How many of `bytes` were handed out already (all of them when nothing was fetched yet).
    used: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { bytes: [0; BLOCK], used: BLOCK }) };
}

/// Fills `out` with random bytes from the system's generator; an error only if it fails.
pub fn fill(out: &mut [u8]) -> Result<(), ring::error::Unspecified> {
    if out.len() > BLOCK / 4 {
        return SystemRandom::new().fill(out);
    }
    let drawn = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.used + out.len() > BLOCK {
            SystemRandom::new().fill(&mut pool.bytes)?;
            pool.used = 0;
        }
        let start = pool.used;
        out.copy_from_slice(&pool.bytes[start..start + out.len()]);
        // Handed out once: what is left in the block is only what no one has had.
        pool.bytes[start..start + out.len()].fill(0);
        pool.used += out.len();
        Ok(())
    });
    // The thread is ending (its pool is gone): ask the system directly.
    drawn.unwrap_or_else(|_| SystemRandom::new().fill(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_two_draws_are_the_same_within_and_across_blocks_and_threads() {
        let draw = || {
            (0..200).map(|_| {
                let mut nonce = [0u8; 12];
                fill(&mut nonce).expect("random");
                nonce
            })
        };
        let mut seen: Vec<[u8; 12]> = draw().collect();
        seen.extend(std::thread::spawn(move || draw().collect::<Vec<_>>()).join().expect("thread"));
        // 400 nonces: several blocks on each of two threads.
        let distinct: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(distinct.len(), seen.len(), "a nonce was handed out twice");
        assert!(seen.iter().all(|n| n != &[0u8; 12]), "a nonce of zeroes (a byte handed out twice)");
    }

    #[test]
    fn large_requests_go_to_the_system_directly() {
        let used = || POOL.with(|pool| pool.borrow().used);
        let mut nonce = [0u8; 12];
        fill(&mut nonce).expect("random");
        let before = used();
        let mut key = [0u8; 256];
        fill(&mut key).expect("random");
        assert_ne!(key, [0u8; 256]);
        assert_eq!(used(), before, "a large request took bytes from the block");
        fill(&mut nonce).expect("random");
        assert_eq!(used(), before + 12, "a small one takes them from the block");
    }
}
