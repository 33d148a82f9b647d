//! fdatasyncs of one partition run one at a time (`sync_lock`, `partition/mod.rs`): a roll
//! that needs to sync the active segment while a group commit's fdatasync of the same handle
//! runs waits for it, and when that sync failed the roll's own success publishes nothing.
//!
//! Why: Linux reports a write-back error once per file description. Of two overlapping
//! fdatasyncs of one handle, the one that checks second can return success for pages that
//! failed (fsyncgate). The file system here is the real one wrapped so that every fdatasync
//! of a segment file (`*.log`) blocks until the test releases it, by the order the calls began,
//! with the result the test chooses: the second call's success models the consumed error.
//!
//! The gated file system ([`GateFs`], [`Gate`], [`Disarm`]) is shared with other modules'
//! tests that need a sync held open at a known point (`concurrency.rs`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use spool_io::{
    DirEntry, FdBudget, FileHandle, FileLock, FileSystem, MapAhead, Metadata, OpenMode,
};
use spool_log_engine::{
    BatchBuilder, Compression, Error, FsyncPolicy, Log, LogOptions, TopicConfig,
};

/// Segment fdatasyncs by the order they began: `begun` counts them, `released` holds the
/// result each is to return (an errno or success).
#[derive(Debug, Default)]
struct Gates {
    armed: bool,
    begun: usize,
    released: BTreeMap<usize, Option<i32>>,
}

#[derive(Debug, Default)]
pub(crate) struct Gate {
    state: Mutex<Gates>,
    cv: Condvar,
}

impl Gate {
    /// From now on every segment fdatasync waits at the gate.
    pub(crate) fn arm(&self) {
        self.state.lock().unwrap().armed = true;
    }

    fn pass(&self) -> Option<i32> {
        let mut st = self.state.lock().unwrap();
        if !st.armed {
            return None;
        }
        let ticket = st.begun;
        st.begun += 1;
        self.cv.notify_all();
        loop {
            if !st.armed {
                return None;
            }
            if let Some(r) = st.released.get(&ticket) {
                return *r;
            }
            st = self.cv.wait(st).unwrap();
        }
    }

    pub(crate) fn release(&self, ticket: usize, errno: Option<i32>) {
        self.state.lock().unwrap().released.insert(ticket, errno);
        self.cv.notify_all();
    }

    /// Waits (at most 10 s) until `n` syncs have begun.
    pub(crate) fn wait_begun(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut st = self.state.lock().unwrap();
        while st.begun < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {n} syncs: {st:?}");
            st = self.cv.wait_timeout(st, left).unwrap().0;
        }
    }

    pub(crate) fn begun(&self) -> usize {
        self.state.lock().unwrap().begun
    }
}

/// Disarms the gate when dropped, so no sync stays blocked (the log's close, a failed
/// assertion's leftovers).
pub(crate) struct Disarm(pub(crate) Arc<Gate>);

impl Drop for Disarm {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.armed = false;
        self.0.cv.notify_all();
    }
}

#[derive(Debug)]
pub(crate) struct GateFs {
    pub(crate) inner: Arc<dyn FileSystem>,
    pub(crate) gate: Arc<Gate>,
}

#[derive(Debug)]
struct GateFile {
    inner: Arc<dyn FileHandle>,
    gate: Option<Arc<Gate>>,
}

impl FileHandle for GateFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, pos)
    }
    fn write_all_at(&self, buf: &[u8], pos: u64) -> std::io::Result<()> {
        self.inner.write_all_at(buf, pos)
    }
    fn write_pair_at(&self, head: &[u8], tail: &[u8], pos: u64) -> std::io::Result<()> {
        self.inner.write_pair_at(head, tail, pos)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.inner.size()
    }
    fn sync_data(&self) -> std::io::Result<()> {
        if let Some(g) = &self.gate
            && let Some(errno) = g.pass()
        {
            return Err(std::io::Error::from_raw_os_error(errno));
        }
        self.inner.sync_data()
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.inner.sync_all()
    }
    fn map(
        &self,
        len: usize,
        keep_alive: Box<dyn std::any::Any + Send + Sync>,
    ) -> std::io::Result<Bytes> {
        self.inner.map(len, keep_alive)
    }
    fn map_ahead(
        &self,
        capacity: usize,
        keep_alive: Box<dyn std::any::Any + Send + Sync>,
    ) -> std::io::Result<Option<MapAhead>> {
        self.inner.map_ahead(capacity, keep_alive)
    }
}

impl FileSystem for GateFs {
    fn open(&self, path: &Path, mode: OpenMode) -> std::io::Result<Arc<dyn FileHandle>> {
        let inner = self.inner.open(path, mode)?;
        let gated = path.extension().is_some_and(|e| e == "log");
        Ok(Arc::new(GateFile {
            inner,
            gate: gated.then(|| self.gate.clone()),
        }))
    }
    fn metadata(&self, path: &Path) -> std::io::Result<Metadata> {
        self.inner.metadata(path)
    }
    fn read_dir(&self, path: &Path) -> std::io::Result<Vec<DirEntry>> {
        self.inner.read_dir(path)
    }
    fn create_dir(&self, path: &Path) -> std::io::Result<()> {
        self.inner.create_dir(path)
    }
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove_file(path)
    }
    fn remove_dir_all(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove_dir_all(path)
    }
    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        self.inner.sync_dir(path)
    }
    fn lock(&self, path: &Path, create: bool) -> std::io::Result<Option<Box<dyn FileLock>>> {
        self.inner.lock(path, create)
    }
    fn fd_budget(&self) -> Option<FdBudget> {
        self.inner.fd_budget()
    }
}

/// One batch of a single record with a `len`-byte value.
fn big_batch(len: usize) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(0, None, Some(&vec![b'x'; len]), &[]);
    b.finish().unwrap()
}

/// A log on the real file system with every segment fdatasync behind `gate` (not armed yet),
/// and topic "t" (`fsync = always`, one partition, segments of `segment_bytes`).
fn gated_log(dir: &Path, gate: &Arc<Gate>, segment_bytes: u64) -> Log {
    let fs = Arc::new(GateFs {
        inner: spool_io::real(),
        gate: gate.clone(),
    });
    let log = Log::open(
        dir,
        LogOptions {
            background_maintenance: false,
            fs,
            ..LogOptions::default()
        },
    )
    .unwrap();
    log.create_topic(
        "t",
        TopicConfig {
            fsync: FsyncPolicy::Always,
            segment_bytes,
            ..TopicConfig::default()
        },
    )
    .unwrap();
    log
}

/// A group commit's fdatasync fails while a roll waits to sync the same segment; the roll's
/// sync then succeeds (the error was reported to the first call only). Nothing may become
/// visible, both appends fail, and no sync overlaps another.
#[test]
fn a_roll_does_not_sync_beside_a_group_commit_nor_publish_after_its_failure() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    // The second batch does not fit beside the first: appending it rolls.
    let log = gated_log(dir.path(), &gate, 4096);
    let p = log.partition("t", 0).unwrap();
    gate.arm();
    let _disarm = Disarm(gate.clone());

    // A: appended, then its group commit's fdatasync (ticket 0) waits at the gate.
    let (tx, rx) = mpsc::channel();
    let pa = p.clone();
    let txa = tx.clone();
    std::thread::spawn(move || txa.send(("a", pa.append(&big_batch(3000)))).unwrap());
    gate.wait_begun(1);

    // B: its append rolls, and the roll must fdatasync the segment A's sync is syncing.
    let pb = p.clone();
    std::thread::spawn(move || tx.send(("b", pb.append(&big_batch(3000)))).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        gate.begun(),
        1,
        "the roll's fdatasync ran beside the group commit's, on the same handle"
    );

    // A's sync fails; the roll's sync, which can only begin now, succeeds (released ahead, so
    // nothing waits on the test if B was slow to reach the roll).
    gate.release(1, None);
    gate.release(0, Some(libc::EIO));

    let mut results = BTreeMap::new();
    for _ in 0..2 {
        let (who, r) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("an append neither returned nor failed");
        results.insert(who, r);
    }
    for (who, r) in &results {
        assert!(
            matches!(r, Err(Error::Poisoned { .. })),
            "append {who} after a failed fdatasync: {r:?}"
        );
    }
    assert_eq!(
        p.high_watermark(),
        0,
        "data covered by a failed fdatasync became visible"
    );
    assert!(p.is_poisoned());
    assert_eq!(gate.begun(), 2, "B's roll never ran its fdatasync");
}

/// A batch an fdatasync already covered stays acknowledged after a later sync fails: the
/// partition is poisoned for new work, but `wait_durable` for the durable batch answers Ok.
/// Reporting it failed would tell a producer that a write it will find after a restart was
/// lost (review of the offsets store, which keeps several batches in flight).
#[test]
fn a_batch_made_durable_before_a_failed_sync_stays_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let log = gated_log(dir.path(), &gate, TopicConfig::default().segment_bytes);
    let p = log.partition("t", 0).unwrap();
    // A: appended and fdatasync'd (the gate is not armed yet).
    let a = p.append(&big_batch(100)).unwrap().last_offset + 1;
    assert_eq!(p.high_watermark(), a);

    // B: its fdatasync fails, which poisons the partition.
    gate.arm();
    let _disarm = Disarm(gate.clone());
    gate.release(0, Some(libc::EIO));
    let b = p.append(&big_batch(100));
    assert!(matches!(b, Err(Error::Poisoned { .. })), "B: {b:?}");
    assert!(p.is_poisoned());

    // A is durable: asking for it again is not an error; asking past it is.
    p.wait_durable(a)
        .expect("a batch covered by a successful fdatasync reported as failed");
    assert!(matches!(p.wait_durable(a + 1), Err(Error::Poisoned { .. })));
}
