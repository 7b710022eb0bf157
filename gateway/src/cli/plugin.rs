//! `cardgate plugin ...`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use std::sync::Arc;

use super::Failure;
use crate::plugin::signing::{self, Manifest, SignerTrust};
use crate::plugin::{AbiVersion, Library, LoadOptions};
use crate::token::issue::SigningKey;

/// Plugin commands.
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Load a plugin library as the gateway would (without initialising it) and print its
    /// declaration, or the exact load error.
    Inspect {
        /// The plugin library (`.so`).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Directory for the content-addressed copy [default: a `cardgate-plugins` folder in
        /// the system temporary directory].
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// Sign a plugin library: write `FILE.manifest.json` (name, version, ABI, target, SHA-256)
    /// signed with an Ed25519 key (PKCS#8 PEM).
    Sign {
        /// The signer's private key.
        #[arg(long)]
        key: PathBuf,
        /// The signer's key id, as the gateway's signers file names it.
        #[arg(long)]
        kid: String,
        /// The plugin library.
        file: PathBuf,
    },
    /// Create a new plugin crate: a compiling policy, tests through the SDK's test kit, a README
    /// and an example configuration.
    New {
        /// The plugin's name (lowercase letters, digits and `-`).
        name: String,
        /// Directory to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Path to the cardgate SDK [default: the SDK of this source tree].
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Check a plugin library's signed manifest against a signers file, as the gateway would.
    Verify {
        /// Trusted signers (JSON).
        #[arg(long)]
        trust: PathBuf,
        /// The plugin's configured name [default: its declared name].
        #[arg(long)]
        name: Option<String>,
        /// The plugin name the manifest must carry, as `plugins.NAME.declared_name` says
        /// [default: the configured name].
        #[arg(long)]
        declared_name: Option<String>,
        /// The plugin library.
        file: PathBuf,
    },
}

/// `plugin-host` arguments: run one plugin for a gateway, in this process.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// The plugin library.
    #[arg(long)]
    library: PathBuf,
    /// The plugin's configured name.
    #[arg(long)]
    name: String,
    /// The SHA-256 the library must have (checked by the gateway).
    #[arg(long)]
    sha256: String,
    /// Content-addressed cache directory.
    #[arg(long)]
    cache_dir: PathBuf,
    /// Unix socket to serve on.
    #[arg(long)]
    socket: PathBuf,
    /// Limit this process's data segment (`RLIMIT_DATA`) to this many MiB before loading.
    #[arg(long)]
    memory_limit_mb: Option<u64>,
}

/// Runs a plugin for a gateway: reads its configuration (one JSON line) from standard input,
/// loads and initialises it, prints a ready line, and serves calls on the socket.
pub fn host(args: HostArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    // The limit is set, then this program runs again under it from its start: its allocator
    // sizes itself to the limit, which a limit lowered under a running process would not let it.
    const LIMITED: &str = "CARDGATE_PLUGIN_HOST_LIMITED";
    if let Some(mb) = args.memory_limit_mb
        && std::env::var_os(LIMITED).is_none()
    {
        use std::os::unix::process::CommandExt;
        let bytes = mb.saturating_mul(1 << 20);
        let limit = rustix::process::Rlimit { current: Some(bytes), maximum: Some(bytes) };
        let error = match rustix::process::setrlimit(rustix::process::Resource::Data, limit) {
            Ok(()) => match std::env::current_exe() {
                Ok(exe) => std::process::Command::new(exe).args(std::env::args_os().skip(1)).env(LIMITED, "1").exec(),
                Err(e) => e,
            },
            Err(e) => e.into(),
        };
        let _ = writeln!(
            out,
            "{}",
            serde_json::json!({ "ready": false, "error": format!("cannot limit memory to {mb} MiB: {error}") })
        );
        return Ok(1);
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(Failure::new)?;
    let fail = |out: &mut dyn Write, error: String| {
        let _ = writeln!(out, "{}", serde_json::json!({ "ready": false, "error": error }));
        let _ = out.flush();
        Ok(1)
    };
    let config: serde_json::Value = match serde_json::from_str(&line) {
        Ok(config) => config,
        Err(e) => return fail(out, format!("configuration: {e}")),
    };
    let options = LoadOptions { require_unwind: false, ..LoadOptions::new(args.cache_dir) };
    let library = match Library::open(&args.name, &args.library, &options) {
        Ok(library) if library.sha256() == args.sha256 => library,
        Ok(library) => {
            return fail(out, format!("the library changed: SHA-256 {} instead of {}", library.sha256(), args.sha256));
        }
        Err(e) => return fail(out, e.to_string()),
    };
    // An effect-free plugin has no business on the network: it runs without one where the
    // system allows (before its init, so nothing of it ever had one).
    let network_denied = library.info().effect_free
        && match crate::plugin::loader::deny_network() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(plugin = %args.name, error = %e, "cannot take network access from an effect-free plugin");
                false
            }
        };
    let instance = match library.instantiate(&config) {
        Ok(instance) => instance,
        Err(e) => return fail(out, e.to_string()),
    };
    let _ = std::fs::remove_file(&args.socket);
    let listener = match std::os::unix::net::UnixListener::bind(&args.socket) {
        Ok(listener) => listener,
        Err(e) => return fail(out, format!("{}: {e}", args.socket.display())),
    };
    let info = library.info();
    let ready = serde_json::json!({
        "ready": true, "name": info.name, "version": info.version, "sdk_version": info.sdk_version,
        "abi": info.abi.to_string(), "unwind": info.unwind, "description": info.description,
        "effect_free": info.effect_free, "network_denied": network_denied,
    });
    writeln!(out, "{ready}").and_then(|()| out.flush()).map_err(Failure::new)?;
    crate::plugin::process::serve_host(instance, listener).map_err(Failure::new)?;
    Ok(0)
}

/// Runs a plugin command.
pub fn run(command: PluginCommand, out: &mut dyn Write) -> Result<u8, Failure> {
    let temp_cache = || std::env::temp_dir().join("cardgate-plugins");
    match command {
        PluginCommand::Inspect { file, json, cache_dir } => {
            inspect(&file, json, cache_dir.unwrap_or_else(temp_cache), out)
        }
        PluginCommand::Sign { key, kid, file } => sign(&key, &kid, &file, temp_cache(), out),
        PluginCommand::New { name, dir, sdk } => new_plugin(&name, &dir, sdk, out),
        PluginCommand::Verify { trust, name, declared_name, file } => {
            verify(&trust, (name, declared_name), &file, temp_cache(), out)
        }
    }
}

const TEMPLATE: [(&str, &str); 5] = [
    ("Cargo.toml", include_str!("template/Cargo.toml.tmpl")),
    ("src/lib.rs", include_str!("template/lib.rs.tmpl")),
    ("tests/policy.rs", include_str!("template/test.rs.tmpl")),
    ("README.md", include_str!("template/README.md.tmpl")),
    ("config.example.toml", include_str!("template/config.example.toml.tmpl")),
];

fn new_plugin(name: &str, dir: &Path, sdk: Option<PathBuf>, out: &mut dyn Write) -> Result<u8, Failure> {
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(Failure::config("NAME: lowercase letters, digits and `-`, starting with a letter"));
    }
    let sdk = match sdk {
        Some(path) => path,
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk"),
    };
    let sdk = sdk
        .canonicalize()
        .map_err(|e| Failure::config(format!("the SDK is not at {} ({e}); pass --sdk PATH", sdk.display())))?;
    let root = dir.join(name);
    if root.exists() {
        return Err(Failure::config(format!("{} exists already", root.display())));
    }
    let crate_name = name.replace('-', "_");
    for (file, template) in TEMPLATE {
        let path = root.join(file);
        let text = template
            .replace("{{name}}", name)
            .replace("{{crate_name}}", &crate_name)
            .replace("{{sdk}}", &sdk.display().to_string());
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Failure::new(format!("{}: {e}", parent.display())))?;
        }
        std::fs::write(&path, text).map_err(|e| Failure::new(format!("{}: {e}", path.display())))?;
    }
    writeln!(out, "created {} — next: cd {} && cargo test", root.display(), root.display()).map_err(Failure::new)?;
    Ok(0)
}

fn label(file: &Path) -> String {
    file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned())
}

fn sign(key: &Path, kid: &str, file: &Path, cache: PathBuf, out: &mut dyn Write) -> Result<u8, Failure> {
    let pem = std::fs::read_to_string(key).map_err(|e| Failure::config(format!("{}: {e}", key.display())))?;
    let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| Failure::config(format!("{}: {e}", key.display())))?;
    let library = Library::open(&label(file), file, &LoadOptions::new(cache)).map_err(Failure::new)?;
    let info = library.info();
    let manifest = Manifest {
        name: info.name.clone(),
        version: info.version.clone(),
        abi: info.abi.to_string(),
        target: signing::target(),
        sha256: library.sha256().to_owned(),
        signer: kid.to_owned(),
    };
    let signed = signing::sign(manifest, &key).map_err(Failure::config)?;
    let text = serde_json::to_string_pretty(&signed).map_err(Failure::new)?;
    let path = signing::manifest_path(file);
    std::fs::write(&path, format!("{text}\n")).map_err(|e| Failure::new(format!("{}: {e}", path.display())))?;
    writeln!(out, "signed {} {} -> {}", info.name, info.version, path.display()).map_err(Failure::new)?;
    Ok(0)
}

fn verify(
    trust: &Path,
    (name, declared_name): (Option<String>, Option<String>),
    file: &Path,
    cache: PathBuf,
    out: &mut dyn Write,
) -> Result<u8, Failure> {
    let signers = SignerTrust::load(trust).map_err(|p| Failure::config(p.join("\n")))?;
    let name = match name {
        Some(name) => name,
        None => Library::open(&label(file), file, &LoadOptions::new(cache.clone()))
            .map_err(Failure::new)?
            .info()
            .name
            .clone(),
    };
    let options =
        LoadOptions { manifest_name: declared_name, ..LoadOptions::new(cache).with_signers(Arc::new(signers)) };
    let library = Library::open(&name, file, &options).map_err(Failure::new)?;
    let info = library.info();
    writeln!(out, "valid: {} {} (ABI {}), sha256 {}", info.name, info.version, info.abi, library.sha256())
        .map_err(Failure::new)?;
    Ok(0)
}

fn inspect(file: &Path, json: bool, cache_dir: PathBuf, out: &mut dyn Write) -> Result<u8, Failure> {
    let label = file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
    let library = Library::open(&label, file, &LoadOptions::new(cache_dir)).map_err(Failure::new)?;
    let info = library.info();
    let text = if json {
        let value = serde_json::json!({
            "name": info.name,
            "version": info.version,
            "sdk_version": info.sdk_version,
            "abi": info.abi.to_string(),
            "gateway_abi": AbiVersion::HOST.to_string(),
            "unwind": info.unwind,
            "effect_free": info.effect_free,
            "description": info.description,
            "sha256": library.sha256(),
            "file": file.display().to_string(),
        });
        format!("{value:#}\n")
    } else {
        format!(
            "plugin:      {} {}\nabout:       {}\nsdk:         {}\nabi:         {} (gateway {})\nunwinding:   {}\neffect-free: {}\nsha256:      {}\nfile:        {}\n",
            info.name,
            info.version,
            info.description,
            info.sdk_version,
            info.abi,
            AbiVersion::HOST,
            if info.unwind { "yes" } else { "no" },
            if info.effect_free { "yes (settlements in one commit)" } else { "no" },
            library.sha256(),
            file.display()
        )
    };
    out.write_all(text.as_bytes()).map_err(Failure::new)?;
    Ok(0)
}
