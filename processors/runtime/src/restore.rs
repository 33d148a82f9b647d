//! Restoring a partition's local store from the changelog, in the background.
//!
//! From the store's recorded position to the changelog's high watermark as of the start,
//! read committed (waiting while an older transaction is still open there), applied in
//! chunks of at most [`RESTORE_APPLY_BYTES`] of writes (non-durable), then once durably with
//! the final position.
//!
//! An empty store, or one whose position is outside the changelog (the topic was recreated),
//! is rebuilt from the changelog alone in a scratch file `<store>.build` with no journal and
//! no fsync (each page written once), which is fsynced and renamed over the store only when
//! complete (the store stays open, so locked, until then); a crash meanwhile leaves scratch,
//! deleted by the next restore that holds the store's lock.
//!
//! A store whose lock another connection holds ([`StateError::Busy`]: another instance on
//! the same state directory, or an aborted restore of the partition still finishing a step
//! on the blocking pool) is waited for, polling every [`LOCKED_RETRY`]; the partition stays
//! paused meanwhile and the others go on. The runtime cancels a restore by aborting its task
//! (the partition was revoked, the session ended): that happens at an await, so at most the
//! blocking step in flight finishes, and what it opened is closed when it does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use spool_client::{Client, FetchOptions, Fetched, Isolation};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::state::{Backend, CacheSizes, SqliteBackend, StateError, Writes};

/// What a restore task sends back: partition, token, the restored store.
pub(crate) type Restored = (u32, u64, Result<SqliteBackend, String>);

/// A running [`restore_task`], as the session tracks it.
pub(crate) struct Restoring {
    /// Tells its [`Restored`] apart from that of an earlier restore of the partition.
    pub(crate) token: u64,
    pub(crate) handle: JoinHandle<()>,
}

/// A restore ends with its partition: dropping it (revoked, the session stopped or failed,
/// however it ended) cancels the task, which would otherwise go on reading the changelog and
/// holding the store's lock, making the partition's next restore wait for it.
impl Drop for Restoring {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Restores one partition's local store from the changelog: from its recorded position to
/// the changelog's end, read committed (waiting while an older transaction is still open).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn restore_task(
    client: Client,
    changelog: String,
    p: u32,
    path: PathBuf,
    caches: CacheSizes,
    metrics: Arc<Metrics>,
    token: u64,
    done: mpsc::Sender<Restored>,
) {
    let r = restore(&client, &changelog, p, path, caches, &metrics).await;
    let _ = done.send((p, token, r)).await;
}

/// Writes buffered before a local apply during restore.
pub(crate) const RESTORE_APPLY_BYTES: usize = 16 << 20;

pub(crate) async fn restore(
    client: &Client,
    changelog: &str,
    p: u32,
    path: PathBuf,
    caches: CacheSizes,
    metrics: &Metrics,
) -> Result<SqliteBackend, String> {
    let scratch = build_path(&path);
    let backend = open_when_unlocked(p, path.clone(), caches).await?;
    let opts = FetchOptions {
        max_bytes: 8 << 20,
        isolation: Isolation::ReadCommitted,
        ..FetchOptions::default()
    };
    let mut pos = backend.position();
    // An empty store is built from the changelog alone, in a scratch file.
    let mut rebuild = pos == 0;
    let first = loop {
        match client.fetch(changelog, p, pos, &opts).await {
            Ok(f) => break f,
            Err(spool_client::Error::OffsetOutOfRange(o)) => {
                // A local store ahead of (or behind) the changelog belongs to another
                // incarnation of the topic: start over from the changelog alone.
                tracing::warn!(partition = p, position = pos, high_watermark = ?o.high_watermark, "local store does not match the changelog; rebuilding it");
                rebuild = true;
                pos = o.log_start_offset.unwrap_or(0);
            }
            Err(e) if e.is_retriable() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => return Err(e.to_string()),
        }
    };
    if !rebuild {
        let tail = Changelog {
            client,
            topic: changelog,
            partition: p,
            opts: &opts,
            metrics,
        };
        let (b, _) = tail.apply(backend, first, pos).await?;
        return Ok(b);
    }
    // The store stays open, so locked, while its replacement is built: no other opener (another
    // instance on this state directory) takes it, or this build's scratch, meanwhile. It is
    // closed just before the build replaces it.
    let create =
        tokio::task::spawn_blocking(move || SqliteBackend::create_for_build(&scratch, caches));
    let built = create
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let all = Changelog {
        client,
        topic: changelog,
        partition: p,
        opts: &opts,
        metrics,
    };
    let (built, _) = all.apply(built, first, pos).await?;
    tokio::task::spawn_blocking(move || {
        drop(backend);
        built.finish_build(&path, caches)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// How long a restore waits between attempts to open a locked store (each attempt itself
/// waits up to [`crate::state::BUSY_WAIT`]).
pub(crate) const LOCKED_RETRY: Duration = Duration::from_millis(250);

/// Opens partition `p`'s store at `path`, waiting while another connection holds its lock
/// (module docs); then removes the scratch of a build an earlier restore did not finish.
/// Only with the lock held: while another holder has the store, a build of its own may be
/// in progress (a rebuild keeps the store it replaces open until it is done).
async fn open_when_unlocked(
    p: u32,
    path: PathBuf,
    caches: CacheSizes,
) -> Result<SqliteBackend, String> {
    let mut waits = 0u32;
    loop {
        let open_path = path.clone();
        let open = tokio::task::spawn_blocking(move || {
            let b = SqliteBackend::open(&open_path, caches)?;
            crate::state::remove_files(&build_path(&open_path))?;
            Ok(b)
        });
        match open.await.map_err(|e| e.to_string())? {
            Ok(b) => {
                if waits > 0 {
                    tracing::info!(partition = p, "local store unlocked; restoring");
                }
                return Ok(b);
            }
            Err(StateError::Busy(what)) => {
                if waits.is_multiple_of(20) {
                    tracing::warn!(partition = p, store = %what, "local store is locked; waiting for it");
                }
                waits += 1;
                tokio::time::sleep(LOCKED_RETRY).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Where a store is built from the changelog before it replaces the one at `path`.
fn build_path(path: &std::path::Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".build");
    PathBuf::from(p)
}

/// One changelog partition, read committed.
struct Changelog<'a> {
    client: &'a Client,
    topic: &'a str,
    partition: u32,
    opts: &'a FetchOptions,
    metrics: &'a Metrics,
}

impl Changelog<'_> {
    /// Applies the changelog from `pos` (`first` already fetched there) to its high
    /// watermark as of `first`, in local transactions of up to [`RESTORE_APPLY_BYTES`], the
    /// last one durable; the store and the position reached.
    async fn apply(
        &self,
        mut backend: SqliteBackend,
        first: Fetched,
        mut pos: u64,
    ) -> Result<(SqliteBackend, u64), String> {
        let target = first.high_watermark;
        let mut fetched = Some(first);
        let mut pending = Writes::new();
        let mut pending_bytes = 0usize;
        while pos < target {
            let f = match fetched.take() {
                Some(f) => f,
                None => match self
                    .client
                    .fetch(self.topic, self.partition, pos, self.opts)
                    .await
                {
                    Ok(f) => f,
                    Err(e) if e.is_retriable() => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    Err(e) => return Err(e.to_string()),
                },
            };
            self.metrics.restored_records.inc_by(f.records.len() as u64);
            for r in f.records {
                let Some(k) = r.key else { continue };
                pending_bytes += k.len() + r.value.as_ref().map_or(0, |v| v.len());
                pending.insert(k.to_vec(), r.value);
            }
            if f.next_offset <= pos {
                // Behind an open transaction (the last stable offset): wait for its end.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            pos = f.next_offset;
            if pending_bytes >= RESTORE_APPLY_BYTES {
                let w = std::mem::take(&mut pending);
                pending_bytes = 0;
                let (b, r) = blocking(backend, move |b| b.apply(&w, pos, false)).await?;
                r.map_err(|e| e.to_string())?;
                backend = b;
            }
        }
        let (b, r) = blocking(backend, move |b| b.apply(&pending, pos, true)).await?;
        r.map_err(|e| e.to_string())?;
        Ok((b, pos))
    }
}

/// Runs a store operation on the blocking pool, handing the store back.
async fn blocking<T: Send + 'static>(
    mut backend: SqliteBackend,
    f: impl FnOnce(&mut SqliteBackend) -> T + Send + 'static,
) -> Result<(SqliteBackend, T), String> {
    tokio::task::spawn_blocking(move || {
        let r = f(&mut backend);
        (backend, r)
    })
    .await
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::state::{BUSY_WAIT, composite};

    const CACHES: CacheSizes = CacheSizes {
        page_bytes: 1 << 20,
        read_bytes: 0,
    };

    /// A store holding one key at changelog position 7, kept open (so locked), and a
    /// leftover build scratch beside it.
    fn locked_store(dir: &std::path::Path) -> (PathBuf, SqliteBackend) {
        let path = dir.join("g-p0.sqlite");
        let mut holder = SqliteBackend::open(&path, CACHES).unwrap();
        let mut w = Writes::new();
        w.insert(composite("s", b"k"), Some(bytes::Bytes::from_static(b"v")));
        holder.apply(&w, 7, true).unwrap();
        std::fs::write(build_path(&path), b"scratch").unwrap();
        (path, holder)
    }

    /// Long enough for several attempts of the wait loop.
    fn several_tries() -> Duration {
        (BUSY_WAIT + LOCKED_RETRY) * 3
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restore_waits_for_a_locked_store_and_opens_it_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let (path, holder) = locked_store(dir.path());
        let opening = tokio::spawn(open_when_unlocked(0, path.clone(), CACHES));
        tokio::time::sleep(several_tries()).await;
        assert!(
            !opening.is_finished(),
            "opened a store another connection holds"
        );
        assert!(
            build_path(&path).exists(),
            "the holder's scratch is left alone while it holds the store"
        );
        drop(holder);
        let store = tokio::time::timeout(Duration::from_secs(5), opening)
            .await
            .expect("opened within 5 s of the release")
            .unwrap()
            .unwrap();
        assert_eq!(store.position(), 7);
        assert_eq!(
            store.get(&composite("s", b"k")).unwrap().as_deref(),
            Some(&b"v"[..])
        );
        assert!(
            !build_path(&path).exists(),
            "scratch removed once it held the lock"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restore_waiting_for_a_locked_store_ends_with_its_partition() {
        let dir = tempfile::tempdir().unwrap();
        let (path, holder) = locked_store(dir.path());
        // No broker: the restore never gets past the lock.
        let client = Client::builder("127.0.0.1:1").connect_lazy().unwrap();
        let (done, mut results) = mpsc::channel(1);
        let handle = tokio::spawn(restore_task(
            client,
            "g.changelog".into(),
            0,
            path.clone(),
            CACHES,
            Arc::new(Metrics::new()),
            1,
            done,
        ));
        let restoring = Restoring { token: 1, handle };
        tokio::time::sleep(several_tries()).await;
        assert!(!restoring.handle.is_finished());
        // The partition is revoked: the session drops its restore.
        drop(restoring);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), results.recv())
                .await
                .expect("the task ended")
                .is_none(),
            "a cancelled restore sends nothing"
        );
        // Once the holder lets go, nothing of the cancelled restore holds the store (the
        // attempt in flight when it was cancelled may finish, and closes what it opened).
        drop(holder);
        let deadline = Instant::now() + Duration::from_secs(5);
        let store = loop {
            match SqliteBackend::open(&path, CACHES) {
                Ok(s) => break s,
                Err(StateError::Busy(_)) if Instant::now() < deadline => {}
                Err(e) => panic!("the store stays locked after its restore was cancelled: {e}"),
            }
        };
        assert_eq!(store.position(), 7, "untouched");
    }
}
