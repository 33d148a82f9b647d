//! A partition whose local store is locked by another connection (another instance started on
//! the same state directory) waits for it: the partition is not processed (the processor is
//! not ready) while the others are; once the lock is released its restore proceeds and the
//! processor carries on from the stored state, exactly once.

use std::path::Path;
use std::time::{Duration, Instant};

use spool_client::partitioner::partition_for_key;
use spool_client::{Client, ProducerConfig};

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
