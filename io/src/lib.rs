//! Spool's I/O seam: the one trait every file operation of the log engine goes through.
//!
//! The engine (and through it the broker, whose durable state lives in the engine's internal
//! topics) never calls `std::fs` or `memmap2` itself: it holds an `Arc<dyn FileSystem>` and
//! asks it to open, read, write at, truncate, rename, remove, fsync files and directories,
//! and map files for reading. Two implementations exist:
//!
//! - [`RealFs`] (the default): the operating system, one system call per method, memory maps
//!   through `memmap2`. The cost of the seam is one indirect call per system call; reads of
//!   mapped segments do not go through it at all (`docs/benchmarks.md`, "The I/O
//!   seam's cost": not measurable in the append and read benchmarks).
//! - `sim::SimFs` (feature `sim`, tests only): an in-memory disk that keeps what was written
//!   apart from what was synced, per file and per directory entry, and can produce what a
//!   power cut leaves behind; it also injects I/O errors, a full disk, a low open-files limit
//!   and bit flips. See `docs/durability.md`.
//!
//! Contract of the trait (both implementations keep it; the engine relies on nothing more):
//! - A file's data and size are durable only after [`FileHandle::sync_data`] (or
//!   [`FileHandle::sync_all`]) returned `Ok` on a handle of it.
//! - A directory entry (created, renamed or removed) is durable only after
//!   [`FileSystem::sync_dir`] of its directory returned `Ok`.
//! - Nothing else is durable, and unsynced writes may survive a power cut in part, torn at a
//!   sector boundary, or out of order.
//! - [`FileHandle::map`] returns the file's bytes `[0, len)` as they are now; the engine never
//!   modifies or truncates a range it has mapped (see `real.rs`). [`FileHandle::map_ahead`]
//!   maps a growing file past its end once; only views of written bytes leave it.
//!
//! `unsafe` exists only in `real.rs` (the memory map and `getrlimit`).

use std::any::Any;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

mod real;
// Also under `cfg(test)`, so `cargo test -p spool-io` runs the simulated disk's own tests.
#[cfg(any(test, feature = "sim"))]
pub mod sim;

pub use real::RealFs;

/// How [`FileSystem::open`] opens a file. Every mode but `Read` opens for reading and writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, read-only.
    Read,
    /// An existing file, read-write.
    Write,
    /// A new file; fails with `AlreadyExists` if the name is taken.
    CreateNew,
    /// The file, created empty if missing, kept as it is otherwise.
    Create,
    /// The file, created if missing, truncated to 0 bytes otherwise.
    CreateTruncate,
}

impl OpenMode {
    /// True for the modes that open for writing.
    pub fn writes(self) -> bool {
        self != OpenMode::Read
    }
}

/// What [`FileSystem::metadata`] tells about a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Size in bytes (0 for a directory).
    pub len: u64,
    /// True for a directory.
    pub is_dir: bool,
}

/// One entry of [`FileSystem::read_dir`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's name (lossily converted to UTF-8; Spool's own names are ASCII).
    pub name: String,
    /// True for a directory.
    pub is_dir: bool,
}

/// The open-files budget of the process: how many descriptors are open and how many may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdBudget {
    /// Descriptors open now.
    pub open: u64,
    /// The soft limit (`RLIMIT_NOFILE`).
    pub limit: u64,
}

/// An exclusive lock on a file; released when dropped.
pub trait FileLock: Send + Sync + fmt::Debug {}

/// An open file.
pub trait FileHandle: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `pos`; returns how many (0 at the end of the file).
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize>;

    /// Writes all of `buf` at `pos` (not durable until synced).
    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()>;

    /// Writes all of `head` at `pos` and all of `tail` right after it (not durable until
    /// synced), in one system call where the file system can (Linux: `pwritev`), so that an
    /// append of a rewritten prefix and the untouched rest of a batch costs one call, not two.
    /// Promises nothing more than two [`FileHandle::write_all_at`]s: a crash may keep any part
    /// of either (the simulated disk does exactly that, as two writes).
    fn write_pair_at(&self, head: &[u8], tail: &[u8], pos: u64) -> io::Result<()> {
        self.write_all_at(head, pos)?;
        self.write_all_at(tail, pos + head.len() as u64)
    }

    /// Truncates or extends the file to `len` bytes (not durable until synced).
    fn set_len(&self, len: u64) -> io::Result<()>;

    /// The file's size now.
    fn size(&self) -> io::Result<u64>;

    /// `fdatasync`: makes the file's data and size durable.
    fn sync_data(&self) -> io::Result<()>;

    /// `fsync`: makes the file's data and all its metadata durable.
    fn sync_all(&self) -> io::Result<()>;

    /// Starts writing back the dirty pages of `[pos, pos + len)` and returns without waiting
    /// for it (Linux: `sync_file_range(SYNC_FILE_RANGE_WRITE)`). A hint that spreads the cost
    /// of a later `sync_data` over time: it makes **nothing** durable and promises nothing, and
    /// a write-back error it causes is still reported by the next `sync_data` (it does not wait,
    /// so it does not consume the file's error state). A file system that cannot does nothing.
    fn start_writeback(&self, pos: u64, len: u64) -> io::Result<()> {
        let _ = (pos, len);
        Ok(())
    }

    /// The file's bytes `[0, len)` as one `Bytes` (a read-only memory map for the real file
    /// system) that keeps `keep_alive` alive as long as any slice of it lives. `len` must not
    /// exceed the file's size.
    fn map(&self, len: usize, keep_alive: Box<dyn Any + Send + Sync>) -> io::Result<Bytes>;

    /// For a file that only grows while mapped (the active segment): one read-only map of
    /// `[0, capacity)`, which may reach past the file's current end, so that the bytes
    /// appended later are read through the same map ([`MapAhead::view`]) instead of a new map
    /// of the grown file per read (an `mmap`, page faults on the fresh map and an `munmap` of
    /// the old one each time). `Ok(None)` when this file system cannot map past the end (the
    /// simulated disk copies on map): the caller then uses [`FileHandle::map`].
    fn map_ahead(
        &self,
        capacity: usize,
        keep_alive: Box<dyn Any + Send + Sync>,
    ) -> io::Result<Option<MapAhead>> {
        let _ = (capacity, keep_alive);
        Ok(None)
    }

    /// Reads exactly `buf.len()` bytes at `pos` (`UnexpectedEof` if the file is shorter).
    fn read_exact_at(&self, mut buf: &mut [u8], mut pos: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, pos) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    buf = &mut buf[n..];
                    pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A read-only map of a growing file made past its end ([`FileHandle::map_ahead`]).
///
/// Invariant the caller keeps: a view never reaches past what has been written to the file
/// (touching a mapped page past the file's end faults), and, as for [`FileHandle::map`], the
/// engine never truncates or rewrites a range it has handed out. Bytes past the file's end
/// are never exposed: only [`MapAhead::view`] gives access, and the whole map is private.
#[derive(Clone)]
pub struct MapAhead {
    map: Bytes,
}

/// Prints the capacity only: `Bytes`' own `Debug` walks every byte, which would touch the
/// pages past the file's end (SIGBUS) when a segment, partition or log is debug-printed.
impl fmt::Debug for MapAhead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MapAhead")
            .field("capacity", &self.map.len())
            .finish_non_exhaustive()
    }
}

impl MapAhead {
    /// Wraps a map of `[0, capacity)` (for implementations of [`FileHandle::map_ahead`]).
    pub fn new(map: Bytes) -> MapAhead {
        MapAhead { map }
    }

    /// Bytes the map covers, written or not.
    pub fn capacity(&self) -> usize {
        self.map.len()
    }

    /// The file's bytes `[0, len)` through this map: no system call. `len` must not exceed
    /// the bytes written to the file (see the type's invariant).
    ///
    /// # Panics
    /// When `len` exceeds [`MapAhead::capacity`].
    pub fn view(&self, len: usize) -> Bytes {
        self.map.slice(..len)
    }
}

/// The file system as the engine sees it. Paths are absolute or relative to the process's
/// working directory, as with `std::fs`.
pub trait FileSystem: Send + Sync + fmt::Debug {
    /// Opens a file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FileHandle>>;

    /// Size and kind of a path (following symlinks).
    fn metadata(&self, path: &Path) -> io::Result<Metadata>;

    /// The entries of a directory (without `.` and `..`), in no particular order.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>>;

    /// Creates one directory (its parent must exist).
    fn create_dir(&self, path: &Path) -> io::Result<()>;

    /// Creates a directory and any missing parents; `Ok` if it exists.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;

    /// Renames `from` to `to`, replacing `to` if it is a file (atomic, not durable until the
    /// directories are synced).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;

    /// Removes a file's directory entry (its data goes once nothing has it open or mapped).
    fn remove_file(&self, path: &Path) -> io::Result<()>;

    /// Removes a directory and everything under it, one entry at a time (not atomic).
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;

    /// `fsync` of a directory: makes the entries created, renamed or removed in it durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;

    /// Takes an exclusive, non-blocking lock on the file `path` (created if `create`).
    /// `Ok(None)` when `create` is false and the file does not exist; an error of kind
    /// `WouldBlock` when someone else holds the lock.
    fn lock(&self, path: &Path, create: bool) -> io::Result<Option<Box<dyn FileLock>>>;

    /// The process's open-files budget, when known.
    fn fd_budget(&self) -> Option<FdBudget>;

    /// The whole content of a small file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let f = self.open(path, OpenMode::Read)?;
        let len = usize::try_from(f.size()?).map_err(|_| io::Error::other("file too large"))?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// The content of a file that should hold at most `max` bytes, reading (and allocating
    /// for) no more than `max + 1` of them: a result longer than `max` means the file is too
    /// large, whatever its size (a damaged inode size or a sparse file can claim any size;
    /// [`FileSystem::read`] would allocate all of it first).
    fn read_at_most(&self, path: &Path, max: usize) -> io::Result<Vec<u8>> {
        let f = self.open(path, OpenMode::Read)?;
        let len = f.size()?.min(max as u64 + 1) as usize;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// True if the path exists.
    fn exists(&self, path: &Path) -> bool {
        self.metadata(path).is_ok()
    }
}

/// The real file system, shared: what every `LogOptions` uses unless told otherwise.
pub fn real() -> Arc<dyn FileSystem> {
    Arc::new(RealFs)
}

/// A sequential writer over a [`FileHandle`] (wrap it in a `BufWriter` for small writes).
#[derive(Debug)]
pub struct SeqWriter {
    file: Arc<dyn FileHandle>,
    pos: u64,
}

impl SeqWriter {
    /// Writes from position `pos` on.
    pub fn new(file: Arc<dyn FileHandle>, pos: u64) -> SeqWriter {
        SeqWriter { file, pos }
    }

    /// The file.
    pub fn file(&self) -> &Arc<dyn FileHandle> {
        &self.file
    }
}

impl io::Write for SeqWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write_all_at(buf, self.pos)?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// True for the errors of a full disk or quota (`ENOSPC`, `EDQUOT`).
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}
