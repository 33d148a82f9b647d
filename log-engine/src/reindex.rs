//! Offline rebuild of the sparse indexes of sealed segments: what `spool inspect reindex` does.
//!
//! Unlike [`crate::inspect`], this writes, so it takes the data directory's lock first (the
//! one an open [`crate::Log`] holds; a running broker makes it fail with
//! [`Error::Locked`]). For every sealed segment of the partitions asked for it:
//!
//! 1. walks every batch of the `.log`, CRC-checking each one and checking that offsets continue
//!    (within the segment and from the previous segment);
//! 2. builds both indexes exactly as the writer does when appending (same `IndexBuilder`, the
//!    topic's `index_interval_bytes`), so an intact index comes back byte-identical;
//! 3. compares them with the files on disk; files that are already identical are left alone,
//!    others are written to a temporary sibling, fdatasync'd and renamed over the old file;
//!    the partition directory is fsynced once after its renames.
//!
//! Corruption stops a partition: the damaged segment gets no index (an index describes a
//! whole segment file, so a partial one would be refused anyway) and later segments of that
//! partition are not touched; the finding names the file, byte and offset. The active (last)
//! segment of a partition has no index files — its indexes live in memory and are rebuilt
//! when the log opens — and is skipped.
//!
//! With `dry_run` everything is checked and reported, nothing is written and the lock is only
//! tested (a missing lock file is not created).

use spool_io::{FileSystem, RealFs};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::fsutil;
use crate::index::{self, Kind};
use crate::segment;

/// What to reindex.
#[derive(Clone, Debug, Default)]
pub struct ReindexOptions {
    /// Only this topic (default: every topic).
    pub topic: Option<String>,
    /// Only this partition (of every topic selected).
    pub partition: Option<u32>,
    /// Check and report, write nothing.
    pub dry_run: bool,
}

/// The state of one index file before the rebuild.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexFileState {
    /// Valid and identical to what a rebuild produces.
    Current,
    /// Valid (CRCs, base offset and segment size match) but with other entries, e.g. written
    /// with another `index_interval_bytes`.
    Different,
    /// Missing, unreadable or failing a check; the reason.
    Invalid(String),
}

/// What happened to one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Both index files were already what a rebuild writes: left alone.
    Unchanged,
    /// At least one index file was rewritten.
    Rebuilt,
    /// Dry run: at least one index file would be rewritten.
    WouldRebuild,
    /// The active segment: no index files to write.
    Active,
    /// The segment is damaged; nothing was written for it or after it in the partition.
    Corrupt {
        /// Byte position of the damage in the `.log` file.
        position: u64,
        /// The offset expected there.
        offset: Option<u64>,
        /// What check failed.
        problem: String,
    },
    /// Not looked at: an earlier segment of the partition is corrupt.
    NotReached,
}

/// One segment's report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentReindex {
    /// The `.log` file.
    pub path: PathBuf,
    /// Base offset (from the file name).
    pub base_offset: u64,
    /// Size of the `.log` file.
    pub bytes: u64,
    /// Batches walked (for `Corrupt`, the good ones before the damage).
    pub batches: u64,
    /// Records in those batches.
    pub records: u64,
    /// Offset index entries built.
    pub offset_entries: usize,
    /// Time index entries built.
    pub time_entries: usize,
    /// The `.index` file before the rebuild (`None`: not examined).
    pub index: Option<IndexFileState>,
    /// The `.timeindex` file before the rebuild (`None`: not examined).
    pub timeindex: Option<IndexFileState>,
    /// What happened.
    pub outcome: Outcome,
}

/// One partition's report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionReindex {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: u32,
    /// The partition directory.
    pub dir: PathBuf,
    /// Its segments, oldest first.
    pub segments: Vec<SegmentReindex>,
}

impl PartitionReindex {
    /// True if a segment of this partition is corrupt.
    pub fn corrupt(&self) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s.outcome, Outcome::Corrupt { .. }))
    }
}

/// Rebuilds the index files of the sealed segments under the log directory `root` (see the
/// module docs). Fails with [`Error::Locked`] if a [`crate::Log`] has the directory open,
/// [`Error::TopicNotFound`] / [`Error::PartitionNotFound`] for a selection that does not
/// exist, and on I/O errors; corruption is reported per segment, not as an error.
pub fn reindex_log(root: &Path, opts: &ReindexOptions) -> Result<Vec<PartitionReindex>> {
    let fs: &dyn FileSystem = &RealFs;
    let is_file = |p: &Path| fs.metadata(p).is_ok_and(|m| !m.is_dir);
    if !fs.metadata(root).is_ok_and(|m| m.is_dir) {
        return Err(Error::io(
            "open directory",
            root,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let _lock = crate::log::lock_dir(fs, root, !opts.dry_run)?;
    let topics = match &opts.topic {
        Some(t) => {
            crate::log::validate_topic_name(t)?;
            if !is_file(&root.join(t).join(TOPIC_META)) {
                return Err(Error::TopicNotFound(t.clone()));
            }
            vec![t.clone()]
        }
        None => {
            let mut v: Vec<String> = fs
                .read_dir(root)
                .map_err(|e| Error::io("read directory", root, e))?
                .into_iter()
                .map(|e| e.name)
                .filter(|n| {
                    crate::log::validate_topic_name(n).is_ok()
                        && is_file(&root.join(n).join(TOPIC_META))
                })
                .collect();
            v.sort();
            v
        }
    };
    let mut out = Vec::new();
    for topic in topics {
        let tdir = root.join(&topic);
        let config = crate::log::read_config(fs, &tdir.join(TOPIC_META))?;
        let ids: Vec<u32> = match opts.partition {
            Some(p) if p < config.partitions => vec![p],
            Some(p) if opts.topic.is_some() => {
                return Err(Error::PartitionNotFound {
                    topic,
                    partition: p,
                });
            }
            Some(_) => Vec::new(),
            None => (0..config.partitions).collect(),
        };
        for id in ids {
            let dir = tdir.join(id.to_string());
            let segments = reindex_partition(fs, &dir, config.index_interval_bytes, opts.dry_run)?;
            out.push(PartitionReindex {
                topic: topic.clone(),
                partition: id,
                dir,
                segments,
            });
        }
    }
    Ok(out)
}

const TOPIC_META: &str = "topic.json";

/// Reindexes one partition directory; the caller holds the lock.
fn reindex_partition(
    fs: &dyn FileSystem,
    dir: &Path,
    interval: u32,
    dry_run: bool,
) -> Result<Vec<SegmentReindex>> {
    let mut bases = Vec::new();
    for entry in fs
        .read_dir(dir)
        .map_err(|e| Error::io("read directory", dir, e))?
    {
        if let Some(base) = segment::parse_log_name(&entry.name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    // Segments below it may have been compacted: offsets may skip (see `crate::compact`).
    let sparse_below = crate::compact::state::State::read(fs, dir)?.sparse_below;
    let mut out = Vec::with_capacity(bases.len());
    let mut expect_next: Option<u64> = None;
    let mut stopped = false;
    let mut renamed = false;
    for (i, &base) in bases.iter().enumerate() {
        let path = dir.join(segment::log_name(base));
        let mut seg = SegmentReindex {
            path: path.clone(),
            base_offset: base,
            bytes: fs
                .metadata(&path)
                .map_err(|e| Error::io("stat", &path, e))?
                .len,
            batches: 0,
            records: 0,
            offset_entries: 0,
            time_entries: 0,
            index: None,
            timeindex: None,
            outcome: Outcome::NotReached,
        };
        if stopped {
            out.push(seg);
            continue;
        }
        if i + 1 == bases.len() {
            seg.outcome = Outcome::Active;
            out.push(seg);
            continue;
        }
        let gap_ok = i > 0 && bases[i - 1] < sparse_below;
        if let Some(n) = expect_next.filter(|&n| n > base || (n != base && !gap_ok)) {
            seg.outcome = Outcome::Corrupt {
                position: 0,
                offset: Some(n),
                problem: format!("segment starts at offset {base}, the previous one ends at {n}"),
            };
            stopped = true;
            out.push(seg);
            continue;
        }
        let data = segment::read_segment_file(fs, &path)?;
        seg.bytes = data.len() as u64;
        let found: Vec<(u64, u64)> = bases.iter().map(|&b| (b, 0)).collect();
        let chain = crate::compact::chain_of(&found, i, sparse_below);
        let built = match segment::build_index(&path, &data, base, interval, chain, true) {
            Ok(b) => b,
            Err(Error::Corruption {
                position,
                offset,
                reason,
                ..
            }) => {
                // Count what is good before the damage, for the report.
                let w = segment::walk_chain(&data, 0, position, base, chain, true, |_, h| {
                    seg.batches += 1;
                    seg.records += h.records_count.max(0) as u64;
                });
                debug_assert!(w.stopped.is_none());
                seg.outcome = Outcome::Corrupt {
                    position,
                    offset,
                    problem: reason,
                };
                stopped = true;
                out.push(seg);
                continue;
            }
            Err(e) => return Err(e),
        };
        seg.batches = built.batches;
        seg.records = built.records;
        seg.offset_entries = built.offsets.len() / index::OFFSET_ENTRY;
        seg.time_entries = built.times.len() / index::TIME_ENTRY;
        expect_next = Some(built.summary.last_offset + 1);
        let (offsets, times) = built.encode();
        let index_path = path.with_extension("index");
        let time_path = path.with_extension("timeindex");
        let index_state = state(fs, &index_path, Kind::Offset, &offsets, base, seg.bytes);
        let time_state = state(fs, &time_path, Kind::Time, &times, base, seg.bytes);
        let files = [
            (&index_state, &index_path, &offsets, Kind::Offset),
            (&time_state, &time_path, &times, Kind::Time),
        ];
        seg.outcome = if files.iter().all(|f| *f.0 == IndexFileState::Current) {
            Outcome::Unchanged
        } else if dry_run {
            Outcome::WouldRebuild
        } else {
            for (s, p, bytes, kind) in files {
                if *s != IndexFileState::Current {
                    // The image must pass the same checks the engine applies when loading.
                    index::decode_file(p, kind, bytes, base, seg.bytes)?;
                    fsutil::write_replace(fs, p, bytes)?;
                    renamed = true;
                }
            }
            Outcome::Rebuilt
        };
        seg.index = Some(index_state);
        seg.timeindex = Some(time_state);
        out.push(seg);
    }
    if renamed {
        fsutil::sync_dir(fs, dir)?;
    }
    Ok(out)
}

/// How the index file at `path` compares with the rebuilt image `want`.
fn state(
    fs: &dyn FileSystem,
    path: &Path,
    kind: Kind,
    want: &[u8],
    base: u64,
    size: u64,
) -> IndexFileState {
    let max = segment::max_index_file_bytes(size);
    let have = match fs.read_at_most(path, max) {
        Ok(h) if h.len() > max => {
            return IndexFileState::Invalid(format!(
                "index file larger than any index of this segment ({max} bytes)"
            ));
        }
        Ok(h) => h,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return IndexFileState::Invalid("missing".into());
        }
        Err(e) => return IndexFileState::Invalid(format!("cannot read: {e}")),
    };
    if have == want {
        return IndexFileState::Current;
    }
    match index::decode_file(path, kind, &have, base, size) {
        Ok(_) => IndexFileState::Different,
        Err(Error::Corruption { reason, .. }) => IndexFileState::Invalid(reason),
        Err(e) => IndexFileState::Invalid(e.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // damages files on purpose
mod tests {
    use std::fs;

    use super::*;
    use crate::{BatchBuilder, Compression, Log, LogOptions, TopicConfig};

    fn opts() -> LogOptions {
        LogOptions {
            background_maintenance: false,
            ..LogOptions::default()
        }
    }

    /// A topic with small segments: 300 batches of one record, timestamps 1000, 1010, …
    fn write(dir: &Path, interval: u32) {
        let log = Log::open(dir, opts()).unwrap();
        log.create_topic(
            "t",
            TopicConfig {
                partitions: 2,
                segment_bytes: 8192,
                index_interval_bytes: interval,
                ..TopicConfig::default()
            },
        )
        .unwrap();
        for p in 0..2 {
            let part = log.partition("t", p).unwrap();
            for i in 0..300i64 {
                let mut b = BatchBuilder::new(Compression::None);
                b.push(1000 + 10 * i, Some(b"k"), Some(&[b'v'; 40]), &[]);
                part.append(&b.finish().unwrap()).unwrap();
            }
        }
        log.close().unwrap();
    }

    fn seg(dir: &Path, p: u32, n: usize) -> PathBuf {
        let pdir = dir.join("t").join(p.to_string());
        let mut logs: Vec<_> = fs::read_dir(&pdir)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                segment::parse_log_name(&name).map(|_| pdir.join(name))
            })
            .collect();
        logs.sort();
        logs[n].clone()
    }

    fn count(r: &[PartitionReindex], f: impl Fn(&Outcome) -> bool) -> usize {
        r.iter()
            .flat_map(|p| &p.segments)
            .filter(|s| f(&s.outcome))
            .count()
    }

    #[test]
    fn intact_indexes_come_back_identical_and_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 256);
        let before = fs::read(seg(dir.path(), 0, 1).with_extension("index")).unwrap();
        let r = reindex_log(dir.path(), &ReindexOptions::default()).unwrap();
        assert_eq!(r.len(), 2);
        let sealed = count(&r, |o| *o == Outcome::Unchanged);
        assert!(sealed >= 4, "{r:#?}");
        assert_eq!(count(&r, |o| *o == Outcome::Active), 2);
        assert_eq!(count(&r, |o| *o == Outcome::Rebuilt), 0, "{r:#?}");
        let s = &r[0].segments[1];
        assert!(
            s.offset_entries > 1 && s.time_entries > 1 && s.records > 0,
            "{s:?}"
        );
        assert_eq!(s.index, Some(IndexFileState::Current));
        assert_eq!(
            fs::read(seg(dir.path(), 0, 1).with_extension("index")).unwrap(),
            before
        );
    }

    #[test]
    fn missing_damaged_and_different_indexes_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 256);
        let s0 = seg(dir.path(), 0, 0);
        let s1 = seg(dir.path(), 0, 1);
        let good0 = fs::read(s0.with_extension("index")).unwrap();
        let good1 = fs::read(s1.with_extension("timeindex")).unwrap();
        fs::remove_file(s0.with_extension("index")).unwrap();
        let mut t = good1.clone();
        let last = t.len() - 1;
        t[last] ^= 0x40;
        fs::write(s1.with_extension("timeindex"), &t).unwrap();

        // Dry run: reported, nothing written, no lock file needed.
        fs::remove_file(dir.path().join(".lock")).unwrap();
        let only_p0 = ReindexOptions {
            topic: Some("t".into()),
            partition: Some(0),
            dry_run: true,
        };
        let r = reindex_log(dir.path(), &only_p0).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].segments[0].outcome, Outcome::WouldRebuild);
        assert_eq!(
            r[0].segments[0].index,
            Some(IndexFileState::Invalid("missing".into()))
        );
        assert_eq!(r[0].segments[0].timeindex, Some(IndexFileState::Current));
        assert!(matches!(
            r[0].segments[1].timeindex,
            Some(IndexFileState::Invalid(ref why)) if why.contains("CRC")
        ));
        assert!(!s0.with_extension("index").exists());
        assert!(!dir.path().join(".lock").exists());

        let r = reindex_log(
            dir.path(),
            &ReindexOptions {
                dry_run: false,
                ..only_p0
            },
        )
        .unwrap();
        assert_eq!(r[0].segments[0].outcome, Outcome::Rebuilt);
        assert_eq!(r[0].segments[1].outcome, Outcome::Rebuilt);
        assert_eq!(fs::read(s0.with_extension("index")).unwrap(), good0);
        assert_eq!(fs::read(s1.with_extension("timeindex")).unwrap(), good1);
        assert!(
            !dir.path().join("t/0").read_dir().unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp"))
        );

        // A valid index written with another interval is rewritten with the topic's.
        let path = dir.path().join("t/topic.json");
        let mut cfg = crate::topic_file::decode(&path, &fs::read(&path).unwrap()).unwrap();
        cfg.index_interval_bytes = 1024;
        fs::write(&path, crate::topic_file::encode(&cfg).unwrap()).unwrap();
        let r = reindex_log(dir.path(), &ReindexOptions::default()).unwrap();
        assert_eq!(r[1].segments[0].index, Some(IndexFileState::Different));
        assert_eq!(r[1].segments[0].outcome, Outcome::Rebuilt);
        let r = reindex_log(dir.path(), &ReindexOptions::default()).unwrap();
        assert_eq!(count(&r, |o| *o == Outcome::Rebuilt), 0);

        // The engine opens the result and finds offsets and timestamps through the indexes.
        let log = Log::open(dir.path(), opts()).unwrap();
        for p in 0..2 {
            let part = log.partition("t", p).unwrap();
            for off in [0u64, 1, 57, 150, 299] {
                let read = part.read(off, 1 << 16).unwrap();
                let b = read.batches().next().unwrap().unwrap();
                assert_eq!(b.header().base_offset, off);
            }
            assert_eq!(part.offset_for_timestamp(1000).unwrap(), Some(0));
            assert_eq!(part.offset_for_timestamp(1005).unwrap(), Some(1));
            assert_eq!(part.offset_for_timestamp(2500).unwrap(), Some(150));
            assert_eq!(part.offset_for_timestamp(1000 + 2990).unwrap(), Some(299));
        }
        log.close().unwrap();
    }

    #[test]
    fn the_engines_own_rebuild_uses_the_topics_interval_too() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 256);
        let s1 = seg(dir.path(), 0, 1);
        let good = fs::read(s1.with_extension("index")).unwrap();
        fs::remove_file(s1.with_extension("index")).unwrap();
        let log = Log::open(dir.path(), opts()).unwrap();
        let p = log.partition("t", 0).unwrap();
        let base = segment::parse_log_name(&s1.file_name().unwrap().to_string_lossy()).unwrap();
        p.read(base + 3, 1024).unwrap();
        log.close().unwrap();
        drop(log);
        assert_eq!(fs::read(s1.with_extension("index")).unwrap(), good);
    }

    #[test]
    fn corruption_stops_the_partition_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 256);
        let s1 = seg(dir.path(), 1, 1);
        let s2 = seg(dir.path(), 1, 2);
        fs::remove_file(s1.with_extension("index")).unwrap();
        fs::remove_file(s2.with_extension("index")).unwrap();
        let mut bytes = fs::read(&s1).unwrap();
        bytes[500] ^= 0x01;
        fs::write(&s1, &bytes).unwrap();
        let r = reindex_log(dir.path(), &ReindexOptions::default()).unwrap();
        assert!(!r[0].corrupt());
        assert!(r[1].corrupt());
        let Outcome::Corrupt {
            position, offset, ..
        } = &r[1].segments[1].outcome
        else {
            panic!("{r:#?}")
        };
        assert!(*position <= 500 && offset.is_some(), "{r:#?}");
        assert!(r[1].segments[1].batches > 0);
        assert_eq!(r[1].segments[2].outcome, Outcome::NotReached);
        // Neither the damaged segment nor the later one got an index.
        assert!(!s1.with_extension("index").exists());
        assert!(!s2.with_extension("index").exists());
    }

    #[test]
    fn refuses_a_directory_an_open_log_holds() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 4096);
        let log = Log::open(dir.path(), opts()).unwrap();
        for dry_run in [false, true] {
            let e = reindex_log(
                dir.path(),
                &ReindexOptions {
                    dry_run,
                    ..ReindexOptions::default()
                },
            )
            .unwrap_err();
            assert!(matches!(e, Error::Locked(_)), "{e}");
        }
        log.close().unwrap();
        drop(log);
        reindex_log(dir.path(), &ReindexOptions::default()).unwrap();
        // And the lock was released: the log opens again.
        Log::open(dir.path(), opts()).unwrap().close().unwrap();
    }

    #[test]
    fn unknown_selections_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 4096);
        let e = reindex_log(
            dir.path(),
            &ReindexOptions {
                topic: Some("nope".into()),
                ..ReindexOptions::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, Error::TopicNotFound(_)), "{e}");
        let e = reindex_log(
            dir.path(),
            &ReindexOptions {
                topic: Some("t".into()),
                partition: Some(7),
                ..ReindexOptions::default()
            },
        )
        .unwrap_err();
        assert!(matches!(e, Error::PartitionNotFound { .. }), "{e}");
        assert!(reindex_log(&dir.path().join("missing"), &ReindexOptions::default()).is_err());
    }
}
