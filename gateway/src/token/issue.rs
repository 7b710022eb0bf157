//! Issuer tooling: generate signing keys and mint e-card tokens.
//!
//! Keys are PKCS#8 PEM (private) and SubjectPublicKeyInfo PEM (public), so any standard tool
//! can read them. Ed25519, ES256, ES384 and PS256 sign with ring; SM2 with the `sm2` crate (RustCrypto).
//! Only RSA key generation, which ring does not offer, uses the `rsa` crate.

use coset::{CoseSign1Builder, HeaderBuilder, TaggedCborSerializable, iana};
use pkcs8::der::Decode;
use pkcs8::{EncodePrivateKey, EncodePublicKey, ObjectIdentifier, PrivateKeyInfo};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, EcdsaSigningAlgorithm,
    Ed25519KeyPair, KeyPair, RSA_PSS_SHA256, RsaKeyPair,
};

use super::claims::{self, ECardClaim};
use super::envelope;
use super::trust::{Algorithm, SM2_DIST_ID};

/// Why a key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The key file is not a PKCS#8 private key of a supported algorithm.
    #[error("private key: {0}")]
    BadKey(String),
    /// Key generation or signing failed.
    #[error("crypto: {0}")]
    Crypto(String),
}

/// A freshly generated key pair.
#[derive(Debug)]
pub struct GeneratedKey {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// PKCS#8 PEM private key.
    pub private_pem: String,
    /// SubjectPublicKeyInfo PEM public key.
    pub public_pem: String,
}

const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_SM2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.301");
const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// DER prefixes of SubjectPublicKeyInfo for raw Ed25519, P-256 and P-384 keys.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const P384_SPKI_PREFIX: [u8; 23] = [
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81, 0x04, 0x00,
    0x22, 0x03, 0x62, 0x00,
];

/// A new ECDSA key pair: PKCS#8 DER and SubjectPublicKeyInfo DER.
fn generate_ecdsa(
    signing: &'static EcdsaSigningAlgorithm,
    spki_prefix: &[u8],
    rng: &SystemRandom,
) -> Result<(Vec<u8>, Vec<u8>), IssueError> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, rng).map_err(crypto)?;
    let pair = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), rng).map_err(crypto)?;
    Ok((pkcs8.as_ref().to_vec(), [spki_prefix, pair.public_key().as_ref()].concat()))
}

fn crypto(e: impl std::fmt::Display) -> IssueError {
    IssueError::Crypto(e.to_string())
}

fn pem(label: &str, der: &[u8]) -> Result<String, IssueError> {
    spki::der::pem::encode_string(label, spki::der::pem::LineEnding::LF, der).map_err(crypto)
}

/// Generates a key pair.
pub fn generate(algorithm: Algorithm) -> Result<GeneratedKey, IssueError> {
    let rng = SystemRandom::new();
    let (private_der, public_der) = match algorithm {
        Algorithm::EdDsa => {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(crypto)?;
            let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(crypto)?;
            (pkcs8.as_ref().to_vec(), [&ED25519_SPKI_PREFIX[..], pair.public_key().as_ref()].concat())
        }
        Algorithm::Es256 => generate_ecdsa(&ECDSA_P256_SHA256_FIXED_SIGNING, &P256_SPKI_PREFIX, &rng)?,
        Algorithm::Es384 => generate_ecdsa(&ECDSA_P384_SHA384_FIXED_SIGNING, &P384_SPKI_PREFIX, &rng)?,
        Algorithm::Ps256 => {
            let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).map_err(crypto)?;
            let private = key.to_pkcs8_der().map_err(crypto)?.as_bytes().to_vec();
            let public = key.to_public_key().to_public_key_der().map_err(crypto)?.into_vec();
            (private, public)
        }
        Algorithm::Sm2Sm3 => {
            let key = sm2::SecretKey::random(&mut rand_core::OsRng);
            let private = key.to_pkcs8_der().map_err(crypto)?.as_bytes().to_vec();
            let public = key.public_key().to_public_key_der().map_err(crypto)?.into_vec();
            (private, public)
        }
    };
    Ok(GeneratedKey {
        algorithm,
        private_pem: pem("PRIVATE KEY", &private_der)?,
        public_pem: pem("PUBLIC KEY", &public_der)?,
    })
}

/// A private key that signs tokens.
pub struct SigningKey {
    algorithm: Algorithm,
    inner: Inner,
}

enum Inner {
    Ed25519(Ed25519KeyPair),
    Ecdsa(EcdsaKeyPair),
    Rsa(RsaKeyPair),
    Sm2(sm2::dsa::SigningKey),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.algorithm)
    }
}

impl SigningKey {
    /// Reads a PKCS#8 PEM private key; the algorithm follows from the key.
    pub fn from_pkcs8_pem(text: &str) -> Result<Self, IssueError> {
        let (label, der) =
            spki::der::pem::decode_vec(text.trim().as_bytes()).map_err(|e| IssueError::BadKey(e.to_string()))?;
        if label != "PRIVATE KEY" {
            return Err(IssueError::BadKey(format!("PEM label is `{label}`, expected `PRIVATE KEY` (PKCS#8)")));
        }
        Self::from_pkcs8_der(&der)
    }

    /// Reads a PKCS#8 DER private key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, IssueError> {
        let bad = |e: &dyn std::fmt::Display| IssueError::BadKey(e.to_string());
        let info = PrivateKeyInfo::from_der(der).map_err(|e| bad(&e))?;
        let (algorithm, inner) = match (info.algorithm.oid, info.algorithm.parameters_oid().ok()) {
            (OID_ED25519, _) => (
                Algorithm::EdDsa,
                Inner::Ed25519(Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(|e| bad(&e))?),
            ),
            (OID_EC_PUBLIC_KEY, Some(OID_P256)) => {
                let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new());
                (Algorithm::Es256, Inner::Ecdsa(pair.map_err(|e| bad(&e))?))
            }
            (OID_EC_PUBLIC_KEY, Some(OID_P384)) => {
                let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, der, &SystemRandom::new());
                (Algorithm::Es384, Inner::Ecdsa(pair.map_err(|e| bad(&e))?))
            }
            (OID_EC_PUBLIC_KEY, Some(OID_SM2)) => {
                use pkcs8::DecodePrivateKey;
                let secret = sm2::SecretKey::from_pkcs8_der(der).map_err(|e| bad(&e))?;
                let key = sm2::dsa::SigningKey::new(SM2_DIST_ID, &secret).map_err(|e| bad(&e))?;
                (Algorithm::Sm2Sm3, Inner::Sm2(key))
            }
            (OID_RSA, _) => (Algorithm::Ps256, Inner::Rsa(RsaKeyPair::from_pkcs8(der).map_err(|e| bad(&e))?)),
            (oid, _) => return Err(IssueError::BadKey(format!("unsupported key algorithm {oid}"))),
        };
        Ok(Self { algorithm, inner })
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Signs a message (COSE signature format: raw `r || s` for the elliptic curves).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, IssueError> {
        let rng = SystemRandom::new();
        match &self.inner {
            Inner::Ed25519(pair) => Ok(pair.sign(message).as_ref().to_vec()),
            Inner::Ecdsa(pair) => Ok(pair.sign(&rng, message).map_err(crypto)?.as_ref().to_vec()),
            Inner::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(&RSA_PSS_SHA256, &rng, message, &mut signature).map_err(crypto)?;
                Ok(signature)
            }
            Inner::Sm2(key) => {
                use sm2::dsa::signature::Signer;
                let signature: sm2::dsa::Signature = key.try_sign(message).map_err(crypto)?;
                Ok(signature.to_bytes().to_vec())
            }
        }
    }
}

/// What to put in a token.
#[derive(Debug, Clone)]
pub struct MintRequest {
    /// `iss`.
    pub issuer: String,
    /// The key id placed in the protected header.
    pub kid: Vec<u8>,
    /// `iat`, seconds since the epoch.
    pub issued_at: i64,
    /// Lifetime: `exp = iat + ttl`.
    pub ttl_secs: i64,
    /// `cti`; random 16 bytes when `None`.
    pub token_id: Option<Vec<u8>>,
    /// The e-card claim.
    pub ecard: ECardClaim,
}

/// Mints a token: the QR text, `EC1:...`.
pub fn mint(key: &SigningKey, request: &MintRequest) -> Result<String, IssueError> {
    let token_id = match &request.token_id {
        Some(id) => id.clone(),
        None => {
            let mut id = vec![0; 16];
            SystemRandom::new().fill(&mut id).map_err(crypto)?;
            id
        }
    };
    let payload = claims::encode(
        &request.issuer,
        request.issued_at,
        request.issued_at.saturating_add(request.ttl_secs),
        &token_id,
        &request.ecard,
    );
    let alg = match key.algorithm() {
        Algorithm::EdDsa => coset::Algorithm::Assigned(iana::Algorithm::EdDSA),
        Algorithm::Es256 => coset::Algorithm::Assigned(iana::Algorithm::ES256),
        Algorithm::Es384 => coset::Algorithm::Assigned(iana::Algorithm::ES384),
        Algorithm::Ps256 => coset::Algorithm::Assigned(iana::Algorithm::PS256),
        Algorithm::Sm2Sm3 => coset::Algorithm::PrivateUse(super::trust::SM2_SM3_COSE_ALG),
    };
    let mut protected = HeaderBuilder::new().key_id(request.kid.clone()).build();
    protected.alg = Some(alg);
    let sign1 = CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .try_create_signature(b"", |tbs| key.sign(tbs))?
        .build();
    let cose = sign1.to_tagged_vec().map_err(|e| crypto(format!("{e:?}")))?;
    Ok(envelope::encode(&cose, envelope::ECARD_PREFIX))
}
