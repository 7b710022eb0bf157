#![no_main]
libfuzzer_sys::fuzz_target!(|payload: &str| {
    let _ = cardgate::token::decode_unverified(payload, "EC1:");
});
