//! Runs the real `spoold` binary for a test: temp data dir, ephemeral port on 127.0.0.1, killed
//! (SIGKILL) when the guard drops. Built on the workspace's one launcher,
//! `spool_loadgen::broker` ([`Launch`], re-exported here for tests that need more control,
//! e.g. a wrapper such as `strace`).
//!
//! The binary is `$SPOOLD` or `$CARGO_BIN_EXE_spoold` if set, else `spoold` next to the test's
//! own target directory (`target/<profile>/spoold`, found from this executable's path, so
//! custom target dirs and profiles work). Cargo does not build another package's binaries for a
//! test, so it must be built first: `cargo build -p spool-broker --bin spoold` (`cargo test
//! --workspace` does it too, for the broker's own integration tests). A binary older than any
//! source file it was built from (per cargo's dep-info `spoold.d`) is refused rather than
//! silently tested.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use spool_client::Client;
pub use spool_loadgen::broker::{Launch, Spoold};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running broker; killed on drop.
#[derive(Debug)]
pub struct Broker {
    process: Option<Spoold>,
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
        let process = launch(dir.path(), "127.0.0.1:0", &[])
            .start()
            .unwrap_or_else(|e| panic!("{e:#}"));
        let addr = parse_addr(&process.addr);
        Broker {
            process: Some(process),
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
        if let Some(mut p) = self.process.take() {
            p.kill();
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
        self.process.as_mut().is_some_and(Spoold::is_running)
    }

    /// Starts the broker again on the same data dir and port.
    pub fn restart(&mut self) {
        self.kill();
        let listen = self.addr.to_string();
        // The port was just released; retry briefly in case the kernel is slow to free it.
        let mut last = None;
        for _ in 0..20 {
            match launch(self.dir.path(), &listen, &self.env).start() {
                Ok(p) => {
                    assert_eq!(parse_addr(&p.addr), self.addr);
                    self.process = Some(p);
                    return;
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        panic!("restarting spoold on {listen}: {:#}", last.expect("tried"));
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The launch of a test broker in `dir` (data in `dir/data`, `dir/spoold.toml` if present):
/// metrics off, 2 runtime threads, `SPOOL_LOG` from `SPOOL_TEST_BROKER_LOG` (default `warn`;
/// when set, the broker's stderr is echoed).
pub fn launch(dir: &Path, listen: &str, env: &[(String, String)]) -> Launch {
    let log = std::env::var("SPOOL_TEST_BROKER_LOG").ok();
    let mut l = Launch::new(spoold(), dir.join("data"))
        .listen(listen)
        .runtime_threads(2)
        .log(log.clone().unwrap_or_else(|| "warn".into()))
        .echo_stderr(log.is_some())
        .ready_timeout(START_TIMEOUT);
    let config = dir.join("spoold.toml");
    if config.exists() {
        l = l.config(config);
    }
    for (k, v) in env {
        l = l.env(k, v);
    }
    l
}

fn parse_addr(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("spoold printed a bad address {addr:?}: {e}"))
}

/// Path of the `spoold` binary (see the module docs), looked up once per test process.
pub fn spoold() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| spool_loadgen::broker::find_spoold().unwrap_or_else(|e| panic!("{e:#}")))
        .clone()
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
