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
    build_bin("spool-broker", "spoold")
}

/// Builds binary `bin` of package `package` as [`build`] does `spoold`.
pub fn build_bin(package: &str, bin: &str) -> Result<PathBuf> {
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root()).args([
        "build",
        "-p",
        package,
        "--bin",
        bin,
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    eprintln!(
        "building {bin} ({}) ...",
        if release { "release" } else { "dev" }
    );
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("cargo build -p {package} --bin {bin} failed");
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == bin
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo build reported no {bin} executable")
}

/// A `spoold` on a temp dir and an ephemeral loopback port; killed on drop. Started by the
/// workspace's one launcher, `spool_loadgen::broker`.
#[derive(Debug)]
pub struct Spoold {
    _process: spool_loadgen::broker::Spoold,
    /// `host:port` it listens on.
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Spoold {
    /// Starts `bin` with the TOML configuration `config` (may be empty) and waits for its
    /// ready line.
    pub fn start(bin: &Path, config: &str) -> Result<Spoold> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("spoold.toml");
        std::fs::write(&file, config)?;
        let process = spool_loadgen::broker::Launch::new(bin, dir.path().join("data"))
            .config(file)
            .ready_timeout(std::time::Duration::from_secs(30))
            .start()
            .context("starting spoold")?;
        Ok(Spoold {
            addr: process.addr.clone(),
            _process: process,
            _dir: dir,
        })
    }
}
