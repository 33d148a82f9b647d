//! Smoke test: the load generator's three workloads against a real `spoold`, about a second
//! each. It checks that they work and report sane numbers, not how fast anything is.
//!
//! Needs the `spoold` binary of the same profile (`cargo build -p spool-broker --bin spoold`;
//! `cargo test --workspace` builds it for the broker's own tests), or `$SPOOLD`.

use std::time::Duration;

use spool_loadgen::broker::{Spoold, find_spoold};
use spool_loadgen::{Acks, LoadConfig, Mode, Pacing, Report};

fn check(r: &Report, latency: bool) {
    assert!(r.records > 0, "no records: {}", r.line());
    assert!(r.bytes > 0 && r.mb_per_s > 0.0, "no bytes: {}", r.line());
    assert_eq!(r.errors, 0, "{}", r.line());
    if latency {
        let l = r
            .latency
            .unwrap_or_else(|| panic!("no latency: {}", r.line()));
        assert!(l.count > 0);
        assert!(
            l.p50_us > 0.0 && l.p50_us <= l.p99_us && l.p99_us <= l.p999_us,
            "{l:?}"
        );
        assert!(l.p999_us <= l.max_us * 1.01 && l.max_us < 30e6, "{l:?}");
    }
}

#[test]
fn produce_consume_e2e_against_spoold() {
    let dir = tempfile::tempdir().unwrap();
    let bin = find_spoold().expect("spoold binary");
    let broker = Spoold::start(&bin, &dir.path().join("data"), "127.0.0.1:0", 1).unwrap();
    let base = LoadConfig {
        broker: broker.addr.clone(),
        partitions: 2,
        producers: 2,
        record_size: 200,
        batch_bytes: 64 << 10,
        duration: Duration::from_millis(1000),
        warmup: Duration::from_millis(200),
        ..LoadConfig::default()
    };

    // Closed loop, stream.
    let produce = LoadConfig {
        topic: "smoke".into(),
        acks: Acks::Durable,
        ..base.clone()
    };
    let r = spool_loadgen::run(&produce).unwrap();
    check(&r, true);

    // Open loop, unary.
    let rate = LoadConfig {
        topic: "smoke".into(),
        unary: true,
        rate: Some(20_000.0),
        ..base.clone()
    };
    let r = spool_loadgen::run(&rate).unwrap();
    check(&r, true);
    assert!(
        r.records_per_s < 40_000.0,
        "open loop exceeded its rate: {}",
        r.line()
    );

    // Reads what the two runs wrote.
    let consume = LoadConfig {
        mode: Mode::Consume,
        topic: "smoke".into(),
        preload_bytes: 0,
        duration: Duration::from_secs(5),
        ..base.clone()
    };
    let r = spool_loadgen::run(&consume).unwrap();
    check(&r, false);

    // Every e2e pacing: the Kafka-like producer with and without a linger, and the old ones;
    // and the consumer on a thread and runtime of its own.
    for (i, (pacing, linger_us, in_flight, consumer_thread)) in [
        (Pacing::Linger, 0, 1, false),
        (Pacing::Linger, 500, 5, false),
        (Pacing::Tick, 1000, 8, false),
        (Pacing::TickOnly, 1000, 8, false),
        (Pacing::Linger, 0, 1, true),
    ]
    .into_iter()
    .enumerate()
    {
        let e2e = LoadConfig {
            mode: Mode::E2e,
            topic: format!("smoke-e2e-{i}"),
            rate: Some(5_000.0),
            pacing,
            linger: Duration::from_micros(linger_us),
            in_flight,
            consumer_thread,
            ..base.clone()
        };
        let r = spool_loadgen::run(&e2e).unwrap();
        check(&r, true);
        let expected = 5_000.0;
        assert!(
            r.records_per_s > expected * 0.5 && r.records_per_s < expected * 1.5,
            "{pacing:?} (consumer thread {consumer_thread}): e2e delivered {} records/s for a rate of {expected}",
            r.records_per_s
        );
        // Every delivered record carried its batch's cut time (values of 200 bytes), and some
        // produce replies were timed.
        let split = r.split.unwrap_or_else(|| panic!("no split: {}", r.line()));
        let before = split.before_send.expect("before-send latency");
        let after = split.after_send.expect("after-send latency");
        assert_eq!(before.count, r.latency.unwrap().count, "{}", r.line());
        assert_eq!(after.count, before.count, "{}", r.line());
        assert!(
            split.produce_reply.is_some_and(|l| l.count > 0),
            "{}",
            r.line()
        );
        assert!(split.over_1ms_mostly_before_send <= split.over_1ms);
        // A linger batches: each producer (2 500 records/s, one due every 400 µs) sends at
        // most one batch per 500 µs of its oldest record's wait, so at least two records per
        // request; without the linger every record would go alone (5 000 requests/s).
        if pacing == Pacing::Linger && linger_us == 500 {
            let per_s = r.requests as f64 / r.seconds;
            assert!(
                per_s < 0.6 * expected,
                "linger 500 µs sent {per_s:.0} requests/s for {expected} records/s: {}",
                r.line()
            );
        }
    }
}
