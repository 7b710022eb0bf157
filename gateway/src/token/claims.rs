//! CWT claims (RFC 8392) and the e-card claim, decoded from and encoded to CBOR.
//!
//! The claims are parsed by hand from the CBOR map rather than by a strict CWT library, so a
//! token carrying a claim this gateway does not know still verifies (generic mode) — but a map
//! with duplicate keys, which could be read two ways, is refused.

use coset::cbor::value::{Integer, Value};

use super::error::TokenError;

/// The private-use CWT claim key of the e-card claim map.
pub const ECARD_CLAIM: i64 = -65537;

const ISS: i64 = 1;
const EXP: i64 = 4;
const NBF: i64 = 5;
const IAT: i64 = 6;
const CTI: i64 = 7;

/// Keys inside the e-card claim map.
mod key {
    pub(super) const CARD_ID: i64 = 1;
    pub(super) const HOLDER_NAME: i64 = 2;
    pub(super) const INSURED_REGION: i64 = 3;
    pub(super) const INSURANCE_TYPES: i64 = 4;
    pub(super) const DELEGATE: i64 = 5;
    pub(super) const DELEGATE_CARD_ID: i64 = 1;
    pub(super) const DELEGATE_NAME: i64 = 2;
    pub(super) const DELEGATE_RELATION: i64 = 3;
}

/// The registered claims a verifier uses, and the whole claim map for display.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    /// `iss`.
    pub issuer: Option<String>,
    /// `iat`, seconds since the epoch.
    pub issued_at: Option<i64>,
    /// `exp`, seconds since the epoch.
    pub expires_at: Option<i64>,
    /// `nbf`, seconds since the epoch.
    pub not_before: Option<i64>,
    /// `cti`: the unique token id.
    pub token_id: Option<Vec<u8>>,
    /// The whole claim map.
    pub map: Vec<(Value, Value)>,
}

/// The e-card claim: who the card belongs to and where it is insured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ECardClaim {
    /// Card id.
    pub card_id: String,
    /// Holder's name.
    pub holder_name: String,
    /// Insured region, a 6-digit administrative division code.
    pub insured_region: String,
    /// Insurance type codes.
    pub insurance_types: Vec<String>,
    /// Family member presenting the card, if any.
    pub delegate: Option<DelegateClaim>,
}

/// The delegate of a family account (in the spirit of RFC 8693's `act`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegateClaim {
    /// The delegate's own card id.
    pub card_id: String,
    /// The delegate's name.
    pub name: Option<String>,
    /// Relation to the holder.
    pub relation: String,
}

fn int_key(k: &Value) -> Option<i64> {
    k.as_integer().and_then(|i| i64::try_from(i).ok())
}

fn timestamp(value: &Value, name: &str) -> Result<i64, TokenError> {
    match value {
        Value::Integer(i) => i64::try_from(*i).map_err(|_| TokenError::malformed(format!("{name} is out of range"))),
        Value::Float(f) if f.is_finite() && f.abs() < 1e15 => Ok(f.trunc() as i64),
        _ => Err(TokenError::malformed(format!("{name} is not a number"))),
    }
}

/// Refuses maps with duplicate keys.
fn unique_keys(map: &[(Value, Value)], what: &str) -> Result<(), TokenError> {
    for (i, (k, _)) in map.iter().enumerate() {
        if map[..i].iter().any(|(other, _)| other == k) {
            return Err(TokenError::malformed(format!("{what} has a duplicate key")));
        }
    }
    Ok(())
}

impl Claims {
    /// Decodes a CWT claims set.
    pub fn decode(bytes: &[u8]) -> Result<Self, TokenError> {
        let value = super::envelope::decode_item(bytes, "claims")?;
        let Value::Map(map) = value else { return Err(TokenError::malformed("claims are not a CBOR map")) };
        unique_keys(&map, "claims")?;
        let mut claims =
            Claims { issuer: None, issued_at: None, expires_at: None, not_before: None, token_id: None, map: vec![] };
        for (k, v) in &map {
            match int_key(k) {
                Some(ISS) => {
                    claims.issuer = Some(v.as_text().ok_or_else(|| TokenError::malformed("iss is not text"))?.into())
                }
                Some(EXP) => claims.expires_at = Some(timestamp(v, "exp")?),
                Some(NBF) => claims.not_before = Some(timestamp(v, "nbf")?),
                Some(IAT) => claims.issued_at = Some(timestamp(v, "iat")?),
                Some(CTI) => {
                    claims.token_id =
                        Some(v.as_bytes().ok_or_else(|| TokenError::malformed("cti is not bytes"))?.clone())
                }
                _ => {}
            }
        }
        claims.map = map;
        Ok(claims)
    }

    /// The value of a claim.
    pub fn get(&self, key: i64) -> Option<&Value> {
        self.map.iter().find(|(k, _)| int_key(k) == Some(key)).map(|(_, v)| v)
    }

    /// The e-card claim, checked for the profile's required fields.
    pub fn ecard(&self) -> Result<ECardClaim, TokenError> {
        let missing = |what: &str| TokenError::ProfileInvalid(format!("e-card claim: {what} is missing or not valid"));
        let Some(Value::Map(map)) = self.get(ECARD_CLAIM) else { return Err(missing("the e-card claim map")) };
        unique_keys(map, "e-card claim")?;
        let text = |m: &[(Value, Value)], key: i64| {
            m.iter().find(|(k, _)| int_key(k) == Some(key)).and_then(|(_, v)| v.as_text()).map(str::to_owned)
        };
        let card_id = text(map, key::CARD_ID).filter(|s| !s.is_empty()).ok_or_else(|| missing("card id"))?;
        let holder_name =
            text(map, key::HOLDER_NAME).filter(|s| !s.is_empty()).ok_or_else(|| missing("holder name"))?;
        let insured_region = text(map, key::INSURED_REGION)
            .filter(|s| s.len() == 6 && s.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| missing("insured region (6 digits)"))?;
        let insurance_types: Vec<String> = map
            .iter()
            .find(|(k, _)| int_key(k) == Some(key::INSURANCE_TYPES))
            .and_then(|(_, v)| v.as_array())
            .map(|a| a.iter().filter_map(|t| t.as_text().map(str::to_owned)).collect())
            .filter(|types: &Vec<String>| !types.is_empty())
            .ok_or_else(|| missing("insurance types"))?;
        let delegate = match map.iter().find(|(k, _)| int_key(k) == Some(key::DELEGATE)).map(|(_, v)| v) {
            None => None,
            Some(Value::Map(d)) => Some(DelegateClaim {
                card_id: text(d, key::DELEGATE_CARD_ID).ok_or_else(|| missing("delegate card id"))?,
                name: text(d, key::DELEGATE_NAME),
                relation: text(d, key::DELEGATE_RELATION).ok_or_else(|| missing("delegate relation"))?,
            }),
            Some(_) => return Err(missing("delegate")),
        };
        Ok(ECardClaim { card_id, holder_name, insured_region, insurance_types, delegate })
    }

    /// The claim map as JSON, for display: byte strings as hex, integer keys as strings.
    pub fn to_json(&self) -> serde_json::Value {
        to_json(&Value::Map(self.map.clone()))
    }
}

impl ECardClaim {
    /// The claim as a CBOR map.
    pub fn to_cbor(&self) -> Value {
        let mut map = vec![
            (int(key::CARD_ID), Value::Text(self.card_id.clone())),
            (int(key::HOLDER_NAME), Value::Text(self.holder_name.clone())),
            (int(key::INSURED_REGION), Value::Text(self.insured_region.clone())),
            (int(key::INSURANCE_TYPES), Value::Array(self.insurance_types.iter().cloned().map(Value::Text).collect())),
        ];
        if let Some(d) = &self.delegate {
            let mut delegate = vec![(int(key::DELEGATE_CARD_ID), Value::Text(d.card_id.clone()))];
            if let Some(name) = &d.name {
                delegate.push((int(key::DELEGATE_NAME), Value::Text(name.clone())));
            }
            delegate.push((int(key::DELEGATE_RELATION), Value::Text(d.relation.clone())));
            map.push((int(key::DELEGATE), Value::Map(delegate)));
        }
        Value::Map(map)
    }
}

fn int(i: i64) -> Value {
    Value::Integer(Integer::from(i))
}

/// Encodes a claims set for minting.
pub fn encode(issuer: &str, issued_at: i64, expires_at: i64, token_id: &[u8], ecard: &ECardClaim) -> Vec<u8> {
    let map = Value::Map(vec![
        (int(ISS), Value::Text(issuer.to_owned())),
        (int(EXP), int(expires_at)),
        (int(IAT), int(issued_at)),
        (int(CTI), Value::Bytes(token_id.to_vec())),
        (int(ECARD_CLAIM), ecard.to_cbor()),
    ]);
    let mut out = Vec::with_capacity(192);
    coset::cbor::ser::into_writer(&map, &mut out).expect("writing CBOR to a Vec cannot fail");
    out
}

/// A CBOR value as JSON for display.
pub fn to_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::Integer(i) => i64::try_from(*i).map_or_else(|_| J::String(format!("{i:?}")), J::from),
        Value::Bytes(b) => J::String(b.iter().map(|x| format!("{x:02x}")).collect()),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::Text(t) => J::String(t.clone()),
        Value::Bool(b) => J::Bool(*b),
        Value::Null => J::Null,
        Value::Tag(_, inner) => to_json(inner),
        Value::Array(a) => J::Array(a.iter().map(to_json).collect()),
        Value::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Value::Text(t) => t.clone(),
                        other => to_json(other).to_string().trim_matches('"').to_owned(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        _ => J::Null,
    }
}
