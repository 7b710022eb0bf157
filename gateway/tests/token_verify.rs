//! E-card token verification: every refusal with its code, the header rules, replay, and the
//! known-answer tests of the signature algorithms.

use std::sync::{Arc, OnceLock};

use cardgate::token::issue::{self, MintRequest, SigningKey};
use cardgate::token::{
    Algorithm, DelegateClaim, ECardClaim, MemoryReplayStore, Profile, PublicKey, RevocationList, TokenError, TrustList,
    TrustedKey, Verifier, VerifyOptions, envelope, qr,
};
use coset::{CoseSign1Builder, HeaderBuilder, TaggedCborSerializable};

const NOW: i64 = 1_780_000_000;

struct Issuer {
    signing: SigningKey,
    public: PublicKey,
}

/// One key pair per algorithm, generated once (RSA generation is slow).
fn issuer(algorithm: Algorithm) -> &'static Issuer {
    static ISSUERS: OnceLock<Vec<(Algorithm, Issuer)>> = OnceLock::new();
    let all = ISSUERS.get_or_init(|| {
        Algorithm::ALL
            .into_iter()
            .map(|alg| {
                let generated = issue::generate(alg).expect("generate");
                let signing = SigningKey::from_pkcs8_pem(&generated.private_pem).expect("private key");
                let public = PublicKey::from_spki_pem(&generated.public_pem).expect("public key");
                (alg, Issuer { signing, public })
            })
            .collect()
    });
    &all.iter().find(|(a, _)| *a == algorithm).expect("every algorithm").1
}

fn trusted(algorithm: Algorithm, kid: &str) -> TrustedKey {
    TrustedKey {
        kid: kid.as_bytes().to_vec(),
        key: issuer(algorithm).public.clone(),
        not_before: None,
        not_after: None,
        regions: vec![],
    }
}

fn card() -> ECardClaim {
    ECardClaim {
        card_id: "110105199001011234".into(),
        holder_name: "张三".into(),
        insured_region: "110105".into(),
        insurance_types: vec!["310".into()],
        delegate: None,
    }
}

fn mint_with(algorithm: Algorithm, kid: &str, issued_at: i64, ttl_secs: i64, ecard: ECardClaim) -> String {
    let request = MintRequest {
        issuer: "CN-110000".into(),
        kid: kid.as_bytes().to_vec(),
        issued_at,
        ttl_secs,
        token_id: None,
        ecard,
    };
    issue::mint(&issuer(algorithm).signing, &request).expect("mint")
}

fn mint(algorithm: Algorithm) -> String {
    mint_with(algorithm, "k1", NOW, 120, card())
}

fn verifier(keys: Vec<TrustedKey>, revocations: RevocationList) -> Verifier {
    Verifier::new(Arc::new(TrustList::from_keys(keys)), Arc::new(revocations), VerifyOptions::default())
}

fn ed25519_verifier() -> Verifier {
    verifier(vec![trusted(Algorithm::EdDsa, "k1")], RevocationList::default())
}

#[test]
fn minted_tokens_verify_for_every_algorithm() {
    for algorithm in Algorithm::ALL {
        let token = mint(algorithm);
        let verified = verifier(vec![trusted(algorithm, "k1")], RevocationList::default())
            .verify(&token, NOW + 30)
            .unwrap_or_else(|e| panic!("{algorithm}: {e:?}"));
        assert_eq!(verified.algorithm, algorithm);
        assert_eq!(verified.kid, b"k1");
        assert_eq!(verified.ecard, Some(card()));
        assert_eq!(verified.claims.issuer.as_deref(), Some("CN-110000"));
        assert_eq!(verified.claims.expires_at, Some(NOW + 120));
        assert_eq!(verified.claims.token_id.as_ref().map(Vec::len), Some(16));
    }
}

#[test]
fn delegate_survives_the_round_trip() {
    let mut ecard = card();
    ecard.delegate = Some(DelegateClaim {
        card_id: "110105196501011111".into(),
        name: Some("李四".into()),
        relation: "parent".into(),
    });
    let token = mint_with(Algorithm::EdDsa, "k1", NOW, 120, ecard.clone());
    assert_eq!(ed25519_verifier().verify(&token, NOW).expect("valid").ecard, Some(ecard));
}

#[test]
fn expired_token_is_refused_after_the_skew() {
    let token = mint(Algorithm::EdDsa);
    let v = ed25519_verifier();
    assert!(v.verify(&token, NOW + 120 + 59).is_ok(), "within the 60 s skew");
    assert_eq!(v.verify(&token, NOW + 120 + 60).expect_err("expired"), TokenError::Expired);
    assert_eq!(TokenError::Expired.code(), "token_expired");
}

#[test]
fn token_from_the_future_is_not_yet_valid() {
    let token = mint(Algorithm::EdDsa);
    let v = ed25519_verifier();
    assert!(v.verify(&token, NOW - 60).is_ok(), "within the skew");
    assert_eq!(v.verify(&token, NOW - 61).expect_err("early"), TokenError::NotYetValid);
}

#[test]
fn lifetime_beyond_the_profile_maximum_is_refused() {
    let token = mint_with(Algorithm::EdDsa, "k1", NOW, 3600, card());
    let error = ed25519_verifier().verify(&token, NOW).expect_err("too long-lived");
    assert_eq!(error.code(), "token_profile_invalid");
}

#[test]
fn unknown_key_is_refused() {
    let token = mint_with(Algorithm::EdDsa, "other-kid", NOW, 120, card());
    assert_eq!(ed25519_verifier().verify(&token, NOW).expect_err("unknown"), TokenError::UnknownKey);
}

#[test]
fn forged_signature_is_refused() {
    // Signed by an SM2 key but claiming the Ed25519 key's id and algorithm is impossible to
    // build with `mint`, so forge with a second Ed25519 key under the trusted kid.
    let forger = issue::generate(Algorithm::EdDsa).expect("generate");
    let forger = SigningKey::from_pkcs8_pem(&forger.private_pem).expect("key");
    let request = MintRequest {
        issuer: "x".into(),
        kid: b"k1".to_vec(),
        issued_at: NOW,
        ttl_secs: 60,
        token_id: None,
        ecard: card(),
    };
    let forged = issue::mint(&forger, &request).expect("mint");
    assert_eq!(ed25519_verifier().verify(&forged, NOW).expect_err("forged"), TokenError::SignatureInvalid);
}

#[test]
fn algorithm_not_matching_the_key_is_refused() {
    let token = mint(Algorithm::Es256);
    let error = ed25519_verifier().verify(&token, NOW).expect_err("wrong algorithm");
    assert_eq!(error.code(), "key_out_of_scope");
}

#[test]
fn revoked_card_and_revoked_key_are_refused() {
    let token = mint(Algorithm::EdDsa);
    let cards = verifier(vec![trusted(Algorithm::EdDsa, "k1")], RevocationList::new([card().card_id], []));
    assert_eq!(cards.verify(&token, NOW).expect_err("revoked"), TokenError::CardRevoked);
    let keys = verifier(vec![trusted(Algorithm::EdDsa, "k1")], RevocationList::new([], [b"k1".to_vec()]));
    assert_eq!(keys.verify(&token, NOW).expect_err("revoked"), TokenError::KeyRevoked);
}

#[test]
fn key_limited_to_other_regions_is_out_of_scope() {
    let token = mint(Algorithm::EdDsa);
    let mut shanghai = trusted(Algorithm::EdDsa, "k1");
    shanghai.regions = vec!["31".into()];
    let error = verifier(vec![shanghai.clone()], RevocationList::default()).verify(&token, NOW).expect_err("scope");
    assert_eq!(error.code(), "key_out_of_scope");
    shanghai.regions = vec!["31".into(), "1101".into()];
    assert!(verifier(vec![shanghai], RevocationList::default()).verify(&token, NOW).is_ok());
}

#[test]
fn key_past_its_validity_is_out_of_scope() {
    let token = mint(Algorithm::EdDsa);
    let mut retired = trusted(Algorithm::EdDsa, "k1");
    retired.not_after = Some(NOW - 1);
    let error = verifier(vec![retired], RevocationList::default()).verify(&token, NOW).expect_err("retired");
    assert_eq!(error.code(), "key_out_of_scope");
}

#[test]
fn token_is_consumed_once() {
    let v = ed25519_verifier();
    let store = MemoryReplayStore::new();
    let verified = v.verify(&mint(Algorithm::EdDsa), NOW).expect("valid");
    assert_eq!(v.claim_once(&verified, &store, NOW), Ok(()));
    assert_eq!(v.claim_once(&verified, &store, NOW + 1), Err(TokenError::Replayed));
    assert_eq!(TokenError::Replayed.code(), "token_replayed");
    let other = v.verify(&mint(Algorithm::EdDsa), NOW).expect("valid");
    assert_eq!(v.claim_once(&other, &store, NOW), Ok(()), "each token is unique");
}

#[test]
fn wrong_prefix_is_malformed() {
    let token = mint(Algorithm::EdDsa).replacen("EC1:", "HC1:", 1);
    assert_eq!(ed25519_verifier().verify(&token, NOW).expect_err("prefix").code(), "token_malformed");
}

/// Builds a token with chosen protected and unprotected key ids, signed by the Ed25519 key.
fn with_kids(protected: &[u8], unprotected: &[u8]) -> String {
    let claims = cardgate::token::claims::encode("iss", NOW, NOW + 60, b"0123456789abcdef", &card());
    let mut protected_header = HeaderBuilder::new().key_id(protected.to_vec()).build();
    protected_header.alg = Some(coset::Algorithm::Assigned(coset::iana::Algorithm::EdDSA));
    let sign1 = CoseSign1Builder::new()
        .protected(protected_header)
        .unprotected(HeaderBuilder::new().key_id(unprotected.to_vec()).build())
        .payload(claims)
        .create_signature(b"", |tbs| issuer(Algorithm::EdDsa).signing.sign(tbs).expect("sign"))
        .build();
    envelope::encode(&sign1.to_tagged_vec().expect("encode"), "EC1:")
}

#[test]
fn protected_key_id_wins_over_the_unprotected_one() {
    let v = verifier(vec![trusted(Algorithm::EdDsa, "k1"), trusted(Algorithm::EdDsa, "k2")], RevocationList::default());
    assert!(v.verify(&with_kids(b"k1", b""), NOW).is_ok());
    assert!(v.verify(&with_kids(b"", b"k1"), NOW).is_ok(), "unprotected kid counts when there is no protected one");
    assert_eq!(v.verify(&with_kids(b"wrong", b"k1"), NOW).expect_err("protected wins"), TokenError::UnknownKey);
    // A protected kid naming another trusted key: that key's signature check fails.
    let k2 = verifier(
        vec![trusted(Algorithm::EdDsa, "k1"), TrustedKey { kid: b"k2".to_vec(), ..trusted(Algorithm::Es256, "k2") }],
        RevocationList::default(),
    );
    assert!(k2.verify(&with_kids(b"k2", b"k1"), NOW).is_err());
}

#[test]
fn generic_mode_checks_signature_and_time_only() {
    let claims = cardgate::token::claims::encode("iss", NOW, NOW + 86_400 * 30, b"x", &card());
    let mut protected = HeaderBuilder::new().key_id(b"k1".to_vec()).build();
    protected.alg = Some(coset::Algorithm::Assigned(coset::iana::Algorithm::EdDSA));
    let sign1 = CoseSign1Builder::new()
        .protected(protected)
        .payload(claims)
        .create_signature(b"", |tbs| issuer(Algorithm::EdDsa).signing.sign(tbs).expect("sign"))
        .build();
    let token = envelope::encode(&sign1.to_tagged_vec().expect("encode"), "HC1:");
    let options = VerifyOptions { profile: Profile::Cwt, prefix: "HC1:".into(), ..VerifyOptions::default() };
    let generic = Verifier::new(
        Arc::new(TrustList::from_keys([trusted(Algorithm::EdDsa, "k1")])),
        Arc::new(RevocationList::default()),
        options,
    );
    let verified = generic.verify(&token, NOW).expect("a 30-day CWT is fine in generic mode");
    assert!(verified.ecard.is_none());
    assert_eq!(generic.verify(&token, NOW + 86_400 * 31).expect_err("expired"), TokenError::Expired);
}

#[test]
fn typical_token_fits_a_version_10_qr_code_at_level_m() {
    let token = mint(Algorithm::EdDsa);
    let code = qr::encode(&token).expect("fits");
    assert!(code.version().value() <= 10, "{} characters need version {}", token.len(), code.version().value());
    let sm2 = qr::encode(&mint(Algorithm::Sm2Sm3)).expect("fits");
    assert!(sm2.version().value() <= 10);
}

#[test]
fn ed25519_known_answers_rfc_8032() {
    // RFC 8032 section 7.1, TEST 1 and TEST 2.
    let cases: [(&str, &str, &str, &str); 2] = [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
    ];
    for (secret, public, message, signature) in cases {
        let pair = ring::signature::Ed25519KeyPair::from_seed_and_public_key(&hex(secret), &hex(public)).expect("key");
        assert_eq!(pair.sign(&hex(message)).as_ref(), hex(signature).as_slice());
        let key = PublicKey::ed25519(&hex(public)).expect("32 bytes");
        assert!(key.verify(&hex(message), &hex(signature)));
        let mut tampered = hex(signature);
        tampered[0] ^= 1;
        assert!(!key.verify(&hex(message), &tampered));
    }
}

#[test]
fn sm2_known_answer_from_the_sm2_crate() {
    // The `sm2` crate's published vector (signed by OpenSSL with SM3 and this distinguishing id).
    let public = hex(
        "0408D77AE04C01CC4C1104360DD8AF6B6F7DF334283D7C1A6AFD5652407B87BEE5014E2A57C36C150D16324DC664E31E6432359609C4E79847A5B161C8C7364C8A",
    );
    let signature = hex(
        "d1dcccedd9fb785e0f67c16b7c52901625c0b69de9bca2144acc7be713cad2fcf7d1eae6e3a157b36c65f672f738ca8b46298bf149a6510072c431b49cd88b1c",
    );
    let key = PublicKey::sm2_from_sec1(&public, "example@rustcrypto.org").expect("key");
    assert_eq!(key.algorithm(), Algorithm::Sm2Sm3);
    assert!(key.verify(b"testing", &signature));
    assert!(!key.verify(b"testinG", &signature));
    let other_id = PublicKey::sm2_from_sec1(&public, cardgate::token::trust::SM2_DIST_ID).expect("key");
    assert!(!other_id.verify(b"testing", &signature), "the distinguishing id is part of the signature");
}

#[test]
fn every_single_bit_flip_of_an_ed25519_token_is_refused() {
    let token = mint(Algorithm::EdDsa);
    let cose = envelope::decode(&token, "EC1:").expect("decodes");
    let v = ed25519_verifier();
    for at in 0..cose.len() {
        for bit in 0..8 {
            let mut tampered = cose.clone();
            tampered[at] ^= 1 << bit;
            assert!(v.verify(&envelope::encode(&tampered, "EC1:"), NOW).is_err(), "bit {bit} of byte {at}");
        }
    }
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex")).collect()
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    fn algorithm() -> impl Strategy<Value = Algorithm> {
        prop::sample::select(Algorithm::ALL.to_vec())
    }

    fn ecard() -> impl Strategy<Value = ECardClaim> {
        ("[0-9A-Z]{1,20}", "\\PC{1,8}", "[0-9]{6}", prop::collection::vec("[0-9]{3}", 1..3)).prop_map(
            |(card_id, holder_name, insured_region, insurance_types)| ECardClaim {
                card_id,
                holder_name,
                insured_region,
                insurance_types,
                delegate: None,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn mint_then_verify_round_trips(alg in algorithm(), ecard in ecard(), ttl in 1i64..600) {
            let token = mint_with(alg, "k1", NOW, ttl, ecard.clone());
            let v = verifier(vec![trusted(alg, "k1")], RevocationList::default());
            prop_assert_eq!(v.verify(&token, NOW).expect("valid").ecard, Some(ecard));
        }

        #[test]
        fn any_flipped_byte_of_the_signed_structure_is_refused(
            alg in algorithm(), index in any::<prop::sample::Index>(), mask in 1u8..=255,
        ) {
            let token = mint(alg);
            let mut cose = envelope::decode(&token, "EC1:").expect("decodes");
            let at = index.index(cose.len());
            cose[at] ^= mask;
            let tampered = envelope::encode(&cose, "EC1:");
            let v = verifier(vec![trusted(alg, "k1")], RevocationList::default());
            prop_assert!(v.verify(&tampered, NOW).is_err(), "byte {} flipped with {:#04x} still verifies", at, mask);
        }

        #[test]
        fn decoding_arbitrary_input_never_panics(text in "EC1:[0-9A-Z $%*+./:-]{0,300}", bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = cardgate::token::decode_unverified(&text, "EC1:");
            // Arbitrary bytes behind a valid envelope reach the CBOR and COSE decoders.
            let _ = cardgate::token::decode_unverified(&envelope::encode(&bytes, "EC1:"), "EC1:");
            let _ = cardgate::token::claims::Claims::decode(&bytes);
        }

        #[test]
        fn any_changed_character_of_the_qr_text_is_refused(index in any::<prop::sample::Index>(), c in "[0-9A-Z $%*+./:-]") {
            let token = mint(Algorithm::EdDsa);
            let at = 4 + index.index(token.len() - 4);
            prop_assume!(token[at..at + 1] != c);
            let tampered = format!("{}{}{}", &token[..at], c, &token[at + 1..]);
            prop_assert!(ed25519_verifier().verify(&tampered, NOW).is_err());
        }
    }
}

#[test]
fn empty_and_truncated_payloads_are_refused_promptly() {
    let v = ed25519_verifier();
    assert_eq!(v.verify("EC1:", NOW).expect_err("empty").code(), "token_malformed");
    let token = mint(Algorithm::EdDsa);
    let compressed = envelope::unbase45(&token[4..]).expect("base45");
    for cut in [0, 1, 2, compressed.len() / 2, compressed.len() - 1] {
        assert!(envelope::inflate(&compressed[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn zlib_bombs_stop_at_the_limit() {
    // 1 MiB of zeros compresses to about 1 KiB; inflating it must stop at 64 KiB.
    let bomb = envelope::deflate(&vec![0u8; 1 << 20]);
    let error = envelope::inflate(&bomb).expect_err("refused");
    assert!(error.to_string().contains("inflates past"), "{error}");
    // Just under the limit is fine.
    let fits = envelope::deflate(&vec![7u8; envelope::MAX_INFLATED_BYTES - 1]);
    assert_eq!(envelope::inflate(&fits).expect("fits").len(), envelope::MAX_INFLATED_BYTES - 1);
}
