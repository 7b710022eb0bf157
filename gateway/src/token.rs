//! E-card tokens: `"EC1:" + base45(zlib(COSE_Sign1(CWT claims)))`, verified offline.
//!
//! Verification order: decode the envelope -> find the key by `kid` (protected header first,
//! then unprotected) -> key revocation -> signature -> claims -> time window (with clock skew)
//! -> key validity ([`KeyValidity`]: now, by default) -> e-card profile (required claims,
//! maximum lifetime, region scope) -> card revocation. Replay is checked separately ([`Verifier::claim_once`]) because
//! inquiries and quotes may reuse a live token; only a settlement consumes it.
//!
//! - [`envelope`]: prefix, base45, zlib, COSE stages.
//! - [`claims`]: CWT claims and the e-card claim.
//! - [`trust`]: the trust list, keys and signature algorithms.
//! - [`batch`]: Ed25519 signatures checked together under load.
//! - [`revocation`], [`replay`]: revoked cards and keys; used token ids.
//! - [`issue`], [`qr`]: issuer tooling: key generation, minting, drawing the QR code.
//! - [`error`]: [`TokenError`] and its stable codes.

pub mod base45;
pub mod batch;
pub mod claims;
pub mod envelope;
pub mod error;
pub mod issue;
pub mod qr;
pub mod replay;
pub mod revocation;
pub mod sm2key;
pub mod trust;

use std::sync::Arc;

use coset::RegisteredLabelWithPrivate;

pub use claims::{Claims, DelegateClaim, ECardClaim};
pub use error::TokenError;
pub use replay::{MemoryReplayStore, ReplayStore};
pub use revocation::RevocationList;
pub use trust::{Algorithm, PublicKey, TrustList, TrustedKey};

/// A token taken apart without checking its signature: for inspection and fuzzing only, never
/// for a decision.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The COSE structure.
    pub cose: coset::CoseSign1,
    /// The claims.
    pub claims: Claims,
    /// The e-card claim, if present and well-formed.
    pub ecard: Option<ECardClaim>,
}

/// Decodes every stage of a payload without verifying it.
pub fn decode_unverified(payload: &str, prefix: &str) -> Result<Decoded, TokenError> {
    let cose = envelope::parse_cose(&envelope::decode(payload, prefix)?)?;
    let claims = Claims::decode(cose.payload.as_deref().unwrap_or_default())?;
    let ecard = claims.ecard().ok();
    Ok(Decoded { cose, claims, ecard })
}

/// Which rules a token is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The e-card profile: `EC1:` tokens with `iss`, `iat`, `exp`, `cti` and the e-card claim,
    /// a bounded lifetime, key region scope and card revocation.
    ECard,
    /// Any COSE_Sign1 CWT (for example `HC1:` certificates): signature and time only.
    Cwt,
}

/// Verification settings.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// The rules.
    pub profile: Profile,
    /// The expected prefix.
    pub prefix: String,
    /// Clock difference tolerated between issuer and gateway, in seconds.
    pub clock_skew_secs: i64,
    /// Longest allowed `exp - iat` for e-card tokens, in seconds (dynamic QR codes live
    /// minutes).
    pub max_lifetime_secs: i64,
    /// At which moment a signing key's validity (its trust entry's or certificate's
    /// `not_before` / `not_after`) is judged.
    pub key_validity: KeyValidity,
}

/// At which moment a signing key must be valid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyValidity {
    /// When the token is verified (the default, as verifiers in the field judge it): a key
    /// whose certificate begins a little after a token's `iat` still verifies it; an expired
    /// key verifies nothing, whatever `iat` a token claims.
    #[default]
    Verification,
    /// When the token says it was issued (`iat`; the verification time when it has none).
    Issue,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            profile: Profile::ECard,
            prefix: envelope::ECARD_PREFIX.to_owned(),
            clock_skew_secs: 60,
            max_lifetime_secs: 600,
            key_validity: KeyValidity::default(),
        }
    }
}

/// A token that verified.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The key id that signed it.
    pub kid: Vec<u8>,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// Its claims.
    pub claims: Claims,
    /// The e-card claim (e-card profile only).
    pub ecard: Option<ECardClaim>,
}

/// Verifies tokens against a trust list and a revocation list.
#[derive(Debug, Clone)]
pub struct Verifier {
    trust: Arc<TrustList>,
    revocations: Arc<RevocationList>,
    options: VerifyOptions,
}

impl Verifier {
    /// A verifier.
    pub fn new(trust: Arc<TrustList>, revocations: Arc<RevocationList>, options: VerifyOptions) -> Self {
        Self { trust, revocations, options }
    }

    /// Whether a card is revoked (for settlements by quote, after the token was checked).
    pub fn card_revoked(&self, card_id: &str) -> bool {
        self.revocations.card_revoked(card_id)
    }

    /// The settings.
    pub fn options(&self) -> &VerifyOptions {
        &self.options
    }

    /// Verifies a QR payload at `now` (seconds since the epoch).
    pub fn verify(&self, payload: &str, now: i64) -> Result<Verified, TokenError> {
        let opened = self.open(payload)?;
        let key = signing_key(opened.candidates, opened.algorithm, &opened.cose.tbs_data(b""), &opened.cose.signature)?;
        self.accept(opened, key, now)
    }

    /// [`Self::verify`], with an Ed25519 signature checked in the batch forming on this
    /// runtime thread ([`batch`]): the same answers, less CPU under load.
    pub async fn verify_batched(
        &self,
        payload: &str,
        now: i64,
        settings: batch::BatchSettings,
    ) -> Result<Verified, TokenError> {
        let opened = self.open(payload)?;
        let key = match opened.candidates {
            [key] if settings.enabled() && opened.algorithm == Algorithm::EdDsa => match &key.key {
                PublicKey::Ed25519(ed25519) => {
                    let message = opened.cose.tbs_data(b"");
                    if !batch::verify(ed25519, message, &opened.cose.signature, settings).await {
                        return Err(TokenError::SignatureInvalid);
                    }
                    key
                }
                _ => return Err(wrong_algorithm(opened.algorithm)),
            },
            candidates => {
                signing_key(candidates, opened.algorithm, &opened.cose.tbs_data(b""), &opened.cose.signature)?
            }
        };
        self.accept(opened, key, now)
    }

    /// Decodes a payload and finds the keys that may have signed it.
    fn open<'a>(&'a self, payload: &str) -> Result<Opened<'a>, TokenError> {
        let cose = envelope::parse_cose(&envelope::decode(payload, &self.options.prefix)?)?;
        let algorithm = token_algorithm(&cose)?;
        // The protected key id wins; the unprotected one counts only when there is none.
        let kid = if cose.protected.header.key_id.is_empty() {
            &cose.unprotected.key_id
        } else {
            &cose.protected.header.key_id
        };
        let candidates = self.trust.keys_for(kid);
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey);
        }
        if self.revocations.key_revoked(kid) {
            return Err(TokenError::KeyRevoked);
        }
        if cose.payload.is_none() {
            return Err(TokenError::malformed("COSE_Sign1 without payload"));
        }
        let kid = kid.clone();
        Ok(Opened { cose, algorithm, kid, candidates })
    }

    /// The checks after the signature.
    fn accept(&self, opened: Opened<'_>, key: &TrustedKey, now: i64) -> Result<Verified, TokenError> {
        let claims = Claims::decode(opened.cose.payload.as_deref().unwrap_or_default())?;
        self.check_time(&claims, now)?;
        let (moment, when) = match self.options.key_validity {
            KeyValidity::Verification => (now, "now"),
            KeyValidity::Issue => (claims.issued_at.unwrap_or(now), "when the token was issued"),
        };
        if !key.valid_at(moment) {
            return Err(TokenError::KeyOutOfScope(format!("the key is not valid {when}")));
        }
        let ecard = match self.options.profile {
            Profile::Cwt => None,
            Profile::ECard => Some(self.check_ecard(&claims, key)?),
        };
        Ok(Verified { kid: opened.kid, algorithm: opened.algorithm, claims, ecard })
    }

    /// Consumes a verified token: the first call succeeds, any later one (with the same store)
    /// is [`TokenError::Replayed`].
    pub fn claim_once(&self, verified: &Verified, store: &dyn ReplayStore, now: i64) -> Result<(), TokenError> {
        let token_id =
            verified.claims.token_id.as_deref().ok_or_else(|| TokenError::ProfileInvalid("no cti".into()))?;
        let forget_after = verified.claims.expires_at.unwrap_or(i64::MAX).saturating_add(self.options.clock_skew_secs);
        store.claim(token_id, forget_after, now)
    }

    fn check_time(&self, claims: &Claims, now: i64) -> Result<(), TokenError> {
        let skew = self.options.clock_skew_secs;
        if claims.expires_at.is_some_and(|exp| now >= exp.saturating_add(skew)) {
            return Err(TokenError::Expired);
        }
        let starts = claims.not_before.into_iter().chain(claims.issued_at);
        if starts.into_iter().any(|t| now.saturating_add(skew) < t) {
            return Err(TokenError::NotYetValid);
        }
        Ok(())
    }

    fn check_ecard(&self, claims: &Claims, key: &TrustedKey) -> Result<ECardClaim, TokenError> {
        let missing = |c: &str| TokenError::ProfileInvalid(format!("required claim `{c}` is missing"));
        claims.issuer.as_ref().ok_or_else(|| missing("iss"))?;
        claims.token_id.as_ref().filter(|c| !c.is_empty()).ok_or_else(|| missing("cti"))?;
        let iat = claims.issued_at.ok_or_else(|| missing("iat"))?;
        let exp = claims.expires_at.ok_or_else(|| missing("exp"))?;
        let lifetime = exp.saturating_sub(iat);
        if lifetime <= 0 || lifetime > self.options.max_lifetime_secs {
            return Err(TokenError::ProfileInvalid(format!(
                "lifetime of {lifetime} s is outside 1..={} s",
                self.options.max_lifetime_secs
            )));
        }
        let ecard = claims.ecard()?;
        if !key.covers_region(&ecard.insured_region) {
            return Err(TokenError::KeyOutOfScope("the key may not issue for this insured region".into()));
        }
        if self.revocations.card_revoked(&ecard.card_id) {
            return Err(TokenError::CardRevoked);
        }
        Ok(ecard)
    }
}

/// The algorithm: from the protected header, else from the unprotected one. Taking it from the
/// unprotected bucket is safe because a key verifies only with its own algorithm: swapping the
/// label cannot make another algorithm apply.
fn token_algorithm(cose: &coset::CoseSign1) -> Result<Algorithm, TokenError> {
    let label = cose.protected.header.alg.as_ref().or(cose.unprotected.alg.as_ref());
    let id = match label {
        Some(RegisteredLabelWithPrivate::Assigned(alg)) => *alg as i64,
        Some(RegisteredLabelWithPrivate::PrivateUse(id)) => *id,
        Some(RegisteredLabelWithPrivate::Text(_)) | None => {
            return Err(TokenError::malformed("no algorithm in the header"));
        }
    };
    Algorithm::from_cose_id(id).ok_or_else(|| TokenError::malformed(format!("unsupported algorithm {id}")))
}

/// A decoded token and the keys that may have signed it, before its signature is checked.
struct Opened<'a> {
    cose: coset::CoseSign1,
    algorithm: Algorithm,
    kid: Vec<u8>,
    candidates: &'a [TrustedKey],
}

fn wrong_algorithm(algorithm: Algorithm) -> TokenError {
    TokenError::KeyOutOfScope(format!("the token uses {algorithm}, the key another algorithm"))
}

/// The candidate key that verifies the signature.
fn signing_key<'a>(
    candidates: &'a [TrustedKey],
    algorithm: Algorithm,
    message: &[u8],
    signature: &[u8],
) -> Result<&'a TrustedKey, TokenError> {
    let mut same_algorithm = candidates.iter().filter(|k| k.key.algorithm() == algorithm).peekable();
    if same_algorithm.peek().is_none() {
        return Err(wrong_algorithm(algorithm));
    }
    same_algorithm.find(|k| k.key.verify(message, signature)).ok_or(TokenError::SignatureInvalid)
}
