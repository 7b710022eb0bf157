//! The process isolation tier: the same plugin library, run in a child `cardgate plugin-host`
//! and called over a Unix socket with length-prefixed frames.
//!
//! A plugin that aborts, segfaults or runs out of memory kills only its child: the call fails
//! with `plugin_unavailable`, and the child is restarted with backoff on a later call. A call
//! that outlives its timeout kills the child (a thread stuck in a loop cannot be stopped any
//! other way) and fails with `plugin_timeout`.
//!
//! Frames: request `u32 length | u32 operation | JSON`, answer `u32 length | i32 status |
//! bytes`, lengths little-endian and counting what follows them.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cardgate_sdk::Operation;

use super::error::{AbiVersion, CallError};
use super::loader::{Instance, PluginInfo};

/// Largest frame accepted either way.
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// How to start a plugin's child process.
#[derive(Debug, Clone)]
pub struct HostCommand {
    /// The `cardgate` binary that runs `plugin-host`.
    pub binary: PathBuf,
    /// The plugin library.
    pub library: PathBuf,
    /// The plugin's configured name.
    pub name: String,
    /// SHA-256 the child must find in the library (checked, signed, by the parent).
    pub sha256: String,
    /// Content-addressed cache directory for the child's copy.
    pub cache_dir: PathBuf,
    /// The plugin's configuration (JSON), sent on the child's standard input.
    pub config: serde_json::Value,
    /// The child's data-segment limit (`RLIMIT_DATA`), MiB; `None`: unlimited. A plugin that
    /// leaks runs out inside its own process, which dies and is restarted.
    pub memory_limit_mb: Option<u64>,
}

struct Running {
    child: Child,
    /// Kept open: the child exits when it reads end-of-file, so it never outlives the gateway.
    _lifeline: Option<std::process::ChildStdin>,
    socket: PathBuf,
    idle: Vec<std::os::unix::net::UnixStream>,
}

enum State {
    Running(Running),
    Dead { since: Instant, restarts: u32 },
}

/// A plugin in its own process.
pub struct ProcessPlugin {
    command: HostCommand,
    info: PluginInfo,
    state: Mutex<State>,
}

impl std::fmt::Debug for ProcessPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessPlugin({})", self.command.name)
    }
}

fn backoff(restarts: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << restarts.min(7))).min(Duration::from_secs(5))
}

/// The directory the children's sockets are made in: `run/` in the cache directory, the
/// gateway's user's alone (0700). Whoever can connect to a child's socket can call its plugin
/// with any request; a socket's own mode follows the umask, and the cache directory may be
/// readable by all, so the socket is put where no one else can reach it whatever the umask.
fn private_socket_dir(cache_dir: &std::path::Path) -> Result<std::path::PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = cache_dir.join("run");
    let shown = |e: std::io::Error| format!("{}: {e}", dir.display());
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(shown(e)),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(shown)?;
    if !meta.is_dir() || meta.uid() != rustix::process::getuid().as_raw() {
        return Err(format!("{}: not a directory of the gateway's user", dir.display()));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(shown)?;
    }
    Ok(dir)
}

/// Starts the child and waits for its ready line: the plugin's declaration, or why it failed.
fn spawn(command: &HostCommand) -> Result<(Running, PluginInfo), String> {
    let sockets = private_socket_dir(&command.cache_dir)?;
    let socket =
        sockets.join(format!("{}-{}.sock", command.name, std::process::id() as u64 * 1_000_000 + next_serial()));
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new(&command.binary)
        .arg("plugin-host")
        .arg("--library")
        .arg(&command.library)
        .args(["--name", &command.name, "--sha256", &command.sha256])
        .arg("--cache-dir")
        .arg(&command.cache_dir)
        .arg("--socket")
        .arg(&socket)
        .args(command.memory_limit_mb.map(|mb| format!("--memory-limit-mb={mb}")))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", command.binary.display()))?;
    let mut lifeline = child.stdin.take();
    if let Some(stdin) = &mut lifeline {
        let _ = stdin.write_all(format!("{}\n", command.config).as_bytes());
        let _ = stdin.flush();
    }
    let mut line = String::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    if ready["ready"] != true {
        let _ = child.kill();
        let _ = child.wait();
        return Err(ready["error"].as_str().unwrap_or("the plugin host exited before it was ready").to_owned());
    }
    let text = |key: &str| ready[key].as_str().unwrap_or_default().to_owned();
    let (major, minor) =
        text("abi").split_once('.').map_or((0, 0), |(a, b)| (a.parse().unwrap_or(0), b.parse().unwrap_or(0)));
    let info = PluginInfo {
        name: text("name"),
        version: text("version"),
        sdk_version: text("sdk_version"),
        abi: AbiVersion { major, minor },
        unwind: ready["unwind"] == true,
        effect_free: ready["effect_free"] == true,
        network_denied: ready["network_denied"] == true,
        description: text("description"),
    };
    Ok((Running { child, _lifeline: lifeline, socket, idle: Vec::new() }, info))
}

fn next_serial() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    SERIAL.fetch_add(1, Ordering::Relaxed)
}

impl ProcessPlugin {
    /// Starts the child; fails with the child's reason (load error, init refusal).
    pub fn start(command: HostCommand) -> Result<Self, String> {
        let (running, info) = spawn(&command)?;
        Ok(Self { command, info, state: Mutex::new(State::Running(running)) })
    }

    /// What the plugin declared.
    pub fn info(&self) -> &PluginInfo {
        &self.info
    }

    /// Calls one operation in the child, under `timeout`.
    pub async fn call(&self, operation: Operation, input: &[u8], timeout: Duration) -> Result<Vec<u8>, CallError> {
        let mut stream = self.checkout()?;
        // A blocking exchange on this thread: the kernel wakes it as soon as the child answers,
        // which is faster than a round through the reactor. `block_in_place` lets the runtime
        // move its other tasks off this thread meanwhile.
        let exchanged = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| exchange(&mut stream, operation, input, timeout))
            }
            _ => exchange(&mut stream, operation, input, timeout),
        };
        match exchanged {
            Ok((status, output)) => {
                self.checkin(stream);
                super::loader::interpret(status, output, operation)
            }
            // The rest of the answer is left unread on this connection: it is dropped, not
            // reused; the child keeps serving on its others.
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => Err(CallError::BadAnswer {
                reason: format!("the answer is larger than {} bytes", super::loader::MAX_ANSWER_BYTES),
            }),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                tracing::warn!(plugin = %self.command.name, "plugin process did not answer in time; killing it");
                self.mark_dead();
                Err(CallError::Timeout(timeout))
            }
            Err(e) => {
                tracing::warn!(plugin = %self.command.name, error = %e, "plugin process died during a call");
                self.mark_dead();
                Err(CallError::Unavailable)
            }
        }
    }

    /// An idle connection to a live child, restarting a dead child once its backoff passed.
    fn checkout(&self) -> Result<std::os::unix::net::UnixStream, CallError> {
        let socket = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let State::Dead { since, restarts } = *state {
                if since.elapsed() < backoff(restarts) {
                    return Err(CallError::Unavailable);
                }
                match spawn(&self.command) {
                    Ok((running, _)) => {
                        tracing::info!(plugin = %self.command.name, restarts = restarts + 1, "plugin process restarted");
                        *state = State::Running(running);
                    }
                    Err(e) => {
                        tracing::warn!(plugin = %self.command.name, error = %e, "plugin process restart failed");
                        *state = State::Dead { since: Instant::now(), restarts: restarts + 1 };
                        return Err(CallError::Unavailable);
                    }
                }
            }
            match &mut *state {
                State::Running(running) => match running.idle.pop() {
                    Some(stream) => return Ok(stream),
                    None => running.socket.clone(),
                },
                State::Dead { .. } => return Err(CallError::Unavailable),
            }
        };
        std::os::unix::net::UnixStream::connect(&socket).map_err(|_| {
            self.mark_dead();
            CallError::Unavailable
        })
    }

    fn checkin(&self, stream: std::os::unix::net::UnixStream) {
        if let State::Running(running) = &mut *self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            running.idle.push(stream);
        }
    }

    fn mark_dead(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let restarts = match &mut *state {
            State::Running(running) => {
                let _ = running.child.kill();
                let _ = running.child.wait();
                let _ = std::fs::remove_file(&running.socket);
                0
            }
            State::Dead { restarts, .. } => *restarts + 1,
        };
        *state = State::Dead { since: Instant::now(), restarts };
    }
}

impl Drop for ProcessPlugin {
    fn drop(&mut self) {
        if let State::Running(running) = &mut *self.state.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = running.child.kill();
            let _ = running.child.wait();
            let _ = std::fs::remove_file(&running.socket);
        }
    }
}

fn exchange(
    stream: &mut std::os::unix::net::UnixStream,
    operation: Operation,
    input: &[u8],
    timeout: Duration,
) -> std::io::Result<(i32, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut frame = Vec::with_capacity(8 + input.len());
    frame.extend_from_slice(&((input.len() + 4) as u32).to_le_bytes());
    frame.extend_from_slice(&(operation as u32).to_le_bytes());
    frame.extend_from_slice(input);
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&frame)?;
    // Most answers arrive in one read; read more only when the frame says so.
    let mut buffer = vec![0u8; 8 * 1024];
    let mut filled = 0;
    let mut total = 8;
    while filled < total {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        // Until the header is in, any bytes belong to this one outstanding answer.
        let end = if total == 8 { buffer.len() } else { total };
        let n = stream.read(&mut buffer[filled..end])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
        if total == 8 && filled >= 8 {
            let length = u32::from_le_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
            if !(4..=MAX_FRAME).contains(&length) {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad frame length"));
            }
            if length > super::loader::MAX_ANSWER_BYTES + 4 {
                return Err(std::io::Error::new(std::io::ErrorKind::FileTooLarge, "answer too large"));
            }
            total = 4 + length;
            if buffer.len() < total {
                buffer.resize(total, 0);
            }
        }
    }
    let status = i32::from_le_bytes([buffer[4], buffer[5], buffer[6], buffer[7]]);
    buffer.truncate(total);
    Ok((status, buffer.split_off(8)))
}

/// The child's side: serves one instance on a bound socket, one thread per connection, until
/// killed or until its standard input closes (the gateway is gone).
pub fn serve_host(instance: Instance, listener: std::os::unix::net::UnixListener) -> std::io::Result<()> {
    std::thread::spawn(|| {
        let mut rest = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut rest);
        std::process::exit(0);
    });
    let instance = std::sync::Arc::new(instance);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let instance = std::sync::Arc::clone(&instance);
        std::thread::spawn(move || serve_connection(&instance, stream));
    }
    Ok(())
}

fn serve_connection(instance: &Instance, stream: std::os::unix::net::UnixStream) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut stream = BufReader::with_capacity(64 * 1024, stream);
    loop {
        let mut header = [0u8; 8];
        if stream.read_exact(&mut header).is_err() {
            return;
        }
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let op = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if !(4..=MAX_FRAME).contains(&length) {
            return;
        }
        let mut input = vec![0; length - 4];
        if stream.read_exact(&mut input).is_err() {
            return;
        }
        let (status, output) = match Operation::from_u32(op) {
            Some(operation) => instance.call_raw(operation, &input),
            None => (cardgate_sdk::abi::STATUS_UNKNOWN_OPERATION, Vec::new()),
        };
        let mut answer = Vec::with_capacity(8 + output.len());
        answer.extend_from_slice(&((output.len() + 4) as u32).to_le_bytes());
        answer.extend_from_slice(&status.to_le_bytes());
        answer.extend_from_slice(&output);
        if writer.write_all(&answer).is_err() {
            return;
        }
    }
}
