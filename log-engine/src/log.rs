//! A log: a directory of topics, each a directory of partitions.
//!
//! ```text
//! <root>/.lock                       held (flock) while the log is open
//! <root>/<topic>/topic.json          the topic's TopicConfig, replaced atomically
//! <root>/<topic>/<partition>/        NNN.log, NNN.index, NNN.timeindex, recovery-point
//! ```
//!
//! Invariants:
//! - Only one `Log` has a directory open at a time (an exclusive lock on `.lock`).
//! - A topic appears atomically and all or nothing: it is assembled complete (partitions
//!   included) under `.tmp-<name>`, renamed into place and the root fsynced; a failure at any
//!   step, the opening of its partitions included, leaves no topic, in memory or on disk
//!   ([`crate::staging`]). A deleted topic is renamed to `.deleted-<id>-<name>` first, so a
//!   crash never leaves a half-deleted topic visible. Leftovers of both, and a `topic.json.tmp`
//!   of a replacement cut short, are removed on open.
//! - Partitions are opened only when the open-files limit leaves room for them
//!   ([`crate::fd_budget`]): on open, create and add_partitions.
//! - Admin operations (create, delete, alter, add partitions) are serialised; the data path
//!   never takes the admin lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use spool_io::{FileLock, FileSystem};

use crate::compact::{CleanReport, Cleaner};
use crate::config::{Clock, FsyncPolicy, LogOptions, TopicConfig};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::mapcache::MapCache;
use crate::partition::{Partition, RecoveryReport, Shared, lock};
use crate::{fd_budget, staging};

const TOPIC_META: &str = "topic.json";
const LOCK_FILE: &str = ".lock";

/// Longest topic name (Kafka's limit).
pub const MAX_TOPIC_NAME: usize = 249;

/// Checks a topic name: 1–249 characters of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let bad = |reason| {
        Err(Error::InvalidTopicName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() || name.len() > MAX_TOPIC_NAME {
        return bad("must be 1 to 249 characters");
    }
    if name.starts_with('.') {
        return bad("may not start with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return bad("may contain only ASCII letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

#[derive(Debug)]
struct Topic {
    config: Arc<TopicConfig>,
    partitions: Vec<Arc<Partition>>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    shared: Arc<Shared>,
    retention_every: Duration,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    admin: Mutex<()>,
    stop: Mutex<bool>,
    stop_cv: Condvar,
    /// The directory lock (released when dropped).
    _lock: Box<dyn FileLock>,
    /// The log cleaner of compacted topics (its map is allocated on first use).
    cleaner: Mutex<Cleaner>,
    /// Set when closing: a running cleaning pass stops at its next batch.
    cleaner_stop: Arc<AtomicBool>,
    cleaner_every: Duration,
}

/// An open log. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Log {
    inner: Arc<Inner>,
    maintenance: Mutex<Option<JoinHandle<()>>>,
    cleaner: Mutex<Option<JoinHandle<()>>>,
    reports: Vec<(String, u32, RecoveryReport)>,
}

pub(crate) fn read_config(fs: &dyn FileSystem, path: &Path) -> Result<TopicConfig> {
    // Bounded before anything is allocated: `decode` refuses the longer ones.
    let bytes = fs
        .read_at_most(path, crate::topic_file::MAX_LEN)
        .map_err(|e| Error::io("read", path, e))?;
    crate::topic_file::decode(path, &bytes)
}

/// Takes the exclusive lock of the log directory `root` that an open [`Log`] holds
/// ([`Error::Locked`] if another holds it). With `create` false, a missing lock file means
/// nobody has the log open and nothing is created: `Ok(None)`. Dropping the guard unlocks.
pub(crate) fn lock_dir(
    fs: &dyn FileSystem,
    root: &Path,
    create: bool,
) -> Result<Option<Box<dyn FileLock>>> {
    let lock_path = root.join(LOCK_FILE);
    match fs.lock(&lock_path, create) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            Err(Error::Locked(root.to_path_buf()))
        }
        Err(e) => Err(Error::io("lock", &lock_path, e)),
    }
}

pub(crate) fn write_config(fs: &dyn FileSystem, dir: &Path, cfg: &TopicConfig) -> Result<()> {
    fsutil::write_atomic(fs, &dir.join(TOPIC_META), &crate::topic_file::encode(cfg)?)
}

impl Log {
    /// Opens the log in `dir`, creating the directory if needed, and recovers every partition.
    pub fn open(dir: impl AsRef<Path>, opts: LogOptions) -> Result<Log> {
        let root = dir.as_ref().to_path_buf();
        opts.limits.validate()?;
        let fs = opts.fs.clone();
        fsutil::create_dir_durable(fs.as_ref(), &root)?;
        let lock_file = lock_dir(fs.as_ref(), &root, true)?.expect("created if missing");
        let shared = Arc::new(Shared {
            fs: fs.clone(),
            replaced: (opts.clock.now_ms(), std::sync::atomic::AtomicU64::new(0)),
            limits: opts.limits.clone(),
            clock: opts.clock.clone(),
            verify_reads: opts.verify_reads,
            maps: MapCache::new(opts.limits.max_mapped_segments),
            writeback: crate::writeback::WriteBack::start(),
            zero_ahead_bytes: crate::config::zero_ahead_window(opts.zero_ahead_bytes),
            zero_in_background: opts.background_maintenance,
            abandoned_passes: std::sync::atomic::AtomicU64::new(0),
        });
        let mut topics = BTreeMap::new();
        let mut reports = Vec::new();
        let mut names = Vec::new();
        let mut entries = fs
            .read_dir(&root)
            .map_err(|e| Error::io("read directory", &root, e))?;
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for entry in entries {
            let name = entry.name;
            let p = root.join(&name);
            if staging::is_leftover(&name) {
                fs.remove_dir_all(&p)
                    .map_err(|e| Error::io("remove", &p, e))?;
                continue;
            }
            let meta = fs.metadata(&p.join(TOPIC_META));
            if meta.is_ok_and(|m| !m.is_dir) && validate_topic_name(&name).is_ok() {
                // A replacement of topic.json cut short by a crash or a full disk.
                fsutil::remove_if_present(fs.as_ref(), &fsutil::tmp_path(&p.join(TOPIC_META)))?;
                names.push(name);
            }
        }
        names.sort();
        let mut configs = Vec::with_capacity(names.len());
        for name in names {
            let cfg = read_config(fs.as_ref(), &root.join(&name).join(TOPIC_META))?;
            configs.push((name, Arc::new(cfg)));
        }
        let total: u64 = configs.iter().map(|(_, c)| u64::from(c.partitions)).sum();
        fd_budget::check(fs.as_ref(), total, || {
            format!("opening {} ({} topic(s))", root.display(), configs.len())
        })?;
        for (name, cfg) in configs {
            let tdir = root.join(&name);
            let mut partitions = Vec::with_capacity(cfg.partitions as usize);
            for id in 0..cfg.partitions {
                let (p, report) = Partition::open(
                    &name,
                    id,
                    &tdir.join(id.to_string()),
                    cfg.clone(),
                    shared.clone(),
                    true,
                )?;
                reports.push((name.clone(), id, report));
                partitions.push(p.into_arc());
            }
            topics.insert(
                name,
                Arc::new(Topic {
                    config: cfg,
                    partitions,
                }),
            );
        }
        let cleaner = Cleaner::new(opts.cleaner.clone());
        let cleaner_stop = cleaner.stop_flag();
        let inner = Arc::new(Inner {
            root,
            shared,
            retention_every: opts.retention_check_interval,
            topics: RwLock::new(topics),
            admin: Mutex::new(()),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
            _lock: lock_file,
            cleaner: Mutex::new(cleaner),
            cleaner_stop,
            cleaner_every: opts.cleaner.check_interval.max(Duration::from_millis(1)),
        });
        let maintenance = opts.background_maintenance.then(|| {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("spool-log-maint".into())
                .spawn(move || maintenance_loop(&inner))
                .expect("spawning the maintenance thread")
        });
        let cleaner = (opts.background_maintenance && opts.cleaner.enabled).then(|| {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("spool-log-cleaner".into())
                .spawn(move || cleaner_loop(&inner))
                .expect("spawning the cleaner thread")
        });
        Ok(Log {
            inner,
            maintenance: Mutex::new(maintenance),
            cleaner: Mutex::new(cleaner),
            reports,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.root
    }

    /// The clock the log was opened with ([`LogOptions::clock`]): what it uses for rolls,
    /// retention and append times, and what a program embedding it can share, so that one
    /// injected clock drives everything.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.shared.clock
    }

    /// What recovery found in each partition when the log was opened.
    pub fn recovery_reports(&self) -> &[(String, u32, RecoveryReport)] {
        &self.reports
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.inner
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| Error::TopicNotFound(name.to_owned()))
    }

    /// Creates a topic with `config.partitions` empty partitions, all or nothing: on any error
    /// the topic does not exist, neither now nor after a restart (see [`crate::staging`]).
    /// Refused with [`Error::OpenFilesLimit`] when the open-files limit leaves too few
    /// descriptors for its partitions ([`crate::fd_budget`]).
    pub fn create_topic(&self, name: &str, config: TopicConfig) -> Result<()> {
        validate_topic_name(name)?;
        config.validate()?;
        let _admin = lock(&self.inner.admin);
        if self.topic(name).is_ok() {
            return Err(Error::TopicExists(name.to_owned()));
        }
        let root = &self.inner.root;
        let shared = &self.inner.shared;
        let fs = shared.fs.as_ref();
        fd_budget::check(fs, u64::from(config.partitions), || {
            format!("creating topic {name:?}")
        })?;
        let dst = staging::create(fs, root, name, &config, || shared.next_replace_id())?;
        let cfg = Arc::new(config);
        let opened = (0..cfg.partitions)
            .map(|id| {
                let pdir = dst.join(id.to_string());
                Partition::open(name, id, &pdir, cfg.clone(), shared.clone(), false)
                    .map(|(p, _)| p.into_arc())
            })
            .collect::<Result<Vec<_>>>();
        let partitions = match opened {
            Ok(p) => p,
            Err(e) => {
                staging::roll_back(fs, root, name, &shared.next_replace_id());
                return Err(e);
            }
        };
        self.inner
            .topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name.to_owned(),
                Arc::new(Topic {
                    config: cfg,
                    partitions,
                }),
            );
        tracing::info!(topic = name, "created topic");
        Ok(())
    }

    /// Deletes a topic and all its data.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let _admin = lock(&self.inner.admin);
        let topic = self
            .inner
            .topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
            .ok_or_else(|| Error::TopicNotFound(name.to_owned()))?;
        // `close_deleted` returns once no retention or cleaner pass of the partition is still
        // running (later ones do nothing): none may touch files by name in the directory a
        // topic re-created under this name will use.
        for p in &topic.partitions {
            p.close_deleted().ok();
        }
        let root = &self.inner.root;
        let fs = self.inner.shared.fs.as_ref();
        let graveyard = staging::graveyard_path(root, name, &self.inner.shared.next_replace_id());
        let src = root.join(name);
        fs.rename(&src, &graveyard)
            .map_err(|e| Error::io("rename", &src, e))?;
        fsutil::sync_dir(fs, root)?;
        fs.remove_dir_all(&graveyard)
            .map_err(|e| Error::io("remove", &graveyard, e))?;
        tracing::info!(topic = name, "deleted topic");
        Ok(())
    }

    /// Names of all topics, sorted.
    pub fn topics(&self) -> Vec<String> {
        self.inner
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// A topic's configuration.
    pub fn topic_config(&self, name: &str) -> Result<TopicConfig> {
        Ok(self.topic(name)?.config.as_ref().clone())
    }

    /// Replaces a topic's configuration (the partition count must not change; see
    /// [`Log::add_partitions`]). Applies to the next append, roll and retention pass.
    ///
    /// A change that makes retention delete more (a lower `retention_ms` or
    /// `retention_bytes`, or one newly set) works on a full disk: the new retention is applied
    /// in memory and enforced on every partition first, which frees space, and only then is
    /// `topic.json` replaced. If that write still fails, the old configuration is back in
    /// effect and the error is returned (segments the new retention already deleted stay
    /// deleted); no `topic.json.tmp` is left behind.
    pub fn alter_topic(&self, name: &str, config: TopicConfig) -> Result<()> {
        config.validate()?;
        let _admin = lock(&self.inner.admin);
        let topic = self.topic(name)?;
        if config.partitions != topic.config.partitions {
            return Err(Error::InvalidConfig(
                "use add_partitions to change the partition count".into(),
            ));
        }
        let old = &topic.config;
        if deletes_more(old, &config) {
            let interim = Arc::new(TopicConfig {
                retention_ms: config.retention_ms,
                retention_bytes: config.retention_bytes,
                cleanup: config.cleanup,
                ..old.as_ref().clone()
            });
            for p in &topic.partitions {
                p.set_config(interim.clone());
                if let Err(e) = p.enforce_retention() {
                    tracing::warn!(topic = name, partition = p.id(), error = %e, "retention before altering the topic's configuration failed");
                }
            }
        }
        if let Err(e) = write_config(
            self.inner.shared.fs.as_ref(),
            &self.inner.root.join(name),
            &config,
        ) {
            for p in &topic.partitions {
                p.set_config(old.clone());
            }
            return Err(e);
        }
        let cfg = Arc::new(config);
        for p in &topic.partitions {
            p.set_config(cfg.clone());
        }
        self.replace_topic(
            name,
            Topic {
                config: cfg,
                partitions: topic.partitions.clone(),
            },
        );
        Ok(())
    }

    /// Grows a topic to `total` partitions (never shrinks).
    pub fn add_partitions(&self, name: &str, total: u32) -> Result<()> {
        let _admin = lock(&self.inner.admin);
        let topic = self.topic(name)?;
        let old = topic.config.partitions;
        if total <= old {
            return Err(Error::InvalidConfig(format!(
                "topic has {old} partitions; new count {total} must be larger"
            )));
        }
        let config = TopicConfig {
            partitions: total,
            ..topic.config.as_ref().clone()
        };
        config.validate()?;
        fd_budget::check(
            self.inner.shared.fs.as_ref(),
            u64::from(total - old),
            || format!("adding {} partition(s) to topic {name:?}", total - old),
        )?;
        let tdir = self.inner.root.join(name);
        let cfg = Arc::new(config);
        let mut partitions = topic.partitions.clone();
        for id in old..total {
            let pdir = tdir.join(id.to_string());
            let fs = self.inner.shared.fs.as_ref();
            if fs.exists(&pdir) {
                // Left by a crash between creating it and recording the new count: never used.
                fs.remove_dir_all(&pdir)
                    .map_err(|e| Error::io("remove", &pdir, e))?;
            }
            let (p, _) = Partition::open(
                name,
                id,
                &pdir,
                cfg.clone(),
                self.inner.shared.clone(),
                true,
            )?;
            partitions.push(p.into_arc());
        }
        write_config(self.inner.shared.fs.as_ref(), &tdir, &cfg)?;
        for p in &partitions {
            p.set_config(cfg.clone());
        }
        self.replace_topic(
            name,
            Topic {
                config: cfg,
                partitions,
            },
        );
        Ok(())
    }

    fn replace_topic(&self, name: &str, topic: Topic) {
        self.inner
            .topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), Arc::new(topic));
    }

    /// One partition of a topic.
    pub fn partition(&self, topic: &str, id: u32) -> Result<Arc<Partition>> {
        self.topic(topic)?
            .partitions
            .get(id as usize)
            .cloned()
            .ok_or_else(|| Error::PartitionNotFound {
                topic: topic.to_owned(),
                partition: id,
            })
    }

    /// All partitions of a topic.
    pub fn partitions(&self, topic: &str) -> Result<Vec<Arc<Partition>>> {
        Ok(self.topic(topic)?.partitions.clone())
    }

    /// One pass of background work: due interval flushes, then retention. The background
    /// thread calls this; embedders that turned it off call it themselves. Without background
    /// maintenance it also runs the zeroing ahead that is due ([`LogOptions::zero_ahead_bytes`];
    /// with it, the writers queue that for the write-back thread).
    pub fn run_maintenance(&self) -> Result<()> {
        run_pass(&self.inner, true)
    }

    /// One pass of the log cleaner over every partition of every compacted topic, where due
    /// (see [`crate::compact`]). The cleaner thread calls this; embedders that turned it off
    /// call it themselves. Returns what each pass that ran did.
    pub fn run_cleaner(&self) -> Result<Vec<(String, u32, CleanReport)>> {
        clean_pass(&self.inner)
    }

    /// Runs a cleaning pass on one partition now, due or not, with the log's cleaner.
    pub fn clean_now(&self, topic: &str, partition: u32) -> Result<CleanReport> {
        let p = self.partition(topic, partition)?;
        lock(&self.inner.cleaner).clean_now(&p)
    }

    /// Cleaner passes, over every partition since the log opened, that stopped without
    /// recording progress because retention removed part of a group while the pass ran (or
    /// the partition was poisoned meanwhile)
    /// ([`CleanReport::abandoned`]; each is logged at info level). Many of them on a
    /// `compact,delete` topic mean its compaction hardly moves forward: passes last about as
    /// long as its oldest segments live.
    pub fn abandoned_cleaner_passes(&self) -> u64 {
        self.inner.shared.abandoned_passes.load(Ordering::Relaxed)
    }

    /// Number of sealed segments currently memory-mapped.
    pub fn mapped_segments(&self) -> usize {
        self.inner.shared.maps.len()
    }

    /// Stops background work, flushes every partition and writes final recovery points.
    pub fn close(&self) -> Result<()> {
        *lock(&self.inner.stop) = true;
        self.inner.cleaner_stop.store(true, Ordering::Relaxed);
        self.inner.stop_cv.notify_all();
        if let Some(h) = lock(&self.maintenance).take() {
            h.join().ok();
        }
        if let Some(h) = lock(&self.cleaner).take() {
            h.join().ok();
        }
        let mut first_err = None;
        for topic in self
            .inner
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            for p in &topic.partitions {
                if let Err(e) = p.close() {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "closing the log failed");
        }
    }
}

/// True when `new` makes retention delete data `old` keeps.
fn deletes_more(old: &TopicConfig, new: &TopicConfig) -> bool {
    fn lower(new: Option<u64>, old: Option<u64>) -> bool {
        match (new, old) {
            (Some(n), Some(o)) => n < o,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
    new.cleanup.deletes()
        && (!old.cleanup.deletes()
            || lower(new.retention_ms, old.retention_ms)
            || lower(new.retention_bytes, old.retention_bytes))
}

fn all_partitions(inner: &Inner) -> Vec<Arc<Partition>> {
    inner
        .topics
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .flat_map(|t| t.partitions.iter().cloned())
        .collect()
}

fn run_pass(inner: &Inner, retention: bool) -> Result<()> {
    let mut first_err = None;
    for p in all_partitions(inner) {
        if !inner.shared.zero_in_background && inner.shared.zero_ahead_bytes > 0 {
            // Without background maintenance nothing else zeroes ahead (errors poison the
            // partition, which its next write reports).
            p.zero_ahead_if_due();
        }
        let res = p.flush_if_due().and_then(|_| {
            if retention {
                p.enforce_retention().map(|_| ())
            } else {
                Ok(())
            }
        });
        if let Err(e) = res {
            tracing::error!(topic = p.topic(), partition = p.id(), error = %e, "maintenance failed");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn maintenance_loop(inner: &Inner) {
    let mut next_retention = Instant::now() + inner.retention_every;
    loop {
        let tick = inner
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|t| match t.config.fsync {
                FsyncPolicy::Interval { interval_ms } => Some(Duration::from_millis(interval_ms)),
                _ => None,
            })
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(inner.retention_every)
            .max(Duration::from_millis(1));
        {
            let stop = lock(&inner.stop);
            if *stop {
                return;
            }
            let (stop, _) = inner
                .stop_cv
                .wait_timeout(stop, tick)
                .unwrap_or_else(|p| p.into_inner());
            if *stop {
                return;
            }
        }
        let retention = Instant::now() >= next_retention;
        if retention {
            next_retention = Instant::now() + inner.retention_every;
        }
        // Errors are logged inside; a poisoned partition stays poisoned until reopened.
        let _ = run_pass(inner, retention);
    }
}

/// Partitions of compacted topics.
fn compacted_partitions(inner: &Inner) -> Vec<Arc<Partition>> {
    inner
        .topics
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .filter(|t| t.config.cleanup.compacts())
        .flat_map(|t| t.partitions.iter().cloned())
        .collect()
}

fn clean_pass(inner: &Inner) -> Result<Vec<(String, u32, CleanReport)>> {
    let mut out = Vec::new();
    let mut first_err = None;
    for p in compacted_partitions(inner) {
        if inner.cleaner_stop.load(Ordering::Relaxed) {
            break;
        }
        if p.is_poisoned() {
            continue;
        }
        match lock(&inner.cleaner).clean(&p) {
            Ok(r) if r.ran => out.push((p.topic().to_owned(), p.id(), r)),
            Ok(_) => {}
            Err(Error::Closed | Error::TopicDeleted { .. }) => {}
            Err(e) => {
                tracing::error!(topic = p.topic(), partition = p.id(), error = %e, "log cleaner failed");
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(out), Err)
}

fn cleaner_loop(inner: &Inner) {
    loop {
        {
            let stop = lock(&inner.stop);
            if *stop {
                return;
            }
            let (stop, _) = inner
                .stop_cv
                .wait_timeout(stop, inner.cleaner_every)
                .unwrap_or_else(|p| p.into_inner());
            if *stop {
                return;
            }
        }
        // Errors are logged inside; the next round tries again.
        let _ = clean_pass(inner);
    }
}
