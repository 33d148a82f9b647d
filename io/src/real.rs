//! The real file system: `std::fs`, `memmap2` and `getrlimit`, one system call per method.
//!
//! This module holds the engine's `unsafe` (the memory map, `getrlimit` and
//! `sync_file_range`); the broker's CPU affinity and memory trimming calls
//! (`broker/src/affinity.rs`, `broker/src/trim.rs`) and the load generator hold the
//! workspace's others (docs/ARCHITECTURE.md lists them).
//!
//! Contract that makes the memory map sound in practice: Spool never truncates or rewrites a
//! byte range of a file while a mapping of that range may be alive. Segment files are
//! append-only while active; a mapping covers at most the bytes already written when it was
//! made, except an active segment's map ahead (`FileHandle::map_ahead`), which reaches past
//! the end but hands out only views of written bytes (the out-of-space rollback truncates only
//! bytes no view covers); recovery truncates a torn tail *before*
//! any reader exists; retention renames files and unlinks them only when the last mapping is
//! gone. Another process truncating Spool's files underneath it (which the directory lock
//! forbids to other Spool processes) would make readers fault; that is the documented price
//! of zero-copy reads (Kafka and TANK pay it too).
#![allow(unsafe_code)]

use std::any::Any;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions};

use crate::{DirEntry, FdBudget, FileHandle, FileLock, FileSystem, MapAhead, Metadata, OpenMode};

/// The operating system's file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

#[derive(Debug)]
struct RealFile(File);

#[derive(Debug)]
struct RealLock(File);

impl FileLock for RealLock {}

impl Drop for RealLock {
    fn drop(&mut self) {
        // Unlock explicitly rather than rely on closing the descriptor: a flock belongs to the
        // open file description, and a child process another thread is spawning right now
        // holds a copy of every descriptor until it execs, which would keep the file locked
        // after its owner is gone.
        let _ = self.0.unlock();
    }
}

impl FileSystem for RealFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn FileHandle>> {
        let mut o = OpenOptions::new();
        o.read(true).write(mode.writes());
        match mode {
            OpenMode::Read | OpenMode::Write => {}
            OpenMode::CreateNew => {
                o.create_new(true);
            }
            OpenMode::Create => {
                o.create(true).truncate(false);
            }
            OpenMode::CreateTruncate => {
                o.create(true).truncate(true);
            }
        }
        Ok(Arc::new(RealFile(o.open(path)?)))
    }

    fn metadata(&self, path: &Path) -> io::Result<Metadata> {
        let m = fs::metadata(path)?;
        Ok(Metadata {
            len: if m.is_dir() { 0 } else { m.len() },
            is_dir: m.is_dir(),
        })
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            out.push(DirEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                is_dir: entry.file_type()?.is_dir(),
            });
        }
        Ok(out)
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn lock(&self, path: &Path, create: bool) -> io::Result<Option<Box<dyn FileLock>>> {
        let file = OpenOptions::new()
            .read(true)
            .write(create)
            .create(create)
            .truncate(false)
            .open(path);
        let file = match file {
            Ok(f) => f,
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match file.try_lock() {
            Ok(()) => Ok(Some(Box::new(RealLock(file)))),
            Err(fs::TryLockError::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn fd_budget(&self) -> Option<FdBudget> {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `getrlimit` writes one `rlimit` through the pointer, which is valid for the
        // call.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return None;
        }
        // Every entry of /proc/self/fd is an open descriptor; listing it opens one more.
        let open = fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .saturating_sub(1) as u64;
        Some(FdBudget {
            open,
            limit: lim.rlim_cur,
        })
    }
}

impl FileHandle for RealFile {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        self.0.read_at(buf, pos)
    }

    fn write_all_at(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.0.write_all_at(buf, pos)
    }

    #[cfg(target_os = "linux")]
    fn write_pair_at(&self, head: &[u8], tail: &[u8], pos: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (mut head, mut tail, mut pos) = (head, tail, pos);
        // A regular file takes the whole write at once unless interrupted or out of space; a
        // short write continues where it stopped, as `write_all_at` does.
        while !head.is_empty() {
            let Ok(off) = libc::off_t::try_from(pos) else {
                return Err(io::ErrorKind::InvalidInput.into());
            };
            let iov = [
                libc::iovec {
                    iov_base: head.as_ptr().cast_mut().cast(),
                    iov_len: head.len(),
                },
                libc::iovec {
                    iov_base: tail.as_ptr().cast_mut().cast(),
                    iov_len: tail.len(),
                },
            ];
            // SAFETY: both iovecs point into live slices of their stated lengths, which the
            // kernel only reads; the descriptor is owned by this handle.
            let n = unsafe { libc::pwritev(self.0.as_raw_fd(), iov.as_ptr(), 2, off) };
            let n = match usize::try_from(n) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
            };
            pos += n as u64;
            if n < head.len() {
                head = &head[n..];
            } else {
                tail = &tail[n - head.len()..];
                head = &[];
            }
        }
        self.0.write_all_at(tail, pos)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }

    #[cfg(target_os = "linux")]
    fn start_writeback(&self, pos: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(pos), Ok(len)) = (i64::try_from(pos), i64::try_from(len)) else {
            return Err(io::ErrorKind::InvalidInput.into());
        };
        // SAFETY: a plain syscall on a descriptor this handle owns; no memory is passed.
        let rc = unsafe {
            libc::sync_file_range(self.0.as_raw_fd(), pos, len, libc::SYNC_FILE_RANGE_WRITE)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn map(&self, len: usize, keep_alive: Box<dyn Any + Send + Sync>) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        // SAFETY: `len` never exceeds the bytes already written to the file (callers pass a
        // length they read from the file's metadata or from the writer's published position),
        // and the module contract above guarantees the range is not truncated or modified
        // while mapped.
        let mmap = unsafe { MmapOptions::new().len(len).map(&self.0)? };
        Ok(Bytes::from_owner(Owner {
            mmap,
            _keep_alive: keep_alive,
        }))
    }

    fn map_ahead(
        &self,
        capacity: usize,
        keep_alive: Box<dyn Any + Send + Sync>,
    ) -> io::Result<Option<MapAhead>> {
        if capacity == 0 {
            return Ok(Some(MapAhead::new(Bytes::new())));
        }
        // SAFETY: a shared read-only map may extend past the file's end (Linux checks the
        // file's size when a page is touched, not when mapping); `MapAhead` hands out only
        // views of bytes already written (its invariant), which the module contract above
        // guarantees are never truncated or modified while mapped. Pages past the end are
        // never touched.
        let mmap = unsafe { MmapOptions::new().len(capacity).map(&self.0)? };
        Ok(Some(MapAhead::new(Bytes::from_owner(Owner {
            mmap,
            _keep_alive: keep_alive,
        }))))
    }
}

struct Owner {
    mmap: Mmap,
    _keep_alive: Box<dyn Any + Send + Sync>,
}

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        &self.mmap
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FileSystem, OpenMode};

    /// A map ahead reaches past the file's end; debug-printing it must not read those pages
    /// (a fault there is SIGBUS, which would kill this test process).
    #[test]
    fn debug_of_a_map_ahead_reads_nothing_past_the_file_end() {
        let path = std::env::temp_dir().join(format!("spool-io-map-ahead-{}", std::process::id()));
        let file = RealFs.open(&path, OpenMode::CreateTruncate).unwrap();
        file.write_all_at(b"written", 0).unwrap();
        let ahead = file
            .map_ahead(1 << 20, Box::new(()))
            .unwrap()
            .expect("the real file system maps ahead");
        assert_eq!(&ahead.view(7)[..], b"written");
        let printed = format!("{ahead:?}");
        assert!(printed.contains("capacity: 1048576"), "{printed}");
        drop(ahead);
        drop(file);
        std::fs::remove_file(&path).unwrap();
    }

    /// `write_pair_at` (one `pwritev`) leaves the same bytes as two `write_all_at`s, at any
    /// position, with an empty tail too.
    #[test]
    fn a_pair_write_is_its_head_then_its_tail() {
        let path = std::env::temp_dir().join(format!("spool-io-pair-{}", std::process::id()));
        let file = RealFs.open(&path, OpenMode::CreateTruncate).unwrap();
        file.write_all_at(b"0123456789", 0).unwrap();
        file.write_pair_at(b"ab", b"cdef", 3).unwrap();
        file.write_pair_at(b"XY", b"", 12).unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        file.write_pair_at(b"<<", &big, 14).unwrap();
        assert_eq!(file.size().unwrap(), 16 + big.len() as u64);
        let mut got = vec![0u8; 16 + big.len()];
        assert_eq!(file.read_at(&mut got, 0).unwrap(), got.len());
        assert_eq!(&got[..16], b"012abcdef9\0\0XY<<");
        assert_eq!(&got[16..], &big[..]);
        drop(file);
        std::fs::remove_file(&path).unwrap();
    }
}
