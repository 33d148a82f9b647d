//! Exactly once through kill -9: two `spool-passthrough` processes (a stateful pass-through:
//! output `value|n`, n counting the key's records in the state store `counts`) run while
//! inputs keep arriving; in a loop one of them is SIGKILLed and started again, and twice the
//! broker is SIGKILLed and restarted. Then the checker reads everything read-committed:
//! - every input has exactly one output (none lost, none duplicated);
//! - per key the counts run 1, 2, 3, … in order (state and outputs moved together);
//! - the changelog's final state equals the model's counts;
//! - a restarted processor resumes from that state (the next record of a key gets n + 1).
//!
//! And a broker restart that aborts the processor's open transaction (its outputs already
//! written to `out`) with the epoch bumped fences the processor's producer (the processor is
//! frozen with SIGSTOP while the broker restarts, so that its next write meets the new
//! broker): the processor
//! aborts that epoch, goes back to its last commit with the aborted writes dropped from its
//! state, and carries on; it never exits, and the outputs stay exactly once.
//!
//! And a second instance started with the same instance id supersedes the first: the first
//! exits with `SUPERSEDED_EXIT_CODE` and says why, the second carries on, exactly once; an
//! idle first one (no transaction to be fenced) stops as soon as the group says it was
//! replaced.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use spool_client::{ProducerConfig, ProducerRecord};
use spool_testkit::Broker;

use crate::{
    Proc, Rng, assert_passthrough_exactly_once, create, passthrough_broker, produce_inputs,
    produce_padded_inputs, read_all, wait_passthrough_caught_up, write_config,
};

const PARTITIONS: u32 = 4;
const KEYS: usize = 40;
const ROUNDS: usize = 8;
const PER_ROUND: usize = 400;

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    write_config(
        dir,
        "passthrough",
        "name = \"passthrough\"\ninputs = [\"in\"]\noutputs = [\"out\"]\n\
         [commit]\ninterval_ms = 20\nmax_records = 200\n\
         [group]\nsession_timeout_ms = 1000\ntransaction_timeout_ms = 5000\n\
         [app]\noutput = \"out\"\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_with_state_is_exactly_once_through_kill_9() {
    let mut broker = Broker::start();
    let c = broker.client().await;
    create(&c, "in", PARTITIONS).await;
    create(&c, "out", PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let addr = broker.addr();
    let state = |i: usize| dir.path().join(format!("state-{i}"));
    let start = |i: usize| Proc::passthrough(&cfg, &addr, &format!("p{i}"), &state(i));
    let mut procs = vec![start(0), start(1)];
    assert!(
        procs[0].wait_ready(Duration::from_secs(30)),
        "processor 0 never got ready"
    );

    let mut rng = Rng(0x5eed_1234);
    let mut produced: Vec<(String, String)> = Vec::new();
    let mut broker_kills = 0;
    let mut proc_kills = 0;
    for round in 0..ROUNDS {
        // A round of inputs (keyed: one key, one partition).
        let linger = ProducerConfig {
            linger: Duration::from_millis(2),
            ..ProducerConfig::default()
        };
        produce_inputs(&c, linger, PER_ROUND, KEYS, &mut produced).await;
        tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        if round == 2 || round == 5 {
            tokio::task::block_in_place(|| broker.restart());
            broker_kills += 1;
        } else {
            let i = rng.below(2) as usize;
            procs[i].kill();
            proc_kills += 1;
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
            procs[i] = start(i);
        }
    }
    let c = broker.client().await;
    // Wait until the group committed everything.
    wait_passthrough_caught_up(&c, PARTITIONS).await;
    for p in &mut procs {
        assert!(
            p.terminate(Duration::from_secs(20)),
            "SIGTERM: clean exit within the stop timeout"
        );
    }

    // The model against the outputs, read committed.
    let (counts, outputs) = assert_passthrough_exactly_once(&c, &produced, PARTITIONS).await;
    eprintln!(
        "exactly once through kill -9: {} inputs, {outputs} outputs, {proc_kills} processor kills, {broker_kills} broker kills",
        produced.len()
    );
    // The changelog's final state equals the model.
    let mut state: BTreeMap<String, u64> = BTreeMap::new();
    for p in 0..PARTITIONS {
        for r in read_all(&c, "passthrough.changelog", p).await {
            let k = r.key.unwrap();
            let Some(user) = k.strip_prefix(b"\x06counts") else {
                continue;
            };
            let user = String::from_utf8(user.to_vec()).unwrap();
            match r.value {
                Some(v) => state.insert(
                    user,
                    String::from_utf8(v.to_vec()).unwrap().parse().unwrap(),
                ),
                None => state.remove(&user),
            };
        }
    }
    assert_eq!(state, counts, "changelog state = model");

    // A restarted processor resumes from that state.
    let mut p0 = start(0);
    assert!(p0.wait_ready(Duration::from_secs(30)));
    let producer = c.producer(ProducerConfig::default());
    producer
        .send("in", ProducerRecord::new("last").key("k0"))
        .await
        .unwrap()
        .await
        .unwrap();
    producer.close().await;
    let want_last = format!("last|{}", counts["k0"] + 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    'wait: loop {
        for p in 0..PARTITIONS {
            if read_all(&c, "out", p)
                .await
                .iter()
                .any(|r| r.value.as_deref() == Some(want_last.as_bytes()))
            {
                break 'wait;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {want_last} after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(p0.terminate(Duration::from_secs(20)));
}

/// Big enough that a transaction's outputs fill a 1 MiB batch, which the producer sends
/// before the commit: the broker then knows the transaction and aborts it at its restart.
const BIG_VALUE: usize = 40 << 10;
/// Inputs per round, all of one key: one full batch of outputs goes out
/// early, the rest stays buffered until the commit, so the processor sends nothing while
/// the broker is down and its first write after the restart meets the bumped epoch.
const BIG_INPUTS: usize = 30;

/// Waits (up to 20 s) until some partition of `out` holds an open transaction's records: its
/// last stable offset is below its high watermark.
async fn wait_open_transaction(c: &spool_client::Client, partitions: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let q: Vec<_> = (0..partitions)
        .map(|p| {
            (
                spool_client::TopicPartition::new("out", p),
                spool_client::OffsetSpec::Latest,
            )
        })
        .collect();
    loop {
        let hw = c.list_offsets(&q).await.unwrap();
        let lso = c
            .list_offsets_with(&q, spool_client::Isolation::ReadCommitted)
            .await
            .unwrap();
        if hw
            .iter()
            .zip(&lso)
            .any(|(h, l)| l.as_ref().unwrap().offset < h.as_ref().unwrap().offset)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no open transaction on out within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_fencing_the_open_transaction_does_not_end_the_processor() {
    // One partition: every input of the round goes to it (and every partition has inputs,
    // which the caught-up check needs).
    const PARTITIONS: u32 = 1;
    let mut broker = Broker::start();
    let mut c = broker.client().await;
    create(&c, "in", PARTITIONS).await;
    create(&c, "out", PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    // Long transactions (the linger off too: the inputs stop before the kill), so the broker
    // is killed while one is open with outputs written.
    let cfg = write_config(
        dir.path(),
        "passthrough",
        "name = \"passthrough\"\ninputs = [\"in\"]\noutputs = [\"out\"]\n\
         [commit]\ninterval_ms = 3000\nlinger_ms = 3000\nmax_records = 100000\n\
         [group]\nsession_timeout_ms = 3000\ntransaction_timeout_ms = 30000\n\
         [app]\noutput = \"out\"\n",
    );
    let state = dir.path().join("state");
    let mut p = Proc::passthrough(&cfg, &broker.addr(), "p0", &state);
    assert!(p.wait_ready(Duration::from_secs(30)), "never got ready");
    let mut produced = Vec::new();
    for round in 0..2 {
        let cfg = ProducerConfig {
            linger: Duration::from_millis(2),
            ..ProducerConfig::default()
        };
        produce_padded_inputs(&c, cfg, BIG_INPUTS, 1, BIG_VALUE, &mut produced).await;
        wait_open_transaction(&c, PARTITIONS).await;
        // Let the batch's acknowledgement (after its fsync) reach the processor, and freeze
        // the processor while the broker is down: otherwise its writes and retries meet the
        // broker down, fail, and the abort that follows reaches the restarted broker (a path
        // it survives too, but not the one tested). Thawed, its first write meets the
        // bumped epoch.
        tokio::time::sleep(Duration::from_millis(300)).await;
        p.signal("STOP");
        tokio::task::block_in_place(|| broker.restart());
        p.signal("CONT");
        c = broker.client().await;
        assert!(p.running(), "the processor exited in round {round}");
    }
    wait_passthrough_caught_up(&c, PARTITIONS).await;
    assert!(
        p.running(),
        "the processor exited after its transaction was fenced"
    );
    assert!(
        p.fenced() >= 1,
        "the broker restart never fenced the producer"
    );
    assert!(p.terminate(Duration::from_secs(20)), "clean exit");
    // Exactly once, and each key's counts 1, 2, 3, … in order: the state the handler read
    // after the fence held none of the aborted transaction's writes.
    let (_, outputs) = assert_passthrough_exactly_once(&c, &produced, PARTITIONS).await;
    assert_eq!(outputs, produced.len());
}

/// Instance `p0` on a fresh broker, each incarnation with a state directory of its own.
struct SameId {
    broker: Broker,
    client: spool_client::Client,
    dir: tempfile::TempDir,
    cfg: std::path::PathBuf,
}

impl SameId {
    /// The broker and the older incarnation, ready.
    async fn start_older() -> (SameId, Proc) {
        let (broker, client) = passthrough_broker(PARTITIONS).await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let t = SameId {
            broker,
            client,
            dir,
            cfg,
        };
        let older = t.start("older");
        assert!(older.wait_ready(Duration::from_secs(30)), "never got ready");
        (t, older)
    }

    /// Another incarnation, with its state under `state`.
    fn start(&self, state: &str) -> Proc {
        let addr = self.broker.addr();
        Proc::passthrough(&self.cfg, &addr, "p0", &self.dir.path().join(state))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_instance_with_the_same_id_supersedes_the_older_which_exits() {
    let (t, mut older) = SameId::start_older().await;
    let c = &t.client;
    let mut produced = Vec::new();
    produce_inputs(c, ProducerConfig::default(), 200, KEYS, &mut produced).await;
    wait_passthrough_caught_up(c, PARTITIONS).await;
    let mut newer = t.start("newer");
    // Inputs keep coming: whichever holds the partitions works; the older one's first
    // transaction after the newer one initialised the id is fenced, and so is its abort.
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        produce_inputs(c, ProducerConfig::default(), 20, KEYS, &mut produced).await;
        if let Some(code) = older.wait_exit(Duration::from_millis(100)) {
            break code;
        }
        assert!(
            Instant::now() < deadline,
            "the older instance still runs 30 s after the newer one started"
        );
    };
    assert_eq!(code, spool_processor::app::SUPERSEDED_EXIT_CODE);
    let errors = older.errors();
    assert!(
        errors.iter().any(|l| l.contains("newer instance")),
        "the older one says why it stopped: {errors:?}"
    );
    produce_inputs(c, ProducerConfig::default(), 200, KEYS, &mut produced).await;
    wait_passthrough_caught_up(c, PARTITIONS).await;
    assert!(newer.running(), "the newer instance carries on");
    assert!(newer.terminate(Duration::from_secs(20)), "clean exit");
    let (_, outputs) = assert_passthrough_exactly_once(c, &produced, PARTITIONS).await;
    assert_eq!(outputs, produced.len());
}

/// With no input at all the older instance has no transaction whose fence could tell it; the
/// group does: the newer one's join replaces it (`MemberReplaced`) and it exits at once.
/// Before, it rejoined as if expired, took the partitions back, and the two took turns until
/// the older one's first transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_older_instance_exits_as_soon_as_a_newer_one_with_its_id_joins() {
    let (t, mut older) = SameId::start_older().await;
    let c = &t.client;
    let mut newer = t.start("newer");
    assert!(
        newer.wait_ready(Duration::from_secs(30)),
        "the newer one never got ready"
    );
    let code = older.wait_exit(Duration::from_secs(10));
    assert_eq!(
        code,
        Some(spool_processor::app::SUPERSEDED_EXIT_CODE),
        "the idle older instance did not stop: {:?}",
        older.errors()
    );
    let errors = older.errors();
    assert!(
        errors.iter().any(|l| l.contains("newer instance")),
        "the older one says why it stopped: {errors:?}"
    );
    // The newer one keeps the partitions, alone, and works exactly once.
    let mut produced = Vec::new();
    produce_inputs(c, ProducerConfig::default(), 200, KEYS, &mut produced).await;
    wait_passthrough_caught_up(c, PARTITIONS).await;
    let group = c.describe_group("passthrough").await.unwrap();
    assert_eq!(group.members.len(), 1, "{group:?}");
    assert!(newer.running(), "the newer instance carries on");
    assert!(newer.terminate(Duration::from_secs(20)), "clean exit");
    let (_, outputs) = assert_passthrough_exactly_once(c, &produced, PARTITIONS).await;
    assert_eq!(outputs, produced.len());
}
