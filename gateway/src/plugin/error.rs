//! Why a plugin did not load, and why a call to a loaded plugin gave no answer.

use std::path::PathBuf;
use std::time::Duration;

use cardgate_sdk::PluginError;

/// An ABI version, `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AbiVersion {
    /// Major version: must be equal to load.
    pub major: u16,
    /// Minor version: the plugin's must not be newer than the host's.
    pub minor: u16,
}

impl AbiVersion {
    /// The ABI this gateway implements.
    pub const HOST: AbiVersion =
        AbiVersion { major: cardgate_sdk::abi::ABI_MAJOR, minor: cardgate_sdk::abi::ABI_MINOR };
}

impl std::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// A plugin library that could not be loaded. Every message names the plugin and the file;
/// once the declaration could be read, also the plugin's ABI version and the gateway's.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// No file at the path.
    #[error("plugin `{plugin}` at {}: file not found", path.display())]
    FileMissing {
        /// The plugin's configured name.
        plugin: String,
        /// The path given.
        path: PathBuf,
    },
    /// Reading the file or writing its content-addressed copy failed.
    /// A directory the library or its cached copy lives in can be written by users other than
    /// the gateway's: they could swap the code that runs.
    #[error("plugin `{plugin}`: {}: {reason}", path.display())]
    UnsafeLocation {
        /// Configured name.
        plugin: String,
        /// The directory (or file).
        path: PathBuf,
        /// What is wrong with it and what to do.
        reason: String,
    },
    #[error("plugin `{plugin}` at {}: {action}: {source}", path.display())]
    Io {
        /// The plugin's configured name.
        plugin: String,
        /// The file involved.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The dynamic loader refused the file.
    #[error("plugin `{plugin}` at {}: not a loadable shared object: {reason}", path.display())]
    NotSharedObject {
        /// The plugin's configured name.
        plugin: String,
        /// The path given.
        path: PathBuf,
        /// What the dynamic loader said.
        reason: String,
    },
    /// The library does not export the entry symbol.
    #[error(
        "plugin `{plugin}` at {}: entry symbol `{symbol}` not found; not a cardgate plugin (gateway ABI {host})",
        path.display(),
        symbol = cardgate_sdk::abi::ENTRY_SYMBOL,
        host = AbiVersion::HOST
    )]
    EntrySymbolMissing {
        /// The plugin's configured name.
        plugin: String,
        /// The path given.
        path: PathBuf,
    },
    /// The declaration does not start with the magic bytes.
    #[error(
        "plugin `{plugin}` at {}: bad magic \"{}\" in declaration, expected \"{}\" (gateway ABI {host})",
        path.display(),
        found.escape_ascii(),
        cardgate_sdk::abi::MAGIC.escape_ascii(),
        host = AbiVersion::HOST
    )]
    BadMagic {
        /// The plugin's configured name.
        plugin: String,
        /// The path given.
        path: PathBuf,
        /// The bytes found.
        found: [u8; 8],
    },
    /// The plugin was built for another ABI major version.
    #[error(
        "plugin `{plugin}` at {}: ABI major version mismatch: plugin built for ABI {found}, this gateway runs ABI {expected}",
        path.display()
    )]
    AbiMajorMismatch {
        /// The plugin's configured name.
        plugin: String,
        /// The path given.
        path: PathBuf,
        /// The plugin's ABI.
        found: AbiVersion,
        /// The gateway's ABI.
        expected: AbiVersion,
    },
    /// The plugin was built for a newer ABI minor version than the gateway implements.
    #[error(
        "plugin `{plugin}` at {}: ABI minor version too new: plugin built for ABI {found}, this gateway runs ABI {expected}; upgrade the gateway",
        path.display()
    )]
    AbiMinorNewer {
        /// The plugin's configured name.
        plugin: String,
        /// The path given.
        path: PathBuf,
        /// The plugin's ABI.
        found: AbiVersion,
        /// The gateway's ABI.
        expected: AbiVersion,
    },
    /// The declaration is malformed: too small for its ABI version, a null function or a bad
    /// string.
    #[error(
        "plugin `{plugin}` at {}: malformed declaration (plugin ABI {found}, gateway ABI {expected}): {reason}",
        path.display()
    )]
    BadDeclaration {
        /// The plugin's configured name.
        plugin: String,
        /// The path given.
        path: PathBuf,
        /// The plugin's ABI.
        found: AbiVersion,
        /// The gateway's ABI.
        expected: AbiVersion,
        /// What is wrong.
        reason: String,
    },
    /// The declaration lacks `FLAG_UNWIND` (a Rust plugin built with `panic = "abort"`, or a C
    /// plugin that did not declare it contains its failures): one of them would kill the daemon.
    #[error(
        "plugin `{plugin}` {version} at {}: its declaration lacks CARDGATE_FLAG_UNWIND (flags bit 0), so a failure inside it could take the gateway down: run it in the process tier (isolation = \"process\"), or declare the flag: in Rust, build with panic = \"unwind\" (the SDK then sets it); in C, set it once every entry point returns a status and never aborts, exits or lets a C++ exception or longjmp out (plugin ABI {found}, gateway ABI {expected})",
        path.display()
    )]
    BuiltWithPanicAbort {
        /// The plugin's configured name.
        plugin: String,
        /// The declared plugin version.
        version: String,
        /// The path given.
        path: PathBuf,
        /// The plugin's ABI.
        found: AbiVersion,
        /// The gateway's ABI.
        expected: AbiVersion,
    },
    /// The plugin's init refused its configuration (or failed otherwise).
    #[error(
        "plugin `{plugin}` {version} at {}: init failed: {error} (plugin ABI {found}, gateway ABI {expected})",
        path.display()
    )]
    InitFailed {
        /// The plugin's configured name.
        plugin: String,
        /// The declared plugin version.
        version: String,
        /// The path given.
        path: PathBuf,
        /// The plugin's ABI.
        found: AbiVersion,
        /// The gateway's ABI.
        expected: AbiVersion,
        /// The plugin's reason.
        error: PluginError,
    },
    /// The library's signature or manifest is not acceptable.
    #[error("plugin `{plugin}` at {}: refused: {error} (gateway ABI {host})", path.display(), host = AbiVersion::HOST)]
    Signature {
        /// The plugin's configured name.
        plugin: String,
        /// The path given.
        path: PathBuf,
        /// What is wrong.
        error: super::signing::SignatureError,
    },
    /// The configuration given to the plugin could not be encoded.
    #[error("plugin `{plugin}`: configuration cannot be encoded as JSON: {reason}")]
    BadConfig {
        /// The plugin's configured name.
        plugin: String,
        /// The encoder's reason.
        reason: String,
    },
}

/// A call to a loaded plugin that produced no answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The plugin refused with its own code.
    #[error("plugin refused: {0}")]
    Rejected(PluginError),
    /// The plugin panicked; the panic was contained.
    #[error("plugin panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The plugin could not decode the request (version skew, or a gateway bug).
    #[error("plugin could not decode the request: {reason}")]
    BadInput {
        /// What the plugin said.
        reason: String,
    },
    /// The plugin's answer did not decode as the operation's answer type.
    #[error("plugin answer does not decode: {reason}")]
    BadAnswer {
        /// What the decoder said.
        reason: String,
    },
    /// The plugin does not know the operation.
    #[error("plugin does not know operation {operation}")]
    UnknownOperation {
        /// The operation's name.
        operation: &'static str,
    },
    /// The plugin returned a status the ABI does not define.
    #[error("plugin returned unknown status {status}")]
    BadStatus {
        /// The status.
        status: i32,
    },
    /// No answer within the timeout. The call may still be running on a pool thread.
    #[error("plugin did not answer within {0:?}")]
    Timeout(Duration),
    /// The pool's queue is full.
    #[error("plugin call pool is saturated")]
    Overloaded,
    /// The pool is shut down, or its worker died before answering.
    #[error("plugin call pool is unavailable")]
    Unavailable,
    /// The plugin's circuit breaker is open after repeated failures.
    #[error("plugin circuit breaker is open")]
    CircuitOpen,
}

impl CallError {
    /// Whether the failure counts against the plugin's health (circuit breaker): it did not
    /// answer usefully. A refusal on policy grounds does not count.
    pub fn is_plugin_failure(&self) -> bool {
        match self {
            Self::Rejected(e) => {
                matches!(e.code, cardgate_sdk::ErrorCode::Unavailable | cardgate_sdk::ErrorCode::Internal)
            }
            Self::Overloaded | Self::CircuitOpen => false,
            _ => true,
        }
    }

    /// Whether the plugin answered without failing: it does not apply to the person
    /// (`not_insured`, and the chain skips it) or does not implement the operation
    /// (`unsupported`). Neither counts as a failure in `/admin/plugins`.
    pub fn is_answer(&self) -> bool {
        matches!(self, Self::Rejected(e) if matches!(e.code, cardgate_sdk::ErrorCode::NotInsured | cardgate_sdk::ErrorCode::Unsupported))
    }

    /// The `outcome` label of `cardgate_plugin_calls_total`: the problem code, except for the
    /// two answers of [`Self::is_answer`] (`not_applicable`, `unsupported`).
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Rejected(e) if e.code == cardgate_sdk::ErrorCode::NotInsured => "not_applicable",
            Self::Rejected(e) if e.code == cardgate_sdk::ErrorCode::Unsupported => "unsupported",
            _ => self.code(),
        }
    }

    /// A stable code for logs, metrics and the API's problem details.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Rejected(e) if e.code == cardgate_sdk::ErrorCode::Unavailable => "plugin_unavailable",
            Self::Rejected(_) => "plugin_rejected",
            Self::Panicked { .. } => "plugin_panicked",
            Self::Timeout(_) => "plugin_timeout",
            Self::BadInput { .. } | Self::BadAnswer { .. } | Self::UnknownOperation { .. } | Self::BadStatus { .. } => {
                "plugin_protocol_error"
            }
            Self::Overloaded | Self::Unavailable | Self::CircuitOpen => "plugin_unavailable",
        }
    }
}
