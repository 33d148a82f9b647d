//! State stores: named keyed stores per task (input partition), backed by the processor's
//! changelog topic and kept locally in a SQLite file.
//!
//! # Layers
//!
//! A read looks, in order, at the handler call's own writes (discarded if the call fails),
//! the open transaction's writes ([`TaskState`]), then the local store ([`Backend`]), which
//! holds **only committed data**: a transaction's writes reach it after the broker committed
//! the transaction, in one local write together with the changelog position they bring it
//! to. So the local store is always a prefix of the changelog, and a restart reads only the
//! changelog's tail past the recorded position (nothing is ever wiped because of an unclean
//! shutdown, unlike Kafka Streams under exactly-once).
//!
//! # Keys
//!
//! Every store of a processor shares one compacted changelog topic; a changelog record's key
//! (and the local key) is `[store name length: u8][store name][user key]`, its value the
//! stored value, a null value a deletion. Names starting with `__` are the runtime's own
//! (timers, stream time, effects, completion counters).
//!
//! # Why SQLite
//!
//! The local copy needs atomic multi-key commits (writes plus the changelog position, or
//! nothing), ordered keys (range scans for timers and prefixes), a page cache bounded by
//! configuration, and cheap commits that need not be fsynced one by one. SQLite (through
//! `rusqlite`, bundled so no system library is needed) gives all of it with the best-tested
//! crash behaviour there is: in WAL mode a commit with `synchronous = NORMAL` survives a
//! process crash and, after a power loss, the file is a consistent older state. The runtime
//! commits locally after every transaction that way and with `synchronous = FULL` every few
//! seconds and at shutdown; whatever a power loss takes from the *local* copy, the changelog
//! tail restores. redb (pure Rust, copy-on-write B-tree) was the first choice and would fit
//! as well; its published crate pins a toolchain in a `rust-toolchain` file, which rustup
//! cannot install on our build machines, so it fails to build here.
//!
//! # One process per store file: `locking_mode = EXCLUSIVE`
//!
//! A store file belongs to one task of one process: only the runtime opens it (no tool reads
//! it), one connection at a time (the restore hands its connection to the task; a revoked
//! task drops it). So the connection takes SQLite's lock once, when it opens the file, and
//! keeps it until it is closed (`PRAGMA locking_mode = EXCLUSIVE`, set before the WAL is
//! opened, so the WAL index lives in the process's memory, not in a shared `-shm` file).
//! In the default mode every read took and released a shared lock with `fcntl` system calls
//! (a tenth of the kernel time of the matching benchmark). A second opener (another
//! instance started on the same state directory, or a restore that starts while an aborted
//! one still finishes a chunk) gets [`StateError::Busy`] after [`BUSY_WAIT`] and retries
//! (the restore does): before, two processes could write one file and move its recorded
//! position back.
//!
//! # Read cache
//!
//! [`SqliteBackend::get`] keeps the values it read (and the keys it did not find) in memory,
//! up to `read_cache_bytes` per task ([`CacheSizes`]); [`Backend::apply`] updates the cached
//! keys it writes, in the same call, after the local commit succeeded. The backend changes
//! only through `apply`, so a cached entry is always the committed value. Hot keys (deals'
//! products, matching's settings and address flags, including the misses) are then served
//! without SQLite (statement, B-tree walk, a copy of the value). When the budget is reached
//! about half of the entries are dropped (in hash order, i.e. at random).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

/// Longest store name.
pub const MAX_STORE_NAME: usize = 64;

const POSITION: &str = "changelog_next";

/// How long opening a store waits for another connection's lock before [`StateError::Busy`].
pub const BUSY_WAIT: Duration = Duration::from_millis(250);

/// Memory for caching a task's local store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSizes {
    /// SQLite's page cache (bytes; at least 64 KiB are used).
    pub page_bytes: usize,
    /// Values read from the store, kept in memory ([`SqliteBackend::get`]); 0: none.
    pub read_bytes: usize,
}

/// A state-store failure (local I/O, a corrupt file, a bad store name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The local store failed.
    #[error("local state store {path}: {message}")]
    Local {
        /// The store file.
        path: String,
        /// What failed.
        message: String,
    },
    /// A store name that is empty, too long, or reserved.
    #[error("invalid store name {0:?}: 1..=64 bytes, not starting with \"__\"")]
    BadName(String),
    /// Another connection (another process on the same state directory, or a restore still
    /// finishing) holds the store file's lock.
    #[error(
        "local state store {0} is locked by another connection (another instance on the same state directory?)"
    )]
    Busy(String),
}

/// The composite key of `key` in `store`.
pub(crate) fn composite(store: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + store.len() + key.len());
    k.push(store.len() as u8);
    k.extend_from_slice(store.as_bytes());
    k.extend_from_slice(key);
    k
}

/// Checks a user store name.
pub(crate) fn check_name(store: &str) -> Result<(), StateError> {
    if store.is_empty() || store.len() > MAX_STORE_NAME || store.starts_with("__") {
        return Err(StateError::BadName(store.to_owned()));
    }
    Ok(())
}

/// The smallest key greater than every key starting with `prefix` (`None`: no bound).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Writes to apply: composite key → value (`None` deletes).
pub(crate) type Writes = BTreeMap<Vec<u8>, Option<Bytes>>;

/// The committed local copy of one task's state.
pub(crate) trait Backend: Send + Sync {
    /// The committed value of a composite key.
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StateError>;
    /// Committed entries with `from <= key < to` (`to = None`: no end), in key order, at
    /// most `limit`.
    fn range(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, StateError>;
    /// Applies committed writes and records the changelog position they bring the store to,
    /// atomically. `durable`: survive a crash (else a later durable apply makes it so).
    fn apply(&mut self, writes: &Writes, position: u64, durable: bool) -> Result<(), StateError>;
    /// The changelog offset the store is complete up to (exclusive).
    fn position(&self) -> u64;
}

/// An in-memory backend (the test driver's).
#[derive(Debug, Default)]
pub(crate) struct MemBackend {
    map: BTreeMap<Vec<u8>, Bytes>,
    position: u64,
}

impl Backend for MemBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StateError> {
        Ok(self.map.get(key).cloned())
    }

    fn range(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, StateError> {
        use std::ops::Bound;
        let upper = match to {
            Some(t) => Bound::Excluded(t.to_vec()),
            None => Bound::Unbounded,
        };
        Ok(self
            .map
            .range((Bound::Included(from.to_vec()), upper))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(&mut self, writes: &Writes, position: u64, _durable: bool) -> Result<(), StateError> {
        for (k, v) in writes {
            match v {
                Some(v) => {
                    self.map.insert(k.clone(), v.clone());
                }
                None => {
                    self.map.remove(k);
                }
            }
        }
        self.position = self.position.max(position);
        Ok(())
    }

    fn position(&self) -> u64 {
        self.position
    }
}

/// A task's local store: one SQLite file (WAL mode).
///
/// Commits are atomic; `durable = false` commits use `synchronous = NORMAL` (they survive a
/// process crash, and after a power loss the file is still a consistent, older state),
/// `durable = true` commits use `synchronous = FULL`.
pub(crate) struct SqliteBackend {
    conn: std::sync::Mutex<Local>,
    path: PathBuf,
    position: u64,
    /// Built by a restore from the changelog alone: no journal, no fsync until
    /// [`SqliteBackend::finish_build`] (a crash leaves a file that is deleted, never opened).
    building: bool,
}

/// The connection and the read cache, behind one lock.
struct Local {
    conn: rusqlite::Connection,
    cache: ReadCache,
}

/// Bytes an entry of [`ReadCache`] is counted for, besides its key and value.
const CACHE_ENTRY_OVERHEAD: usize = 64;

/// Committed values by composite key (`None`: not in the store), at most `max_bytes`.
#[derive(Debug, Default)]
struct ReadCache {
    map: HashMap<Vec<u8>, Option<Bytes>>,
    bytes: usize,
    max_bytes: usize,
}

fn cache_cost(key: &[u8], value: &Option<Bytes>) -> usize {
    CACHE_ENTRY_OVERHEAD + key.len() + value.as_ref().map_or(0, Bytes::len)
}

impl ReadCache {
    fn new(max_bytes: usize) -> ReadCache {
        ReadCache {
            max_bytes,
            ..ReadCache::default()
        }
    }

    fn get(&self, key: &[u8]) -> Option<&Option<Bytes>> {
        self.map.get(key)
    }

    /// Caches what the store holds for `key` (read from it).
    fn insert(&mut self, key: &[u8], value: &Option<Bytes>) {
        let cost = cache_cost(key, value);
        if cost > self.max_bytes / 4 {
            return; // a value that big would evict most of the cache
        }
        if self.bytes + cost > self.max_bytes {
            self.shrink();
        }
        self.bytes += cost;
        if let Some(old) = self.map.insert(key.to_vec(), value.clone()) {
            self.bytes -= cache_cost(key, &old);
        }
    }

    /// A committed write: updates `key` if it is cached.
    fn update(&mut self, key: &[u8], value: &Option<Bytes>) {
        let Some(slot) = self.map.get_mut(key) else {
            return;
        };
        let old = cache_cost(key, slot);
        let new = cache_cost(key, value);
        if new > self.max_bytes / 4 {
            self.map.remove(key);
            self.bytes -= old;
            return;
        }
        *slot = value.clone();
        self.bytes = self.bytes - old + new;
        if self.bytes > self.max_bytes {
            self.shrink();
        }
    }

    /// Drops entries (in hash order: at random) until at most half the budget is used.
    fn shrink(&mut self) {
        let target = self.max_bytes / 2;
        let mut bytes = self.bytes;
        self.map.retain(|k, v| {
            if bytes <= target {
                return true;
            }
            bytes -= cache_cost(k, v);
            false
        });
        self.bytes = bytes;
    }
}

impl std::fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.path)
            .field("position", &self.position)
            .finish()
    }
}

impl SqliteBackend {
    /// Opens (or creates) `path` with these caches; [`StateError::Busy`] if another
    /// connection holds it.
    pub(crate) fn open(path: &Path, caches: CacheSizes) -> Result<SqliteBackend, StateError> {
        Self::open_mode(path, caches, false)
    }

    /// Creates a store at `path` (deleting what is there) to fill from the changelog alone,
    /// with no rollback journal and no fsync: a restore from scratch writes each page once
    /// instead of to the WAL, then again at the checkpoint. Only
    /// [`SqliteBackend::finish_build`] makes it a store; until then it is scratch.
    pub(crate) fn create_for_build(
        path: &Path,
        caches: CacheSizes,
    ) -> Result<SqliteBackend, StateError> {
        remove_files(path)?;
        Self::open_mode(path, caches, true)
    }

    /// Ends a build: fsyncs the file and moves it to `dest` (replacing the store there and
    /// its WAL), then opens it as a store.
    pub(crate) fn finish_build(
        self,
        dest: &Path,
        caches: CacheSizes,
    ) -> Result<SqliteBackend, StateError> {
        let err = |e: &dyn std::fmt::Display| StateError::Local {
            path: dest.display().to_string(),
            message: e.to_string(),
        };
        let local = self
            .conn
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        local.conn.close().map_err(|(_, e)| err(&e))?;
        std::fs::File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(|e| err(&e))?;
        // A WAL left beside the old store would be replayed into the new file: remove it
        // (and the old store) first. A crash in between leaves no store: the next start
        // restores from the changelog again.
        remove_files(dest)?;
        std::fs::rename(&self.path, dest).map_err(|e| err(&e))?;
        if let Some(dir) = dest.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| err(&e))?;
        }
        SqliteBackend::open(dest, caches)
    }

    fn open_mode(
        path: &Path,
        caches: CacheSizes,
        building: bool,
    ) -> Result<SqliteBackend, StateError> {
        let err = |e: &rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StateError::Busy(path.display().to_string())
            }
            _ => StateError::Local {
                path: path.display().to_string(),
                message: e.to_string(),
            },
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StateError::Local {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        }
        let conn = rusqlite::Connection::open(path).map_err(|e| err(&e))?;
        conn.busy_timeout(BUSY_WAIT).map_err(|e| err(&e))?;
        let kib = (caches.page_bytes / 1024).max(64);
        let (journal, sync) = if building {
            ("OFF", "OFF")
        } else {
            ("WAL", "NORMAL")
        };
        // The lock mode first: the WAL is then opened with its index in this process's
        // memory and the file locked until the connection closes (module docs).
        conn.execute_batch(&format!(
            "PRAGMA locking_mode = EXCLUSIVE;
             PRAGMA journal_mode = {journal};
             PRAGMA synchronous = {sync};
             PRAGMA cache_size = -{kib};
             PRAGMA temp_store = MEMORY;
             CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, v INTEGER NOT NULL);"
        ))
        .map_err(|e| err(&e))?;
        let position: i64 = conn
            .query_row("SELECT v FROM meta WHERE name = ?1", [POSITION], |r| {
                r.get(0)
            })
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(0),
                e => Err(e),
            })
            .map_err(|e| err(&e))?;
        Ok(SqliteBackend {
            conn: std::sync::Mutex::new(Local {
                conn,
                cache: ReadCache::new(caches.read_bytes),
            }),
            path: path.to_owned(),
            position: u64::try_from(position).unwrap_or(0),
            building,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Local {
            path: self.path.display().to_string(),
            message: e.to_string(),
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Local> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Backend for SqliteBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StateError> {
        let mut local = self.conn();
        if let Some(v) = local.cache.get(key) {
            return Ok(v.clone());
        }
        let value = {
            let mut st = local
                .conn
                .prepare_cached("SELECT v FROM kv WHERE k = ?1")
                .map_err(|e| self.err(e))?;
            let mut rows = st.query([key]).map_err(|e| self.err(e))?;
            match rows.next().map_err(|e| self.err(e))? {
                Some(row) => {
                    let v: Vec<u8> = row.get(0).map_err(|e| self.err(e))?;
                    Some(Bytes::from(v))
                }
                None => None,
            }
        };
        if !self.building {
            local.cache.insert(key, &value);
        }
        Ok(value)
    }

    fn range(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, StateError> {
        let local = self.conn();
        let c = &local.conn;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let map = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(Vec<u8>, Bytes)> {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                Bytes::from(r.get::<_, Vec<u8>>(1)?),
            ))
        };
        let rows: rusqlite::Result<Vec<(Vec<u8>, Bytes)>> = match to {
            Some(to) => {
                let mut st = c
                    .prepare_cached(
                        "SELECT k, v FROM kv WHERE k >= ?1 AND k < ?2 ORDER BY k LIMIT ?3",
                    )
                    .map_err(|e| self.err(e))?;
                st.query_map(rusqlite::params![from, to, limit], map)
                    .map_err(|e| self.err(e))?
                    .collect()
            }
            None => {
                let mut st = c
                    .prepare_cached("SELECT k, v FROM kv WHERE k >= ?1 ORDER BY k LIMIT ?2")
                    .map_err(|e| self.err(e))?;
                st.query_map(rusqlite::params![from, limit], map)
                    .map_err(|e| self.err(e))?
                    .collect()
            }
        };
        rows.map_err(|e| self.err(e))
    }

    fn apply(&mut self, writes: &Writes, position: u64, durable: bool) -> Result<(), StateError> {
        let position = position.max(self.position);
        let path = self.path.display().to_string();
        let err = |e: rusqlite::Error| StateError::Local {
            path: path.clone(),
            message: e.to_string(),
        };
        let mut local = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Local { conn: c, cache } = &mut *local;
        if !self.building {
            c.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })
                .map_err(err)?;
        }
        let tx = c.transaction().map_err(err)?;
        {
            let mut put = tx
                .prepare_cached("INSERT OR REPLACE INTO kv (k, v) VALUES (?1, ?2)")
                .map_err(err)?;
            let mut del = tx
                .prepare_cached("DELETE FROM kv WHERE k = ?1")
                .map_err(err)?;
            for (k, v) in writes {
                match v {
                    Some(v) => put.execute(rusqlite::params![k, v.as_ref()]).map_err(err)?,
                    None => del.execute([k]).map_err(err)?,
                };
            }
            tx.execute(
                "INSERT OR REPLACE INTO meta (name, v) VALUES (?1, ?2)",
                rusqlite::params![POSITION, i64::try_from(position).unwrap_or(i64::MAX)],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        if !cache.map.is_empty() {
            for (k, v) in writes {
                cache.update(k, v);
            }
        }
        drop(local);
        self.position = position;
        Ok(())
    }

    fn position(&self) -> u64 {
        self.position
    }
}

/// Removes a store file and its WAL and shared-memory files (those that exist).
pub(crate) fn remove_files(path: &Path) -> Result<(), StateError> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StateError::Local {
                    path: path.display().to_string(),
                    message: e.to_string(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// One task's state: the local store, the committed writes not yet applied to it, and the
/// open transaction's writes.
///
/// Committed writes are applied to the local store in batches ([`TaskState::flush`]): one
/// SQLite transaction per batch of up to `apply_bytes` of writes instead of one per broker
/// transaction, so a leaf page of a large store is rewritten once for many keys (with
/// random keys and a store larger than the page cache, one SQLite transaction per 100 ms
/// rewrote about one 4 KiB page, plus its checkpoint copy, per key). Until then they are a
/// read layer between the open transaction and the local store. The local store and its
/// recorded position stay a prefix of the changelog; a crash loses only the batch, which the
/// restart reads again from the changelog's tail.
pub(crate) struct TaskState {
    pub(crate) backend: Box<dyn Backend>,
    /// Committed writes not yet in `backend` (last value per key).
    committed: Writes,
    /// Bytes held by `committed` (keys and values).
    committed_bytes: usize,
    /// The changelog position `committed` brings the local store to.
    committed_position: Option<u64>,
    /// An apply that was not fsynced ran since the last one that was (or since the store
    /// was opened, which found it durable): a durable [`TaskState::flush`] with nothing to
    /// apply has to fsync only then.
    undurable: bool,
    /// Writes of the transaction being committed in the background (last value per key):
    /// a read layer between `committed` and `txn` until the commit's outcome is known
    /// ([`TaskState::begin_commit`], [`TaskState::commit_done`]).
    committing: Writes,
    /// Writes of the open transaction (last value per key).
    pub(crate) txn: Writes,
    /// Bytes held by `txn` (keys and values), to bound it.
    pub(crate) txn_bytes: usize,
}

impl std::fmt::Debug for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskState")
            .field("position", &self.position())
            .field("unapplied_writes", &self.committed.len())
            .field("committing_writes", &self.committing.len())
            .field("txn_writes", &self.txn.len())
            .finish()
    }
}

/// Merges `writes` into `into` (later values win), keeping `bytes` = keys + values held.
fn merge_into(into: &mut Writes, bytes: &mut usize, writes: Writes) {
    for (k, v) in writes {
        let klen = k.len();
        let vlen = v.as_ref().map_or(0, Bytes::len);
        match into.insert(k, v) {
            Some(old) => {
                *bytes = bytes.saturating_sub(old.as_ref().map_or(0, Bytes::len)) + vlen;
            }
            None => *bytes += klen + vlen,
        }
    }
}

impl TaskState {
    pub(crate) fn new(backend: Box<dyn Backend>) -> TaskState {
        TaskState {
            backend,
            committed: Writes::new(),
            committed_bytes: 0,
            committed_position: None,
            undurable: false,
            committing: Writes::new(),
            txn: Writes::new(),
            txn_bytes: 0,
        }
    }

    /// The value of a composite key as the open transaction sees it.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Bytes>, StateError> {
        match self
            .txn
            .get(key)
            .or_else(|| self.committing.get(key))
            .or_else(|| self.committed.get(key))
        {
            Some(v) => Ok(v.clone()),
            None => self.backend.get(key),
        }
    }

    /// Live entries with `from <= key < to` as the open transaction sees them, with `call`'s
    /// writes (a handler call's own) on top, in key order, at most `limit`.
    pub(crate) fn range(
        &self,
        call: Option<&Writes>,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Bytes)>, StateError> {
        let mut layers = vec![&self.committed, &self.committing, &self.txn];
        layers.extend(call);
        merged_range(self.backend.as_ref(), &layers, from, to, limit)
    }

    /// Adds one handler call's writes to the open transaction.
    pub(crate) fn merge(&mut self, writes: Writes) {
        merge_into(&mut self.txn, &mut self.txn_bytes, writes);
    }

    /// Drops the open transaction's writes and those of a commit in flight (it aborted, and
    /// the open transaction read what the aborted one wrote).
    pub(crate) fn discard(&mut self) {
        self.txn.clear();
        self.txn_bytes = 0;
        self.committing.clear();
    }

    /// The open transaction's writes start committing (in the background): they stay
    /// readable as a layer under the next transaction's until [`TaskState::commit_done`]
    /// (or [`TaskState::discard`] if the commit fails). Returns them, to be sent as changelog
    /// records. At most one commit is in flight: the previous one must be done.
    pub(crate) fn begin_commit(&mut self) -> &Writes {
        debug_assert!(self.committing.is_empty(), "a commit is already in flight");
        self.txn_bytes = 0;
        let w = std::mem::take(&mut self.txn);
        if self.committing.is_empty() {
            self.committing = w;
        } else {
            let mut bytes = 0;
            merge_into(&mut self.committing, &mut bytes, w);
        }
        &self.committing
    }

    /// The commit in flight committed, in the changelog up to `position`: its writes join
    /// the committed writes waiting for the next [`TaskState::flush`]. Whether it wrote
    /// anything.
    pub(crate) fn commit_done(&mut self, position: Option<u64>) -> bool {
        if self.committing.is_empty() {
            return false;
        }
        let w = std::mem::take(&mut self.committing);
        let position = position.unwrap_or_else(|| self.position());
        self.committed(w, position);
        true
    }

    /// Takes the open transaction's writes (to send as changelog records, then apply).
    pub(crate) fn take(&mut self) -> Writes {
        self.txn_bytes = 0;
        std::mem::take(&mut self.txn)
    }

    /// `writes` committed (in the changelog up to `position`): they join the writes waiting
    /// for the next [`TaskState::flush`].
    pub(crate) fn committed(&mut self, writes: Writes, position: u64) {
        if self.committed.is_empty() {
            // The first transaction since the last apply: its writes become the layer.
            self.committed_bytes = writes
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len))
                .sum();
            self.committed = writes;
        } else {
            merge_into(&mut self.committed, &mut self.committed_bytes, writes);
        }
        self.committed_position = Some(self.committed_position.unwrap_or(0).max(position));
    }

    /// Bytes of committed writes not yet in the local store.
    pub(crate) fn unapplied_bytes(&self) -> usize {
        self.committed_bytes
    }

    /// Applies the committed writes to the local store in one local transaction, with the
    /// changelog position they bring it to; `durable`: fsynced (else a process crash keeps
    /// it and a power loss may take it, which the changelog's tail restores).
    /// Nothing to apply and (for `durable`) nothing applied since the last fsync: no
    /// local transaction at all (a stateless processor's stores are never written, and
    /// their fsync every `durable_interval` stalled its loop for nothing).
    pub(crate) fn flush(&mut self, durable: bool) -> Result<(), StateError> {
        if self.committed.is_empty()
            && self.committed_position.is_none()
            && (!durable || !self.undurable)
        {
            return Ok(());
        }
        let position = self.position();
        self.backend.apply(&self.committed, position, durable)?;
        self.undurable = !durable;
        self.committed.clear();
        self.committed_bytes = 0;
        self.committed_position = None;
        Ok(())
    }

    /// The changelog position the committed state corresponds to.
    pub(crate) fn position(&self) -> u64 {
        self.committed_position
            .unwrap_or(0)
            .max(self.backend.position())
    }
}

/// Merges a committed range with overlay layers (later layers win), in key order, at most
/// `limit` live entries with `from <= key < to`.
pub(crate) fn merged_range(
    backend: &dyn Backend,
    overlays: &[&Writes],
    from: &[u8],
    to: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<(Vec<u8>, Bytes)>, StateError> {
    use std::ops::Bound;
    let upper = match to {
        Some(t) => Bound::Excluded(t.to_vec()),
        None => Bound::Unbounded,
    };
    let bounds = (Bound::Included(from.to_vec()), upper);
    // Deleted keys in the overlays can hide committed entries: ask for that many more.
    let extra: usize = overlays
        .iter()
        .map(|o| o.range(bounds.clone()).count())
        .sum();
    let mut merged: BTreeMap<Vec<u8>, Option<Bytes>> = backend
        .range(from, to, limit.saturating_add(extra))?
        .into_iter()
        .map(|(k, v)| (k, Some(v)))
        .collect();
    let last_committed = merged.keys().next_back().cloned();
    let committed_full = merged.len() >= limit.saturating_add(extra);
    for o in overlays {
        for (k, v) in o.range(bounds.clone()) {
            merged.insert(k.clone(), v.clone());
        }
    }
    Ok(merged
        .into_iter()
        // Past the last committed key we fetched, committed keys may be missing: stop there
        // if the committed scan was cut by the limit.
        .filter(|(k, _)| !committed_full || last_committed.as_ref().is_none_or(|l| k <= l))
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .take(limit)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    const CACHES: CacheSizes = CacheSizes {
        page_bytes: 1 << 20,
        read_bytes: 1 << 20,
    };

    #[test]
    fn keys_compose_and_split() {
        let k = composite("prices", b"sku-1");
        assert_eq!(k, b"\x06pricessku-1".to_vec());
        assert!(check_name("__timers").is_err());
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        check_name("prices").unwrap();
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
    }

    #[test]
    fn sqlite_keeps_committed_writes_and_position_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-0.sqlite");
        {
            let mut s = SqliteBackend::open(&path, CACHES).unwrap();
            assert_eq!(s.position(), 0);
            let mut w = Writes::new();
            w.insert(composite("a", b"1"), Some(b("one")));
            w.insert(composite("a", b"2"), Some(b("two")));
            s.apply(&w, 7, false).unwrap();
            let mut w = Writes::new();
            w.insert(composite("a", b"1"), None);
            s.apply(&w, 9, true).unwrap();
            assert_eq!(s.range(b"", None, 10).unwrap().len(), 1);
        }
        let s = SqliteBackend::open(&path, CACHES).unwrap();
        assert_eq!(s.position(), 9);
        assert_eq!(s.get(&composite("a", b"1")).unwrap(), None);
        assert_eq!(s.get(&composite("a", b"2")).unwrap(), Some(b("two")));
    }

    #[test]
    fn a_build_replaces_the_store_and_its_wal_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-0.sqlite");
        let scratch = dir.path().join("task-0.sqlite.build");
        // The old store, with commits still in its WAL (not checkpointed: the connection is
        // leaked as a killed process would leave it).
        let mut old = SqliteBackend::open(&path, CACHES).unwrap();
        let mut w = Writes::new();
        w.insert(composite("a", b"old"), Some(b("x")));
        old.apply(&w, 5, false).unwrap();
        std::mem::forget(old);
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);

        let mut built = SqliteBackend::create_for_build(&scratch, CACHES).unwrap();
        let mut w = Writes::new();
        w.insert(composite("a", b"new"), Some(b("y")));
        built.apply(&w, 3, false).unwrap();
        built.apply(&Writes::new(), 4, true).unwrap();
        let s = built.finish_build(&path, CACHES).unwrap();
        assert!(!scratch.exists());
        assert_eq!(s.position(), 4);
        assert_eq!(s.get(&composite("a", b"old")).unwrap(), None);
        assert_eq!(s.get(&composite("a", b"new")).unwrap(), Some(b("y")));
        drop(s);
        let s = SqliteBackend::open(&path, CACHES).unwrap();
        assert_eq!(s.position(), 4);
        assert_eq!(s.range(b"", None, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_store_file_has_one_connection_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-0.sqlite");
        let mut first = SqliteBackend::open(&path, CACHES).unwrap();
        let mut w = Writes::new();
        w.insert(composite("a", b"1"), Some(b("one")));
        first.apply(&w, 1, false).unwrap();
        let started = std::time::Instant::now();
        match SqliteBackend::open(&path, CACHES) {
            Err(StateError::Busy(p)) => assert_eq!(p, path.display().to_string()),
            other => panic!("second connection: {other:?}"),
        }
        assert!(started.elapsed() < BUSY_WAIT * 8, "{:?}", started.elapsed());
        // Reads and writes of the holder go on; once it is closed the file opens again.
        assert_eq!(first.get(&composite("a", b"1")).unwrap(), Some(b("one")));
        first.apply(&Writes::new(), 2, true).unwrap();
        drop(first);
        let s = SqliteBackend::open(&path, CACHES).unwrap();
        assert_eq!(s.position(), 2);
        assert_eq!(s.get(&composite("a", b"1")).unwrap(), Some(b("one")));
        // No shared-memory index beside the file: the WAL index is in the process.
        let mut shm = path.as_os_str().to_owned();
        shm.push("-shm");
        assert!(!std::path::Path::new(&shm).exists());
    }

    #[test]
    fn cached_reads_follow_applied_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("task-0.sqlite");
        let mut s = SqliteBackend::open(&path, CACHES).unwrap();
        let (k1, k2) = (composite("a", b"1"), composite("a", b"2"));
        s.apply(&Writes::from([(k1.clone(), Some(b("one")))]), 1, false)
            .unwrap();
        // Cached: a value and a miss.
        assert_eq!(s.get(&k1).unwrap(), Some(b("one")));
        assert_eq!(s.get(&k2).unwrap(), None);
        assert_eq!(s.conn().cache.map.len(), 2);
        // Writes to cached keys replace the cached answers.
        let w = Writes::from([(k1.clone(), None), (k2.clone(), Some(b("two")))]);
        s.apply(&w, 2, false).unwrap();
        assert_eq!(s.get(&k1).unwrap(), None);
        assert_eq!(s.get(&k2).unwrap(), Some(b("two")));
        drop(s);
        let s = SqliteBackend::open(&path, CACHES).unwrap();
        assert_eq!(s.get(&k1).unwrap(), None);
        assert_eq!(s.get(&k2).unwrap(), Some(b("two")));
    }

    #[test]
    fn the_read_cache_stays_within_its_budget() {
        let mut c = ReadCache::new(10_000);
        for i in 0..1_000u32 {
            let v = Some(Bytes::from(vec![0u8; (i % 50) as usize]));
            c.insert(&i.to_be_bytes(), &v);
            assert!(c.bytes <= 10_000, "{} bytes after {i}", c.bytes);
            assert_eq!(c.get(&i.to_be_bytes()), Some(&v));
            let sum: usize = c.map.iter().map(|(k, v)| cache_cost(k, v)).sum();
            assert_eq!(sum, c.bytes);
        }
        // An update that grows an entry past the budget shrinks the cache.
        let k = 999u32.to_be_bytes();
        c.update(&k, &Some(Bytes::from(vec![1u8; 2_000])));
        assert!(c.bytes <= 10_000);
        // A value over a quarter of the budget is not cached; a cached key growing that big
        // is dropped.
        c.insert(b"big", &Some(Bytes::from(vec![0u8; 3_000])));
        assert_eq!(c.get(b"big"), None);
        c.insert(b"k", &None);
        c.update(b"k", &Some(Bytes::from(vec![0u8; 3_000])));
        assert_eq!(c.get(b"k"), None);
        let sum: usize = c.map.iter().map(|(k, v)| cache_cost(k, v)).sum();
        assert_eq!(sum, c.bytes);
        // No budget: nothing cached.
        let mut none = ReadCache::new(0);
        none.insert(b"k", &None);
        assert!(none.map.is_empty());
    }

    #[test]
    fn committed_writes_are_read_before_their_apply_and_kept_by_it() {
        let mut t = TaskState::new(Box::new(MemBackend::default()));
        let k = composite("a", b"1");
        t.merge(Writes::from([(k.clone(), Some(b("one")))]));
        let w = t.take();
        t.committed(w, 3);
        assert_eq!(t.backend.position(), 0);
        assert_eq!(t.position(), 3);
        assert_eq!(t.get(&k).unwrap(), Some(b("one")));
        // The open transaction deletes it; the committed layer is under it.
        t.merge(Writes::from([(k.clone(), None)]));
        assert_eq!(t.get(&k).unwrap(), None);
        assert!(t.range(None, b"", None, 10).unwrap().is_empty());
        t.discard();
        assert_eq!(t.range(None, b"", None, 10).unwrap().len(), 1);
        assert!(t.unapplied_bytes() > 0);
        t.flush(true).unwrap();
        assert_eq!((t.backend.position(), t.unapplied_bytes()), (3, 0));
        assert_eq!(t.backend.get(&k).unwrap(), Some(b("one")));
    }

    #[test]
    fn a_commit_in_flight_is_read_under_the_next_transaction_and_dropped_with_it() {
        let mut t = TaskState::new(Box::new(MemBackend::default()));
        let (k1, k2) = (composite("a", b"1"), composite("a", b"2"));
        t.merge(Writes::from([(k1.clone(), Some(b("one")))]));
        let sent: Vec<Vec<u8>> = t.begin_commit().keys().cloned().collect();
        assert_eq!(sent, vec![k1.clone()]);
        assert_eq!(t.txn_bytes, 0);
        // The next transaction reads the committing writes and shadows them.
        assert_eq!(t.get(&k1).unwrap(), Some(b("one")));
        t.merge(Writes::from([
            (k2.clone(), Some(b("two"))),
            (k1.clone(), None),
        ]));
        assert_eq!(t.get(&k1).unwrap(), None);
        assert_eq!(t.range(None, b"", None, 10).unwrap().len(), 1);
        // Committed: its writes join the committed layer at the changelog position.
        assert!(t.commit_done(Some(7)));
        assert_eq!(t.position(), 7);
        t.discard();
        assert_eq!(t.get(&k1).unwrap(), Some(b("one")));
        assert_eq!(t.get(&k2).unwrap(), None);
        // A failed commit: discard drops its writes and the open transaction's.
        t.merge(Writes::from([(k2.clone(), Some(b("two")))]));
        t.begin_commit();
        t.merge(Writes::from([(k1.clone(), Some(b("uno")))]));
        t.discard();
        assert!(!t.commit_done(Some(9)));
        assert_eq!(t.position(), 7);
        assert_eq!(t.get(&k1).unwrap(), Some(b("one")));
        assert_eq!(t.get(&k2).unwrap(), None);
    }

    #[test]
    fn merged_range_applies_overlays_in_order() {
        let mut m = MemBackend::default();
        let mut w = Writes::new();
        for i in 0..10u8 {
            w.insert(vec![b'k', i], Some(Bytes::from(vec![i])));
        }
        m.apply(&w, 1, true).unwrap();
        let mut txn = Writes::new();
        txn.insert(vec![b'k', 0], None);
        txn.insert(vec![b'k', 1], None);
        txn.insert(vec![b'k', 20], Some(b("new")));
        let mut call = Writes::new();
        call.insert(vec![b'k', 2], Some(b("call")));
        let r = merged_range(&m, &[&txn, &call], b"k", None, 3).unwrap();
        let keys: Vec<u8> = r.iter().map(|(k, _)| k[1]).collect();
        assert_eq!(keys, vec![2, 3, 4]);
        assert_eq!(r[0].1, b("call"));
        let all = merged_range(&m, &[&txn, &call], b"k", None, 100).unwrap();
        assert_eq!(all.len(), 9);
        assert_eq!(all.last().unwrap().0, vec![b'k', 20]);
    }
}
