//! Runs the real `spoold` binary for a test: temp data dir, ephemeral port on 127.0.0.1, killed
//! (SIGKILL) when the guard drops.
//!
//! The binary is `$CARGO_BIN_EXE_spoold` if set, else `spoold` next to the test's own target
//! directory (`target/<profile>/spoold`, found from this executable's path, so custom target
//! dirs and profiles work). Cargo does not build another package's binaries for a test, so it
//! must be built first: `cargo build -p spool-broker --bin spoold` (`cargo test --workspace`
//! does it too, for the broker's own integration tests). A binary older than any source file it
//! was built from (per cargo's dep-info `spoold.d`) is refused rather than silently tested.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, SystemTime};

use spool_client::Client;

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running broker; killed on drop.
#[derive(Debug)]
pub struct Broker {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    /// Extra environment for the next (re)start (e.g. `SPOOL_FAILPOINTS`).
    env: Vec<(String, String)>,
}

impl Broker {
    /// Starts a broker on a fresh data dir and an ephemeral port.
    pub fn start() -> Broker {
        Broker::start_with_config(|_| None)
    }

    /// Starts a broker whose TOML config `config` writes, given the temp dir (for files it
    /// refers to); `None` runs without a config file.
    pub fn start_with_config(config: impl FnOnce(&Path) -> Option<String>) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(toml) = config(dir.path()) {
            std::fs::write(dir.path().join("spoold.toml"), toml).expect("writing spoold.toml");
        }
        let (child, addr) = spawn(dir.path(), "127.0.0.1:0");
        Broker {
            child: Some(child),
            addr,
            dir,
            env: Vec::new(),
        }
    }

    /// The TCP port the broker listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `host:port` of the broker.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The broker's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A client connected to the broker.
    pub async fn client(&self) -> Client {
        Client::connect(self.addr())
            .await
            .expect("connect to spoold")
    }

    /// SIGKILLs the broker (nothing is flushed beyond what was acknowledged).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sets (or with `None`, removes) an environment variable of the broker from its next
    /// (re)start on, e.g. `SPOOL_FAILPOINTS` to arm a crash point.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_owned(), v.to_owned()));
        }
    }

    /// True while the broker process runs (false once it exited, e.g. at a failpoint).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts the broker again on the same data dir and port.
    pub fn restart(&mut self) {
        self.kill();
        let listen = self.addr.to_string();
        // The port was just released; retry briefly in case the kernel is slow to free it.
        let mut last = None;
        for _ in 0..20 {
            match try_spawn(self.dir.path(), &listen, &self.env) {
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
    try_spawn(dir, listen, &[]).unwrap_or_else(|e| panic!("{e}"))
}

fn try_spawn(
    dir: &Path,
    listen: &str,
    env: &[(String, String)],
) -> Result<(Child, SocketAddr), String> {
    let bin = spoold();
    let mut cmd = Command::new(&bin);
    let config = dir.join("spoold.toml");
    if config.exists() {
        cmd.arg("--config").arg(config);
    }
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
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
    for (k, v) in env {
        cmd.env(k, v);
    }
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

/// The broker's hash of a token (`spoold --hash-token`), for `[[auth.tokens]]`.
pub fn hash_token(token: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(spoold())
        .arg("--hash-token")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spoold --hash-token");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{token}").expect("writing the token");
    drop(stdin);
    let out = child.wait_with_output().expect("spoold --hash-token");
    assert!(out.status.success(), "spoold --hash-token failed");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// Runs the real `spoold gen-dev-certs --dir DIR --name …` (a development CA, a server
/// certificate for `names` and a client certificate); returns its stdout (the usage text).
pub fn gen_dev_certs(dir: &Path, names: &[&str]) -> String {
    let mut cmd = Command::new(spoold());
    cmd.arg("gen-dev-certs").arg("--dir").arg(dir);
    for n in names {
        cmd.args(["--name", n]);
    }
    let out = cmd.output().expect("spoold gen-dev-certs");
    assert!(
        out.status.success(),
        "spoold gen-dev-certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
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
    // Cargo's dep-info next to the binary lists every source file it was built from.
    let built = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let deps = std::fs::read_to_string(profile_dir.join("spoold.d")).unwrap_or_default();
    for src in dep_info_files(&deps) {
        let changed = std::fs::metadata(&src).and_then(|m| m.modified());
        if changed.is_ok_and(|t| t > built) {
            panic!(
                "{} is older than {}: rebuild it with `cargo build -p spool-broker --bin spoold` \
                 (or set CARGO_BIN_EXE_spoold)",
                bin.display(),
                src.display()
            );
        }
    }
    bin
}

/// The prerequisites of a Makefile-style dep-info file (`target: dep dep…`, spaces in paths
/// escaped with a backslash).
fn dep_info_files(deps: &str) -> Vec<PathBuf> {
    let Some(line) = deps.lines().next() else {
        return Vec::new();
    };
    let Some((_, prereqs)) = line.split_once(": ") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = prereqs.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ' ' => {
                if !cur.is_empty() {
                    out.push(PathBuf::from(std::mem::take(&mut cur)));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(PathBuf::from(cur));
    }
    out
}
