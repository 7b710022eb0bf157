#![no_main]
//! Differential: the precomputed-table SM2 check must answer exactly what the `sm2` crate's own
//! check answers, for any signature and message under any of a few fixed keys. Half the inputs
//! start from a valid signature that the fuzzer's bytes then mutate, so both accepting and
//! refusing paths are reached.

use std::sync::LazyLock;

use cardgate::token::sm2key::Sm2Key;
use sm2::dsa::signature::Signer;
use sm2::elliptic_curve::sec1::ToEncodedPoint;

const DIST_ID: &str = "1234567812345678";

static KEYS: LazyLock<Vec<(sm2::dsa::SigningKey, Sm2Key)>> = LazyLock::new(|| {
    [1u8, 2, 0x7F, 0xFE]
        .iter()
        .map(|&byte| {
            let secret = sm2::SecretKey::from_slice(&[byte; 32]).expect("scalar below the order");
            let signing = sm2::dsa::SigningKey::new(DIST_ID, &secret).expect("signing key");
            let point = secret.public_key().to_encoded_point(byte % 2 == 0);
            (signing, Sm2Key::from_sec1(point.as_bytes(), DIST_ID).expect("key"))
        })
        .collect()
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let [selector, rest @ ..] = data else { return };
    let (signing, key) = &KEYS[usize::from(selector & 3)];
    let (message, signature) = if selector & 4 == 0 {
        // Raw: the first 64 bytes are the signature, the rest the message.
        if rest.len() < 64 {
            return;
        }
        (rest[64..].to_vec(), rest[..64].to_vec())
    } else {
        // Mutated: sign the message, then XOR the next up-to-64 bytes of input into it.
        let split = rest.len().min(64);
        let (mask, message) = rest.split_at(split);
        let signed: sm2::dsa::Signature = signing.sign(message);
        let mut signature = signed.to_bytes().to_vec();
        if selector & 8 != 0 {
            signature.iter_mut().zip(mask).for_each(|(s, m)| *s ^= m);
        }
        (message.to_vec(), signature)
    };
    assert_eq!(key.verify(&message, &signature), key.verify_plain(&message, &signature));
});
