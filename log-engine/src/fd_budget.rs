//! The open-files budget: partitions are opened only when the process's open-files limit
//! (`RLIMIT_NOFILE`) leaves room for them, so that a topic with thousands of partitions is
//! refused up front with [`Error::OpenFilesLimit`] instead of failing half way with
//! `EMFILE` ("Too many open files").
//!
//! Invariants:
//! - An open partition holds [`FDS_PER_PARTITION`] descriptors for as long as it is open: its
//!   active segment and its recovery-point file. Everything else (sealed segments, indexes,
//!   snapshots, directories) is opened only for the duration of one operation, or memory-mapped
//!   and closed.
//! - Opening `n` partitions is allowed when `n * FDS_PER_PARTITION + FD_HEADROOM` descriptors
//!   are free (the limit minus what the process has open now). [`FD_HEADROOM`] covers the
//!   short-lived descriptors of the operation itself and of concurrent work (the cleaner, a
//!   roll, sockets of an embedding server).
//! - The check is advisory: another thread may open descriptors right after it. An `EMFILE`
//!   that still happens is an ordinary I/O error, and topic creation rolls back on it
//!   (`crate::staging`).

use spool_io::FileSystem;

use crate::error::{Error, Result};

/// Descriptors an open partition holds (active segment and recovery-point file).
pub const FDS_PER_PARTITION: u64 = 2;

/// Descriptors kept free beyond the partitions' own, for short-lived use.
pub const FD_HEADROOM: u64 = 64;

/// Checks that `partitions` more partitions can be opened; `what` names the operation in the
/// error ("creating topic \"t\""). Passes when the file system cannot tell its budget.
pub(crate) fn check(
    fs: &dyn FileSystem,
    partitions: u64,
    what: impl FnOnce() -> String,
) -> Result<()> {
    let Some(budget) = fs.fd_budget() else {
        return Ok(());
    };
    let needed = partitions
        .saturating_mul(FDS_PER_PARTITION)
        .saturating_add(FD_HEADROOM);
    let available = budget.limit.saturating_sub(budget.open);
    if needed <= available {
        return Ok(());
    }
    Err(Error::OpenFilesLimit {
        what: what(),
        partitions,
        needed,
        available,
        limit: budget.limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use spool_io::sim::SimFs;

    #[test]
    fn refuses_what_the_limit_cannot_hold_and_says_how_much() {
        let sim = SimFs::new();
        let fs = sim.fs();
        sim.set_fd_limit(Some(FD_HEADROOM + 10 * FDS_PER_PARTITION));
        check(fs.as_ref(), 10, || "x".into()).unwrap();
        let err = check(fs.as_ref(), 11, || "creating topic \"t\"".into()).unwrap_err();
        match &err {
            Error::OpenFilesLimit {
                needed,
                available,
                limit,
                partitions,
                ..
            } => {
                assert_eq!(*needed, 11 * FDS_PER_PARTITION + FD_HEADROOM);
                assert_eq!(*available, FD_HEADROOM + 10 * FDS_PER_PARTITION);
                assert_eq!(*limit, *available);
                assert_eq!(*partitions, 11);
            }
            other => panic!("expected OpenFilesLimit, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("creating topic \"t\""), "{msg}");
        assert!(msg.contains("needs 86 file descriptors"), "{msg}");
        assert!(msg.contains("84 of the open-files limit 84"), "{msg}");
        // No limit known: nothing to check.
        sim.set_fd_limit(None);
        check(fs.as_ref(), u64::MAX, || "x".into()).unwrap();
    }
}
