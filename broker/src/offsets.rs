//! Consumer-group committed offsets, kept in the log itself.
//!
//! Every commit is one batch appended to the internal topic `__consumer_offsets` (one
//! partition, `fsync = always`) before the reply, so a commit survives restart and kill -9
//! exactly like produced data. The in-memory map is rebuilt on start by replaying that topic;
//! the log is the only truth, so the two cannot drift.
//!
//! Locking (why the store's lock is not held across an fsync): a commit (or a deletion)
//! takes the lock to run its fence, choose what it writes and append it (page cache), then
//! releases it for the fsync, and takes it again to apply the batch to the map. So one
//! group's commit waiting for the disk no longer holds up every other group's commits and
//! fetches (a fetch waited for the lock for as long as the fsync took). What that lock used to
//! give, and what keeps it now:
//! - the map is the log's content: each key's entry carries the log position it came from,
//!   and a batch that lands after a later batch of the same key (their fsyncs finished in the
//!   other order) leaves the newer entry alone ([`apply_commit`], [`apply_tombstone`]); replay
//!   applies the log in order, so both agree;
//! - a reader of one group never sees an older offset than a commit of that group appended
//!   before it: a batch between its append and its landing is *in flight* for its group, and
//!   a fetch first waits, for its own group only, until every batch of that group appended
//!   before it started has landed or failed ([`OffsetStore::settle`]). A new owner of a
//!   partition therefore reads the previous owner's last acknowledged-or-pending commit, as
//!   before; group B's fetch does not wait for group A's fsync;
//! - a writer that reads the map before it appends (a decided transaction's commit filtering
//!   by `offsets_since`, a deletion choosing its keys) waits until its group has nothing in
//!   flight at all, and the group's commits that arrive meanwhile wait for it
//!   ([`OffsetStore::settle_for_write`]): its read and its append are again one lock hold with
//!   no commit of the group in between, as when the lock covered the fsync (a commit appended
//!   during its wait would otherwise be invisible to its read and land under its batch).
//!   Phase-fair: a commit waits only for the writers that arrived before it, a writer only
//!   for what was in flight or waiting before it (writers of a group go in arrival order),
//!   so neither a stream of writers nor one of commits holds the other back for good;
//! - kept, on purpose: such a writer's append waits for the previous batch of its group to be
//!   durable, so a group's writers get one fsync each (its plain commits still share group
//!   commits). Letting it append beside batches in flight would need its read to see their
//!   keys, and a batch in flight may yet fail; writers are rare (a transaction's decision, a
//!   group deletion), so the simpler rule stays;
//! - [`OffsetStore::next_position`] counts batches appended but not yet durable, so "every
//!   commit appended after it is at or after it" still holds with commits in flight.
//!
//! The fsyncs of the one partition still run one after another (the engine's group commit):
//! a commit of group B still waits for group A's fsync to finish, as any two appends to one
//! partition do; only readers and the lock stopped waiting. The FetchOffsets service reads on
//! the runtime's thread only when the lock is free and the group has nothing in flight
//! ([`OffsetStore::fetch_if_settled`]; the lock is held across an append, which can wait for
//! a segment roll's fdatasync), else on the blocking pool. ListGroups and the metrics' scrape
//! (which lists every committed offset) take the lock only on the blocking pool.
//!
//! ```text
//! record key   = group \0 topic \0 partition (decimal)
//! record value = JSON {"offset": u64, "metadata": string, "time_ms": i64}
//!                or null: a tombstone, the partition's committed offset was deleted
//! ```
//!
//! Group membership (`groups/`) keeps each group's coordinator state in the same topic, one
//! record per change under the key `\x01group\0<group>` (a key no offset record can have:
//! group names are printable) with a JSON snapshot as value; replay keeps the latest per group
//! and hands them to `groups` ([`OffsetStore::take_group_states`]). Fenced commits run their
//! ownership check through [`OffsetStore::commit_with`], under the same lock as the append.
//!
//! Deleting a group (`DeleteGroup`) appends one batch holding a tombstone per deleted key,
//! durably, then removes the keys from the map; replay removes a key at its tombstone, so a
//! deletion survives restart exactly like a commit, and a later commit brings the key back.
//!
//! The topic is compacted ([`offsets_topic_config`]): the cleaner keeps the latest record of
//! each key and drops tombstones a day after it first passed them, so the topic stays about
//! as large as the set of live committed offsets. Replay reads it through the gaps compaction
//! leaves in its offsets; every record it keeps is the latest of its key, so the map it builds
//! is the same as before compaction. A log created before topics could be compacted has its
//! topic switched to compaction at start.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use spool_log_engine::{BatchBuilder, CleanupPolicy, Compression, Limits, Log, TopicConfig};
use spool_proto::v1;

use crate::error::BrokerError;

/// Name of the internal topic.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Longest group name.
pub(crate) const MAX_GROUP_NAME: usize = 249;
/// Longest commit metadata.
pub(crate) const MAX_METADATA: usize = 4096;
/// Key prefix of group-membership state records.
pub(crate) const GROUP_STATE_PREFIX: &[u8] = b"\x01group\0";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Value {
    offset: u64,
    metadata: String,
    time_ms: i64,
    /// Where in `__consumer_offsets` this commit is (not stored: the record's own offset).
    #[serde(skip)]
    pos: u64,
}

type Key = (String, String, u32);

type Map = BTreeMap<Key, Value>;

/// Batches appended to `__consumer_offsets` by this store (commits, deletions) that have not
/// landed in the map yet: their fsync is running without the store's lock.
#[derive(Debug, Default)]
struct InFlight {
    /// Sequence number the next appended batch gets (one per append, in log order).
    next_seq: u64,
    /// Log position right after the last batch appended here.
    appended_end: u64,
    /// Sequence numbers in flight, per group (a group with none has no entry).
    by_group: BTreeMap<String, BTreeSet<u64>>,
    /// Ticket the next waiting writer gets (arrival order, all groups).
    next_writer: u64,
    /// Writers that read the group's keys before they append (a decided transaction's
    /// commit, a deletion) waiting for the group to have nothing in flight: their tickets,
    /// per group (none: no entry). A commit of the group that arrives while one waits waits
    /// for it before its fence, so nothing can slip in between the writer's read and its
    /// append; it does not wait for writers that arrive after it (phase-fair: a steady stream
    /// of writers cannot hold a commit back). Writers of a group go in ticket order.
    writers: BTreeMap<String, BTreeSet<u64>>,
}

/// One batch in flight: unregistered (and waiters woken) when dropped, whether it landed,
/// failed or its thread panicked. Must not be dropped while the map lock is held.
struct Pending<'a> {
    store: &'a OffsetStore,
    group: String,
    seq: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let map = self.store.lock_map();
        let mut f = self.store.lock_in_flight();
        if let Some(set) = f.by_group.get_mut(&self.group) {
            set.remove(&self.seq);
            if set.is_empty() {
                f.by_group.remove(&self.group);
            }
        }
        drop(f);
        drop(map);
        self.store.landed.notify_all();
    }
}

/// Applies a committed offset that landed at `v.pos`, unless the map already holds a newer
/// record of the key (a later batch whose fsync finished first): the map keeps the log's last
/// word per key, as replay does.
fn apply_commit(map: &mut Map, deleted: &mut BTreeMap<Key, u64>, k: Key, v: Value) {
    let newer =
        map.get(&k).is_some_and(|o| o.pos > v.pos) || deleted.get(&k).is_some_and(|&d| d > v.pos);
    if newer {
        return;
    }
    deleted.remove(&k);
    map.insert(k, v);
}

/// Applies a tombstone that landed at `pos`, unless the map holds a newer record of the key.
fn apply_tombstone(map: &mut Map, deleted: &mut BTreeMap<Key, u64>, k: Key, pos: u64) {
    let newer =
        map.get(&k).is_some_and(|o| o.pos > pos) || deleted.get(&k).is_some_and(|&d| d > pos);
    if newer {
        return;
    }
    map.remove(&k);
    deleted.insert(k, pos);
}

/// The committed offsets of all groups.
#[derive(Debug)]
pub(crate) struct OffsetStore {
    log: Arc<Log>,
    map: Mutex<Map>,
    /// Where in `__consumer_offsets` each deleted key's tombstone is (replay included, as long
    /// as compaction keeps the tombstone). Locked only while `map` is held.
    deleted: Mutex<BTreeMap<Key, u64>>,
    /// Batches between their append and their landing in `map`. Locked only while `map` is
    /// held.
    in_flight: Mutex<InFlight>,
    /// Notified (after `map` is released) whenever a batch in flight lands or fails.
    landed: Condvar,
    /// How many reads waited for a batch of their group in flight (read by the tests).
    settle_waits: AtomicU64,
    /// How many commits waited for a writer of their group (read by the tests).
    writer_yields: AtomicU64,
    /// Latest group-membership state record per group, until `groups` takes them.
    group_states: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Most bytes a fetch of all a group's offsets answers (`with_max_answer_bytes`: the
    /// reply's encode limit, `limits.max_request_bytes`), counted before anything is cloned;
    /// a group whose answer would be larger is refused, as tonic would refuse to send it.
    max_answer_bytes: usize,
}

/// Most bytes one `CommittedOffset` adds to a FetchOffsets reply besides its topic and
/// metadata: field tags, length prefixes, the partition, offset and time varints (at most
/// 2 + 3 + 1 + 5 + 1 + 10 + 1 + 3 + 1 + 10 = 37; rounded up).
const ANSWER_ENTRY_OVERHEAD: usize = 48;

/// The internal topic's configuration: compacted (as Kafka's `__consumer_offsets`), in
/// 100 MiB segments (Kafka's `offsets.topic.segment.bytes`), so the cleaner gets to work
/// long before a default 1 GiB segment would fill.
pub(crate) fn offsets_topic_config() -> TopicConfig {
    TopicConfig {
        cleanup: CleanupPolicy::Compact,
        segment_bytes: 100 << 20,
        ..TopicConfig::default()
    }
}

fn encode_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    format!("{group}\0{topic}\0{partition}").into_bytes()
}

fn decode_key(k: &[u8]) -> Option<Key> {
    let s = std::str::from_utf8(k).ok()?;
    let mut it = s.split('\0');
    let (g, t, p) = (it.next()?, it.next()?, it.next()?);
    Some((g.to_owned(), t.to_owned(), p.parse().ok()?))
}

impl OffsetStore {
    /// Opens the store, creating the internal topic if needed, and replays it. Blocking.
    pub(crate) fn open(log: Arc<Log>, limits: &Limits) -> Result<OffsetStore, BrokerError> {
        match log.topic_config(OFFSETS_TOPIC) {
            Err(_) => log.create_topic(OFFSETS_TOPIC, offsets_topic_config())?,
            Ok(c) if !c.cleanup.compacts() => {
                // Written before compacted topics existed: every record has a key.
                tracing::info!(topic = OFFSETS_TOPIC, "switching to compaction");
                log.alter_topic(
                    OFFSETS_TOPIC,
                    TopicConfig {
                        cleanup: CleanupPolicy::Compact,
                        ..c
                    },
                )?;
            }
            Ok(_) => {}
        }
        let p = log.partition(OFFSETS_TOPIC, 0)?;
        let mut map = BTreeMap::new();
        let mut deleted = BTreeMap::new();
        let mut group_states = BTreeMap::new();
        let mut offset = p.log_start_offset();
        loop {
            let r = p.read(offset, 4 << 20)?;
            if r.data.is_empty() {
                break;
            }
            for batch in r.batches() {
                let batch = batch?;
                for rec in batch.records(&limits.decode())? {
                    let rec = rec?;
                    if let Some(group) = rec
                        .key
                        .as_deref()
                        .and_then(|k| k.strip_prefix(GROUP_STATE_PREFIX))
                    {
                        let group = String::from_utf8_lossy(group).into_owned();
                        match rec.value.as_deref() {
                            Some(v) => group_states.insert(group, v.to_vec()),
                            None => group_states.remove(&group),
                        };
                        continue;
                    }
                    let Some(key) = rec.key.as_deref().and_then(decode_key) else {
                        tracing::warn!(
                            offset = rec.offset,
                            "skipping offset record without a valid key"
                        );
                        continue;
                    };
                    // A null value is a tombstone: the committed offset was deleted.
                    let Some(value) = rec.value.as_deref() else {
                        map.remove(&key);
                        deleted.insert(key, rec.offset);
                        continue;
                    };
                    match serde_json::from_slice::<Value>(value) {
                        Ok(mut v) => {
                            v.pos = rec.offset;
                            deleted.remove(&key);
                            map.insert(key, v);
                        }
                        Err(e) => tracing::warn!(
                            offset = rec.offset,
                            error = %e,
                            "skipping malformed offset commit record"
                        ),
                    }
                }
            }
            offset = r.next_offset;
        }
        tracing::info!(entries = map.len(), "loaded committed offsets");
        let appended_end = p.high_watermark();
        Ok(OffsetStore {
            log,
            map: Mutex::new(map),
            deleted: Mutex::new(deleted),
            in_flight: Mutex::new(InFlight {
                appended_end,
                ..InFlight::default()
            }),
            landed: Condvar::new(),
            settle_waits: AtomicU64::new(0),
            writer_yields: AtomicU64::new(0),
            group_states: Mutex::new(group_states),
            max_answer_bytes: usize::MAX,
        })
    }

    /// Bounds a fetch of all a group's offsets (an empty partition list) to an answer of
    /// `max` bytes (estimated from the entries' lengths before anything is cloned): the
    /// broker's `limits.max_request_bytes`, the reply's encode limit. A group with more
    /// committed offsets than a listed fetch may name is still answered whole (the CLI's
    /// `group describe`, `seek`, `delete` and `list` fetch all), as long as the answer can be
    /// sent.
    pub(crate) fn with_max_answer_bytes(mut self, max: usize) -> OffsetStore {
        self.max_answer_bytes = max;
        self
    }

    fn lock_map(&self) -> MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_in_flight(&self) -> MutexGuard<'_, InFlight> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while a batch of `group` appended before sequence number `upto` is in flight.
    fn unsettled(&self, group: &str, upto: u64) -> bool {
        self.lock_in_flight()
            .by_group
            .get(group)
            .and_then(|s| s.first())
            .is_some_and(|&seq| seq < upto)
    }

    /// With the map lock held: waits (releasing it meanwhile) until every batch of `group`
    /// appended before now has landed or failed. Batches of other groups, and batches of this
    /// group appended while it waits, are not waited for. Blocking.
    fn settle<'a>(&'a self, map: MutexGuard<'a, Map>, group: &str) -> MutexGuard<'a, Map> {
        let upto = self.lock_in_flight().next_seq;
        if !self.unsettled(group, upto) {
            return map;
        }
        self.settle_waits.fetch_add(1, Ordering::Relaxed);
        self.wait_landed(map, || self.unsettled(group, upto))
    }

    /// Waits on `landed` while `waiting()` holds, releasing the map lock meanwhile. Not
    /// `Condvar::wait_while`: on a poisoned lock that returns at the first wake-up, whatever
    /// the predicate says, and the store goes on after a panic under its lock (`lock_map`), so
    /// a wait would end early (a writer reading before a newer commit landed). Blocking.
    fn wait_landed<'a>(
        &'a self,
        mut map: MutexGuard<'a, Map>,
        waiting: impl Fn() -> bool,
    ) -> MutexGuard<'a, Map> {
        while waiting() {
            map = self
                .landed
                .wait(map)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        map
    }

    /// With the map lock held, for a writer that reads the group's keys and then appends (a
    /// decided transaction's commit filtering by `offsets_since`, a deletion choosing its
    /// keys): waits (releasing the lock meanwhile) until the group has no batch in flight at
    /// all, not only those appended before it, since a commit appended while it waits would be
    /// invisible to its read and then land under its batch. The group's commits that arrive
    /// while it waits wait for it ([`OffsetStore::yield_to_writers`]); it waits only for what
    /// was in flight, or waiting, before it (commits already waiting for an earlier writer,
    /// and earlier writers, go first), so it cannot starve. On return the caller reads and
    /// appends under the same lock hold. Blocking.
    fn settle_for_write<'a>(
        &'a self,
        map: MutexGuard<'a, Map>,
        group: &str,
    ) -> MutexGuard<'a, Map> {
        let ticket = {
            let mut f = self.lock_in_flight();
            if !f.by_group.contains_key(group) && !f.writers.contains_key(group) {
                return map;
            }
            let ticket = f.next_writer;
            f.next_writer += 1;
            f.writers
                .entry(group.to_owned())
                .or_default()
                .insert(ticket);
            ticket
        };
        self.settle_waits.fetch_add(1, Ordering::Relaxed);
        // Until nothing of the group is in flight and no writer of the group that came
        // earlier is still waiting (writers go in arrival order).
        let map = self.wait_landed(map, || {
            let f = self.lock_in_flight();
            f.by_group.contains_key(group)
                || f.writers
                    .get(group)
                    .and_then(|w| w.first())
                    .is_some_and(|&first| first < ticket)
        });
        {
            let mut f = self.lock_in_flight();
            if let Some(w) = f.writers.get_mut(group) {
                w.remove(&ticket);
                if w.is_empty() {
                    f.writers.remove(group);
                }
            }
        }
        // Commits of the group waiting for this writer look again (they wait for the map lock
        // until this writer has appended).
        self.landed.notify_all();
        map
    }

    /// With the map lock held, for a commit of `group`: waits (releasing the lock meanwhile)
    /// while a writer of the group that arrived before it waits to read its keys
    /// ([`OffsetStore::settle_for_write`]); writers arriving later wait for it instead.
    /// Blocking.
    fn yield_to_writers<'a>(
        &'a self,
        map: MutexGuard<'a, Map>,
        group: &str,
    ) -> MutexGuard<'a, Map> {
        // Tickets below this were taken before this commit held the lock.
        let arrived = self.lock_in_flight().next_writer;
        let waiting = || {
            self.lock_in_flight()
                .writers
                .get(group)
                .and_then(|w| w.first())
                .is_some_and(|&first| first < arrived)
        };
        if !waiting() {
            return map;
        }
        self.writer_yields.fetch_add(1, Ordering::Relaxed);
        self.wait_landed(map, waiting)
    }

    /// Registers a batch of `group` just appended (ending at log position `end`) as in
    /// flight. Called with the map lock held, right after the append.
    fn register(&self, _map: &MutexGuard<'_, Map>, group: &str, end: u64) -> Pending<'_> {
        let mut f = self.lock_in_flight();
        let seq = f.next_seq;
        f.next_seq += 1;
        f.appended_end = f.appended_end.max(end);
        f.by_group.entry(group.to_owned()).or_default().insert(seq);
        Pending {
            store: self,
            group: group.to_owned(),
            seq,
        }
    }

    /// Runs `f` while holding the store's lock (as a commit does across its append).
    #[cfg(test)]
    pub(crate) fn with_lock_held<R>(&self, f: impl FnOnce() -> R) -> R {
        let _map = self.lock_map();
        f()
    }

    /// Reads that waited for a batch of their own group in flight, so far.
    #[cfg(test)]
    pub(crate) fn settle_waits(&self) -> u64 {
        self.settle_waits.load(Ordering::Relaxed)
    }

    /// Commits that waited for a writer of their group, so far.
    #[cfg(test)]
    pub(crate) fn writer_yields(&self) -> u64 {
        self.writer_yields.load(Ordering::Relaxed)
    }

    /// The group-membership state records found at start (latest per group); empty after
    /// the first call.
    pub(crate) fn take_group_states(&self) -> BTreeMap<String, Vec<u8>> {
        std::mem::take(&mut *self.group_states.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Durably appends `group`'s membership state (`None`: a tombstone). Blocking.
    pub(crate) fn append_group_state(
        &self,
        group: &str,
        state: Option<&[u8]>,
        now_ms: i64,
    ) -> Result<(), BrokerError> {
        let mut key = GROUP_STATE_PREFIX.to_vec();
        key.extend_from_slice(group.as_bytes());
        let mut b = BatchBuilder::new(Compression::None);
        b.push(now_ms, Some(&key), state, &[]);
        let batch = b.finish()?;
        let p = self.log.partition(OFFSETS_TOPIC, 0)?;
        let info = p.append_nowait(&batch)?;
        p.wait_durable(info.last_offset + 1)?;
        Ok(())
    }

    /// Durably commits `offsets` for `group` (all or nothing: one batch). Blocking.
    pub(crate) fn commit(
        &self,
        group: &str,
        offsets: &[v1::OffsetCommit],
        now_ms: i64,
    ) -> Result<(), BrokerError> {
        self.commit_with(group, offsets, now_ms, || Ok(()))
    }

    /// [`OffsetStore::commit`] that first runs `fence` under the store's lock: nothing is
    /// written if it refuses, and no other commit or deletion can be appended between its
    /// check and the append (a fetch of the group that starts after the append waits for the
    /// commit to land). Blocking.
    pub(crate) fn commit_with(
        &self,
        group: &str,
        offsets: &[v1::OffsetCommit],
        now_ms: i64,
        fence: impl FnOnce() -> Result<(), BrokerError>,
    ) -> Result<(), BrokerError> {
        self.commit_inner(group, offsets, now_ms, fence, None, None)
    }

    /// Where the next record of `__consumer_offsets` will go: every commit appended from now
    /// on is at or after it, every commit appended before is below it (landed or still in
    /// its fsync). A transaction's decision records it ([`OffsetStore::commit_decided`]).
    pub(crate) fn next_position(&self) -> Result<u64, BrokerError> {
        let p = self.log.partition(OFFSETS_TOPIC, 0)?;
        let _map = self.lock_map();
        let appended_end = self.lock_in_flight().appended_end;
        Ok(p.high_watermark().max(appended_end))
    }

    /// Commits a decided transaction's `offsets`, except those of partitions committed or
    /// deleted at or after `since` (the [`OffsetStore::next_position`] when the decision was
    /// recorded): those commits came after the decision, and a decision carried out late
    /// (after a failed marker write, at a restart) must not undo them. `None` (a decision
    /// recorded before positions were) commits them all.
    ///
    /// `beside` (the transaction's markers becoming durable) runs beside this commit's own
    /// fsync, if it gets that far (else not at all), and the offsets become visible only once
    /// both succeeded: nobody reads them before the markers are durable. Blocking.
    pub(crate) fn commit_decided(
        &self,
        group: &str,
        offsets: &[v1::OffsetCommit],
        now_ms: i64,
        since: Option<u64>,
        beside: &mut (dyn FnMut() -> Result<(), BrokerError> + Send),
    ) -> Result<(), BrokerError> {
        self.commit_inner(group, offsets, now_ms, || Ok(()), since, Some(beside))
    }

    fn commit_inner(
        &self,
        group: &str,
        offsets: &[v1::OffsetCommit],
        now_ms: i64,
        fence: impl FnOnce() -> Result<(), BrokerError>,
        since: Option<u64>,
        beside: Option<&mut (dyn FnMut() -> Result<(), BrokerError> + Send)>,
    ) -> Result<(), BrokerError> {
        validate_group(group)?;
        if offsets.is_empty() {
            return Ok(());
        }
        let mut existing = Vec::with_capacity(offsets.len());
        for c in offsets {
            validate_commit(c)?;
            match self.log.partition(&c.topic, c.partition) {
                Ok(_) => existing.push(c),
                // A decided transaction's commit (re-run after a restart) whose input was
                // deleted since: nothing is left to resume there, and refusing would leave the
                // transactional id stuck in its decision for good.
                Err(
                    spool_log_engine::Error::TopicNotFound(_)
                    | spool_log_engine::Error::PartitionNotFound { .. },
                ) if since.is_some() => {
                    tracing::warn!(
                        group,
                        topic = %c.topic,
                        partition = c.partition,
                        "a decided commit's offset for a deleted partition is dropped"
                    );
                }
                // The partition must exist: committing for a typo'd topic is a mistake to report.
                Err(e) => return Err(e.into()),
            }
        }
        let p = self.log.partition(OFFSETS_TOPIC, 0)?;
        let key = |c: &v1::OffsetCommit| (group.to_owned(), c.topic.clone(), c.partition);
        // Under the lock: the fence, the choice of what to write and the append; then the
        // fsync without it (see the module docs).
        let (info, offsets, pending) = {
            let map = self.lock_map();
            let map = if since.is_some() {
                // Reads the positions of the group's keys: every commit of the group in
                // flight must have landed, or a newer commit would look absent and be
                // written over.
                self.settle_for_write(map, group)
            } else {
                self.yield_to_writers(map, group)
            };
            fence()?;
            let deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
            let offsets: Vec<&v1::OffsetCommit> = existing
                .into_iter()
                .filter(|c| {
                    let Some(since) = since else { return true };
                    let k = key(c);
                    let last = map
                        .get(&k)
                        .map(|v| v.pos)
                        .or_else(|| deleted.get(&k).copied());
                    last.is_none_or(|pos| pos < since)
                })
                .collect();
            drop(deleted);
            if offsets.is_empty() {
                return Ok(());
            }
            let mut b = BatchBuilder::new(Compression::None);
            for c in &offsets {
                let value = serde_json::to_vec(&Value {
                    offset: c.offset,
                    metadata: c.metadata.clone(),
                    time_ms: now_ms,
                    pos: 0,
                })
                .map_err(|e| BrokerError::Internal(format!("serializing an offset: {e}")))?;
                b.push(
                    now_ms,
                    Some(&encode_key(group, &c.topic, c.partition)),
                    Some(&value),
                    &[],
                );
            }
            let batch = b.finish()?;
            let info = p.append_nowait(&batch)?;
            let pending = self.register(&map, group, info.last_offset + 1);
            (info, offsets, pending)
        };
        let durable = (|| -> Result<(), BrokerError> {
            match beside {
                None => p.wait_durable(info.last_offset + 1)?,
                // The crate's own tests (the power-cut loops) run one disk operation at a
                // time, so a seed replays exactly. Both orders the parallel waits can finish
                // in are cut through: by the batch's offset (the same on every run of a
                // seed), the offsets first (cut points where they are durable and the markers
                // not) or the markers first (the other way round).
                Some(f) if cfg!(test) => {
                    if info.base_offset % 2 == 0 {
                        p.wait_durable(info.last_offset + 1)?;
                        f()?;
                    } else {
                        f()?;
                        p.wait_durable(info.last_offset + 1)?;
                    }
                }
                Some(f) => {
                    let (durable, other) = std::thread::scope(|s| {
                        let other = s.spawn(f);
                        let durable = p.wait_durable(info.last_offset + 1);
                        let other = other.join().unwrap_or_else(|_| {
                            Err(BrokerError::Internal(
                                "the wait beside an offset commit panicked".into(),
                            ))
                        });
                        (durable, other)
                    });
                    durable?;
                    other?;
                }
            }
            Ok(())
        })();
        if durable.is_ok() {
            let mut map = self.lock_map();
            let mut deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
            for (i, c) in offsets.iter().enumerate() {
                apply_commit(
                    &mut map,
                    &mut deleted,
                    key(c),
                    Value {
                        offset: c.offset,
                        metadata: c.metadata.clone(),
                        time_ms: now_ms,
                        pos: info.base_offset + i as u64,
                    },
                );
            }
        }
        // After the map lock is released: unregisters the batch and wakes the waiters.
        drop(pending);
        durable
    }

    /// Durably deletes `group`'s committed offsets (only those of `topics` unless it is empty)
    /// with one batch of tombstones, then drops them from the map. Returns how many partitions
    /// were deleted; [`BrokerError::UnknownGroup`] when there is nothing to delete. Blocking.
    ///
    /// The batch must fit the internal topic's `max_message_bytes` (8 MiB by default: tens of
    /// thousands of partitions); a larger one is refused whole (`TOO_LARGE`), nothing deleted.
    #[cfg(test)]
    pub(crate) fn delete_group(
        &self,
        group: &str,
        topics: &[String],
        now_ms: i64,
    ) -> Result<u32, BrokerError> {
        self.delete_group_with(group, topics, now_ms, || Ok(()))
    }

    /// [`OffsetStore::delete_group`] that first runs `fence` under the store's lock.
    pub(crate) fn delete_group_with(
        &self,
        group: &str,
        topics: &[String],
        now_ms: i64,
        fence: impl FnOnce() -> Result<(), BrokerError>,
    ) -> Result<u32, BrokerError> {
        validate_group(group)?;
        let only: BTreeSet<&str> = topics.iter().map(String::as_str).collect();
        let p = self.log.partition(OFFSETS_TOPIC, 0)?;
        // Under the lock: the group's commits in flight land first (they are part of what is
        // deleted), then the fence, the choice of keys and the append; the fsync without it.
        let (info, keys, pending) = {
            let map = self.lock_map();
            let map = self.settle_for_write(map, group);
            fence()?;
            let keys: Vec<Key> = map
                .range((group.to_owned(), String::new(), 0)..)
                .take_while(|((g, _, _), _)| g == group)
                .filter(|((_, t, _), _)| only.is_empty() || only.contains(t.as_str()))
                .map(|(k, _)| k.clone())
                .collect();
            if keys.is_empty() {
                return Err(BrokerError::UnknownGroup {
                    group: group.to_owned(),
                    topics: topics.to_vec(),
                });
            }
            let mut b = BatchBuilder::new(Compression::None);
            for (g, t, part) in &keys {
                b.push(now_ms, Some(&encode_key(g, t, *part)), None, &[]);
            }
            let batch = b.finish()?;
            let info = p.append_nowait(&batch)?;
            let pending = self.register(&map, group, info.last_offset + 1);
            (info, keys, pending)
        };
        let durable = p.wait_durable(info.last_offset + 1);
        if durable.is_ok() {
            let mut map = self.lock_map();
            let mut deleted = self.deleted.lock().unwrap_or_else(|e| e.into_inner());
            for (i, k) in keys.iter().enumerate() {
                apply_tombstone(
                    &mut map,
                    &mut deleted,
                    k.clone(),
                    info.base_offset + i as u64,
                );
            }
        }
        drop(pending);
        durable?;
        Ok(u32::try_from(keys.len()).unwrap_or(u32::MAX))
    }

    /// Every group with committed offsets for which `visible(group)` holds, sorted by name:
    /// its partition count, topics and latest commit time.
    pub(crate) fn list_groups(&self, visible: impl Fn(&str) -> bool) -> Vec<v1::GroupSummary> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<v1::GroupSummary> = Vec::new();
        // The map is ordered by (group, topic, partition): each group's entries are adjacent
        // and its topics come sorted.
        let mut current: Option<(&str, bool)> = None;
        for ((g, t, _), v) in map.iter() {
            let shown = match current {
                Some((name, shown)) if name == g => shown,
                _ => {
                    let shown = visible(g);
                    current = Some((g, shown));
                    if shown {
                        out.push(v1::GroupSummary {
                            group: g.clone(),
                            partitions: 0,
                            topics: Vec::new(),
                            last_commit_time_ms: v.time_ms,
                        });
                    }
                    shown
                }
            };
            let Some(s) = out.last_mut().filter(|_| shown) else {
                continue;
            };
            s.partitions = s.partitions.saturating_add(1);
            if s.topics.last() != Some(t) {
                s.topics.push(t.clone());
            }
            s.last_commit_time_ms = s.last_commit_time_ms.max(v.time_ms);
        }
        out
    }

    /// Every committed position: (group, topic, partition, offset).
    pub(crate) fn all(&self) -> Vec<(String, String, u32, u64)> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|((g, t, p), v)| (g.clone(), t.clone(), *p, v.offset))
            .collect()
    }

    /// A group's committed offsets: for the given partitions (in order), or all. Waits for
    /// the group's commits appended before it to land (not for other groups'). Blocking.
    pub(crate) fn fetch(
        &self,
        group: &str,
        partitions: &[v1::TopicPartition],
    ) -> Result<Vec<v1::CommittedOffset>, BrokerError> {
        validate_group(group)?;
        let map = self.lock_map();
        let map = self.settle(map, group);
        Self::answer(&map, group, partitions, self.max_answer_bytes)
    }

    /// [`OffsetStore::fetch`] without waiting: `None` while a commit of the group is in
    /// flight or the store's lock is taken (then call `fetch` where blocking is fine). For the
    /// runtime's threads.
    pub(crate) fn fetch_if_settled(
        &self,
        group: &str,
        partitions: &[v1::TopicPartition],
    ) -> Result<Option<Vec<v1::CommittedOffset>>, BrokerError> {
        validate_group(group)?;
        // try_lock: a commit holds the lock across its append, which can wait for a segment
        // roll's fdatasync (every 100 MiB of the topic) or the cleaner's swap, and a deletion
        // while it builds its tombstones; the blocking path takes those waits instead.
        let map = match self.map.try_lock() {
            Ok(m) => m,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
        };
        let upto = self.lock_in_flight().next_seq;
        if self.unsettled(group, upto) {
            return Ok(None);
        }
        Self::answer(&map, group, partitions, self.max_answer_bytes).map(Some)
    }

    /// The answer to a fetch; all the group's offsets (`partitions` empty) only if their
    /// answer fits in `max_bytes`.
    fn answer(
        map: &Map,
        group: &str,
        partitions: &[v1::TopicPartition],
        max_bytes: usize,
    ) -> Result<Vec<v1::CommittedOffset>, BrokerError> {
        let answer = |topic: &str, partition: u32, v: Option<&Value>| v1::CommittedOffset {
            topic: topic.to_owned(),
            partition,
            offset: v.map(|v| v.offset),
            metadata: v.map(|v| v.metadata.clone()).unwrap_or_default(),
            commit_time_ms: v.map_or(0, |v| v.time_ms),
        };
        if partitions.is_empty() {
            let all = || {
                map.range((group.to_owned(), String::new(), 0)..)
                    .take_while(|((g, _, _), _)| g == group)
            };
            // Measured before anything is cloned: an entry's encoded size is its topic and
            // metadata plus at most `ANSWER_ENTRY_OVERHEAD` bytes of tags, lengths and varints.
            let (mut n, mut bytes) = (0usize, 0usize);
            for ((_, t, _), v) in all() {
                n += 1;
                bytes = bytes.saturating_add(t.len() + v.metadata.len() + ANSWER_ENTRY_OVERHEAD);
            }
            if bytes > max_bytes {
                return Err(BrokerError::InvalidRequest(format!(
                    "the group has {n} committed offsets, an answer of about {bytes} bytes, \
                     more than one reply holds ({max_bytes}): list the partitions to fetch"
                )));
            }
            return Ok(all().map(|((_, t, p), v)| answer(t, *p, Some(v))).collect());
        }
        Ok(partitions
            .iter()
            .map(|tp| {
                answer(
                    &tp.topic,
                    tp.partition,
                    map.get(&(group.to_owned(), tp.topic.clone(), tp.partition)),
                )
            })
            .collect())
    }
}

/// Refuses an offset commit the store would refuse when applying it: checked before a
/// transaction records it, so a decided commit can always be applied.
pub(crate) fn validate_commit(c: &v1::OffsetCommit) -> Result<(), BrokerError> {
    if c.metadata.len() > MAX_METADATA {
        return Err(BrokerError::InvalidRequest(format!(
            "metadata over {MAX_METADATA} bytes"
        )));
    }
    Ok(())
}

pub(crate) fn validate_group(group: &str) -> Result<(), BrokerError> {
    if group.is_empty() || group.len() > MAX_GROUP_NAME || group.chars().any(|c| c.is_control()) {
        return Err(BrokerError::InvalidRequest(format!(
            "group name must be 1 to {MAX_GROUP_NAME} printable characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use spool_log_engine::LogOptions;

    use super::*;

    fn open(dir: &std::path::Path) -> (Arc<Log>, OffsetStore) {
        let log = Arc::new(Log::open(dir, LogOptions::default()).unwrap());
        for t in ["a", "b"] {
            if log.topic_config(t).is_err() {
                log.create_topic(
                    t,
                    TopicConfig {
                        partitions: 3,
                        ..TopicConfig::default()
                    },
                )
                .unwrap();
            }
        }
        let store = OffsetStore::open(log.clone(), &Limits::default()).unwrap();
        (log, store)
    }

    fn commit(topic: &str, partition: u32, offset: u64) -> v1::OffsetCommit {
        v1::OffsetCommit {
            topic: topic.into(),
            partition,
            offset,
            metadata: String::new(),
        }
    }

    /// A decided transaction's commit re-run after one of its input topics was deleted
    /// applies the rest and drops the deleted partition's offset (else the id would stay stuck
    /// in its decision); a plain commit for a missing topic is still refused, and metadata
    /// over the bound is refused by both.
    #[test]
    fn a_decided_commit_drops_offsets_of_deleted_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, s) = open(dir.path());
        let gone = commit("deleted", 0, 9);
        assert!(
            s.commit("g", &[commit("a", 0, 1), gone.clone()], 1)
                .is_err()
        );
        let mut beside_ran = false;
        s.commit_decided(
            "g",
            &[commit("a", 0, 5), gone.clone()],
            2,
            Some(0),
            &mut || {
                beside_ran = true;
                Ok(())
            },
        )
        .unwrap();
        assert!(
            beside_ran,
            "the markers' wait ran beside the offsets' fsync"
        );
        let got = s.fetch("g", &[]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].topic.as_str(), got[0].offset), ("a", Some(5)));
        let mut big = commit("a", 1, 3);
        big.metadata = "m".repeat(MAX_METADATA + 1);
        assert!(validate_commit(&big).is_err());
        assert!(
            s.commit_decided("g", &[big], 3, Some(0), &mut || Ok(()))
                .is_err()
        );
    }

    /// Every fdatasync of a `__consumer_offsets` segment waits at the gate while it is
    /// armed, until the test lets it through (by the order the syncs began) or opens the
    /// gate: a commit held in its fsync, without timing.
    #[derive(Debug, Default)]
    struct Gate {
        /// (armed, syncs begun while armed, syncs let through).
        state: Mutex<(bool, usize, usize)>,
        cv: Condvar,
        /// When set, a sync held at the gate fails with this errno once let through.
        fail: Mutex<Option<i32>>,
    }

    impl Gate {
        fn set(&self, armed: bool) {
            self.state.lock().unwrap().0 = armed;
            self.cv.notify_all();
        }

        /// Holds the calling sync while armed; `Some(errno)`: it is to fail.
        fn pass(&self) -> Option<i32> {
            let mut st = self.state.lock().unwrap();
            if !st.0 {
                return None;
            }
            let ticket = st.1;
            st.1 += 1;
            self.cv.notify_all();
            while st.0 && ticket >= st.2 {
                st = self.cv.wait(st).unwrap();
            }
            *self.fail.lock().unwrap()
        }

        /// Lets the first `n` syncs through (the gate stays armed for later ones).
        fn let_through(&self, n: usize) {
            self.state.lock().unwrap().2 = n;
            self.cv.notify_all();
        }

        /// Waits (at most 10 s) until `n` syncs have begun.
        fn wait_held(&self, n: usize) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let mut st = self.state.lock().unwrap();
            while st.1 < n {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                assert!(!left.is_zero(), "no fsync reached the gate");
                st = self.cv.wait_timeout(st, left).unwrap().0;
            }
        }
    }

    /// Opens the gate when dropped (a failed assertion leaves no thread stuck).
    struct Open(Arc<Gate>);

    impl Drop for Open {
        fn drop(&mut self) {
            let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
            st.0 = false;
            self.0.cv.notify_all();
        }
    }

    #[derive(Debug)]
    struct GateFs {
        inner: Arc<dyn spool_io::FileSystem>,
        gate: Arc<Gate>,
    }

    #[derive(Debug)]
    struct GateFile {
        inner: Arc<dyn spool_io::FileHandle>,
        gate: Option<Arc<Gate>>,
    }

    impl spool_io::FileHandle for GateFile {
        fn read_at(&self, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
            self.inner.read_at(buf, pos)
        }
        fn write_all_at(&self, buf: &[u8], pos: u64) -> std::io::Result<()> {
            self.inner.write_all_at(buf, pos)
        }
        fn write_pair_at(&self, head: &[u8], tail: &[u8], pos: u64) -> std::io::Result<()> {
            self.inner.write_pair_at(head, tail, pos)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn size(&self) -> std::io::Result<u64> {
            self.inner.size()
        }
        fn sync_data(&self) -> std::io::Result<()> {
            if let Some(g) = &self.gate
                && let Some(errno) = g.pass()
            {
                return Err(std::io::Error::from_raw_os_error(errno));
            }
            self.inner.sync_data()
        }
        fn sync_all(&self) -> std::io::Result<()> {
            self.inner.sync_all()
        }
        fn start_writeback(&self, pos: u64, len: u64) -> std::io::Result<()> {
            self.inner.start_writeback(pos, len)
        }
        fn map(
            &self,
            len: usize,
            keep_alive: Box<dyn std::any::Any + Send + Sync>,
        ) -> std::io::Result<bytes::Bytes> {
            self.inner.map(len, keep_alive)
        }
        fn map_ahead(
            &self,
            capacity: usize,
            keep_alive: Box<dyn std::any::Any + Send + Sync>,
        ) -> std::io::Result<Option<spool_io::MapAhead>> {
            self.inner.map_ahead(capacity, keep_alive)
        }
    }

    impl spool_io::FileSystem for GateFs {
        fn open(
            &self,
            path: &std::path::Path,
            mode: spool_io::OpenMode,
        ) -> std::io::Result<Arc<dyn spool_io::FileHandle>> {
            let inner = self.inner.open(path, mode)?;
            let gated = path.extension().is_some_and(|e| e == "log")
                && path.to_string_lossy().contains(OFFSETS_TOPIC);
            Ok(Arc::new(GateFile {
                inner,
                gate: gated.then(|| self.gate.clone()),
            }))
        }
        fn metadata(&self, path: &std::path::Path) -> std::io::Result<spool_io::Metadata> {
            self.inner.metadata(path)
        }
        fn read_dir(&self, path: &std::path::Path) -> std::io::Result<Vec<spool_io::DirEntry>> {
            self.inner.read_dir(path)
        }
        fn create_dir(&self, path: &std::path::Path) -> std::io::Result<()> {
            self.inner.create_dir(path)
        }
        fn create_dir_all(&self, path: &std::path::Path) -> std::io::Result<()> {
            self.inner.create_dir_all(path)
        }
        fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
            self.inner.rename(from, to)
        }
        fn remove_file(&self, path: &std::path::Path) -> std::io::Result<()> {
            self.inner.remove_file(path)
        }
        fn remove_dir_all(&self, path: &std::path::Path) -> std::io::Result<()> {
            self.inner.remove_dir_all(path)
        }
        fn sync_dir(&self, path: &std::path::Path) -> std::io::Result<()> {
            self.inner.sync_dir(path)
        }
        fn lock(
            &self,
            path: &std::path::Path,
            create: bool,
        ) -> std::io::Result<Option<Box<dyn spool_io::FileLock>>> {
            self.inner.lock(path, create)
        }
        fn fd_budget(&self) -> Option<spool_io::FdBudget> {
            self.inner.fd_budget()
        }
    }

    /// Runs `f` on a thread of its own; its result, or a failure naming `what` if it has not
    /// answered within 10 s (it is blocked: a generous bound, not a measurement).
    fn answers<T: Send + 'static>(
        what: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::sync::mpsc::Receiver<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(what.to_owned())
            .spawn(move || {
                let _ = tx.send(f());
            })
            .unwrap();
        rx
    }

    const BOUND: std::time::Duration = std::time::Duration::from_secs(10);

    /// Group A's commit is held in its fsync. Group B's fetch (and the listings) answer
    /// meanwhile: the store's lock is not held across the fsync. Group A's own fetch (a new
    /// owner reading after a rebalance) waits for the commit and reads its offset, never the
    /// older one; `next_position` counts the commit in flight.
    #[test]
    fn a_commit_in_its_fsync_holds_back_only_its_own_groups_reads() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        let fs: Arc<dyn spool_io::FileSystem> = Arc::new(GateFs {
            inner: spool_io::real(),
            gate: gate.clone(),
        });
        let log = Arc::new(
            Log::open(
                dir.path(),
                LogOptions {
                    fs,
                    ..LogOptions::default()
                },
            )
            .unwrap(),
        );
        log.create_topic("a", TopicConfig::default()).unwrap();
        let s = Arc::new(OffsetStore::open(log.clone(), &Limits::default()).unwrap());
        s.commit("B", &[commit("a", 0, 7)], 1).unwrap();
        s.commit("A", &[commit("a", 0, 1)], 1).unwrap();
        assert_eq!(s.next_position().unwrap(), 2);

        gate.set(true);
        let open = Open(gate.clone());
        let a = answers("commit A", {
            let s = s.clone();
            move || s.commit("A", &[commit("a", 0, 5)], 2)
        });
        gate.wait_held(1);

        let b = answers("fetch B", {
            let s = s.clone();
            move || s.fetch("B", &[])
        })
        .recv_timeout(BOUND)
        .expect("group B's fetch waited for group A's fsync");
        assert_eq!(b.unwrap()[0].offset, Some(7));
        assert_eq!(s.list_groups(|_| true).len(), 2);
        assert_eq!(
            s.fetch_if_settled("B", &[]).unwrap().unwrap()[0].offset,
            Some(7)
        );
        assert!(
            s.fetch_if_settled("A", &[]).unwrap().is_none(),
            "A has a commit in flight"
        );
        assert_eq!(s.next_position().unwrap(), 3, "A's commit in flight counts");

        let waits = s.settle_waits();
        let a_fetch = answers("fetch A", {
            let s = s.clone();
            move || s.fetch("A", &[])
        });
        // A's fetch is waiting for A's commit (it counted its wait) while the fsync is held.
        let deadline = std::time::Instant::now() + BOUND;
        while s.settle_waits() == waits {
            assert!(
                std::time::Instant::now() < deadline,
                "A's fetch never waited"
            );
            std::thread::yield_now();
        }
        drop(open);
        a.recv_timeout(BOUND).unwrap().unwrap();
        let got = a_fetch.recv_timeout(BOUND).unwrap().unwrap();
        assert_eq!(got[0].offset, Some(5), "never the older offset");
        assert!(s.fetch_if_settled("A", &[]).unwrap().is_some());
    }

    /// A store on a file system whose `__consumer_offsets` fdatasyncs wait at `gate` while
    /// it is armed; topic `a` has 3 partitions.
    fn gated_store(dir: &std::path::Path, gate: &Arc<Gate>) -> (Arc<Log>, Arc<OffsetStore>) {
        let fs: Arc<dyn spool_io::FileSystem> = Arc::new(GateFs {
            inner: spool_io::real(),
            gate: gate.clone(),
        });
        let log = Arc::new(
            Log::open(
                dir,
                LogOptions {
                    fs,
                    ..LogOptions::default()
                },
            )
            .unwrap(),
        );
        log.create_topic(
            "a",
            TopicConfig {
                partitions: 3,
                ..TopicConfig::default()
            },
        )
        .unwrap();
        let s = Arc::new(OffsetStore::open(log.clone(), &Limits::default()).unwrap());
        (log, s)
    }

    /// Waits (at most 10 s) until `done` holds.
    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + BOUND;
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::yield_now();
        }
    }

    /// Group G's commit `c` held in its fsync at `gate` (armed here; opened when the
    /// returned `Open` drops): its answer.
    fn hold_a_commit(
        s: &Arc<OffsetStore>,
        gate: &Arc<Gate>,
        c: v1::OffsetCommit,
    ) -> (Open, std::sync::mpsc::Receiver<Result<(), BrokerError>>) {
        gate.set(true);
        let open = Open(gate.clone());
        let held = answers("held commit", {
            let s = s.clone();
            move || s.commit("G", &[c], 2)
        });
        gate.wait_held(1);
        (open, held)
    }

    /// Group G's commit of a-0 = `offset` held in its fsync at `gate` (armed here; opened when
    /// the returned `Open` drops), and a fetch of G started after it, waiting for it (counted):
    /// the commit's and the fetch's answers.
    #[allow(clippy::type_complexity)]
    fn fetch_behind_a_held_commit(
        s: &Arc<OffsetStore>,
        gate: &Arc<Gate>,
        offset: u64,
    ) -> (
        Open,
        std::sync::mpsc::Receiver<Result<(), BrokerError>>,
        std::sync::mpsc::Receiver<Result<Vec<v1::CommittedOffset>, BrokerError>>,
    ) {
        let (open, held) = hold_a_commit(s, gate, commit("a", 0, offset));
        let waits = s.settle_waits();
        let fetch = answers("fetch", {
            let s = s.clone();
            move || s.fetch("G", &[])
        });
        until("the fetch never waited", || s.settle_waits() > waits);
        (open, held, fetch)
    }

    /// Review of tidy, finding 1: after a panic under the store's lock (here a fence), the
    /// lock is poisoned and the store goes on; a fetch waiting for its group's commit in
    /// flight must keep waiting through wake-ups that are not its commit's landing (another
    /// group's, simulated by notifying). `Condvar::wait_while` returned at the first one, and
    /// the fetch read the older offset.
    #[test]
    fn after_a_panic_under_the_lock_a_fetch_still_waits_for_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        let (_log, s) = gated_store(dir.path(), &gate);
        s.commit("G", &[commit("a", 0, 1)], 1).unwrap();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.commit_with("G", &[commit("a", 0, 2)], 1, || panic!("a fence's bug"))
        }));
        assert!(panicked.is_err() && s.map.is_poisoned());
        let (open, held, fetch) = fetch_behind_a_held_commit(&s, &gate, 5);
        // The fetch holds the lock from its count to its wait: taking it once here means the
        // fetch is inside the wait, so the wake-ups below reach it.
        s.with_lock_held(|| ());
        for _ in 0..3 {
            s.landed.notify_all();
        }
        assert!(
            fetch
                .recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "the fetch answered while its group's commit was in flight"
        );
        drop(open);
        held.recv_timeout(BOUND).unwrap().unwrap();
        let got = fetch.recv_timeout(BOUND).unwrap().unwrap();
        assert_eq!(got[0].offset, Some(5), "never the older offset");
    }

    /// Review of 7e16d74, item 5: a commit whose fsync fails (EIO) while a fetch of its group
    /// waits for it: the fetch wakes and reads the offset from before, the failed commit never
    /// reaches the map, and the commit reports the failure.
    #[test]
    fn a_fetch_waiting_for_a_commit_whose_fsync_fails_reads_the_older_offset() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        let (_log, s) = gated_store(dir.path(), &gate);
        s.commit("G", &[commit("a", 0, 1)], 1).unwrap();
        *gate.fail.lock().unwrap() = Some(libc::EIO);
        let (open, failing, fetch) = fetch_behind_a_held_commit(&s, &gate, 9);
        drop(open);
        assert!(
            failing.recv_timeout(BOUND).unwrap().is_err(),
            "EIO reported"
        );
        let got = fetch.recv_timeout(BOUND).expect("the fetch stayed stuck");
        assert_eq!(got.unwrap()[0].offset, Some(1));
        assert_eq!(s.all(), vec![("G".to_owned(), "a".to_owned(), 0, 1)]);
        assert!(
            s.fetch_if_settled("G", &[]).unwrap().is_some(),
            "nothing left in flight"
        );
    }

    /// A writer that reads the group's keys (`writer`) starts while a commit of the group is
    /// held in its fsync, and a second commit of the group (`late`) comes while it waits.
    /// The late commit must not slip in between the writer's read and its append: it waits
    /// for the writer (counted), or, without that, it is appended at once (`next_position`
    /// grows) and the writer's batch lands over it. Returns the group's offsets at the end.
    fn writer_meets_a_late_commit(
        before: &[v1::OffsetCommit],
        writer: impl FnOnce(&OffsetStore, Option<u64>) + Send + 'static,
        late: Vec<v1::OffsetCommit>,
    ) -> BTreeMap<(String, u32), Option<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        let (_log, s) = gated_store(dir.path(), &gate);
        s.commit("G", before, 1).unwrap();
        let since = s.next_position().unwrap();
        let (open, held) = hold_a_commit(&s, &gate, commit("a", 1, 2));
        let waits = s.settle_waits();
        let w = answers("writer", {
            let s = s.clone();
            move || writer(&s, Some(since))
        });
        until("the writer never waited", || s.settle_waits() > waits);
        let end = s.next_position().unwrap();
        let late = answers("late commit", {
            let s = s.clone();
            move || s.commit("G", &late, 3)
        });
        until("the late commit neither waited nor was appended", || {
            s.writer_yields() > 0 || s.next_position().unwrap() > end
        });
        // Only the held commit's sync: it lands, the writer reads and appends, and neither
        // the writer's batch nor a late commit appended before it (without the wait) lands
        // until the writer has appended, whatever the threads' speed.
        let yielded = s.writer_yields() > 0;
        gate.let_through(1);
        let appended = if yielded { end + 1 } else { end + 2 };
        until("the writer never appended", || {
            s.next_position().unwrap() >= appended
        });
        drop(open);
        held.recv_timeout(BOUND).unwrap().unwrap();
        w.recv_timeout(BOUND).unwrap();
        late.recv_timeout(BOUND).unwrap().unwrap();
        s.fetch("G", &[])
            .unwrap()
            .into_iter()
            .map(|c| ((c.topic, c.partition), c.offset))
            .collect()
    }

    /// Review of 7e16d74, item 1: a decided transaction's commit waiting for the group's
    /// batches in flight must not write over a commit of the group appended meanwhile (the
    /// newer commit of a-0, 200, stays; the decision's 100 is older than it).
    #[test]
    fn a_decided_commit_does_not_land_over_a_commit_made_while_it_waited() {
        let got = writer_meets_a_late_commit(
            &[commit("a", 1, 1)],
            |s, since| {
                s.commit_decided("G", &[commit("a", 0, 100)], 2, since, &mut || Ok(()))
                    .unwrap();
            },
            vec![commit("a", 0, 200)],
        );
        assert_eq!(got[&("a".to_owned(), 0)], Some(200));
    }

    /// Review of 7e16d74, item 2: a deletion waiting for the group's batches in flight and a
    /// commit of the group made meanwhile are one order or the other, never half of each
    /// (a-0 deleted but a-2 kept).
    #[test]
    fn a_deletion_and_a_commit_made_while_it_waited_do_not_interleave() {
        let got = writer_meets_a_late_commit(
            &[commit("a", 0, 1)],
            |s, _| {
                assert_eq!(s.delete_group("G", &[], 2).unwrap(), 2);
            },
            vec![commit("a", 0, 5), commit("a", 2, 5)],
        );
        // The deletion took a-0 and a-1 (the held commit landed first), then the commit.
        let want: BTreeMap<_, _> = [
            (("a".to_owned(), 0), Some(5)),
            (("a".to_owned(), 2), Some(5)),
        ]
        .into();
        assert_eq!(got, want);
    }

    /// Phase-fair writers (stop review: "a steady stream of writers can hold a group's
    /// commits back"): a commit waits for the writer of its group that was waiting when it
    /// came (W1), not for one that came after it (W2). With W1's and the commit's fsyncs held
    /// at the gate, W2 cannot append, so before the change the commit (waiting while any
    /// writer of the group waited) was never appended; now it is appended right after W1,
    /// W2 after both, and W2's deletion (last in the log) removes what both wrote.
    #[test]
    fn a_commit_waits_only_for_the_writers_that_came_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let gate = Arc::new(Gate::default());
        let (_log, s) = gated_store(dir.path(), &gate);
        s.commit("G", &[commit("a", 1, 1)], 1).unwrap();
        let since = s.next_position().unwrap();
        let (open, held) = hold_a_commit(&s, &gate, commit("a", 1, 2));
        let end = s.next_position().unwrap();
        let waits = s.settle_waits();
        let w1 = answers("writer 1", {
            let s = s.clone();
            move || s.commit_decided("G", &[commit("a", 0, 100)], 3, Some(since), &mut || Ok(()))
        });
        until("writer 1 never waited", || s.settle_waits() > waits);
        let c = answers("commit", {
            let s = s.clone();
            move || s.commit("G", &[commit("a", 2, 50)], 4)
        });
        until("the commit did not wait for writer 1", || {
            s.writer_yields() > 0
        });
        let w2 = answers("writer 2", {
            let s = s.clone();
            move || s.delete_group("G", &[], 5)
        });
        until("writer 2 never waited", || s.settle_waits() > waits + 1);
        assert_eq!(
            s.next_position().unwrap(),
            end,
            "all wait for the held commit"
        );
        // The held commit lands; W1 appends, then the commit; W2 waits for both to land
        // (their syncs are held at the gate).
        gate.let_through(1);
        until(
            "the commit was held back by a writer that came after it",
            || s.next_position().unwrap() >= end + 2,
        );
        assert_eq!(s.next_position().unwrap(), end + 2, "W2 waits");
        drop(open);
        held.recv_timeout(BOUND).unwrap().unwrap();
        w1.recv_timeout(BOUND).unwrap().unwrap();
        c.recv_timeout(BOUND).unwrap().unwrap();
        assert_eq!(w2.recv_timeout(BOUND).unwrap().unwrap(), 3, "a-0, a-1, a-2");
        assert!(s.fetch("G", &[]).unwrap().is_empty(), "{:?}", s.all());
    }

    /// Batches landing out of log order (their fsyncs finished the other way round) leave
    /// the map with the log's last word per key, as replay would.
    #[test]
    fn a_batch_landing_late_does_not_overwrite_a_newer_one() {
        let k = || ("g".to_owned(), "a".to_owned(), 0);
        let v = |offset, pos| Value {
            offset,
            metadata: String::new(),
            time_ms: 0,
            pos,
        };
        let (mut map, mut deleted) = (Map::new(), BTreeMap::new());
        apply_commit(&mut map, &mut deleted, k(), v(20, 11));
        apply_commit(&mut map, &mut deleted, k(), v(10, 10));
        assert_eq!(map[&k()].offset, 20);
        apply_tombstone(&mut map, &mut deleted, k(), 9);
        assert_eq!(map[&k()].offset, 20, "an older deletion");
        apply_tombstone(&mut map, &mut deleted, k(), 12);
        assert!(map.is_empty());
        apply_commit(&mut map, &mut deleted, k(), v(30, 11));
        assert!(map.is_empty(), "a commit older than the tombstone");
        apply_commit(&mut map, &mut deleted, k(), v(40, 13));
        assert_eq!(map[&k()].offset, 40);
        assert!(deleted.is_empty());
    }

    #[test]
    fn list_delete_and_replay_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let (log, s) = open(dir.path());
        s.commit("g1", &[commit("a", 0, 5), commit("a", 1, 6)], 1_000)
            .unwrap();
        s.commit("g1", &[commit("b", 2, 7)], 3_000).unwrap();
        s.commit("g2", &[commit("a", 0, 1)], 2_000).unwrap();
        s.commit("h", &[commit("b", 0, 1)], 2_500).unwrap();

        let all = s.list_groups(|_| true);
        let names: Vec<_> = all.iter().map(|g| g.group.as_str()).collect();
        assert_eq!(names, ["g1", "g2", "h"]);
        assert_eq!(all[0].partitions, 3);
        assert_eq!(all[0].topics, ["a", "b"]);
        assert_eq!(all[0].last_commit_time_ms, 3_000);
        assert_eq!((all[1].partitions, all[1].last_commit_time_ms), (1, 2_000));
        let visible = s.list_groups(|g| g.starts_with('g') && g != "g1");
        assert_eq!(visible.len(), 1);
        assert_eq!(visible[0].group, "g2");

        // Only topic b of g1, then nothing left there for b.
        assert_eq!(s.delete_group("g1", &["b".into()], 4_000).unwrap(), 1);
        let err = s.delete_group("g1", &["b".into()], 4_000).unwrap_err();
        assert!(
            matches!(&err, BrokerError::UnknownGroup { group, .. } if group == "g1"),
            "{err:?}"
        );
        assert_eq!(s.delete_group("g2", &[], 4_000).unwrap(), 1);
        assert!(matches!(
            s.delete_group("g2", &[], 4_000),
            Err(BrokerError::UnknownGroup { .. })
        ));
        assert!(matches!(
            s.delete_group("nobody", &[], 4_000),
            Err(BrokerError::UnknownGroup { .. })
        ));
        assert!(matches!(
            s.delete_group("", &[], 4_000),
            Err(BrokerError::InvalidRequest(_))
        ));
        // One tombstone batch per deletion: 4 commits + 2 deletions.
        let p = log.partition(OFFSETS_TOPIC, 0).unwrap();
        assert_eq!(p.high_watermark(), 5 + 2);

        let after = |s: &OffsetStore| {
            s.list_groups(|_| true)
                .into_iter()
                .map(|g| (g.group, g.partitions, g.topics))
                .collect::<Vec<_>>()
        };
        let expected = vec![
            ("g1".to_owned(), 2, vec!["a".to_owned()]),
            ("h".to_owned(), 1, vec!["b".to_owned()]),
        ];
        assert_eq!(after(&s), expected);
        drop(s);
        log.close().unwrap();
        drop(log);

        // Replay applies the tombstones (no "malformed" records), and a new commit after a
        // deletion brings the key back.
        let (log, s) = open(dir.path());
        assert_eq!(after(&s), expected);
        let fetched = s.fetch("g2", &[]).unwrap();
        assert!(fetched.is_empty());
        s.commit("g2", &[commit("a", 0, 9)], 5_000).unwrap();
        drop(s);
        log.close().unwrap();
        drop(log);
        let (_log, s) = open(dir.path());
        let g2 = s.fetch("g2", &[]).unwrap();
        assert_eq!(g2.len(), 1);
        assert_eq!(g2[0].offset, Some(9));
    }

    #[test]
    fn the_offsets_topic_is_compacted_and_replays_the_same_after_cleaning() {
        let dir = tempfile::tempdir().unwrap();
        // A log from before compaction: the internal topic exists with `delete`.
        {
            let log = Log::open(dir.path(), LogOptions::default()).unwrap();
            log.create_topic(OFFSETS_TOPIC, TopicConfig::default())
                .unwrap();
        }
        let (log, s) = open(dir.path());
        assert_eq!(
            log.topic_config(OFFSETS_TOPIC).unwrap().cleanup,
            CleanupPolicy::Compact,
            "switched at start"
        );
        for round in 0..50u64 {
            for p in 0..3 {
                s.commit("g1", &[commit("a", p, round * 10 + u64::from(p))], 1_000)
                    .unwrap();
            }
            s.commit("g2", &[commit("b", 0, round)], 1_000).unwrap();
        }
        s.delete_group("g2", &[], 2_000).unwrap();
        let p = log.partition(OFFSETS_TOPIC, 0).unwrap();
        p.roll().unwrap();
        let before = p.stats().size_bytes;
        let r = log.clean_now(OFFSETS_TOPIC, 0).unwrap();
        assert!(r.ran && r.records_removed == 200 - 3, "{r:?}");
        assert!(p.stats().size_bytes < before / 10, "{r:?}");
        let want = s.fetch("g1", &[]).unwrap();
        assert_eq!(want.len(), 3);
        drop(s);
        drop(p);
        log.close().unwrap();
        drop(log);
        let (_log, s) = open(dir.path());
        assert_eq!(s.fetch("g1", &[]).unwrap(), want);
        assert!(
            s.fetch("g2", &[]).unwrap().is_empty(),
            "the tombstone is kept"
        );
    }

    /// Review (bounds 4): a fetch of all a group's offsets was bounded only by what the group
    /// had committed (each with up to 4 KiB of metadata, cloned under the lock). An answer
    /// over the store's `max_answer_bytes` (the reply limit) is refused before anything is
    /// cloned; a listed fetch is not affected (its count is checked by the request's limit).
    /// The bound is in bytes, not entries: a group with more commits than a listed fetch may
    /// name is answered whole while the answer can be sent (review-late 1: the CLI fetches
    /// all).
    #[test]
    fn a_fetch_of_all_offsets_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, s) = open(dir.path());
        // Two entries of topic "a" (1 + 48 bytes each) fit; a third does not.
        let s = s.with_max_answer_bytes(2 * (1 + ANSWER_ENTRY_OVERHEAD));
        s.commit("g", &[commit("a", 0, 1), commit("a", 1, 2)], 1)
            .unwrap();
        assert_eq!(s.fetch("g", &[]).unwrap().len(), 2);
        assert_eq!(s.fetch_if_settled("g", &[]).unwrap().unwrap().len(), 2);
        s.commit("g", &[commit("b", 0, 3)], 2).unwrap();
        for r in [
            s.fetch("g", &[]),
            s.fetch_if_settled("g", &[]).map(Option::unwrap),
        ] {
            let e = r.unwrap_err();
            assert!(
                matches!(&e, BrokerError::InvalidRequest(m) if m.contains("3 committed offsets")),
                "{e:?}"
            );
        }
        let listed = [("a", 0), ("a", 1), ("b", 0)].map(|(t, p)| v1::TopicPartition {
            topic: t.into(),
            partition: p,
        });
        assert_eq!(s.fetch("g", &listed).unwrap().len(), 3);
        // Other groups are not affected.
        s.commit("h", &[commit("a", 0, 1)], 3).unwrap();
        assert_eq!(s.fetch("h", &[]).unwrap().len(), 1);
    }
}
