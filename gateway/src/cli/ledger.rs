//! `cardgate ledger export`: a business day's settlements as CSV, for finance.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;

use super::Failure;
use crate::config::Config;
use crate::ledger::LedgerError;

/// Ledger commands.
#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Write a business day's events as CSV (to standard output, or `--out`): one line per
    /// settlement made that day and one per reversal made that day (`event`), for every
    /// institution or one.
    Export {
        /// Configuration file (the ledger path and institutions come from it).
        #[arg(long)]
        config: PathBuf,
        /// The business day, YYYY-MM-DD (UTC+8).
        #[arg(long)]
        date: String,
        /// Only this institution.
        #[arg(long)]
        institution: Option<String>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Copy the configured SQLite ledger, whole, with the gateway stopped: into a new
    /// log-structured ledger (`--to DIR`, a directory that must not exist; then set `path` to
    /// it and `engine = "lsm"`), or into a cluster's PostgreSQL database (`--to
    /// postgres://user@host:port/database`, an empty database; the password from
    /// CARDGATE__LEDGER__POSTGRES__PASSWORD; then set `backend = "postgres"`). The SQLite
    /// file is left as it was.
    Migrate {
        /// Configuration file (the ledger's path and secret come from it).
        #[arg(long)]
        config: PathBuf,
        /// The new ledger: a directory, or a PostgreSQL URL.
        #[arg(long)]
        to: String,
        /// Its shards (fixed from now on). Default: `ledger.shards`.
        #[arg(long)]
        shards: Option<usize>,
    },
}

fn migrate(config: &std::path::Path, to: &str, shards: Option<usize>, out: &mut dyn Write) -> Result<u8, Failure> {
    let config = Config::load(config, &std::env::vars().collect::<HashMap<_, _>>())
        .map_err(|e| Failure::config(format!("bad configuration:\n{e}")))?;
    if !config.ledger.path.is_file() || config.ledger.engine == crate::config::LedgerEngine::Lsm {
        return Err(Failure::config(format!(
            "ledger.path: {}: not an SQLite ledger file",
            config.ledger.path.display()
        )));
    }
    let source = crate::ledger::sqlite::SqliteLedger::open(&config.ledger.path).map_err(Failure::new)?;
    if to.starts_with("postgres://") || to.starts_with("postgresql://") {
        return migrate_to_postgres(&source, to, out);
    }
    let to = std::path::Path::new(to);
    let shards = shards.unwrap_or(config.ledger.shards);
    if !(1..=64).contains(&shards) {
        return Err(Failure::config("--shards: 1 to 64"));
    }
    let mut importer = crate::ledger::lsm::LsmLedger::import(to, shards).map_err(Failure::new)?;
    if let Err(e) = source.dump(&mut |item| importer.add(item)) {
        importer.abandon();
        return Err(Failure::new(e));
    }
    let (settlements, years, quotes) = importer.counts;
    importer.finish().map_err(Failure::new)?;
    writeln!(
        out,
        "migrated {settlements} settlements, {years} card years of accumulators and {quotes} quotes into {} ({shards} shards)\nnow set, in [ledger]: path = \"{}\" and engine = \"lsm\"",
        to.display(),
        to.display()
    )
    .map_err(Failure::new)?;
    Ok(0)
}

/// `ledger migrate --to postgres://...`: the SQLite ledger into an empty database, in one
/// transaction.
fn migrate_to_postgres(
    source: &crate::ledger::sqlite::SqliteLedger,
    url: &str,
    out: &mut dyn Write,
) -> Result<u8, Failure> {
    let parsed: tokio_postgres::Config = url.parse().map_err(|e| Failure::config(format!("--to: {e}")))?;
    if parsed.get_password().is_some() {
        return Err(Failure::config("--to: no password in the URL; set CARDGATE__LEDGER__POSTGRES__PASSWORD"));
    }
    let target = crate::config::PostgresConfig {
        url: url.to_owned(),
        password_file: None,
        password: std::env::var("CARDGATE__LEDGER__POSTGRES__PASSWORD").unwrap_or_default(),
        pool_size: 1,
        statement_timeout_ms: 5_000,
        connect_timeout_ms: 3_000,
        lease_secs: 60,
    };
    let (settlements, years, quotes) =
        crate::ledger::postgres::import(&target, &|visit| source.dump(visit)).map_err(Failure::new)?;
    writeln!(
        out,
        "migrated {settlements} settlements, {years} card years of accumulators and {quotes} quotes into {url}\nnow set, in [ledger]: backend = \"postgres\", and in [ledger.postgres]: url = \"{url}\""
    )
    .map_err(Failure::new)?;
    Ok(0)
}

/// Runs a ledger command.
pub fn run(command: LedgerCommand, out: &mut dyn Write) -> Result<u8, Failure> {
    let (config, date, institution, file) = match command {
        LedgerCommand::Export { config, date, institution, out } => (config, date, institution, out),
        LedgerCommand::Migrate { config, to, shards } => return migrate(&config, &to, shards, out),
    };
    let config = Config::load(&config, &std::env::vars().collect::<HashMap<_, _>>())
        .map_err(|e| Failure::config(format!("bad configuration:\n{e}")))?;
    if !crate::ledger::is_business_day(&date) {
        return Err(Failure::config("--date: YYYY-MM-DD"));
    }
    let institutions: Vec<String> = match institution {
        Some(id) => vec![id],
        None => config.institutions.keys().cloned().collect(),
    };
    // Reads are futures (a database ledger's go over the network): a runtime of their own, on
    // a thread of their own (the command may be run from inside another runtime).
    let (csv, lines) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(Failure::new)?;
                let ledger = crate::ledger::open(&config.ledger).map_err(|e| match e {
                    // An engine one process holds at a time (the log-structured one) is the
                    // running gateway's: it exports the day itself.
                    LedgerError::Storage(m) if m.contains(crate::ledger::lsm::LOCKED) => Failure::new(format!(
                        "{m}\nwhile the gateway runs, take the export from its admin listener: \
                         GET /admin/ledger/export?date={date}, with the admin token (docs/OPERATIONS.md)"
                    )),
                    e => Failure::new(e),
                })?;
                let mut csv = String::from(crate::ledger::export::HEADER);
                let lines = runtime
                    .block_on(crate::ledger::export::day_csv(&*ledger, &institutions, &date, |page| {
                        csv += &page;
                        std::future::ready(true)
                    }))
                    .map_err(Failure::new)?;
                Ok((csv, lines))
            })
            .join()
            .unwrap_or_else(|_| Err(Failure::new("the export thread failed")))
    })?;
    match file {
        Some(path) => std::fs::write(&path, csv).map_err(|e| Failure::new(format!("{}: {e}", path.display())))?,
        None => out.write_all(csv.as_bytes()).map_err(Failure::new)?,
    }
    tracing::info!(lines, %date, "ledger exported");
    Ok(0)
}
