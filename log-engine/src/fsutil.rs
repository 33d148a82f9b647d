//! Small filesystem helpers that carry the durability rules in one place. Every file operation
//! of the engine goes through a [`FileSystem`] (the I/O seam, `spool_io`), never `std::fs`.
//!
//! - A new, renamed or deleted directory entry is durable only after the parent directory is
//!   fsynced ([`sync_dir`]).
//! - A small file is replaced atomically by writing a temporary sibling, fdatasync-ing it,
//!   renaming it over the target and fsyncing the directory ([`write_atomic`]). A replacement
//!   that fails removes its temporary file.

use std::path::{Path, PathBuf};

use spool_io::{FileSystem, OpenMode};

use crate::error::{Error, Result};

/// fsyncs a directory so that entries created, renamed or removed in it are durable.
pub(crate) fn sync_dir(fs: &dyn FileSystem, dir: &Path) -> Result<()> {
    fs.sync_dir(dir)
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// Replaces `path` with `data` atomically and durably.
pub(crate) fn write_atomic(fs: &dyn FileSystem, path: &Path, data: &[u8]) -> Result<()> {
    write_replace(fs, path, data)?;
    sync_dir(fs, path.parent().unwrap_or(Path::new(".")))
}

/// The temporary sibling [`write_replace`] writes first: `<path>.tmp`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Writes `data` to a temporary sibling, fdatasyncs it and renames it over `path`. The rename
/// is durable only once the caller fsyncs the directory. On failure the temporary file is
/// removed (best effort), so a full disk leaves nothing behind.
pub(crate) fn write_replace(fs: &dyn FileSystem, path: &Path, data: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let res = write_synced(fs, &tmp, data).and_then(|()| {
        fs.rename(&tmp, path)
            .map_err(|e| Error::io("rename", path, e))
    });
    if res.is_err() {
        let _ = fs.remove_file(&tmp);
    }
    res
}

/// Creates (or truncates) `path`, writes `data` and fdatasyncs it. No directory fsync.
pub(crate) fn write_synced(fs: &dyn FileSystem, path: &Path, data: &[u8]) -> Result<()> {
    let f = fs
        .open(path, OpenMode::CreateTruncate)
        .map_err(|e| Error::io("create", path, e))?;
    f.write_all_at(data, 0)
        .map_err(|e| Error::io("write", path, e))?;
    f.sync_data().map_err(|e| Error::io("fdatasync", path, e))
}

/// Creates a directory and any missing parents, fsyncing the parent of each one created (and
/// the directory's parent even if it existed, in case an earlier creation was cut short).
pub(crate) fn create_dir_durable(fs: &dyn FileSystem, dir: &Path) -> Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !fs.exists(a))
        .collect();
    for d in missing.iter().rev() {
        match fs.create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create directory", d, e)),
        }
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(fs, parent)?;
        }
    }
    if missing.is_empty()
        && let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty())
    {
        sync_dir(fs, parent)?;
    }
    Ok(())
}

/// Removes a file, ignoring one that is not there.
pub(crate) fn remove_if_present(fs: &dyn FileSystem, p: &Path) -> Result<()> {
    match fs.remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p, e)),
    }
}
