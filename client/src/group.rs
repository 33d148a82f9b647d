//! Consumer groups with broker-side coordination: [`GroupConsumer`], and the group calls of
//! [`Client`] ([`Client::describe_group`], [`Client::leave_group`],
//! [`Client::commit_offsets_fenced`]).
//!
//! A [`GroupConsumer`] joins a group for a set of topics over the broker's `Membership`
//! stream. The broker assigns the partitions (range, round-robin or sticky) and pushes every
//! change; the consumer follows its partitions with a [`Consumer`] and returns their records
//! from [`GroupConsumer::next`].
//!
//! # Rebalances
//!
//! Membership events are applied inside [`GroupConsumer::next`] (and
//! [`GroupConsumer::poll_membership`]), between records, so the record returned last is taken
//! as processed, as with [`Consumer::commit`]. For an Assignment:
//! 1. partitions it no longer lists are *revoked*: their positions are committed (fenced with
//!    the member id and generation; best effort: a failed commit means the next owner starts
//!    from the previous commit, at-least-once), and the consumer stops reading them;
//! 2. new partitions start at the group's committed offset (or per `offset_reset`);
//! 3. the consumer acknowledges the Assignment. Only then may the broker give the revoked
//!    partitions to another member.
//!
//! # Liveness
//!
//! A background task keeps the membership: heartbeats every third of the session timeout,
//! and forwards the broker's messages. It holds a *lease*: the broker cannot have removed the
//! member earlier than a session timeout after the send time of the last heartbeat it
//! answered; if the lease is within a heartbeat interval of running out, or the stream
//! breaks, the consumer drops its assignment (no more records of those partitions) before
//! the broker could give them to anyone, and rejoins — with its member id (which the broker
//! honours after a broker restart) and instance id (static membership: it gets its
//! partitions back if it returns within its session timeout).
//!
//! A member *replaced* by a newer one with its instance id (another process started with
//! the same `instance_id`) does not rejoin: that would take the partitions back and fence the
//! newer member, which would do the same in turn. Its membership ends for good with
//! [`Error::MemberReplaced`] (returned once by [`GroupConsumer::next`] or
//! [`GroupConsumer::poll_membership`]), like Kafka's consumer on `FENCED_INSTANCE_ID`.
//!
//! # Closing
//!
//! [`GroupConsumer::close`] commits, then leaves the group — except a static member, which
//! only closes its stream so that a restarted process with the same instance id gets its
//! partitions back without a rebalance (they are reassigned if it does not return within its
//! session timeout). [`GroupConsumer::leave`] always leaves. Dropping the consumer closes
//! its stream without committing.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use spool_proto::v1;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream_shim::ReceiverStream;

use crate::client::Client;
use crate::consumer::{Consumer, ConsumerConfig};
use crate::error::{Error, Result};
use crate::retry::Backoff;
use crate::types::{OffsetCommit, Record, StartAt, TopicPartition};

/// How the broker spreads a group's partitions (the group's first member chooses; later
/// members must ask for the same one or leave it unset).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AssignmentStrategy {
    /// Whatever the group uses (sticky for a new group).
    #[default]
    Unspecified,
    /// Per topic, consecutive ranges to members sorted by instance id (or member id).
    Range,
    /// Every partition dealt in turn to the members subscribed to its topic.
    RoundRobin,
    /// Balanced, moving as few partitions as possible when members come and go.
    Sticky,
}

impl AssignmentStrategy {
    fn to_wire(self) -> v1::AssignmentStrategy {
        match self {
            AssignmentStrategy::Unspecified => v1::AssignmentStrategy::Unspecified,
            AssignmentStrategy::Range => v1::AssignmentStrategy::Range,
            AssignmentStrategy::RoundRobin => v1::AssignmentStrategy::RoundRobin,
            AssignmentStrategy::Sticky => v1::AssignmentStrategy::Sticky,
        }
    }

    fn from_wire(v: i32) -> AssignmentStrategy {
        match v1::AssignmentStrategy::try_from(v) {
            Ok(v1::AssignmentStrategy::Range) => AssignmentStrategy::Range,
            Ok(v1::AssignmentStrategy::RoundRobin) => AssignmentStrategy::RoundRobin,
            Ok(v1::AssignmentStrategy::Sticky) => AssignmentStrategy::Sticky,
            _ => AssignmentStrategy::Unspecified,
        }
    }
}

/// Where a group is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupState {
    /// No members.
    Empty,
    /// Partitions are moving (an Assignment not acknowledged, or a partition waiting for its
    /// new owner).
    Rebalancing,
    /// Every member acknowledged its assignment and every partition has its owner.
    Stable,
}

/// One member of a group, as [`Client::describe_group`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberDescription {
    /// Member id.
    pub member_id: String,
    /// Instance id of a static member.
    pub instance_id: Option<String>,
    /// Topics it subscribed to.
    pub topics: Vec<String>,
    /// Partitions it owns (its latest Assignment), sorted.
    pub partitions: Vec<TopicPartition>,
    /// Partitions revoked from it whose revocation it has not acknowledged yet.
    pub revoking: Vec<TopicPartition>,
    /// Generation of its latest Assignment.
    pub generation: u64,
    /// Latest generation it acknowledged.
    pub acked_generation: u64,
    /// False for a static member whose stream ended (or any member after a broker restart)
    /// until it rejoins or its session expires.
    pub connected: bool,
    /// Its session timeout.
    pub session_timeout: Duration,
    /// Time since the broker last heard from it.
    pub last_heard_ago: Duration,
}

/// A group's membership, as [`Client::describe_group`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDescription {
    /// Group name.
    pub group: String,
    /// State.
    pub state: GroupState,
    /// The group generation (incremented by every assignment change).
    pub generation: u64,
    /// Assignment strategy (`Unspecified` for a group that never had members).
    pub strategy: AssignmentStrategy,
    /// Members, sorted by member id.
    pub members: Vec<MemberDescription>,
    /// Partitions of the subscribed topics that no member owns right now.
    pub unassigned: Vec<TopicPartition>,
}

fn tp_from(v: v1::TopicPartition) -> TopicPartition {
    TopicPartition::new(v.topic, v.partition)
}

impl Client {
    /// Describes a group's membership: state, generation, members and their partitions. A
    /// group without members (or unknown) is [`GroupState::Empty`].
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        let t = self.options().request_timeout;
        let req = self.request(
            v1::DescribeGroupRequest {
                group: group.to_owned(),
            },
            t,
        );
        let r = self.unary(t, self.group_stub().describe_group(req)).await?;
        let state = match v1::GroupState::try_from(r.state) {
            Ok(v1::GroupState::Stable) => GroupState::Stable,
            Ok(v1::GroupState::Rebalancing) => GroupState::Rebalancing,
            _ => GroupState::Empty,
        };
        Ok(GroupDescription {
            group: r.group,
            state,
            generation: r.generation,
            strategy: AssignmentStrategy::from_wire(r.strategy),
            members: r
                .members
                .into_iter()
                .map(|m| MemberDescription {
                    member_id: m.member_id,
                    instance_id: m.instance_id,
                    topics: m.topics,
                    partitions: m.partitions.into_iter().map(tp_from).collect(),
                    revoking: m.revoking.into_iter().map(tp_from).collect(),
                    generation: m.generation,
                    acked_generation: m.acked_generation,
                    connected: m.connected,
                    session_timeout: Duration::from_millis(u64::from(m.session_timeout_ms)),
                    last_heard_ago: Duration::from_millis(m.last_heard_ms_ago),
                })
                .collect(),
            unassigned: r.unassigned.into_iter().map(tp_from).collect(),
        })
    }

    /// Removes a member from a group at once, by member id or (`static_member`) instance id;
    /// its partitions go to the others. [`Error::FencedMember`] if there is no such member.
    pub async fn leave_group(&self, group: &str, id: &str, static_member: bool) -> Result<()> {
        let t = self.options().request_timeout;
        let (member_id, instance_id) = if static_member {
            (String::new(), id.to_owned())
        } else {
            (id.to_owned(), String::new())
        };
        let req = self.request(
            v1::LeaveGroupRequest {
                group: group.to_owned(),
                member_id,
                instance_id,
            },
            t,
        );
        self.unary(t, self.group_stub().leave_group(req)).await?;
        Ok(())
    }

    /// Commits offsets as a member of `group` in `generation`: accepted only if the member is
    /// live and owns every partition in that generation, else nothing is written
    /// ([`Error::FencedMember`], [`Error::IllegalGeneration`]).
    pub async fn commit_offsets_fenced(
        &self,
        group: &str,
        member_id: &str,
        generation: u64,
        offsets: &[OffsetCommit],
    ) -> Result<()> {
        self.commit(group, member_id, generation, offsets).await
    }
}

/// Settings of a [`GroupConsumer`].
#[derive(Clone, Debug)]
pub struct GroupConfig {
    /// Group name.
    pub group: String,
    /// Topics to consume (they must exist).
    pub topics: Vec<String>,
    /// Static membership: a stable id of this process (e.g. `host-1`). A process that
    /// returns with the same id within the session timeout gets its partitions back without
    /// a rebalance of the others.
    pub instance_id: Option<String>,
    /// Assignment strategy.
    pub strategy: AssignmentStrategy,
    /// Session timeout (default 10 s; the broker clamps it to its bounds).
    pub session_timeout: Duration,
    /// Time to acknowledge a revocation, i.e. between two calls of
    /// [`GroupConsumer::next`] during a rebalance (default 60 s).
    pub rebalance_timeout: Duration,
    /// Settings of the underlying [`Consumer`] (`group` is set from `group`).
    pub consumer: ConsumerConfig,
    /// Backoff between rejoin attempts.
    pub rejoin_backoff: Backoff,
    /// Commit the positions of revoked partitions (and, when the membership is lost, of all
    /// of them) before giving them up (default true). A transactional processor, whose
    /// offsets are committed only with its transactions
    /// ([`crate::TransactionalProducer::send_offsets`]), turns it off: its position may be
    /// ahead of what a committed transaction covers, and committing it would skip records
    /// whose outputs a later abort throws away. (A transaction that still commits offsets of
    /// a partition revoked meanwhile is refused by the broker's fence, and aborted.)
    pub commit_on_revoke: bool,
    /// Topics read over separate Subscribe streams, in priority order: when records of
    /// several streams are ready, [`GroupConsumer::poll`] and [`GroupConsumer::next`] return
    /// the earliest stream's first, and pausing one stream's partitions does not disturb
    /// the others. Topics in no list share one more stream after them. Empty (default): one
    /// stream for everything. [`GroupConsumer::poll_streams`] lets the caller choose which
    /// streams to read and in what order (a stream it leaves out keeps what it fetched).
    pub streams: Vec<Vec<String>>,
}

impl GroupConfig {
    /// Default settings for `group` and `topics`.
    pub fn new<S: Into<String>>(
        group: impl Into<String>,
        topics: impl IntoIterator<Item = S>,
    ) -> GroupConfig {
        GroupConfig {
            group: group.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            instance_id: None,
            strategy: AssignmentStrategy::Unspecified,
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(60),
            consumer: ConsumerConfig::default(),
            rejoin_backoff: Backoff::default(),
            commit_on_revoke: true,
            streams: Vec::new(),
        }
    }

    /// With static membership under `instance_id`.
    pub fn instance_id(mut self, instance_id: impl Into<String>) -> Self {
        self.instance_id = Some(instance_id.into());
        self
    }

    /// With an assignment strategy.
    pub fn strategy(mut self, strategy: AssignmentStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// With a session timeout.
    pub fn session_timeout(mut self, d: Duration) -> Self {
        self.session_timeout = d;
        self
    }
}

/// What the membership task tells the consumer.
#[derive(Debug)]
enum Event {
    Assigned {
        member_id: String,
        generation: u64,
        partitions: BTreeSet<TopicPartition>,
    },
    /// The membership is gone (stream broken, fenced, lease expired): drop the assignment.
    /// `fatal`: the task stopped (a join was refused for good, or the member was replaced).
    Lost { error: Error, fatal: bool },
}

#[derive(Debug)]
enum Command {
    Ack(u64),
    Leave,
}

/// A member of a consumer group. See the [module docs](self).
#[derive(Debug)]
pub struct GroupConsumer {
    client: Client,
    config: GroupConfig,
    /// One consumer per stream (see [`GroupConfig::streams`]); the last takes the topics
    /// no stream lists.
    consumers: Vec<Consumer>,
    events: mpsc::Receiver<Event>,
    pending: VecDeque<Event>,
    commands: mpsc::Sender<Command>,
    task: JoinHandle<()>,
    member_id: Option<String>,
    generation: u64,
    assignment: BTreeSet<TopicPartition>,
    /// The last offset committed per assigned partition.
    committed: HashMap<TopicPartition, u64>,
    rebalances: u64,
    fatal: Option<Error>,
    /// Owned partitions not being read, with the position to resume from.
    paused: HashMap<TopicPartition, u64>,
}

/// What [`GroupConsumer::poll`] returns.
#[derive(Debug)]
pub enum Polled {
    /// The next record of an owned partition.
    Record(Record),
    /// A membership change arrived and waits to be applied with
    /// [`GroupConsumer::poll_membership`]. A transactional processor commits or aborts its
    /// open transaction first: applying it acknowledges revocations.
    Membership,
}

impl GroupConsumer {
    /// Joins the group and waits for the first assignment (which may be empty when the group
    /// has more members than partitions).
    ///
    /// Errors: [`Error::UnknownTopic`], [`Error::NotAuthorized`], [`Error::InvalidRequest`]
    /// (bad names, a strategy other than the group's), and the first connection failure
    /// (later ones are retried: the member rejoins by itself).
    pub async fn join(client: &Client, mut config: GroupConfig) -> Result<GroupConsumer> {
        config.consumer.group = Some(config.group.clone());
        let (events_tx, events) = mpsc::channel(64);
        let (commands, commands_rx) = mpsc::channel(64);
        let task = tokio::spawn(drive(
            client.clone(),
            config.clone(),
            events_tx,
            commands_rx,
        ));
        let mut gc = GroupConsumer {
            client: client.clone(),
            consumers: (0..=config.streams.len())
                .map(|_| Consumer::new(client.clone(), config.consumer.clone()))
                .collect(),
            config,
            events,
            pending: VecDeque::new(),
            commands,
            task,
            member_id: None,
            generation: 0,
            assignment: BTreeSet::new(),
            committed: HashMap::new(),
            rebalances: 0,
            fatal: None,
            paused: HashMap::new(),
        };
        // The first event is the first Assignment, or why joining failed (a broker that
        // cannot be reached, a refused join): reported here rather than retried forever.
        match gc.events.recv().await {
            Some(Event::Lost { error, .. }) => {
                gc.task.abort();
                return Err(error);
            }
            Some(ev) => gc.pending.push_back(ev),
            None => return Err(Error::Closed),
        }
        gc.poll_membership().await?;
        Ok(gc)
    }

    /// This member's id (changes when it rejoins).
    pub fn member_id(&self) -> Option<&str> {
        self.member_id.as_deref()
    }

    /// The generation of the assignment in force.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The partitions this member owns now.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.assignment.iter().cloned().collect()
    }

    /// Assignments applied so far.
    pub fn rebalances(&self) -> u64 {
        self.rebalances
    }

    /// The settings in force.
    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    /// The positions (next offset to return) of the owned partitions, paused ones included.
    pub fn positions(&self) -> Vec<(TopicPartition, u64)> {
        let mut p: Vec<(TopicPartition, u64)> = self
            .consumers
            .iter()
            .flat_map(Consumer::positions)
            .collect();
        p.extend(self.paused.iter().map(|(tp, &o)| (tp.clone(), o)));
        p
    }

    /// Records between the position of an owned, unpaused partition and the last high
    /// watermark the broker reported (`None` before the first report).
    pub fn lag(&self, topic: &str, partition: u32) -> Option<u64> {
        self.consumers[self.stream_of(topic)].lag(topic, partition)
    }

    /// Stops reading owned partitions (the membership keeps them): no record of theirs is
    /// returned until [`GroupConsumer::resume`]. Their positions stay as they are; records
    /// already buffered by their stream (of every partition it reads) are dropped and read
    /// again. Partitions not owned are ignored. A revocation ends the pause with the
    /// partition. To stop reading a whole stream without dropping anything, leave it out of
    /// [`GroupConsumer::poll_streams`] instead.
    pub fn pause(&mut self, tps: &[TopicPartition]) {
        for tp in tps {
            if !self.assignment.contains(tp) || self.paused.contains_key(tp) {
                continue;
            }
            let c = &mut self.consumers[stream_of(&self.config.streams, &tp.topic)];
            if let Some(pos) = c.position(&tp.topic, tp.partition) {
                c.unassign(&tp.topic, tp.partition);
                self.paused.insert(tp.clone(), pos);
            }
        }
    }

    /// Reads paused partitions again, from where they were paused.
    pub async fn resume(&mut self, tps: &[TopicPartition]) -> Result<()> {
        let wants: Vec<(TopicPartition, StartAt)> = tps
            .iter()
            .filter_map(|tp| {
                self.paused
                    .get(tp)
                    .map(|&o| (tp.clone(), StartAt::Offset(o)))
            })
            .collect();
        if wants.is_empty() {
            return Ok(());
        }
        self.assign(&wants).await?;
        for (tp, _) in wants {
            self.paused.remove(&tp);
        }
        Ok(())
    }

    /// Moves an owned partition's position (paused or not), e.g. to re-read a record that
    /// was returned but not processed. Takes effect for the next record returned.
    pub async fn seek(&mut self, tp: &TopicPartition, offset: u64) -> Result<()> {
        if let Some(p) = self.paused.get_mut(tp) {
            *p = offset;
            return Ok(());
        }
        if self.assignment.contains(tp) {
            let i = self.stream_of(&tp.topic);
            self.consumers[i]
                .seek(&tp.topic, tp.partition, StartAt::Offset(offset))
                .await?;
        }
        Ok(())
    }

    /// Stream resets of every stream so far ([`Consumer::stream_resets`]): pauses, resumes,
    /// seeks of unpaused partitions and assignment changes each reset their stream.
    pub fn stream_resets(&self) -> u64 {
        self.consumers.iter().map(Consumer::stream_resets).sum()
    }

    /// Buffered records dropped by those resets ([`Consumer::dropped_records`]).
    pub fn dropped_records(&self) -> u64 {
        self.consumers.iter().map(Consumer::dropped_records).sum()
    }

    /// The owned partitions that are paused.
    pub fn paused(&self) -> Vec<TopicPartition> {
        let mut v: Vec<TopicPartition> = self.paused.keys().cloned().collect();
        v.sort();
        v
    }

    /// Whether a membership change arrived and waits to be applied (without applying it).
    pub fn membership_pending(&mut self) -> bool {
        while let Ok(ev) = self.events.try_recv() {
            self.pending.push_back(ev);
        }
        !self.pending.is_empty()
    }

    /// The next record, or [`Polled::Membership`] as soon as a membership change is waiting
    /// (unlike [`GroupConsumer::next`], which applies it first). Nothing is applied here, so
    /// the caller decides what happens before a revocation is acknowledged. With no
    /// partition to read (none owned, or all paused) it waits for a membership change.
    /// `None` once the membership stopped for good.
    ///
    /// Cancel-safe.
    pub async fn poll(&mut self) -> Option<Result<Polled>> {
        let all: Vec<usize> = (0..self.consumers.len()).collect();
        self.poll_streams(&all).await
    }

    /// [`GroupConsumer::poll`] reading only the streams listed in `order` (indices into
    /// [`GroupConfig::streams`]; the one after the last takes the topics no list names),
    /// preferring earlier ones when several have a record ready. A stream left out is not
    /// read: what it already fetched stays buffered (bounded as a [`Consumer`]'s, plus
    /// HTTP/2 flow control holding the broker back) and its records come, in order, when it
    /// is listed again; nothing is dropped or fetched twice (unlike
    /// [`GroupConsumer::pause`]). With no listed stream to read it waits for a membership
    /// change. Unknown indices are ignored.
    ///
    /// Cancel-safe.
    pub async fn poll_streams(&mut self, order: &[usize]) -> Option<Result<Polled>> {
        while let Ok(ev) = self.events.try_recv() {
            self.pending.push_back(ev);
        }
        if !self.pending.is_empty() {
            return Some(Ok(Polled::Membership));
        }
        if self.fatal.is_some() {
            return None;
        }
        if self.assignment.len() == self.paused.len() {
            return match self.events.recv().await {
                Some(ev) => {
                    self.pending.push_back(ev);
                    Some(Ok(Polled::Membership))
                }
                None => self.fatal.take().map(Err),
            };
        }
        tokio::select! {
            biased;
            ev = self.events.recv() => match ev {
                Some(ev) => {
                    self.pending.push_back(ev);
                    Some(Ok(Polled::Membership))
                }
                None => self.fatal.take().map(Err),
            },
            r = next_any(&mut self.consumers, order) => r.map(|r| r.map(Polled::Record)),
        }
    }

    /// The next record of an owned partition, applying membership changes first. Waits for
    /// records (and for an assignment, if it has none). `None` once the membership stopped
    /// for good after its error was returned.
    ///
    /// Cancel-safe: a membership change interrupted half-way is finished by the next call.
    pub async fn next(&mut self) -> Option<Result<Record>> {
        loop {
            if let Err(e) = self.poll_membership().await {
                return Some(Err(e));
            }
            if self.fatal.is_some() {
                return None;
            }
            if self.assignment.len() == self.paused.len() {
                if let Err(e) = self.wait_membership().await {
                    return Some(Err(e));
                }
                continue;
            }
            let all: Vec<usize> = (0..self.consumers.len()).collect();
            tokio::select! {
                biased;
                ev = self.events.recv() => match ev {
                    Some(ev) => self.pending.push_back(ev),
                    None => return self.fatal.take().map(Err),
                },
                r = next_any(&mut self.consumers, &all) => return r,
            }
        }
    }

    /// Applies the membership events that arrived, without waiting.
    pub async fn poll_membership(&mut self) -> Result<()> {
        while let Ok(ev) = self.events.try_recv() {
            self.pending.push_back(ev);
        }
        while let Some(ev) = self.pending.front() {
            let done = match ev {
                Event::Assigned {
                    member_id,
                    generation,
                    partitions,
                } => {
                    let (m, g, p) = (member_id.clone(), *generation, partitions.clone());
                    self.apply(m, g, p).await
                }
                Event::Lost { error, fatal } => {
                    let (e, fatal) = (error.clone(), *fatal);
                    self.lost(&e).await;
                    if fatal {
                        self.fatal = Some(e.clone());
                        self.pending.pop_front();
                        return Err(e);
                    }
                    tracing::info!(group = self.config.group, error = %e, "membership lost; rejoining");
                    Ok(())
                }
            };
            done?;
            self.pending.pop_front();
        }
        Ok(())
    }

    /// Waits for the next membership event and applies it.
    pub async fn wait_membership(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            match self.events.recv().await {
                Some(ev) => self.pending.push_back(ev),
                None => {
                    return Err(self.fatal.clone().unwrap_or(Error::Closed));
                }
            }
        }
        self.poll_membership().await
    }

    /// Commits the positions of the owned partitions that moved, fenced by this member's id
    /// and generation. Durable when it returns.
    pub async fn commit(&mut self) -> Result<()> {
        let owned: Vec<TopicPartition> = self.assignment.iter().cloned().collect();
        self.commit_partitions(&owned).await
    }

    async fn commit_partitions(&mut self, tps: &[TopicPartition]) -> Result<()> {
        let Some(member) = self.member_id.clone() else {
            return Ok(());
        };
        let offsets: Vec<OffsetCommit> = self
            .positions()
            .into_iter()
            .filter(|(tp, pos)| tps.contains(tp) && self.committed.get(tp) != Some(pos))
            .map(|(tp, pos)| OffsetCommit {
                topic: tp.topic,
                partition: tp.partition,
                offset: pos,
                metadata: String::new(),
            })
            .collect();
        if offsets.is_empty() {
            return Ok(());
        }
        self.client
            .commit_offsets_fenced(&self.config.group, &member, self.generation, &offsets)
            .await?;
        for c in offsets {
            self.committed
                .insert(TopicPartition::new(c.topic, c.partition), c.offset);
        }
        Ok(())
    }

    fn stream_of(&self, topic: &str) -> usize {
        stream_of(&self.config.streams, topic)
    }

    /// Assigns partitions to their streams' consumers.
    async fn assign(&mut self, wants: &[(TopicPartition, StartAt)]) -> Result<()> {
        for i in 0..self.consumers.len() {
            let mine: Vec<(TopicPartition, StartAt)> = wants
                .iter()
                .filter(|(tp, _)| stream_of(&self.config.streams, &tp.topic) == i)
                .cloned()
                .collect();
            if !mine.is_empty() {
                self.consumers[i].assign(&mine).await?;
            }
        }
        Ok(())
    }

    /// Applies an Assignment: commit and stop revoked partitions, start new ones, acknowledge.
    /// Idempotent, so an interrupted call is simply repeated.
    async fn apply(
        &mut self,
        member_id: String,
        generation: u64,
        partitions: BTreeSet<TopicPartition>,
    ) -> Result<()> {
        if self.member_id.as_deref() != Some(member_id.as_str()) {
            // A new incarnation: nothing of the old one's assignment is ours any more.
            self.drop_assignment();
            self.member_id = Some(member_id);
        }
        self.generation = generation;
        let revoked: Vec<TopicPartition> =
            self.assignment.difference(&partitions).cloned().collect();
        if !revoked.is_empty() {
            // Commit before giving them up (the broker still counts us as their owner until
            // we acknowledge). Best effort: retry transient failures a few times.
            let attempts = if self.config.commit_on_revoke { 3 } else { 0 };
            for attempt in 1..=attempts {
                match self.commit_partitions(&revoked).await {
                    Ok(()) => break,
                    Err(e) if e.is_retriable() && attempt < 3 => {
                        tokio::time::sleep(self.config.rejoin_backoff.delay(attempt)).await;
                    }
                    Err(e) => {
                        tracing::warn!(group = self.config.group, error = %e, "commit of revoked partitions failed; their next owner starts from the previous commit");
                        break;
                    }
                }
            }
            for tp in &revoked {
                let i = self.stream_of(&tp.topic);
                self.consumers[i].unassign(&tp.topic, tp.partition);
                self.assignment.remove(tp);
                self.committed.remove(tp);
                self.paused.remove(tp);
            }
        }
        let added: Vec<(TopicPartition, StartAt)> = partitions
            .difference(&self.assignment)
            .map(|tp| (tp.clone(), StartAt::Committed))
            .collect();
        if !added.is_empty() {
            self.assign(&added).await?;
            for (tp, _) in added {
                let i = self.stream_of(&tp.topic);
                if let Some(pos) = self.consumers[i].position(&tp.topic, tp.partition) {
                    // What assign resolved is what the group has (or the reset position).
                    self.committed.insert(tp.clone(), pos);
                }
                self.assignment.insert(tp);
            }
        }
        self.rebalances += 1;
        // Acknowledge: the revoked partitions are stopped and committed.
        let _ = self.commands.send(Command::Ack(generation)).await;
        Ok(())
    }

    /// The membership is gone: stop every partition (committing first where the broker may
    /// still count us as owner).
    async fn lost(&mut self, why: &Error) {
        if self.config.commit_on_revoke
            && !matches!(
                why,
                Error::FencedMember { .. } | Error::MemberReplaced { .. }
            )
            && !self.assignment.is_empty()
        {
            let _ = self.commit().await;
        }
        self.drop_assignment();
        self.generation = 0;
    }

    fn drop_assignment(&mut self) {
        for tp in std::mem::take(&mut self.assignment) {
            let i = self.stream_of(&tp.topic);
            self.consumers[i].unassign(&tp.topic, tp.partition);
        }
        self.committed.clear();
        self.paused.clear();
    }

    /// Commits (unless `commit_on_revoke` is off), then leaves the group (a static member only
    /// closes its stream and keeps its partitions for its session timeout, to be taken back by
    /// its next incarnation).
    pub async fn close(self) -> Result<()> {
        let leave = self.config.instance_id.is_none();
        self.finish(leave).await
    }

    /// Commits (unless `commit_on_revoke` is off), then leaves the group; its partitions go
    /// to the other members at once.
    pub async fn leave(self) -> Result<()> {
        self.finish(true).await
    }

    async fn finish(mut self, leave: bool) -> Result<()> {
        let _ = self.poll_membership().await;
        let committed = if self.config.commit_on_revoke {
            self.commit().await
        } else {
            Ok(())
        };
        if leave {
            let _ = self.commands.send(Command::Leave).await;
            let wait = self.client.options().request_timeout;
            let _ = tokio::time::timeout(wait, &mut self.task).await;
        }
        self.task.abort();
        committed
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The stream (consumer index) of a topic: its list in `streams`, else the last.
fn stream_of(streams: &[Vec<String>], topic: &str) -> usize {
    streams
        .iter()
        .position(|s| s.iter().any(|t| t == topic))
        .unwrap_or(streams.len())
}

/// The next record of the consumers listed in `order` (those with partitions), the earliest
/// listed first when several are ready; the others are not touched. Cancel-safe (as
/// `Consumer::next`).
async fn next_any(consumers: &mut [Consumer], order: &[usize]) -> Option<Result<Record>> {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;
    type Next<'a> = Pin<Box<dyn Future<Output = Option<Result<Record>>> + Send + 'a>>;
    if let [i] = order {
        // One stream (the common case): no boxing, no allocation.
        return match consumers.get_mut(*i) {
            Some(c) if c.has_assignment() => c.next().await,
            _ => std::future::pending().await,
        };
    }
    let mut slots: Vec<Option<&mut Consumer>> = consumers.iter_mut().map(Some).collect();
    let mut listed: Vec<&mut Consumer> = order
        .iter()
        .filter_map(|&i| slots.get_mut(i).and_then(Option::take))
        .filter(|c| c.has_assignment())
        .collect();
    if listed.len() > 1 {
        // Every listed stream open first: a later stream's ready records must not keep an
        // earlier one from ever opening (opening is cancelled whenever another stream wins).
        for c in listed.iter_mut() {
            if let Err(e) = c.ensure_open().await {
                tracing::debug!(error = %e, "opening a subscription failed; next() retries");
            }
        }
    }
    let mut active: Vec<Next<'_>> = listed
        .into_iter()
        .map(|c| Box::pin(c.next()) as Next<'_>)
        .collect();
    if active.len() <= 1 {
        return match active.pop() {
            Some(f) => f.await,
            None => std::future::pending().await,
        };
    }
    std::future::poll_fn(|cx| {
        for f in &mut active {
            if let Poll::Ready(v) = f.as_mut().poll(cx) {
                return Poll::Ready(v);
            }
        }
        Poll::Pending
    })
    .await
}

/// The membership task: joins, heartbeats, forwards Assignments, rejoins after failures.
async fn drive(
    client: Client,
    config: GroupConfig,
    events: mpsc::Sender<Event>,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut member_id: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let error = match session(&client, &config, &mut member_id, &events, &mut commands).await {
            Ok(()) => return, // left, or the consumer is gone
            Err(e) => e,
        };
        // A replaced member stops: another process has its instance id (module docs).
        let fatal = matches!(
            error,
            Error::UnknownTopic { .. }
                | Error::NotAuthorized { .. }
                | Error::Unauthenticated { .. }
                | Error::InvalidRequest { .. }
                | Error::MemberReplaced { .. }
        );
        if matches!(error, Error::FencedMember { .. }) {
            member_id = None;
        }
        if events
            .send(Event::Lost {
                error: error.clone(),
                fatal,
            })
            .await
            .is_err()
            || fatal
        {
            return;
        }
        failures += 1;
        // Out of the group while backing off: a leave (or the consumer gone) ends the task at
        // once instead of after the next join attempt.
        tokio::select! {
            () = tokio::time::sleep(config.rejoin_backoff.delay(failures.min(10))) => {}
            cmd = commands.recv() => match cmd {
                Some(Command::Ack(_)) => {} // of a generation already lost
                Some(Command::Leave) | None => return,
            },
        }
    }
}

/// One Membership stream, until it fails (`Err`) or the member leaves / is dropped (`Ok`).
async fn session(
    client: &Client,
    config: &GroupConfig,
    member_id: &mut Option<String>,
    events: &mpsc::Sender<Event>,
    commands: &mut mpsc::Receiver<Command>,
) -> Result<()> {
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    let (tx, rx) = mpsc::channel::<v1::MembershipRequest>(16);
    let join = v1::MembershipRequest {
        request: Some(v1::membership_request::Request::Join(v1::JoinGroup {
            group: config.group.clone(),
            topics: config.topics.clone(),
            instance_id: config.instance_id.clone(),
            member_id: member_id.clone().unwrap_or_default(),
            strategy: config.strategy.to_wire() as i32,
            session_timeout_ms: ms(config.session_timeout),
            rebalance_timeout_ms: ms(config.rebalance_timeout),
        })),
    };
    let join_sent = Instant::now();
    let _ = tx.send(join).await;
    let timeout = client.options().request_timeout;
    let req = client.stream_request(ReceiverStream::new(rx));
    let joining = async {
        let mut stream = client
            .unary(timeout, client.group_stub().membership(req))
            .await?;
        match tokio::time::timeout(timeout, stream.message()).await {
            Ok(Ok(Some(m))) => Ok((stream, m)),
            Ok(Ok(None)) => Err(Error::Protocol("membership stream ended at once".into())),
            Ok(Err(s)) => Err(Error::from_status(&s)),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    };
    let mut joining = std::pin::pin!(joining);
    // A join can wait up to the request timeout (e.g. for a broker that is going away); a
    // leave meanwhile ends it: nothing was joined that needs leaving (a member the broker
    // registered anyway expires after the session timeout, as after a crash).
    let (mut stream, first) = loop {
        tokio::select! {
            r = &mut joining => break r?,
            cmd = commands.recv() => match cmd {
                Some(Command::Ack(_)) => {} // of an earlier session's generation
                Some(Command::Leave) | None => return Ok(()),
            },
        }
    };
    let Some(v1::membership_response::Response::Joined(joined)) = first.response else {
        return Err(Error::Protocol(
            "the broker did not answer JoinGroup with Joined".into(),
        ));
    };
    *member_id = Some(joined.member_id.clone());
    let session = Duration::from_millis(u64::from(joined.session_timeout_ms));
    let beat = Duration::from_millis(u64::from(joined.heartbeat_interval_ms.max(10)));
    // The lease: the broker cannot remove us before `base + session`, where `base` is the
    // send time of the latest message it answered. Give up a heartbeat interval before that.
    let mut base = join_sent;
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut ticker = tokio::time::interval_at(Instant::now() + beat, beat);
    let mut leaving = false;
    loop {
        let lease_end = base + session.saturating_sub(beat);
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(m)) => match m.response {
                    Some(v1::membership_response::Response::Assignment(a)) => {
                        let ev = Event::Assigned {
                            member_id: joined.member_id.clone(),
                            generation: a.generation,
                            partitions: a.partitions.into_iter().map(tp_from).collect(),
                        };
                        if events.send(ev).await.is_err() {
                            return Ok(());
                        }
                    }
                    Some(v1::membership_response::Response::Heartbeat(_)) => {
                        if let Some(s) = sent.pop_front() {
                            base = base.max(s);
                        }
                    }
                    _ => {}
                },
                Ok(None) if leaving => return Ok(()),
                Ok(None) => return Err(Error::Unavailable { message: "the broker ended the membership stream".into() }),
                // Leaving and the stream broke: there is no membership left to end.
                Err(_) if leaving => return Ok(()),
                Err(s) => return Err(Error::from_status(&s)),
            },
            _ = ticker.tick() => {
                sent.push_back(Instant::now());
                if sent.len() > 64 {
                    sent.pop_front();
                }
                let hb = v1::MembershipRequest { request: Some(v1::membership_request::Request::Heartbeat(v1::GroupHeartbeat {})) };
                if tx.send(hb).await.is_err() {
                    return Err(Error::Unavailable { message: "membership stream closed".into() });
                }
            }
            cmd = commands.recv() => match cmd {
                Some(Command::Ack(g)) => {
                    let ack = v1::MembershipRequest { request: Some(v1::membership_request::Request::Ack(v1::AssignmentAck { generation: g })) };
                    let _ = tx.send(ack).await;
                }
                Some(Command::Leave) => {
                    leaving = true;
                    let leave = v1::MembershipRequest { request: Some(v1::membership_request::Request::Leave(v1::LeaveMembership {})) };
                    let _ = tx.send(leave).await;
                }
                None => return Ok(()),
            },
            () = tokio::time::sleep_until(lease_end), if !leaving => {
                return Err(Error::Timeout(session));
            }
        }
    }
}

/// A `Stream` over an mpsc receiver (tokio-stream's wrapper, without the dependency).
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::sync::mpsc;

    #[derive(Debug)]
    pub(super) struct ReceiverStream<T>(mpsc::Receiver<T>);

    impl<T> ReceiverStream<T> {
        pub(super) fn new(rx: mpsc::Receiver<T>) -> Self {
            ReceiverStream(rx)
        }
    }

    impl<T> futures_util::Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}
