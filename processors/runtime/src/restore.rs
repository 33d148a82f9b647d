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
//! complete; a crash meanwhile leaves scratch, deleted at the next restore.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use spool_client::{Client, FetchOptions, Fetched, Isolation};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::state::{Backend, CacheSizes, SqliteBackend, StateError, Writes};

/// What a restore task sends back: partition, token, the restored store.
pub(crate) type Restored = (u32, u64, Result<SqliteBackend, String>);

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
    let mut waits = 0u32;
    let backend = loop {
        let open_path = path.clone();
        let open = tokio::task::spawn_blocking(move || {
            // A build an earlier restore did not finish is scratch.
            crate::state::remove_files(&build_path(&open_path))?;
            SqliteBackend::open(&open_path, caches)
        });
        match open.await.map_err(|e| e.to_string())? {
            Ok(b) => break b,
            // Held by another connection: a restore of this partition that is still
            // finishing a chunk after its abort, or another instance on this state directory
            // that still owns the partition. Wait for it (the partition stays paused).
            Err(StateError::Busy(what)) => {
                if waits.is_multiple_of(20) {
                    tracing::warn!(partition = p, store = %what, "local store is locked; waiting for it");
                }
                waits += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    };
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
    drop(backend);
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
    tokio::task::spawn_blocking(move || built.finish_build(&path, caches))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
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
