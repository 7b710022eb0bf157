//! Ed25519 signatures checked together under load.
//!
//! One Ed25519 check is the floor every settlement stands on. Checking n signatures at once
//! (one multi-scalar multiplication, ed25519-dalek's `verify_batch`) costs much less than n
//! single checks, and a loaded gateway holds many tokens waiting at the same moment. So a
//! request that reaches its signature check joins the batch forming on its runtime thread:
//!
//! - The first request to find no batch forming leads one. It yields to the runtime so the
//!   other requests ready on that thread reach their checks and join, and goes on yielding
//!   while the batch keeps growing, at most [`BatchSettings::wait`] and up to
//!   [`BatchSettings::max`] signatures. When one yield brings nobody (an idle gateway) it stops
//!   at once: a lone request is checked alone, without waiting, by ring as before.
//! - The leader checks the batch on its own thread and answers every member. When the batch
//!   fails, each signature is checked alone (ring) to find the bad ones; a bad token never
//!   makes a good one fail, and never passes because it came with good ones.
//! - Each runtime thread forms its own batches, so the checks spread over every core.
//! - A leader whose request is dropped while it waits (its client went away) still checks
//!   the batch, as it drops, so the others are answered.
//!
//! What a batch accepts: every signature ring accepts alone. It may also accept a signature
//! whose nonce point carries a small-order component (the batch equation is multiplied by the
//! cofactor; a single check is not) — a signature only the holder of the issuer's private key
//! can make, so it cannot be forged or altered by anyone else (docs/TOKEN.md).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How batches form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// The most signatures checked at once; 1 turns batching off.
    pub max: usize,
    /// The longest a leader waits for others to join.
    pub wait: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self { max: 64, wait: Duration::from_millis(1) }
    }
}

impl BatchSettings {
    /// Whether signatures are batched at all.
    pub fn enabled(&self) -> bool {
        self.max > 1
    }
}

/// An Ed25519 public key, raw and (when it is a valid point) decompressed for batches.
#[derive(Clone, PartialEq, Eq)]
pub struct Ed25519Key {
    raw: [u8; 32],
    point: Option<ed25519_dalek::VerifyingKey>,
}

impl std::fmt::Debug for Ed25519Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ed25519Key(")?;
        self.raw.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        f.write_str(")")
    }
}

impl Ed25519Key {
    /// A key from its 32 bytes.
    pub fn from_bytes(raw: [u8; 32]) -> Self {
        Self { raw, point: ed25519_dalek::VerifyingKey::from_bytes(&raw).ok() }
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.raw
    }

    /// One signature checked alone (ring).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.raw).verify(message, signature).is_ok()
    }
}

struct Pending {
    key: Ed25519Key,
    message: Vec<u8>,
    signature: [u8; 64],
    answer: oneshot::Sender<bool>,
}

#[derive(Default)]
struct Forming {
    pending: Mutex<Vec<Pending>>,
}

impl Forming {
    fn len(&self) -> usize {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn take(&self) -> Vec<Pending> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

thread_local! {
    static FORMING: Arc<Forming> = Arc::new(Forming::default());
}

/// Checks a signature, in the batch forming on this thread when `settings` allow.
pub async fn verify(key: &Ed25519Key, message: Vec<u8>, signature: &[u8], settings: BatchSettings) -> bool {
    let Ok(signature) = <[u8; 64]>::try_from(signature) else { return false };
    if !settings.enabled() || key.point.is_none() {
        return key.verify(&message, &signature);
    }
    let (answer, answered) = oneshot::channel();
    let forming = FORMING.with(Arc::clone);
    let leads = {
        let mut pending = forming.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.push(Pending { key: key.clone(), message, signature, answer });
        pending.len() == 1
    };
    if leads {
        let mut leader = Leader { forming, armed: true };
        leader.gather(settings).await;
        leader.check();
    }
    answered.await.unwrap_or(false)
}

/// The request leading a batch; checks it when dropped before it could.
struct Leader {
    forming: Arc<Forming>,
    armed: bool,
}

impl Leader {
    async fn gather(&self, settings: BatchSettings) {
        let deadline = Instant::now() + settings.wait;
        let mut seen = 1;
        loop {
            tokio::task::yield_now().await;
            let now = self.forming.len();
            if now == seen || now >= settings.max || Instant::now() >= deadline {
                return;
            }
            seen = now;
        }
    }

    fn check(&mut self) {
        self.armed = false;
        let batch = self.forming.take();
        crate::metrics::signature_batch(batch.len());
        let answers = check_all(&batch);
        for (pending, valid) in batch.into_iter().zip(answers) {
            // A member whose request was dropped no longer listens.
            let _ = pending.answer.send(valid);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.armed {
            self.check();
        }
    }
}

fn check_all(batch: &[Pending]) -> Vec<bool> {
    let items: Vec<(&Ed25519Key, &[u8], &[u8; 64])> =
        batch.iter().map(|p| (&p.key, p.message.as_slice(), &p.signature)).collect();
    verify_together(&items)
}

/// Checks signatures together (one batch), or each alone when the batch fails: the answer for
/// each, in order. The gateway forms its batches with [`verify`]; this is the check itself.
pub fn verify_together(items: &[(&Ed25519Key, &[u8], &[u8; 64])]) -> Vec<bool> {
    let alone = |&(key, message, signature): &(&Ed25519Key, &[u8], &[u8; 64])| key.verify(message, signature);
    if items.len() < 2 {
        return items.iter().map(alone).collect();
    }
    let keys: Option<Vec<ed25519_dalek::VerifyingKey>> = items.iter().map(|(key, ..)| key.point).collect();
    let messages: Vec<&[u8]> = items.iter().map(|(_, message, _)| *message).collect();
    let signatures: Vec<ed25519_dalek::Signature> =
        items.iter().map(|(_, _, signature)| ed25519_dalek::Signature::from_bytes(signature)).collect();
    if keys.is_some_and(|keys| ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok()) {
        return vec![true; items.len()];
    }
    crate::metrics::signature_batch_failed();
    items.iter().map(alone).collect()
}
