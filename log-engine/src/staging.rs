//! Topic directories that appear and disappear all at once.
//!
//! ```text
//! <root>/.tmp-<name>/                  a topic being built (staging)
//! <root>/.tmp-<name>/<p>/00000000000000000000.log, recovery-point   empty partitions (the point (0, 0, 0))
//! <root>/.tmp-<name>/topic.json        written last, fdatasync'd, directory fsynced
//! <root>/<name>/                       a topic: the staging directory renamed in one step
//! <root>/.deleted-<id>-<name>/         a topic being removed (deleted, or a rolled-back create)
//! ```
//!
//! Creating a topic ([`create`]) has one commit point: the rename of the fully built and
//! synced staging directory to the topic's name, made durable by an fsync of the root. Before
//! that fsync returns `Ok` the topic does not exist: a failure removes the staging directory
//! (or, after the rename, moves the topic back out of sight with [`roll_back`]), and a crash
//! leaves only a staging directory, which [`is_leftover`] names and `Log::open` removes.
//! After the commit the caller opens the partitions, which only reads (they are laid out
//! complete); if that fails (`EMFILE` despite the up-front check of `crate::fd_budget`) it
//! rolls back too, so a create either succeeds or leaves nothing, in the running log and after
//! a restart.
//!
//! What no scheme can promise: when the fsync of the commit fails *and* the fsync of the
//! rollback fails too, the directory may reappear after a restart (as a whole, valid topic,
//! never a half-built one). Both failures are logged.

use std::path::{Path, PathBuf};

use spool_io::FileSystem;

use crate::config::TopicConfig;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::partition::Partition;

const STAGING_PREFIX: &str = ".tmp-";
const GRAVEYARD_PREFIX: &str = ".deleted-";
/// Longest part of a topic name kept in a graveyard name: with the prefix and the id the
/// whole name stays within the 255 bytes a file name may have (topic names have 249).
const GRAVEYARD_NAME_PART: usize = 180;

/// True for a root entry that is a staging or graveyard directory (removed on open).
pub(crate) fn is_leftover(entry: &str) -> bool {
    entry.starts_with(STAGING_PREFIX) || entry.starts_with(GRAVEYARD_PREFIX)
}

/// Where topic `name` is built.
fn staging_path(root: &Path, name: &str) -> PathBuf {
    root.join(format!("{STAGING_PREFIX}{name}"))
}

/// A name for a topic directory on its way out; `id` makes it unique.
pub(crate) fn graveyard_path(root: &Path, name: &str, id: &str) -> PathBuf {
    // Topic names are ASCII, so any byte index is a character boundary.
    let part = &name[..name.len().min(GRAVEYARD_NAME_PART)];
    root.join(format!("{GRAVEYARD_PREFIX}{id}-{part}"))
}

/// Removes `dir` and everything in it, if it exists.
fn discard(fs: &dyn FileSystem, dir: &Path) -> Result<()> {
    if fs.exists(dir) {
        fs.remove_dir_all(dir)
            .map_err(|e| Error::io("remove", dir, e))?;
    }
    Ok(())
}

/// Builds topic `name` with `config` under its staging name and makes it visible as
/// `<root>/<name>` (module docs); returns that directory. On error nothing is left behind
/// (best effort for the staging directory, which the next open removes anyway).
/// `graveyard_id` names the directory a rolled-back commit is moved to.
pub(crate) fn create(
    fs: &dyn FileSystem,
    root: &Path,
    name: &str,
    config: &TopicConfig,
    graveyard_id: impl FnOnce() -> String,
) -> Result<PathBuf> {
    let staging = staging_path(root, name);
    // A leftover of an attempt whose cleanup failed.
    discard(fs, &staging)?;
    let built = build(fs, &staging, config);
    let dst = root.join(name);
    let renamed = built.and_then(|()| {
        fs.rename(&staging, &dst)
            .map_err(|e| Error::io("rename", &dst, e))
    });
    if let Err(e) = renamed {
        if let Err(d) = discard(fs, &staging) {
            tracing::warn!(topic = name, error = %d, "could not remove the staging directory of a failed create; the next open removes it");
        }
        return Err(e);
    }
    if let Err(e) = fsutil::sync_dir(fs, root) {
        roll_back(fs, root, name, &graveyard_id());
        return Err(e);
    }
    Ok(dst)
}

/// Lays out the whole topic in the new directory `staging`, every entry synced.
fn build(fs: &dyn FileSystem, staging: &Path, config: &TopicConfig) -> Result<()> {
    fs.create_dir(staging)
        .map_err(|e| Error::io("create directory", staging, e))?;
    for id in 0..config.partitions {
        Partition::create_empty(fs, &staging.join(id.to_string()))?;
    }
    // Last, and with the directory fsync that also covers the partitions' entries.
    crate::log::write_config(fs, staging, config)
}

/// Takes a committed topic directory out of sight again (a create that failed after its
/// commit): renamed to a graveyard, the root fsynced, then removed. Failures are logged; see
/// the module docs for what a double fsync failure leaves.
pub(crate) fn roll_back(fs: &dyn FileSystem, root: &Path, name: &str, id: &str) {
    let dst = root.join(name);
    let graveyard = graveyard_path(root, name, id);
    if let Err(e) = fs.rename(&dst, &graveyard) {
        tracing::error!(topic = name, path = %dst.display(), error = %e, "could not roll back a failed topic creation: the directory stays; remove it before the next start");
        return;
    }
    if let Err(e) = fsutil::sync_dir(fs, root) {
        tracing::error!(topic = name, error = %e, "rolling back a failed topic creation: the root directory fsync failed; the topic may reappear after a restart");
    }
    if let Err(e) = discard(fs, &graveyard) {
        tracing::warn!(topic = name, error = %e, "could not remove a rolled-back topic directory; the next open removes it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graveyard_names_fit_a_file_name_for_the_longest_topic_names() {
        let name = "n".repeat(crate::MAX_TOPIC_NAME);
        let id = format!("{}-{}-{}", u32::MAX, i64::MAX, u64::MAX);
        let p = graveyard_path(Path::new("/r"), &name, &id);
        let file = p.file_name().unwrap().len();
        assert!(file <= 255, "{file} bytes");
        assert!(is_leftover(&p.file_name().unwrap().to_string_lossy()));
        assert!(is_leftover(".tmp-x"));
        assert!(!is_leftover("x"));
    }
}
