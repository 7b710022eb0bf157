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
    /// Check a plugin library's signed manifest against a signers file, as the gateway would.
    Verify {
        /// Trusted signers (JSON).
        #[arg(long)]
        trust: PathBuf,
        /// The plugin's configured name [default: its declared name].
        #[arg(long)]
        name: Option<String>,
        /// The plugin library.
        file: PathBuf,
    },
}

/// Runs a plugin command.
pub fn run(command: PluginCommand, out: &mut dyn Write) -> Result<u8, Failure> {
    let temp_cache = || std::env::temp_dir().join("cardgate-plugins");
    match command {
        PluginCommand::Inspect { file, json, cache_dir } => {
            inspect(&file, json, cache_dir.unwrap_or_else(temp_cache), out)
        }
        PluginCommand::Sign { key, kid, file } => sign(&key, &kid, &file, temp_cache(), out),
        PluginCommand::Verify { trust, name, file } => verify(&trust, name, &file, temp_cache(), out),
    }
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

fn verify(trust: &Path, name: Option<String>, file: &Path, cache: PathBuf, out: &mut dyn Write) -> Result<u8, Failure> {
    let signers = SignerTrust::load(trust).map_err(|p| Failure::config(p.join("\n")))?;
    let name = match name {
        Some(name) => name,
        None => Library::open(&label(file), file, &LoadOptions::new(cache.clone()))
            .map_err(Failure::new)?
            .info()
            .name
            .clone(),
    };
    let options = LoadOptions::new(cache).with_signers(Arc::new(signers));
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
            "sha256": library.sha256(),
            "file": file.display().to_string(),
        });
        format!("{value:#}\n")
    } else {
        format!(
            "plugin:      {} {}\nsdk:         {}\nabi:         {} (gateway {})\nunwinding:   {}\nsha256:      {}\nfile:        {}\n",
            info.name,
            info.version,
            info.sdk_version,
            info.abi,
            AbiVersion::HOST,
            if info.unwind { "yes" } else { "no" },
            library.sha256(),
            file.display()
        )
    };
    out.write_all(text.as_bytes()).map_err(Failure::new)?;
    Ok(0)
}
