//! The `cardgate` command line.
//!
//! Every command writes to the `out` and `err` writers it is given and returns its exit code,
//! so tests run the very code path the binary runs.
//!
//! - [`ledger`]: `ledger export`.
//! - [`plugin`]: `plugin inspect`.
//! - [`serve`]: `serve`, `dev`.
//! - [`token`]: `keys generate`, `token mint`, `token verify`.

pub mod ledger;
pub mod plugin;
pub mod serve;
pub mod token;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for bad configuration or input files (`EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;

/// The cardgate settlement gateway.
#[derive(Debug, Parser)]
#[command(name = "cardgate", version, about)]
pub struct Cli {
    /// Log format: `pretty` for a terminal, `json` for production log pipelines. The level
    /// comes from `CARDGATE_LOG` (default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(serve::ServeArgs),
    /// Check a configuration without serving: every problem with its key path; exit 78 if any.
    CheckConfig(serve::CheckArgs),
    /// Run the gateway on generated dev certificates, keys and configuration (set up once in
    /// DIR, reused afterwards).
    Dev(serve::DevArgs),
    /// Work with plugin libraries.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Run one plugin for a gateway (the process isolation tier starts this itself).
    #[command(hide = true)]
    PluginHost(plugin::HostArgs),
    /// Read the ledger.
    #[command(subcommand)]
    Ledger(ledger::LedgerCommand),
    /// Make issuer keys.
    #[command(subcommand)]
    Keys(token::KeysCommand),
    /// Mint and verify e-card tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
}

/// Parses the process's arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Kept until the end of `main`: dropping it writes out what the log thread still holds.
    let _log = init_logging(cli.log_format);
    // Not `stderr().lock()` for the life of the command: the log writes to stderr from its own
    // thread, and a lock held here would stop it, and with it every thread that logs.
    let code = run(cli, &mut std::io::stdout(), &mut std::io::stderr());
    ExitCode::from(code)
}

/// Runs a parsed command line, writing to `out` and `err`; returns the exit code.
pub fn run(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let result = match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::CheckConfig(args) => serve::check(args, out),
        Command::Dev(args) => serve::dev(args, out),
        Command::Plugin(command) => plugin::run(command, out),
        Command::Ledger(command) => ledger::run(command, out),
        Command::PluginHost(args) => plugin::host(args, out),
        Command::Keys(command) => token::keys(command, out),
        Command::Token(command) => token::run(command, out, err),
    };
    match result {
        Ok(code) => code,
        Err(failure) => {
            let _ = writeln!(err, "error: {}", failure.message);
            failure.code
        }
    }
}

/// A command that failed: what to print after `error: ` and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: u8,
    /// Message.
    pub message: String,
}

impl Failure {
    /// Exit code 1.
    pub fn new(message: impl std::fmt::Display) -> Self {
        Self { code: 1, message: message.to_string() }
    }

    /// Exit code [`EXIT_CONFIG`].
    pub fn config(message: impl std::fmt::Display) -> Self {
        Self { code: EXIT_CONFIG, message: message.to_string() }
    }
}

/// Lines the log holds for its writer thread; past this, new lines are dropped (and counted)
/// rather than making the thread that logs wait.
const LOG_BUFFER_LINES: usize = 64 * 1024;

/// Logs go to stderr through a thread of their own: a thread that logs (a request, a signal
/// handler, the ledger writer) only queues the line, and never waits for stderr, even when
/// whatever reads it is slow or stopped. Lines that find the queue full are dropped. Plain
/// text unless stderr is a terminal.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CARDGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .lossy(true)
        .thread_name("cardgate-log")
        .finish(std::io::stderr());
    // Colours for a person at a terminal; none for a file, a pipe or the journal, where the
    // escape codes would land in the text (and a non-empty `NO_COLOR` turns them off anywhere,
    // as no-color.org asks).
    let colours = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer).with_ansi(colours);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
    guard
}
