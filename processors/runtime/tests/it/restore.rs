//! A partition whose local store is locked by another connection (another instance started on
//! the same state directory) waits for it: the partition is not processed (the processor is
//! not ready) while the others are; once the lock is released its restore proceeds and the
//! processor carries on from the stored state, exactly once.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spool_client::partitioner::partition_for_key;
use spool_client::{Client, ProducerConfig};
use spool_processor::metrics::Metrics;

use crate::{
    Proc, assert_passthrough_exactly_once, passthrough_broker, produce_inputs, read_all,
    wait_passthrough_caught_up, write_config,
};

const PARTITIONS: u32 = 2;
const KEYS: usize = 10;

/// Holds `path`'s SQLite lock as the runtime's own connection does (`locking_mode =
/// EXCLUSIVE`, WAL), checking that a second connection is refused meanwhile.
fn lock_store(path: &Path) -> rusqlite::Connection {
    let holder = rusqlite::Connection::open(path).unwrap();
    holder
        .execute_batch(
            "PRAGMA locking_mode = EXCLUSIVE; PRAGMA journal_mode = WAL;
             BEGIN IMMEDIATE; COMMIT;",
        )
        .unwrap();
    let other = rusqlite::Connection::open(path).unwrap();
    other.busy_timeout(Duration::ZERO).unwrap();
    let read = other.query_row("SELECT count(*) FROM kv", [], |r| r.get::<_, i64>(0));
    assert!(
        matches!(
            read.as_ref().map_err(rusqlite::Error::sqlite_error_code),
            Err(Some(
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ))
        ),
        "the store is not locked: {read:?}"
    );
    holder
}

/// Outputs on `out`/`partition`, read committed.
async fn outputs(c: &Client, partition: u32) -> usize {
    read_all(c, "out", partition).await.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_waits_for_a_locked_store_and_the_other_partitions_go_on() {
    let (broker, c) = passthrough_broker(PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "passthrough",
        "name = \"passthrough\"\ninputs = [\"in\"]\noutputs = [\"out\"]\n\
         [commit]\ninterval_ms = 20\n[app]\noutput = \"out\"\n",
    );
    let addr = broker.addr();
    let state = dir.path().join("state");
    // A first run leaves both partitions' state in their local stores.
    let mut produced = Vec::new();
    let mut p = Proc::passthrough(&cfg, &addr, "p0", &state);
    assert!(p.wait_ready(Duration::from_secs(30)), "never got ready");
    produce_inputs(&c, ProducerConfig::default(), 100, KEYS, &mut produced).await;
    wait_passthrough_caught_up(&c, PARTITIONS).await;
    assert!(p.terminate(Duration::from_secs(20)), "clean exit");
    let before = (outputs(&c, 0).await, outputs(&c, 1).await);

    // Partition 0's store is held by someone else when the processor starts again.
    let holder = lock_store(&state.join("passthrough-p0.sqlite"));
    let mut p = Proc::passthrough(&cfg, &addr, "p0", &state);
    produce_inputs(&c, ProducerConfig::default(), 100, KEYS, &mut produced).await;
    let want1 = produced
        .iter()
        .filter(|(k, _)| partition_for_key(k.as_bytes(), PARTITIONS) == 1)
        .count();
    // Partition 1 catches up; partition 0 waits (and the processor is not ready).
    let deadline = Instant::now() + Duration::from_secs(30);
    while outputs(&c, 1).await < want1 {
        assert!(Instant::now() < deadline, "partition 1 never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !p.wait_ready(Duration::from_millis(500)),
        "ready while a partition's store is locked"
    );
    assert_eq!(
        outputs(&c, 0).await,
        before.0,
        "partition 0 processed without its store"
    );
    assert!(p.running(), "a locked store is waited for, not an error");

    // Released: the restore proceeds and the processor carries on from the stored counts.
    drop(holder);
    assert!(
        p.wait_ready(Duration::from_secs(10)),
        "not ready after the store was released"
    );
    wait_passthrough_caught_up(&c, PARTITIONS).await;
    assert!(p.terminate(Duration::from_secs(20)), "clean exit");
    let (_, n) = assert_passthrough_exactly_once(&c, &produced, PARTITIONS).await;
    assert_eq!(n, produced.len());
}

/// The pass-through's handler (`src/bin/passthrough.rs`), in this process so that the test
/// reads the runtime's metrics: counts per key in store `counts`, copies each input to `out`
/// (same partition) with `|<count>` appended.
struct Counting;

impl spool_processor::Handler for Counting {
    fn handle(
        &mut self,
        ctx: &mut spool_processor::Context<'_>,
        input: &spool_processor::Input,
    ) -> Result<(), spool_processor::Failure> {
        let key = input.key.clone().unwrap_or_default();
        let mut counts = ctx.store("counts")?;
        let n = counts
            .get(&key)?
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok())
            .unwrap_or(0)
            + 1;
        counts.put(&key, n.to_string());
        let mut value = input.value.as_deref().unwrap_or_default().to_vec();
        value.extend_from_slice(format!("|{n}").as_bytes());
        let out = spool_client::ProducerRecord::new(value).key(key);
        ctx.emit_to("out", input.partition, out);
        Ok(())
    }
}

struct InProcess {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), spool_processor::RuntimeError>>,
    metrics: Arc<Metrics>,
}

impl InProcess {
    fn start(c: &Client, state: &Path, max_parked_bytes: usize) -> InProcess {
        let mut cfg = spool_processor::RuntimeConfig::new("passthrough", ["in"]);
        cfg.state_dir = state.to_path_buf();
        cfg.commit_interval = Duration::from_millis(20);
        cfg.tick_interval = Duration::from_millis(20);
        cfg.session_timeout = Duration::from_secs(2);
        cfg.max_parked_bytes = max_parked_bytes;
        let metrics = Arc::new(Metrics::new());
        let (stop, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(spool_processor::runtime::run(
            c.clone(),
            cfg,
            Counting,
            metrics.clone(),
            rx,
        ));
        InProcess {
            stop,
            task,
            metrics,
        }
    }

    async fn wait_ready(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.metrics.is_ready() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("stops in time")
            .expect("joins")
            .expect("clean stop");
    }
}

/// Partition 0's store is locked while the processor starts again with a backlog on both
/// partitions: partition 1 is processed while partition 0's records are parked (their lane's
/// stream carries both); once the store is free, partition 0 restores and its parked
/// records go first. Returns the stream resets and refetched records counted from the moment
/// partition 1 caught up until everything was processed, and the most records parked.
async fn restore_with_parking(max_parked_bytes: usize) -> (u64, u64, i64) {
    let (broker, c) = passthrough_broker(PARTITIONS).await;
    let _ = &broker;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut produced = Vec::new();
    let p = InProcess::start(&c, &state, max_parked_bytes);
    assert!(p.wait_ready(Duration::from_secs(30)).await, "never ready");
    produce_inputs(&c, ProducerConfig::default(), 100, KEYS, &mut produced).await;
    wait_passthrough_caught_up(&c, PARTITIONS).await;
    p.stop().await;
    let before0 = outputs(&c, 0).await;

    let holder = lock_store(&state.join("passthrough-p0.sqlite"));
    let p = InProcess::start(&c, &state, max_parked_bytes);
    produce_inputs(&c, ProducerConfig::default(), 400, KEYS, &mut produced).await;
    let want1 = produced
        .iter()
        .filter(|(k, _)| partition_for_key(k.as_bytes(), PARTITIONS) == 1)
        .count();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut most_parked = 0;
    while outputs(&c, 1).await < want1 {
        assert!(Instant::now() < deadline, "partition 1 never caught up");
        most_parked = most_parked.max(p.metrics.parked_records());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Partition 0's records reach the runtime and wait (parked) for its state.
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.metrics.parked_records() == 0 {
        assert!(Instant::now() < deadline, "nothing of partition 0 parked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    most_parked = most_parked.max(p.metrics.parked_records());
    assert!(!p.metrics.is_ready(), "ready while a store is locked");
    assert_eq!(outputs(&c, 0).await, before0, "processed without its state");
    let resets = p.metrics.stream_resets();
    let refetched = p.metrics.refetched_records();

    drop(holder);
    assert!(
        p.wait_ready(Duration::from_secs(10)).await,
        "not ready after the store was released"
    );
    wait_passthrough_caught_up(&c, PARTITIONS).await;
    // The counters move at the next tick (20 ms).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        p.metrics.parked_records(),
        0,
        "every parked record was handled"
    );
    let counted = (
        p.metrics.stream_resets() - resets,
        p.metrics.refetched_records() - refetched,
    );
    p.stop().await;
    let (_, n) = assert_passthrough_exactly_once(&c, &produced, PARTITIONS).await;
    assert_eq!(n, produced.len());
    (counted.0, counted.1, most_parked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restoring_partition_parks_its_records_without_resetting_its_lane_stream() {
    let (resets, refetched, parked) = restore_with_parking(8 << 20).await;
    assert!(parked > 0);
    assert_eq!(
        (resets, refetched),
        (0, 0),
        "partition 0 resumed without reopening the stream that carried partition 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_past_its_bound_pauses_the_partition_and_loses_nothing() {
    // Room for about 6 records (each counts 128 bytes and its key and value).
    let (resets, _, parked) = restore_with_parking(1024).await;
    assert!(
        (1..=7).contains(&parked),
        "{parked} records parked with room for about 6"
    );
    assert!(
        resets >= 1,
        "the overflowed partition is paused in the consumer and resumed: {resets} resets"
    );
}
