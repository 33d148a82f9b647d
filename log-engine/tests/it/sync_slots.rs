//! The group commit's sync slots under `fsync = always` (`Partition::sync_behind`,
//! `sync_behind_covered`, `wait_durable`): a batch appended while an fdatasync runs gets a
//! sync of its own at once, through a handle of its own, and is visible only once a sync that
//! started after its append has returned; syncs may end in any order; a failed one poisons.
//!
//! The file system is the real one wrapped so that every `fdatasync` of a segment file
//! (`*.log`) blocks until the test releases it by its ticket (the order the calls began), and
//! records which handle it went through, so what runs at once is decided by the test, not by
//! timing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use spool_io::{
    DirEntry, FdBudget, FileHandle, FileLock, FileSystem, MapAhead, Metadata, OpenMode,
};
use spool_log_engine::{FsyncPolicy, Log, LogOptions, Partition, TopicConfig};

use crate::common::batch;

/// Tickets of segment fdatasyncs: begun (ticket → handle id), released (ticket → the result
/// to return).
#[derive(Debug, Default)]
struct Gates {
    /// Until set, syncs pass at once and take no ticket.
    armed: bool,
    begun: BTreeMap<u64, u64>,
    done: BTreeSet<u64>,
    released: BTreeMap<u64, Option<i32>>,
}

#[derive(Debug, Default)]
struct Gate {
    state: Mutex<Gates>,
    cv: Condvar,
    next_handle: AtomicU64,
}

impl Gate {
    /// Blocks a sync through handle `handle` until released; returns the errno to fail with.
    fn pass(&self, handle: u64) -> Option<i32> {
        let mut st = self.state.lock().unwrap();
        if !st.armed {
            return None;
        }
        let ticket = st.begun.len() as u64;
        st.begun.insert(ticket, handle);
        self.cv.notify_all();
        loop {
            if !st.armed {
                return None;
            }
            if let Some(r) = st.released.get(&ticket) {
                let r = *r;
                st.done.insert(ticket);
                self.cv.notify_all();
                return r;
            }
            st = self.cv.wait(st).unwrap();
        }
    }

    fn release(&self, ticket: u64, errno: Option<i32>) {
        self.state.lock().unwrap().released.insert(ticket, errno);
        self.cv.notify_all();
    }

    /// Waits until `n` syncs have begun; returns their handles by ticket.
    fn wait_begun(&self, n: usize) -> BTreeMap<u64, u64> {
        self.wait_until(|g| g.begun.len() >= n, "syncs to begin")
            .begun
            .clone()
    }

    /// Waits until sync `ticket` has returned.
    fn wait_done(&self, ticket: u64) {
        drop(self.wait_until(|g| g.done.contains(&ticket), "a sync to return"));
    }

    fn wait_until(
        &self,
        f: impl Fn(&Gates) -> bool,
        what: &str,
    ) -> std::sync::MutexGuard<'_, Gates> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut st = self.state.lock().unwrap();
        while !f(&st) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for {what}: {st:?}");
            st = self.cv.wait_timeout(st, left).unwrap().0;
        }
        st
    }

    /// True when no more syncs begin within `d` than `n`.
    fn begun_stays(&self, n: usize, d: Duration) -> bool {
        std::thread::sleep(d);
        self.state.lock().unwrap().begun.len() == n
    }
}

/// Disarms the gate when dropped (declared after the log, so before the log's close, whose
/// sync would otherwise wait for a release; also frees syncs a failed assertion left waiting).
struct Disarm(Arc<Gate>);

impl Drop for Disarm {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.armed = false;
        self.0.cv.notify_all();
    }
}

#[derive(Debug)]
struct GateFs {
    inner: Arc<dyn FileSystem>,
    gate: Arc<Gate>,
}

#[derive(Debug)]
struct GateFile {
    inner: Arc<dyn FileHandle>,
    gate: Option<Arc<Gate>>,
    id: u64,
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
            && let Some(errno) = g.pass(self.id)
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
            id: self.gate.next_handle.fetch_add(1, Ordering::Relaxed),
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

/// An `fsync = always` partition on the gated file system; the gate lets the syncs of its
/// creation pass and is armed once it is open (tickets start at 0 with the test's first sync).
fn gated_partition(dir: &Path) -> (Log, Arc<Partition>, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
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
            ..TopicConfig::default()
        },
    )
    .unwrap();
    let p = log.partition("t", 0).unwrap();
    gate.state.lock().unwrap().armed = true;
    (log, p, gate)
}

/// A batch appended while a sync runs gets a second sync at once, through another handle;
/// the third waits for a slot and covers everything asked for meanwhile; syncs that end out
/// of order each publish only what they captured.
#[test]
fn a_sync_starts_beside_the_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, p, gate) = gated_partition(dir.path());
    let _disarm = Disarm(gate.clone());
    let a = p.append_nowait(&batch("a", 2, 0)).unwrap().last_offset + 1;
    assert!(
        !p.sync_behind_covered(a),
        "no sync runs: a thread must run one"
    );
    let pa = p.clone();
    let ta = std::thread::spawn(move || pa.sync_behind(a));
    gate.wait_begun(1);
    // Covered by the running sync (it took its slot after `a` was asked for).
    assert!(p.sync_behind_covered(a));

    let b = p.append_nowait(&batch("b", 2, 0)).unwrap().last_offset + 1;
    assert!(
        !p.sync_behind_covered(b),
        "the running sync started before b"
    );
    let pb = p.clone();
    let tb = std::thread::spawn(move || pb.sync_behind(b));
    let begun = gate.wait_begun(2);
    assert_ne!(
        begun[&0], begun[&1],
        "two syncs at once never share a handle"
    );
    assert_eq!(
        p.high_watermark(),
        0,
        "nothing visible before a sync returns"
    );

    // Both slots busy: the next caller waits for one; the one after it leaves at once.
    let c = p.append_nowait(&batch("c", 2, 0)).unwrap().last_offset + 1;
    assert!(!p.sync_behind_covered(c));
    let pc = p.clone();
    let tc = std::thread::spawn(move || pc.sync_behind(c));
    let d = p.append_nowait(&batch("d", 2, 0)).unwrap().last_offset + 1;
    // `tc` may not have registered yet: `covered` is true only once it has.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.sync_behind_covered(d) {
        assert!(
            Instant::now() < deadline,
            "the waiting caller never registered"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        gate.begun_stays(2, Duration::from_millis(50)),
        "no third sync while both slots are busy"
    );

    // The later sync returns first. Its slot goes to the waiting caller at once, but what it
    // covered (a and b) is published only once the sync that started before it has returned:
    // results are published in start order.
    gate.release(1, None);
    gate.wait_done(1);
    let begun = gate.wait_begun(3);
    assert_ne!(
        begun[&2], begun[&0],
        "the third sync uses the free slot's handle"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        p.high_watermark(),
        0,
        "nothing published while an earlier sync runs"
    );
    assert!(!tb.is_finished(), "the later sync waits to publish");
    // The first sync returns: both publish; the older capture never lowers anything.
    gate.release(0, None);
    ta.join().unwrap().unwrap();
    tb.join().unwrap().unwrap();
    assert_eq!(p.high_watermark(), b);
    // The third sync covers c and d.
    gate.release(2, None);
    tc.join().unwrap().unwrap();
    assert_eq!(p.high_watermark(), d, "everything asked for is visible");
    assert!(p.sync_behind_covered(d));
}

/// `wait_durable` takes a free slot too, and waits (without a sync of its own) while a sync
/// that covers it runs.
#[test]
fn wait_durable_uses_a_free_slot() {
    let dir = tempfile::tempdir().unwrap();
    let (_log, p, gate) = gated_partition(dir.path());
    let _disarm = Disarm(gate.clone());
    let a = p.append_nowait(&batch("a", 1, 0)).unwrap().last_offset + 1;
    let pa = p.clone();
    let ta = std::thread::spawn(move || pa.wait_durable(a));
    gate.wait_begun(1);
    // Covered by the running sync: a second waiter for `a` starts nothing.
    let pa2 = p.clone();
    let ta2 = std::thread::spawn(move || pa2.wait_durable(a));
    let b = p.append_nowait(&batch("b", 1, 0)).unwrap().last_offset + 1;
    let pb = p.clone();
    let tb = std::thread::spawn(move || pb.wait_durable(b));
    gate.wait_begun(2);
    assert!(
        gate.begun_stays(2, Duration::from_millis(50)),
        "a waiter covered by a running sync starts none"
    );
    gate.release(0, None);
    ta.join().unwrap().unwrap();
    ta2.join().unwrap().unwrap();
    assert_eq!(p.high_watermark(), a);
    gate.release(1, None);
    tb.join().unwrap().unwrap();
    assert_eq!(p.high_watermark(), b);
}

/// Two syncs at once, one fails: the partition is poisoned and **nothing is published after
/// the failure, whichever sync returns first** (results are published in start order, and
/// not at all once poisoned), nothing is retried, and a reopen recovers what is on disk.
fn failed_sync_beside_another(fail: u64) {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, p, gate) = gated_partition(dir.path());
        let _disarm = Disarm(gate.clone());
        let a = p.append_nowait(&batch("a", 1, 0)).unwrap().last_offset + 1;
        let pa = p.clone();
        let ta = std::thread::spawn(move || pa.sync_behind(a));
        gate.wait_begun(1);
        let b = p.append_nowait(&batch("b", 1, 0)).unwrap().last_offset + 1;
        let pb = p.clone();
        let tb = std::thread::spawn(move || pb.wait_durable(b));
        gate.wait_begun(2);
        // The failing one returns first, then the other with success.
        let ok = 1 - fail;
        gate.release(fail, Some(libc::EIO));
        gate.wait_done(fail);
        gate.release(ok, None);
        let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
        assert!(ra.is_err() && rb.is_err(), "{ra:?} / {rb:?}");
        assert!(p.is_poisoned());
        assert_eq!(
            p.high_watermark(),
            0,
            "a sync that returned OK after the failure publishes nothing"
        );
        assert!(p.read(0, 1 << 20).unwrap().data.is_empty());
        assert!(p.append_nowait(&batch("c", 1, 0)).is_err());
        assert!(p.sync_behind(b).is_err());
        assert!(!p.sync_behind_covered(b));
        assert_eq!(
            gate.state.lock().unwrap().begun.len(),
            2,
            "a failed sync is never retried"
        );
    }
    // Reopened (the real file system kept the bytes): recovery decides what is there.
    let log = Log::open(
        dir.path(),
        LogOptions {
            background_maintenance: false,
            ..LogOptions::default()
        },
    )
    .unwrap();
    let p = log.partition("t", 0).unwrap();
    assert!(!p.is_poisoned());
    assert!(p.high_watermark() <= 2);
}

/// The sync that started first fails; the later one returns OK after it.
#[test]
fn an_earlier_sync_fails_and_the_later_publishes_nothing() {
    failed_sync_beside_another(0);
}

/// The sync that started later fails first; the earlier one returns OK after it.
#[test]
fn a_later_sync_fails_and_the_earlier_publishes_nothing() {
    failed_sync_beside_another(1);
}
