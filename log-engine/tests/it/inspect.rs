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

/// Sets `path`'s length to 64 GiB without writing (a sparse file: what a damaged inode size,
/// or a stray file, can look like).
fn make_huge(path: &std::path::Path) {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
}

/// Finding 5 of review-audit-engine: files whose format bounds their size are read bounded,
/// before anything is allocated. Before the fix a 64 GiB `topic.json` or index made the read
/// allocate 64 GiB first (on this 24 GiB machine: "memory allocation failed", the process
/// aborted; the test binary died).
#[test]
fn oversized_metadata_and_index_files_are_refused_unread() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    written_log(dir.path());
    let pdir = dir.path().join("t/0");
    // An index: a finding of `inspect`, the index rebuilt by the log when used.
    let idx = segment_files(&pdir)[0].with_extension("index");
    make_huge(&idx);
    let ins = inspect_partition(&pdir).unwrap();
    assert!(
        ins.findings
            .iter()
            .any(|f| f.path == idx && f.severity == Severity::Repairable),
        "{:?}",
        ins.findings
    );
    // cleaner-state: read as damaged (every segment possibly compacted, nothing clean).
    make_huge(&pdir.join("cleaner-state"));
    // The recovery point: only its two slots are read.
    make_huge(&pdir.join("recovery-point"));
    assert!(inspect_partition(&pdir).unwrap().recovery_point.is_some());
    {
        let log = spool_log_engine::Log::open(dir.path(), crate::common::opts()).unwrap();
        let p = log.partition("t", 0).unwrap();
        assert_eq!(crate::common::read_all(&p, 0).len(), 360);
    }
    // topic.json: the log refuses to open, naming it.
    make_huge(&dir.path().join("t/topic.json"));
    let err = spool_log_engine::Log::open(dir.path(), crate::common::opts()).unwrap_err();
    assert!(
        matches!(&err, spool_log_engine::Error::Corruption { path, .. } if path.ends_with("t/topic.json")),
        "{err}"
    );
    // A segment longer than any segment can be: the offline tools refuse it unread.
    let seg = segment_files(&pdir)[1].clone();
    make_huge(&seg);
    let err = inspect_partition(&pdir).unwrap_err();
    assert!(
        matches!(&err, spool_log_engine::Error::Corruption { path, .. } if *path == seg),
        "{err}"
    );
    let mut batches = 0;
    assert!(spool_log_engine::inspect::dump_segment(&seg, |_, _| batches += 1).is_err());
    assert_eq!(batches, 0);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}
