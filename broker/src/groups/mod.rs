//! Consumer-group membership: one coordinator task per group with members.
//!
//! The protocol and its guarantees are in `coordinator.rs` (the pure state machine) and
//! docs/protocol.md. This module runs it:
//!
//! - **One task per group** owns the group's [`Coordinator`] and handles, one at a time, joins,
//!   the members' stream messages (heartbeat, ack, leave, stream closed), fenced commits,
//!   LeaveGroup and DescribeGroup, plus its timers (session and rebalance deadlines, topic
//!   partition counts every second). Serial handling is what makes fencing exact: a fenced
//!   commit is checked and appended before the next event (say, the acknowledgement that
//!   releases the partition) is looked at.
//! - **Durable before visible**: after an event changed the group, its snapshot is appended
//!   to `__consumer_offsets` (key `\x01group\0<name>`, fsynced) *before* any member is sent
//!   the resulting Assignment; so nothing a member was told is forgotten by a restarted
//!   broker. If that append fails, every member's stream is ended with the error and the group
//!   goes back to its last durable state (members rejoin).
//! - **Restart**: the latest snapshot per group is restored with every member disconnected,
//!   given its session timeout from the restart to rejoin (by member id or instance id) and
//!   take its partitions back; the others expire.
//! - **A stream that cannot take an Assignment** (its client left 64 messages unread, or it is
//!   gone) is ended and its member disconnected at once, as if the client had closed it: a
//!   dynamic member leaves and the group rebalances without waiting for its acknowledgement
//!   until the rebalance timeout; a static one is marked disconnected. From then on its
//!   heartbeats (its request side may still be open) are not heard.
//! - A status the broker ends a member's stream with (FENCED_MEMBER for a full stream or an
//!   expired session, MEMBER_REPLACED, a failed persist) reaches the client even when its
//!   channel is full, if it reads its backlog within 30 s and before a shutdown (which does
//!   not wait for it); otherwise the stream just ends.
//! - A group without members parks its coordinator (keeping its generation) and ends its
//!   task; an event for it starts a new task.
//! - Plain commits (no member id) and DeleteGroup are refused while the group has members;
//!   the member count they check is updated by the task before it answers a join.

pub(crate) mod assign;
pub(crate) mod coordinator;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spool_log_engine::Log;
use spool_proto::v1;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use self::coordinator::{
    Coordinator, Effect, JoinRefusal, JoinSpec, Refusal, Removal, Snapshot, State, Strategy, Tp,
};
use crate::blocking_task;
use crate::config::GroupsConfig;
use crate::error::BrokerError;
use crate::metrics::Metrics;
use crate::offsets::OffsetStore;

/// Messages queued towards one member's stream (then HTTP/2 flow control).
pub(crate) const STREAM_CAPACITY: usize = 64;
/// How long a member's stream ended for being full keeps trying to send its status (the
/// client may still read its backlog); then the stream just ends.
const OVERFLOW_STATUS_WAIT: Duration = Duration::from_secs(30);
/// Events queued towards one group's task.
const EVENTS_CAPACITY: usize = 1024;
/// How often a group re-reads its topics' partition counts.
const METADATA_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
thread_local! {
    /// Set by [`FrozenClock`]: the coordinators' clock reads 0 on this thread.
    static FROZEN_CLOCK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tests (the power-cut loops, which run the groups' tasks on a current-thread runtime on the
/// test's thread) stop the coordinators' clock while this lives: what a group persists (the
/// time a revocation started) and when (the periodic re-read of partition counts is off) no
/// longer depend on how fast the machine is, so a seed writes the same bytes in the same order
/// every time. Sessions then never expire; the loops do not test expiry.
#[cfg(test)]
pub(crate) struct FrozenClock(());

#[cfg(test)]
impl FrozenClock {
    pub(crate) fn on_this_thread() -> FrozenClock {
        FROZEN_CLOCK.with(|c| c.set(true));
        FrozenClock(())
    }
}

#[cfg(test)]
impl Drop for FrozenClock {
    fn drop(&mut self) {
        FROZEN_CLOCK.with(|c| c.set(false));
    }
}

/// The sending half of a member's response stream.
pub(crate) type MemberTx = mpsc::Sender<Result<v1::MembershipResponse, Status>>;

/// A validated join.
#[derive(Debug)]
pub(crate) struct JoinArgs {
    pub(crate) group: String,
    pub(crate) topics: BTreeSet<String>,
    pub(crate) instance: Option<String>,
    pub(crate) previous_id: Option<String>,
    pub(crate) strategy: Option<Strategy>,
    pub(crate) session_ms: u64,
    pub(crate) rebalance_ms: u64,
}

/// Something a member said on its stream.
#[derive(Debug)]
pub(crate) enum MemberEvent {
    Heartbeat,
    Ack(u64),
    Leave,
    /// The stream ended: the client closed it (`None`), or a message on it could not be
    /// received (the status the stream ends with: a message over `limits.max_request_bytes`
    /// or one that does not decode; for a broken connection, one nobody reads).
    Closed(Option<Status>),
}

#[derive(Debug)]
enum Event {
    Join {
        args: JoinArgs,
        out: MemberTx,
        reply: oneshot::Sender<Result<String, BrokerError>>,
    },
    Member {
        member: String,
        event: MemberEvent,
    },
    Commit {
        member: String,
        generation: u64,
        offsets: Vec<v1::OffsetCommit>,
        now_ms: i64,
        /// Only check the fence (a transaction's offsets are written by its coordinator).
        check_only: bool,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    LeaveBy {
        member: Option<String>,
        instance: Option<String>,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    Describe {
        reply: oneshot::Sender<v1::DescribeGroupResponse>,
    },
}

#[derive(Debug, Default)]
struct Entry {
    /// The running task's queue.
    tx: Option<mpsc::Sender<Event>>,
    /// A coordinator without a task (no members, or restored and not started yet).
    parked: Option<Coordinator>,
    /// Members right now (read by plain commits and DeleteGroup).
    members: Arc<AtomicUsize>,
}

/// Every group's membership.
#[derive(Debug)]
pub(crate) struct Groups {
    log: Arc<Log>,
    offsets: Arc<OffsetStore>,
    metrics: Arc<Metrics>,
    cfg: GroupsConfig,
    shutdown: watch::Receiver<bool>,
    clock: Instant,
    registry: Mutex<HashMap<String, Entry>>,
    ids: AtomicU64,
    seed: std::collections::hash_map::RandomState,
    /// Tests (the power-cut loops) fix member ids to replay a seed: ids of this broker's life
    /// are `m-<salt>-<n>` (same length as the random ones; a salt per life keeps them unique
    /// across restarts).
    #[cfg(test)]
    fixed_ids: Mutex<Option<u64>>,
}

impl Groups {
    /// Restores the groups whose state `offsets` found in the log. Blocking-free.
    pub(crate) fn open(
        log: Arc<Log>,
        offsets: Arc<OffsetStore>,
        metrics: Arc<Metrics>,
        cfg: GroupsConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Groups {
        let groups = Groups {
            log,
            offsets,
            metrics,
            cfg,
            shutdown,
            clock: Instant::now(),
            registry: Mutex::new(HashMap::new()),
            ids: AtomicU64::new(0),
            seed: std::collections::hash_map::RandomState::new(),
            #[cfg(test)]
            fixed_ids: Mutex::new(None),
        };
        let now = groups.now();
        let mut registry = groups.lock();
        for (name, bytes) in groups.offsets.take_group_states() {
            match serde_json::from_slice::<Snapshot>(&bytes) {
                Ok(snap) => {
                    let c = Coordinator::restore(snap, groups.cfg.max_members, now);
                    tracing::info!(
                        group = name,
                        members = c.member_count(),
                        generation = c.generation(),
                        "restored consumer group"
                    );
                    let entry = registry.entry(name).or_default();
                    entry.members.store(c.member_count(), Ordering::SeqCst);
                    entry.parked = Some(c);
                }
                Err(e) => {
                    tracing::warn!(group = name, error = %e, "skipping malformed group state record");
                }
            }
        }
        drop(registry);
        groups
    }

    /// Starts the tasks of restored groups with members (their sessions are running).
    pub(crate) fn start(self: &Arc<Self>) {
        let names: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.parked.as_ref().is_some_and(|c| c.member_count() > 0))
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            let _ = self.sender(&n);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds on the coordinators' monotonic clock.
    fn now(&self) -> u64 {
        #[cfg(test)]
        if FROZEN_CLOCK.with(std::cell::Cell::get) {
            return 0;
        }
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Member ids from `salt` and a counter from now on (see `fixed_ids`).
    #[cfg(test)]
    pub(crate) fn fix_member_ids(&self, salt: u64) {
        *self.fixed_ids.lock().unwrap_or_else(|e| e.into_inner()) = Some(salt);
    }

    fn new_member_id(&self) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        if let Some(salt) = *self.fixed_ids.lock().unwrap_or_else(|e| e.into_inner()) {
            return format!("m-{salt:016x}-{n}");
        }
        let mut h = self.seed.build_hasher();
        h.write_u64(n);
        h.write_u128(self.clock.elapsed().as_nanos());
        format!("m-{:016x}-{n}", h.finish())
    }

    /// Members the group has now (0 for an unknown group).
    pub(crate) fn member_count(&self, group: &str) -> usize {
        self.lock()
            .get(group)
            .map_or(0, |e| e.members.load(Ordering::SeqCst))
    }

    /// Refuses a plain offset change (`what`) while `group` has members.
    pub(crate) fn require_empty(&self, group: &str, what: &'static str) -> Result<(), BrokerError> {
        match self.member_count(group) {
            0 => Ok(()),
            members => Err(BrokerError::GroupNotEmpty {
                group: group.to_owned(),
                members,
                what,
            }),
        }
    }

    /// The group's task queue, starting the task if needed.
    fn sender(self: &Arc<Self>, group: &str) -> mpsc::Sender<Event> {
        let mut registry = self.lock();
        let entry = registry.entry(group.to_owned()).or_default();
        if let Some(tx) = entry.tx.as_ref().filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(EVENTS_CAPACITY);
        entry.tx = Some(tx.clone());
        let coord = entry
            .parked
            .take()
            .unwrap_or_else(|| Coordinator::new(self.cfg.max_members));
        let task = Task {
            groups: self.clone(),
            name: group.to_owned(),
            persisted: coord.snapshot(),
            coord,
            rx,
            streams: HashMap::new(),
            members: entry.members.clone(),
            rebalance_started: None,
            rebalances_seen: 0,
        };
        tokio::spawn(task.run());
        tx
    }

    /// Sends an event to the group's task, restarting the task if it ended meanwhile.
    async fn send(self: &Arc<Self>, group: &str, mut event: Event) -> Result<(), Status> {
        for _ in 0..3 {
            match self.sender(group).send(event).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => event = back,
            }
        }
        Err(BrokerError::ShuttingDown.into())
    }

    /// Sends the event `make` builds around a reply channel to `group`'s task and waits for
    /// the reply (a task that went away means the broker is shutting down).
    async fn ask<T>(
        self: &Arc<Self>,
        group: &str,
        make: impl FnOnce(oneshot::Sender<T>) -> Event,
    ) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        self.send(group, make(reply)).await?;
        rx.await.map_err(|_| BrokerError::ShuttingDown.into())
    }

    /// Joins; on success the member's Joined and first Assignment are queued on `out`.
    pub(crate) async fn join(
        self: &Arc<Self>,
        args: JoinArgs,
        out: MemberTx,
    ) -> Result<String, Status> {
        let group = args.group.clone();
        Ok(self
            .ask(&group, |reply| Event::Join { args, out, reply })
            .await??)
    }

    /// Forwards what a member said on its stream.
    pub(crate) async fn member_event(
        self: &Arc<Self>,
        group: &str,
        member: &str,
        event: MemberEvent,
    ) {
        let _ = self
            .send(
                group,
                Event::Member {
                    member: member.to_owned(),
                    event,
                },
            )
            .await;
    }

    /// A fenced commit.
    pub(crate) async fn commit(
        self: &Arc<Self>,
        group: &str,
        member: String,
        generation: u64,
        offsets: Vec<v1::OffsetCommit>,
        now_ms: i64,
    ) -> Result<(), Status> {
        self.fenced(group, member, generation, offsets, Some(now_ms))
            .await
    }

    /// Checks, without writing, that `member` could commit `offsets` in `generation` now (for
    /// offsets committed by a transaction).
    pub(crate) async fn check_commit(
        self: &Arc<Self>,
        group: &str,
        member: String,
        generation: u64,
        offsets: Vec<v1::OffsetCommit>,
    ) -> Result<(), Status> {
        self.fenced(group, member, generation, offsets, None).await
    }

    /// The fence check of a member's commit, then (with a commit time) the commit.
    async fn fenced(
        self: &Arc<Self>,
        group: &str,
        member: String,
        generation: u64,
        offsets: Vec<v1::OffsetCommit>,
        commit_at_ms: Option<i64>,
    ) -> Result<(), Status> {
        Ok(self
            .ask(group, |reply| Event::Commit {
                member,
                generation,
                offsets,
                now_ms: commit_at_ms.unwrap_or_default(),
                check_only: commit_at_ms.is_none(),
                reply,
            })
            .await??)
    }

    /// LeaveGroup.
    pub(crate) async fn leave(
        self: &Arc<Self>,
        group: &str,
        member: Option<String>,
        instance: Option<String>,
    ) -> Result<(), Status> {
        Ok(self
            .ask(group, |reply| Event::LeaveBy {
                member,
                instance,
                reply,
            })
            .await??)
    }

    /// DescribeGroup.
    pub(crate) async fn describe(
        self: &Arc<Self>,
        group: &str,
    ) -> Result<v1::DescribeGroupResponse, Status> {
        {
            let registry = self.lock();
            match registry.get(group) {
                None => return Ok(describe(group, &Coordinator::new(0), self.now())),
                Some(e) if e.tx.is_none() => {
                    if let Some(c) = &e.parked {
                        return Ok(describe(group, c, self.now()));
                    }
                }
                Some(_) => {}
            }
        }
        self.ask(group, |reply| Event::Describe { reply }).await
    }

    /// Partition counts of `topics` (absent: the topic does not exist).
    fn partition_counts(&self, topics: &BTreeSet<String>) -> BTreeMap<String, u32> {
        topics
            .iter()
            .filter_map(|t| {
                let n = self.log.partitions(t).ok()?.len();
                Some((t.clone(), u32::try_from(n).unwrap_or(u32::MAX)))
            })
            .collect()
    }
}

fn strategy_to_wire(s: Option<Strategy>) -> v1::AssignmentStrategy {
    match s {
        None => v1::AssignmentStrategy::Unspecified,
        Some(Strategy::Range) => v1::AssignmentStrategy::Range,
        Some(Strategy::RoundRobin) => v1::AssignmentStrategy::RoundRobin,
        Some(Strategy::Sticky) => v1::AssignmentStrategy::Sticky,
    }
}

/// The wire form of a strategy.
pub(crate) fn strategy_from_wire(s: v1::AssignmentStrategy) -> Option<Strategy> {
    match s {
        v1::AssignmentStrategy::Unspecified => None,
        v1::AssignmentStrategy::Range => Some(Strategy::Range),
        v1::AssignmentStrategy::RoundRobin => Some(Strategy::RoundRobin),
        v1::AssignmentStrategy::Sticky => Some(Strategy::Sticky),
    }
}

fn tps(v: impl IntoIterator<Item = Tp>) -> Vec<v1::TopicPartition> {
    v.into_iter()
        .map(|(topic, partition)| v1::TopicPartition { topic, partition })
        .collect()
}

fn describe(group: &str, c: &Coordinator, now: u64) -> v1::DescribeGroupResponse {
    let state = match c.state() {
        State::Empty => v1::GroupState::Empty,
        State::Rebalancing => v1::GroupState::Rebalancing,
        State::Stable => v1::GroupState::Stable,
    };
    v1::DescribeGroupResponse {
        group: group.to_owned(),
        state: state as i32,
        generation: c.generation(),
        strategy: strategy_to_wire(c.strategy()) as i32,
        members: c
            .members()
            .map(|m| v1::MemberDescription {
                member_id: m.id.clone(),
                instance_id: m.instance.clone(),
                topics: m.topics.iter().cloned().collect(),
                partitions: tps(m.told.iter().cloned()),
                revoking: tps(m.revoking.keys().cloned()),
                generation: m.generation,
                acked_generation: m.acked,
                connected: m.connected,
                session_timeout_ms: u32::try_from(m.session_ms).unwrap_or(u32::MAX),
                last_heard_ms_ago: now.saturating_sub(m.last_heard),
            })
            .collect(),
        unassigned: tps(c.unassigned()),
    }
}

/// One group's task.
struct Task {
    groups: Arc<Groups>,
    name: String,
    coord: Coordinator,
    /// The last snapshot made durable.
    persisted: Snapshot,
    rx: mpsc::Receiver<Event>,
    streams: HashMap<String, MemberTx>,
    members: Arc<AtomicUsize>,
    rebalance_started: Option<Instant>,
    rebalances_seen: u64,
}

impl Task {
    async fn run(mut self) {
        let mut shutdown = self.groups.shutdown.clone();
        let (first, every) = metadata_schedule();
        let mut metadata = tokio::time::interval_at(first, every);
        metadata.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *shutdown.borrow() {
                self.shut_down();
                return;
            }
            let deadline = self.coord.next_deadline().map(|d| {
                let wait = d.saturating_sub(self.groups.now());
                tokio::time::Instant::now() + Duration::from_millis(wait)
            });
            let result = tokio::select! {
                biased;
                _ = shutdown.changed() => continue,
                ev = self.rx.recv() => match ev {
                    Some(ev) => self.handle(ev).await,
                    None => return,
                },
                () = sleep_until(deadline) => {
                    // Look at what already arrived (heartbeats) before expiring anyone.
                    let mut r = Ok(());
                    while r.is_ok() {
                        match self.rx.try_recv() {
                            Ok(ev) => r = self.handle(ev).await,
                            Err(_) => break,
                        }
                    }
                    match r {
                        Ok(()) => {
                            let effects = self.coord.tick(self.groups.now());
                            self.commit_effects(effects).await
                        }
                        e => e,
                    }
                }
                _ = metadata.tick() => {
                    let counts = self.groups.partition_counts(&self.coord.topics());
                    let effects = self.coord.set_partitions(self.groups.now(), counts);
                    self.commit_effects(effects).await
                }
            };
            if let Err(e) = result {
                self.fail(e);
                return;
            }
            self.after_event();
            if self.coord.member_count() == 0 && self.park() {
                return;
            }
        }
    }

    /// Updates the shared member count and the rebalance metrics.
    fn after_event(&mut self) {
        self.members
            .store(self.coord.member_count(), Ordering::SeqCst);
        let started = self.coord.rebalances();
        if started > self.rebalances_seen {
            self.groups
                .metrics
                .group_rebalances(started - self.rebalances_seen);
            self.rebalances_seen = started;
        }
        match (self.coord.state(), self.rebalance_started) {
            (State::Rebalancing, None) => self.rebalance_started = Some(Instant::now()),
            (State::Stable | State::Empty, Some(t)) => {
                self.groups.metrics.group_rebalance_done(t.elapsed());
                self.rebalance_started = None;
            }
            _ => {}
        }
    }

    /// Ends the task if no event is waiting: the coordinator goes back to the registry.
    fn park(&mut self) -> bool {
        let mut registry = self.groups.lock();
        if !self.rx.is_empty() {
            return false;
        }
        self.rx.close();
        let entry = registry.entry(self.name.clone()).or_default();
        entry.tx = None;
        entry.parked = Some(std::mem::take(&mut self.coord));
        entry.members.store(0, Ordering::SeqCst);
        true
    }

    fn shut_down(&mut self) {
        for (_, tx) in self.streams.drain() {
            let _ = tx.try_send(Err(BrokerError::ShuttingDown.into()));
        }
    }

    /// A durable append failed: end every stream with the error and go back to the last
    /// durable state (members rejoin and take their partitions back).
    fn fail(&mut self, e: BrokerError) {
        tracing::error!(group = self.name, error = %e, "persisting group state failed; resetting the group to its last durable state");
        let status: Status = e.into();
        for (_, tx) in self.streams.drain() {
            end_stream(&self.groups.shutdown, tx, status.clone());
        }
        let mut registry = self.groups.lock();
        self.rx.close();
        let restored = Coordinator::restore(
            self.persisted.clone(),
            self.groups.cfg.max_members,
            self.groups.now(),
        );
        let entry = registry.entry(self.name.clone()).or_default();
        entry
            .members
            .store(restored.member_count(), Ordering::SeqCst);
        entry.tx = None;
        entry.parked = Some(restored);
        drop(registry);
        // Events already queued get their replies dropped (callers see SHUTTING_DOWN-like
        // errors and retry).
    }

    /// Makes the new state durable (if it changed), then delivers the effects. A member whose
    /// stream could not take its Assignment is disconnected ([`Task::deliver`]), which is a
    /// change of its own: made durable and delivered in turn, until no stream overflows (each
    /// round removes at least one stream, so this ends).
    async fn commit_effects(&mut self, mut effects: Vec<Effect>) -> Result<(), BrokerError> {
        loop {
            self.persist().await?;
            let dropped = self.deliver(effects);
            if dropped.is_empty() {
                return Ok(());
            }
            let now = self.groups.now();
            effects = dropped
                .iter()
                .flat_map(|m| self.coord.disconnected(now, m))
                .collect();
        }
    }

    async fn persist(&mut self) -> Result<(), BrokerError> {
        let snap = self.coord.snapshot();
        if snap == self.persisted {
            return Ok(());
        }
        // The snapshot is plain data: failing to serialize it is the broker's own fault.
        let json = serde_json::to_vec(&snap)
            .map_err(|e| BrokerError::Internal(format!("serializing group state: {e}")))?;
        let offsets = self.groups.offsets.clone();
        let name = self.name.clone();
        let now = self.groups.log.clock().now_ms();
        blocking_task(move || {
            crate::failpoint::panic_at("group-persist");
            offsets.append_group_state(&name, Some(&json), now)
        })
        .await??;
        self.persisted = snap;
        Ok(())
    }

    /// Sends the effects to the members' streams. Returns the members whose stream could not
    /// take an Assignment (full: the client does not read it; or closed): their stream is
    /// ended here, so the caller must disconnect them (a dynamic member leaves, a static one
    /// is marked disconnected), exactly as when a client closes its stream; the reader's own
    /// `Closed` then finds no stream and changes nothing.
    #[must_use]
    fn deliver(&mut self, effects: Vec<Effect>) -> Vec<String> {
        let mut dropped = Vec::new();
        for e in effects {
            match e {
                Effect::Assign {
                    member,
                    generation,
                    partitions,
                } => {
                    let Some(tx) = self.streams.get(&member) else {
                        continue;
                    };
                    let msg = v1::MembershipResponse {
                        response: Some(v1::membership_response::Response::Assignment(
                            v1::Assignment {
                                generation,
                                partitions: tps(partitions),
                            },
                        )),
                    };
                    if let Err(e) = tx.try_send(Ok(msg)) {
                        // Not reading its stream (or gone): end the stream and disconnect the
                        // member (the caller does), rather than wait for its acknowledgement
                        // until the rebalance timeout.
                        tracing::warn!(
                            group = self.name,
                            member,
                            "member stream full or closed; ending it and disconnecting the member"
                        );
                        if let Some(tx) = self.streams.remove(&member)
                            && matches!(e, mpsc::error::TrySendError::Full(_))
                        {
                            let status: Status = BrokerError::FencedMember {
                                group: self.name.clone(),
                                member: member.clone(),
                                reason: format!(
                                    "its stream fell {STREAM_CAPACITY} messages behind: the \
                                     member was disconnected; rejoin"
                                ),
                            }
                            .into();
                            end_stream(&self.groups.shutdown, tx, status);
                        }
                        dropped.push(member);
                    }
                }
                Effect::Remove { member, why } => {
                    let Some(tx) = self.streams.remove(&member) else {
                        continue;
                    };
                    let group = self.name.clone();
                    // Expired members rejoin; a replaced one must not (another process took
                    // its place), so it is told apart by its code.
                    let e = match why {
                        Removal::Left => continue, // dropping the sender ends the stream (OK)
                        Removal::SessionExpired => BrokerError::FencedMember {
                            group,
                            member,
                            reason: "session expired".into(),
                        },
                        Removal::RebalanceTimeout => BrokerError::FencedMember {
                            group,
                            member,
                            reason: "revocation not acknowledged within the rebalance timeout"
                                .into(),
                        },
                        Removal::Replaced => BrokerError::MemberReplaced { group, member },
                    };
                    tracing::info!(error = %e, "member removed");
                    // Even from a full stream (a replaced member must learn it was, or it
                    // rejoins and flaps).
                    end_stream(&self.groups.shutdown, tx, e.into());
                }
            }
        }
        dropped
    }

    async fn handle(&mut self, ev: Event) -> Result<(), BrokerError> {
        let now = self.groups.now();
        match ev {
            Event::Join { args, out, reply } => {
                let mut topics = self.coord.topics();
                topics.extend(args.topics.iter().cloned());
                let counts = self.groups.partition_counts(&topics);
                if let Some(missing) = args.topics.iter().find(|t| !counts.contains_key(*t)) {
                    let _ = reply
                        .send(Err(
                            spool_log_engine::Error::TopicNotFound(missing.clone()).into()
                        ));
                    return Ok(());
                }
                let mut effects = self.coord.set_partitions(now, counts);
                let id = self.groups.new_member_id();
                let spec = JoinSpec {
                    new_id: id.clone(),
                    instance: args.instance,
                    previous_id: args.previous_id,
                    topics: args.topics,
                    strategy: args.strategy,
                    session_ms: args.session_ms,
                    rebalance_ms: args.rebalance_ms,
                };
                match self.coord.join(now, spec) {
                    Ok(more) => effects.extend(more),
                    Err(refusal) => {
                        let msg = match refusal {
                            JoinRefusal::StrategyMismatch { group, asked } => format!(
                                "group {:?} uses the {group:?} strategy; this member asked for {asked:?}",
                                self.name
                            ),
                            JoinRefusal::TooManyMembers(n) => {
                                format!("group {:?} has its maximum of {n} members", self.name)
                            }
                        };
                        let _ = reply.send(Err(BrokerError::InvalidRequest(msg)));
                        // set_partitions may have changed something: keep going.
                        return self.commit_effects(effects).await;
                    }
                }
                if let Err(e) = self.persist().await {
                    let _ = reply.send(Err(persist_failed(&e)));
                    return Err(e);
                }
                let m = self.coord.member(&id).expect("joined");
                let joined = v1::MembershipResponse {
                    response: Some(v1::membership_response::Response::Joined(v1::Joined {
                        member_id: id.clone(),
                        session_timeout_ms: u32::try_from(m.session_ms).unwrap_or(u32::MAX),
                        rebalance_timeout_ms: u32::try_from(m.rebalance_ms).unwrap_or(u32::MAX),
                        heartbeat_interval_ms: u32::try_from(m.session_ms / 3).unwrap_or(u32::MAX),
                        strategy: strategy_to_wire(self.coord.strategy()) as i32,
                    })),
                };
                let _ = out.try_send(Ok(joined));
                self.streams.insert(id.clone(), out);
                // Persisted above; a stream that overflows now is disconnected and that
                // persisted in turn.
                let delivered = self.commit_effects(effects).await;
                self.members
                    .store(self.coord.member_count(), Ordering::SeqCst);
                let _ = reply.send(Ok(id));
                delivered
            }
            Event::Member { member, event } => match event {
                MemberEvent::Heartbeat => {
                    // Only a member whose stream the broker has not ended is heard: one
                    // disconnected for a full stream must not keep its session alive through
                    // its request side.
                    if let Some(tx) = self.streams.get(&member)
                        && self.coord.heard(now, &member)
                    {
                        let _ = tx.try_send(Ok(v1::MembershipResponse {
                            response: Some(v1::membership_response::Response::Heartbeat(
                                v1::GroupHeartbeat {},
                            )),
                        }));
                    }
                    Ok(())
                }
                MemberEvent::Ack(generation) => {
                    let effects = self.coord.ack(now, &member, generation);
                    self.commit_effects(effects).await
                }
                MemberEvent::Leave => {
                    let effects = self.coord.leave(now, &member);
                    self.streams.remove(&member);
                    self.commit_effects(effects).await
                }
                MemberEvent::Closed(why) => {
                    // Only if this stream is still the member's (a replaced one is gone).
                    let Some(tx) = self.streams.remove(&member) else {
                        return Ok(());
                    };
                    // The member hears why its stream ends (after its backlog, if it reads it).
                    if let Some(status) = why {
                        end_stream(&self.groups.shutdown, tx, status);
                    }
                    let effects = self.coord.disconnected(now, &member);
                    self.commit_effects(effects).await
                }
            },
            Event::Commit {
                member,
                generation,
                offsets,
                now_ms,
                check_only,
                reply,
            } => {
                let wanted: Vec<Tp> = offsets
                    .iter()
                    .map(|c| (c.topic.clone(), c.partition))
                    .collect();
                let checked = match self.coord.check_commit(&member, generation, wanted.iter()) {
                    Ok(()) => Ok(()),
                    Err(Refusal::UnknownMember) => Err(BrokerError::FencedMember {
                        group: self.name.clone(),
                        member: member.clone(),
                        reason: String::new(),
                    }),
                    Err(Refusal::IllegalGeneration { tp, reason }) => {
                        Err(BrokerError::IllegalGeneration {
                            group: self.name.clone(),
                            member: member.clone(),
                            topic: tp.0,
                            partition: tp.1,
                            reason,
                        })
                    }
                };
                let result = match checked {
                    Err(e) => Err(e),
                    Ok(()) if check_only => Ok(()),
                    Ok(()) => {
                        // Appended before the next event is handled: nothing can release the
                        // partitions between the check and the append.
                        let offsets_store = self.groups.offsets.clone();
                        let group = self.name.clone();
                        blocking_task(move || {
                            crate::failpoint::panic_at("group-commit");
                            offsets_store.commit(&group, &offsets, now_ms)
                        })
                        .await
                        .and_then(|r| r)
                    }
                };
                let _ = reply.send(result);
                Ok(())
            }
            Event::LeaveBy {
                member,
                instance,
                reply,
            } => {
                let id = member.or_else(|| {
                    instance
                        .as_deref()
                        .and_then(|i| self.coord.by_instance(i))
                        .map(str::to_owned)
                });
                let Some(id) = id.filter(|id| self.coord.member(id).is_some()) else {
                    let _ = reply.send(Err(BrokerError::FencedMember {
                        group: self.name.clone(),
                        member: instance.unwrap_or_default(),
                        reason: "no such member".into(),
                    }));
                    return Ok(());
                };
                let effects = self.coord.leave(now, &id);
                self.streams.remove(&id);
                let r = self.commit_effects(effects).await;
                let _ = reply.send(match &r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(persist_failed(e)),
                });
                r
            }
            Event::Describe { reply } => {
                let _ = reply.send(describe(&self.name, &self.coord, now));
                Ok(())
            }
        }
    }
}

/// Ends a member's stream with `status`: at once if its channel has room, else as soon as the
/// client reads its backlog, waiting at most [`OVERFLOW_STATUS_WAIT`] and never past the
/// broker's shutdown (which must not wait for a client that does not read); then the stream
/// just ends.
fn end_stream(shutdown: &watch::Receiver<bool>, tx: MemberTx, status: Status) {
    if let Err(mpsc::error::TrySendError::Full(msg)) = tx.try_send(Err(status)) {
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::timeout(OVERFLOW_STATUS_WAIT, tx.send(msg)) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        });
    }
}

/// What a request whose change could not be made durable is answered (`e` itself ends the
/// members' streams, [`Task::fail`]): SHUTTING_DOWN if that is why; a full disk (or quota) as
/// STORAGE_FULL (RESOURCE_EXHAUSTED, as a produce on that disk is answered: the operator's
/// problem, not the broker's); else INTERNAL with the failure's text (the group went back to
/// its last durable state; retry).
fn persist_failed(e: &BrokerError) -> BrokerError {
    use spool_log_engine::Error as EngineError;
    use std::io::ErrorKind;
    match e {
        BrokerError::ShuttingDown => BrokerError::ShuttingDown,
        BrokerError::Engine(EngineError::Io { op, path, source })
            if matches!(
                source.kind(),
                ErrorKind::StorageFull | ErrorKind::QuotaExceeded
            ) =>
        {
            BrokerError::Engine(EngineError::Io {
                op,
                path: path.clone(),
                source: std::io::Error::new(
                    source.kind(),
                    format!("persisting the group's state failed: {source}"),
                ),
            })
        }
        e => BrokerError::Internal(format!("persisting the group's state failed: {e}")),
    }
}

/// When a group's task first re-reads its topics' partition counts (at once), and how often.
fn metadata_schedule() -> (tokio::time::Instant, Duration) {
    let now = tokio::time::Instant::now();
    #[cfg(test)]
    if FROZEN_CLOCK.with(std::cell::Cell::get) {
        // Real time would decide when a changed count is persisted, between the loop's
        // steps: with the clock stopped, never (the loops do not change partition counts;
        // a join still reads them).
        let day = Duration::from_secs(86_400);
        return (now + day, day);
    }
    (now, METADATA_INTERVAL)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod persist_failed_tests {
    use std::io::{Error, ErrorKind};

    use tonic::Code;

    use super::*;

    fn io(kind: ErrorKind) -> BrokerError {
        BrokerError::Engine(spool_log_engine::Error::Io {
            op: "write",
            path: "offsets/0".into(),
            source: Error::from(kind),
        })
    }

    /// A joiner whose join could not be persisted on a full disk was told INTERNAL ("the
    /// broker failed") where a produce on the same disk says RESOURCE_EXHAUSTED.
    #[test]
    fn a_full_disk_is_resource_exhausted_not_internal() {
        for kind in [ErrorKind::StorageFull, ErrorKind::QuotaExceeded] {
            let s: Status = persist_failed(&io(kind)).into();
            assert_eq!(s.code(), Code::ResourceExhausted, "{kind:?}: {s:?}");
            assert!(s.message().contains("group's state"), "{s:?}");
        }
        let s: Status = persist_failed(&io(ErrorKind::PermissionDenied)).into();
        assert_eq!(s.code(), Code::Internal, "{s:?}");
        let s: Status = persist_failed(&BrokerError::ShuttingDown).into();
        assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    }
}
