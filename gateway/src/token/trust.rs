//! The trust list: the issuer keys tokens may be signed with, and signature verification.
//!
//! A trust list is a JSON file `{"keys": [entry, ...]}`. Each entry has a `kid` (base64;
//! optional when a `certificate` is given, then the first 8 bytes of SHA-256 of the
//! certificate's DER), an optional `alg`, and either `certificate` (base64 DER X.509) or
//! `public_key` (PEM SubjectPublicKeyInfo). Optional `not_before` / `not_after` (RFC 3339; for a
//! certificate, its own validity by default) bound when the key may have issued a token, and
//! optional `regions` (administrative division code prefixes) bound which insured regions it
//! may issue for.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use serde::Deserialize;
use spki::der::{Decode, Encode};
use spki::{ObjectIdentifier, SubjectPublicKeyInfoRef};

use super::batch::Ed25519Key;
use super::sm2key::Sm2Key;

/// The signature algorithms a token may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Ed25519 (COSE `EdDSA`, -8).
    EdDsa,
    /// ECDSA P-256 with SHA-256 (COSE `ES256`, -7).
    Es256,
    /// ECDSA P-384 with SHA-384 (COSE `ES384`, -35).
    Es384,
    /// RSASSA-PSS with SHA-256, 2048 to 8192 bits (COSE `PS256`, -37).
    Ps256,
    /// SM2 with SM3 (GB/T 32918, GM/T 0003), private-use COSE algorithm [`SM2_SM3_COSE_ALG`].
    Sm2Sm3,
}

/// The private-use COSE algorithm id cardgate gives SM2-with-SM3 signatures.
pub const SM2_SM3_COSE_ALG: i64 = -65538;

/// The SM2 distinguishing identifier (GM/T 0009 default) used in every SM2 signature.
pub const SM2_DIST_ID: &str = "1234567812345678";

impl Algorithm {
    /// Every algorithm.
    pub const ALL: [Algorithm; 5] = [Self::EdDsa, Self::Es256, Self::Es384, Self::Ps256, Self::Sm2Sm3];

    /// The COSE algorithm id.
    pub fn cose_id(self) -> i64 {
        match self {
            Self::EdDsa => -8,
            Self::Es256 => -7,
            Self::Es384 => -35,
            Self::Ps256 => -37,
            Self::Sm2Sm3 => SM2_SM3_COSE_ALG,
        }
    }

    /// The algorithm with a COSE id, if supported.
    pub fn from_cose_id(id: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.cose_id() == id)
    }

    /// The name used in trust lists and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::EdDsa => "EdDSA",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Ps256 => "PS256",
            Self::Sm2Sm3 => "SM2",
        }
    }

    /// Parses a name (case-insensitive; `Ed25519` and `SM2-SM3` are accepted too).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "EDDSA" | "ED25519" => Some(Self::EdDsa),
            "ES256" => Some(Self::Es256),
            "ES384" => Some(Self::Es384),
            "PS256" => Some(Self::Ps256),
            "SM2" | "SM2-SM3" | "SM2SM3" => Some(Self::Sm2Sm3),
            _ => None,
        }
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_SM2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.156.10197.1.301");
const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_RSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");

/// A public key ready to verify signatures.
#[derive(Clone)]
pub enum PublicKey {
    /// Ed25519 key.
    Ed25519(Box<Ed25519Key>),
    /// Uncompressed SEC1 P-256 point.
    P256(Vec<u8>),
    /// Uncompressed SEC1 P-384 point.
    P384(Vec<u8>),
    /// PKCS#1 RSAPublicKey DER.
    Rsa(Vec<u8>),
    /// SM2 key with the distinguishing identifier already hashed in and its precomputed table.
    Sm2(Box<Sm2Key>),
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.algorithm())
    }
}

impl PublicKey {
    /// Parses a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, String> {
        let spki = SubjectPublicKeyInfoRef::from_der(der).map_err(|e| format!("not a public key: {e}"))?;
        let bits = spki.subject_public_key.as_bytes().ok_or("public key bits are not whole bytes")?.to_vec();
        match spki.algorithm.oid {
            OID_ED25519 => Self::ed25519(&bits),
            OID_EC_PUBLIC_KEY => match spki.algorithm.parameters_oid() {
                Ok(OID_P256) if bits.len() == 65 && bits[0] == 4 => Ok(Self::P256(bits)),
                Ok(OID_P256) => Err("P-256 key is not an uncompressed point".into()),
                Ok(OID_P384) if bits.len() == 97 && bits[0] == 4 => Ok(Self::P384(bits)),
                Ok(OID_P384) => Err("P-384 key is not an uncompressed point".into()),
                Ok(OID_SM2) => Self::sm2_from_sec1(&bits, SM2_DIST_ID),
                Ok(curve) => Err(format!("unsupported elliptic curve {curve}")),
                Err(e) => Err(format!("elliptic curve key without a named curve: {e}")),
            },
            OID_RSA | OID_RSA_PSS => Ok(Self::Rsa(bits)),
            oid => Err(format!("unsupported key algorithm {oid}")),
        }
    }

    /// An Ed25519 key from its 32 bytes.
    pub fn ed25519(bytes: &[u8]) -> Result<Self, String> {
        let raw = <[u8; 32]>::try_from(bytes).map_err(|_| "Ed25519 key is not 32 bytes")?;
        Ok(Self::Ed25519(Box::new(Ed25519Key::from_bytes(raw))))
    }

    /// An SM2 key from its SEC1 point, with a distinguishing identifier (tokens use
    /// [`SM2_DIST_ID`]).
    pub fn sm2_from_sec1(point: &[u8], dist_id: &str) -> Result<Self, String> {
        Sm2Key::from_sec1(point, dist_id).map(|k| Self::Sm2(Box::new(k)))
    }

    /// Parses a PEM `PUBLIC KEY`.
    pub fn from_spki_pem(pem: &str) -> Result<Self, String> {
        let (label, der) = spki::der::pem::decode_vec(pem.trim().as_bytes()).map_err(|e| format!("bad PEM: {e}"))?;
        if label != "PUBLIC KEY" {
            return Err(format!("PEM label is `{label}`, expected `PUBLIC KEY`"));
        }
        Self::from_spki_der(&der)
    }

    /// The algorithm this key signs with.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Self::Ed25519(_) => Algorithm::EdDsa,
            Self::P256(_) => Algorithm::Es256,
            Self::P384(_) => Algorithm::Es384,
            Self::Rsa(_) => Algorithm::Ps256,
            Self::Sm2(_) => Algorithm::Sm2Sm3,
        }
    }

    /// Whether `signature` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        use ring::signature::{
            ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, RSA_PSS_2048_8192_SHA256, UnparsedPublicKey,
        };
        match self {
            Self::Ed25519(key) => key.verify(message, signature),
            Self::P256(key) => UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key).verify(message, signature).is_ok(),
            Self::P384(key) => UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, key).verify(message, signature).is_ok(),
            Self::Rsa(key) => UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA256, key).verify(message, signature).is_ok(),
            Self::Sm2(key) => key.verify(message, signature),
        }
    }
}

/// One trusted issuer key.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    /// Key id, as it appears in token headers.
    pub kid: Vec<u8>,
    /// The key.
    pub key: PublicKey,
    /// When the key's validity begins (seconds since the epoch).
    pub not_before: Option<i64>,
    /// When the key's validity ends.
    pub not_after: Option<i64>,
    /// Insured-region prefixes this key may issue for; empty means any.
    pub regions: Vec<String>,
}

impl TrustedKey {
    /// Whether the key is valid at `moment` (the verification time or a token's issue time:
    /// [`super::KeyValidity`]).
    pub fn valid_at(&self, moment: i64) -> bool {
        self.not_before.is_none_or(|t| moment >= t) && self.not_after.is_none_or(|t| moment <= t)
    }

    /// Whether the key may issue for `region`.
    pub fn covers_region(&self, region: &str) -> bool {
        self.regions.is_empty() || self.regions.iter().any(|prefix| region.starts_with(prefix.as_str()))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    keys: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    kid: Option<String>,
    alg: Option<String>,
    certificate: Option<String>,
    public_key: Option<String>,
    not_before: Option<String>,
    not_after: Option<String>,
    #[serde(default)]
    regions: Vec<String>,
}

/// The trusted keys, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustList {
    keys: HashMap<Vec<u8>, Vec<TrustedKey>>,
}

/// Decodes base64 in the standard or URL-safe alphabet, padded or not.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    let text = text.trim();
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD].iter().find_map(|e| e.decode(text).ok())
}

/// Parses an RFC 3339 timestamp into seconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok().map(|t| t.unix_timestamp())
}

impl TrustList {
    /// A trust list of the given keys.
    pub fn from_keys(keys: impl IntoIterator<Item = TrustedKey>) -> Self {
        let mut list = Self::default();
        for key in keys {
            list.keys.entry(key.kid.clone()).or_default().push(key);
        }
        list
    }

    /// Parses a trust list, reporting every bad entry (`keys[i]: reason`).
    pub fn from_json(text: &str) -> Result<Self, Vec<String>> {
        let file: TrustFile = serde_json::from_str(text).map_err(|e| vec![format!("trust list: {e}")])?;
        let mut keys = Vec::new();
        let mut problems = Vec::new();
        for (index, entry) in file.keys.into_iter().enumerate() {
            match entry.build() {
                Ok(key) => keys.push(key),
                Err(reason) => problems.push(format!("keys[{index}]: {reason}")),
            }
        }
        if problems.is_empty() { Ok(Self::from_keys(keys)) } else { Err(problems) }
    }

    /// Reads and parses a trust list file.
    pub fn load(path: &Path) -> Result<Self, Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        Self::from_json(&text).map_err(|p| p.into_iter().map(|m| format!("{}: {m}", path.display())).collect())
    }

    /// The keys with a key id (usually one).
    pub fn keys_for(&self, kid: &[u8]) -> &[TrustedKey] {
        self.keys.get(kid).map_or(&[], Vec::as_slice)
    }

    /// How many keys the list holds.
    pub fn len(&self) -> usize {
        self.keys.values().map(Vec::len).sum()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl Entry {
    fn build(self) -> Result<TrustedKey, String> {
        let (key, cert_kid, cert_validity) = match (&self.certificate, &self.public_key) {
            (Some(cert), None) => {
                let der = decode_base64(cert).ok_or("certificate: not base64")?;
                let (key, validity) = certificate_key(&der)?;
                let digest = ring::digest::digest(&ring::digest::SHA256, &der);
                (key, Some(digest.as_ref()[..8].to_vec()), Some(validity))
            }
            (None, Some(pem)) => (PublicKey::from_spki_pem(pem).map_err(|e| format!("public_key: {e}"))?, None, None),
            _ => return Err("give exactly one of `certificate` and `public_key`".into()),
        };
        let kid = match (&self.kid, cert_kid) {
            (Some(kid), _) => decode_base64(kid).filter(|k| !k.is_empty()).ok_or("kid: not base64")?,
            (None, Some(kid)) => kid,
            (None, None) => return Err("kid: required with `public_key`".into()),
        };
        if let Some(name) = &self.alg {
            let alg = Algorithm::from_name(name).ok_or_else(|| format!("alg: unknown algorithm `{name}`"))?;
            if alg != key.algorithm() {
                return Err(format!("alg: `{name}` does not match the {} key", key.algorithm()));
            }
        }
        let time = |field: &str, text: &Option<String>| -> Result<Option<i64>, String> {
            text.as_deref().map(|t| parse_rfc3339(t).ok_or(format!("{field}: not an RFC 3339 time"))).transpose()
        };
        let (cert_from, cert_to) = cert_validity.unzip();
        let regions_ok =
            self.regions.iter().all(|r| !r.is_empty() && r.len() <= 6 && r.bytes().all(|b| b.is_ascii_digit()));
        if !regions_ok {
            return Err("regions: each must be 1 to 6 digits".into());
        }
        Ok(TrustedKey {
            kid,
            key,
            not_before: time("not_before", &self.not_before)?.or(cert_from),
            not_after: time("not_after", &self.not_after)?.or(cert_to),
            regions: self.regions,
        })
    }
}

/// The public key and validity (seconds since the epoch) of a DER X.509 certificate.
fn certificate_key(der: &[u8]) -> Result<(PublicKey, (i64, i64)), String> {
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| format!("certificate: not X.509: {e}"))?;
    let tbs = &cert.tbs_certificate;
    let spki = tbs.subject_public_key_info.to_der().map_err(|e| format!("certificate: {e}"))?;
    let key = PublicKey::from_spki_der(&spki).map_err(|e| format!("certificate: {e}"))?;
    let secs = |t: &x509_cert::time::Time| t.to_unix_duration().as_secs() as i64;
    Ok((key, (secs(&tbs.validity.not_before), secs(&tbs.validity.not_after))))
}
