//! Signed plugins: a manifest (name, version, ABI, target, SHA-256 of the library) signed with
//! Ed25519 by a bureau's key, kept next to the library as `<library>.manifest.json`.
//!
//! The gateway trusts a configured set of signer keys, each optionally limited to the plugin
//! names it may sign, and checks the very bytes it loads against the manifest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::token::PublicKey;
use crate::token::issue::SigningKey;
use crate::token::trust::Algorithm;

/// What a signature covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Declared plugin name.
    pub name: String,
    /// Declared plugin version.
    pub version: String,
    /// ABI, `major.minor`.
    pub abi: String,
    /// Target the library was built for (`x86_64-linux`).
    pub target: String,
    /// Hex SHA-256 of the library file.
    pub sha256: String,
    /// The signer's key id.
    pub signer: String,
}

/// A manifest and its signature, as stored next to the library.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The manifest.
    pub manifest: Manifest,
    /// Base64 Ed25519 signature over the manifest's JSON encoding (fields in the order above).
    pub signature: String,
}

/// Why a signed library was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// No manifest next to the library.
    #[error("no signed manifest at {0}")]
    Missing(PathBuf),
    /// The manifest does not parse.
    #[error("manifest {path}: {reason}")]
    Invalid {
        /// The manifest file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The signer is not trusted.
    #[error("signer `{0}` is not trusted")]
    UnknownSigner(String),
    /// The signature does not verify.
    #[error("the manifest signature by `{0}` does not verify")]
    BadSignature(String),
    /// The signer may not sign this plugin.
    #[error("signer `{signer}` may not sign plugin `{plugin}`")]
    SignerNotAllowed {
        /// Signer.
        signer: String,
        /// Plugin.
        plugin: String,
    },
    /// The library's bytes are not the ones signed.
    #[error("the library's SHA-256 is {found}, the signed manifest says {expected}")]
    DigestMismatch {
        /// From the manifest.
        expected: String,
        /// Of the bytes.
        found: String,
    },
    /// The library declares something else than the manifest.
    #[error("the library declares {found}, the signed manifest says {expected}")]
    ManifestMismatch {
        /// From the manifest.
        expected: String,
        /// From the declaration.
        found: String,
    },
    /// The manifest is signed for another plugin than the one configured at this path.
    #[error("the manifest is signed for plugin `{signed_for}`, not `{configured}` as configured")]
    WrongPlugin {
        /// The name the configuration expects (`declared_name`, or the section's name).
        configured: String,
        /// The name in the manifest.
        signed_for: String,
    },
}

/// The target this gateway runs on, as manifests name it.
pub fn target() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

/// Where a library's manifest lives.
pub fn manifest_path(library: &Path) -> PathBuf {
    let mut name = library.file_name().unwrap_or_default().to_os_string();
    name.push(".manifest.json");
    library.with_file_name(name)
}

fn canonical(manifest: &Manifest) -> Vec<u8> {
    serde_json::to_vec(manifest).expect("a manifest always encodes")
}

/// Signs a manifest with an Ed25519 key.
pub fn sign(manifest: Manifest, key: &SigningKey) -> Result<SignedManifest, String> {
    if key.algorithm() != Algorithm::EdDsa {
        return Err(format!("plugin manifests are signed with Ed25519, not {}", key.algorithm()));
    }
    let signature = key.sign(&canonical(&manifest)).map_err(|e| e.to_string())?;
    Ok(SignedManifest { manifest, signature: BASE64.encode(signature) })
}

/// One trusted signer.
#[derive(Debug, Clone)]
struct Signer {
    key: PublicKey,
    plugins: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignersFile {
    signers: Vec<SignerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignerEntry {
    kid: String,
    public_key: String,
    #[serde(default)]
    plugins: Vec<String>,
}

/// The trusted signer keys: `{"signers": [{"kid", "public_key" (PEM, Ed25519), "plugins"?}]}`.
#[derive(Debug, Clone, Default)]
pub struct SignerTrust {
    signers: HashMap<String, Signer>,
}

impl SignerTrust {
    /// Parses a signers file, reporting every bad entry.
    pub fn from_json(text: &str) -> Result<Self, Vec<String>> {
        let file: SignersFile = serde_json::from_str(text).map_err(|e| vec![format!("signers: {e}")])?;
        let mut signers = HashMap::new();
        let mut problems = Vec::new();
        for (i, entry) in file.signers.into_iter().enumerate() {
            match PublicKey::from_spki_pem(&entry.public_key) {
                Ok(key) if key.algorithm() == Algorithm::EdDsa => {
                    signers.insert(entry.kid, Signer { key, plugins: entry.plugins });
                }
                Ok(_) => problems.push(format!("signers[{i}].public_key: must be an Ed25519 key")),
                Err(e) => problems.push(format!("signers[{i}].public_key: {e}")),
            }
        }
        if problems.is_empty() { Ok(Self { signers }) } else { Err(problems) }
    }

    /// Reads a signers file.
    pub fn load(path: &Path) -> Result<Self, Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        Self::from_json(&text).map_err(|p| p.into_iter().map(|m| format!("{}: {m}", path.display())).collect())
    }

    /// Reads and checks the manifest next to `library` for plugin `name`: a trusted signer
    /// allowed to sign it, a valid signature. The caller checks the digest and declaration.
    pub fn verify_manifest(&self, library: &Path, name: &str) -> Result<Manifest, SignatureError> {
        let path = manifest_path(library);
        let text = std::fs::read_to_string(&path).map_err(|_| SignatureError::Missing(path.clone()))?;
        let signed: SignedManifest = serde_json::from_str(&text)
            .map_err(|e| SignatureError::Invalid { path: path.clone(), reason: e.to_string() })?;
        let kid = &signed.manifest.signer;
        let signer = self.signers.get(kid).ok_or_else(|| SignatureError::UnknownSigner(kid.clone()))?;
        let signature =
            BASE64.decode(&signed.signature).map_err(|e| SignatureError::Invalid { path, reason: e.to_string() })?;
        if !signer.key.verify(&canonical(&signed.manifest), &signature) {
            return Err(SignatureError::BadSignature(kid.clone()));
        }
        if !signer.plugins.is_empty() && !signer.plugins.iter().any(|p| p == name) {
            return Err(SignatureError::SignerNotAllowed { signer: kid.clone(), plugin: name.to_owned() });
        }
        Ok(signed.manifest)
    }
}
