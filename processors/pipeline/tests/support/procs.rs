//! The pipeline's processor binaries as child processes that can be SIGKILLed and started
//! again on the same config and state directory (same instance id, so a restart fences the
//! dead one's transaction at once).
//!
//! Each process's stderr is appended to `DIR/NAME.log` (every incarnation, marked), and the
//! runtime's `NAME ready` line (state restored, in the group) is signalled.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// One processor: its binary, config and state, and the running incarnation if any.
pub struct Processor {
    pub name: String,
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    ready: Option<mpsc::Receiver<()>>,
    /// Flags after the standard ones (e.g. `--replay-from`).
    extra: Vec<String>,
    /// Incarnations started so far.
    pub starts: usize,
}

impl Processor {
    /// Writes `DIR/NAME.toml` (`name`, `broker`, then `toml`); not started yet.
    pub fn new(bin: &str, dir: &Path, name: &str, broker: &str, toml: &str) -> Processor {
        std::fs::write(
            dir.join(format!("{name}.toml")),
            format!("name = \"{name}\"\nbroker = \"{broker}\"\n{toml}"),
        )
        .unwrap();
        Processor {
            name: name.to_owned(),
            bin: PathBuf::from(bin),
            dir: dir.to_owned(),
            child: None,
            ready: None,
            extra: Vec::new(),
            starts: 0,
        }
    }

    /// Passes `args` to every incarnation after the standard flags.
    pub fn with_args(mut self, args: &[&str]) -> Processor {
        self.extra = args.iter().map(|a| (*a).to_owned()).collect();
        self
    }

    /// Starts an incarnation (the previous one must be dead).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.name)))
            .unwrap();
        writeln!(log, "==== start {}", self.starts).unwrap();
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SPOOL_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .arg("--config")
            .arg(self.dir.join(format!("{}.toml", self.name)))
            .arg("--state-dir")
            .arg(self.dir.join(format!("{}-state", self.name)))
            .args(["--metrics-listen", "off", "--instance-id", "k9"])
            .args(&self.extra)
            .env("SPOOL_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", self.bin.display()));
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(log, "{line}");
                if line.ends_with(" ready") {
                    let _ = tx.send(());
                }
            }
        });
        self.child = Some(child);
        self.ready = Some(rx);
    }

    /// Waits for the running incarnation's `ready` line.
    pub fn wait_ready(&mut self, timeout: Duration) -> bool {
        self.ready
            .as_ref()
            .is_some_and(|r| r.recv_timeout(timeout).is_ok())
    }

    /// SIGKILL (no-op when not running); returns whether it was still running (had not
    /// exited by itself).
    pub fn kill(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let alive = matches!(c.try_wait(), Ok(None));
        let _ = c.kill();
        let _ = c.wait();
        alive
    }

    /// SIGTERM (a clean stop: `systemctl stop`, Ctrl-C); [`Processor::exited`] tells when it
    /// is done.
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            let status = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status()
                .unwrap();
            assert!(status.success(), "kill -TERM {}", c.id());
        }
    }

    /// The exit status once the current incarnation has exited (it is then forgotten).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// The current incarnation's log so far (since its `==== start N` line).
    pub fn log_since_start(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join(format!("{}.log", self.name)))
            .unwrap_or_default();
        let mark = format!("==== start {}\n", self.starts);
        log.rfind(&mark)
            .map_or(log.clone(), |i| log[i + mark.len()..].to_owned())
    }

    /// Whether the current incarnation is running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Processor {
    fn drop(&mut self) {
        self.kill();
    }
}
