//! Shared helpers for cardgate's end-to-end tests and benchmarks: a real gateway to test
//! against ([`harness`]), example plugin configurations and request builders.
//!
//! # Layout
//! - this file: helpers.
//! - `tests/`: integration tests (plugin loading and calling, ...).
//! - `benches/`: criterion benchmarks.
//! - `fixtures/`: deliberately broken or misbehaving plugin crates the tests build.

#![forbid(unsafe_code)]

pub mod harness;

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cardgate_sdk::{
    BillLine, CardClaims, Fen, Institution, InstitutionLevel, ItemCategory, SettlementRequest, YearToDate,
};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ lives in the workspace").to_owned()
}

/// The `cardgate` binary: the one `cargo test --workspace` built next to this test, unless a
/// source of it changed since (`cargo test -p cardgate-tests` alone rebuilds the gateway's
/// library, not its binary: the tests would run the daemon as it was before the change); else
/// a fresh build in a separate target directory.
pub fn cardgate_binary() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|dir| dir.join("cardgate")))
        .filter(|path| path.exists() && !older_than_its_sources(path));
    if let Some(path) = beside {
        return path;
    }
    let target = workspace_root().join("target/plugin-builds/bin");
    let status = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(workspace_root())
        .args(["build", "--quiet", "-p", "cardgate", "--bin", "cardgate", "--target-dir"])
        .arg(&target)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the cardgate binary failed");
    target.join("debug/cardgate")
}

/// Whether a source of the gateway (its crate's or the SDK's, or the lock file) changed after
/// `binary` was built.
fn older_than_its_sources(binary: &Path) -> bool {
    let modified = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let Some(built) = modified(binary) else { return false };
    let root = workspace_root();
    let mut places = vec![root.join("gateway"), root.join("sdk"), root.join("Cargo.lock")];
    while let Some(place) = places.pop() {
        if place.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&place) {
                places.extend(entries.flatten().map(|e| e.path()));
            }
        } else if modified(&place).is_some_and(|m| m > built) {
            return true;
        }
    }
    false
}

/// An address on 127.0.0.1 for a daemon a test starts as its own process, and may kill and
/// restart on the same address: a port below the kernel's ephemeral range, free when chosen,
/// never handed out twice by this process. A port from the ephemeral range (`127.0.0.1:0`,
/// released before the daemon binds it) can be given to an outgoing connection of another
/// test in between, or while the daemon is down between a kill and its restart: the daemon
/// then cannot bind it and the test fails for nothing it tests.
pub fn listen_addr() -> SocketAddr {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    const FIRST: u32 = 10_000;
    let ephemeral_from = ephemeral_ports_from();
    let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).and_then(|l| l.local_addr()).ok();
    if ephemeral_from <= FIRST + 1_000 {
        // A system whose ephemeral range starts low: no range to keep to, only the check.
        return free(0).expect("a free port");
    }
    let span = ephemeral_from - FIRST;
    let start = std::collections::hash_map::RandomState::new().build_hasher().finish() as u32 % span;
    let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    (0..span)
        .map(|i| (FIRST + (start + i) % span) as u16)
        .find_map(|port| if given.contains(&port) { None } else { free(port) })
        .inspect(|addr| {
            given.insert(addr.port());
        })
        .expect("a free port below the ephemeral range")
}

/// The first port the kernel hands outgoing connections (Linux's default where it cannot be read).
fn ephemeral_ports_from() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// `plugins/<name>/config.example.toml`, as the JSON the gateway hands the plugin.
pub fn example_plugin_config(plugin: &str) -> serde_json::Value {
    let path = workspace_root().join("plugins").join(plugin).join("config.example.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `plugins/<plugin>/config.example.toml` as the `[plugins.<name>.config]` section of a
/// gateway configuration (its table headers moved under that section).
pub fn plugin_config_toml(plugin: &str, name: &str) -> String {
    let path = workspace_root().join("plugins").join(plugin).join("config.example.toml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let section = format!("plugins.{name}.config");
    let mut out = format!("[{section}]\n");
    for line in text.lines() {
        let moved = if let Some(rest) = line.strip_prefix("[[") {
            format!("[[{section}.{rest}")
        } else if let Some(rest) = line.strip_prefix('[') {
            format!("[{section}.{rest}")
        } else {
            line.to_owned()
        };
        out.push_str(&moved);
        out.push('\n');
    }
    out
}

/// A bill line of one unit.
pub fn line(category: ItemCategory, amount_fen: Fen) -> BillLine {
    BillLine {
        code: format!("ITEM-{amount_fen}"),
        name: "item".into(),
        category,
        quantity: cardgate_sdk::Decimal4::ONE,
        unit_price_fen: cardgate_sdk::Decimal4::from_whole(amount_fen).unwrap_or_default(),
        amount_fen,
        catalogue: None,
    }
}

/// A bill of `n` lines cycling through the three classes, as a hospital visit might have.
pub fn bill(n: usize) -> Vec<BillLine> {
    let classes = [ItemCategory::ClassA, ItemCategory::ClassB, ItemCategory::ClassC];
    (0..n).map(|i| line(classes[i % 3], 1_000 + 137 * i as Fen)).collect()
}

/// A settlement request for an employee-insured (310) card at a tertiary hospital, with nothing
/// settled yet this year.
pub fn settlement_request(lines: Vec<BillLine>) -> SettlementRequest {
    let total_fen = lines.iter().map(|l| l.amount_fen).sum();
    SettlementRequest {
        settlement_id: "S-TEST-1".into(),
        card: CardClaims {
            card_id: "110105199001011234".into(),
            holder_name: "Test Holder".into(),
            insured_region: "110105".into(),
            insurance_types: vec!["310".into()],
            delegate: None,
        },
        institution: Institution {
            id: "H110105001".into(),
            level: InstitutionLevel::Tertiary,
            region: "110105".into(),
        },
        insurance_type: "310".into(),
        lines,
        total_fen,
        due_fen: total_fen,
        prior: vec![],
        year_to_date: YearToDate { year: 2026, ..YearToDate::default() },
        use_account: true,
        encounter: None,
    }
}

#[cfg(test)]
mod binary_tests {
    use super::*;

    /// A daemon built before the gateway's sources last changed is not taken for the current one.
    #[test]
    fn a_binary_older_than_the_gateway_sources_is_stale() {
        let dir = tempfile::tempdir().expect("temp dir");
        let binary = dir.path().join("cardgate");
        let file = std::fs::File::create(&binary).expect("create");
        assert!(!older_than_its_sources(&binary), "built now, after every source");
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1)).expect("set mtime");
        assert!(older_than_its_sources(&binary), "built in 1970, before the sources");
    }
}

#[cfg(test)]
mod port_tests {
    use super::*;

    /// Ports for daemons come from below the ephemeral range, each once, and are free.
    #[test]
    fn listen_addresses_are_distinct_free_and_below_the_ephemeral_range() {
        let ephemeral_from = ephemeral_ports_from();
        let addresses: Vec<SocketAddr> = (0..200).map(|_| listen_addr()).collect();
        let ports: HashSet<u16> = addresses.iter().map(SocketAddr::port).collect();
        assert_eq!(ports.len(), 200, "a port handed out twice");
        for addr in &addresses {
            assert!(addr.ip().is_loopback());
            if ephemeral_from > 11_000 {
                assert!((10_000..ephemeral_from).contains(&u32::from(addr.port())), "{addr} is in the ephemeral range");
            }
        }
        TcpListener::bind(addresses[0]).expect("the first address is still free");
    }
}
