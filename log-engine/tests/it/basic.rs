//! Append, read, roll, reopen: the everyday paths.

use std::any::Any;
use std::io;
use std::path::Path;

use bytes::Bytes;
use spool_io::{FileHandle, FileSystem, OpenMode};
use spool_log_engine::{Error, FsyncPolicy, Log, LogOptions, TopicConfig};

use crate::common::{batch, open_topic, read_all};

#[test]
fn append_read_roll_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = TopicConfig {
        segment_bytes: 4096,
        index_interval_bytes: 256,
        ..TopicConfig::default()
    };
    let mut expected = Vec::new();
    {
        let log = open_topic(dir.path(), cfg.clone());
        let p = log.partition("t", 0).unwrap();
        for i in 0..200 {
            let info = p.append(&batch(&format!("b{i}"), 3, 1000 + i)).unwrap();
            assert_eq!(info.base_offset, i as u64 * 3);
            assert_eq!(info.last_offset, i as u64 * 3 + 2);
            for j in 0..3 {
                expected.push(format!("b{i}-{j}"));
            }
        }
        assert!(
            p.segment_bases().len() > 5,
            "segments rolled: {:?}",
            p.segment_bases()
        );
        assert_eq!(p.high_watermark(), 600);
        let got: Vec<_> = read_all(&p, 0)
            .iter()
            .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(got, expected);
        // Reads from the middle of a batch start at that batch.
        let r = p.read(301, 1).unwrap();
        let first = r.batches().next().unwrap().unwrap();
        assert_eq!(first.header().base_offset, 300);
        assert_eq!(r.next_offset, 303);
        assert!(matches!(
            p.read(601, 10),
            Err(Error::OffsetOutOfRange { .. })
        ));
        assert!(p.read(600, 10).unwrap().data.is_empty());
        assert_eq!(p.offset_for_timestamp(1000 + 150).unwrap(), Some(450));
        assert_eq!(p.offset_for_timestamp(0).unwrap(), Some(0));
        assert_eq!(p.offset_for_timestamp(5000).unwrap(), None);
        log.close().unwrap();
    }
    let log = open_topic(dir.path(), cfg);
    for (_, _, r) in log.recovery_reports() {
        assert_eq!(r.bytes_scanned, 0, "clean shutdown: nothing to scan");
    }
    let p = log.partition("t", 0).unwrap();
    assert_eq!(p.high_watermark(), 600);
    let got: Vec<_> = read_all(&p, 0)
        .iter()
        .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(got, expected);
    assert_eq!(p.offset_for_timestamp(1000 + 150).unwrap(), Some(450));
    assert_eq!(p.append(&batch("after", 1, 5)).unwrap().base_offset, 600);
}

#[test]
fn policies_all_append_and_read() {
    for fsync in [
        FsyncPolicy::Always,
        FsyncPolicy::Never,
        FsyncPolicy::Interval { interval_ms: 5 },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = open_topic(
            dir.path(),
            TopicConfig {
                fsync,
                ..TopicConfig::default()
            },
        );
        let p = log.partition("t", 0).unwrap();
        for i in 0..10 {
            p.append(&batch("x", 2, i)).unwrap();
        }
        assert_eq!(read_all(&p, 0).len(), 20, "{fsync}");
    }
}

#[test]
fn append_nowait_is_visible_under_fsync_always_only_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_topic(dir.path(), TopicConfig::default());
    let p = log.partition("t", 0).unwrap();
    let info = p.append_nowait(&batch("a", 2, 1)).unwrap();
    assert_eq!(p.high_watermark(), 0, "not durable yet, so not visible");
    assert!(p.read(0, 1024).unwrap().data.is_empty());
    p.wait_durable(info.last_offset + 1).unwrap();
    assert_eq!(p.high_watermark(), 2);
    assert_eq!(read_all(&p, 0).len(), 2);
    // Under fsync = never, wait_durable forces an fdatasync too.
    let log2dir = tempfile::tempdir().unwrap();
    let log2 = open_topic(
        log2dir.path(),
        TopicConfig {
            fsync: FsyncPolicy::Never,
            ..TopicConfig::default()
        },
    );
    let q = log2.partition("t", 0).unwrap();
    let info = q.append(&batch("b", 1, 1)).unwrap();
    assert_eq!(q.high_watermark(), 1, "visible at once under never");
    q.wait_durable(info.last_offset + 1).unwrap();
}

/// A gzip batch that claims `count` records: Spool stores gzip without decoding it, checking
/// only that its bytes could expand to that many records (7 bytes each, at DEFLATE's largest
/// ratio of 1032), so a payload of `count * 7 / 1032` bytes of anything is accepted. Used to
/// move offsets fast (LZ4 and zstd batches are decompressed on append and must hold their
/// records).
fn claiming(count: i32) -> Vec<u8> {
    let payload = (count as usize * 7).div_ceil(1032);
    let mut v = vec![0u8; 61];
    v[12..16].copy_from_slice(&(-1i32).to_be_bytes());
    v[16] = 2; // magic
    v[21..23].copy_from_slice(&1i16.to_be_bytes()); // gzip
    v[23..27].copy_from_slice(&(count - 1).to_be_bytes());
    v[43..51].copy_from_slice(&(-1i64).to_be_bytes());
    v[51..53].copy_from_slice(&(-1i16).to_be_bytes());
    v[53..57].copy_from_slice(&(-1i32).to_be_bytes());
    v[57..61].copy_from_slice(&count.to_be_bytes());
    v.extend(std::iter::repeat_n(0x1f, payload));
    let len = (v.len() - 12) as i32;
    v[8..12].copy_from_slice(&len.to_be_bytes());
    let crc = spool_log_engine::batch::batch_crc(&v);
    v[17..21].copy_from_slice(&crc.to_be_bytes());
    v
}

#[test]
fn segments_roll_before_relative_offsets_overflow() {
    // Regression (found by the format-doc review): a segment spanning more than 2^32 offsets
    // made index lookups wrap and reads of valid offsets fail. Like Kafka, roll at i32::MAX.
    let dir = tempfile::tempdir().unwrap();
    let log = open_topic(
        dir.path(),
        TopicConfig {
            fsync: FsyncPolicy::Never,
            ..TopicConfig::default()
        },
    );
    let p = log.partition("t", 0).unwrap();
    let batch = claiming(1 << 20);
    let n = 4200u64;
    for _ in 0..n {
        p.append(&batch).unwrap();
    }
    let bases = p.segment_bases();
    assert!(bases.len() >= 2, "{bases:?}");
    for w in bases.windows(2) {
        assert!(w[1] - w[0] <= i32::MAX as u64 + 1, "{bases:?}");
    }
    // Every batch is readable at its offset, across the boundaries.
    for k in [0, 2047, 2048, 2049, 4095, 4096, n - 1] {
        let off = k << 20;
        let r = p.read(off + 7, 1).unwrap();
        let b = r.batches().next().unwrap().unwrap();
        assert_eq!(b.header().base_offset, off, "batch {k}");
    }
}

#[test]
fn log_append_time_batches_decode_with_the_batch_timestamp() {
    let mut b = spool_log_engine::BatchBuilder::new(spool_log_engine::Compression::None);
    b.push(10, None, Some(b"a"), &[]);
    b.push(20, None, Some(b"b"), &[]);
    let mut v = b.finish().unwrap().to_vec();
    v[22] |= 0x08; // timestamp type: LogAppendTime
    v[35..43].copy_from_slice(&999i64.to_be_bytes());
    let crc = spool_log_engine::batch::batch_crc(&v);
    v[17..21].copy_from_slice(&crc.to_be_bytes());
    let batch = spool_log_engine::Batch::new(bytes::Bytes::from(v), &Default::default()).unwrap();
    let ts: Vec<i64> = batch
        .records(&Default::default())
        .unwrap()
        .map(|r| r.unwrap().timestamp)
        .collect();
    assert_eq!(ts, vec![999, 999]);
}

#[test]
fn a_cut_tail_is_kept_aside_not_silently_dropped() {
    // Data past the recovery point that fails its check is cut (it is most likely a torn
    // write), but the cut bytes are saved next to the segment and named in the report.
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    {
        let log = open_topic(dir.path(), TopicConfig::default());
        let p = log.partition("t", 0).unwrap();
        for i in 0..5 {
            p.append(&batch(&format!("x{i}"), 2, i)).unwrap();
        }
        // A copy taken while the log is open: everything lies past the recovery point.
        crate::common::copy_dir(dir.path(), crashed.path());
    }
    let seg = crate::common::segment_files(&crashed.path().join("t/0"))
        .pop()
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    let spans = crate::common::batch_spans(&bytes);
    let damaged = spans[3].pos as usize;
    let original_tail = bytes[damaged..].to_vec();
    bytes[damaged + 40] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let log = spool_log_engine::Log::open(crashed.path(), crate::common::opts()).unwrap();
    let r = crate::common::report(&log, 0);
    assert_eq!(r.bytes_truncated as usize, original_tail.len());
    assert_eq!(r.quarantined.len(), 1);
    let mut saved = std::fs::read(&r.quarantined[0]).unwrap();
    saved[40] ^= 0x10;
    assert_eq!(saved, original_tail, "the cut bytes are kept exactly");
    assert_eq!(log.partition("t", 0).unwrap().high_watermark(), 6);
}

/// Write-back hints seen by [`Recording`]: (thread name, file name, position, length).
type Hints = std::sync::Arc<std::sync::Mutex<Vec<(String, String, u64, u64)>>>;

/// The real file system, recording every `start_writeback` call and the thread that made it.
#[derive(Debug)]
struct Recording {
    hints: Hints,
}

#[derive(Debug)]
struct RecordingFile {
    inner: std::sync::Arc<dyn FileHandle>,
    name: String,
    hints: Hints,
}

impl FileSystem for Recording {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<std::sync::Arc<dyn FileHandle>> {
        Ok(std::sync::Arc::new(RecordingFile {
            inner: spool_io::RealFs.open(path, mode)?,
            name: path.file_name().unwrap().to_string_lossy().into_owned(),
            hints: self.hints.clone(),
        }))
    }
    fn metadata(&self, path: &Path) -> io::Result<spool_io::Metadata> {
        spool_io::RealFs.metadata(path)
    }
    fn read_dir(&self, path: &Path) -> io::Result<Vec<spool_io::DirEntry>> {
        spool_io::RealFs.read_dir(path)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        spool_io::RealFs.create_dir(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        spool_io::RealFs.create_dir_all(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        spool_io::RealFs.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        spool_io::RealFs.remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        spool_io::RealFs.remove_dir_all(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        spool_io::RealFs.sync_dir(path)
    }
    fn lock(&self, path: &Path, create: bool) -> io::Result<Option<Box<dyn spool_io::FileLock>>> {
        spool_io::RealFs.lock(path, create)
    }
    fn fd_budget(&self) -> Option<spool_io::FdBudget> {
        spool_io::RealFs.fd_budget()
    }
}

impl FileHandle for RecordingFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.inner.read_at(buf, pos)
    }
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.inner.write_all_at(buf, pos)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.inner.sync_all()
    }
    fn start_writeback(&self, pos: u64, len: u64) -> io::Result<()> {
        let thread = std::thread::current().name().unwrap_or("").to_owned();
        self.hints
            .lock()
            .unwrap()
            .push((thread, self.name.clone(), pos, len));
        self.inner.start_writeback(pos, len)
    }
    fn map(&self, len: usize, keep_alive: Box<dyn Any + Send + Sync>) -> io::Result<Bytes> {
        self.inner.map(len, keep_alive)
    }
    fn map_ahead(
        &self,
        capacity: usize,
        keep_alive: Box<dyn Any + Send + Sync>,
    ) -> io::Result<Option<spool_io::MapAhead>> {
        self.inner.map_ahead(capacity, keep_alive)
    }
}

/// Early write-back (`partition/writer.rs`, `writeback.rs`): under `fsync = never`, every 4 MiB
/// appended to the active segment has its write-back started by the log's write-back thread,
/// never by the appending thread, so `try_append_nowait` (the runtime-thread path) takes every
/// append (no roll is due here); every byte stays readable in order, and a reopen finds all of
/// it. Under `fsync = always` no write-back is started.
#[test]
fn write_back_is_started_on_its_own_thread_every_few_mib() {
    let dir = tempfile::tempdir().unwrap();
    let hints: Hints = Default::default();
    let opts = || LogOptions {
        fs: std::sync::Arc::new(Recording {
            hints: hints.clone(),
        }),
        ..crate::common::opts()
    };
    let value = vec![0x42u8; 300 << 10];
    let big = |i: i64| {
        let mut b = spool_log_engine::BatchBuilder::new(spool_log_engine::Compression::None);
        b.push(i, None, Some(&value), &[]);
        b.finish().unwrap()
    };
    let len = big(0).len() as u64;
    {
        let log = Log::open(dir.path(), opts()).unwrap();
        log.create_topic(
            "t",
            TopicConfig {
                fsync: FsyncPolicy::Never,
                ..TopicConfig::default()
            },
        )
        .unwrap();
        let p = log.partition("t", 0).unwrap();
        for i in 0..40i64 {
            let r = p
                .try_append_nowait(&big(i))
                .expect("never declined: no roll due, write-back is not the appender's");
            assert_eq!(r.unwrap().base_offset, i as u64);
        }
        assert_eq!(p.high_watermark(), 40, "fsync = never: readable at once");
        // ~12 MiB appended: write-back started twice, each time for the bytes since the last
        // start once they reached 4 MiB, on the write-back thread (it may still be queued).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while hints.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let seen = hints.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        let mut from = 0;
        for (thread, file, pos, n) in &seen {
            assert_eq!(thread, "spool-writeback", "{seen:?}");
            assert_eq!(file, "00000000000000000000.log", "{seen:?}");
            assert_eq!(*pos, from, "{seen:?}");
            assert!(*n >= 4 << 20 && *n < (4 << 20) + len, "{seen:?}");
            from += n;
        }
        log.close().unwrap();
    }
    let log = open_topic(dir.path(), TopicConfig::default());
    let p = log.partition("t", 0).unwrap();
    assert_eq!(p.high_watermark(), 40);
    let got = read_all(&p, 0);
    assert_eq!(got.len(), 40);
    assert!(got.iter().all(|r| r.value.as_deref() == Some(&value[..])));
    drop(log);

    // fsync = always: its group commits keep little dirty; no write-back is started.
    hints.lock().unwrap().clear();
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    log.create_topic("t", TopicConfig::default()).unwrap();
    let p = log.partition("t", 0).unwrap();
    for i in 0..20i64 {
        let r = p.try_append_nowait(&big(i)).expect("no roll due");
        let info = r.unwrap();
        p.wait_durable(info.last_offset + 1).unwrap();
    }
    log.close().unwrap();
    assert!(hints.lock().unwrap().is_empty());
}

/// A handle to a partition held across the delete of its topic (a broker's subscription, or
/// an append that looked the partition up just before): its reads, appends and durability
/// waits fail with `TopicDeleted`, not `Closed` (which means the log was closed), and a
/// waiter for new data returns at once instead of waiting for data that will never come. A
/// topic created again under the name is a new one; the old handle stays deleted. Closing
/// the log still answers `Closed`.
#[test]
fn a_handle_held_across_a_delete_says_the_topic_was_deleted() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    let dir = tempfile::tempdir().unwrap();
    let cfg = TopicConfig {
        fsync: FsyncPolicy::Never,
        ..TopicConfig::default()
    };
    let log = open_topic(dir.path(), cfg.clone());
    let old = log.partition("t", 0).unwrap();
    let info = old.append_nowait(&batch("a", 1, 1000)).unwrap();
    let mut cx = Context::from_waker(Waker::noop());
    let mut waiting = std::pin::pin!(old.data_available(old.high_watermark()));
    assert!(waiting.as_mut().poll(&mut cx).is_pending());
    // Not durable yet (fsync = never, nothing synced): the wait is still open at the delete.
    let mut durable = std::pin::pin!(old.durable(info.last_offset + 1));
    assert!(durable.as_mut().poll(&mut cx).is_pending());
    assert!(old.closed_error().is_none());

    log.delete_topic("t").unwrap();
    log.create_topic("t", cfg).unwrap();
    let new = log.partition("t", 0).unwrap();
    new.append(&batch("new", 1, 2000)).unwrap();

    let deleted =
        |e: &Error| matches!(e, Error::TopicDeleted { topic, partition: 0 } if topic == "t");
    assert!(old.is_deleted());
    assert!(old.closed_error().is_some_and(|e| deleted(&e)));
    assert!(
        matches!(waiting.as_mut().poll(&mut cx), Poll::Ready(1)),
        "a data waiter returns once the partition is gone"
    );
    assert!(
        std::pin::pin!(old.data_available(1))
            .poll(&mut cx)
            .is_ready(),
        "and later waits return at once"
    );
    match durable.as_mut().poll(&mut cx) {
        Poll::Ready(Err(e)) => assert!(deleted(&e), "{e:?}"),
        other => panic!("the durability wait must fail with TopicDeleted: {other:?}"),
    }
    let e = old.append_nowait(&batch("late", 1, 3000)).unwrap_err();
    assert!(deleted(&e), "{e:?}");
    let e = old.read(0, 1 << 20).unwrap_err();
    assert!(deleted(&e), "{e:?}");
    assert_eq!(
        e.to_string(),
        "topic t was deleted: partition t/0 no longer exists"
    );
    // The new topic is another one: its data is not the old handle's.
    assert!(!new.is_deleted());
    assert_eq!(read_all(&new, 0).len(), 1);

    // Closing the log is not a delete.
    log.close().unwrap();
    assert!(matches!(new.closed_error(), Some(Error::Closed)));
    assert!(matches!(
        new.append_nowait(&batch("after", 1, 4000)),
        Err(Error::Closed)
    ));
}
