//! A clean stop is quick: SIGTERM while inputs keep arriving ends the in-flight batch
//! (committed or aborted, never half), leaves the group and exits 0 within a bound a
//! systemd `TimeoutStopSec` can rely on; afterwards a fresh processor picks up where the
//! stopped one left off and the outputs are exactly once (every input one output, per-key
//! counts 1, 2, 3, … in order). The same bound holds when the broker goes away at the same
//! moment (a terminal's Ctrl-C reaches spoold and the processors together): the final commit
//! fails (that batch is aborted by the broker and processed again), and leaving the group must
//! not wait for the client's request timeout on a broker that is gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use spool_client::{ProducerConfig, ProducerRecord};
use spool_testkit::Broker;

use crate::{
    Proc, assert_passthrough_exactly_once, create, produce_inputs, wait_passthrough_caught_up,
    write_config,
};

const PARTITIONS: u32 = 2;
const KEYS: usize = 10;
/// Generous for a loaded 2-core CI machine; a stop takes well under a second here.
const STOP_BOUND: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_input_flowing_exits_quickly_and_exactly_once() {
    let mut broker = Broker::start();
    let c = broker.client().await;
    create(&c, "in", PARTITIONS).await;
    create(&c, "out", PARTITIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "passthrough",
        "name = \"passthrough\"\ninputs = [\"in\"]\noutputs = [\"out\"]\n\
         [commit]\ninterval_ms = 100\nmax_records = 200\n\
         [app]\noutput = \"out\"\n",
    );
    let addr = broker.addr();
    let state = dir.path().join("state");
    let start = || Proc::passthrough(&cfg, &addr, "p0", &state);

    // Inputs keep arriving in the background until told to stop.
    let flowing = Arc::new(AtomicBool::new(true));
    let feeder = {
        let c = c.clone();
        let flowing = flowing.clone();
        tokio::spawn(async move {
            let producer = c.producer(ProducerConfig {
                linger: Duration::from_millis(2),
                ..ProducerConfig::default()
            });
            let mut produced = Vec::new();
            while flowing.load(Ordering::Relaxed) {
                for _ in 0..20 {
                    let i = produced.len();
                    let key = format!("k{}", i % KEYS);
                    let value = format!("v{i}");
                    let f = producer
                        .send("in", ProducerRecord::new(value.clone()).key(key.clone()))
                        .await
                        .expect("send");
                    f.await.expect("delivered");
                    produced.push((key, value));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            producer.close().await;
            produced
        })
    };

    let mut stops = Vec::new();
    for round in 0..3 {
        let mut p = start();
        assert!(
            p.wait_ready(Duration::from_secs(30)),
            "processor never got ready (round {round})"
        );
        // Let it process (and hold an open transaction) for a while.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let t0 = Instant::now();
        let clean = tokio::task::block_in_place(|| p.terminate(Duration::from_secs(30)));
        let took = t0.elapsed();
        eprintln!("round {round}: SIGTERM to exit {took:?} (clean: {clean})");
        assert!(
            clean,
            "SIGTERM: the processor did not exit 0 (round {round})"
        );
        stops.push(took);
    }
    flowing.store(false, Ordering::Relaxed);
    let mut produced = feeder.await.unwrap();

    // The broker dies while the processor works through a backlog; then SIGTERM.
    produce_inputs(&c, ProducerConfig::default(), 2000, KEYS, &mut produced).await;
    let mut p = start();
    assert!(p.wait_ready(Duration::from_secs(30)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.kill();
    let t0 = Instant::now();
    let clean = tokio::task::block_in_place(|| p.terminate(Duration::from_secs(60)));
    let took = t0.elapsed();
    eprintln!("broker gone: SIGTERM to exit {took:?} (clean: {clean})");
    assert!(
        clean,
        "SIGTERM with the broker gone: the processor did not exit 0"
    );
    stops.push(took);
    tokio::task::block_in_place(|| broker.restart());
    let c = broker.client().await;

    // A fresh instance drains the rest; then stop it too.
    let mut p = start();
    assert!(p.wait_ready(Duration::from_secs(30)));
    wait_passthrough_caught_up(&c, PARTITIONS).await;
    let t0 = Instant::now();
    assert!(tokio::task::block_in_place(
        || p.terminate(Duration::from_secs(30))
    ));
    stops.push(t0.elapsed());

    // Exactly once: the model against the outputs, read committed.
    let (_, outputs) = assert_passthrough_exactly_once(&c, &produced, PARTITIONS).await;
    eprintln!(
        "stops {stops:?}; {} inputs, {outputs} outputs",
        produced.len()
    );
    for (i, took) in stops.iter().enumerate() {
        assert!(
            *took < STOP_BOUND,
            "stop {i} took {took:?} (bound {STOP_BOUND:?}); all stops: {stops:?}"
        );
    }
}
