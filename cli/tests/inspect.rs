//! `spool inspect` against real data directories written by the engine.

use std::process::Command;

use spool_log_engine::{BatchBuilder, Compression, Log, LogOptions, TopicConfig};

fn write(dir: &std::path::Path) {
    let log = Log::open(
        dir,
        LogOptions {
            background_maintenance: false,
            ..LogOptions::default()
        },
    )
    .unwrap();
    log.create_topic(
        "prices",
        TopicConfig {
            segment_bytes: 4096,
            ..TopicConfig::default()
        },
    )
    .unwrap();
    let p = log.partition("prices", 0).unwrap();
    for i in 0..100 {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(
            1000 + i,
            Some(b"k"),
            Some(format!("value-{i}").as_bytes()),
            &[],
        );
        p.append(&b.finish().unwrap()).unwrap();
    }
    log.close().unwrap();
}

fn spool(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spool"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn verify_stats_and_dump() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path());
    let d = dir.path().to_str().unwrap();

    let (code, out, err) = spool(&["inspect", "verify", d]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("no corruption"), "{err}");

    let (code, out, _) = spool(&["inspect", "stats", d, "--json"]);
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.contains("\"prices\"")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["records"], 100);
    assert_eq!(v["end_offset"], 100);

    let seg = dir.path().join("prices/0/00000000000000000000.log");
    let (code, out, _) = spool(&["inspect", "dump", seg.to_str().unwrap(), "--records"]);
    assert_eq!(code, 0);
    assert!(out.contains("batch at byte 0: offsets 0..=0"), "{out}");
    assert!(
        out.contains("offset 0 ts 1000 key k value value-0"),
        "{out}"
    );

    // A flipped bit in a sealed segment: exit 1 with file and position.
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[300] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let (code, out, err) = spool(&["inspect", "verify", d]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("CORRUPTION") && out.contains("00000000000000000000.log at byte"),
        "{out}"
    );
    let (code, out, _) = spool(&["inspect", "verify", d, "--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(v["severity"], "corruption");

    let (code, _, err) = spool(&["inspect", "verify", "/nonexistent/dir"]);
    assert_eq!(code, 2, "{err}");
}
