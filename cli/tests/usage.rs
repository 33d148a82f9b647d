//! Usage details an operator trips over: refused nonsense (`--partitions 0`, `-o 5:3`),
//! ranges that always end, a closed pipe after `completions`, one grammar for durations and
//! rates.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Broker, cmd, spool_in};

#[test]
fn nonsense_is_refused_and_ranges_end() {
    let b = Broker::start();
    let run = |args: &[&str]| spool_in(&b, args, b"");

    let r = run(&["topic", "create", "zero", "--partitions", "0"]).expect(2);
    assert!(r.stderr.contains("--partitions"), "{}", r.stderr);
    let r = run(&["topic", "list", "--json"]).ok();
    assert!(!r.contains("zero"), "nothing was created: {r}");

    run(&["topic", "create", "empty"]).ok();
    let r = run(&["consume", "empty", "-o", "5:3"]).expect(2);
    assert!(r.stderr.contains("before the start offset"), "{}", r.stderr);

    // A bounded range on an empty partition exits at once instead of waiting forever.
    let mut child = cmd(&b, &["consume", "empty", "-o", "oldest:+1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`consume -o oldest:+1` on an empty partition did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());

    // The rate and duration grammar of `replay` works for `bench` too.
    let r = run(&[
        "bench",
        "produce",
        "--topic",
        "g",
        "--rate",
        "500/s",
        "--duration",
        "0m1s",
        "--warmup",
        "0s",
        "--json",
        "--record-size",
        "64",
    ])
    .ok();
    assert!(r.contains("\"duration_ms\":1000.0"), "{r}");
    let r = run(&["tail", "empty", "--idle-exit", "3y"]).expect(2);
    assert!(
        r.stderr.contains("500ms, 30s") && !r.stderr.contains("jiff") && !r.stderr.contains("Span"),
        "{}",
        r.stderr
    );
}

#[test]
fn completions_into_a_closed_pipe_exit_quietly() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(["completions", "bash"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read a little, then close the pipe (`| head -2`).
    let mut first = [0u8; 16];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("panicked"),
        "{:?} {err}",
        out.status
    );
}
