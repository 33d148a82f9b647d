//! Writing a cleaned segment and swapping it in, crash-safely; finishing an interrupted swap
//! at open.
//!
//! A pass rewrites a *group* of consecutive sealed segments `[S1 … Sk]` (base `B` = S1's base)
//! into one new segment that keeps the name `B`. Steps:
//!
//! 1. write `B.log.cleaned`, fdatasync it; write `B.index.cleaned` and `B.timeindex.cleaned`
//!    (the new segment's indexes), fdatasync them;
//! 2. under the partition's writer lock: check the group is still in the segment list
//!    (retention may have removed part of it: then delete the `.cleaned` files and stop);
//! 3. **commit**: rename `B.log.cleaned` → `B.log.swap`, fsync the directory;
//! 4. rename every `Si.{log,index,timeindex}` to `Si.*.<pid>-<n>.deleted` (readers still
//!    holding them keep reading; they are unlinked when the last mapping drops);
//! 5. rename `B.index.cleaned` → `B.index`, `B.timeindex.cleaned` → `B.timeindex`, then
//!    `B.log.swap` → `B.log`; fsync the directory;
//! 6. publish the new segment list (still under the writer lock).
//!
//! Recovery ([`recover_dir`], run first when a partition opens):
//! - `B.log.swap` exists: the swap was committed. Remove every `X.log` (and its indexes) with
//!   `B ≤ X < max(B + 1, end)`, `end` being the offset after the swap file's last batch; move
//!   `B.index.cleaned`/`B.timeindex.cleaned` into place if present (else the indexes are
//!   rebuilt from the log on first use); rename `B.log.swap` → `B.log`; fsync the directory.
//!   A group member starting at or after `end` holds only offsets the new segment does not,
//!   so leaving it (when step 4 had not reached it) keeps the log ordered and loses nothing:
//!   it is simply not compacted yet.
//! - Any other `*.cleaned` file belongs to a swap that was not committed: removed. The old
//!   segments are then intact (nothing touches them before the commit).
//! - `*.deleted` leftovers are removed with the rest by the partition's recovery.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use spool_io::{FileSystem, OpenMode, SeqWriter};

use crate::batch::BatchHeader;
use crate::error::{Error, Result};
use crate::fsutil::remove_if_present;
use crate::index::{self, Kind, SegmentSummary};
use crate::segment::{self, Chain, IndexBuilder};

use super::state::State;

const CLEANED: &str = ".cleaned";
const SWAP: &str = ".swap";

fn name(dir: &Path, base: u64, ext: &str, suffix: &str) -> PathBuf {
    dir.join(format!("{base:020}.{ext}{suffix}"))
}

/// `B.log.cleaned`, `B.index.cleaned`, `B.timeindex.cleaned`.
fn cleaned_paths(dir: &Path, base: u64) -> [PathBuf; 3] {
    ["log", "index", "timeindex"].map(|ext| name(dir, base, ext, CLEANED))
}

/// Removes the `.cleaned` files of `base` (an abandoned output).
pub(crate) fn discard(fs: &dyn FileSystem, dir: &Path, base: u64) {
    for p in cleaned_paths(dir, base) {
        if let Err(e) = fs.remove_file(&p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %p.display(), error = %e, "could not remove a cleaner output");
        }
    }
}

/// A new segment being written by the cleaner.
#[derive(Debug)]
pub(crate) struct Output {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    pub(crate) base: u64,
    path: PathBuf,
    file: BufWriter<SeqWriter>,
    pub(crate) pos: u64,
    index: IndexBuilder,
    offsets: Vec<u8>,
    times: Vec<u8>,
    next_offset: u64,
}

/// A finished output: durable `.cleaned` files.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) size: u64,
    pub(crate) max_timestamp: i64,
}

impl Output {
    /// Starts `B.log.cleaned` (replacing a stale one).
    pub(crate) fn create(
        fs: &Arc<dyn FileSystem>,
        dir: &Path,
        base: u64,
        interval: u32,
    ) -> Result<Output> {
        discard(fs.as_ref(), dir, base);
        let path = name(dir, base, "log", CLEANED);
        let file = fs
            .open(&path, OpenMode::CreateNew)
            .map_err(|e| Error::io("create", &path, e))?;
        Ok(Output {
            fs: fs.clone(),
            dir: dir.to_path_buf(),
            base,
            path,
            file: BufWriter::with_capacity(1 << 20, SeqWriter::new(file, 0)),
            pos: 0,
            index: IndexBuilder::new(base, interval),
            offsets: Vec::new(),
            times: Vec::new(),
            next_offset: base,
        })
    }

    /// Appends one batch (header `h`, already in its final form).
    pub(crate) fn append(&mut self, batch: &[u8], h: &BatchHeader) -> Result<()> {
        if self.pos + batch.len() as u64 > u64::from(u32::MAX) {
            return Err(Error::LimitExceeded {
                what: "cleaned segment size",
                limit: u64::from(u32::MAX),
                actual: self.pos + batch.len() as u64,
            });
        }
        self.file
            .write_all(batch)
            .map_err(|e| Error::io("write", &self.path, e))?;
        if let Some(e) = self.index.observe(self.pos, h) {
            e.push_to(&mut self.offsets, &mut self.times);
        }
        self.pos += batch.len() as u64;
        self.next_offset = h.next_offset();
        Ok(())
    }

    /// Flushes and fdatasyncs the log, then writes and fdatasyncs both index files.
    pub(crate) fn finish(self) -> Result<Finished> {
        let file = self
            .file
            .into_inner()
            .map_err(|e| Error::io("write", &self.path, e.into_error()))?;
        file.file()
            .sync_data()
            .map_err(|e| Error::io("fdatasync", &self.path, e))?;
        drop(file);
        let fs = self.fs.as_ref();
        let summary = SegmentSummary {
            base_offset: self.base,
            last_offset: self.next_offset.saturating_sub(1),
            max_timestamp: self.index.max_timestamp,
            log_size: self.pos as u32,
        };
        let [_, index_path, time_path] = cleaned_paths(&self.dir, self.base);
        crate::fsutil::write_synced(
            fs,
            &index_path,
            &index::encode_file(Kind::Offset, &summary, &self.offsets),
        )?;
        crate::fsutil::write_synced(
            fs,
            &time_path,
            &index::encode_file(Kind::Time, &summary, &self.times),
        )?;
        Ok(Finished {
            size: self.pos,
            max_timestamp: self.index.max_timestamp,
        })
    }
}

fn rename(fs: &dyn FileSystem, from: &Path, to: &Path) -> Result<()> {
    fs.rename(from, to).map_err(|e| Error::io("rename", to, e))
}

/// Step 3: the commit point.
pub(crate) fn commit(fs: &dyn FileSystem, dir: &Path, base: u64) -> Result<()> {
    rename(
        fs,
        &name(dir, base, "log", CLEANED),
        &name(dir, base, "log", SWAP),
    )?;
    crate::fsutil::sync_dir(fs, dir)
}

/// Step 5 (the old segments are renamed away already): the indexes, then the log, into
/// place. The caller fsyncs the directory.
pub(crate) fn install(fs: &dyn FileSystem, dir: &Path, base: u64) -> Result<()> {
    for ext in ["index", "timeindex"] {
        rename(
            fs,
            &name(dir, base, ext, CLEANED),
            &name(dir, base, ext, ""),
        )?;
    }
    rename(
        fs,
        &name(dir, base, "log", SWAP),
        &name(dir, base, "log", ""),
    )
}

/// Finishes committed swaps and removes uncommitted outputs in the partition directory `dir`
/// (see the module docs). Returns the state's `sparse_below`. Run before the segments are
/// listed.
pub(crate) fn recover_dir(fs: &dyn FileSystem, dir: &Path) -> Result<u64> {
    let state = State::read(fs, dir)?;
    let mut entries = match fs.read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(state.sparse_below),
        Err(e) => return Err(Error::io("read directory", dir, e)),
    };
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let (mut swaps, mut cleaned, mut logs) = (Vec::new(), Vec::new(), Vec::new());
    for entry in entries {
        let n = entry.name;
        if let Some(base) = n.strip_suffix(SWAP).and_then(segment::parse_log_name) {
            swaps.push(base);
        } else if n.ends_with(CLEANED) {
            cleaned.push(dir.join(&n));
        } else if let Some(base) = segment::parse_log_name(&n) {
            logs.push(base);
        }
    }
    if swaps.is_empty() && cleaned.is_empty() {
        return Ok(state.sparse_below);
    }
    swaps.sort_unstable();
    for &base in &swaps {
        let swap = name(dir, base, "log", SWAP);
        let end = {
            let file = fs
                .open(&swap, OpenMode::Read)
                .map_err(|e| Error::io("open", &swap, e))?;
            let len = file.size().map_err(|e| Error::io("stat", &swap, e))?;
            let data = file
                .map(len as usize, Box::new(()))
                .map_err(|e| Error::io("mmap", &swap, e))?;
            let w = segment::walk_chain(
                &data,
                0,
                len,
                base,
                Chain::Sparse { limit: u64::MAX },
                true,
                |_, _| {},
            );
            if let Some((pos, reason)) = w.stopped {
                return Err(Error::corruption(
                    &swap,
                    pos,
                    Some(w.next_offset),
                    format!("in a committed compaction output: {reason}"),
                ));
            }
            w.next_offset.max(base + 1)
        };
        for &old in logs.iter().filter(|&&x| x >= base && x < end) {
            for ext in ["log", "index", "timeindex"] {
                remove_if_present(fs, &name(dir, old, ext, ""))?;
            }
        }
        for ext in ["index", "timeindex"] {
            let c = name(dir, base, ext, CLEANED);
            if fs.exists(&c) {
                rename(fs, &c, &name(dir, base, ext, ""))?;
            }
        }
        rename(fs, &swap, &name(dir, base, "log", ""))?;
        tracing::warn!(dir = %dir.display(), base, "finished an interrupted compaction swap");
    }
    for p in cleaned {
        if fs.exists(&p) {
            remove_if_present(fs, &p)?;
        }
    }
    crate::fsutil::sync_dir(fs, dir)?;
    Ok(state.sparse_below)
}
