//! Revoked cards and keys, from a JSON file that can be reloaded while serving.
//!
//! File form: `{"cards": ["card id", ...], "kids": ["base64 key id", ...]}`; both optional.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

use super::trust::decode_base64;

/// A set of revoked card ids and key ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    cards: HashSet<String>,
    kids: HashSet<Vec<u8>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    cards: Vec<String>,
    #[serde(default)]
    kids: Vec<String>,
}

impl RevocationList {
    /// A list from card ids and key ids.
    pub fn new(cards: impl IntoIterator<Item = String>, kids: impl IntoIterator<Item = Vec<u8>>) -> Self {
        Self { cards: cards.into_iter().collect(), kids: kids.into_iter().collect() }
    }

    /// Parses the JSON form, reporting every bad entry.
    pub fn from_json(text: &str) -> Result<Self, Vec<String>> {
        let file: File = serde_json::from_str(text).map_err(|e| vec![format!("revocation list: {e}")])?;
        let mut problems = Vec::new();
        let mut kids = HashSet::new();
        for (index, kid) in file.kids.iter().enumerate() {
            match decode_base64(kid) {
                Some(kid) => {
                    kids.insert(kid);
                }
                None => problems.push(format!("kids[{index}]: not base64")),
            }
        }
        if problems.is_empty() { Ok(Self { cards: file.cards.into_iter().collect(), kids }) } else { Err(problems) }
    }

    /// Reads and parses a revocation file.
    pub fn load(path: &Path) -> Result<Self, Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        Self::from_json(&text).map_err(|p| p.into_iter().map(|m| format!("{}: {m}", path.display())).collect())
    }

    /// Whether a card is revoked.
    pub fn card_revoked(&self, card_id: &str) -> bool {
        self.cards.contains(card_id)
    }

    /// Whether a key is revoked.
    pub fn key_revoked(&self, kid: &[u8]) -> bool {
        self.kids.contains(kid)
    }
}
