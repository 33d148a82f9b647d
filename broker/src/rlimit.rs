//! The open-files limit at start: spoold raises its soft `RLIMIT_NOFILE` to the hard limit.
//!
//! Each open partition holds two descriptors (active segment, recovery point), so the usual
//! soft default of 1024 caps a broker at a few hundred partitions even where the hard limit
//! (systemd's `LimitNOFILE=`, `ulimit -Hn`) allows far more; raising the soft limit is what
//! Kafka's and most servers' start scripts do. An unlimited hard limit is left alone (the
//! kernel refuses an unlimited soft one). The log engine's descriptor check
//! (`spool_log_engine::fd_budget`) reads the limit in force, so this runs before the log opens.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// What [`raise_open_files_limit`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFilesLimit {
    /// The soft limit was raised from `from` to the hard limit `to`.
    Raised {
        /// The soft limit before.
        from: u64,
        /// The hard limit, now also the soft one.
        to: u64,
    },
    /// Left as it was: already at the hard limit, or the hard limit is unlimited (`None`).
    Unchanged {
        /// The soft limit (`None`: unlimited).
        soft: Option<u64>,
        /// The hard limit (`None`: unlimited).
        hard: Option<u64>,
    },
}

/// Raises the soft open-files limit to the hard limit (module docs).
pub fn raise_open_files_limit() -> std::io::Result<OpenFilesLimit> {
    let lim = getrlimit(Resource::Nofile);
    match (lim.current, lim.maximum) {
        (Some(soft), Some(hard)) if soft < hard => {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(hard),
                    maximum: Some(hard),
                },
            )?;
            Ok(OpenFilesLimit::Raised {
                from: soft,
                to: hard,
            })
        }
        (soft, hard) => Ok(OpenFilesLimit::Unchanged { soft, hard }),
    }
}
