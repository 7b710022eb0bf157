//! SM2 signatures checked with tables precomputed when the trust list loads.
//!
//! An SM2 check (GB/T 32918.2 §7) computes `[s]G + [t]P` and compares its x-coordinate with
//! the signature. The `sm2` crate does it with a generic constant-time double-and-add; here
//! both points are known in advance — the generator always, every issuer key from the trust
//! list — so each has a fixed-base table: for every byte position `i` of a scalar, the
//! multiples `1..=128` of `256^i · point`, in affine form. A scalar written in signed
//! base-256 digits (each in `-127..=128`, plus a carry out of the top byte) is then 32 or 33
//! table additions and no doubling; the two multiplications share one accumulator, and one
//! inversion brings it back to affine. Verification uses public data only, so
//! variable-time lookups are fine.
//!
//! The field and group arithmetic are the `sm2` crate's (RustCrypto's `primeorder`); this
//! module only chooses which additions to do. A table takes about 288 KiB (32 × 128 affine
//! points) and a few milliseconds to build; the generator's is built once per process.
//! [`Sm2Key::verify_plain`] keeps the crate's own check for cross-checking
//! (`gateway/tests/token_sm2.rs`, `fuzz/fuzz_targets/sm2_verify.rs`).

use std::sync::{Arc, LazyLock};

use sm2::elliptic_curve::group::Group;
use sm2::elliptic_curve::ops::Reduce;
use sm2::elliptic_curve::point::AffineCoordinates;
use sm2::elliptic_curve::sec1::ToEncodedPoint;
use sm2::elliptic_curve::{BatchNormalize, PrimeField};
use sm2::{AffinePoint, ProjectivePoint, Scalar};
use sm3::{Digest, Sm3};

/// Entries per window: the multiples `1..=128` of the window's base.
const ENTRIES: usize = 128;
/// Windows: one per byte of a 256-bit scalar.
const WINDOWS: usize = 32;

/// The curve's `a` and `b` (GB/T 32918.5), hashed into the signer's identity `Z`.
const EQUATION_A: [u8; 32] = hex32("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC");
const EQUATION_B: [u8; 32] = hex32("28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93");

/// The generator's table, built on first use.
static GENERATOR: LazyLock<Table> = LazyLock::new(|| Table::new(ProjectivePoint::generator()));

/// Multiples of a point for fixed-base scalar multiplication.
struct Table {
    /// `windows[i][j]` is `(j + 1) · 256^i · point`.
    windows: Vec<[AffinePoint; ENTRIES]>,
    /// `256^32 · point`, for the carry out of the top digit.
    top: AffinePoint,
}

impl Table {
    fn new(point: ProjectivePoint) -> Self {
        let mut windows = Vec::with_capacity(WINDOWS);
        let mut base = point;
        for _ in 0..WINDOWS {
            let mut row = [ProjectivePoint::IDENTITY; ENTRIES];
            row[0] = base;
            for j in 1..ENTRIES {
                row[j] = row[j - 1] + base;
            }
            windows.push(ProjectivePoint::batch_normalize(&row));
            base = row[ENTRIES - 1].double();
        }
        Self { windows, top: base.to_affine() }
    }

    /// Adds `k · point` to `sum`.
    fn add_multiple(&self, sum: &mut ProjectivePoint, k: &Scalar) {
        let (digits, carry) = signed_digits(k);
        for (window, &digit) in self.windows.iter().zip(&digits) {
            match digit {
                1..=128 => *sum += &window[digit as usize - 1],
                -127..=-1 => *sum += -window[digit.unsigned_abs() as usize - 1],
                _ => {}
            }
        }
        if carry {
            *sum += &self.top;
        }
    }
}

/// `k` in base 256 with digits in `-127..=128`, least significant first, and whether a carry
/// out of the top digit is left (`k = Σ digits[i]·256^i + carry·256^32`).
fn signed_digits(k: &Scalar) -> ([i16; WINDOWS], bool) {
    let bytes = k.to_repr(); // big-endian
    let mut digits = [0i16; WINDOWS];
    let mut carry = 0i16;
    for (i, digit) in digits.iter_mut().enumerate() {
        let d = i16::from(bytes[WINDOWS - 1 - i]) + carry;
        (*digit, carry) = if d > 128 { (d - 256, 1) } else { (d, 0) };
    }
    (digits, carry == 1)
}

/// An SM2 issuer key with its identity hash and fixed-base table.
#[derive(Clone)]
pub struct Sm2Key {
    plain: sm2::dsa::VerifyingKey,
    /// `Z = SM3(ENTL || ID || a || b || xG || yG || xA || yA)`.
    identity_hash: [u8; 32],
    table: Arc<Table>,
}

impl std::fmt::Debug for Sm2Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sm2Key").field("identity_hash", &self.identity_hash).finish_non_exhaustive()
    }
}

impl Sm2Key {
    /// The key at `point` (SEC1, compressed or not) for the distinguishing identifier
    /// `dist_id`; builds its table.
    pub fn from_sec1(point: &[u8], dist_id: &str) -> Result<Self, String> {
        let bad = || "SM2 key is not a valid point".to_string();
        let plain = sm2::dsa::VerifyingKey::from_sec1_bytes(dist_id, point).map_err(|_| bad())?;
        let affine = *plain.as_affine();
        let identity_hash = identity_hash(dist_id, &affine).ok_or_else(|| "SM2 identifier is too long".to_string())?;
        LazyLock::force(&GENERATOR);
        Ok(Self { plain, identity_hash, table: Arc::new(Table::new(affine.into())) })
    }

    /// Whether `signature` (`r || s`, 64 bytes) is this key's SM2-with-SM3 signature of
    /// `message`, with the tables.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        // B1, B2: r and s in [1, n-1] (checked as the signature parses).
        let Ok(signature) = sm2::dsa::Signature::from_slice(signature) else { return false };
        let (r, s): (Scalar, Scalar) = (*signature.r(), *signature.s());
        // B3, B4: e = SM3(Z || M).
        let e = Scalar::reduce_bytes(&Sm3::new_with_prefix(self.identity_hash).chain_update(message).finalize());
        // B5: t = r + s mod n, not zero.
        let t = r + s;
        if bool::from(t.is_zero()) {
            return false;
        }
        // B6: (x1, y1) = [s]G + [t]P.
        let mut sum = ProjectivePoint::IDENTITY;
        GENERATOR.add_multiple(&mut sum, &s);
        self.table.add_multiple(&mut sum, &t);
        // One field inversion brings the sum to affine form; the crate's projective identity
        // and equality tests go through affine form too, so they are not used here (each
        // costs one or two more inversions, the most expensive step of the check).
        let sum = sum.to_affine();
        if bool::from(sum.is_identity()) {
            return false;
        }
        // B7: R = e + x1 mod n equals r.
        r == e + Scalar::reduce_bytes(&sum.x())
    }

    /// The same check by the `sm2` crate alone, without the tables.
    pub fn verify_plain(&self, message: &[u8], signature: &[u8]) -> bool {
        use sm2::dsa::signature::Verifier;
        sm2::dsa::Signature::from_slice(signature).is_ok_and(|s| self.plain.verify(message, &s).is_ok())
    }

    /// The signer's identity hash `Z` (GB/T 32918.2 §5.5).
    pub fn identity_hash(&self) -> &[u8; 32] {
        &self.identity_hash
    }
}

/// `Z = SM3(ENTL || ID || a || b || xG || yG || xA || yA)`; `None` when the identifier's length
/// in bits does not fit ENTL's two bytes.
fn identity_hash(dist_id: &str, key: &AffinePoint) -> Option<[u8; 32]> {
    let entl = u16::try_from(dist_id.len().checked_mul(8)?).ok()?;
    let generator = AffinePoint::GENERATOR.to_encoded_point(false);
    let key = key.to_encoded_point(false);
    let mut sm3 = Sm3::new();
    sm3.update(entl.to_be_bytes());
    sm3.update(dist_id);
    sm3.update(EQUATION_A);
    sm3.update(EQUATION_B);
    for point in [&generator, &key] {
        sm3.update(point.x()?);
        sm3.update(point.y()?);
    }
    Some(sm3.finalize().into())
}

/// 32 bytes from 64 hex digits, at compile time.
const fn hex32(hex: &str) -> [u8; 32] {
    const fn nibble(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'F' => c - b'A' + 10,
            _ => panic!("not an upper-case hex digit"),
        }
    }
    let hex = hex.as_bytes();
    assert!(hex.len() == 64);
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = nibble(hex[2 * i]) << 4 | nibble(hex[2 * i + 1]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_digits_add_back_up_to_the_scalar() {
        for k in [
            Scalar::ZERO,
            Scalar::ONE,
            -Scalar::ONE,
            Scalar::from(128u64),
            Scalar::from(129u64),
            Scalar::from(0xFFFFu64),
        ] {
            let (digits, carry) = signed_digits(&k);
            let mut sum = if carry { Scalar::from(256u64).pow_vartime(&[WINDOWS as u64]) } else { Scalar::ZERO };
            for (i, &d) in digits.iter().enumerate() {
                assert!((-127..=128).contains(&d), "digit {d}");
                let place = Scalar::from(256u64).pow_vartime(&[i as u64]);
                let magnitude = Scalar::from(u64::from(d.unsigned_abs())) * place;
                sum += if d < 0 { -magnitude } else { magnitude };
            }
            assert_eq!(sum, k);
        }
    }

    #[test]
    fn the_generator_table_multiplies_as_the_group_does() {
        for k in
            [Scalar::ONE, Scalar::from(255u64), -Scalar::ONE, Scalar::from(0x1234_5678_9abc_def0u64).invert().unwrap()]
        {
            let mut sum = ProjectivePoint::IDENTITY;
            GENERATOR.add_multiple(&mut sum, &k);
            assert_eq!(sum, ProjectivePoint::generator() * k);
        }
    }
}
