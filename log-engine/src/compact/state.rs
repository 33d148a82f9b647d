//! The cleaner's per-partition state file, `cleaner-state`.
//!
//! ```text
//! 40 bytes, little-endian:
//! { magic u32 = "SPCS" | version u16 = 1 | reserved u16 = 0 | first_dirty u64
//!   | sparse_below u64 | next_horizon i64 | crc u32 (CRC-32 of bytes 0..36) }
//! ```
//!
//! - `first_dirty`: offsets below it were deduplicated by a completed pass (the *clean*
//!   section holds at most one record per key); the cleaner's next map starts there. Only an
//!   optimisation: a value too low costs work, never data.
//! - `sparse_below`: segments whose base offset is below it may have been rewritten, so their
//!   offsets may skip ([`crate::segment::Chain::Sparse`]). Written, and made durable, before
//!   the first swap that needs it; never lowered.
//! - `next_horizon`: the earliest delete horizon of a tombstone the cleaner kept (`i64::MAX`:
//!   none), so that a partition is cleaned again when a tombstone may go even if nothing new
//!   was written.
//!
//! Replaced atomically (`cleaner-state.tmp`, fdatasync, rename, fsync of the directory). A
//! missing file means "never cleaned"; a damaged one is read as "every segment may be sparse,
//! nothing is clean", which is always safe.

use std::path::Path;

use spool_io::FileSystem;

use crate::error::{Error, Result};

/// File name inside a partition directory.
pub(crate) const FILE_NAME: &str = "cleaner-state";
const MAGIC: u32 = u32::from_le_bytes(*b"SPCS");
const VERSION: u16 = 1;
const LEN: usize = 40;

/// What the state file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct State {
    pub(crate) first_dirty: u64,
    pub(crate) sparse_below: u64,
    pub(crate) next_horizon: i64,
}

impl State {
    /// A partition never cleaned.
    pub(crate) const NEVER: State = State {
        first_dirty: 0,
        sparse_below: 0,
        next_horizon: i64::MAX,
    };

    /// What a damaged file is read as.
    const UNKNOWN: State = State {
        first_dirty: 0,
        sparse_below: u64::MAX,
        next_horizon: i64::MIN,
    };

    pub(crate) fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.first_dirty.to_le_bytes());
        b[16..24].copy_from_slice(&self.sparse_below.to_le_bytes());
        b[24..32].copy_from_slice(&self.next_horizon.to_le_bytes());
        let crc = crc32fast::hash(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<State> {
        if b.len() != LEN
            || u32::from_le_bytes([b[36], b[37], b[38], b[39]]) != crc32fast::hash(&b[..36])
            || u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != MAGIC
            || u16::from_le_bytes([b[4], b[5]]) != VERSION
        {
            return None;
        }
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        Some(State {
            first_dirty: u64_at(8),
            sparse_below: u64_at(16),
            next_horizon: u64_at(24) as i64,
        })
    }

    /// Reads the state of the partition in `dir` (never fails on content: see the module
    /// docs).
    pub(crate) fn read(fs: &dyn FileSystem, dir: &Path) -> Result<State> {
        let path = dir.join(FILE_NAME);
        // At most one byte more than the format's length: a longer file is damaged.
        match fs.read_at_most(&path, LEN) {
            Ok(b) => Ok(State::decode(&b).unwrap_or_else(|| {
                tracing::warn!(path = %path.display(), "damaged cleaner state: treating every segment as possibly compacted");
                State::UNKNOWN
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::NEVER),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    /// Replaces the state file atomically and durably.
    pub(crate) fn write(&self, fs: &dyn FileSystem, dir: &Path) -> Result<()> {
        crate::fsutil::write_atomic(fs, &dir.join(FILE_NAME), &self.encode())
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // damages files on purpose
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let fs = spool_io::RealFs;
        assert_eq!(State::read(&fs, dir.path()).unwrap(), State::NEVER);
        let s = State {
            first_dirty: 42,
            sparse_below: 100,
            next_horizon: -5,
        };
        s.write(&fs, dir.path()).unwrap();
        assert_eq!(State::read(&fs, dir.path()).unwrap(), s);
        let mut b = s.encode();
        b[9] ^= 1;
        std::fs::write(dir.path().join(FILE_NAME), b).unwrap();
        let d = State::read(&fs, dir.path()).unwrap();
        assert_eq!(d.sparse_below, u64::MAX);
        assert_eq!(d.first_dirty, 0);
    }
}
