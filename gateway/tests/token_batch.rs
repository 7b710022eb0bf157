//! Ed25519 signatures checked together (token::batch): a batch answers exactly what single
//! checks answer, a bad token among good ones is found, a batch forms under concurrency and a
//! leader dropped while it waits still answers the others.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use cardgate::token::batch::{self, BatchSettings, Ed25519Key};
use cardgate::token::issue::{self, MintRequest, SigningKey};
use cardgate::token::{
    Algorithm, ECardClaim, PublicKey, RevocationList, TokenError, TrustList, TrustedKey, Verifier, VerifyOptions,
    envelope,
};

const NOW: i64 = 1_780_000_000;

struct Signer {
    pair: ring::signature::Ed25519KeyPair,
    key: Ed25519Key,
}

fn signer(seed: u8) -> Signer {
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("seed");
    let raw: [u8; 32] = ring::signature::KeyPair::public_key(&pair).as_ref().try_into().expect("32 bytes");
    Signer { pair, key: Ed25519Key::from_bytes(raw) }
}

/// `count` messages signed by three keys; those at `bad` get a signature of another message.
fn signed(count: usize, bad: &[usize]) -> Vec<(Ed25519Key, Vec<u8>, [u8; 64])> {
    let signers = [signer(1), signer(2), signer(3)];
    (0..count)
        .map(|i| {
            let signer = &signers[i % signers.len()];
            let message = format!("settlement {i}").into_bytes();
            let signed_text = if bad.contains(&i) { b"something else".to_vec() } else { message.clone() };
            let signature: [u8; 64] = signer.pair.sign(&signed_text).as_ref().try_into().expect("64 bytes");
            (signer.key.clone(), message, signature)
        })
        .collect()
}

fn together(items: &[(Ed25519Key, Vec<u8>, [u8; 64])]) -> Vec<bool> {
    let refs: Vec<(&Ed25519Key, &[u8], &[u8; 64])> = items.iter().map(|(k, m, s)| (k, m.as_slice(), s)).collect();
    batch::verify_together(&refs)
}

#[test]
fn a_batch_of_good_signatures_passes_and_each_bad_one_is_found() {
    let good = signed(64, &[]);
    assert_eq!(together(&good), vec![true; 64]);
    for bad in [vec![0], vec![31], vec![63], vec![5, 6, 40], (0..64).collect()] {
        let items = signed(64, &bad);
        let expected: Vec<bool> = (0..64).map(|i| !bad.contains(&i)).collect();
        assert_eq!(together(&items), expected, "bad at {bad:?}");
    }
    // A signature with its s component not reduced (s + L) is refused, alone and in a batch.
    let mut items = signed(8, &[]);
    add_group_order(&mut items[3].2);
    assert_eq!(together(&items), [true, true, true, false, true, true, true, true]);
    // Too short, and a batch of one, answer as ring does.
    assert_eq!(together(&signed(1, &[0])), [false]);
    assert_eq!(together(&signed(1, &[])), [true]);
    assert!(together(&[]).is_empty());
}

/// Adds the group order L to the scalar s (the signature's last 32 bytes, little-endian): the
/// same point equation, a non-canonical encoding every verifier must refuse.
fn add_group_order(signature: &mut [u8; 64]) {
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut carry = 0u16;
    for (byte, l) in signature[32..].iter_mut().zip(L) {
        let sum = u16::from(*byte) + u16::from(l) + carry;
        *byte = sum as u8;
        carry = sum >> 8;
    }
}

#[test]
fn rfc_8032_vectors_pass_together_and_fail_together_when_tampered() {
    // RFC 8032 section 7.1, tests 1 to 3.
    let vectors = [
        (
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
        (
            "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            "af82",
            "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        ),
    ];
    let items: Vec<(Ed25519Key, Vec<u8>, [u8; 64])> = vectors
        .iter()
        .map(|(public, message, signature)| {
            let key = Ed25519Key::from_bytes(hex(public).try_into().expect("32 bytes"));
            (key, hex(message), hex(signature).try_into().expect("64 bytes"))
        })
        .collect();
    assert_eq!(together(&items), [true, true, true]);
    let mut tampered = items.clone();
    tampered[1].2[0] ^= 1;
    assert_eq!(together(&tampered), [true, false, true]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_tokens_form_batches_and_get_exactly_the_single_check_answers() {
    let generated = issue::generate(Algorithm::EdDsa).expect("generate");
    let signing = SigningKey::from_pkcs8_pem(&generated.private_pem).expect("key");
    let public = PublicKey::from_spki_pem(&generated.public_pem).expect("key");
    let trusted = TrustedKey { kid: b"k1".to_vec(), key: public, not_before: None, not_after: None, regions: vec![] };
    let verifier = Arc::new(Verifier::new(
        Arc::new(TrustList::from_keys([trusted])),
        Arc::new(RevocationList::default()),
        VerifyOptions::default(),
    ));
    let tokens: Vec<(String, bool)> = (0..400)
        .map(|i| {
            let request = MintRequest {
                issuer: "CN-110000".into(),
                kid: b"k1".to_vec(),
                issued_at: NOW,
                ttl_secs: 120,
                token_id: None,
                ecard: ECardClaim {
                    card_id: format!("1101051990010{i:05}"),
                    holder_name: "张三".into(),
                    insured_region: "110105".into(),
                    insurance_types: vec!["310".into()],
                    delegate: None,
                },
            };
            let token = issue::mint(&signing, &request).expect("mint");
            if i % 7 == 3 {
                // The last byte of the COSE message is the signature's: flip it.
                let mut cose = envelope::decode(&token, "EC1:").expect("decode");
                *cose.last_mut().expect("bytes") ^= 0x40;
                (envelope::encode(&cose, "EC1:"), false)
            } else {
                (token, true)
            }
        })
        .collect();
    cardgate::metrics::install();
    let settings = BatchSettings { max: 32, wait: Duration::from_millis(1) };
    let tasks: Vec<_> = tokens
        .iter()
        .cloned()
        .map(|(token, _)| {
            let verifier = Arc::clone(&verifier);
            tokio::spawn(async move {
                let batched = verifier.verify_batched(&token, NOW, settings).await.map(|v| v.claims.token_id);
                let single = verifier.verify(&token, NOW).map(|v| v.claims.token_id);
                (batched, single)
            })
        })
        .collect();
    for (task, (_, good)) in tasks.into_iter().zip(&tokens) {
        let (batched, single) = task.await.expect("task");
        assert_eq!(batched, single, "a batch answers what a single check answers");
        match good {
            true => assert!(batched.is_ok(), "a good token passes: {batched:?}"),
            false => assert_eq!(batched.expect_err("a bad signature"), TokenError::SignatureInvalid),
        }
    }
    // Batches formed: more signatures were checked than batches were (a batch of one is a
    // single check), and every one of them was counted.
    let rendered = cardgate::metrics::render();
    let figure = |name: &str| -> f64 {
        rendered.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok()).unwrap_or_else(|| panic!("{name}"))
    };
    let (signatures, batches) =
        (figure("cardgate_token_signature_batch_size_sum"), figure("cardgate_token_signature_batch_size_count"));
    assert_eq!(signatures, 400.0);
    assert!(batches < signatures, "{batches} batches for {signatures} signatures");
    assert!(figure("cardgate_token_signature_batch_failures_total") >= 1.0, "the batches with a bad token failed");
}

#[tokio::test(flavor = "current_thread")]
async fn a_leader_dropped_while_it_gathers_still_answers_the_batch() {
    let items = signed(3, &[1]);
    let settings = BatchSettings { max: 64, wait: Duration::from_secs(5) };
    let mut cx = Context::from_waker(Waker::noop());
    let (k0, m0, s0) = items[0].clone();
    let mut leader = Box::pin(async move { batch::verify(&k0, m0, &s0, settings).await });
    assert!(leader.as_mut().poll(&mut cx).is_pending(), "the leader yields for others to join");
    let (k1, m1, s1) = items[1].clone();
    let (k2, m2, s2) = items[2].clone();
    let mut bad = pin!(batch::verify(&k1, m1, &s1, settings));
    let mut good = pin!(batch::verify(&k2, m2, &s2, settings));
    assert!(bad.as_mut().poll(&mut cx).is_pending(), "a member waits for the leader");
    assert!(good.as_mut().poll(&mut cx).is_pending(), "a member waits for the leader");
    drop(leader);
    assert_eq!(bad.as_mut().poll(&mut cx), Poll::Ready(false));
    assert_eq!(good.as_mut().poll(&mut cx), Poll::Ready(true));
    // Nothing is left forming: the next check leads a batch of its own and is answered.
    let (k, m, s) = items[0].clone();
    assert!(batch::verify(&k, m, &s, settings).await);
}

#[tokio::test(flavor = "current_thread")]
async fn batching_off_and_a_lone_request_check_alone() {
    let items = signed(2, &[1]);
    let off = BatchSettings { max: 1, wait: Duration::from_millis(1) };
    let on = BatchSettings::default();
    for settings in [off, on] {
        let (k, m, s) = items[0].clone();
        assert!(batch::verify(&k, m, &s, settings).await);
        let (k, m, s) = items[1].clone();
        assert!(!batch::verify(&k, m, &s, settings).await);
        let (k, m, _) = items[0].clone();
        assert!(!batch::verify(&k, m, &[0; 63], settings).await, "a signature of the wrong length");
    }
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex")).collect()
}
