//! `spool dlq redrive` streams: a dead-letter topic many times larger than a redrive's bound
//! (records in flight, one fetch at a time) is redriven with a filter, every matching dead
//! letter arriving once at its original partition in the dead-letter order, with never more
//! than the bound in flight; a rate-limited redrive keeps its rate and stops at its limit.

use std::time::{Duration, Instant};

use spool_client::{ProducerConfig, Record};
use spool_processor::ops::{self, RedriveOptions, RedriveTarget};
use spool_processor::{Attempt, Input, dead_letter_for};
use spool_testkit::Broker;

use crate::{create, read_all};

const LETTERS: u64 = 3000;
const IN_FLIGHT: usize = 50;

fn value(r: &Record) -> String {
    String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrive_streams_a_dead_letter_topic_larger_than_its_bound() {
    let broker = Broker::start();
    let c = broker.client().await;
    create(&c, "src", 2).await;
    create(&c, "src.g.dlq", 2).await;
    create(&c, "again", 2).await;
    // Dead letters of `src` (about 0.6 MB: many fetches), one in three failing on SMTP.
    let producer = c.producer(ProducerConfig::default());
    let mut acks = Vec::new();
    let mut want: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for i in 0..LETTERS {
        let partition = (i % 2) as u32;
        let smtp = i % 3 == 0;
        let v = format!("v{i}-{}", "x".repeat(100));
        let input = Input {
            topic: "src".into(),
            partition,
            offset: i / 2,
            timestamp_ms: 1_000 + i as i64,
            key: Some(format!("k{i}").into()),
            value: Some(v.clone().into()),
            headers: Vec::new(),
            attempt: 3,
            lane: "src".into(),
        };
        let reason = if smtp {
            "SMTP 451 try later"
        } else {
            "bad input"
        };
        let history = [Attempt {
            attempt: 3,
            at_ms: 5,
            reason: reason.into(),
        }];
        let (topic, record) = dead_letter_for(&input, "g", &history, 10);
        acks.push(producer.send_to(&topic, partition, record).await.unwrap());
        if smtp {
            want[partition as usize].push(v);
        }
    }
    producer.close().await;
    for a in acks {
        a.await.unwrap();
    }

    let opts = RedriveOptions {
        error_contains: Some("SMTP 451".into()),
        in_flight: IN_FLIGHT,
        ..RedriveOptions::default()
    };
    let report = ops::redrive(&c, "src.g.dlq", &opts).await.unwrap();
    let matching = want.iter().map(Vec::len).sum::<usize>();
    assert_eq!(report.read, LETTERS as usize);
    assert_eq!(report.sent, matching);
    assert_eq!(report.per_topic["src"], matching);
    assert!(
        (1..=IN_FLIGHT).contains(&report.peak_in_flight),
        "in flight at most {IN_FLIGHT}: {}",
        report.peak_in_flight
    );
    assert_eq!(report.next_offsets[&0], LETTERS / 2);
    assert_eq!(report.next_offsets[&1], LETTERS / 2);
    for (p, want) in want.iter().enumerate() {
        let got: Vec<String> = read_all(&c, "src", p as u32)
            .await
            .iter()
            .map(value)
            .collect();
        assert_eq!(&got, want, "partition {p}: every match once, in order");
    }

    // Rate-limited, with a limit, to a named topic: 30 records at 100/s take about 0.3 s,
    // and the report says where to go on from.
    let started = Instant::now();
    let opts = RedriveOptions {
        target: RedriveTarget::Topic("again".into()),
        rate_per_sec: Some(100),
        limit: 30,
        in_flight: IN_FLIGHT,
        ..RedriveOptions::default()
    };
    let report = ops::redrive(&c, "src.g.dlq", &opts).await.unwrap();
    let took = started.elapsed();
    assert_eq!((report.read, report.sent), (30, 30));
    assert_eq!(report.next_offsets[&0], 30, "{report:?}");
    assert!(
        took >= Duration::from_millis(280),
        "30 records at 100/s took {took:?}"
    );
    let again = read_all(&c, "again", 0).await.len() + read_all(&c, "again", 1).await.len();
    assert_eq!(again, 30);
}
