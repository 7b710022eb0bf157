//! Keeps `include/cardgate_plugin.h` true to `src/abi.rs`: compiles a C program against the
//! header with the system C compiler and compares every size, offset and constant it prints
//! with the Rust definitions.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use cardgate_sdk::Operation;
use cardgate_sdk::abi::{self, Declaration, HostApi};

const PROGRAM: &str = r#"
#include <stdio.h>
#include <string.h>
#include "cardgate_plugin.h"
#define SIZE(t) printf("sizeof %s %zu\n", #t, sizeof(t))
#define OFF(t, f) printf("offset %s.%s %zu\n", #t, #f, offsetof(t, f))
#define NUM(c) printf("const %s %lld\n", #c, (long long)(c))
int main(void) {
    SIZE(cardgate_declaration); SIZE(cardgate_host_api);
    OFF(cardgate_declaration, magic); OFF(cardgate_declaration, abi_major);
    OFF(cardgate_declaration, abi_minor); OFF(cardgate_declaration, size);
    OFF(cardgate_declaration, flags); OFF(cardgate_declaration, reserved);
    OFF(cardgate_declaration, sdk_version); OFF(cardgate_declaration, name);
    OFF(cardgate_declaration, version); OFF(cardgate_declaration, init);
    OFF(cardgate_declaration, call); OFF(cardgate_declaration, destroy);
    OFF(cardgate_declaration, description);
    OFF(cardgate_host_api, size); OFF(cardgate_host_api, abi_major); OFF(cardgate_host_api, abi_minor);
    OFF(cardgate_host_api, max_log_level); OFF(cardgate_host_api, reserved);
    OFF(cardgate_host_api, ctx); OFF(cardgate_host_api, log);
    NUM(CARDGATE_ABI_MAJOR); NUM(CARDGATE_ABI_MINOR); NUM(CARDGATE_FLAG_UNWIND); NUM(CARDGATE_FLAG_EFFECT_FREE);
    NUM(CARDGATE_OP_INQUIRE); NUM(CARDGATE_OP_QUOTE); NUM(CARDGATE_OP_SETTLE);
    NUM(CARDGATE_OP_REVERSE); NUM(CARDGATE_OP_HEALTH);
    NUM(CARDGATE_STATUS_OK); NUM(CARDGATE_STATUS_ERROR); NUM(CARDGATE_STATUS_BAD_INPUT);
    NUM(CARDGATE_STATUS_PANIC); NUM(CARDGATE_STATUS_UNKNOWN_OPERATION);
    NUM(CARDGATE_LOG_ERROR); NUM(CARDGATE_LOG_WARN); NUM(CARDGATE_LOG_INFO);
    NUM(CARDGATE_LOG_DEBUG); NUM(CARDGATE_LOG_TRACE);
    printf("string CARDGATE_MAGIC %s %zu\n", CARDGATE_MAGIC, strlen(CARDGATE_MAGIC));
    printf("string CARDGATE_ENTRY_SYMBOL %s\n", CARDGATE_ENTRY_SYMBOL);
    return 0;
}
"#;

fn expected() -> BTreeMap<String, String> {
    let mut e = BTreeMap::new();
    let mut put = |k: &str, v: String| e.insert(k.to_owned(), v);
    put("sizeof cardgate_declaration", size_of::<Declaration>().to_string());
    put("sizeof cardgate_host_api", size_of::<HostApi>().to_string());
    macro_rules! off {
        ($c:literal, $t:ty, $($f:ident),*) => {
            $(put(concat!("offset ", $c, ".", stringify!($f)), offset_of!($t, $f).to_string());)*
        };
    }
    off!(
        "cardgate_declaration",
        Declaration,
        magic,
        abi_major,
        abi_minor,
        size,
        flags,
        reserved,
        sdk_version,
        name,
        version,
        init,
        call,
        destroy,
        description
    );
    off!("cardgate_host_api", HostApi, size, abi_major, abi_minor, max_log_level, reserved, ctx, log);
    let constants: [(&str, i64); 19] = [
        ("CARDGATE_ABI_MAJOR", abi::ABI_MAJOR.into()),
        ("CARDGATE_ABI_MINOR", abi::ABI_MINOR.into()),
        ("CARDGATE_FLAG_UNWIND", abi::FLAG_UNWIND.into()),
        ("CARDGATE_FLAG_EFFECT_FREE", abi::FLAG_EFFECT_FREE.into()),
        ("CARDGATE_OP_INQUIRE", (Operation::Inquire as u32).into()),
        ("CARDGATE_OP_QUOTE", (Operation::Quote as u32).into()),
        ("CARDGATE_OP_SETTLE", (Operation::Settle as u32).into()),
        ("CARDGATE_OP_REVERSE", (Operation::Reverse as u32).into()),
        ("CARDGATE_OP_HEALTH", (Operation::Health as u32).into()),
        ("CARDGATE_STATUS_OK", abi::STATUS_OK.into()),
        ("CARDGATE_STATUS_ERROR", abi::STATUS_ERROR.into()),
        ("CARDGATE_STATUS_BAD_INPUT", abi::STATUS_BAD_INPUT.into()),
        ("CARDGATE_STATUS_PANIC", abi::STATUS_PANIC.into()),
        ("CARDGATE_STATUS_UNKNOWN_OPERATION", abi::STATUS_UNKNOWN_OPERATION.into()),
        ("CARDGATE_LOG_ERROR", abi::LOG_ERROR.into()),
        ("CARDGATE_LOG_WARN", abi::LOG_WARN.into()),
        ("CARDGATE_LOG_INFO", abi::LOG_INFO.into()),
        ("CARDGATE_LOG_DEBUG", abi::LOG_DEBUG.into()),
        ("CARDGATE_LOG_TRACE", abi::LOG_TRACE.into()),
    ];
    for (name, value) in constants {
        put(&format!("const {name}"), value.to_string());
    }
    let magic = String::from_utf8(abi::MAGIC.to_vec()).expect("magic is ASCII");
    put("string CARDGATE_MAGIC", format!("{magic} {}", abi::MAGIC.len()));
    put("string CARDGATE_ENTRY_SYMBOL", abi::ENTRY_SYMBOL.to_owned());
    e
}

fn compile_and_run(dir: &Path) -> String {
    let source = dir.join("layout.c");
    let binary = dir.join("layout");
    std::fs::write(&source, PROGRAM).expect("write the C program");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Werror", "-o"])
        .arg(&binary)
        .arg("-I")
        .arg(&include)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}`: {e}"));
    assert!(status.success(), "the header does not compile cleanly with {cc}");
    let out = Command::new(&binary).output().expect("run the layout program");
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn c_header_matches_rust_abi() {
    let dir = std::env::temp_dir().join(format!("cardgate-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let printed = compile_and_run(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let from_c: BTreeMap<String, String> = printed
        .lines()
        .filter_map(|line| {
            let (kind, rest) = line.split_once(' ')?;
            let (name, value) = rest.split_once(' ')?;
            Some((format!("{kind} {name}"), value.to_owned()))
        })
        .collect();
    assert_eq!(from_c, expected());
}

#[test]
fn declaration_header_is_stable_across_versions() {
    // The first 16 bytes are read before anything else; they must never move.
    assert_eq!(offset_of!(Declaration, magic), 0);
    assert_eq!(offset_of!(Declaration, abi_major), 8);
    assert_eq!(offset_of!(Declaration, abi_minor), 10);
    assert_eq!(offset_of!(Declaration, size), 12);
}
