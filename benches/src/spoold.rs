//! Building the `spoold` a broker bench runs: cargo builds no other package's binaries for a
//! bench, so the benches that need one build it themselves, in their own profile.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// The workspace root (this package is `<root>/benches`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_owned()
}

/// Builds `spoold` in the calling binary's profile (release under `cargo bench`) and returns
/// its path, read from cargo's JSON messages so a custom target directory works.
pub fn build() -> Result<PathBuf> {
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args([
        "build",
        "-p",
        "spool-broker",
        "--bin",
        "spoold",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    eprintln!(
        "building spoold ({}) ...",
        if release { "release" } else { "dev" }
    );
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("cargo build -p spool-broker --bin spoold failed");
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "spoold"
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo build reported no spoold executable")
}
