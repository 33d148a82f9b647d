//! Runs the real `spoold` binary for a test: temp data dir, ephemeral port on 127.0.0.1, killed
//! (SIGKILL) when the guard drops.
//!
//! The binary is `$CARGO_BIN_EXE_spoold` if set, else `spoold` next to the test's own target
//! directory (`target/<profile>/spoold`, found from this executable's path, so custom target
//! dirs and profiles work). Cargo does not build another package's binaries for a test, so it
//! must be built first: `cargo build -p spool-broker --bin spoold` (`.ci/run` does). A binary
//! older than the broker, engine or proto sources is refused rather than silently tested.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, SystemTime};

use spool_client::Client;

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running broker; killed on drop.
pub(crate) struct Broker {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a broker on a fresh data dir and an ephemeral port.
    pub(crate) fn start() -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let (child, addr) = spawn(dir.path(), "127.0.0.1:0");
        Broker {
            child: Some(child),
            addr,
            dir,
        }
    }

    /// `host:port` of the broker.
    pub(crate) fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// A client connected to the broker.
    pub(crate) async fn client(&self) -> Client {
        Client::connect(self.addr())
            .await
            .expect("connect to spoold")
    }

    /// SIGKILLs the broker (nothing is flushed beyond what was acknowledged).
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same data dir and port.
    pub(crate) fn restart(&mut self) {
        self.kill();
        let listen = self.addr.to_string();
        // The port was just released; retry briefly in case the kernel is slow to free it.
        let mut last = None;
        for _ in 0..20 {
            match try_spawn(self.dir.path(), &listen) {
                Ok((child, addr)) => {
                    assert_eq!(addr, self.addr);
                    self.child = Some(child);
                    return;
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        panic!(
            "restarting spoold on {listen}: {}",
            last.unwrap_or_default()
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(dir: &Path, listen: &str) -> (Child, SocketAddr) {
    try_spawn(dir, listen).unwrap_or_else(|e| panic!("{e}"))
}

fn try_spawn(dir: &Path, listen: &str) -> Result<(Child, SocketAddr), String> {
    let bin = spoold();
    let mut cmd = Command::new(&bin);
    cmd.arg("--data-dir")
        .arg(dir)
        .arg("--listen")
        .arg(listen)
        .args(["--metrics-listen", "off"])
        .arg("--runtime-threads")
        .arg("2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // The broker reads SPOOL_* overrides from its environment: keep the caller's out.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SPOOL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env(
        "SPOOL_LOG",
        std::env::var("SPOOL_TEST_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
    );
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    let echo = std::env::var_os("SPOOL_TEST_BROKER_LOG").is_some();
    // Reads the ready line, then keeps draining stderr so the broker never blocks on it.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("[spoold] {line}");
            }
            if let Some(rest) = line.strip_prefix("spoold listening on ")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(Ok(rest.trim().to_owned()));
            } else if let Some(t) = &tx {
                let _ = t.send(Err(line));
            }
        }
    });
    let deadline = std::time::Instant::now() + START_TIMEOUT;
    let mut output = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(addr)) => {
                let addr = addr
                    .parse()
                    .map_err(|e| format!("bad address {addr:?}: {e}"))?;
                return Ok((child, addr));
            }
            Ok(Err(line)) => output.push(line),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                return Err(format!(
                    "spoold did not become ready (exit: {status:?}); its output:\n{}",
                    output.join("\n")
                ));
            }
        }
    }
}

/// Path of the `spoold` binary (see the module docs), looked up once per test process.
fn spoold() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(find_spoold).clone()
}

fn find_spoold() -> PathBuf {
    if let Some(p) = std::env::var_os("CARGO_BIN_EXE_spoold") {
        return PathBuf::from(p);
    }
    // <target>/<profile>/deps/it-<hash> → <target>/<profile>/spoold
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary inside target/<profile>/deps");
    let bin = profile_dir.join("spoold");
    let Ok(meta) = std::fs::metadata(&bin) else {
        panic!(
            "{} not found: build the broker first with `cargo build -p spool-broker --bin spoold` \
             (or set CARGO_BIN_EXE_spoold)",
            bin.display()
        );
    };
    let built = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for src in ["broker", "log-engine/src", "proto"] {
        if let Some((newest, path)) = newest_file(&workspace.join(src))
            && newest > built
        {
            panic!(
                "{} is older than {}: rebuild it with `cargo build -p spool-broker --bin spoold` \
                 (or set CARGO_BIN_EXE_spoold)",
                bin.display(),
                path.display()
            );
        }
    }
    bin
}

fn newest_file(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        let found = if ft.is_dir() {
            if path.file_name().is_some_and(|n| n == "tests") {
                continue; // broker tests do not go into the binary
            }
            newest_file(&path)
        } else if path
            .extension()
            .is_some_and(|e| e == "rs" || e == "proto" || e == "toml")
        {
            entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .map(|t| (t, path))
        } else {
            None
        };
        if let Some(f) = found
            && newest.as_ref().is_none_or(|n| f.0 > n.0)
        {
            newest = Some(f);
        }
    }
    newest
}
