//! SM2 checked with precomputed tables (token::sm2key): the standard's worked example, and the
//! table check against the `sm2` crate's own on valid and corrupted signatures.
//!
//! `SM2_CROSSCHECK=N` sets how many rounds the cross-check runs, each one valid signature and
//! four corruptions of it, spread over every core; CI runs 64 rounds, a million signatures is
//! `SM2_CROSSCHECK=200000 cargo test --release -p cardgate --test token_sm2 -- --nocapture`.

use cardgate::token::sm2key::Sm2Key;
use cardgate::token::trust::SM2_DIST_ID;
use sm2::dsa::signature::Signer;
use sm2::elliptic_curve::sec1::ToEncodedPoint;

/// GB/T 32918.2-2016 Appendix A / GM/T 0003.2 worked example on the recommended curve (the
/// one the ISO/IEC 14888-3 and draft-shen-sm2-ecdsa texts repeat): the signer's key, ID, the
/// identity hash Z, the message and the signature.
const STANDARD_X: &str = "09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020";
const STANDARD_Y: &str = "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13";
const STANDARD_ID: &str = "1234567812345678";
const STANDARD_Z: &str = "B2E14C5C79C6DF5B85F4FE7ED8DB7A262B9DA7E07CCB0EA9F4747B8CCDA8A4F3";
const STANDARD_MESSAGE: &[u8] = b"message digest";
const STANDARD_R: &str = "F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3";
const STANDARD_S: &str = "B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA";
/// The group order n.
const ORDER: &str = "FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123";

fn standard_key() -> Sm2Key {
    let point = [vec![4], hex(STANDARD_X), hex(STANDARD_Y)].concat();
    Sm2Key::from_sec1(&point, STANDARD_ID).expect("the standard's key is on the curve")
}

#[test]
fn the_standard_worked_example_verifies() {
    let key = standard_key();
    assert_eq!(key.identity_hash().as_slice(), hex(STANDARD_Z).as_slice(), "Z");
    let signature = [hex(STANDARD_R), hex(STANDARD_S)].concat();
    assert!(key.verify(STANDARD_MESSAGE, &signature));
    assert!(key.verify_plain(STANDARD_MESSAGE, &signature));
    assert!(!key.verify(b"message digesT", &signature));
    // The same point given compressed.
    let y = hex(STANDARD_Y);
    let compressed = [vec![2 + (y[31] & 1)], hex(STANDARD_X)].concat();
    let again = Sm2Key::from_sec1(&compressed, STANDARD_ID).expect("compressed point");
    assert!(again.verify(STANDARD_MESSAGE, &signature));
    // Another identifier is another Z: the signature no longer fits.
    let other = Sm2Key::from_sec1(&[vec![4], hex(STANDARD_X), y].concat(), "ALICE123@YAHOO.COM").expect("key");
    assert!(!other.verify(STANDARD_MESSAGE, &signature));
}

#[test]
fn out_of_range_and_degenerate_signatures_are_refused() {
    let key = standard_key();
    let (r, s) = (hex(STANDARD_R), hex(STANDARD_S));
    let zero = vec![0u8; 32];
    let order = hex(ORDER);
    // s = n - r makes t = r + s = 0 (mod n), which B5 refuses.
    let minus_r = sub(&order, &r);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("r = 0", [zero.clone(), s.clone()].concat()),
        ("s = 0", [r.clone(), zero.clone()].concat()),
        ("r = n", [order.clone(), s.clone()].concat()),
        ("s = n", [r.clone(), order.clone()].concat()),
        ("r = 2^256 - 1", [vec![0xFF; 32], s.clone()].concat()),
        ("t = 0", [r.clone(), minus_r].concat()),
        ("63 bytes", [r.clone(), s[..31].to_vec()].concat()),
        ("65 bytes", [r.clone(), s.clone(), vec![0]].concat()),
        ("empty", Vec::new()),
    ];
    for (what, signature) in cases {
        assert!(!key.verify(STANDARD_MESSAGE, &signature), "{what}");
        assert!(!key.verify_plain(STANDARD_MESSAGE, &signature), "{what} (plain)");
    }
}

#[test]
fn points_off_the_curve_and_the_identity_are_not_keys() {
    let mut off = [vec![4], hex(STANDARD_X), hex(STANDARD_Y)].concat();
    off[64] ^= 1;
    assert!(Sm2Key::from_sec1(&off, STANDARD_ID).is_err());
    assert!(Sm2Key::from_sec1(&[0], STANDARD_ID).is_err());
    assert!(Sm2Key::from_sec1(&[], STANDARD_ID).is_err());
    let long_id = "x".repeat(8192);
    let point = [vec![4], hex(STANDARD_X), hex(STANDARD_Y)].concat();
    assert!(Sm2Key::from_sec1(&point, &long_id).is_err(), "ENTL is two bytes of bits");
}

#[test]
fn the_tables_answer_what_the_sm2_crate_answers() {
    let rounds: usize = std::env::var("SM2_CROSSCHECK").ok().and_then(|n| n.parse().ok()).unwrap_or(64);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(rounds.max(1));
    let started = std::time::Instant::now();
    let (accepted, refused) = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let share = rounds / threads + usize::from(t < rounds % threads);
                scope.spawn(move || cross_check(share, 0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1)))
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("cross-check thread")).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    assert_eq!(accepted, rounds as u64);
    assert_eq!(refused, 4 * rounds as u64);
    eprintln!(
        "sm2 cross-check: {accepted} valid signatures accepted, {refused} corrupted refused, both checks agreeing \
         ({threads} threads, {:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// `rounds` random signatures and their corruptions, checked both ways; returns how many were
/// accepted and refused.
fn cross_check(rounds: usize, seed: u64) -> (u64, u64) {
    let mut rng = XorShift(seed);
    let mut keys = Vec::new();
    let (mut accepted, mut refused) = (0u64, 0u64);
    for round in 0..rounds {
        // A new key every 64 signatures: each builds its own table.
        if round % 64 == 0 {
            let secret = sm2::SecretKey::random(&mut rand_core::OsRng);
            let signing = sm2::dsa::SigningKey::new(SM2_DIST_ID, &secret).expect("signing key");
            let point = secret.public_key().to_encoded_point(round % 128 == 0);
            keys = vec![(signing, Sm2Key::from_sec1(point.as_bytes(), SM2_DIST_ID).expect("key"))];
        }
        let (signing, key) = &keys[0];
        let mut message = vec![0u8; (rng.next() % 200) as usize];
        message.iter_mut().for_each(|b| *b = rng.next() as u8);
        let signature: sm2::dsa::Signature = signing.sign(&message);
        let good = signature.to_bytes().to_vec();
        assert!(key.verify(&message, &good), "round {round}: a valid signature is refused");
        assert!(key.verify_plain(&message, &good));
        accepted += 1;
        // Corruptions: a bit of the signature, a bit of the message, a random signature, r and s
        // swapped. Each must get the same answer from both checks (and, in practice, `false`).
        let mut flipped = good.clone();
        let bit = (rng.next() % 512) as usize;
        flipped[bit / 8] ^= 1 << (bit % 8);
        let mut other_message = message.clone();
        if other_message.is_empty() {
            other_message.push(0);
        } else {
            let at = (rng.next() as usize) % other_message.len();
            other_message[at] ^= 1 << (rng.next() % 8);
        }
        let random: Vec<u8> = (0..64).map(|_| rng.next() as u8).collect();
        let swapped = [&good[32..], &good[..32]].concat();
        for (what, m, sig) in [
            ("flipped signature bit", &message, &flipped),
            ("flipped message bit", &other_message, &good),
            ("random signature", &message, &random),
            ("r and s swapped", &message, &swapped),
        ] {
            let fast = key.verify(m, sig);
            assert_eq!(fast, key.verify_plain(m, sig), "round {round}: {what}");
            assert!(!fast, "round {round}: {what} accepted");
            refused += 1;
        }
    }
    (accepted, refused)
}

/// A small deterministic generator for messages and corruptions (the keys come from the OS).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `a - b` for 32-byte big-endian numbers with `a >= b`.
fn sub(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(a[i]) - i16::from(b[i]) - borrow;
        (out[i], borrow) = if d < 0 { ((d + 256) as u8, 1) } else { (d as u8, 0) };
    }
    out
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex")).collect()
}
