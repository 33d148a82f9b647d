//! What an operator sees when spoold starts: plain log lines when stderr is not a terminal,
//! warnings about mistyped `SPOOL_*` variables, and metrics switched off from the config file
//! or the environment (not only from the flag).

use crate::common::Launch;

/// Starts spoold with only `--data-dir` and `--listen 127.0.0.1:0` plus `args` and `env`
/// (no `--metrics-listen`, `NO_COLOR` and the caller's `SPOOL_*` removed), collects its stderr
/// until it listens, then kills it and returns the lines.
fn startup_lines(args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let mut launch = Launch::new(env!("CARGO_BIN_EXE_spoold"), dir.path().join("data"))
        .metrics_unset()
        .log("info")
        .env_remove("NO_COLOR")
        .args(args);
    for (k, v) in env {
        launch = launch.env(k, v);
    }
    let mut b = launch.start().unwrap_or_else(|e| panic!("{e:#}"));
    let lines = b.stderr_lines();
    b.kill();
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
