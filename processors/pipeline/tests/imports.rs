//! Feed import runs tracked by the completion counter, on a real `spoold` with the
//! `spool-imports` binary: a run whose merchants all finish is reported completed exactly
//! once; a run with merchants whose feed breaks off is reported stuck after the quiet slot,
//! with no further input, naming exactly those merchants, and never completed.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use spool_client::{Client, ConsumerConfig, StartAt};
use spool_pipeline::feed::{Feed, FeedConfig};
use spool_pipeline::processors::imports::{COMPLETED, STUCK, describe};
use spool_pipeline::{publish, topics};
use spool_processor::{Event, JobEvent, envelope};
use support::procs::Processor;

const STUCK_AFTER_MS: i64 = 1_500;

/// Every `import-status` event so far, read committed, by import id.
async fn status_events(
    consumer: &mut spool_client::Consumer,
    seen: &mut BTreeMap<String, Vec<Event<JobEvent>>>,
    until: impl Fn(&BTreeMap<String, Vec<Event<JobEvent>>>) -> bool,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    while !until(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        let Ok(Some(r)) = tokio::time::timeout(left, consumer.next()).await else {
            return;
        };
        let r = r.unwrap();
        let e = envelope::decode::<JobEvent>(&r.headers, r.key.as_ref(), r.value.as_ref()).unwrap();
        seen.entry(e.data.job.clone()).or_default().push(e);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_runs_complete_once_or_are_reported_stuck_naming_the_missing_merchants() {
    let broker = spool_testkit::Broker::start();
    let addr = broker.addr();
    let client = Client::connect(addr.as_str()).await.unwrap();
    publish::ensure_topics(&client, Some(2)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut imports = Processor::new(
        env!("CARGO_BIN_EXE_spool-imports"),
        dir.path(),
        "imports",
        &addr,
        &format!(
            "inputs = [\"feed-imports\"]\noutputs = [\"import-status\"]\n[app]\nstuck_after_ms = {STUCK_AFTER_MS}\n"
        ),
    );
    imports.start();
    assert!(
        imports.wait_ready(Duration::from_secs(30)),
        "spool-imports not ready: {}",
        imports.log_since_start()
    );

    let mut consumer = client.consumer(ConsumerConfig::default());
    consumer
        .subscribe_topic(topics::IMPORT_STATUS, StartAt::Earliest)
        .await
        .unwrap();

    let mut feed = Feed::new(FeedConfig {
        seed: 5,
        products: 200,
        merchants: 5,
        users: 0,
        ..FeedConfig::default()
    });
    let producer = publish::producer(&client);
    // Run 1: every merchant finishes.
    let r1 = feed.next_round();
    publish::publish_round(&producer, &r1, 0).await.unwrap();
    // Run 2: m001 and m003 break off (half their updates, no done).
    let r2 = feed.next_round();
    let stalled = vec!["m001".to_owned(), "m003".to_owned()];
    let published = Instant::now();
    publish::publish_round_stalling(&producer, &r2, 0, &stalled)
        .await
        .unwrap();

    let mut seen = BTreeMap::new();
    status_events(
        &mut consumer,
        &mut seen,
        |s| s.contains_key(&r1.import) && s.contains_key(&r2.import),
        Duration::from_secs(30),
    )
    .await;
    let reported_after = published.elapsed();
    // Another slot and a half: a second "completed" would show up, and run 2 reports again.
    status_events(
        &mut consumer,
        &mut seen,
        |_| false,
        Duration::from_millis(STUCK_AFTER_MS as u64 * 3 / 2),
    )
    .await;
    producer.close().await;

    let lines = |import: &str| -> Vec<String> {
        seen.get(import)
            .map(|v| {
                v.iter()
                    .map(|e| describe(&e.ty, &e.data).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    };
    eprintln!("{:?} {:?}", lines(&r1.import), lines(&r2.import));
    let run1 = &seen[&r1.import];
    assert_eq!(run1.len(), 1, "{:?}", lines(&r1.import));
    assert_eq!(run1[0].ty, COMPLETED);
    assert_eq!(run1[0].id, format!("imports/{}/completed", r1.import));
    assert_eq!(
        lines(&r1.import),
        vec!["import-000001 completed (5 merchants)"]
    );

    let run2 = &seen[&r2.import];
    assert!(
        reported_after >= Duration::from_millis(STUCK_AFTER_MS as u64),
        "stuck reported {reported_after:?} after the run's last event"
    );
    assert!(
        run2.iter().all(|e| e.ty == STUCK),
        "{:?}",
        lines(&r2.import)
    );
    assert!(
        run2.len() >= 2,
        "once per quiet slot: {:?}",
        lines(&r2.import)
    );
    for (n, e) in run2.iter().enumerate() {
        assert_eq!(e.id, format!("imports/{}/stuck/{}", r2.import, n + 1));
        assert_eq!(e.data.missing, stalled);
        assert_eq!((e.data.parts_done, e.data.parts_total), (3, 5));
        assert!(e.data.at_ms - e.data.began_ms >= STUCK_AFTER_MS);
    }
    assert_eq!(
        lines(&r2.import)[0],
        "import-000002 stuck: merchants [m001, m003] (3 of 5 done)"
    );
    assert!(imports.running(), "{}", imports.log_since_start());
}
