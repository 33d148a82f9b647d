//! fsync and write failures, injected with `strace -e inject=SYSCALL:error=EIO:when=N`.
//!
//! The child ([`child`], ignored unless `SPOOL_EIO_CHILD_DIR` is set) is this test binary run
//! again under strace. It opens a log (fsync = always, 4 KiB segments so that rolls, index
//! writes and directory fsyncs happen), appends batches one by one from a single thread (so
//! that the N-th call is the same call in every run; every other append takes one of the
//! broker's paths: `append_nowait`, then `request_sync`, the sync loop and the `durable`
//! future, or `sync_behind`) and reports
//! each outcome on stdout. A
//! baseline run counts the calls; then, for every N up to that count, a fresh log is given to
//! a child whose N-th `fdatasync` (then `fsync`, `pwrite64`, then `pwritev`: appends write
//! their batch with one `pwritev`) fails with EIO. The checks:
//! - a failure of a durability call on log data or the recovery point is never swallowed:
//!   it surfaces as a failed open, a failed append (that batch is never acknowledged, nor any
//!   after it; it and later appends and flushes fail with `Poisoned`, no retry-then-ack), or a failed
//!   close; only the derived files, the indexes and the producer snapshot, may fail
//!   silently (they are rebuilt from the log);
//! - after reopening, every acknowledged record is at its acknowledged offset, offsets are
//!   dense, the only records past the last acknowledged batch belong to the batch that failed,
//!   and appends resume.
//!
//! strace is required: the test fails (it does not skip) when it cannot run strace. CI
//! installs it (`apt-get install -y strace`).

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use spool_log_engine::{
    AppendInfo, BatchBuilder, Compression, Error, FsyncPolicy, Log, Partition, TopicConfig,
};

use crate::common::{open_topic, opts, read_all, scratch};

const CHILD_DIR: &str = "SPOOL_EIO_CHILD_DIR";
/// Appends the child makes.
const APPENDS: u64 = 40;
/// Records per batch.
const RECORDS: u64 = 2;

fn cfg() -> TopicConfig {
    TopicConfig {
        segment_bytes: 4096,
        fsync: FsyncPolicy::Always,
        ..TopicConfig::default()
    }
}

fn batch(seq: u64) -> bytes::Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..RECORDS {
        let v = format!("{seq}/{i}/{}", "p".repeat(300));
        b.push(seq as i64, None, Some(v.as_bytes()), &[]);
    }
    b.finish().unwrap()
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::Poisoned { .. } => "poisoned",
        Error::Io { .. } => "io",
        Error::Corruption { .. } => "corruption",
        _ => "other",
    }
}

/// The child: reports `PID`, then `OPENFAIL` or `READY`, one `ACK <seq> <base>` per append
/// that returned, `FAIL <seq> <kind>` for the first that did not, then `AFTER`/`FLUSH` for
/// the attempts that follow a failure, and `CLOSE`.
#[test]
#[ignore = "child process of fsync_eio::injected_failures_are_never_acknowledged"]
fn child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| {
        out.write_all(line.as_bytes()).unwrap();
        out.flush().unwrap();
    };
    // libtest has printed "test fsync_eio::child ... " without a newline: start afresh.
    say(format!("\nPID {}\n", std::process::id()));
    let log = match Log::open(&dir, opts()) {
        Ok(log) => log,
        Err(e) => return say(format!("OPENFAIL {} {e}\n", kind(&e))),
    };
    say("READY\n".into());
    let p = log.partition("t", 0).unwrap();
    for seq in 0..APPENDS {
        match append(&p, seq) {
            Ok(info) => say(format!("ACK {seq} {}\n", info.base_offset)),
            Err(e) => {
                say(format!("FAIL {seq} {} {e}\n", kind(&e)));
                for after in seq + 1..seq + 4 {
                    match append(&p, after) {
                        Ok(info) => say(format!("AFTER {after} ok {}\n", info.base_offset)),
                        Err(e) => say(format!("AFTER {after} {} {e}\n", kind(&e))),
                    }
                }
                match p.flush() {
                    Ok(_) => say("FLUSH ok\n".into()),
                    Err(e) => say(format!("FLUSH {} {e}\n", kind(&e))),
                }
                break;
            }
        }
    }
    drop(p);
    match log.close() {
        Ok(()) => say("CLOSE ok\n".into()),
        Err(e) => say(format!("CLOSE {} {e}\n", kind(&e))),
    }
}

/// The child's append: even batches through `append` (the caller's thread runs the group
/// commit), odd ones the ways the broker does it: `append_nowait`, then either `request_sync`,
/// the sync loop and the `durable` future (1 mod 4), or `sync_behind` (3 mod 4; alone on its
/// partition it runs the sync itself and returns once the batch is durable), so that every
/// path meets every injected failure.
fn append(p: &Arc<Partition>, seq: u64) -> spool_log_engine::Result<AppendInfo> {
    let b = batch(seq);
    if seq.is_multiple_of(2) {
        return p.append(&b);
    }
    let info = p.append_nowait(&b)?;
    let next = info.last_offset + 1;
    if seq % 4 == 3 {
        p.sync_behind(next)?;
        assert!(
            p.high_watermark() >= next,
            "batch {seq} not durable after sync_behind"
        );
        return Ok(info);
    }
    if p.request_sync(next) {
        // Its error reaches the waiter below.
        let _ = p.run_requested_syncs();
    }
    let mut durable = std::pin::pin!(p.durable(next));
    match durable
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(r) => r.map(|()| info),
        Poll::Pending => panic!("batch {seq} not durable after the sync loop ended"),
    }
}

/// One traced run of the child.
struct Run {
    lines: Vec<String>,
    /// strace's trace (`-y`: file descriptors shown with their paths).
    trace: String,
}

impl Run {
    fn has(&self, prefix: &str) -> bool {
        self.lines.iter().any(|l| l.starts_with(prefix))
    }

    /// Calls of `syscall` in the trace (strace's `-o` file lists each one).
    fn calls(&self, syscall: &str) -> usize {
        self.trace
            .lines()
            .filter(|l| l.contains(&format!("{syscall}(")))
            .count()
    }

    /// The line of the injected call, if any.
    fn injected(&self) -> Option<&str> {
        self.trace.lines().find(|l| l.contains("(INJECTED)"))
    }

    fn describe(&self) -> String {
        format!(
            "child output:\n{}\ninjected call: {:?}",
            self.lines.join("\n"),
            self.injected()
        )
    }
}

fn require_strace() {
    let ok = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this test needs strace to inject EIO into fdatasync/fsync/pwrite64/pwritev and could not run \
         it; install it (apt-get install -y strace) — the test fails rather than skip"
    );
}

/// Runs the child on `dir` under strace, injecting EIO into call `n` of `syscall` if given.
fn run(dir: &Path, inject: Option<(&str, u64)>, work: &Path) -> Run {
    let trace_path = work.join("trace");
    let mut cmd = Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-y",
        "--seccomp-bpf",
        "-e",
        "trace=fdatasync,fsync,pwrite64,pwritev",
    ]);
    if let Some((syscall, n)) = inject {
        cmd.arg("-e")
            .arg(format!("inject={syscall}:error=EIO:when={n}"));
    }
    cmd.arg("-o")
        .arg(&trace_path)
        .arg("--")
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fsync_eio::child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut strace = cmd.spawn().expect("running strace");
    let stdout = strace.stdout.take().unwrap();
    let stderr = strace.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let err_reader =
        std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = strace.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = strace.kill();
            let _ = strace.wait();
            let lines = reader.join().unwrap();
            if let Some(pid) = lines.iter().find_map(|l| l.strip_prefix("PID ")) {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
            panic!(
                "the child hung ({inject:?}); its output:\n{}",
                lines.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let lines = reader.join().unwrap();
    let stderr = err_reader.join().unwrap();
    assert!(
        status.success() && lines.iter().any(|l| l.starts_with("PID ")),
        "strace or the child failed ({status}, {inject:?}); stderr:\n{stderr}\nstdout:\n{}",
        lines.join("\n")
    );
    let trace = std::fs::read_to_string(&trace_path).unwrap_or_default();
    Run { lines, trace }
}

#[derive(Debug, Default)]
struct Figures {
    runs: u64,
    open_failed: u64,
    append_failed: u64,
    close_failed: u64,
    derived_only: u64,
    acked_records: u64,
    unacked_present: u64,
}

/// Checks one injected run and the log it left.
fn check(dir: &Path, r: &Run, ctx: &str, f: &mut Figures) {
    let ctx = format!("{ctx}\n{}", r.describe());
    let injected = r
        .injected()
        .unwrap_or_else(|| panic!("{ctx}\nno call was injected"));
    let acks: Vec<(u64, u64)> = r
        .lines
        .iter()
        .filter_map(|l| l.strip_prefix("ACK "))
        .map(|a| {
            let (seq, base) = a.split_once(' ').unwrap();
            (seq.parse().unwrap(), base.parse().unwrap())
        })
        .collect();
    // Acks are the appends 0, 1, 2, ... in order, at dense offsets.
    for (i, &(seq, base)) in acks.iter().enumerate() {
        assert_eq!((seq, base), (i as u64, i as u64 * RECORDS), "{ctx}");
    }
    let failed = r.lines.iter().find_map(|l| l.strip_prefix("FAIL "));
    // Index files and the producer snapshot are derived data: a roll goes on without them
    // (they are rebuilt from the log).
    let derived = injected.contains(".index.tmp>")
        || injected.contains(".timeindex.tmp>")
        || injected.contains("producers.snapshot.tmp>");
    if derived {
        assert!(
            failed.is_none() && !r.has("OPENFAIL"),
            "{ctx}\na failure writing derived files must not fail appends"
        );
        assert_eq!(acks.len() as u64, APPENDS, "{ctx}");
        f.derived_only += 1;
    } else if r.has("OPENFAIL") {
        assert!(acks.is_empty(), "{ctx}");
        f.open_failed += 1;
    } else if let Some(failed) = failed {
        let seq: u64 = failed.split(' ').next().unwrap().parse().unwrap();
        // The append whose own durability call failed is told the partition is poisoned too
        // (docs/durability.md), not a bare I/O error that reads as retriable.
        assert!(
            failed.split(' ').nth(1) == Some("poisoned"),
            "{ctx}\nthe failed append itself must fail with Poisoned: FAIL {failed}"
        );
        assert_eq!(
            acks.len() as u64,
            seq,
            "{ctx}\nevery append before the failed one was acknowledged, none after"
        );
        let after: Vec<&str> = r
            .lines
            .iter()
            .filter(|l| l.starts_with("AFTER ") || l.starts_with("FLUSH "))
            .map(String::as_str)
            .collect();
        assert_eq!(after.len(), 4, "{ctx}");
        for l in after {
            assert!(
                l.contains(" poisoned "),
                "{ctx}\nafter a failed durability call, writes must fail with Poisoned: {l}"
            );
        }
        f.append_failed += 1;
    } else {
        assert!(
            r.has("CLOSE ") && !r.has("CLOSE ok"),
            "{ctx}\nthe injected failure was swallowed"
        );
        assert_eq!(acks.len() as u64, APPENDS, "{ctx}");
        f.close_failed += 1;
    }
    // After a restart: every acknowledged record is there; at most the failed batch beyond.
    let log = Log::open(dir, opts()).unwrap_or_else(|e| panic!("{ctx}\nreopen failed: {e}"));
    let p = log.partition("t", 0).unwrap();
    let records = read_all(&p, 0);
    assert_eq!(records.len() as u64, p.high_watermark(), "{ctx}");
    for (i, rec) in records.iter().enumerate() {
        assert_eq!(rec.offset, i as u64, "{ctx}");
        let v = std::str::from_utf8(rec.value.as_deref().unwrap()).unwrap();
        let (seq, rest) = v.split_once('/').unwrap();
        let want = format!("{}/{}/", i as u64 / RECORDS, i as u64 % RECORDS);
        assert!(
            v.starts_with(&want),
            "{ctx}\noffset {i} holds {seq}/{rest:.8}…, want {want}"
        );
    }
    let acked = acks.len() as u64 * RECORDS;
    assert!(
        records.len() as u64 >= acked,
        "{ctx}\nacknowledged records lost: {} of {acked} present",
        records.len()
    );
    assert!(
        records.len() as u64 <= acked + RECORDS,
        "{ctx}\nmore than the failed batch beyond the acknowledged ones"
    );
    f.acked_records += acked;
    f.unacked_present += records.len() as u64 - acked;
    let hwm = p.high_watermark();
    assert_eq!(
        p.append(&batch(999)).unwrap().base_offset,
        hwm,
        "{ctx}\nappends resume after a restart"
    );
}

#[test]
fn injected_failures_are_never_acknowledged() {
    require_strace();
    let start = Instant::now();
    let work = scratch();
    // Baseline: how many calls a clean run makes.
    let base = scratch();
    drop(open_topic(base.path(), cfg()));
    let clean = run(base.path(), None, work.path());
    assert!(
        clean.injected().is_none() && clean.has("CLOSE ok"),
        "{}",
        clean.describe()
    );
    assert_eq!(
        clean.lines.iter().filter(|l| l.starts_with("ACK ")).count() as u64,
        APPENDS
    );
    let counts: Vec<(&str, u64)> = ["fdatasync", "fsync", "pwrite64", "pwritev"]
        .into_iter()
        .map(|s| (s, clean.calls(s) as u64))
        .collect();
    eprintln!("clean run: calls {counts:?}");
    assert!(
        counts.iter().all(|&(_, n)| n >= 5),
        "the workload must exercise every call: {counts:?}"
    );
    let mut f = Figures::default();
    for &(syscall, total) in &counts {
        for n in 1..=total {
            let dir = scratch();
            drop(open_topic(dir.path(), cfg()));
            let r = run(dir.path(), Some((syscall, n)), work.path());
            check(
                dir.path(),
                &r,
                &format!("EIO on {syscall} call {n} of {total}"),
                &mut f,
            );
            f.runs += 1;
        }
    }
    eprintln!("EIO injection: {f:?} in {:?}", start.elapsed());
    let all = [
        f.open_failed,
        f.append_failed,
        f.close_failed,
        f.derived_only,
    ];
    assert!(
        all.iter().all(|&n| n > 0),
        "every kind of outcome must be exercised: {f:?}"
    );
}
