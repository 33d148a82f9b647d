//! Early write-back hints, started off the append path (`docs/durability.md`, "Early
//! write-back").
//!
//! The partition writer hands each range due for write-back (`partition/writer.rs`,
//! `WRITEBACK_BYTES`) to one thread per log, which calls `FileHandle::start_writeback` on it.
//! `sync_file_range(SYNC_FILE_RANGE_WRITE)` returns once the write-back is submitted, which can
//! take milliseconds when the block layer is busy; made by the writer, it held the partition's
//! writer lock, and so every other append of the partition, and the request that appended.
//!
//! The same thread runs the partitions' zeroing ahead of the writer (`Partition::zero_ahead`,
//! docs/durability.md "Zero ahead"): a job names the partition (weakly: a dropped partition's
//! job does nothing); the writer queues at most one per partition at a time, and a job that
//! finds the queue full is dropped and asked for again by a later append.
//!
//! Invariants: a hint promises nothing and makes nothing durable (only `sync_data` does); the
//! queue is bounded ([`QUEUE`] hints): a hint that finds it full is dropped (the kernel's own
//! write-back, or the roll's fdatasync, then writes those bytes), never waited for; the thread
//! ends once every sender is gone (the log and its partitions dropped). Without the thread (it
//! could not be spawned) the writer starts write-back itself, as before.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Weak};

use spool_io::FileHandle;

use crate::partition::Partition;

/// Hints waiting for the write-back thread: 64 × 4 MiB.
const QUEUE: usize = 64;

/// A range of a segment file whose write-back is to be started.
struct Hint {
    file: Arc<dyn FileHandle>,
    pos: u64,
    len: u64,
}

/// What the thread is asked to do.
enum Job {
    Hint(Hint),
    /// Zero the partition's active segment ahead of its writer.
    ZeroAhead(Weak<Partition>),
}

/// The sending side of a log's write-back thread.
#[derive(Debug)]
pub(crate) struct WriteBack {
    tx: Option<SyncSender<Job>>,
}

impl std::fmt::Debug for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hint")
            .field("pos", &self.pos)
            .field("len", &self.len)
            .finish()
    }
}

impl WriteBack {
    /// Starts the thread.
    pub(crate) fn start() -> WriteBack {
        let (tx, rx) = sync_channel::<Job>(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("spool-writeback".into())
            .spawn(move || run(&rx));
        match spawned {
            Ok(_) => WriteBack { tx: Some(tx) },
            Err(e) => {
                tracing::warn!(error = %e, "no write-back thread: appends start write-back themselves");
                WriteBack { tx: None }
            }
        }
    }

    /// Has write-back of `[pos, pos + len)` of `file` started soon, without waiting.
    pub(crate) fn hint(&self, file: &Arc<dyn FileHandle>, pos: u64, len: u64) {
        let Some(tx) = &self.tx else {
            start(file.as_ref(), pos, len);
            return;
        };
        let hint = Hint {
            file: file.clone(),
            pos,
            len,
        };
        match tx.try_send(Job::Hint(hint)) {
            Ok(()) => {}
            Err(TrySendError::Full(Job::Hint(h))) => {
                tracing::debug!(
                    pos = h.pos,
                    len = h.len,
                    "write-back queue full: hint dropped"
                );
            }
            Err(TrySendError::Disconnected(Job::Hint(h))) => start(h.file.as_ref(), h.pos, h.len),
            Err(_) => {}
        }
    }

    /// Queues a zeroing of `partition`'s active segment ahead of its writer. False when it
    /// was not queued (no thread, or the queue is full): the writer asks again later.
    pub(crate) fn zero_ahead(&self, partition: Weak<Partition>) -> bool {
        self.tx
            .as_ref()
            .is_some_and(|tx| tx.try_send(Job::ZeroAhead(partition)).is_ok())
    }
}

fn run(rx: &Receiver<Job>) {
    for job in rx {
        match job {
            Job::Hint(h) => start(h.file.as_ref(), h.pos, h.len),
            Job::ZeroAhead(p) => {
                if let Some(p) = p.upgrade() {
                    p.zero_ahead();
                }
            }
        }
    }
}

/// A failure is only logged: nothing was promised, and a write-back error is still reported
/// by the next fdatasync (which poisons the partition).
fn start(file: &dyn FileHandle, pos: u64, len: u64) {
    if let Err(e) = file.start_writeback(pos, len) {
        tracing::debug!(pos, len, error = %e, "starting write-back failed");
    }
}
