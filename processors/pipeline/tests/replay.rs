//! Replay from a point in time, end to end (docs/pipeline.md, "Replay: debugging a missed
//! alert"): a real `spoold`, `spool-deals` and `spool-matching` process a seeded feed in two
//! phases; then `spool-matching --replay-from T --replay-prefix debug.`, with T the event time
//! of phase 2's first round, reruns matching while production keeps running.
//!
//! The replay must write exactly the notification requests production wrote for the deals
//! from T on (the same deterministic ids, each once) and the same timeline for those deals,
//! only into `debug.` topics; every other topic keeps its records (nothing for notifications
//! to send, no effect recorded), production's `matching` group keeps its offsets, and the
//! only other topic created is the scratch group's empty control topic. Users' settings were
//! written before T: the replay reads its tables (`user-settings`, `address-status`) from
//! their start, or it would match the deals against nobody.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use spool_client::{Client, FetchOptions, OffsetSpec, Record, TopicPartition};
use spool_pipeline::events::{NotificationRequest, TimelineEvent, TimelineOp};
use spool_pipeline::feed::{Endpoints, Feed, FeedConfig};
use spool_pipeline::{publish, topics};
use spool_processor::envelope;
use support::procs::Processor;
use support::{Scratch, oracle};

const PARTITIONS: u32 = 2;
const PREFIX: &str = "debug.";
/// Rounds before the replay's start time, and after it.
const PHASES: [usize; 2] = [6, 4];

/// Every committed record of `topic` (read committed, up to the last stable offset).
async fn read_all(client: &Client, topic: &str) -> Vec<Record> {
    let partitions = client.describe_topic(topic).await.unwrap().partitions.len() as u32;
    let mut out = Vec::new();
    for p in 0..partitions {
        let mut offset = 0;
        loop {
            let f = client
                .fetch(topic, p, offset, &FetchOptions::default())
                .await
                .unwrap();
            out.extend(f.records);
            if f.next_offset <= offset || f.next_offset >= f.last_stable_offset {
                break;
            }
            offset = f.next_offset;
        }
    }
    out
}

/// Notification ids in `topic` (each once: a repeat fails the test).
async fn request_ids(client: &Client, topic: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for r in read_all(client, topic).await {
        let n =
            envelope::decode::<NotificationRequest>(&r.headers, r.key.as_ref(), r.value.as_ref())
                .unwrap()
                .data;
        assert!(ids.insert(n.id.clone()), "{topic}: {} written twice", n.id);
    }
    ids
}

/// Timeline events in `topic` as (user, op, entry).
async fn timeline(client: &Client, topic: &str) -> BTreeSet<(String, &'static str, String)> {
    let mut out = BTreeSet::new();
    for r in read_all(client, topic).await {
        let e = envelope::decode::<TimelineEvent>(&r.headers, r.key.as_ref(), r.value.as_ref())
            .unwrap()
            .data;
        let op = if e.op == TimelineOp::Add {
            "add"
        } else {
            "remove"
        };
        assert!(
            out.insert((e.user, op, e.entry)),
            "{topic}: a timeline event twice"
        );
    }
    out
}

/// Every topic but the broker's internal ones, with each partition's high watermark.
async fn topic_ends(client: &Client) -> BTreeMap<String, Vec<u64>> {
    let mut out = BTreeMap::new();
    for t in client.list_topics().await.unwrap() {
        if t.topic.starts_with("__") {
            continue;
        }
        let q: Vec<_> = (0..t.partitions)
            .map(|p| (TopicPartition::new(t.topic.as_str(), p), OffsetSpec::Latest))
            .collect();
        let ends = client.list_offsets(&q).await.unwrap();
        out.insert(
            t.topic,
            ends.into_iter().map(|e| e.unwrap().offset).collect(),
        );
    }
    out
}

/// Waits until `topic` holds exactly `want` (and one more look 500 ms later still does).
async fn wait_for_requests(client: &Client, topic: &str, want: &BTreeSet<String>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = if client.describe_topic(topic).await.is_ok() {
            request_ids(client, topic).await
        } else {
            BTreeSet::new()
        };
        if got == *want {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let again = request_ids(client, topic).await;
            support::assert_same_set(&format!("{what} (settled)"), &again, want);
            return;
        }
        if Instant::now() > deadline {
            support::assert_same_set(what, &got, want);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every notification id the oracle expects (all channels).
fn ids(e: &oracle::Expected) -> BTreeSet<String> {
    e.emails
        .values()
        .flatten()
        .cloned()
        .chain(e.webhooks.iter().map(|(_, id)| id.clone()))
        .chain(e.pushes.iter().map(|(_, id)| id.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_replayed_from_a_time_writes_the_same_requests_into_prefixed_topics_only() {
    let started = Instant::now();
    let (_broker, client, addr) = support::broker_with_topics(PARTITIONS).await;
    let dir = Scratch::new("replay");
    let d = dir.path();
    // Every address deliverable: no flag may change who gets e-mail between the run and the
    // replay (address flags are read as they are when the replay runs).
    let cfg = FeedConfig {
        seed: 31,
        products: 200,
        users: 60,
        undeliverable_bp: 0,
        ..FeedConfig::default()
    };
    let mut feed = Feed::new(cfg.clone());
    let users = feed.users(&Endpoints {
        webhook: "http://127.0.0.1:9".into(),
        push: "http://127.0.0.1:9".into(),
    });
    let before = oracle::expect(&cfg, &users, &PHASES[..1]);
    let all = oracle::expect(&cfg, &users, &PHASES);
    let (before_ids, all_ids) = (ids(&before), ids(&all));
    let want_replay: BTreeSet<String> = all_ids.difference(&before_ids).cloned().collect();
    assert!(
        !before_ids.is_empty() && want_replay.len() >= 20,
        "the seed gives deals on both sides of the start time ({} / {})",
        before_ids.len(),
        want_replay.len()
    );

    let matching_toml = "inputs = [\"deal-broadcast\", \"user-settings\", \"address-status\"]\noutputs = [\"notification-requests\", \"timeline\"]\ntables = [\"user-settings\", \"address-status\"]\n";
    let mut deals = Processor::new(
        env!("CARGO_BIN_EXE_spool-deals"),
        d,
        "deals",
        &addr,
        &format!(
            "inputs = [\"prices\"]\noutputs = [\"deal-transitions\", \"deal-broadcast\"]\n[app]\nbroadcast_partitions = {PARTITIONS}\n"
        ),
    );
    let mut matching = Processor::new(
        env!("CARGO_BIN_EXE_spool-matching"),
        d,
        "matching",
        &addr,
        matching_toml,
    );
    deals.start();
    matching.start();

    // The settings, then phase 1; phase 2 only once production has matched all of phase 1,
    // so in every partition of deal-broadcast phase 2's deals come after phase 1's.
    let producer = publish::producer(&client);
    publish::publish_users(&producer, &users).await.unwrap();
    for _ in 0..PHASES[0] {
        publish::publish_round(&producer, &feed.next_round(), 0)
            .await
            .unwrap();
    }
    wait_for_requests(
        &client,
        topics::NOTIFICATION_REQUESTS,
        &before_ids,
        "phase 1",
    )
    .await;
    for _ in 0..PHASES[1] {
        publish::publish_round(&producer, &feed.next_round(), 0)
            .await
            .unwrap();
    }
    wait_for_requests(&client, topics::NOTIFICATION_REQUESTS, &all_ids, "phase 2").await;
    let production_timeline = timeline(&client, topics::TIMELINE).await;
    let matching_tps: Vec<TopicPartition> = support::input_partitions(
        &[
            topics::DEAL_BROADCAST,
            topics::USER_SETTINGS,
            topics::ADDRESS_STATUS,
        ],
        PARTITIONS,
    );
    let committed_before = client
        .fetch_offsets("matching", &matching_tps)
        .await
        .unwrap();
    let ends_before = topic_ends(&client).await;

    // The replay, from the event time of phase 2's first round (round N, counted from 1,
    // starts at `start_ms + N × round_ms`), beside production.
    let from = cfg.start_ms + (PHASES[0] as i64 + 1) * cfg.round_ms;
    let from_rfc = jiff::Timestamp::from_millisecond(from).unwrap().to_string();
    let mut replay = Processor::new(
        env!("CARGO_BIN_EXE_spool-matching"),
        d,
        "matching-replay",
        &addr,
        matching_toml,
    )
    // Production's processor name (`--name` over the file's), as an operator runs it with
    // production's config file.
    .with_args(&[
        "--name",
        "matching",
        "--replay-from",
        &from_rfc,
        "--replay-prefix",
        PREFIX,
    ]);
    replay.start();
    let replay_requests = format!("{PREFIX}{}", topics::NOTIFICATION_REQUESTS);
    wait_for_requests(
        &client,
        &replay_requests,
        &want_replay,
        "the replay's requests",
    )
    .await;

    // Its timeline: production's for the deals that entered from T on (the removals of deals
    // entered before T are not replayed: the replay never saw them enter).
    let replayed_entries: BTreeSet<String> = all
        .timeline
        .difference(&before.timeline)
        .filter(|(_, op, _)| *op == "add")
        .map(|(_, _, entry)| entry.clone())
        .collect();
    let want_timeline: BTreeSet<_> = production_timeline
        .iter()
        .filter(|(_, _, entry)| replayed_entries.contains(entry))
        .cloned()
        .collect();
    support::assert_same_set(
        "the replay's timeline",
        &timeline(&client, &format!("{PREFIX}{}", topics::TIMELINE)).await,
        &want_timeline,
    );

    // Production untouched: every topic that existed keeps its records, the production group
    // its offsets; what the replay created is under the prefix, plus its group's (empty)
    // control topic.
    let ends_after = topic_ends(&client).await;
    for (t, ends) in &ends_before {
        assert_eq!(
            ends_after.get(t),
            Some(ends),
            "{t} was written during the replay"
        );
    }
    let group = format!("matching.replay-{from}");
    for (t, ends) in ends_after
        .iter()
        .filter(|(t, _)| !ends_before.contains_key(*t))
    {
        if *t == format!("{group}.control") {
            assert!(ends.iter().all(|&e| e == 0), "{t}: {ends:?}");
        } else {
            assert!(t.starts_with(PREFIX), "the replay created {t}");
        }
    }
    assert_eq!(
        client
            .fetch_offsets("matching", &matching_tps)
            .await
            .unwrap(),
        committed_before,
        "production's group moved"
    );
    let replay_committed = client.fetch_offsets(&group, &matching_tps).await.unwrap();
    assert!(
        replay_committed.iter().all(|c| c.offset.is_some()),
        "the replay runs as group {group}: {replay_committed:?}"
    );
    assert!(deals.running() && matching.running() && replay.running());
    eprintln!(
        "replay: {} requests before T, {} replayed from {from_rfc} (= production's), {} timeline events; {:.1} s",
        before_ids.len(),
        want_replay.len(),
        want_timeline.len(),
        started.elapsed().as_secs_f64()
    );
}
