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

/// A `spoold` on a temp dir and an ephemeral loopback port; killed on drop.
#[derive(Debug)]
pub struct Spoold {
    child: std::process::Child,
    /// `host:port` it listens on.
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Spoold {
    /// Starts `bin` with the TOML configuration `config` (may be empty) and waits for its
    /// ready line.
    pub fn start(bin: &Path, config: &str) -> Result<Spoold> {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("spoold.toml"), config)?;
        let mut child = Command::new(bin)
            .arg("--config")
            .arg(dir.path().join("spoold.toml"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting spoold")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr)
                .lines()
                .map_while(std::io::Result::ok)
            {
                if let Some(a) = line.strip_prefix("spoold listening on ") {
                    let _ = tx.send(a.trim().to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .context("spoold did not start")?;
        Ok(Spoold {
            child,
            addr,
            _dir: dir,
        })
    }
}

impl Drop for Spoold {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
