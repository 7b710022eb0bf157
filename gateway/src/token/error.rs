//! Why a token was refused, each reason with the stable code the API returns.

/// A refused token. The message is safe to show a client: it never contains the token or a
/// card id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The payload does not decode: prefix, base45, zlib, CBOR, COSE or claims structure.
    #[error("{0}")]
    Malformed(String),
    /// The claims decode but break the e-card profile (missing claim, lifetime too long).
    #[error("{0}")]
    ProfileInvalid(String),
    /// No trusted key has the token's key id.
    #[error("no trusted key with this key id")]
    UnknownKey,
    /// The signing key is revoked.
    #[error("the signing key is revoked")]
    KeyRevoked,
    /// The key may not sign this token: outside its validity dates, its regions, or for
    /// another algorithm.
    #[error("{0}")]
    KeyOutOfScope(String),
    /// The signature does not verify.
    #[error("the signature does not verify")]
    SignatureInvalid,
    /// Past the expiry (beyond the allowed clock skew).
    #[error("the token expired")]
    Expired,
    /// Before its issue time or not-before time (beyond the allowed clock skew).
    #[error("the token is not yet valid")]
    NotYetValid,
    /// The card is revoked.
    #[error("the card is revoked")]
    CardRevoked,
    /// The token was already used to settle a bill.
    #[error("the token was already used")]
    Replayed,
}

impl TokenError {
    /// The stable problem code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "token_malformed",
            Self::ProfileInvalid(_) => "token_profile_invalid",
            Self::UnknownKey => "unknown_key",
            Self::KeyRevoked => "key_revoked",
            Self::KeyOutOfScope(_) => "key_out_of_scope",
            Self::SignatureInvalid => "token_signature_invalid",
            Self::Expired => "token_expired",
            Self::NotYetValid => "token_not_yet_valid",
            Self::CardRevoked => "card_revoked",
            Self::Replayed => "token_replayed",
        }
    }

    pub(crate) fn malformed(what: impl std::fmt::Display) -> Self {
        Self::Malformed(what.to_string())
    }
}
