//! The live runtime: a member of the processor's consumer group that runs the handler on
//! every record of its partitions, exactly once inside the log.
//!
//! # The loop
//!
//! ```text
//! poll ─► record ─► task (partition) ─► handler ─► Ok: emits → transaction, writes → txn layer
//!   │                                          └► Retry: blocking backoff (commit first) / DLQ
//!   │                                          └► DeadLetter: <topic>.<group>.dlq in the txn
//!   ├─► membership change ─► commit (or abort) the open transaction ─► apply (acknowledges
//!   │                        revocations) ─► drop revoked tasks, pause + restore new ones
//!   └─► input idle for commit_linger (nothing more to read), or every commit_interval /
//!       commit_max_records / max_txn_bytes under load: commit
//!         = stream timers due ─► the producer moves into a commit task: changelog records of
//!           every task's writes ─► input offsets (fenced by member id + generation) ─►
//!           EndTxn(commit); meanwhile the loop handles the next transaction (its writes
//!           over the committing ones, its outputs held) ─► the task ends: local stores
//!           apply the writes with the changelog position the commit reached, the producer
//!           comes back, begins the next transaction and sends the held outputs
//! ```
//!
//! # Invariants
//!
//! - Outputs, changelog records and input offsets of a batch commit in one transaction or
//!   not at all. A failed commit aborts, drops every task's transaction layer and moves the
//!   input positions back to the last committed offsets, so the batch is processed again.
//! - At most one commit is in flight ([`RuntimeConfig::overlap_commits`]). The transaction
//!   handled meanwhile reads the committing one's writes, so it is dropped with it if that
//!   commit fails; its outputs reach the producer only after that commit succeeded (one
//!   producer transaction at a time), and are bounded by `max_txn_bytes`. Membership
//!   changes, blocking retries and stops wait for the commit in flight, and so does the
//!   open transaction once it is due itself (so it is at most one interval old when it
//!   starts committing, as without overlap).
//! - The loop returns to tokio at least every [`YIELD_EVERY`] (1 ms) while it works through
//!   buffered input, and right after spawning a commit: a task it spawns or wakes waits in
//!   its worker's LIFO slot, which the other worker cannot steal, until it does.
//! - With several lane priorities and [`RuntimeConfig::lane_yield`] on, the reading and
//!   handling of each record (from when it was ready in the consumer until it is processed,
//!   less an in-place wait for its lane token and a retry in place's commit and backoff;
//!   not the wait for it, the loop's commits, ticks or yields) is charged to its lane, and a
//!   lane yielding to an active higher lane is left out of the read order once it spent its
//!   `min_share` (at least [`crate::flow::MIN_YIELD_SHARE`]) of the period, unless it is
//!   below its record share ([`crate::flow`]); the loop wakes at that period's end. While
//!   such a cut-off lane has records waiting (lag), the open transaction is not committed
//!   on the linger, only on `commit_interval`. One lane or the yield off: no charge, no extra clock read.
//! - Outputs reach the broker in full batches written in the background, at most
//!   [`RuntimeConfig::output_writes_in_flight`] at once and one per partition (so each
//!   partition's batches arrive in sequence order); every one is acknowledged before the
//!   transaction's `EndTxn` (the producer's `commit` flushes and waits for them all).
//! - A membership change is applied (and revocations acknowledged) only after the open
//!   transaction committed or aborted (`GroupConfig::commit_on_revoke` is off: offsets move
//!   only with transactions).
//! - The local store holds only committed data: writes reach it after their transaction
//!   committed, with the changelog position, in one local transaction.
//! - A newly owned partition is held back until its state is restored from the changelog (in
//!   a background task, read committed, from the local store's position to the end); the
//!   other partitions keep going. One at or past its own input's partition count as last
//!   seen (an input grew) first checks the changelog, dead-letter and retry topics against
//!   the inputs' counts (`ensure_internal_topics`, also run at start): short ones stop the
//!   processor (`Fatal`) unless `allow_input_growth`, which grows them; no state moves.
//! - Every output of a handler call or timer is checked before the call's writes join the
//!   transaction (`outputs.rs`); a failed check fails the call. A write the broker still
//!   refuses for good (unknown topic or partition, too large, invalid, not authorized) stops
//!   the processor after the abort ([`RuntimeError::Fatal`], naming it): a rewind would write
//!   it again.
//! - A partition held back (restoring, or holding a record: a retry not due, over its key's
//!   rate, waiting for its tables) is not paused in the consumer: its lane's stream goes on,
//!   and what it delivers for that partition is parked, in order, and handled before anything
//!   newer of the partition once it is free. Parked records are bounded by
//!   `max_parked_bytes`; a partition that does not fit is paused in the consumer at its first
//!   unparked record until it is free and its parked records are done. Parked and held
//!   records were not processed: an abort, an interrupted record or a membership change that
//!   restarts the partition drops them, and they are read again.
//! - The transactional id is `<group>-<instance_id>`, initialised before joining the group,
//!   so a restarted instance first fences its previous incarnation and aborts what it left
//!   open (which unblocks the changelog's last stable offset for the restore).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use spool_client::{
    CleanupPolicy, Client, GroupConfig, GroupConsumer, OffsetCommit, OffsetSpec, Polled, Record,
    TopicPartition, TopicSettings, TransactionalConfig, TransactionalProducer,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::context::Emit;
use crate::control::{self, Control};
use crate::effects::EffectsRetention;
use crate::engine::{self, Attempt, Env, Fired, RetryMode, RetryPolicy, Task};
use crate::flow::{self, LaneConfig, LaneYield, Lanes, ThrottleClock};
use crate::handler::{Action, AsyncHandler, Input, TimerKind};
use crate::metrics::{LaneLabel, Metrics, PartitionLabel, TopicCounters};
use crate::outputs::{Gate, Outputs};
use crate::restore::{self, Restoring};
use crate::state::SqliteBackend;

/// The wall clock the runtime passes to handlers (injectable for tests).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, in ms since the Unix epoch.
    fn now_ms(&self) -> i64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// Everything the live runtime needs (built from the TOML config by [`crate::app`], or
/// directly by tests and embedders).
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// The processor's name (the `source` of its events, log and metric labels).
    pub name: String,
    /// Its consumer group (the name, or a scratch group in replay mode).
    pub group: String,
    /// Input topics.
    pub inputs: Vec<String>,
    /// Output topics it declares (created with the inputs' partition count if missing, and
    /// in replay mode created under the prefix).
    pub outputs: Vec<String>,
    /// Stable id of this instance (host name by default): static group membership and the
    /// transactional id `<group>-<instance_id>`.
    pub instance_id: String,
    /// Where the local state stores live (the unit's `StateDirectory`).
    pub state_dir: PathBuf,
    /// Commit at least this often while there is work (default 100 ms): the bound on a
    /// transaction's age when inputs keep coming.
    pub commit_interval: Duration,
    /// Commit once no input arrived for this long (default 2 ms), without waiting for the
    /// interval: at a low rate each record is visible downstream after about this plus one
    /// commit, not half an interval more; while records keep arriving faster, transactions
    /// grow up to the interval (a commit's own duration batches what arrives meanwhile).
    /// `>= commit_interval`: commit on the interval only.
    pub commit_linger: Duration,
    /// Commit after this many inputs (default 100 000). Every transaction costs the broker
    /// a few fsyncs (offsets, decision, markers, completion), tens of ms on a busy machine: at
    /// 10 000 the pass-through bench committed every 10 000 records and spent ~60 % of its
    /// time in commits; at 100 000 the 100 ms interval decides, as in Kafka Streams.
    pub commit_max_records: usize,
    /// Commit when the open transaction's state writes reach this many bytes (default 32 MiB):
    /// the bound on buffered state. Also the bound on the outputs held while a commit is in
    /// flight ([`RuntimeConfig::overlap_commits`]).
    pub max_txn_bytes: usize,
    /// Go on processing while a transaction commits (default true): the next transaction's
    /// records are handled meanwhile, their outputs held in memory and sent once the commit
    /// is done (a Kafka-style producer has one transaction open at a time), their state
    /// writes read on top of the committing ones. False: the loop waits for each commit, as
    /// before (a record arriving during a commit then waits for it).
    pub overlap_commits: bool,
    /// The longest the loop handles buffered input without returning to tokio (default
    /// 1 ms; see [`Session::yield_if_busy`] for why it must). With overlapping commits it also
    /// returns to tokio right after spawning a commit. `None`: never (a measuring knob only:
    /// a loop fed from a full buffer then keeps the commit task and the connection's
    /// heartbeats waiting, which stalls the group).
    pub yield_every: Option<Duration>,
    /// Full output batches (1 MiB) the transactional producer writes at once in the
    /// background, each of a different partition (default 4; 1 = one at a time, as before):
    /// see `TransactionalConfig::max_writes_in_flight`. Each write waits for the broker's
    /// durable append; with one at a time the loop waited for every previous write once its
    /// next batch was full.
    pub output_writes_in_flight: usize,
    /// SQLite page cache per task (default 8 MiB).
    pub cache_bytes: usize,
    /// Committed state writes held per task before they are applied to its local store in
    /// one local transaction (default 16 MiB): the bound on that buffer
    /// ([`crate::state`]'s `TaskState`). Larger batches rewrite fewer pages per key.
    pub apply_bytes: usize,
    /// Values read from the local store kept in memory per task (default 16 MiB; 0: none):
    /// hot keys and known-absent keys are then read without SQLite ([`crate::state`]).
    pub read_cache_bytes: usize,
    /// Records set aside for partitions the runtime holds back while their lane's stream goes
    /// on (default 8 MiB; [`crate::flow`]'s `Parking`): a restoring partition, or one holding
    /// a record (a retry not due, over its key's rate, waiting for its tables). Past it, such
    /// a partition is paused in the consumer instead (its stream is reopened once, and once
    /// more when it is read again).
    pub max_parked_bytes: usize,
    /// Retries and dead letters.
    pub retry: RetryPolicy,
    /// Group session timeout (default 10 s).
    pub session_timeout: Duration,
    /// Transaction timeout (default 30 s): how long a crashed instance's open transaction can
    /// hold readers back if the instance does not come back.
    pub transaction_timeout: Duration,
    /// How often wall-clock timers, lag and progress are looked at (default 100 ms).
    pub tick_interval: Duration,
    /// How often local stores are made durable (fsync) (default 5 s).
    pub durable_interval: Duration,
    /// Prefix of every topic written (empty; `replay.` style in replay mode).
    pub output_prefix: String,
    /// False in replay mode: [`crate::Context::effect`] says `Disabled`.
    pub effects_enabled: bool,
    /// How long idempotency keys of effects are kept ([`crate::effects`]).
    pub effects_retention: EffectsRetention,
    /// Replay mode: a group without committed offsets starts at this time (ms), its
    /// [`tables`](Self::tables) at their start.
    pub start_at_ms: Option<i64>,
    /// The clock handlers see (and quiet hours follow).
    pub clock: Arc<dyn Clock>,
    /// Priority lanes, throttles, quiet hours ([`crate::flow`]); inputs in no lane form a
    /// lane of their own.
    pub lanes: Vec<LaneConfig>,
    /// While a higher lane is active, lower lanes yield the loop beyond their `min_share`
    /// of each period ([`crate::flow`]'s module docs; default on: 250 ms active window,
    /// 10 ms period). `None`: priorities order records only (a saturated lower lane then
    /// keeps the CPUs busy and a higher lane's records wait for one).
    pub lane_yield: Option<LaneYield>,
    /// Inputs read as tables (settings a stream is joined with, co-partitioned with it):
    /// before a task handles a record of another input, it reads its partitions of these up
    /// to where they ended when that record was read, so a table change written before a
    /// record is never applied after it (whatever order the broker delivers topics in).
    pub tables: Vec<String>,
    /// Go on when an input gains partitions (default false): the changelog, dead-letter and
    /// retry topics are grown to match and the new partitions are processed, but keyed state
    /// does not follow its keys to their new partitions (`docs/processors.md`, "Adding
    /// partitions to an input"). False: the processor stops with [`RuntimeError::Fatal`]
    /// naming the topics and the remedy, before anything is grown, as Kafka Streams does.
    pub allow_input_growth: bool,
}

impl RuntimeConfig {
    /// The caches of one task's local store.
    pub(crate) fn cache_sizes(&self) -> crate::state::CacheSizes {
        crate::state::CacheSizes {
            page_bytes: self.cache_bytes,
            read_bytes: self.read_cache_bytes,
        }
    }

    /// Defaults for processor `name` reading `inputs`.
    pub fn new<S: Into<String>>(
        name: impl Into<String>,
        inputs: impl IntoIterator<Item = S>,
    ) -> RuntimeConfig {
        let name = name.into();
        RuntimeConfig {
            group: name.clone(),
            name,
            inputs: inputs.into_iter().map(Into::into).collect(),
            outputs: Vec::new(),
            instance_id: "0".into(),
            state_dir: PathBuf::from("./spool-processor-state"),
            commit_interval: Duration::from_millis(100),
            commit_linger: Duration::from_millis(2),
            commit_max_records: 100_000,
            max_txn_bytes: 32 << 20,
            overlap_commits: true,
            yield_every: Some(YIELD_EVERY),
            output_writes_in_flight: 4,
            cache_bytes: 8 << 20,
            apply_bytes: 16 << 20,
            read_cache_bytes: 16 << 20,
            max_parked_bytes: 8 << 20,
            retry: RetryPolicy::default(),
            session_timeout: Duration::from_secs(10),
            transaction_timeout: Duration::from_secs(30),
            tick_interval: Duration::from_millis(100),
            durable_interval: Duration::from_secs(5),
            output_prefix: String::new(),
            effects_enabled: true,
            effects_retention: EffectsRetention::default(),
            start_at_ms: None,
            clock: Arc::new(SystemClock),
            lanes: Vec::new(),
            lane_yield: Some(LaneYield::default()),
            tables: Vec::new(),
            allow_input_growth: false,
        }
    }

    /// The changelog topic of every state store: `<group>.changelog`.
    pub fn changelog_topic(&self) -> String {
        format!("{}{}.changelog", self.output_prefix, self.group)
    }

    /// Retry topics of every input (empty unless `retry.mode = "topics"`), with their source.
    pub fn retry_topics(&self) -> Vec<(String, String)> {
        if self.retry.mode != RetryMode::Topics {
            return Vec::new();
        }
        let mut v = Vec::new();
        for t in &self.inputs {
            for level in 1..=self.retry.topic_delays_ms.len() {
                v.push((
                    format!(
                        "{}{}",
                        self.output_prefix,
                        engine::retry_topic(t, &self.group, level)
                    ),
                    t.clone(),
                ));
            }
        }
        v
    }

    fn transactional_id(&self) -> String {
        format!("{}-{}", self.group, self.instance_id)
    }
}

/// Why the runtime stopped.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The broker refused something that retrying will not fix (unknown topic, not
    /// authorized, fenced by another instance with the same id).
    #[error("{0}")]
    Client(#[from] spool_client::Error),
    /// The handler reported a fatal failure, or the state store failed.
    #[error("fatal: {0}")]
    Fatal(String),
    /// The topics the processor needs do not fit its configuration (an input gained
    /// partitions without [`RuntimeConfig::allow_input_growth`]; a retry topic has more
    /// partitions than its input): nothing changes until an operator acts, so a processor
    /// binary exits with [`crate::app::MISCONFIGURED_EXIT_CODE`], which the systemd unit does
    /// not restart.
    #[error("misconfigured: {0}")]
    Misconfigured(String),
    /// Another instance started with the same `instance_id`: this one is the older
    /// incarnation and stops, as a fenced Kafka producer does (restarting would fence the
    /// newer one, which would fence it back, and so on). Either the group replaced this
    /// member with the newer one (`source` is [`spool_client::Error::MemberReplaced`]: seen
    /// at once, even by an idle instance), or the newer one initialised the transactional id
    /// (seen at this one's next transaction). The latter is told apart from a broker
    /// restart's fence, which is survived: a transaction the broker aborted itself can still
    /// be aborted at its epoch; after another incarnation's InitProducerId it cannot.
    #[error(
        "fenced by a newer instance with the same instance id {instance_id:?} (transactional id \
         {transactional_id:?}): another processor took over; this one stops"
    )]
    Superseded {
        /// The instance id both were started with.
        instance_id: String,
        /// `<group>-<instance_id>`.
        transactional_id: String,
        /// The broker's refusal of the abort, or the end of the group membership.
        source: spool_client::Error,
    },
}

/// Something that resolves when the processor should stop (SIGTERM).
pub type Shutdown = watch::Receiver<bool>;

/// Runs the processor until `shutdown` turns true (then commits or aborts, makes the local
/// stores durable, leaves the group and returns `Ok`), or until a fatal error. Transient
/// failures (broker restarts, lost membership) are retried inside, with the session rebuilt
/// from the last committed state.
pub async fn run<H: AsyncHandler>(
    client: Client,
    cfg: RuntimeConfig,
    mut handler: H,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
) -> Result<(), RuntimeError> {
    // The inputs' partition counts as last seen, carried from session to session: a new
    // session describes the inputs again only when it is assigned a partition past them
    // (each session's first assignment used to, so an input deleted at that moment was
    // fatal there too, and every session start cost a describe per internal topic).
    let mut inputs = prepare_topics(&client, &cfg, &metrics).await?;
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        match Session::start(&client, &cfg, metrics.clone(), &inputs).await {
            Ok(mut s) => match s
                .run(&mut handler, &mut shutdown)
                .await
                .map_err(|e| superseded(e, &cfg))
                .inspect_err(|_| inputs = s.input_partitions.clone())
            {
                Ok(()) => {
                    s.close().await;
                    return Ok(());
                }
                Err(e) if fatal(&e) => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "processor session failed; restarting it from the last commit");
                    s.close().await;
                }
            },
            Err(e) if fatal(&e) => return Err(e),
            Err(e) => tracing::warn!(error = %e, "starting the processor session failed; retrying"),
        }
        metrics.ready.store(false, Ordering::Relaxed);
        if started.elapsed() > Duration::from_secs(30) {
            failures = 0;
        }
        failures = (failures + 1).min(8);
        let delay = spool_client::Backoff::default().delay(failures);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
}

/// A membership that ended because a newer member took this instance id is this instance
/// being superseded (mapped here, once, from the client's error).
fn superseded(e: RuntimeError, cfg: &RuntimeConfig) -> RuntimeError {
    match e {
        RuntimeError::Client(source @ spool_client::Error::MemberReplaced { .. }) => {
            RuntimeError::Superseded {
                instance_id: cfg.instance_id.clone(),
                transactional_id: cfg.transactional_id(),
                source,
            }
        }
        e => e,
    }
}

/// Errors a new session cannot fix. A fenced producer whose abort the broker acknowledged is
/// not one of them (the broker aborted the transaction itself: a restart, a timeout; the
/// session goes on), nor one whose abort could not reach the broker (a new session
/// re-initialises the producer). One whose abort is fenced too was superseded by a newer
/// incarnation ([`RuntimeError::Superseded`]): it stops.
fn fatal(e: &RuntimeError) -> bool {
    match e {
        RuntimeError::Fatal(_)
        | RuntimeError::Misconfigured(_)
        | RuntimeError::Superseded { .. } => true,
        RuntimeError::Client(c) => matches!(
            c,
            spool_client::Error::UnknownTopic { .. }
                | spool_client::Error::NotAuthorized { .. }
                | spool_client::Error::Unauthenticated { .. }
                | spool_client::Error::InvalidRequest { .. }
        ),
    }
}

/// Creates what the processor writes to and does not exist yet: the changelog (compacted),
/// the dead-letter and retry topics (all three grown to the inputs' partition counts if they
/// have fewer: [`ensure_internal_topics`]), the declared outputs (prefixed in replay mode);
/// and in replay mode positions the scratch group at the start time (its tables at their
/// start).
async fn prepare_topics(
    client: &Client,
    cfg: &RuntimeConfig,
    metrics: &Metrics,
) -> Result<BTreeMap<String, u32>, RuntimeError> {
    let (input_partitions, max_partitions) = ensure_internal_topics(client, cfg, metrics).await?;
    let compacted = TopicSettings {
        cleanup: Some(CleanupPolicy::Compact),
        ..TopicSettings::default()
    };
    ensure_topic(client, &control::control_topic(&cfg.group), 1, &compacted).await?;
    for t in &cfg.outputs {
        let n = match client.describe_topic(t).await {
            Ok(d) => d.partitions.len() as u32,
            Err(_) => max_partitions,
        };
        let name = format!("{}{t}", cfg.output_prefix);
        ensure_topic(client, &name, n, &TopicSettings::default()).await?;
    }
    if let Some(ts) = cfg.start_at_ms {
        let mut tps = Vec::new();
        for (t, n) in &input_partitions {
            tps.extend((0..*n).map(|p| TopicPartition::new(t.as_str(), p)));
        }
        let committed = client.fetch_offsets(&cfg.group, &tps).await?;
        if committed.iter().all(|c| c.offset.is_none()) {
            // A table is read whole (its compacted history, as a fresh instance does): the
            // settings a replayed record is joined with were mostly written long before the
            // start time, and starting them there would leave the replay without them.
            let q: Vec<_> = tps
                .iter()
                .map(|tp| {
                    let at = if cfg.tables.contains(&tp.topic) {
                        OffsetSpec::Earliest
                    } else {
                        OffsetSpec::Timestamp(ts)
                    };
                    (tp.clone(), at)
                })
                .collect();
            let found = client.list_offsets(&q).await?;
            let mut offsets = Vec::new();
            for (tp, o) in tps.iter().zip(found) {
                offsets.push(OffsetCommit {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    offset: o?.offset,
                    metadata: String::new(),
                });
            }
            client.commit_offsets(&cfg.group, &offsets).await?;
            tracing::info!(
                group = cfg.group,
                start_at_ms = ts,
                "replay group positioned at the start time"
            );
        }
    }
    Ok(input_partitions)
}

/// Creates or grows the topics the runtime keeps per input partition, to match the inputs'
/// partition counts now: the changelog (`<group>.changelog`, compacted: as many partitions as
/// the largest input), each input's dead-letter topic and retry topics (as many as their
/// input). Task `p` writes its changelog records, dead letters and retries to partition `p`
/// of them, so a partition added to an input needs its partition there before its task
/// restores (an existing topic used to be left as it was: restoring the new partition read a
/// changelog partition that did not exist, a fatal error on every restart). Returns the
/// inputs' partition counts and the largest (the changelog's count now).
///
/// An existing one with fewer partitions than it needs means an input gained partitions:
/// unless [`RuntimeConfig::allow_input_growth`], that is [`RuntimeError::Misconfigured`],
/// before anything is grown; so is a retry topic with more partitions than its input.
/// Growing moves no state: see "Adding partitions to an input" in `docs/processors.md`.
async fn ensure_internal_topics(
    client: &Client,
    cfg: &RuntimeConfig,
    metrics: &Metrics,
) -> Result<(BTreeMap<String, u32>, u32), RuntimeError> {
    let mut max_partitions = 1;
    let mut input_partitions = BTreeMap::new();
    for t in &cfg.inputs {
        let n = client.describe_topic(t).await?.partitions.len() as u32;
        input_partitions.insert(t.clone(), n);
        max_partitions = max_partitions.max(n);
    }
    let compacted = TopicSettings {
        cleanup: Some(CleanupPolicy::Compact),
        ..TopicSettings::default()
    };
    // (topic, partitions it needs, settings, the input it follows)
    let mut plan = vec![(cfg.changelog_topic(), max_partitions, compacted, None)];
    for (t, n) in &input_partitions {
        let dlq = format!("{}{}", cfg.output_prefix, engine::dlq_topic(t, &cfg.group));
        plan.push((dlq, *n, TopicSettings::default(), Some(t.clone())));
    }
    for (retry, source) in cfg.retry_topics() {
        let n = input_partitions.get(&source).copied().unwrap_or(1);
        plan.push((retry, n, TopicSettings::default(), Some(source)));
    }
    // An input that gained partitions is refused before anything grows, unless allowed. A
    // retry topic with more partitions than the changelog (the largest input's count) is
    // refused always: the group reads it, so its partitions past the changelog's would be
    // assigned, and their tasks would restore changelog partitions that do not exist. (One
    // larger than its own input only is harmless: those tasks exist for another input, and
    // no retry record is ever written there.)
    let mut short = Vec::new();
    for (topic, n, _, input) in &plan {
        match client.describe_topic(topic).await {
            Ok(d) if (d.partitions.len() as u32) < *n => {
                short.push(format!("{topic} has {} of {n}", d.partitions.len()));
            }
            Ok(d)
                if (d.partitions.len() as u32) > max_partitions
                    && cfg.retry_topics().iter().any(|(r, _)| r == topic) =>
            {
                return Err(RuntimeError::Misconfigured(format!(
                    "the retry topic {topic} has {} partitions, more than the changelog's \
                     {max_partitions} (the largest input's count; its input {} has {n}): its \
                     partitions past {max_partitions} would be assigned to tasks whose \
                     changelog partitions do not exist. Delete it (it is created again with \
                     {n}) once it holds nothing to retry, or move the processor to a new group",
                    d.partitions.len(),
                    input.as_deref().unwrap_or("?"),
                )));
            }
            Ok(_) | Err(spool_client::Error::UnknownTopic { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !short.is_empty() && !cfg.allow_input_growth {
        let inputs: Vec<String> = input_partitions
            .iter()
            .map(|(t, n)| format!("{t} has {n}"))
            .collect();
        return Err(RuntimeError::Misconfigured(format!(
            "internal topics have fewer partitions than their inputs ({}; inputs: {}): an \
             input gained partitions, or one of them was created by hand (or for another \
             configuration) with fewer. For a dead-letter or retry topic made by hand, grow \
             it: spool topic add-partitions <topic> --total <its input's count>. For an input \
             that grew, keyed state would not follow its keys (a key that now hashes to a new \
             partition would start there with no state), so the processor stops: set \
             allow_input_growth = true if it keeps no keyed state (or its keys may start \
             again empty), or move to a new input topic with a new group that rebuilds its \
             state by replay (docs/processors.md, \"Adding partitions to an input\")",
            short.join(", "),
            inputs.join(", ")
        )));
    }
    for (topic, n, settings, input) in &plan {
        let grown = grow_or_create(client, topic, *n, settings)
            .await
            .map_err(|e| match e {
                // A refusal for good (not authorized to add partitions, …) names what the
                // runtime was doing; any other failure stays as it is (a retriable one retried).
                RuntimeError::Client(_) if fatal(&e) => RuntimeError::Fatal(format!(
                    "creating or growing {topic} to {n} partitions (its input's count; \
                     allow_input_growth = {}): {e}",
                    cfg.allow_input_growth
                )),
                e => e,
            })?;
        if let Some(from) = grown {
            metrics.grown_topics.inc();
            tracing::warn!(topic, input, from, to = *n, "{}", GREW_WARNING);
        }
    }
    Ok((input_partitions, max_partitions))
}

/// Logged for every internal topic grown (with the input it follows; none: the changelog).
const GREW_WARNING: &str = "an input topic gained partitions: the runtime's topics grew to match. \
    Keyed state does not move: a key that now hashes to a new partition starts there with no \
    state (docs/processors.md, \"Adding partitions to an input\")";

/// Creates `topic` with `partitions` partitions if it does not exist, or grows it to
/// `partitions` if it has fewer; returns the count it was grown from, if it was.
async fn grow_or_create(
    client: &Client,
    topic: &str,
    partitions: u32,
    settings: &TopicSettings,
) -> Result<Option<u32>, RuntimeError> {
    let d = match client.describe_topic(topic).await {
        Ok(d) => d,
        // Only a topic the broker says does not exist is created; any other failure is the
        // caller's (a new partition's restore must not start before its topic is grown).
        Err(spool_client::Error::UnknownTopic { .. }) => {
            ensure_topic(client, topic, partitions, settings).await?;
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let had = d.partitions.len() as u32;
    if had >= partitions {
        return Ok(None);
    }
    match client.add_partitions(topic, partitions).await {
        Ok(_) => {
            tracing::info!(topic, from = had, to = partitions, "grew topic");
            Ok(Some(had))
        }
        // Another instance grew it meanwhile (the broker refuses a count that is not larger).
        Err(_)
            if client
                .describe_topic(topic)
                .await
                .is_ok_and(|d| d.partitions.len() as u32 >= partitions) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Creates `topic` with `partitions` partitions unless it exists (whatever its count).
async fn ensure_topic(
    client: &Client,
    topic: &str,
    partitions: u32,
    settings: &TopicSettings,
) -> Result<(), RuntimeError> {
    if client.describe_topic(topic).await.is_ok() {
        return Ok(());
    }
    match client.create_topic(topic, partitions, settings).await {
        Ok(_) => {
            tracing::info!(topic, partitions, "created topic");
            Ok(())
        }
        // Another instance created it meanwhile.
        Err(_) if client.describe_topic(topic).await.is_ok() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A record read but not processed yet: a retry not due, waiting for its tables, or over
/// its key's rate (its partition is held back meanwhile: the records of it that its lane's
/// stream delivers are parked behind it), or over its lane's rate (its lane is not read
/// meanwhile, so what the lane fetched stays buffered). Its position is not moved.
struct Held {
    record: Record,
    due: Instant,
    /// Its partition is held back (else its lane is not read).
    pauses: bool,
}

/// What a record counts against [`RuntimeConfig::max_parked_bytes`].
fn parked_size(r: &Record) -> usize {
    flow::PARKED_OVERHEAD
        + r.topic.len()
        + r.key.as_ref().map_or(0, Bytes::len)
        + r.value.as_ref().map_or(0, Bytes::len)
        + r.headers
            .iter()
            .map(|h| 32 + h.key.len() + h.value.as_ref().map_or(0, Bytes::len))
            .sum::<usize>()
}

/// The open transaction.
struct OpenTxn {
    started: Instant,
    records: usize,
    /// When its last input (or timer) was handled: the linger counts from there.
    last_input: Instant,
}

/// A transaction committing in the background (its producer moved into the task).
struct Committing {
    handle: JoinHandle<(TransactionalProducer, Result<(), spool_client::Error>)>,
    /// The input positions it commits.
    positions: BTreeMap<TopicPartition, u64>,
    /// Tasks whose state writes it carries (their `TaskState::begin_commit` layer).
    parts: Vec<u32>,
    started: Instant,
}

/// One membership + transactional producer, from join to failure or stop.
struct Session<'c> {
    client: Client,
    cfg: &'c RuntimeConfig,
    metrics: Arc<Metrics>,
    member: GroupConsumer,
    /// The transactional producer; `None` while a commit in flight has it.
    tx: Option<TransactionalProducer>,
    /// The commit in flight, if any (at most one).
    committing: Option<Committing>,
    /// Outputs of the open transaction handled while a commit was in flight: sent once that
    /// commit is done (bounded by `max_txn_bytes`).
    pending: Vec<Emit>,
    pending_bytes: usize,
    changelog: String,
    tasks: BTreeMap<u32, Task>,
    restoring: BTreeMap<u32, Restoring>,
    restore_token: u64,
    restored_tx: mpsc::Sender<restore::Restored>,
    restored_rx: mpsc::Receiver<restore::Restored>,
    owned: BTreeSet<TopicPartition>,
    /// Next offset to process per owned partition (moves with the open transaction).
    positions: BTreeMap<TopicPartition, u64>,
    /// Next offset as of the last committed transaction.
    committed: BTreeMap<TopicPartition, u64>,
    txn: Option<OpenTxn>,
    /// How many times the inputs were moved back to the last commit (an aborted
    /// transaction): a record being processed when this moves must not move its position.
    rewinds: u64,
    last_durable: Instant,
    last_tick: Instant,
    /// When the loop last let the worker thread run other tasks ([`YIELD_EVERY`]).
    last_yield: Instant,
    lanes: Lanes,
    /// The lanes' time origin (their yield works on durations since it).
    lanes_origin: Instant,
    /// Time spent inside the record being processed that is not the record's work (the
    /// commit before a retry in place and the retry's backoff): not charged to its lane.
    uncharged: Duration,
    /// When the record being handled was ready in the consumer (the last poll of the
    /// streams began, the one that returned it; a wait before it is not counted): its lane's
    /// charge starts there, so the work of reading and decoding a ready record is charged
    /// too, the wait for one is not (nor catching up on tables).
    charge_from: Option<Instant>,
    /// Retry topic → its source topic.
    retry_of: HashMap<String, Arc<str>>,
    held: BTreeMap<TopicPartition, Held>,
    /// Records of held-back partitions that their lane's stream delivered meanwhile, in
    /// order, bounded by [`RuntimeConfig::max_parked_bytes`] (see [`Session::held_back`]).
    parked: flow::Parking<TopicPartition, Record>,
    /// The consumer's stream resets and dropped records already counted in the metrics.
    resets_seen: (u64, u64),
    control: Arc<Mutex<Control>>,
    control_task: JoinHandle<()>,
    last_window: Instant,
    /// The consumer stream each lane is read over (`GroupConsumer::poll_streams`).
    lane_stream: Vec<usize>,
    /// Per task, the read-committed ends of its input partitions when last asked
    /// ([`RuntimeConfig::tables`]).
    table_ends: HashMap<u32, HashMap<TopicPartition, u64>>,
    /// Records waiting for their task's tables: since when the tables' positions last moved,
    /// and their sum then.
    table_wait: HashMap<TopicPartition, (Instant, u64)>,
    /// `records_in` / `records_out` counters by topic, looked up once per topic.
    counted_in: TopicCounters,
    counted_out: TopicCounters,
    /// The output topics' metadata, for the check of each handler call's outputs.
    outputs: Outputs,
    /// Partition counts of the inputs as last grown to or seen ([`ensure_internal_topics`]):
    /// a newly assigned partition at or past its input's count (a retry topic's: its
    /// source's) grows the internal topics before it is restored or handled.
    input_partitions: BTreeMap<String, u32>,
}

/// The longest the loop runs without letting its worker thread run other tasks. Records
/// come from the consumer's buffer without waiting, so a loop that never commits inline
/// (the commit runs in its own task) would otherwise never return to tokio while input is
/// buffered: tasks it spawns or wakes (the commit task, the connection task carrying the
/// group's heartbeats) go to its worker's LIFO slot, which no other worker may steal, and
/// wait there; the commit then never ends and the membership expires.
const YIELD_EVERY: Duration = Duration::from_millis(1);
/// A send of outputs that took this long counts as a wait (`loop_wait_seconds{on="output"}`).
const OUTPUT_WAIT_MIN: Duration = Duration::from_micros(50);
/// How often a record waiting for its task's tables looks again.
const TABLE_POLL: Duration = Duration::from_millis(5);
/// A record stops waiting for tables that did not move for this long (an operator paused
/// them, or they cannot be read): it is handled, with a warning, rather than stall its task.
const TABLE_STALL: Duration = Duration::from_secs(10);

impl<'c> Session<'c> {
    async fn start(
        client: &Client,
        cfg: &'c RuntimeConfig,
        metrics: Arc<Metrics>,
        inputs: &BTreeMap<String, u32>,
    ) -> Result<Session<'c>, RuntimeError> {
        let mut tcfg = TransactionalConfig::new(cfg.transactional_id());
        tcfg.transaction_timeout = cfg.transaction_timeout;
        // Full output batches are written while the handler goes on (their failure aborts
        // the transaction at the next batch or the commit).
        tcfg.write_behind = true;
        tcfg.max_writes_in_flight = cfg.output_writes_in_flight.max(1);
        // First fence the previous incarnation (aborting what it left open), then join.
        let tx = TransactionalProducer::new(client.clone(), tcfg).await?;
        // Operators' pauses apply before the first record.
        let control_topic = control::control_topic(&cfg.group);
        let (state, next) = control::load(client, &control_topic).await?;
        let control = Arc::new(Mutex::new(state));
        let control_task = tokio::spawn(control::follow(
            client.clone(),
            control_topic,
            next,
            control.clone(),
        ));
        let retry_topics = cfg.retry_topics();
        let mut lanes = Lanes::new(&cfg.lanes, &cfg.inputs, &ThrottleClock::real());
        lanes.set_yield(cfg.lane_yield);
        let mut retry_of = HashMap::new();
        for (retry, source) in &retry_topics {
            if let Some(l) = lanes.of(source) {
                lanes.map_topic(retry, l);
            }
            retry_of.insert(retry.clone(), Arc::from(source.as_str()));
        }
        let topics = cfg
            .inputs
            .iter()
            .chain(retry_topics.iter().map(|(r, _)| r))
            .map(String::as_str);
        let mut gcfg = GroupConfig::new(cfg.group.as_str(), topics)
            .instance_id(cfg.instance_id.clone())
            .session_timeout(cfg.session_timeout);
        gcfg.commit_on_revoke = false;
        // One lane: one stream for everything.
        let mut lane_stream = vec![0; lanes.lanes.len()];
        if lanes.lanes.len() > 1 {
            // One stream per lane, highest priority first (retry topics with their source).
            let mut order: Vec<usize> = (0..lanes.lanes.len()).collect();
            order.sort_by_key(|&i| lanes.lanes[i].cfg.priority);
            for (stream, &lane) in order.iter().enumerate() {
                lane_stream[lane] = stream;
            }
            gcfg.streams = order
                .into_iter()
                .map(|i| {
                    let mut topics = lanes.lanes[i].cfg.topics.clone();
                    for (retry, source) in &retry_topics {
                        if topics.contains(source) {
                            topics.push(retry.clone());
                        }
                    }
                    topics
                })
                .collect();
        }
        let member = GroupConsumer::join(client, gcfg).await?;
        let (restored_tx, restored_rx) = mpsc::channel(64);
        let mut s = Session {
            client: client.clone(),
            cfg,
            metrics,
            member,
            tx: Some(tx),
            committing: None,
            pending: Vec::new(),
            pending_bytes: 0,
            changelog: cfg.changelog_topic(),
            tasks: BTreeMap::new(),
            restoring: BTreeMap::new(),
            restore_token: 0,
            restored_tx,
            restored_rx,
            owned: BTreeSet::new(),
            positions: BTreeMap::new(),
            committed: BTreeMap::new(),
            txn: None,
            rewinds: 0,
            last_durable: Instant::now(),
            last_tick: Instant::now(),
            last_yield: Instant::now(),
            lanes,
            lanes_origin: Instant::now(),
            uncharged: Duration::ZERO,
            charge_from: None,
            retry_of,
            held: BTreeMap::new(),
            parked: flow::Parking::new(cfg.max_parked_bytes),
            resets_seen: (0, 0),
            control,
            control_task,
            last_window: Instant::now(),
            lane_stream,
            table_ends: HashMap::new(),
            table_wait: HashMap::new(),
            counted_in: TopicCounters::default(),
            counted_out: TopicCounters::default(),
            outputs: Outputs::new(&cfg.output_prefix),
            input_partitions: inputs.clone(),
        };
        s.reconcile().await?;
        s.apply_flow().await?;
        Ok(s)
    }

    fn env(&self) -> Env<'c> {
        Env {
            processor: &self.cfg.name,
            effects_enabled: self.cfg.effects_enabled,
            effects_retention: self.cfg.effects_retention,
        }
    }

    async fn run<H: AsyncHandler>(
        &mut self,
        handler: &mut H,
        shutdown: &mut Shutdown,
    ) -> Result<(), RuntimeError> {
        loop {
            if *shutdown.borrow() {
                return self.stop(handler).await;
            }
            let now = Instant::now();
            self.gate_lanes(now);
            self.yield_if_busy(now).await;
            if self.committing.is_some() && self.must_settle() {
                // The open transaction reached a bound: wait for the commit in flight.
                self.settle().await?;
            }
            if self.commit_due() {
                // Waits for the commit in flight first, if any (a transaction commits at
                // most one interval after the previous one, as without overlap).
                self.commit_in_background(handler).await?;
            }
            // With a commit in flight the open transaction cannot commit yet: its end wakes
            // the loop.
            // While a lane cut off by the yield has records waiting the input is not drained:
            // no linger (else the loop would wake at once, again and again, for nothing).
            let cut_off = self.cut_off_lane_waiting();
            let wake = match (&self.txn, &self.committing) {
                (Some(t), None) if cut_off => t.started + self.cfg.commit_interval,
                (Some(t), None) => (t.started + self.cfg.commit_interval)
                    .min(t.last_input + self.cfg.commit_linger),
                _ => self.last_tick + self.cfg.tick_interval,
            };
            let mut wake = wake.min(self.last_tick + self.cfg.tick_interval);
            // A lane yielding to a higher one is read again when its period ends.
            if let Some(t) = self.lanes.next_ungate() {
                wake = wake.min(self.lanes_origin + t);
            }
            // Held records of closed lanes wait for the tick that opens their lane.
            if let Some(due) = self
                .held
                .iter()
                .filter(|(tp, _)| self.lane_open(&tp.topic))
                .map(|(_, h)| h.due)
                .min()
            {
                wake = wake.min(due.max(Instant::now() + Duration::from_millis(1)));
            }
            let order = self.read_order();
            // A parked record free to go is its lane's ready record: only the lanes preferred
            // to it are polled first, and only for a record they have ready now.
            let parked = self.next_parked(&order);
            let poll_order = match &parked {
                Some((k, _)) => &order[..*k],
                None => &order[..],
            };
            // With the yield on: when the last poll of the streams began (the one that returns
            // the record: the wait for a record, between polls, is not charged to its lane;
            // reading a ready one is).
            let yields = self.lanes.yields();
            let mut last_poll: Option<Instant> = None;
            tokio::select! {
                biased;
                _ = shutdown.changed() => continue,
                Some((p, token, result)) = self.restored_rx.recv() => {
                    self.restored(p, token, result).await?;
                }
                joined = join_commit(&mut self.committing) => {
                    let c = self.committing.take().expect("joined");
                    self.committed_in_background(c, joined).await?;
                }
                polled = async {
                    let poll = self.member.poll_streams(poll_order);
                    let mut poll = std::pin::pin!(poll);
                    std::future::poll_fn(|cx| {
                        if yields {
                            last_poll = Some(Instant::now());
                        }
                        poll.as_mut().poll(cx)
                    })
                    .await
                } => match polled {
                    None => return Err(RuntimeError::Client(spool_client::Error::Closed)),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Polled::Membership)) => {
                        self.commit(handler).await?;
                        let before = self.member.positions();
                        self.member.poll_membership().await?;
                        self.reconcile().await?;
                        self.forget_restarted(before).await?;
                    }
                    Some(Ok(Polled::Record(r))) => {
                        self.charge_from = last_poll;
                        let done = self.on_polled(handler, r, shutdown).await;
                        self.charge_from = None;
                        done?;
                    }
                },
                () = std::future::ready(()), if parked.is_some() => {
                    if let Some((_, tp)) = parked {
                        self.unpark(handler, tp, shutdown).await?;
                    }
                }
                // Reached only when no record was ready (the poll comes first): the input is
                // drained (unless a lane cut off by the yield has records waiting), so a
                // transaction idle for the linger commits now.
                () = tokio::time::sleep_until(wake.into()) => {
                    if self.lingered() && !cut_off {
                        self.commit_in_background(handler).await?;
                    }
                }
            }
            if self.held.values().any(|h| h.due <= Instant::now()) {
                self.release(handler, shutdown).await?;
            }
            if self.last_tick.elapsed() >= self.cfg.tick_interval {
                self.tick(handler).await?;
            }
        }
    }

    /// Lets the worker thread run other tasks when the loop has not waited for anything for
    /// [`RuntimeConfig::yield_every`] ([`YIELD_EVERY`]: see there why).
    async fn yield_if_busy(&mut self, now: Instant) {
        if let Some(every) = self.cfg.yield_every
            && now.saturating_duration_since(self.last_yield) >= every
        {
            self.yield_now().await;
        }
    }

    /// At the top of a loop iteration (`now`): decides which lanes yield to active higher
    /// ones and which spent their budget ([`Lanes::gate`]; the lanes are charged for their
    /// records' handling in [`Session::on_record`]). Nothing to do unless the lanes may
    /// yield (one lane, or the yield off: no cost).
    fn gate_lanes(&mut self, now: Instant) {
        if !self.lanes.yields() {
            return;
        }
        self.lanes
            .gate(now.saturating_duration_since(self.lanes_origin));
    }

    /// Whether a lane cut off by the yield ([`Lanes::gate`]) still has records waiting
    /// (lag on one of its partitions): the input is not drained then, so the open
    /// transaction is not committed on the linger (it commits on `commit_interval`, as when
    /// that lane was read without pause). Else every high-lane record in the idle gaps of
    /// the cut-off would commit (and fsync) a transaction of its own.
    fn cut_off_lane_waiting(&self) -> bool {
        if !self.lanes.yields() || self.lanes.next_ungate().is_none() {
            return false;
        }
        self.owned.iter().any(|tp| {
            let source = self.retry_of.get(&*tp.topic).map_or(&*tp.topic, |s| s);
            self.lanes.of(source).is_some_and(|l| self.lanes.gated(l))
                && self
                    .member
                    .lag(&tp.topic, tp.partition)
                    .is_some_and(|lag| lag > 0)
        })
    }

    /// Returns to tokio once. (Waking itself instead, so that tokio requeues it behind the
    /// LIFO slot's task without polling the I/O driver first, measured the same: see
    /// `docs/benchmarks.md`, 2026-12-07 03:37.)
    async fn yield_now(&mut self) {
        tokio::task::yield_now().await;
        self.last_yield = Instant::now();
    }

    fn commit_due(&self) -> bool {
        let Some(t) = &self.txn else { return false };
        t.started.elapsed() >= self.cfg.commit_interval || self.txn_full()
    }

    /// The open transaction reached `max_records` inputs or `max_txn_bytes` of state writes.
    fn txn_full(&self) -> bool {
        self.txn
            .as_ref()
            .is_some_and(|t| t.records >= self.cfg.commit_max_records)
            || self
                .tasks
                .values()
                .map(|t| t.state.txn_bytes)
                .sum::<usize>()
                >= self.cfg.max_txn_bytes
    }

    /// An open transaction whose input has been idle for the linger (and no commit in
    /// flight).
    fn lingered(&self) -> bool {
        self.committing.is_none()
            && self
                .txn
                .as_ref()
                .is_some_and(|t| t.last_input.elapsed() >= self.cfg.commit_linger)
    }

    /// With a commit in flight: whether the open transaction reached a bound (its held
    /// outputs, records or state writes) and must wait for that commit.
    fn must_settle(&self) -> bool {
        self.pending_bytes >= self.cfg.max_txn_bytes || self.txn_full()
    }

    fn begin(&mut self) -> Result<(), RuntimeError> {
        if self.txn.is_none() {
            // With a commit in flight, the producer's transaction begins once it is done.
            if let Some(tx) = &mut self.tx {
                tx.begin()?;
            }
            let now = Instant::now();
            self.txn = Some(OpenTxn {
                started: now,
                records: 0,
                last_input: now,
            });
        }
        Ok(())
    }

    /// Adds outputs to the open transaction: to the producer, or, while a commit is in
    /// flight (the producer is busy with it), to the held outputs sent when it is done.
    async fn send(&mut self, emits: Vec<Emit>) -> Result<(), spool_client::Error> {
        if self.tx.is_none() {
            self.pending_bytes += emits.iter().map(emit_bytes).sum::<usize>();
            self.pending.extend(emits);
            return Ok(());
        }
        self.send_now(emits).await
    }

    async fn send_now(&mut self, emits: Vec<Emit>) -> Result<(), spool_client::Error> {
        if emits.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let tx = self.tx.as_mut().expect("no commit in flight when sending");
        for e in emits {
            let topic: Cow<'_, str> = if self.cfg.output_prefix.is_empty() {
                Cow::Borrowed(&e.topic)
            } else {
                Cow::Owned(format!("{}{}", self.cfg.output_prefix, e.topic))
            };
            self.counted_out.inc(&self.metrics.records_out, &topic);
            match e.partition {
                Some(p) => tx.send(&topic, p, e.record).await?,
                None => tx.send_keyed(&topic, e.record).await?,
            }
        }
        // Only the sends that waited (for the previous background write of a full batch):
        // observing every record's send would cost more than the send.
        let took = started.elapsed();
        if took >= OUTPUT_WAIT_MIN {
            self.metrics.waits.output.observe(took.as_secs_f64());
        }
        Ok(())
    }

    /// Whether the runtime holds `tp` back: its state is restoring, or it holds a record
    /// that pauses it. What its stream delivers meanwhile is parked.
    fn held_back(&self, tp: &TopicPartition) -> bool {
        !self.tasks.contains_key(&tp.partition) || self.held.get(tp).is_some_and(|h| h.pauses)
    }

    /// A record from the consumer: parked behind its partition's held or parked records (its
    /// lane's stream goes on for the other partitions), else handled.
    async fn on_polled<H: AsyncHandler>(
        &mut self,
        handler: &mut H,
        r: Record,
        shutdown: &mut Shutdown,
    ) -> Result<(), RuntimeError> {
        let tp = TopicPartition::new(&*r.topic, r.partition);
        if self.held_back(&tp) || self.parked.holds(&tp) {
            let offset = r.offset;
            let size = parked_size(&r);
            if self.parked.park(&tp, r, size).is_err() {
                // No room: this partition is not read from this record on until it is no
                // longer held back and its parked records are done ([`Session::apply_pauses`]).
                self.member.pause(std::slice::from_ref(&tp));
                self.member.seek(&tp, offset).await?;
            }
            return Ok(());
        }
        self.on_record(handler, r, shutdown).await
    }

    /// The parked partition to take a record of next, with the place of its lane's stream in
    /// `order` (the streams to read, preferred first): not held back, its lane readable,
    /// the most preferred lane first.
    fn next_parked(&self, order: &[usize]) -> Option<(usize, TopicPartition)> {
        if self.parked.is_empty() {
            return None;
        }
        self.parked
            .keys()
            .filter(|tp| !self.held_back(tp))
            .filter_map(|tp| {
                let k = match self.lanes.of(&tp.topic) {
                    Some(l) => order.iter().position(|&s| s == self.lane_stream[l])?,
                    None => 0,
                };
                Some((k, tp.clone()))
            })
            .min_by_key(|(k, _)| *k)
    }

    /// Handles `tp`'s first parked record; a partition read no more for lack of room is
    /// read again once its parked records are done.
    async fn unpark<H: AsyncHandler>(
        &mut self,
        handler: &mut H,
        tp: TopicPartition,
        shutdown: &mut Shutdown,
    ) -> Result<(), RuntimeError> {
        let Some(r) = self.parked.pop(&tp) else {
            return Ok(());
        };
        self.on_record(handler, r, shutdown).await?;
        if self.parked.len_of(&tp) == 0 && self.parked.overflowed().contains(&tp) {
            self.apply_pauses().await?;
        }
        Ok(())
    }

    /// After a membership change: a partition the consumer restarted (at the group's
    /// committed offset, after it rejoined) or no longer owns drops what the runtime held or
    /// parked of it (read again from there, or by its new owner). One whose position did not
    /// move keeps them: its stream goes on after them.
    async fn forget_restarted(
        &mut self,
        before: Vec<(TopicPartition, u64)>,
    ) -> Result<(), RuntimeError> {
        let before: BTreeMap<TopicPartition, u64> = before.into_iter().collect();
        let after: BTreeMap<TopicPartition, u64> = self.member.positions().into_iter().collect();
        let mut kept: BTreeSet<TopicPartition> = self.held.keys().cloned().collect();
        kept.extend(self.parked.keys().cloned());
        kept.extend(self.parked.overflowed().iter().cloned());
        for tp in kept {
            if !after.contains_key(&tp) || after.get(&tp) != before.get(&tp) {
                self.held.remove(&tp);
                self.parked.forget(&tp);
            }
        }
        self.apply_pauses().await
    }

    /// Records parked or held, stream resets: to the metrics.
    fn count_flow(&mut self) {
        let now = (self.member.stream_resets(), self.member.dropped_records());
        self.metrics
            .stream_resets
            .inc_by(now.0.saturating_sub(self.resets_seen.0));
        self.metrics
            .refetched
            .inc_by(now.1.saturating_sub(self.resets_seen.1));
        self.resets_seen = now;
        self.metrics.parked.set(self.parked.len() as i64);
    }

    async fn on_record<H: AsyncHandler>(
        &mut self,
        handler: &mut H,
        r: Record,
        shutdown: &mut Shutdown,
    ) -> Result<(), RuntimeError> {
        let tp = TopicPartition::new(&*r.topic, r.partition);
        if !self.tasks.contains_key(&r.partition) {
            // Cannot happen (records of restoring partitions are parked); never process
            // without state: read it again later.
            tracing::error!(
                topic = &*r.topic,
                partition = r.partition,
                "record for a partition whose state is not restored; rewinding"
            );
            self.parked.drop_records(&tp);
            self.member.seek(&tp, r.offset).await?;
            return Ok(());
        }
        let tables_from = self.charge_from.map(|_| Instant::now());
        if !self.retry_of.contains_key(&*r.topic) && self.behind_tables(&tp, r.offset).await {
            self.hold(tp, r, TABLE_POLL);
            return Ok(());
        }
        // Catching up on tables (it may ask the broker) is not the record's work either.
        if let (Some(from), Some(t)) = (self.charge_from.as_mut(), tables_from) {
            *from += t.elapsed();
        }
        let now = self.cfg.clock.now_ms();
        // A record from a retry topic: its original position, attempt and due time.
        let retry = match self.retry_of.get(&*r.topic) {
            Some(source) => {
                let info = engine::parse_retry(&r.headers);
                if let Some(i) = &info
                    && i.due_ms > now
                {
                    let wait = Duration::from_millis((i.due_ms - now) as u64);
                    self.hold(tp, r, wait);
                    return Ok(());
                }
                Some((source.clone(), info))
            }
            None => None,
        };
        let source = retry
            .as_ref()
            .map_or_else(|| r.topic.clone(), |(s, _)| s.clone());
        let lane = self.lanes.of(&source);
        if let Some(l) = lane {
            // A short wait for the lane's token is waited here: holding the record would
            // pause the partition and fetch it again, for every record over the rate.
            while let Some(wait) = self.lanes.lanes[l].admit(r.key.as_deref()) {
                if wait.per_key {
                    self.hold(tp, r, wait.after);
                    return Ok(());
                }
                if wait.after > flow::INLINE_WAIT {
                    // The lane is not read until then; what it fetched stays buffered.
                    self.held.insert(
                        tp,
                        Held {
                            record: r,
                            due: Instant::now() + wait.after,
                            pauses: false,
                        },
                    );
                    return Ok(());
                }
                tokio::time::sleep(wait.after).await;
                // The wait for the token is not the record's work.
                self.charge_from = None;
            }
        }
        let read_offset = r.offset;
        let lane_name: Arc<str> = match lane {
            Some(l) => Arc::from(self.lanes.lanes[l].cfg.name.as_str()),
            None => source.clone(),
        };
        let (offset, attempt, history, headers) = match retry {
            Some((_, Some(info))) => (
                info.offset,
                info.attempt,
                info.history,
                r.headers
                    .into_iter()
                    .filter(|h| !h.key.starts_with(engine::headers::PREFIX))
                    .collect(),
            ),
            // Put into a retry topic by hand (without the retry headers a redrive writes): a
            // first attempt, due now, at the retry topic's offset.
            Some((_, None)) => (r.offset, 1, Vec::new(), r.headers),
            None => (r.offset, 1, Vec::new(), r.headers),
        };
        let input = Input {
            topic: source,
            partition: r.partition,
            offset,
            timestamp_ms: r.timestamp_ms,
            key: r.key,
            value: r.value,
            headers,
            attempt,
            lane: lane_name,
        };
        // The lane is charged for the record's reading and handling only: from when it was
        // ready in the consumer (`charge_from`; here if it came from the parked records or
        // waited in place for its token) until it is processed, less the commit and backoff
        // of a retry in place. Not the wait for the record, commits of the loop, ticks or
        // yields to tokio.
        let mut charged = None;
        if let Some(l) = lane {
            self.lanes.lanes[l].window_count += 1;
            if self.lanes.yields() {
                let taken = self.charge_from.take().unwrap_or_else(Instant::now);
                self.lanes
                    .mark(l, taken.saturating_duration_since(self.lanes_origin));
                charged = Some((l, taken));
            }
        }
        self.uncharged = Duration::ZERO;
        let rewinds = self.rewinds;
        let handled = self.process(handler, input, history, &tp, shutdown).await;
        if let Some((l, taken)) = charged {
            let busy = taken
                .elapsed()
                .saturating_sub(std::mem::take(&mut self.uncharged));
            self.lanes.charge(l, busy);
        }
        let handled = handled?;
        if self.rewinds != rewinds {
            // A transaction aborted meanwhile (this record's, or the commit before a retry in
            // place): every input, this one included, was moved back to the last commit.
            return Ok(());
        }
        if !handled {
            // Interrupted (a revocation or a stop): read it again later, and what was parked
            // after it too.
            self.parked.drop_records(&tp);
            self.member.seek(&tp, read_offset).await?;
            return Ok(());
        }
        self.positions.insert(tp, read_offset + 1);
        if let Some(t) = &mut self.txn {
            t.records += 1;
            t.last_input = Instant::now();
        }
        Ok(())
    }

    /// Whether the record at `offset` of `tp` must wait for its task to read more of its
    /// tables ([`RuntimeConfig::tables`]): some table partition of the task is below the end
    /// it had when the record was already readable. The ends are asked of the broker (read
    /// committed) only when a record is past the ends last asked; a broker that cannot be
    /// asked means wait and ask again.
    async fn behind_tables(&mut self, tp: &TopicPartition, offset: u64) -> bool {
        if self.cfg.tables.is_empty() || self.cfg.tables.contains(&tp.topic) {
            return false;
        }
        let tables: Vec<TopicPartition> = self
            .owned
            .iter()
            .filter(|t| t.partition == tp.partition && self.cfg.tables.contains(&t.topic))
            .cloned()
            .collect();
        if tables.is_empty() {
            return false;
        }
        let known = self
            .table_ends
            .get(&tp.partition)
            .and_then(|e| e.get(tp))
            .is_some_and(|&end| offset < end);
        if !known {
            let q: Vec<(TopicPartition, spool_client::OffsetSpec)> = std::iter::once(tp)
                .chain(&tables)
                .map(|t| (t.clone(), spool_client::OffsetSpec::Latest))
                .collect();
            let ends = match self
                .client
                .list_offsets_with(&q, spool_client::Isolation::ReadCommitted)
                .await
            {
                Ok(ends) => ends,
                Err(e) => {
                    tracing::debug!(error = %e, "asking the tables' ends failed; asking again");
                    return true;
                }
            };
            let mut m = HashMap::new();
            for ((t, _), end) in q.into_iter().zip(ends) {
                match end {
                    Ok(end) => m.insert(t, end.offset),
                    Err(_) => return true,
                };
            }
            self.table_ends.insert(tp.partition, m);
        }
        let ends = &self.table_ends[&tp.partition];
        let reading: HashMap<TopicPartition, u64> = self.member.positions().into_iter().collect();
        // The next table record to handle: a held or parked one, else where the consumer is.
        let next: HashMap<TopicPartition, u64> = tables
            .iter()
            .map(|t| {
                let at = self
                    .held
                    .get(t)
                    .map(|h| h.record.offset)
                    .or_else(|| self.parked.front(t).map(|r| r.offset))
                    .or_else(|| reading.get(t).copied())
                    .unwrap_or(0);
                (t.clone(), at)
            })
            .collect();
        let pos = |t: &TopicPartition| next.get(t).copied().unwrap_or(0);
        // Tables held back (or in a closed lane) are not waited for.
        let behind = tables.iter().any(|t| {
            !self.held_back(t)
                && self.lane_open(&t.topic)
                && pos(t) < ends.get(t).copied().unwrap_or(0)
        });
        if !behind {
            self.table_wait.remove(tp);
            return false;
        }
        let moved: u64 = tables.iter().map(pos).sum();
        let now = Instant::now();
        let (since, last) = self.table_wait.entry(tp.clone()).or_insert((now, moved));
        if *last != moved {
            (*since, *last) = (now, moved);
        } else if since.elapsed() >= TABLE_STALL {
            tracing::warn!(
                topic = tp.topic,
                partition = tp.partition,
                offset,
                "the task's tables did not move for 10 s; handling the record without the rest of them"
            );
            self.table_wait.remove(tp);
            // Until the ends are asked again, the tables count as read where they stopped.
            if let Some(ends) = self.table_ends.get_mut(&tp.partition) {
                for t in &tables {
                    ends.insert(t.clone(), pos(t));
                }
            }
            return false;
        }
        true
    }

    /// Holds a record for `wait`; its partition is held back meanwhile (what its stream
    /// delivers is parked behind it).
    fn hold(&mut self, tp: TopicPartition, record: Record, wait: Duration) {
        self.held.insert(
            tp,
            Held {
                record,
                due: Instant::now() + wait,
                pauses: true,
            },
        );
    }

    /// The streams to read now, preferred first: the open lanes in [`Lanes::order`], but
    /// not those whose throttle holds a record of theirs.
    fn read_order(&self) -> Vec<usize> {
        let throttled: Vec<usize> = self
            .held
            .iter()
            .filter(|(_, h)| !h.pauses)
            .filter_map(|(tp, _)| self.lanes.of(&tp.topic))
            .collect();
        self.lanes
            .order()
            .into_iter()
            .filter(|l| !throttled.contains(l))
            .map(|l| self.lane_stream[l])
            .collect()
    }

    /// Processes held records that are due (their partitions resume at the next tick, when
    /// their lane is open).
    async fn release<H: AsyncHandler>(
        &mut self,
        handler: &mut H,
        shutdown: &mut Shutdown,
    ) -> Result<(), RuntimeError> {
        let now = Instant::now();
        let due: Vec<TopicPartition> = self
            .held
            .iter()
            .filter(|(tp, h)| h.due <= now && self.lane_open(&tp.topic))
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in due {
            if let Some(h) = self.held.remove(&tp) {
                self.on_record(handler, h.record, shutdown).await?;
            }
        }
        self.apply_pauses().await
    }

    fn lane_open(&self, topic: &str) -> bool {
        let source = self.retry_of.get(topic).map_or(topic, |s| s);
        self.lanes
            .of(source)
            .is_none_or(|l| self.lanes.lanes[l].closed.is_none())
    }

    /// Runs the handler on one input with the retry policy. False if interrupted (the input
    /// must be read again), true once it was handled, retried through a retry topic, or
    /// dead-lettered. A transaction that aborts meanwhile moves [`Session::rewinds`] (the
    /// caller then leaves the positions where the rewind put them).
    async fn process<H: AsyncHandler>(
        &mut self,
        handler: &mut H,
        mut input: Input,
        mut history: Vec<Attempt>,
        read: &TopicPartition,
        shutdown: &mut Shutdown,
    ) -> Result<bool, RuntimeError> {
        let env = self.env();
        // The cursor of a handler that asked to be called again (Context::call_again).
        let mut resume: Option<Bytes> = None;
        loop {
            self.begin()?;
            let now = self.cfg.clock.now_ms();
            let started = Instant::now();
            let task = self
                .tasks
                .get_mut(&input.partition)
                .expect("checked by the caller");
            let resumed = resume.is_some();
            // Outputs are checked as the call ends ([`crate::outputs`]): one the broker would
            // refuse fails the call, and the retry policy applies to this input alone.
            let mut outputs = Gate {
                outputs: &mut self.outputs,
                client: &self.client,
            };
            let result = task
                .handle(handler, &input, now, env, resume.take(), &mut outputs)
                .await;
            self.metrics
                .process_seconds
                .observe(started.elapsed().as_secs_f64());
            let failure = match result {
                Ok((emits, again)) => {
                    if let Err(e) = self.send(emits).await {
                        self.abort_and_rewind(e).await?;
                        return Ok(false);
                    }
                    if again.is_some() {
                        resume = again;
                        continue;
                    }
                    break;
                }
                Err(f) if resumed => {
                    // Earlier calls' records are in the open transaction: the input can no
                    // longer be retried or dead-lettered alone.
                    self.abort_quietly().await;
                    return Err(RuntimeError::Fatal(format!(
                        "{}[{}]@{} failed after call_again: {}",
                        input.topic, input.partition, input.offset, f.reason
                    )));
                }
                Err(f) => f,
            };
            history.push(Attempt {
                attempt: input.attempt,
                at_ms: now,
                reason: failure.reason.clone(),
            });
            let skipped = self.skip_reason(read, &input);
            let (topic, record) = match failure.action {
                Action::Fatal => {
                    self.abort_quietly().await;
                    return Err(RuntimeError::Fatal(failure.reason));
                }
                Action::Retry
                    if skipped.is_none() && self.cfg.retry.retries_after(input.attempt) =>
                {
                    self.metrics
                        .retries
                        .get_or_create(&Metrics::topic(&input.topic))
                        .inc();
                    if self.cfg.retry.mode == RetryMode::Topics {
                        let delays = &self.cfg.retry.topic_delays_ms;
                        let level = (input.attempt as usize).clamp(1, delays.len());
                        let due = now + delays[level - 1] as i64;
                        let topic = engine::retry_topic(&input.topic, &self.cfg.group, level);
                        (topic, engine::retry_record(&input, &history, due))
                    } else {
                        let delay = self.cfg.retry.backoff(input.attempt);
                        tracing::info!(
                            topic = &*input.topic,
                            partition = input.partition,
                            offset = input.offset,
                            attempt = input.attempt,
                            ?delay,
                            reason = failure.reason,
                            "retrying in place"
                        );
                        // Commit what is done, then wait without holding a transaction open.
                        // Neither is the record's work: not charged to its lane.
                        let paused = Instant::now();
                        let rewinds = self.rewinds;
                        let committed = self.commit(handler).await;
                        self.uncharged += paused.elapsed();
                        committed?;
                        if self.rewinds != rewinds {
                            // That commit aborted: this input is read again from there.
                            return Ok(false);
                        }
                        self.metrics.blocked.inc();
                        let waited = Instant::now();
                        let waited_for = self.wait_retry(delay, shutdown, read, &input).await;
                        self.uncharged += waited.elapsed();
                        self.metrics.blocked.dec();
                        match waited_for {
                            Waited::Interrupted => return Ok(false),
                            Waited::Due => {
                                input.attempt += 1;
                                continue;
                            }
                            // Given up without calling the handler again.
                            Waited::Skipped(why) => {
                                let now = self.cfg.clock.now_ms();
                                self.dead_letter(&input, &mut history, Some(why), now)
                            }
                        }
                    }
                }
                Action::Retry | Action::DeadLetter => {
                    self.dead_letter(&input, &mut history, skipped, now)
                }
            };
            self.begin()?;
            let emit = Emit {
                topic,
                partition: Some(input.partition),
                record,
            };
            if let Err(e) = self.send(vec![emit]).await {
                self.abort_and_rewind(e).await?;
                return Ok(false);
            }
            break;
        }
        self.counted_in.inc(&self.metrics.records_in, &input.topic);
        self.metrics.done.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The dead-letter topic and record of `input` after the failures in `history` (plus
    /// the operator's skip, if `skipped`), counted and logged.
    fn dead_letter(
        &self,
        input: &Input,
        history: &mut Vec<Attempt>,
        skipped: Option<String>,
        now: i64,
    ) -> (String, spool_client::ProducerRecord) {
        if let Some(why) = skipped {
            history.push(Attempt {
                attempt: input.attempt,
                at_ms: now,
                reason: format!("skipped by an operator (spool dlq skip): {why}"),
            });
        }
        self.metrics
            .dead_letters
            .get_or_create(&Metrics::topic(&input.topic))
            .inc();
        tracing::warn!(
            topic = &*input.topic,
            partition = input.partition,
            offset = input.offset,
            reason = history
                .last()
                .map(|a| a.reason.as_str())
                .unwrap_or_default(),
            "dead-lettered"
        );
        let record = engine::dead_letter(input, &self.cfg.group, history, now);
        (engine::dlq_topic(&input.topic, &self.cfg.group), record)
    }

    /// Why an operator asked to skip this record (by its original or its read position), if
    /// they did.
    fn skip_reason(&self, read: &TopicPartition, input: &Input) -> Option<String> {
        let c = self
            .control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.skips
            .get(&(input.topic.to_string(), input.partition, input.offset))
            .or_else(|| {
                c.skips
                    .get(&(read.topic.clone(), read.partition, input.offset))
            })
            .cloned()
    }

    /// Waits `delay` before retrying in place, until a membership change or a stop
    /// ([`Waited::Interrupted`]), the delay passed ([`Waited::Due`]) or an operator skipped
    /// the record ([`Waited::Skipped`]), whichever comes first.
    async fn wait_retry(
        &mut self,
        delay: Duration,
        shutdown: &mut Shutdown,
        read: &TopicPartition,
        input: &Input,
    ) -> Waited {
        let until = Instant::now() + delay;
        loop {
            if *shutdown.borrow() || self.member.membership_pending() {
                return Waited::Interrupted;
            }
            if let Some(why) = self.skip_reason(read, input) {
                return Waited::Skipped(why);
            }
            let now = Instant::now();
            if now >= until {
                return Waited::Due;
            }
            let step = (until - now).min(Duration::from_millis(50));
            tokio::select! {
                () = tokio::time::sleep(step) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Fires due wall-clock timers, refreshes lag gauges, and makes local stores durable
    /// when due.
    async fn tick<H: AsyncHandler>(&mut self, handler: &mut H) -> Result<(), RuntimeError> {
        self.last_tick = Instant::now();
        self.metrics.alive();
        let now = self.cfg.clock.now_ms();
        let parts: Vec<u32> = self.tasks.keys().copied().collect();
        for p in parts {
            self.fire(handler, p, TimerKind::Wall, now).await?;
        }
        for tp in &self.owned {
            if let Some(lag) = self.member.lag(&tp.topic, tp.partition) {
                let lag = lag.saturating_add(self.parked.len_of(tp) as u64);
                self.metrics
                    .lag
                    .get_or_create(&PartitionLabel {
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                    })
                    .set(lag as i64);
            }
        }
        if self.txn.is_none() && self.last_durable.elapsed() >= self.cfg.durable_interval {
            self.make_durable()?;
        }
        self.count_flow();
        self.apply_flow().await
    }

    /// Decides which lanes may be read (operator pauses, quiet hours), starts a new share
    /// window every second, and pauses or resumes partitions ([`Session::apply_pauses`]).
    async fn apply_flow(&mut self) -> Result<(), RuntimeError> {
        let now = self.cfg.clock.now_ms();
        {
            let c = self
                .control
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for l in &mut self.lanes.lanes {
                l.operator_paused = c.lane_paused(&l.cfg.name);
            }
        }
        self.lanes.decide(now);
        if self.last_window.elapsed() >= Duration::from_secs(1) {
            self.lanes.new_window();
            self.last_window = Instant::now();
            for l in &self.lanes.lanes {
                l.prune();
            }
        }
        for l in &self.lanes.lanes {
            let closed = l.closed.is_some();
            self.metrics
                .paused_lanes
                .get_or_create(&LaneLabel {
                    lane: l.cfg.name.clone(),
                })
                .set(i64::from(closed));
            self.metrics
                .yielding_lanes
                .get_or_create(&LaneLabel {
                    lane: l.cfg.name.clone(),
                })
                .set(i64::from(l.yielding));
        }
        self.apply_pauses().await
    }

    /// Pauses exactly the owned partitions that must not be read now: those whose parked
    /// records overflowed [`RuntimeConfig::max_parked_bytes`], until they are no longer held
    /// back and their parked records are done. (A partition held back is not paused: what
    /// its stream delivers is parked, so the stream goes on for the others. A closed or
    /// throttled lane is not paused either: it is left out of [`Session::read_order`], which
    /// keeps what it fetched.)
    async fn apply_pauses(&mut self) -> Result<(), RuntimeError> {
        let done: Vec<TopicPartition> = self
            .parked
            .overflowed()
            .iter()
            .filter(|tp| {
                !self.owned.contains(*tp) || (self.parked.len_of(tp) == 0 && !self.held_back(tp))
            })
            .cloned()
            .collect();
        for tp in &done {
            self.parked.end_overflow(tp);
        }
        let desired: BTreeSet<TopicPartition> = self
            .parked
            .overflowed()
            .iter()
            .filter(|tp| self.owned.contains(*tp))
            .cloned()
            .collect();
        let current: BTreeSet<TopicPartition> = self.member.paused().into_iter().collect();
        let pause: Vec<TopicPartition> = desired.difference(&current).cloned().collect();
        let resume: Vec<TopicPartition> = current.difference(&desired).cloned().collect();
        if !pause.is_empty() {
            self.member.pause(&pause);
        }
        if !resume.is_empty() {
            self.member.resume(&resume).await?;
        }
        Ok(())
    }

    fn make_durable(&mut self) -> Result<(), RuntimeError> {
        let started = Instant::now();
        for t in self.tasks.values_mut() {
            t.state
                .flush(true)
                .map_err(|e| RuntimeError::Fatal(e.to_string()))?;
        }
        self.last_durable = Instant::now();
        self.metrics
            .waits
            .local
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Fires the timers of `kind` due by `upto` in task `p` (inside the open transaction),
    /// earliest first, at most 1000 per call. A timer whose handler fails is set again with
    /// the retry policy's backoff, or dropped after its last attempt ([`engine::Fired`]); the
    /// later timers fire either way.
    async fn fire<H: AsyncHandler>(
        &mut self,
        handler: &mut H,
        p: u32,
        kind: TimerKind,
        upto: i64,
    ) -> Result<(), RuntimeError> {
        let env = self.env();
        for _ in 0..1000 {
            let Some(task) = self.tasks.get_mut(&p) else {
                return Ok(());
            };
            let due = task
                .due_timers(kind, upto, 1)
                .map_err(|e| RuntimeError::Fatal(e.to_string()))?;
            let Some(timer) = due.into_iter().next() else {
                return Ok(());
            };
            self.begin()?;
            let now = self.cfg.clock.now_ms();
            let task = self.tasks.get_mut(&p).expect("present");
            let retry = &self.cfg.retry;
            let mut outputs = Gate {
                outputs: &mut self.outputs,
                client: &self.client,
            };
            let fired = task
                .fire(
                    handler,
                    &timer,
                    now,
                    env,
                    retry,
                    |a| retry.backoff(a),
                    &mut outputs,
                )
                .await;
            match fired {
                Ok(Fired::Done(emits)) => {
                    self.metrics.timers_fired.inc();
                    if let Err(e) = self.send(emits).await {
                        return self.abort_and_rewind(e).await;
                    }
                }
                Ok(Fired::Retrying {
                    attempt,
                    at_ms,
                    reason,
                }) => {
                    self.metrics.timer_retries.inc();
                    tracing::warn!(
                        partition = p,
                        key = ?timer.key,
                        ?kind,
                        next_attempt = attempt,
                        at_ms,
                        reason,
                        "timer failed; set again"
                    );
                }
                Ok(Fired::Dropped { attempts, reason }) => {
                    self.metrics.timers_dropped.inc();
                    // Enough to set it again by hand: the key and (bounded) payload.
                    let shown = &timer.payload[..timer.payload.len().min(DROPPED_PAYLOAD_SHOWN)];
                    tracing::error!(
                        partition = p,
                        key = %timer.key.escape_ascii(),
                        ?kind,
                        attempts,
                        payload_bytes = timer.payload.len(),
                        payload = %shown.escape_ascii(),
                        reason,
                        "timer failed for the last time; dropped"
                    );
                }
                Err(f) => {
                    // Fatal (the handler said so, or the state store failed).
                    return Err(RuntimeError::Fatal(f.reason));
                }
            }
            if let Some(t) = &mut self.txn {
                t.records += 1;
                t.last_input = Instant::now();
            }
        }
        Ok(())
    }

    /// Commits the open transaction (stream timers first) and waits for it, then applies the
    /// state writes locally. On failure: abort and rewind (or an error that restarts the
    /// session).
    async fn commit<H: AsyncHandler>(&mut self, handler: &mut H) -> Result<(), RuntimeError> {
        self.commit_in_background(handler).await?;
        self.settle().await
    }

    /// Starts committing the open transaction (stream timers first) after the commit in
    /// flight, if any, is done; the loop goes on meanwhile unless
    /// [`RuntimeConfig::overlap_commits`] is off.
    async fn commit_in_background<H: AsyncHandler>(
        &mut self,
        handler: &mut H,
    ) -> Result<(), RuntimeError> {
        self.settle().await?;
        if self.txn.is_none() {
            return Ok(());
        }
        let parts: Vec<u32> = self.tasks.keys().copied().collect();
        for p in parts {
            let st = self.tasks[&p].stream_time;
            if st > self.tasks[&p].stream_timers_checked {
                self.fire(handler, p, TimerKind::Stream, st).await?;
                if let Some(t) = self.tasks.get_mut(&p) {
                    t.stream_timers_checked = st;
                }
            }
        }
        self.start_commit();
        if self.cfg.overlap_commits {
            if self.cfg.yield_every.is_some() {
                // The commit task was spawned into this worker's LIFO slot: run it now,
                // before the next record ([`YIELD_EVERY`]).
                self.yield_now().await;
            }
        } else {
            self.settle().await?;
        }
        Ok(())
    }

    /// Commits the open transaction as it is (no timers) and waits for it.
    async fn finish_commit(&mut self) -> Result<(), RuntimeError> {
        self.settle().await?;
        self.start_commit();
        self.settle().await
    }

    /// Hands the open transaction to a background task that sends its changelog records and
    /// input offsets and commits it ([`Committing`]); its state writes stay readable under
    /// the next transaction's until the outcome is known. No commit may be in flight.
    fn start_commit(&mut self) {
        if self.txn.is_none() {
            // Nothing open (or a timer's failure aborted it).
            return;
        }
        debug_assert!(
            self.pending.is_empty(),
            "outputs held without a commit in flight"
        );
        let Some(mut tx) = self.tx.take() else {
            debug_assert!(false, "a commit is already in flight");
            return;
        };
        self.txn = None;
        let started = Instant::now();
        let mut parts = Vec::new();
        let mut records = Vec::new();
        for (p, task) in &mut self.tasks {
            let w = task.state.begin_commit();
            if !w.is_empty() {
                parts.push(*p);
                records.extend(w.iter().map(|(k, v)| (*p, engine::changelog_record(k, v))));
            }
        }
        let offsets: Vec<OffsetCommit> = self
            .positions
            .iter()
            .filter(|(tp, pos)| self.committed.get(*tp) != Some(*pos))
            .map(|(tp, pos)| OffsetCommit {
                topic: tp.topic.clone(),
                partition: tp.partition,
                offset: *pos,
                metadata: String::new(),
            })
            .collect();
        let member = self.member.member_id().unwrap_or_default().to_owned();
        let generation = self.member.generation();
        let (changelog, group) = (self.changelog.clone(), self.cfg.group.clone());
        let handle = tokio::spawn(async move {
            let result = async {
                for (p, r) in records {
                    tx.send(&changelog, p, r).await?;
                }
                if !offsets.is_empty() {
                    tx.send_offsets(&group, &offsets, Some((&member, generation)))
                        .await?;
                }
                tx.commit().await
            }
            .await;
            (tx, result)
        });
        self.committing = Some(Committing {
            handle,
            positions: self.positions.clone(),
            parts,
            started,
        });
    }

    /// Waits for the commit in flight, if any, and takes its outcome into account.
    async fn settle(&mut self) -> Result<(), RuntimeError> {
        if self.committing.is_none() {
            return Ok(());
        }
        let waited = Instant::now();
        let joined = join_commit(&mut self.committing).await;
        self.metrics
            .waits
            .commit
            .observe(waited.elapsed().as_secs_f64());
        let c = self.committing.take().expect("joined");
        self.committed_in_background(c, joined).await
    }

    /// The commit in flight ended: on success its positions are the committed ones, its state
    /// writes go to the local stores, and the open transaction (handled meanwhile) begins in
    /// the producer with the outputs it held; on failure: abort and rewind.
    async fn committed_in_background(
        &mut self,
        c: Committing,
        joined: Joined,
    ) -> Result<(), RuntimeError> {
        let (tx, result) = joined.map_err(|e| RuntimeError::Fatal(format!("commit task: {e}")))?;
        tracing::debug!(
            ok = result.is_ok(),
            took = ?c.started.elapsed(),
            held = self.pending.len(),
            "commit ended"
        );
        self.tx = Some(tx);
        if let Err(e) = result {
            return self.abort_and_rewind(e).await;
        }
        self.committed_ok(c.positions, &c.parts, c.started)?;
        if self.txn.is_some()
            && let Some(tx) = &mut self.tx
        {
            tx.begin()?;
            let pending = std::mem::take(&mut self.pending);
            self.pending_bytes = 0;
            if let Err(e) = self.send_now(pending).await {
                return self.abort_and_rewind(e).await;
            }
        }
        Ok(())
    }

    /// A commit succeeded: its positions become the committed ones, its state writes join
    /// the committed writes of their tasks (at the changelog position it reached).
    fn committed_ok(
        &mut self,
        positions: BTreeMap<TopicPartition, u64>,
        parts: &[u32],
        started: Instant,
    ) -> Result<(), RuntimeError> {
        for p in parts {
            let end = self
                .tx
                .as_ref()
                .and_then(|tx| tx.last_commit_ends().get(&(self.changelog.clone(), *p)))
                .copied();
            if let Some(task) = self.tasks.get_mut(p) {
                task.state.commit_done(end);
                if task.state.unapplied_bytes() >= self.cfg.apply_bytes {
                    let started = Instant::now();
                    task.state
                        .flush(false)
                        .map_err(|e| RuntimeError::Fatal(e.to_string()))?;
                    self.metrics
                        .waits
                        .local
                        .observe(started.elapsed().as_secs_f64());
                }
            }
        }
        if self.last_durable.elapsed() >= self.cfg.durable_interval {
            self.make_durable()?;
        }
        self.committed = positions;
        self.metrics.commits.inc();
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Ends the commit in flight, if any, and aborts the open transaction, ignoring errors
    /// (the runtime stops).
    async fn abort_quietly(&mut self) {
        if let Some(c) = self.committing.take()
            && let Ok((tx, _)) = c.handle.await
        {
            self.tx = Some(tx);
        }
        if let Some(tx) = &mut self.tx {
            let _ = tx.abort().await;
        }
    }

    /// The transaction failed: abort it, forget its writes, and move every input back to
    /// the last committed offset.
    ///
    /// A fenced producer is usually one whose open transaction the broker aborted itself,
    /// with the epoch bumped (a broker restart aborts every undecided transaction; a timeout
    /// aborts one): the abort of that epoch is then acknowledged with the next epoch, and the
    /// session goes on from the last commit. When the abort is fenced too, another
    /// incarnation took the id over and this one stops ([`RuntimeError::Superseded`]); when
    /// it fails otherwise (the broker is unreachable), the session ends and the next one
    /// re-initialises the producer, rejoins and restores the state from the changelog.
    /// Either way the handler never reads the aborted transaction's writes: they were only in
    /// the tasks' transaction layers, dropped here (or with the session).
    async fn abort_and_rewind(&mut self, e: spool_client::Error) -> Result<(), RuntimeError> {
        self.metrics.aborts.inc();
        self.txn = None;
        self.rewinds += 1;
        self.pending.clear();
        self.pending_bytes = 0;
        tracing::warn!(error = %e, "transaction failed; aborting and reprocessing from the last commit");
        // A commit in flight cannot be called back: it ends first, and if it committed, its
        // positions are the last commit to go back to.
        if let Some(c) = self.committing.take() {
            let (tx, result) = c
                .handle
                .await
                .map_err(|e| RuntimeError::Fatal(format!("commit task: {e}")))?;
            self.tx = Some(tx);
            if result.is_ok() {
                self.committed_ok(c.positions, &c.parts, c.started)?;
            }
        }
        let tx = self.tx.as_mut().expect("no commit in flight");
        if let Err(abort) = tx.abort().await {
            if matches!(abort, spool_client::Error::ProducerFenced { .. }) {
                // Not the broker's own abort (that one is acknowledged): another incarnation
                // initialised the id.
                return Err(RuntimeError::Superseded {
                    instance_id: self.cfg.instance_id.clone(),
                    transactional_id: self.cfg.transactional_id(),
                    source: abort,
                });
            }
            tracing::warn!(error = %abort, "aborting failed; restarting the session from the last commit");
            return Err(abort.into());
        }
        if let Some(why) = refused_for_good(&e) {
            // Reprocessing would write the same thing and be refused again, forever (outputs
            // are checked as handlers emit them: this one passed a check and was refused
            // since, or is the runtime's own dead letter, retry or changelog record).
            return Err(RuntimeError::Fatal(format!(
                "the broker refused a write of the transaction for good ({why}): {e}. \
                 Reprocessing would write it again; stopping. Create or fix the topic, or fix \
                 the handler's output, then restart"
            )));
        }
        for t in self.tasks.values_mut() {
            t.discard()
                .map_err(|e| RuntimeError::Fatal(e.to_string()))?;
        }
        // Every partition whose reader is anywhere but at the last commit goes back there:
        // those processed in the aborted transaction, the one whose record was being
        // processed, and those holding or parking records (not processed).
        self.held.clear();
        self.parked.drop_all_records();
        let reading: BTreeMap<TopicPartition, u64> = self.member.positions().into_iter().collect();
        let moved: Vec<(TopicPartition, u64)> = self
            .committed
            .iter()
            .filter(|(tp, c)| self.positions.get(*tp) != Some(*c) || reading.get(*tp) != Some(*c))
            .map(|(tp, c)| (tp.clone(), *c))
            .collect();
        for (tp, c) in moved {
            self.member.seek(&tp, c).await?;
            self.positions.insert(tp, c);
        }
        self.apply_pauses().await
    }

    /// Brings tasks in line with the owned partitions: drops revoked ones, pauses and
    /// restores new ones.
    async fn reconcile(&mut self) -> Result<(), RuntimeError> {
        let now: BTreeSet<TopicPartition> = self.member.assignment().into_iter().collect();
        let positions: BTreeMap<TopicPartition, u64> =
            self.member.positions().into_iter().collect();
        self.table_ends
            .retain(|p, _| now.iter().any(|tp| tp.partition == *p));
        self.table_wait.retain(|tp, _| now.contains(tp));
        for tp in self.owned.difference(&now) {
            self.positions.remove(tp);
            self.committed.remove(tp);
            self.held.remove(tp);
            self.parked.forget(tp);
        }
        let parts_now: BTreeSet<u32> = now.iter().map(|tp| tp.partition).collect();
        let gone: Vec<u32> = self
            .tasks
            .keys()
            .chain(self.restoring.keys())
            .copied()
            .filter(|p| !parts_now.contains(p))
            .collect();
        for p in gone {
            if let Some(mut t) = self.tasks.remove(&p)
                && let Err(e) = t.state.flush(true)
            {
                tracing::warn!(partition = p, error = %e, "making the local store durable failed");
            }
            if let Some(r) = self.restoring.remove(&p) {
                r.handle.abort();
            }
            tracing::info!(partition = p, "partition revoked");
        }
        // New partitions without a task are held back (their records parked) until their
        // state is restored.
        let mut to_restore = Vec::new();
        let mut grew = false;
        for tp in now.difference(&self.owned) {
            let input = self
                .retry_of
                .get(&tp.topic)
                .map_or(tp.topic.as_str(), |s| &**s);
            grew |= tp.partition >= self.input_partitions.get(input).copied().unwrap_or(0);
            let pos = positions.get(tp).copied().unwrap_or(0);
            self.positions.insert(tp.clone(), pos);
            self.committed.insert(tp.clone(), pos);
            if !self.tasks.contains_key(&tp.partition) {
                to_restore.push(tp.clone());
            }
        }
        if self.owned != now {
            // Partitions were perhaps added: output partition counts are asked again.
            self.outputs.forget_all();
        }
        self.owned = now;
        let new_parts: BTreeSet<u32> = to_restore
            .iter()
            .map(|tp| tp.partition)
            .filter(|p| !self.restoring.contains_key(p))
            .collect();
        if grew {
            // An input grew (a partition past the inputs' counts as last seen): the changelog,
            // dead-letter and retry topics are grown to match before the new partition's
            // restore reads its changelog partition, or its task writes a dead letter.
            let (counts, _) = ensure_internal_topics(&self.client, self.cfg, &self.metrics).await?;
            self.input_partitions = counts;
        }
        for p in new_parts {
            self.restore_token += 1;
            let token = self.restore_token;
            let handle = tokio::spawn(restore::restore_task(
                self.client.clone(),
                self.changelog.clone(),
                p,
                self.cfg
                    .state_dir
                    .join(format!("{}-p{p}.sqlite", self.cfg.group)),
                self.cfg.cache_sizes(),
                self.metrics.clone(),
                token,
                self.restored_tx.clone(),
            ));
            self.restoring.insert(p, Restoring { token, handle });
            tracing::info!(partition = p, "partition assigned; restoring its state");
        }
        self.metrics.restoring.set(self.restoring.len() as i64);
        self.metrics
            .ready
            .store(self.restoring.is_empty(), Ordering::Relaxed);
        Ok(())
    }

    async fn restored(
        &mut self,
        p: u32,
        token: u64,
        result: Result<SqliteBackend, String>,
    ) -> Result<(), RuntimeError> {
        if self.restoring.get(&p).is_none_or(|r| r.token != token) {
            return Ok(()); // revoked meanwhile
        }
        self.restoring.remove(&p);
        self.metrics.restoring.set(self.restoring.len() as i64);
        let backend =
            result.map_err(|e| RuntimeError::Fatal(format!("restoring partition {p}: {e}")))?;
        let task =
            Task::open(p, Box::new(backend)).map_err(|e| RuntimeError::Fatal(e.to_string()))?;
        self.tasks.insert(p, task);
        self.apply_pauses().await?;
        tracing::info!(partition = p, "state restored; processing");
        self.metrics
            .ready
            .store(self.restoring.is_empty(), Ordering::Relaxed);
        Ok(())
    }

    /// SIGTERM: let the handler finish its effects in flight ([`AsyncHandler::drain`]), fire
    /// the wall timers due then, commit (or abort) the open transaction, make local stores
    /// durable, leave. Stream timers due in the last batch fire after the next start.
    async fn stop<H: AsyncHandler>(&mut self, handler: &mut H) -> Result<(), RuntimeError> {
        handler.drain().await;
        let now = self.cfg.clock.now_ms();
        let parts: Vec<u32> = self.tasks.keys().copied().collect();
        for p in parts {
            if let Err(e) = self.fire(handler, p, TimerKind::Wall, now).await {
                tracing::warn!(error = %e, partition = p, "timers at the stop failed; they fire after the next start");
                break;
            }
        }
        if let Err(e) = self.finish_commit().await {
            tracing::warn!(error = %e, "final commit failed; the last batch will be processed again");
        }
        for r in std::mem::take(&mut self.restoring).into_values() {
            r.handle.abort();
        }
        self.count_flow();
        self.make_durable()?;
        self.metrics.ready.store(false, Ordering::Relaxed);
        Ok(())
    }

    async fn close(self) {
        // A commit in flight ends before the next session fences its producer.
        if let Some(c) = self.committing {
            let _ = c.handle.await;
        }
        for r in self.restoring.into_values() {
            r.handle.abort();
        }
        self.control_task.abort();
        let _ = self.member.leave().await;
    }
}

/// Most bytes of a dropped timer's payload its log line shows (escaped).
const DROPPED_PAYLOAD_SHOWN: usize = 1024;

/// How a wait before a retry in place ended ([`Session::wait_retry`]).
#[derive(Debug)]
enum Waited {
    /// A membership change or a stop: the input is read again later.
    Interrupted,
    /// The backoff passed: the next attempt.
    Due,
    /// An operator skipped the record (`spool dlq skip`, with this reason): it is
    /// dead-lettered without another attempt.
    Skipped(String),
}

/// A write error that retrying the same write cannot fix, with what it concerns (the
/// topic, and the partition when the error says).
fn refused_for_good(e: &spool_client::Error) -> Option<String> {
    use spool_client::Error as E;
    match e {
        E::UnknownTopic { topic, .. } => Some(format!("unknown topic {topic:?}")),
        E::UnknownPartition {
            topic, partition, ..
        } => Some(format!("unknown partition {topic}/{partition}")),
        // The transactional producer names the partition in these messages.
        E::TooLarge { .. } => Some("a batch over the topic's max_message_bytes".into()),
        E::InvalidBatch { .. } => Some("a batch the broker refused as invalid".into()),
        E::NotAuthorized { .. } => Some("not authorized".into()),
        _ => None,
    }
}

/// What a commit task returns: the producer back, and the commit's outcome.
type Joined =
    Result<(TransactionalProducer, Result<(), spool_client::Error>), tokio::task::JoinError>;

/// The end of the commit in flight (pending forever without one). Cancel-safe.
async fn join_commit(c: &mut Option<Committing>) -> Joined {
    match c {
        Some(c) => (&mut c.handle).await,
        None => std::future::pending().await,
    }
}

/// The bytes an output holds in memory (keys, values, headers).
fn emit_bytes(e: &Emit) -> usize {
    let r = &e.record;
    e.topic.len()
        + r.key.as_ref().map_or(0, |k| k.len())
        + r.value.as_ref().map_or(0, |v| v.len())
        + r.headers
            .iter()
            .map(|h| h.key.len() + h.value.as_ref().map_or(0, |v| v.len()))
            .sum::<usize>()
}

/// Turns a future into a [`Shutdown`] (true once it resolves).
pub fn shutdown_on(f: impl Future<Output = ()> + Send + 'static) -> Shutdown {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        f.await;
        let _ = tx.send(true);
    });
    rx
}
