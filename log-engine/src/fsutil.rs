//! Small filesystem helpers that carry the durability rules in one place.
//!
//! - A new, renamed or deleted directory entry is durable only after the parent directory is
//!   fsynced ([`sync_dir`]).
//! - A small file is replaced atomically by writing a temporary sibling, fdatasync-ing it,
//!   renaming it over the target and fsyncing the directory ([`write_atomic`]).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// fsyncs a directory so that entries created, renamed or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| Error::io("open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// Replaces `path` with `data` atomically and durably.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_replace(path, data)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Writes `data` to a temporary sibling, fdatasyncs it and renames it over `path`. The rename
/// is durable only once the caller fsyncs the directory.
pub(crate) fn write_replace(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(|e| Error::io("create", tmp, e))?;
    f.write_all(data).map_err(|e| Error::io("write", tmp, e))?;
    f.sync_data().map_err(|e| Error::io("fdatasync", tmp, e))?;
    drop(f);
    fs::rename(tmp, path).map_err(|e| Error::io("rename", path, e))
}

/// Creates a directory (and parents) and fsyncs its parent.
pub(crate) fn create_dir_durable(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}
