//! Shared by the CLI's integration tests: runs the `spool` binary against a real `spoold`
//! (started by `spool-testkit` on a temp dir and an ephemeral loopback port).

#![allow(dead_code)] // each test file uses a different subset

use std::io::Write;
use std::process::{Command, Stdio};

pub(crate) use spool_testkit::Broker;

/// What a `spool` run produced.
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    /// Panics with the output unless the exit code is `code`.
    #[track_caller]
    pub(crate) fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code {} (wanted {code})\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// Asserts success and returns stdout.
    #[track_caller]
    pub(crate) fn ok(self) -> String {
        self.expect(0).stdout
    }
}

/// A `spool` command aimed at `broker`, with the caller's SPOOL_* environment removed and no
/// profile file.
pub(crate) fn cmd(broker: &Broker, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_spool"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SPOOL_") {
            c.env_remove(k);
        }
    }
    c.env("SPOOL_CLI_CONFIG", "/nonexistent/spool-cli.toml")
        .env("SPOOL_BROKER", broker.addr())
        .args(args);
    c
}

/// Runs `spool args…` against `broker` with `stdin` as input.
pub(crate) fn spool_in(broker: &Broker, args: &[&str], stdin: &[u8]) -> Run {
    let mut child = cmd(broker, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running spool");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("spool output");
    let _ = writer.join();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `spool args…` against `broker` with empty stdin.
pub(crate) fn spool(broker: &Broker, args: &[&str]) -> Run {
    spool_in(broker, args, b"")
}
