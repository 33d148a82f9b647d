//! Runs a real `spoold` process: a data dir, an ephemeral port on 127.0.0.1, stopped on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// A running broker; SIGKILLed on drop unless stopped.
#[derive(Debug)]
pub struct Spoold {
    child: Option<Child>,
    /// `host:port` it listens on.
    pub addr: String,
    /// Time from spawn to the "listening" line.
    pub ready_after: Duration,
}

impl Spoold {
    /// Starts `bin` on `data_dir`, listening on `listen` (e.g. `127.0.0.1:0`), with
    /// `runtime_threads` tokio workers (0: the broker's default, one per core).
    pub fn start(
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        runtime_threads: usize,
    ) -> Result<Spoold> {
        let t0 = Instant::now();
        let mut cmd = Command::new(bin);
        cmd.arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen)
            .args(["--metrics-listen", "off"]);
        if runtime_threads > 0 {
            cmd.arg("--runtime-threads")
                .arg(runtime_threads.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SPOOL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("SPOOL_LOG", "warn");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("spoold listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(rest.trim().to_owned());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => Ok(Spoold {
                child: Some(child),
                addr,
                ready_after: t0.elapsed(),
            }),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                bail!("spoold did not become ready (exit: {status:?})")
            }
        }
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Graceful stop: SIGTERM, then wait (SIGKILL after `timeout`).
    pub fn stop(&mut self, timeout: Duration) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(anyhow!("spoold did not stop within {timeout:?}; killed"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Spoold {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `spoold` binary: `$SPOOLD` if set, else `spoold` in the directory of the running
/// executable or its parent (`target/<profile>/` for binaries and `deps/` tests).
pub fn find_spoold() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SPOOLD") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let bin = d.join("spoold");
        if bin.exists() {
            return Ok(bin);
        }
        dir = d.parent();
    }
    bail!(
        "spoold not found next to {}: build it (`cargo build --release -p spool-broker`) or set SPOOLD",
        exe.display()
    )
}
