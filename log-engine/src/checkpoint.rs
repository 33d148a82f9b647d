//! The per-partition recovery point: the last position known durable and valid.
//!
//! All bytes of segments older than `segment_base`, and bytes `[0, position)` of segment
//! `segment_base`, were fdatasync'd and CRC-checked before the point was written. Recovery
//! trusts them (it only walks their headers to rebuild the in-memory index) and CRC-scans
//! only what lies past the point; a bad batch before the point is reported as corruption,
//! never truncated.
//!
//! ```text
//! File `recovery-point`: two 64-byte slots, written alternately (little-endian):
//! { magic u32 = "SPRP" | version u16 = 1 | reserved u16 | sequence u64 | segment_base u64
//!   | position u64 | next_offset u64 | crc u32 (CRC-32 of bytes 0..40) | zero padding }
//! ```
//!
//! A write goes to the slot not holding the newest point, followed by one fdatasync; a torn
//! write damages at most that slot, so the other one still holds the previous point. The
//! slot with the highest sequence and a valid CRC wins.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use spool_io::{FileHandle, FileSystem, OpenMode};

use crate::error::{Error, Result};

const SLOT: usize = 64;
const MAGIC: u32 = u32::from_le_bytes(*b"SPRP");
const VERSION: u16 = 1;
/// File name inside a partition directory.
pub(crate) const FILE_NAME: &str = "recovery-point";

/// A recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Point {
    pub(crate) segment_base: u64,
    pub(crate) position: u64,
    pub(crate) next_offset: u64,
}

fn encode(seq: u64, p: &Point) -> [u8; SLOT] {
    let mut b = [0u8; SLOT];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&p.segment_base.to_le_bytes());
    b[24..32].copy_from_slice(&p.position.to_le_bytes());
    b[32..40].copy_from_slice(&p.next_offset.to_le_bytes());
    let crc = crc32fast::hash(&b[..40]);
    b[40..44].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Writes the first point of a partition that holds nothing yet, `(0, 0, 0)` with sequence 1,
/// where [`Checkpoint::write`] would put it, into the new, empty file `file` at `path`. For
/// `Partition::create_empty`: the first open then finds the point it would write and writes
/// nothing. Not fdatasync'd: the point covers no data, so losing it only makes that open
/// write it.
pub(crate) fn write_initial(file: &dyn FileHandle, path: &Path) -> Result<()> {
    let zero = Point {
        segment_base: 0,
        position: 0,
        next_offset: 0,
    };
    file.write_all_at(&encode(1, &zero), SLOT as u64)
        .map_err(|e| Error::io("write", path, e))
}

fn decode(b: &[u8]) -> Option<(u64, Point)> {
    let u64_at = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    };
    let crc = u32::from_le_bytes([b[40], b[41], b[42], b[43]]);
    if crc != crc32fast::hash(&b[..40])
        || u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != MAGIC
        || u16::from_le_bytes([b[4], b[5]]) != VERSION
    {
        return None;
    }
    Some((
        u64_at(8),
        Point {
            segment_base: u64_at(16),
            position: u64_at(24),
            next_offset: u64_at(32),
        },
    ))
}

/// Open handle on a partition's recovery-point file.
#[derive(Debug)]
pub(crate) struct Checkpoint {
    file: Arc<dyn FileHandle>,
    path: PathBuf,
    seq: u64,
    last: Option<Point>,
}

/// Reads the newest valid point of the file in `dir` without creating or changing anything
/// (for offline inspection). `Ok(None)` when the file is missing or no slot is valid.
pub(crate) fn read_point(fs: &dyn FileSystem, dir: &Path) -> Result<Option<Point>> {
    let path = dir.join(FILE_NAME);
    // Only the two slots are looked at: nothing past them is read (or allocated for).
    let bytes = match fs.read_at_most(&path, 2 * SLOT) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &path, e)),
    };
    let mut buf = [0u8; 2 * SLOT];
    let n = bytes.len().min(buf.len());
    buf[..n].copy_from_slice(&bytes[..n]);
    Ok([&buf[..SLOT], &buf[SLOT..]]
        .into_iter()
        .filter_map(decode)
        .max_by_key(|(seq, _)| *seq)
        .map(|(_, p)| p))
}

impl Checkpoint {
    /// Opens (creating if missing) the file in `dir` and reads the newest valid point.
    /// Returns the handle and the point, if any slot is valid.
    pub(crate) fn open(fs: &dyn FileSystem, dir: &Path) -> Result<(Checkpoint, Option<Point>)> {
        let path = dir.join(FILE_NAME);
        let existed = fs.exists(&path);
        let file = fs
            .open(&path, OpenMode::Create)
            .map_err(|e| Error::io("open", &path, e))?;
        if !existed {
            crate::fsutil::sync_dir(fs, dir)?;
        }
        let mut buf = [0u8; 2 * SLOT];
        let len = file.size().map_err(|e| Error::io("stat", &path, e))?;
        let n = (len as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], 0)
            .map_err(|e| Error::io("read", &path, e))?;
        let best = [&buf[..SLOT], &buf[SLOT..]]
            .into_iter()
            .filter_map(decode)
            .max_by_key(|(seq, _)| *seq);
        let (seq, last) = match best {
            Some((s, p)) => (s, Some(p)),
            None => (0, None),
        };
        Ok((
            Checkpoint {
                file,
                path,
                seq,
                last,
            },
            last,
        ))
    }

    /// The newest point written or read.
    pub(crate) fn last(&self) -> Option<Point> {
        self.last
    }

    /// Durably records `p` (which must only cover fdatasync'd, valid data). Points never go
    /// backwards: an older point than the last one written is ignored.
    pub(crate) fn write(&mut self, p: Point) -> Result<()> {
        if self.last.is_some_and(|l| l >= p) {
            return Ok(());
        }
        let seq = self.seq + 1;
        let slot = (seq % 2) * SLOT as u64;
        self.file
            .write_all_at(&encode(seq, &p), slot)
            .map_err(|e| Error::io("write", &self.path, e))?;
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", &self.path, e))?;
        self.seq = seq;
        self.last = Some(p);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // damages files on purpose
mod tests {
    use super::*;

    #[test]
    fn newest_valid_slot_wins_and_torn_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let fs = spool_io::RealFs;
        let (mut c, p) = Checkpoint::open(&fs, dir.path()).unwrap();
        assert_eq!(p, None);
        let a = Point {
            segment_base: 0,
            position: 100,
            next_offset: 10,
        };
        let b = Point {
            segment_base: 0,
            position: 200,
            next_offset: 20,
        };
        c.write(a).unwrap();
        c.write(b).unwrap();
        c.write(a).unwrap(); // older: ignored
        drop(c);
        let (_, p) = Checkpoint::open(&fs, dir.path()).unwrap();
        assert_eq!(p, Some(b));
        // Tear the newest slot (seq 2 lives in slot 0): the previous point survives.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (_, p) = Checkpoint::open(&fs, dir.path()).unwrap();
        assert_eq!(p, Some(a));
    }
}
