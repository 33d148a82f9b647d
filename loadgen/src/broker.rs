//! Runs a real `spoold` process: the one launcher of the workspace. The load generator's
//! scenarios start brokers with it, and so do the test kit (`spool-testkit`, for the
//! integration tests of every crate), the broker's own integration tests and the benchmarks.
//! It lives here, in a library that ships, because the scenarios need it outside tests; the
//! test conveniences (temp dirs, panicking helpers, clients) are the test kit's.
//!
//! [`Launch`] says how to start one (data dir, listeners, config file, flags, environment,
//! an optional wrapper such as `strace`); [`Spoold`] is the running process: its address, its
//! stderr lines, graceful stop (SIGTERM), kill (SIGKILL), killed when dropped. The caller's
//! `SPOOL_*` environment never leaks into the broker: only what the launch sets is seen.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};

/// Lines of the broker's stderr kept for [`Spoold::stderr`] (the oldest are dropped).
const STDERR_LINES: usize = 10_000;

/// How to start a broker. Built with [`Launch::new`] and the setters, started with
/// [`Launch::start`]; reusable (a restart is the same launch again).
#[derive(Clone, Debug)]
pub struct Launch {
    bin: PathBuf,
    data_dir: PathBuf,
    listen: String,
    metrics_listen: Option<String>,
    runtime_threads: usize,
    config: Option<PathBuf>,
    args: Vec<OsString>,
    /// Variables set (`Some`) or removed (`None`) in the broker's environment.
    env: Vec<(OsString, Option<OsString>)>,
    log: String,
    wrapper: Vec<OsString>,
    echo: bool,
    ready_timeout: Duration,
}

impl Launch {
    /// `bin` on `data_dir`, listening on an ephemeral port of 127.0.0.1, metrics off, the
    /// broker's default runtime threads, `SPOOL_LOG=warn`.
    pub fn new(bin: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Launch {
        Launch {
            bin: bin.into(),
            data_dir: data_dir.into(),
            listen: "127.0.0.1:0".into(),
            metrics_listen: Some("off".into()),
            runtime_threads: 0,
            config: None,
            args: Vec::new(),
            env: Vec::new(),
            log: "warn".into(),
            wrapper: Vec::new(),
            echo: false,
            ready_timeout: Duration::from_secs(60),
        }
    }

    /// The gRPC listen address (`--listen`).
    pub fn listen(mut self, addr: impl Into<String>) -> Launch {
        self.listen = addr.into();
        self
    }

    /// Serve metrics on `addr` (`--metrics-listen`; e.g. `127.0.0.1:0`); off by default.
    pub fn metrics(mut self, addr: impl Into<String>) -> Launch {
        self.metrics_listen = Some(addr.into());
        self
    }

    /// Pass no `--metrics-listen` at all: the configuration file, the environment or the
    /// broker's default decide.
    pub fn metrics_unset(mut self) -> Launch {
        self.metrics_listen = None;
        self
    }

    /// Tokio worker threads (`--runtime-threads`); 0 keeps the broker's default.
    pub fn runtime_threads(mut self, n: usize) -> Launch {
        self.runtime_threads = n;
        self
    }

    /// A TOML configuration file (`--config`).
    pub fn config(mut self, path: impl Into<PathBuf>) -> Launch {
        self.config = Some(path.into());
        self
    }

    /// Extra command-line arguments, after the launcher's own.
    pub fn args<I, S>(mut self, args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// An environment variable of the broker (`SPOOL_*` variables of the caller are not
    /// passed on; set them here).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Launch {
        let key = key.as_ref().to_owned();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, Some(value.as_ref().to_owned())));
        self
    }

    /// Removes a variable from the broker's environment (one the caller has, e.g.
    /// `NO_COLOR`, or one set with [`Launch::env`]).
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Launch {
        let key = key.as_ref().to_owned();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, None));
        self
    }

    /// `SPOOL_LOG` (default `warn`).
    pub fn log(mut self, filter: impl Into<String>) -> Launch {
        self.log = filter.into();
        self
    }

    /// Runs the broker under `program args… spoold …` (e.g. `strace -f -e inject=…`). The
    /// wrapper gets its own process group, which [`Spoold::kill`] kills whole, so a tracer
    /// never leaves its tracee running.
    pub fn wrapper<I, S>(mut self, program_and_args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.wrapper = program_and_args
            .into_iter()
            .map(|a| a.as_ref().to_owned())
            .collect();
        self
    }

    /// Copies every stderr line of the broker to this process's stderr (`[spoold] …`).
    pub fn echo_stderr(mut self, on: bool) -> Launch {
        self.echo = on;
        self
    }

    /// How long to wait for the "listening" line (default 60 s).
    pub fn ready_timeout(mut self, t: Duration) -> Launch {
        self.ready_timeout = t;
        self
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    fn command(&self) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.bin);
                c.process_group(0);
                c
            }
            None => Command::new(&self.bin),
        };
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg(&self.listen);
        if let Some(metrics) = &self.metrics_listen {
            cmd.arg("--metrics-listen").arg(metrics);
        }
        if self.runtime_threads > 0 {
            cmd.arg("--runtime-threads")
                .arg(self.runtime_threads.to_string());
        }
        cmd.args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The broker reads SPOOL_* overrides from its environment: keep the caller's out.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SPOOL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("SPOOL_LOG", &self.log);
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd
    }

    /// Starts the broker and waits until it listens. On failure the error carries what the
    /// broker printed.
    pub fn start(&self) -> Result<Spoold> {
        let t0 = Instant::now();
        let mut child = self
            .command()
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel();
        let keep = lines.clone();
        let echo = self.echo;
        // Reads the ready line, then keeps draining stderr so the broker never blocks on it.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[spoold] {line}");
                }
                let ready = line
                    .strip_prefix("spoold listening on ")
                    .map(|a| a.trim().to_owned());
                {
                    let mut l = keep.lock().unwrap_or_else(|e| e.into_inner());
                    if l.len() == STDERR_LINES {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
                // After the line is kept, so that `stderr()` has it once `start` returns.
                if let Some(addr) = ready
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
            }
        });
        let mut broker = Spoold {
            child: Some(child),
            group: !self.wrapper.is_empty(),
            addr: String::new(),
            metrics_addr: None,
            ready_after: Duration::ZERO,
            stderr: lines,
        };
        match rx.recv_timeout(self.ready_timeout) {
            Ok(addr) => {
                broker.addr = addr;
                broker.ready_after = t0.elapsed();
                broker.metrics_addr = broker
                    .stderr_lines()
                    .iter()
                    .find_map(|l| l.strip_prefix("spoold metrics on http://"))
                    .map(|l| l.trim().trim_end_matches("/metrics").to_owned());
                Ok(broker)
            }
            Err(_) => {
                broker.kill();
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                bail!(
                    "spoold did not become ready within {:?}; its output:\n{}",
                    self.ready_timeout,
                    broker.stderr()
                )
            }
        }
    }
}

/// A running broker; SIGKILLed on drop unless stopped.
#[derive(Debug)]
pub struct Spoold {
    child: Option<Child>,
    /// Started in its own process group (under a wrapper): signals go to the group.
    group: bool,
    /// `host:port` it listens on.
    pub addr: String,
    /// `host:port` of its metrics listener, when it serves metrics.
    pub metrics_addr: Option<String>,
    /// Time from spawn to the "listening" line.
    pub ready_after: Duration,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Spoold {
    /// Starts `bin` on `data_dir`, listening on `listen` (e.g. `127.0.0.1:0`), with
    /// `runtime_threads` tokio workers (0: the broker's default, one per core). Shorthand
    /// for a [`Launch`].
    pub fn start(
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        runtime_threads: usize,
    ) -> Result<Spoold> {
        Launch::new(bin, data_dir)
            .listen(listen)
            .runtime_threads(runtime_threads)
            .start()
    }

    /// The process id (of the wrapper, when there is one).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs (false once it exited, e.g. at a failpoint).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn signal(&self, sig: &str) {
        let Some(pid) = self.pid() else { return };
        if self.group {
            kill_group(pid, sig);
        } else {
            send(sig, &pid.to_string());
        }
    }

    /// Graceful stop: SIGTERM, then wait up to `timeout` (SIGKILL after it, and an error).
    /// Returns the exit status and how long the stop took.
    pub fn stop(&mut self, timeout: Duration) -> Result<(ExitStatus, Duration)> {
        if self.child.is_none() {
            bail!("spoold is not running");
        }
        let t = Instant::now();
        self.signal("TERM");
        let deadline = t + timeout;
        let child = self.child.as_mut().expect("checked above");
        loop {
            if let Some(status) = child.try_wait()? {
                let pid = child.id();
                self.child = None;
                // Under a wrapper, the broker may outlive it by a moment (and hold its data
                // directory's lock): the stop ends when the whole group has.
                if self.group && !group_gone_within(pid, deadline) {
                    kill_group(pid, "KILL");
                    group_gone_within(pid, Instant::now() + GROUP_EXIT_WAIT);
                    bail!("spoold did not stop within {timeout:?}; killed");
                }
                return Ok((status, t.elapsed()));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(anyhow!("spoold did not stop within {timeout:?}; killed"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL (the whole process group under a wrapper), and wait for the exit (of every
    /// process of the group, so that the broker's data directory is free again).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.group {
                kill_group(c.id(), "KILL");
            }
            let _ = c.kill();
            let _ = c.wait();
            if self.group {
                group_gone_within(c.id(), Instant::now() + GROUP_EXIT_WAIT);
            }
        }
    }

    /// The lines the broker printed on stderr so far (its last ones).
    pub fn stderr_lines(&self) -> Vec<String> {
        let l = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        l.iter().cloned().collect()
    }

    /// What the broker printed on stderr so far (its last lines).
    pub fn stderr(&self) -> String {
        self.stderr_lines().join("\n")
    }
}

impl Drop for Spoold {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How long [`Spoold::kill`] waits for the processes of a wrapper's group to be gone.
const GROUP_EXIT_WAIT: Duration = Duration::from_secs(10);

fn send(sig: &str, target: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(target)
        .stderr(Stdio::null())
        .status();
}

/// Signals every process of the process group `pgid`.
fn kill_group(pgid: u32, sig: &str) {
    send(sig, &format!("-{pgid}"));
}

/// Waits until no live process is left in the process group `pgid` (zombies do not count:
/// they hold no files and may wait for a reaper that never comes); false at `deadline`.
fn group_gone_within(pgid: u32, deadline: Instant) -> bool {
    loop {
        if !group_alive(pgid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// True while `/proc` shows a process of group `pgid` that has not exited: one with a thread
/// that has not exited. (A killed process's main thread can be a zombie while another of its
/// threads is still finishing a system call, e.g. an fdatasync: its files, and so its data
/// directory's lock, are released only when the last thread is gone.)
fn group_alive(pgid: u32) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let in_group = std::fs::read_to_string(p.path().join("stat"))
            .ok()
            .and_then(|stat| stat_state_and_group(&stat))
            .is_some_and(|(_, group)| group == pgid);
        in_group && {
            let tasks = std::fs::read_dir(p.path().join("task"));
            tasks.into_iter().flatten().flatten().any(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|stat| stat_state_and_group(&stat))
                    .is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
            })
        }
    })
}

/// The state and process group of a `/proc/<pid>/stat` line (`pid (comm) state ppid pgrp …`;
/// the command name may hold spaces and parentheses, so fields are counted after the last
/// `)`).
fn stat_state_and_group(stat: &str) -> Option<(char, u32)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let group = fields.next()?.parse().ok()?;
    Some((state, group))
}

/// The `spoold` binary: `$SPOOLD`, else `$CARGO_BIN_EXE_spoold` (set for the broker's own
/// tests), else `spoold` in the directory of the running executable or its parent
/// (`target/<profile>/` for binaries and `deps/` tests). A binary older than any source file
/// it was built from (per cargo's dep-info `spoold.d` next to it) is refused rather than
/// silently run.
pub fn find_spoold() -> Result<PathBuf> {
    for var in ["SPOOLD", "CARGO_BIN_EXE_spoold"] {
        if let Some(p) = std::env::var_os(var) {
            return Ok(PathBuf::from(p));
        }
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let bin = d.join("spoold");
        if let Ok(meta) = std::fs::metadata(&bin) {
            check_fresh(&bin, d, &meta)?;
            return Ok(bin);
        }
        dir = d.parent();
    }
    bail!(
        "spoold not found next to {}: build it (`cargo build -p spool-broker --bin spoold`, \
         with --release for a release build) or set SPOOLD",
        exe.display()
    )
}

fn check_fresh(bin: &Path, dir: &Path, meta: &std::fs::Metadata) -> Result<()> {
    let built = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
    let deps = std::fs::read_to_string(dir.join("spoold.d")).unwrap_or_default();
    for src in dep_info_files(&deps) {
        let changed = std::fs::metadata(&src).and_then(|m| m.modified());
        if changed.is_ok_and(|t| t > built) {
            bail!(
                "{} is older than {}: rebuild it with `cargo build -p spool-broker --bin spoold` \
                 (or set SPOOLD)",
                bin.display(),
                src.display()
            );
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dep_info_paths_with_spaces() {
        let d = "/t/spoold: /src/a.rs /src/with\\ space.rs\n\n/src/a.rs:\n";
        assert_eq!(
            dep_info_files(d),
            vec![
                PathBuf::from("/src/a.rs"),
                PathBuf::from("/src/with space.rs")
            ]
        );
        assert!(dep_info_files("").is_empty());
    }

    #[test]
    fn proc_stat_fields_after_the_command_name() {
        assert_eq!(
            stat_state_and_group("42 (a) b (c)) S 1 4242 4242 0 -1"),
            Some(('S', 4242))
        );
        assert_eq!(stat_state_and_group("7 (spoold) Z 1 7 7"), Some(('Z', 7)));
        assert_eq!(stat_state_and_group("garbage"), None);
    }

    #[test]
    fn a_wrapped_process_group_is_gone_when_kill_returns() {
        // A wrapper (the shell) with a child of its own in its group, as strace and spoold.
        let mut child = Command::new("sh")
            .args(["-c", "sleep 30 & echo started; wait"])
            .process_group(0)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "started\n");
        let pgid = child.id();
        let mut s = Spoold {
            child: Some(child),
            group: true,
            addr: String::new(),
            metrics_addr: None,
            ready_after: Duration::ZERO,
            stderr: Arc::default(),
        };
        assert!(group_alive(pgid));
        s.kill();
        assert!(!group_alive(pgid), "a process of the group outlived kill()");
    }
}
