//! `cardgate plugin ...`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::Failure;
use crate::plugin::{AbiVersion, Library, LoadOptions};

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
}

/// Runs a plugin command.
pub fn run(command: PluginCommand, out: &mut dyn Write) -> Result<u8, Failure> {
    match command {
        PluginCommand::Inspect { file, json, cache_dir } => {
            let cache_dir = cache_dir.unwrap_or_else(|| std::env::temp_dir().join("cardgate-plugins"));
            inspect(&file, json, cache_dir, out)
        }
    }
}

fn inspect(file: &Path, json: bool, cache_dir: PathBuf, out: &mut dyn Write) -> Result<u8, Failure> {
    let label = file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
    let library =
        Library::open(&label, file, &LoadOptions { cache_dir, require_unwind: true }).map_err(Failure::new)?;
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
