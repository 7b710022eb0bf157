//! Helpers for testing plugins: build a plugin crate's `cdylib` from a test, so the test can
//! load exactly what the gateway would.
//!
//! Builds go to `<workspace target>/plugin-builds/<flavour>` rather than the target directory
//! the tests themselves run from: `cargo test` holds that directory's lock while tests run, so
//! a nested build there would wait forever.

use std::path::{Path, PathBuf};
use std::process::Command;

/// How to build a plugin library.
#[derive(Debug, Clone, Default)]
pub struct Build {
    /// The cargo package to build.
    pub package: String,
    /// Build with `--release`.
    pub release: bool,
    /// Extra `rustc` flags for the plugin crate itself (through `cargo rustc`), for example
    /// `["-C", "panic=abort"]`.
    pub rustc_args: Vec<String>,
    /// Sub-directory of `plugin-builds` to build in; builds with different flags must not
    /// share one. Default: `"default"`.
    pub flavour: Option<String>,
    /// Directory inside the workspace to run cargo from. Default: the current directory.
    pub workspace: Option<PathBuf>,
}

impl Build {
    /// A debug build of `package`.
    pub fn new(package: &str) -> Self {
        Self { package: package.to_owned(), ..Self::default() }
    }

    /// Builds and returns the path of the produced shared library.
    pub fn run(&self) -> Result<PathBuf, String> {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = target_directory(&cargo, self.workspace.as_deref())?
            .join("plugin-builds")
            .join(self.flavour.as_deref().unwrap_or("default"));
        let mut command = Command::new(&cargo);
        if let Some(dir) = &self.workspace {
            command.current_dir(dir);
        }
        command.arg(if self.rustc_args.is_empty() { "build" } else { "rustc" });
        command.args(["--quiet", "--lib", "--message-format=json-render-diagnostics", "-p", &self.package]);
        command.arg("--target-dir").arg(&target_dir);
        if self.release {
            command.arg("--release");
        }
        if !self.rustc_args.is_empty() {
            command.arg("--").args(&self.rustc_args);
        }
        let output = command.output().map_err(|e| format!("cannot run cargo: {e}"))?;
        if !output.status.success() {
            return Err(format!("building `{}` failed:\n{}", self.package, String::from_utf8_lossy(&output.stderr)));
        }
        cdylib_artifact(&String::from_utf8_lossy(&output.stdout), &self.package)
            .ok_or_else(|| format!("cargo built `{}` but reported no cdylib", self.package))
    }
}

/// A debug build of `package`; panics with cargo's output if the build fails.
pub fn build_cdylib(package: &str) -> PathBuf {
    Build::new(package).run().unwrap_or_else(|e| panic!("{e}"))
}

fn target_directory(cargo: &std::ffi::OsStr, workspace: Option<&Path>) -> Result<PathBuf, String> {
    let mut command = Command::new(cargo);
    if let Some(dir) = workspace {
        command.current_dir(dir);
    }
    let output = command
        .args(["metadata", "--format-version=1", "--no-deps", "--offline"])
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("cargo metadata: {e}"))?;
    metadata["target_directory"].as_str().map(PathBuf::from).ok_or_else(|| "cargo metadata: no target_directory".into())
}

/// Finds the shared library of `package` among cargo's JSON messages.
fn cdylib_artifact(messages: &str, package: &str) -> Option<PathBuf> {
    let lib_name = package.replace('-', "_");
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| {
            m["reason"] == "compiler-artifact"
                && (m["target"]["name"] == lib_name.as_str() || m["target"]["name"] == package)
        })
        .filter(|m| m["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib")))
        .flat_map(|m| m["filenames"].as_array().cloned().unwrap_or_default())
        .filter_map(|f| f.as_str().map(PathBuf::from))
        .find(|f| is_shared_library(f))
}

fn is_shared_library(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("so" | "dylib" | "dll"))
}
