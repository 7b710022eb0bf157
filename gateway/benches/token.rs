//! Token verification: the bare signature check per algorithm, and the full decode + verify of
//! a typical e-card token.
//!
//! Run: `cargo bench -p cardgate --bench token`.

use std::hint::black_box;
use std::sync::Arc;

use cardgate::token::issue::{self, MintRequest, SigningKey};
use cardgate::token::{
    Algorithm, ECardClaim, PublicKey, RevocationList, TrustList, TrustedKey, Verifier, VerifyOptions, envelope,
};
use criterion::{Criterion, criterion_group, criterion_main};

const NOW: i64 = 1_780_000_000;

fn token(c: &mut Criterion) {
    let mut group = c.benchmark_group("token");
    for algorithm in Algorithm::ALL {
        let generated = issue::generate(algorithm).expect("generate");
        let signing = SigningKey::from_pkcs8_pem(&generated.private_pem).expect("key");
        let public = PublicKey::from_spki_pem(&generated.public_pem).expect("key");
        let ecard = ECardClaim {
            card_id: "110105199001011234".into(),
            holder_name: "张三".into(),
            insured_region: "110105".into(),
            insurance_types: vec!["310".into()],
            delegate: None,
        };
        let request = MintRequest {
            issuer: "CN-110000".into(),
            kid: b"k1".to_vec(),
            issued_at: NOW,
            ttl_secs: 120,
            token_id: None,
            ecard,
        };
        let token = issue::mint(&signing, &request).expect("mint");
        let cose = envelope::parse_cose(&envelope::decode(&token, "EC1:").expect("decode")).expect("COSE");
        let (message, signature) = (cose.tbs_data(b""), cose.signature.clone());
        group.bench_function(format!("signature_only/{algorithm}"), |b| {
            b.iter(|| assert!(public.verify(black_box(&message), black_box(&signature))))
        });
        let trusted =
            TrustedKey { kid: b"k1".to_vec(), key: public.clone(), not_before: None, not_after: None, regions: vec![] };
        let verifier = Verifier::new(
            Arc::new(TrustList::from_keys([trusted])),
            Arc::new(RevocationList::default()),
            VerifyOptions::default(),
        );
        group.bench_function(format!("decode_and_verify/{algorithm}"), |b| {
            b.iter(|| verifier.verify(black_box(&token), NOW).expect("valid"))
        });
        if algorithm == Algorithm::EdDsa {
            group.bench_function("decode_only/EdDSA", |b| {
                b.iter(|| envelope::parse_cose(&envelope::decode(black_box(&token), "EC1:").expect("decode")))
            });
        }
    }
    group.finish();
}

/// Ed25519 signatures checked together (`token::batch`), per batch size; the throughput line
/// gives the time per signature, against `signature_only/EdDSA` (ring, one at a time).
fn batch(c: &mut Criterion) {
    use cardgate::token::batch::{Ed25519Key, verify_together};
    let mut group = c.benchmark_group("batch");
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("seed");
    let raw: [u8; 32] = ring::signature::KeyPair::public_key(&pair).as_ref().try_into().expect("32 bytes");
    let key = Ed25519Key::from_bytes(raw);
    // A Sig_structure of a typical token's size.
    let messages: Vec<Vec<u8>> = (0..64).map(|i| format!("{i:0>160}").into_bytes()).collect();
    let signatures: Vec<[u8; 64]> =
        messages.iter().map(|m| pair.sign(m).as_ref().try_into().expect("64 bytes")).collect();
    for size in [1, 2, 8, 16, 32, 64] {
        let items: Vec<(&Ed25519Key, &[u8], &[u8; 64])> =
            (0..size).map(|i| (&key, messages[i].as_slice(), &signatures[i])).collect();
        group.throughput(criterion::Throughput::Elements(size as u64));
        group.bench_function(format!("EdDSA/{size}"), |b| {
            b.iter(|| assert!(verify_together(black_box(&items)).iter().all(|&ok| ok)))
        });
    }
    group.finish();
}

/// SM2: the `sm2` crate's own check against the precomputed tables (`token::sm2key`), and what
/// building a key's table costs when the trust list loads.
fn sm2(c: &mut Criterion) {
    use cardgate::token::sm2key::Sm2Key;
    use cardgate::token::trust::SM2_DIST_ID;
    use sm2::dsa::signature::Signer;
    use sm2::elliptic_curve::sec1::ToEncodedPoint;
    let mut group = c.benchmark_group("sm2");
    let secret = sm2::SecretKey::random(&mut rand_core::OsRng);
    let signing = sm2::dsa::SigningKey::new(SM2_DIST_ID, &secret).expect("signing key");
    let point = secret.public_key().to_encoded_point(false);
    let key = Sm2Key::from_sec1(point.as_bytes(), SM2_DIST_ID).expect("key");
    let message = format!("{:0>160}", 1).into_bytes();
    let signature: sm2::dsa::Signature = signing.sign(&message);
    let signature = signature.to_bytes();
    group.bench_function("verify/plain", |b| b.iter(|| assert!(key.verify_plain(black_box(&message), &signature))));
    group.bench_function("verify/tables", |b| b.iter(|| assert!(key.verify(black_box(&message), &signature))));
    group.bench_function("key_load", |b| b.iter(|| Sm2Key::from_sec1(black_box(point.as_bytes()), SM2_DIST_ID)));
    group.finish();
}

criterion_group!(benches, token, batch, sm2);
criterion_main!(benches);
