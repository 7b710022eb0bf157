//! Loads plugin libraries and calls them through ABI v1. With the SDK's `abi` module, the only
//! place with `unsafe` code.
//!
//! Load sequence: refuse a library or cache directory others can write -> read the file ->
//! SHA-256 -> copy to a content-addressed path -> open the copy once, hash it through that
//! descriptor (against the signed manifest, whose plugin name must be the configured one) ->
//! `dlopen` that same open file (`/proc/self/fd/N`, `RTLD_NOW | RTLD_LOCAL`) -> entry symbol -> magic -> ABI major equal -> ABI
//! minor not newer -> declaration size and functions -> unwinding -> init. Because the copy's
//! name is its hash, a rebuilt file at the same path loads as new code, never as the cached
//! old one. Libraries are never closed: Rust cdylibs cannot be unloaded soundly, so a
//! [`Library`] keeps its handle for the life of the process.

use std::ffi::{CStr, c_void};
use std::fs;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cardgate_sdk::abi::{self, Declaration, HostApi};
use cardgate_sdk::{Operation, PluginError};

use super::error::{AbiVersion, CallError, LoadError};
use super::signing::{SignatureError, SignerTrust};

/// Where and how to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Directory for the content-addressed copies; created if missing.
    pub cache_dir: PathBuf,
    /// Refuse libraries built with `panic = "abort"` (required for the in-process tier).
    pub require_unwind: bool,
    /// Trusted plugin signers; `None` loads unsigned libraries (only when configured so).
    pub signers: Option<Arc<SignerTrust>>,
    /// The plugin name the signed manifest must carry; `None`: the label it is loaded under.
    pub manifest_name: Option<String>,
}

impl LoadOptions {
    /// In-process loading into `cache_dir`, unsigned libraries allowed.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self { cache_dir: cache_dir.into(), require_unwind: true, signers: None, manifest_name: None }
    }

    /// The same, requiring a manifest signed by one of `signers`.
    pub fn with_signers(self, signers: Arc<SignerTrust>) -> Self {
        Self { signers: Some(signers), ..self }
    }
}

/// What a plugin declares about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    /// Declared name (the crate's package name for SDK plugins).
    pub name: String,
    /// Declared version.
    pub version: String,
    /// The SDK version it was built with.
    pub sdk_version: String,
    /// The ABI it was built for.
    pub abi: AbiVersion,
    /// Whether it was built with unwinding (its panics can be contained).
    pub unwind: bool,
    /// Its description (ABI 1.1; empty for older plugins).
    pub description: String,
    /// Effect-free (ABI 1.2 flag): a settlement whose payers all are is recorded in one commit.
    pub effect_free: bool,
    /// Process tier: its child runs without network access (an effect-free plugin, where the
    /// system allows a network namespace of its own). False in process.
    pub network_denied: bool,
}

/// A loaded plugin library: checked, never unloaded.
///
/// Owned through `Arc` by every [`Instance`] made from it. Dropping the last reference does not
/// close the library (see the module docs); the code stays mapped for the life of the process.
#[derive(Debug)]
pub struct Library {
    /// The name the library was loaded under (configured name, or the file name).
    label: String,
    /// The path it was loaded from.
    source: PathBuf,
    /// The content-addressed copy that was `dlopen`ed.
    loaded: PathBuf,
    /// Hex SHA-256 of the library's bytes.
    sha256: String,
    info: PluginInfo,
    init: abi::InitFn,
    call: abi::CallFn,
    destroy: abi::DestroyFn,
    /// Kept open forever: never `dlclose`.
    _handle: ManuallyDrop<libloading::os::unix::Library>,
}

impl Library {
    /// Loads and checks the library at `path`, without initialising it.
    pub fn open(label: &str, path: &Path, options: &LoadOptions) -> Result<Arc<Self>, LoadError> {
        let signed =
            |error: SignatureError| LoadError::Signature { plugin: label.to_owned(), path: path.to_owned(), error };
        let manifest = match &options.signers {
            Some(signers) => Some(signers.verify_manifest(path, label).map_err(signed)?),
            None => None,
        };
        refuse_shared_directory(label, path.parent().unwrap_or(Path::new(".")))?;
        let (loaded, sha256) = copy_content_addressed(label, path, &options.cache_dir)?;
        // The copy is opened once; its bytes are hashed through that descriptor and the same
        // open file is mapped (`/proc/self/fd/N`): what runs is exactly what was checked, even
        // if the path were swapped in between.
        let (mapped, found) = open_mapped(&sha256, &loaded).map_err(|source| LoadError::Io {
            plugin: label.to_owned(),
            path: loaded.clone(),
            action: "reading the content-addressed copy",
            source,
        })?;
        if let Some(manifest) = &manifest
            && found != manifest.sha256
        {
            return Err(signed(SignatureError::DigestMismatch { expected: manifest.sha256.clone(), found }));
        }
        if let Some(manifest) = &manifest {
            check_manifest_name(manifest, options.manifest_name.as_deref().unwrap_or(label)).map_err(signed)?;
        }
        if found != sha256 {
            return Err(LoadError::UnsafeLocation {
                plugin: label.to_owned(),
                path: loaded.clone(),
                reason: format!("the cached copy changed after it was written (SHA-256 {found}, expected {sha256})"),
            });
        }
        let handle = dlopen(label, path, &mapped)?;
        let declaration = entry_declaration(label, path, &handle)?;
        let (info, functions) = check_declaration(label, path, declaration, options.require_unwind)?;
        if let Some(manifest) = &manifest {
            let declared = (info.name.as_str(), info.version.as_str(), info.abi.to_string());
            let signed_for = (manifest.name.as_str(), manifest.version.as_str(), manifest.abi.clone());
            if declared != signed_for || manifest.target != super::signing::target() {
                return Err(signed(SignatureError::ManifestMismatch {
                    expected: format!(
                        "{} {} ABI {} for {}",
                        manifest.name, manifest.version, manifest.abi, manifest.target
                    ),
                    found: format!("{} {} ABI {} for {}", info.name, info.version, info.abi, super::signing::target()),
                }));
            }
        }
        Ok(Arc::new(Self {
            label: label.to_owned(),
            source: path.to_owned(),
            loaded,
            sha256,
            info,
            init: functions.0,
            call: functions.1,
            destroy: functions.2,
            _handle: ManuallyDrop::new(handle),
        }))
    }

    /// What the plugin declares.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// Hex SHA-256 of the library's bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The path the library was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The content-addressed copy that is mapped.
    pub fn loaded_path(&self) -> &Path {
        &self.loaded
    }

    /// Runs the plugin's init with its JSON configuration.
    pub fn instantiate(self: &Arc<Self>, config: &serde_json::Value) -> Result<Instance, LoadError> {
        let config = serde_json::to_vec(config)
            .map_err(|e| LoadError::BadConfig { plugin: self.label.clone(), reason: e.to_string() })?;
        let host = host_api(&self.label);
        let mut instance: *mut c_void = std::ptr::null_mut();
        let mut output = Vec::new();
        // SAFETY: `init` comes from a checked declaration; every pointer is valid for the call,
        // `host` lives for the rest of the process, `output` is the sink `write_to_vec` expects.
        let status = unsafe {
            (self.init)(&host, config.as_ptr(), config.len(), &mut instance, sink(&mut output), write_to_vec)
        };
        match (status, NonNull::new(instance)) {
            (abi::STATUS_OK, Some(ptr)) => Ok(Instance { library: Arc::clone(self), ptr }),
            (abi::STATUS_OK, None) => Err(self.init_failed(PluginError::internal("init returned no instance"))),
            (abi::STATUS_ERROR, _) => Err(self.init_failed(decode_plugin_error(&output))),
            (abi::STATUS_PANIC, _) => {
                Err(self
                    .init_failed(PluginError::internal(format!("init panicked: {}", String::from_utf8_lossy(&output)))))
            }
            (status, _) => Err(self.init_failed(PluginError::internal(format!(
                "init returned status {status}: {}",
                String::from_utf8_lossy(&output)
            )))),
        }
    }

    fn init_failed(&self, error: PluginError) -> LoadError {
        LoadError::InitFailed {
            plugin: self.label.clone(),
            version: self.info.version.clone(),
            path: self.source.clone(),
            found: self.info.abi,
            expected: AbiVersion::HOST,
            error,
        }
    }
}

/// One initialised plugin: a configured policy, callable from any thread.
///
/// Dropping it calls the plugin's `destroy`; the library stays loaded.
#[derive(Debug)]
pub struct Instance {
    library: Arc<Library>,
    ptr: NonNull<c_void>,
}

// SAFETY: the ABI requires plugin instances to be callable from several threads at once (the
// SDK's trait requires `Send + Sync`; the C header documents the same duty).
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

impl Instance {
    /// The library this instance runs.
    pub fn library(&self) -> &Arc<Library> {
        &self.library
    }

    /// Calls one operation with a JSON input and returns the JSON answer. Synchronous: runs on
    /// the calling thread until the plugin returns.
    pub fn call(&self, operation: Operation, input: &[u8]) -> Result<Vec<u8>, CallError> {
        let (status, output) = self.call_raw(operation, input);
        interpret(status, output, operation)
    }

    /// Calls one operation and returns the ABI status and the raw output (for the process
    /// tier, which forwards both).
    pub fn call_raw(&self, operation: Operation, input: &[u8]) -> (i32, Vec<u8>) {
        let mut output = Vec::new();
        // SAFETY: `ptr` came from this library's init and is destroyed only on drop, after all
        // borrows end; the input and output buffers are valid for the call.
        let status = unsafe {
            (self.library.call)(
                self.ptr.as_ptr(),
                operation as u32,
                input.as_ptr(),
                input.len(),
                sink(&mut output),
                write_to_vec,
            )
        };
        (status, output)
    }
}

/// Turns an ABI status and output into the call's result.
pub(crate) fn interpret(status: i32, output: Vec<u8>, operation: Operation) -> Result<Vec<u8>, CallError> {
    if output.len() > MAX_ANSWER_BYTES {
        return Err(CallError::BadAnswer { reason: format!("the answer is larger than {MAX_ANSWER_BYTES} bytes") });
    }
    match status {
        abi::STATUS_OK => Ok(output),
        abi::STATUS_ERROR => Err(CallError::Rejected(decode_plugin_error(&output))),
        abi::STATUS_PANIC => Err(CallError::Panicked { message: String::from_utf8_lossy(&output).into_owned() }),
        abi::STATUS_BAD_INPUT => Err(CallError::BadInput { reason: String::from_utf8_lossy(&output).into_owned() }),
        abi::STATUS_UNKNOWN_OPERATION => Err(CallError::UnknownOperation { operation: operation.as_str() }),
        status => Err(CallError::BadStatus { status }),
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from init, no call can be in flight (we hold the only owner), and
        // it is never used again.
        unsafe { (self.library.destroy)(self.ptr.as_ptr()) };
    }
}

fn decode_plugin_error(output: &[u8]) -> PluginError {
    serde_json::from_slice(output)
        .unwrap_or_else(|_| PluginError::internal(format!("undecodable error: {}", String::from_utf8_lossy(output))))
}

/// Copies the library to `<cache_dir>/<sha256>.so` (atomically; an intact existing copy is
/// reused) and returns that path and the hash.
/// A manifest signed for another plugin, placed at this plugin's path, is refused: the name
/// it carries must be the one configured (`plugins.NAME.declared_name`, default NAME).
pub fn check_manifest_name(manifest: &super::signing::Manifest, configured: &str) -> Result<(), SignatureError> {
    if manifest.name == configured {
        return Ok(());
    }
    Err(SignatureError::WrongPlugin { configured: configured.to_owned(), signed_for: manifest.name.clone() })
}

/// Moves the calling thread (and the threads it starts from now on) into a network namespace
/// of its own, with no interface but a loopback that is down: a plugin host does this for an
/// effect-free plugin, so the declaration is checked, not only trusted. Needs `CAP_SYS_ADMIN`
/// (the gateway's user namespace); elsewhere it fails and the caller says so.
pub fn deny_network() -> std::io::Result<()> {
    // SAFETY: a new network namespace changes no file descriptor, memory or thread state; the
    // hazard `unshare_unsafe` guards against is `CLONE_FILES`, not used here.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }.map_err(std::io::Error::from)
}

/// The content-addressed copies opened for loading, by SHA-256, kept open for the life of the
/// process: the dynamic loader knows a library by the name it was opened under, so a
/// `/proc/self/fd/N` name must never stand for another file (a closed and reused descriptor
/// would make it answer with the library loaded first). One descriptor per distinct library.
static MAPPED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, fs::File>>> =
    std::sync::OnceLock::new();

/// Opens the copy of `sha256` once (or takes the descriptor opened before) and hashes what is
/// readable through that descriptor: the name to `dlopen` and the SHA-256 of what it maps.
fn open_mapped(sha256: &str, copy: &Path) -> std::io::Result<(PathBuf, String)> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let mut mapped = MAPPED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    let file = match mapped.entry(sha256.to_owned()) {
        std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
        std::collections::hash_map::Entry::Vacant(entry) => entry.insert(fs::File::open(copy)?),
    };
    let length = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
    let mut bytes = vec![0; length];
    file.read_exact_at(&mut bytes, 0)?;
    let found = sha256_hex(&bytes);
    let name = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    if found != sha256 {
        // Opened afresh next time.
        mapped.remove(sha256);
    }
    Ok((name, found))
}

/// Refuses a directory that users other than the gateway's can write (or that another user
/// owns): whoever can write it can put other code where the gateway loads from.
pub fn refuse_shared_directory(label: &str, dir: &Path) -> Result<(), LoadError> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_location =
        |reason: String| LoadError::UnsafeLocation { plugin: label.to_owned(), path: dir.to_owned(), reason };
    let Ok(meta) = fs::metadata(dir) else { return Ok(()) };
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_location(format!(
            "the directory is writable by group or others (mode {mode:04o}); run chmod go-w on it"
        )));
    }
    // Owned by root or by the gateway's user: /proc/self belongs to the process's user.
    let me = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(meta.uid());
    if meta.uid() != 0 && meta.uid() != me {
        return Err(unsafe_location(format!("the directory belongs to another user (uid {})", meta.uid())));
    }
    Ok(())
}

fn copy_content_addressed(label: &str, path: &Path, cache_dir: &Path) -> Result<(PathBuf, String), LoadError> {
    let io = |action: &'static str, at: &Path| {
        let (plugin, path) = (label.to_owned(), at.to_owned());
        move |source| LoadError::Io { plugin, path, action, source }
    };
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LoadError::FileMissing { plugin: label.to_owned(), path: path.to_owned() });
        }
        Err(e) => return Err(io("reading the library", path)(e)),
    };
    let sha256 = sha256_hex(&bytes);
    if !cache_dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(cache_dir)
            .map_err(io("creating the plugin cache directory", cache_dir))?;
    }
    refuse_shared_directory(label, cache_dir)?;
    let target = cache_dir.join(format!("{sha256}.so"));
    if fs::read(&target).is_ok_and(|existing| sha256_hex(&existing) == sha256) {
        return Ok((target, sha256));
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let temp =
        cache_dir.join(format!(".{sha256}.{}.{}.tmp", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let written = {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new().write(true).create_new(true).mode(0o500).open(&temp)
    }
    .and_then(|mut f| {
        f.write_all(&bytes)?;
        f.sync_all()
    });
    written
        .and_then(|()| fs::rename(&temp, &target))
        .map_err(io("writing the content-addressed copy", &target))
        .inspect_err(|_| {
            let _ = fs::remove_file(&temp);
        })?;
    Ok((target, sha256))
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn dlopen(label: &str, path: &Path, loaded: &Path) -> Result<libloading::os::unix::Library, LoadError> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    // SAFETY: running a library's initialisers is the point of loading a plugin; the library is
    // the exact bytes hashed above, in a directory the gateway owns.
    unsafe { Library::open(Some(loaded), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| LoadError::NotSharedObject {
        plugin: label.to_owned(),
        path: path.to_owned(),
        reason: std::error::Error::source(&e).map_or_else(|| e.to_string(), |cause| format!("{e}: {cause}")),
    })
}

fn entry_declaration<'lib>(
    label: &str,
    path: &Path,
    handle: &'lib libloading::os::unix::Library,
) -> Result<&'lib Declaration, LoadError> {
    type Entry = unsafe extern "C" fn() -> *const Declaration;
    let missing = || LoadError::EntrySymbolMissing { plugin: label.to_owned(), path: path.to_owned() };
    // SAFETY: the symbol is declared by the ABI with exactly this signature.
    let entry = unsafe { handle.get::<Entry>(abi::ENTRY_SYMBOL.as_bytes()) }.map_err(|_| missing())?;
    // SAFETY: calling the entry has no preconditions; it returns a pointer to a static that
    // lives as long as the library, which is never unloaded.
    let declaration = unsafe { entry() };
    // SAFETY: non-null pointers from the entry point to a declaration; only its 16-byte header
    // is read before the size is checked.
    unsafe { declaration.as_ref() }.ok_or_else(missing)
}

type Functions = (abi::InitFn, abi::CallFn, abi::DestroyFn);

fn check_declaration(
    label: &str,
    path: &Path,
    declaration: &Declaration,
    require_unwind: bool,
) -> Result<(PluginInfo, Functions), LoadError> {
    let (plugin, path) = (label.to_owned(), path.to_owned());
    if declaration.magic != abi::MAGIC {
        return Err(LoadError::BadMagic { plugin, path, found: declaration.magic });
    }
    let found = AbiVersion { major: declaration.abi_major, minor: declaration.abi_minor };
    let expected = AbiVersion::HOST;
    if found.major != expected.major {
        return Err(LoadError::AbiMajorMismatch { plugin, path, found, expected });
    }
    if found.minor > expected.minor {
        return Err(LoadError::AbiMinorNewer { plugin, path, found, expected });
    }
    let bad = |reason: String| LoadError::BadDeclaration {
        plugin: label.to_owned(),
        path: path.clone(),
        found,
        expected,
        reason,
    };
    if declaration.size < abi::DECLARATION_SIZE_1_0 {
        return Err(bad(format!(
            "size {} is smaller than the {} bytes of ABI 1.0",
            declaration.size,
            abi::DECLARATION_SIZE_1_0
        )));
    }
    // Fields added by later minor versions are read only when the declaration has them.
    let has = |offset: usize| declaration.size as usize >= offset + size_of::<usize>();
    let description = if has(std::mem::offset_of!(Declaration, description)) {
        read_c_str(declaration.description).unwrap_or_default()
    } else {
        String::new()
    };
    let text =
        |what: &str, ptr| read_c_str(ptr).ok_or_else(|| bad(format!("{what} is not a NUL-terminated UTF-8 string")));
    let info = PluginInfo {
        name: text("name", declaration.name)?,
        version: text("version", declaration.version)?,
        sdk_version: text("sdk_version", declaration.sdk_version)?,
        abi: found,
        unwind: declaration.flags & abi::FLAG_UNWIND != 0,
        // The flag means something only from plugins that know it (1.2 on).
        effect_free: found.minor >= 2 && declaration.flags & abi::FLAG_EFFECT_FREE != 0,
        network_denied: false,
        description,
    };
    let (Some(init), Some(call), Some(destroy)) = (declaration.init, declaration.call, declaration.destroy) else {
        return Err(bad("init, call and destroy must all be set".to_owned()));
    };
    if require_unwind && !info.unwind {
        return Err(LoadError::BuiltWithPanicAbort { plugin, version: info.version, path, found, expected });
    }
    Ok((info, (init, call, destroy)))
}

fn read_c_str(ptr: *const std::ffi::c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: the declaration's strings are NUL-terminated statics of the never-unloaded library.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str().ok().map(str::to_owned)
}

/// Host context handed to a plugin's log callback; leaked so it outlives every library.
struct HostContext {
    plugin: String,
}

fn host_api(label: &str) -> HostApi {
    let ctx: &'static HostContext = Box::leak(Box::new(HostContext { plugin: label.to_owned() }));
    HostApi {
        size: size_of::<HostApi>() as u32,
        abi_major: abi::ABI_MAJOR,
        abi_minor: abi::ABI_MINOR,
        max_log_level: max_log_level(),
        reserved: 0,
        ctx: std::ptr::from_ref(ctx).cast_mut().cast(),
        log: Some(host_log),
    }
}

fn max_log_level() -> u32 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::OFF => 0,
        LevelFilter::ERROR => abi::LOG_ERROR,
        LevelFilter::WARN => abi::LOG_WARN,
        LevelFilter::INFO => abi::LOG_INFO,
        LevelFilter::DEBUG => abi::LOG_DEBUG,
        _ => abi::LOG_TRACE,
    }
}

fn sink(output: &mut Vec<u8>) -> *mut c_void {
    std::ptr::from_mut(output).cast()
}

/// The largest answer a plugin may give (1 MiB, both tiers): a split with its breakdown is a
/// few kilobytes. A larger one is refused as `plugin_protocol_error`, and what the plugin
/// writes past it is never copied, so a runaway answer cannot grow the gateway or the ledger.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The host's write callback: appends the plugin's bytes to the `Vec<u8>` behind `sink`, up
/// to one byte past [`MAX_ANSWER_BYTES`] (enough to tell that the answer is too large).
unsafe extern "C" fn write_to_vec(sink: *mut c_void, data: *const u8, len: usize) {
    if sink.is_null() || data.is_null() {
        return;
    }
    // SAFETY: `sink` is the `Vec<u8>` this module passed for the call.
    let output = unsafe { &mut *sink.cast::<Vec<u8>>() };
    let room = (MAX_ANSWER_BYTES + 1).saturating_sub(output.len()).min(len);
    // SAFETY: `data` is valid for `len` bytes (and so for `room`) for the duration of the
    // callback.
    output.extend_from_slice(unsafe { std::slice::from_raw_parts(data, room) });
}

/// The host's log callback: forwards a plugin's record to `tracing`.
unsafe extern "C" fn host_log(
    ctx: *mut c_void,
    level: u32,
    target: *const u8,
    target_len: usize,
    message: *const u8,
    message_len: usize,
) {
    // SAFETY: `ctx` is the leaked `HostContext` of `host_api`, or null.
    let Some(ctx) = (unsafe { ctx.cast::<HostContext>().as_ref() }) else { return };
    let text = |ptr: *const u8, len| {
        if ptr.is_null() {
            return std::borrow::Cow::Borrowed("");
        }
        // SAFETY: the plugin passes buffers valid for their lengths during the callback.
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(ptr, len) })
    };
    let (target, message) = (text(target, target_len), text(message, message_len));
    let plugin = ctx.plugin.as_str();
    match level {
        abi::LOG_ERROR => tracing::error!(plugin, %target, "{message}"),
        abi::LOG_WARN => tracing::warn!(plugin, %target, "{message}"),
        abi::LOG_INFO => tracing::info!(plugin, %target, "{message}"),
        abi::LOG_DEBUG => tracing::debug!(plugin, %target, "{message}"),
        _ => tracing::trace!(plugin, %target, "{message}"),
    }
}
