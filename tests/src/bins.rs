//! The workspace's binaries (`outboxd`, `outbox`, `outbox-relay`), built once per test process so a test never runs a stale one.
//!
//! `CARGO_BIN_EXE_*` only reaches binaries of the package under test, and
//! these belong to `outbox-daemon` and `outbox-relay`. So the first call to
//! [`bin`] in a test process runs
//! `$CARGO build -p outbox-daemon [-p outbox-relay] --bins` in the workspace
//! root (the relay only when `relay/` exists) and takes each binary's path
//! from cargo's own artifact messages, which agree with every way of moving
//! the target dir (`CARGO_TARGET_DIR`, `--target-dir` in a config file). A
//! failed build fails every test that needs a binary, with cargo's output.
//!
//! This nests a cargo inside `cargo test` / `cargo nextest run`. Neither
//! holds the build-directory lock while test binaries run (cargo 1.95
//! releases it once compilation is over; nextest builds with a separate
//! `cargo test --no-run` first), so the nested build does not wait on its
//! parent: checked with both, with the nested build really compiling.
//! Under nextest every test is a process of its own and runs the (then
//! no-op, ~0.7 s) build once; the builds of concurrent tests queue on
//! cargo's lock. The variables cargo sets for a running test are removed
//! from the nested cargo's environment, or the two would rebuild each
//! other's dependencies on every run (see `vars_cargo_sets_for_tests`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The package of `outboxd` and `outbox`.
pub const DAEMON_PACKAGE: &str = "outbox-daemon";
/// The package of `outbox-relay`, built when its directory exists.
pub const RELAY_PACKAGE: &str = "outbox-relay";

/// The workspace root: the parent of this package's directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package sits in the workspace root")
}

/// `$CARGO_TARGET_DIR` (a relative one taken from the workspace root), or
/// `<workspace root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace_root().join(dir),
        _ => workspace_root().join("target"),
    }
}

/// Path of the workspace binary `name` (`"outboxd"`, `"outbox"`,
/// `"outbox-relay"`), fresh from a build made once per test process.
/// Panics with cargo's output when the build fails, and when the binary
/// does not exist.
pub fn bin(name: &str) -> PathBuf {
    let built = match built() {
        Ok(built) => built,
        Err(output) => panic!("building the workspace binaries failed:\n{output}"),
    };
    let path = built
        .get(name)
        .cloned()
        .unwrap_or_else(|| target_dir().join("debug").join(name));
    assert!(
        path.is_file(),
        "binary {name} not found at {} (built: {:?})",
        path.display(),
        built.keys().collect::<Vec<_>>()
    );
    path
}

/// The build, once: the executables cargo reported, by name, or cargo's
/// output when it failed.
fn built() -> &'static Result<HashMap<String, PathBuf>, String> {
    static BUILT: OnceLock<Result<HashMap<String, PathBuf>, String>> = OnceLock::new();
    BUILT.get_or_init(build)
}

fn build() -> Result<HashMap<String, PathBuf>, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = workspace_root();
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args(["build", "--bins", "--color", "never"])
        .args(["--message-format", "json-render-diagnostics"])
        .args(["-p", DAEMON_PACKAGE]);
    if root.join("relay").join("Cargo.toml").is_file() {
        cmd.args(["-p", RELAY_PACKAGE]);
    }
    for key in vars_cargo_sets_for_tests() {
        cmd.env_remove(key);
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        // Resolve a relative target dir the way `target_dir` does, whatever
        // the directory the outer cargo was started from.
        cmd.env("CARGO_TARGET_DIR", root.join(dir));
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("could not run {}: {e}", Path::new(&cargo).display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "{} build exited with {}:\n{stderr}",
            Path::new(&cargo).display(),
            out.status
        ));
    }
    let mut found = HashMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_bin = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bin"));
        if let (true, Some(name), Some(exe)) = (
            msg["reason"] == "compiler-artifact" && is_bin,
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) {
            found.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    Ok(found)
}

/// The variables cargo and nextest set for a running test (its package's
/// `CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...). They must not reach the
/// nested cargo: build scripts that watch one of them (ring's watches
/// `CARGO_MANIFEST_DIR`) would record this package's value, and the next
/// plain `cargo test` would see it change and rebuild ring, rustls and
/// everything above them, each run, on both sides.
fn vars_cargo_sets_for_tests() -> Vec<std::ffi::OsString> {
    const EXACT: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
    ];
    const PREFIXES: &[&str] = &["CARGO_PKG_", "CARGO_BIN_EXE_", "NEXTEST", "__NEXTEST"];
    std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            let k = k.to_string_lossy();
            EXACT.contains(&k.as_ref()) || PREFIXES.iter().any(|p| k.starts_with(p))
        })
        .collect()
}
