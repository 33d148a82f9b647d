//! What an operator sees when spoold starts: plain log lines when stderr is not a terminal,
//! warnings about mistyped `SPOOL_*` variables, and metrics switched off from the config file
//! or the environment (not only from the flag).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts spoold with only `--data-dir` and `--listen 127.0.0.1:0` plus `args` and `env`,
/// collects its stderr until it listens, then kills it and returns the lines.
fn startup_lines(args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spoold"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SPOOL_") || k == "NO_COLOR" {
            cmd.env_remove(k);
        }
    }
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().copied())
        .env("SPOOL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("starting spoold");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let done = line.starts_with("spoold listening on ");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        lines.iter().any(|l| l.starts_with("spoold listening on ")),
        "spoold did not start:\n{}",
        lines.join("\n")
    );
    lines
}

#[test]
fn redirected_logs_have_no_colour_and_mistyped_variables_are_named() {
    let lines = startup_lines(
        &["--metrics-listen", "off"],
        &[
            ("SPOOL_DATADIR", "/somewhere"),
            ("SPOOL_LIMITS_MAX_CONNECTIONS", "10"),
            ("SPOOL_BROKER", "127.0.0.1:7170"),
        ],
    );
    let all = lines.join("\n");
    assert!(
        !all.contains('\u{1b}'),
        "no ANSI escape codes in a redirected log:\n{all}"
    );
    assert!(
        all.contains("WARN")
            && all.contains("ignoring SPOOL_DATADIR")
            && all.contains("did you mean SPOOL_DATA_DIR?"),
        "{all}"
    );
    assert!(
        all.contains("did you mean SPOOL_LIMITS__MAX_CONNECTIONS?"),
        "{all}"
    );
    assert!(
        !all.contains("SPOOL_BROKER"),
        "the CLI's variable is not spoold's business:\n{all}"
    );
}

#[test]
fn metrics_switch_off_from_the_file_and_the_environment() {
    let on = startup_lines(&["--metrics-listen", "127.0.0.1:0"], &[]);
    assert!(
        on.iter()
            .any(|l| l.starts_with("spoold metrics on http://")),
        "{on:?}"
    );

    let lines = startup_lines(&[], &[("SPOOL_METRICS_LISTEN", "off")]);
    assert!(!lines.iter().any(|l| l.contains("metrics on")), "{lines:?}");

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("spoold.toml");
    std::fs::write(&cfg, "metrics_listen = \"off\"\n").unwrap();
    let lines = startup_lines(&["--config", cfg.to_str().unwrap()], &[]);
    assert!(!lines.iter().any(|l| l.contains("metrics on")), "{lines:?}");
}
