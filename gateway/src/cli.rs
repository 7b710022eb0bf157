//! The `cardgate` command line: `plugin inspect` today; `serve`, `check-config`, `keys` and
//! `token` join it as they are built.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::plugin::{AbiVersion, Library, LoadOptions};

/// The cardgate settlement gateway.
#[derive(Debug, Parser)]
#[command(name = "cardgate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Work with plugin libraries.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
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

/// Parses the process's arguments and runs the command.
pub fn main() -> ExitCode {
    init_logging();
    run(Cli::parse())
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Plugin(PluginCommand::Inspect { file, json, cache_dir }) => {
            let cache_dir = cache_dir.unwrap_or_else(|| std::env::temp_dir().join("cardgate-plugins"));
            inspect(&file, json, cache_dir)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CARDGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn inspect(file: &Path, json: bool, cache_dir: PathBuf) -> ExitCode {
    let label = file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
    let library = match Library::open(&label, file, &LoadOptions { cache_dir, require_unwind: true }) {
        Ok(library) => library,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let info = library.info();
    if json {
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
        println!("{value:#}");
    } else {
        println!("plugin:      {} {}", info.name, info.version);
        println!("sdk:         {}", info.sdk_version);
        println!("abi:         {} (gateway {})", info.abi, AbiVersion::HOST);
        println!("unwinding:   {}", if info.unwind { "yes" } else { "no" });
        println!("sha256:      {}", library.sha256());
        println!("file:        {}", file.display());
    }
    ExitCode::SUCCESS
}
