//! `spool replay` against a real spoold: printing a bounded range, copying with keys, headers
//! and timestamps kept, the dry-run plan, and resuming (after `-n`, after Ctrl-C) so that the
//! destination ends up with every source record exactly once.

#[allow(unreachable_pub)] // common's helpers are pub for the test files that use them
mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::{Broker, cmd, spool, spool_in};
use serde_json::Value;

/// `n` records into `target` (partition given): key `k{i % 3}`, value `{tag}-{i}`, two
/// headers (one binary), timestamps 1 s apart from a fixed instant.
fn produce(b: &Broker, target: &str, tag: &str, n: u64) {
    let lines: String = (0..n)
        .map(|i| {
            format!(
                "{{\"key\":\"k{}\",\"value\":\"{tag}-{i}\",\"timestamp\":{},\"headers\":[\
                 {{\"key\":\"src\",\"value\":\"{tag}\"}},\
                 {{\"key\":\"bin\",\"value\":\"AP8=\",\"value_encoding\":\"base64\"}}]}}\n",
                i % 3,
                1_700_000_000_000 + 1000 * i as i64
            )
        })
        .collect();
    spool_in(b, &["produce", target, "--json"], lines.as_bytes()).ok();
}

/// Every record of `topic` as JSON objects without `topic` and `offset` (what a copy keeps),
/// in partition then offset order.
fn records(b: &Broker, topic: &str) -> Vec<Value> {
    let out = spool(b, &["consume", topic, "-o", "start:end", "-q", "--json"]).ok();
    let mut v: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    v.sort_by_key(|r| (r["partition"].as_u64(), r["offset"].as_u64()));
    for r in &mut v {
        let o = r.as_object_mut().unwrap();
        o.remove("topic");
        o.remove("offset");
    }
    v
}

fn without_partition(mut v: Vec<Value>) -> Vec<String> {
    let mut s: Vec<String> = v
        .iter_mut()
        .map(|r| {
            r.as_object_mut().unwrap().remove("partition");
            r.to_string()
        })
        .collect();
    s.sort();
    s
}

#[test]
fn prints_a_bounded_range_and_leaves_groups_alone() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t", "-p", "2"]).ok();
    produce(&b, "t/0", "a", 10);
    produce(&b, "t/1", "b", 3);

    let out = spool(
        &b,
        &["replay", "t/0", "-o", "3:6", "-f", "%o %k %v %T\\n", "-q"],
    )
    .ok();
    assert_eq!(
        out,
        "3 k0 a-3 1700000003000\n4 k1 a-4 1700000004000\n5 k2 a-5 1700000005000\n"
    );
    // A start without an end stops at the end that existed when the command started.
    let r = spool(&b, &["replay", "t", "-o", "-2"]).expect(0);
    let mut lines: Vec<&str> = r.stdout.lines().collect();
    lines.sort();
    assert_eq!(lines, ["a-8", "a-9", "b-1", "b-2"]);
    assert!(
        r.stderr.contains("% t/0: offsets [8, 10) (2 records)"),
        "{}",
        r.stderr
    );
    // A time range, as JSON lines.
    let out = spool(
        &b,
        &[
            "replay",
            "t/0",
            "-o",
            "@1700000001000:1700000003000",
            "--json",
            "-q",
        ],
    )
    .ok();
    let v: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v.len(), 2);
    assert_eq!(v[0]["offset"], 1);
    assert_eq!(v[1]["value"], "a-2");
    assert_eq!(v[1]["headers"][1]["value_encoding"], "base64");
    // -n limits.
    assert_eq!(
        spool(&b, &["replay", "t/0", "-o", "start", "-n", "2", "-q"]).ok(),
        "a-0\na-1\n"
    );
    // -o is required; a bad one is a usage error.
    spool(&b, &["replay", "t"]).expect(2);
    spool(&b, &["replay", "t", "-o", "sometime"]).expect(2);
    spool(&b, &["replay", "nosuch", "-o", "start"]).expect(4);
    // No group was created or moved.
    assert_eq!(spool(&b, &["group", "list", "--json"]).ok(), "[]\n");
}

#[test]
fn copies_keys_headers_and_timestamps() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "src", "-p", "2"]).ok();
    spool(&b, &["topic", "create", "same", "-p", "3"]).ok();
    spool(&b, &["topic", "create", "narrow", "-p", "1"]).ok();
    produce(&b, "src/0", "a", 12);
    produce(&b, "src/1", "b", 7);

    // Enough partitions: partition for partition, everything kept.
    let r = spool(
        &b,
        &[
            "replay",
            "src",
            "-o",
            "start",
            "--to-topic",
            "same",
            "--json",
        ],
    )
    .expect(0);
    let summary: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(summary["copied"], 19);
    assert_eq!(summary["complete"], true);
    assert_eq!(summary["partitioning"], "same");
    assert_eq!(records(&b, "same"), records(&b, "src"));

    // Fewer partitions: by key hash, still every record once with its fields.
    let r = spool(
        &b,
        &["replay", "src", "-o", "start", "--to-topic", "narrow"],
    )
    .expect(0);
    assert!(r.stderr.contains("by key hash"), "{}", r.stderr);
    assert!(r.stderr.contains("% copied 19 record(s)"), "{}", r.stderr);
    assert_eq!(
        without_partition(records(&b, "narrow")),
        without_partition(records(&b, "src"))
    );
    spool(
        &b,
        &[
            "replay",
            "src",
            "-o",
            "start",
            "--to-topic",
            "narrow",
            "--partitioning",
            "same",
        ],
    )
    .expect(2);
    // A missing destination is the broker's unknown topic.
    spool(
        &b,
        &["replay", "src", "-o", "start", "--to-topic", "nosuch"],
    )
    .expect(4);
}

#[test]
fn dry_run_writes_nothing() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "src", "-p", "2"]).ok();
    spool(&b, &["topic", "create", "dst", "-p", "2"]).ok();
    produce(&b, "src/0", "a", 10);
    produce(&b, "src/1", "b", 4);

    let r = spool(
        &b,
        &[
            "replay",
            "src",
            "-o",
            "+2:+5",
            "--to-topic",
            "dst",
            "--dry-run",
        ],
    )
    .expect(0);
    assert_eq!(
        r.stdout,
        "SOURCE  PARTITION  START  END  RECORDS  DESTINATION\n\
         src     0          2      7    5        dst/0\n\
         src     1          2      4    2        dst/1\n\
         TOTAL                          7\n"
    );
    assert!(r.stderr.contains("dry run"), "{}", r.stderr);
    let out = spool(
        &b,
        &[
            "replay",
            "src/1",
            "-o",
            "start",
            "--to-topic",
            "dst",
            "--dry-run",
            "--json",
        ],
    )
    .ok();
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["records"], 4);
    assert_eq!(v["partitions"][0]["destination"], "dst/1");
    // A resume file is not created by a dry run.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.json");
    spool(
        &b,
        &[
            "replay",
            "src",
            "-o",
            "start",
            "--to-topic",
            "dst",
            "--dry-run",
            "--resume-file",
            f.to_str().unwrap(),
        ],
    )
    .ok();
    assert!(!f.exists());
    assert!(records(&b, "dst").is_empty());
}

#[test]
fn resume_file_continues_without_gaps_or_duplicates() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "src", "-p", "2"]).ok();
    spool(&b, &["topic", "create", "dst", "-p", "2"]).ok();
    produce(&b, "src/0", "a", 30);
    produce(&b, "src/1", "b", 20);
    let expected = records(&b, "src");

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("progress.json");
    let fs = f.to_str().unwrap();
    let r = spool(
        &b,
        &[
            "replay",
            "src",
            "-o",
            "start",
            "--to-topic",
            "dst",
            "--resume-file",
            fs,
            "-n",
            "13",
        ],
    )
    .expect(0);
    assert!(r.stderr.contains("to copy the rest"), "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "spool replay src --to-topic dst --resume-file {fs}"
        )),
        "{}",
        r.stderr
    );
    assert_eq!(records(&b, "dst").len(), 13);
    let st: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    let next: u64 = st["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["next"].as_u64().unwrap() - p["start"].as_u64().unwrap())
        .sum();
    assert_eq!(next, 13);

    // Records appended since are outside the recorded range and are not copied.
    produce(&b, "src/0", "late", 5);
    let r = spool(
        &b,
        &["replay", "src", "--to-topic", "dst", "--resume-file", fs],
    )
    .expect(0);
    assert!(r.stderr.contains("% copied 37 record(s)"), "{}", r.stderr);
    assert_eq!(records(&b, "dst"), expected);

    // Done: a rerun copies nothing.
    let r = spool(
        &b,
        &["replay", "src", "--to-topic", "dst", "--resume-file", fs],
    )
    .expect(0);
    assert!(r.stderr.contains("nothing left to copy"), "{}", r.stderr);
    assert_eq!(records(&b, "dst"), expected);
    // The file belongs to this copy.
    spool(
        &b,
        &["replay", "src", "--to-topic", "src", "--resume-file", fs],
    )
    .expect(2);
}

#[test]
fn ctrl_c_stops_after_the_acknowledged_records_and_resumes() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "src"]).ok();
    spool(&b, &["topic", "create", "dst"]).ok();
    produce(&b, "src/0", "a", 100);
    let expected = records(&b, "src");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("progress.json");
    let fs = f.to_str().unwrap();

    // 40 records/s: 100 records take 2.5 s. Interrupt after the first progress line (1 s in;
    // by then the Ctrl-C handler is certainly installed).
    let mut child = cmd(
        &b,
        &[
            "replay",
            "src",
            "-o",
            "start",
            "--to-topic",
            "dst",
            "--rate",
            "40/s",
            "--resume-file",
            fs,
            "--progress",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            if line.starts_with("% copied ") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("a progress line");
    let killed = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(stderr.contains("to copy the rest"), "{stderr}");

    // What was acknowledged is in the file and in the destination, nothing more.
    let copied = records(&b, "dst").len();
    assert!((1..100).contains(&copied), "{copied} copied; {stderr}");
    let st: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    assert_eq!(st["partitions"][0]["next"].as_u64(), Some(copied as u64));

    spool(
        &b,
        &["replay", "src", "--to-topic", "dst", "--resume-file", fs],
    )
    .ok();
    assert_eq!(records(&b, "dst"), expected);
}

/// Waits until partition 0 of `topic` ends (for a read-committed reader: the last stable
/// offset) at `end`: a transaction's marker becomes durable, and the last stable offset
/// moves, just after the commit or abort reply.
fn wait_end(b: &Broker, topic: &str, end: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = spool(b, &["replay", topic, "-o", "start", "--dry-run", "--json"]).ok();
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        if v["partitions"][0]["end"] == end {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Copies `src` to `dst` with a resume file and checks that the copy says it is complete, with
/// every partition's next offset at its end, and that a rerun has nothing left to copy.
fn copy_completes(b: &Broker, src: &str, dst: &str, end: u64) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("progress.json");
    let fs = f.to_str().unwrap();
    let r = spool(
        b,
        &[
            "replay",
            src,
            "-o",
            "start",
            "--to-topic",
            dst,
            "--json",
            "--resume-file",
            fs,
        ],
    )
    .expect(0);
    let summary: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(summary["complete"], true, "{summary}\n{}", r.stderr);
    assert_eq!(summary["partitions"][0]["end"], end, "{summary}");
    assert_eq!(summary["partitions"][0]["next"], end, "{summary}");
    assert_eq!(summary["resume_commands"], serde_json::json!([]));
    assert!(!r.stderr.contains("not finished"), "{}", r.stderr);
    let r = spool(b, &["replay", src, "--to-topic", dst, "--resume-file", fs]).expect(0);
    assert!(r.stderr.contains("nothing left to copy"), "{}", r.stderr);
}

#[test]
fn a_range_ending_on_a_transaction_marker_completes() {
    use spool_client::{ProducerRecord, TransactionalConfig, TransactionalProducer};
    let b = Broker::start();
    for t in ["committed", "aborted", "dst1", "dst2"] {
        spool(&b, &["topic", "create", t]).ok();
    }
    spool(&b, &["produce", "aborted/0", "plain"]).ok();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = b.client().await;
        // Three committed records (offsets 0-2) and the commit marker (3): end 4.
        let mut p = TransactionalProducer::new(c.clone(), TransactionalConfig::new("tx-c"))
            .await
            .unwrap();
        p.begin().unwrap();
        for v in ["c0", "c1", "c2"] {
            p.send("committed", 0, ProducerRecord::new(v))
                .await
                .unwrap();
        }
        p.flush().await.unwrap();
        p.commit().await.unwrap();
        // One plain record (0), an aborted one (1) and the abort marker (2): end 3.
        let mut p = TransactionalProducer::new(c, TransactionalConfig::new("tx-a"))
            .await
            .unwrap();
        p.begin().unwrap();
        p.send("aborted", 0, ProducerRecord::new("gone"))
            .await
            .unwrap();
        p.flush().await.unwrap();
        p.abort().await.unwrap();
    });
    wait_end(&b, "committed", 4);
    wait_end(&b, "aborted", 3);

    copy_completes(&b, "committed", "dst1", 4);
    assert_eq!(
        spool(&b, &["consume", "dst1", "-o", "start:end", "-q"]).ok(),
        "c0\nc1\nc2\n"
    );
    copy_completes(&b, "aborted", "dst2", 3);
    assert_eq!(
        spool(&b, &["consume", "dst2", "-o", "start:end", "-q"]).ok(),
        "plain\n"
    );
}
