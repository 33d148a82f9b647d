//! Offline inspection: finds and classifies damage precisely, and never changes a byte.

use spool_log_engine::TopicConfig;
use spool_log_engine::inspect::{Severity, inspect_log, inspect_partition};

use crate::common::{batch, copy_dir, open_topic, segment_files, snapshot_files};

fn written_log(dir: &std::path::Path) {
    let log = open_topic(
        dir,
        TopicConfig {
            segment_bytes: 4096,
            ..TopicConfig::default()
        },
    );
    let p = log.partition("t", 0).unwrap();
    for i in 0..120 {
        p.append(&batch(&format!("i{i}"), 3, i)).unwrap();
    }
    log.close().unwrap();
}

#[test]
fn clean_log_has_no_findings_and_counts_records() {
    let dir = tempfile::tempdir().unwrap();
    written_log(dir.path());
    let all = inspect_log(dir.path()).unwrap();
    let (topic, part, ins) = all.iter().find(|(t, _, _)| t == "t").unwrap();
    assert_eq!((topic.as_str(), *part), ("t", 0));
    assert!(ins.findings.is_empty(), "{:?}", ins.findings);
    assert!(ins.segments.len() > 3);
    assert_eq!(ins.segments.iter().map(|s| s.records).sum::<u64>(), 360);
    assert_eq!(ins.segments.last().unwrap().next_offset, 360);
    let rp = ins.recovery_point.unwrap();
    assert_eq!(
        rp.2, 360,
        "a clean close leaves the recovery point at the end"
    );
}

#[test]
fn damage_is_found_where_it_is_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    written_log(dir.path());
    let pdir = dir.path().join("t/0");
    let segs = segment_files(&pdir);
    // A flipped bit inside a sealed segment: corruption, named by file and position.
    let sealed = &segs[1];
    let mut bytes = std::fs::read(sealed).unwrap();
    bytes[200] ^= 0x04;
    std::fs::write(sealed, &bytes).unwrap();
    // A damaged index: repairable.
    let idx = segs[0].with_extension("index");
    let mut ib = std::fs::read(&idx).unwrap();
    let n = ib.len();
    ib[n - 1] ^= 0xff;
    std::fs::write(&idx, &ib).unwrap();
    let before = snapshot_files(&pdir);
    let ins = inspect_partition(&pdir).unwrap();
    assert_eq!(snapshot_files(&pdir), before, "inspection changed files");
    assert_eq!(ins.worst(), Some(Severity::Corruption));
    let c = ins
        .findings
        .iter()
        .find(|f| f.severity == Severity::Corruption)
        .unwrap();
    assert_eq!(&c.path, sealed);
    assert!(c.position <= 200, "{c:?}");
    assert!(
        ins.findings
            .iter()
            .any(|f| f.severity == Severity::Repairable && f.path == idx),
        "{:?}",
        ins.findings
    );
}

#[test]
fn a_bad_tail_past_the_recovery_point_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    {
        let log = open_topic(dir.path(), TopicConfig::default());
        let p = log.partition("t", 0).unwrap();
        for i in 0..5 {
            p.append(&batch(&format!("x{i}"), 2, i)).unwrap();
        }
        copy_dir(dir.path(), crashed.path());
    }
    let seg = segment_files(&crashed.path().join("t/0")).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0xab; 37]);
    std::fs::write(&seg, &bytes).unwrap();
    let ins = inspect_partition(&crashed.path().join("t/0")).unwrap();
    assert_eq!(ins.worst(), Some(Severity::TornTail), "{:?}", ins.findings);
    assert_eq!(ins.findings[0].position, bytes.len() as u64 - 37);
}
