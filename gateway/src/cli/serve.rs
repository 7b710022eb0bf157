//! `cardgate serve` and `cardgate dev`: run the daemon.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Failure;
use crate::config::{AdminConfig, Config, LedgerBackend};
use crate::dev::{self, DevPlugins};
use crate::server;
use crate::service::{Gateway, SystemClock};

/// `serve` arguments.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Configuration file (TOML); `CARDGATE__SECTION__KEY` environment variables override it.
    #[arg(long)]
    config: PathBuf,
}

/// `check-config` arguments.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Configuration file to check.
    #[arg(long)]
    config: PathBuf,
}

/// Checks a configuration as `serve` would before serving: the file, every value, the
/// certificates, the trust, revocation and signer lists, the catalogue, and every plugin
/// loaded, initialised and health-checked as `serve` loads it (then unloaded). Prints every
/// problem with its key path.
pub fn check(args: CheckArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match Config::load(&args.config, &env) {
        Ok(config) => config,
        Err(e) => return Err(Failure::config(format!("{}:\n{}", args.config.display(), indent(&e.problems)))),
    };
    let mut problems = Vec::new();
    if let Err(p) = server::tls::server_config(&config.server) {
        problems.extend(p);
    }
    if let Some((certificate, key, ca)) = config.admin.as_ref().and_then(|a| a.tls())
        && let Err(p) = server::tls::mutual_tls("admin", certificate, key, ca)
    {
        problems.extend(p);
    }
    if let Err(p) = crate::token::TrustList::load(&config.tokens.trust_list) {
        problems.extend(p.into_iter().map(|m| format!("tokens.trust_list: {m}")));
    }
    if let Some(path) = &config.tokens.revocations
        && let Err(p) = crate::token::RevocationList::load(path)
    {
        problems.extend(p.into_iter().map(|m| format!("tokens.revocations: {m}")));
    }
    if let Some(catalogue) = &config.catalogue
        && let Err(p) = crate::catalogue::Catalogue::load(catalogue)
    {
        problems.extend(p.into_iter().map(|m| format!("catalogue.path: {m}")));
    }
    if let Some(path) = &config.plugin_runtime.signers
        && let Err(p) = crate::plugin::signing::SignerTrust::load(path)
    {
        problems.extend(p.into_iter().map(|m| format!("plugin_runtime.signers: {m}")));
    }
    let mut database = None;
    if let Some(pg) = config.ledger.postgres.as_ref().filter(|_| config.ledger.backend == LedgerBackend::Postgres) {
        match crate::ledger::postgres::check(pg) {
            Ok(found) => database = Some(found),
            Err(e) => problems.push(format!("ledger.postgres: {e}")),
        }
    }
    let mut missing = false;
    for (name, plugin) in &config.plugins {
        if !plugin.library.is_file() {
            problems.push(format!("plugins.{name}.library: {}: no such file", plugin.library.display()));
            missing = true;
        }
    }
    // Every plugin loaded, initialised and asked for its health as `serve` would, so that a
    // wrong magic or ABI, a missing entry symbol, a bad signature or a configuration its `init`
    // refuses is found here and not at start. (Skipped while a library is missing: that is
    // already reported, once.)
    if !missing {
        problems.extend(crate::service::check_plugins(&config));
    }
    if problems.is_empty() {
        for exposed in config.exposed_files(&args.config) {
            writeln!(out, "warning: {exposed}").map_err(Failure::new)?;
        }
        if config.admin.as_ref().is_some_and(AdminConfig::refuses_admin_paths) {
            writeln!(
                out,
                "warning: admin: no token_file: the plain listener refuses /admin/ (plugins, reload, routes, export)"
            )
            .map_err(Failure::new)?;
        }
        if let Some(found) = database {
            writeln!(out, "ledger: {found}").map_err(Failure::new)?;
        }
        writeln!(out, "ok: {}", args.config.display()).map_err(Failure::new)?;
        Ok(0)
    } else {
        Err(Failure::config(format!("{}:\n{}", args.config.display(), indent(&problems))))
    }
}

fn indent(problems: &[String]) -> String {
    problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n")
}

/// `dev` arguments.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Directory for the generated files, the ledger and the plugin cache.
    #[arg(long, default_value = ".cardgate-dev")]
    dir: PathBuf,
    /// Address to listen on (used when the directory is first set up).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: String,
    /// Directory holding `libbasic_medical.so`, `libcritical_illness.so` and
    /// `libmedical_assistance.so` [default: build them from this source tree].
    #[arg(long)]
    plugins: Option<PathBuf>,
}

/// Loads, builds and serves a configuration until SIGTERM or SIGINT.
pub fn serve(args: ServeArgs) -> Result<u8, Failure> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = Config::load(&args.config, &env).map_err(|e| Failure::config(format!("bad configuration:\n{e}")))?;
    run(config, args.config)
}

fn run(config: Config, path: PathBuf) -> Result<u8, Failure> {
    // Whatever the daemon creates (the ledger's files, the plugin cache, logs it opens) is its
    // owner's alone, whatever umask it was started with.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let (files_before, files) = raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(Failure::new)?;
    runtime.block_on(async move {
        survive_file_size_limit();
        if files > files_before {
            tracing::info!(from = files_before, to = files, "open files limit raised to its hard limit");
        }
        if files < LOW_OPEN_FILES {
            tracing::warn!(
                limit = files,
                "open files limit is low: each connection holds one, so about this many tills can connect; raise \
                 it (systemd `LimitNOFILE=`, `ulimit -n`)"
            );
        }
        for exposed in config.exposed_files(&path) {
            tracing::warn!(problem = %exposed, "secrets or card data readable by other users");
        }
        let tls = server::tls::server_config(&config.server)
            .map_err(|p| Failure::config(format!("bad configuration:\n{}", p.join("\n"))))?;
        let listen = config.server.listen;
        let admin = config.admin.as_ref().map(|a| a.listen);
        let admin_tls = match config.admin.as_ref().and_then(|a| a.tls()) {
            Some((certificate, key, ca)) => Some(
                server::tls::mutual_tls("admin", certificate, key, ca)
                    .map_err(|p| Failure::config(format!("bad configuration:\n{}", p.join("\n"))))?,
            ),
            None => None,
        };
        let gateway = Gateway::build(config, Arc::new(SystemClock))
            .map_err(|e| Failure::config(format!("bad configuration:\n{e}")))?;
        let unresolved = crate::api::flow::resolve_all(&gateway)
            .await
            .map_err(|e| Failure::new(format!("cannot read the ledger: {e:?}")))?;
        if unresolved > 0 {
            tracing::info!(count = unresolved, "resolved settlements interrupted by the last stop");
        }
        let live = crate::service::Live::new(gateway, tls);
        let listener =
            tokio::net::TcpListener::bind(listen).await.map_err(|e| Failure::new(format!("{listen}: {e}")))?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        };
        if let Some(address) = admin {
            let admin_listener =
                tokio::net::TcpListener::bind(address).await.map_err(|e| Failure::new(format!("{address}: {e}")))?;
            // The address bound: the configured one, with its port where that was 0.
            let address = admin_listener.local_addr().unwrap_or(address);
            tracing::info!(%address, "admin listener");
            if live.gateway().config.admin.as_ref().is_some_and(AdminConfig::refuses_admin_paths) {
                tracing::warn!(
                    %address,
                    "admin listener: no token_file, so /admin/ (plugins, reload, routes, export) is refused; \
                     health, readiness and metrics are served"
                );
            }
            tokio::spawn(server::admin::run(
                admin_listener,
                Arc::clone(&live),
                admin_tls,
                until_stopped(stopped.clone()),
            ));
        }
        tokio::spawn(reload_on_sighup(Arc::clone(&live), path));
        if let Some(lease) = live.gateway().ledger.lease_secs() {
            tokio::spawn(sweep(Arc::clone(&live), lease));
        }
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop.send(true);
        });
        // The address bound, as clients reach it (a configured port 0 is the system's pick).
        let listen = listener.local_addr().unwrap_or(listen);
        tracing::info!(%listen, "cardgate serving");
        server::run(listener, live, until_stopped(stopped)).await;
        tracing::info!("cardgate stopped");
        Ok(0)
    })
}

/// Reloads the whole configuration (and the plugins) on every SIGHUP; a configuration with
/// errors is refused with all of them and the current one keeps serving.
/// A node of a cluster completes, every half lease, the settlements other nodes left
/// unresolved (a node that died: its leases ran out).
async fn sweep(live: Arc<crate::service::Live>, lease_secs: i64) {
    let period = std::time::Duration::from_secs(u64::try_from(lease_secs / 2).unwrap_or(1).max(1));
    let mut ticks = tokio::time::interval(period);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        match crate::api::flow::resolve_all(&live.gateway()).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "completed settlements another node left unresolved"),
            Err(error) => tracing::warn!(?error, "could not look for unresolved settlements"),
        }
    }
}

async fn reload_on_sighup(live: Arc<crate::service::Live>, path: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else { return };
    while hangup.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
        let (live, path) = (Arc::clone(&live), path.clone());
        let env: HashMap<String, String> = std::env::vars().collect();
        if let Ok(Err(problems)) = tokio::task::spawn_blocking(move || live.reload(&path, &env)).await {
            tracing::error!(problems = %problems.join("; "), "reload refused; still serving the previous configuration");
        }
    }
}

/// Below this limit on open files the daemon warns at start.
const LOW_OPEN_FILES: u64 = 4096;

/// Raises the soft limit on open files to the hard one (at most 2^20): every connection holds
/// a descriptor, and a shell's usual soft limit of 1,024 would refuse connections at about a
/// thousand tills while the hard limit allows far more. Answers the soft limit before and
/// after (unchanged where it could not be raised).
fn raise_open_files_limit() -> (u64, u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current.unwrap_or(u64::MAX);
    let wanted = limit.maximum.unwrap_or(u64::MAX).min(1 << 20);
    if before >= wanted {
        return (before, before);
    }
    match setrlimit(Resource::Nofile, Rlimit { current: Some(wanted), maximum: limit.maximum }) {
        Ok(()) => (before, wanted),
        Err(_) => (before, before),
    }
}

/// A write past the file-size limit (`RLIMIT_FSIZE`, `LimitFSIZE=` in systemd) raises SIGXFSZ,
/// whose default action kills the process mid-commit. With the signal handled, the write fails
/// instead, as on a full disk: the ledger refuses writes with `storage_unavailable`, readiness
/// turns false, and both come back when the limit is raised.
fn survive_file_size_limit() {
    use tokio::signal::unix::{SignalKind, signal};
    /// SIGXFSZ on Linux and the BSDs.
    const SIGXFSZ: i32 = 25;
    match signal(SignalKind::from_raw(SIGXFSZ)) {
        Ok(mut exceeded) => {
            tokio::spawn(async move {
                while exceeded.recv().await.is_some() {
                    tracing::warn!("a write reached the file-size limit (SIGXFSZ); it failed");
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot handle SIGXFSZ; a file-size limit would stop the daemon"),
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot listen for signals; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// Sets up (once) and serves the dev configuration.
pub fn dev(args: DevArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let plugins = match &args.plugins {
        Some(dir) => DevPlugins {
            basic_medical: dir.join("libbasic_medical.so"),
            critical_illness: dir.join("libcritical_illness.so"),
            medical_assistance: dir.join("libmedical_assistance.so"),
        },
        None => build_plugins(out)?,
    };
    let files = dev::ensure(&args.dir, &args.listen, &plugins).map_err(Failure::new)?;
    let config = Config::load(&files.config, &HashMap::new())
        .map_err(|e| Failure::config(format!("{}:\n{e}", files.config.display())))?;
    instructions(out, &files.dir, &config.server.listen.to_string()).map_err(Failure::new)?;
    run(config, files.config)
}

fn build_plugins(out: &mut dyn Write) -> Result<DevPlugins, Failure> {
    let workspace =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_owned).filter(|w| w.join("Cargo.toml").exists());
    let Some(workspace) = workspace else {
        return Err(Failure::config("no source tree to build the plugins from; pass --plugins DIR"));
    };
    let _ = writeln!(out, "cardgate dev: building the example plugins ...");
    let build = |package: &str| {
        let build = cardgate_sdk::testing::Build {
            workspace: Some(workspace.clone()),
            ..cardgate_sdk::testing::Build::new(package)
        };
        build.run().map_err(Failure::new)
    };
    Ok(DevPlugins {
        basic_medical: build("basic-medical")?,
        critical_illness: build("critical-illness")?,
        medical_assistance: build("medical-assistance")?,
    })
}

fn instructions(out: &mut dyn Write, dir: &Path, listen: &str) -> std::io::Result<()> {
    let d = dir.display();
    let port = listen.rsplit(':').next().unwrap_or("8443");
    // Under `cargo run` (which sets CARGO_MANIFEST_DIR for what it runs), the commands to
    // type are cargo's; from a built binary, that binary's own path.
    let (cardgate, client) = if std::env::var_os("CARGO_MANIFEST_DIR").is_some() {
        (
            "cargo run -q -p cardgate --".to_owned(),
            format!("the example client: cargo run -p cardgate-example-client -- --dir {d}"),
        )
    } else {
        let exe = std::env::current_exe().map_or_else(|_| "cardgate".to_owned(), |p| p.display().to_string());
        (exe, format!("the example client (examples/client) with --dir {d}"))
    };
    // A dev directory made before the admin token existed has none: its /admin/ is refused.
    let admin = match port.parse::<u16>() {
        Ok(port) if dir.join("admin.token").exists() => format!(
            "\nThe admin listener (plugins, reload, routes, export) takes the operator's token:\n  \
             curl -H \"authorization: Bearer $(cat {d}/admin.token)\" http://127.0.0.1:{}/admin/plugins",
            port.wrapping_add(1)
        ),
        _ => String::new(),
    };
    writeln!(
        out,
        r#"cardgate dev: serving https://localhost:{port} with the files in {d}/

A first settlement, as a pharmacy till (one scan, one bill):

  TOKEN=$({cardgate} token mint --key {d}/issuer.key --kid {kid} \
      --card 110105199001011234 --name 张三 --region 110105 --insutype 310)
  curl --cacert {d}/ca.pem --cert {d}/pharmacy.pem --key {d}/pharmacy.key \
      -H 'content-type: application/json' -H "idempotency-key: demo-$(date +%s)-$RANDOM$RANDOM" \
      https://localhost:{port}/v1/settlements \
      -d '{{"token":"'"$TOKEN"'","terminal_id":"POS-01","total_fen":5000,"lines":[{{"code":"XA01","name":"Amoxicillin","category":"class_a","quantity":2,"unit_price_fen":2500,"amount_fen":5000}}]}}'

Or {client}{admin}
Stop with Ctrl-C; the ledger and keys stay in {d}/."#,
        kid = dev::ISSUER_KID
    )?;
    out.flush()
}
