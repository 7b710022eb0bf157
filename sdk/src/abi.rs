//! ABI v1: the plain-C boundary between the gateway and a plugin library.
//!
//! This is the only module of the SDK with `unsafe` code. `include/cardgate_plugin.h` describes
//! the same boundary for C authors; a test compiles it and checks every size, offset and
//! constant against the definitions here.
//!
//! # The boundary
//! - The library exports one symbol, [`ENTRY_SYMBOL`], a function returning a pointer to a
//!   static [`Declaration`]. Its first 16 bytes (magic, ABI major, ABI minor, size) keep their
//!   layout in every ABI version, so a host can always read them and refuse what it cannot run.
//! - The declaration is append-only: a later minor version adds fields at the end and raises
//!   `size`; a host reads no field past `size`.
//! - Messages cross as JSON byte buffers. Input is borrowed for the duration of the call;
//!   output is handed to a host callback ([`WriteFn`]) that copies it, so memory allocated on
//!   one side is never freed on the other.
//! - Every entry point catches panics: a panic becomes [`STATUS_PANIC`] for that call.

use std::ffi::{c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Once, RwLock};

use crate::error::PluginError;
use crate::plugin::{DispatchError, Operation, Plugin, dispatch};

/// The first eight bytes of every declaration.
pub const MAGIC: [u8; 8] = *b"CARDGATE";
/// The ABI major version: a host loads only plugins with the same major version.
pub const ABI_MAJOR: u16 = 1;
/// The ABI minor version: a host loads plugins whose minor version is at most its own.
pub const ABI_MINOR: u16 = 3;
/// The name of the exported entry function.
pub const ENTRY_SYMBOL: &str = "cardgate_plugin_declaration";
/// The version of this SDK, recorded in every declaration.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// [`Declaration::flags`] bit: the library was built with `panic = "unwind"`, so its panics
/// can be caught. A host refuses in-process libraries without it.
pub const FLAG_UNWIND: u32 = 1;

/// [`Declaration::flags`] bit (ABI 1.2): the plugin is **effect-free** — its quote, settle and
/// reverse compute their answers from their inputs alone and change nothing anywhere, so a
/// call may be repeated or forgotten without consequence. When every payer of a chain says
/// so, the gateway records a settlement in one durable commit (intent and outcome together)
/// instead of two. A plugin that talks to an outside system (a bureau's account service, say)
/// must not set it. Plugins built before 1.2 count as effectful.
pub const FLAG_EFFECT_FREE: u32 = 2;

/// Call succeeded; the output is the JSON answer.
pub const STATUS_OK: i32 = 0;
/// The plugin refused; the output is a JSON [`PluginError`].
pub const STATUS_ERROR: i32 = 1;
/// The input could not be decoded; the output is a UTF-8 reason.
pub const STATUS_BAD_INPUT: i32 = 2;
/// The plugin panicked; the output is the UTF-8 panic message.
pub const STATUS_PANIC: i32 = 3;
/// The operation number is unknown to the plugin; no output.
pub const STATUS_UNKNOWN_OPERATION: i32 = 4;

/// Log levels passed to [`LogFn`], as in the `log` crate: 1 = error ... 5 = trace.
pub const LOG_ERROR: u32 = 1;
/// Warning.
pub const LOG_WARN: u32 = 2;
/// Information.
pub const LOG_INFO: u32 = 3;
/// Debugging.
pub const LOG_DEBUG: u32 = 4;
/// Tracing.
pub const LOG_TRACE: u32 = 5;

/// Host callback receiving a call's output. The host copies `len` bytes from `data` before it
/// returns; the plugin frees its buffer afterwards.
pub type WriteFn = unsafe extern "C" fn(sink: *mut c_void, data: *const u8, len: usize);

/// Host callback receiving one log record: UTF-8 target and message, borrowed for the call.
pub type LogFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    level: u32,
    target: *const u8,
    target_len: usize,
    message: *const u8,
    message_len: usize,
);

/// Builds a plugin instance from its JSON configuration. Writes the instance to `*instance`
/// and returns [`STATUS_OK`], or writes a JSON [`PluginError`] through `write` and returns
/// another status.
pub type InitFn = unsafe extern "C" fn(
    host: *const HostApi,
    config: *const u8,
    config_len: usize,
    instance: *mut *mut c_void,
    sink: *mut c_void,
    write: WriteFn,
) -> i32;

/// Runs one operation on an instance; see the `STATUS_*` constants for the output.
pub type CallFn = unsafe extern "C" fn(
    instance: *mut c_void,
    operation: u32,
    input: *const u8,
    input_len: usize,
    sink: *mut c_void,
    write: WriteFn,
) -> i32;

/// Drops an instance. The library itself stays loaded.
pub type DestroyFn = unsafe extern "C" fn(instance: *mut c_void);

/// What the host offers a plugin at init. Append-only, like [`Declaration`].
#[repr(C)]
#[derive(Debug)]
pub struct HostApi {
    /// `size_of::<HostApi>()` as the host was built.
    pub size: u32,
    /// The host's ABI major version.
    pub abi_major: u16,
    /// The host's ABI minor version.
    pub abi_minor: u16,
    /// The most verbose level the host will record (a `LOG_*` value; 0 = none).
    pub max_log_level: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Opaque host pointer passed back to `log`. Valid for as long as the library is loaded.
    pub ctx: *mut c_void,
    /// The host's log sink, or null.
    pub log: Option<LogFn>,
}

/// The declaration a plugin library exports through [`ENTRY_SYMBOL`].
#[repr(C)]
#[derive(Debug)]
pub struct Declaration {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// [`ABI_MAJOR`] as the plugin was built.
    pub abi_major: u16,
    /// [`ABI_MINOR`] as the plugin was built.
    pub abi_minor: u16,
    /// `size_of::<Declaration>()` as the plugin was built.
    pub size: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// NUL-terminated SDK version.
    pub sdk_version: *const c_char,
    /// NUL-terminated plugin name.
    pub name: *const c_char,
    /// NUL-terminated plugin version.
    pub version: *const c_char,
    /// Builds an instance.
    pub init: Option<InitFn>,
    /// Runs an operation.
    pub call: Option<CallFn>,
    /// Drops an instance.
    pub destroy: Option<DestroyFn>,
    /// ABI 1.1: NUL-terminated description of the plugin, or null. A host reads it only when
    /// `size` covers it.
    pub description: *const c_char,
}

/// The size of an ABI 1.0 declaration: the fields up to `destroy`. Plugins built for 1.0
/// declare this size, and a host reads nothing past it from them.
pub const DECLARATION_SIZE_1_0: u32 = std::mem::offset_of!(Declaration, description) as u32;

impl Declaration {
    /// The declaration of plugin `P`. `name` and `version` must end with a NUL byte; the
    /// export macro passes the crate's package name and version.
    pub const fn new<P: Plugin>(
        name: &'static str,
        version: &'static str,
        description: &'static str,
        unwind: bool,
    ) -> Self {
        assert!(ends_with_nul(name) && ends_with_nul(version), "name and version must end with NUL");
        assert!(ends_with_nul(description), "description must end with NUL");
        Self {
            magic: MAGIC,
            abi_major: ABI_MAJOR,
            abi_minor: ABI_MINOR,
            size: size_of::<Declaration>() as u32,
            flags: if unwind { FLAG_UNWIND } else { 0 } | if P::EFFECT_FREE { FLAG_EFFECT_FREE } else { 0 },
            reserved: 0,
            sdk_version: SDK_VERSION_NUL.as_ptr().cast(),
            name: name.as_ptr().cast(),
            version: version.as_ptr().cast(),
            init: Some(init::<P>),
            call: Some(call::<P>),
            destroy: Some(destroy::<P>),
            description: description.as_ptr().cast(),
        }
    }
}

const SDK_VERSION_NUL: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");

const fn ends_with_nul(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty() && bytes[bytes.len() - 1] == 0
}

/// A [`Declaration`] that can live in a `static`.
#[repr(transparent)]
#[derive(Debug)]
pub struct StaticDeclaration(pub Declaration);

// SAFETY: a declaration is never mutated after it is built; its pointers point to `'static`
// NUL-terminated strings and its function pointers to code, all immutable.
unsafe impl Sync for StaticDeclaration {}

/// The host's log sink as the plugin saw it at its last init.
#[derive(Clone, Copy)]
struct HostLog {
    log: LogFn,
    ctx: usize,
}

static HOST_LOG: RwLock<Option<HostLog>> = RwLock::new(None);
static INSTALL_LOGGER: Once = Once::new();

/// Forwards the plugin's `log` records to the host.
struct HostLogger;

impl log::Log for HostLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let Ok(guard) = HOST_LOG.read() else { return };
        let Some(sink) = *guard else { return };
        let message = record.args().to_string();
        let target = record.target();
        // SAFETY: the host guarantees `log` and `ctx` stay valid while the library is loaded;
        // both buffers are valid for their lengths for the duration of the call.
        unsafe {
            (sink.log)(
                sink.ctx as *mut c_void,
                record.level() as u32,
                target.as_ptr(),
                target.len(),
                message.as_ptr(),
                message.len(),
            )
        };
    }

    fn flush(&self) {}
}

fn install_host_log(host: &HostApi) {
    if let Ok(mut guard) = HOST_LOG.write() {
        *guard = host.log.map(|log| HostLog { log, ctx: host.ctx as usize });
    }
    let level = match host.max_log_level {
        0 => log::LevelFilter::Off,
        LOG_ERROR => log::LevelFilter::Error,
        LOG_WARN => log::LevelFilter::Warn,
        LOG_INFO => log::LevelFilter::Info,
        LOG_DEBUG => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    log::set_max_level(level);
    INSTALL_LOGGER.call_once(|| {
        // Another logger may already be installed if the author set one; keep it then.
        let _ = log::set_logger(&HostLogger);
        // This library has its own copy of std, so this hook sees only the plugin's panics:
        // report them through the host's log instead of the daemon's stderr.
        std::panic::set_hook(Box::new(|info| log::error!(target: "panic", "plugin panicked: {info}")));
    });
}

/// Borrows a buffer from the other side; a null pointer is an empty buffer only when `len` is 0.
///
/// # Safety
/// `ptr` must be valid for reads of `len` bytes for `'a`, or null.
unsafe fn borrow<'a>(ptr: *const u8, len: usize) -> Option<&'a [u8]> {
    if ptr.is_null() {
        return (len == 0).then_some(&[]);
    }
    // SAFETY: non-null, and the caller guarantees it is valid for `len` bytes.
    Some(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Hands `bytes` to the host's write callback.
///
/// # Safety
/// `write` and `sink` must be the pair the host passed to this call.
unsafe fn emit(sink: *mut c_void, write: WriteFn, bytes: &[u8]) {
    // SAFETY: the buffer is valid for its length during the call; the host copies it.
    unsafe { write(sink, bytes.as_ptr(), bytes.len()) }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

fn error_json(error: &PluginError) -> Vec<u8> {
    serde_json::to_vec(error).unwrap_or_else(|_| br#"{"code":"internal","message":"unencodable error"}"#.to_vec())
}

/// The `init` entry point generated for `P`.
///
/// # Safety
/// Called by the host only, with the pointers the C ABI documents.
pub unsafe extern "C" fn init<P: Plugin>(
    host: *const HostApi,
    config: *const u8,
    config_len: usize,
    instance: *mut *mut c_void,
    sink: *mut c_void,
    write: WriteFn,
) -> i32 {
    // SAFETY: the host passes a valid config buffer (or null with length 0).
    let Some(config) = (unsafe { borrow(config, config_len) }) else { return STATUS_BAD_INPUT };
    if instance.is_null() {
        return STATUS_BAD_INPUT;
    }
    // SAFETY: a non-null `host` points to a `HostApi` valid for the call.
    let host = unsafe { host.as_ref() };
    let built = catch_unwind(AssertUnwindSafe(|| {
        if let Some(host) = host {
            install_host_log(host);
        }
        let config: P::Config = serde_json::from_slice(config)
            .map_err(|e| PluginError::invalid_config(format!("configuration does not decode: {e}")))?;
        P::new(config)
    }));
    match built {
        Ok(Ok(plugin)) => {
            // SAFETY: `instance` is non-null and points to writable storage owned by the host.
            unsafe { *instance = Box::into_raw(Box::new(plugin)).cast() };
            STATUS_OK
        }
        // SAFETY (both arms): `sink` and `write` are the host's pair for this call.
        Ok(Err(error)) => {
            unsafe { emit(sink, write, &error_json(&error)) };
            STATUS_ERROR
        }
        Err(payload) => {
            unsafe { emit(sink, write, panic_message(payload.as_ref()).as_bytes()) };
            STATUS_PANIC
        }
    }
}

/// The `call` entry point generated for `P`.
///
/// # Safety
/// `instance` must come from `init::<P>` and not be destroyed; the other pointers as the C ABI
/// documents.
pub unsafe extern "C" fn call<P: Plugin>(
    instance: *mut c_void,
    operation: u32,
    input: *const u8,
    input_len: usize,
    sink: *mut c_void,
    write: WriteFn,
) -> i32 {
    // SAFETY: the host passes the instance `init::<P>` made; shared access only.
    let Some(plugin) = (unsafe { instance.cast::<P>().as_ref() }) else { return STATUS_BAD_INPUT };
    let Some(operation) = Operation::from_u32(operation) else { return STATUS_UNKNOWN_OPERATION };
    // SAFETY: the host's input buffer is valid for the call.
    let Some(input) = (unsafe { borrow(input, input_len) }) else { return STATUS_BAD_INPUT };
    let (status, output) = match catch_unwind(AssertUnwindSafe(|| dispatch(plugin, operation, input))) {
        Ok(Ok(answer)) => (STATUS_OK, answer),
        Ok(Err(DispatchError::Plugin(error))) => (STATUS_ERROR, error_json(&error)),
        Ok(Err(bad @ DispatchError::BadInput { .. })) => (STATUS_BAD_INPUT, bad.to_string().into_bytes()),
        Err(payload) => (STATUS_PANIC, panic_message(payload.as_ref()).into_bytes()),
    };
    // SAFETY: `sink` and `write` are the host's pair for this call.
    unsafe { emit(sink, write, &output) };
    status
}

/// The `destroy` entry point generated for `P`.
///
/// # Safety
/// `instance` must come from `init::<P>`, with no call in flight, and is invalid afterwards.
pub unsafe extern "C" fn destroy<P: Plugin>(instance: *mut c_void) {
    if instance.is_null() {
        return;
    }
    // SAFETY: the instance was made by `Box::into_raw` in `init::<P>` and is dropped once.
    let plugin = unsafe { Box::from_raw(instance.cast::<P>()) };
    // A panicking destructor must not unwind into the host.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(plugin)));
}

/// Exports a [`Plugin`] implementation through the C ABI.
///
/// Place it once in the plugin crate (built as a `cdylib`); it generates the entry symbol and
/// the static declaration, named and versioned after the crate's package:
///
/// ```
/// # use cardgate_sdk::{Plugin, PluginError, SettlementRequest, Split};
/// # pub struct MyPolicy;
/// # impl Plugin for MyPolicy {
/// #     type Config = ();
/// #     fn new((): ()) -> Result<Self, PluginError> { Ok(MyPolicy) }
/// #     fn quote(&self, r: &SettlementRequest) -> Result<Split, PluginError> {
/// #         Ok(Split { cash_pay_fen: r.due_fen, ..Split::default() })
/// #     }
/// # }
/// cardgate_sdk::export_plugin!(MyPolicy);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        $crate::export_plugin!(@declare $plugin, {});
    };
    // Test fixtures override declaration fields to build deliberately broken plugins.
    (@declare $plugin:ty, { $($field:ident : $value:expr),* $(,)? }) => {
        /// The cardgate plugin entry point: returns this library's static declaration.
        #[unsafe(no_mangle)]
        pub extern "C" fn cardgate_plugin_declaration() -> *const $crate::abi::Declaration {
            static DECLARATION: $crate::abi::StaticDeclaration =
                $crate::abi::StaticDeclaration($crate::abi::Declaration {
                    $($field: $value,)*
                    ..$crate::abi::Declaration::new::<$plugin>(
                        concat!(env!("CARGO_PKG_NAME"), "\0"),
                        concat!(env!("CARGO_PKG_VERSION"), "\0"),
                        concat!(env!("CARGO_PKG_DESCRIPTION"), "\0"),
                        cfg!(panic = "unwind"),
                    )
                });
            &DECLARATION.0
        }
    };
}
