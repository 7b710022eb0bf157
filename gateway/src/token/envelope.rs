//! The QR envelope: `prefix + base45(zlib(COSE_Sign1))`, taken apart stage by stage.

use coset::cbor::value::Value;
use coset::{AsCborValue, CoseSign1};

use super::base45;
use super::error::TokenError;

/// The prefix of an e-card token.
pub const ECARD_PREFIX: &str = "EC1:";

/// The longest payload accepted: the alphanumeric capacity of the largest QR code.
pub const MAX_PAYLOAD_CHARS: usize = 4296;

/// The most a payload may inflate to.
pub const MAX_INFLATED_BYTES: usize = 64 * 1024;

/// Strips the expected prefix (and a trailing line break a scanner may add).
pub fn unprefix<'a>(payload: &'a str, prefix: &str) -> Result<&'a str, TokenError> {
    let payload = payload.trim_end_matches(['\r', '\n']);
    if payload.len() > MAX_PAYLOAD_CHARS {
        return Err(TokenError::malformed(format!("payload longer than {MAX_PAYLOAD_CHARS} characters")));
    }
    payload.strip_prefix(prefix).ok_or_else(|| TokenError::malformed(format!("payload does not start with `{prefix}`")))
}

/// Decodes the base45 text.
pub fn unbase45(text: &str) -> Result<Vec<u8>, TokenError> {
    base45::decode(text).map_err(|e| TokenError::malformed(format!("base45: {e}")))
}

thread_local! {
    /// One decompressor per thread: its state is several kilobytes, too much to set up per token.
    static INFLATER: std::cell::RefCell<flate2::Decompress> = std::cell::RefCell::new(flate2::Decompress::new(true));
}

/// Inflates zlib data, refusing anything that grows past [`MAX_INFLATED_BYTES`].
pub fn inflate(data: &[u8]) -> Result<Vec<u8>, TokenError> {
    INFLATER.with_borrow_mut(|inflater| {
        inflater.reset(true);
        let mut out = Vec::with_capacity((data.len() * 3).clamp(256, MAX_INFLATED_BYTES));
        loop {
            let (consumed, produced) = (inflater.total_in(), inflater.total_out());
            let status = inflater
                .decompress_vec(&data[consumed as usize..], &mut out, flate2::FlushDecompress::None)
                .map_err(|e| TokenError::malformed(format!("zlib: {e}")))?;
            if status == flate2::Status::StreamEnd {
                break;
            }
            if out.len() >= MAX_INFLATED_BYTES {
                return Err(TokenError::malformed(format!("inflates past {MAX_INFLATED_BYTES} bytes")));
            }
            if out.len() == out.capacity() {
                // Grow by at least 256 bytes, so the loop always makes progress.
                out.reserve(out.capacity().max(256).min(MAX_INFLATED_BYTES - out.len()));
                continue;
            }
            let stalled = inflater.total_in() == consumed && inflater.total_out() == produced;
            if stalled || inflater.total_in() as usize == data.len() {
                return Err(TokenError::malformed("zlib: truncated stream"));
            }
        }
        if inflater.total_in() as usize != data.len() {
            return Err(TokenError::malformed("zlib: data after the end of the stream"));
        }
        Ok(out)
    })
}

/// Compresses with zlib at the best compression level.
pub fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).expect("writing to a Vec cannot fail");
    encoder.finish().expect("finishing into a Vec cannot fail")
}

/// The COSE_Sign1 tag (RFC 9052).
pub const COSE_SIGN1_TAG: u64 = 18;

/// The CWT tag (RFC 8392): it may wrap a tagged COSE message.
pub const CWT_TAG: u64 = 61;

/// Decodes exactly one CBOR data item: bytes after it are refused, not ignored.
pub fn decode_item(mut bytes: &[u8], what: &str) -> Result<Value, TokenError> {
    let value: Value = coset::cbor::de::from_reader(&mut bytes)
        .map_err(|e| TokenError::malformed(format!("{what} is not CBOR: {e}")))?;
    if !bytes.is_empty() {
        return Err(TokenError::malformed(format!("{} bytes after the {what}", bytes.len())));
    }
    Ok(value)
}

/// Parses a COSE_Sign1: `18(COSE_Sign1)`, `61(18(COSE_Sign1))` (a CWT, RFC 8392 section 6) or
/// the untagged array. Any other tag or nesting, a structure that is not COSE_Sign1's (a
/// four-element array: protected header as a byte string holding a map, unprotected header
/// map, payload, signature bytes) and bytes after the message are refused.
pub fn parse_cose(bytes: &[u8]) -> Result<CoseSign1, TokenError> {
    let message = match decode_item(bytes, "COSE message")? {
        Value::Tag(CWT_TAG, inner) => match *inner {
            Value::Tag(COSE_SIGN1_TAG, message) => *message,
            _ => return Err(TokenError::malformed("the CWT tag (61) must wrap a tagged COSE_Sign1 (18)")),
        },
        Value::Tag(COSE_SIGN1_TAG, message) => *message,
        Value::Tag(tag, _) => {
            return Err(TokenError::malformed(format!("tag {tag} is neither COSE_Sign1 (18) nor CWT (61)")));
        }
        untagged => untagged,
    };
    CoseSign1::from_cbor_value(message).map_err(|e| TokenError::malformed(format!("not a COSE_Sign1: {e:?}")))
}

/// Every stage from the QR text to the COSE bytes.
pub fn decode(payload: &str, prefix: &str) -> Result<Vec<u8>, TokenError> {
    inflate(&unbase45(unprefix(payload, prefix)?)?)
}

/// Every stage from the COSE bytes to the QR text.
pub fn encode(cose: &[u8], prefix: &str) -> String {
    format!("{prefix}{}", base45::encode(&deflate(cose)))
}
