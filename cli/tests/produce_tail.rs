//! `spool produce` and `spool tail`/`consume` against a real spoold: input modes, the offset
//! grammar end to end, output formats, filters, and the exits (`:end` on a busy partition, a
//! closed pipe).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Broker, cmd, spool, spool_in};

#[test]
fn produce_modes_and_verbose_offsets() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t", "-p", "2"]).ok();

    // Arguments, to a named partition; -v prints where each landed, in order.
    let v = spool(&b, &["produce", "t/1", "-v", "a", "b", "c"]).ok();
    assert_eq!(v, "t/1@0\nt/1@1\nt/1@2\n");

    // Stdin lines with a key separator and headers.
    let input = b"user-1:hello\nuser-2:world:with:colons\n";
    spool_in(
        &b,
        &["produce", "t/0", "-K:", "-H", "src=test", "-H", "src=again"],
        input,
    )
    .ok();
    let out = spool(
        &b,
        &[
            "consume",
            "t/0",
            "-o",
            "start:end",
            "-q",
            "-f",
            "%p/%o %k=%v [%h]\\n",
        ],
    )
    .ok();
    assert_eq!(
        out,
        "0/0 user-1=hello [src=test,src=again]\n0/1 user-2=world:with:colons [src=test,src=again]\n"
    );

    // A file with a custom delimiter; -Z makes empty values tombstones.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("in.txt");
    std::fs::write(&f, "x||||y||").unwrap();
    spool(
        &b,
        &[
            "produce",
            "t/1",
            "--file",
            f.to_str().unwrap(),
            "-D",
            "||",
            "-Z",
        ],
    )
    .ok();
    let out = spool(
        &b,
        &["consume", "t/1", "-o", "3:end", "-q", "-f", "%o:%S\\n"],
    )
    .ok();
    assert_eq!(out, "3:1\n4:-1\n5:1\n");

    // Keyed records without a partition go by key hash: the same key always lands together.
    let v = spool(&b, &["produce", "t", "-k", "same", "-v", "1", "2", "3"]).ok();
    let parts: Vec<&str> = v.lines().map(|l| l.split('@').next().unwrap()).collect();
    assert!(parts.windows(2).all(|w| w[0] == w[1]), "{v}");
}

#[test]
fn bad_input_stops_with_exit_2_and_keeps_what_came_before() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t"]).ok();
    let r = spool_in(
        &b,
        &["produce", "t", "--json"],
        b"{\"value\":\"ok\"}\nnot json\n{\"value\":\"never\"}\n",
    )
    .expect(2);
    assert!(r.stderr.contains("input record 2"), "{}", r.stderr);
    assert_eq!(spool(&b, &["consume", "t", "-e", "-q"]).ok(), "ok\n");

    // A record longer than the limit is refused, not buffered without bound.
    let long = vec![b'x'; 5000];
    let r = spool_in(&b, &["produce", "t", "--max-record-bytes", "1000"], &long).expect(2);
    assert!(r.stderr.contains("max-record-bytes"), "{}", r.stderr);

    // Unknown topic: the broker says so (4).
    let r = spool(&b, &["produce", "nope", "x"]).expect(4);
    assert!(r.stderr.contains("nope"), "{}", r.stderr);
    // Bad -o: usage error.
    spool(&b, &["tail", "t", "-o", "sometime"]).expect(2);
    spool(&b, &["tail", "t", "-f", "%q"]).expect(2);
}

/// Produces `n` records `v{i}` with keys `k{i%3}` and timestamps 1000·i ms after `base`.
fn produce_timed(b: &Broker, topic: &str, n: u64, base: i64) {
    let mut lines = String::new();
    for i in 0..n {
        lines.push_str(&format!(
            "{{\"key\":\"k{}\",\"value\":\"v{i}\",\"timestamp\":{}}}\n",
            i % 3,
            base + 1000 * i as i64
        ));
    }
    spool_in(
        b,
        &["produce", &format!("{topic}/0"), "--json"],
        lines.as_bytes(),
    )
    .ok();
}

#[test]
fn offset_grammar_end_to_end() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t"]).ok();
    let base = 1_795_428_000_000; // 2026-11-23T10:00:00Z
    produce_timed(&b, "t", 10, base);
    let read = |spec: &str| {
        spool(&b, &["consume", "t", "-q", "-o", spec, "-f", "%o "])
            .ok()
            .trim_end()
            .to_owned()
    };
    assert_eq!(read("start:end"), "0 1 2 3 4 5 6 7 8 9");
    assert_eq!(read("beginning:+3"), "0 1 2");
    assert_eq!(read("4:7"), "4 5 6");
    assert_eq!(read("+8:end"), "8 9");
    assert_eq!(read("-2:end"), "8 9");
    assert_eq!(read("@2026-11-23T10:00:05Z:end"), "5 6 7 8 9");
    assert_eq!(read("@2026-11-23T10:00:02Z:2026-11-23T10:00:04Z"), "2 3");
    assert_eq!(read("@2026-11-23T10:00:02Z:3s"), "2 3 4");
    assert_eq!(read(&format!("s@{}:e@{}", base + 7000, base + 9000)), "7 8");
    assert_eq!(read(&format!("@{}:end", (base + 6000) / 1000)), "6 7 8 9");
    // kcat style: two -o.
    let two = spool(
        &b,
        &[
            "consume",
            "t",
            "-q",
            "-o",
            &format!("s@{}", base + 1000),
            "-o",
            &format!("e@{}", base + 3000),
            "-f",
            "%o ",
        ],
    )
    .ok();
    assert_eq!(two.trim_end(), "1 2");
    // An empty range exits at once, and says what it resolved to.
    let r = spool(&b, &["tail", "t", "-o", ":end"]).expect(0);
    assert_eq!(r.stdout, "");
    assert!(r.stderr.contains("t/0: offsets [10, 10)"), "{}", r.stderr);
    // -n and filters.
    assert_eq!(read_with(&b, &["-o", "start:end", "-n", "2"]), "v0\nv1\n");
    assert_eq!(
        read_with(&b, &["-o", "start:end", "--key", "k1"]),
        "v1\nv4\nv7\n"
    );
    assert_eq!(read_with(&b, &["-o", "start:end", "--grep", "9"]), "v9\n");
}

fn read_with(b: &Broker, extra: &[&str]) -> String {
    let mut args = vec!["consume", "t", "-q"];
    args.extend_from_slice(extra);
    spool(b, &args).ok()
}

#[test]
fn json_output_is_binary_safe_and_feeds_produce() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "src"]).ok();
    spool(&b, &["topic", "create", "dst"]).ok();
    let lines = concat!(
        r#"{"key":"k","value":"/wBB","value_encoding":"base64","headers":[{"key":"h","value":"1"}],"timestamp":1000}"#,
        "\n",
        r#"{"key":null,"value":null,"timestamp":2000}"#,
        "\n",
        r#"{"key":"text","value":"plain é","timestamp":3000}"#,
        "\n",
    );
    spool_in(&b, &["produce", "src", "--json"], lines.as_bytes()).ok();
    let json = spool(&b, &["consume", "src", "-q", "-o", "start:end", "--json"]).ok();
    insta::assert_snapshot!("json_lines", json);
    // Round trip: what tail prints, produce reads back into identical records.
    spool_in(&b, &["produce", "dst", "--json"], json.as_bytes()).ok();
    let again = spool(&b, &["consume", "dst", "-q", "-o", "start:end", "--json"]).ok();
    assert_eq!(again.replace("\"dst\"", "\"src\""), json);
    // Hex everywhere when asked.
    let hex = spool(
        &b,
        &[
            "consume",
            "src",
            "-q",
            "-o",
            "0:1",
            "--json",
            "--encoding",
            "hex",
        ],
    )
    .ok();
    assert!(
        hex.contains(r#""value":"ff0041","value_encoding":"hex""#),
        "{hex}"
    );
    assert!(hex.contains(r#""key":"6b","key_encoding":"hex""#), "{hex}");
    // Raw values.
    let raw = cmd(&b, &["consume", "src", "-q", "-o", "0:1", "-f", "raw"])
        .output()
        .unwrap();
    assert_eq!(raw.stdout, [0xff, 0x00, 0x41]);
}

/// `-o start:end` stops at the end that existed when it started, though records keep coming.
#[test]
fn colon_end_exits_on_a_busy_partition() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "busy"]).ok();
    spool(&b, &["produce", "busy", "seed-0", "seed-1", "seed-2"]).ok();

    // A producer that keeps writing for the whole test.
    let mut producer = cmd(
        &b,
        &["produce", "busy", "--acks", "written", "--linger", "1ms"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut stdin = producer.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        for i in 0.. {
            if writeln!(stdin, "live-{i}")
                .and_then(|()| stdin.flush())
                .is_err()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    // Wait until the live records are landing.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = spool(&b, &["topic", "describe", "busy", "--json"]).ok();
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        if v["partitions"][0]["high_watermark"].as_u64().unwrap() > 50 {
            break;
        }
        assert!(Instant::now() < deadline, "the producer never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let run = spool(&b, &["consume", "busy", "-o", "start:end", "-f", "%o\\n"]).expect(0);
    assert!(started.elapsed() < Duration::from_secs(20));
    let offsets: Vec<u64> = run.stdout.lines().map(|l| l.parse().unwrap()).collect();
    assert!(offsets.len() > 50, "{} records", offsets.len());
    assert_eq!(offsets, (0..offsets.len() as u64).collect::<Vec<_>>());
    assert!(
        run.stderr.contains("Reached end of partition busy/0"),
        "{}",
        run.stderr
    );
    // The partition moves on past what the command printed (it kept being written while the
    // command ran, or does soon after: a loaded CI machine may starve the producer for a
    // moment, so this waits, bounded, rather than sample once).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d: serde_json::Value =
            serde_json::from_str(&spool(&b, &["topic", "describe", "busy", "--json"]).ok())
                .unwrap();
        if d["partitions"][0]["high_watermark"].as_u64().unwrap() > offsets.len() as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "the producer stopped");
        std::thread::sleep(Duration::from_millis(50));
    }

    let _ = producer.kill();
    let _ = producer.wait();
    let _ = feeder.join();
}

#[test]
fn following_prints_new_records_and_a_closed_pipe_exits_quietly() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t"]).ok();
    // `tail` starts at the end: only records produced afterwards appear.
    spool(&b, &["produce", "t", "before"]).ok();
    let mut tail = cmd(&b, &["tail", "t"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(tail.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("t/0: from offset 1 (following)"), "{line}");
    spool(&b, &["produce", "t", "after-1", "after-2"]).ok();
    let mut out = BufReader::new(tail.stdout.take().unwrap());
    let mut got = String::new();
    out.read_line(&mut got).unwrap();
    out.read_line(&mut got).unwrap();
    assert_eq!(got, "after-1\nafter-2\n");
    // Closing the pipe ends it with exit 0 at its next write, without an error message.
    drop(out);
    spool(&b, &["produce", "t", "after-3"]).ok();
    let status = wait_timeout(&mut tail, Duration::from_secs(20));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(!rest.contains("spool:"), "{rest}");
}

fn wait_timeout(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

#[test]
fn idle_exit_and_many_partitions() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "m", "-p", "3"]).ok();
    for p in 0..3 {
        spool(&b, &["produce", &format!("m/{p}"), &format!("p{p}")]).ok();
    }
    let out = spool(
        &b,
        &[
            "consume",
            "m",
            "-q",
            "--idle-exit",
            "500ms",
            "-f",
            "%p:%v\\n",
        ],
    )
    .ok();
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["0:p0", "1:p1", "2:p2"]);
    let two = spool(&b, &["consume", "m/0,2", "-q", "-e"]).ok();
    let mut v: Vec<&str> = two.lines().collect();
    v.sort();
    assert_eq!(v, ["p0", "p2"]);
    spool(&b, &["consume", "m", "-p", "1", "-q", "-e"]).ok();
    assert_eq!(
        spool(&b, &["consume", "m", "-p", "1", "-q", "-e"]).ok(),
        "p1\n"
    );
}

/// `spool tail` rides out a broker restart (a 3 s outage, longer than the ~1 s in which its
/// 100 ms polling used to use up the consumer's reconnect attempts) and prints what is
/// produced after it, exactly once.
#[test]
fn following_survives_a_broker_restart() {
    let mut b = Broker::start();
    spool(&b, &["topic", "create", "t"]).ok();
    let mut tail = cmd(&b, &["tail", "t"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(tail.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("t/0: from offset 0 (following)"), "{line}");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = BufReader::new(tail.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        for l in out.lines() {
            if tx.send(l.unwrap()).is_err() {
                break;
            }
        }
    });
    spool(&b, &["produce", "t", "before"]).ok();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(20)).as_deref(),
        Ok("before")
    );

    b.kill();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        tail.try_wait().unwrap().is_none(),
        "tail exited during the outage"
    );
    b.restart();
    spool(&b, &["produce", "t", "after"]).ok();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(30)).as_deref(),
        Ok("after")
    );
    assert!(tail.try_wait().unwrap().is_none(), "tail exited");
    let _ = tail.kill();
    let _ = tail.wait();
    let _ = reader.join();
    // "before" again (ahead of "after") would have failed the check above; nothing follows.
    assert!(rx.try_recv().is_err());
    // The outage and the recovery were said on stderr.
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let failed = rest
        .find("reading failed")
        .unwrap_or_else(|| panic!("{rest}"));
    let again = rest
        .find("reading again after")
        .unwrap_or_else(|| panic!("{rest}"));
    assert!(failed < again, "{rest}");
}

/// A followed topic that is deleted is retried (it may come back) and the retrying is said on
/// stderr, not done silently.
#[test]
fn following_a_deleted_topic_says_it_is_retrying() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t"]).ok();
    let mut tail = cmd(&b, &["tail", "t"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = BufReader::new(tail.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        for l in err.lines() {
            if tx.send(l.unwrap()).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(first.contains("t/0: from offset 0 (following)"), "{first}");
    spool(&b, &["topic", "delete", "t"]).ok();
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(
        line.contains("reading failed") && line.contains("retrying"),
        "{line}"
    );
    assert!(
        line.to_lowercase().contains("topic"),
        "names the cause: {line}"
    );
    assert!(tail.try_wait().unwrap().is_none(), "tail exited");
    let _ = tail.kill();
    let _ = tail.wait();
    let _ = reader.join();
}

/// A record refused at send time (here: an unknown topic) stops `spool produce` at once, with
/// the reason, even while its stdin stays open with no more input (a terminal, `tail -F |`).
#[test]
fn a_refused_send_exits_without_waiting_for_more_input() {
    let b = Broker::start();
    let mut child = cmd(&b, &["produce", "no-such-topic"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    stdin.flush().unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    drop(stdin);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(4), "{err}");
    assert!(err.contains("input record 1 not sent"), "{err}");
    assert!(err.contains("no-such-topic"), "{err}");
}

/// A closed stderr (`spool consume t -o start:end |& head -1` once head has exited) loses the
/// status lines but does not panic the command (exit 101): it exits 0 with its data printed.
#[test]
fn a_closed_stderr_is_not_a_panic() {
    let b = Broker::start();
    spool(&b, &["topic", "create", "t"]).ok();
    spool(&b, &["produce", "t", "a", "b"]).ok();
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["consume", "t", "-o", "start:end"][..],
        &["replay", "t", "-o", "start", "--to-topic", "t2", "--json"][..],
    ] {
        if args[0] == "replay" {
            spool(&b, &["topic", "create", "t2"]).ok();
        }
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = cmd(&b, args)
            .stdout(Stdio::piped())
            .stderr(writer)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if args[0] == "consume" {
            assert_eq!(stdout, "a\nb\n");
        } else {
            assert!(stdout.contains("\"complete\":true"), "{stdout}");
        }
    }
}

/// Resolving a range on more partitions than one ListOffsets request may ask about (here the
/// broker allows 4096 queries and `start:end` on 2100 partitions needs 4200) is split into
/// several requests, not refused.
#[test]
fn many_partitions_are_resolved_in_several_requests() {
    let b =
        Broker::start_with_config(|_| Some("[limits]\nmax_partitions_per_request = 4096\n".into()));
    spool(&b, &["topic", "create", "big", "-p", "2100"]).ok();
    spool(&b, &["produce", "big/2099", "last"]).ok();
    let r = spool(&b, &["consume", "big", "-o", "start:end", "-q"]).expect(0);
    assert_eq!(r.stdout, "last\n", "{}", r.stderr);
}
