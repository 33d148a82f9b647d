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
//!   └─► every commit_interval / commit_max_records / max_txn_bytes: commit
//!         = stream timers due ─► changelog records of every task's writes ─► input offsets
//!           (fenced by member id + generation) ─► EndTxn(commit) ─► local stores apply the
//!           writes with the changelog position the commit reached
//! ```
//!
//! # Invariants
//!
//! - Outputs, changelog records and input offsets of a batch commit in one transaction or
//!   not at all. A failed commit aborts, drops every task's transaction layer and moves the
//!   input positions back to the last committed offsets, so the batch is processed again.
//! - A membership change is applied (and revocations acknowledged) only after the open
//!   transaction committed or aborted (`GroupConfig::commit_on_revoke` is off: offsets move
//!   only with transactions).
//! - The local store holds only committed data: writes reach it after their transaction
//!   committed, with the changelog position, in one local transaction.
//! - A newly owned partition is paused until its state is restored from the changelog (in a
//!   background task, read committed, from the local store's position to the end); the
//!   other partitions keep going.
//! - The transactional id is `<group>-<instance_id>`, initialised before joining the group,
//!   so a restarted instance first fences its previous incarnation and aborts what it left
//!   open (which unblocks the changelog's last stable offset for the restore).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use spool_client::{
    CleanupPolicy, Client, FetchOptions, GroupConfig, GroupConsumer, Isolation, OffsetCommit,
    OffsetSpec, Polled, Record, TopicPartition, TopicSettings, TransactionalConfig,
    TransactionalProducer,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::context::Emit;
use crate::engine::{self, Attempt, Env, RetryMode, RetryPolicy, Task};
use crate::handler::{Action, AsyncHandler, Failure, Input, TimerKind};
use crate::metrics::{Metrics, PartitionLabel};
use crate::state::{Backend, SqliteBackend, Writes};

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
    /// Commit at least this often while there is work (default 100 ms).
    pub commit_interval: Duration,
    /// Commit after this many inputs (default 10 000).
    pub commit_max_records: usize,
    /// Commit when the open transaction's state writes reach this many bytes (default 32 MiB):
    /// the bound on buffered state.
    pub max_txn_bytes: usize,
    /// SQLite page cache per task (default 8 MiB).
    pub cache_bytes: usize,
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
    /// Replay mode: a group without committed offsets starts at this time (ms).
    pub start_at_ms: Option<i64>,
    /// The clock handlers see.
    pub clock: Arc<dyn Clock>,
}

impl RuntimeConfig {
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
            commit_max_records: 10_000,
            max_txn_bytes: 32 << 20,
            cache_bytes: 8 << 20,
            retry: RetryPolicy::default(),
            session_timeout: Duration::from_secs(10),
            transaction_timeout: Duration::from_secs(30),
            tick_interval: Duration::from_millis(100),
            durable_interval: Duration::from_secs(5),
            output_prefix: String::new(),
            effects_enabled: true,
            start_at_ms: None,
            clock: Arc::new(SystemClock),
        }
    }

    /// The changelog topic of every state store: `<group>.changelog`.
    pub fn changelog_topic(&self) -> String {
        format!("{}{}.changelog", self.output_prefix, self.group)
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
    prepare_topics(&client, &cfg).await?;
    let mut failures = 0u32;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let started = Instant::now();
        match Session::start(&client, &cfg, metrics.clone()).await {
            Ok(mut s) => match s.run(&mut handler, &mut shutdown).await {
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

fn fatal(e: &RuntimeError) -> bool {
    match e {
        RuntimeError::Fatal(_) => true,
        RuntimeError::Client(c) => matches!(
            c,
            spool_client::Error::ProducerFenced { .. }
                | spool_client::Error::UnknownTopic { .. }
                | spool_client::Error::NotAuthorized { .. }
                | spool_client::Error::Unauthenticated { .. }
                | spool_client::Error::InvalidRequest { .. }
        ),
    }
}

/// Creates what the processor writes to and does not exist yet: the changelog (compacted),
/// the dead-letter topics, the declared outputs (prefixed in replay mode); and in replay mode
/// positions the scratch group at the start time.
async fn prepare_topics(client: &Client, cfg: &RuntimeConfig) -> Result<(), RuntimeError> {
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
    ensure_topic(client, &cfg.changelog_topic(), max_partitions, &compacted).await?;
    for (t, n) in &input_partitions {
        let dlq = format!("{}{}", cfg.output_prefix, engine::dlq_topic(t, &cfg.group));
        ensure_topic(client, &dlq, *n, &TopicSettings::default()).await?;
    }
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
            let q: Vec<_> = tps
                .iter()
                .map(|tp| (tp.clone(), OffsetSpec::Timestamp(ts)))
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
    Ok(())
}

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

/// What a restore task sends back.
type Restored = (u32, u64, Result<SqliteBackend, String>);

struct Restoring {
    token: u64,
    handle: JoinHandle<()>,
}

/// The open transaction.
struct OpenTxn {
    started: Instant,
    records: usize,
}

/// One membership + transactional producer, from join to failure or stop.
struct Session<'c> {
    client: Client,
    cfg: &'c RuntimeConfig,
    metrics: Arc<Metrics>,
    member: GroupConsumer,
    tx: TransactionalProducer,
    changelog: String,
    tasks: BTreeMap<u32, Task>,
    restoring: BTreeMap<u32, Restoring>,
    restore_token: u64,
    restored_tx: mpsc::Sender<Restored>,
    restored_rx: mpsc::Receiver<Restored>,
    owned: BTreeSet<TopicPartition>,
    /// Next offset to process per owned partition (moves with the open transaction).
    positions: BTreeMap<TopicPartition, u64>,
    /// Next offset as of the last committed transaction.
    committed: BTreeMap<TopicPartition, u64>,
    txn: Option<OpenTxn>,
    last_durable: Instant,
    last_tick: Instant,
}

impl<'c> Session<'c> {
    async fn start(
        client: &Client,
        cfg: &'c RuntimeConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Session<'c>, RuntimeError> {
        let mut tcfg = TransactionalConfig::new(cfg.transactional_id());
        tcfg.transaction_timeout = cfg.transaction_timeout;
        // First fence the previous incarnation (aborting what it left open), then join.
        let tx = TransactionalProducer::new(client.clone(), tcfg).await?;
        let mut gcfg = GroupConfig::new(cfg.group.as_str(), cfg.inputs.iter().map(String::as_str))
            .instance_id(cfg.instance_id.clone())
            .session_timeout(cfg.session_timeout);
        gcfg.commit_on_revoke = false;
        let member = GroupConsumer::join(client, gcfg).await?;
        let (restored_tx, restored_rx) = mpsc::channel(64);
        let mut s = Session {
            client: client.clone(),
            cfg,
            metrics,
            member,
            tx,
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
            last_durable: Instant::now(),
            last_tick: Instant::now(),
        };
        s.reconcile().await?;
        Ok(s)
    }

    fn env(&self) -> Env<'c> {
        Env {
            processor: &self.cfg.name,
            effects_enabled: self.cfg.effects_enabled,
        }
    }

    async fn run<H: AsyncHandler>(
        &mut self,
        handler: &mut H,
        shutdown: &mut Shutdown,
    ) -> Result<(), RuntimeError> {
        loop {
            if *shutdown.borrow() {
                return self.stop().await;
            }
            if self.commit_due() {
                self.commit(handler).await?;
            }
            let wake = match &self.txn {
                Some(t) => t.started + self.cfg.commit_interval,
                None => self.last_tick + self.cfg.tick_interval,
            };
            let wake = wake.min(self.last_tick + self.cfg.tick_interval);
            tokio::select! {
                biased;
                _ = shutdown.changed() => continue,
                Some((p, token, result)) = self.restored_rx.recv() => {
                    self.restored(p, token, result).await?;
                }
                polled = self.member.poll() => match polled {
                    None => return Err(RuntimeError::Client(spool_client::Error::Closed)),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Polled::Membership)) => {
                        self.commit(handler).await?;
                        self.member.poll_membership().await?;
                        self.reconcile().await?;
                    }
                    Some(Ok(Polled::Record(r))) => self.on_record(handler, r, shutdown).await?,
                },
                () = tokio::time::sleep_until(wake.into()) => {}
            }
            if self.last_tick.elapsed() >= self.cfg.tick_interval {
                self.tick(handler).await?;
            }
        }
    }

    fn commit_due(&self) -> bool {
        let Some(t) = &self.txn else { return false };
        t.started.elapsed() >= self.cfg.commit_interval
            || t.records >= self.cfg.commit_max_records
            || self
                .tasks
                .values()
                .map(|t| t.state.txn_bytes)
                .sum::<usize>()
                >= self.cfg.max_txn_bytes
    }

    fn begin(&mut self) -> Result<(), RuntimeError> {
        if self.txn.is_none() {
            self.tx.begin()?;
            self.txn = Some(OpenTxn {
                started: Instant::now(),
                records: 0,
            });
        }
        Ok(())
    }

    async fn send(&mut self, emits: Vec<Emit>) -> Result<(), spool_client::Error> {
        for e in emits {
            let topic = format!("{}{}", self.cfg.output_prefix, e.topic);
            self.metrics
                .records_out
                .get_or_create(&Metrics::topic(&topic))
                .inc();
            match e.partition {
                Some(p) => self.tx.send(&topic, p, e.record).await?,
                None => self.tx.send_keyed(&topic, e.record).await?,
            }
        }
        Ok(())
    }

    async fn on_record<H: AsyncHandler>(
        &mut self,
        handler: &mut H,
        r: Record,
        shutdown: &mut Shutdown,
    ) -> Result<(), RuntimeError> {
        let tp = TopicPartition::new(&*r.topic, r.partition);
        if !self.tasks.contains_key(&r.partition) {
            // Cannot happen (partitions are paused while restoring); never process without
            // state: read it again later.
            tracing::error!(
                topic = &*r.topic,
                partition = r.partition,
                "record for a partition whose state is not restored; rewinding"
            );
            self.member.seek(&tp, r.offset).await?;
            return Ok(());
        }
        let mut input = Input {
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            key: r.key,
            value: r.value,
            headers: r.headers,
            attempt: 1,
            lane: r.topic.clone(),
        };
        let mut history: Vec<Attempt> = Vec::new();
        let env = self.env();
        loop {
            self.begin()?;
            let now = self.cfg.clock.now_ms();
            let started = Instant::now();
            let task = self.tasks.get_mut(&input.partition).expect("checked above");
            let result = task.handle(handler, &input, now, env).await;
            self.metrics
                .process_seconds
                .observe(started.elapsed().as_secs_f64());
            let failure = match result {
                Ok(emits) => {
                    if let Err(e) = self.send(emits).await {
                        return self.abort_and_rewind(e).await;
                    }
                    break;
                }
                Err(f) => f,
            };
            history.push(Attempt {
                attempt: input.attempt,
                at_ms: now,
                reason: failure.reason.clone(),
            });
            match failure.action {
                Action::Fatal => {
                    let _ = self.tx.abort().await;
                    return Err(RuntimeError::Fatal(failure.reason));
                }
                Action::Retry if self.cfg.retry.retries_after(input.attempt) => {
                    self.metrics
                        .retries
                        .get_or_create(&Metrics::topic(&input.topic))
                        .inc();
                    if self.cfg.retry.mode == RetryMode::Topics {
                        // Retry topics arrive in a later step; until then retry in place.
                        tracing::debug!(
                            "retry topics not configured for this input; retrying in place"
                        );
                    }
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
                    self.commit(handler).await?;
                    self.metrics.blocked.inc();
                    let interrupted = self.wait_retry(delay, shutdown).await;
                    self.metrics.blocked.dec();
                    if interrupted {
                        // A revocation or a stop: leave the record for whoever reads it next.
                        self.member.seek(&tp, input.offset).await?;
                        return Ok(());
                    }
                    input.attempt += 1;
                }
                Action::Retry | Action::DeadLetter => {
                    let record = engine::dead_letter(&input, &self.cfg.group, &history, now);
                    let dlq = engine::dlq_topic(&input.topic, &self.cfg.group);
                    self.metrics
                        .dead_letters
                        .get_or_create(&Metrics::topic(&input.topic))
                        .inc();
                    tracing::warn!(
                        topic = &*input.topic,
                        partition = input.partition,
                        offset = input.offset,
                        reason = failure.reason,
                        dlq,
                        "dead-lettered"
                    );
                    self.begin()?;
                    let emit = Emit {
                        topic: dlq,
                        partition: Some(input.partition),
                        record,
                    };
                    if let Err(e) = self.send(vec![emit]).await {
                        return self.abort_and_rewind(e).await;
                    }
                    break;
                }
            }
        }
        self.positions.insert(tp, input.offset + 1);
        if let Some(t) = &mut self.txn {
            t.records += 1;
        }
        self.metrics
            .records_in
            .get_or_create(&Metrics::topic(&input.topic))
            .inc();
        self.metrics.done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Waits `delay` unless a membership change or a stop comes first (then true).
    async fn wait_retry(&mut self, delay: Duration, shutdown: &mut Shutdown) -> bool {
        let until = Instant::now() + delay;
        loop {
            if *shutdown.borrow() || self.member.membership_pending() {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
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
        Ok(())
    }

    fn make_durable(&mut self) -> Result<(), RuntimeError> {
        for t in self.tasks.values_mut() {
            let pos = t.state.backend.position();
            t.state
                .backend
                .apply(&Writes::new(), pos, true)
                .map_err(|e| RuntimeError::Fatal(e.to_string()))?;
        }
        self.last_durable = Instant::now();
        Ok(())
    }

    /// Fires the timers of `kind` due by `upto` in task `p` (inside the open transaction).
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
            match task.fire(handler, &timer, now, env).await {
                Ok(emits) => {
                    self.metrics.timers_fired.inc();
                    if let Err(e) = self.send(emits).await {
                        return self.abort_and_rewind(e).await;
                    }
                    if let Some(t) = &mut self.txn {
                        t.records += 1;
                    }
                }
                Err(Failure {
                    action: Action::Fatal,
                    reason,
                }) => return Err(RuntimeError::Fatal(reason)),
                Err(f) => {
                    // The timer stays; it fires again at the next tick.
                    tracing::warn!(partition = p, key = ?timer.key, reason = f.reason, "timer failed; it will fire again");
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Commits the open transaction (stream timers first), then applies the state writes
    /// locally. On failure: abort and rewind (or an error that restarts the session).
    async fn commit<H: AsyncHandler>(&mut self, handler: &mut H) -> Result<(), RuntimeError> {
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
        self.finish_commit().await
    }

    /// Commits the open transaction as it is (no timers), then applies the state writes.
    async fn finish_commit(&mut self) -> Result<(), RuntimeError> {
        if self.txn.is_none() {
            // Nothing open (or a timer's failure aborted it).
            return Ok(());
        }
        let started = Instant::now();
        let mut applied: Vec<(u32, Writes)> = Vec::new();
        for (p, task) in &mut self.tasks {
            let w = task.state.take();
            if !w.is_empty() {
                applied.push((*p, w));
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
        let result = async {
            for (p, w) in &applied {
                for (k, v) in w {
                    self.tx
                        .send(&self.changelog, *p, engine::changelog_record(k, v))
                        .await?;
                }
            }
            if !offsets.is_empty() {
                let member = self.member.member_id().unwrap_or_default().to_owned();
                self.tx
                    .send_offsets(
                        &self.cfg.group,
                        &offsets,
                        Some((&member, self.member.generation())),
                    )
                    .await?;
            }
            self.tx.commit().await
        }
        .await;
        if let Err(e) = result {
            return self.abort_and_rewind(e).await;
        }
        self.txn = None;
        let durable = self.last_durable.elapsed() >= self.cfg.durable_interval;
        for (p, w) in applied {
            let end = self
                .tx
                .last_commit_ends()
                .get(&(self.changelog.clone(), p))
                .copied();
            if let Some(task) = self.tasks.get_mut(&p) {
                let pos = end.unwrap_or_else(|| task.state.backend.position());
                task.state
                    .backend
                    .apply(&w, pos, durable)
                    .map_err(|e| RuntimeError::Fatal(e.to_string()))?;
            }
        }
        if durable {
            self.last_durable = Instant::now();
        }
        self.committed = self.positions.clone();
        self.metrics.commits.inc();
        self.metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The transaction failed: abort it, forget its writes, and move every input back to
    /// the last committed offset. Fenced producers and failed aborts end the session.
    async fn abort_and_rewind(&mut self, e: spool_client::Error) -> Result<(), RuntimeError> {
        self.metrics.aborts.inc();
        self.txn = None;
        if matches!(e, spool_client::Error::ProducerFenced { .. }) {
            return Err(e.into());
        }
        tracing::warn!(error = %e, "transaction failed; aborting and reprocessing from the last commit");
        self.tx.abort().await?;
        for t in self.tasks.values_mut() {
            t.discard()
                .map_err(|e| RuntimeError::Fatal(e.to_string()))?;
        }
        let moved: Vec<(TopicPartition, u64)> = self
            .positions
            .iter()
            .filter_map(|(tp, pos)| {
                let c = *self.committed.get(tp)?;
                (c != *pos).then(|| (tp.clone(), c))
            })
            .collect();
        for (tp, c) in moved {
            self.member.seek(&tp, c).await?;
            self.positions.insert(tp, c);
        }
        Ok(())
    }

    /// Brings tasks in line with the owned partitions: drops revoked ones, pauses and
    /// restores new ones.
    async fn reconcile(&mut self) -> Result<(), RuntimeError> {
        let now: BTreeSet<TopicPartition> = self.member.assignment().into_iter().collect();
        let positions: BTreeMap<TopicPartition, u64> =
            self.member.positions().into_iter().collect();
        for tp in self.owned.difference(&now) {
            self.positions.remove(tp);
            self.committed.remove(tp);
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
            if let Some(mut t) = self.tasks.remove(&p) {
                let pos = t.state.backend.position();
                if let Err(e) = t.state.backend.apply(&Writes::new(), pos, true) {
                    tracing::warn!(partition = p, error = %e, "making the local store durable failed");
                }
            }
            if let Some(r) = self.restoring.remove(&p) {
                r.handle.abort();
            }
            tracing::info!(partition = p, "partition revoked");
        }
        let mut to_pause = Vec::new();
        for tp in now.difference(&self.owned) {
            let pos = positions.get(tp).copied().unwrap_or(0);
            self.positions.insert(tp.clone(), pos);
            self.committed.insert(tp.clone(), pos);
            if !self.tasks.contains_key(&tp.partition) {
                to_pause.push(tp.clone());
            }
        }
        self.owned = now;
        self.member.pause(&to_pause);
        let new_parts: BTreeSet<u32> = to_pause
            .iter()
            .map(|tp| tp.partition)
            .filter(|p| !self.restoring.contains_key(p))
            .collect();
        for p in new_parts {
            self.restore_token += 1;
            let token = self.restore_token;
            let handle = tokio::spawn(restore_task(
                self.client.clone(),
                self.changelog.clone(),
                p,
                self.cfg
                    .state_dir
                    .join(format!("{}-p{p}.sqlite", self.cfg.group)),
                self.cfg.cache_bytes,
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
        let tps: Vec<TopicPartition> = self
            .owned
            .iter()
            .filter(|tp| tp.partition == p)
            .cloned()
            .collect();
        self.member.resume(&tps).await?;
        tracing::info!(partition = p, "state restored; processing");
        self.metrics
            .ready
            .store(self.restoring.is_empty(), Ordering::Relaxed);
        Ok(())
    }

    /// SIGTERM: commit (or abort) the open transaction, make local stores durable, leave.
    /// Stream timers due in the last batch fire after the next start.
    async fn stop(&mut self) -> Result<(), RuntimeError> {
        if let Err(e) = self.finish_commit().await {
            tracing::warn!(error = %e, "final commit failed; the last batch will be processed again");
        }
        for r in std::mem::take(&mut self.restoring).into_values() {
            r.handle.abort();
        }
        self.make_durable()?;
        self.metrics.ready.store(false, Ordering::Relaxed);
        Ok(())
    }

    async fn close(self) {
        for r in self.restoring.into_values() {
            r.handle.abort();
        }
        let _ = self.member.leave().await;
    }
}

/// Restores one partition's local store from the changelog: from its recorded position to
/// the changelog's end, read committed (waiting while an older transaction is still open).
#[allow(clippy::too_many_arguments)]
async fn restore_task(
    client: Client,
    changelog: String,
    p: u32,
    path: PathBuf,
    cache_bytes: usize,
    metrics: Arc<Metrics>,
    token: u64,
    done: mpsc::Sender<Restored>,
) {
    let r = restore(&client, &changelog, p, path, cache_bytes, &metrics).await;
    let _ = done.send((p, token, r)).await;
}

/// Writes buffered before a local apply during restore.
const RESTORE_APPLY_BYTES: usize = 16 << 20;

async fn restore(
    client: &Client,
    changelog: &str,
    p: u32,
    path: PathBuf,
    cache_bytes: usize,
    metrics: &Metrics,
) -> Result<SqliteBackend, String> {
    let open = tokio::task::spawn_blocking(move || SqliteBackend::open(&path, cache_bytes));
    let mut backend = open
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let opts = FetchOptions {
        max_bytes: 8 << 20,
        isolation: Isolation::ReadCommitted,
        ..FetchOptions::default()
    };
    let mut pos = backend.position();
    let first = loop {
        match client.fetch(changelog, p, pos, &opts).await {
            Ok(f) => break f,
            Err(spool_client::Error::OffsetOutOfRange(o)) => {
                // A local store ahead of (or behind) the changelog belongs to another
                // incarnation of the topic: start over from the changelog alone.
                tracing::warn!(partition = p, position = pos, high_watermark = ?o.high_watermark, "local store does not match the changelog; rebuilding it");
                let (b, r) = blocking(backend, |b| b.wipe()).await?;
                r.map_err(|e| e.to_string())?;
                backend = b;
                pos = o.log_start_offset.unwrap_or(0);
            }
            Err(e) if e.is_retriable() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => return Err(e.to_string()),
        }
    };
    let target = first.high_watermark;
    let mut fetched = Some(first);
    let mut pending = Writes::new();
    let mut pending_bytes = 0usize;
    while pos < target {
        let f = match fetched.take() {
            Some(f) => f,
            None => match client.fetch(changelog, p, pos, &opts).await {
                Ok(f) => f,
                Err(e) if e.is_retriable() => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            },
        };
        metrics.restored_records.inc_by(f.records.len() as u64);
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
    Ok(b)
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

/// Turns a future into a [`Shutdown`] (true once it resolves).
pub fn shutdown_on(f: impl Future<Output = ()> + Send + 'static) -> Shutdown {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        f.await;
        let _ = tx.send(true);
    });
    rx
}
