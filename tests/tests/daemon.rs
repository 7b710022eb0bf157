//! The real `cardgate` binary as it runs in production: logging on at the default level,
//! signals, reloads, a disk that fills up and empties again, and the modes of the files it
//! writes. Every request has a deadline here: a daemon that hangs fails the test, it does not
//! hang it.

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cardgate::client::{Client, Reply};
use cardgate_sdk::testing::build_cdylib;
use cardgate_tests::harness::{ADMIN_TOKEN, Card, Options, Setup, admin, admin_text};
use cardgate_tests::{cardgate_binary, listen_addr};
use http::{Method, StatusCode};
use serde_json::{Value, json};

/// A daemon child whose stderr is read into `log` (unless `drain` is false: then nobody reads it).
struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(config: &Path, level: Option<&str>, drain: bool) -> Self {
        let mut command = Command::new(cardgate_binary());
        command.args(["serve", "--config"]).arg(config);
        match level {
            Some(level) => command.env("CARDGATE_LOG", level),
            None => command.env_remove("CARDGATE_LOG"),
        };
        Self::spawn(command, drain)
    }

    /// `cardgate serve` started from a shell after `ulimit {limit}` (`-Sn 256`: a soft limit on
    /// open files of 256).
    fn start_with_ulimit(config: &Path, limit: &str) -> Self {
        let mut command = Command::new("sh");
        command
            .args(["-c", &format!("ulimit {limit} && exec \"$0\" serve --config \"$1\"")])
            .arg(cardgate_binary())
            .arg(config)
            .env_remove("CARDGATE_LOG");
        Self::spawn(command, true)
    }

    fn spawn(mut command: Command, drain: bool) -> Self {
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("start cardgate");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().expect("stderr");
        if drain {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    log.lock().expect("log").push_str(&String::from_utf8_lossy(&buffer[..n]));
                }
            });
        } else {
            // Held open and never read: the pipe fills after 64 KiB of log.
            std::mem::forget(stderr);
        }
        Self { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
        assert!(status.expect("kill").success());
    }

    /// SIGTERM, then the exit status within `limit`.
    fn stop(mut self, limit: Duration) -> Option<i32> {
        self.signal("TERM");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let log = self.log();
                let _ = self.child.kill();
                panic!("the daemon did not stop within {limit:?} of SIGTERM; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future).await.unwrap_or_else(|_| panic!("{what}: no answer in 20 s"))
}

async fn wait_ready(client: &Client, daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let probe =
        || tokio::time::timeout(Duration::from_secs(2), client.send(Method::GET, "/v1/settlements/none", &[], None));
    while !matches!(probe().await, Ok(Ok(_))) {
        assert!(Instant::now() < deadline, "the daemon did not start; its log:\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn bill(token: &str) -> Value {
    json!({
        "token": token, "terminal_id": "POS-01", "total_fen": 5000,
        "lines": [{ "code": "XA01", "name": "Amoxicillin", "category": "class_a", "quantity": 2, "unit_price_fen": 2500, "amount_fen": 5000 }]
    })
}

async fn settle(setup: &Setup, client: &Client, key: &str, token: &str) -> Reply {
    let body = bill(token).to_string();
    within("a settlement", client.send(Method::POST, "/v1/settlements", &[("idempotency-key", key)], Some(&body)))
        .await
        .unwrap_or_else(|e| panic!("settlement {key} in {}: {e}", setup.dir.path().display()))
}

/// A daemon with an admin listener, started and answering: its setup, the daemon, a client as
/// the pharmacy, and the admin address. `level`: `CARDGATE_LOG` (None: unset, the default);
/// `drain`: whether anyone reads its stderr.
async fn running(level: Option<&str>, drain: bool) -> (Setup, Daemon, Client, SocketAddr) {
    running_on(None, level, drain).await
}

/// The daemon on `engine` (default: the tests' ledger).
async fn running_on(
    engine: Option<&'static str>,
    level: Option<&str>,
    drain: bool,
) -> (Setup, Daemon, Client, SocketAddr) {
    running_with(engine, |config| Daemon::start(config, level, drain)).await
}

/// A daemon with an admin listener on `engine`, started by `start` from its configuration
/// file, and answering.
async fn running_with(
    engine: Option<&'static str>,
    start: impl FnOnce(&Path) -> Daemon,
) -> (Setup, Daemon, Client, SocketAddr) {
    let (addr, admin_addr) = (listen_addr(), listen_addr());
    let options = Options { admin_listen: Some(admin_addr), engine, ..Options::default() };
    let setup = Setup::create(&options, &addr.to_string());
    let daemon = start(&setup.dir.path().join("cardgate.toml"));
    let client = setup.client(addr, 1);
    wait_ready(&client, &daemon).await;
    (setup, daemon, client, admin_addr)
}

/// A process's limit on open files from `/proc/PID/limits` (`self` for this one): soft, hard.
fn open_files(pid: &str) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
    let mut values = line.split_whitespace().skip(3).map(str::to_owned);
    (values.next().expect("soft"), values.next().expect("hard"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_default_log_level_it_reloads_settles_and_stops_on_sigterm() {
    let (setup, daemon, client, admin_addr) = running(None, true).await;
    let card = Card::beijing();
    assert_eq!(settle(&setup, &client, "log-1", &setup.token(&card, 120)).await.status, StatusCode::CREATED);

    // Two SIGHUPs: each reloads (and logs, from a blocking thread); the daemon keeps answering.
    // The second is sent once the first reload is logged: two signals sent back to back may
    // reach the process as one (the kernel keeps one pending signal of a kind).
    let deadline = Instant::now() + Duration::from_secs(20);
    for reloads in 1..=2 {
        daemon.signal("HUP");
        while daemon.log().matches("configuration reloaded").count() < reloads {
            assert!(Instant::now() < deadline, "{reloads} reloads were not logged:\n{}", daemon.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(settle(&setup, &client, "log-2", &setup.token(&card, 120)).await.status, StatusCode::CREATED);

    let (status, body) = within("the admin reload", admin(admin_addr, Method::POST, "/admin/plugins/reload")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(settle(&setup, &client, "log-3", &setup.token(&card, 120)).await.status, StatusCode::CREATED);

    let log = daemon.log();
    assert!(log.contains("cardgate serving") && log.contains("plugins reloaded"), "logging is on:\n{log}");
    // Its stderr is a pipe (as under systemd or a log shipper): plain text, no colour codes.
    assert!(!log.contains('\u{1b}'), "terminal escape codes in a piped log:\n{log}");
    assert!(log.contains(" INFO cardgate::cli::serve: cardgate serving"), "{log}");
    assert_eq!(daemon.stop(Duration::from_secs(15)), Some(0));
    // Whatever the daemon wrote of its ledger (either engine: a file, or a directory of
    // shards, journals and tables) is its owner's alone, whatever the umask it was run with.
    if setup.database.is_some() {
        return; // The ledger is the database server's (its files are its own).
    }
    let mut written = 0;
    let mut places = vec![setup.dir.path().join("ledger"), setup.dir.path().join("ledger-wal")];
    while let Some(place) = places.pop() {
        let Ok(meta) = std::fs::metadata(&place) else { continue };
        written += 1;
        if meta.is_dir() {
            assert_eq!(mode(&place), 0o700, "{}", place.display());
            places.extend(std::fs::read_dir(&place).expect("directory").flatten().map(|e| e.path()));
        } else {
            assert_eq!(mode(&place) & 0o077, 0, "{}", place.display());
        }
    }
    assert!(written >= 1, "the ledger was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_into_a_pipe_nobody_reads_never_stall_it() {
    let (setup, daemon, client, _) = running(Some("debug"), false).await;
    let card = Card::beijing();
    // Far more than the 64 KiB a pipe holds, at debug level (a request line each, and more).
    for i in 0..120 {
        let reply = settle(&setup, &client, &format!("debug-{i}"), &setup.token(&card, 120)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    }
    daemon.signal("HUP");
    assert_eq!(daemon.stop(Duration::from_secs(15)), Some(0));
}

/// `prlimit` on the daemon: a file-size limit of 0 makes every write to its files fail, as a
/// full disk does; `unlimited` is the space coming back.
fn file_size_limit(daemon: &Daemon, limit: &str) {
    let status = Command::new("prlimit")
        .arg(format!("--pid={}", daemon.child.id()))
        .arg(format!("--fsize={limit}:unlimited"))
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_settlements_with_503_and_readiness_comes_back_with_the_space() {
    // The embedded ledger's disk (a database server's full disk is the server's to report).
    let (setup, daemon, client, admin_addr) =
        running_on(Some(cardgate_tests::harness::embedded_engine()), None, true).await;
    let card = Card::beijing();
    let before = settle(&setup, &client, "disk-1", &setup.token(&card, 120)).await;
    assert_eq!(before.status, StatusCode::CREATED, "{}", before.body);

    file_size_limit(&daemon, "0");
    let token = setup.token(&card, 120);
    let refused = settle(&setup, &client, "disk-2", &token).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.body);
    assert_eq!(refused.json()["code"], "storage_unavailable");
    let (status, ready) = within("readiness", admin(admin_addr, Method::GET, "/readyz")).await;
    assert_eq!((status, &ready["ledger"]), (StatusCode::SERVICE_UNAVAILABLE, &json!(false)), "{ready}");
    // Reads still answer.
    let id = before.json()["settlement_id"].as_str().expect("id").to_owned();
    let read = within("a read", client.send(Method::GET, &format!("/v1/settlements/{id}"), &[], None)).await;
    assert_eq!(read.expect("answer").status, StatusCode::OK);

    file_size_limit(&daemon, "unlimited");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, ready) = within("readiness", admin(admin_addr, Method::GET, "/readyz")).await;
        if status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "not ready again after the space came back: {ready}\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The refused request, retried with its key and token, settles once.
    let retried = settle(&setup, &client, "disk-2", &token).await;
    assert_eq!(retried.status, StatusCode::CREATED, "{}", retried.body);
    let again = settle(&setup, &client, "disk-2", &token).await;
    assert_eq!(again.json()["settlement_id"], retried.json()["settlement_id"]);
    let read = within("a read", client.send(Method::GET, &format!("/v1/settlements/{id}"), &[], None)).await;
    assert_eq!(read.expect("answer").json()["state"], "settled", "nothing acknowledged was lost");
    assert!(daemon.log().contains("ledger: commit") || daemon.log().contains("cannot begin"), "{}", daemon.log());
    assert_eq!(daemon.stop(Duration::from_secs(15)), Some(0));
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_keeps_keys_the_secret_and_the_ledger_to_their_owner() {
    let plugins = tempfile::tempdir().expect("temp dir");
    for (package, file) in [
        ("basic-medical", "libbasic_medical.so"),
        ("critical-illness", "libcritical_illness.so"),
        ("medical-assistance", "libmedical_assistance.so"),
    ] {
        std::fs::copy(build_cdylib(package), plugins.path().join(file)).expect("copy plugin");
    }
    let root = tempfile::tempdir().expect("temp dir");
    let dir = root.path().join("dev");
    let addr = listen_addr();
    let mut child = Command::new(cardgate_binary())
        .args(["dev", "--listen", &addr.to_string(), "--dir"])
        .arg(&dir)
        .arg("--plugins")
        .arg(plugins.path())
        .env_remove("CARDGATE_LOG")
        // As a built binary is run, not by cargo.
        .env_remove("CARGO_MANIFEST_DIR")
        .stdout(std::fs::File::create(root.path().join("dev.out")).expect("stdout file"))
        .stderr(Stdio::null())
        .spawn()
        .expect("start cardgate dev");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.join("ledger.db-wal").exists() {
        assert!(Instant::now() < deadline && child.try_wait().expect("wait").is_none(), "dev did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();

    // What it prints to try it: this binary's own commands, and a key that differs each run.
    let printed = std::fs::read_to_string(root.path().join("dev.out")).expect("dev output");
    let binary = cardgate_binary().display().to_string();
    assert!(printed.contains(&format!("TOKEN=$({binary} token mint")), "{printed}");
    assert!(!printed.contains("cargo run") && printed.contains("$RANDOM"), "{printed}");
    assert_eq!(mode(&dir), 0o700);
    for file in
        ["cardgate.toml", "ledger.secret", "server.key", "issuer.key", "pharmacy.key", "ledger.db", "ledger.db-wal"]
    {
        assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
    }
    let config = std::fs::read_to_string(dir.join("cardgate.toml")).expect("config");
    assert!(config.contains("secret_file = \"ledger.secret\"") && !config.contains("\nsecret ="), "{config}");

    // check-config says nothing while the modes are right, and warns once they are not.
    let check = || {
        let out = Command::new(cardgate_binary())
            .args(["check-config", "--config"])
            .arg(dir.join("cardgate.toml"))
            .output()
            .expect("check-config");
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!check().contains("warning"), "{}", check());
    std::fs::set_permissions(dir.join("ledger.secret"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(dir.join("ledger.db"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let warned = check();
    assert!(warned.contains("warning: ledger.secret_file") && warned.contains("warning: ledger.path"), "{warned}");
}

/// Sends raw bytes to the admin listener and reads what comes back until it closes (or 10 s).
async fn raw_admin(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect admin");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_refuses_what_a_web_page_could_send_and_closes_stalled_connections() {
    let (_setup, daemon, _client, admin_addr) = running(None, true).await;

    // A form post from a page (text/plain, no preflight), a rebound DNS name, a foreign origin.
    let form = "POST /admin/plugins/reload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    assert!(raw_admin(admin_addr, form).await.starts_with("HTTP/1.1 403"), "a text/plain POST is refused");
    let rebound = "GET /admin/plugins HTTP/1.1\r\nHost: attacker.example:8444\r\nConnection: close\r\n\r\n";
    assert!(raw_admin(admin_addr, rebound).await.starts_with("HTTP/1.1 403"), "a foreign Host is refused");
    let origin = "POST /admin/plugins/reload HTTP/1.1\r\nHost: localhost\r\nOrigin: http://attacker.example\r\nContent-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    assert!(raw_admin(admin_addr, origin).await.starts_with("HTTP/1.1 403"), "a foreign Origin is refused");
    let operator = format!(
        "POST /admin/plugins/reload HTTP/1.1\r\nHost: localhost:1\r\nContent-Type: application/json\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert!(raw_admin(admin_addr, &operator).await.starts_with("HTTP/1.1 200"), "the operator's reload passes");

    // A half-sent request is closed after the header timeout, not held open.
    let started = Instant::now();
    let half = raw_admin(admin_addr, "GET /healthz HTTP/1.1\r\nHost: local").await;
    assert!(started.elapsed() < Duration::from_secs(9), "a stalled connection stayed open: {half:?}");

    // Idle sockets past the cap are closed at once; the listener still answers afterwards.
    let mut idle = Vec::new();
    for _ in 0..cardgate::server::admin::MAX_CONNECTIONS + 8 {
        idle.push(tokio::net::TcpStream::connect(admin_addr).await.expect("connect"));
    }
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = within("health", admin(admin_addr, Method::GET, "/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(daemon.stop(Duration::from_secs(15)), Some(0));
}

/// Any local user can connect to a loopback port: what reads the ledger, lists the plugins or
/// reloads them answers only the operator's token; health, readiness and metrics answer anyone
/// (probes, scrapers). Without a token configured, the plain listener serves none of `/admin/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_its_operator_alone() {
    let (_setup, daemon, _client, admin_addr) = running(None, true).await;
    let request = |method: &str, path: &str, authorization: Option<&str>| {
        let authorization = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    let guarded = [
        ("GET", "/admin/plugins"),
        ("GET", "/admin/routes"),
        ("GET", "/admin/ledger/export?date=2020-01-01"),
        ("POST", "/admin/plugins/reload"),
    ];
    let right = format!("Bearer {ADMIN_TOKEN}");
    let wrong = format!("Bearer {}x", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]);
    let basic = format!("Basic {ADMIN_TOKEN}");
    for (method, path) in guarded {
        for authorization in [None, Some(wrong.as_str()), Some(basic.as_str()), Some("Bearer")] {
            let answer = raw_admin(admin_addr, &request(method, path, authorization)).await;
            assert!(answer.starts_with("HTTP/1.1 401"), "{method} {path} with {authorization:?}: {answer}");
            assert!(answer.to_ascii_lowercase().contains("www-authenticate: bearer"), "{answer}");
            assert!(answer.contains("\"code\":\"unauthorized\""), "{answer}");
        }
        let answer = raw_admin(admin_addr, &request(method, path, Some(&right))).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{method} {path} with the token: {answer}");
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let answer = raw_admin(admin_addr, &request("GET", path, None)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path} without a token: {answer}");
    }
    assert_eq!(daemon.stop(Duration::from_secs(15)), Some(0));

    // The same listener with no token configured: /admin/ refused to everyone, the rest served.
    let (_setup, daemon, _client, admin_addr) = running_with(None, |config| {
        let text = std::fs::read_to_string(config).expect("config");
        std::fs::write(config, text.replace("token_file = \"admin.token\"\n", "")).expect("config");
        Daemon::start(config, None, true)
    })
    .await;
    for (method, path) in guarded {
        let answer = raw_admin(admin_addr, &request(method, path, Some(&right))).await;
        assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("token_file"), "{method} {path}: {answer}");
    }
    let answer = raw_admin(admin_addr, &request("GET", "/readyz", None)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(daemon.stop(Duration::from_secs(15)), Some(0));
}

/// Started where the soft limit on open files is a shell's usual 1,024 or lower, the daemon
/// raises it to the hard limit (every connection holds a descriptor) and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_raises_a_low_open_files_limit_to_the_hard_one() {
    let (_, hard) = open_files("self");
    let (setup, daemon, client, _) = running_with(None, |config| Daemon::start_with_ulimit(config, "-Sn 256")).await;
    let (soft, daemon_hard) = open_files(&daemon.child.id().to_string());
    assert_eq!(daemon_hard, hard, "the hard limit is the shell's");
    if hard.parse::<u64>().is_ok_and(|h| h > 256) {
        assert_eq!(soft, hard, "the soft limit is not the hard one");
        assert!(daemon.log().contains("open files limit raised to its hard limit from=256"), "{}", daemon.log());
    } else {
        // No room above 256: the limit stays as it was, and the daemon says it is low.
        assert_eq!(soft, "256");
        assert!(daemon.log().contains("open files limit is low"), "{}", daemon.log());
    }
    assert_eq!(
        settle(&setup, &client, "files-1", &setup.token(&Card::beijing(), 120)).await.status,
        StatusCode::CREATED
    );
    assert_eq!(daemon.stop(Duration::from_secs(15)), Some(0));
}

/// A flood of connections up to the open-files limit: past the cap (the limit less what the
/// ledger and the pools keep) connections are closed as they arrive and counted; the ledger
/// keeps its descriptors, and once the flood is gone a till settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_is_capped_below_the_open_files_limit() {
    // 600 descriptors in all: at most 300 connections (half the limit; the limit less 512
    // would be fewer).
    let (setup, daemon, client, admin_addr) =
        running_with(None, |config| Daemon::start_with_ulimit(config, "-n 600")).await;
    let addr = client.addr();
    assert!(daemon.log().contains("open files limit is low"), "{}", daemon.log());
    // A till's keep-alive connection, open before the flood.
    let mut till = within("a connection", client.connect()).await.expect("connect");
    // 450 bare connections held open (none says a word: each waits out its handshake timeout).
    let mut held = Vec::new();
    for _ in 0..450 {
        held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let refused = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("cardgate_connections_refused_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut seen = 0;
    while Instant::now() < deadline && seen < 150 {
        let (status, text) = within("metrics", admin_text(admin_addr, Method::GET, "/metrics")).await;
        assert_eq!(status, StatusCode::OK);
        seen = refused(&text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!((150..=160).contains(&seen), "{seen} connections refused of 450 over a cap of 300");
    assert_eq!(daemon.log().matches("connections refused").count(), 1, "{}", daemon.log());
    // At the cap, the till's connection settles: the ledger kept the descriptors it writes with.
    let during = bill(&setup.token(&Card::beijing(), 120)).to_string();
    let reply = within(
        "a settlement during the flood",
        till.send(Method::POST, "/v1/settlements", &[("idempotency-key", "during-flood")], Some(&during)),
    )
    .await
    .expect("an answer during the flood");
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    drop(held);
    // The flood gone, a till settles: the ledger still had what it needed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = bill(&setup.token(&Card::beijing(), 120)).to_string();
    loop {
        let sent = client.send(Method::POST, "/v1/settlements", &[("idempotency-key", "after-flood")], Some(&body));
        match tokio::time::timeout(Duration::from_secs(5), sent).await {
            Ok(Ok(reply)) => {
                assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
                break;
            }
            _ => assert!(Instant::now() < deadline, "no settlement after the flood:\n{}", daemon.log()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(daemon.stop(Duration::from_secs(15)), Some(0));
}
