//! The only place that creates memory maps.
//!
//! Contract that makes the `unsafe` sound in practice: Spool never truncates or rewrites a
//! byte range of a file while a mapping of that range may be alive. Segment files are
//! append-only while active; a mapping covers at most the bytes already written when it was
//! made; recovery truncates a torn tail *before* any reader exists; retention renames files
//! and unlinks them only when the last mapping is gone. Another process truncating Spool's
//! files underneath it (which the directory lock forbids to other Spool processes) would make
//! readers fault; that is the documented price of zero-copy reads (Kafka and TANK pay it too).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions};

/// Maps the first `len` bytes of `file` read-only and returns them as `Bytes` whose owner
/// (the mapping plus `keep_alive`) lives as long as any slice of it.
pub(crate) fn map<K: Send + Sync + 'static>(
    file: &File,
    len: usize,
    keep_alive: K,
) -> io::Result<Bytes> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: `len` never exceeds the bytes already written to `file` (callers pass a length
    // they read from the file's metadata or from the writer's published position), and the
    // module contract above guarantees the range is not truncated or modified while mapped.
    let mmap = unsafe { MmapOptions::new().len(len).map(file)? };
    Ok(Bytes::from_owner(Owner {
        mmap,
        _keep_alive: keep_alive,
    }))
}

struct Owner<K> {
    mmap: Mmap,
    _keep_alive: K,
}

impl<K> AsRef<[u8]> for Owner<K> {
    fn as_ref(&self) -> &[u8] {
        &self.mmap
    }
}
