//! Seeded power-cut loops for the broker's durable state: the broker is opened as `spoold`
//! opens it (`Broker::open_with_options`: the log, then the offset store, producer ids, the
//! group and transaction coordinators with their recovery) on the simulated disk
//! (`spool_io::sim::SimFs`); a random workload drives the coordinators as the gRPC services
//! do (`workload.rs`) and is cut at a random disk operation; the disk comes back as a power
//! cut leaves it (unsynced data lost, torn at a sector or reordered; undurable directory
//! entries gone), the broker is reopened (sometimes cut again inside its own recovery) and
//! checked against a model of what it acknowledged:
//!
//! - committed offsets never go back: each is the last acknowledged commit (or deletion), or
//!   one asked for after it;
//! - no producer id is handed out twice, across any number of restarts;
//! - a decided transaction stays decided (committed: every record visible to read-committed
//!   readers, its offsets applied; aborted: nothing visible), no transaction is torn, none
//!   is left open after the coordinator's start, no transaction is ended twice (one marker
//!   per producer id and epoch in a partition), and a fenced epoch stays fenced;
//! - a transaction's offsets agree with its outcome, also one resolved from its records'
//!   visibility after its EndTxn was cut (aborted: none of its offsets is committed;
//!   committed: no value from before its EndTxn is still the committed offset);
//! - a transaction open past its timeout is aborted by the coordinator's background pass
//!   (the loop moves the clock and runs the pass): its producer is fenced (the next call
//!   with its epoch is refused), the abort holds across restarts, and its partitions' last
//!   stable offsets move past it;
//! - consumer groups: the generation never goes below what a member was told (the group is
//!   durable before any Assignment goes out); a member in by an acknowledged join is still
//!   in after a restart, and its commit with the generation it was told is accepted until
//!   it rejoins (as a Kafka member's after a coordinator failover); a member id removed or
//!   replaced by an acknowledged operation is refused, across restarts; no partition is held
//!   by two members;
//! - the last stable offset never goes back, nor the high watermark below acknowledged data.
//!
//! Every run is a function of its seed; a failure prints it and the command that replays it.
//! `SPOOL_BROKER_POWERLOSS_SEEDS=<n>` (from `SPOOL_BROKER_POWERLOSS_FIRST`) runs a long loop,
//! `SPOOL_BROKER_POWERLOSS_SEED=<n>` one seed, `SPOOL_POWERLOSS_TRACE=1` prints every step.

mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use spool_log_engine::LogOptions;
use spool_log_engine::io::sim::{CutModel, Effect, Fault, OpKind, SimFs, SimRng};

use crate::config::Config;
use crate::{Broker, State};
use spool_log_engine::Clock;
use spool_proto::v1;
use workload::{Counts, ManualClock, Model, Work};

const ROOT: &str = "/spool";

/// How a seed runs.
#[derive(Clone)]
struct Plan {
    epochs: u32,
    steps: u32,
    /// The cut falls on one of the next `window` mutating operations.
    window: u64,
    /// Chance per epoch of an injected EIO or full disk before the cut.
    fault: f64,
    /// Chance per epoch that the reopen itself is cut (inside the coordinators' recovery).
    open_cut: f64,
    /// Skipped syncs (negative controls), in force all the time.
    controls: Vec<fn() -> Fault>,
    /// Negative control: a commit's offsets applied before its decision is recorded.
    offsets_before_decision: bool,
}

impl Plan {
    fn standard() -> Plan {
        Plan {
            epochs: 4,
            steps: 40,
            window: 150,
            fault: 0.2,
            open_cut: 0.25,
            controls: Vec::new(),
            offsets_before_decision: false,
        }
    }
}

/// What a run covered.
#[derive(Debug, Default)]
struct Stats {
    cuts: u64,
    cuts_in_recovery: u64,
    cut_kinds: BTreeMap<Option<OpKind>, u64>,
    /// Cuts by the operation and file they fell before (`CutPoint::class`).
    cut_files: BTreeMap<String, u64>,
    ops: u64,
    faults: u64,
    counts: Counts,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.cuts += o.cuts;
        self.cuts_in_recovery += o.cuts_in_recovery;
        for (k, v) in &o.cut_kinds {
            *self.cut_kinds.entry(*k).or_default() += v;
        }
        for (k, v) in &o.cut_files {
            *self.cut_files.entry(k.clone()).or_default() += v;
        }
        self.ops += o.ops;
        self.faults += o.faults;
        self.counts.add(&o.counts);
    }
}

/// Opens the broker; `life` counts the opens of a seed (member ids are unique per life).
fn open(sim: &SimFs, clock: &Arc<ManualClock>, life: u64) -> Result<Broker, crate::StartError> {
    let config = Config {
        data_dir: PathBuf::from(ROOT),
        ..Config::default()
    };
    let broker = Broker::open_with_options(
        config,
        LogOptions {
            background_maintenance: false,
            clock: clock.clone(),
            fs: sim.fs(),
            ..LogOptions::default()
        },
    )?;
    // Member ids as a function of the seed: unique per life, the same in a replay.
    broker.state.groups.fix_member_ids(life);
    Ok(broker)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// One I/O error or a full disk, somewhere in the coming operations.
fn random_fault(sim: &SimFs, rng: &mut SimRng) {
    let n = rng.below(40);
    let eio = Effect::Fail(libc::EIO);
    let fault = match rng.below(5) {
        0 => Fault::when(|k, _| k == OpKind::SyncData, eio),
        1 => Fault::when(|k, _| k == OpKind::Write, eio),
        2 => Fault::when(|k, _| k == OpKind::SyncDir, eio),
        3 => Fault::when(|k, _| matches!(k, OpKind::Rename | OpKind::Create), eio),
        _ => {
            sim.set_capacity(Some(sim.used() + rng.range(0, 8_000)));
            return;
        }
    };
    sim.inject(fault.after(n).times(1));
}

/// Runs one seed. `Err` describes the first violated invariant.
fn run_seed(seed: u64, plan: &Plan) -> Result<Stats, String> {
    if workload::tracing_on() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter("info")
            .try_init();
    }
    // The groups' tasks run on this thread (a current-thread runtime): their clock stands
    // still, so what they persist is the same in every replay.
    let _frozen = crate::groups::FrozenClock::on_this_thread();
    let sim = SimFs::new();
    let mut rng = SimRng::new(seed);
    let clock = Arc::new(ManualClock(AtomicI64::new(1_700_000_000_000)));
    let mut model = Model::default();
    let mut stats = Stats::default();
    let install_controls = |sim: &SimFs| {
        for c in &plan.controls {
            sim.inject(c());
        }
    };
    install_controls(&sim);
    let mut life = 0;
    let broker_controls = |b: &Broker| {
        b.state.txns.offsets_before_decision.store(
            plan.offsets_before_decision,
            std::sync::atomic::Ordering::Relaxed,
        );
    };
    let mut broker = open(&sim, &clock, life).map_err(|e| format!("first open: {e}"))?;
    broker_controls(&broker);
    for (t, n) in workload::DATA_TOPICS {
        broker
            .state
            .log
            .create_topic(
                t,
                spool_log_engine::TopicConfig {
                    partitions: *n,
                    ..Default::default()
                },
            )
            .map_err(|e| format!("creating {t}: {e}"))?;
    }
    // One runtime per life of the broker: the groups' tasks (and the coordinators they own)
    // live in it, and end with it at the cut.
    let mut rt = runtime();
    for epoch in 0..plan.epochs {
        let start_ops = sim.ops();
        sim.cut_before(start_ops + rng.range(1, plan.window));
        let faulty = rng.chance(plan.fault);
        if faulty {
            random_fault(&sim, &mut rng);
            stats.faults += 1;
        }
        {
            let state: Arc<State> = broker.state.clone();
            for _ in 0..plan.steps {
                if sim.is_down() {
                    break;
                }
                Work {
                    state: &state,
                    rt: &rt,
                    model: &mut model,
                    rng: &mut rng,
                    clock: &clock,
                    counts: &mut stats.counts,
                    sim: &sim,
                    faulty,
                }
                .step();
                if let Some(v) = model.violation.take() {
                    return Err(format!("epoch {epoch}, during the workload: {v}"));
                }
            }
            sim.cut();
            // Dropping the runtime waits for blocking work still running (a completion
            // after EndTxn's reply, a group's write): none of it may touch the disk after
            // the restart.
            drop(std::mem::replace(&mut rt, runtime()));
        }
        let point = sim.cut_point().expect("cut");
        if workload::tracing_on() {
            eprintln!("--- epoch {epoch}: cut at {point:?}");
        }
        stats.cuts += 1;
        *stats.cut_kinds.entry(point.kind).or_default() += 1;
        *stats.cut_files.entry(point.class()).or_default() += 1;
        stats.ops += sim.ops() - start_ops;
        drop(broker);
        let cut_model = CutModel::random(&mut rng);
        sim.restart(&cut_model, &mut rng);
        sim.set_capacity(None);
        install_controls(&sim);
        let ctx = |what: String| {
            format!(
                "epoch {epoch}, cut before {:?} of {} (op #{}), {cut_model:?}: {what}\nrecent operations:\n  {}",
                point.kind,
                point.path.display(),
                point.op,
                sim.recent_ops().join("\n  ")
            )
        };
        // Sometimes the power goes again while the broker recovers (carrying out recorded
        // decisions, aborting undecided transactions): the next start must still be right.
        let mut recovery_cut = rng.chance(plan.open_cut);
        broker = loop {
            if recovery_cut {
                sim.cut_before(sim.ops() + rng.range(1, 40));
            }
            // The coordinators' start logs what it could not do and leaves it for later (the
            // sweeper): a broker that opened on a disk that went down is a cut all the same.
            life += 1;
            let opened = open(&sim, &clock, life);
            if sim.is_down() {
                drop(opened);
                if workload::tracing_on() {
                    eprintln!("--- cut during the restart at {:?}", sim.cut_point());
                }
                stats.cuts += 1;
                stats.cuts_in_recovery += 1;
                if let Some(p) = sim.cut_point() {
                    *stats
                        .cut_files
                        .entry(format!("(restart) {}", p.class()))
                        .or_default() += 1;
                }
                sim.restart(&CutModel::random(&mut rng), &mut rng);
                install_controls(&sim);
                recovery_cut = false;
                continue;
            }
            match opened {
                Ok(b) => {
                    broker_controls(&b);
                    break b;
                }
                Err(e) => return Err(ctx(format!("reopening failed: {e}"))),
            }
        };
        // A cut armed for the recovery that it did not reach is disarmed.
        sim.cut_before(u64::MAX);
        workload::check(&broker.state, &mut model, &rt).map_err(&ctx)?;
    }
    Ok(stats)
}

fn run_many(seeds: std::ops::Range<u64>, plan: &Plan) -> Result<Stats, (u64, String)> {
    let mut total = Stats::default();
    for seed in seeds {
        match run_seed(seed, plan) {
            Ok(s) => total.add(&s),
            Err(e) => return Err((seed, e)),
        }
    }
    Ok(total)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// `SPOOL_BROKER_POWERLOSS_SEED` alone, or `SPOOL_BROKER_POWERLOSS_SEEDS` from
/// `SPOOL_BROKER_POWERLOSS_FIRST`, or `ci` seeds from 0.
fn seeds(ci: u64) -> std::ops::Range<u64> {
    if let Some(s) = env_u64("SPOOL_BROKER_POWERLOSS_SEED") {
        return s..s + 1;
    }
    let first = env_u64("SPOOL_BROKER_POWERLOSS_FIRST").unwrap_or(0);
    first..first + env_u64("SPOOL_BROKER_POWERLOSS_SEEDS").unwrap_or(ci)
}

/// Seeds the CI run covers.
const CI_SEEDS: u64 = 300;

/// Cuts per operation and file, most first (docs/durability.md's table of durable files).
fn print_cut_files(files: &BTreeMap<String, u64>) {
    let mut v: Vec<_> = files.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (class, n) in v {
        eprintln!("  cut before {class}: {n}");
    }
}

#[test]
fn broker_power_cuts_keep_acknowledged_state() {
    let plan = Plan::standard();
    let started = std::time::Instant::now();
    let range = seeds(CI_SEEDS);
    match run_many(range.clone(), &plan) {
        Ok(s) => {
            print_cut_files(&s.cut_files);
            eprintln!(
                "broker power-cut loop: seeds {}..{}, {} cuts ({} inside the broker's recovery) over {} disk operations (cut on: {:?}), {} faults; {} offset commits, {} producer ids, {} transactions decided (acknowledged), {} aborted at their timeout; {} joins, {} member commits, {} commits of fenced members or stale generations refused, generations up to {} in {:.1?}",
                range.start,
                range.end,
                s.cuts,
                s.cuts_in_recovery,
                s.ops,
                s.cut_kinds,
                s.faults,
                s.counts.commits_acked,
                s.counts.pids,
                s.counts.txns_decided,
                s.counts.timeouts,
                s.counts.joins,
                s.counts.member_commits,
                s.counts.zombie_commits_refused,
                s.counts.max_generation,
                started.elapsed()
            )
        }
        Err((seed, e)) => panic!(
            "seed {seed} violated an invariant:\n{e}\nreplay: SPOOL_BROKER_POWERLOSS_SEED={seed} cargo test -p spool-broker --lib broker_power_cuts -- --nocapture"
        ),
    }
}

/// Seeds replay exactly: the same disk operations, cuts (by operation and file) and counts.
/// (Nothing may depend on real time or a hash map's order: the groups' clock is stopped, the
/// coordinators' passes go in id order, member ids are fixed per seed.)
#[test]
fn broker_seeds_replay_exactly() {
    let plan = Plan::standard();
    let a = run_many(20..40, &plan).expect("seeds 20..40");
    let b = run_many(20..40, &plan).expect("seeds 20..40");
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    assert!(a.cuts > 0 && a.ops > 0 && a.counts.joins > 0 && a.counts.timeouts > 0);
}

/// A sync the broker's durable state needs, removed (the disk skips it): each must make the
/// loop fail, or the loop could not see that sync missing.
/// A named skipped sync.
type Control = (&'static str, fn() -> Fault);

const CONTROLS: &[Control] = &[
    ("fdatasync of __consumer_offsets' segments", || {
        segment_sync_skipped(crate::OFFSETS_TOPIC)
    }),
    ("fdatasync of __producer_ids' segments", || {
        segment_sync_skipped(crate::PRODUCER_IDS_TOPIC)
    }),
    ("fdatasync of __transaction_state's segments", || {
        segment_sync_skipped(crate::TXN_STATE_TOPIC)
    }),
];

/// Skips every fdatasync of the segment files of `topic` (and nothing else: its
/// `topic.json` and directories are synced as usual).
fn segment_sync_skipped(topic: &'static str) -> Fault {
    Fault::when(
        move |k, p| {
            k == OpKind::SyncData
                && p.extension().is_some_and(|e| e == "log")
                && p.components().any(|c| c.as_os_str() == topic)
        },
        Effect::Skip,
    )
}

#[test]
fn broker_negative_controls_are_caught() {
    for (name, control) in CONTROLS {
        let plan = Plan {
            fault: 0.0,
            open_cut: 0.0,
            controls: vec![*control],
            ..Plan::standard()
        };
        // Caught by the broker's invariants, not only by the engine refusing to open a
        // segment that lost bytes.
        let caught = (0..1000).find_map(|seed| {
            run_seed(seed, &plan)
                .err()
                .filter(|e| !e.contains("reopening failed"))
                .map(|e| (seed, e))
        });
        match caught {
            Some((seed, e)) => eprintln!(
                "control \"{name}\": caught by seed {seed}: {}",
                e.lines().next().unwrap_or_default()
            ),
            None => panic!(
                "control \"{name}\" was not caught by 1000 seeds: the loop cannot see that sync missing"
            ),
        }
    }
}

/// A transaction's offsets are checked against its outcome once that is known (resolved
/// from its records when its EndTxn was cut): with a commit's offsets applied before its
/// decision is recorded, a cut between the two leaves them applied to a transaction the
/// restart aborts. Some seed must fail on that check; the offsets check alone passes it
/// (the values were asked for).
#[test]
fn offsets_applied_before_the_decision_are_caught() {
    let plan = Plan {
        fault: 0.0,
        open_cut: 0.0,
        offsets_before_decision: true,
        ..Plan::standard()
    };
    let check = "is aborted, but the committed offset";
    let caught = (0..1000).find_map(|seed| {
        run_seed(seed, &plan)
            .err()
            .filter(|e| e.contains(check))
            .map(|e| (seed, e))
    });
    match caught {
        Some((seed, e)) => eprintln!(
            "offsets before the decision: caught by seed {seed}: {}",
            e.lines().next().unwrap_or_default()
        ),
        None => panic!(
            "1000 seeds did not fail on \"{check}\" with offsets applied before the decision"
        ),
    }
}

/// `__consumer_offsets` holds two kinds of durable state, each with its own check: with its
/// segments never synced, some seed must fail on the groups' check (a generation below one a
/// member was told, a member gone: the group's state was lost after its Assignments went
/// out), and some seed on the committed offsets' (an acknowledged commit lost).
#[test]
fn unsynced_consumer_offsets_fail_both_its_checks() {
    let plan = Plan {
        fault: 0.0,
        open_cut: 0.0,
        controls: vec![|| segment_sync_skipped(crate::OFFSETS_TOPIC)],
        ..Plan::standard()
    };
    let checks = [": group mg", ": committed offset of"];
    let mut caught: [Option<(u64, String)>; 2] = [None, None];
    for seed in 0..2000 {
        if caught.iter().all(Option::is_some) {
            break;
        }
        let Err(e) = run_seed(seed, &plan) else {
            continue;
        };
        for (check, slot) in checks.iter().zip(caught.iter_mut()) {
            if slot.is_none() && e.contains(check) {
                *slot = Some((seed, e.lines().next().unwrap_or_default().to_owned()));
            }
        }
    }
    for (check, slot) in checks.iter().zip(caught) {
        match slot {
            Some((seed, e)) => eprintln!("unsynced __consumer_offsets: caught by seed {seed}: {e}"),
            None => {
                panic!("2000 seeds did not fail on \"{check}\" with __consumer_offsets unsynced")
            }
        }
    }
}

/// A fresh broker on a simulated disk with topic `d` of `partitions` partitions.
fn open_with_topic_d(partitions: u32) -> (SimFs, Arc<ManualClock>, Broker) {
    let sim = SimFs::new();
    let clock = Arc::new(ManualClock(AtomicI64::new(1_700_000_000_000)));
    let broker = open(&sim, &clock, 0).expect("open");
    broker
        .state
        .log
        .create_topic(
            "d",
            spool_log_engine::TopicConfig {
                partitions,
                ..Default::default()
            },
        )
        .unwrap();
    (sim, clock, broker)
}

/// A transaction whose commit was recorded but could not be carried out (a marker's write
/// failed) is completed at the next start; its offsets must not undo a commit of the same
/// offsets acknowledged after it (by another transaction here).
#[test]
fn a_decision_completed_at_restart_does_not_undo_newer_commits() {
    use spool_log_engine::{BatchBuilder, Compression};

    let (sim, clock, broker) = open_with_topic_d(2);
    let s = broker.state.clone();
    let rt = runtime();
    let offsets = |id: &str, pid: i64, epoch: i16, offset: u64| v1::AddOffsetsToTxnRequest {
        transactional_id: id.into(),
        producer_id: pid,
        producer_epoch: i32::from(epoch),
        group: "tg".into(),
        offsets: vec![v1::OffsetCommit {
            topic: "d".into(),
            partition: 0,
            offset,
            metadata: String::new(),
        }],
        ..Default::default()
    };
    let committed = |s: &State| {
        s.offsets
            .fetch("tg", &[])
            .unwrap()
            .first()
            .and_then(|c| c.offset)
    };

    // A: a record in d/1 and offset 10, committed; the marker's write fails.
    let (a, ae) = rt.block_on(s.txns.init("a", 60_000, None)).unwrap();
    // Held until the batch is appended, as the produce path does.
    let hold = s.txns.add_partitions(a, ae, vec![("d".into(), 1)]).unwrap();
    let mut b = BatchBuilder::new(Compression::None);
    b.producer(a, ae, 0);
    b.transactional(true);
    b.push(clock.now_ms(), None, Some(b"a"), &[]);
    s.log
        .partition("d", 1)
        .unwrap()
        .append(&b.finish().unwrap())
        .unwrap();
    drop(hold);
    rt.block_on(s.txns.add_offsets(offsets("a", a, ae, 10)))
        .unwrap();
    sim.inject(Fault::on(OpKind::Write, "/spool/d/1/", Effect::Fail(libc::EIO)).times(1));
    rt.block_on(s.txns.end("a", a, i32::from(ae), true))
        .expect_err("the marker's write fails");

    // B: offset 20 for the same partition, committed and acknowledged after A's failure.
    let (bp, be) = rt.block_on(s.txns.init("b", 60_000, None)).unwrap();
    rt.block_on(s.txns.add_offsets(offsets("b", bp, be, 20)))
        .unwrap();
    rt.block_on(s.txns.end("b", bp, i32::from(be), true))
        .unwrap();
    assert_eq!(committed(&s), Some(20));

    // Power cut; the restart carries out A's recorded commit.
    sim.cut();
    drop(rt);
    drop(s);
    drop(broker);
    sim.restart(&CutModel::LOSE_UNSYNCED, &mut SimRng::new(1));
    let broker = open(&sim, &clock, 1).expect("reopen");
    let p = broker.state.log.partition("d", 1).unwrap();
    assert!(p.open_transactions().is_empty(), "A was completed");
    assert_eq!(
        committed(&broker.state),
        Some(20),
        "A's older offset replaced the newer, acknowledged one"
    );
}

/// tonic drops a handler's future when its client goes away. An EndTxn dropped after its
/// first poll must still be carried out whole (markers written and durable, completion
/// recorded), not left with its decision on disk, memory still `Ongoing` and the id's lock
/// released; a retry gets an answer, and a power cut afterwards keeps the commit.
#[test]
fn an_end_txn_whose_caller_goes_away_is_still_carried_out() {
    use spool_log_engine::{BatchBuilder, Compression};
    use std::time::Duration;

    let (sim, clock, broker) = open_with_topic_d(1);
    let s = broker.state.clone();
    let rt = runtime();
    let (a, ae) = rt.block_on(s.txns.init("a", 60_000, None)).unwrap();
    // Held until the batch is appended, as the produce path does.
    let hold = s.txns.add_partitions(a, ae, vec![("d".into(), 0)]).unwrap();
    let mut b = BatchBuilder::new(Compression::None);
    b.producer(a, ae, 0);
    b.transactional(true);
    b.push(clock.now_ms(), None, Some(b"a"), &[]);
    let p = s.log.partition("d", 0).unwrap();
    p.append(&b.finish().unwrap()).unwrap();
    drop(hold);
    assert_eq!(p.open_transactions().len(), 1);

    // One poll, then the future is dropped (what tonic does on a client's disconnect).
    let finished = rt.block_on(async {
        let end = s.txns.end("a", a, i32::from(ae), true);
        futures_util::FutureExt::now_or_never(end).is_some()
    });
    assert!(
        !finished,
        "EndTxn finished in one poll: this test would prove nothing"
    );

    let state = |s: &State, rt: &tokio::runtime::Runtime| {
        rt.block_on(s.txns.list())
            .into_iter()
            .find(|t| t.transactional_id == "a")
            .map(|t| t.state)
    };
    let complete = Some(v1::TxnState::CompleteCommit as i32);
    rt.block_on(async {
        for _ in 0..500 {
            if p.open_transactions().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(
        p.open_transactions().is_empty(),
        "the dropped EndTxn left the transaction open on its partition"
    );
    rt.block_on(s.txns.end("a", a, i32::from(ae), true))
        .expect("the client's retry of EndTxn is answered");
    assert_eq!(state(&s, &rt), complete, "the completion was recorded");

    sim.cut();
    drop((p, rt, s, broker));
    sim.restart(&CutModel::LOSE_UNSYNCED, &mut SimRng::new(1));
    let broker = open(&sim, &clock, 1).expect("reopen");
    let rt = runtime();
    assert!(
        broker
            .state
            .log
            .partition("d", 0)
            .unwrap()
            .open_transactions()
            .is_empty(),
        "the commit was lost in the power cut"
    );
    assert_eq!(state(&broker.state, &rt), complete);
}

/// Audit-durable finding 2. A decision's `offsets_since` counted commits still in flight; a
/// power cut loses them, and their positions go to commits made after the restart. Carried out
/// late (its marker's write failed at the start, the sweeper finishes it), the decision must
/// not write its older offset over such a commit, nor may a later start (after a second cut
/// that loses the decision's `Complete*`, which is not waited for).
#[test]
fn a_late_decision_does_not_undo_a_commit_at_a_position_a_cut_freed() {
    use crate::txn::state::{GroupOffsets, TxnMeta};
    use spool_log_engine::{BatchBuilder, Compression};

    let (sim, clock, broker) = open_with_topic_d(2);
    let s = broker.state.clone();
    let rt = runtime();
    let committed = |s: &State| {
        s.offsets
            .fetch("tg", &[])
            .unwrap()
            .first()
            .and_then(|c| c.offset)
    };
    let plain = |s: &State, offset: u64| {
        s.offsets.commit(
            "tg",
            &[v1::OffsetCommit {
                topic: "d".into(),
                partition: 0,
                offset,
                metadata: String::new(),
            }],
            clock.now_ms(),
        )
    };

    // A: a durable record in d/1, and its commit decided with offset 10 for tg/d/0, recorded
    // (durably) with an `offsets_since` three positions past the offsets topic's durable end,
    // as when commits of other groups were in flight and the cut lost them.
    let (a, ae) = rt.block_on(s.txns.init("a", 60_000, None)).unwrap();
    let hold = s.txns.add_partitions(a, ae, vec![("d".into(), 1)]).unwrap();
    let mut b = BatchBuilder::new(Compression::None);
    b.producer(a, ae, 0);
    b.transactional(true);
    b.push(clock.now_ms(), None, Some(b"a"), &[]);
    s.log
        .partition("d", 1)
        .unwrap()
        .append(&b.finish().unwrap())
        .unwrap();
    drop(hold);
    let end = s.offsets.next_position().unwrap();
    let mut meta = TxnMeta::new(a, 60_000);
    meta.epoch = ae;
    meta.phase = crate::txn::state::Phase::Ongoing;
    meta.partitions.insert(("d".into(), 1));
    meta.groups.insert(
        "tg".into(),
        GroupOffsets {
            offsets: [("d".to_owned(), [(0, (10, String::new()))].into())].into(),
            ..GroupOffsets::default()
        },
    );
    meta.prepare(true, false);
    meta.offsets_since = Some(end + 3);
    let mut b = BatchBuilder::new(Compression::None);
    b.push(
        clock.now_ms(),
        Some(b"a"),
        Some(&serde_json::to_vec(&meta).unwrap()),
        &[],
    );
    s.log
        .partition(crate::TXN_STATE_TOPIC, 0)
        .unwrap()
        .append(&b.finish().unwrap())
        .unwrap();

    // Power cut. At the start the marker's write fails (the disk is full), so the decision
    // stays pending.
    sim.cut();
    drop((rt, s, broker));
    sim.restart(&CutModel::LOSE_UNSYNCED, &mut SimRng::new(1));
    let d1_log = |k: OpKind, p: &std::path::Path| {
        k == OpKind::Write
            && p.starts_with("/spool/d/1")
            && p.extension().is_some_and(|e| e == "log")
    };
    sim.inject(Fault::when(d1_log, Effect::Fail(libc::ENOSPC)).times(1));
    let broker = open(&sim, &clock, 1).expect("reopen");
    let s = broker.state.clone();
    let rt = runtime();
    let d1 = s.log.partition("d", 1).unwrap();
    assert_eq!(d1.open_transactions().len(), 1, "A's decision is pending");
    assert_eq!(s.offsets.next_position().unwrap(), end);

    // A plain commit (a new owner of tg/d/0) lands at the reused position, then the sweeper
    // finishes A.
    plain(&s, 30).unwrap();
    assert_eq!(committed(&s), Some(30));
    rt.block_on(s.txns.sweep());
    assert!(d1.open_transactions().is_empty(), "the sweeper finished A");
    assert_eq!(
        committed(&s),
        Some(30),
        "A's older offset replaced a commit made after the restart"
    );

    // A second cut loses A's `Complete*`: the next start carries A out again.
    sim.cut();
    drop((d1, rt, s, broker));
    sim.restart(&CutModel::LOSE_UNSYNCED, &mut SimRng::new(2));
    let broker = open(&sim, &clock, 2).expect("reopen");
    assert_eq!(
        committed(&broker.state),
        Some(30),
        "a restart re-ran A over the commit made after the first restart"
    );
}

/// Audit-durable finding 3. A decision left pending at start (a marker's write failing) owns
/// its producer's transactions below its epoch only. The producer's next transaction, at the
/// decision's epoch (begun once `Complete*` was appended, kept by a cut that lost
/// `Complete*`), was decided by nobody: once the decision is carried out it must be aborted,
/// not left open with its partition's last stable offset stuck until the next restart.
#[test]
fn a_decision_pending_at_start_does_not_keep_the_next_transaction_open() {
    use spool_log_engine::{BatchBuilder, Compression, FsyncPolicy, TopicConfig};
    use std::time::Duration;

    let (sim, clock, broker) = open_with_topic_d(2);
    let s = broker.state.clone();
    // P: a partition whose topic is not fsynced on append, so a cut can lose its marker while
    // the transaction's batch (synced here explicitly) stays.
    s.log
        .create_topic(
            "n",
            TopicConfig {
                partitions: 1,
                fsync: FsyncPolicy::Never,
                ..TopicConfig::default()
            },
        )
        .unwrap();
    let rt = runtime();
    let batch = |pid: i64, epoch: i16, v: &[u8]| {
        let mut b = BatchBuilder::new(Compression::None);
        b.producer(pid, epoch, 0);
        b.transactional(true);
        b.push(clock.now_ms(), None, Some(v), &[]);
        b.finish().unwrap()
    };
    let (p, q) = (
        s.log.partition("n", 0).unwrap(),
        s.log.partition("d", 1).unwrap(),
    );

    // txn1 on {P, Q}, committed (no offsets: the reply goes out before `Complete*`).
    let (a, e) = rt.block_on(s.txns.init("a", 60_000, None)).unwrap();
    let hold = s
        .txns
        .add_partitions(a, e, vec![("n".into(), 0), ("d".into(), 1)])
        .unwrap();
    let info = p.append(&batch(a, e, b"p1")).unwrap();
    p.wait_durable(info.last_offset + 1).unwrap();
    q.append(&batch(a, e, b"q1")).unwrap();
    drop(hold);
    let (_, next) = rt.block_on(s.txns.end("a", a, i32::from(e), true)).unwrap();
    assert_eq!(next, e + 1);
    let complete = || {
        rt.block_on(s.txns.list())
            .into_iter()
            .any(|t| t.state == v1::TxnState::CompleteCommit as i32)
    };
    for _ in 0..500 {
        if complete() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(complete(), "txn1 completed");

    // txn2's first batch, on Q, durable (Q is fsynced on append).
    let hold = s
        .txns
        .add_partitions(a, next, vec![("d".into(), 1)])
        .unwrap();
    q.append(&batch(a, next, b"q2")).unwrap();
    drop(hold);
    assert_eq!(q.open_transactions().len(), 1);

    // Power cut: `Complete*` and P's marker are lost, txn2's batch stays. At the start P's
    // marker cannot be written (the disk is full): txn1's decision stays pending.
    sim.cut();
    drop((p, q, rt, s, broker));
    sim.restart(&CutModel::LOSE_UNSYNCED, &mut SimRng::new(1));
    let p_log = |k: OpKind, path: &std::path::Path| {
        k == OpKind::Write
            && path.starts_with("/spool/n/0")
            && path.extension().is_some_and(|e| e == "log")
    };
    sim.inject(Fault::when(p_log, Effect::Fail(libc::ENOSPC)).times(1));
    let broker = open(&sim, &clock, 1).expect("reopen");
    let s = broker.state.clone();
    let rt = runtime();
    let (p, q) = (
        s.log.partition("n", 0).unwrap(),
        s.log.partition("d", 1).unwrap(),
    );
    assert_eq!(p.open_transactions().len(), 1, "txn1's decision is pending");
    assert_eq!(q.open_transactions().len(), 1, "txn2 is open on Q");

    // The disk has room again; the sweeper carries txn1 out.
    rt.block_on(s.txns.sweep());
    assert!(p.open_transactions().is_empty(), "txn1 was carried out");
    assert!(
        q.open_transactions().is_empty(),
        "txn2, decided by nobody, is left open on Q"
    );
    assert_eq!(q.last_stable_offset(), q.high_watermark());
    // Its producer's epoch is fenced: it aborts and re-inits.
    let hold = s.txns.add_partitions(a, next, vec![("d".into(), 1)]);
    assert!(
        matches!(hold, Err(crate::BrokerError::TxnProducerFenced { .. })),
        "{hold:?}"
    );
}
